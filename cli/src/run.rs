//! `sdcrossframe run FILE.pipeline KEY=value ...`: runs a launch-string file from
//! `pipelines/` with its variables filled in, shows progress (frames and time left for
//! files; for live sources the element's output rate, each frame's latency through it and
//! the drops, counted by [`LiveStats`]; with several elements one line per element and the
//! total), turns Ctrl-C into EOS so files are finalized, and fails with the bus's error text.

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
use crate::live_stats::{LiveStats, Totals};

/// The element whose frames the progress counts.
const ELEMENT: &str = "sdcrossframe";
/// How many times the same warning (same source, same text) is shown.
const REPEATED_WARNINGS: u32 = 2;

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
    /// Seconds between the status lines printed when stderr is not a terminal (a log, a
    /// service); on a terminal the display updates in place.
    #[arg(long, value_name = "SECONDS", default_value_t = 10.0, value_parser = positive_seconds)]
    status_interval: f64,
}

fn positive_seconds(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 => Ok(v),
        _ => Err(format!("{text:?} is not a positive number of seconds")),
    }
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
    let new_outputs = new_output_files(&pipeline);
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let label = args.file.display().to_string();
    let status_every = Duration::from_secs_f64(args.status_interval);
    let result = runtime.block_on(drive(&pipeline, &label, status_every));
    let _ = pipeline.set_state(gst::State::Null);
    if result.is_err() {
        remove_empty_outputs(&new_outputs);
    }
    result
}

/// The files the pipeline's file sinks will create (their `location` does not exist yet).
fn new_output_files(pipeline: &gst::Pipeline) -> Vec<PathBuf> {
    pipeline
        .iterate_recurse()
        .into_iter()
        .flatten()
        .filter(|e| e.factory().is_some_and(|f| f.name() == "filesink"))
        .filter_map(|sink| sink.property::<Option<String>>("location"))
        .map(PathBuf::from)
        .filter(|path| !path.exists())
        .collect()
}

/// After a failed run: removes the output files this run created and left empty (the file
/// sink opens its file before the first frame, e.g. when the model then fails to load), and
/// says so.
fn remove_empty_outputs(created: &[PathBuf]) {
    for path in created {
        if std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.len() == 0) {
            match std::fs::remove_file(path) {
                Ok(()) => eprintln!("removed the empty output file {} (nothing was written to it)", path.display()),
                Err(e) => eprintln!("could not remove the empty output file {}: {e}", path.display()),
            }
        }
    }
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

/// The time since `clock`, the zero of a run's [`LiveStats`] times.
fn since(clock: Instant) -> Duration {
    clock.elapsed()
}

/// Counts buffers entering and leaving the element, by PTS: a frame's latency is the time
/// from its buffer on the sink pad to the buffer with the same PTS on the src pad (the
/// element may hold frames: one with `overlap`, more with a stream batch); a frame that
/// never leaves (a QoS drop) is a drop once a later frame has left.
fn watch_element(element: &gst::Element, stats: &Arc<Mutex<LiveStats>>, clock: Instant) {
    let (Some(sink), Some(src)) = (element.static_pad("sink"), element.static_pad("src")) else {
        return;
    };
    let probe_types = gst::PadProbeType::BUFFER | gst::PadProbeType::BUFFER_LIST;
    let in_stats = stats.clone();
    sink.add_probe(probe_types, move |_, info| {
        let at = since(clock);
        let mut stats = in_stats.lock().unwrap();
        for_each_pts(info, |pts| stats.entered(pts, at));
        gst::PadProbeReturn::Ok
    });
    let out_stats = stats.clone();
    src.add_probe(probe_types, move |_, info| {
        let at = since(clock);
        let mut stats = out_stats.lock().unwrap();
        for_each_pts(info, |pts| stats.left(pts, at));
        gst::PadProbeReturn::Ok
    });
}

/// The PTS (nanoseconds) of the probed buffer, or of each buffer of a probed list.
fn for_each_pts(info: &gst::PadProbeInfo, mut f: impl FnMut(Option<u64>)) {
    if let Some(buffer) = info.buffer() {
        f(buffer.pts().map(gst::ClockTime::nseconds));
    } else if let Some(list) = info.buffer_list() {
        for buffer in list.iter() {
            f(buffer.pts().map(gst::ClockTime::nseconds));
        }
    }
}

/// Counts the frames that leaky queues upstream of `element` drop: a `queue` with `leaky`
/// set emits `overrun` when it is full and then drops its oldest item (a frame, with the
/// usual `max-size-buffers=1`). Queues with `silent=true` emit nothing and are not counted;
/// nor are queues inside bins, nor those in `seen` (a queue before a tee feeding several
/// elements counts for the first). Returns how many queues are watched.
fn watch_leaky_queues(element: &gst::Element, stats: &Arc<Mutex<LiveStats>>, seen: &mut Vec<gst::Element>) -> usize {
    let mut watched = 0;
    for queue in upstream_elements(element) {
        if !queue.factory().is_some_and(|f| f.name() == "queue") || queue.property::<bool>("silent") {
            continue;
        }
        if seen.contains(&queue) {
            continue;
        }
        seen.push(queue.clone());
        let leaky = queue.property_value("leaky");
        if gst::glib::EnumValue::from_value(&leaky).is_none_or(|(_, value)| value.nick() == "no") {
            continue;
        }
        let stats = stats.clone();
        queue.connect("overrun", false, move |_| {
            stats.lock().unwrap().queue_overruns += 1;
            None
        });
        watched += 1;
    }
    watched
}

/// The elements linked upstream of `element` (through its sink pads' peers), as linked now.
fn upstream_elements(element: &gst::Element) -> Vec<gst::Element> {
    linked_elements(element, gst::PadDirection::Sink)
}

/// The elements linked to `element` through its pads of `direction`'s peers, and theirs, as
/// linked now (upstream for sink pads, downstream for src pads).
fn linked_elements(element: &gst::Element, direction: gst::PadDirection) -> Vec<gst::Element> {
    let mut found: Vec<gst::Element> = Vec::new();
    let mut todo = vec![element.clone()];
    while let Some(current) = todo.pop() {
        let pads = if direction == gst::PadDirection::Sink { current.sink_pads() } else { current.src_pads() };
        for pad in pads {
            if let Some(up) = pad.peer().and_then(|peer| peer.parent_element())
                && up != *element
                && !found.contains(&up)
                && found.len() < 256
            {
                found.push(up.clone());
                todo.push(up);
            }
        }
    }
    found
}

/// Which of `elements` another element's drops belong to: the one element linked upstream or
/// downstream of it (a sink after it, a converter before it); the first when it is linked
/// to several (a source feeding all of them) or to none.
fn owner(source: &gst::Element, elements: &[gst::Element]) -> usize {
    let mut linked = linked_elements(source, gst::PadDirection::Sink);
    linked.extend(linked_elements(source, gst::PadDirection::Src));
    let mut owners = elements.iter().enumerate().filter(|(_, e)| linked.contains(e)).map(|(i, _)| i);
    match (owners.next(), owners.next()) {
        (Some(only), None) => only,
        _ => 0,
    }
}

/// The latency the pipeline runs with: the one set on it, else the latency query's minimum
/// (what the bin distributes to the sinks); `None` when not live.
fn pipeline_latency(pipeline: &gst::Pipeline) -> Option<Duration> {
    if let Some(latency) = pipeline.latency() {
        return Some(Duration::from_nanos(latency.nseconds()));
    }
    let mut query = gst::query::Latency::new();
    if !pipeline.query(&mut query) {
        return None;
    }
    let (live, min, _) = query.result();
    live.then(|| Duration::from_nanos(min.nseconds()))
}

/// The element's frame count: the duration of what feeds it (asked upstream of it, else the
/// pipeline's: with several inputs the longest) times its frame rate.
fn expected_frames(pipeline: &gst::Pipeline, element: Option<&gst::Element>) -> Option<u64> {
    let sink = element?.static_pad("sink")?;
    let duration =
        sink.peer_query_duration::<gst::ClockTime>().or_else(|| pipeline.query_duration::<gst::ClockTime>())?;
    let caps = sink.current_caps()?;
    let s = caps.structure(0)?;
    let rate = s.get::<gst::Fraction>("framerate").ok()?;
    if rate.numer() <= 0 || rate.denom() <= 0 {
        return None;
    }
    let frames = duration.nseconds() as u128 * rate.numer() as u128 / (rate.denom() as u128 * 1_000_000_000);
    Some(frames as u64)
}

async fn drive(pipeline: &gst::Pipeline, label: &str, status_every: Duration) -> Result<ExitCode> {
    // Armed before the pipeline starts, so an early Ctrl-C also ends it cleanly. SIGTERM
    // (service managers, `kill`) finishes the output the same way.
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    let clock = Instant::now();
    let mut elements: Vec<gst::Element> = pipeline
        .iterate_recurse()
        .into_iter()
        .filter_map(|e| e.ok())
        .filter(|e| e.factory().is_some_and(|f| f.name() == ELEMENT))
        .collect();
    // A bin lists its newest child first: this is the launch line's order.
    elements.reverse();
    // One count per element, with the leaky queues before it and (see count_qos) the drops
    // of the sinks after it; with several elements the display shows each by name and the
    // total.
    let names: Vec<String> = elements.iter().map(|e| e.name().to_string()).collect();
    let stats: Vec<Arc<Mutex<LiveStats>>> =
        elements.iter().map(|_| Arc::new(Mutex::new(LiveStats::default()))).collect();
    let mut watched_queues = Vec::new();
    for (element, stats) in elements.iter().zip(&stats) {
        watch_element(element, stats, clock);
        let queues = watch_leaky_queues(element, stats, &mut watched_queues);
        stats.lock().unwrap().leaky_queues = queues;
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
    let mut warnings: BTreeMap<String, u32> = BTreeMap::new();
    let outcome = loop {
        tokio::select! {
            message = messages.next() => {
                let Some(message) = message else { break Err(anyhow!("the pipeline's bus closed")) };
                use gst::MessageView;
                match message.view() {
                    MessageView::Eos(_) => break Ok(ExitCode::SUCCESS),
                    MessageView::Error(_) => break Err(anyhow!("{}", describe_error(&message))),
                    MessageView::Warning(w) => {
                        let text = format!("warning from {}: {}", source_name(&message), w.error());
                        // A sink that drops frames as late says so again and again.
                        let seen = warnings.entry(text.clone()).or_insert(0);
                        *seen += 1;
                        if *seen <= REPEATED_WARNINGS {
                            say(&bar, text);
                        } else if *seen == REPEATED_WARNINGS + 1 {
                            say(&bar, format!("{text} (again; further repeats not shown)"));
                        }
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
                    MessageView::Qos(_) => count_qos(&message, &elements, &stats),
                    MessageView::Latency(_) => {
                        let _ = pipeline.recalculate_latency();
                        if live {
                            set_pipeline_latency(&stats, pipeline_latency(pipeline));
                        }
                    }
                    MessageView::StateChanged(s)
                        if live && s.current() == gst::State::Playing
                            && message.src() == Some(pipeline.upcast_ref()) =>
                    {
                        set_pipeline_latency(&stats, pipeline_latency(pipeline));
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
                if !live && !length_known && !elements.is_empty() {
                    // Every element's frame count, once each is known.
                    let counts: Option<Vec<u64>> =
                        elements.iter().map(|e| expected_frames(pipeline, Some(e))).collect();
                    if let Some(counts) = counts {
                        bar.set_length(counts.iter().sum());
                        length_known = true;
                    }
                }
                if stats.is_empty() {
                    continue;
                }
                let now = since(clock);
                let guards: Vec<_> = stats.iter().map(|s| s.lock().unwrap()).collect();
                let each: Vec<&LiveStats> = guards.iter().map(|g| &**g).collect();
                let total = Totals::new(each.iter().copied());
                let frames_out = total.frames_out();
                bar.set_position(frames_out);
                // Live: rate, latency and drops, once frames come out (until then the
                // message is the model's loading progress); several elements: the total and
                // one line per element. Files keep the bar; the plain status line adds the
                // rate (each element's with several).
                let lines: Vec<String> = if live && each.len() > 1 {
                    let names: Vec<&str> = names.iter().map(String::as_str).collect();
                    Totals::status_lines(&names, &each, now)
                } else if live {
                    vec![each[0].status(now)]
                } else if each.len() > 1 {
                    let rates: Vec<String> = names
                        .iter()
                        .zip(&each)
                        .map(|(name, s)| format!("{name} {}", s.rolling_fps(now).map(|f| format!("{f:.1} fps")).unwrap_or("-- fps".into())))
                        .collect();
                    vec![rates.join(", ")]
                } else {
                    vec![each[0].rolling_fps(now).map(|fps| format!("{fps:.1} fps")).unwrap_or_default()]
                };
                let several = each.len() > 1;
                drop(total);
                drop(each);
                drop(guards);
                if (live || several) && frames_out > 0 {
                    bar.set_message(lines.join("\n"));
                }
                if plain_status && last_status.elapsed() >= status_every {
                    last_status = Instant::now();
                    let total = if length_known { format!("/{}", bar.length().unwrap_or(0)) } else { String::new() };
                    let first = if lines[0].is_empty() { String::new() } else { format!(": {}", lines[0]) };
                    eprintln!("{frames_out}{total} frames after {:.0} s{first}", started.elapsed().as_secs_f64());
                    for line in &lines[1..] {
                        eprintln!("  {line}");
                    }
                }
            }
        }
    };
    let frames_out: u64 = stats.iter().map(|s| s.lock().unwrap().frames_out).sum();
    bar.set_position(frames_out);
    bar.finish_and_clear();
    let elapsed = started.elapsed();
    if !elements.is_empty() && (outcome.is_ok() || frames_out > 0) {
        for (element, stats) in elements.iter().zip(&stats) {
            let summary = stats.lock().unwrap().summary(elapsed, live);
            if elements.len() > 1 {
                eprintln!("{}: {summary}", element.name());
            } else {
                eprintln!("{summary}");
            }
        }
        if elements.len() > 1 {
            let guards: Vec<_> = stats.iter().map(|s| s.lock().unwrap()).collect();
            eprintln!("{}", Totals::new(guards.iter().map(|g| &**g)).summary(elapsed));
        }
    }
    if live {
        for line in sink_statistics(pipeline) {
            eprintln!("{line}");
        }
    }
    outcome
}

/// A QoS message counts as a drop by the sdcrossframe element that posted it (BaseTransform
/// posts one per frame it drops as late), or by a sink (one per frame it drops as late), or
/// by another element (filters with QoS on, such as videoconvert, drop late frames too;
/// counted by name). A sink's or other element's drop goes to the element it is linked
/// with (see [`owner`]).
fn count_qos(message: &gst::Message, elements: &[gst::Element], stats: &[Arc<Mutex<LiveStats>>]) {
    let Some(source) = message.src().and_then(|s| s.downcast_ref::<gst::Element>()) else {
        return;
    };
    if stats.is_empty() {
        return;
    }
    if let Some(i) = elements.iter().position(|e| e == source) {
        stats[i].lock().unwrap().qos_element += 1;
    } else if source.element_flags().contains(gst::ElementFlags::SINK) && !source.is::<gst::Bin>() {
        stats[owner(source, elements)].lock().unwrap().qos_sinks += 1;
    } else {
        let mut stats = stats[owner(source, elements)].lock().unwrap();
        *stats.qos_other.entry(source.name().to_string()).or_insert(0) += 1;
    }
}

fn set_pipeline_latency(stats: &[Arc<Mutex<LiveStats>>], latency: Option<Duration>) {
    for stats in stats {
        stats.lock().unwrap().pipeline_latency = latency;
    }
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
