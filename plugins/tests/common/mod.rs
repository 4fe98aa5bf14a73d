//! Helpers shared by the element tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use gst_video::prelude::*;
use std::sync::Arc;
use std::sync::Once;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use sdcrossframe::frame::RgbFrame;

pub fn init() {
    static INIT: Once = Once::new();
    INIT.call_once(|| {
        // What G_DEBUG=fatal_warnings does: GLib warnings and criticals abort the test.
        gst::glib::log_set_always_fatal(gst::glib::LogLevels::LEVEL_WARNING | gst::glib::LogLevels::LEVEL_CRITICAL);
        gst::init().unwrap();
        gstsdcrossframe::plugin_register_static().expect("plugin registers");
    });
}

pub fn fixture(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures").join(path)
}

pub const ALL_FORMATS: [gst_video::VideoFormat; 10] = [
    gst_video::VideoFormat::Rgb,
    gst_video::VideoFormat::Bgr,
    gst_video::VideoFormat::Rgba,
    gst_video::VideoFormat::Bgra,
    gst_video::VideoFormat::Rgbx,
    gst_video::VideoFormat::Bgrx,
    gst_video::VideoFormat::Argb,
    gst_video::VideoFormat::Abgr,
    gst_video::VideoFormat::Xrgb,
    gst_video::VideoFormat::Xbgr,
];

/// Offsets of R, G, B and the pixel size, written out independently of the plugin's table.
fn layout(format: gst_video::VideoFormat) -> (usize, usize, usize, usize) {
    use gst_video::VideoFormat as F;
    match format {
        F::Rgb => (0, 1, 2, 3),
        F::Bgr => (2, 1, 0, 3),
        F::Rgbx | F::Rgba => (0, 1, 2, 4),
        F::Bgrx | F::Bgra => (2, 1, 0, 4),
        F::Xrgb | F::Argb => (1, 2, 3, 4),
        F::Xbgr | F::Abgr => (3, 2, 1, 4),
        other => panic!("no layout for {other:?}"),
    }
}

/// The byte of pixel (x, y) that is neither R, G nor B, in 4-byte formats.
pub fn alpha_pattern(x: usize, y: usize) -> u8 {
    (x * 7 + y * 13) as u8
}

pub fn video_info(format: gst_video::VideoFormat, width: usize, height: usize) -> gst_video::VideoInfo {
    gst_video::VideoInfo::builder(format, width as u32, height as u32).fps(gst::Fraction::new(25, 1)).build().unwrap()
}

/// A buffer holding `rgb` in `format`, rows padded as GStreamer pads them; the 4th byte of
/// 4-byte formats holds `alpha_pattern`, padding bytes 0xAB.
pub fn buffer(rgb: &RgbFrame, format: gst_video::VideoFormat, pts_ms: u64) -> (gst::Buffer, gst_video::VideoInfo) {
    let info = video_info(format, rgb.width, rgb.height);
    let mut buffer = gst::Buffer::with_size(info.size()).unwrap();
    {
        let buffer = buffer.get_mut().unwrap();
        buffer.set_pts(gst::ClockTime::from_mseconds(pts_ms));
        buffer.set_duration(gst::ClockTime::from_mseconds(40));
        let mut frame = gst_video::VideoFrameRef::from_buffer_ref_writable(buffer, &info).unwrap();
        let stride = frame.plane_stride()[0] as usize;
        let data = frame.plane_data_mut(0).unwrap();
        let (r, g, b, bytes) = layout(format);
        let a = 6 - r - g - b;
        data.fill(0xAB);
        for y in 0..rgb.height {
            for x in 0..rgb.width {
                let s = &rgb.data[(y * rgb.width + x) * 3..][..3];
                let d = &mut data[y * stride + x * bytes..][..bytes];
                d[r] = s[0];
                d[g] = s[1];
                d[b] = s[2];
                if bytes == 4 {
                    d[a] = alpha_pattern(x, y);
                }
            }
        }
    }
    (buffer, info)
}

/// The RGB content of a buffer, and whether every 4th byte still holds `alpha_pattern`.
pub fn read_rgb(buffer: &gst::Buffer, info: &gst_video::VideoInfo) -> (RgbFrame, bool) {
    let frame = gst_video::VideoFrameRef::from_buffer_ref_readable(buffer.as_ref(), info).unwrap();
    let stride = frame.plane_stride()[0] as usize;
    let data = frame.plane_data(0).unwrap();
    let (r, g, b, bytes) = layout(info.format());
    let a = 6 - r - g - b;
    let (w, h) = (info.width() as usize, info.height() as usize);
    let mut rgb = Vec::with_capacity(w * h * 3);
    let mut alpha_kept = true;
    for y in 0..h {
        for x in 0..w {
            let p = &data[y * stride + x * bytes..][..bytes];
            rgb.extend_from_slice(&[p[r], p[g], p[b]]);
            if bytes == 4 && p[a] != alpha_pattern(x, y) {
                alpha_kept = false;
            }
        }
    }
    (RgbFrame::new(w, h, rgb).unwrap(), alpha_kept)
}

/// Plane 0 without row padding.
pub fn read_plane(buffer: &gst::Buffer, info: &gst_video::VideoInfo) -> Vec<u8> {
    let frame = gst_video::VideoFrameRef::from_buffer_ref_readable(buffer.as_ref(), info).unwrap();
    let stride = frame.plane_stride()[0] as usize;
    let row = info.width() as usize * info.format_info().pixel_stride()[0] as usize;
    let data = frame.plane_data(0).unwrap();
    (0..info.height() as usize).flat_map(|y| data[y * stride..y * stride + row].to_vec()).collect()
}

/// Aborts the process if the guard lives longer than `limit`: a deadlock fails the run
/// instead of hanging it.
pub struct Watchdog(Arc<AtomicBool>);

impl Watchdog {
    pub fn new(name: &'static str, limit: Duration) -> Self {
        let done = Arc::new(AtomicBool::new(false));
        let flag = done.clone();
        std::thread::spawn(move || {
            let step = Duration::from_millis(100);
            let mut waited = Duration::ZERO;
            while waited < limit {
                if flag.load(Ordering::SeqCst) {
                    return;
                }
                std::thread::sleep(step);
                waited += step;
            }
            eprintln!("watchdog: {name} did not finish within {limit:?} (deadlock?)");
            std::process::abort();
        });
        Self(done)
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}
