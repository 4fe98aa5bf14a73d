//! Bad input gets an error naming the file and the problem, never a panic.

mod common;

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use common::*;
use sdcrossframe::pipeline::{ModelSpec, Stylizer};

/// A scratch copy of the tiny pipeline whose components can be broken one at a time;
/// untouched components are symlinked.
struct ScratchModel {
    root: PathBuf,
}

impl ScratchModel {
    fn new(tag: &str) -> Self {
        let root = std::env::temp_dir().join(format!("sdcrossframe-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root).unwrap();
        let source = fixtures().join("tiny-sd");
        for entry in std::fs::read_dir(&source).unwrap() {
            let entry = entry.unwrap();
            std::os::unix::fs::symlink(entry.path(), root.join(entry.file_name())).unwrap();
        }
        Self { root }
    }

    /// Replaces a symlinked component by a real copy that can be modified.
    fn own(&self, component: &str) -> PathBuf {
        let dir = self.root.join(component);
        std::fs::remove_file(&dir).unwrap();
        std::fs::create_dir_all(&dir).unwrap();
        for entry in std::fs::read_dir(fixtures().join("tiny-sd").join(component)).unwrap() {
            let entry = entry.unwrap();
            std::fs::copy(entry.path(), dir.join(entry.file_name())).unwrap();
        }
        dir
    }

    fn load(&self) -> String {
        let spec = ModelSpec {
            model: self.root.display().to_string(),
            controlnet: fixtures().join("tiny-controlnet").display().to_string(),
            variant: None,
            loras: Vec::new(),
            vae: None,
            tokenizer: None,
        };
        match Stylizer::load(&spec, &Device::Cpu, DType::F32) {
            Ok(_) => panic!("loading a broken model succeeded"),
            Err(e) => format!("{e:#}"),
        }
    }
}

impl Drop for ScratchModel {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

fn load_error(model: &Path, controlnet: &Path) -> String {
    let spec = ModelSpec {
        model: model.display().to_string(),
        controlnet: controlnet.display().to_string(),
        variant: None,
        loras: Vec::new(),
        vae: None,
        tokenizer: None,
    };
    match Stylizer::load(&spec, &Device::Cpu, DType::F32) {
        Ok(_) => panic!("loading succeeded"),
        Err(e) => format!("{e:#}"),
    }
}

#[test]
fn missing_model_directory_is_named() {
    let missing = fixtures().join("no-such-model");
    let err = load_error(&missing, &fixtures().join("tiny-controlnet"));
    assert!(err.contains("no-such-model") && err.contains("does not exist"), "{err}");
}

#[test]
fn directory_without_model_index_is_not_a_pipeline() {
    // The ControlNet directory is a model directory but not a pipeline.
    let err = load_error(&fixtures().join("tiny-controlnet"), &fixtures().join("tiny-controlnet"));
    assert!(err.contains("model_index.json"), "{err}");
}

/// A model_index.json that is not a JSON object (a list, a string) is refused as a missing
/// one is, naming the file.
#[test]
fn model_index_that_is_not_an_object_is_refused() {
    let scratch = ScratchModel::new("listindex");
    let index = scratch.root.join("model_index.json");
    for (text, kind) in [("[\"StableDiffusionPipeline\"]", "JSON list"), ("\"unet\"", "JSON string")] {
        std::fs::remove_file(&index).unwrap();
        std::fs::write(&index, text).unwrap();
        let err = scratch.load();
        assert!(err.contains("model_index.json") && err.contains(kind) && err.contains("not an object"), "{err}");
        assert!(err.contains("not a diffusers-format Stable Diffusion pipeline directory"), "{err}");
    }
    std::fs::write(&index, "{ not json").unwrap();
    let err = scratch.load();
    assert!(err.contains("model_index.json is not valid JSON"), "{err}");
}

#[test]
fn missing_config_file_is_named() {
    let scratch = ScratchModel::new("noconfig");
    let vae = scratch.own("vae");
    std::fs::remove_file(vae.join("config.json")).unwrap();
    let err = scratch.load();
    assert!(err.contains("vae/config.json") && err.contains("missing"), "{err}");
}

#[test]
fn pickle_weights_are_refused_with_a_safetensors_hint() {
    let scratch = ScratchModel::new("pickle");
    let unet = scratch.own("unet");
    std::fs::rename(unet.join("diffusion_pytorch_model.safetensors"), unet.join("diffusion_pytorch_model.bin"))
        .unwrap();
    let err = scratch.load();
    assert!(err.contains("diffusion_pytorch_model.bin") && err.contains("safetensors"), "{err}");
    assert!(err.contains("pickle"), "{err}");
}

#[test]
fn truncated_safetensors_is_reported_as_truncated() {
    let scratch = ScratchModel::new("truncated");
    let vae = scratch.own("vae");
    let file = vae.join("diffusion_pytorch_model.safetensors");
    let bytes = std::fs::read(&file).unwrap();
    std::fs::write(&file, &bytes[..bytes.len() / 2]).unwrap();
    let err = scratch.load();
    assert!(err.contains("truncated") && err.contains("vae/diffusion_pytorch_model.safetensors"), "{err}");
}

#[test]
fn config_that_does_not_match_the_weights_names_tensor_and_shapes() {
    let scratch = ScratchModel::new("mismatch");
    let unet = scratch.own("unet");
    let path = unet.join("config.json");
    let mut config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    config["in_channels"] = 5.into();
    std::fs::write(&path, config.to_string()).unwrap();
    let err = scratch.load();
    assert!(err.contains("conv_in.weight"), "{err}");
    assert!(err.contains("[32, 5, 3, 3]") && err.contains("[32, 4, 3, 3]"), "{err}");
}

fn vae_load_error(vae: &Path) -> String {
    let spec = ModelSpec { vae: Some(vae.display().to_string()), ..tiny_spec() };
    match Stylizer::load(&spec, &Device::Cpu, DType::F32) {
        Ok(_) => panic!("loading with vae {} succeeded", vae.display()),
        Err(e) => format!("{e:#}"),
    }
}

/// A copy of the tiny TAESD whose config.json is edited by `edit`.
struct ScratchVae {
    dir: PathBuf,
}

impl ScratchVae {
    fn new(tag: &str, edit: impl FnOnce(&mut serde_json::Value)) -> Self {
        let dir = std::env::temp_dir().join(format!("sdcrossframe-vae-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let source = fixtures().join("tiny-taesd");
        std::fs::copy(
            source.join("diffusion_pytorch_model.safetensors"),
            dir.join("diffusion_pytorch_model.safetensors"),
        )
        .unwrap();
        let mut config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(source.join("config.json")).unwrap()).unwrap();
        edit(&mut config);
        std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
        Self { dir }
    }
}

impl Drop for ScratchVae {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn tiny_vae_directory_given_as_model_says_to_pass_it_as_vae() {
    let err = load_error(&fixtures().join("tiny-taesd"), &fixtures().join("tiny-controlnet"));
    assert!(err.contains("tiny-taesd") && err.contains("VAE directory (AutoencoderTiny)"), "{err}");
    assert!(err.contains("--vae") && err.contains("not a Stable Diffusion pipeline"), "{err}");
}

#[test]
fn missing_vae_directory_is_named() {
    let missing = fixtures().join("no-such-vae");
    let err = vae_load_error(&missing);
    assert!(
        err.contains("cannot load the VAE") && err.contains("no-such-vae") && err.contains("does not exist"),
        "{err}"
    );
}

#[test]
fn vae_directory_with_another_class_names_it() {
    let scratch = ScratchVae::new("class", |c| c["_class_name"] = "UNet2DConditionModel".into());
    let err = vae_load_error(&scratch.dir);
    assert!(err.contains("\"UNet2DConditionModel\"") && err.contains("not a VAE"), "{err}");
    assert!(err.contains("AutoencoderKL or AutoencoderTiny") && err.contains("config.json"), "{err}");
    // A model directory that is not a VAE at all (the ControlNet).
    let err = vae_load_error(&fixtures().join("tiny-controlnet"));
    assert!(err.contains("\"ControlNetModel\"") && err.contains("not a VAE"), "{err}");
}

#[test]
fn vae_directory_without_class_name_is_an_error() {
    let scratch = ScratchVae::new("noclass", |c| {
        c.as_object_mut().unwrap().remove("_class_name");
    });
    let err = vae_load_error(&scratch.dir);
    assert!(err.contains("has no _class_name") && err.contains("config.json"), "{err}");
}

#[test]
fn vae_latent_channels_must_match_the_unet() {
    let scratch = ScratchVae::new("channels", |c| c["latent_channels"] = 8.into());
    let err = vae_load_error(&scratch.dir);
    assert!(err.contains("has 8 latent channels") && err.contains("takes 4"), "{err}");
    assert!(err.contains("AutoencoderTiny") && err.contains("unet"), "{err}");
}
