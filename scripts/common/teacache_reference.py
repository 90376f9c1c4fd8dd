"""TeaCache for diffusers' HunyuanVideoTransformer3DModel: the reference our `--cache teacache:T`
is tested against (there is no library implementation to compare with).

The algorithm is TeaCache4HunyuanVideo's (https://github.com/ali-vilab/TeaCache,
TeaCache4HunyuanVideo/teacache_sample_video.py, `teacache_forward`:
https://github.com/ali-vilab/TeaCache/blob/7c10efc4702c6b619f47805f7abe4a7a08085aa0/TeaCache4HunyuanVideo/teacache_sample_video.py#L22-L196),
moved onto diffusers' module names:

- the change signal is the first double block's modulated normed image input,
  `transformer_blocks[0].norm1(hidden_states, emb=temb)[0]` (LayerNorm x (1 + scale) + shift);
- at the first and the last step the stack always runs and the accumulator resets; at the other
  steps `rel = mean|m - m_prev| / mean|m_prev|` is rescaled by HunyuanVideo's polynomial
  (np.poly1d of COEFFICIENTS) and accumulated, and the stack is skipped while the accumulation
  stays below the threshold (reaching it computes and resets it);
- a skipped step adds the residual of the last computed step (image tokens after the last single
  block minus those before the first double block) to its input; `m_prev` is refreshed every step;
- true CFG: the conditional and the unconditional call keep separate states (the pipelines call
  the transformer for the prompt first, then for the negative prompt, every step).

`enable_teacache(transformer, threshold, num_steps, cfg)` patches one transformer instance and
returns a list that receives, per call in order, whether the stack ran.
"""
import types

import numpy as np
import torch
from diffusers.models.modeling_outputs import Transformer2DModelOutput

COEFFICIENTS = [7.33226126e02, -4.01131952e02, 6.75869174e01, -3.14987800e00, 9.61237896e-02]


class _State:
    def __init__(self):
        self.cnt = 0
        self.accumulated = 0.0
        self.previous_modulated = None
        self.previous_residual = None


def enable_teacache(transformer, threshold: float, num_steps: int, cfg: bool) -> list:
    decisions = []
    states = {"cond": _State(), "uncond": _State()}
    calls = [0]
    rescale = np.poly1d(COEFFICIENTS)

    def forward(self, hidden_states, timestep, encoder_hidden_states, encoder_attention_mask,
                pooled_projections, guidance=None, attention_kwargs=None, return_dict=True):
        branch = "uncond" if cfg and calls[0] % 2 == 1 else "cond"
        calls[0] += 1
        state = states[branch]

        # diffusers' HunyuanVideoTransformer3DModel.forward, steps 1-3, unchanged
        batch_size, num_channels, num_frames, height, width = hidden_states.shape
        p, p_t = self.config.patch_size, self.config.patch_size_t
        post_patch_num_frames = num_frames // p_t
        post_patch_height = height // p
        post_patch_width = width // p
        first_frame_num_tokens = 1 * post_patch_height * post_patch_width
        image_rotary_emb = self.rope(hidden_states)
        temb, token_replace_emb = self.time_text_embed(timestep, pooled_projections, guidance)
        hidden_states = self.x_embedder(hidden_states)
        encoder_hidden_states = self.context_embedder(encoder_hidden_states, timestep, encoder_attention_mask)
        latent_sequence_length = hidden_states.shape[1]
        condition_sequence_length = encoder_hidden_states.shape[1]
        sequence_length = latent_sequence_length + condition_sequence_length
        attention_mask = torch.ones(batch_size, sequence_length, device=hidden_states.device, dtype=torch.bool)
        effective_condition_sequence_length = encoder_attention_mask.sum(dim=1, dtype=torch.int)
        effective_sequence_length = latent_sequence_length + effective_condition_sequence_length
        indices = torch.arange(sequence_length, device=hidden_states.device).unsqueeze(0)
        mask_indices = indices >= effective_sequence_length.unsqueeze(1)
        attention_mask = attention_mask.masked_fill(mask_indices, False)
        attention_mask = attention_mask.unsqueeze(1).unsqueeze(1)

        # TeaCache's decision
        modulated = self.transformer_blocks[0].norm1(hidden_states, emb=temb)[0]
        if state.cnt == 0 or state.cnt == num_steps - 1:
            should_calc = True
            state.accumulated = 0.0
        else:
            prev = state.previous_modulated
            rel = ((modulated - prev).abs().mean() / prev.abs().mean()).cpu().item()
            state.accumulated += rescale(rel)
            if state.accumulated < threshold:
                should_calc = False
            else:
                should_calc = True
                state.accumulated = 0.0
        state.previous_modulated = modulated
        state.cnt += 1
        if state.cnt == num_steps:
            state.cnt = 0
        decisions.append(should_calc)

        if not should_calc:
            hidden_states = hidden_states + state.previous_residual
        else:
            original = hidden_states.clone()
            args = (temb, attention_mask, image_rotary_emb, token_replace_emb, first_frame_num_tokens)
            for block in self.transformer_blocks:
                hidden_states, encoder_hidden_states = block(hidden_states, encoder_hidden_states, *args)
            for block in self.single_transformer_blocks:
                hidden_states, encoder_hidden_states = block(hidden_states, encoder_hidden_states, *args)
            state.previous_residual = hidden_states - original

        # step 5, unchanged
        hidden_states = self.norm_out(hidden_states, temb)
        hidden_states = self.proj_out(hidden_states)
        hidden_states = hidden_states.reshape(
            batch_size, post_patch_num_frames, post_patch_height, post_patch_width, -1, p_t, p, p
        )
        hidden_states = hidden_states.permute(0, 4, 1, 5, 2, 6, 3, 7)
        hidden_states = hidden_states.flatten(6, 7).flatten(4, 5).flatten(2, 3)
        if not return_dict:
            return (hidden_states,)
        return Transformer2DModelOutput(sample=hidden_states)

    transformer.forward = types.MethodType(forward, transformer)
    return decisions
