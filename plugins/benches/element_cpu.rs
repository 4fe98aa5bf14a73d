//! The element's own CPU work per frame, stage by stage, without GStreamer or a model: reading a
//! buffer (scaled to the processing size in its own pixel layout, channels picked), the
//! scene-cut thumbnail, Canny, and writing the stylized frame back into a buffer of the input's
//! size. The GPU path scales the result back on the device, so "write" is the byte copy only.
//!
//! `cargo bench -p gst-plugin-sdcrossframe --bench element_cpu [-- FRAME.png]` (release profile). Each line is
//! the median over 30 rounds of the mean of 10 frames. `SDCROSSFRAME_THREADS=1` runs everything
//! on one thread.

use std::hint::black_box;
use std::path::Path;
use std::time::{Duration, Instant};

use gst_video::VideoFormat;
use gstsdcrossframe::video::{self, PixelLayout};
use sdcrossframe::canny::{CannyParams, ImageView, canny};
use sdcrossframe::frame::RgbFrame;
use sdcrossframe::session::luma_thumbnail;

fn median_ms(mut run: impl FnMut()) -> f64 {
    let mut rounds: Vec<Duration> = (0..30)
        .map(|_| {
            let started = Instant::now();
            for _ in 0..10 {
                run();
            }
            started.elapsed() / 10
        })
        .collect();
    rounds.sort();
    rounds[rounds.len() / 2].as_secs_f64() * 1e3
}

/// The frame in `format`'s byte layout (4-byte formats get a fixed filler byte).
fn packed(rgb: &RgbFrame, layout: PixelLayout) -> Vec<u8> {
    let mut data = vec![255u8; rgb.width * rgb.height * layout.bytes];
    video::write_rgb(rgb, &mut data, rgb.width * layout.bytes, layout).expect("write");
    data
}

fn main() {
    // A frame of a real clip; another PNG may be given (a copied binary runs from elsewhere).
    let path =
        std::env::args().skip(1).find(|a| !a.starts_with("--")).map(std::path::PathBuf::from).unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/canny/frames/portrait-f088-orig.png")
        });
    let source = RgbFrame::load(&path).unwrap_or_else(|e| panic!("{}: {e:#}", path.display()));
    let processing = (512, 512);
    let params = CannyParams::default();
    println!("threads: {}", sdcrossframe::parallel::threads());
    for (width, height) in [(480, 360), (1280, 720), (1920, 1080)] {
        let input = source.resized(width, height).expect("resize");
        for format in [VideoFormat::Rgb, VideoFormat::Bgrx] {
            let layout = PixelLayout::of(format).expect("layout");
            let data = packed(&input, layout);
            let stride = width * layout.bytes;
            let read = median_ms(|| {
                black_box(video::to_rgb_scaled(&data, width, height, stride, layout, processing).expect("read"));
            });
            let frame = video::to_rgb_scaled(&data, width, height, stride, layout, processing).expect("read");
            let thumbnail = median_ms(|| {
                black_box(luma_thumbnail(&frame));
            });
            let view = ImageView::new(&frame.data, frame.width, frame.height, 3, frame.width * 3).expect("view");
            let edges = median_ms(|| {
                black_box(canny(&view, &params).expect("canny"));
            });
            let mut out = data.clone();
            let write = median_ms(|| {
                video::write_rgb(&input, &mut out, stride, layout).expect("write");
                black_box(&out);
            });
            println!(
                "{width}x{height} {format:?} -> 512x512: read {read:.2} ms, thumbnail {thumbnail:.2} ms, canny {edges:.2} ms, write {write:.2} ms, total {:.2} ms",
                read + thumbnail + edges + write
            );
        }
    }
}
