//! Elements of one process sharing a loaded model (the `model-instance-id` property and the
//! engine's registry): equal settings load once and every element still gives the frames it
//! gives alone; distinct ids load distinct copies; an id asked for with other settings is an
//! error message naming it. Its own test binary: the load counter is process-wide, so these
//! tests take turns and no other element test loads in between.

use std::sync::{Mutex, MutexGuard};

use gst::prelude::*;
use gst_check::Harness;
use sdcrossframe::frame::RgbFrame;
use sdcrossframe::pipeline::registry;

mod common;
use common::{buffer, fixture, init, read_rgb};

const FRAMES: usize = 3;

fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

fn frame(index: usize) -> RgbFrame {
    RgbFrame::load(&fixture(&format!("reference/img2img/frame_{index}.png"))).unwrap()
}

struct Element {
    h: Harness,
    bus: gst::Bus,
}

impl Element {
    /// The tiny model at 96x64, 2 steps, then `extra` (as gst-launch would set them).
    fn new(extra: &[(&str, &str)]) -> Self {
        init();
        let element = gst::ElementFactory::make("sdcrossframe").build().unwrap();
        let model = fixture("tiny-sd");
        let controlnet = fixture("tiny-controlnet");
        let base = [
            ("model", model.to_str().unwrap()),
            ("controlnet", controlnet.to_str().unwrap()),
            ("steps", "2"),
            ("strength", "1.0"),
            ("width", "96"),
            ("height", "64"),
        ];
        for (name, value) in base.iter().chain(extra) {
            element.set_property_from_str(name, value);
        }
        let bus = gst::Bus::new();
        element.set_bus(Some(&bus));
        let h = Harness::with_element(&element, Some("sink"), Some("src"));
        Self { h, bus }
    }

    fn push(&mut self, input: &RgbFrame, pts_ms: u64) -> Result<gst::FlowSuccess, gst::FlowError> {
        let (buf, info) = buffer(input, gst_video::VideoFormat::Rgbx, pts_ms);
        if self.h.srcpad().unwrap().current_caps().is_none() {
            self.h.set_src_caps(info.to_caps().unwrap());
        }
        self.h.push(buf)
    }

    /// Pushes one frame and gets it out (a DRAIN query: overlap is on).
    fn process(&mut self, input: &RgbFrame, pts_ms: u64) -> RgbFrame {
        assert_eq!(self.push(input, pts_ms), Ok(gst::FlowSuccess::Ok));
        let sink = self.h.element().unwrap().static_pad("sink").unwrap();
        assert!(sink.query(&mut gst::query::Drain::new()), "drain query");
        let out = self.h.pull().expect("an output frame");
        let caps = self.h.sinkpad().unwrap().current_caps().unwrap();
        read_rgb(&out, &gst_video::VideoInfo::from_caps(&caps).unwrap()).0
    }

    /// The first error message on the bus: (error text, debug text).
    fn error(&self) -> (String, String) {
        loop {
            let msg = self.bus.timed_pop(gst::ClockTime::from_seconds(60)).expect("an error message within 60 s");
            if let gst::MessageView::Error(e) = msg.view() {
                return (e.error().to_string(), e.debug().map(|d| d.to_string()).unwrap_or_default());
            }
        }
    }
}

fn stream_a() -> Vec<(&'static str, &'static str)> {
    vec![("prompt", "a beautiful woman with red hair"), ("attention", "first+prev")]
}

fn stream_b() -> Vec<(&'static str, &'static str)> {
    vec![("prompt", "a watercolor city at night"), ("attention", "prev"), ("seed", "5")]
}

fn with<'a>(mut base: Vec<(&'a str, &'a str)>, extra: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
    base.extend_from_slice(extra);
    base
}

/// Input k of a stream: A reads the clip forwards, B backwards.
fn input(stream: usize, k: usize) -> RgbFrame {
    frame(if stream == 0 { k } else { 7 - k })
}

#[test]
fn elements_with_equal_settings_load_once_and_give_their_own_frames() {
    let _serial = serial();
    // Each stream alone, on a copy of its own (distinct ids: two loads for equal settings).
    let loads = registry::loads();
    let mut want = Vec::new();
    for (stream, (settings, id)) in [(stream_a(), "alone-a"), (stream_b(), "alone-b")].into_iter().enumerate() {
        let mut alone = Element::new(&with(settings, &[("model-instance-id", id)]));
        want.push((0..FRAMES).map(|k| alone.process(&input(stream, k), 40 * k as u64)).collect::<Vec<_>>());
    }
    assert_eq!(registry::loads() - loads, 2, "distinct model-instance-ids load distinct copies");
    assert_ne!(want[0][0], want[1][0], "the streams must differ for the comparison to mean anything");

    // Both at once, interleaved frame by frame, sharing by their equal model settings.
    let loads = registry::loads();
    let mut a = Element::new(&stream_a());
    let mut b = Element::new(&stream_b());
    for k in 0..FRAMES {
        assert_eq!(a.process(&input(0, k), 40 * k as u64), want[0][k], "element A frame {k}");
        assert_eq!(b.process(&input(1, k), 40 * k as u64), want[1][k], "element B frame {k}");
    }
    assert_eq!(registry::loads() - loads, 1, "two elements with equal settings load the model once");

    // A stops; B goes on with the shared copy.
    a.h.element().unwrap().set_state(gst::State::Null).unwrap();
    drop(a);
    let next = b.process(&input(1, FRAMES), 40 * FRAMES as u64);
    assert_eq!(next.width, 96);
    assert_eq!(registry::loads() - loads, 1);
}

#[test]
fn elements_with_one_id_share_and_other_settings_under_it_are_an_error_naming_it() {
    let _serial = serial();
    let loads = registry::loads();
    let mut first = Element::new(&with(stream_a(), &[("model-instance-id", "shared-x")]));
    let mut second = Element::new(&with(stream_b(), &[("model-instance-id", "shared-x")]));
    first.process(&input(0, 0), 0);
    second.process(&input(1, 0), 0);
    assert_eq!(registry::loads() - loads, 1, "one id, one copy");
    assert_eq!(second.h.element().unwrap().property::<String>("model-instance-id"), "shared-x");

    // The same id with another VAE: an error on the bus naming the id and both settings.
    let tiny_vae = fixture("tiny-taesd");
    let mut clash =
        Element::new(&with(stream_a(), &[("model-instance-id", "shared-x"), ("vae", tiny_vae.to_str().unwrap())]));
    assert_eq!(clash.push(&input(0, 0), 0), Err(gst::FlowError::Error));
    let (message, debug) = clash.error();
    assert!(message.contains("model instance id \"shared-x\""), "{message}");
    assert!(message.contains("tiny-taesd"), "the asked-for settings: {message}");
    assert!(debug.contains("shared-x"), "{debug}");
    assert_eq!(registry::loads() - loads, 1, "nothing is loaded for a clash");
    // The elements holding the id go on.
    first.process(&input(0, 1), 40);
}

/// The largest difference between two frames, in 8-bit levels.
fn max_level_diff(a: &RgbFrame, b: &RgbFrame) -> u8 {
    assert_eq!((a.width, a.height), (b.width, b.height));
    a.data.iter().zip(&b.data).map(|(x, y)| x.abs_diff(*y)).max().unwrap_or(0)
}

#[test]
fn elements_on_their_own_threads_share_unet_calls_and_give_their_own_frames() {
    let _serial = serial();
    // Each alone, on a copy of its own.
    let mut want = Vec::new();
    for (stream, (settings, id)) in [(stream_a(), "solo-a"), (stream_b(), "solo-b")].into_iter().enumerate() {
        let mut alone = Element::new(&with(settings, &[("model-instance-id", id)]));
        want.push((0..FRAMES).map(|k| alone.process(&input(stream, k), 40 * k as u64)).collect::<Vec<_>>());
    }
    // Together, each element on a streaming thread of its own, as behind a tee; a patient
    // batch timeout so that they meet at every step however loaded the machine is.
    let loads = registry::loads();
    let start = std::sync::Barrier::new(2);
    let runs: Vec<(Vec<RgbFrame>, gst::Structure)> = std::thread::scope(|scope| {
        let handles: Vec<_> = [stream_a(), stream_b()]
            .into_iter()
            .enumerate()
            .map(|(stream, settings)| {
                let start = &start;
                scope.spawn(move || {
                    let mut element = Element::new(&with(settings, &[("batch-timeout", "1000")]));
                    // Started (the model loaded) before either pushes a frame.
                    element.h.element().unwrap().set_state(gst::State::Playing).unwrap();
                    start.wait();
                    let frames = (0..FRAMES).map(|k| element.process(&input(stream, k), 40 * k as u64)).collect();
                    let stats = element.h.element().unwrap().property::<gst::Structure>("stats");
                    (frames, stats)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(registry::loads() - loads, 1, "one copy for both");
    for (stream, (frames, stats)) in runs.iter().enumerate() {
        for (k, (got, want)) in frames.iter().zip(&want[stream]).enumerate() {
            let diff = max_level_diff(got, want);
            assert!(diff <= 1, "element {stream} frame {k}: {diff} levels from the element alone");
        }
        let shared = stats.get::<u64>("shared-calls").unwrap();
        assert!(shared > 0, "element {stream}: no UNet call was shared ({stats})");
        println!("element {stream}: {shared} of {} denoising calls shared", 2 * FRAMES);
    }
}
