//! The VAE's own CUDA stream: a second candle device on the same GPU (the same primary
//! context, its own stream), so that a session's VAE encoding (and control-image embedding)
//! of frame N+1 and decoding of frame N (with the scaling back and the download) run beside
//! the UNet's denoising instead of before and after it on one stream. `SDCROSSFRAME_VAE_STREAM=off` ([`super::switches`])
//! keeps everything on the one stream; the CPU has no second device (nothing changes there).
//!
//! Ordering is explicit: candle's device opened by ordinal (the UNet's) runs on the
//! per-thread default stream of a context object that never leaves cudarc's single-stream
//! mode, so cudarc's own event tracking does not order it against the VAE stream; and on the
//! VAE stream that tracking is switched off before anything is allocated there, because its
//! waits on events recorded outside a capture would break the VAE's CUDA graph captures.
//! Tensors cross between the two only through [`transfer`]: the destination's stream waits
//! for the source's (for an event recorded when the source was ready, or now), copies, and the
//! source's stream waits for the copy, so memory the source stream frees later (stream-ordered
//! frees) is never reused under the copy.

use anyhow::Result;
use candle_core::{Device, Tensor};

/// Opens the VAE stream's device beside `device` (a CUDA device): `None` on the CPU, when the
/// switch is off, or in a build without CUDA.
pub fn open(device: &Device) -> Result<Option<Device>> {
    if !device.is_cuda() || !super::switches::switches().vae_stream {
        return Ok(None);
    }
    imp::open(device)
}

/// A point in a device's queued work: the project's one cross-stream event type.
pub use super::step_graphs::Fence as StreamPoint;

/// `tensor` on `to`, copied on `to`'s stream after `ready` (a point recorded on `tensor`'s
/// device when it was ready; `None`: everything queued there so far). `tensor`'s stream then
/// waits for the copy (see the module docs). On one device (or the CPU) it is
/// [`Tensor::to_device`].
pub fn transfer(tensor: &Tensor, to: &Device, ready: Option<&StreamPoint>) -> Result<Tensor> {
    if tensor.device().same_device(to) {
        return Ok(tensor.clone());
    }
    imp::transfer(tensor, to, ready)
}

#[cfg(feature = "cuda")]
mod imp {
    use anyhow::{Context, Result};
    use candle_core::cuda_backend::CudaDevice;
    use candle_core::{Device, Tensor};

    use super::StreamPoint;

    pub fn open(device: &Device) -> Result<Option<Device>> {
        let candle_core::DeviceLocation::Cuda { gpu_id } = device.location() else { return Ok(None) };
        let aux = CudaDevice::new_with_stream(gpu_id)
            .with_context(|| format!("cannot open a second stream on cuda:{gpu_id} for the VAE"))?;
        // SAFETY: nothing is allocated on this device yet; every use of its tensors is on its
        // own stream, and tensors cross to or from another stream only through `transfer`,
        // which orders both streams with events (see the module docs).
        unsafe { aux.disable_event_tracking() };
        Ok(Some(Device::Cuda(aux)))
    }

    pub fn transfer(tensor: &Tensor, to: &Device, ready: Option<&StreamPoint>) -> Result<Tensor> {
        let from = tensor.device();
        if !(from.is_cuda() && to.is_cuda()) {
            return Ok(tensor.to_device(to)?);
        }
        let now;
        let ready = match ready {
            Some(point) => point,
            None => {
                now = StreamPoint::recorded(from)?;
                &now
            }
        };
        ready.wait(to)?;
        // candle copies the whole storage on the destination's stream, keeping the layout.
        let copied = tensor.to_device(to)?;
        StreamPoint::recorded(to)?.wait(from)?;
        Ok(copied)
    }
}

#[cfg(not(feature = "cuda"))]
mod imp {
    use anyhow::Result;
    use candle_core::{Device, Tensor};

    use super::StreamPoint;

    pub fn open(_device: &Device) -> Result<Option<Device>> {
        Ok(None)
    }

    pub fn transfer(tensor: &Tensor, to: &Device, _ready: Option<&StreamPoint>) -> Result<Tensor> {
        Ok(tensor.to_device(to)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The CPU has no second stream: nothing opens, and a transfer to the same device is the
    /// tensor itself.
    #[test]
    fn the_cpu_has_no_vae_stream() {
        assert!(open(&Device::Cpu).unwrap().is_none());
        let t = Tensor::arange(0f32, 6., &Device::Cpu).unwrap();
        let same = transfer(&t, &Device::Cpu, Some(&StreamPoint::recorded(&Device::Cpu).unwrap())).unwrap();
        assert_eq!(same.to_vec1::<f32>().unwrap(), t.to_vec1::<f32>().unwrap());
        assert!(same.is_contiguous());
    }
}
