//! A `tokenizer/` holding only `tokenizer.json` (as transformers 5 saves it; fixture
//! tests/fixtures/tokenizer-json from tests/reference/make_tokenizer_json_fixture.py) gives
//! the same ids as `vocab.json` + `merges.txt` and as transformers' CLIPTokenizer (tokens.json),
//! and a model directory with it loads.

mod common;

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use common::*;
use sdcrossframe::pipeline::{ModelSpec, Stylizer};
use sdcrossframe::tokenizer::{ClipTokenizer, TextCleanup};

fn json_dir() -> PathBuf {
    fixtures().join("tokenizer-json")
}

fn vocab_dir() -> PathBuf {
    fixtures().join("tiny-sd/tokenizer")
}

/// A fresh, empty directory under the system temp dir.
fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("sdcrossframe-tokjson-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A copy of tokenizer-json/ in `dir` with `edit` applied to the parsed tokenizer.json.
fn edited_json_dir(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let mut file: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(json_dir().join("tokenizer.json")).unwrap()).unwrap();
    edit(&mut file);
    std::fs::write(dir.join("tokenizer.json"), file.to_string()).unwrap();
    std::fs::copy(json_dir().join("tokenizer_config.json"), dir.join("tokenizer_config.json")).unwrap();
}

/// tokens.json's prompts and ids, plus prompts where the special tokens' `normalized` flags,
/// the final sigma and format characters matter.
fn prompts() -> Vec<(String, Vec<u32>)> {
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("reference/tokens.json")).unwrap()).unwrap();
    let cases = json["cases"].as_array().unwrap();
    assert!(cases.len() >= 60);
    cases
        .iter()
        .map(|c| {
            let ids = c["ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
            (c["prompt"].as_str().unwrap().to_string(), ids)
        })
        .collect()
}

const EXTRA: [&str; 6] = [
    "ΟΔΥΣΣΕΥΣ",
    "a <|ENDOFTEXT|> b",
    "<|STARTOFTEXT|> x",
    ")<|ENDOFTEXT|>",
    "x<|endoftext|>y",
    "soft\u{ad}hyphen \u{feff}bom",
];

#[test]
fn tokenizer_json_ids_match_transformers_and_vocab_merges_on_every_prompt() {
    for cleanup in [TextCleanup::Transformers4, TextCleanup::Transformers5] {
        let from_json = ClipTokenizer::from_dir_with(&json_dir(), cleanup).unwrap();
        let from_vocab = ClipTokenizer::from_dir_with(&vocab_dir(), cleanup).unwrap();
        let mut differ = Vec::new();
        for prompt in prompts().iter().map(|(p, _)| p.as_str()).chain(EXTRA) {
            let (a, b) = (from_json.encode(prompt).unwrap(), from_vocab.encode(prompt).unwrap());
            if a != b {
                differ.push(format!("{prompt:?}\n  tokenizer.json: {:?}\n  vocab.json:     {:?}", a.ids, b.ids));
            }
        }
        assert!(differ.is_empty(), "{cleanup:?}: {} prompts differ:\n{}", differ.len(), differ.join("\n"));
    }
    // tokens.json was made with transformers 5.
    let from_json = ClipTokenizer::from_dir_with(&json_dir(), TextCleanup::Transformers5).unwrap();
    for (prompt, want) in prompts() {
        assert_eq!(from_json.encode(&prompt).unwrap().ids, want, "{prompt:?}");
    }
}

/// The file's own pipeline (normalizer, pre-tokenizer, added tokens), read natively by the
/// tokenizers crate, agrees with ours on every prompt: nothing in it changes ids.
#[test]
fn the_files_own_pipeline_agrees_with_clips_rules() {
    let native = tokenizers::Tokenizer::from_file(json_dir().join("tokenizer.json")).unwrap();
    let ours = ClipTokenizer::from_dir_with(&json_dir(), TextCleanup::Transformers5).unwrap();
    for prompt in prompts().iter().map(|(p, _)| p.as_str()).chain(EXTRA) {
        let mut ids = vec![49406];
        ids.extend(native.encode(prompt, false).unwrap().get_ids().iter().take(75));
        ids.push(49407);
        ids.resize(77, 49407);
        assert_eq!(ours.encode(prompt).unwrap().ids, ids, "{prompt:?}");
    }
}

/// The ids come from the file's vocabulary and merges (change them and the ids change), while
/// a normalizer that is not CLIP's is ignored (its Lowercase removed: ids stay CLIP's).
#[test]
fn vocabulary_comes_from_the_file_and_a_foreign_normalizer_is_ignored() {
    let prompt = "A Beautiful Woman with red hair";
    let want = ClipTokenizer::from_dir_with(&json_dir(), TextCleanup::Transformers5).unwrap().encode(prompt).unwrap();

    let dir = scratch("swapped");
    edited_json_dir(&dir, |file| {
        let vocab = file["model"]["vocab"].as_object_mut().unwrap();
        let (woman, red) = (vocab["woman</w>"].clone(), vocab["red</w>"].clone());
        vocab.insert("woman</w>".into(), red);
        vocab.insert("red</w>".into(), woman);
    });
    for cleanup in [TextCleanup::Transformers4, TextCleanup::Transformers5] {
        let got = ClipTokenizer::from_dir_with(&dir, cleanup).unwrap().encode(prompt).unwrap();
        let (w, r) =
            (want.ids.iter().position(|&i| i == 2308).unwrap(), want.ids.iter().position(|&i| i == 736).unwrap());
        assert_eq!((got.ids[w], got.ids[r]), (736, 2308), "{cleanup:?}: {:?}", got.ids);
    }

    let dir = scratch("normalizer");
    edited_json_dir(&dir, |file| {
        file["normalizer"]["normalizers"].as_array_mut().unwrap().pop();
    });
    let native = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json")).unwrap();
    let native_ids = native.encode(prompt, false).unwrap().get_ids().to_vec();
    assert_ne!(&native_ids[..], &want.ids[1..1 + native_ids.len().min(75)], "without Lowercase the file's ids differ");
    let got = ClipTokenizer::from_dir_with(&dir, TextCleanup::Transformers5).unwrap().encode(prompt).unwrap();
    assert_eq!(got, want);
}

#[test]
fn a_model_whose_tokenizer_has_only_tokenizer_json_loads() {
    let model = scratch("model");
    for entry in std::fs::read_dir(fixtures().join("tiny-sd")).unwrap() {
        let entry = entry.unwrap();
        if entry.file_name() != "tokenizer" {
            std::os::unix::fs::symlink(entry.path(), model.join(entry.file_name())).unwrap();
        }
    }
    std::fs::create_dir(model.join("tokenizer")).unwrap();
    for name in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(json_dir().join(name), model.join("tokenizer").join(name)).unwrap();
    }
    let spec = ModelSpec { model: model.display().to_string(), ..tiny_spec() };
    let stylizer = Stylizer::load(&spec, &Device::Cpu, DType::F32);
    assert!(stylizer.is_ok(), "{:#}", stylizer.err().unwrap());

    // Without either tokenizer layout the error names both.
    std::fs::remove_file(model.join("tokenizer/tokenizer.json")).unwrap();
    let err = format!("{:#}", Stylizer::load(&spec, &Device::Cpu, DType::F32).err().unwrap());
    assert!(err.contains("tokenizer.json") && err.contains("vocab.json") && err.contains("merges.txt"), "{err}");
    std::fs::remove_dir_all(&model).ok();
}

#[test]
fn a_mangled_tokenizer_json_is_named() {
    let dir = scratch("mangled");
    let text = std::fs::read_to_string(json_dir().join("tokenizer.json")).unwrap();
    std::fs::write(dir.join("tokenizer.json"), &text[..text.len() / 2]).unwrap();
    let err = format!("{:#}", ClipTokenizer::from_dir(&dir).err().unwrap());
    assert!(err.contains(&dir.join("tokenizer.json").display().to_string()) && err.contains("invalid JSON"), "{err}");

    edited_json_dir(&dir, |file| file["model"]["merges"][3] = serde_json::json!(["a", "b", "c"]));
    let err = format!("{:#}", ClipTokenizer::from_dir(&dir).err().unwrap());
    assert!(err.contains("tokenizer.json") && err.contains("model.merges[3]"), "{err}");

    edited_json_dir(&dir, |file| file["model"]["type"] = "WordPiece".into());
    let err = format!("{:#}", ClipTokenizer::from_dir(&dir).err().unwrap());
    assert!(err.contains("tokenizer.json") && err.contains("WordPiece"), "{err}");
    std::fs::remove_dir_all(&dir).ok();
}
