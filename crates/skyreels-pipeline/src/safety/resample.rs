//! PIL's `Image.resize(size, Image.BICUBIC)` of an 8-bit RGB image, bit for bit: what
//! transformers' PIL image processors (and so the safety checker's `CLIPImageProcessor`) do.
//!
//! Pillow resamples separably, horizontal pass first, each into 8-bit pixels. Per output pixel the
//! filter (Keys' cubic, a = -0.5, support 2) is stretched by the downscale factor (antialiasing),
//! its weights are normalized in f64, then turned into fixed-point integers with 22 fractional
//! bits, summed with the 8-bit inputs in integer arithmetic and clipped back to 8 bits.
//! <https://github.com/python-pillow/Pillow/blob/13.0.0/src/libImaging/Resample.c>
//! (`precompute_coeffs`, `normalize_coeffs_8bpc`, `ImagingResampleHorizontal_8bpc`,
//! `ImagingResampleVertical_8bpc`, `ImagingResampleInner`).

use image::RgbImage;

/// Fixed-point fraction bits of the 8-bit kernels (`PRECISION_BITS`).
const PRECISION_BITS: u32 = 32 - 8 - 2;

/// Pillow's `bicubic_filter`: Keys' cubic convolution with a = -0.5.
fn bicubic(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// The fixed-point taps of each output pixel along one axis: its first input pixel and weights.
struct Taps {
    first: Vec<usize>,
    weights: Vec<Vec<i32>>,
}

/// `precompute_coeffs` (for the whole input, box = (0, in_size)) then `normalize_coeffs_8bpc`.
fn taps(in_size: usize, out_size: usize) -> Taps {
    const SUPPORT: f64 = 2.0;
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = SUPPORT * filterscale;
    let mut first = Vec::with_capacity(out_size);
    let mut weights = Vec::with_capacity(out_size);
    for xx in 0..out_size {
        let center = (xx as f64 + 0.5) * scale;
        let ss = 1.0 / filterscale;
        // C's (int) casts truncate; negative starts are clamped to 0 either way
        let xmin = ((center - support + 0.5) as i64).max(0) as usize;
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
        let k: Vec<f64> = (xmin..xmax)
            .map(|x| bicubic((x as f64 - center + 0.5) * ss))
            .collect();
        let ww: f64 = k.iter().fold(0.0, |acc, w| acc + w);
        let unit = f64::from(1u32 << PRECISION_BITS);
        let fixed = k
            .iter()
            .map(|&w| {
                let w = if ww != 0.0 { w / ww } else { w };
                // round half away from zero, as (int)(±0.5 + w · 2^22)
                if w < 0.0 {
                    (-0.5 + w * unit) as i32
                } else {
                    (0.5 + w * unit) as i32
                }
            })
            .collect();
        first.push(xmin);
        weights.push(fixed);
    }
    Taps { first, weights }
}

/// `clip8`: a fixed-point sum back to 8 bits.
fn clip8(v: i64) -> u8 {
    if v >= (1i64 << PRECISION_BITS << 8) {
        255
    } else if v <= 0 {
        0
    } else {
        (v >> PRECISION_BITS) as u8
    }
}

/// One pass over RGB rows of `src` (width `w`, `h` rows, 3 bytes per pixel) along x when
/// `horizontal`, else along y; `out_len` is the new size along that axis.
fn pass(src: &[u8], w: usize, h: usize, horizontal: bool, out_len: usize) -> Vec<u8> {
    let in_len = if horizontal { w } else { h };
    let t = taps(in_len, out_len);
    let (ow, oh) = if horizontal {
        (out_len, h)
    } else {
        (w, out_len)
    };
    let mut out = vec![0u8; ow * oh * 3];
    let half = 1i64 << (PRECISION_BITS - 1);
    for y in 0..oh {
        for x in 0..ow {
            let j = if horizontal { x } else { y };
            let (first, k) = (t.first[j], &t.weights[j]);
            let mut acc = [half; 3];
            for (i, &kv) in k.iter().enumerate() {
                let (sx, sy) = if horizontal {
                    (first + i, y)
                } else {
                    (x, first + i)
                };
                let p = (sy * w + sx) * 3;
                for (c, a) in acc.iter_mut().enumerate() {
                    *a += i64::from(src[p + c]) * i64::from(kv);
                }
            }
            let q = (y * ow + x) * 3;
            for (c, a) in acc.iter().enumerate() {
                out[q + c] = clip8(*a);
            }
        }
    }
    out
}

/// `img.resize((width, height), Image.BICUBIC)` as Pillow computes it; the same size is a copy.
pub fn resize_bicubic(img: &RgbImage, width: u32, height: u32) -> RgbImage {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let (nw, nh) = (width as usize, height as usize);
    let mut data = img.as_raw().clone();
    let mut cur_w = w;
    if nw != w {
        data = pass(&data, w, h, true, nw);
        cur_w = nw;
    }
    if nh != h {
        data = pass(&data, cur_w, h, false, nh);
    }
    RgbImage::from_raw(width, height, data).expect("buffer sized width x height x 3")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filter_weights_sum_to_one_in_fixed_point() {
        for (i, o) in [(960, 224), (37, 224), (333, 297), (5, 3)] {
            let t = taps(i, o);
            for k in &t.weights {
                let sum: i64 = k.iter().map(|&v| i64::from(v)).sum();
                assert!(
                    (sum - (1 << PRECISION_BITS)).abs() <= k.len() as i64,
                    "{i}->{o}"
                );
            }
        }
    }

    #[test]
    fn a_constant_image_stays_constant() {
        let img = RgbImage::from_pixel(57, 31, image::Rgb([7, 128, 250]));
        let out = resize_bicubic(&img, 224, 123);
        assert!(out.pixels().all(|p| p.0 == [7, 128, 250]));
    }
}
