//! Text encoders: the LLaVA-LLaMA-3 language model (hidden states) and CLIP-L (pooled).

pub mod llama;

pub use llama::{LlamaConfig, LlamaEncoder};
