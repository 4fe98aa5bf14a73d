//! The CLIP BPE tokenizer, built with the `tokenizers` crate from a diffusers `tokenizer/`
//! directory (`vocab.json` + `merges.txt`), giving exactly the ids of transformers'
//! `CLIPTokenizer` (NFC, whitespace runs to one space, lowercase, CLIP's split regex,
//! byte-level BPE with `</w>`), padded and truncated to `model_max_length` like diffusers.

use std::path::Path;

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};
use tokenizers::Tokenizer;

/// CLIP's pre-tokenization pattern (transformers' `CLIPTokenizer`).
const CLIP_SPLIT: &str =
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";

/// A prompt as token ids, exactly `max_length` long.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenizedPrompt {
    pub ids: Vec<u32>,
    /// Whether the prompt was longer than `max_length` and lost its tail.
    pub truncated: bool,
}

pub struct ClipTokenizer {
    tokenizer: Tokenizer,
    max_length: usize,
    bos_id: u32,
    eos_id: u32,
    pad_id: u32,
}

/// A special token in tokenizer_config.json: a plain string or an AddedToken object.
fn token_text(value: Option<&Value>) -> Option<String> {
    match value? {
        Value::String(s) => Some(s.clone()),
        Value::Object(map) => map.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("invalid JSON in {}", path.display()))
}

impl ClipTokenizer {
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let _span = tracing::info_span!("tokenizer-load", dir = %dir.display()).entered();
        let vocab_path = dir.join("vocab.json");
        let merges_path = dir.join("merges.txt");
        let vocab = read_json(&vocab_path)?;
        let Value::Object(vocab_map) = &vocab else {
            bail!("{} is not a JSON object of token -> id", vocab_path.display());
        };
        let merges_text =
            std::fs::read_to_string(&merges_path).with_context(|| format!("cannot read {}", merges_path.display()))?;
        let merges: Vec<&str> = merges_text
            .lines()
            .filter(|line| !line.starts_with("#version") && !line.trim().is_empty())
            .collect();
        if let Some(bad) = merges.iter().find(|m| m.split(' ').count() != 2) {
            bail!("{} has a malformed merge line {bad:?}", merges_path.display());
        }

        // Special tokens and length: tokenizer_config.json, then special_tokens_map.json.
        let mut config = Value::Object(Default::default());
        for name in ["special_tokens_map.json", "tokenizer_config.json"] {
            let path = dir.join(name);
            if path.is_file()
                && let Value::Object(map) = read_json(&path)?
            {
                for (k, v) in map {
                    config[k] = v;
                }
            }
        }
        let bos = token_text(config.get("bos_token")).unwrap_or_else(|| "<|startoftext|>".into());
        let eos = token_text(config.get("eos_token")).unwrap_or_else(|| "<|endoftext|>".into());
        let pad = token_text(config.get("pad_token")).unwrap_or_else(|| eos.clone());
        let unk = token_text(config.get("unk_token")).unwrap_or_else(|| eos.clone());
        let max_length = config.get("model_max_length").and_then(Value::as_u64).unwrap_or(77) as usize;
        // Some configs store model_max_length as a huge sentinel; CLIP's context is 77.
        let max_length = if max_length > 1_000_000 { 77 } else { max_length };
        let id_of = |token: &str| -> Result<u32> {
            vocab_map
                .get(token)
                .and_then(Value::as_u64)
                .map(|id| id as u32)
                .with_context(|| format!("token {token:?} is not in {}", vocab_path.display()))
        };
        let (bos_id, eos_id, pad_id) = (id_of(&bos)?, id_of(&eos)?, id_of(&pad)?);

        let added = |content: &str, id: u32| {
            json!({"id": id, "content": content, "single_word": false, "lstrip": false,
                   "rstrip": false, "normalized": true, "special": true})
        };
        let spec = json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": [added(&bos, bos_id), added(&eos, eos_id)],
            "normalizer": {"type": "Sequence", "normalizers": [
                {"type": "NFC"},
                {"type": "Replace", "pattern": {"Regex": r"\s+"}, "content": " "},
                {"type": "Lowercase"}
            ]},
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": CLIP_SPLIT}, "behavior": "Removed", "invert": true},
                {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true}
            ]},
            "post_processor": null,
            "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
            "model": {"type": "BPE", "dropout": null, "unk_token": unk, "continuing_subword_prefix": "",
                      "end_of_word_suffix": "</w>", "fuse_unk": false, "byte_fallback": false,
                      "vocab": vocab, "merges": merges}
        });
        let tokenizer = <Tokenizer as std::str::FromStr>::from_str(&spec.to_string())
            .map_err(|e| anyhow::anyhow!("cannot build the CLIP tokenizer from {}: {e}", dir.display()))?;
        Ok(Self { tokenizer, max_length, bos_id, eos_id, pad_id })
    }

    pub fn max_length(&self) -> usize {
        self.max_length
    }

    /// `[bos] tokens [eos] pad...`, exactly `max_length` ids; longer prompts keep their
    /// first `max_length - 2` tokens and a warning says so.
    pub fn encode(&self, prompt: &str) -> Result<TokenizedPrompt> {
        let encoding = self
            .tokenizer
            .encode(prompt, false)
            .map_err(|e| anyhow::anyhow!("cannot tokenize prompt {prompt:?}: {e}"))?;
        let content = encoding.get_ids();
        let room = self.max_length.saturating_sub(2);
        let truncated = content.len() > room;
        if truncated {
            tracing::warn!(
                tokens = content.len() + 2,
                max = self.max_length,
                "prompt is longer than the text encoder's {} tokens; the rest is ignored: {prompt:?}",
                self.max_length
            );
        }
        let mut ids = Vec::with_capacity(self.max_length);
        ids.push(self.bos_id);
        ids.extend_from_slice(&content[..content.len().min(room)]);
        ids.push(self.eos_id);
        ids.resize(self.max_length, self.pad_id);
        Ok(TokenizedPrompt { ids, truncated })
    }
}
