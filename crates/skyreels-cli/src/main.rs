//! `skyreels`: SkyReels V1 video generation.

#![forbid(unsafe_code)]

mod bench;
mod devices;
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
    default_vae_dtype, GenerationParams, ModelPaths, Offload, Pipeline, StageTimings,
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
    Generate(Box<GenerateArgs>),
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
}

#[derive(Args)]
struct GenerateArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// The first frame (image-to-video models): a file path or an http(s) URL.
    #[arg(long)]
    image: Option<String>,
    /// What the video shows. SkyReels prompts start with "FPS-24, ".
    #[arg(long)]
    prompt: String,
    /// What to avoid (used with true CFG) [default: SkyReels' negative prompt].
    #[arg(long)]
    negative_prompt: Option<String>,
    /// Frame height in pixels, a multiple of 16 up to 4096 (an MP4 at most 2160, or 3840 for a
    /// portrait clip: the H.264 encoder's limit) [default: 544, or 960 for a portrait image].
    #[arg(long)]
    height: Option<usize>,
    /// Frame width in pixels, a multiple of 16 up to 4096 (an MP4 at most 3840, or 2160 for a
    /// portrait clip: the H.264 encoder's limit) [default: 960, or 544 for a portrait image].
    #[arg(long)]
    width: Option<usize>,
    /// Number of frames, 4k+1 up to 257 [default: 97].
    #[arg(long)]
    num_frames: Option<usize>,
    /// Denoising steps, 1 to 100 [default: 30].
    #[arg(long)]
    steps: Option<usize>,
    /// True classifier-free guidance scale, 0 to 30; values > 1 run the negative prompt too.
    #[arg(long, default_value_t = params::GUIDANCE_SCALE)]
    guidance_scale: f64,
    /// Guidance value fed to the transformer's guidance embedder, 0 to 30.
    #[arg(long, default_value_t = params::EMBEDDED_GUIDANCE_SCALE)]
    embedded_guidance_scale: f64,
    /// Random seed; -1 picks one and prints it.
    #[arg(long, default_value_t = 42, allow_negative_numbers = true)]
    seed: i64,
    /// Frames per second of the MP4, 1 to 120.
    #[arg(long, default_value_t = params::FPS)]
    fps: f64,
    /// Step caching: `none`, `first-block:T` (reuse the rest of the transformer when the first
    /// block's residual changed by less than T relative to the last computed step, as diffusers'
    /// FirstBlockCacheConfig; e.g. first-block:0.05) or `teacache:T` (TeaCache4HunyuanVideo's
    /// accumulated, rescaled input change; e.g. teacache:0.1). Faster, at some quality cost.
    #[arg(long, value_name = "SPEC", default_value = "none")]
    cache: params::CacheSpec,
    /// Flow-matching shift of the sigma schedule, above 0 and at most 20 (higher spends more
    /// steps at high noise) [default: the model's scheduler_config.json; SkyReels: 7].
    #[arg(long, value_name = "S")]
    flow_shift: Option<f64>,
    /// RIFLEx for clips longer than the model was trained on (129 frames for HunyuanVideo): the
    /// K-th temporal RoPE frequency (1-based) is lowered to 0.9·2π / latent frames so the motion
    /// does not loop back. 0: off. HunyuanVideo's intrinsic frequency is K = 4 (RIFLEx's
    /// identify_k for theta 256 and 16 temporal dims); see docs/long-clips.md.
    #[arg(long, value_name = "K", default_value_t = 0)]
    riflex_freq_index: usize,
    /// A LoRA to apply, repeatable (applied in order, added up): PATH is a local .safetensors
    /// file or a hub file REPO_ID/FILE.safetensors; SCALE (default 1, from -4 to 4) multiplies
    /// the file's alpha/rank, as diffusers' set_adapters weight. Formats, told by the keys:
    /// diffusers/PEFT (lora_A/lora_B; alpha from the file's lora_adapter_metadata, else
    /// alpha = rank), the original HunyuanVideo layout (diffusion_model.double_blocks...) and
    /// Kohya/musubi-tuner/ComfyUI (lora_unet_..., lora_down/lora_up/alpha). Applied at forward
    /// time next to the stored weights (fp8 and GGUF stay as they are). DoRA, LoKr and LoHa
    /// files are refused.
    #[arg(long = "lora", value_name = "PATH[:SCALE]")]
    loras: Vec<params::LoraSpec>,
    /// A safetensors file whose tensor `latents` [1, C, T, H/8, W/8] (f32) replaces the seeded
    /// initial noise.
    #[arg(long)]
    noise: Option<PathBuf>,
    /// H.264 bitrate in kbit/s [default: 0.5 bit per pixel per frame, ~6300 at 960x544x24].
    #[arg(long)]
    bitrate_kbps: Option<u32>,
    /// Output: .mp4 (H.264), .safetensors (float frames [F, H, W, 3] in [0, 1]) or a folder of PNGs.
    #[arg(long, short, default_value = "output.mp4")]
    output: PathBuf,
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
        Command::Generate(args) => generate(*args),
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
) -> Result<Pipeline, skyreels_pipeline::generate::GenerateError> {
    let dtype = run_dtype(&m.device, m.dtype);
    let vae = vae_dtype(m.vae_dtype, &group[0]);
    let pipeline = Pipeline::load_offloaded(paths, dtype, vae, &group[0], m.offload.into())?;
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
    Ok(())
}

/// An image from a file or an http(s) URL (any address: this is the user's own machine), as
/// RGB, with the server's size cap, content sniffing and decoding limits.
fn load_image(source: &str) -> Result<image::RgbImage> {
    let bytes = if source.starts_with("http://") || source.starts_with("https://") {
        let url = url::Url::parse(source).with_context(|| format!("bad image URL {source:?}"))?;
        let agent = media::http_agent(true, std::time::Duration::from_secs(60));
        media::fetch(&agent, &url).context("cannot fetch image")?
    } else {
        let path = Path::new(source);
        if !path.is_file() {
            bail!("image file {source} does not exist");
        }
        std::fs::read(path).with_context(|| format!("cannot read image {source}"))?
    };
    media::decode(&bytes).with_context(|| format!("cannot decode image {source}"))
}

fn load_noise(path: &Path) -> Result<Tensor> {
    let mut tensors = candle_core::safetensors::load(path, &Device::Cpu)
        .with_context(|| format!("cannot read noise file {}", path.display()))?;
    tensors
        .remove("latents")
        .with_context(|| format!("{}: no tensor named `latents`", path.display()))
}

fn generate(args: GenerateArgs) -> Result<()> {
    let started = Instant::now();
    let group = device_group(&args.model)?
        .into_iter()
        .map(devices::open)
        .collect::<Result<Vec<_>>>()?;
    let paths = model_paths(&args.model)?;
    let image = args.image.as_deref().map(load_image).transpose()?;
    let noise = args.noise.as_deref().map(load_noise).transpose()?;
    // the model's sizes, turned to portrait for a portrait image
    let d = &paths.defaults;
    let (dh, dw) = d.size(image.as_ref().is_some_and(params::is_portrait));
    let seed = match args.seed {
        -1 => {
            let s = rand::random_range(0..=params::SEED.max as u64);
            eprintln!("seed: {s}");
            s
        }
        s if params::SEED.contains(s) => s as u64,
        s => bail!("--seed {}, got {s}", params::SEED.rule()),
    };
    let p = GenerationParams {
        prompt: args.prompt,
        negative_prompt: args.negative_prompt,
        height: args.height.unwrap_or(dh),
        width: args.width.unwrap_or(dw),
        num_frames: args.num_frames.unwrap_or(d.num_frames),
        steps: args.steps.unwrap_or(d.num_inference_steps),
        guidance_scale: args.guidance_scale,
        embedded_guidance_scale: args.embedded_guidance_scale,
        seed,
        fps: args.fps,
        cache: args.cache,
        flow_shift: args.flow_shift,
        loras: args.loras,
        riflex_freq_index: args.riflex_freq_index,
    };
    check_limits(&p, &args.output)?;
    let opts = hub_options(&args.model);
    let loras = p
        .loras
        .iter()
        .map(|l| {
            Ok(LoraFile {
                label: l.path.clone(),
                path: resolve_lora_path(&l.path, &opts)?,
                scale: l.scale,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    eprintln!(
        "loading {} (transformer {})",
        paths.pipeline.display(),
        paths.transformer.display()
    );
    let mut pipeline = load_pipeline(&args.model, paths, &group)?;
    for a in pipeline.set_loras(&loras)?.applied {
        eprintln!(
            "LoRA {}: {} layout, {} layers{}",
            a.label,
            a.format,
            a.layers,
            match a.unmatched_keys {
                0 => String::new(),
                n => format!(" ({n} keys match no layer of this transformer: not applied)"),
            }
        );
    }
    for (flag, v) in [("--height", p.height), ("--width", p.width)] {
        params::check_side(v, pipeline.size_multiple())
            .map_err(|rule| anyhow::anyhow!("{flag} {rule}"))?;
    }
    if OutputKind::of(&args.output) == OutputKind::Mp4 {
        params::check_encodable(p.height, p.width)
            .map_err(|(side, rule)| anyhow::anyhow!("--{side} {rule}"))?;
    }
    let (image, noise) = (image.as_ref(), noise.as_ref());
    pipeline.validate(&p, image, noise)?;
    eprintln!(
        "generating {} frames of {}x{} in {} steps",
        p.num_frames, p.width, p.height, p.steps
    );
    let bar = ProgressBar::new(p.steps as u64).with_style(
        ProgressStyle::with_template(
            "{bar:40} {pos}/{len} steps [{elapsed_precise} < {eta_precise}]",
        )
        .expect("valid template"),
    );
    let video = pipeline.generate(&p, image, noise, &mut |done, _| {
        bar.set_position(done as u64);
        true
    })?;
    bar.finish();
    for (cut, what) in [
        (video.prompt_truncated, "prompt"),
        (video.negative_prompt_truncated, "negative prompt"),
    ] {
        if cut {
            eprintln!(
                "warning: the {what} was cut to fit the text encoders (256 LLaMA / 77 CLIP tokens)"
            );
        }
    }
    let start = Instant::now();
    let bitrate = args.bitrate_kbps.map(|k| k.saturating_mul(1000));
    write_output(&args.output, &video.frames, p.fps, bitrate)?;
    print_timings(&video.timings, start.elapsed(), started.elapsed());
    eprintln!("wrote {}", args.output.display());
    Ok(())
}

/// The limits the server applies too (`skyreels-params`), named by their flags.
fn check_limits(p: &GenerationParams, output: &Path) -> Result<()> {
    let rule = |flag: &str, rule: String| anyhow::anyhow!("{flag} {rule}");
    if !params::STEPS.contains(p.steps as i64) {
        return Err(rule(
            "--steps",
            format!("{}, got {}", params::STEPS.rule(), p.steps),
        ));
    }
    params::check_frames(p.num_frames).map_err(|r| rule("--num-frames", r))?;
    for (flag, range, v) in [
        ("--guidance-scale", params::GUIDANCE, p.guidance_scale),
        (
            "--embedded-guidance-scale",
            params::EMBEDDED_GUIDANCE,
            p.embedded_guidance_scale,
        ),
    ] {
        if !range.contains(v) {
            return Err(rule(flag, format!("{}, got {v}", range.rule())));
        }
    }
    if let Some(s) = p.flow_shift.filter(|s| !params::FLOW_SHIFT.contains(*s)) {
        return Err(rule(
            "--flow-shift",
            format!("{}, got {s}", params::FLOW_SHIFT.rule()),
        ));
    }
    if OutputKind::of(output) == OutputKind::Mp4 && !params::FPS_RANGE.contains(p.fps) {
        return Err(rule(
            "--fps",
            format!("{}, got {}", params::FPS_RANGE.rule(), p.fps),
        ));
    }
    Ok(())
}

fn print_timings(t: &StageTimings, export: std::time::Duration, total: std::time::Duration) {
    let stages = [("load", t.load)]
        .into_iter()
        .chain(t.stages())
        .chain([("export", export), ("total", total)])
        .map(|(name, d)| format!("{} {:.2}s", name.replace('_', " "), d.as_secs_f64()))
        .collect::<Vec<_>>()
        .join(", ");
    eprintln!(
        "timings: {stages}; transformer forwards: {} computed, {} from the cache",
        t.forwards_computed(),
        t.forwards_cached()
    );
    if let Some(peaks) = &t.peak_memory {
        eprintln!("peak device memory: {peaks}");
    }
}
