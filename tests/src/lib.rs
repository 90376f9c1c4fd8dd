//! Helpers shared by the cross-crate tests.

use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::Path;

pub mod generation;

pub use skyreels_test_support::{copy_dir, copy_tree, fixture, repo_root, tiny_weights};

/// Every tensor of a safetensors file, on the CPU.
pub fn load_tensors(path: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The string metadata of a safetensors file (`__metadata__`).
pub fn load_metadata(path: &Path) -> HashMap<String, String> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    meta.metadata().clone().unwrap_or_default()
}

/// A JSON list of strings stored under `key` in a safetensors file's metadata.
pub fn metadata_strings(path: &Path, key: &str) -> Vec<String> {
    let meta = load_metadata(path);
    let text = meta
        .get(key)
        .unwrap_or_else(|| panic!("{}: no metadata {key}", path.display()));
    serde_json::from_str(text).unwrap()
}

/// ‖got − want‖₂ / ‖want‖₂, computed in f64.
/// The VAE tile settings a fixture stores as `<case>.tiling`: [min_h, min_w, min_frames,
/// stride_h, stride_w, stride_frames, spatial (0/1)] (scripts/fixtures/vae.py).
pub fn fixture_tiling(t: &Tensor) -> skyreels_models::Tiling {
    let t: Vec<usize> = t
        .to_vec1::<i64>()
        .unwrap()
        .iter()
        .map(|&v| v as usize)
        .collect();
    skyreels_models::Tiling {
        spatial: t[6] == 1,
        framewise: true,
        tile_sample_min_height: t[0],
        tile_sample_min_width: t[1],
        tile_sample_min_num_frames: t[2],
        tile_sample_stride_height: t[3],
        tile_sample_stride_width: t[4],
        tile_sample_stride_num_frames: t[5],
    }
}

/// The largest absolute difference of two tensors of the same shape.
pub fn max_abs(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shape mismatch");
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar()
        .unwrap()
}

pub fn rel_l2(got: &Tensor, want: &Tensor) -> f64 {
    assert_eq!(got.dims(), want.dims(), "shape mismatch");
    let g = got.to_dtype(DType::F64).unwrap().flatten_all().unwrap();
    let w = want.to_dtype(DType::F64).unwrap().flatten_all().unwrap();
    let num = (g - &w).unwrap().sqr().unwrap().sum_all().unwrap();
    let den = w.sqr().unwrap().sum_all().unwrap();
    (num.to_scalar::<f64>().unwrap() / den.to_scalar::<f64>().unwrap()).sqrt()
}

/// Copies the checkpoint in `src` (config.json and `<stem>` weights, single or sharded) into
/// `dst` as one `<stem>.safetensors`, after `edit` has changed its tensors.
pub fn rewrite_checkpoint(
    src: &Path,
    dst: &Path,
    stem: &str,
    edit: impl FnOnce(&mut HashMap<String, Tensor>),
) {
    let store = skyreels_pipeline::WeightStore::open(src, stem).unwrap();
    let mut tensors: HashMap<String, Tensor> = store
        .names()
        .into_iter()
        .map(|n| {
            let t = store.load(&n, &Device::Cpu).unwrap();
            (n, t)
        })
        .collect();
    edit(&mut tensors);
    std::fs::copy(src.join("config.json"), dst.join("config.json")).unwrap();
    candle_core::safetensors::save(&tensors, dst.join(format!("{stem}.safetensors"))).unwrap();
}
