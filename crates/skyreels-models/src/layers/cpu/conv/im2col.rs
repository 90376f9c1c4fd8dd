//! The strided convolution by im2col + GEMM, and the clamped row copy (replicate padding) that
//! all three algorithms read their input rows through.

use super::bias_values;
use crate::layers::cpu::matmul::{gemm_f32, View};
use crate::layers::cpu::with_f32s;
use candle_core::{Result, Tensor};
use rayon::prelude::*;

/// Budget of the im2col buffer (K rows × output positions), in f32 elements: 16 Mi = 64 MiB.
const IM2COL_BUDGET: usize = 16 << 20;

/// 3D convolution of x replicate-padded by `pad` (as [`super::conv3d_f32`], which checks the
/// shapes) with any strides and no upsampling: im2col over chunks of output rows (bounded
/// buffer), then one GEMM per chunk written straight into the (b, o, t', h', w') output with the
/// bias preloaded.
pub(super) fn conv3d_f32_im2col(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    stride: (usize, usize, usize),
    pad: (usize, usize, usize),
) -> Result<Tensor> {
    let (b, c, t, h, w) = x.dims5()?;
    let (o, _, kt, kh, kw) = weight.dims5()?;
    let (st, sh, sw) = stride;
    let (pt, ph, pw) = pad;
    // no upsampling with strides (`conv3d_f32` refuses it): the padded input's extent
    let (tp, hp, wp) = (t + pt, h + 2 * ph, w + 2 * pw);
    let (to, ho, wo) = ((tp - kt) / st + 1, (hp - kh) / sh + 1, (wp - kw) / sw + 1);
    let kdim = c * kt * kh * kw;
    let plane = to * ho * wo;
    let x = x.contiguous()?;
    let weight = weight.contiguous()?;
    let mut out = vec![0f32; b * o * plane];
    let rows_per_chunk = (IM2COL_BUDGET / (kdim * wo).max(1)).clamp(1, ho);
    let threads = rayon::current_num_threads();
    let par = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    let mut cols = vec![0f32; kdim * rows_per_chunk * wo];
    with_f32s([&x, &weight], |[xd, wd]| -> Result<()> {
        let bias_v = bias_values(bias, o)?;
        for bi in 0..b {
            let xb = &xd[bi * c * t * h * w..(bi + 1) * c * t * h * w];
            let ob = &mut out[bi * o * plane..(bi + 1) * o * plane];
            for ti in 0..to {
                let mut y0 = 0;
                while y0 < ho {
                    let rows = rows_per_chunk.min(ho - y0);
                    let n = rows * wo;
                    let cols = &mut cols[..kdim * n];
                    // im2col: row r = ((ci·kt + i)·kh + j)·kw + k holds, for each output
                    // position (y, x) of the chunk, the clamped input sample
                    cols.par_chunks_mut(n).enumerate().for_each(|(r, dst)| {
                        let k = r % kw;
                        let j = (r / kw) % kh;
                        let i = (r / (kw * kh)) % kt;
                        let ci = r / (kw * kh * kt);
                        let ts = (ti * st + i).saturating_sub(pt).min(t - 1);
                        let src_frame = &xb[(ci * t + ts) * h * w..(ci * t + ts + 1) * h * w];
                        for (yy, drow) in dst.chunks_exact_mut(wo).enumerate() {
                            let ys = ((y0 + yy) * sh + j).saturating_sub(ph).min(h - 1);
                            let srow = &src_frame[ys * w..(ys + 1) * w];
                            im2col_row(srow, drow, k, pw, sw);
                        }
                    });
                    // bias first, then out[:, chunk] += W (o × K) · cols (K × n)
                    let off = ti * ho * wo + y0 * wo;
                    for oi in 0..o {
                        let row = &mut ob[oi * plane + off..oi * plane + off + n];
                        row.fill(bias_v[oi]);
                    }
                    // SAFETY: the weight is (o, kdim), cols (kdim, n); the destination is o
                    // rows of n elements at stride `plane` inside `ob`.
                    unsafe {
                        gemm_f32(
                            o,
                            n,
                            kdim,
                            View {
                                ptr: ob[off..].as_mut_ptr(),
                                rs: plane as isize,
                                cs: 1,
                            },
                            true,
                            View {
                                ptr: wd.as_ptr(),
                                rs: kdim as isize,
                                cs: 1,
                            },
                            View {
                                ptr: cols.as_ptr(),
                                rs: n as isize,
                                cs: 1,
                            },
                            par,
                        );
                    }
                    y0 += rows;
                }
            }
        }
        Ok(())
    })??;
    Tensor::from_vec(out, (b, o, to, ho, wo), x.device())
}

/// One im2col row: dst[x] = src[clamp(x·stride + k − pad, 0, w − 1)].
#[inline]
pub(super) fn im2col_row(src: &[f32], dst: &mut [f32], k: usize, pad: usize, stride: usize) {
    let w = src.len();
    if stride == 1 {
        // x + k − pad inside [0, w) for x in [lo, hi): a plain copy; clamp the edges
        let lo = pad.saturating_sub(k).min(dst.len());
        let hi = (w + pad).saturating_sub(k).min(dst.len()).max(lo);
        dst[..lo].fill(src[0]);
        let start = lo + k - pad;
        dst[lo..hi].copy_from_slice(&src[start..start + (hi - lo)]);
        dst[hi..].fill(src[w - 1]);
    } else {
        for (x, d) in dst.iter_mut().enumerate() {
            *d = src[(x * stride + k).saturating_sub(pad).min(w - 1)];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_clamp_to_the_edges() {
        // dst[x] = src[clamp(x·stride + k − pad, 0, w − 1)] for the copy path (stride 1) and the
        // gather, with rows as long as a 3-tap output and up to 2 longer (Winograd's last tile)
        let src: Vec<f32> = (0..5).map(|i| i as f32).collect();
        for stride in [1, 2] {
            for pad in 0..3 {
                for k in 0..3 {
                    let n0 = (5 + 2 * pad - 3) / stride + 1;
                    for n in n0..n0 + 3 {
                        let mut dst = vec![-1f32; n];
                        im2col_row(&src, &mut dst, k, pad, stride);
                        let want: Vec<f32> = (0..n)
                            .map(|x| (x * stride + k).saturating_sub(pad).min(4) as f32)
                            .collect();
                        assert_eq!(dst, want, "stride {stride}, pad {pad}, tap {k}, {n} long");
                    }
                }
            }
        }
    }
}
