//! Live overload (issue 16, part 2): a live 30 fps source into the element running slower
//! than that (the tiny model on the CPU). Frames are dropped, not queued: the latency through
//! the element stays bounded, the element's `stats` property accounts for every frame, and
//! memory does not grow.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use gst::prelude::*;

use common::{fixture, init};

/// Resident memory of this process, in bytes.
fn resident_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm.split_whitespace().nth(1).and_then(|v| v.parse().ok()).unwrap_or(0);
    pages * 4096
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// As `pipelines/webcam-to-screen.pipeline` runs a camera: a leaky queue before the element.
#[test]
fn live_overload_behind_a_leaky_queue_drops_frames_and_keeps_latency_bounded() {
    live_overload("queue name=before leaky=downstream max-size-buffers=1 max-size-bytes=0 max-size-time=0", 300);
}

/// No queue: the source waits for the element, late frames are dropped by the element's QoS
/// (the sink reports them late) or the sink.
#[test]
fn live_overload_without_a_queue_keeps_latency_bounded() {
    live_overload("identity name=before", 300);
}

fn live_overload(before: &str, frames: u32) {
    init();
    let pipeline = gst::parse::launch(&format!(
        "videotestsrc is-live=true num-buffers={frames} pattern=ball \
         ! video/x-raw,format=RGB,width=96,height=64,framerate=30/1 \
         ! {before} \
         ! sdcrossframe name=sd model={} controlnet={} prompt=\"a watercolor painting\" steps=2 strength=1.0 \
             width=96 height=64 latency=300 qos=true \
         ! queue ! fakesink name=sink sync=true qos=true",
        fixture("tiny-sd").display(),
        fixture("tiny-controlnet").display()
    ))
    .unwrap()
    .downcast::<gst::Pipeline>()
    .unwrap();
    let element = pipeline.by_name("sd").unwrap();
    let queue_drops = Arc::new(Mutex::new(0u64));
    let before_element = pipeline.by_name("before").unwrap();
    if before_element.has_property("leaky") {
        let queue_drops = queue_drops.clone();
        before_element.connect("overrun", false, move |_| {
            *queue_drops.lock().unwrap() += 1;
            None
        });
    }
    // Latency through the element: a buffer's time from its sink pad to its source pad, by PTS.
    let entered: Arc<Mutex<HashMap<u64, Instant>>> = Arc::default();
    let latencies: Arc<Mutex<Vec<Duration>>> = Arc::default();
    let memory: Arc<Mutex<Vec<u64>>> = Arc::default();
    {
        let entered = entered.clone();
        element.static_pad("sink").unwrap().add_probe(gst::PadProbeType::BUFFER, move |_, info| {
            if let Some(pts) = info.buffer().and_then(|b| b.pts()) {
                entered.lock().unwrap().insert(pts.nseconds(), Instant::now());
            }
            gst::PadProbeReturn::Ok
        });
    }
    {
        let (entered, latencies, memory) = (entered.clone(), latencies.clone(), memory.clone());
        element.static_pad("src").unwrap().add_probe(gst::PadProbeType::BUFFER, move |_, info| {
            if let Some(pts) = info.buffer().and_then(|b| b.pts())
                && let Some(start) = entered.lock().unwrap().remove(&pts.nseconds())
            {
                let mut latencies = latencies.lock().unwrap();
                latencies.push(start.elapsed());
                if latencies.len() % 10 == 0 {
                    memory.lock().unwrap().push(resident_bytes());
                }
            }
            gst::PadProbeReturn::Ok
        });
    }

    pipeline.set_state(gst::State::Playing).unwrap();
    let bus = pipeline.bus().unwrap();
    // 300 frames at 30 fps are 10 s; the watchdog allows the model load and slack.
    let message =
        bus.timed_pop_filtered(gst::ClockTime::from_seconds(120), &[gst::MessageType::Eos, gst::MessageType::Error]);
    let stats = element.property::<gst::Structure>("stats");
    pipeline.set_state(gst::State::Null).unwrap();
    match message.as_ref().map(|m| m.view()) {
        Some(gst::MessageView::Eos(_)) => {}
        Some(gst::MessageView::Error(e)) => panic!("pipeline error: {}", e.error()),
        _ => panic!("no EOS within 120 s (a hang)"),
    }

    let get = |field: &str| stats.get::<u64>(field).unwrap();
    let (frames_in, frames_out, dropped) = (get("frames-in"), get("frames-out"), get("dropped"));
    let queue_drops = *queue_drops.lock().unwrap();
    let mut latencies = latencies.lock().unwrap().clone();
    latencies.sort();
    let memory = memory.lock().unwrap().clone();
    println!(
        "{frames} live frames ({before}): {queue_drops} dropped by the leaky queue, {frames_in} reached the element, \
         {frames_out} went out, {dropped} dropped by its QoS, {} in flight; latency through the element \
         p50 {:?}, p99 {:?}, max {:?} over {} frames; resident memory {:.1} MB after 10 frames out, {:.1} MB at the end",
        get("in-flight"),
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.99),
        latencies.last().unwrap(),
        latencies.len(),
        memory.first().copied().unwrap_or(0) as f64 / 1e6,
        memory.last().copied().unwrap_or(0) as f64 / 1e6,
    );
    // Every frame is accounted for: the element's counters add up, and with the queue's
    // drops they make the source's frames.
    assert_eq!(frames_out + dropped + get("in-flight"), frames_in, "the element's counters add up: {stats}");
    assert_eq!(get("in-flight"), 0, "EOS drained the element: {stats}");
    if queue_drops > 0 {
        assert_eq!(
            frames_in + queue_drops,
            frames as u64,
            "every source frame reached the element or the queue dropped it"
        );
    } else {
        assert_eq!(frames_in, frames as u64, "without a leaky queue every source frame reaches the element");
    }
    assert_eq!(latencies.len() as u64, frames_out, "every frame out was timed");
    // The element is slower than the source: frames were dropped (before or by the element),
    // or the source produced fewer (it waits for the element without a queue).
    assert!(frames_out >= 10, "only {frames_out} frames went out");
    // Bounded latency: no frame waits behind a backlog (one frame in process, one held by
    // overlap, one in the leaky queue is a few hundred ms with this model).
    let max = *latencies.last().unwrap();
    assert!(max < Duration::from_secs(3), "latency grew to {max:?}: frames are queueing");
    // Memory: flat after warm-up (allow 64 MB of allocator noise).
    if let (Some(&first), Some(&last)) = (memory.first(), memory.last()) {
        assert!(last < first + 64_000_000, "resident memory grew from {first} to {last} bytes");
    }
}
