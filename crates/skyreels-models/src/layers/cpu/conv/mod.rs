//! 3D convolution of f32 CPU tensors with replicate padding by clamped indices (and the causal
//! nearest upsampling of the VAE's upsamplers), by three algorithms: `direct` (unit strides,
//! taps reading the same source sample merged, see `taps`), `winograd` (unit strides, 3×3
//! spatial taps, no upsampling) and `im2col` (the strided downsamplers). [`conv3d_f32`] checks
//! the shapes and picks one.

mod direct;
mod im2col;
mod taps;
mod winograd;

use candle_core::{bail, Result, Tensor};

/// Output geometry, padding and input upsampling of [`conv3d_f32`].
#[derive(Debug, Clone, Copy)]
pub(crate) struct Conv3dGeometry {
    /// (t, h, w) strides.
    pub(crate) stride: (usize, usize, usize),
    /// Replicate padding: frames before, rows above and below, columns left and right.
    pub(crate) pad: (usize, usize, usize),
    /// (t, h, w) nearest-upsampling factors applied to the input before padding, the first frame
    /// upsampled spatially only (HunyuanVideo's causal upsampler); (1, 1, 1) for none. Only with
    /// unit strides.
    pub(crate) upsample: (usize, usize, usize),
}

/// 3D convolution of f32 CPU x (b, c, t, h, w) with w (o, c, kt, kh, kw) and bias, with
/// replicate padding (`pad`: frames in front only, rows and columns on both sides) applied
/// through clamped indices. Unit strides run [`winograd::conv3d_f32_winograd`] for 3×3 spatial
/// taps without upsampling and [`direct::conv3d_f32_direct`] (which also does the upsampling)
/// otherwise; other strides run [`im2col::conv3d_f32_im2col`].
pub(crate) fn conv3d_f32(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    geo: Conv3dGeometry,
) -> Result<Tensor> {
    let (_, c, t, h, w) = x.dims5()?;
    let (_, cw, kt, kh, kw) = weight.dims5()?;
    if c != cw {
        bail!(
            "conv3d: input {:?} does not match weight {:?}",
            x.shape(),
            weight.shape()
        )
    }
    let (st, sh, sw) = geo.stride;
    let (ut, uh, uw) = geo.upsample;
    if ut == 0 || uh == 0 || uw == 0 || (geo.upsample != (1, 1, 1) && geo.stride != (1, 1, 1)) {
        bail!(
            "conv3d: upsampling {:?} needs positive factors and unit strides, got strides {:?}",
            geo.upsample,
            geo.stride
        )
    }
    let (pt, ph, pw) = geo.pad;
    let tu = if t == 0 { 0 } else { 1 + ut * (t - 1) };
    let (tp, hp, wp) = (tu + pt, uh * h + 2 * ph, uw * w + 2 * pw);
    if t == 0 || h == 0 || w == 0 || tp < kt || hp < kh || wp < kw || st == 0 || sh == 0 || sw == 0
    {
        bail!(
            "conv3d: padded input {:?} smaller than kernel {:?}",
            (tp, hp, wp),
            (kt, kh, kw)
        )
    }
    if geo.stride == (1, 1, 1) {
        if geo.upsample == (1, 1, 1) && (kh, kw) == (3, 3) {
            return winograd::conv3d_f32_winograd(x, weight, bias, geo.pad);
        }
        return direct::conv3d_f32_direct(x, weight, bias, geo.pad, geo.upsample);
    }
    im2col::conv3d_f32_im2col(x, weight, bias, geo.stride, geo.pad)
}

/// The bias as o values (zeros without one).
fn bias_values(bias: Option<&Tensor>, o: usize) -> Result<Vec<f32>> {
    match bias {
        Some(b) => b.to_vec1::<f32>(),
        None => Ok(vec![0.0; o]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn the_three_algorithms_agree() {
        // unit strides and 3×3 spatial taps, where each of them applies; odd output sizes (7
        // columns: a partial Winograd tile) and causal padding (2 frames in front)
        let dev = Device::Cpu;
        let c = 5;
        let x = Tensor::randn(0f32, 1., (1, c, 4, 6, 7), &dev).unwrap();
        let w = Tensor::randn(0f32, 0.2, (4, c, 3, 3, 3), &dev).unwrap();
        let b = Tensor::randn(0f32, 1., 4, &dev).unwrap();
        let pad = (2, 1, 1);
        let want = im2col::conv3d_f32_im2col(&x, &w, Some(&b), (1, 1, 1), pad).unwrap();
        assert_eq!(want.dims(), &[1, 4, 4, 6, 7]);
        let direct = direct::conv3d_f32_direct(&x, &w, Some(&b), pad, (1, 1, 1)).unwrap();
        let winograd = winograd::conv3d_f32_winograd(&x, &w, Some(&b), pad).unwrap();
        for (name, got) in [("direct", direct), ("winograd", winograd)] {
            let diff = (got - &want).unwrap().abs().unwrap().max_all().unwrap();
            let err = diff.to_scalar::<f32>().unwrap() as f64;
            // the tolerance of `conv3d`'s tests against the naive convolution
            let tol = 2e-4 * (c as f64).sqrt();
            assert!(err < tol, "{name}: {err}");
        }
    }
}
