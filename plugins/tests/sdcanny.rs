//! `sdcanny`: caps, properties, and the edge map against OpenCV's (the engine's fixtures in
//! tests/fixtures/canny) and against the engine's Canny on odd sizes and padded strides.

use std::path::Path;
use std::str::FromStr;

use gst::prelude::*;
use gst_check::Harness;
use sdcrossframe::canny::{self, CannyParams, ImageView};
use sdcrossframe::frame::RgbFrame;

mod common;
use common::{ALL_FORMATS, buffer, fixture, init, read_plane};

/// One plane of a gray PNG (loaded as RGB by the engine).
fn load_gray(path: &Path) -> (usize, usize, Vec<u8>) {
    let rgb = RgbFrame::load(path).unwrap();
    (rgb.width, rgb.height, rgb.data.chunks_exact(3).map(|p| p[0]).collect())
}

/// Runs one frame through sdcanny and returns the output plane without row padding.
fn run(
    props: &[(&str, &dyn ToValue)],
    input: &RgbFrame,
    in_format: gst_video::VideoFormat,
    out_format: &str,
) -> Vec<u8> {
    init();
    let element = gst::ElementFactory::make("sdcanny").build().unwrap();
    for (name, value) in props {
        element.set_property_from_value(name, &value.to_value());
    }
    let mut h = Harness::with_element(&element, Some("sink"), Some("src"));
    let (buf, info) = buffer(input, in_format, 0);
    h.set_src_caps(info.to_caps().unwrap());
    h.set_sink_caps_str(&format!("video/x-raw,format={out_format}"));
    let out = h.push_and_pull(buf).unwrap();
    let caps = h.sinkpad().unwrap().current_caps().unwrap();
    let out_info = gst_video::VideoInfo::from_caps(&caps).unwrap();
    assert_eq!((out_info.width(), out_info.height()), (input.width as u32, input.height as u32));
    assert_eq!(out_info.format().to_str(), out_format);
    read_plane(&out, &out_info)
}

#[test]
fn matches_opencv_on_video_frames_in_every_input_format() {
    for (low, high, l2, suffix) in
        [(50.0, 100.0, false, "50-100"), (100.0, 200.0, false, "100-200"), (50.0, 100.0, true, "50-100-l2")]
    {
        let input = RgbFrame::load(&fixture("canny/frames/portrait-f029-512.png")).unwrap();
        let (w, h, expected) = load_gray(&fixture(&format!("canny/edges/portrait-f029-512-{suffix}.png")));
        assert_eq!((w, h), (512, 512));
        assert!(expected.iter().filter(|&&v| v == 255).count() > 1000);
        let formats: &[gst_video::VideoFormat] =
            if l2 || low != 50.0 { &[gst_video::VideoFormat::Rgb] } else { &ALL_FORMATS };
        for &format in formats {
            // 512x512 is its own default processing size: no scaling.
            let out = run(&[("canny-low", &low), ("canny-high", &high), ("canny-l2", &l2)], &input, format, "GRAY8");
            let differing = out.iter().zip(&expected).filter(|(a, b)| a != b).count();
            assert_eq!(differing, 0, "{format:?} {suffix}: {differing} pixels differ from OpenCV");
        }
    }
}

#[test]
fn rgb_output_replicates_the_edges() {
    let input = RgbFrame::load(&fixture("canny/frames/woman-f019-512.png")).unwrap();
    let (_, _, expected) = load_gray(&fixture("canny/edges/woman-f019-512-50-100.png"));
    let out = run(&[], &input, gst_video::VideoFormat::Bgrx, "RGB");
    assert_eq!(out.len(), 512 * 512 * 3);
    for (px, &e) in out.chunks_exact(3).zip(&expected) {
        assert_eq!(px, [e, e, e]);
    }
}

/// Odd sizes with padded rows: the map is the engine's Canny at the processing size, scaled
/// back to the frame size.
#[test]
fn odd_size_matches_the_engine() {
    let original = RgbFrame::load(&fixture("canny/frames/portrait-f088-orig.png")).unwrap();
    let input = original.resized(962, 506).unwrap();
    let params = CannyParams::default();

    // Processing at the frame's own size (rounded to 8 would change it, so 960x504 is asked
    // for and compared after nearest-neighbour scaling, like the element).
    let processed = input.resized(960, 504).unwrap();
    let edges = canny::canny(&ImageView::packed(&processed.data, 960, 504, 3).unwrap(), &params).unwrap();
    let expected = gstsdcrossframe::video::resize_nearest(&edges.data, 960, 504, 962, 506);
    let out = run(&[("width", &960u32), ("height", &504u32)], &input, gst_video::VideoFormat::Rgb, "GRAY8");
    assert_eq!(out.len(), 962 * 506);
    assert_eq!(out.iter().zip(&expected).filter(|(a, b)| a != b).count(), 0);

    // Default: short side 512 (976x512).
    let processed = input.resized(976, 512).unwrap();
    let edges = canny::canny(&ImageView::packed(&processed.data, 976, 512, 3).unwrap(), &params).unwrap();
    let expected = gstsdcrossframe::video::resize_nearest(&edges.data, 976, 512, 962, 506);
    let out = run(&[], &input, gst_video::VideoFormat::Bgr, "GRAY8");
    assert_eq!(out.iter().zip(&expected).filter(|(a, b)| a != b).count(), 0);
    assert!(out.iter().all(|&v| v == 0 || v == 255));
    assert!(out.iter().filter(|&&v| v == 255).count() > 1000);
}

#[test]
fn caps() {
    init();
    let element = gst::ElementFactory::make("sdcanny").build().unwrap();
    let sink = element.static_pad("sink").unwrap();
    for format in ["RGB", "BGR", "RGBA", "BGRA", "RGBx", "BGRx", "ARGB", "ABGR", "xRGB", "xBGR"] {
        let caps =
            gst::Caps::from_str(&format!("video/x-raw,format={format},width=962,height=506,framerate=30/1")).unwrap();
        assert!(sink.query_accept_caps(&caps), "{format} refused");
    }
    for format in ["I420", "NV12", "GRAY8", "RGB16"] {
        let caps =
            gst::Caps::from_str(&format!("video/x-raw,format={format},width=64,height=64,framerate=30/1")).unwrap();
        assert!(!sink.query_accept_caps(&caps), "{format} accepted");
    }
    let src = element.static_pad("src").unwrap();
    let formats: Vec<String> = src
        .pad_template_caps()
        .structure(0)
        .unwrap()
        .get::<gst::List>("format")
        .unwrap()
        .iter()
        .map(|v| v.get::<String>().unwrap())
        .collect();
    assert_eq!(formats, ["GRAY8", "RGB"]);
}

#[test]
fn properties() {
    init();
    let element = gst::ElementFactory::make("sdcanny").build().unwrap();
    assert_eq!(element.property::<f64>("canny-low"), 50.0);
    assert_eq!(element.property::<f64>("canny-high"), 100.0);
    assert!(!element.property::<bool>("canny-l2"));
    assert_eq!(element.property::<u32>("width"), 0);
    let low = element.find_property("canny-low").unwrap();
    let low = low.downcast_ref::<gst::glib::ParamSpecDouble>().unwrap();
    assert_eq!((low.minimum(), low.maximum()), (0.0, 65535.0));
    assert!(low.flags().contains(gst::PARAM_FLAG_MUTABLE_PLAYING));
    for name in ["canny-low", "canny-high", "canny-l2", "width", "height"] {
        assert!(!element.find_property(name).unwrap().blurb().unwrap_or_default().is_empty(), "{name} has no blurb");
    }
}

#[test]
fn low_above_high_is_an_error_message() {
    init();
    let element = gst::ElementFactory::make("sdcanny")
        .property("canny-low", 120.0)
        .property("canny-high", 100.0)
        .build()
        .unwrap();
    let bus = gst::Bus::new();
    element.set_bus(Some(&bus));
    let mut h = Harness::with_element(&element, Some("sink"), Some("src"));
    let input = RgbFrame::new(16, 16, vec![7; 16 * 16 * 3]).unwrap();
    let (buf, info) = buffer(&input, gst_video::VideoFormat::Rgb, 0);
    h.set_src_caps(info.to_caps().unwrap());
    assert_eq!(h.push(buf), Err(gst::FlowError::Error));
    let msg = bus.pop_filtered(&[gst::MessageType::Error]).expect("an error message");
    let gst::MessageView::Error(err) = msg.view() else { unreachable!() };
    let text = err.error().to_string();
    assert!(text.contains("low threshold 120 is above high threshold 100"), "{text}");
}
