//! Parsing the `device` and `dtype` settings shared by the CLI, the bench and the element.

use anyhow::{Context, Result, bail};
use candle_core::{DType, Device};

/// `cpu`, `cuda` (= `cuda:0`) or `cuda:N`; CUDA needs a build with the `cuda` feature and
/// device N on the machine (checked against the driver's count before opening it).
pub fn parse_device(spec: &str) -> Result<Device> {
    match parse_spec(spec)? {
        None => Ok(Device::Cpu),
        Some(ordinal) => {
            check_ordinal(spec, ordinal, cuda_device_count)?;
            Device::new_cuda(ordinal).with_context(|| format!("cannot open device {}", spec.trim()))
        }
    }
}

/// Checks a `device` setting without opening the device: its syntax, CUDA support in this
/// build and, for `cuda:N`, that the machine has device N (the driver's device count). The
/// element calls it at start, so a wrong device fails there instead of in the loader.
pub fn check_device(spec: &str) -> Result<()> {
    match parse_spec(spec)? {
        None => Ok(()),
        Some(ordinal) => check_ordinal(spec, ordinal, cuda_device_count),
    }
}

/// `None` for the CPU, the ordinal for CUDA.
fn parse_spec(spec: &str) -> Result<Option<usize>> {
    let s = spec.trim().to_ascii_lowercase();
    if s == "cpu" {
        return Ok(None);
    }
    let Some(ordinal) = s.strip_prefix("cuda") else {
        bail!("unknown device {spec:?}: expected cpu or cuda:N");
    };
    Ok(Some(match ordinal.strip_prefix(':') {
        Some(n) => n.parse::<usize>().with_context(|| format!("bad device {spec:?}: expected cuda:N"))?,
        None if ordinal.is_empty() => 0,
        None => bail!("bad device {spec:?}: expected cpu or cuda:N"),
    }))
}

/// The number of CUDA devices the driver sees (`cuDeviceGetCount`); an error in builds
/// without the `cuda` feature or when the driver cannot be initialised.
pub fn cuda_device_count() -> Result<usize> {
    #[cfg(feature = "cuda")]
    {
        use candle_core::cuda_backend::cudarc::driver::CudaContext;
        let count = CudaContext::device_count().map_err(|e| anyhow::anyhow!("cannot count CUDA devices: {e:?}"))?;
        Ok(count.max(0) as usize)
    }
    #[cfg(not(feature = "cuda"))]
    bail!("this build has no CUDA support; rebuild with --features cuda (scripts/build-cuda.sh)")
}

/// `cuda:ordinal` exists among the devices `count` reports; the error names the device, the
/// count and the devices there are.
fn check_ordinal(spec: &str, ordinal: usize, count: impl FnOnce() -> Result<usize>) -> Result<()> {
    let spec = spec.trim();
    let count = count().map_err(|e| anyhow::anyhow!("device {spec}: {e:#}"))?;
    if ordinal < count {
        return Ok(());
    }
    let there = match count {
        0 => "this machine has no CUDA device (the driver sees none)".to_string(),
        1 => "this machine has 1 CUDA device: cuda:0".to_string(),
        n => format!("this machine has {n} CUDA devices: cuda:0 to cuda:{}", n - 1),
    };
    bail!("device {spec} does not exist: {there}")
}

/// `f32`, `f16` or `bf16` (also `float32`, `float16`, `bfloat16`).
pub fn parse_dtype(spec: &str) -> Result<DType> {
    match spec.trim().to_ascii_lowercase().as_str() {
        "f32" | "float32" => Ok(DType::F32),
        "f16" | "float16" => Ok(DType::F16),
        "bf16" | "bfloat16" => Ok(DType::BF16),
        other => bail!("unknown dtype {other:?}: expected f32, f16 or bf16"),
    }
}

/// An error unless `device` can compute in `dtype`: candle's CPU backend has no bf16 matrix
/// multiplication (a bf16 model on the CPU would fail only at its first frame with
/// "unsupported dtype BF16 for op matmul"), so bf16 on the CPU is refused here, before any
/// weight is read. f16 runs on the CPU (slowly); f32 and f16 run everywhere.
pub fn check_dtype(device: &Device, dtype: DType) -> Result<()> {
    if device.is_cpu() && dtype == DType::BF16 {
        bail!(
            "dtype bf16 is not available on the CPU (candle's CPU backend has no bf16 matrix multiplication): \
             use f32 on the CPU, or bf16 on a CUDA device"
        );
    }
    Ok(())
}

/// The dtype to use when none is given: f32 on the CPU (no fast half-precision matmul
/// there), f16 on a GPU.
pub fn default_dtype(device: &Device) -> DType {
    if device.is_cpu() { DType::F32 } else { DType::F16 }
}

/// candle 0.11 works out its CPU thread count on every CPU operation, re-reading
/// /proc/cpuinfo each time unless `RAYON_NUM_THREADS` is set (about 11% of the tiny model's
/// CPU time in a perf profile). This sets `RAYON_NUM_THREADS` to that count once, when it is
/// not set already.
///
/// # Safety
/// Changes the process environment: call it at the start of `main`, before any other thread
/// exists (setting a variable while another thread reads the environment is undefined).
pub unsafe fn pin_cpu_thread_count() {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let threads = candle_core::utils::get_num_threads();
        // SAFETY: the caller guarantees no other thread is running.
        unsafe { std::env::set_var("RAYON_NUM_THREADS", threads.to_string()) };
    }
}

/// Times work queued on a device. On CUDA the device runs it after the call that queued it
/// returned, so the span is measured with events recorded on the device's stream before and
/// after it; on the CPU the work is done when queued, so it is wall time.
pub struct DeviceSpan {
    started: std::time::Instant,
    wall: Option<std::time::Duration>,
    #[cfg(feature = "cuda")]
    events: Option<(cuda_events::Event, Option<cuda_events::Event>)>,
}

impl DeviceSpan {
    /// Starts the span at the point the device's queued work has reached.
    pub fn start(device: &Device) -> Result<Self> {
        #[cfg(feature = "cuda")]
        let events = cuda_events::record(device)?.map(|start| (start, None));
        #[cfg(not(feature = "cuda"))]
        let _ = device;
        Ok(Self {
            started: std::time::Instant::now(),
            wall: None,
            #[cfg(feature = "cuda")]
            events,
        })
    }

    /// Ends the span after the work queued since `start`.
    pub fn end(&mut self, device: &Device) -> Result<()> {
        self.wall = Some(self.started.elapsed());
        #[cfg(feature = "cuda")]
        if let Some((_, end)) = &mut self.events {
            *end = cuda_events::record(device)?;
        }
        #[cfg(not(feature = "cuda"))]
        let _ = device;
        Ok(())
    }

    /// The span's length; on CUDA this waits until the device has run the work.
    pub fn elapsed(&self) -> Result<std::time::Duration> {
        #[cfg(feature = "cuda")]
        if let Some((start, Some(end))) = &self.events {
            return cuda_events::between(start, end);
        }
        Ok(self.wall.unwrap_or_else(|| self.started.elapsed()))
    }
}

#[cfg(feature = "cuda")]
mod cuda_events {
    use anyhow::{Context, Result};
    use candle_core::Device;
    use candle_core::cuda_backend::cudarc::driver::{CudaEvent, sys};

    pub type Event = CudaEvent;

    /// An event recorded on the device's stream (None on other devices).
    pub fn record(device: &Device) -> Result<Option<Event>> {
        let Device::Cuda(cuda) = device else { return Ok(None) };
        let event = cuda
            .cuda_stream()
            .record_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT))
            .map_err(|e| anyhow::anyhow!("{e:?}"))
            .context("cannot record a CUDA event")?;
        Ok(Some(event))
    }

    /// Device time between two events (waits for the second).
    pub fn between(start: &Event, end: &Event) -> Result<std::time::Duration> {
        let ms = start.elapsed_ms(end).map_err(|e| anyhow::anyhow!("{e:?}")).context("cannot time CUDA events")?;
        Ok(std::time::Duration::from_secs_f64(f64::from(ms.max(0.0)) / 1e3))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_devices_and_dtypes_with_clear_errors() {
        assert!(parse_device("cpu").unwrap().is_cpu());
        assert!(parse_device(" CPU ").unwrap().is_cpu());
        let err = parse_device("tpu").unwrap_err().to_string();
        assert!(err.contains("unknown device \"tpu\""), "{err}");
        let err = format!("{:#}", parse_device("cuda:x").unwrap_err());
        assert!(err.contains("cuda:N"), "{err}");
        assert_eq!(parse_dtype("bf16").unwrap(), DType::BF16);
        assert!(parse_dtype("f64").unwrap_err().to_string().contains("f32, f16 or bf16"));
        assert_eq!(default_dtype(&Device::Cpu), DType::F32);
    }

    #[test]
    fn a_device_ordinal_beyond_the_count_names_the_devices_there_are() {
        let count = |n: usize| move || -> Result<usize> { Ok(n) };
        check_ordinal("cuda:0", 0, count(1)).unwrap();
        check_ordinal("cuda:3", 3, count(8)).unwrap();
        let err = check_ordinal("cuda:7", 7, count(1)).unwrap_err().to_string();
        assert_eq!(err, "device cuda:7 does not exist: this machine has 1 CUDA device: cuda:0");
        let err = check_ordinal(" cuda:7 ", 7, count(4)).unwrap_err().to_string();
        assert_eq!(err, "device cuda:7 does not exist: this machine has 4 CUDA devices: cuda:0 to cuda:3");
        let err = check_ordinal("cuda", 0, count(0)).unwrap_err().to_string();
        assert!(err.contains("this machine has no CUDA device"), "{err}");
        let failing = || -> Result<usize> { bail!("cannot count CUDA devices: CUDA_ERROR_NO_DEVICE") };
        let err = format!("{:#}", check_ordinal("cuda:1", 1, failing).unwrap_err());
        assert_eq!(err, "device cuda:1: cannot count CUDA devices: CUDA_ERROR_NO_DEVICE");
    }

    #[test]
    fn device_settings_are_checked_without_opening_the_device() {
        check_device("cpu").unwrap();
        let err = format!("{:#}", check_device("tpu").unwrap_err());
        assert!(err.contains("unknown device \"tpu\""), "{err}");
        let err = format!("{:#}", check_device("cuda:x").unwrap_err());
        assert!(err.contains("expected cuda:N"), "{err}");
        if !cfg!(feature = "cuda") {
            // A CPU build asked for CUDA says so, naming the device and how to get CUDA.
            for spec in ["cuda", "cuda:7"] {
                let err = format!("{:#}", check_device(spec).unwrap_err());
                assert!(err.starts_with(&format!("device {spec}: this build has no CUDA support")), "{err}");
                assert!(err.contains("--features cuda"), "{err}");
                assert_eq!(format!("{:#}", parse_device(spec).unwrap_err()), err);
            }
        }
    }
}
