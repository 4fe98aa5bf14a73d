//! A video session: frames pushed in order, stylized frames out, with the cross-frame
//! attention state, re-anchoring (interval, scene cuts, size or schedule changes) and the
//! initial-noise policy. Frame-in / frame-out; no GStreamer types.
//!
//! A frame goes through three stages, which [`VideoSession::push`] runs back to back:
//! - [`VideoSession::prepare`] – the CPU work: scaling to the processing size, the scene-cut
//!   thumbnail, Canny, the initial noise, the upload.
//! - [`VideoSession::launch`] – the diffusion ([`crate::pipeline::Img2Img::run`]). On CUDA
//!   this only queues the device work and returns while the GPU runs; on the CPU it computes
//!   the frame. The cross-frame state sees frames here, strictly in order.
//! - [`VideoSession::finish`] – the download of the result, as 8-bit RGB; on CUDA it waits
//!   for the device, and that wait is where the frame's diffusion time ends.
//!
//! A caller that overlaps CPU and GPU work (the element) prepares frame N+1 while N runs,
//! finishes N, launches N+1, and then does its own work on N's pixels while N+1 runs. The
//! only rule: frame N+1 is prepared after frame N was launched (`launch` refuses a frame
//! prepared out of turn); finishing may lag behind launching. The results are the same as
//! `push`'s, bit for bit.
//!
//! With the VAE on its own CUDA stream ([`crate::ops::vae_stream`], on by default on CUDA)
//! frames go up to the VAE's device and are encoded there, `launch` leaves the decoding to
//! `finish`, and a caller should launch N+1 before finishing N
//! ([`VideoSession::launches_before_finishing`]): N's decoding then runs beside N+1's
//! denoising, and the UNet's stream never waits for the host between frames.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use std::collections::VecDeque;

use anyhow::{Context, Result, bail};
use candle_core::Tensor;

use crate::canny::{self, CannyParams, ImageView};
use crate::cross_frame::{AttentionMode, AttentionScope, CrossFrameAttention, StoreLocation};
use crate::device::DeviceSpan;
use crate::frame::RgbFrame;
use crate::ops::vae_stream::StreamPoint;
use crate::pipeline::{
    BatchTimeout, Call, CancelHandle, DenoisingFrame, FrameHook, FrameInputs, FrameNoise, FramePace, FrameSettings,
    Membership, SharedModels, SizeRequest, StepRequest, Stylizer, check_finite,
};
use crate::resample;

/// Where each frame's noise comes from: the initial noise and, with LCM, the step noise of the
/// re-noising between steps (one tensor per step slot, drawn from the same seed after the
/// initial noise, as StreamDiffusion keeps its `init_noise` per step).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum NoiseMode {
    /// The same noise for every frame (what keeps frames coherent).
    #[default]
    Fixed,
    /// Fresh noise for every frame (seed + frame index), as the original pipeline did.
    PerFrame,
}

impl FromStr for NoiseMode {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "fixed" => Self::Fixed,
            "per-frame" => Self::PerFrame,
            other => bail!("unknown noise mode {other:?}: expected fixed or per-frame"),
        })
    }
}

impl fmt::Display for NoiseMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Fixed => "fixed",
            Self::PerFrame => "per-frame",
        })
    }
}

/// Session-wide settings.
#[derive(Debug, Clone, PartialEq)]
pub struct SessionConfig {
    pub attention: AttentionMode,
    pub scope: AttentionScope,
    /// Where the cross-frame store keeps its entries (the host location trades copies for
    /// device memory: see [`StoreLocation`]).
    pub store: StoreLocation,
    /// Re-anchor every N frames; 0 never.
    pub anchor_interval: usize,
    /// Mean absolute luma change (0..1) between consecutive input frames that counts as a
    /// scene cut and re-anchors; 0 disables detection.
    pub scene_cut_threshold: f64,
    pub noise: NoiseMode,
    pub seed: u64,
    pub canny: CannyParams,
    /// Processing size requested (see [`SizeRequest`]; default: short side 512).
    pub size: SizeRequest,
    /// Denoise the frames in flight together, each at its own step (StreamDiffusion's stream
    /// batch): one UNet call per frame, a frame comes out `steps - 1` frames after it went in
    /// (see [`VideoSession::submit`]).
    pub stream_batch: bool,
    /// Similarity skipping: an input frame whose downscaled image is this similar (cosine
    /// similarity, -1..1) to the last diffused one is skipped (the last output is re-emitted)
    /// with a probability that grows from 0 at this value to 1 for an identical frame
    /// (StreamDiffusion's similar-image filter), drawn from the seed and the frame index so
    /// that runs repeat. 0 (or less) disables skipping.
    pub skip_similarity: f64,
    /// At most this many frames in a row are skipped.
    pub max_skip: usize,
    /// Cross-stream batching: when set, each denoising call meets the calls of the other
    /// sessions sharing these models (see [`crate::pipeline::batcher`]), waiting for
    /// partners at most as long as this says; calls that share a step plan run as one UNet
    /// call. `None`: the session's calls run on their own.
    pub batch_timeout: Option<BatchTimeout>,
}

impl Default for SessionConfig {
    fn default() -> Self {
        Self {
            attention: AttentionMode::FirstPrev,
            scope: AttentionScope::Up,
            store: StoreLocation::Device,
            anchor_interval: 0,
            scene_cut_threshold: 0.3,
            noise: NoiseMode::Fixed,
            seed: 0,
            canny: CannyParams::default(),
            size: SizeRequest::default(),
            stream_batch: false,
            skip_similarity: 0.0,
            max_skip: 10,
            batch_timeout: None,
        }
    }
}

impl SessionConfig {
    /// An error naming the setting and its value when one is NaN, infinite or out of range
    /// (the Canny thresholds: see [`CannyParams::validate`]).
    pub fn validate(&self) -> Result<()> {
        self.canny.validate()?;
        check_finite("scene-cut threshold", self.scene_cut_threshold)?;
        check_finite("skip similarity", self.skip_similarity)?;
        Ok(())
    }
}

/// One stylized frame.
pub struct StylizedFrame {
    /// `[1, 3, H, W]` f32 in [0, 1] at the processing size.
    pub image: Tensor,
    /// The frame's index in the session (frames stylized before it).
    pub index: u64,
    /// Whether this frame became the cross-frame anchor.
    pub anchor: bool,
    /// Why it became the anchor, when it did.
    pub anchor_reason: Option<&'static str>,
    /// Skipped by similarity: the image is the last diffused frame's.
    pub skipped: bool,
    /// Time spent scaling the frame, its scene-cut measure, Canny and the upload.
    pub prepare_time: Duration,
    /// Time spent in the diffusion (VAE encode, denoising, VAE decode). From
    /// [`VideoSession::finish`]: from the launch until the result was downloaded (see
    /// [`FinishedFrame`]). From [`VideoSession::push`]: the launch alone, which on CUDA is
    /// the time to queue the work, not to run it.
    pub diffuse_time: Duration,
}

impl StylizedFrame {
    /// The image as a packed frame at the processing size.
    pub fn to_rgb(&self) -> Result<RgbFrame> {
        RgbFrame::from_tensor(&self.image)
    }
}

/// Where a prepared frame's control image comes from.
enum ControlSource<'a> {
    Image(&'a RgbFrame),
    Scaled(RgbFrame),
    Edges(canny::EdgeMap),
}

/// A frame scaled, measured and uploaded by [`VideoSession::prepare`], for
/// [`VideoSession::launch`].
pub struct PreparedFrame {
    index: u64,
    /// `None` for a frame skipped by similarity.
    work: Option<FrameWork>,
    size: (usize, usize),
    /// The frame's luma thumbnail (the last diffused frame's, for similarity skipping).
    thumbnail: Vec<f32>,
    /// The luma change from the previous prepared frame is over the scene-cut threshold.
    scene_cut: bool,
    prepare_time: Duration,
    device_wait: Duration,
}

/// What a frame to diffuse was prepared into (on the device).
struct FrameWork {
    input: Tensor,
    control: Tensor,
    noise: Tensor,
    /// Step noise for the settings at `prepare` (LCM), `None` when they need none.
    step_noise: Option<Tensor>,
}

impl PreparedFrame {
    /// The index the frame gets when it is launched next.
    pub fn index(&self) -> u64 {
        self.index
    }

    /// Time `prepare` waited for the device to finish its queued work (the previous frame)
    /// before uploading; not part of `prepare_time`.
    pub fn device_wait(&self) -> Duration {
        self.device_wait
    }

    /// `(width, height)` of the processing size.
    pub fn size(&self) -> (usize, usize) {
        self.size
    }

    /// Whether similarity skipping skips the frame (it re-emits the last output).
    pub fn skipped(&self) -> bool {
        self.work.is_none()
    }
}

/// What a launched frame holds until it is finished.
enum Output {
    /// The stylized image (`[1, 3, H, W]` f32 in [0, 1]).
    Image(Tensor),
    /// Denoised, not yet decoded: with a VAE stream the decoding is queued there by `finish`,
    /// after the UNet's stream reached `ready` (the point after the frame's last step), so that
    /// the next frame's encoding and denoising, queued by the launches before it, go first.
    Latents { frame: DenoisingFrame, ready: StreamPoint },
    /// Its decoding failed.
    Failed,
}

/// A launched frame whose result may still be computed on the device
/// ([`VideoSession::launch`]); [`VideoSession::finish`] downloads it. Dropping it drops the
/// result (the device work already queued still runs).
pub struct InFlightFrame {
    output: Output,
    index: u64,
    skipped: bool,
    anchor: bool,
    anchor_reason: Option<&'static str>,
    prepare_time: Duration,
    launch_time: Duration,
    /// The diffusion's device time (CUDA events), or wall time on the CPU.
    span: DeviceSpan,
}

impl InFlightFrame {
    pub fn index(&self) -> u64 {
        self.index
    }

    /// Whether this frame became the cross-frame anchor.
    pub fn anchor(&self) -> bool {
        self.anchor
    }

    /// Skipped by similarity: the image is the last diffused frame's.
    pub fn skipped(&self) -> bool {
        self.skipped
    }

    /// Why it became the anchor, when it did.
    pub fn anchor_reason(&self) -> Option<&'static str> {
        self.anchor_reason
    }

    /// Whether the diffusion may still run on the device after `launch` returned (CUDA);
    /// false on the CPU, where `launch` computed the frame.
    pub fn is_asynchronous(&self) -> bool {
        match &self.output {
            Output::Image(image) => !image.device().is_cpu(),
            Output::Latents { .. } | Output::Failed => true,
        }
    }

    /// `(width, height)` of the processing size.
    pub fn size(&self) -> Result<(usize, usize)> {
        Ok(match &self.output {
            Output::Image(image) => {
                let (_, _, height, width) = image.dims4()?;
                (width, height)
            }
            Output::Latents { frame, .. } => (frame.plan().width, frame.plan().height),
            Output::Failed => bail!("frame {}: its decoding failed", self.index),
        })
    }

    /// The image, decoding it first when that was left to `finish` (queued on the VAE stream,
    /// where the image stays); the frame's device span ends there.
    fn decoded(&mut self, stylizer: &Stylizer) -> Result<Tensor> {
        let image = match std::mem::replace(&mut self.output, Output::Failed) {
            Output::Image(image) => image,
            Output::Latents { frame, ready } => {
                let image = stylizer.img2img().decode_after(frame, Some(&ready))?;
                self.span.end(image.device())?;
                image
            }
            Output::Failed => bail!("its decoding failed"),
        };
        self.output = Output::Image(image.clone());
        Ok(image)
    }
}

/// A frame downloaded by [`VideoSession::finish`].
pub struct FinishedFrame {
    /// Its `diffuse_time` runs from the start of the launch to the end of the download: the
    /// download waits for the device, so on CUDA this is when the result was ready, or an upper
    /// bound on it when `finish` came later than that (then `wait_time` is about the copy
    /// alone). On the CPU it is the launch (which computed the frame) plus the download.
    pub stylized: StylizedFrame,
    /// The image as 8-bit RGB, at the processing size from `finish`, at the size asked for
    /// from `finish_at`.
    pub rgb: RgbFrame,
    /// Time `finish` spent waiting for the device and copying the result (with the scaling
    /// when it ran on the device).
    pub wait_time: Duration,
    /// Time spent scaling the result on the CPU (zero when the device scaled it).
    pub scale_time: Duration,
}

/// One denoising call over `frames` through the cross-stream batcher: the cross-frame state is
/// lent to the call and comes back with it. Returns how many streams the UNet call held.
fn batched_call(
    models: &Arc<SharedModels>,
    membership: &Membership,
    timeout: Duration,
    attention: &mut CrossFrameAttention,
    frames: &mut [&mut DenoisingFrame],
    call: Call,
) -> Result<usize> {
    let img2img = models.img2img();
    let inputs = {
        let views: Vec<&DenoisingFrame> = frames.iter().map(|f| &**f).collect();
        img2img.step_inputs(&views, call)?
    };
    // Lent out for the call; an empty state stays behind (the call's error path resets it anyway).
    let placeholder = CrossFrameAttention::new(attention.mode(), attention.scope()).with_location(attention.location());
    let lent = std::mem::replace(attention, placeholder);
    let reply = membership.run(models, StepRequest { inputs, attention: lent }, timeout)?;
    *attention = reply.attention;
    img2img.advance(frames, &reply.inputs, &reply.prediction?)?;
    Ok(reply.streams_in_call)
}

/// Side of the square thumbnail the scene-cut measure compares.
const THUMBNAIL_SIDE: usize = 32;

pub struct VideoSession {
    stylizer: Stylizer,
    attention: CrossFrameAttention,
    cancel: CancelHandle,
    config: SessionConfig,
    settings: FrameSettings,
    /// Noise given explicitly (e.g. from a file), used for every frame.
    explicit_noise: Option<Tensor>,
    /// Step noise given explicitly (a noise file's `step_noise`), used for every frame.
    explicit_step_noise: Option<Tensor>,
    /// Seeded fixed noise, cached per processing size and number of step-noise rows.
    fixed_noise: Option<((usize, usize, usize), FrameNoise)>,
    /// The previous prepared frame's luma thumbnail and processing size (scene cuts).
    previous_thumbnail: Option<((usize, usize), Vec<f32>)>,
    frames_pushed: u64,
    /// Frames in the stream batch, oldest (furthest along) first, with the frames skipped
    /// between them.
    stream: VecDeque<Slot>,
    /// The last diffused frame's image and thumbnail (similarity skipping re-emits the one,
    /// compares with the other).
    last_output: Option<Tensor>,
    last_diffused_thumbnail: Option<Vec<f32>>,
    /// Frames skipped in a row, and in all.
    skips_in_a_row: usize,
    frames_skipped: u64,
    /// The settings the frames in the stream batch run with.
    stream_settings: Option<FrameSettings>,
    /// A config set while frames were in the stream batch: applied after they drain.
    pending_config: Option<SessionConfig>,
    /// Why the session was reset since the last frame started, if it was (the next anchor's
    /// reason).
    reset_reason: Option<&'static str>,
    /// The session's place among the streams batching their calls (cross-stream batching on).
    membership: Option<Membership>,
    /// Denoising calls whose UNet call held other streams' rows too.
    shared_calls: u64,
    /// The stream's frame interval, for [`BatchTimeout::Auto`].
    pace: FramePace,
    /// Whether the session uses the models' VAE stream when they have one.
    vae_stream: bool,
}

/// A place in the stream batch's output order.
enum Slot {
    Diffusing(StreamEntry),
    /// A frame skipped by similarity: it goes out with the image of the diffused frame before it.
    Skipped {
        index: u64,
        prepare_time: Duration,
    },
}

impl Slot {
    fn diffusing(&self) -> Option<&StreamEntry> {
        match self {
            Self::Diffusing(entry) => Some(entry),
            Self::Skipped { .. } => None,
        }
    }
}

/// A frame in the stream batch.
struct StreamEntry {
    frame: DenoisingFrame,
    index: u64,
    anchor_reason: Option<&'static str>,
    prepare_time: Duration,
    launch_time: Duration,
    span: DeviceSpan,
}

impl VideoSession {
    /// An error naming the setting when `config` or `settings` has a value out of range
    /// (see [`SessionConfig::validate`], [`FrameSettings::validate`]).
    pub fn new(stylizer: Stylizer, config: SessionConfig, settings: FrameSettings) -> Result<Self> {
        config.validate()?;
        settings.validate()?;
        let membership = match config.batch_timeout {
            Some(_) => Some(stylizer.shared().batcher().join()?),
            None => None,
        };
        Ok(Self {
            attention: CrossFrameAttention::new(config.attention, config.scope).with_location(config.store),
            cancel: CancelHandle::default(),
            stylizer,
            config,
            settings,
            explicit_noise: None,
            explicit_step_noise: None,
            fixed_noise: None,
            previous_thumbnail: None,
            frames_pushed: 0,
            stream: VecDeque::new(),
            last_output: None,
            last_diffused_thumbnail: None,
            skips_in_a_row: 0,
            frames_skipped: 0,
            stream_settings: None,
            pending_config: None,
            reset_reason: None,
            membership,
            shared_calls: 0,
            pace: FramePace::default(),
            vae_stream: true,
        })
    }

    pub fn stylizer(&self) -> &Stylizer {
        &self.stylizer
    }

    /// A note for the user from the frames so far (a prompt cut to the text encoder's token
    /// limit), once; the element posts it as a warning.
    pub fn take_notice(&mut self) -> Option<String> {
        self.stylizer.take_notice()
    }

    pub fn attention(&self) -> &CrossFrameAttention {
        &self.attention
    }

    pub fn settings(&self) -> &FrameSettings {
        &self.settings
    }

    /// Takes effect at the next frame. A schedule change (scheduler, steps, strength,
    /// timesteps, the guidance batch) re-anchors there.
    /// An error (the settings stay as they were) when a value is out of range or the
    /// schedule has no step.
    pub fn set_settings(&mut self, settings: FrameSettings) -> Result<()> {
        settings.validate()?;
        self.stylizer.img2img().timesteps(&settings)?;
        self.settings = settings;
        Ok(())
    }

    /// Takes effect at the next frame; with frames in the stream batch, once they have
    /// drained (the next [`Self::submit`] drains them first).
    /// An error (the config stays as it was) when a value is out of range.
    pub fn set_config(&mut self, config: SessionConfig) -> Result<()> {
        config.validate()?;
        if !self.stream.is_empty() && config != self.config {
            self.pending_config = Some(config);
            return Ok(());
        }
        self.apply_config(config);
        Ok(())
    }

    pub fn config(&self) -> &SessionConfig {
        self.pending_config.as_ref().unwrap_or(&self.config)
    }

    fn apply_config(&mut self, config: SessionConfig) {
        self.attention.configure(config.attention, config.scope);
        self.attention.set_location(config.store);
        match (&self.membership, config.batch_timeout) {
            (None, Some(_)) => match self.stylizer.shared().batcher().join() {
                Ok(membership) => self.membership = Some(membership),
                // Only a poisoned batcher refuses: the calls run on their own.
                Err(e) => tracing::warn!("cross-stream batching stays off: {e:#}"),
            },
            (Some(_), None) => self.membership = None,
            _ => {}
        }
        if config.seed != self.config.seed || config.size != self.config.size {
            self.fixed_noise = None;
        }
        self.config = config;
    }

    /// Uses this noise for every frame (fixed noise given explicitly, e.g. from a file).
    pub fn set_noise(&mut self, noise: Option<Tensor>) {
        self.explicit_noise = noise;
    }

    /// Uses this step noise (`[rows, C, h, w]`, row k re-noises after LCM step k) for every
    /// frame, e.g. a noise file's `step_noise`; without it the step noise is seeded (see
    /// [`NoiseMode`]) even when the initial noise is explicit.
    pub fn set_step_noise(&mut self, step_noise: Option<Tensor>) {
        self.explicit_step_noise = step_noise;
    }

    /// A handle that cancels the frame in flight; the cancelled `push` (or `launch`) returns an
    /// error that downcasts to [`crate::pipeline::Cancelled`], and the next frame becomes a new
    /// anchor. A launched frame's device work cannot be cancelled: drop the [`InFlightFrame`].
    pub fn cancel_handle(&self) -> CancelHandle {
        self.cancel.clone()
    }

    /// Forgets every previous frame: the next frame is a new anchor (reason "reset"). Frames
    /// in the stream batch are dropped (a flush); [`Self::drain`] first to keep them.
    pub fn reset(&mut self) {
        self.reset_with_reason("reset");
    }

    /// [`Self::reset`], with the reason the next anchor gives (e.g. "flush", "caps changed").
    pub fn reset_with_reason(&mut self, reason: &'static str) {
        if !self.stream.is_empty() {
            tracing::debug!(frames = self.stream.len(), "reset: dropping the frames in the stream batch");
        }
        self.stream.clear();
        self.stream_settings = None;
        if let Some(config) = self.pending_config.take() {
            self.apply_config(config);
        }
        self.attention.reset();
        self.previous_thumbnail = None;
        self.last_output = None;
        self.last_diffused_thumbnail = None;
        self.skips_in_a_row = 0;
        self.pace.pause();
        self.reset_reason = Some(reason);
    }

    /// Frames skipped by similarity so far.
    pub fn frames_skipped(&self) -> u64 {
        self.frames_skipped
    }

    /// Frames submitted and not yet returned (stream batch; 0 otherwise).
    pub fn frames_in_flight(&self) -> usize {
        self.stream.len()
    }

    /// How many frames after its input a frame comes out with the current settings: the
    /// number of denoising steps minus one with stream batch on, else 0.
    pub fn output_delay(&self) -> Result<usize> {
        if !self.config().stream_batch {
            return Ok(0);
        }
        Ok(self.stylizer.img2img().timesteps(&self.settings)?.len().saturating_sub(1))
    }

    pub fn frames_pushed(&self) -> u64 {
        self.frames_pushed
    }

    /// Denoising calls so far whose UNet call also held other streams' frames (cross-stream
    /// batching).
    pub fn shared_calls(&self) -> u64 {
        self.shared_calls
    }

    /// How the loaded model's denoising calls ran so far, for every session sharing it: one
    /// frame, stream batch, cross-stream (eager, captured as CUDA graphs, replayed, failed).
    pub fn step_graph_stats(&self) -> [crate::ops::step_graphs::GraphStats; 3] {
        let img2img = self.stylizer.img2img();
        [img2img.graph_stats().0, img2img.stream_graph_stats().0, img2img.cross_stream_graph_stats().0]
    }

    /// One line on the shared model's step graphs (logged by the element when it stops): the
    /// calls of each kind, the captured graphs and static buffers held, the device memory CUDA
    /// graphs hold and the default memory pool's (both for all of this process's models).
    pub fn graph_report(&self) -> String {
        let show =
            |g: &crate::ops::step_graphs::GraphStats| format!("{}/{}/{}/{}", g.eager, g.captured, g.replayed, g.failed);
        let [one, stream, cross] = self.step_graph_stats();
        let held = self.stylizer.img2img().graph_holdings();
        let graphs = held.iter().map(|h| h.graphs.to_string()).collect::<Vec<_>>().join(" / ");
        let mib = |bytes: u64| bytes as f64 / (1 << 20) as f64;
        let buffer_mib = mib(held.iter().map(|h| h.buffer_bytes as u64).sum());
        let device = self.stylizer.device();
        let graph_memory = crate::gpu_memory::graph_memory(device)
            .map(|g| {
                format!("; CUDA graph memory in use {:.1} MiB (most reserved {:.1})", mib(g.used), mib(g.reserved_high))
            })
            .unwrap_or_default();
        // The pool's peak against the graphs' tells a warm-up peak (eager calls) from the
        // steady state's.
        let pool_memory = crate::gpu_memory::pool_memory(device)
            .map(|p| {
                format!(
                    "; memory pool: tensors {:.1} MiB (most {:.1}), held {:.1} MiB (most {:.1})",
                    mib(p.used),
                    mib(p.used_high),
                    mib(p.reserved),
                    mib(p.reserved_high)
                )
            })
            .unwrap_or_default();
        format!(
            "step graphs of the shared model: calls eager/captured/replayed/failed: one frame {}, stream batch {}, cross-stream {}; graphs held (one frame / stream batch / cross-stream) {graphs}, static buffers {buffer_mib:.1} MiB{graph_memory}{pool_memory}",
            show(&one),
            show(&stream),
            show(&cross)
        )
    }

    /// The size frames of `width` x `height` are processed at.
    pub fn processing_size(&self, width: usize, height: usize) -> Result<(usize, usize)> {
        self.config.size.resolve(width, height, self.stylizer.img2img().vae_scale_factor())
    }

    /// Stylizes the next frame. `control` replaces the frame's Canny edges when given.
    /// [`Self::prepare`] + [`Self::launch`]; the image stays on the device.
    /// One frame at a time: with stream batch on it is an error (use [`Self::push_stream`]).
    pub fn push(&mut self, frame: &RgbFrame, control: Option<&RgbFrame>) -> Result<StylizedFrame> {
        let prepared = self.prepare(frame, control)?;
        let launched = self.launch(prepared)?;
        self.stylized(launched)
    }

    /// The frame as `push` returns it, without waiting for the device (its decoding queued
    /// now when it was left to `finish`).
    fn stylized(&mut self, mut frame: InFlightFrame) -> Result<StylizedFrame> {
        let index = frame.index;
        let image = match frame.decoded(&self.stylizer) {
            Ok(image) => image,
            Err(e) => {
                self.attention.reset();
                return Err(e.context(format!("frame {index}")));
            }
        };
        Ok(StylizedFrame {
            image,
            index: frame.index,
            anchor: frame.anchor,
            anchor_reason: frame.anchor_reason,
            skipped: frame.skipped,
            prepare_time: frame.prepare_time,
            diffuse_time: frame.launch_time,
        })
    }

    /// Whether launched frames leave their decoding to `finish`: with a VAE stream (CUDA), so
    /// that the decoding of frame N queues there after the launch of frame N+1 (see
    /// [`Output::Latents`]); not with similarity skipping, which keeps the last image, nor with
    /// cross-stream batching.
    fn defers_decoding(&self) -> bool {
        self.vae_device().is_some() && self.config.skip_similarity <= 0.0 && self.config.batch_timeout.is_none()
    }

    /// The VAE stream's device when this session uses one (see [`Self::set_vae_stream`]): while
    /// it is the models' only user. The VAE stream is one stream for every user of the models,
    /// unlike the UNet's per-thread streams, and a graph capture on it must not meet another
    /// thread's work there; with several users (shared through the registry) the VAE runs on
    /// each user's own stream, as with the switch off. At most one session uses it at a time:
    /// a second user makes the count 2 for both before it uploads anything.
    fn vae_device(&self) -> Option<&candle_core::Device> {
        self.stylizer.img2img().vae_device().filter(|_| self.vae_stream && self.stylizer.sole_user())
    }

    /// Whether a caller that overlaps frames should launch frame N+1 before finishing frame
    /// N: true when the session decodes on the VAE stream in `finish` (CUDA with the models'
    /// VAE stream, see [`crate::ops::vae_stream`]), so that the UNet's stream always has the
    /// next frame queued; otherwise finishing N first is better (its download would queue
    /// behind N+1's whole diffusion on the one stream).
    pub fn launches_before_finishing(&self) -> bool {
        self.defers_decoding()
    }

    /// Uses the models' VAE stream (the default, when they have one) or not: off, the VAE
    /// runs on the UNet's stream, as with `SDCROSSFRAME_VAE_STREAM=off`, with the same
    /// kernels (A/B comparisons in one process). Call it between frames, with no frame in flight.
    pub fn set_vae_stream(&mut self, on: bool) {
        self.vae_stream = on;
    }

    /// The device frames go up to: the VAE stream's when the session uses one.
    fn upload_device(&self) -> candle_core::Device {
        self.vae_device().unwrap_or(self.stylizer.device()).clone()
    }

    /// Decodes a frame now: on the VAE stream when the session uses one.
    fn decode_now(&self, frame: DenoisingFrame) -> Result<Tensor> {
        match self.vae_device() {
            Some(_) => self.stylizer.img2img().decode_after(frame, None),
            None => self.stylizer.img2img().decode(frame),
        }
    }

    /// The CPU work of the next frame: scaling to the processing size, the scene-cut measure
    /// against the previous prepared frame, Canny (unless `control` is given), the initial
    /// noise, the upload. Call it after the previous frame was launched. A cancel requested
    /// before this call is forgotten (it was for the frame in flight then); one requested
    /// from here on cancels this frame's launch.
    pub fn prepare(&mut self, frame: &RgbFrame, control: Option<&RgbFrame>) -> Result<PreparedFrame> {
        let size = self.processing_size(frame.width, frame.height)?;
        self.prepare_at(frame, control, size)
    }

    /// [`Self::prepare`] at a processing size the caller already worked out with
    /// [`Self::processing_size`] for the frame's original size (the element scales frames
    /// itself, in the buffer's layout; the rule is not applied a second time to the scaled frame).
    pub fn prepare_at(
        &mut self,
        frame: &RgbFrame,
        control: Option<&RgbFrame>,
        (width, height): (usize, usize),
    ) -> Result<PreparedFrame> {
        let index = self.frames_pushed;
        let _span = tracing::info_span!("session_prepare", index).entered();
        let started = Instant::now();
        self.cancel.clear();
        let factor = self.stylizer.img2img().vae_scale_factor();
        if width == 0 || height == 0 || width % factor != 0 || height % factor != 0 {
            bail!("processing size {width}x{height} is not a non-zero multiple of {factor}");
        }
        // The frame's image and control image go up to the VAE stream's device when there is
        // one (the frame is encoded there; uploads to it do not wait for the UNet's stream).
        let device = self.upload_device();
        // CPU work first, so that it overlaps the device's previous frame: scaling, the
        // scene-cut measure, Canny.
        let scaled;
        let frame = if (frame.width, frame.height) == (width, height) {
            frame
        } else {
            scaled = frame.resized(width, height)?;
            &scaled
        };
        let canny_params = self.config.canny.clone();
        let control_source = || -> Result<ControlSource> {
            Ok(match control {
                Some(c) if (c.width, c.height) == (width, height) => ControlSource::Image(c),
                Some(c) => ControlSource::Scaled(c.resized(width, height)?),
                None => {
                    let view = ImageView::new(&frame.data, width, height, 3, width * 3)?;
                    ControlSource::Edges(canny::canny(&view, &canny_params)?)
                }
            })
        };
        let (thumbnail, control) = if self.config.skip_similarity > 0.0 {
            // The thumbnail first: a skipped frame needs nothing else.
            let thumbnail = luma_thumbnail(frame);
            if let Some(similarity) = self.skips(&thumbnail, index) {
                tracing::debug!(index, similarity, "similar to the last diffused frame: skipped");
                let scene_cut = self.scene_cut(thumbnail.clone(), (width, height));
                let prepare_time = started.elapsed();
                let size = (width, height);
                return Ok(PreparedFrame {
                    index,
                    work: None,
                    size,
                    thumbnail,
                    scene_cut,
                    prepare_time,
                    device_wait: Duration::ZERO,
                });
            }
            (thumbnail, control_source())
        } else {
            // The thumbnail and Canny (or the control image's scaling) side by side on the pool.
            rayon::join(|| luma_thumbnail(frame), control_source)
        };
        let control = control?;
        let scene_cut = self.scene_cut(thumbnail.clone(), (width, height));
        let cpu_time = started.elapsed();
        // The uploads are ordered after the device's queued work (a copy from pageable memory
        // waits for it): wait here explicitly, so that this time is counted as waiting for the
        // device and not as preparing.
        let waited = Instant::now();
        device.synchronize()?;
        let device_wait = waited.elapsed();
        let uploading = Instant::now();
        let input = frame.to_tensor(&device)?;
        let control = match control {
            ControlSource::Image(c) => c.to_tensor(&device)?,
            ControlSource::Scaled(c) => c.to_tensor(&device)?,
            ControlSource::Edges(edges) => canny::control_image(&edges, &device)?,
        };
        let rows = self.step_noise_rows()?;
        let FrameNoise { initial: noise, steps: step_noise } = self.noise_for(index, width, height, rows)?;
        let prepare_time = cpu_time + uploading.elapsed();
        let work = Some(FrameWork { input, control, noise, step_noise });
        Ok(PreparedFrame { index, work, size: (width, height), thumbnail, scene_cut, prepare_time, device_wait })
    }

    /// Runs the diffusion of a prepared frame through the cross-frame state: decides whether
    /// it re-anchors, then queues the device work (CUDA) or computes the frame (CPU). A
    /// failed or cancelled frame (an error that downcasts to [`crate::pipeline::Cancelled`])
    /// leaves no partial cross-frame state: the next frame becomes an anchor.
    ///
    /// Runs one frame at a time: with stream batch on it is an error (use [`Self::submit`]).
    pub fn launch(&mut self, prepared: PreparedFrame) -> Result<InFlightFrame> {
        if self.config().stream_batch {
            bail!(
                "stream batch is on: a frame comes out steps - 1 frames after it went in; submit frames with submit and drain at the end"
            );
        }
        self.check_turn(&prepared)?;
        if prepared.skipped() {
            return self.skip(prepared);
        }
        self.launch_one(prepared)
    }

    /// Runs a prepared frame and returns the frames that came out: with stream batch off the
    /// frame itself; with it on, the frame enters the stream batch and one UNet call advances
    /// every frame in it by one step, so once the batch is full (after `steps - 1` frames) the
    /// oldest frame comes out. A frame whose size or settings differ from the batch's first
    /// drains the batch (those frames come out before it enters), as does a config change.
    /// The frames and the cross-frame state are those of running the frames one at a time,
    /// within rounding. A failed frame drops every frame in flight and resets the
    /// cross-frame state.
    pub fn submit(&mut self, prepared: PreparedFrame) -> Result<Vec<InFlightFrame>> {
        self.check_turn(&prepared)?;
        let size = prepared.size();
        let needs_drain = self.pending_config.is_some()
            || (!prepared.skipped()
                && self.stream.iter().find_map(Slot::diffusing).is_some_and(|first| {
                    self.stream_settings.as_ref() != Some(&self.settings)
                        || (first.frame.plan().width, first.frame.plan().height) != size
                }));
        let mut out = if needs_drain { self.drain()? } else { Vec::new() };
        if let Some(config) = self.pending_config.take() {
            self.apply_config(config);
        }
        if !self.config.stream_batch {
            out.push(if prepared.skipped() { self.skip(prepared)? } else { self.launch_one(prepared)? });
            return Ok(out);
        }
        let result = if prepared.skipped() {
            // The frames in flight still advance a step, so frames keep coming out at the
            // input's rate.
            self.count_skip();
            self.stream.push_back(Slot::Skipped { index: prepared.index, prepare_time: prepared.prepare_time });
            self.stream_call()
        } else {
            self.enter_stream(prepared).and_then(|()| self.stream_call())
        };
        match result {
            Ok(done) => out.extend(done),
            Err(e) => {
                self.drop_stream();
                return Err(e);
            }
        }
        Ok(out)
    }

    /// Runs the frames in the stream batch to their end and returns them, oldest first. The
    /// cross-frame state stays (the next frame follows them).
    pub fn drain(&mut self) -> Result<Vec<InFlightFrame>> {
        let mut out = Vec::new();
        while !self.stream.is_empty() {
            match self.stream_call() {
                Ok(done) => out.extend(done),
                Err(e) => {
                    self.drop_stream();
                    return Err(e);
                }
            }
        }
        self.stream_settings = None;
        Ok(out)
    }

    /// Prepares and submits a frame ([`Self::prepare`] + [`Self::submit`]); the frames that came out.
    pub fn push_stream(&mut self, frame: &RgbFrame, control: Option<&RgbFrame>) -> Result<Vec<StylizedFrame>> {
        let prepared = self.prepare(frame, control)?;
        let out = self.submit(prepared)?;
        out.into_iter().map(|f| self.stylized(f)).collect()
    }

    /// [`Self::drain`], as [`StylizedFrame`]s.
    pub fn drain_stylized(&mut self) -> Result<Vec<StylizedFrame>> {
        let out = self.drain()?;
        out.into_iter().map(|f| self.stylized(f)).collect()
    }

    fn check_turn(&self, prepared: &PreparedFrame) -> Result<()> {
        if prepared.index != self.frames_pushed {
            bail!(
                "frame {} was prepared out of turn (frame {} is next): prepare each frame after launching the previous one",
                prepared.index,
                self.frames_pushed
            );
        }
        Ok(())
    }

    /// A skipped frame, one at a time: the last output again.
    fn skip(&mut self, prepared: PreparedFrame) -> Result<InFlightFrame> {
        let Some(image) = self.last_output.clone() else {
            bail!("frame {} was skipped with no diffused frame before it", prepared.index)
        };
        self.count_skip();
        self.skipped_frame(image, prepared.index, prepared.prepare_time)
    }

    /// A frame skipped by similarity took its turn.
    fn count_skip(&mut self) {
        self.frames_pushed += 1;
        self.frames_skipped += 1;
        self.skips_in_a_row += 1;
    }

    fn skipped_frame(&self, image: Tensor, index: u64, prepare_time: Duration) -> Result<InFlightFrame> {
        let device = self.stylizer.device();
        let mut span = DeviceSpan::start(device)?;
        span.end(device)?;
        Ok(InFlightFrame {
            output: Output::Image(image),
            index,
            skipped: true,
            anchor: false,
            anchor_reason: None,
            prepare_time,
            launch_time: Duration::ZERO,
            span,
        })
    }

    /// Whether similarity skipping skips a frame with this thumbnail; its similarity to the
    /// last diffused frame when it does.
    fn skips(&self, thumbnail: &[f32], index: u64) -> Option<f64> {
        let threshold = self.config.skip_similarity;
        if threshold <= 0.0 || self.skips_in_a_row >= self.config.max_skip {
            return None;
        }
        let last = self.last_diffused_thumbnail.as_ref()?;
        let similarity = thumbnail_similarity(last, thumbnail);
        // StreamDiffusion's rule: skip with probability 1 - (1 - similarity) / (1 - threshold).
        let probability = if threshold >= 1.0 {
            f64::from(u8::from(similarity >= 1.0))
        } else {
            (1.0 - (1.0 - similarity) / (1.0 - threshold)).clamp(0.0, 1.0)
        };
        let draw = crate::pipeline::uniform_draw(self.config.seed, index);
        (draw < probability).then_some(similarity)
    }

    /// A frame is being diffused: it is what later frames are compared with.
    fn diffusing(&mut self, thumbnail: Vec<f32>) {
        self.last_diffused_thumbnail = Some(thumbnail);
        self.skips_in_a_row = 0;
    }

    /// A failed stream call: its frames are lost, and so is the cross-frame state they wrote.
    fn drop_stream(&mut self) {
        self.stream.clear();
        self.stream_settings = None;
        self.attention.reset();
    }

    /// Starts a frame (encoding, noising, control embedding) and puts it in the stream batch.
    fn enter_stream(&mut self, prepared: PreparedFrame) -> Result<()> {
        let PreparedFrame { index, work, thumbnail, scene_cut, prepare_time, .. } = prepared;
        let Some(FrameWork { input, control, noise, step_noise }) = work else {
            bail!("frame {index} was skipped: it has nothing to diffuse")
        };
        self.diffusing(thumbnail);
        let _span = tracing::info_span!("session_frame", index, stream = true).entered();
        let entered = Instant::now();
        let anchor_reason = self.anchor_reason(scene_cut);
        if let Some(reason) = anchor_reason {
            tracing::info!(index, reason, "re-anchoring cross-frame attention");
            self.attention.request_anchor();
        }
        let step_noise = self.fresh_step_noise(index, &input, step_noise)?;
        let device = self.stylizer.device().clone();
        let span = DeviceSpan::start(&device)?;
        let embeddings = self.stylizer.prompt_embeddings(&self.settings)?;
        let inputs = FrameInputs {
            frame: &input,
            control: &control,
            embeddings: &embeddings,
            noise: &noise,
            step_noise: step_noise.as_ref(),
        };
        let mut frame =
            self.stylizer.img2img().start_frame(&inputs, &self.settings).with_context(|| format!("frame {index}"))?;
        self.attention.begin_frame(frame.plan())?;
        let anchor = self.config.attention != AttentionMode::Off && self.attention.current_frame_is_anchor();
        frame.set_anchor(anchor);
        let anchor_reason = self.anchor_reason_given(anchor, anchor_reason, index);
        self.frames_pushed += 1;
        self.stream_settings = Some(self.settings.clone());
        let entry = StreamEntry { frame, index, anchor_reason, prepare_time, launch_time: entered.elapsed(), span };
        self.stream.push_back(Slot::Diffusing(entry));
        Ok(())
    }

    /// One UNet call over the stream batch; decodes and returns the frames it finished.
    fn stream_call(&mut self) -> Result<Vec<InFlightFrame>> {
        self.cancel.check()?;
        let first = self.stream.iter().find_map(Slot::diffusing).map(|e| e.index);
        if let Some(first) = first {
            let mut frames: Vec<&mut DenoisingFrame> = self
                .stream
                .iter_mut()
                .filter_map(|slot| match slot {
                    Slot::Diffusing(entry) => Some(&mut entry.frame),
                    Slot::Skipped { .. } => None,
                })
                .collect();
            let count = frames.len();
            let _span = tracing::info_span!("stream_call", frames = count, first).entered();
            let img2img = self.stylizer.img2img();
            let result = match (&self.membership, self.config.batch_timeout) {
                (Some(membership), Some(timeout)) => batched_call(
                    self.stylizer.shared(),
                    membership,
                    {
                        // One call per frame interval: its start paces the stream.
                        self.pace.frame_started(Instant::now());
                        self.pace.wait(timeout)
                    },
                    &mut self.attention,
                    &mut frames,
                    Call::Batch,
                )
                .map(|streams| {
                    self.shared_calls += u64::from(streams > 1);
                }),
                _ => img2img.denoise_batch(&mut frames, &mut self.attention),
            };
            result.with_context(|| format!("stream batch of {count} frames from frame {first}"))?;
        }
        let mut out = Vec::new();
        let defer = self.defers_decoding();
        loop {
            match self.stream.front() {
                Some(Slot::Diffusing(entry)) if entry.frame.is_done() => {}
                Some(Slot::Skipped { .. }) => {}
                _ => break,
            }
            match self.stream.pop_front().expect("checked") {
                Slot::Diffusing(StreamEntry { frame, index, anchor_reason, prepare_time, launch_time, mut span }) => {
                    let anchor = frame.anchor();
                    let output = if defer {
                        // Decoded by `finish`, on the VAE stream, after this point.
                        Output::Latents { frame, ready: StreamPoint::recorded(self.stylizer.device())? }
                    } else {
                        let image = self.decode_now(frame).with_context(|| format!("frame {index}"))?;
                        span.end(image.device())?;
                        self.last_output = Some(image.clone());
                        Output::Image(image)
                    };
                    out.push(InFlightFrame {
                        output,
                        index,
                        skipped: false,
                        anchor,
                        anchor_reason,
                        prepare_time,
                        launch_time,
                        span,
                    });
                }
                Slot::Skipped { index, prepare_time } => {
                    let Some(image) = self.last_output.clone() else {
                        bail!("frame {index} was skipped with no diffused frame before it")
                    };
                    out.push(self.skipped_frame(image, index, prepare_time)?);
                }
            }
        }
        Ok(out)
    }

    /// Settings changed since `prepare` may need more rows of step noise.
    fn fresh_step_noise(&mut self, index: u64, input: &Tensor, step_noise: Option<Tensor>) -> Result<Option<Tensor>> {
        let rows = self.step_noise_rows()?;
        if rows > step_noise.as_ref().map_or(Ok(0), |s| s.dim(0))? {
            let (_, _, height, width) = input.dims4()?;
            return Ok(self.noise_for(index, width, height, rows)?.steps);
        }
        Ok(step_noise)
    }

    fn launch_one(&mut self, prepared: PreparedFrame) -> Result<InFlightFrame> {
        let PreparedFrame { index, work, thumbnail, scene_cut, prepare_time, .. } = prepared;
        let Some(FrameWork { input, control, noise, step_noise }) = work else {
            bail!("frame {index} was skipped: it has nothing to diffuse")
        };
        self.diffusing(thumbnail);
        let _span = tracing::info_span!("session_frame", index).entered();
        let anchor_reason = self.anchor_reason(scene_cut);
        if let Some(reason) = anchor_reason {
            tracing::info!(index, reason, "re-anchoring cross-frame attention");
            self.attention.request_anchor();
        }
        let launched = Instant::now();
        let step_noise = self.fresh_step_noise(index, &input, step_noise)?;
        let device = self.stylizer.device().clone();
        let mut span = DeviceSpan::start(&device)?;
        let defer = self.defers_decoding();
        let result = match (&self.membership, self.config.batch_timeout) {
            (Some(_), Some(_)) => {
                self.stylize_batched(&input, &control, &noise, step_noise.as_ref()).map(Output::Image)
            }
            _ => self
                .stylizer
                .denoise_cancellable(
                    &input,
                    &control,
                    &self.settings,
                    &noise,
                    step_noise.as_ref(),
                    &mut self.attention,
                    &self.cancel,
                )
                .and_then(|frame| {
                    if defer {
                        let ready = StreamPoint::recorded(&device)?;
                        return Ok(Output::Latents { frame, ready });
                    }
                    let image = self.decode_now(frame)?;
                    span.end(image.device())?;
                    Ok(Output::Image(image))
                }),
        };
        let launch_time = launched.elapsed();
        let output = match result {
            Ok(output) => output,
            Err(e) => {
                // A frame that failed half-way may have left a partial store behind.
                self.attention.reset();
                return Err(e.context(format!("frame {index}")));
            }
        };
        if let Output::Image(image) = &output {
            self.last_output = Some(image.clone());
        }
        self.frames_pushed += 1;
        let anchor = self.config.attention != AttentionMode::Off && self.attention.current_frame_is_anchor();
        let anchor_reason = self.anchor_reason_given(anchor, anchor_reason, index);
        Ok(InFlightFrame { output, index, skipped: false, anchor, anchor_reason, prepare_time, launch_time, span })
    }

    /// One frame, each denoising step through the cross-stream batcher ([`Img2Img::run`]
    /// otherwise).
    fn stylize_batched(
        &mut self,
        input: &Tensor,
        control: &Tensor,
        noise: &Tensor,
        step_noise: Option<&Tensor>,
    ) -> Result<Tensor> {
        let embeddings = self.stylizer.prompt_embeddings(&self.settings)?;
        let inputs = FrameInputs { frame: input, control, embeddings: &embeddings, noise, step_noise };
        let (Some(membership), Some(timeout)) = (&self.membership, self.config.batch_timeout) else {
            bail!("cross-stream batching is off")
        };
        self.pace.frame_started(Instant::now());
        let timeout = self.pace.wait(timeout);
        let models = self.stylizer.shared();
        let attention_on = self.config.attention != AttentionMode::Off;
        let mut shared_calls = 0;
        let frame = models.img2img().denoise_frame_with(
            &inputs,
            &self.settings,
            &mut self.attention,
            &mut (),
            &self.cancel,
            |_, attention, frame| {
                // The rows of a cross-stream call say which frames are anchors.
                frame.set_anchor(attention_on && attention.current_frame_is_anchor());
                let streams = batched_call(models, membership, timeout, attention, &mut [frame], Call::Sequential)?;
                shared_calls += u64::from(streams > 1);
                Ok(())
            },
        )?;
        self.shared_calls += shared_calls;
        self.decode_now(frame)
    }

    /// Downloads a launched frame as 8-bit RGB, waiting for the device. Frames may be finished
    /// after later frames were launched. A failed download (the device work failed) resets
    /// the cross-frame state, so the next frame launched becomes an anchor.
    pub fn finish(&mut self, frame: InFlightFrame) -> Result<FinishedFrame> {
        let (width, height) = frame.size()?;
        self.finish_at(frame, width, height)
    }

    /// [`Self::finish`], with the image scaled to `width` x `height` (the input's size) first,
    /// on the image's device.
    pub fn finish_at(&mut self, mut frame: InFlightFrame, width: usize, height: usize) -> Result<FinishedFrame> {
        let _span = tracing::info_span!("session_finish", index = frame.index).entered();
        let started = Instant::now();
        // A decoding left to here is queued now (on the VAE stream, behind the next frame's
        // encoding), then the scaling and the download follow it there.
        let image = frame.decoded(&self.stylizer);
        // On a GPU the image is scaled there before the download; on the CPU the scaling is CPU
        // work after the download and is counted apart (`scale_time`), not as diffusion.
        let result = image.and_then(|image| {
            if frame.is_asynchronous() {
                return resample::scaler().output(&image, width, height).map(|rgb| (rgb, Duration::ZERO));
            }
            RgbFrame::from_tensor(&image).and_then(|rgb| {
                let scaling = Instant::now();
                let rgb = rgb.resized(width, height)?;
                Ok((rgb, scaling.elapsed()))
            })
        });
        let (rgb, scale_time) = match result {
            Ok(done) => done,
            Err(e) => {
                self.attention.reset();
                return Err(e.context(format!("frame {}: cannot download the result", frame.index)));
            }
        };
        let wait_time = started.elapsed() - scale_time;
        let diffuse_time = frame.span.elapsed()?;
        let mut stylized = self.stylized(frame)?;
        stylized.diffuse_time = diffuse_time;
        Ok(FinishedFrame { stylized, rgb, wait_time, scale_time })
    }

    /// Compares a frame's luma thumbnail with the previous prepared frame's and keeps it:
    /// whether the change is a scene cut. A frame of another processing size is not compared:
    /// its new plan re-anchors anyway, and the anchor says why (not "scene cut").
    fn scene_cut(&mut self, thumbnail: Vec<f32>, size: (usize, usize)) -> bool {
        let previous = self.previous_thumbnail.replace((size, thumbnail));
        let threshold = self.config.scene_cut_threshold;
        if threshold > 0.0
            && let Some((previous_size, previous)) = previous
            && previous_size == size
            && let Some((_, current)) = &self.previous_thumbnail
        {
            return scene_change(&previous, current) > threshold;
        }
        false
    }

    /// Why the frame being launched must become an anchor, if it must (interval or scene cut).
    fn anchor_reason(&self, scene_cut: bool) -> Option<&'static str> {
        if self.config.attention == AttentionMode::Off {
            return None;
        }
        let interval = self.config.anchor_interval;
        if interval > 0 && self.attention.stored_entries() > 0 && self.attention.frames_since_anchor() + 1 >= interval {
            return Some("anchor interval");
        }
        scene_cut.then_some("scene cut")
    }

    /// Why a frame that ran as `anchor` is one: the reason asked for before it ran, else what
    /// made the cross-frame state start over (the first frame, a reset, a new plan).
    fn anchor_reason_given(&mut self, anchor: bool, asked: Option<&'static str>, index: u64) -> Option<&'static str> {
        let reset_reason = self.reset_reason.take();
        if !anchor {
            return None;
        }
        Some(asked.unwrap_or(if index == 0 {
            "first frame"
        } else if let Some(reason) = reset_reason {
            reason
        } else {
            "frame size or schedule changed"
        }))
    }

    /// Rows of step noise the current settings need (LCM: steps - 1).
    fn step_noise_rows(&self) -> Result<usize> {
        Ok(self.stylizer.img2img().schedule(&self.settings)?.step_noise_rows())
    }

    /// The frame's initial noise and `rows` rows of step noise: explicit ones where given,
    /// else seeded (the seed for `fixed`, seed + index for `per-frame`).
    fn noise_for(&mut self, index: u64, width: usize, height: usize, rows: usize) -> Result<FrameNoise> {
        if let (Some(initial), 0) = (&self.explicit_noise, rows) {
            return Ok(FrameNoise { initial: initial.clone(), steps: None });
        }
        let explicit_steps = self.explicit_step_noise.clone().filter(|_| rows > 0);
        if let (Some(initial), Some(steps)) = (&self.explicit_noise, &explicit_steps) {
            return Ok(FrameNoise { initial: initial.clone(), steps: Some(steps.clone()) });
        }
        let seeded = match self.config.noise {
            NoiseMode::PerFrame => {
                self.stylizer.seeded_frame_noise(self.config.seed.wrapping_add(index), width, height, rows)?
            }
            NoiseMode::Fixed => match &self.fixed_noise {
                Some((key, noise)) if *key == (width, height, rows) => noise.clone(),
                _ => {
                    let noise = self.stylizer.seeded_frame_noise(self.config.seed, width, height, rows)?;
                    self.fixed_noise = Some(((width, height, rows), noise.clone()));
                    noise
                }
            },
        };
        Ok(FrameNoise {
            initial: self.explicit_noise.clone().unwrap_or(seeded.initial),
            steps: explicit_steps.or(seeded.steps),
        })
    }
}

/// Area-averaged luma (0..1) on a small square grid: cheap, and blind to noise and small motion.
pub fn luma_thumbnail(frame: &RgbFrame) -> Vec<f32> {
    use rayon::prelude::*;
    let side = THUMBNAIL_SIDE;
    // Integer luma (Rec. 601 weights in 16-bit fixed point) summed per cell: exact sums, no
    // division per pixel, so bands of rows can be summed apart and added.
    let column_cell: Vec<usize> = (0..frame.width).map(|x| x * side / frame.width).collect();
    let bands = crate::parallel::split_rows(frame.height, crate::parallel::band_count(frame.height, 64));
    let band_sums = |band: std::ops::Range<usize>| {
        let mut sums = vec![0u64; side * side];
        let mut counts = vec![0u64; side * side];
        let mut row_sums = vec![0u64; side];
        let mut row_counts = vec![0u64; side];
        for y in band {
            let row = &frame.data[y * frame.width * 3..(y + 1) * frame.width * 3];
            row_sums.iter_mut().for_each(|v| *v = 0);
            row_counts.iter_mut().for_each(|v| *v = 0);
            for (px, &cell) in row.chunks_exact(3).zip(&column_cell) {
                row_sums[cell] += 19595 * px[0] as u64 + 38470 * px[1] as u64 + 7471 * px[2] as u64;
                row_counts[cell] += 1;
            }
            let base = y * side / frame.height * side;
            for cell in 0..side {
                sums[base + cell] += row_sums[cell];
                counts[base + cell] += row_counts[cell];
            }
        }
        (sums, counts)
    };
    let (sums, counts) = bands.into_par_iter().map(band_sums).reduce(
        || (vec![0u64; side * side], vec![0u64; side * side]),
        |(mut sums, mut counts), (s, c)| {
            sums.iter_mut().zip(&s).for_each(|(a, b)| *a += b);
            counts.iter_mut().zip(&c).for_each(|(a, b)| *a += b);
            (sums, counts)
        },
    );
    let scale = 255.0 * 65536.0;
    sums.iter().zip(&counts).map(|(&s, &c)| if c == 0 { 0.0 } else { (s as f64 / c as f64 / scale) as f32 }).collect()
}

/// Cosine similarity (-1..1) of two luma thumbnails centred on mid-grey (values -1..1, as
/// StreamDiffusion compares images normalised to -1..1); 1 when both are flat mid-grey.
pub fn thumbnail_similarity(a: &[f32], b: &[f32]) -> f64 {
    let (mut dot, mut aa, mut bb) = (0f64, 0f64, 0f64);
    for (&x, &y) in a.iter().zip(b) {
        let (x, y) = (2.0 * x as f64 - 1.0, 2.0 * y as f64 - 1.0);
        dot += x * y;
        aa += x * x;
        bb += y * y;
    }
    if aa == 0.0 || bb == 0.0 {
        return if aa == bb { 1.0 } else { 0.0 };
    }
    (dot / (aa.sqrt() * bb.sqrt())).clamp(-1.0, 1.0)
}

/// Mean absolute difference of two thumbnails (0..1).
pub fn scene_change(a: &[f32], b: &[f32]) -> f64 {
    let total: f64 = a.iter().zip(b).map(|(x, y)| (x - y).abs() as f64).sum();
    total / a.len().max(1) as f64
}
