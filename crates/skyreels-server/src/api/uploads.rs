//! Uploads: multipart, PUT tickets, and serving the stored files. Only raster images (sniffed
//! from the bytes, whatever was declared) are kept; bodies stream to disk within their cap.

use super::body::{body_error, read_json};
use super::error::{success, ApiError, ApiResult};
use super::middleware::Owner;
use crate::contract::{
    Envelope, ErrorEnvelope, UploadData, UploadHeaders, UploadTarget, UploadTicketRequest,
    MAX_CONTENT_TYPE_BYTES, MAX_FILENAME_BYTES,
};
use crate::engine::{Blob, Content, Paths, Upload};
use crate::media::{sniff_raster, RASTER_TYPES};
use crate::state::AppState;
use axum::body::Body;
use axum::extract::{Multipart, Path, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Extension;
use http_body_util::BodyExt;
use std::path::PathBuf;
use std::sync::Arc;
use tokio::io::AsyncWriteExt;
use tower_http::services::ServeFile;

fn upload_data(u: &Upload, upload: Option<UploadTarget>) -> UploadData {
    UploadData {
        kind: u.kind().into(),
        download_url: u.download_url(),
        filename: u.filename.clone(),
        size: u.size,
        upload,
    }
}

fn not_raster() -> ApiError {
    ApiError::new(
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        format!(
            "file: only raster images are accepted ({}), recognised from their bytes",
            RASTER_TYPES.join(", ")
        ),
    )
}

/// Bytes of one upload on their way to disk: a private part file, at most `cap` bytes, whose
/// first bytes decide its type. Removed unless finished (also when the client goes away).
struct Sink {
    part: PathBuf,
    file: tokio::fs::File,
    cap: u64,
    written: u64,
    head: Vec<u8>,
    done: bool,
}

impl Sink {
    async fn create(paths: &Paths, id: &str, cap: u64) -> Result<Self, ApiError> {
        let part = paths.upload_part_path(id);
        let mut o = tokio::fs::OpenOptions::new();
        o.write(true).create_new(true);
        #[cfg(unix)]
        o.mode(0o600);
        let file = o
            .open(&part)
            .await
            .map_err(|e| ApiError::internal(format!("cannot store the upload: {e}")))?;
        Ok(Self {
            part,
            file,
            cap,
            written: 0,
            head: Vec::new(),
            done: false,
        })
    }

    /// Appends a chunk; more than `cap` bytes in all is `over`.
    async fn write(
        &mut self,
        chunk: &[u8],
        over: impl FnOnce() -> ApiError,
    ) -> Result<(), ApiError> {
        self.written += chunk.len() as u64;
        if self.written > self.cap {
            return Err(over());
        }
        if self.head.len() < 64 {
            let take = (64 - self.head.len()).min(chunk.len());
            self.head.extend_from_slice(&chunk[..take]);
        }
        self.file
            .write_all(chunk)
            .await
            .map_err(|e| ApiError::internal(format!("cannot store the upload: {e}")))
    }

    /// Syncs and moves the bytes into place; the raster type they were recognised as.
    async fn finish(mut self, data: PathBuf) -> Result<(&'static str, u64), ApiError> {
        if self.written == 0 {
            return Err(ApiError::bad("file", "is empty"));
        }
        let mime = sniff_raster(&self.head).ok_or_else(not_raster)?;
        let io = |e: std::io::Error| ApiError::internal(format!("cannot store the upload: {e}"));
        self.file.sync_all().await.map_err(io)?;
        tokio::fs::rename(&self.part, &data).await.map_err(io)?;
        self.done = true;
        Ok((mime, self.written))
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        if !self.done {
            let _ = std::fs::remove_file(&self.part);
        }
    }
}

/// Upload a file (multipart field `file`).
#[utoipa::path(
    post,
    path = "/api/v3/media/upload/binary",
    tag = "media",
    request_body(content_type = "multipart/form-data", description = "field `file`: a PNG, JPEG, WebP, GIF or BMP image"),
    responses(
        (status = 200, description = "Stored", body = Envelope<UploadData>),
        (status = 400, description = "No `file` field, or empty", body = ErrorEnvelope),
        (status = 413, description = "Larger than the body limit", body = ErrorEnvelope),
        (status = 415, description = "Not a raster image", body = ErrorEnvelope),
    ),
    security(("bearer" = []))
)]
pub async fn upload_binary(
    State(state): State<Arc<AppState>>,
    owner: Option<Extension<Owner>>,
    headers: HeaderMap,
    mut form: Multipart,
) -> ApiResult {
    let max = state.config.max_body_bytes;
    let cap = state.config.max_upload_bytes;
    let field_error = |e: axum::extract::multipart::MultipartError| {
        use std::error::Error;
        match e.source() {
            Some(src) => body_error(src, max),
            None => ApiError::new(e.status(), e.body_text()),
        }
    };
    while let Some(mut field) = form.next_field().await.map_err(field_error)? {
        if field.name() != Some("file") {
            continue;
        }
        let filename = field.file_name().unwrap_or("upload").to_string();
        let upload = Upload {
            owner: Owner::of(owner),
            ..Upload::new(&filename, "", 0, &super::base_url(&state, &headers))
        };
        let paths = state.jobs.paths();
        let mut sink = Sink::create(paths, &upload.id, cap as u64).await?;
        while let Some(chunk) = field.chunk().await.map_err(field_error)? {
            sink.write(&chunk, || upload_too_large(cap)).await?;
        }
        let (mime, size) = sink.finish(paths.upload_data_path(&upload.id)).await?;
        let upload = state
            .jobs
            .complete_upload(Upload {
                content_type: mime.into(),
                size,
                ..upload
            })
            .await?;
        return Ok(success(upload_data(&upload, None)));
    }
    Err(ApiError::bad("file", "multipart field `file` is required"))
}

/// Open an upload ticket; PUT the bytes to the URL it returns.
#[utoipa::path(
    post,
    path = "/api/v3/media/uploads",
    tag = "media",
    request_body = UploadTicketRequest,
    responses(
        (status = 200, description = "The ticket (data.upload says where to PUT)", body = Envelope<UploadData>),
        (status = 400, description = "A field breaks its rule", body = ErrorEnvelope),
        (status = 429, description = "Too many open tickets", body = ErrorEnvelope),
    ),
    security(("bearer" = []))
)]
pub async fn upload_ticket(
    State(state): State<Arc<AppState>>,
    owner: Option<Extension<Owner>>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult {
    let r: UploadTicketRequest = read_json(&headers, body, 64 << 10).await?;
    let filename = r
        .filename
        .filter(|f| !f.is_empty())
        .ok_or_else(|| ApiError::bad("filename", "is required"))?;
    if filename.len() > MAX_FILENAME_BYTES {
        return Err(ApiError::bad(
            "filename",
            format!("must be at most {MAX_FILENAME_BYTES} bytes"),
        ));
    }
    let max = state.config.max_upload_bytes as u64;
    let size = r
        .size
        .filter(|s| (1..=max).contains(s))
        .ok_or_else(|| ApiError::bad("size", format!("is required: an integer from 1 to {max}")))?;
    let ct = match r.content_type.filter(|c| !c.is_empty()) {
        None => "application/octet-stream".to_string(),
        Some(c) if c.len() > MAX_CONTENT_TYPE_BYTES => {
            return Err(ApiError::bad(
                "content_type",
                format!("must be at most {MAX_CONTENT_TYPE_BYTES} bytes"),
            ))
        }
        Some(c) => {
            let c = c.to_ascii_lowercase();
            if !RASTER_TYPES.contains(&c.as_str()) && c != "application/octet-stream" {
                return Err(ApiError::bad(
                    "content_type",
                    format!("must be one of {}", RASTER_TYPES.join(", ")),
                ));
            }
            c
        }
    };
    let base = super::base_url(&state, &headers);
    let (upload, token) = state
        .jobs
        .open_ticket(&filename, &ct, size, &base, &Owner::of(owner))
        .await?;
    let target = UploadTarget {
        method: "PUT".into(),
        url: format!("{base}/api/v3/media/uploads/{token}"),
        headers: UploadHeaders { content_type: ct },
    };
    Ok(success(upload_data(&upload, Some(target))))
}

/// Send an upload's bytes (no Authorization: the URL is the secret, single use).
#[utoipa::path(
    put,
    path = "/api/v3/media/uploads/{token}",
    tag = "media",
    params(("token" = String, Path, description = "From the ticket's upload.url")),
    request_body(content_type = "application/octet-stream", description = "Exactly the ticket's size"),
    responses(
        (status = 200, description = "Stored", body = Envelope<UploadData>),
        (status = 400, description = "Not the ticket's size", body = ErrorEnvelope),
        (status = 404, description = "Unknown or used ticket", body = ErrorEnvelope),
        (status = 408, description = "The body did not arrive in time", body = ErrorEnvelope),
        (status = 415, description = "Not a raster image", body = ErrorEnvelope),
    )
)]
pub async fn upload_put(
    State(state): State<Arc<AppState>>,
    Path(token): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult {
    // the ticket (and its size) is checked before a byte of the body is read
    let ticket = state
        .jobs
        .take_ticket(&token)
        .await?
        .ok_or_else(|| ApiError::not_found("unknown or already used upload URL"))?;
    let wrong_size = |got: String| {
        ApiError::bad(
            "body",
            format!("is {got} bytes, the upload ticket said {}", ticket.size),
        )
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if let Some(len) = declared.filter(|l| *l != ticket.size) {
        return Err(wrong_size(len.to_string()));
    }
    let paths = state.jobs.paths();
    let mut sink = Sink::create(paths, &ticket.id, ticket.size).await?;
    let mut body = body;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| body_error(&e, ticket.size as usize))?;
        if let Ok(chunk) = frame.into_data() {
            sink.write(&chunk, || wrong_size(format!("more than {}", ticket.size)))
                .await?;
        }
    }
    if sink.written != ticket.size {
        return Err(wrong_size(sink.written.to_string()));
    }
    let (mime, size) = sink.finish(paths.upload_data_path(&ticket.id)).await?;
    let upload = state
        .jobs
        .complete_upload(Upload {
            content_type: mime.into(),
            size,
            ..ticket
        })
        .await?;
    Ok(success(upload_data(&upload, None)))
}

/// An uploaded file (raster images as themselves, anything else as an attachment).
#[utoipa::path(
    get,
    path = "/api/v3/media/files/{id}/{name}",
    tag = "media",
    params(("id" = String, Path), ("name" = String, Path)),
    responses(
        (status = 200, description = "The file (Range supported)", content_type = "image/*"),
        (status = 404, description = "Unknown or expired", body = ErrorEnvelope),
    )
)]
pub async fn upload_file(
    State(state): State<Arc<AppState>>,
    Path((id, _name)): Path<(String, String)>,
    req: Request,
) -> Result<Response, ApiError> {
    let gone = || ApiError::not_found("file not found");
    let upload = state.jobs.upload(&id).await?.ok_or_else(gone)?;
    let content = state.jobs.content(Blob::Upload(&id)).await?;
    let mut response = serve(content.ok_or_else(gone)?, req).await?;
    if !response.status().is_success() {
        return Ok(response);
    }
    let h = response.headers_mut();
    match RASTER_TYPES.iter().find(|t| **t == upload.content_type) {
        Some(raster) => {
            h.insert(header::CONTENT_TYPE, HeaderValue::from_static(raster));
        }
        None => {
            let octets = HeaderValue::from_static("application/octet-stream");
            h.insert(header::CONTENT_TYPE, octets);
            let download = HeaderValue::from_static("attachment");
            h.insert(header::CONTENT_DISPOSITION, download);
        }
    }
    Ok(response)
}

/// A finished video kept in Redis (`--output-store redis`), by file name, whole or one
/// `Range: bytes=...` of it (what a `<video>` element asks for to seek), streamed in windows.
pub async fn output_file(
    State(state): State<Arc<AppState>>,
    Path(file): Path<String>,
    req: Request,
) -> Result<Response, ApiError> {
    let gone = || ApiError::not_found("file not found");
    let content = state.jobs.content(Blob::Output(&file)).await?;
    let mut response = serve(content.ok_or_else(gone)?, req).await?;
    if response.status() != StatusCode::RANGE_NOT_SATISFIABLE {
        let mp4 = HeaderValue::from_static("video/mp4");
        response.headers_mut().insert(header::CONTENT_TYPE, mp4);
    }
    Ok(response)
}

/// The response to a GET of stored content: a file served as files are (Range, conditional
/// requests), a stream in windows with [`ranged`].
async fn serve(content: Content, req: Request) -> Result<Response, ApiError> {
    match content {
        Content::File(path) => Ok(tower::ServiceExt::oneshot(ServeFile::new(path), req)
            .await
            .map_err(ApiError::internal)?
            .map(Body::new)),
        Content::Stream { len, read } => Ok(ranged(req.headers(), len, |a, b| {
            Body::from_stream(read(a, b))
        })),
    }
}

/// The response to a GET of a `len`-byte value with these headers: 200 with the whole body,
/// 206 with one `Range`, or 416 for a range outside it; `body(first, last)` streams the bytes.
fn ranged(headers: &HeaderMap, len: u64, body: impl FnOnce(u64, u64) -> Body) -> Response {
    let range = headers
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .map_or(ByteRange::Whole, |r| byte_range(r, len));
    let (first, last) = match range {
        ByteRange::Whole => (0, len - 1),
        ByteRange::Part(a, b) => (a, b),
        ByteRange::Unsatisfiable => {
            let outside = format!("the range is outside the file ({len} bytes)");
            let mut r = ApiError::new(StatusCode::RANGE_NOT_SATISFIABLE, outside).into_response();
            r.headers_mut().insert(
                header::CONTENT_RANGE,
                HeaderValue::from_str(&format!("bytes */{len}")).expect("ascii"),
            );
            return r;
        }
    };
    let mut response = Response::new(body(first, last));
    if let ByteRange::Part(..) = range {
        *response.status_mut() = StatusCode::PARTIAL_CONTENT;
    }
    let h = response.headers_mut();
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(last - first + 1));
    if let ByteRange::Part(..) = range {
        h.insert(
            header::CONTENT_RANGE,
            HeaderValue::from_str(&format!("bytes {first}-{last}/{len}")).expect("ascii"),
        );
    }
    response
}

/// 413 for an upload over `--max-upload-mb`.
fn upload_too_large(cap: usize) -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        format!(
            "file: uploads are at most {} MiB on this server (--max-upload-mb)",
            cap >> 20
        ),
    )
}

/// What a `Range` header asks of a body.
#[derive(Debug, PartialEq)]
enum ByteRange {
    /// No usable range (absent, malformed or several ranges: RFC 9110 lets a server send the
    /// whole body then).
    Whole,
    /// Bytes `first..=last`.
    Part(u64, u64),
    /// A well-formed range outside the body (416).
    Unsatisfiable,
}

/// One `bytes=` range of a `len`-byte body: `A-B`, `A-` or `-N` (the last N bytes).
fn byte_range(spec: &str, len: u64) -> ByteRange {
    let Some((a, b)) = spec
        .trim()
        .strip_prefix("bytes=")
        .filter(|r| !r.contains(','))
        .and_then(|r| r.split_once('-'))
    else {
        return ByteRange::Whole;
    };
    let num = |s: &str| s.trim().parse::<u64>().ok();
    let part = match (a.trim(), b.trim()) {
        ("", n) => match num(n) {
            Some(n) => (n > 0).then(|| (len.saturating_sub(n), len - 1)),
            None => return ByteRange::Whole,
        },
        (a, "") => match num(a) {
            Some(a) => (a < len).then_some((a, len - 1)),
            None => return ByteRange::Whole,
        },
        (a, b) => match (num(a), num(b)) {
            (Some(a), Some(b)) if a <= b => (a < len).then(|| (a, b.min(len - 1))),
            _ => return ByteRange::Whole,
        },
    };
    part.map_or(ByteRange::Unsatisfiable, |(a, b)| ByteRange::Part(a, b))
}

#[cfg(test)]
mod tests {
    use super::{byte_range, ByteRange::*};

    #[test]
    fn byte_ranges_follow_rfc_9110() {
        assert_eq!(byte_range("bytes=0-3", 21), Part(0, 3));
        assert_eq!(byte_range("bytes=17-", 21), Part(17, 20));
        assert_eq!(byte_range("bytes=-4", 21), Part(17, 20));
        assert_eq!(byte_range("bytes=-100", 21), Part(0, 20));
        assert_eq!(byte_range("bytes=5-1000", 21), Part(5, 20));
        assert_eq!(byte_range("bytes=21-", 21), Unsatisfiable);
        assert_eq!(byte_range("bytes=-0", 21), Unsatisfiable);
        for ignored in [
            "",
            "bytes=",
            "bytes=a-b",
            "bytes=0-1,4-5",
            "bytes=5-1",
            "items=0-1",
        ] {
            assert_eq!(byte_range(ignored, 21), Whole, "{ignored:?}");
        }
    }
}
