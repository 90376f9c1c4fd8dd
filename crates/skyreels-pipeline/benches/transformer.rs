//! One transformer forward pass on the CPU in f32, timed.
//!
//! `scripts/bench/transformer.py` writes a mid-size random checkpoint and its inputs with
//! diffusers, times diffusers, then runs this and prints both times and the ratio:
//!
//!     cargo bench -p skyreels-pipeline --bench transformer -- DIR [RUNS]
//!
//! DIR holds the transformer folder and `io.safetensors` (inputs, plus the reference `output` when
//! present, which is compared as a sanity check). Threads: `RAYON_NUM_THREADS`.

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use skyreels_models::TransformerInputs;
use std::path::PathBuf;
use std::time::Instant;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let Some(dir) = args.first().map(PathBuf::from) else {
        bail!("usage: cargo bench -p skyreels-pipeline --bench transformer -- DIR [RUNS]  (see scripts/bench/transformer.py)")
    };
    let runs: usize = match args.get(1) {
        Some(r) => r.parse().context("RUNS must be a positive integer")?,
        None => 3,
    };
    skyreels_pipeline::runtime::tune_allocator();
    let dev = Device::Cpu;
    let t0 = Instant::now();
    let model = skyreels_pipeline::load_transformer(&dir, None, DType::F32, &dev)?;
    eprintln!("loaded in {:.2}s", t0.elapsed().as_secs_f64());
    let io = candle_core::safetensors::load(dir.join("io.safetensors"), &dev)?;
    let inputs = TransformerInputs::from_named(&io)?;
    let out = model.forward(&inputs)?; // warm-up
    let mut times = Vec::with_capacity(runs);
    for _ in 0..runs.max(1) {
        let t = Instant::now();
        let y = model.forward(&inputs)?;
        // candle is eager; force completion anyway for honesty on lazy backends
        y.sum_all()?.to_scalar::<f32>()?;
        times.push(t.elapsed().as_secs_f64());
    }
    times.sort_by(|a, b| a.total_cmp(b));
    let median = times[times.len() / 2];
    if let Some(want) = io.get("output") {
        let num = (&out - want)?.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
        let den = want.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
        println!("parity rel_l2={:.3e}", (num / den).sqrt());
    }
    println!(
        "rust forward: median {median:.3}s min {:.3}s over {} runs (threads {})",
        times[0],
        times.len(),
        std::env::var("RAYON_NUM_THREADS").unwrap_or_else(|_| "all".into())
    );
    let list: Vec<String> = times.iter().map(|t| format!("{t:.4}")).collect();
    println!("RESULT times={}", list.join(","));
    Ok(())
}
