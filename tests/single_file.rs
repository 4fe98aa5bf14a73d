//! Single-file checkpoints (original layout): the tiny models as one SD1.x checkpoint, a
//! ControlNet file and a VAE file load, and give the frame of the diffusers directories; other
//! families and pickles are refused with what they are.
//!
//! The files are written here from `tests/fixtures/single-file/layout.json` (the tiny models'
//! own f16 bytes under their original names, the layout checked by diffusers'
//! `from_single_file`: tests/reference/make_singlefile_fixtures.py).

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use common::single_file::*;
use common::*;
use sdcrossframe::pipeline::{FrameSettings, LoraSpec, ModelParts, ModelSpec, PlainFrame, Stylizer};
use sdcrossframe::single_file;
use serde_json::Value;

/// Frames from the same weights: identical up to summation order (none here: same ops).
const TOLERANCE: f32 = 1e-6;

fn scratch(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("sdcrossframe-single-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn tokenizer_dir() -> String {
    fixtures().join("tiny-sd/tokenizer").display().to_string()
}

/// The frame of the base img2img case (5 steps: the comparisons are between our own runs).
fn frame_of(spec: &ModelSpec) -> Tensor {
    let mut stylizer = Stylizer::load(spec, &Device::Cpu, DType::F32).unwrap_or_else(|e| panic!("{e:#}"));
    let settings = FrameSettings { steps: 5, ..base_settings() };
    stylizer
        .stylize(
            &frame(0).to_tensor(&Device::Cpu).unwrap(),
            &control(0).to_tensor(&Device::Cpu).unwrap(),
            &settings,
            &fixture_noise(),
            None,
            &mut PlainFrame::default(),
        )
        .unwrap()
}

fn load_error(spec: &ModelSpec) -> String {
    match Stylizer::load(spec, &Device::Cpu, DType::F32) {
        Ok(_) => panic!("loading {} / {} / {:?} succeeded", spec.model, spec.controlnet, spec.vae),
        Err(e) => format!("{e:#}"),
    }
}

fn checkpoint_spec(path: &Path) -> ModelSpec {
    ModelSpec { model: path.display().to_string(), tokenizer: Some(tokenizer_dir()), ..tiny_spec() }
}

/// The configs built from the shapes (and the hints) are the directories' configs.
#[test]
fn configs_from_shapes_match_the_directories() {
    let dir = scratch("configs");
    let checkpoint =
        single_file::read_checkpoint(&write_layout("checkpoint", &dir, &Changes::default()), true).unwrap();
    let read = |path: &str| -> Value {
        serde_json::from_str(&std::fs::read_to_string(fixtures().join(path)).unwrap()).unwrap()
    };
    let debug = |v: &dyn std::fmt::Debug| format!("{v:?}");
    let unet: sdcrossframe::models::unet::UNet2DConditionConfig =
        serde_json::from_value(read("tiny-sd/unet/config.json")).unwrap();
    assert_eq!(debug(&checkpoint.unet.config), debug(&unet));
    let text: sdcrossframe::models::clip::ClipTextConfig =
        serde_json::from_value(read("tiny-sd/text_encoder/config.json")).unwrap();
    assert_eq!(debug(&checkpoint.text_encoder.config), debug(&text));
    let vae: sdcrossframe::models::vae::AutoencoderKLConfig =
        serde_json::from_value(read("tiny-sd/vae/config.json")).unwrap();
    assert_eq!(debug(&checkpoint.vae.as_ref().unwrap().config), debug(&vae));
    assert_eq!(
        debug(&single_file::read_vae(&write_layout("vae", &dir, &Changes::default())).unwrap().config),
        debug(&vae)
    );
    let controlnet: sdcrossframe::models::controlnet::ControlNetConfig =
        serde_json::from_value(read("tiny-controlnet/config.json")).unwrap();
    let part = single_file::read_controlnet(&write_layout("controlnet", &dir, &Changes::default())).unwrap();
    assert_eq!(debug(&part.config), debug(&controlnet));
    // Every diffusers tensor has one original tensor.
    let names: Vec<&str> = part.tensors.names().collect();
    assert_eq!(names.len(), 258);
    assert_eq!(
        part.tensors.original_name("controlnet_cond_embedding.conv_out.weight"),
        Some("control_model.input_hint_block.14.weight")
    );
    // Without the hints the SD1.x rules apply: 8 heads per block.
    let bare = single_file::read_checkpoint(
        &write_layout(
            "checkpoint",
            &dir,
            &Changes { drop_metadata: &["sdcrossframe.unet_config"], ..Default::default() },
        ),
        true,
    )
    .unwrap();
    assert_eq!(debug(&bare.unet.config.attention_head_dim), "One(8)");
    assert_eq!(bare.unet.config.norm_num_groups, Some(32));
    assert_eq!(bare.text_encoder.config.num_attention_heads, 4);
    let no_text_hint = single_file::read_checkpoint(
        &write_layout(
            "checkpoint",
            &dir,
            &Changes { drop_metadata: &["sdcrossframe.text_encoder_config"], ..Default::default() },
        ),
        false,
    )
    .unwrap();
    assert!(no_text_hint.vae.is_none(), "the VAE is read only when asked for");
    // 64-wide heads; at least one.
    assert_eq!(no_text_hint.text_encoder.config.num_attention_heads, 1);
    let _ = std::fs::remove_dir_all(dir);
}

/// A file of diffusers-named tensors (a component's own file) reads too: the ControlNet's,
/// with SD1.x's heads; the tiny VAE's says its groups need the metadata hint.
#[test]
fn diffusers_named_files_read_with_the_sd1_rules() {
    let controlnet =
        single_file::read_controlnet(&fixtures().join("tiny-controlnet/diffusion_pytorch_model.safetensors")).unwrap();
    assert_eq!(controlnet.config.block_out_channels, [32, 64, 64]);
    assert_eq!(controlnet.config.conditioning_embedding_out_channels, [8, 16, 16, 32]);
    assert_eq!(format!("{:?}", controlnet.config.attention_head_dim), "One(8)");
    let err = match single_file::read_vae(&fixtures().join("tiny-sd/vae/diffusion_pytorch_model.safetensors")) {
        Ok(_) => panic!("the tiny VAE loaded with 32 groups"),
        Err(e) => format!("{e:#}"),
    };
    for part in ["diffusion_pytorch_model.safetensors", "16-channel", "32 GroupNorm groups", "sdcrossframe.vae_config"]
    {
        assert!(err.contains(part), "{part:?} missing from: {err}");
    }
}

/// The checkpoint gives the directory's frame; so do a ControlNet file and a VAE file; and
/// each file's tensors reach the frame (one negated tensor moves it far beyond the tolerance).
#[test]
fn single_files_give_the_directories_frame() {
    let dir = scratch("frames");
    let reference = frame_of(&tiny_spec());
    let checkpoint = write_layout("checkpoint", &dir, &Changes::default());
    let diff = max_abs_diff(&frame_of(&checkpoint_spec(&checkpoint)), &reference);
    println!("checkpoint vs directory: max abs {diff:.2e}");
    assert!(diff <= TOLERANCE, "checkpoint frame differs by {diff}");

    let controlnet = write_layout("controlnet", &dir, &Changes::default());
    let vae = write_layout("vae", &dir, &Changes::default());
    let files = ModelSpec {
        controlnet: controlnet.display().to_string(),
        vae: Some(vae.display().to_string()),
        ..checkpoint_spec(&checkpoint)
    };
    let diff = max_abs_diff(&frame_of(&files), &reference);
    println!("checkpoint + ControlNet file + VAE file vs directories: max abs {diff:.2e}");
    assert!(diff <= TOLERANCE, "single files' frame differs by {diff}");

    let tampered = scratch("frames-tampered");
    for (kind, tensors) in [
        ("checkpoint", &["model.diffusion_model.out.2.weight"][..]),
        ("controlnet", &["control_model.middle_block_out.0.weight", "control_model.zero_convs.8.0.weight"][..]),
        ("vae", &["decoder.conv_out.weight"][..]),
    ] {
        let path = write_layout(kind, &tampered, &Changes { negate: tensors, ..Default::default() });
        let spec = match kind {
            "checkpoint" => checkpoint_spec(&path),
            "controlnet" => ModelSpec { controlnet: path.display().to_string(), ..tiny_spec() },
            _ => ModelSpec { vae: Some(path.display().to_string()), ..tiny_spec() },
        };
        let diff = max_abs_diff(&frame_of(&spec), &reference);
        println!("{kind} with {tensors:?} negated: max abs {diff:.2e}");
        assert!(diff > 1e3 * TOLERANCE, "{kind}: negating {tensors:?} moved the frame by only {diff}");
    }
    // Without the VAE's hint, SD1.x's 32 groups do not divide the tiny VAE's 16-wide blocks.
    let bare = write_layout(
        "checkpoint",
        &tampered,
        &Changes { drop_metadata: &["sdcrossframe.vae_config"], ..Default::default() },
    );
    let err = load_error(&checkpoint_spec(&bare));
    for part in ["checkpoint.safetensors", "VAE's 16-channel blocks", "32 GroupNorm groups", "sdcrossframe.vae_config"]
    {
        assert!(err.contains(part), "{part:?} missing from: {err}");
    }
    let _ = std::fs::remove_dir_all(dir);
    let _ = std::fs::remove_dir_all(tampered);
}

/// Without the UNet's hint the tiny UNet runs with 8 heads: it loads, and the frame differs.
#[test]
fn the_heads_rule_changes_the_frame() {
    let dir = scratch("heads");
    let reference = frame_of(&tiny_spec());
    let path = write_layout(
        "checkpoint",
        &dir,
        &Changes { drop_metadata: &["sdcrossframe.unet_config"], ..Default::default() },
    );
    // Groups stay the tiny model's (32 groups do not divide its 16-wide VAE blocks).
    let diff = max_abs_diff(&frame_of(&checkpoint_spec(&path)), &reference);
    println!("8 heads (no unet hint) vs [2, 4, 4]: max abs {diff:.2e}");
    assert!(diff > 1e3 * TOLERANCE, "the heads did not matter: {diff}");
    let _ = std::fs::remove_dir_all(dir);
}

/// LoRAs fuse into a checkpoint's UNet and text encoder as into the directory's.
#[test]
fn loras_fuse_into_a_checkpoint() {
    let dir = scratch("lora");
    let checkpoint = write_layout("checkpoint", &dir, &Changes::default());
    let loras = vec![LoraSpec { source: fixtures().join("lora/kohya.safetensors").display().to_string(), scale: 0.5 }];
    let from_dir =
        ModelParts::from_spec(&ModelSpec { loras: loras.clone(), ..tiny_spec() }, &Device::Cpu, DType::F32).unwrap();
    let from_file =
        ModelParts::from_spec(&ModelSpec { loras, ..checkpoint_spec(&checkpoint) }, &Device::Cpu, DType::F32).unwrap();
    let plain = ModelParts::from_spec(&tiny_spec(), &Device::Cpu, DType::F32).unwrap();
    for (what, a, b, base, name) in [
        (
            "UNet",
            &from_dir.unet.weights,
            &from_file.unet.weights,
            &plain.unet.weights,
            "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight",
        ),
        (
            "text encoder",
            &from_dir.text_encoder.weights,
            &from_file.text_encoder.weights,
            &plain.text_encoder.weights,
            "encoder.layers.0.self_attn.q_proj.weight",
        ),
    ] {
        let file_name = if what == "UNet" { name.to_string() } else { format!("text_model.{name}") };
        let fused = a.get_unchecked(name).unwrap();
        assert_eq!(max_abs_diff(&fused, &b.get_unchecked(&file_name).unwrap()), 0.0, "{what} {name}");
        assert!(max_abs_diff(&fused, &base.get_unchecked(name).unwrap()) > 1e-3, "{what}: the LoRA changed nothing");
    }
    let _ = std::fs::remove_dir_all(dir);
}

/// Other families are refused with what they are; files that are none say what was looked for.
#[test]
fn other_families_are_refused_with_what_they_are() {
    let dir = scratch("families");
    let conv_in = |channels: usize| ("model.diffusion_model.input_blocks.0.0.weight", [8, channels, 3, 3]);
    // (file name, its tensors, what the error must say)
    type Case<'a> = (&'a str, Vec<(&'a str, Vec<usize>)>, &'a [&'a str]);
    let cases: Vec<Case> = vec![
        (
            "sdxl.safetensors",
            vec![
                (conv_in(4).0, conv_in(4).1.to_vec()),
                ("conditioner.embedders.0.transformer.text_model.embeddings.position_embedding.weight", vec![77, 8]),
                ("conditioner.embedders.1.model.positional_embedding", vec![77, 8]),
            ],
            &["sdxl.safetensors", "SDXL", "conditioner.embedders", "two"],
        ),
        (
            "sd2.safetensors",
            vec![(conv_in(4).0, conv_in(4).1.to_vec()), ("cond_stage_model.model.token_embedding.weight", vec![10, 8])],
            &["sd2.safetensors", "2.x", "OpenCLIP", "cond_stage_model.model"],
        ),
        (
            "sd2-1024.safetensors",
            vec![
                (conv_in(4).0, conv_in(4).1.to_vec()),
                ("model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight", vec![8, 1024]),
                ("cond_stage_model.transformer.text_model.embeddings.token_embedding.weight", vec![10, 1024]),
            ],
            &["sd2-1024.safetensors", "2.x", "1024"],
        ),
        (
            "inpainting.safetensors",
            vec![
                (conv_in(9).0, conv_in(9).1.to_vec()),
                ("cond_stage_model.transformer.text_model.embeddings.token_embedding.weight", vec![10, 8]),
            ],
            &["inpainting.safetensors", "inpainting", "9 input channels"],
        ),
        (
            "other.safetensors",
            vec![("model.layers.0.weight", vec![2]), ("lm_head.weight", vec![2, 2])],
            &[
                "other.safetensors",
                "not a Stable Diffusion 1.x checkpoint",
                "model.diffusion_model.",
                "first_stage_model.",
                "cond_stage_model.transformer.",
                "model.layers.*",
                "lm_head.weight",
            ],
        ),
        (
            "a-controlnet.safetensors",
            vec![("control_model.time_embed.0.weight", vec![8, 8])],
            &["a-controlnet.safetensors", "is a ControlNet", "controlnet setting"],
        ),
        (
            "a-vae.safetensors",
            vec![("encoder.down.0.block.0.conv1.weight", vec![8, 8, 3, 3])],
            &["a-vae.safetensors", "is a VAE", "vae setting"],
        ),
    ];
    for (name, tensors, expected) in &cases {
        let tensors: Vec<(&str, &[usize])> = tensors.iter().map(|(k, s)| (*k, s.as_slice())).collect();
        let path = fake(&dir, name, &tensors);
        let err = load_error(&checkpoint_spec(&path));
        println!("{name}: {err}\n");
        for part in *expected {
            assert!(err.contains(part), "{name}: {part:?} missing from: {err}");
        }
    }

    // As the controlnet: a checkpoint, an SDXL ControlNet, something else.
    let checkpoint = fake(&dir, "ckpt.safetensors", &[("model.diffusion_model.time_embed.0.weight", &[8, 8])]);
    let sdxl_cn = fake(
        &dir,
        "sdxl-cn.safetensors",
        &[("controlnet_cond_embedding.conv_in.weight", &[8, 3, 3, 3]), ("add_embedding.linear_1.weight", &[8, 8])],
    );
    let other = fake(&dir, "unknown.safetensors", &[("foo.bar", &[1])]);
    for (path, expected) in [
        (&checkpoint, &["ckpt.safetensors", "Stable Diffusion checkpoint", "model setting"][..]),
        (&sdxl_cn, &["sdxl-cn.safetensors", "SDXL ControlNet"][..]),
        (&other, &["unknown.safetensors", "not a ControlNet", "control_model.", "foo.bar"][..]),
    ] {
        let err = load_error(&ModelSpec { controlnet: path.display().to_string(), ..tiny_spec() });
        println!("controlnet: {err}\n");
        for part in expected {
            assert!(err.contains(part), "{part:?} missing from: {err}");
        }
    }
    // As the VAE.
    let err = load_error(&ModelSpec { vae: Some(other.display().to_string()), ..tiny_spec() });
    for part in ["cannot load the VAE", "unknown.safetensors", "not a VAE", "encoder.down.0.block.0", "foo.bar"] {
        assert!(err.contains(part), "{part:?} missing from: {err}");
    }
    let _ = std::fs::remove_dir_all(dir);
}

/// A checkpoint without a VAE loads with a `vae` file, and says what is missing without one.
#[test]
fn a_checkpoint_without_vae_needs_the_vae_setting() {
    let dir = scratch("novae");
    let checkpoint = write_layout("checkpoint", &dir, &Changes::default());
    // Rewrite it without first_stage_model.*.
    let bytes = std::fs::read(&checkpoint).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let (_, metadata) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let tensors: BTreeMap<String, Raw> = st
        .tensors()
        .into_iter()
        .filter(|(k, _)| !k.starts_with("first_stage_model."))
        .map(|(k, v)| {
            (k, Raw { dtype: format!("{:?}", v.dtype()), shape: v.shape().to_vec(), bytes: v.data().to_vec() })
        })
        .collect();
    let metadata: BTreeMap<String, String> = metadata.metadata().clone().unwrap_or_default().into_iter().collect();
    let no_vae = dir.join("no-vae.safetensors");
    write_safetensors(&no_vae, &tensors, &metadata);
    let err = load_error(&checkpoint_spec(&no_vae));
    assert!(err.contains("no-vae.safetensors") && err.contains("no VAE") && err.contains("vae setting"), "{err}");
    let vae = write_layout("vae", &dir, &Changes::default());
    let spec = ModelSpec { vae: Some(vae.display().to_string()), ..checkpoint_spec(&no_vae) };
    assert!(Stylizer::load(&spec, &Device::Cpu, DType::F32).is_ok());
    // A `vae` replaces the checkpoint's own, which is then not read at all (here it could not
    // be: without its hint, 32 groups do not divide the tiny VAE).
    let unusable_vae = write_layout(
        "checkpoint",
        &dir,
        &Changes { drop_metadata: &["sdcrossframe.vae_config"], ..Default::default() },
    );
    assert!(load_error(&checkpoint_spec(&unusable_vae)).contains("32 GroupNorm groups"));
    let spec = ModelSpec { vae: Some(vae.display().to_string()), ..checkpoint_spec(&unusable_vae) };
    let loaded = Stylizer::load(&spec, &Device::Cpu, DType::F32);
    assert!(loaded.is_ok(), "{:#}", loaded.err().unwrap());
    let _ = std::fs::remove_dir_all(dir);
}

/// Pickle files are refused by name, with how to convert them, whatever the setting.
#[test]
fn pickles_are_refused_with_how_to_convert() {
    let dir = scratch("pickles");
    let pickle = dir.join("model.ckpt");
    std::fs::write(&pickle, b"\x80\x02not really a pickle").unwrap();
    let pth = dir.join("control_sd15_canny.pth");
    std::fs::write(&pth, b"\x80\x02").unwrap();
    let bin = dir.join("vae.bin");
    std::fs::write(&bin, b"\x80\x02").unwrap();
    let missing = dir.join("absent.pt");
    for (spec, file) in [
        (ModelSpec { model: pickle.display().to_string(), ..tiny_spec() }, &pickle),
        (ModelSpec { model: missing.display().to_string(), ..tiny_spec() }, &missing),
        (ModelSpec { controlnet: pth.display().to_string(), ..tiny_spec() }, &pth),
        (ModelSpec { vae: Some(bin.display().to_string()), ..tiny_spec() }, &bin),
    ] {
        let err = load_error(&spec);
        println!("{err}\n");
        let shown = file.display().to_string();
        for part in [shown.as_str(), "pickle", "safetensors", "torch.load", "st.save_file"] {
            assert!(err.contains(part), "{part:?} missing from: {err}");
        }
    }
    // A single file that does not exist says so.
    let err = load_error(&checkpoint_spec(&dir.join("absent.safetensors")));
    assert!(err.contains("absent.safetensors") && err.contains("does not exist"), "{err}");
    let _ = std::fs::remove_dir_all(dir);
}

/// Damaged single files (a tensor missing, or renamed to another block or layer number) are
/// errors naming the file, never a panic or a silent load.
#[test]
fn damaged_files_are_errors_naming_the_file() {
    let dir = scratch("damaged");
    for (kind, step) in [("checkpoint", 37), ("controlnet", 13), ("vae", 9)] {
        let good = write_layout(kind, &dir, &Changes::default());
        let bytes = std::fs::read(&good).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let (_, metadata) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
        let metadata: BTreeMap<String, String> = metadata.metadata().clone().unwrap_or_default().into_iter().collect();
        let tensors: BTreeMap<String, Raw> = st
            .tensors()
            .into_iter()
            .map(|(k, v)| {
                (k, Raw { dtype: format!("{:?}", v.dtype()), shape: v.shape().to_vec(), bytes: v.data().to_vec() })
            })
            .collect();
        let path = dir.join(format!("damaged-{kind}.safetensors"));
        let spec = match kind {
            "checkpoint" => checkpoint_spec(&path),
            "controlnet" => ModelSpec { controlnet: path.display().to_string(), ..tiny_spec() },
            _ => ModelSpec { vae: Some(path.display().to_string()), ..tiny_spec() },
        };
        let (mut errors, mut tries) = (0, 0);
        for name in tensors.keys().step_by(step) {
            let renamed = name.replacen(".0.", ".7.", 1).replacen(".1.", ".0.", 1);
            for change in [None, Some(renamed)] {
                let mut damaged: BTreeMap<String, Raw> = tensors
                    .iter()
                    .map(|(k, v)| {
                        (k.clone(), Raw { dtype: v.dtype.clone(), shape: v.shape.clone(), bytes: v.bytes.clone() })
                    })
                    .collect();
                let raw = damaged.remove(name).unwrap();
                if let Some(new) = &change {
                    if new == name || damaged.contains_key(new) {
                        continue;
                    }
                    damaged.insert(new.clone(), raw);
                }
                write_safetensors(&path, &damaged, &metadata);
                tries += 1;
                match Stylizer::load(&spec, &Device::Cpu, DType::F32) {
                    // Only what the models never read may go: the position_ids buffer.
                    Ok(_) => assert!(name.ends_with("position_ids"), "{kind}: {name} -> {change:?}: loaded"),
                    Err(e) => {
                        let err = format!("{e:#}");
                        assert!(err.contains(&format!("damaged-{kind}.safetensors")), "{name} -> {change:?}: {err}");
                        if errors % 25 == 0 {
                            println!("{name} -> {change:?}: {err}");
                        }
                        errors += 1;
                    }
                }
            }
        }
        println!("{kind}: {errors} errors of {tries} damaged files");
        assert!(errors >= tries - 1 && tries >= 30, "{kind}: {errors} of {tries}");
    }
    let _ = std::fs::remove_dir_all(dir);
}
