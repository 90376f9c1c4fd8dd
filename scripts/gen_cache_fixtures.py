#!/usr/bin/env python3
"""Step-cache fixtures: diffusers' SkyReels I2V pipeline on the bundled tiny weights with
diffusers 0.42.1's first-block cache (FirstBlockCacheConfig) or with TeaCache (the committed
reference, scripts/teacache_reference.py), true CFG on and off, two thresholds each.

tests/fixtures/pipeline/cache_<method>_<cfg|nocfg>_<a|b>.safetensors hold what the other pipeline
fixtures hold (latents, image, frames, timesteps; the request as JSON metadata) plus, in the
request, `cache` ("first-block:T" / "teacache:T") and `decisions`: per transformer call in order
(the prompt's call before the negative prompt's in a CFG step) whether its blocks ran.

diffusers' SkyReels I2V pipeline opens no cache context around its two transformer calls (its
first-block cache then fails with "No cache context is set"), so the calls are wrapped in
cache_context("cond") and ("uncond") as diffusers' HunyuanVideo T2V pipeline does; TeaCache keeps
the same two states.

Thresholds are picked from a grid so that each case skips some forwards and computes others, the
two thresholds of a case give different sequences, and the sequence is the same at 0.99 T and
1.01 T (so summation-order noise cannot flip a decision).

Usage: venv/bin/python scripts/gen_cache_fixtures.py   (scripts/requirements.txt)
"""
import sys
from pathlib import Path

import numpy as np
import torch
from diffusers import HunyuanSkyreelsImageToVideoPipeline
from diffusers.hooks import FirstBlockCacheConfig
from diffusers.hooks import first_block_cache as fbc

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gen_pipeline_fixtures as base  # noqa: E402
from teacache_reference import enable_teacache  # noqa: E402

STEPS = 10
DECISIONS = []

_should_compute = fbc.FBCHeadBlockHook._should_compute_remaining_blocks


def _recording(self, residual):
    decision = _should_compute(self, residual)
    DECISIONS.append(bool(decision))
    return decision


fbc.FBCHeadBlockHook._should_compute_remaining_blocks = _recording


def pipeline():
    pipe = HunyuanSkyreelsImageToVideoPipeline.from_pretrained(base.TINY, torch_dtype=torch.float32)
    pipe.vae.enable_tiling()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def with_contexts(transformer, cfg: bool) -> None:
    forward = transformer.forward
    calls = [0]

    def wrapped(*args, **kwargs):
        name = "uncond" if cfg and calls[0] % 2 == 1 else "cond"
        calls[0] += 1
        with transformer.cache_context(name):
            return forward(*args, **kwargs)

    transformer.forward = wrapped


def run(method: str, threshold: float, req: dict, image, seed_name: str, name=None, decisions=None):
    """Runs one case (noise seeded by `seed_name`); returns the decisions. With `name`, writes the
    fixture with the `decisions` a probe run gave (and checks this run makes the same)."""
    pipe = pipeline()
    cfg = req["guidance_scale"] > 1.0 and req["negative_prompt"] is not None
    req = dict(req, cache=f"{method}:{threshold}")
    made = decisions_of(method, pipe, cfg, threshold, req)
    if name is None:
        saved = base.OUT
        base.OUT = Path("/tmp")
        base.run_case("_probe", pipe, req, image, seed_name)
        base.OUT = saved
    else:
        base.run_case(name, pipe, dict(req, decisions=decisions), image, seed_name)
        assert list(made) == decisions, (name, made, decisions)
    return list(made)


def decisions_of(method, pipe, cfg, threshold, req) -> list:
    """Applies the cache to the pipeline's transformer; the list fills as it runs."""
    DECISIONS.clear()
    if method == "first-block":
        pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=threshold))
        with_contexts(pipe.transformer, cfg)
        return DECISIONS
    return enable_teacache(pipe.transformer, threshold, req["steps"], cfg)


def main() -> None:
    rng = np.random.default_rng(1)
    neg = "Aerial view, overexposed, low quality, deformation"
    cfg_req = dict(prompt="FPS-24, A cat walks on the grass, realistic style.", negative_prompt=neg,
                   height=48, width=64, num_frames=9, steps=STEPS, guidance_scale=6.0,
                   embedded_guidance_scale=1.0)
    nocfg_req = dict(prompt="FPS-24, The camera slowly pans across a quiet city street.",
                     negative_prompt=None, height=48, width=64, num_frames=5, steps=STEPS,
                     guidance_scale=1.0, embedded_guidance_scale=3.5)
    grid = [round(x, 4) for x in np.geomspace(0.005, 4.0, 29)]
    for method, short in [("first-block", "fbc"), ("teacache", "tea")]:
        for req, tag in [(cfg_req, "cfg"), (nocfg_req, "nocfg")]:
            image = rng.integers(0, 256, (req["height"], req["width"], 3), dtype=np.uint8)
            key = f"cache_{short}_{tag}"
            seen = {}
            for t in grid:
                d = run(method, t, req, image, key)
                if any(d) and not all(d):
                    seen.setdefault(tuple(d), []).append(t)
            picked = []
            for seq, ts in sorted(seen.items(), key=lambda kv: -sum(not c for c in kv[0])):
                t = ts[len(ts) // 2]
                if all(tuple(run(method, t * f, req, image, key)) == seq for f in (0.99, 1.01)):
                    picked.append(t)
                if len(picked) == 2:
                    break
            if len(picked) < 2:
                raise SystemExit(f"{method} {tag}: no two stable thresholds in {seen}")
            for t, letter in zip(sorted(picked), "ab"):
                d = run(method, t, req, image, key)
                run(method, t, req, image, key, f"{key}_{letter}", d)
                print(f"  {method}:{t} {tag}: {''.join('C' if c else '.' for c in d)}")


if __name__ == "__main__":
    main()
