//! The element's per-frame path through the engine, in the element's orders (synchronous, and
//! overlapped: the next frame prepared while the device runs the current one; with the VAE on
//! its own CUDA stream, the next frame also launched before the current one is finished), and
//! the frames with and without the VAE stream compared:
//! `VideoSession::prepare` with a packed RGB frame of the input size (upload, scaling to the
//! processing size, the scene-cut measure, Canny), `launch` (the diffusion), `finish_at`
//! (scaling back to the input size, download). What the element adds on top is its buffer
//! conversions (plugins/src/video.rs).

use std::collections::VecDeque;
use std::time::Instant;

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use clap::Args;
use sdcrossframe::frame::RgbFrame;
use sdcrossframe::pipeline::SizeRequest;
use sdcrossframe::session::{FinishedFrame, InFlightFrame, SessionConfig, VideoSession};

use crate::Cli;
use crate::args::{GenerationArgs, ModelArgs};
use crate::timing::median;

#[derive(Args, Debug)]
pub struct SessionArgs {
    #[command(flatten)]
    models: ModelArgs,
    #[command(flatten)]
    generation: GenerationArgs,
    /// Size of the frames pushed in.
    #[arg(long, default_value_t = 1280)]
    input_width: usize,
    #[arg(long, default_value_t = 720)]
    input_height: usize,
}

/// Per-frame stage times in ms.
#[derive(Default)]
struct Stages {
    columns: [Vec<f64>; 5],
}

impl Stages {
    fn add(&mut self, finished: &FinishedFrame, frame: std::time::Duration) {
        let ms = |d: std::time::Duration| d.as_secs_f64() * 1e3;
        let values = [
            ms(finished.stylized.prepare_time),
            ms(finished.stylized.diffuse_time),
            ms(finished.wait_time),
            ms(finished.scale_time),
            ms(frame),
        ];
        for (column, value) in self.columns.iter_mut().zip(values) {
            column.push(value);
        }
    }

    fn median(&self, column: usize) -> f64 {
        median(&self.columns[column])
    }
}

/// A frame with structure Canny finds (a moving gradient with bars), different every index.
pub fn synthetic_frame(width: usize, height: usize, index: usize) -> Result<RgbFrame> {
    let mut data = Vec::with_capacity(width * height * 3);
    for y in 0..height {
        for x in 0..width {
            let bar = ((x + 3 * index) / 40 + y / 40).is_multiple_of(2);
            let base = ((x * 255 / width.max(1)) as u8, (y * 255 / height.max(1)) as u8, (index * 7 % 256) as u8);
            data.extend_from_slice(&if bar { [base.0, base.1, base.2] } else { [255 - base.0, base.2, base.1] });
        }
    }
    RgbFrame::new(width, height, data)
}

pub fn run(cli: &Cli, args: &SessionArgs, device: &Device, dtype: DType) -> Result<()> {
    let (stylizer, _) = args.models.load(device, dtype)?;
    let settings = args.generation.settings();
    let (width, height) = (args.generation.width, args.generation.height);
    let stream_batch = args.generation.stream_batch;
    let config = SessionConfig {
        size: SizeRequest::exact(width, height),
        scene_cut_threshold: 0.0,
        store: args.generation.store,
        stream_batch,
        ..SessionConfig::default()
    };
    let mut session = VideoSession::new(stylizer, config, settings.clone())?;
    let (input_w, input_h) = (args.input_width, args.input_height);
    let frames: Vec<RgbFrame> = (0..4).map(|i| synthetic_frame(input_w, input_h, i)).collect::<Result<_>>()?;
    let vae_stream = session.launches_before_finishing();
    println!(
        "session: {input_w}x{input_h} frames processed at {width}x{height}, {} steps x strength {}, guidance {}, stream batch {stream_batch}, VAE stream {}",
        settings.steps,
        settings.strength,
        settings.guidance_scale,
        if vae_stream { "on" } else { "off (CPU, or SDCROSSFRAME_VAE_STREAM=off)" }
    );
    let warmup = cli.warmup.max(1);
    let count = warmup + cli.runs;
    // Each frame as the element runs it: synchronously (prepare, launch, finish); overlapped with
    // the VAE on its own stream (prepare N+1, launch N+1, finish N: the UNet's stream has N+1
    // queued when N ends, N's decoding runs beside it); overlapped with the VAE on the UNet's
    // stream, the order before the VAE stream (prepare N+1, finish N, launch N+1). The anchor and
    // the warm-up frames (tuning, graph capture) are not timed. Each run starts a new anchor.
    let (sync, _) = frames_through(&mut session, &frames, count, warmup, (input_w, input_h), Order::Synchronous)?;
    session.reset();
    let (on, on_frames) = frames_through(&mut session, &frames, count, warmup, (input_w, input_h), Order::Overlapped)?;
    session.reset();
    session.set_vae_stream(false);
    let (off, off_frames) =
        frames_through(&mut session, &frames, count, warmup, (input_w, input_h), Order::Overlapped)?;
    session.set_vae_stream(true);
    println!();
    println!("| per frame (median ms) | synchronous | overlapped, VAE stream | overlapped, one stream |");
    println!("|---|---:|---:|---:|");
    for (label, pick) in [
        ("prepare: upload, scale in, scene-cut measure, Canny (CPU)", 0),
        ("diffuse: launch to result ready", 1),
        ("finish: wait for the device, scale back, download", 2),
        ("scale back on the CPU (CPU device only)", 3),
        ("frame time (whole frame / interval between outputs)", 4),
    ] {
        println!("| {label} | {:.2} | {:.2} | {:.2} |", sync.median(pick), on.median(pick), off.median(pick));
    }
    println!(
        "| CPU work around the diffusion (prepare + CPU scaling) | {:.2} | {:.2} | {:.2} |",
        sync.median(0) + sync.median(3),
        on.median(0) + on.median(3),
        off.median(0) + off.median(3)
    );
    // The same frames with and without the VAE stream: the same kernels, so the same images.
    let mut worst_image = 0f32;
    let mut worst_level = 0u8;
    for ((a, a_rgb), (b, b_rgb)) in on_frames.iter().zip(&off_frames) {
        let d = (a.to_device(&Device::Cpu)? - b.to_device(&Device::Cpu)?)?.abs()?.flatten_all()?.max(0)?;
        worst_image = worst_image.max(d.to_scalar::<f32>()?);
        let level = a_rgb.data.iter().zip(&b_rgb.data).map(|(x, y)| x.abs_diff(*y)).max().unwrap_or(0);
        worst_level = worst_level.max(level);
    }
    println!(
        "VAE stream vs one stream, {} frames: largest difference {worst_image:.3e} (stylized image, 0..1), {worst_level} levels (8-bit output at the input size)",
        on_frames.len().min(off_frames.len())
    );
    Ok(())
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Order {
    Synchronous,
    /// The element's overlapped order, as the session asks for it
    /// (`VideoSession::launches_before_finishing`).
    Overlapped,
}

/// `count` frames through the session in `order` (the stream batch's last frames drained at the
/// end): the stage times of the frames after `warmup`, and every output's stylized image (on the
/// CPU) and 8-bit frame.
fn frames_through(
    session: &mut VideoSession,
    frames: &[RgbFrame],
    count: usize,
    warmup: usize,
    (width, height): (usize, usize),
    order: Order,
) -> Result<(Stages, Vec<(Tensor, RgbFrame)>)> {
    let mut stages = Stages::default();
    let mut outputs = Vec::new();
    let mut held: VecDeque<InFlightFrame> = VecDeque::new();
    let mut last = Instant::now();
    let mut keep = |finished: FinishedFrame, started: Instant, outputs: &mut Vec<(Tensor, RgbFrame)>| -> Result<()> {
        let now = Instant::now();
        // Synchronous: the whole frame; overlapped: the interval between outputs.
        let time = if order == Order::Synchronous { now - started } else { now - last };
        if outputs.len() > warmup {
            stages.add(&finished, time);
        }
        last = now;
        outputs.push((finished.stylized.image.to_device(&Device::Cpu)?, finished.rgb));
        Ok(())
    };
    for index in 0..count {
        let started = Instant::now();
        let prepared = session.prepare(&frames[index % frames.len()], None)?;
        let mut done = Vec::new();
        if order == Order::Synchronous || !session.launches_before_finishing() {
            // Finish the frames held before launching (overlapped: the order before the VAE stream).
            for frame in held.drain(..) {
                done.push(session.finish_at(frame, width, height)?);
            }
        }
        let earlier: Vec<InFlightFrame> = held.drain(..).collect();
        held.extend(session.submit(prepared)?);
        for frame in earlier {
            done.push(session.finish_at(frame, width, height)?);
        }
        if order == Order::Synchronous {
            for frame in held.drain(..) {
                done.push(session.finish_at(frame, width, height)?);
            }
        }
        for finished in done {
            keep(finished, started, &mut outputs)?;
        }
    }
    let rest: Vec<InFlightFrame> = held.drain(..).chain(session.drain()?).collect();
    for frame in rest {
        let finished = session.finish_at(frame, width, height)?;
        outputs.push((finished.stylized.image.to_device(&Device::Cpu)?, finished.rgb));
    }
    Ok((stages, outputs))
}
