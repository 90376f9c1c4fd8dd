//! Reading a LoRA `.safetensors` file into its modules (model-independent: what the cache holds).
//!
//! The layout is told by the keys: Kohya (`lora_unet_*.lora_down.weight` / `.lora_up.weight` /
//! `.alpha`), the original HunyuanVideo layout (`lora_A` / `lora_B` under `double_blocks.`,
//! `single_blocks.`, `final_layer.`, `txt_in.`, ...), else diffusers / PEFT (`lora_A` / `lora_B`
//! under diffusers module paths). The `transformer.` or `diffusion_model.` prefix is dropped.

use super::names::{self, Split, KOHYA_PREFIX};
use super::LoraErrorKind;
use candle_core::{DType, Device, Tensor};
use std::collections::BTreeMap;

/// One LoRA pair of a file, with the layers it targets.
#[derive(Debug)]
pub(super) struct Module {
    /// Its name in the file (prefix and suffix removed), for messages.
    pub name: String,
    /// Diffusers module paths.
    pub targets: Vec<String>,
    pub split: Split,
    /// (rank, in), (out, rank), (out): as stored, on the CPU.
    pub a: Tensor,
    pub b: Tensor,
    pub bias_b: Option<Tensor>,
    /// `alpha / rank` per target (before the request's weight).
    pub scales: Vec<f64>,
    /// Keys of the file it was made of.
    pub keys: usize,
}

/// A parsed file.
#[derive(Debug)]
pub(super) struct Parsed {
    pub format: &'static str,
    pub modules: Vec<Module>,
    /// Keys that belong to no LoRA pair.
    pub stray_keys: usize,
    /// Bytes its tensors take.
    pub bytes: usize,
}

/// The adapter formats that are refused, by a key fragment that marks them.
const REFUSED: &[(&str, &str)] = &[
    ("lora_magnitude_vector", "DoRA"),
    ("dora_scale", "DoRA"),
    ("lokr_", "LoKr"),
    ("hada_", "LoHa"),
];

/// The tensors of a pair, by role.
#[derive(Default)]
struct Parts {
    a: Option<Tensor>,
    b: Option<Tensor>,
    bias_b: Option<Tensor>,
    alpha: Option<Tensor>,
    keys: usize,
}

/// What a key holds in its pair.
#[derive(Clone, Copy)]
enum Role {
    A,
    B,
    BiasB,
    Alpha,
}

const PEFT_KEYS: &[(&str, Role)] = &[
    (".lora_A.weight", Role::A),
    (".lora_B.weight", Role::B),
    (".lora_B.bias", Role::BiasB),
];

const KOHYA_KEYS: &[(&str, Role)] = &[
    (".lora_down.weight", Role::A),
    (".lora_up.weight", Role::B),
    (".alpha", Role::Alpha),
];

/// `key` as (module, role) when it ends with one of `suffixes`.
fn split_key<'a>(key: &'a str, suffixes: &[(&str, Role)]) -> Option<(&'a str, Role)> {
    suffixes
        .iter()
        .find_map(|(s, role)| key.strip_suffix(s).map(|m| (m, *role)))
}

fn strip_prefix(key: &str) -> &str {
    ["transformer.", "diffusion_model."]
        .iter()
        .find_map(|p| key.strip_prefix(p))
        .unwrap_or(key)
}

fn finite(name: &str, t: &Tensor) -> Result<(), LoraErrorKind> {
    let values = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    if values.iter().all(|v| v.is_finite()) {
        Ok(())
    } else {
        Err(LoraErrorKind::NonFinite(name.to_string()))
    }
}

/// Parses the bytes of a `.safetensors` LoRA file.
pub(super) fn parse(bytes: &[u8]) -> Result<Parsed, LoraErrorKind> {
    let not_st = |e: safetensors::SafeTensorError| LoraErrorKind::NotSafetensors(e.to_string());
    let (_, header) = safetensors::SafeTensors::read_metadata(bytes).map_err(not_st)?;
    let tensors = candle_core::safetensors::load_buffer(bytes, &Device::Cpu)?;
    let config = header
        .metadata()
        .as_ref()
        .and_then(|m| m.get(super::config::METADATA_KEY))
        .map(|json| super::config::AdapterConfig::parse(json))
        .transpose()?;
    for key in tensors.keys() {
        if let Some((_, format)) = REFUSED.iter().find(|(frag, _)| key.contains(frag)) {
            return Err(LoraErrorKind::Refused(format));
        }
    }
    if config.as_ref().is_some_and(|c| c.use_dora) {
        return Err(LoraErrorKind::Refused("DoRA"));
    }
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    for name in &names {
        finite(name, &tensors[*name])?;
    }
    let bytes = tensors
        .values()
        .map(|t| t.elem_count() * t.dtype().size_in_bytes())
        .sum();
    let kohya = names.iter().any(|k| k.starts_with(KOHYA_PREFIX));
    let suffixes = if kohya { KOHYA_KEYS } else { PEFT_KEYS };
    let mut pairs: BTreeMap<String, Parts> = BTreeMap::new();
    let mut stray_keys = 0;
    for name in names {
        let key = if kohya {
            name.strip_prefix(KOHYA_PREFIX)
        } else {
            Some(strip_prefix(name))
        };
        let Some((module, role)) = key.and_then(|k| split_key(k, suffixes)) else {
            stray_keys += 1;
            continue;
        };
        let parts = pairs.entry(module.to_string()).or_default();
        let t = tensors[name].clone();
        parts.keys += 1;
        match role {
            Role::A => parts.a = Some(t),
            Role::B => parts.b = Some(t),
            Role::BiasB => parts.bias_b = Some(t),
            Role::Alpha => parts.alpha = Some(t),
        }
    }
    let original = kohya || pairs.keys().any(|m| names::is_original(m));
    let format = match (kohya, original) {
        (true, _) => "kohya",
        (false, true) => "hunyuan",
        (false, false) => "diffusers",
    };
    let mut modules = Vec::with_capacity(pairs.len());
    for (name, parts) in pairs {
        let (Some(a), Some(b)) = (parts.a, parts.b) else {
            let (down, up) = if kohya {
                ("lora_down", "lora_up")
            } else {
                ("lora_A", "lora_B")
            };
            return Err(LoraErrorKind::Layout(format!(
                "{name} has only one of {down} and {up}"
            )));
        };
        let rank = a.dims().first().copied().unwrap_or(0);
        if a.rank() != 2 || b.rank() != 2 || b.dim(1)? != rank {
            return Err(LoraErrorKind::Layout(format!(
                "{name}: factors of shapes {:?} and {:?} are not a low-rank pair",
                b.dims(),
                a.dims()
            )));
        }
        let (targets, split) = if kohya {
            names::original_to_diffusers(&names::kohya_to_original(&name))
        } else if original {
            names::original_to_diffusers(&name)
        } else {
            (vec![name.clone()], Split::Whole)
        };
        let scales = if kohya {
            let alpha = match parts.alpha {
                Some(t) => t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?,
                None => vec![rank as f64],
            };
            let [alpha] = alpha[..] else {
                return Err(LoraErrorKind::Layout(format!(
                    "{name}.alpha is not a scalar"
                )));
            };
            vec![alpha / rank as f64; targets.len()]
        } else {
            match &config {
                Some(c) => targets
                    .iter()
                    .map(|t| c.scaling(t, rank))
                    .collect::<Result<_, _>>()?,
                None => vec![1.0; targets.len()],
            }
        };
        modules.push(Module {
            name,
            targets,
            split,
            a,
            b,
            bias_b: parts.bias_b,
            scales,
            keys: parts.keys,
        });
    }
    Ok(Parsed {
        format,
        modules,
        stray_keys,
        bytes,
    })
}
