//! VAE decode on the CPU in f32: time and peak memory.
//!
//!     cargo bench -p skyreels-pipeline --bench vae -- DIR [RUNS] [--no-tiling]
//!
//! DIR holds a VAE folder (`vae/` or bare) and `io.safetensors` with `latents` (b, c, t, h, w)
//! and optionally the reference `output`. Prints the median decode time and the process's peak
//! resident memory (VmHWM), which `scripts/bench/vae.py` uses to show that tiled decoding is
//! bounded by the tile, not the clip. Threads: `RAYON_NUM_THREADS`.

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use skyreels_models::Tiling;
use std::path::PathBuf;
use std::time::Instant;

/// Peak resident set size of this process, in MiB (Linux).
fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let no_tiling = args.iter().any(|a| a == "--no-tiling");
    let pos: Vec<&String> = args.iter().filter(|a| !a.starts_with("--")).collect();
    let Some(dir) = pos.first().map(PathBuf::from) else {
        bail!("usage: cargo bench -p skyreels-pipeline --bench vae -- DIR [RUNS] [--no-tiling]  (see scripts/bench/vae.py)")
    };
    let runs: usize = match pos.get(1) {
        Some(r) => r.parse().context("RUNS must be a positive integer")?,
        None => 3,
    };
    skyreels_pipeline::runtime::tune_allocator();
    let dev = Device::Cpu;
    let mut vae = skyreels_pipeline::load_vae(&dir, DType::F32, &dev)?;
    if no_tiling {
        vae.set_tiling(Tiling::off())?;
    }
    let io = candle_core::safetensors::load(dir.join("io.safetensors"), &dev)?;
    let z = io.get("latents").context("io.safetensors has no latents")?;
    let base = peak_rss_mib().unwrap_or(0.0);
    let mut times = Vec::new();
    let mut out = None;
    for _ in 0..runs.max(1) {
        let t = Instant::now();
        out = Some(vae.decode(z)?);
        times.push(t.elapsed().as_secs_f64());
    }
    let out = out.expect("at least one run");
    times.sort_by(|a, b| a.total_cmp(b));
    if let Some(want) = io.get("output") {
        let num = (&out - want)?.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
        let den = want.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
        println!("parity rel_l2={:.3e}", (num / den).sqrt());
    }
    let peak = peak_rss_mib().unwrap_or(0.0);
    println!(
        "rust decode {:?} -> {:?}: median {:.3}s over {} runs, tiling {}, peak RSS {peak:.0} MiB \
         (after loading {base:.0} MiB)",
        z.dims(),
        out.dims(),
        times[times.len() / 2],
        times.len(),
        if no_tiling { "off" } else { "on" },
    );
    let list: Vec<String> = times.iter().map(|t| format!("{t:.4}")).collect();
    println!("RESULT times={} peak_mib={peak:.1}", list.join(","));
    Ok(())
}
