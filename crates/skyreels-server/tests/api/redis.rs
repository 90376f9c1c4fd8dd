//! The Redis engine (a real `redis-server` per test): the same routes, its guards, shared output
//! folders, uploads in windows and quotas, compressed queued images, faults and dead workers.

use crate::common::{
    body, metrics_text, multipart_upload, png_bytes, png_data_uri, start_on_redis,
    start_redis_with, text_params, Gate, RedisServer, KEY, MODEL,
};
use axum::body::Body;
use axum::http::{header, Request, StatusCode};
use base64::Engine;
use serde_json::{json, Value};
use skyreels_server::backend::redis::OutputStore;
use skyreels_server::engine::Queued;
use std::time::Duration;

/// The routes whose answers come from Redis (the engine's rules themselves are the conformance
/// suite's, `engine.rs`, on both backends): readiness and the models from the workers'
/// announcements, outputs and base64 read from Redis in windows with Range, deletes, sync mode,
/// uploads kept in Redis, metrics, and 503 in the envelope once Redis is gone.
#[tokio::test(flavor = "multi_thread")]
async fn redis_serves_outputs_uploads_and_503s() {
    let gate = Gate::closed();
    gate.open();
    let mut h = start_redis_with(|_| {}, gate.clone(), OutputStore::Redis).await;
    let (s, v) = h.json("GET", "/ready", None, None).await;
    assert_eq!(
        (s, v["data"]["status"].as_str()),
        (StatusCode::OK, Some("ready"))
    );
    let (_, v) = h.json("GET", "/api/v3/models", None, Some(KEY)).await;
    assert_eq!(v["data"][0]["model_id"], MODEL, "{v}");
    let id = |v: &Value| v["data"]["id"].as_str().unwrap().to_string();
    let (_, v) = h.submit(body("p")).await;
    let task = id(&v);
    let done = h.wait(&task, &["completed"]).await;
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
    let (s, v) = h.delete(&task).await;
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
    let (s, _) = h.result(&task).await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE);
    let (s, _) = h.json("GET", "/ready", None, None).await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE);
}

/// The Redis engine's own guards, through the engine: tasks whose node died before queueing
/// them and tasks for a model no worker serves any more fail at the sweep (the same 5003 as the
/// queue TTL), a retried enqueue queues once, the webhook once-guard, and the webhook secret
/// kept in Redis. (The queue bound and the ticket bounds are the conformance suite's.)
#[tokio::test(flavor = "multi_thread")]
async fn redis_sweep_and_guards() {
    use skyreels_server::engine::task::{now_ms, JobRecord, Status, TaskCode};
    use skyreels_server::engine::AdmitError;
    let h = start_redis_with(|c| c.max_queue = 2, Gate::closed(), OutputStore::Redis).await;
    let c = &h.server.as_ref().unwrap().state.jobs;
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
    assert!(matches!(
        c.admit(record("other/model", 0)).await,
        Err(AdmitError::QueueFull)
    ));
    // the old one was never queued: failed 5003; the fresh one keeps waiting
    let ten_minutes = Duration::from_secs(600);
    assert_eq!(c.sweep(ten_minutes).await.unwrap(), 1);
    let (r, _) = c.get(&old.id).await.unwrap().unwrap();
    assert_eq!((r.status, r.code), (Status::Failed, TaskCode::Unavailable));
    let (r, pos) = c.get(&fresh.id).await.unwrap().unwrap();
    assert_eq!((r.status, pos), (Status::Created, Some(0)));
    // a retried enqueue queues once
    let request = Queued {
        params: text_params(),
        image: None,
    };
    c.enqueue(&fresh.id, "other/model", request.clone()).await;
    c.enqueue(&fresh.id, "other/model", request.clone()).await;
    let len: usize = redis::cmd("XLEN")
        .arg("skyreels:queue:other/model")
        .query(&mut conn)
        .unwrap();
    assert_eq!(len, 1);
    // an old task that was queued is not failed as stalled
    let queued_old = record("other/model", 20 * 60_000);
    c.admit(queued_old.clone()).await.unwrap();
    c.enqueue(&queued_old.id, "other/model", request).await;
    assert_eq!(c.sweep(ten_minutes).await.unwrap(), 0);
    assert_eq!(
        c.get(&queued_old.id).await.unwrap().unwrap().0.status,
        Status::Created
    );
    // each terminal state's webhook is claimed once
    let (r, _) = c.get(&old.id).await.unwrap().unwrap();
    assert!(c.claim_webhook(&r).await);
    assert!(!c.claim_webhook(&r).await);
    // an open ticket expires in minutes
    let (_, _token) = c
        .open_ticket("a.png", "image/png", 10, "http://x", "k1")
        .await
        .unwrap();
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
        .models(None)
        .await
        .unwrap()
        .into_iter()
        .flatten()
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
async fn redis_outputs_on_a_shared_folder() {
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
    use skyreels_server::backend::redis::WINDOW;
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
    let c = &h.server.as_ref().unwrap().state.jobs;
    let forged = skyreels_server::engine::task::JobRecord::created(
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
    let gate = Gate::closed();
    gate.open();
    let h = start_redis_with(|_| {}, gate.clone(), OutputStore::Redis).await;
    let c = &h.server.as_ref().unwrap().state.jobs;
    let mut conn = h.redis.as_ref().unwrap().conn();
    assert_eq!(c.setup_problem().await, None);
    let set = |conn: &mut redis::Connection, k: &str, v: &str| {
        let _: () = redis::cmd("CONFIG")
            .arg("SET")
            .arg(k)
            .arg(v)
            .query(conn)
            .unwrap();
    };
    set(&mut conn, "maxmemory-policy", "allkeys-lru");
    let problem = c.setup_problem().await.unwrap();
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
    let gate = Gate::closed();
    gate.open();
    let h = start_redis_with(
        |c| c.redis.as_mut().unwrap().claim_timeout = Duration::from_millis(100),
        gate,
        OutputStore::Redis,
    )
    .await;
    let c = &h.server.as_ref().unwrap().state.jobs;
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
