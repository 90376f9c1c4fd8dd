//! The queue's fields over HTTP: `priority` and the deadline (`cancel_after`, Replicate's
//! `Cancel-After` header): their rules and 400s, the echo, the OpenAPI schema, positions and
//! the start order, and the code 5005 of a task past its deadline (not started, or running).

use crate::common::{body, start, start_with, Gate, Harness, KEY, MODEL};
use axum::body::Body;
use axum::http::{header, HeaderValue, Request, StatusCode};
use serde_json::{json, Value};
use std::time::Duration;

/// A submit of `body` with `Cancel-After: value` (each value of `values` one header line).
async fn submit_with_header(
    h: &Harness,
    body: Value,
    values: &[HeaderValue],
) -> (StatusCode, Value) {
    let mut req = Request::post(format!("/api/v3/{MODEL}"))
        .header(header::HOST, "gen.local:8000")
        .header(header::AUTHORIZATION, format!("Bearer {KEY}"))
        .header(header::CONTENT_TYPE, "application/json");
    for v in values {
        req = req.header("Cancel-After", v.clone());
    }
    let (s, _, bytes) = h
        .call(req.body(Body::from(body.to_string())).unwrap())
        .await;
    let v: Value = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(v["code"].as_u64(), Some(s.as_u16() as u64), "{v}");
    (s, v)
}

fn with(extra: Value) -> Value {
    let mut b = body("p");
    b.as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    b
}

#[tokio::test(flavor = "multi_thread")]
async fn queue_fields_are_checked_echoed_and_documented() {
    let h = start(|_| {}).await;
    let rule = "must be a duration from 1s to 24h: whole hours, minutes and seconds in that \
                order, like \"90s\", \"5m\" or \"1h30m\" (a bare number is seconds)";
    for (extra, want) in [
        (
            json!({"priority": "high"}),
            "priority: unknown variant `high`, expected `normal` or `low`".to_string(),
        ),
        (
            json!({"priority": 1}),
            "priority: invalid type: integer `1`, expected `normal` or `low`".to_string(),
        ),
        (
            json!({"cancel_after": "soon"}),
            format!("cancel_after: {rule}, got \"soon\""),
        ),
        (
            json!({"cancel_after": "0s"}),
            format!("cancel_after: {rule}, got \"0s\""),
        ),
        (
            json!({"cancel_after": "24h1s"}),
            format!("cancel_after: {rule}, got \"24h1s\""),
        ),
    ] {
        let (s, v) = h.submit(with(extra.clone())).await;
        assert_eq!(
            (s, v["message"].as_str()),
            (StatusCode::BAD_REQUEST, Some(&*want)),
            "{extra}"
        );
    }
    // the header: the same rule, the 400 naming it
    for bad in ["0", "25h", "1m1h", "5 minutes", "-1s"] {
        let (s, v) = submit_with_header(&h, body("p"), &[HeaderValue::from_static(bad)]).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{bad}: {v}");
        assert_eq!(
            v["message"],
            format!("Cancel-After: {rule}, got {bad:?}"),
            "{bad}"
        );
    }
    let odd = HeaderValue::from_bytes(b"5\xe9").unwrap();
    let (s, v) = submit_with_header(&h, body("p"), &[odd]).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    assert!(
        v["message"].as_str().unwrap().starts_with("Cancel-After: "),
        "{v}"
    );
    let twice = [
        HeaderValue::from_static("5m"),
        HeaderValue::from_static("6m"),
    ];
    let (s, v) = submit_with_header(&h, body("p"), &twice).await;
    assert_eq!(
        (s, v["message"].as_str()),
        (StatusCode::BAD_REQUEST, Some("Cancel-After: give it once"))
    );
    // both given: they must agree (as durations), else a 400 naming both
    let (s, v) = submit_with_header(
        &h,
        with(json!({"cancel_after": "2m"})),
        &[HeaderValue::from_static("90s")],
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    assert_eq!(
        v["message"],
        "cancel_after: \"2m\" differs from the Cancel-After header \"90s\": give one of them, \
         or the same duration"
    );
    let (s, v) = submit_with_header(
        &h,
        with(json!({"cancel_after": "1m30s", "priority": "low"})),
        &[HeaderValue::from_static("90s")],
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let input = &v["data"]["input"];
    assert_eq!(
        (&input["cancel_after"], &input["priority"]),
        (&json!("1m30s"), &json!("low"))
    );
    // the header alone: echoed as the body's field; no priority sent, none echoed
    let (s, v) = submit_with_header(&h, body("p"), &[HeaderValue::from_static(" 5m ")]).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let input = &v["data"]["input"];
    assert_eq!(input["cancel_after"], "5m");
    assert!(input.get("priority").is_none(), "{input}");
    h.wait(v["data"]["id"].as_str().unwrap(), &["completed"])
        .await;
    // the schema: the fields, their values, and the header of the submit route
    let (_, _, doc) = h
        .call(Request::get("/openapi.json").body(Body::empty()).unwrap())
        .await;
    let doc: Value = serde_json::from_slice(&doc).unwrap();
    let props = &doc["components"]["schemas"]["SubmitRequest"]["properties"];
    let text = props["priority"].to_string();
    assert!(
        text.contains("\"normal\"") && text.contains("\"low\""),
        "{text}"
    );
    assert!(
        props["cancel_after"].to_string().contains("1h30m"),
        "{props}"
    );
    let params = doc["paths"]["/api/v3/{owner}/{model}"]["post"]["parameters"].to_string();
    assert!(
        params.contains("\"Cancel-After\"") && params.contains("\"header\""),
        "{params}"
    );
    let (_, v) = h.json("GET", "/api/v3/models", None, Some(KEY)).await;
    let props = &v["data"][0]["api_schema"]["input"]["properties"];
    assert!(props["priority"].to_string().contains("\"low\""), "{props}");
    assert!(props["cancel_after"].is_object(), "{props}");
}

/// A server whose one worker holds a task (prompt "running") at its gate: the server, the gate
/// and the task's id.
async fn one_task_held() -> (Harness, Gate, String) {
    let gate = Gate::closed();
    let h = start_with(tempfile::tempdir().unwrap(), |_| {}, gate.clone()).await;
    let (_, v) = h.submit(body("running")).await;
    let running = v["data"]["id"].as_str().unwrap().to_string();
    h.wait(&running, &["processing"]).await;
    (h, gate, running)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_low_task_waits_behind_normal_ones() {
    let (h, gate, running) = one_task_held().await;
    let (s, v) = h
        .submit(with(json!({"prompt": "low", "priority": "low"})))
        .await;
    assert_eq!(
        (s, &v["data"]["queue_position"]),
        (StatusCode::OK, &json!(0)),
        "{v}"
    );
    let low = v["data"]["id"].as_str().unwrap().to_string();
    let (_, v) = h
        .submit(with(json!({"prompt": "normal", "priority": "normal"})))
        .await;
    let normal = v["data"]["id"].as_str().unwrap().to_string();
    // admitted after the low task, the normal one is ahead of it
    assert_eq!(v["data"]["queue_position"], 0, "{v}");
    assert_eq!(h.get(&low).await["queue_position"], 1);
    gate.open();
    for id in [&running, &low, &normal] {
        h.wait(id, &["completed"]).await;
    }
    let order: Vec<String> = h
        .seen
        .lock()
        .unwrap()
        .iter()
        .map(|s| s.prompt.clone())
        .collect();
    assert_eq!(order, ["running", "normal", "low"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_task_past_its_deadline_ends_with_5005() {
    // waiting past its deadline: failed when the worker reaches it, never started
    let (h, gate, running) = one_task_held().await;
    let (s, v) = h
        .submit(with(json!({"prompt": "late", "cancel_after": "1s"})))
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let late = v["data"]["id"].as_str().unwrap().to_string();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    gate.open();
    let d = h.wait(&late, &["failed", "completed", "cancelled"]).await;
    assert_eq!(
        (d["status"].as_str(), d["code"].as_u64()),
        (Some("failed"), Some(5005)),
        "{d}"
    );
    assert!(d["started_at"].is_null(), "{d}");
    assert!(
        d["error"]
            .as_str()
            .unwrap()
            .contains("did not start before its deadline"),
        "{d}"
    );
    h.wait(&running, &["completed"]).await;
    assert_eq!(h.seen.lock().unwrap().len(), 1, "the late task never ran");

    // running at its deadline (a bare number is seconds): cancelled at the next step
    let held = start_with(tempfile::tempdir().unwrap(), |_| {}, Gate::closed()).await;
    let (s, v) = submit_with_header(&held, body("slow"), &[HeaderValue::from_static("1")]).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let id = v["data"]["id"].as_str().unwrap();
    let d = held.wait(id, &["failed", "completed", "cancelled"]).await;
    assert_eq!(
        (d["status"].as_str(), d["code"].as_u64()),
        (Some("cancelled"), Some(5005)),
        "{d}"
    );
    assert!(
        d["error"]
            .as_str()
            .unwrap()
            .contains("still running at its deadline"),
        "{d}"
    );
    assert!(d["outputs"].as_array().unwrap().is_empty(), "{d}");
    assert_eq!(d["input"]["cancel_after"], "1");
}
