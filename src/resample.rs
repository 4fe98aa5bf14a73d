//! Scaling the stylized image back to the input's size on the device that made it.
//!
//! Frames go to the processing size on the CPU, as bytes ([`RgbFrame::resized`]: SIMD, and it
//! overlaps the device's previous frame; Canny needs those bytes anyway), and go up as 8-bit.
//! The stylized image comes back at the input's size: on a GPU it is scaled there before the
//! 8-bit download, by two matrix products (`rows · image · columnsᵀ`) with the same
//! antialiased bilinear (triangle) weights the CPU scaling uses.

use std::collections::HashMap;
use std::sync::Mutex;

use anyhow::{Result, bail};
use candle_core::{DType, Device, Tensor};

use crate::frame::RgbFrame;

/// Weights of PIL's bilinear filter (a triangle) from `input` samples to `output` samples, as a
/// row-major `output x input` matrix. When shrinking the triangle is widened by the scale, so
/// every input sample contributes (antialiasing); rows sum to 1.
pub fn triangle_weights(input: usize, output: usize) -> Vec<f32> {
    let scale = input as f64 / output as f64;
    let support = scale.max(1.0);
    let mut weights = vec![0f32; output * input];
    for (o, row) in weights.chunks_exact_mut(input).enumerate() {
        let center = (o as f64 + 0.5) * scale;
        let first = ((center - support).floor().max(0.0)) as usize;
        let last = ((center + support).ceil() as usize).min(input);
        let mut sum = 0.0;
        for (i, w) in row.iter_mut().enumerate().take(last).skip(first) {
            let distance = ((i as f64 + 0.5 - center) / support).abs();
            let value = (1.0 - distance).max(0.0);
            *w = value as f32;
            sum += value;
        }
        if sum > 0.0 {
            row[first..last].iter_mut().for_each(|w| *w = (*w as f64 / sum) as f32);
        }
    }
    weights
}

/// The process's scaler (its matrices are shared by every session on a device).
pub fn scaler() -> &'static DeviceScaler {
    static SCALER: std::sync::LazyLock<DeviceScaler> = std::sync::LazyLock::new(DeviceScaler::default);
    &SCALER
}

/// Resampling matrices on the device, made once per size pair.
#[derive(Default)]
pub struct DeviceScaler {
    matrices: Mutex<HashMap<(usize, usize), Tensor>>,
}

impl DeviceScaler {
    fn matrix(&self, input: usize, output: usize, device: &Device) -> Result<Tensor> {
        let mut matrices = self.matrices.lock().map_err(|_| anyhow::anyhow!("scaler poisoned by a panic"))?;
        if let Some(m) = matrices.get(&(input, output))
            && m.device().same_device(device)
        {
            return Ok(m.clone());
        }
        let m = Tensor::from_vec(triangle_weights(input, output), (output, input), device)?;
        matrices.insert((input, output), m.clone());
        Ok(m)
    }

    /// Scales `image` (`[1, C, H, W]`, f32) to `width` x `height` on its device.
    pub fn resize(&self, image: &Tensor, width: usize, height: usize) -> Result<Tensor> {
        let (_, channels, in_height, in_width) = image.dims4()?;
        if width == 0 || height == 0 {
            bail!("cannot scale a {in_width}x{in_height} image to {width}x{height}");
        }
        if (in_width, in_height) == (width, height) {
            return Ok(image.clone());
        }
        let device = image.device();
        let rows = self.matrix(in_height, height, device)?; // [h, H]
        let columns = self.matrix(in_width, width, device)?.t()?; // [W, w]
        let planes = image.to_dtype(DType::F32)?.reshape((channels, in_height, in_width))?;
        // [C, H, W] · [W, w] -> [C, H, w], then [h, H] · [C, H, w] -> [C, h, w].
        let narrow = planes.broadcast_matmul(&columns.contiguous()?)?;
        let scaled = rows.broadcast_left(channels)?.matmul(&narrow.contiguous()?)?;
        Ok(scaled.unsqueeze(0)?)
    }

    /// The stylized `image` (`[1, 3, h, w]` in [0, 1]) as a packed frame of `width` x
    /// `height`, scaled on the image's device before the 8-bit download. (On the CPU the
    /// session scales bytes after the download instead: matrix products are slow there.)
    pub fn output(&self, image: &Tensor, width: usize, height: usize) -> Result<RgbFrame> {
        RgbFrame::from_tensor(&self.resize(&image.clamp(0f32, 1f32)?, width, height)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_rows_sum_to_one_and_cover_every_input_when_shrinking() {
        for (input, output) in [(1280, 512), (720, 512), (512, 1280), (7, 3), (3, 7), (5, 5)] {
            let w = triangle_weights(input, output);
            for row in w.chunks_exact(input) {
                let sum: f32 = row.iter().sum();
                assert!((sum - 1.0).abs() < 1e-5, "{input}->{output}: row sums to {sum}");
            }
            if output <= input {
                for i in 0..input {
                    assert!((0..output).any(|o| w[o * input + i] > 0.0), "{input}->{output}: input {i} unused");
                }
            }
        }
        // Same size: the identity.
        let w = triangle_weights(4, 4);
        for o in 0..4 {
            for i in 0..4 {
                assert_eq!(w[o * 4 + i], if o == i { 1.0 } else { 0.0 });
            }
        }
    }

    fn test_frame(width: usize, height: usize) -> RgbFrame {
        let data = (0..width * height * 3).map(|i| ((i * 37 + (i / (width * 3)) * 11) % 256) as u8).collect();
        RgbFrame::new(width, height, data).unwrap()
    }

    /// The device path (matrices, run here on the CPU) and the byte path agree within a few
    /// levels: the same filter, rounded differently.
    #[test]
    fn matrix_scaling_matches_the_byte_scaling() {
        let scaler = DeviceScaler::default();
        for ((w, h), (tw, th)) in [((160, 90), (64, 64)), ((64, 64), (160, 90)), ((97, 61), (40, 24))] {
            let frame = test_frame(w, h);
            let bytes = frame.resized(tw, th).unwrap();
            let image = frame.to_tensor(&Device::Cpu).unwrap();
            let matrix = RgbFrame::from_tensor(&scaler.resize(&image, tw, th).unwrap()).unwrap();
            let worst = bytes.data.iter().zip(&matrix.data).map(|(a, b)| a.abs_diff(*b)).max().unwrap();
            let mean = bytes.data.iter().zip(&matrix.data).map(|(a, b)| a.abs_diff(*b) as f64).sum::<f64>()
                / bytes.data.len() as f64;
            println!("{w}x{h} -> {tw}x{th}: worst {worst} levels, mean {mean:.3}");
            assert!(worst <= 1 && mean < 0.35, "{w}x{h} -> {tw}x{th}: worst {worst}, mean {mean}");
        }
    }
}
