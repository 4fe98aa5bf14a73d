//! Loading: where the weights come from ([`ModelSpec`]), and everything a
//! [`Stylizer`](super::Stylizer) is built from ([`ModelParts`]): each component's config and
//! weights, read from diffusers-format directories or supplied by the caller (the benchmark's
//! random weights). A `vae` directory replaces the pipeline's own VAE; its kind (full
//! AutoencoderKL or tiny AutoencoderTiny) is its config's `_class_name`.

use std::path::Path;

use anyhow::{Context, Result, bail};
use candle_core::{DType, Device};
use candle_nn::VarBuilder;

use super::vae::{VAE_CLASSES, VaeConfig};
use crate::models::clip::ClipTextConfig;
use crate::models::controlnet::ControlNetConfig;
use crate::models::unet::UNet2DConditionConfig;
use crate::scheduler::SchedulerConfig;
use crate::tokenizer::ClipTokenizer;
use crate::weights::{self, ComponentFiles};

use super::lora::{LoraSet, LoraSpec, LoraTarget};

/// Where the weights come from: each a diffusers-format directory or a Hugging Face repo id.
#[derive(Debug, Clone)]
pub struct ModelSpec {
    /// A Stable Diffusion pipeline (model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/).
    pub model: String,
    /// A ControlNet model (config.json + diffusion_pytorch_model.safetensors).
    pub controlnet: String,
    /// Weight file variant such as "fp16" (`diffusion_pytorch_model.fp16.safetensors`).
    pub variant: Option<String>,
    /// LoRAs fused into the UNet (and the text encoder where a file has text-encoder layers)
    /// at load time, in order; see [`super::lora`].
    pub loras: Vec<LoraSpec>,
    /// A VAE that replaces the pipeline's (`vae/`): a diffusers directory or repo id whose
    /// `config.json` names `AutoencoderKL` or `AutoencoderTiny` (e.g. madebyollin/taesd).
    /// The variant is used where the directory has it, else its plain weights.
    pub vae: Option<String>,
}

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
        let root = weights::resolve_model(&spec.model, PIPELINE_FILES)
            .with_context(|| format!("cannot find Stable Diffusion model {}", spec.model))?;
        check_pipeline_dir(&root)?;
        let controlnet_dir = weights::resolve_model(&spec.controlnet, CONTROLNET_FILES)
            .with_context(|| format!("cannot find ControlNet model {}", spec.controlnet))?;
        let variant = spec.variant.as_deref();
        let loras = LoraSet::load(&spec.loras)?;
        let vae = match spec.vae.as_deref().filter(|v| !v.is_empty()) {
            Some(vae) => load_vae(vae, variant, device, dtype)?,
            None => component(&root.join("vae"), variant, device, dtype, None)?,
        };
        Ok(Self {
            tokenizer: ClipTokenizer::from_dir(&root.join("tokenizer"))?,
            text_encoder: component(
                &root.join("text_encoder"),
                variant,
                device,
                dtype,
                Some((&loras, LoraTarget::TextEncoder)),
            )?,
            unet: component(&root.join("unet"), variant, device, dtype, Some((&loras, LoraTarget::Unet)))?,
            vae,
            controlnet: component(&controlnet_dir, variant, device, dtype, None)?,
            scheduler: weights::read_config(&root.join("scheduler").join("scheduler_config.json"))?,
        })
    }
}

/// A pipeline directory has `model_index.json`; a single model's directory given instead
/// (a VAE, a ControlNet) is named by its config's `_class_name`, a VAE with where it belongs.
fn check_pipeline_dir(root: &Path) -> Result<()> {
    let model_index = root.join("model_index.json");
    if model_index.is_file() {
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

/// The `_class_name` of a diffusers config file, if it has one and parses.
fn class_name(config: &Path) -> Option<String> {
    let text = std::fs::read_to_string(config).ok()?;
    let value: serde_json::Value = serde_json::from_str(&text).ok()?;
    Some(value.get("_class_name")?.as_str()?.to_string())
}

/// The VAE a `vae` setting names (the loader's, and the bench's with random weights): its
/// directory (or repo id), whose config must say which kind it is; the variant's weights where
/// it has them, else the plain ones. Errors start with "cannot load the VAE <spec>".
pub fn load_vae(
    spec: &str,
    variant: Option<&str>,
    device: &Device,
    dtype: DType,
) -> Result<Component<'static, VaeConfig>> {
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
