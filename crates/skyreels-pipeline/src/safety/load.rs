//! Finding and reading a checker: a `StableDiffusionSafetyChecker` folder (`config.json`,
//! `model.safetensors`, optionally `preprocessor_config.json`), a Stable Diffusion pipeline folder
//! (`safety_checker/` and `feature_extractor/`), or a hub repo of either layout.

use super::preprocess::{Preprocessor, PreprocessorConfig};
use super::SafetyError;
use crate::hub::{self, HubOptions, Layout};
use crate::loading::{build_checked, WeightStore, TRANSFORMERS_WEIGHTS};
use candle_core::{DType, Device};
use skyreels_models::{SafetyCheckerConfig, StableDiffusionSafetyChecker};
use std::path::{Path, PathBuf};

/// Where `source` is: an existing folder, else a hub repo id (`owner/name`) fetched (or found in
/// the cache) with `hub`.
pub(super) fn resolve(source: &str, hub: &HubOptions) -> Result<PathBuf, SafetyError> {
    let path = Path::new(source);
    if path.exists() {
        return Ok(path.to_path_buf());
    }
    let parts: Vec<&str> = source.split('/').collect();
    if hub::is_repo_id(&parts) {
        return Ok(hub::fetch(source, Layout::SafetyChecker, hub)?);
    }
    Err(SafetyError::Source(source.to_string()))
}

/// The checker's folder and its preprocessor config, if any: `dir` itself when it has
/// `config.json`, else `dir/safety_checker` with `dir/feature_extractor`'s preprocessor config.
fn locate(dir: &Path) -> Result<(PathBuf, Option<PathBuf>), SafetyError> {
    if !dir.is_dir() {
        return Err(SafetyError::Source(dir.display().to_string()));
    }
    const PREPROCESSOR: &str = "preprocessor_config.json";
    let existing = |p: PathBuf| p.is_file().then_some(p);
    if dir.join("config.json").is_file() {
        return Ok((dir.to_path_buf(), existing(dir.join(PREPROCESSOR))));
    }
    let checker = dir.join("safety_checker");
    if checker.join("config.json").is_file() {
        let pre = existing(dir.join("feature_extractor").join(PREPROCESSOR))
            .or_else(|| existing(checker.join(PREPROCESSOR)));
        return Ok((checker, pre));
    }
    Err(SafetyError::NoConfig(dir.to_path_buf()))
}

/// Reads and parses a JSON config.
fn read_json<C: serde::de::DeserializeOwned>(path: &Path) -> Result<C, SafetyError> {
    let config = |message: String| SafetyError::Config {
        path: path.to_path_buf(),
        message,
    };
    let text = std::fs::read_to_string(path).map_err(|e| config(format!("cannot read: {e}")))?;
    let de = &mut serde_json::Deserializer::from_str(&text);
    serde_path_to_error::deserialize(de)
        .map_err(|e| config(format!("field `{}`: {}", e.path(), e.inner())))
}

/// The checker's weights: `model.safetensors` (single or sharded); a folder with only
/// `pytorch_model.bin` is named as such.
fn open_weights(dir: &Path) -> Result<(PathBuf, WeightStore), SafetyError> {
    let single = dir.join(format!("{TRANSFORMERS_WEIGHTS}.safetensors"));
    let index = dir.join(format!("{TRANSFORMERS_WEIGHTS}.safetensors.index.json"));
    if !single.is_file() && !index.is_file() {
        let pickle = dir.join("pytorch_model.bin");
        return Err(if pickle.is_file() {
            SafetyError::PickleOnly(pickle)
        } else {
            SafetyError::NoWeights(dir.to_path_buf())
        });
    }
    let path = if index.is_file() { index } else { single };
    let store =
        WeightStore::open(dir, TRANSFORMERS_WEIGHTS).map_err(|source| SafetyError::Weights {
            path: path.clone(),
            source,
        })?;
    Ok((path, store))
}

/// The model and the preprocessing of the checker in `dir` (see [`locate`]), the model on
/// `device` in `dtype`.
pub(super) fn load_dir(
    dir: &Path,
    device: &Device,
    dtype: DType,
) -> Result<(StableDiffusionSafetyChecker, Preprocessor), SafetyError> {
    let (checker_dir, pre_path) = locate(dir)?;
    let cfg_path = checker_dir.join("config.json");
    let cfg: SafetyCheckerConfig = read_json(&cfg_path)?;
    cfg.validate().map_err(|e| SafetyError::Config {
        path: cfg_path.clone(),
        message: e.to_string(),
    })?;
    let pre_cfg = match &pre_path {
        Some(p) => read_json(p)?,
        None => PreprocessorConfig::default(),
    };
    let pre_err = |message: String| SafetyError::Config {
        path: pre_path
            .clone()
            .unwrap_or_else(|| checker_dir.join("preprocessor_config.json")),
        message,
    };
    let preprocessor = Preprocessor::new(&pre_cfg).map_err(pre_err)?;
    let size = cfg.vision().image_size as u32;
    if preprocessor.output_size() != Some((size, size)) {
        return Err(pre_err(format!(
            "the preprocessing gives {:?} images (height, width), the model takes {size}x{size}",
            preprocessor.output_size()
        )));
    }
    let (weights_path, store) = open_weights(&checker_dir)?;
    // transformers 4.x saved the vision tower nested (`vision_model.vision_model.*`), 5.x flat
    let nested = store
        .names()
        .iter()
        .any(|n| n.starts_with("vision_model.vision_model."));
    // the position_ids buffer checkpoints saved before transformers 4.31 carry
    let unused_ok = |name: &str| name.ends_with("embeddings.position_ids");
    let model = build_checked(store, dtype, device, unused_ok, |vb| {
        let tower = vb.pp("vision_model");
        let tower = if nested {
            tower.pp("vision_model")
        } else {
            tower
        };
        StableDiffusionSafetyChecker::new(&cfg, vb, tower)
    })
    .map_err(|source| SafetyError::Weights {
        path: weights_path,
        source,
    })?;
    Ok((model, preprocessor))
}
