//! Where a model's weights come from.
//!
//! [`Weights`] is the builder model constructors walk down the state-dict tree (`vb.pp(..)`), as
//! candle's `VarBuilder` (which it wraps for dense tensors) and `quantized_var_builder` are. It
//! carries one more thing: an optional [`StoredWeights`] source that the linear layers ask first
//! for their matmul weight, so a weight a checkpoint keeps narrow (fp8, GGUF blocks) reaches its
//! [`super::Linear`] in that form ([`StoredWeight`]) and is turned into the input's dtype right
//! before each use (diffusers' layerwise casting and GGUF linear). The resident model stays small
//! while every product runs as an ordinary matmul on unquantized activations.
//! <https://github.com/huggingface/diffusers/blob/58eb52c0803ea9af3abec60841c2a093bdf1f951/src/diffusers/hooks/layerwise_casting.py#L40-L72>
//! <https://github.com/huggingface/diffusers/blob/58eb52c0803ea9af3abec60841c2a093bdf1f951/src/diffusers/quantizers/gguf/utils.py#L592-L623>
//!
//! The loader builds it (`Weights::new(vb, stored)` in `skyreels-pipeline`'s `loading.rs`); a
//! plain `VarBuilder` converts into a [`Weights`] without a stored source, whose matmul weights
//! all load densely.

use super::gguf;
use candle_core::quantized::{QStorage, QTensor};
use candle_core::{DType, Device, Result, Tensor};
use candle_nn::VarBuilder;
use float8::F8E4M3;
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
    pub fn dims(&self) -> Result<(usize, usize)> {
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

/// A checkpoint's matmul weights in the form it stores them, for the linear layers being built.
pub trait StoredWeights: Send + Sync {
    /// The stored form of the weight `name` (its full state-dict key) when the checkpoint keeps
    /// it in one and its shape is `(out, in)`; `None` loads it densely through the VarBuilder
    /// (which reports problems).
    fn stored_weight(&self, name: &str, shape: (usize, usize)) -> Result<Option<StoredWeight>>;
}

/// A linear layer's weight: dense in the compute dtype, or as the checkpoint stores it.
#[derive(Debug, Clone)]
pub enum MatmulWeight {
    Dense(Tensor),
    Stored(StoredWeight),
}

/// The weights under one prefix of a checkpoint: dense tensors through a candle `VarBuilder`,
/// matmul weights from a [`StoredWeights`] source first when there is one.
#[derive(Clone)]
pub struct Weights<'a> {
    dense: VarBuilder<'a>,
    stored: Option<Arc<dyn StoredWeights>>,
}

impl<'a> Weights<'a> {
    /// Matmul weights from `stored` when it keeps them, everything else (and the matmul weights
    /// it does not keep) from `dense`.
    pub fn new(dense: VarBuilder<'a>, stored: Arc<dyn StoredWeights>) -> Self {
        Self {
            dense,
            stored: Some(stored),
        }
    }

    /// Every weight from `dense`.
    pub fn dense_only(dense: VarBuilder<'a>) -> Self {
        Self {
            dense,
            stored: None,
        }
    }

    /// The weights under `self`'s prefix + `.` + `s` (`VarBuilder::pp`).
    pub fn pp<S: ToString>(&self, s: S) -> Self {
        Self {
            dense: self.dense.pp(s),
            stored: self.stored.clone(),
        }
    }

    /// The dense tensors under this prefix (norms, convolutions, biases), read in the run dtype.
    pub fn dense(&self) -> VarBuilder<'a> {
        self.dense.clone()
    }

    /// The run dtype.
    pub fn dtype(&self) -> DType {
        self.dense.dtype()
    }

    pub fn device(&self) -> &Device {
        self.dense.device()
    }

    /// The matmul weight `name` of shape `(out, in)` under this prefix: its stored form when the
    /// stored source keeps it in one, else dense in the run dtype.
    pub fn matmul(&self, shape: (usize, usize), name: &str) -> Result<MatmulWeight> {
        if let Some(stored) = &self.stored {
            let key = match self.dense.prefix() {
                p if p.is_empty() => name.to_string(),
                p => format!("{p}.{name}"),
            };
            if let Some(w) = stored.stored_weight(&key, shape)? {
                return Ok(MatmulWeight::Stored(w));
            }
        }
        Ok(MatmulWeight::Dense(self.dense.get(shape, name)?))
    }
}

/// No stored source: every matmul weight loads densely.
impl<'a> From<VarBuilder<'a>> for Weights<'a> {
    fn from(dense: VarBuilder<'a>) -> Self {
        Self::dense_only(dense)
    }
}
