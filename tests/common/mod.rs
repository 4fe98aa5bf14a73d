//! Helpers shared by the pipeline-level tests: fixture paths, the tiny model, reference files.
#![allow(dead_code)]

pub mod single_file;

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
        vae: None,
        tokenizer: None,
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

/// One case of a whole-frame reference (`cases.json` beside the reference images), as
/// tests/reference/make_fixtures.py writes it.
#[derive(serde::Deserialize)]
pub struct Img2ImgCase {
    pub name: String,
    pub frame: usize,
    pub control: usize,
    pub prompt: String,
    pub negative_prompt: String,
    pub steps: usize,
    pub strength: f64,
    pub guidance_scale: f64,
    pub controlnet_scale: f64,
    pub output: String,
}

impl Img2ImgCase {
    /// Every case of `dir/cases.json`.
    pub fn load_all(dir: &Path) -> Vec<Self> {
        let text = std::fs::read_to_string(dir.join("cases.json")).unwrap();
        serde_json::from_str(&text).unwrap()
    }

    pub fn settings(&self) -> FrameSettings {
        FrameSettings {
            prompt: self.prompt.clone(),
            negative_prompt: self.negative_prompt.clone(),
            steps: self.steps,
            strength: self.strength,
            guidance_scale: self.guidance_scale,
            controlnet_scale: self.controlnet_scale,
            ..FrameSettings::default()
        }
    }

    /// The case's frame through `stylizer` with the fixture noise (no cross-frame attention).
    pub fn stylize(&self, stylizer: &mut Stylizer) -> Tensor {
        stylizer
            .stylize(
                &frame(self.frame).to_tensor(&Device::Cpu).unwrap(),
                &control(self.control).to_tensor(&Device::Cpu).unwrap(),
                &self.settings(),
                &fixture_noise(),
                None,
                &mut sdcrossframe::pipeline::PlainFrame::default(),
            )
            .unwrap()
    }
}
