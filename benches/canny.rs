//! Per-frame time of `canny` on the reference frames, one thread (the function never spawns).
//!
//! `cargo bench --bench canny` (release profile). Compare with
//! `python tests/reference/bench_cv2_canny.py` (cv2.Canny, cv2.setNumThreads(1)) on the same
//! PNGs: 12 RGB frames at 512x512 and the 960x720 frame from tests/fixtures/canny/frames.
//! Each line is the median over rounds of the mean per-frame time in a round.

use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use sdcrossframe::canny::{CannyParams, ImageView, canny};

struct Frame {
    data: Vec<u8>,
    width: usize,
    height: usize,
    channels: usize,
}

fn frames_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/canny/frames")
}

fn load(filter: impl Fn(&str) -> bool, gray: bool) -> Vec<Frame> {
    let mut names: Vec<String> = std::fs::read_dir(frames_dir())
        .expect("tests/fixtures/canny/frames (run tests/reference/make_canny_fixtures.py)")
        .map(|e| e.expect("dir entry").file_name().to_string_lossy().into_owned())
        .filter(|n| filter(n))
        .collect();
    names.sort();
    names
        .iter()
        .map(|name| {
            let image = image::open(frames_dir().join(name)).expect("readable PNG");
            let (width, height) = (image.width() as usize, image.height() as usize);
            let (data, channels) =
                if gray { (image.into_luma8().into_raw(), 1) } else { (image.into_rgb8().into_raw(), 3) };
            Frame { data, width, height, channels }
        })
        .collect()
}

/// Median over rounds of the mean time per frame, in milliseconds.
fn bench(frames: &[Frame], params: &CannyParams) -> f64 {
    let run = || {
        for f in frames {
            let view = ImageView::packed(&f.data, f.width, f.height, f.channels).expect("valid frame");
            black_box(canny(black_box(&view), params).expect("canny"));
        }
    };
    // Warm up, then pick a round size of about 50 ms.
    let start = Instant::now();
    let mut warm = 0;
    while start.elapsed() < Duration::from_millis(300) {
        run();
        warm += 1;
    }
    let per_run = start.elapsed().as_secs_f64() / warm as f64;
    let reps = ((0.05 / per_run).ceil() as usize).max(1);
    let mut rounds: Vec<f64> = (0..25)
        .map(|_| {
            let t = Instant::now();
            for _ in 0..reps {
                run();
            }
            t.elapsed().as_secs_f64() * 1e3 / (reps * frames.len()) as f64
        })
        .collect();
    rounds.sort_by(f64::total_cmp);
    rounds[rounds.len() / 2]
}

fn main() {
    // `cargo bench` passes --bench; a filter argument is not supported (everything runs).
    let rgb_512 = load(|n| n.ends_with("-512.png"), false);
    let rgb_960 = load(|n| n.ends_with("-orig.png") && n.starts_with("woman"), false);
    let gray_512 = load(|n| n.ends_with("-512.png"), true);
    assert!(rgb_512.len() >= 12 && rgb_960.iter().all(|f| (f.width, f.height) == (960, 720)) && !rgb_960.is_empty());

    let l1 = CannyParams::new(50.0, 100.0);
    let l2 = CannyParams { l2_gradient: true, ..l1 };
    let cases: [(&str, &[Frame], CannyParams); 5] = [
        ("rgb 512x512 (50,100) L1", &rgb_512, l1),
        ("rgb 960x720 (50,100) L1", &rgb_960, l1),
        ("rgb 512x512 (50,100) L2", &rgb_512, l2),
        ("rgb 512x512 (100,200) L1", &rgb_512, CannyParams::new(100.0, 200.0)),
        ("gray 512x512 (50,100) L1", &gray_512, l1),
    ];
    for (name, frames, params) in cases {
        println!("canny {name:<26} {:8.3} ms/frame ({} frames)", bench(frames, &params), frames.len());
    }
}
