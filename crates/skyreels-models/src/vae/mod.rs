//! `AutoencoderKLHunyuanVideo`: the causal 3D VAE of HunyuanVideo / SkyReels V1.
//!
//! Module and field names follow diffusers' `autoencoder_kl_hunyuan_video.py`. Tiled encode and
//! decode reproduce the reference's algorithms exactly (tile sizes, strides, blend formulas and
//! the in-place blend order), because tiling changes the GroupNorm statistics and so the output.

mod config;

pub use config::VaeConfig;

use crate::layers::GroupNorm;
use crate::layers::{
    attention,
    attention::default_score_budget,
    conv3d::{Conv3d, Conv3dConfig},
    linear::{linear, Linear},
};
use candle_core::{bail, Module, Result, Tensor};
use candle_nn::VarBuilder;

const EPS: f64 = 1e-6;

/// `HunyuanVideoCausalConv3d`: replicate padding (spatially both sides, temporally the past side
/// only), then a plain convolution.
#[derive(Debug, Clone)]
struct CausalConv3d {
    conv: Conv3d,
    /// (w, h, t_front) padding, in the reference's `time_causal_padding` order of kernel dims
    pad: (usize, usize, usize),
}

impl CausalConv3d {
    fn new(
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
#[derive(Debug, Clone)]
struct ResnetBlock {
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
#[derive(Debug, Clone)]
struct MidBlock {
    resnets: [ResnetBlock; 2],
    attention: Option<MidAttention>,
}

impl MidBlock {
    fn new(c: usize, groups: usize, add_attention: bool, vb: VarBuilder) -> Result<Self> {
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

/// Whether block `i` of `n` changes the spatial / temporal resolution (reference rule for a
/// temporal compression of 4: time changes in the two blocks before the last).
fn resamples(cfg: &VaeConfig, i: usize) -> (bool, bool) {
    let n = cfg.block_out_channels.len();
    let spatial = i < cfg.spatial_stages();
    let time = i + 3 >= n && i + 1 != n; // i >= n - 1 - log2(4), not the final block
    (spatial, time)
}

/// `n` resnets `resnets.{0..n}`, the first mapping `cin` to `cout` channels.
fn resnet_stack(
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
#[derive(Debug, Clone)]
struct DownBlock {
    resnets: Vec<ResnetBlock>,
    downsampler: Option<CausalConv3d>,
}

/// `HunyuanVideoUpBlock3D`.
#[derive(Debug, Clone)]
struct UpBlock {
    resnets: Vec<ResnetBlock>,
    /// (conv, (t, h, w) scale factors)
    upsampler: Option<(CausalConv3d, (usize, usize, usize))>,
}

impl UpBlock {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
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

/// `HunyuanVideoEncoder3D`.
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

/// Tiling settings (diffusers' attributes, in sample pixels / frames). The defaults are diffusers'
/// after `enable_tiling()`, which both the diffusers SkyReels example and the official code call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tiling {
    /// Spatial tiling when a frame exceeds a tile (`use_tiling`).
    pub spatial: bool,
    /// Temporal tiling when the clip exceeds a tile (`use_framewise_encoding` / `_decoding`).
    pub framewise: bool,
    pub tile_sample_min_height: usize,
    pub tile_sample_min_width: usize,
    pub tile_sample_min_num_frames: usize,
    pub tile_sample_stride_height: usize,
    pub tile_sample_stride_width: usize,
    pub tile_sample_stride_num_frames: usize,
}

impl Default for Tiling {
    fn default() -> Self {
        Self {
            spatial: true,
            framewise: true,
            tile_sample_min_height: 256,
            tile_sample_min_width: 256,
            tile_sample_min_num_frames: 16,
            tile_sample_stride_height: 192,
            tile_sample_stride_width: 192,
            tile_sample_stride_num_frames: 12,
        }
    }
}

impl Tiling {
    /// No tiling at all: whole-clip encode and decode (memory grows with the clip).
    pub fn off() -> Self {
        Self {
            spatial: false,
            framewise: false,
            ..Self::default()
        }
    }

    fn validate(&self, cfg: &VaeConfig) -> Result<()> {
        let (s, t) = (
            cfg.spatial_compression_ratio,
            cfg.temporal_compression_ratio,
        );
        let ok = self.tile_sample_stride_height > 0
            && self.tile_sample_stride_width > 0
            && self.tile_sample_stride_num_frames >= t
            && self.tile_sample_stride_height <= self.tile_sample_min_height
            && self.tile_sample_stride_width <= self.tile_sample_min_width
            && self.tile_sample_stride_num_frames <= self.tile_sample_min_num_frames
            && self.tile_sample_stride_height.is_multiple_of(s)
            && self.tile_sample_stride_width.is_multiple_of(s)
            && self.tile_sample_min_height.is_multiple_of(s)
            && self.tile_sample_min_width.is_multiple_of(s)
            && self.tile_sample_stride_num_frames.is_multiple_of(t)
            && self.tile_sample_min_num_frames.is_multiple_of(t);
        if !ok {
            bail!(
                "vae tiling {self:?}: strides must be positive, at most the tile, and multiples of the \
                 compression ({s} spatial, {t} temporal), as the tile sizes"
            )
        }
        Ok(())
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

/// Blends the last `extent` entries of `a` into the first of `b` along `dim`:
/// b[x] = a[len - extent + x]·(1 − x/extent) + b[x]·(x/extent), for x < extent (reference
/// `blend_v` / `blend_h` / `blend_t`, weights rounded to the tensor dtype as PyTorch does).
fn blend(a: &Tensor, b: &Tensor, extent: usize, dim: usize) -> Result<Tensor> {
    let (la, lb) = (a.dim(dim)?, b.dim(dim)?);
    let e = extent.min(la).min(lb);
    if e == 0 {
        return Ok(b.clone());
    }
    let mut shape = vec![1usize; b.rank()];
    shape[dim] = e;
    let wb: Vec<f64> = (0..e).map(|x| x as f64 / e as f64).collect();
    let wa: Vec<f64> = wb.iter().map(|w| 1.0 - w).collect();
    let wa = Tensor::new(wa, b.device())?
        .to_dtype(b.dtype())?
        .reshape(shape.clone())?;
    let wb = Tensor::new(wb, b.device())?
        .to_dtype(b.dtype())?
        .reshape(shape)?;
    let head = (a.narrow(dim, la - e, e)?.broadcast_mul(&wa)?
        + b.narrow(dim, 0, e)?.broadcast_mul(&wb)?)?;
    if e == lb {
        Ok(head)
    } else {
        Tensor::cat(&[head, b.narrow(dim, e, lb - e)?], dim)
    }
}

/// Blends a grid of tiles in the reference's order (rows top to bottom, columns left to right,
/// each tile first with the (already blended) tile above, then with the one to its left), keeps
/// `keep` rows/columns of each and concatenates; dims 3 and 4 are height and width.
fn merge_tiles(
    mut rows: Vec<Vec<Tensor>>,
    blend_hw: (usize, usize),
    keep_hw: (usize, usize),
) -> Result<Tensor> {
    for i in 0..rows.len() {
        for j in 0..rows[i].len() {
            let mut tile = rows[i][j].clone();
            if i > 0 {
                tile = blend(&rows[i - 1][j], &tile, blend_hw.0, 3)?;
            }
            if j > 0 {
                tile = blend(&rows[i][j - 1], &tile, blend_hw.1, 4)?;
            }
            rows[i][j] = tile;
        }
    }
    let rows = rows
        .iter()
        .map(|row| {
            let kept = row
                .iter()
                .map(|t| {
                    let (h, w) = (t.dim(3)?, t.dim(4)?);
                    t.narrow(3, 0, keep_hw.0.min(h))?
                        .narrow(4, 0, keep_hw.1.min(w))
                })
                .collect::<Result<Vec<_>>>()?;
            Tensor::cat(&kept, 4)
        })
        .collect::<Result<Vec<_>>>()?;
    Tensor::cat(&rows, 3)
}

/// Blends consecutive temporal tiles in order (each with the already blended previous one) and
/// keeps `first_keep` entries of the first tile and `keep` of the others.
fn merge_temporal(
    mut tiles: Vec<Tensor>,
    blend_extent: usize,
    first_keep: usize,
    keep: usize,
) -> Result<Tensor> {
    for i in 1..tiles.len() {
        tiles[i] = blend(&tiles[i - 1], &tiles[i], blend_extent, 2)?;
    }
    let kept = tiles
        .iter()
        .enumerate()
        .filter(|(_, t)| t.dim(2).map(|n| n > 0).unwrap_or(false))
        .map(|(i, t)| {
            let k = if i == 0 { first_keep } else { keep };
            t.narrow(2, 0, k.min(t.dim(2)?))
        })
        .collect::<Result<Vec<_>>>()?;
    Tensor::cat(&kept, 2)
}

/// `run` on overlapping tiles of x over dims 3 and 4 (tiles of `min`, every `stride`; edge tiles
/// are smaller), as rows of columns.
fn tile_grid(
    x: &Tensor,
    min: (usize, usize),
    stride: (usize, usize),
    mut run: impl FnMut(&Tensor) -> Result<Tensor>,
) -> Result<Vec<Vec<Tensor>>> {
    let (_, _, _, h, w) = x.dims5()?;
    let mut rows = Vec::new();
    for i in (0..h).step_by(stride.0) {
        let mut row = Vec::new();
        for j in (0..w).step_by(stride.1) {
            row.push(run(&x.narrow(3, i, min.0.min(h - i))?.narrow(
                4,
                j,
                min.1.min(w - j),
            )?)?);
        }
        rows.push(row);
    }
    Ok(rows)
}

/// `run` on windows of `window` entries of x every `stride` along dim 2; every window but the
/// first loses its first output frame (the one it shares with the previous window). A one-entry
/// window past the first (only ever the last) maps to one frame, which is dropped: it is skipped.
fn temporal_windows(
    x: &Tensor,
    window: usize,
    stride: usize,
    mut run: impl FnMut(&Tensor) -> Result<Tensor>,
) -> Result<Vec<Tensor>> {
    let f = x.dim(2)?;
    let mut tiles = Vec::new();
    for i in (0..f).step_by(stride) {
        let n = window.min(f - i);
        if i > 0 && n == 1 {
            continue;
        }
        let out = run(&x.narrow(2, i, n)?)?;
        let k = out.dim(2)?;
        tiles.push(if i > 0 { out.narrow(2, 1, k - 1)? } else { out });
    }
    Ok(tiles)
}

/// `AutoencoderKLHunyuanVideo`.
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
        if tl.framewise && x.dim(2)? > tl.tile_sample_min_num_frames {
            return self.temporal_tiled_encode(x);
        }
        self.encode_clip(x)
    }

    /// Whether frames of h × w (in units of `unit` pixels: 1 for samples, the spatial compression
    /// for latents) exceed a spatial tile, so that spatial tiling applies.
    fn spatially_tiled(&self, h: usize, w: usize, unit: usize) -> bool {
        let tl = &self.tiling;
        tl.spatial && (w > tl.tile_sample_min_width / unit || h > tl.tile_sample_min_height / unit)
    }

    /// `quant_conv(encoder(x))`, spatially tiled when a frame exceeds a tile.
    fn encode_clip(&self, x: &Tensor) -> Result<Tensor> {
        let (_, _, _, h, w) = x.dims5()?;
        if self.spatially_tiled(h, w, 1) {
            self.tiled_encode(x)
        } else {
            self.quant_conv.forward(&self.encoder.forward(x)?)
        }
    }

    fn tiled_encode(&self, x: &Tensor) -> Result<Tensor> {
        let (_, _, _, h, w) = x.dims5()?;
        let s = self.cfg.spatial_compression_ratio;
        let tl = &self.tiling;
        let (min_h, min_w) = (tl.tile_sample_min_height, tl.tile_sample_min_width);
        let (st_h, st_w) = (tl.tile_sample_stride_height, tl.tile_sample_stride_width);
        let rows = tile_grid(x, (min_h, min_w), (st_h, st_w), |tile| {
            self.quant_conv.forward(&self.encoder.forward(tile)?)
        })?;
        let blend = ((min_h - st_h) / s, (min_w - st_w) / s);
        let merged = merge_tiles(rows, blend, (st_h / s, st_w / s))?;
        merged.narrow(3, 0, h / s)?.narrow(4, 0, w / s)
    }

    fn temporal_tiled_encode(&self, x: &Tensor) -> Result<Tensor> {
        let t = self.cfg.temporal_compression_ratio;
        let tl = &self.tiling;
        let latent_frames = (x.dim(2)? - 1) / t + 1;
        let (min_lat, stride_lat) = (
            tl.tile_sample_min_num_frames / t,
            tl.tile_sample_stride_num_frames / t,
        );
        let tiles = temporal_windows(
            x,
            tl.tile_sample_min_num_frames + 1,
            tl.tile_sample_stride_num_frames,
            |tile| self.encode_clip(tile),
        )?;
        let merged = merge_temporal(tiles, min_lat - stride_lat, stride_lat + 1, stride_lat)?;
        merged.narrow(2, 0, latent_frames.min(merged.dim(2)?))
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
        if tl.framewise && z.dim(2)? > tl.tile_sample_min_num_frames / t {
            return self.temporal_tiled_decode(z, check);
        }
        self.decode_clip(z, check)
    }

    /// `decoder(post_quant_conv(z))`, spatially tiled when a frame exceeds a tile.
    fn decode_clip(&self, z: &Tensor, check: &mut dyn FnMut() -> Result<()>) -> Result<Tensor> {
        let (_, _, _, h, w) = z.dims5()?;
        if self.spatially_tiled(h, w, self.cfg.spatial_compression_ratio) {
            self.tiled_decode(z, check)
        } else {
            check()?;
            self.decoder.forward(&self.post_quant_conv.forward(z)?)
        }
    }

    fn tiled_decode(&self, z: &Tensor, check: &mut dyn FnMut() -> Result<()>) -> Result<Tensor> {
        let (_, _, _, h, w) = z.dims5()?;
        let s = self.cfg.spatial_compression_ratio;
        let tl = &self.tiling;
        let min = (tl.tile_sample_min_height / s, tl.tile_sample_min_width / s);
        let stride = (
            tl.tile_sample_stride_height / s,
            tl.tile_sample_stride_width / s,
        );
        let rows = tile_grid(z, min, stride, |tile| {
            check()?;
            self.decoder.forward(&self.post_quant_conv.forward(tile)?)
        })?;
        let blend = (
            tl.tile_sample_min_height - tl.tile_sample_stride_height,
            tl.tile_sample_min_width - tl.tile_sample_stride_width,
        );
        let keep = (tl.tile_sample_stride_height, tl.tile_sample_stride_width);
        merge_tiles(rows, blend, keep)?
            .narrow(3, 0, h * s)?
            .narrow(4, 0, w * s)
    }

    fn temporal_tiled_decode(
        &self,
        z: &Tensor,
        check: &mut dyn FnMut() -> Result<()>,
    ) -> Result<Tensor> {
        let t = self.cfg.temporal_compression_ratio;
        let tl = &self.tiling;
        let frames = (z.dim(2)? - 1) * t + 1;
        let tiles = temporal_windows(
            z,
            tl.tile_sample_min_num_frames / t + 1,
            tl.tile_sample_stride_num_frames / t,
            |tile| self.decode_clip(tile, &mut *check),
        )?;
        let blend = tl.tile_sample_min_num_frames - tl.tile_sample_stride_num_frames;
        let stride = tl.tile_sample_stride_num_frames;
        let merged = merge_temporal(tiles, blend, stride + 1, stride)?;
        merged.narrow(2, 0, frames.min(merged.dim(2)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    #[test]
    fn blend_weights_follow_the_reference() {
        // a = 10 everywhere, b = 0: b[x] = 10·(1 − x/4) for x < 4, the rest of b untouched
        let dev = Device::Cpu;
        let a = Tensor::full(10f32, (1, 1, 6, 1, 1), &dev).unwrap();
        let b = Tensor::zeros((1, 1, 5, 1, 1), DType::F32, &dev).unwrap();
        let out = blend(&a, &b, 4, 2)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(out, vec![10.0, 7.5, 5.0, 2.5, 0.0]);
        // the extent shrinks to the shorter tile
        let out = blend(&a, &b.narrow(2, 0, 2).unwrap(), 4, 2).unwrap();
        assert_eq!(
            out.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            vec![10.0, 5.0]
        );
    }

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
