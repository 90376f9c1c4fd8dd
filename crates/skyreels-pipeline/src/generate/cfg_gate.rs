//! CFG gating (`--cfg-gate F`, FastVideo's): from step ceil(F · steps) on, the unconditional
//! forward of true CFG is not run; its prediction is taken as the conditional one minus the
//! guidance difference `cond − uncond` of the last step that ran both, so the step's velocity is
//! `(v − d) + scale · d`. Without true CFG there is no unconditional forward and the gate does
//! nothing.

use candle_core::{Result, Tensor};
use skyreels_params::cfg_gate_start;

/// One generation's gate: where it starts and the last full step's guidance difference.
pub(crate) struct CfgGate {
    /// The first gated step (0-based); `usize::MAX`: off.
    start: usize,
    /// `cond − uncond` of the last step that ran both forwards (kept only when the gate is on).
    difference: Option<Tensor>,
}

impl CfgGate {
    /// The gate of a generation of `steps` steps (`fraction` None: off).
    pub fn new(fraction: Option<f64>, steps: usize) -> Self {
        Self {
            start: fraction.map_or(usize::MAX, |f| cfg_gate_start(f, steps)),
            difference: None,
        }
    }

    /// The difference step `step` reuses instead of running the unconditional forward; None:
    /// the step runs both (before the gate, or with no full step before it).
    pub fn reused(&self, step: usize) -> Option<&Tensor> {
        self.difference.as_ref().filter(|_| step >= self.start)
    }

    /// The guided velocity of a full step, `v_neg + scale · (v − v_neg)`, keeping `v − v_neg`
    /// for the gated steps when the gate is on.
    pub fn guide(&mut self, v: &Tensor, v_neg: &Tensor, scale: f64) -> Result<Tensor> {
        let difference = (v - v_neg)?;
        let out = v_neg + (&difference * scale)?;
        if self.start != usize::MAX {
            self.difference = Some(difference);
        }
        out
    }

    /// The guided velocity of a gated step from its conditional velocity `v` and the reused
    /// difference `d`: `(v − d) + scale · d`.
    pub fn gated(v: &Tensor, d: &Tensor, scale: f64) -> Result<Tensor> {
        (v - d)? + (d * scale)?
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn the_gate_reuses_the_last_full_difference_from_its_start() -> Result<()> {
        let t = |v: &[f32]| Tensor::new(v, &Device::Cpu);
        let mut gate = CfgGate::new(Some(0.6), 5);
        // ceil(0.6 · 5) = 3: steps 0, 1, 2 run both
        for (step, v, v_neg) in [(0, [3.0f32, 1.0], [1.0, 1.0]), (2, [2.0, 4.0], [1.0, 2.0])] {
            assert!(gate.reused(step).is_none());
            let out = gate.guide(&t(&v)?, &t(&v_neg)?, 2.0)?;
            // v_neg + 2 (v − v_neg)
            let want: Vec<f32> = v.iter().zip(v_neg).map(|(a, b)| 2.0 * a - b).collect();
            assert_eq!(out.to_vec1::<f32>()?, want);
        }
        for step in [3, 4] {
            let d = gate.reused(step).expect("gated").clone();
            assert_eq!(d.to_vec1::<f32>()?, [1.0, 2.0]);
            // (v − d) + 2 d with step 2's d = (1, 2)
            let out = CfgGate::gated(&t(&[5.0, 5.0])?, &d, 2.0)?;
            assert_eq!(out.to_vec1::<f32>()?, [6.0, 7.0]);
        }
        // off: never gated, nothing kept
        let mut off = CfgGate::new(None, 5);
        off.guide(&t(&[1.0])?, &t(&[0.0])?, 2.0)?;
        assert!(off.reused(4).is_none() && off.difference.is_none());
        Ok(())
    }
}
