#!/usr/bin/env python3
"""Golden fixtures for the HunyuanVideo transformer, made with diffusers (the reference).

Builds tiny random-weight `HunyuanVideoTransformer3DModel`s, saves them in the real layouts, runs
one forward pass in float32 on CPU and stores inputs and output next to the weights:

  tests/fixtures/transformer/tiny_a/transformer/   diffusers pipeline layout (subfolder), one f32 file
  tests/fixtures/transformer/tiny_b/model/         Skywork layout (weights at the folder root), bf16, sharded + index
  .../io.safetensors                               inputs and the reference output

  tests/fixtures/transformer/tiny_c/transformer/   head dim 128 (FlashAttention's), bf16 storage

Usage: python scripts/gen_transformer_fixtures.py [OUT_DIR [CASE ...]]   (scripts/requirements.txt)
       CASE: tiny_a, tiny_b, tiny_c (default: all)
"""
import json
import sys
from pathlib import Path

import torch
from diffusers import HunyuanVideoTransformer3DModel
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parent.parent


def randomize(model: torch.nn.Module, gen: torch.Generator) -> None:
    """Every parameter random: no zero or identity weights that could hide a bug."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 and ("norm" in name and "linear" not in name):
                # norm scales around 1, norm biases small
                base = 1.0 if name.endswith("weight") else 0.0
                p.copy_(base + 0.2 * torch.randn(p.shape, generator=gen))
            elif p.ndim == 1:
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))
            else:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=gen) / fan_in**0.5)


def build(cfg: dict, seed: int, store_dtype: torch.dtype) -> HunyuanVideoTransformer3DModel:
    gen = torch.Generator().manual_seed(seed)
    model = HunyuanVideoTransformer3DModel(**cfg).eval()
    randomize(model, gen)
    if store_dtype != torch.float32:
        # The reference runs in f32 on exactly the values the checkpoint stores.
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(p.to(store_dtype).float())
    return model


def inputs(cfg: dict, batch: int, latent: tuple, n_txt: int, lengths: list, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    mask = torch.zeros(batch, n_txt)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1.0
    io = {
        "hidden_states": torch.randn(batch, cfg["in_channels"], *latent, generator=gen),
        "timestep": torch.tensor([1000.0, 523.4375][:batch]),
        "encoder_hidden_states": torch.randn(batch, n_txt, cfg["text_embed_dim"], generator=gen),
        "encoder_attention_mask": mask,
        "pooled_projections": torch.randn(batch, cfg["pooled_projection_dim"], generator=gen),
    }
    if cfg["guidance_embeds"]:
        io["guidance"] = torch.tensor([1000.0, 6000.0][:batch])
    return io


def make(out: Path, name: str, cfg: dict, seed: int, store_dtype, subfolder, shard, batch, latent, n_txt, lengths):
    model = build(cfg, seed, store_dtype)
    io = inputs(cfg, batch, latent, n_txt, lengths, seed + 1)
    with torch.no_grad():
        io["output"] = model(**io, return_dict=False)[0]
    case = out / name
    wdir = case / subfolder if subfolder else case
    wdir.mkdir(parents=True, exist_ok=True)
    model.to(store_dtype).save_pretrained(wdir, safe_serialization=True, max_shard_size=shard)
    save_file({k: v.contiguous() for k, v in io.items()}, str(case / "io.safetensors"))
    files = sorted(p.name for p in wdir.iterdir())
    print(f"{name}: output {tuple(io['output'].shape)}, files {files}")


def main() -> None:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "tests" / "fixtures" / "transformer"
    only = set(sys.argv[2:])
    torch.set_num_threads(2)
    cases = []
    # A: SkyReels-I2V-like (32 input channels, 16 out), patch 2, guidance embedder, batch 2 with one
    # padded prompt, non-square latent.
    cfg_a = dict(
        in_channels=32, out_channels=16, num_attention_heads=2, attention_head_dim=16, num_layers=2,
        num_single_layers=2, num_refiner_layers=2, mlp_ratio=4.0, patch_size=2, patch_size_t=1,
        qk_norm="rms_norm", guidance_embeds=True, text_embed_dim=24, pooled_projection_dim=12,
        rope_theta=256.0, rope_axes_dim=(4, 6, 6),
    )
    cases.append(("tiny_a", cfg_a, 1, torch.float32, "transformer", "10GB",
                  dict(batch=2, latent=(3, 6, 10), n_txt=8, lengths=[5, 8])))
    # B: T2V-like, patch 1 and temporal patch 2, 3 heads of 8, no guidance embedder, other depths
    # and mlp ratio, bf16 storage, sharded; batch 1 with padding, odd sizes.
    cfg_b = dict(
        in_channels=16, out_channels=8, num_attention_heads=3, attention_head_dim=8, num_layers=1,
        num_single_layers=3, num_refiner_layers=1, mlp_ratio=2.5, patch_size=1, patch_size_t=2,
        qk_norm="rms_norm", guidance_embeds=False, text_embed_dim=20, pooled_projection_dim=10,
        rope_theta=10000.0, rope_axes_dim=(2, 2, 4),
    )
    cases.append(("tiny_b", cfg_b, 2, torch.bfloat16, "model", "40KB",
                  dict(batch=1, latent=(4, 5, 3), n_txt=7, lengths=[3])))
    # C: SkyReels' head dim (one head of 128, RoPE axes 16/56/56 as the real model; one head keeps the
    # bf16 file under 3 MB, the standalone FlashAttention test covers several heads), so the
    # bf16 GPU test runs FlashAttention inside the model: bf16 storage, batch 2 whose text padding
    # (key counts 162 + 17 and 162 + 40 of 202) ends inside the kernel's 64-key blocks.
    cfg_c = dict(
        in_channels=32, out_channels=16, num_attention_heads=1, attention_head_dim=128, num_layers=1,
        num_single_layers=1, num_refiner_layers=1, mlp_ratio=2.0, patch_size=2, patch_size_t=1,
        qk_norm="rms_norm", guidance_embeds=True, text_embed_dim=32, pooled_projection_dim=16,
        rope_theta=256.0, rope_axes_dim=(16, 56, 56),
    )
    cases.append(("tiny_c", cfg_c, 3, torch.bfloat16, "transformer", "10GB",
                  dict(batch=2, latent=(3, 12, 18), n_txt=40, lengths=[17, 40])))
    for name, cfg, seed, dtype, sub, shard, shapes in cases:
        if not only or name in only:
            make(out, name, cfg, seed, dtype, sub, shard, **shapes)
    # config.json files are written by save_pretrained; echo them for the record
    for p in sorted(out.rglob("config.json")):
        json.loads(p.read_text())


if __name__ == "__main__":
    main()
