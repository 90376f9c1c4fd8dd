//! Single-file transformer checkpoints: one `.safetensors` (bf16, fp16, f32 or fp8 e4m3fn, with
//! ComfyUI's optional `scale_weight`s) or one `.gguf`, in diffusers' key layout or the original
//! HunyuanVideo one (`double_blocks.N.img_attn_qkv.weight`, ...).
//!
//! The original layout is presented under diffusers' names exactly as diffusers 0.42.1's
//! `convert_hunyuan_video_transformer_to_diffusers` renames and splits it, without copying
//! anything at open: each diffusers tensor is a source tensor or a list of row ranges of one (the
//! fused qkv and `linear1` splits, the final layer's shift/scale swap). The `linear1` split is
//! derived from the shapes (diffusers hard-codes 3072). Matmul weights stored as fp8 or in GGUF
//! blocks reach the linear layers in that form ([`StoredWeight`]); every other tensor loads
//! converted to the run dtype.
//! <https://github.com/huggingface/diffusers/blob/58eb52c0803ea9af3abec60841c2a093bdf1f951/src/diffusers/loaders/single_file_utils.py#L2783-L2910>

use crate::gguf::Gguf;
use crate::loading::{
    loadable, pick_rows, read_config_file, stored_fp8, Found, LoadError, TensorSource,
};
use crate::safetensors_file::SafetensorsFile;
use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use skyreels_models::layers::weights::StoredWeight;
use skyreels_models::TransformerConfig;
use std::collections::{BTreeMap, HashMap};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

mod quantize;

pub use quantize::{quantize_to_gguf, QuantizeReport};

/// diffusers' `TRANSFORMER_KEYS_RENAME_DICT`, in its order (each is applied to every key).
///
/// <https://github.com/huggingface/diffusers/blob/58eb52c0803ea9af3abec60841c2a093bdf1f951/src/diffusers/loaders/single_file_utils.py#L2854-L2885>
pub(crate) const RENAMES: [(&str, &str); 30] = [
    ("img_in", "x_embedder"),
    (
        "time_in.mlp.0",
        "time_text_embed.timestep_embedder.linear_1",
    ),
    (
        "time_in.mlp.2",
        "time_text_embed.timestep_embedder.linear_2",
    ),
    (
        "guidance_in.mlp.0",
        "time_text_embed.guidance_embedder.linear_1",
    ),
    (
        "guidance_in.mlp.2",
        "time_text_embed.guidance_embedder.linear_2",
    ),
    (
        "vector_in.in_layer",
        "time_text_embed.text_embedder.linear_1",
    ),
    (
        "vector_in.out_layer",
        "time_text_embed.text_embedder.linear_2",
    ),
    ("double_blocks", "transformer_blocks"),
    ("img_attn_q_norm", "attn.norm_q"),
    ("img_attn_k_norm", "attn.norm_k"),
    ("img_attn_proj", "attn.to_out.0"),
    ("txt_attn_q_norm", "attn.norm_added_q"),
    ("txt_attn_k_norm", "attn.norm_added_k"),
    ("txt_attn_proj", "attn.to_add_out"),
    ("img_mod.linear", "norm1.linear"),
    ("img_norm1", "norm1.norm"),
    ("img_norm2", "norm2"),
    ("img_mlp", "ff"),
    ("txt_mod.linear", "norm1_context.linear"),
    ("txt_norm1", "norm1.norm"),
    ("txt_norm2", "norm2_context"),
    ("txt_mlp", "ff_context"),
    ("self_attn_proj", "attn.to_out.0"),
    ("modulation.linear", "norm.linear"),
    ("pre_norm", "norm.norm"),
    ("final_layer.norm_final", "norm_out.norm"),
    ("final_layer.linear", "proj_out"),
    ("fc1", "net.0.proj"),
    ("fc2", "net.2"),
    ("input_embedder", "proj_in"),
];

/// `remap_txt_in_`'s `rename_key`, in its order.
pub(crate) const TXT_IN_RENAMES: [(&str, &str); 7] = [
    (
        "individual_token_refiner.blocks",
        "token_refiner.refiner_blocks",
    ),
    ("adaLN_modulation.1", "norm_out.linear"),
    ("txt_in", "context_embedder"),
    (
        "t_embedder.mlp.0",
        "time_text_embed.timestep_embedder.linear_1",
    ),
    (
        "t_embedder.mlp.2",
        "time_text_embed.timestep_embedder.linear_2",
    ),
    ("c_embedder", "time_text_embed.text_embedder"),
    ("mlp", "ff"),
];

/// `key` with every `(from, to)` of `table` replaced, in order.
pub(crate) fn replace_all(key: &str, table: &[(&str, &str)]) -> String {
    table
        .iter()
        .fold(key.to_string(), |k, (from, to)| k.replace(from, to))
}

/// Row ranges `0..n` cut into `parts` equal chunks (`torch.chunk` on a divisible size).
fn chunks(n: usize, parts: usize) -> Vec<Range<usize>> {
    let c = n / parts;
    (0..parts).map(|i| i * c..(i + 1) * c).collect()
}

/// The diffusers names an original-layout key becomes, each with the rows of the source it takes
/// (empty: all of it). `rows` is the source's first dimension, `hidden` the model width.
fn convert_key(key: &str, rows: usize, hidden: usize) -> Vec<(String, Vec<Range<usize>>)> {
    let k = replace_all(key, &RENAMES);
    let split = |names: [String; 3]| -> Vec<(String, Vec<Range<usize>>)> {
        names
            .into_iter()
            .zip(chunks(rows, 3))
            .map(|(n, r)| (n, vec![r]))
            .collect()
    };
    if k.contains("txt_in") {
        if k.contains("self_attn_qkv") {
            return split(
                ["attn.to_q", "attn.to_k", "attn.to_v"]
                    .map(|p| replace_all(&k.replace("self_attn_qkv", p), &TXT_IN_RENAMES)),
            );
        }
        return vec![(replace_all(&k, &TXT_IN_RENAMES), vec![])];
    }
    if k.contains("img_attn_qkv") {
        return split(
            ["attn.to_q", "attn.to_k", "attn.to_v"].map(|p| k.replace("img_attn_qkv", p)),
        );
    }
    if k.contains("txt_attn_qkv") {
        return split(
            ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"]
                .map(|p| k.replace("txt_attn_qkv", p)),
        );
    }
    if k.contains("single_blocks") {
        let k = k.replace("single_blocks", "single_transformer_blocks");
        for suffix in ["weight", "bias"] {
            if let Some(block) = k.strip_suffix(&format!(".linear1.{suffix}")) {
                let h = hidden.min(rows / 3);
                let mlp = h * 3..rows;
                return ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"]
                    .iter()
                    .zip([0..h, h..2 * h, 2 * h..3 * h, mlp])
                    .map(|(p, r)| (format!("{block}.{p}.{suffix}"), vec![r]))
                    .collect();
            }
        }
        let k = k
            .replace("linear2", "proj_out")
            .replace("q_norm", "attn.norm_q")
            .replace("k_norm", "attn.norm_k");
        return vec![(k, vec![])];
    }
    if k.contains("final_layer.adaLN_modulation.1") {
        // [shift; scale] -> [scale; shift]
        let half = rows / 2;
        return vec![(
            k.replace("final_layer.adaLN_modulation.1", "norm_out.linear"),
            vec![half..rows, 0..half],
        )];
    }
    vec![(k, vec![])]
}

/// Keys of ComfyUI's scaled fp8 format that carry no model tensor.
fn is_scale_key(key: &str) -> bool {
    key == "scaled_fp8" || key.ends_with(".scale_weight") || key.ends_with(".scale_input")
}

/// How the file's keys are named.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyLayout {
    Diffusers,
    /// Tencent's HunyuanVideo layout (ComfyUI and Kijai files, city96's GGUFs).
    Original,
}

enum Backing {
    Safetensors(SafetensorsFile),
    Gguf(Gguf),
}

/// Where a diffusers-named tensor comes from.
struct Entry {
    source: String,
    /// Rows of the source, concatenated; empty: the whole tensor.
    rows: Vec<Range<usize>>,
}

/// A single-file transformer checkpoint under diffusers' names.
pub struct SingleFile {
    path: PathBuf,
    backing: Backing,
    entries: BTreeMap<String, Entry>,
    /// `scale_weight` of a source weight (scaled fp8)
    scales: HashMap<String, f32>,
    pub layout: KeyLayout,
}

/// ComfyUI saves with this prefix on every key.
const COMFY_PREFIX: &str = "model.diffusion_model.";

impl SingleFile {
    pub fn open(path: &Path) -> Result<Self, LoadError> {
        let is_gguf = path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("gguf"));
        let corrupt = |message: String| LoadError::CorruptFile {
            path: path.to_path_buf(),
            format: if is_gguf { "GGUF" } else { "safetensors" },
            message,
        };
        let backing = if is_gguf {
            let g = Gguf::open(path).map_err(corrupt)?;
            if let Some(arch) = g.architecture.as_deref().filter(|a| *a != "hyvid") {
                return Err(corrupt(format!(
                    "a GGUF of architecture {arch:?}, not a HunyuanVideo transformer (\"hyvid\")"
                )));
            }
            Backing::Gguf(g)
        } else {
            Backing::Safetensors(SafetensorsFile::open(path).map_err(corrupt)?)
        };
        let mut file = Self {
            path: path.to_path_buf(),
            backing,
            entries: BTreeMap::new(),
            scales: HashMap::new(),
            layout: KeyLayout::Diffusers,
        };
        let keys = file.source_keys();
        let strip = !keys.is_empty() && keys.iter().all(|k| k.starts_with(COMFY_PREFIX));
        let model_key = |k: &str| -> String {
            if strip {
                k[COMFY_PREFIX.len()..].to_string()
            } else {
                k.to_string()
            }
        };
        let names: HashMap<String, String> =
            keys.iter().map(|k| (model_key(k), k.clone())).collect();
        // no HunyuanVideo tensor is empty (only ComfyUI's `scaled_fp8` marker), and an empty
        // one trips the quantizers
        if let Some(k) = names
            .iter()
            .filter(|(key, _)| !is_scale_key(key))
            .map(|(_, source)| source)
            .find(|k| file.source_shape(k).is_some_and(|s| s.contains(&0)))
        {
            return Err(corrupt(format!(
                "tensor {k} has no elements ({:?})",
                file.source_shape(k).unwrap_or_default()
            )));
        }
        file.layout = if names.contains_key("img_in.proj.weight") {
            KeyLayout::Original
        } else if names.contains_key("x_embedder.proj.weight") {
            KeyLayout::Diffusers
        } else {
            return Err(LoadError::Config {
                path: path.to_path_buf(),
                message: "not a HunyuanVideo transformer: neither img_in.proj.weight (original \
                          layout) nor x_embedder.proj.weight (diffusers layout) is in it"
                    .into(),
            });
        };
        let embed = if file.layout == KeyLayout::Original {
            "img_in.proj.weight"
        } else {
            "x_embedder.proj.weight"
        };
        let hidden = file.source_shape(&names[embed]).map_or(0, |s| s[0]);
        for (key, source) in &names {
            if is_scale_key(key) {
                if let Some(w) = key.strip_suffix(".scale_weight") {
                    let scale = file.scalar(source)?;
                    let weight = names.get(&format!("{w}.weight")).unwrap_or(source);
                    file.scales.insert(weight.clone(), scale);
                }
                continue;
            }
            let rows = file.source_shape(source).map_or(0, |s| s[0]);
            let converted = match file.layout {
                KeyLayout::Original => convert_key(key, rows, hidden),
                KeyLayout::Diffusers => vec![(key.clone(), vec![])],
            };
            for (name, rows) in converted {
                let entry = Entry {
                    source: source.clone(),
                    rows,
                };
                if file.entries.insert(name.clone(), entry).is_some() {
                    return Err(corrupt(format!("two tensors become {name}")));
                }
            }
        }
        Ok(file)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn source_keys(&self) -> Vec<String> {
        match &self.backing {
            Backing::Safetensors(st) => st.names(),
            Backing::Gguf(g) => g.tensors.keys().cloned().collect(),
        }
    }

    fn source_shape(&self, source: &str) -> Option<Vec<usize>> {
        match &self.backing {
            Backing::Safetensors(st) => st.info(source).map(|i| i.shape.clone()),
            Backing::Gguf(g) => g.tensors.get(source).map(|t| t.shape.clone()),
        }
    }

    /// A one-element tensor's value (a `scale_weight`).
    fn scalar(&self, source: &str) -> Result<f32, LoadError> {
        let t = self.load_source(source).map_err(LoadError::Model)?;
        if t.elem_count() != 1 {
            return Err(LoadError::Config {
                path: self.path.clone(),
                message: format!(
                    "{source} has shape {:?}; only per-tensor scales (one value) load",
                    t.dims()
                ),
            });
        }
        Ok(t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?[0])
    }

    /// A source tensor on the CPU, in its stored dtype (GGUF: dequantized to f32 as the linear
    /// layers dequantize their weights, in diffusers' arithmetic).
    fn load_source(&self, source: &str) -> candle_core::Result<Tensor> {
        match &self.backing {
            Backing::Safetensors(st) => st.load(source, &Device::Cpu),
            Backing::Gguf(g) => {
                StoredWeight::Quantized(Arc::new(g.read(source, &[], &Device::Cpu)?))
                    .materialize(DType::F32, &Device::Cpu)
            }
        }
    }

    fn entry(&self, name: &str) -> candle_core::Result<&Entry> {
        match self.entries.get(name) {
            Some(e) => Ok(e),
            None => candle_core::bail!("{}: no tensor {name}", self.path.display()),
        }
    }

    /// The configuration the tensor shapes describe, with diffusers' defaults for what shapes do
    /// not tell (rope_theta, qk_norm; rope_axes_dim when the head dim is 128).
    pub fn infer_config(&self) -> Result<TransformerConfig, LoadError> {
        let fail = |message: String| LoadError::Config {
            path: self.path.clone(),
            message: format!(
                "{message}; the shapes match no HunyuanVideo transformer config (pass --config \
                 with a config.json)"
            ),
        };
        let shape = |name: &str| -> Result<Vec<usize>, LoadError> {
            self.lookup(name)
                .map(|f| f.shape)
                .ok_or_else(|| fail(format!("no tensor {name}")))
        };
        let count = |prefix: &str| {
            (0..)
                .take_while(|i| {
                    self.entries
                        .range(format!("{prefix}.{i}.")..)
                        .next()
                        .is_some_and(|(k, _)| k.starts_with(&format!("{prefix}.{i}.")))
                })
                .count()
        };
        let embed = shape("x_embedder.proj.weight")?;
        let [inner, in_channels, pt, p, p2] = embed[..] else {
            return Err(fail(format!(
                "x_embedder.proj.weight has shape {embed:?}, not 5-D"
            )));
        };
        if p != p2 || [inner, in_channels, pt, p].contains(&0) {
            return Err(fail(format!("x_embedder.proj.weight has shape {embed:?}")));
        }
        let head_dim = shape("transformer_blocks.0.attn.norm_q.weight")?[0];
        if head_dim == 0 || !inner.is_multiple_of(head_dim) {
            return Err(fail(format!(
                "head dim {head_dim} does not divide width {inner}"
            )));
        }
        let out = shape("proj_out.weight")?[0];
        if !out.is_multiple_of(pt * p * p) {
            return Err(fail(format!(
                "proj_out.weight has {out} rows, not a multiple of {}",
                pt * p * p
            )));
        }
        let mlp = shape("transformer_blocks.0.ff.net.0.proj.weight")?[0];
        let d = TransformerConfig::default();
        let rope_axes_dim = if head_dim == d.attention_head_dim {
            d.rope_axes_dim.clone()
        } else {
            return Err(fail(format!(
                "head dim {head_dim}: rope_axes_dim cannot be inferred (only for head dim {})",
                d.attention_head_dim
            )));
        };
        let cfg = TransformerConfig {
            in_channels,
            out_channels: Some(out / (pt * p * p)),
            num_attention_heads: inner / head_dim,
            attention_head_dim: head_dim,
            num_layers: count("transformer_blocks"),
            num_single_layers: count("single_transformer_blocks"),
            num_refiner_layers: count("context_embedder.token_refiner.refiner_blocks"),
            mlp_ratio: mlp as f64 / inner as f64,
            patch_size: p,
            patch_size_t: pt,
            guidance_embeds: self
                .entries
                .contains_key("time_text_embed.guidance_embedder.linear_1.weight"),
            text_embed_dim: shape("context_embedder.proj_in.weight")?[1],
            pooled_projection_dim: shape("time_text_embed.text_embedder.linear_1.weight")?[1],
            rope_axes_dim,
            ..d
        };
        if cfg.mlp_dim() != mlp {
            return Err(fail(format!(
                "MLP width {mlp} is not a ratio of width {inner}"
            )));
        }
        cfg.validate().map_err(|e| fail(e.to_string()))?;
        Ok(cfg)
    }
}

impl TensorSource for SingleFile {
    fn names(&self) -> Vec<String> {
        self.entries.keys().cloned().collect()
    }

    fn lookup(&self, name: &str) -> Option<Found<'_>> {
        let e = self.entries.get(name)?;
        let mut shape = self.source_shape(&e.source)?;
        if !e.rows.is_empty() {
            shape[0] = e.rows.iter().map(|r| r.len()).sum();
        }
        let dtype = match &self.backing {
            Backing::Gguf(_) => Ok(()),
            Backing::Safetensors(st) => loadable(st.info(&e.source)?.dtype),
        };
        Some(Found {
            shape,
            file: &self.path,
            dtype,
        })
    }

    fn load(&self, name: &str, device: &Device) -> candle_core::Result<Tensor> {
        let e = self.entry(name)?;
        let t = pick_rows(self.load_source(&e.source)?, &e.rows)?;
        let t = match self.scales.get(&e.source) {
            Some(&s) => (t.to_dtype(DType::F32)? * f64::from(s))?,
            None => t,
        };
        t.to_device(device)
    }

    fn stored(&self, name: &str, device: &Device) -> candle_core::Result<Option<StoredWeight>> {
        let e = self.entry(name)?;
        match &self.backing {
            Backing::Gguf(g) => Ok(Some(StoredWeight::Quantized(Arc::new(
                g.read(&e.source, &e.rows, device)?,
            )))),
            Backing::Safetensors(st) => stored_fp8(
                st,
                &e.source,
                &e.rows,
                self.scales.get(&e.source).copied(),
                device,
            ),
        }
    }
}

/// `--config`: a `config.json` or a folder holding one.
pub fn read_transformer_config(path: &Path) -> Result<TransformerConfig, LoadError> {
    let path = if path.is_dir() {
        path.join("config.json")
    } else {
        path.to_path_buf()
    };
    let cfg: TransformerConfig = read_config_file(&path)?;
    cfg.validate().map_err(|e| LoadError::Config {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    Ok(cfg)
}

/// Whether a `--transformer` path names a single-file checkpoint (by its extension).
pub fn is_single_file(path: &Path) -> bool {
    !path.is_dir()
        && path.extension().is_some_and(|e| {
            e.eq_ignore_ascii_case("safetensors") || e.eq_ignore_ascii_case("gguf")
        })
}

#[cfg(test)]
mod tests;
