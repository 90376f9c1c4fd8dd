//! TaylorSeer (`--cache taylorseer:interval=I[,order=O][,warmup=W][,stop=S]`) against diffusers
//! 0.42.1's TaylorSeer hooks (`TaylorSeerCacheConfig` through `transformer.enable_cache`, its
//! default hooks on every double and single block's attention, factors in float32 as the run)
//! on the bundled tiny weights, with true CFG: I2V (its two calls wrapped in cache_context("cond")
//! / ("uncond")) with orders 1 and 2, and T2V (diffusers' HunyuanVideoPipeline, which opens the
//! contexts itself) with order 2; fixtures by `scripts/fixtures/cache.py taylorseer`.

use skyreels_pipeline::generate::{CacheSpec, Pipeline};
use skyreels_tests::generation::{case, params, FRAME_TOL};
use skyreels_tests::{fixture, max_abs};

/// The decisions follow the step schedule alone (the same in both branches: every attention of
/// a forward decides alike, which the fixture script asserts) and must be diffusers' exactly;
/// the frames are held to the uncached end-to-end bound (a forecast is the same f32 arithmetic
/// as diffusers': the divided differences divide by the step distance, the series multiplies by
/// offset^k / k!). So that the bound says something, each run's frames must also be farther
/// than 10x that bound from the uncached run's (the forecasts really stand in for attentions).
#[test]
fn taylorseer_matches_diffusers() {
    let i2v = super::pipeline(None);
    let t2v = super::pipeline(Some(&fixture("pipeline/t2v_transformer")));
    for (name, pipe) in [
        ("cache_taylor_i2v_o1", &i2v),
        ("cache_taylor_i2v_o2", &i2v),
        ("cache_taylor_t2v_o2", &t2v),
    ] {
        check(name, pipe);
    }
}

fn check(name: &str, pipe: &Pipeline) {
    let (io, req) = case(name);
    let want: Vec<bool> = serde_json::from_value(req["decisions"].clone()).unwrap();
    let r = params(&io, &req);
    let CacheSpec::TaylorSeer(spec) = r.p.cache else {
        panic!("{name}: {}", r.p.cache)
    };
    assert!(r.p.guidance_scale > 1.0 && r.p.steps >= 10, "{name}");
    assert_eq!(want.len(), 2 * r.p.steps, "{name}");
    let schedule: Vec<bool> = (0..r.p.steps).flat_map(|s| [spec.computes(s); 2]).collect();
    assert_eq!(want, schedule, "{name}");
    assert!(want.contains(&false), "{name}: {want:?}");
    let video = r.run_as(pipe, &want, &io["frames"], name);
    let uncached = r.with(|p| p.cache = CacheSpec::None).run(pipe);
    let apart = max_abs(&video.frames, &uncached.frames);
    assert!(apart > 10.0 * FRAME_TOL, "{name}: {apart:e} from uncached");
}
