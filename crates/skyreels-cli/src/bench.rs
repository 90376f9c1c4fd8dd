//! `skyreels bench`: the model's stages on random weights at SkyReels' real dimensions (no
//! checkpoint needed), timed on one device: one transformer forward, one true-CFG step, a VAE
//! decode and text encoding, each with its effective TFLOP/s (transformer) and peak device
//! memory. `--size tiny` runs the same code on small dimensions (a CPU smoke test).

use crate::{run_dtype, vae_dtype, DtypeArg, OffloadArg};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::{Init, VarBuilder};
use clap::{Args, ValueEnum};
use skyreels_models::text_encoders::{ClipTextConfig, ClipTextModel, LlamaConfig, LlamaEncoder};
use skyreels_models::{
    AutoencoderKLHunyuanVideo, HunyuanVideoTransformer3DModel, TransformerConfig,
    TransformerInputs, VaeConfig,
};
use skyreels_pipeline::conditioning::HIDDEN_STATE_SKIP;
use skyreels_pipeline::generate::{guided_velocity, CacheSpec, StepCache};
use skyreels_pipeline::runtime::{gib, PeakMemory};
use std::time::Instant;

#[derive(Clone, Copy, Debug, PartialEq, ValueEnum)]
pub(crate) enum Size {
    /// SkyReels V1 I2V: 24 heads × 128, 20 dual + 40 single blocks, LLaMA-3-8B, CLIP-L, the
    /// HunyuanVideo VAE; 544x960, 97 frames.
    Full,
    /// Small random models and 64x64, 5 frames: checks the command on a CPU in seconds.
    Tiny,
}

#[derive(Clone, Copy, Debug, PartialEq, ValueEnum)]
pub(crate) enum Part {
    /// One transformer forward.
    Transformer,
    /// Where a forward's time goes: one attention call and the blocks' linear layers, each timed
    /// alone and multiplied by their count per forward (the rest of a timed forward is norms,
    /// modulation, RoPE and other elementwise work).
    Breakdown,
    /// One true-CFG step (two forwards).
    CfgStep,
    /// VAE decode of the latent video.
    Vae,
    /// LLaMA + CLIP encoding of a prompt and a negative prompt.
    Text,
}

#[derive(Args)]
pub(crate) struct BenchArgs {
    /// Model dimensions.
    #[arg(long, value_enum, default_value = "full")]
    size: Size,
    /// Video height [default: 544 full, 64 tiny].
    #[arg(long)]
    height: Option<usize>,
    /// Video width [default: 960 full, 64 tiny].
    #[arg(long)]
    width: Option<usize>,
    /// Frames, 4k+1 [default: 97 full, 5 tiny].
    #[arg(long)]
    num_frames: Option<usize>,
    /// Stages to run.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "transformer,breakdown,cfg-step,vae,text"
    )]
    parts: Vec<Part>,
    /// Timed repetitions of each stage (after one warm-up run).
    #[arg(long, default_value_t = 2)]
    runs: usize,
    /// Denoising steps of the clip estimate printed at the end (steps × a true-CFG step + VAE
    /// decode + text encoding, from the stages measured).
    #[arg(long, default_value_t = 30)]
    steps: usize,
    /// Where to run: cuda (GPU 0), cuda:N or cpu; with --parallel the list of its ranks.
    #[arg(long, default_value = "cuda")]
    device: crate::Devices,
    /// ulysses=N: also time the forward as N Ulysses ranks (the devices of --device, e.g.
    /// cpu:0,cpu:1 for in-process CPU ranks), and count the elements each rank sends per forward
    /// against the analytical figure.
    #[arg(long)]
    parallel: Option<crate::Parallel>,
    /// Weights and activations dtype [default: f32 on cpu, bf16 on cuda].
    #[arg(long, value_enum)]
    dtype: Option<DtypeArg>,
    /// The VAE's dtype [default: f16 on cuda, f32 on cpu].
    #[arg(long, value_enum)]
    vae_dtype: Option<DtypeArg>,
    /// Time this transformer checkpoint instead of random weights: a folder, or one .safetensors
    /// (bf16, fp8, ...) or .gguf file as `generate --transformer` takes (its config from the
    /// shapes or --config); prints the bytes its weights keep resident. The other stages keep
    /// random weights.
    #[arg(long)]
    transformer: Option<std::path::PathBuf>,
    /// The config.json (or its folder) of a single-file --transformer.
    #[arg(long, requires = "transformer")]
    config: Option<std::path::PathBuf>,
    /// none, or blocks: the transformer's blocks in host memory, each linear weight copied to
    /// the device right before use (what that costs per forward is what this measures). `model`
    /// is generate's and serve's (a load per stage; their stage timings show it).
    #[arg(long, value_enum, default_value = "none")]
    offload: OffloadArg,
}

/// Weights drawn from N(0, 0.02²) (norm scales too: values do not change the cost).
struct RandomWeights;

impl candle_nn::var_builder::SimpleBackend for RandomWeights {
    fn get(
        &self,
        s: Shape,
        _name: &str,
        _h: Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        Tensor::randn(0f32, 0.02, s, dev)?.to_dtype(dtype)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("random weights: {name} needs a shape")
    }

    fn contains_tensor(&self, _name: &str) -> bool {
        true
    }
}

fn random_vb(dtype: DType, device: &Device) -> VarBuilder<'static> {
    VarBuilder::from_backend(Box::new(RandomWeights), dtype, device.clone())
}

fn config<T: serde::de::DeserializeOwned>(json: serde_json::Value) -> Result<T> {
    serde_json::from_value(json).context("bench: model config")
}

/// Runs `f` once to warm up, then `runs` times; prints the median seconds (and TFLOP/s when
/// `flops` is given) with the peak device memory.
fn time_stage(
    name: &str,
    device: &Device,
    runs: usize,
    flops: Option<f64>,
    mut f: impl FnMut() -> Result<Tensor>,
) -> Result<f64> {
    let peak = PeakMemory::start(device);
    let warm = Instant::now();
    f()?;
    device.synchronize()?;
    let warm = warm.elapsed().as_secs_f64();
    let mut times = Vec::new();
    for _ in 0..runs {
        let t = Instant::now();
        f()?;
        device.synchronize()?;
        times.push(t.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    let median = times.get(times.len() / 2).copied().unwrap_or(warm);
    let mut line = format!("{name:<18} {median:>8.3} s (warm-up {warm:.3} s)");
    if let Some(fl) = flops {
        line += &format!(", {:.1} TFLOP/s effective", fl / median / 1e12);
    }
    if let Some(bytes) = peak.take() {
        line += &format!(", peak {:.1} GiB on the device", gib(bytes));
    }
    println!("{line}");
    Ok(median)
}

/// Times one joint attention call over `tokens` (the last `padding` of them text padding, which
/// no query sees) and the blocks' linear layers at `tokens` rows, each scaled by its count per
/// forward, and prints them with their share of `forward_s` (the rest: norms, modulation, RoPE
/// and other elementwise work).
fn breakdown(
    cfg: &TransformerConfig,
    tokens: usize,
    padding: usize,
    dtype: DType,
    device: &Device,
    runs: usize,
    forward_s: Option<f64>,
) -> Result<()> {
    use candle_core::Module;
    use skyreels_models::layers::{attention, default_score_budget, linear::linear};
    let (heads, hd) = (cfg.num_attention_heads, cfg.attention_head_dim);
    let d = heads * hd;
    let (dual, single) = (cfg.num_layers, cfg.num_single_layers);
    let random = |shape: &[usize]| -> Result<Tensor> {
        Ok(Tensor::randn(0f32, 1.0, shape, device)?.to_dtype(dtype)?)
    };
    let qkv = [1, tokens, heads, hd];
    let (q, k, v) = (random(&qkv)?, random(&qkv)?, random(&qkv)?);
    let keys = [tokens - padding];
    let budget = default_score_budget(device);
    let attn = time_stage("attention", device, runs, None, || {
        Ok(attention(&q, &k, &v, Some(&keys), budget)?)
    })?;
    // the blocks' projections, all at `tokens` rows: dual blocks have q/k/v, out and a 4x MLP
    // per stream (image and text rows together here), single blocks one fused q/k/v+MLP input
    // projection (D -> 7D) and one output projection (5D -> D)
    let vb = random_vb(dtype, device);
    let mut linear_s = 0.0;
    for (name, i, o, per_forward) in [
        ("qkv", d, 3 * d, dual),
        ("attn out", d, d, dual),
        ("mlp in", d, 4 * d, dual),
        ("mlp out", 4 * d, d, dual),
        ("single in", d, 7 * d, single),
        ("single out", 5 * d, d, single),
    ] {
        let layer = linear(i, o, vb.pp(name))?;
        let input = random(&[1, tokens, i])?;
        let t = time_stage(&format!("linear {i}->{o}"), device, runs, None, || {
            Ok(layer.forward(&input)?)
        })?;
        linear_s += t * per_forward as f64;
    }
    let attn_s = attn * (dual + single) as f64;
    let share = |t: f64| match forward_s {
        Some(f) => format!(" ({:.0}% of the forward)", 100.0 * t / f),
        None => String::new(),
    };
    println!(
        "per forward: attention {} x {attn:.3} s = {attn_s:.2} s{}",
        dual + single,
        share(attn_s)
    );
    println!(
        "per forward: linear layers {linear_s:.2} s{}",
        share(linear_s)
    );
    if let Some(f) = forward_s {
        let rest = f - attn_s - linear_s;
        println!(
            "per forward: the rest (norms, modulation, RoPE, elementwise) {rest:.2} s{}",
            share(rest)
        );
    }
    Ok(())
}

/// Times one forward as `u` Ulysses ranks (rank 0 `model` on `devices[0]`, `others` on the
/// rest), each on its own thread with the inputs copied to its device, and prints the elements
/// each rank sent per forward next to the analytical count: per attention layer, the all-to-alls
/// of q, k, v and of the output (each `(u-1)/u` of the rank's `n_img/u × D` slice) and the
/// gather of the text rows' head slices (`(u-1) × n_txt × D/u`); once per forward, the gather of
/// the predicted patches (`(u-1) × n_img/u × out_channels·pt·p²`).
fn ulysses_forward(
    cfg: &TransformerConfig,
    u: usize,
    (model, others, devices): (
        &HunyuanVideoTransformer3DModel,
        &[HunyuanVideoTransformer3DModel],
        &[Device],
    ),
    inputs: &TransformerInputs,
    (n_img, n_txt): (usize, usize),
    runs: usize,
    flops: f64,
) -> Result<()> {
    use skyreels_models::parallel::{in_process_group, Collective};
    let ranks = in_process_group(u);
    let group: Vec<std::sync::Arc<dyn Collective>> = ranks
        .iter()
        .map(|r| std::sync::Arc::new(r.clone()) as std::sync::Arc<dyn Collective>)
        .collect();
    let models: Vec<(&Device, &HunyuanVideoTransformer3DModel)> = devices
        .iter()
        .zip(std::iter::once(model).chain(others))
        .collect();
    let time = time_stage(
        &format!("forward ulysses={u}"),
        &devices[0],
        runs,
        Some(flops),
        || {
            Ok(skyreels_pipeline::parallel::ulysses_group_forward(
                &models, &group, inputs, None,
            )?)
        },
    )?;
    let layers = (cfg.num_layers + cfg.num_single_layers) as f64;
    let d = cfg.inner_dim() as f64;
    let (uf, n_loc) = (u as f64, (n_img / u) as f64);
    let per_layer = 4.0 * (uf - 1.0) / uf * n_loc * d + (uf - 1.0) * n_txt as f64 * d / uf;
    let patch = (cfg.out_channels() * cfg.patch_size_t * cfg.patch_size * cfg.patch_size) as f64;
    let analytic = layers * per_layer + (uf - 1.0) * n_loc * patch;
    let forwards = (runs + 1) as f64;
    for r in &ranks {
        let sent = r.elements_sent() as f64 / forwards;
        println!(
            "rank {}: sent {:.3} M elements per forward ({:.1} MiB in {:?}), analytical {:.3} M \
             ({:.1}% of its share)",
            r.rank(),
            sent / 1e6,
            sent * model.dtype().size_in_bytes() as f64 / f64::from(1 << 20),
            model.dtype(),
            analytic / 1e6,
            100.0 * sent / analytic
        );
    }
    println!(
        "all ranks: {:.3} M elements per forward; the two all-to-alls of a layer move L·D/u = \
         {:.3} M elements per rank each over 4 tensors (q, k, v, out); {time:.3} s per forward",
        ranks.iter().map(|r| r.elements_sent()).sum::<u64>() as f64 / forwards / 1e6,
        n_img as f64 * d / uf / 1e6
    );
    Ok(())
}

/// FLOPs of one forward over `l` tokens, counting the blocks' matmuls (24·D² per token) and
/// attention (4·L²·D), as `docs/GPU.md` does: 2.63 PFLOP at 544x960x97.
fn forward_flops(cfg: &TransformerConfig, l: usize) -> f64 {
    let d = (cfg.num_attention_heads * cfg.attention_head_dim) as f64;
    let l = l as f64;
    let blocks = (cfg.num_layers + cfg.num_single_layers) as f64;
    blocks * (24.0 * d * d * l + 4.0 * l * l * d)
}

pub(crate) fn bench(args: BenchArgs) -> Result<()> {
    if args.offload == OffloadArg::Model {
        bail!(
            "bench times each stage with its network loaded; --offload model only adds a load per \
             stage: run `skyreels generate --offload model` and read its stage timings"
        )
    }
    let host_blocks = args.offload == OffloadArg::Blocks;
    let group = match args.parallel {
        Some(p) if p.cfg != 1 => bail!(
            "bench --parallel times one branch's forward over Ulysses ranks: give ulysses=N only"
        ),
        Some(p) => p.group(&args.device)?,
        None => vec![args.device.single()?],
    };
    let devices = group
        .into_iter()
        .map(crate::devices::open)
        .collect::<Result<Vec<_>>>()?;
    let (device, dtype) = (devices[0].clone(), run_dtype(&args.device, args.dtype));
    let tiny = args.size == Size::Tiny;
    let height = args.height.unwrap_or(if tiny { 64 } else { 544 });
    let width = args.width.unwrap_or(if tiny { 64 } else { 960 });
    let frames = args.num_frames.unwrap_or(if tiny { 5 } else { 97 });
    if !height.is_multiple_of(16) || !width.is_multiple_of(16) || height == 0 || width == 0 {
        bail!("--height and --width must be positive multiples of 16, got {height}x{width}")
    }
    if frames % 4 != 1 {
        bail!("--num-frames must be 4k+1 (1, 5, ..., 97), got {frames}")
    }
    let (lt, lh, lw) = ((frames - 1) / 4 + 1, height / 8, width / 8);
    let txt = if tiny { 16 } else { 256 };
    let vb = random_vb(dtype, &device);
    println!(
        "skyreels bench: {:?} models, random weights, {height}x{width}, {frames} frames, {dtype:?} on {:?}",
        args.size,
        device.location()
    );

    let mut tcfg: TransformerConfig = if tiny {
        config(serde_json::json!({
            "num_attention_heads": 2, "attention_head_dim": 16, "num_layers": 1,
            "num_single_layers": 1, "text_embed_dim": 32, "pooled_projection_dim": 16,
            "rope_axes_dim": [4, 6, 6]
        }))?
    } else {
        TransformerConfig::default()
    };
    // SkyReels I2V: noisy latents and image latents on channels
    tcfg.in_channels = 32;
    tcfg.out_channels = Some(16);

    let wants = |p: Part| args.parts.contains(&p);
    let (mut forward_s, mut cfg_step_s, mut vae_s, mut text_s) = (None, None, None, None);
    if wants(Part::Transformer) || wants(Part::Breakdown) || wants(Part::CfgStep) {
        let t = Instant::now();
        let build =
            |device: &Device, cfg: &TransformerConfig| -> Result<HunyuanVideoTransformer3DModel> {
                Ok(match &args.transformer {
                    None => HunyuanVideoTransformer3DModel::new(
                        cfg,
                        random_vb(dtype, device).pp("transformer"),
                    )?,
                    Some(path) => skyreels_pipeline::load_transformer(
                        path,
                        args.config.as_deref(),
                        dtype,
                        device,
                    )?,
                })
            };
        let model = match &args.transformer {
            None if host_blocks => bail!("--offload blocks needs a --transformer checkpoint"),
            None => build(&device, &tcfg)?,
            Some(path) => {
                let (model, resident) = skyreels_pipeline::load_transformer_resident(
                    path,
                    args.config.as_deref(),
                    dtype,
                    &device,
                    host_blocks,
                )?;
                let mib = |b: u64| b as f64 / f64::from(1 << 20);
                println!(
                    "{}: {} tensors, {} matmul weights in their stored form, {:.1} MiB resident, \
                     {:.1} MiB in host memory",
                    path.display(),
                    resident.tensors,
                    resident.stored,
                    mib(resident.bytes),
                    mib(resident.host_bytes)
                );
                tcfg = model.config().clone();
                model
            }
        };
        device.synchronize()?;
        println!("transformer built in {:.2} s", t.elapsed().as_secs_f64());
        let x = Tensor::randn(0f32, 1.0, (1, tcfg.in_channels, lt, lh, lw), &device)?
            .to_dtype(dtype)?;
        let timestep = Tensor::new(&[900f32], &device)?.to_dtype(dtype)?;
        let guidance = Tensor::new(&[1000f32], &device)?.to_dtype(dtype)?;
        // a prompt of ~3/4 of the text window, padding after it
        let prompt = 3 * txt / 4;
        let embeds = |seed: f64| -> Result<skyreels_pipeline::conditioning::PromptEmbeds> {
            Ok(skyreels_pipeline::conditioning::PromptEmbeds {
                embeds: Tensor::randn(seed as f32, 1.0, (1, txt, tcfg.text_embed_dim), &device)?
                    .to_dtype(dtype)?,
                mask: Tensor::from_vec(
                    (0..txt).map(|i| u32::from(i < prompt)).collect(),
                    (1, txt),
                    &device,
                )?,
                pooled: Tensor::randn(0f32, 1.0, (1, tcfg.pooled_projection_dim), &device)?
                    .to_dtype(dtype)?,
                truncated_llama: vec![false],
                truncated_clip: vec![false],
            })
        };
        let (pos, neg) = (embeds(0.0)?, embeds(0.5)?);
        let (pt, ps) = (tcfg.patch_size_t, tcfg.patch_size);
        let tokens = (lt / pt) * (lh / ps) * (lw / ps) + txt;
        let flops = forward_flops(&tcfg, tokens);
        println!(
            "{tokens} tokens ({} video + {txt} text), {:.2} PFLOP per forward",
            tokens - txt,
            flops / 1e15
        );
        let inputs = TransformerInputs {
            hidden_states: &x,
            timestep: &timestep,
            encoder_hidden_states: &pos.embeds,
            encoder_attention_mask: &pos.mask,
            pooled_projections: &pos.pooled,
            guidance: Some(&guidance),
            riflex_freq_index: 0,
        };
        if wants(Part::Transformer) {
            forward_s = Some(time_stage(
                "forward",
                &device,
                args.runs,
                Some(flops),
                || Ok(model.forward(&inputs)?),
            )?);
        }
        if let (Some(p), true) = (args.parallel, wants(Part::Transformer)) {
            let others = devices[1..]
                .iter()
                .map(|d| build(d, &tcfg))
                .collect::<Result<Vec<_>>>()?;
            ulysses_forward(
                &tcfg,
                p.ulysses,
                (&model, &others, &devices),
                &inputs,
                (tokens - txt, txt),
                args.runs,
                flops,
            )?;
        }
        if wants(Part::Breakdown) {
            breakdown(
                &tcfg,
                tokens,
                txt - prompt,
                dtype,
                &device,
                args.runs,
                forward_s,
            )?;
        }
        if wants(Part::CfgStep) {
            cfg_step_s = Some(time_stage(
                "cfg step",
                &device,
                args.runs,
                Some(2.0 * flops),
                || {
                    Ok(guided_velocity(
                        &model,
                        &x,
                        &timestep,
                        &pos,
                        Some(&neg),
                        Some(&guidance),
                        6.0,
                        &mut StepCache::pair(CacheSpec::None, 1, None)?,
                    )?)
                },
            )?);
        }
    }

    if wants(Part::Vae) {
        let vcfg: VaeConfig = if tiny {
            config(serde_json::json!({
                "block_out_channels": [8, 16, 16, 16], "layers_per_block": 1, "norm_num_groups": 4
            }))?
        } else {
            config(serde_json::json!({}))?
        };
        let vae_dtype = vae_dtype(args.vae_dtype, &device);
        let vae = AutoencoderKLHunyuanVideo::new(&vcfg, random_vb(vae_dtype, &device).pp("vae"))?;
        let z = Tensor::randn(0f32, 1.0, (1, vcfg.latent_channels, lt, lh, lw), &device)?
            .to_dtype(vae_dtype)?;
        let name = format!("vae decode {vae_dtype:?}");
        vae_s = Some(time_stage(&name, &device, args.runs, None, || {
            Ok(vae.decode(&z)?)
        })?);
    }

    if wants(Part::Text) {
        let (lcfg, ccfg): (LlamaConfig, ClipTextConfig) = if tiny {
            (
                config(serde_json::json!({
                    "vocab_size": 256, "hidden_size": 32, "intermediate_size": 64,
                    "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2
                }))?,
                config(serde_json::json!({
                    "vocab_size": 256, "hidden_size": 16, "intermediate_size": 32,
                    "num_hidden_layers": 2, "num_attention_heads": 2, "max_position_embeddings": 77
                }))?,
            )
        } else {
            // llava-llama-3-8b (HunyuanVideo's text_encoder) and CLIP ViT-L/14's text model
            (
                config(serde_json::json!({
                    "vocab_size": 128320, "hidden_size": 4096, "intermediate_size": 14336,
                    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
                    "rms_norm_eps": 1e-5, "rope_theta": 500000.0
                }))?,
                config(serde_json::json!({
                    "vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072,
                    "num_hidden_layers": 12, "num_attention_heads": 12,
                    "max_position_embeddings": 77
                }))?,
            )
        };
        let llama = LlamaEncoder::new(&lcfg, HIDDEN_STATE_SKIP, vb.pp("text_encoder"))?;
        let clip = ClipTextModel::new(&ccfg, vb.pp("text_encoder_2"))?;
        // prompt and negative prompt: the LLaMA window with its template (256 + 95 tokens), and
        // CLIP's 77
        let n = txt + 95;
        let token_ids = |count: usize, vocab: usize| {
            let ids = (0..2 * count)
                .map(|i| ((i * 7919) % vocab) as u32)
                .collect();
            Tensor::from_vec(ids, (2, count), &device)
        };
        let ids = token_ids(n, lcfg.vocab_size)?;
        let mask = Tensor::ones((2, n), DType::U32, &device)?;
        let clip_ids = token_ids(77, ccfg.vocab_size)?;
        text_s = Some(time_stage("text encode", &device, args.runs, None, || {
            let h = llama.forward(&ids, &mask)?;
            let p = clip.pooled(&clip_ids)?;
            Ok((h.sum_all()?.to_dtype(DType::F32)? + p.sum_all()?.to_dtype(DType::F32)?)?)
        })?);
    }
    // a true-CFG step is two forwards; a measured step counts its guidance arithmetic too
    let step = cfg_step_s.or(forward_s.map(|f| 2.0 * f));
    if let (Some(step), Some(vae), Some(text)) = (step, vae_s, text_s) {
        println!(
            "clip estimate      {:>8.1} s = {} steps x {step:.3} s (true CFG) + VAE {vae:.3} s + text {text:.3} s",
            args.steps as f64 * step + vae + text,
            args.steps
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flop_count_matches_the_spec() {
        // docs/GPU.md: 51,256 tokens at 544x960x97 cost 2.63 PFLOP per forward
        let f = forward_flops(&TransformerConfig::default(), 51_256);
        assert!((f / 1e15 - 2.63).abs() < 0.01, "{f:e}");
    }
}
