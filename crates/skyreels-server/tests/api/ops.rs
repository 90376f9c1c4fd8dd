//! Operations routes: health and readiness, metrics, the OpenAPI document, the docs and the
//! playground (with their Content-Security-Policy).

use crate::common::{body, config, start};
use axum::body::Body;
use axum::http::{header, Request, StatusCode};
use base64::Engine;
use serde_json::Value;
use sha2::{Digest, Sha256};
use skyreels_server::Server;
use tower::ServiceExt;

#[tokio::test(flavor = "multi_thread")]
async fn metrics_openapi_and_docs() {
    let h = start(|_| {}).await;
    let (_, v) = h.submit(body("p")).await;
    h.wait(v["data"]["id"].as_str().unwrap(), &["completed"])
        .await;
    let (s, hd, text) = h
        .call(Request::get("/metrics").body(Body::empty()).unwrap())
        .await;
    assert_eq!(s, StatusCode::OK);
    assert!(hd[header::CONTENT_TYPE]
        .to_str()
        .unwrap()
        .starts_with("text/plain"));
    let text = String::from_utf8(text).unwrap();
    for want in [
        "skyreels_queue_depth 0",
        "skyreels_jobs{status=\"completed\"} 1",
        "skyreels_jobs_finished_total{status=\"completed\"} 1",
        "skyreels_stage_duration_seconds_bucket{stage=\"denoising\",le=\"3600\"} 1",
        "skyreels_http_request_duration_seconds_count{method=\"POST\",route=\"/api/v3/{owner}/{model}\",status=\"200\"} 1",
        "skyreels_ready 1",
    ] {
        assert!(text.contains(want), "missing {want}:\n{text}");
    }
    let (s, _, doc) = h
        .call(Request::get("/openapi.json").body(Body::empty()).unwrap())
        .await;
    assert_eq!(s, StatusCode::OK);
    let doc: Value = serde_json::from_slice(&doc).unwrap();
    for path in [
        "/api/v3/{owner}/{model}",
        "/api/v3/predictions/{id}/result",
        "/api/v3/predictions/{id}/events",
        "/api/v3/media/uploads/{token}",
        "/metrics",
    ] {
        assert!(doc["paths"][path].is_object(), "{path}");
    }
    let (s, _, page) = h
        .call(Request::get("/docs/").body(Body::empty()).unwrap())
        .await;
    assert_eq!(s, StatusCode::OK);
    assert!(String::from_utf8_lossy(&page).contains("swagger"));
}

#[tokio::test(flavor = "multi_thread")]
async fn not_ready_while_loading_and_load_errors_surface() {
    let dir = tempfile::tempdir().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let loader = move || {
        let _ = rx.recv();
        Err("weights missing: transformer/config.json".to_string())
    };
    let mut server = Server::start(config(dir.path()), Box::new(loader)).unwrap();
    let router = server.router();
    let call = |uri: &'static str| {
        let r = router.clone();
        async move {
            r.oneshot(Request::get(uri).body(Body::empty()).unwrap())
                .await
                .unwrap()
                .status()
        }
    };
    assert_eq!(call("/ready").await, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(call("/health").await, StatusCode::OK);
    tx.send(()).unwrap();
    let e = server.wait_loaded().await.unwrap_err().to_string();
    assert!(e.contains("weights missing"), "{e}");
}

/// Issue 20: the playground page is public (it asks for the key itself), embedded, and served
/// under a strict Content-Security-Policy; everything it loads is from this origin.
#[tokio::test(flavor = "multi_thread")]
async fn the_playground_is_served_with_a_strict_csp() {
    for keys in [true, false] {
        let h = start(|c| {
            if !keys {
                c.api_keys.clear();
            }
        })
        .await;
        for (path, ct) in [
            ("/", "text/html"),
            ("/playground", "text/html"),
            ("/playground.js", "text/javascript"),
            ("/playground.css", "text/css"),
        ] {
            let (s, hd, body) = h
                .call(Request::get(path).body(Body::empty()).unwrap())
                .await;
            assert_eq!(s, StatusCode::OK, "{path}");
            assert!(
                hd[header::CONTENT_TYPE].to_str().unwrap().starts_with(ct),
                "{path}"
            );
            let csp = hd[header::CONTENT_SECURITY_POLICY].to_str().unwrap();
            assert!(
                csp.contains("script-src 'self'") && csp.contains("default-src 'none'"),
                "{csp}"
            );
            assert!(
                !csp.contains("unsafe-inline") && !csp.contains("unsafe-eval"),
                "{csp}"
            );
            // images from this origin and the page's own data: and blob: URLs only
            assert!(
                csp.contains("img-src 'self' data: blob:;") && !csp.contains("http"),
                "{csp}"
            );
            assert!(!body.is_empty());
            if ct == "text/html" {
                let html = String::from_utf8(body).unwrap();
                // no inline script or style, nothing from another origin
                assert!(html.contains("<script src=\"/playground.js\" defer></script>"));
                assert!(
                    !html.contains("<script>")
                        && !html.contains("<style")
                        && !html.contains(" style=")
                );
                assert!(!html.contains("http://") && !html.contains("https://cdn"));
            }
        }
    }
}

/// Issue 26 item 10: the Swagger UI had no policy at all. It is served under a strict one: its
/// index loads every script from a file (the initializer too), so no inline script needs
/// allowing; its one inline style (the logo's `<style>`) is allowed by its hash only.
#[tokio::test(flavor = "multi_thread")]
async fn the_docs_are_served_with_a_strict_csp() {
    const LOGO_STYLE: &str =
        ".logo_small_svg__cls-2{fill:#fff}.logo_small_svg__cls-3{fill:#85ea2d}";
    let h = start(|_| {}).await;
    for path in [
        "/docs/",
        "/docs/swagger-initializer.js",
        "/docs/swagger-ui-bundle.js",
        "/docs/swagger-ui-standalone-preset.js",
        "/docs/swagger-ui.css",
        "/docs/index.css",
    ] {
        let (s, hd, body) = h
            .call(Request::get(path).body(Body::empty()).unwrap())
            .await;
        assert_eq!(s, StatusCode::OK, "{path}");
        assert!(!body.is_empty(), "{path}");
        let csp = hd
            .get(header::CONTENT_SECURITY_POLICY)
            .unwrap_or_else(|| panic!("{path}: no Content-Security-Policy"))
            .to_str()
            .unwrap();
        for want in [
            "default-src 'none';",
            "script-src 'self';",
            "connect-src 'self';",
            "img-src 'self' data: blob:;",
            "frame-ancestors 'none'",
        ] {
            assert!(csp.contains(want), "{path}: {want} not in {csp}");
        }
        assert!(!csp.contains("unsafe-"), "{path}: {csp}");
        let styles = csp
            .split(';')
            .find_map(|d| d.trim().strip_prefix("style-src "))
            .unwrap_or_else(|| panic!("{path}: no style-src in {csp}"));
        let logo = base64::engine::general_purpose::STANDARD.encode(Sha256::digest(LOGO_STYLE));
        assert_eq!(styles, format!("'self' 'sha256-{logo}'"), "{path}");
        assert_eq!(hd[header::X_CONTENT_TYPE_OPTIONS], "nosniff", "{path}");
        let text = String::from_utf8_lossy(&body);
        if path == "/docs/" {
            // what the policy relies on: no inline script or style in the index
            assert_eq!(
                text.matches("<script").count(),
                text.matches("<script src=").count(),
                "{text}"
            );
            assert!(
                !text.contains("<style") && !text.contains(" style="),
                "{text}"
            );
        }
        if path.ends_with("standalone-preset.js") {
            // the hashed style is the vendored UI's own
            assert!(text.contains(&format!("\"{LOGO_STYLE}\"")), "{path}");
        }
    }
}
