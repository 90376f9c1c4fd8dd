//! Auth, allowed hosts, abuse limits (bodies, metrics labels, slow clients, connections), log
//! injection and the headers against framing and sniffing.

use crate::common::{config, metrics_text, png_data_uri, start, Fake, Gate, Listening, KEY, MODEL};
use axum::body::Body;
use axum::http::{header, Request, StatusCode};
use serde_json::{json, Value};
use skyreels_server::generator::Generator;
use skyreels_server::{Server, ServerConfig};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tower::ServiceExt;

#[tokio::test(flavor = "multi_thread")]
async fn body_size_limit_is_413_in_the_envelope() {
    let h = start(|c| c.max_body_bytes = 4096).await;
    let (s, v) = h
        .submit(json!({"prompt": "x".repeat(5000), "image": png_data_uri(8, 8)}))
        .await;
    assert_eq!(s, StatusCode::PAYLOAD_TOO_LARGE, "{v}");
    assert!(v["message"].as_str().unwrap().contains("4096"));
}

#[tokio::test(flavor = "multi_thread")]
async fn auth_on_and_off() {
    let h = start(|_| {}).await;
    for key in [
        None,
        Some("wrong"),
        Some("test-key-12"),
        Some("test-key-1234"),
    ] {
        let (s, v) = h.json("GET", "/api/v3/models", None, key).await;
        assert_eq!(s, StatusCode::UNAUTHORIZED, "{key:?}");
        assert_eq!(
            v,
            json!({"code": 401, "message": "Unauthorized: invalid API key", "data": null})
        );
    }
    let (s, v) = h.json("GET", "/api/v3/models", None, Some(KEY)).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v["data"][0]["model_id"], MODEL);
    assert_eq!(
        v["data"][0]["api_schema"]["input"]["required"],
        json!(["prompt", "image"])
    );
    let (s, v) = h
        .json("GET", "/api/v3/webhook/secret", None, Some(KEY))
        .await;
    assert_eq!(s, StatusCode::OK);
    assert!(v["data"]["secret"].as_str().unwrap().starts_with("whsec_"));
    let (s, _) = h.json("GET", "/api/v3/webhook/secret", None, None).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    // open server: no key needed
    let open = start(|c| c.api_keys.clear()).await;
    let (s, _) = open.json("GET", "/api/v3/models", None, None).await;
    assert_eq!(s, StatusCode::OK);
    // health, ready and metrics need no key
    for path in ["/health", "/ready"] {
        let (s, _) = h.json("GET", path, None, None).await;
        assert_eq!(s, StatusCode::OK, "{path}");
    }
}

/// Finding 1: invented methods became metric labels, so /metrics grew without bound.
#[tokio::test(flavor = "multi_thread")]
async fn invented_methods_do_not_grow_the_metrics() {
    let h = start(|_| {}).await;
    let before = metrics_text(&h).await;
    for i in 0..50 {
        let method = format!("X{i}{}", "Y".repeat(2000));
        let req = Request::builder()
            .method(axum::http::Method::from_bytes(method.as_bytes()).unwrap())
            .uri(format!("/api/v3/predictions/{i}"))
            .body(Body::empty())
            .unwrap();
        let (s, _, _) = h.call(req).await;
        assert_eq!(s, StatusCode::METHOD_NOT_ALLOWED);
    }
    let after = metrics_text(&h).await;
    assert!(!after.contains("YYYY"), "an invented method is a label");
    assert!(after.contains("method=\"other\""), "{after}");
    // one new series (method other, its route, status 405), whatever the number of methods
    assert!(
        after.len() < before.len() + 4096,
        "/metrics grew from {} to {} bytes",
        before.len(),
        after.len()
    );
}

/// Where this binary's log lines go (set once for the whole test binary).
fn captured_logs() -> Arc<Mutex<Vec<u8>>> {
    static LOGS: std::sync::OnceLock<Arc<Mutex<Vec<u8>>>> = std::sync::OnceLock::new();
    LOGS.get_or_init(|| {
        let buf: Arc<Mutex<Vec<u8>>> = Arc::default();
        let b = buf.clone();
        let writer = move || Capture(b.clone());
        tracing_subscriber::fmt()
            .with_writer(writer)
            .with_ansi(false)
            .with_max_level(tracing::Level::DEBUG)
            .init();
        buf
    })
    .clone()
}

struct Capture(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Capture {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Finding 8: raw image and webhook strings and request ids forged log lines.
#[tokio::test(flavor = "multi_thread")]
async fn user_strings_cannot_forge_log_lines() {
    let logs = captured_logs();
    let h = start(|c| c.allow_private_urls = true).await;
    let forged = "2026-12-02T00:00:00.000000Z  INFO forged: admin logged in";
    let (s, v) = h
        .submit_query(
            "?webhook=http://127.0.0.1:1/hook%0D%0A2026-12-02T00:00:00.000000Z%20%20INFO%20forged",
            json!({"prompt": "p\r\nforged", "image": format!("http://127.0.0.1:1/x\r\n{forged}")}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let d = h.wait(v["data"]["id"].as_str().unwrap(), &["failed"]).await;
    assert_eq!(d["code"], 1402);
    // a request id that is not [A-Za-z0-9._-]{1,64} is replaced, one that is comes back
    for (sent, kept) in [
        ("good-id_1.2", true),
        ("bad id", false),
        ("<script>", false),
    ] {
        let req = Request::get("/health")
            .header("x-request-id", sent)
            .body(Body::empty())
            .unwrap();
        let (_, hd, _) = h.call(req).await;
        assert_eq!(hd["x-request-id"] == sent, kept, "{sent}");
    }
    h.server.as_ref().unwrap().state.jobs.flushed().await;
    let text = String::from_utf8_lossy(&logs.lock().unwrap()).into_owned();
    assert!(text.contains("request"), "nothing captured");
    for line in text.lines() {
        assert!(
            !line.starts_with("2026-12-02T00:00:00"),
            "forged line: {line:?}"
        );
        assert!(!line.contains("<script>"), "{line:?}");
    }
}

/// Finding 9: any Host was trusted (DNS rebinding of an open API).
#[tokio::test(flavor = "multi_thread")]
async fn only_our_host_names_are_answered() {
    let h = start(|c| c.api_keys.clear()).await;
    let get = |host: &'static str| {
        Request::get("/api/v3/models")
            .header(header::HOST, host)
            .body(Body::empty())
            .unwrap()
    };
    for host in [
        "evil.example",
        "evil.example:8000",
        "127.0.0.2",
        "localhost.evil.example",
        "gen.local.evil",
    ] {
        let (s, _, b) = h.call(get(host)).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{host}");
        let v: Value = serde_json::from_slice(&b).unwrap();
        assert!(
            v["message"].as_str().unwrap().contains("--allowed-host"),
            "{v}"
        );
    }
    for host in [
        "localhost",
        "LOCALHOST:8000",
        "127.0.0.1:8000",
        "[::1]:8000",
        "gen.local",
        "gen.local.:80",
    ] {
        let (s, _, _) = h.call(get(host)).await;
        assert_eq!(s, StatusCode::OK, "{host}");
    }
    // behind a proxy (--public-url) the Host is the proxy's business
    let proxied = start(|c| {
        c.api_keys.clear();
        c.public_url = Some("https://video.example.com".into());
    })
    .await;
    let (s, _, _) = proxied.call(get("evil.example")).await;
    assert_eq!(s, StatusCode::OK);
}

/// Finding 10 (low): scheme case, corrupt records, orphans, base64 encoded once, and a DELETE
/// answered "cancelling" that must end cancelled.
#[tokio::test(flavor = "multi_thread")]
async fn bearer_in_any_case_and_ops_protection() {
    let h = start(|_| {}).await;
    for scheme in ["bearer", "BEARER", "Bearer "] {
        let req = Request::get("/api/v3/models")
            .header(header::AUTHORIZATION, format!("{scheme} {KEY}"))
            .body(Body::empty())
            .unwrap();
        assert_eq!(h.call(req).await.0, StatusCode::OK, "{scheme}");
    }
    let req = Request::get("/api/v3/models")
        .header(header::AUTHORIZATION, format!("Basic {KEY}"))
        .body(Body::empty())
        .unwrap();
    assert_eq!(h.call(req).await.0, StatusCode::UNAUTHORIZED);
    for path in ["/metrics", "/openapi.json", "/docs/"] {
        let (s, _, _) = h
            .call(Request::get(path).body(Body::empty()).unwrap())
            .await;
        assert_eq!(s, StatusCode::OK, "{path} is open by default");
    }
    let p = start(|c| c.protect_ops = true).await;
    for path in ["/metrics", "/openapi.json", "/docs/"] {
        let (s, _, _) = p
            .call(Request::get(path).body(Body::empty()).unwrap())
            .await;
        assert_eq!(s, StatusCode::UNAUTHORIZED, "{path}");
        let req = Request::get(path)
            .header(header::AUTHORIZATION, format!("Bearer {KEY}"))
            .body(Body::empty())
            .unwrap();
        assert_eq!(p.call(req).await.0, StatusCode::OK, "{path}");
    }
    let (s, _, _) = p
        .call(Request::get("/health").body(Body::empty()).unwrap())
        .await;
    assert_eq!(s, StatusCode::OK);
}

/// A server on a real socket (timeouts and the connection cap live in the accept loop).
struct Live {
    server: Listening,
    _dir: tempfile::TempDir,
}

async fn live(cfg: impl FnOnce(&mut ServerConfig)) -> Live {
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(dir.path());
    c.api_keys.clear();
    cfg(&mut c);
    let gate = Gate::closed();
    gate.open();
    let seen = Arc::new(Mutex::new(vec![]));
    let server = Server::start(
        c,
        Box::new(move || Ok(Box::new(Fake::new(gate, seen)) as Box<dyn Generator>)),
    )
    .unwrap();
    Live {
        server: Listening::start(server).await,
        _dir: dir,
    }
}

impl Live {
    async fn connect(&self) -> tokio::net::TcpStream {
        tokio::net::TcpStream::connect(self.server.addr)
            .await
            .unwrap()
    }

    async fn stop(self) {
        self.server.stop().await;
    }
}

/// Reads until the server closes the connection (or `limit` passes); what it sent.
async fn read_until_closed(s: &mut tokio::net::TcpStream, limit: Duration) -> Option<Vec<u8>> {
    use tokio::io::AsyncReadExt;
    let mut out = Vec::new();
    let r = tokio::time::timeout(limit, async {
        let mut buf = [0u8; 4096];
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    r.ok().map(|()| out)
}

/// Finding 2 (connections): headers that never finish, bodies that trickle, idle sockets and
/// more connections than the cap.
#[tokio::test(flavor = "multi_thread")]
async fn slow_clients_time_out_and_connections_are_capped() {
    use tokio::io::AsyncWriteExt;
    let s = live(|c| {
        c.header_timeout = Duration::from_millis(500);
        c.body_timeout = Duration::from_millis(500);
        c.idle_timeout = Duration::from_secs(30);
    })
    .await;
    // headers that never finish: closed
    let mut c = s.connect().await;
    c.write_all(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: 1\r\n")
        .await
        .unwrap();
    assert!(
        read_until_closed(&mut c, Duration::from_secs(10))
            .await
            .is_some(),
        "half-sent headers kept the connection"
    );
    // nothing at all: closed too
    let mut c = s.connect().await;
    assert!(read_until_closed(&mut c, Duration::from_secs(10))
        .await
        .is_some());
    // a body that does not arrive in time: 408 in the envelope
    let mut c = s.connect().await;
    c.write_all(format!("POST /api/v3/{MODEL} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{{\"prompt\":").as_bytes()).await.unwrap();
    let got = read_until_closed(&mut c, Duration::from_secs(10))
        .await
        .expect("answered");
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(text.contains("\"code\":408"), "{text}");
    // the Host check on the socket: the bound address and localhost, nothing else
    for (host, want) in [
        ("127.0.0.1", "200"),
        ("localhost:1", "200"),
        ("evil.example", "400"),
    ] {
        let mut c = s.connect().await;
        c.write_all(
            format!("GET /health HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
        let got = read_until_closed(&mut c, Duration::from_secs(10))
            .await
            .unwrap();
        assert!(
            String::from_utf8_lossy(&got).starts_with(&format!("HTTP/1.1 {want}")),
            "{host}"
        );
    }
    s.stop().await;

    // idle: a connection where nothing moves is closed even with a long header timeout
    let s = live(|c| {
        c.header_timeout = Duration::from_secs(60);
        c.idle_timeout = Duration::from_millis(400);
    })
    .await;
    let mut c = s.connect().await;
    assert!(
        read_until_closed(&mut c, Duration::from_secs(10))
            .await
            .is_some(),
        "an idle connection stayed"
    );
    s.stop().await;

    // the cap: two silent connections hold both slots; a third is served only once one closes
    let s = live(|c| {
        c.header_timeout = Duration::from_secs(60);
        c.idle_timeout = Duration::from_secs(60);
        c.max_connections = 2;
    })
    .await;
    let hold1 = s.connect().await;
    let hold2 = s.connect().await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut third = s.connect().await;
    third
        .write_all(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    assert!(
        read_until_closed(&mut third, Duration::from_millis(500))
            .await
            .is_none(),
        "served beyond the cap"
    );
    drop(hold1);
    let got = read_until_closed(&mut third, Duration::from_secs(10))
        .await
        .expect("served after a slot freed");
    assert!(String::from_utf8_lossy(&got).starts_with("HTTP/1.1 200"));
    drop(hold2);
    s.stop().await;
}

/// Issue 26 item 10: no response may be framed by another site (clickjacking) or sniffed into
/// another type: `X-Frame-Options: DENY` and `nosniff` on every response, errors included, and
/// a policy with `frame-ancestors 'none'` on every response but served files (whose `sandbox`
/// policy and `X-Frame-Options` are checked with the uploads).
#[tokio::test(flavor = "multi_thread")]
async fn no_response_can_be_framed_or_sniffed() {
    let h = start(|_| {}).await;
    for (path, host, key, status) in [
        ("/api/v3/models", "gen.local", true, StatusCode::OK),
        (
            "/api/v3/models",
            "gen.local",
            false,
            StatusCode::UNAUTHORIZED,
        ),
        (
            "/api/v3/models",
            "evil.example",
            true,
            StatusCode::BAD_REQUEST,
        ),
        (
            "/api/v3/predictions/x/result",
            "gen.local",
            true,
            StatusCode::NOT_FOUND,
        ),
        ("/nowhere", "gen.local", false, StatusCode::NOT_FOUND),
        ("/health", "gen.local", false, StatusCode::OK),
        ("/metrics", "gen.local", false, StatusCode::OK),
        ("/openapi.json", "gen.local", false, StatusCode::OK),
        ("/docs", "gen.local", false, StatusCode::SEE_OTHER),
        ("/docs/", "gen.local", false, StatusCode::OK),
        ("/", "gen.local", false, StatusCode::OK),
        ("/playground.js", "gen.local", false, StatusCode::OK),
    ] {
        let mut req = Request::get(path).header(header::HOST, host);
        if key {
            req = req.header(header::AUTHORIZATION, format!("Bearer {KEY}"));
        }
        let (s, hd, _) = h.call(req.body(Body::empty()).unwrap()).await;
        assert_eq!(s, status, "{path} for {host}");
        assert_eq!(
            hd.get(header::X_FRAME_OPTIONS).map(|v| v.as_bytes()),
            Some(&b"DENY"[..]),
            "{path} for {host}"
        );
        assert_eq!(
            hd.get(header::X_CONTENT_TYPE_OPTIONS).map(|v| v.as_bytes()),
            Some(&b"nosniff"[..]),
            "{path} for {host}"
        );
        let csp = hd
            .get(header::CONTENT_SECURITY_POLICY)
            .map(|v| v.to_str().unwrap())
            .unwrap_or_default();
        assert!(
            csp.contains("frame-ancestors 'none'"),
            "{path} for {host}: {csp:?}"
        );
    }
    // and a worker's metrics port
    let state = h.server.as_ref().unwrap().state.clone();
    let r = skyreels_server::api::metrics_router(state)
        .oneshot(Request::get("/metrics").body(Body::empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(
        r.headers()
            .get(header::X_FRAME_OPTIONS)
            .map(|v| v.as_bytes()),
        Some(&b"DENY"[..])
    );
    assert_eq!(
        r.headers()
            .get(header::X_CONTENT_TYPE_OPTIONS)
            .map(|v| v.as_bytes()),
        Some(&b"nosniff"[..])
    );
}
