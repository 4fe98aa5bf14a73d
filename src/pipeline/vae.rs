//! The pipeline's VAE, of either kind a diffusers directory may hold (its `config.json`'s
//! `_class_name`): the full `AutoencoderKL` or the tiny `AutoencoderTiny` (TAESD). Img2img
//! sees only images in [-1, 1] and the latents the UNet works on: as diffusers'
//! `StableDiffusionControlNetImg2ImgPipeline` does, encoding takes the KL VAE's posterior
//! (at its mean here, see [`super::Img2Img`]) or the tiny encoder's output (`retrieve_latents`:
//! it has no posterior) and multiplies by the config's `scaling_factor`; decoding divides by
//! it first.

use anyhow::Result;
use candle_core::Tensor;
use candle_nn::VarBuilder;
use serde::Deserialize;

use crate::models::vae::{AutoencoderKL, AutoencoderKLConfig};
use crate::models::vae_tiny::{AutoencoderTiny, AutoencoderTinyConfig};

/// A VAE's `config.json`, by its `_class_name`.
#[derive(Debug, Clone)]
pub enum VaeConfig {
    Kl(AutoencoderKLConfig),
    Tiny(AutoencoderTinyConfig),
}

/// The `_class_name`s a VAE directory may have.
pub const VAE_CLASSES: &[&str] = &["AutoencoderKL", "AutoencoderTiny"];

impl<'de> Deserialize<'de> for VaeConfig {
    /// `_class_name` AutoencoderKL or AutoencoderTiny; a config without it is read as
    /// AutoencoderKL (a pipeline's own `vae/`; a replacement VAE is checked for the key by the
    /// loader first).
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let value = serde_json::Value::deserialize(deserializer)?;
        match value.get("_class_name").and_then(|v| v.as_str()) {
            None | Some("AutoencoderKL") => serde_json::from_value(value).map(Self::Kl).map_err(D::Error::custom),
            Some("AutoencoderTiny") => serde_json::from_value(value).map(Self::Tiny).map_err(D::Error::custom),
            Some(other) => Err(D::Error::custom(format!(
                "_class_name {other:?} is not a VAE this engine runs (expected {})",
                VAE_CLASSES.join(" or ")
            ))),
        }
    }
}

impl VaeConfig {
    /// Channels of the latents (the UNet's input channels must match).
    pub fn latent_channels(&self) -> usize {
        match self {
            Self::Kl(c) => c.latent_channels,
            Self::Tiny(c) => c.latent_channels,
        }
    }

    /// Image pixels per latent along each side (8 for SD1.5's VAE and TAESD).
    pub fn scale_factor(&self) -> usize {
        match self {
            Self::Kl(c) => 1 << c.block_out_channels.len().saturating_sub(1),
            Self::Tiny(c) => c.downscale_factor(),
        }
    }

    /// The diffusers class name.
    pub fn class_name(&self) -> &'static str {
        match self {
            Self::Kl(_) => "AutoencoderKL",
            Self::Tiny(_) => "AutoencoderTiny",
        }
    }
}

/// A loaded VAE of either kind.
// One per loaded model: the variants' size difference costs nothing worth a box.
#[allow(clippy::large_enum_variant)]
pub enum Vae {
    Kl(AutoencoderKL),
    Tiny(AutoencoderTiny),
}

impl Vae {
    pub fn new(vb: VarBuilder, config: &VaeConfig) -> Result<Self> {
        Ok(match config {
            VaeConfig::Kl(c) => Self::Kl(AutoencoderKL::new(vb, c)?),
            VaeConfig::Tiny(c) => Self::Tiny(AutoencoderTiny::new(vb, c)?),
        })
    }

    fn scaling_factor(&self) -> f64 {
        match self {
            Self::Kl(vae) => vae.scaling_factor(),
            Self::Tiny(vae) => vae.scaling_factor(),
        }
    }

    /// Images `[N, 3, H, W]` in [-1, 1] to the latents the UNet works on (times
    /// `scaling_factor`).
    pub fn encode_scaled(&self, image: &Tensor) -> Result<Tensor> {
        let latents = match self {
            Self::Kl(vae) => vae.encode_mean(image)?,
            Self::Tiny(vae) => vae.encode(image)?,
        };
        Ok((latents * self.scaling_factor())?)
    }

    /// The UNet's latents (times `scaling_factor`) to images in about [-1, 1].
    pub fn decode_scaled(&self, latents: &Tensor) -> Result<Tensor> {
        let latents = (latents / self.scaling_factor())?;
        Ok(match self {
            Self::Kl(vae) => vae.decode(&latents)?,
            Self::Tiny(vae) => vae.decode(&latents)?,
        })
    }
}
