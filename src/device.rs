//! Parsing the `device` and `dtype` settings shared by the CLI, the bench and the element.

use anyhow::{Context, Result, bail};
use candle_core::{DType, Device};

/// `cpu`, `cuda` (= `cuda:0`) or `cuda:N`; CUDA needs a build with the `cuda` feature.
pub fn parse_device(spec: &str) -> Result<Device> {
    let s = spec.trim().to_ascii_lowercase();
    if s == "cpu" {
        return Ok(Device::Cpu);
    }
    let Some(ordinal) = s.strip_prefix("cuda") else {
        bail!("unknown device {spec:?}: expected cpu or cuda:N");
    };
    let ordinal = match ordinal.strip_prefix(':') {
        Some(n) => n.parse::<usize>().with_context(|| format!("bad device {spec:?}: expected cuda:N"))?,
        None if ordinal.is_empty() => 0,
        None => bail!("bad device {spec:?}: expected cpu or cuda:N"),
    };
    if !cfg!(feature = "cuda") {
        bail!("device {spec}: this build has no CUDA support; rebuild with --features cuda (scripts/build-cuda.sh)");
    }
    Device::new_cuda(ordinal).with_context(|| format!("cannot open device {spec}"))
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
}
