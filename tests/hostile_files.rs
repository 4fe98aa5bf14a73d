//! Hostile weight files (issue 16, part 1, bounded for CI): the tiny ControlNet's safetensors
//! file mutated in seeded, repeatable ways (truncations, header length claims, corrupt header
//! bytes, tensor entries with out-of-range, reversed or overlapping offsets, wrong or unknown
//! dtypes, shapes that do not match their bytes or the model, huge shapes), each loaded as a
//! user's `controlnet` would be. Every case must end in an error that names the file (or the
//! model built from it) — never a panic — or, for mutations that leave a valid file the
//! model can use (e.g. a reordered header), load. The test reports how many cases ran and how
//! many distinct errors they hit.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use anyhow::Context;
use candle_core::{DType, Device};
use common::fixtures;
use rand::{Rng, SeedableRng};
use sdcrossframe::models::controlnet::{ControlNetConfig, ControlNetModel};
use sdcrossframe::weights::ComponentFiles;
use serde_json::{Map, Value, json};

const CASES: usize = 240;

/// Loads a ControlNet directory as the pipeline does (locate, validate, map, build).
fn load_controlnet(dir: &Path) -> anyhow::Result<()> {
    let files = ComponentFiles::locate(dir, None)?;
    let config: ControlNetConfig = files.read_config()?;
    let vb = files.var_builder(DType::F32, &Device::Cpu)?;
    ControlNetModel::new(vb, &config).with_context(|| format!("cannot build the ControlNet from {}", dir.display()))?;
    Ok(())
}

fn split(file: &[u8]) -> (Map<String, Value>, Vec<u8>) {
    let n = u64::from_le_bytes(file[..8].try_into().unwrap()) as usize;
    let header: Map<String, Value> = serde_json::from_slice(&file[8..8 + n]).unwrap();
    (header, file[8 + n..].to_vec())
}

fn join(header: &Map<String, Value>, data: &[u8]) -> Vec<u8> {
    let text = serde_json::to_vec(header).unwrap();
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&text);
    out.extend_from_slice(data);
    out
}

/// One mutation of the original file, chosen and parameterised by `rng`; its name for reports.
fn mutate(original: &[u8], rng: &mut rand_chacha::ChaCha8Rng) -> (String, Vec<u8>) {
    let (header, data) = split(original);
    let names: Vec<String> = header.keys().filter(|k| *k != "__metadata__").cloned().collect();
    let name = names[rng.random_range(0..names.len())].clone();
    let mut edited = header.clone();
    let entry = edited.get_mut(&name).unwrap().as_object_mut().unwrap();
    let offsets: Vec<u64> = entry["data_offsets"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).collect();
    match rng.random_range(0..12) {
        0 => {
            let cut = rng.random_range(0..original.len());
            ("truncated file".into(), original[..cut].to_vec())
        }
        1 => {
            let mut out = original.to_vec();
            let claim: u64 = [u64::MAX, u64::MAX / 2, 1 << 40, original.len() as u64, 0, 1][rng.random_range(0..6)];
            out[..8].copy_from_slice(&claim.to_le_bytes());
            ("header length claim".into(), out)
        }
        2 => {
            let mut out = original.to_vec();
            let n = u64::from_le_bytes(original[..8].try_into().unwrap()) as usize;
            for _ in 0..rng.random_range(1..8) {
                let at = 8 + rng.random_range(0..n);
                out[at] = rng.random();
            }
            ("corrupt header bytes".into(), out)
        }
        3 => {
            let end = data.len() as u64 + rng.random_range(1..1u64 << 40);
            entry.insert("data_offsets".into(), json!([offsets[0], end]));
            ("offsets past the end".into(), join(&edited, &data))
        }
        4 => {
            entry.insert("data_offsets".into(), json!([offsets[1], offsets[0]]));
            ("reversed offsets".into(), join(&edited, &data))
        }
        5 => {
            // Overlap the previous tensor's bytes: same length, shifted back.
            let shift = rng.random_range(1..=offsets[0].max(1));
            let start = offsets[0].saturating_sub(shift);
            entry.insert("data_offsets".into(), json!([start, start + offsets[1] - offsets[0]]));
            ("overlapping offsets".into(), join(&edited, &data))
        }
        6 => {
            let dtype = ["F32", "BF16", "I64", "U8", "BOOL", "F8_E4M3", "Q4", ""][rng.random_range(0..8)];
            entry.insert("dtype".into(), json!(dtype));
            (format!("dtype {dtype}"), join(&edited, &data))
        }
        7 => {
            let mut shape: Vec<u64> = entry["shape"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).collect();
            let i = rng.random_range(0..shape.len().max(1));
            if shape.is_empty() {
                shape.push(2);
            } else {
                shape[i] += rng.random_range(1..4);
            }
            entry.insert("shape".into(), json!(shape));
            ("shape not matching its bytes".into(), join(&edited, &data))
        }
        8 => {
            entry.insert("shape".into(), json!([1u64 << 31, 1u64 << 31, 1u64 << 31]));
            ("huge shape".into(), join(&edited, &data))
        }
        9 => {
            // A consistent file whose tensor has another shape than the model expects.
            let count = (offsets[1] - offsets[0]) / 2;
            entry.insert("shape".into(), json!([count]));
            ("shape not matching the model".into(), join(&edited, &data))
        }
        10 => {
            edited.remove(&name);
            ("tensor missing".into(), join(&edited, &data))
        }
        _ => {
            let mut out = original.to_vec();
            let n = u64::from_le_bytes(original[..8].try_into().unwrap()) as usize;
            out.truncate(8 + n + rng.random_range(0..data.len()));
            ("tensor data truncated".into(), out)
        }
    }
}

/// The error text with the temp directory's path replaced, so that errors can be told apart.
fn error_kind(text: &str, dir: &Path) -> String {
    let text = text.replace(&dir.display().to_string(), "DIR");
    text.chars().map(|c| if c.is_ascii_digit() { '#' } else { c }).collect()
}

#[test]
fn mutated_weight_files_are_clear_errors_never_panics() {
    let source = fixtures().join("tiny-controlnet");
    let original = std::fs::read(source.join("diffusion_pytorch_model.safetensors")).unwrap();
    let config = std::fs::read(source.join("config.json")).unwrap();
    let root: PathBuf = std::env::temp_dir().join(format!("sdcrossframe-hostile-{}", std::process::id()));
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(16);
    let mut errors = BTreeSet::new();
    let mut loaded = 0;
    let mut loaded_kinds = BTreeSet::new();
    let mut failures = Vec::new();
    for case in 0..CASES {
        let (what, bytes) = mutate(&original, &mut rng);
        let dir = root.join(format!("case-{case}"));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("config.json"), &config).unwrap();
        std::fs::write(dir.join("diffusion_pytorch_model.safetensors"), &bytes).unwrap();
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| load_controlnet(&dir)));
        match result {
            Err(_) => failures.push(format!("case {case} ({what}): panicked")),
            Ok(Ok(())) => {
                loaded += 1;
                loaded_kinds.insert(what);
            }
            Ok(Err(e)) => {
                let text = format!("{e:#}");
                if !text.contains(&dir.display().to_string()) {
                    failures.push(format!("case {case} ({what}): the error does not name the file: {text}"));
                }
                errors.insert(error_kind(&text, &dir));
            }
        }
        std::fs::remove_dir_all(&dir).ok();
    }
    std::fs::remove_dir_all(&root).ok();
    println!(
        "{CASES} mutated files: {} errors of {} distinct kinds, {loaded} loaded (still valid: {loaded_kinds:?})",
        CASES - loaded,
        errors.len()
    );
    for kind in &errors {
        println!("  {kind}");
    }
    assert!(failures.is_empty(), "{} of {CASES} cases failed:\n{}", failures.len(), failures.join("\n"));
    // The mutations must reach many different checks, or the test proves little.
    assert!(errors.len() >= 8, "only {} distinct errors: {errors:#?}", errors.len());
}

/// The same mutations of the tiny ControlNet as a single file in the original layout
/// (`control_model.*`, written from tests/fixtures/single-file/layout.json), loaded as a user's
/// `controlnet` file is: name mapping, config from the shapes, model. Errors name the file.
#[test]
fn mutated_single_files_are_clear_errors_never_panics() {
    let root: PathBuf = std::env::temp_dir().join(format!("sdcrossframe-hostile-single-{}", std::process::id()));
    std::fs::create_dir_all(&root).unwrap();
    let source = common::single_file::write_layout("controlnet", &root, &Default::default());
    let original = std::fs::read(&source).unwrap();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(17);
    let mut errors = BTreeSet::new();
    let (mut loaded, mut failures) = (0, Vec::new());
    for case in 0..CASES {
        let (what, bytes) = mutate(&original, &mut rng);
        let path = root.join(format!("case-{case}.safetensors"));
        std::fs::write(&path, &bytes).unwrap();
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| -> anyhow::Result<()> {
            let part = sdcrossframe::single_file::read_controlnet(&path)?;
            let vb = part.tensors.var_builder(DType::F32, &Device::Cpu);
            ControlNetModel::new(vb, &part.config)
                .with_context(|| format!("cannot build the ControlNet from {}", path.display()))?;
            Ok(())
        }));
        match result {
            Err(_) => failures.push(format!("case {case} ({what}): panicked")),
            Ok(Ok(())) => loaded += 1,
            Ok(Err(e)) => {
                let text = format!("{e:#}");
                if !text.contains(&path.display().to_string()) {
                    failures.push(format!("case {case} ({what}): the error does not name the file: {text}"));
                }
                errors.insert(error_kind(&text, &root));
            }
        }
        std::fs::remove_file(&path).ok();
    }
    std::fs::remove_dir_all(&root).ok();
    println!(
        "{CASES} mutated single files: {} errors of {} distinct kinds, {loaded} loaded",
        CASES - loaded,
        errors.len()
    );
    for kind in &errors {
        println!("  {kind}");
    }
    assert!(failures.is_empty(), "{} of {CASES} cases failed:\n{}", failures.len(), failures.join("\n"));
    assert!(errors.len() >= 8, "only {} distinct errors: {errors:#?}", errors.len());
}

/// Absurd or broken values in the ControlNet's config.json, with its real weights: each an
/// error naming the directory (or loads, where the value is harmless), never a panic, and
/// nothing sized by the config is allocated before the weights are checked against it.
#[test]
fn absurd_configs_are_clear_errors_never_panics() {
    let source = fixtures().join("tiny-controlnet");
    let weights = std::fs::read(source.join("diffusion_pytorch_model.safetensors")).unwrap();
    let config: Map<String, Value> =
        serde_json::from_slice(&std::fs::read(source.join("config.json")).unwrap()).unwrap();
    let edits: Vec<(&str, Value)> = vec![
        ("block_out_channels", json!([1_000_000_000u64, 64, 64])),
        ("block_out_channels", json!([])),
        ("block_out_channels", json!([0, 0, 0])),
        ("layers_per_block", json!(1_000_000_000u64)),
        ("layers_per_block", json!(0)),
        ("norm_num_groups", json!(0)),
        ("norm_num_groups", json!(7)),
        ("attention_head_dim", json!([0, 0, 0])),
        ("attention_head_dim", json!([3, 4, 4])),
        ("attention_head_dim", json!([2])),
        ("cross_attention_dim", json!(0)),
        ("in_channels", json!(0)),
        ("conditioning_channels", json!(0)),
        ("conditioning_embedding_out_channels", json!([])),
        ("conditioning_embedding_out_channels", json!([1_000_000_000u64, 16, 16, 32])),
        ("down_block_types", json!(["CrossAttnDownBlock2D"])),
        ("down_block_types", json!(["NoSuchBlock", "CrossAttnDownBlock2D", "DownBlock2D"])),
        ("transformer_layers_per_block", json!(1_000_000_000u64)),
        ("transformer_layers_per_block", json!(0)),
        ("norm_eps", json!(-1.0)),
        ("block_out_channels", json!("many")),
    ];
    let root: PathBuf = std::env::temp_dir().join(format!("sdcrossframe-hostile-config-{}", std::process::id()));
    let mut failures = Vec::new();
    let mut outcomes = Vec::new();
    for (case, (key, value)) in edits.iter().enumerate() {
        let mut edited = config.clone();
        edited.insert(key.to_string(), value.clone());
        let dir = root.join(format!("case-{case}"));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("config.json"), serde_json::to_vec(&edited).unwrap()).unwrap();
        std::fs::write(dir.join("diffusion_pytorch_model.safetensors"), &weights).unwrap();
        let started = std::time::Instant::now();
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| load_controlnet(&dir)));
        println!("{key} = {value}: {:.2} s", started.elapsed().as_secs_f64());
        match result {
            Err(_) => failures.push(format!("{key} = {value}: panicked")),
            Ok(Ok(())) => outcomes.push(format!("{key} = {value}: loads")),
            Ok(Err(e)) => {
                let text = format!("{e:#}");
                if !text.contains(&dir.display().to_string()) {
                    failures.push(format!("{key} = {value}: the error does not name the directory: {text}"));
                }
                outcomes.push(format!(
                    "{key} = {value}: {}",
                    text.lines().next().unwrap_or("").replace(&dir.display().to_string(), "DIR")
                ));
            }
        }
    }
    std::fs::remove_dir_all(&root).ok();
    for outcome in &outcomes {
        println!("{outcome}");
    }
    assert!(failures.is_empty(), "{} of {} configs failed:\n{}", failures.len(), edits.len(), failures.join("\n"));
}

/// Builds one component of a diffusers directory (config.json + weights) with `build`.
fn load_component<C: serde::de::DeserializeOwned>(
    dir: &Path,
    build: impl FnOnce(candle_nn::VarBuilder<'static>, &C) -> candle_core::Result<()>,
) -> anyhow::Result<()> {
    let files = ComponentFiles::locate(dir, None)?;
    let config: C = files.read_config()?;
    let vb = files.var_builder(DType::F32, &Device::Cpu)?;
    build(vb, &config).with_context(|| format!("cannot build the model in {}", dir.display()))
}

/// Runs `load` on copies of `source` whose config.json has each edit; returns the failures
/// (panics, errors that do not name the directory) and prints every outcome.
fn config_edits(
    source: &Path,
    tag: &str,
    edits: &[(&str, Value)],
    load: &dyn Fn(&Path) -> anyhow::Result<()>,
) -> Vec<String> {
    let config: Map<String, Value> =
        serde_json::from_slice(&std::fs::read(source.join("config.json")).unwrap()).unwrap();
    let root: PathBuf = std::env::temp_dir().join(format!("sdcrossframe-hostile-{tag}-{}", std::process::id()));
    let mut failures = Vec::new();
    for (case, (key, value)) in edits.iter().enumerate() {
        let mut edited = config.clone();
        edited.insert(key.to_string(), value.clone());
        let dir = root.join(format!("case-{case}"));
        std::fs::create_dir_all(&dir).unwrap();
        for entry in std::fs::read_dir(source).unwrap() {
            let entry = entry.unwrap();
            if entry.file_name() != "config.json" {
                std::fs::copy(entry.path(), dir.join(entry.file_name())).unwrap();
            }
        }
        std::fs::write(dir.join("config.json"), serde_json::to_vec(&edited).unwrap()).unwrap();
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| load(&dir)));
        match result {
            Err(_) => failures.push(format!("{tag}: {key} = {value}: panicked")),
            Ok(Ok(())) => println!("{tag}: {key} = {value}: loads"),
            Ok(Err(e)) => {
                let text = format!("{e:#}");
                if !text.contains(&dir.display().to_string()) {
                    failures.push(format!("{tag}: {key} = {value}: the error does not name the directory: {text}"));
                }
                println!(
                    "{tag}: {key} = {value}: {}",
                    text.lines().next().unwrap_or("").replace(&dir.display().to_string(), "DIR")
                );
            }
        }
    }
    std::fs::remove_dir_all(&root).ok();
    failures
}

/// The same for the UNet, the VAE and the text encoder of the tiny pipeline.
#[test]
fn absurd_unet_vae_and_text_encoder_configs_are_clear_errors() {
    use sdcrossframe::models::clip::{ClipTextConfig, ClipTextModel};
    use sdcrossframe::models::unet::{UNet2DConditionConfig, UNet2DConditionModel};
    use sdcrossframe::models::vae::{AutoencoderKL, AutoencoderKLConfig};
    let huge = json!(1_000_000_000u64);
    let model = fixtures().join("tiny-sd");
    let mut failures = config_edits(
        &model.join("unet"),
        "unet",
        &[
            ("block_out_channels", json!([1_000_000_000u64, 64, 64])),
            ("block_out_channels", json!([])),
            ("layers_per_block", huge.clone()),
            ("layers_per_block", json!(0)),
            ("norm_num_groups", json!(0)),
            ("attention_head_dim", json!([0, 0, 0])),
            ("cross_attention_dim", json!(0)),
            ("up_block_types", json!(["UpBlock2D"])),
            ("up_block_types", json!([])),
            ("transformer_layers_per_block", huge.clone()),
            ("out_channels", json!(0)),
            ("sample_size", huge.clone()),
        ],
        &|dir| load_component(dir, |vb, c: &UNet2DConditionConfig| UNet2DConditionModel::new(vb, c).map(|_| ())),
    );
    failures.extend(config_edits(
        &model.join("vae"),
        "vae",
        &[
            ("block_out_channels", json!([1_000_000_000u64, 32, 32, 32])),
            ("block_out_channels", json!([])),
            ("layers_per_block", huge.clone()),
            ("norm_num_groups", json!(0)),
            ("latent_channels", json!(0)),
            ("latent_channels", huge.clone()),
            ("scaling_factor", json!(0.0)),
            ("scaling_factor", json!(-1.0)),
            ("down_block_types", json!([])),
        ],
        &|dir| load_component(dir, |vb, c: &AutoencoderKLConfig| AutoencoderKL::new(vb, c).map(|_| ())),
    ));
    failures.extend(config_edits(
        &model.join("text_encoder"),
        "text_encoder",
        &[
            ("hidden_size", huge.clone()),
            ("hidden_size", json!(0)),
            ("num_hidden_layers", huge.clone()),
            ("num_attention_heads", json!(0)),
            ("num_attention_heads", json!(3)),
            ("intermediate_size", huge.clone()),
            ("max_position_embeddings", huge.clone()),
            ("max_position_embeddings", json!(0)),
            ("vocab_size", json!(0)),
            ("hidden_act", json!("no_such_act")),
        ],
        &|dir| load_component(dir, |vb, c: &ClipTextConfig| ClipTextModel::new(vb, c).map(|_| ())),
    ));
    assert!(failures.is_empty(), "{} configs failed:\n{}", failures.len(), failures.join("\n"));
    // A VAE that would decode every frame to NaN is refused, not loaded.
    let vae = model.join("vae");
    let dir = std::env::temp_dir().join(format!("sdcrossframe-hostile-scaling-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut config: Map<String, Value> =
        serde_json::from_slice(&std::fs::read(vae.join("config.json")).unwrap()).unwrap();
    config.insert("scaling_factor".into(), json!(0.0));
    std::fs::write(dir.join("config.json"), serde_json::to_vec(&config).unwrap()).unwrap();
    std::fs::copy(vae.join("diffusion_pytorch_model.safetensors"), dir.join("diffusion_pytorch_model.safetensors"))
        .unwrap();
    let err = load_component(&dir, |vb, c: &AutoencoderKLConfig| AutoencoderKL::new(vb, c).map(|_| ()))
        .expect_err("a zero scaling_factor must be refused");
    std::fs::remove_dir_all(&dir).ok();
    assert!(format!("{err:#}").contains("scaling_factor 0 must be a positive number"), "{err:#}");
}
