//! Candle models, one per file, loaded from diffusers-format checkpoints.

pub mod attention;
pub mod clip;
pub mod controlnet;
pub mod conv;
pub mod embeddings;
pub mod flash_attention;
pub mod fused;
pub mod group_norm;
pub mod im2col;
mod op_storage;
pub mod resnet;
pub mod unet;
pub mod unet_blocks;
pub mod vae;
pub mod vae_blocks;

/// Largest absolute difference of two tensors, compared in f32 (unit tests).
#[cfg(test)]
pub(crate) fn max_abs_diff(a: &candle_core::Tensor, b: &candle_core::Tensor) -> f32 {
    use candle_core::DType;
    let d = (a.to_dtype(DType::F32).unwrap() - b.to_dtype(DType::F32).unwrap()).unwrap();
    d.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}
