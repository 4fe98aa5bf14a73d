//! Canny edges with OpenCV's semantics (`cv2.Canny(image, low, high, L2gradient=...)`,
//! aperture 3), bit-exact with opencv-python 5.0 (checked pixel by pixel in `tests/canny.rs`
//! against `tests/fixtures/canny/`, made by `tests/reference/make_canny_fixtures.py`).
//!
//! What OpenCV does, and this module does the same way:
//! - 3x3 Sobel derivatives (`dx`: [-1 0 1] x [1 2 1]ᵀ, `dy` its transpose) in 16-bit integers,
//!   with replicated borders (`BORDER_REPLICATE`: the row above the first row is the first row,
//!   the column left of the first column is the first column).
//! - Magnitude per channel: `|dx| + |dy|` (L1, the default) or `dx² + dy²` (L2, compared with
//!   squared thresholds). For several channels, each pixel keeps the derivatives of the channel
//!   with the largest magnitude; on equal magnitudes the first channel wins.
//! - Thresholds: L1 compares against `floor(threshold)`; L2 against
//!   `floor(min(threshold, 32767)²)`. A pixel is a candidate when its magnitude is above
//!   `low`, strong when it is also above `high` (both strictly). OpenCV silently swaps
//!   `low > high`; here that is an error.
//! - Non-maximum suppression along 4 directions chosen with fixed-point tan(22.5°)
//!   (`13573 / 2^15`): horizontal `m > left && m >= right`, vertical `m > above && m >= below`,
//!   diagonals strictly greater on both sides. Magnitudes outside the image count as 0.
//! - Hysteresis: every candidate 8-connected (through candidates) to a strong pixel is an edge.
//! - Output 255 on edges, 0 elsewhere; border pixels are treated like any other.
//!
//! Not OpenCV: 4-channel input (RGBx / RGBA from GStreamer) uses the first three channels only,
//! where OpenCV would also look at the fourth.
//!
//! The work is done row by row (a ring of three magnitude rows, like OpenCV) straight from the
//! borrowed rows, so padded GStreamer frames are read in place without copying the frame.

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
    /// Checks that `data` holds `height` rows of `width * channels` bytes, `stride` bytes apart
    /// (the last row needs no padding).
    pub fn new(data: &'a [u8], width: usize, height: usize, channels: usize, stride: usize) -> Result<Self> {
        if width == 0 || height == 0 {
            bail!("Canny input is empty ({width}x{height} pixels)");
        }
        if !matches!(channels, 1 | 3 | 4) {
            bail!("Canny input must have 1, 3 or 4 channels, got {channels}");
        }
        let row_bytes = match width.checked_mul(channels) {
            Some(n) => n,
            None => bail!("Canny input of {width} pixels x {channels} channels is too large"),
        };
        if stride < row_bytes {
            bail!("row stride {stride} is smaller than {width} pixels x {channels} channels = {row_bytes} bytes");
        }
        let needed = stride.checked_mul(height - 1).and_then(|n| n.checked_add(row_bytes));
        match needed {
            Some(needed) if data.len() >= needed => {}
            Some(needed) => bail!(
                "image of {width}x{height}x{channels} with stride {stride} needs {needed} bytes, got {}",
                data.len()
            ),
            None => bail!("image of {width}x{height}x{channels} with stride {stride} is too large"),
        }
        // Neighbour offsets in the edge map are kept in u32 (pixels plus a 1-pixel border).
        if (width + 2).checked_mul(height + 2).is_none_or(|n| n > u32::MAX as usize) {
            bail!("Canny input of {width}x{height} pixels is too large");
        }
        Ok(Self { data, width, height, channels, stride })
    }

    /// A tightly packed image (`stride = width * channels`).
    pub fn packed(data: &'a [u8], width: usize, height: usize, channels: usize) -> Result<Self> {
        Self::new(data, width, height, channels, width.saturating_mul(channels))
    }

    pub fn width(&self) -> usize {
        self.width
    }

    pub fn height(&self) -> usize {
        self.height
    }

    pub fn channels(&self) -> usize {
        self.channels
    }

    pub fn stride(&self) -> usize {
        self.stride
    }

    fn row(&self, y: usize) -> &'a [u8] {
        let start = y * self.stride;
        &self.data[start..start + self.width * self.channels]
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
    pub fn new(low: f64, high: f64) -> Self {
        Self { low, high, l2_gradient: false }
    }

    pub fn validate(&self) -> Result<()> {
        for (name, value) in [("low", self.low), ("high", self.high)] {
            if value.is_nan() || value.is_infinite() {
                bail!("Canny {name} threshold must be a finite number, got {value}");
            }
            if value < 0.0 {
                bail!("Canny {name} threshold {value} is negative");
            }
        }
        if self.low > self.high {
            bail!("Canny low threshold {} is above high threshold {}", self.low, self.high);
        }
        Ok(())
    }

    /// The integer thresholds OpenCV compares magnitudes against (see the module docs).
    fn integer_thresholds(&self) -> (i32, i32) {
        let convert = |t: f64| {
            let t = if self.l2_gradient {
                let t = t.min(32767.0);
                t * t
            } else {
                t
            };
            // Magnitudes never exceed 2 * 1020² (L2) or 2040 (L1): clamping keeps the result.
            t.floor().min(i32::MAX as f64) as i32
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

/// tan(22.5°) in fixed point with 15 fractional bits, rounded (OpenCV's `TG22`).
const TG22: i32 = 13573;
const CANNY_SHIFT: u32 = 15;

/// Map values during non-maximum suppression and hysteresis (OpenCV's encoding).
const CANDIDATE: u8 = 0;
const NOT_EDGE: u8 = 1;
const EDGE: u8 = 2;

/// Per-row scratch space for the Sobel passes.
struct Scratch {
    /// Vertical [1 2 1] and [-1 0 1] sums per byte of the row, with one replicated pixel of
    /// padding on each side (`(width + 2) * channels`).
    smooth: Vec<i16>,
    diff: Vec<i16>,
    /// Per-channel derivatives before picking the channel (multi-channel only).
    dx_all: Vec<i16>,
    dy_all: Vec<i16>,
}

/// One row's derivatives (of the chosen channel) and magnitudes; `mag` has a zero on each side.
struct GradRow {
    dx: Vec<i16>,
    dy: Vec<i16>,
    mag: Vec<i32>,
}

impl GradRow {
    fn new(width: usize) -> Self {
        Self { dx: vec![0; width], dy: vec![0; width], mag: vec![0; width + 2] }
    }
}

#[inline(always)]
fn magnitude<const L2: bool>(dx: i16, dy: i16) -> i32 {
    let (dx, dy) = (dx as i32, dy as i32);
    if L2 { dx * dx + dy * dy } else { dx.abs() + dy.abs() }
}

/// Sobel derivatives and magnitudes of row `y` into `out` (the magnitude's padding stays 0).
fn gradient_row<const L2: bool>(image: &ImageView, y: usize, scratch: &mut Scratch, out: &mut GradRow) {
    let (w, h, cn) = (image.width, image.height, image.channels);
    let n = w * cn;
    let above = image.row(y.saturating_sub(1));
    let here = image.row(y);
    let below = image.row((y + 1).min(h - 1));

    // Vertical pass over every byte of the row.
    {
        let smooth = &mut scratch.smooth[cn..cn + n];
        let diff = &mut scratch.diff[cn..cn + n];
        for ((((s, d), &a), &b), &c) in smooth.iter_mut().zip(diff.iter_mut()).zip(above).zip(here).zip(below) {
            let (a, b, c) = (a as i16, b as i16, c as i16);
            *s = a + 2 * b + c;
            *d = c - a;
        }
    }
    // Replicated left and right columns.
    for k in 0..cn {
        scratch.smooth[k] = scratch.smooth[cn + k];
        scratch.diff[k] = scratch.diff[cn + k];
        scratch.smooth[cn + n + k] = scratch.smooth[n + k];
        scratch.diff[cn + n + k] = scratch.diff[n + k];
    }

    // Horizontal pass: dx = right - left of the smoothed row, dy = [1 2 1] of the difference.
    let (dx_dst, dy_dst) = if cn == 1 {
        (&mut out.dx[..], &mut out.dy[..])
    } else {
        (&mut scratch.dx_all[..n], &mut scratch.dy_all[..n])
    };
    {
        let (s, d) = (&scratch.smooth, &scratch.diff);
        let (s_left, s_right) = (&s[..n], &s[2 * cn..2 * cn + n]);
        let (d_left, d_mid, d_right) = (&d[..n], &d[cn..cn + n], &d[2 * cn..2 * cn + n]);
        for (((dx, sl), sr), ((dy, dl), (dm, dr))) in dx_dst
            .iter_mut()
            .zip(s_left)
            .zip(s_right)
            .zip(dy_dst.iter_mut().zip(d_left).zip(d_mid.iter().zip(d_right)))
        {
            *dx = sr - sl;
            *dy = dl + 2 * dm + dr;
        }
    }

    let mag = &mut out.mag[1..w + 1];
    match cn {
        1 => {
            for ((m, &dx), &dy) in mag.iter_mut().zip(&out.dx).zip(&out.dy) {
                *m = magnitude::<L2>(dx, dy);
            }
        }
        3 => pick_channel::<3, L2>(&scratch.dx_all[..n], &scratch.dy_all[..n], &mut out.dx, &mut out.dy, mag),
        4 => pick_channel::<4, L2>(&scratch.dx_all[..n], &scratch.dy_all[..n], &mut out.dx, &mut out.dy, mag),
        _ => unreachable!("channels checked by ImageView::new"),
    }
}

/// Keeps, per pixel, the derivatives of the first of the first three channels with the largest
/// magnitude.
fn pick_channel<const CN: usize, const L2: bool>(
    dx_all: &[i16],
    dy_all: &[i16],
    dx_out: &mut [i16],
    dy_out: &mut [i16],
    mag_out: &mut [i32],
) {
    let (dx_px, _) = dx_all.as_chunks::<CN>();
    let (dy_px, _) = dy_all.as_chunks::<CN>();
    for ((((gx, gy), dx), dy), m) in dx_px.iter().zip(dy_px).zip(dx_out.iter_mut()).zip(dy_out.iter_mut()).zip(mag_out) {
        let m0 = magnitude::<L2>(gx[0], gy[0]);
        let m1 = magnitude::<L2>(gx[1], gy[1]);
        let m2 = magnitude::<L2>(gx[2], gy[2]);
        let (mut best, mut bx, mut by) = (m0, gx[0], gy[0]);
        if m1 > best {
            (best, bx, by) = (m1, gx[1], gy[1]);
        }
        if m2 > best {
            (best, bx, by) = (m2, gx[2], gy[2]);
        }
        *m = best;
        *dx = bx;
        *dy = by;
    }
}

/// Non-maximum suppression and double threshold of one row. `map_row` is the row's slice of the
/// bordered map (`width + 2`); strong pixels are pushed (as map indices, `row_start` being the
/// index of `map_row[0]`).
#[allow(clippy::too_many_arguments)]
fn suppress_row(
    prev: &[i32],
    cur: &GradRow,
    next: &[i32],
    low: i32,
    high: i32,
    map_row: &mut [u8],
    row_start: u32,
    stack: &mut Vec<u32>,
) {
    const BLOCK: usize = 16;
    let w = cur.dx.len();
    let mag = &cur.mag;
    map_row.fill(NOT_EDGE);
    let mut x0 = 0;
    while x0 < w {
        let x1 = (x0 + BLOCK).min(w);
        // Most of a frame is below the low threshold: skip such blocks in one go.
        if !mag[x0 + 1..x1 + 1].iter().fold(false, |any, &m| any | (m > low)) {
            x0 = x1;
            continue;
        }
        for x in x0..x1 {
            let j = x + 1; // index in the padded magnitude rows
            let m = mag[j];
            if m <= low {
                continue;
            }
            let (xs, ys) = (cur.dx[x] as i32, cur.dy[x] as i32);
            let ax = xs.abs();
            let ay = ys.abs() << CANNY_SHIFT;
            let tg22x = ax * TG22;
            let is_max = if ay < tg22x {
                m > mag[j - 1] && m >= mag[j + 1]
            } else {
                let tg67x = tg22x + (ax << (CANNY_SHIFT + 1));
                if ay > tg67x {
                    m > prev[j] && m >= next[j]
                } else if (xs ^ ys) < 0 {
                    // Gradient along the anti-diagonal (image y grows downwards).
                    m > prev[j + 1] && m > next[j - 1]
                } else {
                    m > prev[j - 1] && m > next[j + 1]
                }
            };
            if is_max {
                if m > high {
                    map_row[j] = EDGE;
                    stack.push(row_start + j as u32);
                } else {
                    map_row[j] = CANDIDATE;
                }
            }
        }
        x0 = x1;
    }
}

/// Canny edge detection with OpenCV's semantics; see the module docs.
pub fn canny(image: &ImageView, params: &CannyParams) -> Result<EdgeMap> {
    params.validate()?;
    if params.l2_gradient { Ok(canny_impl::<true>(image, params)) } else { Ok(canny_impl::<false>(image, params)) }
}

fn canny_impl<const L2: bool>(image: &ImageView, params: &CannyParams) -> EdgeMap {
    let (w, h, cn) = (image.width, image.height, image.channels);
    let (low, high) = params.integer_thresholds();
    let mw = w + 2;

    let mut scratch = Scratch {
        smooth: vec![0; (w + 2) * cn],
        diff: vec![0; (w + 2) * cn],
        dx_all: if cn > 1 { vec![0; w * cn] } else { Vec::new() },
        dy_all: if cn > 1 { vec![0; w * cn] } else { Vec::new() },
    };
    // Ring of rows: previous magnitudes, current row, next row. Rows outside the image are 0.
    let mut prev = vec![0i32; mw];
    let mut cur = GradRow::new(w);
    let mut next = GradRow::new(w);
    let zeros = vec![0i32; mw];

    // The map has a 1-pixel border of NOT_EDGE so that hysteresis never leaves the image.
    let mut map = vec![NOT_EDGE; mw * (h + 2)];
    let mut stack: Vec<u32> = Vec::with_capacity(1 << 10);

    gradient_row::<L2>(image, 0, &mut scratch, &mut cur);
    for y in 0..h {
        let has_next = y + 1 < h;
        if has_next {
            gradient_row::<L2>(image, y + 1, &mut scratch, &mut next);
        }
        let next_mag = if has_next { &next.mag[..] } else { &zeros[..] };
        let row_start = (y + 1) * mw;
        suppress_row(&prev, &cur, next_mag, low, high, &mut map[row_start..row_start + mw], row_start as u32, &mut stack);
        // Scroll: cur's magnitudes become prev, next becomes cur.
        std::mem::swap(&mut prev, &mut cur.mag);
        std::mem::swap(&mut cur, &mut next);
    }

    hysteresis(&mut map, mw, &mut stack);

    let mut data = vec![0u8; w * h];
    for (out, row) in data.chunks_exact_mut(w).zip(map.chunks_exact(mw).skip(1)) {
        for (o, &s) in out.iter_mut().zip(&row[1..w + 1]) {
            *o = if s == EDGE { 255 } else { 0 };
        }
    }
    EdgeMap { width: w, height: h, data }
}

/// Grows strong edges into 8-connected candidates. Every index on the stack is inside the
/// border, so its 8 neighbours are inside the map.
fn hysteresis(map: &mut [u8], mw: usize, stack: &mut Vec<u32>) {
    let mw = mw as u32;
    while let Some(i) = stack.pop() {
        for n in [i - mw - 1, i - mw, i - mw + 1, i - 1, i + 1, i + mw - 1, i + mw, i + mw + 1] {
            let cell = &mut map[n as usize];
            if *cell == CANDIDATE {
                *cell = EDGE;
                stack.push(n);
            }
        }
    }
}

/// The ControlNet control image for an edge map: `[1, 3, H, W]` f32 in [0, 1], the edges
/// replicated to three channels.
pub fn control_image(edges: &EdgeMap, device: &Device) -> Result<Tensor> {
    if edges.data.len() != edges.width * edges.height {
        bail!(
            "edge map of {}x{} holds {} bytes, expected {}",
            edges.width,
            edges.height,
            edges.data.len(),
            edges.width * edges.height
        );
    }
    let values: Vec<f32> = edges.data.iter().map(|&v| v as f32 / 255.0).collect();
    let plane = Tensor::from_vec(values, (1, 1, edges.height, edges.width), device)?;
    Ok(plane.repeat((1, 3, 1, 1))?)
}
