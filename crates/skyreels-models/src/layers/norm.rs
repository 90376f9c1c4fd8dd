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

/// diffusers `RMSNorm(dim, eps, elementwise_affine=True)`: x · rsqrt(mean(x²) + eps) · weight.
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
}

impl RmsNorm {
    /// The norm over the last dim of x (b, n, h, d), then RoPE on its first `cos.dim(0)` tokens:
    /// one fused pass on the CPU in f32.
    pub fn forward_rope(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        if x.device().is_cpu() && x.dtype() == candle_core::DType::F32 {
            return super::cpu_kernels::rms_norm_rope_f32(
                x,
                &self.weight,
                self.eps as f32,
                cos,
                sin,
            );
        }
        super::rope::apply_rotary_emb(&self.forward(x)?, cos, sin)
    }
}

impl Module for RmsNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        candle_nn::ops::rms_norm(&x.contiguous()?, &self.weight, self.eps as f32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layers::rope::{apply_rotary_emb, rope_tables};
    use candle_core::{DType, Device};

    #[test]
    fn fused_norm_rope_matches_unfused() {
        let dev = Device::Cpu;
        let norm = RmsNorm {
            weight: Tensor::randn(1f32, 0.2, 8, &dev).unwrap(),
            eps: 1e-6,
        };
        // 2 samples, 7 tokens of which the first 6 (a 1x2x3 grid) are rotated, 3 heads of 8
        let x = Tensor::randn(0f32, 1., (2, 7, 3, 8), &dev).unwrap();
        let (cos, sin) = rope_tables((1, 2, 3), &[2, 2, 4], 256.0, &dev).unwrap();
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
