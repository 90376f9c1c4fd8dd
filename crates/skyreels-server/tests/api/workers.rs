//! Several workers on one queue, workers that fail to load, and draining at shutdown.

use crate::common::{
    body, config, metrics_text, start_with, start_workers_with, Fake, Gate, Harness, KEY,
};
use axum::body::Body;
use axum::http::{header, Request, StatusCode};
use skyreels_server::generator::Generator;
use skyreels_server::Server;
use std::sync::Arc;
use std::time::Duration;

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
    let ok: skyreels_server::generator::GeneratorLoader =
        Box::new(|| Ok(Box::new(Fake::new(Gate::default(), Arc::default())) as Box<dyn Generator>));
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

/// Issue 30: with `--warmup` each worker runs one smallest generation (1 step, 1 frame, the
/// size multiple) after loading, and `/ready` answers 503 until it ran; it is no task.
#[tokio::test(flavor = "multi_thread")]
async fn the_warmup_generation_runs_before_ready_and_is_no_task() {
    let dir = tempfile::tempdir().unwrap();
    let gate = Gate::closed();
    let seen = Arc::new(std::sync::Mutex::new(vec![]));
    let (g, s) = (gate.clone(), seen.clone());
    let loader: skyreels_server::generator::GeneratorLoader =
        Box::new(move || Ok(Box::new(Fake::new(g, s)) as Box<dyn Generator>));
    let mut c = config(dir.path());
    c.warmup = true;
    let mut server = Server::start(c, loader).unwrap();
    let h = Harness {
        router: server.router(),
        server: None,
        seen,
        dir,
        redis: None,
    };
    // the gate holds the warm-up's step: loaded, not warm, not ready
    while h.seen.lock().unwrap().is_empty() {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let (s, _) = h.json("GET", "/ready", None, None).await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE);
    gate.open();
    server.wait_loaded().await.unwrap();
    let (s, v) = h.json("GET", "/ready", None, None).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    {
        let seen = h.seen.lock().unwrap();
        assert_eq!(seen.len(), 1);
        let w = &seen[0];
        assert_eq!(
            (w.width, w.height, w.num_frames, w.steps),
            (16, 16, 1, 1),
            "{w:?}"
        );
        assert_eq!(w.image.as_ref().unwrap().dimensions(), (16, 16));
    }
    let text = metrics_text(&h).await;
    assert!(text.contains("skyreels_jobs_submitted_total 0"), "{text}");
    assert!(!text.contains("skyreels_jobs_finished_total"), "{text}");
    // no record and no video in the output folder
    let files: Vec<_> = walk(h.dir.path());
    assert!(
        files
            .iter()
            .all(|p| p.extension().is_none_or(|e| e != "mp4" && e != "json")),
        "{files:?}"
    );
    // the first task is the queue's first
    let (s, v) = h.submit(body("p")).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let id = v["data"]["id"].as_str().unwrap();
    h.wait(id, &["completed"]).await;
    server.drain().await;
}

/// A warm-up that cannot run fails the start with its reason.
#[tokio::test(flavor = "multi_thread")]
async fn a_warmup_that_fails_fails_the_start() {
    let dir = tempfile::tempdir().unwrap();
    let loader: skyreels_server::generator::GeneratorLoader =
        Box::new(|| Ok(Box::new(Fake::new(Gate::default(), Arc::default())) as Box<dyn Generator>));
    let mut c = config(dir.path());
    c.warmup = true;
    c.max_work = 1e-9;
    let mut server = Server::start(c, loader).unwrap();
    let e = server.wait_loaded().await.unwrap_err().to_string();
    assert!(e.contains("warm-up generation"), "{e}");
    assert!(e.contains("--max-work"), "{e}");
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = vec![];
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}
