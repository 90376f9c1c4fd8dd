//! What is kept on disk: restart recovery, retention, compact records, corrupt records and
//! orphans.

use crate::common::{body, start, start_with, Gate};
use axum::body::Body;
use axum::http::{Request, StatusCode};
use serde_json::json;
use skyreels_test_support::copy_tree;
use std::time::Duration;

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
    // the two folders merged, the first one's webhook secret kept
    copy_tree(first.dir.path(), crash.path());
    copy_tree(h.dir.path(), crash.path());
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
