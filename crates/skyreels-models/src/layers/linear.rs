//! `nn.Linear` over the last dimension of any-rank input.
//!
//! A layer's weight is either dense in the compute dtype or kept in the form a checkpoint stores
//! it ([`StoredWeight`]: fp8, GGUF blocks) and turned into the input's dtype right before each use
//! (diffusers' layerwise casting and GGUF linear), so the resident model stays small while every
//! product runs as an ordinary matmul on unquantized activations.

use super::cpu::{linear_f32, linear_parts_f32};
use super::gguf;
use candle_core::quantized::{QStorage, QTensor};
use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::VarBuilder;
use float8::F8E4M3;
use std::borrow::Cow;
use std::cell::RefCell;
use std::sync::{Arc, OnceLock};

/// A matmul weight as a checkpoint stores it.
#[derive(Debug, Clone)]
pub enum StoredWeight {
    /// A float tensor in a narrower dtype (fp8 e4m3fn), cast when used, then multiplied by the
    /// per-tensor `scale` when the checkpoint has one (ComfyUI's scaled fp8 `scale_weight`).
    Cast { weight: Tensor, scale: Option<f32> },
    /// GGUF blocks (any ggml type), dequantized when used: on the CPU in diffusers' f16
    /// arithmetic ([`gguf`]), on a GPU by candle's kernels (ggml's f32 arithmetic, as diffusers'
    /// CUDA path through the `kernels` package).
    Quantized(Arc<QTensor>),
}

impl StoredWeight {
    /// (out, in)
    fn dims(&self) -> Result<(usize, usize)> {
        match self {
            Self::Cast { weight, .. } => weight.dims2(),
            Self::Quantized(q) => q.shape().dims2(),
        }
    }

    /// Bytes it takes on its device.
    pub fn size_in_bytes(&self) -> usize {
        match self {
            Self::Cast { weight, .. } => weight.elem_count() * weight.dtype().size_in_bytes(),
            Self::Quantized(q) => q.storage_size_in_bytes(),
        }
    }

    /// The weight as a dense tensor in `dtype` on `device` (copied there first when it is kept
    /// elsewhere, e.g. in host memory with `--offload blocks`).
    pub fn materialize(&self, dtype: DType, device: &Device) -> Result<Tensor> {
        match self {
            Self::Cast { weight, scale } => {
                let w = weight.to_device(device)?;
                let w = if w.dtype() == DType::F8E4M3 && device.is_cpu() {
                    fp8_to_f32(&w)?
                } else {
                    w
                };
                match scale {
                    None => w.to_dtype(dtype),
                    Some(s) => (w.to_dtype(DType::F32)? * f64::from(*s))?.to_dtype(dtype),
                }
            }
            Self::Quantized(q) if device.is_cpu() => {
                if q.device().is_cpu() && gguf::is_block_type(q.dtype()) {
                    let values = gguf::dequantize(q.dtype(), &q.data()?)?;
                    Tensor::from_vec(values, q.shape(), device)?.to_dtype(dtype)
                } else {
                    q.dequantize(device)?.to_dtype(dtype)
                }
            }
            Self::Quantized(q) => {
                // blocks are copied, not their expansion: dequantized on the GPU
                let on_device;
                let q = if q.device().same_device(device) {
                    q.as_ref()
                } else {
                    let storage = QStorage::from_data(q.data()?, device, q.dtype())?;
                    on_device = QTensor::new(storage, q.shape())?;
                    &on_device
                };
                q.dequantize(device)?.to_dtype(dtype)
            }
        }
    }
}

/// fp8 e4m3fn to f32 on the CPU through a 256-entry table, in parallel (exact, as any cast).
fn fp8_to_f32(w: &Tensor) -> Result<Tensor> {
    use rayon::prelude::*;
    static TABLE: OnceLock<[f32; 256]> = OnceLock::new();
    let table = TABLE.get_or_init(|| std::array::from_fn(|i| F8E4M3::from_bits(i as u8).to_f32()));
    let bytes: Vec<F8E4M3> = w.flatten_all()?.to_vec1()?;
    let values: Vec<f32> = bytes
        .par_iter()
        .with_min_len(1 << 16)
        .map(|b| table[b.to_bits() as usize])
        .collect();
    Tensor::from_vec(values, w.shape(), w.device())
}

/// Where the layers being built find weights kept in their stored form.
pub trait StoredWeights {
    /// The stored form of the weight `name` when the checkpoint keeps it in one and its shape is
    /// `(out, in)`; `None` loads it densely through the VarBuilder (which reports problems).
    fn stored_weight(&self, name: &str, shape: (usize, usize)) -> Result<Option<StoredWeight>>;
}

thread_local! {
    static STORED: RefCell<Option<Arc<dyn StoredWeights>>> = const { RefCell::new(None) };
}

/// Runs `build` (a model constructor) with `stored` asked first for every linear weight it
/// loads on this thread.
pub fn with_stored_weights<R>(stored: Arc<dyn StoredWeights>, build: impl FnOnce() -> R) -> R {
    struct Reset(Option<Arc<dyn StoredWeights>>);
    impl Drop for Reset {
        fn drop(&mut self) {
            STORED.with(|s| *s.borrow_mut() = self.0.take());
        }
    }
    let _reset = Reset(STORED.with(|s| s.borrow_mut().replace(stored)));
    build()
}

fn stored_weight(name: &str, shape: (usize, usize)) -> Result<Option<StoredWeight>> {
    let source = STORED.with(|s| s.borrow().clone());
    match source {
        Some(s) => s.stored_weight(name, shape),
        None => Ok(None),
    }
}

#[derive(Debug, Clone)]
enum Weight {
    Dense(Tensor),
    Stored(StoredWeight),
}

#[derive(Debug, Clone)]
pub struct Linear {
    weight: Weight,
    bias: Option<Tensor>,
}

/// Loads `weight` [out, in] and `bias` [out].
pub fn linear(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Linear> {
    linear_b(in_dim, out_dim, true, vb)
}

/// Loads `weight` [out, in] and, when `bias`, `bias` [out].
pub fn linear_b(in_dim: usize, out_dim: usize, bias: bool, vb: VarBuilder) -> Result<Linear> {
    let name = match vb.prefix() {
        p if p.is_empty() => "weight".to_string(),
        p => format!("{p}.weight"),
    };
    let weight = match stored_weight(&name, (out_dim, in_dim))? {
        Some(w) => Weight::Stored(w),
        None => Weight::Dense(vb.get((out_dim, in_dim), "weight")?),
    };
    Ok(Linear {
        weight,
        bias: if bias {
            Some(vb.get(out_dim, "bias")?)
        } else {
            None
        },
    })
}

impl Linear {
    /// The weight in `x`'s dtype on `x`'s device: borrowed when dense, materialized when stored.
    fn weight(&self, x: &Tensor) -> Result<Cow<'_, Tensor>> {
        match &self.weight {
            Weight::Dense(w) => Ok(Cow::Borrowed(w)),
            Weight::Stored(s) => Ok(Cow::Owned(s.materialize(x.dtype(), x.device())?)),
        }
    }

    fn out_dim(&self) -> Result<usize> {
        match &self.weight {
            Weight::Dense(w) => w.dim(0),
            Weight::Stored(s) => Ok(s.dims()?.0),
        }
    }

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
        let weight = self.weight(parts[0])?;
        linear_parts_f32(&with_offsets, &weight, self.bias.as_ref())
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
        let weight = self.weight(x)?;
        let y = if x.device().is_cpu() && x.dtype() == DType::F32 {
            linear_f32(&x2, &weight, self.bias.as_ref())?
        } else {
            let y = x2.matmul(&weight.t()?)?;
            match &self.bias {
                Some(b) => y.broadcast_add(b)?,
                None => y,
            }
        };
        let mut out_dims = dims.to_vec();
        *out_dims.last_mut().expect("rank >= 1") = self.out_dim()?;
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
            weight: Weight::Dense(w.clone()),
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
            weight: Weight::Dense(w.to_dtype(DType::F64).unwrap()),
            bias: Some(b.to_dtype(DType::F64).unwrap()),
        };
        let y64 = l64.forward(&x.to_dtype(DType::F64).unwrap()).unwrap();
        assert_eq!(y64.dims(), &[2, 3, 7]);
    }

    struct Fp8Source(Tensor);

    impl StoredWeights for Fp8Source {
        fn stored_weight(&self, name: &str, shape: (usize, usize)) -> Result<Option<StoredWeight>> {
            Ok(
                (name == "proj.weight" && self.0.dims2()? == shape).then(|| StoredWeight::Cast {
                    weight: self.0.clone(),
                    scale: Some(0.5),
                }),
            )
        }
    }

    #[test]
    fn stored_weights_are_used_in_their_stored_form() {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1., (4, 32), &dev).unwrap();
        let fp8 = w.to_dtype(DType::F8E4M3).unwrap();
        let b = Tensor::randn(0f32, 1., 4, &dev).unwrap();
        let vb = VarBuilder::from_tensors(
            [("proj.bias".to_string(), b.clone())].into(),
            DType::F32,
            &dev,
        );
        // the layer asks the scope first and keeps the fp8 tensor; only the bias is read densely
        let l = with_stored_weights(Arc::new(Fp8Source(fp8.clone())), || {
            linear(32, 4, vb.pp("proj"))
        })
        .unwrap();
        assert!(
            matches!(&l.weight, Weight::Stored(StoredWeight::Cast { weight, .. }) if weight.dtype() == DType::F8E4M3)
        );
        let x = Tensor::randn(0f32, 1., (3, 32), &dev).unwrap();
        let dense = ((fp8.to_dtype(DType::F32).unwrap() * 0.5).unwrap())
            .t()
            .unwrap();
        let want = x.matmul(&dense).unwrap().broadcast_add(&b).unwrap();
        let diff = (l.forward(&x).unwrap() - want)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap();
        // the same products in another order: rounding only
        assert!(diff.to_scalar::<f32>().unwrap() < 1e-5);
        // outside the scope the same builder reads densely (and finds no weight here)
        assert!(linear(32, 4, vb.pp("proj")).is_err());
        // GGUF blocks dequantize in diffusers' order on the CPU
        let q = QTensor::quantize(&w, candle_core::quantized::GgmlDType::Q8_0).unwrap();
        let values = gguf::dequantize(q.dtype(), &q.data().unwrap()).unwrap();
        let want = Tensor::from_vec(values, (4, 32), &dev)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap();
        let got = StoredWeight::Quantized(Arc::new(q))
            .materialize(DType::F32, &dev)
            .unwrap();
        let diff = (got - want).unwrap().abs().unwrap().max_all().unwrap();
        assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0);
    }
}
