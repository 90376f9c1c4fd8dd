//! SkyReels V1 generation: image (or text) to video frames, as diffusers'
//! `HunyuanSkyreelsImageToVideoPipeline` (I2V) and `HunyuanVideoPipeline` with true CFG (T2V)
//! compute it (docs/MODEL.md sections 4 and 5), with the project decisions: VAE posterior mean for the
//! image, center-crop before resizing, computed `crop_start`, CFG whenever guidance_scale > 1.
//!
//! <https://github.com/huggingface/diffusers/blob/v0.42.1/src/diffusers/pipelines/hunyuan_video/pipeline_hunyuan_skyreels_image2video.py#L481-L786>
//! <https://github.com/huggingface/diffusers/blob/v0.42.1/src/diffusers/pipelines/hunyuan_video/pipeline_hunyuan_video.py#L438-L738>

use crate::conditioning::{PromptEmbeds, TextEncoders, TextError};
use crate::loading::{load_transformer, load_transformer_resident, load_vae, LoadError};
use crate::lora::{Adapters, LoraError, Loras, Matched};
use crate::parallel::{self, Ranks, Step};
use crate::runtime::{gib, PeakMemory};
use crate::scheduler::{FlowMatchEuler, SchedulerConfig};
use candle_core::{DType, Device, Tensor};
use image::RgbImage;
use rand::SeedableRng;
use rand_distr::Distribution;
use skyreels_models::layers::default_score_budget;
use skyreels_models::{
    AutoencoderKLHunyuanVideo, HunyuanVideoTransformer3DModel, Tiling, TransformerConfig, VaeConfig,
};
use skyreels_params::{check_pixel_frames, TokenLayout, Ulysses, MAGCACHE_NEEDS_RATIOS};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

mod cfg_gate;
mod checks;
mod loras;
mod setup;

pub(crate) use cfg_gate::CfgGate;
pub use setup::Offload;
use setup::Resident;

pub use skyreels_models::{CacheSpec, MagRatios, StepCache};
pub use skyreels_params::{
    fit_image, GenerationDefaults, GenerationParams, DEFAULT_NEGATIVE_PROMPT,
};

#[derive(Debug, thiserror::Error)]
pub enum GenerateError {
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Text(#[from] TextError),
    #[error(transparent)]
    Load(#[from] LoadError),
    /// The model could not be had from the hub or its cache.
    #[error(transparent)]
    Hub(#[from] crate::hub::HubError),
    #[error("{0}")]
    Model(#[from] candle_core::Error),
    /// A LoRA of the request could not be applied (the message names it).
    #[error(transparent)]
    Lora(Box<LoraError>),
    #[error("cancelled")]
    Cancelled,
}

impl From<LoraError> for GenerateError {
    fn from(e: LoraError) -> Self {
        Self::Lora(Box::new(e))
    }
}

fn invalid<T>(msg: impl Into<String>) -> Result<T, GenerateError> {
    Err(GenerateError::Invalid(msg.into()))
}

/// Where each component of a pipeline lives.
#[derive(Debug, Clone)]
pub struct ModelPaths {
    /// A diffusers pipeline folder: tokenizers, text encoders, VAE and scheduler subfolders.
    pub pipeline: PathBuf,
    /// The transformer folder (the pipeline's `transformer/`, or a bare model folder) or a
    /// single `.safetensors` / `.gguf` checkpoint.
    pub transformer: PathBuf,
    /// A single-file transformer's `config.json` (else the config comes from its shapes).
    pub transformer_config: Option<PathBuf>,
    pub defaults: GenerationDefaults,
}

impl ModelPaths {
    /// A local diffusers pipeline folder (with `model_index.json`), optionally with the
    /// transformer taken from another folder. Components are found by their folder names, not by
    /// the class names in `model_index.json` (which differ across library versions).
    pub fn local(pipeline: &Path, transformer: Option<&Path>) -> Result<Self, GenerateError> {
        if !pipeline.is_dir() {
            return invalid(format!(
                "model folder {} does not exist",
                pipeline.display()
            ));
        }
        if !pipeline.join("model_index.json").is_file() {
            return invalid(format!(
                "{} is not a diffusers pipeline folder (no model_index.json)",
                pipeline.display()
            ));
        }
        let transformer = match transformer {
            Some(t) => t.to_path_buf(),
            None => pipeline.join("transformer"),
        };
        let defaults_file = pipeline.join("skyreels_defaults.json");
        let defaults = if defaults_file.is_file() {
            let text = std::fs::read_to_string(&defaults_file).map_err(|source| LoadError::Io {
                path: defaults_file.clone(),
                source,
            })?;
            serde_json::from_str(&text).map_err(|e| LoadError::Config {
                path: defaults_file,
                message: e.to_string(),
            })?
        } else {
            GenerationDefaults::default()
        };
        Ok(Self {
            pipeline: pipeline.to_path_buf(),
            transformer,
            transformer_config: None,
            defaults,
        })
    }
}

/// Time spent per stage, and on CUDA the peak device memory of each.
#[derive(Debug, Clone, Default)]
pub struct StageTimings {
    pub load: Duration,
    pub text_encoding: Duration,
    pub image_encoding: Duration,
    pub denoising: Duration,
    pub decoding: Duration,
    /// Peak bytes in use on the device per generation stage (CUDA only; see [`PeakMemory`]).
    pub peak_memory: Option<StagePeaks>,
    /// Per transformer forward, in order (the conditional before the unconditional one of a
    /// step): whether its blocks ran (false: served from the step cache, or an unconditional
    /// forward the CFG gate skipped).
    pub forward_decisions: Vec<bool>,
}

impl StageTimings {
    /// Transformer forwards whose blocks ran (true CFG: two forwards per step).
    pub fn forwards_computed(&self) -> usize {
        self.forward_decisions.iter().filter(|&&c| c).count()
    }

    /// Transformer forwards served from the step cache or skipped by the CFG gate.
    pub fn forwards_cached(&self) -> usize {
        self.forward_decisions.len() - self.forwards_computed()
    }

    /// The generation stages by the server's names, in order (the load is not one of them).
    pub fn stages(&self) -> Vec<(&'static str, Duration)> {
        vec![
            ("text_encoding", self.text_encoding),
            ("image_encoding", self.image_encoding),
            ("denoising", self.denoising),
            ("decoding", self.decoding),
        ]
    }
}

/// Peak device memory in bytes during each generation stage.
#[derive(Debug, Clone, Copy, Default)]
pub struct StagePeaks {
    /// With the text encoders loaded (they are released at its end).
    pub text_encoding: u64,
    pub image_encoding: u64,
    pub denoising: u64,
    pub decoding: u64,
}

impl std::fmt::Display for StagePeaks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "text encoding {:.1} GiB, image encoding {:.1} GiB, denoising {:.1} GiB, \
             VAE decoding {:.1} GiB",
            gib(self.text_encoding),
            gib(self.image_encoding),
            gib(self.denoising),
            gib(self.decoding)
        )
    }
}

/// The generated frames: (frames, height, width, 3) f32 in [0, 1], on the CPU.
#[derive(Debug)]
pub struct Video {
    pub frames: Tensor,
    pub timings: StageTimings,
    /// The prompt was cut to fit a text encoder.
    pub prompt_truncated: bool,
    /// The negative prompt (true CFG) was cut to fit a text encoder.
    pub negative_prompt_truncated: bool,
}

/// The VAE's dtype when none is asked for: f16 on CUDA (HunyuanVideo and SkyReels decode in fp16;
/// bf16 keeps 3 fewer mantissa bits), f32 elsewhere (the checkpoint's dtype, and the CPU's fast
/// kernels).
pub fn default_vae_dtype(device: &Device) -> DType {
    if device.is_cuda() {
        DType::F16
    } else {
        DType::F32
    }
}

/// The encoded prompt of one request, in the run dtype.
struct EncodedPrompt {
    positive: PromptEmbeds,
    negative: Option<PromptEmbeds>,
    prompt_truncated: bool,
    negative_prompt_truncated: bool,
}

/// A loaded pipeline: transformer and VAE resident; text encoders loaded per request and
/// released once the prompt is encoded.
pub struct Pipeline {
    paths: ModelPaths,
    transformer: Resident<HunyuanVideoTransformer3DModel>,
    vae: Resident<AutoencoderKLHunyuanVideo>,
    transformer_config: TransformerConfig,
    vae_config: VaeConfig,
    offload: Offload,
    /// `--parallel`: the other ranks' transformers (see [`crate::parallel`]); none by default.
    parallel: Ranks,
    /// Largest clip accepted, in pixel-frames (`--max-pixel-frames`); `None`: no limit.
    max_pixel_frames: Option<u64>,
    /// MagCache's magnitude ratios for this model (`--cache-ratios`); `None`: `magcache`
    /// requests are refused.
    cache_ratios: Option<MagRatios>,
    scheduler: SchedulerConfig,
    device: Device,
    dtype: DType,
    vae_dtype: DType,
    load_time: Duration,
    /// Parsed LoRA files and the transformer's layers to match them to.
    loras: Loras,
    /// The LoRAs of [`Pipeline::set_loras`], matched (for new ranks) and on the pipeline's
    /// device (attached to the transformer `--offload model` loads).
    matched: Matched,
    adapters: Adapters,
}

impl Pipeline {
    /// Ends a stage started at `start`: waits for the device's queued work, then returns the
    /// stage's time and its peak device memory (CUDA only).
    fn stage_end(
        &self,
        start: Instant,
        memory: &PeakMemory,
    ) -> Result<(Duration, Option<u64>), GenerateError> {
        self.device.synchronize()?;
        Ok((start.elapsed(), memory.take()))
    }

    /// Runs a request on `image` (None: text-to-video, the transformer must take only the latent
    /// channels), from `noise` when given (1, latent channels, latent frames, h / 8, w / 8; None:
    /// seeded by `p.seed`). `p.fps` is the export's, unused here. `on_step(done, total)` is
    /// called after each denoising step; returning false cancels the run. The stages carry the
    /// names of diffusers' `__call__`: `encode_prompt`, `encode_image` (I2V), `prepare_latents`,
    /// the denoising loop (`denoise`), `decode_latents`.
    pub fn generate(
        &self,
        p: &GenerationParams,
        image: Option<&RgbImage>,
        noise: Option<&Tensor>,
        on_step: &mut dyn FnMut(usize, usize) -> bool,
    ) -> Result<Video, GenerateError> {
        self.generate_with(p, image, noise, on_step, &mut || true)
    }

    /// [`Self::generate`], also asking `go_on()` after the denoising, before each VAE tile and
    /// once the frames are decoded: false cancels, so a cancel lands within a tile.
    pub fn generate_with(
        &self,
        p: &GenerationParams,
        image: Option<&RgbImage>,
        noise: Option<&Tensor>,
        on_step: &mut dyn FnMut(usize, usize) -> bool,
        go_on: &mut dyn FnMut() -> bool,
    ) -> Result<Video, GenerateError> {
        self.validate(p, image, noise)?;
        let caches = StepCache::pair(p.cache, p.steps, self.cache_ratios.as_ref())?;
        Ok(self
            .generate_cached(p, image, noise, on_step, go_on, caches)?
            .0)
    }

    /// One uncached run of a request that also measures MagCache's magnitude ratios of this
    /// model, per CFG branch, as diffusers' `MagCacheConfig(calibrate=True)` logs them (see
    /// [`StepCache::calibrating`]): what `--cache-ratios` then reads. Every forward must run,
    /// so a cache or a CFG gate in the request is refused.
    pub fn calibrate(
        &self,
        p: &GenerationParams,
        image: Option<&RgbImage>,
        noise: Option<&Tensor>,
        on_step: &mut dyn FnMut(usize, usize) -> bool,
    ) -> Result<(Video, MagRatios), GenerateError> {
        if p.cache != CacheSpec::None {
            return Err(GenerateError::Invalid(format!(
                "cache: a calibration runs every forward, so it takes no step cache (got {})",
                p.cache
            )));
        }
        if p.cfg_gate.is_some() {
            return Err(GenerateError::Invalid(
                "cfg_gate: a calibration runs every forward of both CFG branches, so it takes \
                 no CFG gate"
                    .into(),
            ));
        }
        self.validate(p, image, noise)?;
        let caches = [
            StepCache::calibrating(p.steps),
            StepCache::calibrating(p.steps),
        ];
        let (video, caches) =
            self.generate_cached(p, image, noise, on_step, &mut || true, caches)?;
        let measured = |c: &StepCache| c.calibrated().unwrap_or_default().to_vec();
        let cond = measured(&caches[0]);
        let uncond = Some(measured(&caches[1])).filter(|u| !u.is_empty());
        let ratios = MagRatios::calibrated(cond, uncond).map_err(GenerateError::Invalid)?;
        Ok((video, ratios))
    }

    /// [`Self::generate_with`] through the given branches' caches, which it hands back.
    fn generate_cached(
        &self,
        p: &GenerationParams,
        image: Option<&RgbImage>,
        noise: Option<&Tensor>,
        on_step: &mut dyn FnMut(usize, usize) -> bool,
        go_on: &mut dyn FnMut() -> bool,
        mut caches: [StepCache; 2],
    ) -> Result<(Video, [StepCache; 2]), GenerateError> {
        let mut timings = StageTimings {
            load: self.load_time,
            ..Default::default()
        };
        let memory = PeakMemory::start(&self.device);

        let start = Instant::now();
        let prompt = self.encode_prompt(p)?;
        let (elapsed, peak_text) = self.stage_end(start, &memory)?;
        timings.text_encoding = elapsed;

        let start = Instant::now();
        let shape = self.latent_shape(p);
        let image_latents = match image {
            Some(img) => Some(self.encode_image(img, p, &shape)?),
            None => None,
        };
        let (elapsed, peak_image) = self.stage_end(start, &memory)?;
        timings.image_encoding = elapsed;

        let start = Instant::now();
        let latents = self.prepare_latents(p, noise, &shape)?;
        let latents = self.denoise(
            p,
            latents,
            image_latents.as_ref(),
            &prompt,
            &mut caches,
            on_step,
        )?;
        let (elapsed, peak_denoise) = self.stage_end(start, &memory)?;
        timings.denoising = elapsed;
        timings.forward_decisions = StepCache::interleaved(&caches);

        let start = Instant::now();
        let frames = self.decode_latents(&latents, go_on)?;
        if !go_on() {
            return Err(GenerateError::Cancelled);
        }
        let (elapsed, peak_decode) = self.stage_end(start, &memory)?;
        timings.decoding = elapsed;
        timings.peak_memory = (|| {
            Some(StagePeaks {
                text_encoding: peak_text?,
                image_encoding: peak_image?,
                denoising: peak_denoise?,
                decoding: peak_decode?,
            })
        })();
        let video = Video {
            frames,
            timings,
            prompt_truncated: prompt.prompt_truncated,
            negative_prompt_truncated: prompt.negative_prompt_truncated,
        };
        Ok((video, caches))
    }

    /// diffusers' `encode_prompt`: the prompt and, for true CFG, the negative prompt, through
    /// both text encoders (loaded for this request and released at the end), in the run dtype.
    fn encode_prompt(&self, p: &GenerationParams) -> Result<EncodedPrompt, GenerateError> {
        let cfg = p.guidance_scale > 1.0;
        let negative = cfg.then(|| {
            p.negative_prompt
                .as_deref()
                .unwrap_or(self.paths.defaults.negative_prompt())
        });
        let encoders = TextEncoders::load(&self.paths.pipeline, self.dtype, &self.device)?;
        let cond = encoders.into_conditioning(&p.prompt, negative)?;
        let truncated = |e: &PromptEmbeds| e.truncated_llama[0] || e.truncated_clip[0];
        let prompt_truncated = truncated(&cond.prompt);
        let negative_prompt_truncated = cond.negative.as_ref().is_some_and(truncated);
        let to_run = |e: PromptEmbeds| -> candle_core::Result<PromptEmbeds> {
            Ok(PromptEmbeds {
                embeds: e.embeds.to_dtype(self.dtype)?,
                pooled: e.pooled.to_dtype(self.dtype)?,
                ..e
            })
        };
        Ok(EncodedPrompt {
            positive: to_run(cond.prompt)?,
            negative: cond.negative.map(to_run).transpose()?,
            prompt_truncated,
            negative_prompt_truncated,
        })
    }

    /// diffusers' `prepare_latents`: the initial noise (f32), seeded or given.
    ///
    /// <https://github.com/huggingface/diffusers/blob/58eb52c0803ea9af3abec60841c2a093bdf1f951/src/diffusers/pipelines/hunyuan_video/pipeline_hunyuan_skyreels_image2video.py#L417-L459>
    /// <https://github.com/huggingface/diffusers/blob/58eb52c0803ea9af3abec60841c2a093bdf1f951/src/diffusers/pipelines/hunyuan_video/pipeline_hunyuan_video.py#L387-L416>
    fn prepare_latents(
        &self,
        p: &GenerationParams,
        noise: Option<&Tensor>,
        shape: &[usize; 5],
    ) -> Result<Tensor, GenerateError> {
        Ok(match noise {
            Some(n) => n.to_dtype(DType::F32)?.to_device(&self.device)?,
            None => seeded_noise(shape, p.seed, &self.device)?,
        })
    }

    /// The denoising loop: flow-match Euler over the schedule, each step's velocity from
    /// [`guided_velocity`] through the branches' step caches and the request's CFG gate.
    fn denoise(
        &self,
        p: &GenerationParams,
        mut latents: Tensor,
        image_latents: Option<&Tensor>,
        prompt: &EncodedPrompt,
        caches: &mut [StepCache; 2],
        on_step: &mut dyn FnMut(usize, usize) -> bool,
    ) -> Result<Tensor, GenerateError> {
        let schedule = FlowMatchEuler::new(&self.scheduler.with_shift(p.flow_shift), p.steps);
        let transformer = self.transformer()?;
        let guidance = self.transformer_config.guidance_embeds.then(|| {
            // [g] in the transformer dtype, then × 1000 (also in that dtype)
            Tensor::new(&[p.embedded_guidance_scale as f32], &self.device)
                .and_then(|g| g.to_dtype(self.dtype))
                .and_then(|g| g.affine(1000.0, 0.0))
        });
        let guidance = guidance.transpose()?;
        let mut gate = CfgGate::new(p.cfg_gate, p.steps);
        for (i, &t) in schedule.timesteps().iter().enumerate() {
            let mut x = latents.to_dtype(self.dtype)?;
            if let Some(img) = image_latents {
                x = Tensor::cat(&[&x, img], 1)?;
            }
            // the timestep takes the latents' dtype (f32 at step 0, the model dtype after)
            let timestep = Tensor::new(&[t], &self.device)?.to_dtype(latents.dtype())?;
            let v = parallel::velocity(
                (&self.device, &transformer),
                &self.parallel,
                &Step {
                    index: i,
                    x: &x,
                    timestep: &timestep,
                    guidance: guidance.as_ref(),
                    riflex_freq_index: p.riflex_freq_index,
                },
                &prompt.positive,
                prompt.negative.as_ref(),
                p.guidance_scale,
                caches,
                &mut gate,
            )?;
            latents = schedule.step(i, &v, &latents)?;
            // GPU work is queued: wait for the step so progress reports finished steps
            self.device.synchronize()?;
            if !on_step(i + 1, schedule.steps()) {
                return Err(GenerateError::Cancelled);
            }
        }
        Ok(latents)
    }

    /// diffusers' `decode_latents` (+ the video processor's postprocess): latents / scaling
    /// factor through the VAE (asking `go_on` before each tile), `(x·0.5 + 0.5).clamp(0, 1)`, as
    /// (frames, h, w, 3) f32 on the CPU. The postprocess runs a few frames at a time, so the
    /// decoded clip is held once in the VAE dtype and once as f32 frames, not once per op.
    ///
    /// <https://github.com/huggingface/diffusers/blob/58eb52c0803ea9af3abec60841c2a093bdf1f951/src/diffusers/video_processor.py#L93-L118>
    fn decode_latents(
        &self,
        latents: &Tensor,
        go_on: &mut dyn FnMut() -> bool,
    ) -> Result<Tensor, GenerateError> {
        let z = (latents.to_dtype(self.vae_dtype)? / self.vae_config.scaling_factor)?;
        let video = self
            .vae()?
            .decode_until(&z, go_on)?
            .ok_or(GenerateError::Cancelled)?
            .squeeze(0)?;
        let (c, frames, h, w) = video.dims4()?;
        let mut out: Vec<f32> = Vec::with_capacity(video.elem_count());
        for f in (0..frames).step_by(POSTPROCESS_FRAMES) {
            // (x·0.5 + 0.5).clamp(0, 1) in the VAE dtype, then f32; (c, f, h, w) -> (f, h, w, c)
            let chunk = video
                .narrow(1, f, POSTPROCESS_FRAMES.min(frames - f))?
                .affine(0.5, 0.5)?
                .clamp(0f32, 1f32)?
                .to_dtype(DType::F32)?
                .permute((1, 2, 3, 0))?
                .flatten_all()?;
            out.extend(chunk.to_vec1::<f32>()?);
        }
        drop(video);
        Ok(Tensor::from_vec(out, (frames, h, w, c), &Device::Cpu)?)
    }

    /// The I2V conditioning latents (the SkyReels pipeline's image branch of `prepare_latents`):
    /// the prepared image through the VAE encoder (posterior mean) × scaling factor in latent
    /// frame 0, zeros after, in the transformer dtype.
    fn encode_image(
        &self,
        img: &RgbImage,
        p: &GenerationParams,
        shape: &[usize; 5],
    ) -> Result<Tensor, GenerateError> {
        let img = fit_image(img, p.width, p.height);
        let (w, h) = (img.width() as usize, img.height() as usize);
        let pixels: Vec<f32> = img.as_raw().iter().map(|&v| v as f32 / 255.0).collect();
        let x = Tensor::from_vec(pixels, (h, w, 3), &self.device)?
            .permute((2, 0, 1))?
            .affine(2.0, -1.0)?
            .reshape((1, 3, 1, h, w))?
            .to_dtype(self.vae_dtype)?;
        let posterior = self.vae()?.encode(&x)?;
        let first = (posterior.mode().to_dtype(DType::F32)? * self.vae_config.scaling_factor)?;
        let [b, c, t, lh, lw] = *shape;
        let rest = Tensor::zeros((b, c, t - 1, lh, lw), DType::F32, &self.device)?;
        Ok(Tensor::cat(&[&first, &rest], 2)?.to_dtype(self.dtype)?)
    }
}

/// Frames postprocessed at a time after the VAE decode.
const POSTPROCESS_FRAMES: usize = 8;

/// Standard normal f32 noise of `shape` from `seed` (ChaCha8 on the CPU, then moved): the same
/// seed gives the same noise on every device.
pub fn seeded_noise(shape: &[usize], seed: u64, device: &Device) -> candle_core::Result<Tensor> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let n: usize = shape.iter().product();
    let normal = rand_distr::StandardNormal;
    let values: Vec<f32> = (0..n).map(|_| normal.sample(&mut rng)).collect();
    Tensor::from_vec(values, shape, &Device::Cpu)?.to_device(device)
}

/// The velocity of one denoising step: the transformer on the prompt and, with true CFG (a
/// negative prompt), `v_neg + scale · (v − v_neg)` with the transformer on the negative prompt.
/// `caches` are the step caches of the conditional and the unconditional branch. RIFLEx off, no CFG gate.
#[allow(clippy::too_many_arguments)]
pub fn guided_velocity(
    transformer: &HunyuanVideoTransformer3DModel,
    x: &Tensor,
    timestep: &Tensor,
    positive: &PromptEmbeds,
    negative: Option<&PromptEmbeds>,
    guidance: Option<&Tensor>,
    scale: f64,
    caches: &mut [StepCache; 2],
) -> candle_core::Result<Tensor> {
    parallel::velocity(
        (transformer.device(), transformer),
        &Ranks::default(),
        &Step {
            index: 0,
            x,
            timestep,
            guidance,
            riflex_freq_index: 0,
        },
        positive,
        negative,
        scale,
        caches,
        &mut CfgGate::new(None, 1),
    )
}
