//! Tensors kept in host memory between uses, and the copies that bring them to the device and
//! back beside the computation: the cross-frame store's `host` location
//! ([`crate::cross_frame::StoreLocation`]) keeps every step's entries here and only the entries
//! of the call in progress on the device.
//!
//! On CUDA a [`HostTensor`] is a range of page-locked memory (a [`HostArena`] hands out ranges
//! of large chunks: one page-locking call per 64 MiB, not one per entry), and a [`CopyStream`]
//! queues the copies on a CUDA stream of its own. [`CopyStream::fork`] makes the copy stream
//! wait for what the calling thread has queued on the device so far, [`CopyStream::join`]
//! makes the calling thread's stream wait for the copies queued so far. Both are event records
//! and waits, so inside a CUDA graph capture they become the graph's edges: the copies are
//! memcpy nodes running on the copy engines beside the kernels, and a replay moves the same
//! host ranges again. On the CPU a host tensor is a CPU tensor and a copy is a plain copy.

use anyhow::{Result, bail};
use candle_core::{DType, Device, Shape, Tensor};

/// Page-locked chunks are this large (ranges are handed out of them until one is full).
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
const CHUNK_BYTES: usize = 64 << 20;

/// A tensor's values in host memory: page-locked on CUDA (so copies are asynchronous and can
/// be captured), a CPU tensor otherwise.
pub struct HostTensor {
    shape: Shape,
    dtype: DType,
    place: Place,
}

enum Place {
    Cpu(Tensor),
    #[cfg(feature = "cuda")]
    Pinned(imp::PinnedRange),
}

impl HostTensor {
    pub fn shape(&self) -> &Shape {
        &self.shape
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn bytes(&self) -> usize {
        self.shape.elem_count() * self.dtype.size_in_bytes()
    }
}

/// Hands out host tensors shaped like device tensors; on CUDA out of page-locked chunks,
/// freed (after the device is done with them) when the arena and every tensor it handed out
/// are dropped.
#[derive(Default)]
pub struct HostArena {
    #[cfg(feature = "cuda")]
    chunks: imp::Chunks,
}

impl HostArena {
    /// Host memory for a tensor shaped like `like` (its values are not copied).
    pub fn alloc_like(&mut self, like: &Tensor) -> Result<HostTensor> {
        let (shape, dtype) = (like.shape().clone(), like.dtype());
        let place = match like.device() {
            #[cfg(feature = "cuda")]
            Device::Cuda(cuda) => Place::Pinned(self.chunks.alloc(cuda, shape.elem_count() * dtype.size_in_bytes())?),
            _ => Place::Cpu(Tensor::zeros(&shape, dtype, &Device::Cpu)?),
        };
        Ok(HostTensor { shape, dtype, place })
    }
}

/// Copies between host tensors and device tensors, queued beside the computation (see the
/// module docs). Opens its CUDA stream on first use, so making one costs nothing.
#[derive(Default)]
pub struct CopyStream {
    #[cfg(feature = "cuda")]
    cuda: Option<imp::RawCopyStream>,
}

impl CopyStream {
    /// The copies queued after this wait for the work the calling thread has queued on `device`.
    pub fn fork(&mut self, device: &Device) -> Result<()> {
        #[cfg(feature = "cuda")]
        if let Device::Cuda(cuda) = device {
            return self.open(cuda)?.fork(cuda);
        }
        let _ = device;
        Ok(())
    }

    /// The calling thread's work on `device` queued after this waits for the copies queued so far.
    pub fn join(&mut self, device: &Device) -> Result<()> {
        #[cfg(feature = "cuda")]
        if let (Device::Cuda(cuda), Some(stream)) = (device, &self.cuda) {
            return stream.join(cuda);
        }
        let _ = device;
        Ok(())
    }

    /// `dst` (a contiguous device tensor of `src`'s shape and dtype) takes `src`'s values.
    pub fn upload(&mut self, src: &HostTensor, dst: &Tensor) -> Result<()> {
        check_pair(src, dst)?;
        match &src.place {
            Place::Cpu(values) => Ok(dst.slice_set(&values.to_device(dst.device())?, 0, 0)?),
            #[cfg(feature = "cuda")]
            Place::Pinned(range) => {
                let Device::Cuda(cuda) = dst.device() else { bail!("a page-locked host tensor uploads to CUDA only") };
                self.open(cuda)?.upload(range, dst)
            }
        }
    }

    /// `dst` takes the values of `src` (a contiguous device tensor of its shape and dtype).
    pub fn download(&mut self, src: &Tensor, dst: &mut HostTensor) -> Result<()> {
        check_pair(dst, src)?;
        match &mut dst.place {
            Place::Cpu(values) => Ok(values.slice_set(&src.to_device(&Device::Cpu)?, 0, 0)?),
            #[cfg(feature = "cuda")]
            Place::Pinned(range) => {
                let Device::Cuda(cuda) = src.device() else {
                    bail!("a page-locked host tensor downloads from CUDA only")
                };
                self.open(cuda)?.download(src, range)
            }
        }
    }

    #[cfg(feature = "cuda")]
    fn open(&mut self, cuda: &candle_core::CudaDevice) -> Result<&imp::RawCopyStream> {
        if self.cuda.is_none() {
            self.cuda = Some(imp::RawCopyStream::new(cuda)?);
        }
        Ok(self.cuda.as_ref().expect("opened above"))
    }
}

fn check_pair(host: &HostTensor, device: &Tensor) -> Result<()> {
    if host.shape() != device.shape() || host.dtype() != device.dtype() {
        bail!(
            "host copy of {:?} {:?} paired with a device tensor of {:?} {:?}",
            host.shape(),
            host.dtype(),
            device.shape(),
            device.dtype()
        );
    }
    if !device.is_contiguous() {
        bail!("host copies need a contiguous device tensor");
    }
    Ok(())
}

#[cfg(feature = "cuda")]
mod imp {
    use std::sync::Arc;

    use anyhow::{Context, Result, anyhow, bail};
    use candle_core::cuda_backend::cudarc::driver::{CudaContext, DevicePtr, result, sys};
    use candle_core::{CudaDevice, DType, Storage, Tensor};

    use super::CHUNK_BYTES;

    /// One page-locked allocation. Dropped only when no range of it is left; the device is
    /// synchronized first, since a queued or captured copy may still use it.
    struct PinnedChunk {
        ptr: *mut u8,
        bytes: usize,
        ctx: Arc<CudaContext>,
    }

    // SAFETY: the pointer is host memory owned by this chunk; the device reads and writes it
    // only through copies ordered by events, and the host never touches it while copies may
    // run (`to_tensor` synchronizes first).
    unsafe impl Send for PinnedChunk {}
    unsafe impl Sync for PinnedChunk {}

    impl Drop for PinnedChunk {
        fn drop(&mut self) {
            // SAFETY: `ptr` came from `malloc_host` in this context and is freed once, after
            // every stream of the context (graph launches included) is done with it.
            let freed = self
                .ctx
                .bind_to_thread()
                .and_then(|_| self.ctx.synchronize())
                .and_then(|_| unsafe { result::free_host(self.ptr.cast()) });
            if let Err(e) = freed {
                tracing::warn!("freeing {} bytes of page-locked memory failed: {e:?}", self.bytes);
            }
        }
    }

    /// A range of a chunk.
    pub struct PinnedRange {
        chunk: Arc<PinnedChunk>,
        offset: usize,
        bytes: usize,
    }

    impl PinnedRange {
        fn ptr(&self) -> *mut u8 {
            // SAFETY: the range lies inside the chunk (checked when handed out).
            unsafe { self.chunk.ptr.add(self.offset) }
        }
    }

    #[derive(Default)]
    pub struct Chunks {
        chunks: Vec<Arc<PinnedChunk>>,
        /// Bytes handed out of the last chunk.
        used: usize,
    }

    impl Chunks {
        pub fn alloc(&mut self, cuda: &CudaDevice, bytes: usize) -> Result<PinnedRange> {
            const ALIGN: usize = 256;
            let fits = self.chunks.last().is_some_and(|c| self.used.next_multiple_of(ALIGN) + bytes <= c.bytes);
            if !fits {
                let ctx = cuda.cuda_stream().context().clone();
                let size = bytes.max(CHUNK_BYTES);
                ctx.bind_to_thread().map_err(|e| anyhow!("binding the CUDA context: {e:?}"))?;
                // SAFETY: a fresh allocation, zeroed below before any range of it is read.
                let ptr = unsafe { result::malloc_host(size, 0) }
                    .map_err(|e| anyhow!("{e:?}"))
                    .with_context(|| format!("cannot page-lock {} MiB of host memory", size >> 20))?
                    .cast::<u8>();
                // SAFETY: `ptr` points to `size` writable bytes.
                unsafe { std::ptr::write_bytes(ptr, 0, size) };
                self.chunks.push(Arc::new(PinnedChunk { ptr, bytes: size, ctx }));
                self.used = 0;
            }
            let chunk = self.chunks.last().expect("a chunk was made above").clone();
            let offset = self.used.next_multiple_of(ALIGN);
            self.used = offset + bytes;
            Ok(PinnedRange { chunk, offset, bytes })
        }
    }

    /// A CUDA stream of its own and the two events that order it against the calling thread's.
    pub struct RawCopyStream {
        ctx: Arc<CudaContext>,
        stream: sys::CUstream,
        forked: sys::CUevent,
        copied: sys::CUevent,
    }

    // SAFETY: the handles belong to the context, not to a thread; the context is bound before
    // every use, and the owner (a cross-frame store) is used by one thread at a time.
    unsafe impl Send for RawCopyStream {}

    impl RawCopyStream {
        pub fn new(cuda: &CudaDevice) -> Result<Self> {
            let ctx = cuda.cuda_stream().context().clone();
            ctx.bind_to_thread().map_err(|e| anyhow!("binding the CUDA context: {e:?}"))?;
            let stream = result::stream::create(result::stream::StreamKind::NonBlocking)
                .map_err(|e| anyhow!("cuStreamCreate for host copies: {e:?}"))?;
            let flags = sys::CUevent_flags::CU_EVENT_DISABLE_TIMING;
            let forked = result::event::create(flags).map_err(|e| anyhow!("cuEventCreate: {e:?}"))?;
            let copied = result::event::create(flags).map_err(|e| anyhow!("cuEventCreate: {e:?}"))?;
            Ok(Self { ctx, stream, forked, copied })
        }

        fn bind(&self) -> Result<()> {
            self.ctx.bind_to_thread().map_err(|e| anyhow!("binding the CUDA context: {e:?}"))
        }

        pub fn fork(&self, cuda: &CudaDevice) -> Result<()> {
            self.bind()?;
            let compute = cuda.cuda_stream().cu_stream();
            // SAFETY: live handles of this context; a record then a wait orders the streams
            // (under capture: the copy stream joins the capture).
            unsafe {
                result::event::record(self.forked, compute).map_err(|e| anyhow!("cuEventRecord: {e:?}"))?;
                result::stream::wait_event(self.stream, self.forked, sys::CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT)
                    .map_err(|e| anyhow!("cuStreamWaitEvent: {e:?}"))
            }
        }

        pub fn join(&self, cuda: &CudaDevice) -> Result<()> {
            self.bind()?;
            let compute = cuda.cuda_stream().cu_stream();
            // SAFETY: as in `fork`, the other way round.
            unsafe {
                result::event::record(self.copied, self.stream).map_err(|e| anyhow!("cuEventRecord: {e:?}"))?;
                result::stream::wait_event(compute, self.copied, sys::CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT)
                    .map_err(|e| anyhow!("cuStreamWaitEvent: {e:?}"))
            }
        }

        pub fn upload(&self, src: &PinnedRange, dst: &Tensor) -> Result<()> {
            let (ptr, bytes) = device_range(dst)?;
            if bytes != src.bytes {
                bail!("upload of {} bytes into {bytes}", src.bytes);
            }
            self.bind()?;
            // SAFETY: `src` is page-locked and lives at least as long as any copy of it (its
            // chunk synchronizes the device before it is freed); `ptr` addresses `bytes` bytes
            // of `dst`, which the caller keeps alive until the copies are joined.
            unsafe {
                sys::cuMemcpyHtoDAsync_v2(ptr, src.ptr().cast(), bytes, self.stream)
                    .result()
                    .map_err(|e| anyhow!("cuMemcpyHtoDAsync: {e:?}"))
            }
        }

        pub fn download(&self, src: &Tensor, dst: &PinnedRange) -> Result<()> {
            let (ptr, bytes) = device_range(src)?;
            if bytes != dst.bytes {
                bail!("download of {bytes} bytes into {}", dst.bytes);
            }
            self.bind()?;
            // SAFETY: as in `upload`, the other way round.
            unsafe {
                sys::cuMemcpyDtoHAsync_v2(dst.ptr().cast(), ptr, bytes, self.stream)
                    .result()
                    .map_err(|e| anyhow!("cuMemcpyDtoHAsync: {e:?}"))
            }
        }
    }

    impl Drop for RawCopyStream {
        fn drop(&mut self) {
            let _ = self.bind();
            // SAFETY: handles created in `new`, destroyed once; queued copies finish first.
            unsafe {
                let _ = result::stream::synchronize(self.stream);
                let _ = result::event::destroy(self.forked);
                let _ = result::event::destroy(self.copied);
                let _ = result::stream::destroy(self.stream);
            }
        }
    }

    /// The device address and byte length of a contiguous CUDA tensor's elements.
    fn device_range(t: &Tensor) -> Result<(sys::CUdeviceptr, usize)> {
        let (storage, layout) = t.storage_and_layout();
        let Storage::Cuda(s) = &*storage else { bail!("host copies need a CUDA tensor") };
        let Some((start, end)) = layout.contiguous_offsets() else { bail!("host copies need a contiguous tensor") };
        let size = t.dtype().size_in_bytes();
        macro_rules! base {
            ($t:ty) => {{
                let slice = s.as_cuda_slice::<$t>()?;
                let (ptr, _sync) = slice.device_ptr(slice.stream());
                ptr
            }};
        }
        let base = match t.dtype() {
            DType::F16 => base!(half::f16),
            DType::BF16 => base!(half::bf16),
            DType::F32 => base!(f32),
            other => bail!("host copies of {other:?} tensors are not supported"),
        };
        Ok((base + (start * size) as u64, (end - start) * size))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// On the CPU a round trip through host memory keeps the values, and shapes must match.
    #[test]
    fn cpu_round_trip() {
        let device = Device::Cpu;
        let values = Tensor::arange(0f32, 24., &device).unwrap().reshape((2, 3, 4)).unwrap();
        let mut arena = HostArena::default();
        let mut host = arena.alloc_like(&values).unwrap();
        let mut copies = CopyStream::default();
        copies.fork(&device).unwrap();
        copies.download(&values, &mut host).unwrap();
        let back = Tensor::zeros((2, 3, 4), DType::F32, &device).unwrap();
        copies.upload(&host, &back).unwrap();
        copies.join(&device).unwrap();
        assert_eq!(
            back.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            (0..24).map(|v| v as f32).collect::<Vec<_>>()
        );
        let wrong = Tensor::zeros((3, 2, 4), DType::F32, &device).unwrap();
        let err = copies.upload(&host, &wrong).unwrap_err().to_string();
        assert!(err.contains("[2, 3, 4]") && err.contains("[3, 2, 4]"), "{err}");
    }
}
