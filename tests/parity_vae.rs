//! AutoencoderKL against diffusers: posterior mean and decode on the tiny VAE.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use sdcrossframe::models::vae::{AutoencoderKL, AutoencoderKLConfig};
use sdcrossframe::weights::ComponentFiles;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn vae() -> AutoencoderKL {
    let files = ComponentFiles::locate(&fixtures().join("tiny-sd/vae"), None).unwrap();
    let config: AutoencoderKLConfig = files.read_config().unwrap();
    AutoencoderKL::new(files.var_builder(DType::F32, &Device::Cpu).unwrap(), &config).unwrap()
}

/// Max abs error relative to the reference's max abs value.
fn relative_error(got: &Tensor, want: &Tensor) -> f32 {
    let max = |t: &Tensor| t.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
    max(&(got - want).unwrap()) / max(want)
}

#[test]
fn encode_mean_and_decode_match_diffusers() {
    let reference = candle_core::safetensors::load(fixtures().join("reference/vae.safetensors"), &Device::Cpu).unwrap();
    let vae = vae();
    let mean = vae.encode_mean(&reference["image"]).unwrap();
    let err = relative_error(&mean, &reference["latent_mean"]);
    println!("encode mean: relative error {err:.2e}");
    assert!(err < 1e-4, "encode mean off by {err}");
    let decoded = vae.decode(&reference["latents"]).unwrap();
    let err = relative_error(&decoded, &reference["decoded"]);
    println!("decode: relative error {err:.2e}");
    assert!(err < 1e-4, "decode off by {err}");
    assert!((vae.scaling_factor() - 0.18215).abs() < 1e-12);
}
