//! GroupNorm with diffusers' weight names (`weight`, `bias`), optionally followed by SiLU, fast
//! on CUDA.
//!
//! candle-nn's `GroupNorm` computes the statistics with about ten separate kernels and two f32
//! copies of the activations. On CUDA this module runs `kernels/group_norm.cu` instead: rows
//! (sample x group) of up to 64 Ki values (f16; 32 Ki in f32) in one launch that keeps each row
//! in one block's registers, longer rows (the VAE's) in one launch for the statistics (f32) and
//! one for normalisation, affine and the optional SiLU (`SDCROSSFRAME_GROUP_NORM=two-pass`
//! always takes the latter, `unfused` keeps candle-nn's, [`super::switches`]). On the CPU it is
//! candle-nn's `GroupNorm` (and candle's SiLU), unchanged, so the CPU parity tests keep their
//! exact numbers; [`group_norm`] runs the kernel's algorithm on the CPU for tests.

use super::storage::{cpu_from_f32, cpu_to_f32};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, Layout, Module, Result, Shape, Tensor};
use candle_nn::VarBuilder;

#[derive(Debug, Clone)]
pub struct GroupNorm {
    inner: candle_nn::GroupNorm,
    weight: Tensor,
    bias: Tensor,
    /// `weight` and `bias` stacked, (2, channels): the channels-last kernel's one operand.
    affine: Tensor,
    groups: usize,
    eps: f64,
}

impl GroupNorm {
    pub fn new(vb: VarBuilder, groups: usize, channels: usize, eps: f64) -> Result<Self> {
        if groups == 0 || !channels.is_multiple_of(groups) {
            candle_core::bail!("GroupNorm: {channels} channels cannot be split into {groups} groups");
        }
        let weight = vb.get(channels, "weight")?;
        let bias = vb.get(channels, "bias")?;
        let inner = candle_nn::GroupNorm::new(weight.clone(), bias.clone(), channels, groups, eps)?;
        let affine = Tensor::stack(&[&weight, &bias], 0)?;
        Ok(Self { inner, weight, bias, affine, groups, eps })
    }

    /// `weight` and `bias` as the rows of one (2, channels) tensor, and the groups and epsilon:
    /// what [`super::channels_last::group_norm_silu`] takes.
    pub fn channels_last_parameters(&self) -> (&Tensor, usize, f64) {
        (&self.affine, self.groups, self.eps)
    }

    /// candle-nn's computation on any device: the CPU path, and the reference for the kernel.
    pub fn forward_reference(&self, xs: &Tensor) -> Result<Tensor> {
        self.inner.forward(xs)
    }

    /// `silu(group_norm(xs))`, the pre-activation every resnet block and the VAE's output use.
    pub fn forward_silu(&self, xs: &Tensor) -> Result<Tensor> {
        if fused(xs) {
            group_norm(xs, &self.weight, &self.bias, self.groups, self.eps, true)
        } else {
            candle_nn::ops::silu(&self.inner.forward(xs)?)
        }
    }
}

impl Module for GroupNorm {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        if fused(xs) {
            group_norm(xs, &self.weight, &self.bias, self.groups, self.eps, false)
        } else {
            self.inner.forward(xs)
        }
    }
}

/// Whether `xs` takes the kernel: a CUDA tensor, not switched off (`SDCROSSFRAME_GROUP_NORM`).
fn fused(xs: &Tensor) -> bool {
    xs.device().is_cuda() && super::switches::switches().fused_group_norm
}

/// GroupNorm of a `(batch, channels, ...)` tensor with per-channel `weight` and `bias`, then SiLU
/// when `silu`: the CUDA kernel on CUDA tensors, the same algorithm in f32 on the CPU.
pub fn group_norm(xs: &Tensor, weight: &Tensor, bias: &Tensor, groups: usize, eps: f64, silu: bool) -> Result<Tensor> {
    let dims = xs.dims();
    if dims.len() < 3 || groups == 0 || !dims[1].is_multiple_of(groups) || weight.dims() != [dims[1]] {
        candle_core::bail!(
            "GroupNorm: expected (batch, {}, ...) with channels divisible by {groups}, got {dims:?}",
            weight.dims().first().copied().unwrap_or(0)
        );
    }
    let dtype = xs.dtype();
    let op = GroupNormOp { groups, eps: eps as f32, silu };
    xs.contiguous()?.apply_op3_no_bwd(&weight.to_dtype(dtype)?, &bias.to_dtype(dtype)?, &op)
}

struct GroupNormOp {
    groups: usize,
    eps: f32,
    silu: bool,
}

/// Row geometry: `rows` = batch x groups runs of `row_len` contiguous values.
struct Geometry {
    rows: usize,
    row_len: usize,
    spatial: usize,
    channels_per_group: usize,
}

impl GroupNormOp {
    fn geometry(&self, shape: &Shape) -> Geometry {
        let dims = shape.dims();
        let spatial: usize = dims[2..].iter().product();
        let channels_per_group = dims[1] / self.groups;
        Geometry { rows: dims[0] * self.groups, row_len: channels_per_group * spatial, spatial, channels_per_group }
    }
}

impl CustomOp3 for GroupNormOp {
    fn name(&self) -> &'static str {
        "group-norm"
    }

    /// The kernel's algorithm: sums of `x - row[0]` and its square in f32, then the affine.
    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = self.geometry(xl.shape());
        let to_f32 = |s, l, what| cpu_to_f32(s, l, "GroupNorm", what);
        let (x, w, b) = (to_f32(xs, xl, "input")?, to_f32(ws, wl, "weight")?, to_f32(bs, bl, "bias")?);
        let mut out = vec![0f32; x.len()];
        for row in 0..g.rows {
            let xr = &x[row * g.row_len..][..g.row_len];
            let shift = xr[0];
            let (s, ss) = xr.iter().fold((0f32, 0f32), |(s, ss), &v| (s + (v - shift), ss + (v - shift) * (v - shift)));
            let n = g.row_len as f32;
            let m = s / n;
            let rstd = 1.0 / ((ss / n - m * m).max(0.0) + self.eps).sqrt();
            let mean = shift + m;
            let first_channel = (row % self.groups) * g.channels_per_group;
            for (i, (o, &v)) in out[row * g.row_len..][..g.row_len].iter_mut().zip(xr).enumerate() {
                let c = first_channel + i / g.spatial;
                let y = (v - mean) * rstd * w[c] + b[c];
                *o = if self.silu { y / (1.0 + (-y).exp()) } else { y };
            }
        }
        Ok((cpu_from_f32(out, xs.dtype(), "GroupNorm")?, xl.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        xs: &candle_core::CudaStorage,
        xl: &Layout,
        ws: &candle_core::CudaStorage,
        wl: &Layout,
        bs: &candle_core::CudaStorage,
        bl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        #[cfg(not(sdcrossframe_group_norm_ptx))]
        {
            let _ = (xs, xl, ws, wl, bs, bl);
            candle_core::bail!("GroupNorm: this build has no CUDA kernel for it")
        }
        #[cfg(sdcrossframe_group_norm_ptx)]
        {
            let g = self.geometry(xl.shape());
            let storage = match xs.dtype() {
                candle_core::DType::F32 => cuda::launch::<f32>(self, &g, (xs, xl), (ws, wl), (bs, bl), "f32")?,
                candle_core::DType::F16 => cuda::launch::<half::f16>(self, &g, (xs, xl), (ws, wl), (bs, bl), "f16")?,
                candle_core::DType::BF16 => cuda::launch::<half::bf16>(self, &g, (xs, xl), (ws, wl), (bs, bl), "bf16")?,
                other => candle_core::bail!("GroupNorm on CUDA supports f32, f16 and bf16; got {other:?}"),
            };
            Ok((storage, xl.shape().clone()))
        }
    }
}

#[cfg(all(feature = "cuda", sdcrossframe_group_norm_ptx))]
mod cuda {
    use super::{Geometry, GroupNormOp};
    use crate::ops::storage::cuda_view;
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaView, DeviceRepr, LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::{CudaDType, CudaDevice, WrapErr};
    use candle_core::{CudaStorage, Layout, Result};

    const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/group_norm.ptx"));
    const MODULE: &str = "sdcrossframe_group_norm";
    /// As in the kernel.
    const THREADS: u32 = 256;
    const CHUNK: usize = 8192;
    const ROW_THREADS: u32 = 512;
    /// The one-launch kernel's 16-byte words per thread (group_norm_row_*_r{R}).
    const ROW_WORDS: [usize; 5] = [1, 2, 4, 8, 16];

    pub(super) fn launch<T: CudaDType + DeviceRepr>(
        op: &GroupNormOp,
        g: &Geometry,
        (xs, xl): (&CudaStorage, &Layout),
        (ws, wl): (&CudaStorage, &Layout),
        (bs, bl): (&CudaStorage, &Layout),
        type_name: &str,
    ) -> Result<CudaStorage> {
        let view = |s, l, what| cuda_view::<T>(s, l, "GroupNorm", what);
        let operands = (&view(xs, xl, "input")?, &view(ws, wl, "weight")?, &view(bs, bl, "bias")?);
        let dev = xs.device();
        // 16-byte loads when every row starts aligned and a word never spans two channels.
        let vec_width = 16 / std::mem::size_of::<T>();
        let vec = g.spatial.is_multiple_of(vec_width) && xl.start_offset().is_multiple_of(vec_width);
        let one_launch = (vec && !crate::ops::switches::switches().group_norm_two_pass)
            .then(|| ROW_WORDS.into_iter().find(|&r| g.row_len <= ROW_THREADS as usize * r * vec_width))
            .flatten();
        let out = match one_launch {
            Some(words) => launch_rows(op, g, dev, operands, type_name, words)?,
            None => launch_two_pass(op, g, dev, operands, type_name, vec)?,
        };
        Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
    }

    /// Input, weight and bias.
    type Operands<'a, 'v, T> = (&'a CudaView<'v, T>, &'a CudaView<'v, T>, &'a CudaView<'v, T>);

    /// Statistics in one launch (row chunks, f32 partial sums), normalisation in a second.
    fn launch_two_pass<T: CudaDType + DeviceRepr>(
        op: &GroupNormOp,
        g: &Geometry,
        dev: &CudaDevice,
        (x, w, b): Operands<T>,
        type_name: &str,
        vec: bool,
    ) -> Result<CudaSlice<T>> {
        let chunks = g.row_len.div_ceil(CHUNK);
        if g.rows > 65_535 || chunks > i32::MAX as usize || g.channels_per_group > i32::MAX as usize {
            candle_core::bail!("GroupNorm: too large for the kernel ({} rows of {} values)", g.rows, g.row_len);
        }
        let stats = dev.get_or_load_custom_func(&format!("group_norm_stats_{type_name}"), MODULE, PTX)?;
        let apply = dev.get_or_load_custom_func(&format!("group_norm_apply_{type_name}"), MODULE, PTX)?;
        // SAFETY: the stats kernel writes every (row, chunk) pair; the apply kernel every output.
        let partials = unsafe { dev.alloc::<f32>(g.rows * chunks * 2)? };
        let out = unsafe { dev.alloc::<T>(g.rows * g.row_len)? };
        let cfg = LaunchConfig {
            grid_dim: (chunks as u32, g.rows as u32, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let (row_len, chunks_i, spatial) = (g.row_len as i64, chunks as i32, g.spatial as i64);
        let (cpg, groups, silu) = (g.channels_per_group as i32, op.groups as i32, op.silu as i32);
        let vec = vec as i32;
        let mut builder = stats.builder();
        builder.arg(x).arg(&partials).arg(&row_len).arg(&chunks_i).arg(&vec);
        // SAFETY: argument types and order match group_norm_stats_*; sizes checked above.
        unsafe { builder.launch(cfg) }.w()?;
        let mut builder = apply.builder();
        builder.arg(x).arg(&partials).arg(w).arg(b).arg(&out).arg(&row_len).arg(&chunks_i).arg(&spatial);
        builder.arg(&cpg).arg(&groups).arg(&op.eps).arg(&silu).arg(&vec);
        // SAFETY: argument types and order match group_norm_apply_*.
        unsafe { builder.launch(cfg) }.w()?;
        Ok(out)
    }

    /// One launch, one block per row held in registers (`words` 16-byte words per thread); the
    /// caller checked the 16-byte alignment and that the row fits.
    fn launch_rows<T: CudaDType + DeviceRepr>(
        op: &GroupNormOp,
        g: &Geometry,
        dev: &CudaDevice,
        (x, w, b): Operands<T>,
        type_name: &str,
        words: usize,
    ) -> Result<CudaSlice<T>> {
        if g.rows > i32::MAX as usize || g.spatial > i32::MAX as usize {
            candle_core::bail!("GroupNorm: too large for the kernel ({} rows of {} values)", g.rows, g.row_len);
        }
        let func = dev.get_or_load_custom_func(&format!("group_norm_row_{type_name}_r{words}"), MODULE, PTX)?;
        // SAFETY: the kernel writes every value of every row.
        let out = unsafe { dev.alloc::<T>(g.rows * g.row_len)? };
        let cfg = LaunchConfig { grid_dim: (g.rows as u32, 1, 1), block_dim: (ROW_THREADS, 1, 1), shared_mem_bytes: 0 };
        let (row_len, spatial, cpg) = (g.row_len as i32, g.spatial as i32, g.channels_per_group as i32);
        let (groups, silu) = (op.groups as i32, op.silu as i32);
        let mut builder = func.builder();
        builder.arg(x).arg(w).arg(b).arg(&out).arg(&row_len).arg(&spatial).arg(&cpg).arg(&groups);
        builder.arg(&op.eps).arg(&silu);
        // SAFETY: argument types and order match group_norm_row_*.
        unsafe { builder.launch(cfg) }.w()?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::max_abs_diff as max_diff;
    use candle_core::{DType, Device};

    #[test]
    fn kernel_algorithm_matches_candle_nn() {
        let dev = Device::Cpu;
        let weight = Tensor::randn(1f32, 0.5, 64, &dev).unwrap();
        let bias = Tensor::randn(0f32, 0.5, 64, &dev).unwrap();
        let vb = VarBuilder::from_tensors(
            [("weight".to_string(), weight.clone()), ("bias".to_string(), bias.clone())].into_iter().collect(),
            DType::F32,
            &dev,
        );
        let norm = GroupNorm::new(vb, 8, 64, 1e-5).unwrap();
        // A large offset mean (the shifted sums must not cancel), an odd spatial size.
        let xs = (Tensor::randn(0f32, 3.0, (2, 64, 7, 9), &dev).unwrap() + 40.0).unwrap();
        let reference = norm.forward(&xs).unwrap();
        let err = max_diff(&group_norm(&xs, &weight, &bias, 8, 1e-5, false).unwrap(), &reference);
        assert!(err < 1e-4, "f32: {err}");
        let reference_silu = norm.forward_silu(&xs).unwrap();
        let err = max_diff(&group_norm(&xs, &weight, &bias, 8, 1e-5, true).unwrap(), &reference_silu);
        assert!(err < 1e-4, "f32 + silu: {err}");
        let half = xs.to_dtype(DType::F16).unwrap();
        let out = group_norm(&half, &weight, &bias, 8, 1e-5, true).unwrap();
        assert_eq!(out.dtype(), DType::F16);
        // f16 rounds the offset input itself (40 +- 9: steps of 1/32).
        let err = max_diff(&out, &reference_silu);
        assert!(err < 5e-2, "f16: {err}");
        // A strided input is made contiguous first.
        let t = xs.transpose(2, 3).unwrap();
        let err = max_diff(&group_norm(&t, &weight, &bias, 8, 1e-5, false).unwrap(), &norm.forward(&t).unwrap());
        assert!(err < 1e-4, "strided: {err}");
    }

    #[test]
    fn bad_shapes_are_errors() {
        let dev = Device::Cpu;
        let w = Tensor::ones(64, DType::F32, &dev).unwrap();
        let xs = Tensor::zeros((2, 32, 4, 4), DType::F32, &dev).unwrap();
        let err = group_norm(&xs, &w, &w, 8, 1e-5, false).unwrap_err().to_string();
        assert!(err.contains("expected (batch, 64"), "{err}");
        let err = group_norm(&Tensor::zeros((2, 64, 4, 4), DType::F32, &dev).unwrap(), &w, &w, 7, 1e-5, false)
            .unwrap_err()
            .to_string();
        assert!(err.contains("divisible by 7"), "{err}");
        let vb = VarBuilder::from_tensors(
            [("weight".to_string(), w.clone()), ("bias".to_string(), w.clone())].into_iter().collect(),
            DType::F32,
            &dev,
        );
        let err = GroupNorm::new(vb, 7, 64, 1e-5).unwrap_err().to_string();
        assert!(err.contains("cannot be split into 7 groups"), "{err}");
    }
}
