//! One generation's parameters as one serde type, and the rules its final values are checked
//! against, written once for the server (at submit and again in the worker) and the CLI.

use crate::{
    check_encodable, check_frames, check_pixel_frames, check_side, work_millions, CacheSpec,
    Ulysses, CFG_GATE, EMBEDDED_GUIDANCE, FLOW_SHIFT, FPS_RANGE, GUIDANCE, LORA_SCALE,
    MAX_LORA_PATH_BYTES, MAX_PROMPT_BYTES, SEED, STEPS,
};
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
    /// The value fed to the transformer's guidance embedder (× 1000).
    pub embedded_guidance_scale: f64,
    pub seed: u64,
    /// Frames per second of the MP4 (the export's, not the pipeline's).
    pub fps: f64,
    /// Step caching across the denoising steps, written as its string form (`none`,
    /// `first-block:T`, `teacache:T`).
    pub cache: CacheSpec,
    /// CFG gating (`--cfg-gate F`, 0 < F < 1): from step ceil(F · steps) on the unconditional
    /// forward is not run and the guidance reuses the last full step's `cond − uncond`; None:
    /// off. A no-op without true CFG (guidance_scale ≤ 1).
    #[serde(default)]
    pub cfg_gate: Option<f64>,
    /// The flow-matching shift of the sigma schedule; None: the model's
    /// `scheduler_config.json`.
    #[serde(default)]
    pub flow_shift: Option<f64>,
    /// LoRA adapters applied at forward time, in order (WaveSpeed's `loras`); empty: none.
    #[serde(default)]
    pub loras: Vec<LoraSpec>,
    /// RIFLEx (thu-ml/RIFLEx): the 1-based index of the temporal RoPE frequency lowered to
    /// `0.9 · 2π / latent frames`; 0: off.
    #[serde(default)]
    pub riflex_freq_index: usize,
}

/// One LoRA of a request: where its file is (a name, a URL, a hub `REPO_ID/FILE.safetensors` or,
/// for the CLI, a local path; the server or the CLI resolves it) and its weight.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoraSpec {
    pub path: String,
    /// Multiplies the adapter's `alpha / rank` (diffusers' `set_adapters` weight); 1 by default.
    #[serde(default = "unit_scale")]
    pub scale: f64,
}

fn unit_scale() -> f64 {
    1.0
}

impl std::fmt::Display for LoraSpec {
    /// `PATH:SCALE`, the CLI's `--lora` form.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.path, self.scale)
    }
}

impl std::str::FromStr for LoraSpec {
    type Err = String;

    /// `PATH` or `PATH:SCALE` (the last `:` followed by a number; a Windows drive letter or a
    /// URL's scheme is not one), SCALE 1.0 by default.
    fn from_str(s: &str) -> Result<Self, String> {
        let (path, scale) = match s.rsplit_once(':') {
            Some((path, scale)) => match scale.parse::<f64>() {
                Ok(scale) => (path, scale),
                Err(_) => (s, 1.0),
            },
            None => (s, 1.0),
        };
        let spec = LoraSpec {
            path: path.to_string(),
            scale,
        };
        spec.check().map_err(|rule| format!("{s:?}: {rule}"))?;
        Ok(spec)
    }
}

impl LoraSpec {
    /// The syntax rules of one LoRA (its path is resolved later): a non-empty path of at most
    /// [`MAX_LORA_PATH_BYTES`], a scale within [`LORA_SCALE`].
    pub fn check(&self) -> Result<(), String> {
        if self.path.trim().is_empty() {
            return Err("path must be a non-empty string".into());
        }
        if self.path.len() > MAX_LORA_PATH_BYTES {
            return Err(format!("path must be at most {MAX_LORA_PATH_BYTES} bytes"));
        }
        if !LORA_SCALE.contains(self.scale) {
            return Err(format!("scale {}", LORA_SCALE.rule()));
        }
        Ok(())
    }
}

/// What a server or worker allows (the model's and its own limits).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Limits {
    /// Height and width must be multiples of this (the model's).
    pub size_multiple: usize,
    /// Largest clip in pixel-frames (`--max-pixel-frames`).
    pub max_pixel_frames: u64,
    /// The Ulysses layout a request must fit (`--parallel ulysses=N`), if any.
    pub ulysses: Option<Ulysses>,
    /// Largest task in millions of width x height x frames x steps (`--max-work`).
    pub max_work: f64,
    /// Most LoRAs in one request (`--max-loras`; 0: LoRAs refused).
    pub max_loras: usize,
    /// Frequencies of the model's temporal RoPE axis (its `rope_axes_dim[0] / 2`): the largest
    /// `riflex_freq_index`.
    pub temporal_rope_frequencies: usize,
}

/// A refused value: the field and the rule it breaks.
#[derive(Clone, Debug, PartialEq)]
pub struct Refusal {
    pub field: &'static str,
    pub rule: String,
}

impl Refusal {
    fn new(field: &'static str, rule: impl Into<String>) -> Self {
        Self {
            field,
            rule: rule.into(),
        }
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.field, self.rule)
    }
}

impl std::error::Error for Refusal {}

impl GenerationParams {
    /// Checks the final values against every rule and `limits`; the first refusal names its
    /// field.
    pub fn check(&self, limits: &Limits) -> Result<(), Refusal> {
        let refuse = |field| move |rule: String| Refusal::new(field, rule);
        let pair = |(field, rule): (&'static str, String)| Refusal::new(field, rule);
        if self.prompt.trim().is_empty() {
            return Err(Refusal::new(
                "prompt",
                "is required and must be a non-empty string",
            ));
        }
        for (field, text) in [
            ("prompt", Some(&self.prompt)),
            ("negative_prompt", self.negative_prompt.as_ref()),
        ] {
            if text.is_some_and(|t| t.len() > MAX_PROMPT_BYTES) {
                return Err(Refusal::new(
                    field,
                    format!("is longer than {MAX_PROMPT_BYTES} bytes"),
                ));
            }
        }
        let (h, w, num_frames, steps) = (self.height, self.width, self.num_frames, self.steps);
        check_side(h, limits.size_multiple).map_err(refuse("height"))?;
        check_side(w, limits.size_multiple).map_err(refuse("width"))?;
        check_frames(num_frames).map_err(refuse("num_frames"))?;
        if !STEPS.contains(steps as i64) {
            return Err(Refusal::new("num_inference_steps", STEPS.rule()));
        }
        for (field, v, range) in [
            ("guidance_scale", self.guidance_scale, GUIDANCE),
            (
                "embedded_guidance_scale",
                self.embedded_guidance_scale,
                EMBEDDED_GUIDANCE,
            ),
            ("fps", self.fps, FPS_RANGE),
        ] {
            if !range.contains(v) {
                return Err(Refusal::new(field, range.rule()));
            }
        }
        if self.cfg_gate.is_some_and(|f| !CFG_GATE.contains(f)) {
            return Err(Refusal::new("cfg_gate", CFG_GATE.rule()));
        }
        if self.flow_shift.is_some_and(|s| !FLOW_SHIFT.contains(s)) {
            return Err(Refusal::new("flow_shift", FLOW_SHIFT.rule()));
        }
        if self.seed > SEED.max as u64 {
            return Err(Refusal::new("seed", SEED.rule()));
        }
        let work = work_millions(h, w, num_frames, steps);
        let max_work = limits.max_work;
        if work > max_work {
            return Err(Refusal::new(
                "num_inference_steps",
                format!(
                    "the task is too large: {w}x{h} pixels x {num_frames} frames x {steps} steps \
                     is {work:.0} million; this server's limit (--max-work) is {max_work:.0} \
                     million"
                ),
            ));
        }
        check_encodable(h, w).map_err(pair)?;
        check_pixel_frames(h, w, num_frames, limits.max_pixel_frames)
            .map_err(refuse("num_frames"))?;
        if let Some(u) = &limits.ulysses {
            u.check(h, w, num_frames, self.cache).map_err(pair)?;
        }
        if self.loras.len() > limits.max_loras {
            return Err(Refusal::new(
                "loras",
                match limits.max_loras {
                    0 => "are not accepted by this server (--max-loras 0)".to_string(),
                    n => format!("must be at most {n} (this server's --max-loras)"),
                },
            ));
        }
        for (i, lora) in self.loras.iter().enumerate() {
            lora.check()
                .map_err(|rule| Refusal::new("loras", format!("[{i}]: {rule}")))?;
        }
        let k = self.riflex_freq_index;
        if k > limits.temporal_rope_frequencies {
            return Err(Refusal::new(
                "riflex_freq_index",
                format!(
                    "must be from 0 (off) to {} (this model's temporal RoPE frequencies), got {k}",
                    limits.temporal_rope_frequencies
                ),
            ));
        }
        Ok(())
    }
}

/// Written as its string form (`none`, `first-block:0.05`, `teacache:0.1`).
impl Serialize for CacheSpec {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// Read from its string form, with [`CacheSpec`]'s `FromStr` rules.
impl<'de> Deserialize<'de> for CacheSpec {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{TokenLayout, FALLBACK_MAX_PIXEL_FRAMES};

    fn valid() -> GenerationParams {
        GenerationParams {
            prompt: "FPS-24, a cat".into(),
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
            cfg_gate: None,
            flow_shift: None,
            loras: Vec::new(),
            riflex_freq_index: 0,
        }
    }

    fn limits() -> Limits {
        Limits {
            size_multiple: 16,
            max_pixel_frames: FALLBACK_MAX_PIXEL_FRAMES,
            ulysses: None,
            max_work: 2000.0,
            max_loras: crate::MAX_LORAS,
            temporal_rope_frequencies: crate::HUNYUAN_TEMPORAL_ROPE_FREQUENCIES,
        }
    }

    fn lora(path: &str, scale: f64) -> LoraSpec {
        LoraSpec {
            path: path.into(),
            scale,
        }
    }

    #[test]
    fn a_valid_request_passes() {
        assert_eq!(valid().check(&limits()), Ok(()));
        let with_all = GenerationParams {
            negative_prompt: Some("blurry".into()),
            cache: CacheSpec::TeaCache(0.1),
            cfg_gate: Some(0.6),
            flow_shift: Some(7.0),
            seed: SEED.max as u64,
            loras: vec![lora("a.safetensors", -4.0), lora("b", 4.0), lora("c", 0.0)],
            riflex_freq_index: crate::RIFLEX_HUNYUAN_K,
            ..valid()
        };
        assert_eq!(with_all.check(&limits()), Ok(()));
    }

    /// 960x544, 97 frames: 25 x 34 x 60 tokens, an even count.
    const ULYSSES_2: Ulysses = Ulysses {
        degree: 2,
        layout: TokenLayout {
            spatial_compression: 8,
            temporal_compression: 4,
            patch_size: 2,
            patch_size_t: 1,
        },
    };

    type Edit = fn(&mut GenerationParams, &mut Limits);

    #[test]
    fn each_rule_names_its_field() {
        let cases: Vec<(Edit, &str, &str)> =
            vec![
            (|p, _| p.prompt = " \n".into(), "prompt", "non-empty"),
            (
                |p, _| p.prompt = "x".repeat(MAX_PROMPT_BYTES + 1),
                "prompt",
                "8192 bytes",
            ),
            (
                |p, _| p.negative_prompt = Some("x".repeat(MAX_PROMPT_BYTES + 1)),
                "negative_prompt",
                "8192 bytes",
            ),
            (|p, _| p.height = 8, "height", "16 to 4096"),
            (|p, _| p.height = 100, "height", "multiple of 16"),
            (|p, _| p.width = 4112, "width", "16 to 4096"),
            (|_, l| l.size_multiple = 64, "height", "multiple of 64"),
            (|p, _| p.num_frames = 8, "num_frames", "4k+1"),
            (|p, _| p.num_frames = 0, "num_frames", "from 1 to 257"),
            (|p, _| p.steps = 0, "num_inference_steps", "from 1 to 100"),
            (|p, _| p.steps = 101, "num_inference_steps", "from 1 to 100"),
            (|p, _| p.guidance_scale = f64::NAN, "guidance_scale", "0 to 30"),
            (
                |p, _| p.embedded_guidance_scale = 31.0,
                "embedded_guidance_scale",
                "0 to 30",
            ),
            (|p, _| p.fps = 0.5, "fps", "1 to 120"),
            (|p, _| p.flow_shift = Some(0.0), "flow_shift", "above 0"),
            (|p, _| p.cfg_gate = Some(1.0), "cfg_gate", "above 0 and below 1"),
            (|p, _| p.cfg_gate = Some(0.0), "cfg_gate", "above 0 and below 1"),
            (|p, _| p.cfg_gate = Some(f64::NAN), "cfg_gate", "above 0 and below 1"),
            (|p, _| p.seed = 1 << 31, "seed", "-1 to 2147483647"),
            (
                |_, l| l.max_work = 1000.0,
                "num_inference_steps",
                "the task is too large: 960x544 pixels x 97 frames x 30 steps is 1520 million; \
                 this server's limit (--max-work) is 1000 million",
            ),
            (
                |p, l| {
                    (p.height, p.width, p.num_frames, p.steps) = (2176, 3840, 1, 1);
                    l.max_pixel_frames = u64::MAX;
                },
                "height",
                "H.264 encoder",
            ),
            (
                |_, l| l.max_pixel_frames = FALLBACK_MAX_PIXEL_FRAMES - 1,
                "num_frames",
                "--max-pixel-frames",
            ),
            (
                |p, l| {
                    p.cache = CacheSpec::FirstBlock(0.05);
                    l.ulysses = Some(ULYSSES_2);
                },
                "cache",
                "ulysses=2",
            ),
            (
                |p, l| {
                    (p.height, p.width, p.num_frames) = (48, 80, 1);
                    l.ulysses = Some(ULYSSES_2);
                },
                "num_frames",
                "15 video tokens",
            ),
            (
                |p, _| p.loras = vec![lora("a", 1.0); 4],
                "loras",
                "at most 3 (this server's --max-loras)",
            ),
            (
                |p, l| {
                    p.loras = vec![lora("a", 1.0)];
                    l.max_loras = 0;
                },
                "loras",
                "not accepted",
            ),
            (
                |p, _| p.loras = vec![lora("a", 1.0), lora(" ", 1.0)],
                "loras",
                "[1]: path must be a non-empty string",
            ),
            (
                |p, _| p.loras = vec![lora("a", 4.5)],
                "loras",
                "[0]: scale must be a number from -4 to 4",
            ),
            (
                |p, _| p.loras = vec![lora("a", f64::NAN)],
                "loras",
                "[0]: scale must be a number from -4 to 4",
            ),
            (
                |p, _| p.loras = vec![lora(&"x".repeat(crate::MAX_LORA_PATH_BYTES + 1), 1.0)],
                "loras",
                "[0]: path must be at most 2048 bytes",
            ),
            (
                |p, _| p.riflex_freq_index = 9,
                "riflex_freq_index",
                "from 0 (off) to 8 (this model's temporal RoPE frequencies), got 9",
            ),
        ];
        for (edit, field, rule) in cases {
            let (mut p, mut l) = (valid(), limits());
            edit(&mut p, &mut l);
            let e = p.check(&l).unwrap_err();
            assert_eq!(e.field, field, "{e}");
            assert!(e.rule.contains(rule), "{e} should say {rule:?}");
            assert_eq!(e.to_string(), format!("{field}: {}", e.rule));
        }
        // the layout itself is no refusal
        let mut l = limits();
        l.ulysses = Some(ULYSSES_2);
        assert_eq!(valid().check(&l), Ok(()));
    }

    #[test]
    fn serde_round_trips() {
        for cache in [
            CacheSpec::None,
            CacheSpec::FirstBlock(0.05),
            CacheSpec::TeaCache(0.1),
            CacheSpec::TeaCache(10.0),
            CacheSpec::MagCache(crate::MagCacheSpec {
                threshold: 0.1,
                max_skip: 2,
                retention: 0.35,
            }),
        ] {
            for flow_shift in [None, Some(3.0)] {
                let p = GenerationParams {
                    cache,
                    flow_shift,
                    negative_prompt: Some("blurry".into()),
                    ..valid()
                };
                let json = serde_json::to_value(&p).unwrap();
                assert_eq!(json["cache"], cache.to_string());
                let back: GenerationParams = serde_json::from_value(json).unwrap();
                assert_eq!(back, p);
            }
        }
        let mut json = serde_json::to_value(valid()).unwrap();
        assert_eq!(json["cache"], "none");
        // records written before these fields existed read as no gate, no LoRA, RIFLEx off
        for older in ["cfg_gate", "flow_shift", "loras", "riflex_freq_index"] {
            json.as_object_mut().unwrap().remove(older);
        }
        let back: GenerationParams = serde_json::from_value(json.clone()).unwrap();
        assert_eq!(back.flow_shift, None);
        assert_eq!(back, valid());
        // a cache spec is read with its FromStr rules
        json["cache"] = "teacache:0".into();
        let e = serde_json::from_value::<GenerationParams>(json).unwrap_err();
        assert!(e.to_string().contains("first-block:THRESHOLD"), "{e}");
        // a LoRA's scale defaults to 1; unknown keys are refused
        let l: LoraSpec = serde_json::from_value(serde_json::json!({"path": "a"})).unwrap();
        assert_eq!(l, lora("a", 1.0));
        assert!(
            serde_json::from_value::<LoraSpec>(serde_json::json!({"path": "a", "weight": 1}))
                .is_err()
        );
    }

    #[test]
    fn lora_specs_parse_from_the_cli_form() {
        for (text, path, scale) in [
            ("style.safetensors", "style.safetensors", 1.0),
            ("style.safetensors:0.7", "style.safetensors", 0.7),
            ("dir/style.safetensors:-0.3", "dir/style.safetensors", -0.3),
            ("https://h/x.safetensors", "https://h/x.safetensors", 1.0),
            ("https://h/x.safetensors:2", "https://h/x.safetensors", 2.0),
            (r"C:\loras\a.safetensors", r"C:\loras\a.safetensors", 1.0),
            (
                "owner/repo/file.safetensors:1.5",
                "owner/repo/file.safetensors",
                1.5,
            ),
        ] {
            let l: LoraSpec = text.parse().unwrap();
            assert_eq!(l, lora(path, scale), "{text}");
            if text.contains(':') && scale != 1.0 {
                assert_eq!(l.to_string(), text);
            }
        }
        for (bad, says) in [
            ("a:5", "scale must be a number from -4 to 4"),
            (":0.5", "path must be a non-empty string"),
            ("", "path must be a non-empty string"),
        ] {
            let e = bad.parse::<LoraSpec>().unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }
}
