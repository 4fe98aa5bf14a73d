//! LoRA fusion against diffusers (`load_lora_weights` + `fuse_lora(lora_scale)`) on the tiny
//! UNet and text encoder, for the diffusers/PEFT layout (with and without adapter metadata)
//! and the kohya layout at two scales; the `path[:scale]` syntax; bad LoRA files.
//!
//! Fixtures: tests/fixtures/lora/ and tests/fixtures/reference/lora/ (made by
//! tests/reference/make_lora_fixtures.py). Run with `-- --nocapture` to see the errors.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use common::*;
use sdcrossframe::models::attention::NoHook;
use sdcrossframe::models::clip::{ClipTextConfig, ClipTextModel};
use sdcrossframe::models::unet::{UNet2DConditionConfig, UNet2DConditionModel};
use sdcrossframe::pipeline::lora::{LoraSet, LoraTarget};
use sdcrossframe::pipeline::{LoraSpec, ModelParts, ModelSpec, Stylizer};

/// Max abs error relative to the reference's max abs value.
const TOLERANCE: f32 = 1e-4;
const LAYOUTS: [&str; 3] = ["peft", "peft_alpha", "kohya"];
const SCALES: [f64; 2] = [0.5, 1.0];

fn lora_file(layout: &str) -> PathBuf {
    fixtures().join("lora").join(format!("{layout}.safetensors"))
}

fn unet_weights() -> PathBuf {
    fixtures().join("tiny-sd/unet/diffusion_pytorch_model.safetensors")
}

fn text_weights() -> PathBuf {
    fixtures().join("tiny-sd/text_encoder/model.safetensors")
}

fn config<T: serde::de::DeserializeOwned>(path: &str) -> T {
    serde_json::from_str(&std::fs::read_to_string(fixtures().join(path)).unwrap()).unwrap()
}

fn max_abs(t: &Tensor) -> f32 {
    t.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

/// Max abs difference relative to `want`'s max abs value.
fn relative(got: &Tensor, want: &Tensor) -> f32 {
    assert_eq!(got.dims(), want.dims());
    max_abs(&(got - want).unwrap()) / max_abs(want)
}

fn assert_close(what: &str, got: &Tensor, want: &Tensor) {
    let rel = relative(got, want);
    println!("{what}: max abs error relative to max |ref| {rel:.3e}");
    assert!(rel <= TOLERANCE, "{what}: relative error {rel:.3e} > {TOLERANCE:.0e}");
}

fn loras(entries: &[(&Path, f64)]) -> LoraSet {
    let specs: Vec<LoraSpec> =
        entries.iter().map(|(p, s)| LoraSpec { source: p.display().to_string(), scale: *s }).collect();
    LoraSet::load(&specs).unwrap()
}

fn unet_out(set: &LoraSet) -> Tensor {
    let vb = set.var_builder(LoraTarget::Unet, &[unet_weights()], DType::F32, &Device::Cpu).unwrap();
    let unet = UNet2DConditionModel::new(vb, &config::<UNet2DConditionConfig>("tiny-sd/unet/config.json")).unwrap();
    let r = load_tensors(&fixtures().join("reference/unet.safetensors"));
    let timestep = r["timestep"].flatten_all().unwrap().to_vec1::<f32>().unwrap()[0] as f64;
    unet.forward(&r["sample"], timestep, &r["encoder_hidden_states"], None, &mut NoHook).unwrap()
}

fn text_out(set: &LoraSet) -> Tensor {
    let vb = set.var_builder(LoraTarget::TextEncoder, &[text_weights()], DType::F32, &Device::Cpu).unwrap();
    let model = ClipTextModel::new(vb, &config::<ClipTextConfig>("tiny-sd/text_encoder/config.json")).unwrap();
    let r = load_tensors(&fixtures().join("reference/text_encoder.safetensors"));
    model.forward(&r["input_ids"]).unwrap()
}

fn reference(layout: &str, scale: f64) -> HashMap<String, Tensor> {
    load_tensors(&fixtures().join(format!("reference/lora/{layout}_{scale:.1}.safetensors")))
}

fn base_outputs() -> (Tensor, Tensor) {
    let unet = load_tensors(&fixtures().join("reference/unet.safetensors"));
    let text = load_tensors(&fixtures().join("reference/text_encoder.safetensors"));
    (unet["out"].clone(), text["last_hidden_state"].clone())
}

#[test]
fn fused_unet_and_text_encoder_match_diffusers() {
    for layout in LAYOUTS {
        for scale in SCALES {
            let set = loras(&[(&lora_file(layout), scale)]);
            let r = reference(layout, scale);
            assert_close(&format!("{layout} scale {scale} unet"), &unet_out(&set), &r["unet_out"]);
            assert_close(&format!("{layout} scale {scale} text encoder"), &text_out(&set), &r["text_out"]);
        }
    }
}

/// The references differ from each other and from the base model by far more than the
/// tolerance: the scale, the kohya alpha and the adapter metadata's alphas all matter.
#[test]
fn every_fixture_changes_the_output() {
    let (base_unet, base_text) = base_outputs();
    let far = 100.0 * TOLERANCE;
    for layout in LAYOUTS {
        for scale in SCALES {
            let r = reference(layout, scale);
            let (u, t) = (relative(&r["unet_out"], &base_unet), relative(&r["text_out"], &base_text));
            println!("{layout} scale {scale}: unet {u:.3}, text encoder {t:.3} from the base model");
            assert!(u > far && t > far, "{layout} {scale}: unet {u}, text {t}");
        }
        let (half, full) = (reference(layout, 0.5), reference(layout, 1.0));
        assert!(relative(&half["unet_out"], &full["unet_out"]) > far, "{layout}: scale");
        assert!(relative(&half["text_out"], &full["text_out"]) > far, "{layout}: scale");
    }
    for (a, b) in [("peft", "kohya"), ("peft", "peft_alpha"), ("kohya", "peft_alpha")] {
        let (a_ref, b_ref) = (reference(a, 1.0), reference(b, 1.0));
        assert!(relative(&a_ref["unet_out"], &b_ref["unet_out"]) > far, "{a} vs {b}");
    }
}

/// Scale 0 is the base model (and so is no LoRA at all); two files add up.
#[test]
fn scale_zero_is_the_base_model_and_files_add_up() {
    let (base_unet, base_text) = base_outputs();
    let zero = loras(&[(&lora_file("kohya"), 0.0)]);
    assert_close("scale 0 unet", &unet_out(&zero), &base_unet);
    assert_close("scale 0 text encoder", &text_out(&zero), &base_text);
    let none = LoraSet::default();
    assert_close("no LoRA unet", &unet_out(&none), &base_unet);

    // The kohya file is the PEFT file's tensors with alpha 2 at rank 4: kohya at scale 1
    // equals PEFT at 0.5, and PEFT 0.25 + kohya 0.5 equals PEFT at 0.5 too.
    let r = reference("peft", 0.5);
    assert_close("kohya 1.0 = peft 0.5", &unet_out(&loras(&[(&lora_file("kohya"), 1.0)])), &r["unet_out"]);
    let both = loras(&[(&lora_file("peft"), 0.25), (&lora_file("kohya"), 0.5)]);
    assert_close("peft 0.25 + kohya 0.5 unet", &unet_out(&both), &r["unet_out"]);
    assert_close("peft 0.25 + kohya 0.5 text encoder", &text_out(&both), &r["text_out"]);
}

/// The whole loader: `ModelSpec::loras` reaches the UNet and the text encoder, not the
/// ControlNet or the VAE.
#[test]
fn model_spec_loras_are_fused_at_load() {
    let spec = ModelSpec {
        loras: vec![LoraSpec { source: lora_file("kohya").display().to_string(), scale: 0.5 }],
        ..tiny_spec()
    };
    let parts = ModelParts::from_spec(&spec, &Device::Cpu, DType::F32).unwrap();
    let r = reference("kohya", 0.5);
    let unet = UNet2DConditionModel::new(parts.unet.weights, &parts.unet.config).unwrap();
    let u = load_tensors(&fixtures().join("reference/unet.safetensors"));
    let out = unet.forward(&u["sample"], 501.0, &u["encoder_hidden_states"], None, &mut NoHook).unwrap();
    assert_close("from_spec unet", &out, &r["unet_out"]);
    let text = ClipTextModel::new(parts.text_encoder.weights, &parts.text_encoder.config).unwrap();
    let t = load_tensors(&fixtures().join("reference/text_encoder.safetensors"));
    assert_close("from_spec text encoder", &text.forward(&t["input_ids"]).unwrap(), &r["text_out"]);
    assert!(Stylizer::load(&spec, &Device::Cpu, DType::F32).is_ok());
}

#[test]
fn lora_entries_parse() {
    let parse = |s: &str| LoraSpec::parse(s).map(|l| (l.source, l.scale));
    assert_eq!(parse("a.safetensors").unwrap(), ("a.safetensors".into(), 1.0));
    assert_eq!(parse(" a.safetensors:0.8 ").unwrap(), ("a.safetensors".into(), 0.8));
    assert_eq!(parse("dir/a.safetensors:-1.5").unwrap(), ("dir/a.safetensors".into(), -1.5));
    assert_eq!(parse("a.safetensors:0").unwrap(), ("a.safetensors".into(), 0.0));
    // ':' followed by something that is not a number belongs to the path.
    assert_eq!(parse("/data/run:2/lcm.safetensors").unwrap(), ("/data/run:2/lcm.safetensors".into(), 1.0));
    assert_eq!(
        parse("latent-consistency/lcm-lora-sdv1-5:0.9").unwrap(),
        ("latent-consistency/lcm-lora-sdv1-5".into(), 0.9)
    );
    for (bad, expected) in [
        ("", "empty LoRA entry"),
        ("a.safetensors:", "'a.safetensors:' ends with ':' but has no scale"),
        (":0.5", "':0.5' has a scale but no path"),
        ("a.safetensors:nan", "scale nan is not a finite number"),
        ("a.safetensors:inf", "scale inf is not a finite number"),
    ] {
        let err = format!("{:#}", LoraSpec::parse(bad).unwrap_err());
        assert!(err.contains(expected), "{bad:?}: {err}");
    }
    let list = LoraSpec::parse_list("a.safetensors:0.5, owner/name").unwrap();
    assert_eq!(
        list,
        [LoraSpec { source: "a.safetensors".into(), scale: 0.5 }, LoraSpec { source: "owner/name".into(), scale: 1.0 }]
    );
    assert!(LoraSpec::parse_list("  ").unwrap().is_empty());
    let err = format!("{:#}", LoraSpec::parse_list("a.safetensors,,b.safetensors").unwrap_err());
    assert!(err.contains("entry 2 of 'a.safetensors,,b.safetensors'") && err.contains("empty LoRA entry"), "{err}");
    let err = format!("{:#}", LoraSpec::parse_list("a.safetensors, b.safetensors:").unwrap_err());
    assert!(err.contains("entry 2") && err.contains("'b.safetensors:'"), "{err}");
    // Display writes what parse reads.
    let spec = LoraSpec { source: "x.safetensors".into(), scale: 0.25 };
    assert_eq!(LoraSpec::parse(&spec.to_string()).unwrap(), spec);
}

/// A scratch directory for bad LoRA files, removed at the end.
struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("sdcrossframe-lora-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    /// Writes `tensors` as a safetensors file named `name`.
    fn write(&self, name: &str, tensors: &[(&str, Tensor)]) -> PathBuf {
        let map: HashMap<String, Tensor> = tensors.iter().map(|(k, t)| (k.to_string(), t.clone())).collect();
        let path = self.0.join(name);
        candle_core::safetensors::save(&map, &path).unwrap();
        path
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn zeros(dims: &[usize]) -> Tensor {
    Tensor::zeros(dims, DType::F32, &Device::Cpu).unwrap()
}

/// The error of loading `file` into the tiny pipeline (through `Stylizer::load`).
fn load_error(file: &Path) -> String {
    let spec = ModelSpec { loras: vec![LoraSpec { source: file.display().to_string(), scale: 1.0 }], ..tiny_spec() };
    match Stylizer::load(&spec, &Device::Cpu, DType::F32) {
        Ok(_) => panic!("loading {} succeeded", file.display()),
        Err(e) => format!("{e:#}"),
    }
}

fn assert_mentions(err: &str, parts: &[&str]) {
    for part in parts {
        assert!(err.contains(part), "error does not mention {part:?}: {err}");
    }
    println!("{err}");
}

const TO_Q: &str = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q";

#[test]
fn a_key_that_matches_no_module_is_an_error() {
    let s = Scratch::new("nomodule");
    let file = s.write(
        "other.safetensors",
        &[
            ("unet.down_blocks.7.attentions.0.proj_in.lora_A.weight", zeros(&[4, 32, 1, 1])),
            ("unet.down_blocks.7.attentions.0.proj_in.lora_B.weight", zeros(&[32, 4, 1, 1])),
        ],
    );
    assert_mentions(
        &load_error(&file),
        &[
            &file.display().to_string(),
            "unet.down_blocks.7.attentions.0.proj_in.lora_A.weight",
            "matches no UNet module",
            "down_blocks.7.attentions.0.proj_in.weight",
        ],
    );
    // The same in the kohya layout, and a text-encoder key.
    let file = s.write(
        "kohya.safetensors",
        &[
            ("lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight", zeros(&[4, 32, 1, 1])),
            ("lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight", zeros(&[32, 4, 1, 1])),
            ("lora_te_text_model_encoder_layers_5_mlp_fc1.lora_down.weight", zeros(&[4, 32])),
            ("lora_te_text_model_encoder_layers_5_mlp_fc1.lora_up.weight", zeros(&[64, 4])),
        ],
    );
    assert_mentions(
        &load_error(&file),
        &[
            "lora_te_text_model_encoder_layers_5_mlp_fc1.lora_down.weight",
            "matches no text encoder module",
            "text_model_encoder_layers_5_mlp_fc1",
        ],
    );
}

#[test]
fn a_shape_that_does_not_fit_is_an_error_naming_both() {
    let s = Scratch::new("shape");
    // A LoRA for a model with 48 channels where the tiny one has 32.
    let file = s.write(
        "other-base.safetensors",
        &[
            (&format!("unet.{TO_Q}.lora_A.weight"), zeros(&[4, 48])),
            (&format!("unet.{TO_Q}.lora_B.weight"), zeros(&[48, 4])),
        ],
    );
    assert_mentions(
        &load_error(&file),
        &[
            &file.display().to_string(),
            &format!("unet.{TO_Q}.lora_A.weight"),
            &format!("{TO_Q}.weight"),
            "down [4, 48] and up [48, 4] against weight [32, 32]",
            "another base model",
        ],
    );
    // A linear LoRA on a 3x3 convolution.
    let conv = "lora_unet_down_blocks_0_resnets_0_conv1";
    let file = s.write(
        "conv.safetensors",
        &[(&format!("{conv}.lora_down.weight"), zeros(&[4, 32])), (&format!("{conv}.lora_up.weight"), zeros(&[32, 4]))],
    );
    assert_mentions(
        &load_error(&file),
        &[
            &format!("{conv}.lora_down.weight"),
            "down_blocks.0.resnets.0.conv1.weight",
            "down [4, 32] and up [32, 4] against weight [32, 32, 3, 3]",
        ],
    );
}

#[test]
fn a_file_without_unet_layers_is_an_error() {
    let s = Scratch::new("nounet");
    let file = s.write(
        "text-only.safetensors",
        &[
            ("text_encoder.encoder.layers.0.mlp.fc1.lora_A.weight", zeros(&[4, 32])),
            ("text_encoder.encoder.layers.0.mlp.fc1.lora_B.weight", zeros(&[64, 4])),
        ],
    );
    assert_mentions(&load_error(&file), &[&file.display().to_string(), "has no UNet layers"]);
}

#[test]
fn unsupported_layouts_and_incomplete_layers_are_errors() {
    let s = Scratch::new("layouts");
    // (file name, its tensors, what the error must say)
    type Case<'a> = (&'a str, Vec<(&'a str, Tensor)>, &'a [&'a str]);
    let cases: Vec<Case> = vec![
        (
            "sgm.safetensors",
            vec![("lora_unet_input_blocks_1_1_proj_in.lora_down.weight", zeros(&[4, 32, 1, 1]))],
            &["lora_unet_input_blocks_1_1_proj_in.lora_down.weight", "original Stable Diffusion (LDM/SGM) UNet layout"],
        ),
        (
            "sdxl.safetensors",
            vec![("lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight", zeros(&[4, 32]))],
            &["lora_te2_", "SDXL"],
        ),
        (
            "dora.safetensors",
            vec![("unet.down_blocks.0.attentions.0.proj_in.lora_magnitude_vector", zeros(&[32]))],
            &["lora_magnitude_vector", "DoRA"],
        ),
        (
            "unknown.safetensors",
            vec![("model.diffusion_model.input_blocks.0.0.weight", zeros(&[4]))],
            &["model.diffusion_model.input_blocks.0.0.weight", "not a LoRA key of a known layout"],
        ),
        (
            "no-up.safetensors",
            vec![("lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight", zeros(&[4, 32, 1, 1]))],
            &["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight", "no matching up"],
        ),
    ];
    for (name, tensors, expected) in cases {
        let file = s.write(name, &tensors);
        let mut parts = vec![file.display().to_string()];
        parts.extend(expected.iter().map(|e| e.to_string()));
        assert_mentions(&load_error(&file), &parts.iter().map(String::as_str).collect::<Vec<_>>());
    }
}

#[test]
fn pickle_missing_and_truncated_files_are_errors() {
    let s = Scratch::new("files");
    for ext in ["ckpt", "pt", "pth", "bin"] {
        let file = s.0.join(format!("lora.{ext}"));
        std::fs::write(&file, b"PK\x03\x04 not really a pickle").unwrap();
        assert_mentions(&load_error(&file), &[&file.display().to_string(), "pickle", "safetensors", "convert"]);
    }
    // A directory with only a pickle names the pickle.
    let dir = s.0.join("pickle-dir");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("pytorch_lora_weights.bin"), b"x").unwrap();
    assert_mentions(&load_error(&dir), &["pytorch_lora_weights.bin", "pickle"]);

    let missing = s.0.join("absent.safetensors");
    assert_mentions(&load_error(&missing), &[&missing.display().to_string(), "does not exist"]);

    let bytes = std::fs::read(lora_file("peft")).unwrap();
    let truncated = s.0.join("truncated.safetensors");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    assert_mentions(&load_error(&truncated), &[&truncated.display().to_string(), "truncated"]);

    // A directory holding one LoRA file loads it.
    let dir = s.0.join("one");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(lora_file("kohya"), dir.join("my-style.safetensors")).unwrap();
    let set = LoraSet::load(&[LoraSpec { source: dir.display().to_string(), scale: 1.0 }]).unwrap();
    assert!(set.files[0].path.ends_with("my-style.safetensors"));
}
