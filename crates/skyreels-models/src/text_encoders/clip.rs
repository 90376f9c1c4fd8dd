//! `CLIPTextModel`'s pooled output: the final-layer-normed state at the end-of-text token.

use super::causal_mask;
use crate::clip::{ClipEncoder, EncoderDims};
use crate::layers::norm::LayerNorm;
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
        self.encoder_dims().map(drop)
    }

    fn encoder_dims(&self) -> Result<EncoderDims> {
        EncoderDims::new(
            self.hidden_size,
            self.intermediate_size,
            self.num_hidden_layers,
            self.num_attention_heads,
            &self.hidden_act,
            self.layer_norm_eps,
        )
    }
}

/// The CLIP text transformer (`text_model.*`) up to its pooled output.
#[derive(Debug, Clone)]
pub struct ClipTextModel {
    token_embedding: Embedding,
    position_embedding: Embedding,
    encoder: ClipEncoder,
    final_layer_norm: LayerNorm,
    cfg: ClipTextConfig,
}

impl ClipTextModel {
    /// `vb` is the `text_model` node (`embeddings`, `encoder`, `final_layer_norm`).
    pub fn new(cfg: &ClipTextConfig, vb: VarBuilder) -> Result<Self> {
        let dims = cfg.encoder_dims()?;
        let d = cfg.hidden_size;
        let emb = vb.pp("embeddings");
        Ok(Self {
            token_embedding: candle_nn::embedding(cfg.vocab_size, d, emb.pp("token_embedding"))?,
            position_embedding: candle_nn::embedding(
                cfg.max_position_embeddings,
                d,
                emb.pp("position_embedding"),
            )?,
            encoder: ClipEncoder::new(&dims, vb.pp("encoder"))?,
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
        let x = self
            .token_embedding
            .forward(ids)?
            .broadcast_add(&self.position_embedding.forward(&positions)?)?;
        let mask = causal_mask(&Tensor::ones((b, n), DType::F32, dev)?, x.dtype())?;
        let x = self.encoder.forward(&x, Some(&mask))?;
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
