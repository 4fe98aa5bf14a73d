//! Timing and reporting helpers shared by the benchmarks.

use std::time::Instant;

use anyhow::Result;
use candle_core::{DType, Device, Tensor};

use crate::Cli;
use crate::gpu_memory::Probe;

pub fn gib(bytes: u64) -> f64 {
    bytes as f64 / (1u64 << 30) as f64
}

pub fn median(values: &[f64]) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 }
}

pub fn min(values: &[f64]) -> f64 {
    values.iter().copied().fold(f64::INFINITY, f64::min)
}

/// Milliseconds since `t`, after the device has finished its queued work.
pub fn elapsed_ms(device: &Device, t: Instant) -> Result<f64> {
    device.synchronize()?;
    Ok(t.elapsed().as_secs_f64() * 1e3)
}

pub fn dtype_name(dtype: DType) -> &'static str {
    match dtype {
        DType::F32 => "f32",
        DType::F16 => "f16",
        DType::BF16 => "bf16",
        _ => "other",
    }
}

pub fn is_finite(t: &Tensor) -> Result<bool> {
    let s = t.to_dtype(DType::F32)?.abs()?.sum_all()?.to_scalar::<f32>()?;
    Ok(s.is_finite())
}

pub fn describe_device(device: &Device, probe: Option<&Probe>) -> Result<String> {
    Ok(match (device, probe) {
        (Device::Cpu, _) => {
            format!("cpu ({} threads)", std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1))
        }
        (_, Some(p)) => {
            let (_, total) = p.device_used()?;
            format!("{device:?} ({:.1} GiB)", gib(total))
        }
        _ => format!("{device:?}"),
    })
}

/// Largest absolute difference of two tensors, in f32.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> candle_core::Result<f32> {
    (a.to_dtype(DType::F32)? - b.to_dtype(DType::F32)?)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()
}

/// Median time of `f` in ms over `cli.runs` runs after `cli.warmup` (device synchronised
/// around every run).
pub fn time_op(cli: &Cli, device: &Device, mut f: impl FnMut() -> candle_core::Result<Tensor>) -> Result<f64> {
    let mut times = Vec::new();
    for run in 0..cli.warmup + cli.runs {
        device.synchronize()?;
        let t = Instant::now();
        let out = f()?;
        drop(out);
        let ms = elapsed_ms(device, t)?;
        if run >= cli.warmup {
            times.push(ms);
        }
    }
    Ok(median(&times))
}
