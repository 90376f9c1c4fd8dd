"""The diffusers side of scripts.bench.generate, in a fresh process of its own (so its time and
peak RSS are its own): HunyuanSkyreelsImageToVideoPipeline on the benchmark's pipeline folder,
image, prompts and injected noise, optionally with a step cache (scripts.fixtures.cache's
`enable_spec`: diffusers' first-block cache, MagCache or TaylorSeer hooks, the TeaCache reference, the
CFG-gating reference).

Usage (run by scripts.bench.generate, from the repository root):
  python -m scripts.bench.generate_diffusers SPEC_JSON
SPEC_JSON: pipeline, image, noise, prompt, negative, height, width, frames, steps, threads,
frames_out, cache ("none" or a `--cache` spec, optionally `+gate:F`), ratios (MagCache's, one array).
Prints
`RESULT generate=S load=S computed=N cached=N`.
"""
import json
import sys
import time

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import diffusers.pipelines.hunyuan_video.pipeline_hunyuan_skyreels_image2video as m
from diffusers import HunyuanSkyreelsImageToVideoPipeline
from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE


def main() -> None:
    m.retrieve_latents = lambda e, generator=None, sample_mode="sample": e.latent_dist.mode()
    a = json.loads(sys.argv[1])
    torch.set_num_threads(a["threads"])
    t0 = time.perf_counter()
    pipe = HunyuanSkyreelsImageToVideoPipeline.from_pretrained(a["pipeline"], torch_dtype=torch.float32)
    pipe.vae.enable_tiling()
    pipe.set_progress_bar_config(disable=True)
    decisions = list
    if a["cache"] != "none":
        # imported only here: it wraps diffusers' cache hooks to record the decisions
        from scripts.fixtures import cache as g
        decisions = g.enable_spec(pipe, a["cache"], a["steps"], a.get("ratios"))
    tmpl = DEFAULT_PROMPT_TEMPLATE["template"]
    crop = len(pipe.tokenizer(tmpl.split("{}")[0]).input_ids)
    noise = load_file(a["noise"])["latents"]
    t1 = time.perf_counter()
    with torch.no_grad():
        frames = pipe(image=Image.open(a["image"]), prompt=a["prompt"], negative_prompt=a["negative"],
                      height=a["height"], width=a["width"], num_frames=a["frames"], num_inference_steps=a["steps"],
                      true_cfg_scale=6.0, guidance_scale=1.0, latents=noise, output_type="np",
                      prompt_template={"template": tmpl, "crop_start": crop}).frames[0]
    t2 = time.perf_counter()
    save_file({"frames": torch.from_numpy(np.ascontiguousarray(frames)).float()}, a["frames_out"])
    decisions = decisions()
    print(f"RESULT generate={t2 - t1:.3f} load={t1 - t0:.3f} computed={sum(decisions)} "
          f"cached={len(decisions) - sum(decisions)}")


if __name__ == "__main__":
    main()
