//! The NSFW safety checker (CLIP's vision tower, shared encoder layers with the text model) at
//! parity with diffusers' `StableDiffusionSafetyChecker` and transformers' `CLIPImageProcessor`
//! (PIL backend). Fixtures come from `scripts/fixtures/safety.py`.

use candle_core::{DType, Device, IndexOp, Tensor};
use image::RgbImage;
use skyreels_pipeline::hub::HubOptions;
use skyreels_pipeline::loading::TRANSFORMERS_WEIGHTS;
use skyreels_pipeline::safety::{FrameVerdict, SafetyChecker, SafetyError};
use skyreels_tests::{copy_dir, fixture, load_tensors, max_abs, rewrite_checkpoint};
use std::collections::HashMap;
use std::path::Path;

/// Pixel values: the same integer resampling and the same f32 operations as the reference, so
/// they are expected bit-equal; 1e-5 is far below one 8-bit level (1/255/0.2758 ≈ 0.014), so any
/// difference in resizing, cropping or padding fails.
const PIXEL_TOL: f32 = 1e-5;
/// Cosine distances: f32 on both sides through a 2-layer ViT; only summation order differs
/// (~1e-7), while a wrong patch order, norm or attention moves them by > 1e-2.
const COS_TOL: f32 = 1e-5;
/// Scores are rounded to 3 decimals, so they are equal or at least 0.001 apart; the fixture keeps
/// every unrounded score 1e-5 clear of a rounding boundary, so any difference is a bug.
const SCORE_TOL: f32 = 1e-5;

struct Reference {
    names: Vec<String>,
    frames: Vec<RgbImage>,
    tensors: HashMap<String, Tensor>,
    json: serde_json::Value,
}

fn png(path: &Path) -> RgbImage {
    image::open(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .to_rgb8()
}

fn reference() -> Reference {
    let text = std::fs::read_to_string(fixture("safety/reference.json")).unwrap();
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    let names: Vec<String> = json["frames"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["name"].as_str().unwrap().to_string())
        .collect();
    let frames = names
        .iter()
        .map(|n| png(&fixture(&format!("safety/frames/{n}.png"))))
        .collect();
    Reference {
        names,
        frames,
        tensors: load_tensors(&fixture("safety/reference.safetensors")),
        json,
    }
}

fn checker(dir: &Path) -> SafetyChecker {
    SafetyChecker::from_dir(dir, &Device::Cpu, DType::F32).unwrap()
}

fn rows(t: &Tensor) -> Vec<Vec<f32>> {
    t.to_vec2().unwrap()
}

fn flags(t: &Tensor) -> Vec<bool> {
    t.to_vec1::<u8>().unwrap().iter().map(|&v| v == 1).collect()
}

fn assert_close(got: &[f32], want: &[f32], tol: f32, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}");
    let err = got
        .iter()
        .zip(want)
        .map(|(g, w)| (g - w).abs())
        .fold(0f32, f32::max);
    assert!(
        err <= tol,
        "{what}: max abs error {err:e}: {got:?} vs {want:?}"
    );
}

/// Checks verdicts (in the reference's frame order) against the reference.
fn assert_verdicts(got: &[FrameVerdict], r: &Reference) {
    let (special, concept) = (
        rows(&r.tensors["special_scores"]),
        rows(&r.tensors["concept_scores"]),
    );
    let (nsfw, care) = (flags(&r.tensors["nsfw"]), flags(&r.tensors["special_care"]));
    for (i, v) in got.iter().enumerate() {
        let name = &r.names[i];
        assert_close(&v.special_scores, &special[i], SCORE_TOL, name);
        assert_close(&v.concept_scores, &concept[i], SCORE_TOL, name);
        assert_eq!((v.nsfw, v.special_care), (nsfw[i], care[i]), "{name}");
    }
}

#[test]
fn safety_preprocessing_matches_clip_image_processor() {
    let r = reference();
    let table = rows(&r.tensors["table"]);
    let checker = checker(&fixture("safety/checker"));
    for (name, frame) in r.names.iter().zip(&r.frames) {
        let got = checker.pixel_values(&[frame]).unwrap().i(0).unwrap();
        // the reference's pixel values: its 8-bit image after resize and crop through its
        // per-channel level -> value table (scripts/fixtures/safety.py asserts this is exact)
        let levels = png(&fixture(&format!("safety/levels/{name}.png")));
        let (w, h) = levels.dimensions();
        let want: Vec<f32> = (0..3)
            .flat_map(|c| {
                let (levels, table) = (&levels, &table);
                (0..h).flat_map(move |y| {
                    (0..w).map(move |x| table[c][usize::from(levels.get_pixel(x, y).0[c])])
                })
            })
            .collect();
        let want = Tensor::from_vec(want, (3, h as usize, w as usize), &Device::Cpu).unwrap();
        let err = max_abs(&got, &want);
        assert!(err <= PIXEL_TOL, "{name}: max abs error {err:e}");
    }
}

#[test]
fn safety_distances_scores_and_flags_match_diffusers() {
    let r = reference();
    let checker = checker(&fixture("safety/checker"));
    let frames: Vec<&RgbImage> = r.frames.iter().collect();
    let d = checker
        .model()
        .cosine_distances(&checker.pixel_values(&frames).unwrap())
        .unwrap();
    for (i, name) in r.names.iter().enumerate() {
        let want = rows(&r.tensors["special_cos"]);
        assert_close(&d.special[i], &want[i], COS_TOL, name);
        let want = rows(&r.tensors["cos"]);
        assert_close(&d.concept[i], &want[i], COS_TOL, name);
    }
    assert_verdicts(&checker.check_frames(&r.frames).unwrap(), &r);
}

#[test]
fn safety_special_care_adjustment_flags_a_frame() {
    // frame a has a positive special-care score, so every later score gets +0.01; its concept
    // ja is positive only through that: 0 < score < 0.01 means cos - threshold < 0
    let r = reference();
    let (a, ja) = (
        r.json["special_care_frame"].as_u64().unwrap() as usize,
        r.json["adjusted_concept"].as_u64().unwrap() as usize,
    );
    let v = &checker(&fixture("safety/checker"))
        .check_frames(&r.frames[a..=a])
        .unwrap()[0];
    assert!(v.special_care && v.nsfw, "{v:?}");
    let positive: Vec<usize> = (0..v.concept_scores.len())
        .filter(|&j| v.concept_scores[j] > 0.0)
        .collect();
    assert_eq!(positive, vec![ja]);
    assert!(v.concept_scores[ja] < 0.01, "{v:?}");
    // special 1 is positive only through special 0's adjustment as well
    assert!(v.special_scores[0] > 0.0 && (0.0..0.01).contains(&v.special_scores[1]));
}

#[test]
fn safety_check_clip_picks_spread_frames() {
    let r = reference();
    let checker = checker(&fixture("safety/checker"));
    let all = checker.check_frames(&r.frames).unwrap();
    let nsfw = flags(&r.tensors["nsfw"]);
    for (n, picked) in [
        (3, vec![0, 3, 6]),
        (1, vec![3]),
        (2, vec![0, 6]),
        (7, (0..7).collect()),
        (10, (0..7).collect()),
    ] {
        let v = checker.check_clip(&r.frames, n).unwrap();
        let got: Vec<usize> = v.frames.iter().map(|f| f.0).collect();
        assert_eq!(got, picked, "n = {n}");
        for (i, fv) in &v.frames {
            assert_eq!(fv, &all[*i], "n = {n}, frame {i}");
        }
        assert_eq!(v.flagged, picked.iter().any(|&i| nsfw[i]), "n = {n}");
    }
    // more frames than one batch (8): batches of 8, 8 and 1 give each frame its own verdict
    let many: Vec<RgbImage> = r.frames.iter().cycle().take(17).cloned().collect();
    let got = checker.check_frames(&many).unwrap();
    assert_eq!(
        got,
        all.iter().cycle().take(17).cloned().collect::<Vec<_>>()
    );
    // frame 3 alone is clean, frames 0 and 6 include a flagged one
    assert!(!checker.check_clip(&r.frames, 1).unwrap().flagged);
    assert!(checker.check_clip(&r.frames, 2).unwrap().flagged);
    let e = checker.check_clip(&r.frames, 0).unwrap_err();
    assert!(matches!(e, SafetyError::Invalid(_)), "{e}");
    assert!(checker.check_clip(&[], 3).is_err());
}

#[test]
fn safety_check_video_takes_pipeline_frames() {
    // the pipeline's frames (count, h, w, 3) in [0, 1]: level / 255 converts back to the level
    let r = reference();
    let checker = checker(&fixture("safety/checker"));
    let (frame, clean) = (&r.frames[0], &r.frames[3]);
    assert_eq!(frame.dimensions(), (960, 544));
    let clean = image::imageops::resize(clean, 960, 544, image::imageops::FilterType::Nearest);
    let video: Vec<f32> = [frame, &clean, &clean, &clean]
        .iter()
        .flat_map(|img| img.as_raw().iter().map(|&v| f32::from(v) / 255.0))
        .collect();
    let video = Tensor::from_vec(video, (4, 544, 960, 3), &Device::Cpu).unwrap();
    let v = checker.check_video(&video, 2).unwrap();
    let want = checker.check_frames(&[frame.clone(), clean]).unwrap();
    assert_eq!(v.frames, vec![(0, want[0].clone()), (3, want[1].clone())]);
    assert!(v.flagged && want[0].nsfw);
}

/// The fixture checker's folder rewritten by `edit`, with its preprocessor config.
fn rewritten(edit: impl FnOnce(&mut HashMap<String, Tensor>)) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let src = fixture("safety/checker");
    rewrite_checkpoint(&src, dir.path(), TRANSFORMERS_WEIGHTS, edit);
    std::fs::copy(
        src.join("preprocessor_config.json"),
        dir.path().join("preprocessor_config.json"),
    )
    .unwrap();
    dir
}

fn load_err(dir: &Path) -> String {
    match SafetyChecker::from_dir(dir, &Device::Cpu, DType::F32) {
        Ok(_) => panic!("{} loaded", dir.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn safety_checker_loads_both_layouts_and_older_exports() {
    let r = reference();
    // transformers 4.x nested the tower (`vision_model.vision_model.*`) and, before 4.31, saved
    // the position_ids buffer: every published checker looks like this
    let legacy = rewritten(|t| {
        let names: Vec<String> = t.keys().cloned().collect();
        for n in names.into_iter().filter(|n| n.starts_with("vision_model.")) {
            let v = t.remove(&n).unwrap();
            t.insert(format!("vision_model.{n}"), v);
        }
        let ids = Tensor::arange(0i64, 50, &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        t.insert(
            "vision_model.vision_model.embeddings.position_ids".into(),
            ids,
        );
    });
    assert_verdicts(&checker(legacy.path()).check_frames(&r.frames).unwrap(), &r);
    // a Stable Diffusion pipeline folder: safety_checker/ and feature_extractor/
    let sd = tempfile::tempdir().unwrap();
    let src = fixture("safety/checker");
    for (file, sub) in [
        ("config.json", "safety_checker"),
        ("model.safetensors", "safety_checker"),
        ("preprocessor_config.json", "feature_extractor"),
    ] {
        std::fs::create_dir_all(sd.path().join(sub)).unwrap();
        std::fs::copy(src.join(file), sd.path().join(sub).join(file)).unwrap();
    }
    std::fs::write(sd.path().join("model_index.json"), "{}").unwrap();
    assert_verdicts(&checker(sd.path()).check_frames(&r.frames).unwrap(), &r);
    // and through `load`, as a path
    let source = sd.path().to_str().unwrap();
    let c = SafetyChecker::load(source, &HubOptions::default(), &Device::Cpu, DType::F32).unwrap();
    assert_verdicts(&c.check_frames(&r.frames[..1]).unwrap(), &r);
}

#[test]
fn safety_checker_loading_errors_name_what_is_missing() {
    let src = fixture("safety/checker");
    // no config.json
    let dir = copy_dir(&src);
    std::fs::remove_file(dir.path().join("config.json")).unwrap();
    let e = load_err(dir.path());
    assert!(
        e.contains("no config.json") && e.contains("safety_checker/"),
        "{e}"
    );
    // unparsable config.json
    std::fs::write(dir.path().join("config.json"), "{\"projection_dim\": \"x\"").unwrap();
    let e = load_err(dir.path());
    assert!(
        e.contains("config.json") && e.contains("projection_dim"),
        "{e}"
    );
    // no weights
    let dir = copy_dir(&src);
    std::fs::remove_file(dir.path().join("model.safetensors")).unwrap();
    let e = load_err(dir.path());
    assert!(e.contains("no model.safetensors"), "{e}");
    // weights only as a pickle
    std::fs::write(dir.path().join("pytorch_model.bin"), b"PK").unwrap();
    let e = load_err(dir.path());
    assert!(
        e.contains("pytorch_model.bin") && e.contains("model.safetensors"),
        "{e}"
    );
    // a missing tensor and a wrong shape, by name, in the weights file
    let dir = rewritten(|t| {
        t.remove("vision_model.encoder.layers.1.mlp.fc2.weight");
        t.insert(
            "concept_embeds".into(),
            Tensor::zeros((16, 16), DType::F32, &Device::Cpu).unwrap(),
        );
    });
    let e = load_err(dir.path());
    assert!(e.contains("model.safetensors"), "{e}");
    assert!(
        e.contains("missing tensor vision_model.encoder.layers.1.mlp.fc2.weight"),
        "{e}"
    );
    assert!(
        e.contains("concept_embeds") && e.contains("[16, 16]"),
        "{e}"
    );
    // an unsupported preprocessing, named with its file
    let dir = copy_dir(&src);
    std::fs::write(
        dir.path().join("preprocessor_config.json"),
        r#"{"resample": 1}"#,
    )
    .unwrap();
    let e = load_err(dir.path());
    assert!(
        e.contains("preprocessor_config.json") && e.contains("resample 1"),
        "{e}"
    );
    // neither a folder nor a repo id; a repo id that is not cached, offline
    let cache = tempfile::tempdir().unwrap();
    let hub = HubOptions {
        offline: true,
        cache_dir: Some(cache.path().to_path_buf()),
        progress: false,
    };
    let e = SafetyChecker::load("./no/such/checker", &hub, &Device::Cpu, DType::F32);
    assert!(matches!(e, Err(SafetyError::Source(_))));
    let e = SafetyChecker::load(
        "CompVis/stable-diffusion-safety-checker",
        &hub,
        &Device::Cpu,
        DType::F32,
    );
    match e {
        Err(e @ SafetyError::Hub(_)) => {
            assert!(
                e.to_string()
                    .contains("CompVis/stable-diffusion-safety-checker"),
                "{e}"
            )
        }
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("loaded"),
    }
}
