//! The `sdcrossframe` element: an in-place video filter over a
//! [`sdcrossframe::session::VideoSession`].
//!
//! Threads and locks:
//! - `settings` holds the property values; each frame copies them out and never holds the
//!   lock while working.
//! - `state` exists between `start` and `stop`. `start` spawns a loader thread (weights are
//!   read and the session built off the streaming thread, with progress messages on the bus)
//!   and keeps its receiving end; the first frame waits for it. The streaming thread holds
//!   `state` for the whole frame.
//! - `unblock` and `cancel` live outside `state` so a flush or PAUSED->READY, which come from
//!   another thread, can stop a frame that waits for the model or is being denoised (the
//!   engine checks the cancel handle before every denoising step).
//! - `frame_duration` (from the negotiated framerate) lives outside `state` too, so the
//!   latency query never waits for a frame.
//!
//! Overlap (the `overlap` property, on by default): the element keeps one frame in flight so
//! the CPU work around the diffusion runs while the GPU diffuses. It takes the input buffers
//! itself (`generate_output` takes the buffer BaseTransform's `submit_input_buffer` queued,
//! after its QoS check) and, for buffer N+1: reads and prepares N+1 while the GPU still runs
//! N, downloads N (waiting for the GPU), launches N+1 (queued on the GPU), scales N back and
//! writes it into N's own buffer while the GPU runs N+1, and pushes N. When the session runs
//! its VAE on a stream of its own (CUDA, `VideoSession::launches_before_finishing`), N+1 is
//! launched before N is downloaded: N's decoding, scaling back and download queue on the VAE
//! stream behind N+1's encoding, so the UNet's stream goes from N to N+1 without waiting for
//! the host. Buffers go out in order
//! with their own timestamps, flags and metas (written in place, or in a copy when upstream
//! still holds a reference). The held frame goes out before any serialized event (EOS, caps,
//! segment, gap, ...) and on a DRAIN query; a flush or `stop` drops it. The element pushes
//! these buffers itself, so a frame after a QoS drop is marked DISCONT here (BaseTransform
//! would mark the held, earlier one). The latency query adds one frame duration.
//!
//! Stream batch (the `stream-batch` property): the engine denoises the frames in flight
//! together, each at its own step, and a frame comes out `steps - 1` frames after it went in.
//! The element then holds the buffers of every frame in flight (`waiting`, in order) and pairs
//! each frame that comes out with the oldest; EOS (any serialized event, a DRAIN query) drains
//! the engine so every buffer goes out, a flush drops them. It always takes the overlapped
//! path. The latency query adds the `steps - 1` frames. Similarity skipping (`skip-similarity`,
//! `max-skip`): a skipped frame's buffer gets the last diffused frame's image.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use gst::glib;
use gst::prelude::*;
use gst::subclass::prelude::*;
use gst_base::subclass::prelude::*;
use gst_video::prelude::*;
use gst_video::subclass::prelude::*;
use sdcrossframe::canny::CannyParams;
use sdcrossframe::frame::RgbFrame;
use sdcrossframe::pipeline::{BatchTimeout, CancelHandle, Cancelled, SizeRequest};
use sdcrossframe::pipeline::{FrameSettings, LoraSpec, MAX_STEPS, ModelSpec, Stylizer};
use sdcrossframe::scheduler::TimestepIndices;
use sdcrossframe::session::{FinishedFrame, InFlightFrame, PreparedFrame, SessionConfig, VideoSession};

use super::{Attention, AttentionScope, CrossFrameStore, DType, Guidance, Noise, Scheduler};
use crate::engine_log::EngineLog;
use crate::video::{self, PixelLayout};

static CAT: LazyLock<gst::DebugCategory> = LazyLock::new(|| {
    gst::DebugCategory::new(
        "sdcrossframe",
        gst::DebugColorFlags::empty(),
        Some("Stable Diffusion video restyling with cross-frame attention"),
    )
});

/// The original project's models (Hugging Face repo ids).
const DEFAULT_MODEL: &str = "runwayml/stable-diffusion-v1-5";
const DEFAULT_CONTROLNET: &str = "lllyasviel/sd-controlnet-canny";
const DEFAULT_DEVICE: &str = "cpu";
const DEFAULT_LATENCY_MS: u32 = 1000;
const MAX_LATENCY_MS: u32 = 600_000;
const MAX_SIZE: u32 = 16384;
const MAX_THRESHOLD: f64 = 65535.0;
/// How often a frame waiting for the model checks for a flush.
const LOAD_POLL: Duration = Duration::from_millis(50);

#[derive(Debug, Clone, PartialEq)]
struct Settings {
    model: String,
    controlnet: String,
    variant: Option<String>,
    /// Comma-separated `path[:scale]` LoRA entries, parsed when the element starts.
    lora: String,
    vae: Option<String>,
    /// Tokenizer for a single-file checkpoint (a directory or repo id); `None`: from the cache.
    tokenizer: Option<String>,
    model_instance_id: String,
    device: String,
    dtype: DType,
    prompt: String,
    negative_prompt: String,
    steps: u32,
    strength: f64,
    guidance_scale: f64,
    controlnet_scale: f64,
    scheduler: Scheduler,
    /// Explicit timestep indices as set (parsed per frame; empty: none).
    timesteps: String,
    guidance: Guidance,
    seed: u64,
    noise: Noise,
    canny_low: f64,
    canny_high: f64,
    canny_l2: bool,
    attention: Attention,
    attention_scope: AttentionScope,
    cross_frame_store: CrossFrameStore,
    anchor_interval: u32,
    scene_cut_threshold: f64,
    width: u32,
    height: u32,
    latency_ms: u32,
    overlap: bool,
    stream_batch: bool,
    skip_similarity: f64,
    max_skip: u32,
    /// Cross-stream batching: how long a denoising call waits for the calls of other elements
    /// sharing the model, in milliseconds; 0 off, -1 auto.
    batch_timeout_ms: i32,
}

/// The `batch-timeout` default: off. Batching pays when the elements share a step plan (on an
/// H200, 4 elements: 1.02x to 1.27x the throughput of separate copies, see MEASUREMENTS.md), but a
/// round runs the calls of different plans one after another, where separate elements would
/// overlap on the GPU: opt in.
const DEFAULT_BATCH_TIMEOUT_MS: i32 = 0;

/// `batch-timeout=-1`: wait a quarter of the element's recent frame interval (5 to 500 ms).
const AUTO_BATCH_TIMEOUT: i32 = -1;

impl Default for Settings {
    /// The engine's defaults (checked by a test), i.e. the original project's settings.
    fn default() -> Self {
        let frame = FrameSettings::default();
        let session = SessionConfig::default();
        Self {
            model: DEFAULT_MODEL.into(),
            controlnet: DEFAULT_CONTROLNET.into(),
            variant: None,
            lora: String::new(),
            vae: None,
            tokenizer: None,
            model_instance_id: String::new(),
            device: DEFAULT_DEVICE.into(),
            dtype: DType::F32,
            prompt: frame.prompt,
            negative_prompt: frame.negative_prompt,
            steps: frame.steps as u32,
            strength: frame.strength,
            guidance_scale: frame.guidance_scale,
            controlnet_scale: frame.controlnet_scale,
            scheduler: Scheduler::Auto,
            timesteps: String::new(),
            guidance: Guidance::Auto,
            seed: session.seed,
            noise: Noise::Fixed,
            canny_low: session.canny.low,
            canny_high: session.canny.high,
            canny_l2: session.canny.l2_gradient,
            attention: Attention::FirstPrev,
            attention_scope: AttentionScope::Up,
            cross_frame_store: CrossFrameStore::Device,
            anchor_interval: session.anchor_interval as u32,
            scene_cut_threshold: session.scene_cut_threshold,
            width: 0,
            height: 0,
            latency_ms: DEFAULT_LATENCY_MS,
            overlap: true,
            stream_batch: session.stream_batch,
            skip_similarity: session.skip_similarity,
            max_skip: session.max_skip as u32,
            batch_timeout_ms: DEFAULT_BATCH_TIMEOUT_MS,
        }
    }
}

impl Settings {
    /// The models to load; the `lora` list is parsed here (its errors name the bad entry).
    fn model_spec(&self) -> anyhow::Result<ModelSpec> {
        Ok(ModelSpec {
            model: self.model.clone(),
            controlnet: self.controlnet.clone(),
            variant: self.variant.clone().filter(|v| !v.is_empty()),
            loras: LoraSpec::parse_list(&self.lora).context("invalid lora property")?,
            vae: self.vae.clone().filter(|v| !v.is_empty()),
            tokenizer: self.tokenizer.clone().filter(|t| !t.is_empty()),
        })
    }

    /// The engine's frame settings; an error naming the value when `timesteps` does not parse.
    fn frame_settings(&self) -> Result<FrameSettings, String> {
        Ok(FrameSettings {
            prompt: self.prompt.clone(),
            negative_prompt: self.negative_prompt.clone(),
            steps: self.steps as usize,
            strength: self.strength,
            guidance_scale: self.guidance_scale,
            controlnet_scale: self.controlnet_scale,
            scheduler: self.scheduler.into(),
            timesteps: TimestepIndices::parse_optional(&self.timesteps).map_err(|e| format!("{e:#}"))?,
            guidance: self.guidance.into(),
        })
    }

    fn session_config(&self) -> SessionConfig {
        SessionConfig {
            attention: self.attention.into(),
            scope: self.attention_scope.into(),
            store: self.cross_frame_store.into(),
            anchor_interval: self.anchor_interval as usize,
            scene_cut_threshold: self.scene_cut_threshold,
            noise: self.noise.into(),
            seed: self.seed,
            canny: CannyParams { low: self.canny_low, high: self.canny_high, l2_gradient: self.canny_l2 },
            size: SizeRequest { width: self.width as usize, height: self.height as usize },
            stream_batch: self.stream_batch,
            skip_similarity: self.skip_similarity,
            max_skip: self.max_skip as usize,
            batch_timeout: match self.batch_timeout_ms {
                0 => None,
                AUTO_BATCH_TIMEOUT => Some(BatchTimeout::Auto),
                ms => Some(BatchTimeout::Fixed(std::time::Duration::from_millis(ms.unsigned_abs().into()))),
            },
        }
    }

    fn latency(&self) -> gst::ClockTime {
        gst::ClockTime::from_mseconds(self.latency_ms as u64)
    }
}

/// Everything the loader thread needs, copied out of the settings and checked by `start`.
struct LoadRequest {
    spec: ModelSpec,
    /// The `model` and `controlnet` settings, for messages.
    model: String,
    controlnet: String,
    /// The `model-instance-id` setting (empty: shared by equal settings).
    instance_id: String,
    /// The `device` setting (for messages) and the device it opened.
    device_name: String,
    device: candle_core::Device,
    dtype: DType,
    config: SessionConfig,
    frame_settings: FrameSettings,
}

impl LoadRequest {
    fn describe(&self) -> String {
        let loras = match &self.spec.loras {
            loras if !loras.is_empty() => {
                format!(" and LoRA {}", loras.iter().map(|l| l.to_string()).collect::<Vec<_>>().join(", "))
            }
            _ => String::new(),
        };
        let vae = match &self.spec.vae {
            Some(vae) => format!(" and VAE '{vae}'"),
            None => String::new(),
        };
        let instance = match self.instance_id.as_str() {
            "" => String::new(),
            id => format!(" as model instance '{id}'"),
        };
        format!(
            "Stable Diffusion model '{}' with ControlNet '{}'{loras}{vae} on {} ({}){instance}",
            self.model,
            self.controlnet,
            self.device_name,
            candle_core::DType::from(self.dtype).as_str()
        )
    }

    fn load(self) -> anyhow::Result<VideoSession> {
        // Shared with every element (and session) of the process that asks for the same models
        // under the same instance id (see sdcrossframe::pipeline::registry).
        let stylizer = Stylizer::load_shared(&self.spec, &self.device, self.dtype.into(), &self.instance_id)?;
        let mut session = VideoSession::new(stylizer, self.config, self.frame_settings.clone())
            .context("invalid element settings")?;
        session.set_settings(self.frame_settings).context("invalid element settings")?;
        Ok(session)
    }
}

enum Model {
    /// The loader thread sends the session, or `None` after it posted the load error.
    Loading(mpsc::Receiver<Option<VideoSession>>),
    Ready(Box<VideoSession>),
    Failed,
}

/// A buffer whose frame is in the engine (stream batch): it goes out with the frame that
/// comes out for it.
struct Waiting {
    buffer: gst::Buffer,
    info: gst_video::VideoInfo,
    discont: bool,
    read_time: Duration,
}

impl Waiting {
    fn with(self, frame: InFlightFrame) -> Held {
        let Self { buffer, info, discont, read_time } = self;
        Held { buffer, info, frame, discont, read_time }
    }
}

/// A launched frame whose buffer waits for the next frame's launch (overlap on).
struct Held {
    /// The input buffer, written with the stylized frame when it goes out.
    buffer: gst::Buffer,
    /// Its caps (a caps change drains first, so this is the buffer's own).
    info: gst_video::VideoInfo,
    frame: InFlightFrame,
    /// A frame before it was dropped (QoS): it goes out marked DISCONT.
    discont: bool,
    /// Time spent reading the buffer's pixels (for the frame's trace line).
    read_time: Duration,
}

/// A held frame, downloaded, to write into its buffer.
struct Finished {
    buffer: gst::Buffer,
    info: gst_video::VideoInfo,
    frame: FinishedFrame,
    discont: bool,
    read_time: Duration,
}

struct State {
    model: Model,
    /// Frames are queued (the `overlap` or `stream-batch` property at start).
    overlap: bool,
    /// The frames out of the engine, waiting to be downloaded (overlap on), oldest first.
    held: std::collections::VecDeque<Held>,
    /// The buffers of the frames in the engine (stream batch), oldest first.
    waiting: std::collections::VecDeque<Waiting>,
    /// QoS dropped a frame since the last one launched (overlap on).
    discont: bool,
    /// What the properties asked for at the last frame, applied or rejected: a change is
    /// tried (and a rejection warned about) once.
    requested: Option<(Result<FrameSettings, String>, SessionConfig)>,
    /// The negotiated input, to re-anchor on real caps changes only.
    info: Option<gst_video::VideoInfo>,
    timings: FrameTimings,
}

/// Where a frame's time goes, summed over the stream and logged at stop: the element's
/// own work (reading, preparing, writing) against the diffusion, and how much of the former
/// ran while the device diffused.
#[derive(Default)]
struct FrameTimings {
    /// Frames downloaded.
    frames: u32,
    /// Packed RGB at the processing size from the buffer (scaled in the buffer's own layout,
    /// then its channels picked).
    read: Duration,
    /// Scene-cut measure, Canny, upload (without waiting; the frame is already scaled).
    prepare: Duration,
    /// VAE encode, denoising steps, VAE decode: the device's time for them, measured with
    /// CUDA events around the frame's queued work (wall time on the CPU, where the launch
    /// computes the frame).
    diffuse: Duration,
    /// Time the element waited for the device: before uploading the next frame (the engine
    /// synchronizes there) and in downloads (scaling back on the GPU and copying included).
    wait: Duration,
    /// Into the buffer's layout (and, on the CPU, scaling back to the frame size).
    write: Duration,
    /// The part of read + prepare + write done while a frame was diffusing on the device
    /// (overlap on, CUDA; zero on the CPU, where the launch computes the frame).
    overlapped: Duration,
    /// Frames skipped by similarity (their buffers got the last diffused frame's image).
    skipped: u32,
}

impl FrameTimings {
    fn summary(&self) -> Option<String> {
        if self.frames == 0 {
            return None;
        }
        let ms = |d: Duration| d.as_secs_f64() * 1e3 / self.frames as f64;
        let own = ms(self.read) + ms(self.prepare) + ms(self.write);
        let overhead = (own - ms(self.overlapped)).max(0.0);
        let total = overhead + ms(self.diffuse);
        Some(format!(
            "{} frames ({} skipped by similarity), per frame: read {:.2} ms, prepare {:.2} ms, diffuse {:.1} ms (device time), waited for the device {:.2} ms, \
             write {:.2} ms, overlapped with the diffusion {:.2} ms; \
             element overhead {overhead:.2} ms = {:.2}% of {total:.1} ms",
            self.frames,
            self.skipped,
            ms(self.read),
            ms(self.prepare),
            ms(self.diffuse),
            ms(self.wait),
            ms(self.write),
            ms(self.overlapped),
            100.0 * overhead / total.max(1e-9)
        ))
    }
}

#[derive(Default)]
pub struct SdCrossFrame {
    settings: Mutex<Settings>,
    state: Mutex<Option<State>>,
    unblock: AtomicBool,
    cancel: Mutex<Option<CancelHandle>>,
    /// One frame at the negotiated framerate; `None` while unknown.
    frame_duration: Mutex<Option<gst::ClockTime>>,
    /// Frames a frame comes out after it went in (stream batch: steps - 1), for the latency
    /// query.
    stream_delay: std::sync::atomic::AtomicU64,
    /// Counters for the `stats` property, outside `state` so that reading them never waits
    /// for a frame.
    stats: Stats,
    /// The model loading thread of the last start (joined by `stop` and the next start).
    loader: Mutex<Option<Loader>>,
    /// Model loads running now, and the most at once since the element was made (`stats`).
    loads: Arc<LoadCounter>,
    /// The engine's `tracing` events into this element's GStreamer log (made on first use).
    engine_log: std::sync::OnceLock<EngineLog>,
}

/// The loading thread and the flag that makes its result stale.
struct Loader {
    handle: std::thread::JoinHandle<()>,
    stale: Arc<AtomicBool>,
}

#[derive(Default)]
struct LoadCounter {
    running: AtomicU64,
    most: AtomicU64,
}

/// One running load, counted from its spawn until its thread ends.
struct InFlight(Arc<LoadCounter>);

impl InFlight {
    fn new(counter: &Arc<LoadCounter>) -> Self {
        let now = counter.running.fetch_add(1, Ordering::SeqCst) + 1;
        counter.most.fetch_max(now, Ordering::SeqCst);
        Self(counter.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.running.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Frames counted since the element started (the `stats` property).
#[derive(Default)]
struct Stats {
    /// Buffers that reached the element.
    frames_in: AtomicU64,
    /// Buffers that left it.
    frames_out: AtomicU64,
    /// Buffers dropped by QoS (late) before they were processed.
    dropped: AtomicU64,
    /// Buffers that went out with the last diffused frame's image (similarity skipping).
    skipped: AtomicU64,
    /// Bytes the cross-frame store holds (after the last frame).
    store_bytes: AtomicU64,
    /// Of the device's memory, what the store's buffers keep (all of it on the device; the
    /// call's staging buffers with `cross-frame-store=host`).
    store_device_bytes: AtomicU64,
    /// Denoising calls whose UNet call also held other elements' frames.
    shared_calls: AtomicU64,
}

impl Stats {
    fn reset(&self) {
        for counter in [
            &self.frames_in,
            &self.frames_out,
            &self.dropped,
            &self.skipped,
            &self.store_bytes,
            &self.store_device_bytes,
            &self.shared_calls,
        ] {
            counter.store(0, Ordering::SeqCst);
        }
    }

    fn structure(&self) -> gst::Structure {
        let get = |c: &AtomicU64| c.load(Ordering::SeqCst);
        let (frames_in, frames_out, dropped) = (get(&self.frames_in), get(&self.frames_out), get(&self.dropped));
        gst::Structure::builder("sdcrossframe-stats")
            .field("frames-in", frames_in)
            .field("frames-out", frames_out)
            .field("dropped", dropped)
            .field("skipped", get(&self.skipped))
            .field("in-flight", frames_in.saturating_sub(frames_out + dropped))
            .field("cross-frame-bytes", get(&self.store_bytes))
            .field("cross-frame-device-bytes", get(&self.store_device_bytes))
            .field("shared-calls", get(&self.shared_calls))
            .build()
    }
}

impl SdCrossFrame {
    /// Sends the calling thread's engine events to this element's log while the guard lives
    /// (see [`crate::engine_log`]); taken at every entry point that runs engine code.
    fn engine_log(&self) -> Option<tracing::dispatcher::DefaultGuard> {
        self.engine_log_bridge().enter()
    }

    fn engine_log_bridge(&self) -> &EngineLog {
        self.engine_log.get_or_init(|| EngineLog::new(self.obj().upcast_ref()))
    }

    /// Starts loading the models on their own thread (named `sdcf-load`), after joining any
    /// earlier one: an element runs at most one load at a time (`stop` joins it too).
    fn spawn_loader(&self, request: LoadRequest) -> std::io::Result<mpsc::Receiver<Option<VideoSession>>> {
        self.join_loader();
        let (tx, rx) = mpsc::channel();
        let element = self.obj().downgrade();
        let stale = Arc::new(AtomicBool::new(false));
        let in_flight = InFlight::new(&self.loads);
        let thread_stale = stale.clone();
        let engine_log = self.engine_log_bridge().clone();
        let handle = std::thread::Builder::new().name("sdcf-load".into()).spawn(move || {
            let _engine_log = engine_log.enter();
            let _in_flight = in_flight;
            let stale = thread_stale;
            if stale.load(Ordering::SeqCst) {
                return;
            }
            let post = |message: gst::Message| {
                if let Some(element) = element.upgrade() {
                    let _ = element.post_message(message);
                }
            };
            let src = element.upgrade();
            let description = request.describe();
            let (model, controlnet) = (request.model.clone(), request.controlnet.clone());
            gst::info!(CAT, "loading {description}");
            if let Some(src) = &src {
                post(
                    gst::message::Progress::builder(
                        gst::ProgressType::Start,
                        "load-model",
                        &format!("Loading {description}"),
                    )
                    .src(src)
                    .build(),
                );
            }
            let started = Instant::now();
            // A panic in the load (candle or a driver binding) is a load error with its text,
            // not a loader that vanishes and leaves the first frame failing unexplained.
            let result = catching_panics("the load", || request.load());
            let Some(element) = src else {
                return;
            };
            if stale.load(Ordering::SeqCst) {
                // The element stopped while this load ran (candle cannot stop a load midway):
                // its result, or its error, is no one's; the session is freed here, before
                // `stop` returns.
                gst::debug!(CAT, obj = element, "dropping the result of a load the element no longer waits for");
                return;
            }
            match result {
                Ok(session) => {
                    let text = format!("Loaded {description} in {:.1} s", started.elapsed().as_secs_f64());
                    gst::info!(CAT, obj = element, "{text}");
                    post(
                        gst::message::Progress::builder(gst::ProgressType::Complete, "load-model", &text)
                            .src(&element)
                            .build(),
                    );
                    let _ = tx.send(Some(session));
                }
                Err(e) => {
                    gst::error!(CAT, obj = element, "loading {description} failed: {e:#}");
                    post(
                        gst::message::Progress::builder(
                            gst::ProgressType::Error,
                            "load-model",
                            &format!("Failed to load {description}"),
                        )
                        .src(&element)
                        .build(),
                    );
                    gst::element_error!(
                        element,
                        gst::LibraryError::Init,
                        ("Could not load Stable Diffusion model '{model}' / ControlNet '{controlnet}': {e:#}"),
                        ["{description}: {e:#}"]
                    );
                    let _ = tx.send(None);
                }
            }
        })?;
        *self.loader.lock().unwrap() = Some(Loader { handle, stale });
        Ok(rx)
    }

    /// What `start` can know is wrong before any weight is read: settings that do not parse
    /// or do not go together, a device that does not exist, a dtype the device cannot compute
    /// in, local paths that do not exist, steps x strength without a denoising step. Each is
    /// an error of `start` (a settings error, not a load failure); the rest is the loader's.
    fn check_settings(&self, settings: &Settings) -> Result<LoadRequest, gst::ErrorMessage> {
        let invalid = |e: &dyn std::fmt::Display| {
            gst::error_msg!(gst::LibraryError::Settings, ("Invalid element settings: {e}"), ["{e}"])
        };
        let frame_settings = settings.frame_settings().map_err(|e| invalid(&e))?;
        let config = settings.session_config();
        let checked = || -> anyhow::Result<(ModelSpec, candle_core::Device)> {
            frame_settings.validate()?;
            frame_settings.check_has_steps()?;
            config.validate()?;
            let spec = settings.model_spec()?;
            spec.check_local_paths()?;
            let device = sdcrossframe::device::parse_device(&settings.device)?;
            sdcrossframe::device::check_dtype(&device, settings.dtype.into())?;
            Ok((spec, device))
        };
        let (spec, device) = checked().map_err(|e| invalid(&format_args!("{e:#}")))?;
        Ok(LoadRequest {
            spec,
            model: settings.model.clone(),
            controlnet: settings.controlnet.clone(),
            instance_id: settings.model_instance_id.clone(),
            device_name: settings.device.clone(),
            device,
            dtype: settings.dtype,
            config,
            frame_settings,
        })
    }

    /// Marks the load in flight stale (its result is dropped) and waits for its thread to end.
    fn join_loader(&self) {
        let Some(Loader { handle, stale }) = self.loader.lock().unwrap().take() else {
            return;
        };
        stale.store(true, Ordering::SeqCst);
        if !handle.is_finished() {
            gst::debug!(CAT, imp = self, "waiting for the model load in flight to end");
        }
        if handle.join().is_err() {
            gst::error!(CAT, imp = self, "the model loading thread panicked");
        }
    }

    /// Waits for the loader; gives up on a flush or a state change.
    fn wait_for_model<'a>(&self, state: &'a mut State) -> Result<&'a mut VideoSession, gst::FlowError> {
        let mut logged = false;
        loop {
            match &state.model {
                Model::Ready(_) => break,
                Model::Failed => return Err(gst::FlowError::Error),
                Model::Loading(rx) => {
                    if self.unblock.load(Ordering::SeqCst) {
                        return Err(gst::FlowError::Flushing);
                    }
                    if !logged {
                        gst::debug!(CAT, imp = self, "frame waits for the model to load");
                        logged = true;
                    }
                    match rx.recv_timeout(LOAD_POLL) {
                        Ok(Some(session)) => {
                            *self.cancel.lock().unwrap() = Some(session.cancel_handle());
                            state.model = Model::Ready(Box::new(session));
                        }
                        Ok(None) => state.model = Model::Failed,
                        Err(mpsc::RecvTimeoutError::Disconnected) => {
                            // The loader ended without a result and without its error message
                            // (it posts one for every failed load): say so here.
                            gst::element_imp_error!(
                                self,
                                gst::LibraryError::Init,
                                ("The model loading thread ended without a model or an error")
                            );
                            state.model = Model::Failed;
                        }
                        Err(mpsc::RecvTimeoutError::Timeout) => {}
                    }
                }
            }
        }
        match &mut state.model {
            Model::Ready(session) => Ok(session),
            _ => unreachable!("checked above"),
        }
    }

    /// Applies changed properties at this frame; a rejected change is a warning and the
    /// previous values stay.
    fn apply_settings(&self, state: &mut State, settings: &Settings) {
        let requested = (settings.frame_settings(), settings.session_config());
        if state.requested.as_ref() == Some(&requested) {
            return;
        }
        let Model::Ready(session) = &mut state.model else {
            return;
        };
        match &requested.0 {
            Ok(frame_settings) if session.settings() != frame_settings => {
                gst::debug!(CAT, imp = self, "frame settings now {frame_settings:?}");
                if let Err(e) = session.set_settings(frame_settings.clone()) {
                    gst::element_imp_warning!(
                        self,
                        gst::LibraryError::Settings,
                        ("Ignoring the new generation settings, keeping the previous ones: {e:#}")
                    );
                }
            }
            Ok(_) => {}
            Err(e) => gst::element_imp_warning!(
                self,
                gst::LibraryError::Settings,
                ("Ignoring the new generation settings, keeping the previous ones: {e}")
            ),
        }
        gst::debug!(CAT, imp = self, "session config now {:?}", requested.1);
        if let Err(e) = session.set_config(requested.1.clone()) {
            gst::element_imp_warning!(
                self,
                gst::LibraryError::Settings,
                ("Ignoring the new session settings, keeping the previous ones: {e:#}")
            );
        }
        state.requested = Some(requested);
    }

    fn post_anchor(&self, reason: &str, index: u64, pts: Option<gst::ClockTime>) {
        gst::info!(CAT, imp = self, "frame {index} is a new anchor: {reason}");
        let s = gst::Structure::builder("sdcrossframe-anchor")
            .field("reason", reason)
            .field("frame", index)
            .field_if_some("timestamp", pts)
            .build();
        let _ = self.obj().post_message(gst::message::Element::builder(s).src(&*self.obj()).build());
    }

    /// Makes a frame waiting for the model or in denoising return (as flushing) soon.
    fn unblock(&self) {
        self.unblock.store(true, Ordering::SeqCst);
        if let Some(cancel) = self.cancel.lock().unwrap().as_ref() {
            cancel.cancel();
        }
    }
}

#[glib::object_subclass]
impl ObjectSubclass for SdCrossFrame {
    const NAME: &'static str = "GstSdCrossFrame";
    type Type = super::SdCrossFrame;
    type ParentType = gst_video::VideoFilter;
}

impl ObjectImpl for SdCrossFrame {
    fn properties() -> &'static [glib::ParamSpec] {
        static PROPERTIES: LazyLock<Vec<glib::ParamSpec>> = LazyLock::new(|| {
            let d = Settings::default();
            vec![
                glib::ParamSpecString::builder("model")
                    .nick("Model")
                    .blurb("Stable Diffusion 1.x model: a diffusers-format directory, a Hugging Face repo id (resolved through HF_HOME), or a single-file checkpoint (.safetensors in the original layout, as community models ship; its tokenizer comes from the Hugging Face cache: openai/clip-vit-large-patch14 or an SD1.5 pipeline's tokenizer/); read when the element starts")
                    .default_value(Some(DEFAULT_MODEL))
                    .mutable_ready()
                    .build(),
                glib::ParamSpecString::builder("controlnet")
                    .nick("ControlNet")
                    .blurb("Canny ControlNet: a diffusers-format directory, a Hugging Face repo id, or a single .safetensors file (e.g. control_v11p_sd15_canny.safetensors); read when the element starts")
                    .default_value(Some(DEFAULT_CONTROLNET))
                    .mutable_ready()
                    .build(),
                glib::ParamSpecString::builder("variant")
                    .nick("Weight variant")
                    .blurb("Weight file variant such as fp16 (diffusion_pytorch_model.fp16.safetensors); empty for the plain files")
                    .default_value(None)
                    .mutable_ready()
                    .build(),
                glib::ParamSpecString::builder("lora")
                    .nick("LoRA")
                    .blurb("LoRAs fused into the UNet (and the text encoder when a file has text-encoder layers) when the element starts: comma-separated path[:scale] entries (scale 1 when left out), each a .safetensors file in the kohya or diffusers/PEFT layout, a directory holding one, or a Hugging Face repo id such as latent-consistency/lcm-lora-sdv1-5; the text after the last ':' is the scale only when it is a number; empty for none")
                    .default_value(Some(""))
                    .mutable_ready()
                    .build(),
                glib::ParamSpecString::builder("vae")
                    .nick("VAE")
                    .blurb("A VAE replacing the model's: a diffusers-format directory or Hugging Face repo id whose config.json names AutoencoderTiny (e.g. madebyollin/taesd, the tiny TAESD: much faster encode and decode) or AutoencoderKL, or a single-file VAE (.safetensors, e.g. vae-ft-mse-840000-ema-pruned.safetensors); empty for the model's own; read when the element starts")
                    .default_value(None)
                    .mutable_ready()
                    .build(),
                glib::ParamSpecString::builder("tokenizer")
                    .nick("Tokenizer")
                    .blurb("The CLIP tokenizer for a single-file checkpoint `model`: a directory holding tokenizer.json or vocab.json + merges.txt, or a Hugging Face repo id; empty: openai/clip-vit-large-patch14 or an SD1.5 pipeline's tokenizer/ from the Hugging Face cache. Diffusers directories use their own tokenizer/; read when the element starts")
                    .default_value(None)
                    .mutable_ready()
                    .build(),
                glib::ParamSpecString::builder("model-instance-id")
                    .nick("Model instance id")
                    .blurb("Elements of one process with the same non-empty id share one loaded model (weights, text encoder, CUDA graphs) and must ask for the same model settings (model, controlnet, variant, lora, vae, device, dtype), else the element that starts second fails naming both; distinct ids load distinct copies; empty (the default): elements with the same model settings share one copy. Each element keeps its own prompts, cross-frame state, noise and settings; read when the element starts")
                    .default_value(Some(""))
                    .mutable_ready()
                    .build(),
                glib::ParamSpecString::builder("device")
                    .nick("Device")
                    .blurb("Compute device: cpu, or cuda:N when built with the cuda feature")
                    .default_value(Some(DEFAULT_DEVICE))
                    .mutable_ready()
                    .build(),
                glib::ParamSpecEnum::builder_with_default("dtype", d.dtype)
                    .nick("Dtype")
                    .blurb("Compute and weight dtype (f16/bf16 need a GPU)")
                    .mutable_ready()
                    .build(),
                glib::ParamSpecString::builder("prompt")
                    .nick("Prompt")
                    .blurb("Text prompt; takes effect at the next frame")
                    .default_value(Some(d.prompt.as_str()))
                    .mutable_playing()
                    .build(),
                glib::ParamSpecString::builder("negative-prompt")
                    .nick("Negative prompt")
                    .blurb("Negative text prompt (used when guidance-scale > 1); takes effect at the next frame")
                    .default_value(Some(d.negative_prompt.as_str()))
                    .mutable_playing()
                    .build(),
                glib::ParamSpecUInt::builder("steps")
                    .nick("Steps")
                    .blurb("Inference steps of the scheduler's schedule; a frame runs steps x strength of them (a change re-anchors)")
                    .minimum(1)
                    .maximum(MAX_STEPS as u32)
                    .default_value(d.steps)
                    .mutable_playing()
                    .build(),
                glib::ParamSpecDouble::builder("strength")
                    .nick("Strength")
                    .blurb("How much of each frame is re-generated (img2img strength); takes effect at the next frame (a change re-anchors)")
                    .minimum(0.0)
                    .maximum(1.0)
                    .default_value(d.strength)
                    .mutable_playing()
                    .build(),
                glib::ParamSpecDouble::builder("guidance-scale")
                    .nick("Guidance scale")
                    .blurb("Classifier-free guidance scale (1 or less disables guidance, whatever the guidance mode); takes effect at the next frame")
                    .minimum(0.0)
                    .maximum(50.0)
                    .default_value(d.guidance_scale)
                    .mutable_playing()
                    .build(),
                glib::ParamSpecDouble::builder("controlnet-scale")
                    .nick("ControlNet scale")
                    .blurb("ControlNet conditioning scale; takes effect at the next frame")
                    .minimum(0.0)
                    .maximum(5.0)
                    .default_value(d.controlnet_scale)
                    .mutable_playing()
                    .build(),
                glib::ParamSpecEnum::builder_with_default("scheduler", d.scheduler)
                    .nick("Scheduler")
                    .blurb("Denoising scheduler: auto (what the model's scheduler config names: LCMScheduler gives lcm, else ddim), ddim or lcm (few steps, e.g. with an LCM-LoRA); takes effect at the next frame (a change re-anchors)")
                    .mutable_playing()
                    .build(),
                glib::ParamSpecString::builder("timesteps")
                    .nick("Timesteps")
                    .blurb("Explicit timesteps for the lcm scheduler: ascending comma-separated indices into the 50-step LCM schedule (StreamDiffusion's t_index_list, e.g. 32,45); they replace steps and strength; empty: none. Takes effect at the next frame (a change re-anchors)")
                    .default_value(Some(""))
                    .mutable_playing()
                    .build(),
                glib::ParamSpecEnum::builder_with_default("guidance", d.guidance)
                    .nick("Guidance")
                    .blurb("How the negative prompt guides (with guidance-scale > 1): auto (full), none, full (CFG, 2 UNet evaluations per step), self or initialize (StreamDiffusion's residual CFG, 1 evaluation per step; lcm only); takes effect at the next frame")
                    .mutable_playing()
                    .build(),
                glib::ParamSpecUInt64::builder("seed")
                    .nick("Seed")
                    .blurb("Seed of the initial noise (the same on every machine)")
                    .default_value(d.seed)
                    .mutable_playing()
                    .build(),
                glib::ParamSpecEnum::builder_with_default("noise", d.noise)
                    .nick("Noise")
                    .blurb("Initial noise policy: fixed (coherent) or per-frame (the original)")
                    .mutable_playing()
                    .build(),
                glib::ParamSpecDouble::builder("canny-low")
                    .nick("Canny low threshold")
                    .blurb("Canny hysteresis low threshold of the control image (cv2.Canny's threshold1); must not exceed canny-high")
                    .minimum(0.0)
                    .maximum(MAX_THRESHOLD)
                    .default_value(d.canny_low)
                    .mutable_playing()
                    .build(),
                glib::ParamSpecDouble::builder("canny-high")
                    .nick("Canny high threshold")
                    .blurb("Canny hysteresis high threshold of the control image (cv2.Canny's threshold2)")
                    .minimum(0.0)
                    .maximum(MAX_THRESHOLD)
                    .default_value(d.canny_high)
                    .mutable_playing()
                    .build(),
                glib::ParamSpecBoolean::builder("canny-l2")
                    .nick("Canny L2 gradient")
                    .blurb("Use the L2 gradient magnitude for the control image's Canny edges instead of L1")
                    .default_value(d.canny_l2)
                    .mutable_playing()
                    .build(),
                glib::ParamSpecEnum::builder_with_default("attention", d.attention)
                    .nick("Cross-frame attention")
                    .blurb("Which frames' keys and values each frame's self-attention also sees")
                    .mutable_playing()
                    .build(),
                glib::ParamSpecEnum::builder_with_default("attention-scope", d.attention_scope)
                    .nick("Attention scope")
                    .blurb("Which UNet self-attention layers use cross-frame attention")
                    .mutable_playing()
                    .build(),
                glib::ParamSpecEnum::builder_with_default("cross-frame-store", d.cross_frame_store)
                    .nick("Cross-frame store")
                    .blurb("Where the anchor's and the previous frame's attention inputs are kept: device (GPU memory) or host (page-locked memory, copied in and out beside each step: less GPU memory per stream; changing it re-anchors)")
                    .mutable_playing()
                    .build(),
                glib::ParamSpecUInt::builder("anchor-interval")
                    .nick("Anchor interval")
                    .blurb("Make a new anchor frame every N frames (0: never; scene cuts, flushes and caps changes still re-anchor)")
                    .default_value(d.anchor_interval)
                    .mutable_playing()
                    .build(),
                glib::ParamSpecDouble::builder("scene-cut-threshold")
                    .nick("Scene cut threshold")
                    .blurb("Mean absolute luma change (0..1) between consecutive frames that counts as a scene cut and re-anchors (0: off)")
                    .minimum(0.0)
                    .maximum(1.0)
                    .default_value(d.scene_cut_threshold)
                    .mutable_playing()
                    .build(),
                glib::ParamSpecUInt::builder("width")
                    .nick("Processing width")
                    .blurb("Width frames are stylized at, rounded to a multiple of 8 (0: short side 512 keeping the aspect ratio, or from height)")
                    .maximum(MAX_SIZE)
                    .default_value(d.width)
                    .mutable_playing()
                    .build(),
                glib::ParamSpecUInt::builder("height")
                    .nick("Processing height")
                    .blurb("Height frames are stylized at, rounded to a multiple of 8 (0: short side 512 keeping the aspect ratio, or from width)")
                    .maximum(MAX_SIZE)
                    .default_value(d.height)
                    .mutable_playing()
                    .build(),
                glib::ParamSpecUInt::builder("latency")
                    .nick("Latency")
                    .blurb("Latency in milliseconds this element adds in live pipelines (set it to about one frame's processing time)")
                    .maximum(MAX_LATENCY_MS)
                    .default_value(d.latency_ms)
                    .mutable_playing()
                    .build(),
                glib::ParamSpecBoolean::builder("overlap")
                    .nick("Overlap CPU and GPU work")
                    .blurb("Keep one frame in flight so that reading, scaling and writing frames runs while the GPU diffuses the previous one: each frame goes out when the next one comes in (or at EOS), which adds one frame of latency; off: each frame is done before the next one is taken")
                    .default_value(d.overlap)
                    .mutable_ready()
                    .build(),
                glib::ParamSpecBoxed::builder::<gst::Structure>("stats")
                    .nick("Statistics")
                    .blurb("Frames since the element started: frames-in (buffers that reached it), frames-out, dropped (late, by QoS, before processing), skipped (sent with the last output by similarity skipping), in-flight (held: overlap, stream batch); cross-frame-bytes (the cross-frame store's size after the last frame) and cross-frame-device-bytes (the device memory it holds: all of it, or with cross-frame-store=host the current call's copies); shared-calls (denoising calls whose UNet call also held other elements' frames: batch-timeout); loads-in-flight (model loads running now: 0 or 1) and max-loads-in-flight (the most at once since the element was made)")
                    .read_only()
                    .build(),
                glib::ParamSpecBoolean::builder("stream-batch")
                    .nick("Stream batch")
                    .blurb("Denoise the frames in flight together, each at its own step (one UNet call per frame instead of one per step): a frame comes out steps - 1 frames after it went in, with the same result as one at a time; EOS drains the batch, a flush drops it. Read when the element starts")
                    .default_value(d.stream_batch)
                    .mutable_ready()
                    .build(),
                glib::ParamSpecDouble::builder("skip-similarity")
                    .nick("Skip similar frames")
                    .blurb("Skip a frame whose downscaled image has at least this cosine similarity to the last diffused frame's (e.g. 0.98), re-emitting the last output; frames between this value and identical are skipped with a probability drawn from the seed. 0: off")
                    .minimum(0.0)
                    .maximum(1.0)
                    .default_value(d.skip_similarity)
                    .mutable_playing()
                    .build(),
                glib::ParamSpecUInt::builder("max-skip")
                    .nick("Most frames skipped in a row")
                    .blurb("With skip-similarity on, at most this many frames in a row are skipped")
                    .minimum(0)
                    .maximum(100_000)
                    .default_value(d.max_skip)
                    .mutable_playing()
                    .build(),
                glib::ParamSpecInt::builder("batch-timeout")
                    .nick("Cross-stream batch timeout (ms)")
                    .blurb("Elements sharing one loaded model (see model-instance-id) run their denoising steps that are ready together and share a step plan (size, steps, strength, scheduler, guidance batch, controlnet-scale) as one UNet call; each waits at most this long for the others (e.g. 20). -1: auto, a quarter of the element's recent frame interval (5 to 500 ms: about 200 ms at the original settings with 4 streams, 25 ms at 4 LCM steps). 0 (the default): off, each element's steps run on their own. Each element's frames are those it gives alone")
                    .minimum(AUTO_BATCH_TIMEOUT)
                    .maximum(1000)
                    .default_value(d.batch_timeout_ms)
                    .mutable_playing()
                    .build(),
            ]
        });
        PROPERTIES.as_ref()
    }

    fn set_property(&self, _id: usize, value: &glib::Value, pspec: &glib::ParamSpec) {
        let name = pspec.name();
        let started = self.state.lock().unwrap().is_some();
        if started
            && matches!(
                name,
                "model"
                    | "controlnet"
                    | "variant"
                    | "lora"
                    | "vae"
                    | "model-instance-id"
                    | "device"
                    | "dtype"
                    | "overlap"
                    | "stream-batch"
                    | "tokenizer"
            )
        {
            gst::warning!(CAT, imp = self, "{name} changed while running: takes effect when the element restarts");
        }
        // GLib's range check lets NaN through (every comparison with it is false).
        if let Ok(number) = value.get::<f64>()
            && !number.is_finite()
        {
            gst::warning!(CAT, imp = self, "{name} must be a finite number, got {number}: keeping the previous value");
            return;
        }
        let mut latency_changed = false;
        {
            let mut s = self.settings.lock().unwrap();
            let string = || value.get::<Option<String>>().expect("type checked upstream").unwrap_or_default();
            match name {
                "model" => s.model = string(),
                "controlnet" => s.controlnet = string(),
                "variant" => s.variant = value.get().expect("type checked upstream"),
                "lora" => s.lora = string(),
                "vae" => s.vae = value.get().expect("type checked upstream"),
                "tokenizer" => s.tokenizer = value.get().expect("type checked upstream"),
                "model-instance-id" => s.model_instance_id = string(),
                "device" => s.device = string(),
                "dtype" => s.dtype = value.get().expect("type checked upstream"),
                "prompt" => s.prompt = string(),
                "negative-prompt" => s.negative_prompt = string(),
                "steps" => s.steps = value.get().expect("type checked upstream"),
                "strength" => s.strength = value.get().expect("type checked upstream"),
                "guidance-scale" => s.guidance_scale = value.get().expect("type checked upstream"),
                "controlnet-scale" => s.controlnet_scale = value.get().expect("type checked upstream"),
                "scheduler" => s.scheduler = value.get().expect("type checked upstream"),
                "timesteps" => s.timesteps = string(),
                "guidance" => s.guidance = value.get().expect("type checked upstream"),
                "seed" => s.seed = value.get().expect("type checked upstream"),
                "noise" => s.noise = value.get().expect("type checked upstream"),
                "canny-low" => s.canny_low = value.get().expect("type checked upstream"),
                "canny-high" => s.canny_high = value.get().expect("type checked upstream"),
                "canny-l2" => s.canny_l2 = value.get().expect("type checked upstream"),
                "attention" => s.attention = value.get().expect("type checked upstream"),
                "attention-scope" => s.attention_scope = value.get().expect("type checked upstream"),
                "cross-frame-store" => s.cross_frame_store = value.get().expect("type checked upstream"),
                "anchor-interval" => s.anchor_interval = value.get().expect("type checked upstream"),
                "scene-cut-threshold" => s.scene_cut_threshold = value.get().expect("type checked upstream"),
                "width" => s.width = value.get().expect("type checked upstream"),
                "height" => s.height = value.get().expect("type checked upstream"),
                "latency" => {
                    let ms = value.get().expect("type checked upstream");
                    latency_changed = ms != s.latency_ms;
                    s.latency_ms = ms;
                }
                "overlap" => s.overlap = value.get().expect("type checked upstream"),
                "stream-batch" => s.stream_batch = value.get().expect("type checked upstream"),
                "skip-similarity" => s.skip_similarity = value.get().expect("type checked upstream"),
                "max-skip" => s.max_skip = value.get().expect("type checked upstream"),
                "batch-timeout" => s.batch_timeout_ms = value.get().expect("type checked upstream"),
                other => unimplemented!("property {other}"),
            }
        }
        gst::debug!(CAT, imp = self, "{name} set to {value:?}");
        if latency_changed && started {
            let _ = self.obj().post_message(gst::message::Latency::builder().src(&*self.obj()).build());
        }
    }

    fn property(&self, _id: usize, pspec: &glib::ParamSpec) -> glib::Value {
        let s = self.settings.lock().unwrap();
        match pspec.name() {
            "model" => s.model.to_value(),
            "controlnet" => s.controlnet.to_value(),
            "variant" => s.variant.to_value(),
            "lora" => s.lora.to_value(),
            "vae" => s.vae.to_value(),
            "tokenizer" => s.tokenizer.to_value(),
            "model-instance-id" => s.model_instance_id.to_value(),
            "device" => s.device.to_value(),
            "dtype" => s.dtype.to_value(),
            "prompt" => s.prompt.to_value(),
            "negative-prompt" => s.negative_prompt.to_value(),
            "steps" => s.steps.to_value(),
            "strength" => s.strength.to_value(),
            "guidance-scale" => s.guidance_scale.to_value(),
            "controlnet-scale" => s.controlnet_scale.to_value(),
            "scheduler" => s.scheduler.to_value(),
            "timesteps" => s.timesteps.to_value(),
            "guidance" => s.guidance.to_value(),
            "seed" => s.seed.to_value(),
            "noise" => s.noise.to_value(),
            "canny-low" => s.canny_low.to_value(),
            "canny-high" => s.canny_high.to_value(),
            "canny-l2" => s.canny_l2.to_value(),
            "attention" => s.attention.to_value(),
            "attention-scope" => s.attention_scope.to_value(),
            "cross-frame-store" => s.cross_frame_store.to_value(),
            "anchor-interval" => s.anchor_interval.to_value(),
            "scene-cut-threshold" => s.scene_cut_threshold.to_value(),
            "width" => s.width.to_value(),
            "height" => s.height.to_value(),
            "latency" => s.latency_ms.to_value(),
            "overlap" => s.overlap.to_value(),
            "stream-batch" => s.stream_batch.to_value(),
            "stats" => {
                let mut stats = self.stats.structure();
                stats.set("loads-in-flight", self.loads.running.load(Ordering::SeqCst));
                stats.set("max-loads-in-flight", self.loads.most.load(Ordering::SeqCst));
                stats.to_value()
            }
            "skip-similarity" => s.skip_similarity.to_value(),
            "max-skip" => s.max_skip.to_value(),
            "batch-timeout" => s.batch_timeout_ms.to_value(),
            other => unimplemented!("property {other}"),
        }
    }

    fn constructed(&self) {
        self.parent_constructed();
        // Late frames are dropped before they are processed (BaseTransform's QoS).
        self.obj().set_qos(true);
    }
}

impl GstObjectImpl for SdCrossFrame {}

impl ElementImpl for SdCrossFrame {
    fn metadata() -> Option<&'static gst::subclass::ElementMetadata> {
        static METADATA: LazyLock<gst::subclass::ElementMetadata> = LazyLock::new(|| {
            gst::subclass::ElementMetadata::new(
                "Stable Diffusion cross-frame video restyling",
                "Filter/Effect/Video",
                "Restyles video with Stable Diffusion 1.5 + Canny ControlNet img2img, with cross-frame attention for coherent frames",
                "sdcrossframe developers",
            )
        });
        Some(&*METADATA)
    }

    fn pad_templates() -> &'static [gst::PadTemplate] {
        static PAD_TEMPLATES: LazyLock<Vec<gst::PadTemplate>> = LazyLock::new(|| {
            let caps = gst_video::VideoCapsBuilder::new().format_list(video::RGB_FORMATS.iter().copied()).build();
            vec![
                gst::PadTemplate::new("src", gst::PadDirection::Src, gst::PadPresence::Always, &caps).unwrap(),
                gst::PadTemplate::new("sink", gst::PadDirection::Sink, gst::PadPresence::Always, &caps).unwrap(),
            ]
        });
        PAD_TEMPLATES.as_ref()
    }

    fn change_state(&self, transition: gst::StateChange) -> Result<gst::StateChangeSuccess, gst::StateChangeError> {
        if transition == gst::StateChange::PausedToReady {
            // The streaming thread may be waiting for the model or denoising: let it go.
            self.unblock();
        }
        self.parent_change_state(transition)
    }
}

impl BaseTransformImpl for SdCrossFrame {
    const MODE: gst_base::subclass::BaseTransformMode = gst_base::subclass::BaseTransformMode::AlwaysInPlace;
    const PASSTHROUGH_ON_SAME_CAPS: bool = false;
    const TRANSFORM_IP_ON_PASSTHROUGH: bool = false;

    fn start(&self) -> Result<(), gst::ErrorMessage> {
        self.unblock.store(false, Ordering::SeqCst);
        self.stream_delay.store(0, Ordering::SeqCst);
        self.stats.reset();
        let settings = self.settings.lock().unwrap().clone();
        let request = self.check_settings(&settings)?;
        let rx = self
            .spawn_loader(request)
            .map_err(|e| gst::error_msg!(gst::CoreError::Thread, ["Cannot start the model loading thread: {e}"]))?;
        *self.state.lock().unwrap() = Some(State {
            model: Model::Loading(rx),
            overlap: settings.overlap || settings.stream_batch,
            held: Default::default(),
            waiting: Default::default(),
            discont: false,
            requested: None,
            info: None,
            timings: FrameTimings::default(),
        });
        Ok(())
    }

    fn stop(&self) -> Result<(), gst::ErrorMessage> {
        // A frame in flight is dropped here (its device work, already queued, cannot be called
        // back). A load still in progress cannot be interrupted (candle reads whole tensors):
        // its result is marked stale and its thread joined, so no load outlives the element's
        // run and the next start never runs a second one beside it.
        let _engine_log = self.engine_log();
        let state = self.state.lock().unwrap().take();
        self.join_loader();
        if let Some(state) = state {
            let in_flight = state.held.len() + state.waiting.len();
            if in_flight > 0 {
                gst::debug!(CAT, imp = self, "stopping: dropping {in_flight} frames in flight");
            }
            if let Some(summary) = state.timings.summary() {
                gst::info!(CAT, imp = self, "{summary}");
            }
            // How the (possibly shared) model's steps ran: which call compositions were
            // captured, and what their graphs hold (scripts/gst-gpu.sh prints this line).
            if let Model::Ready(session) = &state.model {
                gst::info!(CAT, imp = self, "{}", session.graph_report());
            }
        }
        *self.cancel.lock().unwrap() = None;
        *self.frame_duration.lock().unwrap() = None;
        Ok(())
    }

    fn sink_event(&self, event: gst::Event) -> bool {
        let _engine_log = self.engine_log();
        match event.view() {
            gst::EventView::FlushStart(_) => self.unblock(),
            gst::EventView::FlushStop(_) => {
                self.unblock.store(false, Ordering::SeqCst);
                // Serialized: the streaming thread is not in a frame.
                if let Some(state) = self.state.lock().unwrap().as_mut() {
                    let in_flight = state.held.len() + state.waiting.len();
                    if in_flight > 0 {
                        gst::debug!(CAT, imp = self, "flush: dropping {in_flight} frames in flight");
                    }
                    state.held.clear();
                    state.waiting.clear();
                    state.discont = false;
                    if let Model::Ready(session) = &mut state.model {
                        gst::debug!(CAT, imp = self, "flush: the next frame is a new anchor");
                        session.reset_with_reason("flush");
                    }
                }
            }
            // Anything serialized (EOS, caps, segment, gap, ...) comes after the held frame.
            _ if event.is_serialized() && self.overlapping() => {
                if let Err(flow) = self.drain() {
                    gst::debug!(CAT, imp = self, "draining before {:?}: {flow:?}", event.type_());
                }
            }
            _ => {}
        }
        self.parent_sink_event(event)
    }

    fn query(&self, direction: gst::PadDirection, query: &mut gst::QueryRef) -> bool {
        if direction == gst::PadDirection::Sink
            && matches!(query.view(), gst::QueryView::Drain(_))
            && self.overlapping()
            && let Err(flow) = self.drain()
        {
            gst::debug!(CAT, imp = self, "draining for a drain query: {flow:?}");
        }
        if direction != gst::PadDirection::Src || !matches!(query.view(), gst::QueryView::Latency(_)) {
            return BaseTransformImplExt::parent_query(self, direction, query);
        }
        if !BaseTransformImplExt::parent_query(self, direction, query) {
            return false;
        }
        if let gst::QueryViewMut::Latency(q) = query.view_mut() {
            let (live, min, max) = q.result();
            if live {
                let ours = self.added_latency();
                gst::debug!(CAT, imp = self, "upstream latency {min} / {max:?}, adding {ours}");
                q.set(live, min + ours, max.map(|max| max + ours));
            }
        }
        true
    }

    /// With overlap on, takes the buffer from BaseTransform (after its QoS check) and pushes
    /// the previous frame's buffer itself; otherwise BaseTransform calls `transform_frame_ip`.
    /// Pulled from downstream (pull mode), the element cannot push: frames go synchronously.
    fn generate_output(&self) -> Result<gst_base::subclass::base_transform::GenerateOutputSuccess, gst::FlowError> {
        use gst_base::subclass::base_transform::GenerateOutputSuccess;
        let _engine_log = self.engine_log();
        if !self.overlapping() || self.obj().src_pad().mode() != gst::PadMode::Push {
            return self.parent_generate_output();
        }
        let Some(buffer) = self.take_queued_buffer() else {
            return Ok(GenerateOutputSuccess::NoOutput);
        };
        let buffers = self.process_overlapped(buffer).inspect_err(|flow| self.log_frame_failure(*flow))?;
        for previous in buffers {
            self.stats.frames_out.fetch_add(1, Ordering::Relaxed);
            self.push_downstream(previous)?;
        }
        Ok(GenerateOutputSuccess::NoOutput)
    }

    fn submit_input_buffer(&self, is_discont: bool, inbuf: gst::Buffer) -> Result<gst::FlowSuccess, gst::FlowError> {
        self.stats.frames_in.fetch_add(1, Ordering::Relaxed);
        let result = self.parent_submit_input_buffer(is_discont, inbuf);
        if result == Ok(gst_base::BASE_TRANSFORM_FLOW_DROPPED) {
            self.stats.dropped.fetch_add(1, Ordering::Relaxed);
            if let Some(state) = self.state.lock().unwrap().as_mut()
                && state.overlap
            {
                // Dropped by QoS: the next frame out follows a gap.
                state.discont = true;
            }
        }
        result
    }
}

impl VideoFilterImpl for SdCrossFrame {
    fn set_info(
        &self,
        _incaps: &gst::Caps,
        in_info: &gst_video::VideoInfo,
        _outcaps: &gst::Caps,
        _out_info: &gst_video::VideoInfo,
    ) -> Result<(), gst::LoggableError> {
        let fps = in_info.fps();
        let duration = (fps.numer() > 0 && fps.denom() > 0)
            .then(|| gst::ClockTime::SECOND.mul_div_floor(fps.denom() as u64, fps.numer() as u64))
            .flatten();
        let previous = std::mem::replace(&mut *self.frame_duration.lock().unwrap(), duration);
        if previous.is_some() && previous != duration && self.settings.lock().unwrap().overlap {
            // The frame held back is now longer or shorter.
            let _ = self.obj().post_message(gst::message::Latency::builder().src(&*self.obj()).build());
        }
        let mut state = self.state.lock().unwrap();
        if let Some(state) = state.as_mut() {
            if state.info.as_ref().is_some_and(|info| info != in_info)
                && let Model::Ready(session) = &mut state.model
            {
                gst::debug!(CAT, imp = self, "caps changed: the next frame is a new anchor");
                session.reset_with_reason("caps changed");
            }
            state.info = Some(in_info.clone());
        }
        Ok(())
    }

    /// The synchronous path (overlap off): each frame is prepared, diffused, downloaded and
    /// written before the buffer goes on.
    fn transform_frame_ip(
        &self,
        frame: &mut gst_video::VideoFrameRef<&mut gst::BufferRef>,
    ) -> Result<gst::FlowSuccess, gst::FlowError> {
        let _engine_log = self.engine_log();
        self.diffuse_in_place(frame).inspect_err(|flow| self.log_frame_failure(*flow))
    }
}

impl SdCrossFrame {
    /// One frame, synchronously: prepared, diffused, downloaded and written into its buffer.
    fn diffuse_in_place(
        &self,
        frame: &mut gst_video::VideoFrameRef<&mut gst::BufferRef>,
    ) -> Result<gst::FlowSuccess, gst::FlowError> {
        let settings = self.settings.lock().unwrap().clone();
        let mut state = self.state.lock().unwrap();
        let state = state.as_mut().ok_or(gst::FlowError::Flushing)?;
        let (prepared, read_time) = self.read_and_prepare(state, &settings, frame)?;
        let Model::Ready(session) = &mut state.model else {
            unreachable!("the model is ready");
        };
        let in_flight = self.launch(session, prepared, frame.buffer().pts())?;
        let size = (frame.width() as usize, frame.height() as usize);
        let finished = self.finish(session, &mut state.timings, in_flight, size)?;
        let write_started = Instant::now();
        self.write_rgb(frame, &finished.rgb)?;
        let write_time = write_started.elapsed() + finished.scale_time;
        state.timings.write += write_time;
        self.trace_frame(&finished, read_time, write_time);
        // BaseTransform pushes the buffer when this returns.
        self.stats.frames_out.fetch_add(1, Ordering::Relaxed);
        Ok(gst::FlowSuccess::Ok)
    }

    /// Waits for the model, applies changed properties, reads the frame and prepares it
    /// (the CPU work before the diffusion); also returns the time the reading took. Errors are
    /// on the bus.
    fn read_and_prepare<T>(
        &self,
        state: &mut State,
        settings: &Settings,
        frame: &gst_video::VideoFrameRef<T>,
    ) -> Result<(PreparedFrame, Duration), gst::FlowError> {
        let overlapped = state.held.iter().any(|held| held.frame.is_asynchronous());
        self.wait_for_model(state)?;
        self.apply_settings(state, settings);
        let Model::Ready(session) = &mut state.model else {
            unreachable!("the model is ready");
        };
        let (width, height) = (frame.width() as usize, frame.height() as usize);
        let layout = PixelLayout::of(frame.format()).ok_or(gst::FlowError::NotNegotiated)?;
        let stride = frame.plane_stride()[0] as usize;
        let stylizer = session.stylizer();
        let size = session.processing_size(width, height).and_then(|size| {
            // A size beyond the device's kernels or memory fails here, before any work is queued.
            sdcrossframe::gpu_memory::check_frame(stylizer.img2img(), stylizer.device(), size).map(|()| size)
        });
        let size = match size {
            Ok(size) => size,
            Err(e) => {
                gst::element_imp_error!(
                    self,
                    gst::StreamError::Format,
                    ("No processing size for a {width}x{height} frame: {e:#}")
                );
                return Err(gst::FlowError::Error);
            }
        };

        let read_started = Instant::now();
        let input = frame
            .plane_data(0)
            .map_err(anyhow::Error::from)
            .and_then(|data| video::to_rgb_scaled(data, width, height, stride, layout, size));
        let input = match input {
            Ok(input) => input,
            Err(e) => {
                gst::element_imp_error!(
                    self,
                    gst::StreamError::Format,
                    ("Cannot read a {width}x{height} frame: {e:#}")
                );
                return Err(gst::FlowError::Error);
            }
        };
        let read_time = read_started.elapsed();
        let prepare_started = Instant::now();
        let prepared = match session.prepare_at(&input, None, size) {
            Ok(prepared) => prepared,
            Err(e) => {
                let (img2img, device) = (session.stylizer().img2img(), session.stylizer().device());
                let e = sdcrossframe::gpu_memory::explain(e, img2img, device, size);
                gst::element_imp_error!(
                    self,
                    gst::StreamError::Failed,
                    ("Preparing a {width}x{height} frame for {}x{} failed: {e:#}", size.0, size.1)
                );
                return Err(gst::FlowError::Error);
            }
        };
        // The engine waits for the device before uploading (the previous frame): that is
        // waiting, not preparing.
        let prepare_time = prepare_started.elapsed().saturating_sub(prepared.device_wait());
        let timings = &mut state.timings;
        timings.read += read_time;
        timings.prepare += prepare_time;
        timings.wait += prepared.device_wait();
        if overlapped {
            timings.overlapped += read_time + prepare_time;
        }
        Ok((prepared, read_time))
    }

    /// Launches the diffusion of a prepared frame (queued on a GPU, computed on the CPU) and
    /// posts the anchor message when it re-anchors.
    fn launch(
        &self,
        session: &mut VideoSession,
        prepared: PreparedFrame,
        pts: Option<gst::ClockTime>,
    ) -> Result<InFlightFrame, gst::FlowError> {
        let mut out = self.submit(session, prepared, pts)?;
        match (out.pop(), out.is_empty()) {
            (Some(frame), true) => Ok(frame),
            _ => {
                gst::element_imp_error!(
                    self,
                    gst::StreamError::Failed,
                    ("The engine did not return exactly one frame for one frame in")
                );
                Err(gst::FlowError::Error)
            }
        }
    }

    /// Submits a prepared frame to the engine; returns the frames that came out (the frame
    /// itself, or with stream batch the oldest in flight once the batch is full) and posts
    /// the anchor message for a frame that re-anchors.
    fn submit(
        &self,
        session: &mut VideoSession,
        prepared: PreparedFrame,
        pts: Option<gst::ClockTime>,
    ) -> Result<Vec<InFlightFrame>, gst::FlowError> {
        let (width, height) = prepared.size();
        let out = match session.submit(prepared) {
            Ok(out) => out,
            Err(e) if e.chain().any(|c| c.is::<Cancelled>()) => {
                gst::debug!(CAT, imp = self, "frame cancelled (flush or state change)");
                return Err(gst::FlowError::Flushing);
            }
            Err(e) => {
                let (img2img, device) = (session.stylizer().img2img(), session.stylizer().device());
                let e = sdcrossframe::gpu_memory::explain(e, img2img, device, (width, height));
                gst::element_imp_error!(
                    self,
                    gst::StreamError::Failed,
                    ("Stylizing a frame at {width}x{height} failed: {e:#}")
                );
                return Err(gst::FlowError::Error);
            }
        };
        self.stats.store_bytes.store(session.attention().stored_bytes() as u64, Ordering::Relaxed);
        self.stats.store_device_bytes.store(session.attention().held_bytes() as u64, Ordering::Relaxed);
        self.stats.shared_calls.store(session.shared_calls(), Ordering::Relaxed);
        if let Some(notice) = session.take_notice() {
            gst::element_imp_warning!(self, gst::LibraryError::Settings, ("{notice}"));
        }
        if !session.config().stream_batch {
            for frame in out.iter().filter(|f| f.anchor()) {
                self.post_anchor(frame.anchor_reason().unwrap_or("anchor"), frame.index(), pts);
            }
        }
        Ok(out)
    }

    /// Downloads a launched frame at the buffer's size (waits for the device; scales on the
    /// device when the model is there) and counts its diffusion time.
    fn finish(
        &self,
        session: &mut VideoSession,
        timings: &mut FrameTimings,
        in_flight: InFlightFrame,
        (width, height): (usize, usize),
    ) -> Result<FinishedFrame, gst::FlowError> {
        let index = in_flight.index();
        let finished = match session.finish_at(in_flight, width, height) {
            Ok(finished) => finished,
            Err(e) => {
                gst::element_imp_error!(self, gst::StreamError::Failed, ("Stylizing frame {index} failed: {e:#}"));
                return Err(gst::FlowError::Error);
            }
        };
        timings.frames += 1;
        if finished.stylized.skipped {
            timings.skipped += 1;
            self.stats.skipped.fetch_add(1, Ordering::Relaxed);
        }
        timings.diffuse += finished.stylized.diffuse_time;
        timings.wait += finished.wait_time;
        Ok(finished)
    }

    /// One trace line per frame, its stages as `name duration` pairs after "frame at WxH:"
    /// (scripts/gst-gpu-report.py reads them), then the frame's index and download time.
    fn trace_frame(&self, finished: &FinishedFrame, read_time: Duration, write_time: Duration) {
        let stylized = &finished.stylized;
        gst::trace!(
            CAT,
            imp = self,
            "frame at {}x{}: read {read_time:?}, prepare {:?}, diffuse {:?}, write {write_time:?}",
            stylized.image.dim(3).unwrap_or(0),
            stylized.image.dim(2).unwrap_or(0),
            stylized.prepare_time,
            stylized.diffuse_time
        );
        gst::trace!(
            CAT,
            imp = self,
            "frame {} downloaded in {:?}{}",
            stylized.index,
            finished.wait_time,
            sdcrossframe::gpu_memory::summary(stylized.image.device()).map(|m| format!("; {m}")).unwrap_or_default()
        );
    }

    /// Writes the stylized frame (already at the buffer's size) in the buffer's layout, alpha
    /// untouched.
    fn write_rgb(
        &self,
        frame: &mut gst_video::VideoFrameRef<&mut gst::BufferRef>,
        rgb: &RgbFrame,
    ) -> Result<(), gst::FlowError> {
        let (width, height) = (frame.width() as usize, frame.height() as usize);
        let layout = PixelLayout::of(frame.format()).ok_or(gst::FlowError::NotNegotiated)?;
        let stride = frame.plane_stride()[0] as usize;
        if (rgb.width, rgb.height) != (width, height) {
            gst::element_imp_error!(
                self,
                gst::StreamError::Failed,
                ("The stylized frame is {}x{}, the buffer {width}x{height}", rgb.width, rgb.height)
            );
            return Err(gst::FlowError::Error);
        }
        let written = frame
            .plane_data_mut(0)
            .map_err(anyhow::Error::from)
            .and_then(|data| video::write_rgb(rgb, data, stride, layout));
        if let Err(e) = written {
            gst::element_imp_error!(
                self,
                gst::StreamError::Failed,
                ("Cannot write the stylized {width}x{height} frame: {e:#}")
            );
            return Err(gst::FlowError::Error);
        }
        Ok(())
    }

    /// One input buffer with overlap on: prepares it while the held frames still diffuse,
    /// downloads them, submits this one (queued on the GPU), and writes the held frames into
    /// their buffers while it diffuses. Returns the held frames' buffers, to push. With stream
    /// batch the frame submitted comes out later, paired with its buffer then.
    fn process_overlapped(&self, buffer: gst::Buffer) -> Result<Vec<gst::Buffer>, gst::FlowError> {
        let settings = self.settings.lock().unwrap().clone();
        let mut state = self.state.lock().unwrap();
        let state = state.as_mut().ok_or(gst::FlowError::Flushing)?;
        let info = state.info.clone().ok_or(gst::FlowError::NotNegotiated)?;
        let prepared = {
            let frame = gst_video::VideoFrameRef::from_buffer_ref_readable(buffer.as_ref(), &info).map_err(|e| {
                gst::element_imp_error!(self, gst::StreamError::Format, ("Cannot map a frame for reading: {e}"));
                gst::FlowError::Error
            })?;
            self.read_and_prepare(state, &settings, &frame)?
        };
        let (prepared, read_time) = prepared;
        let Model::Ready(session) = &mut state.model else {
            unreachable!("the model is ready");
        };
        // The held frames are finished before this one is launched, or after it (VAE stream:
        // see the module docs).
        let launch_first = session.launches_before_finishing();
        let earlier: Vec<Held> = state.held.drain(..).collect();
        let mut finished = Vec::with_capacity(earlier.len());
        let mut earlier = earlier.into_iter();
        if !launch_first {
            for Held { buffer, info, frame, discont, read_time } in earlier.by_ref() {
                let size = (info.width() as usize, info.height() as usize);
                let frame = self.finish(session, &mut state.timings, frame, size)?;
                finished.push(Finished { buffer, info, frame, discont, read_time });
            }
        }
        let pts = buffer.pts();
        let discont = std::mem::take(&mut state.discont);
        state.waiting.push_back(Waiting { buffer, info, discont, read_time });
        let out = self.submit(session, prepared, pts)?;
        let asynchronous = out.iter().any(InFlightFrame::is_asynchronous);
        self.pair_with_buffers(state, out)?;
        self.update_stream_delay(state);
        for Held { buffer, info, frame, discont, read_time } in earlier {
            let Model::Ready(session) = &mut state.model else { unreachable!("the model is ready") };
            let size = (info.width() as usize, info.height() as usize);
            let frame = self.finish(session, &mut state.timings, frame, size)?;
            finished.push(Finished { buffer, info, frame, discont, read_time });
        }
        if finished.is_empty() {
            gst::trace!(
                CAT,
                imp = self,
                "{} frames in flight, nothing to push yet",
                state.waiting.len() + state.held.len()
            );
        }
        let mut buffers = Vec::with_capacity(finished.len());
        for finished in finished {
            let (buffer, write_time) = self.write_finished(&mut state.timings, finished)?;
            if asynchronous {
                state.timings.overlapped += write_time;
            }
            buffers.push(buffer);
        }
        Ok(buffers)
    }

    /// Frames that came out of the engine take the oldest waiting buffers, in order.
    fn pair_with_buffers(&self, state: &mut State, frames: Vec<InFlightFrame>) -> Result<(), gst::FlowError> {
        for frame in frames {
            let Some(waiting) = state.waiting.pop_front() else {
                gst::element_imp_error!(
                    self,
                    gst::StreamError::Failed,
                    ("Frame {} came out of the engine with no buffer waiting for it", frame.index())
                );
                return Err(gst::FlowError::Error);
            };
            let stream_batch = matches!(&state.model, Model::Ready(session) if session.config().stream_batch);
            if stream_batch && frame.anchor() {
                // Posted as the frame comes out of the batch, with its own buffer's timestamp.
                self.post_anchor(frame.anchor_reason().unwrap_or("anchor"), frame.index(), waiting.buffer.pts());
            }
            state.held.push_back(waiting.with(frame));
        }
        Ok(())
    }

    /// Keeps the number of frames a frame comes out after (stream batch) where the latency
    /// query reads it, and tells the pipeline when it changed.
    fn update_stream_delay(&self, state: &State) {
        let Model::Ready(session) = &state.model else { return };
        let delay = session.output_delay().unwrap_or(0) as u64;
        if self.stream_delay.swap(delay, Ordering::SeqCst) != delay {
            gst::debug!(CAT, imp = self, "frames now come out {delay} frames after they went in");
            let _ = self.obj().post_message(gst::message::Latency::builder().src(&*self.obj()).build());
        }
    }

    /// Writes a downloaded frame into its buffer (made writable: a copy with the same
    /// timestamps, flags and metas when upstream still holds it); also returns the time it took.
    fn write_finished(
        &self,
        timings: &mut FrameTimings,
        finished: Finished,
    ) -> Result<(gst::Buffer, Duration), gst::FlowError> {
        let write_started = Instant::now();
        let Finished { mut buffer, info, frame: finished, discont, read_time } = finished;
        {
            let buffer = buffer.make_mut();
            if discont {
                buffer.set_flags(gst::BufferFlags::DISCONT);
            }
            let mut frame = gst_video::VideoFrameRef::from_buffer_ref_writable(buffer, &info).map_err(|e| {
                gst::element_imp_error!(self, gst::StreamError::Format, ("Cannot map a frame for writing: {e}"));
                gst::FlowError::Error
            })?;
            self.write_rgb(&mut frame, &finished.rgb)?;
        }
        // CPU scaling of the result (when the device did not scale it) is part of writing.
        let write_time = write_started.elapsed() + finished.scale_time;
        timings.write += write_time;
        self.trace_frame(&finished, read_time, write_time);
        Ok((buffer, write_time))
    }

    /// Pushes the held frames and drains the engine's stream batch (overlap or stream batch
    /// on): before a serialized event, on a DRAIN query.
    fn drain(&self) -> Result<gst::FlowSuccess, gst::FlowError> {
        let buffers = {
            let mut state = self.state.lock().unwrap();
            let Some(state) = state.as_mut() else {
                return Ok(gst::FlowSuccess::Ok);
            };
            let Model::Ready(session) = &mut state.model else {
                return Ok(gst::FlowSuccess::Ok);
            };
            if !state.waiting.is_empty() {
                gst::debug!(CAT, imp = self, "draining {} frames in the stream batch", state.waiting.len());
                let out = match session.drain() {
                    Ok(out) => out,
                    Err(e) => {
                        gst::element_imp_error!(
                            self,
                            gst::StreamError::Failed,
                            ("Draining the stream batch failed: {e:#}")
                        );
                        return Err(gst::FlowError::Error);
                    }
                };
                self.pair_with_buffers(state, out)?;
            }
            let mut buffers = Vec::with_capacity(state.held.len());
            while let Some(Held { buffer, info, frame, discont, read_time }) = state.held.pop_front() {
                gst::debug!(CAT, imp = self, "draining frame {}", frame.index());
                let Model::Ready(session) = &mut state.model else { unreachable!("checked above") };
                let size = (info.width() as usize, info.height() as usize);
                let frame = self.finish(session, &mut state.timings, frame, size)?;
                let finished = Finished { buffer, info, frame, discont, read_time };
                buffers.push(self.write_finished(&mut state.timings, finished)?.0);
            }
            buffers
        };
        for buffer in buffers {
            self.stats.frames_out.fetch_add(1, Ordering::Relaxed);
            self.push_downstream(buffer)?;
        }
        Ok(gst::FlowSuccess::Ok)
    }

    /// Pushes a finished buffer; a refusal other than flushing or EOS is logged here, since
    /// an element downstream that returns an error without posting one (a queue before EOS
    /// passes its downstream's on) would otherwise leave it unexplained.
    fn push_downstream(&self, buffer: gst::Buffer) -> Result<gst::FlowSuccess, gst::FlowError> {
        let pts = buffer.pts();
        self.obj().src_pad().push(buffer).inspect_err(|flow| match flow {
            gst::FlowError::Flushing | gst::FlowError::Eos => {
                gst::debug!(CAT, imp = self, "downstream took no buffer at {pts:?}: {flow:?}")
            }
            _ => gst::warning!(CAT, imp = self, "downstream refused the buffer at {pts:?}: {flow:?}"),
        })
    }

    /// Logs a frame's failure of its own (its error message is on the bus already; this
    /// puts it in the element's log next to its frames).
    fn log_frame_failure(&self, flow: gst::FlowError) {
        if !matches!(flow, gst::FlowError::Flushing | gst::FlowError::Eos) {
            gst::error!(CAT, imp = self, "frame failed: {flow:?}");
        }
    }

    /// What the element adds to a live pipeline's latency: the `latency` property, and with
    /// overlap on one frame more (a frame goes out when the next one comes in): one frame
    /// duration at the negotiated framerate, or the `latency` property again while the
    /// framerate is unknown or variable.
    /// With stream batch, `steps - 1` frames more (the frames in the batch ahead of a frame).
    fn added_latency(&self) -> gst::ClockTime {
        let (latency, overlap, stream_batch) = {
            let settings = self.settings.lock().unwrap();
            (settings.latency(), settings.overlap, settings.stream_batch)
        };
        if !overlap && !stream_batch {
            return latency;
        }
        let frame = self.frame_duration.lock().unwrap().unwrap_or(latency);
        let stream_frames = if stream_batch { self.stream_delay.load(Ordering::SeqCst) } else { 0 };
        latency + frame * (1 + stream_frames)
    }

    fn overlapping(&self) -> bool {
        self.state.lock().unwrap().as_ref().is_some_and(|state| state.overlap)
    }
}

/// `f`'s result, or a panic in it as an error: "WHAT panicked: " and the panic's text.
fn catching_panics<T>(what: &str, f: impl FnOnce() -> anyhow::Result<T>) -> anyhow::Result<T> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|panic| {
        let text = panic
            .downcast_ref::<&str>()
            .copied()
            .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
            .unwrap_or("no message");
        Err(anyhow::anyhow!("{what} panicked: {text}"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// GLib's range check refuses NaN before `set_property` (tests/sdcrossframe.rs); called
    /// directly, `set_property` refuses it too and keeps the previous value.
    #[test]
    fn set_property_keeps_the_previous_value_for_nan_and_infinities() {
        gst::init().unwrap();
        let element = glib::Object::new::<super::super::SdCrossFrame>();
        for name in ["strength", "guidance-scale", "controlnet-scale", "canny-low", "scene-cut-threshold"] {
            let pspec = element.find_property(name).unwrap();
            let before = element.property::<f64>(name);
            for bad in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
                element.imp().set_property(0, &bad.to_value(), &pspec);
                assert_eq!(element.property::<f64>(name), before, "{name} took {bad}");
            }
        }
    }

    /// A panic while loading is the load's error, with the panic's text (a literal or a
    /// formatted message); a load that returns keeps its result.
    #[test]
    fn a_panic_in_the_load_is_an_error_with_its_text() {
        let literal = catching_panics::<()>("the load", || panic!("cudarc unwrap")).unwrap_err();
        assert_eq!(literal.to_string(), "the load panicked: cudarc unwrap");
        let formatted = catching_panics::<()>("the load", || panic!("tensor {} missing", 7)).unwrap_err();
        assert_eq!(formatted.to_string(), "the load panicked: tensor 7 missing");
        assert_eq!(catching_panics("the load", || Ok(3)).unwrap(), 3);
        let failed = catching_panics::<()>("the load", || Err(anyhow::anyhow!("no such file"))).unwrap_err();
        assert_eq!(failed.to_string(), "no such file");
    }

    #[test]
    fn defaults_match_the_engine() {
        let d = Settings::default();
        assert_eq!(d.frame_settings().unwrap(), FrameSettings::default());
        assert_eq!(d.session_config(), SessionConfig::default());
    }
}
