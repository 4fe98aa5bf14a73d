//! The element's per-frame path through the engine: `VideoSession::push` with a packed RGB
//! frame of the input size (upload, scaling to the processing size, the scene-cut measure,
//! Canny, the diffusion), then `to_rgb_scaled` (scaling back to the input size, download).
//! What the element adds on top is its buffer conversions (plugins/src/video.rs).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Result;
use candle_core::{DType, Device};
use clap::Args;
use sdcrossframe::frame::RgbFrame;
use sdcrossframe::pipeline::{FrameSettings, ModelSpec, SizeRequest, Stylizer};
use sdcrossframe::session::{SessionConfig, VideoSession};

use crate::Cli;
use crate::random::sd15_parts;
use crate::timing::median;

#[derive(Args, Debug)]
pub struct SessionArgs {
    /// A Stable Diffusion model; without it, random weights at SD1.5 shapes.
    #[arg(long, requires = "controlnet")]
    model: Option<String>,
    /// A ControlNet model (with --model).
    #[arg(long, requires = "model")]
    controlnet: Option<String>,
    /// The CLIP tokenizer folder random weights use.
    #[arg(long, default_value = "tests/fixtures/tiny-sd/tokenizer")]
    tokenizer: PathBuf,
    /// Size of the frames pushed in.
    #[arg(long, default_value_t = 1280)]
    input_width: usize,
    #[arg(long, default_value_t = 720)]
    input_height: usize,
    /// Processing size.
    #[arg(long, default_value_t = 512)]
    width: usize,
    #[arg(long, default_value_t = 512)]
    height: usize,
    #[arg(long, default_value_t = 20)]
    steps: usize,
    #[arg(long, default_value_t = 0.9)]
    strength: f64,
    #[arg(long, default_value_t = 7.5)]
    guidance_scale: f64,
    #[arg(long, default_value_t = 0.7)]
    controlnet_scale: f64,
}

/// A frame with structure Canny finds (a moving gradient with bars), different every index.
fn synthetic_frame(width: usize, height: usize, index: usize) -> Result<RgbFrame> {
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
    let stylizer = match (&args.model, &args.controlnet) {
        (Some(model), Some(controlnet)) => {
            let spec = ModelSpec { model: model.clone(), controlnet: controlnet.clone(), variant: None };
            Stylizer::load(&spec, device, dtype)?
        }
        _ => Stylizer::build(sd15_parts(dtype, device, &args.tokenizer)?, device, dtype)?,
    };
    let settings = FrameSettings {
        prompt: "a watercolor painting of a woman, soft light".into(),
        negative_prompt: String::new(),
        steps: args.steps,
        strength: args.strength,
        guidance_scale: args.guidance_scale,
        controlnet_scale: args.controlnet_scale,
    };
    let config = SessionConfig {
        size: SizeRequest::exact(args.width, args.height),
        scene_cut_threshold: 0.0,
        ..SessionConfig::default()
    };
    let mut session = VideoSession::new(stylizer, config, settings)?;
    let (input_w, input_h) = (args.input_width, args.input_height);
    let frames: Vec<RgbFrame> = (0..4).map(|i| synthetic_frame(input_w, input_h, i)).collect::<Result<_>>()?;
    println!(
        "session: {input_w}x{input_h} frames processed at {}x{}, {} steps x strength {}, guidance {}",
        args.width, args.height, args.steps, args.strength, args.guidance_scale
    );
    // The anchor and the warm-up frames (tuning, graph capture) are not timed.
    let (mut prepare, mut diffuse, mut write, mut total) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for index in 0..cli.warmup.max(1) + cli.runs {
        let frame = &frames[index % frames.len()];
        let started = Instant::now();
        let out = session.push(frame, None)?;
        let write_started = Instant::now();
        let back = out.to_rgb_scaled(input_w, input_h)?;
        let write_ms = write_started.elapsed().as_secs_f64() * 1e3;
        std::hint::black_box(back);
        if index >= cli.warmup.max(1) {
            prepare.push(out.prepare_time.as_secs_f64() * 1e3);
            diffuse.push(out.diffuse_time.as_secs_f64() * 1e3);
            write.push(write_ms);
            total.push(started.elapsed().as_secs_f64() * 1e3);
        }
    }
    let (prepare, diffuse, write, total) = (median(&prepare), median(&diffuse), median(&write), median(&total));
    println!();
    println!("| per frame (median) | ms |");
    println!("|---|---:|");
    println!("| prepare: upload, scale in, scene-cut measure, Canny | {prepare:.2} |");
    println!("| diffuse (device synchronized) | {diffuse:.2} |");
    println!("| write: scale back (on the device where the model is), download | {write:.2} |");
    println!("| whole frame | {total:.2} |");
    println!("| around the diffusion (prepare + write) | {:.2} |", prepare + write);
    Ok(())
}
