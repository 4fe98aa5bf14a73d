//! diffusers' default `ResnetBlock2D` (pre-norm, SiLU, additive time embedding), with weight
//! names `norm1`, `conv1`, `time_emb_proj`, `norm2`, `conv2`, `conv_shortcut`.
//!
//! The same computation, in the same order, as candle-transformers' block; ours so that its
//! norms and convolutions are the backend's ([`crate::ops`]), shared by the UNet, the
//! ControlNet and the VAE.

use candle_core::{Module, Result, Tensor};
use candle_nn::{Linear, VarBuilder};

use crate::ops::{Conv2d, GroupNorm};

#[derive(Debug, Clone, Copy)]
pub struct ResnetBlock2DConfig {
    pub out_channels: usize,
    /// Width of the time embedding; `None` for blocks without one.
    pub temb_channels: Option<usize>,
    pub groups: usize,
    pub eps: f64,
    /// The output is divided by this (diffusers' `output_scale_factor`).
    pub output_scale_factor: f64,
}

#[derive(Debug, Clone)]
pub struct ResnetBlock2D {
    norm1: GroupNorm,
    conv1: Conv2d,
    time_emb_proj: Option<Linear>,
    norm2: GroupNorm,
    conv2: Conv2d,
    conv_shortcut: Option<Conv2d>,
    output_scale_factor: f64,
    span: tracing::Span,
}

impl ResnetBlock2D {
    pub fn new(vb: VarBuilder, in_channels: usize, config: &ResnetBlock2DConfig) -> Result<Self> {
        let out = config.out_channels;
        let norm1 = GroupNorm::new(vb.pp("norm1"), config.groups, in_channels, config.eps)?;
        let conv1 = Conv2d::same(vb.pp("conv1"), in_channels, out, 3, 1)?;
        let time_emb_proj =
            config.temb_channels.map(|t| candle_nn::linear(t, out, vb.pp("time_emb_proj"))).transpose()?;
        let norm2 = GroupNorm::new(vb.pp("norm2"), config.groups, out, config.eps)?;
        let conv2 = Conv2d::same(vb.pp("conv2"), out, out, 3, 1)?;
        let conv_shortcut =
            (in_channels != out).then(|| Conv2d::new(vb.pp("conv_shortcut"), in_channels, out, 1, 0, 1)).transpose()?;
        Ok(Self {
            norm1,
            conv1,
            time_emb_proj,
            norm2,
            conv2,
            conv_shortcut,
            output_scale_factor: config.output_scale_factor,
            span: tracing::trace_span!("resnet"),
        })
    }

    /// `temb` is the time embedding after the block's SiLU (diffusers applies it inside every
    /// block; the UNet and the ControlNet apply it once per call, the same for all blocks).
    pub fn forward(&self, xs: &Tensor, temb: Option<&Tensor>) -> Result<Tensor> {
        let _enter = self.span.enter();
        let shortcut = match &self.conv_shortcut {
            Some(conv) => conv.forward(xs)?,
            None => xs.clone(),
        };
        let temb = match (temb, &self.time_emb_proj) {
            (Some(temb), Some(proj)) => Some(proj.forward(temb)?),
            _ => None,
        };
        // conv1's bias and the time embedding, then conv2's bias and the shortcut, are each one
        // addition pass on CUDA (see `Conv2d::forward_add`).
        let hidden = self.conv1.forward_add(&self.norm1.forward_silu(xs)?, temb.as_ref(), None)?;
        let hidden = self.norm2.forward_silu(&hidden)?;
        if self.output_scale_factor == 1.0 {
            return self.conv2.forward_add(&hidden, None, Some(&shortcut));
        }
        (shortcut + self.conv2.forward(&hidden)?)? / self.output_scale_factor
    }
}
