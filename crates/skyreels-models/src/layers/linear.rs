//! `nn.Linear` over the last dimension of any-rank input.

use super::cpu_kernels::{linear_f32, linear_parts_f32};
use candle_core::{DType, Module, Result, Tensor};
use candle_nn::VarBuilder;

#[derive(Debug, Clone)]
pub struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
}

/// Loads `weight` [out, in] and `bias` [out].
pub fn linear(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Linear> {
    linear_b(in_dim, out_dim, true, vb)
}

/// Loads `weight` [out, in] and, when `bias`, `bias` [out].
pub fn linear_b(in_dim: usize, out_dim: usize, bias: bool, vb: VarBuilder) -> Result<Linear> {
    Ok(Linear {
        weight: vb.get((out_dim, in_dim), "weight")?,
        bias: if bias {
            Some(vb.get(out_dim, "bias")?)
        } else {
            None
        },
    })
}

impl Linear {
    /// The layer applied to the concatenation of `parts` along the last dim (each (rows, kᵢ)),
    /// without materializing it on the CPU in f32.
    pub fn forward_concat(&self, parts: &[&Tensor]) -> Result<Tensor> {
        let fused = parts
            .iter()
            .all(|p| p.device().is_cpu() && p.dtype() == DType::F32);
        if !fused || parts.iter().any(|p| p.rank() != 2) {
            return self.forward(&Tensor::cat(parts, parts[0].rank() - 1)?);
        }
        let mut off = 0;
        let with_offsets: Vec<(&Tensor, usize)> = parts
            .iter()
            .map(|p| {
                let o = off;
                off += p.dim(1).unwrap_or(0);
                (*p, o)
            })
            .collect();
        linear_parts_f32(&with_offsets, &self.weight, self.bias.as_ref())
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims();
        let Some(&in_dim) = dims.last() else {
            candle_core::bail!("linear: scalar input")
        };
        let rows = x.elem_count() / in_dim.max(1);
        // (..., in) -> (rows, in)
        let x2 = x.reshape((rows, in_dim))?;
        let y = if x.device().is_cpu() && x.dtype() == DType::F32 {
            linear_f32(&x2, &self.weight, self.bias.as_ref())?
        } else {
            let y = x2.matmul(&self.weight.t()?)?;
            match &self.bias {
                Some(b) => y.broadcast_add(b)?,
                None => y,
            }
        };
        let mut out_dims = dims.to_vec();
        *out_dims.last_mut().expect("rank >= 1") = self.weight.dim(0)?;
        y.reshape(out_dims)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn fused_bias_matches_matmul_plus_bias() {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1., (7, 5), &dev).unwrap();
        let b = Tensor::randn(0f32, 1., 7, &dev).unwrap();
        let x = Tensor::randn(0f32, 1., (2, 3, 5), &dev).unwrap();
        let l = Linear {
            weight: w.clone(),
            bias: Some(b.clone()),
        };
        let got = l.forward(&x).unwrap();
        assert_eq!(got.dims(), &[2, 3, 7]);
        let want = x
            .broadcast_matmul(&w.t().unwrap())
            .unwrap()
            .broadcast_add(&b)
            .unwrap();
        let diff = (&got - want).unwrap().abs().unwrap().max_all().unwrap();
        // 5-term sums: rounding only
        assert!(diff.to_scalar::<f32>().unwrap() < 1e-5);
        // a split input gives the same result as the concatenation
        let (x1, x2) = (x.narrow(2, 0, 2).unwrap(), x.narrow(2, 2, 3).unwrap());
        let parts = [x1.reshape((6, 2)).unwrap(), x2.reshape((6, 3)).unwrap()];
        let split = l
            .forward_concat(&[&parts[0], &parts[1]])
            .unwrap()
            .reshape((2, 3, 7))
            .unwrap();
        let diff = (split - &got).unwrap().abs().unwrap().max_all().unwrap();
        assert!(diff.to_scalar::<f32>().unwrap() < 1e-5);
        // other dtypes take candle's matmul path
        let l64 = Linear {
            weight: w.to_dtype(DType::F64).unwrap(),
            bias: Some(b.to_dtype(DType::F64).unwrap()),
        };
        let y64 = l64.forward(&x.to_dtype(DType::F64).unwrap()).unwrap();
        assert_eq!(y64.dims(), &[2, 3, 7]);
    }
}
