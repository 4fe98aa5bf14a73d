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
//! two threads queue on two streams that do not wait for each other: a [`Fence`] makes the
//! next user's stream wait (on the device, without blocking the host) for the event recorded
//! after the last user's copy out, before it writes the buffers or drops them. Keys keep
//! users apart where a graph bakes in a user's state: a step's key includes the frame hook's
//! key (the cross-frame store's generation, unique per store), so no session replays another
//! one's captured step; stage graphs depend only on their input's shape and the weights.

use std::collections::HashMap;

use anyhow::Result;
use candle_core::{Device, Tensor};

/// Captured steps kept at most (a frame plan needs two per denoising step: anchor, follower).
const MAX_ENTRIES: usize = 128;

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
    /// Static buffers per input signature (shapes and dtypes): a graph replays fixed addresses,
    /// so each signature keeps its own, and calls of several signatures (cross-stream calls of
    /// 2, 3 or 4 streams) alternate without dropping each other's graphs.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    buffers: HashMap<String, Buffers>,
    entries: HashMap<(String, StepKey), Entry>,
    stats: GraphStats,
    last_error: Option<String>,
    fence: Fence,
}

/// The inputs a signature's graphs read and the output they write.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
struct Buffers {
    inputs: Vec<Tensor>,
    output: Tensor,
}

enum Entry {
    /// Ran eagerly on these threads; a thread captures it after its own eager run: the capture
    /// finds its small uploads in candle's upload cache, which is per thread (a cross-stream
    /// call runs on whichever stream's thread leads the round).
    Warm(Vec<std::thread::ThreadId>),
    #[cfg(feature = "cuda")]
    Graph(CapturedGraph),
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
            .flat_map(|b| b.inputs.iter().chain(std::iter::once(&b.output)))
            .map(super::held_bytes)
            .sum();
        #[cfg(feature = "cuda")]
        let graphs = self.entries.values().filter(|e| matches!(e, Entry::Graph(_))).count();
        #[cfg(not(feature = "cuda"))]
        let graphs = 0;
        GraphHoldings { signatures: self.buffers.len(), buffer_bytes, graphs }
    }

    /// Drops every graph and buffer (the next runs warm up again).
    pub fn clear(&mut self) {
        let fence = std::mem::take(&mut self.fence);
        *self = Self { stats: self.stats, last_error: self.last_error.take(), fence, ..Self::default() };
    }

    /// Whether steps on `device` go through graphs: CUDA builds, CUDA devices, not switched off.
    pub fn enabled_for(device: &Device) -> bool {
        cfg!(feature = "cuda") && device.is_cuda() && super::switches::switches().cuda_graphs
    }

    /// Runs `step` on `inputs`, eagerly or through a graph as `key` allows. `step` gets the
    /// inputs to use (the live ones, or the static buffers while capturing), must not keep
    /// anything it allocates beyond its return value, and returns a tensor shaped like the
    /// first input (a noise prediction for a model input).
    pub fn run(
        &mut self,
        device: &Device,
        key: StepKey,
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
        // Before the buffers are written or dropped (see the module docs).
        self.fence.wait(device)?;
        let signature = inputs.iter().map(|t| format!("{:?}{:?};", t.dtype(), t.dims())).collect::<String>();
        let known = self.buffers.contains_key(&signature) || self.entries.keys().any(|(s, _)| *s == signature);
        if !known && self.signatures() >= MAX_SIGNATURES {
            tracing::debug!("{} input signatures with captured steps: dropping them all", self.signatures());
            self.clear();
        }
        let key = (signature, key);
        if self.entries.len() >= MAX_ENTRIES && !self.entries.contains_key(&key) {
            // Keys of dropped cross-frame stores never come back; start over.
            tracing::debug!("{} captured steps: dropping them all", self.entries.len());
            self.clear();
        }
        let thread = std::thread::current().id();
        match self.entries.get_mut(&key) {
            None => {
                self.entries.insert(key, Entry::Warm(vec![thread]));
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
            Some(Entry::Graph(graph)) => {
                let buffers = self.buffers.get(&key.0).expect("a graph implies its signature's buffers");
                imp::copy_into(&buffers.inputs, inputs)?;
                graph.launch()?;
                self.stats.replayed += 1;
                // The buffer is rewritten by the next launch: hand out a copy.
                let output = buffers.output.copy()?;
                self.fence.record(device)?;
                Ok(output)
            }
            Some(Entry::Warm(_)) => {
                #[cfg(feature = "cuda")]
                match self.capture(device, &key.0, inputs, &mut step) {
                    Ok(graph) => {
                        let output = self.buffers[&key.0].output.copy()?;
                        self.fence.record(device)?;
                        self.entries.insert(key, Entry::Graph(graph));
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
                        self.fence.record(device)?;
                        if crate::gpu_memory::is_out_of_memory(&e) {
                            // Not this step's fault: it may be captured once memory is free.
                            self.entries.remove(&key);
                            self.stats.eager += 1;
                            return eager(&mut step);
                        }
                    }
                }
                self.entries.insert(key, Entry::Eager);
                self.stats.eager += 1;
                eager(&mut step)
            }
        }
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
        if !self.buffers.contains_key(signature) {
            let buffers = Buffers {
                inputs: inputs.iter().map(|t| t.zeros_like()).collect::<candle_core::Result<_>>()?,
                output: inputs[0].zeros_like()?,
            };
            self.buffers.insert(signature.to_string(), buffers);
        }
        let buffers = &self.buffers[signature];
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
    if crate::gpu_memory::graph_memory(device).is_some_and(|graphs| graphs.used > 0) {
        device.synchronize()?;
        crate::gpu_memory::trim(device);
    }
    Ok(())
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
                graph.launch()?;
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
    use candle_core::cuda_backend::cudarc::driver::CudaGraph;
    use candle_core::cuda_backend::cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
    use candle_core::{Device, Tensor};

    /// A captured, instantiated CUDA graph (also what the benchmark's `--cuda-graph` uses).
    pub struct CapturedGraph(CudaGraph);

    // SAFETY: a graph exec belongs to a CUDA context, not to a thread; cudarc binds the
    // context to the calling thread before each launch. The pipeline uses it from one thread
    // at a time (behind its Mutex; threads' streams are ordered by a `Fence`).
    unsafe impl Send for CapturedGraph {}

    impl CapturedGraph {
        /// Records what `body` issues on the device's stream (nothing runs until a launch).
        pub fn capture(device: &Device, body: impl FnOnce() -> candle_core::Result<()>) -> Result<Self> {
            let Device::Cuda(cuda) = device else { bail!("CUDA graphs need a CUDA device") };
            let stream = cuda.cuda_stream();
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
            Ok(Self(graph))
        }

        pub fn launch(&self) -> Result<()> {
            self.0.launch().map_err(|e| anyhow!("cuGraphLaunch: {e:?}"))
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
