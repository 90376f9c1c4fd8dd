//! LoRAs and RIFLEx per request: the `loras` field's rules and paths (`--lora-dir` names, URLs
//! downloaded once through the address policy and kept, hub files), `--max-loras`,
//! `--no-lora-urls`, `--max-lora-mb`, the echo, the unmatched keys in `timings`, the adapter
//! cache in `/metrics`, and `riflex_freq_index`. What the worker does runs on both engines.

use crate::common::{
    body, metrics_text, start, start_redis_with, start_with, Gate, Harness, MODEL,
};
use axum::http::StatusCode;
use serde_json::{json, Value};
use skyreels_server::backend::redis::OutputStore;
use skyreels_server::generator::LoraSource;
use skyreels_server::ServerConfig;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// A LoRA file the fake generator reads: two of its keys match no layer.
const STYLE: &[u8] = b"lora style\nunmatched_key a\nunmatched_key b\nmatched c\n";

/// A folder with `style.safetensors`, for `--lora-dir`.
fn lora_dir() -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    std::fs::write(d.path().join("style.safetensors"), STYLE).unwrap();
    d
}

fn with_loras(prompt: &str, loras: Value) -> Value {
    let mut b = body(prompt);
    b["loras"] = loras;
    b
}

async fn submitted(h: &Harness, b: Value) -> String {
    let (s, v) = h.submit(b).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    v["data"]["id"].as_str().unwrap().to_string()
}

async fn refused(h: &Harness, b: Value) -> String {
    let (s, v) = h.submit(b).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    v["message"].as_str().unwrap().to_string()
}

/// Serves LoRA files on loopback, counting the requests for each path: `/big` announces its
/// length, `/stream` sends the same bytes chunked (no length), `/gone` is a 404, anything else
/// is [`STYLE`].
struct FileServer {
    addr: SocketAddr,
    hits: Arc<AtomicUsize>,
}

impl FileServer {
    async fn start(big: usize) -> Self {
        use axum::body::Body;
        use axum::routing::get;
        let hits = Arc::new(AtomicUsize::new(0));
        let counted = hits.clone();
        let app = axum::Router::new().route(
            "/{*file}",
            get(
                move |axum::extract::Path(file): axum::extract::Path<String>| {
                    counted.fetch_add(1, Ordering::SeqCst);
                    async move {
                        match file.as_str() {
                            "gone.safetensors" => (StatusCode::NOT_FOUND, Body::empty()),
                            "big.safetensors" => (StatusCode::OK, Body::from(vec![b'x'; big])),
                            "stream.safetensors" => {
                                let chunks = (0..big / 1000 + 1).map(|_| {
                                    Ok::<_, std::io::Error>(bytes::Bytes::from(vec![b'x'; 1000]))
                                });
                                (
                                    StatusCode::OK,
                                    Body::from_stream(futures_util::stream::iter(chunks)),
                                )
                            }
                            _ => (StatusCode::OK, Body::from(STYLE)),
                        }
                    }
                },
            ),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        Self { addr, hits }
    }

    fn url(&self, file: &str) -> String {
        format!("http://{}/{file}.safetensors", self.addr)
    }

    fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

/// The files kept in a server's LoRA download cache.
fn cached(dir: &Path) -> Vec<PathBuf> {
    match std::fs::read_dir(dir.join("loras")) {
        Ok(d) => d.map(|e| e.unwrap().path()).collect(),
        Err(_) => vec![],
    }
}

/// A `--lora-dir` name runs with its file and scale: the prediction echoes the LoRA with its
/// scale, the result counts the keys that matched nothing, `.safetensors` is appended.
#[tokio::test(flavor = "multi_thread")]
async fn a_lora_dir_name_runs_and_is_echoed_with_its_unmatched_keys() {
    let loras = lora_dir();
    let dir = loras.path().to_path_buf();
    let h = start(|c| c.loras.dir = Some(dir)).await;
    let (s, v) = h
        .submit(with_loras(
            "p",
            json!([{"path": "style"}, {"path": "style.safetensors", "scale": -0.5}]),
        ))
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let echo =
        json!([{"path": "style", "scale": 1.0}, {"path": "style.safetensors", "scale": -0.5}]);
    assert_eq!(v["data"]["input"]["loras"], echo, "{v}");
    let d = h
        .wait(v["data"]["id"].as_str().unwrap(), &["completed"])
        .await;
    assert_eq!(d["input"]["loras"], echo);
    assert_eq!(d["timings"]["lora_unmatched_keys"], 4, "{d}");
    // a count: not in the inference sum
    // denoising, decoding and the safety checker
    assert_eq!(d["timings"]["inference"], 45);
    let seen = h.seen.lock().unwrap().clone();
    let file = LoraSource::File(loras.path().join("style.safetensors"));
    assert_eq!(seen[0].loras, [file.clone(), file]);
    assert_eq!(
        seen[0]
            .params
            .loras
            .iter()
            .map(|l| l.scale)
            .collect::<Vec<_>>(),
        [1.0, -0.5]
    );
    // no LoRA: no count
    let id = submitted(&h, body("plain")).await;
    let d = h.wait(&id, &["completed"]).await;
    assert!(d["timings"].get("lora_unmatched_keys").is_none(), "{d}");
}

/// The submit refuses what it can know: names outside `--lora-dir`, malformed paths, counts,
/// scales; each a 400 naming `loras` and the LoRA.
#[tokio::test(flavor = "multi_thread")]
async fn bad_loras_are_a_400_naming_the_field_and_the_lora() {
    let loras = lora_dir();
    let dir = loras.path().to_path_buf();
    let h = start(|c| c.loras.dir = Some(dir)).await;
    let one = |path: &str| json!([{"path": "style"}, {"path": path}]);
    for (loras, want) in [
        (
            one("missing"),
            "loras: [1] \"missing\": not found: no file missing.safetensors in this server's --lora-dir",
        ),
        (
            one("../x"),
            "loras: [1] \"../x\": a LoRA path may not contain `.` or `..` components",
        ),
        (
            one("a/b"),
            "loras: [1] \"a/b\": a name in --lora-dir has no slashes, and a hub file is OWNER/REPO/FILE.safetensors (an http(s) URL is the third form)",
        ),
        (
            one("/etc/passwd"),
            "loras: [1] \"/etc/passwd\": an absolute path is not accepted: give a file name in this server's --lora-dir, an http(s) URL or a hub file OWNER/REPO/FILE.safetensors",
        ),
        (
            one(".hidden"),
            "loras: [1] \".hidden\": a name in --lora-dir may not start with `.`",
        ),
        (
            one("ftp://example.com/a.safetensors"),
            "loras: [1] \"ftp://example.com/a.safetensors\": URL scheme \"ftp\" is not supported (http or https)",
        ),
        (
            one("http://127.0.0.1:9/a.safetensors"),
            "loras: [1] \"http://127.0.0.1:9/a.safetensors\": this address may not be fetched (start the server with --allow-private-image-urls for private networks)",
        ),
        (one(""), "loras: [1]: path must be a non-empty string"),
        (
            json!([{"path": "style", "scale": 4.5}]),
            "loras: [0]: scale must be a number from -4 to 4",
        ),
        (
            json!([{"path": "style"}, {"path": "style"}, {"path": "style"}, {"path": "style"}]),
            "loras: must be at most 3 (this server's --max-loras)",
        ),
        (
            json!([{"path": "style", "scale": "1"}]),
            "loras[0].scale: invalid type: string \"1\", expected f64",
        ),
    ] {
        assert_eq!(refused(&h, with_loras("p", loras.clone())).await, want, "{loras}");
    }
    assert!(h.seen.lock().unwrap().is_empty());
}

/// `--max-loras 0` refuses any LoRA (an empty list still passes); without `--lora-dir` a name
/// is refused; `--no-lora-urls` refuses URLs at submit.
#[tokio::test(flavor = "multi_thread")]
async fn server_flags_refuse_loras() {
    let none = start(|c| c.loras.max = 0).await;
    assert_eq!(
        refused(
            &none,
            with_loras("p", json!([{"path": "o/r/f.safetensors"}]))
        )
        .await,
        "loras: are not accepted by this server (--max-loras 0)"
    );
    let id = submitted(&none, with_loras("p", json!([]))).await;
    none.wait(&id, &["completed"]).await;

    let h = start(|c| c.loras.urls = false).await;
    assert_eq!(
        refused(&h, with_loras("p", json!([{"path": "style"}]))).await,
        "loras: [0] \"style\": this server has no --lora-dir, so a LoRA cannot be given by name: give an http(s) URL or a hub file OWNER/REPO/FILE.safetensors"
    );
    assert_eq!(
        refused(
            &h,
            with_loras("p", json!([{"path": "https://u:pw@example.com/x.safetensors?sig=s"}]))
        )
        .await,
        "loras: [0] \"https://example.com/x.safetensors\": LoRA URLs are turned off on this server (--no-lora-urls): name a file in its --lora-dir or a hub file"
    );
}

/// A hub file reaches the generator as one (the generator fetches it; the fake cannot, 1401).
#[tokio::test(flavor = "multi_thread")]
async fn a_hub_file_is_handed_to_the_generator() {
    let h = start(|_| {}).await;
    let id = submitted(
        &h,
        with_loras(
            "p",
            json!([{"path": "owner/repo/sub/x.safetensors", "scale": 0.7}]),
        ),
    )
    .await;
    let d = h.wait(&id, &["failed"]).await;
    assert_eq!(d["code"], 1401, "{d}");
    let seen = h.seen.lock().unwrap().clone();
    assert_eq!(
        seen[0].loras,
        [LoraSource::Hub {
            repo: "owner/repo".into(),
            file: "sub/x.safetensors".into()
        }]
    );
}

/// A URL LoRA is downloaded once through the address policy and kept: the second task reads
/// the kept file (the file server sees one request) and the generator's cache reports a hit.
async fn a_url_lora_is_downloaded_once(h: Harness) {
    let files = FileServer::start(0).await;
    let url = files.url("style");
    for prompt in ["first", "second"] {
        let id = submitted(&h, with_loras(prompt, json!([{"path": url}]))).await;
        let d = h.wait(&id, &["completed"]).await;
        assert_eq!(d["timings"]["lora_unmatched_keys"], 2, "{d}");
    }
    assert_eq!(files.hits(), 1, "the second task downloaded again");
    let kept = cached(h.dir.path());
    assert_eq!(kept.len(), 1, "{kept:?}");
    assert!(kept[0].to_string_lossy().ends_with(".safetensors"));
    assert_eq!(std::fs::read(&kept[0]).unwrap(), STYLE);
    let seen = h.seen.lock().unwrap().clone();
    assert_eq!(seen[1].loras, [LoraSource::File(kept[0].clone())]);
    let text = metrics_text(&h).await;
    for want in [
        "skyreels_lora_cache_total{result=\"hit\"} 1",
        "skyreels_lora_cache_total{result=\"miss\"} 1",
    ] {
        assert!(text.contains(want), "{want} missing:\n{text}");
    }
}

/// Downloads that fail fail the task (1402) naming the LoRA, keep nothing, and the worker goes
/// on: a 404, more than `--max-lora-mb` announced or streamed, and a name that resolves to an
/// internal address without the allowance.
async fn failed_downloads_fail_the_task_and_the_worker_goes_on(h: Harness, private: bool) {
    let files = FileServer::start((1 << 20) + 5000).await;
    let mut cases = vec![
        (files.url("gone"), "download failed: HTTP 404"),
        (
            files.url("big"),
            "too big: larger than 1 MiB, this server's limit (--max-lora-mb)",
        ),
        (
            files.url("stream"),
            "too big: larger than 1 MiB, this server's limit (--max-lora-mb)",
        ),
    ];
    let localhost = format!("http://localhost:{}/x.safetensors", files.addr.port());
    if !private {
        cases = vec![(
            localhost,
            "download failed: cannot connect (the host does not resolve or answer, or is an \
             address this server may not reach; private networks need \
             --allow-private-image-urls)",
        )];
    }
    for (url, why) in cases {
        let id = submitted(&h, with_loras("p", json!([{"path": url}]))).await;
        let d = h.wait(&id, &["failed"]).await;
        assert_eq!(d["code"], 1402, "{d}");
        let shown = format!("loras[0] {:?}: {why}", url);
        assert_eq!(d["error"], shown, "{d}");
        assert!(cached(h.dir.path()).is_empty(), "{url}: a file was kept");
    }
    let id = submitted(&h, body("after")).await;
    h.wait(&id, &["completed"]).await;
    assert!(h.seen.lock().unwrap().iter().all(|s| s.prompt == "after"));
}

/// A `--lora-dir` file removed after the submit fails the task on the worker (1401), naming it;
/// `gate` holds the worker on a first task meanwhile.
async fn a_lora_gone_before_the_run_fails_the_task(
    h: Harness,
    gate: Gate,
    loras: tempfile::TempDir,
) {
    // hold the worker on a first task while the second waits
    let first = submitted(&h, body("first")).await;
    let id = submitted(&h, with_loras("p", json!([{"path": "style", "scale": 2}]))).await;
    std::fs::remove_file(loras.path().join("style.safetensors")).unwrap();
    gate.open();
    h.wait(&first, &["completed"]).await;
    let d = h.wait(&id, &["failed"]).await;
    assert_eq!(
        (&d["code"], &d["error"]),
        (
            &json!(1401),
            &json!("loras[0] \"style\": not found: no file style.safetensors in this server's --lora-dir")
        ),
        "{d}"
    );
}

/// `--max-lora-mb 1`: the test server's big files are larger.
fn max_lora_bytes(c: &mut ServerConfig) {
    c.loras.max_download_bytes = 1 << 20;
}

fn open_gate() -> Gate {
    let g = Gate::closed();
    g.open();
    g
}

mod memory {
    use super::*;

    #[tokio::test(flavor = "multi_thread")]
    async fn a_url_lora_is_downloaded_once() {
        super::a_url_lora_is_downloaded_once(start(|c| c.allow_private_urls = true).await).await;
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn failed_downloads_fail_the_task_and_the_worker_goes_on() {
        let h = start(|c| {
            c.allow_private_urls = true;
            max_lora_bytes(c)
        })
        .await;
        super::failed_downloads_fail_the_task_and_the_worker_goes_on(h, true).await;
        let guarded = start(|_| {}).await;
        super::failed_downloads_fail_the_task_and_the_worker_goes_on(guarded, false).await;
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_lora_gone_before_the_run_fails_the_task() {
        let loras = lora_dir();
        let dir = loras.path().to_path_buf();
        let gate = Gate::closed();
        let h = start_with(
            tempfile::tempdir().unwrap(),
            |c| c.loras.dir = Some(dir),
            gate.clone(),
        )
        .await;
        super::a_lora_gone_before_the_run_fails_the_task(h, gate, loras).await;
    }
}

mod redis {
    use super::*;

    #[tokio::test(flavor = "multi_thread")]
    async fn a_url_lora_is_downloaded_once() {
        let h = start_redis_with(
            |c| c.allow_private_urls = true,
            open_gate(),
            OutputStore::Redis,
        )
        .await;
        super::a_url_lora_is_downloaded_once(h).await;
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn failed_downloads_fail_the_task_and_the_worker_goes_on() {
        let h = start_redis_with(
            |c| {
                c.allow_private_urls = true;
                max_lora_bytes(c)
            },
            open_gate(),
            OutputStore::Redis,
        )
        .await;
        super::failed_downloads_fail_the_task_and_the_worker_goes_on(h, true).await;
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_lora_gone_before_the_run_fails_the_task() {
        let loras = lora_dir();
        let dir = loras.path().to_path_buf();
        let gate = Gate::closed();
        let h = start_redis_with(
            |c| c.loras.dir = Some(dir),
            gate.clone(),
            OutputStore::Redis,
        )
        .await;
        super::a_lora_gone_before_the_run_fails_the_task(h, gate, loras).await;
    }
}

/// `riflex_freq_index` reaches the generator and is echoed; above the model's temporal RoPE
/// frequencies (8) or negative it is a 400 naming it.
#[tokio::test(flavor = "multi_thread")]
async fn riflex_freq_index_is_checked_against_the_model() {
    let h = start(|_| {}).await;
    let mut b = body("p");
    b["riflex_freq_index"] = json!(4);
    let id = submitted(&h, b).await;
    let d = h.wait(&id, &["completed"]).await;
    assert_eq!(d["input"]["riflex_freq_index"], 4);
    assert_eq!(h.seen.lock().unwrap()[0].riflex_freq_index, 4);
    // absent: off
    let id = submitted(&h, body("q")).await;
    h.wait(&id, &["completed"]).await;
    assert_eq!(h.seen.lock().unwrap()[1].riflex_freq_index, 0);
    for (k, want) in [
        (
            json!(9),
            "riflex_freq_index: must be from 0 (off) to 8 (this model's temporal RoPE frequencies), got 9",
        ),
        (
            json!(-1),
            "riflex_freq_index: must be an integer from 0 to 2147483647, got -1",
        ),
        (
            json!(1.5),
            "riflex_freq_index: must be an integer from 0 to 2147483647, got 1.5",
        ),
    ] {
        let mut b = body("p");
        b["riflex_freq_index"] = k.clone();
        assert_eq!(refused(&h, b).await, want, "{k}");
    }
}

/// The models route and the OpenAPI document describe both fields.
#[tokio::test(flavor = "multi_thread")]
async fn the_schema_describes_loras_and_riflex() {
    let h = start(|_| {}).await;
    let (s, v) = h
        .json("GET", "/api/v3/models", None, Some(crate::common::KEY))
        .await;
    assert_eq!(s, StatusCode::OK);
    let models = v["data"].as_array().unwrap();
    let props = &models.iter().find(|m| m["model_id"] == MODEL).unwrap()["api_schema"]["input"]
        ["properties"];
    // [null, the field's schema]
    let items = &props["loras"]["oneOf"][1]["items"];
    assert_eq!(items["required"], json!(["path"]), "{props}");
    assert_eq!(items["properties"]["scale"]["maximum"], 4.0);
    assert_eq!(props["riflex_freq_index"]["maximum"], 8);
    assert_eq!(props["loras"]["maxItems"], 3);
    let none = start(|c| c.loras.max = 0).await;
    let (_, v) = none
        .json("GET", "/api/v3/models", None, Some(crate::common::KEY))
        .await;
    assert_eq!(
        v["data"][0]["api_schema"]["input"]["properties"]["loras"]["maxItems"],
        0
    );
}
