//! The real Stable Diffusion 1.5 configs, embedded: runwayml/stable-diffusion-v1-5's `unet/`,
//! `vae/`, `text_encoder/` and `scheduler/` configs, lllyasviel/sd-controlnet-canny's
//! `config.json` and madebyollin/taesd's `config.json` (the tiny VAE; the JSON files in
//! `src/models/sd15/`, unchanged). For building SD1.5-shaped
//! models without a checkpoint (benchmarks) and for tests of the config derivations.

use candle_core::Result;
use serde::de::DeserializeOwned;

use super::clip::ClipTextConfig;
use super::controlnet::ControlNetConfig;
use super::unet::UNet2DConditionConfig;
use super::vae::AutoencoderKLConfig;
use super::vae_tiny::AutoencoderTinyConfig;
use crate::scheduler::SchedulerConfig;

const UNET: &str = include_str!("sd15/unet.json");
const CONTROLNET: &str = include_str!("sd15/controlnet.json");
const VAE: &str = include_str!("sd15/vae.json");
const TAESD: &str = include_str!("sd15/taesd.json");
const TEXT_ENCODER: &str = include_str!("sd15/text_encoder.json");
const SCHEDULER: &str = include_str!("sd15/scheduler.json");

fn parse<T: DeserializeOwned>(json: &str, what: &str) -> Result<T> {
    serde_json::from_str(json)
        .map_err(|e| candle_core::Error::Msg(format!("the embedded SD1.5 {what} config does not parse: {e}")))
}

/// runwayml/stable-diffusion-v1-5 `unet/config.json`.
pub fn unet_config() -> Result<UNet2DConditionConfig> {
    parse(UNET, "UNet")
}

/// lllyasviel/sd-controlnet-canny `config.json`.
pub fn controlnet_config() -> Result<ControlNetConfig> {
    parse(CONTROLNET, "ControlNet")
}

/// runwayml/stable-diffusion-v1-5 `vae/config.json`.
pub fn vae_config() -> Result<AutoencoderKLConfig> {
    parse(VAE, "VAE")
}

/// madebyollin/taesd `config.json`: the tiny VAE (AutoencoderTiny) for SD1.5's latents.
pub fn taesd_config() -> Result<AutoencoderTinyConfig> {
    parse(TAESD, "TAESD")
}

/// runwayml/stable-diffusion-v1-5 `text_encoder/config.json` (openai/clip-vit-large-patch14's
/// text model).
pub fn text_encoder_config() -> Result<ClipTextConfig> {
    parse(TEXT_ENCODER, "text encoder")
}

/// runwayml/stable-diffusion-v1-5 `scheduler/scheduler_config.json` (a PNDM config: `auto`
/// runs DDIM on it; DDIM and LCM read its fields with their own defaults for the rest).
pub fn scheduler_config() -> Result<SchedulerConfig> {
    parse(SCHEDULER, "scheduler")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_config_parses_with_sd15_sizes() -> Result<()> {
        assert_eq!(unet_config()?.block_out_channels, [320, 640, 1280, 1280]);
        assert_eq!(controlnet_config()?.conditioning_embedding_out_channels, [16, 32, 96, 256]);
        assert_eq!(vae_config()?.block_out_channels, [128, 256, 512, 512]);
        let taesd = taesd_config()?;
        assert_eq!((taesd.latent_channels, taesd.downscale_factor(), taesd.scaling_factor), (4, 8, 1.0));
        assert_eq!(taesd.num_encoder_blocks, [1, 3, 3, 3]);
        let text = text_encoder_config()?;
        assert_eq!((text.hidden_size, text.num_hidden_layers, text.vocab_size), (768, 12, 49408));
        assert_eq!(scheduler_config()?.ddim().map_err(candle_core::Error::wrap)?.num_train_timesteps, 1000);
        Ok(())
    }
}
