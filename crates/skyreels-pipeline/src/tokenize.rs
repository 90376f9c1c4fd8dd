//! Tokenization for the two text encoders, as diffusers' HunyuanVideo pipelines call the
//! Hugging Face tokenizers (docs/MODEL.md section 3).
//!
//! - LLaMA (`tokenizer/`): `tokenizer.json`; the prompt goes into [`PROMPT_TEMPLATE`]; the first
//!   `crop_start` tokens (the template before the prompt, BOS included) are computed from the
//!   tokenizer; padded right and truncated to [`LLAMA_MAX_TOKENS`] + `crop_start`.
//! - CLIP (`tokenizer_2/`): `tokenizer.json` when present, else `vocab.json` + `merges.txt` with
//!   the pipeline of transformers' `CLIPTokenizer`; the raw prompt; [`CLIP_MAX_TOKENS`] with the
//!   end-of-text token kept when truncating.
//!
//! Special tokens are named in `special_tokens_map.json` (which wins, as in transformers) or
//! `tokenizer_config.json` and resolved to ids through the vocabulary.

use serde_json::Value;
use std::path::{Path, PathBuf};
use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::replace::ReplacePattern;
use tokenizers::normalizers::{Lowercase, Replace, NFC};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::roberta::RobertaProcessing;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{
    AddedToken, NormalizerWrapper, PaddingDirection, PaddingParams, PaddingStrategy,
    PreTokenizerWrapper, SplitDelimiterBehavior, Tokenizer, TruncationDirection, TruncationParams,
    TruncationStrategy,
};

/// diffusers' `DEFAULT_PROMPT_TEMPLATE` for HunyuanVideo (and SkyReels); the prompt replaces `{}`.
///
/// <https://github.com/huggingface/diffusers/blob/58eb52c0803ea9af3abec60841c2a093bdf1f951/src/diffusers/pipelines/hunyuan_video/pipeline_hunyuan_video.py#L70-L81>
pub const PROMPT_TEMPLATE: &str = "<|start_header_id|>system<|end_header_id|>\n\nDescribe the video by detailing the following aspects: 1. The main content and theme of the video.2. The color, shape, size, texture, quantity, text, and spatial relationships of the objects.3. Actions, events, behaviors temporal relationships, physical movement changes of the objects.4. background environment, light, style and atmosphere.5. camera angles, movements, and transitions used in the video:<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n{}<|eot_id|>";

/// LLaMA tokens kept after cropping the template (diffusers' `max_sequence_length`).
pub const LLAMA_MAX_TOKENS: usize = 256;

/// CLIP's context length.
pub const CLIP_MAX_TOKENS: usize = 77;

/// CLIP's pre-tokenizer split, from transformers' `CLIPTokenizer`.
const CLIP_SPLIT: &str =
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";

/// `CLIPTokenizer`'s default end-of-text, unknown and pad token.
const CLIP_DEFAULT_SPECIAL: &str = "<|endoftext|>";

#[derive(Debug, thiserror::Error)]
pub enum TokenizeError {
    #[error("{0}: no tokenizer here or in its `{1}/` subfolder (expected {2})")]
    NotFound(PathBuf, String, &'static str),
    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },
    #[error("{dir}: the {role} token `{token}` is not in the tokenizer's vocabulary")]
    UnknownToken {
        dir: PathBuf,
        role: &'static str,
        token: String,
    },
    #[error("{0}: no {1} token is named in special_tokens_map.json, tokenizer_config.json or tokenizer.json")]
    NoToken(PathBuf, &'static str),
    #[error("tokenizing: {0}")]
    Encode(String),
}

/// Token ids and attention mask of a batch, each row `len` long (row-major, `ids.len() = batch ×
/// len`), and per row whether the text was cut to fit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenBatch {
    pub ids: Vec<u32>,
    pub mask: Vec<u32>,
    pub len: usize,
    pub truncated: Vec<bool>,
}

impl TokenBatch {
    pub fn batch(&self) -> usize {
        self.truncated.len()
    }

    /// Row `i` of the ids.
    pub fn row(&self, i: usize) -> &[u32] {
        &self.ids[i * self.len..(i + 1) * self.len]
    }
}

/// The special tokens a tokenizer folder names, and whether it overrides BOS/EOS insertion.
#[derive(Debug, Default)]
struct SpecialTokens {
    bos: Option<String>,
    eos: Option<String>,
    pad: Option<String>,
    unk: Option<String>,
    add_bos: Option<bool>,
    add_eos: Option<bool>,
}

impl SpecialTokens {
    /// Reads `tokenizer_config.json`, then lets `special_tokens_map.json` override it (the order
    /// of transformers' `from_pretrained`). Missing files are fine.
    fn read(dir: &Path) -> Result<Self, TokenizeError> {
        let mut out = Self::default();
        for name in ["tokenizer_config.json", "special_tokens_map.json"] {
            let path = dir.join(name);
            if !path.is_file() {
                continue;
            }
            let json: Value = std::fs::read_to_string(&path)
                .map_err(|e| e.to_string())
                .and_then(|t| serde_json::from_str(&t).map_err(|e| e.to_string()))
                .map_err(|message| TokenizeError::File {
                    path: path.clone(),
                    message,
                })?;
            // a token is a string or an AddedToken object {"content": ...}
            let token = |key: &str| match json.get(key) {
                Some(Value::String(s)) => Some(s.clone()),
                Some(Value::Object(o)) => o.get("content")?.as_str().map(str::to_string),
                _ => None,
            };
            out.bos = token("bos_token").or(out.bos);
            out.eos = token("eos_token").or(out.eos);
            out.pad = token("pad_token").or(out.pad);
            out.unk = token("unk_token").or(out.unk);
            out.add_bos = json
                .get("add_bos_token")
                .and_then(Value::as_bool)
                .or(out.add_bos);
            out.add_eos = json
                .get("add_eos_token")
                .and_then(Value::as_bool)
                .or(out.add_eos);
        }
        Ok(out)
    }
}

fn tokenizer_dir(dir: &Path, subfolder: &str, files: &[&str]) -> Option<PathBuf> {
    [dir.to_path_buf(), dir.join(subfolder)]
        .into_iter()
        .find(|d| files.iter().all(|f| d.join(f).is_file()))
}

fn load_json(path: &Path) -> Result<Tokenizer, TokenizeError> {
    Tokenizer::from_file(path).map_err(|e| TokenizeError::File {
        path: path.to_path_buf(),
        message: format!("not a readable tokenizer.json: {e}"),
    })
}

fn token_id(
    tok: &Tokenizer,
    dir: &Path,
    role: &'static str,
    token: &str,
) -> Result<u32, TokenizeError> {
    tok.token_to_id(token)
        .ok_or_else(|| TokenizeError::UnknownToken {
            dir: dir.to_path_buf(),
            role,
            token: token.to_string(),
        })
}

/// Right padding to exactly `len` tokens with the folder's pad token (named in its config, else
/// the padding stored in tokenizer.json, else the tokenizer class's `default`), and right
/// truncation to `len`.
fn pad_and_truncate(
    tok: &mut Tokenizer,
    dir: &Path,
    pad: Option<&str>,
    default: Option<&str>,
    len: usize,
) -> Result<(), TokenizeError> {
    let stored = tok.get_padding().map(|p| p.pad_token.clone());
    let Some(pad_token) = pad
        .map(str::to_string)
        .or(stored)
        .or(default.map(str::to_string))
    else {
        return Err(TokenizeError::NoToken(dir.to_path_buf(), "pad"));
    };
    let pad_id = token_id(tok, dir, "pad", &pad_token)?;
    tok.with_padding(Some(PaddingParams {
        strategy: PaddingStrategy::Fixed(len),
        direction: PaddingDirection::Right,
        pad_to_multiple_of: None,
        pad_id,
        pad_type_id: 0,
        pad_token,
    }));
    tok.with_truncation(Some(TruncationParams {
        direction: TruncationDirection::Right,
        max_length: len,
        strategy: TruncationStrategy::LongestFirst,
        stride: 0,
    }))
    .map_err(|e| TokenizeError::Encode(e.to_string()))?;
    Ok(())
}

/// Encodes a batch with the tokenizer's padding and truncation (special tokens added).
fn encode(tok: &Tokenizer, texts: Vec<String>, len: usize) -> Result<TokenBatch, TokenizeError> {
    let encodings = tok
        .encode_batch(texts, true)
        .map_err(|e| TokenizeError::Encode(e.to_string()))?;
    let mut out = TokenBatch {
        ids: Vec::with_capacity(encodings.len() * len),
        mask: Vec::with_capacity(encodings.len() * len),
        len,
        truncated: Vec::with_capacity(encodings.len()),
    };
    for e in &encodings {
        if e.get_ids().len() != len {
            return Err(TokenizeError::Encode(format!(
                "expected {len} tokens after padding, got {}",
                e.get_ids().len()
            )));
        }
        out.ids.extend_from_slice(e.get_ids());
        out.mask.extend_from_slice(e.get_attention_mask());
        out.truncated.push(!e.get_overflowing().is_empty());
    }
    Ok(out)
}

/// The LLaMA tokenizer with the video prompt template.
pub struct LlamaTokenizer {
    tok: Tokenizer,
    crop_start: usize,
}

impl LlamaTokenizer {
    /// From `dir/tokenizer.json` or `dir/tokenizer/tokenizer.json`.
    pub fn from_dir(dir: &Path) -> Result<Self, TokenizeError> {
        let Some(dir) = tokenizer_dir(dir, "tokenizer", &["tokenizer.json"]) else {
            return Err(TokenizeError::NotFound(
                dir.to_path_buf(),
                "tokenizer".into(),
                "tokenizer.json",
            ));
        };
        let mut tok = load_json(&dir.join("tokenizer.json"))?;
        let special = SpecialTokens::read(&dir)?;
        // transformers rebuilds the post-processor when the config sets add_bos/add_eos_token
        if special.add_bos.is_some() || special.add_eos.is_some() {
            let processor = bos_eos_template(&tok, &dir, &special)?;
            tok.with_post_processor(Some(processor));
        }
        let (prefix, _) = PROMPT_TEMPLATE
            .split_once("{}")
            .expect("the template has a prompt slot");
        let crop_start = tok
            .encode(prefix, true)
            .map_err(|e| TokenizeError::Encode(e.to_string()))?
            .get_ids()
            .len();
        pad_and_truncate(
            &mut tok,
            &dir,
            special.pad.as_deref(),
            None,
            LLAMA_MAX_TOKENS + crop_start,
        )?;
        Ok(Self { tok, crop_start })
    }

    /// Template tokens before the prompt (BOS included), dropped from the encoder output.
    pub fn crop_start(&self) -> usize {
        self.crop_start
    }

    /// The templated prompts as `LLAMA_MAX_TOKENS + crop_start` ids each, right-padded.
    pub fn encode(&self, prompts: &[&str]) -> Result<TokenBatch, TokenizeError> {
        let texts = prompts
            .iter()
            .map(|p| PROMPT_TEMPLATE.replacen("{}", p, 1))
            .collect();
        encode(&self.tok, texts, LLAMA_MAX_TOKENS + self.crop_start)
    }
}

/// transformers' `update_post_processor`: `[BOS] $A [EOS]` with each part as configured.
fn bos_eos_template(
    tok: &Tokenizer,
    dir: &Path,
    special: &SpecialTokens,
) -> Result<TemplateProcessing, TokenizeError> {
    let mut specials = Vec::new();
    let mut part = |on: Option<bool>, token: &Option<String>, role| match (on, token) {
        (Some(true), Some(t)) => {
            specials.push((t.clone(), token_id(tok, dir, role, t)?));
            Ok(Some(t.clone()))
        }
        _ => Ok::<_, TokenizeError>(None),
    };
    let bos = part(special.add_bos, &special.bos, "bos")?;
    let eos = part(special.add_eos, &special.eos, "eos")?;
    let seq = |s: &str| {
        let mut v = Vec::new();
        v.extend(bos.as_ref().map(|b| format!("{b}:{s}")));
        v.push(format!("${}:{s}", if s == "0" { "A" } else { "B" }));
        v.extend(eos.as_ref().map(|e| format!("{e}:{s}")));
        v.join(" ")
    };
    TemplateProcessing::builder()
        .try_single(seq("0"))
        .and_then(|b| b.try_pair(format!("{} {}", seq("0"), seq("1"))))
        .map_err(|e| TokenizeError::Encode(e.to_string()))?
        .special_tokens(specials)
        .build()
        .map_err(|e| TokenizeError::Encode(e.to_string()))
}

/// The CLIP tokenizer.
pub struct ClipTokenizer {
    tok: Tokenizer,
}

impl ClipTokenizer {
    /// From `tokenizer.json`, else `vocab.json` + `merges.txt`, in `dir` or `dir/tokenizer_2`.
    pub fn from_dir(dir: &Path) -> Result<Self, TokenizeError> {
        const JSON: &[&str] = &["tokenizer.json"];
        const FILES: &[&str] = &["vocab.json", "merges.txt"];
        let found = [JSON, FILES]
            .iter()
            .find_map(|files| Some((tokenizer_dir(dir, "tokenizer_2", files)?, *files)));
        let Some((dir, files)) = found else {
            return Err(TokenizeError::NotFound(
                dir.to_path_buf(),
                "tokenizer_2".into(),
                "tokenizer.json, or vocab.json and merges.txt",
            ));
        };
        let special = SpecialTokens::read(&dir)?;
        let mut tok = if files == JSON {
            load_json(&dir.join("tokenizer.json"))?
        } else {
            clip_from_files(&dir, &special)?
        };
        pad_and_truncate(
            &mut tok,
            &dir,
            special.pad.as_deref(),
            Some(CLIP_DEFAULT_SPECIAL),
            CLIP_MAX_TOKENS,
        )?;
        Ok(Self { tok })
    }

    /// The raw prompts as `CLIP_MAX_TOKENS` ids each, padded with the pad token.
    pub fn encode(&self, prompts: &[&str]) -> Result<TokenBatch, TokenizeError> {
        let texts = prompts.iter().map(|p| p.to_string()).collect();
        encode(&self.tok, texts, CLIP_MAX_TOKENS)
    }
}

/// transformers' `CLIPTokenizer` pipeline over a vocab.json + merges.txt pair: NFC, whitespace
/// runs to one space, lower case; CLIP's split then byte-level; BPE with `</w>` word ends;
/// `<|startoftext|> … <|endoftext|>` around the text.
fn clip_from_files(dir: &Path, special: &SpecialTokens) -> Result<Tokenizer, TokenizeError> {
    let file_err = |path: PathBuf| {
        move |e: Box<dyn std::error::Error + Send + Sync>| TokenizeError::File {
            path: path.clone(),
            message: e.to_string(),
        }
    };
    let named = |t: &Option<String>, default: &str| t.clone().unwrap_or_else(|| default.into());
    // CLIPTokenizer's defaults where the folder names none
    let bos = named(&special.bos, "<|startoftext|>");
    let eos = named(&special.eos, CLIP_DEFAULT_SPECIAL);
    let unk = named(&special.unk, CLIP_DEFAULT_SPECIAL);
    let vocab = dir.join("vocab.json");
    let bpe = BPE::builder()
        .files(
            vocab.to_string_lossy().into_owned(),
            dir.join("merges.txt").to_string_lossy().into_owned(),
        )
        .unk_token(unk.clone())
        .end_of_word_suffix("</w>".into())
        .fuse_unk(false)
        .build()
        .map_err(file_err(vocab))?;
    let mut tok = Tokenizer::new(bpe);
    let regex_err = file_err(dir.to_path_buf());
    let normalizer = tokenizers::normalizers::Sequence::new(vec![
        NFC.into(),
        Replace::new(ReplacePattern::Regex(r"\s+".into()), " ")
            .map_err(&regex_err)?
            .into(),
        Lowercase.into(),
    ]);
    tok.with_normalizer(Some(NormalizerWrapper::Sequence(normalizer)))
        .map_err(&regex_err)?;
    let split = Split::new(
        SplitPattern::Regex(CLIP_SPLIT.into()),
        SplitDelimiterBehavior::Removed,
        true,
    )
    .map_err(&regex_err)?;
    tok.with_pre_tokenizer(Some(PreTokenizerWrapper::Sequence(
        tokenizers::pre_tokenizers::sequence::Sequence::new(vec![
            split.into(),
            ByteLevel::new(false, true, true).into(),
        ]),
    )));
    let mut specials = vec![bos.clone(), eos.clone(), unk];
    specials.extend(special.pad.clone());
    let specials: Vec<AddedToken> = specials
        .into_iter()
        .map(|t| AddedToken::from(t, true))
        .collect();
    tok.add_special_tokens(specials).map_err(&regex_err)?;
    let (bos_id, eos_id) = (
        token_id(&tok, dir, "bos", &bos)?,
        token_id(&tok, dir, "eos", &eos)?,
    );
    tok.with_post_processor(Some(
        RobertaProcessing::new((eos, eos_id), (bos, bos_id))
            .trim_offsets(false)
            .add_prefix_space(false),
    ));
    Ok(tok)
}
