//! `CLIPEncoder`: the pre-norm transformer layers CLIP's text model and vision tower share
//! (`layers.{i}.{layer_norm1, self_attn.{q,k,v,out}_proj, layer_norm2, mlp.fc1, mlp.fc2}`).
//!
//! <https://github.com/huggingface/transformers/blob/v5.24.0/src/transformers/models/clip/modeling_clip.py#L280-L470>

use crate::layers::{
    attention::{attention, default_score_budget},
    linear::{linear, Linear},
    norm::LayerNorm,
};
use crate::text_encoders::masked_attention;
use candle_core::{bail, Module, Result, Tensor};
use candle_nn::VarBuilder;

/// The MLP activation of a CLIP config (`hidden_act`, transformers' `ACT2FN` names).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HiddenAct {
    /// `quick_gelu`: x · sigmoid(1.702 x) (OpenAI's CLIP, every safety checker).
    QuickGelu,
    /// `gelu`: the exact, erf-based GELU.
    Gelu,
}

impl HiddenAct {
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "quick_gelu" => Ok(Self::QuickGelu),
            "gelu" => Ok(Self::Gelu),
            _ => bail!("clip config: hidden_act {name:?} is not supported (quick_gelu or gelu)"),
        }
    }

    fn forward(self, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::QuickGelu => x * candle_nn::ops::sigmoid(&(x * 1.702)?)?,
            Self::Gelu => x.gelu_erf(),
        }
    }
}

/// The sizes of an encoder: the fields of `CLIPTextConfig` / `CLIPVisionConfig` it reads.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EncoderDims {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub hidden_act: HiddenAct,
    pub layer_norm_eps: f64,
}

impl EncoderDims {
    /// The dims of a config, checked: `hidden_act` known, heads dividing the width.
    pub fn new(
        hidden_size: usize,
        intermediate_size: usize,
        num_hidden_layers: usize,
        num_attention_heads: usize,
        hidden_act: &str,
        layer_norm_eps: f64,
    ) -> Result<Self> {
        let hidden_act = HiddenAct::parse(hidden_act)?;
        if num_attention_heads == 0 || !hidden_size.is_multiple_of(num_attention_heads) {
            bail!(
                "clip config: hidden_size {hidden_size} must be a multiple of num_attention_heads \
                 {num_attention_heads}"
            )
        }
        Ok(Self {
            hidden_size,
            intermediate_size,
            num_hidden_layers,
            num_attention_heads,
            hidden_act,
            layer_norm_eps,
        })
    }
}

#[derive(Debug, Clone)]
struct EncoderLayer {
    layer_norm1: LayerNorm,
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    layer_norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    heads: usize,
    act: HiddenAct,
}

impl EncoderLayer {
    fn new(dims: &EncoderDims, vb: VarBuilder) -> Result<Self> {
        let (d, eps) = (dims.hidden_size, dims.layer_norm_eps);
        let a = vb.pp("self_attn");
        Ok(Self {
            layer_norm1: LayerNorm::new(d, eps, vb.pp("layer_norm1"))?,
            q_proj: linear(d, d, a.pp("q_proj"))?,
            k_proj: linear(d, d, a.pp("k_proj"))?,
            v_proj: linear(d, d, a.pp("v_proj"))?,
            out_proj: linear(d, d, a.pp("out_proj"))?,
            layer_norm2: LayerNorm::new(d, eps, vb.pp("layer_norm2"))?,
            fc1: linear(d, dims.intermediate_size, vb.pp("mlp.fc1"))?,
            fc2: linear(dims.intermediate_size, d, vb.pp("mlp.fc2"))?,
            heads: dims.num_attention_heads,
            act: dims.hidden_act,
        })
    }

    fn forward(&self, x: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let (b, n, d) = x.dims3()?;
        let h = self.heads;
        let xn = self.layer_norm1.forward(x)?;
        let a = match mask {
            Some(mask) => {
                // (b, n, d) -> (b, heads, n, d / heads)
                let split = |t: Tensor| t.reshape((b, n, h, d / h))?.transpose(1, 2)?.contiguous();
                let q = split(self.q_proj.forward(&xn)?)?;
                let k = split(self.k_proj.forward(&xn)?)?;
                let v = split(self.v_proj.forward(&xn)?)?;
                // (b, heads, n, d / heads) -> (b, n, d)
                masked_attention(&q, &k, &v, mask)?
                    .transpose(1, 2)?
                    .reshape((b, n, d))?
            }
            None => {
                // (b, n, d) -> (b, n, heads, d / heads), token-major as `attention` takes it
                let split = |t: Tensor| t.reshape((b, n, h, d / h));
                let q = split(self.q_proj.forward(&xn)?)?;
                let k = split(self.k_proj.forward(&xn)?)?;
                let v = split(self.v_proj.forward(&xn)?)?;
                let budget = default_score_budget(x.device());
                // (b, n, heads, d / heads) -> (b, n, d)
                attention(&q, &k, &v, None, budget)?.reshape((b, n, d))?
            }
        };
        let x = (x + self.out_proj.forward(&a)?)?;
        let hmid = self.fc1.forward(&self.layer_norm2.forward(&x)?)?;
        x + self.fc2.forward(&self.act.forward(&hmid)?)?
    }
}

/// `CLIPEncoder`: the stack of encoder layers.
#[derive(Debug, Clone)]
pub struct ClipEncoder {
    layers: Vec<EncoderLayer>,
}

impl ClipEncoder {
    /// `vb` is the `encoder` node (`layers.{i}`).
    pub fn new(dims: &EncoderDims, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            layers: (0..dims.num_hidden_layers)
                .map(|i| EncoderLayer::new(dims, vb.pp("layers").pp(i)))
                .collect::<Result<_>>()?,
        })
    }

    /// The last hidden state (b, n, hidden) for inputs (b, n, hidden). `mask` is an additive
    /// (b, 1, n, n) mask (the text model's causal one); `None`: every token sees every token (the
    /// vision tower).
    pub fn forward(&self, x: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let mut x = x.clone();
        for layer in &self.layers {
            x = layer.forward(&x, mask)?;
        }
        Ok(x)
    }
}
