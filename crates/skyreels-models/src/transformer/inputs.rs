//! The inputs of one forward pass, and the shapes they must have.

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
pub(super) struct TextMask {
    /// For each sample, the flags of the text tokens.
    pub(super) valid: Vec<Vec<bool>>,
}

impl TextMask {
    pub(super) fn new(mask: &Tensor, n_txt: usize) -> Result<Self> {
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
