//! Arguments the whole-frame benchmarks share: which models, and what a frame runs.

use std::path::PathBuf;

use anyhow::Result;
use candle_core::{DType, Device};
use clap::Args;
use sdcrossframe::pipeline::{FrameSettings, GuidanceMode, ModelSpec, Stylizer, load_vae};
use sdcrossframe::scheduler::{SchedulerChoice, TimestepIndices};

use crate::random::sd15_parts;

#[derive(Args, Debug)]
pub struct ModelArgs {
    /// A Stable Diffusion model (diffusers directory, repo id or single-file checkpoint, loaded
    /// as the element loads it); without it, random weights at SD1.5 shapes.
    #[arg(long, requires = "controlnet")]
    model: Option<String>,
    /// A ControlNet model (with --model): a directory, repo id or single .safetensors file.
    #[arg(long, requires = "model")]
    controlnet: Option<String>,
    /// A VAE replacing the model's, or the random weights' SD1.5 VAE: a diffusers
    /// AutoencoderTiny or AutoencoderKL directory or repo id, e.g. madebyollin/taesd, or a
    /// single-file VAE.
    #[arg(long, value_name = "DIR|FILE")]
    vae: Option<String>,
    /// Random weights with a TAESD-shaped tiny VAE (madebyollin/taesd's config, random
    /// weights) instead of SD1.5's VAE.
    #[arg(long, conflicts_with_all = ["model", "vae"])]
    tiny_vae: bool,
    /// The CLIP tokenizer folder random weights and single-file checkpoints (--model FILE)
    /// use (the tiny test model's is the real one).
    #[arg(long, default_value = "tests/fixtures/tiny-sd/tokenizer")]
    tokenizer: PathBuf,
}

impl ModelArgs {
    /// The models, loaded with the engine's loader, and what they are.
    pub fn load(&self, device: &Device, dtype: DType) -> Result<(Stylizer, String)> {
        Ok(match (&self.model, &self.controlnet) {
            (Some(model), Some(controlnet)) => {
                let spec = ModelSpec {
                    model: model.clone(),
                    controlnet: controlnet.clone(),
                    variant: None,
                    loras: Vec::new(),
                    vae: self.vae.clone(),
                    tokenizer: sdcrossframe::single_file::names_a_file(model)
                        .then(|| self.tokenizer.display().to_string()),
                };
                let vae = self.vae.as_deref().map(|v| format!(" + VAE {v}")).unwrap_or_default();
                (Stylizer::load(&spec, device, dtype)?, format!("{model} + {controlnet}{vae}"))
            }
            _ => {
                let mut parts = sd15_parts(dtype, device, &self.tokenizer, self.tiny_vae)?;
                let vae = match (&self.vae, self.tiny_vae) {
                    (Some(vae), _) => {
                        parts.vae = load_vae(vae, None, device, dtype)?;
                        format!(", VAE {vae}")
                    }
                    (None, true) => ", TAESD-shaped tiny VAE".into(),
                    (None, false) => String::new(),
                };
                (Stylizer::build(parts, device, dtype)?, format!("random weights at SD1.5 shapes{vae}"))
            }
        })
    }
}

#[derive(Args, Debug)]
pub struct GenerationArgs {
    /// Processing width.
    #[arg(long, default_value_t = 512)]
    pub width: usize,
    /// Processing height.
    #[arg(long, default_value_t = 512)]
    pub height: usize,
    #[arg(long, default_value_t = 20)]
    steps: usize,
    #[arg(long, default_value_t = 0.9)]
    strength: f64,
    #[arg(long, default_value_t = 7.5)]
    guidance_scale: f64,
    #[arg(long, default_value_t = 0.7)]
    controlnet_scale: f64,
    /// Scheduler: auto (the model's config names it; random weights use SD1.5's PNDM config:
    /// ddim), ddim or lcm (on SD1.5's config: LCMScheduler's defaults for the rest).
    #[arg(long, default_value = "auto")]
    scheduler: SchedulerChoice,
    /// Explicit LCM timesteps: indices into the 50-step LCM schedule, e.g. 32,45.
    #[arg(long)]
    timesteps: Option<TimestepIndices>,
    /// Guidance: auto (full when --guidance-scale > 1), none, full, self or initialize
    /// (residual CFG, lcm only).
    #[arg(long, default_value = "auto")]
    guidance: GuidanceMode,
    /// Also time the stream batch (the frames in flight denoised together, each at its own
    /// step), as the element's `stream-batch` property runs it: `--stream-batch true`.
    #[arg(long, default_value_t = false, action = clap::ArgAction::Set)]
    pub stream_batch: bool,
    /// Where the sessions' cross-frame stores keep their entries: device or host (the
    /// element's `cross-frame-store`; the `session` and `streams` commands).
    #[arg(long, default_value = "device")]
    pub store: sdcrossframe::cross_frame::StoreLocation,
}

impl GenerationArgs {
    pub fn settings(&self) -> FrameSettings {
        FrameSettings {
            prompt: "a watercolor painting of a woman, soft light".into(),
            negative_prompt: String::new(),
            steps: self.steps,
            strength: self.strength,
            guidance_scale: self.guidance_scale,
            controlnet_scale: self.controlnet_scale,
            scheduler: self.scheduler,
            timesteps: self.timesteps.clone(),
            guidance: self.guidance,
        }
    }
}
