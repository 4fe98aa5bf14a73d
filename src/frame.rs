//! RGB frames and their conversion to and from model tensors.

use std::path::Path;

use anyhow::{Context, Result, bail};
use candle_core::{DType, Device, Tensor};

/// A tightly packed 8-bit RGB image (row-major, 3 bytes per pixel).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RgbFrame {
    pub width: usize,
    pub height: usize,
    pub data: Vec<u8>,
}

/// The most pixels per side [`RgbFrame::load`] reads (the element's largest processing size).
pub const MAX_IMAGE_SIDE: u32 = 16384;
/// Decoded bytes [`RgbFrame::load`] allows per byte of the file: deflate (PNG) and JPEG
/// compress a plain image at most about 1000:1, a 1-bit palette PNG expands 24 times more.
pub const IMAGE_BYTES_PER_FILE_BYTE: u64 = 4096;
/// The decode budget of small files (64 MiB: a 4096 x 4096 RGB image).
pub const MIN_IMAGE_DECODE_BUDGET: u64 = 64 << 20;

impl RgbFrame {
    pub fn new(width: usize, height: usize, data: Vec<u8>) -> Result<Self> {
        if width == 0 || height == 0 {
            bail!("frame size {width}x{height} is empty");
        }
        if data.len() != width * height * 3 {
            bail!("frame of {width}x{height} RGB needs {} bytes, got {}", width * height * 3, data.len());
        }
        Ok(Self { width, height, data })
    }

    /// Copies an RGB frame out of a buffer whose rows may be padded (`stride` >= 3 * width).
    pub fn from_strided(width: usize, height: usize, stride: usize, data: &[u8]) -> Result<Self> {
        if stride < width * 3 {
            bail!("row stride {stride} is smaller than {} bytes for {width} RGB pixels", width * 3);
        }
        let needed = stride * height.saturating_sub(1) + width * 3;
        if data.len() < needed {
            bail!("frame of {width}x{height} with stride {stride} needs {needed} bytes, got {}", data.len());
        }
        let mut packed = Vec::with_capacity(width * height * 3);
        for row in 0..height {
            packed.extend_from_slice(&data[row * stride..row * stride + width * 3]);
        }
        Self::new(width, height, packed)
    }

    /// Loads a PNG or JPEG file as RGB. The header's size is checked before any pixel buffer
    /// is made: at most [`MAX_IMAGE_SIDE`] per side, and no more decoded bytes than a file of
    /// this size can hold ([`IMAGE_BYTES_PER_FILE_BYTE`] each, at least
    /// [`MIN_IMAGE_DECODE_BUDGET`]), so a damaged or lying header (a small PNG claiming
    /// 100000 x 100000 pixels) is an error naming the file, not a huge allocation.
    pub fn load(path: &Path) -> Result<Self> {
        let open = || -> Result<image::ImageReader<std::io::BufReader<std::fs::File>>> {
            image::ImageReader::open(path)
                .with_context(|| format!("cannot open image {}", path.display()))?
                .with_guessed_format()
                .with_context(|| format!("cannot read image {}", path.display()))
        };
        let file_len = std::fs::metadata(path).with_context(|| format!("cannot open image {}", path.display()))?.len();
        let (w, h) = open()?
            .into_dimensions()
            .with_context(|| format!("cannot decode image {} (PNG or JPEG expected)", path.display()))?;
        if w > MAX_IMAGE_SIDE || h > MAX_IMAGE_SIDE {
            bail!(
                "image {}: its header claims {w}x{h} pixels, more than the {MAX_IMAGE_SIDE} per side sdcrossframe reads \
                 (a damaged file, or scale it down first)",
                path.display()
            );
        }
        let budget = (file_len.saturating_mul(IMAGE_BYTES_PER_FILE_BYTE)).max(MIN_IMAGE_DECODE_BUDGET);
        let rgb_bytes = w as u64 * h as u64 * 3;
        if rgb_bytes > budget {
            bail!(
                "image {}: its header claims {w}x{h} pixels ({} MB decoded) but the file has only {file_len} bytes, \
                 more than any PNG or JPEG of that size decodes to: the header is damaged",
                path.display(),
                rgb_bytes / 1_000_000
            );
        }
        let mut reader = open()?;
        let mut limits = image::Limits::default();
        limits.max_image_width = Some(MAX_IMAGE_SIDE);
        limits.max_image_height = Some(MAX_IMAGE_SIDE);
        // Room for the decoder's own layout (alpha, 16-bit samples) next to the RGB result.
        limits.max_alloc = Some(budget.saturating_mul(4));
        reader.limits(limits);
        let image = reader
            .decode()
            .with_context(|| format!("cannot decode image {} (PNG or JPEG expected)", path.display()))?
            .to_rgb8();
        let (w, h) = image.dimensions();
        Self::new(w as usize, h as usize, image.into_raw()).with_context(|| format!("image {}", path.display()))
    }

    pub fn save_png(&self, path: &Path) -> Result<()> {
        image::save_buffer(path, &self.data, self.width as u32, self.height as u32, image::ExtendedColorType::Rgb8)
            .with_context(|| format!("cannot write {}", path.display()))
    }

    /// Resizes with a SIMD convolution (fast_image_resize) by PIL's bilinear filter: a triangle
    /// widened by the scale when shrinking, so every source pixel counts (antialiased). The
    /// GPU path (`resample`) uses the same weights. A copy at the same size.
    pub fn resized(&self, width: usize, height: usize) -> Result<Self> {
        if (width, height) == (self.width, self.height) {
            return Ok(self.clone());
        }
        Self::new(width, height, scale_packed(&self.data, self.width, self.height, 3, width, height)?)
    }

    /// `[1, 3, H, W]` f32 tensor with values in [0, 1]; the bytes go to the device as they are
    /// and are converted there.
    pub fn to_tensor(&self, device: &Device) -> Result<Tensor> {
        let pixels = Tensor::from_slice(&self.data, (self.height, self.width, 3), device)?;
        Ok((pixels.permute((2, 0, 1))?.to_dtype(DType::F32)? / 255.0)?.unsqueeze(0)?)
    }

    /// From a `[1, 3, H, W]` (or `[3, H, W]`) tensor in [0, 1]; rounds like PIL's conversion in diffusers.
    pub fn from_tensor(image: &Tensor) -> Result<Self> {
        let image = if image.rank() == 4 { image.squeeze(0)? } else { image.clone() };
        let (channels, height, width) = image.dims3()?;
        if channels != 3 {
            bail!("expected a 3-channel image tensor, got {channels} channels");
        }
        let data = (image.to_dtype(DType::F32)?.clamp(0f32, 1f32)? * 255.0)?
            .round()?
            .permute((1, 2, 0))?
            .flatten_all()?
            .to_dtype(DType::U8)?
            .to_vec1::<u8>()?;
        Self::new(width, height, data)
    }
}

/// Scales a tightly packed 8-bit image of `bytes` (3 or 4) bytes per pixel to `out_width` x
/// `out_height` with the same filter as [`RgbFrame::resized`], keeping its byte layout (so a
/// 4-byte BGRx frame can be scaled before its channels are picked, at the small size). Every
/// byte is scaled on its own: a 4th byte is not treated as alpha (GStreamer's padding bytes and
/// alpha-first layouts would otherwise change the colours). The output rows are computed in
/// bands on the thread pool.
pub fn scale_packed(
    data: &[u8],
    width: usize,
    height: usize,
    bytes: usize,
    out_width: usize,
    out_height: usize,
) -> Result<Vec<u8>> {
    let bands = crate::parallel::band_count(out_height, 32);
    scale_packed_in_bands(data, width, height, bytes, (out_width, out_height), bands)
}

/// [`scale_packed`] in `bands` bands. fast_image_resize scales 8-bit images in two passes,
/// vertical first into an 8-bit temporary image, then horizontal; this runs the same two
/// passes itself, each in bands where the pass is exact on its own: the vertical pass in bands
/// of whole columns (no horizontal filtering, so integer column crops change nothing), the
/// horizontal pass in bands of whole rows (each row alone), written straight into the output.
/// The result is byte for byte the one-call result (the tests check many sizes and band counts).
pub fn scale_packed_in_bands(
    data: &[u8],
    width: usize,
    height: usize,
    bytes: usize,
    (out_width, out_height): (usize, usize),
    bands: usize,
) -> Result<Vec<u8>> {
    use fast_image_resize::images::{Image, ImageRef};
    use fast_image_resize::{FilterType, PixelType, ResizeAlg, ResizeOptions, Resizer};
    use rayon::prelude::*;
    let pixel = match bytes {
        3 => PixelType::U8x3,
        4 => PixelType::U8x4,
        other => bail!("cannot scale images of {other} bytes per pixel"),
    };
    let failed = || format!("cannot resize a {width}x{height} frame to {out_width}x{out_height}");
    if out_width == 0 || out_height == 0 || width == 0 || height == 0 {
        bail!("{}", failed());
    }
    let source = ImageRef::new(width as u32, height as u32, data, pixel).with_context(|| {
        format!(
            "a {width}x{height} frame of {bytes} bytes per pixel needs {} bytes, got {}",
            width * height * bytes,
            data.len()
        )
    })?;
    let options = ResizeOptions::new().resize_alg(ResizeAlg::Convolution(FilterType::Bilinear)).use_alpha(false);
    let mut out = vec![0u8; out_width * out_height * bytes];
    if bands <= 1 {
        let mut target = Image::from_slice_u8(out_width as u32, out_height as u32, &mut out, pixel)?;
        Resizer::new().resize(&source, &mut target, &options).with_context(failed)?;
        return Ok(out);
    }

    // Vertical pass: width x height -> width x out_height, in bands of columns.
    let columns = crate::parallel::split_rows(width, bands);
    let pieces: Vec<Vec<u8>> = if out_height == height {
        Vec::new()
    } else {
        columns
            .par_iter()
            .map(|band| -> Result<Vec<u8>> {
                let mut piece = vec![0u8; band.len() * out_height * bytes];
                let mut target = Image::from_slice_u8(band.len() as u32, out_height as u32, &mut piece, pixel)?;
                let crop = options.crop(band.start as f64, 0.0, band.len() as f64, height as f64);
                Resizer::new().resize(&source, &mut target, &crop).with_context(failed)?;
                Ok(piece)
            })
            .collect::<Result<Vec<_>>>()?
    };

    // Horizontal pass: width x out_height -> out_width x out_height, in bands of rows, each
    // gathering its rows of the vertical pass's column pieces first.
    let temp_row = width * bytes;
    let row_bytes = out_width * bytes;
    let rows = crate::parallel::split_rows(out_height, bands);
    let mut chunks = Vec::with_capacity(rows.len());
    let mut rest = &mut out[..];
    for band in &rows {
        let (chunk, tail) = rest.split_at_mut(band.len() * row_bytes);
        chunks.push((band.clone(), chunk));
        rest = tail;
    }
    chunks.into_par_iter().try_for_each(|(band, chunk)| -> Result<()> {
        let gathered: std::borrow::Cow<[u8]> = if pieces.is_empty() {
            std::borrow::Cow::Borrowed(&data[band.start * temp_row..band.end * temp_row])
        } else {
            let mut rows = vec![0u8; band.len() * temp_row];
            for (y, row) in band.clone().zip(rows.chunks_exact_mut(temp_row)) {
                for (columns, piece) in columns.iter().zip(&pieces) {
                    let len = columns.len() * bytes;
                    row[columns.start * bytes..columns.start * bytes + len]
                        .copy_from_slice(&piece[y * len..(y + 1) * len]);
                }
            }
            std::borrow::Cow::Owned(rows)
        };
        if out_width == width {
            chunk.copy_from_slice(&gathered);
            return Ok(());
        }
        let temp = ImageRef::new(width as u32, band.len() as u32, &gathered, pixel)?;
        let mut target = Image::from_slice_u8(out_width as u32, band.len() as u32, chunk, pixel)?;
        Resizer::new().resize(&temp, &mut target, &options).with_context(failed)?;
        Ok(())
    })?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pattern(width: usize, height: usize, bytes: usize) -> Vec<u8> {
        (0..width * height * bytes).map(|i| ((i * 7919) ^ (i >> 5)) as u8).collect()
    }

    #[test]
    fn bands_give_the_whole_image_result() {
        let sizes = [
            ((480, 360), (512, 512)),
            ((1280, 720), (512, 512)),
            ((1280, 720), (912, 512)),
            ((1920, 1080), (512, 288)),
            ((960, 506), (512, 512)),
            ((512, 512), (1280, 720)),
            ((97, 61), (40, 33)),
            ((33, 17), (96, 64)),
            ((100, 64), (40, 64)),
            ((100, 64), (100, 30)),
        ];
        for ((w, h), out) in sizes {
            for bytes in [3, 4] {
                let data = pattern(w, h, bytes);
                let whole = scale_packed_in_bands(&data, w, h, bytes, out, 1).unwrap();
                for bands in [2, 3, 5, 8, 16] {
                    let banded = scale_packed_in_bands(&data, w, h, bytes, out, bands).unwrap();
                    let differing = whole.iter().zip(&banded).filter(|(a, b)| a != b).count();
                    assert_eq!(differing, 0, "{w}x{h} -> {out:?}, {bytes} bytes, {bands} bands");
                }
            }
        }
    }

    #[test]
    fn a_fourth_byte_is_not_alpha() {
        // RGB scaled as 3 bytes and as 4 bytes with a varying 4th byte (padding, or alpha
        // first in ARGB): the colour bytes must agree.
        let (w, h) = (64, 48);
        let rgb = pattern(w, h, 3);
        let mut rgbx = Vec::with_capacity(w * h * 4);
        for (i, px) in rgb.chunks_exact(3).enumerate() {
            rgbx.extend_from_slice(px);
            rgbx.push((i * 31) as u8);
        }
        let scaled3 = scale_packed(&rgb, w, h, 3, 40, 30).unwrap();
        let scaled4 = scale_packed(&rgbx, w, h, 4, 40, 30).unwrap();
        for (a, b) in scaled3.chunks_exact(3).zip(scaled4.chunks_exact(4)) {
            assert_eq!(a, &b[..3]);
        }
    }
}
