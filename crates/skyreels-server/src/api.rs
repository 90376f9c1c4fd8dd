//! The HTTP surface: WaveSpeed's `/api/v3` routes and ours, built by a pure function of the state.

use crate::generator::{GenerationRequest, ModelInfo};
use crate::job::{new_id, now_ms, rfc3339_ms, JobRecord, Status, TaskCode};
use crate::media::{self, ImageSource};
use crate::store::{AdmitError, CancelResult, Store, Upload};
use crate::{openapi, AppState};
use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, MatchedPath, Multipart, Path, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::Router;
use base64::Engine;
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};
use std::sync::Arc;
use std::time::Instant;
use tower_http::services::{ServeDir, ServeFile};

/// An error answered before a task exists: the envelope with `data: null`, HTTP status = code.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub retry_after: Option<u64>,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            retry_after: None,
        }
    }

    fn bad(field: &str, rule: impl std::fmt::Display) -> Self {
        Self::new(StatusCode::BAD_REQUEST, format!("{field}: {rule}"))
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = envelope(self.status, &self.message, Value::Null);
        if let Some(s) = self.retry_after {
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        r
    }
}

/// `{"code", "message", "data"}` with HTTP status = code.
pub fn envelope(status: StatusCode, message: &str, data: Value) -> Response {
    let body = json!({"code": status.as_u16(), "message": message, "data": data});
    (status, axum::Json(body)).into_response()
}

fn success(data: Value) -> Response {
    envelope(StatusCode::OK, "success", data)
}

type ApiResult = Result<Response, ApiError>;

/// The router. Everything under `/api/v3` needs a key when keys are configured, except the PUT
/// upload targets (they carry their own secret) and uploaded files.
pub fn router(state: Arc<AppState>) -> Router {
    let protected = Router::new()
        .route("/api/v3/{owner}/{model}", post(submit))
        .route("/api/v3/predictions/{id}/result", get(result))
        .route("/api/v3/predictions/{id}", get(result).delete(cancel))
        .route("/api/v3/models", get(models))
        .route("/api/v3/webhook/secret", get(webhook_secret))
        .route("/api/v3/media/upload/binary", post(upload_binary))
        .route("/api/v3/media/uploads", post(upload_ticket))
        .route_layer(middleware::from_fn_with_state(state.clone(), auth));
    let body_limit = state.config.max_body_bytes;
    Router::new()
        .merge(protected)
        .route("/api/v3/media/uploads/{token}", put(upload_put))
        .route("/api/v3/media/files/{id}/{name}", get(upload_file))
        .nest_service("/outputs", ServeDir::new(state.store.video_dir()))
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .merge(openapi::swagger())
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(
            state.clone(),
            envelope_errors,
        ))
        .layer(DefaultBodyLimit::max(body_limit))
        .layer(middleware::from_fn_with_state(state.clone(), observe))
        .with_state(state)
}

async fn not_found(method: Method, uri: axum::http::Uri) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        format!("not found: {method} {}", uri.path()),
    )
}

async fn method_not_allowed(method: Method, uri: axum::http::Uri) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("method {method} is not allowed on {}", uri.path()),
    )
}

/// Request id, structured log line and latency metric for every request.
async fn observe(State(state): State<Arc<AppState>>, mut req: Request, next: Next) -> Response {
    let start = Instant::now();
    let id = req
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 128)
        .map_or_else(new_id, str::to_string);
    if let Ok(v) = HeaderValue::from_str(&id) {
        req.headers_mut().insert("x-request-id", v.clone());
    }
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_string(), |m| m.as_str().to_string());
    let mut response = next.run(req).await;
    let status = response.status().as_u16();
    let secs = start.elapsed().as_secs_f64();
    state.metrics.http(method.as_str(), &route, status, secs);
    tracing::info!(request_id = %id, %method, %path, status, ms = secs * 1000.0, "request");
    if let Ok(v) = HeaderValue::from_str(&id) {
        response.headers_mut().insert("x-request-id", v);
    }
    response
}

/// Rewrites any error response that is not already JSON (axum's extractor rejections, file
/// service errors) into the envelope, so no client ever sees a bare-text or empty error.
async fn envelope_errors(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let response = next.run(req).await;
    let status = response.status();
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if !status.is_client_error() && !status.is_server_error() || is_json {
        return response;
    }
    let text = match axum::body::to_bytes(response.into_body(), 64 << 10).await {
        Ok(b) => String::from_utf8_lossy(&b).trim().to_string(),
        Err(_) => String::new(),
    };
    let message = match status {
        StatusCode::PAYLOAD_TOO_LARGE => format!(
            "request body is larger than the limit of {} bytes",
            state.config.max_body_bytes
        ),
        _ if text.is_empty() => status.canonical_reason().unwrap_or("error").to_string(),
        _ => text,
    };
    ApiError::new(status, message).into_response()
}

async fn auth(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    if state.key_hashes.is_empty() {
        return next.run(req).await;
    }
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(|k| Sha256::digest(k.trim().as_bytes()));
    // compare digests in constant time, against every key
    let ok = presented.is_some_and(|p| {
        state.key_hashes.iter().fold(false, |found, k| {
            found
                | (k.iter()
                    .zip(p.iter())
                    .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                    == 0)
        })
    });
    if ok {
        next.run(req).await
    } else {
        ApiError::new(StatusCode::UNAUTHORIZED, "Unauthorized: invalid API key").into_response()
    }
}

/// The base of absolute URLs: `--public-url`, else the request's Host (and X-Forwarded-Proto).
fn base_url(state: &AppState, headers: &HeaderMap) -> String {
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

/// The prediction object (`data`). With base64 output, the videos are read and inlined.
pub async fn prediction(state: &AppState, r: &JobRecord, queue_position: Option<usize>) -> Value {
    let mut outputs = Vec::new();
    for f in &r.outputs {
        if r.base64_output {
            match tokio::fs::read(state.store.video_path(f)).await {
                Ok(bytes) => outputs.push(format!(
                    "data:video/mp4;base64,{}",
                    base64::engine::general_purpose::STANDARD.encode(bytes)
                )),
                Err(e) => tracing::error!(id = %r.id, "cannot read output {f}: {e}"),
            }
        } else {
            outputs.push(format!("{}/outputs/{f}", r.base_url));
        }
    }
    let inference: u64 = r.timings.iter().map(|(_, ms)| ms).sum();
    let mut timings = Map::new();
    timings.insert("inference".into(), json!(inference));
    for (stage, ms) in &r.timings {
        timings.insert(stage.clone(), json!(ms));
    }
    json!({
        "id": r.id,
        "model": r.model,
        "outputs": outputs,
        "urls": {"get": format!("{}/api/v3/predictions/{}/result", r.base_url, r.id)},
        "has_nsfw_contents": r.outputs.iter().map(|_| false).collect::<Vec<_>>(),
        "status": r.status.as_str(),
        "created_at": rfc3339_ms(r.created_at),
        "started_at": r.started_at.map(rfc3339_ms),
        "completed_at": r.completed_at.map(rfc3339_ms),
        "error": r.error,
        "code": u32::from(r.code),
        "executionTime": r.execution_ms(),
        "timings": timings,
        "input": r.input,
        "progress": {"step": r.step, "total": r.total_steps},
        "queue_position": queue_position,
        "seed": r.seed,
    })
}

fn models_loaded(state: &AppState) -> Result<&Vec<ModelInfo>, ApiError> {
    if state.store.is_draining() {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "the server is shutting down",
        ));
    }
    state.models.get().ok_or_else(|| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "the model is still loading; retry when /ready answers 200",
        )
    })
}

/// A submit's fields, checked.
#[derive(Debug)]
struct Submit {
    prompt: String,
    negative_prompt: Option<String>,
    image: Option<String>,
    seed: Option<u64>,
    sync: bool,
    base64: bool,
    steps: usize,
    guidance_scale: f64,
    embedded_guidance_scale: f64,
    num_frames: usize,
    fps: f64,
    /// (height, width) when the request fixes it.
    size: Option<(usize, usize)>,
    /// Portrait from aspect_ratio "9:16"; `None`: follow the image.
    portrait: Option<bool>,
}

fn field<'a>(body: &'a Map<String, Value>, name: &str) -> Option<&'a Value> {
    body.get(name).filter(|v| !v.is_null())
}

fn opt_string(body: &Map<String, Value>, name: &str) -> Result<Option<String>, ApiError> {
    match field(body, name) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(ApiError::bad(name, "must be a string")),
    }
}

fn opt_bool(body: &Map<String, Value>, name: &str) -> Result<bool, ApiError> {
    match field(body, name) {
        None => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(_) => Err(ApiError::bad(name, "must be true or false")),
    }
}

fn opt_int(
    body: &Map<String, Value>,
    name: &str,
    lo: i64,
    hi: i64,
) -> Result<Option<i64>, ApiError> {
    match field(body, name) {
        None => Ok(None),
        Some(v) => match v
            .as_i64()
            .or_else(|| v.as_f64().filter(|f| f.fract() == 0.0).map(|f| f as i64))
        {
            Some(i) if (lo..=hi).contains(&i) => Ok(Some(i)),
            _ => Err(ApiError::bad(
                name,
                format!("must be an integer from {lo} to {hi}"),
            )),
        },
    }
}

fn opt_float(
    body: &Map<String, Value>,
    name: &str,
    lo: f64,
    hi: f64,
) -> Result<Option<f64>, ApiError> {
    match field(body, name) {
        None => Ok(None),
        Some(v) => match v.as_f64() {
            Some(f) if (lo..=hi).contains(&f) => Ok(Some(f)),
            _ => Err(ApiError::bad(
                name,
                format!("must be a number from {lo} to {hi}"),
            )),
        },
    }
}

fn validate(body: &Map<String, Value>, model: &ModelInfo) -> Result<Submit, ApiError> {
    let prompt = opt_string(body, "prompt")?
        .filter(|p| !p.trim().is_empty())
        .ok_or_else(|| ApiError::bad("prompt", "is required and must be a non-empty string"))?;
    let image = opt_string(body, "image")?.filter(|s| !s.trim().is_empty());
    match (&image, model.image_to_video) {
        (None, true) => {
            return Err(ApiError::bad(
                "image",
                "is required: an http(s) URL, a data:image/...;base64 URI or an uploaded file URL",
            ))
        }
        (Some(_), false) => {
            return Err(ApiError::bad(
                "image",
                format!("{} is a text-to-video model and takes no image", model.id),
            ))
        }
        _ => {}
    }
    let m = model.size_multiple;
    let height = opt_int(body, "height", m as i64, 4096)?;
    let width = opt_int(body, "width", m as i64, 4096)?;
    for (name, v) in [("height", height), ("width", width)] {
        if let Some(v) = v {
            if !(v as usize).is_multiple_of(m) {
                return Err(ApiError::bad(
                    name,
                    format!("must be a multiple of {m}, got {v}"),
                ));
            }
        }
    }
    let portrait = match opt_string(body, "aspect_ratio")?.as_deref() {
        None => None,
        Some("16:9") => Some(false),
        Some("9:16") => Some(true),
        Some(other) => {
            return Err(ApiError::bad(
                "aspect_ratio",
                format!("must be \"16:9\" or \"9:16\", got {other:?}"),
            ))
        }
    };
    let size = match (height, width) {
        (Some(h), Some(w)) => Some((h as usize, w as usize)),
        (None, None) => None,
        _ => {
            return Err(ApiError::bad(
                if height.is_none() { "height" } else { "width" },
                "give width and height together",
            ))
        }
    };
    let num_frames = opt_int(body, "num_frames", 1, 257)?.map_or(model.num_frames, |n| n as usize);
    if num_frames % 4 != 1 {
        return Err(ApiError::bad(
            "num_frames",
            format!("must be 4k+1 (1, 5, ..., 97, ...), got {num_frames}"),
        ));
    }
    Ok(Submit {
        prompt,
        negative_prompt: opt_string(body, "negative_prompt")?,
        image,
        seed: opt_int(body, "seed", -1, 2_147_483_647)?
            .filter(|s| *s >= 0)
            .map(|s| s as u64),
        sync: opt_bool(body, "enable_sync_mode")?,
        base64: opt_bool(body, "enable_base64_output")?,
        steps: opt_int(body, "num_inference_steps", 1, 100)?
            .map_or(model.num_inference_steps, |s| s as usize),
        guidance_scale: opt_float(body, "guidance_scale", 0.0, 30.0)?.unwrap_or(6.0),
        embedded_guidance_scale: opt_float(body, "embedded_guidance_scale", 0.0, 30.0)?
            .unwrap_or(1.0),
        num_frames,
        fps: opt_float(body, "fps", 1.0, 120.0)?.unwrap_or(24.0),
        size,
        portrait,
    })
}

/// A JSON object body, or the error for what is wrong with it (400, 413 or 415).
fn json_object(
    state: &AppState,
    body: Result<axum::Json<Value>, axum::extract::rejection::JsonRejection>,
) -> Result<Map<String, Value>, ApiError> {
    match body {
        Ok(axum::Json(Value::Object(map))) => Ok(map),
        Ok(_) => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "the body must be a JSON object",
        )),
        Err(e) => Err(match e.status() {
            StatusCode::PAYLOAD_TOO_LARGE => ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!(
                    "request body is larger than the limit of {} bytes",
                    state.config.max_body_bytes
                ),
            ),
            StatusCode::UNSUPPORTED_MEDIA_TYPE => {
                ApiError::new(StatusCode::UNSUPPORTED_MEDIA_TYPE, e.body_text())
            }
            _ => ApiError::new(StatusCode::BAD_REQUEST, e.body_text()),
        }),
    }
}

/// Where the `image` string points.
fn image_source(store: &Store, image: &str) -> Result<ImageSource, ApiError> {
    if image.starts_with("data:") {
        return media::parse_data_uri(image)
            .map(ImageSource::Data)
            .map_err(|e| ApiError::bad("image", e));
    }
    let url = url::Url::parse(image).map_err(|_| {
        ApiError::bad(
            "image",
            "must be an http(s) URL, a data:image/...;base64 URI or an uploaded file URL",
        )
    })?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(ApiError::bad(
            "image",
            format!(
                "URL scheme {} is not supported (http or https)",
                url.scheme()
            ),
        ));
    }
    // an upload of ours is read from disk, whatever host name the client used to reach us
    let segments: Vec<&str> = url.path_segments().map(|s| s.collect()).unwrap_or_default();
    if let ["api", "v3", "media", "files", id, _] = segments.as_slice() {
        if let Some(u) = store.upload(id) {
            return Ok(ImageSource::Upload(store.upload_data_path(&u.id)));
        }
    }
    Ok(ImageSource::Url(image.to_string()))
}

/// The echoed input: the body, with a long data: URI shortened.
fn echo_input(body: &Map<String, Value>) -> Value {
    let mut echo = body.clone();
    if let Some(Value::String(s)) = echo.get_mut("image") {
        if s.starts_with("data:") && s.len() > 128 {
            let head: String = s.chars().take(48).collect();
            *s = format!("{head}...({} characters)", s.len());
        }
    }
    Value::Object(echo)
}

async fn submit(
    State(state): State<Arc<AppState>>,
    Path((owner, name)): Path<(String, String)>,
    Query(query): Query<std::collections::HashMap<String, String>>,
    headers: HeaderMap,
    body: Result<axum::Json<Value>, axum::extract::rejection::JsonRejection>,
) -> ApiResult {
    let models = models_loaded(&state)?;
    let id = format!("{owner}/{name}");
    let model = models
        .iter()
        .find(|m| m.id.eq_ignore_ascii_case(&id))
        .ok_or_else(|| {
            let served: Vec<&str> = models.iter().map(|m| m.id.as_str()).collect();
            ApiError::new(
                StatusCode::NOT_FOUND,
                format!("unknown model {id}; this server runs {}", served.join(", ")),
            )
        })?
        .clone();
    let body = json_object(&state, body)?;
    let s = validate(&body, &model)?;
    let webhook = match query.get("webhook").filter(|w| !w.is_empty()) {
        Some(w) => match url::Url::parse(w) {
            Ok(u) if matches!(u.scheme(), "http" | "https") => Some(w.clone()),
            _ => return Err(ApiError::bad("webhook", "must be an http(s) URL")),
        },
        None => None,
    };
    let source = s
        .image
        .as_deref()
        .map(|i| image_source(&state.store, i))
        .transpose()?;
    let seed = s
        .seed
        .unwrap_or_else(|| rand::random_range(0..=2_147_483_647u64));
    let record = JobRecord {
        id: new_id(),
        model: model.id.clone(),
        status: Status::Created,
        input: echo_input(&body),
        base_url: base_url(&state, &headers),
        created_at: now_ms(),
        started_at: None,
        completed_at: None,
        error: String::new(),
        code: TaskCode::Ok,
        seed,
        outputs: vec![],
        base64_output: s.base64,
        webhook,
        step: 0,
        total_steps: s.steps,
        timings: vec![],
    };
    let task_id = record.id.clone();
    let mut watch = state.store.admit(record).map_err(|e| match e {
        AdmitError::QueueFull => {
            state.metrics.queue_full();
            ApiError {
                status: StatusCode::TOO_MANY_REQUESTS,
                message: format!(
                    "the queue is full ({} tasks waiting); retry later",
                    state.config.max_queue
                ),
                retry_after: Some(30),
            }
        }
        AdmitError::Draining => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "the server is shutting down",
        ),
    })?;
    state.metrics.submitted();
    tracing::info!(id = %task_id, model = %model.id, "task accepted");
    tokio::spawn(prepare(
        state.clone(),
        task_id.clone(),
        model,
        s.clone_params(seed),
        source,
    ));
    if s.sync {
        let limit = state.config.sync_timeout;
        let timed_out = tokio::time::timeout(limit, watch.wait_for(|st| st.is_finished()))
            .await
            .is_err();
        if timed_out {
            let (r, pos) = state
                .store
                .get(&task_id)
                .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, "task deleted"))?;
            let mut data = prediction(&state, &r, pos).await;
            data["code"] = json!(u32::from(TaskCode::Timeout));
            data["status"] = json!("processing");
            data["error"] = json!(format!(
                "Sync mode timed out after {} seconds. The prediction is still processing asynchronously.",
                limit.as_secs()
            ));
            return Ok(success(data));
        }
    }
    let (r, pos) = state
        .store
        .get(&task_id)
        .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, "task deleted"))?;
    Ok(success(prediction(&state, &r, pos).await))
}

/// What the worker needs besides the image.
#[derive(Clone, Debug)]
struct Params {
    prompt: String,
    negative_prompt: Option<String>,
    steps: usize,
    guidance_scale: f64,
    embedded_guidance_scale: f64,
    num_frames: usize,
    fps: f64,
    seed: u64,
    size: Option<(usize, usize)>,
    portrait: Option<bool>,
}

impl Submit {
    fn clone_params(&self, seed: u64) -> Params {
        Params {
            prompt: self.prompt.clone(),
            negative_prompt: self.negative_prompt.clone(),
            steps: self.steps,
            guidance_scale: self.guidance_scale,
            embedded_guidance_scale: self.embedded_guidance_scale,
            num_frames: self.num_frames,
            fps: self.fps,
            seed,
            size: self.size,
            portrait: self.portrait,
        }
    }
}

/// Fetches and decodes the image off the runtime, settles the size, and queues the task; a
/// media failure fails it with 1402.
async fn prepare(
    state: Arc<AppState>,
    id: String,
    model: ModelInfo,
    p: Params,
    source: Option<ImageSource>,
) {
    let image = match source {
        None => None,
        Some(source) => {
            let agent = state.agent.clone();
            match tokio::task::spawn_blocking(move || media::load(&agent, &source)).await {
                Ok(Ok(img)) => Some(img),
                Ok(Err(e)) => {
                    tracing::warn!(%id, "image: {e}");
                    state
                        .store
                        .fail_unstarted(&id, TaskCode::MediaAccessFailed, e.to_string());
                    return;
                }
                Err(e) => {
                    state.store.fail_unstarted(
                        &id,
                        TaskCode::Internal,
                        format!("internal error: {e}"),
                    );
                    return;
                }
            }
        }
    };
    let portrait = p
        .portrait
        .unwrap_or_else(|| image.as_ref().is_some_and(|i| i.height() > i.width()));
    let (height, width) = p.size.unwrap_or(if portrait {
        (model.width, model.height)
    } else {
        (model.height, model.width)
    });
    state.store.enqueue(
        &id,
        GenerationRequest {
            model: model.id,
            prompt: p.prompt,
            negative_prompt: p.negative_prompt,
            image,
            height,
            width,
            num_frames: p.num_frames,
            steps: p.steps,
            guidance_scale: p.guidance_scale,
            embedded_guidance_scale: p.embedded_guidance_scale,
            seed: p.seed,
            fps: p.fps,
        },
    );
}

fn unknown_task(id: &str) -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, format!("prediction {id} not found"))
}

async fn result(State(state): State<Arc<AppState>>, Path(id): Path<String>) -> ApiResult {
    let (r, pos) = state.store.get(&id).ok_or_else(|| unknown_task(&id))?;
    Ok(success(prediction(&state, &r, pos).await))
}

async fn cancel(State(state): State<Arc<AppState>>, Path(id): Path<String>) -> ApiResult {
    match state
        .store
        .cancel_or_delete(&id)
        .ok_or_else(|| unknown_task(&id))?
    {
        CancelResult::Dequeued | CancelResult::Cancelling => {
            let (r, pos) = state.store.get(&id).ok_or_else(|| unknown_task(&id))?;
            Ok(success(prediction(&state, &r, pos).await))
        }
        CancelResult::Deleted | CancelResult::AlreadyDeleted => {
            Ok(success(json!({"id": id, "status": "deleted"})))
        }
    }
}

async fn models(State(state): State<Arc<AppState>>) -> ApiResult {
    let models = models_loaded(&state)?;
    Ok(success(Value::Array(
        models.iter().map(openapi::model_entry).collect(),
    )))
}

async fn webhook_secret(State(state): State<Arc<AppState>>) -> ApiResult {
    Ok(success(json!({"secret": state.webhook_secret})))
}

fn upload_data(u: &Upload) -> Value {
    json!({"type": u.kind(), "download_url": u.download_url(), "filename": u.filename, "size": u.size})
}

async fn store_upload(
    state: &Arc<AppState>,
    upload: Upload,
    bytes: Bytes,
) -> Result<Upload, ApiError> {
    let store = state.store.clone();
    tokio::task::spawn_blocking(move || store.complete_upload(upload, &bytes))
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
        .map_err(|e| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("cannot store the upload: {e}"),
            )
        })
}

fn sniff_type(bytes: &[u8], declared: Option<&str>) -> String {
    image::guess_format(bytes)
        .ok()
        .map(|f| f.to_mime_type().to_string())
        .or_else(|| declared.filter(|d| !d.is_empty()).map(str::to_string))
        .unwrap_or_else(|| "application/octet-stream".into())
}

async fn upload_binary(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    mut form: Multipart,
) -> ApiResult {
    while let Some(field) = form
        .next_field()
        .await
        .map_err(|e| ApiError::new(e.status(), e.body_text()))?
    {
        if field.name() != Some("file") {
            continue;
        }
        let filename = field.file_name().unwrap_or("upload").to_string();
        let declared = field.content_type().map(str::to_string);
        let bytes = field
            .bytes()
            .await
            .map_err(|e| ApiError::new(e.status(), e.body_text()))?;
        if bytes.is_empty() {
            return Err(ApiError::bad("file", "is empty"));
        }
        let ct = sniff_type(&bytes, declared.as_deref());
        let upload = state.store.new_upload(
            &filename,
            &ct,
            bytes.len(),
            &base_url(&state, &headers),
            false,
        );
        let upload = store_upload(&state, upload, bytes).await?;
        return Ok(success(upload_data(&upload)));
    }
    Err(ApiError::bad("file", "multipart field `file` is required"))
}

async fn upload_ticket(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Result<axum::Json<Value>, axum::extract::rejection::JsonRejection>,
) -> ApiResult {
    let body = json_object(&state, body)?;
    let filename = opt_string(&body, "filename")?
        .filter(|f| !f.is_empty())
        .ok_or_else(|| ApiError::bad("filename", "is required"))?;
    let max = state.config.max_body_bytes as i64;
    let size = opt_int(&body, "size", 1, max)?
        .ok_or_else(|| ApiError::bad("size", format!("is required: an integer from 1 to {max}")))?;
    let ct =
        opt_string(&body, "content_type")?.unwrap_or_else(|| "application/octet-stream".into());
    let base = base_url(&state, &headers);
    let upload = state
        .store
        .new_upload(&filename, &ct, size as usize, &base, true);
    let mut data = upload_data(&upload);
    data["upload"] = json!({
        "method": "PUT",
        "url": format!("{base}/api/v3/media/uploads/{}", upload.put_token.as_deref().unwrap_or_default()),
        "headers": {"Content-Type": ct},
    });
    Ok(success(data))
}

async fn upload_put(
    State(state): State<Arc<AppState>>,
    Path(token): Path<String>,
    body: Bytes,
) -> ApiResult {
    let ticket = state.store.take_ticket(&token).ok_or_else(|| {
        ApiError::new(StatusCode::NOT_FOUND, "unknown or already used upload URL")
    })?;
    if body.len() != ticket.size {
        return Err(ApiError::bad(
            "body",
            format!(
                "is {} bytes, the upload ticket said {}",
                body.len(),
                ticket.size
            ),
        ));
    }
    let ct = sniff_type(&body, Some(&ticket.content_type));
    let upload = Upload {
        content_type: ct,
        ..ticket
    };
    let upload = store_upload(&state, upload, body).await?;
    Ok(success(upload_data(&upload)))
}

async fn upload_file(
    State(state): State<Arc<AppState>>,
    Path((id, _name)): Path<(String, String)>,
    req: Request,
) -> Result<Response, ApiError> {
    let upload = state
        .store
        .upload(&id)
        .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, "file not found"))?;
    let response =
        tower::ServiceExt::oneshot(ServeFile::new(state.store.upload_data_path(&id)), req)
            .await
            .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    let mut response = response.map(Body::new);
    if let Ok(ct) = HeaderValue::from_str(&upload.content_type) {
        response.headers_mut().insert(header::CONTENT_TYPE, ct);
    }
    Ok(response)
}

async fn health() -> Response {
    success(json!({"status": "ok"}))
}

async fn ready(State(state): State<Arc<AppState>>) -> ApiResult {
    models_loaded(&state)?;
    Ok(success(json!({"status": "ready"})))
}

async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    let (counts, waiting) = state.store.counts();
    let counts: Vec<(&str, usize)> = counts.iter().map(|(s, n)| (s.as_str(), *n)).collect();
    let ready = state.models.get().is_some() && !state.store.is_draining();
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics.render(&counts, waiting, ready),
    )
        .into_response()
}
