//! What one frame asks of a CUDA device, and the errors when it cannot have it.
//!
//! Two limits decide whether a processing size can run on a GPU:
//! - **Indexing**: candle's CUDA kernels index tensors with 32-bit integers (the element-wise
//!   kernels loop with an `unsigned int` over a `size_t` count, the softmax computes
//!   `row * ncols + col` in `int`), so a tensor of 2^31 elements or more makes them read out of
//!   bounds (an illegal address, which kills the process's CUDA context) or loop forever. Such
//!   sizes are refused before anything is launched ([`check_frame_size`]). The largest tensors of
//!   a frame are the VAE's at full resolution (the KL decoder's upsampled 256-channel input of
//!   its last block); its attention is computed in query chunks that stay under the limit
//!   (`models::vae_blocks`).
//! - **Memory**: a size whose frame needs more than the whole device is refused the same way;
//!   one that fails for lack of free memory (other elements or processes on the device) fails
//!   at the allocation with `CUDA_ERROR_OUT_OF_MEMORY`, and [`explain_failure`] turns that into
//!   an error naming the size, the device's free and total memory when it failed and the
//!   estimate of what the frame needs.
//!
//! The estimate ([`FrameFootprint`]) is a floor computed from the VAE's config: three tensors of
//! its widest full-resolution stage (a convolution's input and output and the residual) plus
//! one chunk of attention scores and probabilities (f32), beyond the loaded weights. The real
//! peak is higher (the UNet's activations, allocator slack); the allocation that failed is not
//! known (the driver's error carries no size).

use anyhow::{Result, anyhow};
use candle_core::{DType, Device};

use crate::pipeline::Img2Img;
use crate::pipeline::VaeConfig;

/// More elements than this in one tensor overflow the 32-bit indexing of candle's CUDA
/// kernels.
pub const MAX_TENSOR_ELEMENTS: u64 = i32::MAX as u64;

/// Scores per chunk of the VAE's attention (f32: 4 GiB of scores, as much again of
/// probabilities; see `ops::attention::in_query_chunks`).
pub const ATTENTION_CHUNK_SCORES: u64 = crate::ops::ATTENTION_CHUNK_SCORES as u64;

const MIB: u64 = 1 << 20;

/// A device's memory in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryInfo {
    pub free: u64,
    pub total: u64,
}

impl std::fmt::Display for MemoryInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} MiB free of {} MiB", self.free / MIB, self.total / MIB)
    }
}

/// Free and total memory of a CUDA device (`cuMemGetInfo` in its context); `None` on the CPU
/// or when the driver does not answer.
pub fn memory_info(device: &Device) -> Option<MemoryInfo> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(cuda) = device {
        return cuda
            .cuda_stream()
            .context()
            .mem_get_info()
            .ok()
            .map(|(free, total)| MemoryInfo { free: free as u64, total: total as u64 });
    }
    let _ = device;
    None
}

/// Device memory CUDA graphs hold for their allocations (every graph of the process on the
/// device), bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GraphMemory {
    /// Associated with graphs now.
    pub used: u64,
    /// Reserved for graphs' allocations (used, and cached for them).
    pub reserved: u64,
    /// The most ever reserved at once (since the process started).
    pub reserved_high: u64,
}

/// What CUDA graphs hold on `device` now (`cuDeviceGetGraphMemAttribute`); `None` off CUDA or
/// when the driver does not answer.
pub fn graph_memory(device: &Device) -> Option<GraphMemory> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(cuda) = device {
        use candle_core::cuda_backend::cudarc::driver::sys;
        let context = bound_context(cuda)?;
        let attribute = |attr: sys::CUgraphMem_attribute| {
            let mut bytes: u64 = 0;
            // SAFETY: these attributes are 64-bit values written into `bytes`.
            let result = unsafe {
                sys::cuDeviceGetGraphMemAttribute(context.cu_device(), attr, &mut bytes as *mut u64 as *mut _)
            };
            (result == sys::CUresult::CUDA_SUCCESS).then_some(bytes)
        };
        return Some(GraphMemory {
            used: attribute(sys::CUgraphMem_attribute::CU_GRAPH_MEM_ATTR_USED_MEM_CURRENT)?,
            reserved: attribute(sys::CUgraphMem_attribute::CU_GRAPH_MEM_ATTR_RESERVED_MEM_CURRENT)?,
            reserved_high: attribute(sys::CUgraphMem_attribute::CU_GRAPH_MEM_ATTR_RESERVED_MEM_HIGH)?,
        });
    }
    let _ = device;
    None
}

/// The device's default memory pool, which every tensor candle allocates outside a CUDA graph
/// comes from (`cuMemAllocAsync`), bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PoolMemory {
    /// Allocated to tensors now.
    pub used: u64,
    /// Held by the pool now (in use, and freed but not yet given back to the driver).
    pub reserved: u64,
    /// The most ever allocated to tensors at once (until [`reset_pool_peak`]).
    pub used_high: u64,
    /// The most ever held at once (until [`reset_pool_peak`]).
    pub reserved_high: u64,
}

/// What the default memory pool of `device` holds (`cuMemPoolGetAttribute`); `None` off CUDA
/// or when the driver does not answer.
pub fn pool_memory(device: &Device) -> Option<PoolMemory> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(cuda) = device {
        use candle_core::cuda_backend::cudarc::driver::sys::CUmemPool_attribute as Attr;
        let pool = DefaultPool::of(cuda)?;
        return Some(PoolMemory {
            used: pool.attribute(Attr::CU_MEMPOOL_ATTR_USED_MEM_CURRENT)?,
            reserved: pool.attribute(Attr::CU_MEMPOOL_ATTR_RESERVED_MEM_CURRENT)?,
            used_high: pool.attribute(Attr::CU_MEMPOOL_ATTR_USED_MEM_HIGH)?,
            reserved_high: pool.attribute(Attr::CU_MEMPOOL_ATTR_RESERVED_MEM_HIGH)?,
        });
    }
    let _ = device;
    None
}

/// The device memory of tensors, of the pool and of CUDA graphs now, in one line (the
/// element's per-frame trace); `None` off CUDA.
pub fn summary(device: &Device) -> Option<String> {
    let pool = pool_memory(device)?;
    let graphs = graph_memory(device)?;
    let mib = |bytes: u64| bytes / MIB;
    Some(format!(
        "device memory: tensors {} MiB, pool {} MiB, graphs {} MiB",
        mib(pool.used),
        mib(pool.reserved),
        mib(graphs.used)
    ))
}

/// Starts the default pool's high-water marks over at what it holds now (benchmarks measure
/// one stage's peak this way); `false` off CUDA or when the driver refuses.
pub fn reset_pool_peak(device: &Device) -> bool {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(cuda) = device {
        use candle_core::cuda_backend::cudarc::driver::sys::CUmemPool_attribute as Attr;
        let Some(pool) = DefaultPool::of(cuda) else { return false };
        return pool.set_zero(Attr::CU_MEMPOOL_ATTR_USED_MEM_HIGH)
            && pool.set_zero(Attr::CU_MEMPOOL_ATTR_RESERVED_MEM_HIGH);
    }
    let _ = device;
    false
}

/// Gives what the default pool and the graphs' memory hold unused back to the driver
/// ([`trim_pool`], then `cuDeviceGraphMemTrim`; idle graphs map theirs again at their next
/// launch): memory read after this is memory in use, not a cache. `false` off CUDA or when the
/// driver refuses.
pub fn trim(device: &Device) -> bool {
    let _exclusive = exclusive_graph_memory();
    trim_pool(device) && trim_graph_memory(device)
}

/// Gives what the default pool holds unused back to the driver (`cuMemPoolTrimTo` to 0);
/// `false` off CUDA or when the driver refuses.
pub fn trim_pool(device: &Device) -> bool {
    let _exclusive = exclusive_graph_memory();
    #[cfg(feature = "cuda")]
    if let Device::Cuda(cuda) = device {
        use candle_core::cuda_backend::cudarc::driver::sys;
        let Some(pool) = DefaultPool::of(cuda) else { return false };
        // SAFETY: a pool of the bound context.
        return unsafe { sys::cuMemPoolTrimTo(pool.pool, 0) == sys::CUresult::CUDA_SUCCESS };
    }
    let _ = device;
    false
}

/// Held while a CUDA graph is captured and while the default pool or the graphs' memory is
/// trimmed ([`exclusive_graph_memory`]).
pub struct GraphMemoryGuard(Option<std::sync::MutexGuard<'static, ()>>);

thread_local! {
    static HOLDS_GRAPH_MEMORY: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

impl Drop for GraphMemoryGuard {
    fn drop(&mut self) {
        if self.0.is_some() {
            HOLDS_GRAPH_MEMORY.set(false);
        }
    }
}

/// Graph captures and trims, one at a time in the whole process (a thread that holds it already,
/// such as a capture that trims the pool first, passes). A trim acts on the device's memory
/// pool and graph memory, which every model copy in the process shares, but each copy's graphs
/// have locks of their own: with 8 separate copies (`model-instance-id`), one copy's trim
/// before an eager step could run while another captured, and 2 runs of 15 ended on a capture
/// that failed with `CUDA_ERROR_INVALID_VALUE`, then a download that failed the same way
/// (H200; with this lock 14 of 14 passed). Steady-state frames take it nowhere.
pub fn exclusive_graph_memory() -> GraphMemoryGuard {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    if HOLDS_GRAPH_MEMORY.get() {
        return GraphMemoryGuard(None);
    }
    let guard = LOCK.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    HOLDS_GRAPH_MEMORY.set(true);
    GraphMemoryGuard(Some(guard))
}

/// Gives the memory of graphs that are neither running nor queued back to the driver
/// (`cuDeviceGraphMemTrim`).
fn trim_graph_memory(device: &Device) -> bool {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(cuda) = device {
        use candle_core::cuda_backend::cudarc::driver::sys;
        let Some(context) = bound_context(cuda) else { return false };
        // SAFETY: the device of the bound context.
        return unsafe { sys::cuDeviceGraphMemTrim(context.cu_device()) == sys::CUresult::CUDA_SUCCESS };
    }
    let _ = device;
    false
}

/// The device's CUDA context, bound to the calling thread (the driver calls below act on the
/// thread's current context).
#[cfg(feature = "cuda")]
fn bound_context(
    cuda: &candle_core::CudaDevice,
) -> Option<std::sync::Arc<candle_core::cuda_backend::cudarc::driver::CudaContext>> {
    let context = cuda.cuda_stream().context().clone();
    context.bind_to_thread().ok()?;
    Some(context)
}

/// The default memory pool of a CUDA device, its context bound to the calling thread.
#[cfg(feature = "cuda")]
struct DefaultPool {
    pool: candle_core::cuda_backend::cudarc::driver::sys::CUmemoryPool,
    /// Held while the pool is used: the pool belongs to the device of this context.
    _context: std::sync::Arc<candle_core::cuda_backend::cudarc::driver::CudaContext>,
}

#[cfg(feature = "cuda")]
impl DefaultPool {
    fn of(cuda: &candle_core::CudaDevice) -> Option<Self> {
        use candle_core::cuda_backend::cudarc::driver::sys;
        let context = bound_context(cuda)?;
        let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
        // SAFETY: writes the device's default pool handle into `pool`.
        let result = unsafe { sys::cuDeviceGetDefaultMemPool(&mut pool, context.cu_device()) };
        (result == sys::CUresult::CUDA_SUCCESS).then_some(Self { pool, _context: context })
    }

    fn attribute(&self, attr: candle_core::cuda_backend::cudarc::driver::sys::CUmemPool_attribute) -> Option<u64> {
        use candle_core::cuda_backend::cudarc::driver::sys;
        let mut bytes: u64 = 0;
        // SAFETY: the attributes read here are 64-bit values written into `bytes`.
        let result = unsafe { sys::cuMemPoolGetAttribute(self.pool, attr, &mut bytes as *mut u64 as *mut _) };
        (result == sys::CUresult::CUDA_SUCCESS).then_some(bytes)
    }

    fn set_zero(&self, attr: candle_core::cuda_backend::cudarc::driver::sys::CUmemPool_attribute) -> bool {
        use candle_core::cuda_backend::cudarc::driver::sys;
        let mut zero: u64 = 0;
        // SAFETY: a high-water mark attribute, reset with a 64-bit zero.
        unsafe {
            sys::cuMemPoolSetAttribute(self.pool, attr, &mut zero as *mut u64 as *mut _) == sys::CUresult::CUDA_SUCCESS
        }
    }
}

/// Free and total memory of CUDA device `ordinal` without opening a candle device (for
/// monitoring; it retains the device's primary context, which candle shares).
pub fn ordinal_memory_info(ordinal: usize) -> Result<MemoryInfo> {
    #[cfg(feature = "cuda")]
    {
        use candle_core::cuda_backend::cudarc::driver::CudaContext;
        let context = CudaContext::new(ordinal).map_err(|e| anyhow!("cannot open cuda:{ordinal}: {e:?}"))?;
        let (free, total) = context.mem_get_info().map_err(|e| anyhow!("cuMemGetInfo on cuda:{ordinal}: {e:?}"))?;
        Ok(MemoryInfo { free: free as u64, total: total as u64 })
    }
    #[cfg(not(feature = "cuda"))]
    Err(anyhow!("cuda:{ordinal}: this build has no CUDA support"))
}

/// The largest tensor and the memory floor of one frame at a processing size; see the module
/// docs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrameFootprint {
    pub width: usize,
    pub height: usize,
    /// Elements of the largest tensor.
    pub largest_elements: u64,
    /// What that tensor is, for messages.
    pub largest: String,
    /// Bytes one frame needs at least, beyond the loaded weights (an estimate).
    pub floor_bytes: u64,
}

impl FrameFootprint {
    /// For a frame of `width` x `height` through `vae` with activations in `dtype`.
    pub fn of(vae: &VaeConfig, dtype: DType, width: usize, height: usize) -> Self {
        // Pixels at level l (sides halved l times).
        let at = |l: usize| (width >> l) as u64 * (height >> l) as u64;
        let (channels, level, attention_tokens) = match vae {
            VaeConfig::Kl(c) => {
                // Level l runs at (width >> l) x (height >> l): the encoder's block l and its
                // downsampled output, the decoder's block for level l and its input upsampled
                // from level l + 1 (with that block's channels).
                let bc = &c.block_out_channels;
                let (_, channels, level) = (0..bc.len())
                    .map(|l| {
                        let channels = bc[l].max(bc.get(l + 1).copied().unwrap_or(0)) as u64;
                        (channels * at(l), channels, l)
                    })
                    .max_by_key(|&(elements, _, l)| (elements, std::cmp::Reverse(l)))
                    .unwrap_or((0, 0, 0));
                (channels, level, Some(at(bc.len().saturating_sub(1))))
            }
            VaeConfig::Tiny(c) => {
                let first = c.encoder_block_out_channels.first().copied().unwrap_or(0);
                let last = c.decoder_block_out_channels.last().copied().unwrap_or(0);
                (first.max(last) as u64, 0, None)
            }
        };
        let largest_elements = channels * at(level);
        let largest = format!(
            "the VAE's {channels}-channel activation at {}x{}: {largest_elements} elements",
            width >> level,
            height >> level
        );
        // Scores and probabilities of one chunk of the attention, f32.
        let attention = attention_tokens.map_or(0, |n| 2 * 4 * (n.saturating_mul(n)).min(ATTENTION_CHUNK_SCORES));
        let floor_bytes = 3 * largest_elements * dtype.size_in_bytes() as u64 + attention;
        Self { width, height, largest_elements, largest, floor_bytes }
    }

    /// The error for a size beyond the kernels' indexing or the device's whole memory; `None`
    /// when neither applies. `memory`: the device's, when known.
    pub fn refusal(&self, device_name: &str, memory: Option<MemoryInfo>) -> Option<String> {
        let (w, h) = (self.width, self.height);
        let need =
            format!("one frame needs at least {} MiB beyond the loaded models (an estimate)", self.floor_bytes / MIB);
        let have = memory.map_or_else(String::new, |m| format!(", {device_name} has {m}"));
        if self.largest_elements > MAX_TENSOR_ELEMENTS {
            // The largest square size within the limit, at this tensor's channels per pixel.
            let per_pixel = self.largest_elements as f64 / (w as f64 * h as f64);
            let side = ((MAX_TENSOR_ELEMENTS as f64 / per_pixel).sqrt() as usize) / 8 * 8;
            return Some(format!(
                "processing size {w}x{h} is too large for CUDA: {} (more than the {MAX_TENSOR_ELEMENTS} elements \
                 candle's CUDA kernels can index); {need}{have}. Lower width/height (with this VAE at most about \
                 {side}x{side}, or the same number of pixels)",
                self.largest
            ));
        }
        if let Some(m) = memory
            && self.floor_bytes > m.total
        {
            return Some(format!(
                "processing size {w}x{h} does not fit in {device_name}'s memory: {need} ({}), {device_name} has {m}. \
                 Lower width/height",
                self.largest
            ));
        }
        None
    }
}

/// Refuses a processing size that cannot run on `device` (see the module docs) before any
/// work is queued; nothing to check on the CPU.
pub fn check_frame_size(vae: &VaeConfig, device: &Device, dtype: DType, width: usize, height: usize) -> Result<()> {
    if !device.is_cuda() {
        return Ok(());
    }
    let footprint = FrameFootprint::of(vae, dtype, width, height);
    match footprint.refusal(&device_name(device), memory_info(device)) {
        Some(message) => Err(anyhow!(message)),
        None => Ok(()),
    }
}

/// [`check_frame_size`] for a frame through `img2img` (its VAE and dtype) on `device`.
pub fn check_frame(img2img: &Img2Img, device: &Device, (width, height): (usize, usize)) -> Result<()> {
    check_frame_size(img2img.vae_config(), device, img2img.dtype(), width, height)
}

/// [`explain_failure`] for a frame through `img2img` on `device`.
pub fn explain(error: anyhow::Error, img2img: &Img2Img, device: &Device, size: (usize, usize)) -> anyhow::Error {
    explain_failure(error, img2img.vae_config(), device, img2img.dtype(), size)
}

/// Whether an error (anywhere in its chain) is the device running out of memory: the driver's
/// `CUDA_ERROR_OUT_OF_MEMORY`, cuBLAS's or cuDNN's failed allocation.
pub fn is_out_of_memory(error: &anyhow::Error) -> bool {
    error.chain().any(|cause| names_out_of_memory(&format!("{cause} {cause:?}")))
}

/// Whether an error's text is an out-of-memory error (see [`is_out_of_memory`]).
pub fn names_out_of_memory(text: &str) -> bool {
    ["CUDA_ERROR_OUT_OF_MEMORY", "out of memory", "ALLOC_FAILED"].iter().any(|marker| text.contains(marker))
}

/// An out-of-memory error of a frame at `width` x `height`, explained: the size, the device's
/// memory when it failed and the frame's estimated need, with the original error as its cause.
/// Any other error is returned as it is.
pub fn explain_failure(
    error: anyhow::Error,
    vae: &VaeConfig,
    device: &Device,
    dtype: DType,
    (width, height): (usize, usize),
) -> anyhow::Error {
    if !is_out_of_memory(&error) {
        return error;
    }
    // Not synchronized: the failed frame's memory, already freed to the pool, is still held
    // there, so this is close to what was free when the allocation failed.
    let memory = memory_info(device);
    let footprint = FrameFootprint::of(vae, dtype, width, height);
    error.context(out_of_memory_message(&footprint, &device_name(device), dtype, memory))
}

/// The text [`explain_failure`] adds.
pub fn out_of_memory_message(
    footprint: &FrameFootprint,
    device_name: &str,
    dtype: DType,
    memory: Option<MemoryInfo>,
) -> String {
    let (w, h) = (footprint.width, footprint.height);
    let when = memory.map_or_else(
        || format!("{device_name}'s free memory is unknown"),
        |m| format!("{device_name} had {m} when it failed"),
    );
    format!(
        "out of device memory at processing size {w}x{h} ({}): {when}; one frame at this size needs at least {} MiB \
         beyond the loaded models (an estimate: {}; the failed allocation's size is not reported by the driver). \
         Lower width/height, or free device memory (other elements, streams or processes on the device)",
        dtype.as_str(),
        footprint.floor_bytes / MIB,
        footprint.largest
    )
}

/// `cuda:N` for a CUDA device, `cpu` otherwise.
pub fn device_name(device: &Device) -> String {
    match device.location() {
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        _ => "cpu".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::sd15;

    /// One thread at a time holds the graph memory; the holder takes it again without waiting
    /// for itself (a capture trims the pool first), and the others get it when the outer
    /// guard goes.
    #[test]
    fn graph_memory_is_held_by_one_thread_at_a_time_and_its_holder_passes() {
        use std::sync::mpsc;
        use std::time::Duration;
        let outer = exclusive_graph_memory();
        let inner = exclusive_graph_memory();
        let (tx, rx) = mpsc::channel();
        let other = std::thread::spawn(move || {
            let _held = exclusive_graph_memory();
            tx.send(()).unwrap();
        });
        assert!(rx.recv_timeout(Duration::from_millis(200)).is_err(), "another thread got it while held");
        drop(inner);
        assert!(rx.recv_timeout(Duration::from_millis(200)).is_err(), "the inner guard released it");
        drop(outer);
        rx.recv_timeout(Duration::from_secs(10)).expect("the other thread gets it once released");
        other.join().unwrap();
        // Released: this thread takes it again.
        drop(exclusive_graph_memory());
    }

    fn kl() -> VaeConfig {
        VaeConfig::Kl(sd15::vae_config().unwrap())
    }

    fn tiny() -> VaeConfig {
        VaeConfig::Tiny(sd15::taesd_config().unwrap())
    }

    const H200: MemoryInfo = MemoryInfo { free: 140_000 * MIB, total: 143_771 * MIB };

    #[test]
    fn the_largest_tensor_is_the_kl_decoders_upsampled_input() {
        // SD1.5's VAE: 256 channels upsampled to full resolution before its last block.
        let f = FrameFootprint::of(&kl(), DType::F16, 512, 512);
        assert_eq!(f.largest_elements, 256 * 512 * 512);
        assert!(f.largest.contains("256-channel activation at 512x512"), "{}", f.largest);
        // 3 x 128 MiB of f16 activations + 2 x 64 MiB of f32 attention (4096 tokens).
        assert_eq!(f.floor_bytes, 3 * 256 * 512 * 512 * 2 + 8 * 4096 * 4096);
        let t = FrameFootprint::of(&tiny(), DType::F16, 512, 512);
        assert_eq!(t.largest_elements, 64 * 512 * 512);
        assert_eq!(t.floor_bytes, 3 * 64 * 512 * 512 * 2);
    }

    #[test]
    fn sizes_beyond_the_kernels_indexing_are_refused_with_the_size_and_memory() {
        assert_eq!(FrameFootprint::of(&kl(), DType::F16, 512, 512).refusal("cuda:0", Some(H200)), None);
        assert_eq!(FrameFootprint::of(&kl(), DType::F16, 2048, 2048).refusal("cuda:0", Some(H200)), None);
        let message = FrameFootprint::of(&kl(), DType::F16, 8192, 8192).refusal("cuda:0", Some(H200)).unwrap();
        for part in [
            "processing size 8192x8192 is too large for CUDA",
            "256-channel activation at 8192x8192: 17179869184 elements",
            "2147483647",
            "cuda:0 has 140000 MiB free of 143771 MiB",
            "needs at least 106496 MiB",
            "at most about 2896x2896",
        ] {
            assert!(message.contains(part), "{part:?} is not in {message}");
        }
        // The tiny VAE's widest stage has 64 channels: 8192x8192 is still too large, 4096x4096 not.
        assert!(FrameFootprint::of(&tiny(), DType::F16, 8192, 8192).refusal("cuda:0", None).is_some());
        assert_eq!(FrameFootprint::of(&tiny(), DType::F16, 4096, 4096).refusal("cuda:0", None), None);
    }

    #[test]
    fn sizes_beyond_the_whole_device_are_refused() {
        let small = MemoryInfo { free: 1000 * MIB, total: 2048 * MIB };
        let message = FrameFootprint::of(&kl(), DType::F32, 1024, 1024).refusal("cuda:1", Some(small)).unwrap();
        assert!(message.contains("processing size 1024x1024 does not fit in cuda:1's memory"), "{message}");
        // 3 x 256 M f32 activations (3072 MiB) + 2 x 256 M f32 attention scores (2048 MiB).
        assert!(message.contains("needs at least 5120 MiB"), "{message}");
        assert!(message.contains("cuda:1 has 1000 MiB free of 2048 MiB"), "{message}");
        // Unknown memory: only the indexing limit applies.
        assert_eq!(FrameFootprint::of(&kl(), DType::F32, 1024, 1024).refusal("cuda:1", None), None);
    }

    #[test]
    fn out_of_memory_errors_are_recognised_and_explained() {
        // What candle's CUDA backend reports when cuMemAllocAsync fails.
        let driver = anyhow!("DriverError(CUDA_ERROR_OUT_OF_MEMORY, \"out of memory\")").context("vae decode");
        assert!(is_out_of_memory(&driver));
        assert!(is_out_of_memory(&anyhow!("CublasError(CUBLAS_STATUS_ALLOC_FAILED)")));
        assert!(!is_out_of_memory(&anyhow!("DriverError(CUDA_ERROR_ILLEGAL_ADDRESS, \"an illegal memory access\")")));
        // On the CPU no memory is known, and an unrelated error passes unchanged.
        let kept = explain_failure(anyhow!("shape mismatch"), &kl(), &Device::Cpu, DType::F32, (64, 64));
        assert_eq!(format!("{kept:#}"), "shape mismatch");
        let explained = explain_failure(driver, &kl(), &Device::Cpu, DType::F16, (2048, 1024));
        let text = format!("{explained:#}");
        assert!(text.starts_with("out of device memory at processing size 2048x1024 (f16)"), "{text}");
        assert!(text.contains("cpu's free memory is unknown"), "{text}");
        assert!(text.ends_with("vae decode: DriverError(CUDA_ERROR_OUT_OF_MEMORY, \"out of memory\")"), "{text}");
        let footprint = FrameFootprint::of(&kl(), DType::F16, 2048, 1024);
        let message = out_of_memory_message(&footprint, "cuda:0", DType::F16, Some(H200));
        assert!(message.contains("cuda:0 had 140000 MiB free of 143771 MiB when it failed"), "{message}");
        assert!(message.contains(&format!("needs at least {} MiB", footprint.floor_bytes / MIB)), "{message}");
        assert!(message.contains("an estimate"), "{message}");
    }
}
