//! `skyreels`: SkyReels V1 video generation.

#![forbid(unsafe_code)]

mod bench;
mod devices;
mod generate;
mod generator;
mod serve;
mod tiny;

use anyhow::{bail, Context, Result};
use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device, Tensor};
use clap::{Args, Parser, Subcommand, ValueEnum};
use devices::{Devices, Parallel};
use indicatif::{ProgressBar, ProgressStyle};
use skyreels_params as params;
use skyreels_pipeline::export::{write_output, OutputKind};
use skyreels_pipeline::generate::{
    default_vae_dtype, GenerateError, GenerationParams, MagRatios, ModelPaths, Offload, Pipeline,
    StageTimings,
};
use skyreels_pipeline::hub::{HubOptions, ModelSpec, Source};
use skyreels_pipeline::lora::{resolve_lora_path, LoraFile};
use skyreels_server::media;
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(Parser)]
#[command(
    name = "skyreels",
    version,
    about = "SkyReels V1 (HunyuanVideo) image/text-to-video"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate one video from an image (or text) and a prompt.
    Generate(Box<generate::GenerateArgs>),
    /// Measure MagCache's magnitude ratios of a model: one uncached `generate` run (same flags;
    /// the clip is written to --output too) whose per-step ratios, per CFG branch, go to
    /// --ratios as diffusers' MagCacheConfig(calibrate=True) computes them; then pass that file
    /// as --cache-ratios with --cache magcache:... Calibrate at the step count, size and
    /// guidance you serve (other step counts are interpolated).
    CalibrateCache(Box<generate::CalibrateArgs>),
    /// Serve the WaveSpeed-compatible HTTP API (`/api/v3/wavespeed-ai/SkyReels-V1`).
    Serve(Box<serve::ServeArgs>),
    /// Run workers of a Redis deployment (`serve --redis` nodes take the requests): one per
    /// --device entry, each taking tasks from the shared queue; no HTTP but --metrics-port.
    Worker(Box<serve::WorkerArgs>),
    /// Download a model's files into the Hugging Face cache (only what a run needs).
    Download(DownloadArgs),
    /// Time the stages on random weights at SkyReels' real size (GPU benchmark; no checkpoint).
    Bench(Box<bench::BenchArgs>),
    /// Write a single-file transformer checkpoint (.safetensors in bf16/fp16/f32/fp8, either key
    /// layout, or a .gguf) as a GGUF that `--transformer` loads and keeps quantized in memory.
    Quantize(QuantizeArgs),
}

#[derive(Args)]
struct QuantizeArgs {
    /// The checkpoint to read: one .safetensors or .gguf file.
    input: PathBuf,
    /// The GGUF to write (architecture "hyvid", the input's key names).
    output: PathBuf,
    /// The type of the 2-D matmul weights; every other tensor is written in F32. A K-quant falls
    /// back per tensor (Q4_K to Q5_0, Q5_K to Q5_1, Q6_K to Q8_0) when a row is not a whole
    /// number of 256-element super-blocks.
    #[arg(long = "type", value_enum, default_value = "Q8_0")]
    ggml_type: GgmlTypeArg,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum GgmlTypeArg {
    #[value(name = "Q8_0", alias = "q8_0")]
    Q8_0,
    #[value(name = "Q6_K", alias = "q6_k")]
    Q6K,
    #[value(name = "Q5_K", alias = "q5_k")]
    Q5K,
    #[value(name = "Q4_K", alias = "q4_k")]
    Q4K,
    #[value(name = "Q5_0", alias = "q5_0")]
    Q5_0,
    #[value(name = "Q5_1", alias = "q5_1")]
    Q5_1,
    #[value(name = "Q4_0", alias = "q4_0")]
    Q4_0,
    #[value(name = "Q4_1", alias = "q4_1")]
    Q4_1,
    #[value(name = "F16", alias = "f16")]
    F16,
    #[value(name = "BF16", alias = "bf16")]
    Bf16,
}

impl GgmlTypeArg {
    fn ggml(self) -> GgmlDType {
        match self {
            Self::Q8_0 => GgmlDType::Q8_0,
            Self::Q6K => GgmlDType::Q6K,
            Self::Q5K => GgmlDType::Q5K,
            Self::Q4K => GgmlDType::Q4K,
            Self::Q5_0 => GgmlDType::Q5_0,
            Self::Q5_1 => GgmlDType::Q5_1,
            Self::Q4_0 => GgmlDType::Q4_0,
            Self::Q4_1 => GgmlDType::Q4_1,
            Self::F16 => GgmlDType::F16,
            Self::Bf16 => GgmlDType::BF16,
        }
    }
}

fn quantize(args: QuantizeArgs) -> Result<()> {
    let report = skyreels_pipeline::single_file::quantize_to_gguf(
        &args.input,
        &args.output,
        args.ggml_type.ggml(),
    )?;
    let types: Vec<String> = report
        .types
        .iter()
        .map(|(name, n)| format!("{n} {name}"))
        .collect();
    println!(
        "wrote {} ({:.1} MB from {:.1} MB): {} tensors",
        args.output.display(),
        report.bytes_out as f64 / 1e6,
        report.bytes_in as f64 / 1e6,
        types.join(", ")
    );
    Ok(())
}

#[derive(Args)]
struct DownloadArgs {
    /// A preset (skyreels-v1-i2v, skyreels-v1-t2v) or a diffusers pipeline repo id.
    #[arg(long, default_value = "skyreels-v1-i2v")]
    model: String,
    /// A transformer repo id (or folder) replacing the pipeline's own, or one checkpoint file
    /// of a repo (REPO_ID/FILE.safetensors or .gguf).
    #[arg(long)]
    transformer: Option<String>,
    /// Hugging Face cache folder [default: $HF_HOME/hub or ~/.cache/huggingface/hub].
    #[arg(long, env = "HF_HUB_CACHE")]
    cache_dir: Option<PathBuf>,
    /// Also a safety checker repo for `serve --safety-checker` (its configs and
    /// model.safetensors), e.g. CompVis/stable-diffusion-safety-checker.
    #[arg(long, value_name = "REPO_ID")]
    safety_checker: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, ValueEnum)]
pub(crate) enum OffloadArg {
    None,
    Model,
    Blocks,
}

impl From<OffloadArg> for Offload {
    fn from(o: OffloadArg) -> Self {
        match o {
            OffloadArg::None => Offload::None,
            OffloadArg::Model => Offload::Model,
            OffloadArg::Blocks => Offload::Blocks,
        }
    }
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub(crate) enum DtypeArg {
    F32,
    Bf16,
    F16,
}

/// Which model to load and where to run it.
#[derive(Args)]
pub(crate) struct ModelArgs {
    /// A preset (skyreels-v1-i2v, skyreels-v1-t2v), a Hugging Face repo id of a diffusers pipeline,
    /// or a local pipeline folder (model_index.json + subfolders). Without it, the tiny
    /// random-weight pipeline bundled in this binary is used (its output is noise).
    #[arg(long, env = "SKYREELS_MODEL")]
    model: Option<String>,
    /// Take the transformer from this folder or repo id instead (the Skywork repos keep it at
    /// the root), or from one checkpoint file: a .safetensors (bf16, fp16, f32, fp8 e4m3fn or
    /// ComfyUI's scaled fp8) or a .gguf (Q8_0, Q6_K, Q5_K, Q4_K, Q5_0, Q4_0, ...), local or
    /// REPO_ID/FILE from the hub, in diffusers' or the original HunyuanVideo key layout. fp8 and
    /// GGUF weights stay in that form in memory and are expanded one layer at a time.
    #[arg(long, env = "SKYREELS_TRANSFORMER")]
    transformer: Option<String>,
    /// The config.json (or a folder with one) of a single-file --transformer; without it the
    /// config is read off the tensor shapes.
    #[arg(long, env = "SKYREELS_TRANSFORMER_CONFIG")]
    config: Option<PathBuf>,
    /// Use only the Hugging Face cache, never the network (also HF_HUB_OFFLINE=1).
    #[arg(long)]
    offline: bool,
    /// Hugging Face cache folder [default: $HF_HOME/hub or ~/.cache/huggingface/hub].
    #[arg(long, env = "HF_HUB_CACHE")]
    cache_dir: Option<PathBuf>,
    /// Where to run: cpu, cuda (serve and worker: one worker per visible GPU; generate: GPU 0),
    /// cuda:N, or for serve and worker a list such as cuda:0,cuda:1 (one worker per device, each
    /// with its own copy of the model, on one queue; cpu:0,cpu:1 runs several CPU workers).
    #[arg(long, default_value = "cpu", env = "SKYREELS_DEVICE")]
    pub(crate) device: Devices,
    /// One clip on several devices, each with its own copy of the transformer: cfg=2 runs the
    /// conditional and the unconditional true-CFG branch of every step at once on two device
    /// groups, ulysses=N splits the video tokens of each branch over N devices (Ulysses sequence
    /// parallelism: N must divide the 24 heads). The product is the number of --device entries,
    /// the conditional branch's first: --device cuda:0,cuda:1,cuda:2,cuda:3 --parallel
    /// cfg=2,ulysses=2 (or cpu:0,cpu:1,... for in-process CPU ranks). Same numbers as one device.
    #[arg(long, env = "SKYREELS_PARALLEL")]
    pub(crate) parallel: Option<Parallel>,
    /// Weights and activations dtype [default: f32 on cpu, bf16 on cuda].
    #[arg(long, value_enum)]
    dtype: Option<DtypeArg>,
    /// Where the transformer and the VAE stay between uses: none (resident on the device), model
    /// (each loaded onto the device only for the stage that runs it, then released: the peak is
    /// the largest network's, at a load per stage), blocks (the transformer's blocks in host
    /// memory, each linear weight copied to the device right before use). Same numbers in every
    /// mode.
    #[arg(long, value_enum, default_value = "none", env = "SKYREELS_OFFLOAD")]
    pub(crate) offload: OffloadArg,
    /// The VAE's dtype [default: f16 on cuda (as HunyuanVideo and SkyReels decode), f32 on cpu].
    #[arg(long, value_enum)]
    vae_dtype: Option<DtypeArg>,
    /// MagCache's magnitude ratios for this model, used by `--cache magcache:...` (and by tasks
    /// asking for it): what `skyreels calibrate-cache` wrote (one set per CFG branch), a JSON
    /// array of 2 to 1000 finite numbers (e.g. what diffusers' MagCacheConfig(calibrate=True)
    /// prints), or a bundled name: hunyuanvideo-544p or hunyuanvideo-720p (MagCache4HunyuanVideo's
    /// published ratios for HunyuanVideo; SkyReels has none published, so they approximate it).
    /// Interpolated to each run's step count as diffusers does. [default: none; magcache is then
    /// refused]
    #[arg(long, env = "SKYREELS_CACHE_RATIOS", value_name = "FILE.json|NAME")]
    cache_ratios: Option<PathBuf>,
}

/// The log of the one-shot commands: the libraries' warnings and notes on stderr, plainly
/// (`RUST_LOG` changes the level; `serve` and `worker` set up their own, with `--log-format`).
fn one_shot_log() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .without_time()
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .try_init();
}

fn main() {
    let cli = Cli::parse();
    if !matches!(cli.command, Command::Serve(_) | Command::Worker(_)) {
        one_shot_log();
    }
    let result = match cli.command {
        Command::Generate(args) => generate::run(*args, None),
        Command::CalibrateCache(args) => {
            let args = *args;
            generate::run(args.generate, Some(&args.ratios))
        }
        Command::Serve(args) => serve::serve(*args),
        Command::Worker(args) => serve::worker(*args),
        Command::Download(args) => download(args),
        Command::Bench(args) => bench::bench(*args),
        Command::Quantize(args) => quantize(args),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

/// The devices one pipeline of `m` runs on: its --parallel group, else its one device.
fn device_group(m: &ModelArgs) -> Result<Vec<devices::DeviceSpec>> {
    match &m.parallel {
        Some(p) => p.group(&m.device),
        None => Ok(vec![m.device.single()?]),
    }
}

/// The device groups `skyreels serve` runs a worker on: each listed device (`cuda`: every GPU),
/// or with --parallel the one group.
pub(crate) fn worker_groups(m: &ModelArgs) -> Result<Vec<Vec<devices::DeviceSpec>>> {
    match &m.parallel {
        Some(p) => Ok(vec![p.group(&m.device)?]),
        None => Ok(m.device.expand()?.into_iter().map(|d| vec![d]).collect()),
    }
}

/// The pipeline `m` asks for (dtypes, offload) on `group`: the first device runs it; with
/// --parallel the group is the conditional branch's `ulysses` devices, then (cfg=2) the
/// unconditional branch's.
pub(crate) fn load_pipeline(
    m: &ModelArgs,
    paths: ModelPaths,
    group: &[Device],
) -> Result<Pipeline, GenerateError> {
    let dtype = run_dtype(&m.device, m.dtype);
    let vae = vae_dtype(m.vae_dtype, &group[0]);
    let ratios = m
        .cache_ratios
        .as_deref()
        .map(read_cache_ratios)
        .transpose()?;
    let mut pipeline = Pipeline::load_offloaded(paths, dtype, vae, &group[0], m.offload.into())?;
    pipeline.set_cache_ratios(ratios);
    match m.parallel {
        Some(p) => pipeline.with_parallel(
            &group
                .chunks(p.ulysses)
                .map(<[_]>::to_vec)
                .collect::<Vec<_>>(),
        ),
        None => Ok(pipeline),
    }
}

/// `--cache-ratios`: a file of magnitude ratios (see [`MagRatios`]), else a bundled name.
fn read_cache_ratios(path: &Path) -> Result<MagRatios, GenerateError> {
    let bad = |e: &dyn std::fmt::Display| {
        GenerateError::Invalid(format!("--cache-ratios {}: {e}", path.display()))
    };
    if !path.exists() {
        if let Some(r) = path.to_str().and_then(MagRatios::bundled) {
            return Ok(r);
        }
        let names: Vec<&str> = skyreels_params::BUNDLED_RATIOS
            .iter()
            .map(|(n, _)| *n)
            .collect();
        return Err(bad(&format_args!(
            "no such file, nor a bundled name ({})",
            names.join(", ")
        )));
    }
    let text = std::fs::read_to_string(path).map_err(|e| bad(&e))?;
    serde_json::from_str(&text).map_err(|e| bad(&e))
}

/// `--vae-dtype` as asked, else the pipeline's default for the device (f16 on CUDA, f32 on CPU).
pub(crate) fn vae_dtype(arg: Option<DtypeArg>, device: &Device) -> DType {
    arg.map_or_else(|| default_vae_dtype(device), DtypeArg::dtype)
}

impl DtypeArg {
    pub(crate) fn dtype(self) -> DType {
        match self {
            DtypeArg::F32 => DType::F32,
            DtypeArg::Bf16 => DType::BF16,
            DtypeArg::F16 => DType::F16,
        }
    }
}

/// `--dtype` as asked, else f32 on the CPU and bf16 on CUDA.
pub(crate) fn run_dtype(devices: &Devices, dtype: Option<DtypeArg>) -> DType {
    match dtype {
        Some(d) => d.dtype(),
        None if devices.is_cuda() => DType::BF16,
        None => DType::F32,
    }
}

/// How `m` may use the Hugging Face hub.
pub(crate) fn hub_options(m: &ModelArgs) -> HubOptions {
    HubOptions {
        offline: m.offline,
        cache_dir: m.cache_dir.clone(),
        progress: true,
    }
}

/// The folders `--model` / `--transformer` name (downloading hub files as needed), or the
/// bundled tiny pipeline.
pub(crate) fn model_paths(m: &ModelArgs) -> Result<ModelPaths> {
    let opts = hub_options(m);
    let spec = match &m.model {
        Some(model) => ModelSpec::parse(model, m.transformer.as_deref())?,
        None => {
            let dir = tiny::extract().context("unpacking the bundled tiny weights")?;
            eprintln!(
                "note: no --model given, using the bundled tiny random weights: the video will be noise. \
                 Pass --model skyreels-v1-i2v (or a pipeline folder or repo id) for the real model."
            );
            ModelSpec {
                pipeline: Source::Local(dir),
                transformer: m.transformer.as_deref().map(Source::parse).transpose()?,
            }
        }
    };
    let mut paths = spec.resolve(&opts)?;
    if let Some(config) = &m.config {
        if !skyreels_pipeline::single_file::is_single_file(&paths.transformer) {
            bail!("--config is for a single-file --transformer (.safetensors or .gguf)");
        }
        paths.transformer_config = Some(config.clone());
    }
    Ok(paths)
}

fn download(args: DownloadArgs) -> Result<()> {
    let opts = HubOptions {
        offline: false,
        cache_dir: args.cache_dir,
        progress: true,
    };
    let paths = ModelSpec::parse(&args.model, args.transformer.as_deref())?.resolve(&opts)?;
    println!("pipeline: {}", paths.pipeline.display());
    println!("transformer: {}", paths.transformer.display());
    if let Some(repo) = &args.safety_checker {
        let dir = skyreels_pipeline::hub::fetch(
            repo,
            skyreels_pipeline::hub::Layout::SafetyChecker,
            &opts,
        )?;
        println!("safety checker: {}", dir.display());
    }
    Ok(())
}
