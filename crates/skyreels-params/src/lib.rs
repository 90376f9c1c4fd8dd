//! Generation parameters in one place, shared by `skyreels generate` and `skyreels serve` so the
//! two cannot disagree: SkyReels' defaults, the limits every request is checked against, the
//! portrait swap of the default size, the cost measure behind `--max-work`, and the image fit
//! (center crop + Lanczos) the pipeline applies to the first frame, and one request's parameters
//! ([`GenerationParams`]) with the rules its final values are checked against. No candle here.

#![forbid(unsafe_code)]

use image::imageops::FilterType;
use image::RgbImage;
use serde::{Deserialize, Serialize};

mod ratios;
mod request;
mod steps;
pub use ratios::{MagRatios, BUNDLED_RATIOS, MAG_RATIOS_LEN};
pub use request::{GenerationParams, Limits, LoraSpec, Refusal};
pub use steps::{
    cfg_gate_start, parse_cfg_gate, CacheSpec, MagCacheSpec, TaylorSeerSpec, CACHE_FORMS,
    CACHE_THRESHOLD, CFG_GATE, MAGCACHE_MAX_SKIP, MAGCACHE_NEEDS_RATIOS, MAGCACHE_RETENTION,
};

/// SkyReels' default negative prompt (its README and `video_generate.py`).
pub const DEFAULT_NEGATIVE_PROMPT: &str = "Aerial view, aerial view, overexposed, low quality, deformation, a poor composition, bad hands, bad teeth, bad eyes, bad limbs, distortion";

/// True classifier-free guidance scale (SkyReels' 6.0).
pub const GUIDANCE_SCALE: f64 = 6.0;
/// The value fed to the transformer's guidance embedder.
pub const EMBEDDED_GUIDANCE_SCALE: f64 = 1.0;
/// Frames per second of the MP4.
pub const FPS: f64 = 24.0;
/// Frames come in 4k+1 (the VAE compresses time by 4, keeping the first frame).
pub const FRAME_STEP: usize = 4;
/// Longest prompt and negative prompt accepted, in bytes (the encoders read 256 LLaMA and 77
/// CLIP tokens; 8 KiB is far beyond what they use).
pub const MAX_PROMPT_BYTES: usize = 8 << 10;

/// An inclusive integer range and the message that states it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct IntRange {
    pub min: i64,
    pub max: i64,
}

impl IntRange {
    pub fn contains(&self, v: i64) -> bool {
        (self.min..=self.max).contains(&v)
    }

    /// "must be an integer from MIN to MAX"
    pub fn rule(&self) -> String {
        format!("must be an integer from {} to {}", self.min, self.max)
    }
}

/// A range of finite numbers, `min` included unless `min_exclusive`, `max` included unless
/// `max_exclusive`, and the message that states it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct FloatRange {
    pub min: f64,
    pub max: f64,
    pub min_exclusive: bool,
    pub max_exclusive: bool,
}

impl FloatRange {
    /// `min..=max`.
    pub const fn inclusive(min: f64, max: f64) -> Self {
        Self {
            min,
            max,
            min_exclusive: false,
            max_exclusive: false,
        }
    }

    /// Above `min`, at most `max`.
    pub const fn above(min: f64, max: f64) -> Self {
        Self {
            min_exclusive: true,
            ..Self::inclusive(min, max)
        }
    }

    /// Above `min`, below `max`.
    pub const fn open(min: f64, max: f64) -> Self {
        Self {
            min_exclusive: true,
            max_exclusive: true,
            ..Self::inclusive(min, max)
        }
    }

    pub fn contains(&self, v: f64) -> bool {
        let above_min = if self.min_exclusive {
            v > self.min
        } else {
            v >= self.min
        };
        let below_max = if self.max_exclusive {
            v < self.max
        } else {
            v <= self.max
        };
        v.is_finite() && above_min && below_max
    }

    /// "must be a number from MIN to MAX" (or "above MIN and at most MAX", "above MIN and
    /// below MAX")
    pub fn rule(&self) -> String {
        match (self.min_exclusive, self.max_exclusive) {
            (false, false) => format!("must be a number from {} to {}", self.min, self.max),
            (true, false) => format!(
                "must be a number above {} and at most {}",
                self.min, self.max
            ),
            (true, true) => format!("must be a number above {} and below {}", self.min, self.max),
            (false, true) => format!("must be a number from {} and below {}", self.min, self.max),
        }
    }
}

/// `-1` (random) or a fixed seed.
pub const SEED: IntRange = IntRange {
    min: -1,
    max: 2_147_483_647,
};
pub const STEPS: IntRange = IntRange { min: 1, max: 100 };
/// Frame counts (also 4k+1, see [`check_frames`]).
pub const FRAMES: IntRange = IntRange { min: 1, max: 257 };
/// Frame height and width in pixels (also multiples of the model's size multiple).
pub const SIDE: IntRange = IntRange { min: 16, max: 4096 };
pub const GUIDANCE: FloatRange = FloatRange::inclusive(0.0, 30.0);
pub const EMBEDDED_GUIDANCE: FloatRange = FloatRange::inclusive(0.0, 30.0);
pub const FPS_RANGE: FloatRange = FloatRange::inclusive(1.0, 120.0);
/// The flow-matching shift of one request (`flow_shift`, `--flow-shift`; without one, the
/// model's `scheduler_config.json`): sigma' = shift·sigma / (1 + (shift − 1)·sigma).
pub const FLOW_SHIFT: FloatRange = FloatRange::above(0.0, 20.0);
/// A video's length in seconds (WaveSpeed's `duration`), turned into frames by
/// [`frames_for_duration`]; no frame rate (at least 1) fits more than [`FRAMES`]`.max` frames
/// into a longer one.
pub const DURATION: FloatRange = FloatRange::above(0.0, FRAMES.max as f64);

/// A LoRA's weight (`scale`): diffusers' `set_adapters` weight, as WaveSpeed bounds it.
pub const LORA_SCALE: FloatRange = FloatRange::inclusive(-4.0, 4.0);
/// Most LoRAs per request unless the server says otherwise (`--max-loras`; WaveSpeed's 3).
pub const MAX_LORAS: usize = 3;
/// Longest LoRA path, name or URL accepted, in bytes.
pub const MAX_LORA_PATH_BYTES: usize = 2048;
/// HunyuanVideo's temporal RoPE frequencies (`rope_axes_dim[0] = 16`, 8 pairs).
pub const HUNYUAN_TEMPORAL_ROPE_FREQUENCIES: usize = 8;
/// RIFLEx's intrinsic-frequency index for HunyuanVideo (RIFLEx's `identify_k(b=256, d=16, N=48)`).
pub const RIFLEX_HUNYUAN_K: usize = 4;

/// Size and step defaults of a model: SkyReels' own, or a model folder's `skyreels_defaults.json`
/// (the tiny bundled weights use small ones).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GenerationDefaults {
    pub height: usize,
    pub width: usize,
    pub num_frames: usize,
    pub num_inference_steps: usize,
    /// The model's own negative prompt when SkyReels' does not suit it (the tiny weights'
    /// tokenizers would cut SkyReels' one); None: [`DEFAULT_NEGATIVE_PROMPT`].
    #[serde(default)]
    pub negative_prompt: Option<String>,
}

impl Default for GenerationDefaults {
    fn default() -> Self {
        Self {
            height: 544,
            width: 960,
            num_frames: 97,
            num_inference_steps: 30,
            negative_prompt: None,
        }
    }
}

impl GenerationDefaults {
    /// The negative prompt a request without one gets.
    pub fn negative_prompt(&self) -> &str {
        self.negative_prompt
            .as_deref()
            .unwrap_or(DEFAULT_NEGATIVE_PROMPT)
    }

    /// (height, width) when a request names no size: the landscape default, turned for a
    /// portrait image (taller than wide) or a portrait aspect ratio.
    pub fn size(&self, portrait: bool) -> (usize, usize) {
        if portrait {
            (self.width, self.height)
        } else {
            (self.height, self.width)
        }
    }
}

/// Whether an image is portrait (taller than wide): its video gets the turned default size.
pub fn is_portrait(img: &RgbImage) -> bool {
    img.height() > img.width()
}

/// Checks a frame count: within [`FRAMES`] and 4k+1.
pub fn check_frames(n: usize) -> Result<(), String> {
    if !FRAMES.contains(n as i64) {
        return Err(FRAMES.rule());
    }
    if !(n - 1).is_multiple_of(FRAME_STEP) {
        return Err(format!("must be 4k+1 (1, 5, ..., 97, ...), got {n}"));
    }
    Ok(())
}

/// The frame count of a video `seconds` long at `fps`: the 4k+1 nearest to seconds × fps, a tie
/// going to the larger (5 s at 24 fps: 121). The caller checks it against [`FRAMES`].
pub fn frames_for_duration(seconds: f64, fps: f64) -> usize {
    let k = ((seconds * fps - 1.0) / FRAME_STEP as f64 + 0.5)
        .floor()
        .max(0.0);
    FRAME_STEP * k as usize + 1
}

/// Checks a frame side: within [`SIDE`] and a multiple of `multiple`.
pub fn check_side(v: usize, multiple: usize) -> Result<(), String> {
    if !SIDE.contains(v as i64) {
        return Err(SIDE.rule());
    }
    if !v.is_multiple_of(multiple) {
        return Err(format!("must be a multiple of {multiple}, got {v}"));
    }
    Ok(())
}

/// The cost measure of `--max-work`: width × height × frames × steps, in millions (SkyReels'
/// default 960x544, 97 frames, 30 steps is 1,520).
pub fn work_millions(height: usize, width: usize, num_frames: usize, steps: usize) -> f64 {
    (height as f64 * width as f64 * num_frames as f64 * steps as f64) / 1e6
}

/// The largest frame the MP4's H.264 encoder takes, longer side by shorter side: OpenH264 (the
/// `openh264` crate 0.9.9) refuses frames beyond 3840x2160 landscape or 2160x3840 portrait
/// (`Encoder::reinit`; OpenH264's own limit is level 5.2, 36,864 macroblocks a frame). A task
/// larger than this would compute for minutes and then fail to write its video.
pub const ENCODER_MAX_SIDES: (usize, usize) = (3840, 2160);

/// Checks that the H.264 encoder takes frames of `height × width` (see [`ENCODER_MAX_SIDES`]);
/// the error names the field to change ("width" or "height") and the rule.
pub fn check_encodable(height: usize, width: usize) -> Result<(), (&'static str, String)> {
    let (long, short) = ENCODER_MAX_SIDES;
    let landscape = width >= height;
    let (l, s) = if landscape {
        (width, height)
    } else {
        (height, width)
    };
    if l <= long && s <= short {
        return Ok(());
    }
    // the side to change: the longer one when it is over, else the shorter one
    let field = if landscape == (l > long) {
        "width"
    } else {
        "height"
    };
    Err((
        field,
        format!(
            "the H.264 encoder takes frames of at most {long}x{short} (or {short}x{long} \
             portrait); {width}x{height} cannot be written"
        ),
    ))
}

/// Pixel-frames of a clip: width × height × frames. The memory a task needs grows with it (the
/// transformer's tokens, the decoded frames), whatever its step count.
pub fn pixel_frames(height: usize, width: usize, num_frames: usize) -> u64 {
    height as u64 * width as u64 * num_frames as u64
}

/// The limit on pixel-frames when a device's memory is unknown: SkyReels' default clip, 960x544
/// and 97 frames.
pub const FALLBACK_MAX_PIXEL_FRAMES: u64 = 960 * 544 * 97;

/// Checks a clip against a `--max-pixel-frames` limit; the message states both numbers.
pub fn check_pixel_frames(
    height: usize,
    width: usize,
    num_frames: usize,
    limit: u64,
) -> Result<(), String> {
    let n = pixel_frames(height, width, num_frames);
    if n <= limit {
        return Ok(());
    }
    Err(format!(
        "the clip is too large for this worker's memory: {width}x{height} pixels x {num_frames} \
         frames is {n} pixel-frames; the limit (--max-pixel-frames) is {limit}"
    ))
}

/// How a model cuts a clip into transformer tokens: the VAE's compression (pixels per latent
/// cell, frames per latent frame after the first) and the transformer's patch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenLayout {
    pub spatial_compression: usize,
    pub temporal_compression: usize,
    pub patch_size: usize,
    pub patch_size_t: usize,
}

impl TokenLayout {
    /// The video tokens of a clip (its sizes multiples of the model's size multiple, its frame
    /// count a valid one).
    pub fn tokens(&self, height: usize, width: usize, num_frames: usize) -> usize {
        let latent_frames = num_frames.saturating_sub(1) / self.temporal_compression.max(1) + 1;
        let side = |v: usize| v / (self.spatial_compression * self.patch_size).max(1);
        latent_frames / self.patch_size_t.max(1) * side(height) * side(width)
    }
}

/// Ulysses sequence parallelism (`--parallel ulysses=N`, N > 1): the video tokens of each
/// transformer pass split into `degree` equal slices, one per device.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ulysses {
    pub degree: usize,
    pub layout: TokenLayout,
}

impl Ulysses {
    /// Whether the layout can run a request; the error names the field to change. Checked at
    /// submit (so the task is refused with a 400) and again by the pipeline before it runs.
    pub fn check(
        &self,
        height: usize,
        width: usize,
        num_frames: usize,
        cache: CacheSpec,
    ) -> Result<(), (&'static str, String)> {
        let u = self.degree;
        if cache != CacheSpec::None {
            return Err((
                "cache",
                format!(
                    "step caching does not combine with Ulysses sequence parallelism \
                     (ulysses={u}) yet"
                ),
            ));
        }
        let tokens = self.layout.tokens(height, width, num_frames);
        if !tokens.is_multiple_of(u) {
            return Err((
                "num_frames",
                format!(
                    "ulysses={u}: this size and frame count make {tokens} video tokens, which do \
                     not divide into {u} equal slices"
                ),
            ));
        }
        Ok(())
    }
}

/// The image center-cropped to the aspect ratio of `width × height`, then resized with Lanczos
/// (SkyReels' `resizecrop`); an image already at that size is used untouched, so fitting twice
/// is the same as fitting once.
pub fn fit_image(img: &RgbImage, width: usize, height: usize) -> RgbImage {
    let (w, h) = (img.width() as f64, img.height() as f64);
    if img.width() as usize == width && img.height() as usize == height {
        return img.clone();
    }
    let target = height as f64 / width as f64;
    // keep the full width when the image is taller than the target aspect, else the full height
    let (cw, ch) = if h / w > target {
        (w, w * target)
    } else {
        (h / target, h)
    };
    let (x0, y0) = (((w - cw) / 2.0).round(), ((h - ch) / 2.0).round());
    let (cw, ch) = (cw.round().max(1.0), ch.round().max(1.0));
    let crop =
        image::imageops::crop_imm(img, x0 as u32, y0 as u32, cw as u32, ch as u32).to_image();
    image::imageops::resize(&crop, width as u32, height as u32, FilterType::Lanczos3)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_limits_and_work() {
        let d = GenerationDefaults::default();
        assert_eq!(d.size(false), (544, 960));
        assert_eq!(d.size(true), (960, 544));
        assert_eq!(work_millions(544, 960, 97, 30).round(), 1520.0);
        for ok in [1, 5, 97, 257] {
            assert_eq!(check_frames(ok), Ok(()), "{ok}");
        }
        assert!(check_frames(8).unwrap_err().contains("4k+1"));
        assert!(check_frames(0).unwrap_err().contains("from 1 to 257"));
        assert!(check_frames(261).unwrap_err().contains("from 1 to 257"));
        assert_eq!(check_side(544, 16), Ok(()));
        assert!(check_side(100, 16).unwrap_err().contains("multiple of 16"));
        assert!(check_side(4112, 16).unwrap_err().contains("16 to 4096"));
        assert!(!GUIDANCE.contains(f64::NAN) && GUIDANCE.contains(30.0));
        assert!(SEED.contains(-1) && !SEED.contains(2_147_483_648));
        assert!(!FLOW_SHIFT.contains(0.0) && FLOW_SHIFT.contains(1e-3));
        assert!(FLOW_SHIFT.contains(20.0) && !FLOW_SHIFT.contains(20.5));
        assert!(!FLOW_SHIFT.contains(f64::INFINITY) && !FLOW_SHIFT.contains(-1.0));
        assert_eq!(FLOW_SHIFT.rule(), "must be a number above 0 and at most 20");
    }

    #[test]
    fn durations_become_the_nearest_4k_plus_1_frames() {
        for (seconds, fps, frames) in [
            (5.0, 24.0, 121),   // 120 -> 121
            (10.0, 24.0, 241),  // 240 -> 241
            (0.3, 24.0, 9),     // 7.2 -> 9
            (5.125, 24.0, 125), // 123, halfway between 121 and 125: upward
            (0.125, 24.0, 5),   // 3, halfway between 1 and 5: upward
            (0.1, 24.0, 1),     // 2.4 -> 1
            (0.01, 1.0, 1),     // below one frame: the first frame
            (4.0, 30.0, 121),   // 120 -> 121
            (2.0, 12.5, 25),    // 25
            (257.0, 1.0, 257),
        ] {
            assert_eq!(
                frames_for_duration(seconds, fps),
                frames,
                "{seconds} s at {fps} fps"
            );
        }
    }

    #[test]
    fn encoder_limits_follow_openh264() {
        for (h, w) in [
            (2160, 3840),
            (3840, 2160),
            (544, 960),
            (16, 3840),
            (2160, 2160),
        ] {
            assert_eq!(check_encodable(h, w), Ok(()), "{w}x{h}");
        }
        for (h, w, field) in [
            (64, 4096, "width"),
            (4096, 64, "height"),
            (2176, 3840, "height"),
            (3840, 2176, "width"),
            (2176, 2176, "height"),
            (4096, 4096, "width"),
        ] {
            let (f, msg) = check_encodable(h, w).unwrap_err();
            assert_eq!(f, field, "{w}x{h}");
            assert!(
                msg.contains("3840x2160") && msg.contains(&format!("{w}x{h}")),
                "{msg}"
            );
        }
    }

    #[test]
    fn pixel_frames_and_their_limit() {
        assert_eq!(pixel_frames(544, 960, 97), FALLBACK_MAX_PIXEL_FRAMES);
        assert_eq!(
            check_pixel_frames(544, 960, 97, FALLBACK_MAX_PIXEL_FRAMES),
            Ok(())
        );
        let e = check_pixel_frames(512, 512, 65, 1_000_000).unwrap_err();
        assert!(
            e.contains("17039360 pixel-frames") && e.contains("--max-pixel-frames) is 1000000"),
            "{e}"
        );
    }

    #[test]
    fn ulysses_layouts_are_checked() {
        let u = Ulysses {
            degree: 2,
            layout: TokenLayout {
                spatial_compression: 8,
                temporal_compression: 4,
                patch_size: 2,
                patch_size_t: 1,
            },
        };
        // 960x544, 97 frames: 25 x 34 x 60 tokens
        assert_eq!(u.layout.tokens(544, 960, 97), 25 * 34 * 60);
        assert_eq!(u.check(544, 960, 97, CacheSpec::None), Ok(()));
        // 48x80, 1 frame: 1 x 3 x 5 = 15 tokens
        let (field, e) = u.check(48, 80, 1, CacheSpec::None).unwrap_err();
        assert_eq!(field, "num_frames");
        assert!(e.contains("15 video tokens"), "{e}");
        let (field, e) = u.check(544, 960, 97, CacheSpec::TeaCache(0.1)).unwrap_err();
        assert_eq!(field, "cache");
        assert!(e.contains("ulysses=2"), "{e}");
    }

    #[test]
    fn fitting_crops_to_the_aspect_and_is_idempotent() {
        let img = RgbImage::from_fn(300, 100, |x, y| image::Rgb([x as u8, y as u8, 7]));
        let fit = fit_image(&img, 96, 64);
        assert_eq!(fit.dimensions(), (96, 64));
        assert_eq!(fit_image(&fit, 96, 64), fit);
        assert!(is_portrait(&RgbImage::new(3, 4)) && !is_portrait(&RgbImage::new(4, 4)));
    }
}
