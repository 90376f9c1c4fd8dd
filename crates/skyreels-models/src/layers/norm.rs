//! Normalization layers with the reference's parameterization.

use candle_core::{DType, Module, Result, Tensor};
use candle_nn::VarBuilder;

/// `nn.LayerNorm(dim, elementwise_affine=False)` (and, with `new_affine`, the affine form).
#[derive(Debug, Clone)]
pub struct LayerNormNoAffine {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNormNoAffine {
    /// A LayerNorm without learned parameters, for `dim` features of `dtype` on `vb`'s device.
    pub fn new(dim: usize, eps: f64, dtype: DType, vb: &VarBuilder) -> Result<Self> {
        Ok(Self {
            weight: Tensor::ones(dim, dtype, vb.device())?,
            bias: Tensor::zeros(dim, dtype, vb.device())?,
            eps,
        })
    }

    /// A LayerNorm with `weight` and `bias` loaded from `vb`.
    pub fn new_affine(dim: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            weight: vb.get(dim, "weight")?,
            bias: vb.get(dim, "bias")?,
            eps,
        })
    }
}

impl Module for LayerNormNoAffine {
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

impl Module for RmsNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        candle_nn::ops::rms_norm(&x.contiguous()?, &self.weight, self.eps as f32)
    }
}
