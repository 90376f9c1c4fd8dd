//! `CLIPVisionModel`'s pooled output: patch and position embeddings, `pre_layrnorm` (sic), the
//! encoder, and `post_layernorm` on the class token.
//!
//! <https://github.com/huggingface/transformers/blob/v5.24.0/src/transformers/models/clip/modeling_clip.py#L138-L218>
//! <https://github.com/huggingface/transformers/blob/v5.24.0/src/transformers/models/clip/modeling_clip.py#L584-L647>

use super::{ClipEncoder, EncoderDims};
use crate::layers::{linear::Linear, norm::LayerNorm, weights::MatmulWeight};
use candle_core::{bail, IndexOp, Module, Result, Tensor};
use candle_nn::VarBuilder;
use serde::Deserialize;

/// The fields of transformers' `CLIPVisionConfig` the pooled output needs; absent fields take
/// `CLIPVisionConfig`'s defaults (ViT-B/32), as configs saved with only the non-default values
/// rely on.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct ClipVisionConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_channels: usize,
    pub image_size: usize,
    pub patch_size: usize,
    pub hidden_act: String,
    pub layer_norm_eps: f64,
}

impl Default for ClipVisionConfig {
    fn default() -> Self {
        Self {
            hidden_size: 768,
            intermediate_size: 3072,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            num_channels: 3,
            image_size: 224,
            patch_size: 32,
            hidden_act: "quick_gelu".into(),
            layer_norm_eps: 1e-5,
        }
    }
}

impl ClipVisionConfig {
    pub fn validate(&self) -> Result<()> {
        self.encoder_dims()?;
        if self.patch_size == 0 || self.image_size < self.patch_size || self.num_channels == 0 {
            bail!(
                "clip vision config: image_size {} needs at least one patch of patch_size {} and \
                 num_channels {} > 0",
                self.image_size,
                self.patch_size,
                self.num_channels
            )
        }
        Ok(())
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

    /// Patches per side: the stride-`patch_size` convolution drops what is left over.
    fn grid(&self) -> usize {
        self.image_size / self.patch_size
    }
}

/// `CLIPVisionEmbeddings`: a bias-free stride-`patch_size` convolution (applied as a matmul over
/// flattened patches), the class embedding in front, position embeddings added.
#[derive(Debug, Clone)]
struct ClipVisionEmbeddings {
    class_embedding: Tensor,
    /// `patch_embedding.weight` (hidden, channels, p, p) as (hidden, channels · p · p)
    patch_embedding: Linear,
    /// `position_embedding.weight` (1 + grid², hidden)
    position_embedding: Tensor,
}

impl ClipVisionEmbeddings {
    fn new(cfg: &ClipVisionConfig, vb: VarBuilder) -> Result<Self> {
        let (d, c, p) = (cfg.hidden_size, cfg.num_channels, cfg.patch_size);
        let conv = vb.pp("patch_embedding").get((d, c, p, p), "weight")?;
        let positions = cfg.grid() * cfg.grid() + 1;
        Ok(Self {
            class_embedding: vb.get(d, "class_embedding")?,
            // (hidden, c, p, p) -> (hidden, c·p·p)
            patch_embedding: Linear::new(MatmulWeight::Dense(conv.reshape((d, c * p * p))?), None),
            position_embedding: vb.pp("position_embedding").get((positions, d), "weight")?,
        })
    }

    fn forward(&self, pixel_values: &Tensor, cfg: &ClipVisionConfig) -> Result<Tensor> {
        let (b, c, h, w) = pixel_values.dims4()?;
        let (s, p, g) = (cfg.image_size, cfg.patch_size, cfg.grid());
        if (c, h, w) != (cfg.num_channels, s, s) {
            bail!(
                "clip vision: input {:?} does not match the model's ({b}, {}, {s}, {s})",
                pixel_values.dims(),
                cfg.num_channels
            )
        }
        let x = pixel_values
            .narrow(2, 0, g * p)?
            .narrow(3, 0, g * p)?
            .to_dtype(self.class_embedding.dtype())?;
        // (b, c, g·p, g·p) -> (b, c, g, p, g, p) -> (b, g, g, c, p, p) -> (b, g², c·p·p)
        let patches = x
            .reshape((b, c, g, p, g, p))?
            .permute((0, 2, 4, 1, 3, 5))?
            .contiguous()?
            .reshape((b, g * g, c * p * p))?;
        let patch_embeds = self.patch_embedding.forward(&patches)?;
        let d = self.class_embedding.dim(0)?;
        // (hidden,) -> (b, 1, hidden)
        let class_embeds = self.class_embedding.reshape((1, 1, d))?.repeat((b, 1, 1))?;
        Tensor::cat(&[class_embeds, patch_embeds], 1)?.broadcast_add(&self.position_embedding)
    }
}

/// `CLIPVisionModel` (transformers 5.x's flat module; 4.x nested it as `vision_model.*`) up to its
/// pooled output.
#[derive(Debug, Clone)]
pub struct ClipVisionModel {
    embeddings: ClipVisionEmbeddings,
    pre_layrnorm: LayerNorm,
    encoder: ClipEncoder,
    post_layernorm: LayerNorm,
    cfg: ClipVisionConfig,
}

impl ClipVisionModel {
    /// `vb` is the node holding `embeddings`, `pre_layrnorm`, `encoder` and `post_layernorm`.
    pub fn new(cfg: &ClipVisionConfig, vb: VarBuilder) -> Result<Self> {
        cfg.validate()?;
        let (d, eps) = (cfg.hidden_size, cfg.layer_norm_eps);
        Ok(Self {
            embeddings: ClipVisionEmbeddings::new(cfg, vb.pp("embeddings"))?,
            pre_layrnorm: LayerNorm::new(d, eps, vb.pp("pre_layrnorm"))?,
            encoder: ClipEncoder::new(&cfg.encoder_dims()?, vb.pp("encoder"))?,
            post_layernorm: LayerNorm::new(d, eps, vb.pp("post_layernorm"))?,
            cfg: cfg.clone(),
        })
    }

    pub fn config(&self) -> &ClipVisionConfig {
        &self.cfg
    }

    /// `pooler_output` (b, hidden): `post_layernorm` of the class token's last hidden state, for
    /// pixel values (b, channels, image_size, image_size).
    pub fn pooled(&self, pixel_values: &Tensor) -> Result<Tensor> {
        let x = self.embeddings.forward(pixel_values, &self.cfg)?;
        let x = self.pre_layrnorm.forward(&x)?;
        let x = self.encoder.forward(&x, None)?;
        // (b, n, hidden) -> (b, hidden)
        self.post_layernorm.forward(&x.i((.., 0))?)
    }
}
