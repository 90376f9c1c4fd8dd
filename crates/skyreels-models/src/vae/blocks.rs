//! The VAE's building blocks, diffusers' `HunyuanVideo*` modules: the causal convolution, the
//! resnet block, the mid block with its block-causal attention, the down and up blocks (whose
//! samplers are causal convolutions: strided to go down, over a nearest upsampling to go up).

use crate::layers::GroupNorm;
use crate::layers::{
    attention,
    attention::default_score_budget,
    conv3d::{Conv3d, Conv3dConfig},
    linear::{linear, Linear},
};
use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

pub(super) const EPS: f64 = 1e-6;

/// `HunyuanVideoCausalConv3d`: replicate padding (spatially both sides, temporally the past side
/// only), then a plain convolution.
///
/// <https://github.com/huggingface/diffusers/blob/58eb52c0803ea9af3abec60841c2a093bdf1f951/src/diffusers/models/autoencoders/autoencoder_kl_hunyuan_video.py#L46-L76>
#[derive(Debug, Clone)]
pub(super) struct CausalConv3d {
    conv: Conv3d,
    /// (w, h, t_front) padding, in the reference's `time_causal_padding` order of kernel dims
    pad: (usize, usize, usize),
}

impl CausalConv3d {
    pub(super) fn new(
        cin: usize,
        cout: usize,
        k: usize,
        stride: (usize, usize, usize),
        vb: VarBuilder,
    ) -> Result<Self> {
        let conv = Conv3d::new(cin, cout, (k, k, k), Conv3dConfig { stride }, vb.pp("conv"))?;
        Ok(Self {
            conv,
            pad: (k / 2, k / 2, k - 1),
        })
    }
}

impl CausalConv3d {
    /// The convolution of x nearest-upsampled by `factors` (t, h, w), the first frame spatially
    /// only: the reference upsampler's interpolation and convolution in one.
    ///
    /// <https://github.com/huggingface/diffusers/blob/58eb52c0803ea9af3abec60841c2a093bdf1f951/src/diffusers/models/autoencoders/autoencoder_kl_hunyuan_video.py#L79-L118>
    fn forward_upsampled(&self, x: &Tensor, factors: (usize, usize, usize)) -> Result<Tensor> {
        let (pw, ph, pt) = self.pad;
        self.conv.forward_upsampled(x, factors, (pt, ph, pw))
    }
}

impl Module for CausalConv3d {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_upsampled(x, (1, 1, 1))
    }
}

/// `HunyuanVideoResnetBlockCausal3D`.
///
/// <https://github.com/huggingface/diffusers/blob/58eb52c0803ea9af3abec60841c2a093bdf1f951/src/diffusers/models/autoencoders/autoencoder_kl_hunyuan_video.py#L141-L184>
#[derive(Debug, Clone)]
pub(super) struct ResnetBlock {
    norm1: GroupNorm,
    conv1: CausalConv3d,
    norm2: GroupNorm,
    conv2: CausalConv3d,
    conv_shortcut: Option<CausalConv3d>,
}

impl ResnetBlock {
    fn new(cin: usize, cout: usize, groups: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            norm1: GroupNorm::new(groups, cin, EPS, vb.pp("norm1"))?,
            conv1: CausalConv3d::new(cin, cout, 3, (1, 1, 1), vb.pp("conv1"))?,
            norm2: GroupNorm::new(groups, cout, EPS, vb.pp("norm2"))?,
            conv2: CausalConv3d::new(cout, cout, 3, (1, 1, 1), vb.pp("conv2"))?,
            conv_shortcut: if cin != cout {
                Some(CausalConv3d::new(
                    cin,
                    cout,
                    1,
                    (1, 1, 1),
                    vb.pp("conv_shortcut"),
                )?)
            } else {
                None
            },
        })
    }
}

impl Module for ResnetBlock {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.conv1.forward(&self.norm1.forward_silu(x)?)?;
        let h = self.conv2.forward(&self.norm2.forward_silu(&h)?)?;
        match &self.conv_shortcut {
            Some(s) => h + s.forward(x)?,
            None => h + x,
        }
    }
}

/// The mid block's single-head self-attention with a block-causal frame mask
/// (`Attention(..., residual_connection=True, norm_num_groups=groups)`).
#[derive(Debug, Clone)]
struct MidAttention {
    group_norm: GroupNorm,
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
}

impl MidAttention {
    fn new(c: usize, groups: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            group_norm: GroupNorm::new(groups, c, EPS, vb.pp("group_norm"))?,
            to_q: linear(c, c, vb.pp("to_q"))?,
            to_k: linear(c, c, vb.pp("to_k"))?,
            to_v: linear(c, c, vb.pp("to_v"))?,
            to_out: linear(c, c, vb.pp("to_out.0"))?,
        })
    }
}

impl Module for MidAttention {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, t, h, w) = x.dims5()?;
        let hw = h * w;
        // (b, c, t, h, w) -> (b, t·h·w, c)
        let tokens = x.permute((0, 2, 3, 4, 1))?.reshape((b, t * hw, c))?;
        // GroupNorm over (b, c, n)
        let normed = self
            .group_norm
            .forward(&tokens.transpose(1, 2)?.contiguous()?)?;
        let normed = normed.transpose(1, 2)?.contiguous()?;
        // one head of dim c: (b, n, c) -> (b, n, 1, c)
        let q = self.to_q.forward(&normed)?.reshape((b, t * hw, 1, c))?;
        let k = self.to_k.forward(&normed)?.reshape((b, t * hw, 1, c))?;
        let v = self.to_v.forward(&normed)?.reshape((b, t * hw, 1, c))?;
        let a = block_causal_attention(&q, &k, &v, hw)?.reshape((b, t * hw, c))?;
        let out = (self.to_out.forward(&a)? + tokens)?;
        // (b, t·h·w, c) -> (b, c, t, h, w)
        out.reshape((b, t, h, w, c))?
            .permute((0, 4, 1, 2, 3))?
            .contiguous()
    }
}

/// Attention over (b, frames·hw, h, d) tokens where a query of frame f sees the keys of frames
/// 0..=f (the reference's additive mask: 0 where frame(key) <= frame(query), -inf elsewhere).
/// Those keys are a prefix, so each query frame runs exact attention over its prefix.
///
/// <https://github.com/huggingface/diffusers/blob/58eb52c0803ea9af3abec60841c2a093bdf1f951/src/diffusers/models/autoencoders/autoencoder_kl_hunyuan_video.py#L33-L43>
fn block_causal_attention(q: &Tensor, k: &Tensor, v: &Tensor, hw: usize) -> Result<Tensor> {
    let (b, n, _, _) = q.dims4()?;
    let frames = (0..n / hw)
        .map(|f| {
            let qf = q.narrow(1, f * hw, hw)?;
            attention(
                &qf,
                k,
                v,
                Some(&vec![(f + 1) * hw; b]),
                default_score_budget(q.device()),
            )
        })
        .collect::<Result<Vec<_>>>()?;
    Tensor::cat(&frames, 1)
}

/// `HunyuanVideoMidBlock3D` (one attention layer).
///
/// <https://github.com/huggingface/diffusers/blob/58eb52c0803ea9af3abec60841c2a093bdf1f951/src/diffusers/models/autoencoders/autoencoder_kl_hunyuan_video.py#L187-L281>
#[derive(Debug, Clone)]
pub(super) struct MidBlock {
    resnets: [ResnetBlock; 2],
    attention: Option<MidAttention>,
}

impl MidBlock {
    pub(super) fn new(
        c: usize,
        groups: usize,
        add_attention: bool,
        vb: VarBuilder,
    ) -> Result<Self> {
        let r = vb.pp("resnets");
        Ok(Self {
            resnets: [
                ResnetBlock::new(c, c, groups, r.pp(0))?,
                ResnetBlock::new(c, c, groups, r.pp(1))?,
            ],
            attention: if add_attention {
                Some(MidAttention::new(c, groups, vb.pp("attentions.0"))?)
            } else {
                None
            },
        })
    }
}

impl Module for MidBlock {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = self.resnets[0].forward(x)?;
        if let Some(a) = &self.attention {
            h = a.forward(&h)?;
        }
        self.resnets[1].forward(&h)
    }
}

/// `n` resnets `resnets.{0..n}`, the first mapping `cin` to `cout` channels.
pub(super) fn resnet_stack(
    n: usize,
    cin: usize,
    cout: usize,
    groups: usize,
    vb: VarBuilder,
) -> Result<Vec<ResnetBlock>> {
    (0..n)
        .map(|j| ResnetBlock::new(if j == 0 { cin } else { cout }, cout, groups, vb.pp(j)))
        .collect()
}

/// `HunyuanVideoDownBlock3D`.
///
/// <https://github.com/huggingface/diffusers/blob/58eb52c0803ea9af3abec60841c2a093bdf1f951/src/diffusers/models/autoencoders/autoencoder_kl_hunyuan_video.py#L284-L344>
#[derive(Debug, Clone)]
pub(super) struct DownBlock {
    pub(super) resnets: Vec<ResnetBlock>,
    pub(super) downsampler: Option<CausalConv3d>,
}

/// `HunyuanVideoUpBlock3D`.
///
/// <https://github.com/huggingface/diffusers/blob/58eb52c0803ea9af3abec60841c2a093bdf1f951/src/diffusers/models/autoencoders/autoencoder_kl_hunyuan_video.py#L347-L407>
#[derive(Debug, Clone)]
pub(super) struct UpBlock {
    pub(super) resnets: Vec<ResnetBlock>,
    /// (conv, (t, h, w) scale factors)
    pub(super) upsampler: Option<(CausalConv3d, (usize, usize, usize))>,
}

impl UpBlock {
    pub(super) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = x.clone();
        for r in &self.resnets {
            h = r.forward(&h)?;
        }
        match &self.upsampler {
            Some((conv, factors)) => conv.forward_upsampled(&h, *factors),
            None => Ok(h),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn causal_padding_replicates_the_past_only() {
        // a 3x3x3 kernel that sums the three temporal taps at the centre pixel
        let dev = Device::Cpu;
        let mut w = vec![0f32; 27];
        for kt in 0..3 {
            w[kt * 9 + 4] = 1.0;
        }
        let weight = Tensor::from_vec(w, (1, 1, 3, 3, 3), &dev).unwrap();
        let conv = CausalConv3d {
            conv: Conv3d::from_tensors(weight, None, Conv3dConfig::default()).unwrap(),
            pad: (1, 1, 2),
        };
        // frames with values 1, 2, 3 (constant per frame)
        let x = Tensor::new(&[1f32, 2., 3.], &dev)
            .unwrap()
            .reshape((1, 1, 3, 1, 1))
            .unwrap()
            .broadcast_as((1, 1, 3, 2, 2))
            .unwrap()
            .contiguous()
            .unwrap();
        let y = conv.forward(&x).unwrap();
        assert_eq!(y.dims(), &[1, 1, 3, 2, 2]);
        let y = y
            .narrow(3, 0, 1)
            .unwrap()
            .narrow(4, 0, 1)
            .unwrap()
            .flatten_all()
            .unwrap();
        // t=0 sees (1, 1, 1) [two replicated past frames]; t=1 sees (1, 1, 2); t=2 sees (1, 2, 3)
        assert_eq!(y.to_vec1::<f32>().unwrap(), vec![3.0, 4.0, 6.0]);
    }

    #[test]
    fn block_causal_attention_matches_the_dense_mask() {
        // 3 frames of 2 tokens, one head of 4; reference: softmax(q kᵀ/2 + mask) v with the
        // additive mask of `prepare_causal_attention_mask`
        let dev = Device::Cpu;
        let (frames, hw, d) = (3usize, 2usize, 4usize);
        let n = frames * hw;
        let q = Tensor::randn(0f32, 1., (1, n, 1, d), &dev).unwrap();
        let k = Tensor::randn(0f32, 1., (1, n, 1, d), &dev).unwrap();
        let v = Tensor::randn(0f32, 1., (1, n, 1, d), &dev).unwrap();
        let got = block_causal_attention(&q, &k, &v, hw)
            .unwrap()
            .reshape((n, d))
            .unwrap();
        let mask: Vec<f32> = (0..n * n)
            .map(|i| {
                if (i % n) / hw <= (i / n) / hw {
                    0.0
                } else {
                    f32::NEG_INFINITY
                }
            })
            .collect();
        let mask = Tensor::from_vec(mask, (n, n), &dev).unwrap();
        let [q2, k2, v2] = [&q, &k, &v].map(|t| t.reshape((n, d)).unwrap());
        let s = ((q2.matmul(&k2.t().unwrap()).unwrap() / 2.0).unwrap() + mask).unwrap();
        let want = candle_nn::ops::softmax_last_dim(&s)
            .unwrap()
            .matmul(&v2)
            .unwrap();
        let diff = (got - want).unwrap().abs().unwrap().max_all().unwrap();
        // identical math up to summation order
        assert!(diff.to_scalar::<f32>().unwrap() < 1e-6);
    }
}
