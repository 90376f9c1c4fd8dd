//! The forward pass: embed -> block loop -> head.
//!
//! - [`HunyuanVideoTransformer3DModel::embed`] (`embed.rs`): the latents as image tokens, the
//!   conditioning vector, RoPE tables;
//! - [`BlockLoop`] (`blocks.rs`): the refined text, then the double and single blocks; a step
//!   cache ([`StepCache::around`], `cache.rs`) runs it, runs part of it or skips it;
//! - [`HunyuanVideoTransformer3DModel::head`] (`head.rs`): the output projection and unpatchify.
//!
//! Ulysses sequence parallelism (`ulysses.rs`) wraps the same stages: it slices the image tokens
//! after `embed` and gathers the patches before unpatchify.

use super::blocks::{AttnCtx, BlockLoop};
use super::{HunyuanVideoTransformer3DModel, StepCache, TransformerInputs};
use candle_core::{Result, Tensor};

impl HunyuanVideoTransformer3DModel {
    /// Predicts the flow-matching velocity, (b, out_channels, t, h, w) in the model dtype.
    pub fn forward(&self, inp: &TransformerInputs) -> Result<Tensor> {
        self.forward_cached(inp, None)
    }

    /// [`Self::forward`] through a step cache (one per CFG branch, across one generation's
    /// steps): the blocks may be skipped in favour of a stored residual (see [`StepCache`]).
    pub fn forward_cached(
        &self,
        inp: &TransformerInputs,
        cache: Option<&mut StepCache>,
    ) -> Result<Tensor> {
        let (shapes, text_mask) = inp.check(&self.cfg)?;
        let e = self.embed(inp, &shapes)?;
        let ctx = AttnCtx::new(text_mask, shapes.n_img(), self.attention_budget, None);
        let blocks = BlockLoop::new(self, inp, &e.temb, e.rope, ctx);
        let x = blocks.run_with(e.x.contiguous()?, cache)?;
        let y = self.head(&x, &e.temb)?;
        self.unpatchify(&y, &shapes)
    }
}
