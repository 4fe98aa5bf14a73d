//! CLIP tokenizer ids identical to transformers' CLIPTokenizer for 70 varied prompts, and
//! the text encoder against transformers' CLIPTextModel (f16 weights loaded as f32).

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use sdcrossframe::models::clip::{ClipTextConfig, ClipTextModel};
use sdcrossframe::tokenizer::ClipTokenizer;
use sdcrossframe::weights::ComponentFiles;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

#[derive(serde::Deserialize)]
struct Case {
    prompt: String,
    ids: Vec<u32>,
    truncated: bool,
}

#[test]
fn token_ids_are_identical_to_transformers() {
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("reference/tokens.json")).unwrap()).unwrap();
    let cases: Vec<Case> = serde_json::from_value(json["cases"].clone()).unwrap();
    assert!(cases.len() >= 50);
    assert!(cases.iter().any(|c| c.truncated), "fixtures must include an over-long prompt");
    let tokenizer = ClipTokenizer::from_dir(&fixtures().join("tiny-sd/tokenizer")).unwrap();
    let mut mismatches = Vec::new();
    for case in &cases {
        let got = tokenizer.encode(&case.prompt).unwrap();
        if got.ids != case.ids || got.truncated != case.truncated {
            mismatches.push(format!(
                "{:?}\n  ours:   {:?} (truncated {})\n  theirs: {:?} (truncated {})",
                case.prompt, got.ids, got.truncated, case.ids, case.truncated
            ));
        }
    }
    assert!(mismatches.is_empty(), "{} of {} prompts differ:\n{}", mismatches.len(), cases.len(), mismatches.join("\n"));
}

#[test]
fn text_embeddings_match_transformers() {
    let reference =
        candle_core::safetensors::load(fixtures().join("reference/text_encoder.safetensors"), &Device::Cpu).unwrap();
    let files = ComponentFiles::locate(&fixtures().join("tiny-sd/text_encoder"), None).unwrap();
    let config: ClipTextConfig = files.read_config().unwrap();
    let model = ClipTextModel::new(files.var_builder(DType::F32, &Device::Cpu).unwrap(), &config).unwrap();
    let got = model.forward(&reference["input_ids"]).unwrap();
    let want = &reference["last_hidden_state"];
    let max = |t: &Tensor| t.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
    let err = max(&(&got - want).unwrap()) / max(want);
    println!("text encoder: relative error {err:.2e}");
    assert!(err < 1e-4, "text embeddings off by {err}");
}

#[test]
fn missing_or_garbled_vocabulary_is_named() {
    let dir = std::env::temp_dir().join(format!("sdcrossframe-tok-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let err = ClipTokenizer::from_dir(&dir).err().expect("no vocab must fail").to_string();
    assert!(err.contains("vocab.json"), "{err}");
    std::fs::write(dir.join("vocab.json"), "{not json").unwrap();
    std::fs::write(dir.join("merges.txt"), "#version: 0.2\na b\n").unwrap();
    let err = format!("{:#}", ClipTokenizer::from_dir(&dir).err().expect("bad vocab must fail"));
    assert!(err.contains("vocab.json") && err.contains("invalid JSON"), "{err}");
    std::fs::remove_dir_all(&dir).ok();
}
