//! What a request may skip across the denoising steps: step caching (`--cache`, [`CacheSpec`],
//! MagCache with the magnitude ratios of `ratios.rs`) and CFG gating (`--cfg-gate`,
//! [`CFG_GATE`]).

use crate::{FloatRange, IntRange, STEPS};

/// Step caching across denoising steps (`--cache`, the submit body's `cache`): off, ParaAttention's
/// first-block cache as diffusers 0.42.1's `FirstBlockCacheConfig(threshold)`, TeaCache
/// (TeaCache4HunyuanVideo) with its `rel_l1_thresh`, or MagCache as diffusers 0.42.1's
/// `MagCacheConfig`, or TaylorSeer as diffusers 0.42.1's `TaylorSeerCacheConfig`. Written `none`,
/// `first-block:T`, `teacache:T`, `magcache:T,max_skip=K,retention=R`,
/// `taylorseer:interval=I,order=O,warmup=W[,stop=S]`.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub enum CacheSpec {
    #[default]
    None,
    FirstBlock(f64),
    TeaCache(f64),
    MagCache(MagCacheSpec),
    TaylorSeer(TaylorSeerSpec),
}

/// TaylorSeer's settings (diffusers 0.42.1 `TaylorSeerCacheConfig`: `cache_interval`,
/// `max_order`, `disable_cache_before_step`, `disable_cache_after_step`): every attention of the
/// blocks runs on the first `warmup` steps, then on one step in `interval` (the steps s with
/// (s − warmup − 1) mod `interval` = 0) and on every step from `stop` on; on the other steps
/// each attention's output is forecast from its last computed ones by a Taylor series of
/// `order` terms beyond the value (divided differences over the step index).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TaylorSeerSpec {
    pub interval: usize,
    pub order: usize,
    pub warmup: usize,
    pub stop: Option<usize>,
}

/// diffusers' `TaylorSeerCacheConfig` defaults: cache_interval 5, max_order 1,
/// disable_cache_before_step 3, no disable_cache_after_step.
impl Default for TaylorSeerSpec {
    fn default() -> Self {
        Self {
            interval: 5,
            order: 1,
            warmup: 3,
            stop: None,
        }
    }
}

impl TaylorSeerSpec {
    /// Whether the attentions run at `step` (0-based) or are forecast: diffusers'
    /// `is_warmup_phase or is_compute_interval or is_cooldown_phase`, the interval test with
    /// Python's non-negative modulo.
    pub fn computes(&self, step: usize) -> bool {
        let (step, warmup) = (step as i64, self.warmup as i64);
        step < warmup
            || (step - warmup - 1).rem_euclid(self.interval as i64) == 0
            || self.stop.is_some_and(|s| step >= s as i64)
    }
}

/// MagCache's settings (Zehong-Ma/MagCache; diffusers 0.42.1 `MagCacheConfig`): skip a step while
/// the accumulated error of the magnitude ratios since the last computed step stays at most
/// `threshold` and at most `max_skip` steps were skipped in a row; never skip before the
/// step int(`retention` · steps + 0.5).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MagCacheSpec {
    pub threshold: f64,
    pub max_skip: usize,
    pub retention: f64,
}

/// diffusers' `MagCacheConfig` defaults: threshold 0.06, max_skip_steps 3, retention_ratio 0.2.
impl Default for MagCacheSpec {
    fn default() -> Self {
        Self {
            threshold: 0.06,
            max_skip: 3,
            retention: 0.2,
        }
    }
}

impl MagCacheSpec {
    /// The first step (0-based) that may be skipped: `int(retention_ratio * num_inference_steps
    /// + 0.5)` in f64 as in diffusers (0.2 of 10 steps: 2; 0.35 of 10: 4).
    pub fn retention_step(&self, steps: usize) -> usize {
        (self.retention * steps as f64 + 0.5) as usize
    }
}

/// The thresholds a cache spec accepts.
pub const CACHE_THRESHOLD: FloatRange = FloatRange::above(0.0, 10.0);
/// MagCache's `max_skip`.
pub const MAGCACHE_MAX_SKIP: IntRange = IntRange { min: 1, max: 100 };
/// MagCache's `retention`.
pub const MAGCACHE_RETENTION: FloatRange = FloatRange::inclusive(0.0, 1.0);

/// TaylorSeer's `interval`.
pub const TAYLORSEER_INTERVAL: IntRange = IntRange { min: 1, max: 100 };
/// TaylorSeer's `order`.
pub const TAYLORSEER_ORDER: IntRange = IntRange { min: 0, max: 4 };
/// TaylorSeer's `warmup` and `stop` (at least 1: a forecast needs one computed step).
pub const TAYLORSEER_STEP: IntRange = IntRange {
    min: 1,
    max: STEPS.max,
};

/// The accepted forms, for messages.
pub const CACHE_FORMS: &str =
    "none, first-block:THRESHOLD or teacache:THRESHOLD (THRESHOLD a number \
     above 0 and at most 10, e.g. first-block:0.05, teacache:0.1), \
     magcache[:THRESHOLD[,max_skip=K][,retention=R]] (K an integer from 1 to 100, R a number from \
     0 to 1; defaults 0.06, 3, 0.2; e.g. magcache:0.1,max_skip=2), or \
     taylorseer[:interval=I][,order=O][,warmup=W][,stop=S] (I an integer from 1 to 100, O from 0 \
     to 4, W and S from 1 to 100; defaults 5, 1, 3, no stop; e.g. taylorseer:interval=3,order=2)";

/// What a MagCache run without magnitude ratios is told.
pub const MAGCACHE_NEEDS_RATIOS: &str =
    "magcache needs the model's magnitude ratios and none are loaded: pass --cache-ratios \
     FILE.json (to `skyreels generate`, or to `skyreels serve` / `worker` for their tasks) with \
     what `skyreels calibrate-cache --model ... --steps N` writes (one uncached run with \
     generate's flags), a JSON array of ratios (what diffusers' MagCacheConfig(calibrate=True) \
     prints), or a bundled name: hunyuanvideo-544p, hunyuanvideo-720p (HunyuanVideo's \
     published ratios, an approximation for SkyReels)";

impl std::str::FromStr for CacheSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("must be {CACHE_FORMS}, got {s:?}");
        match s.split_once(':') {
            None if s == "none" => Ok(CacheSpec::None),
            None if s == "magcache" => Ok(CacheSpec::MagCache(MagCacheSpec::default())),
            None if s == "taylorseer" => Ok(CacheSpec::TaylorSeer(TaylorSeerSpec::default())),
            Some(("taylorseer", rest)) => parse_taylorseer(rest)
                .map(CacheSpec::TaylorSeer)
                .ok_or_else(bad),
            Some(("magcache", rest)) => parse_magcache(rest)
                .map(CacheSpec::MagCache)
                .ok_or_else(bad),
            Some((kind, t)) => {
                let t: f64 = t.parse().map_err(|_| bad())?;
                if !CACHE_THRESHOLD.contains(t) {
                    return Err(bad());
                }
                match kind {
                    "first-block" => Ok(CacheSpec::FirstBlock(t)),
                    "teacache" => Ok(CacheSpec::TeaCache(t)),
                    _ => Err(bad()),
                }
            }
            None => Err(bad()),
        }
    }
}

/// `T[,max_skip=K][,retention=R]` (each option at most once, in either order).
fn parse_magcache(rest: &str) -> Option<MagCacheSpec> {
    let mut parts = rest.split(',');
    let mut spec = MagCacheSpec {
        threshold: parts
            .next()?
            .parse()
            .ok()
            .filter(|t| CACHE_THRESHOLD.contains(*t))?,
        ..MagCacheSpec::default()
    };
    let (mut max_skip, mut retention) = (None, None);
    for part in parts {
        match part.split_once('=')? {
            ("max_skip", k) if max_skip.is_none() => {
                max_skip = Some(
                    k.parse::<usize>()
                        .ok()
                        .filter(|&k| MAGCACHE_MAX_SKIP.contains(k as i64))?,
                )
            }
            ("retention", r) if retention.is_none() => {
                retention = Some(
                    r.parse::<f64>()
                        .ok()
                        .filter(|&r| MAGCACHE_RETENTION.contains(r))?,
                )
            }
            _ => return None,
        }
    }
    spec.max_skip = max_skip.unwrap_or(spec.max_skip);
    spec.retention = retention.unwrap_or(spec.retention);
    Some(spec)
}

/// `interval=I,order=O,warmup=W,stop=S`, each at most once, in any order, at least one.
fn parse_taylorseer(rest: &str) -> Option<TaylorSeerSpec> {
    let mut seen: [Option<usize>; 4] = [None; 4];
    for part in rest.split(',') {
        let (key, value) = part.split_once('=')?;
        let (slot, range) = match key {
            "interval" => (0, TAYLORSEER_INTERVAL),
            "order" => (1, TAYLORSEER_ORDER),
            "warmup" => (2, TAYLORSEER_STEP),
            "stop" => (3, TAYLORSEER_STEP),
            _ => return None,
        };
        let value = value
            .parse::<usize>()
            .ok()
            .filter(|&v| range.contains(v as i64))?;
        if seen[slot].replace(value).is_some() {
            return None;
        }
    }
    let d = TaylorSeerSpec::default();
    let [interval, order, warmup, stop] = seen;
    Some(TaylorSeerSpec {
        interval: interval.unwrap_or(d.interval),
        order: order.unwrap_or(d.order),
        warmup: warmup.unwrap_or(d.warmup),
        stop,
    })
}

impl std::fmt::Display for CacheSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CacheSpec::None => f.write_str("none"),
            CacheSpec::FirstBlock(t) => write!(f, "first-block:{t}"),
            CacheSpec::TeaCache(t) => write!(f, "teacache:{t}"),
            CacheSpec::MagCache(m) => write!(
                f,
                "magcache:{},max_skip={},retention={}",
                m.threshold, m.max_skip, m.retention
            ),
            CacheSpec::TaylorSeer(t) => {
                write!(
                    f,
                    "taylorseer:interval={},order={},warmup={}",
                    t.interval, t.order, t.warmup
                )?;
                match t.stop {
                    Some(s) => write!(f, ",stop={s}"),
                    None => Ok(()),
                }
            }
        }
    }
}

/// A CFG gate's fraction (`--cfg-gate F`, the submit's `cfg_gate`): above 0 and below 1 (at 1
/// no step would be gated).
pub const CFG_GATE: FloatRange = FloatRange::open(0.0, 1.0);

/// A CFG gate's fraction from its text (the `--cfg-gate` flags' parser).
pub fn parse_cfg_gate(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(f) if CFG_GATE.contains(f) => Ok(f),
        _ => Err(format!("{}, got {s:?}", CFG_GATE.rule())),
    }
}

/// The first denoising step (0-based) whose unconditional forward a CFG gate of `fraction`
/// skips: ceil(fraction · steps), computed in f64 as `math.ceil(fraction * steps)` is in Python
/// (0.6 · 10 gates steps 6..=9). At `steps` (or more) no step is gated.
pub fn cfg_gate_start(fraction: f64, steps: usize) -> usize {
    (fraction * steps as f64).ceil() as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_specs_parse_print_and_refuse() {
        for (text, spec) in [
            ("none", CacheSpec::None),
            ("first-block:0.05", CacheSpec::FirstBlock(0.05)),
            ("teacache:0.1", CacheSpec::TeaCache(0.1)),
            ("teacache:10", CacheSpec::TeaCache(10.0)),
            ("magcache", CacheSpec::MagCache(MagCacheSpec::default())),
            (
                "magcache:0.06",
                CacheSpec::MagCache(MagCacheSpec::default()),
            ),
            (
                "magcache:0.1,retention=0.35,max_skip=2",
                CacheSpec::MagCache(MagCacheSpec {
                    threshold: 0.1,
                    max_skip: 2,
                    retention: 0.35,
                }),
            ),
            (
                "magcache:0.25,retention=0",
                CacheSpec::MagCache(MagCacheSpec {
                    threshold: 0.25,
                    retention: 0.0,
                    ..MagCacheSpec::default()
                }),
            ),
            (
                "taylorseer",
                CacheSpec::TaylorSeer(TaylorSeerSpec::default()),
            ),
            (
                "taylorseer:interval=5",
                CacheSpec::TaylorSeer(TaylorSeerSpec::default()),
            ),
            (
                "taylorseer:stop=9,order=2,interval=3,warmup=1",
                CacheSpec::TaylorSeer(TaylorSeerSpec {
                    interval: 3,
                    order: 2,
                    warmup: 1,
                    stop: Some(9),
                }),
            ),
            (
                "taylorseer:order=0",
                CacheSpec::TaylorSeer(TaylorSeerSpec {
                    order: 0,
                    ..TaylorSeerSpec::default()
                }),
            ),
        ] {
            assert_eq!(text.parse::<CacheSpec>(), Ok(spec));
            assert_eq!(spec.to_string().parse::<CacheSpec>(), Ok(spec));
        }
        for bad in [
            "",
            "None",
            "first-block",
            "first-block:",
            "first-block:0",
            "first-block:-0.1",
            "teacache:nan",
            "teacache:inf",
            "teacache:10.5",
            "tea:0.1",
            "first-block:0.05:1",
            "magcache:",
            "magcache:0",
            "magcache:0.1,",
            "magcache:0.1,max_skip=0",
            "magcache:0.1,max_skip=1.5",
            "magcache:0.1,max_skip=101",
            "magcache:0.1,retention=1.5",
            "magcache:0.1,retention=nan",
            "magcache:0.1,max_skip=2,max_skip=3",
            "magcache:0.1,skip=2",
            "magcache:max_skip=2",
            "magcache:0.1:max_skip=2",
            "taylorseer:",
            "taylorseer:5",
            "taylorseer:interval=0",
            "taylorseer:interval=101",
            "taylorseer:order=5",
            "taylorseer:warmup=0",
            "taylorseer:stop=0",
            "taylorseer:interval=2,interval=3",
            "taylorseer:interval=2,",
            "taylorseer:cache_interval=2",
            "taylorseer:interval=-1",
        ] {
            let err = bad.parse::<CacheSpec>().unwrap_err();
            assert!(err.contains("first-block:THRESHOLD"), "{bad}: {err}");
        }
    }

    #[test]
    fn taylorseer_computes_on_diffusers_schedule() {
        // Python (diffusers 0.42.1 TaylorSeerCacheHook._measure_should_compute):
        // [s < W or (s - W - 1) % I == 0 or (S is not None and s >= S) for s in range(12)]
        for (interval, warmup, stop, want) in [
            (5, 3, None, "CCC.C....C.."),
            (3, 1, None, "C.C..C..C..C"),
            (2, 2, Some(7), "CC.C.C.CCCCC"),
            (1, 3, None, "CCCCCCCCCCCC"),
            (4, 12, None, "CCCCCCCCCCCC"),
        ] {
            let spec = TaylorSeerSpec {
                interval,
                order: 1,
                warmup,
                stop,
            };
            let got: String = (0..12)
                .map(|s| if spec.computes(s) { 'C' } else { '.' })
                .collect();
            assert_eq!(got, want, "{spec:?}");
        }
        assert_eq!(
            "taylorseer".parse::<CacheSpec>().unwrap().to_string(),
            "taylorseer:interval=5,order=1,warmup=3"
        );
    }

    #[test]
    fn magcache_displays_in_full_and_keeps_diffusers_retention_step() {
        let spec = "magcache".parse::<CacheSpec>().unwrap();
        assert_eq!(spec.to_string(), "magcache:0.06,max_skip=3,retention=0.2");
        // Python: [int(r * n + 0.5) for r, n in ...] == [2, 3, 4, 2, 0, 10, 6]
        for (retention, steps, step) in [
            (0.2, 10, 2),
            (0.25, 10, 3),
            (0.35, 10, 4),
            (0.15, 10, 2),
            (0.0, 10, 0),
            (1.0, 10, 10),
            (0.2, 28, 6),
        ] {
            let m = MagCacheSpec {
                retention,
                ..MagCacheSpec::default()
            };
            assert_eq!(m.retention_step(steps), step, "{retention} x {steps}");
        }
    }

    #[test]
    fn cfg_gates_are_checked_and_start_at_the_ceiling() {
        assert_eq!(CFG_GATE.rule(), "must be a number above 0 and below 1");
        for ok in [1e-9, 0.5, 0.999] {
            assert!(CFG_GATE.contains(ok), "{ok}");
        }
        for bad in [0.0, 1.0, -0.5, 1.5, f64::NAN, f64::INFINITY] {
            assert!(!CFG_GATE.contains(bad), "{bad}");
        }
        assert_eq!(parse_cfg_gate("0.6"), Ok(0.6));
        for bad in ["", "x", "1", "0", "nan"] {
            let e = parse_cfg_gate(bad).unwrap_err();
            assert!(e.starts_with(&CFG_GATE.rule()), "{bad}: {e}");
        }
        // Python: [math.ceil(f * n) for f, n in ...] == [6, 5, 1, 10, 23]
        for (f, n, start) in [
            (0.6, 10, 6),
            (0.45, 10, 5),
            (0.01, 10, 1),
            (0.95, 10, 10),
            (0.75, 30, 23),
        ] {
            assert_eq!(cfg_gate_start(f, n), start, "{f} x {n}");
        }
    }
}
