//! Cross-stream batching: the streams (sessions, elements) that share one loaded model
//! ([`super::registry`]) meet here before each denoising call, and the calls that are ready at
//! the same time and share a step plan (size, timesteps, guidance batch, ControlNet scale) run
//! as one UNet + ControlNet call ([`Img2Img::predict_streams`]), each stream's rows with their
//! own timesteps, prompt embeddings, control image and cross-frame keys and values
//! ([`StreamsAttention`]). Calls with other plans run on their own in the same round, and a
//! plan's calls that would hold more than [`DEFAULT_MAX_CALL_PIXELS`] (8 rows at 512x512, see
//! [`StreamBatcher::max_call_pixels`]) run as several calls of whole streams.
//!
//! The first stream to arrive leads a round. It waits for partners until every active member
//! has arrived or its batch timeout has passed, then has the round's calls run and each stream
//! handed its prediction; the others wait for that. The calls run on one thread of the
//! batcher's own (started with the first round), not on the leader's: on CUDA a captured call
//! finds its small uploads in candle's per-thread upload cache, so with rounds led by whichever
//! stream came first every thread had to run each call eagerly once before it could capture it;
//! one thread also queues every shared call on one CUDA stream. Rounds run one at a time
//! (the device runs one call at a time anyway): a stream arriving during a round waits for it
//! and then leads the next, so streams that started out of step meet. A member is active while it has
//! joined or asked for a call within the last second, or within the leader's batch timeout when
//! that is longer (a stream that stops sending frames stops holding the others back after that). A stream alone in its round runs exactly its own call
//! ([`Img2Img::predict`]).
//!
//! Streams that are out of step (a stream that joins late, misses a frame's first round, or
//! comes back from another plan) would share calls with rows at different steps for good, and
//! each one's frame boundary (decoding, encoding) would pause the others: so a sequential
//! frame's first call waits while another active stream of its plan is inside a frame (past
//! its first call, or with its first call already running), until that stream has finished its
//! frame (or [`RESYNC_LIMIT`]); the leader of a round does not wait for a stream that waits so.
//! The streams then start their next frames in one round and stay in step. Stream batches
//! (a call holds a frame at every step) have no frame boundary to meet at and never wait.
//!
//! On CUDA each thread queues its work on a stream of its own that nothing orders with the
//! others: a stream's inputs are fenced before the batcher's stream reads them, and the call's
//! result before the stream's own stream uses it (or frees what the call read), all on the
//! device ([`Fence`]).

use std::collections::HashMap;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{Result, anyhow};
use candle_core::Tensor;

use super::SharedModels;
use super::img2img::{Call, Img2Img, StepInputs};
use super::settings::FramePlan;
use crate::cross_frame::{CrossFrameAttention, StreamsAttention};
use crate::ops::step_graphs::Fence;

/// A member that asked for no call for this long (or for the leader's batch timeout, when that
/// is longer) no longer holds the others back.
const ACTIVE_WINDOW: Duration = Duration::from_secs(1);

/// A frame's first call waits at most this long for other streams of its plan to finish
/// theirs (see the module docs); a stream that stalls stops being waited for sooner, when it is
/// no longer active.
pub const RESYNC_LIMIT: Duration = Duration::from_secs(3);

/// How long a stream's call waits at the batcher for the calls of other streams.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BatchTimeout {
    /// At most this long.
    Fixed(Duration),
    /// A quarter of the stream's own recent frame interval (see [`FramePace`]), so that slow
    /// settings wait long enough for partners that are still decoding and encoding between
    /// frames (at the original settings 20 ms let 4 streams drift out of step: 0.8x the
    /// throughput of separate copies on an H200, 200 ms 1.27x) and fast ones stay responsive.
    Auto,
}

/// [`BatchTimeout::Auto`]'s bounds.
pub const AUTO_TIMEOUT_MIN: Duration = Duration::from_millis(5);
pub const AUTO_TIMEOUT_MAX: Duration = Duration::from_millis(500);
/// [`BatchTimeout::Auto`]'s wait before a stream has a frame interval: the longest, because the
/// first frames of streams that start together run at uneven speeds (convolution tuning, graph
/// captures), and streams that fall out of step there stay out of step: each one's frame
/// boundary (VAE decode and encode) becomes a pause for the others (on an H200 at the original
/// settings, 4 streams: 4.6 fps in all starting with 50 ms, 5.2-5.3 with 200 ms throughout).
pub const AUTO_TIMEOUT_FIRST: Duration = AUTO_TIMEOUT_MAX;

/// A stream's recent frame interval (the time between the starts of its frames, smoothed),
/// for [`BatchTimeout::Auto`].
#[derive(Debug, Clone, Default)]
pub struct FramePace {
    last_start: Option<Instant>,
    interval: Option<Duration>,
}

impl FramePace {
    /// A frame starts now (at `now`).
    pub fn frame_started(&mut self, now: Instant) {
        if let Some(last) = self.last_start {
            let seen = now.saturating_duration_since(last);
            // Smoothed so that one slow frame (a model load, a scene cut) moves it a quarter.
            self.interval = Some(match self.interval {
                Some(previous) => previous.mul_f64(0.75) + seen.mul_f64(0.25),
                None => seen,
            });
        }
        self.last_start = Some(now);
    }

    /// The stream stopped or paused: the next frame starts a new measurement.
    pub fn pause(&mut self) {
        self.last_start = None;
    }

    pub fn interval(&self) -> Option<Duration> {
        self.interval
    }

    /// How long a call of this stream waits for partners under `timeout`.
    pub fn wait(&self, timeout: BatchTimeout) -> Duration {
        match timeout {
            BatchTimeout::Fixed(wait) => wait,
            BatchTimeout::Auto => match self.interval {
                Some(interval) => (interval / 4).clamp(AUTO_TIMEOUT_MIN, AUTO_TIMEOUT_MAX),
                None => AUTO_TIMEOUT_FIRST,
            },
        }
    }
}

/// One stream's denoising call, with its cross-frame state (lent to the round's leader).
pub struct StepRequest {
    pub inputs: StepInputs,
    pub attention: CrossFrameAttention,
}

/// What a stream gets back: its cross-frame state, always, and its call's prediction (its
/// rows of the UNet's output) or why there is none.
pub struct StepReply {
    /// The request's inputs, back.
    pub inputs: StepInputs,
    pub attention: CrossFrameAttention,
    pub prediction: Result<Tensor>,
    /// Streams whose rows shared the UNet call (1: alone).
    pub streams_in_call: usize,
    /// The call's work on the batcher's stream.
    done: Arc<Fence>,
}

/// How many calls ran and how many of them held several streams.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BatcherStats {
    pub calls: u64,
    pub shared_calls: u64,
    /// Frames whose first call waited for other streams to finish their frames (out of step).
    pub resyncs: u64,
}

/// Where a stream is in its frame (sequential calls only), for keeping streams in step.
#[derive(Clone)]
struct Phase {
    plan: FramePlan,
    controlnet_scale_bits: u64,
    step: usize,
    /// The call at `step` has been answered.
    answered: bool,
}

impl Phase {
    fn of(inputs: &StepInputs) -> Option<Self> {
        match (inputs.call, inputs.rows.as_slice()) {
            (Call::Sequential, [row]) => Some(Self {
                plan: inputs.plan.clone(),
                controlnet_scale_bits: inputs.controlnet_scale.to_bits(),
                step: row.step,
                answered: false,
            }),
            _ => None,
        }
    }

    fn shares_plan(&self, other: &Phase) -> bool {
        self.plan == other.plan && self.controlnet_scale_bits == other.controlnet_scale_bits
    }

    /// Its frame's last call has been answered: it is between frames.
    fn between_frames(&self) -> bool {
        self.answered && self.step + 1 == self.plan.timesteps.len()
    }
}

struct Pending {
    member: u64,
    ticket: u64,
    request: StepRequest,
    /// The stream's work up to its request (its inputs) on its own stream.
    ready: Fence,
    reply: mpsc::Sender<StepReply>,
}

#[derive(Default)]
struct State {
    /// Each member and when it joined or last asked for a call.
    members: HashMap<u64, Instant>,
    pending: Vec<Pending>,
    /// Each member's place in its frame (sequential calls), for keeping streams in step.
    phases: HashMap<u64, Phase>,
    /// Members whose frame's first call waits for the others to finish their frames.
    deferring: std::collections::HashSet<u64>,
    /// A stream leads a round: it waits for partners (later arrivals join its round) or runs
    /// the round's calls (later arrivals wait for the next).
    leading: bool,
    stats: BatcherStats,
}

impl State {
    /// Members that joined or asked for a call within `window`, but for those holding back a
    /// frame's first call (nobody waits for them).
    fn active_members(&self, now: Instant, window: Duration) -> usize {
        self.members
            .iter()
            .filter(|&(id, &seen)| now.duration_since(seen) < window && !self.deferring.contains(id))
            .count()
    }

    /// Whether another active member of `phase`'s plan is inside a frame: a frame starting now
    /// would run out of step with it.
    fn inside_a_frame(&self, member: u64, phase: &Phase, now: Instant, window: Duration) -> bool {
        self.phases.iter().any(|(&other, theirs)| {
            other != member
                && !self.deferring.contains(&other)
                && self.members.get(&other).is_some_and(|&seen| now.duration_since(seen) < window)
                && theirs.shares_plan(phase)
                && !theirs.between_frames()
                // At its first step and not yet taken into a round: this frame can join it.
                && !(theirs.step == 0 && self.pending.iter().any(|p| p.member == other))
        })
    }
}

/// Latent pixels (rows x height x width) one cross-stream UNet call holds at most by default:
/// 8 rows at 512x512 (unless one stream's call alone holds more). More rows cost about the same
/// per row but more memory: 4 batched live4 streams (4 rows each) on an H200 took 5,289-5,639
/// MiB through GStreamer (4 runs) in two calls of 8 rows against 5,959-6,055 MiB (4 runs) in one
/// of 16 (CUDA graph memory 0.8-1.0 against 1.3-1.4 GiB: the two graphs, replayed on one CUDA
/// stream, seem to share much of theirs) at 51.0-52.7 against 49.9-53.0 fps. `SDCROSSFRAME_MAX_CALL_PIXELS` overrides it (0: no limit).
pub const DEFAULT_MAX_CALL_PIXELS: usize = 8 * 64 * 64;

/// [`DEFAULT_MAX_CALL_PIXELS`], or the environment's `SDCROSSFRAME_MAX_CALL_PIXELS` (an
/// unreadable value is logged and the default used).
fn max_call_pixels_from_env() -> Option<usize> {
    let Ok(value) = std::env::var("SDCROSSFRAME_MAX_CALL_PIXELS") else { return Some(DEFAULT_MAX_CALL_PIXELS) };
    match value.trim().parse::<usize>() {
        Ok(0) => None,
        Ok(pixels) => Some(pixels),
        Err(_) => {
            tracing::warn!(
                "SDCROSSFRAME_MAX_CALL_PIXELS={value:?} is not a number of latent pixels (0: no limit); using {DEFAULT_MAX_CALL_PIXELS}"
            );
            Some(DEFAULT_MAX_CALL_PIXELS)
        }
    }
}

/// The meeting point of the streams sharing one model (one per [`super::SharedModels`]).
pub struct StreamBatcher {
    state: Mutex<State>,
    changed: Condvar,
    next_member: AtomicU64,
    next_ticket: AtomicU64,
    /// Sends rounds to the thread that runs them (started with the first round).
    executor: Mutex<Option<mpsc::Sender<Round>>>,
    /// Latent pixels per UNet call at most (0: no limit); see [`DEFAULT_MAX_CALL_PIXELS`].
    max_call_pixels: AtomicU64,
}

impl Default for StreamBatcher {
    fn default() -> Self {
        Self {
            state: Mutex::default(),
            changed: Condvar::new(),
            next_member: AtomicU64::new(0),
            next_ticket: AtomicU64::new(0),
            executor: Mutex::new(None),
            max_call_pixels: AtomicU64::new(max_call_pixels_from_env().unwrap_or(0) as u64),
        }
    }
}

/// A round's calls, for the batcher's thread.
type Round = Box<dyn FnOnce() + Send>;

impl StreamBatcher {
    fn lock(&self) -> Result<MutexGuard<'_, State>> {
        self.state.lock().map_err(|_| anyhow!("the cross-stream batcher was poisoned by a panic"))
    }

    /// Registers a stream; it counts as a member (one the leader may wait for) until the
    /// returned handle is dropped.
    pub fn join(self: &Arc<Self>) -> Result<Membership> {
        let id = self.next_member.fetch_add(1, Ordering::Relaxed);
        // Active from the start: a stream that joined is about to send frames.
        self.lock()?.members.insert(id, Instant::now());
        Ok(Membership { batcher: self.clone(), id })
    }

    /// Runs `round` on the batcher's thread (started here the first time; it ends when the
    /// batcher is dropped), under the `tracing` dispatcher of the thread that hands it over:
    /// a round's events go where that stream's own go (the GStreamer element's log).
    fn execute(&self, round: Round) -> Result<()> {
        let dispatch = tracing::dispatcher::get_default(tracing::Dispatch::clone);
        let round: Round = Box::new(move || tracing::dispatcher::with_default(&dispatch, round));
        let mut executor =
            self.executor.lock().map_err(|_| anyhow!("the cross-stream batcher's thread handle was poisoned"))?;
        if executor.is_none() {
            let (rounds, next) = mpsc::channel::<Round>();
            std::thread::Builder::new()
                .name("sdcrossframe-batch".into())
                .spawn(move || {
                    while let Ok(round) = next.recv() {
                        round();
                    }
                })
                .map_err(|e| anyhow!("cannot start the cross-stream batcher's thread: {e}"))?;
            *executor = Some(rounds);
        }
        let sender = executor.as_ref().expect("set above");
        sender.send(round).map_err(|_| anyhow!("the cross-stream batcher's thread stopped"))
    }

    /// Latent pixels (rows x height x width) one UNet call holds at most; `None`: no limit. A
    /// round's calls of one plan that hold more run as several calls of whole streams, one
    /// after another.
    pub fn max_call_pixels(&self) -> Option<usize> {
        Some(self.max_call_pixels.load(Ordering::Relaxed) as usize).filter(|&p| p > 0)
    }

    /// Sets [`Self::max_call_pixels`] for the rounds that start from now on.
    pub fn set_max_call_pixels(&self, pixels: Option<usize>) {
        self.max_call_pixels.store(pixels.unwrap_or(0) as u64, Ordering::Relaxed);
    }

    /// Calls so far, and how many held several streams.
    pub fn stats(&self) -> BatcherStats {
        self.lock().map(|s| s.stats).unwrap_or_default()
    }

    /// Streams registered now.
    pub fn members(&self) -> usize {
        self.lock().map(|s| s.members.len()).unwrap_or(0)
    }

    fn leave(&self, id: u64) {
        if let Ok(mut state) = self.state.lock() {
            state.members.remove(&id);
            state.phases.remove(&id);
            state.deferring.remove(&id);
        }
        // A leader waiting for this member stops waiting.
        self.changed.notify_all();
    }

    /// Runs `request`'s call, with the calls of other members that share its plan and are
    /// ready within `timeout` (see the module docs). One round runs at a time: a stream that
    /// arrives while one runs waits for it to end and then leads (or joins) the next, so
    /// streams that start out of step fall into step.
    fn run(
        &self,
        member: u64,
        models: &Arc<SharedModels>,
        request: StepRequest,
        timeout: Duration,
    ) -> Result<StepReply> {
        let (reply, answer) = mpsc::channel();
        let device = request.inputs.device().clone();
        let ready = Fence::recorded(&device)?;
        let ticket = self.next_ticket.fetch_add(1, Ordering::Relaxed);
        let poisoned = || anyhow!("the cross-stream batcher was poisoned by a panic");
        let phase = Phase::of(&request.inputs);
        let step = phase.as_ref().map(|p| p.step);
        let mut state = self.lock()?;
        let arrived = Instant::now();
        state.members.insert(member, arrived);
        match &phase {
            Some(phase) => state.phases.insert(member, phase.clone()),
            None => state.phases.remove(&member),
        };
        // A patient leader also waits for members that are slower between calls.
        let window = ACTIVE_WINDOW.max(timeout);
        if let Some(phase) = phase.as_ref().filter(|p| p.step == 0) {
            // Out of step: wait for the others' frames to end (see the module docs).
            let give_up = arrived + RESYNC_LIMIT;
            let mut waited = false;
            loop {
                let now = Instant::now();
                if now >= give_up || !state.inside_a_frame(member, phase, now, window) {
                    break;
                }
                if !waited {
                    waited = true;
                    state.deferring.insert(member);
                    // A leader waiting for this member stops waiting.
                    self.changed.notify_all();
                }
                state = self.changed.wait_timeout(state, give_up - now).map_err(|_| poisoned())?.0;
            }
            if waited {
                state.deferring.remove(&member);
                state.stats.resyncs += 1;
                state.members.insert(member, Instant::now());
                tracing::debug!(
                    member,
                    waited_ms = arrived.elapsed().as_secs_f64() * 1e3,
                    "a frame waited to start in step"
                );
            }
        }
        state.pending.push(Pending { member, ticket, request, ready, reply });
        self.changed.notify_all();
        loop {
            if !state.pending.iter().any(|p| p.ticket == ticket) {
                // Taken into a round another stream leads.
                drop(state);
                let reply = answer.recv().map_err(|_| anyhow!("the stream leading the cross-stream call stopped"))?;
                self.answered(member, step);
                return fenced(reply, &device);
            }
            if !state.leading {
                break;
            }
            state = self.changed.wait(state).map_err(|_| poisoned())?;
        }
        state.leading = true;
        let deadline = Instant::now().max(arrived) + timeout;
        loop {
            let now = Instant::now();
            if state.pending.len() >= state.active_members(now, window) || now >= deadline {
                break;
            }
            state = self.changed.wait_timeout(state, deadline - now).map_err(|_| poisoned())?.0;
        }
        let round = std::mem::take(&mut state.pending);
        let waited = arrived.elapsed();
        drop(state);
        let started = Instant::now();
        let streams_in_round = round.len();
        self.changed.notify_all();
        let (finished, finish) = mpsc::channel();
        let models_for_round = models.clone();
        let max_call_pixels = self.max_call_pixels();
        let ran = self
            .execute(Box::new(move || {
                let mut stats = BatcherStats::default();
                for group in group_by_plan(round).into_iter().flat_map(|g| split_by_size(g, max_call_pixels)) {
                    stats.calls += 1;
                    stats.shared_calls += u64::from(group.len() > 1);
                    run_group(models_for_round.img2img(), group);
                }
                // Before the leader hears of it: never the last holder of the models here.
                drop(models_for_round);
                let _ = finished.send(stats);
            }))
            .and_then(|()| finish.recv().map_err(|_| anyhow!("the cross-stream batcher's thread stopped in a round")));
        tracing::debug!(
            streams = streams_in_round,
            waited_ms = waited.as_secs_f64() * 1e3,
            ran_ms = started.elapsed().as_secs_f64() * 1e3,
            calls = ran.as_ref().map(|s| s.calls).unwrap_or(0),
            "cross-stream round"
        );
        {
            let mut state = self.lock()?;
            state.leading = false;
            if let Ok(stats) = &ran {
                state.stats.calls += stats.calls;
                state.stats.shared_calls += stats.shared_calls;
            }
        }
        self.changed.notify_all();
        ran?;
        let reply = answer.recv().map_err(|_| anyhow!("the cross-stream call lost this stream's reply"))?;
        self.answered(member, step);
        fenced(reply, &device)
    }

    /// `member`'s call at `step` has been answered (a stream waiting to start in step may go
    /// on).
    fn answered(&self, member: u64, step: Option<usize>) {
        if let Ok(mut state) = self.state.lock()
            && let Some(phase) = state.phases.get_mut(&member)
            && Some(phase.step) == step
        {
            phase.answered = true;
        }
        self.changed.notify_all();
    }
}

/// The reply, once the calling thread's stream waits for the call (on the device).
fn fenced(reply: StepReply, device: &candle_core::Device) -> Result<StepReply> {
    reply.done.wait(device)?;
    Ok(reply)
}

/// The round's requests, grouped by what must be equal in one UNet call.
fn group_by_plan(round: Vec<Pending>) -> Vec<Vec<Pending>> {
    let mut groups: Vec<Vec<Pending>> = Vec::new();
    for pending in round {
        let fits = |group: &Vec<Pending>| {
            let first = &group[0].request.inputs;
            let inputs = &pending.request.inputs;
            first.plan == inputs.plan && first.controlnet_scale.to_bits() == inputs.controlnet_scale.to_bits()
        };
        match groups.iter_mut().find(|group| fits(group)) {
            Some(group) => group.push(pending),
            None => groups.push(vec![pending]),
        }
    }
    groups
}

/// The calls of a group of one plan, each holding latent pixels (rows x height x width) up to
/// `max_pixels` (whole streams, in member order; a stream that alone holds more gets a call of
/// its own); `None`: one call.
fn split_by_size(mut group: Vec<Pending>, max_pixels: Option<usize>) -> Vec<Vec<Pending>> {
    let Some(max_pixels) = max_pixels else { return vec![group] };
    group.sort_by_key(|p| p.member);
    let mut calls: Vec<Vec<Pending>> = Vec::new();
    let mut pixels = 0;
    for pending in group {
        let size = pending.request.inputs.latent_pixels();
        match calls.last_mut() {
            Some(call) if pixels + size <= max_pixels => {
                pixels += size;
                call.push(pending);
            }
            _ => {
                pixels = size;
                calls.push(vec![pending]);
            }
        }
    }
    calls
}

/// Runs one group's call and answers every request in it (a panic in the models is an error
/// for each).
fn run_group(img2img: &Img2Img, mut group: Vec<Pending>) {
    // In member order, not arrival order: the same streams make the same call (the same
    // captured graph) whatever order they arrived in.
    group.sort_by_key(|p| p.member);
    let streams = group.len();
    let device = group[0].request.inputs.device().clone();
    let outcome = catch_unwind(AssertUnwindSafe(|| -> Result<Vec<Tensor>> {
        for pending in &group {
            pending.ready.wait(&device)?;
        }
        if let [one] = group.as_mut_slice() {
            let request = &mut one.request;
            return Ok(vec![img2img.predict(&request.inputs, &mut request.attention)?]);
        }
        let batches: Vec<usize> = group.iter().map(|p| p.request.inputs.batch()).collect();
        let (inputs, attentions): (Vec<&StepInputs>, Vec<&mut CrossFrameAttention>) =
            group.iter_mut().map(|p| (&p.request.inputs, &mut p.request.attention)).unzip();
        let frames = inputs.iter().map(|i| i.rows.len()).collect();
        let mut hook = StreamsAttention::new(attentions, frames)?;
        let prediction = img2img.predict_streams(&inputs, &mut hook)?;
        let mut offset = 0;
        let mut parts = Vec::with_capacity(streams);
        for batch in batches {
            parts.push(prediction.narrow(0, offset, batch)?);
            offset += batch;
        }
        Ok(parts)
    }));
    let outcome = match outcome {
        Ok(Ok(parts)) => Ok(parts),
        Ok(Err(e)) => Err(format!("{e:#}")),
        Err(_) => Err("the models panicked".to_string()),
    };
    // Everything the call queued, for the streams to wait for.
    let (outcome, done) = match Fence::recorded(&device) {
        Ok(done) => (outcome, Arc::new(done)),
        Err(e) => (outcome.and(Err(format!("{e:#}"))), Arc::new(Fence::default())),
    };
    for (index, Pending { request, reply, .. }) in group.into_iter().enumerate() {
        let prediction = match &outcome {
            Ok(parts) => Ok(parts[index].clone()),
            Err(message) if streams > 1 => Err(anyhow!("a UNet call shared by {streams} streams failed: {message}")),
            Err(message) => Err(anyhow!("{message}")),
        };
        // A stream that stopped waiting has nothing to receive.
        let StepRequest { inputs, attention } = request;
        let _ = reply.send(StepReply { inputs, attention, prediction, streams_in_call: streams, done: done.clone() });
    }
}

/// A stream's place in a [`StreamBatcher`]; leaves it when dropped.
pub struct Membership {
    batcher: Arc<StreamBatcher>,
    id: u64,
}

impl Membership {
    /// Runs one denoising call through the batcher (see [`StreamBatcher`]).
    pub fn run(&self, models: &Arc<SharedModels>, request: StepRequest, timeout: Duration) -> Result<StepReply> {
        self.batcher.run(self.id, models, request, timeout)
    }
}

impl Drop for Membership {
    fn drop(&mut self) {
        self.batcher.leave(self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Counts the events it sees.
    struct CountEvents(Arc<AtomicU64>);

    impl tracing::Subscriber for CountEvents {
        fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
            true
        }
        fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
            tracing::span::Id::from_u64(1)
        }
        fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
        fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
        fn event(&self, _: &tracing::Event<'_>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
        fn enter(&self, _: &tracing::span::Id) {}
        fn exit(&self, _: &tracing::span::Id) {}
    }

    /// A round's events go to the dispatcher of the thread that handed it over (an element's
    /// GStreamer log), not to the batcher thread's (none), whichever thread hands it over.
    #[test]
    fn rounds_log_where_the_thread_that_hands_them_over_logs() {
        let batcher = StreamBatcher::default();
        let run_round = |batcher: &StreamBatcher| {
            let (done, finished) = mpsc::channel();
            batcher
                .execute(Box::new(move || {
                    tracing::warn!("from the round");
                    done.send(()).unwrap();
                }))
                .unwrap();
            finished.recv_timeout(Duration::from_secs(10)).expect("the round ran");
        };
        let (first, second) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        tracing::subscriber::with_default(CountEvents(first.clone()), || run_round(&batcher));
        assert_eq!(first.load(Ordering::SeqCst), 1);
        // The same thread, already running, now runs a round of another dispatcher's thread.
        std::thread::spawn({
            let second = second.clone();
            let batcher = Arc::new(batcher);
            move || tracing::subscriber::with_default(CountEvents(second), || run_round(&batcher))
        })
        .join()
        .unwrap();
        assert_eq!((first.load(Ordering::SeqCst), second.load(Ordering::SeqCst)), (1, 1));
    }

    fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }

    #[test]
    fn auto_timeout_follows_the_frame_interval_within_its_bounds() {
        let mut pace = FramePace::default();
        let start = Instant::now();
        assert_eq!(pace.wait(BatchTimeout::Auto), AUTO_TIMEOUT_FIRST);
        assert_eq!(pace.wait(BatchTimeout::Fixed(ms(20))), ms(20));
        pace.frame_started(start);
        assert_eq!(pace.interval(), None, "one start is no interval");
        pace.frame_started(start + ms(800));
        assert_eq!(pace.interval(), Some(ms(800)));
        // Original settings, 4 streams: a quarter of the frame interval.
        assert_eq!(pace.wait(BatchTimeout::Auto), ms(200));
        assert_eq!(pace.wait(BatchTimeout::Fixed(ms(20))), ms(20), "a fixed timeout ignores the pace");
        // One slow frame moves it a quarter of the way.
        pace.frame_started(start + ms(800 + 1600));
        assert_eq!(pace.interval(), Some(ms(1000)));
        assert_eq!(pace.wait(BatchTimeout::Auto), ms(250));
        // Bounded both ways.
        let mut slow = FramePace::default();
        slow.frame_started(start);
        slow.frame_started(start + ms(10_000));
        assert_eq!(slow.wait(BatchTimeout::Auto), AUTO_TIMEOUT_MAX);
        let mut fast = FramePace::default();
        fast.frame_started(start);
        fast.frame_started(start + ms(8));
        assert_eq!(fast.wait(BatchTimeout::Auto), AUTO_TIMEOUT_MIN);
        // After a pause the gap is not an interval.
        fast.pause();
        fast.frame_started(start + ms(60_000));
        assert_eq!(fast.interval(), Some(ms(8)));
    }
}
