//! Timestep and conditioning embeddings (diffusers `embeddings.py`).

use super::linear::{linear, Linear};
use super::weights::Weights;
use candle_core::{DType, Module, Result, Tensor};

/// `get_timestep_embedding(t, dim, flip_sin_to_cos=True, downscale_freq_shift=0)`:
/// f_k = exp(-ln(10000)·k/half), a = t·f_k in f32, output [cos(a), sin(a)] of shape [b, dim].
///
/// <https://github.com/huggingface/diffusers/blob/58eb52c0803ea9af3abec60841c2a093bdf1f951/src/diffusers/models/embeddings.py#L27-L78>
pub fn timestep_sinusoid(t: &Tensor, dim: usize) -> Result<Tensor> {
    let half = dim / 2;
    let ln = -(10000f64.ln() as f32);
    let freqs: Vec<f32> = (0..half)
        .map(|k| ((ln * k as f32) / half as f32).exp())
        .collect();
    let freqs = Tensor::from_vec(freqs, (1, half), t.device())?;
    let t = t.to_dtype(DType::F32)?.unsqueeze(1)?;
    let a = t.broadcast_mul(&freqs)?;
    Tensor::cat(&[a.cos()?, a.sin()?], 1)
}

/// `TimestepEmbedding`: linear_2(SiLU(linear_1(x))).
///
/// <https://github.com/huggingface/diffusers/blob/v0.42.1/src/diffusers/models/embeddings.py#L1027-L1072>
#[derive(Debug, Clone)]
pub struct TimestepEmbedding {
    linear_1: Linear,
    linear_2: Linear,
}

impl TimestepEmbedding {
    pub fn new(in_dim: usize, dim: usize, vb: Weights) -> Result<Self> {
        Ok(Self {
            linear_1: linear(in_dim, dim, vb.pp("linear_1"))?,
            linear_2: linear(dim, dim, vb.pp("linear_2"))?,
        })
    }

    /// `linear_1` and `linear_2`.
    pub fn linears_mut(&mut self) -> [&mut Linear; 2] {
        [&mut self.linear_1, &mut self.linear_2]
    }
}

impl Module for TimestepEmbedding {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.linear_2.forward(&self.linear_1.forward(x)?.silu()?)
    }
}

/// `PixArtAlphaTextProjection(act_fn="silu")`: linear_2(SiLU(linear_1(x))), in -> hidden -> hidden.
///
/// <https://github.com/huggingface/diffusers/blob/v0.42.1/src/diffusers/models/embeddings.py#L1957-L1983>
pub type TextProjection = TimestepEmbedding;

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn sinusoid_matches_reference() {
        // from diffusers.models.embeddings import get_timestep_embedding
        // e = get_timestep_embedding(torch.tensor([0., 1000., 995.0981]), 8,
        //                            flip_sin_to_cos=True, downscale_freq_shift=0)
        // e[1] = [0.5623791, 0.8623150, -0.8390715, 0.5403023,
        //         0.8268796, -0.5063722, -0.5440211, 0.8414710]
        // e[2] = [-0.7061235, 0.5223762, -0.8647208, 0.5444207,
        //         0.7080886, -0.8527151, -0.5022529, 0.8388123]
        let t = Tensor::new(&[0f32, 1000., 995.0981], &Device::Cpu).unwrap();
        let e = timestep_sinusoid(&t, 8).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(e[0], vec![1., 1., 1., 1., 0., 0., 0., 0.]);
        let want1 = [
            0.562_379_1,
            0.862_315,
            -0.839_071_5,
            0.540_302_3,
            0.826_879_6,
            -0.506_372_2,
            -0.544_021_1,
            0.841_471,
        ];
        let want2 = [
            -0.706_123_5,
            0.522_376_2,
            -0.864_720_8,
            0.544_420_7,
            0.708_088_6,
            -0.852_715_1,
            -0.502_252_9,
            0.838_812_3,
        ];
        for (got, want) in [(&e[1], want1), (&e[2], want2)] {
            for (g, w) in got.iter().zip(want) {
                // f32 sin/cos of arguments up to 1000 (ulp 6e-5) differ between libms at ~1e-5.
                assert!((g - w).abs() < 3e-5, "{got:?} vs {want:?}");
            }
        }
    }
}
