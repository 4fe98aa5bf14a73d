//! Device memory: on CUDA the high-water mark of the device's default memory pool (candle
//! allocates every tensor from it), and the device's used memory (all processes, CUDA contexts
//! included) from cuMemGetInfo. The readings are the engine's (`sdcrossframe::gpu_memory`).

use anyhow::{Context, Result};
use candle_core::Device;
use sdcrossframe::gpu_memory;

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

/// Reads a CUDA device's memory; there is none on other devices.
pub struct Probe {
    device: Device,
}

impl Probe {
    pub fn new(device: &Device) -> Result<Option<Self>> {
        if !device.is_cuda() {
            return Ok(None);
        }
        gpu_memory::pool_memory(device).context("cannot read the CUDA device's default memory pool")?;
        Ok(Some(Self { device: device.clone() }))
    }

    fn pool(&self) -> Result<gpu_memory::PoolMemory> {
        gpu_memory::pool_memory(&self.device).context("cuMemPoolGetAttribute failed")
    }

    /// Starts a new high-water mark at the memory in use now.
    pub fn reset_peak(&self) -> Result<()> {
        anyhow::ensure!(gpu_memory::reset_pool_peak(&self.device), "cuMemPoolSetAttribute(USED_MEM_HIGH) failed");
        Ok(())
    }

    /// Peak bytes allocated from the pool since the last reset.
    pub fn peak(&self) -> Result<u64> {
        Ok(self.pool()?.used_high)
    }

    /// Bytes allocated from the pool now.
    pub fn current(&self) -> Result<u64> {
        Ok(self.pool()?.used)
    }

    /// Where the device memory is now: the pool's live tensors and what it holds in reserve,
    /// and the physical memory CUDA graphs hold for their allocations (captured steps and
    /// stages), in bytes.
    pub fn breakdown(&self) -> Result<Breakdown> {
        let pool = self.pool()?;
        let graphs = gpu_memory::graph_memory(&self.device).context("cuDeviceGetGraphMemAttribute failed")?;
        Ok(Breakdown {
            tensors: pool.used,
            pool_reserved: pool.reserved,
            graphs: graphs.reserved,
            graphs_used: graphs.used,
        })
    }

    /// Releases what the pool and the graphs' memory hold unused back to the driver: a
    /// breakdown after this tells memory in use from a cache.
    pub fn trim(&self) -> Result<()> {
        anyhow::ensure!(gpu_memory::trim(&self.device), "cuMemPoolTrimTo or cuDeviceGraphMemTrim failed");
        Ok(())
    }

    /// (used, total) device memory.
    pub fn device_used(&self) -> Result<(u64, u64)> {
        let info = gpu_memory::memory_info(&self.device).context("cuMemGetInfo failed")?;
        Ok((info.total - info.free, info.total))
    }
}
