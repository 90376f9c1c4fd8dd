//! Fused f32 CPU kernels for the hot spots candle runs as scalar or single-threaded ops:
//! attention (GEMM -> in-place softmax -> GEMM per block of query rows, no score tensors) and
//! GELU-tanh. The loops are written so LLVM vectorizes them; each kernel is compiled for
//! AVX-512 and AVX2+FMA and picked at run time.

use candle_core::{
    backend::BackendStorage, bail, CpuStorage, CustomOp1, DType, Layout, Result, Shape, Storage,
    Tensor,
};
use rayon::prelude::*;
use std::collections::HashMap;

/// Generates `$name(args)` that runs `$body` compiled for the best available x86 SIMD level.
macro_rules! simd_dispatch {
    ($(#[$meta:meta])* fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $body:block) => {
        $(#[$meta])*
        fn $name($($arg: $ty),*) {
            #[inline(always)]
            fn body($($arg: $ty),*) $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx2,fma")]
                unsafe fn avx512($($arg: $ty),*) { body($($arg),*) }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2($($arg: $ty),*) { body($($arg),*) }
                if std::is_x86_feature_detected!("avx512f") {
                    // SAFETY: the CPU supports the features the function is compiled for.
                    return unsafe { avx512($($arg),*) };
                }
                if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                    // SAFETY: as above.
                    return unsafe { avx2($($arg),*) };
                }
            }
            body($($arg),*)
        }
    };
}

/// exp(x) for f32, Cephes `expf` (range reduction by ln 2, degree-5 minimax polynomial): within
/// 2 ulp over the f32 range; inputs below -87.3 give ~1e-38 instead of 0 (irrelevant where used:
/// softmax terms and sigmoid denominators).
#[inline(always)]
fn exp_f32(x: f32) -> f32 {
    let x = x.clamp(-87.336_55, 88.376_26);
    let n = (x * std::f32::consts::LOG2_E + 0.5).floor();
    let r = x - n * 0.693_359_4 - n * -2.121_944_4e-4;
    let p = ((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r
        + 1.666_666_5e-1)
        * r
        + 0.5;
    let y = p * (r * r) + r + 1.0;
    // SAFETY: n is an integer in [-126, 127] after the clamp, so the conversion is exact (unlike
    // `as`, it vectorizes: no saturation checks).
    let e: i32 = unsafe { (n + 127.0).to_int_unchecked() };
    y * f32::from_bits((e as u32) << 23)
}

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

/// Runs `f` on the data of contiguous f32 CPU tensors (read locks held for the call).
fn with_f32s<const N: usize, R>(ts: [&Tensor; N], f: impl FnOnce([&[f32]; N]) -> R) -> Result<R> {
    let held: Vec<_> = ts.iter().map(|t| t.storage_and_layout()).collect();
    let mut slices: Vec<&[f32]> = Vec::with_capacity(N);
    for (t, (guard, layout)) in ts.iter().zip(&held) {
        let Some((start, end)) = layout.contiguous_offsets() else {
            bail!("cpu kernel: tensor {:?} is not contiguous", t.shape())
        };
        match &**guard {
            Storage::Cpu(CpuStorage::F32(v)) => slices.push(&v[start..end]),
            _ => bail!(
                "cpu kernel: expected an f32 CPU tensor, got {:?} on {:?}",
                t.dtype(),
                t.device()
            ),
        }
    }
    match <[&[f32]; N]>::try_from(slices) {
        Ok(arrays) => Ok(f(arrays)),
        Err(_) => bail!("cpu kernel: one slice per tensor"),
    }
}

/// A strided f32 matrix for [`gemm_f32`]: element (i, j) at `ptr + i·rs + j·cs`.
#[derive(Clone, Copy)]
struct View<P> {
    ptr: P,
    rs: isize,
    cs: isize,
}

/// dst (m × n) = lhs (m × k) · rhs (k × n), added onto dst when `accumulate`.
///
/// # Safety
/// Every view must address valid memory for its shape and strides, and dst must not alias lhs
/// or rhs.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_f32(
    m: usize,
    n: usize,
    k: usize,
    dst: View<*mut f32>,
    accumulate: bool,
    lhs: View<*const f32>,
    rhs: View<*const f32>,
    par: gemm::Parallelism,
) {
    let alpha = if accumulate { 1.0 } else { 0.0 };
    gemm::gemm(
        m, n, k, dst.ptr, dst.cs, dst.rs, accumulate, lhs.ptr, lhs.cs, lhs.rs, rhs.ptr, rhs.cs,
        rhs.rs, alpha, 1.0, false, false, false, par,
    );
}

/// A raw pointer that tasks writing disjoint regions of one buffer may share.
#[derive(Clone, Copy)]
struct SharedMut(*mut f32);
// SAFETY: every task writes a region no other task touches (see the callers).
unsafe impl Send for SharedMut {}
unsafe impl Sync for SharedMut {}

impl SharedMut {
    /// Through a method, so closures capture the whole (Send) wrapper, not the raw field.
    fn ptr(self) -> *mut f32 {
        self.0
    }
}

/// softmax(q kᵀ · scale) v per head for contiguous f32 CPU tensors in token-major layout:
/// q (b, nq, h, d), k (b, nk, h, d), v (b, nk, h, dv) -> (b, nq, h, dv). Sample i attends to its
/// first `key_counts[i]` keys. Work is split into tasks of `block_rows` query rows of one head;
/// each task computes its full score rows in a reused buffer (GEMM, in-place softmax, GEMM). The
/// output is written in token-major layout directly.
pub fn attention_bnhd_f32(
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

/// RMSNorm over the head dim then interleaved-pair RoPE on the first `cos.dim(0)` tokens, for f32
/// CPU x (b, n, h, d), weight (d) and tables (n_rope, d/2), in one pass: the reference's
/// `norm_q` / `norm_k` followed by `apply_rotary_emb`.
pub fn rms_norm_rope_f32(
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

/// Σᵢ xᵢ · w[:, colsᵢ]ᵀ + bias for f32 CPU tensors: each xᵢ (m, kᵢ) multiplies the columns of
/// w (n, k) starting at its offset (a linear layer over a concatenated input, without building
/// the concatenation). The bias is written first and every GEMM accumulates onto the output:
/// no separate bias pass or allocation.
pub fn linear_parts_f32(
    parts: &[(&Tensor, usize)],
    w: &Tensor,
    bias: Option<&Tensor>,
) -> Result<Tensor> {
    let (n, k_total) = w.dims2()?;
    let Some((first, _)) = parts.first() else {
        bail!("linear: no input")
    };
    let m = first.dim(0)?;
    for (x, off) in parts {
        let (mx, kx) = x.dims2()?;
        if mx != m || off + kx > k_total {
            bail!(
                "linear: input part {:?} at column {off} does not fit weight {:?}",
                x.shape(),
                w.shape()
            )
        }
    }
    let w = w.contiguous()?;
    let mut out = vec![0f32; m * n];
    if let Some(bias) = bias {
        with_f32s([bias], |[bd]| {
            out.par_chunks_mut(n)
                .for_each(|row| row.copy_from_slice(bd))
        })?;
    }
    let threads = rayon::current_num_threads();
    let par = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    for (i, (x, off)) in parts.iter().enumerate() {
        let x = x.contiguous()?;
        let kx = x.dim(1)?;
        let accumulate = bias.is_some() || i > 0;
        with_f32s([&x, &w], |[xd, wd]| {
            // SAFETY: x is (m, kx); the weight columns off..off+kx of the (n, k_total) matrix
            // are read with row stride k_total; out is (m, n).
            unsafe {
                gemm_f32(
                    m,
                    n,
                    kx,
                    View {
                        ptr: out.as_mut_ptr(),
                        rs: n as isize,
                        cs: 1,
                    },
                    accumulate,
                    View {
                        ptr: xd.as_ptr(),
                        rs: kx as isize,
                        cs: 1,
                    },
                    View {
                        ptr: wd[*off..].as_ptr(),
                        rs: 1,
                        cs: k_total as isize,
                    },
                    par,
                );
            }
        })?;
    }
    Tensor::from_vec(out, (m, n), w.device())
}

/// x (m, k) · wᵀ + bias for f32 CPU tensors, w (n, k).
pub fn linear_f32(x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    linear_parts_f32(&[(x, 0)], w, bias)
}

/// LayerNorm (no affine) then modulation, for f32 CPU x (b, n, c) and shift, scale (b, c):
/// ((x − mean) · rstd) · (1 + scale) + shift in one pass per row, in the reference's op order.
pub fn layer_norm_modulate_f32(
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

/// x + y · gate for f32 CPU x, y (b, n, c) and gate (b, c), in one pass.
pub fn add_gated_f32(x: &Tensor, y: &Tensor, gate: &Tensor) -> Result<Tensor> {
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
pub fn gelu_tanh(x: &Tensor) -> Result<Tensor> {
    if x.device().is_cpu() && x.dtype() == DType::F32 {
        x.contiguous()?.apply_op1_no_bwd(&GeluTanh)
    } else {
        x.gelu()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn exp_is_accurate() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x < 88.3 {
            let got = exp_f32(x) as f64;
            let want = (x as f64).exp();
            worst = worst.max(((got - want) / want).abs());
            x += 0.001_37;
        }
        // f32 has 6e-8 relative resolution: 2.5e-7 is about 2 ulp
        assert!(worst < 2.5e-7, "worst relative error {worst:e}");
        assert_eq!(exp_f32(0.0), 1.0);
    }

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

    /// Taps that read the same source sample merge: the causal padding's copies of the first
    /// frame, and the repeated samples of a nearest upsampling (the values are checked against
    /// the naive convolution in `conv3d`'s tests; this pins how much work is saved).
    #[test]
    fn merged_taps_read_each_source_once() {
        let taps = |v: &[(usize, &[usize])]| -> Taps {
            v.iter().map(|(s, is)| (*s, is.to_vec())).collect()
        };
        // causal 3-tap convolution of 4 frames
        let want: Vec<Taps> = vec![
            taps(&[(0, &[0, 1, 2])]),
            taps(&[(0, &[0, 1]), (1, &[2])]),
            taps(&[(0, &[0]), (1, &[1]), (2, &[2])]),
            taps(&[(1, &[0]), (2, &[1]), (3, &[2])]),
        ];
        assert_eq!(frame_taps(4, 3, 2, 1), want);
        // 3 frames upsampled by 2 in time (f0 f1 f1 f2 f2), then the causal convolution
        let want: Vec<Taps> = vec![
            taps(&[(0, &[0, 1, 2])]),
            taps(&[(0, &[0, 1]), (1, &[2])]),
            taps(&[(0, &[0]), (1, &[1, 2])]),
            taps(&[(1, &[0, 1]), (2, &[2])]),
            taps(&[(1, &[0]), (2, &[1, 2])]),
        ];
        assert_eq!(frame_taps(3, 3, 2, 2), want);
        // a row of 5 upsampled by 2, padded by 1, 3 taps: 2 taps per output in each phase
        let a = Axis::new(5, 3, 1, 2);
        assert_eq!((a.lo, a.hi, a.total, &a.outs[..]), (1, 1, 10, &[5, 5][..]));
        let want = vec![
            taps(&[(0, &[0]), (1, &[1, 2])]),
            taps(&[(1, &[0, 1]), (2, &[2])]),
        ];
        assert_eq!(a.phases, want);
        let p = Axis::new(5, 3, 1, 1);
        assert_eq!((p.lo, p.hi, p.total), (1, 1, 5));
        assert_eq!(p.phases, vec![taps(&[(0, &[0]), (1, &[1]), (2, &[2])])]);
    }

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

/// Output geometry, padding and input upsampling of [`conv3d_f32`].
#[derive(Debug, Clone, Copy)]
pub struct Conv3dGeometry {
    /// (t, h, w) strides.
    pub stride: (usize, usize, usize),
    /// Replicate padding: frames before, rows above and below, columns left and right.
    pub pad: (usize, usize, usize),
    /// (t, h, w) nearest-upsampling factors applied to the input before padding, the first frame
    /// upsampled spatially only (HunyuanVideo's causal upsampler); (1, 1, 1) for none. Only with
    /// unit strides.
    pub upsample: (usize, usize, usize),
}

/// Budget of the im2col buffer (K rows × output positions), in f32 elements: 16 Mi = 64 MiB.
const IM2COL_BUDGET: usize = 16 << 20;

/// 3D convolution of f32 CPU x (b, c, t, h, w) with w (o, c, kt, kh, kw) and bias, with
/// replicate padding (`pad`: frames in front only, rows and columns on both sides) applied
/// through clamped indices. Unit strides run [`conv3d_f32_direct`] (which also does the
/// upsampling); others im2col over chunks of output rows (bounded buffer), then one GEMM per
/// chunk written straight into the (b, o, t', h', w') output with the bias preloaded.
pub fn conv3d_f32(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    geo: Conv3dGeometry,
) -> Result<Tensor> {
    let (b, c, t, h, w) = x.dims5()?;
    let (o, cw, kt, kh, kw) = weight.dims5()?;
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
            return conv3d_f32_winograd(x, weight, bias, geo.pad);
        }
        return conv3d_f32_direct(x, weight, bias, geo.pad, geo.upsample);
    }
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

/// Register tile of [`conv_tile`]: output channels × vectors of [`CONV_VL`] positions. 6 × 2
/// keeps 12 vector accumulators in registers (of 16 with AVX2) and costs 2 loads and 6
/// broadcasts per 12 FMAs, so the loop is bound by FMA throughput. (4 × 3 needs one more register
/// than LLVM leaves free and spills.)
const CONV_TO: usize = 6;
const CONV_TV: usize = 2;
const CONV_VL: usize = 8;
/// Output positions per register tile.
const CONV_TN: usize = CONV_TV * CONV_VL;
/// Input channels per pass over a task's tiles: the packed weights of one channel group
/// (CONV_CB · taps · CONV_TO floats, 13.5 KiB for 3×3×3) stay in L1.
const CONV_CB: usize = 16;
/// Register tiles per parallel task: the task's input window and accumulators stay in L2.
const CONV_TASK_TILES: usize = 8;

simd_dispatch! {
    /// acc[o][p] += Σ_{ci < cb, tap} w[(ci·taps + tap)·CONV_TO + o] · x[ci·cs + offs[tap] + p]
    /// for o < CONV_TO and p < CONV_TN; acc row o starts at o·acc_stride.
    fn conv_tile(
        acc: &mut [f32],
        acc_stride: usize,
        w: &[f32],
        x: &[f32],
        cs: usize,
        cb: usize,
        offs: &[usize],
    ) {
        let mut r = [[[0f32; CONV_VL]; CONV_TV]; CONV_TO];
        for (o, ro) in r.iter_mut().enumerate() {
            let row = &acc[o * acc_stride..o * acc_stride + CONV_TN];
            for (v, rv) in ro.iter_mut().enumerate() {
                rv.copy_from_slice(&row[v * CONV_VL..(v + 1) * CONV_VL]);
            }
        }
        let taps = offs.len();
        let reach = offs.iter().max().map_or(0, |m| m + CONV_TN);
        assert!(
            cb == 0 || ((cb - 1) * cs + reach <= x.len() && cb * taps * CONV_TO <= w.len()),
            "conv_tile: input or weights shorter than the tile reads"
        );
        for ci in 0..cb {
            // SAFETY: ci·cs + off + CONV_TN <= x.len() for every tap (asserted above).
            let xc = unsafe { x.as_ptr().add(ci * cs) };
            let wc = &w[ci * taps * CONV_TO..(ci + 1) * taps * CONV_TO];
            for (&off, wt) in offs.iter().zip(wc.chunks_exact(CONV_TO)) {
                // SAFETY: as above.
                let xs = unsafe { &*(xc.add(off) as *const [f32; CONV_TN]) };
                for (ro, &wo) in r.iter_mut().zip(wt) {
                    for (rv, xv) in ro.iter_mut().zip(xs.chunks_exact(CONV_VL)) {
                        for (a, &xe) in rv.iter_mut().zip(xv) {
                            *a = wo.mul_add(xe, *a);
                        }
                    }
                }
            }
        }
        for (o, ro) in r.iter().enumerate() {
            let row = &mut acc[o * acc_stride..o * acc_stride + CONV_TN];
            for (v, rv) in ro.iter().enumerate() {
                row[v * CONV_VL..(v + 1) * CONV_VL].copy_from_slice(rv);
            }
        }
    }
}

/// Merged taps: (source index, the kernel taps that read it, whose weights are summed).
type Taps = Vec<(usize, Vec<usize>)>;

/// Taps of one axis of [`conv3d_f32_direct`] for each output phase: output o·factor + phase reads,
/// for every (offset, kernel indices) of its phase, the source row (or column) o + offset of the
/// source replicate-padded by `lo` in front and `hi` behind, with those kernel weights summed.
///
/// This is the convolution (k taps, replicate padding `pad` on both sides) of the source
/// nearest-upsampled by `factor`: tap j of output Y reads upsampled sample clamp(Y + j − pad),
/// which is source sample clamp(floor((Y + j − pad) / factor)) (clamping commutes with the
/// division), so for Y = o·factor + r it is source o + floor((r + j − pad) / factor): taps that
/// land on the same source sample merge into one.
#[derive(Debug)]
struct Axis {
    lo: usize,
    hi: usize,
    factor: usize,
    /// output length
    total: usize,
    /// outputs per phase
    outs: Vec<usize>,
    phases: Vec<Taps>,
}

impl Axis {
    /// Source length `len` (≥ 1), upsampled by `factor` (≥ 1), padded by `pad`, `k` taps; the
    /// caller checks that factor·len + 2·pad ≥ k.
    fn new(len: usize, k: usize, pad: usize, factor: usize) -> Self {
        let total = factor * len + 2 * pad + 1 - k;
        let d = |r: usize, j: usize| {
            (r as isize + j as isize - pad as isize).div_euclid(factor as isize)
        };
        let lo = (0..factor).map(|r| -d(r, 0)).max().unwrap_or(0).max(0) as usize;
        let outs: Vec<usize> = (0..factor)
            .map(|r| (total + factor - 1 - r) / factor)
            .collect();
        let phases: Vec<Taps> = (0..factor)
            .map(|r| merge_taps((0..k).map(|j| (d(r, j) + lo as isize) as usize)))
            .collect();
        // output o of a phase reads padded index o + offset <= len + lo + hi − 1
        let hi = outs
            .iter()
            .zip(&phases)
            .filter(|(&n, _)| n > 0)
            .map(|(&n, taps)| n + taps.last().map_or(0, |t| t.0))
            .max()
            .unwrap_or(0)
            .saturating_sub(len + lo);
        Self {
            lo,
            hi,
            factor,
            total,
            outs,
            phases,
        }
    }
}

/// Groups consecutive taps that read the same source index: (index, tap numbers).
fn merge_taps(sources: impl Iterator<Item = usize>) -> Taps {
    let mut taps = Taps::new();
    for (j, s) in sources.enumerate() {
        match taps.last_mut() {
            Some((last, js)) if *last == s => js.push(j),
            _ => taps.push((s, vec![j])),
        }
    }
    taps
}

/// The bias as o values (zeros without one).
fn bias_values(bias: Option<&Tensor>, o: usize) -> Result<Vec<f32>> {
    match bias {
        Some(b) => b.to_vec1::<f32>(),
        None => Ok(vec![0.0; o]),
    }
}

/// The source frames to load into a ring of `slots` frame slots (frame s in slot s % slots)
/// before computing an output frame with time taps `taps` ([`frame_taps`]: increasing sources,
/// at most `slots` of them), when the frames before `*next` are loaded; advances `*next`.
fn frames_to_load(next: &mut usize, taps: &Taps, slots: usize) -> std::ops::RangeInclusive<usize> {
    let last = taps.last().map_or(0, |s| s.0);
    let first = (*next).max((last + 1).saturating_sub(slots));
    *next = (*next).max(last + 1);
    first..=last
}

/// Source frames of each output frame of [`conv3d_f32_direct`]: the t source frames are
/// nearest-upsampled in time by `factor` with the first frame kept single (HunyuanVideo's causal
/// upsampling: 1 + factor·(t − 1) frames), padded in front by `pad` copies of the first, and
/// convolved with `kt` taps. Tap i of output frame f reads upsampled frame u = max(f + i − pad, 0),
/// source frame 0 for u = 0 and (u − 1) / factor + 1 after; taps reading the same frame merge
/// (the causal padding makes the first frames read frame 0 up to kt times).
fn frame_taps(t: usize, kt: usize, pad: usize, factor: usize) -> Vec<Taps> {
    let frames = 1 + factor * (t - 1) + pad + 1 - kt;
    (0..frames)
        .map(|f| {
            merge_taps((0..kt).map(|i| match (f + i).saturating_sub(pad) {
                0 => 0,
                u => ((u - 1) / factor + 1).min(t - 1),
            }))
        })
        .collect()
}

/// Packs the (o, c, kt, kh, kw) weights for one output frame and phase into (groups, c, taps,
/// [`CONV_TO`]) with zero rows past o: tap (a, b, d) of the merged lists gets the sum of the
/// kernel weights it merges.
fn pack_conv_weights(
    wd: &[f32],
    (o, c, kt, kh, kw): (usize, usize, usize, usize, usize),
    t_sets: &[Vec<usize>],
    y_taps: &[(usize, Vec<usize>)],
    x_taps: &[(usize, Vec<usize>)],
) -> Vec<f32> {
    let taps = t_sets.len() * y_taps.len() * x_taps.len();
    let mut wpk = vec![0f32; o.div_ceil(CONV_TO) * c * taps * CONV_TO];
    for oi in 0..o {
        let (g, r) = (oi / CONV_TO, oi % CONV_TO);
        for ci in 0..c {
            let wk = &wd[(oi * c + ci) * kt * kh * kw..][..kt * kh * kw];
            let mut tap = 0;
            for is in t_sets {
                for (_, js) in y_taps {
                    for (_, ks) in x_taps {
                        let mut s = 0f32;
                        for &i in is {
                            for &j in js {
                                for &k in ks {
                                    s += wk[(i * kh + j) * kw + k];
                                }
                            }
                        }
                        wpk[((g * c + ci) * taps + tap) * CONV_TO + r] = s;
                        tap += 1;
                    }
                }
            }
        }
    }
    wpk
}

/// Unit-stride 3D convolution of x replicate-padded by `pad` (frames in front, rows and columns
/// on both sides) and nearest-upsampled first by `up` (t, h, w) factors (the first frame
/// spatially only; (1, 1, 1) for a plain convolution), as a direct convolution that builds
/// neither the upsampled nor the padded input and merges the taps that read the same source
/// sample ([`frame_taps`], [`Axis`]): an upsampling by 2 costs 8 instead of 27 taps per output,
/// and the causal padding's repeated first frame is read once.
///
/// Source frames are replicate-padded spatially into a ring of kt frame slots (c channels of
/// hp·wp values, plus [`CONV_TN`] of slack so the last register tile may read past the frame).
/// Per output frame and spatial phase, positions n run over rows laid out at the padded width
/// wp, so a tap (frame, row offset, column offset) reads the frame's slot at n + row·wp + col.
/// Positions are split into tasks of [`CONV_TASK_TILES`] register tiles, all phases' tasks of a
/// frame run in parallel; a task accumulates all output channels of its positions over channel
/// blocks of [`CONV_CB`] with [`conv_tile`] (weights packed per group of [`CONV_TO`] output
/// channels), then copies the valid columns out to their upsampled positions.
fn conv3d_f32_direct(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    pad: (usize, usize, usize),
    up: (usize, usize, usize),
) -> Result<Tensor> {
    let (b, c, t, h, w) = x.dims5()?;
    let (o, _, kt, kh, kw) = weight.dims5()?;
    let frames = frame_taps(t, kt, pad.0, up.0);
    let (ay, ax) = (Axis::new(h, kh, pad.1, up.1), Axis::new(w, kw, pad.2, up.2));
    let (hp, wp) = (h + ay.lo + ay.hi, w + ax.lo + ax.hi);
    let (to, ho, wo) = (frames.len(), ay.total, ax.total);
    let x = x.contiguous()?;
    let weight = weight.contiguous()?;
    let plane = to * ho * wo;
    let mut out = vec![0f32; b * o * plane];
    let groups = o.div_ceil(CONV_TO);
    let cs = hp * wp + CONV_TN;
    let slot = c * cs;
    // an output frame reads at most kt consecutive source frames: source s lives in slot s % kt
    let mut ring = vec![0f32; kt * slot];
    let task_n = CONV_TASK_TILES * CONV_TN;
    // (spatial phase (ry, rx), valid positions at width wp); then (phase, first position) tasks
    let phases: Vec<((usize, usize), usize)> = (0..up.1)
        .flat_map(|ry| (0..up.2).map(move |rx| (ry, rx)))
        .filter(|&(ry, rx)| ay.outs[ry] > 0 && ax.outs[rx] > 0)
        .map(|(ry, rx)| ((ry, rx), (ay.outs[ry] - 1) * wp + ax.outs[rx]))
        .collect();
    let tasks: Vec<(usize, usize)> = phases
        .iter()
        .enumerate()
        .flat_map(|(p, &(_, n_valid))| (0..n_valid).step_by(task_n).map(move |n0| (p, n0)))
        .collect();
    with_f32s([&x, &weight], |[xd, wd]| -> Result<()> {
        let bias_v = &bias_values(bias, o)?;
        // per kernel time taps of each source frame: the packed weights of each spatial phase
        let mut packed: HashMap<Vec<Vec<usize>>, Vec<Vec<f32>>> = HashMap::new();
        for bi in 0..b {
            let xb = &xd[bi * c * t * h * w..(bi + 1) * c * t * h * w];
            // source frame s, padded by (lo, hi) rows and columns, into its ring slot
            let fill = |ring: &mut [f32], s: usize| {
                let dst = &mut ring[(s % kt) * slot..(s % kt + 1) * slot];
                dst.par_chunks_mut(cs).enumerate().for_each(|(ci, frame)| {
                    let src = &xb[(ci * t + s) * h * w..(ci * t + s + 1) * h * w];
                    for (yy, row) in frame[..hp * wp].chunks_exact_mut(wp).enumerate() {
                        let ys = yy.saturating_sub(ay.lo).min(h - 1);
                        im2col_row(&src[ys * w..(ys + 1) * w], row, 0, ax.lo, 1);
                    }
                });
            };
            let mut next = 0;
            let ob = SharedMut(out[bi * o * plane..(bi + 1) * o * plane].as_mut_ptr());
            for (ti, taps_t) in frames.iter().enumerate() {
                for s in frames_to_load(&mut next, taps_t, kt) {
                    fill(&mut ring, s);
                }
                let t_sets: Vec<Vec<usize>> = taps_t.iter().map(|(_, is)| is.clone()).collect();
                let weights = packed.entry(t_sets).or_insert_with_key(|t_sets| {
                    phases
                        .iter()
                        .map(|&((ry, rx), _)| {
                            let (y_taps, x_taps) = (&ay.phases[ry], &ax.phases[rx]);
                            pack_conv_weights(wd, (o, c, kt, kh, kw), t_sets, y_taps, x_taps)
                        })
                        .collect()
                });
                // per phase: packed weights and the tap offsets in the same order
                let plans: Vec<(&[f32], Vec<usize>)> = phases
                    .iter()
                    .zip(weights.iter())
                    .map(|(&((ry, rx), _), wpk)| {
                        let (y_taps, x_taps) = (&ay.phases[ry], &ax.phases[rx]);
                        let offs = taps_t
                            .iter()
                            .flat_map(|(s, _)| {
                                y_taps.iter().flat_map(move |(oy, _)| {
                                    x_taps
                                        .iter()
                                        .map(move |(ox, _)| (s % kt) * slot + oy * wp + ox)
                                })
                            })
                            .collect();
                        (wpk.as_slice(), offs)
                    })
                    .collect();
                let ring = &ring;
                tasks.par_iter().for_each_init(
                    || vec![0f32; groups * CONV_TO * task_n],
                    |acc, &(p, n0)| {
                        let ((ry, rx), n_valid) = phases[p];
                        let (wpk, offs) = (plans[p].0, &plans[p].1);
                        let taps = offs.len();
                        let tiles = (n_valid - n0).div_ceil(CONV_TN).min(CONV_TASK_TILES);
                        for (row, bv) in acc.chunks_exact_mut(task_n).zip(bias_v) {
                            row.fill(*bv);
                        }
                        for cb0 in (0..c).step_by(CONV_CB) {
                            let cb = CONV_CB.min(c - cb0);
                            for tile in 0..tiles {
                                for g in 0..groups {
                                    let wg = &wpk[(g * c + cb0) * taps * CONV_TO..]
                                        [..cb * taps * CONV_TO];
                                    let ag = &mut acc[g * CONV_TO * task_n..][..CONV_TO * task_n];
                                    let n = n0 + tile * CONV_TN;
                                    conv_tile(
                                        &mut ag[tile * CONV_TN..],
                                        task_n,
                                        wg,
                                        &ring[cb0 * cs + n..],
                                        cs,
                                        cb,
                                        offs,
                                    );
                                }
                            }
                        }
                        // valid positions n0..n1 of rows y at width wp -> (y, x < outs)
                        let n1 = (n0 + task_n).min(n_valid);
                        let (fy, fx) = (ay.factor, ax.factor);
                        let wv = ax.outs[rx];
                        for (oi, row) in acc.chunks_exact(task_n).take(o).enumerate() {
                            let mut n = n0;
                            while n < n1 {
                                let (y, xx) = (n / wp, n % wp);
                                let end = (n1 - n).min(wp - xx);
                                let len = end.min(wv.saturating_sub(xx));
                                let src = &row[n - n0..n - n0 + len];
                                let at = oi * plane + (ti * ho + y * fy + ry) * wo + xx * fx + rx;
                                // SAFETY: output row y·fy + ry, columns (xx..xx + len)·fx + rx
                                // of channel oi of frame ti: tasks cover disjoint positions and
                                // phases disjoint rows or columns.
                                unsafe {
                                    if fx == 1 {
                                        std::slice::from_raw_parts_mut(ob.ptr().add(at), len)
                                            .copy_from_slice(src);
                                    } else {
                                        for (i, &v) in src.iter().enumerate() {
                                            *ob.ptr().add(at + i * fx) = v;
                                        }
                                    }
                                }
                                n += end;
                            }
                        }
                    },
                );
            }
        }
        Ok(())
    })??;
    Tensor::from_vec(out, (b, o, to, ho, wo), x.device())
}

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
fn conv3d_f32_winograd(
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

/// One im2col row: dst[x] = src[clamp(x·stride + k − pad, 0, w − 1)].
#[inline]
fn im2col_row(src: &[f32], dst: &mut [f32], k: usize, pad: usize, stride: usize) {
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

/// GroupNorm over (b, c, ...) f32 CPU x with per-channel weight and bias, optionally followed
/// by SiLU, in two passes: statistics per (sample, group) — a contiguous block of c/groups
/// channels — then normalize, scale, shift (and SiLU) in one write.
pub fn group_norm_f32(
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
