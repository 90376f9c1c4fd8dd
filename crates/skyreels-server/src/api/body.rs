//! Request bodies: a deadline for the whole body, size limits, and typed JSON whose errors name
//! the field and its rule.

use super::error::ApiError;
use axum::body::{Body, Bytes};
use axum::http::{header, HeaderMap, StatusCode};
use http_body::Frame;
use http_body_util::BodyExt;
use serde::de::DeserializeOwned;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

/// The request body did not arrive within the body-read timeout.
#[derive(Debug)]
pub struct BodyTimeout(pub Duration);

impl std::fmt::Display for BodyTimeout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the request body did not arrive within {} seconds",
            self.0.as_secs_f64()
        )
    }
}

impl std::error::Error for BodyTimeout {}

/// A body that fails with [`BodyTimeout`] once `timeout` has passed since the request arrived,
/// however the bytes trickle in (a per-frame timeout would let one byte every few seconds hold
/// a connection forever).
pub struct DeadlineBody {
    inner: Body,
    deadline: Pin<Box<tokio::time::Sleep>>,
    timeout: Duration,
}

impl DeadlineBody {
    pub fn wrap(inner: Body, timeout: Duration) -> Body {
        Body::new(Self {
            inner,
            deadline: Box::pin(tokio::time::sleep(timeout)),
            timeout,
        })
    }
}

impl http_body::Body for DeadlineBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        if self.inner.is_end_stream() {
            return Poll::Ready(None);
        }
        if self.deadline.as_mut().poll(cx).is_ready() {
            let timeout = self.timeout;
            return Poll::Ready(Some(Err(axum::Error::new(BodyTimeout(timeout)))));
        }
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// The API error for a body that could not be read: 408 past the deadline, 413 past a size
/// limit, else 400.
pub fn body_error(e: &(dyn std::error::Error + 'static), max_bytes: usize) -> ApiError {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(t) = err.downcast_ref::<BodyTimeout>() {
            return ApiError::new(StatusCode::REQUEST_TIMEOUT, t.to_string());
        }
        if err.is::<http_body_util::LengthLimitError>() {
            return too_large(max_bytes);
        }
        cur = err.source();
    }
    ApiError::new(
        StatusCode::BAD_REQUEST,
        format!("the request body could not be read: {e}"),
    )
}

pub fn too_large(max_bytes: usize) -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        format!("request body is larger than the limit of {max_bytes} bytes"),
    )
}

/// The whole body, at most `max_bytes` (413 beyond).
pub async fn read_limited(body: Body, max_bytes: usize) -> Result<Bytes, ApiError> {
    http_body_util::Limited::new(body, max_bytes)
        .collect()
        .await
        .map(|c| c.to_bytes())
        .map_err(|e| body_error(&*e, max_bytes))
}

/// A JSON object body as `T`: 415 without a JSON content type, 400 for bad JSON or a
/// non-object, and for a field that breaks its rule "`field`: `rule`".
pub async fn read_json<T: DeserializeOwned + Send + 'static>(
    headers: &HeaderMap,
    body: Body,
    max_bytes: usize,
) -> Result<T, ApiError> {
    let json_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .map(|m| {
            let m = m.trim().to_ascii_lowercase();
            m == "application/json" || (m.starts_with("application/") && m.ends_with("+json"))
        })
        .unwrap_or(false);
    if !json_type {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "Expected request with `Content-Type: application/json`",
        ));
    }
    let bytes = read_limited(body, max_bytes).await?;
    // a large body (a data: URI image) is parsed off the async runtime
    if bytes.len() > INLINE_PARSE_BYTES {
        tokio::task::spawn_blocking(move || parse_json(&bytes))
            .await
            .map_err(ApiError::internal)?
    } else {
        parse_json(&bytes)
    }
}

/// Bodies up to this size are parsed on the async runtime (well under a millisecond).
const INLINE_PARSE_BYTES: usize = 64 << 10;

fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let value: serde_json::Value = serde_json::from_slice(bytes).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("the body is not valid JSON: {e}"),
        )
    })?;
    if !value.is_object() {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "the body must be a JSON object",
        ));
    }
    serde_path_to_error::deserialize(value)
        .map_err(|e| ApiError::bad(&e.path().to_string(), e.inner()))
}
