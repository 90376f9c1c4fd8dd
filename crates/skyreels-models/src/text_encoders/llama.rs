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
    layers: Vec<DecoderLayer>,
    cfg: LlamaConfig,
}

impl LlamaEncoder {
    /// The encoder producing `hidden_states[-(skip + 1)]`: it loads and runs
    /// `num_hidden_layers - skip` layers. `vb` is the model root (`embed_tokens`, `layers.*`).
    pub fn new(cfg: &LlamaConfig, skip: usize, vb: VarBuilder) -> Result<Self> {
        cfg.validate()?;
        if skip > cfg.num_hidden_layers {
            bail!(
                "llama: cannot skip {skip} of {} layers",
                cfg.num_hidden_layers
            )
        }
        let n = Self::layers_run(cfg, skip);
        Ok(Self {
            embed_tokens: candle_nn::embedding(
                cfg.vocab_size,
                cfg.hidden_size,
                vb.pp("embed_tokens"),
            )?,
            layers: (0..n)
                .map(|i| DecoderLayer::new(cfg, vb.pp("layers").pp(i)))
                .collect::<Result<_>>()?,
            cfg: cfg.clone(),
        })
    }

    /// How many decoder layers produce `hidden_states[-(skip + 1)]`.
    pub fn layers_run(cfg: &LlamaConfig, skip: usize) -> usize {
        cfg.num_hidden_layers.saturating_sub(skip)
    }

    /// Hidden states (b, n, hidden) for token ids (b, n) and attention mask (b, n) of 1/0, with
    /// positions 0..n, causal attention and padded keys masked.
    pub fn forward(&self, ids: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let (b, n) = ids.dims2()?;
        if mask.dims() != [b, n] {
            bail!(
                "llama: mask {:?} must match ids {:?}",
                mask.shape(),
                ids.shape()
            )
        }
        let dev = ids.device();
        let mut x = self.embed_tokens.forward(ids)?;
        let (cos, sin) = rope_tables(n, self.cfg.head_dim(), self.cfg.theta(), dev)?;
        let mask = causal_mask(mask, x.dtype())?;
        for layer in &self.layers {
            x = layer.forward(&x, &cos, &sin, &mask)?;
        }
        Ok(x)
    }
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
}
