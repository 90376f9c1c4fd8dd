//! CLIP's transformer encoder, shared by the text model
//! ([`crate::text_encoders::ClipTextModel`]) and the vision tower.

pub mod encoder;

pub use encoder::{ClipEncoder, EncoderDims, HiddenAct};
