//! The denoising schedulers, as diffusers computes them for ControlNet img2img: DDIM
//! ([`ddim`]) and the Latent Consistency Model scheduler ([`lcm`]), and which one a frame uses.
//!
//! The `scheduler` setting ([`SchedulerChoice`]): `auto` (the default) takes what the model's
//! `scheduler/scheduler_config.json` names in `_class_name` (`LCMScheduler` gives LCM, every
//! other class DDIM, as before), `ddim` and `lcm` force one. Either scheduler reads the fields it
//! knows from that config with its own defaults for the missing ones, as diffusers'
//! `from_config` does (so `lcm` on SD1.5's PNDM config is that config plus LCM's defaults:
//! `original_inference_steps` 50, `timestep_scaling` 10).
//!
//! Explicit timesteps ([`TimestepIndices`], StreamDiffusion's `t_index_list`) are indices into
//! the 50-step LCM schedule, as StreamDiffusion maps them (`set_timesteps(50)`, then
//! `timesteps[i]` for each index).

pub mod ddim;
pub mod lcm;

use std::fmt;
use std::str::FromStr;

use anyhow::{Result, bail};
use candle_core::Tensor;
use serde::Deserialize;

pub use ddim::{DdimScheduler, DdimSchedulerConfig};
pub use lcm::{LcmScheduler, LcmSchedulerConfig};

/// The number of steps of the LCM schedule explicit timestep indices point into
/// (StreamDiffusion's `num_inference_steps` default).
pub const TIMESTEP_INDEX_STEPS: usize = 50;

/// The `scheduler` setting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub enum SchedulerChoice {
    /// What the model's scheduler config names (`LCMScheduler`: lcm, anything else: ddim).
    #[default]
    Auto,
    Ddim,
    Lcm,
}

impl FromStr for SchedulerChoice {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Self::Auto,
            "ddim" => Self::Ddim,
            "lcm" => Self::Lcm,
            _ => bail!("unknown scheduler {s:?}: expected auto, ddim or lcm"),
        })
    }
}

impl fmt::Display for SchedulerChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Auto => "auto",
            Self::Ddim => "ddim",
            Self::Lcm => "lcm",
        })
    }
}

/// A scheduler a frame runs with (an `auto` choice resolved).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SchedulerKind {
    Ddim,
    Lcm,
}

impl fmt::Display for SchedulerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Ddim => "ddim",
            Self::Lcm => "lcm",
        })
    }
}

/// Explicit timesteps: strictly ascending indices into the [`TIMESTEP_INDEX_STEPS`]-step LCM
/// schedule (StreamDiffusion's `t_index_list`, e.g. `32,45`). Parsed from a comma-separated
/// list; the range is checked against the schedule when a frame uses them.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TimestepIndices(Vec<usize>);

impl TimestepIndices {
    /// Checks the list: not empty, strictly ascending.
    pub fn new(indices: Vec<usize>) -> Result<Self> {
        if indices.is_empty() {
            bail!("timesteps: the list of timestep indices is empty");
        }
        for pair in indices.windows(2) {
            if pair[1] <= pair[0] {
                bail!(
                    "timesteps: indices must be strictly ascending (timesteps descending), but {} follows {} in {}",
                    pair[1],
                    pair[0],
                    join(&indices)
                );
            }
        }
        Ok(Self(indices))
    }

    /// An empty (or blank) string is no list (`None`); otherwise see [`FromStr`].
    pub fn parse_optional(s: &str) -> Result<Option<Self>> {
        if s.trim().is_empty() { Ok(None) } else { s.parse().map(Some) }
    }

    pub fn indices(&self) -> &[usize] {
        &self.0
    }
}

fn join(values: &[usize]) -> String {
    values.iter().map(usize::to_string).collect::<Vec<_>>().join(",")
}

impl FromStr for TimestepIndices {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        let indices = s
            .split(',')
            .map(|part| {
                let part = part.trim();
                part.parse::<usize>().map_err(|_| {
                    anyhow::anyhow!(
                        "timesteps {s:?}: {part:?} is not a timestep index (expected comma-separated integers 0..{}, e.g. 32,45)",
                        TIMESTEP_INDEX_STEPS - 1
                    )
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Self::new(indices)
    }
}

impl fmt::Display for TimestepIndices {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&join(&self.0))
    }
}

/// `scheduler/scheduler_config.json` as read: the class it names and its fields; each
/// scheduler takes the fields it knows, with its own defaults for the others.
#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    fields: serde_json::Value,
}

impl<'de> Deserialize<'de> for SchedulerConfig {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> std::result::Result<Self, D::Error> {
        let fields = serde_json::Value::deserialize(deserializer)?;
        if !fields.is_object() {
            return Err(serde::de::Error::custom("a scheduler config must be a JSON object"));
        }
        Ok(Self { fields })
    }
}

impl SchedulerConfig {
    pub fn from_json(json: &str) -> Result<Self> {
        Ok(serde_json::from_str(json)?)
    }

    /// `_class_name`, when the config has one.
    pub fn class_name(&self) -> Option<&str> {
        self.fields.get("_class_name").and_then(|v| v.as_str())
    }

    /// What `auto` resolves to: LCM for an `LCMScheduler` config, else DDIM.
    pub fn default_kind(&self) -> SchedulerKind {
        if self.class_name() == Some("LCMScheduler") { SchedulerKind::Lcm } else { SchedulerKind::Ddim }
    }

    pub fn ddim(&self) -> Result<DdimSchedulerConfig> {
        serde_json::from_value(self.fields.clone()).map_err(|e| anyhow::anyhow!("scheduler config (DDIM): {e}"))
    }

    pub fn lcm(&self) -> Result<LcmSchedulerConfig> {
        serde_json::from_value(self.fields.clone()).map_err(|e| anyhow::anyhow!("scheduler config (LCM): {e}"))
    }
}

/// Both schedulers, built from the model's config; a frame picks one with its `scheduler`
/// setting. The config's own kind must build (loading fails otherwise); the other one is
/// built too and its error, if any, is reported when a frame asks for it.
#[derive(Debug, Clone)]
pub struct Schedulers {
    default: SchedulerKind,
    ddim: std::result::Result<DdimScheduler, String>,
    lcm: std::result::Result<LcmScheduler, String>,
}

impl Schedulers {
    pub fn new(config: &SchedulerConfig) -> Result<Self> {
        let ddim = config.ddim().and_then(|c| DdimScheduler::new(&c)).map_err(|e| format!("{e:#}"));
        let lcm = config.lcm().and_then(|c| LcmScheduler::new(&c)).map_err(|e| format!("{e:#}"));
        let default = config.default_kind();
        let schedulers = Self { default, ddim, lcm };
        schedulers.get(SchedulerChoice::Auto)?;
        Ok(schedulers)
    }

    /// The scheduler `choice` names.
    pub fn get(&self, choice: SchedulerChoice) -> Result<Scheduler<'_>> {
        let kind = self.resolve(choice);
        Ok(match kind {
            SchedulerKind::Ddim => {
                Scheduler::Ddim(self.ddim.as_ref().map_err(|e| anyhow::anyhow!("the DDIM scheduler: {e}"))?)
            }
            SchedulerKind::Lcm => {
                Scheduler::Lcm(self.lcm.as_ref().map_err(|e| anyhow::anyhow!("the LCM scheduler: {e}"))?)
            }
        })
    }

    pub fn resolve(&self, choice: SchedulerChoice) -> SchedulerKind {
        match choice {
            SchedulerChoice::Auto => self.default,
            SchedulerChoice::Ddim => SchedulerKind::Ddim,
            SchedulerChoice::Lcm => SchedulerKind::Lcm,
        }
    }
}

/// One scheduler, for one frame.
#[derive(Debug, Clone, Copy)]
pub enum Scheduler<'a> {
    Ddim(&'a DdimScheduler),
    Lcm(&'a LcmScheduler),
}

/// What a frame's denoising loop runs: the scheduler, its timesteps, and the schedule length
/// DDIM's step size derives from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Schedule {
    pub kind: SchedulerKind,
    pub timesteps: Vec<usize>,
    /// Steps of the whole schedule (`steps`; the frame runs the last `timesteps.len()`).
    pub steps: usize,
}

impl Schedule {
    /// How many re-noisings with fresh noise the frame needs (LCM: one after every step but
    /// the last; DDIM is deterministic: none).
    pub fn step_noise_rows(&self) -> usize {
        match self.kind {
            SchedulerKind::Ddim => 0,
            SchedulerKind::Lcm => self.timesteps.len().saturating_sub(1),
        }
    }
}

impl<'a> Scheduler<'a> {
    pub fn kind(&self) -> SchedulerKind {
        match self {
            Self::Ddim(_) => SchedulerKind::Ddim,
            Self::Lcm(_) => SchedulerKind::Lcm,
        }
    }

    /// The LCM scheduler, when this is one.
    pub fn as_lcm(&self) -> Option<&'a LcmScheduler> {
        match self {
            Self::Lcm(lcm) => Some(lcm),
            Self::Ddim(_) => None,
        }
    }

    /// The img2img schedule of a frame: `steps` and `strength` as
    /// `StableDiffusionControlNetImg2ImgPipeline` uses them (`set_timesteps(steps)`, then the
    /// last `int(steps * strength)`), or explicit timestep indices (LCM only; they replace
    /// steps and strength).
    pub fn schedule(&self, steps: usize, strength: f64, explicit: Option<&TimestepIndices>) -> Result<Schedule> {
        let timesteps = match (self, explicit) {
            (Self::Ddim(ddim), None) => ddim.img2img_timesteps(steps, strength)?,
            (Self::Lcm(lcm), None) => lcm.img2img_timesteps(steps, strength)?,
            (Self::Ddim(_), Some(indices)) => bail!(
                "timesteps {indices}: explicit timesteps need the lcm scheduler (this frame runs ddim; set scheduler to lcm)"
            ),
            (Self::Lcm(lcm), Some(indices)) => {
                let grid = lcm.set_timesteps(Some(TIMESTEP_INDEX_STEPS), None, None, 1.0).map_err(|e| {
                    e.context(format!("timesteps {indices}: cannot make the {TIMESTEP_INDEX_STEPS}-step LCM schedule"))
                })?;
                let timesteps = indices
                    .indices()
                    .iter()
                    .map(|&i| {
                        grid.get(i).copied().ok_or_else(|| {
                            anyhow::anyhow!(
                                "timesteps {indices}: index {i} is out of range: indices go from 0 to {} into the {}-step LCM schedule ({} .. {})",
                                grid.len() - 1,
                                grid.len(),
                                grid[0],
                                grid[grid.len() - 1]
                            )
                        })
                    })
                    .collect::<Result<Vec<_>>>()?;
                lcm.set_timesteps(None, None, Some(&timesteps), 1.0)?
            }
        };
        let steps = if explicit.is_some() { timesteps.len() } else { steps };
        Ok(Schedule { kind: self.kind(), timesteps, steps })
    }

    /// Noises clean latents to `timestep`.
    pub fn add_noise(&self, original: &Tensor, noise: &Tensor, timestep: usize) -> candle_core::Result<Tensor> {
        match self {
            Self::Ddim(ddim) => ddim.add_noise(original, noise, timestep),
            Self::Lcm(lcm) => lcm.add_noise(original, noise, timestep),
        }
    }

    /// Step `index` of `schedule`: from its timestep to the next. `noise` is the re-noising
    /// noise after this step (LCM, every step but the last; DDIM takes none).
    pub fn step(
        &self,
        model_output: &Tensor,
        schedule: &Schedule,
        index: usize,
        sample: &Tensor,
        noise: Option<&Tensor>,
    ) -> candle_core::Result<Tensor> {
        let timestep = schedule.timesteps[index];
        match self {
            Self::Ddim(ddim) => ddim.step(model_output, timestep, sample, schedule.steps),
            Self::Lcm(lcm) => {
                let next = match schedule.timesteps.get(index + 1) {
                    None => None,
                    Some(&next) => {
                        let Some(noise) = noise else {
                            candle_core::bail!("LCM step {index} re-noises to timestep {next} but has no step noise")
                        };
                        Some((next, noise))
                    }
                };
                lcm.step(model_output, timestep, sample, next)
            }
        }
    }
}

/// How the model's output is read (`prediction_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Prediction {
    Epsilon,
    Velocity,
    Sample,
}

impl Prediction {
    pub(crate) fn parse(name: &str) -> Result<Self> {
        Ok(match name {
            "epsilon" => Self::Epsilon,
            "v_prediction" => Self::Velocity,
            "sample" => Self::Sample,
            other => bail!("scheduler config: prediction_type {other:?} is not supported"),
        })
    }
}

/// The beta schedule fields both schedulers share.
pub(crate) struct BetaSchedule<'a> {
    pub num_train_timesteps: usize,
    pub beta_start: f64,
    pub beta_end: f64,
    pub beta_schedule: &'a str,
    pub trained_betas: Option<&'a [f64]>,
    pub rescale_betas_zero_snr: bool,
}

/// How many denoising steps an img2img frame runs for `steps` and `strength` (diffusers'
/// `min(int(steps * strength), steps)`), whatever the scheduler; 0 means the settings give no
/// step (an error when a frame is made, and before loading: `FrameSettings::check_has_steps`).
pub fn img2img_step_count(steps: usize, strength: f64) -> usize {
    ((steps as f64 * strength) as usize).min(steps)
}

/// The img2img pipeline's `get_timesteps`, whatever the scheduler: of the `steps`-step
/// schedule `all` makes, the last `min(int(steps * strength), steps)`. An error when that is
/// none at all; `strength` is checked before the schedule is made.
pub(crate) fn img2img_tail(
    steps: usize,
    strength: f64,
    all: impl FnOnce() -> Result<Vec<usize>>,
) -> Result<Vec<usize>> {
    if !(0.0..=1.0).contains(&strength) {
        bail!("strength {strength} is outside 0..1");
    }
    let all = all()?;
    let init = img2img_step_count(steps, strength);
    if init == 0 {
        bail!("steps {steps} x strength {strength} gives 0 denoising steps; raise steps or strength");
    }
    Ok(all[steps - init..].to_vec())
}

/// `alphas_cumprod` as diffusers computes it: betas as float32 tensors (the linspace too),
/// alphas = 1 - betas in float32, and torch's CPU cumprod, which accumulates in double and
/// rounds each partial product to float32.
pub(crate) fn alphas_cumprod(schedule: &BetaSchedule) -> Result<Vec<f64>> {
    let n = schedule.num_train_timesteps;
    let f32s = |values: Vec<f64>| values.into_iter().map(|v| v as f32).collect::<Vec<f32>>();
    let betas: Vec<f32> = match (schedule.trained_betas, schedule.beta_schedule) {
        (Some(betas), _) => {
            if betas.len() != n {
                bail!("scheduler config: {} trained_betas for {n} train timesteps", betas.len());
            }
            f32s(betas.to_vec())
        }
        (None, "linear") => f32s(linspace(schedule.beta_start, schedule.beta_end, n)),
        (None, "scaled_linear") => {
            f32s(linspace(schedule.beta_start.sqrt(), schedule.beta_end.sqrt(), n)).iter().map(|b| b * b).collect()
        }
        (None, "squaredcos_cap_v2") => {
            let alpha_bar = |t: f64| ((t + 0.008) / 1.008 * std::f64::consts::FRAC_PI_2).cos().powi(2);
            f32s(
                (0..n)
                    .map(|i| (1.0 - alpha_bar((i + 1) as f64 / n as f64) / alpha_bar(i as f64 / n as f64)).min(0.999))
                    .collect(),
            )
        }
        (None, other) => bail!("scheduler config: beta_schedule {other:?} is not supported"),
    };
    if schedule.rescale_betas_zero_snr {
        bail!("scheduler config: rescale_betas_zero_snr is not supported");
    }
    let mut alphas_cumprod = Vec::with_capacity(n);
    let mut product = 1f64;
    for beta in &betas {
        product *= (1.0 - beta) as f64;
        alphas_cumprod.push(product as f32 as f64);
    }
    Ok(alphas_cumprod)
}

fn linspace(start: f64, end: f64, n: usize) -> Vec<f64> {
    if n == 1 {
        return vec![start];
    }
    (0..n).map(|i| start + (end - start) * i as f64 / (n - 1) as f64).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn choices_and_indices_parse_with_errors_naming_the_value() {
        assert_eq!("LCM".parse::<SchedulerChoice>().unwrap(), SchedulerChoice::Lcm);
        let err = "pndm".parse::<SchedulerChoice>().unwrap_err().to_string();
        assert!(err.contains("\"pndm\"") && err.contains("auto, ddim or lcm"), "{err}");
        assert_eq!("32, 45".parse::<TimestepIndices>().unwrap().indices(), [32, 45]);
        assert_eq!(TimestepIndices::parse_optional(" ").unwrap(), None);
        let err = "32,x".parse::<TimestepIndices>().unwrap_err().to_string();
        assert!(err.contains("\"x\""), "{err}");
        let err = "45,32".parse::<TimestepIndices>().unwrap_err().to_string();
        assert!(err.contains("ascending") && err.contains("45,32"), "{err}");
        let err = "10,10".parse::<TimestepIndices>().unwrap_err().to_string();
        assert!(err.contains("ascending"), "{err}");
        assert!(TimestepIndices::new(vec![]).unwrap_err().to_string().contains("empty"));
    }

    #[test]
    fn auto_follows_the_config_class() {
        let pndm = SchedulerConfig::from_json(r#"{"_class_name": "PNDMScheduler"}"#).unwrap();
        assert_eq!(Schedulers::new(&pndm).unwrap().resolve(SchedulerChoice::Auto), SchedulerKind::Ddim);
        let lcm = SchedulerConfig::from_json(r#"{"_class_name": "LCMScheduler"}"#).unwrap();
        let schedulers = Schedulers::new(&lcm).unwrap();
        assert_eq!(schedulers.resolve(SchedulerChoice::Auto), SchedulerKind::Lcm);
        assert_eq!(schedulers.get(SchedulerChoice::Ddim).unwrap().kind(), SchedulerKind::Ddim);
    }
}
