//! End-to-end generation at parity with diffusers' SkyReels pipelines on the bundled tiny weights.
//!
//! Fixtures come from `scripts/fixtures/pipeline.py` (run on `weights/tiny`, made by
//! `scripts/fixtures/tiny_weights.py`).

#[path = "pipeline/cfg_gate.rs"]
mod cfg_gate;
#[path = "pipeline/lora.rs"]
mod lora;
#[path = "pipeline/magcache.rs"]
mod magcache;
#[path = "pipeline/taylorseer.rs"]
mod taylorseer;

use candle_core::{DType, Device, Tensor};
use skyreels_pipeline::export::{frame_rgb8, write_output};
use skyreels_pipeline::generate::{
    CacheSpec, GenerateError, ModelPaths, Offload, Pipeline, DEFAULT_NEGATIVE_PROMPT,
};
use skyreels_pipeline::load_vae;
use skyreels_pipeline::scheduler::{FlowMatchEuler, SchedulerConfig};
use skyreels_tests::generation::{case, params, Request, FRAME_TOL};
use skyreels_tests::{fixture, fixture_tiling, load_tensors, max_abs, rel_l2, tiny_weights};
use std::path::Path;

fn pipeline(transformer: Option<&Path>) -> Pipeline {
    let paths = ModelPaths::local(&tiny_weights(), transformer).unwrap();
    Pipeline::load(paths, DType::F32, DType::F32, &Device::Cpu).unwrap()
}

fn check(name: &str, pipe: &Pipeline) {
    let (io, req) = case(name);
    let r = params(&io, &req);
    let p = &r.p;
    // the schedule diffusers ran, bit for bit
    let cfg = SchedulerConfig::from_dir(&tiny_weights())
        .unwrap()
        .with_shift(p.flow_shift);
    let want: Vec<f32> = io["timesteps"].to_vec1().unwrap();
    assert_eq!(
        FlowMatchEuler::new(&cfg, p.steps).timesteps(),
        want,
        "{name}"
    );
    let mut steps = Vec::new();
    let video = r
        .generate(pipe, &mut |done, total| {
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
    // no cache: every forward ran, two per step with true CFG
    let per_step = if p.guidance_scale > 1.0 { 2 } else { 1 };
    let t = &video.timings;
    assert_eq!(
        (t.forwards_computed(), t.forwards_cached()),
        (per_step * p.steps, 0)
    );
}

/// Step caching against its references (`scripts/fixtures/cache.py`): diffusers 0.42.1's
/// first-block cache (`FirstBlockCacheConfig`, the I2V pipeline's two calls wrapped in
/// cache_context("cond") / ("uncond") as its T2V pipeline does) and the committed TeaCache
/// reference (`scripts/common/teacache_reference.py`), true CFG on and off, two thresholds each, 10
/// steps. The frames are held to the uncached end-to-end bound (FRAME_TOL: a reused residual is
/// the same f32 arithmetic as in diffusers), and the sequence of computed and cached forwards
/// must be the reference's exactly. Each threshold was picked so that the reference makes the
/// same sequence at 0.99 T and 1.01 T, so the ~1e-6 relative difference of the change measure
/// (f32 summation order) cannot flip a decision; we check the same margin on our side.
#[test]
fn step_caches_match_their_references() {
    let pipe = pipeline(None);
    for method in ["fbc", "tea"] {
        for cfg in ["cfg", "nocfg"] {
            for variant in ["a", "b"] {
                let name = format!("cache_{method}_{cfg}_{variant}");
                let (io, req) = case(&name);
                let want: Vec<bool> = serde_json::from_value(req["decisions"].clone()).unwrap();
                assert!(
                    want.contains(&true) && want.contains(&false),
                    "{name}: {want:?}"
                );
                let r = params(&io, &req);
                r.run_as(&pipe, &want, &io["frames"], &name);
                for f in [0.99, 1.01] {
                    let cache = match r.p.cache {
                        CacheSpec::FirstBlock(t) => CacheSpec::FirstBlock(t * f),
                        CacheSpec::TeaCache(t) => CacheSpec::TeaCache(t * f),
                        CacheSpec::None | CacheSpec::MagCache(_) | CacheSpec::TaylorSeer(_) => {
                            unreachable!("{name} names a first-block or TeaCache spec")
                        }
                    };
                    let v = r.with(|p| p.cache = cache).run(&pipe);
                    assert_eq!(v.timings.forward_decisions, want, "{name} at {cache}");
                }
            }
        }
    }
}

/// The whole I2V pipeline (text encoders, transformer, VAE) in f32 on the GPU, against the
/// same diffusers frames and bound as on the CPU.
#[cfg(feature = "cuda")]
#[test]
fn cuda_image_to_video_with_true_cfg_matches_diffusers() {
    let paths = ModelPaths::local(&tiny_weights(), None).unwrap();
    let dev = Device::new_cuda(0).expect("a CUDA GPU for the cuda feature's tests");
    check(
        "i2v_cfg",
        &Pipeline::load(paths, DType::F32, DType::F32, &dev).unwrap(),
    );
}

#[test]
fn image_to_video_with_true_cfg_matches_diffusers() {
    check("i2v_cfg", &pipeline(None));
}

/// A single-file transformer end to end: the tiny transformer in the original key layout as GGUF
/// Q8_0, its config passed as `--config` does (head dim 16: RoPE axes cannot be read off the
/// shapes), against diffusers' pipeline with `from_single_file` + `GGUFQuantizationConfig`
/// (scripts/fixtures/single_file.py). The same FRAME_TOL: both sides dequantize to the same
/// f16 values, the rest is the f32 pipeline.
#[test]
fn image_to_video_with_a_gguf_transformer_matches_diffusers() {
    let file = fixture("single_file/tiny_transformer_q8_0.gguf");
    let mut paths = ModelPaths::local(&tiny_weights(), Some(&file)).unwrap();
    paths.transformer_config = Some(tiny_weights().join("transformer"));
    let pipe = Pipeline::load(paths, DType::F32, DType::F32, &Device::Cpu).unwrap();
    check("i2v_cfg_q8_0", &pipe);
}

/// One clip on several (CPU) devices. CFG-parallel (`--parallel cfg=2`): the unconditional
/// branch runs on a second transformer copy on its own thread, with its own step cache: every
/// number is the single-device one, step-cache decisions (and CFG-gated forwards) included. Ulysses (`ulysses=2`, and
/// `cfg=2,ulysses=2` on four ranks): the video tokens are split over the ranks; the same f32 math
/// on slices, so the frames stay within the end-to-end bound of the single-device ones (and of
/// diffusers'); step caching is refused with Ulysses, CFG gating is not.
#[test]
fn parallel_layouts_change_no_number() {
    let cpu = |n: usize| vec![Device::Cpu; n];
    let single = pipeline(None);
    let cfg2 = pipeline(None).with_parallel(&[cpu(1), cpu(1)]).unwrap();
    assert_eq!(cfg2.devices().len(), 2);
    for name in [
        "i2v_cfg",
        "cache_fbc_cfg_a",
        "cache_tea_cfg_b",
        "cfg_gate_fbc",
        "i2v_embedded",
    ] {
        let (io, req) = case(name);
        let r = params(&io, &req);
        let (a, b) = (r.run(&single), r.run(&cfg2));
        assert_eq!(max_abs(&a.frames, &b.frames), 0.0, "{name}");
        assert_eq!(
            a.timings.forward_decisions, b.timings.forward_decisions,
            "{name}"
        );
        assert!(max_abs(&b.frames, &io["frames"]) <= FRAME_TOL, "{name}");
    }
    let ulysses = pipeline(None).with_parallel(&[cpu(2)]).unwrap();
    let both = pipeline(None).with_parallel(&[cpu(2), cpu(2)]).unwrap();
    assert_eq!(both.devices().len(), 4);
    for name in ["i2v_cfg", "cfg_gate_none", "i2v_embedded"] {
        let (io, req) = case(name);
        let r = params(&io, &req);
        let a = r.run(&single);
        for (layout, pipe) in [("ulysses=2", &ulysses), ("cfg=2,ulysses=2", &both)] {
            let b = r.run(pipe);
            let err = max_abs(&a.frames, &b.frames);
            assert!(err <= FRAME_TOL, "{name} {layout}: {err:e} from one device");
            assert!(
                max_abs(&b.frames, &io["frames"]) <= FRAME_TOL,
                "{name} {layout}"
            );
        }
    }
    let (io, req) = case("cache_fbc_cfg_a");
    let e = params(&io, &req)
        .generate(&ulysses, &mut |_, _| true)
        .unwrap_err();
    assert!(
        e.to_string().contains("does not combine with Ulysses"),
        "{e}"
    );
    let (io, req) = case("i2v_embedded");
    let odd = Request {
        noise: None,
        ..params(&io, &req).with(|p| p.num_frames = 1) // 1 x 3 x 5 = 15 video tokens
    };
    let e = odd.generate(&ulysses, &mut |_, _| true).unwrap_err();
    assert!(e.to_string().contains("15 video tokens"), "{e}");
    // layouts that cannot work are refused when the pipeline is built
    let e = pipeline(None)
        .with_parallel(&[cpu(3)])
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("divide the transformer's 2 attention heads"),
        "{e}"
    );
    let e = pipeline(None)
        .with_parallel(&[cpu(2), cpu(1)])
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("as many devices each"), "{e}");
    let paths = ModelPaths::local(&tiny_weights(), None).unwrap();
    let model =
        Pipeline::load_offloaded(paths, DType::F32, DType::F32, &Device::Cpu, Offload::Model)
            .unwrap();
    let e = model
        .with_parallel(&[cpu(1), cpu(1)])
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("--offload model"), "{e}");
}

/// `--offload model` (transformer and VAE loaded per stage) and `--offload blocks` (the blocks'
/// linear weights in host memory, copied per use) compute exactly what the resident pipeline does,
/// dense and GGUF.
#[test]
fn offloading_changes_no_number() {
    let gguf = fixture("single_file/tiny_transformer_q8_0.gguf");
    for (name, transformer) in [("i2v_cfg", None), ("i2v_cfg_q8_0", Some(gguf.as_path()))] {
        let (io, req) = case(name);
        let r = params(&io, &req);
        let mut frames = Vec::new();
        for offload in [Offload::None, Offload::Model, Offload::Blocks] {
            let mut paths = ModelPaths::local(&tiny_weights(), transformer).unwrap();
            paths.transformer_config = transformer.map(|_| tiny_weights().join("transformer"));
            let pipe =
                Pipeline::load_offloaded(paths, DType::F32, DType::F32, &Device::Cpu, offload)
                    .unwrap();
            assert_eq!(pipe.offload(), offload);
            let video = r.run(&pipe);
            assert!(
                max_abs(&video.frames, &io["frames"]) <= FRAME_TOL,
                "{name} {offload:?}"
            );
            frames.push(video.frames);
        }
        for (f, offload) in frames[1..].iter().zip(["model", "blocks"]) {
            assert_eq!(max_abs(f, &frames[0]), 0.0, "{name}: --offload {offload}");
        }
    }
}

#[test]
fn image_to_video_with_embedded_guidance_only_matches_diffusers() {
    check("i2v_embedded", &pipeline(None));
}

/// `flow_shift` / `--flow-shift 3` on weights whose scheduler config says 7: diffusers with
/// `FlowMatchEulerDiscreteScheduler(shift=3)`, the same bound.
#[test]
fn a_request_flow_shift_matches_diffusers_with_that_shift() {
    let (io, req) = case("i2v_flow_shift");
    let r = params(&io, &req);
    assert_eq!(r.p.flow_shift, Some(3.0));
    let file = SchedulerConfig::from_dir(&tiny_weights()).unwrap();
    assert_eq!(file.shift, 7.0);
    let pipe = pipeline(None);
    check("i2v_flow_shift", &pipe);
    // the config's shift would have run another schedule and made other frames
    let want: Vec<f32> = io["timesteps"].to_vec1().unwrap();
    assert_ne!(FlowMatchEuler::new(&file, r.p.steps).timesteps(), want);
    let video = r.with(|p| p.flow_shift = None).run(&pipe);
    let err = max_abs(&video.frames, &io["frames"]);
    assert!(
        err > 100.0 * FRAME_TOL,
        "unshifted frames off by only {err:e}"
    );
}

/// RIFLEx (`riflex_freq_index` / `--riflex-freq-index K`) against diffusers' I2V pipeline whose
/// rope module is RIFLEx's own (`scripts/common/riflex_reference.py`, thu-ml/RIFLEx's function
/// for the temporal axis) on a tiny transformer with 4 temporal frequencies: K = 4 and K = 2,
/// the same end-to-end bound; without RIFLEx, or with the other K, the frames are far off; an
/// index above the transformer's frequencies is refused before any work.
#[test]
fn riflex_matches_its_reference_for_two_indices() {
    let pipe = pipeline(Some(&fixture("pipeline/riflex_transformer")));
    assert_eq!(pipe.temporal_rope_frequencies(), 4);
    for (name, k, other) in [("riflex_k4", 4, 2), ("riflex_k2", 2, 4)] {
        let (io, req) = case(name);
        let r = params(&io, &req);
        assert_eq!(r.p.riflex_freq_index, k);
        check(name, &pipe);
        for wrong in [0, other] {
            let video = r.with(|p| p.riflex_freq_index = wrong).run(&pipe);
            let err = max_abs(&video.frames, &io["frames"]);
            assert!(
                err > 100.0 * FRAME_TOL,
                "{name} with index {wrong}: off by only {err:e}"
            );
        }
    }
    let (io, req) = case("riflex_k4");
    let e = params(&io, &req)
        .with(|p| p.riflex_freq_index = 5)
        .generate(&pipe, &mut |_, _| true)
        .unwrap_err();
    assert!(e.to_string().contains("from 0 (off) to 4"), "{e}");
}

#[test]
fn text_to_video_with_true_cfg_matches_diffusers() {
    check("t2v", &pipeline(Some(&fixture("pipeline/t2v_transformer"))));
}

#[test]
fn same_seed_same_frames_other_seed_other_frames() {
    let pipe = pipeline(None);
    let (io, req) = case("i2v_embedded");
    let mut r = params(&io, &req);
    r.noise = None;
    r.p.steps = 1;
    let mut run = |seed| {
        r.p.seed = seed;
        r.run(&pipe).frames
    };
    let (a, b, c) = (run(7), run(7), run(8));
    assert_eq!(max_abs(&a, &b), 0.0);
    assert!(max_abs(&a, &c) > 1e-3);
}

/// Issue 26, item 11: past the denoising, a cancel is asked for before every VAE tile and once
/// the frames are decoded (the export comes next), and lands at the first no; the steps are
/// reported as before.
#[test]
fn cancels_land_between_vae_tiles_and_before_the_export() {
    let pipe = pipeline(None);
    let (io, req) = case("i2v_embedded");
    // 17 frames: two temporal VAE tiles
    let r = Request {
        noise: None,
        ..params(&io, &req).with(|p| (p.num_frames, p.steps) = (17, 1))
    };
    let go = |pipe: &Pipeline,
              on_step: &mut dyn FnMut(usize, usize) -> bool,
              go_on: &mut dyn FnMut() -> bool| {
        pipe.generate_with(&r.p, r.image.as_ref(), r.noise.as_ref(), on_step, go_on)
    };
    let mut steps = Vec::new();
    let mut asked = 0;
    go(
        &pipe,
        &mut |done, total| {
            steps.push((done, total));
            true
        },
        &mut || {
            asked += 1;
            true
        },
    )
    .unwrap();
    assert_eq!(steps, vec![(1, 1)]);
    // two tiles and the end of the decode
    assert_eq!(asked, 3);
    for stop_at in 1..=asked {
        let mut n = 0;
        let e = go(&pipe, &mut |_, _| true, &mut || {
            n += 1;
            n < stop_at
        })
        .unwrap_err();
        assert!(matches!(e, GenerateError::Cancelled), "{e}");
        assert_eq!(n, stop_at);
    }
}

/// Issue 26, item 3: a pipeline with a pixel-frame limit refuses a larger clip before running it
/// (the worker's re-check; the server refuses it at submit); the estimate behind the default
/// limit grows with the clip and fits what it allows.
#[test]
fn clips_beyond_the_pixel_frame_limit_are_refused_before_they_run() {
    let mut pipe = pipeline(None);
    let (io, req) = case("i2v_embedded");
    let r = Request {
        noise: None,
        ..params(&io, &req).with(|p| p.steps = 1)
    };
    let n = (r.p.height * r.p.width * r.p.num_frames) as u64;
    pipe.set_max_pixel_frames(Some(n - 1));
    let mut ran = false;
    let e = r
        .generate(&pipe, &mut |_, _| {
            ran = true;
            true
        })
        .unwrap_err();
    assert!(!ran);
    assert!(matches!(e, GenerateError::Invalid(_)), "{e}");
    assert!(e.to_string().contains("(--max-pixel-frames) is"), "{e}");
    pipe.set_max_pixel_frames(Some(n));
    r.run(&pipe);
    let small = pipe.estimate_clip_bytes(64, 96, 9);
    assert!(pipe.estimate_clip_bytes(512, 512, 65) > small);
    let free = 8 * small;
    let fits = pipe.pixel_frames_fitting(free);
    assert!(fits > 0);
    assert!(pipe.estimate_clip_bytes(1, 1, fits as usize) <= free / 4 * 3);
    assert_eq!(pipe.pixel_frames_fitting(0), 0);
}

type Edit = dyn Fn(&mut Request);

#[test]
fn bad_requests_are_refused_with_the_setting_named() {
    let pipe = pipeline(None);
    let (io, req) = case("i2v_embedded");
    let base = params(&io, &req);
    let cases: Vec<(Box<Edit>, &str)> = vec![
        (
            Box::new(|r| r.p.height = 40),
            "height must be a positive multiple of 16",
        ),
        (Box::new(|r| r.p.width = 0), "width"),
        (Box::new(|r| r.p.num_frames = 6), "num_frames must be 4k+1"),
        (Box::new(|r| r.p.steps = 0), "steps"),
        (
            Box::new(|r| r.p.flow_shift = Some(0.0)),
            "flow_shift must be a finite number > 0, got 0",
        ),
        (Box::new(|r| r.p.flow_shift = Some(f64::NAN)), "flow_shift"),
        (
            Box::new(|r| r.p.guidance_scale = f64::NAN),
            "guidance_scale",
        ),
        (Box::new(|r| r.image = None), "an image is required"),
        (Box::new(|r| r.p.num_frames = 9), "noise has shape"),
        (Box::new(|r| r.p.prompt = " ".into()), "the prompt is empty"),
    ];
    for (edit, want) in cases {
        let mut r = base.clone();
        edit(&mut r);
        let e = r.generate(&pipe, &mut |_, _| true).unwrap_err().to_string();
        assert!(e.contains(want), "{e:?} should mention {want:?}");
    }
    // cancelling between steps
    let e = base.generate(&pipe, &mut |_, _| false).unwrap_err();
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
    // a transformer made for other text encoders is refused at load, not at the first request
    let other = fixture("single_file/orig_q4_k.gguf");
    let paths = ModelPaths::local(&tiny_weights(), Some(&other)).unwrap();
    let e = Pipeline::load(paths, DType::F32, DType::F32, &Device::Cpu)
        .err()
        .expect("text widths differ")
        .to_string();
    assert!(
        e.contains("text states of width 256") && e.contains("give 32 and 32"),
        "{e}"
    );
}

// ---- export ----

/// A moving colour pattern (frames, h, w, 3) in [0, 1] with smooth and sharp parts.
fn pattern(frames: usize, h: usize, w: usize) -> Tensor {
    let mut v = Vec::with_capacity(frames * h * w * 3);
    for f in 0..frames {
        for y in 0..h {
            for x in 0..w {
                let stripe = if (x + 2 * f) / 8 % 2 == 0 { 0.8 } else { 0.2 };
                v.extend([x as f32 / w as f32, y as f32 / h as f32, stripe]);
            }
        }
    }
    Tensor::from_vec(v, (frames, h, w, 3), &Device::Cpu).unwrap()
}

/// Reads an MP4 back: (width, height, fps, decoded RGB frames).
fn decode_mp4(path: &Path) -> (u16, u16, f64, Vec<Vec<u8>>) {
    let file = std::fs::File::open(path).unwrap();
    let size = file.metadata().unwrap().len();
    let mut mp4 = mp4::Mp4Reader::read_header(std::io::BufReader::new(file), size).unwrap();
    let track = mp4.tracks().values().next().unwrap();
    let (id, w, h, fps) = (
        track.track_id(),
        track.width(),
        track.height(),
        track.frame_rate(),
    );
    let sps = track.sequence_parameter_set().unwrap().to_vec();
    let pps = track.picture_parameter_set().unwrap().to_vec();
    let annex_b = |nal: &[u8], out: &mut Vec<u8>| {
        out.extend([0, 0, 0, 1]);
        out.extend_from_slice(nal);
    };
    let mut decoder = openh264::decoder::Decoder::new().unwrap();
    let mut frames = Vec::new();
    for i in 1..=mp4.sample_count(id).unwrap() {
        let sample = mp4.read_sample(id, i).unwrap().unwrap();
        let mut packet = Vec::new();
        if i == 1 {
            annex_b(&sps, &mut packet);
            annex_b(&pps, &mut packet);
        }
        // AVCC: 4-byte big-endian lengths
        let mut rest = &sample.bytes[..];
        while rest.len() >= 4 {
            let n = u32::from_be_bytes(rest[..4].try_into().unwrap()) as usize;
            annex_b(&rest[4..4 + n], &mut packet);
            rest = &rest[4 + n..];
        }
        if let Some(yuv) = decoder.decode(&packet).unwrap() {
            let mut rgb = vec![0; w as usize * h as usize * 3];
            yuv.write_rgb8(&mut rgb);
            frames.push(rgb);
        }
    }
    (w, h, fps, frames)
}

#[test]
fn mp4_decodes_back_to_the_frames() {
    let frames = pattern(17, 64, 96);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v.mp4");
    write_output(&path, &frames, 24.0, None).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    // fast start: the index (moov) comes before the media data (mdat)
    let find = |tag: &[u8]| bytes.windows(4).position(|w| w == tag).unwrap();
    assert!(find(b"moov") < find(b"mdat"));
    let (w, h, fps, decoded) = decode_mp4(&path);
    assert_eq!((w, h), (96, 64));
    assert!((fps - 24.0).abs() < 1e-6, "fps {fps}");
    assert_eq!(decoded.len(), 17);
    for (i, rgb) in decoded.iter().enumerate() {
        let mean_err = rgb
            .iter()
            .zip(&frame_rgb8(&frames, i).unwrap())
            .map(|(a, b)| (*a as f64 - *b as f64).abs())
            .sum::<f64>()
            / rgb.len() as f64;
        // lossy 4:2:0 at the default bitrate: a few levels of 255 on average, while a wrong
        // frame order, channel order or size is off by tens
        assert!(mean_err < 6.0, "frame {i}: mean abs error {mean_err}");
    }
}

#[test]
fn png_and_safetensors_outputs() {
    let frames = pattern(3, 16, 32);
    let dir = tempfile::tempdir().unwrap();
    write_output(&dir.path().join("pngs"), &frames, 24.0, None).unwrap();
    let png = image::open(dir.path().join("pngs/frame_00002.png"))
        .unwrap()
        .to_rgb8();
    assert_eq!(png.as_raw(), &frame_rgb8(&frames, 2).unwrap());
    let st = dir.path().join("f.safetensors");
    write_output(&st, &frames, 24.0, None).unwrap();
    assert_eq!(max_abs(&load_tensors(&st)["frames"], &frames), 0.0);
    // unwritable targets are errors naming the path
    let e = write_output(Path::new("/nonexistent/dir/v.mp4"), &frames, 24.0, None).unwrap_err();
    assert!(e.to_string().contains("/nonexistent/dir/v.mp4"), "{e}");
}

/// The VAE in f16 (`--vae-dtype f16`, the default on CUDA) on the VAE fixtures (tests/vae.rs has
/// the f32 parity). Relative L2 bound of our f16 VAE against diffusers' fp16 run (`scripts/fixtures/vae.py --f16`,
/// torch.float16 on the CPU). fp16 keeps 11 significant bits: every op output is rounded by up to
/// 2^-11 relative, and diffusers' own fp16 output sits 1.6e-3 to 3.0e-3 (relative L2, measured)
/// from its f32 one on these VAEs. Ours rounds at other points (Winograd or direct convolution,
/// GroupNorm statistics, attention), so the two fp16 results may each be ~3e-3 from the exact
/// value and ~6e-3 from each other (measured: 1.3e-3 to 6.6e-3); 1e-2 bounds that, while a mistake in the f16 path (an op left
/// in another dtype that overflows, a wrong conversion) moves the output by >= 1e-1.
const F16_TOL: f64 = 1e-2;

fn check_f16(dev: &Device) {
    for name in ["tiny_a", "tiny_b"] {
        let mut vae = load_vae(&fixture(&format!("vae/{name}")), DType::F16, dev).unwrap();
        let data = load_tensors(&fixture(&format!("vae/{name}/cases.safetensors")));
        let want = load_tensors(&fixture(&format!("vae/{name}/f16.safetensors")));
        for (id, key) in [
            ("dec_video", "output"),
            ("dec_default", "output"),
            ("dec_ts", "output"),
            ("enc_image", "mean"),
        ] {
            vae.set_tiling(fixture_tiling(&data[&format!("{id}.tiling")]))
                .unwrap();
            let x = data[&format!("{id}.input")]
                .to_dtype(DType::F16)
                .unwrap()
                .to_device(dev)
                .unwrap();
            let got = if key == "output" {
                vae.decode(&x).unwrap()
            } else {
                vae.encode(&x).unwrap().mean
            };
            assert_eq!(got.dtype(), DType::F16, "{name} {id}");
            let got = got
                .to_dtype(DType::F32)
                .unwrap()
                .to_device(&Device::Cpu)
                .unwrap();
            let reference = want[&format!("{id}.{key}")].to_dtype(DType::F32).unwrap();
            let err = rel_l2(&got, &reference);
            assert!(
                err <= F16_TOL,
                "{name} {id} in f16: relative L2 error {err:e}"
            );
        }
    }
}

#[test]
fn f16_matches_diffusers_fp16() {
    check_f16(&Device::Cpu);
}

/// The VAE's default dtype on CUDA (`--vae-dtype f16`), against the same fp16 references.
#[cfg(feature = "cuda")]
#[test]
fn cuda_f16_matches_diffusers_fp16() {
    check_f16(&Device::new_cuda(0).expect("a CUDA GPU for the cuda feature's tests"));
}
