"""VAE decode on CPU, f32: speed vs diffusers, and peak memory of tiled vs untiled decoding.

Writes a mid-size random HunyuanVideo VAE (block_out_channels 64/128/128/128, 2 layers per
block, 32 groups, 16 latent channels; the real one is 128/256/512/512) to OUT, then:
 1. speed: decodes a (1, 16, 5, 16, 16) latent (17 frames of 128x128) with diffusers (tiling on,
    as SkyReels runs it) and with `cargo bench --bench vae`, alternating for several rounds, both
    with 2 threads; prints both medians and the ratio.
 2. memory: for clips of 5..49 frames, runs our decoder in a fresh process with tiling on and
    off and prints the peak resident memory of each, showing that the tiled decode is bounded by
    the tile, not by the frame count.

Usage: venv/bin/python -m scripts.bench.vae [--runs 2] [--rounds 3] [--threads 2] [--out DIR]
"""
import argparse
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from diffusers import AutoencoderKLHunyuanVideo
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[2]
CONFIG = dict(block_out_channels=(64, 128, 128, 128), layers_per_block=2, norm_num_groups=32,
              latent_channels=16)


def rust(out: Path, runs: int, threads: int, extra=()):
    env = dict(os.environ, RAYON_NUM_THREADS=str(threads))
    cmd = ["cargo", "bench", "-q", "-p", "skyreels-pipeline", "--bench", "vae", "--", str(out), str(runs), *extra]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if res.returncode != 0:
        sys.stderr.write(res.stdout + res.stderr)
        sys.exit(res.returncode)
    m = re.search(r"RESULT times=([0-9.,]+) peak_mib=([0-9.]+)", res.stdout)
    parity = re.search(r"parity (rel_l2=\S+)", res.stdout)
    return [float(x) for x in m.group(1).split(",")], float(m.group(2)), parity.group(1) if parity else ""


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ROOT / "out" / "bench_vae")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    vae = AutoencoderKLHunyuanVideo(**CONFIG).eval()
    with torch.no_grad():
        for p in vae.parameters():
            p.copy_(torch.randn_like(p) / (p[0].numel() ** 0.5 if p.ndim > 1 else 5.0))
    vae.enable_tiling()
    args.out.mkdir(parents=True, exist_ok=True)
    vae.save_pretrained(args.out / "vae", safe_serialization=True)
    subprocess.run(["cargo", "build", "-q", "--release", "--benches", "-p", "skyreels-pipeline"], cwd=ROOT, check=True)

    z = torch.randn(1, 16, 5, 16, 16)
    with torch.no_grad():
        ref = vae.decode(z).sample
    save_file({"latents": z, "output": ref}, str(args.out / "io.safetensors"))
    py_times, rs_times = [], []
    for r in range(args.rounds):
        with torch.no_grad():
            for _ in range(args.runs):
                t = time.perf_counter()
                vae.decode(z)
                py_times.append(time.perf_counter() - t)
        times, _, parity = rust(args.out, args.runs, args.threads)
        rs_times += times
        print(f"round {r + 1}: diffusers {statistics.median(py_times[-args.runs:]):.3f}s, "
              f"rust {statistics.median(times):.3f}s")
    py, rs = statistics.median(py_times), statistics.median(rs_times)
    print(f"decode {tuple(z.shape)} -> {tuple(ref.shape)}, rust vs diffusers output: {parity}")
    print(f"diffusers decode: median {py:.3f}s (min {min(py_times):.3f}s) over {len(py_times)} runs")
    print(f"rust decode:      median {rs:.3f}s (min {min(rs_times):.3f}s) over {len(rs_times)} runs")
    print(f"ratio rust/diffusers = {rs / py:.3f} (medians), {min(rs_times) / min(py_times):.3f} (best runs)")

    print("\npeak resident memory of one decode (fresh process each), 128x128 frames:")
    print(f"{'latent frames':>14} {'frames':>7} {'tiled MiB':>10} {'untiled MiB':>12}")
    for t in (2, 4, 7, 10, 13):
        save_file({"latents": torch.randn(1, 16, t, 16, 16)}, str(args.out / "io.safetensors"))
        _, tiled, _ = rust(args.out, 1, args.threads)
        _, untiled, _ = rust(args.out, 1, args.threads, ["--no-tiling"])
        print(f"{t:>14} {4 * (t - 1) + 1:>7} {tiled:>10.0f} {untiled:>12.0f}")


if __name__ == "__main__":
    main()
