//! Single-frame ControlNet img2img, computed as diffusers'
//! `StableDiffusionControlNetImg2ImgPipeline` does with DDIM, except that the VAE posterior
//! is taken at its mean (deterministic: no per-frame sampling noise, no flicker from it).

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use anyhow::{Context, Result, bail};
use candle_core::{DType, Device, Tensor};

use crate::models::attention::{NoHook, SelfAttentionHook};
use crate::models::clip::{ClipTextConfig, ClipTextModel};
use crate::models::controlnet::{ControlCondition, ControlNetConfig, ControlNetModel};
use crate::models::unet::{UNet2DConditionConfig, UNet2DConditionModel};
use crate::models::vae::{AutoencoderKL, AutoencoderKLConfig};
use crate::ops::step_graphs::{GraphStats, StepGraphs, StepKey};
use crate::scheduler::{DdimScheduler, DdimSchedulerConfig};
use crate::tokenizer::ClipTokenizer;
use crate::weights::{self, ComponentFiles};

/// Per-frame generation settings; everything here may change between frames.
#[derive(Debug, Clone, PartialEq)]
pub struct FrameSettings {
    pub prompt: String,
    pub negative_prompt: String,
    pub steps: usize,
    pub strength: f64,
    pub guidance_scale: f64,
    pub controlnet_scale: f64,
}

impl Default for FrameSettings {
    /// The original project's settings (see the technique note).
    fn default() -> Self {
        Self {
            prompt: String::new(),
            negative_prompt: String::new(),
            steps: 20,
            strength: 0.9,
            guidance_scale: 7.5,
            controlnet_scale: 0.7,
        }
    }
}

impl FrameSettings {
    /// Classifier-free guidance runs the UNet on an unconditional half only when it matters,
    /// as diffusers does (`guidance_scale > 1`).
    pub fn uses_guidance(&self) -> bool {
        self.guidance_scale > 1.0
    }
}

/// What a frame's denoising loop will run: cross-frame state is only reusable between
/// frames with equal plans.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FramePlan {
    pub timesteps: Vec<usize>,
    pub width: usize,
    pub height: usize,
    /// UNet batch size: 2 with classifier-free guidance, else 1.
    pub batch: usize,
}

/// Observes one frame's denoising loop and supplies the UNet's self-attention hook.
/// The cross-frame attention state implements this; `PlainFrame` is plain img2img.
pub trait FrameHook {
    /// Called once per frame, before the first step.
    fn begin_frame(&mut self, _plan: &FramePlan) -> Result<()> {
        Ok(())
    }
    /// Called before the UNet call of denoising step `index` (at `timestep`).
    fn begin_step(&mut self, _index: usize, _timestep: usize) -> Result<()> {
        Ok(())
    }
    /// The hook the UNet calls at each self-attention during the current step.
    fn attention_hook(&mut self) -> &mut dyn SelfAttentionHook;
    /// Called after `begin_step`: `Some(key)` when the current step may be captured in a CUDA
    /// graph and later replayed without calling the hook, because all the hook does at this
    /// step is device work on buffers that stay where they are, the same for every step with
    /// this key. `None` (the default) keeps the step eager.
    fn graph_key(&self) -> Option<u64> {
        None
    }
    /// Called after the frame's last step.
    fn end_frame(&mut self) -> Result<()> {
        Ok(())
    }
}

/// Plain per-frame img2img: no cross-frame state.
#[derive(Debug, Default)]
pub struct PlainFrame(NoHook);

impl FrameHook for PlainFrame {
    fn graph_key(&self) -> Option<u64> {
        Some(0)
    }

    fn attention_hook(&mut self) -> &mut dyn SelfAttentionHook {
        &mut self.0
    }
}

/// Where the weights come from: each a diffusers-format directory or a Hugging Face repo id.
#[derive(Debug, Clone)]
pub struct ModelSpec {
    /// A Stable Diffusion pipeline (model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/).
    pub model: String,
    /// A ControlNet model (config.json + diffusion_pytorch_model.safetensors).
    pub controlnet: String,
    /// Weight file variant such as "fp16" (`diffusion_pytorch_model.fp16.safetensors`).
    pub variant: Option<String>,
}

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

/// Prompt embeddings kept while the prompt pair is unchanged.
struct PromptCache {
    prompt: String,
    negative_prompt: String,
    guidance: bool,
    embeddings: Tensor,
}

/// A point in one frame's computation, reported to a [`StageObserver`] when it is done.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// VAE encode, noising to the first timestep, and the control image's embedding.
    Encoded,
    /// Denoising step `index` (UNet + ControlNet, guidance, scheduler).
    Step(usize),
    /// VAE decode.
    Decoded,
}

/// Sees each stage of a frame end (the benchmark times them; the pipeline passes `()`).
pub trait StageObserver {
    fn stage_done(&mut self, stage: Stage) -> Result<()>;
}

impl StageObserver for () {
    fn stage_done(&mut self, _stage: Stage) -> Result<()> {
        Ok(())
    }
}

/// The UNet, ControlNet, VAE and scheduler, and one frame of ControlNet img2img with them
/// (the text encoder is separate: its embeddings are an input, cached while the prompt stays).
pub struct Img2Img {
    unet: UNet2DConditionModel,
    controlnet: ControlNetModel,
    vae: AutoencoderKL,
    scheduler: DdimScheduler,
    latent_channels: usize,
    vae_scale_factor: usize,
    dtype: DType,
    /// Captured denoising steps (CUDA); behind a Mutex because `run` takes `&self`.
    step_graphs: Mutex<StepGraphs>,
}

impl Img2Img {
    /// `vae_config` is the VAE's (latent channels, downscale factor); `dtype` the models' dtype.
    pub fn new(
        unet: UNet2DConditionModel,
        controlnet: ControlNetModel,
        vae: AutoencoderKL,
        vae_config: &AutoencoderKLConfig,
        scheduler: DdimScheduler,
        dtype: DType,
    ) -> Self {
        Self {
            unet,
            controlnet,
            vae,
            scheduler,
            latent_channels: vae_config.latent_channels,
            vae_scale_factor: 1 << vae_config.block_out_channels.len().saturating_sub(1),
            dtype,
            step_graphs: Mutex::new(StepGraphs::default()),
        }
    }

    /// How denoising steps ran so far: eagerly, captured, replayed (see `step_graphs`), and
    /// why the last capture failed, if one did.
    pub fn graph_stats(&self) -> (GraphStats, Option<String>) {
        self.step_graphs.lock().map(|g| (g.stats(), g.last_error().map(str::to_string))).unwrap_or_default()
    }

    /// Frame sizes must be multiples of this (8 for SD).
    pub fn vae_scale_factor(&self) -> usize {
        self.vae_scale_factor
    }

    /// Channels of the control image the ControlNet takes (3 for Canny).
    pub fn control_channels(&self) -> usize {
        self.controlnet.config().conditioning_channels
    }

    /// The timesteps a frame with these settings runs; an error when there are none.
    pub fn timesteps(&self, settings: &FrameSettings) -> Result<Vec<usize>> {
        self.scheduler.img2img_timesteps(settings.steps, settings.strength)
    }

    /// Shape of the initial noise for a frame of `width` x `height` pixels.
    pub fn noise_shape(&self, width: usize, height: usize) -> (usize, usize, usize, usize) {
        (1, self.latent_channels, height / self.vae_scale_factor, width / self.vae_scale_factor)
    }

    /// One frame. `frame` and `control` are `[1, 3, H, W]` in [0, 1] at the processing size (a
    /// multiple of `vae_scale_factor`); `embeddings` the text embeddings (`[negative; positive]`
    /// with guidance); `noise` has `noise_shape`. Returns `[1, 3, H, W]` f32 in [0, 1].
    #[allow(clippy::too_many_arguments)]
    pub fn run(
        &self,
        frame: &Tensor,
        control: &Tensor,
        embeddings: &Tensor,
        settings: &FrameSettings,
        noise: &Tensor,
        hook: &mut dyn FrameHook,
        observer: &mut dyn StageObserver,
    ) -> Result<Tensor> {
        let (_, _, height, width) = frame.dims4().context("frame must be a [1, 3, H, W] tensor")?;
        if height % self.vae_scale_factor != 0 || width % self.vae_scale_factor != 0 {
            bail!("frame size {width}x{height} is not a multiple of {}", self.vae_scale_factor);
        }
        if control.dims4()? != frame.dims4()? {
            bail!("control image shape {:?} differs from the frame's {:?}", control.dims(), frame.dims());
        }
        let expected_noise = self.noise_shape(width, height);
        if noise.dims4()? != expected_noise {
            bail!(
                "initial noise has shape {:?}, expected {expected_noise:?} for a {width}x{height} frame",
                noise.dims()
            );
        }
        let timesteps = self.timesteps(settings)?;
        let _span = tracing::info_span!("stylize_frame", width, height, steps = timesteps.len()).entered();
        let guidance = settings.uses_guidance();
        let batch = if guidance { 2 } else { 1 };

        let latents = {
            let _span = tracing::info_span!("vae_encode").entered();
            let image = ((frame.to_dtype(self.dtype)? * 2.0)? - 1.0)?;
            (self.vae.encode_mean(&image)? * self.vae.scaling_factor())?
        };
        let noise = noise.to_dtype(self.dtype)?;
        let mut latents = self.scheduler.add_noise(&latents, &noise, timesteps[0])?;
        // Once per frame, for every step and both guidance halves (diffusers redoes it per step).
        let condition = self.controlnet.embed_condition(&control.to_dtype(self.dtype)?)?;
        observer.stage_done(Stage::Encoded)?;

        hook.begin_frame(&FramePlan { timesteps: timesteps.clone(), width, height, batch })?;
        let mut graphs = self.step_graphs.lock().map_err(|_| anyhow::anyhow!("step graphs poisoned by a panic"))?;
        // Small uploads (the timestep embedding, kernel shape arguments) are cached by content
        // so that a later capture of the same step finds them on the device.
        #[cfg(feature = "cuda")]
        let _upload_cache = match frame.device() {
            Device::Cuda(cuda) if StepGraphs::enabled_for(frame.device()) => Some(cuda.enable_cuda_graph_htod_cache()),
            _ => None,
        };
        for (index, &timestep) in timesteps.iter().enumerate() {
            let _span = tracing::debug_span!("denoise_step", index, timestep).entered();
            hook.begin_step(index, timestep)?;
            let model_input = latents.repeat((batch, 1, 1, 1))?;
            let key = StepKey {
                index,
                timestep,
                controlnet_scale_bits: settings.controlnet_scale.to_bits(),
                hook: hook.graph_key(),
            };
            let inputs = [&model_input, embeddings, condition.tensor()];
            let noise_pred = graphs.run(frame.device(), key, &inputs, |inputs| {
                let [model_input, embeddings, condition] = inputs else {
                    candle_core::bail!("a denoising step takes three inputs")
                };
                let residuals = self.controlnet.forward_embedded(
                    model_input,
                    timestep as f64,
                    embeddings,
                    &ControlCondition::from_embedding(condition.clone()),
                    settings.controlnet_scale,
                )?;
                self.unet.forward(model_input, timestep as f64, embeddings, Some(&residuals), hook.attention_hook())
            })?;
            let noise_pred = if guidance {
                let uncond = noise_pred.narrow(0, 0, 1)?;
                let cond = noise_pred.narrow(0, 1, 1)?;
                (&uncond + ((cond - &uncond)? * settings.guidance_scale)?)?
            } else {
                noise_pred
            };
            latents = self.scheduler.step(&noise_pred, timestep, &latents, settings.steps)?;
            observer.stage_done(Stage::Step(index))?;
        }
        hook.end_frame()?;

        let _span = tracing::info_span!("vae_decode").entered();
        let image = self.vae.decode(&(latents / self.vae.scaling_factor())?)?;
        let image = ((image.to_dtype(DType::F32)? / 2.0)? + 0.5)?.clamp(0f32, 1f32)?;
        observer.stage_done(Stage::Decoded)?;
        Ok(image)
    }
}

/// The loaded models and the per-frame img2img computation.
pub struct Stylizer {
    tokenizer: ClipTokenizer,
    text_encoder: ClipTextModel,
    img2img: Img2Img,
    device: Device,
    prompt_cache: Option<PromptCache>,
}

impl Stylizer {
    /// Loads every model. `dtype` is the compute and weight dtype (f32 on the CPU).
    pub fn load(spec: &ModelSpec, device: &Device, dtype: DType) -> Result<Self> {
        let _span = tracing::info_span!("load_models", model = %spec.model, controlnet = %spec.controlnet).entered();
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
        let component = |name: &str| -> Result<ComponentFiles> { ComponentFiles::locate(&root.join(name), variant) };

        let tokenizer = ClipTokenizer::from_dir(&root.join("tokenizer"))?;

        let text_files = component("text_encoder")?;
        let text_config: ClipTextConfig = text_files.read_config()?;
        let text_encoder = ClipTextModel::new(text_files.var_builder(dtype, device)?, &text_config)
            .with_context(|| format!("cannot build the text encoder from {}", text_files.dir.display()))?;

        let unet_files = component("unet")?;
        let unet_config: UNet2DConditionConfig = unet_files.read_config()?;
        let unet = UNet2DConditionModel::new(unet_files.var_builder(dtype, device)?, &unet_config)
            .with_context(|| format!("cannot build the UNet from {}", unet_files.dir.display()))?;

        let vae_files = component("vae")?;
        let vae_config: AutoencoderKLConfig = vae_files.read_config()?;
        let vae = AutoencoderKL::new(vae_files.var_builder(dtype, device)?, &vae_config)
            .with_context(|| format!("cannot build the VAE from {}", vae_files.dir.display()))?;

        let controlnet_files = ComponentFiles::locate(&controlnet_dir, variant)?;
        let controlnet_config: ControlNetConfig = controlnet_files.read_config()?;
        let controlnet = ControlNetModel::new(controlnet_files.var_builder(dtype, device)?, &controlnet_config)
            .with_context(|| format!("cannot build the ControlNet from {}", controlnet_files.dir.display()))?;

        let scheduler_config: DdimSchedulerConfig =
            weights::read_config(&root.join("scheduler").join("scheduler_config.json"))?;
        let scheduler = DdimScheduler::new(&scheduler_config)?;

        Ok(Self {
            tokenizer,
            text_encoder,
            img2img: Img2Img::new(unet, controlnet, vae, &vae_config, scheduler, dtype),
            device: device.clone(),
            prompt_cache: None,
        })
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// How denoising steps ran so far (CUDA graphs: eager, captured, replayed, failed) and
    /// why the last capture failed.
    pub fn graph_stats(&self) -> (GraphStats, Option<String>) {
        self.img2img.graph_stats()
    }

    /// Frame sizes must be multiples of this (8 for SD).
    pub fn vae_scale_factor(&self) -> usize {
        self.img2img.vae_scale_factor()
    }

    /// The timesteps a frame with these settings runs; an error when there are none.
    pub fn timesteps(&self, settings: &FrameSettings) -> Result<Vec<usize>> {
        self.img2img.timesteps(settings)
    }

    /// Shape of the initial noise for a frame of `width` x `height` pixels.
    pub fn noise_shape(&self, width: usize, height: usize) -> (usize, usize, usize, usize) {
        self.img2img.noise_shape(width, height)
    }

    /// Deterministic standard-normal noise for a frame, the same on every machine for a seed.
    pub fn seeded_noise(&self, seed: u64, width: usize, height: usize) -> Result<Tensor> {
        use rand::SeedableRng;
        use rand_distr::Distribution;
        let shape = self.noise_shape(width, height);
        let count = shape.0 * shape.1 * shape.2 * shape.3;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let normal = rand_distr::StandardNormal;
        let values: Vec<f32> = (0..count).map(|_| normal.sample(&mut rng)).collect();
        Ok(Tensor::from_vec(values, shape, &self.device)?)
    }

    /// Text embeddings for CFG (`[negative; positive]`) or the positive prompt alone,
    /// recomputed only when the prompts change.
    fn prompt_embeddings(&mut self, settings: &FrameSettings) -> Result<Tensor> {
        let guidance = settings.uses_guidance();
        if let Some(cache) = &self.prompt_cache
            && cache.prompt == settings.prompt
            && cache.negative_prompt == settings.negative_prompt
            && cache.guidance == guidance
        {
            return Ok(cache.embeddings.clone());
        }
        let _span = tracing::info_span!("encode_prompt").entered();
        let positive = self.encode_text(&settings.prompt)?;
        let embeddings = if guidance {
            let negative = self.encode_text(&settings.negative_prompt)?;
            Tensor::cat(&[negative, positive], 0)?
        } else {
            positive
        };
        self.prompt_cache = Some(PromptCache {
            prompt: settings.prompt.clone(),
            negative_prompt: settings.negative_prompt.clone(),
            guidance,
            embeddings: embeddings.clone(),
        });
        Ok(embeddings)
    }

    fn encode_text(&self, text: &str) -> Result<Tensor> {
        let tokens = self.tokenizer.encode(text)?;
        let ids = Tensor::new(tokens.ids.as_slice(), &self.device)?.unsqueeze(0)?;
        Ok(self.text_encoder.forward(&ids)?)
    }

    /// Stylizes one frame.
    /// `frame` and `control` are `[1, 3, H, W]` in [0, 1] at the processing size (a multiple
    /// of `vae_scale_factor`); `noise` has `noise_shape`. Returns `[1, 3, H, W]` f32 in [0, 1].
    pub fn stylize(
        &mut self,
        frame: &Tensor,
        control: &Tensor,
        settings: &FrameSettings,
        noise: &Tensor,
        hook: &mut dyn FrameHook,
    ) -> Result<Tensor> {
        let embeddings = self.prompt_embeddings(settings)?;
        self.img2img.run(frame, control, &embeddings, settings, noise, hook, &mut ())
    }
}

/// Rounds a size down to a multiple of `factor` as diffusers' image processor does.
pub fn processing_size(width: usize, height: usize, factor: usize) -> Result<(usize, usize)> {
    let (w, h) = (width / factor * factor, height / factor * factor);
    if w == 0 || h == 0 {
        bail!("frame size {width}x{height} is smaller than the model's minimum of {factor}x{factor}");
    }
    Ok((w, h))
}

/// Reads an initial-noise tensor named `noise` (or the file's only tensor) from a safetensors file.
pub fn load_noise_file(path: &Path, device: &Device) -> Result<Tensor> {
    let tensors = candle_core::safetensors::load(path, device)
        .with_context(|| format!("cannot read noise file {}", path.display()))?;
    let tensor = match tensors.get("noise") {
        Some(t) => t.clone(),
        None if tensors.len() == 1 => tensors.into_values().next().expect("one tensor"),
        None => bail!(
            "noise file {} has no tensor named \"noise\" (found: {})",
            path.display(),
            tensors.keys().cloned().collect::<Vec<_>>().join(", ")
        ),
    };
    Ok(tensor.to_dtype(DType::F32)?)
}

/// Collects a sequence of image paths: files as given, directories expanded to their
/// PNG/JPEG files in name order.
pub fn collect_images(inputs: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for input in inputs {
        if input.is_dir() {
            let mut files: Vec<PathBuf> = std::fs::read_dir(input)
                .with_context(|| format!("cannot list {}", input.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| {
                    p.extension()
                        .and_then(|e| e.to_str())
                        .is_some_and(|e| matches!(e.to_ascii_lowercase().as_str(), "png" | "jpg" | "jpeg"))
                })
                .collect();
            files.sort();
            if files.is_empty() {
                bail!("directory {} holds no PNG or JPEG images", input.display());
            }
            out.extend(files);
        } else if input.is_file() {
            out.push(input.clone());
        } else {
            bail!("input image {} does not exist", input.display());
        }
    }
    Ok(out)
}
