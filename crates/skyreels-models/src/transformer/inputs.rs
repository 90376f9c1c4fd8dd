//! The inputs of one forward pass, and the shapes they must have.

use super::TransformerConfig;
use candle_core::{bail, DType, Device, Result, Tensor};
use std::collections::HashMap;

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
    /// RIFLEx: the temporal RoPE frequency (1-based) lowered for long clips; 0: off (see
    /// [`crate::layers::rope::rope_tables`]).
    pub riflex_freq_index: usize,
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
    riflex_freq_index: usize,
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
            riflex_freq_index: self.riflex_freq_index,
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
            riflex_freq_index: self.riflex_freq_index,
        })
    }

    /// The inputs from tensors named as the reference's arguments (`guidance` optional), RIFLEx
    /// off.
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
            riflex_freq_index: 0,
        })
    }
}

/// The sizes of one forward, read from its checked inputs.
#[derive(Debug, Clone, Copy)]
pub(super) struct Shapes {
    pub(super) batch: usize,
    /// Latent frames, height and width.
    pub(super) thw: (usize, usize, usize),
    /// The token grid: (t / patch_size_t, h / patch_size, w / patch_size).
    pub(super) grid: (usize, usize, usize),
}

impl Shapes {
    /// Image tokens of the clip.
    pub(super) fn n_img(&self) -> usize {
        let (gt, gh, gw) = self.grid;
        gt * gh * gw
    }
}

impl TransformerInputs<'_> {
    /// Checks every input's shape against `cfg` and the others; returns the forward's sizes and
    /// the text padding.
    pub(super) fn check(&self, cfg: &TransformerConfig) -> Result<(Shapes, TextMask)> {
        let (b, c_in, t, h, w) = self.hidden_states.dims5()?;
        if c_in != cfg.in_channels {
            bail!(
                "hidden_states {:?} has {c_in} channels, the transformer expects in_channels {}",
                self.hidden_states.shape(),
                cfg.in_channels
            )
        }
        let (p, pt) = (cfg.patch_size, cfg.patch_size_t);
        if t % pt != 0 || h % p != 0 || w % p != 0 {
            bail!(
                "hidden_states {:?}: height and width must be multiples of {p} (patch_size) and \
                 frames of {pt} (patch_size_t)",
                self.hidden_states.shape()
            )
        }
        let (tb, n_txt, txt_dim) = self.encoder_hidden_states.dims3()?;
        if tb != b || txt_dim != cfg.text_embed_dim {
            bail!(
                "encoder_hidden_states {:?} must be ({b}, n, {})",
                self.encoder_hidden_states.shape(),
                cfg.text_embed_dim
            )
        }
        if self.pooled_projections.dims() != [b, cfg.pooled_projection_dim] {
            bail!(
                "pooled_projections {:?} must be ({b}, {})",
                self.pooled_projections.shape(),
                cfg.pooled_projection_dim
            )
        }
        if self.timestep.dims() != [b] {
            bail!("timestep {:?} must be ({b},)", self.timestep.shape())
        }
        if let Some(g) = self.guidance {
            if g.dims() != [b] {
                bail!("guidance {:?} must be ({b},)", g.shape())
            }
        }
        let text_mask = TextMask::new(self.encoder_attention_mask, n_txt)?;
        let shapes = Shapes {
            batch: b,
            thw: (t, h, w),
            grid: (t / pt, h / p, w / p),
        };
        Ok((shapes, text_mask))
    }
}

/// Per-sample description of the text padding, read once from the mask.
#[derive(Debug, Clone)]
pub(super) struct TextMask {
    /// For each sample, the flags of the text tokens.
    pub(super) valid: Vec<Vec<bool>>,
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
    pub(super) fn joint_key_counts(&self, n_img: usize) -> Vec<usize> {
        self.valid
            .iter()
            .map(|r| n_img + r.iter().filter(|&&v| v).count())
            .collect()
    }
}
