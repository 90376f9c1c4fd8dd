//! Operations routes: liveness, readiness, metrics, the served models, the webhook secret.

use super::error::{success, ApiError, ApiResult};
use crate::contract::{Envelope, ErrorEnvelope, ModelEntry, StatusText, WebhookSecret};
use crate::generator::ModelInfo;
use crate::{openapi, AppState};
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use std::sync::Arc;

/// The served models, or 503 while loading or shutting down.
pub fn models_loaded(state: &AppState) -> Result<&Vec<ModelInfo>, ApiError> {
    if state.store.is_draining() {
        return Err(ApiError::unavailable("the server is shutting down"));
    }
    state.models.get().ok_or_else(|| {
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

/// 200 once the model is loaded, 503 while loading or shutting down.
#[utoipa::path(get, path = "/ready", tag = "operations",
    responses(
        (status = 200, description = "Admitting tasks", body = Envelope<StatusText>),
        (status = 503, description = "Loading or shutting down", body = ErrorEnvelope),
    ))]
pub async fn ready(State(state): State<Arc<AppState>>) -> ApiResult {
    models_loaded(&state)?;
    Ok(success(StatusText {
        status: "ready".into(),
    }))
}

/// Prometheus metrics (text exposition format).
#[utoipa::path(get, path = "/metrics", tag = "operations",
    responses((status = 200, description = "Metrics", content_type = "text/plain")))]
pub async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    let (counts, waiting) = state.store.counts();
    let ready = state.models.get().is_some() && !state.store.is_draining();
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics.render(
            &counts,
            waiting,
            ready,
            state
                .workers_loaded
                .load(std::sync::atomic::Ordering::Relaxed),
        ),
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
    let models = models_loaded(&state)?;
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
        secret: state.webhook_secret.clone(),
    })
}
