//! Every [`Linear`] of the model by its diffusers module path (`transformer_blocks.0.attn.to_q`,
//! the state-dict key without `.weight`): where LoRA adapters are attached.

use super::{
    ConditionEmbedding, FeedForward, HunyuanVideoTransformer3DModel, QkvNorm, RefinerAttention,
    RefinerBlock, SingleTransformerBlock, TokenRefiner, TransformerBlock,
};
use crate::layers::linear::Linear;

/// The layers found so far, with their paths.
pub(super) struct Visit<'a>(Vec<(String, &'a mut Linear)>);

impl<'a> Visit<'a> {
    fn add(&mut self, prefix: &str, name: &str, layer: &'a mut Linear) {
        self.0.push((format!("{prefix}{name}"), layer));
    }
}

impl FeedForward {
    fn linears_mut<'a>(&'a mut self, p: &str, v: &mut Visit<'a>) {
        v.add(p, "net.0.proj", &mut self.proj_in);
        v.add(p, "net.2", &mut self.proj_out);
    }
}

impl ConditionEmbedding {
    fn linears_mut<'a>(&'a mut self, p: &str, v: &mut Visit<'a>) {
        let [l1, l2] = self.timestep_embedder.linears_mut();
        v.add(p, "timestep_embedder.linear_1", l1);
        v.add(p, "timestep_embedder.linear_2", l2);
        let [l1, l2] = self.text_embedder.linears_mut();
        v.add(p, "text_embedder.linear_1", l1);
        v.add(p, "text_embedder.linear_2", l2);
        if let Some(g) = &mut self.guidance_embedder {
            let [l1, l2] = g.linears_mut();
            v.add(p, "guidance_embedder.linear_1", l1);
            v.add(p, "guidance_embedder.linear_2", l2);
        }
    }
}

impl RefinerAttention {
    fn linears_mut<'a>(&'a mut self, p: &str, v: &mut Visit<'a>) {
        v.add(p, "to_q", &mut self.to_q);
        v.add(p, "to_k", &mut self.to_k);
        v.add(p, "to_v", &mut self.to_v);
        v.add(p, "to_out.0", &mut self.to_out);
    }
}

impl RefinerBlock {
    fn linears_mut<'a>(&'a mut self, p: &str, v: &mut Visit<'a>) {
        self.attn.linears_mut(&format!("{p}attn."), v);
        self.ff.linears_mut(&format!("{p}ff."), v);
        v.add(p, "norm_out.linear", &mut self.norm_out);
    }
}

impl TokenRefiner {
    fn linears_mut<'a>(&'a mut self, p: &str, v: &mut Visit<'a>) {
        self.time_text_embed
            .linears_mut(&format!("{p}time_text_embed."), v);
        v.add(p, "proj_in", &mut self.proj_in);
        for (i, block) in self.refiner_blocks.iter_mut().enumerate() {
            block.linears_mut(&format!("{p}token_refiner.refiner_blocks.{i}."), v);
        }
    }
}

impl QkvNorm {
    /// `names`: the q, k and v projections' attribute names.
    fn linears_mut<'a>(&'a mut self, p: &str, names: [&str; 3], v: &mut Visit<'a>) {
        v.add(p, names[0], &mut self.q);
        v.add(p, names[1], &mut self.k);
        v.add(p, names[2], &mut self.v);
    }
}

impl TransformerBlock {
    fn linears_mut<'a>(&'a mut self, p: &str, v: &mut Visit<'a>) {
        v.add(p, "norm1.linear", &mut self.norm1);
        v.add(p, "norm1_context.linear", &mut self.norm1_context);
        let attn = format!("{p}attn.");
        self.img_qkv.linears_mut(&attn, ["to_q", "to_k", "to_v"], v);
        let added = ["add_q_proj", "add_k_proj", "add_v_proj"];
        self.txt_qkv.linears_mut(&attn, added, v);
        v.add(&attn, "to_out.0", &mut self.to_out);
        v.add(&attn, "to_add_out", &mut self.to_add_out);
        self.ff.linears_mut(&format!("{p}ff."), v);
        self.ff_context.linears_mut(&format!("{p}ff_context."), v);
    }
}

impl SingleTransformerBlock {
    fn linears_mut<'a>(&'a mut self, p: &str, v: &mut Visit<'a>) {
        v.add(p, "norm.linear", &mut self.norm);
        let attn = format!("{p}attn.");
        self.qkv.linears_mut(&attn, ["to_q", "to_k", "to_v"], v);
        v.add(p, "proj_mlp", &mut self.proj_mlp);
        v.add(p, "proj_out", &mut self.proj_out);
    }
}

impl HunyuanVideoTransformer3DModel {
    /// Every linear layer with its diffusers module path, in module order.
    pub fn linears_mut(&mut self) -> Vec<(String, &mut Linear)> {
        let mut v = Visit(Vec::new());
        self.context_embedder
            .linears_mut("context_embedder.", &mut v);
        self.time_text_embed.linears_mut("time_text_embed.", &mut v);
        for (i, block) in self.transformer_blocks.iter_mut().enumerate() {
            block.linears_mut(&format!("transformer_blocks.{i}."), &mut v);
        }
        for (i, block) in self.single_transformer_blocks.iter_mut().enumerate() {
            block.linears_mut(&format!("single_transformer_blocks.{i}."), &mut v);
        }
        v.add("", "norm_out.linear", &mut self.norm_out);
        v.add("", "proj_out", &mut self.proj_out);
        v.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transformer::TransformerConfig;
    use candle_core::{DType, Device};
    use candle_nn::{VarBuilder, VarMap};

    /// Every matmul weight the model loads is reached once, under its own state-dict name.
    #[test]
    fn every_linear_is_reached_by_its_state_dict_path() {
        let cfg: TransformerConfig = serde_json::from_value(serde_json::json!({
            "in_channels": 32, "out_channels": 16, "num_attention_heads": 2,
            "attention_head_dim": 8, "num_layers": 2, "num_single_layers": 1,
            "num_refiner_layers": 1, "mlp_ratio": 2.0, "patch_size": 2, "patch_size_t": 1,
            "text_embed_dim": 12, "pooled_projection_dim": 10, "rope_axes_dim": [2, 2, 4],
            "guidance_embeds": true
        }))
        .unwrap();
        let vars = VarMap::new();
        let vb = VarBuilder::from_varmap(&vars, DType::F32, &Device::Cpu);
        let mut model = HunyuanVideoTransformer3DModel::new(&cfg, vb).unwrap();
        let mut want: Vec<(String, (usize, usize))> = vars
            .data()
            .lock()
            .unwrap()
            .iter()
            .filter_map(|(k, t)| {
                let dims = t.as_tensor().dims2().ok()?;
                Some((k.strip_suffix(".weight")?.to_string(), dims))
            })
            .filter(|(k, _)| !k.starts_with("x_embedder"))
            .collect();
        want.sort();
        let mut got: Vec<(String, (usize, usize))> = model
            .linears_mut()
            .into_iter()
            .map(|(k, l)| (k, l.dims().unwrap()))
            .collect();
        got.sort();
        assert_eq!(got, want);
        // 12 context embedder + 6 conditioning + 2 × 14 double + 1 × 6 single + 2 head
        assert_eq!(got.len(), 12 + 6 + 28 + 6 + 2);
    }
}
