//! One-pass elementwise kernels: GELU-tanh (a `CustomOp1`, the one kernel that picks its own
//! device path) and the gated residual add of the DiT blocks.

use super::math::exp_f32;
use super::with_f32s;
use candle_core::{
    backend::BackendStorage, bail, CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor,
};
use rayon::prelude::*;

simd_dispatch! {
    fn gelu_tanh_slice(src: &[f32], dst: &mut [f32]) {
        // 0.5·x·(1 + tanh(u)) = x·sigmoid(2u), u = √(2/π)·(x + 0.044715·x³)
        const K: f32 = 0.797_884_6; // sqrt(2 / pi)
        for (d, &x) in dst.iter_mut().zip(src) {
            let u = K * (x + 0.044_715 * x * x * x);
            *d = x / (1.0 + exp_f32(-2.0 * u));
        }
    }
}

struct GeluTanh;

impl CustomOp1 for GeluTanh {
    fn name(&self) -> &'static str {
        "gelu-tanh-f32"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(data) = storage else {
            bail!("gelu-tanh-f32: expected f32, got {:?}", storage.dtype())
        };
        let Some((start, end)) = layout.contiguous_offsets() else {
            bail!("gelu-tanh-f32: input must be contiguous")
        };
        let src = &data[start..end];
        let mut dst = vec![0f32; src.len()];
        dst.par_chunks_mut(1 << 14)
            .zip(src.par_chunks(1 << 14))
            .for_each(|(d, s)| gelu_tanh_slice(s, d));
        Ok((CpuStorage::F32(dst), layout.shape().clone()))
    }
}

/// GELU with the tanh approximation (`gelu(x, approximate="tanh")`); fused and parallel for f32
/// on the CPU, candle's op elsewhere.
pub(crate) fn gelu_tanh(x: &Tensor) -> Result<Tensor> {
    if x.device().is_cpu() && x.dtype() == DType::F32 {
        x.contiguous()?.apply_op1_no_bwd(&GeluTanh)
    } else {
        x.gelu()
    }
}

/// x + y · gate for f32 CPU x, y (b, n, c) and gate (b, c), in one pass.
pub(crate) fn add_gated_f32(x: &Tensor, y: &Tensor, gate: &Tensor) -> Result<Tensor> {
    let (b, n, c) = x.dims3()?;
    let (x, y, gate) = (x.contiguous()?, y.contiguous()?, gate.contiguous()?);
    let mut out = vec![0f32; b * n * c];
    with_f32s([&x, &y, &gate], |[xd, yd, gd]| {
        out.par_chunks_mut(c)
            .zip(xd.par_chunks(c).zip(yd.par_chunks(c)))
            .enumerate()
            .for_each(|(row, (o, (xi, yi)))| {
                let g = &gd[(row / n) * c..(row / n + 1) * c];
                for i in 0..c {
                    o[i] = xi[i] + yi[i] * g[i];
                }
            })
    })?;
    Tensor::from_vec(out, (b, n, c), x.device())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn gelu_matches_the_tanh_formula() {
        let xs: Vec<f32> = (-4000..4000)
            .map(|i| i as f32 * 0.003)
            .chain([-30.0, 30.0, 0.0])
            .collect();
        let t = Tensor::new(xs.as_slice(), &Device::Cpu).unwrap();
        let got = gelu_tanh(&t).unwrap().to_vec1::<f32>().unwrap();
        for (x, g) in xs.iter().zip(got) {
            let x64 = *x as f64;
            let u = (2.0 / std::f64::consts::PI).sqrt() * (x64 + 0.044715 * x64.powi(3));
            let want = 0.5 * x64 * (1.0 + u.tanh());
            // 1e-6 relative: a few ulps of exp and the division. The floor 1e-8 covers the far
            // negative tail, where the reference's own 0.5·x·(1 + tanh) form cancels to ~3e-4
            // relative in f32 and values are far below anything that matters next to O(1) ones.
            let tol = 1e-6 * want.abs() + 1e-8;
            assert!(
                (g as f64 - want).abs() <= tol,
                "gelu({x}) = {g}, want {want}"
            );
        }
    }
}
