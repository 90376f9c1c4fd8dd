//! `HunyuanVideoTransformer3DModel` configuration, read from the checkpoint's `config.json`.

use candle_core::{bail, Result};
use serde::Deserialize;

/// Every field of diffusers' `HunyuanVideoTransformer3DModel.__init__`, with its defaults.
///
/// <https://github.com/huggingface/diffusers/blob/58eb52c0803ea9af3abec60841c2a093bdf1f951/src/diffusers/models/transformers/transformer_hunyuan_video.py#L903-L992>
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct TransformerConfig {
    #[serde(default = "d::in_channels")]
    pub in_channels: usize,
    /// `out_channels or in_channels` in the reference: null or absent means `in_channels`.
    #[serde(default)]
    pub out_channels: Option<usize>,
    #[serde(default = "d::num_attention_heads")]
    pub num_attention_heads: usize,
    #[serde(default = "d::attention_head_dim")]
    pub attention_head_dim: usize,
    #[serde(default = "d::num_layers")]
    pub num_layers: usize,
    #[serde(default = "d::num_single_layers")]
    pub num_single_layers: usize,
    #[serde(default = "d::num_refiner_layers")]
    pub num_refiner_layers: usize,
    #[serde(default = "d::mlp_ratio")]
    pub mlp_ratio: f64,
    #[serde(default = "d::patch_size")]
    pub patch_size: usize,
    #[serde(default = "d::patch_size_t")]
    pub patch_size_t: usize,
    #[serde(default = "d::qk_norm")]
    pub qk_norm: String,
    #[serde(default = "d::guidance_embeds")]
    pub guidance_embeds: bool,
    #[serde(default = "d::text_embed_dim")]
    pub text_embed_dim: usize,
    #[serde(default = "d::pooled_projection_dim")]
    pub pooled_projection_dim: usize,
    #[serde(default = "d::rope_theta")]
    pub rope_theta: f64,
    #[serde(default = "d::rope_axes_dim")]
    pub rope_axes_dim: Vec<usize>,
    #[serde(default)]
    pub image_condition_type: Option<String>,
}

mod d {
    pub fn in_channels() -> usize {
        16
    }
    pub fn num_attention_heads() -> usize {
        24
    }
    pub fn attention_head_dim() -> usize {
        128
    }
    pub fn num_layers() -> usize {
        20
    }
    pub fn num_single_layers() -> usize {
        40
    }
    pub fn num_refiner_layers() -> usize {
        2
    }
    pub fn mlp_ratio() -> f64 {
        4.0
    }
    pub fn patch_size() -> usize {
        2
    }
    pub fn patch_size_t() -> usize {
        1
    }
    pub fn qk_norm() -> String {
        "rms_norm".into()
    }
    pub fn guidance_embeds() -> bool {
        true
    }
    pub fn text_embed_dim() -> usize {
        4096
    }
    pub fn pooled_projection_dim() -> usize {
        768
    }
    pub fn rope_theta() -> f64 {
        256.0
    }
    pub fn rope_axes_dim() -> Vec<usize> {
        vec![16, 56, 56]
    }
}

impl Default for TransformerConfig {
    fn default() -> Self {
        Self {
            in_channels: d::in_channels(),
            out_channels: Some(16),
            num_attention_heads: d::num_attention_heads(),
            attention_head_dim: d::attention_head_dim(),
            num_layers: d::num_layers(),
            num_single_layers: d::num_single_layers(),
            num_refiner_layers: d::num_refiner_layers(),
            mlp_ratio: d::mlp_ratio(),
            patch_size: d::patch_size(),
            patch_size_t: d::patch_size_t(),
            qk_norm: d::qk_norm(),
            guidance_embeds: d::guidance_embeds(),
            text_embed_dim: d::text_embed_dim(),
            pooled_projection_dim: d::pooled_projection_dim(),
            rope_theta: d::rope_theta(),
            rope_axes_dim: d::rope_axes_dim(),
            image_condition_type: None,
        }
    }
}

impl TransformerConfig {
    /// num_attention_heads × attention_head_dim.
    pub fn inner_dim(&self) -> usize {
        self.num_attention_heads * self.attention_head_dim
    }

    pub fn out_channels(&self) -> usize {
        self.out_channels.unwrap_or(self.in_channels)
    }

    /// `int(hidden_size * mlp_ratio)`, as Python truncates it.
    pub fn mlp_dim(&self) -> usize {
        (self.inner_dim() as f64 * self.mlp_ratio) as usize
    }

    /// Rejects configurations this implementation does not cover, naming the field.
    pub fn validate(&self) -> Result<()> {
        if self.qk_norm != "rms_norm" {
            bail!(
                "transformer config: qk_norm {:?} is not supported (only \"rms_norm\")",
                self.qk_norm
            )
        }
        if let Some(kind) = &self.image_condition_type {
            bail!(
                "transformer config: image_condition_type {kind:?} (Tencent HunyuanVideo-I2V) is not \
                 supported; SkyReels checkpoints have none"
            )
        }
        if self.rope_axes_dim.len() != 3
            || self.rope_axes_dim.iter().sum::<usize>() != self.attention_head_dim
            || self.rope_axes_dim.iter().any(|d| d % 2 != 0)
        {
            bail!(
                "transformer config: rope_axes_dim {:?} must be three even sizes summing to \
                 attention_head_dim {}",
                self.rope_axes_dim,
                self.attention_head_dim
            )
        }
        if self.patch_size == 0 || self.patch_size_t == 0 {
            bail!("transformer config: patch sizes must be positive")
        }
        if self.inner_dim() == 0 || self.in_channels == 0 {
            bail!("transformer config: empty model (heads, head dim or in_channels is 0)")
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_the_class_defaults() {
        let c: TransformerConfig = serde_json::from_str("{}").unwrap();
        assert_eq!(c.out_channels(), 16);
        assert_eq!(c.inner_dim(), 3072);
        assert_eq!(c.mlp_dim(), 12288);
        assert_eq!(c.rope_axes_dim, vec![16, 56, 56]);
        c.validate().unwrap();
        // out_channels: null falls back to in_channels, as `out_channels or in_channels` does
        let c: TransformerConfig =
            serde_json::from_str(r#"{"in_channels": 32, "out_channels": null}"#).unwrap();
        assert_eq!(c.out_channels(), 32);
    }

    #[test]
    fn skyreels_i2v_config_parses() {
        let c: TransformerConfig = serde_json::from_str(
            r#"{"_class_name": "HunyuanVideoTransformer3DModel", "_diffusers_version": "0.32.2",
                "in_channels": 32, "out_channels": 16, "rope_axes_dim": [16, 56, 56]}"#,
        )
        .unwrap();
        assert_eq!((c.in_channels, c.out_channels()), (32, 16));
    }

    #[test]
    fn unsupported_fields_are_named() {
        let c: TransformerConfig =
            serde_json::from_str(r#"{"image_condition_type": "token_replace"}"#).unwrap();
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("image_condition_type"));
        let c: TransformerConfig = serde_json::from_str(r#"{"rope_axes_dim": [16, 56]}"#).unwrap();
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("rope_axes_dim"));
    }
}
