//! The loaded models ([`SharedModels`]: the text encoder and the per-frame [`Img2Img`], shared
//! through the process-wide [`super::registry`]) and a user's handle on them ([`Stylizer`],
//! with its own prompt-embedding cache).

use std::sync::Arc;

use anyhow::{Context, Result, bail};
use candle_core::{DType, Device, Tensor};

use super::batcher::StreamBatcher;
use super::cancel::CancelHandle;
use super::hooks::FrameHook;
use super::img2img::{DenoisingFrame, FrameInputs, Img2Img};
use super::loader::{ModelParts, ModelSpec};
use super::noise::{self, FrameNoise};
use super::registry;
use super::settings::FrameSettings;
use super::vae::Vae;
use crate::models::clip::ClipTextModel;
use crate::models::controlnet::ControlNetModel;
use crate::models::unet::UNet2DConditionModel;
use crate::scheduler::Schedulers;
use crate::tokenizer::ClipTokenizer;

/// Prompt embeddings kept while the prompt pair is unchanged.
struct PromptCache {
    prompt: String,
    negative_prompt: String,
    guidance: bool,
    embeddings: Tensor,
}

/// The loaded models: the tokenizer and text encoder, and the [`Img2Img`] (UNet, ControlNet,
/// VAE, schedulers, CUDA graph caches). Read-only after loading except for the graph caches,
/// which sit behind Mutexes and are keyed so that several users can share them (see
/// [`Img2Img`]); nothing of one stream is kept here. Shared through [`registry::get`].
pub struct SharedModels {
    tokenizer: ClipTokenizer,
    text_encoder: ClipTextModel,
    img2img: Img2Img,
    device: Device,
    /// Where the streams sharing these models meet to batch their denoising calls.
    batcher: Arc<StreamBatcher>,
}

impl SharedModels {
    /// The loaded models for `spec` on `device` in `dtype`, shared with every other user that
    /// asked for equal settings (see [`registry::get`]; loaded when none holds them).
    pub fn get(spec: &ModelSpec, device: &Device, dtype: DType) -> Result<Arc<Self>> {
        registry::get(spec, device, dtype, "")
    }

    /// Loads every model `spec` names, unshared. `dtype` is the compute and weight dtype (f32
    /// on the CPU).
    pub fn load(spec: &ModelSpec, device: &Device, dtype: DType) -> Result<Self> {
        let vae = spec.vae.as_deref().unwrap_or("the model's");
        let _span =
            tracing::info_span!("load_models", model = %spec.model, controlnet = %spec.controlnet, vae).entered();
        Self::build(ModelParts::from_spec(spec, device, dtype)?, device, dtype)
    }

    /// Builds the models from their configs and weights.
    pub fn build(parts: ModelParts<'_>, device: &Device, dtype: DType) -> Result<Self> {
        let ModelParts { tokenizer, text_encoder, unet, controlnet, vae, scheduler } = parts;
        let text_encoder = ClipTextModel::new(text_encoder.weights, &text_encoder.config)
            .with_context(|| format!("cannot build the text encoder from {}", text_encoder.origin))?;
        let unet_model = UNet2DConditionModel::new(unet.weights, &unet.config)
            .with_context(|| format!("cannot build the UNet from {}", unet.origin))?;
        // After the UNet: a config that does not fit its own weights is reported as such first.
        if vae.config.latent_channels() != unet.config.in_channels {
            bail!(
                "the VAE from {} ({}) has {} latent channels but the UNet from {} takes {}: they are not models of one family",
                vae.origin,
                vae.config.class_name(),
                vae.config.latent_channels(),
                unet.origin,
                unet.config.in_channels
            );
        }
        // The weights the VAE is built from are kept for its copy on the VAE stream (the same
        // values whatever the weights' source, random ones included).
        let stream_device = match crate::ops::vae_stream::open(device) {
            Ok(stream_device) => stream_device,
            Err(e) => {
                // The frames are the same without it, only slower.
                tracing::warn!("the VAE runs on the UNet's stream: {e:#}");
                None
            }
        };
        let recorded = stream_device.as_ref().map(|_| Arc::new(RecordedWeights::new(vae.weights.clone())));
        let vae_weights = match &recorded {
            Some(recorded) => {
                candle_nn::VarBuilder::from_backend(Box::new(Recorder(recorded.clone())), dtype, device.clone())
            }
            None => vae.weights,
        };
        let vae_model = Vae::new(vae_weights, &vae.config)
            .with_context(|| format!("cannot build the VAE ({}) from {}", vae.config.class_name(), vae.origin))?;
        let controlnet_model = ControlNetModel::new(controlnet.weights, &controlnet.config)
            .with_context(|| format!("cannot build the ControlNet from {}", controlnet.origin))?;
        let scheduler = Schedulers::new(&scheduler)?;
        let mut img2img = Img2Img::new(unet_model, controlnet_model, vae_model, &vae.config, scheduler, dtype);
        if let (Some(stream_device), Some(recorded)) = (stream_device, recorded) {
            let copies = Self::vae_stream(device, &stream_device, &recorded, &vae.config, dtype)
                .and_then(|vae| Ok((vae, img2img.condition_embedder_on(&stream_device)?)))
                .and_then(|copies| {
                    stream_device.synchronize()?;
                    Ok(copies)
                });
            match copies {
                Ok((vae_copy, control)) => img2img.set_vae_stream(stream_device, vae_copy, control),
                Err(e) => tracing::warn!("the VAE runs on the UNet's stream: {e:#}"),
            }
        }
        // The weights were uploaded on this thread's CUDA stream; the models' users run on
        // streams of their own that nothing orders with it.
        device.synchronize().context("waiting for the weights' upload to the device")?;
        Ok(Self { tokenizer, text_encoder, img2img, device: device.clone(), batcher: Arc::default() })
    }

    /// The VAE again on `stream_device` (see [`crate::ops::vae_stream`]), from a copy of the
    /// weights the first one was built from.
    fn vae_stream(
        device: &Device,
        stream_device: &Device,
        recorded: &RecordedWeights,
        config: &super::vae::VaeConfig,
        dtype: DType,
    ) -> Result<Vae> {
        let _span = tracing::info_span!("load_vae_stream").entered();
        // The copies read the weights (the VAE's and, next, the ControlNet's control-image
        // embedding's) on the VAE stream: they must be ready on this thread's stream first.
        device.synchronize()?;
        let tensors = recorded.take()?;
        let copied = tensors
            .into_iter()
            .map(|(name, tensor)| Ok((name, tensor.to_device(stream_device)?)))
            .collect::<Result<std::collections::HashMap<_, _>>>()?;
        stream_device.synchronize()?;
        let vae = Vae::new(candle_nn::VarBuilder::from_tensors(copied, dtype, stream_device), config)
            .context("cannot build the VAE again for its own CUDA stream")?;
        Ok(vae)
    }

    /// The device the weights are on; a user's tensors must be made on this one (on CUDA, a
    /// device opened again by its ordinal is another candle device).
    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn img2img(&self) -> &Img2Img {
        &self.img2img
    }

    /// The cross-stream batcher of the streams sharing these models.
    pub fn batcher(&self) -> &Arc<StreamBatcher> {
        &self.batcher
    }

    /// Runs the text encoder on the prompts (no cache).
    pub fn encode_prompts(&self, settings: &FrameSettings) -> Result<Tensor> {
        let _span = tracing::info_span!("encode_prompt").entered();
        let positive = self.encode_text(&settings.prompt)?;
        if !settings.uses_guidance() {
            return Ok(positive);
        }
        let negative = self.encode_text(&settings.negative_prompt)?;
        Ok(Tensor::cat(&[negative, positive], 0)?)
    }

    /// What the text encoder drops of the prompts (each longer than its token limit), as a
    /// sentence for the user; `None` when both fit.
    pub fn prompt_truncation(&self, settings: &FrameSettings) -> Result<Option<String>> {
        let mut which = Vec::new();
        let mut prompts = vec![("prompt", &settings.prompt)];
        if settings.uses_guidance() {
            prompts.push(("negative prompt", &settings.negative_prompt));
        }
        for (name, text) in prompts {
            if self.tokenizer.encode(text)?.truncated {
                which.push(name);
            }
        }
        Ok((!which.is_empty()).then(|| {
            format!(
                "The {} is longer than the text encoder's {} tokens: only its beginning is used (as diffusers does)",
                which.join(" and the "),
                self.tokenizer.max_length()
            )
        }))
    }

    fn encode_text(&self, text: &str) -> Result<Tensor> {
        let tokens = self.tokenizer.encode(text)?;
        let ids = Tensor::new(tokens.ids.as_slice(), &self.device)?.unsqueeze(0)?;
        Ok(self.text_encoder.forward(&ids)?)
    }
}

/// A VarBuilder backend that hands out another VarBuilder's tensors and keeps them (by full
/// name), so that a model built through it can be built again from the same values (the VAE
/// on its own stream; random weights would otherwise differ).
struct RecordedWeights<'a> {
    inner: candle_nn::VarBuilder<'a>,
    tensors: std::sync::Mutex<std::collections::HashMap<String, Tensor>>,
}

impl<'a> RecordedWeights<'a> {
    fn new(inner: candle_nn::VarBuilder<'a>) -> Self {
        Self { inner, tensors: Default::default() }
    }

    fn keep(&self, name: &str, tensor: &Tensor) {
        if let Ok(mut tensors) = self.tensors.lock() {
            tensors.insert(name.to_string(), tensor.clone());
        }
    }

    /// The tensors handed out so far (and forgets them).
    fn take(&self) -> Result<std::collections::HashMap<String, Tensor>> {
        let mut tensors = self.tensors.lock().map_err(|_| anyhow::anyhow!("recorded weights poisoned by a panic"))?;
        Ok(std::mem::take(&mut *tensors))
    }
}

/// A shared [`RecordedWeights`] (the VarBuilder owns its backend; the builder of the copy
/// reads what it kept).
struct Recorder<'a>(Arc<RecordedWeights<'a>>);

impl candle_nn::var_builder::SimpleBackend for Recorder<'_> {
    fn get(
        &self,
        s: candle_core::Shape,
        name: &str,
        h: candle_nn::Init,
        dtype: DType,
        _dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let tensor = self.0.inner.get_with_hints_dtype(s, name, h, dtype)?;
        self.0.keep(name, &tensor);
        Ok(tensor)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, _dev: &Device) -> candle_core::Result<Tensor> {
        let tensor = self.0.inner.get_unchecked_dtype(name, dtype)?;
        self.0.keep(name, &tensor);
        Ok(tensor)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.0.inner.contains_tensor(name)
    }
}

/// One user's handle on [`SharedModels`] (a session's, an element's): the models, shared,
/// and this user's own prompt-embedding cache.
pub struct Stylizer {
    models: Arc<SharedModels>,
    prompt_cache: Option<PromptCache>,
    /// What the last prompt encoding has to tell the user (see [`Self::take_notice`]).
    notice: Option<String>,
}

impl Stylizer {
    /// Loads every model `spec` names into a copy of its own (not shared: see
    /// [`Self::load_shared`]). `dtype` is the compute and weight dtype (f32 on the CPU).
    pub fn load(spec: &ModelSpec, device: &Device, dtype: DType) -> Result<Self> {
        Ok(Self::from_shared(Arc::new(SharedModels::load(spec, device, dtype)?)))
    }

    /// The models `spec` names through the process-wide [`registry`]: users with the same
    /// non-empty `instance_id` share one copy (and must ask for equal settings, else an error
    /// names the id and both); distinct ids have distinct copies; an empty id shares with every
    /// user of equal settings. Loaded when no user holds them; freed with the last user. Make
    /// tensors on [`Self::device`] (on CUDA it may be another user's handle of the same GPU).
    pub fn load_shared(spec: &ModelSpec, device: &Device, dtype: DType, instance_id: &str) -> Result<Self> {
        Ok(Self::from_shared(registry::get(spec, device, dtype, instance_id)?))
    }

    /// Builds unshared models from their configs and weights (the benchmark's random weights).
    pub fn build(parts: ModelParts<'_>, device: &Device, dtype: DType) -> Result<Self> {
        Ok(Self::from_shared(Arc::new(SharedModels::build(parts, device, dtype)?)))
    }

    /// A handle on `models` with an empty prompt cache.
    pub fn from_shared(models: Arc<SharedModels>) -> Self {
        Self { models, prompt_cache: None, notice: None }
    }

    /// The shared models.
    pub fn shared(&self) -> &Arc<SharedModels> {
        &self.models
    }

    /// Whether this handle is the only one on its models (no other session shares them).
    pub fn sole_user(&self) -> bool {
        Arc::strong_count(&self.models) == 1
    }

    /// Another handle on the same models, with its own (empty) prompt cache.
    pub fn share(&self) -> Self {
        Self::from_shared(self.models.clone())
    }

    pub fn device(&self) -> &Device {
        &self.models.device
    }

    /// The per-frame computation (the benchmark drives it directly to time its stages).
    pub fn img2img(&self) -> &Img2Img {
        &self.models.img2img
    }

    /// Deterministic initial noise for a `width` x `height` frame (see [`noise::seeded_noise`]).
    pub fn seeded_noise(&self, seed: u64, width: usize, height: usize) -> Result<Tensor> {
        noise::seeded_noise(seed, self.models.img2img.noise_shape(width, height), &self.models.device)
    }

    /// Deterministic initial noise and `step_rows` rows of step noise for a `width` x `height`
    /// frame, from one seed (see [`noise::seeded_noise_rows`]); the initial noise is
    /// [`Self::seeded_noise`]'s.
    pub fn seeded_frame_noise(&self, seed: u64, width: usize, height: usize, step_rows: usize) -> Result<FrameNoise> {
        noise::seeded_noise_rows(seed, self.models.img2img.noise_shape(width, height), step_rows, &self.models.device)
    }

    /// Text embeddings for guidance with the negative prompt (`[negative; positive]`, see
    /// [`FrameSettings::uses_guidance`]) or the positive prompt alone,
    /// recomputed only when the prompts change.
    pub fn prompt_embeddings(&mut self, settings: &FrameSettings) -> Result<Tensor> {
        let guidance = settings.uses_guidance();
        if let Some(cache) = &self.prompt_cache
            && cache.prompt == settings.prompt
            && cache.negative_prompt == settings.negative_prompt
            && cache.guidance == guidance
        {
            return Ok(cache.embeddings.clone());
        }
        let embeddings = self.encode_prompts(settings)?;
        self.notice = self.models.prompt_truncation(settings)?;
        self.prompt_cache = Some(PromptCache {
            prompt: settings.prompt.clone(),
            negative_prompt: settings.negative_prompt.clone(),
            guidance,
            embeddings: embeddings.clone(),
        });
        Ok(embeddings)
    }

    /// Runs the text encoder on the prompts (no cache).
    pub fn encode_prompts(&self, settings: &FrameSettings) -> Result<Tensor> {
        self.models.encode_prompts(settings)
    }

    /// A note for the user from the last prompt encoding (a prompt cut to the token limit),
    /// once.
    pub fn take_notice(&mut self) -> Option<String> {
        self.notice.take()
    }

    /// Stylizes one frame. `frame` and `control` are `[1, 3, H, W]` in [0, 1] at the
    /// processing size (a multiple of the VAE factor); `noise` has the img2img's
    /// `noise_shape`, and `step_noise` is the LCM re-noising's (see [`FrameInputs`]; `None`
    /// for DDIM). Returns `[1, 3, H, W]` f32 in [0, 1].
    pub fn stylize(
        &mut self,
        frame: &Tensor,
        control: &Tensor,
        settings: &FrameSettings,
        noise: &Tensor,
        step_noise: Option<&Tensor>,
        hook: &mut dyn FrameHook,
    ) -> Result<Tensor> {
        self.stylize_cancellable(frame, control, settings, noise, step_noise, hook, &CancelHandle::default())
    }

    /// [`Self::stylize`], stopping with [`super::Cancelled`] between steps once `cancel` fires.
    #[allow(clippy::too_many_arguments)]
    pub fn stylize_cancellable(
        &mut self,
        frame: &Tensor,
        control: &Tensor,
        settings: &FrameSettings,
        noise: &Tensor,
        step_noise: Option<&Tensor>,
        hook: &mut dyn FrameHook,
        cancel: &CancelHandle,
    ) -> Result<Tensor> {
        let denoised = self.denoise_cancellable(frame, control, settings, noise, step_noise, hook, cancel)?;
        self.models.img2img.decode(denoised)
    }

    /// [`Self::stylize_cancellable`] without the decoding: the frame with every step done
    /// (see [`Img2Img::denoise_frame`]).
    #[allow(clippy::too_many_arguments)]
    pub fn denoise_cancellable(
        &mut self,
        frame: &Tensor,
        control: &Tensor,
        settings: &FrameSettings,
        noise: &Tensor,
        step_noise: Option<&Tensor>,
        hook: &mut dyn FrameHook,
        cancel: &CancelHandle,
    ) -> Result<DenoisingFrame> {
        let embeddings = self.prompt_embeddings(settings)?;
        let inputs = FrameInputs { frame, control, embeddings: &embeddings, noise, step_noise };
        self.models.img2img.denoise_frame(&inputs, settings, hook, &mut (), cancel)
    }
}
