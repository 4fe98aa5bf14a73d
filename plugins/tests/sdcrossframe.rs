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

    /// Sends a DRAIN query: with overlap on, the frame in flight goes out.
    fn drain(&self) {
        let sink = self.element().static_pad("sink").unwrap();
        assert!(sink.query(&mut gst::query::Drain::new()), "drain query");
    }

    /// Every output buffer so far: (PTS ms, duration ms, flags, plane 0 without padding).
    fn outputs(&mut self, info: &gst_video::VideoInfo) -> Vec<(u64, u64, gst::BufferFlags, Vec<u8>)> {
        std::iter::from_fn(|| self.h.try_pull())
            .map(|b| {
                let pts = b.pts().unwrap().mseconds();
                let duration = b.duration().unwrap().mseconds();
                (pts, duration, b.flags(), common::read_plane(&b, info))
            })
            .collect()
    }

    /// Pushes one frame and returns the output's RGB, checking size and alpha. With overlap
    /// on, a DRAIN query gets the frame out.
    fn process(&mut self, input: &RgbFrame, format: gst_video::VideoFormat, pts_ms: u64) -> RgbFrame {
        let (buf, info) = buffer(input, format, pts_ms);
        if self.h.srcpad().unwrap().current_caps().as_ref() != Some(&info.to_caps().unwrap()) {
            self.h.set_src_caps(info.to_caps().unwrap());
        }
        assert_eq!(self.h.push(buf), Ok(gst::FlowSuccess::Ok));
        self.drain();
        let out = self.h.pull().expect("an output frame");
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
    // The engine's limit: every value in the range runs (see steps_at_the_maximum_run).
    assert_eq!(uint("steps"), (1, sdcrossframe::pipeline::MAX_STEPS as u32, 20));
    assert_eq!(uint("width"), (0, 16384, 0));
    assert_eq!(uint("height"), (0, 16384, 0));
    assert_eq!(uint("anchor-interval"), (0, u32::MAX, 0));
    assert_eq!(uint("latency"), (0, 600_000, 1000));
    let int = |name: &str| {
        let p = element.find_property(name).unwrap();
        let p = p.downcast_ref::<gst::glib::ParamSpecInt>().unwrap();
        (p.minimum(), p.maximum(), p.default_value())
    };
    // -1: auto (a quarter of the element's frame interval), 0: off.
    assert_eq!(int("batch-timeout"), (-1, 1000, 0));
    assert_eq!(element.property::<u64>("seed"), 0);
    assert_eq!(element.property::<String>("model"), "runwayml/stable-diffusion-v1-5");
    assert_eq!(element.property::<String>("controlnet"), "lllyasviel/sd-controlnet-canny");
    assert_eq!(element.property::<String>("device"), "cpu");
    assert_eq!(element.property::<String>("prompt"), "");
    assert_eq!(element.property::<Option<String>>("variant"), None);
    assert_eq!(element.property::<String>("lora"), "");
    assert_eq!(element.property::<Option<String>>("vae"), None);
    assert_eq!(element.property::<String>("model-instance-id"), "");
    assert!(element.property::<bool>("qos"), "QoS is on by default");
    assert!(element.property::<bool>("overlap"), "overlap is on by default");

    let nick = |name: &str| element.property_value(name).serialize().unwrap().to_string();
    assert_eq!(nick("dtype"), "f32");
    assert_eq!(nick("noise"), "fixed");
    assert_eq!(nick("attention"), "first+prev");
    assert_eq!(nick("attention-scope"), "up");
    assert_eq!(nick("cross-frame-store"), "device");
    assert_eq!(nick("scheduler"), "auto");
    assert_eq!(nick("guidance"), "auto");
    assert_eq!(element.property::<String>("timesteps"), "");
    for (name, value) in [
        ("scheduler", "lcm"),
        ("scheduler", "ddim"),
        ("guidance", "self"),
        ("guidance", "initialize"),
        ("guidance", "none"),
        ("guidance", "full"),
        ("dtype", "bf16"),
        ("noise", "per-frame"),
        ("attention", "off"),
        ("attention", "prev"),
        ("attention-scope", "all"),
        ("cross-frame-store", "host"),
    ] {
        element.set_property_from_str(name, value);
        assert_eq!(nick(name), value);
    }
    element.set_property_from_str("attention", "first+prev");
    assert_eq!(nick("attention"), "first+prev");

    for name in [
        "prompt",
        "negative-prompt",
        "strength",
        "guidance-scale",
        "controlnet-scale",
        "latency",
        "scheduler",
        "timesteps",
        "guidance",
        "cross-frame-store",
    ] {
        assert!(element.find_property(name).unwrap().flags().contains(gst::PARAM_FLAG_MUTABLE_PLAYING), "{name}");
    }
    for name in ["model", "controlnet", "device", "dtype", "variant", "lora", "vae", "model-instance-id", "overlap"] {
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

/// GLib refuses NaN and the infinities for every float property (its range check: NaN
/// compares false with both bounds, and g_param_value_validate reports it as changed), so
/// gst-launch and g_object_set never hand one to the element.
#[test]
fn float_properties_refuse_nan_and_infinities() {
    use gst::glib::translate::{FromGlib, ToGlibPtr, ToGlibPtrMut};
    init();
    let element = gst::ElementFactory::make("sdcrossframe").build().unwrap();
    let doubles: Vec<_> = element
        .list_properties()
        .into_iter()
        .filter(|p| p.owner_type() == element.type_() && p.value_type() == f64::static_type())
        .collect();
    assert!(doubles.len() >= 7, "{doubles:?}");
    for pspec in doubles {
        for bad in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
            let mut value = bad.to_value();
            // SAFETY: a valid pspec and a GValue of its type.
            let changed = unsafe {
                bool::from_glib(gst::glib::gobject_ffi::g_param_value_validate(
                    pspec.to_glib_none().0,
                    value.to_glib_none_mut().0,
                ))
            };
            assert!(changed, "GLib accepts {bad} for {}", pspec.name());
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

/// Runs `description` until its first error message: (error text, debug text, progress).
fn error_of(description: &str) -> (String, String, Vec<(gst::ProgressType, String)>) {
    let pipeline = gst::parse::launch(description).unwrap();
    let bus = pipeline.bus().unwrap();
    // A start that fails at once still posts its error message.
    let _ = pipeline.set_state(gst::State::Playing);
    let result = wait_for_error(&bus);
    pipeline.set_state(gst::State::Null).unwrap();
    result
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

/// Sets `description` to PAUSED, which must fail at once (the element's `start` refuses the
/// settings): the bus error (its domain checked: a settings problem) and the load progress
/// messages posted (there must be none: nothing started loading).
fn start_error_of(description: &str) -> (String, String, usize) {
    let pipeline = gst::parse::launch(description).unwrap();
    let bus = pipeline.bus().unwrap();
    assert!(pipeline.set_state(gst::State::Paused).is_err(), "{description}: the state change succeeded");
    let mut progress = 0;
    let error = loop {
        let msg = bus.timed_pop(gst::ClockTime::from_seconds(60)).expect("an error message within 60 s");
        match msg.view() {
            gst::MessageView::Progress(_) => progress += 1,
            gst::MessageView::Error(e) => {
                assert!(
                    e.error().matches(gst::LibraryError::Settings),
                    "{description}: not a settings error: {:?}",
                    e.error()
                );
                break (e.error().to_string(), e.debug().map(|d| d.to_string()).unwrap_or_default());
            }
            _ => {}
        }
    };
    pipeline.set_state(gst::State::Null).unwrap();
    (error.0, error.1, progress)
}

/// Settings that are wrong before any weight is read (issue 16, found as a new user, item 4)
/// fail the element's start with a settings error naming the problem: the state change to
/// PAUSED fails, no load begins (no progress message), and the text is not a load failure's.
#[test]
fn settings_known_wrong_before_loading_fail_the_start() {
    init();
    for (props, expected) in [
        ("model=/nonexistent/sd-model", &["model /nonexistent/sd-model does not exist"][..]),
        ("model=missing-model", &["model missing-model does not exist"]),
        ("model=/nonexistent/sd15.safetensors", &["model /nonexistent/sd15.safetensors does not exist"]),
        ("controlnet=/nonexistent/cn", &["ControlNet /nonexistent/cn does not exist"]),
        ("vae=/nonexistent/taesd", &["VAE /nonexistent/taesd does not exist"]),
        ("tokenizer=/nonexistent/tokenizer", &["tokenizer /nonexistent/tokenizer does not exist"]),
        ("lora=/nonexistent/style.safetensors:0.5", &["LoRA file /nonexistent/style.safetensors does not exist"]),
        ("lora=/some/style.safetensors:", &["LoRA entry '/some/style.safetensors:' ends with ':' but has no scale"]),
        ("device=tpu", &["unknown device \"tpu\""]),
        ("device=cuda:7", &["cuda:7"]),
        ("dtype=bf16", &["bf16", "CPU"]),
        ("steps=3 strength=0.2", &["steps 3 x strength 0.2 gives 0 denoising steps"]),
        ("canny-low=200", &["low threshold 200 is above high threshold 100"]),
    ] {
        let description = format!(
            "videotestsrc num-buffers=3 ! video/x-raw,width=96,height=64 ! sdcrossframe model={} controlnet={} {props} ! fakesink",
            fixture("tiny-sd").display(),
            fixture("tiny-controlnet").display()
        );
        let (message, debug, progress) = start_error_of(&description);
        for text in expected {
            assert!(message.contains(text), "{props}: {message}");
            assert!(debug.contains(text), "{props}: {debug}");
        }
        assert!(!message.starts_with("Could not load Stable Diffusion model"), "{props}: {message}");
        assert_eq!(progress, 0, "{props}: a load started");
    }
}

/// bf16 on the CPU is refused at start, naming bf16 and the CPU, rather than failing at the
/// first frame with candle's "unsupported dtype BF16 for op matmul".
#[test]
fn bf16_on_the_cpu_is_refused_at_start() {
    let element = tiny_element(&[("dtype", "bf16"), ("device", "cpu")]);
    let bus = gst::Bus::new();
    element.set_bus(Some(&bus));
    assert!(element.set_state(gst::State::Paused).is_err(), "bf16 on the CPU started");
    let error = std::iter::from_fn(|| bus.pop())
        .find_map(|m| match m.view() {
            gst::MessageView::Error(e) => Some(e.error().to_string()),
            _ => None,
        })
        .expect("an error message");
    element.set_state(gst::State::Null).unwrap();
    assert!(error.contains("dtype bf16 is not available on the CPU"), "{error}");
    // f32 on the same element starts.
    element.set_property_from_str("dtype", "f32");
    assert!(element.set_state(gst::State::Paused).is_ok());
    element.set_state(gst::State::Null).unwrap();
}

/// What the loader finds wrong is still a load failure posted from the loader thread.
#[test]
fn tiny_vae_directory_given_as_model_is_an_error_message() {
    init();
    let (message, _, _) = error_of(&format!(
        "videotestsrc num-buffers=3 ! video/x-raw,width=96,height=64 ! sdcrossframe model={} controlnet={} ! fakesink",
        fixture("tiny-taesd").display(),
        fixture("tiny-controlnet").display()
    ));
    assert!(message.contains("VAE directory (AutoencoderTiny)") && message.contains("vae"), "{message}");
}

/// The `vae` property swaps the VAE: the tiny one stylizes frames, differently from the
/// model's own.
#[test]
fn frames_through_the_tiny_vae() {
    let taesd = fixture("tiny-taesd");
    let mut with_taesd = Tiny::new(&[("vae", taesd.to_str().unwrap())]);
    let mut plain = Tiny::new(&[]);
    let input = frame(0);
    let a = with_taesd.process(&input, gst_video::VideoFormat::Rgb, 0);
    let b = plain.process(&input, gst_video::VideoFormat::Rgb, 0);
    let diff = mean_abs_diff(&a, &b);
    assert!(diff > 10.0, "the tiny VAE changed the frame by only {diff} (8-bit mean)");
}

/// Warnings logged in one debug category on objects whose name contains a given part (tests
/// run side by side), as (object, text), from `start` until `stop`.
struct LoggedWarnings {
    seen: std::sync::Arc<std::sync::Mutex<Vec<(String, String)>>>,
    function: gst::log::DebugLogFunction,
}

impl LoggedWarnings {
    fn start(category: &'static str, objects: &'static str) -> Self {
        init();
        gst::log::set_threshold_for_name(category, gst::DebugLevel::Warning);
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let function = {
            let seen = seen.clone();
            gst::log::add_log_function(move |logged_in, level, _file, _function, _line, object, message| {
                let object = object.map(|o| o.to_string()).unwrap_or_default();
                if logged_in.name() == category && level == gst::DebugLevel::Warning && object.contains(objects) {
                    let text = message.get().map(|m| m.to_string()).unwrap_or_default();
                    seen.lock().unwrap().push((object, text));
                }
            })
        };
        Self { seen, function }
    }

    fn stop(self) -> Vec<(String, String)> {
        gst::log::remove_log_function(self.function);
        std::mem::take(&mut *self.seen.lock().unwrap())
    }
}

/// The engine's warnings reach the GStreamer debug log on the element that ran the work
/// (category `sdcrossframe-engine`; before, they went nowhere): here the text encoder's,
/// about a prompt longer than its tokens.
#[test]
fn engine_warnings_reach_the_gstreamer_log() {
    let log = LoggedWarnings::start("sdcrossframe-engine", "");
    let long_prompt = vec!["red hair"; 100].join(", ");
    let mut tiny = Tiny::new(&[("prompt", long_prompt.as_str())]);
    let name = tiny.element().name().to_string();
    tiny.process(&frame(0), gst_video::VideoFormat::Rgb, 0);
    let seen = log.stop();
    assert!(
        seen.iter()
            .any(|(object, text)| object.contains(&name) && text.contains("prompt is longer than the text encoder")),
        "no warning about the long prompt on {name} in the log: {seen:?}"
    );
}

/// A buffer refused downstream with an error no one posted (as a queue does before EOS with
/// its own downstream's error) goes back upstream and is in the element's log, so a pipeline
/// that stops on it says where it stopped.
#[test]
fn a_buffer_refused_downstream_is_logged_and_its_error_returned() {
    let log = LoggedWarnings::start("sdcrossframe", "refused_down");
    let mut t = Tiny::new(&[("name", "refused_down")]);
    t.element().static_pad("src").unwrap().add_probe(gst::PadProbeType::BUFFER, |_, info| {
        info.flow_res = Err(gst::FlowError::Error);
        gst::PadProbeReturn::Handled
    });
    let (first, info) = buffer(&frame(0), gst_video::VideoFormat::Rgb, 0);
    let (second, _) = buffer(&frame(1), gst_video::VideoFormat::Rgb, 40);
    t.h.set_src_caps(info.to_caps().unwrap());
    // Overlap holds the first frame; it goes out (and is refused) as the second comes in.
    assert_eq!(t.h.push(first), Ok(gst::FlowSuccess::Ok));
    assert_eq!(t.h.push(second), Err(gst::FlowError::Error));
    let seen = log.stop();
    assert!(
        seen.iter().any(|(_, text)| text.contains("downstream refused the buffer at") && text.contains("Error")),
        "no warning about the refused buffer in the log: {seen:?}"
    );
}

/// Two elements in one thread (the first pushes into the second from its own frame work):
/// the second's engine warnings are logged on the second, not on the first.
#[test]
fn engine_warnings_of_a_downstream_element_are_logged_on_it() {
    let log = LoggedWarnings::start("sdcrossframe-engine", "nested_");
    let (model, controlnet) = (fixture("tiny-sd"), fixture("tiny-controlnet"));
    let props = format!(
        "model={} controlnet={} prompt=hair steps=2 strength=1.0 width=96 height=64",
        model.display(),
        controlnet.display()
    );
    let mut h = gst_check::Harness::new_parse(&format!(
        "sdcrossframe name=nested_up {props} ! sdcrossframe name=nested_down {props}"
    ));
    let (buf, info) = buffer(&frame(0), gst_video::VideoFormat::Rgb, 0);
    h.set_src_caps(info.to_caps().unwrap());
    assert_eq!(h.push(buf), Ok(gst::FlowSuccess::Ok));
    // While playing: the downstream element encodes its new prompt in its next frame's work,
    // which the upstream one's push runs.
    let bin = h.element().unwrap().downcast::<gst::Bin>().unwrap();
    let down = bin.by_name("nested_down").unwrap();
    down.set_property("prompt", vec!["red hair"; 100].join(", "));
    for pts in [40, 80] {
        let (buf, _) = buffer(&frame(1), gst_video::VideoFormat::Rgb, pts);
        assert_eq!(h.push(buf), Ok(gst::FlowSuccess::Ok));
    }
    assert!(h.push_event(gst::event::Eos::new()));
    let mut out = 0;
    while h.try_pull().is_some() {
        out += 1;
    }
    let seen: Vec<String> = log
        .stop()
        .into_iter()
        .filter(|(_, text)| text.contains("prompt is longer"))
        .map(|(object, _)| object)
        .collect();
    assert_eq!(out, 3, "frames out of the two elements");
    assert!(!seen.is_empty(), "no warning about the long prompt");
    assert!(seen.iter().all(|object| object.contains("nested_down")), "logged on {seen:?}");
}

/// Bad scheduler settings at start are error messages naming the value.
#[test]
fn bad_scheduler_settings_are_error_messages_naming_the_value() {
    init();
    for (props, expected) in [
        ("scheduler=lcm timesteps=32,50", "index 50 is out of range"),
        ("scheduler=lcm timesteps=45,32", "45,32"),
        ("scheduler=lcm timesteps=32,x", "\"x\" is not a timestep index"),
        ("scheduler=ddim timesteps=32,45", "explicit timesteps need the lcm scheduler"),
        ("guidance=self guidance-scale=2", "guidance self (residual CFG) needs the lcm scheduler"),
        ("scheduler=lcm steps=60 strength=1", "fewer than the 60 steps"),
    ] {
        let (message, _, _) = error_of(&format!(
            "videotestsrc num-buffers=3 ! video/x-raw,width=96,height=64 ! sdcrossframe model={} controlnet={} {props} ! fakesink",
            fixture("tiny-sd").display(),
            fixture("tiny-controlnet").display()
        ));
        assert!(message.contains(expected), "{props}: {message}");
    }
}

/// LCM frames, guidance modes and explicit timesteps change the output while playing; a bad
/// timestep list is a warning naming it and the previous settings stay.
#[test]
fn lcm_scheduler_and_guidance_modes_while_playing() {
    let mut t = Tiny::new(&[("attention", "off"), ("scheduler", "lcm"), ("guidance-scale", "1.0")]);
    let input = frame(2);
    let format = gst_video::VideoFormat::Rgb;
    let lcm = t.process(&input, format, 0);
    let element = t.element();
    element.set_property_from_str("scheduler", "ddim");
    let ddim = t.process(&input, format, 40);
    assert!(mean_abs_diff(&lcm, &ddim) > 0.1, "scheduler change had no effect");
    element.set_property_from_str("scheduler", "lcm");
    element.set_property("guidance-scale", 2.0);
    element.set_property_from_str("guidance", "self");
    let self_guided = t.process(&input, format, 80);
    assert!(mean_abs_diff(&self_guided, &lcm) > 0.1, "guidance self had no effect");
    element.set_property("timesteps", "10,40");
    let explicit = t.process(&input, format, 120);
    assert!(mean_abs_diff(&explicit, &self_guided) > 0.1, "timesteps had no effect");
    assert!(t.warnings().is_empty());
    element.set_property("timesteps", "40,10");
    let kept = t.process(&input, format, 160);
    assert_eq!(kept, explicit, "a rejected change keeps the previous settings");
    let warnings = t.warnings();
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(warnings[0].contains("40,10") && warnings[0].contains("ascending"), "{warnings:?}");
}

#[test]
fn latency_is_added_when_upstream_is_live() {
    let mut t = Tiny::new(&[("latency", "250"), ("overlap", "false")]);
    t.h.set_upstream_latency(gst::ClockTime::from_mseconds(10));
    assert_eq!(t.h.query_latency(), Some(gst::ClockTime::from_mseconds(260)));
    t.element().set_property("latency", 500u32);
    assert_eq!(t.h.query_latency(), Some(gst::ClockTime::from_mseconds(510)));
}

/// With overlap a frame goes out when the next one comes in: one frame duration more (from
/// the framerate, or the `latency` property again while no framerate is known).
#[test]
fn overlap_adds_one_frame_of_latency() {
    let mut t = Tiny::new(&[("latency", "250")]);
    t.h.set_upstream_latency(gst::ClockTime::from_mseconds(10));
    assert_eq!(t.h.query_latency(), Some(gst::ClockTime::from_mseconds(10 + 250 + 250)), "no caps yet");
    // 25 fps: 40 ms a frame.
    t.h.set_src_caps(common::video_info(gst_video::VideoFormat::Rgb, 96, 64).to_caps().unwrap());
    assert_eq!(t.h.query_latency(), Some(gst::ClockTime::from_mseconds(10 + 250 + 40)));
    let caps = gst::Caps::from_str("video/x-raw,format=RGB,width=96,height=64,framerate=10/1").unwrap();
    t.h.set_src_caps(caps);
    assert_eq!(t.h.query_latency(), Some(gst::ClockTime::from_mseconds(10 + 250 + 100)));
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

/// In both modes; the frame after the dropped one goes out marked DISCONT, as BaseTransform
/// marks it.
#[test]
fn late_frames_are_dropped_under_qos() {
    for overlap in ["false", "true"] {
        let mut t = Tiny::new(&[("overlap", overlap)]);
        let input = frame(1);
        let (early, info) = buffer(&input, gst_video::VideoFormat::Rgb, 500);
        t.h.set_src_caps(info.to_caps().unwrap());
        // Downstream says: 1 s late at running time 1 s, so nothing before 2 s is worth doing.
        let qos = gst::event::Qos::new(gst::QOSType::Underflow, 1.0, 1_000_000_000, gst::ClockTime::from_seconds(1));
        assert!(t.h.push_upstream_event(qos));
        assert_eq!(t.h.push(early), Ok(gst::FlowSuccess::Ok));
        t.drain();
        assert_eq!(t.h.buffers_in_queue(), 0, "overlap={overlap}: a late frame was processed");
        let qos_messages = std::iter::from_fn(|| t.bus.pop_filtered(&[gst::MessageType::Qos])).count();
        assert_eq!(qos_messages, 1, "overlap={overlap}");
        let (on_time, _) = buffer(&input, gst_video::VideoFormat::Rgb, 5000);
        assert_eq!(t.h.push(on_time), Ok(gst::FlowSuccess::Ok));
        t.drain();
        let out = t.h.pull().unwrap();
        assert_eq!(out.pts(), Some(gst::ClockTime::from_seconds(5)), "overlap={overlap}");
        assert!(out.flags().contains(gst::BufferFlags::DISCONT), "overlap={overlap}: {:?}", out.flags());
    }
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
    assert_eq!(t.anchors(), [(2, "flush".to_string())]);
    assert_eq!(flushed_b, fresh_b, "after a flush the frame is not processed like a first frame");
}

/// `cross-frame-store=host` keeps the store in host memory: the frames are exactly those of the
/// store on the device, the followers' included; switching it while playing re-anchors.
#[test]
fn the_cross_frame_store_on_the_host_gives_the_same_frames() {
    let format = gst_video::VideoFormat::Rgb;
    let extra = [("scene-cut-threshold", "0")];
    let run = |store: &str| {
        let extra = [extra[0], ("cross-frame-store", store)];
        let mut t = Tiny::new(&extra);
        let frames = (0..3).map(|k| t.process(&frame(k), format, 40 * k as u64)).collect::<Vec<_>>();
        let stats = t.element().property::<gst::Structure>("stats");
        let bytes = |name: &str| stats.get::<u64>(name).unwrap();
        (frames, bytes("cross-frame-bytes"), bytes("cross-frame-device-bytes"))
    };
    let (on_device, device_bytes, device_held) = run("device");
    let (on_host, host_bytes, host_held) = run("host");
    assert!(mean_abs_diff(&on_device[1], &on_device[0]) > 0.5, "frames differ");
    assert_eq!(on_host, on_device, "the host store changes the frames");
    // steps=2 at strength 1: 2 denoising steps, one of them on the device at a time.
    assert_eq!((host_bytes, device_held), (device_bytes, device_bytes));
    assert_eq!(host_held * 2, host_bytes, "the device holds one step's entries");

    let mut t = Tiny::new(&extra);
    t.process(&frame(0), format, 0);
    t.process(&frame(1), format, 40);
    t.element().set_property_from_str("cross-frame-store", "host");
    t.process(&frame(2), format, 80);
    t.process(&frame(3), format, 120);
    let anchors: Vec<u64> = t.anchors().into_iter().map(|(k, _)| k).collect();
    assert_eq!(anchors, [0, 2], "moving the store re-anchors once");
}

/// The `lora` property (comma-separated path[:scale]) is fused at start: it changes the frames,
/// and two entries that add up to the same LoRA weights give the same frames.
#[test]
fn lora_property_changes_the_frames() {
    let input = frame(0);
    let format = gst_video::VideoFormat::Rgb;
    let plain = Tiny::new(&[]).process(&input, format, 0);
    let kohya = fixture("lora/kohya.safetensors");
    let peft = fixture("lora/peft.safetensors");
    let single = format!("{}:1.0", kohya.display());
    let with_lora = Tiny::new(&[("lora", single.as_str())]).process(&input, format, 0);
    let change = mean_abs_diff(&with_lora, &plain);
    assert!(change > 1.0, "the LoRA changed the frame by only {change}");
    // kohya at 1.0 is the PEFT file at 0.5 (alpha 2, rank 4): 0.25 + kohya 0.5 is the same.
    let pair = format!("{}:0.25, {}:0.5", peft.display(), kohya.display());
    let with_pair = Tiny::new(&[("lora", pair.as_str())]).process(&input, format, 0);
    let diff = mean_abs_diff(&with_pair, &with_lora);
    assert!(diff < 0.05, "two entries differ from the equivalent single LoRA by {diff}");
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

/// Five frames with overlap on: nothing comes out until the second frame, then one frame per
/// input, in order, each with its input's PTS, duration and flags; EOS brings the last one
/// before the EOS event. The pixels, flags and anchors are those of overlap off.
#[test]
fn overlap_streams_every_frame_in_order_and_eos_drains() {
    init();
    let format = gst_video::VideoFormat::Bgrx;
    let inputs: Vec<_> = (0..5)
        .map(|k| {
            let (mut buf, info) = buffer(&frame(k), format, 1000 + 40 * k as u64);
            if k % 2 == 1 {
                buf.make_mut().set_flags(gst::BufferFlags::DELTA_UNIT);
            }
            (buf, info)
        })
        .collect();
    let info = inputs[0].1.clone();

    let run = |overlap: &str| {
        let mut t = Tiny::new(&[("overlap", overlap)]);
        t.h.set_src_caps(info.to_caps().unwrap());
        for (k, (buf, _)) in inputs.iter().enumerate() {
            assert_eq!(t.h.push(buf.clone()), Ok(gst::FlowSuccess::Ok));
            let expected = if overlap == "true" { k } else { k + 1 };
            assert_eq!(t.h.buffers_in_queue() as usize, expected, "overlap={overlap}, after input {k}");
        }
        assert!(t.h.push_event(gst::event::Eos::new()));
        assert_eq!(t.h.buffers_in_queue(), 5, "overlap={overlap}: EOS must push the held frame");
        let outputs = t.outputs(&info);
        // The EOS event comes after every buffer.
        loop {
            let event = t.h.try_pull_event().expect("an EOS event");
            if event.type_() == gst::EventType::Eos {
                break;
            }
        }
        let anchors = t.anchors();
        (outputs, anchors)
    };
    let (overlapped, anchors) = run("true");
    let (synchronous, sync_anchors) = run("false");
    for (k, ((pts, duration, flags, pixels), (input, _))) in overlapped.iter().zip(&inputs).enumerate() {
        assert_eq!(*pts, input.pts().unwrap().mseconds(), "frame {k}");
        assert_eq!(*duration, 40, "frame {k}");
        // TAG_MEMORY marks a buffer whose memory was replaced: writing into a buffer that
        // upstream still holds (the test keeps its inputs) writes into a copy.
        let tag = gst::BufferFlags::TAG_MEMORY;
        assert_eq!(*flags - tag, input.flags() - tag, "frame {k}");
        assert_ne!(pixels, &common::read_plane(input, &info), "frame {k} was not stylized");
    }
    assert_eq!(overlapped, synchronous, "overlap changes the output");
    assert_eq!(anchors, sync_anchors);
    assert_eq!(anchors, [(0, "first frame".to_string())]);
}

/// A flush drops the frame in flight; the frames after it come out, the first as a new anchor.
#[test]
fn overlap_flush_drops_the_held_frame() {
    let format = gst_video::VideoFormat::Rgb;
    let mut t = Tiny::new(&[("scene-cut-threshold", "0")]);
    let (a, info) = buffer(&frame(0), format, 0);
    t.h.set_src_caps(info.to_caps().unwrap());
    let (b, _) = buffer(&frame(1), format, 40);
    assert_eq!(t.h.push(a), Ok(gst::FlowSuccess::Ok));
    assert_eq!(t.h.push(b), Ok(gst::FlowSuccess::Ok));
    assert_eq!(t.h.pull().unwrap().pts(), Some(gst::ClockTime::ZERO));

    assert!(t.h.push_event(gst::event::FlushStart::new()));
    assert!(t.h.push_event(gst::event::FlushStop::new(true)));
    assert!(t.h.push_event(gst::event::Segment::new(&gst::FormattedSegment::<gst::ClockTime>::new())));
    assert_eq!(t.h.buffers_in_queue(), 0, "the held frame must not come out after a flush");
    let (c, _) = buffer(&frame(2), format, 2000);
    let (d, _) = buffer(&frame(3), format, 2040);
    assert_eq!(t.h.push(c), Ok(gst::FlowSuccess::Ok));
    assert_eq!(t.h.push(d), Ok(gst::FlowSuccess::Ok));
    assert!(t.h.push_event(gst::event::Eos::new()));
    let pts: Vec<_> = t.outputs(&info).iter().map(|o| o.0).collect();
    assert_eq!(pts, [2000, 2040]);
    assert_eq!(t.anchors().iter().map(|a| a.0).collect::<Vec<_>>(), [0, 2]);

    // The frame after the flush is computed like a first frame.
    let mut fresh = Tiny::new(&[("scene-cut-threshold", "0")]);
    let want = fresh.process(&frame(2), format, 0);
    let mut t2 = Tiny::new(&[("scene-cut-threshold", "0")]);
    t2.process(&frame(0), format, 0);
    assert!(t2.h.push_event(gst::event::FlushStart::new()));
    assert!(t2.h.push_event(gst::event::FlushStop::new(true)));
    assert!(t2.h.push_event(gst::event::Segment::new(&gst::FormattedSegment::<gst::ClockTime>::new())));
    assert_eq!(t2.process(&frame(2), format, 80), want);
}

/// A caps change pushes the held frame before the new caps go downstream.
#[test]
fn overlap_drains_before_a_caps_change() {
    let mut t = Tiny::new(&[]);
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let record = seen.clone();
    t.h.sinkpad().unwrap().add_probe(
        gst::PadProbeType::BUFFER | gst::PadProbeType::EVENT_DOWNSTREAM,
        move |_, info| {
            match &info.data {
                Some(gst::PadProbeData::Buffer(b)) => {
                    record.lock().unwrap().push(format!("buffer {}", b.pts().unwrap().mseconds()))
                }
                Some(gst::PadProbeData::Event(e)) if e.type_() == gst::EventType::Caps => {
                    let gst::EventView::Caps(c) = e.view() else { unreachable!() };
                    let info = gst_video::VideoInfo::from_caps(c.caps()).unwrap();
                    record.lock().unwrap().push(format!("caps {:?}", info.format()));
                }
                _ => {}
            }
            gst::PadProbeReturn::Ok
        },
    );
    let (a, rgb) = buffer(&frame(0), gst_video::VideoFormat::Rgb, 0);
    t.h.set_src_caps(rgb.to_caps().unwrap());
    assert_eq!(t.h.push(a), Ok(gst::FlowSuccess::Ok));
    let (b, bgrx) = buffer(&frame(0), gst_video::VideoFormat::Bgrx, 40);
    t.h.set_src_caps(bgrx.to_caps().unwrap());
    assert_eq!(t.h.push(b), Ok(gst::FlowSuccess::Ok));
    assert!(t.h.push_event(gst::event::Eos::new()));
    assert_eq!(*seen.lock().unwrap(), ["caps Rgb", "buffer 0", "caps Bgrx", "buffer 40"]);
    // Each frame in its own layout (a caps change re-anchors: the same picture twice).
    let first = t.h.pull().unwrap();
    let second = t.h.pull().unwrap();
    assert_eq!(common::read_rgb(&first, &rgb).0, common::read_rgb(&second, &bgrx).0);
    assert_eq!(t.anchors(), [(0, "first frame".to_string()), (1, "caps changed".to_string())]);
}

/// Stream batch: frames come out `steps - 1` frames late (plus the held one), every buffer
/// once, in order, with its own timestamps; EOS drains the batch; the pixels and anchors are
/// those of one frame at a time (within one level of rounding); the latency query counts the
/// frames in the batch.
#[test]
fn stream_batch_streams_every_frame_in_order_and_eos_drains() {
    init();
    let format = gst_video::VideoFormat::Rgbx;
    let inputs: Vec<_> = (0..6).map(|k| buffer(&frame(k % 8), format, 1000 + 40 * k as u64)).collect();
    let info = inputs[0].1.clone();
    let run = |stream_batch: &str| {
        let mut t = Tiny::new(&[("steps", "4"), ("stream-batch", stream_batch), ("latency", "250")]);
        t.h.set_upstream_latency(gst::ClockTime::from_mseconds(10));
        t.h.set_src_caps(info.to_caps().unwrap());
        for (k, (buf, _)) in inputs.iter().enumerate() {
            assert_eq!(t.h.push(buf.clone()), Ok(gst::FlowSuccess::Ok));
            // Overlap holds one frame; the stream batch three more (4 steps).
            let expected = if stream_batch == "true" { k.saturating_sub(3) } else { k };
            assert_eq!(t.h.buffers_in_queue() as usize, expected, "stream-batch={stream_batch}, after input {k}");
        }
        let frames_of_latency = if stream_batch == "true" { 4 } else { 1 };
        assert_eq!(t.h.query_latency(), Some(gst::ClockTime::from_mseconds(10 + 250 + 40 * frames_of_latency)));
        assert!(t.h.push_event(gst::event::Eos::new()));
        assert_eq!(t.h.buffers_in_queue(), 6, "stream-batch={stream_batch}: EOS drains every frame");
        (t.outputs(&info), t.anchors())
    };
    let (streamed, anchors) = run("true");
    let (sequential, sequential_anchors) = run("false");
    assert_eq!(anchors, sequential_anchors);
    for (k, (s, q)) in streamed.iter().zip(&sequential).enumerate() {
        assert_eq!((s.0, s.1), (q.0, q.1), "frame {k}: timestamps");
        assert_eq!(s.0, 1000 + 40 * k as u64, "frame {k} in order");
        let worst = s.3.iter().zip(&q.3).map(|(a, b)| a.abs_diff(*b)).max().unwrap();
        assert!(worst <= 1, "frame {k}: a pixel differs by {worst} levels from one frame at a time");
        assert_ne!(s.3, common::read_plane(&inputs[k].0, &info), "frame {k} was not stylized");
    }
}

/// A flush with frames in the stream batch drops them all; later frames come out.
#[test]
fn stream_batch_flush_drops_the_frames_in_flight() {
    let format = gst_video::VideoFormat::Rgb;
    let mut t = Tiny::new(&[("steps", "4"), ("stream-batch", "true")]);
    let (a, info) = buffer(&frame(0), format, 0);
    t.h.set_src_caps(info.to_caps().unwrap());
    assert_eq!(t.h.push(a), Ok(gst::FlowSuccess::Ok));
    for k in 1..3 {
        assert_eq!(t.h.push(buffer(&frame(k), format, 40 * k as u64).0), Ok(gst::FlowSuccess::Ok));
    }
    assert_eq!(t.h.buffers_in_queue(), 0);
    assert!(t.h.push_event(gst::event::FlushStart::new()));
    assert!(t.h.push_event(gst::event::FlushStop::new(true)));
    assert!(t.h.push_event(gst::event::Segment::new(&gst::FormattedSegment::<gst::ClockTime>::new())));
    for k in 0..2 {
        assert_eq!(t.h.push(buffer(&frame(k + 3), format, 2000 + 40 * k as u64).0), Ok(gst::FlowSuccess::Ok));
    }
    assert!(t.h.push_event(gst::event::Eos::new()));
    let pts: Vec<_> = t.outputs(&info).iter().map(|o| o.0).collect();
    assert_eq!(pts, [2000, 2040], "only the frames after the flush come out");
    // Anchors are posted as frames come out: frame 0 never did.
    assert_eq!(t.anchors(), [(3, "flush".to_string())]);
}

/// Similarity skipping: a repeated frame goes out with the last diffused frame's pixels.
#[test]
fn similarity_skipping_re_emits_the_last_output() {
    let format = gst_video::VideoFormat::Rgb;
    let mut t = Tiny::new(&[("skip-similarity", "0.98"), ("max-skip", "1")]);
    let outputs: Vec<RgbFrame> = [0, 0, 5].iter().map(|&k| t.process(&frame(k), format, 40 * k as u64)).collect();
    assert_eq!(outputs[1], outputs[0], "the repeat is skipped: the last output again");
    assert_ne!(outputs[2], outputs[0], "another frame is diffused");
    let stats = t.element().property::<gst::Structure>("stats");
    let get = |f: &str| stats.get::<u64>(f).unwrap();
    assert_eq!(
        (get("frames-in"), get("frames-out"), get("dropped"), get("skipped"), get("in-flight")),
        (3, 3, 0, 1, 0),
        "{stats}"
    );
    let off = Tiny::new(&[]);
    assert_eq!(off.element().property::<f64>("skip-similarity"), 0.0, "off by default");
}

/// `steps` at the top of its range runs (500 x strength 0.004: 2 steps of the tiny model's
/// "leading" schedule with steps_offset 1, which 1000 steps could not give).
#[test]
fn steps_at_the_maximum_run() {
    let max = sdcrossframe::pipeline::MAX_STEPS.to_string();
    let mut t = Tiny::new(&[("steps", max.as_str()), ("strength", "0.004")]);
    let output = t.process(&frame(0), gst_video::VideoFormat::Rgb, 0);
    assert!(mean_abs_diff(&output, &frame(0)) > 1.0, "the frame was not restyled");
    assert!(t.warnings().is_empty());
}

/// A prompt longer than the text encoder's 77 tokens works, with a warning on the bus that
/// says only its beginning is used (once, not per frame).
#[test]
fn a_very_long_prompt_is_truncated_with_a_warning() {
    let long = "a watercolor painting of a woman with red hair, ".repeat(200);
    let mut t = Tiny::new(&[("prompt", long.as_str())]);
    for k in 0..2 {
        t.process(&frame(k), gst_video::VideoFormat::Rgb, 40 * k as u64);
    }
    let warnings = t.warnings();
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(warnings[0].contains("longer than the text encoder's 77 tokens"), "{warnings:?}");
    let mut short = Tiny::new(&[]);
    short.process(&frame(0), gst_video::VideoFormat::Rgb, 0);
    assert!(short.warnings().is_empty());
}

/// Empty prompts (prompt and negative prompt both "") stylize frames like any other prompt,
/// with guidance on (the empty negative prompt is what diffusers uses by default).
#[test]
fn empty_prompts_give_frames() {
    let mut empty = Tiny::new(&[("prompt", ""), ("negative-prompt", "")]);
    let input = frame(0);
    let output = empty.process(&input, gst_video::VideoFormat::Rgb, 0);
    assert_eq!((output.width, output.height), (input.width, input.height));
    assert!(mean_abs_diff(&output, &input) > 1.0, "the frame was not restyled");
    let mut prompted = Tiny::new(&[]);
    let other = prompted.process(&input, gst_video::VideoFormat::Rgb, 0);
    assert!(mean_abs_diff(&output, &other) > 0.5, "the empty prompt made the prompted frame");
    assert!(empty.warnings().is_empty());
}

/// Copies a directory tree.
fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &to.join(entry.file_name()));
        } else {
            std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
        }
    }
}

fn scratch(tag: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("sdcrossframe-element-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Models in directories whose names are not ASCII load and give the frames of the
/// fixtures' own paths, bit for bit.
#[test]
fn models_under_unicode_paths_load() {
    let dir = scratch("unicode");
    let model = dir.join("模型 ü — ☃/tiny sd ✓");
    let controlnet = dir.join("контрольная сеть/ControlNet ñ");
    copy_dir(&fixture("tiny-sd"), &model);
    copy_dir(&fixture("tiny-controlnet"), &controlnet);
    let mut unicode = Tiny::new(&[("model", model.to_str().unwrap()), ("controlnet", controlnet.to_str().unwrap())]);
    let mut plain = Tiny::new(&[]);
    for k in 0..2 {
        let a = unicode.process(&frame(k), gst_video::VideoFormat::Rgb, 40 * k as u64);
        let b = plain.process(&frame(k), gst_video::VideoFormat::Rgb, 40 * k as u64);
        assert!(a.data == b.data, "frame {k} differs from the fixtures' path's");
    }
    drop(unicode);
    std::fs::remove_dir_all(&dir).ok();
}

/// The model directory is replaced while the element runs (renamed away, a different one put
/// in its place, the old files emptied): the loaded model keeps working, the frames are those
/// of an element that never saw the swap, bit for bit, and nothing is read from the files again
/// (emptied files mapped and read would give other frames or a SIGBUS).
#[test]
fn a_model_directory_replaced_while_running_is_not_read_again() {
    let dir = scratch("replaced");
    let model = dir.join("model");
    copy_dir(&fixture("tiny-sd"), &model);
    let mut swapped = Tiny::new(&[("model", model.to_str().unwrap())]);
    let mut untouched = Tiny::new(&[]);
    let mut outputs = Vec::new();
    for k in 0..4 {
        if k == 2 {
            let away = dir.join("model.old");
            std::fs::rename(&model, &away).unwrap();
            // A different "model": the pipeline's layout with the VAE's weights as the UNet's.
            copy_dir(&fixture("tiny-sd"), &model);
            std::fs::copy(
                model.join("vae/diffusion_pytorch_model.safetensors"),
                model.join("unet/diffusion_pytorch_model.safetensors"),
            )
            .unwrap();
            for component in ["unet", "vae", "text_encoder"] {
                let weights = ["diffusion_pytorch_model.safetensors", "model.safetensors"]
                    .iter()
                    .map(|f| away.join(component).join(f))
                    .find(|p| p.is_file())
                    .unwrap();
                std::fs::File::create(&weights).unwrap(); // truncated to 0 bytes
            }
        }
        let a = swapped.process(&frame(k % 2), gst_video::VideoFormat::Rgb, 40 * k as u64);
        let b = untouched.process(&frame(k % 2), gst_video::VideoFormat::Rgb, 40 * k as u64);
        assert!(a.data == b.data, "frame {k} differs from the untouched element's");
        outputs.push(a);
    }
    assert!(swapped.warnings().is_empty());
    // A restart reads the directory again: the different model is refused by name.
    let element = swapped.element();
    element.set_state(gst::State::Null).unwrap();
    element.set_state(gst::State::Playing).unwrap();
    let (input, _) = common::buffer(&frame(0), gst_video::VideoFormat::Rgb, 1000);
    let _ = swapped.h.push(input);
    let error = std::iter::from_fn(|| {
        swapped.bus.timed_pop_filtered(gst::ClockTime::from_seconds(60), &[gst::MessageType::Error])
    })
    .next()
    .map(|m| match m.view() {
        gst::MessageView::Error(e) => e.error().to_string(),
        _ => unreachable!(),
    })
    .expect("the restart's load error");
    assert!(error.contains(&model.join("unet").display().to_string()), "{error}");
    drop(swapped);
    std::fs::remove_dir_all(&dir).ok();
}
