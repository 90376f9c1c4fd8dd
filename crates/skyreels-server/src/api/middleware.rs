//! What runs around every handler: request ids, logs and metrics; the Host check; keys; the
//! body deadline; JSON envelopes for every error; the security headers (no sniffing, no
//! framing, the pages' policy, inert served files).

use super::body::DeadlineBody;
use super::error::ApiError;
use crate::engine::task::new_id;
use crate::state::AppState;
use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};
use std::collections::HashSet;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;
use tower_http::set_header::SetResponseHeaderLayer;

/// The metrics label of a method: the standard ones, else "other" (hyper accepts any token as
/// a method; recording it as received would let clients grow the label set without bound).
pub fn method_label(m: &Method) -> &'static str {
    match *m {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}

/// A client's `X-Request-Id` if it is `[A-Za-z0-9._-]{1,64}`; anything else is replaced.
pub fn request_id(headers: &HeaderMap) -> String {
    headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| {
            (1..=64).contains(&v.len())
                && v.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        })
        .map_or_else(new_id, str::to_string)
}

/// Request id, structured log line and latency metric for every request. User-controlled
/// strings are logged debug-escaped, so CR/LF cannot forge log lines.
pub async fn observe(State(state): State<Arc<AppState>>, mut req: Request, next: Next) -> Response {
    let start = Instant::now();
    let id = request_id(req.headers());
    let value = HeaderValue::from_str(&id).expect("request ids are visible ASCII");
    req.headers_mut().insert("x-request-id", value.clone());
    let method = method_label(req.method());
    let path = req.uri().path().to_string();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_string(), |m| m.as_str().to_string());
    let mut response = next.run(req).await;
    let status = response.status().as_u16();
    let secs = start.elapsed().as_secs_f64();
    state.metrics.http(method, &route, status, secs);
    tracing::info!(request_id = %id, method, path = ?path, status, ms = secs * 1000.0, "request");
    response.headers_mut().insert("x-request-id", value);
    response
}

/// Which Host values the server answers for. Without `--public-url`, a browser page that
/// re-binds its own name to this server's address (DNS rebinding) would otherwise drive an
/// open API: only the bound address (every local interface address when bound to 0.0.0.0 or
/// ::), `localhost` and `--allowed-host` names are accepted.
#[derive(Clone, Debug)]
pub struct HostPolicy {
    any: bool,
    names: HashSet<String>,
    ips: HashSet<IpAddr>,
}

impl HostPolicy {
    /// `bound`: the listening address (None: loopback only, as for a router without a socket).
    pub fn new(state: &AppState, bound: Option<IpAddr>) -> Self {
        let c = &state.config;
        let mut names: HashSet<String> = c
            .allowed_hosts
            .iter()
            .map(|h| h.trim().trim_end_matches('.').to_ascii_lowercase())
            .filter(|h| !h.is_empty())
            .collect();
        names.insert("localhost".into());
        let mut ips = HashSet::new();
        match bound {
            Some(ip) if ip.is_unspecified() => {
                ips.extend(
                    if_addrs::get_if_addrs()
                        .unwrap_or_default()
                        .into_iter()
                        .map(|i| i.ip()),
                );
                ips.extend([
                    IpAddr::from([127, 0, 0, 1]),
                    std::net::Ipv6Addr::LOCALHOST.into(),
                ]);
            }
            Some(ip) => {
                ips.insert(ip);
            }
            None => ips.extend([
                IpAddr::from([127, 0, 0, 1]),
                std::net::Ipv6Addr::LOCALHOST.into(),
            ]),
        }
        Self {
            any: c.public_url.is_some(),
            names,
            ips,
        }
    }

    /// Whether a Host (or :authority) value names this server.
    pub fn allows(&self, host: &str) -> bool {
        if self.any {
            return true;
        }
        let name = if let Some(rest) = host.strip_prefix('[') {
            rest.split(']').next().unwrap_or_default()
        } else {
            match host.rsplit_once(':') {
                Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
                _ => host,
            }
        };
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        match name.parse::<IpAddr>() {
            Ok(ip) => self.ips.contains(&ip),
            Err(_) => self.names.contains(&name),
        }
    }
}

pub async fn check_host(
    State(policy): State<Arc<HostPolicy>>,
    req: Request,
    next: Next,
) -> Response {
    let host = req
        .headers()
        .get(header::HOST)
        .map(|h| String::from_utf8_lossy(h.as_bytes()).into_owned())
        .or_else(|| req.uri().authority().map(|a| a.to_string()));
    match host {
        Some(h) if !policy.allows(&h) => {
            tracing::warn!(host = ?h, "refused a request for another host name");
            ApiError::new(
                StatusCode::BAD_REQUEST,
                format!(
                    "Host {h:?} is not a name of this server; start it with --allowed-host NAME \
                     (or --public-url) to answer for it"
                ),
            )
            .into_response()
        }
        _ => next.run(req).await,
    }
}

/// Who a request comes from, for the bounds kept per API key (upload tickets and quotas):
/// the first 16 hex digits of its key's SHA-256, or `anonymous` when no key is configured.
#[derive(Clone, Debug, PartialEq)]
pub struct Owner(pub String);

impl Owner {
    /// The owner [`auth`] found, `anonymous` where no key was asked for.
    pub fn of(ext: Option<axum::Extension<Owner>>) -> String {
        ext.map_or_else(|| crate::engine::ANONYMOUS.to_string(), |e| e.0 .0)
    }
}

/// The owner of the configured key the request carries (`Authorization: Bearer KEY`, the
/// scheme in any case); `anonymous` when no key is configured; `None` without a valid key.
pub fn caller(state: &AppState, headers: &HeaderMap) -> Option<Owner> {
    if state.key_hashes.is_empty() {
        return Some(Owner(crate::engine::ANONYMOUS.into()));
    }
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim_start().split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, k)| <[u8; 32]>::from(Sha256::digest(k.trim().as_bytes())))?;
    // against every key, without stopping at a match
    let known = state
        .key_hashes
        .iter()
        .fold(false, |found, k| found | ct_eq(k, &presented));
    known.then(|| Owner(crate::engine::task::hex(&presented[..8])))
}

pub async fn auth(State(state): State<Arc<AppState>>, mut req: Request, next: Next) -> Response {
    match caller(&state, req.headers()) {
        Some(owner) => {
            req.extensions_mut().insert(owner);
            next.run(req).await
        }
        None => {
            ApiError::new(StatusCode::UNAUTHORIZED, "Unauthorized: invalid API key").into_response()
        }
    }
}

/// Gives every request body a deadline (the body-read timeout).
pub async fn body_deadline(
    State(state): State<Arc<AppState>>,
    req: Request,
    next: Next,
) -> Response {
    let timeout = state.config.body_timeout;
    next.run(req.map(|b| DeadlineBody::wrap(b, timeout))).await
}

/// The policy of our pages and their assets, given `style-src` sources beyond `'self'`: scripts,
/// styles and requests from this origin only (no inline script, no eval); images from this
/// origin and the page's own `data:` and `blob:` URLs; media from this origin or blobs; no
/// forms, no `<base>`, no framing.
macro_rules! page_csp {
    ($styles:literal) => {
        concat!(
            "default-src 'none'; script-src 'self'; style-src 'self'",
            $styles,
            "; connect-src 'self'; img-src 'self' data: blob:; media-src 'self' blob:; \
             base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
        )
    };
}

/// The playground's policy: no inline style either.
pub const PLAYGROUND_CSP: &str = page_csp!("");

/// The Swagger UI's policy (`/docs`, the swagger-ui 5.17.14 vendored by `utoipa-swagger-ui`): its
/// index loads every script from a file (its configuration is `swagger-initializer.js`), so no
/// script needs allowing; its one inline style, the `<style>` of the top bar's logo
/// (`.logo_small_svg__cls-2{fill:#fff}.logo_small_svg__cls-3{fill:#85ea2d}`), is allowed by its hash.
pub const DOCS_CSP: &str = page_csp!(" 'sha256-RL3ie0nH+Lzz2YNqQN83mnU0J1ot4QL7b99vMdIX99w='");

/// Serves a page and its assets under `policy`.
pub fn page_policy(policy: &'static str) -> SetResponseHeaderLayer<HeaderValue> {
    SetResponseHeaderLayer::overriding(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(policy),
    )
}

/// Served files (outputs, uploads) are never interpreted by a browser as a page of ours.
pub async fn inert_files(req: Request, next: Next) -> Response {
    let mut r = next.run(req).await;
    r.headers_mut().insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static("sandbox"),
    );
    r
}

/// Every response, errors included: never sniffed into another type, never framed by another
/// site (`X-Frame-Options` for browsers without CSP's `frame-ancestors`, and a `frame-ancestors
/// 'none'` policy on every response without a policy of its own).
pub async fn security_headers(req: Request, next: Next) -> Response {
    let mut r = next.run(req).await;
    let h = r.headers_mut();
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.entry(header::CONTENT_SECURITY_POLICY)
        .or_insert(HeaderValue::from_static("frame-ancestors 'none'"));
    r
}

/// Rewrites any error response that is not already JSON (axum's extractor rejections, file
/// service errors) into the envelope, so no client ever sees a bare-text or empty error.
pub async fn envelope_errors(
    State(state): State<Arc<AppState>>,
    req: Request,
    next: Next,
) -> Response {
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
        StatusCode::PAYLOAD_TOO_LARGE => {
            super::body::too_large(state.config.max_body_bytes).message
        }
        _ if text.is_empty() => status.canonical_reason().unwrap_or("error").to_string(),
        _ => text,
    };
    ApiError::new(status, message).into_response()
}

/// Compares two digests in constant time.
fn ct_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn host_policy_follows_the_bound_address() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = crate::config::ServerConfig::new(dir.path());
        c.allowed_hosts = vec!["Video.Example.COM.".into()];
        let server = crate::server::Server::start(c, Box::new(|| Err("no model".into()))).unwrap();
        let state = &server.state;
        let specific = HostPolicy::new(state, Some("10.1.2.3".parse().unwrap()));
        assert!(specific.allows("10.1.2.3:8000") && specific.allows("localhost"));
        assert!(specific.allows("video.example.com") && specific.allows("VIDEO.example.com:443"));
        assert!(!specific.allows("127.0.0.1") && !specific.allows("10.1.2.4"));
        let any = HostPolicy::new(state, Some("0.0.0.0".parse().unwrap()));
        for i in if_addrs::get_if_addrs().unwrap() {
            let ip = i.ip();
            let host = if ip.is_ipv6() {
                format!("[{ip}]:80")
            } else {
                format!("{ip}:80")
            };
            assert!(any.allows(&host), "{host}");
        }
        assert!(any.allows("127.0.0.1") && !any.allows("evil.example"));
    }

    #[test]
    fn labels_and_ids_are_bounded() {
        assert_eq!(method_label(&Method::GET), "GET");
        assert_eq!(method_label(&Method::from_bytes(b"BREW").unwrap()), "other");
        assert_eq!(method_label(&Method::PATCH), "other");
        let mut h = HeaderMap::new();
        h.insert("x-request-id", HeaderValue::from_static("abc-1.2_3"));
        assert_eq!(request_id(&h), "abc-1.2_3");
        for bad in ["a b", "x".repeat(65).as_str(), "a\"b", "é"] {
            if let Ok(v) = HeaderValue::from_str(bad) {
                h.insert("x-request-id", v);
                assert_ne!(request_id(&h), bad);
                assert_eq!(request_id(&h).len(), 32);
            }
        }
    }
}
