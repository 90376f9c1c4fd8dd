//! The head, the last stage of the forward: `norm_out` and `proj_out` per image token, then the
//! patches back into a latent.

use super::blocks::modulation;
use super::inputs::Shapes;
use super::{HunyuanVideoTransformer3DModel, NORM_EPS};
use crate::layers::modulation::layer_norm_modulate;
use candle_core::{Module, Result, Tensor};

impl HunyuanVideoTransformer3DModel {
    /// (b, n, dim) image tokens -> (b, n, out_channels·pt·p·p) patches.
    pub(super) fn head(&self, x: &Tensor, temb: &Tensor) -> Result<Tensor> {
        // norm_out: (scale, shift), in that order
        let m = modulation(&self.norm_out, temb, 2)?;
        let y = layer_norm_modulate(x, &m[1], &m[0], NORM_EPS)?;
        self.proj_out.forward(&y)
    }

    /// The patches of every image token as a latent of `shapes`: (b, out_channels, t, h, w).
    pub(super) fn unpatchify(&self, y: &Tensor, shapes: &Shapes) -> Result<Tensor> {
        let (p, pt, oc) = (
            self.cfg.patch_size,
            self.cfg.patch_size_t,
            self.cfg.out_channels(),
        );
        let (b, (t, h, w), (gt, gh, gw)) = (shapes.batch, shapes.thw, shapes.grid);
        // (b, gt·gh·gw, oc·pt·p·p) -> (b, gt, gh, gw, oc, pt, p, p)
        let y = y.reshape(vec![b, gt, gh, gw, oc, pt, p, p])?;
        // -> (b, oc, gt, pt, gh, p, gw, p) -> (b, oc, t, h, w)
        y.permute(vec![0, 4, 1, 5, 2, 6, 3, 7])?
            .contiguous()?
            .reshape((b, oc, t, h, w))
    }
}
