//! HunyuanVideo transformer: parity with diffusers 0.42.1 and checkpoint loading.
//!
//! Fixtures come from `scripts/fixtures/transformer.py` (tiny random weights, f32 CPU
//! reference forward passes).

use candle_core::{DType, Device, Tensor};
use skyreels_models::{HunyuanVideoTransformer3DModel, TransformerInputs};
use skyreels_pipeline::load_transformer;
use skyreels_pipeline::loading::{LoadError, TensorProblem, DIFFUSERS_WEIGHTS};
use skyreels_tests::{copy_dir, fixture, load_tensors, rel_l2, rewrite_checkpoint};
use std::collections::HashMap;
use std::path::Path;

/// Relative L2 bound for f32 parity. Both sides run the same f32 math; they differ only in
/// summation order (GEMM blocking, chunked softmax, fused norms), which costs a few f32 ulps
/// (~1e-7 relative) per op and stays below ~1e-6 through these shallow stacks. Any real
/// deviation (a swapped modulation chunk, a mask rule, a RoPE convention) is >= 1e-2.
const F32_TOL: f64 = 1e-5;

fn forward(model: &HunyuanVideoTransformer3DModel, io: &HashMap<String, Tensor>) -> Tensor {
    model
        .forward(&TransformerInputs::from_named(io).unwrap())
        .unwrap()
}

fn check_parity(case: &str, weights: &Path) {
    let io = load_tensors(&fixture(&format!("transformer/{case}/io.safetensors")));
    let mut model = load_transformer(weights, None, DType::F32, &Device::Cpu).unwrap();
    let want = &io["output"];
    let got = forward(&model, &io);
    let err = rel_l2(&got, want);
    assert!(err <= F32_TOL, "{case}: relative L2 error {err:e}");
    // Tiny attention budgets force many query chunks per call: still the same result.
    for budget in [64, 1000] {
        model.set_attention_budget(budget);
        let err = rel_l2(&forward(&model, &io), want);
        assert!(
            err <= F32_TOL,
            "{case} (budget {budget}): relative L2 error {err:e}"
        );
    }
}

#[test]
fn tiny_a_matches_diffusers() {
    // pipeline layout (transformer/ subfolder), single f32 file, 32 input channels, patch 2,
    // guidance embedder, batch of 2 with one padded prompt
    check_parity("tiny_a", &fixture("transformer/tiny_a"));
}

#[test]
fn tiny_c_matches_diffusers() {
    // SkyReels' head dim (one head of 128, RoPE axes 16/56/56), bf16 storage, batch 2 with text
    // padding: on the CPU in f32, and the fixture the GPU test runs FlashAttention on
    check_parity("tiny_c", &fixture("transformer/tiny_c"));
}

#[test]
fn tiny_b_matches_diffusers() {
    // bare-repo layout, bf16 shards + index, patch 1 x temporal patch 2, no guidance embedder
    check_parity("tiny_b", &fixture("transformer/tiny_b/model"));
}

/// The tiny fixtures on the GPU: f32 as on the CPU (cuBLAS and candle's kernels differ from the
/// CPU only in summation order), and bf16 within bf16's precision: 8 mantissa bits (relative
/// rounding 2^-9 = 2e-3 per op) accumulated over two blocks' matmuls and norms gives ~1e-2.
/// tiny_c has head dim 128, so its bf16 run goes through FlashAttention-2 inside the model (with
/// per-sample key counts from the padded text), which adds two bf16 roundings per attention
/// (probabilities and output): the same 3e-2 bound holds, while a wrong key count, stride or
/// layout inside the model gives errors of order 0.1-1.
#[cfg(feature = "cuda")]
#[test]
fn cuda_matches_the_reference_in_f32_and_bf16() {
    let dev = Device::new_cuda(0).expect("a CUDA GPU for the cuda feature's tests");
    for case in ["tiny_a", "tiny_c"] {
        let io = load_tensors(&fixture(&format!("transformer/{case}/io.safetensors")));
        let want = &io["output"];
        for (dtype, tol) in [(DType::F32, F32_TOL), (DType::BF16, 3e-2)] {
            let model =
                load_transformer(&fixture(&format!("transformer/{case}")), None, dtype, &dev)
                    .unwrap();
            let on_dev: HashMap<String, Tensor> = io
                .iter()
                .map(|(k, v)| {
                    let v = if v.dtype().is_float() {
                        v.to_dtype(dtype).unwrap()
                    } else {
                        v.clone()
                    };
                    (k.clone(), v.to_device(&dev).unwrap())
                })
                .collect();
            let got = forward(&model, &on_dev)
                .to_dtype(DType::F32)
                .unwrap()
                .to_device(&Device::Cpu)
                .unwrap();
            let err = rel_l2(&got, want);
            assert!(
                err <= tol,
                "{case}, {dtype:?} on CUDA: relative L2 error {err:e}"
            );
        }
    }
}

/// FlashAttention-2 (bf16, head dim 128: SkyReels' transformer attention on GPUs) against exact
/// f32 attention on the CPU from the same bf16-rounded inputs, with text-padding key counts that
/// end inside the kernel's 64-key blocks and token counts off its 128-row blocks. The kernel
/// rounds the probabilities to bf16 before P·V and the output to bf16: two roundings of 2^-9
/// relative each on outputs of magnitude <= ~1 (weighted means of N(0,1) values), so the max
/// absolute error stays below 1e-2; a wrong key count or stride gives errors of order 0.1-1.
#[cfg(feature = "cuda")]
#[test]
fn cuda_flash_attention_matches_exact_attention() {
    use skyreels_models::layers::attention;
    let dev = Device::new_cuda(0).expect("a CUDA GPU for the cuda feature's tests");
    let cpu = Device::Cpu;
    let (nq, nk, heads) = (333, 301, 3);
    let round = |t: Tensor| {
        t.to_dtype(DType::BF16)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
    };
    let q = round(Tensor::randn(0f32, 1., (2, nq, heads, 128), &cpu).unwrap());
    let k = round(Tensor::randn(0f32, 1., (2, nk, heads, 128), &cpu).unwrap());
    let v = round(Tensor::randn(0f32, 1., (2, nk, heads, 128), &cpu).unwrap());
    let on_gpu = |t: &Tensor| t.to_dtype(DType::BF16).unwrap().to_device(&dev).unwrap();
    let (qg, kg, vg) = (on_gpu(&q), on_gpu(&k), on_gpu(&v));
    // the transformer's attention() takes the kernel for exactly these inputs
    assert!(skyreels_flash_attn::supports(&qg, &kg, &vg));
    let scale = 1.0 / (128f32).sqrt();
    for counts in [[nk, nk], [nk, 200], [1, 129]] {
        let want = attention(&q, &k, &v, Some(&counts), usize::MAX).unwrap();
        let got = skyreels_flash_attn::flash_attn(&qg, &kg, &vg, &counts, scale)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            .to_device(&cpu)
            .unwrap();
        let err = (got - &want).unwrap().abs().unwrap().max_all().unwrap();
        let err = err.to_scalar::<f32>().unwrap();
        assert!(err < 1e-2, "key counts {counts:?}: max abs error {err:e}");
    }
}

/// Layouts the kernel cannot read in place are copied first: q, k and v as views 4 elements (8
/// bytes) into rows of 136 (so the base is misaligned by 8 bytes) give the same bits as the same
/// values stored contiguously.
#[cfg(feature = "cuda")]
#[test]
fn cuda_flash_attention_copies_misaligned_views() {
    let dev = Device::new_cuda(0).expect("a CUDA GPU for the cuda feature's tests");
    let wide = |n: usize| {
        Tensor::randn(0f32, 1., (2, n, 3, 136), &dev)
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap()
    };
    let (q, k, v) = (wide(130), wide(70), wide(70));
    let view = |t: &Tensor| t.narrow(3, 4, 128).unwrap();
    let (qv, kv, vv) = (view(&q), view(&k), view(&v));
    assert!(!skyreels_flash_attn::reads_in_place(
        qv.layout().start_offset(),
        qv.stride()
    ));
    let dense = |t: &Tensor| t.force_contiguous().unwrap();
    let counts = [70, 33];
    let got = skyreels_flash_attn::flash_attn(&qv, &kv, &vv, &counts, 0.1).unwrap();
    let want = skyreels_flash_attn::flash_attn(&dense(&qv), &dense(&kv), &dense(&vv), &counts, 0.1)
        .unwrap();
    let diff = (got.to_dtype(DType::F32).unwrap() - want.to_dtype(DType::F32).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert_eq!(
        diff, 0.0,
        "a misaligned view must be copied, not read as is"
    );
}

/// A launch the GPU refuses is an error with CUDA's reason, never an uninitialised output: 65536
/// heads exceed the launch grid's z limit of 65535 (`supports` is false there, so the model falls
/// back to the exact path and never asks for it). The error is not sticky: the next call works.
#[cfg(feature = "cuda")]
#[test]
fn cuda_flash_attention_reports_a_failed_launch() {
    let dev = Device::new_cuda(0).expect("a CUDA GPU for the cuda feature's tests");
    let q = Tensor::zeros((1, 1, 65536, 128), DType::BF16, &dev).unwrap();
    assert!(!skyreels_flash_attn::supports(&q, &q, &q));
    let err = skyreels_flash_attn::flash_attn(&q, &q, &q, &[1], 1.0)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("launch failed") && err.contains("cudaErrorInvalidConfiguration"),
        "{err}"
    );
    let small = Tensor::ones((1, 5, 2, 128), DType::BF16, &dev).unwrap();
    let out = skyreels_flash_attn::flash_attn(&small, &small, &small, &[5], 1.0)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .to_device(&Device::Cpu)
        .unwrap();
    // all values 1: every output is exactly 1
    let (lo, hi) = (
        out.min_all().unwrap().to_scalar::<f32>().unwrap(),
        out.max_all().unwrap().to_scalar::<f32>().unwrap(),
    );
    assert_eq!((lo, hi), (1.0, 1.0));
}

/// Writes every tensor of a checkpoint folder into one `diffusion_pytorch_model.safetensors`.
fn to_single_file(src: &Path, dst: &Path, edit: impl FnOnce(&mut HashMap<String, Tensor>)) {
    rewrite_checkpoint(src, dst, DIFFUSERS_WEIGHTS, edit)
}

#[test]
fn sharded_and_single_file_agree() {
    let sharded = fixture("transformer/tiny_b/model");
    let single = tempfile::tempdir().unwrap();
    to_single_file(&sharded, single.path(), |_| {});
    let io = load_tensors(&fixture("transformer/tiny_b/io.safetensors"));
    let a = forward(
        &load_transformer(&sharded, None, DType::F32, &Device::Cpu).unwrap(),
        &io,
    );
    let b = forward(
        &load_transformer(single.path(), None, DType::F32, &Device::Cpu).unwrap(),
        &io,
    );
    let diff = (a - b).unwrap().abs().unwrap().max_all().unwrap();
    assert_eq!(
        diff.to_scalar::<f32>().unwrap(),
        0.0,
        "same weights must give identical outputs"
    );
}

#[test]
fn f16_storage_converts_to_the_run_dtype() {
    let src = fixture("transformer/tiny_a/transformer");
    let dir = tempfile::tempdir().unwrap();
    to_single_file(&src, dir.path(), |t| {
        for v in t.values_mut() {
            *v = v.to_dtype(DType::F16).unwrap();
        }
    });
    let io = load_tensors(&fixture("transformer/tiny_a/io.safetensors"));
    let model = load_transformer(dir.path(), None, DType::F32, &Device::Cpu).unwrap();
    let err = rel_l2(&forward(&model, &io), &io["output"]);
    // f16 weights carry ~5e-4 relative rounding each; the output moves by about that much.
    assert!(
        err > 0.0 && err < 1e-2,
        "f16-stored weights: relative L2 error {err:e}"
    );
}

fn load_err(dir: &Path) -> LoadError {
    match load_transformer(dir, None, DType::F32, &Device::Cpu) {
        Ok(_) => panic!("loading {} should fail", dir.display()),
        Err(e) => e,
    }
}

#[test]
fn missing_shard_is_named() {
    let dir = copy_dir(&fixture("transformer/tiny_b/model"));
    let shard = dir
        .path()
        .join("diffusion_pytorch_model-00002-of-00004.safetensors");
    std::fs::remove_file(&shard).unwrap();
    match load_err(dir.path()) {
        LoadError::MissingShard { shard: s, .. } => assert_eq!(s, shard),
        e => panic!("unexpected error: {e}"),
    }
}

#[test]
fn corrupted_shard_is_named() {
    let dir = copy_dir(&fixture("transformer/tiny_b/model"));
    let shard = dir
        .path()
        .join("diffusion_pytorch_model-00003-of-00004.safetensors");
    let bytes = std::fs::read(&shard).unwrap();
    std::fs::write(&shard, &bytes[..bytes.len() / 2]).unwrap();
    let e = load_err(dir.path());
    assert!(
        matches!(&e, LoadError::CorruptFile { path, .. } if path == &shard),
        "{e}"
    );
    assert!(e.to_string().contains("00003-of-00004"), "{e}");
}

#[test]
fn wrong_shape_names_tensor_and_both_shapes() {
    let dir = tempfile::tempdir().unwrap();
    to_single_file(
        &fixture("transformer/tiny_a/transformer"),
        dir.path(),
        |t| {
            let name = "transformer_blocks.1.attn.to_k.weight";
            t.insert(
                name.into(),
                Tensor::zeros((32, 31), DType::F32, &Device::Cpu).unwrap(),
            );
        },
    );
    let e = load_err(dir.path());
    let msg = e.to_string();
    match e {
        LoadError::Tensors(p) => assert_eq!(
            p,
            vec![TensorProblem::Shape {
                name: "transformer_blocks.1.attn.to_k.weight".into(),
                file: dir.path().join("diffusion_pytorch_model.safetensors"),
                stored: vec![32, 31],
                expected: vec![32, 32],
            }]
        ),
        e => panic!("unexpected error: {e}"),
    }
    assert!(
        msg.contains("[32, 31]") && msg.contains("[32, 32]"),
        "{msg}"
    );
}

#[test]
fn missing_and_extra_tensors_are_named() {
    let dir = tempfile::tempdir().unwrap();
    to_single_file(
        &fixture("transformer/tiny_a/transformer"),
        dir.path(),
        |t| {
            t.remove("single_transformer_blocks.0.proj_mlp.bias");
            t.remove("norm_out.linear.weight");
        },
    );
    match load_err(dir.path()) {
        LoadError::Tensors(p) => {
            let names: Vec<_> = p
                .iter()
                .map(|p| match p {
                    TensorProblem::Missing { name } => name.as_str(),
                    other => panic!("unexpected {other:?}"),
                })
                .collect();
            assert_eq!(
                names,
                [
                    "single_transformer_blocks.0.proj_mlp.bias",
                    "norm_out.linear.weight"
                ]
            );
        }
        e => panic!("unexpected error: {e}"),
    }

    let dir = tempfile::tempdir().unwrap();
    to_single_file(
        &fixture("transformer/tiny_a/transformer"),
        dir.path(),
        |t| {
            let extra = Tensor::zeros(4, DType::F32, &Device::Cpu).unwrap();
            t.insert(
                "transformer_blocks.7.attn.to_q.weight".into(),
                extra.clone(),
            );
            t.insert("pos_embed".into(), extra);
        },
    );
    match load_err(dir.path()) {
        LoadError::UnusedTensors(names) => {
            assert_eq!(
                names,
                ["pos_embed", "transformer_blocks.7.attn.to_q.weight"]
            )
        }
        e => panic!("unexpected error: {e}"),
    }
}

#[test]
fn folder_errors_are_clear() {
    let e = load_err(Path::new("/nonexistent/skyreels-model"));
    assert!(matches!(e, LoadError::FolderNotFound(_)), "{e}");
    let empty = tempfile::tempdir().unwrap();
    let e = load_err(empty.path());
    assert!(e.to_string().contains("no config.json"), "{e}");
    std::fs::write(
        empty.path().join("config.json"),
        "{\"num_layers\": \"two\"}",
    )
    .unwrap();
    let e = load_err(empty.path());
    assert!(
        matches!(e, LoadError::Config { .. }) && e.to_string().contains("num_layers"),
        "{e}"
    );
    std::fs::write(empty.path().join("config.json"), "{}").unwrap();
    let e = load_err(empty.path());
    assert!(matches!(e, LoadError::NoWeights(..)), "{e}");
    // an index naming a tensor its shard does not hold
    let dir = copy_dir(&fixture("transformer/tiny_b/model"));
    let index = dir
        .path()
        .join("diffusion_pytorch_model.safetensors.index.json");
    let text = std::fs::read_to_string(&index).unwrap();
    let text = text.replacen("\"proj_out.bias\"", "\"proj_out.bias_renamed\"", 1);
    std::fs::write(&index, text).unwrap();
    let e = load_err(dir.path());
    assert!(
        matches!(e, LoadError::Index { .. }) && e.to_string().contains("proj_out.bias_renamed"),
        "{e}"
    );
}

#[test]
fn bad_inputs_are_errors_not_panics() {
    let model = load_transformer(
        &fixture("transformer/tiny_a"),
        None,
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    let io = load_tensors(&fixture("transformer/tiny_a/io.safetensors"));
    let wrong_channels = io["hidden_states"].narrow(1, 0, 16).unwrap();
    let odd_width = io["hidden_states"].narrow(4, 0, 9).unwrap();
    for (hs, needle) in [
        (&wrong_channels, "in_channels 32"),
        (&odd_width, "multiples of 2"),
    ] {
        let mut inputs = TransformerInputs::from_named(&io).unwrap();
        inputs.hidden_states = hs;
        let e = model.forward(&inputs).unwrap_err().to_string();
        assert!(e.contains(needle), "{e}");
    }
    let mut inputs = TransformerInputs::from_named(&io).unwrap();
    inputs.guidance = None;
    let e = model.forward(&inputs).unwrap_err().to_string();
    assert!(e.contains("guidance"), "{e}");
}

#[test]
fn non_float_weight_is_named() {
    let dir = tempfile::tempdir().unwrap();
    to_single_file(
        &fixture("transformer/tiny_a/transformer"),
        dir.path(),
        |t| {
            let ints = Tensor::zeros(32, DType::I64, &Device::Cpu).unwrap();
            t.insert("proj_out.bias".into(), ints.narrow(0, 0, 16).unwrap());
        },
    );
    let e = load_err(dir.path()).to_string();
    assert!(e.contains("proj_out.bias") && e.contains("I64"), "{e}");
}

// ---------------------------------------------------------------------------------------------
// Single-file checkpoints (scripts/fixtures/single_file.py): the original HunyuanVideo key
// layout in bf16, fp8 e4m3fn, ComfyUI's scaled fp8 and GGUF Q8_0 / Q4_0 / Q4_K (with Q5_0
// fallbacks), each against diffusers 0.42.1's `from_single_file` on the same file.

fn single_file(name: &str) -> std::path::PathBuf {
    fixture(&format!("single_file/{name}"))
}

/// Every single-file fixture, with the key of diffusers' output for it, and whether its matmul
/// weights stay in a stored form (fp8, GGUF) when loaded.
const SINGLE_FILES: [(&str, &str, bool); 6] = [
    ("orig_bf16.safetensors", "output_orig_bf16", false),
    ("orig_fp8.safetensors", "output_orig_fp8", true),
    (
        "orig_fp8_scaled.safetensors",
        "output_orig_fp8_scaled",
        true,
    ),
    ("orig_q8_0.gguf", "output_orig_q8_0", true),
    ("orig_q4_0.gguf", "output_orig_q4_0", true),
    ("orig_q4_k.gguf", "output_orig_q4_k", true),
];

#[test]
fn single_file_checkpoints_match_diffusers() {
    let io = load_tensors(&single_file("io.safetensors"));
    let mut bf16_bytes = 0;
    for (file, output, stored) in SINGLE_FILES {
        let (model, resident) = skyreels_pipeline::load_transformer_resident(
            &single_file(file),
            None,
            DType::F32,
            &Device::Cpu,
            false,
        )
        .unwrap_or_else(|e| panic!("{file}: {e}"));
        // Both sides turn the stored weights into the same f32 values (fp8 and GGUF
        // dequantization are exact element formulas) and then run the same f32 math: the f32
        // parity bound holds; a wrong split, swap or dequantization is >= 1e-2.
        let err = rel_l2(&forward(&model, &io), &io[output]);
        assert!(err <= F32_TOL, "{file}: relative L2 error {err:e}");
        // fp8 and GGUF weights stay narrow in memory: every linear weight is in its stored form
        // (14 per double block, 6 per single block, 7 per refiner block, 5 in the context
        // embedder, 6 in the time/text/guidance embedders, 2 at the output; the patch embedding
        // is a convolution and the norms and biases are 1-D)
        let linears = 14 + 6 + 7 + 5 + 6 + 2;
        assert_eq!(resident.stored, if stored { linears } else { 0 }, "{file}");
        if file == "orig_bf16.safetensors" {
            bf16_bytes = resident.bytes;
        } else {
            // below f32's 4 bytes per weight: at most 55% of it for fp8 and 8-bit, less for 4-bit
            assert!(
                (resident.bytes as f64) < 0.55 * bf16_bytes as f64,
                "{file}: {} bytes resident vs {bf16_bytes} dense f32",
                resident.bytes
            );
        }
    }
    // the bf16 file is the diffusers folder model renamed: identical numbers
    let diff = (&io["output_orig_bf16"] - &io["output_diffusers_folder"])
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap();
    assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0);
}

#[test]
fn gguf_blocks_dequantize_as_diffusers_does_bit_for_bit() {
    // random blocks of every quantized type (every quant bit pattern, scales of many magnitudes)
    // against diffusers' f16 dequantization of them: exact equality, the arithmetic is the same
    use candle_core::quantized::GgmlDType;
    let t = load_tensors(&single_file("dequant.safetensors"));
    let types = [
        ("Q8_0", GgmlDType::Q8_0),
        ("Q4_0", GgmlDType::Q4_0),
        ("Q4_1", GgmlDType::Q4_1),
        ("Q5_0", GgmlDType::Q5_0),
        ("Q5_1", GgmlDType::Q5_1),
        ("Q2_K", GgmlDType::Q2K),
        ("Q3_K", GgmlDType::Q3K),
        ("Q4_K", GgmlDType::Q4K),
        ("Q5_K", GgmlDType::Q5K),
        ("Q6_K", GgmlDType::Q6K),
    ];
    for (name, dtype) in types {
        let blocks: Vec<u8> = t[&format!("{name}.blocks")]
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let want: Vec<half::f16> = t[&format!("{name}.values")]
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        // f16 -> f32 is exact and one to one: equal f32 bits are equal f16 values
        let got = skyreels_models::layers::gguf::dequantize(dtype, &blocks).unwrap();
        let mismatch = got
            .iter()
            .zip(&want)
            .position(|(a, b)| a.to_bits() != b.to_f32().to_bits());
        assert_eq!(
            mismatch, None,
            "{name}: first mismatch at element {mismatch:?}"
        );
    }
}

#[test]
fn single_file_config_comes_from_the_shapes_or_from_config() {
    use skyreels_pipeline::single_file::{read_transformer_config, KeyLayout, SingleFile};
    let want = read_transformer_config(&single_file("config.json")).unwrap();
    for (file, _, _) in SINGLE_FILES {
        let f = SingleFile::open(&single_file(file)).unwrap();
        assert_eq!(f.layout, KeyLayout::Original, "{file}");
        assert_eq!(f.infer_config().unwrap(), want, "{file}");
    }
    // --config (a file or its folder) gives the same model
    let io = load_tensors(&single_file("io.safetensors"));
    for config in [single_file("config.json"), single_file("")] {
        let model = load_transformer(
            &single_file("orig_q8_0.gguf"),
            Some(&config),
            DType::F32,
            &Device::Cpu,
        )
        .unwrap();
        let err = rel_l2(&forward(&model, &io), &io["output_orig_q8_0"]);
        assert!(err <= F32_TOL, "--config {}: {err:e}", config.display());
    }
}

#[test]
fn quantize_reproduces_the_q4_k_fixture_byte_for_byte() {
    // the committed Q4_K file was written by `skyreels quantize` (the reference loaded that very
    // file): the writer is deterministic and keeps its type choices
    use candle_core::quantized::GgmlDType;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("q4_k.gguf");
    let report = skyreels_pipeline::single_file::quantize_to_gguf(
        &single_file("orig_bf16.safetensors"),
        &out,
        GgmlDType::Q4K,
    )
    .unwrap();
    // rows of 256 and 512 take Q4_K, rows of 128 and 384 fall back to Q5_0, the rest is F32
    assert_eq!(report.types, vec![("F32", 43), ("Q4_K", 9), ("Q5_0", 22)]);
    assert!(
        std::fs::read(&out).unwrap() == std::fs::read(single_file("orig_q4_k.gguf")).unwrap(),
        "quantize no longer writes the fixture's bytes"
    );
}

/// A GGUF v3 file by hand: `arch` metadata and one tensor of type id `ty` whose data may be cut.
fn hand_gguf(path: &Path, arch: &str, ty: u32, dims: &[u64], data_len: usize) {
    let mut b = Vec::new();
    let s = |b: &mut Vec<u8>, v: &str| {
        b.extend((v.len() as u64).to_le_bytes());
        b.extend(v.as_bytes());
    };
    b.extend(0x4655_4747u32.to_le_bytes());
    b.extend(3u32.to_le_bytes());
    b.extend(1u64.to_le_bytes()); // tensors
    b.extend(1u64.to_le_bytes()); // metadata
    s(&mut b, "general.architecture");
    b.extend(8u32.to_le_bytes());
    s(&mut b, arch);
    s(&mut b, "img_in.proj.weight");
    b.extend((dims.len() as u32).to_le_bytes());
    for d in dims.iter().rev() {
        b.extend(d.to_le_bytes());
    }
    b.extend(ty.to_le_bytes());
    b.extend(0u64.to_le_bytes());
    while b.len() % 32 != 0 {
        b.push(0);
    }
    b.extend(vec![0u8; data_len]);
    std::fs::write(path, b).unwrap();
}

#[test]
fn bad_single_files_are_named_errors() {
    let dir = tempfile::tempdir().unwrap();
    let err = |path: &Path| match load_transformer(path, None, DType::F32, &Device::Cpu) {
        Ok(_) => panic!("{} should not load", path.display()),
        Err(e) => e.to_string(),
    };
    let p = dir.path().join("iq4.gguf");
    hand_gguf(&p, "hyvid", 20, &[8, 32], 8 * 18);
    let e = err(&p);
    assert!(
        e.contains("iq4.gguf") && e.contains("IQ4_NL") && e.contains("Q4_K, Q3_K"),
        "{e}"
    );
    let p = dir.path().join("flux.gguf");
    hand_gguf(&p, "flux", 0, &[2, 2], 16);
    let e = err(&p);
    assert!(e.contains("flux.gguf") && e.contains("\"flux\""), "{e}");
    let p = dir.path().join("cut.gguf");
    hand_gguf(&p, "hyvid", 0, &[64, 64], 100);
    let e = err(&p);
    assert!(e.contains("cut.gguf") && e.contains("truncated"), "{e}");
    // a safetensors cut in half
    let bytes = std::fs::read(single_file("orig_fp8.safetensors")).unwrap();
    let p = dir.path().join("half.safetensors");
    std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
    let e = err(&p);
    assert!(e.contains("half.safetensors"), "{e}");
    // a file of another model, and one whose shapes fit no config
    let p = dir.path().join("other.safetensors");
    let t = Tensor::zeros((4, 4), DType::F32, &Device::Cpu).unwrap();
    candle_core::safetensors::save(&HashMap::from([("lm_head.weight", t.clone())]), &p).unwrap();
    let e = err(&p);
    assert!(
        e.contains("other.safetensors") && e.contains("not a HunyuanVideo"),
        "{e}"
    );
    let p = dir.path().join("shapes.safetensors");
    candle_core::safetensors::save(&HashMap::from([("img_in.proj.weight", t)]), &p).unwrap();
    let e = err(&p);
    assert!(
        e.contains("shapes.safetensors") && e.contains("--config"),
        "{e}"
    );
    // a missing file
    let e = err(&dir.path().join("absent.gguf"));
    assert!(e.contains("absent.gguf"), "{e}");
}

#[test]
fn fp8_diffusers_folder_keeps_fp8_like_a_single_file() {
    // tiny_a's transformer folder with every matmul weight (the 2-D tensors) in fp8 e4m3fn
    let src = fixture("transformer/tiny_a/transformer");
    let fp8 = tempfile::tempdir().unwrap();
    let mut matmul = 0;
    to_single_file(&src, fp8.path(), |t| {
        for v in t.values_mut().filter(|v| v.rank() == 2) {
            *v = v.to_dtype(DType::F8E4M3).unwrap();
            matmul += 1;
        }
    });
    // the same values upcast to f32 at rest
    let upcast = tempfile::tempdir().unwrap();
    to_single_file(fp8.path(), upcast.path(), |t| {
        for v in t.values_mut() {
            *v = v.to_dtype(DType::F32).unwrap();
        }
    });
    let load = |path: &Path, config: Option<&Path>| {
        skyreels_pipeline::load_transformer_resident(path, config, DType::F32, &Device::Cpu, false)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    };
    let (folder, resident) = load(fp8.path(), None);
    let (dense, dense_resident) = load(upcast.path(), None);
    let (single, single_resident) = load(
        &fp8.path().join(format!("{DIFFUSERS_WEIGHTS}.safetensors")),
        Some(&fp8.path().join("config.json")),
    );
    // every matmul weight stays fp8, as the single file keeps it: a quarter of its f32 bytes
    assert!(matmul > 0);
    assert_eq!(resident.stored, matmul);
    assert_eq!(dense_resident.stored, 0);
    assert_eq!(resident, single_resident);
    assert!(
        (resident.bytes as f64) < 0.55 * dense_resident.bytes as f64,
        "{} bytes resident vs {} dense f32",
        resident.bytes,
        dense_resident.bytes
    );
    let io = load_tensors(&fixture("transformer/tiny_a/io.safetensors"));
    let got = forward(&folder, &io);
    // fp8 -> f32 is exact, so the upcast weights are the same values in the same f32 math: the
    // bound of the fp8 single-file parity test (F32_TOL, `single_file_checkpoints_match_diffusers`)
    let err = rel_l2(&got, &forward(&dense, &io));
    assert!(
        err <= F32_TOL,
        "fp8 folder vs its f32 upcast: relative L2 error {err:e}"
    );
    // the single file with the same tensors goes through the same stored path: identical numbers
    let diff = (&got - forward(&single, &io))
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap();
    assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0);
}

#[test]
fn offloaded_blocks_stay_in_host_memory() {
    // `--offload blocks`: the 20 linear weights of the one double (14) and one single (6) block
    // are host copies (dense in the run dtype, GGUF as blocks); the rest stays on the device
    let load = |file: &str, host_blocks| {
        skyreels_pipeline::load_transformer_resident(
            &single_file(file),
            None,
            DType::F32,
            &Device::Cpu,
            host_blocks,
        )
        .unwrap()
        .1
    };
    for (file, stored) in [("orig_bf16.safetensors", 0), ("orig_q8_0.gguf", 40)] {
        let (resident, offloaded) = (load(file, false), load(file, true));
        assert_eq!(
            (resident.stored, resident.host_bytes),
            (stored, 0),
            "{file}"
        );
        assert_eq!(offloaded.stored, stored.max(20), "{file}");
        assert!(offloaded.host_bytes > 0, "{file}");
        assert_eq!(
            offloaded.bytes + offloaded.host_bytes,
            resident.bytes,
            "{file}: the same weights, split between device and host"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Ulysses sequence parallelism on in-process CPU ranks

/// An in-process group runs `models[rank]` on the same inputs (rank 0's prediction).
fn ulysses_forward(
    models: &[&HunyuanVideoTransformer3DModel],
    inputs: &TransformerInputs,
) -> Tensor {
    use skyreels_models::parallel::{in_process_group, Collective};
    let group: Vec<std::sync::Arc<dyn Collective>> = in_process_group(models.len())
        .into_iter()
        .map(|r| std::sync::Arc::new(r) as std::sync::Arc<dyn Collective>)
        .collect();
    let ranks: Vec<(&Device, &HunyuanVideoTransformer3DModel)> =
        models.iter().map(|m| (&Device::Cpu, *m)).collect();
    skyreels_pipeline::parallel::ulysses_group_forward(&ranks, &group, inputs, None).unwrap()
}

/// Random weights for a transformer of any shape (seeded per tensor name).
struct SeededWeights;

impl candle_nn::var_builder::SimpleBackend for SeededWeights {
    fn get(
        &self,
        s: candle_core::Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        use rand::{Rng, SeedableRng};
        let seed = name
            .bytes()
            .fold(7u64, |h, b| h.wrapping_mul(31).wrapping_add(b as u64));
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let fan_in = s.dims().last().copied().unwrap_or(1).max(1) as f32;
        let values: Vec<f32> = (0..s.elem_count())
            .map(|_| (rng.random::<f32>() - 0.5) * 2.0 / fan_in.sqrt())
            .collect();
        Tensor::from_vec(values, s, dev)?.to_dtype(dtype)
    }
    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("{name} needs a shape")
    }
    fn contains_tensor(&self, _: &str) -> bool {
        true
    }
}

#[test]
fn ulysses_on_cpu_ranks_matches_one_device() {
    // Each rank runs the same f32 math on its slice of the image tokens (linear layers on fewer
    // rows, attention per head): only GEMM blocking can change a summation order, so the f32
    // parity bound holds (F32_TOL); a wrong slice, head order or gather is an O(1) error.
    let dev = Device::Cpu;
    let io = load_tensors(&fixture("transformer/tiny_a/io.safetensors"));
    // tiny_a (2 heads) on 2 ranks: a 2x8x8 latent (32 video tokens) and the fixture's padded text
    let model = load_transformer(&fixture("transformer/tiny_a"), None, DType::F32, &dev).unwrap();
    let x = Tensor::randn(0f32, 1., (2, 32, 2, 8, 8), &dev).unwrap();
    let mut inputs = TransformerInputs::from_named(&io).unwrap();
    inputs.hidden_states = &x;
    let want = model.forward(&inputs).unwrap();
    let err = rel_l2(&ulysses_forward(&[&model, &model], &inputs), &want);
    assert!(err <= F32_TOL, "2 ranks: {err:e}");
    // tiny_b (3 heads, no guidance embedder, one padded prompt) on 3 ranks with its own inputs
    let io_b = load_tensors(&fixture("transformer/tiny_b/io.safetensors"));
    let model_b =
        load_transformer(&fixture("transformer/tiny_b/model"), None, DType::F32, &dev).unwrap();
    let inputs_b = TransformerInputs::from_named(&io_b).unwrap();
    let err = rel_l2(&ulysses_forward(&[&model_b; 3], &inputs_b), &io_b["output"]);
    assert!(err <= F32_TOL, "3 ranks against diffusers: {err:e}");
    // 4 heads of 8 on 4 ranks, each rank with its own copy of the weights
    let cfg: skyreels_models::TransformerConfig = serde_json::from_value(serde_json::json!({
        "in_channels": 32, "out_channels": 16, "num_attention_heads": 4, "attention_head_dim": 8,
        "num_layers": 1, "num_single_layers": 2, "num_refiner_layers": 1,
        "text_embed_dim": 24, "pooled_projection_dim": 12, "rope_axes_dim": [2, 2, 4]
    }))
    .unwrap();
    let build = || {
        let vb =
            candle_nn::VarBuilder::from_backend(Box::new(SeededWeights), DType::F32, dev.clone());
        HunyuanVideoTransformer3DModel::new(&cfg, vb).unwrap()
    };
    let copies: Vec<_> = (0..4).map(|_| build()).collect();
    let inputs4 = TransformerInputs {
        hidden_states: &x,
        ..TransformerInputs::from_named(&io).unwrap()
    };
    let want = copies[0].forward(&inputs4).unwrap();
    let err = rel_l2(
        &ulysses_forward(&copies.iter().collect::<Vec<_>>(), &inputs4),
        &want,
    );
    assert!(err <= F32_TOL, "4 ranks: {err:e}");
    // layouts that do not fit are errors on every rank, not hangs
    let odd = Tensor::randn(0f32, 1., (2, 32, 3, 6, 10), &dev).unwrap(); // 45 video tokens
    let bad = TransformerInputs {
        hidden_states: &odd,
        ..TransformerInputs::from_named(&io).unwrap()
    };
    let group = skyreels_models::parallel::in_process_group(2);
    for rank in group {
        let e = model
            .forward_ulysses(&bad, None, std::sync::Arc::new(rank))
            .unwrap_err();
        assert!(e.to_string().contains("video tokens (45)"), "{e}");
    }
    let group = skyreels_models::parallel::in_process_group(4);
    let e = model
        .forward_ulysses(&inputs, None, std::sync::Arc::new(group[0].clone()))
        .unwrap_err();
    assert!(e.to_string().contains("heads (2)"), "{e}");
}

/// Ulysses over NCCL between two GPUs (in f32, so the CPU bound holds): needs two GPUs.
#[cfg(feature = "nccl")]
#[test]
fn nccl_ulysses_on_two_gpus_matches_one() {
    use skyreels_models::parallel::nccl::nccl_group;
    let devs: Vec<Device> = (0..2)
        .map(|i| Device::new_cuda(i).expect("two CUDA GPUs for the nccl feature's tests"))
        .collect();
    let io = load_tensors(&fixture("transformer/tiny_a/io.safetensors"));
    let models: Vec<_> = devs
        .iter()
        .map(|d| load_transformer(&fixture("transformer/tiny_a"), None, DType::F32, d).unwrap())
        .collect();
    let x = Tensor::randn(0f32, 1., (2, 32, 2, 8, 8), &Device::Cpu).unwrap();
    let on = |d: &Device| -> HashMap<String, Tensor> {
        let mut t: HashMap<String, Tensor> = io
            .iter()
            .map(|(k, v)| (k.clone(), v.to_device(d).unwrap()))
            .collect();
        t.insert("hidden_states".into(), x.to_device(d).unwrap());
        t
    };
    let (io0, io1) = (on(&devs[0]), on(&devs[1]));
    let want = forward(&models[0], &io0);
    let group = nccl_group(&devs).unwrap();
    let outs: Vec<Tensor> = std::thread::scope(|s| {
        let handles: Vec<_> = group
            .into_iter()
            .zip(models.iter().zip([&io0, &io1]))
            .map(|(rank, (m, io))| {
                s.spawn(move || {
                    let inputs = TransformerInputs::from_named(io).unwrap();
                    m.forward_ulysses(&inputs, None, std::sync::Arc::new(rank))
                        .unwrap()
                        .to_device(&Device::Cpu)
                        .unwrap()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let want = want.to_device(&Device::Cpu).unwrap();
    for o in &outs {
        let err = rel_l2(o, &want);
        assert!(err <= F32_TOL, "NCCL Ulysses: {err:e}");
    }
}
