//! The tensors of a diffusers checkpoint (one file or a sharded set with its index), read tensor
//! by tensor, and the stored forms (fp8) its matmul weights keep.

use super::*;

/// All tensors of a checkpoint (one file or a sharded set), read tensor by tensor (see
/// [`SafetensorsFile`]).
pub struct WeightStore {
    files: Vec<(PathBuf, SafetensorsFile)>,
    /// tensor name -> index in `files`
    pub(super) names: HashMap<String, usize>,
}

#[derive(Deserialize)]
struct ShardIndex {
    weight_map: BTreeMap<String, String>,
}

impl WeightStore {
    /// Opens `<dir>/<stem>.safetensors.index.json` and its shards, or else `<dir>/<stem>.safetensors`.
    pub fn open(dir: &Path, stem: &str) -> Result<Self, LoadError> {
        let index_path = dir.join(format!("{stem}.safetensors.index.json"));
        let single = dir.join(format!("{stem}.safetensors"));
        if index_path.is_file() {
            let text = read(&index_path)?;
            let index: ShardIndex = serde_json::from_str(&text).map_err(|e| LoadError::Index {
                path: index_path.clone(),
                message: e.to_string(),
            })?;
            let shards: BTreeSet<&String> = index.weight_map.values().collect();
            if shards.is_empty() {
                return Err(LoadError::Index {
                    path: index_path,
                    message: "weight_map is empty".into(),
                });
            }
            let mut paths = Vec::with_capacity(shards.len());
            for shard in shards {
                if shard.contains('/') || shard.contains('\\') || shard.starts_with('.') {
                    return Err(LoadError::Index {
                        path: index_path,
                        message: format!("shard name {shard:?} is not a plain file name"),
                    });
                }
                let p = dir.join(shard);
                if !p.is_file() {
                    return Err(LoadError::MissingShard {
                        shard: p,
                        index: index_path,
                    });
                }
                paths.push(p);
            }
            let store = Self::from_files(paths)?;
            for (name, shard) in &index.weight_map {
                let found = store.names.get(name).map(|&i| &store.files[i].0);
                if found.and_then(|p| p.file_name()) != Some(std::ffi::OsStr::new(shard)) {
                    return Err(LoadError::Index {
                        path: index_path,
                        message: format!(
                            "tensor {name} is mapped to {shard} but {}",
                            match found {
                                Some(p) => format!("is stored in {}", p.display()),
                                None => "no shard contains it".into(),
                            }
                        ),
                    });
                }
            }
            Ok(store)
        } else if single.is_file() {
            Self::from_files(vec![single])
        } else {
            Err(LoadError::NoWeights(dir.to_path_buf(), stem.to_string()))
        }
    }

    /// Opens safetensors files as one store; a tensor name may appear in only one of them.
    pub fn from_files(paths: Vec<PathBuf>) -> Result<Self, LoadError> {
        let mut files = Vec::with_capacity(paths.len());
        let mut names: HashMap<String, usize> = HashMap::new();
        for (i, path) in paths.into_iter().enumerate() {
            let st = SafetensorsFile::open(&path).map_err(|message| LoadError::CorruptFile {
                path: path.clone(),
                format: "safetensors",
                message,
            })?;
            for name in st.names() {
                if let Some(&j) = names.get(&name) {
                    let first: &(PathBuf, SafetensorsFile) = &files[j];
                    return Err(LoadError::DuplicateTensor {
                        name,
                        first: first.0.clone(),
                        second: path,
                    });
                }
                names.insert(name, i);
            }
            files.push((path, st));
        }
        Ok(Self { files, names })
    }

    /// Every tensor name, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.names.keys().cloned().collect();
        v.sort();
        v
    }

    /// Loads one tensor as stored (its own dtype).
    pub fn load(&self, name: &str, device: &Device) -> Result<Tensor, LoadError> {
        match self.names.get(name) {
            None => Err(LoadError::Tensors(vec![TensorProblem::Missing {
                name: name.into(),
            }])),
            Some(&i) => Ok(self.files[i].1.load(name, device)?),
        }
    }
}

impl TensorSource for WeightStore {
    fn names(&self) -> Vec<String> {
        WeightStore::names(self)
    }

    fn lookup(&self, name: &str) -> Option<Found<'_>> {
        let &i = self.names.get(name)?;
        let (path, st) = &self.files[i];
        let info = st.info(name)?;
        Some(Found {
            shape: info.shape.clone(),
            file: path.as_path(),
            dtype: loadable(info.dtype),
        })
    }

    fn load(&self, name: &str, device: &Device) -> candle_core::Result<Tensor> {
        match self.names.get(name) {
            Some(&i) => self.files[i].1.load(name, device),
            None => candle_core::bail!("missing tensor {name}"),
        }
    }

    fn stored(&self, name: &str, device: &Device) -> candle_core::Result<Option<StoredWeight>> {
        match self.names.get(name) {
            Some(&i) => stored_fp8(&self.files[i].1, name, &[], None, device),
            None => candle_core::bail!("missing tensor {name}"),
        }
    }
}

/// Whether a safetensors tensor of `dtype` loads (Err: its dtype's name): f32, f16 and bf16
/// convert to the run dtype, fp8 e4m3fn stays fp8 as a matmul weight ([`stored_fp8`]) and
/// converts elsewhere.
pub(crate) fn loadable(dtype: safetensors::Dtype) -> Result<(), String> {
    match dtype {
        safetensors::Dtype::F32
        | safetensors::Dtype::F16
        | safetensors::Dtype::BF16
        | safetensors::Dtype::F8_E4M3 => Ok(()),
        other => Err(format!("{other:?}")),
    }
}

/// The matmul weight `name` of `file` in its stored form when the file keeps it in fp8 e4m3fn:
/// its `rows` (all of it when empty) on `device`, times `scale` when used (ComfyUI's
/// `scale_weight`); `None` for any other dtype (it loads densely). Diffusers folders and single
/// files both keep their fp8 weights this way.
pub(crate) fn stored_fp8(
    file: &SafetensorsFile,
    name: &str,
    rows: &[Range<usize>],
    scale: Option<f32>,
    device: &Device,
) -> candle_core::Result<Option<StoredWeight>> {
    if file.info(name).map(|i| i.dtype) != Some(safetensors::Dtype::F8_E4M3) {
        return Ok(None);
    }
    let weight = pick_rows(file.load(name, &Device::Cpu)?, rows)?;
    Ok(Some(StoredWeight::Cast {
        weight: weight.to_device(device)?,
        scale,
    }))
}

/// Concatenated `rows` of `t` (all of it when empty).
pub(crate) fn pick_rows(t: Tensor, rows: &[Range<usize>]) -> candle_core::Result<Tensor> {
    if rows.is_empty() {
        return Ok(t);
    }
    let parts = rows
        .iter()
        .map(|r| t.narrow(0, r.start, r.len()))
        .collect::<candle_core::Result<Vec<_>>>()?;
    Tensor::cat(&parts, 0)
}

/// A stored tensor, as [`TensorSource::lookup`] finds it.
pub(crate) struct Found<'a> {
    pub shape: Vec<usize>,
    pub file: &'a Path,
    /// Err(stored dtype) for a dtype that does not load
    pub dtype: Result<(), String>,
}

/// The tensors of a checkpoint under the names the model asks for.
pub(crate) trait TensorSource: Send + Sync {
    /// Every name, sorted.
    fn names(&self) -> Vec<String>;
    /// Where a tensor is stored, its shape and whether its dtype loads.
    fn lookup(&self, name: &str) -> Option<Found<'_>>;
    /// A tensor `lookup` found with a dtype that loads, in its stored dtype (or f32).
    fn load(&self, name: &str, device: &Device) -> candle_core::Result<Tensor>;
    /// The stored form of a matmul weight the checkpoint keeps narrow (fp8, GGUF), if it does.
    fn stored(&self, _name: &str, _device: &Device) -> candle_core::Result<Option<StoredWeight>> {
        Ok(None)
    }
}
