//! Normalizations in one pass per row or group: RMSNorm + RoPE on attention heads, LayerNorm +
//! adaLN modulation, and GroupNorm with an optional SiLU.

use super::math::exp_f32;
use super::with_f32s;
use candle_core::{bail, Result, Tensor};
use rayon::prelude::*;

/// RMSNorm over the head dim then interleaved-pair RoPE on the first `cos.dim(0)` tokens, for f32
/// CPU x (b, n, h, d), weight (d) and tables (n_rope, d/2), in one pass: the reference's
/// `norm_q` / `norm_k` followed by `apply_rotary_emb`.
pub(crate) fn rms_norm_rope_f32(
    x: &Tensor,
    weight: &Tensor,
    eps: f32,
    cos: &Tensor,
    sin: &Tensor,
) -> Result<Tensor> {
    let (b, n, h, d) = x.dims4()?;
    let n_rope = cos.dim(0)?;
    let x = x.contiguous()?;
    let mut out = vec![0f32; b * n * h * d];
    with_f32s([&x, weight, cos, sin], |[xd, wd, cd, sd]| {
        out.par_chunks_mut(h * d)
            .zip(xd.par_chunks(h * d))
            .enumerate()
            .for_each(|(row, (o, xi))| {
                let t = row % n;
                let rot = (t < n_rope).then(|| {
                    let r = t * d / 2..(t + 1) * d / 2;
                    (&cd[r.clone()], &sd[r])
                });
                for (oh, xh) in o.chunks_exact_mut(d).zip(xi.chunks_exact(d)) {
                    rms_norm_rope_head(xh, oh, wd, eps, rot);
                }
            })
    })?;
    Tensor::from_vec(out, (b, n, h, d), x.device())
}

simd_dispatch! {
    fn rms_norm_rope_head(x: &[f32], out: &mut [f32], w: &[f32], eps: f32, rot: Option<(&[f32], &[f32])>) {
        let ms = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
        let r = 1.0 / (ms + eps).sqrt();
        for i in 0..x.len() {
            out[i] = x[i] * r * w[i];
        }
        if let Some((c, s)) = rot {
            for j in 0..x.len() / 2 {
                let (x0, x1) = (out[2 * j], out[2 * j + 1]);
                out[2 * j] = x0 * c[j] - x1 * s[j];
                out[2 * j + 1] = x0 * s[j] + x1 * c[j];
            }
        }
    }
}

/// LayerNorm (no affine) then modulation, for f32 CPU x (b, n, c) and shift, scale (b, c):
/// ((x − mean) · rstd) · (1 + scale) + shift in one pass per row, in the reference's op order.
pub(crate) fn layer_norm_modulate_f32(
    x: &Tensor,
    shift: &Tensor,
    scale: &Tensor,
    eps: f32,
) -> Result<Tensor> {
    let (b, n, c) = x.dims3()?;
    let x = x.contiguous()?;
    let (shift, scale) = (shift.contiguous()?, scale.contiguous()?);
    let mut out = vec![0f32; b * n * c];
    with_f32s([&x, &shift, &scale], |[xd, sh, sc]| {
        let one_plus: Vec<f32> = sc.iter().map(|v| 1.0 + v).collect();
        out.par_chunks_mut(c)
            .zip(xd.par_chunks(c))
            .enumerate()
            .for_each(|(row, (o, xi))| {
                let r = (row / n) * c..(row / n + 1) * c;
                layer_norm_modulate_row(xi, o, &sh[r.clone()], &one_plus[r], eps);
            })
    })?;
    Tensor::from_vec(out, (b, n, c), x.device())
}

simd_dispatch! {
    fn layer_norm_modulate_row(
        x: &[f32],
        out: &mut [f32],
        shift: &[f32],
        one_plus_scale: &[f32],
        eps: f32
    ) {
        let c = x.len() as f32;
        let mean = x.iter().sum::<f32>() / c;
        let var = x.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / c;
        let rstd = 1.0 / (var + eps).sqrt();
        for i in 0..x.len() {
            out[i] = ((x[i] - mean) * rstd) * one_plus_scale[i] + shift[i];
        }
    }
}

/// GroupNorm over (b, c, ...) f32 CPU x with per-channel weight and bias, optionally followed
/// by SiLU, in two passes: statistics per (sample, group) — a contiguous block of c/groups
/// channels — then normalize, scale, shift (and SiLU) in one write.
pub(crate) fn group_norm_f32(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    groups: usize,
    eps: f32,
    silu: bool,
) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    if dims.len() < 3 || groups == 0 || !dims[1].is_multiple_of(groups) {
        bail!("group norm: input {dims:?} with {groups} groups")
    }
    let (b, c) = (dims[0], dims[1]);
    let spatial: usize = dims[2..].iter().product();
    let cpg = c / groups;
    let x = x.contiguous()?;
    let mut out = vec![0f32; x.elem_count()];
    with_f32s([&x, weight, bias], |[xd, wd, bd]| {
        out.par_chunks_mut(cpg * spatial)
            .zip(xd.par_chunks(cpg * spatial))
            .enumerate()
            .for_each(|(bg, (o, xi))| {
                let g = bg % groups;
                let ch = g * cpg..(g + 1) * cpg;
                group_norm_block(xi, o, &wd[ch.clone()], &bd[ch], spatial, eps, silu);
            })
    })?;
    debug_assert_eq!(out.len(), b * c * spatial);
    Tensor::from_vec(out, dims, x.device())
}

simd_dispatch! {
    fn group_norm_block(
        x: &[f32],
        out: &mut [f32],
        w: &[f32],
        b: &[f32],
        spatial: usize,
        eps: f32,
        silu: bool,
    ) {
        // sums in f64: a group holds up to millions of elements
        let n = x.len() as f64;
        let mean = x.iter().map(|&v| v as f64).sum::<f64>() / n;
        let var = x.iter().map(|&v| (v as f64 - mean) * (v as f64 - mean)).sum::<f64>() / n;
        let (mean, rstd) = (mean as f32, (1.0 / (var + eps as f64).sqrt()) as f32);
        for ((oc, xc), (&wc, &bc)) in out.chunks_exact_mut(spatial).zip(x.chunks_exact(spatial)).zip(w.iter().zip(b)) {
            for (o, &v) in oc.iter_mut().zip(xc) {
                let y = (v - mean) * rstd * wc + bc;
                *o = if silu { y / (1.0 + exp_f32(-y)) } else { y };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Deterministic values in [-2, 2), different for each `k`.
    fn vals(n: usize, k: usize) -> Vec<f32> {
        (0..n)
            .map(|i| ((i * 7919 + k * 104_729) % 211) as f32 / 52.75 - 2.0)
            .collect()
    }

    fn max_diff(got: &Tensor, want: &[f64]) -> f64 {
        let got = got.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(got.len(), want.len());
        got.iter()
            .zip(want)
            .map(|(g, w)| (*g as f64 - w).abs())
            .fold(0.0, f64::max)
    }

    #[test]
    fn rms_norm_rope_matches_the_formula() {
        // (b, n, h, d) = (2, 3, 2, 4); the first 2 tokens rotated, the third only normalized
        let dev = Device::Cpu;
        let (b, n, h, d, n_rope) = (2, 3, 2, 4, 2);
        let (xv, wv) = (vals(b * n * h * d, 1), vals(d, 2));
        let (cv, sv) = (vals(n_rope * d / 2, 3), vals(n_rope * d / 2, 4));
        let x = Tensor::from_vec(xv.clone(), (b, n, h, d), &dev).unwrap();
        let weight = Tensor::from_vec(wv.clone(), d, &dev).unwrap();
        let cos = Tensor::from_vec(cv.clone(), (n_rope, d / 2), &dev).unwrap();
        let sin = Tensor::from_vec(sv.clone(), (n_rope, d / 2), &dev).unwrap();
        let got = rms_norm_rope_f32(&x, &weight, 1e-6, &cos, &sin).unwrap();
        let mut want = Vec::new();
        for (row, head) in xv.chunks(d).enumerate() {
            let t = (row / h) % n;
            let ms = head.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / d as f64;
            let r = 1.0 / (ms + 1e-6).sqrt();
            let y: Vec<f64> = (0..d).map(|i| head[i] as f64 * r * wv[i] as f64).collect();
            for j in 0..d / 2 {
                let (y0, y1) = (y[2 * j], y[2 * j + 1]);
                if t < n_rope {
                    let (c, s) = (cv[t * d / 2 + j] as f64, sv[t * d / 2 + j] as f64);
                    want.extend([y0 * c - y1 * s, y0 * s + y1 * c]);
                } else {
                    want.extend([y0, y1]);
                }
            }
        }
        // f32 evaluation of a 4-term mean square and one rotation: a few ulps of values below 10
        assert!(max_diff(&got, &want) < 1e-5);
    }

    #[test]
    fn layer_norm_modulate_matches_the_formula() {
        // x (b, n, c) = (2, 3, 8); shift and scale per sample
        let dev = Device::Cpu;
        let (b, n, c) = (2, 3, 8);
        let (xv, shv, scv) = (vals(b * n * c, 5), vals(b * c, 6), vals(b * c, 7));
        let x = Tensor::from_vec(xv.clone(), (b, n, c), &dev).unwrap();
        let shift = Tensor::from_vec(shv.clone(), (b, c), &dev).unwrap();
        let scale = Tensor::from_vec(scv.clone(), (b, c), &dev).unwrap();
        let got = layer_norm_modulate_f32(&x, &shift, &scale, 1e-6).unwrap();
        let mut want = Vec::new();
        for (row, xr) in xv.chunks(c).enumerate() {
            let bi = row / n;
            let mean = xr.iter().map(|&v| v as f64).sum::<f64>() / c as f64;
            let var = xr.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / c as f64;
            let rstd = 1.0 / (var + 1e-6).sqrt();
            for i in 0..c {
                let (sh, sc) = (shv[bi * c + i] as f64, scv[bi * c + i] as f64);
                want.push((xr[i] as f64 - mean) * rstd * (1.0 + sc) + sh);
            }
        }
        // 8-term f32 statistics: a few ulps of values below 10
        assert!(max_diff(&got, &want) < 1e-5);
    }

    #[test]
    fn group_norm_matches_the_formula() {
        // x (b, c, t, h, w) = (2, 6, 2, 3, 2) in 3 groups of 2 channels, with and without SiLU
        let dev = Device::Cpu;
        let (b, c, groups, spatial) = (2, 6, 3, 12);
        let (xv, wv, bv) = (vals(b * c * spatial, 8), vals(c, 9), vals(c, 10));
        let x = Tensor::from_vec(xv.clone(), (b, c, 2, 3, 2), &dev).unwrap();
        let weight = Tensor::from_vec(wv.clone(), c, &dev).unwrap();
        let bias = Tensor::from_vec(bv.clone(), c, &dev).unwrap();
        for silu in [false, true] {
            let got = group_norm_f32(&x, &weight, &bias, groups, 1e-6, silu).unwrap();
            assert_eq!(got.dims(), x.dims());
            let mut want = Vec::new();
            let cpg = c / groups;
            for (bg, block) in xv.chunks(cpg * spatial).enumerate() {
                let g = bg % groups;
                let len = block.len() as f64;
                let mean = block.iter().map(|&v| v as f64).sum::<f64>() / len;
                let var = block
                    .iter()
                    .map(|&v| (v as f64 - mean).powi(2))
                    .sum::<f64>()
                    / len;
                let rstd = 1.0 / (var + 1e-6).sqrt();
                for (i, &v) in block.iter().enumerate() {
                    let ch = g * cpg + i / spatial;
                    let y = (v as f64 - mean) * rstd * wv[ch] as f64 + bv[ch] as f64;
                    want.push(if silu { y / (1.0 + (-y).exp()) } else { y });
                }
            }
            // f32 normalization after f64 statistics: a few ulps of values below 10
            assert!(max_diff(&got, &want) < 1e-5, "silu {silu}");
        }
        // channels must split into the groups
        assert!(group_norm_f32(&x, &weight, &bias, 4, 1e-6, false).is_err());
    }
}
