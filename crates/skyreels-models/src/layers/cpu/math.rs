//! Scalar math that the kernels inline into their vectorized loops.

/// exp(x) for f32, Cephes `expf` (range reduction by ln 2, degree-5 minimax polynomial): within
/// 2 ulp over the f32 range; inputs below -87.3 give ~1e-38 instead of 0 (irrelevant where used:
/// softmax terms and sigmoid denominators).
#[inline(always)]
pub(super) fn exp_f32(x: f32) -> f32 {
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
