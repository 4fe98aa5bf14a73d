//! CUDA graphs for the denoising step (ControlNet + UNet): after warm-up, a step is one graph
//! launch instead of every kernel launched one by one from the host, which leaves the GPU
//! waiting on the host between small kernels.
//!
//! A graph replays fixed device addresses, so a step is captured on static buffers: the model
//! input, the text embeddings and the control embedding are copied into buffers owned here
//! before every launch, and the step's output is copied out of the graph into one buffer.
//! Everything else a step bakes in is part of its key: the step index and timestep (the
//! timestep embedding is uploaded while capturing), the ControlNet scale, the shapes and dtype,
//! and the frame hook's own key (the cross-frame store's role and buffers, see
//! [`crate::pipeline::FrameHook::graph_key`]). A key is run eagerly the first time (this tunes
//! the convolutions and fills candle's upload cache), captured and launched the second time,
//! and replayed after that. A step that cannot be captured runs eagerly from then on, unless the
//! capture ran out of device memory (then a later run tries again). A failure leaves nothing
//! else behind: the stream leaves capture mode whatever happened, and the caches are keyed by
//! the inputs' shapes, so a failed size never affects another.
//! `SDCROSSFRAME_CUDA_GRAPHS=off` runs every step eagerly ([`super::switches`]).
//!
//! Sharing (one loaded model used by several sessions on several threads, see
//! [`crate::pipeline::registry`]): the graphs and their static buffers are used behind a
//! Mutex (the pipeline's), and everything that touches the buffers (the copies in, the launch,
//! the copy of the output that [`StepGraphs::run`] and [`StageGraph::run`] hand out) is queued
//! before the lock is released. candle opens CUDA devices on the per-thread default stream, so
//! two threads queue on two streams that do not wait for each other: a [`Fence`] per set of
//! buffers makes the next user's stream wait (on the device, without blocking the host) for
//! the event recorded after the last user's copy out, before it writes the buffers or drops
//! them. Step graphs keep a set per capturing thread, so threads replaying their own steps
//! never wait for each other; a stage graph has one set for all. Keys keep
//! users apart where a graph bakes in a user's state: a step's key includes the frame hook's
//! key (the cross-frame store's generation, unique per store), so no session replays another
//! one's captured step; stage graphs depend only on their input's shape and the weights.

use std::collections::HashMap;
use std::thread::ThreadId;

use anyhow::Result;
use candle_core::{Device, Tensor};

/// Keys kept at most (a stream needs two per denoising step: anchor, follower; elements sharing
/// a model without batching each have their own, 8 streams at 18 steps 288). Past it, the keys
/// of dropped cross-frame stores go first, then the least recently used.
const MAX_ENTRIES: usize = 320;

/// Held by the state a captured step bakes in besides its inputs (a cross-frame store's
/// buffers); the step graphs drop the graphs of an owner that is gone at their next use.
#[derive(Debug, Default)]
pub struct GraphOwner(std::sync::Arc<()>);

/// Owners dropped so far in the process: step graphs look for keys to drop only when it moved.
static OWNERS_DROPPED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

impl Drop for GraphOwner {
    fn drop(&mut self) {
        // Gone before it is counted, so that whoever sees the count sees it gone.
        drop(std::mem::take(&mut self.0));
        OWNERS_DROPPED.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }
}

impl GraphOwner {
    /// What a graph keeps to know whether its owner still exists.
    pub fn watch(&self) -> GraphWatch {
        GraphWatch(std::sync::Arc::downgrade(&self.0))
    }
}

/// A captured step's link to its [`GraphOwner`].
#[derive(Debug, Clone)]
pub struct GraphWatch(std::sync::Weak<()>);

impl GraphWatch {
    fn alive(&self) -> bool {
        self.0.strong_count() > 0
    }
}

/// What fixes a captured step besides its inputs' values.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct StepKey {
    pub index: usize,
    pub timestep: usize,
    pub controlnet_scale_bits: u64,
    /// From the frame hook; `None` when the hook cannot be replayed at this step.
    pub hook: Option<u64>,
}

/// Counts of how steps ran (reported by the benchmark; checked by the GPU test).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GraphStats {
    pub eager: usize,
    pub captured: usize,
    pub replayed: usize,
    /// Captures that failed (those steps stay eager).
    pub failed: usize,
}

/// What a [`StepGraphs`] holds (see [`StepGraphs::holdings`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GraphHoldings {
    /// Input signatures with static buffers.
    pub signatures: usize,
    /// Bytes of those buffers (inputs and output).
    pub buffer_bytes: usize,
    /// Captured graphs.
    pub graphs: usize,
}

/// At most this many input signatures keep their static buffers and graphs (a shared model's
/// sessions of different sizes, cross-stream calls of different compositions); one more drops
/// them all.
const MAX_SIGNATURES: usize = 16;

/// The captured steps of one kind of call; see the module docs.
#[derive(Default)]
pub struct StepGraphs {
    /// Static buffers per input signature (shapes and dtypes) and capturing thread: a graph
    /// replays fixed addresses, so each signature keeps its own, and calls of several
    /// signatures (cross-stream calls of 2, 3 or 4 streams) alternate without dropping each
    /// other's graphs. Per thread, because users of one set wait for each other on the device:
    /// elements sharing a model without batching (each on its own thread and CUDA stream)
    /// would otherwise replay their steps one at a time (8 at the original settings ran 4.5 fps
    /// that way and 5.5 with a set per thread, where 8 separate copies ran 5.7; H200, through
    /// GStreamer).
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    buffers: HashMap<String, HashMap<ThreadId, Buffers>>,
    entries: Entries<Entry>,
    stats: GraphStats,
    last_error: Option<String>,
}

/// The inputs a signature's graphs of one capturing thread read and the output they write,
/// and the fence of their last user (see the module docs).
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
struct Buffers {
    inputs: Vec<Tensor>,
    output: Tensor,
    fence: Fence,
}

enum Entry {
    /// Ran eagerly on these threads; a thread captures it after its own eager run: the capture
    /// finds its small uploads in candle's upload cache, which is per thread (a cross-stream
    /// call runs on whichever stream's thread leads the round).
    Warm(Vec<ThreadId>),
    /// Captured on the buffers of its signature that this thread made.
    #[cfg(feature = "cuda")]
    Graph(CapturedGraph, ThreadId),
    /// Capture failed; always eager.
    Eager,
}

impl StepGraphs {
    pub fn stats(&self) -> GraphStats {
        self.stats
    }

    /// Why the last failed capture failed.
    pub fn last_error(&self) -> Option<&str> {
        self.last_error.as_deref()
    }

    /// What the cache holds now: input signatures with static buffers, their bytes, and
    /// captured graphs (memory accounting; a graph's own allocations are the driver's).
    pub fn holdings(&self) -> GraphHoldings {
        let buffer_bytes = self
            .buffers
            .values()
            .flat_map(HashMap::values)
            .flat_map(|b| b.inputs.iter().chain(std::iter::once(&b.output)))
            .map(super::held_bytes)
            .sum();
        #[cfg(feature = "cuda")]
        let graphs = self.entries.values().filter(|e| matches!(e, Entry::Graph(..))).count();
        #[cfg(not(feature = "cuda"))]
        let graphs = 0;
        GraphHoldings { signatures: self.buffers.len(), buffer_bytes, graphs }
    }

    /// Drops every graph and buffer (the next runs warm up again), once the calling thread's
    /// stream has waited for their last users.
    fn clear(&mut self, device: &Device) -> Result<()> {
        self.wait_and_drop_buffers(device, |_, _| false)?;
        *self = Self { stats: self.stats, last_error: self.last_error.take(), ..Self::default() };
        Ok(())
    }

    /// Drops the buffer sets `keep` refuses, after the calling thread's stream has waited for
    /// their last users (their memory goes back to the pool on this stream).
    fn wait_and_drop_buffers(&mut self, device: &Device, keep: impl Fn(&str, &ThreadId) -> bool) -> Result<()> {
        for (signature, sets) in &mut self.buffers {
            let mut dropped = Vec::new();
            for (thread, set) in sets.iter() {
                if !keep(signature, thread) {
                    set.fence.wait(device)?;
                    dropped.push(*thread);
                }
            }
            for thread in dropped {
                sets.remove(&thread);
            }
        }
        self.buffers.retain(|_, sets| !sets.is_empty());
        Ok(())
    }

    /// Drops the buffer sets no captured graph reads any more (their keys were dropped).
    fn drop_unused_buffers(&mut self, device: &Device) -> Result<()> {
        #[cfg(feature = "cuda")]
        {
            let used: Vec<(String, ThreadId)> = self
                .entries
                .iter()
                .filter_map(|(key, entry)| match entry {
                    Entry::Graph(_, thread) => Some((key.0.clone(), *thread)),
                    _ => None,
                })
                .collect();
            self.wait_and_drop_buffers(device, |signature, thread| {
                used.iter().any(|(s, t)| s == signature && t == thread)
            })?;
        }
        #[cfg(not(feature = "cuda"))]
        let _ = device;
        Ok(())
    }

    /// Whether steps on `device` go through graphs: CUDA builds, CUDA devices, not switched off.
    pub fn enabled_for(device: &Device) -> bool {
        cfg!(feature = "cuda") && device.is_cuda() && super::switches::switches().cuda_graphs
    }

    /// Runs `step` on `inputs`, eagerly or through a graph as `key` allows. `step` gets the
    /// inputs to use (the live ones, or the static buffers while capturing), must not keep
    /// anything it allocates beyond its return value, and returns a tensor shaped like the
    /// first input (a noise prediction for a model input). `owners`: what the key's graph
    /// bakes in besides the inputs (the frame hook's [`crate::pipeline::FrameHook::graph_owners`]);
    /// the graph is dropped once one of them is.
    pub fn run(
        &mut self,
        device: &Device,
        key: StepKey,
        owners: Vec<GraphWatch>,
        inputs: &[&Tensor],
        mut step: impl FnMut(&[Tensor]) -> candle_core::Result<Tensor>,
    ) -> Result<Tensor> {
        let eager = |step: &mut dyn FnMut(&[Tensor]) -> candle_core::Result<Tensor>| -> Result<Tensor> {
            let live: Vec<Tensor> = inputs.iter().map(|t| (*t).clone()).collect();
            Ok(step(&live)?)
        };
        if !Self::enabled_for(device) || key.hook.is_none() {
            self.stats.eager += 1;
            if Self::enabled_for(device) {
                make_room_for_eager(device)?;
            }
            return eager(&mut step);
        }
        let signature = inputs.iter().map(|t| format!("{:?}{:?};", t.dtype(), t.dims())).collect::<String>();
        let known = self.buffers.contains_key(&signature) || self.entries.keys().any(|(s, _)| *s == signature);
        if !known && self.signatures() >= MAX_SIGNATURES {
            tracing::debug!("{} input signatures with captured steps: dropping them all", self.signatures());
            self.clear(device)?;
        }
        let key = (signature, key);
        if self.entries.drop_gone() {
            self.drop_unused_buffers(device)?;
        }
        let thread = std::thread::current().id();
        match self.entries.get_mut(&key) {
            None => {
                if self.entries.insert(key, Entry::Warm(vec![thread]), owners) {
                    self.drop_unused_buffers(device)?;
                }
                self.stats.eager += 1;
                make_room_for_eager(device)?;
                eager(&mut step)
            }
            Some(Entry::Eager) => {
                self.stats.eager += 1;
                eager(&mut step)
            }
            Some(Entry::Warm(threads)) if !threads.contains(&thread) => {
                threads.push(thread);
                self.stats.eager += 1;
                eager(&mut step)
            }
            #[cfg(feature = "cuda")]
            Some(Entry::Graph(graph, owner)) => {
                let buffers = self
                    .buffers
                    .get_mut(&key.0)
                    .and_then(|sets| sets.get_mut(owner))
                    .ok_or_else(|| anyhow::anyhow!("the static buffers of a captured step are gone"))?;
                // Before the buffers are written (see the module docs).
                buffers.fence.wait(device)?;
                imp::copy_into(&buffers.inputs, inputs)?;
                graph.launch_from(device)?;
                self.stats.replayed += 1;
                // The buffer is rewritten by the next launch: hand out a copy.
                let output = buffers.output.copy()?;
                buffers.fence.record(device)?;
                Ok(output)
            }
            Some(Entry::Warm(_)) => {
                #[cfg(feature = "cuda")]
                match self.capture(device, &key.0, inputs, &mut step) {
                    Ok(graph) => {
                        let buffers = self
                            .own_buffers(&key.0)
                            .ok_or_else(|| anyhow::anyhow!("a capture left no static buffers"))?;
                        let output = buffers.output.copy()?;
                        buffers.fence.record(device)?;
                        self.entries.replace(&key, Entry::Graph(graph, thread));
                        self.stats.captured += 1;
                        return Ok(output);
                    }
                    Err(e) => {
                        if self.stats.failed == 0 {
                            tracing::warn!("CUDA graph capture failed, running that step op by op: {e:#}");
                        }
                        self.stats.failed += 1;
                        self.last_error = Some(format!("{e:#}"));
                        // The buffers were written before the capture began.
                        if let Some(buffers) = self.own_buffers(&key.0) {
                            buffers.fence.record(device)?;
                        }
                        if crate::gpu_memory::is_out_of_memory(&e) {
                            // Not this step's fault: it may be captured once memory is free.
                            self.entries.remove(&key);
                            self.stats.eager += 1;
                            return eager(&mut step);
                        }
                    }
                }
                self.entries.replace(&key, Entry::Eager);
                self.stats.eager += 1;
                eager(&mut step)
            }
        }
    }

    /// The calling thread's buffers of `signature`.
    #[cfg(feature = "cuda")]
    fn own_buffers(&mut self, signature: &str) -> Option<&mut Buffers> {
        self.buffers.get_mut(signature)?.get_mut(&std::thread::current().id())
    }

    /// Input signatures with buffers or entries.
    fn signatures(&self) -> usize {
        let mut signatures: Vec<&String> = self.buffers.keys().chain(self.entries.keys().map(|(s, _)| s)).collect();
        signatures.sort();
        signatures.dedup();
        signatures.len()
    }

    /// Captures `step` on the static buffers of `signature` and launches it once (capturing runs nothing).
    #[cfg(feature = "cuda")]
    fn capture(
        &mut self,
        device: &Device,
        signature: &str,
        inputs: &[&Tensor],
        step: &mut dyn FnMut(&[Tensor]) -> candle_core::Result<Tensor>,
    ) -> Result<CapturedGraph> {
        let thread = std::thread::current().id();
        let sets = self.buffers.entry(signature.to_string()).or_default();
        if !sets.contains_key(&thread) {
            let buffers = Buffers {
                inputs: inputs.iter().map(|t| t.zeros_like()).collect::<candle_core::Result<_>>()?,
                output: inputs[0].zeros_like()?,
                fence: Fence::default(),
            };
            sets.insert(thread, buffers);
        }
        let buffers = &sets[&thread];
        // Before the buffers are written (see the module docs).
        buffers.fence.wait(device)?;
        imp::copy_into(&buffers.inputs, inputs)?;
        let output = &buffers.output;
        let graph = CapturedGraph::capture(device, || {
            let out = step(&buffers.inputs)?;
            if out.dims() != output.dims() || out.dtype() != output.dtype() {
                candle_core::bail!(
                    "the step's output {:?} {:?} is not shaped like its first input",
                    out.dtype(),
                    out.dims()
                );
            }
            output.slice_set(&out, 0, 0)
        })?;
        graph.launch()?;
        Ok(graph)
    }
}

/// Before a step runs eagerly while captured steps hold device memory: gives the memory of
/// idle graphs back (they map it again at their next launch), so that the eager step's
/// allocations from the memory pool and the graphs' do not add up. Eager steps among captured
/// ones are compositions seen for the first time or ones that are never captured: a stream
/// batch filling or draining (end of stream), streams joining or leaving. At the end of 4
/// batched live streams, the drain's eager calls on top of the captured 16-row step's memory
/// were the run's peak, 700-930 MiB above the steady state (H200). Waits for the calling
/// thread's stream first: a graph still running keeps its memory.
fn make_room_for_eager(device: &Device) -> Result<()> {
    if !super::switches::switches().eager_trim {
        return Ok(());
    }
    if crate::gpu_memory::graph_memory(device).is_some_and(|graphs| graphs.used > 0) {
        device.synchronize()?;
        crate::gpu_memory::trim(device);
    }
    Ok(())
}

/// The step graphs' entries by key, at most [`MAX_ENTRIES`]: the keys whose owners are gone
/// (dropped or re-made cross-frame stores: their keys never come back) are dropped at the next
/// look ([`Entries::drop_gone`], every run), and a new key that does not fit drops the least
/// recently used one (before, a full cache dropped every key, so that 4 elements sharing a
/// model at 18 steps, re-anchoring, kept warming up again).
struct Entries<V> {
    slots: HashMap<(String, StepKey), Slot<V>>,
    /// Counts lookups, for "least recently used".
    clock: u64,
    /// [`OWNERS_DROPPED`] when the keys of gone owners were last dropped.
    owners_dropped: u64,
}

struct Slot<V> {
    value: V,
    owners: Vec<GraphWatch>,
    last_used: u64,
}

impl<V> Default for Entries<V> {
    fn default() -> Self {
        Self { slots: HashMap::new(), clock: 0, owners_dropped: 0 }
    }
}

impl<V> Entries<V> {
    fn get_mut(&mut self, key: &(String, StepKey)) -> Option<&mut V> {
        self.clock += 1;
        let slot = self.slots.get_mut(key)?;
        slot.last_used = self.clock;
        Some(&mut slot.value)
    }

    /// Drops the keys of owners that are gone, when an owner went since the last look (a
    /// stream that stopped or re-made its cross-frame store: its graphs' memory goes back now,
    /// not when another key comes). Whether any was dropped.
    fn drop_gone(&mut self) -> bool {
        let dropped_owners = OWNERS_DROPPED.load(std::sync::atomic::Ordering::SeqCst);
        if dropped_owners == self.owners_dropped {
            return false;
        }
        self.owners_dropped = dropped_owners;
        let before = self.slots.len();
        self.slots.retain(|_, slot| slot.owners.iter().all(GraphWatch::alive));
        if self.slots.len() < before {
            tracing::debug!(
                "dropped {} captured-step keys of cross-frame stores that are gone",
                before - self.slots.len()
            );
        }
        self.slots.len() < before
    }

    /// Whether keys were dropped to make room.
    fn insert(&mut self, key: (String, StepKey), value: V, owners: Vec<GraphWatch>) -> bool {
        let before = self.slots.len();
        if !self.slots.contains_key(&key) {
            self.drop_gone();
            while self.slots.len() >= MAX_ENTRIES {
                let Some(oldest) = self.slots.iter().min_by_key(|(_, slot)| slot.last_used).map(|(k, _)| k.clone())
                else {
                    break;
                };
                self.slots.remove(&oldest);
            }
        }
        let dropped = self.slots.len() < before;
        self.clock += 1;
        self.slots.insert(key, Slot { value, owners, last_used: self.clock });
        dropped
    }

    /// A new value for a key that is there (its owners and use stay).
    fn replace(&mut self, key: &(String, StepKey), value: V) {
        if let Some(slot) = self.slots.get_mut(key) {
            slot.value = value;
        }
    }

    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    fn remove(&mut self, key: &(String, StepKey)) {
        self.slots.remove(key);
    }

    fn keys(&self) -> impl Iterator<Item = &(String, StepKey)> {
        self.slots.keys()
    }

    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    fn values(&self) -> impl Iterator<Item = &V> {
        self.slots.values().map(|slot| &slot.value)
    }

    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    fn iter(&self) -> impl Iterator<Item = (&(String, StepKey), &V)> {
        self.slots.iter().map(|(key, slot)| (key, &slot.value))
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.slots.len()
    }
}

/// A CUDA graph for one computation of one input outside the denoising steps (the VAE's
/// encoding and decoding, the control image's embedding), which otherwise launch their
/// kernels one by one from the host. Like a step: eager on the first run of an input shape
/// (that tunes the convolutions), captured on static input and output buffers on the second,
/// replayed after; a capture that fails leaves it eager. Whatever `f` depends on besides its
/// input must not change between runs (the models' weights do not).
#[derive(Default)]
pub struct StageGraph {
    /// Shape and dtype of the input the buffers and graph were made for.
    signature: Option<String>,
    /// The threads that ran it eagerly: a capture finds the small uploads it needs in candle's
    /// upload cache, which is per thread, so a thread captures only after its own eager run
    /// (users of a shared model run on their own threads).
    warmed: Vec<std::thread::ThreadId>,
    failed: bool,
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    buffers: Option<(Tensor, Tensor)>,
    #[cfg(feature = "cuda")]
    graph: Option<CapturedGraph>,
    stats: GraphStats,
    fence: Fence,
}

impl StageGraph {
    pub fn stats(&self) -> GraphStats {
        self.stats
    }

    /// `f(input)`, eagerly or through the graph; see the type's docs.
    pub fn run(
        &mut self,
        device: &Device,
        input: &Tensor,
        mut f: impl FnMut(&Tensor) -> candle_core::Result<Tensor>,
    ) -> Result<Tensor> {
        if !StepGraphs::enabled_for(device) || self.failed && self.signature_matches(input) {
            self.stats.eager += 1;
            return Ok(f(input)?);
        }
        // Before the buffers are written or dropped (see the module docs).
        self.fence.wait(device)?;
        if !self.signature_matches(input) {
            let fence = std::mem::take(&mut self.fence);
            *self = Self { signature: Some(Self::signature(input)), stats: self.stats, fence, ..Self::default() };
        }
        #[cfg(feature = "cuda")]
        {
            if let (Some(graph), Some((input_buffer, output))) = (&self.graph, &self.buffers) {
                input_buffer.slice_set(input, 0, 0)?;
                graph.launch_from(device)?;
                self.stats.replayed += 1;
                // The buffer is rewritten by the next launch: hand out a copy.
                let output = output.copy()?;
                self.fence.record(device)?;
                return Ok(output);
            }
            if self.warmed.contains(&std::thread::current().id()) {
                match self.capture(device, input, &mut f) {
                    Ok(output) => {
                        self.fence.record(device)?;
                        self.stats.captured += 1;
                        return Ok(output);
                    }
                    Err(e) => {
                        tracing::warn!("CUDA graph capture of a stage failed, running it op by op: {e:#}");
                        self.stats.failed += 1;
                        // Out of memory is not the stage's fault: a later run captures again.
                        self.failed = !crate::gpu_memory::is_out_of_memory(&e);
                    }
                }
            }
        }
        let thread = std::thread::current().id();
        if !self.warmed.contains(&thread) {
            self.warmed.push(thread);
        }
        self.stats.eager += 1;
        Ok(f(input)?)
    }

    fn signature(input: &Tensor) -> String {
        format!("{:?}{:?}", input.dtype(), input.dims())
    }

    fn signature_matches(&self, input: &Tensor) -> bool {
        self.signature.as_deref() == Some(Self::signature(input).as_str())
    }

    /// Captures `f` on a static input buffer into a static output buffer shaped by an eager
    /// run's output, launches it once and returns a copy of the output.
    #[cfg(feature = "cuda")]
    fn capture(
        &mut self,
        device: &Device,
        input: &Tensor,
        f: &mut dyn FnMut(&Tensor) -> candle_core::Result<Tensor>,
    ) -> Result<Tensor> {
        let input_buffer = input.copy()?;
        // The output's shape: from an eager run, which also leaves every lazily made resource
        // (tuned convolution plans, cached uploads) in place before capturing.
        let output = f(&input_buffer)?.zeros_like()?;
        let graph = CapturedGraph::capture(device, || {
            let out = f(&input_buffer)?;
            output.slice_set(&out, 0, 0)
        })?;
        graph.launch()?;
        let result = output.copy()?;
        self.buffers = Some((input_buffer, output));
        self.graph = Some(graph);
        Ok(result)
    }
}

/// Orders work of different threads' streams: candle queues each thread's work on its own
/// per-thread stream, and cudarc orders streams by itself only for streams it created (not
/// these), so a tensor written on one thread's stream and read on another's needs this. For
/// a graph's static buffers: the last user's event, recorded after its copy out; the next
/// user's stream waits for it (on the device) before touching the buffers. For cross-stream
/// calls ([`crate::pipeline::batcher`]): each stream's inputs, then the call's result. Nothing
/// on the CPU, and nothing at all off CUDA.
#[derive(Default)]
pub struct Fence {
    #[cfg(feature = "cuda")]
    event: Option<candle_core::cuda_backend::cudarc::driver::CudaEvent>,
}

impl Fence {
    /// A fence holding the work the calling thread has queued on `device` so far.
    pub fn recorded(device: &Device) -> Result<Self> {
        let mut fence = Self::default();
        fence.record(device)?;
        Ok(fence)
    }

    /// Makes the calling thread's stream wait for the last recorded user.
    pub fn wait(&self, device: &Device) -> Result<()> {
        #[cfg(feature = "cuda")]
        if let (Device::Cuda(cuda), Some(event)) = (device, &self.event) {
            cuda.cuda_stream().wait(event).map_err(|e| anyhow::anyhow!("cuStreamWaitEvent: {e:?}"))?;
        }
        #[cfg(not(feature = "cuda"))]
        let _ = device;
        Ok(())
    }

    /// Records the work the calling thread has queued so far.
    pub fn record(&mut self, device: &Device) -> Result<()> {
        #[cfg(feature = "cuda")]
        if let Device::Cuda(cuda) = device {
            let flags = candle_core::cuda_backend::cudarc::driver::sys::CUevent_flags::CU_EVENT_DISABLE_TIMING;
            self.event = Some(
                cuda.cuda_stream().record_event(Some(flags)).map_err(|e| anyhow::anyhow!("cuEventRecord: {e:?}"))?,
            );
        }
        #[cfg(not(feature = "cuda"))]
        let _ = device;
        Ok(())
    }
}

/// GPU time of one call of `f`, measured as a CUDA graph replays it: `reps` calls captured in
/// one graph, launched once to warm up, then timed over two launches. Unlike timing eager
/// calls, this leaves out the host's launch overhead, which replayed steps do not pay (the
/// convolution tuner chose differently on host timing). An error when `f` cannot be captured.
#[cfg(feature = "cuda")]
pub fn graph_time(device: &Device, reps: usize, mut f: impl FnMut() -> candle_core::Result<()>) -> Result<f64> {
    let graph = CapturedGraph::capture(device, || (0..reps).try_for_each(|_| f()))?;
    graph.launch()?;
    device.synchronize()?;
    let start = std::time::Instant::now();
    graph.launch()?;
    graph.launch()?;
    device.synchronize()?;
    Ok(start.elapsed().as_secs_f64() / (2 * reps) as f64)
}

#[cfg(feature = "cuda")]
pub use imp::CapturedGraph;

#[cfg(feature = "cuda")]
mod imp {
    use anyhow::{Context, Result, anyhow, bail};
    use candle_core::cuda_backend::cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
    use candle_core::cuda_backend::cudarc::driver::{CudaGraph, CudaStream};
    use candle_core::{Device, Tensor};
    use std::sync::Arc;

    /// A captured, instantiated CUDA graph (also what the benchmark's `--cuda-graph` uses). It
    /// launches on the stream it was captured on.
    pub struct CapturedGraph {
        graph: CudaGraph,
        stream: Arc<CudaStream>,
    }

    // SAFETY: a graph exec belongs to a CUDA context, not to a thread; cudarc binds the
    // context to the calling thread before each launch. The pipeline uses it from one thread
    // at a time (behind its Mutex; threads' streams are ordered by a `Fence` and
    // `launch_from`).
    unsafe impl Send for CapturedGraph {}

    impl CapturedGraph {
        /// Records what `body` issues on the device's stream (nothing runs until a launch).
        pub fn capture(device: &Device, body: impl FnOnce() -> candle_core::Result<()>) -> Result<Self> {
            let Device::Cuda(cuda) = device else { bail!("CUDA graphs need a CUDA device") };
            let stream = cuda.cuda_stream();
            // No other thread trims the device's memory (or captures) until this graph is
            // instantiated and uploaded.
            let _exclusive = crate::gpu_memory::exclusive_graph_memory();
            device.synchronize()?;
            // What the eager runs before it left in the memory pool goes back to the driver
            // before the graph maps memory of its own.
            crate::gpu_memory::trim_pool(device);
            stream
                .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
                .map_err(|e| anyhow!("cuStreamBeginCapture: {e:?}"))?;
            let captured = body();
            // End the capture whatever happened, so the stream leaves capture mode.
            let graph = stream.end_capture(CUgraphInstantiate_flags::CUDA_GRAPH_INSTANTIATE_FLAG_AUTO_FREE_ON_LAUNCH);
            captured.context("running the step under capture")?;
            let graph = graph
                .map_err(|e| anyhow!("cuStreamEndCapture / instantiate: {e:?}"))?
                .context("the capture recorded no graph")?;
            graph.upload().map_err(|e| anyhow!("cuGraphUpload: {e:?}"))?;
            Ok(Self { graph, stream })
        }

        /// Launches on the capturing stream.
        pub fn launch(&self) -> Result<()> {
            self.graph.launch().map_err(|e| anyhow!("cuGraphLaunch: {e:?}"))
        }

        /// Launches in order with the calling thread's stream on `device`: a graph captured on
        /// another thread runs on that thread's stream, which then first waits for the caller's
        /// work (its copies into the static buffers), and the caller's stream for the graph.
        pub fn launch_from(&self, device: &Device) -> Result<()> {
            let Device::Cuda(cuda) = device else { bail!("CUDA graphs need a CUDA device") };
            let caller = cuda.cuda_stream();
            if caller.cu_stream() == self.stream.cu_stream() {
                return self.launch();
            }
            self.stream.join(&caller).map_err(|e| anyhow!("ordering a graph after its caller's stream: {e:?}"))?;
            self.launch()?;
            caller.join(&self.stream).map_err(|e| anyhow!("ordering a caller's stream after a graph: {e:?}"))
        }
    }

    /// Copies each input into its static buffer (on the stream, before the launch).
    pub(super) fn copy_into(buffers: &[Tensor], inputs: &[&Tensor]) -> Result<()> {
        for (buffer, input) in buffers.iter().zip(inputs) {
            buffer.slice_set(input, 0, 0)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: usize) -> (String, StepKey) {
        ("f16[2, 4, 64, 64];".to_string(), StepKey { index: n, timestep: 0, controlnet_scale_bits: 0, hook: Some(1) })
    }

    /// The keys of an owner that is gone are dropped at the next look, whatever their use; a
    /// look with no owner gone since the last drops nothing.
    #[test]
    fn keys_of_owners_that_are_gone_are_dropped_at_the_next_look() {
        let (live, gone) = (GraphOwner::default(), GraphOwner::default());
        let mut entries = Entries::default();
        entries.insert(key(0), "gone", vec![live.watch(), gone.watch()]);
        entries.insert(key(1), "live", vec![live.watch()]);
        entries.drop_gone();
        assert!(!entries.drop_gone(), "nothing went since the last look");
        drop(gone);
        assert!(entries.drop_gone());
        assert_eq!(entries.len(), 1);
        assert!(entries.get_mut(&key(0)).is_none() && entries.get_mut(&key(1)).is_some());
        // Re-made (a store's buffers renewed, as `drop_entries` does): the old owner's keys go.
        let mut live = live;
        drop(std::mem::take(&mut live));
        assert!(entries.drop_gone());
        assert_eq!(entries.len(), 0);
        drop(live);
    }

    /// Inserting looks for gone owners' keys too, whatever their use.
    #[test]
    fn keys_of_owners_that_are_gone_go_first() {
        let (live, gone) = (GraphOwner::default(), GraphOwner::default());
        let mut entries = Entries::default();
        entries.insert(key(0), "gone", vec![live.watch(), gone.watch()]);
        entries.insert(key(1), "live", vec![live.watch()]);
        entries.insert(key(2), "no owner", Vec::new());
        drop(gone);
        assert_eq!(entries.len(), 3, "nothing is dropped before a look");
        assert!(entries.get_mut(&key(0)).is_some());
        entries.insert(key(3), "new", vec![live.watch()]);
        assert_eq!(entries.len(), 3);
        assert!(entries.get_mut(&key(0)).is_none(), "the key of the owner that is gone stays");
        for n in 1..=3 {
            assert!(entries.get_mut(&key(n)).is_some(), "key {n} was dropped");
        }
    }

    /// Full of live keys: the least recently used one makes room, not all of them (a cache
    /// dropped whole kept 4 streams of 36 keys each warming up again).
    #[test]
    fn a_full_cache_drops_its_least_recently_used_key() {
        let owner = GraphOwner::default();
        let mut entries = Entries::default();
        for n in 0..MAX_ENTRIES {
            entries.insert(key(n), n, vec![owner.watch()]);
        }
        // Key 0 is used again: key 1 is now the least recently used.
        assert_eq!(entries.get_mut(&key(0)), Some(&mut 0));
        entries.insert(key(MAX_ENTRIES), MAX_ENTRIES, vec![owner.watch()]);
        assert_eq!(entries.len(), MAX_ENTRIES);
        assert!(entries.get_mut(&key(1)).is_none());
        assert!(entries.get_mut(&key(0)).is_some() && entries.get_mut(&key(2)).is_some());
        // A value replaced in place keeps its key's place; a key that is there is not "new".
        entries.replace(&key(2), 99);
        entries.insert(key(2), 98, Vec::new());
        assert_eq!(entries.len(), MAX_ENTRIES);
        assert_eq!(entries.get_mut(&key(2)), Some(&mut 98));
    }
}
