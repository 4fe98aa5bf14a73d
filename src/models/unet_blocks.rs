//! Down, mid and up blocks of the diffusers UNet (shared by `UNet2DConditionModel` and
//! `ControlNetModel`), and the residuals the ControlNet hands to the UNet's skip connections.
//!
//! Supported block types: `DownBlock2D`, `CrossAttnDownBlock2D`, `UNetMidBlock2DCrossAttn`,
//! `UNetMidBlock2D` (without attention, as ControlNet uses it), `UpBlock2D`,
//! `CrossAttnUpBlock2D`. The resnets are `super::resnet::ResnetBlock2D` (diffusers'
//! default ResnetBlock2D: pre-norm, SiLU, additive time embedding); everything holding a
//! transformer is ours, because the self-attention hook lives in our transformer blocks.
//! Each block gets its per-block settings already derived from the model config
//! (see `UNet2DConditionConfig::down_blocks` etc.).

use candle_core::{D, Module, Result, Tensor};
use candle_nn::VarBuilder;

use super::attention::{SelfAttentionHook, Transformer2DConfig, Transformer2DModel};
use super::resnet::{ResnetBlock2D, ResnetBlock2DConfig, TimeEmbedding};
use crate::ops::subpixel::SubpixelUpsample;
use crate::ops::{self, Conv2d, fused};

/// ControlNet outputs, already multiplied by the conditioning scale: one residual per UNet
/// skip connection (12 for SD1.5) and one for the mid block; the UNet adds them to its skip
/// connections and its mid block's output.
#[derive(Debug, Clone)]
pub struct ControlNetResiduals {
    pub down: Vec<Tensor>,
    pub mid: Tensor,
}

/// Attention settings of a block that holds transformers.
#[derive(Debug, Clone, PartialEq)]
pub struct CrossAttnSettings {
    /// Heads of every attention in the block.
    pub num_attention_heads: usize,
    /// Width of each head: `out_channels / num_attention_heads` (diffusers' rule).
    pub attention_head_dim: usize,
    pub cross_attention_dim: usize,
    /// Transformer blocks inside each `Transformer2DModel`, one entry per resnet layer.
    pub transformer_layers: Vec<usize>,
    pub use_linear_projection: bool,
    pub only_cross_attention: bool,
}

/// One down block, derived from the model config.
#[derive(Debug, Clone, PartialEq)]
pub struct DownBlockSettings {
    /// `"DownBlock2D"` or `"CrossAttnDownBlock2D"`.
    pub block_type: String,
    pub in_channels: usize,
    pub out_channels: usize,
    pub num_layers: usize,
    pub add_downsample: bool,
    pub downsample_padding: usize,
    /// `Some` for `CrossAttnDownBlock2D`.
    pub attention: Option<CrossAttnSettings>,
}

/// The mid block, derived from the model config.
#[derive(Debug, Clone, PartialEq)]
pub struct MidBlockSettings {
    /// `"UNetMidBlock2DCrossAttn"` or `"UNetMidBlock2D"` (one resnet, no attention).
    pub block_type: String,
    pub channels: usize,
    /// Resnet output scale factor (`mid_block_scale_factor`).
    pub output_scale_factor: f64,
    /// `Some` for `UNetMidBlock2DCrossAttn` (one transformer).
    pub attention: Option<CrossAttnSettings>,
}

/// One up block, derived from the model config.
#[derive(Debug, Clone, PartialEq)]
pub struct UpBlockSettings {
    /// `"UpBlock2D"` or `"CrossAttnUpBlock2D"`.
    pub block_type: String,
    /// Channels of the skip connection consumed by the last resnet.
    pub in_channels: usize,
    /// Channels coming from the block below.
    pub prev_output_channels: usize,
    pub out_channels: usize,
    /// Resnets (= skip connections consumed); diffusers uses `layers_per_block + 1`.
    pub num_layers: usize,
    pub add_upsample: bool,
    pub attention: Option<CrossAttnSettings>,
}

/// Settings shared by every resnet of a model.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ResnetSettings {
    pub groups: usize,
    pub eps: f64,
    pub temb_channels: usize,
}

fn resnet(
    vb: VarBuilder,
    in_channels: usize,
    out_channels: usize,
    r: &ResnetSettings,
    output_scale_factor: f64,
) -> Result<ResnetBlock2D> {
    let cfg = ResnetBlock2DConfig {
        out_channels,
        temb_channels: Some(r.temb_channels),
        groups: r.groups,
        eps: r.eps,
        output_scale_factor,
    };
    ResnetBlock2D::new(vb, in_channels, &cfg)
}

fn transformer(
    vb: VarBuilder,
    channels: usize,
    a: &CrossAttnSettings,
    layer: usize,
    groups: usize,
    path: &str,
) -> Result<Transformer2DModel> {
    let num_layers = *a.transformer_layers.get(layer).ok_or_else(|| {
        candle_core::Error::Msg(format!(
            "{path}: transformer_layers_per_block has {} entries, layer {layer} needs one",
            a.transformer_layers.len()
        ))
    })?;
    let cfg = Transformer2DConfig {
        num_attention_heads: a.num_attention_heads,
        attention_head_dim: a.attention_head_dim,
        in_channels: channels,
        num_layers,
        cross_attention_dim: a.cross_attention_dim,
        norm_num_groups: groups,
        use_linear_projection: a.use_linear_projection,
        only_cross_attention: a.only_cross_attention,
    };
    Transformer2DModel::new(vb, &cfg, path)
}

/// Strided 3x3 convolution (`downsamplers.0.conv`).
#[derive(Debug, Clone)]
pub struct Downsample2D {
    conv: Conv2d,
    padding: usize,
}

impl Downsample2D {
    pub fn new(vb: VarBuilder, channels: usize, padding: usize) -> Result<Self> {
        let conv = Conv2d::new(vb.pp("conv"), channels, channels, 3, padding, 2)?;
        Ok(Self { conv, padding })
    }
}

impl Module for Downsample2D {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        if self.padding == 0 {
            // diffusers pads right and bottom by one in this case.
            let xs = xs.pad_with_zeros(D::Minus1, 0, 1)?.pad_with_zeros(D::Minus2, 0, 1)?;
            self.conv.forward(&xs)
        } else {
            self.conv.forward(xs)
        }
    }
}

/// Nearest-neighbour upsampling to a given size, then a 3x3 convolution (`upsamplers.0.conv`).
#[derive(Debug, Clone)]
pub struct Upsample2D {
    form: UpsampleForm,
}

#[derive(Debug, Clone)]
enum UpsampleForm {
    /// Upsampling, then the convolution.
    TwoStep(Conv2d),
    /// Exact 2x in sub-pixel form on NHWC data, where the resnets run channels-last
    /// (`ops::subpixel`). Other target sizes (odd skip connections) take the two-step form,
    /// whose 3x3 filter waits in host memory until the first such call uploads it: the phase
    /// filters are 16/9 of its size, and most sizes never need it.
    Subpixel { subpixel: SubpixelUpsample, host_conv: Conv2d, conv: std::sync::OnceLock<Conv2d> },
}

impl Upsample2D {
    pub fn new(vb: VarBuilder, channels: usize) -> Result<Self> {
        let conv = Conv2d::same(vb.pp("conv"), channels, channels, 3, 1)?;
        let subpixel =
            ops::channels_last::wanted(vb.device(), vb.dtype()) && ops::switches::switches().subpixel_upsample;
        Self::from_conv(conv, subpixel)
    }

    /// From the upsampler's 3x3 convolution, in sub-pixel form or not.
    pub fn from_conv(conv: Conv2d, subpixel: bool) -> Result<Self> {
        let form = if subpixel {
            UpsampleForm::Subpixel {
                subpixel: SubpixelUpsample::new(&conv)?,
                host_conv: conv.to_device(&candle_core::Device::Cpu)?,
                conv: std::sync::OnceLock::new(),
            }
        } else {
            UpsampleForm::TwoStep(conv)
        };
        Ok(Self { form })
    }

    /// `size`: output (height, width); `None` doubles both.
    pub fn forward(&self, xs: &Tensor, size: Option<(usize, usize)>) -> Result<Tensor> {
        let (_, _, h, w) = xs.dims4()?;
        let (th, tw) = size.unwrap_or((2 * h, 2 * w));
        let conv = match &self.form {
            UpsampleForm::TwoStep(conv) => conv,
            UpsampleForm::Subpixel { subpixel, .. } if (th, tw) == (2 * h, 2 * w) => return subpixel.forward(xs),
            UpsampleForm::Subpixel { host_conv, conv, .. } => match conv.get() {
                Some(conv) => conv,
                None => {
                    let uploaded = host_conv.to_device(xs.device())?;
                    // A shared model's other threads queue on other CUDA streams: the copy is
                    // finished before any of them can see the filter.
                    xs.device().synchronize()?;
                    conv.get_or_init(|| uploaded)
                }
            },
        };
        conv.forward(&xs.upsample_nearest2d(th, tw)?)
    }
}

/// `DownBlock2D` / `CrossAttnDownBlock2D`.
#[derive(Debug)]
pub struct DownBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2DModel>,
    downsampler: Option<Downsample2D>,
    span: tracing::Span,
}

impl DownBlock {
    /// The block's resnets, for the model to move their time projections into one
    /// ([`super::resnet::ResnetTimeProjection`]).
    pub fn resnets_mut(&mut self) -> impl Iterator<Item = &mut ResnetBlock2D> {
        self.resnets.iter_mut()
    }

    /// `path` is the block's diffusers path, e.g. `down_blocks.0`.
    pub fn new(vb: VarBuilder, s: &DownBlockSettings, r: &ResnetSettings, path: &str) -> Result<Self> {
        let mut resnets = Vec::new();
        let mut attentions = Vec::new();
        for i in 0..s.num_layers {
            let in_ch = if i == 0 { s.in_channels } else { s.out_channels };
            resnets.push(resnet(vb.pp("resnets").pp(i.to_string()), in_ch, s.out_channels, r, 1.0)?);
            if let Some(a) = &s.attention {
                attentions.push(transformer(
                    vb.pp("attentions").pp(i.to_string()),
                    s.out_channels,
                    a,
                    i,
                    r.groups,
                    &format!("{path}.attentions.{i}"),
                )?);
            }
        }
        let downsampler = if s.add_downsample {
            Some(Downsample2D::new(vb.pp("downsamplers").pp("0"), s.out_channels, s.downsample_padding)?)
        } else {
            None
        };
        Ok(Self { resnets, attentions, downsampler, span: tracing::trace_span!("down-block", block = path) })
    }

    /// Skip connections this block produces.
    pub fn num_outputs(&self) -> usize {
        self.resnets.len() + usize::from(self.downsampler.is_some())
    }

    /// Returns the block output and its skip connections (one per resnet, plus the
    /// downsampled map).
    pub fn forward(
        &self,
        xs: &Tensor,
        temb: &TimeEmbedding,
        encoder_hidden_states: &Tensor,
        hook: &mut dyn SelfAttentionHook,
    ) -> Result<(Tensor, Vec<Tensor>)> {
        let _enter = self.span.enter();
        let mut xs = xs.clone();
        let mut outputs = Vec::with_capacity(self.num_outputs());
        for (i, resnet) in self.resnets.iter().enumerate() {
            xs = resnet.forward(&xs, Some(temb))?;
            if let Some(attn) = self.attentions.get(i) {
                xs = attn.forward(&xs, encoder_hidden_states, hook)?;
            }
            outputs.push(xs.clone());
        }
        if let Some(down) = &self.downsampler {
            xs = down.forward(&xs)?;
            outputs.push(xs.clone());
        }
        Ok((xs, outputs))
    }
}

/// `UNetMidBlock2DCrossAttn` (resnet, transformer, resnet) or attention-free
/// `UNetMidBlock2D` (a single resnet).
#[derive(Debug)]
pub struct MidBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2DModel>,
    span: tracing::Span,
}

impl MidBlock {
    /// The block's resnets, for the model to move their time projections into one
    /// ([`super::resnet::ResnetTimeProjection`]).
    pub fn resnets_mut(&mut self) -> impl Iterator<Item = &mut ResnetBlock2D> {
        self.resnets.iter_mut()
    }

    pub fn new(vb: VarBuilder, s: &MidBlockSettings, r: &ResnetSettings, path: &str) -> Result<Self> {
        let c = s.channels;
        let mut resnets = vec![resnet(vb.pp("resnets").pp("0"), c, c, r, s.output_scale_factor)?];
        let mut attentions = Vec::new();
        if let Some(a) = &s.attention {
            attentions.push(transformer(
                vb.pp("attentions").pp("0"),
                c,
                a,
                0,
                r.groups,
                &format!("{path}.attentions.0"),
            )?);
            resnets.push(resnet(vb.pp("resnets").pp("1"), c, c, r, s.output_scale_factor)?);
        }
        Ok(Self { resnets, attentions, span: tracing::trace_span!("mid-block") })
    }

    pub fn forward(
        &self,
        xs: &Tensor,
        temb: &TimeEmbedding,
        encoder_hidden_states: &Tensor,
        hook: &mut dyn SelfAttentionHook,
    ) -> Result<Tensor> {
        let _enter = self.span.enter();
        let mut xs = self.resnets[0].forward(xs, Some(temb))?;
        for (attn, resnet) in self.attentions.iter().zip(self.resnets.iter().skip(1)) {
            xs = attn.forward(&xs, encoder_hidden_states, hook)?;
            xs = resnet.forward(&xs, Some(temb))?;
        }
        Ok(xs)
    }
}

/// `UpBlock2D` / `CrossAttnUpBlock2D`.
#[derive(Debug)]
pub struct UpBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2DModel>,
    upsampler: Option<Upsample2D>,
    span: tracing::Span,
}

/// A skip connection into an up block: the down path's output and, under a ControlNet, its
/// residual for it (added when the up block concatenates the two).
pub struct SkipConnection {
    pub sample: Tensor,
    pub control: Option<Tensor>,
}

impl UpBlock {
    /// The block's resnets, for the model to move their time projections into one
    /// ([`super::resnet::ResnetTimeProjection`]).
    pub fn resnets_mut(&mut self) -> impl Iterator<Item = &mut ResnetBlock2D> {
        self.resnets.iter_mut()
    }

    pub fn new(vb: VarBuilder, s: &UpBlockSettings, r: &ResnetSettings, path: &str) -> Result<Self> {
        let mut resnets = Vec::new();
        let mut attentions = Vec::new();
        for i in 0..s.num_layers {
            let skip = if i + 1 == s.num_layers { s.in_channels } else { s.out_channels };
            let input = if i == 0 { s.prev_output_channels } else { s.out_channels };
            resnets.push(resnet(vb.pp("resnets").pp(i.to_string()), input + skip, s.out_channels, r, 1.0)?);
            if let Some(a) = &s.attention {
                attentions.push(transformer(
                    vb.pp("attentions").pp(i.to_string()),
                    s.out_channels,
                    a,
                    i,
                    r.groups,
                    &format!("{path}.attentions.{i}"),
                )?);
            }
        }
        let upsampler =
            if s.add_upsample { Some(Upsample2D::new(vb.pp("upsamplers").pp("0"), s.out_channels)?) } else { None };
        Ok(Self { resnets, attentions, upsampler, span: tracing::trace_span!("up-block", block = path) })
    }

    /// Skip connections this block consumes.
    pub fn num_inputs(&self) -> usize {
        self.resnets.len()
    }

    /// `skips`: this block's skip connections in the order the down path produced them
    /// (the last one is consumed first). `upsample_size`: output size of the upsampler.
    pub fn forward(
        &self,
        xs: &Tensor,
        skips: &[SkipConnection],
        temb: &TimeEmbedding,
        encoder_hidden_states: &Tensor,
        upsample_size: Option<(usize, usize)>,
        hook: &mut dyn SelfAttentionHook,
    ) -> Result<Tensor> {
        let _enter = self.span.enter();
        if skips.len() != self.resnets.len() {
            candle_core::bail!("up block needs {} skip connections, got {}", self.resnets.len(), skips.len());
        }
        let mut xs = xs.clone();
        for (i, resnet) in self.resnets.iter().enumerate() {
            let skip = &skips[skips.len() - 1 - i];
            xs = fused::concat_channels(&xs, &skip.sample, skip.control.as_ref())?;
            xs = resnet.forward(&xs, Some(temb))?;
            if let Some(attn) = self.attentions.get(i) {
                xs = attn.forward(&xs, encoder_hidden_states, hook)?;
            }
        }
        match &self.upsampler {
            Some(up) => up.forward(&xs, upsample_size),
            None => Ok(xs),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    /// The sub-pixel form and the two-step form agree at exact 2x and at the odd sizes that
    /// take the two-step filter (uploaded on first use).
    #[test]
    fn upsampler_forms_agree_at_every_target_size() -> Result<()> {
        let dev = Device::Cpu;
        let (c, h, w) = (6, 4, 5);
        let vb = VarBuilder::from_tensors(
            [
                ("conv.weight".to_string(), Tensor::randn(0f32, 0.3, (c, c, 3, 3), &dev)?),
                ("conv.bias".to_string(), Tensor::randn(0f32, 1.0, c, &dev)?),
            ]
            .into(),
            DType::F32,
            &dev,
        );
        let two_step = Upsample2D::new(vb.clone(), c)?;
        assert!(matches!(two_step.form, UpsampleForm::TwoStep(_)), "the CPU keeps the two-step form");
        let conv = Conv2d::same(vb.pp("conv"), c, c, 3, 1)?;
        let subpixel = Upsample2D::from_conv(conv, true)?;
        let xs = Tensor::randn(0f32, 1.0, (2, c, h, w), &dev)?;
        for size in [None, Some((2 * h, 2 * w)), Some((2 * h - 1, 2 * w)), Some((2 * h - 1, 2 * w - 1))] {
            let expected = two_step.forward(&xs, size)?;
            let got = subpixel.forward(&xs, size)?;
            assert_eq!(got.dims(), expected.dims(), "{size:?}");
            let diff = (got - expected)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
            assert!(diff < 1e-5, "{size:?}: max diff {diff}");
        }
        let UpsampleForm::Subpixel { conv, .. } = &subpixel.form else { panic!("not the sub-pixel form") };
        assert!(conv.get().is_some(), "the odd sizes uploaded the two-step filter");
        Ok(())
    }
}
