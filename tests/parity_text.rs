//! CLIP tokenizer ids identical to transformers' CLIPTokenizer on the 70 prompts of
//! tokens.json (made with transformers 5) and, in the default transformers-4 mode, to the
//! Python CLIPTokenizer of transformers 4.57.6 (ids below); the text encoder against
//! transformers' CLIPTextModel (f16 weights loaded as f32).
//!
//! The transformers-4 ids in this file come from
//! `CLIPTokenizer.from_pretrained("tests/fixtures/tiny-sd/tokenizer")(p, padding="max_length",
//! max_length=77, truncation=True).input_ids` under transformers 4.57.6 without ftfy (Python
//! 3.11, Unicode 14); the transformers-5 ones from the same call under transformers 5.24.0.
//! Only the ids up to the first eos are written; the rest is padding.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use sdcrossframe::models::clip::{ClipTextConfig, ClipTextModel};
use sdcrossframe::tokenizer::{ClipTokenizer, TextCleanup};
use sdcrossframe::weights::ComponentFiles;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn tokenizer_dir() -> PathBuf {
    fixtures().join("tiny-sd/tokenizer")
}

#[derive(serde::Deserialize)]
struct Case {
    prompt: String,
    ids: Vec<u32>,
    truncated: bool,
}

fn fixture_cases() -> Vec<Case> {
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("reference/tokens.json")).unwrap()).unwrap();
    let cases: Vec<Case> = serde_json::from_value(json["cases"].clone()).unwrap();
    assert!(cases.len() >= 60);
    assert!(cases.iter().any(|c| c.truncated), "fixtures must include an over-long prompt");
    cases
}

/// `ids` (bos ... eos) padded to 77 with `pad`.
fn padded(ids: &[u32], pad: u32) -> Vec<u32> {
    let mut ids = ids.to_vec();
    ids.resize(77, pad);
    ids
}

/// Compares every case, collecting all mismatches with their prompts.
fn check(tokenizer: &ClipTokenizer, cases: &[(String, Vec<u32>, bool)]) {
    let mut mismatches = Vec::new();
    for (prompt, want, truncated) in cases {
        let got = tokenizer.encode(prompt).unwrap();
        assert_eq!(got.ids.len(), 77);
        if &got.ids != want || got.truncated != *truncated {
            mismatches.push(format!(
                "{prompt:?}\n  ours:   {:?} (truncated {})\n  theirs: {:?} (truncated {truncated})",
                got.ids, got.truncated, want
            ));
        }
    }
    assert!(
        mismatches.is_empty(),
        "{:?}: {} of {} prompts differ:\n{}",
        tokenizer.cleanup(),
        mismatches.len(),
        cases.len(),
        mismatches.join("\n")
    );
}

/// Prompts of tokens.json on which transformers 4's Python tokenizer differs from
/// transformers 5's: control/format characters are dropped and CJK ideographs become words.
const TRANSFORMERS4_ON_FIXTURE: &[(&str, &[u32])] = &[
    ("东京的夜景", &[49406, 19759, 506, 21078, 361, 163, 248, 482, 23170, 506, 48132, 363, 49407]),
    (
        "日本語のテキスト, カタカナ",
        &[
            49406, 37156, 19277, 361, 34002, 508, 21575, 2429, 228, 47121, 32421, 486, 267, 37367, 34941, 37367, 2429,
            488, 49407,
        ],
    ),
    ("👩\u{200d}🎤 rock star emoji", &[49406, 18800, 15690, 2172, 1565, 16327, 49407]),
    ("zero\u{200b}width space", &[49406, 14867, 23571, 2138, 49407]),
    ("control\u{7}char", &[49406, 9963, 16017, 49407]),
];

#[test]
fn token_ids_match_transformers5_on_every_fixture_prompt() {
    let tokenizer = ClipTokenizer::from_dir_with(&tokenizer_dir(), TextCleanup::Transformers5).unwrap();
    let cases: Vec<_> = fixture_cases().into_iter().map(|c| (c.prompt, c.ids, c.truncated)).collect();
    check(&tokenizer, &cases);
}

#[test]
fn token_ids_match_transformers4_on_every_fixture_prompt() {
    let tokenizer = ClipTokenizer::from_dir(&tokenizer_dir()).unwrap();
    assert_eq!(tokenizer.cleanup(), TextCleanup::Transformers4);
    let mut cases: Vec<_> = fixture_cases().into_iter().map(|c| (c.prompt, c.ids, c.truncated)).collect();
    for (prompt, ids) in TRANSFORMERS4_ON_FIXTURE {
        let case = cases.iter_mut().find(|c| c.0 == *prompt).unwrap_or_else(|| panic!("{prompt:?} not in tokens.json"));
        let want = padded(ids, 49407);
        assert_ne!(case.1, want, "{prompt:?}: the two transformers agree here, drop it from the table");
        case.1 = want;
    }
    check(&tokenizer, &cases);
}

#[test]
fn final_sigma_special_strings_and_format_characters_match_each_transformers() {
    // (prompt, transformers 4.57.6, transformers 5.24.0)
    let table: &[(&str, &[u32], &[u32])] = &[
        (
            // str.lower() writes a final sigma; the per-character lowercase does not.
            "ΟΔΥΣΣΕΥΣ",
            &[49406, 138, 123, 138, 112, 139, 227, 139, 225, 139, 225, 138, 113, 139, 227, 139, 480, 49407],
            &[49406, 138, 123, 138, 112, 139, 227, 139, 225, 139, 225, 138, 113, 139, 227, 139, 481, 49407],
        ),
        // An upper-case special-token string: transformers 4 lower-cases it into the special
        // token unless punctuation glues it to its neighbour; transformers 5 never does.
        (
            "a <|ENDOFTEXT|> b",
            &[49406, 320, 49407, 321, 49407],
            &[49406, 320, 27, 347, 40786, 4160, 91, 285, 321, 49407],
        ),
        (
            ")<|ENDOFTEXT|>",
            &[49406, 8, 27, 347, 40786, 4160, 91, 285, 49407],
            &[49406, 8, 27, 347, 40786, 4160, 91, 285, 49407],
        ),
        ("x<|endoftext|>y", &[49406, 343, 49407, 344, 49407], &[49406, 343, 49407, 344, 49407]),
        (
            "soft\u{ad}hyphen \u{feff}bom",
            &[49406, 1571, 7804, 745, 576, 19469, 49407],
            &[49406, 3773, 22618, 1441, 745, 576, 171, 119, 379, 19469, 49407],
        ),
    ];
    let t4 = ClipTokenizer::from_dir_with(&tokenizer_dir(), TextCleanup::Transformers4).unwrap();
    let t5 = ClipTokenizer::from_dir_with(&tokenizer_dir(), TextCleanup::Transformers5).unwrap();
    let t4_cases: Vec<_> = table.iter().map(|(p, ids, _)| (p.to_string(), padded(ids, 49407), false)).collect();
    let t5_cases: Vec<_> = table.iter().map(|(p, _, ids)| (p.to_string(), padded(ids, 49407), false)).collect();
    check(&t4, &t4_cases);
    check(&t5, &t5_cases);
}

/// SD2's tokenizer pads with "!"; it is a special token, so a "!" in the prompt becomes
/// id 0 without `</w>` in both transformers versions.
#[test]
fn sd2_pad_token_is_matched_as_a_special_token() {
    let dir = std::env::temp_dir().join(format!("sdcrossframe-sd2-tok-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for name in ["vocab.json", "merges.txt"] {
        std::fs::copy(tokenizer_dir().join(name), dir.join(name)).unwrap();
    }
    for name in ["tokenizer_config.json", "special_tokens_map.json"] {
        let mut config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(tokenizer_dir().join(name)).unwrap()).unwrap();
        config["pad_token"] = "!".into();
        std::fs::write(dir.join(name), config.to_string()).unwrap();
    }
    let both: &[(&str, &[u32])] = &[
        ("hello!", &[49406, 3306, 0, 49407]),
        ("wow !!! ok", &[49406, 2781, 0, 0, 0, 2481, 49407]),
        ("a photo", &[49406, 320, 1125, 49407]),
    ];
    for cleanup in [TextCleanup::Transformers4, TextCleanup::Transformers5] {
        let tokenizer = ClipTokenizer::from_dir_with(&dir, cleanup).unwrap();
        let mut cases: Vec<_> = both.iter().map(|(p, ids)| (p.to_string(), padded(ids, 0), false)).collect();
        // With "!" as pad, transformers 5 matches "<|endoftext|>" after lowercasing.
        let upper: &[u32] = match cleanup {
            TextCleanup::Transformers4 => &[49406, 8, 27, 347, 40786, 4160, 91, 285, 49407],
            TextCleanup::Transformers5 => &[49406, 264, 49407, 49407],
        };
        cases.push((")<|ENDOFTEXT|>".into(), padded(upper, 0), false));
        check(&tokenizer, &cases);
    }
    std::fs::remove_dir_all(&dir).ok();
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
    assert_eq!(got.dims(), want.dims());
    let max = |t: &Tensor| t.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
    let err = max(&(&got - want).unwrap()) / max(want);
    println!("text encoder: relative error {err:.2e}");
    assert!(err < 1e-4, "text embeddings off by {err}");
}

#[test]
fn missing_or_garbled_tokenizer_files_are_named() {
    let dir = std::env::temp_dir().join(format!("sdcrossframe-tok-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let err = format!("{:#}", ClipTokenizer::from_dir(&dir).err().expect("no vocab must fail"));
    assert!(err.contains("vocab.json") && err.contains("merges.txt") && err.contains("tokenizer.json"), "{err}");

    std::fs::write(dir.join("vocab.json"), "{not json").unwrap();
    std::fs::write(dir.join("merges.txt"), "#version: 0.2\na b\n").unwrap();
    let err = format!("{:#}", ClipTokenizer::from_dir(&dir).err().expect("bad vocab must fail"));
    assert!(err.contains("vocab.json") && err.contains("invalid JSON"), "{err}");

    std::fs::copy(tokenizer_dir().join("vocab.json"), dir.join("vocab.json")).unwrap();
    std::fs::remove_file(dir.join("merges.txt")).unwrap();
    let err = format!("{:#}", ClipTokenizer::from_dir(&dir).err().expect("no merges must fail"));
    assert!(err.contains("merges.txt"), "{err}");

    std::fs::write(dir.join("merges.txt"), "#version: 0.2\na b c\n").unwrap();
    let err = format!("{:#}", ClipTokenizer::from_dir(&dir).err().expect("bad merges must fail"));
    assert!(err.contains("merges.txt") && err.contains("malformed"), "{err}");

    std::fs::write(dir.join("merges.txt"), "#version: 0.2\ni n\n").unwrap();
    std::fs::write(dir.join("special_tokens_map.json"), r#"{"pad_token": "<|no such token|>"}"#).unwrap();
    let err = format!("{:#}", ClipTokenizer::from_dir(&dir).err().expect("unknown pad must fail"));
    assert!(err.contains("<|no such token|>") && err.contains("vocab.json"), "{err}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn text_encoder_rejects_long_inputs_and_unknown_activations() {
    let files = ComponentFiles::locate(&fixtures().join("tiny-sd/text_encoder"), None).unwrap();
    let config: ClipTextConfig = files.read_config().unwrap();
    let model = ClipTextModel::new(files.var_builder(DType::F32, &Device::Cpu).unwrap(), &config).unwrap();
    let ids = Tensor::zeros((1, config.max_position_embeddings + 1), DType::U32, &Device::Cpu).unwrap();
    let err = model.forward(&ids).unwrap_err().to_string();
    assert!(err.contains(&format!("{} tokens", config.max_position_embeddings + 1)), "{err}");

    let mut config = config;
    config.hidden_act = "swish".into();
    let err = ClipTextModel::new(files.var_builder(DType::F32, &Device::Cpu).unwrap(), &config).err().unwrap();
    assert!(err.to_string().contains("swish"), "{err}");
}
