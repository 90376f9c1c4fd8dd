//! Submits: validation and its messages, the WaveSpeed fields, sizes, seeds, caches and options
//! as the generator gets them, images as they arrive, and the limits a task is refused by.

use crate::common::{
    body, config, png_data_uri, start, start_with, Fake, Gate, Harness, KEY, MODEL,
};
use axum::body::Body;
use axum::http::{header, Request, StatusCode};
use base64::Engine;
use serde_json::{json, Value};
use skyreels_params::{CacheSpec, MagCacheSpec, TaylorSeerSpec, TokenLayout, Ulysses};
use skyreels_server::generator::Generator;
use skyreels_server::Server;
use std::sync::{Arc, Mutex};
use std::time::Duration;

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
        (
            with(json!("magcache:0.1,max_skip=2,retention=0.2")),
            CacheSpec::MagCache(MagCacheSpec {
                threshold: 0.1,
                max_skip: 2,
                retention: 0.2,
            }),
            3,
        ),
        (
            with(json!("taylorseer:interval=3,order=2,warmup=3")),
            CacheSpec::TaylorSeer(TaylorSeerSpec {
                interval: 3,
                order: 2,
                ..TaylorSeerSpec::default()
            }),
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
        // denoising, decoding and the safety checker
        assert_eq!(d["timings"]["inference"], 45, "{d}");
    }
    for bad in [
        json!("fast"),
        json!("first-block:0"),
        json!("teacache:"),
        json!("magcache:0.1,max_skip=0"),
        json!("magcache:0.1,retention=2"),
        json!("taylorseer:interval=0"),
        json!("taylorseer:order=5"),
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
            "loras: [0] \"Remade-AI/Deflate\": a name in --lora-dir has no slashes, and a hub file is OWNER/REPO/FILE.safetensors (an http(s) URL is the third form)",
        ),
        (
            json!({"loras": "Remade-AI/Deflate"}),
            "loras: invalid type: string \"Remade-AI/Deflate\", expected a sequence",
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
            ulysses: Some(Ulysses {
                degree: 2,
                layout: TokenLayout {
                    spatial_compression: 8,
                    temporal_compression: 4,
                    patch_size: 2,
                    patch_size_t: 1,
                },
            }),
            ..Fake::new(g, sn)
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
