//! Canny edges with OpenCV's semantics (`cv2.Canny(image, low, high, L2gradient=...)`,
//! aperture 3): 3x3 Sobel with replicated borders, L1 (default) or L2 magnitude, for
//! multi-channel images the channel with the largest magnitude per pixel, non-maximum
//! suppression along 4 directions with OpenCV's fixed-point tan(22.5°) test, hysteresis with
//! 8-connectivity, output 0/255. ControlNet canny models were trained on exactly these edges.

use anyhow::{Result, bail};
use candle_core::{Device, Tensor};

/// A borrowed 8-bit image whose rows may be padded (`stride` >= width * channels), as in
/// GStreamer buffers. Channels: 1 (gray), 3 (RGB/BGR), 4 (RGBx; the 4th byte is ignored).
#[derive(Debug, Clone, Copy)]
pub struct ImageView<'a> {
    data: &'a [u8],
    width: usize,
    height: usize,
    channels: usize,
    stride: usize,
}

impl<'a> ImageView<'a> {
    pub fn new(data: &'a [u8], width: usize, height: usize, channels: usize, stride: usize) -> Result<Self> {
        if width == 0 || height == 0 {
            bail!("Canny input is empty ({width}x{height})");
        }
        if !matches!(channels, 1 | 3 | 4) {
            bail!("Canny input must have 1, 3 or 4 channels, got {channels}");
        }
        if stride < width * channels {
            bail!("row stride {stride} is smaller than {width} pixels x {channels} channels");
        }
        let needed = stride * (height - 1) + width * channels;
        if data.len() < needed {
            bail!("image of {width}x{height}x{channels} with stride {stride} needs {needed} bytes, got {}", data.len());
        }
        Ok(Self { data, width, height, channels, stride })
    }

    pub fn width(&self) -> usize {
        self.width
    }

    pub fn height(&self) -> usize {
        self.height
    }

    fn row(&self, y: usize) -> &'a [u8] {
        &self.data[y * self.stride..y * self.stride + self.width * self.channels]
    }
}

/// Thresholds as `cv2.Canny` takes them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CannyParams {
    pub low: f64,
    pub high: f64,
    /// L2 gradient magnitude (`L2gradient=True`) instead of OpenCV's default L1.
    pub l2_gradient: bool,
}

impl Default for CannyParams {
    /// The original project's `cv2.Canny(rgb, 50, 100)`.
    fn default() -> Self {
        Self { low: 50.0, high: 100.0, l2_gradient: false }
    }
}

impl CannyParams {
    pub fn validate(&self) -> Result<()> {
        if !self.low.is_finite() || !self.high.is_finite() || self.low < 0.0 || self.high < 0.0 {
            bail!("Canny thresholds must be non-negative numbers, got low {} and high {}", self.low, self.high);
        }
        if self.low > self.high {
            bail!("Canny low threshold {} is above the high threshold {}", self.low, self.high);
        }
        Ok(())
    }

    /// Integer thresholds on the magnitude scale OpenCV compares against.
    fn integer_thresholds(&self) -> (i64, i64) {
        let convert = |t: f64| {
            if self.l2_gradient {
                let t = t.min(32767.0);
                (if t > 0.0 { t * t } else { t }).floor() as i64
            } else {
                t.floor() as i64
            }
        };
        (convert(self.low), convert(self.high))
    }
}

/// A binary edge map: 255 on edges, 0 elsewhere; tightly packed rows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EdgeMap {
    pub width: usize,
    pub height: usize,
    pub data: Vec<u8>,
}

/// OpenCV's tan(22.5°) in 15-bit fixed point.
const CANNY_SHIFT: u32 = 15;
const TG22: i64 = 13573; // (0.4142135623730950488 * (1 << 15) + 0.5) as int

/// Sobel derivatives of one row (`y`) with replicated borders, for the channel of largest
/// magnitude per pixel. Fills `dx`, `dy` and `mag` (length `width`).
fn gradient_row(image: &ImageView, y: usize, l2: bool, dx: &mut [i32], dy: &mut [i32], mag: &mut [i64]) {
    let (w, h, cn) = (image.width, image.height, image.channels);
    let channels_used = cn.min(3);
    let above = image.row(y.saturating_sub(1));
    let here = image.row(y);
    let below = image.row((y + 1).min(h - 1));
    for x in 0..w {
        let left = x.saturating_sub(1) * cn;
        let right = (x + 1).min(w - 1) * cn;
        let center = x * cn;
        let mut best: Option<(i64, i32, i32)> = None;
        for c in 0..channels_used {
            let p = |row: &[u8], offset: usize| row[offset + c] as i32;
            let gx = (p(above, right) + 2 * p(here, right) + p(below, right))
                - (p(above, left) + 2 * p(here, left) + p(below, left));
            let gy = (p(below, left) + 2 * p(below, center) + p(below, right))
                - (p(above, left) + 2 * p(above, center) + p(above, right));
            let m = if l2 { (gx as i64) * (gx as i64) + (gy as i64) * (gy as i64) } else { (gx.abs() + gy.abs()) as i64 };
            // Strictly greater: on ties the first channel wins, as in OpenCV.
            if best.is_none_or(|(bm, _, _)| m > bm) {
                best = Some((m, gx, gy));
            }
        }
        let (m, gx, gy) = best.expect("at least one channel");
        dx[x] = gx;
        dy[x] = gy;
        mag[x] = m;
    }
}

/// Canny edge detection with OpenCV's semantics; see the module docs.
pub fn canny(image: &ImageView, params: &CannyParams) -> Result<EdgeMap> {
    params.validate()?;
    let (w, h) = (image.width, image.height);
    let (low, high) = params.integer_thresholds();

    // Gradient magnitudes with a zero border of one pixel on every side, as OpenCV pads them.
    let mw = w + 2;
    let mut mag = vec![0i64; mw * (h + 2)];
    let mut dx = vec![0i32; w * h];
    let mut dy = vec![0i32; w * h];
    for y in 0..h {
        let row = &mut mag[(y + 1) * mw + 1..(y + 1) * mw + 1 + w];
        gradient_row(image, y, params.l2_gradient, &mut dx[y * w..(y + 1) * w], &mut dy[y * w..(y + 1) * w], row);
    }

    // Non-maximum suppression: 0 = not an edge, 1 = weak candidate, 2 = strong edge.
    let mut state = vec![0u8; w * h];
    let mut stack: Vec<usize> = Vec::new();
    for y in 0..h {
        for x in 0..w {
            let j = (y + 1) * mw + (x + 1);
            let m = mag[j];
            if m <= low {
                continue;
            }
            let (xs, ys) = (dx[y * w + x] as i64, dy[y * w + x] as i64);
            let ax = xs.abs();
            let ay = ys.abs() << CANNY_SHIFT;
            let tg22x = ax * TG22;
            let is_max = if ay < tg22x {
                // Gradient mostly horizontal: compare left and right.
                m > mag[j - 1] && m >= mag[j + 1]
            } else {
                let tg67x = tg22x + (ax << (CANNY_SHIFT + 1));
                if ay > tg67x {
                    // Mostly vertical: compare above and below.
                    m > mag[j - mw] && m >= mag[j + mw]
                } else {
                    // Diagonal: the direction's sign picks which diagonal.
                    let s: isize = if (xs ^ ys) < 0 { -1 } else { 1 };
                    m > mag[(j - mw).wrapping_add_signed(-s)] && m > mag[(j + mw).wrapping_add_signed(s)]
                }
            };
            if is_max {
                let index = y * w + x;
                if m > high {
                    state[index] = 2;
                    stack.push(index);
                } else {
                    state[index] = 1;
                }
            }
        }
    }

    // Hysteresis: weak candidates 8-connected to a strong edge become edges.
    while let Some(index) = stack.pop() {
        let (x, y) = (index % w, index / w);
        for ny in y.saturating_sub(1)..=(y + 1).min(h - 1) {
            for nx in x.saturating_sub(1)..=(x + 1).min(w - 1) {
                let n = ny * w + nx;
                if state[n] == 1 {
                    state[n] = 2;
                    stack.push(n);
                }
            }
        }
    }

    let data = state.into_iter().map(|s| if s == 2 { 255 } else { 0 }).collect();
    Ok(EdgeMap { width: w, height: h, data })
}

/// The ControlNet control image for an edge map: `[1, 3, H, W]` f32 in [0, 1], the edges
/// replicated to three channels.
pub fn control_image(edges: &EdgeMap, device: &Device) -> Result<Tensor> {
    let values: Vec<f32> = edges.data.iter().map(|&v| v as f32 / 255.0).collect();
    let plane = Tensor::from_vec(values, (1, 1, edges.height, edges.width), device)?;
    Ok(plane.repeat((1, 3, 1, 1))?)
}
