//! Convolution as im2col + one batched GEMM, with the columns laid out so that the GEMM writes
//! the NCHW output directly (`kernels/im2col.cu`).
//!
//! candle's CUDA im2col writes one (pixel, kernel tap) row per output pixel with scattered
//! reads, multiplies, then copies the (pixel, channel) result into NCHW. Here the columns are
//! (batch, channel x tap, pixel): threads copy consecutive pixels of one input row, and
//! `out[n] = W (out, in x taps) @ cols[n]` is the output as it is. It matters for the
//! low-resolution, wide convolutions, where im2col beats cuDNN's NCHW algorithms.
//!
//! The CUDA kernel copies 16-bit values (f16, bf16); the CPU op is a reference for tests.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};

use super::storage::{cpu_from_f32, cpu_to_f32};

/// The column tensor of `xs` for a `kernel` (height, width) convolution.
#[derive(Debug, Clone, Copy)]
struct Columns {
    kernel: (usize, usize),
    padding: usize,
    stride: usize,
}

/// Sizes of one call: input (n, c, h, w), output pixels (oh, ow).
#[derive(Debug, Clone, Copy)]
struct Geometry {
    n: usize,
    c: usize,
    h: usize,
    w: usize,
    oh: usize,
    ow: usize,
}

impl Columns {
    fn geometry(&self, shape: &Shape) -> Result<Geometry> {
        let (n, c, h, w) = shape.dims4()?;
        let (kh, kw) = self.kernel;
        if self.stride == 0 || h + 2 * self.padding < kh || w + 2 * self.padding < kw {
            candle_core::bail!(
                "im2col convolution: input {h}x{w} (padding {}) is smaller than the {kh}x{kw} kernel, or stride 0",
                self.padding
            );
        }
        let oh = (h + 2 * self.padding - kh) / self.stride + 1;
        let ow = (w + 2 * self.padding - kw) / self.stride + 1;
        Ok(Geometry { n, c, h, w, oh, ow })
    }

    fn out_shape(&self, g: &Geometry) -> Shape {
        Shape::from((g.n, g.c * self.kernel.0 * self.kernel.1, g.oh * g.ow))
    }
}

/// `conv2d(xs, weight)` without bias, for xs (n, c, h, w) and weight (out, c, kh, kw), as
/// im2col + GEMM. On CUDA for f16/bf16 (the kernel copies 16-bit values); elsewhere through
/// the CPU reference (tests).
pub fn conv2d_columns(xs: &Tensor, weight: &Tensor, padding: usize, stride: usize) -> Result<Tensor> {
    let (out, wc, kh, kw) = weight.dims4()?;
    let c = xs.dim(1)?;
    if wc != c {
        candle_core::bail!("im2col convolution: input has {c} channels, the filter {:?} expects {wc}", weight.dims());
    }
    let op = Columns { kernel: (kh, kw), padding, stride };
    let g = op.geometry(xs.shape())?;
    let cols = xs.contiguous()?.apply_op1_no_bwd(&op)?;
    let w = weight.to_dtype(xs.dtype())?.reshape((out, c * kh * kw))?;
    w.broadcast_left(g.n)?.matmul(&cols)?.reshape((g.n, out, g.oh, g.ow))
}

/// Whether the CUDA kernel covers `xs`: a build with it, a 16-bit float type on CUDA.
pub fn applies(xs: &Tensor) -> bool {
    cfg!(sdcrossframe_im2col_ptx) && xs.device().is_cuda() && matches!(xs.dtype(), DType::F16 | DType::BF16)
}

impl CustomOp1 for Columns {
    fn name(&self) -> &'static str {
        "im2col-columns"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let g = self.geometry(l.shape())?;
        let x = cpu_to_f32(s, l, "im2col", "input")?;
        let (kh, kw) = self.kernel;
        let m = g.oh * g.ow;
        let mut cols = vec![0f32; g.n * g.c * kh * kw * m];
        for (row, out) in cols.chunks_mut(m).enumerate() {
            let (kj, ki, plane) = (row % kw, row / kw % kh, row / (kw * kh));
            for (idx, value) in out.iter_mut().enumerate() {
                let (oy, ox) = (idx / g.ow, idx % g.ow);
                let iy = (oy * self.stride + ki).checked_sub(self.padding).filter(|&y| y < g.h);
                let ix = (ox * self.stride + kj).checked_sub(self.padding).filter(|&x| x < g.w);
                if let (Some(iy), Some(ix)) = (iy, ix) {
                    *value = x[(plane * g.h + iy) * g.w + ix];
                }
            }
        }
        Ok((cpu_from_f32(cols, s.dtype(), "im2col")?, self.out_shape(&g)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &candle_core::CudaStorage, l: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        let g = self.geometry(l.shape())?;
        #[cfg(not(sdcrossframe_im2col_ptx))]
        {
            let _ = (s, g);
            candle_core::bail!("im2col convolution: this build has no CUDA kernel for it")
        }
        #[cfg(sdcrossframe_im2col_ptx)]
        {
            let storage = match s.dtype() {
                DType::F16 => cuda::launch::<half::f16>(self, &g, s, l)?,
                DType::BF16 => cuda::launch::<half::bf16>(self, &g, s, l)?,
                other => candle_core::bail!("im2col convolution on CUDA supports f16 and bf16; got {other:?}"),
            };
            Ok((storage, self.out_shape(&g)))
        }
    }
}

#[cfg(all(feature = "cuda", sdcrossframe_im2col_ptx))]
mod cuda {
    use super::{Columns, Geometry};
    use crate::ops::storage::cuda_view;
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::{CudaDType, WrapErr};
    use candle_core::{CudaStorage, Layout, Result};

    const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/im2col.ptx"));
    const MODULE: &str = "sdcrossframe_im2col";
    /// As in the kernel.
    const THREADS: usize = 256;
    /// Most blocks of a flat launch; its threads loop over the rest.
    const MAX_FLAT_BLOCKS: usize = 16_384;

    pub(super) fn launch<T: CudaDType + DeviceRepr>(
        op: &Columns,
        g: &Geometry,
        s: &CudaStorage,
        l: &Layout,
    ) -> Result<CudaStorage> {
        let (kh, kw) = op.kernel;
        let rows = g.n * g.c * kh * kw;
        let m = g.oh * g.ow;
        if [g.c, g.h, g.w, kh, kw, g.oh, g.ow].iter().any(|&v| v > i32::MAX as usize) || m > i32::MAX as usize {
            candle_core::bail!("im2col convolution: input {:?} too large for the kernel", l.dims());
        }
        let x = cuda_view::<T>(s, l, "im2col convolution", "input")?;
        let dev = s.device();
        let func = dev.get_or_load_custom_func("im2col_t_b16", MODULE, PTX)?;
        // SAFETY: the kernel writes every (row, pixel) of the columns.
        let cols = unsafe { dev.alloc::<T>(rows * m)? };
        // Flat over all (row, pixel) pairs when their count fits the kernel's 32-bit index.
        let flat = rows * m < (1 << 31);
        let grid_dim = if flat {
            ((rows * m).div_ceil(THREADS).clamp(1, MAX_FLAT_BLOCKS) as u32, 1, 1)
        } else {
            (m.div_ceil(THREADS).clamp(1, 1024) as u32, rows.clamp(1, 65_535) as u32, 1)
        };
        let cfg = LaunchConfig { grid_dim, block_dim: (THREADS as u32, 1, 1), shared_mem_bytes: 0 };
        let ints = [g.c, g.h, g.w, kh, kw, op.padding, op.stride, g.oh, g.ow].map(|v| v as i32);
        let rows = rows as i64;
        let mut builder = func.builder();
        builder.arg(&x).arg(&cols);
        for v in &ints {
            builder.arg(v);
        }
        let flat = i32::from(flat);
        builder.arg(&rows).arg(&flat);
        // SAFETY: argument types and order match im2col_t_b16; T is a 16-bit type (f16/bf16).
        unsafe { builder.launch(cfg) }.w()?;
        Ok(CudaStorage::wrap_cuda_slice(cols, dev.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::max_abs_diff;
    use candle_core::Device;

    #[test]
    fn columns_and_gemm_equal_candle_conv2d() {
        let dev = Device::Cpu;
        // 3x3 same, strided, unpadded strided (the VAE's downsampler), a 1x1.
        for (c, out, k, padding, stride, h, w) in
            [(5, 7, 3, 1, 1, 9, 6), (4, 3, 3, 1, 2, 8, 7), (3, 4, 3, 0, 2, 9, 9), (6, 2, 1, 0, 1, 4, 5)]
        {
            let xs = Tensor::randn(0f32, 1., (2, c, h, w), &dev).unwrap();
            let weight = Tensor::randn(0f32, 1., (out, c, k, k), &dev).unwrap();
            let expected = xs.conv2d(&weight, padding, stride, 1, 1).unwrap();
            let got = conv2d_columns(&xs, &weight, padding, stride).unwrap();
            assert_eq!(got.dims(), expected.dims());
            let err = max_abs_diff(&got, &expected);
            assert!(err < 1e-4, "{:?}: {err}", (c, out, k, padding, stride, h, w));
        }
    }

    #[test]
    fn misfit_filters_are_errors() {
        let dev = Device::Cpu;
        let xs = Tensor::zeros((1, 3, 4, 4), DType::F32, &dev).unwrap();
        let err =
            conv2d_columns(&xs, &Tensor::zeros((2, 5, 3, 3), DType::F32, &dev).unwrap(), 1, 1).unwrap_err().to_string();
        assert!(err.contains("3 channels") && err.contains("expects 5"), "{err}");
        let err =
            conv2d_columns(&xs, &Tensor::zeros((2, 3, 7, 7), DType::F32, &dev).unwrap(), 1, 1).unwrap_err().to_string();
        assert!(err.contains("smaller than the 7x7 kernel"), "{err}");
        assert!(!applies(&xs));
    }
}
