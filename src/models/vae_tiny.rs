//! AutoencoderTiny (TAESD, a distilled VAE of about 2.4 M parameters) from a diffusers
//! directory such as madebyollin/taesd: diffusers' `AutoencoderTiny` with its `EncoderTiny`
//! and `DecoderTiny`, weight names unchanged.
//!
//! The math, as diffusers computes it:
//! - `encode`: images in [-1, 1] are mapped to [0, 1] (TAESD's convention), then a 3x3
//!   convolution, per stage a stride-2 3x3 convolution without bias (all but the first stage)
//!   and `num_encoder_blocks[i]` blocks, then a 3x3 convolution to `latent_channels`. No
//!   posterior: the output is the latent itself.
//! - `decode`: latents are soft-clamped to (-3, 3) with `tanh(x / 3) * 3`, then a 3x3
//!   convolution and the activation, per stage `num_decoder_blocks[i]` blocks and, except in
//!   the last stage, `upsample_fn` by `upsampling_scaling_factor` and a bias-free 3x3
//!   convolution; the last stage's convolution (with bias) gives `out_channels`. The [0, 1]
//!   output is mapped to [-1, 1].
//! - A block (`AutoencoderTinyBlock`): `relu(conv(act(conv(act(conv(x))))) + skip(x))`, with
//!   `skip` the identity (or a bias-free 1x1 convolution where the widths differ); the final
//!   ReLU is a ReLU whatever `act_fn` is.
//!
//! `scaling_factor` (1.0 for TAESD) is what the pipeline multiplies the encoder's output by
//! and divides latents by before decoding, as for AutoencoderKL. `latent_magnitude` and
//! `latent_shift` only map latents to [0, 1] for diffusers' 8-bit round trip in
//! `AutoencoderTiny.forward` (`scale_latents` / `unscale_latents`), which no pipeline uses; they
//! are read and offered as [`AutoencoderTiny::latents_to_unit`] and its inverse. `force_upcast`
//! is read and has no effect (diffusers registers it as false for this model: TAESD runs in
//! f16).
//!
//! The convolutions, bias and residual adds are the backend's ([`crate::ops::Conv2d`]: tuned
//! convolutions on CUDA, and the block's last convolution, its bias and the skip connection
//! in one fused epilogue). On CUDA in f16/bf16 the whole model runs channels-last (NHWC) between
//! one transpose in and one out ([`AutoencoderTiny::to_channels_last`]): cuDNN computes f16
//! convolutions on NHWC data and otherwise transposes every NCHW input and output, which at 64
//! channels and full resolution costs about as much as the convolution; each convolution's bias,
//! skip connection and activation are then one pass after it.

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;
use serde::Deserialize;

use crate::ops::fused::Epilogue;
use crate::ops::{Conv2d, channels_last};

/// `config.json` of a diffusers `AutoencoderTiny` (defaults are diffusers', i.e. TAESD's).
#[derive(Debug, Clone, Deserialize)]
pub struct AutoencoderTinyConfig {
    #[serde(default = "three")]
    pub in_channels: usize,
    #[serde(default = "three")]
    pub out_channels: usize,
    #[serde(default = "sixty_four_x4")]
    pub encoder_block_out_channels: Vec<usize>,
    #[serde(default = "sixty_four_x4")]
    pub decoder_block_out_channels: Vec<usize>,
    #[serde(default = "relu")]
    pub act_fn: String,
    #[serde(default = "nearest")]
    pub upsample_fn: String,
    #[serde(default = "four")]
    pub latent_channels: usize,
    #[serde(default = "two")]
    pub upsampling_scaling_factor: usize,
    #[serde(default = "encoder_blocks")]
    pub num_encoder_blocks: Vec<usize>,
    #[serde(default = "decoder_blocks")]
    pub num_decoder_blocks: Vec<usize>,
    #[serde(default = "three_f")]
    pub latent_magnitude: f64,
    #[serde(default = "half")]
    pub latent_shift: f64,
    #[serde(default)]
    pub force_upcast: bool,
    #[serde(default = "one_f")]
    pub scaling_factor: f64,
    #[serde(default)]
    pub shift_factor: Option<f64>,
}

fn two() -> usize {
    2
}
fn three() -> usize {
    3
}
fn four() -> usize {
    4
}
fn sixty_four_x4() -> Vec<usize> {
    vec![64; 4]
}
fn encoder_blocks() -> Vec<usize> {
    vec![1, 3, 3, 3]
}
fn decoder_blocks() -> Vec<usize> {
    vec![3, 3, 3, 1]
}
fn relu() -> String {
    "relu".into()
}
fn nearest() -> String {
    "nearest".into()
}
fn one_f() -> f64 {
    1.0
}
fn three_f() -> f64 {
    3.0
}
fn half() -> f64 {
    0.5
}

impl AutoencoderTinyConfig {
    fn check(&self) -> Result<()> {
        for (channels, blocks, what) in [
            (&self.encoder_block_out_channels, &self.num_encoder_blocks, "encoder"),
            (&self.decoder_block_out_channels, &self.num_decoder_blocks, "decoder"),
        ] {
            if channels.is_empty() {
                candle_core::bail!("tiny vae config: {what}_block_out_channels is empty");
            }
            if channels.len() != blocks.len() {
                candle_core::bail!(
                    "tiny vae config: {what}_block_out_channels {channels:?} and num_{what}_blocks {blocks:?} differ in length"
                );
            }
            // diffusers gives stage i's first convolution block_out_channels[i] inputs, fed by
            // stage i - 1's output: only equal widths fit together.
            if channels.windows(2).any(|w| w[0] != w[1]) {
                candle_core::bail!(
                    "tiny vae config: {what}_block_out_channels {channels:?} must all be equal (each stage's first convolution takes its own width, fed by the previous stage)"
                );
            }
        }
        Activation::parse(&self.act_fn)?;
        if !(self.scaling_factor.is_finite() && self.scaling_factor > 0.0) {
            candle_core::bail!("tiny vae config: scaling_factor {} must be a positive number", self.scaling_factor);
        }
        if self.upsample_fn != "nearest" {
            candle_core::bail!("tiny vae config: upsample_fn {:?} is not supported (only nearest)", self.upsample_fn);
        }
        if self.upsampling_scaling_factor == 0 {
            candle_core::bail!("tiny vae config: upsampling_scaling_factor is 0");
        }
        let down = self.downscale_factor();
        let up = self.upsampling_scaling_factor.pow(self.decoder_block_out_channels.len() as u32 - 1);
        if up != down {
            candle_core::bail!(
                "tiny vae config: the encoder downscales by {down} ({} stages) but the decoder upscales by {up} ({} stages x upsampling_scaling_factor {})",
                self.encoder_block_out_channels.len(),
                self.decoder_block_out_channels.len(),
                self.upsampling_scaling_factor
            );
        }
        if self.shift_factor.is_some_and(|s| s != 0.0) {
            candle_core::bail!("tiny vae config: shift_factor is not supported (SD1.5's TAESD has none)");
        }
        Ok(())
    }

    /// Image pixels per latent along each side: 2 per encoder stage after the first (8 for
    /// TAESD); diffusers' pipelines derive the same from the decoder's stages.
    pub fn downscale_factor(&self) -> usize {
        1 << self.encoder_block_out_channels.len().saturating_sub(1)
    }
}

/// diffusers' `get_activation` names (lower-cased), except mish.
#[derive(Debug, Clone, Copy)]
enum Activation {
    Relu,
    Silu,
    Gelu,
}

impl Activation {
    fn parse(name: &str) -> Result<Self> {
        Ok(match name.to_ascii_lowercase().as_str() {
            "relu" => Self::Relu,
            "silu" | "swish" => Self::Silu,
            "gelu" => Self::Gelu,
            _ => candle_core::bail!("tiny vae config: act_fn {name:?} is not supported (relu, silu, swish or gelu)"),
        })
    }

    fn apply(self, xs: &Tensor) -> Result<Tensor> {
        match self {
            Self::Relu => xs.relu(),
            Self::Silu => xs.silu(),
            // torch.nn.GELU's default: the exact (erf) form.
            Self::Gelu => xs.gelu_erf(),
        }
    }

    /// The convolution epilogue that computes this activation, where there is one.
    fn epilogue(self) -> Option<Epilogue> {
        match self {
            Self::Relu => Some(Epilogue::Relu),
            Self::Silu => Some(Epilogue::Silu),
            Self::Gelu => None,
        }
    }
}

/// `activation(conv(xs) + bias)` channels-last: the activation in the convolution's epilogue,
/// or after it where it has none.
fn conv_nhwc(conv: &Conv2d, xs: &Tensor, activation: Option<Activation>) -> Result<Tensor> {
    match activation {
        None => conv.forward_channels_last(xs, None, Epilogue::None),
        Some(act) => match act.epilogue() {
            Some(epilogue) => conv.forward_channels_last(xs, None, epilogue),
            None => act.apply(&conv.forward_channels_last(xs, None, Epilogue::None)?),
        },
    }
}

/// Nearest-neighbour upsampling of (batch, height, width, channels) by `factor`: each pixel
/// broadcast over a factor x factor patch, one copy.
fn upsample_nearest_nhwc(xs: &Tensor, factor: usize) -> Result<Tensor> {
    let (n, h, w, c) = xs.dims4()?;
    xs.reshape((n, h, 1, w, 1, c))?.broadcast_as((n, h, factor, w, factor, c))?.contiguous()?.reshape((
        n,
        h * factor,
        w * factor,
        c,
    ))
}

fn conv3x3(vb: VarBuilder, in_channels: usize, out_channels: usize) -> Result<Conv2d> {
    Conv2d::same(vb, in_channels, out_channels, 3, 1)
}

/// `AutoencoderTinyBlock`: three 3x3 convolutions with the activation between them, plus the
/// skip connection, then ReLU.
#[derive(Debug)]
struct TinyBlock {
    convs: [Conv2d; 3],
    skip: Option<Conv2d>,
    act: Activation,
}

impl TinyBlock {
    fn new(vb: VarBuilder, in_channels: usize, out_channels: usize, act: Activation) -> Result<Self> {
        let conv = vb.pp("conv");
        let convs = [
            conv3x3(conv.pp(0), in_channels, out_channels)?,
            conv3x3(conv.pp(2), out_channels, out_channels)?,
            conv3x3(conv.pp(4), out_channels, out_channels)?,
        ];
        let skip = (in_channels != out_channels)
            .then(|| Conv2d::without_bias(vb.pp("skip"), in_channels, out_channels, 1, 0, 1))
            .transpose()?;
        Ok(Self { convs, skip, act })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let [first, second, third] = &self.convs;
        let h = self.act.apply(&first.forward(xs)?)?;
        let h = self.act.apply(&second.forward(&h)?)?;
        let skip = match &self.skip {
            Some(conv) => conv.forward(xs)?,
            None => xs.clone(),
        };
        // Convolution, bias and skip connection: one epilogue on CUDA.
        third.forward_add(&h, None, Some(&skip))?.relu()
    }

    /// [`Self::forward`] on (batch, height, width, channels).
    fn forward_nhwc(&self, xs: &Tensor) -> Result<Tensor> {
        let [first, second, third] = &self.convs;
        let h = conv_nhwc(first, xs, Some(self.act))?;
        let h = conv_nhwc(second, &h, Some(self.act))?;
        let skip = match &self.skip {
            Some(conv) => conv.forward_channels_last(xs, None, Epilogue::None)?,
            None => xs.clone(),
        };
        third.forward_channels_last(&h, Some(&skip), Epilogue::Relu)
    }

    fn to_channels_last(self) -> Result<Self> {
        let [first, second, third] = self.convs;
        Ok(Self {
            convs: [first.to_channels_last()?, second.to_channels_last()?, third.to_channels_last()?],
            skip: self.skip.map(Conv2d::to_channels_last).transpose()?,
            act: self.act,
        })
    }
}

/// A step of `EncoderTiny` / `DecoderTiny`'s `nn.Sequential` (a convolution and the
/// activation layer after it are one step).
#[derive(Debug)]
enum Layer {
    Conv(Conv2d, Option<Activation>),
    Block(TinyBlock),
    Upsample(usize),
}

impl Layer {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        match self {
            Self::Conv(conv, None) => conv.forward(xs),
            Self::Conv(conv, Some(act)) => act.apply(&conv.forward(xs)?),
            Self::Block(block) => block.forward(xs),
            Self::Upsample(factor) => {
                let (_, _, h, w) = xs.dims4()?;
                xs.upsample_nearest2d(h * factor, w * factor)
            }
        }
    }

    /// [`Self::forward`] on (batch, height, width, channels), after [`Self::to_channels_last`].
    fn forward_nhwc(&self, xs: &Tensor) -> Result<Tensor> {
        match self {
            Self::Conv(conv, act) => conv_nhwc(conv, xs, *act),
            Self::Block(block) => block.forward_nhwc(xs),
            Self::Upsample(factor) => upsample_nearest_nhwc(xs, *factor),
        }
    }

    fn to_channels_last(self) -> Result<Self> {
        Ok(match self {
            Self::Conv(conv, act) => Self::Conv(conv.to_channels_last()?, act),
            Self::Block(block) => Self::Block(block.to_channels_last()?),
            Self::Upsample(factor) => Self::Upsample(factor),
        })
    }
}

/// The layers on `xs`: NCHW, or NHWC when `channels_last` (filters converted).
fn run_layers(layers: &[Layer], xs: &Tensor, channels_last: bool) -> Result<Tensor> {
    layers.iter().try_fold(
        xs.clone(),
        |xs, layer| {
            if channels_last { layer.forward_nhwc(&xs) } else { layer.forward(&xs) }
        },
    )
}

/// `EncoderTiny`'s layers; `vb` is the encoder's `layers` (indices as in the Sequential).
fn encoder_layers(vb: VarBuilder, config: &AutoencoderTinyConfig, act: Activation) -> Result<Vec<Layer>> {
    let mut layers = Vec::new();
    let channels = &config.encoder_block_out_channels;
    for (stage, (&width, &blocks)) in channels.iter().zip(&config.num_encoder_blocks).enumerate() {
        let conv = vb.pp(layers.len());
        let conv = if stage == 0 {
            conv3x3(conv, config.in_channels, width)?
        } else {
            Conv2d::without_bias(conv, width, width, 3, 1, 2)?
        };
        layers.push(Layer::Conv(conv, None));
        for _ in 0..blocks {
            layers.push(Layer::Block(TinyBlock::new(vb.pp(layers.len()), width, width, act)?));
        }
    }
    let last = *channels.last().expect("checked non-empty");
    layers.push(Layer::Conv(conv3x3(vb.pp(layers.len()), last, config.latent_channels)?, None));
    Ok(layers)
}

/// `DecoderTiny`'s layers; `vb` is the decoder's `layers`.
fn decoder_layers(vb: VarBuilder, config: &AutoencoderTinyConfig, act: Activation) -> Result<Vec<Layer>> {
    let channels = &config.decoder_block_out_channels;
    // The Sequential's first convolution (0) and its activation (1) are one layer here, so the
    // Sequential index of the next layer is `layers.len() + 1`.
    let mut layers = vec![Layer::Conv(conv3x3(vb.pp(0), config.latent_channels, channels[0])?, Some(act))];
    for (stage, (&width, &blocks)) in channels.iter().zip(&config.num_decoder_blocks).enumerate() {
        let last_stage = stage + 1 == channels.len();
        for _ in 0..blocks {
            layers.push(Layer::Block(TinyBlock::new(vb.pp(layers.len() + 1), width, width, act)?));
        }
        if !last_stage {
            layers.push(Layer::Upsample(config.upsampling_scaling_factor));
        }
        let conv = vb.pp(layers.len() + 1);
        let conv = if last_stage {
            conv3x3(conv, width, config.out_channels)?
        } else {
            Conv2d::without_bias(conv, width, width, 3, 1, 1)?
        };
        layers.push(Layer::Conv(conv, None));
    }
    Ok(layers)
}

/// The tiny VAE: images in [-1, 1] to latents and back.
#[derive(Debug)]
pub struct AutoencoderTiny {
    encoder: Vec<Layer>,
    decoder: Vec<Layer>,
    config: AutoencoderTinyConfig,
    /// Filters stored channels-last; activations NHWC between the input's and the output's
    /// transposes.
    channels_last: bool,
}

impl AutoencoderTiny {
    pub fn new(vb: VarBuilder, config: &AutoencoderTinyConfig) -> Result<Self> {
        let _span = tracing::info_span!("vae-tiny-load").entered();
        config.check()?;
        let act = Activation::parse(&config.act_fn)?;
        let model = Self {
            encoder: encoder_layers(vb.pp("encoder").pp("layers"), config, act)?,
            decoder: decoder_layers(vb.pp("decoder").pp("layers"), config, act)?,
            config: config.clone(),
            channels_last: false,
        };
        if channels_last::wanted_for_frame_stages(vb.device(), vb.dtype()) {
            model.to_channels_last()
        } else {
            Ok(model)
        }
    }

    /// The same model computing channels-last (what [`Self::new`] builds on CUDA in f16/bf16;
    /// elsewhere the same values through transposed copies, for tests).
    pub fn to_channels_last(self) -> Result<Self> {
        if self.channels_last {
            return Ok(self);
        }
        let convert = |layers: Vec<Layer>| layers.into_iter().map(Layer::to_channels_last).collect::<Result<Vec<_>>>();
        Ok(Self { encoder: convert(self.encoder)?, decoder: convert(self.decoder)?, channels_last: true, ..self })
    }

    pub fn is_channels_last(&self) -> bool {
        self.channels_last
    }

    pub fn config(&self) -> &AutoencoderTinyConfig {
        &self.config
    }

    /// Latents = encoder output * scaling_factor is what the UNet works on (1.0 for TAESD).
    pub fn scaling_factor(&self) -> f64 {
        self.config.scaling_factor
    }

    /// The latents of images in [-1, 1] (not yet multiplied by `scaling_factor`).
    pub fn encode(&self, image: &Tensor) -> Result<Tensor> {
        check_nchw("encode", image, self.config.in_channels)?;
        // [-1, 1] -> [0, 1]: (x + 1) / 2.
        let unit = image.affine(0.5, 0.5)?;
        if !self.channels_last {
            return run_layers(&self.encoder, &unit, false);
        }
        run_layers(&self.encoder, &unit.permute((0, 2, 3, 1))?, true)?.permute((0, 3, 1, 2))?.contiguous()
    }

    /// Decodes (unscaled) latents to images in about [-1, 1].
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        check_nchw("decode", latents, self.config.latent_channels)?;
        // The soft clamp: tanh(x / 3) * 3.
        let xs = (latents / 3.0)?.tanh()?.affine(3.0, 0.0)?;
        let image = if self.channels_last {
            run_layers(&self.decoder, &xs.permute((0, 2, 3, 1))?, true)?.permute((0, 3, 1, 2))?
        } else {
            run_layers(&self.decoder, &xs, false)?
        };
        // [0, 1] -> [-1, 1] (and the transposed view made contiguous).
        image.affine(2.0, -1.0)
    }

    /// diffusers' `scale_latents`: raw latents to [0, 1] (`x / (2 * latent_magnitude) +
    /// latent_shift`, clamped), as TAESD stores latents in 8-bit images.
    pub fn latents_to_unit(&self, latents: &Tensor) -> Result<Tensor> {
        let c = &self.config;
        latents.affine(1.0 / (2.0 * c.latent_magnitude), c.latent_shift)?.clamp(0f32, 1f32)
    }

    /// diffusers' `unscale_latents`: [0, 1] back to raw latents.
    pub fn latents_from_unit(&self, unit: &Tensor) -> Result<Tensor> {
        let c = &self.config;
        unit.affine(2.0 * c.latent_magnitude, -2.0 * c.latent_magnitude * c.latent_shift)
    }
}

/// The inputs are `(batch, channels, height, width)` with the configured channels.
fn check_nchw(what: &str, xs: &Tensor, channels: usize) -> Result<()> {
    match xs.dims() {
        &[_, c, h, w] if c == channels && h > 0 && w > 0 => Ok(()),
        dims => candle_core::bail!("tiny vae {what}: expected (batch, {channels}, height, width), got {dims:?}"),
    }
}
