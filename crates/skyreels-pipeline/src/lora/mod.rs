//! LoRA adapters per request: files read into their modules (`parse.rs`, three layouts:
//! diffusers/PEFT, the original HunyuanVideo one, Kohya; `names.rs` maps their module names, and
//! `config.rs` reads the alpha a diffusers file carries), matched against the transformer's
//! linear layers (`apply.rs`) and attached to them as [`LoraDelta`]s at forward time, never merged:
//! `y = W x + b + Σᵢ weightᵢ · (alphaᵢ / rankᵢ) · Bᵢ (Aᵢ x)`, as PEFT computes. Parsed files are
//! kept in a bounded cache by content (`cache.rs`). [`crate::generate::Pipeline::set_loras`] is
//! the entry point; docs/loras.md describes the formats.
//!
//! [`LoraDelta`]: skyreels_models::layers::LoraDelta

mod apply;
mod cache;
mod config;
mod names;
mod parse;

pub(crate) use apply::{attach, layer_dims, Adapters, Loras, Matched};
pub use cache::{LoraCacheStats, DEFAULT_LORA_CACHE_BYTES};

use crate::generate::GenerateError;
use crate::hub::{fetch_file, HubOptions, Source};
use std::path::PathBuf;

/// One LoRA of a request.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraFile {
    /// As the request named it (messages and reports use it).
    pub label: String,
    pub path: PathBuf,
    /// diffusers' `set_adapters` weight: multiplies `alpha / rank`.
    pub scale: f64,
}

/// What [`crate::generate::Pipeline::set_loras`] applied, one entry per LoRA in order.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LoraReport {
    pub applied: Vec<LoraApplied>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct LoraApplied {
    pub label: String,
    /// "diffusers", "hunyuan" (the original layout) or "kohya".
    pub format: &'static str,
    /// Linear layers that got an adapter from it.
    pub layers: usize,
    /// Keys of the file that match no layer of this transformer (they are not applied).
    pub unmatched_keys: usize,
    /// The parsed file came from the cache (its bytes were read and hashed, not parsed).
    pub cache_hit: bool,
}

/// Why a LoRA could not be applied; the message names it by its label.
#[derive(Debug, thiserror::Error)]
#[error("LoRA {label}: {kind}")]
pub struct LoraError {
    pub label: String,
    pub kind: LoraErrorKind,
}

#[derive(Debug, thiserror::Error)]
pub enum LoraErrorKind {
    #[error("{} not found", .0.display())]
    NotFound(PathBuf),
    #[error("reading {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("not a safetensors file ({0})")]
    NotSafetensors(String),
    /// An adapter type other than LoRA.
    #[error("{0} adapters are not supported (only LoRA: diffusers/PEFT, original HunyuanVideo or Kohya keys)")]
    Refused(&'static str),
    /// The keys or metadata do not make LoRA pairs.
    #[error("{0}")]
    Layout(String),
    #[error("no key matches a layer of this transformer (a LoRA for another model?)")]
    NoMatch,
    /// A module whose factors do not fit its layer.
    #[error(transparent)]
    Shape(Box<ShapeMismatch>),
    #[error("{0} holds non-finite values")]
    NonFinite(String),
    #[error(transparent)]
    Tensor(#[from] candle_core::Error),
}

/// A LoRA module whose factors do not fit the layer it targets.
#[derive(Debug, thiserror::Error)]
#[error(
    "{module} does not fit layer {layer}: lora_A is {a:?} and lora_B {b:?}, the layer (out, in) \
     is {want:?} (a LoRA for another model size?)"
)]
pub struct ShapeMismatch {
    /// As the file names it.
    pub module: String,
    /// The diffusers module path of the layer.
    pub layer: String,
    pub a: Vec<usize>,
    pub b: Vec<usize>,
    pub want: Vec<usize>,
}

/// The local file of a `--lora` path: an existing file, or one file of a hub repo
/// (`OWNER/NAME/FILE.safetensors`, downloaded into the Hugging Face cache with
/// [`crate::hub::fetch_file`]).
pub fn resolve_lora_path(value: &str, opts: &HubOptions) -> Result<PathBuf, GenerateError> {
    match Source::parse(value)? {
        Source::Local(p) if p.is_file() => Ok(p),
        Source::HubFile { repo, file } if file.ends_with(".safetensors") => {
            Ok(fetch_file(&repo, &file, opts)?)
        }
        _ => Err(GenerateError::Invalid(format!(
            "LoRA {value}: not a file, nor a hub file (OWNER/NAME/FILE.safetensors)"
        ))),
    }
}
