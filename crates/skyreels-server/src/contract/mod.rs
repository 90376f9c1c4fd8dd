//! The API contract as types: what a submit may carry (each field's rule lives in its type, in
//! [`fields`], so validation, the 400 messages and the OpenAPI schema come from one place), the
//! prediction object, the envelope and the other response bodies. Defaults and limits come from
//! `skyreels-params`, which `skyreels generate` uses too.

mod fields;
mod queue;

pub use fields::*;
pub use queue::{CancelAfter, CANCEL_AFTER_HEADER, CANCEL_AFTER_RULE};

use crate::engine::task::Status;
use crate::engine::Priority;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use utoipa::ToSchema;

/// Longest image or webhook URL accepted (data: URIs are bounded by the body limit instead).
pub const MAX_URL_BYTES: usize = 4096;
/// Longest upload file name and content type accepted.
pub const MAX_FILENAME_BYTES: usize = 255;
pub const MAX_CONTENT_TYPE_BYTES: usize = 127;

/// The body of `POST /api/v3/{owner}/{model}`; unknown fields are ignored and never stored. The
/// fields of WaveSpeed's other video models (wan-2.1, hunyuan-video; the MCP server's
/// generate_video) are accepted with their meaning: size, duration, flow_shift, seed,
/// negative_prompt, guidance_scale, num_inference_steps, loras and enable_safety_checker.
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
    pub cfg_gate: Option<CfgGate>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(inline)]
    pub flow_shift: Option<FlowShift>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(inline)]
    pub loras: Option<Loras>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(inline)]
    pub riflex_freq_index: Option<RiflexFreqIndex>,
    /// Run the safety checker on the video (default true) where the server loaded one
    /// (`--safety-checker`; `/api/v3/models` says whether it did); without one it is ignored and
    /// has_nsfw_contents stay false.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(inline)]
    pub enable_safety_checker: Option<Flag>,
    /// "normal" (the default) or "low" (fal's queue priority): a low task starts only while no
    /// normal task waits for its model, and every waiting normal task is ahead of it in
    /// `queue_position`.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(inline)]
    pub priority: Option<Priority>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(inline)]
    pub cancel_after: Option<CancelAfter>,
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
    /// failed, 5000 internal, 5003 unavailable, 5004 timeout, 5005 deadline passed
    /// (`cancel_after`: failed if it had not started, cancelled if it was running).
    pub code: u32,
    /// Milliseconds between start and end.
    #[serde(rename = "executionTime")]
    pub execution_time: u64,
    /// Milliseconds per stage, and their sum as `inference`; with them two counts (not
    /// milliseconds): `forwards_computed` and `forwards_cached`, the transformer forwards whose
    /// blocks ran and those served from the step cache (`cache`) or skipped by the CFG gate
    /// (`cfg_gate`).
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
    /// The safety checker the workers of this model loaded (`--safety-checker`); null: none is
    /// loaded, `enable_safety_checker` is ignored and has_nsfw_contents stay false.
    pub safety_checker: Option<String>,
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
    use utoipa::PartialSchema;

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
        assert_eq!(r.loras, Some(Loras(vec![])));
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
                json!({"loras": [{"path": "a", "weight": 1}]}),
                "loras[0].weight: unknown field `weight`, expected `path` or `scale`",
            ),
            (
                json!({"loras": [{"scale": 1}]}),
                "loras[0]: missing field `path`",
            ),
            (
                json!({"riflex_freq_index": -1}),
                "riflex_freq_index: must be an integer from 0 to 2147483647, got -1",
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
    fn loras_echo_with_their_scales() {
        let r = parse(
            json!({"loras": [{"path": "a"}, {"path": "b", "scale": -0.5}],
            "riflex_freq_index": 4}),
        )
        .unwrap();
        assert_eq!(r.riflex_freq_index, Some(RiflexFreqIndex(4)));
        assert_eq!(
            serde_json::to_value(r.echo()).unwrap(),
            json!({"loras": [{"path": "a", "scale": 1.0}, {"path": "b", "scale": -0.5}],
                "riflex_freq_index": 4})
        );
    }

    #[test]
    fn queue_fields_parse_and_echo_as_written() {
        let r = parse(json!({"priority": "low", "cancel_after": "1h30m"})).unwrap();
        assert_eq!(r.priority, Some(Priority::Low));
        let secs = r.cancel_after.as_ref().map(|c| c.duration().as_secs());
        assert_eq!(secs, Some(5400));
        assert_eq!(
            serde_json::to_value(r.echo()).unwrap(),
            json!({"priority": "low", "cancel_after": "1h30m"})
        );
        for (body, want) in [
            (
                json!({"priority": "high"}),
                "priority: unknown variant `high`, expected `normal` or `low`".to_string(),
            ),
            (
                json!({"cancel_after": "0s"}),
                format!("cancel_after: {CANCEL_AFTER_RULE}, got \"0s\""),
            ),
            (
                json!({"cancel_after": "25h"}),
                format!("cancel_after: {CANCEL_AFTER_RULE}, got \"25h\""),
            ),
        ] {
            assert_eq!(parse(body.clone()).unwrap_err(), want, "{body}");
        }
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
            "--max-loras",
            "\"riflex_freq_index\"",
            "\"enable_safety_checker\"",
            // CFG gating: an open interval
            "\"cfg_gate\"",
            "\"exclusiveMaximum\":1",
            // the queue fields
            "\"priority\"",
            "\"low\"",
            "\"cancel_after\"",
            "1h30m",
        ] {
            assert!(text.contains(want), "{want} missing in {text}");
        }
        assert_eq!(s["required"], json!(["prompt"]));
    }
}
