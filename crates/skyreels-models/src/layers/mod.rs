//! Building blocks shared by the transformer and the VAE.

pub mod attention;
pub mod conv3d;
pub(crate) mod cpu;
pub mod embeddings;
pub mod gguf;
pub mod linear;
pub mod lora;
pub mod modulation;
pub mod norm;
pub mod rope;
pub mod weights;

pub use attention::{attention, attention_chunked, default_score_budget};
pub use conv3d::{Conv3d, Conv3dConfig};
pub use linear::{linear, Linear, LinearAdapter};
pub use lora::LoraDelta;
pub use norm::{GroupNorm, LayerNorm, RmsNorm};
pub use weights::{MatmulWeight, StoredWeight, StoredWeights, Weights};
