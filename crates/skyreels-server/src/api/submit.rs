//! `POST /api/v3/{owner}/{model}`: check the request against its contract, admit it, prepare
//! its image off the runtime, and answer (at once, or when it ends in sync mode).

use super::body::read_json;
use super::error::{success, ApiError, ApiResult};
use super::predictions::{prediction, task_gone};
use crate::config::ServerConfig;
use crate::contract::{
    AspectRatio, CancelAfter, Duration, Envelope, ErrorEnvelope, NumFrames, Prediction, Side, Size,
    SubmitRequest, CANCEL_AFTER_HEADER, CANCEL_AFTER_RULE, MAX_URL_BYTES,
};
use crate::engine::task::{JobRecord, Status, TaskCode};
use crate::engine::{AdmitError, Engine, ModelInfo, Priority, Queued, QueuedImage};
use crate::media::{self, ImageSource};
use crate::state::AppState;
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use serde::Deserialize;
use skyreels_params as params;
use std::sync::Arc;

/// A submit, checked: the parameters the task runs with (the image still as given; the size,
/// unless the request fixed it, the model's default for the image's orientation, settled once
/// the image is read).
#[derive(Debug)]
struct Checked {
    params: params::GenerationParams,
    image: Option<String>,
    sync: bool,
    base64: bool,
    /// The request fixes the size.
    size_fixed: bool,
    /// Portrait from aspect_ratio "9:16"; `None`: follow the image.
    portrait: Option<bool>,
    webhook: Option<String>,
    /// `enable_safety_checker` (default true).
    safety_check: bool,
    priority: Priority,
    /// `cancel_after`: the deadline, counted from the admission.
    deadline: Option<std::time::Duration>,
}

/// The rules no single field carries: required fields, the model's mode and size multiple,
/// 4k+1 frames, sizes given together, `size` and `duration` against the fields they stand for,
/// the cost limit, the worker's memory (pixel-frames) and parallel layout, the H.264 encoder's
/// frame size.
fn check(
    r: SubmitRequest,
    query_webhook: Option<String>,
    model: &ModelInfo,
    config: &ServerConfig,
) -> Result<Checked, ApiError> {
    let prompt = r
        .prompt
        .map(|p| p.0)
        .filter(|p| !p.trim().is_empty())
        .ok_or_else(|| ApiError::bad("prompt", "is required and must be a non-empty string"))?;
    let image = r.image.filter(|s| !s.trim().is_empty());
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
        (Some(i), true) if !i.starts_with("data:") && i.len() > MAX_URL_BYTES => {
            return Err(ApiError::bad(
                "image",
                format!("a URL must be at most {MAX_URL_BYTES} bytes"),
            ))
        }
        _ => {}
    }
    let size = requested_size(r.size.as_ref(), r.height, r.width, model.size_multiple)?;
    let fps = r.fps.map_or(params::FPS, |f| f.0);
    let num_frames = requested_frames(r.duration, r.num_frames, fps, model.defaults.num_frames)?;
    let steps = r
        .num_inference_steps
        .map_or(model.defaults.num_inference_steps, |s| s.0);
    // the limits read both orientations alike, so the image need not be known yet
    let (height, width) = size.unwrap_or_else(|| model.defaults.size(false));
    let params = params::GenerationParams {
        prompt,
        negative_prompt: r.negative_prompt.map(|n| n.0),
        height,
        width,
        num_frames,
        steps,
        guidance_scale: r.guidance_scale.map_or(params::GUIDANCE_SCALE, |g| g.0),
        embedded_guidance_scale: r
            .embedded_guidance_scale
            .map_or(params::EMBEDDED_GUIDANCE_SCALE, |g| g.0),
        seed: r.seed.map(|s| s.0).filter(|s| *s >= 0).map_or_else(
            || rand::random_range(0..=params::SEED.max as u64),
            |s| s as u64,
        ),
        fps,
        cache: r.cache.map_or(config.cache, |c| c.0),
        cfg_gate: r.cfg_gate.map(|g| g.0).or(config.cfg_gate),
        flow_shift: r.flow_shift.map(|f| f.0),
        loras: r.loras.map(|l| l.0).unwrap_or_default(),
        riflex_freq_index: r.riflex_freq_index.map_or(0, |k| k.0),
    };
    params
        .check(&model.limits(config.max_work, config.loras.max))
        .map_err(|e| ApiError::bad(e.field, e.rule))?;
    let webhook = match query_webhook.filter(|w| !w.is_empty()) {
        Some(w) => Some(check_webhook(&w, "webhook", config)?),
        None => match r.webhook_url.filter(|w| !w.is_empty()) {
            Some(w) => Some(check_webhook(&w, "webhook_url", config)?),
            None => None,
        },
    };
    Ok(Checked {
        params,
        image,
        sync: r.enable_sync_mode.is_some_and(|f| f.0),
        base64: r.enable_base64_output.is_some_and(|f| f.0),
        size_fixed: size.is_some(),
        portrait: r.aspect_ratio.map(|a| a == AspectRatio::Portrait),
        webhook,
        safety_check: r.enable_safety_checker.is_none_or(|f| f.0),
        priority: r.priority.unwrap_or_default(),
        deadline: r.cancel_after.map(|c| c.duration()),
    })
}

/// The deadline of a submit: its `cancel_after`, or Replicate's `Cancel-After` header (the
/// same rule; given both, they must agree, else a 400 naming both).
fn requested_deadline(
    headers: &HeaderMap,
    field: Option<CancelAfter>,
) -> Result<Option<CancelAfter>, ApiError> {
    let bad = |rule: String| ApiError::bad(CANCEL_AFTER_HEADER, rule);
    let mut values = headers.get_all(CANCEL_AFTER_HEADER).iter();
    let header = match (values.next(), values.next()) {
        (None, _) => None,
        (Some(_), Some(_)) => return Err(bad("give it once".into())),
        (Some(v), None) => {
            let text = v
                .to_str()
                .map_err(|_| bad(format!("{CANCEL_AFTER_RULE}, got non-ASCII text")))?;
            Some(text.trim().parse::<CancelAfter>().map_err(bad)?)
        }
    };
    match (field, header) {
        (Some(f), Some(h)) if f.duration() != h.duration() => Err(ApiError::bad(
            "cancel_after",
            format!(
                "{:?} differs from the {CANCEL_AFTER_HEADER} header {:?}: give one of them, \
                 or the same duration",
                f.as_str(),
                h.as_str()
            ),
        )),
        (f, h) => Ok(f.or(h)),
    }
}

/// Logs, once per process, that `enable_safety_checker` is ignored: no checker is loaded for
/// `model` (its `has_nsfw_contents` stay false).
fn no_checker_notice(model: &str) {
    static TOLD: std::sync::Once = std::sync::Once::new();
    TOLD.call_once(|| {
        tracing::info!(
            "enable_safety_checker is ignored for {model}: no safety checker is loaded \
             (--safety-checker); has_nsfw_contents stay false"
        );
    });
}

/// (height, width) when the request fixes it: `width` and `height` together, or `size` (the same
/// rules; with a `width` or `height` that differs, a 400 naming both).
fn requested_size(
    size: Option<&Size>,
    height: Option<Side>,
    width: Option<Side>,
    multiple: usize,
) -> Result<Option<(usize, usize)>, ApiError> {
    for (name, v) in [("height", height), ("width", width)] {
        if let Some(v) = v {
            params::check_side(v.0, multiple).map_err(|rule| ApiError::bad(name, rule))?;
        }
    }
    match (size, height, width) {
        (Some(s), height, width) => {
            for (name, v, given) in [("width", s.width, width), ("height", s.height, height)] {
                params::check_side(v, multiple)
                    .map_err(|rule| ApiError::bad("size", format!("the {name} {rule}")))?;
                if let Some(g) = given.filter(|g| g.0 != v) {
                    return Err(ApiError::bad(
                        "size",
                        format!(
                            "{:?} has {name} {v}, but {name} is {}: give size or width and \
                             height, or the same values",
                            s.as_str(),
                            g.0
                        ),
                    ));
                }
            }
            Ok(Some((s.height, s.width)))
        }
        (None, Some(h), Some(w)) => Ok(Some((h.0, w.0))),
        (None, None, None) => Ok(None),
        (None, h, _) => Err(ApiError::bad(
            if h.is_none() { "height" } else { "width" },
            "give width and height together",
        )),
    }
}

/// The frame count: `num_frames`, or the 4k+1 nearest to `duration` x `fps` (with a
/// `num_frames` that differs, a 400 naming both), or the model's default.
fn requested_frames(
    duration: Option<Duration>,
    num_frames: Option<NumFrames>,
    fps: f64,
    default: usize,
) -> Result<usize, ApiError> {
    let Some(d) = duration else {
        let n = num_frames.map_or(default, |n| n.0);
        params::check_frames(n).map_err(|rule| ApiError::bad("num_frames", rule))?;
        return Ok(n);
    };
    let frames = params::frames_for_duration(d.0, fps);
    let made = format!("{} s at {fps} fps is {frames} frames", d.0);
    params::check_frames(frames)
        .map_err(|rule| ApiError::bad("duration", format!("{made}; frames {rule}")))?;
    match num_frames {
        Some(n) if n.0 != frames => Err(ApiError::bad(
            "duration",
            format!(
                "{made}, but num_frames is {}: give duration or num_frames, or agreeing values",
                n.0
            ),
        )),
        _ => Ok(frames),
    }
}

/// An http(s) URL of at most [`MAX_URL_BYTES`]; a literal internal address is refused here
/// (names are checked at delivery, on every connection).
fn check_webhook(w: &str, field: &str, config: &ServerConfig) -> Result<String, ApiError> {
    if w.len() > MAX_URL_BYTES {
        return Err(ApiError::bad(
            field,
            format!("must be at most {MAX_URL_BYTES} bytes"),
        ));
    }
    let url = url::Url::parse(w)
        .ok()
        .filter(|u| matches!(u.scheme(), "http" | "https") && u.host().is_some())
        .ok_or_else(|| ApiError::bad(field, "must be an http(s) URL"))?;
    if !config.allow_private_urls && media::url_is_internal_literal(&url) {
        return Err(ApiError::bad(
            field,
            "this address may not be called (start the server with --allow-private-image-urls \
             for private networks)",
        ));
    }
    // the parsed form: no raw control characters reach the record or a log line
    Ok(url.to_string())
}

/// Where the `image` string points (a data: URI is decoded off the async runtime).
async fn image_source(jobs: &Engine, image: String) -> Result<ImageSource, ApiError> {
    if image.starts_with("data:") {
        return tokio::task::spawn_blocking(move || media::parse_data_uri(&image))
            .await
            .map_err(ApiError::internal)?
            .map(ImageSource::Data)
            .map_err(|e| ApiError::bad("image", e));
    }
    let image = image.as_str();
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
                "URL scheme {:?} is not supported (http or https)",
                url.scheme()
            ),
        ));
    }
    // an upload of ours is read from disk, whatever host name the client used to reach us
    let segments: Vec<&str> = url.path_segments().map(|s| s.collect()).unwrap_or_default();
    if let ["api", "v3", "media", "files", id, _] = segments.as_slice() {
        if let Some(u) = jobs.upload(id).await.map_err(ApiError::from)? {
            return Ok(ImageSource::Upload(u.id));
        }
    }
    Ok(ImageSource::Url(url))
}

#[derive(Deserialize)]
pub struct SubmitQuery {
    webhook: Option<String>,
}

/// Submit a task.
#[utoipa::path(
    post,
    path = "/api/v3/{owner}/{model}",
    tag = "tasks",
    params(
        ("owner" = String, Path, description = "e.g. wavespeed-ai"),
        ("model" = String, Path, description = "e.g. SkyReels-V1"),
        ("webhook" = Option<String>, Query, description = "POST the finished prediction here (signed); also the body field webhook_url"),
        ("Cancel-After" = Option<String>, Header, description = "Replicate's deadline header, the body field cancel_after's rule (\"90s\", \"5m\", \"1h30m\"; 1s to 24h): not started by then, the task fails with 5005; still running, it is cancelled (5005)"),
    ),
    request_body = SubmitRequest,
    responses(
        (status = 200, description = "Accepted (sync mode: finished, or still processing with code 5004)", body = Envelope<Prediction>),
        (status = 400, description = "A field breaks its rule (the message names it)", body = ErrorEnvelope),
        (status = 401, description = "Missing or wrong key", body = ErrorEnvelope),
        (status = 404, description = "Unknown model", body = ErrorEnvelope),
        (status = 413, description = "Body too large", body = ErrorEnvelope),
        (status = 415, description = "Not JSON", body = ErrorEnvelope),
        (status = 429, description = "Queue full (Retry-After)", body = ErrorEnvelope),
        (status = 503, description = "Loading or shutting down", body = ErrorEnvelope),
    ),
    security(("bearer" = []))
)]
pub async fn submit(
    State(state): State<Arc<AppState>>,
    Path((owner, name)): Path<(String, String)>,
    Query(query): Query<SubmitQuery>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult {
    let models = super::ops::models_loaded(&state).await?;
    let id = format!("{owner}/{name}");
    let model = models
        .iter()
        .find(|m| m.id.eq_ignore_ascii_case(&id))
        .ok_or_else(|| {
            let served: Vec<&str> = models.iter().map(|m| m.id.as_str()).collect();
            ApiError::not_found(format!(
                "unknown model {id:?}; this server runs {}",
                served.join(", ")
            ))
        })?
        .clone();
    let mut request: SubmitRequest = read_json(&headers, body, state.config.max_body_bytes).await?;
    // the deadline, from the body or the header, is echoed as the body's field
    request.cancel_after = requested_deadline(&headers, request.cancel_after.take())?;
    let input = request.echo();
    let mut c = check(request, query.webhook, &model, &state.config)?;
    // what can be known of the LoRAs before the task exists (the worker resolves them)
    state
        .loras
        .precheck(&c.params.loras)
        .await
        .map_err(|e| ApiError::bad("loras", e.rule()))?;
    let source = match c.image.take() {
        Some(i) => Some(image_source(&state.jobs, i).await?),
        None => None,
    };
    if c.safety_check && model.safety_checker.is_none() {
        no_checker_notice(&model.id);
    }
    let mut record = JobRecord {
        base64_output: c.base64,
        safety_check: c.safety_check,
        webhook: c.webhook.clone(),
        num_frames: Some(c.params.num_frames),
        priority: c.priority,
        ..JobRecord::created(
            &model.id,
            serde_json::to_value(input).map_err(ApiError::internal)?,
            super::base_url(&state, &headers),
            c.params.seed,
            c.params.steps,
        )
    };
    record.cancel_at = c.deadline.map(|d| record.created_at + d.as_millis() as u64);
    let task_id = record.id.clone();
    // answered only once the record is stored: an accepted task survives a crash
    state.jobs.admit(record).await.map_err(|e| match e {
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
        AdmitError::Draining => ApiError::unavailable("the server is shutting down"),
        AdmitError::Unavailable(e) => ApiError::from(e),
    })?;
    state.metrics.submitted();
    tracing::info!(id = %task_id, model = %model.id, "task accepted");
    let sync = c.sync;
    tokio::spawn(prepare(state.clone(), task_id.clone(), model, c, source));
    if sync {
        let limit = state.config.sync_timeout;
        if !state.jobs.wait_finished(&task_id, limit).await {
            let (r, pos) = state.jobs.get(&task_id).await?.ok_or_else(task_gone)?;
            let mut p: Prediction = prediction(&state, &r, pos).await;
            p.code = u32::from(TaskCode::Timeout);
            p.status = Status::Processing;
            p.error = format!(
                "Sync mode timed out after {} seconds. The prediction is still processing asynchronously.",
                limit.as_secs()
            );
            return Ok(success(p));
        }
    }
    let (r, pos) = state.jobs.get(&task_id).await?.ok_or_else(task_gone)?;
    Ok(success(prediction(&state, &r, pos).await))
}

/// Fetches (bounded fetches at a time) and decodes (bounded decodes at a time) the image off
/// the runtime, settles the size and queues the task; a media failure fails it with 1402. The
/// memory engine's queue holds the image fitted to the task's size (only what the model reads);
/// the Redis engine's holds the image as it came (compressed; at most `--max-upload-mb`),
/// which the worker fits again.
async fn prepare(
    state: Arc<AppState>,
    id: String,
    model: ModelInfo,
    c: Checked,
    source: Option<ImageSource>,
) {
    let (fixed, portrait, d) = (c.size_fixed, c.portrait, model.defaults.clone());
    let (height, width) = (c.params.height, c.params.width);
    let keep_source = state.jobs.queues_source_images();
    let fit = move |image: Option<image::RgbImage>| {
        let portrait = portrait.unwrap_or_else(|| image.as_ref().is_some_and(params::is_portrait));
        let (height, width) = if fixed {
            (height, width)
        } else {
            d.size(portrait)
        };
        let image = image
            .filter(|_| !keep_source)
            .map(|i| params::fit_image(&i, width, height));
        (image, height, width)
    };
    let ((fitted, height, width), bytes) = match source {
        None => (fit(None), None),
        Some(source) => match load_image(&state, &id, source, fit).await {
            Ok((fitted, bytes)) => (fitted, keep_source.then_some(bytes)),
            Err((code, e)) => {
                tracing::warn!(%id, "image: {e}");
                state.jobs.fail_unstarted(&id, code, e).await;
                return;
            }
        },
    };
    let image = match (fitted, bytes) {
        (Some(i), _) => Some(QueuedImage::Fitted(i)),
        (None, Some(b)) => Some(QueuedImage::Encoded(b)),
        (None, None) => None,
    };
    let params = params::GenerationParams {
        height,
        width,
        ..c.params
    };
    state
        .jobs
        .enqueue(&id, &model.id, Queued { params, image })
        .await;
}

type Fitted = (Option<image::RgbImage>, usize, usize);

/// The image's bytes (at most `--max-upload-mb`), decoded and handed to `fit`; the bytes too.
async fn load_image(
    state: &Arc<AppState>,
    id: &str,
    source: ImageSource,
    fit: impl FnOnce(Option<image::RgbImage>) -> Fitted + Send + 'static,
) -> Result<(Fitted, Vec<u8>), (TaskCode, String)> {
    let join = |e: tokio::task::JoinError| (TaskCode::Internal, format!("internal error: {e}"));
    let media = |e: media::MediaError| (TaskCode::MediaAccessFailed, e.to_string());
    let bytes = match source {
        ImageSource::Url(url) => {
            let _permit = state
                .fetches
                .acquire()
                .await
                .map_err(|e| join_closed(e, id))?;
            let agent = state.agent.clone();
            tokio::task::spawn_blocking(move || media::fetch(&agent, &url))
                .await
                .map_err(join)?
                .map_err(media)?
        }
        ImageSource::Data(bytes) => bytes,
        ImageSource::Upload(upload) => state
            .jobs
            .upload_bytes(&upload)
            .await
            .map_err(|e| (TaskCode::MediaAccessFailed, e.to_string()))?
            .ok_or_else(|| media(media::MediaError::MissingUpload(upload)))?,
    };
    let cap = state.config.max_upload_bytes;
    if bytes.len() > cap {
        return Err((
            TaskCode::MediaAccessFailed,
            format!(
                "image is larger than {} MiB, this server's limit (--max-upload-mb)",
                cap >> 20
            ),
        ));
    }
    let _permit = state
        .decodes
        .acquire()
        .await
        .map_err(|e| join_closed(e, id))?;
    tokio::task::spawn_blocking(move || {
        let fitted = media::decode(&bytes).map(|img| fit(Some(img)))?;
        Ok((fitted, bytes))
    })
    .await
    .map_err(join)?
    .map_err(media)
}

fn join_closed(e: tokio::sync::AcquireError, id: &str) -> (TaskCode, String) {
    tracing::error!(%id, "image limiter closed: {e}");
    (TaskCode::Internal, "internal error: shutting down".into())
}
