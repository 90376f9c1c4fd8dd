//! `HunyuanVideoTransformer3DModel`: the SkyReels V1 diffusion transformer.
//!
//! Struct and field names follow diffusers' `transformer_hunyuan_video.py`, so the state-dict keys
//! of a checkpoint are exactly the `vb.pp(..)` paths below ([`Weights`]: matmul weights may come in
//! their stored form, fp8 or GGUF).
//! <https://github.com/huggingface/diffusers/blob/58eb52c0803ea9af3abec60841c2a093bdf1f951/src/diffusers/models/transformers/transformer_hunyuan_video.py>
//!
//! This file builds the model; the forward pass is embed -> block loop -> head (`forward.rs`,
//! `embed.rs`, `blocks.rs`, `head.rs`), with the step caches (`cache.rs`) and Ulysses sequence
//! parallelism (`ulysses.rs`) wrapped around the block loop.

mod blocks;
mod cache;
mod config;
mod embed;
mod forward;
mod head;
mod inputs;
mod linears;
mod ulysses;

pub use cache::{Branch, CacheSpec, MagRatios, StepCache, TEACACHE_COEFFICIENTS};
pub use config::TransformerConfig;
pub use inputs::{InputsOn, TransformerInputs};

use crate::layers::{
    attention::default_score_budget,
    conv3d::{Conv3d, Conv3dConfig},
    embeddings::{TextProjection, TimestepEmbedding},
    linear::{linear, Linear},
    norm::{LayerNorm, RmsNorm},
    weights::Weights,
};
use candle_core::{DType, Device, Result, Tensor};
use std::sync::{Arc, Mutex};

const NORM_EPS: f64 = 1e-6;
/// Width of the sinusoidal timestep projection (`Timesteps(num_channels=256)`).
const TIME_PROJ_DIM: usize = 256;
/// The token refiner's MLP ratio: `HunyuanVideoTokenRefiner` is built with its default 4.0, not
/// the config's `mlp_ratio`.
const REFINER_MLP_RATIO: f64 = 4.0;

/// `FeedForward`: net.2(act(net.0.proj(x))).
#[derive(Debug, Clone)]
struct FeedForward {
    proj_in: Linear,
    proj_out: Linear,
    gelu: bool,
}

impl FeedForward {
    /// `activation_fn="gelu-approximate"` when `gelu`, otherwise `"linear-silu"`.
    fn new(dim: usize, inner: usize, gelu: bool, vb: Weights) -> Result<Self> {
        Ok(Self {
            proj_in: linear(dim, inner, vb.pp("net.0.proj"))?,
            proj_out: linear(inner, dim, vb.pp("net.2"))?,
            gelu,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Conditioning

/// `HunyuanVideoConditionEmbedding` (transformer) and `CombinedTimestepTextProjEmbeddings`
/// (refiner, no guidance): timestep + [guidance] + text projection.
///
/// <https://github.com/huggingface/diffusers/blob/58eb52c0803ea9af3abec60841c2a093bdf1f951/src/diffusers/models/transformers/transformer_hunyuan_video.py#L289-L329>
/// <https://github.com/huggingface/diffusers/blob/v0.42.1/src/diffusers/models/embeddings.py#L1350-L1366>
#[derive(Debug, Clone)]
struct ConditionEmbedding {
    timestep_embedder: TimestepEmbedding,
    text_embedder: TextProjection,
    guidance_embedder: Option<TimestepEmbedding>,
}

impl ConditionEmbedding {
    fn new(dim: usize, pooled_dim: usize, guidance: bool, vb: Weights) -> Result<Self> {
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
    fn new(dim: usize, heads: usize, vb: Weights) -> Result<Self> {
        Ok(Self {
            to_q: linear(dim, dim, vb.pp("to_q"))?,
            to_k: linear(dim, dim, vb.pp("to_k"))?,
            to_v: linear(dim, dim, vb.pp("to_v"))?,
            to_out: linear(dim, dim, vb.pp("to_out.0"))?,
            heads,
        })
    }
}

/// `HunyuanVideoIndividualTokenRefinerBlock`.
///
/// <https://github.com/huggingface/diffusers/blob/58eb52c0803ea9af3abec60841c2a093bdf1f951/src/diffusers/models/transformers/transformer_hunyuan_video.py#L332-L379>
#[derive(Debug, Clone)]
struct RefinerBlock {
    norm1: LayerNorm,
    attn: RefinerAttention,
    norm2: LayerNorm,
    ff: FeedForward,
    norm_out: Linear,
}

impl RefinerBlock {
    fn new(cfg: &TransformerConfig, vb: Weights) -> Result<Self> {
        let dim = cfg.inner_dim();
        Ok(Self {
            norm1: LayerNorm::new(dim, NORM_EPS, vb.pp("norm1").dense())?,
            attn: RefinerAttention::new(dim, cfg.num_attention_heads, vb.pp("attn"))?,
            norm2: LayerNorm::new(dim, NORM_EPS, vb.pp("norm2").dense())?,
            ff: FeedForward::new(
                dim,
                (dim as f64 * REFINER_MLP_RATIO) as usize,
                false,
                vb.pp("ff"),
            )?,
            norm_out: linear(dim, 2 * dim, vb.pp("norm_out.linear"))?,
        })
    }
}

/// `HunyuanVideoTokenRefiner` (`context_embedder`).
///
/// <https://github.com/huggingface/diffusers/blob/58eb52c0803ea9af3abec60841c2a093bdf1f951/src/diffusers/models/transformers/transformer_hunyuan_video.py#L429-L475>
#[derive(Debug, Clone)]
struct TokenRefiner {
    time_text_embed: ConditionEmbedding,
    proj_in: Linear,
    refiner_blocks: Vec<RefinerBlock>,
}

impl TokenRefiner {
    fn new(cfg: &TransformerConfig, vb: Weights) -> Result<Self> {
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
    fn new(dim: usize, head_dim: usize, names: [&str; 5], vb: &Weights) -> Result<Self> {
        Ok(Self {
            q: linear(dim, dim, vb.pp(names[0]))?,
            k: linear(dim, dim, vb.pp(names[1]))?,
            v: linear(dim, dim, vb.pp(names[2]))?,
            norm_q: RmsNorm::new(head_dim, NORM_EPS, vb.pp(names[3]).dense())?,
            norm_k: RmsNorm::new(head_dim, NORM_EPS, vb.pp(names[4]).dense())?,
        })
    }
}

/// `HunyuanVideoTransformerBlock`: dual-stream (image and text weights, joint attention).
///
/// <https://github.com/huggingface/diffusers/blob/58eb52c0803ea9af3abec60841c2a093bdf1f951/src/diffusers/models/transformers/transformer_hunyuan_video.py#L587-L663>
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
    fn new(cfg: &TransformerConfig, vb: Weights) -> Result<Self> {
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
}

/// `HunyuanVideoSingleTransformerBlock`: one stream over [img; txt], attention and MLP in parallel.
///
/// <https://github.com/huggingface/diffusers/blob/58eb52c0803ea9af3abec60841c2a093bdf1f951/src/diffusers/models/transformers/transformer_hunyuan_video.py#L511-L584>
#[derive(Debug, Clone)]
struct SingleTransformerBlock {
    norm: Linear,
    qkv: QkvNorm,
    proj_mlp: Linear,
    proj_out: Linear,

    heads: usize,
}

impl SingleTransformerBlock {
    fn new(cfg: &TransformerConfig, vb: Weights) -> Result<Self> {
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
}

// ---------------------------------------------------------------------------------------------
// The model

/// The HunyuanVideo / SkyReels V1 diffusion transformer.
///
/// <https://github.com/huggingface/diffusers/blob/58eb52c0803ea9af3abec60841c2a093bdf1f951/src/diffusers/models/transformers/transformer_hunyuan_video.py#L841-L1126>
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
    riflex: usize,
    cos: Tensor,
    sin: Tensor,
}

impl HunyuanVideoTransformer3DModel {
    /// Builds the model from `vb`: fp8 and GGUF matmul weights as it stores them when it has a
    /// stored source, everything else dense (a plain `VarBuilder` converts into a dense-only
    /// [`Weights`]).
    pub fn new<'a>(cfg: &TransformerConfig, vb: impl Into<Weights<'a>>) -> Result<Self> {
        let vb = vb.into();
        cfg.validate()?;
        let dim = cfg.inner_dim();
        let dtype = vb.dtype();
        let (p, pt) = (cfg.patch_size, cfg.patch_size_t);
        let x_embedder = Conv3d::new(
            cfg.in_channels,
            dim,
            (pt, p, p),
            Conv3dConfig { stride: (pt, p, p) },
            vb.pp("x_embedder.proj").dense(),
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

    pub fn config(&self) -> &TransformerConfig {
        &self.cfg
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn device(&self) -> &Device {
        self.x_embedder.weight().device()
    }
}
