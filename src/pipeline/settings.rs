//! What one frame is computed with: the user's generation settings, and the plan they give.

use std::fmt;
use std::str::FromStr;

use anyhow::{Result, bail};

use crate::scheduler::{SchedulerChoice, SchedulerKind, TimestepIndices};

/// The `guidance` setting: how the negative prompt steers a frame.
///
/// `auto` (the default) is what `guidance-scale` alone decided before this setting existed:
/// `full` when the scale is above 1, else `none`. Every mode is `none` when the scale is 1 or
/// less (as in diffusers and StreamDiffusion: the guided noise would equal the conditional one
/// at scale 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub enum GuidanceMode {
    #[default]
    Auto,
    /// No classifier-free guidance: one UNet evaluation per step (batch 1).
    None,
    /// Classifier-free guidance: the negative and the positive prompt in one batch of 2.
    Full,
    /// StreamDiffusion's self-negative residual CFG (`cfg_type="self"`): batch 1, the negative
    /// noise is the propagated "stock" noise, starting from the frame's own initial noise
    /// (LCM only).
    SelfNegative,
    /// StreamDiffusion's `cfg_type="initialize"`: as `self`, but the stock noise starts from
    /// the negative prompt's prediction at the first step (batch 2 there, 1 after; LCM only).
    Initialize,
}

impl FromStr for GuidanceMode {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Self::Auto,
            "none" => Self::None,
            "full" => Self::Full,
            "self" => Self::SelfNegative,
            "initialize" => Self::Initialize,
            _ => bail!("unknown guidance mode {s:?}: expected auto, none, full, self or initialize"),
        })
    }
}

impl fmt::Display for GuidanceMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Auto => "auto",
            Self::None => "none",
            Self::Full => "full",
            Self::SelfNegative => "self",
            Self::Initialize => "initialize",
        })
    }
}

impl GuidanceMode {
    /// UNet batch of denoising step `index`.
    pub fn batch(self, index: usize) -> usize {
        match self {
            Self::Full => 2,
            Self::Initialize if index == 0 => 2,
            _ => 1,
        }
    }

    /// Whether the negative prompt is encoded (the text embeddings are `[negative; positive]`).
    pub fn uses_negative_prompt(self) -> bool {
        matches!(self, Self::Full | Self::Initialize)
    }

    /// Residual CFG (`self`, `initialize`): the negative noise is the propagated stock noise.
    pub fn is_residual(self) -> bool {
        matches!(self, Self::SelfNegative | Self::Initialize)
    }
}

/// The most scheduler steps a frame may be given (the element's `steps` range, the CLI's
/// `--steps`): every SD 1.x schedule (1000 train timesteps, any spacing, `steps_offset` 0 or
/// 1) can run this many; DDIM's "leading" spacing with `steps_offset` 1 cannot run 1000.
pub const MAX_STEPS: usize = 500;

/// An error unless `value` is a finite number (NaN and the infinities pass no range check).
pub fn check_finite(name: &str, value: f64) -> Result<()> {
    if !value.is_finite() {
        bail!("{name} must be a finite number, got {value}");
    }
    Ok(())
}

/// Per-frame generation settings; everything here may change between frames.
#[derive(Debug, Clone, PartialEq)]
pub struct FrameSettings {
    pub prompt: String,
    pub negative_prompt: String,
    /// Steps of the whole schedule; a frame runs the last `int(steps * strength)` of them.
    pub steps: usize,
    pub strength: f64,
    pub guidance_scale: f64,
    pub controlnet_scale: f64,
    /// DDIM, LCM, or what the model's scheduler config names.
    pub scheduler: SchedulerChoice,
    /// Explicit timesteps (LCM only): replace `steps` and `strength`.
    pub timesteps: Option<TimestepIndices>,
    pub guidance: GuidanceMode,
}

impl Default for FrameSettings {
    /// The original project's settings (see the technique note).
    fn default() -> Self {
        Self {
            prompt: String::new(),
            negative_prompt: String::new(),
            steps: 20,
            strength: 0.9,
            guidance_scale: 7.5,
            controlnet_scale: 0.7,
            scheduler: SchedulerChoice::Auto,
            timesteps: None,
            guidance: GuidanceMode::Auto,
        }
    }
}

impl FrameSettings {
    /// An error naming the setting and its value when one is out of range: steps outside
    /// 1..=[`MAX_STEPS`], strength outside 0..1, a scale that is NaN or infinite. (Whether the
    /// steps and strength leave a denoising step depends on the scheduler: see
    /// `Img2Img::schedule`.)
    pub fn validate(&self) -> Result<()> {
        if !(1..=MAX_STEPS).contains(&self.steps) {
            bail!("steps {} is outside 1..={MAX_STEPS}", self.steps);
        }
        check_finite("strength", self.strength)?;
        if !(0.0..=1.0).contains(&self.strength) {
            bail!("strength {} is outside 0..1", self.strength);
        }
        check_finite("guidance scale", self.guidance_scale)?;
        check_finite("ControlNet scale", self.controlnet_scale)?;
        Ok(())
    }

    /// An error when `steps` x `strength` leaves no denoising step (explicit timesteps replace
    /// both, so they always pass): known from the settings alone, before any model is loaded.
    pub fn check_has_steps(&self) -> Result<()> {
        if self.timesteps.is_none() && crate::scheduler::img2img_step_count(self.steps, self.strength) == 0 {
            bail!("steps {} x strength {} gives 0 denoising steps; raise steps or strength", self.steps, self.strength);
        }
        Ok(())
    }

    /// The guidance a frame runs: `auto` resolved, and `none` whenever `guidance_scale <= 1`.
    pub fn effective_guidance(&self) -> GuidanceMode {
        if self.guidance_scale <= 1.0 {
            return GuidanceMode::None;
        }
        match self.guidance {
            GuidanceMode::Auto => GuidanceMode::Full,
            mode => mode,
        }
    }

    /// Whether the negative prompt is evaluated at all (`full`, `initialize`).
    pub fn uses_guidance(&self) -> bool {
        self.effective_guidance().uses_negative_prompt()
    }
}

/// What a frame's denoising loop will run: cross-frame state is only reusable between
/// frames with equal plans.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FramePlan {
    pub scheduler: SchedulerKind,
    pub timesteps: Vec<usize>,
    pub width: usize,
    pub height: usize,
    /// UNet batch size of each step: 2 with classifier-free guidance, else 1 (`initialize`:
    /// 2 at the first step).
    pub batches: Vec<usize>,
}
