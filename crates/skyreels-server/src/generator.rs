//! The contract between the server and whatever makes videos: the CLI backs it with the real
//! pipeline, tests with a fake. The server never sees tensors.

use image::RgbImage;
use std::path::Path;
use std::time::Duration;

/// One model the server exposes at `/api/v3/{id}`.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ModelInfo {
    /// `owner/name`, e.g. `wavespeed-ai/SkyReels-V1`.
    pub id: String,
    /// Image-to-video (needs `image`) or text-to-video.
    pub image_to_video: bool,
    /// What a request that names no size, frames or steps gets (the size turned for a
    /// portrait image).
    pub defaults: skyreels_params::GenerationDefaults,
    /// Height and width must be multiples of this.
    pub size_multiple: usize,
    /// Largest clip the worker's memory takes, in pixel-frames (width x height x frames; its
    /// `--max-pixel-frames`); larger submits get a 400 that names it.
    #[serde(default = "fallback_max_pixel_frames")]
    pub max_pixel_frames: u64,
    /// The worker's Ulysses layout (`--parallel ulysses=N`), whose token split a request must
    /// fit; `None`: one device per branch.
    #[serde(default)]
    pub ulysses: Option<skyreels_params::Ulysses>,
}

fn fallback_max_pixel_frames() -> u64 {
    skyreels_params::FALLBACK_MAX_PIXEL_FRAMES
}

/// A validated job, ready for the device.
#[derive(Clone, Debug)]
pub struct GenerationRequest {
    pub model: String,
    pub prompt: String,
    /// `None`: the model's default negative prompt.
    pub negative_prompt: Option<String>,
    pub image: Option<RgbImage>,
    pub height: usize,
    pub width: usize,
    pub num_frames: usize,
    pub steps: usize,
    pub guidance_scale: f64,
    pub embedded_guidance_scale: f64,
    pub seed: u64,
    pub fps: f64,
    pub cache: skyreels_params::CacheSpec,
    /// The flow-matching shift; None: the model's scheduler config.
    pub flow_shift: Option<f64>,
}

impl GenerationRequest {
    /// The rules a submit is checked against, again, on the request as a worker reads it from
    /// the queue (Redis mode: whoever can write to Redis can queue a task, so a worker trusts
    /// nothing it did not check itself). `max_work` is the worker's own `--max-work`.
    pub fn check(&self, model: &ModelInfo, max_work: f64) -> Result<(), String> {
        use skyreels_params as p;
        let field = |name: &str, rule: String| format!("{name}: {rule}");
        if self.model != model.id {
            return Err(format!("model: {} is not served here", self.model));
        }
        if self.prompt.trim().is_empty() {
            return Err("prompt: is required".into());
        }
        for (name, text) in [
            ("prompt", Some(&self.prompt)),
            ("negative_prompt", self.negative_prompt.as_ref()),
        ] {
            if text.is_some_and(|t| t.len() > p::MAX_PROMPT_BYTES) {
                return Err(field(
                    name,
                    format!("is longer than {} bytes", p::MAX_PROMPT_BYTES),
                ));
            }
        }
        p::check_side(self.height, model.size_multiple).map_err(|r| field("height", r))?;
        p::check_side(self.width, model.size_multiple).map_err(|r| field("width", r))?;
        p::check_frames(self.num_frames).map_err(|r| field("num_frames", r))?;
        match (&self.image, model.image_to_video) {
            (None, true) => return Err("image: is required".into()),
            (Some(_), false) => return Err("image: a text-to-video model takes none".into()),
            (Some(i), true) if i.dimensions() != (self.width as u32, self.height as u32) => {
                return Err("image: not fitted to the task's size".into())
            }
            _ => {}
        }
        if !p::STEPS.contains(self.steps as i64) {
            return Err(field("num_inference_steps", p::STEPS.rule()));
        }
        for (name, v, range) in [
            ("guidance_scale", self.guidance_scale, p::GUIDANCE),
            (
                "embedded_guidance_scale",
                self.embedded_guidance_scale,
                p::EMBEDDED_GUIDANCE,
            ),
            ("fps", self.fps, p::FPS_RANGE),
        ] {
            if !range.contains(v) {
                return Err(field(name, range.rule()));
            }
        }
        if self.flow_shift.is_some_and(|s| !p::FLOW_SHIFT.contains(s)) {
            return Err(field("flow_shift", p::FLOW_SHIFT.rule()));
        }
        if self.seed > p::SEED.max as u64 {
            return Err(field("seed", p::SEED.rule()));
        }
        let work = p::work_millions(self.height, self.width, self.num_frames, self.steps);
        if work > max_work {
            return Err(format!(
                "the task is too large: {work:.0} million (width x height x frames x steps); \
                 this worker's limit (--max-work) is {max_work:.0} million"
            ));
        }
        let (h, w) = (self.height, self.width);
        p::check_encodable(h, w).map_err(|(name, rule)| field(name, rule))?;
        p::check_pixel_frames(h, w, self.num_frames, model.max_pixel_frames)
            .map_err(|r| field("num_frames", r))?;
        if let Some(u) = &model.ulysses {
            u.check(h, w, self.num_frames, self.cache)
                .map_err(|(name, rule)| field(name, rule))?;
        }
        Ok(())
    }
}

/// Why a generation did not produce a video.
#[derive(Debug, thiserror::Error)]
pub enum GenerateFailure {
    /// The progress callback asked to stop.
    #[error("cancelled")]
    Cancelled,
    /// The request is not valid for this model (task code 1401).
    #[error("{0}")]
    InvalidInput(String),
    /// Anything else (task code 1403).
    #[error("{0}")]
    Failed(String),
}

/// Named stage durations of one generation (text encoding, denoising, decoding, export...).
pub type StageTimings = Vec<(&'static str, Duration)>;

/// What a finished generation reports besides its video.
#[derive(Debug, Clone, Default)]
pub struct Generated {
    pub stages: StageTimings,
    /// Named counts, shown next to the stage times in the prediction's `timings`
    /// (`forwards_computed`, `forwards_cached`).
    pub counts: Vec<(&'static str, u64)>,
}

/// Makes videos on one device. Runs on the worker thread only.
pub trait Generator: Send {
    /// The models served; asked once after loading.
    fn models(&self) -> Vec<ModelInfo>;

    /// Generates `req` into an MP4 at `output`. `progress(done, total)` is called after each
    /// denoising step, and again with the last step's numbers between the later stages (VAE
    /// tiles, before the export) to ask whether to go on; returning `false` cancels.
    fn generate(
        &mut self,
        req: &GenerationRequest,
        output: &Path,
        progress: &mut dyn FnMut(usize, usize) -> bool,
    ) -> Result<Generated, GenerateFailure>;
}

/// Builds the generator on the worker thread (loading weights can take minutes; the server
/// answers `/health` and a 503 `/ready` meanwhile).
pub type GeneratorLoader = Box<dyn FnOnce() -> Result<Box<dyn Generator>, String> + Send>;
