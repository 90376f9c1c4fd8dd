//! Winograd F(2×2, 3×3) for unit-stride convolutions with 3×3 spatial taps: 2.25 times fewer
//! multiplications than the direct convolution, and those as GEMMs.

use super::bias_values;
use super::im2col::im2col_row;
use super::taps::{frame_taps, frames_to_load};
use crate::layers::cpu::matmul::{gemm_f32, View};
use crate::layers::cpu::{with_f32s, SharedMut};
use candle_core::{bail, Result, Tensor};
use rayon::prelude::*;
use std::collections::HashMap;

/// Winograd F(2×2, 3×3) (Lavin & Gray 2015): the 2×2 output tile of a 3×3 correlation with
/// kernel g over the 4×4 input patch d is Aᵀ[(G g Gᵀ) ⊙ (Bᵀ d B)]A, 16 multiplications instead
/// of 36, with Bᵀ = [1 0 −1 0; 0 1 1 0; 0 −1 1 0; 0 1 0 −1], G = [1 0 0; ½ ½ ½; ½ −½ ½; 0 0 1],
/// Aᵀ = [1 1 1 0; 0 1 −1 −1]. G g Gᵀ of a row-major 3×3 kernel, in f64 (rounded once).
fn winograd_kernel(g: &[f64; 9]) -> [f64; 16] {
    let rows = |a: [f64; 3]| {
        [
            a[0],
            (a[0] + a[1] + a[2]) / 2.0,
            (a[0] - a[1] + a[2]) / 2.0,
            a[2],
        ]
    };
    let mut s = [[0f64; 3]; 4];
    for k in 0..3 {
        let col = rows([g[k], g[3 + k], g[6 + k]]);
        for i in 0..4 {
            s[i][k] = col[i];
        }
    }
    let mut u = [0f64; 16];
    for i in 0..4 {
        u[4 * i..4 * i + 4].copy_from_slice(&rows(s[i]));
    }
    u
}

simd_dispatch! {
    /// The right factor of Bᵀ d B for every tile of one input row: p holds the row's 2·tx + 2
    /// padded samples, e[q·tx + k] gets entry q of (d B) for tile k (columns 2k..2k + 4).
    fn winograd_input_row(p: &[f32], e: &mut [f32]) {
        let tx = e.len() / 4;
        let (e0, rest) = e.split_at_mut(tx);
        let (e1, rest) = rest.split_at_mut(tx);
        let (e2, e3) = rest.split_at_mut(tx);
        for k in 0..tx {
            let (a, b, c, d) = (p[2 * k], p[2 * k + 1], p[2 * k + 2], p[2 * k + 3]);
            e0[k] = a - c;
            e1[k] = b + c;
            e2[k] = c - b;
            e3[k] = b - d;
        }
    }
}

simd_dispatch! {
    /// The left factor: rows r0..r3 (each 4 × tx from [`winograd_input_row`]) of one tile row
    /// give Bᵀ d B, entry (i, j) of tile k into v[(4i + j)·stride + k].
    fn winograd_input_cols(r: [&[f32]; 4], v: &mut [f32], stride: usize) {
        let tx = r[0].len() / 4;
        for j in 0..4 {
            let [a, b, c, d] = r.map(|row| &row[j * tx..(j + 1) * tx]);
            // the rows of Bᵀ: a − c, b + c, c − b, b − d
            let (v0, rest) = v[j * stride..].split_at_mut(4 * stride);
            let (v1, rest) = rest.split_at_mut(4 * stride);
            let (v2, v3) = rest.split_at_mut(4 * stride);
            for k in 0..tx {
                v0[k] = a[k] - c[k];
                v1[k] = b[k] + c[k];
                v2[k] = c[k] - b[k];
                v3[k] = b[k] - d[k];
            }
        }
    }
}

simd_dispatch! {
    /// Aᵀ M A plus the bias for one tile row: m holds the 16 products (ξ = 4i + j at
    /// m[ξ·stride + k] for tile k), out0 / out1 (2·tx each) get the tile row's two output rows.
    fn winograd_output_row(m: &[f32], stride: usize, bias: f32, out0: &mut [f32], out1: &mut [f32]) {
        let tx = out0.len() / 2;
        let at = |xi: usize, k: usize| m[xi * stride + k];
        for k in 0..tx {
            let mut r0 = [0f32; 4];
            let mut r1 = [0f32; 4];
            for j in 0..4 {
                r0[j] = at(j, k) + at(4 + j, k) + at(8 + j, k);
                r1[j] = at(4 + j, k) - at(8 + j, k) - at(12 + j, k);
            }
            out0[2 * k] = r0[0] + r0[1] + r0[2] + bias;
            out0[2 * k + 1] = r0[1] - r0[2] - r0[3] + bias;
            out1[2 * k] = r1[0] + r1[1] + r1[2] + bias;
            out1[2 * k + 1] = r1[1] - r1[2] - r1[3] + bias;
        }
    }
}

/// Output tiles per task of [`conv3d_f32_winograd`] (whole tile rows, at least one): a task's
/// transformed inputs (up to kt × 16 × c × 64 values) and products (16 × o × 64) stay in L2 / L3
/// for the VAE's channel counts.
const WINOGRAD_TILES: usize = 64;

/// Unit-stride 3D convolution with 3×3 spatial taps of x replicate-padded by `pad` (frames in
/// front, rows and columns on both sides), by Winograd F(2×2, 3×3) over the spatial taps: 2.25
/// times fewer multiplications than the direct convolution, and those as GEMMs.
///
/// Tasks (run in parallel) are bands of whole rows of 2×2 output tiles, about
/// [`WINOGRAD_TILES`] tiles, through all output frames. A task transforms each source frame once
/// into a ring of kt slots: Bᵀ d B of the 4×4 input patch of each of its tiles and channels, as 16
/// matrices of c × tiles (replicate padding by clamped rows and columns). Per output frame it
/// accumulates the 16 products M[ξ] (o × tiles) = Σ over the source frames the frame reads of
/// U[ξ] (o × c) · V[ξ] with GEMMs, where U is the transformed kernel of the (merged, see
/// [`frame_taps`]) time taps reading that frame, and writes Aᵀ M A plus the bias to
/// its output rows.
pub(super) fn conv3d_f32_winograd(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    pad: (usize, usize, usize),
) -> Result<Tensor> {
    let (b, c, t, h, w) = x.dims5()?;
    let (o, _, kt, kh, kw) = weight.dims5()?;
    if (kh, kw) != (3, 3) {
        bail!(
            "winograd conv3d: 3x3 spatial taps only, got {:?}",
            weight.shape()
        )
    }
    let (pt, ph, pw) = pad;
    let frames = frame_taps(t, kt, pt, 1);
    let (to, ho, wo) = (frames.len(), h + 2 * ph - 2, w + 2 * pw - 2);
    let (ty, tx) = (ho.div_ceil(2), wo.div_ceil(2));
    // bands of whole tile rows, at least two per thread
    let band = (WINOGRAD_TILES / tx)
        .min(ty.div_ceil(2 * rayon::current_num_threads()))
        .max(1);
    let nb = band * tx;
    let x = x.contiguous()?;
    let weight = weight.contiguous()?;
    let plane = to * ho * wo;
    let mut out = vec![0f32; b * o * plane];
    let tasks: Vec<(usize, usize)> = (0..b)
        .flat_map(|bi| (0..ty).step_by(band).map(move |y0| (bi, y0)))
        .collect();
    with_f32s([&x, &weight], |[xd, wd]| -> Result<()> {
        let bias_v = bias_values(bias, o)?;
        // transformed kernels (16, o, c) per set of merged time taps
        let mut kernels: HashMap<&[usize], Vec<f32>> = HashMap::new();
        for (_, set) in frames.iter().flatten() {
            kernels.entry(set.as_slice()).or_insert_with(|| {
                let mut u = vec![0f32; 16 * o * c];
                for oi in 0..o {
                    for ci in 0..c {
                        let wk = &wd[(oi * c + ci) * kt * 9..][..kt * 9];
                        let mut g = [0f64; 9];
                        for &i in set {
                            for (gj, &wj) in g.iter_mut().zip(&wk[i * 9..i * 9 + 9]) {
                                *gj += wj as f64;
                            }
                        }
                        for (xi, &val) in winograd_kernel(&g).iter().enumerate() {
                            u[(xi * o + oi) * c + ci] = val as f32;
                        }
                    }
                }
                u
            });
        }
        let (kernels, bias_v, frames) = (&kernels, &bias_v, &frames);
        let ob = SharedMut(out.as_mut_ptr());
        let (prow, slot) = (2 * tx + 2, c * 16 * nb);
        tasks.par_iter().for_each_init(
            || {
                let scratch = (vec![0f32; prow], vec![0f32; (2 * band + 2) * 4 * tx]);
                let rows = (vec![0f32; 2 * tx], vec![0f32; 2 * tx]);
                (
                    vec![0f32; kt * slot],
                    vec![0f32; o * 16 * nb],
                    scratch,
                    rows,
                )
            },
            |(ring, m, (p, e), (out0, out1)), &(bi, y0)| {
                let rows = band.min(ty - y0);
                let n = rows * tx;
                let mut next = 0;
                for (ti, taps_t) in frames.iter().enumerate() {
                    // source frame s of the band, transformed ((16, c, n): Bᵀ d B of each
                    // channel's tiles), in ring slot s % kt
                    for s in frames_to_load(&mut next, taps_t, kt) {
                        let vs = &mut ring[(s % kt) * slot..][..16 * c * n];
                        for ci in 0..c {
                            let src = &xd[((bi * c + ci) * t + s) * h * w..][..h * w];
                            // right factors of the band's 2·rows + 2 padded input rows
                            let ers = e.chunks_exact_mut(4 * tx).take(2 * rows + 2);
                            for (r, er) in ers.enumerate() {
                                let ys = (2 * y0 + r).saturating_sub(ph).min(h - 1);
                                im2col_row(&src[ys * w..(ys + 1) * w], p, 0, pw, 1);
                                winograd_input_row(p, er);
                            }
                            for yy in 0..rows {
                                let r = |i: usize| &e[(2 * yy + i) * 4 * tx..][..4 * tx];
                                let v = &mut vs[ci * n + yy * tx..];
                                winograd_input_cols([r(0), r(1), r(2), r(3)], v, c * n);
                            }
                        }
                    }
                    for xi in 0..16 {
                        for (k, (s, set)) in taps_t.iter().enumerate() {
                            let u = &kernels[set.as_slice()][xi * o * c..][..o * c];
                            let v = &ring[(s % kt) * slot + xi * c * n..][..c * n];
                            // SAFETY: u is (o, c), v (c, n) and the destination m[xi] (o, n),
                            // all row-major (m is (16, o, n)).
                            unsafe {
                                gemm_f32(
                                    o,
                                    n,
                                    c,
                                    View {
                                        ptr: m[xi * o * n..].as_mut_ptr(),
                                        rs: n as isize,
                                        cs: 1,
                                    },
                                    k > 0,
                                    View {
                                        ptr: u.as_ptr(),
                                        rs: c as isize,
                                        cs: 1,
                                    },
                                    View {
                                        ptr: v.as_ptr(),
                                        rs: n as isize,
                                        cs: 1,
                                    },
                                    gemm::Parallelism::None,
                                );
                            }
                        }
                    }
                    for (oi, &bv) in bias_v.iter().enumerate() {
                        let mo = &m[oi * n..];
                        let base = ((bi * o + oi) * to + ti) * ho * wo;
                        for yy in 0..rows {
                            winograd_output_row(&mo[yy * tx..], o * n, bv, out0, out1);
                            for (dy, row) in [&*out0, &*out1].into_iter().enumerate() {
                                let y = 2 * (y0 + yy) + dy;
                                if y < ho {
                                    // SAFETY: output row y of frame ti, channel oi: this
                                    // task's band.
                                    let dst = unsafe {
                                        std::slice::from_raw_parts_mut(
                                            ob.ptr().add(base + y * wo),
                                            wo,
                                        )
                                    };
                                    dst.copy_from_slice(&row[..wo]);
                                }
                            }
                        }
                    }
                }
            },
        );
        Ok(())
    })??;
    Tensor::from_vec(out, (b, o, to, ho, wo), x.device())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_tile_is_the_correlation() {
        // a 4×4 patch d and a 3×3 kernel g: Aᵀ[(G g Gᵀ) ⊙ (Bᵀ d B)]A plus the bias is the 2×2
        // valid correlation Σ g[i][j]·d[y + i][x + j] + bias
        let d: Vec<f32> = (0..16).map(|i| ((i * 7) % 11) as f32 - 5.0).collect();
        let g = [0.5, -1.0, 0.25, 2.0, 0.0, -0.75, 1.5, 1.0, -0.5];
        let u = winograd_kernel(&g);
        // one tile (tx = 1): the right factor of each of the 4 rows, then the left factor
        let mut e = [0f32; 16];
        for (r, er) in e.chunks_exact_mut(4).enumerate() {
            winograd_input_row(&d[4 * r..4 * r + 4], er);
        }
        let mut v = [0f32; 16];
        let r = |i: usize| &e[4 * i..4 * i + 4];
        winograd_input_cols([r(0), r(1), r(2), r(3)], &mut v, 1);
        let m: Vec<f32> = (0..16).map(|xi| (u[xi] * v[xi] as f64) as f32).collect();
        let (mut out0, mut out1) = ([0f32; 2], [0f32; 2]);
        winograd_output_row(&m, 1, 0.5, &mut out0, &mut out1);
        for (y, row) in [out0, out1].iter().enumerate() {
            for (x, &got) in row.iter().enumerate() {
                let want = (0..9)
                    .map(|ij| g[ij] * d[4 * (y + ij / 3) + x + ij % 3] as f64)
                    .sum::<f64>()
                    + 0.5;
                // f32 transforms of values below 20: ulps
                assert!(
                    (got as f64 - want).abs() < 1e-4,
                    "({y}, {x}): {got} vs {want}"
                );
            }
        }
    }
}
