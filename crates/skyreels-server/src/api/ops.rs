//! Operations routes: liveness, readiness, metrics, the served models, the webhook secret.

use super::error::{success, ApiError, ApiResult};
use crate::contract::{Envelope, ErrorEnvelope, ModelEntry, StatusText, WebhookSecret};
use crate::generator::ModelInfo;
use crate::jobs::Jobs;
use crate::{openapi, AppState};
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use std::sync::Arc;

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
    let status = match &state.jobs {
        Jobs::Memory(_) => "ready".to_string(),
        Jobs::Redis(c) => {
            let live = c.live_workers().await?;
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
            if none.is_empty() {
                "ready".to_string()
            } else {
                format!("ready; no live worker for {}", none.join(", "))
            }
        }
    };
    Ok(success(StatusText { status }))
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
    let (overview, ready) = tokio::time::timeout(crate::cluster::COMMAND_TIMEOUT, both)
        .await
        .map_or((Default::default(), false), |(o, r)| (o, r.is_ok()));
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
    if let Jobs::Redis(c) = &state.jobs {
        let live = c.live_workers().await?;
        models.retain(|m| live.get(&m.id).is_some_and(|n| *n > 0));
    }
    Ok(success(
        models.iter().map(openapi::model_entry).collect::<Vec<_>>(),
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
