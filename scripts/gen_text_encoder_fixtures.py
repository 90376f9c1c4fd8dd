#!/usr/bin/env python3
"""Golden fixtures for the LLaMA text encoder, made with transformers (the reference).

A tiny random `LlamaModel` (grouped-query attention, Llama-3 rope theta) saved as
tests/fixtures/text_encoder/llama/text_encoder/{config.json, model.safetensors}, and io.safetensors
with a right-padded batch of two token sequences, their attention mask and the reference
`hidden_states[-3]` (SkyReels' hidden_state_skip_layer = 2), float32 on CPU.

Usage: python scripts/gen_text_encoder_fixtures.py [OUT_DIR]   (needs torch + transformers)
"""
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaModel

ROOT = Path(__file__).resolve().parent.parent


def main():
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "tests" / "fixtures" / "text_encoder"
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=56, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8, rms_norm_eps=1e-5,
                      rope_theta=500000.0, max_position_embeddings=64, tie_word_embeddings=False)
    model = LlamaModel(cfg).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) / (p.shape[-1] ** 0.5))
    ids = torch.randint(0, cfg.vocab_size, (2, 9), generator=gen)
    mask = torch.zeros(2, 9, dtype=torch.int64)
    mask[0, :9] = 1
    mask[1, :5] = 1
    ids[1, 5:] = 3  # pad token
    with torch.no_grad():
        hs = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    d = out / "llama" / "text_encoder"
    d.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(d, safe_serialization=True)
    save_file({"input_ids": ids, "attention_mask": mask, "hidden_states_m3": hs[-3].contiguous()},
              str(out / "llama" / "io.safetensors"))
    print("hidden_states", len(hs), tuple(hs[-3].shape), sorted(p.name for p in d.iterdir()))


if __name__ == "__main__":
    main()
