//! Setting a pipeline up: loading it (with `--offload` and `--parallel`), where its networks
//! stay between uses, and the clip sizes its device's memory takes.

use super::*;
use crate::lora::{attach, layer_dims};

/// Where the transformer and the VAE stay between uses (`--offload`). Every mode gives the same
/// numbers; the text encoders are always loaded per request and released before the denoising.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Offload {
    /// Both resident on the device.
    #[default]
    None,
    /// Each network on the device only while it runs: the transformer is loaded for the
    /// denoising loop and the VAE for image encoding and for decoding, each released after (their
    /// load time counts in those stages).
    Model,
    /// The transformer's blocks in host memory, each linear weight copied to the device right
    /// before it is used (fp8 and GGUF weights in their stored form); the rest resident.
    Blocks,
}

/// A network kept loaded, or (`Offload::Model`) loaded for each stage that runs it.
pub(super) enum Resident<T> {
    Loaded(T),
    OnDemand,
}

/// A network for one stage: the resident one, or one loaded for it.
pub(super) enum Held<'a, T> {
    Borrowed(&'a T),
    Owned(T),
}

impl<T> std::ops::Deref for Held<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        match self {
            Held::Borrowed(t) => t,
            Held::Owned(t) => t,
        }
    }
}

impl<T> Resident<T> {
    pub(super) fn get(
        &self,
        load: impl FnOnce() -> Result<T, LoadError>,
    ) -> Result<Held<'_, T>, LoadError> {
        Ok(match self {
            Resident::Loaded(t) => Held::Borrowed(t),
            Resident::OnDemand => Held::Owned(load()?),
        })
    }
}

impl Pipeline {
    /// Loads the transformer in `dtype` and the VAE in `vae_dtype` on `device` (see
    /// [`default_vae_dtype`]); the text encoders are checked now and loaded per request.
    pub fn load(
        paths: ModelPaths,
        dtype: DType,
        vae_dtype: DType,
        device: &Device,
    ) -> Result<Self, GenerateError> {
        Self::load_offloaded(paths, dtype, vae_dtype, device, Offload::None)
    }

    /// [`Pipeline::load`] with the transformer and VAE kept as `offload` says. With
    /// `Offload::Model` both are still loaded once now (every check runs at start-up), then
    /// released.
    pub fn load_offloaded(
        paths: ModelPaths,
        dtype: DType,
        vae_dtype: DType,
        device: &Device,
        offload: Offload,
    ) -> Result<Self, GenerateError> {
        let start = Instant::now();
        let scheduler = SchedulerConfig::from_dir(&paths.pipeline)?;
        let mut transformer = load_transformer_resident(
            &paths.transformer,
            paths.transformer_config.as_deref(),
            dtype,
            device,
            offload == Offload::Blocks,
        )?
        .0;
        let layers = layer_dims(&mut transformer)?;
        let vae = load_vae(&paths.pipeline, vae_dtype, device)?;
        let transformer_config = transformer.config().clone();
        let vae_config = vae.config().clone();
        let (transformer, vae) = if offload == Offload::Model {
            (Resident::OnDemand, Resident::OnDemand)
        } else {
            (Resident::Loaded(transformer), Resident::Loaded(vae))
        };
        let (t, v) = (&transformer_config, &vae_config);
        if t.out_channels() != v.latent_channels {
            return invalid(format!(
                "the transformer predicts {} channels but the VAE has {} latent channels",
                t.out_channels(),
                v.latent_channels
            ));
        }
        if t.in_channels != v.latent_channels && t.in_channels != 2 * v.latent_channels {
            return invalid(format!(
                "the transformer takes {} input channels; expected {} (text-to-video) or {} (image-to-video)",
                t.in_channels,
                v.latent_channels,
                2 * v.latent_channels
            ));
        }
        // validate the tokenizers and text encoder configs now, not at the first request
        let widths = TextEncoders::check(&paths.pipeline)?;
        if (t.text_embed_dim, t.pooled_projection_dim) != (widths.text, widths.pooled) {
            return invalid(format!(
                "the transformer takes text states of width {} and a pooled vector of {}, but \
                 the pipeline's text encoders give {} and {}",
                t.text_embed_dim, t.pooled_projection_dim, widths.text, widths.pooled
            ));
        }
        Ok(Self {
            paths,
            transformer,
            vae,
            transformer_config,
            vae_config,
            offload,
            parallel: Ranks::default(),
            max_pixel_frames: None,
            cache_ratios: None,
            scheduler,
            device: device.clone(),
            dtype,
            vae_dtype,
            load_time: start.elapsed(),
            loras: Loras::new(layers),
            matched: Matched::default(),
            adapters: Adapters::default(),
        })
    }

    pub fn paths(&self) -> &ModelPaths {
        &self.paths
    }

    pub fn offload(&self) -> Offload {
        self.offload
    }

    /// One clip on several devices: `groups` are the device groups of the CFG branches (one, or
    /// two with CFG-parallel: the unconditional branch of every true-CFG step runs on the second
    /// group at the same time as the conditional one on the first), each of U devices that share
    /// the video tokens with Ulysses sequence parallelism. The first group's first device is the
    /// pipeline's own (its transformer is rank 0); a copy of the transformer is loaded on every
    /// other device. The numbers are the single-device ones (f32: to rounding, see the tests).
    pub fn with_parallel(mut self, groups: &[Vec<Device>]) -> Result<Self, GenerateError> {
        let u = groups.first().map_or(0, Vec::len);
        if !(1..=2).contains(&groups.len()) || u == 0 || groups.iter().any(|g| g.len() != u) {
            return invalid(
                "a parallel layout is one or two groups (CFG branches) of as many devices each",
            );
        }
        if self.offload == Offload::Model {
            return invalid("a parallel layout keeps a transformer on each device: it does not combine with --offload model");
        }
        let heads = self.transformer_config.num_attention_heads;
        if !heads.is_multiple_of(u) {
            return invalid(format!(
                "ulysses={u}: the degree must divide the transformer's {heads} attention heads"
            ));
        }
        let load = |device: &Device| -> Result<_, GenerateError> {
            let (mut model, _) = load_transformer_resident(
                &self.paths.transformer,
                self.paths.transformer_config.as_deref(),
                self.dtype,
                device,
                self.offload == Offload::Blocks,
            )?;
            // the LoRAs chosen so far, on this rank's device
            attach(
                &mut model,
                &self.adapters_on(&self.matched, &self.adapters, device)?,
            );
            Ok((device.clone(), model))
        };
        let cond = groups[0][1..].iter().map(load).collect::<Result<_, _>>()?;
        let uncond = match groups.get(1) {
            Some(g) => g.iter().map(load).collect::<Result<_, _>>()?,
            None => vec![],
        };
        self.parallel = Ranks::new(&self.device, cond, uncond)?;
        Ok(self)
    }

    /// Every device the transformer runs on, the pipeline's first.
    pub fn devices(&self) -> Vec<Device> {
        let mut v = vec![self.device.clone()];
        v.extend(self.parallel.devices().cloned());
        v
    }

    /// The transformer for a stage (loaded for it with `Offload::Model`).
    pub(super) fn transformer(
        &self,
    ) -> Result<Held<'_, HunyuanVideoTransformer3DModel>, LoadError> {
        self.transformer.get(|| {
            let mut model = load_transformer(
                &self.paths.transformer,
                self.paths.transformer_config.as_deref(),
                self.dtype,
                &self.device,
            )?;
            attach(&mut model, &self.adapters);
            Ok(model)
        })
    }

    /// The VAE for a stage (loaded for it with `Offload::Model`).
    pub(super) fn vae(&self) -> Result<Held<'_, AutoencoderKLHunyuanVideo>, LoadError> {
        self.vae
            .get(|| load_vae(&self.paths.pipeline, self.vae_dtype, &self.device))
    }

    /// Frequencies of the transformer's temporal RoPE axis (`rope_axes_dim[0] / 2`): the
    /// largest RIFLEx index a request may name.
    pub fn temporal_rope_frequencies(&self) -> usize {
        self.transformer_config.rope_axes_dim[0] / 2
    }

    /// Whether the transformer takes an image (I2V: latents and image latents on channels).
    pub fn is_image_to_video(&self) -> bool {
        self.transformer_config.in_channels == 2 * self.vae_config.latent_channels
    }

    /// Pixels per latent cell (VAE) times the transformer's patch: sizes must be multiples.
    pub fn size_multiple(&self) -> usize {
        self.vae_config.spatial_compression_ratio * self.transformer_config.patch_size
    }

    /// How this model cuts a clip into video tokens.
    pub fn token_layout(&self) -> TokenLayout {
        TokenLayout {
            spatial_compression: self.vae_config.spatial_compression_ratio,
            temporal_compression: self.vae_config.temporal_compression_ratio,
            patch_size: self.transformer_config.patch_size,
            patch_size_t: self.transformer_config.patch_size_t,
        }
    }

    /// The Ulysses layout a request must fit (`--parallel ulysses=N`, N > 1), if any.
    pub fn ulysses(&self) -> Option<Ulysses> {
        let degree = self.parallel.ulysses();
        (degree > 1).then(|| Ulysses {
            degree,
            layout: self.token_layout(),
        })
    }

    /// Refuses clips of more than `limit` pixel-frames (width x height x frames) before they
    /// run; `None`: no limit.
    pub fn set_max_pixel_frames(&mut self, limit: Option<u64>) {
        self.max_pixel_frames = limit;
    }

    pub fn max_pixel_frames(&self) -> Option<u64> {
        self.max_pixel_frames
    }

    /// Sets the model's MagCache magnitude ratios (`--cache-ratios`), which `magcache` requests
    /// use; `None`: such requests are refused.
    pub fn set_cache_ratios(&mut self, ratios: Option<MagRatios>) {
        self.cache_ratios = ratios;
    }

    /// Estimated device bytes a clip needs beyond the resident weights, per pixel-frame: a
    /// transformer block's live activations per video token (the residual streams, q, k, v,
    /// the attention output and the MLP's hidden layer, in the run dtype) spread over the
    /// pixel-frames of a token, plus the decoded clip (the VAE's output tiles, their blend and
    /// the merged clip in the VAE dtype, then the f32 frames).
    fn bytes_per_pixel_frame(&self) -> f64 {
        let (t, v) = (&self.transformer_config, &self.vae_config);
        let width = t.num_attention_heads * t.attention_head_dim;
        let per_token = ((6 * width + 2 * t.mlp_dim()) * self.dtype.size_in_bytes()) as f64;
        let side = v.spatial_compression_ratio * t.patch_size;
        let pixels_per_token = (side * side * v.temporal_compression_ratio * t.patch_size_t) as f64;
        let decoded = v.out_channels * (3 * self.vae_dtype.size_in_bytes() + 4);
        per_token / pixels_per_token + decoded as f64
    }

    /// Estimated device bytes any clip needs beyond the resident weights: one VAE tile through
    /// the decoder's full-resolution layers (a few activations of its widest channel count)
    /// and the attention's score budget.
    fn fixed_bytes(&self) -> u64 {
        let tl = Tiling::default();
        let tile = tl.tile_sample_min_height
            * tl.tile_sample_min_width
            * (tl.tile_sample_min_num_frames + 1);
        let channels = self.vae_config.block_out_channels.iter().max().copied();
        let vae = 4 * tile * channels.unwrap_or(0) * self.vae_dtype.size_in_bytes();
        (vae + 4 * default_score_budget(&self.device)) as u64
    }

    /// Estimated peak device bytes of a clip beyond the resident weights.
    pub fn estimate_clip_bytes(&self, height: usize, width: usize, num_frames: usize) -> u64 {
        let n = skyreels_params::pixel_frames(height, width, num_frames) as f64;
        self.fixed_bytes() + (n * self.bytes_per_pixel_frame()) as u64
    }

    /// The largest clip, in pixel-frames, whose estimated peak ([`Self::estimate_clip_bytes`])
    /// fits in three quarters of `free` bytes (the rest left for what the estimate misses).
    pub fn pixel_frames_fitting(&self, free: u64) -> u64 {
        let budget = (free / 4 * 3).saturating_sub(self.fixed_bytes());
        (budget as f64 / self.bytes_per_pixel_frame()) as u64
    }
}
