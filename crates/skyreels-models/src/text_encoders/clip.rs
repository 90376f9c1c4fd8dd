//! `CLIPTextModel`'s pooled output: the final-layer-normed state at the end-of-text token.

use super::{causal_mask, masked_attention};
use crate::layers::{
    linear::{linear, Linear},
    norm::LayerNorm,
};
use candle_core::{bail, DType, IndexOp, Module, Result, Tensor};
use candle_nn::{Embedding, VarBuilder};
use serde::Deserialize;

/// The fields of transformers' `CLIPTextConfig` the pooled output needs.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ClipTextConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub max_position_embeddings: usize,
    #[serde(default = "default_act")]
    pub hidden_act: String,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    /// 2 in configs saved before transformers PR #24773: then the pooled token is the argmax of
    /// the ids (the end-of-text token has the highest id); otherwise the first `eos_token_id`.
    #[serde(default = "default_eos")]
    pub eos_token_id: u32,
}

fn default_act() -> String {
    "quick_gelu".into()
}

fn default_eps() -> f64 {
    1e-5
}

fn default_eos() -> u32 {
    2
}

impl ClipTextConfig {
    pub fn validate(&self) -> Result<()> {
        if !matches!(self.hidden_act.as_str(), "quick_gelu" | "gelu") {
            bail!(
                "clip config: hidden_act {:?} is not supported",
                self.hidden_act
            )
        }
        if self.num_attention_heads == 0
            || !self.hidden_size.is_multiple_of(self.num_attention_heads)
        {
            bail!(
                "clip config: hidden_size {} must be a multiple of num_attention_heads {}",
                self.hidden_size,
                self.num_attention_heads
            )
        }
        Ok(())
    }
}

#[derive(Debug, Clone)]
struct EncoderLayer {
    layer_norm1: LayerNorm,
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    layer_norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    heads: usize,
    quick_gelu: bool,
}

impl EncoderLayer {
    fn new(cfg: &ClipTextConfig, vb: VarBuilder) -> Result<Self> {
        let (d, eps) = (cfg.hidden_size, cfg.layer_norm_eps);
        let a = vb.pp("self_attn");
        Ok(Self {
            layer_norm1: LayerNorm::new(d, eps, vb.pp("layer_norm1"))?,
            q_proj: linear(d, d, a.pp("q_proj"))?,
            k_proj: linear(d, d, a.pp("k_proj"))?,
            v_proj: linear(d, d, a.pp("v_proj"))?,
            out_proj: linear(d, d, a.pp("out_proj"))?,
            layer_norm2: LayerNorm::new(d, eps, vb.pp("layer_norm2"))?,
            fc1: linear(d, cfg.intermediate_size, vb.pp("mlp.fc1"))?,
            fc2: linear(cfg.intermediate_size, d, vb.pp("mlp.fc2"))?,
            heads: cfg.num_attention_heads,
            quick_gelu: cfg.hidden_act == "quick_gelu",
        })
    }

    fn forward(&self, x: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let (b, n, d) = x.dims3()?;
        let h = self.heads;
        let xn = self.layer_norm1.forward(x)?;
        // (b, n, d) -> (b, heads, n, d / heads)
        let split = |t: Tensor| t.reshape((b, n, h, d / h))?.transpose(1, 2)?.contiguous();
        let q = split(self.q_proj.forward(&xn)?)?;
        let k = split(self.k_proj.forward(&xn)?)?;
        let v = split(self.v_proj.forward(&xn)?)?;
        // (b, heads, n, d / heads) -> (b, n, d)
        let a = masked_attention(&q, &k, &v, mask)?
            .transpose(1, 2)?
            .reshape((b, n, d))?;
        let x = (x + self.out_proj.forward(&a)?)?;
        let hmid = self.fc1.forward(&self.layer_norm2.forward(&x)?)?;
        let hmid = if self.quick_gelu {
            // x · sigmoid(1.702 x)
            (&hmid * candle_nn::ops::sigmoid(&(&hmid * 1.702)?)?)?
        } else {
            hmid.gelu_erf()?
        };
        x + self.fc2.forward(&hmid)?
    }
}

/// The CLIP text transformer (`text_model.*`) up to its pooled output.
#[derive(Debug, Clone)]
pub struct ClipTextModel {
    token_embedding: Embedding,
    position_embedding: Embedding,
    layers: Vec<EncoderLayer>,
    final_layer_norm: LayerNorm,
    cfg: ClipTextConfig,
}

impl ClipTextModel {
    /// `vb` is the `text_model` node (`embeddings`, `encoder`, `final_layer_norm`).
    pub fn new(cfg: &ClipTextConfig, vb: VarBuilder) -> Result<Self> {
        cfg.validate()?;
        let d = cfg.hidden_size;
        let emb = vb.pp("embeddings");
        Ok(Self {
            token_embedding: candle_nn::embedding(cfg.vocab_size, d, emb.pp("token_embedding"))?,
            position_embedding: candle_nn::embedding(
                cfg.max_position_embeddings,
                d,
                emb.pp("position_embedding"),
            )?,
            layers: (0..cfg.num_hidden_layers)
                .map(|i| EncoderLayer::new(cfg, vb.pp("encoder.layers").pp(i)))
                .collect::<Result<_>>()?,
            final_layer_norm: LayerNorm::new(d, cfg.layer_norm_eps, vb.pp("final_layer_norm"))?,
            cfg: cfg.clone(),
        })
    }

    /// `pooler_output` (b, hidden) for token ids (b, n): causal attention, no padding mask (as
    /// HunyuanVideo calls it), pooled at the end-of-text position.
    pub fn pooled(&self, ids: &Tensor) -> Result<Tensor> {
        let (b, n) = ids.dims2()?;
        if n > self.cfg.max_position_embeddings {
            bail!(
                "clip: {n} tokens exceed max_position_embeddings {}",
                self.cfg.max_position_embeddings
            )
        }
        let dev = ids.device();
        let positions = Tensor::arange(0u32, n as u32, dev)?;
        let mut x = self
            .token_embedding
            .forward(ids)?
            .broadcast_add(&self.position_embedding.forward(&positions)?)?;
        let mask = causal_mask(&Tensor::ones((b, n), DType::F32, dev)?, x.dtype())?;
        for layer in &self.layers {
            x = layer.forward(&x, &mask)?;
        }
        let x = self.final_layer_norm.forward(&x)?;
        let rows = ids.to_dtype(DType::U32)?.to_vec2::<u32>()?;
        let pooled = rows
            .iter()
            .enumerate()
            .map(|(i, row)| x.i((i, self.eos_position(row)?)))
            .collect::<Result<Vec<_>>>()?;
        Tensor::stack(&pooled, 0)
    }

    /// The reference's pooling index for one row of ids (first maximum / first EOS).
    fn eos_position(&self, ids: &[u32]) -> Result<usize> {
        let pos = if self.cfg.eos_token_id == 2 {
            let max = ids.iter().copied().max().unwrap_or(0);
            ids.iter().position(|&t| t == max)
        } else {
            // no EOS: argmax of all-zero flags is 0
            Some(
                ids.iter()
                    .position(|&t| t == self.cfg.eos_token_id)
                    .unwrap_or(0),
            )
        };
        match pos {
            Some(p) => Ok(p),
            None => bail!("clip: empty token sequence"),
        }
    }
}
