//! Text encoders: the LLaVA-LLaMA-3 language model (hidden states) and CLIP-L (pooled).

pub mod clip;
pub mod llama;

pub use clip::{ClipTextConfig, ClipTextModel};
pub use llama::{LlamaConfig, LlamaEncoder};

use candle_core::{DType, Result, Tensor};

/// Additive mask (b, 1, n, n) from a (b, n) mask of 1/0: 0 where key j <= query i and key j is a
/// real token, -inf elsewhere.
pub(crate) fn causal_mask(mask: &Tensor, dtype: DType) -> Result<Tensor> {
    let (b, n) = mask.dims2()?;
    let m = mask.to_dtype(DType::F32)?.to_vec2::<f32>()?;
    let mut out = vec![0f32; b * n * n];
    for (bi, row) in m.iter().enumerate() {
        for i in 0..n {
            for (j, &valid) in row.iter().enumerate() {
                if j > i || valid == 0.0 {
                    out[(bi * n + i) * n + j] = f32::NEG_INFINITY;
                }
            }
        }
    }
    Tensor::from_vec(out, (b, 1, n, n), mask.device())?.to_dtype(dtype)
}

/// softmax(q kᵀ / √d + mask) v for (b, heads, n, d) tensors and an additive mask broadcast over
/// heads. Text sequences are short (≤ 351 tokens), so the dense form is cheap.
pub(crate) fn masked_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &Tensor,
) -> Result<Tensor> {
    let d = q.dim(3)?;
    let scores = (q.matmul(&k.t()?)? / (d as f64).sqrt())?.broadcast_add(mask)?;
    candle_nn::ops::softmax_last_dim(&scores)?.matmul(v)
}
