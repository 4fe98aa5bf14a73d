//! Long run (issue 16, part 4), on demand: `cargo test --release -p gst-plugin-sdcrossframe
//! --test long_run -- --ignored --nocapture` (SDCROSSFRAME_LONG_RUN_FRAMES frames, default
//! 10000). `videotestsrc ! sdcrossframe ! fakesink` with the tiny model on the CPU; every 500
//! frames out it samples the process's resident memory and the element's cross-frame store,
//! and checks both are flat after warm-up.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Instant;

use gst::prelude::*;

use common::{fixture, init};

fn resident_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    statm.split_whitespace().nth(1).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0) * 4096
}

#[test]
#[ignore = "long: run on demand"]
fn ten_thousand_frames_with_flat_memory() {
    init();
    let frames: u64 = std::env::var("SDCROSSFRAME_LONG_RUN_FRAMES").ok().and_then(|v| v.parse().ok()).unwrap_or(10_000);
    let pipeline = gst::parse::launch(&format!(
        "videotestsrc num-buffers={frames} pattern=ball ! video/x-raw,format=RGB,width=96,height=64,framerate=30/1 \
         ! sdcrossframe name=sd model={} controlnet={} prompt=\"a watercolor painting\" steps=2 strength=1.0 \
             width=96 height=64 scene-cut-threshold=0 ! fakesink",
        fixture("tiny-sd").display(),
        fixture("tiny-controlnet").display()
    ))
    .unwrap();
    let element = pipeline.downcast_ref::<gst::Bin>().unwrap().by_name("sd").unwrap();
    let samples: Arc<Mutex<Vec<(u64, u64, u64, f64)>>> = Arc::default();
    let started = Instant::now();
    {
        let (samples, weak) = (samples.clone(), element.downgrade());
        let count = std::sync::atomic::AtomicU64::new(0);
        element.static_pad("src").unwrap().add_probe(gst::PadProbeType::BUFFER, move |_, _| {
            let out = count.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
            if out % 500 == 0
                && let Some(element) = weak.upgrade()
            {
                let stats = element.property::<gst::Structure>("stats");
                let store = stats.get::<u64>("cross-frame-bytes").unwrap_or(0);
                let sample = (out, resident_bytes(), store, started.elapsed().as_secs_f64());
                // Printed as it goes, so a run stopped early still reports.
                eprintln!(
                    "long run: {} frames out, {:.1} MB resident, store {} bytes, {:.0} s",
                    sample.0,
                    sample.1 as f64 / 1e6,
                    sample.2,
                    sample.3
                );
                samples.lock().unwrap().push(sample);
            }
            gst::PadProbeReturn::Ok
        });
    }
    pipeline.set_state(gst::State::Playing).unwrap();
    let message = pipeline
        .bus()
        .unwrap()
        .timed_pop_filtered(gst::ClockTime::from_seconds(6 * 3600), &[gst::MessageType::Eos, gst::MessageType::Error])
        .expect("EOS");
    let stats = element.property::<gst::Structure>("stats");
    pipeline.set_state(gst::State::Null).unwrap();
    assert!(matches!(message.view(), gst::MessageView::Eos(_)), "{message:?}");
    let samples = samples.lock().unwrap().clone();
    println!("frames out, resident MB, cross-frame store bytes, seconds:");
    for (n, rss, store, s) in &samples {
        println!("{n} {:.1} {store} {s:.0}", *rss as f64 / 1e6);
    }
    println!("{stats}");
    assert_eq!(stats.get::<u64>("frames-out").unwrap(), frames);
    // Flat after warm-up: the store never changes size, memory grows by less than 32 MB from
    // the second sample to the last.
    assert!(samples.iter().all(|s| s.2 == samples[0].2), "the cross-frame store changed size");
    if samples.len() >= 3 {
        let (from, to) = (samples[1].1, samples.last().unwrap().1);
        assert!(to < from + 32_000_000, "resident memory grew from {from} to {to} bytes");
    }
}
