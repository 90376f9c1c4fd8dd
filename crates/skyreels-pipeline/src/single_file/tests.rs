//! The key conversion and the single-file loader against hand-made files.

use super::*;
use crate::gguf::tests::gguf_bytes;
use crate::loading::WeightStore;

/// A safetensors file of f32 zeros of these shapes.
fn zeros_file(path: &Path, shapes: &[(&str, &[usize])]) {
    let tensors: HashMap<String, Tensor> = shapes
        .iter()
        .map(|(name, shape)| {
            let t = Tensor::zeros(shape.to_vec(), DType::F32, &Device::Cpu).unwrap();
            (name.to_string(), t)
        })
        .collect();
    candle_core::safetensors::save(&tensors, path).unwrap();
}

#[test]
fn a_zero_patch_dimension_is_an_error_not_a_division_by_zero() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.safetensors");
    zeros_file(
        &path,
        &[
            ("x_embedder.proj.weight", &[128, 4, 0, 2, 2]),
            ("transformer_blocks.0.attn.norm_q.weight", &[128]),
            ("transformer_blocks.0.ff.net.0.proj.weight", &[512, 128]),
            ("proj_out.weight", &[0, 128]),
        ],
    );
    let e = SingleFile::open(&path)
        .and_then(|f| f.infer_config())
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(e.contains("has no elements"), "{e}");
}

#[test]
fn gguf_errors_name_the_gguf_format() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.gguf");
    let mut bytes = gguf_bytes(&[("x_embedder.proj.weight", &[4], 16)]);
    bytes.truncate(20);
    std::fs::write(&path, bytes).unwrap();
    let e = SingleFile::open(&path).err().unwrap().to_string();
    assert!(e.contains("not a readable GGUF file"), "{e}");
    let path = dir.path().join("t.safetensors");
    std::fs::write(&path, b"not safetensors").unwrap();
    let e = SingleFile::open(&path).err().unwrap().to_string();
    assert!(e.contains("not a readable safetensors file"), "{e}");
}

#[test]
fn quantize_refuses_zero_size_tensors() {
    let dir = tempfile::tempdir().unwrap();
    let gguf = dir.path().join("t.gguf");
    let embed: &[u64] = &[128, 4, 1, 2, 2];
    std::fs::write(
        &gguf,
        gguf_bytes(&[
            ("x_embedder.proj.weight", embed, 8192),
            ("proj_out.weight", &[0, 8], 0),
        ]),
    )
    .unwrap();
    let st = dir.path().join("t.safetensors");
    zeros_file(
        &st,
        &[
            ("x_embedder.proj.weight", &[128, 4, 1, 2, 2]),
            ("proj_out.weight", &[0, 8]),
        ],
    );
    for input in [gguf, st] {
        let out = dir.path().join("out.gguf");
        let e = quantize_to_gguf(&input, &out, GgmlDType::Q8_0)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            e.contains("proj_out.weight has no elements"),
            "{input:?}: {e}"
        );
    }
}

/// A file truncated while it is open is an error when a tensor is read (a memory map would
/// end the process with SIGBUS).
#[test]
fn a_file_truncated_after_opening_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.safetensors");
    zeros_file(
        &path,
        &[
            ("x_embedder.proj.weight", &[128, 4, 1, 2, 2]),
            ("big", &[1024, 1024]),
        ],
    );
    let single = SingleFile::open(&path).unwrap();
    let store = WeightStore::from_files(vec![path.clone()]).unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(64)
        .unwrap();
    for name in ["x_embedder.proj.weight", "big"] {
        assert!(
            TensorSource::load(&single, name, &Device::Cpu).is_err(),
            "{name}"
        );
        assert!(store.load(name, &Device::Cpu).is_err(), "{name}");
    }
}
