//! Candle models, one per file, loaded from diffusers-format checkpoints.

pub mod attention;
pub mod clip;
pub mod controlnet;
pub mod conv;
pub mod embeddings;
pub mod flash_attention;
pub mod group_norm;
mod op_storage;
pub mod resnet;
pub mod unet;
pub mod unet_blocks;
pub mod vae;
pub mod vae_blocks;
