//! Text encoders and tokenizers at parity with transformers / diffusers' encode_prompt.
//!
//! Fixtures come from `scripts/fixtures/text_encoder.py`. The safety checker's CLIP vision tower
//! shares the CLIP text model's encoder layers: its tests are the `safety` module.

use candle_core::{DType, Device, Tensor};
use skyreels_pipeline::conditioning::{TextEncoders, TextError};
use skyreels_pipeline::loading::TRANSFORMERS_WEIGHTS;
use skyreels_pipeline::tokenize::{ClipTokenizer, LlamaTokenizer, TokenizeError, CLIP_MAX_TOKENS};
use skyreels_pipeline::{load_clip_text, load_llama_encoder};
use skyreels_tests::{
    copy_dir, fixture, load_tensors, metadata_strings, rel_l2, rewrite_checkpoint,
};
use std::collections::HashMap;
use std::path::Path;

#[path = "text_encoder/safety.rs"]
mod safety;

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

// ---- tokenization and conditioning (the `pipeline` fixture: diffusers' encode_prompt) ----

fn pipeline_io() -> (HashMap<String, Tensor>, Vec<String>, Vec<String>) {
    let path = fixture("text_encoder/pipeline/io.safetensors");
    (
        load_tensors(&path),
        metadata_strings(&path, "a_prompts"),
        metadata_strings(&path, "b_prompts"),
    )
}

fn ids(t: &Tensor) -> Vec<u32> {
    t.to_dtype(DType::U32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

#[test]
fn llama_tokenizer_matches_transformers() {
    let (io, a, b) = pipeline_io();
    let tok = LlamaTokenizer::from_dir(&fixture("text_encoder/pipeline")).unwrap();
    assert_eq!(tok.crop_start(), ids(&io["crop_start"])[0] as usize);
    for (tag, prompts, truncated) in [("a", &a, [false, false]), ("b", &b, [true, true])] {
        let got = tok.encode(&strs(prompts)).unwrap();
        assert_eq!(got.ids, ids(&io[&format!("{tag}_llama_ids")]), "{tag} ids");
        assert_eq!(
            got.mask,
            ids(&io[&format!("{tag}_llama_mask")]),
            "{tag} mask"
        );
        assert_eq!(
            got.truncated,
            truncated[..prompts.len()],
            "{tag} truncation"
        );
    }
}

#[test]
fn clip_tokenizer_matches_transformers_from_both_layouts() {
    let (io, a, b) = pipeline_io();
    // vocab.json + merges.txt (the HunyuanVideo repo's tokenizer_2/) and tokenizer.json
    for sub in ["tokenizer_2", "tokenizer_2_json"] {
        let tok =
            ClipTokenizer::from_dir(&fixture(&format!("text_encoder/pipeline/{sub}"))).unwrap();
        for (tag, prompts) in [("a", &a), ("b", &b)] {
            let got = tok.encode(&strs(prompts)).unwrap();
            assert_eq!(got.ids, ids(&io[&format!("{tag}_clip_ids")]), "{sub} {tag}");
            // the cut prompt still ends in end-of-text, then nothing is padded
            let last = *got.row(0).last().unwrap();
            assert_eq!(got.truncated[0], tag == "b", "{sub} {tag} truncation");
            if tag == "b" {
                assert_ne!(got.row(0)[CLIP_MAX_TOKENS - 2], last, "{sub}: no padding");
            }
        }
    }
}

#[test]
fn conditioning_matches_diffusers_encode_prompt() {
    let (io, a, b) = pipeline_io();
    let enc =
        TextEncoders::load(&fixture("text_encoder/pipeline"), DType::F32, &Device::Cpu).unwrap();
    for (tag, prompts) in [("a", &a), ("b", &b)] {
        let got = enc.encode(&strs(prompts)).unwrap();
        let err = rel_l2(&got.embeds, &io[&format!("{tag}_embeds")]);
        assert!(err <= F32_TOL, "{tag} embeds: relative L2 error {err:e}");
        assert_eq!(
            ids(&got.mask),
            ids(&io[&format!("{tag}_mask")]),
            "{tag} mask"
        );
        let err = rel_l2(&got.pooled, &io[&format!("{tag}_pooled")]);
        assert!(err <= F32_TOL, "{tag} pooled: relative L2 error {err:e}");
    }
    // prompt and negative prompt as one call, the encoders consumed
    let cond = enc.into_conditioning(&a[0], Some(&a[1])).unwrap();
    let neg = cond.negative.unwrap();
    for (i, e) in [(0, &cond.prompt), (1, &neg)] {
        let want = io["a_embeds"].narrow(0, i, 1).unwrap();
        assert!(rel_l2(&e.embeds, &want) <= F32_TOL);
        let want = io["a_pooled"].narrow(0, i, 1).unwrap();
        assert!(rel_l2(&e.pooled, &want) <= F32_TOL);
    }
}

#[test]
fn conditioning_refuses_an_empty_prompt_but_not_an_empty_negative() {
    let load =
        || TextEncoders::load(&fixture("text_encoder/pipeline"), DType::F32, &Device::Cpu).unwrap();
    for empty in ["", "  \n\t "] {
        let e = load().into_conditioning(empty, None).unwrap_err();
        assert!(matches!(e, TextError::EmptyPrompt), "{e}");
    }
    let cond = load().into_conditioning("a cat", Some("")).unwrap();
    let neg = cond.negative.unwrap();
    // the empty negative prompt keeps its closing <|eot_id|>
    assert_eq!(ids(&neg.mask).iter().sum::<u32>(), 1);
    assert!(!neg.truncated_llama[0] && !neg.truncated_clip[0]);
}

/// A copy of the fixture's LLaMA tokenizer folder with `tokenizer_config.json` edited.
fn llama_tokenizer_with(edit: impl FnOnce(&mut serde_json::Value)) -> tempfile::TempDir {
    let dir = copy_dir(&fixture("text_encoder/pipeline/tokenizer"));
    let path = dir.path().join("tokenizer_config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(&mut cfg);
    std::fs::write(&path, cfg.to_string()).unwrap();
    dir
}

#[test]
fn llama_special_tokens_come_from_the_tokenizer_files() {
    let (io, a, _) = pipeline_io();
    let want = ids(&io["a_llama_ids"]);
    let base = LlamaTokenizer::from_dir(&fixture("text_encoder/pipeline")).unwrap();
    let len = base.encode(&["x"]).unwrap().len;
    let pad_id = *want.last().unwrap();

    // special_tokens_map.json overrides tokenizer_config.json; an AddedToken object works
    let dir = llama_tokenizer_with(|_| {});
    let map = r#"{"pad_token": {"content": "<|end_of_text|>", "special": true}}"#;
    std::fs::write(dir.path().join("special_tokens_map.json"), map).unwrap();
    let got = LlamaTokenizer::from_dir(dir.path())
        .unwrap()
        .encode(&strs(&a))
        .unwrap();
    let eot = *got.row(0).last().unwrap();
    assert_ne!(eot, pad_id);
    let swapped: Vec<u32> = want
        .iter()
        .map(|&t| if t == pad_id { eot } else { t })
        .collect();
    assert_eq!(got.ids, swapped);

    // add_eos_token rebuilds the post-processor as transformers does: EOS after the text
    let dir = llama_tokenizer_with(|c| {
        c["add_bos_token"] = true.into();
        c["add_eos_token"] = true.into();
    });
    let tok = LlamaTokenizer::from_dir(dir.path()).unwrap();
    assert_eq!(
        tok.crop_start(),
        base.crop_start() + 1,
        "the prefix now ends in EOS"
    );
    let got = tok.encode(&strs(&a)).unwrap();
    let n = got.mask[..len].iter().sum::<u32>() as usize;
    assert_eq!(got.row(0)[n - 1], eot, "EOS closes the text");
    assert_eq!(got.row(0)[..n - 1], want[..n - 1]);

    // a pad token that is not in the vocabulary, and no pad token at all
    let dir = llama_tokenizer_with(|c| c["pad_token"] = "<nope>".into());
    let e = LlamaTokenizer::from_dir(dir.path()).err().unwrap();
    assert!(
        matches!(e, TokenizeError::UnknownToken { role: "pad", .. }),
        "{e}"
    );
    assert!(e.to_string().contains("<nope>"), "{e}");
    let dir = llama_tokenizer_with(|c| {
        c.as_object_mut().unwrap().remove("pad_token");
    });
    let e = LlamaTokenizer::from_dir(dir.path()).err().unwrap();
    assert!(matches!(e, TokenizeError::NoToken(_, "pad")), "{e}");
}

#[test]
fn missing_or_broken_tokenizers_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let e = LlamaTokenizer::from_dir(dir.path()).err().unwrap();
    assert!(matches!(e, TokenizeError::NotFound(..)), "{e}");
    let e = ClipTokenizer::from_dir(dir.path()).err().unwrap();
    assert!(e.to_string().contains("vocab.json and merges.txt"), "{e}");
    std::fs::write(dir.path().join("tokenizer.json"), "{ not json").unwrap();
    let e = LlamaTokenizer::from_dir(dir.path()).err().unwrap();
    assert!(matches!(e, TokenizeError::File { .. }), "{e}");
    assert!(e.to_string().contains("tokenizer.json"), "{e}");
}
