//! DDIM, computed exactly as diffusers' `DDIMScheduler` does for img2img (eta 0): the
//! timestep spacing, `steps_offset`, `set_alpha_to_one` and the `strength` slicing of
//! `StableDiffusionControlNetImg2ImgPipeline.get_timesteps`.

use anyhow::{Result, bail};
use candle_core::Tensor;
use serde::Deserialize;

use super::Prediction;

/// The fields of `scheduler/scheduler_config.json` DDIM uses; other schedulers' configs
/// (SD1.5 ships a PNDM one) carry the same fields, and unknown ones are ignored. Missing
/// fields take `DDIMScheduler`'s defaults, as `DDIMScheduler.from_config` does.
#[derive(Debug, Clone, Deserialize)]
pub struct DdimSchedulerConfig {
    #[serde(default = "default_train_timesteps")]
    pub num_train_timesteps: usize,
    #[serde(default = "default_beta_start")]
    pub beta_start: f64,
    #[serde(default = "default_beta_end")]
    pub beta_end: f64,
    #[serde(default = "default_beta_schedule")]
    pub beta_schedule: String,
    #[serde(default)]
    pub trained_betas: Option<Vec<f64>>,
    #[serde(default = "yes")]
    pub set_alpha_to_one: bool,
    #[serde(default)]
    pub steps_offset: usize,
    #[serde(default = "default_spacing")]
    pub timestep_spacing: String,
    #[serde(default = "default_prediction_type")]
    pub prediction_type: String,
    #[serde(default = "yes")]
    pub clip_sample: bool,
    #[serde(default = "default_clip_range")]
    pub clip_sample_range: f64,
    #[serde(default)]
    pub thresholding: bool,
    #[serde(default)]
    pub rescale_betas_zero_snr: bool,
}

fn yes() -> bool {
    true
}
fn default_train_timesteps() -> usize {
    1000
}
fn default_beta_start() -> f64 {
    0.0001
}
fn default_beta_end() -> f64 {
    0.02
}
fn default_beta_schedule() -> String {
    "linear".into()
}
fn default_spacing() -> String {
    "leading".into()
}
fn default_prediction_type() -> String {
    "epsilon".into()
}
fn default_clip_range() -> f64 {
    1.0
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Spacing {
    Leading,
    Trailing,
    Linspace,
}

#[derive(Debug, Clone)]
pub struct DdimScheduler {
    alphas_cumprod: Vec<f64>,
    final_alpha_cumprod: f64,
    train_timesteps: usize,
    steps_offset: usize,
    spacing: Spacing,
    prediction: Prediction,
    clip_sample: Option<f64>,
}

impl DdimScheduler {
    pub fn new(config: &DdimSchedulerConfig) -> Result<Self> {
        let n = config.num_train_timesteps;
        if n == 0 {
            bail!("scheduler config: num_train_timesteps is 0");
        }
        let alphas_cumprod = super::alphas_cumprod(&super::BetaSchedule {
            num_train_timesteps: n,
            beta_start: config.beta_start,
            beta_end: config.beta_end,
            beta_schedule: &config.beta_schedule,
            trained_betas: config.trained_betas.as_deref(),
            rescale_betas_zero_snr: config.rescale_betas_zero_snr,
        })?;
        if config.thresholding {
            bail!("scheduler config: thresholding is not supported");
        }
        let final_alpha_cumprod = if config.set_alpha_to_one { 1.0 } else { alphas_cumprod[0] };
        let spacing = match config.timestep_spacing.as_str() {
            "leading" => Spacing::Leading,
            "trailing" => Spacing::Trailing,
            "linspace" => Spacing::Linspace,
            other => bail!("scheduler config: timestep_spacing {other:?} is not supported"),
        };
        let prediction = Prediction::parse(&config.prediction_type)?;
        Ok(Self {
            alphas_cumprod,
            final_alpha_cumprod,
            train_timesteps: n,
            steps_offset: config.steps_offset,
            spacing,
            prediction,
            clip_sample: config.clip_sample.then_some(config.clip_sample_range),
        })
    }

    /// `alphas_cumprod` as diffusers holds it (float32 values).
    pub fn alphas_cumprod(&self) -> &[f64] {
        &self.alphas_cumprod
    }

    /// All timesteps of a `steps`-step schedule, as `set_timesteps` computes them (numpy's
    /// arithmetic and round-half-to-even).
    ///
    /// One deliberate difference: for some step counts (61, 103, 121, ...) numpy's
    /// `arange(n, 0, -n / steps)` yields one element too many and diffusers' "trailing"
    /// schedule ends in timestep -1; that entry is left out here.
    pub fn timesteps(&self, steps: usize) -> Result<Vec<usize>> {
        let n = self.train_timesteps;
        if steps == 0 || steps > n {
            bail!("steps must be between 1 and {n}, got {steps}");
        }
        let timesteps: Vec<i64> = match self.spacing {
            Spacing::Leading => {
                let ratio = n / steps;
                (0..steps).rev().map(|i| (i * ratio + self.steps_offset) as i64).collect()
            }
            Spacing::Trailing => {
                // np.arange(n, 0, -ratio): length ceil(n / ratio), element i = n + i * delta with
                // delta = (n - ratio) - n.
                let start = n as f64;
                let ratio = start / steps as f64;
                let delta = (start - ratio) - start;
                let length = (-start / -ratio).ceil() as usize;
                (0..length).map(|i| (start + i as f64 * delta).round_ties_even() as i64 - 1).collect()
            }
            Spacing::Linspace => {
                // np.linspace(0, n - 1, steps): i * ((n - 1) / (steps - 1)), last exactly n - 1.
                let stop = (n - 1) as f64;
                let step = if steps > 1 { stop / (steps - 1) as f64 } else { 0.0 };
                (0..steps)
                    .rev()
                    .map(|i| if i + 1 == steps && steps > 1 { stop } else { i as f64 * step })
                    .map(|t| t.round_ties_even() as i64)
                    .collect()
            }
        };
        if let Some(&beyond) = timesteps.iter().find(|&&t| t >= n as i64) {
            bail!(
                "{steps} steps with steps_offset {} reach timestep {beyond}, beyond the scheduler's {n} train timesteps",
                self.steps_offset
            );
        }
        Ok(timesteps.into_iter().filter(|&t| t >= 0).map(|t| t as usize).collect())
    }

    /// The timesteps an img2img frame runs: the last `min(int(steps * strength), steps)` of the
    /// schedule. An error when that is none at all.
    pub fn img2img_timesteps(&self, steps: usize, strength: f64) -> Result<Vec<usize>> {
        super::img2img_tail(steps, strength, || self.timesteps(steps))
    }

    fn alpha_cumprod(&self, timestep: i64) -> f64 {
        if timestep >= 0 { self.alphas_cumprod[timestep as usize] } else { self.final_alpha_cumprod }
    }

    fn check_timestep(&self, timestep: usize) -> candle_core::Result<()> {
        if timestep >= self.train_timesteps {
            candle_core::bail!("timestep {timestep} is outside the scheduler's {} steps", self.train_timesteps);
        }
        Ok(())
    }

    /// Noises clean latents to `timestep` (diffusers' `add_noise`).
    pub fn add_noise(&self, original: &Tensor, noise: &Tensor, timestep: usize) -> candle_core::Result<Tensor> {
        self.check_timestep(timestep)?;
        let alpha = self.alphas_cumprod[timestep];
        (original * alpha.sqrt())? + (noise * (1.0 - alpha).sqrt())?
    }

    /// One DDIM step (eta 0) from `timestep` to the previous one of a `steps`-step schedule.
    pub fn step(
        &self,
        model_output: &Tensor,
        timestep: usize,
        sample: &Tensor,
        steps: usize,
    ) -> candle_core::Result<Tensor> {
        self.check_timestep(timestep)?;
        let prev_timestep = timestep as i64 - (self.train_timesteps / steps.max(1)) as i64;
        let alpha_t = self.alphas_cumprod[timestep];
        let alpha_prev = self.alpha_cumprod(prev_timestep);
        let beta_t = 1.0 - alpha_t;
        let (pred_original, pred_epsilon) = match self.prediction {
            Prediction::Epsilon => {
                let x0 = ((sample - (model_output * beta_t.sqrt())?)? / alpha_t.sqrt())?;
                (x0, model_output.clone())
            }
            Prediction::Sample => {
                let eps = ((sample - (model_output * alpha_t.sqrt())?)? / beta_t.sqrt())?;
                (model_output.clone(), eps)
            }
            Prediction::Velocity => {
                let x0 = ((sample * alpha_t.sqrt())? - (model_output * beta_t.sqrt())?)?;
                let eps = ((model_output * alpha_t.sqrt())? + (sample * beta_t.sqrt())?)?;
                (x0, eps)
            }
        };
        let pred_original = match self.clip_sample {
            Some(range) => pred_original.clamp(-range, range)?,
            None => pred_original,
        };
        let direction = (pred_epsilon * (1.0 - alpha_prev).sqrt())?;
        (pred_original * alpha_prev.sqrt())? + direction
    }
}
