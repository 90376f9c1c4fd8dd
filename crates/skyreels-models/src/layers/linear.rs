//! `nn.Linear` over the last dimension of any-rank input.
//!
//! The weight is a [`MatmulWeight`]: dense in the compute dtype, or as the checkpoint stores it
//! (fp8, GGUF blocks), materialized in the input's dtype right before each use. Where it comes
//! from is the [`Weights`] the layer is built with ([`linear`], [`linear_b`]).
//!
//! Adapters: a layer can carry [`LinearAdapter`]s, each adding a term computed from the layer's
//! input to its output at forward time, `y = W x + b + Σᵢ deltaᵢ(x)`, without touching the stored
//! weight. This is the seam for LoRA (PEFT's `base(x) + lora_B(lora_A(x)) * scaling`, with
//! `deltaᵢ(x) = sᵢ · Bᵢ (Aᵢ x)`): adapters switch per request while fp8 and GGUF weights stay
//! stored. A layer without adapters computes exactly what it computed before they existed.

use super::cpu::{linear_f32, linear_parts_f32};
use super::weights::{MatmulWeight, Weights};
use candle_core::{DType, Module, Result, Tensor};
use std::borrow::Cow;
use std::sync::Arc;

/// A term added to a [`Linear`]'s output at forward time (a LoRA delta).
pub trait LinearAdapter: std::fmt::Debug + Send + Sync {
    /// The term for the layer's input rows `x` (rows, in): (rows, out), in `x`'s dtype on `x`'s
    /// device. For LoRA with `a` (r, in), `b` (out, r) and scale `s`: `s · (x aᵀ) bᵀ`.
    fn delta(&self, x: &Tensor) -> Result<Tensor>;
}

#[derive(Debug, Clone)]
pub struct Linear {
    weight: MatmulWeight,
    bias: Option<Tensor>,
    /// Added to the output in order; empty: the plain layer.
    adapters: Vec<Arc<dyn LinearAdapter>>,
}

/// Loads `weight` [out, in] and `bias` [out].
pub fn linear<'a>(in_dim: usize, out_dim: usize, vb: impl Into<Weights<'a>>) -> Result<Linear> {
    linear_b(in_dim, out_dim, true, vb)
}

/// Loads `weight` [out, in] (stored or dense, see [`Weights::matmul`]) and, when `bias`, `bias`
/// [out] (dense).
pub fn linear_b<'a>(
    in_dim: usize,
    out_dim: usize,
    bias: bool,
    vb: impl Into<Weights<'a>>,
) -> Result<Linear> {
    let vb = vb.into();
    let weight = vb.matmul((out_dim, in_dim), "weight")?;
    let bias = if bias {
        Some(vb.dense().get(out_dim, "bias")?)
    } else {
        None
    };
    Ok(Linear::new(weight, bias))
}

impl Linear {
    /// `weight` (out, in), `bias` (out), no adapters.
    pub fn new(weight: MatmulWeight, bias: Option<Tensor>) -> Self {
        Self {
            weight,
            bias,
            adapters: Vec::new(),
        }
    }

    pub fn weight(&self) -> &MatmulWeight {
        &self.weight
    }

    /// The adapters applied at forward time, in order.
    pub fn adapters(&self) -> &[Arc<dyn LinearAdapter>] {
        &self.adapters
    }

    /// Replaces the adapters (empty: none); the weight is not touched.
    pub fn set_adapters(&mut self, adapters: Vec<Arc<dyn LinearAdapter>>) {
        self.adapters = adapters;
    }

    /// The weight in `x`'s dtype on `x`'s device: borrowed when dense, materialized when stored.
    fn dense_weight(&self, x: &Tensor) -> Result<Cow<'_, Tensor>> {
        match &self.weight {
            MatmulWeight::Dense(w) => Ok(Cow::Borrowed(w)),
            MatmulWeight::Stored(s) => Ok(Cow::Owned(s.materialize(x.dtype(), x.device())?)),
        }
    }

    /// (out, in) of the weight, whichever form it is stored in.
    pub fn dims(&self) -> Result<(usize, usize)> {
        match &self.weight {
            MatmulWeight::Dense(w) => w.dims2(),
            MatmulWeight::Stored(s) => s.dims(),
        }
    }

    /// `y` (rows, out) plus every adapter's term for the input rows `x` (rows, in).
    fn add_adapters(&self, x: &Tensor, mut y: Tensor) -> Result<Tensor> {
        for adapter in &self.adapters {
            let d = adapter.delta(x)?;
            if d.dims() != y.dims() {
                candle_core::bail!(
                    "linear adapter: delta of shape {:?} for an output of shape {:?}",
                    d.dims(),
                    y.dims()
                )
            }
            y = (y + d)?;
        }
        Ok(y)
    }

    /// The layer applied to the concatenation of `parts` along the last dim (each (rows, kᵢ)),
    /// without materializing it on the CPU in f32 (adapters, if any, see the concatenation).
    pub fn forward_concat(&self, parts: &[&Tensor]) -> Result<Tensor> {
        let fused = parts
            .iter()
            .all(|p| p.device().is_cpu() && p.dtype() == DType::F32);
        if !fused || parts.iter().any(|p| p.rank() != 2) {
            return self.forward(&Tensor::cat(parts, parts[0].rank() - 1)?);
        }
        let mut off = 0;
        let with_offsets: Vec<(&Tensor, usize)> = parts
            .iter()
            .map(|p| {
                let o = off;
                off += p.dim(1).unwrap_or(0);
                (*p, o)
            })
            .collect();
        let weight = self.dense_weight(parts[0])?;
        let y = linear_parts_f32(&with_offsets, &weight, self.bias.as_ref())?;
        if self.adapters.is_empty() {
            return Ok(y);
        }
        // (rows, k₀) ++ (rows, k₁) ++ ... -> (rows, in)
        self.add_adapters(&Tensor::cat(parts, 1)?, y)
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims();
        let Some(&in_dim) = dims.last() else {
            candle_core::bail!("linear: scalar input")
        };
        let rows = x.elem_count() / in_dim.max(1);
        // (..., in) -> (rows, in)
        let x2 = x.reshape((rows, in_dim))?;
        let weight = self.dense_weight(x)?;
        let y = if x.device().is_cpu() && x.dtype() == DType::F32 {
            linear_f32(&x2, &weight, self.bias.as_ref())?
        } else {
            let y = x2.matmul(&weight.t()?)?;
            match &self.bias {
                Some(b) => y.broadcast_add(b)?,
                None => y,
            }
        };
        let y = self.add_adapters(&x2, y)?;
        // (rows, out) -> (..., out)
        let mut out_dims = dims.to_vec();
        *out_dims.last_mut().expect("rank >= 1") = self.dims()?.0;
        y.reshape(out_dims)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layers::gguf;
    use crate::layers::lora::LoraDelta;
    use crate::layers::weights::{StoredWeight, StoredWeights};
    use candle_core::quantized::QTensor;
    use candle_core::Device;
    use candle_nn::VarBuilder;

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    #[test]
    fn fused_bias_matches_matmul_plus_bias() {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1., (7, 5), &dev).unwrap();
        let b = Tensor::randn(0f32, 1., 7, &dev).unwrap();
        let x = Tensor::randn(0f32, 1., (2, 3, 5), &dev).unwrap();
        let l = Linear::new(MatmulWeight::Dense(w.clone()), Some(b.clone()));
        let got = l.forward(&x).unwrap();
        assert_eq!(got.dims(), &[2, 3, 7]);
        let want = x
            .broadcast_matmul(&w.t().unwrap())
            .unwrap()
            .broadcast_add(&b)
            .unwrap();
        // 5-term sums: rounding only
        assert!(max_diff(&got, &want) < 1e-5);
        // a split input gives the same result as the concatenation
        let (x1, x2) = (x.narrow(2, 0, 2).unwrap(), x.narrow(2, 2, 3).unwrap());
        let parts = [x1.reshape((6, 2)).unwrap(), x2.reshape((6, 3)).unwrap()];
        let split = l
            .forward_concat(&[&parts[0], &parts[1]])
            .unwrap()
            .reshape((2, 3, 7))
            .unwrap();
        assert!(max_diff(&split, &got) < 1e-5);
        // other dtypes take candle's matmul path
        let l64 = Linear::new(
            MatmulWeight::Dense(w.to_dtype(DType::F64).unwrap()),
            Some(b.to_dtype(DType::F64).unwrap()),
        );
        let y64 = l64.forward(&x.to_dtype(DType::F64).unwrap()).unwrap();
        assert_eq!(y64.dims(), &[2, 3, 7]);
    }

    struct Fp8Source(Tensor);

    impl StoredWeights for Fp8Source {
        fn stored_weight(&self, name: &str, shape: (usize, usize)) -> Result<Option<StoredWeight>> {
            Ok(
                (name == "proj.weight" && self.0.dims2()? == shape).then(|| StoredWeight::Cast {
                    weight: self.0.clone(),
                    scale: Some(0.5),
                }),
            )
        }
    }

    #[test]
    fn stored_weights_are_used_in_their_stored_form() {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1., (4, 32), &dev).unwrap();
        let fp8 = w.to_dtype(DType::F8E4M3).unwrap();
        let b = Tensor::randn(0f32, 1., 4, &dev).unwrap();
        let vb = VarBuilder::from_tensors(
            [("proj.bias".to_string(), b.clone())].into(),
            DType::F32,
            &dev,
        );
        // the layer asks the stored source first and keeps the fp8 tensor; only the bias is read
        // densely
        let weights = Weights::new(vb.clone(), Arc::new(Fp8Source(fp8.clone())));
        let l = linear(32, 4, weights.pp("proj")).unwrap();
        assert!(
            matches!(l.weight(), MatmulWeight::Stored(StoredWeight::Cast { weight, .. }) if weight.dtype() == DType::F8E4M3)
        );
        let x = Tensor::randn(0f32, 1., (3, 32), &dev).unwrap();
        let dense = ((fp8.to_dtype(DType::F32).unwrap() * 0.5).unwrap())
            .t()
            .unwrap();
        let want = x.matmul(&dense).unwrap().broadcast_add(&b).unwrap();
        // the same products in another order: rounding only
        assert!(max_diff(&l.forward(&x).unwrap(), &want) < 1e-5);
        // without the stored source the same builder reads densely (and finds no weight here)
        assert!(linear(32, 4, vb.pp("proj")).is_err());
        // GGUF blocks dequantize in diffusers' order on the CPU
        let q = QTensor::quantize(&w, candle_core::quantized::GgmlDType::Q8_0).unwrap();
        let values = gguf::dequantize(q.dtype(), &q.data().unwrap()).unwrap();
        let want = Tensor::from_vec(values, (4, 32), &dev)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap();
        let got = StoredWeight::Quantized(Arc::new(q))
            .materialize(DType::F32, &dev)
            .unwrap();
        assert_eq!(max_diff(&got, &want), 0.0);
    }

    #[test]
    fn adapters_add_their_delta_and_a_zero_one_changes_nothing() {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1., (6, 8), &dev).unwrap();
        let bias = Tensor::randn(0f32, 1., 6, &dev).unwrap();
        let x = Tensor::randn(0f32, 1., (2, 3, 8), &dev).unwrap();
        let rows = x.reshape((6, 8)).unwrap();
        let parts = [rows.narrow(1, 0, 3).unwrap(), rows.narrow(1, 3, 5).unwrap()];
        let mut l = Linear::new(MatmulWeight::Dense(w.clone()), Some(bias.clone()));
        let plain = l.forward(&x).unwrap().flatten_all().unwrap();
        let plain_concat = l.forward_concat(&[&parts[0], &parts[1]]).unwrap();
        // a rank-2 adapter with B = 0 adds exact zeros: the same values, in both forwards
        let a = Tensor::randn(0f32, 1., (2, 8), &dev).unwrap();
        let b0 = Tensor::zeros((6, 2), DType::F32, &dev).unwrap();
        let zero = LoraDelta::new(a.clone(), b0, None, 0.5).unwrap();
        l.set_adapters(vec![Arc::new(zero)]);
        let got = l.forward(&x).unwrap().flatten_all().unwrap();
        assert_eq!(
            got.to_vec1::<f32>().unwrap(),
            plain.to_vec1::<f32>().unwrap()
        );
        let got = l.forward_concat(&[&parts[0], &parts[1]]).unwrap();
        assert_eq!(
            got.to_vec2::<f32>().unwrap(),
            plain_concat.to_vec2::<f32>().unwrap()
        );
        // a real delta equals merging it into the weight, W + s·B·A, up to rounding
        let b = Tensor::randn(0f32, 1., (6, 2), &dev).unwrap();
        l.set_adapters(vec![Arc::new(
            LoraDelta::new(a.clone(), b.clone(), None, 0.5).unwrap(),
        )]);
        let merged = (&w + (b.matmul(&a).unwrap() * 0.5).unwrap()).unwrap();
        let want = Linear::new(MatmulWeight::Dense(merged), Some(bias))
            .forward(&x)
            .unwrap();
        assert!(max_diff(&l.forward(&x).unwrap(), &want) < 1e-4);
        let got = l.forward_concat(&[&parts[0], &parts[1]]).unwrap();
        assert!(max_diff(&got, &want.reshape((6, 6)).unwrap()) < 1e-4);
        // the weight itself is untouched
        assert!(matches!(l.weight(), MatmulWeight::Dense(t) if max_diff(t, &w) == 0.0));
    }
}
