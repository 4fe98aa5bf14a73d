//! The per-frame pipeline: ControlNet img2img as diffusers computes it ([`Img2Img`]), the
//! loaded models around it ([`Stylizer`]), the VAE of either kind ([`Vae`]), and what a frame
//! is computed with: its settings, hooks, noise, processing size and cancellation.

mod cancel;
mod hooks;
mod img2img;
mod loader;
pub mod lora;
mod noise;
mod settings;
mod size;
mod stylizer;
mod vae;

pub use cancel::{CancelHandle, Cancelled};
pub use hooks::{FrameHook, PlainFrame, Stage, StageObserver};
pub use img2img::{FrameInputs, Img2Img};
pub use loader::{Component, ModelParts, ModelSpec, load_vae};
pub use lora::LoraSpec;
pub use noise::{load_noise_file, seeded_noise};
pub use settings::{FramePlan, FrameSettings};
pub use size::{DEFAULT_SHORT_SIDE, SizeRequest};
pub use stylizer::Stylizer;
pub use vae::{VAE_CLASSES, Vae, VaeConfig};
