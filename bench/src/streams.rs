//! Several streams on one device, each a `VideoSession` on a thread of its own fed as fast as
//! it takes frames (as elements behind a tee): one shared model with cross-stream batching,
//! one shared model without it, and a model copy per stream. Aggregate frames per second,
//! each stream's frame interval, and device memory.

use std::sync::Barrier;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use candle_core::{DType, Device};
use clap::Args;
use sdcrossframe::frame::RgbFrame;
use sdcrossframe::pipeline::{BatchTimeout, SizeRequest, Stylizer};
use sdcrossframe::session::{SessionConfig, VideoSession};

use crate::Cli;
use crate::args::{GenerationArgs, ModelArgs};
use crate::gpu_memory::Probe;
use crate::session::synthetic_frame;
use crate::timing::{gib, median};

#[derive(Args, Debug)]
pub struct StreamsArgs {
    #[command(flatten)]
    models: ModelArgs,
    #[command(flatten)]
    generation: GenerationArgs,
    /// Stream counts to measure, e.g. 1,2,4,8.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4")]
    streams: Vec<usize>,
    /// How each count runs: shared (one model, batched), unbatched (one model, each
    /// stream's calls on their own), separate (a model copy per stream).
    #[arg(long, value_delimiter = ',', default_value = "shared,separate")]
    modes: Vec<String>,
    /// The cross-stream batch timeout of the shared mode, in ms, or `auto` (a quarter of each
    /// stream's frame interval, as the element's `batch-timeout=-1`).
    #[arg(long, default_value = "5", value_parser = parse_batch_timeout)]
    batch_timeout_ms: BatchTimeout,
}

fn parse_batch_timeout(value: &str) -> std::result::Result<BatchTimeout, String> {
    if value == "auto" {
        return Ok(BatchTimeout::Auto);
    }
    value
        .parse::<u64>()
        .map(|ms| BatchTimeout::Fixed(Duration::from_millis(ms)))
        .map_err(|_| format!("{value:?}: expected milliseconds or auto"))
}

/// What one configuration measured.
struct Outcome {
    /// Frames per second, all streams together, over the timed frames.
    aggregate_fps: f64,
    /// Each stream's median interval between frames out, ms.
    intervals: Vec<f64>,
    /// Each stream's longest interval between frames out, ms (a stall: tuning, a capture).
    longest: Vec<f64>,
    shared_calls: u64,
    /// Device memory in use at the end (all processes), bytes.
    device_used: u64,
    /// Of it: the pool's tensors and reserve, the CUDA graphs' memory (this process).
    breakdown: crate::gpu_memory::Breakdown,
    /// The same after trimming the pool and the graphs' memory (what is cached, not used).
    trimmed: crate::gpu_memory::Breakdown,
    /// The streams' cross-frame stores: their entries' bytes and the memory they hold.
    store_bytes: usize,
    store_held_bytes: usize,
}

pub fn run(cli: &Cli, args: &StreamsArgs, device: &Device, dtype: DType, probe: Option<&Probe>) -> Result<()> {
    let (width, height) = (args.generation.width, args.generation.height);
    let settings = args.generation.settings();
    println!(
        "streams: {width}x{height}, {} steps x strength {}, guidance {}, stream batch {}, {} warm-up + {} timed frames per stream",
        settings.steps, settings.strength, settings.guidance_scale, args.generation.stream_batch, cli.warmup, cli.runs
    );
    println!();
    println!(
        "| streams | mode | aggregate fps | per stream: median frame interval (ms) | longest (ms) | shared calls | device memory used (GiB) |"
    );
    println!("|---:|---|---:|---|---|---:|---:|");
    let mut notes = Vec::new();
    for &count in &args.streams {
        for mode in &args.modes {
            let stylizers: Vec<Stylizer> = match mode.as_str() {
                "shared" | "unbatched" => {
                    let (first, _) = args.models.load(device, dtype)?;
                    let mut all = vec![];
                    for _ in 1..count {
                        all.push(first.share());
                    }
                    all.insert(0, first);
                    all
                }
                "separate" => {
                    (0..count).map(|_| args.models.load(device, dtype).map(|(s, _)| s)).collect::<Result<_>>()?
                }
                other => bail!("unknown mode {other:?}: expected shared, unbatched or separate"),
            };
            let timeout = (mode == "shared").then_some(args.batch_timeout_ms);
            let first = stylizers[0].shared().clone();
            let outcome = measure(cli, args, stylizers, timeout, probe)?;
            let img2img = first.img2img();
            let show = |(g, e): (sdcrossframe::ops::step_graphs::GraphStats, Option<String>)| {
                format!(
                    "{}/{}/{}/{}{}",
                    g.eager,
                    g.captured,
                    g.replayed,
                    g.failed,
                    e.map(|e| format!(" (last failure: {})", e.lines().next().unwrap_or_default())).unwrap_or_default()
                )
            };
            let batcher = first.batcher().stats();
            let holdings = img2img
                .graph_holdings()
                .map(|h| format!("{} graphs, {} signatures, {:.1} MiB", h.graphs, h.signatures, mib(h.buffer_bytes)))
                .join(" / ");
            notes.push(format!(
                "{count} {mode} (first model): calls eager/captured/replayed/failed: one frame {}, stream batch {}, cross-stream {}; batcher rounds' calls {} of which shared {}, frames that waited to start in step {}; memory at the end (GiB): tensors {:.2}, pool reserve {:.2}, CUDA graphs {:.2} (in use {:.2}); after trimming: pool reserve {:.2}, CUDA graphs {:.2}; cross-frame stores (all streams) {:.2} MiB holding {:.2} MiB; step graph buffers (one frame / stream batch / cross-stream): {holdings}",
                show(img2img.graph_stats()),
                show(img2img.stream_graph_stats()),
                show(img2img.cross_stream_graph_stats()),
                batcher.calls,
                batcher.shared_calls,
                batcher.resyncs,
                gib(outcome.breakdown.tensors),
                gib(outcome.breakdown.pool_reserved),
                gib(outcome.breakdown.graphs),
                gib(outcome.breakdown.graphs_used),
                gib(outcome.trimmed.pool_reserved),
                gib(outcome.trimmed.graphs),
                mib(outcome.store_bytes),
                mib(outcome.store_held_bytes),
            ));
            let intervals = outcome.intervals.iter().map(|ms| format!("{ms:.1}")).collect::<Vec<_>>().join(" / ");
            let longest = outcome.longest.iter().map(|ms| format!("{ms:.0}")).collect::<Vec<_>>().join(" / ");
            println!(
                "| {count} | {mode} | {:.1} | {intervals} | {longest} | {} | {:.2} |",
                outcome.aggregate_fps,
                outcome.shared_calls,
                gib(outcome.device_used)
            );
            device.synchronize()?;
        }
    }
    println!();
    for note in notes {
        println!("- {note}");
    }
    Ok(())
}

fn measure(
    cli: &Cli,
    args: &StreamsArgs,
    stylizers: Vec<Stylizer>,
    batch_timeout: Option<BatchTimeout>,
    probe: Option<&Probe>,
) -> Result<Outcome> {
    let (width, height) = (args.generation.width, args.generation.height);
    let frames: Vec<RgbFrame> = (0..4).map(|i| synthetic_frame(width, height, i)).collect::<Result<_>>()?;
    let config = SessionConfig {
        size: SizeRequest::exact(width, height),
        scene_cut_threshold: 0.0,
        store: args.generation.store,
        stream_batch: args.generation.stream_batch,
        batch_timeout,
        ..SessionConfig::default()
    };
    let sessions: Vec<VideoSession> = stylizers
        .into_iter()
        .enumerate()
        .map(|(i, stylizer)| {
            let settings = sdcrossframe::pipeline::FrameSettings {
                prompt: format!("stream {i}: a watercolor painting, soft light"),
                ..args.generation.settings()
            };
            VideoSession::new(stylizer, config.clone(), settings)
        })
        .collect::<Result<_>>()?;
    let warmup = cli.warmup.max(1);
    let total = warmup + cli.runs;
    let warm = Barrier::new(sessions.len());
    // Per stream: when each timed frame came out, and the shared calls.
    let results: Vec<Result<(Vec<Instant>, VideoSession)>> = std::thread::scope(|scope| {
        let handles: Vec<_> = sessions
            .into_iter()
            .map(|mut session| {
                let (frames, warm) = (&frames, &warm);
                scope.spawn(move || -> Result<(Vec<Instant>, VideoSession)> {
                    let device = session.stylizer().device().clone();
                    let mut out_times = Vec::new();
                    for index in 0..total + 1 {
                        if index == warmup {
                            // Every stream warm (tuned, captured) before the timed frames.
                            device.synchronize()?;
                            warm.wait();
                        }
                        if index == total {
                            break;
                        }
                        let frame = &frames[index % frames.len()];
                        let came_out = if session.config().stream_batch {
                            session.push_stream(frame, None)?
                        } else {
                            vec![session.push(frame, None)?]
                        };
                        for stylized in came_out {
                            // Waits for the device: the frame is done when its pixels are.
                            stylized.image.flatten_all()?.max(0)?.to_scalar::<f32>()?;
                            if index >= warmup {
                                out_times.push(Instant::now());
                            }
                        }
                    }
                    Ok((out_times, session))
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap_or_else(|_| Err(anyhow::anyhow!("a stream panicked")))).collect()
    });
    let mut intervals = Vec::new();
    let mut longest = Vec::new();
    let mut first = None::<Instant>;
    let mut last = None::<Instant>;
    let mut frames_out = 0usize;
    let mut shared_calls = 0;
    let mut sessions = Vec::new();
    for result in results {
        let (times, session) = result?;
        shared_calls += session.shared_calls();
        sessions.push(session);
        let gaps: Vec<f64> = times.windows(2).map(|w| (w[1] - w[0]).as_secs_f64() * 1e3).collect();
        intervals.push(if gaps.is_empty() { f64::NAN } else { median(&gaps) });
        longest.push(gaps.iter().copied().fold(f64::NAN, f64::max));
        if let (Some(&a), Some(&b)) = (times.first(), times.last()) {
            first = Some(first.map_or(a, |f| f.min(a)));
            last = Some(last.map_or(b, |l| l.max(b)));
            // Frames after each stream's first timed one (intervals, not endpoints).
            frames_out += times.len() - 1;
        }
    }
    let span = match (first, last) {
        (Some(a), Some(b)) if b > a => (b - a).as_secs_f64(),
        _ => bail!("too few timed frames: use --runs 3 or more"),
    };
    // While every stream still holds its models and graphs.
    let device_used = probe.map(|p| p.device_used().map(|(used, _)| used)).transpose()?.unwrap_or(0);
    let breakdown = probe.map(|p| p.breakdown()).transpose()?.unwrap_or_default();
    if let Some(session) = sessions.first() {
        session.stylizer().device().synchronize()?;
    }
    probe.map(Probe::trim).transpose()?;
    let trimmed = probe.map(|p| p.breakdown()).transpose()?.unwrap_or_default();
    let store_bytes = sessions.iter().map(|s| s.attention().stored_bytes()).sum();
    let store_held_bytes = sessions.iter().map(|s| s.attention().held_bytes()).sum();
    drop(sessions);
    Ok(Outcome {
        aggregate_fps: frames_out as f64 / span,
        intervals,
        longest,
        shared_calls,
        device_used,
        breakdown,
        trimmed,
        store_bytes,
        store_held_bytes,
    })
}

fn mib(bytes: usize) -> f64 {
    bytes as f64 / (1u64 << 20) as f64
}
