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
//! Everything but [`reads_in_place`] needs the `cuda` feature; without it the crate holds only that.

#[cfg(feature = "cuda")]
mod cuda;

#[cfg(feature = "cuda")]
pub use cuda::{flash_attn, supports};

/// bf16 elements per 16 bytes, the width of the kernel's vector loads and stores.
const VECTOR: usize = 8;

/// Whether the kernel can read a rank-4 (b, n, h, d) bf16 layout in place, given its start offset
/// and strides in elements. The kernel moves rows with 16-byte vector loads (upstream's
/// `mha_fwd` asserts the same), so it needs: each head vector contiguous (last stride 1), the
/// first element 16-byte aligned (offset a multiple of 8 elements; allocations are at least
/// 256-byte aligned), and the batch, row and head strides multiples of 8 elements, so that every
/// row starts on a 16-byte boundary. Any other layout is copied to a contiguous tensor first (a
/// misaligned row would be a fault or a silently wrong read).
pub fn reads_in_place(start_offset: usize, stride: &[usize]) -> bool {
    stride.len() == 4
        && stride[3] == 1
        && start_offset.is_multiple_of(VECTOR)
        && stride[..3].iter().all(|s| s.is_multiple_of(VECTOR))
}

#[cfg(test)]
mod tests {
    use super::reads_in_place;

    #[test]
    fn only_aligned_layouts_are_read_in_place() {
        // contiguous (2, 333, 3, 128), and the q of a fused qkv (row stride 3 * 3 * 128)
        assert!(reads_in_place(0, &[333 * 3 * 128, 3 * 128, 128, 1]));
        assert!(reads_in_place(3 * 128, &[333 * 9 * 128, 9 * 128, 128, 1]));
        // a transposed last dimension, an offset of 4 elements (8 bytes), an odd head stride
        assert!(!reads_in_place(0, &[333 * 3 * 128, 3 * 128, 1, 3]));
        assert!(!reads_in_place(4, &[333 * 3 * 128, 3 * 128, 128, 1]));
        assert!(!reads_in_place(0, &[333 * 4 * 132, 4 * 132, 132, 1]));
        // rows 8 elements apart are fine, rows 12 apart are not
        assert!(reads_in_place(0, &[8 * 333, 8, 8, 1]));
        assert!(!reads_in_place(0, &[12 * 333, 12, 8, 1]));
        assert!(!reads_in_place(0, &[1, 1, 1]));
    }
}
