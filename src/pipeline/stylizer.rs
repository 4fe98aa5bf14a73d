//! The loaded models: the text encoder (embeddings cached while the prompts stay) and the
//! per-frame [`Img2Img`].

use anyhow::{Context, Result, bail};
use candle_core::{DType, Device, Tensor};

use super::cancel::CancelHandle;
use super::hooks::FrameHook;
use super::img2img::{FrameInputs, Img2Img};
use super::loader::{ModelParts, ModelSpec};
use super::noise::{self, FrameNoise};
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

/// The loaded models and the per-frame img2img computation.
pub struct Stylizer {
    tokenizer: ClipTokenizer,
    text_encoder: ClipTextModel,
    img2img: Img2Img,
    device: Device,
    prompt_cache: Option<PromptCache>,
}

impl Stylizer {
    /// Loads every model `spec` names. `dtype` is the compute and weight dtype (f32 on the CPU).
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
        let vae_model = Vae::new(vae.weights, &vae.config)
            .with_context(|| format!("cannot build the VAE ({}) from {}", vae.config.class_name(), vae.origin))?;
        let controlnet_model = ControlNetModel::new(controlnet.weights, &controlnet.config)
            .with_context(|| format!("cannot build the ControlNet from {}", controlnet.origin))?;
        let scheduler = Schedulers::new(&scheduler)?;
        Ok(Self {
            tokenizer,
            text_encoder,
            img2img: Img2Img::new(unet_model, controlnet_model, vae_model, &vae.config, scheduler, dtype),
            device: device.clone(),
            prompt_cache: None,
        })
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The per-frame computation (the benchmark drives it directly to time its stages).
    pub fn img2img(&self) -> &Img2Img {
        &self.img2img
    }

    /// Deterministic initial noise for a `width` x `height` frame (see [`noise::seeded_noise`]).
    pub fn seeded_noise(&self, seed: u64, width: usize, height: usize) -> Result<Tensor> {
        noise::seeded_noise(seed, self.img2img.noise_shape(width, height), &self.device)
    }

    /// Deterministic initial noise and `step_rows` rows of step noise for a `width` x `height`
    /// frame, from one seed (see [`noise::seeded_noise_rows`]); the initial noise is
    /// [`Self::seeded_noise`]'s.
    pub fn seeded_frame_noise(&self, seed: u64, width: usize, height: usize, step_rows: usize) -> Result<FrameNoise> {
        noise::seeded_noise_rows(seed, self.img2img.noise_shape(width, height), step_rows, &self.device)
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
        let _span = tracing::info_span!("encode_prompt").entered();
        let positive = self.encode_text(&settings.prompt)?;
        if !settings.uses_guidance() {
            return Ok(positive);
        }
        let negative = self.encode_text(&settings.negative_prompt)?;
        Ok(Tensor::cat(&[negative, positive], 0)?)
    }

    fn encode_text(&self, text: &str) -> Result<Tensor> {
        let tokens = self.tokenizer.encode(text)?;
        let ids = Tensor::new(tokens.ids.as_slice(), &self.device)?.unsqueeze(0)?;
        Ok(self.text_encoder.forward(&ids)?)
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
        let embeddings = self.prompt_embeddings(settings)?;
        let inputs = FrameInputs { frame, control, embeddings: &embeddings, noise, step_noise };
        self.img2img.run(&inputs, settings, hook, &mut (), cancel)
    }
}
