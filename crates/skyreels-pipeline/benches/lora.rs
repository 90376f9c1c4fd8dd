//! What LoRA adapters cost: one transformer forward of a mid-size random model (hidden 512 =
//! 4 heads × 128, 2 dual + 4 single + 2 refiner blocks; 256x384, 17 frames: 1,920 video + 256
//! text tokens) with 0, 1 and 3 random rank-32 LoRAs on every linear layer, and the time of
//! `Pipeline::set_loras` when it switches to another LoRA (first read, then from the cache) and
//! when it is given the one already applied.
//!
//!     cargo bench -p skyreels-pipeline --bench lora -- [RUNS] [--full-width]
//!
//! `--full-width`: the forward only, at SkyReels' width (hidden 3072 = 24 heads × 128, 1 dual +
//! 1 single + 1 refiner block, 192 video + 64 text tokens), where a LoRA's share of the work is
//! the real model's.
//!
//! f32 on the CPU (threads: `RAYON_NUM_THREADS`); the pipeline around the transformer is the
//! bundled tiny one (weights/tiny), whose text widths the model takes.

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use skyreels_models::layers::{LinearAdapter, LoraDelta};
use skyreels_models::{HunyuanVideoTransformer3DModel, TransformerConfig, TransformerInputs};
use skyreels_pipeline::generate::{ModelPaths, Pipeline};
use skyreels_pipeline::lora::LoraFile;
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

const RANK: usize = 32;

/// A random rank-32 diffusers LoRA on every linear layer of `model`, written to `path`.
fn write_lora(model: &mut HunyuanVideoTransformer3DModel, path: &Path) -> Result<()> {
    let dev = Device::Cpu;
    let mut tensors = HashMap::new();
    for (name, layer) in model.linears_mut() {
        let (out, inp) = layer.dims()?;
        let a = Tensor::randn(0f32, 0.02, (RANK, inp), &dev)?;
        let b = Tensor::randn(0f32, 0.02, (out, RANK), &dev)?;
        tensors.insert(format!("transformer.{name}.lora_A.weight"), a);
        tensors.insert(format!("transformer.{name}.lora_B.weight"), b);
    }
    candle_core::safetensors::save(&tensors, path)?;
    Ok(())
}

fn main() -> Result<()> {
    let runs: usize = match std::env::args().skip(1).find(|a| !a.starts_with("--")) {
        Some(r) => r.parse().context("RUNS must be a positive integer")?,
        None => 3,
    };
    let full_width = std::env::args().any(|a| a == "--full-width");
    skyreels_pipeline::runtime::tune_allocator();
    let dev = Device::Cpu;
    // (heads, dual, single, refiner blocks) and the latent grid (frames, h, w) with text tokens
    let ((heads, dual, single, refiner), (lt, lh, lw, txt)) = if full_width {
        ((24, 1, 1, 1), (2, 16, 24, 64))
    } else {
        ((4, 2, 4, 2), (5, 32, 48, 256))
    };
    let json = serde_json::json!({
        "in_channels": 32, "out_channels": 16, "num_attention_heads": heads,
        "attention_head_dim": 128, "num_layers": dual, "num_single_layers": single,
        "num_refiner_layers": refiner, "mlp_ratio": 4.0, "text_embed_dim": 32,
        "pooled_projection_dim": 32, "rope_axes_dim": [16, 56, 56], "guidance_embeds": true
    });
    let cfg: TransformerConfig = serde_json::from_value(json.clone())?;
    let dir = tempfile::tempdir()?;
    let model_dir = dir.path().join("transformer");
    std::fs::create_dir(&model_dir)?;
    let vars = VarMap::new();
    let mut model = HunyuanVideoTransformer3DModel::new(
        &cfg,
        VarBuilder::from_varmap(&vars, DType::F32, &dev),
    )?;

    // one forward, with 0, 1 and 3 adapters on every layer
    let x = Tensor::randn(0f32, 1.0, (1, 32, lt, lh, lw), &dev)?;
    let timestep = Tensor::new(&[900f32], &dev)?;
    let guidance = Tensor::new(&[1000f32], &dev)?;
    let text = Tensor::randn(0f32, 1.0, (1, txt, 32), &dev)?;
    let mask = Tensor::ones((1, txt), DType::U32, &dev)?;
    let pooled = Tensor::randn(0f32, 1.0, (1, 32), &dev)?;
    let inputs = TransformerInputs {
        hidden_states: &x,
        timestep: &timestep,
        encoder_hidden_states: &text,
        encoder_attention_mask: &mask,
        pooled_projections: &pooled,
        guidance: Some(&guidance),
        riflex_freq_index: 0,
    };
    // a LoRA's matmul work against its layers': Σ r·(in + out) / Σ in·out
    let (lora_work, base_work) =
        model
            .linears_mut()
            .iter()
            .try_fold((0, 0), |(l, b), (_, layer)| {
                let (out, inp) = layer.dims()?;
                anyhow::Ok((l + RANK * (inp + out), b + inp * out))
            })?;
    println!(
        "a rank-{RANK} LoRA adds {:.1}% to the linear layers' multiply-adds",
        100.0 * lora_work as f64 / base_work as f64
    );
    // the adapters of 3 LoRAs per layer; the runs take the first 0, 1 or 3 of them
    let mut all: HashMap<String, Vec<Arc<dyn LinearAdapter>>> = HashMap::new();
    for (name, layer) in model.linears_mut() {
        let (out, inp) = layer.dims()?;
        let adapters = (0..3)
            .map(|_| -> Result<Arc<dyn LinearAdapter>> {
                let a = Tensor::randn(0f32, 0.02, (RANK, inp), &dev)?;
                let b = Tensor::randn(0f32, 0.02, (out, RANK), &dev)?;
                Ok(Arc::new(LoraDelta::new(a, b, None, 1.0)?))
            })
            .collect::<Result<_>>()?;
        all.insert(name, adapters);
    }
    // rounds of (0, 1, 3 LoRAs), one forward each after a warm-up round, so that the load of
    // a shared machine weighs on the three alike; medians over the rounds
    let counts = [0, 1, 3];
    let mut times: Vec<Vec<f64>> = vec![Vec::new(); counts.len()];
    for round in 0..=runs.max(1) {
        for (i, &n) in counts.iter().enumerate() {
            for (name, layer) in model.linears_mut() {
                layer.set_adapters(all[&name][..n].to_vec());
            }
            let t = Instant::now();
            model.forward(&inputs)?.sum_all()?.to_scalar::<f32>()?;
            if round > 0 {
                times[i].push(t.elapsed().as_secs_f64());
            }
        }
    }
    let medians: Vec<f64> = times
        .iter_mut()
        .map(|v| {
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        })
        .collect();
    for (&n, &t) in counts.iter().zip(&medians) {
        let per_lora = if n == 0 {
            String::new()
        } else {
            format!(
                ", +{:.1}% per LoRA",
                100.0 * (t / medians[0] - 1.0) / n as f64
            )
        };
        println!("forward, {n} rank-{RANK} LoRAs on every layer: {t:.3} s{per_lora}");
    }
    if full_width {
        return Ok(());
    }

    // set_loras on a pipeline around the same transformer (saved with its LoRA files)
    vars.save(model_dir.join("diffusion_pytorch_model.safetensors"))?;
    std::fs::write(model_dir.join("config.json"), json.to_string())?;
    let loras: Vec<_> = (0..3)
        .map(|i| {
            let path = dir.path().join(format!("lora{i}.safetensors"));
            write_lora(&mut model, &path).map(|()| path)
        })
        .collect::<Result<_>>()?;

    let tiny = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../weights/tiny");
    let paths = ModelPaths::local(&tiny, Some(&model_dir))?;
    let mut pipe = Pipeline::load(paths, DType::F32, DType::F32, &dev)?;
    let file = |i: usize| LoraFile {
        label: format!("lora{i}"),
        path: loras[i].clone(),
        scale: 1.0,
    };
    let mib = std::fs::metadata(&loras[0])?.len() as f64 / f64::from(1 << 20);
    let timed = |pipe: &mut Pipeline, i: usize| -> Result<f64> {
        let t = Instant::now();
        pipe.set_loras(&[file(i)])?;
        Ok(t.elapsed().as_secs_f64())
    };
    let first = timed(&mut pipe, 0)?;
    let mut switch = Vec::new();
    let mut same = Vec::new();
    for _ in 0..runs.max(1) {
        switch.push(timed(&mut pipe, 1)?);
        same.push(timed(&mut pipe, 1)?);
        switch.push(timed(&mut pipe, 0)?);
        same.push(timed(&mut pipe, 0)?);
    }
    for v in [&mut switch, &mut same] {
        v.sort_by(f64::total_cmp);
    }
    let stats = pipe.lora_cache_stats();
    println!(
        "set_loras ({mib:.1} MiB file): first read {first:.3} s; after another LoRA (cached) \
         {:.3} s; after the same one {:.3} s (median; cache {} hits, {} misses)",
        switch[switch.len() / 2],
        same[same.len() / 2],
        stats.hits,
        stats.misses
    );
    Ok(())
}
