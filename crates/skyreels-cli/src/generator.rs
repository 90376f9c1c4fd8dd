//! The real pipeline behind the server's `Generator` trait: one per worker device (or
//! `--parallel` group), loaded on its worker thread, applying each request's LoRAs.

use crate::devices::{self, DeviceSpec};
use crate::serve::{I2V_MODEL_ID, T2V_MODEL_ID};
use crate::{hub_options, load_pipeline, model_paths, worker_groups, ModelArgs};
use anyhow::Result;
use skyreels_pipeline::export::write_output;
use skyreels_pipeline::generate::{GenerateError, ModelPaths, Pipeline};
use skyreels_pipeline::hub::{fetch_file, HubOptions};
use skyreels_pipeline::lora::{LoraErrorKind, LoraFile};
use skyreels_pipeline::runtime::{free_memory, gib};
use skyreels_pipeline::safety::SafetyChecker;
use skyreels_server::generator::{
    GenerateFailure, Generated, Generator, GeneratorLoader, Input, LoraOutcome, LoraSource,
    ModelInfo,
};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// The pipeline behind the server's generator trait (its `--max-pixel-frames` set).
struct PipelineGenerator {
    pipeline: Pipeline,
    /// Where hub LoRAs are fetched from (the model's hub cache and `--offline`).
    hub: HubOptions,
    /// The safety checker (`--safety-checker`), if any.
    safety: Option<Safety>,
}

/// The safety checker a worker loads (`--safety-checker`) and the frames of each video it
/// looks at (`--safety-frames`).
#[derive(Clone, Debug)]
pub(crate) struct SafetySettings {
    pub source: String,
    pub frames: usize,
}

/// A loaded checker with its settings.
struct Safety {
    checker: SafetyChecker,
    settings: SafetySettings,
}

impl Generator for PipelineGenerator {
    fn models(&self) -> Vec<ModelInfo> {
        let d = &self.pipeline.paths().defaults;
        let i2v = self.pipeline.is_image_to_video();
        vec![ModelInfo {
            id: if i2v { I2V_MODEL_ID } else { T2V_MODEL_ID }.into(),
            image_to_video: i2v,
            defaults: d.clone(),
            size_multiple: self.pipeline.size_multiple(),
            max_pixel_frames: self
                .pipeline
                .max_pixel_frames()
                .unwrap_or(skyreels_params::FALLBACK_MAX_PIXEL_FRAMES),
            ulysses: self.pipeline.ulysses(),
            temporal_rope_frequencies: self.pipeline.temporal_rope_frequencies(),
            safety_checker: self
                .safety
                .as_ref()
                .map(|s| shown_source(&s.settings.source)),
        }]
    }

    fn generate(
        &mut self,
        input: &Input,
        output: &Path,
        progress: &mut dyn FnMut(usize, usize) -> bool,
    ) -> Result<Generated, GenerateFailure> {
        let req = &input.params;
        let loras = self.apply_loras(input)?;
        // asked again (with the last step's numbers) between VAE tiles and before the export
        let progress = std::cell::RefCell::new(progress);
        let steps = req.steps;
        let video = self
            .pipeline
            .generate_with(
                req,
                input.image.as_ref(),
                None,
                &mut |done, total| (progress.borrow_mut())(done, total),
                &mut || (progress.borrow_mut())(steps, steps),
            )
            .map_err(|e| match e {
                GenerateError::Cancelled => GenerateFailure::Cancelled,
                GenerateError::Invalid(m) => GenerateFailure::InvalidInput(m),
                e => GenerateFailure::Failed(e.to_string()),
            })?;
        let mut stages = video.timings.stages();
        // a video the checker cannot look at fails: nothing is served unchecked
        let nsfw = match self.safety.as_ref().filter(|_| input.safety_check) {
            Some(s) => {
                let start = Instant::now();
                let verdict = s
                    .checker
                    .check_video(&video.frames, s.settings.frames)
                    .map_err(|e| GenerateFailure::Failed(format!("safety checker: {e}")))?;
                stages.push(("safety_check", start.elapsed()));
                Some(verdict.flagged)
            }
            None => None,
        };
        let start = Instant::now();
        // the output path ends in .mp4: H.264 at the default bitrate
        write_output(output, &video.frames, req.fps, None)
            .map_err(|e| GenerateFailure::Failed(e.to_string()))?;
        let t = video.timings;
        if let Some(peaks) = &t.peak_memory {
            tracing::info!(%peaks, "peak device memory per stage");
        }
        stages.push(("export", start.elapsed()));
        Ok(Generated {
            stages,
            counts: vec![
                ("forwards_computed", t.forwards_computed() as u64),
                ("forwards_cached", t.forwards_cached() as u64),
            ],
            loras,
            nsfw,
        })
    }
}

impl PipelineGenerator {
    /// Sets the pipeline's adapters to the input's LoRAs (none: the plain transformer) and
    /// reports each one's unmatched keys and cache hit, in order. Each is labelled by the
    /// request's index and path (a URL without credentials or query) in the messages.
    fn apply_loras(&mut self, input: &Input) -> Result<Vec<LoraOutcome>, GenerateFailure> {
        let files = input
            .params
            .loras
            .iter()
            .zip(&input.loras)
            .enumerate()
            .map(|(i, (spec, source))| {
                let label = format!("loras[{i}] {}", skyreels_server::loras::shown(&spec.path));
                // a hub LoRA is fetched into (or found in) the hub cache
                let path = match source {
                    LoraSource::File(path) => path.clone(),
                    LoraSource::Hub { repo, file } => fetch_file(repo, file, &self.hub)
                        .map_err(|e| GenerateFailure::Failed(format!("{label}: {e}")))?,
                };
                Ok(LoraFile {
                    label,
                    path,
                    scale: spec.scale,
                })
            })
            .collect::<Result<Vec<_>, GenerateFailure>>()?;
        // also with none: the previous task's adapters go, the plain transformer runs
        let report = self.pipeline.set_loras(&files).map_err(|e| match e {
            // the file the client named is not a LoRA this transformer takes
            GenerateError::Lora(l)
                if !matches!(l.kind, LoraErrorKind::Io { .. } | LoraErrorKind::Tensor(_)) =>
            {
                GenerateFailure::InvalidInput(l.to_string())
            }
            e => GenerateFailure::Failed(e.to_string()),
        })?;
        Ok(report
            .applied
            .into_iter()
            .map(|a| LoraOutcome {
                unmatched_keys: a.unmatched_keys,
                cache_hit: a.cache_hit,
            })
            .collect())
    }
}

/// One generator loader per --device entry (or --parallel group), the first `count`, each
/// refusing clips beyond `max_pixel_frames` (default: sized to its device, see
/// [`pixel_frame_limit`]), keeping `lora_cache_bytes` of parsed LoRA adapters and loading the
/// `safety` checker (on the worker's first device, in f32).
pub(crate) fn loaders(
    model: ModelArgs,
    count: usize,
    max_pixel_frames: Option<u64>,
    lora_cache_bytes: u64,
    safety: Option<SafetySettings>,
) -> Result<Vec<GeneratorLoader>> {
    if max_pixel_frames == Some(0) {
        anyhow::bail!("--max-pixel-frames must be at least 1");
    }
    let model = Arc::new(model);
    // the model's files are resolved (downloaded) once, by the first worker to get there
    let paths: Arc<Mutex<Option<ModelPaths>>> = Arc::default();
    let mut loaders: Vec<GeneratorLoader> = Vec::new();
    let groups: Vec<_> = worker_groups(&model)?.into_iter().take(count).collect();
    // the CPU workers share the host's memory
    let is_cpu = |g: &[DeviceSpec]| matches!(g.first(), Some(DeviceSpec::Cpu(_)));
    let cpu_workers = groups.iter().filter(|g| is_cpu(g)).count().max(1);
    for group in groups {
        let sharing = if is_cpu(&group) { cpu_workers } else { 1 };
        let names = group
            .iter()
            .map(|d| d.to_string())
            .collect::<Vec<_>>()
            .join(",");
        let devices = group
            .into_iter()
            .map(devices::open)
            .collect::<Result<Vec<_>>>()?;
        let (model, paths, safety) = (model.clone(), paths.clone(), safety.clone());
        loaders.push(Box::new(move || -> Result<Box<dyn Generator>, String> {
            let paths = {
                let mut resolved = paths.lock().unwrap_or_else(|p| p.into_inner());
                if resolved.is_none() {
                    *resolved = Some(model_paths(&model).map_err(|e| format!("{e:#}"))?);
                }
                resolved.clone().expect("just resolved")
            };
            tracing::info!(device = %names, pipeline = %paths.pipeline.display(), transformer = %paths.transformer.display(), "loading the model");
            let mut pipeline =
                load_pipeline(&model, paths, &devices).map_err(|e| format!("{names}: {e}"))?;
            let limit = max_pixel_frames.unwrap_or_else(|| pixel_frame_limit(&pipeline, sharing));
            pipeline.set_max_pixel_frames(Some(limit));
            let d = &pipeline.paths().defaults;
            tracing::info!(
                device = %names,
                max_pixel_frames = limit,
                default_clip_gib = gib(pipeline.estimate_clip_bytes(d.height, d.width, d.num_frames)),
                "largest clip taken (--max-pixel-frames)"
            );
            pipeline.set_lora_cache_bytes(usize::try_from(lora_cache_bytes).unwrap_or(usize::MAX));
            tracing::info!(
                device = %names,
                lora_cache_mib = lora_cache_bytes >> 20,
                "LoRA adapter cache (--lora-cache-mb)"
            );
            let hub = HubOptions {
                // a server logs; no progress bars on its stderr
                progress: false,
                ..hub_options(&model)
            };
            let safety = safety
                .map(|settings| load_safety(settings, &hub, &devices[0], &names))
                .transpose()?;
            Ok(Box::new(PipelineGenerator {
                pipeline,
                hub,
                safety,
            }))
        }));
    }
    Ok(loaders)
}

/// A checker as `/api/v3/models` names it: a hub repo id as given, a local folder by its last
/// component (the server's paths stay its own).
fn shown_source(source: &str) -> String {
    let path = Path::new(source);
    match path.file_name().filter(|_| path.exists()) {
        Some(name) => name.to_string_lossy().into_owned(),
        None => source.to_string(),
    }
}

/// Loads a worker's safety checker (f32: its thresholds are sharp, and it is small next to the
/// model); the message names the source and what is missing.
fn load_safety(
    settings: SafetySettings,
    hub: &HubOptions,
    device: &candle_core::Device,
    names: &str,
) -> Result<Safety, String> {
    let start = Instant::now();
    let checker = SafetyChecker::load(&settings.source, hub, device, candle_core::DType::F32)
        .map_err(|e| format!("{names}: --safety-checker {}: {e}", settings.source))?;
    tracing::info!(
        device = %names,
        checker = %settings.source,
        frames = settings.frames,
        seconds = start.elapsed().as_secs_f64(),
        "safety checker loaded (--safety-checker, --safety-frames)"
    );
    Ok(Safety { checker, settings })
}

/// The default `--max-pixel-frames` of a loaded pipeline: the clip that fits its device's free
/// memory (shared by `sharing` workers), else [`skyreels_params::FALLBACK_MAX_PIXEL_FRAMES`].
fn pixel_frame_limit(pipeline: &Pipeline, sharing: usize) -> u64 {
    match free_memory(&pipeline.devices()[0]) {
        Some(free) => pipeline.pixel_frames_fitting(free / sharing as u64).max(1),
        None => skyreels_params::FALLBACK_MAX_PIXEL_FRAMES,
    }
}
