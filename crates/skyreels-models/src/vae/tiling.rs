//! Tiled encode and decode, as diffusers' `AutoencoderKLHunyuanVideo` runs them after
//! `enable_tiling()`: the same tiles, strides, blend formulas and in-place blend order. A tile's
//! GroupNorm statistics are its own, so tiling changes the output and only the reference's tiling
//! reproduces it.
//!
//! Settings ([`Tiling`]) are in sample pixels and frames; a latent is `s` pixels across (the
//! spatial compression, 8) and `t` frames long (the temporal compression, 4). The invariants:
//!
//! - **Whole latents.** `validate` keeps every stride positive and at most its tile, tiles and
//!   strides multiples of `s` (spatially) or `t` (in time), and the time stride at least `t`, so
//!   tile origins, sizes and overlaps are whole latents on both sides of the model.
//! - **Spatial tiles** (`tile_grid`, then `merge_tiles`; samples when encoding, latents when
//!   decoding): tiles of `min` start every `stride` rows and columns from 0 while inside the frame,
//!   the last ones cut at the frame's edge, and each runs alone. Outputs of neighbours overlap by
//!   `min − stride` (in output units) at the same positions of the frame: a cut tile ends at the
//!   edge, and so does any tile after it, which is then shorter than the overlap, and the blend
//!   shrinks to it. Each overlap is blended linearly into the later tile (`blend`: rows top to
//!   bottom, each tile first with the blended one above, then with its left neighbour); each tile
//!   keeps its first `stride` rows and columns, so the kept parts partition the output, cut to the
//!   frame's size at the end.
//! - **Temporal windows** (`temporal_windows`, then `merge_temporal`): windows of `min + 1` frames
//!   (`min / t + 1` latent frames) every `stride`, so consecutive windows share their border frame,
//!   whose output each window but the first drops (its causal first frame; a one-frame window,
//!   only ever the last, is skipped). Consecutive outputs then overlap by `min − stride` output
//!   frames, blended into the later one; the first keeps `stride + 1` frames and the others
//!   `stride`, a partition of the clip, cut to its length at the end.
//!
//! The tests run the tiling around stand-ins for the model that carry each sample's position
//! (subsampling for the encoder, nearest upsampling for the decoder): the tiled output must be
//! exactly the untiled one.

use super::VaeConfig;
use candle_core::{bail, Result, Tensor};

/// Tiling settings (diffusers' attributes, in sample pixels / frames). The defaults are diffusers'
/// after `enable_tiling()`, which both the diffusers SkyReels example and the official code call.
///
/// <https://github.com/huggingface/diffusers/blob/58eb52c0803ea9af3abec60841c2a093bdf1f951/src/diffusers/models/autoencoders/autoencoder_kl_hunyuan_video.py#L724-L762>
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

    pub(super) fn validate(&self, cfg: &VaeConfig) -> Result<()> {
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

    /// Whether frames of h × w (in units of `unit` pixels: 1 for samples, the spatial compression
    /// for latents) exceed a spatial tile, so that spatial tiling applies.
    pub(super) fn spatially_tiled(&self, h: usize, w: usize, unit: usize) -> bool {
        self.spatial
            && (w > self.tile_sample_min_width / unit || h > self.tile_sample_min_height / unit)
    }

    /// Whether a clip of `frames` (in units of `unit` frames: 1 for samples, the temporal
    /// compression for latents) exceeds a temporal tile, so that temporal tiling applies.
    pub(super) fn temporally_tiled(&self, frames: usize, unit: usize) -> bool {
        self.framewise && frames > self.tile_sample_min_num_frames / unit
    }

    /// diffusers' `tiled_encode`: `encode` (samples -> moments, `s` times smaller spatially) on
    /// each spatial tile of x, the tiles blended and cut to the frame.
    ///
    /// <https://github.com/huggingface/diffusers/blob/58eb52c0803ea9af3abec60841c2a093bdf1f951/src/diffusers/models/autoencoders/autoencoder_kl_hunyuan_video.py#L875-L923>
    pub(super) fn tiled_encode(
        &self,
        x: &Tensor,
        s: usize,
        encode: impl FnMut(&Tensor) -> Result<Tensor>,
    ) -> Result<Tensor> {
        let (_, _, _, h, w) = x.dims5()?;
        let (min_h, min_w) = (self.tile_sample_min_height, self.tile_sample_min_width);
        let (st_h, st_w) = (
            self.tile_sample_stride_height,
            self.tile_sample_stride_width,
        );
        let rows = tile_grid(x, (min_h, min_w), (st_h, st_w), encode)?;
        let blend = ((min_h - st_h) / s, (min_w - st_w) / s);
        let merged = merge_tiles(rows, blend, (st_h / s, st_w / s))?;
        merged.narrow(3, 0, h / s)?.narrow(4, 0, w / s)
    }

    /// diffusers' `_temporal_tiled_encode`: `encode_clip` (4k+1 frames -> k+1 latent frames, for
    /// `t` = 4) on each temporal window of x, the windows blended and cut to the clip.
    ///
    /// <https://github.com/huggingface/diffusers/blob/58eb52c0803ea9af3abec60841c2a093bdf1f951/src/diffusers/models/autoencoders/autoencoder_kl_hunyuan_video.py#L983-L1012>
    pub(super) fn temporal_tiled_encode(
        &self,
        x: &Tensor,
        t: usize,
        encode_clip: impl FnMut(&Tensor) -> Result<Tensor>,
    ) -> Result<Tensor> {
        let latent_frames = (x.dim(2)? - 1) / t + 1;
        let (min_lat, stride_lat) = (
            self.tile_sample_min_num_frames / t,
            self.tile_sample_stride_num_frames / t,
        );
        let tiles = temporal_windows(
            x,
            self.tile_sample_min_num_frames + 1,
            self.tile_sample_stride_num_frames,
            encode_clip,
        )?;
        let merged = merge_temporal(tiles, min_lat - stride_lat, stride_lat + 1, stride_lat)?;
        merged.narrow(2, 0, latent_frames.min(merged.dim(2)?))
    }

    /// diffusers' `tiled_decode`: `decode` (latents -> samples, `s` times larger spatially) on
    /// each spatial tile of z, the tiles blended and cut to the frame.
    ///
    /// <https://github.com/huggingface/diffusers/blob/58eb52c0803ea9af3abec60841c2a093bdf1f951/src/diffusers/models/autoencoders/autoencoder_kl_hunyuan_video.py#L925-L981>
    pub(super) fn tiled_decode(
        &self,
        z: &Tensor,
        s: usize,
        decode: impl FnMut(&Tensor) -> Result<Tensor>,
    ) -> Result<Tensor> {
        let (_, _, _, h, w) = z.dims5()?;
        let min = (
            self.tile_sample_min_height / s,
            self.tile_sample_min_width / s,
        );
        let stride = (
            self.tile_sample_stride_height / s,
            self.tile_sample_stride_width / s,
        );
        let rows = tile_grid(z, min, stride, decode)?;
        let blend = (
            self.tile_sample_min_height - self.tile_sample_stride_height,
            self.tile_sample_min_width - self.tile_sample_stride_width,
        );
        let keep = (
            self.tile_sample_stride_height,
            self.tile_sample_stride_width,
        );
        merge_tiles(rows, blend, keep)?
            .narrow(3, 0, h * s)?
            .narrow(4, 0, w * s)
    }

    /// diffusers' `_temporal_tiled_decode`: `decode_clip` (k+1 latent frames -> 4k+1 frames, for
    /// `t` = 4) on each temporal window of z, the windows blended and cut to the clip.
    ///
    /// <https://github.com/huggingface/diffusers/blob/58eb52c0803ea9af3abec60841c2a093bdf1f951/src/diffusers/models/autoencoders/autoencoder_kl_hunyuan_video.py#L1014-L1048>
    pub(super) fn temporal_tiled_decode(
        &self,
        z: &Tensor,
        t: usize,
        decode_clip: impl FnMut(&Tensor) -> Result<Tensor>,
    ) -> Result<Tensor> {
        let frames = (z.dim(2)? - 1) * t + 1;
        let tiles = temporal_windows(
            z,
            self.tile_sample_min_num_frames / t + 1,
            self.tile_sample_stride_num_frames / t,
            decode_clip,
        )?;
        let blend = self.tile_sample_min_num_frames - self.tile_sample_stride_num_frames;
        let stride = self.tile_sample_stride_num_frames;
        let merged = merge_temporal(tiles, blend, stride + 1, stride)?;
        merged.narrow(2, 0, frames.min(merged.dim(2)?))
    }
}

/// Blends the last `extent` entries of `a` into the first of `b` along `dim`:
/// b[x] = a[len - extent + x]·(1 − x/extent) + b[x]·(x/extent), for x < extent (reference
/// `blend_v` / `blend_h` / `blend_t`, weights rounded to the tensor dtype as PyTorch does).
///
/// <https://github.com/huggingface/diffusers/blob/58eb52c0803ea9af3abec60841c2a093bdf1f951/src/diffusers/models/autoencoders/autoencoder_kl_hunyuan_video.py#L851-L873>
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layers::conv3d::upsample_causal;
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

    /// Small tiles whose overlaps are powers of two (blend weights exact in f32): 32 pixels every
    /// 16 (4 latents every 2), 16 frames every 8 (4 latent frames every 2).
    fn small() -> Tiling {
        Tiling {
            spatial: true,
            framewise: true,
            tile_sample_min_height: 32,
            tile_sample_min_width: 32,
            tile_sample_min_num_frames: 16,
            tile_sample_stride_height: 16,
            tile_sample_stride_width: 16,
            tile_sample_stride_num_frames: 8,
        }
    }

    /// (1, 1, f, h, w) holding each entry's index, so every output value names its source.
    fn positions(f: usize, h: usize, w: usize) -> Tensor {
        Tensor::arange(0f32, (f * h * w) as f32, &Device::Cpu)
            .unwrap()
            .reshape((1, 1, f, h, w))
            .unwrap()
    }

    /// Every `step`-th entry along `dim`, from the first: the encoder's compression, as the
    /// positions of the samples a latent stands for.
    fn every(x: &Tensor, step: usize, dim: usize) -> Result<Tensor> {
        let idx: Vec<u32> = (0..x.dim(dim)?).step_by(step).map(|i| i as u32).collect();
        x.contiguous()?
            .index_select(&Tensor::new(idx, x.device())?, dim)
    }

    fn values(x: &Tensor) -> Vec<f32> {
        x.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    }

    /// Overlaps are powers of two and positions below 2^19, so blending two equal values gives
    /// the value back exactly, and any misplaced tile shows as a wrong position.
    #[test]
    fn spatial_tiles_reassemble_the_frame() {
        let s = 8;
        let cases = |tl: Tiling, sizes: &[usize]| {
            for &h in sizes {
                for &w in sizes {
                    // encode: samples (h, w) -> latents (h/s, w/s)
                    let x = positions(1, h, w);
                    let encode = |x: &Tensor| every(&every(x, s, 3)?, s, 4);
                    let got = tl.tiled_encode(&x, s, encode).unwrap();
                    let want = encode(&x).unwrap();
                    assert_eq!(got.dims(), want.dims(), "encode {h}x{w}");
                    assert_eq!(values(&got), values(&want), "encode {h}x{w}");
                    // decode: latents (h/s, w/s) -> samples (h, w)
                    let z = positions(1, h / s, w / s);
                    let decode = |z: &Tensor| upsample_causal(z, (1, s, s));
                    let got = tl.tiled_decode(&z, s, decode).unwrap();
                    let want = decode(&z).unwrap();
                    assert_eq!(got.dims(), want.dims(), "decode {h}x{w}");
                    assert_eq!(values(&got), values(&want), "decode {h}x{w}");
                }
            }
        };
        // one tile, a tile and a cut one, several with the last cut or exact
        cases(small(), &[8, 24, 32, 40, 48, 56, 72]);
        cases(Tiling::default(), &[200, 264, 456, 520]);
    }

    #[test]
    fn temporal_windows_reassemble_the_clip() {
        let t = 4;
        let cases = |tl: Tiling, latent_frames: &[usize]| {
            for &l in latent_frames {
                // encode: 4k+1 frames -> k+1 latent frames
                let x = positions(1 + t * (l - 1), 1, 2);
                let encode = |x: &Tensor| every(x, t, 2);
                let got = tl.temporal_tiled_encode(&x, t, encode).unwrap();
                let want = encode(&x).unwrap();
                assert_eq!(got.dims(), want.dims(), "encode {l} latent frames");
                assert_eq!(values(&got), values(&want), "encode {l} latent frames");
                // decode: k+1 latent frames -> 4k+1 frames (the first kept single)
                let z = positions(l, 1, 2);
                let decode = |z: &Tensor| upsample_causal(z, (t, 1, 1));
                let got = tl.temporal_tiled_decode(&z, t, decode).unwrap();
                let want = decode(&z).unwrap();
                assert_eq!(got.dims(), want.dims(), "decode {l} latent frames");
                assert_eq!(values(&got), values(&want), "decode {l} latent frames");
            }
        };
        // windows of 5 latent frames every 2 (small) or 4 every 3 (default): a single window,
        // windows ending exactly, and a last window of one latent frame (skipped)
        cases(small(), &(1..=12).collect::<Vec<_>>());
        cases(Tiling::default(), &[1, 5, 6, 7, 8, 11, 25]);
    }

    #[test]
    fn tiling_applies_past_a_tile_and_only_when_on() {
        let tl = Tiling::default();
        assert!(!tl.spatially_tiled(256, 256, 1));
        assert!(tl.spatially_tiled(256, 264, 1));
        assert!(!tl.spatially_tiled(32, 32, 8));
        assert!(tl.spatially_tiled(33, 32, 8));
        assert!(!tl.temporally_tiled(16, 1));
        assert!(tl.temporally_tiled(17, 1));
        assert!(!tl.temporally_tiled(4, 4));
        assert!(tl.temporally_tiled(5, 4));
        let off = Tiling::off();
        assert!(!off.spatially_tiled(1024, 1024, 1) && !off.temporally_tiled(97, 1));
    }

    #[test]
    fn validation_keeps_tiles_in_whole_latents() {
        let cfg: VaeConfig = serde_json::from_str("{}").unwrap();
        Tiling::default().validate(&cfg).unwrap();
        small().validate(&cfg).unwrap();
        Tiling::off().validate(&cfg).unwrap();
        let d = Tiling::default();
        for bad in [
            // no progress
            Tiling {
                tile_sample_stride_height: 0,
                ..d
            },
            // a gap between tiles
            Tiling {
                tile_sample_stride_width: 264,
                ..d
            },
            // tiles or strides that are not whole latents
            Tiling {
                tile_sample_min_height: 252,
                ..d
            },
            Tiling {
                tile_sample_stride_num_frames: 10,
                ..d
            },
            // a temporal stride below one latent frame
            Tiling {
                tile_sample_stride_num_frames: 0,
                ..d
            },
        ] {
            assert!(bad.validate(&cfg).is_err(), "{bad:?}");
        }
    }
}
