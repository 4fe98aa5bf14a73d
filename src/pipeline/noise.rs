//! Noise: seeded so that a seed gives the same noise on every machine (candle's own RNG is
//! device-specific), or read from a file (to match a diffusers run exactly). A frame has its
//! initial noise and, with LCM, the step noise of the re-noising between steps (one row per
//! step slot, row k used after step k).

use std::path::Path;

use anyhow::{Context, Result, bail};
use candle_core::{DType, Device, Tensor};
use rand::SeedableRng;
use rand_distr::Distribution;

/// A frame's noise: the initial noise and the step noise (`None` when none is needed or
/// none was given).
#[derive(Debug, Clone)]
pub struct FrameNoise {
    /// `[1, C, h, w]`.
    pub initial: Tensor,
    /// `[rows, C, h, w]`, row k re-noises after step k.
    pub steps: Option<Tensor>,
}

fn standard_normal(seed: u64, count: usize) -> Vec<f32> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    (0..count).map(|_| rand_distr::StandardNormal.sample(&mut rng)).collect()
}

/// Standard-normal f32 noise of `shape`, identical on every machine for a seed.
pub fn seeded_noise(seed: u64, shape: (usize, usize, usize, usize), device: &Device) -> Result<Tensor> {
    let count = shape.0 * shape.1 * shape.2 * shape.3;
    Ok(Tensor::from_vec(standard_normal(seed, count), shape, device)?)
}

/// The initial noise of `shape` (batch 1) and `step_rows` rows of step noise, drawn as one
/// stream from the seed: the initial noise is [`seeded_noise`]'s, and each row of step noise is
/// the same whatever the number of rows (like StreamDiffusion's `init_noise`, one tensor per
/// step slot).
pub fn seeded_noise_rows(
    seed: u64,
    shape: (usize, usize, usize, usize),
    step_rows: usize,
    device: &Device,
) -> Result<FrameNoise> {
    let (_, c, h, w) = shape;
    let all = seeded_noise(seed, (1 + step_rows, c, h, w), device)?;
    let initial = all.narrow(0, 0, 1)?;
    let steps = (step_rows > 0).then(|| all.narrow(0, 1, step_rows)).transpose()?;
    Ok(FrameNoise { initial, steps })
}

/// Reads an initial-noise tensor named `noise` (or the file's only tensor) from a safetensors file.
pub fn load_noise_file(path: &Path, device: &Device) -> Result<Tensor> {
    Ok(load_frame_noise(path, device)?.initial)
}

/// Reads a noise file: the initial noise `noise` (or the file's only tensor) and, when the
/// file has it, the LCM step noise `step_noise` (`[steps - 1, C, h, w]`, row k after step k).
pub fn load_frame_noise(path: &Path, device: &Device) -> Result<FrameNoise> {
    let mut tensors = candle_core::safetensors::load(path, device)
        .with_context(|| format!("cannot read noise file {}", path.display()))?;
    let steps = tensors.remove("step_noise");
    let initial = match tensors.remove("noise") {
        Some(t) => t,
        None if tensors.len() == 1 && steps.is_none() => tensors.into_values().next().expect("one tensor"),
        None => bail!(
            "noise file {} has no tensor named \"noise\" (found: {})",
            path.display(),
            tensors
                .keys()
                .cloned()
                .chain(steps.as_ref().map(|_| "step_noise".to_string()))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    if initial.rank() != 4 || initial.dim(0)? != 1 {
        bail!("noise file {}: \"noise\" has shape {:?}, expected [1, C, H/8, W/8]", path.display(), initial.dims());
    }
    if let Some(steps) = &steps
        && (steps.rank() != 4 || steps.dims()[1..] != initial.dims()[1..])
    {
        bail!(
            "noise file {}: \"step_noise\" has shape {:?}, expected [steps - 1, {}, {}, {}] like \"noise\" {:?}",
            path.display(),
            steps.dims(),
            initial.dims()[1],
            initial.dims()[2],
            initial.dims()[3],
            initial.dims()
        );
    }
    Ok(FrameNoise { initial: initial.to_dtype(DType::F32)?, steps: steps.map(|s| s.to_dtype(DType::F32)).transpose()? })
}

/// A uniform draw in [0, 1) from a seed and an index (e.g. a frame's): the same on every
/// machine and run, independent between indices.
pub fn uniform_draw(seed: u64, index: u64) -> f64 {
    use rand::Rng;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(index);
    rng.random::<f64>()
}
