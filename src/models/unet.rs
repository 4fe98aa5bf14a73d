//! diffusers' `UNet2DConditionModel` (the SD1.x/2.x denoiser) with ControlNet residuals and a
//! self-attention hook.
//!
//! The config is read from the checkpoint's `config.json` (`UNet2DConditionConfig`, diffusers'
//! defaults for missing keys); every shape is derived from it. Features the SD1.5-family
//! checkpoints never use (class / addition embeddings, dual cross-attention, scale-shift
//! resnets, other block types...) are rejected with an error naming the config key.

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;
use serde::Deserialize;

use super::attention::SelfAttentionHook;
use super::embeddings::{Activation, TimestepEmbedding, Timesteps};
use super::resnet::{ResnetTimeProjection, TimeEmbedding};
use super::unet_blocks::{
    ControlNetResiduals, CrossAttnSettings, DownBlock, DownBlockSettings, MidBlock, MidBlockSettings, ResnetSettings,
    SkipConnection, UpBlock, UpBlockSettings,
};
use super::unet_config::{
    EncoderParams, LayersOfBlock, OneOrMany, check_common, cross_attn_settings, defaults, down_block_settings,
    heads_per_block, mid_block_settings, resnet_settings,
};
use crate::ops::{Conv2d, GroupNorm, fused};

/// `unet/config.json` of a diffusers `UNet2DConditionModel`. Missing keys take diffusers'
/// defaults; unknown keys are ignored.
#[derive(Debug, Clone, Deserialize)]
pub struct UNet2DConditionConfig {
    #[serde(default = "defaults::four")]
    pub in_channels: usize,
    #[serde(default = "defaults::four")]
    pub out_channels: usize,
    #[serde(default)]
    pub center_input_sample: bool,
    #[serde(default = "defaults::yes")]
    pub flip_sin_to_cos: bool,
    #[serde(default)]
    pub freq_shift: f64,
    #[serde(default = "defaults::down_block_types")]
    pub down_block_types: Vec<String>,
    #[serde(default = "defaults::mid_block_type")]
    pub mid_block_type: Option<String>,
    #[serde(default = "defaults::up_block_types")]
    pub up_block_types: Vec<String>,
    #[serde(default = "defaults::no_block")]
    pub only_cross_attention: OneOrMany<bool>,
    #[serde(default = "defaults::block_out_channels")]
    pub block_out_channels: Vec<usize>,
    #[serde(default = "defaults::layers_per_block")]
    pub layers_per_block: OneOrMany<usize>,
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
    pub reverse_transformer_layers_per_block: Option<Vec<LayersOfBlock>>,
    #[serde(default)]
    pub encoder_hid_dim: Option<usize>,
    #[serde(default)]
    pub encoder_hid_dim_type: Option<String>,
    /// Despite the name, diffusers uses this as the number of heads (unless
    /// `num_attention_heads` is set); the head width is `channels / heads`.
    #[serde(default = "defaults::attention_head_dim")]
    pub attention_head_dim: OneOrMany<usize>,
    #[serde(default)]
    pub num_attention_heads: Option<OneOrMany<usize>>,
    #[serde(default)]
    pub dual_cross_attention: bool,
    #[serde(default)]
    pub use_linear_projection: bool,
    #[serde(default)]
    pub class_embed_type: Option<String>,
    #[serde(default)]
    pub addition_embed_type: Option<String>,
    #[serde(default)]
    pub num_class_embeds: Option<usize>,
    /// Accepted; attention scores are always computed in f32 for f16/bf16 inputs.
    #[serde(default)]
    pub upcast_attention: bool,
    #[serde(default = "defaults::default")]
    pub resnet_time_scale_shift: String,
    #[serde(default = "defaults::positional")]
    pub time_embedding_type: String,
    #[serde(default)]
    pub time_embedding_dim: Option<usize>,
    #[serde(default)]
    pub time_embedding_act_fn: Option<String>,
    #[serde(default)]
    pub timestep_post_act: Option<String>,
    #[serde(default)]
    pub time_cond_proj_dim: Option<usize>,
    #[serde(default = "defaults::three")]
    pub conv_in_kernel: usize,
    #[serde(default = "defaults::three")]
    pub conv_out_kernel: usize,
    #[serde(default = "defaults::default")]
    pub attention_type: String,
    #[serde(default)]
    pub cross_attention_norm: Option<String>,
}

impl UNet2DConditionConfig {
    /// Per-block heads: `num_attention_heads` when set, else `attention_head_dim` (diffusers'
    /// historical naming).
    fn heads(&self) -> Result<Vec<usize>> {
        heads_per_block(&self.num_attention_heads, &self.attention_head_dim, self.down_block_types.len())
    }

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
        let unsupported = |key: &str, value: &dyn std::fmt::Debug, why: &str| -> Result<()> {
            Err(candle_core::Error::Msg(format!("unsupported config: {key} = {value:?} ({why})")))
        };
        if self.dual_cross_attention {
            unsupported("dual_cross_attention", &true, "dual cross-attention is not supported")?;
        }
        if self.time_embedding_type != "positional" {
            unsupported("time_embedding_type", &self.time_embedding_type, "only \"positional\" is supported")?;
        }
        if self.time_cond_proj_dim.is_some() {
            unsupported("time_cond_proj_dim", &self.time_cond_proj_dim, "timestep conditioning is not supported")?;
        }
        if self.attention_type != "default" {
            unsupported("attention_type", &self.attention_type, "only \"default\" is supported")?;
        }
        if self.cross_attention_norm.is_some() {
            unsupported("cross_attention_norm", &self.cross_attention_norm, "must be null")?;
        }
        if self.up_block_types.len() != n {
            candle_core::bail!(
                "config: up_block_types {:?} must have as many entries as down_block_types {:?}",
                self.up_block_types,
                self.down_block_types
            );
        }
        if self.conv_in_kernel.is_multiple_of(2) || self.conv_out_kernel.is_multiple_of(2) {
            candle_core::bail!("config: conv_in_kernel / conv_out_kernel must be odd");
        }
        let transformer_layers = match &self.transformer_layers_per_block {
            OneOrMany::One(l) => vec![l.clone(); n],
            many => many.per_block(n, "transformer_layers_per_block")?,
        };
        Ok(EncoderParams {
            down_block_types: &self.down_block_types,
            block_out_channels: &self.block_out_channels,
            layers_per_block: self.layers_per_block.per_block(n, "layers_per_block")?,
            heads: self.heads()?,
            cross_attention_dim: self.cross_attention_dim.per_block(n, "cross_attention_dim")?,
            transformer_layers,
            only_cross_attention: self.only_cross_attention.per_block(n, "only_cross_attention")?,
            use_linear_projection: self.use_linear_projection,
            downsample_padding: self.downsample_padding,
            mid_block_type: self.mid_block_type.as_deref(),
            mid_block_scale_factor: self.mid_block_scale_factor,
        })
    }

    /// Width of the time embedding (`time_embedding_dim`, default `4 * block_out_channels[0]`).
    pub fn time_embed_dim(&self) -> usize {
        self.time_embedding_dim.unwrap_or(4 * self.block_out_channels.first().copied().unwrap_or(0))
    }

    /// Resnet settings shared by every block.
    pub fn resnet_settings(&self) -> Result<ResnetSettings> {
        resnet_settings(self.norm_num_groups, self.norm_eps, self.time_embed_dim())
    }

    /// Settings of each down block, as diffusers derives them.
    pub fn down_blocks(&self) -> Result<Vec<DownBlockSettings>> {
        down_block_settings(&self.encoder_params()?)
    }

    /// Settings of the mid block (`None` when `mid_block_type` is null).
    pub fn mid_block(&self) -> Result<Option<MidBlockSettings>> {
        mid_block_settings(&self.encoder_params()?)
    }

    /// Settings of each up block, as diffusers derives them (heads, cross-attention dims,
    /// layer counts and only_cross_attention reversed).
    pub fn up_blocks(&self) -> Result<Vec<UpBlockSettings>> {
        let p = self.encoder_params()?;
        let n = self.up_block_types.len();
        let rev = |v: &[usize]| v.iter().rev().copied().collect::<Vec<_>>();
        let channels = rev(&self.block_out_channels);
        let heads = rev(&p.heads);
        let layers = rev(&p.layers_per_block);
        let cross = rev(&p.cross_attention_dim);
        let only_cross: Vec<bool> = p.only_cross_attention.iter().rev().copied().collect();
        let tlayers: Vec<LayersOfBlock> = match &self.reverse_transformer_layers_per_block {
            Some(r) if r.len() == n => r.clone(),
            Some(r) => candle_core::bail!(
                "config key reverse_transformer_layers_per_block has {} entries but the model has {n} up blocks",
                r.len()
            ),
            None => {
                if p.transformer_layers.iter().any(|l| matches!(l, LayersOfBlock::PerLayer(_))) {
                    candle_core::bail!(
                        "config: transformer_layers_per_block with per-layer lists needs reverse_transformer_layers_per_block"
                    );
                }
                p.transformer_layers.iter().rev().cloned().collect()
            }
        };
        let mut out = Vec::with_capacity(n);
        let mut output_channel = channels[0];
        for (i, ty) in self.up_block_types.iter().enumerate() {
            let prev_output_channels = output_channel;
            output_channel = channels[i];
            let in_channels = channels[(i + 1).min(n - 1)];
            let num_layers = layers[i] + 1;
            let attention = match ty.as_str() {
                "CrossAttnUpBlock2D" => Some(cross_attn_settings(
                    &p,
                    heads[i],
                    output_channel,
                    cross[i],
                    tlayers[i].per_layer(num_layers, "transformer_layers_per_block")?,
                    only_cross[i],
                    &format!("up_blocks.{i}"),
                )?),
                "UpBlock2D" => None,
                other => candle_core::bail!(
                    "unsupported config: up_block_types[{i}] = {other:?} (supported: CrossAttnUpBlock2D, UpBlock2D)"
                ),
            };
            out.push(UpBlockSettings {
                block_type: ty.clone(),
                in_channels,
                prev_output_channels,
                out_channels: output_channel,
                num_layers,
                add_upsample: i + 1 != n,
                attention,
            });
        }
        Ok(out)
    }
}

/// The diffusers UNet2DConditionModel.
#[derive(Debug)]
pub struct UNet2DConditionModel {
    conv_in: Conv2d,
    time_proj: Timesteps,
    time_embedding: TimestepEmbedding,
    time_embed_act: Option<Activation>,
    down_blocks: Vec<DownBlock>,
    mid_block: Option<MidBlock>,
    up_blocks: Vec<UpBlock>,
    /// Every resnet's time-embedding projection, one matrix product per call.
    resnet_time: Option<ResnetTimeProjection>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
    self_attention_layers: Vec<String>,
    config: UNet2DConditionConfig,
    span: tracing::Span,
}

/// diffusers paths of the self-attention layers (`attn1`) of a block with attention, in
/// forward order.
pub(crate) fn attn1_names(prefix: &str, a: &CrossAttnSettings, out: &mut Vec<String>) {
    if a.only_cross_attention {
        return;
    }
    for (j, &blocks) in a.transformer_layers.iter().enumerate() {
        for k in 0..blocks {
            out.push(format!("{prefix}.attentions.{j}.transformer_blocks.{k}.attn1"));
        }
    }
}

impl UNet2DConditionModel {
    /// Builds the model; `vb` points at the root of the UNet weights (diffusers names).
    pub fn new(vb: VarBuilder, config: &UNet2DConditionConfig) -> Result<Self> {
        let _span = tracing::info_span!("unet-load", blocks = ?config.block_out_channels).entered();
        let down = config.down_blocks()?;
        let mid = config.mid_block()?;
        let up = config.up_blocks()?;
        let resnet = config.resnet_settings()?;
        let c0 = config.block_out_channels[0];

        let conv_in = Conv2d::same(vb.pp("conv_in"), config.in_channels, c0, config.conv_in_kernel, 1)?;
        let time_proj = Timesteps::new(c0, config.flip_sin_to_cos, config.freq_shift);
        let post_act = config.timestep_post_act.as_deref().map(Activation::from_name).transpose()?;
        let time_embedding = TimestepEmbedding::new(
            vb.pp("time_embedding"),
            c0,
            config.time_embed_dim(),
            Activation::from_name(&config.act_fn)?,
            post_act,
        )?;
        let time_embed_act = config.time_embedding_act_fn.as_deref().map(Activation::from_name).transpose()?;

        let mut names = Vec::new();
        let mut down_blocks = down
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let path = format!("down_blocks.{i}");
                // Names after the block is built: its weights bound the layer counts a config
                // may claim (a broken one could ask for billions).
                let block = DownBlock::new(vb.pp("down_blocks").pp(i.to_string()), s, &resnet, &path)?;
                if let Some(a) = &s.attention {
                    attn1_names(&path, a, &mut names);
                }
                Ok(block)
            })
            .collect::<Result<Vec<_>>>()?;
        let mut mid_block = match &mid {
            Some(s) => {
                let block = MidBlock::new(vb.pp("mid_block"), s, &resnet, "mid_block")?;
                if let Some(a) = &s.attention {
                    attn1_names("mid_block", a, &mut names);
                }
                Some(block)
            }
            None => None,
        };
        let mut up_blocks = up
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let path = format!("up_blocks.{i}");
                let block = UpBlock::new(vb.pp("up_blocks").pp(i.to_string()), s, &resnet, &path)?;
                if let Some(a) = &s.attention {
                    attn1_names(&path, a, &mut names);
                }
                Ok(block)
            })
            .collect::<Result<Vec<_>>>()?;
        let conv_norm_out = GroupNorm::new(vb.pp("conv_norm_out"), resnet.groups, c0, config.norm_eps)?;
        let conv_out = Conv2d::same(vb.pp("conv_out"), c0, config.out_channels, config.conv_out_kernel, 1)?;
        let resnet_time = ResnetTimeProjection::fuse(
            down_blocks
                .iter_mut()
                .flat_map(DownBlock::resnets_mut)
                .chain(mid_block.iter_mut().flat_map(MidBlock::resnets_mut))
                .chain(up_blocks.iter_mut().flat_map(UpBlock::resnets_mut)),
        )?;
        Ok(Self {
            conv_in,
            time_proj,
            time_embedding,
            time_embed_act,
            down_blocks,
            mid_block,
            up_blocks,
            resnet_time,
            conv_norm_out,
            conv_out,
            self_attention_layers: names,
            config: config.clone(),
            span: tracing::debug_span!("unet"),
        })
    }

    pub fn config(&self) -> &UNet2DConditionConfig {
        &self.config
    }

    /// diffusers paths of every self-attention layer the hook will be called for, in the
    /// order `forward` calls them.
    pub fn self_attention_layers(&self) -> &[String] {
        &self.self_attention_layers
    }

    /// Number of skip connections the down path produces (= ControlNet down residuals).
    pub fn num_down_residuals(&self) -> usize {
        1 + self.down_blocks.iter().map(DownBlock::num_outputs).sum::<usize>()
    }

    /// Predicts the noise for `sample` (batch, in_channels, h, w) at `timestep` given
    /// `encoder_hidden_states` (batch, tokens, cross_attention_dim). ControlNet `residuals`
    /// are added to the skip connections and the mid-block output exactly like diffusers'
    /// `down_block_additional_residuals` / `mid_block_additional_residual`. `hook` is called at
    /// every self-attention.
    pub fn forward(
        &self,
        sample: &Tensor,
        timestep: f64,
        encoder_hidden_states: &Tensor,
        residuals: Option<ControlNetResiduals>,
        hook: &mut dyn SelfAttentionHook,
    ) -> Result<Tensor> {
        let batch = sample.dims4()?.0;
        self.forward_each(sample, &vec![timestep; batch], encoder_hidden_states, residuals, hook)
    }

    /// [`Self::forward`] with a timestep for each row of the batch (a stream batch holds
    /// frames at different denoising steps).
    pub fn forward_each(
        &self,
        sample: &Tensor,
        timesteps: &[f64],
        encoder_hidden_states: &Tensor,
        residuals: Option<ControlNetResiduals>,
        hook: &mut dyn SelfAttentionHook,
    ) -> Result<Tensor> {
        let _enter = self.span.enter();
        let (batch, _, _, _) = sample.dims4()?;
        if timesteps.len() != batch {
            candle_core::bail!("unet: {} timesteps for a batch of {batch}", timesteps.len());
        }
        let (ebatch, _, _) = encoder_hidden_states.dims3()?;
        if ebatch != batch {
            candle_core::bail!(
                "unet: encoder_hidden_states batch {ebatch} does not match sample batch {batch} ({:?} vs {:?})",
                encoder_hidden_states.dims(),
                sample.dims()
            );
        }
        let sample = if self.config.center_input_sample { ((sample * 2.0)? - 1.0)? } else { sample.clone() };

        let t_emb = self.time_proj.forward_each(timesteps, sample.dtype(), sample.device())?;
        let mut emb = self.time_embedding.forward(&t_emb)?;
        if let Some(act) = &self.time_embed_act {
            emb = act.apply(&emb)?;
        }
        let emb = TimeEmbedding::new(&emb, self.resnet_time.as_ref())?;

        let mut xs = self.conv_in.forward(&sample)?;
        let mut samples = vec![xs.clone()];
        for block in &self.down_blocks {
            let (out, res) = block.forward(&xs, &emb, encoder_hidden_states, hook)?;
            xs = out;
            samples.extend(res);
        }
        // The ControlNet's residuals are added where the up blocks concatenate their skip
        // connections (one pass on CUDA instead of an addition and a copy). They are owned
        // here so that each is freed once its up block has used it: on the up path at full
        // latent size the others would still hold 5-6 MB per row (SD1.5 at 512x512, f16).
        let (down_residuals, mid_residual) = match residuals {
            Some(ControlNetResiduals { down, mid }) => (Some(down), Some(mid)),
            None => (None, None),
        };
        let mut skips: Vec<SkipConnection> = match down_residuals {
            Some(r) => {
                if r.len() != samples.len() {
                    candle_core::bail!(
                        "unet: got {} ControlNet down residuals, the UNet has {} skip connections",
                        r.len(),
                        samples.len()
                    );
                }
                let pairs = samples.into_iter().zip(r).enumerate();
                pairs
                    .map(|(i, (sample, res))| {
                        if sample.dims() != res.dims() {
                            candle_core::bail!(
                                "unet: ControlNet down residual {i} has shape {:?}, the skip connection {:?}",
                                res.dims(),
                                sample.dims()
                            );
                        }
                        Ok(SkipConnection { sample, control: Some(res) })
                    })
                    .collect::<Result<_>>()?
            }
            None => samples.into_iter().map(|sample| SkipConnection { sample, control: None }).collect(),
        };
        if let Some(mid) = &self.mid_block {
            xs = mid.forward(&xs, &emb, encoder_hidden_states, hook)?;
        }
        if let Some(mid) = mid_residual {
            if xs.dims() != mid.dims() {
                candle_core::bail!(
                    "unet: ControlNet mid residual has shape {:?}, the mid block output {:?}",
                    mid.dims(),
                    xs.dims()
                );
            }
            xs = fused::add(&xs, &mid)?;
        }

        for block in &self.up_blocks {
            let n = block.num_inputs();
            if n > skips.len() {
                candle_core::bail!("unet: up block needs {n} skip connections, {} left", skips.len());
            }
            let rest = skips.split_off(skips.len() - n);
            // The upsampler targets the size of the next skip connection, which is what
            // diffusers does for sizes not divisible by the total upsampling factor and
            // equals 2x otherwise.
            let upsample_size = match skips.last() {
                Some(next) => {
                    let (_, _, h, w) = next.sample.dims4()?;
                    Some((h, w))
                }
                None => None,
            };
            xs = block.forward(&xs, &rest, &emb, encoder_hidden_states, upsample_size, hook)?;
        }

        let xs = self.conv_norm_out.forward_silu(&xs)?;
        self.conv_out.forward(&xs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sd15_config_derives_diffusers_blocks() -> Result<()> {
        let c = crate::models::sd15::unet_config()?;
        assert_eq!(c.time_embed_dim(), 1280);
        let r = c.resnet_settings()?;
        assert_eq!((r.groups, r.eps, r.temb_channels), (32, 1e-5, 1280));
        let down = c.down_blocks()?;
        let io: Vec<_> = down.iter().map(|d| (d.in_channels, d.out_channels, d.num_layers, d.add_downsample)).collect();
        assert_eq!(io, [(320, 320, 2, true), (320, 640, 2, true), (640, 1280, 2, true), (1280, 1280, 2, false)]);
        let heads: Vec<_> = down
            .iter()
            .map(|d| d.attention.as_ref().map(|a| (a.num_attention_heads, a.attention_head_dim, a.cross_attention_dim)))
            .collect();
        assert_eq!(heads, [Some((8, 40, 768)), Some((8, 80, 768)), Some((8, 160, 768)), None]);
        let mid = c.mid_block()?.unwrap();
        let a = mid.attention.as_ref().unwrap();
        assert_eq!(
            (mid.channels, a.num_attention_heads, a.attention_head_dim, a.transformer_layers.clone()),
            (1280, 8, 160, vec![1])
        );
        let up = c.up_blocks()?;
        let io: Vec<_> = up
            .iter()
            .map(|u| (u.prev_output_channels, u.in_channels, u.out_channels, u.num_layers, u.add_upsample))
            .collect();
        assert_eq!(
            io,
            [
                (1280, 1280, 1280, 3, true),
                (1280, 640, 1280, 3, true),
                (1280, 320, 640, 3, true),
                (640, 320, 320, 3, false)
            ]
        );
        assert!(up[0].attention.is_none());
        let a = up[3].attention.as_ref().unwrap();
        assert_eq!((a.num_attention_heads, a.attention_head_dim, a.transformer_layers.clone()), (8, 40, vec![1, 1, 1]));
        Ok(())
    }

    #[test]
    fn head_lists_are_reversed_for_up_blocks() -> Result<()> {
        let c: UNet2DConditionConfig = serde_json::from_str(
            r#"{"attention_head_dim": [2, 4, 8], "block_out_channels": [32, 64, 64],
                "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
                "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
                "transformer_layers_per_block": [1, 2, 3], "norm_num_groups": 8}"#,
        )
        .unwrap();
        let down: Vec<_> =
            c.down_blocks()?.iter().map(|d| d.attention.as_ref().map(|a| a.num_attention_heads)).collect();
        assert_eq!(down, [Some(2), Some(4), None]);
        let up: Vec<_> = c
            .up_blocks()?
            .iter()
            .map(|u| {
                u.attention
                    .as_ref()
                    .map(|a| (a.num_attention_heads, a.attention_head_dim, a.transformer_layers.clone()))
            })
            .collect();
        assert_eq!(up, [None, Some((4, 16, vec![2, 2, 2])), Some((2, 16, vec![1, 1, 1]))]);
        assert_eq!(c.mid_block()?.unwrap().attention.unwrap().transformer_layers, vec![3]);
        // num_attention_heads wins over attention_head_dim when present.
        let c: UNet2DConditionConfig =
            serde_json::from_str(r#"{"attention_head_dim": 8, "num_attention_heads": [5, 10, 20, 20]}"#).unwrap();
        let heads: Vec<_> =
            c.down_blocks()?.iter().map(|d| d.attention.as_ref().map(|a| a.attention_head_dim)).collect();
        assert_eq!(heads, [Some(64), Some(64), Some(64), None]);
        Ok(())
    }

    #[test]
    fn unsupported_features_are_named() {
        for (json, key) in [
            (r#"{"dual_cross_attention": true}"#, "dual_cross_attention"),
            (r#"{"class_embed_type": "timestep"}"#, "class_embed_type"),
            (r#"{"resnet_time_scale_shift": "scale_shift"}"#, "resnet_time_scale_shift"),
            (r#"{"addition_embed_type": "text_time"}"#, "addition_embed_type"),
            (
                r#"{"down_block_types": ["SimpleCrossAttnDownBlock2D", "DownBlock2D", "DownBlock2D", "DownBlock2D"]}"#,
                "down_block_types[0]",
            ),
            (r#"{"attention_head_dim": [8, 8]}"#, "attention_head_dim"),
        ] {
            let c: UNet2DConditionConfig = serde_json::from_str(json).unwrap();
            let e = c.down_blocks().unwrap_err().to_string();
            assert!(e.contains(key), "{json}: {e}");
        }
    }
}
