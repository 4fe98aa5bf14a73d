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
//!
//! Where the entries live ([`StoreLocation`]): on the device, or in page-locked host memory
//! with only the entries of the call in progress on the device ("staging" buffers, one set per
//! frame of the call). On the host, each UNet call uploads its frames' entries at its start
//! (they are first read in the up blocks, after the ControlNet and the down and mid blocks
//! have run beside the copies) and downloads each new "previous" as soon as a layer has
//! written it; a graph captures the copies with the kernels. The values are the same either
//! way; the host location trades copies for device memory (see `ops::offload`).

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;

use anyhow::{Result, bail};
use candle_core::Tensor;

use crate::models::attention::SelfAttentionHook;
use crate::ops::offload::{CopyStream, HostArena, HostTensor};
use crate::ops::step_graphs::{GraphOwner, GraphWatch};
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

/// Where the cross-frame store keeps its entries between the calls that use them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StoreLocation {
    /// Device memory: no copies (at SD1.5 512x512 with 18 steps and the guidance batch, 0.92 GiB
    /// per stream).
    #[default]
    Device,
    /// Page-locked host memory; the device holds only the entries of the call in progress.
    Host,
}

impl FromStr for StoreLocation {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "device" => Self::Device,
            "host" => Self::Host,
            other => bail!("unknown cross-frame store location {other:?}: expected device or host"),
        })
    }
}

impl fmt::Display for StoreLocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Device => "device",
            Self::Host => "host",
        })
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

/// An entry kept in host memory (the host location).
struct HostEntry {
    first: HostTensor,
    prev: HostTensor,
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
    /// Gone with the generation: the step graphs drop that generation's graphs.
    graph_owner: GraphOwner,
    location: StoreLocation,
    /// Host location: the copies' own stream (declared before the buffers it copies, so it is
    /// dropped, which waits for its copies, before they are).
    copies: CopyStream,
    /// Host location: `host[step][layer]`, every entry between the calls that use it.
    host: Vec<HashMap<String, HostEntry>>,
    /// Host location: the device buffers of the call in progress, `staging[(slot, rows)][layer]`
    /// where `slot` is a frame's place in the call and `rows` its step's batch (residual
    /// guidance runs 2 rows at the first step and 1 after); `store` stays empty.
    staging: HashMap<(usize, usize), HashMap<String, Entry>>,
    arena: HostArena,
    /// Host location: the device the staging buffers are on (known from the first anchor).
    device: Option<candle_core::Device>,
    /// Host location: uploads queued by `begin_models` that the device has not waited for yet.
    upload_pending: bool,
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
            graph_owner: GraphOwner::default(),
            location: StoreLocation::Device,
            copies: CopyStream::default(),
            host: Vec::new(),
            staging: HashMap::new(),
            arena: HostArena::default(),
            device: None,
            upload_pending: false,
        }
    }

    /// The same state keeping its entries at `location`.
    pub fn with_location(mut self, location: StoreLocation) -> Self {
        self.set_location(location);
        self
    }

    pub fn location(&self) -> StoreLocation {
        self.location
    }

    /// Moves the store to `location`; a change drops the entries (the next frame re-anchors).
    pub fn set_location(&mut self, location: StoreLocation) {
        if location != self.location {
            self.reset();
            self.location = location;
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
        self.drop_entries();
        self.anchored_plan = None;
        self.frames_since_anchor = 0;
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
        self.store.iter().map(HashMap::len).sum::<usize>() + self.host.iter().map(HashMap::len).sum::<usize>()
    }

    /// Bytes of the stored entries (attention inputs of the anchor and the previous frame), in
    /// either location.
    pub fn stored_bytes(&self) -> usize {
        let device: usize = self.store.iter().flat_map(|layers| layers.values()).map(Entry::bytes).sum();
        let host: usize =
            self.host.iter().flat_map(|layers| layers.values()).map(|e| e.first.bytes() + e.prev.bytes()).sum();
        device + host
    }

    /// Bytes of device (on the CPU: ordinary) memory the store's buffers keep allocated, the
    /// host location's staging buffers included: equal to [`Self::stored_bytes`] on the device
    /// unless a buffer shares a larger storage (memory accounting).
    pub fn held_bytes(&self) -> usize {
        self.store.iter().chain(self.staging.values()).flat_map(|layers| layers.values()).map(Entry::held_bytes).sum()
    }

    /// Drops every entry and staging buffer (their graphs with them: a new generation).
    fn drop_entries(&mut self) {
        self.store.clear();
        self.host.clear();
        self.staging.clear();
        self.arena = HostArena::default();
        self.upload_pending = false;
        self.generation = next_generation();
        self.graph_owner = GraphOwner::default();
    }

    /// Whether entries exist for `step`, in whichever location.
    fn has_entries(&self, step: usize) -> bool {
        let stored = match self.location {
            StoreLocation::Device => self.store.get(step).map(HashMap::len),
            StoreLocation::Host => self.host.get(step).map(HashMap::len),
        };
        stored.is_some_and(|n| n > 0)
    }

    /// The device entries the frame at `slot` of the call (its place in it), at `step`, reads
    /// and writes: the step's own (device location) or the slot's staging buffers (host).
    fn working(&mut self, slot: usize, step: usize) -> &mut HashMap<String, Entry> {
        match self.location {
            StoreLocation::Device => &mut self.store[step],
            StoreLocation::Host => {
                let key = self.staging_key(slot, step);
                self.staging.entry(key).or_default()
            }
        }
    }

    /// Host location: which staging buffers the frame at `slot` of the call, at `step`, uses.
    fn staging_key(&self, slot: usize, step: usize) -> (usize, usize) {
        let rows = self.anchored_plan.as_ref().and_then(|p| p.batches.get(step).copied()).unwrap_or(0);
        (slot, rows)
    }

    /// Host location: the frame at `slot` has written its entry of `layer` at `step` on the
    /// device (an anchor: both; a follower: "previous"); its copy back to the host is queued
    /// now, beside the rest of the call.
    fn written(&mut self, slot: usize, step: usize, layer: &str, anchor: bool) -> candle_core::Result<()> {
        if self.location != StoreLocation::Host {
            return Ok(());
        }
        let key = self.staging_key(slot, step);
        let Some(staged) = self.staging.get(&key).and_then(|layers| layers.get(layer)) else {
            candle_core::bail!("cross-frame attention: no staging buffer for {layer} in slot {slot}");
        };
        let device = staged.first.device().clone();
        if self.device.is_none() {
            self.device = Some(device.clone());
        }
        let layers = &mut self.host[step];
        let entry = match layers.entry(layer.to_string()) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(v) => {
                let first = self.arena.alloc_like(&staged.first).map_err(offload_error)?;
                let prev = self.arena.alloc_like(&staged.first).map_err(offload_error)?;
                v.insert(HostEntry { first, prev })
            }
        };
        self.copies.fork(&device).map_err(offload_error)?;
        if anchor {
            self.copies.download(&staged.first, &mut entry.first).map_err(offload_error)?;
            self.copies.download(&staged.first, &mut entry.prev).map_err(offload_error)?;
        } else {
            self.copies.download(&staged.prev, &mut entry.prev).map_err(offload_error)?;
        }
        Ok(())
    }

    /// Host location: the frames of the call about to run, as (slot, step) of those that read
    /// stored entries.
    fn reading_frames(&self) -> Vec<(usize, usize)> {
        if self.rows.is_empty() {
            match (self.role, self.step) {
                (Role::Follower, Some(step)) => vec![(0, step)],
                _ => Vec::new(),
            }
        } else {
            self.rows.iter().enumerate().filter(|(_, r)| !r.anchor).map(|(slot, r)| (slot, r.step)).collect()
        }
    }

    /// Host location: queues the uploads of the call's followers' entries into their staging
    /// buffers (only the entries the mode reads; "previous" is overwritten whole by the call).
    fn upload_entries(&mut self) -> Result<()> {
        let frames = self.reading_frames();
        if frames.is_empty() {
            return Ok(());
        }
        let Some(device) = self.device.clone() else { bail!("cross-frame attention: host entries without a device") };
        let (read_first, read_prev) = match self.mode {
            AttentionMode::First => (true, false),
            AttentionMode::Prev => (false, true),
            _ => (true, true),
        };
        self.copies.fork(&device)?;
        for (slot, step) in frames {
            let key = self.staging_key(slot, step);
            let staging = self.staging.entry(key).or_default();
            let Some(layers) = self.host.get(step) else {
                bail!("cross-frame attention: no host entries at step {step}")
            };
            for (layer, host) in layers {
                let staged = match staging.entry(layer.clone()) {
                    std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                    std::collections::hash_map::Entry::Vacant(v) => {
                        let zeros = || candle_core::Tensor::zeros(host.first.shape(), host.first.dtype(), &device);
                        v.insert(Entry { first: zeros()?, prev: zeros()? })
                    }
                };
                if read_first {
                    self.copies.upload(&host.first, &staged.first)?;
                }
                if read_prev {
                    self.copies.upload(&host.prev, &staged.prev)?;
                }
            }
        }
        self.upload_pending = true;
        Ok(())
    }

    /// Host location: before a layer reads or writes staging buffers, the device waits for the
    /// call's uploads.
    fn await_uploads(&mut self) -> candle_core::Result<()> {
        if self.upload_pending {
            let device = self.device.clone().expect("uploads are queued with a device");
            self.copies.join(&device).map_err(offload_error)?;
            self.upload_pending = false;
        }
        Ok(())
    }
}

/// An error of the host copies inside the models' call (which speaks candle's error type).
fn offload_error(e: anyhow::Error) -> candle_core::Error {
    candle_core::Error::Msg(format!("cross-frame store on the host: {e:#}"))
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
                self.drop_entries();
                match self.location {
                    StoreLocation::Device => self.store.resize_with(plan.timesteps.len(), HashMap::new),
                    StoreLocation::Host => self.host.resize_with(plan.timesteps.len(), HashMap::new),
                }
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
                if !self.has_entries(step) {
                    return None;
                }
                2
            }
        };
        let mode = self.mode as u64;
        let scope = self.scope as u64;
        Some((self.generation << 8) | (mode << 4) | (scope << 2) | role)
    }

    fn graph_owners(&self) -> Vec<GraphWatch> {
        vec![self.graph_owner.watch()]
    }

    fn end_frame(&mut self) -> Result<()> {
        self.step = None;
        Ok(())
    }

    fn begin_models(&mut self) -> Result<()> {
        if self.location == StoreLocation::Host && self.mode != AttentionMode::Off {
            self.upload_entries()?;
        }
        Ok(())
    }

    /// Host location: the device waits for every copy of the call (a capture must end with
    /// its forked copy stream joined).
    fn end_models(&mut self) -> Result<()> {
        if let Some(device) = &self.device {
            self.upload_pending = false;
            self.copies.join(device)?;
        }
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
                if !self.has_entries(row.step) {
                    return None;
                }
                roles |= 1 << i;
            }
            // Host location: a slot whose staging buffers do not exist yet allocates them.
            if self.location == StoreLocation::Host
                && self.staging.get(&self.staging_key(i, row.step)).is_none_or(HashMap::is_empty)
            {
                return None;
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
        self.await_uploads()?;
        let rows = self.rows.clone();
        if rows.iter().all(|r| r.anchor) {
            // Plain attention for every frame; record the anchors' inputs.
            let mut offset = 0;
            for (slot, row) in rows.iter().enumerate() {
                let part = hidden.narrow(0, offset, row.batch)?;
                offset += row.batch;
                record_anchor(self.working(slot, row.step), layer, &part)?;
                self.written(slot, row.step, layer, true)?;
            }
            return Ok(RowsContext::Own);
        }
        let mut contexts = Vec::with_capacity(rows.len());
        let mut offset = 0;
        for (slot, row) in rows.iter().enumerate() {
            let part = hidden.narrow(0, offset, row.batch)?;
            offset += row.batch;
            let mode = self.mode;
            let layers = self.working(slot, row.step);
            let context = if row.anchor {
                record_anchor(layers, layer, &part)?;
                self.written(slot, row.step, layer, true)?;
                // The anchor's own inputs: as first and as prev they are one set of keys twice,
                // which attention weighs exactly as the set once.
                match mode {
                    AttentionMode::FirstPrev => vec![part.clone(), part],
                    _ => vec![part],
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
                match mode {
                    AttentionMode::First => vec![entry.first.clone()],
                    AttentionMode::Prev => vec![entry.prev.clone()],
                    AttentionMode::FirstPrev => vec![entry.first.clone(), entry.prev.clone()],
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
        for (slot, row) in self.rows.clone().iter().enumerate() {
            let part = hidden.narrow(0, offset, row.batch)?;
            offset += row.batch;
            if !row.anchor
                && let Some(entry) = self.working(slot, row.step).get(layer)
            {
                entry.prev.slice_set(&part.contiguous()?, 0, 0)?;
                self.written(slot, row.step, layer, false)?;
            }
        }
        Ok(())
    }
}

/// What one stream's rows attend to at a layer of a batched call.
enum RowsContext {
    /// Their own inputs (plain attention).
    Own,
    /// Per frame, the stored inputs to project into keys and values: pieces `(rows, tokens,
    /// channels)` whose tokens, one after the other, are the frame's key set (first, prev).
    Stored(Vec<Vec<Tensor>>),
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

    fn begin_models(&mut self) -> Result<()> {
        self.streams.iter_mut().try_for_each(|stream| stream.begin_models())
    }

    /// Every stream's copies are joined, also when one fails.
    fn end_models(&mut self) -> Result<()> {
        let ended: Vec<Result<()>> = self.streams.iter_mut().map(|stream| stream.end_models()).collect();
        ended.into_iter().collect()
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

    fn graph_owners(&self) -> Vec<GraphWatch> {
        self.streams.iter().flat_map(|stream| stream.graph_owners()).collect()
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
    // Per group of rows, the pieces of its key set.
    let mut key_sets: Vec<Vec<Tensor>> = Vec::new();
    let mut all_own = true;
    let mut offset = 0;
    for (stream, &batch) in streams.iter_mut().zip(batches) {
        let part = hidden.narrow(0, offset, batch)?;
        offset += batch;
        match stream.rows_contexts(layer, &part)? {
            RowsContext::Own => key_sets.push(vec![part.clone()]),
            RowsContext::Stored(stored) => {
                all_own = false;
                key_sets.extend(stored);
            }
        }
        parts.push(part);
    }
    if all_own {
        return Ok(None);
    }
    let context = assemble_key_sets(layer, &key_sets)?;
    let (keys, values) = project(&context)?;
    // Gone before the attention allocates its own (the largest tensor of the call's
    // up-block attention at full latent size: rows x 2 x tokens x channels).
    drop(context);
    for (part, stream) in parts.iter().zip(streams.iter_mut()) {
        stream.rows_written(layer, part)?;
    }
    Ok(Some((keys, values)))
}

/// The key sets of a call's row groups as one `(rows, tokens, channels)` tensor, written in
/// place (no per-frame copies on the way): each group's pieces one after the other along the
/// tokens, repeated up to the longest set's length, which attention weighs exactly as the set
/// once (first+prev holds twice the tokens of first, prev or plain).
fn assemble_key_sets(layer: &str, key_sets: &[Vec<Tensor>]) -> candle_core::Result<Tensor> {
    let Some(first) = key_sets.first().and_then(|pieces| pieces.first()) else {
        candle_core::bail!("cross-frame attention at {layer}: no key set")
    };
    let (_, _, channels) = first.dims3()?;
    let mut lengths = Vec::with_capacity(key_sets.len());
    let mut rows = 0;
    for pieces in key_sets {
        let mut tokens = 0;
        let mut group_rows = None;
        for piece in pieces {
            let (r, t, c) = piece.dims3()?;
            if c != channels || group_rows.is_some_and(|g| g != r) {
                candle_core::bail!("cross-frame attention at {layer}: key set pieces of shapes that do not line up");
            }
            group_rows = Some(r);
            tokens += t;
        }
        rows += group_rows.unwrap_or(0);
        lengths.push(tokens);
    }
    let longest = lengths.iter().copied().max().unwrap_or(0);
    let context = Tensor::zeros((rows, longest, channels), first.dtype(), first.device())?;
    let mut row = 0;
    for (pieces, tokens) in key_sets.iter().zip(lengths) {
        if tokens == 0 || longest % tokens != 0 {
            candle_core::bail!(
                "cross-frame attention at {layer}: key sets of {tokens} and {longest} tokens cannot be lined up"
            );
        }
        let group_rows = pieces[0].dim(0)?;
        let target = context.narrow(0, row, group_rows)?;
        let mut at = 0;
        for _ in 0..longest / tokens {
            for piece in pieces {
                target.slice_set(&piece.contiguous()?, 1, at)?;
                at += piece.dim(1)?;
            }
        }
        row += group_rows;
    }
    Ok(context)
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
        self.await_uploads()?;
        let (mode, role) = (self.mode, self.role);
        let layers = self.working(0, step);
        match role {
            Role::Anchor => {
                record_anchor(layers, layer, hidden)?;
                self.written(0, step, layer, true)?;
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
                let context = match mode {
                    AttentionMode::First => entry.first.clone(),
                    AttentionMode::Prev => entry.prev.clone(),
                    AttentionMode::FirstPrev => Tensor::cat(&[&entry.first, &entry.prev], 1)?,
                    AttentionMode::Off => unreachable!("handled above"),
                };
                let (keys, values) = project(&context)?;
                // After the projection in stream order, so "previous" is read before it is
                // overwritten (for `Prev` the context is the buffer itself).
                entry.prev.slice_set(&hidden.contiguous()?, 0, 0)?;
                self.written(0, step, layer, false)?;
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
