//! `LlamaModel` as a text encoder: returns `hidden_states[-(skip + 1)]`, the output of decoder
//! layer `num_hidden_layers - skip` before the final norm, and runs no later layer.

use super::{causal_mask, masked_attention};
use crate::layers::{
    linear::{linear_b, Linear},
    norm::RmsNorm,
};
use candle_core::{bail, DType, Device, Module, Result, Tensor};
use candle_nn::{Embedding, VarBuilder};
use serde::Deserialize;

/// The fields of transformers' `LlamaConfig` the encoder needs.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct LlamaConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    /// Grouped-query attention; absent means `num_attention_heads`.
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    /// Absent means `hidden_size / num_attention_heads`.
    #[serde(default)]
    pub head_dim: Option<usize>,
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    /// transformers <= 4.x writes `rope_theta`; 5.x writes `rope_parameters.rope_theta`.
    #[serde(default)]
    pub rope_theta: Option<f64>,
    #[serde(default)]
    pub rope_parameters: Option<RopeParameters>,
    #[serde(default = "default_act")]
    pub hidden_act: String,
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default)]
    pub mlp_bias: bool,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct RopeParameters {
    #[serde(default)]
    pub rope_theta: Option<f64>,
    #[serde(default)]
    pub rope_type: Option<String>,
}

fn default_eps() -> f64 {
    1e-6
}

fn default_act() -> String {
    "silu".into()
}

impl LlamaConfig {
    pub fn kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    pub fn theta(&self) -> f64 {
        self.rope_parameters
            .as_ref()
            .and_then(|r| r.rope_theta)
            .or(self.rope_theta)
            .unwrap_or(10000.0)
    }

    pub fn validate(&self) -> Result<()> {
        if self.hidden_act != "silu" {
            bail!(
                "llama config: hidden_act {:?} is not supported (only silu)",
                self.hidden_act
            )
        }
        if let Some(t) = self
            .rope_parameters
            .as_ref()
            .and_then(|r| r.rope_type.as_deref())
        {
            if t != "default" {
                bail!("llama config: rope_type {t:?} is not supported (only default)")
            }
        }
        let (h, kv) = (self.num_attention_heads, self.kv_heads());
        if h == 0 || kv == 0 || h % kv != 0 || !self.head_dim().is_multiple_of(2) {
            bail!(
                "llama config: {h} attention heads, {kv} key/value heads and head_dim {} must be \
                 positive, heads a multiple of kv heads, head_dim even",
                self.head_dim()
            )
        }
        Ok(())
    }
}

#[derive(Debug, Clone)]
struct DecoderLayer {
    input_layernorm: RmsNorm,
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    post_attention_layernorm: RmsNorm,
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
}

impl DecoderLayer {
    fn new(cfg: &LlamaConfig, vb: VarBuilder) -> Result<Self> {
        let (d, hd) = (cfg.hidden_size, cfg.head_dim());
        let (h, kv) = (cfg.num_attention_heads, cfg.kv_heads());
        let a = vb.pp("self_attn");
        let m = vb.pp("mlp");
        let norm = |name: &str| RmsNorm::new(d, cfg.rms_norm_eps, vb.pp(name));
        Ok(Self {
            input_layernorm: norm("input_layernorm")?,
            q_proj: linear_b(d, h * hd, cfg.attention_bias, a.pp("q_proj"))?,
            k_proj: linear_b(d, kv * hd, cfg.attention_bias, a.pp("k_proj"))?,
            v_proj: linear_b(d, kv * hd, cfg.attention_bias, a.pp("v_proj"))?,
            o_proj: linear_b(h * hd, d, cfg.attention_bias, a.pp("o_proj"))?,
            post_attention_layernorm: norm("post_attention_layernorm")?,
            gate_proj: linear_b(d, cfg.intermediate_size, cfg.mlp_bias, m.pp("gate_proj"))?,
            up_proj: linear_b(d, cfg.intermediate_size, cfg.mlp_bias, m.pp("up_proj"))?,
            down_proj: linear_b(cfg.intermediate_size, d, cfg.mlp_bias, m.pp("down_proj"))?,
            heads: h,
            kv_heads: kv,
            head_dim: hd,
        })
    }

    fn forward(&self, x: &Tensor, cos: &Tensor, sin: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let (b, n, _) = x.dims3()?;
        let (h, kv, hd) = (self.heads, self.kv_heads, self.head_dim);
        let xn = self.input_layernorm.forward(x)?;
        // (b, n, heads·hd) -> (b, heads, n, hd)
        let split =
            |t: Tensor, heads: usize| t.reshape((b, n, heads, hd))?.transpose(1, 2)?.contiguous();
        let q = split(self.q_proj.forward(&xn)?, h)?;
        let k = split(self.k_proj.forward(&xn)?, kv)?;
        let v = split(self.v_proj.forward(&xn)?, kv)?;
        let dtype = q.dtype();
        let rot = |t: &Tensor| -> Result<Tensor> {
            candle_nn::rotary_emb::rope(&t.to_dtype(DType::F32)?, cos, sin)?.to_dtype(dtype)
        };
        let (q, k) = (rot(&q)?, rot(&k)?);
        // grouped-query attention: each kv head serves heads / kv query heads
        let rep = |t: Tensor| -> Result<Tensor> {
            if h == kv {
                return Ok(t);
            }
            t.unsqueeze(2)?
                .broadcast_as((b, kv, h / kv, n, hd))?
                .reshape((b, h, n, hd))
        };
        let (k, v) = (rep(k)?, rep(v)?);
        // (b, heads, n, hd) -> (b, n, heads·hd)
        let a = masked_attention(&q, &k, &v, mask)?
            .transpose(1, 2)?
            .reshape((b, n, h * hd))?;
        let x = (x + self.o_proj.forward(&a)?)?;
        let xn = self.post_attention_layernorm.forward(&x)?;
        let mlp = (self.gate_proj.forward(&xn)?.silu()? * self.up_proj.forward(&xn)?)?;
        x + self.down_proj.forward(&mlp)?
    }
}

/// The first `layers` decoder layers of a `LlamaModel` (the final norm is never needed).
#[derive(Debug, Clone)]
pub struct LlamaEncoder {
    embed_tokens: Embedding,
    layers: Layers,
    cfg: LlamaConfig,
}

#[derive(Clone)]
enum Layers {
    /// Every layer built once and kept.
    Resident(Vec<DecoderLayer>),
    /// Each layer built from `vb` (`layers.i`) just before it runs and freed after it.
    Streamed {
        vb: VarBuilder<'static>,
        count: usize,
    },
}

impl std::fmt::Debug for Layers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Layers::Resident(l) => write!(f, "Resident({} layers)", l.len()),
            Layers::Streamed { count, .. } => write!(f, "Streamed({count} layers)"),
        }
    }
}

impl LlamaEncoder {
    /// The encoder producing `hidden_states[-(skip + 1)]`: it loads and runs
    /// `num_hidden_layers - skip` layers. `vb` is the model root (`embed_tokens`, `layers.*`).
    pub fn new(cfg: &LlamaConfig, skip: usize, vb: VarBuilder) -> Result<Self> {
        let n = Self::checked_layers(cfg, skip)?;
        Ok(Self {
            embed_tokens: embedding(cfg, vb.pp("embed_tokens"))?,
            layers: Layers::Resident(
                (0..n)
                    .map(|i| DecoderLayer::new(cfg, vb.pp("layers").pp(i)))
                    .collect::<Result<_>>()?,
            ),
            cfg: cfg.clone(),
        })
    }

    /// The same encoder holding only its embedding table, from `embed_vb` (the model root, on
    /// the host, say): each decoder layer is read from `layers_vb` (the model root on the device
    /// the layers run on) just before it runs and freed after it. So LLaMA never holds more than
    /// one layer on the device (~0.44 GB in bf16 for LLaMA-3-8B, instead of ~15 GB), next to
    /// a resident transformer; the weights are read once per encoding, as loading them per request
    /// did already. Numerically identical to [`LlamaEncoder::new`].
    pub fn streamed(
        cfg: &LlamaConfig,
        skip: usize,
        embed_vb: VarBuilder,
        layers_vb: VarBuilder<'static>,
    ) -> Result<Self> {
        let count = Self::checked_layers(cfg, skip)?;
        Ok(Self {
            embed_tokens: embedding(cfg, embed_vb.pp("embed_tokens"))?,
            layers: Layers::Streamed {
                vb: layers_vb.pp("layers"),
                count,
            },
            cfg: cfg.clone(),
        })
    }

    fn checked_layers(cfg: &LlamaConfig, skip: usize) -> Result<usize> {
        cfg.validate()?;
        if skip > cfg.num_hidden_layers {
            bail!(
                "llama: cannot skip {skip} of {} layers",
                cfg.num_hidden_layers
            )
        }
        Ok(Self::layers_run(cfg, skip))
    }

    /// How many decoder layers produce `hidden_states[-(skip + 1)]`.
    pub fn layers_run(cfg: &LlamaConfig, skip: usize) -> usize {
        cfg.num_hidden_layers.saturating_sub(skip)
    }

    /// Hidden states (b, n, hidden) for token ids (b, n) and attention mask (b, n) of 1/0, with
    /// positions 0..n, causal attention and padded keys masked. The result is on the mask's
    /// device (the ids may be anywhere: they are looked up where the embedding table is).
    pub fn forward(&self, ids: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let (b, n) = ids.dims2()?;
        if mask.dims() != [b, n] {
            bail!(
                "llama: mask {:?} must match ids {:?}",
                mask.shape(),
                ids.shape()
            )
        }
        let dev = mask.device();
        let table = self.embed_tokens.embeddings().device();
        let mut x = self
            .embed_tokens
            .forward(&ids.to_device(table)?)?
            .to_device(dev)?;
        let (cos, sin) = rope_tables(n, self.cfg.head_dim(), self.cfg.theta(), dev)?;
        let mask = causal_mask(mask, x.dtype())?;
        match &self.layers {
            Layers::Resident(layers) => {
                for layer in layers {
                    x = layer.forward(&x, &cos, &sin, &mask)?;
                }
            }
            Layers::Streamed { vb, count } => {
                for i in 0..*count {
                    let layer = DecoderLayer::new(&self.cfg, vb.pp(i))?;
                    x = layer.forward(&x, &cos, &sin, &mask)?;
                }
            }
        }
        Ok(x)
    }
}

fn embedding(cfg: &LlamaConfig, vb: VarBuilder) -> Result<Embedding> {
    candle_nn::embedding(cfg.vocab_size, cfg.hidden_size, vb)
}

/// cos and sin (n, head_dim / 2) of transformers' default rotary embedding, in f32:
/// inv_freq_k = 1 / theta^(2k / dim), angle = position · inv_freq_k.
fn rope_tables(n: usize, dim: usize, theta: f64, dev: &Device) -> Result<(Tensor, Tensor)> {
    let theta = theta as f32;
    let inv: Vec<f32> = (0..dim / 2)
        .map(|k| 1.0 / theta.powf((2 * k) as f32 / dim as f32))
        .collect();
    let (mut cos, mut sin) = (
        Vec::with_capacity(n * dim / 2),
        Vec::with_capacity(n * dim / 2),
    );
    for p in 0..n {
        for f in &inv {
            let a = p as f32 * f;
            cos.push(a.cos());
            sin.push(a.sin());
        }
    }
    Ok((
        Tensor::from_vec(cos, (n, dim / 2), dev)?,
        Tensor::from_vec(sin, (n, dim / 2), dev)?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_reads_both_rope_theta_forms() {
        // transformers 4.x (the hub's LLaVA-LLaMA-3 export) and 5.x
        let base = r#""vocab_size": 8, "hidden_size": 8, "intermediate_size": 8,
                      "num_hidden_layers": 2, "num_attention_heads": 2"#;
        let old: LlamaConfig =
            serde_json::from_str(&format!(r#"{{{base}, "rope_theta": 500000.0}}"#)).unwrap();
        let new: LlamaConfig = serde_json::from_str(&format!(
            r#"{{{base}, "rope_parameters": {{"rope_theta": 500000.0, "rope_type": "default"}}}}"#
        ))
        .unwrap();
        assert_eq!((old.theta(), new.theta()), (500000.0, 500000.0));
        assert_eq!((old.kv_heads(), old.head_dim()), (2, 4));
        let scaled: LlamaConfig = serde_json::from_str(&format!(
            r#"{{{base}, "rope_parameters": {{"rope_theta": 1.0, "rope_type": "llama3"}}}}"#
        ))
        .unwrap();
        assert!(scaled
            .validate()
            .unwrap_err()
            .to_string()
            .contains("rope_type"));
    }

    /// Seeded weights that count what is read, by top-level name (`embed_tokens`, `layers.i`);
    /// clones share the count.
    #[derive(Clone, Default)]
    struct Counting {
        reads: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    }

    impl candle_nn::var_builder::SimpleBackend for Counting {
        fn get(
            &self,
            s: candle_core::Shape,
            name: &str,
            _: candle_nn::Init,
            dtype: DType,
            dev: &Device,
        ) -> Result<Tensor> {
            let part: Vec<&str> = name.split('.').collect();
            let key = match part[0] {
                "layers" => format!("layers.{}", part[1]),
                other => other.to_string(),
            };
            self.reads.lock().unwrap().push(key);
            // the same values every time a name is read: seeded by the name
            let seed = name
                .bytes()
                .fold(7u64, |h, b| h.wrapping_mul(31).wrapping_add(b as u64));
            let n = s.elem_count();
            let v: Vec<f32> = (0..n)
                .map(|i| (((i as u64).wrapping_mul(2654435761) ^ seed) % 997) as f32 / 997.0 - 0.5)
                .collect();
            Tensor::from_vec(v, s, dev)?.to_dtype(dtype)
        }

        fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> Result<Tensor> {
            bail!("unexpected unchecked read of {name}")
        }

        fn contains_tensor(&self, _: &str) -> bool {
            true
        }
    }

    #[test]
    fn streamed_layers_are_read_when_they_run_and_match_resident_ones() {
        let cfg: LlamaConfig = serde_json::from_str(
            r#"{"vocab_size": 40, "hidden_size": 16, "intermediate_size": 24,
                "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2}"#,
        )
        .unwrap();
        let backend = Counting::default();
        let vb =
            |b: &Counting| VarBuilder::from_backend(Box::new(b.clone()), DType::F32, Device::Cpu);
        let reads = || std::mem::take(&mut *backend.reads.lock().unwrap());
        let resident = LlamaEncoder::new(&cfg, 1, vb(&backend)).unwrap();
        reads();
        let streamed = LlamaEncoder::streamed(&cfg, 1, vb(&backend), vb(&backend)).unwrap();
        // built: the embedding table only
        assert_eq!(reads(), ["embed_tokens"]);
        let ids = Tensor::new(&[[3u32, 9, 27, 1, 0], [5, 5, 8, 0, 0]], &Device::Cpu).unwrap();
        let mask = Tensor::new(&[[1u32, 1, 1, 1, 0], [1, 1, 1, 0, 0]], &Device::Cpu).unwrap();
        let want = resident.forward(&ids, &mask).unwrap();
        assert!(reads().is_empty(), "resident layers are never read again");
        let got = streamed.forward(&ids, &mask).unwrap();
        // each of the 3 layers run (4 - skip 1) read once, in order, while it runs
        let mut seen = reads();
        seen.dedup();
        assert_eq!(seen, ["layers.0", "layers.1", "layers.2"]);
        let diff = (got - want)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert_eq!(diff, 0.0, "streaming changes no number");
    }
}
