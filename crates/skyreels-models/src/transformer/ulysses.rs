//! Ulysses sequence parallelism around the block loop: each rank of a group takes its slice of
//! the image tokens after the embedding, runs the blocks and the head on it (trading token slices
//! for head slices around every attention), and the patches are gathered before they are
//! unpatchified.

use super::blocks::{AttnCtx, BlockLoop};
use super::{CacheSpec, HunyuanVideoTransformer3DModel, StepCache, TransformerInputs};
use crate::layers::attention;
use crate::parallel::Collective;
use candle_core::{bail, Result, Tensor};
use std::sync::Arc;

/// One rank's share of the clip: `n_local` consecutive image tokens (every text token).
#[derive(Clone)]
pub(super) struct SeqShard {
    group: Arc<dyn Collective>,
    n_local: usize,
}

impl SeqShard {
    /// This rank of `group` for a clip of `n_img` image tokens and a model of `heads` heads.
    fn new(group: Arc<dyn Collective>, heads: usize, n_img: usize) -> Result<Self> {
        let u = group.size();
        if !heads.is_multiple_of(u) || !n_img.is_multiple_of(u) {
            bail!(
                "Ulysses over {u} ranks needs the heads ({heads}) and the video tokens ({n_img}) \
                 to divide by {u}"
            )
        }
        Ok(Self {
            n_local: n_img / u,
            group,
        })
    }

    /// This rank's rows of `t` along `dim` (image tokens or their RoPE rows).
    fn rows(&self, t: &Tensor, dim: usize) -> Result<Tensor> {
        t.narrow(dim, self.group.rank() * self.n_local, self.n_local)
    }

    /// Every rank's (b, n_local, c) rows, in token order: (b, n_img, c) on this rank's device.
    fn gather(&self, y: &Tensor) -> Result<Tensor> {
        let parts = self
            .group
            .all_gather(y)?
            .into_iter()
            .map(|t| t.to_device(y.device()))
            .collect::<Result<Vec<_>>>()?;
        Tensor::cat(&parts, 1)
    }

    /// Attention over the joint sequence [image tokens; text tokens] as (b, n, heads, d), where
    /// this rank holds a slice of the image tokens (and every text token): an all-to-all trades
    /// the image slices for head slices, so that each rank attends over the whole sequence with
    /// `heads / ranks` heads (its slice of the replicated text heads appended), and a second one
    /// trades back; the text rows' head slices are gathered. The result is this rank's rows with
    /// every head, as without Ulysses.
    pub(super) fn attention(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        key_counts: &[usize],
        budget: usize,
    ) -> Result<Tensor> {
        let (u, r) = (self.group.size(), self.group.rank());
        let (_, n, h, _) = q.dims4()?;
        let here = q.device();
        let local = |parts: Vec<Tensor>| -> Result<Vec<Tensor>> {
            parts.into_iter().map(|t| t.to_device(here)).collect()
        };
        let (n_loc, hs) = (self.n_local, h / u);
        let n_txt = n - n_loc;
        let seq_to_heads = |t: &Tensor| -> Result<Tensor> {
            let img = t.narrow(1, 0, n_loc)?;
            let parts = (0..u)
                .map(|j| img.narrow(2, j * hs, hs)?.contiguous())
                .collect::<Result<Vec<_>>>()?;
            // from every rank: its image tokens, this rank's heads
            let img = Tensor::cat(&local(self.group.all_to_all(parts)?)?, 1)?;
            let txt = t.narrow(1, n_loc, n_txt)?.narrow(2, r * hs, hs)?;
            Tensor::cat(&[&img, &txt], 1)?.contiguous()
        };
        let (q, k, v) = (seq_to_heads(q)?, seq_to_heads(k)?, seq_to_heads(v)?);
        let a = attention(&q, &k, &v, Some(key_counts), budget)?;
        let n_img = u * n_loc;
        let parts = (0..u)
            .map(|j| a.narrow(1, j * n_loc, n_loc)?.contiguous())
            .collect::<Result<Vec<_>>>()?;
        // from every rank: this rank's image tokens, its heads
        let img = Tensor::cat(&local(self.group.all_to_all(parts)?)?, 2)?;
        let txt = a.narrow(1, n_img, n_txt)?.contiguous()?;
        let txt = Tensor::cat(&local(self.group.all_gather(&txt)?)?, 2)?;
        Tensor::cat(&[&img, &txt], 1)
    }
}

impl HunyuanVideoTransformer3DModel {
    /// [`Self::forward_cached`] as one rank of a Ulysses sequence-parallel group: every rank
    /// calls it with the same inputs and its own member of `group` (same order of calls), runs the
    /// blocks on its slice of the image tokens, and returns the whole prediction. The head count
    /// and the image token count must divide by the group size; step caches and calibrations
    /// are not supported (an error).
    pub fn forward_ulysses(
        &self,
        inp: &TransformerInputs,
        cache: Option<&mut StepCache>,
        group: Arc<dyn Collective>,
    ) -> Result<Tensor> {
        let (shapes, text_mask) = inp.check(&self.cfg)?;
        let shard = SeqShard::new(group, self.cfg.num_attention_heads, shapes.n_img())?;
        if cache.as_ref().is_some_and(|c| c.spec() != CacheSpec::None) {
            bail!("step caching does not combine with Ulysses sequence parallelism yet")
        }
        if cache.as_ref().is_some_and(|c| c.calibrated().is_some()) {
            bail!("a MagCache calibration does not combine with Ulysses sequence parallelism")
        }
        let e = self.embed(inp, &shapes)?;
        // slice before: this rank's image tokens and their RoPE rows
        let x = shard.rows(&e.x, 1)?.contiguous()?;
        let rope = (shard.rows(&e.rope.0, 0)?, shard.rows(&e.rope.1, 0)?);
        let budget = self.attention_budget;
        let ctx = AttnCtx::new(text_mask, shapes.n_img(), budget, Some(shard.clone()));
        let blocks = BlockLoop::new(self, inp, &e.temb, rope, ctx);
        let x = blocks.run_with(x, cache)?;
        let y = self.head(&x, &e.temb)?;
        // gather after: every rank's patches
        let y = shard.gather(&y)?;
        self.unpatchify(&y, &shapes)
    }
}
