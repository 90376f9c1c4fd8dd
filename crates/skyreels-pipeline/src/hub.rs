//! Model resolution: local folders, Hugging Face hub repos (through hf-hub's cache) and presets.
//!
//! A SkyReels run needs the base HunyuanVideo pipeline repo without its own transformer
//! (tokenizers, text encoders, VAE, scheduler: ~16 GB) plus a Skywork transformer repo, which keeps
//! its weights at the repo root (docs/MODEL.md section 5). Only those files are fetched. Offline, or
//! when the hub cannot be reached, the cache is used as it is and a missing file is an error that
//! names it.

use crate::generate::{GenerateError, ModelPaths};
use hf_hub::api::sync::{ApiBuilder, ApiError};
use hf_hub::{Cache, Repo};
use std::path::{Path, PathBuf};

/// Why a model could not be had from the Hugging Face hub or its cache.
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    /// The hub client could not be set up (the cache folder, `HF_ENDPOINT`).
    #[error("hub client: {0}")]
    Client(#[source] ApiError),
    /// What a run needs is not cached, and the hub could not provide it.
    #[error(
        "{what} is not in the Hugging Face cache ({}) and {why}; run `skyreels download{hint}` \
         with network access, or pass a local {local}",
        cache.display()
    )]
    NotCached {
        /// `REPO` or `REPO/FILE`.
        what: String,
        cache: PathBuf,
        /// Downloads are off, or the hub's answer.
        why: String,
        /// The download command's arguments for a single file.
        hint: String,
        /// "folder" or "file".
        local: &'static str,
    },
    /// A download failed.
    #[error("downloading {repo}/{file}: {source}")]
    Download {
        repo: String,
        file: String,
        #[source]
        source: ApiError,
    },
    /// The repo holds nothing a diffusers pipeline loads.
    #[error("{0} has no diffusers model files (config.json, *.safetensors)")]
    NoModelFiles(String),
    /// The repo keeps its weights only as a pickle (`pytorch_model.bin`), which is never read.
    #[error(
        "{repo} has its weights only as {file} (a pickle, which is not read); use a repo or \
         folder with model.safetensors"
    )]
    PickleOnly { repo: String, file: String },
}

/// The base pipeline repo: tokenizers, text encoders, VAE, scheduler.
pub const BASE_REPO: &str = "hunyuanvideo-community/HunyuanVideo";

/// `(name, pipeline repo, transformer repo)` of the presets.
pub const PRESETS: &[(&str, &str, &str)] = &[
    (
        "skyreels-v1-i2v",
        BASE_REPO,
        "Skywork/SkyReels-V1-Hunyuan-I2V",
    ),
    (
        "skyreels-v1-t2v",
        BASE_REPO,
        "Skywork/SkyReels-V1-Hunyuan-T2V",
    ),
];

/// Pipeline subfolders a run needs besides the transformer.
const PIPELINE_PARTS: &[&str] = &[
    "scheduler",
    "text_encoder",
    "text_encoder_2",
    "tokenizer",
    "tokenizer_2",
    "vae",
];

/// How the hub may be used.
#[derive(Debug, Clone, Default)]
pub struct HubOptions {
    /// Use only the local cache (also on with the `HF_HUB_OFFLINE=1` environment variable).
    pub offline: bool,
    /// The hub cache folder; default `$HF_HOME/hub` or `~/.cache/huggingface/hub`.
    pub cache_dir: Option<PathBuf>,
    /// Show download progress bars.
    pub progress: bool,
}

impl HubOptions {
    fn cache(&self) -> Cache {
        match &self.cache_dir {
            Some(d) => Cache::new(d.clone()),
            None => Cache::from_env(),
        }
    }

    fn is_offline(&self) -> bool {
        self.offline
            || std::env::var("HF_HUB_OFFLINE")
                .is_ok_and(|v| matches!(v.as_str(), "1" | "true" | "yes"))
    }
}

/// Where a `--model` / `--transformer` value points.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    Local(PathBuf),
    Hub(String),
    /// One single-file checkpoint of a hub repo (`owner/name/path/in/repo.gguf`).
    HubFile {
        repo: String,
        file: String,
    },
}

pub(crate) fn is_repo_id(parts: &[&str]) -> bool {
    parts.len() == 2
        && parts.iter().all(|p| {
            !p.is_empty()
                && !p.starts_with('.')
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        })
}

impl Source {
    /// An existing path is local; `owner/name` that is not a path is a hub repo id, and
    /// `owner/name/FILE` with FILE ending in `.safetensors` or `.gguf` one file of a repo.
    pub fn parse(value: &str) -> Result<Self, GenerateError> {
        let path = Path::new(value);
        if path.exists() {
            return Ok(Self::Local(path.to_path_buf()));
        }
        let parts: Vec<&str> = value.splitn(3, '/').collect();
        if is_repo_id(&parts) {
            return Ok(Self::Hub(value.to_string()));
        }
        if let [owner, name, file] = parts[..] {
            let single = file.ends_with(".safetensors") || file.ends_with(".gguf");
            if is_repo_id(&[owner, name])
                && single
                && file.split('/').all(|c| !c.is_empty() && c != "..")
            {
                return Ok(Self::HubFile {
                    repo: format!("{owner}/{name}"),
                    file: file.to_string(),
                });
            }
        }
        Err(GenerateError::Invalid(format!(
            "{value}: no such file or folder, and not a hub repo id (owner/name), a file of one \
             (owner/name/FILE.safetensors or .gguf) or a preset ({})",
            PRESETS.iter().map(|p| p.0).collect::<Vec<_>>().join(", ")
        )))
    }
}

/// What to load: `model` is a local pipeline folder, a hub repo id or a preset; `transformer`
/// optionally a folder or repo id holding the transformer (at its root or in `transformer/`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelSpec {
    pub pipeline: Source,
    pub transformer: Option<Source>,
}

impl ModelSpec {
    pub fn parse(model: &str, transformer: Option<&str>) -> Result<Self, GenerateError> {
        let preset = PRESETS.iter().find(|p| p.0 == model);
        let transformer = transformer.map(Source::parse).transpose()?;
        Ok(match preset {
            Some((_, base, skywork)) => Self {
                pipeline: Source::Hub(base.to_string()),
                transformer: transformer.or(Some(Source::Hub(skywork.to_string()))),
            },
            None => Self {
                pipeline: Source::parse(model)?,
                transformer,
            },
        })
    }

    /// Local folders for every component, downloading what is missing from the cache unless
    /// offline.
    pub fn resolve(&self, opts: &HubOptions) -> Result<ModelPaths, GenerateError> {
        let own_transformer = self.transformer.is_none();
        let pipeline = match &self.pipeline {
            Source::Local(p) => p.clone(),
            Source::Hub(repo) => fetch(repo, Layout::Pipeline { own_transformer }, opts)?,
            Source::HubFile { repo, file } => {
                return Err(GenerateError::Invalid(format!(
                    "--model {repo}/{file}: a single file is a transformer checkpoint; pass it \
                     as --transformer and a pipeline (or preset) as --model"
                )))
            }
        };
        let transformer = match &self.transformer {
            None => None,
            Some(Source::Local(p)) => Some(p.clone()),
            Some(Source::Hub(repo)) => Some(fetch(repo, Layout::Transformer, opts)?),
            Some(Source::HubFile { repo, file }) => Some(fetch_file(repo, file, opts)?),
        };
        ModelPaths::local(&pipeline, transformer.as_deref())
    }
}

/// Which files of a repo are needed.
#[derive(Debug, Clone, Copy)]
pub enum Layout {
    /// A diffusers pipeline repo; its `transformer/` only when no other transformer is given.
    Pipeline { own_transformer: bool },
    /// A bare transformer repo (config and weights at the root) or one with `transformer/`.
    Transformer,
    /// A `StableDiffusionSafetyChecker` repo (config, preprocessor config and weights at the
    /// root, as `CompVis/stable-diffusion-safety-checker`) or a Stable Diffusion pipeline repo's
    /// `safety_checker/` and `feature_extractor/`: only their configs and safetensors weights.
    SafetyChecker,
}

/// The subfolders of a Stable Diffusion pipeline holding its safety checker.
const SAFETY_PARTS: &[&str] = &["", "safety_checker", "feature_extractor"];

/// The files of a safety checker folder that are read (never `.bin` or `model.fp16.safetensors`).
fn is_checker_file(name: &str) -> bool {
    matches!(
        name,
        "config.json"
            | "preprocessor_config.json"
            | "model.safetensors"
            | "model.safetensors.index.json"
    ) || (name.starts_with("model-") && name.ends_with(".safetensors"))
}

fn is_weight_or_config(name: &str) -> bool {
    name.ends_with(".json") || name.ends_with(".safetensors") || name.ends_with(".txt")
}

/// The repo files a run needs, from the repo's file list: configs, tokenizer files and
/// safetensors weights of the needed subfolders (never `.bin`/`.pt` duplicates).
pub fn needed_files(files: &[String], layout: Layout) -> Vec<String> {
    files
        .iter()
        .filter(|f| {
            let (dir, name) = f.rsplit_once('/').unwrap_or(("", f.as_str()));
            if !is_weight_or_config(name) {
                return false;
            }
            match layout {
                Layout::Pipeline { own_transformer } => {
                    (dir.is_empty() && name == "model_index.json")
                        || PIPELINE_PARTS.contains(&dir)
                        || (own_transformer && dir == "transformer")
                }
                Layout::Transformer => {
                    (dir.is_empty() && name != "model_index.json") || dir == "transformer"
                }
                Layout::SafetyChecker => SAFETY_PARTS.contains(&dir) && is_checker_file(name),
            }
        })
        .cloned()
        .collect()
}

/// The file that marks a repo as present in the cache (at its root).
fn marker(layout: Layout) -> &'static str {
    match layout {
        Layout::Pipeline { .. } => "model_index.json",
        Layout::Transformer | Layout::SafetyChecker => "config.json",
    }
}

/// The snapshot folder of `repo` in the cache, if its marker file is there (a transformer repo
/// may keep its config in `transformer/`, a pipeline's safety checker in `safety_checker/`).
fn cached(repo: &str, layout: Layout, opts: &HubOptions) -> Option<PathBuf> {
    let cache = opts.cache().repo(Repo::model(repo.to_string()));
    let m = marker(layout);
    let (file, depth) = match (cache.get(m), layout) {
        (Some(p), _) => (p, 1),
        (None, Layout::Transformer) => (cache.get(&format!("transformer/{m}"))?, 2),
        (None, Layout::SafetyChecker) => (cache.get(&format!("safety_checker/{m}"))?, 2),
        (None, Layout::Pipeline { .. }) => return None,
    };
    file.ancestors().nth(depth).map(Path::to_path_buf)
}

/// A hub client on the cache (`HF_ENDPOINT` honoured).
fn hub_client(opts: &HubOptions) -> Result<hf_hub::api::sync::Api, HubError> {
    let mut builder = ApiBuilder::from_cache(opts.cache()).with_progress(opts.progress);
    if let Ok(endpoint) = std::env::var("HF_ENDPOINT") {
        builder = builder.with_endpoint(endpoint);
    }
    builder.build().map_err(HubError::Client)
}

/// Downloads (or finds in the cache) the files of `repo` a run needs; returns its snapshot folder.
pub fn fetch(repo: &str, layout: Layout, opts: &HubOptions) -> Result<PathBuf, HubError> {
    let cache_path = opts.cache().path().clone();
    let not_cached = |why: String| HubError::NotCached {
        what: repo.to_string(),
        cache: cache_path.clone(),
        why,
        hint: match layout {
            Layout::SafetyChecker => format!(" --safety-checker {repo}"),
            _ => String::new(),
        },
        local: "folder",
    };
    if opts.is_offline() {
        return cached(repo, layout, opts).ok_or_else(|| not_cached("downloads are off".into()));
    }
    let api = hub_client(opts)?;
    let api_repo = api.model(repo.to_string());
    let info = match api_repo.info() {
        Ok(info) => info,
        Err(e) => {
            return match cached(repo, layout, opts) {
                Some(dir) => {
                    tracing::warn!("cannot reach the hub for {repo} ({e}); using the cached copy");
                    Ok(dir)
                }
                None => Err(not_cached(format!("the hub cannot be reached ({e})"))),
            };
        }
    };
    let files: Vec<String> = info.siblings.into_iter().map(|s| s.rfilename).collect();
    let needed = needed_files(&files, layout);
    if needed.is_empty() {
        return Err(HubError::NoModelFiles(repo.to_string()));
    }
    if let Some(file) = pickle_only(&files, &needed, layout) {
        return Err(HubError::PickleOnly {
            repo: repo.to_string(),
            file,
        });
    }
    let mut snapshot = None;
    for f in &needed {
        let path = api_repo.get(f).map_err(|source| HubError::Download {
            repo: repo.to_string(),
            file: f.clone(),
            source,
        })?;
        // <snapshot>/<f>: walk up one level per path component
        let mut dir = path.clone();
        for _ in f.split('/') {
            dir.pop();
        }
        snapshot.get_or_insert(dir);
    }
    Ok(snapshot.expect("at least one file"))
}

/// A safety checker repo's `pytorch_model.bin`, when none of the `needed` files is safetensors.
fn pickle_only(files: &[String], needed: &[String], layout: Layout) -> Option<String> {
    if !matches!(layout, Layout::SafetyChecker)
        || needed.iter().any(|f| f.ends_with(".safetensors"))
    {
        return None;
    }
    files
        .iter()
        .find(|f| {
            matches!(
                f.as_str(),
                "pytorch_model.bin" | "safety_checker/pytorch_model.bin"
            )
        })
        .cloned()
}

/// Downloads (or finds in the cache) one file of `repo`; returns its path in the snapshot.
pub fn fetch_file(repo: &str, file: &str, opts: &HubOptions) -> Result<PathBuf, HubError> {
    let cached = || opts.cache().repo(Repo::model(repo.to_string())).get(file);
    let not_cached = |why: String| HubError::NotCached {
        what: format!("{repo}/{file}"),
        cache: opts.cache().path().clone(),
        why,
        hint: format!(" --transformer {repo}/{file}"),
        local: "file",
    };
    if opts.is_offline() {
        return cached().ok_or_else(|| not_cached("downloads are off".into()));
    }
    let api = hub_client(opts)?;
    match api.model(repo.to_string()).get(file) {
        Ok(path) => Ok(path),
        Err(e) => match cached() {
            Some(path) => {
                tracing::warn!(
                    "cannot reach the hub for {repo}/{file} ({e}); using the cached copy"
                );
                Ok(path)
            }
            None => Err(not_cached(format!("the download failed ({e})"))),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn only_the_needed_files_are_fetched() {
        let repo = names(&[
            "model_index.json",
            "README.md",
            "scheduler/scheduler_config.json",
            "text_encoder/config.json",
            "text_encoder/model-00001-of-00004.safetensors",
            "text_encoder/model.safetensors.index.json",
            "text_encoder/pytorch_model.bin",
            "tokenizer_2/merges.txt",
            "tokenizer_2/vocab.json",
            "transformer/config.json",
            "transformer/diffusion_pytorch_model-00001-of-00003.safetensors",
            "vae/diffusion_pytorch_model.safetensors",
        ]);
        let got = needed_files(
            &repo,
            Layout::Pipeline {
                own_transformer: false,
            },
        );
        assert_eq!(
            got,
            names(&[
                "model_index.json",
                "scheduler/scheduler_config.json",
                "text_encoder/config.json",
                "text_encoder/model-00001-of-00004.safetensors",
                "text_encoder/model.safetensors.index.json",
                "tokenizer_2/merges.txt",
                "tokenizer_2/vocab.json",
                "vae/diffusion_pytorch_model.safetensors",
            ])
        );
        let with = needed_files(
            &repo,
            Layout::Pipeline {
                own_transformer: true,
            },
        );
        assert_eq!(with.len(), got.len() + 2);
        let skywork = names(&[
            ".gitattributes",
            "README.md",
            "config.json",
            "diffusion_pytorch_model-00001-of-00006.safetensors",
            "diffusion_pytorch_model.safetensors.index.json",
            "assets/demo.mp4",
        ]);
        assert_eq!(
            needed_files(&skywork, Layout::Transformer),
            names(&[
                "config.json",
                "diffusion_pytorch_model-00001-of-00006.safetensors",
                "diffusion_pytorch_model.safetensors.index.json",
            ])
        );
    }

    #[test]
    fn a_safety_checker_fetches_its_configs_and_safetensors_only() {
        // CompVis/stable-diffusion-safety-checker's files
        let compvis = names(&[
            ".gitattributes",
            "README.md",
            "config.json",
            "preprocessor_config.json",
            "pytorch_model.bin",
            "model.safetensors",
        ]);
        assert_eq!(
            needed_files(&compvis, Layout::SafetyChecker),
            names(&[
                "config.json",
                "preprocessor_config.json",
                "model.safetensors"
            ])
        );
        // a Stable Diffusion pipeline repo: its checker and feature extractor only
        let sd = names(&[
            "model_index.json",
            "v1-5-pruned.safetensors",
            "feature_extractor/preprocessor_config.json",
            "safety_checker/config.json",
            "safety_checker/model.fp16.safetensors",
            "safety_checker/model.safetensors",
            "safety_checker/pytorch_model.bin",
            "unet/diffusion_pytorch_model.safetensors",
        ]);
        let needed = needed_files(&sd, Layout::SafetyChecker);
        assert_eq!(
            needed,
            names(&[
                "feature_extractor/preprocessor_config.json",
                "safety_checker/config.json",
                "safety_checker/model.safetensors",
            ])
        );
        assert_eq!(pickle_only(&sd, &needed, Layout::SafetyChecker), None);
        // weights only as a pickle: named, never fetched
        let pickled = names(&["config.json", "pytorch_model.bin"]);
        let needed = needed_files(&pickled, Layout::SafetyChecker);
        assert_eq!(needed, names(&["config.json"]));
        assert_eq!(
            pickle_only(&pickled, &needed, Layout::SafetyChecker),
            Some("pytorch_model.bin".into())
        );
    }

    #[test]
    fn model_values_parse_to_sources() {
        let spec = ModelSpec::parse("skyreels-v1-i2v", None).unwrap();
        assert_eq!(spec.pipeline, Source::Hub(BASE_REPO.into()));
        assert_eq!(
            spec.transformer,
            Some(Source::Hub("Skywork/SkyReels-V1-Hunyuan-I2V".into()))
        );
        let spec = ModelSpec::parse("skyreels-v1-t2v", Some("me/my-finetune")).unwrap();
        assert_eq!(spec.transformer, Some(Source::Hub("me/my-finetune".into())));
        assert_eq!(
            ModelSpec::parse("owner/name", None).unwrap().pipeline,
            Source::Hub("owner/name".into())
        );
        let e = ModelSpec::parse("./no/such/folder", None).unwrap_err();
        assert!(e.to_string().contains("skyreels-v1-i2v"), "{e}");
        assert!(Source::parse("/no/such").is_err());
        assert!(Source::parse("a/b/c").is_err());
        // one file of a repo, possibly in a subfolder
        assert_eq!(
            Source::parse(
                "Kijai/SkyReels-V1-Hunyuan_comfy/skyreels_hunyuan_i2v_fp8_e4m3fn.safetensors"
            )
            .unwrap(),
            Source::HubFile {
                repo: "Kijai/SkyReels-V1-Hunyuan_comfy".into(),
                file: "skyreels_hunyuan_i2v_fp8_e4m3fn.safetensors".into()
            }
        );
        assert_eq!(
            Source::parse("city96/HunyuanVideo-gguf/q/hunyuan-video-t2v-720p-Q4_K_S.gguf").unwrap(),
            Source::HubFile {
                repo: "city96/HunyuanVideo-gguf".into(),
                file: "q/hunyuan-video-t2v-720p-Q4_K_S.gguf".into()
            }
        );
        assert!(Source::parse("a/b/../c.gguf").is_err());
        assert!(Source::parse("a/b/c.bin").is_err());
    }

    #[test]
    fn single_files_come_from_the_cache_offline() {
        let cache = tempfile::tempdir().unwrap();
        let opts = HubOptions {
            offline: true,
            cache_dir: Some(cache.path().to_path_buf()),
            progress: false,
        };
        let e = fetch_file("o/r", "m.gguf", &opts).unwrap_err().to_string();
        assert!(
            e.contains("o/r/m.gguf") && e.contains("skyreels download"),
            "{e}"
        );
        // a checker's message names the download that fetches it
        let e = fetch("o/checker", Layout::SafetyChecker, &opts)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("skyreels download --safety-checker o/checker`"),
            "{e}"
        );
        // the standard cache layout: refs/main names the snapshot holding the file
        let repo = cache.path().join("models--o--r");
        std::fs::create_dir_all(repo.join("snapshots/abc")).unwrap();
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::write(repo.join("refs/main"), "abc").unwrap();
        std::fs::write(repo.join("snapshots/abc/m.gguf"), b"x").unwrap();
        assert_eq!(
            fetch_file("o/r", "m.gguf", &opts).unwrap(),
            repo.join("snapshots/abc/m.gguf")
        );
    }
}
