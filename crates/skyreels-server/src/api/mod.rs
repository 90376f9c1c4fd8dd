//! The HTTP surface: WaveSpeed's `/api/v3` routes and ours, built by a pure function of the
//! state. One module per concern: errors and the envelope, request bodies, middleware, submit,
//! predictions, uploads, operations, the playground page.

pub mod body;
pub mod error;
pub mod events;
pub mod middleware;
pub mod openapi;
pub mod ops;
pub mod playground;
pub mod predictions;
pub mod submit;
pub mod uploads;

pub use error::{envelope, success, ApiError, ApiResult};
pub use middleware::HostPolicy;
pub use predictions::prediction;

use crate::state::AppState;
use axum::extract::DefaultBodyLimit;
use axum::http::{header, HeaderMap, Method, Uri};
use axum::middleware::{from_fn, from_fn_with_state};
use axum::routing::{get, post, put};
use axum::Router;
use std::sync::Arc;
use tower_http::services::ServeDir;

/// The router. Everything under `/api/v3` needs a key when keys are configured, except the PUT
/// upload targets (they carry their own secret) and uploaded files; `/metrics`, `/docs` and
/// `/openapi.json` too with `protect_ops`. Every request's Host must pass `hosts`.
pub fn router(state: Arc<AppState>, hosts: HostPolicy) -> Router {
    let auth = from_fn_with_state(state.clone(), middleware::auth);
    let protected = Router::new()
        .route("/api/v3/{owner}/{model}", post(submit::submit))
        .route("/api/v3/predictions/{id}/result", get(predictions::result))
        .route("/api/v3/predictions/{id}/events", get(events::events))
        .route(
            "/api/v3/predictions/{id}",
            get(predictions::result_alias).delete(predictions::cancel),
        )
        .route("/api/v3/models", get(ops::models))
        .route("/api/v3/webhook/secret", get(ops::webhook_secret))
        .route("/api/v3/media/upload/binary", post(uploads::upload_binary))
        .route("/api/v3/media/uploads", post(uploads::upload_ticket))
        .route_layer(auth.clone());
    let files = Router::new().route("/api/v3/media/files/{id}/{name}", get(uploads::upload_file));
    let files = if state.jobs.outputs_on_disk() {
        files.nest_service("/outputs", ServeDir::new(state.jobs.paths().video_dir()))
    } else {
        files.route("/outputs/{file}", get(uploads::output_file))
    };
    let files = files.layer(from_fn(middleware::inert_files));
    let pages = Router::new()
        .route("/", get(playground::page))
        .route("/playground", get(playground::page))
        .route("/playground.js", get(playground::script))
        .route("/playground.css", get(playground::style))
        .layer(middleware::page_policy(middleware::PLAYGROUND_CSP));
    let ops = Router::new()
        .route("/metrics", get(ops::metrics))
        .merge(openapi::swagger().layer(middleware::page_policy(middleware::DOCS_CSP)));
    let ops = if state.config.protect_ops {
        ops.route_layer(auth)
    } else {
        ops
    };
    let body_limit = state.config.max_body_bytes;
    Router::new()
        .merge(protected)
        .merge(files)
        .merge(ops)
        .merge(pages)
        .route("/api/v3/media/uploads/{token}", put(uploads::upload_put))
        .route("/health", get(ops::health))
        .route("/ready", get(ops::ready))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(from_fn_with_state(
            state.clone(),
            middleware::envelope_errors,
        ))
        .layer(DefaultBodyLimit::max(body_limit))
        .layer(from_fn_with_state(state.clone(), middleware::body_deadline))
        .layer(from_fn_with_state(Arc::new(hosts), middleware::check_host))
        .layer(from_fn_with_state(state.clone(), middleware::observe))
        .layer(from_fn(middleware::security_headers))
        .with_state(state)
}

/// What a worker process serves on `--metrics-port`: `/metrics` and `/health`.
pub fn metrics_router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/metrics", get(ops::metrics))
        .route("/health", get(ops::health))
        .fallback(not_found)
        .layer(from_fn(middleware::security_headers))
        .with_state(state)
}

async fn not_found(method: Method, uri: Uri) -> ApiError {
    ApiError::not_found(format!(
        "not found: {} {:?}",
        middleware::method_label(&method),
        uri.path()
    ))
}

async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    ApiError::new(
        axum::http::StatusCode::METHOD_NOT_ALLOWED,
        format!(
            "method {} is not allowed on {:?}",
            middleware::method_label(&method),
            uri.path()
        ),
    )
}

/// The base of absolute URLs: `--public-url`, else the request's Host (checked by the Host
/// policy) and X-Forwarded-Proto.
pub fn base_url(state: &AppState, headers: &HeaderMap) -> String {
    if let Some(u) = &state.config.public_url {
        return u.trim_end_matches('/').to_string();
    }
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("localhost");
    let proto = headers
        .get("x-forwarded-proto")
        .and_then(|h| h.to_str().ok())
        .filter(|p| *p == "https")
        .unwrap_or("http");
    format!("{proto}://{host}")
}
