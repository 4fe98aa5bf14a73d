//! Channels-last (NHWC) activations inside a resnet block on CUDA.
//!
//! cuDNN runs f16/bf16 convolutions on NHWC data; given NCHW activations and filters, it
//! transposes the input and the filter to NHWC and the output back on every call. Measured on
//! an H200 (cuDNN 9.19, the UNet's 3x3 convolutions at 512x512, fastest algorithm each): the
//! same convolutions take 23% less time at 2 rows and 28% less at 8 when activations and filters
//! are NHWC already; an NHWC filter with NCHW activations is not supported at all. So a resnet
//! block whose convolutions have NHWC filters (converted once, at load:
//! [`super::Conv2d::to_channels_last`]) runs NHWC between its two convolutions:
//!
//! - [`group_norm_silu`]: GroupNorm + SiLU reading NCHW (the block's input) or NHWC (the first
//!   convolution's output, plus its bias and the time embedding, `in_bias`), writing NHWC;
//! - the convolutions on NHWC ([`super::Conv2d::convolve_channels_last`]);
//! - [`to_nchw_add`]: the second convolution's output plus its bias and the shortcut, back to
//!   NCHW, which is what the rest of the model takes.
//!
//! The sub-pixel upsampler ([`super::subpixel`]) uses two more passes of the same kind:
//! [`pad_to_nhwc`] (its input, padded) and [`phases_to_nchw`] (its output, interleaved).
//!
//! `kernels/channels_last.cu` holds the kernels. Only CUDA f16/bf16 with cuDNN takes this
//! path ([`wanted`], `SDCROSSFRAME_CHANNELS_LAST=off` switches it off); the CPU keeps the NCHW
//! reference path. The ops' CPU implementations below run the kernels' indexing in f32 for the
//! geometry tests.

use super::storage::{cpu_from_f32, cpu_to_f32};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, DType, Device, Layout, Result, Shape, Tensor};

/// Whether a model on `device` in `dtype` loads its resnets' filters channels-last: CUDA,
/// f16/bf16, a build with cuDNN and the kernels, not switched off.
pub fn wanted(device: &Device, dtype: DType) -> bool {
    cfg!(all(feature = "cudnn", sdcrossframe_channels_last_ptx))
        && device.is_cuda()
        && matches!(dtype, DType::F16 | DType::BF16)
        && super::switches::switches().channels_last
}

/// Whether a model's frame stages on `device` in `dtype` (the tiny VAE, the ControlNet's
/// control-image embedding) load their filters channels-last and run NHWC from input to output:
/// as [`wanted`], unless `SDCROSSFRAME_CHANNELS_LAST=resnets`.
pub fn wanted_for_frame_stages(device: &Device, dtype: DType) -> bool {
    wanted(device, dtype) && super::switches::switches().channels_last_stages
}

/// The layout of [`group_norm_silu`]'s input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InputLayout {
    /// (batch, channels, height, width).
    Nchw,
    /// (batch, height, width, channels).
    Nhwc,
}

/// `silu(group_norm(xs + in_bias))` as (batch, height, width, channels). `in_bias` is (batch,
/// channels); `affine` the norm's weight and bias as rows of one (2, channels) tensor. On CUDA
/// two launches (statistics, then normalisation into NHWC); geometries the kernels do not take
/// (channels not a multiple of 8, more than 64 groups) go through the NCHW kernels and a
/// transpose copy.
pub fn group_norm_silu(
    xs: &Tensor,
    layout: InputLayout,
    in_bias: Option<&Tensor>,
    affine: &Tensor,
    groups: usize,
    eps: f64,
) -> Result<Tensor> {
    let (batch, channels, height, width) = match layout {
        InputLayout::Nchw => xs.dims4()?,
        InputLayout::Nhwc => {
            let (n, h, w, c) = xs.dims4()?;
            (n, c, h, w)
        }
    };
    if groups == 0 || !channels.is_multiple_of(groups) || affine.dims() != [2, channels] {
        candle_core::bail!(
            "channels-last GroupNorm: {channels} channels, {groups} groups and an affine of {:?} do not fit",
            affine.dims()
        );
    }
    if let Some(b) = in_bias
        && b.dims() != [batch, channels]
    {
        candle_core::bail!("channels-last GroupNorm: input bias {:?}, expected [{batch}, {channels}]", b.dims());
    }
    let op = GroupNormOp { layout, batch, channels, pixels: height * width, groups, eps: eps as f32 };
    let xs = xs.contiguous()?;
    let affine = affine.to_dtype(xs.dtype())?.contiguous()?;
    if xs.device().is_cuda() && !op.fits_kernels() {
        return group_norm_silu_via_nchw(&xs, &op, in_bias, &affine);
    }
    let out = match in_bias {
        Some(b) => xs.apply_op3_no_bwd(&affine, &b.to_dtype(xs.dtype())?.contiguous()?, &op)?,
        None => xs.apply_op2_no_bwd(&affine, &op)?,
    };
    out.reshape((batch, height, width, channels))
}

/// Geometries the kernels do not take: the NCHW bias pass and GroupNorm kernels, then a
/// transpose copy.
fn group_norm_silu_via_nchw(
    xs: &Tensor,
    op: &GroupNormOp,
    in_bias: Option<&Tensor>,
    affine: &Tensor,
) -> Result<Tensor> {
    let nchw = match op.layout {
        InputLayout::Nchw => xs.clone(),
        InputLayout::Nhwc => xs.permute((0, 3, 1, 2))?.contiguous()?,
    };
    let nchw = match in_bias {
        Some(b) => super::fused::add_channel_bias(&nchw, &b.to_dtype(nchw.dtype())?.contiguous()?, None)?,
        None => nchw,
    };
    let (weight, bias) = (affine.get(0)?, affine.get(1)?);
    let normed = super::group_norm::group_norm(&nchw, &weight, &bias, op.groups, f64::from(op.eps), true)?;
    normed.permute((0, 2, 3, 1))?.contiguous()
}

/// `ys` (batch, height, width, channels) plus `bias` (channels) plus `residual` (batch,
/// channels, height, width), as (batch, channels, height, width).
pub fn to_nchw_add(ys: &Tensor, bias: &Tensor, residual: &Tensor) -> Result<Tensor> {
    let (batch, height, width, channels) = ys.dims4()?;
    if bias.dims() != [channels] || residual.dims() != [batch, channels, height, width] {
        candle_core::bail!(
            "channels-last output: bias {:?} and residual {:?} do not fit an NHWC output of {:?}",
            bias.dims(),
            residual.dims(),
            ys.dims()
        );
    }
    let op = ToNchwOp { batch, channels, pixels: height * width };
    let same = |t: &Tensor| t.to_dtype(ys.dtype())?.contiguous();
    ys.contiguous()?.apply_op3_no_bwd(&same(bias)?, &same(residual)?, &op)
}

/// `xs` (batch, channels, height, width) as (batch, height + 2, width + 2, channels) with a zero
/// border: the input of a sub-pixel upsampler's 2x2 convolution ([`super::subpixel`]).
pub fn pad_to_nhwc(xs: &Tensor) -> Result<Tensor> {
    let (batch, channels, height, width) = xs.dims4()?;
    xs.contiguous()?.apply_op1_no_bwd(&PadToNhwcOp { batch, channels, height, width })
}

/// A sub-pixel upsampler's 2x2 convolution output `ys` (batch, height + 1, width + 1, 4 x
/// channels: phase `2a + b` in the `2a + b`-th quarter of the channels, see [`super::subpixel`]) plus
/// `bias` (channels), as the (batch, channels, 2 height, 2 width) output of nearest 2x upsampling
/// and the 3x3 convolution.
pub fn phases_to_nchw(ys: &Tensor, bias: &Tensor, (height, width): (usize, usize)) -> Result<Tensor> {
    let (batch, h1, w1, phase_channels) = ys.dims4()?;
    let channels = bias.dims().first().copied().unwrap_or(0);
    if bias.rank() != 1 || h1 != height + 1 || w1 != width + 1 || phase_channels != 4 * channels {
        candle_core::bail!(
            "sub-pixel output: {:?} with a bias of {:?} is not the 4 phases of a {height}x{width} input",
            ys.dims(),
            bias.dims()
        );
    }
    let op = PhasesToNchwOp { batch, channels, height, width };
    ys.contiguous()?.apply_op2_no_bwd(&bias.to_dtype(ys.dtype())?.contiguous()?, &op)
}

// As in the kernels.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
mod geometry {
    pub const STATS_THREADS: usize = 256;
    pub const STATS_CHUNK: usize = 4096;
    pub const STATS_PIXELS_PER_THREAD: usize = 8;
    pub const APPLY_THREADS: usize = 256;

    /// Pixel rows of an NHWC statistics block: its threads are (16-byte word of channels, row)
    /// pairs, as many rows as fit in STATS_THREADS (at least one).
    pub fn nhwc_rows(channels: usize) -> usize {
        (STATS_THREADS / (channels / 8)).max(1)
    }

    /// Threads of an NHWC statistics block: words x rows, rounded up to whole warps.
    pub fn nhwc_block(channels: usize) -> usize {
        (channels / 8 * nhwc_rows(channels)).next_multiple_of(32)
    }
}
use geometry::*;

#[derive(Debug, Clone, Copy)]
struct GroupNormOp {
    layout: InputLayout,
    batch: usize,
    channels: usize,
    pixels: usize,
    groups: usize,
    eps: f32,
}

impl GroupNormOp {
    fn cpg(&self) -> usize {
        self.channels / self.groups
    }

    /// Whether the CUDA kernels take this geometry: whole 16-byte words per NHWC pixel, at most
    /// 64 groups and 4096 channels (the NHWC statistics' shared memory).
    fn fits_kernels(&self) -> bool {
        self.channels.is_multiple_of(8)
            && self.groups <= 64
            && self.channels <= 4096
            && self.batch * self.channels * self.pixels <= i32::MAX as usize
    }

    /// Partial sums per (sample, group): chunks of a group's NCHW run, or of the NHWC pixels.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    fn chunks(&self) -> usize {
        match self.layout {
            InputLayout::Nchw => (self.cpg() * self.pixels).div_ceil(STATS_CHUNK),
            InputLayout::Nhwc => self.pixels.div_ceil(nhwc_rows(self.channels) * STATS_PIXELS_PER_THREAD),
        }
        .max(1)
    }

    /// Offset of (sample, channel, pixel) in the input.
    fn input_at(&self, n: usize, c: usize, p: usize) -> usize {
        match self.layout {
            InputLayout::Nchw => (n * self.channels + c) * self.pixels + p,
            InputLayout::Nhwc => (n * self.pixels + p) * self.channels + c,
        }
    }

    /// The kernel's computation in f32 (the bias sum rounded to `dtype` as the kernel does).
    fn cpu_reference(
        &self,
        x: (&CpuStorage, &Layout),
        affine: (&CpuStorage, &Layout),
        in_bias: Option<(&CpuStorage, &Layout)>,
    ) -> Result<(CpuStorage, Shape)> {
        let what = "channels-last GroupNorm";
        let dtype = x.0.dtype();
        let xv = cpu_to_f32(x.0, x.1, what, "input")?;
        let av = cpu_to_f32(affine.0, affine.1, what, "affine")?;
        let bv = in_bias.map(|(s, l)| cpu_to_f32(s, l, what, "input bias")).transpose()?;
        let round = |v: f32| -> f32 {
            match dtype {
                DType::F16 => half::f16::from_f32(v).to_f32(),
                DType::BF16 => half::bf16::from_f32(v).to_f32(),
                _ => v,
            }
        };
        let (cpg, c_total, pixels) = (self.cpg(), self.channels, self.pixels);
        let mut out = vec![0f32; xv.len()];
        for n in 0..self.batch {
            for g in 0..self.groups {
                let channels = g * cpg..(g + 1) * cpg;
                let value = |c: usize, p: usize| {
                    let v = xv[self.input_at(n, c, p)];
                    bv.as_ref().map_or(v, |b| round(v + b[n * c_total + c]))
                };
                let count = (cpg * pixels) as f32;
                let mut sum = 0f32;
                for c in channels.clone() {
                    for p in 0..pixels {
                        sum += value(c, p);
                    }
                }
                let mean = sum / count;
                let mut squares = 0f32;
                for c in channels.clone() {
                    for p in 0..pixels {
                        squares += (value(c, p) - mean).powi(2);
                    }
                }
                let rstd = 1.0 / (squares / count + self.eps).sqrt();
                for c in channels.clone() {
                    for p in 0..pixels {
                        let y = (value(c, p) - mean) * rstd * av[c] + av[c_total + c];
                        out[(n * pixels + p) * c_total + c] = y / (1.0 + (-y).exp());
                    }
                }
            }
        }
        Ok((cpu_from_f32(out, dtype, what)?, Shape::from((self.batch, self.pixels, self.channels))))
    }
}

impl candle_core::CustomOp2 for GroupNormOp {
    fn name(&self) -> &'static str {
        "group-norm-channels-last"
    }

    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout, a: &CpuStorage, al: &Layout) -> Result<(CpuStorage, Shape)> {
        self.cpu_reference((xs, xl), (a, al), None)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        xs: &candle_core::CudaStorage,
        xl: &Layout,
        a: &candle_core::CudaStorage,
        al: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        cuda::group_norm(self, (xs, xl), (a, al), None)
    }
}

impl candle_core::CustomOp3 for GroupNormOp {
    fn name(&self) -> &'static str {
        "group-norm-channels-last"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        a: &CpuStorage,
        al: &Layout,
        b: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.cpu_reference((xs, xl), (a, al), Some((b, bl)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        xs: &candle_core::CudaStorage,
        xl: &Layout,
        a: &candle_core::CudaStorage,
        al: &Layout,
        b: &candle_core::CudaStorage,
        bl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        cuda::group_norm(self, (xs, xl), (a, al), Some((b, bl)))
    }
}

#[derive(Debug, Clone, Copy)]
struct ToNchwOp {
    batch: usize,
    channels: usize,
    pixels: usize,
}

impl ToNchwOp {
    fn out_shape(&self, ys: &Layout) -> Shape {
        let d = ys.dims();
        Shape::from((d[0], d[3], d[1], d[2]))
    }
}

impl candle_core::CustomOp3 for ToNchwOp {
    fn name(&self) -> &'static str {
        "channels-last-to-nchw"
    }

    fn cpu_fwd(
        &self,
        ys: &CpuStorage,
        yl: &Layout,
        b: &CpuStorage,
        bl: &Layout,
        r: &CpuStorage,
        rl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let what = "channels-last output";
        let (yv, bv, rv) = (
            cpu_to_f32(ys, yl, what, "input")?,
            cpu_to_f32(b, bl, what, "bias")?,
            cpu_to_f32(r, rl, what, "residual")?,
        );
        let mut out = vec![0f32; yv.len()];
        for n in 0..self.batch {
            for c in 0..self.channels {
                for p in 0..self.pixels {
                    let at = (n * self.channels + c) * self.pixels + p;
                    out[at] = yv[(n * self.pixels + p) * self.channels + c] + bv[c] + rv[at];
                }
            }
        }
        Ok((cpu_from_f32(out, ys.dtype(), what)?, self.out_shape(yl)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        ys: &candle_core::CudaStorage,
        yl: &Layout,
        b: &candle_core::CudaStorage,
        bl: &Layout,
        r: &candle_core::CudaStorage,
        rl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        Ok((cuda::to_nchw(self, (ys, yl), (b, bl), (r, rl))?, self.out_shape(yl)))
    }
}

#[derive(Debug, Clone, Copy)]
struct PadToNhwcOp {
    batch: usize,
    channels: usize,
    height: usize,
    width: usize,
}

impl candle_core::CustomOp1 for PadToNhwcOp {
    fn name(&self) -> &'static str {
        "pad-to-nhwc"
    }

    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout) -> Result<(CpuStorage, Shape)> {
        let what = "padded NHWC input";
        let xv = cpu_to_f32(xs, xl, what, "input")?;
        let (c_total, h, w) = (self.channels, self.height, self.width);
        let (ph, pw) = (h + 2, w + 2);
        let mut out = vec![0f32; self.batch * ph * pw * c_total];
        for n in 0..self.batch {
            for c in 0..c_total {
                for y in 0..h {
                    for x in 0..w {
                        out[((n * ph + y + 1) * pw + x + 1) * c_total + c] = xv[((n * c_total + c) * h + y) * w + x];
                    }
                }
            }
        }
        Ok((cpu_from_f32(out, xs.dtype(), what)?, Shape::from((self.batch, ph, pw, c_total))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, xs: &candle_core::CudaStorage, xl: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        let shape = Shape::from((self.batch, self.height + 2, self.width + 2, self.channels));
        Ok((cuda::pad_to_nhwc(self, (xs, xl))?, shape))
    }
}

#[derive(Debug, Clone, Copy)]
struct PhasesToNchwOp {
    batch: usize,
    channels: usize,
    height: usize,
    width: usize,
}

impl PhasesToNchwOp {
    fn out_shape(&self) -> Shape {
        Shape::from((self.batch, self.channels, 2 * self.height, 2 * self.width))
    }
}

impl candle_core::CustomOp2 for PhasesToNchwOp {
    fn name(&self) -> &'static str {
        "sub-pixel-phases-to-nchw"
    }

    fn cpu_fwd(&self, ys: &CpuStorage, yl: &Layout, b: &CpuStorage, bl: &Layout) -> Result<(CpuStorage, Shape)> {
        let what = "sub-pixel output";
        let (yv, bv) = (cpu_to_f32(ys, yl, what, "input")?, cpu_to_f32(b, bl, what, "bias")?);
        let (c_total, h, w) = (self.channels, self.height, self.width);
        let mut out = vec![0f32; self.batch * c_total * 4 * h * w];
        for n in 0..self.batch {
            for c in 0..c_total {
                for oy in 0..2 * h {
                    for ox in 0..2 * w {
                        let (i, a, j, b) = (oy / 2, oy % 2, ox / 2, ox % 2);
                        let phase = 2 * a + b;
                        let at = ((n * (h + 1) + i + a) * (w + 1) + j + b) * 4 * c_total + phase * c_total + c;
                        out[((n * c_total + c) * 2 * h + oy) * 2 * w + ox] = yv[at] + bv[c];
                    }
                }
            }
        }
        Ok((cpu_from_f32(out, ys.dtype(), what)?, self.out_shape()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        ys: &candle_core::CudaStorage,
        yl: &Layout,
        b: &candle_core::CudaStorage,
        bl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        Ok((cuda::phases_to_nchw(self, (ys, yl), (b, bl))?, self.out_shape()))
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use super::{GroupNormOp, PadToNhwcOp, PhasesToNchwOp, ToNchwOp};
    use candle_core::{CudaStorage, Layout, Result, Shape};

    type Input<'a> = (&'a CudaStorage, &'a Layout);

    pub(super) fn group_norm(
        op: &GroupNormOp,
        x: Input,
        affine: Input,
        in_bias: Option<Input>,
    ) -> Result<(CudaStorage, Shape)> {
        #[cfg(not(sdcrossframe_channels_last_ptx))]
        {
            let _ = (op, x, affine, in_bias);
            candle_core::bail!("channels-last GroupNorm: this build has no CUDA kernel for it")
        }
        #[cfg(sdcrossframe_channels_last_ptx)]
        {
            use candle_core::backend::BackendStorage;
            let storage = match x.0.dtype() {
                candle_core::DType::F16 => kernels::group_norm::<half::f16>(op, x, affine, in_bias, "f16")?,
                candle_core::DType::BF16 => kernels::group_norm::<half::bf16>(op, x, affine, in_bias, "bf16")?,
                other => candle_core::bail!("channels-last GroupNorm supports f16 and bf16; got {other:?}"),
            };
            Ok((storage, Shape::from((op.batch, op.pixels, op.channels))))
        }
    }

    pub(super) fn to_nchw(op: &ToNchwOp, ys: Input, bias: Input, residual: Input) -> Result<CudaStorage> {
        #[cfg(not(sdcrossframe_channels_last_ptx))]
        {
            let _ = (op, ys, bias, residual);
            candle_core::bail!("channels-last output: this build has no CUDA kernel for it")
        }
        #[cfg(sdcrossframe_channels_last_ptx)]
        {
            use candle_core::backend::BackendStorage;
            match ys.0.dtype() {
                candle_core::DType::F16 => kernels::to_nchw::<half::f16>(op, ys, bias, residual, "f16"),
                candle_core::DType::BF16 => kernels::to_nchw::<half::bf16>(op, ys, bias, residual, "bf16"),
                other => candle_core::bail!("channels-last output supports f16 and bf16; got {other:?}"),
            }
        }
    }

    pub(super) fn pad_to_nhwc(op: &PadToNhwcOp, xs: Input) -> Result<CudaStorage> {
        #[cfg(not(sdcrossframe_channels_last_ptx))]
        {
            let _ = (op, xs);
            candle_core::bail!("padded NHWC input: this build has no CUDA kernel for it")
        }
        #[cfg(sdcrossframe_channels_last_ptx)]
        {
            use candle_core::backend::BackendStorage;
            match xs.0.dtype() {
                candle_core::DType::F16 => kernels::pad_to_nhwc::<half::f16>(op, xs, "f16"),
                candle_core::DType::BF16 => kernels::pad_to_nhwc::<half::bf16>(op, xs, "bf16"),
                other => candle_core::bail!("padded NHWC input supports f16 and bf16; got {other:?}"),
            }
        }
    }

    pub(super) fn phases_to_nchw(op: &PhasesToNchwOp, ys: Input, bias: Input) -> Result<CudaStorage> {
        #[cfg(not(sdcrossframe_channels_last_ptx))]
        {
            let _ = (op, ys, bias);
            candle_core::bail!("sub-pixel output: this build has no CUDA kernel for it")
        }
        #[cfg(sdcrossframe_channels_last_ptx)]
        {
            use candle_core::backend::BackendStorage;
            match ys.0.dtype() {
                candle_core::DType::F16 => kernels::phases_to_nchw::<half::f16>(op, ys, bias, "f16"),
                candle_core::DType::BF16 => kernels::phases_to_nchw::<half::bf16>(op, ys, bias, "bf16"),
                other => candle_core::bail!("sub-pixel output supports f16 and bf16; got {other:?}"),
            }
        }
    }

    #[cfg(sdcrossframe_channels_last_ptx)]
    mod kernels {
        use super::super::{
            APPLY_THREADS, GroupNormOp, InputLayout, PadToNhwcOp, PhasesToNchwOp, STATS_THREADS, ToNchwOp, nhwc_block,
        };
        use super::Input;
        use crate::ops::storage::cuda_view;
        use candle_core::backend::BackendStorage;
        use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};
        use candle_core::cuda_backend::{CudaDType, WrapErr};
        use candle_core::{CudaStorage, Result};

        const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/channels_last.ptx"));
        const MODULE: &str = "sdcrossframe_channels_last";

        /// The launch of the 32 pixels x 32 channels tile kernels (to_nchw, pad_to_nhwc,
        /// phases_to_nchw): `pixels` and `channels` tiled, `slices` (samples, or samples x
        /// phases) in z; `values`, the most values either side holds, within 32-bit indexing.
        fn tiles(what: &str, pixels: usize, channels: usize, slices: usize, values: usize) -> Result<LaunchConfig> {
            if values > i32::MAX as usize || slices > 65_535 || channels.div_ceil(32) > 65_535 {
                candle_core::bail!("{what}: too large for the kernel");
            }
            Ok(LaunchConfig {
                grid_dim: (pixels.div_ceil(32) as u32, channels.div_ceil(32) as u32, slices as u32),
                block_dim: (32, 8, 1),
                shared_mem_bytes: 0,
            })
        }

        pub(super) fn group_norm<T: CudaDType + DeviceRepr>(
            op: &GroupNormOp,
            (xs, xl): Input,
            (a_s, al): Input,
            in_bias: Option<Input>,
            type_name: &str,
        ) -> Result<CudaStorage> {
            let what = "channels-last GroupNorm";
            let vec_width = 16 / std::mem::size_of::<T>();
            if !op.fits_kernels() || !xl.start_offset().is_multiple_of(vec_width) {
                candle_core::bail!("{what}: the kernels do not take {op:?} (or an unaligned input)");
            }
            let x = cuda_view::<T>(xs, xl, what, "input")?;
            let affine = cuda_view::<T>(a_s, al, what, "affine")?;
            let (gamma, beta) = (affine.slice(..op.channels), affine.slice(op.channels..));
            let bias = in_bias.map(|(s, l)| cuda_view::<T>(s, l, what, "input bias")).transpose()?;
            let dev = xs.device();
            let chunks = op.chunks();
            let rows = op.batch * op.groups;
            // SAFETY: the statistics kernel writes every (sample, group, chunk) pair and, in its
            // last block per group or sample, every channel's {mean, gamma / std}.
            let partials = unsafe { dev.alloc::<f32>(rows * chunks * 2)? };
            let channel_stats = unsafe { dev.alloc::<f32>(op.batch * op.channels * 2)? };
            // One ticket per group (NCHW) or per sample (NHWC), from zero.
            let tickets = dev.alloc_zeros::<u32>(rows)?;
            let (pixels, channels, cpg, groups) =
                (op.pixels as i32, op.channels as i32, op.cpg() as i32, op.groups as i32);
            let chunks_i = chunks as i32;
            if rows > 65_535 {
                candle_core::bail!("{what}: too many samples for the kernels");
            }
            let null = 0u64;
            let (layout, stats_cfg) = match op.layout {
                InputLayout::Nchw => (
                    "nchw",
                    LaunchConfig {
                        grid_dim: (chunks as u32, rows as u32, 1),
                        block_dim: (STATS_THREADS as u32, 1, 1),
                        shared_mem_bytes: 0,
                    },
                ),
                InputLayout::Nhwc => (
                    "nhwc",
                    LaunchConfig {
                        grid_dim: (chunks as u32, op.batch as u32, 1),
                        block_dim: (nhwc_block(op.channels) as u32, 1, 1),
                        shared_mem_bytes: 0,
                    },
                ),
            };
            let stats_fn = dev.get_or_load_custom_func(&format!("gn_stats_{layout}_{type_name}"), MODULE, PTX)?;
            let mut builder = stats_fn.builder();
            builder.arg(&x);
            match &bias {
                Some(b) => builder.arg(b),
                None => builder.arg(&null),
            };
            builder.arg(&gamma).arg(&partials).arg(&tickets).arg(&channel_stats);
            builder.arg(&pixels).arg(&channels).arg(&cpg).arg(&groups).arg(&chunks_i).arg(&op.eps);
            // 16-byte loads of the NCHW runs when a word never spans two channels.
            let vec = op.pixels.is_multiple_of(vec_width) as i32;
            if op.layout == InputLayout::Nchw {
                builder.arg(&vec);
            }
            // SAFETY: argument types and order match gn_stats_*; sizes checked above.
            unsafe { builder.launch(stats_cfg) }.w()?;

            let apply = dev.get_or_load_custom_func(&format!("gn_apply_{layout}_{type_name}"), MODULE, PTX)?;
            // SAFETY: the apply kernel writes every output value.
            let out = unsafe { dev.alloc::<T>(op.batch * op.channels * op.pixels)? };
            let silu = 1i32;
            let mut builder = apply.builder();
            builder.arg(&x);
            match &bias {
                Some(b) => builder.arg(b),
                None => builder.arg(&null),
            };
            builder.arg(&beta).arg(&channel_stats).arg(&out);
            let cfg = match op.layout {
                InputLayout::Nchw => LaunchConfig {
                    grid_dim: (op.pixels.div_ceil(32) as u32, op.channels.div_ceil(32) as u32, op.batch as u32),
                    block_dim: (32, APPLY_THREADS as u32 / 32, 1),
                    shared_mem_bytes: 0,
                },
                InputLayout::Nhwc => LaunchConfig {
                    grid_dim: ((op.pixels * op.channels / 8).div_ceil(APPLY_THREADS) as u32, op.batch as u32, 1),
                    block_dim: (APPLY_THREADS as u32, 1, 1),
                    shared_mem_bytes: 0,
                },
            };
            builder.arg(&pixels).arg(&channels).arg(&silu);
            // SAFETY: argument types and order match gn_apply_*.
            unsafe { builder.launch(cfg) }.w()?;
            Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
        }

        pub(super) fn to_nchw<T: CudaDType + DeviceRepr>(
            op: &ToNchwOp,
            (ys, yl): Input,
            (bs, bl): Input,
            (rs, rl): Input,
            type_name: &str,
        ) -> Result<CudaStorage> {
            let what = "channels-last output";
            let total = op.batch * op.channels * op.pixels;
            let cfg = tiles(what, op.pixels, op.channels, op.batch, total)?;
            let y = cuda_view::<T>(ys, yl, what, "input")?;
            let b = cuda_view::<T>(bs, bl, what, "bias")?;
            let r = cuda_view::<T>(rs, rl, what, "residual")?;
            let dev = ys.device();
            let func = dev.get_or_load_custom_func(&format!("to_nchw_{type_name}"), MODULE, PTX)?;
            // SAFETY: the kernel writes every output value.
            let out = unsafe { dev.alloc::<T>(total)? };
            let (pixels, channels) = (op.pixels as i32, op.channels as i32);
            let mut builder = func.builder();
            builder.arg(&y).arg(&b).arg(&r).arg(&out).arg(&pixels).arg(&channels);
            // SAFETY: argument types and order match to_nchw_*; sizes checked above.
            unsafe { builder.launch(cfg) }.w()?;
            Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
        }

        pub(super) fn pad_to_nhwc<T: CudaDType + DeviceRepr>(
            op: &PadToNhwcOp,
            (xs, xl): Input,
            type_name: &str,
        ) -> Result<CudaStorage> {
            let what = "padded NHWC input";
            let padded = (op.height + 2) * (op.width + 2);
            let total = op.batch * op.channels * padded;
            let cfg = tiles(what, padded, op.channels, op.batch, total)?;
            let x = cuda_view::<T>(xs, xl, what, "input")?;
            let dev = xs.device();
            let func = dev.get_or_load_custom_func(&format!("pad_to_nhwc_{type_name}"), MODULE, PTX)?;
            // SAFETY: the kernel writes every output value (the border as zeros).
            let out = unsafe { dev.alloc::<T>(total)? };
            let (h, w, channels) = (op.height as i32, op.width as i32, op.channels as i32);
            let mut builder = func.builder();
            builder.arg(&x).arg(&out).arg(&h).arg(&w).arg(&channels);
            // SAFETY: argument types and order match pad_to_nhwc_*; sizes checked above.
            unsafe { builder.launch(cfg) }.w()?;
            Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
        }

        pub(super) fn phases_to_nchw<T: CudaDType + DeviceRepr>(
            op: &PhasesToNchwOp,
            (ys, yl): Input,
            (bs, bl): Input,
            type_name: &str,
        ) -> Result<CudaStorage> {
            let what = "sub-pixel output";
            let total = op.batch * op.channels * 4 * op.height * op.width;
            let input = op.batch * (op.height + 1) * (op.width + 1) * 4 * op.channels;
            let cfg = tiles(what, op.height * op.width, op.channels, 4 * op.batch, total.max(input))?;
            let y = cuda_view::<T>(ys, yl, what, "input")?;
            let b = cuda_view::<T>(bs, bl, what, "bias")?;
            let dev = ys.device();
            let func = dev.get_or_load_custom_func(&format!("phases_to_nchw_{type_name}"), MODULE, PTX)?;
            // SAFETY: the four phases write every output value.
            let out = unsafe { dev.alloc::<T>(total)? };
            let (h, w, channels) = (op.height as i32, op.width as i32, op.channels as i32);
            let mut builder = func.builder();
            builder.arg(&y).arg(&b).arg(&out).arg(&h).arg(&w).arg(&channels);
            // SAFETY: argument types and order match phases_to_nchw_*; sizes checked above.
            unsafe { builder.launch(cfg) }.w()?;
            Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::max_abs_diff;
    use candle_core::Device;

    fn reference(xs_nchw: &Tensor, in_bias: Option<&Tensor>, affine: &Tensor, groups: usize) -> Tensor {
        let xs = match in_bias {
            Some(b) => xs_nchw.broadcast_add(&b.unsqueeze(2).unwrap().unsqueeze(3).unwrap()).unwrap(),
            None => xs_nchw.clone(),
        };
        let channels = xs.dim(1).unwrap();
        let norm =
            candle_nn::GroupNorm::new(affine.get(0).unwrap(), affine.get(1).unwrap(), channels, groups, 1e-5).unwrap();
        let ys = candle_nn::ops::silu(&candle_core::Module::forward(&norm, &xs).unwrap()).unwrap();
        ys.permute((0, 2, 3, 1)).unwrap().contiguous().unwrap()
    }

    #[test]
    fn group_norm_reads_either_layout_and_writes_nhwc() {
        let dev = Device::Cpu;
        let (n, c, h, w, groups) = (2, 12, 3, 5, 3);
        let xs = (Tensor::randn(0f32, 2.0, (n, c, h, w), &dev).unwrap() + 3.0).unwrap();
        let affine = Tensor::randn(0.5f32, 0.5, (2, c), &dev).unwrap();
        let in_bias = Tensor::randn(0f32, 1.0, (n, c), &dev).unwrap();
        for bias in [None, Some(&in_bias)] {
            let expected = reference(&xs, bias, &affine, groups);
            let from_nchw = group_norm_silu(&xs, InputLayout::Nchw, bias, &affine, groups, 1e-5).unwrap();
            assert_eq!(from_nchw.dims(), &[n, h, w, c]);
            assert!(max_abs_diff(&from_nchw, &expected) < 1e-5, "NCHW input, bias {}", bias.is_some());
            let nhwc = xs.permute((0, 2, 3, 1)).unwrap().contiguous().unwrap();
            let from_nhwc = group_norm_silu(&nhwc, InputLayout::Nhwc, bias, &affine, groups, 1e-5).unwrap();
            assert!(max_abs_diff(&from_nhwc, &expected) < 1e-5, "NHWC input, bias {}", bias.is_some());
        }
    }

    #[test]
    fn output_goes_back_to_nchw_with_bias_and_residual() {
        let dev = Device::Cpu;
        let (n, c, h, w) = (2, 5, 3, 4);
        let ys = Tensor::randn(0f32, 1.0, (n, h, w, c), &dev).unwrap();
        let bias = Tensor::randn(0f32, 1.0, c, &dev).unwrap();
        let residual = Tensor::randn(0f32, 1.0, (n, c, h, w), &dev).unwrap();
        let expected = ys
            .permute((0, 3, 1, 2))
            .unwrap()
            .broadcast_add(&bias.reshape((1, c, 1, 1)).unwrap())
            .unwrap()
            .add(&residual)
            .unwrap();
        let out = to_nchw_add(&ys, &bias, &residual).unwrap();
        assert_eq!(out.dims(), &[n, c, h, w]);
        assert!(max_abs_diff(&out, &expected) < 1e-6);
        let err = to_nchw_add(&ys, &bias, &residual.narrow(1, 0, 4).unwrap()).unwrap_err().to_string();
        assert!(err.contains("do not fit an NHWC output"), "{err}");
    }

    #[test]
    fn bad_geometry_is_an_error() {
        let dev = Device::Cpu;
        let xs = Tensor::zeros((1, 12, 2, 2), DType::F32, &dev).unwrap();
        let affine = Tensor::zeros((2, 12), DType::F32, &dev).unwrap();
        let err = group_norm_silu(&xs, InputLayout::Nchw, None, &affine, 5, 1e-5).unwrap_err().to_string();
        assert!(err.contains("12 channels, 5 groups"), "{err}");
        let bias = Tensor::zeros((2, 12), DType::F32, &dev).unwrap();
        let err = group_norm_silu(&xs, InputLayout::Nchw, Some(&bias), &affine, 3, 1e-5).unwrap_err().to_string();
        assert!(err.contains("input bias [2, 12], expected [1, 12]"), "{err}");
        assert!(!wanted(xs.device(), xs.dtype()), "CPU tensors keep the NCHW path");
    }
}
