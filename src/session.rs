//! A video session: frames pushed in order, stylized frames out, with the cross-frame
//! attention state, re-anchoring (interval, scene cuts, size or schedule changes) and the
//! initial-noise policy. Frame-in / frame-out; no GStreamer types.

use std::fmt;
use std::str::FromStr;

use anyhow::{Result, bail};
use candle_core::Tensor;

use crate::canny::{self, CannyParams, ImageView};
use crate::cross_frame::{AttentionMode, AttentionScope, CrossFrameAttention};
use crate::frame::RgbFrame;
use crate::pipeline::{CancelHandle, FrameSettings, SizeRequest, Stylizer};
use crate::resample;

/// Where each frame's initial noise comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum NoiseMode {
    /// The same noise for every frame (what keeps frames coherent).
    #[default]
    Fixed,
    /// Fresh noise for every frame, as the original pipeline did.
    PerFrame,
}

impl FromStr for NoiseMode {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "fixed" => Self::Fixed,
            "per-frame" => Self::PerFrame,
            other => bail!("unknown noise mode {other:?}: expected fixed or per-frame"),
        })
    }
}

impl fmt::Display for NoiseMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Fixed => "fixed",
            Self::PerFrame => "per-frame",
        })
    }
}

/// Session-wide settings.
#[derive(Debug, Clone, PartialEq)]
pub struct SessionConfig {
    pub attention: AttentionMode,
    pub scope: AttentionScope,
    /// Re-anchor every N frames; 0 never.
    pub anchor_interval: usize,
    /// Mean absolute luma change (0..1) between consecutive input frames that counts as a
    /// scene cut and re-anchors; 0 disables detection.
    pub scene_cut_threshold: f64,
    pub noise: NoiseMode,
    pub seed: u64,
    pub canny: CannyParams,
    /// Processing size requested (see [`SizeRequest`]; default: short side 512).
    pub size: SizeRequest,
}

impl Default for SessionConfig {
    fn default() -> Self {
        Self {
            attention: AttentionMode::FirstPrev,
            scope: AttentionScope::Up,
            anchor_interval: 0,
            scene_cut_threshold: 0.3,
            noise: NoiseMode::Fixed,
            seed: 0,
            canny: CannyParams::default(),
            size: SizeRequest::default(),
        }
    }
}

/// One stylized frame.
pub struct StylizedFrame {
    /// `[1, 3, H, W]` f32 in [0, 1] at the processing size.
    pub image: Tensor,
    /// Whether this frame became the cross-frame anchor.
    pub anchor: bool,
    /// Why it became the anchor, when it did.
    pub anchor_reason: Option<&'static str>,
    /// Time spent scaling the frame, its scene-cut measure, Canny and the upload.
    pub prepare_time: std::time::Duration,
    /// Time spent in the diffusion itself (VAE encode, denoising, VAE decode).
    pub diffuse_time: std::time::Duration,
}

impl StylizedFrame {
    /// The image as a packed frame at the processing size.
    pub fn to_rgb(&self) -> Result<RgbFrame> {
        RgbFrame::from_tensor(&self.image)
    }

    /// The image as a packed frame of `width` x `height` (the input's size), scaled on the
    /// image's device.
    pub fn to_rgb_scaled(&self, width: usize, height: usize) -> Result<RgbFrame> {
        resample::scaler().output(&self.image, width, height)
    }
}

/// Side of the square thumbnail the scene-cut measure compares.
const THUMBNAIL_SIDE: usize = 32;

pub struct VideoSession {
    stylizer: Stylizer,
    attention: CrossFrameAttention,
    cancel: CancelHandle,
    config: SessionConfig,
    settings: FrameSettings,
    /// Noise given explicitly (e.g. from a file), used for every frame.
    explicit_noise: Option<Tensor>,
    /// Seeded fixed noise, cached per processing size.
    fixed_noise: Option<((usize, usize), Tensor)>,
    previous_thumbnail: Option<Vec<f32>>,
    frames_pushed: u64,
}

impl VideoSession {
    pub fn new(stylizer: Stylizer, config: SessionConfig, settings: FrameSettings) -> Result<Self> {
        config.canny.validate()?;
        Ok(Self {
            attention: CrossFrameAttention::new(config.attention, config.scope),
            cancel: CancelHandle::default(),
            stylizer,
            config,
            settings,
            explicit_noise: None,
            fixed_noise: None,
            previous_thumbnail: None,
            frames_pushed: 0,
        })
    }

    pub fn stylizer(&self) -> &Stylizer {
        &self.stylizer
    }

    pub fn attention(&self) -> &CrossFrameAttention {
        &self.attention
    }

    pub fn settings(&self) -> &FrameSettings {
        &self.settings
    }

    /// Takes effect at the next frame. A schedule change (steps, strength, guidance on/off)
    /// re-anchors there.
    pub fn set_settings(&mut self, settings: FrameSettings) -> Result<()> {
        self.stylizer.img2img().timesteps(&settings)?;
        self.settings = settings;
        Ok(())
    }

    pub fn set_config(&mut self, config: SessionConfig) -> Result<()> {
        config.canny.validate()?;
        self.attention.configure(config.attention, config.scope);
        if config.seed != self.config.seed || config.size != self.config.size {
            self.fixed_noise = None;
        }
        self.config = config;
        Ok(())
    }

    /// Uses this noise for every frame (fixed noise given explicitly, e.g. from a file).
    pub fn set_noise(&mut self, noise: Option<Tensor>) {
        self.explicit_noise = noise;
    }

    /// A handle that cancels the frame in flight; the cancelled `push` returns an error
    /// that downcasts to [`crate::pipeline::Cancelled`], and the next frame becomes a new anchor.
    pub fn cancel_handle(&self) -> CancelHandle {
        self.cancel.clone()
    }

    /// Forgets every previous frame: the next frame is a new anchor.
    pub fn reset(&mut self) {
        self.attention.reset();
        self.previous_thumbnail = None;
    }

    pub fn frames_pushed(&self) -> u64 {
        self.frames_pushed
    }

    /// The size frames of `width` x `height` are processed at.
    pub fn processing_size(&self, width: usize, height: usize) -> Result<(usize, usize)> {
        self.config.size.resolve(width, height, self.stylizer.img2img().vae_scale_factor())
    }

    /// Stylizes the next frame. `control` replaces the frame's Canny edges when given.
    pub fn push(&mut self, frame: &RgbFrame, control: Option<&RgbFrame>) -> Result<StylizedFrame> {
        let index = self.frames_pushed;
        let _span = tracing::info_span!("session_frame", index).entered();
        let started = std::time::Instant::now();
        let (width, height) = self.processing_size(frame.width, frame.height)?;
        let device = self.stylizer.device().clone();
        // Scaled on the GPU when the model is there; `frame` is what the model sees, as bytes.
        let (input, frame) = resample::scaler().model_input(frame, width, height, &device)?;

        let anchor_reason = self.anchor_reason(&frame);
        if let Some(reason) = anchor_reason {
            tracing::info!(index, reason, "re-anchoring cross-frame attention");
            self.attention.request_anchor();
        }

        let control = match control {
            Some(c) => resample::scaler().model_input(c, width, height, &device)?.0,
            None => {
                let view = ImageView::new(&frame.data, width, height, 3, width * 3)?;
                canny::control_image(&canny::canny(&view, &self.config.canny)?, &device)?
            }
        };
        let noise = self.noise_for(index, width, height)?;
        // A cancel requested between frames is for the frame that was in flight then.
        self.cancel.clear();
        let prepare_time = started.elapsed();
        let result = self.stylizer.stylize_cancellable(
            &input,
            &control,
            &self.settings,
            &noise,
            &mut self.attention,
            &self.cancel,
        );
        let diffuse_time = started.elapsed() - prepare_time;
        let image = match result {
            Ok(image) => image,
            Err(e) => {
                // A frame that failed half-way may have left a partial store behind.
                self.attention.reset();
                return Err(e.context(format!("frame {index}")));
            }
        };
        self.frames_pushed += 1;
        let anchor = self.config.attention != AttentionMode::Off && self.attention.current_frame_is_anchor();
        let anchor_reason = match (anchor, anchor_reason) {
            (true, None) if index == 0 => Some("first frame"),
            (true, None) => Some("frame size or schedule changed"),
            (_, reason) => reason,
        };
        Ok(StylizedFrame {
            image,
            anchor,
            anchor_reason: if anchor { anchor_reason } else { None },
            prepare_time,
            diffuse_time,
        })
    }

    /// Why the next frame must become an anchor, if it must (interval or scene cut).
    fn anchor_reason(&mut self, frame: &RgbFrame) -> Option<&'static str> {
        let thumbnail = luma_thumbnail(frame);
        let previous = self.previous_thumbnail.replace(thumbnail);
        if self.config.attention == AttentionMode::Off {
            return None;
        }
        let interval = self.config.anchor_interval;
        if interval > 0 && self.attention.stored_entries() > 0 && self.attention.frames_since_anchor() + 1 >= interval {
            return Some("anchor interval");
        }
        let threshold = self.config.scene_cut_threshold;
        if threshold > 0.0
            && let Some(previous) = previous
            && let Some(current) = &self.previous_thumbnail
            && scene_change(&previous, current) > threshold
        {
            return Some("scene cut");
        }
        None
    }

    fn noise_for(&mut self, index: u64, width: usize, height: usize) -> Result<Tensor> {
        if let Some(noise) = &self.explicit_noise {
            return Ok(noise.clone());
        }
        match self.config.noise {
            NoiseMode::PerFrame => self.stylizer.seeded_noise(self.config.seed.wrapping_add(index), width, height),
            NoiseMode::Fixed => {
                if let Some((size, noise)) = &self.fixed_noise
                    && *size == (width, height)
                {
                    return Ok(noise.clone());
                }
                let noise = self.stylizer.seeded_noise(self.config.seed, width, height)?;
                self.fixed_noise = Some(((width, height), noise.clone()));
                Ok(noise)
            }
        }
    }
}

/// Area-averaged luma (0..1) on a small square grid: cheap, and blind to noise and small motion.
pub fn luma_thumbnail(frame: &RgbFrame) -> Vec<f32> {
    let side = THUMBNAIL_SIDE;
    let mut sums = vec![0f32; side * side];
    let mut counts = vec![0u32; side * side];
    for y in 0..frame.height {
        let ty = y * side / frame.height;
        let row = &frame.data[y * frame.width * 3..(y + 1) * frame.width * 3];
        for (x, px) in row.chunks_exact(3).enumerate() {
            let tx = x * side / frame.width;
            let luma = 0.299 * px[0] as f32 + 0.587 * px[1] as f32 + 0.114 * px[2] as f32;
            sums[ty * side + tx] += luma / 255.0;
            counts[ty * side + tx] += 1;
        }
    }
    sums.iter().zip(&counts).map(|(s, &c)| if c == 0 { 0.0 } else { s / c as f32 }).collect()
}

/// Mean absolute difference of two thumbnails (0..1).
pub fn scene_change(a: &[f32], b: &[f32]) -> f64 {
    let total: f64 = a.iter().zip(b).map(|(x, y)| (x - y).abs() as f64).sum();
    total / a.len().max(1) as f64
}
