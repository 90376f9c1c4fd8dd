"""The diffusers side of scripts.bench.single_file, in a fresh process of its own: loads one
single-file checkpoint with `HunyuanVideoTransformer3DModel.from_single_file` in f32 (GGUF with
GGUFQuantizationConfig; fp8 kept in memory with `enable_layerwise_casting`) and times forwards.

Usage (run by scripts.bench.single_file through scripts.bench.peak_rss, from the repository root):
  python -m scripts.bench.single_file_diffusers SPEC_JSON
SPEC_JSON: file, config, threads, runs, hidden, latent, n_txt, n_valid. Prints one JSON line
{"load": S, "forward": S} (the median of `runs` forwards after one warm-up).
"""
import json
import statistics
import sys
import time

import torch
from diffusers import GGUFQuantizationConfig, HunyuanVideoTransformer3DModel

from scripts.fixtures import single_file as g


def main() -> None:
    a = json.loads(sys.argv[1])
    torch.set_num_threads(a["threads"])
    g.patch_hidden_size(a["hidden"])
    t0 = time.perf_counter()
    kw = {}
    if a["file"].endswith(".gguf"):
        kw["quantization_config"] = GGUFQuantizationConfig(compute_dtype=torch.float32)
    m = HunyuanVideoTransformer3DModel.from_single_file(a["file"], config=a["config"], torch_dtype=torch.float32,
                                                        **kw).eval()
    if "fp8" in a["file"]:
        m.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)
    load = time.perf_counter() - t0
    gen = torch.Generator().manual_seed(0)
    lt, lh, lw = a["latent"]
    mask = torch.zeros(1, a["n_txt"])
    mask[0, :a["n_valid"]] = 1
    x = dict(hidden_states=torch.randn(1, 32, lt, lh, lw, generator=gen), timestep=torch.tensor([900.0]),
             encoder_hidden_states=torch.randn(1, a["n_txt"], 4096, generator=gen), encoder_attention_mask=mask,
             pooled_projections=torch.randn(1, 768, generator=gen), guidance=torch.tensor([1000.0]))
    times = []
    with torch.no_grad():
        for _ in range(a["runs"] + 1):
            t = time.perf_counter()
            m(**x, return_dict=False)
            times.append(time.perf_counter() - t)
    print(json.dumps({"load": load, "forward": statistics.median(times[1:])}))


if __name__ == "__main__":
    main()
