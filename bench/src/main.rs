//! `sdcrossframe-bench`: timings of the engine, with no weights needed (random weights at
//! SD1.5 shapes; speed does not depend on their values) or with a model.
//!
//! - `unet-step`: one UNet + ControlNet call, plain and with cross-frame attention.
//! - `frame`: whole img2img frames through the pipeline's own `Img2Img::run`, with the time of
//!   each stage (text encoder, VAE encode, denoising steps, VAE decode).
//! - `ops`, `attention`: single operations at SD1.5 shapes.
//! - `session`: the element's per-frame path (scaling, Canny, upload, diffusion, download).
//!
//! On CUDA the peak of the memory allocated on the device (candle's stream-ordered pool,
//! weights included) is reported per measurement.

mod args;
mod frame;
mod gpu_memory;
mod ops;
mod random;
mod session;
mod streams;
mod timing;
mod unet_step;

use anyhow::{Result, bail};
use clap::{Parser, Subcommand};
use sdcrossframe::device::{default_dtype, parse_device, parse_dtype};

use gpu_memory::Probe;
use timing::{describe_device, dtype_name};

#[derive(Parser, Debug)]
#[command(
    name = "sdcrossframe-bench",
    about = "Timings of the sdcrossframe engine (random weights or a model directory)"
)]
pub struct Cli {
    /// Compute device: cpu, or cuda:N (needs a build with --features cuda).
    #[arg(long, default_value = "cpu", global = true)]
    device: String,
    /// Compute dtype: f32, f16 or bf16 (default: f32 on cpu, f16 on cuda).
    #[arg(long, global = true)]
    dtype: Option<String>,
    /// Timed runs per measurement (the median is reported).
    #[arg(long, default_value_t = 5, global = true)]
    pub runs: usize,
    /// Untimed runs before the timed ones. `frame`: the anchor frame plus warmup - 1 follower
    /// frames; on CUDA use 3 or more (a step key runs eagerly, then is captured as a graph,
    /// and only replays after that).
    #[arg(long, default_value_t = 1, global = true)]
    pub warmup: usize,
    #[command(subcommand)]
    mode: Mode,
}

#[derive(Subcommand, Debug)]
enum Mode {
    /// One UNet + ControlNet call at SD1.5 shapes with random weights: plain attention and
    /// cross-frame first+prev.
    UnetStep(unet_step::UnetStepArgs),
    /// Whole img2img frames with per-stage times: cross-frame first+prev and attention off.
    Frame(frame::FrameArgs),
    /// Single operations at SD1.5 shapes (GroupNorm, SiLU, convolutions, linear layers,
    /// attention): where a step's time goes, to compare with tests/reference/bench_ops_torch.py.
    Ops,
    /// Attention alone: the fused kernel against candle's unfused matmul-softmax-matmul.
    Attention,
    /// The element's whole per-frame path: a packed RGB frame of the input size through
    /// `VideoSession::push` and back to the input size, with the time of each part.
    Session(session::SessionArgs),
    /// Several streams at once, each a session on its own thread: one shared model with
    /// cross-stream batching, without it, or a model copy per stream.
    Streams(streams::StreamsArgs),
}

fn main() -> std::process::ExitCode {
    // SAFETY: first thing in main, before any thread starts.
    unsafe { sdcrossframe::device::pin_cpu_thread_count() };
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    if cli.runs == 0 {
        bail!("--runs must be at least 1");
    }
    let device = parse_device(&cli.device)?;
    let dtype = match cli.dtype.as_deref() {
        Some(spec) => parse_dtype(spec)?,
        None => default_dtype(&device),
    };
    let probe = Probe::new(&device)?;
    println!(
        "sdcrossframe-bench: device {}, dtype {}, {} warm-up + {} timed runs, cuda feature {}",
        describe_device(&device, probe.as_ref())?,
        dtype_name(dtype),
        cli.warmup,
        cli.runs,
        if cfg!(feature = "cuda") { "on" } else { "off" }
    );
    match &cli.mode {
        Mode::UnetStep(args) => unet_step::run(&cli, args, &device, dtype, probe.as_ref()),
        Mode::Frame(args) => frame::run(&cli, args, &device, dtype, probe.as_ref()),
        Mode::Ops => ops::ops(&cli, &device, dtype),
        Mode::Attention => ops::attention(&cli, &device, dtype),
        Mode::Session(args) => session::run(&cli, args, &device, dtype),
        Mode::Streams(args) => streams::run(&cli, args, &device, dtype, probe.as_ref()),
    }
}
