//! Nearest 2x upsampling followed by a 3x3 convolution (padding 1, stride 1), as diffusers'
//! `Upsample2D` computes it, in sub-pixel form.
//!
//! Output pixel `(2i + a, 2j + b)` of the convolution over the upsampled map reads upsampled
//! rows `2i + a - 1 ..= 2i + a + 1`, which are input rows `i - 1, i, i` (phase `a = 0`) or
//! `i, i, i + 1` (`a = 1`), and columns likewise. Summing the filter's taps that meet the same
//! input pixel gives each of the four phases `(a, b)` a 2x2 filter over the input, so the whole
//! upsampler is one 2x2 convolution with 4x the output channels over the input padded by one
//! pixel: 16 multiply-adds per input pixel and channel pair instead of 36, and the 4x larger
//! upsampled map is never written. On CUDA it runs channels-last ([`super::channels_last`]): one
//! pass pads and transposes the input to NHWC, cuDNN convolves NHWC data with the NHWC phase
//! filter (no layout copies of its own: they took up to 167 MiB of workspace in a 16-row call),
//! and one pass adds the bias and interleaves the phases into the NCHW output.
//!
//! The phase filters are summed in f32 from the checkpoint's filter and rounded once to the
//! model's dtype, so results differ from the two-step form by rounding only. Used where the
//! resnets run channels-last and `SDCROSSFRAME_UPSAMPLE` is not `nearest`; other target sizes
//! than exactly 2x (odd skip connection sizes) take the two-step form.

use candle_core::{DType, Result, Tensor};

use super::{Conv2d, channels_last};

/// Which input rows (and columns) the upsampled map's rows `2i + a - 1 ..= 2i + a + 1` are, as
/// rows of the 2x2 filter over the padded input: row `r` of phase `a`'s filter sums taps `u` with
/// `TAPS[a][r][u] = 1`.
const TAPS: [[[f32; 3]; 2]; 2] = [[[1., 0., 0.], [0., 1., 1.]], [[1., 1., 0.], [0., 0., 1.]]];

/// An upsampler's 3x3 convolution as four 2x2 phase filters; see the module docs.
#[derive(Debug, Clone)]
pub struct SubpixelUpsample {
    /// (4 x out, in, 2, 2), phase `2a + b` in the `2a + b`-th quarter of the outputs; stored
    /// channels-last.
    phases: Conv2d,
    bias: Tensor,
}

impl SubpixelUpsample {
    /// From the upsampler's 3x3 convolution (padding 1, stride 1, with bias).
    pub fn new(conv: &Conv2d) -> Result<Self> {
        let weight = conv.weight()?;
        let (out, input, kh, kw) = weight.dims4()?;
        let Some(bias) = conv.bias() else {
            candle_core::bail!("sub-pixel upsampler: the convolution has no bias");
        };
        if (kh, kw) != (3, 3) || conv.padding_stride() != (1, 1) {
            candle_core::bail!(
                "sub-pixel upsampler: needs a 3x3 convolution with padding 1 and stride 1, got {kh}x{kw} and (padding, stride) {:?}",
                conv.padding_stride()
            );
        }
        let dtype = weight.dtype();
        let device = weight.device();
        let taps = Tensor::new(&TAPS, device)?; // (phase, 2, 3)
        let flat = weight.to_dtype(DType::F32)?.reshape((out * input, 3, 3))?;
        let mut phases = Vec::with_capacity(4);
        for a in 0..2 {
            for b in 0..2 {
                // rows: taps[a] (2, 3) . w (3, 3) . taps[b]^T (3, 2), for every (out, in) pair.
                let rows = taps.get(a)?.unsqueeze(0)?.broadcast_matmul(&flat)?;
                let both = rows.broadcast_matmul(&taps.get(b)?.t()?.unsqueeze(0)?)?;
                phases.push(both.reshape((out, input, 2, 2))?);
            }
        }
        let phase_weight = Tensor::cat(&phases, 0)?.to_dtype(dtype)?.contiguous()?;
        let phases = Conv2d::from_parts(phase_weight, None, 0, 1)?.to_channels_last()?;
        Ok(Self { phases, bias: bias.clone() })
    }

    /// `xs` (batch, in, height, width) upsampled 2x (nearest) and convolved: (batch, out,
    /// 2 height, 2 width).
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let (_, _, height, width) = xs.dims4()?;
        let padded = channels_last::pad_to_nhwc(xs)?;
        let ys = self.phases.convolve_channels_last(&padded)?;
        channels_last::phases_to_nchw(&ys, &self.bias, (height, width))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::max_abs_diff;
    use candle_core::{Device, Module};

    fn conv(input: usize, out: usize, dev: &Device) -> Conv2d {
        let vb = candle_nn::VarBuilder::from_tensors(
            [
                ("weight".to_string(), Tensor::randn(0f32, 0.3, (out, input, 3, 3), dev).unwrap()),
                ("bias".to_string(), Tensor::randn(0f32, 1.0, out, dev).unwrap()),
            ]
            .into(),
            DType::F32,
            dev,
        );
        Conv2d::same(vb, input, out, 3, 1).unwrap()
    }

    /// The sub-pixel form gives what nearest 2x upsampling and the 3x3 convolution give, at every
    /// border and phase, with other input and output channel counts than the kernels' multiples.
    #[test]
    fn subpixel_upsampler_equals_upsampling_then_convolution() {
        let dev = Device::Cpu;
        for (n, input, out, h, w) in [(2, 5, 7, 3, 4), (1, 8, 8, 1, 1), (1, 3, 16, 6, 2)] {
            let conv = conv(input, out, &dev);
            let xs = Tensor::randn(0f32, 1.0, (n, input, h, w), &dev).unwrap();
            let expected = conv.forward(&xs.upsample_nearest2d(2 * h, 2 * w).unwrap()).unwrap();
            let up = SubpixelUpsample::new(&conv).unwrap();
            let got = up.forward(&xs).unwrap();
            assert_eq!(got.dims(), &[n, out, 2 * h, 2 * w]);
            let diff = max_abs_diff(&got, &expected);
            assert!(diff < 1e-5, "{n}x{input}x{h}x{w} -> {out}: max diff {diff}");
        }
    }

    #[test]
    fn padding_and_phase_layout() {
        let dev = Device::Cpu;
        let xs = Tensor::arange(1f32, 7., &dev).unwrap().reshape((1, 2, 1, 3)).unwrap();
        let padded = channels_last::pad_to_nhwc(&xs).unwrap();
        assert_eq!(padded.dims(), &[1, 3, 5, 2]);
        let rows: Vec<Vec<Vec<f32>>> = padded.squeeze(0).unwrap().to_vec3().unwrap();
        assert_eq!(rows[0], vec![vec![0., 0.]; 5]);
        assert_eq!(rows[1], vec![vec![0., 0.], vec![1., 4.], vec![2., 5.], vec![3., 6.], vec![0., 0.]]);
        assert_eq!(rows[2], vec![vec![0., 0.]; 5]);

        // A 1x1 input of one channel: phase p's value is 10 p + 1, plus the bias 0.5. Phase
        // (a, b) reads y[a][b] in its channel: put each phase's value there and zeros elsewhere.
        let mut v = vec![0f32; 2 * 2 * 4];
        for (phase, value) in [1f32, 11., 21., 31.].into_iter().enumerate() {
            let (a, b) = (phase / 2, phase % 2);
            v[(a * 2 + b) * 4 + phase] = value;
        }
        let ys = Tensor::from_vec(v, (1, 2, 2, 4), &dev).unwrap();
        let bias = Tensor::new(&[0.5f32], &dev).unwrap();
        let out = channels_last::phases_to_nchw(&ys, &bias, (1, 1)).unwrap();
        assert_eq!(out.flatten_all().unwrap().to_vec1::<f32>().unwrap(), vec![1.5, 11.5, 21.5, 31.5]);
        let err = channels_last::phases_to_nchw(&ys, &bias, (2, 1)).unwrap_err().to_string();
        assert!(err.contains("is not the 4 phases of a 2x1 input"), "{err}");
    }
}
