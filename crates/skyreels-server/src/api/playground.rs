//! The playground page (`/` and `/playground`): one self-contained page, its script and its
//! styles embedded in the binary (no build step, no CDN), served under a Content-Security-Policy
//! that allows scripts, styles and connections to this origin only. It talks to the same
//! `/api/v3` routes as any client.

use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};

const PAGE: &str = include_str!("../../playground/index.html");
const SCRIPT: &str = include_str!("../../playground/playground.js");
const STYLE: &str = include_str!("../../playground/playground.css");

/// Scripts, styles and requests from this origin only; images may come from anywhere (a URL
/// the user gives is previewed), media from this origin (the outputs) or the page's own blobs.
pub const CSP: &str =
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; \
     img-src 'self' blob: data: http: https:; media-src 'self' blob:; base-uri 'none'; \
     form-action 'none'; frame-ancestors 'none'";

fn asset(body: &'static str, content_type: &'static str) -> Response {
    let mut r = body.into_response();
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
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
