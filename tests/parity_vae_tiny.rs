//! The tiny VAE (AutoencoderTiny, TAESD) against diffusers: encode and decode on the tiny
//! fixture model, a whole ControlNet img2img frame and a cross-frame video with it as the
//! pipeline's VAE, and proof that it changes the output far beyond the tolerances (TAESD vs
//! the full VAE).

mod common;

use candle_core::{DType, Device, Tensor};
use common::*;
use sdcrossframe::cross_frame::{AttentionMode, AttentionScope};
use sdcrossframe::models::vae::{AutoencoderKL, AutoencoderKLConfig};
use sdcrossframe::models::vae_tiny::{AutoencoderTiny, AutoencoderTinyConfig};
use sdcrossframe::pipeline::{ModelSpec, Stylizer};
use sdcrossframe::session::{SessionConfig, VideoSession};
use sdcrossframe::weights::ComponentFiles;

/// Encode / decode tolerance: max abs error relative to the reference's max abs value.
const VAE_TOLERANCE: f32 = 1e-4;

fn taesd_dir() -> std::path::PathBuf {
    fixtures().join("tiny-taesd")
}

fn reference() -> std::collections::HashMap<String, Tensor> {
    load_tensors(&fixtures().join("reference/taesd/vae_tiny.safetensors"))
}

fn tiny_vae() -> AutoencoderTiny {
    let files = ComponentFiles::locate(&taesd_dir(), None).unwrap();
    let config: AutoencoderTinyConfig = files.read_config().unwrap();
    AutoencoderTiny::new(files.var_builder(DType::F32, &Device::Cpu).unwrap(), &config).unwrap()
}

fn full_vae() -> AutoencoderKL {
    let files = ComponentFiles::locate(&fixtures().join("tiny-sd/vae"), None).unwrap();
    let config: AutoencoderKLConfig = files.read_config().unwrap();
    AutoencoderKL::new(files.var_builder(DType::F32, &Device::Cpu).unwrap(), &config).unwrap()
}

fn max_abs(t: &Tensor) -> f32 {
    t.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

fn relative_error(got: &Tensor, want: &Tensor) -> f32 {
    max_abs_diff(got, want) / max_abs(want)
}

#[test]
fn encode_and_decode_match_diffusers() {
    let reference = reference();
    let vae = tiny_vae();
    let latents = vae.encode(&reference["image"]).unwrap();
    let err = relative_error(&latents, &reference["latents"]);
    println!("encode: relative error {err:.2e} (max abs {:.2e})", max_abs_diff(&latents, &reference["latents"]));
    assert!(err < VAE_TOLERANCE, "encode off by {err}");
    let decoded = vae.decode(&reference["decoder_input"]).unwrap();
    let err = relative_error(&decoded, &reference["decoded"]);
    println!("decode: relative error {err:.2e} (max abs {:.2e})", max_abs_diff(&decoded, &reference["decoded"]));
    assert!(err < VAE_TOLERANCE, "decode off by {err}");
    // latent_magnitude and latent_shift: diffusers' scale_latents.
    let unit = vae.latents_to_unit(&reference["latents"]).unwrap();
    assert!(max_abs_diff(&unit, &reference["unit"]) < 1e-6);
    let back = vae.latents_from_unit(&reference["unit"]).unwrap();
    let inside = reference["unit"].gt(0f32).unwrap().mul(&reference["unit"].lt(1f32).unwrap()).unwrap();
    let unclamped = inside.where_cond(&reference["latents"], &back).unwrap();
    assert!(max_abs_diff(&back, &unclamped) < 1e-5, "unit round trip");
    assert_eq!(vae.scaling_factor(), 0.5);
}

/// The channels-last form (what CUDA runs in f16/bf16: NHWC activations, filters padded to 8
/// channels, each convolution's bias, skip and activation in one epilogue, NHWC upsampling)
/// computes what diffusers does, here through the CPU's transposed copies.
#[test]
fn channels_last_model_matches_diffusers() {
    let reference = reference();
    let vae = tiny_vae();
    assert!(!vae.is_channels_last(), "the CPU model runs NCHW");
    let nhwc = vae.to_channels_last().unwrap();
    assert!(nhwc.is_channels_last());
    let latents = nhwc.encode(&reference["image"]).unwrap();
    let err = relative_error(&latents, &reference["latents"]);
    println!("channels-last encode: relative error {err:.2e}");
    assert!(err < VAE_TOLERANCE, "encode off by {err}");
    let decoded = nhwc.decode(&reference["decoder_input"]).unwrap();
    assert_eq!(decoded.dims(), reference["decoded"].dims());
    let err = relative_error(&decoded, &reference["decoded"]);
    println!("channels-last decode: relative error {err:.2e}");
    assert!(err < VAE_TOLERANCE, "decode off by {err}");
}

/// Parity means something only if the tiny VAE is not the full one in disguise: on the same
/// input each computes something else, by far more than the tolerance.
#[test]
fn taesd_and_the_full_vae_differ_far_beyond_tolerance() {
    let reference = reference();
    let (tiny, full) = (tiny_vae(), full_vae());
    let image = &reference["image"];
    let tiny_latents = (tiny.encode(image).unwrap() * tiny.scaling_factor()).unwrap();
    let full_latents = (full.encode_mean(image).unwrap() * full.scaling_factor()).unwrap();
    let latent_diff = max_abs_diff(&tiny_latents, &full_latents) / max_abs(&full_latents);
    let decoded_diff = max_abs_diff(
        &tiny.decode(&reference["decoder_input"]).unwrap(),
        &full.decode(&reference["decoder_input"]).unwrap(),
    );
    println!("TAESD vs full VAE: latents relative {latent_diff:.3}, decoded {decoded_diff:.3}");
    assert!(latent_diff > 1000.0 * VAE_TOLERANCE, "latents differ by only {latent_diff}");
    assert!(decoded_diff > 0.1, "decoded images differ by only {decoded_diff}");
}

fn taesd_case() -> Img2ImgCase {
    let cases = Img2ImgCase::load_all(&fixtures().join("reference/taesd"));
    cases.into_iter().find(|c| c.name == "base").expect("the base case")
}

fn run_case(spec: &ModelSpec, case: &Img2ImgCase) -> Tensor {
    case.stylize(&mut Stylizer::load(spec, &Device::Cpu, DType::F32).expect("loads"))
}

/// A whole frame with `vae` = the tiny VAE against diffusers' pipeline with
/// `vae=AutoencoderTiny`; the same case with the full VAE (diffusers' img2img/base) differs by
/// far more than the tolerance.
#[test]
fn img2img_frame_with_taesd_matches_diffusers() {
    let case = taesd_case();
    let spec = ModelSpec { vae: Some(taesd_dir().display().to_string()), ..tiny_spec() };
    let image = run_case(&spec, &case);
    let want = load_tensors(&fixtures().join("reference/taesd").join(&case.output))["image"].clone();
    let err = max_abs_diff(&image, &want);
    println!("img2img with TAESD: max abs error {err:.2e}");
    assert!(err < IMAGE_TOLERANCE, "off by {err}");

    let full = load_tensors(&img2img_dir().join("base.safetensors"))["image"].clone();
    let diff = max_abs_diff(&want, &full);
    println!("TAESD frame vs full-VAE frame: max {diff:.3}, mean {:.3}", mean_abs_diff(&want, &full));
    assert!(diff > 100.0 * IMAGE_TOLERANCE, "TAESD changes the frame by only {diff}");
}

/// Cross-frame attention is unchanged by the VAE: a 3-frame video session (first+prev, up
/// blocks) with the tiny VAE against the original technique on diffusers with it.
#[test]
fn cross_frame_video_with_taesd_matches_diffusers() {
    let spec = ModelSpec { vae: Some(taesd_dir().display().to_string()), ..tiny_spec() };
    let stylizer = Stylizer::load(&spec, &Device::Cpu, DType::F32).unwrap();
    let config = SessionConfig {
        attention: AttentionMode::FirstPrev,
        scope: AttentionScope::Up,
        scene_cut_threshold: 0.0,
        size: fixture_size(),
        ..SessionConfig::default()
    };
    let mut session = VideoSession::new(stylizer, config, base_settings()).unwrap();
    session.set_noise(Some(fixture_noise()));
    let want = load_tensors(&fixtures().join("reference/taesd/cross_frame_first_prev_up.safetensors"));
    for k in 0..3 {
        let got = session.push(&frame(k), Some(&control(k))).unwrap().image;
        let err = max_abs_diff(&got, &want[&format!("frame_{k}")]);
        println!("TAESD cross-frame first+prev frame {k}: max abs error {err:.2e}");
        assert!(err <= IMAGE_TOLERANCE, "frame {k}: {err:.2e}");
    }
}

/// An AutoencoderKL directory given as `vae` works through the same setting: the pipeline's
/// own VAE given explicitly reproduces the reference frame.
#[test]
fn full_vae_directory_as_vae_setting_gives_the_pipeline_result() {
    let case = taesd_case();
    let spec = ModelSpec { vae: Some(fixtures().join("tiny-sd/vae").display().to_string()), ..tiny_spec() };
    let image = run_case(&spec, &case);
    let want = load_tensors(&img2img_dir().join("base.safetensors"))["image"].clone();
    let err = max_abs_diff(&image, &want);
    println!("img2img with the full VAE as vae: max abs error {err:.2e}");
    assert!(err < IMAGE_TOLERANCE, "off by {err}");
}

#[test]
fn wrong_input_shapes_and_unsupported_configs_are_errors() {
    let vae = tiny_vae();
    let image = Tensor::zeros((1, 4, 16, 16), DType::F32, &Device::Cpu).unwrap();
    let err = vae.encode(&image).unwrap_err().to_string();
    assert!(err.contains("encode") && err.contains("[1, 4, 16, 16]"), "{err}");
    let latents = Tensor::zeros((4, 8, 8), DType::F32, &Device::Cpu).unwrap();
    let err = vae.decode(&latents).unwrap_err().to_string();
    assert!(err.contains("decode") && err.contains("[4, 8, 8]"), "{err}");

    let files = ComponentFiles::locate(&taesd_dir(), None).unwrap();
    let base: serde_json::Value = files.read_config().unwrap();
    for (key, value, needle) in [
        ("act_fn", serde_json::json!("mish"), "act_fn \"mish\""),
        ("upsample_fn", serde_json::json!("bilinear"), "upsample_fn \"bilinear\""),
        ("num_encoder_blocks", serde_json::json!([1, 2, 1]), "num_encoder_blocks [1, 2, 1]"),
        ("decoder_block_out_channels", serde_json::json!([16, 32, 16, 16]), "[16, 32, 16, 16] must all be equal"),
        ("upsampling_scaling_factor", serde_json::json!(3), "upscales by 27"),
        ("shift_factor", serde_json::json!(0.1), "shift_factor"),
    ] {
        let mut config = base.clone();
        config[key] = value;
        let config: AutoencoderTinyConfig = serde_json::from_value(config).unwrap();
        let vb = files.var_builder(DType::F32, &Device::Cpu).unwrap();
        let err = AutoencoderTiny::new(vb, &config).expect_err("must fail").to_string();
        assert!(err.contains(needle), "{key}: {err}");
    }
}
