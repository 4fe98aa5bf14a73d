//! The per-frame pipeline: ControlNet img2img as diffusers computes it ([`Img2Img`]), the
//! loaded models around it ([`Stylizer`], shared through the [`registry`]), the VAE of either kind ([`Vae`]), and what a frame
//! is computed with: its settings, hooks, noise, processing size and cancellation.

pub mod batcher;
mod cancel;
mod guidance;
mod hooks;
mod img2img;
mod loader;
pub mod lora;
mod noise;
pub mod registry;
mod settings;
mod size;
mod stylizer;
mod vae;

pub use batcher::{
    BatchTimeout, BatcherStats, DEFAULT_MAX_CALL_PIXELS, FramePace, Membership, StepReply, StepRequest, StreamBatcher,
};
pub use cancel::{CancelHandle, Cancelled};
pub use guidance::{Guidance, RESIDUAL_DELTA};
pub use hooks::{FrameHook, PlainFrame, Stage, StageObserver, StepRow};
pub use img2img::{Call, DenoisingFrame, FrameInputs, Img2Img, StepInputs};
pub use loader::{Component, ModelParts, ModelSpec, load_vae};
pub use lora::LoraSpec;
pub use noise::{FrameNoise, load_frame_noise, load_noise_file, seeded_noise, seeded_noise_rows, uniform_draw};
pub use settings::{FramePlan, FrameSettings, GuidanceMode, MAX_STEPS, check_finite};
pub use size::{DEFAULT_SHORT_SIDE, SizeRequest};
pub use stylizer::{SharedModels, Stylizer};
pub use vae::{VAE_CLASSES, Vae, VaeConfig};
