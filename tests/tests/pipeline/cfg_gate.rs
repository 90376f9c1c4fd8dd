//! CFG gating (`--cfg-gate F`, the submit's `cfg_gate`) against a direct Python transcription of
//! its rule (`scripts/common/cfg_gate_reference.py`) driving diffusers' SkyReels I2V pipeline and
//! its transformer on the bundled tiny weights; fixtures by `scripts/fixtures/cache.py gate`.

use candle_core::{DType, Device};
use skyreels_pipeline::generate::{CacheSpec, ModelPaths, Pipeline};
use skyreels_tests::generation::{case, params, FRAME_TOL};
use skyreels_tests::{max_abs, tiny_weights};

fn pipeline() -> Pipeline {
    let paths = ModelPaths::local(&tiny_weights(), None).unwrap();
    Pipeline::load(paths, DType::F32, DType::F32, &Device::Cpu).unwrap()
}

/// The rule: with N steps and gate F, the steps before ceil(F·N) (0-based) run the prompt's
/// (cond) and the negative prompt's (uncond) forward and keep d = cond − uncond; from step
/// ceil(F·N) on, the uncond forward is not run, its prediction is cond − d with the d of the last
/// step that ran both, and the guidance is as always uncond + scale·(cond − uncond), i.e.
/// (cond − d) + scale·d. A gated forward counts as cached. I2V with true CFG (scale 6), 10 steps:
/// F = 0.6 alone (steps 6..=9 gated) and F = 0.5 with the first-block cache at a threshold whose
/// sequence (gated forwards included) is the reference's exactly and the same at 0.99 T and
/// 1.01 T. The frames are held to FRAME_TOL (the reference's guidance rounds cond − (cond − d)
/// once more in f32), and the ungated run is far outside it, so the gate is what is matched.
#[test]
fn cfg_gating_matches_its_reference() {
    let pipe = pipeline();
    for (name, fraction) in [("cfg_gate_none", 0.6), ("cfg_gate_fbc", 0.5)] {
        let (io, req) = case(name);
        let want: Vec<bool> = serde_json::from_value(req["decisions"].clone()).unwrap();
        let r = params(&io, &req);
        assert_eq!(r.p.cfg_gate, Some(fraction), "{name}");
        assert!(r.p.guidance_scale > 1.0 && r.p.steps >= 10, "{name}");
        // every uncond forward from ceil(F·N) on is gated, every one before it is not
        let start = (fraction * r.p.steps as f64).ceil() as usize;
        assert_eq!(want.len(), 2 * r.p.steps, "{name}");
        for step in start..r.p.steps {
            assert!(
                !want[2 * step + 1],
                "{name}: step {step}'s uncond forward ran"
            );
        }
        if r.p.cache == CacheSpec::None {
            let ran = |s: usize| want[2 * s] && want[2 * s + 1];
            assert!((0..start).all(ran), "{name}: {want:?}");
        }
        r.run_as(&pipe, &want, &io["frames"], name);
        let ungated = r.with(|p| p.cfg_gate = None).run(&pipe);
        let moved = max_abs(&ungated.frames, &io["frames"]);
        assert!(
            moved > 20.0 * FRAME_TOL,
            "{name}: ungated frames only {moved:e} away"
        );
        if let CacheSpec::FirstBlock(threshold) = r.p.cache {
            for f in [0.99, 1.01] {
                let cache = CacheSpec::FirstBlock(threshold * f);
                let v = r.with(|p| p.cache = cache).run(&pipe);
                assert_eq!(v.timings.forward_decisions, want, "{name} at {cache}");
            }
        }
    }
}

/// Without true CFG (guidance_scale ≤ 1: no negative prompt, one forward per step) the gate is a
/// stated no-op: the same frames bit for bit, every forward computed.
#[test]
fn cfg_gating_without_true_cfg_changes_nothing() {
    let pipe = pipeline();
    let (io, req) = case("i2v_embedded");
    let r = params(&io, &req);
    assert!(r.p.guidance_scale <= 1.0);
    let plain = r.run(&pipe);
    let gated = r.with(|p| p.cfg_gate = Some(0.5)).run(&pipe);
    assert_eq!(max_abs(&gated.frames, &plain.frames), 0.0);
    assert!(max_abs(&gated.frames, &io["frames"]) <= FRAME_TOL);
    let t = &gated.timings;
    assert_eq!((t.forwards_computed(), t.forwards_cached()), (r.p.steps, 0));
}
