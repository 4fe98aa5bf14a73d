//! AutoencoderKL (the SD VAE) from a diffusers `vae/` directory.
//!
//! Ours rather than candle-transformers' `AutoEncoderKL`: that one hides the posterior mean
//! (img2img here encodes deterministically at the mean), and its blocks do not run the
//! backend's operations (see [`super::vae_blocks`]).

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;
use serde::Deserialize;

use super::vae_blocks::{DownEncoderBlock, UpDecoderBlock, VaeBlockConfig, VaeMidBlock};
use crate::ops::{Conv2d, GroupNorm};

/// `vae/config.json` as diffusers writes it.
#[derive(Debug, Clone, Deserialize)]
pub struct AutoencoderKLConfig {
    #[serde(default = "three")]
    pub in_channels: usize,
    #[serde(default = "three")]
    pub out_channels: usize,
    pub block_out_channels: Vec<usize>,
    #[serde(default = "one")]
    pub layers_per_block: usize,
    #[serde(default = "four")]
    pub latent_channels: usize,
    #[serde(default = "thirty_two")]
    pub norm_num_groups: usize,
    #[serde(default = "sd_scaling_factor")]
    pub scaling_factor: f64,
    #[serde(default)]
    pub shift_factor: Option<f64>,
    #[serde(default)]
    pub down_block_types: Vec<String>,
    #[serde(default)]
    pub up_block_types: Vec<String>,
    #[serde(default = "yes")]
    pub use_quant_conv: bool,
    #[serde(default = "yes")]
    pub use_post_quant_conv: bool,
    #[serde(default = "yes")]
    pub mid_block_add_attention: bool,
    #[serde(default = "silu")]
    pub act_fn: String,
}

fn one() -> usize {
    1
}
fn three() -> usize {
    3
}
fn four() -> usize {
    4
}
fn thirty_two() -> usize {
    32
}
fn yes() -> bool {
    true
}
fn silu() -> String {
    "silu".into()
}
fn sd_scaling_factor() -> f64 {
    0.18215
}

/// diffusers' VAE blocks use eps 1e-6 everywhere.
const VAE_EPS: f64 = 1e-6;

impl AutoencoderKLConfig {
    fn check(&self) -> Result<()> {
        if self.block_out_channels.is_empty() {
            candle_core::bail!("vae config: block_out_channels is empty");
        }
        // Decoding divides by it: 0 would turn every frame into NaN.
        if !(self.scaling_factor.is_finite() && self.scaling_factor > 0.0) {
            candle_core::bail!("vae config: scaling_factor {} must be a positive number", self.scaling_factor);
        }
        if !self.mid_block_add_attention {
            candle_core::bail!("vae config: mid_block_add_attention = false is not supported");
        }
        if self.act_fn != "silu" {
            candle_core::bail!("vae config: act_fn {:?} is not supported (only silu)", self.act_fn);
        }
        if self.shift_factor.is_some_and(|s| s != 0.0) {
            candle_core::bail!("vae config: shift_factor is not supported (SD1.5 VAEs have none)");
        }
        for (what, types) in [("down_block_types", &self.down_block_types), ("up_block_types", &self.up_block_types)] {
            if !types.is_empty() && types.len() != self.block_out_channels.len() {
                candle_core::bail!(
                    "vae config: {} {what} for {} block_out_channels",
                    types.len(),
                    self.block_out_channels.len()
                );
            }
        }
        for t in &self.down_block_types {
            if t != "DownEncoderBlock2D" {
                candle_core::bail!("vae config: down block type {t} is not supported");
            }
        }
        for t in &self.up_block_types {
            if t != "UpDecoderBlock2D" {
                candle_core::bail!("vae config: up block type {t} is not supported");
            }
        }
        Ok(())
    }

    fn block_config(&self) -> VaeBlockConfig {
        VaeBlockConfig { groups: self.norm_num_groups, eps: VAE_EPS }
    }
}

fn conv3x3(in_channels: usize, out_channels: usize, vb: VarBuilder) -> Result<Conv2d> {
    Conv2d::same(vb, in_channels, out_channels, 3, 1)
}

struct Encoder {
    conv_in: Conv2d,
    down_blocks: Vec<DownEncoderBlock>,
    mid_block: VaeMidBlock,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Encoder {
    fn new(vb: VarBuilder, config: &AutoencoderKLConfig) -> Result<Self> {
        let channels = &config.block_out_channels;
        let blocks = config.block_config();
        let conv_in = conv3x3(config.in_channels, channels[0], vb.pp("conv_in"))?;
        let mut down_blocks = Vec::with_capacity(channels.len());
        for (index, &out_channels) in channels.iter().enumerate() {
            down_blocks.push(DownEncoderBlock::new(
                vb.pp("down_blocks").pp(index),
                config.layers_per_block,
                channels[index.saturating_sub(1)],
                out_channels,
                index + 1 < channels.len(),
                &blocks,
            )?);
        }
        let last = *channels.last().expect("checked non-empty");
        let mid_block = VaeMidBlock::new(vb.pp("mid_block"), last, &blocks)?;
        let conv_norm_out = GroupNorm::new(vb.pp("conv_norm_out"), config.norm_num_groups, last, VAE_EPS)?;
        let conv_out = conv3x3(last, 2 * config.latent_channels, vb.pp("conv_out"))?;
        Ok(Self { conv_in, down_blocks, mid_block, conv_norm_out, conv_out })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let mut xs = self.conv_in.forward(xs)?;
        for block in &self.down_blocks {
            xs = block.forward(&xs)?;
        }
        let xs = self.mid_block.forward(&xs)?;
        let xs = self.conv_norm_out.forward_silu(&xs)?;
        self.conv_out.forward(&xs)
    }
}

struct Decoder {
    conv_in: Conv2d,
    mid_block: VaeMidBlock,
    up_blocks: Vec<UpDecoderBlock>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Decoder {
    fn new(vb: VarBuilder, config: &AutoencoderKLConfig) -> Result<Self> {
        let reversed: Vec<usize> = config.block_out_channels.iter().rev().copied().collect();
        let blocks = config.block_config();
        let conv_in = conv3x3(config.latent_channels, reversed[0], vb.pp("conv_in"))?;
        let mid_block = VaeMidBlock::new(vb.pp("mid_block"), reversed[0], &blocks)?;
        let mut up_blocks = Vec::with_capacity(reversed.len());
        for (index, &out_channels) in reversed.iter().enumerate() {
            up_blocks.push(UpDecoderBlock::new(
                vb.pp("up_blocks").pp(index),
                config.layers_per_block + 1,
                reversed[index.saturating_sub(1)],
                out_channels,
                index + 1 < reversed.len(),
                &blocks,
            )?);
        }
        let first = config.block_out_channels[0];
        let conv_norm_out = GroupNorm::new(vb.pp("conv_norm_out"), config.norm_num_groups, first, VAE_EPS)?;
        let conv_out = conv3x3(first, config.out_channels, vb.pp("conv_out"))?;
        Ok(Self { conv_in, mid_block, up_blocks, conv_norm_out, conv_out })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let xs = self.conv_in.forward(xs)?;
        let mut xs = self.mid_block.forward(&xs)?;
        for block in &self.up_blocks {
            xs = block.forward(&xs)?;
        }
        let xs = self.conv_norm_out.forward_silu(&xs)?;
        self.conv_out.forward(&xs)
    }
}

/// The VAE: images in [-1, 1] to latents and back.
pub struct AutoencoderKL {
    encoder: Encoder,
    decoder: Decoder,
    quant_conv: Option<Conv2d>,
    post_quant_conv: Option<Conv2d>,
    in_channels: usize,
    latent_channels: usize,
    scaling_factor: f64,
}

impl AutoencoderKL {
    pub fn new(vb: VarBuilder, config: &AutoencoderKLConfig) -> Result<Self> {
        let _span = tracing::info_span!("vae-load").entered();
        config.check()?;
        let latent = config.latent_channels;
        let quant_conv = config
            .use_quant_conv
            .then(|| Conv2d::same(vb.pp("quant_conv"), 2 * latent, 2 * latent, 1, 1))
            .transpose()?;
        let post_quant_conv = config
            .use_post_quant_conv
            .then(|| Conv2d::same(vb.pp("post_quant_conv"), latent, latent, 1, 1))
            .transpose()?;
        Ok(Self {
            encoder: Encoder::new(vb.pp("encoder"), config)?,
            decoder: Decoder::new(vb.pp("decoder"), config)?,
            quant_conv,
            post_quant_conv,
            in_channels: config.in_channels,
            latent_channels: latent,
            scaling_factor: config.scaling_factor,
        })
    }

    /// Latents = posterior mean * scaling_factor is what the UNet works on.
    pub fn scaling_factor(&self) -> f64 {
        self.scaling_factor
    }

    /// The posterior's mean for images in [-1, 1] (not yet multiplied by `scaling_factor`).
    pub fn encode_mean(&self, image: &Tensor) -> Result<Tensor> {
        check_nchw("encode", image, self.in_channels)?;
        let moments = self.encoder.forward(image)?;
        let moments = match &self.quant_conv {
            Some(conv) => conv.forward(&moments)?,
            None => moments,
        };
        moments.narrow(1, 0, self.latent_channels)
    }

    /// Decodes (unscaled) latents to images in about [-1, 1].
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        check_nchw("decode", latents, self.latent_channels)?;
        let latents = match &self.post_quant_conv {
            Some(conv) => conv.forward(latents)?,
            None => latents.clone(),
        };
        self.decoder.forward(&latents)
    }
}

/// The VAE's inputs are `(batch, channels, height, width)` with the configured channels.
fn check_nchw(what: &str, xs: &Tensor, channels: usize) -> Result<()> {
    match xs.dims() {
        &[_, c, h, w] if c == channels && h > 0 && w > 0 => Ok(()),
        dims => candle_core::bail!("vae {what}: expected (batch, {channels}, height, width), got {dims:?}"),
    }
}
