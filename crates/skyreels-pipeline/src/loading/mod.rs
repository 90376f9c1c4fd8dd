//! Loading model components from diffusers-layout folders.
//!
//! A component folder holds `config.json` and its weights either as one `<stem>.safetensors` or
//! sharded as `<stem>-0000i-of-0000n.safetensors` with `<stem>.safetensors.index.json`. Tensors
//! are read through a tracking VarBuilder backend, so that after the model is built every missing
//! tensor, wrong shape and unused tensor is reported by name. Stored f32/f16/bf16 convert to the
//! run dtype; fp8 e4m3fn matmul weights stay fp8 (as single files keep them, `stored_fp8`), and
//! the model is built from a [`Weights`] that hands them to its linear layers in that form.

use crate::safetensors_file::SafetensorsFile;
use crate::single_file::{is_single_file, read_transformer_config, SingleFile};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use serde::Deserialize;
use skyreels_models::layers::weights::StoredWeight;
use skyreels_models::text_encoders::{ClipTextConfig, ClipTextModel, LlamaConfig, LlamaEncoder};
use skyreels_models::{
    AutoencoderKLHunyuanVideo, HunyuanVideoTransformer3DModel, TransformerConfig, VaeConfig,
};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

mod store;
mod tracking;

pub use store::WeightStore;
pub(crate) use store::{loadable, pick_rows, stored_fp8, Found, TensorSource};
pub(crate) use tracking::build_tracked;
pub use tracking::{build_checked, ResidentWeights};
use tracking::{check_tensors, reading_vb};

/// Weight file stem of diffusers models (transformer, VAE).
pub const DIFFUSERS_WEIGHTS: &str = "diffusion_pytorch_model";

/// At most this many missing or mis-shaped tensors are collected before loading stops.
const MAX_REPORTED: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("model folder {0} does not exist")]
    FolderNotFound(PathBuf),
    #[error("{0}: no config.json in this folder or in its `{1}/` subfolder")]
    NoConfig(PathBuf, String),
    #[error("{path}: cannot read: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: invalid config: {message}")]
    Config { path: PathBuf, message: String },
    #[error("{0}: no weights (expected {1}.safetensors or {1}.safetensors.index.json)")]
    NoWeights(PathBuf, String),
    #[error("{path}: invalid index: {message}")]
    Index { path: PathBuf, message: String },
    #[error("shard {shard} listed in {index} is missing")]
    MissingShard { shard: PathBuf, index: PathBuf },
    #[error("{path}: not a readable {format} file: {message}")]
    CorruptFile {
        path: PathBuf,
        /// "safetensors" or "GGUF"
        format: &'static str,
        message: String,
    },
    #[error("tensor {name} is stored in both {first} and {second}")]
    DuplicateTensor {
        name: String,
        first: PathBuf,
        second: PathBuf,
    },

    #[error("{}", describe_problems(.0))]
    Tensors(Vec<TensorProblem>),
    #[error("{} unexpected tensor(s) not used by the model: {}", .0.len(), .0.join(", "))]
    UnusedTensors(Vec<String>),
    #[error("building the model: {0}")]
    Model(#[from] candle_core::Error),
}

/// A tensor the model asked for that the checkpoint cannot provide as requested.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TensorProblem {
    Missing {
        name: String,
    },
    Shape {
        name: String,
        file: PathBuf,
        stored: Vec<usize>,
        expected: Vec<usize>,
    },
    /// Only f32, f16, bf16 and fp8 e4m3fn weights load (`loadable`).
    Dtype {
        name: String,
        file: PathBuf,
        dtype: String,
    },
}

fn describe_problems(problems: &[TensorProblem]) -> String {
    let items: Vec<String> = problems
        .iter()
        .map(|p| match p {
            TensorProblem::Missing { name } => format!("missing tensor {name}"),
            TensorProblem::Shape {
                name,
                file,
                stored,
                expected,
            } => format!(
                "tensor {name} in {} has shape {stored:?}, the model expects {expected:?}",
                file.display()
            ),
            TensorProblem::Dtype { name, file, dtype } => format!(
                "tensor {name} in {} has dtype {dtype}; only f32, f16, bf16 and fp8 e4m3fn weights \
                 load",
                file.display()
            ),
        })
        .collect();
    items.join("; ")
}

fn read(path: &Path) -> Result<String, LoadError> {
    std::fs::read_to_string(path).map_err(|source| LoadError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// The folder holding a component: `dir` itself when it has `config.json` (a bare model repo such
/// as Skywork's), else `dir/<subfolder>` (a diffusers pipeline).
pub fn component_dir(dir: &Path, subfolder: &str) -> Result<PathBuf, LoadError> {
    if !dir.is_dir() {
        return Err(LoadError::FolderNotFound(dir.to_path_buf()));
    }
    if dir.join("config.json").is_file() {
        return Ok(dir.to_path_buf());
    }
    let sub = dir.join(subfolder);
    if sub.join("config.json").is_file() {
        return Ok(sub);
    }
    Err(LoadError::NoConfig(
        dir.to_path_buf(),
        subfolder.to_string(),
    ))
}

/// Reads and parses `<dir>/config.json`.
pub fn read_config<C: serde::de::DeserializeOwned>(dir: &Path) -> Result<C, LoadError> {
    read_config_file(&dir.join("config.json"))
}

/// Reads and parses a config file.
pub fn read_config_file<C: serde::de::DeserializeOwned>(path: &Path) -> Result<C, LoadError> {
    let path = path.to_path_buf();
    let text = read(&path)?;
    let de = &mut serde_json::Deserializer::from_str(&text);
    serde_path_to_error::deserialize(de).map_err(|e| LoadError::Config {
        path,
        message: format!("field `{}`: {}", e.path(), e.inner()),
    })
}

/// A component's parsed, validated config and its weights: the folder is `dir` or
/// `dir/<subfolder>` (see [`component_dir`]), the weights `<stem>.safetensors` (single or sharded).
pub fn open_component<C: serde::de::DeserializeOwned>(
    dir: &Path,
    subfolder: &str,
    stem: &str,
    validate: impl FnOnce(&C) -> candle_core::Result<()>,
) -> Result<(C, WeightStore), LoadError> {
    let dir = component_dir(dir, subfolder)?;
    let cfg: C = read_config(&dir)?;
    validate(&cfg).map_err(|e| LoadError::Config {
        path: dir.join("config.json"),
        message: e.to_string(),
    })?;
    let store = WeightStore::open(&dir, stem)?;
    Ok((cfg, store))
}

/// Loads one model component: its folder is `dir` or `dir/<subfolder>` (see [`component_dir`]),
/// its config `config.json` (validated by `validate`), its weights `<stem>.safetensors` (single or
/// sharded), converted to `dtype`.
pub fn load_component<C: serde::de::DeserializeOwned, M>(
    dir: &Path,
    subfolder: &str,
    stem: &str,
    dtype: DType,
    device: &Device,
    validate: impl FnOnce(&C) -> candle_core::Result<()>,
    build: impl FnOnce(&C, VarBuilder) -> candle_core::Result<M>,
) -> Result<M, LoadError> {
    let (cfg, store) = open_component(dir, subfolder, stem, validate)?;
    build_checked(store, dtype, device, |_| false, |vb| build(&cfg, vb))
}

/// Loads `HunyuanVideoTransformer3DModel` from a transformer folder, a pipeline folder with a
/// `transformer/` subfolder, or a single `.safetensors` / `.gguf` file (see [`crate::single_file`]:
/// its config from `config`, a `config.json` or a folder with one, else from the tensor shapes).
/// Dense weights are converted to `dtype`; fp8 and GGUF matmul weights stay in their stored form.
pub fn load_transformer(
    path: &Path,
    config: Option<&Path>,
    dtype: DType,
    device: &Device,
) -> Result<HunyuanVideoTransformer3DModel, LoadError> {
    load_transformer_resident(path, config, dtype, device, false).map(|(m, _)| m)
}

/// [`load_transformer`], with what the model keeps resident; `host_blocks` keeps the blocks'
/// linear weights in host memory, each copied to `device` right before it is used
/// (`--offload blocks`).
pub fn load_transformer_resident(
    path: &Path,
    config: Option<&Path>,
    dtype: DType,
    device: &Device,
    host_blocks: bool,
) -> Result<(HunyuanVideoTransformer3DModel, ResidentWeights), LoadError> {
    let (cfg, store): (TransformerConfig, Arc<dyn TensorSource>) = if is_single_file(path) {
        let file = SingleFile::open(path)?;
        let cfg = match config {
            Some(c) => read_transformer_config(c)?,
            None => file.infer_config()?,
        };
        (cfg, Arc::new(file))
    } else {
        let (cfg, store) = open_component(
            path,
            "transformer",
            DIFFUSERS_WEIGHTS,
            TransformerConfig::validate,
        )?;
        (cfg, Arc::new(store))
    };
    build_tracked(
        store,
        dtype,
        device,
        false,
        host_blocks,
        |_| false,
        |vb| HunyuanVideoTransformer3DModel::new(&cfg, vb),
    )
}

/// Loads `AutoencoderKLHunyuanVideo` from a VAE folder or a pipeline folder with a `vae/`
/// subfolder, converting the stored weights to `dtype`. Tiling starts at diffusers' defaults.
pub fn load_vae(
    dir: &Path,
    dtype: DType,
    device: &Device,
) -> Result<AutoencoderKLHunyuanVideo, LoadError> {
    load_component(
        dir,
        "vae",
        DIFFUSERS_WEIGHTS,
        dtype,
        device,
        VaeConfig::validate,
        AutoencoderKLHunyuanVideo::new,
    )
}

/// Weight file stem of transformers models (text encoders).
pub const TRANSFORMERS_WEIGHTS: &str = "model";

/// Loads the LLaMA text encoder that returns `hidden_states[-(skip + 1)]` from a `LlamaModel`
/// folder or a pipeline folder with a `text_encoder/` subfolder. Keys may carry a `model.`
/// prefix (a `LlamaForCausalLM` export); the layers after the cut, the final norm and an
/// `lm_head` are not loaded (their absence is fine, and their presence is not an error).
///
/// Every tensor's name, shape and dtype is checked here, but only the embedding table is read
/// (onto the host): each decoder layer is read onto `device` when it runs and freed after it
/// ([`LlamaEncoder::streamed`]), so encoding a prompt next to a resident transformer adds one
/// layer, not the whole LLaMA, to the device's peak.
pub fn load_llama_encoder(
    dir: &Path,
    skip: usize,
    dtype: DType,
    device: &Device,
) -> Result<LlamaEncoder, LoadError> {
    let (cfg, store) = open_component(
        dir,
        "text_encoder",
        TRANSFORMERS_WEIGHTS,
        LlamaConfig::validate,
    )?;
    let prefix = if store.names.contains_key("model.embed_tokens.weight") {
        "model."
    } else {
        ""
    };
    let run = LlamaEncoder::layers_run(&cfg, skip);
    let unused_ok = move |name: &str| {
        let Some(rest) = name.strip_prefix(prefix) else {
            return name == "lm_head.weight";
        };
        let later_layer = rest
            .strip_prefix("layers.")
            .and_then(|r| r.split('.').next())
            .and_then(|i| i.parse::<usize>().ok())
            .is_some_and(|i| i >= run);
        later_layer || rest == "norm.weight" || name == "lm_head.weight"
    };
    fn root<'a>(vb: VarBuilder<'a>, prefix: &str) -> VarBuilder<'a> {
        if prefix.is_empty() {
            vb
        } else {
            vb.pp("model")
        }
    }
    let store: Arc<dyn TensorSource> = Arc::new(store);
    check_tensors(store.clone(), unused_ok, |vb| {
        LlamaEncoder::new(&cfg, skip, root(vb, prefix))
    })?;
    // checked: now the embedding table on the host, the layers read per encoding on `device`
    let vb = |device: &Device| root(reading_vb(store.clone(), device, dtype), prefix);
    Ok(LlamaEncoder::streamed(
        &cfg,
        skip,
        vb(&Device::Cpu),
        vb(device),
    )?)
}

/// Loads the CLIP text model (pooled output) from a `CLIPTextModel` folder or a pipeline folder
/// with a `text_encoder_2/` subfolder. Keys may carry the `text_model.` prefix (transformers 4.x
/// exports) or not (5.x); the `position_ids` buffer that checkpoints saved before transformers
/// 4.31 carry is accepted and ignored.
pub fn load_clip_text(
    dir: &Path,
    dtype: DType,
    device: &Device,
) -> Result<ClipTextModel, LoadError> {
    let (cfg, store) = open_component(
        dir,
        "text_encoder_2",
        TRANSFORMERS_WEIGHTS,
        ClipTextConfig::validate,
    )?;
    let prefixed = store
        .names
        .contains_key("text_model.embeddings.token_embedding.weight");
    let unused_ok = |name: &str| name.ends_with("embeddings.position_ids");
    build_checked(store, dtype, device, unused_ok, |vb| {
        ClipTextModel::new(&cfg, if prefixed { vb.pp("text_model") } else { vb })
    })
}
