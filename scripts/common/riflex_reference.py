"""RIFLEx's temporal RoPE for diffusers' HunyuanVideoTransformer3DModel: the reference our
`--riflex-freq-index K` is tested against.

`get_1d_rotary_pos_embed_riflex` is thu-ml/RIFLEx's function, transcribed unchanged (Apache-2.0):
https://github.com/thu-ml/RIFLEx/blob/18e0bc34d5a68cae5753a6e33e35313bec89c1db/riflex_utils.py#L5-L56
and `RiflexRope` is RIFLEx's `HunyuanVideoRotaryPosEmbedRifleX`
(https://github.com/thu-ml/RIFLEx/blob/18e0bc34d5a68cae5753a6e33e35313bec89c1db/hunyuanvideo.py#L14-L40):
diffusers' `HunyuanVideoRotaryPosEmbed.forward`
(https://github.com/huggingface/diffusers/blob/58eb52c0803ea9af3abec60841c2a093bdf1f951/src/diffusers/models/transformers/transformer_hunyuan_video.py#L487-L508)
with the temporal axis (i == 0) through the RIFLEx function, `L_test` the latent frames.

`enable_riflex(transformer, k, latent_frames)` swaps one transformer instance's rope module.
"""
import numpy as np
import torch
from diffusers.models.embeddings import get_1d_rotary_pos_embed
from diffusers.models.transformers.transformer_hunyuan_video import HunyuanVideoRotaryPosEmbed


def get_1d_rotary_pos_embed_riflex(dim, pos, theta=10000.0, use_real=False, k=None, L_test=None):
    assert dim % 2 == 0

    if isinstance(pos, int):
        pos = torch.arange(pos)
    if isinstance(pos, np.ndarray):
        pos = torch.from_numpy(pos)  # type: ignore  # [S]

    freqs = 1.0 / (
            theta ** (torch.arange(0, dim, 2, device=pos.device)[: (dim // 2)].float() / dim)
    )  # [D/2]

    # === Riflex modification start ===
    # Reduce the intrinsic frequency to stay within a single period after extrapolation (see Eq. (8)).
    # Empirical observations show that a few videos may exhibit repetition in the tail frames.
    # To be conservative, we multiply by 0.9 to keep the extrapolated length below 90% of a single period.
    if k is not None:
        freqs[k-1] = 0.9 * 2 * torch.pi / L_test
    # === Riflex modification end ===

    freqs = torch.outer(pos, freqs)  # type: ignore   # [S, D/2]
    if use_real:
        freqs_cos = freqs.cos().repeat_interleave(2, dim=1).float()  # [S, D]
        freqs_sin = freqs.sin().repeat_interleave(2, dim=1).float()  # [S, D]
        return freqs_cos, freqs_sin
    else:
        # lumina
        freqs_cis = torch.polar(torch.ones_like(freqs), freqs)  # complex64     # [S, D/2]
        return freqs_cis


class RiflexRope(HunyuanVideoRotaryPosEmbed):
    def __init__(self, k: int, L_test: int, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.k = k
        self.L_test = L_test

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        batch_size, num_channels, num_frames, height, width = hidden_states.shape
        rope_sizes = [num_frames // self.patch_size_t, height // self.patch_size, width // self.patch_size]

        axes_grids = []
        for i in range(3):
            grid = torch.arange(0, rope_sizes[i], device=hidden_states.device, dtype=torch.float32)
            axes_grids.append(grid)
        grid = torch.meshgrid(*axes_grids, indexing="ij")  # [W, H, T]
        grid = torch.stack(grid, dim=0)  # [3, W, H, T]

        freqs = []
        for i in range(3):
            if i == 0:
                freq = get_1d_rotary_pos_embed_riflex(self.rope_dim[i], grid[i].reshape(-1), self.theta,
                                                      use_real=True, k=self.k, L_test=self.L_test)
            else:
                freq = get_1d_rotary_pos_embed(self.rope_dim[i], grid[i].reshape(-1), self.theta, use_real=True)
            freqs.append(freq)

        freqs_cos = torch.cat([f[0] for f in freqs], dim=1)  # (W * H * T, D / 2)
        freqs_sin = torch.cat([f[1] for f in freqs], dim=1)  # (W * H * T, D / 2)
        return freqs_cos, freqs_sin


def enable_riflex(transformer, k: int, latent_frames: int) -> None:
    rope = transformer.rope
    transformer.rope = RiflexRope(k, latent_frames, rope.patch_size, rope.patch_size_t, rope.rope_dim, rope.theta)
