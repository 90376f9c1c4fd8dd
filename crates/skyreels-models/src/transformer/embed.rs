//! Embedding: the conditioning vector, the token refiner over the text states, RoPE tables.

use super::blocks::{from_heads, modulation, to_heads, AttnCtx};
use super::{
    ConditionEmbedding, HunyuanVideoTransformer3DModel, RefinerAttention, RefinerBlock, RopeTables,
    TokenRefiner, TIME_PROJ_DIM,
};
use crate::layers::{
    attention, embeddings::timestep_sinusoid, modulation::add_gated, rope::rope_tables,
};
use candle_core::{bail, DType, IndexOp, Module, Result, Tensor};

impl ConditionEmbedding {
    pub(super) fn forward(
        &self,
        timestep: &Tensor,
        pooled: &Tensor,
        guidance: Option<&Tensor>,
    ) -> Result<Tensor> {
        let dtype = pooled.dtype();
        let t = timestep_sinusoid(timestep, TIME_PROJ_DIM)?.to_dtype(dtype)?;
        let t_emb = self.timestep_embedder.forward(&t)?;
        let p_emb = self.text_embedder.forward(pooled)?;
        match &self.guidance_embedder {
            None => t_emb + p_emb,
            Some(embedder) => {
                let Some(g) = guidance else {
                    bail!("this transformer has a guidance embedder: `guidance` is required")
                };
                let g = timestep_sinusoid(g, TIME_PROJ_DIM)?.to_dtype(dtype)?;
                // reference order: (timesteps_emb + guidance_emb) + pooled_projections
                (t_emb + embedder.forward(&g)?)? + p_emb
            }
        }
    }
}

impl RefinerAttention {
    /// The reference mask is M[i,j] = m_i ∧ m_j with column 0 forced on: a valid query sees the
    /// valid keys (and key 0); a padded query sees key 0 only, so its output is exactly v[0].
    fn forward(&self, x: &Tensor, ctx: &AttnCtx) -> Result<Tensor> {
        let mask = &ctx.text_mask;
        let q = to_heads(&self.to_q.forward(x)?, self.heads)?;
        let k = to_heads(&self.to_k.forward(x)?, self.heads)?;
        let v = to_heads(&self.to_v.forward(x)?, self.heads)?;
        let (_, n, h, d) = q.dims4()?;
        let out = if mask.valid.iter().all(|r| r.iter().all(|&v| v)) {
            attention(&q, &k, &v, None, ctx.budget)?
        } else {
            let mut outs = Vec::with_capacity(mask.valid.len());
            for (i, row) in mask.valid.iter().enumerate() {
                let keys: Vec<u32> = (0..n)
                    .filter(|&j| j == 0 || row[j])
                    .map(|j| j as u32)
                    .collect();
                let keys = Tensor::new(keys.as_slice(), x.device())?;
                let (qi, ki, vi) = (q.i(i..i + 1)?, k.i(i..i + 1)?, v.i(i..i + 1)?);
                let ki = ki.index_select(&keys, 1)?;
                let vs = vi.index_select(&keys, 1)?;
                let full = attention(&qi, &ki, &vs, None, ctx.budget)?;
                let rows: Vec<u8> = row.iter().map(|&v| v as u8).collect();
                let rows = Tensor::new(rows.as_slice(), x.device())?
                    .reshape((1, n, 1, 1))?
                    .broadcast_as((1, n, h, d))?;
                let v0 = vi.narrow(1, 0, 1)?.broadcast_as((1, n, h, d))?;
                outs.push(rows.where_cond(&full, &v0)?);
            }
            Tensor::cat(&outs, 0)?
        };
        self.to_out.forward(&from_heads(&out)?)
    }
}

impl RefinerBlock {
    fn forward(&self, x: &Tensor, temb: &Tensor, ctx: &AttnCtx) -> Result<Tensor> {
        let a = self.attn.forward(&self.norm1.forward(x)?, ctx)?;
        let g = modulation(&self.norm_out, temb, 2)?;
        let x = add_gated(x, &a, &g[0])?;
        let f = self.ff.forward(&self.norm2.forward(&x)?)?;
        add_gated(&x, &f, &g[1])
    }
}

impl TokenRefiner {
    pub(super) fn forward(
        &self,
        x: &Tensor,
        timestep: &Tensor,
        mask: &Tensor,
        ctx: &AttnCtx,
    ) -> Result<Tensor> {
        let dtype = x.dtype();
        // masked mean of the raw text states, in f32 as in the reference
        let m = mask.to_dtype(DType::F32)?.unsqueeze(2)?;
        let pooled = x
            .to_dtype(DType::F32)?
            .broadcast_mul(&m)?
            .sum(1)?
            .broadcast_div(&m.sum(1)?)?
            .to_dtype(dtype)?;
        let temb = self.time_text_embed.forward(timestep, &pooled, None)?;
        let mut h = self.proj_in.forward(x)?;
        for block in &self.refiner_blocks {
            h = block.forward(&h, &temb, ctx)?;
        }
        Ok(h)
    }
}

impl HunyuanVideoTransformer3DModel {
    /// RoPE tables for a token grid, cached for the last grid seen.
    pub(super) fn rope(&self, grid: (usize, usize, usize)) -> Result<(Tensor, Tensor)> {
        let mut cache = self.rope_cache.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(t) = cache.as_ref().filter(|t| t.grid == grid) {
            return Ok((t.cos.clone(), t.sin.clone()));
        }
        let cfg = &self.cfg;
        let (cos, sin) = rope_tables(grid, &cfg.rope_axes_dim, cfg.rope_theta, self.device())?;
        *cache = Some(RopeTables {
            grid,
            cos: cos.clone(),
            sin: sin.clone(),
        });
        Ok((cos, sin))
    }
}
