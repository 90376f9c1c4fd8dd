//! The GEMM the kernels build on: `gemm::gemm` over strided views, so transposed operands and
//! output rows at a stride (token-major heads, channel planes) need no copies.

/// A strided f32 matrix for [`gemm_f32`]: element (i, j) at `ptr + i·rs + j·cs`.
#[derive(Clone, Copy)]
pub(super) struct View<P> {
    pub(super) ptr: P,
    pub(super) rs: isize,
    pub(super) cs: isize,
}

/// dst (m × n) = lhs (m × k) · rhs (k × n), added onto dst when `accumulate`.
///
/// # Safety
/// Every view must address valid memory for its shape and strides, and dst must not alias lhs
/// or rhs.
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn gemm_f32(
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
    // SAFETY: the caller's contract (valid views, no aliasing of dst) is gemm's.
    unsafe {
        gemm::gemm(
            m, n, k, dst.ptr, dst.cs, dst.rs, accumulate, lhs.ptr, lhs.cs, lhs.rs, rhs.ptr, rhs.cs,
            rhs.rs, alpha, 1.0, false, false, false, par,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strided_views_multiply_and_accumulate() {
        // lhs (2 × 3) row-major; rhs (3 × 2) read through strides as the transpose of the
        // row-major (2 × 3) [[1, 0, -1], [2, 1, 0]], as attention reads kᵀ
        let lhs = [1f32, 2., 3., 4., 5., 6.];
        let rhs_t = [1f32, 0., -1., 2., 1., 0.];
        let mut dst = [10f32, 20., 30., 40.];
        let run = |dst: &mut [f32; 4], accumulate: bool| {
            // SAFETY: the views address the 2 × 3, 3 × 2 and 2 × 2 arrays above.
            unsafe {
                gemm_f32(
                    2,
                    2,
                    3,
                    View {
                        ptr: dst.as_mut_ptr(),
                        rs: 2,
                        cs: 1,
                    },
                    accumulate,
                    View {
                        ptr: lhs.as_ptr(),
                        rs: 3,
                        cs: 1,
                    },
                    View {
                        ptr: rhs_t.as_ptr(),
                        rs: 1,
                        cs: 3,
                    },
                    gemm::Parallelism::None,
                )
            }
        };
        // lhs · rhs = [[1 − 3, 2 + 2], [4 − 6, 8 + 5]] = [[-2, 4], [-2, 13]]
        run(&mut dst, true);
        assert_eq!(dst, [8., 24., 28., 53.]);
        run(&mut dst, false);
        assert_eq!(dst, [-2., 4., -2., 13.]);
    }
}
