//! Loading: where the weights come from ([`ModelSpec`]), and everything a
//! [`Stylizer`](super::Stylizer) is built from ([`ModelParts`]): each component's config and
//! weights, read from diffusers-format directories or supplied by the caller (the benchmark's
//! random weights). A `vae` directory replaces the pipeline's own VAE; its kind (full
//! AutoencoderKL or tiny AutoencoderTiny) is its config's `_class_name`.
//!
//! `model`, `controlnet` and `vae` may also name single `.safetensors` files in the original
//! layouts (an SD1.x checkpoint, a ControlNet, a VAE; see [`crate::single_file`]). A checkpoint
//! brings no scheduler config (SD1.5's is used, [`crate::models::sd15::scheduler_config`]) and
//! no tokenizer (the `tokenizer` setting, else CLIP's from the Hugging Face cache:
//! [`CHECKPOINT_TOKENIZERS`]).

use std::path::Path;

use anyhow::{Context, Result, bail};
use candle_core::{DType, Device};
use candle_nn::VarBuilder;

use super::vae::{VAE_CLASSES, VaeConfig};
use crate::models::clip::ClipTextConfig;
use crate::models::controlnet::ControlNetConfig;
use crate::models::sd15;
use crate::models::unet::UNet2DConditionConfig;
use crate::scheduler::SchedulerConfig;
use crate::single_file::{self, Part};
use crate::tokenizer::ClipTokenizer;
use crate::weights::{self, ComponentFiles};

use super::lora::{LoraSet, LoraSpec, LoraTarget};

/// Where the weights come from: each a diffusers-format directory, a Hugging Face repo id, or
/// (model, controlnet, vae) a single `.safetensors` file in the original layout.
#[derive(Debug, Clone)]
pub struct ModelSpec {
    /// A Stable Diffusion pipeline (model_index.json, unet/, vae/, text_encoder/, tokenizer/,
    /// scheduler/), or an SD1.x single-file checkpoint (`model.diffusion_model.*`,
    /// `first_stage_model.*`, `cond_stage_model.transformer.*`).
    pub model: String,
    /// A ControlNet model (config.json + diffusion_pytorch_model.safetensors), or a single-file
    /// ControlNet (`control_model.*`, e.g. control_v11p_sd15_canny.safetensors).
    pub controlnet: String,
    /// Weight file variant such as "fp16" (`diffusion_pytorch_model.fp16.safetensors`) of
    /// directories; single files are read as they are.
    pub variant: Option<String>,
    /// LoRAs fused into the UNet (and the text encoder where a file has text-encoder layers)
    /// at load time, in order; see [`super::lora`].
    pub loras: Vec<LoraSpec>,
    /// A VAE that replaces the pipeline's (`vae/`): a diffusers directory or repo id whose
    /// `config.json` names `AutoencoderKL` or `AutoencoderTiny` (e.g. madebyollin/taesd).
    /// The variant is used where the directory has it, else its plain weights. Or a single-file
    /// VAE (`encoder.*` / `decoder.*`, e.g. vae-ft-mse-840000-ema-pruned.safetensors).
    pub vae: Option<String>,
    /// A CLIP tokenizer directory (vocab.json + merges.txt, or tokenizer.json; or a folder with
    /// a `tokenizer/` holding them) or a repo id, replacing the model's. A single-file checkpoint
    /// holds no tokenizer: without this it is looked up in the Hugging Face cache
    /// ([`CHECKPOINT_TOKENIZERS`]).
    pub tokenizer: Option<String>,
}

impl ModelSpec {
    /// Settings that name local files or directories which do not exist: found without
    /// reading anything, so a caller (the element's `start`) can refuse them before loading.
    /// A setting that is neither an existing path nor a Hugging Face repo id (`owner/name`),
    /// or that names a `.safetensors` (or pickle) file, is a local path; repo ids are left to
    /// the loader (they may be cached or downloadable). The errors say which setting.
    pub fn check_local_paths(&self) -> Result<()> {
        let missing = |what: &str, spec: &str, file_kind: bool| -> Result<()> {
            let path = Path::new(spec);
            if spec.is_empty() || path.exists() {
                return Ok(());
            }
            let named_file = file_kind && path.extension().is_some();
            if named_file || !weights::looks_like_repo_id(spec) {
                bail!("{what} {spec} does not exist (and it is not a Hugging Face repo id like owner/name)");
            }
            Ok(())
        };
        missing("model", &self.model, single_file::names_a_file(&self.model))?;
        missing("ControlNet", &self.controlnet, single_file::names_a_file(&self.controlnet))?;
        if let Some(vae) = &self.vae {
            missing("VAE", vae, single_file::names_a_file(vae))?;
        }
        if let Some(tokenizer) = &self.tokenizer {
            missing("tokenizer", tokenizer, false)?;
        }
        for lora in &self.loras {
            // As `resolve_lora_file`: a source with an extension is a file.
            missing("LoRA file", &lora.source, true)?;
        }
        Ok(())
    }
}

/// Where a single-file checkpoint's tokenizer is looked for in the Hugging Face cache, in order:
/// (repo id, folder in the repo). The first is downloaded when none is cached (with the
/// `download` feature, unless HF_HUB_OFFLINE is set).
pub const CHECKPOINT_TOKENIZERS: &[(&str, &str)] = &[
    ("openai/clip-vit-large-patch14", ""),
    ("stable-diffusion-v1-5/stable-diffusion-v1-5", "tokenizer/"),
    ("runwayml/stable-diffusion-v1-5", "tokenizer/"),
];

/// The files a repo id must provide (for resolving it through the Hugging Face cache).
/// The tokenizer is `vocab.json` + `merges.txt` (+ `special_tokens_map.json`) or, as
/// transformers 5 saves it, `tokenizer.json` alone (see [`ClipTokenizer`]).
const PIPELINE_FILES: &[&[&str]] = &[
    &["model_index.json"],
    &["scheduler/scheduler_config.json"],
    &["tokenizer/vocab.json", "tokenizer/tokenizer.json"],
    &["tokenizer/merges.txt", "tokenizer/tokenizer.json"],
    &["tokenizer/tokenizer_config.json"],
    &["tokenizer/special_tokens_map.json", "tokenizer/tokenizer.json"],
    &["text_encoder/config.json"],
    &["text_encoder/model.safetensors", "text_encoder/model.fp16.safetensors"],
    &["unet/config.json"],
    &["unet/diffusion_pytorch_model.safetensors", "unet/diffusion_pytorch_model.fp16.safetensors"],
    &["vae/config.json"],
    &["vae/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.fp16.safetensors"],
];
const CONTROLNET_FILES: &[&[&str]] =
    &[&["config.json"], &["diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors"]];
/// A single-model directory (a ControlNet, a VAE) has the same files.
const VAE_FILES: &[&[&str]] = CONTROLNET_FILES;

/// One model component: its config, its weights, and where they came from (for errors).
pub struct Component<'a, C> {
    pub config: C,
    pub weights: VarBuilder<'a>,
    pub origin: String,
}

/// Everything a Stylizer is built from.
pub struct ModelParts<'a> {
    pub tokenizer: ClipTokenizer,
    pub text_encoder: Component<'a, ClipTextConfig>,
    pub unet: Component<'a, UNet2DConditionConfig>,
    pub controlnet: Component<'a, ControlNetConfig>,
    /// The pipeline's VAE or the one [`ModelSpec::vae`] names.
    pub vae: Component<'a, VaeConfig>,
    /// `scheduler/scheduler_config.json` (each scheduler reads its fields from it).
    pub scheduler: SchedulerConfig,
}

impl ModelParts<'static> {
    /// Locates, validates and memory-maps every component `spec` names; weights are read as
    /// `dtype` on `device`.
    pub fn from_spec(spec: &ModelSpec, device: &Device, dtype: DType) -> Result<Self> {
        let variant = spec.variant.as_deref();
        let vae_spec = spec.vae.as_deref().filter(|v| !v.is_empty());
        let model = if single_file::names_a_file(&spec.model) {
            let path = Path::new(&spec.model);
            // The checkpoint's own VAE is read only when no `vae` replaces it.
            let checkpoint = single_file::read_checkpoint(path, vae_spec.is_none()).context("cannot load the model")?;
            Model::File(path, Box::new(checkpoint))
        } else {
            let root = weights::resolve_model(&spec.model, PIPELINE_FILES)
                .with_context(|| format!("cannot find Stable Diffusion model {}", spec.model))?;
            check_pipeline_dir(&root)?;
            Model::Dir(root)
        };
        let controlnet = if single_file::names_a_file(&spec.controlnet) {
            let part =
                single_file::read_controlnet(Path::new(&spec.controlnet)).context("cannot load the controlnet")?;
            part_component(part, device, dtype, None)?
        } else {
            let dir = weights::resolve_model(&spec.controlnet, CONTROLNET_FILES)
                .with_context(|| format!("cannot find ControlNet model {}", spec.controlnet))?;
            component(&dir, variant, device, dtype, None)?
        };
        let loras = LoraSet::load(&spec.loras)?;
        let vae = vae_spec.map(|vae| load_vae(vae, variant, device, dtype)).transpose()?;
        let tokenizer_spec = spec.tokenizer.as_deref().filter(|t| !t.is_empty());
        let tokenizer = |fallback: &dyn Fn() -> Result<ClipTokenizer>| match tokenizer_spec {
            Some(t) => load_tokenizer(t),
            None => fallback(),
        };
        match model {
            Model::File(path, checkpoint) => {
                let checkpoint = *checkpoint;
                let vae = match (vae, checkpoint.vae) {
                    (Some(vae), _) => vae,
                    (None, Some(part)) => part_component(part.map_config(VaeConfig::Kl), device, dtype, None)?,
                    (None, None) => bail!(
                        "{} has no VAE (no first_stage_model.* tensors): name one with the vae setting (--vae, \
                         property vae)",
                        path.display()
                    ),
                };
                Ok(Self {
                    tokenizer: tokenizer(&|| checkpoint_tokenizer(path))?,
                    text_encoder: part_component(
                        checkpoint.text_encoder,
                        device,
                        dtype,
                        Some((&loras, LoraTarget::TextEncoder)),
                    )?,
                    unet: part_component(checkpoint.unet, device, dtype, Some((&loras, LoraTarget::Unet)))?,
                    vae,
                    controlnet,
                    scheduler: sd15::scheduler_config()?,
                })
            }
            Model::Dir(root) => {
                let vae = match vae {
                    Some(vae) => vae,
                    None => component(&root.join("vae"), variant, device, dtype, None)?,
                };
                Ok(Self {
                    tokenizer: tokenizer(&|| ClipTokenizer::from_dir(&root.join("tokenizer")))?,
                    text_encoder: component(
                        &root.join("text_encoder"),
                        variant,
                        device,
                        dtype,
                        Some((&loras, LoraTarget::TextEncoder)),
                    )?,
                    unet: component(&root.join("unet"), variant, device, dtype, Some((&loras, LoraTarget::Unet)))?,
                    vae,
                    controlnet,
                    scheduler: weights::read_config(&root.join("scheduler").join("scheduler_config.json"))?,
                })
            }
        }
    }
}

/// Where the pipeline's models come from.
enum Model<'a> {
    /// A single-file checkpoint, read.
    File(&'a Path, Box<single_file::Checkpoint>),
    /// A diffusers pipeline directory (resolved, checked).
    Dir(std::path::PathBuf),
}

/// The tokenizer a `tokenizer` setting names: a directory holding the tokenizer files or a
/// `tokenizer/` with them, or a repo id (the files at its root or in `tokenizer/`).
pub fn load_tokenizer(spec: &str) -> Result<ClipTokenizer> {
    let has_files = |dir: &Path| ["tokenizer.json", "vocab.json"].iter().any(|f| dir.join(f).is_file());
    let dir = weights::resolve_model(
        spec,
        &[&["vocab.json", "tokenizer.json", "tokenizer/vocab.json", "tokenizer/tokenizer.json"]],
    )
    .with_context(|| format!("cannot find tokenizer {spec}"))?;
    let dir = if !has_files(&dir) && has_files(&dir.join("tokenizer")) { dir.join("tokenizer") } else { dir };
    ClipTokenizer::from_dir(&dir).with_context(|| format!("cannot load tokenizer {spec}"))
}

/// The tokenizer of a single-file checkpoint (which holds none): CLIP's from the Hugging Face
/// cache ([`CHECKPOINT_TOKENIZERS`]), else downloaded where this build and the environment
/// allow, else an error saying how to get it.
fn checkpoint_tokenizer(checkpoint: &Path) -> Result<ClipTokenizer> {
    let files = |folder: &str| -> Vec<Vec<String>> {
        [["vocab.json", "tokenizer.json"], ["merges.txt", "tokenizer.json"]]
            .iter()
            .map(|alternatives| alternatives.iter().map(|f| format!("{folder}{f}")).collect())
            .collect()
    };
    fn as_refs(files: &[Vec<String>]) -> Vec<Vec<&str>> {
        files.iter().map(|a| a.iter().map(String::as_str).collect()).collect()
    }
    for (repo, folder) in CHECKPOINT_TOKENIZERS {
        let needed = files(folder);
        let needed = as_refs(&needed);
        let needed: Vec<&[&str]> = needed.iter().map(Vec::as_slice).collect();
        if let Some(snapshot) = weights::resolve_cached(repo, &needed) {
            tracing::info!(repo, "the single-file checkpoint's tokenizer comes from the Hugging Face cache");
            return ClipTokenizer::from_dir(&snapshot.join(folder));
        }
    }
    let (repo, folder) = CHECKPOINT_TOKENIZERS[0];
    let needed = files(folder);
    let needed = as_refs(&needed);
    let needed: Vec<&[&str]> = needed.iter().map(Vec::as_slice).collect();
    let why = match weights::resolve_model(repo, &needed) {
        Ok(snapshot) => return ClipTokenizer::from_dir(&snapshot.join(folder)),
        Err(e) => format!("{e:#}"),
    };
    let looked: Vec<String> = CHECKPOINT_TOKENIZERS
        .iter()
        .map(|(r, f)| format!("{r}{}", if f.is_empty() { String::new() } else { format!(" ({f})") }))
        .collect();
    bail!(
        "{} is a single-file checkpoint, which holds no tokenizer, and no CLIP tokenizer was found: looked in the \
         Hugging Face cache at {} for {} ({why}). Get SD1.5's tokenizer once with `hf download \
         openai/clip-vit-large-patch14 vocab.json merges.txt tokenizer_config.json special_tokens_map.json` (or \
         `huggingface-cli download` with the same arguments), or name a tokenizer directory with the tokenizer \
         setting (--tokenizer DIR)",
        checkpoint.display(),
        weights::cache_dir().display(),
        looked.join(", ")
    )
}

/// A component read from a single file, with the LoRAs for `lora` fused in.
fn part_component<C>(
    part: Part<C>,
    device: &Device,
    dtype: DType,
    lora: Option<(&LoraSet, LoraTarget)>,
) -> Result<Component<'static, C>> {
    let origin = format!("{} ({})", part.tensors.path().display(), part.tensors.what());
    let weights = match lora {
        Some((loras, target)) if loras.touches(target) => {
            loras.var_builder_over(target, Box::new(part.tensors), dtype, device)?
        }
        _ => part.tensors.var_builder(dtype, device),
    };
    Ok(Component { config: part.config, weights, origin })
}

/// A pipeline directory has `model_index.json`; a single model's directory given instead
/// (a VAE, a ControlNet) is named by its config's `_class_name`, a VAE with where it belongs.
fn check_pipeline_dir(root: &Path) -> Result<()> {
    let model_index = root.join("model_index.json");
    if model_index.is_file() {
        // Only its presence and shape are used: each component has its own config.
        let text =
            std::fs::read_to_string(&model_index).with_context(|| format!("cannot read {}", model_index.display()))?;
        let value: serde_json::Value = serde_json::from_str(&text).with_context(|| {
            format!(
                "{} is not valid JSON: {} is not a diffusers-format pipeline directory",
                model_index.display(),
                root.display()
            )
        })?;
        if !value.is_object() {
            bail!(
                "{} is a JSON {}, not an object: {} is not a diffusers-format Stable Diffusion pipeline directory",
                model_index.display(),
                json_kind(&value),
                root.display()
            );
        }
        return Ok(());
    }
    let class = class_name(&root.join("config.json"));
    match class.as_deref() {
        Some(class) if VAE_CLASSES.contains(&class) => bail!(
            "{} is a VAE directory ({class}), not a Stable Diffusion pipeline (it has no model_index.json): \
             pass it as the vae setting (--vae, property vae) and a pipeline as the model",
            root.display()
        ),
        Some(class) => bail!(
            "{} is missing: {} is a single {class} model, not a diffusers-format Stable Diffusion pipeline directory",
            model_index.display(),
            root.display()
        ),
        None => bail!(
            "{} is missing: {} is not a diffusers-format Stable Diffusion pipeline directory",
            model_index.display(),
            root.display()
        ),
    }
}

/// What kind of JSON value this is, for errors.
fn json_kind(value: &serde_json::Value) -> &'static str {
    match value {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "boolean",
        serde_json::Value::Number(_) => "number",
        serde_json::Value::String(_) => "string",
        serde_json::Value::Array(_) => "list",
        serde_json::Value::Object(_) => "object",
    }
}

/// The `_class_name` of a diffusers config file, if it has one and parses.
fn class_name(config: &Path) -> Option<String> {
    let text = std::fs::read_to_string(config).ok()?;
    let value: serde_json::Value = serde_json::from_str(&text).ok()?;
    Some(value.get("_class_name")?.as_str()?.to_string())
}

/// The VAE a `vae` setting names (the loader's, and the bench's with random weights): its
/// directory (or repo id), whose config must say which kind it is; the variant's weights where
/// it has them, else the plain ones. Or a single-file VAE (an AutoencoderKL; its config from
/// the shapes). Errors start with "cannot load the VAE <spec>".
pub fn load_vae(
    spec: &str,
    variant: Option<&str>,
    device: &Device,
    dtype: DType,
) -> Result<Component<'static, VaeConfig>> {
    if single_file::names_a_file(spec) {
        return single_file::read_vae(Path::new(spec))
            .and_then(|part| part_component(part.map_config(VaeConfig::Kl), device, dtype, None))
            .with_context(|| format!("cannot load the VAE {spec}"));
    }
    load_vae_dir(spec, variant, device, dtype).with_context(|| format!("cannot load the VAE {spec}"))
}

fn load_vae_dir(
    spec: &str,
    variant: Option<&str>,
    device: &Device,
    dtype: DType,
) -> Result<Component<'static, VaeConfig>> {
    let dir = weights::resolve_model(spec, VAE_FILES)?;
    let files = ComponentFiles::locate(&dir, None)?;
    let text = std::fs::read_to_string(&files.config)
        .with_context(|| format!("cannot read config file {}", files.config.display()))?;
    let value: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("invalid config file {}", files.config.display()))?;
    match value.get("_class_name").and_then(|v| v.as_str()) {
        Some(class) if VAE_CLASSES.contains(&class) => {}
        Some(class) => bail!(
            "{} names _class_name {class:?}, which is not a VAE (expected {})",
            files.config.display(),
            VAE_CLASSES.join(" or ")
        ),
        None => bail!(
            "{} has no _class_name: cannot tell which VAE it is (expected {})",
            files.config.display(),
            VAE_CLASSES.join(" or ")
        ),
    }
    // A variant the directory lacks falls back to its plain weights (`ComponentFiles::locate`).
    component(&dir, variant, device, dtype, None)
}

fn component<C: serde::de::DeserializeOwned>(
    dir: &Path,
    variant: Option<&str>,
    device: &Device,
    dtype: DType,
    lora: Option<(&LoraSet, LoraTarget)>,
) -> Result<Component<'static, C>> {
    let files = ComponentFiles::locate(dir, variant)?;
    let weights = match lora {
        Some((loras, target)) => loras.var_builder(target, &files.weights, dtype, device)?,
        None => files.var_builder(dtype, device)?,
    };
    Ok(Component { config: files.read_config()?, weights, origin: files.dir.display().to_string() })
}
