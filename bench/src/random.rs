//! Random weights at SD1.5 shapes: what the benchmarks run when no model directory is given.
//! Speed does not depend on the weights' values.

use std::path::Path;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::VarBuilder;
use sdcrossframe::models::sd15;
use sdcrossframe::pipeline::{Component, ModelParts, VaeConfig};
use sdcrossframe::tokenizer::ClipTokenizer;

/// A VarBuilder backend that makes a random tensor of whatever shape a layer asks for:
/// matrices and kernels ~ N(0, 1/fan_in) (activations keep their scale, no overflow in f16),
/// 1-D weights (norm scales) ones, biases zeros.
pub struct RandomWeights;

impl candle_nn::var_builder::SimpleBackend for RandomWeights {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _h: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let dims = s.dims();
        if dims.len() >= 2 {
            let fan_in: usize = dims[1..].iter().product();
            let std = 1.0 / (fan_in.max(1) as f32).sqrt();
            Tensor::randn(0f32, std, s, dev)?.to_dtype(dtype)
        } else if name.ends_with("weight") {
            Tensor::ones(s, dtype, dev)
        } else {
            Tensor::zeros(s, dtype, dev)
        }
    }

    fn get_unchecked(&self, name: &str, _dtype: DType, _dev: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("random weights: {name} was asked for without a shape")
    }

    fn contains_tensor(&self, _name: &str) -> bool {
        false
    }
}

pub fn random_vb(dtype: DType, device: &Device) -> VarBuilder<'static> {
    VarBuilder::from_backend(Box::new(RandomWeights), dtype, device.clone())
}

/// Every part of an SD1.5 + Canny ControlNet pipeline with random weights; the tokenizer is
/// read from `tokenizer_dir` (a CLIP tokenizer folder: vocab.json + merges.txt). With
/// `tiny_vae` the VAE is TAESD-shaped (madebyollin/taesd's config) instead of SD1.5's.
pub fn sd15_parts(dtype: DType, device: &Device, tokenizer_dir: &Path, tiny_vae: bool) -> Result<ModelParts<'static>> {
    let random = |what: &str| (random_vb(dtype, device), format!("random SD1.5 {what}"));
    let tokenizer = ClipTokenizer::from_dir(tokenizer_dir).with_context(|| {
        format!("random weights still need a CLIP tokenizer (--tokenizer {})", tokenizer_dir.display())
    })?;
    Ok(ModelParts {
        tokenizer,
        text_encoder: component(sd15::text_encoder_config()?, random("text encoder")),
        unet: component(sd15::unet_config()?, random("UNet")),
        controlnet: component(sd15::controlnet_config()?, random("ControlNet")),
        vae: if tiny_vae {
            component(VaeConfig::Tiny(sd15::taesd_config()?), random("TAESD"))
        } else {
            component(VaeConfig::Kl(sd15::vae_config()?), random("VAE"))
        },
        scheduler: sd15::scheduler_config()?,
    })
}

fn component<C>(config: C, (weights, origin): (VarBuilder<'static>, String)) -> Component<'static, C> {
    Component { config, weights, origin }
}
