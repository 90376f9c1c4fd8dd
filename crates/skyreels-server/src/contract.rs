//! The API contract as types: what a submit may carry (each field's rule lives in its type, so
//! validation, the 400 messages and the OpenAPI schema come from one place), the prediction
//! object, the envelope and the other response bodies. Defaults and limits come from
//! `skyreels-params`, which `skyreels generate` uses too.

use crate::engine::task::Status;
use serde::de::{self, Deserializer, Visitor};
use serde::ser::SerializeSeq;
use serde::{Deserialize, Serialize};
use skyreels_params::{self as params, FloatRange, IntRange};
use std::collections::BTreeMap;
use std::fmt;
use utoipa::openapi::schema::{ObjectBuilder, Schema, Type};
use utoipa::openapi::RefOr;
use utoipa::{PartialSchema, ToSchema};

/// Longest image or webhook URL accepted (data: URIs are bounded by the body limit instead).
pub const MAX_URL_BYTES: usize = 4096;
/// Longest upload file name and content type accepted.
pub const MAX_FILENAME_BYTES: usize = 255;
pub const MAX_CONTENT_TYPE_BYTES: usize = 127;

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
                    .maximum(Some(r.max))
                    .default(default.map(Into::into));
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

/// WaveSpeed's `loras` (`[{"path", "scale"}]`): only the empty list (no LoRA) is accepted for
/// now; any LoRA is refused, never ignored.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct NoLoras;

impl Serialize for NoLoras {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_seq(Some(0))?.end()
    }
}

impl<'de> Deserialize<'de> for NoLoras {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = NoLoras;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a list (empty: LoRAs are not supported yet)")
            }
            fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<NoLoras, A::Error> {
                match seq.next_element::<de::IgnoredAny>()? {
                    None => Ok(NoLoras),
                    Some(_) => Err(de::Error::custom(
                        "LoRAs are not supported yet: send an empty list or leave loras out",
                    )),
                }
            }
        }
        d.deserialize_seq(V)
    }
}

impl PartialSchema for NoLoras {
    fn schema() -> RefOr<Schema> {
        let lora = ObjectBuilder::new()
            .property("path", ObjectBuilder::new().schema_type(Type::String))
            .property("scale", ObjectBuilder::new().schema_type(Type::Number));
        utoipa::openapi::schema::ArrayBuilder::new()
            .items(lora)
            .max_items(Some(0))
            .description(Some(
                "WaveSpeed's LoRA list, [{\"path\", \"scale\"}]. Only [] (no LoRA) is accepted: \
                 LoRAs are not supported yet, and a non-empty list is a 400 (never ignored).",
            ))
            .into()
    }
}

impl ToSchema for NoLoras {}

/// Step caching for one task (our extension): `none`, `first-block:T` or `teacache:T`.
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
                .pattern(Some(
                    r"^(none|(first-block|teacache):[0-9]*\.?[0-9]+([eE][-+]?[0-9]+)?)$",
                ))
                .examples(["first-block:0.05", "teacache:0.1"]),
            "Step caching across denoising steps (an extension of this server): `none`, \
             `first-block:T` (diffusers' FirstBlockCacheConfig(threshold=T): reuse the rest of \
             the transformer while the first block's residual changes by less than T, e.g. 0.05) \
             or `teacache:T` (TeaCache4HunyuanVideo with rel_l1_thresh T, e.g. 0.1); T above 0 \
             and at most 10. Faster at some quality cost. Default: the server's --cache (none \
             unless set).",
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

/// The body of `POST /api/v3/{owner}/{model}`; unknown fields are ignored and never stored. The
/// fields of WaveSpeed's other video models (wan-2.1, hunyuan-video; the MCP server's
/// generate_video) are accepted with their meaning: size, duration, flow_shift, seed,
/// negative_prompt, guidance_scale, num_inference_steps, loras as [] and enable_safety_checker;
/// refused with a 400: a non-empty loras (LoRAs are not supported yet).
// Every field is optional at the parsing level (a missing Option is None), so that a missing
// required one (`prompt`, `image` for image-to-video) gets the same kind of message as a bad one.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct SubmitRequest {
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(inline, required = true)]
    pub prompt: Option<Prompt>,
    /// First frame: http(s) URL, data:image/...;base64 URI, or an upload's download_url.
    /// Required for image-to-video models.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(inline)]
    pub negative_prompt: Option<NegativePrompt>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(inline)]
    pub seed: Option<Seed>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(inline)]
    pub guidance_scale: Option<GuidanceScale>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(inline)]
    pub embedded_guidance_scale: Option<EmbeddedGuidanceScale>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(inline)]
    pub num_inference_steps: Option<Steps>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(inline)]
    pub num_frames: Option<NumFrames>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(inline)]
    pub duration: Option<Duration>,
    /// "16:9" (960x544) or "9:16" (544x960). Default: the image's orientation.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub aspect_ratio: Option<AspectRatio>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(inline)]
    pub width: Option<Side>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(inline)]
    pub height: Option<Side>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(inline)]
    pub size: Option<Size>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(inline)]
    pub fps: Option<Fps>,
    /// Hold the request until the task ends (up to the server's sync limit).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(inline)]
    pub enable_sync_mode: Option<Flag>,
    /// Outputs as data:video/mp4;base64 URIs instead of URLs.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(inline)]
    pub enable_base64_output: Option<Flag>,
    /// Where to POST the finished prediction (same as the `?webhook=` query).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub webhook_url: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(inline)]
    pub cache: Option<Cache>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(inline)]
    pub flow_shift: Option<FlowShift>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(inline)]
    pub loras: Option<NoLoras>,
    /// Accepted as WaveSpeed clients send it (true or false); no safety checker runs yet
    /// (has_nsfw_contents is always false).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(inline)]
    pub enable_safety_checker: Option<Flag>,
}

impl SubmitRequest {
    /// What a prediction echoes as `input`: the known fields, a long data: URI shortened.
    pub fn echo(&self) -> SubmitRequest {
        let mut echo = self.clone();
        if let Some(s) = echo.image.as_mut() {
            if s.starts_with("data:") && s.len() > 128 {
                let head: String = s.chars().take(48).collect();
                *s = format!("{head}...({} characters)", s.len());
            }
        }
        echo
    }
}

/// `{"code", "message", "data"}`; the HTTP status equals `code`.
#[derive(Serialize, ToSchema)]
pub struct Envelope<T> {
    pub code: u16,
    pub message: String,
    pub data: T,
}

/// An error answered before a task exists: `data` is always null.
#[derive(Serialize, ToSchema)]
pub struct ErrorEnvelope {
    pub code: u16,
    /// Names the field and the rule for a 400.
    pub message: String,
    #[schema(value_type = Option<Object>)]
    pub data: Option<()>,
}

#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct PredictionUrls {
    /// The absolute URL of the result route.
    pub get: String,
}

#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct Progress {
    /// Denoising steps done.
    pub step: usize,
    pub total: usize,
}

/// The prediction object (`data` of submits and results, the body of webhooks).
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct Prediction {
    /// 32 lowercase hex digits.
    pub id: String,
    pub model: String,
    /// Video URLs (or data: URIs with base64 output); empty until completed.
    pub outputs: Vec<String>,
    pub urls: PredictionUrls,
    /// One per output; no NSFW classifier runs, so always false.
    pub has_nsfw_contents: Vec<bool>,
    pub status: Status,
    /// RFC 3339 UTC with milliseconds.
    pub created_at: String,
    pub started_at: Option<String>,
    pub completed_at: Option<String>,
    /// "" when none.
    pub error: String,
    /// Task code: 0 ok, 1400/1401 bad parameter, 1402 media access failed, 1403 execution
    /// failed, 5000 internal, 5003 unavailable, 5004 timeout.
    pub code: u32,
    /// Milliseconds between start and end.
    #[serde(rename = "executionTime")]
    pub execution_time: u64,
    /// Milliseconds per stage, and their sum as `inference`; with them two counts (not
    /// milliseconds): `forwards_computed` and `forwards_cached`, the transformer forwards whose
    /// blocks ran and those served from the step cache (`cache`).
    pub timings: BTreeMap<String, u64>,
    /// The request's known fields as received (a long data: URI shortened).
    pub input: SubmitRequest,
    /// Frames of the video: `num_frames`, or what `duration` x `fps` made (null for tasks
    /// recorded by older versions).
    pub num_frames: Option<usize>,
    pub progress: Progress,
    /// Tasks ahead of this one while it waits; null otherwise.
    pub queue_position: Option<usize>,
    pub seed: u64,
}

/// The answer of `DELETE` on a finished task.
#[derive(Serialize, ToSchema)]
pub struct Deleted {
    pub id: String,
    /// "deleted"
    pub status: Status,
}

/// `POST /api/v3/media/uploads`: open a PUT ticket.
#[derive(Debug, Default, Deserialize, ToSchema)]
pub struct UploadTicketRequest {
    #[schema(required = true)]
    pub filename: Option<String>,
    /// Bytes the PUT will carry.
    #[schema(required = true)]
    pub size: Option<u64>,
    /// One of image/png, image/jpeg, image/webp, image/gif, image/bmp (the bytes are sniffed
    /// anyway).
    pub content_type: Option<String>,
}

#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct UploadHeaders {
    #[serde(rename = "Content-Type")]
    pub content_type: String,
}

#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct UploadTarget {
    /// "PUT"
    pub method: String,
    /// Send the bytes here, without Authorization: the URL is the secret (single use).
    pub url: String,
    pub headers: UploadHeaders,
}

/// An upload: `type` is "image" for accepted files.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct UploadData {
    #[serde(rename = "type")]
    pub kind: String,
    /// Use it as `image` in a submit (read locally, not over HTTP).
    pub download_url: String,
    pub filename: String,
    pub size: u64,
    /// Only for tickets: where to PUT the bytes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upload: Option<UploadTarget>,
}

/// One entry of `GET /api/v3/models`.
#[derive(Serialize, ToSchema)]
pub struct ModelEntry {
    pub model_id: String,
    pub name: String,
    /// "image-to-video" or "text-to-video"
    #[serde(rename = "type")]
    pub kind: String,
    pub description: String,
    pub api_schema: ApiSchema,
}

#[derive(Serialize, ToSchema)]
pub struct ApiSchema {
    /// JSON schema of the submit body with this model's defaults.
    #[schema(value_type = Object)]
    pub input: serde_json::Value,
}

#[derive(Serialize, ToSchema)]
pub struct WebhookSecret {
    /// "whsec_..."; the HMAC key is the text after the prefix, as UTF-8 bytes.
    pub secret: String,
}

#[derive(Serialize, ToSchema)]
pub struct StatusText {
    /// "ok" (health) or "ready".
    pub status: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(v: serde_json::Value) -> Result<SubmitRequest, String> {
        serde_path_to_error::deserialize(v).map_err(|e| format!("{}: {}", e.path(), e.inner()))
    }

    #[test]
    fn fields_carry_their_rules() {
        let r = parse(json!({"prompt": "p", "seed": 7, "num_frames": 9.0, "fps": 12, "x": [1]}))
            .unwrap();
        assert_eq!(r.seed, Some(Seed(7)));
        assert_eq!(r.num_frames, Some(NumFrames(9)));
        assert_eq!(r.fps, Some(Fps(12.0)));
        let null = parse(json!({"seed": null})).unwrap();
        assert_eq!(null.seed, None);
        for (body, want) in [
            (
                json!({"seed": -2}),
                "seed: must be an integer from -1 to 2147483647, got -2",
            ),
            (
                json!({"seed": "1"}),
                "seed: invalid type: string \"1\", expected an integer from -1 to 2147483647",
            ),
            (
                json!({"seed": 1.5}),
                "seed: must be an integer from -1 to 2147483647, got 1.5",
            ),
            (
                json!({"num_inference_steps": 101}),
                "num_inference_steps: must be an integer from 1 to 100, got 101",
            ),
            (
                json!({"guidance_scale": -1}),
                "guidance_scale: must be a number from 0 to 30, got -1",
            ),
            (
                json!({"enable_sync_mode": "yes"}),
                "enable_sync_mode: invalid type: string \"yes\", expected true or false",
            ),
            (
                json!({"prompt": 3}),
                "prompt: invalid type: integer `3`, expected a string of at most 8192 bytes",
            ),
            (
                json!({"prompt": "x".repeat(8193)}),
                "prompt: must be a string of at most 8192 bytes, got 8193",
            ),
            (
                json!({"aspect_ratio": "4:3"}),
                "aspect_ratio: unknown variant `4:3`, expected `16:9` or `9:16`",
            ),
        ] {
            assert_eq!(parse(body.clone()).unwrap_err(), want, "{body}");
        }
    }

    #[test]
    fn the_echo_keeps_known_fields_and_shortens_data_uris() {
        let r = parse(json!({"prompt": "p", "image": format!("data:image/png;base64,{}", "A".repeat(500)), "junk": "x".repeat(1000)})).unwrap();
        let echo = serde_json::to_value(r.echo()).unwrap();
        assert_eq!(echo["prompt"], "p");
        assert!(echo["image"]
            .as_str()
            .unwrap()
            .ends_with("...(522 characters)"));
        assert_eq!(echo.as_object().unwrap().len(), 2, "{echo}");
    }

    #[test]
    fn wavespeed_video_fields_parse_and_echo_as_written() {
        let body = json!({"size": "832*480", "duration": 5, "flow_shift": 3, "loras": [],
            "enable_safety_checker": true});
        let r = parse(body).unwrap();
        let size = r.size.as_ref().unwrap();
        assert_eq!((size.width, size.height), (832, 480));
        assert_eq!(r.duration, Some(Duration(5.0)));
        assert_eq!(r.flow_shift, Some(FlowShift(3.0)));
        assert_eq!(r.loras, Some(NoLoras));
        assert_eq!(r.enable_safety_checker, Some(Flag(true)));
        assert_eq!(
            serde_json::to_value(r.echo()).unwrap(),
            json!({"size": "832*480", "duration": 5.0, "flow_shift": 3.0, "loras": [],
                "enable_safety_checker": true})
        );
        let x = parse(json!({"size": "960x544"})).unwrap();
        assert_eq!(
            x.size.as_ref().map(|s| (s.width, s.height)),
            Some((960, 544))
        );
        assert_eq!(serde_json::to_value(x.echo()).unwrap()["size"], "960x544");
        for (body, want) in [
            (
                json!({"size": "832 * 480"}),
                "size: must be \"WIDTH*HEIGHT\" in pixels (e.g. \"832*480\"), got \"832 * 480\"",
            ),
            (
                json!({"size": format!("{}96*64", "0".repeat(40))}),
                "size: must be \"WIDTH*HEIGHT\" in pixels (e.g. \"832*480\"), at most 32 bytes",
            ),
            (
                json!({"duration": 1e6}),
                "duration: must be a number above 0 and at most 257, got 1000000",
            ),
            (
                json!({"loras": [[]]}),
                "loras: LoRAs are not supported yet: send an empty list or leave loras out",
            ),
        ] {
            assert_eq!(parse(body.clone()).unwrap_err(), want, "{body}");
        }
        // any positive shift is within the rule
        assert_eq!(
            parse(json!({"flow_shift": 1e-9})).unwrap().flow_shift,
            Some(FlowShift(1e-9))
        );
    }

    #[test]
    fn the_schema_states_the_limits() {
        let s = serde_json::to_value(SubmitRequest::schema()).unwrap();
        let text = s.to_string();
        for want in [
            "\"maximum\":100",
            "\"maximum\":257",
            "\"maxLength\":8192",
            "\"maximum\":2147483647",
            "16:9",
            // WaveSpeed's video fields, with their rules
            "\"size\"",
            "832*480",
            "\"duration\"",
            "\"flow_shift\"",
            "\"exclusiveMinimum\":0",
            "\"maximum\":20",
            "\"loras\"",
            "\"maxItems\":0",
            "\"enable_safety_checker\"",
        ] {
            assert!(text.contains(want), "{want} missing in {text}");
        }
        assert_eq!(s["required"], json!(["prompt"]));
    }
}
