//! Exact scaled-dot-product attention with bounded working memory.
//!
//! The full score matrix at SkyReels size (24 heads x 51,256^2) is 126 GB, so queries are processed
//! in chunks: each chunk computes its complete score rows (softmax over every key), which keeps the
//! result exact while the scores held at once are limited to `budget` elements.
//! Masking is done by the callers by *selecting keys* (the reference masks keys only, and a masked
//! key contributes exactly zero weight), so no dense mask is ever built.

use candle_core::{bail, Result, Tensor};

/// Score elements (batch x heads x query rows x keys) held at once by [`attention`]: 16 Mi
/// elements = 64 MiB in f32, small enough to stay cache-friendly on CPUs and to be irrelevant on
/// GPUs next to the weights.
pub const DEFAULT_SCORE_BUDGET: usize = 16 << 20;

/// softmax(q kᵀ · scale) v for q (b, h, nq, d), k (b, h, nk, d), v (b, h, nk, dv).
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    attention_chunked(q, k, v, scale, DEFAULT_SCORE_BUDGET)
}

/// [`attention`] with an explicit budget of score elements held at once.
pub fn attention_chunked(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    budget: usize,
) -> Result<Tensor> {
    let (b, h, nq, d) = q.dims4()?;
    let (bk, hk, nk, dk) = k.dims4()?;
    let (bv, hv, nv, _) = v.dims4()?;
    if (b, h, d) != (bk, hk, dk) || (b, h, nk) != (bv, hv, nv) {
        bail!(
            "attention: incompatible q {:?}, k {:?}, v {:?}",
            q.shape(),
            k.shape(),
            v.shape()
        )
    }
    if nk == 0 {
        bail!("attention: no keys (k {:?})", k.shape())
    }
    let kt = k.t()?;
    let per_row = b * h * nk;
    let chunk = (budget / per_row.max(1)).clamp(1, nq.max(1));
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
    use candle_core::{DType, Device, D};

    fn dense(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Tensor {
        let s = (q.matmul(&k.t().unwrap()).unwrap() * scale).unwrap();
        let s = s.to_dtype(DType::F64).unwrap();
        let m = s.max_keepdim(D::Minus1).unwrap();
        let e = s.broadcast_sub(&m).unwrap().exp().unwrap();
        let p = e.broadcast_div(&e.sum_keepdim(D::Minus1).unwrap()).unwrap();
        p.matmul(&v.to_dtype(DType::F64).unwrap()).unwrap()
    }

    #[test]
    fn chunking_is_exact() {
        let dev = Device::Cpu;
        let q = Tensor::randn(0f32, 1., (2, 3, 37, 16), &dev).unwrap();
        let k = Tensor::randn(0f32, 1., (2, 3, 29, 16), &dev).unwrap();
        let v = Tensor::randn(0f32, 1., (2, 3, 29, 8), &dev).unwrap();
        let want = dense(&q, &k, &v, 0.25);
        let full = attention_chunked(&q, &k, &v, 0.25, usize::MAX).unwrap();
        // budget of 5 rows -> 8 chunks with a ragged tail; one row per chunk at budget 1
        for budget in [2 * 3 * 29 * 5, 1] {
            let got = attention_chunked(&q, &k, &v, 0.25, budget).unwrap();
            assert_eq!(got.dims(), &[2, 3, 37, 8]);
            // Same rows, same math; only the GEMM blocking differs with the row count, which
            // changes f32 summation order (a few ulps of values ~1).
            let diff = (&got - &full).unwrap().abs().unwrap().max_all().unwrap();
            let diff = diff.to_scalar::<f32>().unwrap();
            assert!(diff < 2e-6, "budget {budget}: {diff}");
        }
        // And equal to an f64 dense softmax to f32 rounding.
        let diff = (full.to_dtype(DType::F64).unwrap() - want)
            .unwrap()
            .abs()
            .unwrap();
        let diff = diff.max_all().unwrap().to_scalar::<f64>().unwrap();
        assert!(diff < 1e-5, "{diff}");
    }

    #[test]
    fn rejects_mismatched_shapes() {
        let dev = Device::Cpu;
        let q = Tensor::zeros((1, 2, 4, 8), DType::F32, &dev).unwrap();
        let k = Tensor::zeros((1, 2, 4, 4), DType::F32, &dev).unwrap();
        let e = attention(&q, &k, &k, 1.0).unwrap_err().to_string();
        assert!(e.contains("incompatible"), "{e}");
    }
}
