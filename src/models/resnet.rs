//! diffusers' default `ResnetBlock2D` (pre-norm, SiLU, additive time embedding), with weight
//! names `norm1`, `conv1`, `time_emb_proj`, `norm2`, `conv2`, `conv_shortcut`.
//!
//! The same computation, in the same order, as candle-transformers' block; ours so that its
//! norms and convolutions are the backend's ([`crate::ops`]), shared by the UNet, the
//! ControlNet and the VAE.

use candle_core::{Module, Result, Tensor};
use candle_nn::{Linear, VarBuilder};

use crate::ops::channels_last::{self, InputLayout};
use crate::ops::{Conv2d, GroupNorm, fused};

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
    /// Set when `time_emb_proj` moved into the model's [`ResnetTimeProjection`]: this block's
    /// columns (start, count) of its output, which also holds `conv1`'s bias.
    time_columns: Option<(usize, usize)>,
    /// `conv1` and `conv2` hold channels-last filters and the block runs channels-last between
    /// them on CUDA ([`channels_last`]): blocks without output scale, in f16/bf16 on CUDA with
    /// cuDNN (the VAE's, which have no time embedding, unless `SDCROSSFRAME_CHANNELS_LAST=resnets`).
    /// Decided at load (the filters' layout follows).
    channels_last: bool,
    span: tracing::Span,
}

/// The time embedding as a model's resnets take it.
#[derive(Debug, Clone)]
pub struct TimeEmbedding {
    /// SiLU of the model's time embedding, (batch, temb_channels): what diffusers' resnets
    /// project (each applies the SiLU itself; the model does it once per call).
    pub activated: Tensor,
    /// The model's [`ResnetTimeProjection`] of it, (batch, all resnets' channels), when the
    /// model has one.
    pub projected: Option<Tensor>,
}

impl TimeEmbedding {
    /// From the model's time embedding `emb`: its SiLU (once, not in every resnet) and, with a
    /// fused projection, every resnet's projection of it in one matrix product.
    pub fn new(emb: &Tensor, projection: Option<&ResnetTimeProjection>) -> Result<Self> {
        let activated = candle_nn::ops::silu(emb)?;
        let projected = projection.map(|p| p.forward(&activated)).transpose()?;
        Ok(Self { activated, projected })
    }
}

/// Every time-embedding projection of a model's resnets as one linear layer: one matrix
/// product per call instead of one per resnet (34 in an SD1.5 UNet + ControlNet step, each a
/// tiny GEMM plus two bias additions on the GPU, about 8 us of launches apiece). Each resnet's
/// `conv1` bias is folded into its columns' bias, so its convolution adds one per-sample bias.
#[derive(Debug, Clone)]
pub struct ResnetTimeProjection {
    linear: Linear,
}

impl ResnetTimeProjection {
    /// Moves the projections (and `conv1` biases) out of `resnets`, which then take their
    /// columns of [`Self::forward`]'s output; `None` when no resnet has a time embedding.
    pub fn fuse<'a>(resnets: impl IntoIterator<Item = &'a mut ResnetBlock2D>) -> Result<Option<Self>> {
        let (mut weights, mut biases, mut start) = (Vec::new(), Vec::new(), 0);
        for resnet in resnets {
            let Some(proj) = resnet.time_emb_proj.take() else { continue };
            let count = proj.weight().dim(0)?;
            let mut bias = match proj.bias() {
                Some(b) => b.clone(),
                None => Tensor::zeros(count, proj.weight().dtype(), proj.weight().device())?,
            };
            if let Some(conv_bias) = resnet.conv1.take_bias() {
                bias = (bias + conv_bias)?;
            }
            weights.push(proj.weight().clone());
            biases.push(bias);
            resnet.time_columns = Some((start, count));
            start += count;
        }
        if weights.is_empty() {
            return Ok(None);
        }
        let linear = Linear::new(Tensor::cat(&weights, 0)?, Some(Tensor::cat(&biases, 0)?));
        Ok(Some(Self { linear }))
    }

    /// `activated`: SiLU of the time embedding, (batch, temb_channels).
    pub fn forward(&self, activated: &Tensor) -> Result<Tensor> {
        fused::linear(&self.linear, activated, None)
    }
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
        // Blocks without a time embedding are the VAE's: a frame stage, which
        // `SDCROSSFRAME_CHANNELS_LAST=resnets` leaves NCHW.
        let channels_last = config.output_scale_factor == 1.0
            && match config.temb_channels {
                Some(_) => channels_last::wanted(vb.device(), vb.dtype()),
                None => channels_last::wanted_for_frame_stages(vb.device(), vb.dtype()),
            };
        let (conv1, conv2) =
            if channels_last { (conv1.to_channels_last()?, conv2.to_channels_last()?) } else { (conv1, conv2) };
        Ok(Self {
            norm1,
            conv1,
            time_emb_proj,
            norm2,
            conv2,
            conv_shortcut,
            output_scale_factor: config.output_scale_factor,
            time_columns: None,
            channels_last,
            span: tracing::trace_span!("resnet"),
        })
    }

    /// Whether the block runs channels-last between its convolutions (decided at load).
    pub fn is_channels_last(&self) -> bool {
        self.channels_last
    }

    /// `temb`: the model's time embedding (None for blocks without one, the VAE's).
    pub fn forward(&self, xs: &Tensor, temb: Option<&TimeEmbedding>) -> Result<Tensor> {
        let _enter = self.span.enter();
        let shortcut = match &self.conv_shortcut {
            Some(conv) => conv.forward(xs)?,
            None => xs.clone(),
        };
        let temb = match (temb, self.time_columns, &self.time_emb_proj) {
            (Some(temb), Some((start, count)), _) => {
                let Some(projected) = &temb.projected else {
                    candle_core::bail!(
                        "resnet: its time-embedding projection is in the model's ResnetTimeProjection, but the call has no projected embedding"
                    );
                };
                // A view at batch 1; at batch 2 and more a small copy per resnet (measured: 32
                // copies, 0.1 ms of a 13.2 ms step), as the bias kernel reads (batch, channels)
                // contiguously.
                Some(projected.narrow(1, start, count)?.contiguous()?)
            }
            (Some(temb), None, Some(proj)) => Some(proj.forward(&temb.activated)?),
            (None, Some(_), _) => {
                candle_core::bail!("resnet: needs the time embedding (its conv1 bias is in the model's projection)")
            }
            _ => None,
        };
        if self.channels_last {
            return self.forward_channels_last(xs, temb.as_ref(), &shortcut);
        }
        // conv1's bias and the time embedding, then conv2's bias and the shortcut, are each one
        // addition pass on CUDA (see `Conv2d::forward_add`).
        let hidden = self.conv1.forward_add(&self.norm1.forward_silu(xs)?, temb.as_ref(), None)?;
        let hidden = self.norm2.forward_silu(&hidden)?;
        if self.output_scale_factor == 1.0 {
            return self.conv2.forward_add(&hidden, None, Some(&shortcut));
        }
        (shortcut + self.conv2.forward(&hidden)?)? / self.output_scale_factor
    }

    /// [`Self::forward`] channels-last between the convolutions: NHWC GroupNorm + SiLU, NHWC
    /// convolutions, conv1's bias and the time embedding added inside the second GroupNorm,
    /// conv2's bias and the shortcut in the pass back to NCHW. `temb`: this block's projected
    /// time embedding (batch, out_channels).
    fn forward_channels_last(&self, xs: &Tensor, temb: Option<&Tensor>, shortcut: &Tensor) -> Result<Tensor> {
        let (norm1, groups1, eps1) = self.norm1.channels_last_parameters();
        let hidden = channels_last::group_norm_silu(xs, InputLayout::Nchw, None, norm1, groups1, eps1)?;
        let hidden = self.conv1.convolve_channels_last(&hidden)?;
        let (batch, channels) = (hidden.dim(0)?, hidden.dim(3)?);
        let in_bias = match (temb, self.conv1.bias()) {
            (Some(t), Some(b)) => Some(t.broadcast_add(&b.unsqueeze(0)?)?),
            (Some(t), None) => Some(t.clone()),
            (None, Some(b)) => Some(b.unsqueeze(0)?.broadcast_as((batch, channels))?.contiguous()?),
            (None, None) => None,
        };
        let (norm2, groups2, eps2) = self.norm2.channels_last_parameters();
        let hidden =
            channels_last::group_norm_silu(&hidden, InputLayout::Nhwc, in_bias.as_ref(), norm2, groups2, eps2)?;
        let out = self.conv2.convolve_channels_last(&hidden)?;
        // `Conv2d::same` always reads a bias.
        let bias = self.conv2.bias().ok_or_else(|| candle_core::Error::Msg("resnet: conv2 has no bias".into()))?;
        channels_last::to_nchw_add(&out, bias, shortcut)
    }
}
