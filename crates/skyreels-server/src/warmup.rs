//! Warm start (`--warmup`): after loading, each worker runs one small generation per model it
//! serves before the node reports ready, so the first client does not pay the one-time costs
//! (kernel compilation and autotuning, allocator growth, lazily read weights). The warm-up is
//! no task: it has no record, no queue place, no metrics and keeps no output.

use crate::engine::worker::panic_message;
use crate::generator::{Generator, Input, ModelInfo};
use skyreels_params::{CacheSpec, GenerationParams, FRAMES, FRAME_STEP, SIDE};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::Instant;

/// The prompt of every warm-up generation.
pub const WARMUP_PROMPT: &str = "warm-up";

/// The smallest generation `model` takes within `max_work` (`--max-work`): one denoising step,
/// the smallest square side (its size multiple, at least [`SIDE`]`.min`) and the fewest frames
/// (1, or the fewest a Ulysses layout splits evenly), a grey image for image-to-video. `None`
/// when no size fits the model's limits.
pub fn warmup_input(model: &ModelInfo, max_work: f64) -> Option<Input> {
    let m = model.size_multiple.max(1);
    let first_side = (SIDE.min as usize).div_ceil(m) * m;
    let limits = model.limits(max_work, 0);
    let (side, num_frames) = (first_side..=SIDE.max as usize)
        .step_by(m)
        .flat_map(|side| {
            (FRAMES.min as usize..=FRAMES.max as usize)
                .step_by(FRAME_STEP)
                .map(move |frames| (side, frames))
        })
        .find(|&(side, frames)| params(side, frames).check(&limits).is_ok())?;
    let image = model.image_to_video.then(|| {
        image::RgbImage::from_pixel(side as u32, side as u32, image::Rgb([128, 128, 128]))
    });
    Some(Input {
        params: params(side, num_frames),
        image,
        loras: Vec::new(),
        // a loaded checker has its one-time costs too
        safety_check: true,
    })
}

fn params(side: usize, num_frames: usize) -> GenerationParams {
    GenerationParams {
        prompt: WARMUP_PROMPT.into(),
        negative_prompt: None,
        height: side,
        width: side,
        num_frames,
        steps: 1,
        guidance_scale: skyreels_params::GUIDANCE_SCALE,
        embedded_guidance_scale: skyreels_params::EMBEDDED_GUIDANCE_SCALE,
        seed: 0,
        fps: skyreels_params::FPS,
        cache: CacheSpec::None,
        cfg_gate: None,
        flow_shift: None,
        loras: Vec::new(),
        riflex_freq_index: 0,
    }
}

/// Runs worker `index`'s warm-up generations (one per model of `generator`), logging each one's
/// time; the error says which model failed and why (the start then fails with it).
pub fn warm_up(generator: &mut dyn Generator, max_work: f64, index: usize) -> Result<(), String> {
    // in the system's temporary folder: no output folder (nor a shared one) sees it
    let output = std::env::temp_dir().join(format!(
        "skyreels-warmup-{}-{index}.mp4",
        std::process::id()
    ));
    for model in generator.models() {
        let id = &model.id;
        let input = warmup_input(&model, max_work).ok_or_else(|| {
            format!("the warm-up generation of {id}: no size fits its limits (--max-work)")
        })?;
        let p = &input.params;
        let (w, h, frames) = (p.width, p.height, p.num_frames);
        let started = Instant::now();
        let run = catch_unwind(AssertUnwindSafe(|| {
            generator.generate(&input, &output, &mut |_, _| true)
        }));
        if let Err(e) = std::fs::remove_file(&output) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(
                    "cannot remove the warm-up's video {}: {e}",
                    output.display()
                );
            }
        }
        match run {
            Ok(Ok(_)) => tracing::info!(
                worker = index,
                model = %id,
                seconds = started.elapsed().as_secs_f64(),
                "warm-up generation ({w}x{h}, {frames} frames, 1 step) done"
            ),
            Ok(Err(e)) => {
                return Err(format!(
                    "the warm-up generation of {id} ({w}x{h}, {frames} frames, 1 step) failed: {e}"
                ))
            }
            Err(p) => {
                return Err(format!(
                    "the warm-up generation of {id} panicked: {}",
                    panic_message(&p)
                ))
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use skyreels_params::{GenerationDefaults, TokenLayout, Ulysses};

    fn model(ulysses: Option<Ulysses>) -> ModelInfo {
        ModelInfo {
            id: "m".into(),
            image_to_video: true,
            defaults: GenerationDefaults::default(),
            size_multiple: 16,
            max_pixel_frames: skyreels_params::FALLBACK_MAX_PIXEL_FRAMES,
            ulysses,
            temporal_rope_frequencies: skyreels_params::HUNYUAN_TEMPORAL_ROPE_FREQUENCIES,
            safety_checker: None,
        }
    }

    #[test]
    fn the_warmup_is_the_smallest_valid_generation() {
        let i = warmup_input(&model(None), 3000.0).unwrap();
        let p = &i.params;
        assert_eq!((p.width, p.height, p.num_frames, p.steps), (16, 16, 1, 1));
        assert_eq!(i.image.unwrap().dimensions(), (16, 16));
        // Ulysses over 2 devices: 16x16 is one token a latent frame, so 5 frames (2 latent ones)
        let layout = TokenLayout {
            spatial_compression: 8,
            temporal_compression: 4,
            patch_size: 2,
            patch_size_t: 1,
        };
        let u = Ulysses { degree: 2, layout };
        let p = warmup_input(&model(Some(u)), 3000.0).unwrap().params;
        assert_eq!((p.width, p.height, p.num_frames), (16, 16, 5));
        // a --max-work below any clip leaves none
        assert!(warmup_input(&model(None), 1e-9).is_none());
    }
}
