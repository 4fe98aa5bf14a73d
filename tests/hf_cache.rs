//! Hugging Face repo ids resolve through the local cache (HF_HOME) without a network.
//! One test per binary: it sets process-wide environment variables.

mod common;

use std::path::Path;

use candle_core::{DType, Device};
use common::*;
use sdcrossframe::pipeline::{LoraSpec, ModelSpec, Stylizer};

/// Lays out `source` as the snapshot of `repo` in an HF cache rooted at `hub`.
fn cache_repo(hub: &Path, repo: &str, source: &Path) {
    let folder = hub.join(format!("models--{}", repo.replace('/', "--")));
    let revision = "0123456789abcdef0123456789abcdef01234567";
    std::fs::create_dir_all(folder.join("refs")).unwrap();
    std::fs::write(folder.join("refs/main"), revision).unwrap();
    let snapshot = folder.join("snapshots").join(revision);
    std::fs::create_dir_all(&snapshot).unwrap();
    for entry in std::fs::read_dir(source).unwrap() {
        let entry = entry.unwrap();
        std::os::unix::fs::symlink(entry.path(), snapshot.join(entry.file_name())).unwrap();
    }
}

#[test]
fn repo_ids_resolve_through_the_local_cache_offline() {
    let home = std::env::temp_dir().join(format!("sdcrossframe-hf-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&home);
    cache_repo(&home.join("hub"), "tiny-org/tiny-sd", &fixtures().join("tiny-sd"));
    cache_repo(&home.join("hub"), "tiny-org/tiny-controlnet", &fixtures().join("tiny-controlnet"));
    cache_repo(&home.join("hub"), "tiny-org/tiny-taesd", &fixtures().join("tiny-taesd"));
    // SAFETY: this binary's only test; nothing else reads the environment concurrently.
    unsafe {
        std::env::set_var("HF_HOME", &home);
        std::env::set_var("HF_HUB_OFFLINE", "1");
    }
    let spec = ModelSpec {
        model: "tiny-org/tiny-sd".into(),
        controlnet: "tiny-org/tiny-controlnet".into(),
        variant: None,
        loras: Vec::new(),
        vae: None,
        tokenizer: None,
    };
    let stylizer = Stylizer::load(&spec, &Device::Cpu, DType::F32);
    assert!(stylizer.is_ok(), "{:#}", stylizer.err().unwrap());
    // A `vae` repo id resolves like the model's.
    let with_vae = ModelSpec { vae: Some("tiny-org/tiny-taesd".into()), ..spec.clone() };
    let stylizer = Stylizer::load(&with_vae, &Device::Cpu, DType::F32);
    assert!(stylizer.is_ok(), "{:#}", stylizer.err().unwrap());
    let absent_vae = ModelSpec { vae: Some("tiny-org/absent-vae".into()), ..spec.clone() };
    let err = format!("{:#}", Stylizer::load(&absent_vae, &Device::Cpu, DType::F32).err().unwrap());
    assert!(err.contains("cannot load the VAE tiny-org/absent-vae") && err.contains("config.json"), "{err}");

    // A repo that is not cached names the repo, the file and why nothing was downloaded.
    let missing = ModelSpec { model: "tiny-org/absent".into(), ..spec.clone() };
    let err = format!("{:#}", Stylizer::load(&missing, &Device::Cpu, DType::F32).err().unwrap());
    assert!(
        err.contains("tiny-org/absent") && err.contains("model_index.json") && err.contains("HF_HUB_OFFLINE"),
        "{err}"
    );

    // A LoRA repo id resolves to the repo's pytorch_lora_weights.safetensors.
    let lora_repo = home.join("lora-repo");
    std::fs::create_dir_all(&lora_repo).unwrap();
    std::os::unix::fs::symlink(
        fixtures().join("lora/kohya.safetensors"),
        lora_repo.join("pytorch_lora_weights.safetensors"),
    )
    .unwrap();
    cache_repo(&home.join("hub"), "tiny-org/tiny-lora", &lora_repo);
    let with_lora = ModelSpec { loras: vec![LoraSpec::parse("tiny-org/tiny-lora:0.5").unwrap()], ..spec.clone() };
    let stylizer = Stylizer::load(&with_lora, &Device::Cpu, DType::F32);
    assert!(stylizer.is_ok(), "{:#}", stylizer.err().unwrap());
    let absent = ModelSpec { loras: vec![LoraSpec::parse("tiny-org/no-lora").unwrap()], ..spec.clone() };
    let err = format!("{:#}", Stylizer::load(&absent, &Device::Cpu, DType::F32).err().unwrap());
    assert!(
        err.contains("tiny-org/no-lora")
            && err.contains("pytorch_lora_weights.safetensors")
            && err.contains("HF_HUB_OFFLINE"),
        "{err}"
    );

    // A repo whose tokenizer/ has only tokenizer.json (as transformers 5 saves it) resolves.
    let tokjson = home.join("tokjson-repo");
    std::fs::create_dir_all(&tokjson).unwrap();
    for entry in std::fs::read_dir(fixtures().join("tiny-sd")).unwrap() {
        let entry = entry.unwrap();
        let target = if entry.file_name() == "tokenizer" { fixtures().join("tokenizer-json") } else { entry.path() };
        std::os::unix::fs::symlink(target, tokjson.join(entry.file_name())).unwrap();
    }
    cache_repo(&home.join("hub"), "tiny-org/tiny-sd-tokjson", &tokjson);
    let with_json = ModelSpec { model: "tiny-org/tiny-sd-tokjson".into(), ..spec.clone() };
    let stylizer = Stylizer::load(&with_json, &Device::Cpu, DType::F32);
    assert!(stylizer.is_ok(), "{:#}", stylizer.err().unwrap());

    // A single-file checkpoint holds no tokenizer: with none cached, the error says where it
    // looked and how to get one.
    let checkpoint = single_file::write_layout("checkpoint", &home, &Default::default());
    let from_file = ModelSpec { model: checkpoint.display().to_string(), ..spec.clone() };
    let err = format!("{:#}", Stylizer::load(&from_file, &Device::Cpu, DType::F32).err().unwrap());
    for part in [
        checkpoint.display().to_string().as_str(),
        "holds no tokenizer",
        "openai/clip-vit-large-patch14",
        "stable-diffusion-v1-5/stable-diffusion-v1-5 (tokenizer/)",
        home.join("hub").display().to_string().as_str(),
        "HF_HUB_OFFLINE",
        "hf download openai/clip-vit-large-patch14 vocab.json merges.txt",
        "--tokenizer DIR",
    ] {
        assert!(err.contains(part), "{part:?} missing from: {err}");
    }
    // A `tokenizer` repo id: the files in its tokenizer/ (a pipeline repo) or at its root.
    let with_repo = ModelSpec { tokenizer: Some("tiny-org/tiny-sd".into()), ..from_file.clone() };
    let stylizer = Stylizer::load(&with_repo, &Device::Cpu, DType::F32);
    assert!(stylizer.is_ok(), "{:#}", stylizer.err().unwrap());
    // An SD1.5 pipeline's tokenizer/ in the cache, then CLIP's own repo.
    cache_repo(&home.join("hub"), "stable-diffusion-v1-5/stable-diffusion-v1-5", &fixtures().join("tiny-sd"));
    let stylizer = Stylizer::load(&from_file, &Device::Cpu, DType::F32);
    assert!(stylizer.is_ok(), "{:#}", stylizer.err().unwrap());
    cache_repo(&home.join("hub"), "openai/clip-vit-large-patch14", &fixtures().join("tokenizer-json"));
    let stylizer = Stylizer::load(&from_file, &Device::Cpu, DType::F32);
    assert!(stylizer.is_ok(), "{:#}", stylizer.err().unwrap());
    std::fs::remove_dir_all(&home).ok();
}
