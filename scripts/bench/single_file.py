"""Single-file checkpoints on CPU: resident weights, peak RSS, load and forward time, ours vs diffusers.

Writes one mid-size random HunyuanVideo transformer (scripts/bench/transformer.py's config: hidden
512 = 4 heads x 128, 2 dual + 4 single blocks, 2 refiner blocks, LLaMA-width text input; 46 M
parameters, bf16-rounded) in the original key layout as

  bf16.safetensors   the reference size (2 bytes per weight)
  fp8.safetensors    2-D weights fp8 e4m3fn, the rest bf16
  q8_0.gguf          2-D weights Q8_0 (the `gguf` package), the rest F32
  q4_k.gguf          2-D weights Q4_K (`skyreels quantize --type Q4_K`), the rest F32

then, each in a fresh process with the same threads, loads every file and times one transformer
forward (latent 4x34x68 = 2,312 video tokens + 256 text tokens) on both sides:

- ours: the release `skyreels bench --device cpu --transformer FILE --parts transformer`, f32 compute;
  fp8 and GGUF matmul weights stay in their stored form and are expanded one layer at a time.
- diffusers 0.42.1: `from_single_file` in f32; fp8 with `enable_layerwise_casting(float8_e4m3fn,
  float32)` after loading (its way to keep fp8 in memory); GGUF with GGUFQuantizationConfig.

Prints a table: file size, resident weight bytes (ours, as the loader counts them, and as a share
of the bf16 size), peak RSS of each process (getrusage of the child), load and median forward time.

The diffusers side runs in scripts/bench/single_file_diffusers.py, every measured process under
scripts/bench/peak_rss.py (a lean parent: see there).

Usage: venv/bin/python -m scripts.bench.single_file [--threads 2] [--runs 2] [--out DIR]
"""
import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import torch

from scripts.bench.transformer import CONFIG, LATENT, N_TXT, N_VALID

ROOT = Path(__file__).resolve().parents[2]


def run(cmd, env=None):
    """Runs `cmd` (in the repository root); returns its output and its own peak RSS in MiB."""
    res = subprocess.run([sys.executable, "-S", "-m", "scripts.bench.peak_rss", *cmd], capture_output=True,
                         text=True, env=env, cwd=ROOT)
    if res.returncode != 0:
        sys.exit(f"{cmd[0]} failed:\n{res.stdout}{res.stderr}")
    rss = int(re.search(r"MAXRSS_KIB (\d+)", res.stdout).group(1))
    return res.stdout, rss / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=2, help="timed forwards after one warm-up")
    ap.add_argument("--out", type=Path, default=ROOT / "out" / "bench_single_file")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    import gguf
    from scripts.fixtures.single_file import to_original, write_gguf
    from scripts.fixtures.transformer import build
    from safetensors.torch import save_file

    binary = ROOT / "target" / "release" / "skyreels"
    subprocess.run(["cargo", "build", "-q", "--release", "-p", "skyreels-cli"], cwd=ROOT, check=True)
    torch.manual_seed(0)
    model = build(CONFIG, seed=5, store_dtype=torch.bfloat16)
    params = sum(p.numel() for p in model.parameters())
    cfg_dir = args.out / "config"
    model.save_config(cfg_dir)
    orig = to_original({k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}, CONFIG)
    del model
    files = {"bf16": args.out / "bf16.safetensors", "fp8": args.out / "fp8.safetensors",
             "q8_0": args.out / "q8_0.gguf", "q4_k": args.out / "q4_k.gguf"}
    save_file(orig, str(files["bf16"]))
    save_file({k: (v.to(torch.float8_e4m3fn) if v.ndim == 2 else v) for k, v in orig.items()}, str(files["fp8"]))
    write_gguf(files["q8_0"], orig, gguf.GGMLQuantizationType.Q8_0)
    subprocess.run([str(binary), "quantize", str(files["bf16"]), str(files["q4_k"]), "--type", "Q4_K"],
                   check=True, stdout=subprocess.DEVNULL)
    del orig
    bf16_bytes = files["bf16"].stat().st_size
    lt, lh, lw = LATENT
    env = dict(os.environ, RAYON_NUM_THREADS=str(args.threads), OMP_NUM_THREADS=str(args.threads))
    print(f"{params / 1e6:.1f} M parameters; latent {LATENT}, {N_TXT} text tokens; {args.threads} threads")
    rows = []
    for name, path in files.items():
        text, ours_rss = run([str(binary), "bench", "--device", "cpu", "--transformer", str(path),
                              "--parts", "transformer", "--runs", str(args.runs), "--height", str(lh * 8),
                              "--width", str(lw * 8), "--num-frames", str((lt - 1) * 4 + 1)], env)
        resident = float(re.search(r"([\d.]+) MiB resident", text).group(1))
        built = float(re.search(r"transformer built in ([\d.]+) s", text).group(1))
        forward = float(re.search(r"forward\s+([\d.]+) s", text).group(1))
        a = dict(file=str(path), config=str(cfg_dir), threads=args.threads, runs=args.runs,
                 hidden=CONFIG["num_attention_heads"] * CONFIG["attention_head_dim"],
                 latent=LATENT, n_txt=N_TXT, n_valid=N_VALID)
        text, ref_rss = run([sys.executable, "-m", "scripts.bench.single_file_diffusers", json.dumps(a)], env)
        ref = json.loads(next(line for line in text.splitlines() if line.startswith("{")))
        rows.append((name, path.stat().st_size / 2**20, resident, 100 * resident * 2**20 / bf16_bytes,
                     ours_rss, built, forward, ref_rss, ref["load"], ref["forward"]))
        print(f"{name} done", flush=True)
    print("| file | size MiB | ours: resident weights MiB (% of bf16) | peak RSS MiB | load s | forward s "
          "| diffusers: peak RSS MiB | load s | forward s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]:.1f} | {r[2]:.1f} ({r[3]:.0f}%) | {r[4]:.0f} | {r[5]:.2f} | {r[6]:.2f} "
              f"| {r[7]:.0f} | {r[8]:.2f} | {r[9]:.2f} |")


if __name__ == "__main__":
    main()
