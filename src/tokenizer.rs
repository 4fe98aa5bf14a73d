//! The CLIP BPE tokenizer, built with the `tokenizers` crate from a diffusers `tokenizer/`
//! directory (the BPE vocabulary and merges from `tokenizer.json` when it is there, as
//! transformers 5 saves it, else from `vocab.json` + `merges.txt`; special tokens and
//! `model_max_length` from `tokenizer_config.json` / `special_tokens_map.json`), padded and
//! truncated to `model_max_length` like diffusers.
//!
//! Either source feeds the same CLIP normalization and pre-tokenization (ours, below), so both
//! give identical ids; a `tokenizer.json` whose own normalizer or pre-tokenizer differs from
//! CLIP's is still tokenized by CLIP's rules, with a warning.
//!
//! transformers has had two CLIP tokenizers and they disagree on some text (control and
//! format characters, CJK ideographs, an upper-case final sigma, upper-case special-token
//! strings); [`TextCleanup`] picks which one the ids reproduce exactly. Both split on CLIP's
//! regex and run byte-level BPE with the `</w>` end-of-word suffix.

use std::path::Path;

use anyhow::{Context, Result, bail};
use regex::Regex;
use serde_json::{Value, json};
use tokenizers::{Model, NormalizedString, Tokenizer};
use unicode_general_category::{GeneralCategory, get_general_category};

/// CLIP's pre-tokenization pattern (transformers' `CLIPTokenizer`).
const CLIP_SPLIT: &str = r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";

/// The merges the Python `CLIPTokenizer` reads from `merges.txt` (`49152 - 256 - 2`); it
/// ignores any further lines.
const CLIP_MERGES: usize = 49152 - 256 - 2;

/// Pieces the Python `CLIPTokenizer`'s BPE cache maps to themselves (so to their vocab ids),
/// whatever the configured special tokens are.
const BPE_CACHED: [&str; 2] = ["<|startoftext|>", "<|endoftext|>"];

/// Which transformers `CLIPTokenizer` the ids reproduce.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TextCleanup {
    /// transformers 4's Python `CLIPTokenizer` without `ftfy` (what diffusers loads for SD
    /// checkpoints under transformers 4): special-token strings are split off the raw text
    /// (case-sensitive), then BERT's `BasicTokenizer` cleanup (control, format, private-use and
    /// unassigned characters dropped, other whitespace to spaces, a space around every CJK
    /// ideograph), NFC, and each word lower-cased with Unicode's final-sigma rule.
    #[default]
    Transformers4,
    /// transformers 5's `CLIPTokenizer` (tokenizers-backed; transformers 5 has no Python one):
    /// NFC, every whitespace run to one space, per-character lowercase; nothing is dropped.
    Transformers5,
}

/// A prompt as token ids, exactly `max_length` long.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenizedPrompt {
    pub ids: Vec<u32>,
    /// Whether the prompt was longer than `max_length` and lost its tail.
    pub truncated: bool,
}

pub struct ClipTokenizer {
    /// The whole transformers 5 pipeline; for [`TextCleanup::Transformers4`] only its BPE model
    /// is used.
    tokenizer: Tokenizer,
    cleanup: TextCleanup,
    /// Special-token strings and ids, split off the raw text (Transformers4).
    specials: Vec<(String, u32)>,
    /// `BPE_CACHED` pieces present in the vocabulary.
    cached: Vec<(&'static str, u32)>,
    pieces: Regex,
    byte_chars: [char; 256],
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

/// Whether transformers 5 matches a special token after normalization: an AddedToken
/// object's `normalized` (false when absent, as for every special token), false for a
/// plain string.
fn token_normalized(value: Option<&Value>) -> Option<bool> {
    match value? {
        Value::String(_) => Some(false),
        Value::Object(map) => Some(map.get("normalized").and_then(Value::as_bool).unwrap_or(false)),
        _ => None,
    }
}

fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("invalid JSON in {}", path.display()))
}

/// GPT-2's reversible byte-to-character table (`bytes_to_unicode`).
fn byte_chars() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut next = 256u32;
    for byte in 0..=255u8 {
        let printable = matches!(byte, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
        table[byte as usize] = if printable {
            char::from(byte)
        } else {
            next += 1;
            char::from_u32(next - 1).expect("below the surrogates")
        };
    }
    table
}

/// transformers' `_is_chinese_char` (BERT's CJK ranges; Hangul, kana and CJK punctuation are
/// not in them).
fn is_cjk_ideograph(c: char) -> bool {
    matches!(
        c as u32,
        0x4E00..=0x9FFF
            | 0x3400..=0x4DBF
            | 0x20000..=0x2A6DF
            | 0x2A700..=0x2B73F
            | 0x2B740..=0x2B81F
            | 0x2B820..=0x2CEAF
            | 0xF900..=0xFAFF
            | 0x2F800..=0x2FA1F
    )
}

/// What transformers 4's CLIPTokenizer hands its regex without ftfy:
/// `" ".join(BasicTokenizer(strip_accents=False, do_split_on_punc=False).tokenize(text))`.
fn basic_tokenizer_text(text: &str) -> String {
    let mut cleaned = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        match c {
            '\0' | '\u{FFFD}' => {}
            ' ' | '\t' | '\n' | '\r' => cleaned.push(' '),
            _ => match get_general_category(c) {
                // Python's `unicodedata.category(c).startswith("C")`.
                GeneralCategory::Control
                | GeneralCategory::Format
                | GeneralCategory::PrivateUse
                | GeneralCategory::Surrogate
                | GeneralCategory::Unassigned => {}
                GeneralCategory::SpaceSeparator => cleaned.push(' '),
                _ if is_cjk_ideograph(c) => {
                    cleaned.push(' ');
                    cleaned.push(c);
                    cleaned.push(' ');
                }
                _ => cleaned.push(c),
            },
        }
    }
    let mut normalized = NormalizedString::from(cleaned);
    normalized.nfc();
    // Python's str.split() and Rust's split_whitespace agree on everything left after cleaning
    // (spaces, U+2028, U+2029); str::to_lowercase applies the final-sigma rule as str.lower() does.
    normalized.get().split_whitespace().map(str::to_lowercase).collect::<Vec<_>>().join(" ")
}

/// transformers 5's CLIP normalizer: NFC, whitespace runs to one space, lowercase.
fn clip_normalizer() -> Value {
    json!({"type": "Sequence", "normalizers": [
        {"type": "NFC"},
        {"type": "Replace", "pattern": {"Regex": r"\s+"}, "content": " "},
        {"type": "Lowercase"}
    ]})
}

/// transformers 5's CLIP pre-tokenizer: CLIP's regex, then GPT-2's byte-level mapping.
fn clip_pre_tokenizer() -> Value {
    json!({"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": CLIP_SPLIT}, "behavior": "Removed", "invert": true},
        {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true}
    ]})
}

/// The BPE model of a `tokenizer/` directory, from either file layout.
struct BpeSource {
    /// The file the vocabulary came from (for errors).
    origin: std::path::PathBuf,
    /// token -> id (a JSON object).
    vocab: Value,
    /// "left right" merge rules, in priority order.
    merges: Vec<String>,
    /// (content, normalized) of tokenizer.json's added tokens; empty for vocab.json.
    normalized: Vec<(String, bool)>,
}

impl BpeSource {
    fn read(dir: &Path) -> Result<Self> {
        let json_path = dir.join("tokenizer.json");
        let vocab_path = dir.join("vocab.json");
        let merges_path = dir.join("merges.txt");
        if json_path.is_file() {
            Self::from_tokenizer_json(&json_path)
        } else if vocab_path.exists() || merges_path.exists() {
            Self::from_vocab_merges(&vocab_path, &merges_path)
        } else {
            bail!("{} has no tokenizer: it needs tokenizer.json, or vocab.json and merges.txt", dir.display())
        }
    }

    fn from_vocab_merges(vocab_path: &Path, merges_path: &Path) -> Result<Self> {
        let vocab = read_json(vocab_path)?;
        if !vocab.is_object() {
            bail!("{} is not a JSON object of token -> id", vocab_path.display());
        }
        let merges_text =
            std::fs::read_to_string(merges_path).with_context(|| format!("cannot read {}", merges_path.display()))?;
        let merges: Vec<String> = merges_text
            .lines()
            .filter(|line| !line.starts_with("#version") && !line.trim().is_empty())
            .map(str::to_string)
            .collect();
        if let Some(bad) = merges.iter().find(|m| m.split(' ').count() != 2) {
            bail!("{} has a malformed merge line {bad:?}", merges_path.display());
        }
        Ok(Self { origin: vocab_path.to_path_buf(), vocab, merges, normalized: Vec::new() })
    }

    /// The `model` of a tokenizers-crate `tokenizer.json` (a byte-level BPE with CLIP's `</w>`
    /// suffix) and its added tokens' `normalized` flags.
    fn from_tokenizer_json(path: &Path) -> Result<Self> {
        let mut file = read_json(path)?;
        let shown = path.display();
        let model = file.get_mut("model").map(Value::take).with_context(|| format!("{shown} has no \"model\""))?;
        let kind = model.get("type").and_then(Value::as_str).unwrap_or("BPE");
        if kind != "BPE" {
            bail!("{shown}: the model is {kind}, not CLIP's BPE");
        }
        let suffix = model.get("end_of_word_suffix").and_then(Value::as_str).unwrap_or("");
        if suffix != "</w>" {
            bail!("{shown}: the BPE end_of_word_suffix is {suffix:?}, not CLIP's \"</w>\"");
        }
        let Some(vocab) = model.get("vocab").filter(|v| v.is_object()).cloned() else {
            bail!("{shown}: model.vocab is missing or not a JSON object of token -> id");
        };
        let Some(Value::Array(rules)) = model.get("merges") else {
            bail!("{shown}: model.merges is missing or not a list");
        };
        // Older tokenizers write "left right"; newer ones ["left", "right"].
        let merges = rules
            .iter()
            .map(|rule| match rule {
                Value::String(s) if s.split(' ').count() == 2 => Some(s.clone()),
                Value::Array(pair) => match pair.as_slice() {
                    [Value::String(a), Value::String(b)] => Some(format!("{a} {b}")),
                    _ => None,
                },
                _ => None,
            })
            .enumerate()
            .map(|(i, m)| {
                m.with_context(|| format!("{shown}: model.merges[{i}] is not a pair of tokens: {}", rules[i]))
            })
            .collect::<Result<Vec<_>>>()?;
        let normalized = file
            .get("added_tokens")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|t| {
                Some((t.get("content")?.as_str()?.to_string(), t.get("normalized").and_then(Value::as_bool)?))
            })
            .collect();
        for (part, clip) in [("normalizer", clip_normalizer()), ("pre_tokenizer", clip_pre_tokenizer())] {
            let theirs = file.get(part).unwrap_or(&Value::Null);
            if *theirs != clip {
                tracing::warn!(
                    "{shown}: its {part} is not CLIP's; the prompt is tokenized by CLIP's rules (as \
                     transformers' CLIPTokenizer does), its {part} is ignored: {theirs}"
                );
            }
        }
        Ok(Self { origin: path.to_path_buf(), vocab, merges, normalized })
    }
}

impl ClipTokenizer {
    /// The tokenizer of transformers 4's Python `CLIPTokenizer` ([`TextCleanup::Transformers4`]).
    pub fn from_dir(dir: &Path) -> Result<Self> {
        Self::from_dir_with(dir, TextCleanup::default())
    }

    pub fn from_dir_with(dir: &Path, cleanup: TextCleanup) -> Result<Self> {
        let _span = tracing::info_span!("tokenizer-load", dir = %dir.display(), ?cleanup).entered();
        let BpeSource { origin: vocab_path, vocab, mut merges, normalized: file_normalized } = BpeSource::read(dir)?;
        let Some(vocab_map) = vocab.as_object() else {
            bail!("{} is not a JSON object of token -> id", vocab_path.display());
        };
        if cleanup == TextCleanup::Transformers4 {
            merges.truncate(CLIP_MERGES);
        }

        // Special tokens and length: tokenizer_config.json, overridden by special_tokens_map.json
        // as transformers does.
        let mut config = Value::Object(Default::default());
        for name in ["tokenizer_config.json", "special_tokens_map.json"] {
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
        let unk = token_text(config.get("unk_token")).unwrap_or_else(|| "<|endoftext|>".into());
        let pad = token_text(config.get("pad_token")).unwrap_or_else(|| "<|endoftext|>".into());
        let max_length = config.get("model_max_length").and_then(Value::as_u64).unwrap_or(77) as usize;
        // Some configs store model_max_length as a huge sentinel; CLIP's context is 77.
        let max_length = if max_length > 1_000_000 { 77 } else { max_length };
        if max_length < 2 {
            bail!("model_max_length {max_length} in {} leaves no room for bos and eos", dir.display());
        }
        let id_of = |token: &str| -> Result<u32> {
            vocab_map
                .get(token)
                .and_then(Value::as_u64)
                .map(|id| id as u32)
                .with_context(|| format!("token {token:?} is not in {}", vocab_path.display()))
        };
        let (bos_id, eos_id, pad_id) = (id_of(&bos)?, id_of(&eos)?, id_of(&pad)?);

        // Every special token is an added token (SD2's pad "!" included: a "!" in the prompt
        // becomes the pad id, as in transformers). Later ones win for a shared string.
        let mut specials: Vec<(String, u32, bool)> = Vec::new();
        for (key, text) in [("bos_token", &bos), ("eos_token", &eos), ("unk_token", &unk), ("pad_token", &pad)] {
            // tokenizer.json's own added token (what transformers 5 loads) wins over the config.
            let normalized = file_normalized
                .iter()
                .find(|(content, _)| content == text)
                .map(|&(_, normalized)| normalized)
                .unwrap_or_else(|| token_normalized(config.get(key)).unwrap_or(false));
            let id = id_of(text)?;
            match specials.iter_mut().find(|(s, _, _)| s == text) {
                Some(entry) => entry.2 = normalized,
                None => specials.push((text.clone(), id, normalized)),
            }
        }
        let added_tokens: Vec<Value> = specials
            .iter()
            .map(|(content, id, normalized)| {
                json!({"id": id, "content": content, "single_word": false, "lstrip": false,
                       "rstrip": false, "normalized": normalized, "special": true})
            })
            .collect();
        let spec = json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": added_tokens,
            "normalizer": clip_normalizer(),
            "pre_tokenizer": clip_pre_tokenizer(),
            "post_processor": null,
            "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
            "model": {"type": "BPE", "dropout": null, "unk_token": unk, "continuing_subword_prefix": "",
                      "end_of_word_suffix": "</w>", "fuse_unk": false, "byte_fallback": false,
                      "vocab": vocab, "merges": merges}
        });
        let tokenizer = <Tokenizer as std::str::FromStr>::from_str(&spec.to_string())
            .map_err(|e| anyhow::anyhow!("cannot build the CLIP tokenizer from {}: {e}", dir.display()))?;
        let cached = BPE_CACHED.iter().filter_map(|&piece| Some((piece, id_of(piece).ok()?))).collect();
        let pieces = Regex::new(CLIP_SPLIT).expect("valid pattern");
        Ok(Self {
            tokenizer,
            cleanup,
            specials: specials.into_iter().map(|(s, id, _)| (s, id)).collect(),
            cached,
            pieces,
            byte_chars: byte_chars(),
            max_length,
            bos_id,
            eos_id,
            pad_id,
        })
    }

    pub fn max_length(&self) -> usize {
        self.max_length
    }

    pub fn cleanup(&self) -> TextCleanup {
        self.cleanup
    }

    /// `[bos] tokens [eos] pad...`, exactly `max_length` ids; longer prompts keep their
    /// first `max_length - 2` tokens and a warning says so.
    pub fn encode(&self, prompt: &str) -> Result<TokenizedPrompt> {
        let content = match self.cleanup {
            TextCleanup::Transformers4 => self.transformers4_ids(prompt)?,
            TextCleanup::Transformers5 => self
                .tokenizer
                .encode(prompt, false)
                .map_err(|e| anyhow::anyhow!("cannot tokenize prompt {prompt:?}: {e}"))?
                .get_ids()
                .to_vec(),
        };
        let room = self.max_length - 2;
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

    /// transformers 4's `tokenize`: split the special-token strings off the raw text (leftmost,
    /// then longest), then `_tokenize` each piece in between.
    fn transformers4_ids(&self, prompt: &str) -> Result<Vec<u32>> {
        let mut ids = Vec::new();
        let mut rest = prompt;
        loop {
            let next = self
                .specials
                .iter()
                .filter_map(|(text, id)| rest.find(text.as_str()).map(|at| (at, text.len(), *id)))
                .min_by_key(|&(at, len, _)| (at, std::cmp::Reverse(len)));
            let Some((at, len, id)) = next else {
                self.transformers4_chunk(rest, &mut ids)?;
                return Ok(ids);
            };
            self.transformers4_chunk(&rest[..at], &mut ids)?;
            ids.push(id);
            rest = &rest[at + len..];
        }
    }

    /// transformers 4's `_tokenize` without ftfy.
    fn transformers4_chunk(&self, chunk: &str, ids: &mut Vec<u32>) -> Result<()> {
        if chunk.is_empty() {
            return Ok(());
        }
        let text = basic_tokenizer_text(chunk);
        for piece in self.pieces.find_iter(&text).map(|m| m.as_str()) {
            if let Some(&(_, id)) = self.cached.iter().find(|(cached, _)| *cached == piece) {
                ids.push(id);
                continue;
            }
            let mapped: String = piece.bytes().map(|b| self.byte_chars[b as usize]).collect();
            let tokens = self
                .tokenizer
                .get_model()
                .tokenize(&mapped)
                .map_err(|e| anyhow::anyhow!("cannot tokenize {piece:?}: {e}"))?;
            ids.extend(tokens.iter().map(|t| t.id));
        }
        Ok(())
    }
}
