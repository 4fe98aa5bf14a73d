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

    /// Loads a PNG or JPEG file as RGB.
    pub fn load(path: &Path) -> Result<Self> {
        let image = image::ImageReader::open(path)
            .with_context(|| format!("cannot open image {}", path.display()))?
            .with_guessed_format()
            .with_context(|| format!("cannot read image {}", path.display()))?
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
/// 4-byte BGRx frame can be scaled before its channels are picked, at the small size).
pub fn scale_packed(
    data: &[u8],
    width: usize,
    height: usize,
    bytes: usize,
    out_width: usize,
    out_height: usize,
) -> Result<Vec<u8>> {
    use fast_image_resize::images::{Image, ImageRef};
    use fast_image_resize::{FilterType, PixelType, ResizeAlg, ResizeOptions, Resizer};
    let pixel = match bytes {
        3 => PixelType::U8x3,
        4 => PixelType::U8x4,
        other => bail!("cannot scale images of {other} bytes per pixel"),
    };
    if out_width == 0 || out_height == 0 {
        bail!("cannot resize a {width}x{height} frame to {out_width}x{out_height}");
    }
    let source = ImageRef::new(width as u32, height as u32, data, pixel).with_context(|| {
        format!(
            "a {width}x{height} frame of {bytes} bytes per pixel needs {} bytes, got {}",
            width * height * bytes,
            data.len()
        )
    })?;
    let mut target = Image::new(out_width as u32, out_height as u32, pixel);
    let options = ResizeOptions::new().resize_alg(ResizeAlg::Convolution(FilterType::Bilinear));
    Resizer::new()
        .resize(&source, &mut target, &options)
        .with_context(|| format!("cannot resize a {width}x{height} frame to {out_width}x{out_height}"))?;
    Ok(target.into_vec())
}
