//! The element's per-frame path through the engine, in the element's two orders (synchronous,
//! and overlapped: the next frame prepared while the device runs the current one):
//! `VideoSession::prepare` with a packed RGB frame of the input size (upload, scaling to the
//! processing size, the scene-cut measure, Canny), `launch` (the diffusion), `finish_at`
//! (scaling back to the input size, download). What the element adds on top is its buffer
//! conversions (plugins/src/video.rs).

use std::time::Instant;

use anyhow::Result;
use candle_core::{DType, Device};
use clap::Args;
use sdcrossframe::frame::RgbFrame;
use sdcrossframe::pipeline::SizeRequest;
use sdcrossframe::session::{FinishedFrame, SessionConfig, VideoSession};

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
    let config =
        SessionConfig { size: SizeRequest::exact(width, height), scene_cut_threshold: 0.0, ..SessionConfig::default() };
    let mut session = VideoSession::new(stylizer, config, settings.clone())?;
    let (input_w, input_h) = (args.input_width, args.input_height);
    let frames: Vec<RgbFrame> = (0..4).map(|i| synthetic_frame(input_w, input_h, i)).collect::<Result<_>>()?;
    println!(
        "session: {input_w}x{input_h} frames processed at {width}x{height}, {} steps x strength {}, guidance {}",
        settings.steps, settings.strength, settings.guidance_scale
    );
    // Each frame as the element runs it: synchronously (prepare, launch, finish), then
    // overlapped (prepare N+1 while the device runs N, finish N, launch N+1). The anchor and the
    // warm-up frames (tuning, graph capture) are not timed.
    let warmup = cli.warmup.max(1);
    let mut sync = Stages::default();
    for index in 0..warmup + cli.runs {
        let started = Instant::now();
        let prepared = session.prepare(&frames[index % frames.len()], None)?;
        let in_flight = session.launch(prepared)?;
        let finished = session.finish_at(in_flight, input_w, input_h)?;
        if index >= warmup {
            sync.add(&finished, started.elapsed());
        }
    }
    let mut overlapped = Stages::default();
    let mut held = None;
    let mut last = Instant::now();
    for index in 0..warmup + cli.runs {
        let prepared = session.prepare(&frames[index % frames.len()], None)?;
        let finished = held.take().map(|f| session.finish_at(f, input_w, input_h)).transpose()?;
        held = Some(session.launch(prepared)?);
        if let Some(finished) = finished {
            // One frame out per frame in: the interval between outputs is the frame time.
            let now = Instant::now();
            if index > warmup {
                overlapped.add(&finished, now - last);
            }
            last = now;
        }
    }
    if let Some(f) = held.take() {
        session.finish_at(f, input_w, input_h)?;
    }
    println!();
    println!("| per frame (median ms) | synchronous | overlapped |");
    println!("|---|---:|---:|");
    for (label, pick) in [
        ("prepare: upload, scale in, scene-cut measure, Canny (CPU)", 0),
        ("diffuse: launch to result ready", 1),
        ("finish: wait for the device, scale back, download", 2),
        ("scale back on the CPU (CPU device only)", 3),
        ("frame time (whole frame / interval between outputs)", 4),
    ] {
        println!("| {label} | {:.2} | {:.2} |", sync.median(pick), overlapped.median(pick));
    }
    println!(
        "| CPU work around the diffusion (prepare + CPU scaling) | {:.2} | {:.2} |",
        sync.median(0) + sync.median(3),
        overlapped.median(0) + overlapped.median(3)
    );
    Ok(())
}
