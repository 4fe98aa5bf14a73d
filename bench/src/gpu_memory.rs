//! Device memory: on CUDA the high-water mark of the device's default memory pool (candle
//! allocates every tensor from it), and the device's used memory (all processes, CUDA contexts
//! included) from cuMemGetInfo.

/// Device memory by holder (see `Probe::breakdown`), bytes.
#[derive(Debug, Clone, Copy, Default)]
pub struct Breakdown {
    /// Tensors allocated from the default pool now.
    pub tensors: u64,
    /// What the pool holds, live tensors included.
    pub pool_reserved: u64,
    /// Physical memory reserved for CUDA graphs' allocations.
    pub graphs: u64,
    /// Of it, what is associated with graphs now (the rest is cached for them).
    pub graphs_used: u64,
}

#[cfg(feature = "cuda")]
mod imp {
    use candle_core::Device;
    use candle_core::cuda_backend::cudarc::driver::sys;

    pub struct Probe {
        pool: sys::CUmemoryPool,
        ctx: std::sync::Arc<candle_core::cuda_backend::cudarc::driver::CudaContext>,
        device: Device,
    }

    fn check(r: sys::CUresult, what: &str) -> anyhow::Result<()> {
        if r != sys::CUresult::CUDA_SUCCESS {
            anyhow::bail!("{what} failed: {r:?}");
        }
        Ok(())
    }

    impl Probe {
        pub fn new(device: &Device) -> anyhow::Result<Option<Self>> {
            let Device::Cuda(dev) = device else { return Ok(None) };
            let stream = dev.cuda_stream();
            let ctx = stream.context().clone();
            ctx.bind_to_thread()?;
            let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
            check(unsafe { sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device()) }, "cuDeviceGetDefaultMemPool")?;
            Ok(Some(Self { pool, ctx, device: device.clone() }))
        }

        /// Starts a new high-water mark at the memory in use now.
        pub fn reset_peak(&self) -> anyhow::Result<()> {
            self.ctx.bind_to_thread()?;
            let mut zero: u64 = 0;
            check(
                unsafe {
                    sys::cuMemPoolSetAttribute(
                        self.pool,
                        sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
                        &mut zero as *mut u64 as *mut _,
                    )
                },
                "cuMemPoolSetAttribute(USED_MEM_HIGH)",
            )
        }

        fn pool_attr(&self, attr: sys::CUmemPool_attribute) -> anyhow::Result<u64> {
            self.ctx.bind_to_thread()?;
            let mut v: u64 = 0;
            check(
                unsafe { sys::cuMemPoolGetAttribute(self.pool, attr, &mut v as *mut u64 as *mut _) },
                "cuMemPoolGetAttribute",
            )?;
            Ok(v)
        }

        /// Peak bytes allocated from the pool since the last reset.
        pub fn peak(&self) -> anyhow::Result<u64> {
            self.pool_attr(sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH)
        }

        /// Bytes allocated from the pool now.
        pub fn current(&self) -> anyhow::Result<u64> {
            self.pool_attr(sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_CURRENT)
        }

        /// Where the device memory is now: the pool's live tensors and what it holds in
        /// reserve, and the physical memory CUDA graphs hold for their allocations (captured
        /// steps and stages), in bytes.
        pub fn breakdown(&self) -> anyhow::Result<super::Breakdown> {
            let tensors = self.current()?;
            let pool_reserved = self.pool_attr(sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RESERVED_MEM_CURRENT)?;
            let graph_memory = sdcrossframe::gpu_memory::graph_memory(&self.device)
                .ok_or_else(|| anyhow::anyhow!("cuDeviceGetGraphMemAttribute failed"))?;
            let (graphs, graphs_used) = (graph_memory.reserved, graph_memory.used);
            Ok(super::Breakdown { tensors, pool_reserved, graphs, graphs_used })
        }

        /// Releases what the pool and the graphs' memory hold unused back to the driver
        /// (cuMemPoolTrimTo to 0, cuDeviceGraphMemTrim; idle graphs map theirs again at their
        /// next launch): a breakdown after this tells memory in use from a cache.
        pub fn trim(&self) -> anyhow::Result<()> {
            self.ctx.bind_to_thread()?;
            check(unsafe { sys::cuMemPoolTrimTo(self.pool, 0) }, "cuMemPoolTrimTo")?;
            check(unsafe { sys::cuDeviceGraphMemTrim(self.ctx.cu_device()) }, "cuDeviceGraphMemTrim")
        }

        /// (used, total) device memory.
        pub fn device_used(&self) -> anyhow::Result<(u64, u64)> {
            let (free, total) = self.ctx.mem_get_info()?;
            Ok(((total - free) as u64, total as u64))
        }
    }
}

#[cfg(not(feature = "cuda"))]
mod imp {
    use candle_core::Device;

    pub struct Probe;

    impl Probe {
        pub fn new(_device: &Device) -> anyhow::Result<Option<Self>> {
            Ok(None)
        }
        pub fn reset_peak(&self) -> anyhow::Result<()> {
            Ok(())
        }
        pub fn peak(&self) -> anyhow::Result<u64> {
            Ok(0)
        }
        pub fn current(&self) -> anyhow::Result<u64> {
            Ok(0)
        }
        pub fn device_used(&self) -> anyhow::Result<(u64, u64)> {
            Ok((0, 0))
        }
        pub fn breakdown(&self) -> anyhow::Result<super::Breakdown> {
            Ok(super::Breakdown::default())
        }
        pub fn trim(&self) -> anyhow::Result<()> {
            Ok(())
        }
    }
}

pub use imp::Probe;
