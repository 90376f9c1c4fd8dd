//! Matching parsed LoRA files against the transformer's linear layers, and the adapters that
//! result, per device.

use super::cache::{Digest, LoraCache, LoraCacheStats};
use super::names::Split;
use super::parse::{parse, Module, Parsed};
use super::{LoraApplied, LoraError, LoraErrorKind, LoraFile, LoraReport, ShapeMismatch};
use candle_core::{DType, Device, Tensor};
use sha2::{Digest as _, Sha256};
use skyreels_models::layers::{LinearAdapter, LoraDelta};
use skyreels_models::HunyuanVideoTransformer3DModel;
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::SystemTime;

/// (out, in) of every linear layer of a transformer, by diffusers module path.
pub(crate) type LayerDims = BTreeMap<String, (usize, usize)>;

/// The adapters of every layer that has some, in the order of the request's LoRAs.
pub(crate) type Adapters = HashMap<String, Vec<Arc<dyn LinearAdapter>>>;

/// One LoRA's factors for one layer, on the CPU as the file stores them.
struct LayerLora {
    a: Tensor,
    b: Tensor,
    bias_b: Option<Tensor>,
    /// weight × alpha / rank.
    scale: f64,
}

/// A request's LoRAs matched to the layers, ready to be placed on any device.
#[derive(Default)]
pub(crate) struct Matched(BTreeMap<String, Vec<LayerLora>>);

impl Matched {
    /// The adapters in `dtype` on `device`.
    pub(crate) fn adapters(&self, dtype: DType, device: &Device) -> candle_core::Result<Adapters> {
        let on = |t: &Tensor| t.to_dtype(dtype)?.to_device(device);
        self.0
            .iter()
            .map(|(layer, loras)| {
                let adapters = loras
                    .iter()
                    .map(|l| {
                        let bias = l.bias_b.as_ref().map(on).transpose()?;
                        let d = LoraDelta::new(on(&l.a)?, on(&l.b)?, bias, l.scale)?;
                        Ok(Arc::new(d) as Arc<dyn LinearAdapter>)
                    })
                    .collect::<candle_core::Result<_>>()?;
                Ok((layer.clone(), adapters))
            })
            .collect()
    }
}

/// Sets every linear layer's adapters to those `adapters` names for it (none for the others).
pub(crate) fn attach(model: &mut HunyuanVideoTransformer3DModel, adapters: &Adapters) {
    for (name, layer) in model.linears_mut() {
        layer.set_adapters(adapters.get(&name).cloned().unwrap_or_default());
    }
}

/// The layers of `model`, for matching.
pub(crate) fn layer_dims(
    model: &mut HunyuanVideoTransformer3DModel,
) -> candle_core::Result<LayerDims> {
    model
        .linears_mut()
        .into_iter()
        .map(|(name, l)| Ok((name, l.dims()?)))
        .collect()
}

/// `module`'s factors for each of its targets, `(a, b, bias_b)`, after checking every shape:
/// `b`'s rows (and its bias) cut by the targets' outputs; for the final layer, the halves of
/// `b`'s rows, of its bias and of `a`'s rank rows swapped, each as torch's `chunk(2)` cuts them
/// (the first half rounded up), as diffusers' `remap_norm_scale_shift_` does.
fn fit(
    module: &Module,
    dims: &[(usize, usize)],
) -> Result<Vec<(Tensor, Tensor, Option<Tensor>)>, LoraErrorKind> {
    let (_, a_in) = module.a.dims2()?;
    let (b_out, _) = module.b.dims2()?;
    let total: usize = dims.iter().map(|d| d.0).sum();
    let bias_ok = module.bias_b.as_ref().is_none_or(|t| t.dims() == [b_out]);
    let odd = module.split == Split::SwapHalves && b_out % 2 == 1;
    if let Some((i, d)) = dims
        .iter()
        .enumerate()
        .find(|(_, d)| d.1 != a_in || total != b_out || !bias_ok || odd)
    {
        return Err(LoraErrorKind::Shape(Box::new(ShapeMismatch {
            module: module.name.clone(),
            layer: module.targets[i].clone(),
            a: module.a.dims().to_vec(),
            b: module.b.dims().to_vec(),
            want: vec![d.0, d.1],
        })));
    }
    let rows = |t: &Tensor, start: usize, len: usize| t.narrow(0, start, len);
    let a = &module.a;
    Ok(match module.split {
        Split::Whole => vec![(a.clone(), module.b.clone(), module.bias_b.clone())],
        Split::SwapHalves => {
            // torch: `first, second = t.chunk(2, dim=0); cat([second, first])`
            let swap = |t: &Tensor| -> candle_core::Result<Tensor> {
                let n = t.dim(0)?;
                let first = n.div_ceil(2);
                Tensor::cat(&[rows(t, first, n - first)?, rows(t, 0, first)?], 0)
            };
            vec![(
                swap(a)?,
                swap(&module.b)?,
                module.bias_b.as_ref().map(swap).transpose()?,
            )]
        }
        Split::Rows => {
            let mut start = 0;
            let mut parts = Vec::with_capacity(dims.len());
            for &(out, _) in dims {
                let bias = module.bias_b.as_ref().map(|t| rows(t, start, out));
                parts.push((a.clone(), rows(&module.b, start, out)?, bias.transpose()?));
                start += out;
            }
            parts
        }
    })
}

/// Files whose digest is remembered by size and modification time (then forgotten at once).
const MAX_SEEN_FILES: usize = 4096;

/// The parsed LoRA files a pipeline keeps, and its transformer's layers.
pub(crate) struct Loras {
    cache: LoraCache,
    /// The content digest of each file read, with the size and modification time it had then:
    /// a file that still has both is not read again.
    seen: HashMap<PathBuf, (u64, SystemTime, Digest)>,
    layers: LayerDims,
}

impl Loras {
    pub(crate) fn new(layers: LayerDims) -> Self {
        Self {
            cache: LoraCache::new(super::DEFAULT_LORA_CACHE_BYTES),
            seen: HashMap::new(),
            layers,
        }
    }

    pub(crate) fn set_cache_bytes(&mut self, bytes: usize) {
        self.cache.set_capacity(bytes);
    }

    pub(crate) fn cache_stats(&self) -> LoraCacheStats {
        self.cache.stats()
    }

    /// A file, parsed or from the cache (true). A file read before whose size and modification
    /// time have not changed is taken from the cache by the digest it had, without reading it
    /// again; any other is read, and found in the cache by its content's digest or parsed.
    fn read(&mut self, file: &LoraFile) -> Result<(Arc<Parsed>, bool), LoraErrorKind> {
        let io = |source: std::io::Error| match source.kind() {
            std::io::ErrorKind::NotFound => LoraErrorKind::NotFound(file.path.clone()),
            _ => LoraErrorKind::Io {
                path: file.path.clone(),
                source,
            },
        };
        let meta = std::fs::metadata(&file.path).map_err(io)?;
        let stamp = (meta.len(), meta.modified().map_err(io)?);
        let known = self
            .seen
            .get(&file.path)
            .filter(|&&(len, modified, _)| (len, modified) == stamp)
            .map(|&(_, _, digest)| digest);
        let mut read = None;
        let digest = match known {
            Some(digest) => digest,
            None => {
                let bytes = std::fs::read(&file.path).map_err(io)?;
                let digest: Digest = Sha256::digest(&bytes).into();
                // bounded: a server meets many files over its life (each URL's download is one)
                if self.seen.len() >= MAX_SEEN_FILES {
                    self.seen.clear();
                }
                self.seen
                    .insert(file.path.clone(), (stamp.0, stamp.1, digest));
                read = Some(bytes);
                digest
            }
        };
        if let Some(parsed) = self.cache.get(&digest) {
            return Ok((parsed, true));
        }
        // not in the cache (evicted since): read now, keyed by what is read
        let bytes = match read {
            Some(bytes) => bytes,
            None => std::fs::read(&file.path).map_err(io)?,
        };
        let digest: Digest = Sha256::digest(&bytes).into();
        self.seen
            .insert(file.path.clone(), (stamp.0, stamp.1, digest));
        let parsed = Arc::new(parse(&bytes)?);
        self.cache.insert(digest, parsed.clone());
        Ok((parsed, false))
    }

    /// Reads `files` and matches each to the layers: their adapters, and what each gave.
    pub(crate) fn select(
        &mut self,
        files: &[LoraFile],
    ) -> Result<(Matched, LoraReport), LoraError> {
        let mut matched = Matched::default();
        let mut report = LoraReport::default();
        for file in files {
            let err = |kind| LoraError {
                label: file.label.clone(),
                kind,
            };
            let (parsed, cache_hit) = self.read(file).map_err(err)?;
            let mut applied = LoraApplied {
                label: file.label.clone(),
                format: parsed.format,
                layers: 0,
                unmatched_keys: parsed.stray_keys,
                cache_hit,
            };
            let mut layers = Vec::new();
            for module in &parsed.modules {
                let dims: Option<Vec<(usize, usize)>> = module
                    .targets
                    .iter()
                    .map(|t| self.layers.get(t).copied())
                    .collect();
                let Some(dims) = dims else {
                    applied.unmatched_keys += module.keys;
                    continue;
                };
                let parts = fit(module, &dims).map_err(err)?;
                for ((target, (a, b, bias_b)), scale) in
                    module.targets.iter().zip(parts).zip(&module.scales)
                {
                    let lora = LayerLora {
                        a,
                        b,
                        bias_b,
                        scale: file.scale * scale,
                    };
                    layers.push((target.clone(), lora));
                }
            }
            if layers.is_empty() {
                return Err(err(LoraErrorKind::NoMatch));
            }
            applied.layers = layers.len();
            for (target, lora) in layers {
                matched.0.entry(target).or_default().push(lora);
            }
            report.applied.push(applied);
        }
        Ok((matched, report))
    }
}
