//! One clip on several devices (`--parallel cfg=C,ulysses=U`): the two true-CFG branches of a
//! step on two device groups at once (cfg=2), and within a group Ulysses sequence parallelism
//! over U ranks (each holds a slice of the video tokens; see
//! [`HunyuanVideoTransformer3DModel::forward_ulysses`]). One OS thread per rank
//! ([`ulysses_group_forward`]); each device has its own copy of the transformer; ranks exchange
//! through in-process collectives.

use crate::conditioning::PromptEmbeds;
use crate::generate::CfgGate;
use candle_core::{bail, Device, Result, Tensor};
use skyreels_models::parallel::{group_for, Collective};
use skyreels_models::{HunyuanVideoTransformer3DModel, StepCache, TransformerInputs};
use std::sync::Arc;

/// The transformer copies and collectives of a parallel layout, beside the pipeline's own
/// transformer (which is rank 0 of the conditional branch); empty (the default) without one.
#[derive(Default)]
pub(crate) struct Ranks {
    /// Ulysses ranks 1.. of the conditional branch.
    pub cond: Vec<(Device, HunyuanVideoTransformer3DModel)>,
    /// The unconditional branch's ranks (cfg=2), rank 0 first; empty without CFG-parallel.
    pub uncond: Vec<(Device, HunyuanVideoTransformer3DModel)>,
    cond_group: Vec<Arc<dyn Collective>>,
    uncond_group: Vec<Arc<dyn Collective>>,
}

impl Ranks {
    /// `main` is the pipeline's device (rank 0 of the conditional branch).
    pub fn new(
        main: &Device,
        cond: Vec<(Device, HunyuanVideoTransformer3DModel)>,
        uncond: Vec<(Device, HunyuanVideoTransformer3DModel)>,
    ) -> Result<Self> {
        let group = |devices: Vec<Device>| {
            if devices.len() > 1 {
                group_for(&devices)
            } else {
                Ok(vec![])
            }
        };
        let cond_devices = std::iter::once(main.clone())
            .chain(cond.iter().map(|(d, _)| d.clone()))
            .collect();
        Ok(Self {
            cond_group: group(cond_devices)?,
            uncond_group: group(uncond.iter().map(|(d, _)| d.clone()).collect())?,
            cond,
            uncond,
        })
    }

    /// Ulysses ranks per branch.
    pub fn ulysses(&self) -> usize {
        self.cond.len() + 1
    }

    pub fn devices(&self) -> impl Iterator<Item = &Device> {
        self.cond.iter().chain(&self.uncond).map(|(d, _)| d)
    }
}

/// The inputs of one step, on the pipeline's device.
pub(crate) struct Step<'a> {
    /// The step's index in the schedule (0-based; the CFG gate's clock).
    pub index: usize,
    pub x: &'a Tensor,
    pub timestep: &'a Tensor,
    pub guidance: Option<&'a Tensor>,
    /// RIFLEx's temporal frequency index (0: off).
    pub riflex_freq_index: usize,
}

/// One branch's velocity on its ranks (`(device, transformer)`, rank 0 first): a plain cached
/// forward on one rank (inputs copied to its device), else a Ulysses group forward.
fn branch(
    ranks: &[(&Device, &HunyuanVideoTransformer3DModel)],
    group: &[Arc<dyn Collective>],
    step: &Step,
    e: &PromptEmbeds,
    cache: &mut StepCache,
) -> Result<Tensor> {
    let inputs = TransformerInputs {
        hidden_states: step.x,
        timestep: step.timestep,
        encoder_hidden_states: &e.embeds,
        encoder_attention_mask: &e.mask,
        pooled_projections: &e.pooled,
        guidance: step.guidance,
        riflex_freq_index: step.riflex_freq_index,
    };
    match ranks {
        [(device, model)] if step.x.device().same_device(device) => {
            model.forward_cached(&inputs, Some(cache))
        }
        [(device, model)] => model.forward_cached(&inputs.to_device(device)?.inputs(), Some(cache)),
        _ => ulysses_group_forward(ranks, group, &inputs, Some(cache)),
    }
}

/// One forward as the Ulysses ranks `ranks` (each rank's device and its copy of the
/// transformer, rank 0 first) with `group[r]`, every rank on its own thread (rank 0 on the
/// calling one) with the inputs copied to its device; returns rank 0's prediction. A rank that
/// fails aborts the group so that no other waits for it. `cache` goes to rank 0.
pub fn ulysses_group_forward(
    ranks: &[(&Device, &HunyuanVideoTransformer3DModel)],
    group: &[Arc<dyn Collective>],
    inputs: &TransformerInputs,
    cache: Option<&mut StepCache>,
) -> Result<Tensor> {
    if ranks.len() != group.len() || ranks.is_empty() {
        bail!("{} ranks for a group of {}", ranks.len(), group.len())
    }
    let run = |(device, model): (&Device, &HunyuanVideoTransformer3DModel),
               rank: &Arc<dyn Collective>,
               cache: Option<&mut StepCache>|
     -> Result<Tensor> {
        let out = (|| -> Result<Tensor> {
            let copy = inputs.to_device(device)?;
            let out = model.forward_ulysses(&copy.inputs(), cache, rank.clone())?;
            device.synchronize()?;
            Ok(out)
        })();
        if let Err(e) = &out {
            rank.abort(&e.to_string());
        }
        out
    };
    std::thread::scope(|s| {
        let others: Vec<_> = ranks[1..]
            .iter()
            .zip(&group[1..])
            .map(|(&r, rank)| s.spawn(move || run(r, rank, None)))
            .collect();
        let first = run(ranks[0], &group[0], cache);
        for h in others {
            h.join().unwrap_or_else(|p| std::panic::resume_unwind(p))?;
        }
        first
    })
}

/// The guided velocity of one step on the layout (every step of every pipeline comes here; with
/// no layout, `ranks` is empty): the conditional branch on `main` and `ranks.cond`, the
/// unconditional one (true CFG, `negative`) at the same time on `ranks.uncond` when it has
/// devices, else after it on the same ranks; `v_neg + scale · (v − v_neg)` on the pipeline's
/// device. A step the CFG `gate` covers runs only the conditional branch (its unconditional
/// cache counts the forward as cached) and reuses the gate's difference.
#[allow(clippy::too_many_arguments)]
pub(crate) fn velocity(
    main: (&Device, &HunyuanVideoTransformer3DModel),
    ranks: &Ranks,
    step: &Step,
    positive: &PromptEmbeds,
    negative: Option<&PromptEmbeds>,
    scale: f64,
    caches: &mut [StepCache; 2],
    gate: &mut CfgGate,
) -> Result<Tensor> {
    let cond: Vec<_> = std::iter::once(main)
        .chain(ranks.cond.iter().map(|(d, m)| (d, m)))
        .collect();
    let uncond: Vec<_> = ranks.uncond.iter().map(|(d, m)| (d, m)).collect();
    let [cache_cond, cache_uncond] = caches;
    let Some(negative) = negative else {
        return branch(&cond, &ranks.cond_group, step, positive, cache_cond);
    };
    if let Some(d) = gate.reused(step.index) {
        let v = branch(&cond, &ranks.cond_group, step, positive, cache_cond)?;
        cache_uncond.skipped();
        return CfgGate::gated(&v, d, scale);
    }
    let (v, v_neg) = if uncond.is_empty() {
        let v = branch(&cond, &ranks.cond_group, step, positive, cache_cond)?;
        let v_neg = branch(&cond, &ranks.cond_group, step, negative, cache_uncond)?;
        (v, v_neg)
    } else {
        std::thread::scope(|s| -> Result<(Tensor, Tensor)> {
            let other =
                s.spawn(|| branch(&uncond, &ranks.uncond_group, step, negative, cache_uncond));
            let v = branch(&cond, &ranks.cond_group, step, positive, cache_cond);
            let v_neg = other
                .join()
                .unwrap_or_else(|p| std::panic::resume_unwind(p));
            Ok((v?, v_neg?))
        })?
    };
    let v_neg = v_neg.to_device(v.device())?;
    gate.guide(&v, &v_neg, scale)
}
