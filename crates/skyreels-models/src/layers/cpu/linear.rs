//! Linear layers: x wᵀ + bias as one GEMM onto the preloaded bias, also over an input given
//! in column blocks (a concatenation that is never built).

use super::matmul::{gemm_f32, View};
use super::with_f32s;
use candle_core::{bail, Result, Tensor};
use rayon::prelude::*;

/// Σᵢ xᵢ · w[:, colsᵢ]ᵀ + bias for f32 CPU tensors: each xᵢ (m, kᵢ) multiplies the columns of
/// w (n, k) starting at its offset (a linear layer over a concatenated input, without building
/// the concatenation). The bias is written first and every GEMM accumulates onto the output:
/// no separate bias pass or allocation.
pub(crate) fn linear_parts_f32(
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
pub(crate) fn linear_f32(x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    linear_parts_f32(&[(x, 0)], w, bias)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn parts_match_the_concatenated_input() {
        let dev = Device::Cpu;
        let vals = |n: usize, k: usize| -> Vec<f32> {
            (0..n)
                .map(|i| ((i * 7919 + k * 104_729) % 211) as f32 / 105.5 - 1.0)
                .collect()
        };
        let a = Tensor::from_vec(vals(15, 1), (5, 3), &dev).unwrap();
        let b = Tensor::from_vec(vals(20, 2), (5, 4), &dev).unwrap();
        let w = Tensor::from_vec(vals(42, 3), (6, 7), &dev).unwrap();
        let bias = Tensor::from_vec(vals(6, 4), 6, &dev).unwrap();
        let whole = Tensor::cat(&[&a, &b], 1).unwrap();
        for bias in [Some(&bias), None] {
            let mut want = whole.matmul(&w.t().unwrap()).unwrap();
            if let Some(bias) = bias {
                want = want.broadcast_add(bias).unwrap();
            }
            let parts = linear_parts_f32(&[(&a, 0), (&b, 3)], &w, bias).unwrap();
            let one = linear_f32(&whole, &w, bias).unwrap();
            for got in [parts, one] {
                let diff = (got - &want).unwrap().abs().unwrap().max_all().unwrap();
                // 7-term dot products of values in [-1, 1], summed in another order: f32 ulps
                assert!(diff.to_scalar::<f32>().unwrap() < 1e-5);
            }
        }
        // a part past the weight's columns is refused
        assert!(linear_parts_f32(&[(&b, 4)], &w, None).is_err());
    }
}
