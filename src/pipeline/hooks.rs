//! The two ways a caller takes part in a frame's computation: a [`FrameHook`] supplies the
//! UNet's self-attention hook for each step (the cross-frame state is one), a
//! [`StageObserver`] sees each stage end (the benchmark times stages with it).

use anyhow::Result;

use super::settings::FramePlan;
use crate::models::attention::{NoHook, SelfAttentionHook};
use crate::ops::step_graphs::GraphWatch;

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
    /// What the step's graph bakes in besides its inputs and the key (the cross-frame store's
    /// buffers): once an owner is gone the graph is dropped, since its key never comes back.
    /// Empty (the default): the graph stays as long as the step graphs keep it.
    fn graph_owners(&self) -> Vec<GraphWatch> {
        Vec::new()
    }
    /// Called at the start of every UNet + ControlNet call, inside a CUDA graph capture when
    /// the call is captured (unlike `begin_step`): device work queued here is part of the
    /// graph, so it runs again on every replay. The cross-frame store's host location queues
    /// its entries' uploads here, beside the ControlNet and the UNet's first blocks.
    fn begin_models(&mut self) -> Result<()> {
        Ok(())
    }
    /// Called at the end of every UNet + ControlNet call, as `begin_models` (also when the
    /// call failed): the call's device work must not leave anything unjoined behind it.
    fn end_models(&mut self) -> Result<()> {
        Ok(())
    }
    /// Called after the frame's last step.
    fn end_frame(&mut self) -> Result<()> {
        Ok(())
    }
    /// Called before a UNet call that denoises several frames at once (a stream batch), in
    /// place of `begin_step`: the call's batch is the rows' batches one after the other. Each
    /// frame went through `begin_frame` when it entered, in order. The default refuses: a
    /// hook with per-frame state must say how it splits a batch.
    fn begin_rows(&mut self, _rows: &[StepRow]) -> Result<()> {
        anyhow::bail!("this frame hook cannot denoise several frames in one UNet call")
    }
    /// Called after the UNet call `begin_rows` announced.
    fn end_rows(&mut self) -> Result<()> {
        Ok(())
    }
}

/// One frame's part of a stream-batched UNet call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepRow {
    /// The denoising step the frame is at (its index in the frame plan's timesteps).
    pub step: usize,
    pub timestep: usize,
    /// Rows of the UNet batch the frame takes (2 where the step runs the guidance batch).
    pub batch: usize,
    /// Whether the frame is a cross-frame anchor (decided when it entered).
    pub anchor: bool,
}

/// Plain per-frame img2img: no cross-frame state.
#[derive(Debug, Default)]
pub struct PlainFrame(NoHook);

impl FrameHook for PlainFrame {
    fn graph_key(&self) -> Option<u64> {
        Some(0)
    }

    fn begin_rows(&mut self, _rows: &[StepRow]) -> Result<()> {
        Ok(())
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
