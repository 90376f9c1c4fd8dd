//! `skyreels generate`: one clip from the command line, with progress and timings.

use super::*;

#[derive(Args)]
pub(crate) struct GenerateArgs {
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
    /// FirstBlockCacheConfig; e.g. first-block:0.05), `teacache:T` (TeaCache4HunyuanVideo's
    /// accumulated, rescaled input change; e.g. teacache:0.1) or
    /// `magcache[:T[,max_skip=K][,retention=R]]` (MagCache as diffusers' MagCacheConfig: skip
    /// while the accumulated error of the model's magnitude ratios, --cache-ratios, stays at most
    /// T, at most K steps in a row, never in the first R of the steps; defaults 0.06, 3, 0.2) or
    /// `taylorseer[:interval=I][,order=O][,warmup=W][,stop=S]` (TaylorSeer as diffusers'
    /// TaylorSeerCacheConfig: every attention runs on the first W steps, then one step in I and
    /// every step from S on, and is forecast by a Taylor series of order O on the others;
    /// defaults 5, 1, 3, no stop; it keeps O+1 copies of every attention's output per CFG
    /// branch, see docs/step-caching.md). Faster, at some quality cost.
    #[arg(long, value_name = "SPEC", default_value = "none")]
    cache: params::CacheSpec,
    /// CFG gating, F above 0 and below 1: from step ceil(F x steps) on, the negative prompt's
    /// transformer forward is skipped and the guidance reuses the last full step's
    /// (cond - uncond); e.g. 0.7 saves 30% of the unconditional forwards. Combines with
    /// --cache. Does nothing without true CFG (--guidance-scale 1 or less). [default: off]
    #[arg(long, value_name = "F", value_parser = params::parse_cfg_gate)]
    cfg_gate: Option<f64>,
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

#[derive(Args)]
pub(crate) struct CalibrateArgs {
    #[command(flatten)]
    pub(crate) generate: GenerateArgs,
    /// Where to write the ratios: JSON `{"cond": [...], "uncond": [...], "calibrated": {...}}`,
    /// one ratio per step and CFG branch (`uncond` only with true CFG), and the run they come
    /// from; what --cache-ratios reads.
    #[arg(long, value_name = "FILE.json", default_value = "cache_ratios.json")]
    pub(crate) ratios: PathBuf,
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

/// `skyreels generate`, or with `ratios_out` `skyreels calibrate-cache` (the same run, uncached,
/// whose magnitude ratios are written there).
pub(crate) fn run(args: GenerateArgs, ratios_out: Option<&Path>) -> Result<()> {
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
        cfg_gate: args.cfg_gate,
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
    let mut on_step = |done: usize, _| {
        bar.set_position(done as u64);
        true
    };
    let video = match ratios_out {
        None => pipeline.generate(&p, image, noise, &mut on_step)?,
        Some(out) => {
            let (video, ratios) = pipeline.calibrate(&p, image, noise, &mut on_step)?;
            let calibrated = serde_json::json!({
                "model": args.model.model.as_deref().unwrap_or("the bundled tiny weights"),
                "transformer": args.model.transformer,
                "steps": p.steps,
                "height": p.height,
                "width": p.width,
                "num_frames": p.num_frames,
                "guidance_scale": p.guidance_scale,
                "embedded_guidance_scale": p.embedded_guidance_scale,
                "flow_shift": p.flow_shift,
                "seed": p.seed,
                "prompt": p.prompt,
                "image": args.image.is_some(),
            });
            let text = serde_json::to_string_pretty(&ratios.to_json(calibrated))?;
            std::fs::write(out, text + "\n")
                .with_context(|| format!("cannot write --ratios {}", out.display()))?;
            eprintln!(
                "wrote {} ({} ratios per branch, {})",
                out.display(),
                p.steps,
                if ratios.per_branch() {
                    "cond and uncond"
                } else {
                    "cond only: no true CFG"
                }
            );
            video
        }
    };
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
