//! One frame of ControlNet img2img, computed as diffusers'
//! `StableDiffusionControlNetImg2ImgPipeline` does with DDIM, except that the VAE posterior
//! is taken at its mean (deterministic: no per-frame sampling noise, no flicker from it). The
//! VAE is either kind ([`super::vae::Vae`]: the full AutoencoderKL or the tiny TAESD).

use std::sync::Mutex;

use anyhow::{Context, Result, bail};
use candle_core::{DType, Tensor};

use super::cancel::CancelHandle;
use super::hooks::{FrameHook, Stage, StageObserver};
use super::settings::{FramePlan, FrameSettings};
use super::vae::{Vae, VaeConfig};
use crate::models::controlnet::{ControlCondition, ControlNetModel};
use crate::models::unet::UNet2DConditionModel;
use crate::ops::step_graphs::{GraphStats, StepGraphs, StepKey};
use crate::scheduler::DdimScheduler;

/// What one frame is made from, at the processing size.
pub struct FrameInputs<'a> {
    /// `[1, 3, H, W]` in [0, 1]; H and W multiples of the VAE factor.
    pub frame: &'a Tensor,
    /// `[1, C, H, W]` in [0, 1] (the Canny edges for a Canny ControlNet).
    pub control: &'a Tensor,
    /// Text embeddings: `[negative; positive]` with guidance, else the positive prompt's.
    pub embeddings: &'a Tensor,
    /// Initial noise of [`Img2Img::noise_shape`].
    pub noise: &'a Tensor,
}

/// The UNet, ControlNet, VAE and scheduler, and one frame of ControlNet img2img with them
/// (the text encoder is separate: its embeddings are an input, cached while the prompt stays).
pub struct Img2Img {
    unet: UNet2DConditionModel,
    controlnet: ControlNetModel,
    vae: Vae,
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
        vae: Vae,
        vae_config: &VaeConfig,
        scheduler: DdimScheduler,
        dtype: DType,
    ) -> Self {
        Self {
            unet,
            controlnet,
            vae,
            scheduler,
            latent_channels: vae_config.latent_channels(),
            vae_scale_factor: vae_config.scale_factor(),
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

    /// One frame; returns `[1, 3, H, W]` f32 in [0, 1]. `cancel` is checked before every
    /// denoising step: a cancelled frame returns an error that downcasts to
    /// [`super::Cancelled`].
    pub fn run(
        &self,
        inputs: &FrameInputs,
        settings: &FrameSettings,
        hook: &mut dyn FrameHook,
        observer: &mut dyn StageObserver,
        cancel: &CancelHandle,
    ) -> Result<Tensor> {
        let &FrameInputs { frame, control, embeddings, noise } = inputs;
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
            self.vae.encode_scaled(&image)?
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
            candle_core::Device::Cuda(cuda) if StepGraphs::enabled_for(frame.device()) => {
                Some(cuda.enable_cuda_graph_htod_cache())
            }
            _ => None,
        };
        for (index, &timestep) in timesteps.iter().enumerate() {
            let _span = tracing::debug_span!("denoise_step", index, timestep).entered();
            cancel.check()?;
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
        let image = self.vae.decode_scaled(&latents)?;
        let image = ((image.to_dtype(DType::F32)? / 2.0)? + 0.5)?.clamp(0f32, 1f32)?;
        observer.stage_done(Stage::Decoded)?;
        Ok(image)
    }
}
