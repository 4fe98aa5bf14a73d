//! sdcrossframe engine: Stable Diffusion 1.5 + Canny ControlNet img2img in candle,
//! with cross-frame attention for temporally coherent video restyling.
//!
//! No GStreamer types live here; the element in `plugins/` is a thin layer over this crate.

pub mod canny;
pub mod cross_frame;
pub mod device;
pub mod frame;
pub mod gpu_memory;
pub mod models;
pub mod ops;
pub mod parallel;
pub mod pipeline;
pub mod resample;
pub mod scheduler;
pub mod session;
pub mod single_file;
pub mod tokenizer;
pub mod weights;
