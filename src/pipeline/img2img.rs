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
use super::hooks::{FrameHook, Stage, StageObserver, StepRow};
use super::settings::{FramePlan, FrameSettings};
use super::vae::{Vae, VaeConfig};
use crate::models::controlnet::{ConditionEmbedder, ControlCondition, ControlNetModel};
use crate::models::unet::UNet2DConditionModel;
use crate::ops::step_graphs::{GraphHoldings, GraphStats, StageGraph, StepGraphs, StepKey};
use crate::ops::vae_stream::{self, StreamPoint};
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
    /// The VAE's on its own stream ([`Img2Img::set_vae_stream`]).
    vae_stream_encode: StageGraph,
    vae_stream_control: StageGraph,
    vae_stream_decode: StageGraph,
}

/// A copy of the VAE on a device of its own stream (see [`crate::ops::vae_stream`]).
struct VaeStream {
    device: candle_core::Device,
    vae: Vae,
    /// The ControlNet's control-image embedding, there too.
    control: ConditionEmbedder,
}

/// The UNet, ControlNet, VAE and scheduler, and one frame of ControlNet img2img with them
/// (the text encoder is separate: its embeddings are an input, cached while the prompt stays).
pub struct Img2Img {
    unet: UNet2DConditionModel,
    controlnet: ControlNetModel,
    vae: Vae,
    vae_config: VaeConfig,
    /// The VAE again on its own CUDA stream, when there is one.
    vae_stream: Option<VaeStream>,
    schedulers: Schedulers,
    latent_channels: usize,
    vae_scale_factor: usize,
    dtype: DType,
    /// Captured denoising steps (CUDA); behind a Mutex because `run` takes `&self`.
    step_graphs: Mutex<StepGraphs>,
    /// Captured stream-batch calls (CUDA), apart from the sequential steps: their inputs
    /// have another shape.
    stream_graphs: Mutex<StepGraphs>,
    /// Captured cross-stream calls (CUDA): several streams' rows, another shape again.
    cross_stream_graphs: Mutex<StepGraphs>,
    /// Captured VAE encoding, control embedding and VAE decoding (CUDA).
    stage_graphs: Mutex<StageGraphs>,
    // Shared by several sessions on several threads (`super::registry`), this is safe because:
    // the models are read-only; each graph cache is used under its Mutex, and every use of its
    // static buffers (copies in, launch, the copy out that `run` returns) is queued before the
    // guard drops, with a CUDA event ordering the next thread's stream after it
    // (`ops::step_graphs`); a step graph's key holds the frame hook's key, unique per
    // cross-frame store, so no session replays another's; per-frame state is in the caller's
    // `DenoisingFrame`, hook and embeddings, never here.
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
            vae_config: vae_config.clone(),
            vae_stream: None,
            schedulers,
            latent_channels: vae_config.latent_channels(),
            vae_scale_factor: vae_config.scale_factor(),
            dtype,
            step_graphs: Mutex::new(StepGraphs::default()),
            stream_graphs: Mutex::new(StepGraphs::default()),
            cross_stream_graphs: Mutex::new(StepGraphs::default()),
            stage_graphs: Mutex::new(StageGraphs::default()),
        }
    }

    /// Runs the VAE of frames whose input is on `device` there too: `vae` must be this
    /// pipeline's VAE with its weights on `device`, a second CUDA device of the same GPU with
    /// a stream of its own (see [`crate::ops::vae_stream`]), and `control` the ControlNet's
    /// control-image embedding there. [`Self::start_frame`] encodes such frames and embeds
    /// their control images there, and [`Self::decode_after`] decodes there.
    pub fn set_vae_stream(&mut self, device: candle_core::Device, vae: Vae, control: ConditionEmbedder) {
        self.vae_stream = Some(VaeStream { device, vae, control });
    }

    /// The ControlNet's control-image embedding on `device` (for [`Self::set_vae_stream`]).
    pub fn condition_embedder_on(&self, device: &candle_core::Device) -> Result<ConditionEmbedder> {
        Ok(self.controlnet.condition_embedder_on(device)?)
    }

    /// The VAE stream's device, when there is one (a frame uploaded there is encoded there).
    pub fn vae_device(&self) -> Option<&candle_core::Device> {
        self.vae_stream.as_ref().map(|s| &s.device)
    }

    /// How the VAE encodings, control embeddings and VAE decodings ran so far (summed).
    pub fn stage_graph_stats(&self) -> GraphStats {
        self.stage_graphs
            .lock()
            .map(|g| {
                [
                    g.encode.stats(),
                    g.control.stats(),
                    g.decode.stats(),
                    g.vae_stream_encode.stats(),
                    g.vae_stream_control.stats(),
                    g.vae_stream_decode.stats(),
                ]
                .iter()
                .fold(GraphStats::default(), |a, b| GraphStats {
                    eager: a.eager + b.eager,
                    captured: a.captured + b.captured,
                    replayed: a.replayed + b.replayed,
                    failed: a.failed + b.failed,
                })
            })
            .unwrap_or_default()
    }

    /// How denoising steps ran so far: eagerly, captured, replayed (see `step_graphs`), and
    /// why the last capture failed, if one did.
    pub fn graph_stats(&self) -> (GraphStats, Option<String>) {
        self.step_graphs.lock().map(|g| (g.stats(), g.last_error().map(str::to_string))).unwrap_or_default()
    }

    /// How stream-batch calls ran so far (see [`Self::denoise_batch`]).
    pub fn stream_graph_stats(&self) -> (GraphStats, Option<String>) {
        self.stream_graphs.lock().map(|g| (g.stats(), g.last_error().map(str::to_string))).unwrap_or_default()
    }

    /// The VAE's config (what a frame's size asks of the device: `crate::gpu_memory`).
    pub fn vae_config(&self) -> &VaeConfig {
        &self.vae_config
    }

    /// The models' dtype.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// What the step graph caches hold now: one frame, stream batch, cross-stream (memory
    /// accounting).
    pub fn graph_holdings(&self) -> [GraphHoldings; 3] {
        [&self.step_graphs, &self.stream_graphs, &self.cross_stream_graphs]
            .map(|cache| cache.lock().map(|g| g.holdings()).unwrap_or_default())
    }

    /// How cross-stream calls (several streams' rows, [`Self::predict_streams`]) ran so far.
    pub fn cross_stream_graph_stats(&self) -> (GraphStats, Option<String>) {
        self.cross_stream_graphs.lock().map(|g| (g.stats(), g.last_error().map(str::to_string))).unwrap_or_default()
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
        let frame = self.denoise_frame(inputs, settings, hook, observer, cancel)?;
        let image = self.decode(frame)?;
        observer.stage_done(Stage::Decoded)?;
        Ok(image)
    }

    /// [`Self::run`] without the decoding: the frame with every step done, for
    /// [`Self::decode`] or [`Self::decode_after`].
    pub fn denoise_frame(
        &self,
        inputs: &FrameInputs,
        settings: &FrameSettings,
        hook: &mut dyn FrameHook,
        observer: &mut dyn StageObserver,
        cancel: &CancelHandle,
    ) -> Result<DenoisingFrame> {
        self.denoise_frame_with(inputs, settings, hook, observer, cancel, |img2img, hook, frame| {
            img2img.denoise(&mut [frame], hook, Call::Sequential)
        })
    }

    /// [`Self::denoise_frame`] with each denoising step made by `step` (given this, the hook
    /// and the frame): the session's cross-stream batching makes its steps through the
    /// batcher, with the same frame loop.
    pub fn denoise_frame_with<H: FrameHook + ?Sized>(
        &self,
        inputs: &FrameInputs,
        settings: &FrameSettings,
        hook: &mut H,
        observer: &mut dyn StageObserver,
        cancel: &CancelHandle,
        mut step: impl FnMut(&Self, &mut H, &mut DenoisingFrame) -> Result<()>,
    ) -> Result<DenoisingFrame> {
        let mut frame = self.start_frame(inputs, settings)?;
        observer.stage_done(Stage::Encoded)?;
        let _span = tracing::info_span!(
            "stylize_frame",
            width = frame.plan.width,
            height = frame.plan.height,
            steps = frame.plan.timesteps.len()
        )
        .entered();
        hook.begin_frame(&frame.plan)?;
        while !frame.is_done() {
            let index = frame.next_step;
            cancel.check()?;
            step(self, hook, &mut frame)?;
            observer.stage_done(Stage::Step(index))?;
        }
        hook.end_frame()?;
        Ok(frame)
    }

    /// The start of a frame: checks its inputs against its settings, VAE-encodes it, noises
    /// the latents to the first timestep and embeds the control image. The frame is then
    /// denoised one step at a time ([`Self::denoise_batch`]) and decoded ([`Self::decode`]).
    pub fn start_frame(&self, inputs: &FrameInputs, settings: &FrameSettings) -> Result<DenoisingFrame> {
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

        let _upload_cache = upload_cache(frame.device());
        let mut stages = self.stage_graphs.lock().map_err(|_| anyhow::anyhow!("stage graphs poisoned by a panic"))?;
        // The UNet's device (the noise is made there); a frame and control image uploaded to
        // the VAE stream's device are encoded there and come over.
        let device = noise.device();
        let image = ((frame.to_dtype(self.dtype)? * 2.0)? - 1.0)?;
        let stream = self
            .vae_stream
            .as_ref()
            .filter(|s| s.device.same_device(frame.device()) && s.device.same_device(control.device()));
        // The control image's embedding: once per frame, for every step and both guidance
        // halves (diffusers redoes it per step).
        let (latents, condition) = match stream {
            Some(stream) => {
                // Both on the VAE stream, then over to the UNet's once both are done there.
                let latents = {
                    let _span = tracing::info_span!("vae_encode", stream = true).entered();
                    stages.vae_stream_encode.run(&stream.device, &image, |image| {
                        stream.vae.encode_scaled(image).map_err(|e| candle_core::Error::Msg(format!("{e:#}")))
                    })?
                };
                let condition = stages.vae_stream_control.run(&stream.device, &control.to_dtype(self.dtype)?, |c| {
                    Ok(stream.control.embed_condition(c)?.tensor().clone())
                })?;
                let ready = StreamPoint::recorded(&stream.device)?;
                (
                    vae_stream::transfer(&latents, device, Some(&ready))?,
                    vae_stream::transfer(&condition, device, Some(&ready))?,
                )
            }
            None => {
                let latents = {
                    let _span = tracing::info_span!("vae_encode").entered();
                    stages.encode.run(device, &image, |image| {
                        self.vae.encode_scaled(image).map_err(|e| candle_core::Error::Msg(format!("{e:#}")))
                    })?
                };
                let control = vae_stream::transfer(control, device, None)?;
                let _upload_cache = upload_cache(device);
                let condition = stages.control.run(device, &control.to_dtype(self.dtype)?, |control| {
                    Ok(self.controlnet.embed_condition(control)?.tensor().clone())
                })?;
                (latents, condition)
            }
        };
        let noise = noise.to_dtype(self.dtype)?;
        let latents = scheduler.add_noise(&latents, &noise, timesteps[0])?;
        let guidance = Guidance::new(guidance_mode, settings.guidance_scale, scheduler.as_lcm(), &noise)?;
        let plan = FramePlan { scheduler: schedule.kind, timesteps: timesteps.clone(), width, height, batches };
        Ok(DenoisingFrame {
            plan,
            schedule,
            settings: settings.clone(),
            latents,
            next_step: 0,
            embeddings: embeddings.clone(),
            positive,
            condition,
            step_noise,
            stock: guidance.into_stock(),
            anchor: false,
        })
    }

    /// One UNet + ControlNet call that advances every frame by one denoising step, each at
    /// its own step (StreamDiffusion's stream batch): the batch holds each frame's rows (two
    /// where its step runs the guidance batch), with its own timestep, text embeddings and
    /// control embedding. The frames must share their plan and ControlNet scale. `hook` sees
    /// the call through [`FrameHook::begin_rows`], each frame as a [`super::StepRow`] with its
    /// `anchor` flag. A call holding every step of the plan (the steady state) goes through its
    /// own captured graphs on CUDA; a partly filled pipeline (start, drain) runs eagerly.
    pub fn denoise_batch(&self, frames: &mut [&mut DenoisingFrame], hook: &mut dyn FrameHook) -> Result<()> {
        self.denoise(frames, hook, Call::Batch)
    }

    /// Decodes a frame whose steps are done: `[1, 3, H, W]` f32 in [0, 1].
    pub fn decode(&self, frame: DenoisingFrame) -> Result<Tensor> {
        ensure_done(&frame)?;
        let _span = tracing::info_span!("vae_decode").entered();
        self.decode_latents(&frame.latents, frame.latents.device(), &self.vae, |stages| &mut stages.decode)
    }

    /// [`Self::decode`] on the VAE stream when there is one ([`Self::set_vae_stream`]): the
    /// latents go over once the UNet's stream has reached `ready` (a point recorded after the
    /// frame's last step; `None`: all the work queued there now), and the image stays on the
    /// VAE stream's device. Without a VAE stream it is [`Self::decode`].
    pub fn decode_after(&self, frame: DenoisingFrame, ready: Option<&StreamPoint>) -> Result<Tensor> {
        let Some(stream) = &self.vae_stream else { return self.decode(frame) };
        ensure_done(&frame)?;
        let _span = tracing::info_span!("vae_decode", stream = true).entered();
        let latents = vae_stream::transfer(&frame.latents, &stream.device, ready)?;
        drop(frame);
        self.decode_latents(&latents, &stream.device, &stream.vae, |stages| &mut stages.vae_stream_decode)
    }

    /// `vae`'s decoding of `latents` on `device` through the stage graph `stage` picks, scaled
    /// to [0, 1] in f32.
    fn decode_latents(
        &self,
        latents: &Tensor,
        device: &candle_core::Device,
        vae: &Vae,
        stage: impl FnOnce(&mut StageGraphs) -> &mut StageGraph,
    ) -> Result<Tensor> {
        let _upload_cache = upload_cache(device);
        let mut stages = self.stage_graphs.lock().map_err(|_| anyhow::anyhow!("stage graphs poisoned by a panic"))?;
        let image = stage(&mut stages).run(device, latents, |latents| {
            vae.decode_scaled(latents).map_err(|e| candle_core::Error::Msg(format!("{e:#}")))
        })?;
        Ok(((image.to_dtype(DType::F32)? / 2.0)? + 0.5)?.clamp(0f32, 1f32)?)
    }

    fn denoise(&self, frames: &mut [&mut DenoisingFrame], hook: &mut dyn FrameHook, call: Call) -> Result<()> {
        if frames.is_empty() {
            return Ok(());
        }
        let inputs = {
            let views: Vec<&DenoisingFrame> = frames.iter().map(|f| &**f).collect();
            self.step_inputs(&views, call)?
        };
        let steps: Vec<usize> = inputs.rows.iter().map(|r| r.step).collect();
        let _span = tracing::debug_span!("denoise_step", ?steps).entered();
        let noise_pred = self.predict(&inputs, hook)?;
        self.advance(frames, &inputs, &noise_pred)
    }

    /// What one denoising call over `frames` takes (see [`StepInputs`]): one frame for
    /// `call` = sequential, the frames of a stream batch otherwise. The frames must share
    /// their plan and ControlNet scale, and have a step left.
    pub fn step_inputs(&self, frames: &[&DenoisingFrame], call: Call) -> Result<StepInputs> {
        let Some(first) = frames.first() else { bail!("a denoising call needs a frame") };
        let plan = first.plan.clone();
        let controlnet_scale = first.settings.controlnet_scale;
        if call == Call::Sequential && frames.len() != 1 {
            bail!("a sequential denoising step takes one frame, got {}", frames.len());
        }
        let mut rows = Vec::with_capacity(frames.len());
        for frame in frames {
            if frame.plan != plan {
                bail!("frames of one stream batch must share their plan: {:?} and {:?}", plan, frame.plan);
            }
            if frame.settings.controlnet_scale != controlnet_scale {
                bail!("frames of one stream batch must share the ControlNet scale");
            }
            let step = frame.next_step;
            let Some(&timestep) = plan.timesteps.get(step) else {
                bail!("a frame with all its {} steps done was given another step", plan.timesteps.len());
            };
            rows.push(StepRow { step, timestep, batch: plan.batches[step], anchor: frame.anchor });
        }
        let mut model_input = Vec::new();
        let mut embeddings = Vec::new();
        let mut conditions = Vec::new();
        let mut timesteps = Vec::new();
        for (frame, row) in frames.iter().zip(&rows) {
            model_input.push(frame.latents.repeat((row.batch, 1, 1, 1))?);
            embeddings.push(if row.batch == 2 { frame.embeddings.clone() } else { frame.positive.clone() });
            // A sequential step's ControlNet broadcasts the batch-1 embedding (the shapes its
            // captured graphs were made with); a batch lines one up with every row.
            conditions.push(match call {
                Call::Sequential => frame.condition.clone(),
                Call::Batch => frame.condition.repeat((row.batch, 1, 1, 1))?,
            });
            timesteps.extend(std::iter::repeat_n(row.timestep as f64, row.batch));
        }
        Ok(StepInputs {
            call,
            plan,
            controlnet_scale,
            model_input: cat_rows(&model_input)?,
            embeddings: cat_rows(&embeddings)?,
            condition: cat_rows(&conditions)?,
            timesteps,
            rows,
        })
    }

    /// The UNet's noise prediction for one denoising call, with its ControlNet residuals:
    /// `[batch, C, h, w]`, the rows' batches one after the other. `hook` sees the call
    /// through [`FrameHook::begin_step`] (sequential) or [`FrameHook::begin_rows`] (a batch).
    /// A sequential step goes through the step graphs; a stream batch holding every step of
    /// the plan (the steady state) through its own captured graphs; a partly filled one
    /// (start, drain) runs eagerly.
    pub fn predict(&self, inputs: &StepInputs, hook: &mut dyn FrameHook) -> Result<Tensor> {
        match inputs.call {
            Call::Sequential => {
                let row = inputs.rows[0];
                hook.begin_step(row.step, row.timestep)?;
                let key = StepKey {
                    index: row.step,
                    timestep: row.timestep,
                    controlnet_scale_bits: inputs.controlnet_scale.to_bits(),
                    hook: hook.graph_key(),
                };
                self.call_models(&self.step_graphs, key, inputs, hook)
            }
            Call::Batch => {
                hook.begin_rows(&inputs.rows)?;
                // Only a full pipeline is captured: its layout repeats every frame, a filling
                // or draining one does not.
                let full = inputs.rows.len() == inputs.plan.timesteps.len();
                let key = batch_key(inputs, hook.graph_key().filter(|_| full));
                let result = self.call_models(&self.stream_graphs, key, inputs, hook);
                hook.end_rows()?;
                result
            }
        }
    }

    /// One UNet + ControlNet call over the inputs of several streams (cross-stream batching),
    /// their rows one after the other: the prediction of each in that order. They must share
    /// the plan and the ControlNet scale. `hook` sees every row through
    /// [`FrameHook::begin_rows`] and splits them by stream; its [`FrameHook::graph_key`]
    /// decides whether the call is captured (CUDA).
    pub fn predict_streams(&self, parts: &[&StepInputs], hook: &mut dyn FrameHook) -> Result<Tensor> {
        let Some(&first) = parts.first() else { bail!("a cross-stream call needs a stream") };
        let mut rows = Vec::new();
        let mut model_input = Vec::new();
        let mut embeddings = Vec::new();
        let mut conditions = Vec::new();
        let mut timesteps = Vec::new();
        for part in parts {
            if part.plan != first.plan || part.controlnet_scale != first.controlnet_scale {
                bail!(
                    "streams of one UNet call must share their plan and ControlNet scale: {:?} at {} and {:?} at {}",
                    first.plan,
                    first.controlnet_scale,
                    part.plan,
                    part.controlnet_scale
                );
            }
            rows.extend_from_slice(&part.rows);
            model_input.push(part.model_input.clone());
            embeddings.push(part.embeddings.clone());
            let batch = part.model_input.dim(0)?;
            conditions.push(match part.condition.dim(0)? {
                1 if batch > 1 => part.condition.repeat((batch, 1, 1, 1))?,
                _ => part.condition.clone(),
            });
            timesteps.extend_from_slice(&part.timesteps);
        }
        let inputs = StepInputs {
            call: Call::Batch,
            plan: first.plan.clone(),
            controlnet_scale: first.controlnet_scale,
            model_input: cat_rows(&model_input)?,
            embeddings: cat_rows(&embeddings)?,
            condition: cat_rows(&conditions)?,
            timesteps,
            rows,
        };
        // Captured when the layout repeats: every stream holds one frame (sequential) or a
        // full stream batch (every step of the plan), not one that fills or drains.
        let steps = first.plan.timesteps.len();
        let steady = parts.iter().all(|p| p.rows.len() == 1 || p.rows.len() == steps);
        hook.begin_rows(&inputs.rows)?;
        let key = batch_key(&inputs, hook.graph_key().filter(|_| steady));
        let result = self.call_models(&self.cross_stream_graphs, key, &inputs, hook);
        hook.end_rows()?;
        result
    }

    fn call_models(
        &self,
        cache: &Mutex<StepGraphs>,
        key: StepKey,
        inputs: &StepInputs,
        hook: &mut dyn FrameHook,
    ) -> Result<Tensor> {
        let device = inputs.model_input.device().clone();
        let _upload_cache = upload_cache(&device);
        let mut graphs = cache.lock().map_err(|_| anyhow::anyhow!("step graphs poisoned by a panic"))?;
        let graph_inputs = [&inputs.model_input, &inputs.embeddings, &inputs.condition];
        graphs.run(&device, key, hook.graph_owners(), &graph_inputs, |tensors| {
            let [model_input, embeddings, condition] = tensors else {
                candle_core::bail!("a denoising step takes three inputs")
            };
            hook.begin_models().map_err(hook_error)?;
            let prediction = self
                .controlnet
                .forward_embedded_each(
                    model_input,
                    &inputs.timesteps,
                    embeddings,
                    &ControlCondition::from_embedding(condition.clone()),
                    inputs.controlnet_scale,
                )
                .and_then(|residuals| {
                    self.unet.forward_each(
                        model_input,
                        &inputs.timesteps,
                        embeddings,
                        Some(residuals),
                        hook.attention_hook(),
                    )
                });
            let ended = hook.end_models().map_err(hook_error);
            let prediction = prediction?;
            ended?;
            Ok(prediction)
        })
    }

    /// Advances each frame by its step with its rows of `noise_pred` (guidance, scheduler
    /// step, LCM re-noising); `frames` are the ones `inputs` was made from, in order.
    pub fn advance(&self, frames: &mut [&mut DenoisingFrame], inputs: &StepInputs, noise_pred: &Tensor) -> Result<()> {
        if frames.len() != inputs.rows.len() {
            bail!("{} frames for a denoising call of {} frames", frames.len(), inputs.rows.len());
        }
        let Some(first) = frames.first() else { return Ok(()) };
        let scheduler = self.scheduler(&first.settings)?;
        let lcm = scheduler.as_lcm();
        let steps = inputs.plan.timesteps.len();
        let mut offset = 0;
        for (frame, row) in frames.iter_mut().zip(&inputs.rows) {
            if frame.next_step != row.step || frame.plan != inputs.plan {
                bail!("a frame at step {} was given the prediction for step {}", frame.next_step, row.step);
            }
            let prediction = noise_pred.narrow(0, offset, row.batch)?;
            offset += row.batch;
            let mut guidance = Guidance::resume(
                frame.settings.effective_guidance(),
                frame.settings.guidance_scale,
                lcm,
                frame.stock.take(),
            )?;
            let index = row.step;
            let eps = guidance.combine(index, &prediction)?;
            let renoise = match &frame.step_noise {
                Some(noise_rows) if index + 1 < steps => Some(noise_rows.narrow(0, index, 1)?),
                _ => None,
            };
            frame.latents = scheduler.step(&eps, &frame.schedule, index, &frame.latents, renoise.as_ref())?;
            guidance.advance(&frame.schedule, index, &eps, renoise.as_ref())?;
            frame.stock = guidance.into_stock();
            frame.next_step += 1;
        }
        Ok(())
    }
}

/// How a denoising call is made: one frame as it always was, or a stream batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Call {
    Sequential,
    Batch,
}

/// What one denoising call takes ([`Img2Img::step_inputs`]): its frames' rows and the UNet's
/// inputs, the rows' batches one after the other. Made on the stream's thread; the call
/// itself may run on another (cross-stream batching).
pub struct StepInputs {
    pub call: Call,
    pub plan: FramePlan,
    pub controlnet_scale: f64,
    pub rows: Vec<StepRow>,
    model_input: Tensor,
    embeddings: Tensor,
    condition: Tensor,
    timesteps: Vec<f64>,
}

impl StepInputs {
    /// UNet rows the call takes (the guidance batch counts two).
    pub fn batch(&self) -> usize {
        self.rows.iter().map(|r| r.batch).sum()
    }

    /// The device the call runs on.
    pub fn device(&self) -> &candle_core::Device {
        self.model_input.device()
    }

    /// Rows x height x width of the model input (what a call's activations grow with).
    pub fn latent_pixels(&self) -> usize {
        let dims = self.model_input.dims();
        dims.first().copied().unwrap_or(0) * dims.iter().skip(2).product::<usize>()
    }
}

/// A frame hook's error inside the models' call (which speaks candle's error type).
fn hook_error(e: anyhow::Error) -> candle_core::Error {
    candle_core::Error::Msg(format!("{e:#}"))
}

fn cat_rows(tensors: &[Tensor]) -> Result<Tensor> {
    Ok(match tensors {
        [one] => one.clone(),
        many => Tensor::cat(many, 0)?,
    })
}

/// A stream batch's graph key: the rows' steps, their timesteps (baked into a capture), the
/// ControlNet scale and the hook's key.
fn batch_key(inputs: &StepInputs, hook: Option<u64>) -> StepKey {
    StepKey {
        index: inputs.rows.iter().fold(0usize, |acc, r| acc.wrapping_mul(64).wrapping_add(r.step + 1)),
        timestep: timesteps_hash(&inputs.timesteps),
        controlnet_scale_bits: inputs.controlnet_scale.to_bits(),
        hook,
    }
}

/// Keys a stream batch's graph by its rows' timesteps (baked into a capture).
fn timesteps_hash(timesteps: &[f64]) -> usize {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    for t in timesteps {
        t.to_bits().hash(&mut hasher);
    }
    hasher.finish() as usize
}

/// Refuses a frame whose steps are not all done (it cannot be decoded yet).
fn ensure_done(frame: &DenoisingFrame) -> Result<()> {
    if !frame.is_done() {
        bail!("a frame cannot be decoded after {} of its {} steps", frame.next_step, frame.plan.timesteps.len());
    }
    Ok(())
}

/// Small uploads (the timestep embedding, kernel shape arguments) are cached by content so
/// that a later capture of the same step or stage finds them on the device.
#[cfg(feature = "cuda")]
fn upload_cache(device: &candle_core::Device) -> Option<impl Drop> {
    match device {
        candle_core::Device::Cuda(cuda) if StepGraphs::enabled_for(device) => Some(cuda.enable_cuda_graph_htod_cache()),
        _ => None,
    }
}

#[cfg(not(feature = "cuda"))]
fn upload_cache(_device: &candle_core::Device) -> Option<()> {
    None
}

/// A frame between its encoding ([`Img2Img::start_frame`]) and its decoding
/// ([`Img2Img::decode`]): its latents, the step it is at, and what its remaining steps need.
pub struct DenoisingFrame {
    plan: FramePlan,
    schedule: Schedule,
    settings: FrameSettings,
    latents: Tensor,
    /// Steps done.
    next_step: usize,
    /// As [`FrameInputs::embeddings`].
    embeddings: Tensor,
    /// The positive prompt's embedding (the only one where the step has batch 1).
    positive: Tensor,
    /// The control image's embedding, batch 1.
    condition: Tensor,
    step_noise: Option<Tensor>,
    /// Residual guidance's stock noise between steps.
    stock: Option<Tensor>,
    anchor: bool,
}

impl DenoisingFrame {
    pub fn plan(&self) -> &FramePlan {
        &self.plan
    }

    /// Steps done so far.
    pub fn steps_done(&self) -> usize {
        self.next_step
    }

    pub fn is_done(&self) -> bool {
        self.next_step >= self.plan.timesteps.len()
    }

    /// Marks the frame as a cross-frame anchor (or not) for the hook's [`super::StepRow`]s.
    pub fn set_anchor(&mut self, anchor: bool) {
        self.anchor = anchor;
    }

    pub fn anchor(&self) -> bool {
        self.anchor
    }
}
