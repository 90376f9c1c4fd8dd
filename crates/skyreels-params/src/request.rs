//! One generation's parameters, as validated: what the server's contract produces, what a
//! shared queue carries as-is, and what the pipeline runs (the image and the noise travel
//! beside them), with the one set of rules their final values obey.

use crate::*;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// One generation's parameters, as validated (the image, the noise travel beside them).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GenerationParams {
    pub prompt: String,
    /// None: the model's default negative prompt.
    pub negative_prompt: Option<String>,
    pub height: usize,
    pub width: usize,
    pub num_frames: usize,
    pub steps: usize,
    /// True classifier-free guidance; a second transformer pass per step when > 1.
    pub guidance_scale: f64,
    /// The value fed to the transformer's guidance embedder.
    pub embedded_guidance_scale: f64,
    pub seed: u64,
    /// Frames per second of the video written.
    pub fps: f64,
    /// Step caching across the denoising steps (its text form: `none`, `teacache:0.1`...).
    pub cache: CacheSpec,
    /// The flow-matching shift of the sigma schedule; None: the model's scheduler config.
    #[serde(default)]
    pub flow_shift: Option<f64>,
}

/// What a server or worker allows: the model's limits and its own.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Limits {
    /// Height and width must be multiples of this.
    pub size_multiple: usize,
    /// `--max-pixel-frames`.
    pub max_pixel_frames: u64,
    /// The worker's Ulysses layout, whose token split a request must fit.
    pub ulysses: Option<Ulysses>,
    /// `--max-work`, in millions of width x height x frames x steps.
    pub max_work: f64,
}

/// A refused value: the field and the rule it breaks.
#[derive(Clone, Debug, PartialEq)]
pub struct Refusal {
    pub field: &'static str,
    pub rule: String,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.field, self.rule)
    }
}

impl std::error::Error for Refusal {}

impl GenerationParams {
    /// The rules the final values obey, written once: checked where a request is accepted and
    /// again where a worker takes it.
    pub fn check(&self, limits: &Limits) -> Result<(), Refusal> {
        let refuse = |field: &'static str, rule: String| Err(Refusal { field, rule });
        if self.prompt.trim().is_empty() {
            return refuse(
                "prompt",
                "is required and must be a non-empty string".into(),
            );
        }
        for (field, text) in [
            ("prompt", Some(&self.prompt)),
            ("negative_prompt", self.negative_prompt.as_ref()),
        ] {
            if text.is_some_and(|t| t.len() > MAX_PROMPT_BYTES) {
                return refuse(field, format!("is longer than {MAX_PROMPT_BYTES} bytes"));
            }
        }
        let (h, w, n, steps) = (self.height, self.width, self.num_frames, self.steps);
        let field = |field: &'static str| move |rule: String| Refusal { field, rule };
        check_side(h, limits.size_multiple).map_err(field("height"))?;
        check_side(w, limits.size_multiple).map_err(field("width"))?;
        check_frames(n).map_err(field("num_frames"))?;
        if !STEPS.contains(steps as i64) {
            return refuse("num_inference_steps", STEPS.rule());
        }
        for (name, v, range) in [
            ("guidance_scale", self.guidance_scale, GUIDANCE),
            (
                "embedded_guidance_scale",
                self.embedded_guidance_scale,
                EMBEDDED_GUIDANCE,
            ),
            ("fps", self.fps, FPS_RANGE),
        ] {
            if !range.contains(v) {
                return refuse(name, range.rule());
            }
        }
        if self.flow_shift.is_some_and(|s| !FLOW_SHIFT.contains(s)) {
            return refuse("flow_shift", FLOW_SHIFT.rule());
        }
        if self.seed > SEED.max as u64 {
            return refuse("seed", SEED.rule());
        }
        let work = work_millions(h, w, n, steps);
        if work > limits.max_work {
            return refuse(
                "num_inference_steps",
                format!(
                    "the task is too large: {w}x{h} pixels x {n} frames x {steps} steps is \
                     {work:.0} million; this server's limit (--max-work) is {:.0} million",
                    limits.max_work
                ),
            );
        }
        let pair = |(field, rule): (&'static str, String)| Refusal { field, rule };
        check_encodable(h, w).map_err(pair)?;
        check_pixel_frames(h, w, n, limits.max_pixel_frames).map_err(field("num_frames"))?;
        if let Some(u) = &limits.ulysses {
            u.check(h, w, n, self.cache).map_err(pair)?;
        }
        Ok(())
    }
}

impl Serialize for CacheSpec {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for CacheSpec {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params() -> GenerationParams {
        GenerationParams {
            prompt: "a cat".into(),
            negative_prompt: None,
            height: 544,
            width: 960,
            num_frames: 97,
            steps: 30,
            guidance_scale: 6.0,
            embedded_guidance_scale: 1.0,
            seed: 42,
            fps: 24.0,
            cache: CacheSpec::None,
            flow_shift: None,
        }
    }

    const LIMITS: Limits = Limits {
        size_multiple: 16,
        max_pixel_frames: FALLBACK_MAX_PIXEL_FRAMES,
        ulysses: None,
        max_work: 3000.0,
    };

    #[test]
    fn each_rule_names_its_field() {
        assert_eq!(params().check(&LIMITS), Ok(()));
        let refused = |change: &dyn Fn(&mut GenerationParams), limits: &Limits| {
            let mut p = params();
            change(&mut p);
            p.check(limits).unwrap_err().field
        };
        let cases: [(&dyn Fn(&mut GenerationParams), &str); 14] = [
            (&|p| p.prompt = " ".into(), "prompt"),
            (&|p| p.prompt = "x".repeat(MAX_PROMPT_BYTES + 1), "prompt"),
            (
                &|p| p.negative_prompt = Some("x".repeat(MAX_PROMPT_BYTES + 1)),
                "negative_prompt",
            ),
            (&|p| p.height = 540, "height"),
            (&|p| p.width = 8, "width"),
            (&|p| p.num_frames = 96, "num_frames"),
            (&|p| p.steps = 0, "num_inference_steps"),
            (&|p| p.guidance_scale = -1.0, "guidance_scale"),
            (
                &|p| p.embedded_guidance_scale = f64::NAN,
                "embedded_guidance_scale",
            ),
            (&|p| p.fps = 0.0, "fps"),
            (&|p| p.flow_shift = Some(0.0), "flow_shift"),
            (&|p| p.seed = u64::MAX, "seed"),
            // 960x544x97x100 = 5,066 million
            (&|p| p.steps = 100, "num_inference_steps"),
            // 961 frames: more pixel-frames than the fallback limit
            (&|p| p.num_frames = 129, "num_frames"),
        ];
        let roomy = Limits {
            max_work: 1e9,
            ..LIMITS
        };
        for (i, (change, want)) in cases.iter().enumerate() {
            let limits = if i == 13 { &roomy } else { &LIMITS };
            assert_eq!(refused(change, limits), *want, "case {i}");
        }
        // the encoder's limit, with room for the rest
        let big = Limits {
            max_work: 1e9,
            max_pixel_frames: u64::MAX,
            ..LIMITS
        };
        let wide = |p: &mut GenerationParams| (p.height, p.width, p.num_frames) = (544, 4096, 1);
        assert_eq!(refused(&wide, &big), "width");
        let e = {
            let mut p = params();
            p.steps = 100;
            p.check(&LIMITS).unwrap_err()
        };
        assert!(e
            .to_string()
            .starts_with("num_inference_steps: the task is too large"));
    }

    #[test]
    fn parallel_layouts_refuse_what_they_cannot_split() {
        let ulysses = Ulysses {
            degree: 2,
            layout: TokenLayout {
                spatial_compression: 8,
                temporal_compression: 4,
                patch_size: 2,
                patch_size_t: 1,
            },
        };
        let limits = Limits {
            ulysses: Some(ulysses),
            ..LIMITS
        };
        let mut p = params();
        p.cache = CacheSpec::TeaCache(0.1);
        assert_eq!(p.check(&limits).unwrap_err().field, "cache");
    }

    #[test]
    fn serde_round_trip_keeps_every_field() {
        for cache in [
            CacheSpec::None,
            CacheSpec::FirstBlock(0.05),
            CacheSpec::TeaCache(0.1),
        ] {
            let p = GenerationParams {
                cache,
                flow_shift: Some(3.5),
                negative_prompt: Some("blur".into()),
                ..params()
            };
            let json = serde_json::to_string(&p).unwrap();
            assert_eq!(serde_json::from_str::<GenerationParams>(&json).unwrap(), p);
        }
        // flow_shift missing (queued by an earlier version), unknown fields ignored
        let old = r#"{"model":"m","prompt":"p","negative_prompt":null,"image":false,
            "height":64,"width":96,"num_frames":9,"steps":4,"guidance_scale":6.0,
            "embedded_guidance_scale":1.0,"seed":1,"fps":24.0,"cache":"teacache:0.1"}"#;
        let p: GenerationParams = serde_json::from_str(old).unwrap();
        assert_eq!((p.flow_shift, p.cache), (None, CacheSpec::TeaCache(0.1)));
        assert!(
            serde_json::from_str::<GenerationParams>(&old.replace("teacache:0.1", "x")).is_err()
        );
    }
}
