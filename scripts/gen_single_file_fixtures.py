#!/usr/bin/env python3
"""Single-file transformer fixtures (original HunyuanVideo key layout), with diffusers' outputs.

Builds one tiny random `HunyuanVideoTransformer3DModel` (one head of 128, so RoPE's 16/56/56 axes
and every config field follow from the tensor shapes; text and pooled widths of 256 so that most
matmul weights take K-quants), writes it in the layout of ComfyUI / Kijai / city96 files, and runs
diffusers 0.42.1 loading each file as a user would:

  orig_bf16.safetensors        original keys, bf16               from_single_file
  orig_fp8.safetensors         2-D weights fp8 e4m3fn, rest bf16 from_single_file (cast to f32 at load)
  orig_fp8_scaled.safetensors  ComfyUI scaled fp8: weight / scale in fp8, `scale_weight`, `scaled_fp8`
                               (diffusers has no loader for it: the reference loads an f32 copy of
                               weight.float() * scale_weight with from_single_file)
  orig_q8_0.gguf, orig_q4_0.gguf   written with the `gguf` package (2-D weights quantized, rest F32)
  orig_q4_k.gguf               written by `skyreels quantize --type Q4_K` (candle writes K-quants; rows
                               that are not whole 256-blocks fall back to Q5_0)
                               from_single_file with GGUFQuantizationConfig(compute_dtype=float32)
  io.safetensors               inputs and `output_<file stem>` for each file, f32
  dequant.safetensors          random blocks of every quantized type diffusers reads (`<TYPE>.blocks`,
                               u8) and its f16 dequantization of them (`<TYPE>.values`), bit for bit
  config.json                  the model's config (for the --config test)

End to end: the bundled tiny pipeline's transformer (weights/tiny, head dim 16: its config must be
passed, as `--config`) in the original layout as GGUF Q8_0 (tiny_transformer_q8_0.gguf), and
diffusers' HunyuanSkyreelsImageToVideoPipeline with it on the i2v_cfg request, noise and image:
tests/fixtures/pipeline/i2v_cfg_q8_0.safetensors (scripts/gen_pipeline_fixtures.py's format).

diffusers' converter hard-codes `hidden_size = 3072` when it splits the single blocks' `linear1`;
the reference patches that constant to the tiny width (our loader derives it from the shapes).

Usage: python scripts/gen_single_file_fixtures.py SKYREELS_BINARY [OUT_DIR]   (scripts/requirements.txt)
"""
import inspect
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import gguf
import numpy as np
import torch
from diffusers import GGUFQuantizationConfig, HunyuanVideoTransformer3DModel
from diffusers.loaders import single_file_model, single_file_utils
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gen_transformer_fixtures import build, inputs  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent

CFG = dict(
    in_channels=32, out_channels=16, num_attention_heads=1, attention_head_dim=128, num_layers=1,
    num_single_layers=1, num_refiner_layers=1, mlp_ratio=2.0, patch_size=2, patch_size_t=1,
    qk_norm="rms_norm", guidance_embeds=True, text_embed_dim=256, pooled_projection_dim=256,
    rope_theta=256.0, rope_axes_dim=(16, 56, 56),
)
HIDDEN = CFG["num_attention_heads"] * CFG["attention_head_dim"]


def patch_hidden_size(hidden: int) -> None:
    """diffusers' converter with `hidden_size = 3072` replaced by the tiny model's width."""
    fn = single_file_utils.convert_hunyuan_video_transformer_to_diffusers
    src = inspect.getsource(fn)
    assert "hidden_size = 3072" in src, "diffusers' converter changed: check the patch"
    src = src.replace("hidden_size = 3072", f"hidden_size = {hidden}")
    scope = dict(vars(single_file_utils))
    exec(compile(src, single_file_utils.__file__, "exec"), scope)
    patched = scope["convert_hunyuan_video_transformer_to_diffusers"]
    single_file_model.SINGLE_FILE_LOADABLE_CLASSES["HunyuanVideoTransformer3DModel"][
        "checkpoint_mapping_fn"
    ] = patched


# diffusers name fragment -> original, the inverse of TRANSFORMER_KEYS_RENAME_DICT for this model
PLAIN = [
    ("x_embedder.proj", "img_in.proj"),
    ("time_text_embed.timestep_embedder.linear_1", "time_in.mlp.0"),
    ("time_text_embed.timestep_embedder.linear_2", "time_in.mlp.2"),
    ("time_text_embed.guidance_embedder.linear_1", "guidance_in.mlp.0"),
    ("time_text_embed.guidance_embedder.linear_2", "guidance_in.mlp.2"),
    ("time_text_embed.text_embedder.linear_1", "vector_in.in_layer"),
    ("time_text_embed.text_embedder.linear_2", "vector_in.out_layer"),
    ("proj_out", "final_layer.linear"),
]
DOUBLE = [
    ("attn.norm_q", "img_attn_q_norm"), ("attn.norm_k", "img_attn_k_norm"),
    ("attn.to_out.0", "img_attn_proj"), ("attn.norm_added_q", "txt_attn_q_norm"),
    ("attn.norm_added_k", "txt_attn_k_norm"), ("attn.to_add_out", "txt_attn_proj"),
    ("norm1.linear", "img_mod.linear"), ("norm1_context.linear", "txt_mod.linear"),
    ("ff.net.0.proj", "img_mlp.fc1"), ("ff.net.2", "img_mlp.fc2"),
    ("ff_context.net.0.proj", "txt_mlp.fc1"), ("ff_context.net.2", "txt_mlp.fc2"),
]
SINGLE = [("attn.norm_q", "q_norm"), ("attn.norm_k", "k_norm"), ("proj_out", "linear2"),
          ("norm.linear", "modulation.linear")]
REFINER = [("attn.to_out.0", "self_attn_proj"), ("norm_out.linear", "adaLN_modulation.1"),
           ("ff.net.0.proj", "mlp.fc1"), ("ff.net.2", "mlp.fc2"), ("norm1", "norm1"), ("norm2", "norm2")]
EMBED = [("proj_in", "input_embedder"),
         ("time_text_embed.timestep_embedder.linear_1", "t_embedder.mlp.0"),
         ("time_text_embed.timestep_embedder.linear_2", "t_embedder.mlp.2"),
         ("time_text_embed.text_embedder.linear_1", "c_embedder.linear_1"),
         ("time_text_embed.text_embedder.linear_2", "c_embedder.linear_2")]


def to_original(sd: dict, cfg: dict = CFG) -> dict:
    """A diffusers state dict in the original HunyuanVideo layout (fused qkv and linear1, the final
    layer's [shift; scale])."""
    out, used = {}, set()

    def take(name):
        used.add(name)
        return sd[name]

    for suffix in ("weight", "bias"):
        for d, o in PLAIN:
            if f"{d}.{suffix}" in sd:
                out[f"{o}.{suffix}"] = take(f"{d}.{suffix}")
        scale, shift = take(f"norm_out.linear.{suffix}").chunk(2)
        out[f"final_layer.adaLN_modulation.1.{suffix}"] = torch.cat([shift, scale])
        for i in range(cfg["num_layers"]):
            p = f"transformer_blocks.{i}"
            for d, o in DOUBLE:
                if f"{p}.{d}.{suffix}" in sd:
                    out[f"double_blocks.{i}.{o}.{suffix}"] = take(f"{p}.{d}.{suffix}")
            out[f"double_blocks.{i}.img_attn_qkv.{suffix}"] = torch.cat(
                [take(f"{p}.attn.to_{x}.{suffix}") for x in "qkv"])
            out[f"double_blocks.{i}.txt_attn_qkv.{suffix}"] = torch.cat(
                [take(f"{p}.attn.add_{x}_proj.{suffix}") for x in "qkv"])
        for i in range(cfg["num_single_layers"]):
            p = f"single_transformer_blocks.{i}"
            for d, o in SINGLE:
                if f"{p}.{d}.{suffix}" in sd:
                    out[f"single_blocks.{i}.{o}.{suffix}"] = take(f"{p}.{d}.{suffix}")
            out[f"single_blocks.{i}.linear1.{suffix}"] = torch.cat(
                [take(f"{p}.attn.to_{x}.{suffix}") for x in "qkv"] + [take(f"{p}.proj_mlp.{suffix}")])
        for d, o in EMBED:
            if f"context_embedder.{d}.{suffix}" in sd:
                out[f"txt_in.{o}.{suffix}"] = take(f"context_embedder.{d}.{suffix}")
        for i in range(cfg["num_refiner_layers"]):
            p = f"context_embedder.token_refiner.refiner_blocks.{i}"
            q = f"txt_in.individual_token_refiner.blocks.{i}"
            for d, o in REFINER:
                if f"{p}.{d}.{suffix}" in sd:
                    out[f"{q}.{o}.{suffix}"] = take(f"{p}.{d}.{suffix}")
            out[f"{q}.self_attn_qkv.{suffix}"] = torch.cat(
                [take(f"{p}.attn.to_{x}.{suffix}") for x in "qkv"])
    left = set(sd) - used
    assert not left, f"not converted: {sorted(left)}"
    return {k: v.contiguous() for k, v in out.items()}


def write_gguf(path: Path, sd: dict, qtype) -> None:
    """city96's convention: architecture "hyvid", 2-D weights quantized, every other tensor F32."""
    w = gguf.GGUFWriter(str(path), arch="hyvid")
    for name, t in sorted(sd.items()):
        a = t.float().numpy()
        if a.ndim == 2 and a.shape[1] % gguf.GGML_QUANT_SIZES[qtype][0] == 0:
            w.add_tensor(name, gguf.quants.quantize(a, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(name, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def scaled_fp8(sd: dict) -> tuple[dict, dict]:
    """ComfyUI's scaled fp8 file and the f32 weights it stands for."""
    fp8, dense = {"scaled_fp8": torch.zeros(0, dtype=torch.float8_e4m3fn)}, {}
    for k, v in sd.items():
        if v.ndim == 2 and k.endswith(".weight"):
            scale = (v.float().abs().max() / 448.0).reshape(())
            q = (v.float() / scale).to(torch.float8_e4m3fn)
            fp8[k], fp8[k.removesuffix("weight") + "scale_weight"] = q, scale
            dense[k] = q.float() * scale
        else:
            fp8[k], dense[k] = v, v.float()
    return fp8, dense


# where each block type keeps its f16 scales (byte offsets), so random blocks get finite ones
F16_FIELDS = {
    "Q8_0": [0], "Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2],
    "Q2_K": [80, 82], "Q3_K": [108], "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208],
}


def dequant_fixture(path: Path) -> None:
    """diffusers' dequantization of random blocks (every quant bit pattern; scales of varied
    magnitude so that f16 products round) for each type, bit for bit."""
    from diffusers.quantizers.gguf.utils import GGUFParameter, dequantize_gguf_tensor

    gen = np.random.default_rng(11)
    out = {}
    for name, fields in F16_FIELDS.items():
        qtype = getattr(gguf.GGMLQuantizationType, name)
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        rows, blocks_per_row = 4, 2
        raw = gen.integers(0, 256, size=(rows * blocks_per_row, size), dtype=np.uint8)
        for f in fields:
            scale = (gen.standard_normal(len(raw)) * 10.0 ** gen.uniform(-4, 0, len(raw))).astype(np.float16)
            raw[:, f:f + 2] = scale.view(np.uint8).reshape(-1, 2)
        raw = torch.from_numpy(raw.reshape(rows, blocks_per_row * size))
        values = dequantize_gguf_tensor(GGUFParameter(raw, quant_type=qtype))
        assert values.dtype == torch.float16 and values.shape == (rows, blocks_per_row * block)
        assert torch.isfinite(values).all()
        out[f"{name}.blocks"], out[f"{name}.values"] = raw, values
    save_file(out, str(path))


def end_to_end(out: Path) -> None:
    import gen_pipeline_fixtures as pf
    from diffusers import HunyuanSkyreelsImageToVideoPipeline
    from safetensors import safe_open

    tiny = pf.TINY / "transformer"
    cfg = json.loads((tiny / "config.json").read_text())
    dense = HunyuanVideoTransformer3DModel.from_pretrained(tiny, torch_dtype=torch.float32)
    path = out / "tiny_transformer_q8_0.gguf"
    write_gguf(path, to_original(dense.state_dict(), cfg), gguf.GGMLQuantizationType.Q8_0)
    patch_hidden_size(cfg["num_attention_heads"] * cfg["attention_head_dim"])
    transformer = HunyuanVideoTransformer3DModel.from_single_file(
        str(path), config=str(tiny), torch_dtype=torch.float32,
        quantization_config=GGUFQuantizationConfig(compute_dtype=torch.float32))
    pipe = HunyuanSkyreelsImageToVideoPipeline.from_pretrained(
        pf.TINY, transformer=transformer, torch_dtype=torch.float32)
    pipe.vae.enable_tiling()
    pipe.set_progress_bar_config(disable=True)
    with safe_open(str(pf.OUT / "i2v_cfg.safetensors"), "pt") as f:
        req = json.loads(f.metadata()["request"])
        image = f.get_tensor("image").numpy()
    pf.run_case("i2v_cfg_q8_0", pipe, req, image, seed_name="i2v_cfg")


def main() -> None:
    binary = Path(sys.argv[1])
    out = Path(sys.argv[2]) if len(sys.argv) > 2 else ROOT / "tests" / "fixtures" / "single_file"
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(2)
    patch_hidden_size(HIDDEN)
    model = build(CFG, seed=7, store_dtype=torch.bfloat16)
    args = inputs(CFG, batch=2, latent=(3, 4, 6), n_txt=12, lengths=[7, 12], seed=8)
    io = dict(args)
    with torch.no_grad():
        io["output_diffusers_folder"] = model(**args, return_dict=False)[0]
    orig = to_original({k: v.to(torch.bfloat16) for k, v in model.state_dict().items()})

    save_file(orig, str(out / "orig_bf16.safetensors"))
    gguf_kw = {"quantization_config": GGUFQuantizationConfig(compute_dtype=torch.float32)}
    files = {"orig_bf16": (out / "orig_bf16.safetensors", {})}
    fp8 = {k: (v.to(torch.float8_e4m3fn) if v.ndim == 2 else v) for k, v in orig.items()}
    save_file(fp8, str(out / "orig_fp8.safetensors"))
    files["orig_fp8"] = (out / "orig_fp8.safetensors", {})
    scaled, scaled_dense = scaled_fp8(orig)
    save_file(scaled, str(out / "orig_fp8_scaled.safetensors"))
    for name, qtype in [("orig_q8_0", gguf.GGMLQuantizationType.Q8_0),
                        ("orig_q4_0", gguf.GGMLQuantizationType.Q4_0)]:
        write_gguf(out / f"{name}.gguf", orig, qtype)
        files[name] = (out / f"{name}.gguf", gguf_kw)
    subprocess.run([str(binary), "quantize", str(out / "orig_bf16.safetensors"),
                    str(out / "orig_q4_k.gguf"), "--type", "Q4_K"], check=True)
    files["orig_q4_k"] = (out / "orig_q4_k.gguf", gguf_kw)

    with tempfile.TemporaryDirectory() as tmp:
        cfg_dir = Path(tmp) / "config"
        model.save_config(cfg_dir)
        (out / "config.json").write_text((cfg_dir / "config.json").read_text())
        save_file(scaled_dense, str(Path(tmp) / "orig_fp8_scaled.safetensors"))
        sources = dict(files)
        sources["orig_fp8_scaled"] = (Path(tmp) / "orig_fp8_scaled.safetensors", {})
        for name, (path, kw) in sources.items():
            ref = HunyuanVideoTransformer3DModel.from_single_file(
                str(path), config=str(cfg_dir), torch_dtype=torch.float32, **kw).eval()
            with torch.no_grad():
                io[f"output_{name}"] = ref(**args, return_dict=False)[0].float()
            diff = (io[f"output_{name}"] - io["output_diffusers_folder"]).abs().max().item()
            print(f"{name}: max |out - bf16 folder out| {diff:.3g}")
    # the bf16 file is the folder model, renamed: diffusers must give the same numbers
    assert torch.equal(io["output_orig_bf16"], io["output_diffusers_folder"])
    save_file({k: v.contiguous() for k, v in io.items()}, str(out / "io.safetensors"))
    dequant_fixture(out / "dequant.safetensors")
    end_to_end(out)
    json.loads((out / "config.json").read_text())
    for p in sorted(out.iterdir()):
        print(f"{p.name}: {p.stat().st_size / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
