//! Attention: softmax(q kᵀ · scale) v per block of query rows of one head, GEMM -> in-place
//! softmax -> GEMM in a reused buffer, so no score tensor is ever built.

use super::math::exp_f32;
use super::matmul::{gemm_f32, View};
use super::{with_f32s, SharedMut};
use candle_core::{Result, Tensor};
use rayon::prelude::*;

const LANES: usize = 16;

simd_dispatch! {
    /// Replaces each row x of `buf` by exp(scale·(x − max x)) and stores 1/Σ in `inv_sums`: the
    /// softmax without its normalization, which is applied to the (much narrower) output rows.
    fn softmax_unnormalized_rows(buf: &mut [f32], cols: usize, scale: f32, inv_sums: &mut [f32]) {
        for (row, inv) in buf.chunks_exact_mut(cols).zip(inv_sums.iter_mut()) {
            let mut m = [f32::NEG_INFINITY; LANES];
            let mut chunks = row.chunks_exact(LANES);
            for c in &mut chunks {
                for i in 0..LANES {
                    m[i] = if c[i] > m[i] { c[i] } else { m[i] };
                }
            }
            let mut max = chunks
                .remainder()
                .iter()
                .fold(f32::NEG_INFINITY, |a, &b| if b > a { b } else { a });
            for v in m {
                max = if v > max { v } else { max };
            }
            let shift = max * scale;
            let mut s = [0f32; LANES];
            let mut chunks = row.chunks_exact_mut(LANES);
            for c in &mut chunks {
                for i in 0..LANES {
                    let e = exp_f32(c[i] * scale - shift);
                    c[i] = e;
                    s[i] += e;
                }
            }
            let mut sum = 0f32;
            for x in chunks.into_remainder() {
                *x = exp_f32(*x * scale - shift);
                sum += *x;
            }
            sum += s.iter().sum::<f32>();
            *inv = 1.0 / sum;
        }
    }
}

/// softmax(q kᵀ · scale) v per head for contiguous f32 CPU tensors in token-major layout:
/// q (b, nq, h, d), k (b, nk, h, d), v (b, nk, h, dv) -> (b, nq, h, dv). Sample i attends to its
/// first `key_counts[i]` keys. Work is split into tasks of `block_rows` query rows of one head;
/// each task computes its full score rows in a reused buffer (GEMM, in-place softmax, GEMM). The
/// output is written in token-major layout directly.
pub(crate) fn attention_bnhd_f32(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    key_counts: &[usize],
    scale: f32,
    block_rows: usize,
) -> Result<Tensor> {
    let (b, nq, h, d) = q.dims4()?;
    let (_, nk, _, _) = k.dims4()?;
    let dv = v.dim(3)?;
    let v = v.contiguous()?;
    // q and k head-major (b, h, n, d): contiguous GEMM operands run ~15% faster than
    // head-strided ones; v is read in its natural layout.
    let q = heads_major_f32(q)?;
    let k = heads_major_f32(k)?;
    let br = block_rows.clamp(1, nq.max(1));
    let mut out = vec![0f32; b * nq * h * dv];
    let dst = SharedMut(out.as_mut_ptr());
    let tasks: Vec<(usize, usize, usize)> = (0..b)
        .flat_map(|bi| (0..h).flat_map(move |hi| (0..nq).step_by(br).map(move |r| (bi, hi, r))))
        .collect();
    with_f32s([&q, &k, &v], |[qd, kd, vd]| {
        tasks.par_iter().for_each_init(
            || (vec![0f32; br * nk], vec![0f32; br]),
            |(scratch, inv), &(bi, hi, r0)| {
                let rows = br.min(nq - r0);
                let nkb = key_counts[bi];
                let sc = &mut scratch[..rows * nkb];
                let qp = qd[((bi * h + hi) * nq + r0) * d..].as_ptr();
                let kp = kd[(bi * h + hi) * nk * d..].as_ptr();
                let vp = vd[(bi * nk * h + hi) * dv..].as_ptr();

                // SAFETY: pointers and strides stay inside q, k, v (rows < nq - r0,
                // keys < nk) and `sc`; the destination rows (bi, r0..r0+rows, hi) belong
                // to this task only.
                unsafe {
                    // (rows, d) x (d, nkb): kᵀ read through strides
                    gemm_f32(
                        rows,
                        nkb,
                        d,
                        View {
                            ptr: sc.as_mut_ptr(),
                            rs: nkb as isize,
                            cs: 1,
                        },
                        false,
                        View {
                            ptr: qp,
                            rs: d as isize,
                            cs: 1,
                        },
                        View {
                            ptr: kp,
                            rs: 1,
                            cs: d as isize,
                        },
                        gemm::Parallelism::None,
                    );
                    softmax_unnormalized_rows(sc, nkb, scale, inv);
                    let op = dst.ptr().add(((bi * nq + r0) * h + hi) * dv);
                    // (rows, nkb) x (nkb, dv)
                    gemm_f32(
                        rows,
                        dv,
                        nkb,
                        View {
                            ptr: op,
                            rs: (h * dv) as isize,
                            cs: 1,
                        },
                        false,
                        View {
                            ptr: sc.as_ptr(),
                            rs: nkb as isize,
                            cs: 1,
                        },
                        View {
                            ptr: vp,
                            rs: (h * dv) as isize,
                            cs: 1,
                        },
                        gemm::Parallelism::None,
                    );
                    for (r, &f) in inv[..rows].iter().enumerate() {
                        let o = std::slice::from_raw_parts_mut(op.add(r * h * dv), dv);
                        o.iter_mut().for_each(|x| *x *= f);
                    }
                }
            },
        )
    })?;
    Tensor::from_vec(out, (b, nq, h, dv), q.device())
}

/// (b, n, h, d) -> (b, h, n, d) contiguous, copying rows in parallel.
fn heads_major_f32(x: &Tensor) -> Result<Tensor> {
    let (b, n, h, d) = x.dims4()?;
    let x = x.contiguous()?;
    let mut out = vec![0f32; b * n * h * d];
    with_f32s([&x], |[xd]| {
        out.par_chunks_mut(n * d).enumerate().for_each(|(bh, o)| {
            let (bi, hi) = (bh / h, bh % h);
            for (t, row) in o.chunks_exact_mut(d).enumerate() {
                let src = ((bi * n + t) * h + hi) * d;
                row.copy_from_slice(&xd[src..src + d]);
            }
        })
    })?;
    Tensor::from_vec(out, (b, h, n, d), x.device())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn softmax_rows_sum_to_one() {
        let mut buf: Vec<f32> = (0..3 * 37)
            .map(|i| ((i * 7919) % 101) as f32 * 0.37 - 15.0)
            .collect();
        let orig = buf.clone();
        let mut inv = [0f32; 3];
        softmax_unnormalized_rows(&mut buf, 37, 0.5, &mut inv);
        for ((row, o), f) in buf.chunks_mut(37).zip(orig.chunks(37)).zip(inv) {
            row.iter_mut().for_each(|x| *x *= f);
            let m = o
                .iter()
                .cloned()
                .fold(f64::NEG_INFINITY, |a, b| a.max(b as f64));
            let e: Vec<f64> = o.iter().map(|&x| ((x as f64 - m) * 0.5).exp()).collect();
            let s: f64 = e.iter().sum();
            for (g, w) in row.iter().zip(e) {
                assert!((*g as f64 - w / s).abs() < 1e-7, "{g} vs {}", w / s);
            }
        }
    }
}
