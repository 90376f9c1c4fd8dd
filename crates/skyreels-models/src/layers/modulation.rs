//! adaLN modulation helpers shared by the DiT blocks: fused on the CPU in f32, candle ops elsewhere.

use super::cpu::{add_gated_f32, layer_norm_modulate_f32};
use candle_core::{DType, Result, Tensor};

fn fused(x: &Tensor) -> bool {
    x.device().is_cpu() && x.dtype() == DType::F32
}

/// LN(x)·(1 + scale) + shift: LayerNorm without affine over the last dim of x (b, n, c), with
/// shift and scale (b, c) broadcast over tokens.
pub fn layer_norm_modulate(x: &Tensor, shift: &Tensor, scale: &Tensor, eps: f64) -> Result<Tensor> {
    if fused(x) {
        layer_norm_modulate_f32(x, shift, scale, eps as f32)
    } else {
        layer_norm_modulate_unfused(x, shift, scale, eps)
    }
}

fn layer_norm_modulate_unfused(
    x: &Tensor,
    shift: &Tensor,
    scale: &Tensor,
    eps: f64,
) -> Result<Tensor> {
    let c = x.dim(2)?;
    let ones = Tensor::ones(c, x.dtype(), x.device())?;
    let zeros = Tensor::zeros(c, x.dtype(), x.device())?;
    let xn = candle_nn::ops::layer_norm(&x.contiguous()?, &ones, &zeros, eps as f32)?;
    xn.broadcast_mul(&(scale.unsqueeze(1)? + 1.0)?)?
        .broadcast_add(&shift.unsqueeze(1)?)
}

/// x + y·gate for x, y (b, n, c) and gate (b, c) broadcast over tokens.
pub fn add_gated(x: &Tensor, y: &Tensor, gate: &Tensor) -> Result<Tensor> {
    if fused(x) {
        add_gated_f32(x, y, gate)
    } else {
        add_gated_unfused(x, y, gate)
    }
}

fn add_gated_unfused(x: &Tensor, y: &Tensor, gate: &Tensor) -> Result<Tensor> {
    x + y.broadcast_mul(&gate.unsqueeze(1)?)?
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn fused_matches_unfused() {
        let dev = Device::Cpu;
        // offset mean and non-unit scale, to exercise the variance computation
        let x = Tensor::randn(0f32, 1., (2, 5, 24), &dev)
            .unwrap()
            .affine(3.0, 1.5)
            .unwrap();
        let y = Tensor::randn(0f32, 1., (2, 5, 24), &dev).unwrap();
        let shift = Tensor::randn(0f32, 1., (2, 24), &dev).unwrap();
        let scale = Tensor::randn(0f32, 1., (2, 24), &dev).unwrap();
        let pairs = [
            (
                layer_norm_modulate(&x, &shift, &scale, 1e-6).unwrap(),
                layer_norm_modulate_unfused(&x, &shift, &scale, 1e-6).unwrap(),
            ),
            (
                add_gated(&x, &y, &scale).unwrap(),
                add_gated_unfused(&x, &y, &scale).unwrap(),
            ),
        ];
        for (fused, unfused) in pairs {
            assert_eq!(fused.dims(), &[2, 5, 24]);
            let diff = (fused - unfused).unwrap().abs().unwrap().max_all().unwrap();
            // two f32 evaluations of 24-term statistics and one multiply-add: a few ulps
            assert!(diff.to_scalar::<f32>().unwrap() < 1e-5);
        }
    }
}
