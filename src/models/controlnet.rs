//! diffusers' `ControlNetModel`: a copy of the UNet's encoder (down blocks + mid block) fed
//! with the noisy latents plus an embedding of the control image, whose per-resolution
//! features go through 1x1 "zero convolutions" and are added to the UNet's skip connections.
//!
//! The ControlNet's own self-attentions never call a cross-frame hook.

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

use serde::Deserialize;

use super::attention::NoHook;
use super::embeddings::{Activation, TimestepEmbedding, Timesteps};
use super::resnet::{ResnetTimeProjection, TimeEmbedding};
pub use super::unet_blocks::ControlNetResiduals;
use super::unet_blocks::{DownBlock, DownBlockSettings, MidBlock, MidBlockSettings, ResnetSettings};
use super::unet_config::{
    EncoderParams, LayersOfBlock, OneOrMany, check_common, defaults, down_block_settings, heads_per_block,
    mid_block_settings, resnet_settings,
};
use crate::ops::fused::Epilogue;
use crate::ops::{Conv2d, channels_last};

/// `config.json` of a diffusers `ControlNetModel`. Missing keys take diffusers' defaults.
#[derive(Debug, Clone, Deserialize)]
pub struct ControlNetConfig {
    #[serde(default = "defaults::four")]
    pub in_channels: usize,
    #[serde(default = "defaults::three")]
    pub conditioning_channels: usize,
    #[serde(default = "defaults::yes")]
    pub flip_sin_to_cos: bool,
    #[serde(default)]
    pub freq_shift: f64,
    #[serde(default = "defaults::down_block_types")]
    pub down_block_types: Vec<String>,
    #[serde(default = "defaults::mid_block_type")]
    pub mid_block_type: Option<String>,
    #[serde(default = "defaults::no_block")]
    pub only_cross_attention: OneOrMany<bool>,
    #[serde(default = "defaults::block_out_channels")]
    pub block_out_channels: Vec<usize>,
    #[serde(default = "defaults::two")]
    pub layers_per_block: usize,
    #[serde(default = "defaults::one")]
    pub downsample_padding: usize,
    #[serde(default = "defaults::one_f64")]
    pub mid_block_scale_factor: f64,
    #[serde(default = "defaults::silu")]
    pub act_fn: String,
    #[serde(default = "defaults::norm_num_groups")]
    pub norm_num_groups: Option<usize>,
    #[serde(default = "defaults::norm_eps")]
    pub norm_eps: f64,
    #[serde(default = "defaults::cross_attention_dim")]
    pub cross_attention_dim: OneOrMany<usize>,
    #[serde(default = "defaults::transformer_layers_per_block")]
    pub transformer_layers_per_block: OneOrMany<LayersOfBlock>,
    #[serde(default)]
    pub encoder_hid_dim: Option<usize>,
    #[serde(default)]
    pub encoder_hid_dim_type: Option<String>,
    /// The number of heads unless `num_attention_heads` is set (diffusers' naming).
    #[serde(default = "defaults::attention_head_dim")]
    pub attention_head_dim: OneOrMany<usize>,
    #[serde(default)]
    pub num_attention_heads: Option<OneOrMany<usize>>,
    #[serde(default)]
    pub use_linear_projection: bool,
    #[serde(default)]
    pub class_embed_type: Option<String>,
    #[serde(default)]
    pub addition_embed_type: Option<String>,
    #[serde(default)]
    pub num_class_embeds: Option<usize>,
    #[serde(default)]
    pub upcast_attention: bool,
    #[serde(default = "defaults::default")]
    pub resnet_time_scale_shift: String,
    /// `"rgb"` or `"bgr"` (the control image's channels are reversed for bgr).
    #[serde(default = "defaults::rgb")]
    pub controlnet_conditioning_channel_order: String,
    #[serde(default = "defaults::conditioning_embedding_out_channels")]
    pub conditioning_embedding_out_channels: Vec<usize>,
    /// Average the residuals over space (diffusers' shuffle ControlNets).
    #[serde(default)]
    pub global_pool_conditions: bool,
}

impl ControlNetConfig {
    fn encoder_params(&self) -> Result<EncoderParams<'_>> {
        let n = self.down_block_types.len();
        check_common(
            &self.act_fn,
            &self.resnet_time_scale_shift,
            &self.class_embed_type,
            self.num_class_embeds,
            &self.addition_embed_type,
            self.encoder_hid_dim,
            &self.encoder_hid_dim_type,
            self.norm_num_groups,
            &self.block_out_channels,
            &self.down_block_types,
        )?;
        if !matches!(self.controlnet_conditioning_channel_order.as_str(), "rgb" | "bgr") {
            candle_core::bail!(
                "unsupported config: controlnet_conditioning_channel_order = {:?} (rgb or bgr)",
                self.controlnet_conditioning_channel_order
            );
        }
        if self.conditioning_embedding_out_channels.is_empty() {
            candle_core::bail!("config: conditioning_embedding_out_channels is empty");
        }
        let heads = heads_per_block(&self.num_attention_heads, &self.attention_head_dim, n)?;
        Ok(EncoderParams {
            down_block_types: &self.down_block_types,
            block_out_channels: &self.block_out_channels,
            layers_per_block: vec![self.layers_per_block; n],
            heads,
            cross_attention_dim: self.cross_attention_dim.per_block(n, "cross_attention_dim")?,
            transformer_layers: self.transformer_layers_per_block.per_block(n, "transformer_layers_per_block")?,
            only_cross_attention: self.only_cross_attention.per_block(n, "only_cross_attention")?,
            use_linear_projection: self.use_linear_projection,
            downsample_padding: self.downsample_padding,
            mid_block_type: self.mid_block_type.as_deref(),
            mid_block_scale_factor: self.mid_block_scale_factor,
        })
    }

    /// Time embedding width (always `4 * block_out_channels[0]` for ControlNet).
    pub fn time_embed_dim(&self) -> usize {
        4 * self.block_out_channels.first().copied().unwrap_or(0)
    }

    pub fn resnet_settings(&self) -> Result<ResnetSettings> {
        resnet_settings(self.norm_num_groups, self.norm_eps, self.time_embed_dim())
    }

    pub fn down_blocks(&self) -> Result<Vec<DownBlockSettings>> {
        down_block_settings(&self.encoder_params()?)
    }

    /// The mid block; ControlNet requires one.
    pub fn mid_block(&self) -> Result<MidBlockSettings> {
        mid_block_settings(&self.encoder_params()?)?
            .ok_or_else(|| candle_core::Error::Msg("unsupported config: ControlNet mid_block_type = null".into()))
    }

    /// Channels of each down residual (one per UNet skip connection).
    pub fn down_residual_channels(&self) -> Result<Vec<usize>> {
        let mut out = vec![self.block_out_channels[0]];
        for d in self.down_blocks()? {
            out.extend(std::iter::repeat_n(d.out_channels, d.num_layers + usize::from(d.add_downsample)));
        }
        Ok(out)
    }
}

/// A control image after `controlnet_cond_embedding`: `(n, block_out_channels[0], h, w)` at the
/// latent size. Made by [`ControlNetModel::embed_condition`].
#[derive(Debug, Clone)]
pub struct ControlCondition {
    embedding: Tensor,
}

impl ControlCondition {
    /// The embedding, `(n, block_out_channels[0], h, w)`.
    pub fn tensor(&self) -> &Tensor {
        &self.embedding
    }

    /// An embedding made by `embed_condition` (or a copy of one, e.g. a static buffer that a
    /// captured CUDA graph reads).
    pub(crate) fn from_embedding(embedding: Tensor) -> Self {
        Self { embedding }
    }
}

/// `controlnet_cond_embedding`: conv_in, pairs of (3x3, strided 3x3) convs, conv_out, SiLU
/// between all of them. On CUDA in f16/bf16 it runs channels-last (NHWC) between one transpose
/// in and one out, each convolution's bias and SiLU one pass after it: cuDNN would otherwise
/// transpose every convolution's input and output, and at full resolution with 16 to 96
/// channels those transposes and the separate bias and SiLU passes cost more than the
/// convolutions.
#[derive(Debug, Clone)]
struct ConditioningEmbedding {
    conv_in: Conv2d,
    blocks: Vec<Conv2d>,
    conv_out: Conv2d,
    channels_last: bool,
}

impl ConditioningEmbedding {
    fn new(vb: VarBuilder, conditioning_channels: usize, channels: &[usize], out_channels: usize) -> Result<Self> {
        let conv_in = Conv2d::same(vb.pp("conv_in"), conditioning_channels, channels[0], 3, 1)?;
        let mut blocks = Vec::new();
        for (i, w) in channels.windows(2).enumerate() {
            blocks.push(Conv2d::same(vb.pp("blocks").pp(2 * i), w[0], w[0], 3, 1)?);
            blocks.push(Conv2d::same(vb.pp("blocks").pp(2 * i + 1), w[0], w[1], 3, 2)?);
        }
        let conv_out = Conv2d::same(vb.pp("conv_out"), *channels.last().expect("non-empty"), out_channels, 3, 1)?;
        let embedding = Self { conv_in, blocks, conv_out, channels_last: false };
        if channels_last::wanted_for_frame_stages(vb.device(), vb.dtype()) {
            embedding.to_channels_last()
        } else {
            Ok(embedding)
        }
    }

    /// The same embedding computing channels-last.
    fn to_channels_last(self) -> Result<Self> {
        if self.channels_last {
            return Ok(self);
        }
        Ok(Self {
            conv_in: self.conv_in.to_channels_last()?,
            blocks: self.blocks.into_iter().map(Conv2d::to_channels_last).collect::<Result<_>>()?,
            conv_out: self.conv_out.to_channels_last()?,
            channels_last: true,
        })
    }

    fn to_device(&self, device: &candle_core::Device) -> Result<Self> {
        Ok(Self {
            conv_in: self.conv_in.to_device(device)?,
            blocks: self.blocks.iter().map(|b| b.to_device(device)).collect::<Result<_>>()?,
            conv_out: self.conv_out.to_device(device)?,
            channels_last: self.channels_last,
        })
    }

    /// [`Module::forward`] on NCHW input and output, NHWC inside.
    fn forward_channels_last(&self, xs: &Tensor) -> Result<Tensor> {
        let mut xs = self.conv_in.forward_channels_last(&xs.permute((0, 2, 3, 1))?, None, Epilogue::Silu)?;
        for b in &self.blocks {
            xs = b.forward_channels_last(&xs, None, Epilogue::Silu)?;
        }
        self.conv_out.forward_channels_last(&xs, None, Epilogue::None)?.permute((0, 3, 1, 2))?.contiguous()
    }
}

/// The control-image embedding alone (`controlnet_cond_embedding`), e.g. with its weights on
/// another device than the ControlNet's ([`ControlNetModel::condition_embedder_on`]).
#[derive(Debug)]
pub struct ConditionEmbedder {
    cond_embedding: ConditioningEmbedding,
    config: ControlNetConfig,
    downscale: usize,
}

impl ConditionEmbedder {
    /// As [`ControlNetModel::embed_condition`] (the same computation).
    pub fn embed_condition(&self, control_image: &Tensor) -> Result<ControlCondition> {
        embed_condition(&self.cond_embedding, &self.config, self.downscale, control_image)
    }

    /// The same embedding computing channels-last, as a ControlNet loaded on CUDA in f16/bf16
    /// does (elsewhere through transposed copies, for tests).
    pub fn to_channels_last(self) -> Result<Self> {
        Ok(Self { cond_embedding: self.cond_embedding.to_channels_last()?, ..self })
    }

    pub fn is_channels_last(&self) -> bool {
        self.cond_embedding.channels_last
    }
}

fn embed_condition(
    cond_embedding: &ConditioningEmbedding,
    config: &ControlNetConfig,
    downscale: usize,
    control_image: &Tensor,
) -> Result<ControlCondition> {
    let (_, cc, ch, cw) = control_image.dims4()?;
    if cc != config.conditioning_channels || ch % downscale != 0 || cw % downscale != 0 {
        candle_core::bail!(
            "controlnet: control image {:?} must have {} channels and a size that is a multiple of {}",
            control_image.dims(),
            config.conditioning_channels,
            downscale
        );
    }
    let control = if config.controlnet_conditioning_channel_order == "bgr" {
        let idx: Vec<u32> = (0..cc as u32).rev().collect();
        let idx = Tensor::new(idx.as_slice(), control_image.device())?;
        control_image.index_select(&idx, 1)?
    } else {
        control_image.clone()
    };
    Ok(ControlCondition { embedding: cond_embedding.forward(&control)? })
}

impl Module for ConditioningEmbedding {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        if self.channels_last {
            return self.forward_channels_last(xs);
        }
        let mut xs = candle_nn::ops::silu(&self.conv_in.forward(xs)?)?;
        for b in &self.blocks {
            xs = candle_nn::ops::silu(&b.forward(&xs)?)?;
        }
        self.conv_out.forward(&xs)
    }
}

/// The diffusers ControlNetModel.
#[derive(Debug)]
pub struct ControlNetModel {
    conv_in: Conv2d,
    time_proj: Timesteps,
    time_embedding: TimestepEmbedding,
    cond_embedding: ConditioningEmbedding,
    down_blocks: Vec<DownBlock>,
    controlnet_down_blocks: Vec<Conv2d>,
    mid_block: MidBlock,
    /// Every resnet's time-embedding projection, one matrix product per call.
    resnet_time: Option<ResnetTimeProjection>,
    controlnet_mid_block: Conv2d,
    downscale: usize,
    config: ControlNetConfig,
    span: tracing::Span,
}

impl ControlNetModel {
    /// Builds the model; `vb` points at the root of the ControlNet weights (diffusers names).
    pub fn new(vb: VarBuilder, config: &ControlNetConfig) -> Result<Self> {
        let _span = tracing::info_span!("controlnet-load", blocks = ?config.block_out_channels).entered();
        let down = config.down_blocks()?;
        let mid = config.mid_block()?;
        let resnet = config.resnet_settings()?;
        let c0 = config.block_out_channels[0];
        let conv_in = Conv2d::same(vb.pp("conv_in"), config.in_channels, c0, 3, 1)?;
        let time_proj = Timesteps::new(c0, config.flip_sin_to_cos, config.freq_shift);
        let time_embedding = TimestepEmbedding::new(
            vb.pp("time_embedding"),
            c0,
            config.time_embed_dim(),
            Activation::from_name(&config.act_fn)?,
            None,
        )?;
        let cond_embedding = ConditioningEmbedding::new(
            vb.pp("controlnet_cond_embedding"),
            config.conditioning_channels,
            &config.conditioning_embedding_out_channels,
            c0,
        )?;
        let mut down_blocks = down
            .iter()
            .enumerate()
            .map(|(i, s)| {
                DownBlock::new(vb.pp("down_blocks").pp(i.to_string()), s, &resnet, &format!("down_blocks.{i}"))
            })
            .collect::<Result<Vec<_>>>()?;
        let controlnet_down_blocks = config
            .down_residual_channels()?
            .iter()
            .enumerate()
            .map(|(i, &c)| Conv2d::new(vb.pp("controlnet_down_blocks").pp(i), c, c, 1, 0, 1))
            .collect::<Result<Vec<_>>>()?;
        let mut mid_block = MidBlock::new(vb.pp("mid_block"), &mid, &resnet, "mid_block")?;
        let resnet_time = ResnetTimeProjection::fuse(
            down_blocks.iter_mut().flat_map(DownBlock::resnets_mut).chain(mid_block.resnets_mut()),
        )?;
        let controlnet_mid_block = Conv2d::new(vb.pp("controlnet_mid_block"), mid.channels, mid.channels, 1, 0, 1)?;
        let downscale = 1usize << (config.conditioning_embedding_out_channels.len() - 1);
        Ok(Self {
            conv_in,
            time_proj,
            time_embedding,
            cond_embedding,
            down_blocks,
            controlnet_down_blocks,
            mid_block,
            resnet_time,
            controlnet_mid_block,
            downscale,
            config: config.clone(),
            span: tracing::debug_span!("controlnet"),
        })
    }

    pub fn config(&self) -> &ControlNetConfig {
        &self.config
    }

    /// `control_image`: (batch, conditioning_channels, h * f, w * f) in [0, 1], where `f` is
    /// `2^(len(conditioning_embedding_out_channels) - 1)` (8 for SD1.5) and (h, w) the latent
    /// size. Returns the residuals already multiplied by `conditioning_scale`.
    /// Embeds the control image on every call, as diffusers does; a denoising loop should
    /// call [`Self::embed_condition`] once and [`Self::forward_embedded`] per step.
    pub fn forward(
        &self,
        sample: &Tensor,
        timestep: f64,
        encoder_hidden_states: &Tensor,
        control_image: &Tensor,
        conditioning_scale: f64,
    ) -> Result<ControlNetResiduals> {
        let condition = self.embed_condition(control_image)?;
        self.forward_embedded(sample, timestep, encoder_hidden_states, &condition, conditioning_scale)
    }

    /// Runs `controlnet_cond_embedding` on `control_image` ((n, conditioning_channels, H, W) in
    /// [0, 1], H and W multiples of the downscale factor). The embedding depends on nothing
    /// else, so one frame needs it once for all its denoising steps, and once for both
    /// halves of a classifier-free-guidance batch (n = 1 broadcasts over the batch).
    pub fn embed_condition(&self, control_image: &Tensor) -> Result<ControlCondition> {
        let _enter = self.span.enter();
        embed_condition(&self.cond_embedding, &self.config, self.downscale, control_image)
    }

    /// The control-image embedding with its weights copied to `device` (queued there: the
    /// weights must be ready on the ControlNet's device first).
    pub fn condition_embedder_on(&self, device: &candle_core::Device) -> Result<ConditionEmbedder> {
        Ok(ConditionEmbedder {
            cond_embedding: self.cond_embedding.to_device(device)?,
            config: self.config.clone(),
            downscale: self.downscale,
        })
    }

    /// The ControlNet on `sample` (batch, in_channels, h, w) with a control image already
    /// embedded by [`Self::embed_condition`] (batch 1 or `batch`, at the latent size h x w).
    /// Returns the residuals already multiplied by `conditioning_scale`.
    pub fn forward_embedded(
        &self,
        sample: &Tensor,
        timestep: f64,
        encoder_hidden_states: &Tensor,
        condition: &ControlCondition,
        conditioning_scale: f64,
    ) -> Result<ControlNetResiduals> {
        let batch = sample.dims4()?.0;
        self.forward_embedded_each(sample, &vec![timestep; batch], encoder_hidden_states, condition, conditioning_scale)
    }

    /// [`Self::forward_embedded`] with a timestep for each row of the batch.
    pub fn forward_embedded_each(
        &self,
        sample: &Tensor,
        timesteps: &[f64],
        encoder_hidden_states: &Tensor,
        condition: &ControlCondition,
        conditioning_scale: f64,
    ) -> Result<ControlNetResiduals> {
        let _enter = self.span.enter();
        let (batch, _, h, w) = sample.dims4()?;
        if timesteps.len() != batch {
            candle_core::bail!("controlnet: {} timesteps for a batch of {batch}", timesteps.len());
        }
        let (cb, _, ch, cw) = condition.embedding.dims4()?;
        if !(cb == batch || cb == 1) || ch != h || cw != w {
            candle_core::bail!(
                "controlnet: a control image embedded as {:?} does not fit latents {:?} (the image must be \
                 {}x the latent size, batch 1 or {batch})",
                condition.embedding.dims(),
                sample.dims(),
                self.downscale
            );
        }
        let (ebatch, _, _) = encoder_hidden_states.dims3()?;
        if ebatch != batch {
            candle_core::bail!("controlnet: encoder_hidden_states batch {ebatch} does not match sample batch {batch}");
        }

        let t_emb = self.time_proj.forward_each(timesteps, sample.dtype(), sample.device())?;
        let emb = TimeEmbedding::new(&self.time_embedding.forward(&t_emb)?, self.resnet_time.as_ref())?;

        let mut xs = self.conv_in.forward(sample)?;
        xs = xs.broadcast_add(&condition.embedding)?;
        let mut hook = NoHook;
        let mut skips = vec![xs.clone()];
        for block in &self.down_blocks {
            let (out, res) = block.forward(&xs, &emb, encoder_hidden_states, &mut hook)?;
            xs = out;
            skips.extend(res);
        }
        let xs = self.mid_block.forward(&xs, &emb, encoder_hidden_states, &mut hook)?;

        // Each zero convolution's bias and the conditioning scale are one pass (on CUDA).
        let finish = |conv: &Conv2d, s: &Tensor| -> Result<Tensor> {
            let t = conv.forward_scaled(s, conditioning_scale)?;
            if self.config.global_pool_conditions { t.mean_keepdim(3)?.mean_keepdim(2) } else { Ok(t) }
        };
        let down = skips
            .iter()
            .zip(&self.controlnet_down_blocks)
            .map(|(s, conv)| finish(conv, s))
            .collect::<Result<Vec<_>>>()?;
        let mid = finish(&self.controlnet_mid_block, &xs)?;
        Ok(ControlNetResiduals { down, mid })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sd15_canny_config_derives_diffusers_blocks() -> Result<()> {
        let c = crate::models::sd15::controlnet_config()?;
        assert_eq!(c.time_embed_dim(), 1280);
        assert_eq!(c.conditioning_channels, 3);
        assert!(!c.global_pool_conditions);
        assert_eq!(c.down_residual_channels()?, [320, 320, 320, 320, 640, 640, 640, 1280, 1280, 1280, 1280, 1280]);
        let heads: Vec<_> = c
            .down_blocks()?
            .iter()
            .map(|d| d.attention.as_ref().map(|a| (a.num_attention_heads, a.attention_head_dim, a.cross_attention_dim)))
            .collect();
        assert_eq!(heads, [Some((8, 40, 768)), Some((8, 80, 768)), Some((8, 160, 768)), None]);
        let mid = c.mid_block()?;
        assert_eq!(mid.attention.unwrap().attention_head_dim, 160);
        Ok(())
    }

    #[test]
    fn bad_channel_order_is_named() {
        let c: ControlNetConfig = serde_json::from_str(r#"{"controlnet_conditioning_channel_order": "rbg"}"#).unwrap();
        let e = c.down_blocks().unwrap_err().to_string();
        assert!(e.contains("controlnet_conditioning_channel_order"), "{e}");
    }
}
