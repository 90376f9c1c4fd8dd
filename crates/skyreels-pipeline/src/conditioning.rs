//! Prompts to conditioning tensors: the one place that runs tokenizers and text encoders
//! (diffusers' `encode_prompt` of the HunyuanVideo pipelines), and frees the encoders after.
//!
//! <https://github.com/huggingface/diffusers/blob/58eb52c0803ea9af3abec60841c2a093bdf1f951/src/diffusers/pipelines/hunyuan_video/pipeline_hunyuan_skyreels_image2video.py#L333-L367>
//! <https://github.com/huggingface/diffusers/blob/58eb52c0803ea9af3abec60841c2a093bdf1f951/src/diffusers/pipelines/hunyuan_video/pipeline_hunyuan_video.py#L304-L338>

use crate::loading::{
    load_clip_text, load_llama_encoder, open_component, LoadError, TRANSFORMERS_WEIGHTS,
};
use crate::tokenize::{ClipTokenizer, LlamaTokenizer, TokenBatch, TokenizeError, LLAMA_MAX_TOKENS};
use candle_core::{DType, Device, Tensor};
use skyreels_models::text_encoders::{ClipTextConfig, ClipTextModel, LlamaConfig, LlamaEncoder};
use std::path::Path;

/// The widths of what the text encoders give: LLaMA's hidden states and CLIP's pooled vector.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TextWidths {
    pub text: usize,
    pub pooled: usize,
}

/// SkyReels / HunyuanVideo take `hidden_states[-(2 + 1)]` of the LLaMA encoder.
pub const HIDDEN_STATE_SKIP: usize = 2;

#[derive(Debug, thiserror::Error)]
pub enum TextError {
    #[error("the prompt is empty")]
    EmptyPrompt,
    #[error(transparent)]
    Tokenize(#[from] TokenizeError),
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error("text encoding: {0}")]
    Model(#[from] candle_core::Error),
}

/// The transformer's text inputs for a batch of prompts.
#[derive(Debug, Clone)]
pub struct PromptEmbeds {
    /// (b, 256, hidden) LLaMA hidden states after the template tokens.
    pub embeds: Tensor,
    /// (b, 256) u32, 1 for prompt tokens (and the closing `<|eot_id|>`), 0 for padding.
    pub mask: Tensor,
    /// (b, pooled) CLIP pooled vectors.
    pub pooled: Tensor,
    /// Per prompt: cut to fit the LLaMA window, and cut to fit CLIP's 77 tokens.
    pub truncated_llama: Vec<bool>,
    pub truncated_clip: Vec<bool>,
}

/// Conditioning for one generation: the prompt, and the negative prompt when true CFG runs.
#[derive(Debug, Clone)]
pub struct Conditioning {
    pub prompt: PromptEmbeds,
    pub negative: Option<PromptEmbeds>,
}

/// Both tokenizers and both text encoders of a pipeline folder.
pub struct TextEncoders {
    llama_tokenizer: LlamaTokenizer,
    llama: LlamaEncoder,
    clip_tokenizer: ClipTokenizer,
    clip: ClipTextModel,
    device: Device,
}

impl TextEncoders {
    /// From a diffusers pipeline folder: `tokenizer/`, `text_encoder/`, `tokenizer_2/`,
    /// `text_encoder_2/`, the encoders in `dtype` on `device`.
    pub fn load(dir: &Path, dtype: DType, device: &Device) -> Result<Self, TextError> {
        Ok(Self {
            llama_tokenizer: LlamaTokenizer::from_dir(dir)?,
            llama: load_llama_encoder(dir, HIDDEN_STATE_SKIP, dtype, device)?,
            clip_tokenizer: ClipTokenizer::from_dir(dir)?,
            clip: load_clip_text(dir, dtype, device)?,
            device: device.clone(),
        })
    }

    /// Checks a pipeline folder's tokenizers and text encoder configs and weight files without
    /// loading any weights.
    pub fn check(dir: &Path) -> Result<TextWidths, TextError> {
        LlamaTokenizer::from_dir(dir)?;
        ClipTokenizer::from_dir(dir)?;
        let (llama, _) = open_component::<LlamaConfig>(
            dir,
            "text_encoder",
            TRANSFORMERS_WEIGHTS,
            LlamaConfig::validate,
        )?;
        let (clip, _) = open_component::<ClipTextConfig>(
            dir,
            "text_encoder_2",
            TRANSFORMERS_WEIGHTS,
            ClipTextConfig::validate,
        )?;
        Ok(TextWidths {
            text: llama.hidden_size,
            pooled: clip.hidden_size,
        })
    }

    pub fn llama_tokenizer(&self) -> &LlamaTokenizer {
        &self.llama_tokenizer
    }

    pub fn clip_tokenizer(&self) -> &ClipTokenizer {
        &self.clip_tokenizer
    }

    /// Encodes a batch of prompts as given (any text, the empty string included).
    pub fn encode(&self, prompts: &[&str]) -> Result<PromptEmbeds, TextError> {
        let llama_tokens = self.llama_tokenizer.encode(prompts)?;
        let clip_tokens = self.clip_tokenizer.encode(prompts)?;
        let (ids, mask) = self.tensors(&llama_tokens)?;
        let crop = self.llama_tokenizer.crop_start();
        let hidden = self.llama.forward(&ids, &mask)?;
        let (clip_ids, _) = self.tensors(&clip_tokens)?;
        Ok(PromptEmbeds {
            embeds: hidden.narrow(1, crop, LLAMA_MAX_TOKENS)?,
            mask: mask.narrow(1, crop, LLAMA_MAX_TOKENS)?,
            pooled: self.clip.pooled(&clip_ids)?,
            truncated_llama: llama_tokens.truncated,
            truncated_clip: clip_tokens.truncated,
        })
    }

    fn tensors(&self, t: &TokenBatch) -> candle_core::Result<(Tensor, Tensor)> {
        let shape = (t.batch(), t.len);
        Ok((
            Tensor::from_slice(&t.ids, shape, &self.device)?,
            Tensor::from_slice(&t.mask, shape, &self.device)?,
        ))
    }

    /// The conditioning for `prompt` (refused when empty after trimming) and, for true CFG, the
    /// `negative` prompt (which may be empty). Consumes the encoders, so their memory is released
    /// as soon as the tensors exist.
    pub fn into_conditioning(
        self,
        prompt: &str,
        negative: Option<&str>,
    ) -> Result<Conditioning, TextError> {
        if prompt.trim().is_empty() {
            return Err(TextError::EmptyPrompt);
        }
        let Some(negative) = negative else {
            return Ok(Conditioning {
                prompt: self.encode(&[prompt])?,
                negative: None,
            });
        };
        // one batch; every row is padded to the same fixed length and encoded independently
        let both = self.encode(&[prompt, negative])?;
        let row = |i: usize| -> candle_core::Result<PromptEmbeds> {
            Ok(PromptEmbeds {
                embeds: both.embeds.narrow(0, i, 1)?,
                mask: both.mask.narrow(0, i, 1)?,
                pooled: both.pooled.narrow(0, i, 1)?,
                truncated_llama: vec![both.truncated_llama[i]],
                truncated_clip: vec![both.truncated_clip[i]],
            })
        };
        Ok(Conditioning {
            prompt: row(0)?,
            negative: Some(row(1)?),
        })
    }
}
