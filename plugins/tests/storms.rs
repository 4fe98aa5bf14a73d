//! Fault storms (issue 16, part 3), tiny model on the CPU, with and without the stream batch:
//! flushing seeks during playback, state cycles with frames in flight, caps renegotiation every
//! few frames, property changes from another thread every frame, EOS while frames are in
//! flight. Each test runs under a watchdog (a hang aborts the test binary with a message) and
//! with GLib warnings and criticals fatal (common::init).

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use gst::prelude::*;
use gst_check::Harness;
use sdcrossframe::frame::RgbFrame;

use common::{Watchdog, buffer, fixture, init};

const FRAME_NS: u64 = 1_000_000_000 / 30;

/// The frame number of a 30 fps timestamp (videotestsrc's are frame * 10^9 / 30, rounded down).
fn frame_of(pts: gst::ClockTime) -> u64 {
    (pts.nseconds() * 30 + 500_000_000) / 1_000_000_000
}

fn tiny(extra: &str) -> String {
    format!(
        "sdcrossframe name=sd model={} controlnet={} prompt=\"a watercolor painting\" steps=4 strength=1.0 width=96 height=64 {extra}",
        fixture("tiny-sd").display(),
        fixture("tiny-controlnet").display()
    )
}

/// A pipeline from videotestsrc through the tiny element into an appsink that records the
/// PTS (in frames) of every buffer it gets, cleared at every flush.
fn pipeline(extra: &str) -> (gst::Pipeline, Arc<Mutex<Vec<u64>>>) {
    let pipeline = gst::parse::launch(&format!(
        "videotestsrc pattern=ball ! video/x-raw,format=RGB,width=96,height=64,framerate=30/1 ! {} \
         ! appsink name=out sync=false",
        tiny(extra)
    ))
    .unwrap()
    .downcast::<gst::Pipeline>()
    .unwrap();
    let seen: Arc<Mutex<Vec<u64>>> = Arc::default();
    let sink = pipeline.by_name("out").unwrap();
    let pad = sink.static_pad("sink").unwrap();
    let record = seen.clone();
    pad.add_probe(gst::PadProbeType::BUFFER | gst::PadProbeType::EVENT_FLUSH, move |_, info| {
        match &info.data {
            Some(gst::PadProbeData::Buffer(b)) => {
                record.lock().unwrap().push(frame_of(b.pts().unwrap()));
            }
            Some(gst::PadProbeData::Event(e)) if e.type_() == gst::EventType::FlushStop => {
                record.lock().unwrap().clear();
            }
            _ => {}
        }
        gst::PadProbeReturn::Ok
    });
    let appsink = sink.downcast::<gst_app::AppSink>().unwrap();
    appsink.set_callbacks(
        gst_app::AppSinkCallbacks::builder()
            .new_sample(|s| s.pull_sample().map(|_| gst::FlowSuccess::Ok).map_err(|_| gst::FlowError::Eos))
            .build(),
    );
    (pipeline, seen)
}

fn seek(pipeline: &gst::Pipeline, start_frame: u64, stop_frame: u64) {
    // Just after the start frame's timestamp (videotestsrc starts at the frame whose time the
    // start rounds down to), and just before the stop frame's.
    let start = (start_frame * 1_000_000_000).div_ceil(30);
    let stop = (stop_frame * 1_000_000_000 / 30).saturating_sub(1);
    pipeline
        .seek(
            1.0,
            gst::SeekFlags::FLUSH | gst::SeekFlags::ACCURATE,
            gst::SeekType::Set,
            gst::ClockTime::from_nseconds(start),
            gst::SeekType::Set,
            gst::ClockTime::from_nseconds(stop),
        )
        .expect("seek");
}

/// Waits for EOS; any error message fails.
fn wait_for_eos(pipeline: &gst::Pipeline, limit_s: u64) {
    let bus = pipeline.bus().unwrap();
    let message = bus
        .timed_pop_filtered(gst::ClockTime::from_seconds(limit_s), &[gst::MessageType::Eos, gst::MessageType::Error])
        .expect("EOS in time");
    if let gst::MessageView::Error(e) = message.view() {
        panic!("pipeline error: {} ({:?})", e.error(), e.debug());
    }
}

/// 100 flushing seeks while frames flow, then a last seek to frames 20..40: exactly those 20
/// frames come out, in order, once each (the frames in flight at each flush are dropped).
#[test]
fn hundred_flushing_seeks_during_playback() {
    init();
    for stream_batch in ["false", "true"] {
        let _watchdog = Watchdog::new("flushing seeks", Duration::from_secs(300));
        let (pipeline, seen) = pipeline(&format!("stream-batch={stream_batch}"));
        pipeline.set_state(gst::State::Paused).unwrap();
        assert_eq!(pipeline.state(gst::ClockTime::from_seconds(60)).0, Ok(gst::StateChangeSuccess::Success));
        seek(&pipeline, 0, 1000);
        pipeline.set_state(gst::State::Playing).unwrap();
        for k in 0..100u64 {
            std::thread::sleep(Duration::from_millis(5 + (k * 7) % 20));
            seek(&pipeline, (k * 13) % 200, 1000);
        }
        seek(&pipeline, 20, 40);
        wait_for_eos(&pipeline, 120);
        pipeline.set_state(gst::State::Null).unwrap();
        let frames = seen.lock().unwrap().clone();
        assert_eq!(frames, (20..40).collect::<Vec<_>>(), "stream-batch={stream_batch}: frames after the last seek");
    }
}

/// 100 cycles PLAYING -> PAUSED -> READY -> NULL with frames in flight (stream batch on: up to
/// three held); then a clean run gives every frame.
#[test]
fn hundred_state_cycles_with_frames_in_flight() {
    init();
    let _watchdog = Watchdog::new("state cycles", Duration::from_secs(600));
    let (cycled, _) = pipeline("stream-batch=true");
    let bus = cycled.bus().unwrap();
    for k in 0..100u64 {
        cycled.set_state(gst::State::Playing).unwrap();
        std::thread::sleep(Duration::from_millis(20 + (k * 11) % 60));
        for state in [gst::State::Paused, gst::State::Ready, gst::State::Null] {
            cycled.set_state(state).unwrap();
            let (result, now, _) = cycled.state(gst::ClockTime::from_seconds(30));
            assert!(result.is_ok() && now == state, "cycle {k}: {state:?} not reached ({result:?}, {now:?})");
        }
        if let Some(m) = bus.pop_filtered(&[gst::MessageType::Error]) {
            panic!("cycle {k}: error {m:?}");
        }
    }
    let (pipeline, seen) = pipeline("stream-batch=true");
    pipeline.set_state(gst::State::Paused).unwrap();
    pipeline.state(gst::ClockTime::from_seconds(60)).0.unwrap();
    seek(&pipeline, 0, 12);
    pipeline.set_state(gst::State::Playing).unwrap();
    wait_for_eos(&pipeline, 120);
    pipeline.set_state(gst::State::Null).unwrap();
    assert_eq!(*seen.lock().unwrap(), (0..12).collect::<Vec<_>>());
}

/// The frame size and pixel format change every three frames (a caps event each time):
/// every buffer comes out once, in order, at its own size, with stream batch and without.
#[test]
fn caps_renegotiation_every_three_frames() {
    init();
    let _watchdog = Watchdog::new("caps renegotiation", Duration::from_secs(300));
    let frame = |k: usize| RgbFrame::load(&fixture(&format!("reference/img2img/frame_{}.png", k % 8))).unwrap();
    let shapes = [
        (gst_video::VideoFormat::Rgb, 96, 64),
        (gst_video::VideoFormat::Bgrx, 64, 96),
        (gst_video::VideoFormat::Rgba, 120, 80),
    ];
    for stream_batch in ["false", "true"] {
        let element = gst::parse::bin_from_description(&tiny(&format!("stream-batch={stream_batch}")), false)
            .unwrap()
            .by_name("sd")
            .unwrap();
        element.set_property_from_str("width", "64");
        element.set_property_from_str("height", "0");
        let mut h = Harness::with_element(&element, Some("sink"), Some("src"));
        let mut sent = Vec::new();
        for k in 0..18usize {
            let (format, w, hgt) = shapes[(k / 3) % shapes.len()];
            let rgb = frame(k).resized(w, hgt).unwrap();
            let (buf, info) = buffer(&rgb, format, 40 * k as u64);
            if k % 3 == 0 {
                h.set_src_caps(info.to_caps().unwrap());
            }
            assert_eq!(h.push(buf), Ok(gst::FlowSuccess::Ok), "stream-batch={stream_batch}, frame {k}");
            sent.push((40 * k as u64, w, hgt));
        }
        assert!(h.push_event(gst::event::Eos::new()));
        let mut got = Vec::new();
        while let Some(b) = h.try_pull() {
            got.push(b);
        }
        assert_eq!(got.len(), sent.len(), "stream-batch={stream_batch}: one buffer out per buffer in");
        for (b, (pts, w, hgt)) in got.iter().zip(&sent) {
            assert_eq!(b.pts().unwrap().mseconds(), *pts, "stream-batch={stream_batch}: in order");
            let (format, _, _) = shapes.iter().find(|s| (s.1, s.2) == (*w, *hgt)).unwrap();
            let expected = gst_video::VideoInfo::builder(*format, *w as u32, *hgt as u32).build().unwrap().size();
            assert_eq!(b.size(), expected, "stream-batch={stream_batch}: frame at {pts} ms has its own size");
        }
    }
}

/// Prompt, strength, attention mode and scheduler changed from another thread at every frame:
/// every frame comes out, no deadlock, no error.
#[test]
fn property_changes_from_another_thread_every_frame() {
    init();
    for stream_batch in ["false", "true"] {
        let _watchdog = Watchdog::new("property changes", Duration::from_secs(300));
        let (pipeline, seen) = pipeline(&format!("stream-batch={stream_batch}"));
        let element = pipeline.by_name("sd").unwrap();
        pipeline.set_state(gst::State::Paused).unwrap();
        pipeline.state(gst::ClockTime::from_seconds(60)).0.unwrap();
        seek(&pipeline, 0, 40);
        let stop = Arc::new(AtomicBool::new(false));
        let changer = {
            let (element, stop) = (element.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut k = 0u32;
                while !stop.load(Ordering::SeqCst) {
                    element.set_property("prompt", format!("prompt {k}"));
                    element.set_property("strength", [1.0f64, 0.75, 0.5][k as usize % 3]);
                    element.set_property_from_str("attention", ["first+prev", "first", "prev", "off"][k as usize % 4]);
                    element.set_property_from_str("scheduler", ["ddim", "lcm", "auto"][k as usize % 3]);
                    k += 1;
                    std::thread::sleep(Duration::from_millis(3));
                }
            })
        };
        pipeline.set_state(gst::State::Playing).unwrap();
        wait_for_eos(&pipeline, 240);
        stop.store(true, Ordering::SeqCst);
        changer.join().unwrap();
        pipeline.set_state(gst::State::Null).unwrap();
        assert_eq!(*seen.lock().unwrap(), (0..40).collect::<Vec<_>>(), "stream-batch={stream_batch}");
    }
}

/// EOS right after frames are pushed (frames still denoising or held in the stream batch):
/// every frame comes out before the EOS.
#[test]
fn eos_with_frames_in_flight() {
    init();
    let _watchdog = Watchdog::new("EOS in flight", Duration::from_secs(120));
    for stream_batch in ["false", "true"] {
        let pipeline = gst::parse::launch(&format!(
            "appsrc name=in format=time caps=video/x-raw,format=RGB,width=96,height=64,framerate=30/1 ! {} ! appsink name=out sync=false",
            tiny(&format!("stream-batch={stream_batch}"))
        ))
        .unwrap()
        .downcast::<gst::Pipeline>()
        .unwrap();
        let src = pipeline.by_name("in").unwrap().downcast::<gst_app::AppSrc>().unwrap();
        let sink = pipeline.by_name("out").unwrap().downcast::<gst_app::AppSink>().unwrap();
        pipeline.set_state(gst::State::Playing).unwrap();
        for k in 0..5u64 {
            let rgb = RgbFrame::load(&fixture(&format!("reference/img2img/frame_{k}.png"))).unwrap();
            let mut b = gst::Buffer::from_slice(rgb.data.clone());
            b.get_mut().unwrap().set_pts(gst::ClockTime::from_nseconds(k * FRAME_NS));
            src.push_buffer(b).unwrap();
        }
        src.end_of_stream().unwrap();
        let mut pts = Vec::new();
        while let Some(sample) = sink.try_pull_sample(gst::ClockTime::from_seconds(60)) {
            pts.push(frame_of(sample.buffer().unwrap().pts().unwrap()));
        }
        assert!(sink.is_eos(), "stream-batch={stream_batch}: EOS reached the sink");
        pipeline.set_state(gst::State::Null).unwrap();
        assert_eq!(pts, vec![0, 1, 2, 3, 4], "stream-batch={stream_batch}");
    }
}
