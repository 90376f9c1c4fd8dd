#!/usr/bin/env python3
"""Golden fixtures for the LLaMA text encoder, made with transformers (the reference).

A tiny random `LlamaModel` (grouped-query attention, Llama-3 rope theta) saved as
tests/fixtures/text_encoder/llama/text_encoder/{config.json, model.safetensors}, and io.safetensors
with a right-padded batch of two token sequences, their attention mask and the reference
`hidden_states[-3]` (SkyReels' hidden_state_skip_layer = 2), float32 on CPU.

Two tiny random `CLIPTextModel`s (clip_legacy: eos_token_id 2, pooled at the argmax of the ids, as
openai/clip-vit-large-patch14's config; clip_eos: pooled at the first eos_token_id) under
tests/fixtures/text_encoder/<name>/text_encoder_2/, with io.safetensors holding EOS-padded ids
and the reference `pooler_output`.

Usage: python scripts/gen_text_encoder_fixtures.py [OUT_DIR]   (needs torch + transformers)
"""
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, LlamaConfig, LlamaModel

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

    for name, eos in [("clip_legacy", 2), ("clip_eos", 60)]:
        ccfg = CLIPTextConfig(vocab_size=64, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                              num_attention_heads=4, max_position_embeddings=12, hidden_act="quick_gelu",
                              layer_norm_eps=1e-5, eos_token_id=eos, bos_token_id=62, pad_token_id=1)
        clip = CLIPTextModel(ccfg).eval()
        with torch.no_grad():
            for pname, p in clip.named_parameters():
                base = 1.0 if pname.endswith("layer_norm1.weight") or pname.endswith("layer_norm2.weight") \
                    or pname.endswith("final_layer_norm.weight") else 0.0
                scale = 0.2 if base or "norm" in pname else 1.0 / p.shape[-1] ** 0.5
                p.copy_(base + scale * torch.randn(p.shape, generator=gen))
        # the end-of-text token: the highest id for the legacy rule, 60 otherwise (ids 61..63
        # also occur, so argmax and first-EOS pick different positions)
        end = 63 if eos == 2 else 60
        ids = torch.randint(3, 59, (2, 12), generator=gen)
        ids[:, 0] = 62 if eos != 2 else 3
        ids[0, 5:] = end
        ids[1, 9:] = end
        if eos != 2:
            ids[1, 2] = 63
        with torch.no_grad():
            pooled = clip(input_ids=ids).pooler_output
        d = out / name / "text_encoder_2"
        d.mkdir(parents=True, exist_ok=True)
        clip.save_pretrained(d, safe_serialization=True)
        save_file({"input_ids": ids, "pooled": pooled.contiguous()}, str(out / name / "io.safetensors"))
        print(name, tuple(pooled.shape), sorted(p.name for p in d.iterdir()))


if __name__ == "__main__":
    main()
