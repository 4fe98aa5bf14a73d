//! `sdcrossframe`: restyles video with Stable Diffusion 1.5 + Canny ControlNet, frame by frame,
//! with cross-frame attention keeping consecutive frames coherent.

use gst::glib;
use gst::prelude::*;

mod imp;

glib::wrapper! {
    pub struct SdCrossFrame(ObjectSubclass<imp::SdCrossFrame>) @extends gst_video::VideoFilter, gst_base::BaseTransform, gst::Element, gst::Object;
}

/// Compute dtype of the models.
#[derive(Debug, Eq, PartialEq, Ord, PartialOrd, Hash, Clone, Copy, Default, glib::Enum)]
#[repr(u32)]
#[enum_type(name = "GstSdCrossFrameDType")]
pub enum DType {
    #[default]
    #[enum_value(name = "32-bit float", nick = "f32")]
    F32 = 0,
    #[enum_value(name = "16-bit float (GPU)", nick = "f16")]
    F16 = 1,
    #[enum_value(name = "bfloat16 (GPU)", nick = "bf16")]
    Bf16 = 2,
}

impl From<DType> for candle_core::DType {
    fn from(d: DType) -> Self {
        match d {
            DType::F32 => candle_core::DType::F32,
            DType::F16 => candle_core::DType::F16,
            DType::Bf16 => candle_core::DType::BF16,
        }
    }
}

/// Where each frame's initial noise comes from.
#[derive(Debug, Eq, PartialEq, Ord, PartialOrd, Hash, Clone, Copy, Default, glib::Enum)]
#[repr(u32)]
#[enum_type(name = "GstSdCrossFrameNoise")]
pub enum Noise {
    #[default]
    #[enum_value(name = "Fixed: the same seeded noise for every frame (coherent)", nick = "fixed")]
    Fixed = 0,
    #[enum_value(
        name = "Per-frame: fresh noise for every frame, seed + frame index (the original)",
        nick = "per-frame"
    )]
    PerFrame = 1,
}

impl From<Noise> for sdcrossframe::session::NoiseMode {
    fn from(n: Noise) -> Self {
        match n {
            Noise::Fixed => Self::Fixed,
            Noise::PerFrame => Self::PerFrame,
        }
    }
}

/// Which frames' keys and values each frame attends to.
#[derive(Debug, Eq, PartialEq, Ord, PartialOrd, Hash, Clone, Copy, Default, glib::Enum)]
#[repr(u32)]
#[enum_type(name = "GstSdCrossFrameAttention")]
pub enum Attention {
    #[enum_value(name = "Off: plain per-frame img2img", nick = "off")]
    Off = 0,
    #[enum_value(name = "First: the anchor frame", nick = "first")]
    First = 1,
    #[enum_value(name = "Prev: the previous frame", nick = "prev")]
    Prev = 2,
    #[default]
    #[enum_value(name = "First+prev: the anchor and the previous frame (the original technique)", nick = "first+prev")]
    FirstPrev = 3,
}

impl From<Attention> for sdcrossframe::cross_frame::AttentionMode {
    fn from(a: Attention) -> Self {
        match a {
            Attention::Off => Self::Off,
            Attention::First => Self::First,
            Attention::Prev => Self::Prev,
            Attention::FirstPrev => Self::FirstPrev,
        }
    }
}

/// Which self-attention layers use cross-frame attention.
#[derive(Debug, Eq, PartialEq, Ord, PartialOrd, Hash, Clone, Copy, Default, glib::Enum)]
#[repr(u32)]
#[enum_type(name = "GstSdCrossFrameAttentionScope")]
pub enum AttentionScope {
    #[default]
    #[enum_value(name = "Up: the up blocks' self-attention (the original)", nick = "up")]
    Up = 0,
    #[enum_value(name = "All: down, mid and up blocks", nick = "all")]
    All = 1,
}

impl From<AttentionScope> for sdcrossframe::cross_frame::AttentionScope {
    fn from(a: AttentionScope) -> Self {
        match a {
            AttentionScope::Up => Self::Up,
            AttentionScope::All => Self::All,
        }
    }
}

/// Where the cross-frame store keeps its entries between the steps that use them.
#[derive(Debug, Eq, PartialEq, Ord, PartialOrd, Hash, Clone, Copy, Default, glib::Enum)]
#[repr(u32)]
#[enum_type(name = "GstSdCrossFrameStore")]
pub enum CrossFrameStore {
    #[default]
    #[enum_value(name = "Device: GPU memory, no copies", nick = "device")]
    Device = 0,
    #[enum_value(name = "Host: page-locked host memory, copied in and out beside each step", nick = "host")]
    Host = 1,
}

impl From<CrossFrameStore> for sdcrossframe::cross_frame::StoreLocation {
    fn from(a: CrossFrameStore) -> Self {
        match a {
            CrossFrameStore::Device => Self::Device,
            CrossFrameStore::Host => Self::Host,
        }
    }
}

/// The denoising scheduler.
#[derive(Debug, Eq, PartialEq, Ord, PartialOrd, Hash, Clone, Copy, Default, glib::Enum)]
#[repr(u32)]
#[enum_type(name = "GstSdCrossFrameScheduler")]
pub enum Scheduler {
    #[default]
    #[enum_value(name = "Auto: what the model's scheduler config names (LCMScheduler: lcm, else ddim)", nick = "auto")]
    Auto = 0,
    #[enum_value(name = "DDIM (eta 0)", nick = "ddim")]
    Ddim = 1,
    #[enum_value(name = "LCM: latent consistency, few steps (with an LCM model or LCM-LoRA)", nick = "lcm")]
    Lcm = 2,
}

impl From<Scheduler> for sdcrossframe::scheduler::SchedulerChoice {
    fn from(s: Scheduler) -> Self {
        match s {
            Scheduler::Auto => Self::Auto,
            Scheduler::Ddim => Self::Ddim,
            Scheduler::Lcm => Self::Lcm,
        }
    }
}

/// How the negative prompt guides each step.
#[derive(Debug, Eq, PartialEq, Ord, PartialOrd, Hash, Clone, Copy, Default, glib::Enum)]
#[repr(u32)]
#[enum_type(name = "GstSdCrossFrameGuidance")]
pub enum Guidance {
    #[default]
    #[enum_value(name = "Auto: full when guidance-scale > 1, else none", nick = "auto")]
    Auto = 0,
    #[enum_value(name = "None: no guidance, one UNet evaluation per step", nick = "none")]
    None = 1,
    #[enum_value(name = "Full: classifier-free guidance, two UNet evaluations per step", nick = "full")]
    Full = 2,
    #[enum_value(
        name = "Self: StreamDiffusion's self-negative residual CFG, one evaluation per step (lcm)",
        nick = "self"
    )]
    SelfNegative = 3,
    #[enum_value(
        name = "Initialize: residual CFG started from the negative prompt at the first step (lcm)",
        nick = "initialize"
    )]
    Initialize = 4,
}

impl From<Guidance> for sdcrossframe::pipeline::GuidanceMode {
    fn from(g: Guidance) -> Self {
        match g {
            Guidance::Auto => Self::Auto,
            Guidance::None => Self::None,
            Guidance::Full => Self::Full,
            Guidance::SelfNegative => Self::SelfNegative,
            Guidance::Initialize => Self::Initialize,
        }
    }
}

pub fn register(plugin: &gst::Plugin) -> Result<(), glib::BoolError> {
    for t in [
        DType::static_type(),
        Noise::static_type(),
        Attention::static_type(),
        AttentionScope::static_type(),
        CrossFrameStore::static_type(),
        Scheduler::static_type(),
        Guidance::static_type(),
    ] {
        t.mark_as_plugin_api(gst::PluginAPIFlags::empty());
    }
    gst::Element::register(Some(plugin), "sdcrossframe", gst::Rank::NONE, SdCrossFrame::static_type())
}
