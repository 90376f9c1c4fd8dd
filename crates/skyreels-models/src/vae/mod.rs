//! `AutoencoderKLHunyuanVideo`: the causal 3D VAE of HunyuanVideo / SkyReels V1.
//!
//! Module and field names follow diffusers' `autoencoder_kl_hunyuan_video.py`. This file holds the
//! encoder, the decoder and the public API; the blocks they are built of are in `blocks`, and the
//! tiled encode and decode in `tiling`, which reproduces the reference's algorithms exactly (tile
//! sizes, strides, blend formulas and the in-place blend order), because tiling changes the
//! GroupNorm statistics and so the output.
//! <https://github.com/huggingface/diffusers/blob/58eb52c0803ea9af3abec60841c2a093bdf1f951/src/diffusers/models/autoencoders/autoencoder_kl_hunyuan_video.py>

mod blocks;
mod config;
mod tiling;

pub use config::VaeConfig;
pub use tiling::Tiling;

use crate::layers::conv3d::{Conv3d, Conv3dConfig};
use crate::layers::GroupNorm;
use blocks::{resnet_stack, CausalConv3d, DownBlock, MidBlock, UpBlock, EPS};
use candle_core::{bail, Module, Result, Tensor};
use candle_nn::VarBuilder;

/// Whether block `i` of `n` changes the spatial / temporal resolution (reference rule for a
/// temporal compression of 4: time changes in the two blocks before the last).
fn resamples(cfg: &VaeConfig, i: usize) -> (bool, bool) {
    let n = cfg.block_out_channels.len();
    let spatial = i < cfg.spatial_stages();
    let time = i + 3 >= n && i + 1 != n; // i >= n - 1 - log2(4), not the final block
    (spatial, time)
}

/// `HunyuanVideoEncoder3D`.
///
/// <https://github.com/huggingface/diffusers/blob/58eb52c0803ea9af3abec60841c2a093bdf1f951/src/diffusers/models/autoencoders/autoencoder_kl_hunyuan_video.py#L410-L515>
#[derive(Debug, Clone)]
pub struct Encoder {
    conv_in: CausalConv3d,
    down_blocks: Vec<DownBlock>,
    mid_block: MidBlock,
    conv_norm_out: GroupNorm,
    conv_out: CausalConv3d,
}

impl Encoder {
    fn new(cfg: &VaeConfig, vb: VarBuilder) -> Result<Self> {
        let boc = &cfg.block_out_channels;
        let g = cfg.norm_num_groups;
        let mut down_blocks = Vec::with_capacity(boc.len());
        let mut cin = boc[0];
        for (i, &cout) in boc.iter().enumerate() {
            let vbi = vb.pp("down_blocks").pp(i);
            let resnets = resnet_stack(cfg.layers_per_block, cin, cout, g, vbi.pp("resnets"))?;
            let (spatial, time) = resamples(cfg, i);
            let downsampler = if spatial || time {
                let s = if spatial { 2 } else { 1 };
                let stride = (if time { 2 } else { 1 }, s, s);
                Some(CausalConv3d::new(
                    cout,
                    cout,
                    3,
                    stride,
                    vbi.pp("downsamplers.0.conv"),
                )?)
            } else {
                None
            };
            down_blocks.push(DownBlock {
                resnets,
                downsampler,
            });
            cin = cout;
        }
        let top = *boc.last().expect("validated non-empty");
        Ok(Self {
            conv_in: CausalConv3d::new(cfg.in_channels, boc[0], 3, (1, 1, 1), vb.pp("conv_in"))?,
            down_blocks,
            mid_block: MidBlock::new(top, g, cfg.mid_block_add_attention, vb.pp("mid_block"))?,
            conv_norm_out: GroupNorm::new(g, top, EPS, vb.pp("conv_norm_out"))?,
            conv_out: CausalConv3d::new(
                top,
                2 * cfg.latent_channels,
                3,
                (1, 1, 1),
                vb.pp("conv_out"),
            )?,
        })
    }
}

impl Module for Encoder {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = self.conv_in.forward(x)?;
        for block in &self.down_blocks {
            for r in &block.resnets {
                h = r.forward(&h)?;
            }
            if let Some(d) = &block.downsampler {
                h = d.forward(&h)?;
            }
        }
        let h = self.mid_block.forward(&h)?;
        self.conv_out.forward(&self.conv_norm_out.forward_silu(&h)?)
    }
}

/// `HunyuanVideoDecoder3D`.
///
/// <https://github.com/huggingface/diffusers/blob/58eb52c0803ea9af3abec60841c2a093bdf1f951/src/diffusers/models/autoencoders/autoencoder_kl_hunyuan_video.py#L518-L622>
#[derive(Debug, Clone)]
pub struct Decoder {
    conv_in: CausalConv3d,
    mid_block: MidBlock,
    up_blocks: Vec<UpBlock>,
    conv_norm_out: GroupNorm,
    conv_out: CausalConv3d,
}

impl Decoder {
    fn new(cfg: &VaeConfig, vb: VarBuilder) -> Result<Self> {
        let rev: Vec<usize> = cfg.block_out_channels.iter().rev().copied().collect();
        let g = cfg.norm_num_groups;
        let mut up_blocks = Vec::with_capacity(rev.len());
        let mut cin = rev[0];
        for (i, &cout) in rev.iter().enumerate() {
            let vbi = vb.pp("up_blocks").pp(i);
            let resnets = resnet_stack(cfg.layers_per_block + 1, cin, cout, g, vbi.pp("resnets"))?;
            let (spatial, time) = resamples(cfg, i);
            let upsampler = if spatial || time {
                let s = if spatial { 2 } else { 1 };
                let factors = (if time { 2 } else { 1 }, s, s);
                let conv =
                    CausalConv3d::new(cout, cout, 3, (1, 1, 1), vbi.pp("upsamplers.0.conv"))?;
                Some((conv, factors))
            } else {
                None
            };
            up_blocks.push(UpBlock { resnets, upsampler });
            cin = cout;
        }
        let bottom = cfg.block_out_channels[0];
        Ok(Self {
            conv_in: CausalConv3d::new(
                cfg.latent_channels,
                rev[0],
                3,
                (1, 1, 1),
                vb.pp("conv_in"),
            )?,
            mid_block: MidBlock::new(rev[0], g, cfg.mid_block_add_attention, vb.pp("mid_block"))?,
            up_blocks,
            conv_norm_out: GroupNorm::new(g, bottom, EPS, vb.pp("conv_norm_out"))?,
            conv_out: CausalConv3d::new(bottom, cfg.out_channels, 3, (1, 1, 1), vb.pp("conv_out"))?,
        })
    }
}

impl Module for Decoder {
    fn forward(&self, z: &Tensor) -> Result<Tensor> {
        let mut h = self.mid_block.forward(&self.conv_in.forward(z)?)?;
        for block in &self.up_blocks {
            h = block.forward(&h)?;
        }
        self.conv_out.forward(&self.conv_norm_out.forward_silu(&h)?)
    }
}

/// The VAE posterior: mean and log-variance (clamped to [-30, 20]) per latent element.
#[derive(Debug, Clone)]
pub struct DiagonalGaussian {
    pub mean: Tensor,
    pub logvar: Tensor,
}

impl DiagonalGaussian {
    fn new(moments: &Tensor) -> Result<Self> {
        let c = moments.dim(1)? / 2;
        Ok(Self {
            mean: moments.narrow(1, 0, c)?,
            logvar: moments.narrow(1, c, c)?.clamp(-30f32, 20f32)?,
        })
    }

    /// The mode (= mean), which SkyReels conditioning uses.
    pub fn mode(&self) -> &Tensor {
        &self.mean
    }

    /// mean + exp(logvar / 2) · noise, with noise N(0, 1) of the mean's shape.
    pub fn sample(&self, noise: &Tensor) -> Result<Tensor> {
        &self.mean + (self.logvar.affine(0.5, 0.0)?.exp()? * noise)?
    }
}

/// `AutoencoderKLHunyuanVideo`.
///
/// <https://github.com/huggingface/diffusers/blob/58eb52c0803ea9af3abec60841c2a093bdf1f951/src/diffusers/models/autoencoders/autoencoder_kl_hunyuan_video.py#L625-L1080>
#[derive(Debug, Clone)]
pub struct AutoencoderKLHunyuanVideo {
    encoder: Encoder,
    decoder: Decoder,
    quant_conv: Conv3d,
    post_quant_conv: Conv3d,
    cfg: VaeConfig,
    tiling: Tiling,
}

impl AutoencoderKLHunyuanVideo {
    pub fn new(cfg: &VaeConfig, vb: VarBuilder) -> Result<Self> {
        cfg.validate()?;
        let l = cfg.latent_channels;
        Ok(Self {
            encoder: Encoder::new(cfg, vb.pp("encoder"))?,
            decoder: Decoder::new(cfg, vb.pp("decoder"))?,
            quant_conv: Conv3d::new(
                2 * l,
                2 * l,
                (1, 1, 1),
                Conv3dConfig::default(),
                vb.pp("quant_conv"),
            )?,
            post_quant_conv: Conv3d::new(
                l,
                l,
                (1, 1, 1),
                Conv3dConfig::default(),
                vb.pp("post_quant_conv"),
            )?,
            cfg: cfg.clone(),
            tiling: Tiling::default(),
        })
    }

    pub fn config(&self) -> &VaeConfig {
        &self.cfg
    }

    pub fn tiling(&self) -> Tiling {
        self.tiling
    }

    pub fn set_tiling(&mut self, tiling: Tiling) -> Result<()> {
        tiling.validate(&self.cfg)?;
        self.tiling = tiling;
        Ok(())
    }

    /// Encodes video (b, c, 4k+1 frames, h, w) in [-1, 1] (h, w multiples of the spatial
    /// compression) to the latent posterior over (b, latent, k+1, h/8, w/8).
    pub fn encode(&self, x: &Tensor) -> Result<DiagonalGaussian> {
        let (_, c, f, h, w) = x.dims5()?;
        let (s, t) = (
            self.cfg.spatial_compression_ratio,
            self.cfg.temporal_compression_ratio,
        );
        if c != self.cfg.in_channels {
            bail!(
                "vae encode: input {:?} has {c} channels, expected {}",
                x.shape(),
                self.cfg.in_channels
            )
        }
        if f == 0 || (f - 1) % t != 0 {
            bail!("vae encode: {f} frames; the frame count must be {t}k+1 (1, 5, 9, ..., 97)")
        }
        if h == 0 || w == 0 || h % s != 0 || w % s != 0 {
            bail!("vae encode: frame size {h}x{w} must be a positive multiple of {s}")
        }
        DiagonalGaussian::new(&self.encode_moments(x)?)
    }

    fn encode_moments(&self, x: &Tensor) -> Result<Tensor> {
        let tl = &self.tiling;
        if tl.temporally_tiled(x.dim(2)?, 1) {
            let t = self.cfg.temporal_compression_ratio;
            return tl.temporal_tiled_encode(x, t, |clip| self.encode_clip(clip));
        }
        self.encode_clip(x)
    }

    /// `quant_conv(encoder(x))`, spatially tiled when a frame exceeds a tile.
    fn encode_clip(&self, x: &Tensor) -> Result<Tensor> {
        let (_, _, _, h, w) = x.dims5()?;
        let encode = |x: &Tensor| self.quant_conv.forward(&self.encoder.forward(x)?);
        if self.tiling.spatially_tiled(h, w, 1) {
            let s = self.cfg.spatial_compression_ratio;
            self.tiling.tiled_encode(x, s, encode)
        } else {
            encode(x)
        }
    }

    /// Decodes latents (b, latent, k+1, h, w) (already divided by the scaling factor) to video
    /// (b, out, 4k+1, 8h, 8w), roughly in [-1, 1].
    pub fn decode(&self, z: &Tensor) -> Result<Tensor> {
        self.decode_checked(z, &mut || Ok(()))
    }

    /// [`Self::decode`], asking `go_on()` before each tile (and before an untiled decode);
    /// `None` as soon as it answers false, so a cancel lands within one tile.
    pub fn decode_until(
        &self,
        z: &Tensor,
        go_on: &mut dyn FnMut() -> bool,
    ) -> Result<Option<Tensor>> {
        let mut stopped = false;
        let decoded = self.decode_checked(z, &mut || {
            if go_on() {
                Ok(())
            } else {
                stopped = true;
                bail!("vae decode: stopped")
            }
        });
        if stopped {
            return Ok(None);
        }
        decoded.map(Some)
    }

    /// The decode, calling `check` before each tile; its error ends the decode.
    fn decode_checked(&self, z: &Tensor, check: &mut dyn FnMut() -> Result<()>) -> Result<Tensor> {
        let (_, c, _, _, _) = z.dims5()?;
        if c != self.cfg.latent_channels {
            bail!(
                "vae decode: latents {:?} have {c} channels, expected {}",
                z.shape(),
                self.cfg.latent_channels
            )
        }
        let t = self.cfg.temporal_compression_ratio;
        let tl = &self.tiling;
        if tl.temporally_tiled(z.dim(2)?, t) {
            return tl.temporal_tiled_decode(z, t, |clip| self.decode_clip(clip, &mut *check));
        }
        self.decode_clip(z, check)
    }

    /// `decoder(post_quant_conv(z))`, spatially tiled when a frame exceeds a tile; `check` before
    /// each tile (or the whole frame).
    fn decode_clip(&self, z: &Tensor, check: &mut dyn FnMut() -> Result<()>) -> Result<Tensor> {
        let (_, _, _, h, w) = z.dims5()?;
        let s = self.cfg.spatial_compression_ratio;
        let mut decode = |z: &Tensor| {
            check()?;
            self.decoder.forward(&self.post_quant_conv.forward(z)?)
        };
        if self.tiling.spatially_tiled(h, w, s) {
            self.tiling.tiled_decode(z, s, decode)
        } else {
            decode(z)
        }
    }
}
