//! The GPU backend: the operations the models ask for, each with a candle reference path (the
//! CPU, and CUDA when switched off) and, on CUDA, our kernels (`kernels/*.cu`, compiled to PTX
//! by `build.rs` with the `cuda` feature), cuDNN convolutions and CUDA graphs.
//!
//! The models in [`crate::models`] call [`Conv2d`], [`GroupNorm`], [`attention`] and the
//! [`fused`] epilogues and know nothing of what runs them. Every `SDCROSSFRAME_*` switch is
//! read once, in [`switches`].

mod attention;
pub mod channels_last;
pub mod conv;
#[cfg_attr(not(feature = "cudnn"), allow(dead_code))]
mod conv_plans;
pub mod flash_attention;
pub mod fused;
pub mod group_norm;
pub mod im2col;
pub mod offload;
pub mod step_graphs;
mod storage;
pub mod subpixel;
pub mod switches;
pub mod vae_stream;

pub use attention::{CHUNK_SCORES as ATTENTION_CHUNK_SCORES, attention, in_query_chunks, unfused_attention};
pub use conv::Conv2d;
pub use group_norm::GroupNorm;
pub use storage::held_bytes;

/// Largest absolute difference of two tensors, compared in f32 (unit tests).
#[cfg(test)]
pub(crate) fn max_abs_diff(a: &candle_core::Tensor, b: &candle_core::Tensor) -> f32 {
    use candle_core::DType;
    let d = (a.to_dtype(DType::F32).unwrap() - b.to_dtype(DType::F32).unwrap()).unwrap();
    d.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}
