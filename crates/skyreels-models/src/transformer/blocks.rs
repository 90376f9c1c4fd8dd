//! The DiT blocks' forward passes (double and single stream) and the loop over them.

use super::inputs::TextMask;
use super::{
    FeedForward, HunyuanVideoTransformer3DModel, QkvNorm, SingleTransformerBlock, TransformerBlock,
    NORM_EPS,
};
use crate::layers::{
    attention,
    cpu::gelu_tanh,
    linear::Linear,
    modulation::{add_gated, layer_norm_modulate},
};
use crate::parallel::Collective;
use candle_core::{Module, Result, Tensor};
use std::sync::Arc;

/// What every attention call of one forward pass needs to know.
#[derive(Clone)]
pub(super) struct AttnCtx {
    /// Keys visible to each sample in the joint blocks (a prefix of [img; txt], with every image
    /// token of the clip).
    pub(super) key_counts: Vec<usize>,
    pub(super) text_mask: TextMask,
    /// Score elements held at once (see [`attention`]).
    pub(super) budget: usize,
    /// Ulysses: this rank holds `n_local` consecutive image tokens of the clip.
    pub(super) shard: Option<SeqShard>,
}

#[derive(Clone)]
pub(super) struct SeqShard {
    pub(super) group: Arc<dyn Collective>,
    pub(super) n_local: usize,
}

/// Attention over the joint sequence [image tokens; text tokens] as (b, n, heads, d). With
/// Ulysses each rank holds a slice of the image tokens (and every text token): an all-to-all
/// trades the image slices for head slices, so that each rank attends over the whole sequence
/// with `heads / ranks` heads (its slice of the replicated text heads appended), and a second
/// one trades back; the text rows' head slices are gathered. The result is this rank's rows with
/// every head, as without Ulysses.
fn joint_attention(q: &Tensor, k: &Tensor, v: &Tensor, ctx: &AttnCtx) -> Result<Tensor> {
    let Some(sp) = &ctx.shard else {
        return attention(q, k, v, Some(&ctx.key_counts), ctx.budget);
    };
    let (u, r) = (sp.group.size(), sp.group.rank());
    let (_, n, h, _) = q.dims4()?;
    let here = q.device();
    let local = |parts: Vec<Tensor>| -> Result<Vec<Tensor>> {
        parts.into_iter().map(|t| t.to_device(here)).collect()
    };
    let (n_loc, hs) = (sp.n_local, h / u);
    let n_txt = n - n_loc;
    let seq_to_heads = |t: &Tensor| -> Result<Tensor> {
        let img = t.narrow(1, 0, n_loc)?;
        let parts = (0..u)
            .map(|j| img.narrow(2, j * hs, hs)?.contiguous())
            .collect::<Result<Vec<_>>>()?;
        // from every rank: its image tokens, this rank's heads
        let img = Tensor::cat(&local(sp.group.all_to_all(parts)?)?, 1)?;
        let txt = t.narrow(1, n_loc, n_txt)?.narrow(2, r * hs, hs)?;
        Tensor::cat(&[&img, &txt], 1)?.contiguous()
    };
    let (q, k, v) = (seq_to_heads(q)?, seq_to_heads(k)?, seq_to_heads(v)?);
    let a = attention(&q, &k, &v, Some(&ctx.key_counts), ctx.budget)?;
    let n_img = u * n_loc;
    let parts = (0..u)
        .map(|j| a.narrow(1, j * n_loc, n_loc)?.contiguous())
        .collect::<Result<Vec<_>>>()?;
    // from every rank: this rank's image tokens, its heads
    let img = Tensor::cat(&local(sp.group.all_to_all(parts)?)?, 2)?;
    let txt = a.narrow(1, n_img, n_txt)?.contiguous()?;
    let txt = Tensor::cat(&local(sp.group.all_gather(&txt)?)?, 2)?;
    Tensor::cat(&[&img, &txt], 1)
}

/// (b, n, heads·d) -> (b, n, heads, d)
pub(super) fn to_heads(x: &Tensor, heads: usize) -> Result<Tensor> {
    let (b, n, c) = x.dims3()?;
    x.reshape((b, n, heads, c / heads))
}

/// (b, n, heads, d) -> (b, n, heads·d)
pub(super) fn from_heads(x: &Tensor) -> Result<Tensor> {
    let (b, n, h, d) = x.dims4()?;
    x.reshape((b, n, h * d))
}

/// `linear(silu(temb))` split into `n` chunks of (b, c).
pub(super) fn modulation(linear: &Linear, temb: &Tensor, n: usize) -> Result<Vec<Tensor>> {
    let m = linear.forward(&temb.silu()?)?;
    let c = m.dim(1)? / n;
    (0..n).map(|i| m.narrow(1, i * c, c)).collect()
}

impl Module for FeedForward {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.proj_in.forward(x)?;
        let h = if self.gelu { gelu_tanh(&h)? } else { h.silu()? };
        self.proj_out.forward(&h)
    }
}

impl QkvNorm {
    /// (b, n, c) -> q, k, v each (b, n, heads, d); RoPE (tables for the leading image tokens) on
    /// q and k.
    fn forward(
        &self,
        x: &Tensor,
        heads: usize,
        rope: Option<(&Tensor, &Tensor)>,
    ) -> Result<[Tensor; 3]> {
        let q = to_heads(&self.q.forward(x)?, heads)?;
        let k = to_heads(&self.k.forward(x)?, heads)?;
        let v = to_heads(&self.v.forward(x)?, heads)?;
        let (q, k) = match rope {
            None => (self.norm_q.forward(&q)?, self.norm_k.forward(&k)?),
            Some((cos, sin)) => (
                self.norm_q.forward_rope(&q, cos, sin)?,
                self.norm_k.forward_rope(&k, cos, sin)?,
            ),
        };
        Ok([q, k, v])
    }
}

impl TransformerBlock {
    /// `norm1(x, temb)`'s normed and modulated image input (what the attention sees): TeaCache's
    /// change signal.
    pub(super) fn modulated_input(&self, x: &Tensor, temb: &Tensor) -> Result<Tensor> {
        let m = modulation(&self.norm1, temb, 6)?;
        layer_norm_modulate(x, &m[0], &m[1], NORM_EPS)
    }

    pub(super) fn forward(
        &self,
        x: &Tensor,
        c: &Tensor,
        temb: &Tensor,
        rope: (&Tensor, &Tensor),
        ctx: &AttnCtx,
    ) -> Result<(Tensor, Tensor)> {
        // shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp
        let m = modulation(&self.norm1, temb, 6)?;
        let cm = modulation(&self.norm1_context, temb, 6)?;
        let xn = layer_norm_modulate(x, &m[0], &m[1], NORM_EPS)?;
        let cn = layer_norm_modulate(c, &cm[0], &cm[1], NORM_EPS)?;
        let n_img = x.dim(1)?;
        let [qi, ki, vi] = self.img_qkv.forward(&xn, self.heads, Some(rope))?;
        let [qt, kt, vt] = self.txt_qkv.forward(&cn, self.heads, None)?;
        // sequence [img; txt] along dim 1 of (b, n, heads, d)
        let q = Tensor::cat(&[qi, qt], 1)?;
        let k = Tensor::cat(&[ki, kt], 1)?;
        let v = Tensor::cat(&[vi, vt], 1)?;
        let a = from_heads(&joint_attention(&q, &k, &v, ctx)?)?;
        let n_txt = c.dim(1)?;
        let img_out = self.to_out.forward(&a.narrow(1, 0, n_img)?.contiguous()?)?;
        let txt_out = self
            .to_add_out
            .forward(&a.narrow(1, n_img, n_txt)?.contiguous()?)?;
        let x = add_gated(x, &img_out, &m[2])?;
        let c = add_gated(c, &txt_out, &cm[2])?;
        let xn = layer_norm_modulate(&x, &m[3], &m[4], NORM_EPS)?;
        let cn = layer_norm_modulate(&c, &cm[3], &cm[4], NORM_EPS)?;
        let x = add_gated(&x, &self.ff.forward(&xn)?, &m[5])?;
        let c = add_gated(&c, &self.ff_context.forward(&cn)?, &cm[5])?;
        Ok((x, c))
    }
}

impl SingleTransformerBlock {
    fn forward(
        &self,
        s: &Tensor,
        temb: &Tensor,
        rope: (&Tensor, &Tensor),
        ctx: &AttnCtx,
    ) -> Result<Tensor> {
        // shift, scale, gate
        let m = modulation(&self.norm, temb, 3)?;
        let sn = layer_norm_modulate(s, &m[0], &m[1], NORM_EPS)?;
        let mlp = gelu_tanh(&self.proj_mlp.forward(&sn)?)?;
        let [q, k, v] = self.qkv.forward(&sn, self.heads, Some(rope))?;
        let a = from_heads(&joint_attention(&q, &k, &v, ctx)?)?;
        // (b, n, dim) ++ (b, n, mlp) -> (b, n, dim + mlp)
        let (b, n, dim) = a.dims3()?;
        let mlp_dim = mlp.dim(2)?;
        // proj_out over [attn (dim); mlp] features, without building the concatenation:
        // (b·n, dim) ++ (b·n, mlp) -> (b·n, dim) -> (b, n, dim)
        let out = self
            .proj_out
            .forward_concat(&[&a.reshape((b * n, dim))?, &mlp.reshape((b * n, mlp_dim))?])?
            .reshape((b, n, dim))?;
        add_gated(s, &out, &m[2])
    }
}

impl HunyuanVideoTransformer3DModel {
    /// `doubles` then every single block over image tokens `x` and text tokens `c`; returns the
    /// image tokens.
    pub(super) fn stack(
        &self,
        doubles: &[TransformerBlock],
        mut x: Tensor,
        mut c: Tensor,
        temb: &Tensor,
        rope: (&Tensor, &Tensor),
        ctx: &AttnCtx,
    ) -> Result<Tensor> {
        let n_img = x.dim(1)?;
        for block in doubles {
            (x, c) = block.forward(&x, &c, temb, rope, ctx)?;
        }
        let mut s = Tensor::cat(&[x, c], 1)?;
        for block in &self.single_transformer_blocks {
            s = block.forward(&s, temb, rope, ctx)?;
        }
        s.narrow(1, 0, n_img)
    }
}
