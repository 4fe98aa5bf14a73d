//! One frame of ControlNet img2img, computed as diffusers'
//! `StableDiffusionControlNetImg2ImgPipeline` does with DDIM or `LCMScheduler`, except that the
//! VAE posterior is taken at its mean (deterministic: no per-frame sampling noise, no flicker
//! from it) and the LCM re-noising takes its noise from the caller (`step_noise`) instead of a
//! generator. Guidance: none, full CFG, or StreamDiffusion's residual CFG (see `guidance`).
//! The VAE is either kind ([`super::vae::Vae`]: the full AutoencoderKL or the tiny TAESD).

use std::sync::Mutex;

use anyhow::{Context, Result, bail};
use candle_core::{DType, Tensor};

use super::cancel::CancelHandle;
use super::guidance::Guidance;
use super::hooks::{FrameHook, Stage, StageObserver};
use super::settings::{FramePlan, FrameSettings};
use super::vae::{Vae, VaeConfig};
use crate::models::controlnet::{ControlCondition, ControlNetModel};
use crate::models::unet::UNet2DConditionModel;
use crate::ops::step_graphs::{GraphStats, StageGraph, StepGraphs, StepKey};
use crate::scheduler::{Schedule, Scheduler, Schedulers};

/// What one frame is made from, at the processing size.
pub struct FrameInputs<'a> {
    /// `[1, 3, H, W]` in [0, 1]; H and W multiples of the VAE factor.
    pub frame: &'a Tensor,
    /// `[1, C, H, W]` in [0, 1] (the Canny edges for a Canny ControlNet).
    pub control: &'a Tensor,
    /// Text embeddings: `[negative; positive]` when the guidance uses the negative prompt
    /// (`full`, `initialize`: [`FrameSettings::uses_guidance`]), else the positive prompt's.
    pub embeddings: &'a Tensor,
    /// Initial noise of [`Img2Img::noise_shape`].
    pub noise: &'a Tensor,
    /// The noise of the re-noising between steps (LCM): `[rows, C, h, w]` (`noise_shape` with
    /// `rows` for its batch), row k used after step k; at least
    /// [`Schedule::step_noise_rows`] rows. Not read by DDIM.
    pub step_noise: Option<&'a Tensor>,
}

/// The graphs of a frame's stages outside the denoising steps.
#[derive(Default)]
struct StageGraphs {
    encode: StageGraph,
    control: StageGraph,
    decode: StageGraph,
}

/// The UNet, ControlNet, VAE and scheduler, and one frame of ControlNet img2img with them
/// (the text encoder is separate: its embeddings are an input, cached while the prompt stays).
pub struct Img2Img {
    unet: UNet2DConditionModel,
    controlnet: ControlNetModel,
    vae: Vae,
    schedulers: Schedulers,
    latent_channels: usize,
    vae_scale_factor: usize,
    dtype: DType,
    /// Captured denoising steps (CUDA); behind a Mutex because `run` takes `&self`.
    step_graphs: Mutex<StepGraphs>,
    /// Captured VAE encoding, control embedding and VAE decoding (CUDA).
    stage_graphs: Mutex<StageGraphs>,
}

impl Img2Img {
    /// `vae_config` is the VAE's (latent channels, downscale factor); `dtype` the models' dtype.
    pub fn new(
        unet: UNet2DConditionModel,
        controlnet: ControlNetModel,
        vae: Vae,
        vae_config: &VaeConfig,
        schedulers: Schedulers,
        dtype: DType,
    ) -> Self {
        Self {
            unet,
            controlnet,
            vae,
            schedulers,
            latent_channels: vae_config.latent_channels(),
            vae_scale_factor: vae_config.scale_factor(),
            dtype,
            step_graphs: Mutex::new(StepGraphs::default()),
            stage_graphs: Mutex::new(StageGraphs::default()),
        }
    }

    /// How the VAE encodings, control embeddings and VAE decodings ran so far (summed).
    pub fn stage_graph_stats(&self) -> GraphStats {
        self.stage_graphs
            .lock()
            .map(|g| {
                [g.encode.stats(), g.control.stats(), g.decode.stats()].iter().fold(GraphStats::default(), |a, b| {
                    GraphStats {
                        eager: a.eager + b.eager,
                        captured: a.captured + b.captured,
                        replayed: a.replayed + b.replayed,
                        failed: a.failed + b.failed,
                    }
                })
            })
            .unwrap_or_default()
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

    /// The scheduler a frame with these settings runs.
    pub fn scheduler(&self, settings: &FrameSettings) -> Result<Scheduler<'_>> {
        self.schedulers.get(settings.scheduler)
    }

    /// What a frame with these settings runs: the scheduler and its timesteps; an error when
    /// there are none, or when the settings do not go together (explicit timesteps or
    /// residual guidance without LCM).
    pub fn schedule(&self, settings: &FrameSettings) -> Result<Schedule> {
        let scheduler = self.scheduler(settings)?;
        let schedule = scheduler.schedule(settings.steps, settings.strength, settings.timesteps.as_ref())?;
        Guidance::check(settings.effective_guidance(), scheduler.as_lcm())?;
        Ok(schedule)
    }

    /// The timesteps a frame with these settings runs (see [`Self::schedule`]).
    pub fn timesteps(&self, settings: &FrameSettings) -> Result<Vec<usize>> {
        Ok(self.schedule(settings)?.timesteps)
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
        let &FrameInputs { frame, control, embeddings, noise, step_noise } = inputs;
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
        let scheduler = self.scheduler(settings)?;
        let schedule = self.schedule(settings)?;
        let timesteps = &schedule.timesteps;
        let rows = schedule.step_noise_rows();
        let step_noise = match (rows, step_noise) {
            (0, _) => None,
            (_, None) => bail!(
                "the {} scheduler re-noises between steps: {rows} rows of step noise are needed for {} steps",
                schedule.kind,
                timesteps.len()
            ),
            (_, Some(step_noise)) => {
                let (have, c, h, w) = step_noise.dims4().context("step noise must be a [rows, C, H, W] tensor")?;
                let (_, ec, eh, ew) = expected_noise;
                if have < rows || (c, h, w) != (ec, eh, ew) {
                    bail!(
                        "step noise has shape {:?}, expected [{rows} or more, {ec}, {eh}, {ew}] for {} steps of a {width}x{height} frame",
                        step_noise.dims(),
                        timesteps.len()
                    );
                }
                Some(step_noise.to_dtype(self.dtype)?)
            }
        };
        let _span = tracing::info_span!("stylize_frame", width, height, steps = timesteps.len()).entered();
        let guidance_mode = settings.effective_guidance();
        let batches: Vec<usize> = (0..timesteps.len()).map(|i| guidance_mode.batch(i)).collect();
        let positive = if guidance_mode.uses_negative_prompt() {
            if embeddings.dim(0)? != 2 {
                bail!(
                    "guidance {guidance_mode} needs [negative; positive] text embeddings, got batch {}",
                    embeddings.dim(0)?
                );
            }
            embeddings.narrow(0, 1, 1)?
        } else {
            embeddings.clone()
        };

        // Small uploads (the timestep embedding, kernel shape arguments) are cached by content
        // so that a later capture of the same step or stage finds them on the device.
        #[cfg(feature = "cuda")]
        let _upload_cache = match frame.device() {
            candle_core::Device::Cuda(cuda) if StepGraphs::enabled_for(frame.device()) => {
                Some(cuda.enable_cuda_graph_htod_cache())
            }
            _ => None,
        };
        let mut stages = self.stage_graphs.lock().map_err(|_| anyhow::anyhow!("stage graphs poisoned by a panic"))?;
        let device = frame.device();
        let latents = {
            let _span = tracing::info_span!("vae_encode").entered();
            let image = ((frame.to_dtype(self.dtype)? * 2.0)? - 1.0)?;
            stages.encode.run(device, &image, |image| {
                self.vae.encode_scaled(image).map_err(|e| candle_core::Error::Msg(format!("{e:#}")))
            })?
        };
        let noise = noise.to_dtype(self.dtype)?;
        let mut latents = scheduler.add_noise(&latents, &noise, timesteps[0])?;
        let mut guidance = Guidance::new(guidance_mode, settings.guidance_scale, scheduler.as_lcm(), &noise)?;
        // Once per frame, for every step and both guidance halves (diffusers redoes it per step).
        let condition = stages.control.run(device, &control.to_dtype(self.dtype)?, |control| {
            Ok(self.controlnet.embed_condition(control)?.tensor().clone())
        })?;
        let condition = ControlCondition::from_embedding(condition);
        observer.stage_done(Stage::Encoded)?;

        let plan = FramePlan {
            scheduler: schedule.kind,
            timesteps: timesteps.clone(),
            width,
            height,
            batches: batches.clone(),
        };
        hook.begin_frame(&plan)?;
        let mut graphs = self.step_graphs.lock().map_err(|_| anyhow::anyhow!("step graphs poisoned by a panic"))?;
        for (index, &timestep) in timesteps.iter().enumerate() {
            let _span = tracing::debug_span!("denoise_step", index, timestep).entered();
            cancel.check()?;
            hook.begin_step(index, timestep)?;
            let batch = batches[index];
            let model_input = latents.repeat((batch, 1, 1, 1))?;
            let step_embeddings = if batch == 2 { embeddings } else { &positive };
            let key = StepKey {
                index,
                timestep,
                controlnet_scale_bits: settings.controlnet_scale.to_bits(),
                hook: hook.graph_key(),
            };
            let inputs = [&model_input, step_embeddings, condition.tensor()];
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
            let noise_pred = guidance.combine(index, &noise_pred)?;
            let renoise = match &step_noise {
                Some(rows) if index + 1 < timesteps.len() => Some(rows.narrow(0, index, 1)?),
                _ => None,
            };
            latents = scheduler.step(&noise_pred, &schedule, index, &latents, renoise.as_ref())?;
            guidance.advance(&schedule, index, &noise_pred, renoise.as_ref())?;
            observer.stage_done(Stage::Step(index))?;
        }
        hook.end_frame()?;

        let _span = tracing::info_span!("vae_decode").entered();
        let image = stages.decode.run(device, &latents, |latents| {
            self.vae.decode_scaled(latents).map_err(|e| candle_core::Error::Msg(format!("{e:#}")))
        })?;
        let image = ((image.to_dtype(DType::F32)? / 2.0)? + 0.5)?.clamp(0f32, 1f32)?;
        observer.stage_done(Stage::Decoded)?;
        Ok(image)
    }
}
