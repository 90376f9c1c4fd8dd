//! Errors answered before a task exists, and the envelope every JSON answer wears.

use crate::contract::Envelope;
use crate::engine::EngineError;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

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

    /// 400 naming the field and the rule: "`field`: `rule`".
    pub fn bad(field: &str, rule: impl std::fmt::Display) -> Self {
        Self::new(StatusCode::BAD_REQUEST, format!("{field}: {rule}"))
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, message)
    }

    pub fn internal(message: impl std::fmt::Display) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, message.to_string())
    }

    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, message)
    }
}

impl From<EngineError> for ApiError {
    /// The engine cannot answer now (its store unreachable or full, the server stopping): 503
    /// with Retry-After, the cause logged (the client's message leaves it out).
    fn from(e: EngineError) -> Self {
        e.log();
        Self {
            retry_after: Some(5),
            ..Self::unavailable(e.to_string())
        }
    }
}

impl From<crate::engine::UploadRefused> for ApiError {
    /// 429 for what the client holds too much of, 503 for the server's own limits.
    fn from(e: crate::engine::UploadRefused) -> Self {
        use crate::engine::UploadRefused as R;
        match e {
            R::Unavailable(u) => u.into(),
            R::ClusterQuota(_) => Self {
                retry_after: Some(60),
                ..Self::unavailable(e.to_string())
            },
            R::Tickets | R::KeyTickets | R::KeyQuota(_) => Self {
                status: StatusCode::TOO_MANY_REQUESTS,
                message: e.to_string(),
                retry_after: Some(30),
            },
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = envelope(self.status, &self.message, ());
        if let Some(s) = self.retry_after {
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        r
    }
}

/// `{"code", "message", "data"}` with HTTP status = code; `()` data is `null`.
pub fn envelope<T: Serialize>(status: StatusCode, message: &str, data: T) -> Response {
    let body = Envelope {
        code: status.as_u16(),
        message: message.to_string(),
        data,
    };
    (status, axum::Json(body)).into_response()
}

/// 200 `success` with `data`.
pub fn success<T: Serialize>(data: T) -> Response {
    envelope(StatusCode::OK, "success", data)
}

pub type ApiResult = Result<Response, ApiError>;
