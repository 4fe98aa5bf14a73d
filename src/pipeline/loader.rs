//! Loading: where the weights come from ([`ModelSpec`]), and everything a
//! [`Stylizer`](super::Stylizer) is built from ([`ModelParts`]): each component's config and
//! weights, read from diffusers-format directories or supplied by the caller (the benchmark's
//! random weights).

use std::path::Path;

use anyhow::{Context, Result, bail};
use candle_core::{DType, Device};
use candle_nn::VarBuilder;

use crate::models::clip::ClipTextConfig;
use crate::models::controlnet::ControlNetConfig;
use crate::models::unet::UNet2DConditionConfig;
use crate::models::vae::AutoencoderKLConfig;
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
}

/// The files a repo id must provide (for resolving it through the Hugging Face cache).
const PIPELINE_FILES: &[&[&str]] = &[
    &["model_index.json"],
    &["scheduler/scheduler_config.json"],
    &["tokenizer/vocab.json"],
    &["tokenizer/merges.txt"],
    &["tokenizer/tokenizer_config.json"],
    &["tokenizer/special_tokens_map.json"],
    &["text_encoder/config.json"],
    &["text_encoder/model.safetensors", "text_encoder/model.fp16.safetensors"],
    &["unet/config.json"],
    &["unet/diffusion_pytorch_model.safetensors", "unet/diffusion_pytorch_model.fp16.safetensors"],
    &["vae/config.json"],
    &["vae/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.fp16.safetensors"],
];
const CONTROLNET_FILES: &[&[&str]] =
    &[&["config.json"], &["diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors"]];

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
    pub vae: Component<'a, AutoencoderKLConfig>,
    /// `scheduler/scheduler_config.json` (each scheduler reads its fields from it).
    pub scheduler: SchedulerConfig,
}

impl ModelParts<'static> {
    /// Locates, validates and memory-maps every component `spec` names; weights are read as
    /// `dtype` on `device`.
    pub fn from_spec(spec: &ModelSpec, device: &Device, dtype: DType) -> Result<Self> {
        let root = weights::resolve_model(&spec.model, PIPELINE_FILES)
            .with_context(|| format!("cannot find Stable Diffusion model {}", spec.model))?;
        let controlnet_dir = weights::resolve_model(&spec.controlnet, CONTROLNET_FILES)
            .with_context(|| format!("cannot find ControlNet model {}", spec.controlnet))?;
        let model_index = root.join("model_index.json");
        if !model_index.is_file() {
            bail!(
                "{} is missing: {} is not a diffusers-format Stable Diffusion pipeline directory",
                model_index.display(),
                root.display()
            );
        }
        let variant = spec.variant.as_deref();
        let loras = LoraSet::load(&spec.loras)?;
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
            vae: component(&root.join("vae"), variant, device, dtype, None)?,
            controlnet: component(&controlnet_dir, variant, device, dtype, None)?,
            scheduler: weights::read_config(&root.join("scheduler").join("scheduler_config.json"))?,
        })
    }
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
