//! Config pieces the UNet and the ControlNet share: value shapes of diffusers' `config.json`
//! ([`OneOrMany`], [`LayersOfBlock`]), the serde defaults of both configs (diffusers' defaults),
//! and the derivation of the encoder half's block settings (down blocks and mid block), which
//! the two models build alike.

use candle_core::Result;
use serde::Deserialize;

use super::unet_blocks::{CrossAttnSettings, DownBlockSettings, MidBlockSettings, ResnetSettings};

/// A config value given either once for all blocks or as a per-block list.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany<T> {
    Many(Vec<T>),
    One(T),
}

impl<T: Clone + std::fmt::Debug> OneOrMany<T> {
    /// One value per block; `key` names the config key in the error.
    pub fn per_block(&self, blocks: usize, key: &str) -> Result<Vec<T>> {
        match self {
            Self::One(v) => Ok(vec![v.clone(); blocks]),
            Self::Many(v) if v.len() == blocks => Ok(v.clone()),
            Self::Many(v) => Err(candle_core::Error::Msg(format!(
                "config key {key} has {} entries ({v:?}) but the model has {blocks} down blocks",
                v.len()
            ))),
        }
    }
}

/// `transformer_layers_per_block` entry of one block: one count for every layer of the
/// block, or a count per layer.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum LayersOfBlock {
    PerLayer(Vec<usize>),
    All(usize),
}

impl LayersOfBlock {
    pub(crate) fn per_layer(&self, layers: usize, key: &str) -> Result<Vec<usize>> {
        match self {
            Self::All(n) => Ok(vec![*n; layers]),
            Self::PerLayer(v) if v.len() >= layers => Ok(v[..layers].to_vec()),
            Self::PerLayer(v) => Err(candle_core::Error::Msg(format!(
                "config key {key}: a block with {layers} layers got only {} transformer layer counts ({v:?})",
                v.len()
            ))),
        }
    }
}

/// diffusers' defaults of the `UNet2DConditionModel` and `ControlNetModel` config keys, for
/// `#[serde(default = "...")]`.
pub(crate) mod defaults {
    use super::{LayersOfBlock, OneOrMany};

    pub fn one() -> usize {
        1
    }
    pub fn two() -> usize {
        2
    }
    pub fn three() -> usize {
        3
    }
    pub fn four() -> usize {
        4
    }
    pub fn one_f64() -> f64 {
        1.0
    }
    pub fn yes() -> bool {
        true
    }
    pub fn down_block_types() -> Vec<String> {
        ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"]
            .map(String::from)
            .to_vec()
    }
    pub fn up_block_types() -> Vec<String> {
        ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"].map(String::from).to_vec()
    }
    pub fn mid_block_type() -> Option<String> {
        Some("UNetMidBlock2DCrossAttn".into())
    }
    pub fn no_block() -> OneOrMany<bool> {
        OneOrMany::One(false)
    }
    pub fn block_out_channels() -> Vec<usize> {
        vec![320, 640, 1280, 1280]
    }
    pub fn layers_per_block() -> OneOrMany<usize> {
        OneOrMany::One(two())
    }
    pub fn silu() -> String {
        "silu".into()
    }
    pub fn norm_num_groups() -> Option<usize> {
        Some(32)
    }
    pub fn norm_eps() -> f64 {
        1e-5
    }
    pub fn cross_attention_dim() -> OneOrMany<usize> {
        OneOrMany::One(1280)
    }
    pub fn transformer_layers_per_block() -> OneOrMany<LayersOfBlock> {
        OneOrMany::One(LayersOfBlock::All(1))
    }
    pub fn attention_head_dim() -> OneOrMany<usize> {
        OneOrMany::One(8)
    }
    pub fn default() -> String {
        "default".into()
    }
    pub fn positional() -> String {
        "positional".into()
    }
    pub fn rgb() -> String {
        "rgb".into()
    }
    pub fn conditioning_embedding_out_channels() -> Vec<usize> {
        vec![16, 32, 96, 256]
    }
}

/// Heads per block: `num_attention_heads` when set, else `attention_head_dim` (diffusers'
/// historical naming: there it counts heads).
pub(crate) fn heads_per_block(
    num_attention_heads: &Option<OneOrMany<usize>>,
    attention_head_dim: &OneOrMany<usize>,
    blocks: usize,
) -> Result<Vec<usize>> {
    match num_attention_heads {
        Some(h) => h.per_block(blocks, "num_attention_heads"),
        None => attention_head_dim.per_block(blocks, "attention_head_dim"),
    }
}

/// Resnet settings shared by every block of a model.
pub(crate) fn resnet_settings(
    norm_num_groups: Option<usize>,
    norm_eps: f64,
    temb_channels: usize,
) -> Result<ResnetSettings> {
    Ok(ResnetSettings {
        groups: norm_num_groups.ok_or_else(|| candle_core::Error::Msg("config: norm_num_groups is null".into()))?,
        eps: norm_eps,
        temb_channels,
    })
}

/// The encoder half (down blocks + mid block) settings that UNet and ControlNet share.
pub(crate) struct EncoderParams<'a> {
    pub down_block_types: &'a [String],
    pub block_out_channels: &'a [usize],
    pub layers_per_block: Vec<usize>,
    pub heads: Vec<usize>,
    pub cross_attention_dim: Vec<usize>,
    pub transformer_layers: Vec<LayersOfBlock>,
    pub only_cross_attention: Vec<bool>,
    pub use_linear_projection: bool,
    pub downsample_padding: usize,
    pub mid_block_type: Option<&'a str>,
    pub mid_block_scale_factor: f64,
}

/// Checks shared by UNet and ControlNet configs; `what` names the model in errors.
#[allow(clippy::too_many_arguments)]
pub(crate) fn check_common(
    act_fn: &str,
    resnet_time_scale_shift: &str,
    class_embed_type: &Option<String>,
    num_class_embeds: Option<usize>,
    addition_embed_type: &Option<String>,
    encoder_hid_dim: Option<usize>,
    encoder_hid_dim_type: &Option<String>,
    norm_num_groups: Option<usize>,
    block_out_channels: &[usize],
    down_block_types: &[String],
) -> Result<()> {
    let unsupported = |key: &str, value: &dyn std::fmt::Debug, why: &str| {
        Err(candle_core::Error::Msg(format!("unsupported config: {key} = {value:?} ({why})")))
    };
    if !matches!(act_fn, "silu" | "swish") {
        return unsupported("act_fn", &act_fn, "only silu is supported");
    }
    if resnet_time_scale_shift != "default" {
        return unsupported("resnet_time_scale_shift", &resnet_time_scale_shift, "only \"default\" is supported");
    }
    if class_embed_type.is_some() || num_class_embeds.is_some() {
        return unsupported(
            "class_embed_type / num_class_embeds",
            &(class_embed_type, num_class_embeds),
            "class embeddings must be null",
        );
    }
    if addition_embed_type.is_some() {
        return unsupported("addition_embed_type", addition_embed_type, "must be null");
    }
    if encoder_hid_dim.is_some() || encoder_hid_dim_type.is_some() {
        return unsupported(
            "encoder_hid_dim / encoder_hid_dim_type",
            &(encoder_hid_dim, encoder_hid_dim_type),
            "must be null",
        );
    }
    if norm_num_groups.is_none() {
        return unsupported("norm_num_groups", &norm_num_groups, "null is not supported");
    }
    if block_out_channels.is_empty() || block_out_channels.len() != down_block_types.len() {
        return Err(candle_core::Error::Msg(format!(
            "config: block_out_channels {block_out_channels:?} must have one entry per down block ({down_block_types:?})"
        )));
    }
    Ok(())
}

pub(crate) fn cross_attn_settings(
    p: &EncoderParams,
    heads: usize,
    channels: usize,
    cross_dim: usize,
    layers: Vec<usize>,
    only_cross: bool,
    block: &str,
) -> Result<CrossAttnSettings> {
    if heads == 0 || heads > channels {
        candle_core::bail!("{block}: {heads} attention heads do not fit {channels} channels");
    }
    Ok(CrossAttnSettings {
        num_attention_heads: heads,
        attention_head_dim: channels / heads,
        cross_attention_dim: cross_dim,
        transformer_layers: layers,
        use_linear_projection: p.use_linear_projection,
        only_cross_attention: only_cross,
    })
}

/// Layers per block a config may ask for: no released checkpoint comes near (SD uses 2); the
/// bound keeps a broken config from making us allocate per-layer lists of billions of entries.
const MAX_LAYERS_PER_BLOCK: usize = 1024;

pub(crate) fn down_block_settings(p: &EncoderParams) -> Result<Vec<DownBlockSettings>> {
    let n = p.down_block_types.len();
    let mut out = Vec::with_capacity(n);
    let mut output_channel = p.block_out_channels[0];
    for (i, ty) in p.down_block_types.iter().enumerate() {
        let in_channels = output_channel;
        output_channel = p.block_out_channels[i];
        let layers = p.layers_per_block[i];
        if layers > MAX_LAYERS_PER_BLOCK {
            candle_core::bail!(
                "config: layers_per_block {layers} in down block {i} is not a real model's (at most {MAX_LAYERS_PER_BLOCK})"
            );
        }
        let attention = match ty.as_str() {
            "CrossAttnDownBlock2D" => Some(cross_attn_settings(
                p,
                p.heads[i],
                output_channel,
                p.cross_attention_dim[i],
                p.transformer_layers[i].per_layer(layers, "transformer_layers_per_block")?,
                p.only_cross_attention[i],
                &format!("down_blocks.{i}"),
            )?),
            "DownBlock2D" => None,
            other => candle_core::bail!(
                "unsupported config: down_block_types[{i}] = {other:?} (supported: CrossAttnDownBlock2D, DownBlock2D)"
            ),
        };
        out.push(DownBlockSettings {
            block_type: ty.clone(),
            in_channels,
            out_channels: output_channel,
            num_layers: layers,
            add_downsample: i + 1 != n,
            downsample_padding: p.downsample_padding,
            attention,
        });
    }
    Ok(out)
}

pub(crate) fn mid_block_settings(p: &EncoderParams) -> Result<Option<MidBlockSettings>> {
    let channels = *p.block_out_channels.last().expect("checked non-empty");
    let ty = match p.mid_block_type {
        None => return Ok(None),
        Some(t) => t,
    };
    let attention = match ty {
        "UNetMidBlock2DCrossAttn" => Some(cross_attn_settings(
            p,
            *p.heads.last().expect("one per block"),
            channels,
            *p.cross_attention_dim.last().expect("one per block"),
            p.transformer_layers.last().expect("one per block").per_layer(1, "transformer_layers_per_block")?,
            false,
            "mid_block",
        )?),
        "UNetMidBlock2D" => None,
        other => candle_core::bail!(
            "unsupported config: mid_block_type = {other:?} (supported: UNetMidBlock2DCrossAttn, UNetMidBlock2D, null)"
        ),
    };
    Ok(Some(MidBlockSettings {
        block_type: ty.to_string(),
        channels,
        output_scale_factor: p.mid_block_scale_factor,
        attention,
    }))
}
