//! Helpers shared by the pipeline-level tests: fixture paths, the tiny model, reference files.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use sdcrossframe::frame::RgbFrame;
use sdcrossframe::pipeline::{FrameSettings, ModelSpec, SizeRequest, Stylizer};

/// Per-pixel tolerance of full img2img parity (pixels in [0, 1]).
pub const IMAGE_TOLERANCE: f32 = 1e-3;

pub const BASE_PROMPT: &str = "a beautiful woman with red hair";
pub const BASE_NEGATIVE: &str = "longbody, lowres, bad anatomy, bad hands, missing fingers, extra digit, fewer digits, cropped, worst quality, low quality";

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

pub fn img2img_dir() -> PathBuf {
    fixtures().join("reference/img2img")
}

pub fn tiny_spec() -> ModelSpec {
    ModelSpec {
        model: fixtures().join("tiny-sd").display().to_string(),
        controlnet: fixtures().join("tiny-controlnet").display().to_string(),
        variant: None,
        loras: Vec::new(),
    }
}

pub fn tiny_stylizer() -> Stylizer {
    Stylizer::load(&tiny_spec(), &Device::Cpu, DType::F32).expect("tiny model loads")
}

pub fn base_settings() -> FrameSettings {
    FrameSettings { prompt: BASE_PROMPT.into(), negative_prompt: BASE_NEGATIVE.into(), ..FrameSettings::default() }
}

/// The fixture frames' own size (96x64): sessions of the tests process them unscaled.
pub fn fixture_size() -> SizeRequest {
    SizeRequest::exact(96, 64)
}

pub fn frame(k: usize) -> RgbFrame {
    RgbFrame::load(&img2img_dir().join(format!("frame_{k}.png"))).unwrap()
}

pub fn control(k: usize) -> RgbFrame {
    RgbFrame::load(&img2img_dir().join(format!("control_{k}.png"))).unwrap()
}

pub fn fixture_noise() -> Tensor {
    sdcrossframe::pipeline::load_noise_file(&img2img_dir().join("noise.safetensors"), &Device::Cpu).unwrap()
}

pub fn load_tensors(path: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    (a.to_dtype(DType::F32).unwrap() - b.to_dtype(DType::F32).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

pub fn mean_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b).unwrap().abs().unwrap().mean_all().unwrap().to_scalar::<f32>().unwrap()
}
