//! Normalization layers with the reference's parameterization.

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

/// `nn.LayerNorm(dim, elementwise_affine=True)` (the no-affine form is fused into
/// [`super::modulation::layer_norm_modulate`]).
#[derive(Debug, Clone)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    /// A LayerNorm with `weight` and `bias` loaded from `vb`.
    pub fn new(dim: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            weight: vb.get(dim, "weight")?,
            bias: vb.get(dim, "bias")?,
            eps,
        })
    }
}

impl Module for LayerNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        candle_nn::ops::layer_norm(&x.contiguous()?, &self.weight, &self.bias, self.eps as f32)
    }
}

/// `nn.GroupNorm(groups, channels, eps, affine=True)` over (b, c, ...), with an optional fused
/// SiLU (the VAE always follows its norms with one, except in attention).
#[derive(Debug, Clone)]
pub struct GroupNorm {
    inner: candle_nn::GroupNorm,
    weight: Tensor,
    bias: Tensor,
    groups: usize,
    eps: f64,
}

impl GroupNorm {
    pub fn new(groups: usize, channels: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        Self::from_tensors(
            vb.get(channels, "weight")?,
            vb.get(channels, "bias")?,
            groups,
            eps,
        )
    }

    pub fn from_tensors(weight: Tensor, bias: Tensor, groups: usize, eps: f64) -> Result<Self> {
        let channels = weight.dim(0)?;
        let inner = candle_nn::GroupNorm::new(weight.clone(), bias.clone(), channels, groups, eps)?;
        Ok(Self {
            inner,
            weight,
            bias,
            groups,
            eps,
        })
    }

    fn run(&self, x: &Tensor, silu: bool) -> Result<Tensor> {
        if x.device().is_cpu() && x.dtype() == candle_core::DType::F32 {
            let eps = self.eps as f32;
            return super::cpu::group_norm_f32(x, &self.weight, &self.bias, self.groups, eps, silu);
        }
        let y = self.inner.forward(x)?;
        if silu {
            y.silu()
        } else {
            Ok(y)
        }
    }

    /// SiLU(GroupNorm(x)).
    pub fn forward_silu(&self, x: &Tensor) -> Result<Tensor> {
        self.run(x, true)
    }
}

impl Module for GroupNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.run(x, false)
    }
}

/// diffusers `RMSNorm(dim, eps, elementwise_affine=True)`: x · rsqrt(mean(x²) + eps) · weight.
///
/// <https://github.com/huggingface/diffusers/blob/v0.42.1/src/diffusers/models/normalization.py#L510-L568>
#[derive(Debug, Clone)]
pub struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    pub fn new(dim: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            weight: vb.get(dim, "weight")?,
            eps,
        })
    }

    /// The norm over the last dim of x (b, n, h, d), then RoPE on its first `cos.dim(0)` tokens:
    /// one fused pass on the CPU in f32.
    pub fn forward_rope(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        if x.device().is_cpu() && x.dtype() == candle_core::DType::F32 {
            return super::cpu::rms_norm_rope_f32(x, &self.weight, self.eps as f32, cos, sin);
        }
        super::rope::apply_rotary_emb(&self.forward(x)?, cos, sin)
    }
}

impl Module for RmsNorm {
    /// diffusers' `RMSNorm` and transformers' `LlamaRMSNorm` agree: statistics in f32, the
    /// normalized x cast back to its dtype, then multiplied by the weight. In f32 that is exactly
    /// candle's fused op.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dtype = x.dtype();
        if dtype == candle_core::DType::F32 {
            return candle_nn::ops::rms_norm(&x.contiguous()?, &self.weight, self.eps as f32);
        }
        let xf = x.to_dtype(candle_core::DType::F32)?;
        let var = xf.sqr()?.mean_keepdim(candle_core::D::Minus1)?;
        let normed = xf
            .broadcast_div(&(var + self.eps)?.sqrt()?)?
            .to_dtype(dtype)?;
        normed.broadcast_mul(&self.weight)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layers::rope::{apply_rotary_emb, rope_tables};
    use candle_core::{DType, Device};

    #[test]
    fn fused_group_norm_matches_candle() {
        let dev = Device::Cpu;
        let gn = GroupNorm::from_tensors(
            Tensor::randn(1f32, 0.2, 6, &dev).unwrap(),
            Tensor::randn(0f32, 0.2, 6, &dev).unwrap(),
            3,
            1e-6,
        )
        .unwrap();
        // offset mean to exercise the variance; (b, c, t, h, w)
        let x = Tensor::randn(0f32, 1., (2, 6, 3, 4, 5), &dev)
            .unwrap()
            .affine(2.0, 3.0)
            .unwrap();
        for silu in [false, true] {
            let got = gn.run(&x, silu).unwrap();
            let want = gn.inner.forward(&x).unwrap();
            let want = if silu { want.silu().unwrap() } else { want };
            let diff = (got - want).unwrap().abs().unwrap().max_all().unwrap();
            // f32 evaluation order differs (candle: f32 sums, here f64): a few ulps
            assert!(diff.to_scalar::<f32>().unwrap() < 1e-5, "silu {silu}");
        }
    }

    #[test]
    fn rms_norm_paths_agree() {
        // f32: candle's fused op; other dtypes: the reference composition
        let dev = Device::Cpu;
        let w = Tensor::randn(1f32, 0.2, 8, &dev).unwrap();
        let x = Tensor::randn(0f32, 2., (3, 5, 8), &dev).unwrap();
        let f32_norm = RmsNorm {
            weight: w.clone(),
            eps: 1e-6,
        };
        let f64_norm = RmsNorm {
            weight: w.to_dtype(DType::F64).unwrap(),
            eps: 1e-6,
        };
        let a = f32_norm.forward(&x).unwrap().to_dtype(DType::F64).unwrap();
        let b = f64_norm.forward(&x.to_dtype(DType::F64).unwrap()).unwrap();
        let diff = (a - b).unwrap().abs().unwrap().max_all().unwrap();
        // both compute the statistics in f32; the f64 branch multiplies in f64: ulps only
        assert!(diff.to_scalar::<f64>().unwrap() < 1e-5);
    }

    #[test]
    fn fused_norm_rope_matches_unfused() {
        let dev = Device::Cpu;
        let norm = RmsNorm {
            weight: Tensor::randn(1f32, 0.2, 8, &dev).unwrap(),
            eps: 1e-6,
        };
        // 2 samples, 7 tokens of which the first 6 (a 1x2x3 grid) are rotated, 3 heads of 8
        let x = Tensor::randn(0f32, 1., (2, 7, 3, 8), &dev).unwrap();
        let (cos, sin) = rope_tables((1, 2, 3), &[2, 2, 4], 256.0, 0, &dev).unwrap();
        let fused = norm.forward_rope(&x, &cos, &sin).unwrap();
        // the generic path (f64 input) rotates in f32 and casts back
        let x64 = x.to_dtype(DType::F64).unwrap();
        let norm64 = RmsNorm {
            weight: norm.weight.to_dtype(DType::F64).unwrap(),
            eps: 1e-6,
        };
        let normed = candle_nn::ops::rms_norm_slow(&x64, &norm64.weight, 1e-6).unwrap();
        let want = apply_rotary_emb(&normed, &cos, &sin).unwrap();
        let diff = (fused.to_dtype(DType::F64).unwrap() - want)
            .unwrap()
            .abs()
            .unwrap();
        // f32 vs f64 evaluation of an 8-term mean square and one rotation: a few f32 ulps
        assert!(diff.max_all().unwrap().to_scalar::<f64>().unwrap() < 1e-5);
    }
}
