//! The block loop, the middle stage of the forward: the double-stream blocks then the
//! single-stream blocks over the image tokens and the refined text ([`BlockLoop`]), and the
//! blocks' forward passes.

use super::inputs::{TextMask, TransformerInputs};
use super::ulysses::SeqShard;
use super::{
    FeedForward, HunyuanVideoTransformer3DModel, QkvNorm, SingleTransformerBlock, StepCache,
    TransformerBlock, NORM_EPS,
};
use crate::layers::{
    attention,
    cpu::gelu_tanh,
    linear::Linear,
    modulation::{add_gated, layer_norm_modulate},
};
use candle_core::{Module, Result, Tensor};

/// What every attention call of one forward pass needs to know.
#[derive(Clone)]
pub(super) struct AttnCtx {
    /// Keys visible to each sample in the joint blocks (a prefix of [img; txt], with every image
    /// token of the clip).
    key_counts: Vec<usize>,
    pub(super) text_mask: TextMask,
    /// Score elements held at once (see [`attention`]).
    pub(super) budget: usize,
    /// Ulysses: this rank holds a slice of the image tokens of the clip.
    shard: Option<SeqShard>,
}

impl AttnCtx {
    /// For a clip of `n_img` image tokens, on one device or (`shard`) as one Ulysses rank.
    pub(super) fn new(
        text_mask: TextMask,
        n_img: usize,
        budget: usize,
        shard: Option<SeqShard>,
    ) -> Self {
        Self {
            key_counts: text_mask.joint_key_counts(n_img),
            text_mask,
            budget,
            shard,
        }
    }
}

/// Attention over the joint sequence [image tokens; text tokens] as (b, n, heads, d); as a
/// Ulysses rank, over this rank's image tokens (see [`SeqShard::attention`]).
fn joint_attention(q: &Tensor, k: &Tensor, v: &Tensor, ctx: &AttnCtx) -> Result<Tensor> {
    match &ctx.shard {
        None => attention(q, k, v, Some(&ctx.key_counts), ctx.budget),
        Some(shard) => shard.attention(q, k, v, &ctx.key_counts, ctx.budget),
    }
}

/// Who gives the output of each attention of the blocks: the attention itself ([`Compute`]), or a
/// step cache's forecast (TaylorSeer, `cache.rs`).
pub(super) trait Attend {
    /// The output of attention `index` (the double blocks' in order, then the single blocks')
    /// of this forward; `run` computes it. A double block's is its image and text outputs after
    /// `to_out` / `to_add_out`, a single block's the attention over its whole sequence.
    fn attend(
        &mut self,
        index: usize,
        run: &dyn Fn() -> Result<Vec<Tensor>>,
    ) -> Result<Vec<Tensor>>;
}

/// Every attention computed.
pub(super) struct Compute;

impl Attend for Compute {
    fn attend(&mut self, _: usize, run: &dyn Fn() -> Result<Vec<Tensor>>) -> Result<Vec<Tensor>> {
        run()
    }
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
    fn modulated_input(&self, x: &Tensor, temb: &Tensor) -> Result<Tensor> {
        let m = modulation(&self.norm1, temb, 6)?;
        layer_norm_modulate(x, &m[0], &m[1], NORM_EPS)
    }

    /// The block over image tokens `x` and text tokens `c`; its attention is `attend`'s
    /// `index`.
    #[allow(clippy::too_many_arguments)]
    fn forward(
        &self,
        x: &Tensor,
        c: &Tensor,
        temb: &Tensor,
        rope: (&Tensor, &Tensor),
        ctx: &AttnCtx,
        attend: &mut dyn Attend,
        index: usize,
    ) -> Result<(Tensor, Tensor)> {
        // shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp
        let m = modulation(&self.norm1, temb, 6)?;
        let cm = modulation(&self.norm1_context, temb, 6)?;
        let xn = layer_norm_modulate(x, &m[0], &m[1], NORM_EPS)?;
        let cn = layer_norm_modulate(c, &cm[0], &cm[1], NORM_EPS)?;
        let outputs = attend.attend(index, &|| {
            let n_img = xn.dim(1)?;
            let [qi, ki, vi] = self.img_qkv.forward(&xn, self.heads, Some(rope))?;
            let [qt, kt, vt] = self.txt_qkv.forward(&cn, self.heads, None)?;
            // sequence [img; txt] along dim 1 of (b, n, heads, d)
            let q = Tensor::cat(&[qi, qt], 1)?;
            let k = Tensor::cat(&[ki, kt], 1)?;
            let v = Tensor::cat(&[vi, vt], 1)?;
            let a = from_heads(&joint_attention(&q, &k, &v, ctx)?)?;
            let n_txt = cn.dim(1)?;
            let img_out = self.to_out.forward(&a.narrow(1, 0, n_img)?.contiguous()?)?;
            let txt_out = self
                .to_add_out
                .forward(&a.narrow(1, n_img, n_txt)?.contiguous()?)?;
            Ok(vec![img_out, txt_out])
        })?;
        let [img_out, txt_out] = outputs.as_slice() else {
            candle_core::bail!("a double block's attention gives two outputs")
        };
        let x = add_gated(x, img_out, &m[2])?;
        let c = add_gated(c, txt_out, &cm[2])?;
        let xn = layer_norm_modulate(&x, &m[3], &m[4], NORM_EPS)?;
        let cn = layer_norm_modulate(&c, &cm[3], &cm[4], NORM_EPS)?;
        let x = add_gated(&x, &self.ff.forward(&xn)?, &m[5])?;
        let c = add_gated(&c, &self.ff_context.forward(&cn)?, &cm[5])?;
        Ok((x, c))
    }
}

impl SingleTransformerBlock {
    /// The block over the joint sequence `s`; its attention is `attend`'s `index`.
    fn forward(
        &self,
        s: &Tensor,
        temb: &Tensor,
        rope: (&Tensor, &Tensor),
        ctx: &AttnCtx,
        attend: &mut dyn Attend,
        index: usize,
    ) -> Result<Tensor> {
        // shift, scale, gate
        let m = modulation(&self.norm, temb, 3)?;
        let sn = layer_norm_modulate(s, &m[0], &m[1], NORM_EPS)?;
        let mlp = gelu_tanh(&self.proj_mlp.forward(&sn)?)?;
        let a = attend.attend(index, &|| {
            let [q, k, v] = self.qkv.forward(&sn, self.heads, Some(rope))?;
            Ok(vec![from_heads(&joint_attention(&q, &k, &v, ctx)?)?])
        })?;
        let [a] = a.as_slice() else {
            candle_core::bail!("a single block's attention gives one output")
        };
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

/// The block loop of one forward, with what every block shares: the conditioning vector, the
/// RoPE rows of the image tokens it is given, the attention context and the text inputs. A step
/// cache runs all of it, part of it or none ([`StepCache::around`]); a Ulysses rank runs it on its
/// slice of the image tokens (`forward_ulysses`).
pub(super) struct BlockLoop<'a> {
    model: &'a HunyuanVideoTransformer3DModel,
    inputs: &'a TransformerInputs<'a>,
    temb: &'a Tensor,
    rope: (Tensor, Tensor),
    ctx: AttnCtx,
}

impl<'a> BlockLoop<'a> {
    pub(super) fn new(
        model: &'a HunyuanVideoTransformer3DModel,
        inputs: &'a TransformerInputs<'a>,
        temb: &'a Tensor,
        rope: (Tensor, Tensor),
        ctx: AttnCtx,
    ) -> Self {
        Self {
            model,
            inputs,
            temb,
            rope,
            ctx,
        }
    }

    /// Every block over image tokens `x` (as `cache` plans it: all, part or none of them).
    pub(super) fn run_with(&self, x: Tensor, cache: Option<&mut StepCache>) -> Result<Tensor> {
        match cache {
            Some(cache) => cache.around(self, x),
            None => self.run(x),
        }
    }

    /// Every block over image tokens `x`: the refined text, then the whole stack.
    pub(super) fn run(&self, x: Tensor) -> Result<Tensor> {
        self.stack(self.doubles(), x, self.context()?, &mut Compute)
    }

    /// The text tokens the blocks see: `context_embedder` (the token refiner) over the text
    /// states, (b, n_txt, dim). Part of the embedding, run here so that a skipped loop skips it.
    pub(super) fn context(&self) -> Result<Tensor> {
        let inp = self.inputs;
        self.model.context_embedder.forward(
            &inp.encoder_hidden_states.to_dtype(self.model.dtype)?,
            inp.timestep,
            inp.encoder_attention_mask,
            &self.ctx,
        )
    }

    pub(super) fn doubles(&self) -> &'a [TransformerBlock] {
        &self.model.transformer_blocks
    }

    /// One double block over image tokens `x` and text tokens `c`.
    pub(super) fn double(
        &self,
        block: &TransformerBlock,
        x: &Tensor,
        c: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        let rope = (&self.rope.0, &self.rope.1);
        block.forward(x, c, self.temb, rope, &self.ctx, &mut Compute, 0)
    }

    /// `block`'s normed and modulated image input (TeaCache's change signal).
    pub(super) fn modulated_input(&self, block: &TransformerBlock, x: &Tensor) -> Result<Tensor> {
        block.modulated_input(x, self.temb)
    }

    /// `doubles` (the model's last ones) then every single block over image tokens `x` and text
    /// tokens `c`, their attentions given by `attend`; returns the image tokens.
    pub(super) fn stack(
        &self,
        doubles: &[TransformerBlock],
        mut x: Tensor,
        mut c: Tensor,
        attend: &mut dyn Attend,
    ) -> Result<Tensor> {
        let (temb, rope, ctx) = (self.temb, (&self.rope.0, &self.rope.1), &self.ctx);
        let n_img = x.dim(1)?;
        let all = self.model.transformer_blocks.len();
        let first = all - doubles.len();
        for (i, block) in doubles.iter().enumerate() {
            (x, c) = block.forward(&x, &c, temb, rope, ctx, attend, first + i)?;
        }
        let mut s = Tensor::cat(&[x, c], 1)?;
        for (i, block) in self.model.single_transformer_blocks.iter().enumerate() {
            s = block.forward(&s, temb, rope, ctx, attend, all + i)?;
        }
        s.narrow(1, 0, n_img)
    }
}
