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

The `pipeline` fixture joins tokenization and both encoders the way diffusers' HunyuanVideo
pipelines do (`encode_prompt`): tiny tokenizers from scripts/tiny_tokenizers.py (a Llama-3-style
byte-level BPE in tokenizer/, one CLIP BPE as vocab.json + merges.txt in tokenizer_2/ and as
tokenizer.json in tokenizer_2_json/), tiny random encoders sized to them, and io.safetensors with
the token ids, masks, cropped hidden states and pooled vectors diffusers returns for a batch of
two prompts of different lengths (one non-ASCII) and a batch holding one prompt long enough to
truncate both tokenizers. crop_start is computed by our rule (tokens of the template before `{}`,
BOS included) and passed to diffusers explicitly; it is stored as `crop_start`.

Usage: python scripts/gen_text_encoder_fixtures.py [OUT_DIR]   (needs torch + transformers)
"""
import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import AutoTokenizer, CLIPTextConfig, CLIPTextModel, CLIPTokenizer, LlamaConfig, LlamaModel

import tiny_tokenizers

ROOT = Path(__file__).resolve().parent.parent


def randomize_llama(model, gen):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) / (p.shape[-1] ** 0.5))


def randomize_clip(clip, gen):
    with torch.no_grad():
        for pname, p in clip.named_parameters():
            base = 1.0 if pname.endswith("layer_norm1.weight") or pname.endswith("layer_norm2.weight") \
                or pname.endswith("final_layer_norm.weight") else 0.0
            scale = 0.2 if base or "norm" in pname else 1.0 / p.shape[-1] ** 0.5
            p.copy_(base + scale * torch.randn(p.shape, generator=gen))


PROMPTS_A = ["FPS-24, A cat walks on the grass, realistic style.",
             "  Ein Fuchs springt \u00fcber den Zaun \u2014 \u732b\u304c\u8d70\u308b \U0001F408 caf\u00e9\n\n{braces}  "]
PROMPTS_B = [" ".join(["The camera slowly pans across a quiet city street in the rain, with neon lights."] * 14)]


def pipeline_fixture(out, gen):
    """Tokenizers + encoders + diffusers' encode_prompt, as described in the module docstring."""
    from diffusers import HunyuanVideoPipeline
    from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE

    shutil.rmtree(out, ignore_errors=True)
    llama_vocab = tiny_tokenizers.llama3_style(out / "tokenizer")
    clip_vocab = tiny_tokenizers.clip_style(out)
    cfg = LlamaConfig(vocab_size=llama_vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8, rms_norm_eps=1e-5,
                      rope_theta=500000.0, max_position_embeddings=512, tie_word_embeddings=False)
    llama = LlamaModel(cfg).eval()
    randomize_llama(llama, gen)
    ccfg = CLIPTextConfig(vocab_size=clip_vocab, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                          num_attention_heads=4, max_position_embeddings=77, hidden_act="quick_gelu",
                          layer_norm_eps=1e-5, eos_token_id=2, bos_token_id=clip_vocab - 2, pad_token_id=1)
    clip = CLIPTextModel(ccfg).eval()
    randomize_clip(clip, gen)
    llama.save_pretrained(out / "text_encoder", safe_serialization=True)
    clip.save_pretrained(out / "text_encoder_2", safe_serialization=True)

    tok = AutoTokenizer.from_pretrained(out / "tokenizer")
    template = DEFAULT_PROMPT_TEMPLATE["template"]
    crop_start = len(tok(template.split("{}")[0]).input_ids)
    pipe = HunyuanVideoPipeline(text_encoder=llama, tokenizer=tok, transformer=None, vae=None, scheduler=None,
                                text_encoder_2=clip, tokenizer_2=CLIPTokenizer.from_pretrained(out / "tokenizer_2"))
    tensors = {"crop_start": torch.tensor([crop_start], dtype=torch.int64)}
    for tag, prompts in (("a", PROMPTS_A), ("b", PROMPTS_B)):
        full = [template.format(p) for p in prompts]
        t1 = tok(full, max_length=256 + crop_start, padding="max_length", truncation=True, return_tensors="pt")
        t2 = pipe.tokenizer_2(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
        with torch.no_grad():
            embeds, pooled, mask = pipe.encode_prompt(
                prompts, prompt_template={"template": template, "crop_start": crop_start},
                device=torch.device("cpu"), dtype=torch.float32)
        tensors.update({f"{tag}_llama_ids": t1.input_ids, f"{tag}_llama_mask": t1.attention_mask,
                        f"{tag}_clip_ids": t2.input_ids, f"{tag}_embeds": embeds.contiguous(),
                        f"{tag}_mask": mask.contiguous(), f"{tag}_pooled": pooled.contiguous()})
        print(tag, "tokens", t1.attention_mask.sum(1).tolist(), "clip", (t2.input_ids != clip_vocab - 1).sum(1).tolist())
    # the prompts travel in the file's metadata, so the Rust test encodes exactly these strings
    meta = {"a_prompts": json.dumps(PROMPTS_A), "b_prompts": json.dumps(PROMPTS_B)}
    save_file(tensors, str(out / "io.safetensors"), metadata=meta)
    print("pipeline crop_start", crop_start, sorted(p.name for p in out.iterdir()))


def main():
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "tests" / "fixtures" / "text_encoder"
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=56, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8, rms_norm_eps=1e-5,
                      rope_theta=500000.0, max_position_embeddings=64, tie_word_embeddings=False)
    model = LlamaModel(cfg).eval()
    gen = torch.Generator().manual_seed(1)
    randomize_llama(model, gen)
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
        randomize_clip(clip, gen)
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
    pipeline_fixture(out / "pipeline", gen)


if __name__ == "__main__":
    main()
