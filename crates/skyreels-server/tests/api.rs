//! Router tests with a fake generator: every route, status code and validation rule, auth,
//! the queue, cancellation, sync mode, webhooks, uploads and restart recovery.

use axum::body::Body;
use axum::http::{header, Request, StatusCode};
use axum::Router;
use base64::Engine;
use http_body_util::BodyExt;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use skyreels_params::{CacheSpec, TokenLayout, Ulysses};
use skyreels_server::cluster::{ClusterConfig, OutputStore};
use skyreels_server::generator::{
    GenerateFailure, Generated, GenerationRequest, Generator, ModelInfo,
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
    /// The Ulysses layout the fake's model reports (`--parallel ulysses=N`).
    ulysses: Option<Ulysses>,
}

impl Generator for Fake {
    fn models(&self) -> Vec<ModelInfo> {
        vec![ModelInfo {
            id: MODEL.into(),
            image_to_video: true,
            defaults: skyreels_params::GenerationDefaults {
                height: 64,
                width: 96,
                num_frames: 9,
                num_inference_steps: 4,
                negative_prompt: None,
            },
            size_multiple: 16,
            // SkyReels' default clip, 960x544x97
            max_pixel_frames: 50_657_280,
            ulysses: self.ulysses,
        }]
    }

    fn generate(
        &mut self,
        req: &GenerationRequest,
        output: &Path,
        progress: &mut dyn FnMut(usize, usize) -> bool,
    ) -> Result<Generated, GenerateFailure> {
        self.seen.lock().unwrap().push(req.clone());
        if req.prompt.contains("panic") {
            panic!("fake generator exploded");
        }
        if req.prompt.contains("fail") {
            return Err(GenerateFailure::Failed("fake failure".into()));
        }
        // "stubborn": a generator that never looks at the cancel answer (a last step, a decode)
        let obeys = !req.prompt.contains("stubborn");
        for step in 1..=req.steps {
            // while held at the gate, keep polling for cancellation as a real step loop would
            while !self.gate.wait_a_little() {
                if !progress(step - 1, req.steps) && obeys {
                    return Err(GenerateFailure::Cancelled);
                }
            }
            std::thread::sleep(Duration::from_millis(2));
            if !progress(step, req.steps) && obeys {
                return Err(GenerateFailure::Cancelled);
            }
        }
        std::fs::write(
            output,
            format!("fake mp4 {}x{} seed {}", req.width, req.height, req.seed),
        )
        .unwrap();
        // as a cache would: with one, the first step computes and the others come from it
        let cached = if req.cache == CacheSpec::None {
            0
        } else {
            req.steps as u64 - 1
        };
        Ok(Generated {
            stages: vec![
                ("denoising", Duration::from_millis(40)),
                ("decoding", Duration::from_millis(2)),
            ],
            counts: vec![
                ("forwards_computed", req.steps as u64 - cached),
                ("forwards_cached", cached),
            ],
        })
    }
}

struct Harness {
    server: Option<Server>,
    router: Router,
    seen: Arc<Mutex<Vec<GenerationRequest>>>,
    dir: tempfile::TempDir,
    /// The Redis of a Redis-mode server (stopped with the harness).
    redis: Option<RedisServer>,
}

/// A real `redis-server` (Debian's package; `scripts/test.sh` installs it) on a free loopback
/// port in a temporary folder, stopped on drop.
struct RedisServer {
    child: std::process::Child,
    url: String,
    _dir: tempfile::TempDir,
}

impl RedisServer {
    fn start() -> Self {
        Self::start_with(false)
    }

    /// `tls`: only a TLS port, with a certificate for 127.0.0.1 signed by a test authority
    /// (`ca.crt` in its folder), made with the openssl command line.
    fn start_with(tls: bool) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut cmd = std::process::Command::new("redis-server");
        cmd.args(["--bind", "127.0.0.1", "--save", ""])
            .arg("--dir")
            .arg(dir.path())
            .stdout(std::process::Stdio::null());
        if tls {
            make_test_certificates(dir.path());
            let f = |name: &str| dir.path().join(name);
            cmd.args(["--port", "0", "--tls-port", &port.to_string()])
                .arg("--tls-cert-file")
                .arg(f("server.crt"))
                .arg("--tls-key-file")
                .arg(f("server.key"))
                .arg("--tls-ca-cert-file")
                .arg(f("ca.crt"))
                .args(["--tls-auth-clients", "no"]);
        } else {
            cmd.args(["--port", &port.to_string()]);
        }
        let child = cmd
            .spawn()
            .expect("redis-server not found: install Debian's redis-server (scripts/test.sh does)");
        // owned (and so stopped) from here on, whatever happens next
        let scheme = if tls { "rediss" } else { "redis" };
        let server = Self {
            child,
            url: format!("{scheme}://127.0.0.1:{port}/0"),
            _dir: dir,
        };
        for _ in 0..200 {
            if let Ok(mut c) = server.client().get_connection() {
                if redis::cmd("PING").query::<String>(&mut c).is_ok() {
                    return server;
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("redis-server did not answer on port {port}");
    }

    fn ca(&self) -> std::path::PathBuf {
        self._dir.path().join("ca.crt")
    }

    fn client(&self) -> redis::Client {
        if self.url.starts_with("rediss:") {
            let certs = redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(std::fs::read(self.ca()).unwrap()),
            };
            redis::Client::build_with_tls(self.url.as_str(), certs).unwrap()
        } else {
            redis::Client::open(self.url.as_str()).unwrap()
        }
    }

    fn conn(&self) -> redis::Connection {
        self.client().get_connection().unwrap()
    }

    /// Sends a signal to the server process (STOP: it hangs with its sockets open).
    fn signal(&self, sig: &str) {
        let ok = std::process::Command::new("kill")
            .args([&format!("-{sig}"), &self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{sig}");
    }
}

/// A test certificate authority and a certificate for 127.0.0.1 signed by it, in `dir`.
fn make_test_certificates(dir: &Path) {
    let openssl = |args: &[&str]| {
        let out = std::process::Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("the openssl command line");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-days",
        "2",
        "-subj",
        "/CN=skyreels test CA",
    ]);
    openssl(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=127.0.0.1",
    ]);
    std::fs::write(dir.join("san.ext"), "subjectAltName=IP:127.0.0.1\n").unwrap();
    openssl(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.crt",
        "-days",
        "2",
        "-extfile",
        "san.ext",
    ]);
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
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
    start_workers_with(dir, cfg, gate, 1).await
}

/// A server with `workers` fake generators (one per "device") sharing `gate` and `seen`.
async fn start_workers_with(
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
            Box::new(move || {
                Ok(Box::new(Fake {
                    gate: g,
                    seen: s,
                    ulysses: None,
                }) as Box<dyn Generator>)
            }) as skyreels_server::generator::GeneratorLoader
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

/// A Redis-mode server (its own Redis) with one fake worker in the process.
async fn start_redis_with(
    cfg: impl FnOnce(&mut ServerConfig),
    gate: Gate,
    output_store: OutputStore,
) -> Harness {
    start_on_redis(RedisServer::start(), cfg, gate, output_store).await
}

/// [`start_redis_with`] on the given Redis.
async fn start_on_redis(
    redis: RedisServer,
    cfg: impl FnOnce(&mut ServerConfig),
    gate: Gate,
    output_store: OutputStore,
) -> Harness {
    let url = redis.url.clone();
    let ca = url.starts_with("rediss:").then(|| redis.ca());
    let mut h = start_with(
        tempfile::tempdir().unwrap(),
        |c| {
            c.redis = Some(ClusterConfig {
                output_store,
                ca_cert: ca,
                ..ClusterConfig::new(url)
            });
            cfg(c)
        },
        gate,
    )
    .await;
    // the worker announces its model on its first connection
    for _ in 0..200 {
        let (s, _) = h.json("GET", "/ready", None, None).await;
        if s == StatusCode::OK {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    h.redis = Some(redis);
    h
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

    async fn open_ticket(&self, req: Value) -> (StatusCode, Value) {
        self.json("POST", "/api/v3/media/uploads", Some(req), Some(KEY))
            .await
    }

    /// Opens an upload ticket: the path of its PUT URL.
    async fn ticket(&self, req: Value) -> String {
        let (s, v) = self.open_ticket(req).await;
        assert_eq!(s, StatusCode::OK, "{v}");
        v["data"]["upload"]["url"]
            .as_str()
            .unwrap()
            .replace("http://gen.local:8000", "")
    }

    async fn delete(&self, id: &str) -> (StatusCode, Value) {
        let uri = format!("/api/v3/predictions/{id}");
        self.json("DELETE", &uri, None, Some(KEY)).await
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
async fn step_cache_comes_from_the_submit_or_the_server_default() {
    let h = start(|c| c.cache = CacheSpec::TeaCache(0.1)).await;
    let with = |cache: Value| {
        let mut b = body("FPS-24, a cached cat");
        b["cache"] = cache;
        b
    };
    let cases = [
        (
            body("FPS-24, the server's cache"),
            CacheSpec::TeaCache(0.1),
            3,
        ),
        (
            with(json!("first-block:0.05")),
            CacheSpec::FirstBlock(0.05),
            3,
        ),
        (with(json!("none")), CacheSpec::None, 0),
    ];
    for (i, (b, want, cached)) in cases.into_iter().enumerate() {
        let (s, v) = h.submit(b.clone()).await;
        assert_eq!(s, StatusCode::OK, "{v}");
        let d = h
            .wait(v["data"]["id"].as_str().unwrap(), &["completed"])
            .await;
        assert_eq!(h.seen.lock().unwrap()[i].cache, want, "{b}");
        assert_eq!(
            d["input"]["cache"],
            b.get("cache").cloned().unwrap_or(Value::Null)
        );
        assert_eq!(d["timings"]["forwards_cached"], cached, "{d}");
        assert_eq!(d["timings"]["forwards_computed"], 4 - cached, "{d}");
        assert_eq!(d["timings"]["inference"], 42, "{d}");
    }
    for bad in [
        json!("fast"),
        json!("first-block:0"),
        json!("teacache:"),
        json!(0.1),
    ] {
        let (s, v) = h.submit(with(bad.clone())).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{bad}: {v}");
        let m = v["message"].as_str().unwrap();
        assert!(
            m.contains("cache") && m.contains("first-block:THRESHOLD"),
            "{bad}: {m}"
        );
    }
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
    // counts ride along in timings, outside the inference sum
    assert_eq!(d["timings"]["forwards_computed"], 4);
    assert_eq!(d["timings"]["forwards_cached"], 0);
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

/// What WaveSpeed's video clients send (the MCP server's generate_video: size, duration,
/// flow_shift, loras [], enable_safety_checker) is honoured: the generator gets the size, the
/// 4k+1 frames nearest to duration x fps and the shift; the prediction echoes the request and
/// shows the frames used.
#[tokio::test(flavor = "multi_thread")]
async fn wavespeed_video_fields_map_onto_the_task() {
    let h = start(|_| {}).await;
    let img = png_data_uri(40, 30);
    let mcp = json!({"prompt": "FPS-24, a cat", "image": img, "negative_prompt": "", "loras": [],
        "size": "64*48", "num_inference_steps": 2, "duration": 5, "guidance_scale": 5, "flow_shift": 3,
        "seed": -1, "enable_safety_checker": true});
    let (s, v) = h.submit(mcp).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let d = h
        .wait(v["data"]["id"].as_str().unwrap(), &["completed"])
        .await;
    let input = &d["input"];
    assert_eq!(
        (
            &input["size"],
            &input["loras"],
            &input["enable_safety_checker"]
        ),
        (&json!("64*48"), &json!([]), &json!(true)),
        "{d}"
    );
    assert_eq!(
        (input["duration"].as_f64(), input["flow_shift"].as_f64()),
        (Some(5.0), Some(3.0)),
        "{d}"
    );
    // what was asked is echoed; the frames used are the record's
    assert!(input.get("num_frames").is_none(), "{d}");
    assert_eq!(d["num_frames"], 121, "{d}");
    let cases = [
        // (body fields, (width, height, frames, flow_shift))
        (json!({"size": "32x16"}), (32, 16, 9, None)),
        (
            json!({"size": "32*48", "width": 32, "height": 48}),
            (32, 48, 9, None),
        ),
        (json!({"size": "32*48", "height": 48}), (32, 48, 9, None)),
        (json!({"duration": 0.3}), (96, 64, 9, None)), // 7.2 -> 9
        (json!({"duration": 0.3, "fps": 12}), (96, 64, 5, None)), // 3.6 -> 5
        (json!({"duration": 5.125}), (96, 64, 125, None)), // 123: the tie goes up
        (json!({"duration": 0.125}), (96, 64, 5, None)), // 3: the tie goes up
        (json!({"duration": 0.01}), (96, 64, 1, None)), // 0.24 -> the first frame
        (
            json!({"duration": 10, "num_frames": 241}),
            (96, 64, 241, None),
        ),
        (json!({"flow_shift": 20}), (96, 64, 9, Some(20.0))),
        (json!({"flow_shift": 0.5}), (96, 64, 9, Some(0.5))),
        (
            json!({"loras": [], "enable_safety_checker": false}),
            (96, 64, 9, None),
        ),
    ];
    for (i, (fields, want)) in cases.iter().enumerate() {
        let mut b = body("p");
        b.as_object_mut()
            .unwrap()
            .extend(fields.as_object().unwrap().clone());
        let (s, v) = h.submit(b).await;
        assert_eq!(s, StatusCode::OK, "{fields}: {v}");
        let d = h
            .wait(v["data"]["id"].as_str().unwrap(), &["completed"])
            .await;
        let r = h.seen.lock().unwrap()[i + 1].clone();
        assert_eq!(
            (r.width, r.height, r.num_frames, r.flow_shift),
            *want,
            "{fields}"
        );
        assert_eq!(d["num_frames"], want.2, "{fields}: {d}");
    }
    let first = h.seen.lock().unwrap()[0].clone();
    assert_eq!(
        (first.width, first.height, first.num_frames, first.steps),
        (64, 48, 121, 2)
    );
    assert_eq!((first.flow_shift, first.guidance_scale), (Some(3.0), 5.0));
    assert_eq!(first.image.as_ref().unwrap().dimensions(), (64, 48));
}

/// Each rule of the WaveSpeed fields, with the whole message: a field's own rule, and a
/// conflict names both fields.
#[tokio::test(flavor = "multi_thread")]
async fn wavespeed_video_fields_are_checked() {
    let h = start(|c| c.max_work = 1.0).await;
    let cases = [
        (
            json!({"size": "100*64"}),
            "size: the width must be a multiple of 16, got 100",
        ),
        (
            json!({"size": "96*8"}),
            "size: the height must be an integer from 16 to 4096",
        ),
        (
            json!({"size": "4112*64"}),
            "size: the width must be an integer from 16 to 4096",
        ),
        (
            json!({"size": "96-64"}),
            "size: must be \"WIDTH*HEIGHT\" in pixels (e.g. \"832*480\"), got \"96-64\"",
        ),
        (
            json!({"size": "96*"}),
            "size: must be \"WIDTH*HEIGHT\" in pixels (e.g. \"832*480\"), got \"96*\"",
        ),
        (
            json!({"size": "+96*64"}),
            "size: must be \"WIDTH*HEIGHT\" in pixels (e.g. \"832*480\"), got \"+96*64\"",
        ),
        (
            json!({"size": "99999999999999999999999*64"}),
            "size: must be \"WIDTH*HEIGHT\" in pixels (e.g. \"832*480\"), got \"99999999999999999999999*64\"",
        ),
        (
            json!({"size": 96}),
            "size: invalid type: integer `96`, expected a string \"WIDTH*HEIGHT\" (e.g. \"832*480\")",
        ),
        (
            json!({"size": "96*64", "width": 128, "height": 64}),
            "size: \"96*64\" has width 96, but width is 128: give size or width and height, or the same values",
        ),
        (
            json!({"size": "96*64", "height": 48}),
            "size: \"96*64\" has height 64, but height is 48: give size or width and height, or the same values",
        ),
        (
            json!({"duration": 0}),
            "duration: must be a number above 0 and at most 257, got 0",
        ),
        (
            json!({"duration": -5}),
            "duration: must be a number above 0 and at most 257, got -5",
        ),
        (
            json!({"duration": 300}),
            "duration: must be a number above 0 and at most 257, got 300",
        ),
        (
            json!({"duration": "5"}),
            "duration: invalid type: string \"5\", expected a number above 0 and at most 257",
        ),
        (
            json!({"duration": 20}),
            "duration: 20 s at 24 fps is 481 frames; frames must be an integer from 1 to 257",
        ),
        (
            json!({"duration": 5, "fps": 60}),
            "duration: 5 s at 60 fps is 301 frames; frames must be an integer from 1 to 257",
        ),
        (
            json!({"duration": 5, "num_frames": 97}),
            "duration: 5 s at 24 fps is 121 frames, but num_frames is 97: give duration or num_frames, or agreeing values",
        ),
        (
            json!({"flow_shift": 0}),
            "flow_shift: must be a number above 0 and at most 20, got 0",
        ),
        (
            json!({"flow_shift": 20.5}),
            "flow_shift: must be a number above 0 and at most 20, got 20.5",
        ),
        (
            json!({"flow_shift": -3}),
            "flow_shift: must be a number above 0 and at most 20, got -3",
        ),
        (
            json!({"flow_shift": "3"}),
            "flow_shift: invalid type: string \"3\", expected a number above 0 and at most 20",
        ),
        (
            json!({"loras": [{"path": "Remade-AI/Deflate", "scale": 1.0}]}),
            "loras: LoRAs are not supported yet: send an empty list or leave loras out",
        ),
        (
            json!({"loras": "Remade-AI/Deflate"}),
            "loras: invalid type: string \"Remade-AI/Deflate\", expected a list (empty: LoRAs are not supported yet)",
        ),
        (
            json!({"enable_safety_checker": "true"}),
            "enable_safety_checker: invalid type: string \"true\", expected true or false",
        ),
        // the cost limit counts the frames duration makes (96 x 64 x 121 x 4 = 3.0 million)
        (
            json!({"size": "96*64", "duration": 5}),
            "num_inference_steps: the task is too large: 96x64 pixels x 121 frames x 4 steps is 3 million; this server's limit (--max-work) is 1 million",
        ),
    ];
    for (fields, want) in cases {
        let mut b = body("p");
        b.as_object_mut()
            .unwrap()
            .extend(fields.as_object().unwrap().clone());
        let (s, v) = h.submit(b).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{fields}: {v}");
        assert_eq!(v["message"], want, "{fields}");
        assert!(v["data"].is_null());
    }
    assert!(h.seen.lock().unwrap().is_empty());
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
async fn workers_on_several_devices_share_one_queue() {
    let gate = Gate::closed();
    let h = start_workers_with(tempfile::tempdir().unwrap(), |_| {}, gate.clone(), 2).await;
    let mut ids = vec![];
    for _ in 0..3 {
        let (s, v) = h.submit(body("p")).await;
        assert_eq!(s, StatusCode::OK, "{v}");
        ids.push(v["data"]["id"].as_str().unwrap().to_string());
    }
    // two workers: the first two tasks run at once, the third waits at the head of the queue
    h.wait(&ids[0], &["processing"]).await;
    h.wait(&ids[1], &["processing"]).await;
    let third = h.get(&ids[2]).await;
    assert_eq!(
        (third["status"].as_str(), third["queue_position"].as_u64()),
        (Some("created"), Some(0)),
        "{third}"
    );
    // a cancel reaches the task on whichever worker runs it
    let (s, _) = h.delete(&ids[1]).await;
    assert_eq!(s, StatusCode::OK);
    let d = h.wait(&ids[1], &["cancelled", "completed"]).await;
    assert_eq!(d["status"], "cancelled", "{d}");
    // the freed worker takes the third task while the gate still holds the first
    h.wait(&ids[2], &["processing"]).await;
    gate.open();
    for id in [&ids[0], &ids[2]] {
        h.wait(id, &["completed"]).await;
    }
    assert_eq!(h.seen.lock().unwrap().len(), 3);
    let req = Request::get("/metrics")
        .header(header::AUTHORIZATION, format!("Bearer {KEY}"))
        .body(Body::empty())
        .unwrap();
    let (_, _, text) = h.call(req).await;
    let text = String::from_utf8(text).unwrap();
    assert!(text.contains("skyreels_workers 2"), "{text}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_worker_that_cannot_load_fails_the_start_and_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let ok: skyreels_server::generator::GeneratorLoader = Box::new(|| {
        Ok(Box::new(Fake {
            gate: Gate::default(),
            seen: Arc::default(),
            ulysses: None,
        }) as Box<dyn Generator>)
    });
    let bad: skyreels_server::generator::GeneratorLoader =
        Box::new(|| Err("cannot use CUDA device 1".into()));
    let mut server = Server::start_workers(config(dir.path()), vec![ok, bad]).unwrap();
    let e = server.wait_loaded().await.unwrap_err().to_string();
    assert!(e.contains("worker 1: cannot use CUDA device 1"), "{e}");
    server.drain().await;
    let e = Server::start_workers(config(dir.path()), vec![])
        .err()
        .unwrap();
    assert!(e.to_string().contains("no device"), "{e}");
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
    let (s, v) = h.delete(&queued).await;
    assert_eq!(
        (s, v["data"]["status"].as_str()),
        (StatusCode::OK, Some("cancelled")),
        "{v}"
    );
    let (s, _) = h.delete(&running).await;
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
    let (s, v) = h.delete(&done).await;
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
        .open_ticket(
            json!({"filename": "../cat pic.png", "size": png.len(), "content_type": "image/png"}),
        )
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
        .open_ticket(json!({"filename": "cat.png", "size": png.len()}))
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
    let (s, v) = h.open_ticket(json!({"size": 3})).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert!(v["message"].as_str().unwrap().starts_with("filename:"));
    let (s, _) = h.open_ticket(json!({"filename": "a.png"})).await;
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
    first.server.as_ref().unwrap().state.jobs.flushed().await;
    h.server.as_ref().unwrap().state.jobs.flushed().await;
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

// ---- hardening: each test reproduces one finding of the server review (issue 14) ----

/// A body that counts how often it is read and would send `chunks` MiB.
struct CountingBody {
    polls: Arc<std::sync::atomic::AtomicUsize>,
    chunks: usize,
}

impl http_body::Body for CountingBody {
    type Data = axum::body::Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        self.polls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        if self.chunks == 0 {
            return std::task::Poll::Ready(None);
        }
        self.chunks -= 1;
        std::task::Poll::Ready(Some(Ok(http_body::Frame::data(vec![0u8; 1 << 20].into()))))
    }
}

fn counting(chunks: usize) -> (Body, Arc<std::sync::atomic::AtomicUsize>) {
    let polls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let body = Body::new(CountingBody {
        polls: polls.clone(),
        chunks,
    });
    (body, polls)
}

fn png_bytes(w: u32, h: u32) -> Vec<u8> {
    let mut out = Vec::new();
    image::RgbImage::new(w, h)
        .write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png)
        .unwrap();
    out
}

async fn metrics_text(h: &Harness) -> String {
    let (_, _, text) = h
        .call(Request::get("/metrics").body(Body::empty()).unwrap())
        .await;
    String::from_utf8(text).unwrap()
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

/// Finding 2: a PUT body was buffered before its token (and declared size) was checked.
#[tokio::test(flavor = "multi_thread")]
async fn upload_puts_are_checked_before_their_body_is_read() {
    let h = start(|_| {}).await;
    let (body, polls) = counting(60);
    let req = Request::put("/api/v3/media/uploads/invented-token")
        .body(body)
        .unwrap();
    let (s, _, _) = h.call(req).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert_eq!(
        polls.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "body read for an unknown token"
    );
    // a real ticket, but a declared length that is not the ticket's size
    let ticket =
        |size: usize| json!({"filename": "a.png", "size": size, "content_type": "image/png"});
    let url = h.ticket(ticket(100)).await;
    let (body, polls) = counting(60);
    let req = Request::put(&url)
        .header(header::CONTENT_LENGTH, (60usize << 20).to_string())
        .body(body)
        .unwrap();
    let (s, _, b) = h.call(req).await;
    assert_eq!(
        s,
        StatusCode::BAD_REQUEST,
        "{}",
        String::from_utf8_lossy(&b)
    );
    assert_eq!(polls.load(std::sync::atomic::Ordering::SeqCst), 0);
    // no declared length: the stream stops at the ticket's size, not at the end of 60 MiB
    let url = h.ticket(ticket(100)).await;
    let (body, polls) = counting(60);
    let (s, _, _) = h.call(Request::put(&url).body(body).unwrap()).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_eq!(
        polls.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "read past the cap"
    );
    // nothing was left on disk by the refused uploads
    let left: Vec<_> = std::fs::read_dir(h.dir.path().join("uploads"))
        .unwrap()
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

/// Finding 3: unknown fields and unbounded strings were kept in every record.
#[tokio::test(flavor = "multi_thread")]
async fn records_keep_only_the_known_fields_compactly() {
    let h = start(|_| {}).await;
    let mut b = body("FPS-24, a cat");
    b["junk"] = json!("x".repeat(1 << 20));
    b["nested"] = json!({"deep": ["y".repeat(1000)]});
    b["negative_prompt"] = json!("n".repeat(8192));
    let (s, v) = h.submit(b).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let id = v["data"]["id"].as_str().unwrap().to_string();
    let input = v["data"]["input"].as_object().unwrap();
    let mut keys: Vec<&str> = input.keys().map(String::as_str).collect();
    keys.sort();
    assert_eq!(keys, ["image", "negative_prompt", "prompt", "seed"]);
    h.wait(&id, &["completed"]).await;
    h.server.as_ref().unwrap().state.jobs.flushed().await;
    let path = h.dir.path().join("jobs").join(format!("{id}.json"));
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(text.len() < 12 << 10, "record of {} bytes", text.len());
    assert!(!text.contains("xxxx") && !text.contains("yyyy"));
    assert!(!text.contains('\n'), "records are compact");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "record mode {mode:o}");
        let secret = h.dir.path().join("webhook_secret");
        let mode = std::fs::metadata(&secret).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "secret mode {mode:o}");
    }
    // and the long strings themselves are bounded
    for (field, len) in [("prompt", 8193), ("negative_prompt", 9000)] {
        let mut b = body("p");
        b[field] = json!("p".repeat(len));
        let (s, v) = h.submit(b).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
        assert!(
            v["message"]
                .as_str()
                .unwrap()
                .starts_with(&format!("{field}: must be a string of at most 8192 bytes")),
            "{v}"
        );
    }
    let (s, v) = h
        .submit(json!({"prompt": "p", "image": format!("http://example.com/{}", "a".repeat(5000))}))
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    let (s, v) = h
        .open_ticket(json!({"filename": "a".repeat(300), "size": 3}))
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    assert!(v["message"].as_str().unwrap().starts_with("filename:"));
    let (s, v) = h
        .open_ticket(json!({"filename": "a.png", "size": 3, "content_type": "image/".repeat(30)}))
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    assert!(v["message"].as_str().unwrap().starts_with("content_type:"));
}

/// Finding 4: webhook retries slept on the shared blocking pool, without bound.
#[tokio::test(flavor = "multi_thread")]
async fn webhooks_run_under_a_concurrency_bound_and_the_body_field_works() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let (now, max, total) = (
        Arc::new(AtomicUsize::new(0)),
        Arc::new(AtomicUsize::new(0)),
        Arc::new(AtomicUsize::new(0)),
    );
    let (n2, m2, t2) = (now.clone(), max.clone(), total.clone());
    let app = Router::new().route(
        "/slow",
        axum::routing::post(move || {
            let (now, max, total) = (n2.clone(), m2.clone(), t2.clone());
            async move {
                let in_flight = now.fetch_add(1, Ordering::SeqCst) + 1;
                max.fetch_max(in_flight, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(300)).await;
                now.fetch_sub(1, Ordering::SeqCst);
                total.fetch_add(1, Ordering::SeqCst);
                StatusCode::OK
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    let h = start(|c| {
        c.allow_private_urls = true;
        c.max_queue = 30;
    })
    .await;
    let n = 20;
    for i in 0..n {
        // half through the query, half through WaveSpeed's body field
        let (s, v) = if i % 2 == 0 {
            h.submit_query(&format!("?webhook=http://{addr}/slow"), body("p"))
                .await
        } else {
            let mut b = body("p");
            b["webhook_url"] = json!(format!("http://{addr}/slow"));
            h.submit(b).await
        };
        assert_eq!(s, StatusCode::OK, "{v}");
    }
    for _ in 0..1000 {
        if total.load(Ordering::SeqCst) == n {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        total.load(Ordering::SeqCst),
        n,
        "every webhook delivered once"
    );
    let max = max.load(Ordering::SeqCst);
    assert!(
        (1..=skyreels_server::webhook::CONCURRENT_DELIVERIES).contains(&max),
        "{max} deliveries at once"
    );
    // a literal internal address is refused at submit time
    let strict = start(|_| {}).await;
    let (s, v) = strict
        .submit_query("?webhook=http://169.254.169.254/latest", body("p"))
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    assert!(
        v["message"].as_str().unwrap().starts_with("webhook:"),
        "{v}"
    );
}

/// Finding 5: declared content types were trusted and served back on our origin.
#[tokio::test(flavor = "multi_thread")]
async fn uploads_accept_only_raster_images_and_are_served_inert() {
    let h = start(|_| {}).await;
    let multipart = |name: &str, ct: &str, bytes: &[u8]| multipart_upload(KEY, name, ct, bytes);
    let html = b"<html><script>alert(document.cookie)</script></html>";
    let svg = b"<svg xmlns=\"http://www.w3.org/2000/svg\" onload=\"alert(1)\"/>";
    for (name, ct, bytes) in [
        ("x.html", "text/html", &html[..]),
        ("x.svg", "image/svg+xml", &svg[..]),
        ("x.png", "image/png", &html[..]),
    ] {
        let (s, _, b) = h.call(multipart(name, ct, bytes)).await;
        assert_eq!(
            s,
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "{name}: {}",
            String::from_utf8_lossy(&b)
        );
    }
    // a declared HTML ticket is refused; a PNG ticket carrying SVG bytes too
    let (s, _) = h
        .open_ticket(json!({"filename": "x.html", "size": html.len(), "content_type": "text/html"}))
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    let url = h
        .ticket(json!({"filename": "x.png", "size": svg.len(), "content_type": "image/png"}))
        .await;
    let (s, _, _) = h
        .call(Request::put(&url).body(Body::from(svg.to_vec())).unwrap())
        .await;
    assert_eq!(s, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    // a real PNG declared as HTML is stored as what it is, and served inert
    let png = png_bytes(4, 4);
    let (s, _, b) = h.call(multipart("x.html", "text/html", &png)).await;
    assert_eq!(s, StatusCode::OK);
    let v: Value = serde_json::from_slice(&b).unwrap();
    let path = v["data"]["download_url"]
        .as_str()
        .unwrap()
        .replace("http://gen.local:8000", "");
    let (s, hd, bytes) = h
        .call(Request::get(&path).body(Body::empty()).unwrap())
        .await;
    assert_eq!((s, bytes), (StatusCode::OK, png.clone()));
    assert_eq!(hd[header::CONTENT_TYPE], "image/png");
    assert_eq!(hd[header::X_CONTENT_TYPE_OPTIONS], "nosniff");
    assert_eq!(hd[header::CONTENT_SECURITY_POLICY], "sandbox");
    assert_eq!(hd[header::X_FRAME_OPTIONS], "DENY");
    // outputs too
    let (_, v) = h.submit(body("p")).await;
    let id = v["data"]["id"].as_str().unwrap().to_string();
    h.wait(&id, &["completed"]).await;
    let (_, hd, _) = h
        .call(
            Request::get(format!("/outputs/{id}.mp4"))
                .body(Body::empty())
                .unwrap(),
        )
        .await;
    assert_eq!(hd[header::X_CONTENT_TYPE_OPTIONS], "nosniff");
    assert_eq!(hd[header::CONTENT_SECURITY_POLICY], "sandbox");
    assert_eq!(hd[header::X_FRAME_OPTIONS], "DENY");
    // an upload stored by an earlier version with a declared HTML type is served as a download
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("uploads")).unwrap();
    let old = "0123456789abcdef0123456789abcdef";
    std::fs::write(dir.path().join(format!("uploads/{old}.bin")), html).unwrap();
    std::fs::write(
        dir.path().join(format!("uploads/{old}.json")),
        json!({"id": old, "filename": "x.html", "content_type": "text/html", "size": html.len(), "created_at": 1, "complete": true, "base_url": "http://gen.local:8000"}).to_string(),
    )
    .unwrap();
    let gate = Gate::closed();
    gate.open();
    let legacy = start_with(dir, |_| {}, gate).await;
    let (s, hd, _) = legacy
        .call(
            Request::get(format!("/api/v3/media/files/{old}/x.html"))
                .body(Body::empty())
                .unwrap(),
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(hd[header::CONTENT_TYPE], "application/octet-stream");
    assert_eq!(hd[header::CONTENT_DISPOSITION], "attachment");
    assert_eq!(hd[header::CONTENT_SECURITY_POLICY], "sandbox");
}

/// A PNG that announces `side` x `side` RGB pixels and carries the first rows (a few hundred
/// bytes: a decompression bomb for a decoder without limits).
fn png_bomb(side: u32) -> Vec<u8> {
    use std::io::Write;
    let mut out = Vec::new();
    let mut e = png::Encoder::new(&mut out, side, side);
    e.set_color(png::ColorType::Rgb);
    let mut w = e.write_header().unwrap();
    let mut rows = w.stream_writer().unwrap();
    rows.write_all(&vec![0; 3 * side as usize * 4]).unwrap();
    rows.flush().unwrap();
    drop(rows);
    drop(w);
    out
}

/// Finding 6: small files decoded into huge buffers, and queued tasks kept full-size images.
#[tokio::test(flavor = "multi_thread")]
async fn decode_bombs_fail_fast_and_images_are_fitted_on_arrival() {
    let h = start(|_| {}).await;
    let uri = format!(
        "data:image/png;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(png_bomb(8192))
    );
    let (_, v) = h.submit(json!({"prompt": "p", "image": uri})).await;
    let d = h.wait(v["data"]["id"].as_str().unwrap(), &["failed"]).await;
    assert_eq!(d["code"], 1402, "{d}");
    assert!(
        d["error"].as_str().unwrap().contains("too large to decode"),
        "{d}"
    );
    // a big image reaches the generator at the task's size (96x64 here), not its own
    let (_, v) = h
        .submit(json!({"prompt": "p", "image": png_data_uri(1200, 900)}))
        .await;
    h.wait(v["data"]["id"].as_str().unwrap(), &["completed"])
        .await;
    let seen = h.seen.lock().unwrap();
    assert_eq!(
        seen.last().unwrap().image.as_ref().unwrap().dimensions(),
        (96, 64)
    );
}

/// Issue 26, item 3: sizes the H.264 encoder cannot write (OpenH264: at most 3840x2160, or
/// 2160x3840 portrait) are refused at submit, not after the compute.
#[tokio::test(flavor = "multi_thread")]
async fn sizes_the_encoder_cannot_write_are_refused() {
    let h = start(|_| {}).await;
    let img = png_data_uri(8, 8);
    for (w, hh, field) in [
        (4096, 64, "width:"),
        (64, 4096, "height:"),
        (2176, 2176, "height:"),
    ] {
        let b = json!({"prompt": "p", "image": img, "width": w, "height": hh, "num_frames": 1, "num_inference_steps": 1});
        let (s, v) = h.submit(b).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{w}x{hh}: {v}");
        let m = v["message"].as_str().unwrap();
        assert!(
            m.contains(field) && m.contains("3840x2160"),
            "{w}x{hh}: {m}"
        );
    }
    assert!(h.seen.lock().unwrap().is_empty());
    for (w, hh) in [(3840, 2160), (2160, 3840)] {
        let b = json!({"prompt": "p", "image": img, "width": w, "height": hh, "num_frames": 1, "num_inference_steps": 1});
        let (s, v) = h.submit(b).await;
        assert_eq!(s, StatusCode::OK, "{w}x{hh}: {v}");
    }
}

/// Issue 26, item 3: memory follows pixel-frames, not work: a one-step clip far below
/// --max-work is refused when its width x height x frames exceeds the worker's limit.
#[tokio::test(flavor = "multi_thread")]
async fn clips_beyond_the_worker_memory_are_refused() {
    let h = start(|_| {}).await;
    let img = png_data_uri(8, 8);
    // 1024x1024x65 at one step: 68 million of --max-work, 68,157,440 pixel-frames
    let big = json!({"prompt": "p", "image": img, "width": 1024, "height": 1024, "num_frames": 65, "num_inference_steps": 1});
    let (s, v) = h.submit(big).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    let m = v["message"].as_str().unwrap();
    assert!(
        m.contains("num_frames:")
            && m.contains("68157440 pixel-frames")
            && m.contains("--max-pixel-frames) is 50657280"),
        "{m}"
    );
    assert!(h.seen.lock().unwrap().is_empty());
    // the limit itself is fine
    let ok = json!({"prompt": "p", "image": img, "width": 960, "height": 544, "num_frames": 97, "num_inference_steps": 1});
    let (s, v) = h.submit(ok).await;
    assert_eq!(s, StatusCode::OK, "{v}");
}

/// Issue 26, item 11: a model served with `--parallel ulysses=2` refuses at submit what the
/// layout cannot run (the pipeline's own check), instead of failing it later with 1401.
#[tokio::test(flavor = "multi_thread")]
async fn parallel_layouts_a_request_cannot_run_are_refused() {
    let gate = Gate::closed();
    gate.open();
    let seen = Arc::new(Mutex::new(vec![]));
    let (g, sn) = (gate.clone(), seen.clone());
    let loader: skyreels_server::generator::GeneratorLoader = Box::new(move || {
        Ok(Box::new(Fake {
            gate: g,
            seen: sn,
            ulysses: Some(Ulysses {
                degree: 2,
                layout: TokenLayout {
                    spatial_compression: 8,
                    temporal_compression: 4,
                    patch_size: 2,
                    patch_size_t: 1,
                },
            }),
        }) as Box<dyn Generator>)
    });
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start_node(config(dir.path()), vec![loader])
        .await
        .unwrap();
    server.wait_loaded().await.unwrap();
    let h = Harness {
        router: server.router(),
        server: Some(server),
        seen,
        dir,
        redis: None,
    };
    let img = png_data_uri(8, 8);
    for (b, want) in [
        // 1 x 3 x 5 = 15 video tokens
        (
            json!({"prompt": "p", "image": img, "width": 80, "height": 48, "num_frames": 1}),
            "num_frames: ulysses=2: this size and frame count make 15 video tokens",
        ),
        (
            json!({"prompt": "p", "image": img, "cache": "teacache:0.1"}),
            "cache: step caching does not combine with Ulysses",
        ),
    ] {
        let (s, v) = h.submit(b.clone()).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{b}: {v}");
        let m = v["message"].as_str().unwrap();
        assert!(m.contains(want), "{b}: {m}");
    }
    // the defaults (96x64, 9 frames: 3 x 4 x 6 tokens) split evenly
    let (s, v) = h.submit(body("p")).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let d = h
        .wait(v["data"]["id"].as_str().unwrap(), &["completed"])
        .await;
    assert_eq!(d["status"], "completed");
    assert_eq!(h.seen.lock().unwrap().len(), 1);
}

/// Finding 7: no cost limit and no task timeout.
#[tokio::test(flavor = "multi_thread")]
async fn oversized_tasks_are_refused_and_long_ones_stopped() {
    let h = start(|_| {}).await;
    let huge = json!({"prompt": "p", "image": png_data_uri(8, 8), "width": 4096, "height": 4096, "num_frames": 257, "num_inference_steps": 100});
    let (s, v) = h.submit(huge).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    let m = v["message"].as_str().unwrap();
    assert!(
        m.contains("--max-work") && m.contains("3000 million") && m.contains("431174 million"),
        "{m}"
    );
    // within the limit (the default 544x960x97x30 = 1,520 million) is fine
    let ok = json!({"prompt": "p", "image": png_data_uri(8, 8), "width": 960, "height": 544, "num_frames": 97, "num_inference_steps": 30});
    let (s, v) = h.submit(ok).await;
    assert_eq!(s, StatusCode::OK, "{v}");

    let gate = Gate::closed();
    let slow = start_with(
        tempfile::tempdir().unwrap(),
        |c| c.max_task_time = Some(Duration::from_millis(300)),
        gate,
    )
    .await;
    let (_, v) = slow.submit(body("p")).await;
    let d = slow
        .wait(
            v["data"]["id"].as_str().unwrap(),
            &["failed", "completed", "cancelled"],
        )
        .await;
    assert_eq!(
        (d["status"].as_str(), d["code"].as_u64()),
        (Some("failed"), Some(5004)),
        "{d}"
    );
    assert!(
        d["error"].as_str().unwrap().contains("--max-task-seconds"),
        "{d}"
    );
    assert!(d["outputs"].as_array().unwrap().is_empty());
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

#[tokio::test(flavor = "multi_thread")]
async fn corrupt_records_move_aside_and_orphans_are_cleaned() {
    let dir = tempfile::tempdir().unwrap();
    for sub in ["jobs", "videos", "uploads", "base64"] {
        std::fs::create_dir_all(dir.path().join(sub)).unwrap();
    }
    std::fs::write(dir.path().join("jobs/broken.json"), b"{\"id\": \"bro").unwrap();
    std::fs::write(dir.path().join("jobs/x.tmp1234abcd"), b"half").unwrap();
    std::fs::write(dir.path().join("videos/orphan.mp4"), b"nobody's").unwrap();
    std::fs::write(dir.path().join("base64/orphan.mp4.b64"), b"nobody's").unwrap();
    std::fs::write(dir.path().join("uploads/lost.bin"), b"nobody's").unwrap();
    std::fs::write(dir.path().join("uploads/lost.part"), b"nobody's").unwrap();
    let gate = Gate::closed();
    gate.open();
    let h = start_with(dir, |_| {}, gate).await;
    let p = h.dir.path();
    assert!(p.join("corrupt/broken.json").exists());
    assert!(!p.join("jobs/broken.json").exists());
    for gone in [
        "jobs/x.tmp1234abcd",
        "videos/orphan.mp4",
        "base64/orphan.mp4.b64",
        "uploads/lost.bin",
        "uploads/lost.part",
    ] {
        assert!(!p.join(gone).exists(), "{gone} was kept");
    }
    let (_, v) = h.submit(body("p")).await;
    h.wait(v["data"]["id"].as_str().unwrap(), &["completed"])
        .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn base64_outputs_are_encoded_once() {
    let h = start(|_| {}).await;
    let mut b = body("p");
    b["enable_base64_output"] = json!(true);
    let (_, v) = h.submit(b).await;
    let id = v["data"]["id"].as_str().unwrap().to_string();
    let first = h.wait(&id, &["completed"]).await["outputs"][0].clone();
    // the polls read the encoded copy: the video itself is no longer needed for them
    std::fs::remove_file(h.dir.path().join(format!("videos/{id}.mp4"))).unwrap();
    let again = h.get(&id).await["outputs"][0].clone();
    assert_eq!(first, again);
    assert!(first
        .as_str()
        .unwrap()
        .starts_with("data:video/mp4;base64,"));
    // deleting the task removes the copy too
    let (s, _) = h.delete(&id).await;
    assert_eq!(s, StatusCode::OK);
    assert!(!h.dir.path().join(format!("base64/{id}.mp4.b64")).exists());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cancelling_task_ends_cancelled_even_if_the_generator_finishes() {
    let gate = Gate::closed();
    let h = start_with(tempfile::tempdir().unwrap(), |_| {}, gate.clone()).await;
    let (_, v) = h.submit(body("stubborn")).await;
    let id = v["data"]["id"].as_str().unwrap().to_string();
    h.wait(&id, &["processing"]).await;
    let (s, v) = h.delete(&id).await;
    assert_eq!(
        (s, v["data"]["status"].as_str()),
        (StatusCode::OK, Some("processing")),
        "{v}"
    );
    gate.open();
    let d = h.wait(&id, &["cancelled", "completed"]).await;
    assert_eq!(d["status"], "cancelled", "{d}");
    assert!(d["outputs"].as_array().unwrap().is_empty());
    assert!(!h.dir.path().join(format!("videos/{id}.mp4")).exists());
}

/// A server on a real socket (timeouts and the connection cap live in the accept loop).
struct Live {
    addr: std::net::SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    done: tokio::task::JoinHandle<()>,
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
        Box::new(move || {
            Ok(Box::new(Fake {
                gate,
                seen,
                ulysses: None,
            }) as Box<dyn Generator>)
        }),
    )
    .unwrap();
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
    Live {
        addr,
        stop: Some(stop),
        done,
        _dir: dir,
    }
}

impl Live {
    async fn connect(&self) -> tokio::net::TcpStream {
        tokio::net::TcpStream::connect(self.addr).await.unwrap()
    }

    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        self.done.await.unwrap();
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

/// The same routes with the Redis engine behind them (a real redis-server, one in-process fake
/// worker): queue positions and the bound, cancels, outputs and base64 from Redis, deletes,
/// sync mode, uploads, metrics, and 503 in the envelope once Redis is gone.
#[tokio::test(flavor = "multi_thread")]
async fn redis_engine_serves_the_routes_the_same_way() {
    let gate = Gate::closed();
    let mut h = start_redis_with(|_| {}, gate.clone(), OutputStore::Redis).await;
    let (s, v) = h.json("GET", "/ready", None, None).await;
    assert_eq!(
        (s, v["data"]["status"].as_str()),
        (StatusCode::OK, Some("ready"))
    );
    let (_, v) = h.json("GET", "/api/v3/models", None, Some(KEY)).await;
    assert_eq!(v["data"][0]["model_id"], MODEL, "{v}");

    // one running, three waiting (max_queue 3): the next is refused
    let id = |v: &Value| v["data"]["id"].as_str().unwrap().to_string();
    let (_, v) = h.submit(body("p")).await;
    let running = id(&v);
    h.wait(&running, &["processing"]).await;
    let mut waiting = vec![];
    for k in 0..3 {
        let (s, v) = h.submit(body("p")).await;
        assert_eq!(s, StatusCode::OK, "{v}");
        let d = h.wait(&id(&v), &["created"]).await;
        assert_eq!(d["queue_position"], k, "{d}");
        waiting.push(id(&v));
    }
    let (s, v) = h.submit(body("p")).await;
    assert_eq!(s, StatusCode::TOO_MANY_REQUESTS, "{v}");
    // cancel a waiting one and the running one (at its next step)
    let (s, v) = h.delete(&waiting[0]).await;
    assert_eq!(
        (s, v["data"]["status"].as_str()),
        (StatusCode::OK, Some("cancelled"))
    );
    assert_eq!(h.get(&waiting[1]).await["queue_position"], 0);
    let (s, v) = h.delete(&running).await;
    assert_eq!(
        (s, v["data"]["status"].as_str()),
        (StatusCode::OK, Some("processing"))
    );
    let d = h.wait(&running, &["cancelled", "completed"]).await;
    assert_eq!(d["status"], "cancelled", "{d}");
    gate.open();
    let done = h.wait(&waiting[1], &["completed"]).await;
    h.wait(&waiting[2], &["completed"]).await;
    assert_eq!(done["progress"], json!({"step": 4, "total": 4}));

    // the output is served from Redis, by file name; deleting the task deletes it
    let url = done["outputs"][0].as_str().unwrap();
    let path = url
        .strip_prefix("http://gen.local:8000")
        .unwrap()
        .to_string();
    let get = |p: &str| Request::get(p).body(Body::empty()).unwrap();
    let (s, headers, bytes) = h.call(get(&path)).await;
    assert_eq!(
        (s, headers[header::CONTENT_TYPE].to_str().unwrap()),
        (StatusCode::OK, "video/mp4")
    );
    assert_eq!(String::from_utf8_lossy(&bytes), "fake mp4 96x64 seed 7");
    // ranges, as a <video> element seeks
    let ranged = |r: &str| {
        Request::get(&path)
            .header(header::RANGE, r)
            .body(Body::empty())
            .unwrap()
    };
    let part = |(s, headers, bytes): (StatusCode, axum::http::HeaderMap, Vec<u8>)| {
        let range = headers[header::CONTENT_RANGE].to_str().unwrap().to_string();
        (s, range, String::from_utf8(bytes).unwrap())
    };
    assert_eq!(
        part(h.call(ranged("bytes=0-3")).await),
        (
            StatusCode::PARTIAL_CONTENT,
            "bytes 0-3/21".into(),
            "fake".into()
        )
    );
    assert_eq!(
        part(h.call(ranged("bytes=-6")).await),
        (
            StatusCode::PARTIAL_CONTENT,
            "bytes 15-20/21".into(),
            "seed 7".into()
        )
    );
    let (s, range, text) = part(h.call(ranged("bytes=99-")).await);
    assert_eq!(
        (s, range.as_str()),
        (StatusCode::RANGE_NOT_SATISFIABLE, "bytes */21")
    );
    assert!(text.contains("outside the file (21 bytes)"), "{text}");
    let (s, v) = h.delete(&waiting[1]).await;
    assert_eq!(
        (s, v["data"]["status"].as_str()),
        (StatusCode::OK, Some("deleted"))
    );
    assert_eq!(h.call(get(&path)).await.0, StatusCode::NOT_FOUND);

    // base64 output (encoded from the bytes in Redis) and sync mode
    let mut b = body("p");
    b["enable_base64_output"] = json!(true);
    b["enable_sync_mode"] = json!(true);
    let (s, v) = h.submit(b).await;
    assert_eq!(
        (s, v["data"]["status"].as_str()),
        (StatusCode::OK, Some("completed")),
        "{v}"
    );
    let uri = v["data"]["outputs"][0].as_str().unwrap();
    let b64 = uri.strip_prefix("data:video/mp4;base64,").unwrap();
    let mp4 = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&mp4), "fake mp4 96x64 seed 7");

    // an upload (ticket + PUT) kept in Redis, served back and used by a submit
    let png = png_bytes(40, 30);
    let put_url = h
        .ticket(json!({"filename": "cat.png", "size": png.len(), "content_type": "image/png"}))
        .await;
    let put = Request::put(&put_url)
        .header(header::CONTENT_TYPE, "image/png")
        .body(Body::from(png.clone()))
        .unwrap();
    let (s, _, b) = h.call(put).await;
    assert_eq!(s, StatusCode::OK, "{}", String::from_utf8_lossy(&b));
    let v: Value = serde_json::from_slice(&b).unwrap();
    let file_url = v["data"]["download_url"].as_str().unwrap();
    let file_path = file_url.strip_prefix("http://gen.local:8000").unwrap();
    let (s, headers, bytes) = h.call(get(file_path)).await;
    assert_eq!(
        (s, headers[header::CONTENT_TYPE].to_str().unwrap(), bytes),
        (StatusCode::OK, "image/png", png)
    );
    let (_, v) = h.submit(json!({"prompt": "p", "image": file_url})).await;
    assert_eq!(
        h.wait(&id(&v), &["completed", "failed"]).await["status"],
        "completed"
    );

    let text = metrics_text(&h).await;
    for want in [
        format!("skyreels_model_workers{{model=\"{MODEL}\"}} 1"),
        format!("skyreels_model_queue_depth{{model=\"{MODEL}\"}} 0"),
        "skyreels_workers 1".into(),
    ] {
        assert!(text.contains(&want), "missing {want}:\n{text}");
    }

    // Redis gone: 503 in the envelope with Retry-After, no hang
    drop(h.redis.take());
    let (s, v) = h.submit(body("p")).await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{v}");
    assert!(v["message"].as_str().unwrap().contains("Redis"), "{v}");
    let (s, _) = h.result(&running).await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE);
    let (s, _) = h.json("GET", "/ready", None, None).await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE);
}

/// The Redis engine's own guards, on the store directly: the cluster-wide queue bound, tasks
/// whose node died before queueing them, the webhook once-guard, the bound on open upload
/// tickets, and a retried enqueue that queues once.
#[tokio::test(flavor = "multi_thread")]
async fn redis_engine_guards() {
    use skyreels_server::job::{now_ms, JobRecord, Status, TaskCode};
    use skyreels_server::jobs::{Jobs, UploadRefused};
    use skyreels_server::store::{AdmitError, MAX_OPEN_TICKETS, MAX_OPEN_TICKETS_PER_KEY};
    let h = start_redis_with(|c| c.max_queue = 2, Gate::closed(), OutputStore::Redis).await;
    let Jobs::Redis(c) = &h.server.as_ref().unwrap().state.jobs else {
        panic!("not a Redis engine");
    };
    // "other/model" was announced by a worker that is gone (not yet for long)
    let mut conn = h.redis.as_ref().unwrap().conn();
    let _: () = redis::pipe()
        .hset("skyreels:models", "other/model", "{}")
        .hset("skyreels:models_seen", "other/model", now_ms())
        .query(&mut conn)
        .unwrap();
    let record = |model: &str, age_ms: u64| JobRecord {
        created_at: now_ms() - age_ms,
        ..JobRecord::created(
            model,
            Default::default(),
            "http://gen.local:8000".into(),
            1,
            4,
        )
    };
    // "other/model" has no worker: what is queued for it stays queued
    let (old, fresh) = (record("other/model", 20 * 60_000), record("other/model", 0));
    c.admit(old.clone()).await.unwrap();
    c.admit(fresh.clone()).await.unwrap();
    assert_eq!(
        c.admit(record("other/model", 0)).await,
        Err(AdmitError::QueueFull)
    );
    // the old one was never queued: failed 5003; the fresh one keeps waiting
    let ten_minutes = Duration::from_secs(600);
    assert_eq!(c.sweep(ten_minutes).await.unwrap(), 1);
    let (r, _) = c.get(&old.id).await.unwrap().unwrap();
    assert_eq!((r.status, r.code), (Status::Failed, TaskCode::Unavailable));
    let (r, pos) = c.get(&fresh.id).await.unwrap().unwrap();
    assert_eq!((r.status, pos), (Status::Created, Some(0)));
    // a retried enqueue queues once
    let request = GenerationRequest {
        model: "other/model".into(),
        prompt: "p".into(),
        negative_prompt: None,
        image: None,
        height: 64,
        width: 96,
        num_frames: 9,
        steps: 4,
        guidance_scale: 6.0,
        embedded_guidance_scale: 1.0,
        seed: 1,
        fps: 24.0,
        cache: CacheSpec::None,
        flow_shift: None,
    };
    c.enqueue(&fresh.id, request.clone(), None).await;
    c.enqueue(&fresh.id, request.clone(), None).await;
    let len: usize = redis::cmd("XLEN")
        .arg("skyreels:queue:other/model")
        .query(&mut conn)
        .unwrap();
    assert_eq!(len, 1);
    // an old task that was queued is not failed as stalled
    let queued_old = record("other/model", 20 * 60_000);
    c.admit(queued_old.clone()).await.unwrap();
    c.enqueue(&queued_old.id, request, None).await;
    assert_eq!(c.sweep(ten_minutes).await.unwrap(), 0);
    assert_eq!(
        c.get(&queued_old.id).await.unwrap().unwrap().0.status,
        Status::Created
    );
    // each terminal state's webhook is claimed once
    let (r, _) = c.get(&old.id).await.unwrap().unwrap();
    assert!(c.claim_webhook(&r).await);
    assert!(!c.claim_webhook(&r).await);
    // open tickets are bounded per key and cluster-wide; a taken ticket frees its places and
    // is single use; an unused one expires in minutes
    let open = |owner: String| async move {
        c.open_ticket("a.png", "image/png", 10, "http://x", &owner)
            .await
            .map(|(_, token)| token)
    };
    let mut tokens = vec![];
    for k in 0..MAX_OPEN_TICKETS / MAX_OPEN_TICKETS_PER_KEY {
        for _ in 0..MAX_OPEN_TICKETS_PER_KEY {
            tokens.push(open(format!("k{k}")).await.expect("below the bounds"));
        }
    }
    assert!(matches!(
        open("k0".into()).await,
        Err(UploadRefused::KeyTickets)
    ));
    assert!(matches!(
        open("another".into()).await,
        Err(UploadRefused::Tickets)
    ));
    assert!(c.take_ticket(&tokens[0]).await.unwrap().is_some());
    assert!(c.take_ticket(&tokens[0]).await.unwrap().is_none());
    assert!(open("k0".into()).await.is_ok());
    let ttl: i64 = redis::cmd("PTTL")
        .arg("skyreels:tickets:k1")
        .query(&mut conn)
        .unwrap();
    assert!(ttl > 0 && ttl <= 600_000, "{ttl}");

    // a model no worker served for longer than forget_models_after is forgotten, and what
    // waits for it fails
    let _: () = redis::cmd("HSET")
        .arg("skyreels:models_seen")
        .arg("other/model")
        .arg(now_ms() - 2 * 3600 * 1000)
        .query(&mut conn)
        .unwrap();
    assert_eq!(c.sweep(ten_minutes).await.unwrap(), 2);
    let (r, _) = c.get(&fresh.id).await.unwrap().unwrap();
    assert_eq!((r.status, r.code), (Status::Failed, TaskCode::Unavailable));
    assert!(
        r.error.contains("no worker has served other/model"),
        "{}",
        r.error
    );
    let known: Vec<String> = c
        .known_models()
        .await
        .unwrap()
        .into_iter()
        .map(|m| m.id)
        .collect();
    assert_eq!(known, [MODEL]);

    // the webhook secret is put back into a Redis that lost it, and a node adopts the one
    // another node stored
    let _: () = redis::cmd("FLUSHALL").query(&mut conn).unwrap();
    assert_eq!(c.sync_secret("whsec_a", false).await.unwrap(), "whsec_a");
    let _: () = redis::cmd("SET")
        .arg("skyreels:secret")
        .arg("whsec_b")
        .query(&mut conn)
        .unwrap();
    assert_eq!(c.sync_secret("whsec_a", false).await.unwrap(), "whsec_b");
    // a configured secret (--webhook-secret) is the cluster's
    assert_eq!(c.sync_secret("whsec_c", true).await.unwrap(), "whsec_c");
    let stored: String = redis::cmd("GET")
        .arg("skyreels:secret")
        .query(&mut conn)
        .unwrap();
    assert_eq!(stored, "whsec_c");
}

/// `--output-store dir`: the videos (and base64 copies) are files in the shared output folder,
/// served from there by any node, and deleted with their task.
#[tokio::test(flavor = "multi_thread")]
async fn redis_engine_with_outputs_on_a_shared_folder() {
    let gate = Gate::closed();
    gate.open();
    let h = start_redis_with(|_| {}, gate, OutputStore::Dir).await;
    let mut b = body("p");
    b["enable_base64_output"] = json!(true);
    let (_, v) = h.submit(b).await;
    let id = v["data"]["id"].as_str().unwrap().to_string();
    let d = h.wait(&id, &["completed"]).await;
    let uri = d["outputs"][0].as_str().unwrap();
    let mp4 = base64::engine::general_purpose::STANDARD
        .decode(uri.strip_prefix("data:video/mp4;base64,").unwrap())
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&mp4), "fake mp4 96x64 seed 7");
    let video = h.dir.path().join("videos").join(format!("{id}.mp4"));
    let copy = h.dir.path().join("base64").join(format!("{id}.mp4.b64"));
    assert!(video.exists() && copy.exists());
    let (s, _, bytes) = h
        .call(
            Request::get(format!("/outputs/{id}.mp4"))
                .body(Body::empty())
                .unwrap(),
        )
        .await;
    assert_eq!((s, bytes), (StatusCode::OK, mp4));
    let (s, v) = h.delete(&id).await;
    assert_eq!(
        (s, v["data"]["status"].as_str()),
        (StatusCode::OK, Some("deleted"))
    );
    assert!(!video.exists() && !copy.exists());
}

/// A multipart upload of one file (field `file`) with `key`.
fn multipart_upload(key: &str, name: &str, content_type: &str, bytes: &[u8]) -> Request<Body> {
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

/// A PNG of noise (incompressible): `w * h * 3` bytes and a little more.
fn noise_png(w: u32, h: u32) -> Vec<u8> {
    let mut x = 0x9E37_79B9u32;
    let img = image::RgbImage::from_fn(w, h, |_, _| {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        image::Rgb([x as u8, (x >> 8) as u8, (x >> 16) as u8])
    });
    let mut out = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png)
        .unwrap();
    out
}

/// Redis mode: uploads and videos are served in windows with Range (as the memory engine
/// serves its files), uploads are capped by --max-upload-mb and by per-key and cluster quotas.
#[tokio::test(flavor = "multi_thread")]
async fn redis_uploads_are_ranged_capped_and_within_quotas() {
    use skyreels_server::cluster::WINDOW;
    let gate = Gate::closed();
    gate.open();
    let h = start_redis_with(
        |c| {
            c.api_keys = vec![KEY.into(), "second-key".into()];
            c.max_upload_bytes = 3 << 20;
            let q = &mut c.redis.as_mut().unwrap().quotas;
            (q.uploads_per_key, q.uploads_total) = (6 << 20, 8 << 20);
        },
        gate,
        OutputStore::Redis,
    )
    .await;
    // more than two windows
    let png = noise_png(1000, 850);
    assert!(png.len() as u64 > 2 * WINDOW && png.len() < 3 << 20);
    let upload = |key: &str, bytes: Vec<u8>| multipart_upload(key, "a.png", "image/png", &bytes);
    let (s, _, b) = h.call(upload(KEY, png.clone())).await;
    assert_eq!(s, StatusCode::OK, "{}", String::from_utf8_lossy(&b));
    let v: Value = serde_json::from_slice(&b).unwrap();
    let url = v["data"]["download_url"].as_str().unwrap();
    let path = url
        .strip_prefix("http://gen.local:8000")
        .unwrap()
        .to_string();
    let get = |range: Option<&str>| {
        let mut r = Request::get(&path);
        if let Some(range) = range {
            r = r.header(header::RANGE, range);
        }
        r.body(Body::empty()).unwrap()
    };
    let (s, hd, bytes) = h.call(get(None)).await;
    assert_eq!(
        (s, hd[header::CONTENT_TYPE].to_str().unwrap()),
        (StatusCode::OK, "image/png")
    );
    assert_eq!(
        hd[header::CONTENT_LENGTH].to_str().unwrap(),
        png.len().to_string()
    );
    assert!(bytes == png, "the whole upload, window after window");
    let across = format!("bytes={}-{}", WINDOW - 5, WINDOW + 4);
    let (s, hd, bytes) = h.call(get(Some(&across))).await;
    assert_eq!(s, StatusCode::PARTIAL_CONTENT);
    assert_eq!(
        hd[header::CONTENT_RANGE].to_str().unwrap(),
        format!("bytes {}-{}/{}", WINDOW - 5, WINDOW + 4, png.len())
    );
    assert_eq!(bytes, &png[WINDOW as usize - 5..WINDOW as usize + 5]);
    let (s, hd, _) = h.call(get(Some(&format!("bytes={}-", png.len())))).await;
    assert_eq!(s, StatusCode::RANGE_NOT_SATISFIABLE);
    assert_eq!(
        hd[header::CONTENT_RANGE].to_str().unwrap(),
        format!("bytes */{}", png.len())
    );
    // --max-upload-mb: multipart and tickets
    let (s, _, b) = h.call(upload(KEY, noise_png(1200, 1000))).await;
    assert_eq!(s, StatusCode::PAYLOAD_TOO_LARGE);
    assert!(String::from_utf8_lossy(&b).contains("--max-upload-mb"));
    let (s, v) = h
        .open_ticket(json!({"filename": "a.png", "size": (3 << 20) + 1}))
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    // per-key quota (6 MiB): the third upload of ~2.5 MiB is refused; the cluster's (8 MiB)
    // then refuses the second key's second one
    let (s, _, _) = h.call(upload(KEY, png.clone())).await;
    assert_eq!(s, StatusCode::OK);
    let (s, hd, b) = h.call(upload(KEY, png.clone())).await;
    assert_eq!(
        s,
        StatusCode::TOO_MANY_REQUESTS,
        "{}",
        String::from_utf8_lossy(&b)
    );
    assert!(String::from_utf8_lossy(&b).contains("quota"));
    assert!(hd.contains_key(header::RETRY_AFTER));
    let (s, _, _) = h.call(upload("second-key", png.clone())).await;
    assert_eq!(s, StatusCode::OK);
    let (s, _, b) = h.call(upload("second-key", png.clone())).await;
    assert_eq!(
        s,
        StatusCode::SERVICE_UNAVAILABLE,
        "{}",
        String::from_utf8_lossy(&b)
    );
    // the refused uploads left nothing in Redis
    let mut conn = h.redis.as_ref().unwrap().conn();
    let kept: Vec<String> = redis::cmd("KEYS")
        .arg("skyreels:upload_data:*")
        .query(&mut conn)
        .unwrap();
    assert_eq!(kept.len(), 3);
}

/// Redis mode: a queued task holds its image as it came (compressed), not pixels at the
/// requested size; the worker fits it as the API node would, and re-checks every queued
/// request against its own limits (a forged entry is refused, not run).
#[tokio::test(flavor = "multi_thread")]
async fn redis_queues_compressed_images_and_workers_recheck_them() {
    use skyreels_server::jobs::Jobs;
    let gate = Gate::closed();
    let h = start_redis_with(|c| c.max_work = 10_000.0, gate.clone(), OutputStore::Redis).await;
    let id = |v: &Value| v["data"]["id"].as_str().unwrap().to_string();
    // the first task holds the worker at the gate; the second waits in the queue
    let (_, v) = h.submit(body("p")).await;
    h.wait(&id(&v), &["processing"]).await;
    let png = png_data_uri(30, 20);
    let (s, v) = h
        .submit(json!({"prompt": "big", "image": png, "width": 2048, "height": 1024, "num_frames": 1, "num_inference_steps": 1}))
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let waiting = id(&v);
    let mut conn = h.redis.as_ref().unwrap().conn();
    let mut stored = 0usize;
    for _ in 0..500 {
        stored = redis::cmd("HSTRLEN")
            .arg(format!("skyreels:input:{waiting}"))
            .arg("image")
            .query(&mut conn)
            .unwrap();
        if stored > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // the PNG's own bytes (~100), not 2048 x 1024 x 3 = 6 MiB of pixels
    assert!(stored > 0 && stored < 1000, "{stored} bytes queued");
    let ttl: i64 = redis::cmd("PTTL")
        .arg(format!("skyreels:input:{waiting}"))
        .query(&mut conn)
        .unwrap();
    assert!(ttl > 0, "a waiting input expires ({ttl})");

    // a forged queue entry: an 8192-wide task the API would have refused
    let Jobs::Redis(c) = &h.server.as_ref().unwrap().state.jobs else {
        panic!("not a Redis engine");
    };
    let forged = skyreels_server::job::JobRecord::created(
        MODEL,
        Default::default(),
        "http://gen.local:8000".into(),
        1,
        4,
    );
    c.admit(forged.clone()).await.unwrap();
    let request = json!({
        "model": MODEL, "prompt": "forged", "negative_prompt": null, "image": false,
        "height": 8192, "width": 8192, "num_frames": 9, "steps": 4, "guidance_scale": 6.0,
        "embedded_guidance_scale": 1.0, "seed": 1, "fps": 24.0, "cache": "none"
    });
    let _: () = redis::pipe()
        .hset(
            format!("skyreels:input:{}", forged.id),
            "request",
            request.to_string(),
        )
        .hset(format!("skyreels:task:{}", forged.id), "enqueued", 1)
        .cmd("XADD")
        .arg(format!("skyreels:queue:{MODEL}"))
        .arg("*")
        .arg("id")
        .arg(&forged.id)
        .query(&mut conn)
        .unwrap();
    gate.open();
    let d = h.wait(&waiting, &["completed", "failed"]).await;
    assert_eq!(d["status"], "completed", "{d}");
    let d = h.wait(&forged.id, &["completed", "failed"]).await;
    assert_eq!(
        (d["status"].as_str(), d["code"].as_u64()),
        (Some("failed"), Some(1401)),
        "{d}"
    );
    assert!(d["error"].as_str().unwrap().contains("height"), "{d}");
    let seen = h.seen.lock().unwrap();
    assert!(
        seen.iter().all(|r| r.prompt != "forged"),
        "the forged task ran"
    );
    let big = seen.iter().find(|r| r.prompt == "big").unwrap();
    let fitted = skyreels_params::fit_image(&image::RgbImage::new(30, 20), 2048, 1024);
    assert_eq!(
        big.image.as_ref(),
        Some(&fitted),
        "fitted by the worker as on arrival"
    );
}

/// Redis mode faults: a full Redis (maxmemory, noeviction) gets its own 503; a policy that
/// evicts is reported; a hung Redis (SIGSTOP) gets 503 within the command timeout, not after
/// a TCP timeout, and /metrics still answers; TLS (rediss://) with an authority of our own.
#[tokio::test(flavor = "multi_thread")]
async fn redis_full_hung_and_over_tls() {
    use skyreels_server::jobs::Jobs;
    let gate = Gate::closed();
    gate.open();
    let h = start_redis_with(|_| {}, gate.clone(), OutputStore::Redis).await;
    let Jobs::Redis(c) = &h.server.as_ref().unwrap().state.jobs else {
        panic!("not a Redis engine");
    };
    let mut conn = h.redis.as_ref().unwrap().conn();
    assert_eq!(c.memory_policy_problem().await, None);
    let set = |conn: &mut redis::Connection, k: &str, v: &str| {
        let _: () = redis::cmd("CONFIG")
            .arg("SET")
            .arg(k)
            .arg(v)
            .query(conn)
            .unwrap();
    };
    set(&mut conn, "maxmemory-policy", "allkeys-lru");
    let problem = c.memory_policy_problem().await.unwrap();
    assert!(
        problem.contains("allkeys-lru") && problem.contains("noeviction"),
        "{problem}"
    );
    set(&mut conn, "maxmemory-policy", "noeviction");
    set(&mut conn, "maxmemory", "1");
    let (s, v) = h.submit(body("p")).await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{v}");
    assert!(v["message"].as_str().unwrap().contains("is full"), "{v}");
    set(&mut conn, "maxmemory", "0");
    let (_, v) = h.submit(body("p")).await;
    let id = v["data"]["id"].as_str().unwrap().to_string();
    h.wait(&id, &["completed"]).await;

    // hung: the answer comes within the command timeout (2.5 s); the bound checked here is a
    // generous 8 s, far below the 20-40 s a hung Redis used to cost (a hang check, not a
    // speed check)
    h.redis.as_ref().unwrap().signal("STOP");
    let start = std::time::Instant::now();
    let (s, v) = h.result(&id).await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{v}");
    let text = metrics_text(&h).await;
    assert!(text.contains("skyreels_ready 0"), "{text}");
    let took = start.elapsed();
    h.redis.as_ref().unwrap().signal("CONT");
    assert!(
        took < Duration::from_secs(8),
        "a hung Redis stalled requests {took:?}"
    );
    assert_eq!(h.result(&id).await.0, StatusCode::OK);

    // TLS with our own authority: the same routes
    let tls = RedisServer::start_with(true);
    let h = start_on_redis(tls, |_| {}, gate, OutputStore::Redis).await;
    let (_, v) = h.submit(body("p")).await;
    let id = v["data"]["id"].as_str().unwrap().to_string();
    assert_eq!(
        h.wait(&id, &["completed", "failed"]).await["status"],
        "completed"
    );
}

/// Redis bookkeeping of crashed workers does not grow: a worker without a heartbeat for ten
/// claim timeouts loses its model list and, with nothing pending, its consumer in the group;
/// the live worker keeps both.
#[tokio::test(flavor = "multi_thread")]
async fn redis_forgets_dead_workers() {
    use skyreels_server::jobs::Jobs;
    let gate = Gate::closed();
    gate.open();
    let h = start_redis_with(
        |c| c.redis.as_mut().unwrap().claim_timeout = Duration::from_millis(100),
        gate,
        OutputStore::Redis,
    )
    .await;
    let Jobs::Redis(c) = &h.server.as_ref().unwrap().state.jobs else {
        panic!("not a Redis engine");
    };
    // the live worker's consumer exists once it has read an entry
    let (_, v) = h.submit(body("p")).await;
    h.wait(v["data"]["id"].as_str().unwrap(), &["completed"])
        .await;
    let mut conn = h.redis.as_ref().unwrap().conn();
    let queue = format!("skyreels:queue:{MODEL}");
    let _: () = redis::pipe()
        .hset("skyreels:worker_models", "ghost", format!("[\"{MODEL}\"]"))
        .cmd("XGROUP")
        .arg("CREATECONSUMER")
        .arg(&queue)
        .arg("workers")
        .arg("ghost")
        .query(&mut conn)
        .unwrap();
    // idle past ten claim timeouts (1 s)
    tokio::time::sleep(Duration::from_millis(1500)).await;
    c.sweep(Duration::from_secs(600)).await.unwrap();
    let listed: Vec<String> = redis::cmd("HKEYS")
        .arg("skyreels:worker_models")
        .query(&mut conn)
        .unwrap();
    assert!(!listed.contains(&"ghost".to_string()), "{listed:?}");
    assert_eq!(listed.len(), 1, "the live worker stays listed: {listed:?}");
    let consumers: Vec<redis::Value> = redis::cmd("XINFO")
        .arg("CONSUMERS")
        .arg(&queue)
        .arg("workers")
        .query(&mut conn)
        .unwrap();
    let text = format!("{consumers:?}");
    assert!(!text.contains("ghost"), "{text}");
    assert!(
        text.contains(&listed[0]),
        "the live worker's consumer stays: {text}"
    );
}
