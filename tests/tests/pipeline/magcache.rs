//! MagCache (`--cache magcache:T[,max_skip=K][,retention=R]` with `--cache-ratios FILE.json`)
//! against diffusers 0.42.1's MagCache hooks (`MagCacheConfig` through
//! `transformer.enable_cache`, the I2V pipeline's two calls wrapped in cache_context("cond") /
//! ("uncond") as for the first-block cache) on the bundled tiny weights; fixtures by
//! `scripts/fixtures/cache.py magcache`.

use candle_core::{DType, Device};
use skyreels_pipeline::generate::{CacheSpec, GenerateError, MagRatios, ModelPaths, Pipeline};
use skyreels_tests::generation::{case, params};
use skyreels_tests::tiny_weights;

fn pipeline() -> Pipeline {
    let paths = ModelPaths::local(&tiny_weights(), None).unwrap();
    Pipeline::load(paths, DType::F32, DType::F32, &Device::Cpu).unwrap()
}

/// I2V with true CFG (scale 6), 10 steps, 13 given ratios (so diffusers interpolates them to the
/// steps), (a) the default max_skip 3 and retention 0.2, (b) max_skip 2 and retention 0.3. The
/// decisions read only the ratios, so both branches decide alike and nothing is skipped before
/// the retention step; the sequence of computed and cached forwards must be the reference's
/// exactly and stay the same at 0.99 T and 1.01 T (the reference's thresholds were picked so),
/// and the frames are held to the uncached end-to-end bound (a reused residual is the same f32
/// arithmetic as in diffusers).
#[test]
fn magcache_matches_diffusers() {
    let mut pipe = pipeline();
    for name in ["cache_mag_cfg_a", "cache_mag_cfg_b"] {
        let (io, req) = case(name);
        let want: Vec<bool> = serde_json::from_value(req["decisions"].clone()).unwrap();
        let ratios: MagRatios = serde_json::from_value(req["cache_ratios"].clone()).unwrap();
        pipe.set_cache_ratios(Some(ratios));
        let r = params(&io, &req);
        let CacheSpec::MagCache(spec) = r.p.cache else {
            panic!("{name}: {}", r.p.cache)
        };
        let steps = r.p.steps;
        assert!(r.p.guidance_scale > 1.0 && steps >= 10, "{name}");
        assert!(
            want.contains(&true) && want.contains(&false),
            "{name}: {want:?}"
        );
        assert_eq!(want.len(), 2 * steps, "{name}");
        assert!(want.chunks(2).all(|s| s[0] == s[1]), "{name}: {want:?}");
        let retained = 2 * spec.retention_step(steps);
        assert!(want[..retained].iter().all(|&c| c), "{name}: {want:?}");
        r.run_as(&pipe, &want, &io["frames"], name);
        for f in [0.99, 1.01] {
            let mut scaled = spec;
            scaled.threshold *= f;
            let cache = CacheSpec::MagCache(scaled);
            let v = r.with(|p| p.cache = cache).run(&pipe);
            assert_eq!(v.timings.forward_decisions, want, "{name} at {cache}");
        }
    }
}

/// A model without ratios refuses a MagCache request before any work, saying how to get them.
#[test]
fn magcache_without_ratios_is_refused() {
    let pipe = pipeline();
    let (io, req) = case("cache_mag_cfg_a");
    let r = params(&io, &req);
    let mut steps = 0;
    let e = r.generate(&pipe, &mut |_, _| {
        steps += 1;
        true
    });
    let Err(GenerateError::Invalid(e)) = e else {
        panic!("{e:?}")
    };
    assert!(
        e.starts_with("cache: magcache needs the model's magnitude ratios")
            && e.contains("--cache-ratios FILE.json")
            && e.contains("calibrat"),
        "{e}"
    );
    assert_eq!(steps, 0);
}
