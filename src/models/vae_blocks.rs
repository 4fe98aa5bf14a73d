//! The VAE's encoder and decoder blocks (diffusers' `DownEncoderBlock2D`, `UNetMidBlock2D`
//! with its single-head attention, `UpDecoderBlock2D`), with diffusers' weight names.
//!
//! The same computation as candle-transformers' blocks; ours so that the VAE's norms and
//! convolutions are the backend's ([`crate::ops`]; the decoder's GroupNorms at 512x512 run on
//! up to 128x512x512 values) and its resnets are [`super::resnet::ResnetBlock2D`], as the
//! UNet's.

use candle_core::{DType, Module, Result, Tensor};
use candle_nn::{Linear, VarBuilder};

use super::resnet::{ResnetBlock2D, ResnetBlock2DConfig};
use super::unet_blocks::{Downsample2D, Upsample2D};
use crate::ops::GroupNorm;

/// Settings every VAE block shares (from `vae/config.json`).
#[derive(Debug, Clone, Copy)]
pub struct VaeBlockConfig {
    pub groups: usize,
    pub eps: f64,
}

impl VaeBlockConfig {
    fn resnet(&self, out_channels: usize) -> ResnetBlock2DConfig {
        ResnetBlock2DConfig {
            out_channels,
            temb_channels: None,
            groups: self.groups,
            eps: self.eps,
            output_scale_factor: 1.0,
        }
    }
}

fn resnets(
    vb: VarBuilder,
    count: usize,
    in_channels: usize,
    out_channels: usize,
    config: &VaeBlockConfig,
) -> Result<Vec<ResnetBlock2D>> {
    (0..count)
        .map(|i| {
            let channels = if i == 0 { in_channels } else { out_channels };
            ResnetBlock2D::new(vb.pp(i), channels, &config.resnet(out_channels))
        })
        .collect()
}

fn run_resnets(resnets: &[ResnetBlock2D], xs: &Tensor) -> Result<Tensor> {
    resnets.iter().try_fold(xs.clone(), |xs, resnet| resnet.forward(&xs, None))
}

/// `DownEncoderBlock2D`: resnets, then (except in the last block) a stride-2 convolution padded
/// right and bottom, as diffusers' encoder does.
#[derive(Debug)]
pub struct DownEncoderBlock {
    resnets: Vec<ResnetBlock2D>,
    downsampler: Option<Downsample2D>,
}

impl DownEncoderBlock {
    pub fn new(
        vb: VarBuilder,
        layers: usize,
        in_channels: usize,
        out_channels: usize,
        add_downsample: bool,
        config: &VaeBlockConfig,
    ) -> Result<Self> {
        let resnets = resnets(vb.pp("resnets"), layers, in_channels, out_channels, config)?;
        let downsampler =
            add_downsample.then(|| Downsample2D::new(vb.pp("downsamplers").pp(0), out_channels, 0)).transpose()?;
        Ok(Self { resnets, downsampler })
    }

    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let xs = run_resnets(&self.resnets, xs)?;
        match &self.downsampler {
            Some(down) => down.forward(&xs),
            None => Ok(xs),
        }
    }
}

/// `UpDecoderBlock2D`: resnets, then (except in the last block) nearest x2 and a convolution.
#[derive(Debug)]
pub struct UpDecoderBlock {
    resnets: Vec<ResnetBlock2D>,
    upsampler: Option<Upsample2D>,
}

impl UpDecoderBlock {
    pub fn new(
        vb: VarBuilder,
        layers: usize,
        in_channels: usize,
        out_channels: usize,
        add_upsample: bool,
        config: &VaeBlockConfig,
    ) -> Result<Self> {
        let resnets = resnets(vb.pp("resnets"), layers, in_channels, out_channels, config)?;
        let upsampler = add_upsample.then(|| Upsample2D::new(vb.pp("upsamplers").pp(0), out_channels)).transpose()?;
        Ok(Self { resnets, upsampler })
    }

    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let xs = run_resnets(&self.resnets, xs)?;
        match &self.upsampler {
            Some(up) => up.forward(&xs, None),
            None => Ok(xs),
        }
    }
}

/// `UNetMidBlock2D` as the VAE uses it: resnet, attention, resnet.
#[derive(Debug)]
pub struct VaeMidBlock {
    first: ResnetBlock2D,
    attention: VaeAttention,
    second: ResnetBlock2D,
}

impl VaeMidBlock {
    pub fn new(vb: VarBuilder, channels: usize, config: &VaeBlockConfig) -> Result<Self> {
        let resnet = config.resnet(channels);
        Ok(Self {
            first: ResnetBlock2D::new(vb.pp("resnets").pp(0), channels, &resnet)?,
            attention: VaeAttention::new(vb.pp("attentions").pp(0), channels, config)?,
            second: ResnetBlock2D::new(vb.pp("resnets").pp(1), channels, &resnet)?,
        })
    }

    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let xs = self.first.forward(xs, None)?;
        let xs = self.attention.forward(&xs)?;
        self.second.forward(&xs, None)
    }
}

/// The VAE's spatial self-attention: GroupNorm, one head spanning all channels, residual.
/// Scores and softmax in f32 (one attention per image, so precision over speed).
#[derive(Debug)]
pub struct VaeAttention {
    group_norm: GroupNorm,
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    channels: usize,
}

impl VaeAttention {
    pub fn new(vb: VarBuilder, channels: usize, config: &VaeBlockConfig) -> Result<Self> {
        let group_norm = GroupNorm::new(vb.pp("group_norm"), config.groups, channels, config.eps)?;
        // Older checkpoints name the projections query/key/value/proj_attn.
        let names = if vb.contains_tensor("to_q.weight") {
            ["to_q", "to_k", "to_v", "to_out.0"]
        } else {
            ["query", "key", "value", "proj_attn"]
        };
        let [to_q, to_k, to_v, to_out] = names.map(|name| projection(vb.pp(name), channels));
        Ok(Self { group_norm, to_q: to_q?, to_k: to_k?, to_v: to_v?, to_out: to_out?, channels })
    }

    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let (batch, channels, height, width) = xs.dims4()?;
        let dtype = xs.dtype();
        // Contiguous: candle's matmul on the transposed view gives wrong rows for every sample
        // after the first when batch > 1 (seen on the CPU, candle 0.11.1).
        let tokens =
            self.group_norm.forward(xs)?.reshape((batch, channels, height * width))?.transpose(1, 2)?.contiguous()?;
        let scale = (self.channels as f64).powf(-0.25);
        let q = (self.to_q.forward(&tokens)?.to_dtype(DType::F32)? * scale)?;
        let k = (self.to_k.forward(&tokens)?.to_dtype(DType::F32)? * scale)?;
        let v = self.to_v.forward(&tokens)?.to_dtype(DType::F32)?;
        let kt = k.t()?;
        // One head over every pixel: height x width scores per query, in chunks of queries
        // at large sizes (the scores of a whole 2048x2048 frame would be 2^32 elements).
        let attended = crate::ops::in_query_chunks(&q, 1, batch * height * width, |q| {
            candle_nn::ops::softmax_last_dim(&q.matmul(&kt)?)?.matmul(&v)
        })?
        .to_dtype(dtype)?;
        let out = self.to_out.forward(&attended)?.transpose(1, 2)?.reshape((batch, channels, height, width))?;
        out + xs
    }
}

/// A `channels x channels` projection; some checkpoints store it as a 1x1 convolution.
fn projection(vb: VarBuilder, channels: usize) -> Result<Linear> {
    let weight = match vb.get((channels, channels), "weight") {
        Ok(weight) => weight,
        Err(_) => vb.get((channels, channels, 1, 1), "weight")?.reshape((channels, channels))?,
    };
    Ok(Linear::new(weight, Some(vb.get(channels, "bias")?)))
}
