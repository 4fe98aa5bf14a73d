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
//! Not OpenCV, on purpose: 4-channel input (RGBx / RGBA from GStreamer) uses the first three
//! channels only, where OpenCV would also look at the fourth; and an L1 threshold of 2^31 or more
//! gives no edges, where OpenCV's conversion to `int` overflows to -2^31 and every local maximum
//! becomes an edge.
//!
//! The work is done row by row (a ring of three magnitude rows, like OpenCV) from the borrowed
//! rows, so padded GStreamer frames are read in place: gray rows directly, colour rows split into
//! three planes one row at a time (a ring of three split rows), never a copy of the frame. The
//! row loops are written branch-free for the auto-vectorizer, and on x86-64 CPUs with AVX2 a
//! build of them for AVX2 is chosen at run time.

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

/// Scratch space for one plane's Sobel passes: vertical [1 2 1] and [-1 0 1] sums with one
/// replicated pixel on each side (`width + 2`), and the plane's derivatives.
struct PlaneScratch {
    smooth: Vec<i16>,
    diff: Vec<i16>,
    dx: Vec<i16>,
    dy: Vec<i16>,
}

impl PlaneScratch {
    fn new(width: usize) -> Self {
        Self { smooth: vec![0; width + 2], diff: vec![0; width + 2], dx: vec![0; width], dy: vec![0; width] }
    }
}

/// The source rows as planes. Gray rows are read in place; colour rows are split into three
/// planes once each (a ring of three rows), ignoring a 4th channel.
struct Rows<'a> {
    image: ImageView<'a>,
    /// `planes[slot][channel]`, slot = y % 3 (colour only).
    planes: Vec<[Vec<u8>; 3]>,
    /// The source row held by each slot.
    held: [usize; 3],
}

impl<'a> Rows<'a> {
    fn new(image: ImageView<'a>) -> Self {
        let w = image.width;
        let planes = if image.channels == 1 {
            Vec::new()
        } else {
            (0..3).map(|_| [vec![0u8; w], vec![0u8; w], vec![0u8; w]]).collect()
        };
        Self { image, planes, held: [usize::MAX; 3] }
    }

    /// Splits source row `y` into its slot unless it is there already.
    #[inline(always)]
    fn load(&mut self, y: usize) {
        if self.image.channels == 1 || self.held[y % 3] == y {
            return;
        }
        let row = self.image.row(y);
        let [r, g, b] = &mut self.planes[y % 3];
        match self.image.channels {
            3 => split::<3>(row, r, g, b),
            _ => split::<4>(row, r, g, b),
        }
        self.held[y % 3] = y;
    }

    /// Channel `c` of row `y` (loaded).
    #[inline(always)]
    fn plane(&self, y: usize, c: usize) -> &[u8] {
        if self.image.channels == 1 { self.image.row(y) } else { &self.planes[y % 3][c] }
    }
}

#[inline(always)]
fn split<const CN: usize>(row: &[u8], r: &mut [u8], g: &mut [u8], b: &mut [u8]) {
    let (pixels, _) = row.as_chunks::<CN>();
    for (((px, r), g), b) in pixels.iter().zip(r.iter_mut()).zip(g.iter_mut()).zip(b.iter_mut()) {
        *r = px[0];
        *g = px[1];
        *b = px[2];
    }
}

/// 3x3 Sobel of one plane row given the rows above and below (already border-replicated).
#[inline(always)]
fn sobel(
    above: &[u8],
    here: &[u8],
    below: &[u8],
    smooth: &mut [i16],
    diff: &mut [i16],
    dx: &mut [i16],
    dy: &mut [i16],
) {
    let w = here.len();
    let (smooth, diff) = (&mut smooth[..w + 2], &mut diff[..w + 2]);
    for ((((s, d), &a), &b), &c) in
        smooth[1..w + 1].iter_mut().zip(diff[1..w + 1].iter_mut()).zip(&above[..w]).zip(&here[..w]).zip(&below[..w])
    {
        let (a, b, c) = (a as i16, b as i16, c as i16);
        *s = a + 2 * b + c;
        *d = c - a;
    }
    // Replicated left and right columns.
    smooth[0] = smooth[1];
    diff[0] = diff[1];
    smooth[w + 1] = smooth[w];
    diff[w + 1] = diff[w];
    // dx = right - left of the smoothed row, dy = [1 2 1] of the difference row.
    let (s_left, s_right) = (&smooth[..w], &smooth[2..w + 2]);
    let (d_left, d_mid, d_right) = (&diff[..w], &diff[1..w + 1], &diff[2..w + 2]);
    for ((dx, sl), sr) in dx[..w].iter_mut().zip(s_left).zip(s_right) {
        *dx = sr - sl;
    }
    for (((dy, dl), dm), dr) in dy[..w].iter_mut().zip(d_left).zip(d_mid).zip(d_right) {
        *dy = dl + 2 * dm + dr;
    }
}

#[inline(always)]
fn magnitude<const L2: bool>(dx: i16, dy: i16) -> i32 {
    let (dx, dy) = (dx as i32, dy as i32);
    if L2 { dx * dx + dy * dy } else { dx.abs() + dy.abs() }
}

/// Sobel derivatives and magnitudes of row `y` into `out` (the magnitude's padding stays 0).
#[inline(always)]
fn gradient_row<const L2: bool>(rows: &mut Rows, y: usize, scratch: &mut [PlaneScratch; 3], out: &mut GradRow) {
    let h = rows.image.height;
    let w = rows.image.width;
    let (ya, yb) = (y.saturating_sub(1), (y + 1).min(h - 1));
    rows.load(yb);
    let mag = &mut out.mag[1..w + 1];
    if rows.image.channels == 1 {
        let s = &mut scratch[0];
        sobel(
            rows.plane(ya, 0),
            rows.plane(y, 0),
            rows.plane(yb, 0),
            &mut s.smooth,
            &mut s.diff,
            &mut out.dx,
            &mut out.dy,
        );
        for ((m, &dx), &dy) in mag.iter_mut().zip(&out.dx[..w]).zip(&out.dy[..w]) {
            *m = magnitude::<L2>(dx, dy);
        }
        return;
    }
    for (c, s) in scratch.iter_mut().enumerate() {
        sobel(rows.plane(ya, c), rows.plane(y, c), rows.plane(yb, c), &mut s.smooth, &mut s.diff, &mut s.dx, &mut s.dy);
    }
    // Per pixel the first channel with the largest magnitude.
    let [s0, s1, s2] = scratch;
    let (dx0, dy0, dx1, dy1, dx2, dy2) = (&s0.dx[..w], &s0.dy[..w], &s1.dx[..w], &s1.dy[..w], &s2.dx[..w], &s2.dy[..w]);
    let (dx, dy) = (&mut out.dx[..w], &mut out.dy[..w]);
    for i in 0..w {
        let (m0, m1, m2) =
            (magnitude::<L2>(dx0[i], dy0[i]), magnitude::<L2>(dx1[i], dy1[i]), magnitude::<L2>(dx2[i], dy2[i]));
        let (mut m, mut gx, mut gy) = (m0, dx0[i], dy0[i]);
        let take1 = m1 > m;
        m = if take1 { m1 } else { m };
        gx = if take1 { dx1[i] } else { gx };
        gy = if take1 { dy1[i] } else { gy };
        let take2 = m2 > m;
        mag[i] = if take2 { m2 } else { m };
        dx[i] = if take2 { dx2[i] } else { gx };
        dy[i] = if take2 { dy2[i] } else { gy };
    }
}

/// Non-maximum suppression and double threshold of one row. `prev`, `cur.mag` and `next` are
/// padded magnitude rows (`width + 2`); `map_row` is the row's slice of the bordered map
/// (`width + 2`); strong pixels are pushed (as map indices, `row_start` being the index of
/// `map_row[0]`).
///
/// Every pixel is decided without branches (the direction is as good as random on real
/// images), so the compiler vectorizes the loop; then the strong pixels are collected.
#[inline(always)]
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
    let w = cur.dx.len();
    let (dx, dy) = (&cur.dx[..w], &cur.dy[..w]);
    let mag = &cur.mag[..w + 2];
    // Shifted views: index i is pixel x = i; `_l`, `_c`, `_r` are the columns x-1, x, x+1.
    let (m_l, m_c, m_r) = (&mag[..w], &mag[1..w + 1], &mag[2..w + 2]);
    let (p_l, p_c, p_r) = (&prev[..w], &prev[1..w + 1], &prev[2..w + 2]);
    let (n_l, n_c, n_r) = (&next[..w], &next[1..w + 1], &next[2..w + 2]);
    let out = &mut map_row[1..w + 1];
    for i in 0..w {
        // Load everything first: a loop without conditional loads vectorizes.
        let (m, ml, mr) = (m_c[i], m_l[i], m_r[i]);
        let (pl, pc, pr) = (p_l[i], p_c[i], p_r[i]);
        let (nl, nc, nr) = (n_l[i], n_c[i], n_r[i]);
        let (xs, ys) = (dx[i] as i32, dy[i] as i32);
        let ax = xs.abs();
        let ay = ys.abs() << CANNY_SHIFT;
        let tg22x = ax * TG22;
        let tg67x = tg22x + (ax << (CANNY_SHIFT + 1));
        let horizontal = ay < tg22x;
        let vertical = ay > tg67x;
        let anti = (xs ^ ys) < 0;
        // The two neighbours across the edge. Horizontal and vertical: strictly above the first,
        // at least the second (m > b - 1); diagonals: strictly above both.
        let a_diag = if anti { pr } else { pl };
        let b_diag = if anti { nl } else { nr };
        let a = if horizontal {
            ml
        } else if vertical {
            pc
        } else {
            a_diag
        };
        let b = if horizontal {
            mr - 1
        } else if vertical {
            nc - 1
        } else {
            b_diag
        };
        let is_max = (m > low) & (m > a) & (m > b);
        let strong = m > high;
        out[i] = if is_max { if strong { EDGE } else { CANDIDATE } } else { NOT_EDGE };
    }
    map_row[0] = NOT_EDGE;
    map_row[w + 1] = NOT_EDGE;
    for (chunk_index, chunk) in map_row[1..w + 1].chunks(32).enumerate() {
        let mut mask = 0u32;
        for (i, &v) in chunk.iter().enumerate() {
            mask |= ((v == EDGE) as u32) << i;
        }
        while mask != 0 {
            let x = chunk_index * 32 + mask.trailing_zeros() as usize;
            mask &= mask - 1;
            stack.push(row_start + 1 + x as u32);
        }
    }
}

/// Canny edge detection with OpenCV's semantics; see the module docs. The gradients and the
/// non-maximum suppression run in row bands on the thread pool (the result does not depend on
/// the band count: see [`canny_in_bands`]).
pub fn canny(image: &ImageView, params: &CannyParams) -> Result<EdgeMap> {
    canny_in_bands(image, params, crate::parallel::band_count(image.height, 32))
}

/// [`canny`] in `bands` row bands. Each band computes the gradients of its rows and of one
/// row on each side, so its suppression sees exactly what one pass over the image sees; the
/// strong pixels of all bands then grow through the whole map, and which candidates they reach
/// does not depend on the order they are taken in.
#[doc(hidden)]
pub fn canny_in_bands(image: &ImageView, params: &CannyParams, bands: usize) -> Result<EdgeMap> {
    params.validate()?;
    #[cfg(target_arch = "x86_64")]
    let avx2 = std::arch::is_x86_feature_detected!("avx2");
    #[cfg(not(target_arch = "x86_64"))]
    let avx2 = false;
    if params.l2_gradient {
        Ok(canny_impl::<true>(image, params, bands, avx2))
    } else {
        Ok(canny_impl::<false>(image, params, bands, avx2))
    }
}

/// [`canny`] without the AVX2 build, so that tests cover the code path of CPUs without it.
#[doc(hidden)]
pub fn canny_baseline(image: &ImageView, params: &CannyParams) -> Result<EdgeMap> {
    params.validate()?;
    let bands = crate::parallel::band_count(image.height, 32);
    if params.l2_gradient {
        Ok(canny_impl::<true>(image, params, bands, false))
    } else {
        Ok(canny_impl::<false>(image, params, bands, false))
    }
}

fn canny_impl<const L2: bool>(image: &ImageView, params: &CannyParams, bands: usize, avx2: bool) -> EdgeMap {
    use rayon::prelude::*;
    let (w, h) = (image.width, image.height);
    let thresholds = params.integer_thresholds();
    let mw = w + 2;

    // The map has a 1-pixel border of NOT_EDGE so that hysteresis never leaves the image.
    let mut map = vec![NOT_EDGE; mw * (h + 2)];
    let ranges = crate::parallel::split_rows(h, bands);
    let mut chunks = Vec::with_capacity(ranges.len());
    let mut rest = &mut map[mw..mw * (h + 1)];
    for band in &ranges {
        let (chunk, tail) = rest.split_at_mut(band.len() * mw);
        chunks.push((band.clone(), chunk));
        rest = tail;
    }
    let stacks: Vec<Vec<u32>> = chunks
        .into_par_iter()
        .map(|(band, map_rows)| {
            #[cfg(target_arch = "x86_64")]
            if avx2 {
                // SAFETY: the caller checked that the CPU supports AVX2.
                return unsafe { suppress_rows_avx2::<L2>(image, thresholds, band, map_rows) };
            }
            let _ = avx2;
            suppress_rows::<L2>(image, thresholds, band, map_rows)
        })
        .collect();
    let mut stack = stacks.concat();
    hysteresis(&mut map, mw, &mut stack);

    let mut out = vec![0u8; w * h];
    out.par_chunks_mut(w.max(1)).enumerate().for_each(|(y, row)| {
        let source = &map[(y + 1) * mw + 1..(y + 1) * mw + 1 + w];
        for (o, &s) in row.iter_mut().zip(source) {
            *o = if s == EDGE { 255 } else { 0 };
        }
    });
    EdgeMap { width: w, height: h, data: out }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn suppress_rows_avx2<const L2: bool>(
    image: &ImageView,
    thresholds: (i32, i32),
    band: std::ops::Range<usize>,
    map_rows: &mut [u8],
) -> Vec<u32> {
    suppress_rows::<L2>(image, thresholds, band, map_rows)
}

/// Gradients, non-maximum suppression and the double threshold of the rows in `band`, into
/// `map_rows` (those rows of the bordered map); returns the strong pixels' map indices.
#[inline(always)]
fn suppress_rows<const L2: bool>(
    image: &ImageView,
    (low, high): (i32, i32),
    band: std::ops::Range<usize>,
    map_rows: &mut [u8],
) -> Vec<u32> {
    let (w, h) = (image.width, image.height);
    let mw = w + 2;
    let mut rows = Rows::new(*image);
    let mut scratch = [PlaneScratch::new(w), PlaneScratch::new(w), PlaneScratch::new(w)];
    // Ring of rows: previous magnitudes, current row, next row. Rows outside the image are 0.
    let mut prev = vec![0i32; mw];
    let mut cur = GradRow::new(w);
    let mut next = GradRow::new(w);
    let zeros = vec![0i32; mw];
    let mut stack: Vec<u32> = Vec::with_capacity(1 << 10);

    let first = band.start;
    if first > 0 {
        // The row above the band: its magnitudes are the first row's "previous".
        rows.load(first.saturating_sub(2));
        rows.load(first - 1);
        gradient_row::<L2>(&mut rows, first - 1, &mut scratch, &mut cur);
        std::mem::swap(&mut prev, &mut cur.mag);
    } else {
        rows.load(0);
    }
    gradient_row::<L2>(&mut rows, first, &mut scratch, &mut cur);
    for y in band {
        let has_next = y + 1 < h;
        if has_next {
            gradient_row::<L2>(&mut rows, y + 1, &mut scratch, &mut next);
        }
        let next_mag = if has_next { &next.mag[..] } else { &zeros[..] };
        let local = (y - first) * mw;
        suppress_row(
            &prev,
            &cur,
            next_mag,
            low,
            high,
            &mut map_rows[local..local + mw],
            ((y + 1) * mw) as u32,
            &mut stack,
        );
        // Scroll: cur's magnitudes become prev, next becomes cur.
        std::mem::swap(&mut prev, &mut cur.mag);
        std::mem::swap(&mut cur, &mut next);
    }
    stack
}

/// Grows strong edges into 8-connected candidates. Every index on the stack is inside the
/// border, so its 8 neighbours are inside the map.
#[inline(always)]
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
    // Up as bytes, to [0, 1] on the device (the same values as converting here).
    let plane = Tensor::from_slice(&edges.data, (1, 1, edges.height, edges.width), device)?;
    Ok((plane.to_dtype(candle_core::DType::F32)? / 255.0)?.repeat((1, 3, 1, 1))?)
}
