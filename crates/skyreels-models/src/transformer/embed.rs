//! Embedding, the first stage of the forward: the latents as image tokens, the conditioning
//! vector and the RoPE tables of the token grid ([`HunyuanVideoTransformer3DModel::embed`]);
//! the token refiner over the text states, which the block loop runs when it runs
//! (`BlockLoop::context`).

use super::blocks::{from_heads, modulation, to_heads, AttnCtx};
use super::inputs::{Shapes, TransformerInputs};
use super::{
    ConditionEmbedding, HunyuanVideoTransformer3DModel, RefinerAttention, RefinerBlock, RopeTables,
    TokenRefiner, TIME_PROJ_DIM,
};
use crate::layers::{
    attention, embeddings::timestep_sinusoid, modulation::add_gated, rope::rope_tables,
};
use candle_core::{bail, DType, IndexOp, Module, Result, Tensor};

impl ConditionEmbedding {
    fn forward(
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

/// What `embed` makes of the inputs (text states aside).
pub(super) struct Embedded {
    /// (b, n_img, dim) image tokens, a transposed view.
    pub(super) x: Tensor,
    /// (b, dim) timestep (+ guidance) + pooled text conditioning.
    pub(super) temb: Tensor,
    /// RoPE cos and sin, one row per image token.
    pub(super) rope: (Tensor, Tensor),
}

impl HunyuanVideoTransformer3DModel {
    /// The embedding stage for inputs of `shapes`: `x_embedder` patchifies the latents into image
    /// tokens, `time_text_embed` makes the conditioning vector.
    pub(super) fn embed(&self, inp: &TransformerInputs, shapes: &Shapes) -> Result<Embedded> {
        let dt = self.dtype;
        let rope = self.rope(shapes.grid, inp.riflex_freq_index)?;
        let temb = self.time_text_embed.forward(
            inp.timestep,
            &inp.pooled_projections.to_dtype(dt)?,
            inp.guidance,
        )?;
        // (b, c, t, h, w) -> (b, dim, gt, gh, gw) -> (b, gt·gh·gw, dim)
        let x = self.x_embedder.forward(&inp.hidden_states.to_dtype(dt)?)?;
        let x = x.flatten_from(2)?.transpose(1, 2)?;
        Ok(Embedded { x, temb, rope })
    }

    /// RoPE tables for a token grid (with RIFLEx index `riflex`, 0: off), cached for the last
    /// grid seen.
    fn rope(&self, grid: (usize, usize, usize), riflex: usize) -> Result<(Tensor, Tensor)> {
        let mut cache = self.rope_cache.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(t) = cache
            .as_ref()
            .filter(|t| t.grid == grid && t.riflex == riflex)
        {
            return Ok((t.cos.clone(), t.sin.clone()));
        }
        let cfg = &self.cfg;
        let (cos, sin) = rope_tables(
            grid,
            &cfg.rope_axes_dim,
            cfg.rope_theta,
            riflex,
            self.device(),
        )?;
        *cache = Some(RopeTables {
            grid,
            riflex,
            cos: cos.clone(),
            sin: sin.clone(),
        });
        Ok((cos, sin))
    }
}
