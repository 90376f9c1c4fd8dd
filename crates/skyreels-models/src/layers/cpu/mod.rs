//! Fused f32 CPU kernels for the hot spots candle runs as scalar or single-threaded ops:
//! attention (GEMM -> in-place softmax -> GEMM per block of query rows, no score tensors), linear
//! layers (one GEMM with the bias preloaded, also over a concatenated input without building it),
//! GELU-tanh and the gated residual add, RMSNorm + RoPE, LayerNorm + modulation and GroupNorm
//! (+ SiLU) in one pass each, and 3D convolution (direct with merged taps, Winograd F(2×2, 3×3),
//! im2col for strided ones). The loops are written so LLVM vectorizes them; each kernel is
//! compiled for AVX-512 and AVX2+FMA and picked at run time (`simd_dispatch!`).
//!
//! Every kernel takes f32 tensors on the CPU. Whether a kernel or candle's ops run is decided once
//! per layer kind, by its layer (`layers::{attention, conv3d, linear, modulation, norm}`);
//! [`gelu_tanh`] decides for itself, as a `CustomOp1` with a CPU forward.
//!
//! Layout: `math` (exp), `matmul` (the strided GEMM the others build on), `attention`, `linear`,
//! `elementwise` (GELU, gated add), `norm` (RMSNorm + RoPE, LayerNorm + modulation, GroupNorm),
//! `conv` (the algorithm choice; `taps`, `direct`, `winograd`, `im2col`).

use candle_core::{bail, CpuStorage, Result, Storage, Tensor};

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

mod attention;
mod conv;
mod elementwise;
mod linear;
mod math;
mod matmul;
mod norm;

pub(crate) use attention::attention_bnhd_f32;
pub(crate) use conv::{conv3d_f32, Conv3dGeometry};
pub(crate) use elementwise::{add_gated_f32, gelu_tanh};
pub(crate) use linear::{linear_f32, linear_parts_f32};
pub(crate) use norm::{group_norm_f32, layer_norm_modulate_f32, rms_norm_rope_f32};

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

/// A raw pointer that tasks writing disjoint regions of one buffer may share.
#[derive(Clone, Copy)]
struct SharedMut(*mut f32);
// SAFETY: every task writes a region no other task touches (see the callers).
unsafe impl Send for SharedMut {}
// SAFETY: as for Send: shared only among tasks writing disjoint regions.
unsafe impl Sync for SharedMut {}

impl SharedMut {
    /// Through a method, so closures capture the whole (Send) wrapper, not the raw field.
    fn ptr(self) -> *mut f32 {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    #[test]
    fn with_f32s_reads_contiguous_f32_cpu_tensors_only() {
        let dev = Device::Cpu;
        let a = Tensor::arange(0f32, 6., &dev)
            .unwrap()
            .reshape((2, 3))
            .unwrap();
        // a narrowed row is contiguous at an offset: the slice holds its elements only
        let row = a.narrow(0, 1, 1).unwrap();
        let got = with_f32s([&a, &row], |[x, r]| (x.to_vec(), r.to_vec())).unwrap();
        assert_eq!(got, (vec![0., 1., 2., 3., 4., 5.], vec![3., 4., 5.]));
        let e = with_f32s([&a.t().unwrap()], |_| ())
            .unwrap_err()
            .to_string();
        assert!(e.contains("not contiguous"), "{e}");
        let f64s = a.to_dtype(DType::F64).unwrap();
        let e = with_f32s([&f64s], |_| ()).unwrap_err().to_string();
        assert!(e.contains("expected an f32 CPU tensor"), "{e}");
    }
}
