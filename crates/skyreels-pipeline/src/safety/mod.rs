//! The NSFW safety checker: diffusers' `StableDiffusionSafetyChecker` with `CLIPImageProcessor`'s
//! preprocessing, run on frames of a generated clip (docs/safety-checker.md).
//!
//! ```no_run
//! # use skyreels_pipeline::safety::SafetyChecker;
//! # use skyreels_pipeline::hub::HubOptions;
//! # fn f(video: &skyreels_pipeline::generate::Video) -> Result<(), Box<dyn std::error::Error>> {
//! let device = candle_core::Device::Cpu;
//! let checker = SafetyChecker::load(
//!     "CompVis/stable-diffusion-safety-checker",
//!     &HubOptions::default(),
//!     &device,
//!     candle_core::DType::F32,
//! )?;
//! let verdict = checker.check_video(&video.frames, 4)?;
//! if verdict.flagged { /* withhold the clip */ }
//! # Ok(()) }
//! ```

mod load;
pub mod preprocess;
mod resample;

pub use preprocess::{Preprocessor, PreprocessorConfig};

use crate::hub::{HubError, HubOptions};
use crate::loading::LoadError;
use candle_core::{DType, Device, Tensor};
use image::RgbImage;
use skyreels_models::safety_checker::ConceptScores;
use skyreels_models::StableDiffusionSafetyChecker;
use std::path::{Path, PathBuf};

/// Frames run through the model at once.
const BATCH: usize = 8;

/// Why a checker could not be loaded or run.
#[derive(Debug, thiserror::Error)]
pub enum SafetyError {
    #[error("safety checker {0}: not a folder, and not a hub repo id (owner/name)")]
    Source(String),
    #[error(
        "{0}: no config.json here or in safety_checker/ (a StableDiffusionSafetyChecker folder \
         or a Stable Diffusion pipeline folder)"
    )]
    NoConfig(PathBuf),
    #[error("{0}: no model.safetensors (or model.safetensors.index.json)")]
    NoWeights(PathBuf),
    #[error(
        "{0}: the weights are only in this pickle, which is not read; use model.safetensors \
         (the hub repos of the published checkers have one)"
    )]
    PickleOnly(PathBuf),
    /// A config or preprocessor config that cannot be read, parsed or used.
    #[error("{path}: {message}")]
    Config { path: PathBuf, message: String },
    /// The weights file: unreadable, missing tensors (by name), wrong shapes, unused tensors.
    #[error("{path}: {source}")]
    Weights {
        path: PathBuf,
        #[source]
        source: LoadError,
    },
    #[error(transparent)]
    Hub(#[from] HubError),
    /// Input the checker cannot take (no frames, n = 0, frames of the wrong shape).
    #[error("{0}")]
    Invalid(String),
    #[error("running the safety checker: {0}")]
    Model(#[from] candle_core::Error),
}

/// One frame's result: the reference's `has_nsfw_concept` and the scores behind it.
#[derive(Debug, Clone, PartialEq)]
pub struct FrameVerdict {
    /// Some concept score is > 0.
    pub nsfw: bool,
    /// Some special-care score is > 0 (every later score got +0.01).
    pub special_care: bool,
    /// Per concept (17): cosine distance − threshold (+0.01 after special care), rounded to 3
    /// decimals.
    pub concept_scores: Vec<f32>,
    /// Per special-care concept (3), likewise.
    pub special_scores: Vec<f32>,
}

impl From<ConceptScores> for FrameVerdict {
    fn from(s: ConceptScores) -> Self {
        Self {
            nsfw: s.nsfw,
            special_care: s.special_care,
            concept_scores: s.concept_scores,
            special_scores: s.special_scores,
        }
    }
}

/// A clip's result: flagged when any checked frame is.
#[derive(Debug, Clone, PartialEq)]
pub struct ClipVerdict {
    pub flagged: bool,
    /// The checked frames, in clip order: (index in the clip, verdict).
    pub frames: Vec<(usize, FrameVerdict)>,
}

/// The indices of `n` frames spread evenly over a clip of `count`: every frame when
/// `count <= n`; for n = 1 the middle one, `count / 2`; otherwise round(i · (count − 1) / (n − 1))
/// for i in 0..n (halves rounded up), so the first and the last frame are always checked.
/// Distinct and increasing: with count > n the spacing is more than 1.
pub fn spread_frames(count: usize, n: usize) -> Vec<usize> {
    if count <= n {
        return (0..count).collect();
    }
    if n == 1 {
        return vec![count / 2];
    }
    // round half up of i·(count−1)/(n−1) in integers
    (0..n)
        .map(|i| (2 * i * (count - 1) + (n - 1)) / (2 * (n - 1)))
        .collect()
}

/// A loaded checker: the model on its device and the preprocessing of its feature extractor.
/// Cloning shares the weights.
#[derive(Debug, Clone)]
pub struct SafetyChecker {
    model: StableDiffusionSafetyChecker,
    preprocessor: Preprocessor,
    device: Device,
    dtype: DType,
}

impl SafetyChecker {
    /// Loads a checker from `source`: a local `StableDiffusionSafetyChecker` folder, a Stable
    /// Diffusion pipeline folder (its `safety_checker/` and `feature_extractor/`), or a hub repo id
    /// of either (fetched into or read from the cache per `hub`; only configs and safetensors).
    /// The model runs on `device` in `dtype`; on the CPU always in f32 (candle's CPU half
    /// precision is slow, and the thresholds are sharp).
    pub fn load(
        source: &str,
        hub: &HubOptions,
        device: &Device,
        dtype: DType,
    ) -> Result<Self, SafetyError> {
        Self::from_dir(&load::resolve(source, hub)?, device, dtype)
    }

    /// [`SafetyChecker::load`] from a local folder.
    pub fn from_dir(dir: &Path, device: &Device, dtype: DType) -> Result<Self, SafetyError> {
        let dtype = if device.is_cpu() { DType::F32 } else { dtype };
        let (model, preprocessor) = load::load_dir(dir, device, dtype)?;
        Ok(Self {
            model,
            preprocessor,
            device: device.clone(),
            dtype,
        })
    }

    /// The model (its cosine distances and scoring).
    pub fn model(&self) -> &StableDiffusionSafetyChecker {
        &self.model
    }

    /// The model's input for `frames`: (frames, 3, size, size) f32 on the CPU, as
    /// `CLIPImageProcessor` makes `pixel_values`.
    pub fn pixel_values(&self, frames: &[&RgbImage]) -> Result<Tensor, SafetyError> {
        let mut values = Vec::new();
        let mut size = (0, 0);
        for (i, frame) in frames.iter().enumerate() {
            if frame.width() == 0 || frame.height() == 0 {
                return Err(SafetyError::Invalid(format!("frame {i} is empty")));
            }
            let (hw, v) = self.preprocessor.pixel_values(frame);
            size = hw;
            values.extend(v);
        }
        Ok(Tensor::from_vec(
            values,
            (frames.len(), 3, size.0, size.1),
            &Device::Cpu,
        )?)
    }

    fn check(&self, frames: &[&RgbImage]) -> Result<Vec<FrameVerdict>, SafetyError> {
        let mut out = Vec::with_capacity(frames.len());
        for batch in frames.chunks(BATCH) {
            let input = self
                .pixel_values(batch)?
                .to_device(&self.device)?
                .to_dtype(self.dtype)?;
            out.extend(
                self.model
                    .forward(&input)?
                    .into_iter()
                    .map(FrameVerdict::from),
            );
        }
        Ok(out)
    }

    /// The verdict of each frame (any size; 8-bit RGB as the reference's PIL images).
    pub fn check_frames(&self, frames: &[RgbImage]) -> Result<Vec<FrameVerdict>, SafetyError> {
        self.check(&frames.iter().collect::<Vec<_>>())
    }

    /// Checks `n` frames spread evenly over a clip ([`spread_frames`]); flagged when any is.
    pub fn check_clip(&self, frames: &[RgbImage], n: usize) -> Result<ClipVerdict, SafetyError> {
        let picked = pick(frames.len(), n)?;
        let chosen: Vec<&RgbImage> = picked.iter().map(|&i| &frames[i]).collect();
        Ok(verdict(picked, self.check(&chosen)?))
    }

    /// [`SafetyChecker::check_clip`] on a generated clip as the pipeline returns it
    /// ([`crate::generate::Video::frames`]: (frames, h, w, 3) in [0, 1]); only the checked frames
    /// are converted to 8 bits, as the MP4 export converts them ([`crate::export::frame_rgb8`]).
    pub fn check_video(&self, frames: &Tensor, n: usize) -> Result<ClipVerdict, SafetyError> {
        let (count, h, w, c) = frames.dims4()?;
        if c != 3 {
            return Err(SafetyError::Invalid(format!(
                "expected frames (count, h, w, 3), got {:?}",
                frames.dims()
            )));
        }
        let picked = pick(count, n)?;
        let images = picked
            .iter()
            .map(|&i| {
                let rgb = crate::export::frame_rgb8(frames, i)
                    .map_err(|e| SafetyError::Invalid(e.to_string()))?;
                RgbImage::from_raw(w as u32, h as u32, rgb).ok_or_else(|| {
                    SafetyError::Invalid(format!("frame {i} does not hold {w}x{h} RGB pixels"))
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let verdicts = self.check(&images.iter().collect::<Vec<_>>())?;
        Ok(verdict(picked, verdicts))
    }
}

/// The frames to check in a clip of `count`, or why none can be.
fn pick(count: usize, n: usize) -> Result<Vec<usize>, SafetyError> {
    if count == 0 || n == 0 {
        return Err(SafetyError::Invalid(format!(
            "a safety check needs frames and n >= 1 frames to check (got {count} frames, n = {n})"
        )));
    }
    Ok(spread_frames(count, n))
}

fn verdict(picked: Vec<usize>, verdicts: Vec<FrameVerdict>) -> ClipVerdict {
    ClipVerdict {
        flagged: verdicts.iter().any(|v| v.nsfw),
        frames: picked.into_iter().zip(verdicts).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_spread_evenly_with_both_ends() {
        // fewer frames than asked: all of them
        assert_eq!(spread_frames(3, 4), vec![0, 1, 2]);
        assert_eq!(spread_frames(4, 4), vec![0, 1, 2, 3]);
        // one: the middle (of 4: index 2, the later of the two middles)
        assert_eq!(spread_frames(4, 1), vec![2]);
        assert_eq!(spread_frames(97, 1), vec![48]);
        // round(i · 6 / 2): 0, 3, 6
        assert_eq!(spread_frames(7, 3), vec![0, 3, 6]);
        // round(i · 5 / 2) = 0, 2.5 -> 3, 5
        assert_eq!(spread_frames(6, 3), vec![0, 3, 5]);
        // SkyReels' 97 frames, 4 checked: 0, 32, 64, 96
        assert_eq!(spread_frames(97, 4), vec![0, 32, 64, 96]);
        // round(i · 9 / 4) = 0, 2.25 -> 2, 4.5 -> 5, 6.75 -> 7, 9
        assert_eq!(spread_frames(10, 5), vec![0, 2, 5, 7, 9]);
        for count in 1..60 {
            for n in 1..12 {
                let v = spread_frames(count, n);
                assert_eq!(v.len(), count.min(n));
                assert!(v.windows(2).all(|w| w[0] < w[1]), "{count} {n}: {v:?}");
                assert!(v.iter().all(|&i| i < count));
                if n >= 2 {
                    assert_eq!((v[0], *v.last().unwrap()), (0, count - 1));
                }
            }
        }
    }

    #[test]
    fn nothing_to_check_is_an_error() {
        assert!(pick(0, 4).is_err());
        assert!(pick(5, 0).is_err());
        assert_eq!(pick(5, 2).unwrap(), vec![0, 4]);
    }
}
