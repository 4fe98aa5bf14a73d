//! The two ways a caller takes part in a frame's computation: a [`FrameHook`] supplies the
//! UNet's self-attention hook for each step (the cross-frame state is one), a
//! [`StageObserver`] sees each stage end (the benchmark times stages with it).

use anyhow::Result;

use super::settings::FramePlan;
use crate::models::attention::{NoHook, SelfAttentionHook};

/// Follows one frame's denoising loop and supplies the UNet's self-attention hook.
pub trait FrameHook {
    /// Called once per frame, before the first step.
    fn begin_frame(&mut self, _plan: &FramePlan) -> Result<()> {
        Ok(())
    }
    /// Called before the UNet call of denoising step `index` (at `timestep`).
    fn begin_step(&mut self, _index: usize, _timestep: usize) -> Result<()> {
        Ok(())
    }
    /// The hook the UNet calls at each self-attention during the current step.
    fn attention_hook(&mut self) -> &mut dyn SelfAttentionHook;
    /// Called after `begin_step`: `Some(key)` when the current step may be captured in a CUDA
    /// graph and later replayed without calling the hook, because all the hook does at this
    /// step is device work on buffers that stay where they are, the same for every step with
    /// this key. `None` (the default) keeps the step eager.
    fn graph_key(&self) -> Option<u64> {
        None
    }
    /// Called after the frame's last step.
    fn end_frame(&mut self) -> Result<()> {
        Ok(())
    }
}

/// Plain per-frame img2img: no cross-frame state.
#[derive(Debug, Default)]
pub struct PlainFrame(NoHook);

impl FrameHook for PlainFrame {
    fn graph_key(&self) -> Option<u64> {
        Some(0)
    }

    fn attention_hook(&mut self) -> &mut dyn SelfAttentionHook {
        &mut self.0
    }
}

/// A point in one frame's computation, reported to a [`StageObserver`] when it is done.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// VAE encode, noising to the first timestep, and the control image's embedding.
    Encoded,
    /// Denoising step `index` (UNet + ControlNet, guidance, scheduler).
    Step(usize),
    /// VAE decode.
    Decoded,
}

/// Sees each stage of a frame end.
pub trait StageObserver {
    fn stage_done(&mut self, stage: Stage) -> Result<()>;
}

impl StageObserver for () {
    fn stage_done(&mut self, _stage: Stage) -> Result<()> {
        Ok(())
    }
}
