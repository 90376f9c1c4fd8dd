//! SkyReels V1 (HunyuanVideo) model components in candle, and the NSFW safety checker.
//!
//! Pure model code: tensors in, tensors out. Loading, dtype/device choice and I/O live in
//! `skyreels-pipeline`. Module paths and field names mirror the diffusers state-dict tree so a
//! checkpoint loads through `VarBuilder::pp` with no rename table.

pub mod clip;
pub mod layers;
pub mod parallel;
pub mod safety_checker;
pub mod text_encoders;
pub mod transformer;
pub mod vae;

pub use safety_checker::{SafetyCheckerConfig, StableDiffusionSafetyChecker};
pub use transformer::{
    CacheSpec, HunyuanVideoTransformer3DModel, InputsOn, MagRatios, StepCache, TransformerConfig,
    TransformerInputs,
};
pub use vae::{AutoencoderKLHunyuanVideo, Tiling, VaeConfig};
