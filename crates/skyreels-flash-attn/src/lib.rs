//! FlashAttention-2 forward on CUDA for the SkyReels transformer: non-causal attention in bf16 with
//! head dimension 128, where sample `i` of the batch attends to its first `key_counts[i]` keys.
//!
//! The joint blocks attend over `[image tokens; text tokens]` with the text padding last, so the
//! reference's padding mask is exactly a per-sample key count; the kernel takes those counts
//! directly (FlashAttention's variable key length), so no dense mask is ever built and the score
//! matrix never leaves on-chip memory. The kernels are Tri Dao's FlashAttention-2 (as packaged by
//! candle-flash-attn), compiled for one configuration only to keep the build short; see
//! `kernels/README.md`.
//!
//! Everything here needs the `cuda` feature; without it the crate is empty.

#[cfg(feature = "cuda")]
mod cuda;

#[cfg(feature = "cuda")]
pub use cuda::{flash_attn, supports};
