//! Initial noise: seeded so that a seed gives the same noise on every machine (candle's own
//! RNG is device-specific), or read from a file (to match a diffusers run exactly).

use std::path::Path;

use anyhow::{Context, Result, bail};
use candle_core::{DType, Device, Tensor};
use rand::SeedableRng;
use rand_distr::Distribution;

/// Standard-normal f32 noise of `shape`, identical on every machine for a seed.
pub fn seeded_noise(seed: u64, shape: (usize, usize, usize, usize), device: &Device) -> Result<Tensor> {
    let count = shape.0 * shape.1 * shape.2 * shape.3;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let values: Vec<f32> = (0..count).map(|_| rand_distr::StandardNormal.sample(&mut rng)).collect();
    Ok(Tensor::from_vec(values, shape, device)?)
}

/// Reads an initial-noise tensor named `noise` (or the file's only tensor) from a safetensors file.
pub fn load_noise_file(path: &Path, device: &Device) -> Result<Tensor> {
    let tensors = candle_core::safetensors::load(path, device)
        .with_context(|| format!("cannot read noise file {}", path.display()))?;
    let tensor = match tensors.get("noise") {
        Some(t) => t.clone(),
        None if tensors.len() == 1 => tensors.into_values().next().expect("one tensor"),
        None => bail!(
            "noise file {} has no tensor named \"noise\" (found: {})",
            path.display(),
            tensors.keys().cloned().collect::<Vec<_>>().join(", ")
        ),
    };
    Ok(tensor.to_dtype(DType::F32)?)
}
