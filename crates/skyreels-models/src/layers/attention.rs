//! Exact scaled-dot-product attention with bounded working memory.
//!
//! The full score matrix at SkyReels size (24 heads x 51,256^2) is 126 GB, so queries are processed
//! in blocks: each block computes its complete score rows (softmax over every key), which keeps the
//! result exact while the scores held at once are limited by a budget. Masking is done by *key
//! selection*: the reference only masks keys, and a masked key contributes exactly zero weight, so
//! callers pass how many leading keys each sample sees instead of a dense mask.

use super::cpu::attention_bnhd_f32;
use candle_core::{bail, DType, Device, IndexOp, Result, Tensor};

/// Score elements held at once by the generic path (batch x heads x query rows x keys) on the
/// CPU: 16 Mi elements = 64 MiB in f32.
const CPU_SCORE_BUDGET: usize = 16 << 20;

/// The same on a GPU, where each chunk is a few kernel launches: 256 Mi elements (512 MiB of
/// bf16 scores, about 1.5 GiB transient with the softmax) gives ~220-row chunks at SkyReels' full
/// size (24 heads x 51,256 keys) instead of 13, small next to 26 GB of weights. Only used where
/// flash attention does not apply (f32, or head dims other than 128).
const GPU_SCORE_BUDGET: usize = 256 << 20;

/// The default score budget for attention on `device`.
pub fn default_score_budget(device: &Device) -> usize {
    if device.is_cpu() {
        CPU_SCORE_BUDGET
    } else {
        GPU_SCORE_BUDGET
    }
}

/// Query rows per task of the fused f32 CPU kernel; its scores (rows × keys) stay in a reused
/// per-thread buffer of a few MB. Large enough that re-packing K and V per block is cheap.
const CPU_BLOCK_ROWS: usize = 512;

/// softmax(q kᵀ / √d) v per head in token-major layout: q (b, nq, h, d), k (b, nk, h, d),
/// v (b, nk, h, dv) -> (b, nq, h, dv). Sample i attends to its first `key_counts[i]` keys (all keys
/// when `None`). `budget` bounds the score elements held at once; it does not apply to the fused
/// kernels, which hold no score matrix (the f32 CPU kernel, and with the `cuda` feature
/// FlashAttention-2 for bf16 with head dim 128, the transformer's case on GPUs).
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    key_counts: Option<&[usize]>,
    budget: usize,
) -> Result<Tensor> {
    let (b, _, h, d) = q.dims4()?;
    let (bk, nk, hk, dk) = k.dims4()?;
    let (bv, nv, hv, _) = v.dims4()?;
    if (b, h, d) != (bk, hk, dk) || (b, nk, h) != (bv, nv, hv) {
        bail!(
            "attention: incompatible q {:?}, k {:?}, v {:?}",
            q.shape(),
            k.shape(),
            v.shape()
        )
    }
    let counts: Vec<usize> = match key_counts {
        Some(c) => c.to_vec(),
        None => vec![nk; b],
    };
    if counts.len() != b || counts.iter().any(|&c| c == 0 || c > nk) {
        bail!("attention: key counts {counts:?} invalid for {b} samples of {nk} keys")
    }
    let scale = 1.0 / (d as f64).sqrt();
    #[cfg(feature = "cuda")]
    if skyreels_flash_attn::supports(q, k, v) {
        return skyreels_flash_attn::flash_attn(q, k, v, &counts, scale as f32);
    }
    if q.device().is_cpu() && q.dtype() == DType::F32 {
        let rows = (budget / nk).clamp(1, CPU_BLOCK_ROWS);
        return attention_bnhd_f32(q, k, v, &counts, scale as f32, rows);
    }
    // (b, n, h, d) -> (b, h, n, d) for batched matmuls
    let heads_first = |t: &Tensor| -> Result<Tensor> { t.transpose(1, 2)?.contiguous() };
    let (qh, kh, vh) = (heads_first(q)?, heads_first(k)?, heads_first(v)?);
    let out = if counts.iter().all(|&c| c == nk) {
        attention_chunked(&qh, &kh, &vh, scale, budget)?
    } else {
        let mut outs = Vec::with_capacity(b);
        for (i, &c) in counts.iter().enumerate() {
            let (ki, vi) = (
                kh.i(i..i + 1)?.narrow(2, 0, c)?,
                vh.i(i..i + 1)?.narrow(2, 0, c)?,
            );
            outs.push(attention_chunked(
                &qh.i(i..i + 1)?,
                &ki,
                &vi,
                scale,
                budget,
            )?);
        }
        Tensor::cat(&outs, 0)?
    };
    // (b, h, nq, dv) -> (b, nq, h, dv)
    out.transpose(1, 2)?.contiguous()
}

/// Generic path: softmax(q kᵀ · scale) v for q (b, h, nq, d), k (b, h, nk, d), v (b, h, nk, dv),
/// in query chunks holding at most `budget` score elements (at least one row).
pub fn attention_chunked(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    budget: usize,
) -> Result<Tensor> {
    let (b, h, nq, _) = q.dims4()?;
    let nk = k.dim(2)?;
    let kt = k.t()?;
    let chunk = (budget / (b * h * nk).max(1)).clamp(1, nq.max(1));
    let mut outs = Vec::with_capacity(nq.div_ceil(chunk));
    let mut start = 0;
    while start < nq {
        let len = chunk.min(nq - start);
        let qc = q.narrow(2, start, len)?;
        // (b, h, len, d) x (b, h, d, nk) -> (b, h, len, nk)
        let scores = (qc.matmul(&kt)? * scale)?;
        let probs = candle_nn::ops::softmax_last_dim(&scores)?;
        outs.push(probs.matmul(v)?);
        start += len;
    }
    if outs.len() == 1 {
        Ok(outs.remove(0))
    } else {
        Tensor::cat(&outs, 2)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, D};

    /// Dense f64 reference on (b, n, h, d) tensors, sample i seeing `counts[i]` keys.
    fn dense(q: &Tensor, k: &Tensor, v: &Tensor, counts: &[usize]) -> Tensor {
        let d = q.dim(3).unwrap() as f64;
        let f = |t: &Tensor| t.to_dtype(DType::F64).unwrap().transpose(1, 2).unwrap();
        let outs: Vec<Tensor> = counts
            .iter()
            .enumerate()
            .map(|(i, &c)| {
                let qi = f(&q.i(i..i + 1).unwrap());
                let ki = f(&k.i(i..i + 1).unwrap().narrow(1, 0, c).unwrap());
                let vi = f(&v.i(i..i + 1).unwrap().narrow(1, 0, c).unwrap());
                let s = (qi.matmul(&ki.t().unwrap()).unwrap() / d.sqrt()).unwrap();
                let m = s.max_keepdim(D::Minus1).unwrap();
                let e = s.broadcast_sub(&m).unwrap().exp().unwrap();
                let p = e.broadcast_div(&e.sum_keepdim(D::Minus1).unwrap()).unwrap();
                p.matmul(&vi).unwrap().transpose(1, 2).unwrap()
            })
            .collect();
        Tensor::cat(&outs, 0).unwrap()
    }

    #[test]
    fn exact_for_every_path_and_budget() {
        let dev = Device::Cpu;
        let q = Tensor::randn(0f32, 1., (2, 37, 3, 16), &dev).unwrap();
        let k = Tensor::randn(0f32, 1., (2, 29, 3, 16), &dev).unwrap();
        let v = Tensor::randn(0f32, 1., (2, 29, 3, 8), &dev).unwrap();
        for counts in [vec![29, 29], vec![29, 11]] {
            let want = dense(&q, &k, &v, &counts);
            let close = |got: &Tensor, what: &str| {
                assert_eq!(got.dims(), &[2, 37, 3, 8]);
                let diff = (got.to_dtype(DType::F64).unwrap() - &want)
                    .unwrap()
                    .abs()
                    .unwrap();
                let diff = diff.max_all().unwrap().to_scalar::<f64>().unwrap();
                // f32 scores and sums of ~30 terms against an f64 softmax: a few f32 ulps
                assert!(diff < 2e-6, "{what} {counts:?}: max abs error {diff:e}");
            };
            // f32 on the CPU: the fused kernel, from one row per block to all rows in one block
            for budget in [1, 29 * 5, usize::MAX] {
                let got = attention(&q, &k, &v, Some(&counts), budget).unwrap();
                close(&got, &format!("fused budget {budget}"));
            }
            // other dtypes: the generic path; chunks of 5 rows (ragged tail), 1 row, all rows
            let [q64, k64, v64] = [&q, &k, &v].map(|t| t.to_dtype(DType::F64).unwrap());
            for budget in [3 * 29 * 5, 1, usize::MAX] {
                let got = attention(&q64, &k64, &v64, Some(&counts), budget).unwrap();
                close(&got, &format!("generic budget {budget}"));
            }
        }
    }

    #[test]
    fn rejects_bad_arguments() {
        let dev = Device::Cpu;
        let q = Tensor::zeros((1, 4, 2, 8), DType::F32, &dev).unwrap();
        let k = Tensor::zeros((1, 4, 2, 4), DType::F32, &dev).unwrap();
        let e = attention(&q, &k, &k, None, 1).unwrap_err().to_string();
        assert!(e.contains("incompatible"), "{e}");
        let e = attention(&q, &q, &q, Some(&[5]), 1)
            .unwrap_err()
            .to_string();
        assert!(e.contains("key counts"), "{e}");
    }
}
