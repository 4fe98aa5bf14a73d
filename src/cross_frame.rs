//! Cross-frame attention: the rolling state that keeps video frames coherent.
//!
//! The first frame ("anchor") runs plain attention and records, for every patched
//! self-attention layer and every denoising step, its keys and values. Each later frame keeps
//! its own queries but attends to the anchor's and/or the previous frame's keys and values for
//! the same layer and step, then becomes the new "previous".
//!
//! Unlike the original pipeline, entries are keyed by the step's index in the frame's actual
//! schedule and the schedule itself is checked: a frame whose schedule differs from the stored
//! one (steps or strength changed) re-anchors instead of reading mismatched entries.
//!
//! The store holds the attention inputs (the output of `norm1`), and a later frame projects
//! the anchor's and the previous frame's inputs with the layer's `to_k`/`to_v`. Storing the
//! projected keys and values instead gives identical results (`to_k`/`to_v` have no bias) but
//! holds twice the memory, to save a projection that is a small part of a step's work.
//!
//! Entries are buffers written in place: the anchor copies its inputs into them, a later frame
//! overwrites "previous" after reading it. Buffers keep their device addresses while the frame
//! plan stays, so a step that reads and writes them can be captured once as a CUDA graph and
//! replayed for every later frame (`FrameHook::graph_key`); a new anchor with the same plan
//! (scene cut, anchor interval) writes into the same buffers.

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;

use anyhow::{Result, bail};
use candle_core::Tensor;

use crate::models::attention::SelfAttentionHook;
use crate::pipeline::{FrameHook, FramePlan, StepRow};

/// Which frames' keys and values a frame attends to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AttentionMode {
    /// Plain per-frame img2img.
    Off,
    /// The anchor frame only.
    First,
    /// The previous frame only.
    Prev,
    /// The anchor and the previous frame (the original technique).
    #[default]
    FirstPrev,
}

/// Which self-attention layers are patched.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AttentionScope {
    /// Self-attention of the up blocks (the original).
    #[default]
    Up,
    /// Down, mid and up blocks.
    All,
}

impl AttentionScope {
    pub fn covers(self, layer: &str) -> bool {
        match self {
            Self::Up => layer.starts_with("up_blocks."),
            Self::All => true,
        }
    }
}

impl FromStr for AttentionMode {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "off" => Self::Off,
            "first" => Self::First,
            "prev" => Self::Prev,
            "first+prev" => Self::FirstPrev,
            other => bail!("unknown attention mode {other:?}: expected off, first, prev or first+prev"),
        })
    }
}

impl fmt::Display for AttentionMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Off => "off",
            Self::First => "first",
            Self::Prev => "prev",
            Self::FirstPrev => "first+prev",
        })
    }
}

impl FromStr for AttentionScope {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "up" => Self::Up,
            "all" => Self::All,
            other => bail!("unknown attention scope {other:?}: expected up or all"),
        })
    }
}

impl fmt::Display for AttentionScope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Up => "up",
            Self::All => "all",
        })
    }
}

/// The anchor's and the previous frame's attention inputs of one layer at one step,
/// `(batch, tokens, channels)` each (on the anchor frame both hold the anchor's), in buffers of
/// their own.
struct Entry {
    first: Tensor,
    prev: Tensor,
}

impl Entry {
    /// A new entry holding `hidden` as both: buffers of exactly its shape. `hidden` is usually
    /// one frame's rows of a batched call (a `narrow`), whose storage is the whole call's:
    /// `Tensor::copy` would clone all of it (every row of a 16-row cross-stream call, kept for
    /// the store's life), so each buffer is a compact copy.
    fn new(hidden: &Tensor) -> candle_core::Result<Self> {
        Ok(Self { first: hidden.force_contiguous()?, prev: hidden.force_contiguous()? })
    }

    fn bytes(&self) -> usize {
        (self.first.elem_count() + self.prev.elem_count()) * self.first.dtype().size_in_bytes()
    }

    fn held_bytes(&self) -> usize {
        crate::ops::held_bytes(&self.first) + crate::ops::held_bytes(&self.prev)
    }
}

fn next_generation() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// Whether the current frame records a new anchor or reads the stored frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Anchor,
    Follower,
}

/// The rolling cross-frame attention state; implements the pipeline's `FrameHook`.
pub struct CrossFrameAttention {
    mode: AttentionMode,
    scope: AttentionScope,
    /// The plan the stored entries were made with; `None` when nothing is stored.
    anchored_plan: Option<FramePlan>,
    /// `store[step][layer]`.
    store: Vec<HashMap<String, Entry>>,
    role: Role,
    step: Option<usize>,
    /// The frames of the stream-batched UNet call in progress, in batch order (see
    /// [`FrameHook::begin_rows`]); empty outside one.
    rows: Vec<StepRow>,
    anchor_requested: bool,
    frames_since_anchor: usize,
    /// Names the store's current buffers; a fresh number (unique in the process) whenever they
    /// are dropped, so graphs captured on old buffers, or on another instance's, never match.
    generation: u64,
}

impl CrossFrameAttention {
    pub fn new(mode: AttentionMode, scope: AttentionScope) -> Self {
        Self {
            mode,
            scope,
            anchored_plan: None,
            store: Vec::new(),
            role: Role::Anchor,
            step: None,
            rows: Vec::new(),
            anchor_requested: false,
            frames_since_anchor: 0,
            generation: next_generation(),
        }
    }

    pub fn mode(&self) -> AttentionMode {
        self.mode
    }

    pub fn scope(&self) -> AttentionScope {
        self.scope
    }

    /// Changes mode or scope; the next frame re-anchors when the scope changes
    /// (its layers would have no entries) or when attention was off.
    pub fn configure(&mut self, mode: AttentionMode, scope: AttentionScope) {
        if scope != self.scope || (self.mode == AttentionMode::Off && mode != AttentionMode::Off) {
            self.reset();
        }
        self.mode = mode;
        self.scope = scope;
    }

    /// Drops every stored entry: the next frame becomes the anchor.
    pub fn reset(&mut self) {
        self.store.clear();
        self.anchored_plan = None;
        self.frames_since_anchor = 0;
        self.generation = next_generation();
    }

    /// The next frame becomes the new anchor (scene cut, anchor interval).
    pub fn request_anchor(&mut self) {
        self.anchor_requested = true;
    }

    /// True while the current (or, between frames, the last) frame is an anchor.
    pub fn current_frame_is_anchor(&self) -> bool {
        self.role == Role::Anchor
    }

    /// Frames processed since the last anchor (0 right after an anchor frame).
    pub fn frames_since_anchor(&self) -> usize {
        self.frames_since_anchor
    }

    /// Number of stored (layer, step) entries.
    pub fn stored_entries(&self) -> usize {
        self.store.iter().map(HashMap::len).sum()
    }

    /// Bytes held by the store (attention inputs of the anchor and the previous frame).
    pub fn stored_bytes(&self) -> usize {
        self.store.iter().flat_map(|layers| layers.values()).map(Entry::bytes).sum()
    }

    /// Bytes of device (or host) memory the store's buffers keep allocated: equal to
    /// [`Self::stored_bytes`] unless a buffer shares a larger storage (memory accounting).
    pub fn held_bytes(&self) -> usize {
        self.store.iter().flat_map(|layers| layers.values()).map(Entry::held_bytes).sum()
    }
}

impl FrameHook for CrossFrameAttention {
    fn begin_frame(&mut self, plan: &FramePlan) -> Result<()> {
        self.step = None;
        if self.mode == AttentionMode::Off {
            self.role = Role::Anchor;
            return Ok(());
        }
        let same_plan = self.anchored_plan.as_ref() == Some(plan);
        if self.anchored_plan.is_some() && !same_plan && !self.anchor_requested {
            tracing::info!(
                old = ?self.anchored_plan, new = ?plan,
                "frame schedule or size changed: re-anchoring cross-frame attention"
            );
        }
        if self.anchor_requested || !same_plan {
            if !same_plan {
                // Buffers of another size or schedule: drop them. A new anchor on the same plan
                // overwrites them in place instead.
                self.store.clear();
                self.store.resize_with(plan.timesteps.len(), HashMap::new);
                self.generation = next_generation();
            }
            self.anchored_plan = Some(plan.clone());
            self.anchor_requested = false;
            self.frames_since_anchor = 0;
            self.role = Role::Anchor;
        } else {
            self.frames_since_anchor += 1;
            self.role = Role::Follower;
        }
        Ok(())
    }

    fn begin_step(&mut self, index: usize, timestep: usize) -> Result<()> {
        if self.mode != AttentionMode::Off {
            let plan = self.anchored_plan.as_ref().expect("begin_frame stores the plan");
            match plan.timesteps.get(index) {
                Some(&t) if t == timestep => {}
                other => bail!(
                    "cross-frame attention: step {index} runs timestep {timestep} but the stored schedule has {other:?}"
                ),
            }
        }
        self.step = Some(index);
        Ok(())
    }

    fn attention_hook(&mut self) -> &mut dyn SelfAttentionHook {
        self
    }

    /// At a step whose entries exist, everything the hook does is device work on the entries'
    /// buffers (copies in, reads), the same on every frame of a role: replayable. An anchor
    /// that still has to allocate its entries is not.
    fn graph_key(&self) -> Option<u64> {
        if !self.rows.is_empty() {
            return self.rows_graph_key();
        }
        let role = match (self.mode, self.role) {
            (AttentionMode::Off, _) => return Some(0),
            (_, Role::Follower) => 1,
            (_, Role::Anchor) => {
                let step = self.step?;
                if self.store.get(step).is_none_or(HashMap::is_empty) {
                    return None;
                }
                2
            }
        };
        let mode = self.mode as u64;
        let scope = self.scope as u64;
        Some((self.generation << 8) | (mode << 4) | (scope << 2) | role)
    }

    fn end_frame(&mut self) -> Result<()> {
        self.step = None;
        Ok(())
    }

    /// Each frame of a stream batch reads and writes the entries of its own step, and no two
    /// frames of a call are at the same step: step k's entries see the frames in their order
    /// (frame f at call f + k), as in the sequential session.
    fn begin_rows(&mut self, rows: &[StepRow]) -> Result<()> {
        if self.mode != AttentionMode::Off {
            let plan = self.anchored_plan.as_ref().expect("begin_frame stores the plan");
            for (i, row) in rows.iter().enumerate() {
                match plan.timesteps.get(row.step) {
                    Some(&t) if t == row.timestep => {}
                    other => bail!(
                        "cross-frame attention: a frame at step {} runs timestep {} but the stored schedule has {other:?}",
                        row.step,
                        row.timestep
                    ),
                }
                if rows[..i].iter().any(|r| r.step == row.step) {
                    bail!("cross-frame attention: two frames of one stream batch are at step {}", row.step);
                }
                if plan.batches.get(row.step) != Some(&row.batch) {
                    bail!(
                        "cross-frame attention: a frame at step {} has batch {}, its plan {:?}",
                        row.step,
                        row.batch,
                        plan.batches
                    );
                }
            }
        }
        self.rows = rows.to_vec();
        self.step = None;
        Ok(())
    }

    fn end_rows(&mut self) -> Result<()> {
        self.rows.clear();
        Ok(())
    }
}

impl CrossFrameAttention {
    /// A stream batch's call is replayable once every anchor in it has its entries (all the
    /// hook does then is device work on the entries' buffers); its key names the frames'
    /// steps and roles.
    fn rows_graph_key(&self) -> Option<u64> {
        if self.mode == AttentionMode::Off {
            return Some(0);
        }
        let mut roles = 0u64;
        for (i, row) in self.rows.iter().enumerate() {
            if row.anchor {
                if self.store.get(row.step).is_none_or(HashMap::is_empty) {
                    return None;
                }
                roles |= 1 << i;
            }
        }
        let mode = self.mode as u64;
        let scope = self.scope as u64;
        Some((self.generation << 24) | (roles << 8) | (mode << 4) | (scope << 2) | 3)
    }

    /// Self-attention of a stream-batched call: each frame's rows attend to the entries of its
    /// own step, as the frame alone would (an anchor records them and attends to itself).
    fn rows_self_attention(
        &mut self,
        layer: &str,
        hidden: &Tensor,
        project: &dyn Fn(&Tensor) -> candle_core::Result<(Tensor, Tensor)>,
    ) -> candle_core::Result<Option<(Tensor, Tensor)>> {
        let batch = hidden.dim(0)?;
        streams_self_attention(&mut [self], &[batch], layer, hidden, project)
    }

    /// What the rows of the call in progress attend to at `layer` (`hidden`: their attention
    /// inputs): their own inputs (plain attention), or per frame the stored inputs to project
    /// into keys and values (`(rows, tokens, channels)` each; an anchor records its inputs
    /// first and attends to them). [`Self::rows_written`] must follow once they are projected.
    fn rows_contexts(&mut self, layer: &str, hidden: &Tensor) -> candle_core::Result<RowsContext> {
        if self.mode == AttentionMode::Off || !self.scope.covers(layer) {
            return Ok(RowsContext::Own);
        }
        if self.rows.iter().all(|r| r.anchor) {
            // Plain attention for every frame; record the anchors' inputs.
            let mut offset = 0;
            for row in &self.rows {
                let part = hidden.narrow(0, offset, row.batch)?;
                offset += row.batch;
                record_anchor(&mut self.store[row.step], layer, &part)?;
            }
            return Ok(RowsContext::Own);
        }
        let mut contexts = Vec::with_capacity(self.rows.len());
        let mut offset = 0;
        for row in &self.rows {
            let part = hidden.narrow(0, offset, row.batch)?;
            offset += row.batch;
            let layers = &mut self.store[row.step];
            let context = if row.anchor {
                record_anchor(layers, layer, &part)?;
                // The anchor's own inputs: as first and as prev they are one set of keys twice,
                // which attention weighs exactly as the set once.
                match self.mode {
                    AttentionMode::FirstPrev => Tensor::cat(&[&part, &part], 1)?,
                    _ => part,
                }
            } else {
                let Some(entry) = layers.get(layer) else {
                    candle_core::bail!("cross-frame attention: no stored entry for {layer} at step {}", row.step);
                };
                if entry.first.dims() != part.dims() {
                    candle_core::bail!(
                        "cross-frame attention: {layer} step {} has shape {:?}, the stored entry {:?}",
                        row.step,
                        part.dims(),
                        entry.first.dims()
                    );
                }
                match self.mode {
                    AttentionMode::First => entry.first.clone(),
                    AttentionMode::Prev => entry.prev.clone(),
                    AttentionMode::FirstPrev => Tensor::cat(&[&entry.first, &entry.prev], 1)?,
                    AttentionMode::Off => unreachable!("checked above"),
                }
            };
            contexts.push(context);
        }
        Ok(RowsContext::Stored(contexts))
    }

    /// After the contexts of [`Self::rows_contexts`] were projected: each follower's inputs
    /// become the new "previous" (read before it is overwritten, as in stream order).
    fn rows_written(&mut self, layer: &str, hidden: &Tensor) -> candle_core::Result<()> {
        if self.mode == AttentionMode::Off || !self.scope.covers(layer) {
            return Ok(());
        }
        let mut offset = 0;
        for row in &self.rows {
            let part = hidden.narrow(0, offset, row.batch)?;
            offset += row.batch;
            if !row.anchor
                && let Some(entry) = self.store.get(row.step).and_then(|layers| layers.get(layer))
            {
                entry.prev.slice_set(&part.contiguous()?, 0, 0)?;
            }
        }
        Ok(())
    }
}

/// What one stream's rows attend to at a layer of a batched call.
enum RowsContext {
    /// Their own inputs (plain attention).
    Own,
    /// Per frame, the stored inputs to project into keys and values.
    Stored(Vec<Tensor>),
}

/// Several streams' cross-frame states in one UNet call (cross-stream batching): the call's
/// frames are each stream's frames one after the other, and every stream sees only its own
/// rows ([`FrameHook::begin_rows`]), reads and writes only its own store, exactly as in a call
/// of its own. At a layer where some stream attends to stored inputs and another attends to
/// itself (an anchor, attention off, a layer outside its scope), the latter's rows project
/// their own inputs; key sets of different lengths (first+prev holds twice the tokens of
/// first, prev or plain) are brought to one length by repeating the shorter ones, which
/// attention weighs exactly as the set once.
pub struct StreamsAttention<'a> {
    streams: Vec<&'a mut CrossFrameAttention>,
    /// Frames each stream has in the call, in stream order.
    frames: Vec<usize>,
    /// UNet rows each stream has in the call in progress.
    batches: Vec<usize>,
}

impl<'a> StreamsAttention<'a> {
    /// `streams[i]` has `frames[i]` frames in the call, in this order.
    pub fn new(streams: Vec<&'a mut CrossFrameAttention>, frames: Vec<usize>) -> Result<Self> {
        if streams.len() != frames.len() {
            bail!("{} streams with {} frame counts", streams.len(), frames.len());
        }
        Ok(Self { streams, frames, batches: Vec::new() })
    }
}

impl FrameHook for StreamsAttention<'_> {
    fn begin_rows(&mut self, rows: &[StepRow]) -> Result<()> {
        let total: usize = self.frames.iter().sum();
        if rows.len() != total {
            bail!("a cross-stream call of {} frames announced for streams holding {total}", rows.len());
        }
        self.batches.clear();
        let mut start = 0;
        for (stream, &count) in self.streams.iter_mut().zip(&self.frames) {
            let own = &rows[start..start + count];
            start += count;
            stream.begin_rows(own)?;
            self.batches.push(own.iter().map(|r| r.batch).sum());
        }
        Ok(())
    }

    fn end_rows(&mut self) -> Result<()> {
        self.batches.clear();
        self.streams.iter_mut().try_for_each(|stream| stream.end_rows())
    }

    fn attention_hook(&mut self) -> &mut dyn SelfAttentionHook {
        self
    }

    /// Replayable when every stream's part is; the key names every stream's key and its
    /// share of the call.
    fn graph_key(&self) -> Option<u64> {
        use std::hash::{Hash, Hasher};
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        for (stream, &count) in self.streams.iter().zip(&self.frames) {
            (stream.graph_key()?, count).hash(&mut hasher);
        }
        Some(hasher.finish())
    }
}

impl SelfAttentionHook for StreamsAttention<'_> {
    fn self_attention(
        &mut self,
        layer: &str,
        hidden: &Tensor,
        project: &dyn Fn(&Tensor) -> candle_core::Result<(Tensor, Tensor)>,
    ) -> candle_core::Result<Option<(Tensor, Tensor)>> {
        streams_self_attention(&mut self.streams, &self.batches, layer, hidden, project)
    }
}

/// Self-attention at `layer` of a call whose rows are, one after the other, `batches[i]` rows
/// of `streams[i]` (a stream batch's frames, or several streams' calls): each stream's rows
/// attend to what [`CrossFrameAttention::rows_contexts`] gives them, then its inputs are
/// written back. `None` when every row attends to itself (plain attention). Key sets of
/// different lengths (first+prev holds twice the tokens of first, prev or plain) are brought to
/// one length by repeating the shorter ones, which attention weighs exactly as the set once.
fn streams_self_attention(
    streams: &mut [&mut CrossFrameAttention],
    batches: &[usize],
    layer: &str,
    hidden: &Tensor,
    project: &dyn Fn(&Tensor) -> candle_core::Result<(Tensor, Tensor)>,
) -> candle_core::Result<Option<(Tensor, Tensor)>> {
    let mut parts = Vec::with_capacity(streams.len());
    let mut offset = 0;
    for (stream, &batch) in streams.iter_mut().zip(batches) {
        let part = hidden.narrow(0, offset, batch)?;
        offset += batch;
        let context = stream.rows_contexts(layer, &part)?;
        parts.push((part, context));
    }
    if parts.iter().all(|(_, context)| matches!(context, RowsContext::Own)) {
        return Ok(None);
    }
    let mut contexts = Vec::new();
    for (part, context) in &parts {
        match context {
            RowsContext::Own => contexts.push(part.clone()),
            RowsContext::Stored(stored) => contexts.extend(stored.iter().cloned()),
        }
    }
    let tokens = contexts.iter().map(|c| c.dim(1)).collect::<candle_core::Result<Vec<_>>>()?;
    let longest = tokens.iter().copied().max().unwrap_or(0);
    let mut padded = Vec::with_capacity(contexts.len());
    for (context, tokens) in contexts.iter().zip(tokens) {
        if longest % tokens != 0 {
            candle_core::bail!(
                "cross-stream attention at {layer}: key sets of {tokens} and {longest} tokens cannot be lined up"
            );
        }
        padded.push(if tokens == longest { context.clone() } else { context.repeat((1, longest / tokens, 1))? });
    }
    let (keys, values) = project(&Tensor::cat(&padded, 0)?)?;
    for ((part, _), stream) in parts.iter().zip(streams.iter_mut()) {
        stream.rows_written(layer, part)?;
    }
    Ok(Some((keys, values)))
}

/// An anchor's attention input becomes both the first and the previous frame's entry.
fn record_anchor(layers: &mut HashMap<String, Entry>, layer: &str, hidden: &Tensor) -> candle_core::Result<()> {
    match layers.get(layer) {
        Some(entry) if entry.first.dims() == hidden.dims() && entry.first.dtype() == hidden.dtype() => {
            let hidden = hidden.contiguous()?;
            entry.first.slice_set(&hidden, 0, 0)?;
            entry.prev.slice_set(&hidden, 0, 0)?;
        }
        _ => {
            layers.insert(layer.to_string(), Entry::new(hidden)?);
        }
    }
    Ok(())
}

impl SelfAttentionHook for CrossFrameAttention {
    fn self_attention(
        &mut self,
        layer: &str,
        hidden: &Tensor,
        project: &dyn Fn(&Tensor) -> candle_core::Result<(Tensor, Tensor)>,
    ) -> candle_core::Result<Option<(Tensor, Tensor)>> {
        if self.mode == AttentionMode::Off || !self.scope.covers(layer) {
            return Ok(None);
        }
        if !self.rows.is_empty() {
            return self.rows_self_attention(layer, hidden, project);
        }
        let Some(step) = self.step else {
            candle_core::bail!("cross-frame attention called outside a denoising step (layer {layer})");
        };
        let layers = &mut self.store[step];
        match self.role {
            Role::Anchor => {
                record_anchor(layers, layer, hidden)?;
                Ok(None)
            }
            Role::Follower => {
                let Some(entry) = layers.get_mut(layer) else {
                    candle_core::bail!("cross-frame attention: no stored entry for {layer} at step {step}");
                };
                if entry.first.dims() != hidden.dims() {
                    candle_core::bail!(
                        "cross-frame attention: {layer} step {step} has shape {:?}, the stored entry {:?}",
                        hidden.dims(),
                        entry.first.dims()
                    );
                }
                let context = match self.mode {
                    AttentionMode::First => entry.first.clone(),
                    AttentionMode::Prev => entry.prev.clone(),
                    AttentionMode::FirstPrev => Tensor::cat(&[&entry.first, &entry.prev], 1)?,
                    AttentionMode::Off => unreachable!("handled above"),
                };
                let (keys, values) = project(&context)?;
                // After the projection in stream order, so "previous" is read before it is
                // overwritten (for `Prev` the context is the buffer itself).
                entry.prev.slice_set(&hidden.contiguous()?, 0, 0)?;
                Ok(Some((keys, values)))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn plan(steps: usize) -> FramePlan {
        FramePlan {
            scheduler: crate::scheduler::SchedulerKind::Ddim,
            timesteps: (0..steps).map(|i| 900 - 100 * i).collect(),
            width: 64,
            height: 64,
            batches: vec![2; steps],
        }
    }

    /// Runs one frame through the hook: every step calls the one up-block layer with `value`.
    fn frame(hook: &mut CrossFrameAttention, plan: &FramePlan, value: f32) -> Vec<Option<u64>> {
        let project = |h: &Tensor| Ok((h.clone(), h.clone()));
        let hidden = Tensor::full(value, (2, 4, 8), &Device::Cpu).unwrap();
        hook.begin_frame(plan).unwrap();
        let keys = plan
            .timesteps
            .iter()
            .enumerate()
            .map(|(i, &t)| {
                hook.begin_step(i, t).unwrap();
                let key = hook.graph_key();
                hook.self_attention("up_blocks.1.attentions.0.transformer_blocks.0.attn1", &hidden, &project).unwrap();
                key
            })
            .collect();
        hook.end_frame().unwrap();
        keys
    }

    #[test]
    fn graph_keys_follow_the_stores_buffers() {
        let plan = plan(3);
        let mut hook = CrossFrameAttention::new(AttentionMode::FirstPrev, AttentionScope::Up);
        // The first anchor allocates its entries: not replayable.
        assert_eq!(frame(&mut hook, &plan, 1.0), vec![None; 3]);
        let follower = frame(&mut hook, &plan, 2.0);
        assert!(follower.iter().all(Option::is_some));
        assert_eq!(frame(&mut hook, &plan, 3.0), follower, "followers share keys");
        // A new anchor on the same plan writes into the same buffers: replayable, own key.
        hook.request_anchor();
        let anchor = frame(&mut hook, &plan, 4.0);
        assert!(anchor.iter().all(Option::is_some) && anchor != follower);
        let entry = &hook.store[0]["up_blocks.1.attentions.0.transformer_blocks.0.attn1"];
        let values = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!(values(&entry.first).iter().chain(&values(&entry.prev)).all(|&v| v == 4.0));
        assert_eq!(frame(&mut hook, &plan, 5.0), follower, "same buffers, same follower keys");
        // Another instance, or new buffers after a reset, never reuse these keys.
        let mut other = CrossFrameAttention::new(AttentionMode::FirstPrev, AttentionScope::Up);
        frame(&mut other, &plan, 1.0);
        assert_ne!(frame(&mut other, &plan, 2.0), follower);
        hook.reset();
        frame(&mut hook, &plan, 1.0);
        assert_ne!(frame(&mut hook, &plan, 2.0), follower);
    }

    #[test]
    fn followers_overwrite_previous_in_place_after_reading_it() {
        let plan = plan(1);
        let layer = "up_blocks.1.attentions.0.transformer_blocks.0.attn1";
        let mut hook = CrossFrameAttention::new(AttentionMode::Prev, AttentionScope::Up);
        frame(&mut hook, &plan, 1.0);
        let seen = std::cell::RefCell::new(Vec::new());
        let project = |h: &Tensor| {
            seen.borrow_mut().push(h.flatten_all()?.to_vec1::<f32>()?[0]);
            Ok((h.clone(), h.clone()))
        };
        for value in [2.0f32, 3.0] {
            hook.begin_frame(&plan).unwrap();
            hook.begin_step(0, plan.timesteps[0]).unwrap();
            let hidden = Tensor::full(value, (2, 4, 8), &Device::Cpu).unwrap();
            hook.self_attention(layer, &hidden, &project).unwrap();
            hook.end_frame().unwrap();
        }
        assert_eq!(*seen.borrow(), vec![1.0, 2.0], "each frame reads the frame before it");
    }
}
