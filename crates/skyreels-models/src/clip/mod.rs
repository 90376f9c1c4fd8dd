//! CLIP's transformer encoder, shared by the text model
//! ([`crate::text_encoders::ClipTextModel`]) and the vision tower ([`ClipVisionModel`], the image
//! side of the NSFW safety checker).

pub mod encoder;
pub mod vision;

pub use encoder::{ClipEncoder, EncoderDims, HiddenAct};
pub use vision::{ClipVisionConfig, ClipVisionModel};
