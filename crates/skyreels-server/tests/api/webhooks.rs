//! Webhooks: signatures, retries, the delivery bound and the URL checks.

use crate::common::{body, start};
use axum::http::{header, StatusCode};
use axum::Router;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::sync::{Arc, Mutex};
use std::time::Duration;

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
