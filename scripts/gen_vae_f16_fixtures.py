#!/usr/bin/env python3
"""fp16 references for the VAE (HunyuanVideo and SkyReels decode in fp16; `--vae-dtype f16`): the
committed tiny VAEs of tests/fixtures/vae run by diffusers 0.42.1 in torch.float16 on the CPU, on the
f32 fixtures' own decode and image-encode inputs rounded to fp16.

Writes tests/fixtures/vae/<name>/f16.safetensors: `<case>.output` (decode) or `<case>.mean`
(encode, the posterior mean) as float16, for dec_video, dec_default, dec_ts and enc_image, with
the tile settings of the f32 fixture of the same name.

Usage: venv/bin/python scripts/gen_vae_f16_fixtures.py   (scripts/requirements.txt)
"""
from pathlib import Path

import torch
from diffusers import AutoencoderKLHunyuanVideo
from safetensors.torch import load_file, save_file

from gen_vae_fixtures import set_tiling

ROOT = Path(__file__).resolve().parent.parent


def main():
    torch.set_num_threads(2)
    for name in ["tiny_a", "tiny_b"]:
        case_dir = ROOT / "tests" / "fixtures" / "vae" / name
        vae = AutoencoderKLHunyuanVideo.from_pretrained(case_dir / "vae", torch_dtype=torch.float16).eval()
        cases = load_file(str(case_dir / "cases.safetensors"))
        out = {}
        for case in ["dec_video", "dec_default", "dec_ts", "enc_image"]:
            t = cases[f"{case}.tiling"].tolist()
            set_tiling(vae, tuple(t[:6]), bool(t[6]))
            x = cases[f"{case}.input"].half()
            with torch.no_grad():
                if case.startswith("dec"):
                    out[f"{case}.output"] = vae.decode(x).sample
                else:
                    out[f"{case}.mean"] = vae.encode(x).latent_dist.mean
            key = f"{case}.output" if case.startswith("dec") else f"{case}.mean"
            ref = cases[key]
            err = ((out[key].float() - ref).norm() / ref.norm()).item()
            print(f"{name} {case}: fp16 vs the f32 reference, relative L2 {err:.2e}")
        save_file({k: v.contiguous() for k, v in out.items()}, str(case_dir / "f16.safetensors"))


if __name__ == "__main__":
    main()
