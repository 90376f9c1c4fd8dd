//! Step caching: reusing the transformer blocks' residual from an earlier denoising step when the
//! input has barely changed. Two policies, each exact to its reference:
//!
//! - **First-block cache** (ParaAttention; diffusers 0.42.1 `FirstBlockCacheConfig`, hooks in
//!   `diffusers/hooks/first_block_cache.py`): the first double block always runs; its image-token
//!   residual (output − input) is compared with the one of the last computed step as
//!   `mean|r − r_prev| / mean|r_prev|`. Above the threshold every other block runs and the cache
//!   keeps the first block's output, its residual and the residual of the rest of the stack (last
//!   single block's image tokens − first block's output); at or below it, the first block's output
//!   plus that stored residual stands in for the stack, and nothing is refreshed.
//!   <https://github.com/huggingface/diffusers/blob/58eb52c0803ea9af3abec60841c2a093bdf1f951/src/diffusers/hooks/first_block_cache.py#L32-L48>
//!   <https://github.com/huggingface/diffusers/blob/58eb52c0803ea9af3abec60841c2a093bdf1f951/src/diffusers/hooks/first_block_cache.py#L65-L142>
//! - **TeaCache** (TeaCache4HunyuanVideo): the first double block's modulated normed image input
//!   (`norm1` LayerNorm × (1 + scale) + shift) is compared with the previous step's as
//!   `mean|m − m_prev| / mean|m_prev|`, rescaled by HunyuanVideo's published polynomial and
//!   accumulated. The first and the last step always compute; a step computes when the
//!   accumulation reaches the threshold (which then resets it) and otherwise adds the stored
//!   residual of the whole stack (last single block's image tokens − the first block's input) to
//!   its input. The modulated input is stored at every step.
//!   <https://github.com/ali-vilab/TeaCache/blob/7c10efc4702c6b619f47805f7abe4a7a08085aa0/TeaCache4HunyuanVideo/teacache_sample_video.py#L22-L196>
//! - **MagCache** (Zehong-Ma/MagCache; diffusers 0.42.1 `MagCacheConfig`, hooks in
//!   `diffusers/hooks/mag_cache.py`): the decision reads only the given magnitude ratios, never
//!   a tensor. From the retention step on, each step multiplies the accumulated ratio by its
//!   ratio, counts itself and adds |1 − accumulated ratio| to the accumulated error (all f32, as
//!   diffusers' f32 ratio tensor makes them); the step is skipped when there is a stored
//!   residual, the error is at most the threshold (compared in f32) and at most `max_skip` steps
//!   were counted, and otherwise computes and resets the three. A skipped step adds the stored
//!   residual of the whole stack (last single block's image tokens − the first block's input) to
//!   its input, as TeaCache.
//!   <https://github.com/huggingface/diffusers/blob/v0.42.1/src/diffusers/hooks/mag_cache.py>
//! - **TaylorSeer** (arXiv 2503.06923; diffusers 0.42.1 `TaylorSeerCacheConfig`, hooks in
//!   `diffusers/hooks/taylorseer_cache.py` on every block's attention module, the default
//!   `^transformer_blocks.*attn` / `^single_transformer_blocks.*attn`): the blocks always run, but
//!   on the steps the schedule ([`TaylorSeerSpec::computes`]) forecasts, each attention's output
//!   (a double block's image and text outputs after their projections, a single block's
//!   attention) is not computed: it is the Taylor series Σₖ fₖ·Δᵏ/k! of its factors at Δ steps
//!   since their update. A computed step updates them as divided differences over the step
//!   index: f₀ the output, fₖ₊₁ = (fₖ − fₖ_prev)/Δ up to `order` (as far as earlier factors exist).
//!   Factors are kept in the run dtype (diffusers' default `taylor_factors_dtype` is bf16, what a
//!   bf16 run keeps; the f32 parity fixtures set float32).
//!   <https://github.com/huggingface/diffusers/blob/v0.42.1/src/diffusers/hooks/taylorseer_cache.py>
//!
//! One [`StepCache`] holds one branch's state: true CFG keeps one for the conditional and one for
//! the unconditional forward, as diffusers' `cache_context("cond")` / `("uncond")` do. The cache
//! wraps the block loop ([`StepCache::around`]): it decides whether the loop runs, and runs it.

use super::blocks::{Attend, BlockLoop, Compute};
use candle_core::{bail, DType, Result, Tensor};
use skyreels_params::MAGCACHE_NEEDS_RATIOS;
pub use skyreels_params::{CacheSpec, MagRatios, TaylorSeerSpec};

/// TeaCache4HunyuanVideo's rescaling polynomial, highest power first.
///
/// <https://github.com/ali-vilab/TeaCache/blob/7c10efc4702c6b619f47805f7abe4a7a08085aa0/TeaCache4HunyuanVideo/teacache_sample_video.py#L102>
pub const TEACACHE_COEFFICIENTS: [f64; 5] = [
    7.33226126e+02,
    -4.01131952e+02,
    6.75869174e+01,
    -3.14987800e+00,
    9.61237896e-02,
];

/// One branch's cache across the steps of one generation.
#[derive(Debug)]
pub struct StepCache {
    spec: CacheSpec,
    steps: usize,
    /// MagCache's ratio of each step (interpolated to `steps`); empty for the other caches.
    mag_ratios: Vec<f32>,
    state: State,
    /// For each forward so far, whether the blocks ran (true) or the cache served it (false).
    decisions: Vec<bool>,
    /// MagCache's calibration ([`StepCache::calibrating`]).
    calibration: Option<Calibration>,
}

/// Which CFG branch a cache serves (MagCache's ratios may differ per branch).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Branch {
    Cond,
    Uncond,
}

/// MagCache's calibration of one branch: the last residual and the ratios so far.
#[derive(Debug, Default)]
struct Calibration {
    previous: Option<Tensor>,
    ratios: Vec<f32>,
}

impl Calibration {
    /// A computed forward's stack residual (image tokens).
    fn push(&mut self, residual: Tensor) -> Result<()> {
        let residual = residual.to_dtype(DType::F32)?;
        let norms = |r: &Tensor| r.sqr()?.sum_keepdim(candle_core::D::Minus1)?.sqrt();
        let ratio = match &self.previous {
            None => 1.0,
            Some(prev) => {
                let base = (norms(prev)? + 1e-8)?;
                (norms(&residual)? / base)?.mean_all()?.to_scalar::<f32>()?
            }
        };
        self.ratios.push(ratio);
        self.previous = Some(residual);
        Ok(())
    }
}

#[derive(Debug, Default)]
enum State {
    #[default]
    Empty,
    FirstBlock {
        head_residual: Tensor,
        /// last single block's image tokens − first block's output, of the last computed step
        /// (None until that step's stack has run)
        tail_residual: Option<Tensor>,
    },
    TeaCache {
        previous_modulated: Tensor,
        accumulated: f64,
        /// stack output − stack input (image tokens) of the last computed step
        residual: Option<Tensor>,
    },
    MagCache {
        accumulated_ratio: f32,
        accumulated_err: f32,
        accumulated_steps: usize,
        /// stack output − stack input (image tokens) of the last computed step
        residual: Option<Tensor>,
    },
    TaylorSeer {
        /// forwards this branch ran so far
        runs: usize,
        /// per attention (doubles then singles), its factors once computed
        attentions: Vec<Option<Factors>>,
    },
}

/// One attention's Taylor factors (TaylorSeer): per output, f₀ ..= fₖ.
#[derive(Debug)]
struct Factors {
    /// the step they were computed at
    step: usize,
    outputs: Vec<Vec<Tensor>>,
}

/// TaylorSeer over one forward's attentions: computes and updates, or forecasts.
struct Forecast<'a> {
    spec: TaylorSeerSpec,
    step: usize,
    compute: bool,
    attentions: &'a mut Vec<Option<Factors>>,
}

impl Attend for Forecast<'_> {
    fn attend(
        &mut self,
        index: usize,
        run: &dyn Fn() -> Result<Vec<Tensor>>,
    ) -> Result<Vec<Tensor>> {
        if self.attentions.len() <= index {
            self.attentions.resize_with(index + 1, || None);
        }
        let slot = &mut self.attentions[index];
        if !self.compute {
            let Some(f) = slot else {
                bail!("TaylorSeer: attention {index} has no factors to forecast from")
            };
            let offset = (self.step - f.step) as f64;
            return f
                .outputs
                .iter()
                .map(|factors| {
                    let mut out = factors[0].clone();
                    let mut factorial = 1.0;
                    for (k, factor) in factors.iter().enumerate().skip(1) {
                        // offset**k / math.factorial(k) as diffusers computes it
                        factorial *= k as f64;
                        let coeff = offset.powi(k as i32) / factorial;
                        out = (out + factor.affine(coeff, 0.0)?)?;
                    }
                    Ok(out)
                })
                .collect();
        }
        let outputs = run()?;
        let previous = slot.take();
        let updated = outputs
            .iter()
            .enumerate()
            .map(|(i, out)| {
                let mut factors = vec![out.clone()];
                if let Some(prev) = &previous {
                    let delta = Tensor::new((self.step - prev.step) as f32, out.device())?
                        .to_dtype(out.dtype())?;
                    for j in 0..self.spec.order {
                        match prev.outputs.get(i).and_then(|p| p.get(j)) {
                            Some(p) if p.dims() == factors[j].dims() => {
                                let next = (&factors[j] - p)?.broadcast_div(&delta)?;
                                factors.push(next);
                            }
                            _ => break,
                        }
                    }
                }
                Ok(factors)
            })
            .collect::<Result<_>>()?;
        *slot = Some(Factors {
            step: self.step,
            outputs: updated,
        });
        Ok(outputs)
    }
}

/// What the transformer does for the blocks after the first one.
enum Plan {
    /// Run every block.
    Compute,
    /// Stand in for the stack with this image-token tensor.
    Reuse(Tensor),
}

impl StepCache {
    /// A cache for a generation of `steps` denoising steps (TeaCache always computes the last);
    /// MagCache needs the model's magnitude `ratios` (the others ignore them).
    pub fn new(
        spec: CacheSpec,
        steps: usize,
        ratios: Option<&MagRatios>,
        branch: Branch,
    ) -> Result<Self> {
        let mag_ratios = match (spec, ratios) {
            (CacheSpec::MagCache(_), Some(r)) => r.for_steps(steps, branch == Branch::Uncond),
            (CacheSpec::MagCache(_), None) => bail!("{MAGCACHE_NEEDS_RATIOS}"),
            _ => Vec::new(),
        };
        Ok(Self {
            spec,
            steps,
            mag_ratios,
            state: State::Empty,
            decisions: Vec::new(),
            calibration: None,
        })
    }

    /// The caches of one generation: the conditional branch's, then the unconditional one's.
    pub fn pair(spec: CacheSpec, steps: usize, ratios: Option<&MagRatios>) -> Result<[Self; 2]> {
        Ok([
            Self::new(spec, steps, ratios, Branch::Cond)?,
            Self::new(spec, steps, ratios, Branch::Uncond)?,
        ])
    }

    /// One branch's uncached run that measures MagCache's magnitude ratios as diffusers 0.42.1's
    /// `MagCacheConfig(calibrate=True)` does: every forward computes; from the second on, the
    /// ratio is the mean over image tokens of ‖r‖ / (‖r_prev‖ + 1e-8), r the stack's residual
    /// (last single block's image tokens − the first block's input) and the norms over
    /// features, in f32; the first forward's is 1.0.
    ///
    /// <https://github.com/huggingface/diffusers/blob/v0.42.1/src/diffusers/hooks/mag_cache.py>
    /// (`MagCacheBlockHook._perform_calibration_step`)
    pub fn calibrating(steps: usize) -> Self {
        Self {
            spec: CacheSpec::None,
            steps,
            mag_ratios: Vec::new(),
            state: State::Empty,
            decisions: Vec::new(),
            calibration: Some(Calibration::default()),
        }
    }

    /// What a [`Self::calibrating`] cache measured, one ratio per forward it ran (None for
    /// another cache).
    pub fn calibrated(&self) -> Option<&[f32]> {
        self.calibration.as_ref().map(|c| c.ratios.as_slice())
    }

    /// A pair's decisions per forward in the order they ran: each step's conditional forward,
    /// then its unconditional one when true CFG ran.
    pub fn interleaved(pair: &[Self; 2]) -> Vec<bool> {
        let [cond, uncond] = pair;
        cond.decisions
            .iter()
            .enumerate()
            .flat_map(|(i, &c)| std::iter::once(c).chain(uncond.decisions.get(i).copied()))
            .collect()
    }

    pub fn spec(&self) -> CacheSpec {
        self.spec
    }

    /// The block loop over image tokens `x` under this cache's plan: the first-block cache runs
    /// the first double block, then the rest or its stored residual; TeaCache and MagCache run
    /// every block or add their stored residual; `none` runs every block.
    pub(super) fn around(&mut self, blocks: &BlockLoop, x: Tensor) -> Result<Tensor> {
        match self.spec {
            CacheSpec::FirstBlock(_) => {
                let Some((first, rest)) = blocks.doubles().split_first() else {
                    bail!("the first-block cache needs a transformer with a double block")
                };
                let (head, c) = blocks.double(first, &x, &blocks.context()?)?;
                match self.first_block(&x, &head)? {
                    Plan::Reuse(x) => Ok(x),
                    Plan::Compute => {
                        let out = blocks.stack(rest, head.clone(), c, &mut Compute)?;
                        self.first_block_computed(&head, &out)?;
                        Ok(out)
                    }
                }
            }
            CacheSpec::TeaCache(_) => {
                let Some(first) = blocks.doubles().first() else {
                    bail!("TeaCache needs a transformer with a double block")
                };
                let modulated = blocks.modulated_input(first, &x)?;
                let plan = self.teacache(&modulated, &x)?;
                self.whole_stack(plan, blocks, x)
            }
            CacheSpec::MagCache(_) => {
                let plan = self.magcache(&x)?;
                self.whole_stack(plan, blocks, x)
            }
            CacheSpec::TaylorSeer(spec) => {
                let (runs, mut attentions) = match std::mem::take(&mut self.state) {
                    State::TaylorSeer { runs, attentions } => (runs, attentions),
                    _ => (0, Vec::new()),
                };
                let compute = spec.computes(runs);
                self.record(compute);
                let mut forecast = Forecast {
                    spec,
                    step: runs,
                    compute,
                    attentions: &mut attentions,
                };
                let out = blocks.stack(blocks.doubles(), x, blocks.context()?, &mut forecast);
                self.state = State::TaylorSeer {
                    runs: runs + 1,
                    attentions,
                };
                out
            }
            CacheSpec::None => {
                self.record(true);
                match &mut self.calibration {
                    None => blocks.run(x),
                    Some(c) => {
                        let out = blocks.run(x.clone())?;
                        c.push((&out - &x)?)?;
                        Ok(out)
                    }
                }
            }
        }
    }

    /// First-block cache, after the first block ran: `input` and `output` its image tokens.
    fn first_block(&mut self, input: &Tensor, output: &Tensor) -> Result<Plan> {
        let CacheSpec::FirstBlock(threshold) = self.spec else {
            candle_core::bail!("first_block on a {} cache", self.spec)
        };
        let residual = (output - input)?;
        if let State::FirstBlock {
            head_residual,
            tail_residual: Some(tail),
        } = &self.state
        {
            // diffusers computes when the change is above the threshold
            let compute = relative_l1(&residual, head_residual)? > threshold;
            if !compute {
                let reused = (tail + output)?;
                self.record(false);
                return Ok(Plan::Reuse(reused));
            }
        }
        // the tail residual is filled in by `first_block_computed`
        self.state = State::FirstBlock {
            head_residual: residual,
            tail_residual: None,
        };
        self.record(true);
        Ok(Plan::Compute)
    }

    /// First-block cache, after a computed step: the first block's image output and the last
    /// single block's image output.
    fn first_block_computed(&mut self, head_output: &Tensor, tail_output: &Tensor) -> Result<()> {
        if let State::FirstBlock { tail_residual, .. } = &mut self.state {
            *tail_residual = Some((tail_output - head_output)?);
        }
        Ok(())
    }

    /// TeaCache, before any block runs: `modulated` the first block's modulated normed image
    /// input, `input` the stack's image-token input.
    fn teacache(&mut self, modulated: &Tensor, input: &Tensor) -> Result<Plan> {
        let CacheSpec::TeaCache(threshold) = self.spec else {
            candle_core::bail!("teacache on a {} cache", self.spec)
        };
        let step = self.decisions.len() % self.steps.max(1);
        let (previous, accumulated, residual) = match std::mem::take(&mut self.state) {
            State::TeaCache {
                previous_modulated,
                accumulated,
                residual,
            } => (Some(previous_modulated), accumulated, residual),
            _ => (None, 0.0, None),
        };
        let (compute, accumulated) = match previous {
            Some(prev) if step != 0 && step + 1 != self.steps => {
                let x = relative_l1(modulated, &prev)?;
                let acc = accumulated + TEACACHE_COEFFICIENTS.iter().fold(0.0, |p, c| p * x + c);
                if acc < threshold {
                    (false, acc)
                } else {
                    (true, 0.0)
                }
            }
            _ => (true, 0.0),
        };
        let plan = match (&residual, compute) {
            (Some(r), false) => Plan::Reuse((input + r)?),
            _ => Plan::Compute,
        };
        self.state = State::TeaCache {
            previous_modulated: modulated.clone(),
            accumulated,
            residual,
        };
        self.record(matches!(plan, Plan::Compute));
        Ok(plan)
    }

    /// MagCache, before any block runs: `input` the stack's image-token input.
    fn magcache(&mut self, input: &Tensor) -> Result<Plan> {
        let CacheSpec::MagCache(spec) = self.spec else {
            candle_core::bail!("magcache on a {} cache", self.spec)
        };
        let step = self.decisions.len() % self.steps.max(1);
        let (mut ratio, mut err, mut counted, residual) = match std::mem::take(&mut self.state) {
            State::MagCache {
                accumulated_ratio,
                accumulated_err,
                accumulated_steps,
                residual,
            } => (
                accumulated_ratio,
                accumulated_err,
                accumulated_steps,
                residual,
            ),
            _ => (1.0f32, 0.0f32, 0, None),
        };
        let mut compute = true;
        if step >= spec.retention_step(self.steps) {
            // diffusers: a step past its ratios gets 1.0
            ratio *= self.mag_ratios.get(step).copied().unwrap_or(1.0);
            counted += 1;
            err += (1.0 - ratio).abs();
            if residual.is_some() && err <= spec.threshold as f32 && counted <= spec.max_skip {
                compute = false;
            } else {
                (ratio, err, counted) = (1.0, 0.0, 0);
            }
        }
        let plan = match (&residual, compute) {
            (Some(r), false) => Plan::Reuse((input + r)?),
            _ => Plan::Compute,
        };
        self.state = State::MagCache {
            accumulated_ratio: ratio,
            accumulated_err: err,
            accumulated_steps: counted,
            residual,
        };
        self.record(compute);
        Ok(plan)
    }

    /// TeaCache's and MagCache's plan carried out over image tokens `x`: the stored residual
    /// added, or every block run and the new residual (output − input) stored.
    fn whole_stack(&mut self, plan: Plan, blocks: &BlockLoop, x: Tensor) -> Result<Tensor> {
        match plan {
            Plan::Reuse(out) => Ok(out),
            Plan::Compute => {
                let out = blocks.run(x.clone())?;
                if let State::TeaCache { residual, .. } | State::MagCache { residual, .. } =
                    &mut self.state
                {
                    *residual = Some((&out - &x)?);
                }
                Ok(out)
            }
        }
    }

    /// Counts a forward that did not run at all (the CFG gate skipped it) as served from the
    /// cache, so that the step count (TeaCache's first and last step) stays aligned.
    pub fn skipped(&mut self) {
        self.record(false);
    }

    /// Counts a forward (`computed`: its blocks ran).
    fn record(&mut self, computed: bool) {
        self.decisions.push(computed);
    }
}

/// `mean|a − b| / mean|b|` as a host number: the means in f32 whatever the run dtype (the
/// references take `.item()` of the same ratio).
fn relative_l1(a: &Tensor, b: &Tensor) -> Result<f64> {
    let a = a.to_dtype(DType::F32)?;
    let b = b.to_dtype(DType::F32)?;
    let diff = (a - &b)?.abs()?.mean_all()?;
    let base = b.abs()?.mean_all()?;
    Ok((diff / base)?.to_scalar::<f32>()? as f64)
}
