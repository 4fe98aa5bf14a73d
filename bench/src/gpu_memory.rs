//! Device memory: on CUDA the high-water mark of the device's default memory pool (candle
//! allocates every tensor from it), and the device's used memory (all processes, CUDA contexts
//! included) from cuMemGetInfo.

#[cfg(feature = "cuda")]
mod imp {
    use candle_core::Device;
    use candle_core::cuda_backend::cudarc::driver::sys;

    pub struct Probe {
        pool: sys::CUmemoryPool,
        ctx: std::sync::Arc<candle_core::cuda_backend::cudarc::driver::CudaContext>,
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
            Ok(Some(Self { pool, ctx }))
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
    }
}

pub use imp::Probe;
