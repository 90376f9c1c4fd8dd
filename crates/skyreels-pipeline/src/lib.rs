//! SkyReels V1 pipeline: loading checkpoints from diffusers / Hugging Face folders, conditioning,
//! sampling and export, and the NSFW safety checker.

pub mod conditioning;
pub mod export;
pub mod generate;
pub mod gguf;
pub mod hub;
pub mod loading;
pub mod lora;
pub mod parallel;
pub mod runtime;
pub mod safetensors_file;
pub mod safety;
pub mod scheduler;
pub mod single_file;
pub mod tokenize;

pub use loading::{
    load_clip_text, load_llama_encoder, load_transformer, load_transformer_resident, load_vae,
    LoadError, ResidentWeights, WeightStore,
};
