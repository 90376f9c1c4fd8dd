#!/usr/bin/env python3
"""End-to-end golden fixtures: diffusers' SkyReels pipelines on the bundled tiny weights (weights/tiny).

Each case in tests/fixtures/pipeline/<case>.safetensors holds the injected initial noise `latents`,
the input image `image` (uint8 [H, W, 3], I2V only), the float frames diffusers returns
(`frames` [F, H, W, 3] in [0, 1], output_type "np") and the scheduler's `timesteps`; the request
(prompt, negative prompt, sizes, steps, scales) is JSON in the metadata key `request`.

- i2v_cfg:      HunyuanSkyreelsImageToVideoPipeline, true CFG 6.0 with a negative prompt, embedded 1.0
- i2v_embedded: the same pipeline without true CFG, embedded guidance 3.5, another size and frame count
- t2v:          HunyuanVideoPipeline with true_cfg_scale 6.0 and a negative prompt, using a tiny
                text-to-video transformer (16 input channels) saved under pipeline/t2v_transformer/
- i2v_flow_shift: the I2V pipeline with its scheduler replaced by FlowMatchEulerDiscreteScheduler(shift=3.0)
                (the tiny weights' scheduler_config.json says 7.0): what a request's `flow_shift` /
                `--flow-shift 3` must compute; the request carries `flow_shift`

As the project decisions require: the image latents are the VAE posterior mean (retrieve_latents is
patched), crop_start is the computed value passed explicitly, VAE tiling is enabled (our default),
and the image is already at the target size, so no resize happens on either side.

Usage: python scripts/gen_pipeline_fixtures.py [CASE...]   (needs torch + diffusers==0.42.1; run
scripts/gen_tiny_weights.py first if weights/tiny changed; with CASE names, only those are written)
"""
import json
import sys
import zlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

import diffusers.pipelines.hunyuan_video.pipeline_hunyuan_skyreels_image2video as skyreels_i2v
from diffusers import FlowMatchEulerDiscreteScheduler, HunyuanSkyreelsImageToVideoPipeline, HunyuanVideoPipeline
from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gen_tiny_weights import transformer  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "weights" / "tiny"
OUT = ROOT / "tests" / "fixtures" / "pipeline"

# project decision: the image conditioning is the posterior mean
skyreels_i2v.retrieve_latents = lambda encoder_output, generator=None, sample_mode="sample": \
    encoder_output.latent_dist.mode()


def crop_start(tokenizer) -> int:
    return len(tokenizer(DEFAULT_PROMPT_TEMPLATE["template"].split("{}")[0]).input_ids)


def run_case(name, pipe, req, image=None, seed_name=None):
    gen = torch.Generator().manual_seed(zlib.crc32((seed_name or name).encode()))
    h, w, f = req["height"], req["width"], req["num_frames"]
    latents = torch.randn(1, 16, (f - 1) // 4 + 1, h // 8, w // 8, generator=gen)
    template = {"template": DEFAULT_PROMPT_TEMPLATE["template"], "crop_start": crop_start(pipe.tokenizer)}
    kwargs = dict(prompt=req["prompt"], negative_prompt=req["negative_prompt"], height=h, width=w,
                  num_frames=f, num_inference_steps=req["steps"], true_cfg_scale=req["guidance_scale"],
                  guidance_scale=req["embedded_guidance_scale"], latents=latents.clone(), output_type="np",
                  prompt_template=template)
    tensors = {"latents": latents}
    if image is not None:
        kwargs["image"] = Image.fromarray(image)
        tensors["image"] = torch.from_numpy(image)
    with torch.no_grad():
        frames = pipe(**kwargs).frames[0]
    tensors["frames"] = torch.from_numpy(np.ascontiguousarray(frames)).float()
    tensors["timesteps"] = pipe.scheduler.timesteps.float()
    save_file(tensors, str(OUT / f"{name}.safetensors"), metadata={"request": json.dumps(req)})
    print(name, tuple(frames.shape), "frames mean", float(frames.mean()))


def main(only: list[str]) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    # the random draws of every case happen either way, so no case's inputs depend on which are written
    wanted = lambda name: not only or name in only  # noqa: E731
    rng = np.random.default_rng(0)
    pipe = HunyuanSkyreelsImageToVideoPipeline.from_pretrained(TINY, torch_dtype=torch.float32)
    pipe.vae.enable_tiling()
    pipe.set_progress_bar_config(disable=True)
    neg = "Aerial view, overexposed, low quality, deformation"
    req = dict(prompt="FPS-24, A cat walks on the grass, realistic style.", negative_prompt=neg,
               height=48, width=64, num_frames=9, steps=3, guidance_scale=6.0, embedded_guidance_scale=1.0)
    image = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
    if wanted("i2v_cfg"):
        run_case("i2v_cfg", pipe, req, image)
    req = dict(prompt="FPS-24, The camera slowly pans across a quiet city street.", negative_prompt=None,
               height=48, width=80, num_frames=5, steps=2, guidance_scale=1.0, embedded_guidance_scale=3.5)
    image = rng.integers(0, 256, (48, 80, 3), dtype=np.uint8)
    if wanted("i2v_embedded"):
        run_case("i2v_embedded", pipe, req, image)

    if wanted("t2v"):
        t2v_dir = OUT / "t2v_transformer"
        transformer(16, 7).save_pretrained(t2v_dir, safe_serialization=True)
        t2v = HunyuanVideoPipeline(transformer=transformer(16, 7), vae=pipe.vae, scheduler=pipe.scheduler,
                                   text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer,
                                   text_encoder_2=pipe.text_encoder_2, tokenizer_2=pipe.tokenizer_2)
        t2v.set_progress_bar_config(disable=True)
        req = dict(prompt="FPS-24, A dog runs along the beach at sunset.", negative_prompt=neg,
                   height=64, width=64, num_frames=5, steps=3, guidance_scale=6.0, embedded_guidance_scale=1.0)
        run_case("t2v", t2v, req)

    # FlowMatchEulerDiscreteScheduler(shift=S), the rest of the tiny config unchanged
    req = dict(prompt="FPS-24, A red kite flies over a green hill.", negative_prompt=None,
               height=48, width=64, num_frames=5, steps=3, guidance_scale=1.0, embedded_guidance_scale=3.5,
               flow_shift=3.0)
    assert pipe.scheduler.config.shift != req["flow_shift"]
    image = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
    if wanted("i2v_flow_shift"):
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config, shift=req["flow_shift"])
        shifted = HunyuanSkyreelsImageToVideoPipeline(
            transformer=pipe.transformer, vae=pipe.vae, scheduler=scheduler, text_encoder=pipe.text_encoder,
            tokenizer=pipe.tokenizer, text_encoder_2=pipe.text_encoder_2, tokenizer_2=pipe.tokenizer_2)
        shifted.set_progress_bar_config(disable=True)
        run_case("i2v_flow_shift", shifted, req, image)


if __name__ == "__main__":
    main(sys.argv[1:])
