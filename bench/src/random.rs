//! Random weights at SD1.5 shapes: what the benchmarks run when no model directory is given.
//! Speed does not depend on the weights' values.

use std::path::Path;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::VarBuilder;
use sdcrossframe::pipeline::{Component, ModelParts};
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

pub fn parse_config<T: serde::de::DeserializeOwned>(json: &str, what: &str) -> Result<T> {
    serde_json::from_str(json).with_context(|| format!("embedded {what} config does not parse"))
}

fn random_component<C: serde::de::DeserializeOwned>(
    json: &str,
    what: &str,
    dtype: DType,
    device: &Device,
) -> Result<Component<'static, C>> {
    Ok(Component {
        config: parse_config(json, what)?,
        weights: random_vb(dtype, device),
        origin: format!("random {what}"),
    })
}

/// Every part of an SD1.5 + Canny ControlNet pipeline with random weights; the tokenizer is
/// read from `tokenizer_dir` (a CLIP tokenizer folder: vocab.json + merges.txt).
pub fn sd15_parts(dtype: DType, device: &Device, tokenizer_dir: &Path) -> Result<ModelParts<'static>> {
    Ok(ModelParts {
        tokenizer: ClipTokenizer::from_dir(tokenizer_dir).with_context(|| {
            format!("random weights still need a CLIP tokenizer (--tokenizer {})", tokenizer_dir.display())
        })?,
        text_encoder: random_component(SD15_TEXT_ENCODER_CONFIG, "SD1.5 text encoder", dtype, device)?,
        unet: random_component(SD15_UNET_CONFIG, "SD1.5 UNet", dtype, device)?,
        controlnet: random_component(SD15_CONTROLNET_CONFIG, "SD1.5 ControlNet", dtype, device)?,
        vae: random_component(SD15_VAE_CONFIG, "SD1.5 VAE", dtype, device)?,
        scheduler: parse_config(SD15_SCHEDULER_CONFIG, "SD1.5 scheduler")?,
    })
}

/// runwayml/stable-diffusion-v1-5 `unet/config.json`.
pub const SD15_UNET_CONFIG: &str = r#"{
  "_class_name": "UNet2DConditionModel",
  "_diffusers_version": "0.6.0",
  "act_fn": "silu",
  "attention_head_dim": 8,
  "block_out_channels": [320, 640, 1280, 1280],
  "center_input_sample": false,
  "cross_attention_dim": 768,
  "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
  "downsample_padding": 1,
  "flip_sin_to_cos": true,
  "freq_shift": 0,
  "in_channels": 4,
  "layers_per_block": 2,
  "mid_block_scale_factor": 1,
  "norm_eps": 1e-05,
  "norm_num_groups": 32,
  "out_channels": 4,
  "sample_size": 64,
  "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]
}"#;

/// lllyasviel/sd-controlnet-canny `config.json`.
pub const SD15_CONTROLNET_CONFIG: &str = r#"{
  "_class_name": "ControlNetModel",
  "_diffusers_version": "0.14.0.dev0",
  "act_fn": "silu",
  "attention_head_dim": 8,
  "block_out_channels": [320, 640, 1280, 1280],
  "class_embed_type": null,
  "conditioning_embedding_out_channels": [16, 32, 96, 256],
  "controlnet_conditioning_channel_order": "rgb",
  "cross_attention_dim": 768,
  "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
  "downsample_padding": 1,
  "flip_sin_to_cos": true,
  "freq_shift": 0,
  "in_channels": 4,
  "layers_per_block": 2,
  "mid_block_scale_factor": 1,
  "norm_eps": 1e-05,
  "norm_num_groups": 32,
  "num_class_embeds": null,
  "only_cross_attention": false,
  "projection_class_embeddings_input_dim": null,
  "resnet_time_scale_shift": "default",
  "upcast_attention": false,
  "use_linear_projection": false
}"#;

/// runwayml/stable-diffusion-v1-5 `vae/config.json`.
pub const SD15_VAE_CONFIG: &str = r#"{
  "_class_name": "AutoencoderKL",
  "_diffusers_version": "0.6.0",
  "act_fn": "silu",
  "block_out_channels": [128, 256, 512, 512],
  "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D"],
  "in_channels": 3,
  "latent_channels": 4,
  "layers_per_block": 2,
  "norm_num_groups": 32,
  "out_channels": 3,
  "sample_size": 512,
  "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"]
}"#;

/// runwayml/stable-diffusion-v1-5 `text_encoder/config.json` (openai/clip-vit-large-patch14's text model).
pub const SD15_TEXT_ENCODER_CONFIG: &str = r#"{
  "architectures": ["CLIPTextModel"],
  "attention_dropout": 0.0,
  "bos_token_id": 0,
  "dropout": 0.0,
  "eos_token_id": 2,
  "hidden_act": "quick_gelu",
  "hidden_size": 768,
  "initializer_factor": 1.0,
  "initializer_range": 0.02,
  "intermediate_size": 3072,
  "layer_norm_eps": 1e-05,
  "max_position_embeddings": 77,
  "model_type": "clip_text_model",
  "num_attention_heads": 12,
  "num_hidden_layers": 12,
  "pad_token_id": 1,
  "projection_dim": 768,
  "vocab_size": 49408
}"#;

/// runwayml/stable-diffusion-v1-5 `scheduler/scheduler_config.json` (PNDM; DDIM reads the same fields).
pub const SD15_SCHEDULER_CONFIG: &str = r#"{
  "_class_name": "PNDMScheduler",
  "_diffusers_version": "0.6.0",
  "beta_end": 0.012,
  "beta_schedule": "scaled_linear",
  "beta_start": 0.00085,
  "num_train_timesteps": 1000,
  "set_alpha_to_one": false,
  "skip_prk_steps": true,
  "steps_offset": 1,
  "trained_betas": null,
  "clip_sample": false
}"#;
