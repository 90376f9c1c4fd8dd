//! GGUF block dequantization with diffusers' arithmetic.
//!
//! diffusers 0.42.1 (`quantizers/gguf/utils.py`, the path it takes without the `kernels`
//! package, i.e. on every CPU) dequantizes in float16: each block's f16 scale times the small
//! integer quants is rounded to f16, and so is every later product, sum and difference, in the
//! order its torch code writes them; the f16 result is then cast to the compute dtype. ggml (and
//! candle's `QTensor::dequantize`) computes the same formulas in f32, which differs from diffusers
//! by up to half an f16 ulp per weight. This module reproduces diffusers' order and roundings
//! exactly, so that a GGUF model matches diffusers to f32 precision.
//! <https://github.com/huggingface/diffusers/blob/58eb52c0803ea9af3abec60841c2a093bdf1f951/src/diffusers/quantizers/gguf/utils.py#L214-L516>

use candle_core::quantized::GgmlDType;
use candle_core::{bail, Result};
use half::f16;
use rayon::prelude::*;

/// `a * b` rounded to f16, as torch's f16 kernels do on the CPU (the product of an f16 and a
/// small integer is exact in f32).
fn mul(a: f16, b: f32) -> f16 {
    f16::from_f32(a.to_f32() * b)
}

fn add(a: f16, b: f16) -> f16 {
    f16::from_f32(a.to_f32() + b.to_f32())
}

fn sub(a: f16, b: f16) -> f16 {
    f16::from_f32(a.to_f32() - b.to_f32())
}

fn half_at(b: &[u8], i: usize) -> f16 {
    f16::from_le_bytes([b[i], b[i + 1]])
}

/// llama.cpp's `get_scale_min_k4` as diffusers writes it: 8 six-bit scales and mins from 12 bytes.
///
/// <https://github.com/huggingface/diffusers/blob/58eb52c0803ea9af3abec60841c2a093bdf1f951/src/diffusers/quantizers/gguf/utils.py#L229-L239>
fn scale_min(s: &[u8]) -> ([u8; 8], [u8; 8]) {
    let (mut sc, mut m) = ([0u8; 8], [0u8; 8]);
    for i in 0..4 {
        sc[i] = s[i] & 0x3F;
        sc[4 + i] = (s[8 + i] & 0x0F) | ((s[i] >> 2) & 0x30);
        m[i] = s[4 + i] & 0x3F;
        m[4 + i] = (s[8 + i] >> 4) | ((s[4 + i] >> 2) & 0x30);
    }
    (sc, m)
}

/// Bit `i` of the little-endian 32-bit mask at `b[..4]` (Q5_0 / Q5_1 high bits).
fn bit32(b: &[u8], i: usize) -> u8 {
    (u32::from_le_bytes([b[0], b[1], b[2], b[3]]) >> i) as u8 & 1
}

/// One block of `dtype` (`block.len() == dtype.type_size()`) into `out`
/// (`out.len() == dtype.block_size()`).
fn block(dtype: GgmlDType, b: &[u8], out: &mut [f16]) -> Result<()> {
    match dtype {
        GgmlDType::Q8_0 => {
            let d = half_at(b, 0);
            for (o, &q) in out.iter_mut().zip(&b[2..34]) {
                *o = mul(d, f32::from(q as i8));
            }
        }
        GgmlDType::Q4_0 | GgmlDType::Q4_1 => {
            let d = half_at(b, 0);
            let (m, qs) = if dtype == GgmlDType::Q4_1 {
                (Some(half_at(b, 2)), &b[4..20])
            } else {
                (None, &b[2..18])
            };
            for j in 0..32 {
                let nib = (qs[j % 16] >> (4 * (j / 16))) & 0x0F;
                out[j] = match m {
                    Some(m) => add(mul(d, f32::from(nib)), m),
                    None => mul(d, f32::from(nib as i8 - 8)),
                };
            }
        }
        GgmlDType::Q5_0 | GgmlDType::Q5_1 => {
            let d = half_at(b, 0);
            let (m, qh, qs) = if dtype == GgmlDType::Q5_1 {
                (Some(half_at(b, 2)), &b[4..8], &b[8..24])
            } else {
                (None, &b[2..6], &b[6..22])
            };
            for j in 0..32 {
                let q = ((qs[j % 16] >> (4 * (j / 16))) & 0x0F) | (bit32(qh, j) << 4);
                out[j] = match m {
                    Some(m) => add(mul(d, f32::from(q)), m),
                    None => mul(d, f32::from(q as i8 - 16)),
                };
            }
        }
        GgmlDType::Q2K => {
            let (scales, qs) = (&b[0..16], &b[16..80]);
            let (d, dmin) = (half_at(b, 80), half_at(b, 82));
            for e in 0..256 {
                let g = e / 16;
                let dl = mul(d, f32::from(scales[g] & 0x0F));
                let ml = mul(dmin, f32::from(scales[g] >> 4));
                let q = (qs[(e / 128) * 32 + e % 32] >> (2 * ((e % 128) / 32))) & 3;
                out[e] = sub(mul(dl, f32::from(q)), ml);
            }
        }
        GgmlDType::Q3K => {
            let (hmask, qs, s) = (&b[0..32], &b[32..96], &b[96..108]);
            let d = half_at(b, 108);
            for e in 0..256 {
                let g = e / 16;
                let low = (s[g % 8] >> (4 * (g / 8))) & 0x0F;
                let high = (s[8 + g % 4] >> (2 * (g / 4))) & 0x03;
                let scale = (low | (high << 4)) as i8 - 32;
                let dl = mul(d, f32::from(scale));
                let ql = (qs[(e / 128) * 32 + e % 32] >> (2 * ((e % 128) / 32))) & 3;
                let qh = ((hmask[e % 32] >> (e / 32)) & 1) ^ 1;
                out[e] = mul(dl, f32::from(ql as i8 - ((qh << 2) as i8)));
            }
        }
        GgmlDType::Q4K | GgmlDType::Q5K => {
            let (d, dmin) = (half_at(b, 0), half_at(b, 2));
            let (sc, m) = scale_min(&b[4..16]);
            let (qh, qs) = if dtype == GgmlDType::Q5K {
                (Some(&b[16..48]), &b[48..176])
            } else {
                (None, &b[16..144])
            };
            for g in 0..8 {
                let dg = mul(d, f32::from(sc[g]));
                let mg = mul(dmin, f32::from(m[g]));
                for l in 0..32 {
                    let mut q = (qs[(g / 2) * 32 + l] >> (4 * (g % 2))) & 0x0F;
                    if let Some(qh) = qh {
                        q |= ((qh[l] >> g) & 1) << 4;
                    }
                    out[g * 32 + l] = sub(mul(dg, f32::from(q)), mg);
                }
            }
        }
        GgmlDType::Q6K => {
            let (ql, qh, scales) = (&b[0..128], &b[128..192], &b[192..208]);
            let d = half_at(b, 208);
            for e in 0..256 {
                let dg = mul(d, f32::from(scales[e / 16] as i8));
                let (a, r) = (e / 128, e % 128);
                let low = (ql[a * 64 + r % 64] >> (4 * (r / 64))) & 0x0F;
                let high = (qh[a * 32 + r % 32] >> (2 * (r / 32))) & 0x03;
                out[e] = mul(dg, f32::from((low | (high << 4)) as i8 - 32));
            }
        }
        other => bail!("no diffusers-order dequantization for {other:?}"),
    }
    Ok(())
}

/// Whether [`dequantize`] handles `dtype` (every quantized type; F32, F16 and BF16 are exact
/// in any order).
pub fn is_block_type(dtype: GgmlDType) -> bool {
    !matches!(dtype, GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16)
}

/// Blocks per parallel task.
const BLOCKS_PER_TASK: usize = 256;

/// The values diffusers' `dequantize_gguf_tensor` gives for the blocks in `data` (f16 values,
/// widened exactly to f32), in parallel over groups of blocks.
///
/// <https://github.com/huggingface/diffusers/blob/58eb52c0803ea9af3abec60841c2a093bdf1f951/src/diffusers/quantizers/gguf/utils.py#L523-L544>
pub fn dequantize(dtype: GgmlDType, data: &[u8]) -> Result<Vec<f32>> {
    let (bs, ts) = (dtype.block_size(), dtype.type_size());
    if !is_block_type(dtype) || !data.len().is_multiple_of(ts) {
        bail!(
            "{dtype:?}: {} bytes are not whole blocks of {ts} bytes",
            data.len()
        )
    }
    let mut out = vec![0f32; data.len() / ts * bs];
    data.par_chunks(ts * BLOCKS_PER_TASK)
        .zip(out.par_chunks_mut(bs * BLOCKS_PER_TASK))
        .try_for_each(|(blocks, out)| {
            let mut buf = vec![f16::ZERO; bs];
            for (b, o) in blocks.chunks_exact(ts).zip(out.chunks_exact_mut(bs)) {
                block(dtype, b, &mut buf)?;
                for (o, v) in o.iter_mut().zip(&buf) {
                    *o = v.to_f32();
                }
            }
            Ok::<(), candle_core::Error>(())
        })?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::QTensor;
    use candle_core::{Device, Tensor};

    /// Up to f16 rounding, the same values as ggml's f32 dequantization (candle's), for every
    /// type candle can write: a layout error would be off by whole quantization steps.
    #[test]
    fn agrees_with_ggml_up_to_f16_rounding() {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1., (4, 512), &dev).unwrap();
        for dtype in [
            GgmlDType::Q8_0,
            GgmlDType::Q4_0,
            GgmlDType::Q4_1,
            GgmlDType::Q5_0,
            GgmlDType::Q5_1,
            GgmlDType::Q2K,
            GgmlDType::Q3K,
            GgmlDType::Q4K,
            GgmlDType::Q5K,
            GgmlDType::Q6K,
        ] {
            let q = QTensor::quantize(&w, dtype).unwrap();
            let ggml = q.dequantize(&dev).unwrap().flatten_all().unwrap();
            let ggml = ggml.to_vec1::<f32>().unwrap();
            let ours = dequantize(dtype, &q.data().unwrap()).unwrap();
            for (i, (&a, &b)) in ggml.iter().zip(&ours).enumerate() {
                // a few f16 roundings of values below 4 in magnitude: < 3 * 2^-9
                assert!(
                    (a - b).abs() <= 6e-3 * a.abs().max(1.0),
                    "{dtype:?} element {i}: ggml {a}, diffusers order {b}"
                );
            }
        }
    }
}
