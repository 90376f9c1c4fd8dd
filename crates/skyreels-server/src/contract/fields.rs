//! The submit's field types: each field's rule lives in its type, so deserializing checks it
//! (the 400 states the rule) and the OpenAPI schema describes it from the same constant.

use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize};
use skyreels_params::{self as params, FloatRange, IntRange};
use std::fmt;
use utoipa::openapi::schema::{ObjectBuilder, Schema, Type};
use utoipa::openapi::RefOr;
use utoipa::{PartialSchema, ToSchema};

fn describe(b: ObjectBuilder, description: &str) -> RefOr<Schema> {
    b.description(Some(description)).into()
}

struct IntVisitor(IntRange);

impl Visitor<'_> for IntVisitor {
    type Value = i64;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "an integer from {} to {}", self.0.min, self.0.max)
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<i64, E> {
        if self.0.contains(v) {
            Ok(v)
        } else {
            Err(E::custom(format!("{}, got {v}", self.0.rule())))
        }
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<i64, E> {
        match i64::try_from(v) {
            Ok(v) => self.visit_i64(v),
            Err(_) => Err(E::custom(format!("{}, got {v}", self.0.rule()))),
        }
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<i64, E> {
        if v.fract() == 0.0 && v.abs() < 9.0e15 {
            self.visit_i64(v as i64)
        } else {
            Err(E::custom(format!("{}, got {v}", self.0.rule())))
        }
    }
}

struct FloatVisitor(FloatRange);

impl Visitor<'_> for FloatVisitor {
    type Value = f64;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        // "must be a number ..." -> "a number ..."
        f.write_str(self.0.rule().trim_start_matches("must be "))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<f64, E> {
        if self.0.contains(v) {
            Ok(v)
        } else {
            Err(E::custom(format!("{}, got {v}", self.0.rule())))
        }
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<f64, E> {
        self.visit_f64(v as f64)
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<f64, E> {
        self.visit_f64(v as f64)
    }
}

struct TextVisitor(usize);

impl Visitor<'_> for TextVisitor {
    type Value = String;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "a string of at most {} bytes", self.0)
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<String, E> {
        self.visit_string(v.to_string())
    }

    fn visit_string<E: de::Error>(self, v: String) -> Result<String, E> {
        if v.len() <= self.0 {
            Ok(v)
        } else {
            Err(E::custom(format!(
                "must be a string of at most {} bytes, got {}",
                self.0,
                v.len()
            )))
        }
    }
}

/// An integer field whose range is a `skyreels-params` constant: deserialized with the range
/// checked (the error states it) and described by the same range in the schema.
macro_rules! int_field {
    ($(#[$m:meta])* $name:ident: $ty:ty = $range:expr, $desc:expr) => {
        $(#[$m])*
        #[derive(Clone, Copy, Debug, PartialEq, Serialize)]
        #[serde(transparent)]
        pub struct $name(pub $ty);

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                // the visitor checked the range, so the value fits the type
                d.deserialize_any(IntVisitor($range)).map(|v| Self(v as $ty))
            }
        }

        impl PartialSchema for $name {
            fn schema() -> RefOr<Schema> {
                let r: IntRange = $range;
                describe(
                    ObjectBuilder::new()
                        .schema_type(Type::Integer)
                        .minimum(Some(r.min))
                        .maximum(Some(r.max)),
                    $desc,
                )
            }
        }

        impl ToSchema for $name {}
    };
}

/// A number field, as [`int_field`]; `$default` is an `Option<f64>` (None: the default is the
/// model's, not a constant).
macro_rules! float_field {
    ($(#[$m:meta])* $name:ident = $range:expr, $default:expr, $desc:expr) => {
        $(#[$m])*
        #[derive(Clone, Copy, Debug, PartialEq, Serialize)]
        #[serde(transparent)]
        pub struct $name(pub f64);

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                d.deserialize_any(FloatVisitor($range)).map(Self)
            }
        }

        impl PartialSchema for $name {
            fn schema() -> RefOr<Schema> {
                let r: FloatRange = $range;
                let default: Option<f64> = $default;
                let b = ObjectBuilder::new()
                    .schema_type(Type::Number)
                    .default(default.map(Into::into));
                let b = if r.max_exclusive {
                    b.exclusive_maximum(Some(r.max))
                } else {
                    b.maximum(Some(r.max))
                };
                let b = if r.min_exclusive {
                    b.exclusive_minimum(Some(r.min))
                } else {
                    b.minimum(Some(r.min))
                };
                describe(b, $desc)
            }
        }

        impl ToSchema for $name {}
    };
}

/// A string field with a byte limit, as [`int_field`].
macro_rules! text_field {
    ($(#[$m:meta])* $name:ident = $max:expr, $desc:expr) => {
        $(#[$m])*
        #[derive(Clone, Debug, PartialEq, Serialize)]
        #[serde(transparent)]
        pub struct $name(pub String);

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                d.deserialize_string(TextVisitor($max)).map(Self)
            }
        }

        impl PartialSchema for $name {
            fn schema() -> RefOr<Schema> {
                describe(
                    ObjectBuilder::new()
                        .schema_type(Type::String)
                        .max_length(Some($max)),
                    $desc,
                )
            }
        }

        impl ToSchema for $name {}
    };
}

text_field!(
    /// The prompt (required, non-empty).
    Prompt = params::MAX_PROMPT_BYTES,
    "What the video shows; SkyReels prompts start with \"FPS-24, \". Required."
);
text_field!(
    /// What to avoid (true CFG).
    NegativePrompt = params::MAX_PROMPT_BYTES,
    "What to avoid (true CFG). Default: the model's negative prompt (SkyReels' own)."
);
int_field!(
    /// -1 (random) or a seed.
    Seed: i64 = params::SEED,
    "-1 or absent: random; the seed used is reported in the prediction."
);
int_field!(
    /// Denoising steps.
    Steps: usize = params::STEPS,
    "Denoising steps. Default: the model's (SkyReels: 30)."
);
int_field!(
    /// Frames, 4k+1.
    NumFrames: usize = params::FRAMES,
    "Frames, 4k+1 (1, 5, ..., 97, ...). Default: the model's (SkyReels: 97)."
);
int_field!(
    /// A frame side in pixels.
    Side: usize = params::SIDE,
    "Pixels, a multiple of 16; give width and height together. Default: the model's size (SkyReels: 960x544), turned for a portrait image."
);
float_field!(
    /// True CFG scale.
    GuidanceScale = params::GUIDANCE,
    Some(params::GUIDANCE_SCALE),
    "True classifier-free guidance; values > 1 also run the negative prompt."
);
float_field!(
    /// The transformer's guidance embedding.
    EmbeddedGuidanceScale = params::EMBEDDED_GUIDANCE,
    Some(params::EMBEDDED_GUIDANCE_SCALE),
    "The value fed to the transformer's guidance embedder."
);
float_field!(
    /// MP4 frame rate.
    Fps = params::FPS_RANGE,
    Some(params::FPS),
    "Frames per second of the MP4."
);
float_field!(
    /// WaveSpeed's video length in seconds.
    Duration = params::DURATION,
    None,
    "Seconds of video (WaveSpeed's video models): num_frames becomes the 4k+1 nearest to \
     duration x fps, a tie going up (5 s at 24 fps: 121 frames), within the num_frames limit. \
     Given with a num_frames that differs, a 400 naming both."
);
float_field!(
    /// The flow-matching shift of the sampler.
    FlowShift = params::FLOW_SHIFT,
    None,
    "The flow-matching scheduler's shift for this task: sigma' = shift*sigma / (1 + (shift - 1)*sigma), \
     diffusers' FlowMatchEulerDiscreteScheduler(shift=...). Default: the model's scheduler config \
     (SkyReels: 7)."
);
float_field!(
    /// CFG gating: the fraction of the steps after which the unconditional forward is skipped.
    CfgGate = params::CFG_GATE,
    None,
    "CFG gating (an extension of this server): from step ceil(cfg_gate x num_inference_steps) \
     on, the negative prompt's transformer forward is skipped and the guidance reuses the last \
     full step's (cond - uncond); those forwards count as cached in the timings. Above 0 and \
     below 1, e.g. 0.7; combines with `cache`; no effect when guidance_scale <= 1 (no negative \
     forward). Default: the server's --cfg-gate (off unless set)."
);

/// `true` or `false` (a string such as "yes" is refused with that rule).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
#[serde(transparent)]
pub struct Flag(pub bool);

impl<'de> Deserialize<'de> for Flag {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = bool;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("true or false")
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<bool, E> {
                Ok(v)
            }
        }
        d.deserialize_bool(V).map(Self)
    }
}

impl PartialSchema for Flag {
    fn schema() -> RefOr<Schema> {
        ObjectBuilder::new()
            .schema_type(Type::Boolean)
            .default(Some(false.into()))
            .into()
    }
}

impl ToSchema for Flag {}

/// WaveSpeed's `size`: `"WIDTH*HEIGHT"` (also `"WIDTHxHEIGHT"`), kept as written for the echo.
/// Its sides follow the rules of `width` and `height`, checked at submit with the model's
/// size multiple.
#[derive(Clone, Debug, PartialEq)]
pub struct Size {
    pub width: usize,
    pub height: usize,
    text: String,
}

impl Size {
    /// The value as the request wrote it.
    pub fn as_str(&self) -> &str {
        &self.text
    }
}

/// The longest `size` text accepted (and quoted back in its 400).
const MAX_SIZE_BYTES: usize = 32;

impl std::str::FromStr for Size {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let side = |v: &str| {
            v.bytes()
                .all(|b| b.is_ascii_digit())
                .then(|| v.parse::<usize>().ok())
                .flatten()
        };
        let parsed = s
            .split_once(['*', 'x'])
            .and_then(|(w, h)| Some((side(w)?, side(h)?)));
        match parsed {
            Some((width, height)) if s.len() <= MAX_SIZE_BYTES => Ok(Size {
                width,
                height,
                text: s.to_string(),
            }),
            _ if s.len() <= MAX_SIZE_BYTES => Err(format!(
                "must be \"WIDTH*HEIGHT\" in pixels (e.g. \"832*480\"), got {s:?}"
            )),
            _ => Err(format!(
                "must be \"WIDTH*HEIGHT\" in pixels (e.g. \"832*480\"), at most \
                 {MAX_SIZE_BYTES} bytes"
            )),
        }
    }
}

impl Serialize for Size {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.text)
    }
}

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct SizeVisitor;
        impl Visitor<'_> for SizeVisitor {
            type Value = Size;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string \"WIDTH*HEIGHT\" (e.g. \"832*480\")")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Size, E> {
                v.parse().map_err(E::custom)
            }
        }
        d.deserialize_str(SizeVisitor)
    }
}

impl PartialSchema for Size {
    fn schema() -> RefOr<Schema> {
        describe(
            ObjectBuilder::new()
                .schema_type(Type::String)
                .pattern(Some(r"^[0-9]+[*x][0-9]+$"))
                .max_length(Some(MAX_SIZE_BYTES))
                .examples(["832*480", "960*544"]),
            "WaveSpeed's frame size, \"WIDTH*HEIGHT\" in pixels (\"WIDTHxHEIGHT\" too): the rules \
             of width and height (multiples of 16 up to 4096). Given with a width or height that \
             differs, a 400 naming both.",
        )
    }
}

impl ToSchema for Size {}

/// WaveSpeed's `loras`: `[{"path": "...", "scale": 1.0}]`, the adapters applied in order
/// (`scale` 1 when absent). Their count, scales and paths are checked at submit
/// (`GenerationParams::check` and the server's LoRA rules), so the 400 names `loras`; the echo
/// writes every scale, as the task runs with it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Loras(pub Vec<params::LoraSpec>);

impl PartialSchema for Loras {
    fn schema() -> RefOr<Schema> {
        let scale = params::LORA_SCALE;
        let lora = ObjectBuilder::new()
            .property(
                "path",
                ObjectBuilder::new()
                    .schema_type(Type::String)
                    .min_length(Some(1))
                    .max_length(Some(params::MAX_LORA_PATH_BYTES))
                    .description(Some(
                        "A file name in the server's --lora-dir (\".safetensors\" appended \
                         unless given; no slashes), an http(s) URL (downloaded once and kept, \
                         at most --max-lora-mb; refused with --no-lora-urls) or a Hugging Face \
                         hub file OWNER/REPO/FILE.safetensors.",
                    ))
                    .examples(["anime-style", "https://example.com/lora.safetensors"]),
            )
            .required("path")
            .property(
                "scale",
                ObjectBuilder::new()
                    .schema_type(Type::Number)
                    .minimum(Some(scale.min))
                    .maximum(Some(scale.max))
                    .default(Some(1.0.into()))
                    .description(Some(
                        "The adapter's weight (diffusers' set_adapters weight): its delta is \
                         scale x alpha / rank x B(A x).",
                    )),
            )
            .additional_properties(Some(
                utoipa::openapi::schema::AdditionalProperties::FreeForm(false),
            ));
        utoipa::openapi::schema::ArrayBuilder::new()
            .items(lora)
            .description(Some(format!(
                "LoRA adapters applied to the transformer at forward time, in order; at most \
                 the server's --max-loras ({} unless set; 0 refuses them). [] or absent: none.",
                params::MAX_LORAS
            )))
            .into()
    }
}

impl ToSchema for Loras {}

/// RIFLEx's intrinsic-frequency index (thu-ml/RIFLEx): 0 (off) or the 1-based temporal RoPE
/// frequency lowered to 0.9 x 2 pi / latent frames; at most the model's temporal frequencies
/// (checked at submit against the model).
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
#[serde(transparent)]
pub struct RiflexFreqIndex(pub usize);

/// What the field's type takes; the model's own limit is checked at submit.
const RIFLEX_FREQ_INDEX: IntRange = IntRange {
    min: 0,
    max: i32::MAX as i64,
};

impl<'de> Deserialize<'de> for RiflexFreqIndex {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // the visitor checked the range, so the value fits
        d.deserialize_any(IntVisitor(RIFLEX_FREQ_INDEX))
            .map(|v| Self(v as usize))
    }
}

impl PartialSchema for RiflexFreqIndex {
    fn schema() -> RefOr<Schema> {
        describe(
            ObjectBuilder::new()
                .schema_type(Type::Integer)
                .minimum(Some(0))
                .maximum(Some(params::HUNYUAN_TEMPORAL_ROPE_FREQUENCIES))
                .default(Some(0.into())),
            &format!(
                "RIFLEx (thu-ml/RIFLEx) for clips longer than the model was trained on (129 \
                 frames): the 1-based index of the temporal RoPE frequency lowered to \
                 0.9 x 2 pi / latent frames, so the motion does not loop back. 0: off. At most \
                 the model's temporal frequencies (HunyuanVideo: {}); {} is RIFLEx's choice for \
                 HunyuanVideo.",
                params::HUNYUAN_TEMPORAL_ROPE_FREQUENCIES,
                params::RIFLEX_HUNYUAN_K
            ),
        )
    }
}

impl ToSchema for RiflexFreqIndex {}

/// Step caching for one task (our extension): `none`, `first-block:T`, `teacache:T` or
/// `magcache[:T[,max_skip=K][,retention=R]]`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Cache(pub params::CacheSpec);

impl Serialize for Cache {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for Cache {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct CacheVisitor;
        impl Visitor<'_> for CacheVisitor {
            type Value = Cache;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                write!(f, "a string: {}", params::CACHE_FORMS)
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Cache, E> {
                v.parse().map(Cache).map_err(E::custom)
            }
        }
        d.deserialize_str(CacheVisitor)
    }
}

impl PartialSchema for Cache {
    fn schema() -> RefOr<Schema> {
        describe(
            ObjectBuilder::new()
                .schema_type(Type::String)
                .pattern(Some(concat!(
                    r"^(none|(first-block|teacache):[0-9]*\.?[0-9]+([eE][-+]?[0-9]+)?",
                    r"|magcache(:[0-9]*\.?[0-9]+([eE][-+]?[0-9]+)?",
                    r"(,max_skip=[0-9]+|,retention=[0-9]*\.?[0-9]+([eE][-+]?[0-9]+)?)*)?",
                    r"|taylorseer(:(interval|order|warmup|stop)=[0-9]+",
                    r"(,(interval|order|warmup|stop)=[0-9]+)*)?)$",
                )))
                .examples([
                    "first-block:0.05",
                    "teacache:0.1",
                    "magcache:0.06",
                    "taylorseer:interval=3,order=2",
                ]),
            "Step caching across denoising steps (an extension of this server): `none`, \
             `first-block:T` (diffusers' FirstBlockCacheConfig(threshold=T): reuse the rest of \
             the transformer while the first block's residual changes by less than T, e.g. 0.05), \
             `teacache:T` (TeaCache4HunyuanVideo with rel_l1_thresh T, e.g. 0.1) or \
             `magcache[:T[,max_skip=K][,retention=R]]` (diffusers' MagCacheConfig with the \
             server's magnitude ratios, its --cache-ratios: skip while their accumulated error \
             stays at most T, at most K steps in a row, never in the first R of the steps; \
             defaults 0.06, 3, 0.2; K from 1 to 100, R from 0 to 1; a task asking for it on a \
             server without ratios fails, saying so) or \
             `taylorseer[:interval=I][,order=O][,warmup=W][,stop=S]` (diffusers' \
             TaylorSeerCacheConfig: every attention runs on the first W steps, then one step in \
             I and every step from S on, and is forecast by a Taylor series of order O on the \
             others; defaults 5, 1, 3, no stop; I from 1 to 100, O from 0 to 4, W and S from 1 \
             to 100); T above 0 and at most 10. Faster at some quality cost. Default: the server's --cache (none unless set).",
        )
    }
}

impl ToSchema for Cache {}

/// Landscape or portrait output.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub enum AspectRatio {
    #[serde(rename = "16:9")]
    Landscape,
    #[serde(rename = "9:16")]
    Portrait,
}
