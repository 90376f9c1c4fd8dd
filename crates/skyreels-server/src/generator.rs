//! The contract between the server and whatever makes videos: the CLI backs it with the real
//! pipeline, tests with a fake. The server never sees tensors.

use image::RgbImage;
use std::path::{Path, PathBuf};
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
    /// Frequencies of the transformer's temporal RoPE axis: the largest `riflex_freq_index`.
    #[serde(default = "hunyuan_temporal_rope_frequencies")]
    pub temporal_rope_frequencies: usize,
    /// The safety checker the worker loaded (`--safety-checker`, as given); `None`: no checker
    /// runs and `has_nsfw_contents` stays false.
    #[serde(default)]
    pub safety_checker: Option<String>,
}

fn hunyuan_temporal_rope_frequencies() -> usize {
    skyreels_params::HUNYUAN_TEMPORAL_ROPE_FREQUENCIES
}

fn fallback_max_pixel_frames() -> u64 {
    skyreels_params::FALLBACK_MAX_PIXEL_FRAMES
}

impl ModelInfo {
    /// The limits a request for this model must fit on a worker whose `--max-work` is
    /// `max_work` and whose `--max-loras` is `max_loras`.
    pub fn limits(&self, max_work: f64, max_loras: usize) -> skyreels_params::Limits {
        skyreels_params::Limits {
            size_multiple: self.size_multiple,
            max_pixel_frames: self.max_pixel_frames,
            ulysses: self.ulysses,
            max_work,
            max_loras,
            temporal_rope_frequencies: self.temporal_rope_frequencies,
        }
    }
}

/// A validated task, ready for the device: its parameters, for image-to-video the image
/// fitted to its size, and the files of its LoRAs.
#[derive(Clone, Debug)]
pub struct Input {
    pub params: skyreels_params::GenerationParams,
    pub image: Option<RgbImage>,
    /// Where the adapter of each of `params.loras` is, in the same order. The queue holds the
    /// request's specs only; the worker that takes the task resolves them on its own disk (a
    /// `--lora-dir` file, a URL's download) and fills this in before the generator sees the
    /// input.
    pub loras: Vec<LoraSource>,
    /// Run the safety checker on the video (the task's `enable_safety_checker`); ignored by a
    /// generator without one.
    pub safety_check: bool,
}

/// Where a LoRA's `.safetensors` file is, as the worker resolved a request's `path`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LoraSource {
    /// A file on this machine: in `--lora-dir`, or a URL's download in the server's cache.
    File(PathBuf),
    /// A file of a Hugging Face Hub repository (`REPO_ID/FILE.safetensors`), which the
    /// generator fetches into (or finds in) its hub cache.
    Hub {
        /// `owner/name`.
        repo: String,
        /// The file's path inside the repository.
        file: String,
    },
}

/// What the generator reports of one LoRA it applied, in the order of `Input::loras`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LoraOutcome {
    /// Keys of the file that matched no layer of the transformer (while others did).
    pub unmatched_keys: usize,
    /// The parsed adapter came from the generator's in-memory cache (`--lora-cache-mb`).
    pub cache_hit: bool,
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

/// What a finished generation reports besides its video.
#[derive(Debug, Clone, Default)]
pub struct Generated {
    /// Named stage durations (text encoding, denoising, decoding, export...).
    pub stages: Vec<(&'static str, Duration)>,
    /// Named counts, shown next to the stage times in the prediction's `timings`
    /// (`forwards_computed`, `forwards_cached`).
    pub counts: Vec<(&'static str, u64)>,
    /// One entry per LoRA of the input, in its order (empty without LoRAs).
    pub loras: Vec<LoraOutcome>,
    /// The safety checker flagged the video (any of the frames it looked at); `None`: it did not
    /// run (none loaded, or the task turned it off). Its time is the `safety_check` stage.
    pub nsfw: Option<bool>,
}

/// Makes videos on one device. Runs on the worker thread only.
pub trait Generator: Send {
    /// The models served; asked once after loading.
    fn models(&self) -> Vec<ModelInfo>;

    /// Generates `input` into an MP4 at `output`. `progress(done, total)` is called after each
    /// denoising step, and again with the last step's numbers between the later stages (VAE
    /// tiles, before the export) to ask whether to go on; returning `false` cancels.
    fn generate(
        &mut self,
        input: &Input,
        output: &Path,
        progress: &mut dyn FnMut(usize, usize) -> bool,
    ) -> Result<Generated, GenerateFailure>;
}

/// Builds the generator on the worker thread (loading weights can take minutes; the server
/// answers `/health` and a 503 `/ready` meanwhile).
pub type GeneratorLoader = Box<dyn FnOnce() -> Result<Box<dyn Generator>, String> + Send>;
