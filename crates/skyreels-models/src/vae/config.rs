//! `AutoencoderKLHunyuanVideo` configuration, read from the VAE's `config.json`.

use candle_core::{bail, Result};
use serde::Deserialize;

/// Every field of diffusers' `AutoencoderKLHunyuanVideo.__init__`, with its defaults.
///
/// <https://github.com/huggingface/diffusers/blob/58eb52c0803ea9af3abec60841c2a093bdf1f951/src/diffusers/models/autoencoders/autoencoder_kl_hunyuan_video.py#L636-L722>
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct VaeConfig {
    #[serde(default = "d::rgb")]
    pub in_channels: usize,
    #[serde(default = "d::rgb")]
    pub out_channels: usize,
    #[serde(default = "d::latent_channels")]
    pub latent_channels: usize,
    #[serde(default = "d::down_block_types")]
    pub down_block_types: Vec<String>,
    #[serde(default = "d::up_block_types")]
    pub up_block_types: Vec<String>,
    #[serde(default = "d::block_out_channels")]
    pub block_out_channels: Vec<usize>,
    #[serde(default = "d::layers_per_block")]
    pub layers_per_block: usize,
    #[serde(default = "d::act_fn")]
    pub act_fn: String,
    #[serde(default = "d::norm_num_groups")]
    pub norm_num_groups: usize,
    #[serde(default = "d::scaling_factor")]
    pub scaling_factor: f64,
    #[serde(default = "d::spatial_compression_ratio")]
    pub spatial_compression_ratio: usize,
    #[serde(default = "d::temporal_compression_ratio")]
    pub temporal_compression_ratio: usize,
    #[serde(default = "d::mid_block_add_attention")]
    pub mid_block_add_attention: bool,
}

mod d {
    pub fn rgb() -> usize {
        3
    }
    pub fn latent_channels() -> usize {
        16
    }
    pub fn down_block_types() -> Vec<String> {
        vec!["HunyuanVideoDownBlock3D".into(); 4]
    }
    pub fn up_block_types() -> Vec<String> {
        vec!["HunyuanVideoUpBlock3D".into(); 4]
    }
    pub fn block_out_channels() -> Vec<usize> {
        vec![128, 256, 512, 512]
    }
    pub fn layers_per_block() -> usize {
        2
    }
    pub fn act_fn() -> String {
        "silu".into()
    }
    pub fn norm_num_groups() -> usize {
        32
    }
    pub fn scaling_factor() -> f64 {
        0.476986
    }
    pub fn spatial_compression_ratio() -> usize {
        8
    }
    pub fn temporal_compression_ratio() -> usize {
        4
    }
    pub fn mid_block_add_attention() -> bool {
        true
    }
}

impl VaeConfig {
    /// Rejects configurations the reference itself rejects or this implementation does not cover.
    pub fn validate(&self) -> Result<()> {
        let n = self.block_out_channels.len();
        if n == 0 || self.down_block_types.len() != n || self.up_block_types.len() != n {
            bail!(
                "vae config: block_out_channels {:?}, down_block_types and up_block_types must have \
                 the same non-zero length",
                self.block_out_channels
            )
        }
        if let Some(t) = self
            .down_block_types
            .iter()
            .find(|t| *t != "HunyuanVideoDownBlock3D")
        {
            bail!("vae config: unsupported down_block_type {t:?}")
        }
        if let Some(t) = self
            .up_block_types
            .iter()
            .find(|t| *t != "HunyuanVideoUpBlock3D")
        {
            bail!("vae config: unsupported up_block_type {t:?}")
        }
        if self.temporal_compression_ratio != 4 {
            bail!(
                "vae config: temporal_compression_ratio {} is not supported (only 4)",
                self.temporal_compression_ratio
            )
        }
        if !self.spatial_compression_ratio.is_power_of_two() || self.spatial_compression_ratio < 2 {
            bail!(
                "vae config: spatial_compression_ratio {} must be a power of two",
                self.spatial_compression_ratio
            )
        }
        if !matches!(self.act_fn.as_str(), "silu" | "swish") {
            bail!(
                "vae config: act_fn {:?} is not supported (only silu)",
                self.act_fn
            )
        }
        let g = self.norm_num_groups;
        if g == 0 || self.block_out_channels.iter().any(|c| c % g != 0) {
            bail!(
                "vae config: norm_num_groups {g} must divide every block_out_channels entry {:?}",
                self.block_out_channels
            )
        }
        Ok(())
    }

    /// Spatial down/upsampling stages: log2(spatial_compression_ratio).
    pub fn spatial_stages(&self) -> usize {
        self.spatial_compression_ratio.trailing_zeros() as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_the_hunyuan_vae() {
        let c: VaeConfig = serde_json::from_str("{}").unwrap();
        assert_eq!(c.block_out_channels, vec![128, 256, 512, 512]);
        assert_eq!((c.latent_channels, c.spatial_stages()), (16, 3));
        assert!((c.scaling_factor - 0.476986).abs() < 1e-12);
        c.validate().unwrap();
        let bad: VaeConfig = serde_json::from_str(r#"{"norm_num_groups": 48}"#).unwrap();
        assert!(bad
            .validate()
            .unwrap_err()
            .to_string()
            .contains("norm_num_groups"));
    }
}
