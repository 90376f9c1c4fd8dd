//! What a request must fit before any work: its sizes and mode against this pipeline, and the
//! latent shape it makes.

use super::*;

impl Pipeline {
    /// Checks a request's sizes and mode, with its image (None: text-to-video) and its noise
    /// (None: seeded); the messages name the offending setting.
    pub fn validate(
        &self,
        p: &GenerationParams,
        image: Option<&RgbImage>,
        noise: Option<&Tensor>,
    ) -> Result<(), GenerateError> {
        let m = self.size_multiple();
        for (name, v) in [("height", p.height), ("width", p.width)] {
            if v == 0 || !v.is_multiple_of(m) {
                return invalid(format!(
                    "{name} must be a positive multiple of {m}, got {v}"
                ));
            }
        }
        let t = self.vae_config.temporal_compression_ratio;
        if p.num_frames == 0 || !(p.num_frames - 1).is_multiple_of(t) {
            return invalid(format!(
                "num_frames must be {t}k+1 (1, {}, {}, ...), got {}",
                t + 1,
                2 * t + 1,
                p.num_frames
            ));
        }
        if p.steps == 0 {
            return invalid("steps must be at least 1");
        }
        if let Some(s) = p.flow_shift.filter(|s| !(s.is_finite() && *s > 0.0)) {
            return invalid(format!("flow_shift must be a finite number > 0, got {s}"));
        }
        for (name, v) in [
            ("guidance_scale", p.guidance_scale),
            ("embedded_guidance_scale", p.embedded_guidance_scale),
        ] {
            if !v.is_finite() || v < 0.0 {
                return invalid(format!("{name} must be a finite number >= 0, got {v}"));
            }
        }
        match (self.is_image_to_video(), image) {
            (true, None) => return invalid("this model is image-to-video: an image is required"),
            (false, Some(_)) => return invalid("this model is text-to-video: it takes no image"),
            _ => {}
        }
        let frequencies = self.temporal_rope_frequencies();
        if p.riflex_freq_index > frequencies {
            return invalid(format!(
                "riflex_freq_index must be from 0 (off) to {frequencies} (this transformer's \
                 temporal RoPE frequencies), got {}",
                p.riflex_freq_index
            ));
        }
        if matches!(p.cache, CacheSpec::MagCache(_)) && self.cache_ratios.is_none() {
            return invalid(format!("cache: {MAGCACHE_NEEDS_RATIOS}"));
        }
        if let Some(u) = self.ulysses() {
            u.check(p.height, p.width, p.num_frames, p.cache)
                .or_else(|(field, rule)| invalid(format!("{field}: {rule}")))?;
        }
        if let Some(limit) = self.max_pixel_frames {
            check_pixel_frames(p.height, p.width, p.num_frames, limit).or_else(invalid)?;
        }
        if let Some(noise) = noise {
            let want = self.latent_shape(p);
            if noise.dims() != want {
                return invalid(format!(
                    "noise has shape {:?}; this request needs {want:?}",
                    noise.dims()
                ));
            }
        }
        Ok(())
    }

    /// (1, latent channels, latent frames, h, w) of a request.
    pub fn latent_shape(&self, p: &GenerationParams) -> [usize; 5] {
        let v = &self.vae_config;
        [
            1,
            v.latent_channels,
            (p.num_frames - 1) / v.temporal_compression_ratio + 1,
            p.height / v.spatial_compression_ratio,
            p.width / v.spatial_compression_ratio,
        ]
    }
}
