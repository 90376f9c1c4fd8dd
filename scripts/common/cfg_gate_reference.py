"""CFG gating for diffusers' pipelines with true CFG: the reference our `--cfg-gate F` is tested
against (a direct transcription of the rule; FastVideo's CFG gating has no diffusers hook).

The rule: with `steps` denoising steps, the steps before ceil(F * steps) (0-based) run both
transformer forwards, the prompt's (cond) then the negative prompt's (uncond), and keep
d = cond - uncond; from step ceil(F * steps) on, the uncond forward is not run and its prediction
is taken as cond - d with the d of the last step that ran both. The pipeline then guides as
always: uncond + scale * (cond - uncond) (diffusers' SkyReels I2V pipeline,
`noise_pred = neg_noise_pred + true_cfg_scale * (noise_pred - neg_noise_pred)`), which is
(cond - d) + scale * d up to one f32 rounding of (cond - (cond - d)).

`enable_cfg_gate(transformer, fraction, steps, decisions, record_runs)` patches one transformer
instance (install it before anything that wraps `transformer.forward` by call count, such as
scripts/fixtures/cache.py's cache contexts): every gated call appends False to `decisions`, every
call that runs appends True when `record_runs` (without a step cache, which records its own).
"""
import math


def enable_cfg_gate(transformer, fraction: float, steps: int, decisions: list, record_runs: bool) -> None:
    start = math.ceil(fraction * steps)
    forward = transformer.forward
    calls = [0]
    last = {}

    def gated(*args, **kwargs):
        step, uncond = divmod(calls[0], 2)
        calls[0] += 1
        if uncond and step >= start:
            decisions.append(False)
            return (last["cond"] - last["difference"],)
        out = forward(*args, **kwargs)
        if record_runs:
            decisions.append(True)
        if uncond:
            last["difference"] = last["cond"] - out[0]
        else:
            last["cond"] = out[0]
        return out

    transformer.forward = gated
