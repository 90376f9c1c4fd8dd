#!/usr/bin/env python3
"""Golden fixtures for the HunyuanVideo VAE, made with diffusers (the reference).

Two tiny random-weight `AutoencoderKLHunyuanVideo`s in the diffusers layout
(tests/fixtures/vae/<name>/vae/{config.json, diffusion_pytorch_model.safetensors}) and, next to
them, cases.safetensors with inputs and reference outputs (float32, CPU) of:
  enc_image        encode of one non-square image (posterior mean and logvar)
  enc_video        encode of 4k+1 frames without tiling
  dec_video        decode without tiling
  dec_t            decode with temporal tiling (small tile settings)
  dec_s            decode with spatial tiling (small tile settings)
  dec_ts           decode with both
  enc_s / enc_t    encode of one image with spatial tiling / of 13 frames with temporal tiling
  dec_default      decode with the default (SkyReels) tile settings: temporal tiling of 7 latents
Tile settings per case are stored as int tensors `<case>.tiling` = [min_h, min_w, min_frames,
stride_h, stride_w, stride_frames, spatial(0/1)].

Usage: python scripts/gen_vae_fixtures.py [OUT_DIR]   (needs torch + diffusers==0.42.1)
"""
import sys
from pathlib import Path

import torch
from diffusers import AutoencoderKLHunyuanVideo
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parent.parent
DEFAULT = (256, 256, 16, 192, 192, 12)


def randomize(model, gen):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 and "norm" in name:
                base = 1.0 if name.endswith("weight") else 0.0
                p.copy_(base + 0.2 * torch.randn(p.shape, generator=gen))
            elif p.ndim == 1:
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) / p[0].numel() ** 0.5)


def set_tiling(vae, tiling, spatial=True):
    vae.use_tiling = spatial
    vae.use_framewise_encoding = vae.use_framewise_decoding = True
    (vae.tile_sample_min_height, vae.tile_sample_min_width, vae.tile_sample_min_num_frames,
     vae.tile_sample_stride_height, vae.tile_sample_stride_width, vae.tile_sample_stride_num_frames) = tiling


def make(out: Path, name: str, cfg: dict, seed: int, small: tuple, shapes: dict):
    gen = torch.Generator().manual_seed(seed)
    vae = AutoencoderKLHunyuanVideo(**cfg).eval()
    randomize(vae, gen)
    data = {}

    def record(case, kind, x, tiling, spatial):
        set_tiling(vae, tiling, spatial)
        with torch.no_grad():
            if kind == "enc":
                dist = vae.encode(x).latent_dist
                data[f"{case}.mean"], data[f"{case}.logvar"] = dist.mean, dist.logvar
            else:
                data[f"{case}.output"] = vae.decode(x).sample
        data[f"{case}.input"] = x
        data[f"{case}.tiling"] = torch.tensor(list(tiling) + [int(spatial)], dtype=torch.int64)

    c, l = cfg["in_channels"], cfg["latent_channels"]
    rnd = lambda *s: torch.randn(*s, generator=gen)
    record("enc_image", "enc", rnd(1, c, 1, *shapes["image"]), DEFAULT, True)
    record("enc_video", "enc", rnd(1, c, 9, *shapes["small"]), DEFAULT, False)
    record("dec_video", "dec", rnd(1, l, 3, *shapes["latent"]), DEFAULT, False)
    record("dec_t", "dec", rnd(1, l, 6, *shapes["latent"]), small, False)
    record("dec_s", "dec", rnd(1, l, 2, *shapes["latent_big"]), small, True)
    record("dec_ts", "dec", rnd(1, l, 4, *shapes["latent_big"]), small, True)
    record("enc_s", "enc", rnd(1, c, 1, *shapes["image_big"]), small, True)
    record("enc_t", "enc", rnd(1, c, 13, *shapes["small"]), small, False)
    record("dec_default", "dec", rnd(1, l, 7, *shapes["latent"]), DEFAULT, True)

    case_dir = out / name
    (case_dir / "vae").mkdir(parents=True, exist_ok=True)
    vae.save_pretrained(case_dir / "vae", safe_serialization=True)
    save_file({k: v.contiguous() for k, v in data.items()}, str(case_dir / "cases.safetensors"))
    print(name, {k: tuple(v.shape) for k, v in data.items() if not k.endswith(".tiling")})


def main():
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "tests" / "fixtures" / "vae"
    torch.set_num_threads(2)
    # A: the real structure (4 blocks, 8x spatial, 4x temporal) at tiny widths, 1 layer per block
    cfg_a = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(4, 8, 8, 8),
                 layers_per_block=1, norm_num_groups=2, spatial_compression_ratio=8,
                 temporal_compression_ratio=4, mid_block_add_attention=True)
    # small tiles: 32 px (4 latents) with stride 24 (3 latents); 8 frames with stride 4
    make(out, "tiny_a", cfg_a, 1, (32, 32, 8, 24, 24, 4),
         dict(image=(24, 40), small=(16, 24), image_big=(40, 56), latent=(2, 3), latent_big=(5, 6)))
    # B: 3 blocks, 4x spatial, other widths, groups, latent channels and 2 layers per block
    cfg_b = dict(in_channels=3, out_channels=3, latent_channels=3, block_out_channels=(3, 6, 6),
                 down_block_types=("HunyuanVideoDownBlock3D",) * 3,
                 up_block_types=("HunyuanVideoUpBlock3D",) * 3,
                 layers_per_block=2, norm_num_groups=3, spatial_compression_ratio=4,
                 temporal_compression_ratio=4, mid_block_add_attention=True)
    make(out, "tiny_b", cfg_b, 2, (16, 24, 8, 12, 16, 4),
         dict(image=(12, 20), small=(8, 12), image_big=(28, 36), latent=(3, 5), latent_big=(7, 9)))


if __name__ == "__main__":
    main()
