//! HunyuanVideo 3D rotary position embedding (`HunyuanVideoRotaryPosEmbed`).
//!
//! <https://github.com/huggingface/diffusers/blob/58eb52c0803ea9af3abec60841c2a093bdf1f951/src/diffusers/models/transformers/transformer_hunyuan_video.py#L478-L508>
//!
//! Tables depend only on the latent grid. Token order is t slowest, then h, then w (meshgrid "ij"),
//! the order of the patch embedding. The rotation pairs features (2j, 2j+1) (interleaved,
//! GPT-J style), so the tables here hold one angle per pair: [n_tokens, head_dim / 2].

use candle_core::{bail, DType, Device, Result, Tensor};

/// cos and sin tables, each [t·h·w, sum(axes_dim)/2] f32, for a (t, h, w) token grid.
///
/// Per axis i of dimension d_i: freq_k = 1 / theta^(2k/d_i), angle = pos · freq_k. The reference
/// (`get_1d_rotary_pos_embed(use_real=True)` with its default `freqs_dtype=float32`) evaluates
/// every step in float32, in this order; so does this.
/// <https://github.com/huggingface/diffusers/blob/58eb52c0803ea9af3abec60841c2a093bdf1f951/src/diffusers/models/embeddings.py#L1120-L1184>
///
/// `riflex` > 0 is RIFLEx (thu-ml/RIFLEx, `get_1d_rotary_pos_embed_riflex`, used for the temporal
/// axis only): the `riflex`-th temporal frequency (1-based) becomes `0.9 · 2π / t`, `t` the
/// grid's frames (the latent frames with HunyuanVideo's `patch_size_t` 1: the reference's
/// `L_test`), so that the clip stays within 90% of that component's period.
/// <https://github.com/thu-ml/RIFLEx/blob/18e0bc34d5a68cae5753a6e33e35313bec89c1db/riflex_utils.py#L5-L56>
pub fn rope_tables(
    grid: (usize, usize, usize),
    axes_dim: &[usize],
    theta: f64,
    riflex: usize,
    device: &Device,
) -> Result<(Tensor, Tensor)> {
    if axes_dim.len() != 3 || axes_dim.iter().any(|d| d % 2 != 0) {
        bail!("rope: axes_dim must be three even sizes, got {axes_dim:?}")
    }
    let (t, h, w) = grid;
    let n = t * h * w;
    let half: usize = axes_dim.iter().sum::<usize>() / 2;
    let theta = theta as f32;
    let mut freqs: Vec<Vec<f32>> = axes_dim
        .iter()
        .map(|&d| {
            (0..d / 2)
                .map(|k| 1.0 / theta.powf((2 * k) as f32 / d as f32))
                .collect()
        })
        .collect();
    if riflex > 0 {
        let Some(f) = freqs[0].get_mut(riflex - 1) else {
            bail!(
                "rope: RIFLEx index {riflex} is above the {} temporal frequencies",
                axes_dim[0] / 2
            )
        };
        // the reference's Python float, stored into its float32 table
        *f = (0.9 * 2.0 * std::f64::consts::PI / t as f64) as f32;
    }
    let mut cos = Vec::with_capacity(n * half);
    let mut sin = Vec::with_capacity(n * half);
    for ti in 0..t {
        for hi in 0..h {
            for wi in 0..w {
                for (axis, pos) in [ti, hi, wi].into_iter().enumerate() {
                    for f in &freqs[axis] {
                        // positions are fp32 integers in the reference: exact
                        let a = pos as f32 * f;
                        cos.push(a.cos());
                        sin.push(a.sin());
                    }
                }
            }
        }
    }
    Ok((
        Tensor::from_vec(cos, (n, half), device)?,
        Tensor::from_vec(sin, (n, half), device)?,
    ))
}

/// Rotates interleaved pairs of the first `cos.dim(0)` tokens of x (b, n, heads, d) with tables
/// (n_rope, d/2), in f32 then cast back to x's dtype; later tokens (text) pass unchanged. (The
/// transformer's hot path fuses this with the q/k norm: `RmsNorm::forward_rope`.)
pub fn apply_rotary_emb(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let (_, n, _, _) = x.dims4()?;
    let n_rope = cos.dim(0)?;
    let dtype = x.dtype();
    // (b, n_rope, h, d) -> (b, h, n_rope, d) for candle's rope_i
    let head = x
        .narrow(1, 0, n_rope)?
        .to_dtype(DType::F32)?
        .transpose(1, 2)?
        .contiguous()?;
    let head = candle_nn::rotary_emb::rope_i(&head, cos, sin)?
        .transpose(1, 2)?
        .to_dtype(dtype)?;
    if n_rope == n {
        head.contiguous()
    } else {
        Tensor::cat(&[head, x.narrow(1, n_rope, n - n_rope)?], 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_values_match_reference() {
        // Reference: diffusers HunyuanVideoRotaryPosEmbed(patch_size=1, patch_size_t=1,
        // rope_dim=[2, 4, 4], theta=256.0) on latents of shape [1, 1, 2, 3, 2], i.e.
        //   cos, sin = rope(torch.zeros(1, 1, 2, 3, 2))  # each [12, 10], pairs repeat-interleaved
        // Token 11 = (t=1, h=2, w=1). Per axis pair k: angle = pos / 256^(2k/d):
        //   t: 1.0 ; h: 2.0, 2/16 = 0.125 ; w: 1.0, 1/16 = 0.0625
        let (cos, sin) = rope_tables((2, 3, 2), &[2, 4, 4], 256.0, 0, &Device::Cpu).unwrap();
        assert_eq!(cos.dims(), &[12, 5]);
        let c = cos.to_vec2::<f32>().unwrap();
        let s = sin.to_vec2::<f32>().unwrap();
        let angles = [1.0f64, 2.0, 0.125, 1.0, 0.0625];
        for (j, a) in angles.iter().enumerate() {
            assert!((c[11][j] - a.cos() as f32).abs() < 1e-7);
            assert!((s[11][j] - a.sin() as f32).abs() < 1e-7);
        }
        // torch output for this token, taking every other column of the repeat-interleaved table:
        // cos[11, ::2] = [0.5403023, -0.4161468, 0.9921977, 0.5403023, 0.9980475]
        let torch_cos = [
            0.540_302_3f32,
            -0.416_146_8,
            0.992_197_7,
            0.540_302_3,
            0.998_047_5,
        ];
        for (j, v) in torch_cos.iter().enumerate() {
            assert!((c[11][j] - v).abs() < 1e-6, "{j}: {} vs {v}", c[11][j]);
        }
        // Token 0 is the origin: no rotation.
        assert!(c[0].iter().all(|&v| v == 1.0) && s[0].iter().all(|&v| v == 0.0));
        // t slowest, w fastest: token 1 = (0, 0, 1) rotates only the w axis.
        assert_eq!(&c[1][..3], &[1.0, 1.0, 1.0]);
        assert!((c[1][3] - 1f32.cos()).abs() < 1e-7);
    }

    #[test]
    fn riflex_lowers_one_temporal_frequency_only() {
        // HunyuanVideo's axes (16, 56, 56), theta 256, 66 latent frames (RIFLEx's README run:
        // 261 frames), K = 4: the 4th temporal frequency becomes 0.9·2π/66; the others, and the
        // spatial axes, keep theirs. Token (t, 0, 0) sits at column j of the temporal axis.
        let axes = [16, 56, 56];
        let grid = (66, 1, 2);
        let (c0, s0) = rope_tables(grid, &axes, 256.0, 0, &Device::Cpu).unwrap();
        let (c4, s4) = rope_tables(grid, &axes, 256.0, 4, &Device::Cpu).unwrap();
        let (c0, c4) = (c0.to_vec2::<f32>().unwrap(), c4.to_vec2::<f32>().unwrap());
        let (s0, s4) = (s0.to_vec2::<f32>().unwrap(), s4.to_vec2::<f32>().unwrap());
        let f = (0.9 * 2.0 * std::f64::consts::PI / 66.0) as f32;
        for t in 0..66 {
            let row = 2 * t; // w = 0
            for j in 0..64 {
                if j == 3 {
                    let a = t as f32 * f;
                    assert_eq!((c4[row][j], s4[row][j]), (a.cos(), a.sin()), "t {t}");
                } else {
                    assert_eq!(
                        (c4[row][j], s4[row][j]),
                        (c0[row][j], s0[row][j]),
                        "{t} {j}"
                    );
                }
            }
        }
        // the last frame stays below one period of the lowered component (0.9 of it)
        assert!(65.0 * f < 0.9 * 2.0 * std::f32::consts::PI);
        // an index past the axis is an error, not a silent no-op
        let e = rope_tables(grid, &axes, 256.0, 9, &Device::Cpu).unwrap_err();
        assert!(
            e.to_string().contains("above the 8 temporal frequencies"),
            "{e}"
        );
    }

    #[test]
    fn rotation_is_interleaved_pairs() {
        // x = [1, 2, 3, 4] at angles [a0, a1]: out = (x0 c0 - x1 s0, x0 s0 + x1 c0, ...); a second
        // token past the table is left alone. Checked in f32 and f64.
        let dev = Device::Cpu;
        let x = Tensor::new(&[[[[1f32, 2., 3., 4.]], [[5., 6., 7., 8.]]]], &dev).unwrap();
        let (a0, a1) = (0.3f32, -1.1f32);
        let cos = Tensor::new(&[[a0.cos(), a1.cos()]], &dev).unwrap();
        let sin = Tensor::new(&[[a0.sin(), a1.sin()]], &dev).unwrap();
        let want = [
            a0.cos() - 2. * a0.sin(),
            a0.sin() + 2. * a0.cos(),
            3. * a1.cos() - 4. * a1.sin(),
            3. * a1.sin() + 4. * a1.cos(),
            5.,
            6.,
            7.,
            8.,
        ];
        for x in [x.clone(), x.to_dtype(DType::F64).unwrap()] {
            let y = apply_rotary_emb(&x, &cos, &sin).unwrap();
            assert_eq!(y.dtype(), x.dtype());
            let y = y
                .to_dtype(DType::F32)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            for (g, w) in y.iter().zip(want) {
                assert!((g - w).abs() < 1e-6, "{y:?} vs {want:?}");
            }
        }
    }
}
