//! The element's `model` as a single-file checkpoint with its `tokenizer` property: the frames
//! equal those from the diffusers directory the checkpoint was written from.

mod common;
#[path = "../../tests/common/single_file.rs"]
#[allow(dead_code)]
mod single_file;

use std::path::PathBuf;

use gst::prelude::*;
use gst_check::Harness;

use common::{buffer, fixture, init, read_rgb};

fn fixtures() -> PathBuf {
    fixture("")
}

fn stylize(model: &str, tokenizer: Option<&str>) -> Vec<sdcrossframe::frame::RgbFrame> {
    init();
    let element = gst::ElementFactory::make("sdcrossframe").build().unwrap();
    let controlnet = fixture("tiny-controlnet");
    for (name, value) in [
        ("model", model),
        ("controlnet", controlnet.to_str().unwrap()),
        ("prompt", "a beautiful woman with red hair"),
        ("steps", "2"),
        ("strength", "1.0"),
        ("width", "96"),
        ("height", "64"),
        ("overlap", "false"),
    ] {
        element.set_property_from_str(name, value);
    }
    if let Some(tokenizer) = tokenizer {
        element.set_property("tokenizer", tokenizer);
    }
    let mut h = Harness::with_element(&element, Some("sink"), Some("src"));
    (0..2)
        .map(|k| {
            let rgb =
                sdcrossframe::frame::RgbFrame::load(&fixture(&format!("reference/img2img/frame_{k}.png"))).unwrap();
            let (buf, info) = buffer(&rgb, gst_video::VideoFormat::Rgb, 40 * k);
            if k == 0 {
                h.set_src_caps(info.to_caps().unwrap());
            }
            assert_eq!(h.push(buf), Ok(gst::FlowSuccess::Ok));
            read_rgb(&h.pull().unwrap(), &info).0
        })
        .collect()
}

#[test]
fn single_file_checkpoint_with_the_tokenizer_property() {
    let dir = std::env::temp_dir().join(format!("sdcrossframe-element-checkpoint-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let checkpoint = single_file::write_layout("checkpoint", &dir, &Default::default());
    let tokenizer = fixture("tiny-sd/tokenizer");
    let from_file = stylize(checkpoint.to_str().unwrap(), Some(tokenizer.to_str().unwrap()));
    let from_directory = stylize(fixture("tiny-sd").to_str().unwrap(), None);
    assert_eq!(from_file, from_directory, "frames from the single file differ from the directory's");
    std::fs::remove_dir_all(&dir).ok();
}
