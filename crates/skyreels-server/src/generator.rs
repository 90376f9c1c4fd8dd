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
