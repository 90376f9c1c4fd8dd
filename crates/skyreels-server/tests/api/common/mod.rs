//! The shared harness: a server (memory or Redis engine) driven through its router with fake
//! generators, its request helpers, and the request bodies and images the tests send.

mod fake;
mod redis_server;

pub(crate) use fake::{Fake, Gate, FAKE_CHECKER};
pub(crate) use redis_server::{start_on_redis, start_redis_with, RedisServer};

use axum::body::Body;
use axum::http::{header, Request, StatusCode};
use axum::Router;
use base64::Engine;
use http_body_util::BodyExt;
use serde_json::{json, Value};
use skyreels_server::generator::Generator;
use skyreels_server::{Server, ServerConfig};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tower::ServiceExt;

pub(crate) const MODEL: &str = "wavespeed-ai/SkyReels-V1";
pub(crate) const KEY: &str = "test-key-123";

/// A server under test, driven through its router (no socket): what its fake generators were
/// asked, and its data folder.
pub(crate) struct Harness {
    pub(crate) server: Option<Server>,
    pub(crate) router: Router,
    pub(crate) seen: Arc<Mutex<Vec<fake::Seen>>>,
    pub(crate) dir: tempfile::TempDir,
    /// The Redis of a Redis-mode server (stopped with the harness).
    pub(crate) redis: Option<RedisServer>,
}

pub(crate) fn config(dir: &Path) -> ServerConfig {
    let mut c = ServerConfig::new(dir);
    c.api_keys = vec![KEY.into()];
    c.max_queue = 3;
    c.webhook_backoff = Duration::from_millis(50);
    c.sync_timeout = Duration::from_secs(20);
    c.allowed_hosts = vec!["gen.local".into()];
    c
}

pub(crate) async fn start_with(
    dir: tempfile::TempDir,
    cfg: impl FnOnce(&mut ServerConfig),
    gate: Gate,
) -> Harness {
    start_workers_with(dir, cfg, gate, 1).await
}

/// A server with `workers` fake generators (one per "device") sharing `gate` and `seen`.
pub(crate) async fn start_workers_with(
    dir: tempfile::TempDir,
    cfg: impl FnOnce(&mut ServerConfig),
    gate: Gate,
    workers: usize,
) -> Harness {
    let mut c = config(dir.path());
    cfg(&mut c);
    let seen = Arc::new(Mutex::new(vec![]));
    let loaders = (0..workers)
        .map(|_| {
            let (g, s) = (gate.clone(), seen.clone());
            Box::new(move || Ok(Box::new(Fake::new(g, s)) as Box<dyn Generator>))
                as skyreels_server::generator::GeneratorLoader
        })
        .collect();
    let mut server = Server::start_node(c, loaders).await.unwrap();
    server.wait_loaded().await.unwrap();
    let router = server.router();
    Harness {
        server: Some(server),
        router,
        seen,
        dir,
        redis: None,
    }
}

pub(crate) async fn start(cfg: impl FnOnce(&mut ServerConfig)) -> Harness {
    let gate = Gate::closed();
    gate.open();
    start_with(tempfile::tempdir().unwrap(), cfg, gate).await
}

pub(crate) fn png_data_uri(w: u32, h: u32) -> String {
    let mut out = Vec::new();
    image::RgbImage::new(w, h)
        .write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png)
        .unwrap();
    format!(
        "data:image/png;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(out)
    )
}

impl Harness {
    pub(crate) async fn call(
        &self,
        req: Request<Body>,
    ) -> (StatusCode, axum::http::HeaderMap, Vec<u8>) {
        let r = self.router.clone().oneshot(req).await.unwrap();
        let (parts, body) = r.into_parts();
        (
            parts.status,
            parts.headers,
            body.collect().await.unwrap().to_bytes().to_vec(),
        )
    }

    pub(crate) async fn json(
        &self,
        method: &str,
        uri: &str,
        body: Option<Value>,
        key: Option<&str>,
    ) -> (StatusCode, Value) {
        let mut b = Request::builder()
            .method(method)
            .uri(uri)
            .header(header::HOST, "gen.local:8000");
        if let Some(k) = key {
            b = b.header(header::AUTHORIZATION, format!("Bearer {k}"));
        }
        let req = match body {
            Some(v) => b
                .header(header::CONTENT_TYPE, "application/json")
                .body(Body::from(v.to_string())),
            None => b.body(Body::empty()),
        }
        .unwrap();
        let (status, headers, bytes) = self.call(req).await;
        let ct = headers
            .get(header::CONTENT_TYPE)
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_default();
        assert!(
            ct.starts_with("application/json"),
            "{method} {uri}: content type {ct:?}"
        );
        let v: Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(
            v["code"].as_u64(),
            Some(status.as_u16() as u64),
            "HTTP status == code: {v}"
        );
        (status, v)
    }

    pub(crate) async fn submit(&self, body: Value) -> (StatusCode, Value) {
        self.submit_query("", body).await
    }

    pub(crate) async fn submit_query(&self, query: &str, body: Value) -> (StatusCode, Value) {
        let uri = format!("/api/v3/{MODEL}{query}");
        self.json("POST", &uri, Some(body), Some(KEY)).await
    }

    pub(crate) async fn result(&self, id: &str) -> (StatusCode, Value) {
        let uri = format!("/api/v3/predictions/{id}/result");
        self.json("GET", &uri, None, Some(KEY)).await
    }

    pub(crate) async fn open_ticket(&self, req: Value) -> (StatusCode, Value) {
        self.json("POST", "/api/v3/media/uploads", Some(req), Some(KEY))
            .await
    }

    /// Opens an upload ticket: the path of its PUT URL.
    pub(crate) async fn ticket(&self, req: Value) -> String {
        let (s, v) = self.open_ticket(req).await;
        assert_eq!(s, StatusCode::OK, "{v}");
        v["data"]["upload"]["url"]
            .as_str()
            .unwrap()
            .replace("http://gen.local:8000", "")
    }

    pub(crate) async fn delete(&self, id: &str) -> (StatusCode, Value) {
        let uri = format!("/api/v3/predictions/{id}");
        self.json("DELETE", &uri, None, Some(KEY)).await
    }

    pub(crate) async fn get(&self, id: &str) -> Value {
        let (s, v) = self.result(id).await;
        assert_eq!(s, StatusCode::OK, "{v}");
        v["data"].clone()
    }

    pub(crate) async fn wait(&self, id: &str, statuses: &[&str]) -> Value {
        for _ in 0..1000 {
            let d = self.get(id).await;
            if statuses.contains(&d["status"].as_str().unwrap()) {
                return d;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!(
            "task {id} never reached {statuses:?}: {}",
            self.get(id).await
        );
    }
}

/// The parameters of a small text-to-video task (96x64, 9 frames, 4 steps).
pub(crate) fn text_params() -> skyreels_params::GenerationParams {
    skyreels_params::GenerationParams {
        prompt: "a cat".into(),
        negative_prompt: None,
        height: 64,
        width: 96,
        num_frames: 9,
        steps: 4,
        guidance_scale: 6.0,
        embedded_guidance_scale: 1.0,
        seed: 1,
        fps: 24.0,
        cache: skyreels_params::CacheSpec::None,
        cfg_gate: None,
        flow_shift: None,
        loras: Vec::new(),
        riflex_freq_index: 0,
    }
}

pub(crate) fn body(prompt: &str) -> Value {
    json!({"prompt": prompt, "image": png_data_uri(40, 30), "seed": 7})
}

pub(crate) fn png_bytes(w: u32, h: u32) -> Vec<u8> {
    let mut out = Vec::new();
    image::RgbImage::new(w, h)
        .write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png)
        .unwrap();
    out
}

pub(crate) async fn metrics_text(h: &Harness) -> String {
    let (_, _, text) = h
        .call(Request::get("/metrics").body(Body::empty()).unwrap())
        .await;
    String::from_utf8(text).unwrap()
}

/// A multipart upload of one file (field `file`) with `key`.
pub(crate) fn multipart_upload(
    key: &str,
    name: &str,
    content_type: &str,
    bytes: &[u8],
) -> Request<Body> {
    let boundary = "XyZ";
    let mut form = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{name}\"\r\n\
         Content-Type: {content_type}\r\n\r\n"
    )
    .into_bytes();
    form.extend_from_slice(bytes);
    form.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    Request::post("/api/v3/media/upload/binary")
        .header(header::HOST, "gen.local:8000")
        .header(header::AUTHORIZATION, format!("Bearer {key}"))
        .header(
            header::CONTENT_TYPE,
            format!("multipart/form-data; boundary={boundary}"),
        )
        .body(Body::from(form))
        .unwrap()
}

/// A server on a loopback socket (its real connection handling: limits, timeouts, keep-alive),
/// stopped by [`Listening::stop`].
pub(crate) struct Listening {
    pub(crate) addr: std::net::SocketAddr,
    stop: tokio::sync::oneshot::Sender<()>,
    done: tokio::task::JoinHandle<()>,
}

impl Listening {
    pub(crate) async fn start(server: Server) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, rx) = tokio::sync::oneshot::channel::<()>();
        let done = tokio::spawn(async move {
            server
                .run(listener, async move {
                    let _ = rx.await;
                })
                .await
                .unwrap();
        });
        Self { addr, stop, done }
    }

    /// Shuts the server down (draining as a signal would) and waits for it.
    pub(crate) async fn stop(self) {
        let _ = self.stop.send(());
        self.done.await.unwrap();
    }
}
