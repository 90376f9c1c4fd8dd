#!/usr/bin/env python3
"""The bundled tiny SkyReels I2V pipeline: weights/tiny/, random weights in the real diffusers layout.

Saved by diffusers' own `HunyuanSkyreelsImageToVideoPipeline.save_pretrained`, so the folder has the
hub's structure: model_index.json, scheduler/ (shift 7.0), transformer/ (32 input channels, guidance
embedder), vae/ (8x spatial, 4x temporal compression, 16 latent channels), text_encoder/ (LlamaModel)
with tokenizer/ (a Llama-3-style byte-level BPE), text_encoder_2/ (CLIPTextModel) with tokenizer_2/
(vocab.json + merges.txt, as the hub ships it). Every parameter is random, so videos are noise; the
point is a complete pipeline that runs in seconds on a CPU. `skyreels_defaults.json` holds the
generation defaults for this model (small sizes); the real model's defaults are SkyReels' own.

Usage: python scripts/gen_tiny_weights.py [OUT_DIR]   (needs torch + diffusers==0.42.1)
"""
import json
import shutil
import sys
from pathlib import Path

import torch
from diffusers import (AutoencoderKLHunyuanVideo, FlowMatchEulerDiscreteScheduler,
                       HunyuanSkyreelsImageToVideoPipeline, HunyuanVideoTransformer3DModel)
from transformers import AutoTokenizer, CLIPTextConfig, CLIPTextModel, CLIPTokenizer, LlamaConfig, LlamaModel

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tiny_tokenizers  # noqa: E402
from gen_text_encoder_fixtures import randomize_clip, randomize_llama  # noqa: E402
from gen_transformer_fixtures import randomize  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
# SkyReels' negative prompt, shortened so that the tiny tokenizers (small vocabularies: many
# tokens per word) do not cut it on every default run
DEFAULTS = {"height": 64, "width": 96, "num_frames": 9, "num_inference_steps": 4,
            "negative_prompt": "Aerial view, overexposed, low quality, deformation, a poor composition, "
                               "bad hands, bad limbs, distortion"}

TRANSFORMER = dict(in_channels=32, out_channels=16, num_attention_heads=2, attention_head_dim=16,
                   num_layers=1, num_single_layers=2, num_refiner_layers=1, mlp_ratio=4.0, patch_size=2,
                   patch_size_t=1, qk_norm="rms_norm", guidance_embeds=True, text_embed_dim=32,
                   pooled_projection_dim=32, rope_theta=256.0, rope_axes_dim=(4, 6, 6))
VAE = dict(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(8, 8, 16, 16),
           layers_per_block=1, norm_num_groups=4, scaling_factor=0.476986, spatial_compression_ratio=8,
           temporal_compression_ratio=4, mid_block_add_attention=True)


def transformer(in_channels: int, seed: int, **overrides) -> HunyuanVideoTransformer3DModel:
    torch.manual_seed(seed)
    model = HunyuanVideoTransformer3DModel(**{**TRANSFORMER, **overrides, "in_channels": in_channels}).eval()
    randomize(model, torch.Generator().manual_seed(seed))
    return model


def build(out: Path, seed: int = 0, transformer_cfg=None, vae_cfg=None) -> None:
    """The pipeline in `out`; `transformer_cfg` / `vae_cfg` override the tiny configs (benchmarks)."""
    shutil.rmtree(out, ignore_errors=True)
    tok_dir = out / "_tok"
    llama_vocab = tiny_tokenizers.llama3_style(tok_dir / "tokenizer")
    clip_vocab = tiny_tokenizers.clip_style(tok_dir)
    gen = torch.Generator().manual_seed(seed + 1)
    llama = LlamaModel(LlamaConfig(vocab_size=llama_vocab, hidden_size=32, intermediate_size=48,
                                   num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                   rms_norm_eps=1e-5, rope_theta=500000.0, max_position_embeddings=512,
                                   tie_word_embeddings=False)).eval()
    randomize_llama(llama, gen)
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=clip_vocab, hidden_size=32, intermediate_size=40,
                                        num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77,
                                        hidden_act="quick_gelu", layer_norm_eps=1e-5, eos_token_id=2,
                                        bos_token_id=clip_vocab - 2, pad_token_id=1)).eval()
    randomize_clip(clip, gen)
    torch.manual_seed(seed + 2)
    vae = AutoencoderKLHunyuanVideo(**{**VAE, **(vae_cfg or {})}).eval()
    randomize(vae, torch.Generator().manual_seed(seed + 2))
    pipe = HunyuanSkyreelsImageToVideoPipeline(
        text_encoder=llama, tokenizer=AutoTokenizer.from_pretrained(tok_dir / "tokenizer"),
        transformer=transformer(32, seed + 3, **(transformer_cfg or {})), vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
        text_encoder_2=clip, tokenizer_2=CLIPTokenizer.from_pretrained(tok_dir / "tokenizer_2"))
    pipe.save_pretrained(out, safe_serialization=True)
    # diffusers re-saves tokenizers through transformers; keep the hub's files instead (tokenizer.json
    # for LLaMA, vocab.json + merges.txt for CLIP)
    for sub in ("tokenizer", "tokenizer_2"):
        shutil.rmtree(out / sub)
        shutil.copytree(tok_dir / sub, out / sub)
    shutil.rmtree(tok_dir)
    (out / "skyreels_defaults.json").write_text(json.dumps(DEFAULTS, indent=2) + "\n")


def example_image(path: Path) -> None:
    """A small synthetic picture for the README's first `generate` command (weights/example.png)."""
    import numpy as np
    from PIL import Image
    y, x = np.mgrid[0:128, 0:192].astype(np.float32)
    sky = np.stack([90 + 0.3 * y, 140 + 0.4 * y, 230 - 0.2 * y], -1)
    ground = np.stack([60 + 0.2 * x, 150 - 0.3 * y, 60 + 0 * x], -1)
    img = np.where((y > 80 + 6 * np.sin(x / 15))[..., None], ground, sky)
    sun = (x - 140) ** 2 + (y - 35) ** 2 < 15 ** 2
    img[sun] = (255, 220, 90)
    Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(path)


def main() -> None:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "weights" / "tiny"
    build(out)
    example_image(out.parent / "example.png")
    total = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"{out}: {total / 1e6:.2f} MB")
    for p in sorted(out.rglob("*")):
        if p.is_file():
            print(" ", p.relative_to(out), p.stat().st_size)


if __name__ == "__main__":
    main()
