//! Text encoders: LLaMA hidden states at parity with transformers.
//!
//! Fixtures come from `scripts/gen_text_encoder_fixtures.py`.

use candle_core::{DType, Device, Tensor};
use skyreels_pipeline::loading::TRANSFORMERS_WEIGHTS;
use skyreels_pipeline::{load_clip_text, load_llama_encoder};
use skyreels_tests::{fixture, load_tensors, rel_l2, rewrite_checkpoint};
use std::collections::HashMap;
use std::path::Path;

/// SkyReels takes hidden_states[-(2 + 1)].
const SKIP: usize = 2;

/// f32 on both sides; only summation order differs (a few ulps per op through 2 layers), while a
/// wrong RoPE half, mask or norm order moves the states by >= 1e-2.
const F32_TOL: f64 = 1e-5;

fn run(dir: &Path) -> (Tensor, Tensor) {
    let io = load_tensors(&fixture("text_encoder/llama/io.safetensors"));
    let enc = load_llama_encoder(dir, SKIP, DType::F32, &Device::Cpu).unwrap();
    let got = enc
        .forward(&io["input_ids"], &io["attention_mask"])
        .unwrap();
    (got, io["hidden_states_m3"].clone())
}

#[test]
fn llama_hidden_states_match_transformers() {
    let (got, want) = run(&fixture("text_encoder/llama"));
    let err = rel_l2(&got, &want);
    assert!(err <= F32_TOL, "relative L2 error {err:e}");
}

/// Rewrites the fixture's weights with `edit` into a fresh folder.
fn rewritten(edit: impl FnOnce(&mut HashMap<String, Tensor>)) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let src = fixture("text_encoder/llama/text_encoder");
    rewrite_checkpoint(&src, dir.path(), TRANSFORMERS_WEIGHTS, edit);
    dir
}

#[test]
fn prefixed_keys_and_unneeded_tensors_load_the_same() {
    // a LlamaForCausalLM-style export: `model.` prefix and an lm_head
    let dir = rewritten(|t| {
        let names: Vec<String> = t.keys().cloned().collect();
        for n in names {
            let v = t.remove(&n).unwrap();
            t.insert(format!("model.{n}"), v);
        }
        t.insert(
            "lm_head.weight".into(),
            Tensor::zeros((96, 32), DType::F32, &Device::Cpu).unwrap(),
        );
    });
    let (got, want) = run(dir.path());
    assert!(rel_l2(&got, &want) <= F32_TOL);
    // hidden_states[-3] of 4 layers needs only layers 0 and 1: the rest may be absent
    let dir = rewritten(|t| {
        t.retain(|n, _| {
            !n.starts_with("layers.2.") && !n.starts_with("layers.3.") && n != "norm.weight"
        })
    });
    let (got, want) = run(dir.path());
    assert!(rel_l2(&got, &want) <= F32_TOL);
    // but a needed one may not
    let dir = rewritten(|t| t.retain(|n, _| !n.starts_with("layers.1.mlp")));
    let e = load_llama_encoder(dir.path(), SKIP, DType::F32, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(e.contains("layers.1.mlp.gate_proj.weight"), "{e}");
}

#[test]
fn clip_pooled_output_matches_transformers() {
    // legacy config (eos_token_id 2): pooled at the argmax of the ids; otherwise the first EOS
    for name in ["clip_legacy", "clip_eos"] {
        let io = load_tensors(&fixture(&format!("text_encoder/{name}/io.safetensors")));
        let clip = load_clip_text(
            &fixture(&format!("text_encoder/{name}")),
            DType::F32,
            &Device::Cpu,
        )
        .unwrap();
        let got = clip.pooled(&io["input_ids"]).unwrap();
        let err = rel_l2(&got, &io["pooled"]);
        assert!(err <= F32_TOL, "{name}: relative L2 error {err:e}");
    }
}

#[test]
fn clip_rejects_too_long_input() {
    let clip = load_clip_text(&fixture("text_encoder/clip_eos"), DType::F32, &Device::Cpu).unwrap();
    let ids = Tensor::zeros((1, 13), DType::U32, &Device::Cpu).unwrap();
    let e = clip.pooled(&ids).unwrap_err().to_string();
    assert!(e.contains("max_position_embeddings"), "{e}");
}

#[test]
fn clip_loads_prefixed_exports() {
    // transformers 4.x wrote CLIPTextModel keys under `text_model.` (plus, before 4.31, the
    // position_ids buffer)
    let dir = tempfile::tempdir().unwrap();
    let src = fixture("text_encoder/clip_eos/text_encoder_2");
    rewrite_checkpoint(&src, dir.path(), TRANSFORMERS_WEIGHTS, |t| {
        let names: Vec<String> = t.keys().cloned().collect();
        for n in names {
            let v = t.remove(&n).unwrap();
            t.insert(format!("text_model.{n}"), v);
        }
        let ids = Tensor::arange(0i64, 12, &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        t.insert("text_model.embeddings.position_ids".into(), ids);
    });
    let io = load_tensors(&fixture("text_encoder/clip_eos/io.safetensors"));
    let clip = load_clip_text(dir.path(), DType::F32, &Device::Cpu).unwrap();
    let err = rel_l2(&clip.pooled(&io["input_ids"]).unwrap(), &io["pooled"]);
    assert!(err <= F32_TOL, "relative L2 error {err:e}");
}
