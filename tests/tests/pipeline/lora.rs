//! LoRA adapters at parity with diffusers 0.42.1 (`load_lora_weights` + `set_adapters`) on the
//! bundled tiny weights, in each file layout, and the errors a bad file gets.
//!
//! Fixtures come from `scripts/fixtures/lora.py`. The frames are held to the end-to-end bound of
//! the pipeline tests (`FRAME_TOL`, see there: both sides f32 on the CPU, summation order only);
//! every LoRA moves the frames by far more than that (checked), so a wrong scale, split or sign
//! fails.

use candle_core::{DType, Device, Tensor};
use serde_json::Value;
use skyreels_pipeline::generate::{CacheSpec, GenerateError, ModelPaths, Offload, Pipeline};
use skyreels_pipeline::lora::{LoraApplied, LoraErrorKind, LoraFile};
use skyreels_tests::generation::{case_in, params, FRAME_TOL};
use skyreels_tests::{fixture, max_abs, tiny_weights};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

fn pipeline_with(transformer: Option<&Path>, offload: Offload) -> Pipeline {
    let mut paths = ModelPaths::local(&tiny_weights(), transformer).unwrap();
    paths.transformer_config = transformer.map(|_| tiny_weights().join("transformer"));
    Pipeline::load_offloaded(paths, DType::F32, DType::F32, &Device::Cpu, offload).unwrap()
}

fn pipeline() -> Pipeline {
    pipeline_with(None, Offload::None)
}

fn lora_file(name: &str, scale: f64) -> LoraFile {
    LoraFile {
        label: name.to_string(),
        path: fixture(&format!("lora/files/{name}")),
        scale,
    }
}

/// The LoRAs a case's request names ([file, weight] pairs).
fn loras(req: &Value) -> Vec<LoraFile> {
    req["loras"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| lora_file(l[0].as_str().unwrap(), l[1].as_f64().unwrap()))
        .collect()
}

/// (format, layers, unmatched keys) of each LoRA of a report.
fn counts(applied: &[LoraApplied]) -> Vec<(&'static str, usize, usize)> {
    applied
        .iter()
        .map(|a| (a.format, a.layers, a.unmatched_keys))
        .collect()
}

/// Runs case `name` on `pipe` with its LoRAs; returns the frames after checking them against
/// diffusers' and against the frames without LoRA.
fn check(name: &str, pipe: &mut Pipeline) -> Tensor {
    let (io, req) = case_in("lora", name);
    pipe.set_loras(&loras(&req)).unwrap();
    let frames = params(&io, &req).run(pipe).frames;
    let err = max_abs(&frames, &io["frames"]);
    assert!(err <= FRAME_TOL, "{name}: max abs error {err:e}");
    let (base, _) = case_in("lora", "base");
    let moved = max_abs(&frames, &base["frames"]);
    assert!(moved > 100.0 * FRAME_TOL, "{name}: moved only {moved:e}");
    frames
}

/// Every layout, one LoRA or two (weights 0.7 and -0.3), true CFG, a partial LoRA: the frames of
/// diffusers, and the layers each LoRA reached. The tiny transformer has 46 linear layers; the
/// diffusers LoRA covers all of them, the original-layout one 34 (its fused q/k/v and `linear1`
/// split over 3 and 4 layers), the Kohya one 12, and its 3 text-encoder keys match nothing.
#[test]
fn each_layout_matches_diffusers() {
    let mut pipe = pipeline();
    for (name, want) in [
        ("diffusers", vec![("diffusers", 46, 0)]),
        ("hunyuan", vec![("hunyuan", 34, 0)]),
        ("kohya", vec![("kohya", 12, 3)]),
        ("partial", vec![("diffusers", 2, 0)]),
        ("two", vec![("diffusers", 46, 0), ("hunyuan", 34, 0)]),
        ("cfg", vec![("kohya", 12, 3)]),
    ] {
        let (_, req) = case_in("lora", name);
        let report = pipe.set_loras(&loras(&req)).unwrap();
        assert_eq!(counts(&report.applied), want, "{name}");
        check(name, &mut pipe);
    }
}

/// A LoRA beside a Q8_0 GGUF transformer: the base weight stays quantized, the adapter adds its
/// f32 term (diffusers: PEFT around its `GGUFLinear`).
#[test]
fn a_lora_on_a_gguf_transformer_matches_diffusers() {
    let gguf = fixture("single_file/tiny_transformer_q8_0.gguf");
    check("q8_0", &mut pipeline_with(Some(&gguf), Offload::None));
}

/// Clearing the LoRAs gives back the plain layers: bit-identical frames to a pipeline that never
/// had one. The cache serves the second read of a file, and drops files past its capacity.
#[test]
fn clearing_restores_the_plain_model_and_the_cache_serves_repeats() {
    let (io, req) = case_in("lora", "base");
    let r = params(&io, &req);
    let plain = r.run(&pipeline()).frames;
    assert!(max_abs(&plain, &io["frames"]) <= FRAME_TOL);
    let mut pipe = pipeline();
    let kohya = [lora_file("kohya.safetensors", 1.0)];
    let first = pipe.set_loras(&kohya).unwrap();
    assert!(max_abs(&r.run(&pipe).frames, &plain) > 100.0 * FRAME_TOL);
    assert!(pipe.set_loras(&[]).unwrap().applied.is_empty());
    assert_eq!(max_abs(&r.run(&pipe).frames, &plain), 0.0);

    let again = pipe.set_loras(&kohya).unwrap();
    assert_eq!(
        (first.applied[0].cache_hit, again.applied[0].cache_hit),
        (false, true)
    );
    let s = pipe.lora_cache_stats();
    assert_eq!((s.hits, s.misses, s.entries), (1, 1, 1));
    // the same bytes under another name are the same entry
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("copy.safetensors");
    std::fs::copy(&kohya[0].path, &copy).unwrap();
    let other = LoraFile {
        label: "copy".into(),
        path: copy,
        scale: 0.5,
    };
    assert!(pipe.set_loras(&[other]).unwrap().applied[0].cache_hit);
    // a second file does not fit beside the first: the least recent goes
    pipe.set_lora_cache_bytes(s.bytes + 1);
    let partial = [lora_file("partial.safetensors", 1.0)];
    assert!(!pipe.set_loras(&partial).unwrap().applied[0].cache_hit);
    assert!(pipe.set_loras(&partial).unwrap().applied[0].cache_hit);
    assert!(!pipe.set_loras(&kohya).unwrap().applied[0].cache_hit);
    let s = pipe.lora_cache_stats();
    assert_eq!((s.hits, s.misses, s.entries), (3, 3, 1));

    // a file read before, with the size and modification time it had then, is not read again:
    // its bytes garbled in place (same length, time put back) still give the cached LoRA; a
    // new modification time makes it read, and refused
    let copy = &dir.path().join("copy.safetensors");
    let meta = std::fs::metadata(copy).unwrap();
    std::fs::write(copy, vec![b'x'; meta.len() as usize]).unwrap();
    let file = std::fs::File::options().append(true).open(copy).unwrap();
    file.set_modified(meta.modified().unwrap()).unwrap();
    let garbled = LoraFile {
        label: "copy".into(),
        path: copy.clone(),
        scale: 1.0,
    };
    let applied = pipe.set_loras(std::slice::from_ref(&garbled)).unwrap();
    assert_eq!(counts(&applied.applied), [("kohya", 12, 3)]);
    assert!(applied.applied[0].cache_hit);
    file.set_modified(std::time::SystemTime::now()).unwrap();
    let e = pipe.set_loras(&[garbled]).unwrap_err();
    assert!(e.to_string().contains("not a safetensors file"), "{e}");
}

/// A LoRA with step caching: diffusers' first-block cache on the LoRA'd transformer
/// (`scripts/fixtures/cache.py lora`, true CFG): the adapted first block decides, so the skip
/// sequence is asserted exactly (and unchanged at 0.99 T and 1.01 T, as for the plain cache
/// fixtures), the frames within the same bound; without the LoRA, the frames are far off.
#[test]
fn a_lora_with_the_first_block_cache_matches_diffusers() {
    let mut pipe = pipeline();
    let (io, req) = case_in("lora", "cache_fbc_lora");
    let want: Vec<bool> = serde_json::from_value(req["decisions"].clone()).unwrap();
    assert!(want.contains(&true) && want.contains(&false), "{want:?}");
    pipe.set_loras(&loras(&req)).unwrap();
    let r = params(&io, &req);
    let CacheSpec::FirstBlock(t) = r.p.cache else {
        panic!("the fixture names a first-block cache: {:?}", r.p.cache)
    };
    let video = r.run(&pipe);
    assert_eq!(video.timings.forward_decisions, want);
    let err = max_abs(&video.frames, &io["frames"]);
    assert!(err <= FRAME_TOL, "max abs error {err:e}");
    for f in [0.99, 1.01] {
        let v = r
            .with(|p| p.cache = CacheSpec::FirstBlock(t * f))
            .run(&pipe);
        assert_eq!(v.timings.forward_decisions, want, "at {f} T");
    }
    pipe.set_loras(&[]).unwrap();
    let plain = max_abs(&r.run(&pipe).frames, &io["frames"]);
    assert!(
        plain > 100.0 * FRAME_TOL,
        "without the LoRA off by only {plain:e}"
    );
}

/// `--offload model` (the transformer loaded per stage gets the adapters after each load),
/// `--offload blocks` (host weights, device adapters) and `--parallel` (every rank's copy, set
/// before or after the layout is built) compute what the resident pipeline does.
#[test]
fn offload_and_parallel_apply_the_loras_too() {
    let (io, req) = case_in("lora", "cfg");
    let r = params(&io, &req);
    let files = loras(&req);
    let mut resident = pipeline();
    resident.set_loras(&files).unwrap();
    let want = r.run(&resident).frames;
    for offload in [Offload::Model, Offload::Blocks] {
        let mut pipe = pipeline_with(None, offload);
        pipe.set_loras(&files).unwrap();
        let got = r.run(&pipe).frames;
        assert_eq!(max_abs(&got, &want), 0.0, "{offload:?}");
    }
    let cpu = |n: usize| vec![Device::Cpu; n];
    let mut cfg2 = pipeline().with_parallel(&[cpu(1), cpu(1)]).unwrap();
    cfg2.set_loras(&files).unwrap();
    assert_eq!(max_abs(&r.run(&cfg2).frames, &want), 0.0, "cfg=2");
    let mut before = pipeline();
    before.set_loras(&files).unwrap();
    let ulysses = before.with_parallel(&[cpu(2)]).unwrap();
    let err = max_abs(&r.run(&ulysses).frames, &want);
    // Ulysses: the same f32 math on slices of the tokens (see the pipeline tests)
    assert!(err <= FRAME_TOL, "ulysses=2: {err:e}");
}

fn save(dir: &Path, name: &str, tensors: &[(&str, Tensor)]) -> PathBuf {
    let path = dir.join(name);
    let map: HashMap<String, Tensor> = tensors
        .iter()
        .map(|(k, t)| (k.to_string(), t.clone()))
        .collect();
    candle_core::safetensors::save(&map, &path).unwrap();
    path
}

fn randn(shape: &[usize]) -> Tensor {
    Tensor::randn(0f32, 0.1, shape, &Device::Cpu).unwrap()
}

/// Each bad file is refused with its label and what is wrong, and a refused request leaves the
/// LoRAs applied before it in place.
#[test]
fn bad_files_are_refused_naming_the_lora() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let q = "transformer.transformer_blocks.0.attn.to_q";
    let pair = |out: usize, inp: usize| {
        vec![
            (format!("{q}.lora_A.weight"), randn(&[4, inp])),
            (format!("{q}.lora_B.weight"), randn(&[out, 4])),
        ]
    };
    let with = |mut v: Vec<(String, Tensor)>, extra: (&str, Tensor)| {
        v.push((extra.0.to_string(), extra.1));
        v
    };
    let files: Vec<(&str, Vec<(String, Tensor)>)> = vec![
        (
            "dora",
            with(
                pair(32, 32),
                (&format!("{q}.lora_magnitude_vector"), randn(&[32])),
            ),
        ),
        ("lokr", vec![(format!("{q}.lokr_w1"), randn(&[4, 4]))]),
        ("big", pair(64, 64)),
        (
            "nomatch",
            vec![
                ("transformer.foo.lora_A.weight".into(), randn(&[4, 32])),
                ("transformer.foo.lora_B.weight".into(), randn(&[32, 4])),
            ],
        ),
        ("nan", {
            let mut v = pair(32, 32);
            v[1].1 = (v[1].1.clone() / 0.0).unwrap();
            v
        }),
        ("lonely", pair(32, 32)[..1].to_vec()),
    ];
    let mut paths = HashMap::new();
    for (name, tensors) in &files {
        let refs: Vec<(&str, Tensor)> = tensors
            .iter()
            .map(|(k, t)| (k.as_str(), t.clone()))
            .collect();
        paths.insert(*name, save(d, &format!("{name}.safetensors"), &refs));
    }
    let text = d.join("notes.safetensors");
    std::fs::write(&text, "not a tensor file").unwrap();
    paths.insert("text", text);
    paths.insert("missing", d.join("missing.safetensors"));

    let mut pipe = pipeline();
    let good = pipe
        .set_loras(&[lora_file("partial.safetensors", 1.0)])
        .unwrap();
    let (io, req) = case_in("lora", "partial");
    for (name, want) in [
        ("dora", "DoRA adapters are not supported"),
        ("lokr", "LoKr adapters are not supported"),
        ("big", "transformer_blocks.0.attn.to_q does not fit layer transformer_blocks.0.attn.to_q: lora_A is [4, 64] and lora_B [64, 4], the layer (out, in) is [32, 32]"),
        ("nomatch", "no key matches a layer of this transformer"),
        ("nan", "transformer.transformer_blocks.0.attn.to_q.lora_B.weight holds non-finite values"),
        ("lonely", "has only one of lora_A and lora_B"),
        ("text", "not a safetensors file"),
        ("missing", "not found"),
    ] {
        let file = LoraFile {
            label: format!("my-{name}"),
            path: paths[name].clone(),
            scale: 1.0,
        };
        let e = pipe
            .set_loras(&[lora_file("kohya.safetensors", 1.0), file])
            .unwrap_err();
        let msg = e.to_string();
        assert!(msg.starts_with(&format!("LoRA my-{name}: ")), "{msg}");
        assert!(msg.contains(want), "{name}: {msg}");
        assert!(matches!(e, GenerateError::Lora(_)), "{name}");
        if name == "missing" {
            let GenerateError::Lora(l) = e else { unreachable!() };
            assert!(matches!(l.kind, LoraErrorKind::NotFound(_)));
        }
    }
    // the LoRA set before the refused requests is still the one applied
    assert_eq!(good.applied[0].layers, 2);
    let frames = params(&io, &req).run(&pipe).frames;
    assert!(max_abs(&frames, &io["frames"]) <= FRAME_TOL);
    // unmatched keys beside matched ones are counted, not refused
    let mut tensors = pair(32, 32);
    tensors.push(("transformer.foo.lora_A.weight".into(), randn(&[4, 32])));
    tensors.push(("transformer.foo.lora_B.weight".into(), randn(&[32, 4])));
    tensors.push(("text_encoder.bar.weight".into(), randn(&[2])));
    let refs: Vec<(&str, Tensor)> = tensors
        .iter()
        .map(|(k, t)| (k.as_str(), t.clone()))
        .collect();
    let extra = LoraFile {
        label: "extra".into(),
        path: save(d, "extra.safetensors", &refs),
        scale: 1.0,
    };
    let report = pipe.set_loras(&[extra]).unwrap();
    assert_eq!(counts(&report.applied), vec![("diffusers", 1, 3)]);
}
