"""Transformer forward on CPU, f32: our candle implementation vs diffusers, same weights and inputs.

Writes a mid-size random HunyuanVideo transformer (default: hidden 512 = 4 heads x 128, 2 dual + 4
single blocks, 32 input channels, latent 4x34x68 -> 2,312 video tokens, 256 text tokens of which
180 are real) to OUT (default out/bench_transformer), times diffusers with 2 torch threads, runs
`cargo bench --bench transformer` with RAYON_NUM_THREADS=2 on the same folder, and prints both
median times and the ratio rust/diffusers (<= 1.0 means we are not slower).

Usage: venv/bin/python -m scripts.bench.transformer [--runs 3] [--rounds 4] [--threads 2] [--out DIR]
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
from diffusers import HunyuanVideoTransformer3DModel
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[2]

CONFIG = dict(
    in_channels=32, out_channels=16, num_attention_heads=4, attention_head_dim=128, num_layers=2,
    num_single_layers=4, num_refiner_layers=2, mlp_ratio=4.0, patch_size=2, patch_size_t=1,
    qk_norm="rms_norm", guidance_embeds=True, text_embed_dim=4096, pooled_projection_dim=768,
    rope_theta=256.0, rope_axes_dim=(16, 56, 56),
)
LATENT = (4, 34, 68)
N_TXT, N_VALID = 256, 180


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3, help="timed forwards per side per round")
    ap.add_argument("--rounds", type=int, default=4, help="alternating rounds")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ROOT / "out" / "bench_transformer")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    model = HunyuanVideoTransformer3DModel(**CONFIG).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) / (p[0].numel() ** 0.5 if p.ndim > 1 else 5.0))
    mask = torch.zeros(1, N_TXT)
    mask[0, :N_VALID] = 1
    io = {
        "hidden_states": torch.randn(1, CONFIG["in_channels"], *LATENT),
        "timestep": torch.tensor([995.0981]),
        "encoder_hidden_states": torch.randn(1, N_TXT, CONFIG["text_embed_dim"]),
        "encoder_attention_mask": mask,
        "pooled_projections": torch.randn(1, CONFIG["pooled_projection_dim"]),
        "guidance": torch.tensor([1000.0]),
    }
    n_img = LATENT[0] * (LATENT[1] // 2) * (LATENT[2] // 2)
    print(f"config: hidden {CONFIG['num_attention_heads'] * CONFIG['attention_head_dim']}, "
          f"{CONFIG['num_layers']} dual + {CONFIG['num_single_layers']} single blocks, "
          f"{n_img} video + {N_TXT} text tokens ({N_VALID} real), threads {args.threads}")

    with torch.no_grad():
        out = model(**io, return_dict=False)[0]  # warm-up and reference output
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out, safe_serialization=True)
    io["output"] = out
    save_file({k: v.contiguous() for k, v in io.items()}, str(args.out / "io.safetensors"))
    del io["output"]

    # Build first, so compilation never overlaps a timing.
    subprocess.run(["cargo", "build", "-q", "--release", "--benches", "-p", "skyreels-pipeline"], cwd=ROOT, check=True)
    env = dict(os.environ, RAYON_NUM_THREADS=str(args.threads))
    cmd = ["cargo", "bench", "-q", "-p", "skyreels-pipeline", "--bench", "transformer", "--",
           str(args.out), str(args.runs)]

    # This machine's speed drifts by ~10% over seconds: alternate the two sides for several
    # rounds and compare medians over all rounds, so drift hits both alike.
    py_times, rust_times, parity = [], [], ""
    for r in range(args.rounds):
        with torch.no_grad():
            for _ in range(args.runs):
                t = time.perf_counter()
                model(**io, return_dict=False)
                py_times.append(time.perf_counter() - t)
        res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        if res.returncode != 0:
            sys.stderr.write(res.stdout + res.stderr)
            sys.exit(res.returncode)
        rust_times += [float(x) for x in re.search(r"RESULT times=([0-9.,]+)", res.stdout).group(1).split(",")]
        parity = re.search(r"parity (rel_l2=\S+)", res.stdout).group(1)
        print(f"round {r + 1}: diffusers {statistics.median(py_times[-args.runs:]):.3f}s, "
              f"rust {statistics.median(rust_times[-args.runs:]):.3f}s")
    py, rust = statistics.median(py_times), statistics.median(rust_times)
    print(f"rust vs diffusers output: {parity}")
    print(f"diffusers forward: median {py:.3f}s (min {min(py_times):.3f}s) over {len(py_times)} runs")
    print(f"rust forward:      median {rust:.3f}s (min {min(rust_times):.3f}s) over {len(rust_times)} runs")
    print(f"ratio rust/diffusers = {rust / py:.3f} (medians), {min(rust_times) / min(py_times):.3f} (best runs)")


if __name__ == "__main__":
    main()
