//! A prediction's life: its shape, polling, sync mode, base64 outputs, the queue bound,
//! cancels and deletes, and failures.

use crate::common::{body, start, start_with, Gate, KEY, MODEL};
use axum::body::Body;
use axum::http::{header, Request, StatusCode};
use base64::Engine;
use serde_json::{json, Value};
use std::time::Duration;

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
    // denoising 40 + decoding 2 + the safety checker's 3
    assert_eq!(d["timings"]["inference"], 45);
    assert_eq!(d["timings"]["safety_check"], 3);
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

/// The safety checker: a flagged video completes with `has_nsfw_contents: [true]` under
/// `--nsfw-action flag` (the default), `enable_safety_checker: false` skips it, and under
/// `block` a flagged task fails with 1451 and keeps no file; `/api/v3/models` names the checker.
#[tokio::test(flavor = "multi_thread")]
async fn the_safety_checker_flags_or_blocks_a_video() {
    let h = start(|_| {}).await;
    let (_, v) = h.json("GET", "/api/v3/models", None, Some(KEY)).await;
    assert_eq!(
        v["data"][0]["safety_checker"],
        crate::common::FAKE_CHECKER,
        "{v}"
    );
    let (_, v) = h.submit(body("nsfw cat")).await;
    let d = h
        .wait(v["data"]["id"].as_str().unwrap(), &["completed"])
        .await;
    assert_eq!(d["has_nsfw_contents"], json!([true]));
    assert_eq!(d["timings"]["safety_check"], 3);
    let mut off = body("nsfw cat");
    off["enable_safety_checker"] = json!(false);
    let (_, v) = h.submit(off).await;
    let d = h
        .wait(v["data"]["id"].as_str().unwrap(), &["completed"])
        .await;
    assert_eq!(d["has_nsfw_contents"], json!([false]), "not checked");
    assert!(d["timings"].get("safety_check").is_none(), "{d}");
    assert_eq!(d["input"]["enable_safety_checker"], false);

    let h = start(|c| c.nsfw_action = skyreels_server::engine::worker::NsfwAction::Block).await;
    let (_, v) = h.submit(body("nsfw cat")).await;
    let id = v["data"]["id"].as_str().unwrap();
    let d = h.wait(id, &["failed"]).await;
    assert_eq!(d["code"], 1451);
    assert!(
        d["error"].as_str().unwrap().contains("--nsfw-action block"),
        "{d}"
    );
    assert_eq!(
        (d["outputs"].clone(), d["has_nsfw_contents"].clone()),
        (json!([]), json!([]))
    );
    let videos: Vec<_> = std::fs::read_dir(h.dir.path().join("videos"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(videos.is_empty(), "no file kept: {videos:?}");
    // block checks every video, whatever the request asks
    let mut off = body("nsfw cat");
    off["enable_safety_checker"] = json!(false);
    let (_, v) = h.submit(off).await;
    let d = h.wait(v["data"]["id"].as_str().unwrap(), &["failed"]).await;
    assert_eq!(d["code"], 1451);
    // a clean video under block completes
    let (_, v) = h.submit(body("a cat")).await;
    let d = h
        .wait(v["data"]["id"].as_str().unwrap(), &["completed"])
        .await;
    assert_eq!(d["has_nsfw_contents"], json!([false]));
}
