//! CFG gating's submit field `cfg_gate`: from the submit or the server's default (`--cfg-gate`),
//! echoed, checked (a 400 naming it) and described in the OpenAPI document.

use crate::common::{body, start, KEY};
use axum::body::Body;
use axum::http::{Request, StatusCode};
use serde_json::{json, Value};

#[tokio::test(flavor = "multi_thread")]
async fn cfg_gate_comes_from_the_submit_or_the_server_default() {
    let h = start(|c| c.cfg_gate = Some(0.8)).await;
    let with = |gate: Value| {
        let mut b = body("FPS-24, a gated cat");
        b["cfg_gate"] = gate;
        b
    };
    let cases = [
        (body("FPS-24, the server's gate"), Some(0.8)),
        (with(json!(0.6)), Some(0.6)),
        (with(json!(0.25)), Some(0.25)),
    ];
    for (i, (b, want)) in cases.into_iter().enumerate() {
        let (s, v) = h.submit(b.clone()).await;
        assert_eq!(s, StatusCode::OK, "{v}");
        let d = h
            .wait(v["data"]["id"].as_str().unwrap(), &["completed"])
            .await;
        assert_eq!(h.seen.lock().unwrap()[i].cfg_gate, want, "{b}");
        assert_eq!(
            d["input"]["cfg_gate"],
            b.get("cfg_gate").cloned().unwrap_or(Value::Null)
        );
    }
    // off unless the server sets it
    let off = start(|_| {}).await;
    let (_, v) = off.submit(body("p")).await;
    off.wait(v["data"]["id"].as_str().unwrap(), &["completed"])
        .await;
    assert_eq!(off.seen.lock().unwrap()[0].cfg_gate, None);
    for bad in [json!(0), json!(1), json!(1.5), json!(-0.1), json!("0.5")] {
        let (s, v) = h.submit(with(bad.clone())).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{bad}: {v}");
        let m = v["message"].as_str().unwrap();
        assert!(
            m.starts_with("cfg_gate: ") && m.contains("above 0 and below 1"),
            "{bad}: {m}"
        );
    }
    // the schema: an open interval, in the OpenAPI document and the models route
    let (_, _, doc) = h
        .call(Request::get("/openapi.json").body(Body::empty()).unwrap())
        .await;
    let doc: Value = serde_json::from_slice(&doc).unwrap();
    // [null, the field's schema]
    let gate = &doc["components"]["schemas"]["SubmitRequest"]["properties"]["cfg_gate"]["oneOf"][1];
    let bound = |k: &str| gate[k].as_f64();
    assert_eq!(
        (bound("exclusiveMinimum"), bound("exclusiveMaximum")),
        (Some(0.0), Some(1.0)),
        "{gate}"
    );
    assert!(
        gate["description"]
            .as_str()
            .unwrap()
            .contains("ceil(cfg_gate x num_inference_steps)"),
        "{gate}"
    );
    let (_, v) = h.json("GET", "/api/v3/models", None, Some(KEY)).await;
    let props = &v["data"][0]["api_schema"]["input"]["properties"];
    assert!(props["cfg_gate"].is_object(), "{props}");
}
