//! The Latent Consistency Model scheduler, computed as diffusers' `LCMScheduler` does:
//! `set_timesteps` (the `original_inference_steps` grid, `strength`, explicit timesteps and the
//! errors diffusers raises), the consistency boundary conditions `c_skip`/`c_out` with
//! `timestep_scaling`, the x0 prediction, and the re-noising to the next timestep between
//! steps (none after the last one). The noise of that re-noising is an argument: diffusers
//! draws it from its generator, the session keeps one tensor per step slot.

use anyhow::{Result, bail};
use candle_core::Tensor;
use serde::Deserialize;

use super::{BetaSchedule, Prediction};

/// The fields of `scheduler/scheduler_config.json` the LCM scheduler uses. Missing fields take
/// `LCMScheduler`'s defaults, as `LCMScheduler.from_config` does; so an SD1.5 PNDM config read
/// here is what `LCMScheduler.from_config(pipe.scheduler.config)` makes of it.
#[derive(Debug, Clone, Deserialize)]
pub struct LcmSchedulerConfig {
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
    #[serde(default = "default_original_inference_steps")]
    pub original_inference_steps: usize,
    #[serde(default)]
    pub clip_sample: bool,
    #[serde(default = "default_clip_range")]
    pub clip_sample_range: f64,
    #[serde(default = "default_prediction_type")]
    pub prediction_type: String,
    #[serde(default)]
    pub thresholding: bool,
    #[serde(default = "default_timestep_scaling")]
    pub timestep_scaling: f64,
    #[serde(default)]
    pub rescale_betas_zero_snr: bool,
    // `set_alpha_to_one`, `steps_offset` and `timestep_spacing` are in LCMScheduler's config
    // but its timesteps and steps never read them (the previous timestep is never negative).
}

fn default_train_timesteps() -> usize {
    1000
}
fn default_beta_start() -> f64 {
    0.00085
}
fn default_beta_end() -> f64 {
    0.012
}
fn default_beta_schedule() -> String {
    "scaled_linear".into()
}
fn default_original_inference_steps() -> usize {
    50
}
fn default_clip_range() -> f64 {
    1.0
}
fn default_prediction_type() -> String {
    "epsilon".into()
}
fn default_timestep_scaling() -> f64 {
    10.0
}

impl Default for LcmSchedulerConfig {
    fn default() -> Self {
        serde_json::from_str("{}").expect("every field has a default")
    }
}

/// `sigma_data` of the consistency boundary conditions (diffusers hard-codes 0.5).
const SIGMA_DATA: f64 = 0.5;

#[derive(Debug, Clone)]
pub struct LcmScheduler {
    alphas_cumprod: Vec<f64>,
    train_timesteps: usize,
    original_inference_steps: usize,
    timestep_scaling: f64,
    prediction: Prediction,
    clip_sample: Option<f64>,
}

impl LcmScheduler {
    pub fn new(config: &LcmSchedulerConfig) -> Result<Self> {
        let n = config.num_train_timesteps;
        if n == 0 {
            bail!("scheduler config: num_train_timesteps is 0");
        }
        let alphas_cumprod = super::alphas_cumprod(&BetaSchedule {
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
        if config.original_inference_steps == 0 {
            bail!("scheduler config: original_inference_steps is 0");
        }
        Ok(Self {
            alphas_cumprod,
            train_timesteps: n,
            original_inference_steps: config.original_inference_steps,
            timestep_scaling: config.timestep_scaling,
            prediction: Prediction::parse(&config.prediction_type)?,
            clip_sample: config.clip_sample.then_some(config.clip_sample_range),
        })
    }

    /// `alphas_cumprod` as diffusers holds it (float32 values).
    pub fn alphas_cumprod(&self) -> &[f64] {
        &self.alphas_cumprod
    }

    pub fn original_inference_steps(&self) -> usize {
        self.original_inference_steps
    }

    pub fn train_timesteps(&self) -> usize {
        self.train_timesteps
    }

    /// Whether the model predicts the noise (residual guidance needs that).
    pub fn predicts_epsilon(&self) -> bool {
        self.prediction == Prediction::Epsilon
    }

    /// `LCMScheduler.set_timesteps(num_inference_steps=steps, original_inference_steps=original,
    /// timesteps=custom, strength=strength)`: exactly one of `steps` and `custom`; `original`
    /// defaults to the config's. Returns the timesteps (descending), or the error diffusers
    /// raises (and an error where diffusers would divide by zero or index an empty list).
    /// diffusers' warnings (a custom schedule off the training grid, ...) are logged.
    pub fn set_timesteps(
        &self,
        steps: Option<usize>,
        original: Option<usize>,
        custom: Option<&[usize]>,
        strength: f64,
    ) -> Result<Vec<usize>> {
        let n = self.train_timesteps;
        let original = original.unwrap_or(self.original_inference_steps);
        match (steps, custom) {
            (None, None) => bail!("LCM timesteps: give either a number of steps or explicit timesteps"),
            (Some(_), Some(_)) => bail!("LCM timesteps: give a number of steps or explicit timesteps, not both"),
            _ => {}
        }
        if original > n {
            bail!("LCM original_inference_steps {original} is larger than the scheduler's {n} train timesteps");
        }
        if original == 0 {
            bail!("LCM original_inference_steps is 0");
        }
        if !(0.0..=1.0).contains(&strength) {
            bail!("strength {strength} is outside 0..1");
        }
        let k = n / original;
        // np.asarray(range(1, int(original * strength) + 1)) * k - 1, ascending.
        let origin_count = (original as f64 * strength) as usize;
        let origin: Vec<usize> = (1..=origin_count).map(|i| i * k - 1).collect();
        if let Some(custom) = custom {
            let Some(&first) = custom.first() else {
                bail!("LCM timesteps: the explicit timestep list is empty");
            };
            for pair in custom.windows(2) {
                if pair[1] >= pair[0] {
                    bail!("LCM timesteps must be in descending order: {} comes after {}", pair[1], pair[0]);
                }
            }
            if first >= n {
                bail!("LCM timesteps must start below the scheduler's {n} train timesteps, got {first}");
            }
            if strength == 1.0 && first != n - 1 {
                tracing::debug!(first, "explicit LCM timesteps do not start at {}", n - 1);
            }
            let off_grid: Vec<usize> = custom[1..].iter().copied().filter(|t| !origin.contains(t)).collect();
            if !off_grid.is_empty() {
                tracing::warn!(?off_grid, "explicit LCM timesteps off the original training/distillation grid");
            }
            if custom.len() > original {
                tracing::warn!(count = custom.len(), original, "more explicit LCM timesteps than original steps");
            }
            let count = custom.len();
            let init = ((count as f64 * strength) as usize).min(count);
            return Ok(custom[count - init..].to_vec());
        }
        let steps = steps.expect("checked above");
        if steps == 0 {
            bail!("LCM timesteps: steps must be at least 1");
        }
        if steps > n {
            bail!("LCM steps {steps} is larger than the scheduler's {n} train timesteps");
        }
        let skipping_step = origin.len() / steps;
        if skipping_step < 1 {
            bail!(
                "LCM original_inference_steps x strength = {original} x {strength} gives {} timesteps, fewer than the {steps} steps: \
                 lower steps or raise strength",
                origin.len()
            );
        }
        if steps > original {
            bail!("LCM steps {steps} is larger than original_inference_steps {original}");
        }
        // np.floor(np.linspace(0, len, steps, endpoint=False)) into the descending grid.
        let len = origin.len();
        let step = len as f64 / steps as f64;
        Ok((0..steps).map(|i| (i as f64 * step).floor() as usize).map(|index| origin[len - 1 - index]).collect())
    }

    /// The timesteps `StableDiffusionControlNetImg2ImgPipeline` runs with this scheduler:
    /// `set_timesteps(steps)` (strength 1 there), then the last `min(int(steps * strength),
    /// steps)` of them (the pipeline's `get_timesteps`). An error when that is none at all.
    pub fn img2img_timesteps(&self, steps: usize, strength: f64) -> Result<Vec<usize>> {
        super::img2img_tail(steps, strength, || self.set_timesteps(Some(steps), None, None, 1.0))
    }

    /// `get_scalings_for_boundary_condition_discrete`: `(c_skip, c_out)` at `timestep`.
    pub fn boundary_scalings(&self, timestep: usize) -> (f64, f64) {
        // diffusers multiplies the integer timestep tensor by the scaling: float32 values.
        let scaled = (timestep as f64 * self.timestep_scaling) as f32 as f64;
        let sigma2 = SIGMA_DATA * SIGMA_DATA;
        let c_skip = sigma2 / (scaled * scaled + sigma2);
        let c_out = scaled / (scaled * scaled + sigma2).sqrt();
        (c_skip, c_out)
    }

    fn check_timestep(&self, timestep: usize) -> candle_core::Result<()> {
        if timestep >= self.train_timesteps {
            candle_core::bail!("timestep {timestep} is outside the scheduler's {} steps", self.train_timesteps);
        }
        Ok(())
    }

    /// `sqrt(alphas_cumprod[t])` and `sqrt(1 - alphas_cumprod[t])` (diffusers' float32 values).
    pub fn alpha_beta_sqrt(&self, timestep: usize) -> candle_core::Result<(f64, f64)> {
        self.check_timestep(timestep)?;
        let alpha = self.alphas_cumprod[timestep];
        Ok((alpha.sqrt(), (1.0 - alpha).sqrt()))
    }

    /// Noises clean latents to `timestep` (diffusers' `add_noise`).
    pub fn add_noise(&self, original: &Tensor, noise: &Tensor, timestep: usize) -> candle_core::Result<Tensor> {
        let (alpha, beta) = self.alpha_beta_sqrt(timestep)?;
        (original * alpha)? + (noise * beta)?
    }

    /// The consistency model's denoised sample at `timestep`: `c_out * x0 + c_skip * sample`,
    /// x0 predicted from the model output (epsilon, v or sample), clipped when the config
    /// says so.
    pub fn denoise(&self, model_output: &Tensor, timestep: usize, sample: &Tensor) -> candle_core::Result<Tensor> {
        let (alpha, beta) = self.alpha_beta_sqrt(timestep)?;
        let x0 = match self.prediction {
            Prediction::Epsilon => ((sample - (model_output * beta)?)? / alpha)?,
            Prediction::Sample => model_output.clone(),
            Prediction::Velocity => ((sample * alpha)? - (model_output * beta)?)?,
        };
        let x0 = match self.clip_sample {
            Some(range) => x0.clamp(-range, range)?,
            None => x0,
        };
        let (c_skip, c_out) = self.boundary_scalings(timestep);
        (x0 * c_out)? + (sample * c_skip)?
    }

    /// One `LCMScheduler.step` at `timestep`: the denoised sample, re-noised to `next` with
    /// `noise` (`sqrt(a_next) * denoised + sqrt(1 - a_next) * noise`) unless this is the
    /// schedule's last step (`next` is `None`), where the denoised sample is the result.
    pub fn step(
        &self,
        model_output: &Tensor,
        timestep: usize,
        sample: &Tensor,
        next: Option<(usize, &Tensor)>,
    ) -> candle_core::Result<Tensor> {
        let denoised = self.denoise(model_output, timestep, sample)?;
        match next {
            None => Ok(denoised),
            Some((next, noise)) => self.add_noise(&denoised, noise, next),
        }
    }
}
