//! What a request may skip across the denoising steps: step caching (`--cache`, [`CacheSpec`])
//! and CFG gating (`--cfg-gate`, [`CFG_GATE`]).

use crate::FloatRange;

/// Step caching across denoising steps (`--cache`, the submit body's `cache`): off, ParaAttention's
/// first-block cache as diffusers 0.42.1's `FirstBlockCacheConfig(threshold)`, or TeaCache
/// (TeaCache4HunyuanVideo) with its `rel_l1_thresh`. Written `none`, `first-block:T`,
/// `teacache:T`.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub enum CacheSpec {
    #[default]
    None,
    FirstBlock(f64),
    TeaCache(f64),
}

/// The thresholds a cache spec accepts.
pub const CACHE_THRESHOLD: FloatRange = FloatRange::above(0.0, 10.0);

/// The accepted forms, for messages.
pub const CACHE_FORMS: &str =
    "none, first-block:THRESHOLD or teacache:THRESHOLD (THRESHOLD a number \
     above 0 and at most 10, e.g. first-block:0.05, teacache:0.1)";

impl std::str::FromStr for CacheSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("must be {CACHE_FORMS}, got {s:?}");
        if s == "none" {
            return Ok(CacheSpec::None);
        }
        let (kind, t) = s.split_once(':').ok_or_else(bad)?;
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
}

impl std::fmt::Display for CacheSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CacheSpec::None => f.write_str("none"),
            CacheSpec::FirstBlock(t) => write!(f, "first-block:{t}"),
            CacheSpec::TeaCache(t) => write!(f, "teacache:{t}"),
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
        ] {
            let err = bad.parse::<CacheSpec>().unwrap_err();
            assert!(err.contains("first-block:THRESHOLD"), "{bad}: {err}");
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
