//! The Stable Diffusion 1.5 architecture as candle models, one per file, loaded from
//! diffusers-format checkpoints: each has a serde `*Config` read from the checkpoint's
//! `config.json` and a `new(vb, &config)` + `forward`. The operations they run come from
//! [`crate::ops`].

pub mod attention;
pub mod clip;
pub mod controlnet;
pub mod embeddings;
pub mod resnet;
pub mod sd15;
pub mod unet;
pub mod unet_blocks;
pub mod unet_config;
pub mod vae;
pub mod vae_blocks;
pub mod vae_tiny;
