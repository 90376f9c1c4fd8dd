//! Operations routes: liveness, readiness, metrics, the served models, the webhook secret.

use super::error::{success, ApiError, ApiResult};
use crate::contract::SubmitRequest;
use crate::contract::{Envelope, ErrorEnvelope, ModelEntry, StatusText, WebhookSecret};
use crate::engine::ModelInfo;
use crate::state::AppState;
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::Arc;
use utoipa::PartialSchema;

/// The models a submit may name, or 503 while loading, shutting down or without Redis.
pub async fn models_loaded(state: &AppState) -> Result<Vec<ModelInfo>, ApiError> {
    if state.jobs.is_draining() {
        return Err(ApiError::unavailable("the server is shutting down"));
    }
    state.jobs.models(state.models.get()).await?.ok_or_else(|| {
        ApiError::unavailable("the model is still loading; retry when /ready answers 200")
    })
}

/// Liveness.
#[utoipa::path(get, path = "/health", tag = "operations",
    responses((status = 200, description = "The process answers", body = Envelope<StatusText>)))]
pub async fn health() -> Response {
    success(StatusText {
        status: "ok".into(),
    })
}

/// 200 once the model is loaded, 503 while loading or shutting down. In Redis mode: 503 while
/// Redis is unreachable or no model has a live worker; 200 otherwise, its status naming the
/// models without a live worker, if any (their tasks wait for one).
#[utoipa::path(get, path = "/ready", tag = "operations",
    responses(
        (status = 200, description = "Admitting tasks", body = Envelope<StatusText>),
        (status = 503, description = "Loading or shutting down", body = ErrorEnvelope),
    ))]
pub async fn ready(State(state): State<Arc<AppState>>) -> ApiResult {
    let models = models_loaded(&state).await?;
    let live = live_workers(&state).await?;
    let none: Vec<&str> = models
        .iter()
        .filter(|m| live.get(&m.id).is_none_or(|n| *n == 0))
        .map(|m| m.id.as_str())
        .collect();
    if none.len() == models.len() {
        return Err(ApiError::unavailable(format!(
            "no live worker for {}; tasks are queued until one starts",
            none.join(", ")
        )));
    }
    let status = if none.is_empty() {
        "ready".to_string()
    } else {
        format!("ready; no live worker for {}", none.join(", "))
    };
    Ok(success(StatusText { status }))
}

/// Live workers per model (this process's loaded ones, or the cluster's).
async fn live_workers(state: &AppState) -> Result<HashMap<String, usize>, ApiError> {
    let loaded = state
        .workers_loaded
        .load(std::sync::atomic::Ordering::Relaxed);
    let live = state.jobs.live_workers(state.models.get(), loaded).await?;
    Ok(live.into_iter().collect())
}

/// Prometheus metrics (text exposition format). Answered within one Redis command timeout
/// even when Redis hangs (the cluster-wide figures are then left out and `ready` is 0).
#[utoipa::path(get, path = "/metrics", tag = "operations",
    responses((status = 200, description = "Metrics", content_type = "text/plain")))]
pub async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    let loaded = state
        .workers_loaded
        .load(std::sync::atomic::Ordering::Relaxed);
    let both = async {
        tokio::join!(
            state.jobs.overview(state.models.get(), loaded),
            models_loaded(&state)
        )
    };
    let (overview, ready) = tokio::time::timeout(crate::engine::COMMAND_TIMEOUT, both)
        .await
        .map_or((Default::default(), false), |(o, r)| (o, r.is_ok()));
    let streams = state.config.max_event_streams - state.event_streams.available_permits();
    state.metrics.event_streams(streams);
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics.render(&overview, ready, loaded),
    )
        .into_response()
}

/// Served models and their input schema.
#[utoipa::path(get, path = "/api/v3/models", tag = "operations",
    responses(
        (status = 200, description = "The models", body = Envelope<Vec<ModelEntry>>),
        (status = 503, description = "Loading", body = ErrorEnvelope),
    ),
    security(("bearer" = [])))]
pub async fn models(State(state): State<Arc<AppState>>) -> ApiResult {
    let mut models = models_loaded(&state).await?;
    let live = live_workers(&state).await?;
    models.retain(|m| live.get(&m.id).is_some_and(|n| *n > 0));
    let max_loras = state.config.loras.max;
    Ok(success(
        models
            .iter()
            .map(|m| model_entry(m, max_loras))
            .collect::<Vec<_>>(),
    ))
}

/// The webhook signing secret.
#[utoipa::path(get, path = "/api/v3/webhook/secret", tag = "operations",
    responses((status = 200, description = "The secret", body = Envelope<WebhookSecret>)),
    security(("bearer" = [])))]
pub async fn webhook_secret(State(state): State<Arc<AppState>>) -> Response {
    success(WebhookSecret {
        secret: state.webhook_secret(),
    })
}

/// defaults and required fields, and this server's limits (LoRAs; the model's RIFLEx index).
fn input_schema(m: &ModelInfo, max_loras: usize) -> Value {
    let mut s = serde_json::to_value(SubmitRequest::schema()).unwrap_or_default();
    let mut required = vec!["prompt"];
    if m.image_to_video {
        required.push("image");
    }
    s["required"] = json!(required);
    for (field, default) in [
        ("num_inference_steps", json!(m.defaults.num_inference_steps)),
        ("num_frames", json!(m.defaults.num_frames)),
        ("width", json!(m.defaults.width)),
        ("height", json!(m.defaults.height)),
        ("guidance_scale", json!(skyreels_params::GUIDANCE_SCALE)),
        (
            "embedded_guidance_scale",
            json!(skyreels_params::EMBEDDED_GUIDANCE_SCALE),
        ),
        ("fps", json!(skyreels_params::FPS)),
        ("seed", json!(-1)),
        ("riflex_freq_index", json!(0)),
    ] {
        if let Some(p) = s["properties"].get_mut(field) {
            p["default"] = default;
        }
    }
    if let Some(p) = s["properties"].get_mut("width") {
        p["multipleOf"] = json!(m.size_multiple);
    }
    if let Some(p) = s["properties"].get_mut("height") {
        p["multipleOf"] = json!(m.size_multiple);
    }
    if let Some(p) = s["properties"].get_mut("loras") {
        p["maxItems"] = json!(max_loras);
    }
    if let Some(p) = s["properties"].get_mut("riflex_freq_index") {
        p["maximum"] = json!(m.temporal_rope_frequencies);
    }
    s
}

/// One entry of `GET /api/v3/models`.
fn model_entry(m: &ModelInfo, max_loras: usize) -> ModelEntry {
    ModelEntry {
        model_id: m.id.clone(),
        name: m.id.clone(),
        kind: if m.image_to_video {
            "image-to-video"
        } else {
            "text-to-video"
        }
        .into(),
        description: "SkyReels V1 (HunyuanVideo) served by skyreels-server. No NSFW classifier runs: has_nsfw_contents is always false.".into(),
        api_schema: crate::contract::ApiSchema {
            input: input_schema(m, max_loras),
        },
    }
}
