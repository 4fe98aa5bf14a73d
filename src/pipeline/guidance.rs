//! Combining the UNet's outputs into the noise a step uses: plain classifier-free guidance, and
//! StreamDiffusion's residual classifier-free guidance (RCFG), `self` and `initialize`.
//!
//! RCFG as StreamDiffusion's code computes it (cumulo-autumn/StreamDiffusion,
//! `src/streamdiffusion/pipeline.py`: `predict_x0_batch`, `unet_step`,
//! `scheduler_step_batch`; its denoising-batch path, followed for one frame through its steps;
//! one frame per batch slot). Step k runs at timestep t_k; a_k = sqrt(alphas_cumprod[t_k]),
//! b_k = sqrt(1 - alphas_cumprod[t_k]), (c_skip_k, c_out_k) the LCM boundary scalings; z_0 is
//! the frame's initial noise and z_{k+1} the noise the LCM step re-noises with after step k
//! (StreamDiffusion's `init_noise[k + 1]`); delta = 1 (StreamDiffusion's default `delta`):
//!
//! - stock_0 = z_0 (`self`), or the UNet's prediction for the negative prompt at step 0
//!   (`initialize`, the only extra evaluation).
//! - uncond_k = delta * stock_k;  eps_k = uncond_k + scale * (eps(x_k, t_k, prompt) - uncond_k).
//! - x_{k+1} = the LCM step with eps_k (denoise, re-noise to t_{k+1} with z_{k+1}).
//! - stock_{k+1} = z_{k+1} + (a_{k+1} / b_{k+1}) * (c_out_k * (b_k * stock_k - b_k * eps_k) / a_k
//!   + c_skip_k * b_k * stock_k)  (`scheduler_step_batch` applied to `beta_prod_t_sqrt *
//!   stock_noise`, scaled by `alpha_next / beta_next`).
//!
//! The last step's stock update is never used, and is not computed.

use anyhow::{Result, bail};
use candle_core::Tensor;

use super::settings::GuidanceMode;
use crate::scheduler::{LcmScheduler, Schedule};

/// StreamDiffusion's `delta` (its default): the weight of the stock noise as the negative noise.
pub const RESIDUAL_DELTA: f64 = 1.0;

/// The guidance of one frame: its mode and scale, and RCFG's stock noise between steps.
pub struct Guidance<'a> {
    mode: GuidanceMode,
    scale: f64,
    lcm: Option<&'a LcmScheduler>,
    stock: Option<Tensor>,
}

impl<'a> Guidance<'a> {
    /// `mode` already resolved ([`super::FrameSettings::effective_guidance`]); `initial_noise`
    /// is the frame's start noise (RCFG `self` starts from it). RCFG needs the LCM scheduler with
    /// epsilon prediction.
    pub fn new(mode: GuidanceMode, scale: f64, lcm: Option<&'a LcmScheduler>, initial_noise: &Tensor) -> Result<Self> {
        let lcm = Self::check(mode, lcm)?;
        let stock = (mode == GuidanceMode::SelfNegative).then(|| initial_noise.clone());
        Ok(Self { mode, scale, lcm, stock })
    }

    /// Continues a frame's guidance with the stock noise [`Self::into_stock`] gave (a frame
    /// of a stream batch keeps its guidance between UNet calls).
    pub fn resume(
        mode: GuidanceMode,
        scale: f64,
        lcm: Option<&'a LcmScheduler>,
        stock: Option<Tensor>,
    ) -> Result<Self> {
        let lcm = Self::check(mode, lcm)?;
        Ok(Self { mode, scale, lcm, stock })
    }

    /// The stock noise the next step starts from (residual guidance), to [`Self::resume`] with.
    pub fn into_stock(self) -> Option<Tensor> {
        self.stock
    }

    /// Whether `mode` can run with this scheduler (RCFG: LCM with epsilon prediction); the
    /// scheduler RCFG uses.
    pub fn check(mode: GuidanceMode, lcm: Option<&'a LcmScheduler>) -> Result<Option<&'a LcmScheduler>> {
        Ok(match (mode.is_residual(), lcm) {
            (false, _) => None,
            (true, None) => bail!("guidance {mode} (residual CFG) needs the lcm scheduler; this frame runs ddim"),
            (true, Some(lcm)) if !lcm.predicts_epsilon() => {
                bail!("guidance {mode} (residual CFG) needs a model that predicts the noise (prediction_type epsilon)")
            }
            (true, Some(lcm)) => Some(lcm),
        })
    }

    /// The noise step `index` uses, from the UNet's output for its batch
    /// (`[negative; positive]` rows where the step has batch 2).
    pub fn combine(&mut self, index: usize, prediction: &Tensor) -> Result<Tensor> {
        let guided = |uncond: &Tensor, cond: &Tensor| -> candle_core::Result<Tensor> {
            uncond + ((cond - uncond)? * self.scale)?
        };
        Ok(match self.mode {
            GuidanceMode::Auto | GuidanceMode::None => prediction.clone(),
            GuidanceMode::Full => guided(&prediction.narrow(0, 0, 1)?, &prediction.narrow(0, 1, 1)?)?,
            GuidanceMode::SelfNegative | GuidanceMode::Initialize => {
                let cond = if self.mode == GuidanceMode::Initialize && index == 0 {
                    self.stock = Some(prediction.narrow(0, 0, 1)?);
                    prediction.narrow(0, 1, 1)?
                } else {
                    prediction.clone()
                };
                let Some(stock) = &self.stock else { bail!("residual guidance has no stock noise at step {index}") };
                let uncond = (stock * RESIDUAL_DELTA)?;
                guided(&uncond, &cond)?
            }
        })
    }

    /// After step `index` ran with `eps` and re-noised with `noise`: the stock noise of the
    /// next step (RCFG only; nothing after the last step).
    pub fn advance(&mut self, schedule: &Schedule, index: usize, eps: &Tensor, noise: Option<&Tensor>) -> Result<()> {
        let (Some(lcm), Some(stock), Some(&next)) = (self.lcm, &self.stock, schedule.timesteps.get(index + 1)) else {
            return Ok(());
        };
        let Some(noise) = noise else { bail!("residual guidance: no step noise after step {index}") };
        let t = schedule.timesteps[index];
        let (a, b) = lcm.alpha_beta_sqrt(t)?;
        let (a_next, b_next) = lcm.alpha_beta_sqrt(next)?;
        let (c_skip, c_out) = lcm.boundary_scalings(t);
        let scaled = (stock * b)?;
        let x0 = ((&scaled - (eps * b)?)? / a)?;
        let delta_x = ((x0 * c_out)? + (scaled * c_skip)?)?;
        self.stock = Some((noise + (delta_x * (a_next / b_next))?)?);
        Ok(())
    }
}
