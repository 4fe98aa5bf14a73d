//! `sdcrossframe`: properties, caps, errors, latency, QoS, and frames through the tiny
//! random model in tests/fixtures (2 denoising steps at 96x64 to keep CI quick).

use std::str::FromStr;

use gst::prelude::*;
use gst_check::Harness;
use sdcrossframe::frame::RgbFrame;

mod common;
use common::{ALL_FORMATS, buffer, fixture, init, read_rgb};

fn frame(index: usize) -> RgbFrame {
    RgbFrame::load(&fixture(&format!("reference/img2img/frame_{index}.png"))).unwrap()
}

/// Settings every tiny-model test uses, then `extra` (as gst-launch would set them).
fn tiny_element(extra: &[(&str, &str)]) -> gst::Element {
    init();
    let element = gst::ElementFactory::make("sdcrossframe").build().unwrap();
    let model = fixture("tiny-sd");
    let controlnet = fixture("tiny-controlnet");
    let base = [
        ("model", model.to_str().unwrap()),
        ("controlnet", controlnet.to_str().unwrap()),
        ("prompt", "a beautiful woman with red hair"),
        ("steps", "2"),
        ("strength", "1.0"),
        ("width", "96"),
        ("height", "64"),
    ];
    for (name, value) in base.iter().chain(extra) {
        element.set_property_from_str(name, value);
    }
    element
}

struct Tiny {
    h: Harness,
    bus: gst::Bus,
}

impl Tiny {
    fn new(extra: &[(&str, &str)]) -> Self {
        let element = tiny_element(extra);
        let bus = gst::Bus::new();
        element.set_bus(Some(&bus));
        let h = Harness::with_element(&element, Some("sink"), Some("src"));
        Self { h, bus }
    }

    fn element(&self) -> gst::Element {
        self.h.element().unwrap()
    }

    /// Pushes one frame and returns the output's RGB, checking size and alpha.
    fn process(&mut self, input: &RgbFrame, format: gst_video::VideoFormat, pts_ms: u64) -> RgbFrame {
        let (buf, info) = buffer(input, format, pts_ms);
        if self.h.srcpad().unwrap().current_caps().as_ref() != Some(&info.to_caps().unwrap()) {
            self.h.set_src_caps(info.to_caps().unwrap());
        }
        let out = self.h.push_and_pull(buf).expect("an output frame");
        assert_eq!(out.pts(), Some(gst::ClockTime::from_mseconds(pts_ms)));
        let caps = self.h.sinkpad().unwrap().current_caps().unwrap();
        let out_info = gst_video::VideoInfo::from_caps(&caps).unwrap();
        assert_eq!(out_info, info, "output caps differ from input caps");
        let (rgb, alpha_kept) = read_rgb(&out, &out_info);
        assert!(alpha_kept, "{format:?}: the 4th byte changed");
        rgb
    }

    /// The `frame` field of every anchor message posted so far.
    fn anchors(&self) -> Vec<(u64, String)> {
        std::iter::from_fn(|| self.bus.pop_filtered(&[gst::MessageType::Element]))
            .filter_map(|m| {
                let s = m.structure()?;
                (s.name() == "sdcrossframe-anchor")
                    .then(|| (s.get::<u64>("frame").unwrap(), s.get::<String>("reason").unwrap()))
            })
            .collect()
    }

    fn warnings(&self) -> Vec<String> {
        std::iter::from_fn(|| self.bus.pop_filtered(&[gst::MessageType::Warning]))
            .map(|m| match m.view() {
                gst::MessageView::Warning(w) => w.error().to_string(),
                _ => unreachable!(),
            })
            .collect()
    }
}

fn mean_abs_diff(a: &RgbFrame, b: &RgbFrame) -> f64 {
    assert_eq!((a.width, a.height), (b.width, b.height));
    a.data.iter().zip(&b.data).map(|(x, y)| (*x as f64 - *y as f64).abs()).sum::<f64>() / a.data.len() as f64
}

#[test]
fn properties_defaults_ranges_and_flags() {
    init();
    let element = gst::ElementFactory::make("sdcrossframe").build().unwrap();
    let double = |name: &str| {
        let p = element.find_property(name).unwrap();
        let p = p.downcast_ref::<gst::glib::ParamSpecDouble>().unwrap();
        (p.minimum(), p.maximum(), p.default_value())
    };
    assert_eq!(double("strength"), (0.0, 1.0, 0.9));
    assert_eq!(double("guidance-scale"), (0.0, 50.0, 7.5));
    assert_eq!(double("controlnet-scale"), (0.0, 5.0, 0.7));
    assert_eq!(double("canny-low"), (0.0, 65535.0, 50.0));
    assert_eq!(double("canny-high"), (0.0, 65535.0, 100.0));
    assert_eq!(double("scene-cut-threshold"), (0.0, 1.0, 0.3));
    let uint = |name: &str| {
        let p = element.find_property(name).unwrap();
        let p = p.downcast_ref::<gst::glib::ParamSpecUInt>().unwrap();
        (p.minimum(), p.maximum(), p.default_value())
    };
    assert_eq!(uint("steps"), (1, 1000, 20));
    assert_eq!(uint("width"), (0, 16384, 0));
    assert_eq!(uint("height"), (0, 16384, 0));
    assert_eq!(uint("anchor-interval"), (0, u32::MAX, 0));
    assert_eq!(uint("latency"), (0, 600_000, 1000));
    assert_eq!(element.property::<u64>("seed"), 0);
    assert_eq!(element.property::<String>("model"), "runwayml/stable-diffusion-v1-5");
    assert_eq!(element.property::<String>("controlnet"), "lllyasviel/sd-controlnet-canny");
    assert_eq!(element.property::<String>("device"), "cpu");
    assert_eq!(element.property::<String>("prompt"), "");
    assert_eq!(element.property::<Option<String>>("variant"), None);
    assert!(element.property::<bool>("qos"), "QoS is on by default");

    let nick = |name: &str| element.property_value(name).serialize().unwrap().to_string();
    assert_eq!(nick("dtype"), "f32");
    assert_eq!(nick("noise"), "fixed");
    assert_eq!(nick("attention"), "first+prev");
    assert_eq!(nick("attention-scope"), "up");
    for (name, value) in [
        ("dtype", "bf16"),
        ("noise", "per-frame"),
        ("attention", "off"),
        ("attention", "prev"),
        ("attention-scope", "all"),
    ] {
        element.set_property_from_str(name, value);
        assert_eq!(nick(name), value);
    }
    element.set_property_from_str("attention", "first+prev");
    assert_eq!(nick("attention"), "first+prev");

    for name in ["prompt", "negative-prompt", "strength", "guidance-scale", "controlnet-scale", "latency"] {
        assert!(element.find_property(name).unwrap().flags().contains(gst::PARAM_FLAG_MUTABLE_PLAYING), "{name}");
    }
    for name in ["model", "controlnet", "device", "dtype", "variant"] {
        let flags = element.find_property(name).unwrap().flags();
        assert!(
            flags.contains(gst::PARAM_FLAG_MUTABLE_READY) && !flags.contains(gst::PARAM_FLAG_MUTABLE_PLAYING),
            "{name}"
        );
    }
    for p in element.list_properties() {
        if p.owner_type() == element.type_() {
            assert!(p.blurb().is_some_and(|b| b.len() > 10), "{} has no blurb", p.name());
        }
    }
}

#[test]
fn caps_accept_rgb_family_only() {
    init();
    let element = gst::ElementFactory::make("sdcrossframe").build().unwrap();
    let sink = element.static_pad("sink").unwrap();
    for format in ALL_FORMATS {
        let caps = common::video_info(format, 962, 506).to_caps().unwrap();
        assert!(sink.query_accept_caps(&caps), "{format:?} refused");
    }
    for format in ["I420", "NV12", "GRAY8", "RGB16", "AYUV"] {
        let caps =
            gst::Caps::from_str(&format!("video/x-raw,format={format},width=64,height=64,framerate=30/1")).unwrap();
        assert!(!sink.query_accept_caps(&caps), "{format} accepted");
    }
    // Same caps out as in.
    let src = element.static_pad("src").unwrap();
    assert_eq!(src.pad_template_caps(), sink.pad_template_caps());
}

/// Every format negotiates and gives the same stylized picture (each caps change re-anchors,
/// so each frame is processed like a first frame), alpha untouched; then an odd size with
/// padded rows.
#[test]
fn frames_in_every_format_and_odd_sizes() {
    let mut t = Tiny::new(&[]);
    let input = frame(0);
    let mut first: Option<RgbFrame> = None;
    for (i, format) in ALL_FORMATS.into_iter().enumerate() {
        let out = t.process(&input, format, i as u64 * 40);
        assert_eq!((out.width, out.height), (96, 64));
        let change = mean_abs_diff(&out, &input);
        assert!(change > 5.0, "{format:?}: output too close to the input ({change})");
        match &first {
            None => first = Some(out),
            Some(first) => assert_eq!(first, &out, "{format:?} gives a different picture"),
        }
    }
    let anchors = t.anchors();
    assert_eq!(anchors.iter().map(|a| a.0).collect::<Vec<_>>(), (0..ALL_FORMATS.len() as u64).collect::<Vec<_>>());

    // 962x506 RGB has 2886-byte rows padded to 2888.
    let odd = input.resized(962, 506).unwrap();
    let info = common::video_info(gst_video::VideoFormat::Rgb, 962, 506);
    assert_eq!(info.stride()[0], 2888);
    let out = t.process(&odd, gst_video::VideoFormat::Rgb, 1000);
    assert_eq!((out.width, out.height), (962, 506));
    assert!(mean_abs_diff(&out, &odd) > 5.0);
    let out = t.process(&odd, gst_video::VideoFormat::Bgra, 1040);
    assert_eq!((out.width, out.height), (962, 506));
}

#[test]
fn eos_on_an_empty_stream() {
    let mut t = Tiny::new(&[]);
    t.h.set_src_caps(common::video_info(gst_video::VideoFormat::Rgbx, 96, 64).to_caps().unwrap());
    assert!(t.h.push_event(gst::event::Eos::new()));
    assert!(t.h.pull_until_eos().unwrap().is_none());
    assert_eq!(t.h.buffers_received(), 0);
}

fn wait_for_error(bus: &gst::Bus) -> (String, String, Vec<(gst::ProgressType, String)>) {
    let mut progress = Vec::new();
    loop {
        let msg = bus.timed_pop(gst::ClockTime::from_seconds(60)).expect("an error message within 60 s");
        match msg.view() {
            gst::MessageView::Progress(p) => {
                let (type_, _code, text) = p.get();
                progress.push((type_, text.to_string()));
            }
            gst::MessageView::Error(e) => {
                return (e.error().to_string(), e.debug().map(|d| d.to_string()).unwrap_or_default(), progress);
            }
            gst::MessageView::Eos(_) => panic!("EOS instead of an error"),
            _ => {}
        }
    }
}

#[test]
fn bad_model_path_is_an_error_message_naming_it() {
    init();
    let pipeline = gst::parse::launch(&format!(
        "videotestsrc num-buffers=3 ! video/x-raw,width=96,height=64 ! sdcrossframe name=sd model=/nonexistent/sd-model controlnet={} ! fakesink",
        fixture("tiny-controlnet").display()
    ))
    .unwrap();
    let bus = pipeline.bus().unwrap();
    pipeline.set_state(gst::State::Playing).unwrap();
    let (message, debug, progress) = wait_for_error(&bus);
    pipeline.set_state(gst::State::Null).unwrap();
    assert!(message.contains("/nonexistent/sd-model"), "{message}");
    assert!(message.contains("does not exist"), "{message}");
    assert!(debug.contains("/nonexistent/sd-model"), "{debug}");
    let types: Vec<_> = progress.iter().map(|p| p.0).collect();
    assert_eq!(types, [gst::ProgressType::Start, gst::ProgressType::Error], "{progress:?}");
    assert!(progress[0].1.contains("/nonexistent/sd-model"), "{progress:?}");
}

#[test]
fn bad_device_and_bad_settings_are_error_messages() {
    init();
    for (props, expected) in
        [("device=tpu", "unknown device \"tpu\""), ("canny-low=200", "low threshold 200 is above high threshold 100")]
    {
        let pipeline = gst::parse::launch(&format!(
            "videotestsrc num-buffers=3 ! video/x-raw,width=96,height=64 ! sdcrossframe model={} controlnet={} {props} ! fakesink",
            fixture("tiny-sd").display(),
            fixture("tiny-controlnet").display()
        ))
        .unwrap();
        let bus = pipeline.bus().unwrap();
        pipeline.set_state(gst::State::Playing).unwrap();
        let (message, _, _) = wait_for_error(&bus);
        pipeline.set_state(gst::State::Null).unwrap();
        assert!(message.contains(expected), "{props}: {message}");
    }
}

#[test]
fn latency_is_added_when_upstream_is_live() {
    let mut t = Tiny::new(&[("latency", "250")]);
    t.h.set_upstream_latency(gst::ClockTime::from_mseconds(10));
    assert_eq!(t.h.query_latency(), Some(gst::ClockTime::from_mseconds(260)));
    t.element().set_property("latency", 500u32);
    assert_eq!(t.h.query_latency(), Some(gst::ClockTime::from_mseconds(510)));
}

#[test]
fn no_latency_added_when_upstream_is_not_live() {
    init();
    let pipeline = gst::parse::launch(&format!(
        "videotestsrc is-live=false ! video/x-raw,width=96,height=64 ! sdcrossframe name=sd latency=250 model={} controlnet={} steps=1 strength=1.0 width=96 height=64 ! fakesink",
        fixture("tiny-sd").display(),
        fixture("tiny-controlnet").display()
    ))
    .unwrap();
    pipeline.set_state(gst::State::Paused).unwrap();
    let (result, _, _) = pipeline.state(gst::ClockTime::from_seconds(60));
    result.unwrap();
    let element = pipeline.downcast_ref::<gst::Bin>().unwrap().by_name("sd").unwrap();
    let mut ours = gst::query::Latency::new();
    assert!(element.static_pad("src").unwrap().query(&mut ours));
    let mut upstream = gst::query::Latency::new();
    assert!(element.static_pad("sink").unwrap().peer_query(&mut upstream));
    pipeline.set_state(gst::State::Null).unwrap();
    let (live, min, max) = ours.result();
    assert!(!live);
    assert_eq!((live, min, max), upstream.result(), "latency added in a non-live pipeline");
}

#[test]
fn late_frames_are_dropped_under_qos() {
    let mut t = Tiny::new(&[]);
    let input = frame(1);
    let (early, info) = buffer(&input, gst_video::VideoFormat::Rgb, 500);
    t.h.set_src_caps(info.to_caps().unwrap());
    // Downstream says: 1 s late at running time 1 s, so nothing before 2 s is worth doing.
    let qos = gst::event::Qos::new(gst::QOSType::Underflow, 1.0, 1_000_000_000, gst::ClockTime::from_seconds(1));
    assert!(t.h.push_upstream_event(qos));
    assert_eq!(t.h.push(early), Ok(gst::FlowSuccess::Ok));
    assert_eq!(t.h.buffers_in_queue(), 0, "a late frame was processed");
    let qos_messages = std::iter::from_fn(|| t.bus.pop_filtered(&[gst::MessageType::Qos])).count();
    assert_eq!(qos_messages, 1);
    let (on_time, _) = buffer(&input, gst_video::VideoFormat::Rgb, 5000);
    let out = t.h.push_and_pull(on_time).unwrap();
    assert_eq!(out.pts(), Some(gst::ClockTime::from_seconds(5)));
}

/// After a flush the next frame is a new anchor, computed exactly as a first frame.
#[test]
fn flush_resets_the_cross_frame_state() {
    let (a, b) = (frame(0), frame(4));
    let format = gst_video::VideoFormat::Bgrx;
    let extra = [("scene-cut-threshold", "0")];

    let fresh_b = Tiny::new(&extra).process(&b, format, 0);

    let mut t = Tiny::new(&extra);
    t.process(&a, format, 0);
    let attending_b = t.process(&b, format, 40);
    assert!(mean_abs_diff(&attending_b, &fresh_b) > 0.5, "cross-frame attention had no effect");
    assert_eq!(t.anchors(), [(0, "first frame".to_string())]);

    assert!(t.h.push_event(gst::event::FlushStart::new()));
    assert!(t.h.push_event(gst::event::FlushStop::new(true)));
    assert!(t.h.push_event(gst::event::Segment::new(&gst::FormattedSegment::<gst::ClockTime>::new())));
    let flushed_b = t.process(&b, format, 80);
    assert_eq!(t.anchors().iter().map(|a| a.0).collect::<Vec<_>>(), [2]);
    assert_eq!(flushed_b, fresh_b, "after a flush the frame is not processed like a first frame");
}

/// Properties changed while playing take effect at the next frame; an invalid change is a
/// warning and the previous settings stay. EOS comes after every frame.
#[test]
fn property_changes_while_playing() {
    let mut t = Tiny::new(&[("attention", "off")]);
    let input = frame(2);
    let format = gst_video::VideoFormat::Rgba;
    let o1 = t.process(&input, format, 0);
    let o2 = t.process(&input, format, 40);
    assert_eq!(o1, o2, "the same frame with the same settings must give the same output");

    let element = t.element();
    element.set_property("prompt", "a green forest at night");
    let o3 = t.process(&input, format, 80);
    assert!(mean_abs_diff(&o3, &o2) > 0.1, "prompt change had no effect");

    element.set_property("strength", 0.5);
    let o4 = t.process(&input, format, 120);
    assert!(mean_abs_diff(&o4, &o3) > 0.1, "strength change had no effect");

    element.set_property("controlnet-scale", 0.0);
    let o5 = t.process(&input, format, 160);
    assert!(mean_abs_diff(&o5, &o4) > 0.1, "controlnet-scale change had no effect");
    assert!(t.warnings().is_empty());

    // 2 steps x strength 0.1 leaves no denoising step: refused, previous settings kept.
    element.set_property("strength", 0.1);
    let o6 = t.process(&input, format, 200);
    assert_eq!(o6, o5);
    let warnings = t.warnings();
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(warnings[0].contains("Ignoring the new generation settings"), "{warnings:?}");

    assert!(t.h.push_event(gst::event::Eos::new()));
    assert_eq!(t.h.buffers_received(), 6);
    loop {
        let event = t.h.pull_event().unwrap();
        if event.type_() == gst::EventType::Eos {
            break;
        }
    }
    assert!(t.anchors().is_empty(), "attention off posts no anchors");
}
