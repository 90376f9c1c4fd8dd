"""End-to-end generation on CPU, f32: `skyreels generate` vs diffusers on the same weights and inputs.

Builds a mid-size random SkyReels I2V pipeline in OUT (transformer hidden 256 = 4 heads x 64, 2 dual +
4 single blocks; VAE 32/64/64/64 channels; the tiny text encoders of weights/tiny), then runs, each in
a fresh process with the same number of threads, diffusers' HunyuanSkyreelsImageToVideoPipeline and
the release `skyreels` binary on the same image, prompt, negative prompt (true CFG 6.0) and injected
noise (--noise). Prints the generation time of each (model loading excluded: diffusers times its
pipeline call, skyreels reports its stage timings), the whole-process wall times, the ratio
rust/diffusers, both peak RSS values, and the max abs difference of the frames.

With `--cache SPEC[,SPEC...]` (e.g. `--cache first-block:0.05,teacache:0.1,magcache:0.2,max_skip=4,
taylorseer:interval=3,order=2,none+gate:0.7`; a part holding `=` without `:` continues the spec before it,
and `+gate:F` adds `--cfg-gate F`) it also runs each step cache after an uncached run, and prints a
table: time, transformer forwards computed/cached, and the PSNR and SSIM of the frames against the same
side's uncached frames (SSIM as Wang et al. 2004: 11x11 Gaussian window, sigma 1.5, per RGB channel
of each frame, averaged). MagCache runs with the ratios `skyreels calibrate-cache` measures on this
model and request first (both branches' ratios, `cond` and `uncond`; the diffusers side, whose hook
takes one array, gets the `cond` ones, so its decisions may differ from ours). diffusers runs beside
each row (`--no-reference`: only the uncached run): its first-block cache, MagCache and TaylorSeer
hooks (`FirstBlockCacheConfig`, `MagCacheConfig`, `TaylorSeerCacheConfig` with float32 factors; the
I2V pipeline's two calls in cache_context("cond") / ("uncond")), for TeaCache the committed reference
(scripts/common/teacache_reference.py), for `+gate:F` the CFG-gating reference
(scripts/common/cfg_gate_reference.py); TaylorSeer with a gate has no reference row ("-").

The diffusers side runs in scripts/bench/generate_diffusers.py.

Usage: venv/bin/python -m scripts.bench.generate [--threads 2] [--height 256] [--width 384]
       [--frames 17] [--steps 4] [--cache SPECS] [--no-reference] [--out DIR]
"""
import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

TRANSFORMER = dict(num_attention_heads=4, attention_head_dim=64, num_layers=2, num_single_layers=4,
                   num_refiner_layers=1, rope_axes_dim=(16, 24, 24))
VAE = dict(block_out_channels=(32, 64, 64, 64), layers_per_block=1, norm_num_groups=16)
PROMPT = "FPS-24, A cat walks on the grass, realistic style."
NEGATIVE = "Aerial view, overexposed, low quality, deformation"


def run(cmd, env):
    """Runs cmd in a fresh process (in the repository root): (stdout+stderr, wall seconds, peak RSS MiB
    of that process)."""
    import tempfile
    with tempfile.TemporaryFile(mode="w+") as log:
        t = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t
        proc.returncode = os.waitstatus_to_exitcode(status)
        log.seek(0)
        out = log.read()
    if proc.returncode != 0:
        sys.stderr.write(out)
        sys.exit(proc.returncode)
    return out, wall, usage.ru_maxrss / 1024


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--height", type=int, default=256)
    ap.add_argument("--width", type=int, default=384)
    ap.add_argument("--frames", type=int, default=17)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--cache", default="", help="step caches to compare, e.g. first-block:0.05,teacache:0.1")
    ap.add_argument("--no-reference", action="store_true", help="run diffusers for the uncached run only")
    ap.add_argument("--out", type=Path, default=ROOT / "out" / "bench_generate")
    args = ap.parse_args()

    import numpy as np
    import torch
    from PIL import Image
    from safetensors.torch import load_file, save_file
    from scripts.fixtures.tiny_weights import build

    pipeline = args.out / "pipeline"
    if not (pipeline / "model_index.json").exists():
        build(pipeline, seed=5, transformer_cfg=TRANSFORMER, vae_cfg=VAE)
    image = args.out / "image.png"
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:args.height, 0:args.width]
    pic = np.stack([x * 255 / args.width, y * 255 / args.height, 128 + 0 * x], -1)
    pic = (pic + rng.normal(0, 20, pic.shape)).clip(0, 255).astype(np.uint8)
    Image.fromarray(pic).save(image)
    noise = args.out / "noise.safetensors"
    shape = (1, 16, (args.frames - 1) // 4 + 1, args.height // 8, args.width // 8)
    save_file({"latents": torch.randn(shape, generator=torch.Generator().manual_seed(0))}, str(noise))
    subprocess.run(["cargo", "build", "-q", "--release", "-p", "skyreels-cli"], cwd=ROOT, check=True)

    env = dict(os.environ, RAYON_NUM_THREADS=str(args.threads), OMP_NUM_THREADS=str(args.threads))

    def diffusers(cache):
        frames = args.out / f"frames_diffusers_{re.sub('[^A-Za-z0-9.=-]', '_', cache)}.safetensors"
        spec = dict(pipeline=str(pipeline), image=str(image), noise=str(noise), prompt=PROMPT, negative=NEGATIVE,
                    height=args.height, width=args.width, frames=args.frames, steps=args.steps,
                    threads=args.threads, frames_out=str(frames), cache=cache)
        if cache.startswith("magcache"):
            # diffusers' hook takes one array: the conditional branch's
            spec["ratios"] = json.loads(ratios.read_text())["cond"]
        out, wall, rss = run([sys.executable, "-m", "scripts.bench.generate_diffusers", json.dumps(spec)], env)
        m = re.search(r"RESULT generate=([0-9.]+) load=[0-9.]+ computed=(\d+) cached=(\d+)", out)
        counts = (2 * args.steps, 0) if cache == "none" else (int(m.group(2)), int(m.group(3)))
        return dict(gen=float(m.group(1)), wall=wall, rss=rss, frames=frames, counts=counts)

    def skyreels(cache, command="generate", extra=()):
        frames = args.out / f"frames_rust_{re.sub('[^A-Za-z0-9.=-]', '_', cache)}.safetensors"
        cache, _, gate = cache.partition("+gate:")
        cmd = [str(ROOT / "target" / "release" / "skyreels"), command, "--model", str(pipeline),
               "--image", str(image), "--prompt", PROMPT, "--negative-prompt", NEGATIVE,
               "--height", str(args.height), "--width", str(args.width), "--num-frames", str(args.frames),
               "--steps", str(args.steps), "--noise", str(noise), "--cache", cache, "-o", str(frames), *extra]
        if gate:
            cmd += ["--cfg-gate", gate]
        if cache.startswith("magcache"):
            cmd += ["--cache-ratios", str(ratios)]
        out, wall, rss = run(cmd, env)
        m = re.search(r"load ([0-9.]+)s, .* export ([0-9.]+)s, total ([0-9.]+)s; transformer forwards: "
                      r"(\d+) computed, (\d+) from the cache", out)
        gen = float(m.group(3)) - float(m.group(1)) - float(m.group(2))
        return dict(gen=gen, wall=wall, rss=rss, frames=frames, counts=(int(m.group(4)), int(m.group(5))),
                    timings=out.strip().splitlines()[-2])

    def psnr(a, b):
        mse = ((load_file(str(a))["frames"] - load_file(str(b))["frames"]) ** 2).mean().item()
        return float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)

    def ssim(a, b):
        x, y = (load_file(str(f))["frames"].permute(0, 3, 1, 2).double() for f in (a, b))  # F, 3, H, W
        g = torch.exp(-((torch.arange(11) - 5.0) ** 2) / (2 * 1.5 ** 2)).double()
        g = g / g.sum()
        w = (g[:, None] * g[None, :]).expand(3, 1, 11, 11)
        blur = lambda t: torch.nn.functional.conv2d(t, w, groups=3)  # noqa: E731
        mx, my = blur(x), blur(y)
        vx, vy, cxy = blur(x * x) - mx ** 2, blur(y * y) - my ** 2, blur(x * y) - mx * my
        c1, c2 = 0.01 ** 2, 0.03 ** 2
        s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))
        return s.mean().item()

    def specs(text):
        """Comma-separated specs; a part with `=` but no `:` continues the spec before it."""
        out = []
        for part in (p for p in text.split(",") if p):
            if "=" in part and ":" not in part and out:
                out[-1] += "," + part
            else:
                out.append(part)
        return out

    def reference(cache):
        return not args.no_reference and not (cache.startswith("taylorseer") and "+gate:" in cache)

    ratios = args.out / "cache_ratios.json"

    py = diffusers("none")
    rs = skyreels("none")
    diff = (load_file(str(rs["frames"]))["frames"] - load_file(str(py["frames"]))["frames"]).abs().max().item()
    py_gen, py_wall, py_rss = py["gen"], py["wall"], py["rss"]
    rs_gen, rs_wall, rs_rss = rs["gen"], rs["wall"], rs["rss"]
    print(f"config: {args.height}x{args.width}, {args.frames} frames, {args.steps} steps with true CFG, "
          f"{args.threads} threads, f32 CPU")
    print(f"diffusers: generate {py_gen:.2f}s, process {py_wall:.2f}s, peak RSS {py_rss:.0f} MiB")
    print(f"skyreels:  generate {rs_gen:.2f}s, process {rs_wall:.2f}s, peak RSS {rs_rss:.0f} MiB")
    print(f"ratio rust/diffusers (generate): {rs_gen / py_gen:.3f}; frames max abs diff {diff:.2e}")
    print("stage timings (skyreels):", rs["timings"])
    caches = specs(args.cache)
    if any(c.startswith("magcache") for c in caches):
        cal = skyreels("none", "calibrate-cache", ["--ratios", str(ratios)])
        print(f"calibrate-cache: generate {cal['gen']:.2f}s (uncached: {rs_gen:.2f}s), ratios in {ratios}")
    if caches:
        print()
        print("| cache | skyreels | forwards computed/cached | PSNR | SSIM | diffusers (reference) "
              "| forwards computed/cached | PSNR | SSIM |")
        print("|---|---|---|---|---|---|---|---|---|")
        print(f"| none | {rs_gen:.2f} s | {rs['counts'][0]}/{rs['counts'][1]} | - | - | {py_gen:.2f} s "
              f"| {py['counts'][0]}/{py['counts'][1]} | - | - |")
        for cache in caches:
            r = skyreels(cache)
            row = (f"| {cache} | {r['gen']:.2f} s | {r['counts'][0]}/{r['counts'][1]} "
                   f"| {psnr(r['frames'], rs['frames']):.1f} dB | {ssim(r['frames'], rs['frames']):.4f} ")
            if reference(cache):
                d = diffusers(cache)
                row += (f"| {d['gen']:.2f} s | {d['counts'][0]}/{d['counts'][1]} "
                        f"| {psnr(d['frames'], py['frames']):.1f} dB | {ssim(d['frames'], py['frames']):.4f} |")
            else:
                row += "| - | - | - | - |"
            print(row, flush=True)


if __name__ == "__main__":
    main()
