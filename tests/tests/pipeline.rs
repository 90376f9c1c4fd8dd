//! End-to-end generation at parity with diffusers' SkyReels pipelines on the bundled tiny weights.
//!
//! Fixtures come from `scripts/gen_pipeline_fixtures.py` (run on `weights/tiny`, made by
//! `scripts/gen_tiny_weights.py`).

use candle_core::{DType, Device, Tensor};
use serde_json::Value;
use skyreels_pipeline::generate::{
    GenerateError, GenerateParams, ModelPaths, Pipeline, DEFAULT_NEGATIVE_PROMPT,
};
use skyreels_pipeline::scheduler::{FlowMatchEuler, SchedulerConfig};
use skyreels_tests::{fixture, load_metadata, load_tensors, tiny_weights};
use std::collections::HashMap;
use std::path::Path;

/// Frames are in [0, 1]. Both sides run f32 on the CPU; summation-order differences (~1e-6
/// relative per op) pass through the text encoders, up to 3 steps x 2 transformer passes and
/// the VAE decoder, and amplify through the sampling loop. The bound is 5e-4 absolute;
/// a wrong sign, scale or dtype step moves frames by >= 1e-2.
const FRAME_TOL: f32 = 5e-4;

fn case(name: &str) -> (HashMap<String, Tensor>, Value) {
    let path = fixture(&format!("pipeline/{name}.safetensors"));
    let req = load_metadata(&path)["request"].clone();
    (load_tensors(&path), serde_json::from_str(&req).unwrap())
}

fn params(io: &HashMap<String, Tensor>, req: &Value) -> GenerateParams {
    let image = io.get("image").map(|t| {
        let (h, w, _) = t.dims3().unwrap();
        let raw = t.flatten_all().unwrap().to_vec1::<u8>().unwrap();
        image::RgbImage::from_raw(w as u32, h as u32, raw).unwrap()
    });
    let num = |k: &str| req[k].as_f64().unwrap();
    GenerateParams {
        prompt: req["prompt"].as_str().unwrap().into(),
        negative_prompt: req["negative_prompt"].as_str().map(str::to_string),
        image,
        height: num("height") as usize,
        width: num("width") as usize,
        num_frames: num("num_frames") as usize,
        steps: num("steps") as usize,
        guidance_scale: num("guidance_scale"),
        embedded_guidance_scale: num("embedded_guidance_scale"),
        seed: 0,
        noise: Some(io["latents"].clone()),
    }
}

fn pipeline(transformer: Option<&Path>) -> Pipeline {
    let paths = ModelPaths::local(&tiny_weights(), transformer).unwrap();
    Pipeline::load(paths, DType::F32, &Device::Cpu).unwrap()
}

fn max_abs(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar()
        .unwrap()
}

fn check(name: &str, pipe: &Pipeline) {
    let (io, req) = case(name);
    let p = params(&io, &req);
    // the schedule diffusers ran, bit for bit
    let cfg = SchedulerConfig::from_dir(&tiny_weights()).unwrap();
    let want: Vec<f32> = io["timesteps"].to_vec1().unwrap();
    assert_eq!(
        FlowMatchEuler::new(&cfg, p.steps).timesteps(),
        want,
        "{name}"
    );
    let mut steps = Vec::new();
    let video = pipe
        .generate(&p, &mut |done, total| {
            steps.push((done, total));
            true
        })
        .unwrap();
    assert_eq!(
        steps,
        (1..=p.steps).map(|i| (i, p.steps)).collect::<Vec<_>>()
    );
    let err = max_abs(&video.frames, &io["frames"]);
    assert!(err <= FRAME_TOL, "{name}: max abs error {err:e}");
}

#[test]
fn image_to_video_with_true_cfg_matches_diffusers() {
    check("i2v_cfg", &pipeline(None));
}

#[test]
fn image_to_video_with_embedded_guidance_only_matches_diffusers() {
    check("i2v_embedded", &pipeline(None));
}

#[test]
fn text_to_video_with_true_cfg_matches_diffusers() {
    check("t2v", &pipeline(Some(&fixture("pipeline/t2v_transformer"))));
}

#[test]
fn same_seed_same_frames_other_seed_other_frames() {
    let pipe = pipeline(None);
    let (io, req) = case("i2v_embedded");
    let mut p = params(&io, &req);
    p.noise = None;
    p.steps = 1;
    let mut run = |seed| {
        p.seed = seed;
        pipe.generate(&p, &mut |_, _| true).unwrap().frames
    };
    let (a, b, c) = (run(7), run(7), run(8));
    assert_eq!(max_abs(&a, &b), 0.0);
    assert!(max_abs(&a, &c) > 1e-3);
}

type Edit = dyn Fn(&mut GenerateParams);

#[test]
fn bad_requests_are_refused_with_the_setting_named() {
    let pipe = pipeline(None);
    let (io, req) = case("i2v_embedded");
    let base = params(&io, &req);
    let cases: Vec<(Box<Edit>, &str)> = vec![
        (
            Box::new(|p| p.height = 40),
            "height must be a positive multiple of 16",
        ),
        (Box::new(|p| p.width = 0), "width"),
        (Box::new(|p| p.num_frames = 6), "num_frames must be 4k+1"),
        (Box::new(|p| p.steps = 0), "steps"),
        (Box::new(|p| p.guidance_scale = f64::NAN), "guidance_scale"),
        (Box::new(|p| p.image = None), "an image is required"),
        (Box::new(|p| p.num_frames = 9), "noise has shape"),
        (Box::new(|p| p.prompt = " ".into()), "the prompt is empty"),
    ];
    for (edit, want) in cases {
        let mut p = base.clone();
        edit(&mut p);
        let e = pipe.generate(&p, &mut |_, _| true).unwrap_err().to_string();
        assert!(e.contains(want), "{e:?} should mention {want:?}");
    }
    // cancelling between steps
    let e = pipe.generate(&base, &mut |_, _| false).unwrap_err();
    assert!(matches!(e, GenerateError::Cancelled));
}

#[test]
fn model_folders_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    let e = ModelPaths::local(&dir.path().join("nope"), None).unwrap_err();
    assert!(e.to_string().contains("does not exist"), "{e}");
    let e = ModelPaths::local(dir.path(), None).unwrap_err();
    assert!(e.to_string().contains("model_index.json"), "{e}");
    assert!(!DEFAULT_NEGATIVE_PROMPT.is_empty());
}
