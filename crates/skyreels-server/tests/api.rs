//! Router tests with a fake generator: every route, status code and validation rule, auth,
//! the queue, cancellation, sync mode, webhooks, uploads and restart recovery.

use axum::body::Body;
use axum::http::{header, Request, StatusCode};
use axum::Router;
use base64::Engine;
use http_body_util::BodyExt;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use skyreels_server::generator::{
    GenerateFailure, GenerationRequest, Generator, ModelInfo, StageTimings,
};
use skyreels_server::{Server, ServerConfig};
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;
use tower::ServiceExt;

const MODEL: &str = "wavespeed-ai/SkyReels-V1";
const KEY: &str = "test-key-123";

/// Blocks generation steps while closed.
#[derive(Clone, Default)]
struct Gate(Arc<(Mutex<bool>, Condvar)>);

impl Gate {
    fn closed() -> Self {
        Self::default()
    }
    fn open(&self) {
        *self.0 .0.lock().unwrap() = true;
        self.0 .1.notify_all();
    }
    /// Whether the gate is open, after waiting up to 20 ms for it.
    fn wait_a_little(&self) -> bool {
        let open = self.0 .0.lock().unwrap();
        if *open {
            return true;
        }
        *self
            .0
             .1
            .wait_timeout(open, Duration::from_millis(20))
            .unwrap()
            .0
    }
}

struct Fake {
    gate: Gate,
    seen: Arc<Mutex<Vec<GenerationRequest>>>,
}

impl Generator for Fake {
    fn models(&self) -> Vec<ModelInfo> {
        vec![ModelInfo {
            id: MODEL.into(),
            image_to_video: true,
            height: 64,
            width: 96,
            num_frames: 9,
            num_inference_steps: 4,
            size_multiple: 16,
        }]
    }

    fn generate(
        &mut self,
        req: &GenerationRequest,
        output: &Path,
        progress: &mut dyn FnMut(usize, usize) -> bool,
    ) -> Result<StageTimings, GenerateFailure> {
        self.seen.lock().unwrap().push(req.clone());
        if req.prompt.contains("panic") {
            panic!("fake generator exploded");
        }
        if req.prompt.contains("fail") {
            return Err(GenerateFailure::Failed("fake failure".into()));
        }
        for step in 1..=req.steps {
            // while held at the gate, keep polling for cancellation as a real step loop would
            while !self.gate.wait_a_little() {
                if !progress(step - 1, req.steps) {
                    return Err(GenerateFailure::Cancelled);
                }
            }
            std::thread::sleep(Duration::from_millis(2));
            if !progress(step, req.steps) {
                return Err(GenerateFailure::Cancelled);
            }
        }
        std::fs::write(
            output,
            format!("fake mp4 {}x{} seed {}", req.width, req.height, req.seed),
        )
        .unwrap();
        Ok(vec![
            ("denoising", Duration::from_millis(40)),
            ("decoding", Duration::from_millis(2)),
        ])
    }
}

struct Harness {
    server: Option<Server>,
    router: Router,
    seen: Arc<Mutex<Vec<GenerationRequest>>>,
    dir: tempfile::TempDir,
}

fn config(dir: &Path) -> ServerConfig {
    let mut c = ServerConfig::new(dir);
    c.api_keys = vec![KEY.into()];
    c.max_queue = 3;
    c.webhook_backoff = Duration::from_millis(50);
    c.sync_timeout = Duration::from_secs(20);
    c.allowed_hosts = vec!["gen.local".into()];
    c
}

async fn start_with(
    dir: tempfile::TempDir,
    cfg: impl FnOnce(&mut ServerConfig),
    gate: Gate,
) -> Harness {
    let mut c = config(dir.path());
    cfg(&mut c);
    let seen = Arc::new(Mutex::new(vec![]));
    let (g, s) = (gate.clone(), seen.clone());
    let mut server = Server::start(
        c,
        Box::new(move || Ok(Box::new(Fake { gate: g, seen: s }) as Box<dyn Generator>)),
    )
    .unwrap();
    server.wait_loaded().await.unwrap();
    let router = server.router();
    Harness {
        server: Some(server),
        router,
        seen,
        dir,
    }
}

async fn start(cfg: impl FnOnce(&mut ServerConfig)) -> Harness {
    let gate = Gate::closed();
    gate.open();
    start_with(tempfile::tempdir().unwrap(), cfg, gate).await
}

fn png_data_uri(w: u32, h: u32) -> String {
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
    async fn call(&self, req: Request<Body>) -> (StatusCode, axum::http::HeaderMap, Vec<u8>) {
        let r = self.router.clone().oneshot(req).await.unwrap();
        let (parts, body) = r.into_parts();
        (
            parts.status,
            parts.headers,
            body.collect().await.unwrap().to_bytes().to_vec(),
        )
    }

    async fn json(
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

    async fn submit(&self, body: Value) -> (StatusCode, Value) {
        self.submit_query("", body).await
    }

    async fn submit_query(&self, query: &str, body: Value) -> (StatusCode, Value) {
        let uri = format!("/api/v3/{MODEL}{query}");
        self.json("POST", &uri, Some(body), Some(KEY)).await
    }

    async fn result(&self, id: &str) -> (StatusCode, Value) {
        let uri = format!("/api/v3/predictions/{id}/result");
        self.json("GET", &uri, None, Some(KEY)).await
    }

    async fn get(&self, id: &str) -> Value {
        let (s, v) = self.result(id).await;
        assert_eq!(s, StatusCode::OK, "{v}");
        v["data"].clone()
    }

    async fn wait(&self, id: &str, statuses: &[&str]) -> Value {
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

fn body(prompt: &str) -> Value {
    json!({"prompt": prompt, "image": png_data_uri(40, 30), "seed": 7})
}

#[tokio::test(flavor = "multi_thread")]
async fn async_task_runs_to_completion_with_the_prediction_shape() {
    let h = start(|_| {}).await;
    let (s, v) = h.submit(body("FPS-24, a cat")).await;
    assert_eq!(
        (s, v["message"].as_str()),
        (StatusCode::OK, Some("success"))
    );
    let d = &v["data"];
    let id = d["id"].as_str().unwrap();
    assert_eq!(id.len(), 32);
    assert_eq!(d["model"], MODEL);
    assert_eq!(d["seed"], 7);
    assert_eq!(
        d["urls"]["get"],
        format!("http://gen.local:8000/api/v3/predictions/{id}/result")
    );
    assert!(
        d["input"]["image"]
            .as_str()
            .unwrap()
            .contains("characters)"),
        "long data URI shortened in the echo"
    );
    assert!(d["created_at"].as_str().unwrap().ends_with('Z'));
    let d = h.wait(id, &["completed"]).await;
    assert_eq!(d["code"], 0);
    assert_eq!(d["error"], "");
    assert_eq!(d["progress"], json!({"step": 4, "total": 4}));
    assert_eq!(d["has_nsfw_contents"], json!([false]));
    assert_eq!(d["timings"]["inference"], 42);
    assert!(d["executionTime"].as_u64().is_some());
    assert!(d["started_at"].is_string() && d["completed_at"].is_string());
    let url = d["outputs"][0].as_str().unwrap();
    assert_eq!(url, format!("http://gen.local:8000/outputs/{id}.mp4"));
    // landscape image -> the model's landscape default size; the output is served with Range
    let req = h.seen.lock().unwrap()[0].clone();
    assert_eq!(
        (req.width, req.height, req.seed, req.num_frames, req.steps),
        (96, 64, 7, 9, 4)
    );
    // the image is fitted to the task's size as soon as it is decoded
    assert_eq!(req.image.as_ref().unwrap().dimensions(), (96, 64));
    let (s, hd, bytes) = h
        .call(
            Request::get(format!("/outputs/{id}.mp4"))
                .header(header::RANGE, "bytes=0-3")
                .body(Body::empty())
                .unwrap(),
        )
        .await;
    assert_eq!(s, StatusCode::PARTIAL_CONTENT);
    assert_eq!(bytes, b"fake");
    assert!(hd.get(header::CONTENT_RANGE).is_some());
    // the alias route answers the same
    let (s, v) = h
        .json("GET", &format!("/api/v3/predictions/{id}"), None, Some(KEY))
        .await;
    assert_eq!(
        (s, v["data"]["status"].as_str()),
        (StatusCode::OK, Some("completed"))
    );
    let (s, v) = h
        .json("GET", "/api/v3/predictions/0123/result", None, Some(KEY))
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{v}");
}

#[tokio::test(flavor = "multi_thread")]
async fn sizes_seeds_and_options_reach_the_generator() {
    let h = start(|_| {}).await;
    let portrait = json!({"prompt": "p", "image": png_data_uri(30, 40), "seed": -1});
    let (_, v) = h.submit(portrait).await;
    let seed = v["data"]["seed"].as_u64().unwrap();
    assert!(seed <= 2_147_483_647);
    h.wait(v["data"]["id"].as_str().unwrap(), &["completed"])
        .await;
    let fixed = json!({"prompt": "p", "image": png_data_uri(30, 40), "aspect_ratio": "16:9", "num_frames": 5,
        "num_inference_steps": 2, "guidance_scale": 1.0, "embedded_guidance_scale": 3.5, "negative_prompt": "blur",
        "fps": 12, "unknown_field": 1});
    let (_, v) = h.submit(fixed).await;
    h.wait(v["data"]["id"].as_str().unwrap(), &["completed"])
        .await;
    let sized = json!({"prompt": "p", "image": png_data_uri(30, 40), "width": 32, "height": 48});
    let (_, v) = h.submit(sized).await;
    h.wait(v["data"]["id"].as_str().unwrap(), &["completed"])
        .await;
    let seen = h.seen.lock().unwrap().clone();
    assert_eq!(
        (seen[0].width, seen[0].height, seen[0].seed),
        (64, 96, seed),
        "portrait image turns the default size"
    );
    let f = &seen[1];
    assert_eq!((f.width, f.height, f.num_frames, f.steps), (96, 64, 5, 2));
    assert_eq!(
        (f.guidance_scale, f.embedded_guidance_scale, f.fps),
        (1.0, 3.5, 12.0)
    );
    assert_eq!(f.negative_prompt.as_deref(), Some("blur"));
    assert_eq!((seen[2].width, seen[2].height), (32, 48));
}

#[tokio::test(flavor = "multi_thread")]
async fn validation_names_the_field() {
    let h = start(|_| {}).await;
    let img = png_data_uri(8, 8);
    let cases = [
        (json!({"image": img}), "prompt:"),
        (json!({"prompt": "  ", "image": img}), "prompt:"),
        (json!({"prompt": 3, "image": img}), "prompt:"),
        (json!({"prompt": "p"}), "image:"),
        (json!({"prompt": "p", "image": "ftp://x/y.png"}), "image:"),
        (json!({"prompt": "p", "image": "not a url"}), "image:"),
        (
            json!({"prompt": "p", "image": "data:text/plain;base64,aGk="}),
            "image:",
        ),
        (json!({"prompt": "p", "image": img, "seed": -2}), "seed:"),
        (
            json!({"prompt": "p", "image": img, "seed": 2147483648u64}),
            "seed:",
        ),
        (json!({"prompt": "p", "image": img, "seed": "1"}), "seed:"),
        (
            json!({"prompt": "p", "image": img, "num_frames": 8}),
            "num_frames:",
        ),
        (
            json!({"prompt": "p", "image": img, "width": 100, "height": 64}),
            "width:",
        ),
        (json!({"prompt": "p", "image": img, "width": 96}), "height:"),
        (
            json!({"prompt": "p", "image": img, "aspect_ratio": "4:3"}),
            "aspect_ratio:",
        ),
        (
            json!({"prompt": "p", "image": img, "num_inference_steps": 0}),
            "num_inference_steps:",
        ),
        (
            json!({"prompt": "p", "image": img, "guidance_scale": -1}),
            "guidance_scale:",
        ),
        (
            json!({"prompt": "p", "image": img, "enable_sync_mode": "yes"}),
            "enable_sync_mode:",
        ),
        (json!({"prompt": "p", "image": img, "fps": 0}), "fps:"),
        (json!(["not", "an", "object"]), "JSON object"),
    ];
    for (b, field) in cases {
        let (s, v) = h.submit(b.clone()).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{b}: {v}");
        assert!(v["message"].as_str().unwrap().contains(field), "{b}: {v}");
        assert!(v["data"].is_null());
    }
    // bad webhook URL
    let (s, v) = h
        .submit_query("?webhook=file:///etc/passwd", body("p"))
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    // unknown model, bad JSON, missing content type, wrong method, unknown route
    let (s, _) = h
        .json("POST", "/api/v3/someone/Else", Some(body("p")), Some(KEY))
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let raw = |ct: Option<&str>, b: &'static str| {
        let mut r = Request::post(format!("/api/v3/{MODEL}"))
            .header(header::AUTHORIZATION, format!("Bearer {KEY}"));
        if let Some(ct) = ct {
            r = r.header(header::CONTENT_TYPE, ct);
        }
        r.body(Body::from(b)).unwrap()
    };
    for (req, want) in [
        (
            raw(Some("application/json"), "{not json"),
            StatusCode::BAD_REQUEST,
        ),
        (raw(None, "{}"), StatusCode::UNSUPPORTED_MEDIA_TYPE),
        (
            raw(Some("text/plain"), "{}"),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
        ),
    ] {
        let (s, hd, bytes) = h.call(req).await;
        assert_eq!(s, want);
        assert!(hd[header::CONTENT_TYPE]
            .to_str()
            .unwrap()
            .starts_with("application/json"));
        let v: Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(v["code"], want.as_u16());
        assert!(!v["message"].as_str().unwrap().is_empty());
    }
    let (s, v) = h
        .json("PATCH", "/api/v3/predictions/abc", None, Some(KEY))
        .await;
    assert_eq!(s, StatusCode::METHOD_NOT_ALLOWED, "{v}");
    let (s, v) = h.json("GET", "/nope", None, None).await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{v}");
    assert!(v["message"].as_str().unwrap().contains("/nope"));
}

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
async fn sync_mode_completes_and_times_out_in_wavespeed_shape() {
    let h = start(|c| c.sync_timeout = Duration::from_millis(300)).await;
    let mut b = body("p");
    b["enable_sync_mode"] = json!(true);
    let (s, v) = h.submit(b.clone()).await;
    assert_eq!(
        (s, v["data"]["status"].as_str()),
        (StatusCode::OK, Some("completed")),
        "{v}"
    );
    assert_eq!(v["data"]["outputs"].as_array().unwrap().len(), 1);

    let gate = Gate::closed();
    let slow = start_with(
        tempfile::tempdir().unwrap(),
        |c| c.sync_timeout = Duration::from_millis(300),
        gate.clone(),
    )
    .await;
    let (s, v) = slow.submit(b).await;
    assert_eq!(s, StatusCode::OK);
    let d = &v["data"];
    assert_eq!(
        (d["status"].as_str(), d["code"].as_u64()),
        (Some("processing"), Some(5004)),
        "{d}"
    );
    assert!(d["error"].as_str().unwrap().contains(
        "Sync mode timed out after 0 seconds. The prediction is still processing asynchronously."
    ));
    gate.open();
    slow.wait(d["id"].as_str().unwrap(), &["completed"]).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn base64_output() {
    let h = start(|_| {}).await;
    let mut b = body("p");
    b["enable_base64_output"] = json!(true);
    b["enable_sync_mode"] = json!(true);
    let (_, v) = h.submit(b).await;
    let out = v["data"]["outputs"][0].as_str().unwrap();
    let b64 = out.strip_prefix("data:video/mp4;base64,").unwrap();
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .unwrap();
    assert!(bytes.starts_with(b"fake mp4 96x64 seed 7"));
}

#[tokio::test(flavor = "multi_thread")]
async fn queue_full_is_429_and_no_accepted_task_is_lost() {
    let gate = Gate::closed();
    let h = start_with(tempfile::tempdir().unwrap(), |_| {}, gate.clone()).await;
    let mut ids = vec![];
    // one running + max_queue (3) waiting
    let (_, v) = h.submit(body("p")).await;
    ids.push(v["data"]["id"].as_str().unwrap().to_string());
    h.wait(&ids[0], &["processing"]).await;
    for _ in 0..3 {
        let (s, v) = h.submit(body("p")).await;
        assert_eq!(s, StatusCode::OK);
        ids.push(v["data"]["id"].as_str().unwrap().to_string());
    }
    let positions: Vec<Value> = {
        let mut p = vec![];
        for id in &ids[1..] {
            p.push(h.get(id).await["queue_position"].clone());
        }
        p
    };
    assert_eq!(positions, vec![json!(0), json!(1), json!(2)]);
    let req = Request::post(format!("/api/v3/{MODEL}"))
        .header(header::AUTHORIZATION, format!("Bearer {KEY}"))
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(body("p").to_string()))
        .unwrap();
    let (s, hd, bytes) = h.call(req).await;
    assert_eq!(s, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(hd[header::RETRY_AFTER], "30");
    let v: Value = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(v["code"], 429);
    gate.open();
    for id in &ids {
        h.wait(id, &["completed"]).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn cancel_queued_and_running_delete_finished() {
    let gate = Gate::closed();
    let h = start_with(tempfile::tempdir().unwrap(), |_| {}, gate.clone()).await;
    let (_, v) = h.submit(body("p")).await;
    let running = v["data"]["id"].as_str().unwrap().to_string();
    h.wait(&running, &["processing"]).await;
    let (_, v) = h.submit(body("p")).await;
    let queued = v["data"]["id"].as_str().unwrap().to_string();
    h.wait(&queued, &["created"]).await;
    let (s, v) = h
        .json(
            "DELETE",
            &format!("/api/v3/predictions/{queued}"),
            None,
            Some(KEY),
        )
        .await;
    assert_eq!(
        (s, v["data"]["status"].as_str()),
        (StatusCode::OK, Some("cancelled")),
        "{v}"
    );
    let (s, _) = h
        .json(
            "DELETE",
            &format!("/api/v3/predictions/{running}"),
            None,
            Some(KEY),
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    gate.open();
    let d = h.wait(&running, &["cancelled", "completed"]).await;
    assert_eq!(d["status"], "cancelled", "{d}");
    assert!(d["outputs"].as_array().unwrap().is_empty());
    // a finished one is deleted with its file
    let (_, v) = h.submit(body("p")).await;
    let done = v["data"]["id"].as_str().unwrap().to_string();
    h.wait(&done, &["completed"]).await;
    let file = h.dir.path().join("videos").join(format!("{done}.mp4"));
    assert!(file.exists());
    let (s, v) = h
        .json(
            "DELETE",
            &format!("/api/v3/predictions/{done}"),
            None,
            Some(KEY),
        )
        .await;
    assert_eq!(
        (s, v["data"].clone()),
        (StatusCode::OK, json!({"id": done, "status": "deleted"}))
    );
    assert!(!file.exists());
    assert_eq!(h.get(&done).await["status"], "deleted");
    let (s, _) = h
        .json("DELETE", "/api/v3/predictions/ffff", None, Some(KEY))
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
}

#[tokio::test(flavor = "multi_thread")]
async fn failures_are_task_level_and_the_server_keeps_serving() {
    let h = start(|_| {}).await;
    let (s, v) = h.submit(body("please fail")).await;
    assert_eq!(s, StatusCode::OK);
    let d = h.wait(v["data"]["id"].as_str().unwrap(), &["failed"]).await;
    assert_eq!(
        (d["code"].as_u64(), d["error"].as_str()),
        (Some(1403), Some("fake failure"))
    );
    let (_, v) = h.submit(body("panic now")).await;
    let d = h.wait(v["data"]["id"].as_str().unwrap(), &["failed"]).await;
    assert_eq!(d["code"], 5000);
    assert!(
        d["error"]
            .as_str()
            .unwrap()
            .contains("fake generator exploded"),
        "{d}"
    );
    // undecodable image data and a private URL: media failures (1402)
    let (_, v) = h
        .submit(json!({"prompt": "p", "image": "data:image/png;base64,aGVsbG8gd29ybGQ="}))
        .await;
    let d = h.wait(v["data"]["id"].as_str().unwrap(), &["failed"]).await;
    assert_eq!(d["code"], 1402, "{d}");
    let (_, v) = h
        .submit(json!({"prompt": "p", "image": "http://127.0.0.1:1/cat.png"}))
        .await;
    let d = h.wait(v["data"]["id"].as_str().unwrap(), &["failed"]).await;
    assert_eq!(d["code"], 1402);
    assert!(
        d["error"]
            .as_str()
            .unwrap()
            .contains("--allow-private-image-urls"),
        "{d}"
    );
    // still serving
    let (_, v) = h.submit(body("fine")).await;
    h.wait(v["data"]["id"].as_str().unwrap(), &["completed"])
        .await;
}

/// HMAC-SHA256 written out from its definition (RFC 2104), independent of the hmac crate.
fn hmac_sha256(key: &[u8], msg: &[u8]) -> String {
    let mut k = [0u8; 64];
    k[..key.len()].copy_from_slice(key);
    let inner: Vec<u8> = k
        .iter()
        .map(|b| b ^ 0x36)
        .chain(msg.iter().copied())
        .collect();
    let inner_hash = Sha256::digest(&inner);
    let outer: Vec<u8> = k
        .iter()
        .map(|b| b ^ 0x5c)
        .chain(inner_hash.iter().copied())
        .collect();
    Sha256::digest(&outer)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn webhooks_are_signed_and_retried() {
    // a receiver that fails the first two deliveries
    let received: Arc<Mutex<Vec<(axum::http::HeaderMap, String)>>> = Arc::default();
    let r2 = received.clone();
    let app = Router::new().route(
        "/hook",
        axum::routing::post(move |headers: axum::http::HeaderMap, body: String| {
            let r = r2.clone();
            async move {
                let mut r = r.lock().unwrap();
                r.push((headers, body));
                if r.len() <= 2 {
                    StatusCode::INTERNAL_SERVER_ERROR
                } else {
                    StatusCode::OK
                }
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    let h = start(|c| {
        c.allow_private_urls = true;
        c.webhook_secret = Some("whsec_testsecret".into());
    })
    .await;
    let (s, v) = h
        .submit_query(&format!("?webhook=http://{addr}/hook"), body("p"))
        .await;
    assert_eq!(s, StatusCode::OK);
    let id = v["data"]["id"].as_str().unwrap().to_string();
    h.wait(&id, &["completed"]).await;
    for _ in 0..200 {
        if received.lock().unwrap().len() >= 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let got = received.lock().unwrap().clone();
    assert_eq!(got.len(), 3, "two failures, then success; no more attempts");
    let (headers, raw) = &got[2];
    let payload: Value = serde_json::from_str(raw).unwrap();
    assert_eq!(
        (payload["id"].as_str(), payload["status"].as_str()),
        (Some(id.as_str()), Some("completed"))
    );
    assert!(
        payload.get("code").is_some() && payload.get("data").is_none() || payload["code"] == 0,
        "bare prediction object"
    );
    let wid = headers["webhook-id"].to_str().unwrap();
    let ts = headers["webhook-timestamp"].to_str().unwrap();
    let sig = headers["webhook-signature"].to_str().unwrap();
    assert_eq!(
        sig,
        format!(
            "v3,{}",
            hmac_sha256(b"testsecret", format!("{wid}.{ts}.{raw}").as_bytes())
        )
    );
    assert_eq!(
        got[0].0["webhook-id"], got[2].0["webhook-id"],
        "the same event keeps its id across retries"
    );
    assert_eq!(headers[header::CONTENT_TYPE], "application/json");
    // a dead receiver costs nothing: the task is done and the server still answers
    let (_, v) = h
        .submit_query("?webhook=http://127.0.0.1:1/dead", body("p"))
        .await;
    h.wait(v["data"]["id"].as_str().unwrap(), &["completed"])
        .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn upload_flows_and_submitting_an_upload() {
    let h = start(|_| {}).await;
    let png = {
        let mut out = Vec::new();
        image::RgbImage::new(20, 10)
            .write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png)
            .unwrap();
        out
    };
    // ticket + PUT (no Authorization on the PUT)
    let (s, v) = h
        .json("POST", "/api/v3/media/uploads", Some(json!({"filename": "../cat pic.png", "size": png.len(), "content_type": "image/png"})), Some(KEY))
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let d = &v["data"];
    assert_eq!(
        (d["type"].as_str(), d["filename"].as_str()),
        (Some("image"), Some("cat_pic.png"))
    );
    assert_eq!(d["upload"]["method"], "PUT");
    assert_eq!(d["upload"]["headers"]["Content-Type"], "image/png");
    let put_url = d["upload"]["url"]
        .as_str()
        .unwrap()
        .strip_prefix("http://gen.local:8000")
        .unwrap()
        .to_string();
    let put = |url: &str, bytes: &[u8]| {
        Request::put(url)
            .header(header::CONTENT_TYPE, "image/png")
            .body(Body::from(bytes.to_vec()))
            .unwrap()
    };
    let (s, _, b) = h.call(put(&put_url, &png[..10])).await;
    assert_eq!(
        s,
        StatusCode::BAD_REQUEST,
        "{}",
        String::from_utf8_lossy(&b)
    );
    let (s, _, b) = h.call(put(&put_url, &png)).await;
    assert_eq!(
        s,
        StatusCode::NOT_FOUND,
        "single use: {}",
        String::from_utf8_lossy(&b)
    );
    // a fresh ticket, right size
    let (_, v) = h
        .json(
            "POST",
            "/api/v3/media/uploads",
            Some(json!({"filename": "cat.png", "size": png.len()})),
            Some(KEY),
        )
        .await;
    let put_url = v["data"]["upload"]["url"]
        .as_str()
        .unwrap()
        .strip_prefix("http://gen.local:8000")
        .unwrap()
        .to_string();
    let download = v["data"]["download_url"].as_str().unwrap().to_string();
    let (s, _, b) = h.call(put(&put_url, &png)).await;
    assert_eq!(s, StatusCode::OK, "{}", String::from_utf8_lossy(&b));
    let (s, _, b) = h.call(put(&put_url, &png)).await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{}", String::from_utf8_lossy(&b));
    let path = download.strip_prefix("http://gen.local:8000").unwrap();
    let (s, hd, bytes) = h
        .call(Request::get(path).body(Body::empty()).unwrap())
        .await;
    assert_eq!((s, bytes.as_slice()), (StatusCode::OK, png.as_slice()));
    assert_eq!(hd[header::CONTENT_TYPE], "image/png");
    // missing fields
    let (s, v) = h
        .json(
            "POST",
            "/api/v3/media/uploads",
            Some(json!({"size": 3})),
            Some(KEY),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert!(v["message"].as_str().unwrap().starts_with("filename:"));
    let (s, _) = h
        .json(
            "POST",
            "/api/v3/media/uploads",
            Some(json!({"filename": "a.png"})),
            Some(KEY),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    // submitting the uploaded URL reads the file locally (a loopback URL would otherwise be refused)
    let (_, v) = h.submit(json!({"prompt": "p", "image": download})).await;
    h.wait(v["data"]["id"].as_str().unwrap(), &["completed"])
        .await;
    assert_eq!(
        h.seen.lock().unwrap()[0]
            .image
            .as_ref()
            .unwrap()
            .dimensions(),
        (96, 64)
    );

    // multipart binary upload
    let boundary = "XyZ";
    let mut form = format!("--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"dog.png\"\r\nContent-Type: image/png\r\n\r\n").into_bytes();
    form.extend_from_slice(&png);
    form.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    let req = Request::post("/api/v3/media/upload/binary")
        .header(header::HOST, "gen.local:8000")
        .header(header::AUTHORIZATION, format!("Bearer {KEY}"))
        .header(
            header::CONTENT_TYPE,
            format!("multipart/form-data; boundary={boundary}"),
        )
        .body(Body::from(form))
        .unwrap();
    let (s, _, bytes) = h.call(req).await;
    let v: Value = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(
        (v["data"]["filename"].as_str(), v["data"]["size"].as_u64()),
        (Some("dog.png"), Some(png.len() as u64))
    );
    let (_, v) = h
        .submit(json!({"prompt": "p", "image": v["data"]["download_url"]}))
        .await;
    h.wait(v["data"]["id"].as_str().unwrap(), &["completed"])
        .await;
    let req = Request::post("/api/v3/media/upload/binary")
        .header(header::AUTHORIZATION, format!("Bearer {KEY}"))
        .header(
            header::CONTENT_TYPE,
            format!("multipart/form-data; boundary={boundary}"),
        )
        .body(Body::from(format!("--{boundary}--\r\n")))
        .unwrap();
    let (s, _, _) = h.call(req).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
}

#[tokio::test(flavor = "multi_thread")]
async fn restart_keeps_finished_tasks_and_fails_unfinished_ones() {
    let gate = Gate::closed();
    let mut h = start_with(
        tempfile::tempdir().unwrap(),
        |c| c.shutdown_grace = Duration::from_millis(100),
        gate.clone(),
    )
    .await;
    // finish one first
    gate.open();
    let (_, v) = h.submit(body("p")).await;
    let done = v["data"]["id"].as_str().unwrap().to_string();
    h.wait(&done, &["completed"]).await;
    let gate2 = Gate::closed();
    // a second server would be the restart; simulate the crash of the first by leaking its
    // worker mid-task: a record on disk still says processing/created
    let dir = tempfile::tempdir().unwrap();
    let mut first = start_with(dir, |_| {}, gate2.clone()).await;
    let (_, v) = first.submit(body("p")).await;
    let running = v["data"]["id"].as_str().unwrap().to_string();
    first.wait(&running, &["processing"]).await;
    let (_, v) = first.submit(body("p")).await;
    let queued = v["data"]["id"].as_str().unwrap().to_string();
    first.wait(&queued, &["created"]).await;
    // copy the on-disk state as it is now (what a crash would leave), with the finished task
    first.server.as_ref().unwrap().state.store.flushed().await;
    h.server.as_ref().unwrap().state.store.flushed().await;
    let crash = tempfile::tempdir().unwrap();
    copy_dir(first.dir.path(), crash.path());
    copy_dir(h.dir.path(), crash.path());
    gate2.open();
    first.server.take().unwrap().drain().await;
    h.server.take().unwrap().drain().await;

    let again = start_with(crash, |_| {}, Gate::closed()).await;
    let d = again.get(&done).await;
    assert_eq!(d["status"], "completed");
    let (s, _, bytes) = again
        .call(
            Request::get(format!("/outputs/{done}.mp4"))
                .body(Body::empty())
                .unwrap(),
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    assert!(bytes.starts_with(b"fake mp4"));
    for id in [&running, &queued] {
        let d = again.get(id).await;
        assert_eq!(
            (d["status"].as_str(), d["code"].as_u64()),
            (Some("failed"), Some(5003)),
            "{d}"
        );
    }
}

fn copy_dir(from: &Path, to: &Path) {
    for e in std::fs::read_dir(from).unwrap().flatten() {
        let p = e.path();
        let t = to.join(e.file_name());
        if p.is_dir() {
            std::fs::create_dir_all(&t).unwrap();
            copy_dir(&p, &t);
        } else if p.file_name().unwrap() != "webhook_secret" || !t.exists() {
            std::fs::copy(&p, &t).unwrap();
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn draining_refuses_new_work_and_fails_queued_tasks() {
    let gate = Gate::closed();
    let mut h = start_with(
        tempfile::tempdir().unwrap(),
        |c| c.shutdown_grace = Duration::from_millis(200),
        gate,
    )
    .await;
    let (_, v) = h.submit(body("p")).await;
    let running = v["data"]["id"].as_str().unwrap().to_string();
    h.wait(&running, &["processing"]).await;
    let (_, v) = h.submit(body("p")).await;
    let queued = v["data"]["id"].as_str().unwrap().to_string();
    // the gate never opens: the running task is cancelled after the grace period
    h.server.take().unwrap().drain().await;
    assert_eq!(h.get(&running).await["status"], "cancelled");
    let d = h.get(&queued).await;
    assert_eq!(
        (d["status"].as_str(), d["code"].as_u64()),
        (Some("failed"), Some(5003))
    );
    let (s, _) = h.submit(body("p")).await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE);
    let (s, _) = h.json("GET", "/ready", None, None).await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE);
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

#[tokio::test(flavor = "multi_thread")]
async fn retention_deletes_finished_tasks_with_their_files() {
    let h = start(|c| c.retention = Some(Duration::from_millis(200))).await;
    let (_, v) = h.submit(body("p")).await;
    let id = v["data"]["id"].as_str().unwrap().to_string();
    h.wait(&id, &["completed"]).await;
    let file = h.dir.path().join("videos").join(format!("{id}.mp4"));
    let record = h.dir.path().join("jobs").join(format!("{id}.json"));
    assert!(file.exists() && record.exists());
    // the sweeper runs every second at the shortest
    for _ in 0..300 {
        if !file.exists() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(!file.exists() && !record.exists());
    assert_eq!(h.result(&id).await.0, StatusCode::NOT_FOUND);
}
