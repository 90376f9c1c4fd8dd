//! LoRA as a [`LinearAdapter`]: PEFT's `lora_B(lora_A(x)) * scaling` (`peft/tuners/lora/layer.py`,
//! `Linear.forward`), next to an untouched base weight.

use super::linear::LinearAdapter;
use candle_core::{bail, Result, Tensor};

/// One LoRA's term for one layer: `scale · (x aᵀ bᵀ + bias_b)`.
///
/// `scale` is PEFT's `scaling`: the adapter's weight (diffusers' `set_adapters`) × `alpha / rank`
/// (`alpha / √rank` with rsLoRA). It is folded into `b` and `bias_b` once, so a forward makes no
/// extra pass over the layer's output to scale it (the same product as PEFT's to rounding). The
/// tensors live in the compute dtype on the layer's device; an input in another dtype or on
/// another device gets the adapter converted to its own.
#[derive(Debug, Clone)]
pub struct LoraDelta {
    /// `lora_A.weight` transposed, contiguous: (in, rank).
    a_t: Tensor,
    /// (`lora_B.weight` × scale) transposed, contiguous: (rank, out).
    b_t: Tensor,
    /// `lora_B.bias` × scale: (out), when the LoRA has one (PEFT's `lora_bias`).
    bias_b: Option<Tensor>,
    scale: f64,
}

impl LoraDelta {
    /// `a` (rank, in), `b` (out, rank), `bias_b` (out); the shapes must agree.
    pub fn new(a: Tensor, b: Tensor, bias_b: Option<Tensor>, scale: f64) -> Result<Self> {
        let (rank, _) = a.dims2()?;
        let (out, rank_b) = b.dims2()?;
        if rank != rank_b {
            bail!(
                "lora: lora_A {:?} and lora_B {:?} have different ranks",
                a.dims(),
                b.dims()
            )
        }
        if let Some(bias) = &bias_b {
            if bias.dims() != [out] {
                bail!(
                    "lora: lora_B.bias {:?} for lora_B {:?}",
                    bias.dims(),
                    b.dims()
                )
            }
        }
        Ok(Self {
            a_t: a.t()?.contiguous()?,
            b_t: b.affine(scale, 0.0)?.t()?.contiguous()?,
            bias_b: bias_b.map(|t| t.affine(scale, 0.0)).transpose()?,
            scale,
        })
    }

    /// (out, in) of the layer it fits.
    pub fn dims(&self) -> (usize, usize) {
        (self.b_t.dims()[1], self.a_t.dims()[0])
    }

    pub fn rank(&self) -> usize {
        self.a_t.dims()[1]
    }

    pub fn scale(&self) -> f64 {
        self.scale
    }
}

/// `t` in `like`'s dtype on `like`'s device (no copy when it already is).
fn as_input(t: &Tensor, like: &Tensor) -> Result<Tensor> {
    t.to_dtype(like.dtype())?.to_device(like.device())
}

impl LinearAdapter for LoraDelta {
    fn delta(&self, x: &Tensor) -> Result<Tensor> {
        let a_t = as_input(&self.a_t, x)?;
        let b_t = as_input(&self.b_t, x)?;
        // (rows, in) -> (rows, rank) -> (rows, out)
        let h = x.matmul(&a_t)?.matmul(&b_t)?;
        match &self.bias_b {
            Some(bias) => h.broadcast_add(&as_input(bias, x)?),
            None => Ok(h),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    #[test]
    fn delta_is_peft_lora_b_of_lora_a_times_scaling() {
        // import torch
        // A = torch.tensor([[1., 2., 0.], [0., -1., 1.]]); B = torch.tensor([[1., 0.], [2., 1.]])
        // x = torch.tensor([[1., 1., 1.], [0., 2., -1.]]); bias = torch.tensor([0.5, -1.])
        // (torch.nn.functional.linear(torch.nn.functional.linear(x, A), B, bias) * 0.25).tolist()
        // [[0.875, 1.25], [1.125, 1.0]]
        let dev = Device::Cpu;
        let a = Tensor::new(&[[1f32, 2., 0.], [0., -1., 1.]], &dev).unwrap();
        let b = Tensor::new(&[[1f32, 0.], [2., 1.]], &dev).unwrap();
        let bias = Tensor::new(&[0.5f32, -1.], &dev).unwrap();
        let x = Tensor::new(&[[1f32, 1., 1.], [0., 2., -1.]], &dev).unwrap();
        let d = LoraDelta::new(a.clone(), b.clone(), Some(bias), 0.25).unwrap();
        assert_eq!((d.dims(), d.rank(), d.scale()), ((2, 3), 2, 0.25));
        let got = d.delta(&x).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(got, vec![vec![0.875, 1.25], vec![1.125, 1.0]]);
        // another input dtype: the adapter follows it
        let got = d.delta(&x.to_dtype(DType::F64).unwrap()).unwrap();
        assert_eq!(got.dtype(), DType::F64);
        // mismatched factors are refused
        let rank3 = Tensor::zeros((2, 3), DType::F32, &dev).unwrap();
        assert!(LoraDelta::new(a.clone(), rank3, None, 1.0).is_err());
        let short = Tensor::new(&[1f32], &dev).unwrap();
        assert!(LoraDelta::new(a, b, Some(short), 1.0).is_err());
    }
}
