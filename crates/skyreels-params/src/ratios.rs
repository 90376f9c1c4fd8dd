//! MagCache's magnitude ratios (`--cache-ratios`): a file of them ([`MagRatios`], one array or
//! one per CFG branch, as `skyreels calibrate-cache` writes) or the published ones bundled here
//! ([`BUNDLED_RATIOS`]).

use crate::{IntRange, STEPS};

/// The published magnitude ratios bundled by name (`--cache-ratios NAME`): MagCache4HunyuanVideo's
/// for HunyuanVideo T2V (`hunyuanvideo-community/HunyuanVideo`, guidance-distilled: one branch)
/// at 50 steps, calibrated at 544x960 and at 720x1280, copied from
/// <https://github.com/Zehong-Ma/MagCache/blob/df81cb181776c2c61477c08e1d21f87fda1cd938/MagCache4HunyuanVideo/magcache_sample_video.py#L315-L318>.
/// SkyReels V1 is a fine-tune of HunyuanVideo run with true CFG and has no published ratios:
/// these approximate it; `skyreels calibrate-cache` measures its own.
pub const BUNDLED_RATIOS: [(&str, &[f64]); 2] = [
    (
        "hunyuanvideo-544p",
        &[
            1.0, 1.06971, 1.29073, 1.11245, 1.09596, 1.05233, 1.01415, 1.05672, 1.00848, 1.03632,
            1.02974, 1.00984, 1.03028, 1.00681, 1.06614, 1.05022, 1.02592, 1.01776, 1.02985,
            1.00726, 1.03727, 1.01502, 1.00992, 1.03371, 0.9976, 1.02742, 1.0093, 1.01869, 1.00815,
            1.01461, 1.01152, 1.03082, 1.0061, 1.02162, 1.01999, 0.99063, 1.01186, 1.0217, 0.99947,
            1.01711, 0.9904, 1.00258, 1.00878, 0.97039, 0.97686, 0.94315, 0.97728, 0.91154,
            0.86139, 0.76592,
        ],
    ),
    (
        "hunyuanvideo-720p",
        &[
            1.0, 1.0754, 1.27807, 1.11596, 1.09504, 1.05188, 1.00844, 1.05779, 1.00657, 1.04142,
            1.03101, 1.00679, 1.02556, 1.00908, 1.06949, 1.05438, 1.02214, 1.02321, 1.03019,
            1.00779, 1.03381, 1.01886, 1.01161, 1.02968, 1.00544, 1.02822, 1.00689, 1.02119,
            1.0105, 1.01044, 1.01572, 1.02972, 1.0094, 1.02368, 1.0226, 0.98965, 1.01588, 1.02146,
            1.0018, 1.01687, 0.99436, 1.00283, 1.01139, 0.97122, 0.98251, 0.94513, 0.97656,
            0.90943, 0.85703, 0.75456,
        ],
    ),
];

/// How many magnitude ratios a ratios file may hold: a calibration writes one per step, the
/// first a placeholder 1.0 (its first step has no earlier residual), so fewer than two cannot
/// be one.
pub const MAG_RATIOS_LEN: IntRange = IntRange {
    min: 2,
    max: 10 * STEPS.max,
};

/// MagCache's magnitude ratios of a model (`--cache-ratios FILE.json`), one per step of the run
/// they were calibrated on, held as diffusers holds them (f32 numbers). The file is either a
/// JSON array, the ratios of every CFG branch (diffusers' `mag_ratios`), or what `skyreels
/// calibrate-cache` writes: an object with the conditional branch's ratios `cond`, with true CFG
/// the unconditional branch's `uncond` (as long), and what they were `calibrated` on (not
/// read); each branch then uses its own, as MagCache4Wan2.1 does with its interleaved ratios.
#[derive(Clone, Debug, PartialEq, serde::Deserialize)]
#[serde(try_from = "serde_json::Value")]
pub struct MagRatios {
    cond: Vec<f32>,
    uncond: Option<Vec<f32>>,
}

impl TryFrom<Vec<f64>> for MagRatios {
    type Error = String;

    /// The same ratios for every branch.
    fn try_from(values: Vec<f64>) -> Result<Self, String> {
        Ok(Self {
            cond: branch_ratios(&values, "")?,
            uncond: None,
        })
    }
}

impl TryFrom<serde_json::Value> for MagRatios {
    type Error = String;

    fn try_from(v: serde_json::Value) -> Result<Self, String> {
        use serde_json::Value;
        let numbers = |v: &Value, key: &str| -> Result<Vec<f64>, String> {
            let at = if key.is_empty() {
                String::new()
            } else {
                format!("`{key}`: ")
            };
            let Value::Array(items) = v else {
                return Err(format!("magnitude ratios: {at}must be an array of numbers"));
            };
            items
                .iter()
                .enumerate()
                .map(|(i, x)| {
                    x.as_f64()
                        .ok_or_else(|| format!("magnitude ratios: {at}entry {i} is not a number"))
                })
                .collect()
        };
        match &v {
            Value::Array(_) => Self::try_from(numbers(&v, "")?),
            Value::Object(fields) => {
                if let Some(k) = fields
                    .keys()
                    .find(|k| !["cond", "uncond", "calibrated"].contains(&k.as_str()))
                {
                    return Err(format!(
                        "magnitude ratios: unknown key `{k}` (an object has `cond`, optionally \
                         `uncond` and `calibrated`)"
                    ));
                }
                let cond = fields
                    .get("cond")
                    .ok_or("magnitude ratios: an object needs the `cond` ratios")?;
                let cond = branch_ratios(&numbers(cond, "cond")?, "cond")?;
                let uncond = match fields.get("uncond") {
                    None | Some(Value::Null) => None,
                    Some(u) => Some(branch_ratios(&numbers(u, "uncond")?, "uncond")?),
                };
                if let Some(u) = &uncond {
                    if u.len() != cond.len() {
                        return Err(format!(
                            "magnitude ratios: `uncond` has {} ratios and `cond` {}: they come \
                             from the same run, one per step",
                            u.len(),
                            cond.len()
                        ));
                    }
                }
                Ok(Self { cond, uncond })
            }
            _ => Err(
                "magnitude ratios: must be a JSON array of numbers or an object with \
                      `cond` (and `uncond`) arrays"
                    .into(),
            ),
        }
    }
}

/// One branch's ratios, checked: `key` names the branch in messages ("" for a plain array).
fn branch_ratios(values: &[f64], key: &str) -> Result<Vec<f32>, String> {
    let at = if key.is_empty() {
        String::new()
    } else {
        format!("`{key}`: ")
    };
    let n = values.len();
    if !MAG_RATIOS_LEN.contains(n as i64) {
        return Err(format!(
            "magnitude ratios: {at}must be an array of {} to {} numbers (one per step of a \
             calibrated run), got {n}",
            MAG_RATIOS_LEN.min, MAG_RATIOS_LEN.max
        ));
    }
    let ratios: Vec<f32> = values.iter().map(|&v| v as f32).collect();
    if let Some(i) = ratios.iter().position(|r| !r.is_finite()) {
        return Err(format!(
            "magnitude ratios: {at}entry {i} ({:e}) is not a finite f32 number",
            values[i]
        ));
    }
    Ok(ratios)
}

impl MagRatios {
    /// The bundled ratios called `name` ([`BUNDLED_RATIOS`]).
    pub fn bundled(name: &str) -> Option<Self> {
        let (_, values) = BUNDLED_RATIOS.iter().find(|(n, _)| *n == name)?;
        Self::try_from(values.to_vec()).ok()
    }

    /// What a calibration measured: the conditional branch's ratios and, with true CFG, the
    /// unconditional one's.
    pub fn calibrated(cond: Vec<f32>, uncond: Option<Vec<f32>>) -> Result<Self, String> {
        Self::try_from(Self { cond, uncond }.to_json(serde_json::Value::Null))
    }

    /// The ratios as a calibration file: `{"cond": [...], "uncond": [...], "calibrated": ...}`.
    pub fn to_json(&self, calibrated: serde_json::Value) -> serde_json::Value {
        let widen = |r: &[f32]| r.iter().map(|&x| f64::from(x)).collect::<Vec<_>>();
        let mut v = serde_json::json!({ "cond": widen(&self.cond) });
        if let Some(u) = &self.uncond {
            v["uncond"] = widen(u).into();
        }
        v["calibrated"] = calibrated;
        v
    }

    /// Whether each CFG branch has its own ratios.
    pub fn per_branch(&self) -> bool {
        self.uncond.is_some()
    }

    /// A branch's ratios (`uncond`: the unconditional one's, which are the conditional ones'
    /// unless the file has its own) as diffusers uses them for `steps` steps: as given when
    /// there are `steps` of them, else `nearest_interp`: the ratio at `round(i · f32((L − 1) /
    /// (steps − 1)))` (the product in f32, rounded half to even as `torch.round`) for step i,
    /// the last one alone for a single step.
    pub fn for_steps(&self, steps: usize, uncond: bool) -> Vec<f32> {
        let src = match (&self.uncond, uncond) {
            (Some(u), true) => u,
            _ => &self.cond,
        };
        let len = src.len();
        if len == steps {
            return src.clone();
        }
        if steps <= 1 {
            return src[len - 1..].iter().take(steps).copied().collect();
        }
        let scale = ((len - 1) as f64 / (steps - 1) as f64) as f32;
        (0..steps)
            .map(|i| src[(i as f32 * scale).round_ties_even() as usize])
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mag_ratios_are_checked_and_interpolated_as_diffusers_does() {
        // Python (diffusers 0.42.1): from diffusers.hooks.mag_cache import nearest_interp
        // nearest_interp(torch.arange(L), N).tolist() for (L, N) in ...
        for (len, steps, want) in [
            (5, 9, vec![0, 0, 1, 2, 2, 2, 3, 4, 4]),
            (28, 10, vec![0, 3, 6, 9, 12, 15, 18, 21, 24, 27]),
            (16, 10, vec![0, 2, 3, 5, 7, 8, 10, 12, 13, 15]),
            (
                10,
                28,
                vec![
                    0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4, 5, 5, 5, 6, 6, 6, 7, 7, 7, 8, 8, 8,
                    9, 9,
                ],
            ),
            (5, 1, vec![4]),
            (4, 4, vec![0, 1, 2, 3]),
        ] {
            let ratios = MagRatios::try_from((0..len).map(f64::from).collect::<Vec<_>>()).unwrap();
            let got: Vec<f32> = ratios.for_steps(steps, true);
            let want: Vec<f32> = want.into_iter().map(|i: u32| i as f32).collect();
            assert_eq!(got, want, "{len} -> {steps}");
        }
        // the given numbers as f32, as torch.tensor(list) holds them
        assert_eq!(
            MagRatios::try_from(vec![1.0, 0.1])
                .unwrap()
                .for_steps(2, false),
            vec![1.0, 0.1f32]
        );
        for (bad, says) in [
            (vec![], "got 0"),
            (vec![1.0], "got 1"),
            (vec![1.0; 1001], "got 1001"),
            (vec![1.0, 1e300], "entry 1 (1e300)"),
            (vec![f64::NAN, 1.0], "entry 0"),
        ] {
            let e = MagRatios::try_from(bad).unwrap_err();
            assert!(
                e.starts_with("magnitude ratios: ") && e.contains(says),
                "{e}"
            );
        }
    }

    #[test]
    fn bundled_ratios_are_the_published_fifty() {
        for (name, values) in BUNDLED_RATIOS {
            let r = MagRatios::bundled(name).unwrap();
            assert_eq!(values.len(), 50, "{name}");
            assert_eq!(r.for_steps(50, false)[0], 1.0, "{name}");
            // MagCache4HunyuanVideo's last ratio at each size
            let last = r.for_steps(50, true)[49];
            assert!(last == 0.76592 || last == 0.75456, "{name}: {last}");
        }
        assert_eq!(MagRatios::bundled("skyreels"), None);
    }

    #[test]
    fn mag_ratio_files_hold_one_array_or_one_per_branch() {
        let shared: MagRatios = serde_json::from_str("[1.0, 1.5, 0.5]").unwrap();
        assert!(!shared.per_branch());
        assert_eq!(shared.for_steps(3, true), vec![1.0, 1.5, 0.5]);
        let text = r#"{"cond": [1.0, 1.25, 0.75], "uncond": [1.0, 2.0, 0.5],
                       "calibrated": {"steps": 3}}"#;
        let both: MagRatios = serde_json::from_str(text).unwrap();
        assert!(both.per_branch());
        assert_eq!(both.for_steps(3, false), vec![1.0, 1.25, 0.75]);
        assert_eq!(both.for_steps(3, true), vec![1.0, 2.0, 0.5]);
        let cond_only: MagRatios = serde_json::from_str(r#"{"cond": [1.0, 1.5]}"#).unwrap();
        assert_eq!(cond_only, MagRatios::try_from(vec![1.0, 1.5]).unwrap());
        // what a calibration writes reads back as it was
        let written = both.to_json(serde_json::json!({"steps": 3}));
        assert_eq!(MagRatios::try_from(written).unwrap(), both);
        assert_eq!(
            MagRatios::calibrated(vec![1.0, 1.25, 0.75], Some(vec![1.0, 2.0, 0.5])).unwrap(),
            both
        );
        for (bad, says) in [
            ("{}", "needs the `cond` ratios"),
            (r#"{"cond": [1, 2], "extra": 1}"#, "unknown key `extra`"),
            (
                r#"{"cond": [1, 2], "uncond": [1, 2, 3]}"#,
                "`uncond` has 3 ratios and `cond` 2",
            ),
            (
                r#"{"cond": [1]}"#,
                "`cond`: must be an array of 2 to 1000 numbers",
            ),
            (r#"{"cond": [1, "x"]}"#, "`cond`: entry 1 is not a number"),
            (r#"{"cond": 1}"#, "`cond`: must be an array of numbers"),
            ("[1, null]", "entry 1 is not a number"),
            ("\"1,2\"", "must be a JSON array of numbers or an object"),
        ] {
            let e = serde_json::from_str::<MagRatios>(bad)
                .unwrap_err()
                .to_string();
            assert!(
                e.starts_with("magnitude ratios: ") && e.contains(says),
                "{bad}: {e}"
            );
        }
    }
}
