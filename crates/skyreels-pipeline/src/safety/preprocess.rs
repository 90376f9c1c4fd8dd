//! The checker's image preprocessing: transformers' `CLIPImageProcessor` as its PIL backend
//! computes it (the reference; see docs/safety-checker.md): resize (shortest edge, PIL bicubic on
//! 8 bits), center crop (zero padding where the image is smaller), rescale in f64 then to f32,
//! normalize in f32, channels first.
//!
//! <https://github.com/huggingface/transformers/blob/v5.24.0/src/transformers/image_processing_backends.py#L448-L690>
//! <https://github.com/huggingface/transformers/blob/v5.24.0/src/transformers/image_transforms.py#L92-L127>

use super::resample::resize_bicubic;
use image::RgbImage;
use serde::Deserialize;

/// OpenAI CLIP's per-channel statistics (`OPENAI_CLIP_MEAN` / `OPENAI_CLIP_STD`).
pub const CLIP_MEAN: [f64; 3] = [0.48145466, 0.4578275, 0.40821073];
pub const CLIP_STD: [f64; 3] = [0.26862954, 0.26130258, 0.27577711];
/// PIL's `Image.BICUBIC` (`resample` in the config).
const PIL_BICUBIC: u32 = 3;

/// A `size` / `crop_size` entry: an int (old feature extractors) or a size dict.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum SizeSpec {
    Int(u32),
    Dict {
        shortest_edge: Option<u32>,
        height: Option<u32>,
        width: Option<u32>,
        longest_edge: Option<u32>,
        max_height: Option<u32>,
        max_width: Option<u32>,
    },
}

/// A per-channel value: one number for all channels, or one per channel.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum Channels {
    One(f64),
    Each(Vec<f64>),
}

/// `preprocessor_config.json` (a `CLIPImageProcessor` / `CLIPFeatureExtractor`); absent fields
/// take `CLIPImageProcessor`'s defaults. `do_convert_rgb` does not apply: frames are RGB.
#[derive(Debug, Clone, Deserialize)]
pub struct PreprocessorConfig {
    #[serde(default = "yes")]
    do_resize: bool,
    size: Option<SizeSpec>,
    #[serde(default = "bicubic")]
    resample: u32,
    #[serde(default = "yes")]
    do_center_crop: bool,
    crop_size: Option<SizeSpec>,
    #[serde(default = "yes")]
    do_rescale: bool,
    #[serde(default = "one_over_255")]
    rescale_factor: f64,
    #[serde(default = "yes")]
    do_normalize: bool,
    image_mean: Option<Channels>,
    image_std: Option<Channels>,
}

fn yes() -> bool {
    true
}

fn bicubic() -> u32 {
    PIL_BICUBIC
}

fn one_over_255() -> f64 {
    1.0 / 255.0
}

impl Default for PreprocessorConfig {
    /// `CLIPImageProcessor()`: shortest edge 224, bicubic, center crop 224, 1/255, CLIP's stats.
    fn default() -> Self {
        Self {
            do_resize: true,
            size: None,
            resample: PIL_BICUBIC,
            do_center_crop: true,
            crop_size: None,
            do_rescale: true,
            rescale_factor: one_over_255(),
            do_normalize: true,
            image_mean: None,
            image_std: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Resize {
    /// The shorter side to this, the longer one `int(edge · long / short)`.
    ShortestEdge(u32),
    Exact {
        height: u32,
        width: u32,
    },
}

/// A checked [`PreprocessorConfig`]: frames in, pixel values out.
#[derive(Debug, Clone, PartialEq)]
pub struct Preprocessor {
    resize: Option<Resize>,
    /// (height, width)
    crop: Option<(u32, u32)>,
    rescale: Option<f64>,
    /// float32 mean and std, as numpy holds them
    normalize: Option<([f32; 3], [f32; 3])>,
}

fn channels(v: &Option<Channels>, default: [f64; 3], name: &str) -> Result<[f32; 3], String> {
    let v = match v {
        None => default,
        Some(Channels::One(x)) => [*x; 3],
        Some(Channels::Each(xs)) => <[f64; 3]>::try_from(xs.as_slice())
            .map_err(|_| format!("{name} has {} values, expected 3", xs.len()))?,
    };
    Ok(v.map(|x| x as f32))
}

impl Preprocessor {
    /// The preprocessing `cfg` describes; what the checker cannot reproduce is an error.
    pub fn new(cfg: &PreprocessorConfig) -> Result<Self, String> {
        let resize = if cfg.do_resize {
            if cfg.resample != PIL_BICUBIC {
                return Err(format!(
                    "resample {} is not supported (only 3, bicubic, as CLIP uses)",
                    cfg.resample
                ));
            }
            Some(match &cfg.size {
                None => Resize::ShortestEdge(224),
                Some(SizeSpec::Int(s)) => Resize::ShortestEdge(*s),
                Some(SizeSpec::Dict {
                    shortest_edge: Some(s),
                    height: None,
                    width: None,
                    longest_edge: None,
                    max_height: None,
                    max_width: None,
                }) => Resize::ShortestEdge(*s),
                Some(SizeSpec::Dict {
                    shortest_edge: None,
                    height: Some(height),
                    width: Some(width),
                    longest_edge: None,
                    max_height: None,
                    max_width: None,
                }) => Resize::Exact {
                    height: *height,
                    width: *width,
                },
                Some(other) => {
                    return Err(format!(
                        "size {other:?} is not supported (an int, shortest_edge, or height and \
                         width)"
                    ))
                }
            })
        } else {
            None
        };
        let crop = if cfg.do_center_crop {
            Some(match &cfg.crop_size {
                None => (224, 224),
                Some(SizeSpec::Int(s)) => (*s, *s),
                Some(SizeSpec::Dict {
                    height: Some(h),
                    width: Some(w),
                    ..
                }) => (*h, *w),
                Some(other) => {
                    return Err(format!(
                        "crop_size {other:?} is not supported (an int, or height and width)"
                    ))
                }
            })
        } else {
            None
        };
        let resize_zero = match resize {
            Some(Resize::ShortestEdge(s)) => s == 0,
            Some(Resize::Exact { height, width }) => height == 0 || width == 0,
            None => false,
        };
        if resize_zero || crop.is_some_and(|(h, w)| h == 0 || w == 0) {
            return Err("a resize or crop size is 0".into());
        }
        let normalize = if cfg.do_normalize {
            let mean = channels(&cfg.image_mean, CLIP_MEAN, "image_mean")?;
            let std = channels(&cfg.image_std, CLIP_STD, "image_std")?;
            if std.contains(&0.0) {
                return Err("image_std has a 0".into());
            }
            Some((mean, std))
        } else {
            None
        };
        Ok(Self {
            resize,
            crop,
            rescale: cfg.do_rescale.then_some(cfg.rescale_factor),
            normalize,
        })
    }

    /// The (height, width) of every output, when the config fixes it (a center crop, or an exact
    /// resize).
    pub fn output_size(&self) -> Option<(u32, u32)> {
        match (self.crop, self.resize) {
            (Some(c), _) => Some(c),
            (None, Some(Resize::Exact { height, width })) => Some((height, width)),
            _ => None,
        }
    }

    /// `get_resize_output_image_size` (height, width) for an image of `width` x `height`.
    fn resized(&self, width: u32, height: u32) -> (u32, u32) {
        match self.resize {
            None => (height, width),
            Some(Resize::Exact { height, width }) => (height, width),
            Some(Resize::ShortestEdge(s)) => {
                let (short, long) = if width <= height {
                    (width, height)
                } else {
                    (height, width)
                };
                // int(s · long / short): an exact product, one rounded division, truncation
                let new_long = ((u64::from(s) * u64::from(long)) as f64 / f64::from(short)) as u32;
                if width <= height {
                    (new_long, s)
                } else {
                    (s, new_long)
                }
            }
        }
    }

    /// Pixel values (3, h, w) of one frame, channels first, as `(h, w)` and the values.
    pub fn pixel_values(&self, frame: &RgbImage) -> ((usize, usize), Vec<f32>) {
        let (h, w) = self.resized(frame.width(), frame.height());
        let resized;
        let img = if (w, h) == frame.dimensions() {
            frame
        } else {
            resized = resize_bicubic(frame, w, h);
            &resized
        };
        let (img_w, img_h) = (img.width() as i64, img.height() as i64);
        let (ch, cw) = self.crop.unwrap_or((h, w));
        // numpy `center_crop`: top = (h - ch) // 2 (floor), zero padding where it falls outside
        let top = (img_h - i64::from(ch)).div_euclid(2);
        let left = (img_w - i64::from(cw)).div_euclid(2);
        let (ch, cw) = (ch as usize, cw as usize);
        // level -> value per channel: rescale in f64 to f32 (`rescale`), then (x - mean) / std in
        // f32 (`normalize`)
        let table: Vec<[f32; 256]> = (0..3)
            .map(|c| {
                std::array::from_fn(|level| {
                    let x = match self.rescale {
                        Some(s) => (level as f64 * s) as f32,
                        None => level as f32,
                    };
                    match self.normalize {
                        Some((mean, std)) => (x - mean[c]) / std[c],
                        None => x,
                    }
                })
            })
            .collect();
        let mut out = vec![0f32; 3 * ch * cw];
        for y in 0..ch {
            let sy = top + y as i64;
            for x in 0..cw {
                let sx = left + x as i64;
                let inside = (0..img_h).contains(&sy) && (0..img_w).contains(&sx);
                let px = if inside {
                    img.get_pixel(sx as u32, sy as u32).0
                } else {
                    [0; 3]
                };
                for c in 0..3 {
                    out[(c * ch + y) * cw + x] = table[c][usize::from(px[c])];
                }
            }
        }
        ((ch, cw), out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pre(json: &str) -> Result<Preprocessor, String> {
        Preprocessor::new(&serde_json::from_str(json).map_err(|e| e.to_string())?)
    }

    #[test]
    fn old_and_new_configs_mean_the_same() {
        // CompVis/stable-diffusion-safety-checker's CLIPFeatureExtractor config and what
        // CLIPImageProcessor().save_pretrained writes in transformers 5.x
        let old = pre(
            r#"{"crop_size": 224, "do_center_crop": true, "do_normalize": true,
            "do_resize": true, "feature_extractor_type": "CLIPFeatureExtractor",
            "image_mean": [0.48145466, 0.4578275, 0.40821073],
            "image_std": [0.26862954, 0.26130258, 0.27577711], "resample": 3, "size": 224}"#,
        )
        .unwrap();
        let new = pre(
            r#"{"crop_size": {"height": 224, "width": 224}, "size": {"shortest_edge": 224},
            "rescale_factor": 0.00392156862745098, "image_processor_type": "CLIPImageProcessor"}"#,
        )
        .unwrap();
        assert_eq!(old, new);
        assert_eq!(
            new,
            Preprocessor::new(&PreprocessorConfig::default()).unwrap()
        );
        assert_eq!(new.output_size(), Some((224, 224)));
    }

    #[test]
    fn the_shorter_side_is_resized_and_the_longer_truncated() {
        let p = Preprocessor::new(&PreprocessorConfig::default()).unwrap();
        // int(224 · 960 / 544) = 395, int(224 · 640 / 360) = 398
        assert_eq!(p.resized(960, 544), (224, 395));
        assert_eq!(p.resized(360, 640), (398, 224));
        assert_eq!(p.resized(224, 224), (224, 224));
    }

    #[test]
    fn unsupported_settings_are_named() {
        let e = pre(r#"{"resample": 2}"#).unwrap_err();
        assert!(e.contains("resample 2"), "{e}");
        let e = pre(r#"{"size": {"shortest_edge": 224, "longest_edge": 300}}"#).unwrap_err();
        assert!(e.contains("longest_edge"), "{e}");
        let e = pre(r#"{"image_mean": [0.5, 0.5]}"#).unwrap_err();
        assert!(e.contains("image_mean has 2 values"), "{e}");
    }

    #[test]
    fn small_images_are_padded_with_zero_levels() {
        // no resize: a 2x1 white image centered in a 4x3 crop (numpy's center_crop pads it at
        // rows 1, columns 1..3)
        let p = pre(
            r#"{"do_resize": false, "crop_size": {"height": 3, "width": 4},
            "do_normalize": false}"#,
        )
        .unwrap();
        let img = RgbImage::from_pixel(2, 1, image::Rgb([255, 255, 255]));
        let ((h, w), v) = p.pixel_values(&img);
        assert_eq!((h, w), (3, 4));
        let ones: Vec<usize> = (0..12).filter(|&i| v[i] != 0.0).collect();
        assert_eq!(ones, vec![5, 6]);
        assert_eq!(v[5], 1.0);
    }
}
