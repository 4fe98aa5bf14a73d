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

#[test]
fn wrong_input_shapes_and_unsupported_configs_are_errors() {
    let vae = vae();
    let image = Tensor::zeros((1, 4, 16, 16), DType::F32, &Device::Cpu).unwrap();
    let err = vae.encode_mean(&image).unwrap_err().to_string();
    assert!(err.contains("encode") && err.contains("[1, 4, 16, 16]"), "{err}");
    let latents = Tensor::zeros((4, 8, 8), DType::F32, &Device::Cpu).unwrap();
    let err = vae.decode(&latents).unwrap_err().to_string();
    assert!(err.contains("decode") && err.contains("[4, 8, 8]"), "{err}");

    let files = ComponentFiles::locate(&fixtures().join("tiny-sd/vae"), None).unwrap();
    let base: serde_json::Value = files.read_config().unwrap();
    for (key, value, needle) in [
        ("mid_block_add_attention", serde_json::json!(false), "mid_block_add_attention"),
        ("down_block_types", serde_json::json!(["DownEncoderBlock2D"]), "down_block_types"),
        (
            "up_block_types",
            serde_json::json!(["AttnUpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"]),
            "AttnUpDecoderBlock2D",
        ),
        ("act_fn", serde_json::json!("gelu"), "act_fn"),
    ] {
        let mut config = base.clone();
        config[key] = value;
        let config: AutoencoderKLConfig = serde_json::from_value(config).unwrap();
        let vb = files.var_builder(DType::F32, &Device::Cpu).unwrap();
        let err = AutoencoderKL::new(vb, &config).err().expect("must fail").to_string();
        assert!(err.contains(needle), "{key}: {err}");
    }
}

/// A batch of two (the frames of two streams decoded in one call) gives each frame what it
/// gives alone: the attention's tokens were a transposed view, on which candle's matmul got
/// every sample after the first wrong.
#[test]
fn a_batch_of_two_encodes_and_decodes_as_each_alone() {
    let reference = candle_core::safetensors::load(fixtures().join("reference/vae.safetensors"), &Device::Cpu).unwrap();
    let vae = vae();
    let latents = &reference["latents"];
    let other = (latents.flip(&[3]).unwrap() * 0.5).unwrap();
    let both = vae.decode(&Tensor::cat(&[latents, &other], 0).unwrap()).unwrap();
    for (i, alone) in [vae.decode(latents).unwrap(), vae.decode(&other).unwrap()].iter().enumerate() {
        let err = relative_error(&both.narrow(0, i, 1).unwrap(), alone);
        assert!(err < 1e-6, "decode, frame {i} of 2: {err:.2e} from the frame alone");
    }
    let images = Tensor::cat(&[&reference["image"], &reference["image"].flip(&[2]).unwrap()], 0).unwrap();
    let means = vae.encode_mean(&images).unwrap();
    for i in 0..2 {
        let alone = vae.encode_mean(&images.narrow(0, i, 1).unwrap()).unwrap();
        let err = relative_error(&means.narrow(0, i, 1).unwrap(), &alone);
        assert!(err < 1e-6, "encode, image {i} of 2: {err:.2e} from the image alone");
    }
}
