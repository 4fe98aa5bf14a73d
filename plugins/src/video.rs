//! Conversions between GStreamer's packed RGB-family frames and the engine's packed RGB.

use anyhow::{Result, bail};
use gst_video::VideoFormat;
use rayon::prelude::*;
use sdcrossframe::frame::RgbFrame;

/// The packed 8-bit RGB-family formats the elements accept, in caps preference order.
pub const RGB_FORMATS: &[VideoFormat] = &[
    VideoFormat::Rgb,
    VideoFormat::Bgr,
    VideoFormat::Rgba,
    VideoFormat::Bgra,
    VideoFormat::Rgbx,
    VideoFormat::Bgrx,
    VideoFormat::Argb,
    VideoFormat::Abgr,
    VideoFormat::Xrgb,
    VideoFormat::Xbgr,
];

/// Where R, G and B sit inside one pixel of a packed format, and the pixel's size in bytes.
/// The remaining byte of 4-byte formats (alpha or padding) is never written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PixelLayout {
    pub r: usize,
    pub g: usize,
    pub b: usize,
    pub bytes: usize,
}

impl PixelLayout {
    pub fn of(format: VideoFormat) -> Option<Self> {
        let (r, g, b, bytes) = match format {
            VideoFormat::Rgb => (0, 1, 2, 3),
            VideoFormat::Bgr => (2, 1, 0, 3),
            VideoFormat::Rgba | VideoFormat::Rgbx => (0, 1, 2, 4),
            VideoFormat::Bgra | VideoFormat::Bgrx => (2, 1, 0, 4),
            VideoFormat::Argb | VideoFormat::Xrgb => (1, 2, 3, 4),
            VideoFormat::Abgr | VideoFormat::Xbgr => (3, 2, 1, 4),
            _ => return None,
        };
        Some(Self { r, g, b, bytes })
    }

    fn is_rgb(&self) -> bool {
        *self == Self { r: 0, g: 1, b: 2, bytes: 3 }
    }
}

fn check_plane(len: usize, width: usize, height: usize, stride: usize, pixel: usize) -> Result<()> {
    if width == 0 || height == 0 {
        bail!("frame size {width}x{height} is empty");
    }
    if stride < width * pixel {
        bail!("row stride {stride} is smaller than {width} pixels x {pixel} bytes");
    }
    let needed = stride * (height - 1) + width * pixel;
    if len < needed {
        bail!("frame of {width}x{height} with stride {stride} needs {needed} bytes, got {len}");
    }
    Ok(())
}

/// Copies a (possibly row-padded) packed frame into tightly packed RGB.
pub fn to_rgb(data: &[u8], width: usize, height: usize, stride: usize, layout: PixelLayout) -> Result<RgbFrame> {
    if layout.is_rgb() {
        return RgbFrame::from_strided(width, height, stride, data);
    }
    check_plane(data.len(), width, height, stride, layout.bytes)?;
    let mut rgb = vec![0u8; width * height * 3];
    // Rows in parallel: at 1280x720 the copy is worth splitting.
    rgb.par_chunks_mut(width * 3).enumerate().for_each(|(y, out)| {
        let row = &data[y * stride..y * stride + width * layout.bytes];
        for (px, o) in row.chunks_exact(layout.bytes).zip(out.chunks_exact_mut(3)) {
            o[0] = px[layout.r];
            o[1] = px[layout.g];
            o[2] = px[layout.b];
        }
    });
    RgbFrame::new(width, height, rgb)
}

/// Tightly packed RGB at `out_width` x `out_height` from a (possibly row-padded) packed frame:
/// scaled first, in the frame's own byte layout, then its channels picked, so the per-pixel
/// work is done at the small size.
pub fn to_rgb_scaled(
    data: &[u8],
    width: usize,
    height: usize,
    stride: usize,
    layout: PixelLayout,
    (out_width, out_height): (usize, usize),
) -> Result<RgbFrame> {
    if (out_width, out_height) == (width, height) {
        return to_rgb(data, width, height, stride, layout);
    }
    check_plane(data.len(), width, height, stride, layout.bytes)?;
    let row = width * layout.bytes;
    let tight: std::borrow::Cow<[u8]> = if stride == row {
        std::borrow::Cow::Borrowed(&data[..row * height])
    } else {
        std::borrow::Cow::Owned((0..height).flat_map(|y| &data[y * stride..y * stride + row]).copied().collect())
    };
    let scaled = sdcrossframe::frame::scale_packed(&tight, width, height, layout.bytes, out_width, out_height)?;
    if layout.is_rgb() {
        return RgbFrame::new(out_width, out_height, scaled);
    }
    to_rgb(&scaled, out_width, out_height, out_width * layout.bytes, layout)
}

/// Writes packed RGB into a (possibly row-padded) frame of the same size; alpha and padding
/// bytes keep their values.
pub fn write_rgb(rgb: &RgbFrame, data: &mut [u8], stride: usize, layout: PixelLayout) -> Result<()> {
    let (width, height) = (rgb.width, rgb.height);
    check_plane(data.len(), width, height, stride, layout.bytes)?;
    // Rows in parallel (the last chunk may be shorter than the stride: it holds the last row).
    data.par_chunks_mut(stride).zip(rgb.data.par_chunks(width * 3)).for_each(|(row, src)| {
        let dst = &mut row[..width * layout.bytes];
        if layout.is_rgb() {
            dst.copy_from_slice(src);
            return;
        }
        for (px, s) in dst.chunks_exact_mut(layout.bytes).zip(src.chunks_exact(3)) {
            px[layout.r] = s[0];
            px[layout.g] = s[1];
            px[layout.b] = s[2];
        }
    });
    Ok(())
}

/// Nearest-neighbour resize of a one-byte-per-pixel plane (keeps binary edge maps binary).
pub fn resize_nearest(data: &[u8], width: usize, height: usize, out_width: usize, out_height: usize) -> Vec<u8> {
    if (width, height) == (out_width, out_height) {
        return data.to_vec();
    }
    let xs: Vec<usize> = (0..out_width).map(|x| ((2 * x + 1) * width / (2 * out_width)).min(width - 1)).collect();
    let mut out = Vec::with_capacity(out_width * out_height);
    for y in 0..out_height {
        let sy = ((2 * y + 1) * height / (2 * out_height)).min(height - 1);
        let row = &data[sy * width..(sy + 1) * width];
        out.extend(xs.iter().map(|&sx| row[sx]));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_all_layouts_with_padding() {
        let (w, h) = (5, 3);
        for &format in RGB_FORMATS {
            let layout = PixelLayout::of(format).unwrap();
            let stride = w * layout.bytes + 7;
            let mut data: Vec<u8> = (0..stride * h).map(|i| (i * 37 % 251) as u8).collect();
            let original = data.clone();
            let rgb = to_rgb(&data, w, h, stride, layout).unwrap();
            // Pixel (1, 2) in the source.
            let px = &original[2 * stride + layout.bytes..];
            assert_eq!(&rgb.data[(2 * w + 1) * 3..(2 * w + 1) * 3 + 3], &[px[layout.r], px[layout.g], px[layout.b]]);
            write_rgb(&rgb, &mut data, stride, layout).unwrap();
            assert_eq!(data, original, "{format:?}");
            let inverted = RgbFrame::new(w, h, rgb.data.iter().map(|v| 255 - v).collect()).unwrap();
            write_rgb(&inverted, &mut data, stride, layout).unwrap();
            for y in 0..h {
                for x in 0..w * layout.bytes {
                    let i = y * stride + x;
                    let channel = x % layout.bytes;
                    if [layout.r, layout.g, layout.b].contains(&channel) {
                        assert_eq!(data[i], 255 - original[i]);
                    } else {
                        assert_eq!(data[i], original[i], "alpha/padding byte changed");
                    }
                }
                // Row padding is untouched.
                assert_eq!(
                    data[y * stride + w * layout.bytes..(y + 1) * stride],
                    original[y * stride + w * layout.bytes..(y + 1) * stride]
                );
            }
        }
    }

    #[test]
    fn short_buffers_are_errors() {
        let layout = PixelLayout::of(VideoFormat::Bgrx).unwrap();
        let err = to_rgb(&[0; 10], 4, 4, 16, layout).unwrap_err().to_string();
        assert!(err.contains("needs 64 bytes, got 10"), "{err}");
        let err = to_rgb(&[0; 64], 4, 4, 8, layout).unwrap_err().to_string();
        assert!(err.contains("stride 8"), "{err}");
    }

    #[test]
    fn nearest_resize() {
        let data = vec![0, 255, 255, 0];
        assert_eq!(resize_nearest(&data, 2, 2, 4, 2), vec![0, 0, 255, 255, 255, 255, 0, 0]);
        assert_eq!(resize_nearest(&data, 2, 2, 2, 2), data);
    }
}
