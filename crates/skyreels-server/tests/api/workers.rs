//! Several workers on one queue, workers that fail to load, and draining at shutdown.

use crate::common::{body, config, start_with, start_workers_with, Fake, Gate, KEY};
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
