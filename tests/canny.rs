//! Canny parity with OpenCV: every pixel of every case in tests/fixtures/canny/cases.json
//! (made by tests/reference/make_canny_fixtures.py with opencv-python 5.0) must match, for
//! packed rows, padded rows and RGBx input. On a mismatch the test names the case, the number
//! of differing pixels and, for the first few, the gradients OpenCV's rules see there.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use candle_core::Device;
use sdcrossframe::canny::{CannyParams, EdgeMap, ImageView, canny, canny_baseline, canny_in_bands, control_image};
use serde::Deserialize;

#[derive(Deserialize)]
struct Fixtures {
    opencv: String,
    cases: Vec<Case>,
}

#[derive(Deserialize, Clone)]
struct Case {
    name: String,
    input: String,
    channels: usize,
    width: usize,
    height: usize,
    low: f64,
    high: f64,
    l2: bool,
    output: String,
}

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/canny")
}

fn load_fixtures() -> Fixtures {
    let path = fixture_dir().join("cases.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("parsing {}: {e}", path.display()))
}

/// Input pixels, tightly packed, in the file's channel order (RGB or gray).
fn load_input(case: &Case) -> Vec<u8> {
    let path = fixture_dir().join(&case.input);
    let image = image::open(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    let data = match case.channels {
        1 => image.into_luma8().into_raw(),
        3 => image.into_rgb8().into_raw(),
        n => panic!("{}: unexpected channel count {n}", case.name),
    };
    assert_eq!(data.len(), case.width * case.height * case.channels, "{}: input size", case.name);
    data
}

fn load_expected(case: &Case) -> Vec<u8> {
    let path = fixture_dir().join(&case.output);
    let image = image::open(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display())).into_luma8();
    assert_eq!(
        (image.width() as usize, image.height() as usize),
        (case.width, case.height),
        "{}: output size",
        case.name
    );
    let data = image.into_raw();
    assert!(data.iter().all(|&v| v == 0 || v == 255), "{}: expected edges are not 0/255", case.name);
    data
}

fn params(case: &Case) -> CannyParams {
    CannyParams { low: case.low, high: case.high, l2_gradient: case.l2 }
}

/// Independent, slow Sobel at one pixel with replicated borders: (dx, dy, magnitude) per channel.
fn gradients_at(data: &[u8], w: usize, h: usize, cn: usize, x: usize, y: usize, l2: bool) -> Vec<(i32, i32, i32)> {
    let px = |xx: isize, yy: isize, c: usize| {
        let xx = xx.clamp(0, w as isize - 1) as usize;
        let yy = yy.clamp(0, h as isize - 1) as usize;
        data[(yy * w + xx) * cn + c] as i32
    };
    let (x, y) = (x as isize, y as isize);
    (0..cn.min(3))
        .map(|c| {
            let col = |xx| px(xx, y - 1, c) + 2 * px(xx, y, c) + px(xx, y + 1, c);
            let row = |yy| px(x - 1, yy, c) + 2 * px(x, yy, c) + px(x + 1, yy, c);
            let dx = col(x + 1) - col(x - 1);
            let dy = row(y + 1) - row(y - 1);
            let m = if l2 { dx * dx + dy * dy } else { dx.abs() + dy.abs() };
            (dx, dy, m)
        })
        .collect()
}

/// The chosen channel's (dx, dy, magnitude) at a pixel (0 outside the image).
fn chosen_at(data: &[u8], w: usize, h: usize, cn: usize, x: isize, y: isize, l2: bool) -> (i32, i32, i32) {
    if x < 0 || y < 0 || x >= w as isize || y >= h as isize {
        return (0, 0, 0);
    }
    gradients_at(data, w, h, cn, x as usize, y as usize, l2)
        .into_iter()
        .reduce(|best, g| if g.2 > best.2 { g } else { best })
        .expect("at least one channel")
}

/// Compares and, on mismatch, explains the first few differing pixels.
fn compare(case: &Case, variant: &str, input: &[u8], got: &EdgeMap, expected: &[u8]) -> Option<String> {
    let (w, h, cn) = (case.width, case.height, case.channels);
    if (got.width, got.height) != (w, h) || got.data.len() != expected.len() {
        return Some(format!("{} [{variant}]: output is {}x{}, expected {w}x{h}", case.name, got.width, got.height));
    }
    let diffs: Vec<usize> = (0..expected.len()).filter(|&i| got.data[i] != expected[i]).collect();
    if diffs.is_empty() {
        return None;
    }
    let mut report = format!(
        "{} [{variant}] ({w}x{h}x{cn}, low {}, high {}, l2 {}): {} of {} pixels differ",
        case.name,
        case.low,
        case.high,
        case.l2,
        diffs.len(),
        expected.len()
    );
    for &i in diffs.iter().take(5) {
        let (x, y) = (i % w, i / w);
        let channels = gradients_at(input, w, h, cn, x, y, case.l2);
        let (dx, dy, m) = chosen_at(input, w, h, cn, x as isize, y as isize, case.l2);
        let mut neighbours = String::new();
        for ny in -1..=1 {
            for nx in -1..=1 {
                let (_, _, nm) = chosen_at(input, w, h, cn, x as isize + nx, y as isize + ny, case.l2);
                write!(neighbours, "{nm} ").unwrap();
            }
            neighbours.push('|');
        }
        let direction = {
            let (ax, ay) = ((dx.abs() as i64) * 13573, (dy.abs() as i64) << 15);
            if ay < ax {
                "horizontal"
            } else if ay > ax + ((dx.abs() as i64) << 16) {
                "vertical"
            } else if (dx ^ dy) < 0 {
                "anti-diagonal"
            } else {
                "diagonal"
            }
        };
        write!(
            report,
            "\n  at (x {x}, y {y}): OpenCV {}, ours {}; per channel (dx, dy, mag) {channels:?}; chosen dx {dx} dy {dy} \
             magnitude {m}, NMS direction {direction}; 3x3 magnitudes (rows) {neighbours}",
            expected[i], got.data[i]
        )
        .unwrap();
    }
    Some(report)
}

#[test]
fn fixture_set_covers_the_issue() {
    let fixtures = load_fixtures();
    assert!(fixtures.opencv.starts_with("5.0"), "fixtures come from OpenCV {}", fixtures.opencv);
    let frames_512: std::collections::BTreeSet<&str> = fixtures
        .cases
        .iter()
        .filter(|c| c.input.starts_with("frames/") && c.width == 512 && c.height == 512 && c.channels == 3)
        .map(|c| c.input.as_str())
        .collect();
    assert!(frames_512.len() >= 12, "only {} RGB frames at 512x512", frames_512.len());
    for clip in ["portrait", "woman"] {
        assert!(frames_512.iter().any(|f| f.contains(clip)), "no 512x512 frame of {clip}");
        assert!(
            fixtures.cases.iter().any(|c| c.input.contains(clip) && c.input.ends_with("-orig.png")),
            "no original-size frame of {clip}"
        );
    }
    for (low, high) in [(50.0, 100.0), (100.0, 200.0), (0.0, 0.0)] {
        let on_frames =
            fixtures.cases.iter().filter(|c| c.input.starts_with("frames/") && (c.low, c.high) == (low, high));
        assert!(on_frames.count() >= 14, "thresholds ({low}, {high}) missing on some frames");
    }
    assert!(fixtures.cases.iter().any(|c| c.l2 && c.input.starts_with("frames/")), "no L2 case on frames");
    assert!(fixtures.cases.iter().any(|c| c.channels == 1 && c.input.starts_with("frames/")), "no gray frame");
    assert!(fixtures.cases.iter().any(|c| c.width == 1), "no image 1 pixel wide");
}

#[test]
fn matches_opencv_on_every_pixel() {
    let fixtures = load_fixtures();
    let mut failures = Vec::new();
    for case in &fixtures.cases {
        let input = load_input(case);
        let expected = load_expected(case);
        let view = ImageView::packed(&input, case.width, case.height, case.channels).expect("valid view");
        let got = canny(&view, &params(case)).unwrap_or_else(|e| panic!("{}: {e:#}", case.name));
        failures.extend(compare(case, "packed", &input, &got, &expected));
        // The build for CPUs without AVX2 (the same source, compiled without it).
        let got = canny_baseline(&view, &params(case)).unwrap_or_else(|e| panic!("{}: {e:#}", case.name));
        failures.extend(compare(case, "baseline build", &input, &got, &expected));
        // Row bands (the thread pool's split) from one band to more bands than rows.
        for bands in [1, 2, 3, 7, 16, case.height + 1] {
            let got = canny_in_bands(&view, &params(case), bands).unwrap_or_else(|e| panic!("{}: {e:#}", case.name));
            failures.extend(compare(case, &format!("{bands} bands"), &input, &got, &expected));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases differ from OpenCV:\n{}",
        failures.len(),
        fixtures.cases.len(),
        failures.join("\n")
    );
}

/// The same edges from rows padded like GStreamer's (stride > width * channels, the padding
/// filled with junk) and, for RGB, from RGBx with a junk 4th byte.
#[test]
fn padded_rows_and_rgbx_give_the_same_edges() {
    let fixtures = load_fixtures();
    let mut failures = Vec::new();
    let mut checked = 0;
    for case in fixtures.cases.iter().filter(|c| c.low == 50.0 && c.high == 100.0) {
        let input = load_input(case);
        let expected = load_expected(case);
        let (w, h, cn) = (case.width, case.height, case.channels);
        let row = w * cn;

        let stride = row + 13;
        let mut padded = vec![0xA5u8; stride * h];
        for y in 0..h {
            padded[y * stride..y * stride + row].copy_from_slice(&input[y * row..(y + 1) * row]);
        }
        // The last row needs no padding (GStreamer may map exactly up to its end).
        padded.truncate(stride * (h - 1) + row);
        let view = ImageView::new(&padded, w, h, cn, stride).expect("valid padded view");
        let got = canny(&view, &params(case)).expect("canny on padded rows");
        failures.extend(compare(case, "padded stride", &input, &got, &expected));

        if cn == 3 {
            let stride = w * 4 + 8;
            let mut rgbx = vec![0u8; stride * h];
            for y in 0..h {
                for x in 0..w {
                    let src = &input[(y * w + x) * 3..(y * w + x) * 3 + 3];
                    let dst = &mut rgbx[y * stride + x * 4..y * stride + x * 4 + 4];
                    dst[..3].copy_from_slice(src);
                    dst[3] = ((x * 37 + y * 101) % 256) as u8; // junk alpha with strong gradients
                }
            }
            let view = ImageView::new(&rgbx, w, h, 4, stride).expect("valid RGBx view");
            let got = canny(&view, &params(case)).expect("canny on RGBx");
            failures.extend(compare(case, "RGBx", &input, &got, &expected));
        }
        checked += 1;
    }
    assert!(checked >= 20, "only {checked} cases checked");
    assert!(failures.is_empty(), "{} variants differ from OpenCV:\n{}", failures.len(), failures.join("\n"));
}

fn error_text(result: anyhow::Result<impl std::fmt::Debug>) -> String {
    format!("{:#}", result.expect_err("expected an error"))
}

#[test]
fn bad_input_is_a_clear_error() {
    let data = [0u8; 64];
    assert_eq!(error_text(ImageView::new(&data, 0, 4, 1, 0)), "Canny input is empty (0x4 pixels)");
    assert_eq!(error_text(ImageView::new(&data, 4, 0, 3, 12)), "Canny input is empty (4x0 pixels)");
    assert_eq!(error_text(ImageView::new(&data, 4, 4, 2, 8)), "Canny input must have 1, 3 or 4 channels, got 2");
    assert_eq!(
        error_text(ImageView::new(&data, 4, 4, 3, 11)),
        "row stride 11 is smaller than 4 pixels x 3 channels = 12 bytes"
    );
    assert_eq!(error_text(ImageView::new(&data, 4, 5, 3, 16)), "image of 4x5x3 with stride 16 needs 76 bytes, got 64");
    assert!(error_text(ImageView::new(&data, usize::MAX / 2, 2, 3, 0)).contains("too large"));

    let view = ImageView::packed(&data, 8, 8, 1).expect("valid view");
    let cases = [
        (CannyParams::new(120.0, 100.0), "Canny low threshold 120 is above high threshold 100"),
        (CannyParams::new(-1.0, 100.0), "Canny low threshold -1 is negative"),
        (CannyParams::new(10.0, -0.5), "Canny high threshold -0.5 is negative"),
        (CannyParams::new(f64::NAN, 100.0), "Canny low threshold must be a finite number, got NaN"),
        (CannyParams::new(0.0, f64::INFINITY), "Canny high threshold must be a finite number, got inf"),
        (
            CannyParams { low: 200.0, high: 100.5, l2_gradient: true },
            "Canny low threshold 200 is above high threshold 100.5",
        ),
    ];
    for (params, text) in cases {
        assert_eq!(error_text(canny(&view, &params)), text, "{params:?}");
    }
    // Equal thresholds are fine.
    assert!(canny(&view, &CannyParams::new(100.0, 100.0)).is_ok());
}

#[test]
fn control_image_is_three_channels_in_unit_range() {
    let fixtures = load_fixtures();
    let case = fixtures
        .cases
        .iter()
        .find(|c| c.name.starts_with("lines-rgb") && c.low == 50.0 && !c.l2)
        .expect("lines-rgb case")
        .clone();
    let input = load_input(&case);
    let edges = canny(&ImageView::packed(&input, case.width, case.height, 3).unwrap(), &params(&case)).unwrap();
    let control = control_image(&edges, &Device::Cpu).unwrap();
    assert_eq!(control.dims(), &[1, 3, case.height, case.width]);
    let values: Vec<f32> = control.flatten_all().unwrap().to_vec1().unwrap();
    let plane = case.width * case.height;
    for c in 0..3 {
        for (i, &e) in edges.data.iter().enumerate() {
            assert_eq!(values[c * plane + i], if e == 255 { 1.0 } else { 0.0 }, "channel {c}, pixel {i}");
        }
    }
    assert!(edges.data.contains(&255) && edges.data.contains(&0));

    let broken = EdgeMap { width: 4, height: 4, data: vec![0; 15] };
    assert_eq!(error_text(control_image(&broken, &Device::Cpu)), "edge map of 4x4 holds 15 bytes, expected 16");
}
