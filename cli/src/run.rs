//! `sdcrossframe run FILE.pipeline KEY=value ...`: runs a launch-string file from
//! `pipelines/` with its variables filled in, shows progress (frames and time left for
//! files, per-frame latency for live sources), turns Ctrl-C into EOS so files are
//! finalized, and fails with the bus's error text.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use clap::Args;
use futures_util::StreamExt;
use gst::prelude::*;
use indicatif::{ProgressBar, ProgressStyle};
use tokio::signal::unix::{SignalKind, signal};

use crate::launch_file::LaunchFile;

/// The element whose frames the progress counts.
const ELEMENT: &str = "sdcrossframe";
/// How often progress is printed as a line when stderr is not a terminal.
const PLAIN_STATUS_EVERY: Duration = Duration::from_secs(10);

#[derive(Args)]
pub struct RunArgs {
    /// A launch-string file, e.g. pipelines/file-to-mp4.pipeline; its header lists the
    /// variables it takes.
    file: PathBuf,
    /// Values for the file's variables: KEY=value (INPUT=in.mp4, or input=in.mp4).
    #[arg(value_name = "KEY=VALUE")]
    assignments: Vec<String>,
    /// Print the launch line that would run, and exit.
    #[arg(long)]
    print: bool,
    /// Describe the file (its header comment) and exit.
    #[arg(long)]
    describe: bool,
}

pub fn run(args: RunArgs) -> Result<ExitCode> {
    let file = LaunchFile::read(&args.file)?;
    if args.describe {
        print!("{}", file.header);
        return Ok(ExitCode::SUCCESS);
    }
    let mut values = BTreeMap::new();
    for assignment in &args.assignments {
        let Some((key, value)) = assignment.split_once('=') else {
            bail!("expected KEY=value, got {assignment:?}");
        };
        values.insert(key.to_string(), value.to_string());
    }
    let line = file
        .substitute(&values, |name| std::env::var(name).ok())
        .with_context(|| format!("cannot fill in {}", args.file.display()))?;
    if args.print {
        println!("{line}");
        return Ok(ExitCode::SUCCESS);
    }

    gst::init().context("cannot initialise GStreamer")?;
    find_plugin_beside_executable();
    let pipeline = build_pipeline(&line)?;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let label = args.file.display().to_string();
    let result = runtime.block_on(drive(&pipeline, &label));
    let _ = pipeline.set_state(gst::State::Null);
    result
}

/// `cargo build --release --workspace` puts the plugin next to this binary: use it when
/// GST_PLUGIN_PATH and the installed plugins do not have the element.
fn find_plugin_beside_executable() {
    if gst::ElementFactory::find(ELEMENT).is_some() {
        return;
    }
    if let Some(dir) = std::env::current_exe().ok().and_then(|exe| exe.parent().map(|d| d.to_path_buf())) {
        tracing::debug!("scanning {} for the plugin", dir.display());
        gst::Registry::get().scan_path(&dir);
    }
}

fn build_pipeline(line: &str) -> Result<gst::Pipeline> {
    let element = gst::parse::launch(line).map_err(|e| {
        let mut text = format!("cannot build the pipeline: {e}");
        if e.message().contains(ELEMENT) && gst::ElementFactory::find(ELEMENT).is_none() {
            text.push_str(
                "\nthe sdcrossframe plugin is not installed: build it (cargo build --release --workspace) \
                 or point GST_PLUGIN_PATH at the directory holding libgstsdcrossframe.so",
            );
        }
        anyhow!("{text}\nlaunch line: {line}")
    })?;
    match element.downcast::<gst::Pipeline>() {
        Ok(pipeline) => Ok(pipeline),
        Err(element) => {
            let pipeline = gst::Pipeline::new();
            pipeline.add(&element)?;
            Ok(pipeline)
        }
    }
}

/// Frames through the sdcrossframe element(s) and the time each spent in it.
#[derive(Default)]
struct FrameStats {
    frames_in: u64,
    frames_out: u64,
    entered: Option<Instant>,
    last_latency: Option<Duration>,
    total_latency: Duration,
}

impl FrameStats {
    fn mean_latency(&self) -> Option<Duration> {
        (self.frames_out > 0).then(|| self.total_latency / self.frames_out as u32)
    }
}

/// Counts buffers entering and leaving the element. The element works on one buffer at a
/// time inside its chain function, so the time from the sink probe to the src probe is
/// the frame's processing time; a frame dropped under QoS never reaches the src pad.
fn watch_element(element: &gst::Element, stats: &Arc<Mutex<FrameStats>>) {
    let (Some(sink), Some(src)) = (element.static_pad("sink"), element.static_pad("src")) else {
        return;
    };
    let in_stats = stats.clone();
    sink.add_probe(gst::PadProbeType::BUFFER, move |_, _| {
        let mut stats = in_stats.lock().unwrap();
        stats.frames_in += 1;
        stats.entered = Some(Instant::now());
        gst::PadProbeReturn::Ok
    });
    let out_stats = stats.clone();
    src.add_probe(gst::PadProbeType::BUFFER, move |_, _| {
        let mut stats = out_stats.lock().unwrap();
        stats.frames_out += 1;
        if let Some(entered) = stats.entered.take() {
            let latency = entered.elapsed();
            stats.last_latency = Some(latency);
            stats.total_latency += latency;
        }
        gst::PadProbeReturn::Ok
    });
}

/// The stream's frame count, from the pipeline's duration and the element's frame rate.
fn expected_frames(pipeline: &gst::Pipeline, element: Option<&gst::Element>) -> Option<u64> {
    let duration = pipeline.query_duration::<gst::ClockTime>()?;
    let caps = element?.static_pad("sink")?.current_caps()?;
    let s = caps.structure(0)?;
    let rate = s.get::<gst::Fraction>("framerate").ok()?;
    if rate.numer() <= 0 || rate.denom() <= 0 {
        return None;
    }
    let frames = duration.nseconds() as u128 * rate.numer() as u128 / (rate.denom() as u128 * 1_000_000_000);
    Some(frames as u64)
}

async fn drive(pipeline: &gst::Pipeline, label: &str) -> Result<ExitCode> {
    // Armed before the pipeline starts, so an early Ctrl-C also ends it cleanly. SIGTERM
    // (service managers, `kill`) finishes the output the same way.
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    let stats = Arc::new(Mutex::new(FrameStats::default()));
    let elements: Vec<gst::Element> = pipeline
        .iterate_recurse()
        .into_iter()
        .filter_map(|e| e.ok())
        .filter(|e| e.factory().is_some_and(|f| f.name() == ELEMENT))
        .collect();
    for element in &elements {
        watch_element(element, &stats);
    }
    let bus = pipeline.bus().context("the pipeline has no bus")?;
    let mut messages = bus.stream();

    // PAUSED first, as gst-launch does: only that transition says whether the source is live.
    let started = pipeline.set_state(gst::State::Paused).and_then(|paused| {
        pipeline.set_state(gst::State::Playing)?;
        Ok(paused)
    });
    let live = match started {
        Ok(gst::StateChangeSuccess::NoPreroll) => true,
        Ok(_) => false,
        Err(_) => {
            // The reason is on the bus.
            let first_error = async {
                while let Some(message) = messages.next().await {
                    if let gst::MessageView::Error(_) = message.view() {
                        return Some(describe_error(&message));
                    }
                }
                None
            };
            let text = tokio::time::timeout(Duration::from_secs(2), first_error).await.ok().flatten();
            bail!("{}", text.unwrap_or_else(|| "the pipeline refused to start".into()));
        }
    };
    let bar = if live {
        ProgressBar::new_spinner().with_style(
            ProgressStyle::with_template("{spinner} {pos} frames  {elapsed}  {msg}").expect("valid template"),
        )
    } else {
        ProgressBar::new(0).with_style(
            ProgressStyle::with_template(
                "{bar:30} {pos}/{len} frames  {per_sec}  {elapsed} elapsed, {eta} left  {msg}",
            )
            .expect("valid template"),
        )
    };
    if elements.is_empty() {
        bar.set_message(format!("(no {ELEMENT} element: frames are not counted)"));
    }
    // Without a terminal the bar draws nothing: print a status line now and then instead.
    let plain_status = !std::io::stderr().is_terminal();
    let mut last_status = Instant::now();
    eprintln!("running {label} (Ctrl-C finishes the output)");
    let started = Instant::now();
    let mut ticker = tokio::time::interval(Duration::from_millis(250));
    let mut interrupts = 0;
    let mut length_known = false;
    let outcome = loop {
        tokio::select! {
            message = messages.next() => {
                let Some(message) = message else { break Err(anyhow!("the pipeline's bus closed")) };
                use gst::MessageView;
                match message.view() {
                    MessageView::Eos(_) => break Ok(ExitCode::SUCCESS),
                    MessageView::Error(_) => break Err(anyhow!("{}", describe_error(&message))),
                    MessageView::Warning(w) => {
                        say(&bar, format!("warning from {}: {}", source_name(&message), w.error()));
                    }
                    MessageView::Progress(p) => {
                        let (_, _, text) = p.get();
                        bar.set_message(text.to_string());
                    }
                    MessageView::Element(e) => {
                        if let Some(s) = e.structure().filter(|s| s.name() == "sdcrossframe-anchor") {
                            let frame = s.get::<u64>("frame").unwrap_or(0);
                            let reason = s.get::<String>("reason").unwrap_or_default();
                            if frame > 0 {
                                say(&bar, format!("frame {frame}: new cross-frame anchor ({reason})"));
                            }
                        }
                    }
                    MessageView::Latency(_) => {
                        let _ = pipeline.recalculate_latency();
                    }
                    MessageView::ClockLost(_) => {
                        let _ = pipeline.set_state(gst::State::Paused);
                        let _ = pipeline.set_state(gst::State::Playing);
                    }
                    MessageView::Buffering(b) if !live => {
                        let target = if b.percent() < 100 { gst::State::Paused } else { gst::State::Playing };
                        let _ = pipeline.set_state(target);
                    }
                    _ => {}
                }
            }
            _ = async { tokio::select! { _ = interrupt.recv() => {}, _ = terminate.recv() => {} } } => {
                interrupts += 1;
                if interrupts > 1 {
                    say(&bar, "interrupted again: stopping without finishing the output");
                    break Ok(ExitCode::from(130));
                }
                say(&bar, "interrupted: finishing the stream (Ctrl-C again to stop at once)");
                pipeline.send_event(gst::event::Eos::new());
            }
            _ = ticker.tick() => {
                if !live
                    && !length_known
                    && let Some(total) = expected_frames(pipeline, elements.first())
                {
                    bar.set_length(total);
                    length_known = true;
                }
                let stats = stats.lock().unwrap();
                bar.set_position(stats.frames_out);
                if plain_status && last_status.elapsed() >= PLAIN_STATUS_EVERY {
                    last_status = Instant::now();
                    let total = if length_known { format!("/{}", bar.length().unwrap_or(0)) } else { String::new() };
                    eprintln!("{}{total} frames after {:.0} s", stats.frames_out, started.elapsed().as_secs_f64());
                }
                if live && let (Some(last), Some(mean)) = (stats.last_latency, stats.mean_latency()) {
                    let dropped = stats.frames_in - stats.frames_out;
                    bar.set_message(format!(
                        "{} ms per frame (mean {} ms), {dropped} dropped",
                        last.as_millis(),
                        mean.as_millis()
                    ));
                }
            }
        }
    };
    let stats = stats.lock().unwrap();
    bar.set_position(stats.frames_out);
    bar.finish_and_clear();
    let elapsed = started.elapsed().as_secs_f64();
    if !elements.is_empty() && (outcome.is_ok() || stats.frames_out > 0) {
        let mean =
            stats.mean_latency().map(|m| format!(", {} ms per frame in {ELEMENT}", m.as_millis())).unwrap_or_default();
        let dropped = stats.frames_in - stats.frames_out;
        let dropped = if dropped > 0 { format!(", {dropped} dropped") } else { String::new() };
        eprintln!(
            "{} frames in {elapsed:.1} s ({:.2} fps{mean}{dropped})",
            stats.frames_out,
            stats.frames_out as f64 / elapsed.max(1e-9)
        );
    }
    if live {
        for line in sink_statistics(pipeline) {
            eprintln!("{line}");
        }
    }
    outcome
}

/// What each video sink rendered and dropped as late (GstBaseSink's `stats`): in a live
/// pipeline, the frames the viewer actually saw.
fn sink_statistics(pipeline: &gst::Pipeline) -> Vec<String> {
    pipeline
        .iterate_recurse()
        .into_iter()
        .flatten()
        // Leaf sinks only: a sink bin such as fakevideosink proxies its child's stats.
        .filter(|e| !e.is::<gst::Bin>())
        .filter(|e| e.element_flags().contains(gst::ElementFlags::SINK) && e.find_property("stats").is_some())
        .filter_map(|sink| {
            let stats = sink.property::<gst::Structure>("stats");
            let rendered = stats.get::<u64>("rendered").ok()?;
            let dropped = stats.get::<u64>("dropped").ok()?;
            Some(format!("{}: {rendered} frames rendered, {dropped} dropped as late", sink.path_string()))
        })
        .collect()
}

fn source_name(message: &gst::Message) -> String {
    message.src().map(|s| s.path_string().to_string()).unwrap_or_else(|| "the pipeline".into())
}

fn describe_error(message: &gst::Message) -> String {
    match message.view() {
        gst::MessageView::Error(e) => {
            let mut text = format!("{} (from {})", e.error(), source_name(message));
            if let Some(debug) = e.debug() {
                text.push_str(&format!("\ndetails: {debug}"));
            }
            text
        }
        _ => format!("{message:?}"),
    }
}

/// A line above the progress bar; printed also when the bar is hidden (no terminal).
fn say(bar: &ProgressBar, line: impl AsRef<str>) {
    if bar.is_hidden() {
        eprintln!("{}", line.as_ref());
    } else {
        bar.suspend(|| eprintln!("{}", line.as_ref()));
    }
}
