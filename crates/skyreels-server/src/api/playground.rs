//! The playground page (`/` and `/playground`): one self-contained page, its script and its
//! styles embedded in the binary (no build step, no CDN), served under a strict policy
//! ([`super::middleware::PLAYGROUND_CSP`]). It talks to the same `/api/v3` routes as any client.

use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};

const PAGE: &str = include_str!("../../playground/index.html");
const SCRIPT: &str = include_str!("../../playground/playground.js");
const STYLE: &str = include_str!("../../playground/playground.css");

fn asset(body: &'static str, content_type: &'static str) -> Response {
    let mut r = body.into_response();
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    r
}

/// The playground page.
#[utoipa::path(get, path = "/playground", tag = "operations",
    responses((status = 200, description = "The playground page (also at /)", content_type = "text/html")))]
pub async fn page() -> Response {
    asset(PAGE, "text/html; charset=utf-8")
}

pub async fn script() -> Response {
    asset(SCRIPT, "text/javascript; charset=utf-8")
}

pub async fn style() -> Response {
    asset(STYLE, "text/css; charset=utf-8")
}
