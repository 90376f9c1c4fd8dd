//! The PEFT `LoraConfig` a diffusers LoRA file carries in its safetensors metadata, and the
//! scaling it gives each layer.
//!
//! diffusers 0.42.1 writes it as JSON under `lora_adapter_metadata`, its keys prefixed with the
//! component (`transformer.r`, `transformer.lora_alpha`, ...: `loaders/lora_base.py`,
//! `_pack_dict_with_prefix`), and reads the `transformer.` ones back into a `LoraConfig`
//! (`loaders/peft.py::load_lora_adapter`); PEFT then gives each layer
//! `r = rank_pattern[match] or r`, `alpha = alpha_pattern[match] or lora_alpha` and
//! `scaling = alpha / r` (`alpha / √r` with `use_rslora`), a pattern matching a module path as
//! `re.match(rf"(.*\.)?({pattern})$", path)` (`peft/utils/other.py::get_pattern_key`, the first
//! pattern in the file's order that matches). A config without the prefix (PEFT's own
//! `adapter_config.json` fields) is read as it is.
//!
//! Without this metadata diffusers derives the config from the ranks with alpha = rank for
//! every module (`utils/peft_utils.py::get_peft_kwargs` with no network alphas): scaling 1.

use super::LoraErrorKind;
use serde::de::{Deserializer, MapAccess, Visitor};
use serde::Deserialize;

/// The safetensors metadata key of the adapter config.
pub(super) const METADATA_KEY: &str = "lora_adapter_metadata";

/// A pattern and its value, in the file's order.
#[derive(Debug, Default)]
struct Patterns(Vec<(regex::Regex, f64)>);

impl<'de> Deserialize<'de> for Patterns {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Ordered;
        impl<'de> Visitor<'de> for Ordered {
            type Value = Patterns;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an object of module patterns and numbers")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Patterns, A::Error> {
                let mut out = Vec::new();
                while let Some((pattern, value)) = map.next_entry::<String, f64>()? {
                    let re = regex::Regex::new(&format!(r"^(.*\.)?({pattern})$"))
                        .map_err(serde::de::Error::custom)?;
                    out.push((re, value));
                }
                Ok(Patterns(out))
            }
        }
        d.deserialize_map(Ordered)
    }
}

impl Patterns {
    fn get(&self, module: &str) -> Option<f64> {
        self.0
            .iter()
            .find(|(re, _)| re.is_match(module))
            .map(|(_, v)| *v)
    }
}

fn eight() -> f64 {
    8.0
}

/// The fields of `LoraConfig` that set the scaling (PEFT's defaults where absent).
#[derive(Debug, Deserialize)]
pub(super) struct AdapterConfig {
    #[serde(default = "eight")]
    r: f64,
    #[serde(default = "eight")]
    lora_alpha: f64,
    /// Read in file order by [`OrderedPatterns`] (a JSON map here is sorted).
    #[serde(skip)]
    rank_pattern: Patterns,
    #[serde(skip)]
    alpha_pattern: Patterns,
    #[serde(default)]
    use_rslora: bool,
    #[serde(default)]
    pub use_dora: bool,
}

impl AdapterConfig {
    /// The config in a file's `lora_adapter_metadata` JSON: its `transformer.` fields, or the
    /// whole object when no field has that prefix.
    pub(super) fn parse(json: &str) -> Result<Self, LoraErrorKind> {
        let bad = |e: String| LoraErrorKind::Layout(format!("{METADATA_KEY}: {e}"));
        let value: serde_json::Map<String, serde_json::Value> =
            serde_json::from_str(json).map_err(|e| bad(e.to_string()))?;
        let prefixed: serde_json::Map<_, _> = value
            .iter()
            .filter_map(|(k, v)| Some((k.strip_prefix("transformer.")?.to_string(), v.clone())))
            .collect();
        let fields = if prefixed.is_empty() { value } else { prefixed };
        let mut config: Self = serde_json::from_value(serde_json::Value::Object(fields))
            .map_err(|e| bad(e.to_string()))?;
        let ordered: OrderedPatterns =
            serde_json::from_str(json).map_err(|e| bad(e.to_string()))?;
        config.rank_pattern = ordered.rank.unwrap_or_default();
        config.alpha_pattern = ordered.alpha.unwrap_or_default();
        Ok(config)
    }

    /// PEFT's `scaling` of the layer at `module` (a diffusers path) whose LoRA has rank `rank`;
    /// the config's rank must be the tensors' (PEFT cannot load the weights otherwise).
    pub(super) fn scaling(&self, module: &str, rank: usize) -> Result<f64, LoraErrorKind> {
        let r = self.rank_pattern.get(module).unwrap_or(self.r);
        if r != rank as f64 {
            return Err(LoraErrorKind::Layout(format!(
                "{METADATA_KEY} gives {module} rank {r}, its tensors have rank {rank}"
            )));
        }
        let alpha = self.alpha_pattern.get(module).unwrap_or(self.lora_alpha);
        Ok(if self.use_rslora {
            alpha / r.sqrt()
        } else {
            alpha / r
        })
    }
}

/// The two pattern fields in file order, under either key form.
#[derive(Default)]
struct OrderedPatterns {
    rank: Option<Patterns>,
    alpha: Option<Patterns>,
}

impl<'de> Deserialize<'de> for OrderedPatterns {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = OrderedPatterns;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a LoraConfig object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<OrderedPatterns, A::Error> {
                let mut out = OrderedPatterns::default();
                let mut prefixed = (None, None);
                while let Some(key) = map.next_key::<String>()? {
                    match key.as_str() {
                        "transformer.rank_pattern" => prefixed.0 = Some(map.next_value()?),
                        "transformer.alpha_pattern" => prefixed.1 = Some(map.next_value()?),
                        "rank_pattern" => out.rank = Some(map.next_value()?),
                        "alpha_pattern" => out.alpha = Some(map.next_value()?),
                        _ => {
                            map.next_value::<serde::de::IgnoredAny>()?;
                        }
                    }
                }
                if prefixed.0.is_some() || prefixed.1.is_some() {
                    (out.rank, out.alpha) = prefixed;
                }
                Ok(out)
            }
        }
        d.deserialize_map(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scaling_follows_peft_patterns_in_file_order() {
        // diffusers' form: prefixed fields, rank and alpha patterns
        let c = AdapterConfig::parse(
            r#"{"transformer.r": 4, "transformer.lora_alpha": 8,
                "transformer.alpha_pattern": {"blocks.0.attn.to_q": 1,
                    "transformer_blocks.0.attn.to_q": 2, "to_q": 6},
                "transformer.rank_pattern": {"proj_out": 2}}"#,
        )
        .unwrap();
        assert_eq!(c.scaling("transformer_blocks.1.attn.to_k", 4).unwrap(), 2.0);
        // the first pattern that matches, at a dot boundary (not after `transformer_`)
        assert_eq!(c.scaling("transformer_blocks.0.attn.to_q", 4).unwrap(), 0.5);
        assert_eq!(
            c.scaling("single_transformer_blocks.0.attn.to_q", 4)
                .unwrap(),
            1.5
        );
        assert_eq!(
            c.scaling("single_transformer_blocks.0.proj_out", 2)
                .unwrap(),
            4.0
        );
        // a rank the tensors do not have
        assert!(c.scaling("proj_out", 4).is_err());
        // rsLoRA, PEFT's defaults (r = lora_alpha = 8), an unprefixed config
        let c = AdapterConfig::parse(r#"{"use_rslora": true, "r": 4}"#).unwrap();
        assert_eq!(c.scaling("proj_out", 4).unwrap(), 4.0);
        let c = AdapterConfig::parse(r#"{"transformer.use_dora": true}"#).unwrap();
        assert!(c.use_dora);
        assert_eq!(c.scaling("x", 8).unwrap(), 1.0);
        assert!(AdapterConfig::parse("not json").is_err());
    }
}
