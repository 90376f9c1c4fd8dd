//! The tracking VarBuilder backend every component is built through, and the checks it makes
//! possible: after the model is built, every missing tensor, wrong shape or dtype and every unused
//! tensor is reported by name, all at once. It is also the stored-weight source of the model's
//! [`Weights`] (fp8, GGUF, `--offload blocks` host copies).

use super::MAX_REPORTED;
use super::{describe_problems, Found, LoadError, TensorProblem, TensorSource, WeightStore};
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;
use skyreels_models::layers::weights::{StoredWeight, StoredWeights, Weights};
use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

#[derive(Default)]
struct Tracker {
    used: BTreeSet<String>,
    problems: Vec<TensorProblem>,
    resident: ResidentWeights,
}

/// What a loaded model holds: tensors read, how many of them are matmul weights kept in their
/// stored form (fp8, GGUF blocks, or host copies with `--offload blocks`), their bytes on the
/// device and in host memory.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ResidentWeights {
    pub tensors: usize,
    pub stored: usize,
    pub bytes: u64,
    pub host_bytes: u64,
}

impl ResidentWeights {
    fn add(&mut self, bytes: usize, stored: bool, on_host: bool) {
        self.tensors += 1;
        self.stored += usize::from(stored);
        if on_host {
            self.host_bytes += bytes as u64;
        } else {
            self.bytes += bytes as u64;
        }
    }
}

/// The transformer's blocks: what `--offload blocks` keeps in host memory.
fn is_block_weight(name: &str) -> bool {
    name.starts_with("transformer_blocks.") || name.starts_with("single_transformer_blocks.")
}

/// VarBuilder backend that records every tensor asked for and every problem, and hands out a
/// zero-size placeholder (a broadcast scalar, no allocation) for a tensor it cannot provide, so
/// that one load reports all problems at once. It is also the [`StoredWeights`] source of the
/// [`Weights`] a model is built from: the linear layers get the weights the checkpoint keeps in a
/// stored form (fp8, GGUF, host copies) from it.
#[derive(Clone)]
struct TrackingBackend {
    store: Arc<dyn TensorSource>,
    tracker: Arc<Mutex<Tracker>>,
    /// Check names, shapes and dtypes only: every tensor is a placeholder, nothing is read.
    dry: bool,
    device: Device,
    /// The run dtype (of host copies).
    dtype: DType,
    /// Keep the blocks' linear weights in host memory (`--offload blocks`).
    host_blocks: bool,
}

impl StoredWeights for TrackingBackend {
    fn stored_weight(
        &self,
        name: &str,
        shape: (usize, usize),
    ) -> candle_core::Result<Option<StoredWeight>> {
        let fits = self
            .store
            .lookup(name)
            .is_some_and(|f| f.dtype.is_ok() && f.shape == [shape.0, shape.1]);
        if self.dry || !fits {
            return Ok(None);
        }
        let on_host = self.host_blocks && is_block_weight(name);
        let device = if on_host { &Device::Cpu } else { &self.device };
        let stored = match self.store.stored(name, device)? {
            None if on_host => Some(StoredWeight::Cast {
                weight: self.store.load(name, device)?.to_dtype(self.dtype)?,
                scale: None,
            }),
            stored => stored,
        };
        if let Some(w) = &stored {
            let mut t = self.tracker.lock().expect("tracker lock poisoned");
            t.used.insert(name.to_string());
            t.resident.add(w.size_in_bytes(), true, on_host);
        }
        Ok(stored)
    }
}

impl TrackingBackend {
    fn placeholder(&self, s: Shape, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let t = self.tracker.lock().expect("tracker lock poisoned");
        if t.problems.len() >= MAX_REPORTED {
            candle_core::bail!("{}", describe_problems(&t.problems))
        }
        Tensor::zeros((), dtype, dev)?.broadcast_as(s)
    }
}

impl SimpleBackend for TrackingBackend {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let found = self.store.lookup(name);
        {
            let mut t = self.tracker.lock().expect("tracker lock poisoned");
            t.used.insert(name.to_string());
            match &found {
                None => t
                    .problems
                    .push(TensorProblem::Missing { name: name.into() }),
                Some(Found {
                    file,
                    dtype: Err(dtype),
                    ..
                }) => t.problems.push(TensorProblem::Dtype {
                    name: name.into(),
                    file: file.to_path_buf(),
                    dtype: dtype.clone(),
                }),
                Some(Found { shape, file, .. }) if shape.as_slice() != s.dims() => {
                    t.problems.push(TensorProblem::Shape {
                        name: name.into(),
                        file: file.to_path_buf(),
                        stored: shape.clone(),
                        expected: s.dims().to_vec(),
                    })
                }
                Some(_) => {}
            }
        }
        match found {
            Some(Found {
                shape,
                dtype: Ok(()),
                ..
            }) if shape.as_slice() == s.dims() && !self.dry => {
                let t = self.store.load(name, dev)?.to_dtype(dtype)?;
                let bytes = t.elem_count() * dtype.size_in_bytes();
                let mut tracker = self.tracker.lock().expect("tracker lock poisoned");
                tracker.resident.add(bytes, false, false);
                Ok(t)
            }
            _ => self.placeholder(s, dtype, dev),
        }
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.tracker
            .lock()
            .expect("tracker lock poisoned")
            .used
            .insert(name.to_string());
        match self.store.lookup(name) {
            Some(Found { dtype: Ok(()), .. }) => self.store.load(name, dev)?.to_dtype(dtype),
            Some(Found { dtype: Err(d), .. }) => candle_core::bail!("tensor {name} has dtype {d}"),
            None => candle_core::bail!("missing tensor {name}"),
        }
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.store.lookup(name).is_some()
    }
}

/// Builds a model from a weight store, then checks that every tensor was found with the right
/// shape and that the checkpoint holds nothing the model did not use.
/// `unused_ok` names the stored tensors the model deliberately does not load.
pub fn build_checked<M>(
    store: WeightStore,
    dtype: DType,
    device: &Device,
    unused_ok: impl Fn(&str) -> bool,
    build: impl FnOnce(VarBuilder) -> candle_core::Result<M>,
) -> Result<M, LoadError> {
    build_tracked(
        Arc::new(store),
        dtype,
        device,
        false,
        false,
        unused_ok,
        |w| build(w.dense()),
    )
    .map(|(m, _)| m)
}

/// [`build_checked`]'s checks without reading a weight (`build` gets placeholders), for models
/// that read their weights later ([`LlamaEncoder::streamed`]).
pub(super) fn check_tensors<M>(
    store: Arc<dyn TensorSource>,
    unused_ok: impl Fn(&str) -> bool,
    build: impl FnOnce(VarBuilder) -> candle_core::Result<M>,
) -> Result<(), LoadError> {
    build_tracked(
        store,
        DType::F32,
        &Device::Cpu,
        true,
        false,
        unused_ok,
        |w| build(w.dense()),
    )
    .map(drop)
}

/// Builds a model from `store` through a [`Weights`] whose stored source is the tracking backend
/// (matmul weights in their stored form where the checkpoint keeps one), then checks every
/// tensor as [`build_checked`] does.
#[allow(clippy::too_many_arguments)]
pub(crate) fn build_tracked<M>(
    store: Arc<dyn TensorSource>,
    dtype: DType,
    device: &Device,
    dry: bool,
    host_blocks: bool,
    unused_ok: impl Fn(&str) -> bool,
    build: impl FnOnce(Weights<'static>) -> candle_core::Result<M>,
) -> Result<(M, ResidentWeights), LoadError> {
    let tracker = Arc::new(Mutex::new(Tracker::default()));
    let backend = TrackingBackend {
        store: store.clone(),
        tracker: tracker.clone(),
        dry,
        device: device.clone(),
        dtype,
        host_blocks,
    };
    let built = build(Weights::new(backend.vb(), Arc::new(backend)));
    let t = tracker.lock().expect("tracker lock poisoned");
    if !t.problems.is_empty() {
        return Err(LoadError::Tensors(t.problems.clone()));
    }
    let model = built?;
    let unused: Vec<String> = store
        .names()
        .into_iter()
        .filter(|n| !t.used.contains(n) && !unused_ok(n))
        .collect();
    if !unused.is_empty() {
        return Err(LoadError::UnusedTensors(unused));
    }
    Ok((model, t.resident))
}

/// A VarBuilder reading `store` on `device` in `dtype` through the tracking backend, for a model
/// whose tensors were checked already ([`check_tensors`]) and that reads them as it goes.
pub(super) fn reading_vb(
    store: Arc<dyn TensorSource>,
    device: &Device,
    dtype: DType,
) -> VarBuilder<'static> {
    TrackingBackend {
        store,
        tracker: Arc::new(Mutex::new(Tracker::default())),
        dry: false,
        device: device.clone(),
        dtype,
        host_blocks: false,
    }
    .vb()
}

impl TrackingBackend {
    fn vb(&self) -> VarBuilder<'static> {
        VarBuilder::from_backend(Box::new(self.clone()), self.dtype, self.device.clone())
    }
}
