//! `HunyuanVideoTransformer3DModel`: the SkyReels V1 diffusion transformer.
//!
//! Struct and field names follow diffusers' `transformer_hunyuan_video.py`, so the state-dict keys
//! of a checkpoint are exactly the `vb.pp(..)` paths below.

mod cache;
mod config;

pub use cache::{CacheSpec, StepCache, TEACACHE_COEFFICIENTS};
pub use config::TransformerConfig;

use crate::layers::{
    attention,
    attention::default_score_budget,
    conv3d::{Conv3d, Conv3dConfig},
    cpu::gelu_tanh,
    embeddings::{timestep_sinusoid, TextProjection, TimestepEmbedding},
    linear::{linear, Linear},
    modulation::{add_gated, layer_norm_modulate},
    norm::{LayerNorm, RmsNorm},
    rope::rope_tables,
};
use crate::parallel::Collective;
use candle_core::{bail, DType, Device, IndexOp, Module, Result, Tensor};
use candle_nn::VarBuilder;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

const NORM_EPS: f64 = 1e-6;
/// Width of the sinusoidal timestep projection (`Timesteps(num_channels=256)`).
const TIME_PROJ_DIM: usize = 256;
/// The token refiner's MLP ratio: `HunyuanVideoTokenRefiner` is built with its default 4.0, not
/// the config's `mlp_ratio`.
const REFINER_MLP_RATIO: f64 = 4.0;

/// Inputs of one forward pass (diffusers argument names).
#[derive(Debug, Clone)]
pub struct TransformerInputs<'a> {
    /// (b, in_channels, t, h, w) latents (I2V: noisy latents then image latents on channels).
    pub hidden_states: &'a Tensor,
    /// (b,) diffusion timestep (sigma × 1000).
    pub timestep: &'a Tensor,
    /// (b, n_txt, text_embed_dim) text-encoder states.
    pub encoder_hidden_states: &'a Tensor,
    /// (b, n_txt) 1 for real tokens, 0 for padding (right padding).
    pub encoder_attention_mask: &'a Tensor,
    /// (b, pooled_projection_dim) CLIP pooled vector.
    pub pooled_projections: &'a Tensor,
    /// (b,) embedded guidance × 1000; required when the config has `guidance_embeds`.
    pub guidance: Option<&'a Tensor>,
}

/// Owned copies of a forward's inputs on another device ([`TransformerInputs::to_device`]).
#[derive(Debug, Clone)]
pub struct InputsOn {
    hidden_states: Tensor,
    timestep: Tensor,
    encoder_hidden_states: Tensor,
    encoder_attention_mask: Tensor,
    pooled_projections: Tensor,
    guidance: Option<Tensor>,
}

impl InputsOn {
    pub fn inputs(&self) -> TransformerInputs<'_> {
        TransformerInputs {
            hidden_states: &self.hidden_states,
            timestep: &self.timestep,
            encoder_hidden_states: &self.encoder_hidden_states,
            encoder_attention_mask: &self.encoder_attention_mask,
            pooled_projections: &self.pooled_projections,
            guidance: self.guidance.as_ref(),
        }
    }
}

impl<'a> TransformerInputs<'a> {
    /// Copies of every input on `device` (a no-op clone where they already are).
    pub fn to_device(&self, device: &Device) -> Result<InputsOn> {
        let to = |t: &Tensor| t.to_device(device);
        Ok(InputsOn {
            hidden_states: to(self.hidden_states)?,
            timestep: to(self.timestep)?,
            encoder_hidden_states: to(self.encoder_hidden_states)?,
            encoder_attention_mask: to(self.encoder_attention_mask)?,
            pooled_projections: to(self.pooled_projections)?,
            guidance: self.guidance.map(to).transpose()?,
        })
    }

    /// The inputs from tensors named as the reference's arguments (`guidance` optional).
    pub fn from_named(t: &'a HashMap<String, Tensor>) -> Result<Self> {
        let get = |k: &str| match t.get(k) {
            Some(v) => Ok(v),
            None => bail!("transformer inputs: no tensor named {k}"),
        };
        Ok(Self {
            hidden_states: get("hidden_states")?,
            timestep: get("timestep")?,
            encoder_hidden_states: get("encoder_hidden_states")?,
            encoder_attention_mask: get("encoder_attention_mask")?,
            pooled_projections: get("pooled_projections")?,
            guidance: t.get("guidance"),
        })
    }
}

/// Per-sample description of the text padding, read once from the mask.
#[derive(Debug, Clone)]
struct TextMask {
    /// For each sample, the flags of the text tokens.
    valid: Vec<Vec<bool>>,
}

impl TextMask {
    fn new(mask: &Tensor, n_txt: usize) -> Result<Self> {
        let (b, n) = mask.dims2()?;
        if n != n_txt {
            bail!(
                "encoder_attention_mask {:?} does not match {n_txt} text tokens",
                mask.shape()
            )
        }
        let rows = mask.to_dtype(DType::F32)?.to_vec2::<f32>()?;
        let valid: Vec<Vec<bool>> = rows
            .iter()
            .map(|r| r.iter().map(|&v| v != 0.0).collect())
            .collect();
        debug_assert_eq!(valid.len(), b);
        Ok(Self { valid })
    }

    /// Number of keys each sample attends to in the joint blocks: every image token and the first
    /// `sum(mask)` text tokens (the reference counts, assuming right padding).
    fn joint_key_counts(&self, n_img: usize) -> Vec<usize> {
        self.valid
            .iter()
            .map(|r| n_img + r.iter().filter(|&&v| v).count())
            .collect()
    }
}

/// What every attention call of one forward pass needs to know.
#[derive(Clone)]
struct AttnCtx {
    /// Keys visible to each sample in the joint blocks (a prefix of [img; txt], with every image
    /// token of the clip).
    key_counts: Vec<usize>,
    text_mask: TextMask,
    /// Score elements held at once (see [`attention`]).
    budget: usize,
    /// Ulysses: this rank holds `n_local` consecutive image tokens of the clip.
    shard: Option<SeqShard>,
}

#[derive(Clone)]
struct SeqShard {
    group: Arc<dyn Collective>,
    n_local: usize,
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
fn to_heads(x: &Tensor, heads: usize) -> Result<Tensor> {
    let (b, n, c) = x.dims3()?;
    x.reshape((b, n, heads, c / heads))
}

/// (b, n, heads, d) -> (b, n, heads·d)
fn from_heads(x: &Tensor) -> Result<Tensor> {
    let (b, n, h, d) = x.dims4()?;
    x.reshape((b, n, h * d))
}

/// `linear(silu(temb))` split into `n` chunks of (b, c).
fn modulation(linear: &Linear, temb: &Tensor, n: usize) -> Result<Vec<Tensor>> {
    let m = linear.forward(&temb.silu()?)?;
    let c = m.dim(1)? / n;
    (0..n).map(|i| m.narrow(1, i * c, c)).collect()
}

/// `FeedForward`: net.2(act(net.0.proj(x))).
#[derive(Debug, Clone)]
struct FeedForward {
    proj_in: Linear,
    proj_out: Linear,
    gelu: bool,
}

impl FeedForward {
    /// `activation_fn="gelu-approximate"` when `gelu`, otherwise `"linear-silu"`.
    fn new(dim: usize, inner: usize, gelu: bool, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            proj_in: linear(dim, inner, vb.pp("net.0.proj"))?,
            proj_out: linear(inner, dim, vb.pp("net.2"))?,
            gelu,
        })
    }
}

impl Module for FeedForward {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.proj_in.forward(x)?;
        let h = if self.gelu { gelu_tanh(&h)? } else { h.silu()? };
        self.proj_out.forward(&h)
    }
}

// ---------------------------------------------------------------------------------------------
// Conditioning

/// `HunyuanVideoConditionEmbedding` (transformer) and `CombinedTimestepTextProjEmbeddings`
/// (refiner, no guidance): timestep + [guidance] + text projection.
#[derive(Debug, Clone)]
struct ConditionEmbedding {
    timestep_embedder: TimestepEmbedding,
    text_embedder: TextProjection,
    guidance_embedder: Option<TimestepEmbedding>,
}

impl ConditionEmbedding {
    fn new(dim: usize, pooled_dim: usize, guidance: bool, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            timestep_embedder: TimestepEmbedding::new(
                TIME_PROJ_DIM,
                dim,
                vb.pp("timestep_embedder"),
            )?,
            text_embedder: TextProjection::new(pooled_dim, dim, vb.pp("text_embedder"))?,
            guidance_embedder: if guidance {
                Some(TimestepEmbedding::new(
                    TIME_PROJ_DIM,
                    dim,
                    vb.pp("guidance_embedder"),
                )?)
            } else {
                None
            },
        })
    }

    fn forward(
        &self,
        timestep: &Tensor,
        pooled: &Tensor,
        guidance: Option<&Tensor>,
    ) -> Result<Tensor> {
        let dtype = pooled.dtype();
        let t = timestep_sinusoid(timestep, TIME_PROJ_DIM)?.to_dtype(dtype)?;
        let t_emb = self.timestep_embedder.forward(&t)?;
        let p_emb = self.text_embedder.forward(pooled)?;
        match &self.guidance_embedder {
            None => t_emb + p_emb,
            Some(embedder) => {
                let Some(g) = guidance else {
                    bail!("this transformer has a guidance embedder: `guidance` is required")
                };
                let g = timestep_sinusoid(g, TIME_PROJ_DIM)?.to_dtype(dtype)?;
                // reference order: (timesteps_emb + guidance_emb) + pooled_projections
                (t_emb + embedder.forward(&g)?)? + p_emb
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Token refiner

/// Self-attention with bias and an output projection (`Attention` with the default processor).
#[derive(Debug, Clone)]
struct RefinerAttention {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    heads: usize,
}

impl RefinerAttention {
    fn new(dim: usize, heads: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            to_q: linear(dim, dim, vb.pp("to_q"))?,
            to_k: linear(dim, dim, vb.pp("to_k"))?,
            to_v: linear(dim, dim, vb.pp("to_v"))?,
            to_out: linear(dim, dim, vb.pp("to_out.0"))?,
            heads,
        })
    }

    /// The reference mask is M[i,j] = m_i ∧ m_j with column 0 forced on: a valid query sees the
    /// valid keys (and key 0); a padded query sees key 0 only, so its output is exactly v[0].
    fn forward(&self, x: &Tensor, ctx: &AttnCtx) -> Result<Tensor> {
        let mask = &ctx.text_mask;
        let q = to_heads(&self.to_q.forward(x)?, self.heads)?;
        let k = to_heads(&self.to_k.forward(x)?, self.heads)?;
        let v = to_heads(&self.to_v.forward(x)?, self.heads)?;
        let (_, n, h, d) = q.dims4()?;
        let out = if mask.valid.iter().all(|r| r.iter().all(|&v| v)) {
            attention(&q, &k, &v, None, ctx.budget)?
        } else {
            let mut outs = Vec::with_capacity(mask.valid.len());
            for (i, row) in mask.valid.iter().enumerate() {
                let keys: Vec<u32> = (0..n)
                    .filter(|&j| j == 0 || row[j])
                    .map(|j| j as u32)
                    .collect();
                let keys = Tensor::new(keys.as_slice(), x.device())?;
                let (qi, ki, vi) = (q.i(i..i + 1)?, k.i(i..i + 1)?, v.i(i..i + 1)?);
                let ki = ki.index_select(&keys, 1)?;
                let vs = vi.index_select(&keys, 1)?;
                let full = attention(&qi, &ki, &vs, None, ctx.budget)?;
                let rows: Vec<u8> = row.iter().map(|&v| v as u8).collect();
                let rows = Tensor::new(rows.as_slice(), x.device())?
                    .reshape((1, n, 1, 1))?
                    .broadcast_as((1, n, h, d))?;
                let v0 = vi.narrow(1, 0, 1)?.broadcast_as((1, n, h, d))?;
                outs.push(rows.where_cond(&full, &v0)?);
            }
            Tensor::cat(&outs, 0)?
        };
        self.to_out.forward(&from_heads(&out)?)
    }
}

/// `HunyuanVideoIndividualTokenRefinerBlock`.
#[derive(Debug, Clone)]
struct RefinerBlock {
    norm1: LayerNorm,
    attn: RefinerAttention,
    norm2: LayerNorm,
    ff: FeedForward,
    norm_out: Linear,
}

impl RefinerBlock {
    fn new(cfg: &TransformerConfig, vb: VarBuilder) -> Result<Self> {
        let dim = cfg.inner_dim();
        Ok(Self {
            norm1: LayerNorm::new(dim, NORM_EPS, vb.pp("norm1"))?,
            attn: RefinerAttention::new(dim, cfg.num_attention_heads, vb.pp("attn"))?,
            norm2: LayerNorm::new(dim, NORM_EPS, vb.pp("norm2"))?,
            ff: FeedForward::new(
                dim,
                (dim as f64 * REFINER_MLP_RATIO) as usize,
                false,
                vb.pp("ff"),
            )?,
            norm_out: linear(dim, 2 * dim, vb.pp("norm_out.linear"))?,
        })
    }

    fn forward(&self, x: &Tensor, temb: &Tensor, ctx: &AttnCtx) -> Result<Tensor> {
        let a = self.attn.forward(&self.norm1.forward(x)?, ctx)?;
        let g = modulation(&self.norm_out, temb, 2)?;
        let x = add_gated(x, &a, &g[0])?;
        let f = self.ff.forward(&self.norm2.forward(&x)?)?;
        add_gated(&x, &f, &g[1])
    }
}

/// `HunyuanVideoTokenRefiner` (`context_embedder`).
#[derive(Debug, Clone)]
struct TokenRefiner {
    time_text_embed: ConditionEmbedding,
    proj_in: Linear,
    refiner_blocks: Vec<RefinerBlock>,
}

impl TokenRefiner {
    fn new(cfg: &TransformerConfig, vb: VarBuilder) -> Result<Self> {
        let dim = cfg.inner_dim();
        let blocks = vb.pp("token_refiner.refiner_blocks");
        Ok(Self {
            time_text_embed: ConditionEmbedding::new(
                dim,
                cfg.text_embed_dim,
                false,
                vb.pp("time_text_embed"),
            )?,
            proj_in: linear(cfg.text_embed_dim, dim, vb.pp("proj_in"))?,
            refiner_blocks: (0..cfg.num_refiner_layers)
                .map(|i| RefinerBlock::new(cfg, blocks.pp(i)))
                .collect::<Result<_>>()?,
        })
    }

    fn forward(
        &self,
        x: &Tensor,
        timestep: &Tensor,
        mask: &Tensor,
        ctx: &AttnCtx,
    ) -> Result<Tensor> {
        let dtype = x.dtype();
        // masked mean of the raw text states, in f32 as in the reference
        let m = mask.to_dtype(DType::F32)?.unsqueeze(2)?;
        let pooled = x
            .to_dtype(DType::F32)?
            .broadcast_mul(&m)?
            .sum(1)?
            .broadcast_div(&m.sum(1)?)?
            .to_dtype(dtype)?;
        let temb = self.time_text_embed.forward(timestep, &pooled, None)?;
        let mut h = self.proj_in.forward(x)?;
        for block in &self.refiner_blocks {
            h = block.forward(&h, &temb, ctx)?;
        }
        Ok(h)
    }
}

// ---------------------------------------------------------------------------------------------
// DiT blocks

/// Query/key/value projections with per-head RMS norms.
#[derive(Debug, Clone)]
struct QkvNorm {
    q: Linear,
    k: Linear,
    v: Linear,
    norm_q: RmsNorm,
    norm_k: RmsNorm,
}

impl QkvNorm {
    fn new(dim: usize, head_dim: usize, names: [&str; 5], vb: &VarBuilder) -> Result<Self> {
        Ok(Self {
            q: linear(dim, dim, vb.pp(names[0]))?,
            k: linear(dim, dim, vb.pp(names[1]))?,
            v: linear(dim, dim, vb.pp(names[2]))?,
            norm_q: RmsNorm::new(head_dim, NORM_EPS, vb.pp(names[3]))?,
            norm_k: RmsNorm::new(head_dim, NORM_EPS, vb.pp(names[4]))?,
        })
    }

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

/// `HunyuanVideoTransformerBlock`: dual-stream (image and text weights, joint attention).
#[derive(Debug, Clone)]
struct TransformerBlock {
    norm1: Linear,
    norm1_context: Linear,
    img_qkv: QkvNorm,
    txt_qkv: QkvNorm,
    to_out: Linear,
    to_add_out: Linear,

    ff: FeedForward,
    ff_context: FeedForward,
    heads: usize,
}

impl TransformerBlock {
    fn new(cfg: &TransformerConfig, vb: VarBuilder) -> Result<Self> {
        let dim = cfg.inner_dim();
        let attn = vb.pp("attn");
        let hd = cfg.attention_head_dim;
        Ok(Self {
            norm1: linear(dim, 6 * dim, vb.pp("norm1.linear"))?,
            norm1_context: linear(dim, 6 * dim, vb.pp("norm1_context.linear"))?,
            img_qkv: QkvNorm::new(dim, hd, ["to_q", "to_k", "to_v", "norm_q", "norm_k"], &attn)?,
            txt_qkv: QkvNorm::new(
                dim,
                hd,
                [
                    "add_q_proj",
                    "add_k_proj",
                    "add_v_proj",
                    "norm_added_q",
                    "norm_added_k",
                ],
                &attn,
            )?,
            to_out: linear(dim, dim, attn.pp("to_out.0"))?,
            to_add_out: linear(dim, dim, attn.pp("to_add_out"))?,

            ff: FeedForward::new(dim, cfg.mlp_dim(), true, vb.pp("ff"))?,
            ff_context: FeedForward::new(dim, cfg.mlp_dim(), true, vb.pp("ff_context"))?,
            heads: cfg.num_attention_heads,
        })
    }

    /// `norm1(x, temb)`'s normed and modulated image input (what the attention sees): TeaCache's
    /// change signal.
    fn modulated_input(&self, x: &Tensor, temb: &Tensor) -> Result<Tensor> {
        let m = modulation(&self.norm1, temb, 6)?;
        layer_norm_modulate(x, &m[0], &m[1], NORM_EPS)
    }

    fn forward(
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

/// `HunyuanVideoSingleTransformerBlock`: one stream over [img; txt], attention and MLP in parallel.
#[derive(Debug, Clone)]
struct SingleTransformerBlock {
    norm: Linear,
    qkv: QkvNorm,
    proj_mlp: Linear,
    proj_out: Linear,

    heads: usize,
}

impl SingleTransformerBlock {
    fn new(cfg: &TransformerConfig, vb: VarBuilder) -> Result<Self> {
        let dim = cfg.inner_dim();
        let mlp = cfg.mlp_dim();
        Ok(Self {
            norm: linear(dim, 3 * dim, vb.pp("norm.linear"))?,
            qkv: QkvNorm::new(
                dim,
                cfg.attention_head_dim,
                ["to_q", "to_k", "to_v", "norm_q", "norm_k"],
                &vb.pp("attn"),
            )?,
            proj_mlp: linear(dim, mlp, vb.pp("proj_mlp"))?,
            proj_out: linear(dim + mlp, dim, vb.pp("proj_out"))?,

            heads: cfg.num_attention_heads,
        })
    }

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

// ---------------------------------------------------------------------------------------------
// The model

/// The HunyuanVideo / SkyReels V1 diffusion transformer.
#[derive(Debug, Clone)]
pub struct HunyuanVideoTransformer3DModel {
    x_embedder: Conv3d,
    context_embedder: TokenRefiner,
    time_text_embed: ConditionEmbedding,
    transformer_blocks: Vec<TransformerBlock>,
    single_transformer_blocks: Vec<SingleTransformerBlock>,
    norm_out: Linear,

    proj_out: Linear,
    cfg: TransformerConfig,
    dtype: DType,
    attention_budget: usize,
    /// RoPE tables of the last latent grid: the denoising loop reuses one shape every step.
    rope_cache: Arc<Mutex<Option<RopeTables>>>,
}

#[derive(Debug)]
struct RopeTables {
    grid: (usize, usize, usize),
    cos: Tensor,
    sin: Tensor,
}

impl HunyuanVideoTransformer3DModel {
    pub fn new(cfg: &TransformerConfig, vb: VarBuilder) -> Result<Self> {
        cfg.validate()?;
        let dim = cfg.inner_dim();
        let dtype = vb.dtype();
        let (p, pt) = (cfg.patch_size, cfg.patch_size_t);
        let x_embedder = Conv3d::new(
            cfg.in_channels,
            dim,
            (pt, p, p),
            Conv3dConfig { stride: (pt, p, p) },
            vb.pp("x_embedder.proj"),
        )?;
        let blocks = vb.pp("transformer_blocks");
        let singles = vb.pp("single_transformer_blocks");
        Ok(Self {
            x_embedder,
            context_embedder: TokenRefiner::new(cfg, vb.pp("context_embedder"))?,
            time_text_embed: ConditionEmbedding::new(
                dim,
                cfg.pooled_projection_dim,
                cfg.guidance_embeds,
                vb.pp("time_text_embed"),
            )?,
            transformer_blocks: (0..cfg.num_layers)
                .map(|i| TransformerBlock::new(cfg, blocks.pp(i)))
                .collect::<Result<_>>()?,
            single_transformer_blocks: (0..cfg.num_single_layers)
                .map(|i| SingleTransformerBlock::new(cfg, singles.pp(i)))
                .collect::<Result<_>>()?,
            norm_out: linear(dim, 2 * dim, vb.pp("norm_out.linear"))?,

            proj_out: linear(dim, pt * p * p * cfg.out_channels(), vb.pp("proj_out"))?,
            cfg: cfg.clone(),
            dtype,
            attention_budget: default_score_budget(vb.device()),
            rope_cache: Arc::new(Mutex::new(None)),
        })
    }

    /// Sets how many attention score elements (batch × heads × query rows × keys) are held at
    /// once. Smaller saves memory at some speed; the result does not depend on it.
    pub fn set_attention_budget(&mut self, elements: usize) {
        self.attention_budget = elements.max(1);
    }

    /// `doubles` then every single block over image tokens `x` and text tokens `c`; returns the
    /// image tokens.
    fn stack(
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

    /// RoPE tables for a token grid, cached for the last grid seen.
    fn rope(&self, grid: (usize, usize, usize)) -> Result<(Tensor, Tensor)> {
        let mut cache = self.rope_cache.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(t) = cache.as_ref().filter(|t| t.grid == grid) {
            return Ok((t.cos.clone(), t.sin.clone()));
        }
        let cfg = &self.cfg;
        let (cos, sin) = rope_tables(grid, &cfg.rope_axes_dim, cfg.rope_theta, self.device())?;
        *cache = Some(RopeTables {
            grid,
            cos: cos.clone(),
            sin: sin.clone(),
        });
        Ok((cos, sin))
    }

    pub fn config(&self) -> &TransformerConfig {
        &self.cfg
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn device(&self) -> &Device {
        self.x_embedder.weight().device()
    }

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
        self.forward_sharded(inp, cache, None)
    }

    /// [`Self::forward_cached`] as one rank of a Ulysses sequence-parallel group: every rank
    /// calls it with the same inputs and its own member of `group` (same order of calls), runs the
    /// blocks on its slice of the image tokens, and returns the whole prediction. The head count
    /// and the image token count must divide by the group size; step caches are not supported
    /// (a cache with a spec other than `none` is an error).
    pub fn forward_ulysses(
        &self,
        inp: &TransformerInputs,
        cache: Option<&mut StepCache>,
        group: Arc<dyn Collective>,
    ) -> Result<Tensor> {
        self.forward_sharded(inp, cache, Some(group))
    }

    fn forward_sharded(
        &self,
        inp: &TransformerInputs,
        cache: Option<&mut StepCache>,
        group: Option<Arc<dyn Collective>>,
    ) -> Result<Tensor> {
        let cfg = &self.cfg;
        let dt = self.dtype;
        let (b, c_in, t, h, w) = inp.hidden_states.dims5()?;
        if c_in != cfg.in_channels {
            bail!(
                "hidden_states {:?} has {c_in} channels, the transformer expects in_channels {}",
                inp.hidden_states.shape(),
                cfg.in_channels
            )
        }
        let (p, pt) = (cfg.patch_size, cfg.patch_size_t);
        if t % pt != 0 || h % p != 0 || w % p != 0 {
            bail!(
                "hidden_states {:?}: height and width must be multiples of {p} (patch_size) and \
                 frames of {pt} (patch_size_t)",
                inp.hidden_states.shape()
            )
        }
        let (tb, n_txt, txt_dim) = inp.encoder_hidden_states.dims3()?;
        if tb != b || txt_dim != cfg.text_embed_dim {
            bail!(
                "encoder_hidden_states {:?} must be ({b}, n, {})",
                inp.encoder_hidden_states.shape(),
                cfg.text_embed_dim
            )
        }
        if inp.pooled_projections.dims() != [b, cfg.pooled_projection_dim] {
            bail!(
                "pooled_projections {:?} must be ({b}, {})",
                inp.pooled_projections.shape(),
                cfg.pooled_projection_dim
            )
        }
        if inp.timestep.dims() != [b] {
            bail!("timestep {:?} must be ({b},)", inp.timestep.shape())
        }
        if let Some(g) = inp.guidance {
            if g.dims() != [b] {
                bail!("guidance {:?} must be ({b},)", g.shape())
            }
        }
        let text_mask = TextMask::new(inp.encoder_attention_mask, n_txt)?;
        let (gt, gh, gw) = (t / pt, h / p, w / p);
        let n_img = gt * gh * gw;
        let (cos, sin) = self.rope((gt, gh, gw))?;
        let shard = match group {
            None => None,
            Some(group) => {
                let u = group.size();
                if !cfg.num_attention_heads.is_multiple_of(u) || !n_img.is_multiple_of(u) {
                    bail!(
                        "Ulysses over {u} ranks needs the heads ({}) and the video tokens ({n_img}) \
                         to divide by {u}",
                        cfg.num_attention_heads
                    )
                }
                if cache.as_ref().is_some_and(|c| c.spec() != CacheSpec::None) {
                    bail!("step caching does not combine with Ulysses sequence parallelism yet")
                }
                Some(SeqShard {
                    n_local: n_img / u,
                    group,
                })
            }
        };
        // this rank's image tokens: all of them, or its slice (with its RoPE rows)
        let rows = |t: Tensor, dim: usize| match &shard {
            None => Ok(t),
            Some(sp) => t.narrow(dim, sp.group.rank() * sp.n_local, sp.n_local),
        };
        let (cos, sin) = (rows(cos, 0)?, rows(sin, 0)?);

        let temb = self.time_text_embed.forward(
            inp.timestep,
            &inp.pooled_projections.to_dtype(dt)?,
            inp.guidance,
        )?;
        // (b, c, t, h, w) -> (b, dim, gt, gh, gw) -> (b, gt·gh·gw, dim)
        let x = self.x_embedder.forward(&inp.hidden_states.to_dtype(dt)?)?;
        let x = rows(x.flatten_from(2)?.transpose(1, 2)?, 1)?.contiguous()?;
        let ctx = AttnCtx {
            key_counts: text_mask.joint_key_counts(n_img),
            text_mask,
            budget: self.attention_budget,
            shard: shard.clone(),
        };
        let context = || {
            self.context_embedder.forward(
                &inp.encoder_hidden_states.to_dtype(dt)?,
                inp.timestep,
                inp.encoder_attention_mask,
                &ctx,
            )
        };
        let rope = (&cos, &sin);
        let stack = |doubles: &[TransformerBlock], x: Tensor, c: Tensor| {
            self.stack(doubles, x, c, &temb, rope, &ctx)
        };
        let spec = cache.as_ref().map_or(CacheSpec::None, |c| c.spec());
        let x = match (spec, cache) {
            (CacheSpec::FirstBlock(_), Some(cache)) => {
                let Some((first, rest)) = self.transformer_blocks.split_first() else {
                    bail!("the first-block cache needs a transformer with a double block")
                };
                let (head, c) = first.forward(&x, &context()?, &temb, rope, &ctx)?;
                match cache.first_block(&x, &head)? {
                    cache::Plan::Reuse(x) => x,
                    cache::Plan::Compute => {
                        let out = stack(rest, head.clone(), c)?;
                        cache.first_block_computed(&head, &out)?;
                        out
                    }
                }
            }
            (CacheSpec::TeaCache(_), Some(cache)) => {
                let Some(first) = self.transformer_blocks.first() else {
                    bail!("TeaCache needs a transformer with a double block")
                };
                let modulated = first.modulated_input(&x, &temb)?;
                match cache.teacache(&modulated, &x)? {
                    cache::Plan::Reuse(x) => x,
                    cache::Plan::Compute => {
                        let out = stack(&self.transformer_blocks, x.clone(), context()?)?;
                        cache.teacache_computed(&x, &out)?;
                        out
                    }
                }
            }
            (_, cache) => {
                if let Some(cache) = cache {
                    cache.record(true);
                }
                stack(&self.transformer_blocks, x, context()?)?
            }
        };

        // norm_out: (scale, shift), in that order
        let m = modulation(&self.norm_out, &temb, 2)?;
        let y = layer_norm_modulate(&x, &m[1], &m[0], NORM_EPS)?;
        let y = self.proj_out.forward(&y)?;
        let y = match &shard {
            None => y,
            Some(sp) => {
                let parts: Vec<Tensor> = sp.group.all_gather(&y)?;
                let parts = parts
                    .into_iter()
                    .map(|t| t.to_device(y.device()))
                    .collect::<Result<Vec<_>>>()?;
                Tensor::cat(&parts, 1)?
            }
        };
        let oc = cfg.out_channels();
        // (b, gt·gh·gw, oc·pt·p·p) -> (b, gt, gh, gw, oc, pt, p, p)
        let y = y.reshape(vec![b, gt, gh, gw, oc, pt, p, p])?;
        // -> (b, oc, gt, pt, gh, p, gw, p) -> (b, oc, t, h, w)
        y.permute(vec![0, 4, 1, 5, 2, 6, 3, 7])?
            .contiguous()?
            .reshape((b, oc, t, h, w))
    }
}
