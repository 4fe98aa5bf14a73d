//! Fused scaled dot-product attention, `softmax(scale * Q K^T) V`, as a candle custom op.
//!
//! On CUDA this runs `kernels/flash_attention.cu` (compiled to PTX by build.rs when the `cuda`
//! feature is on): one pass over the keys with an online softmax, the scores never stored, f32
//! accumulation, tensor cores for both products. On the CPU the op is a plain f32 reference,
//! there for tests; [`super::attention`] keeps candle's unfused attention on the CPU.
//!
//! Shapes: `q` (batch, heads, n, head_dim), `k` and `v` (batch, heads, m, head_dim); `m` may
//! differ from `n` (cross-frame attention doubles it, cross-attention to text has 77 keys).
//! The kernel reads each input through its own strides, so [`fused_attention_tokens`] takes the
//! projections as (batch, tokens, heads x head_dim) and returns that layout, without copies to
//! split and merge the heads.

use super::storage::{cpu_from_f32, cpu_to_f32};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};

/// Widest head the CUDA kernel is built for (SD1.5 uses 40, 80 and 160).
pub const MAX_HEAD_DIM: usize = 160;

/// Validated sizes of one call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Dims {
    batch: usize,
    heads: usize,
    n: usize,
    m: usize,
    d: usize,
}

impl Dims {
    fn check(q: &Shape, k: &Shape, v: &Shape) -> Result<Self> {
        let (Ok((b, h, n, d)), Ok((kb, kh, m, kd)), Ok(vd)) = (q.dims4(), k.dims4(), v.dims4()) else {
            candle_core::bail!(
                "fused attention: q, k and v must be 4-D (batch, heads, tokens, head_dim); got q {q:?}, k {k:?}, v {v:?}"
            );
        };
        if (kb, kh, kd) != (b, h, d) || vd != (b, h, m, d) {
            candle_core::bail!(
                "fused attention: shapes do not fit: q {q:?} needs k and v of (batch {b}, heads {h}, keys, head_dim {d}) \
                 with the same number of keys; got k {k:?}, v {v:?}"
            );
        }
        if d == 0 || m == 0 {
            candle_core::bail!("fused attention: needs a non-zero head dim and at least one key; got q {q:?}, k {k:?}");
        }
        Ok(Self { batch: b, heads: h, n, m, d })
    }
}

/// The custom op; `scale` multiplies the scores before the softmax. The output is (batch,
/// heads, n, head_dim), or (batch, n, heads, head_dim) with `tokens_first`.
#[derive(Debug, Clone, Copy)]
pub struct FlashAttention {
    pub scale: f32,
    pub tokens_first: bool,
}

impl FlashAttention {
    fn out_shape(&self, dims: Dims) -> Shape {
        let Dims { batch, heads, n, d, .. } = dims;
        if self.tokens_first { Shape::from((batch, n, heads, d)) } else { Shape::from((batch, heads, n, d)) }
    }
}

/// `softmax(scale * q k^T) v` over the last two dims, fused on CUDA (f16/bf16, head dim up to
/// [`MAX_HEAD_DIM`]), an f32 reference on the CPU (any float dtype). Inputs need not be
/// contiguous; the result has q's dtype and shape.
pub fn fused_attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    let dims = Dims::check(q.shape(), k.shape(), v.shape())?;
    same_dtype_and_device(q, k, v)?;
    if dims.n == 0 || dims.batch == 0 || dims.heads == 0 {
        return q.zeros_like();
    }
    let (q, k, v) = (kernel_input(q)?, kernel_input(k)?, kernel_input(v)?);
    q.apply_op3_no_bwd(&k, &v, &FlashAttention { scale: scale as f32, tokens_first: false })
}

/// [`fused_attention`] on the layers' own layout: `q` (batch, n, heads x head_dim), `k` and `v`
/// (batch, m, heads x head_dim); returns (batch, n, heads x head_dim). On CUDA the heads are
/// strided views of the projections, read and written in place.
pub fn fused_attention_tokens(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize, scale: f64) -> Result<Tensor> {
    let split = |t: &Tensor, what: &str| -> Result<Tensor> {
        let (b, tokens, width) = t.dims3().map_err(|_| {
            candle_core::Error::Msg(format!(
                "fused attention: {what} must be (batch, tokens, heads x head_dim); got {:?}",
                t.dims()
            ))
        })?;
        if heads == 0 || !width.is_multiple_of(heads) {
            candle_core::bail!("fused attention: {what} width {width} does not split into {heads} heads");
        }
        t.reshape((b, tokens, heads, width / heads))?.transpose(1, 2)
    };
    let (qh, kh, vh) = (split(q, "q")?, split(k, "k")?, split(v, "v")?);
    let dims = Dims::check(qh.shape(), kh.shape(), vh.shape())?;
    same_dtype_and_device(q, k, v)?;
    if dims.n == 0 || dims.batch == 0 {
        return q.zeros_like();
    }
    let (qh, kh, vh) = (kernel_input(&qh)?, kernel_input(&kh)?, kernel_input(&vh)?);
    let out = qh.apply_op3_no_bwd(&kh, &vh, &FlashAttention { scale: scale as f32, tokens_first: true })?;
    out.reshape((dims.batch, dims.n, dims.heads * dims.d))
}

fn same_dtype_and_device(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<()> {
    if k.dtype() != q.dtype() || v.dtype() != q.dtype() {
        candle_core::bail!(
            "fused attention: q, k and v must share a dtype; got {:?}, {:?}, {:?}",
            q.dtype(),
            k.dtype(),
            v.dtype()
        );
    }
    if !q.device().same_device(k.device()) || !q.device().same_device(v.device()) {
        candle_core::bail!(
            "fused attention: q, k and v must be on one device; got {:?}, {:?}, {:?}",
            q.device(),
            k.device(),
            v.device()
        );
    }
    Ok(())
}

/// What the op reads: on CUDA any layout whose head dim is contiguous (the kernel takes the
/// other strides); the CPU reference wants contiguous storage.
fn kernel_input(t: &Tensor) -> Result<Tensor> {
    if t.device().is_cuda() && t.stride().last() == Some(&1) { Ok(t.clone()) } else { t.contiguous() }
}

/// Whether [`super::attention`] uses the fused op for queries `q` with heads of `head_dim`: a
/// CUDA tensor in f16/bf16, a head dim the kernel covers, a build that has the kernel, and not
/// switched off with `SDCROSSFRAME_ATTENTION=unfused`.
pub fn use_fused(q: &Tensor, head_dim: usize) -> bool {
    cfg!(sdcrossframe_flash_ptx)
        && q.device().is_cuda()
        && matches!(q.dtype(), DType::F16 | DType::BF16)
        && head_dim <= MAX_HEAD_DIM
        && super::switches::switches().fused_attention
}

impl CustomOp3 for FlashAttention {
    fn name(&self) -> &'static str {
        "flash-attention"
    }

    /// Reference: every row's scores, max-subtracted softmax and weighted sum in f32.
    fn cpu_fwd(
        &self,
        qs: &CpuStorage,
        ql: &Layout,
        ks: &CpuStorage,
        kl: &Layout,
        vs: &CpuStorage,
        vl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let Dims { batch, heads, n, m, d } = Dims::check(ql.shape(), kl.shape(), vl.shape())?;
        let to_f32 = |s, l, what| cpu_to_f32(s, l, "fused attention", what);
        let (q, k, v) = (to_f32(qs, ql, "q")?, to_f32(ks, kl, "k")?, to_f32(vs, vl, "v")?);
        let mut out = vec![0f32; batch * heads * n * d];
        // Where row i of head bh starts in the output.
        let out_row = |bh: usize, i: usize| {
            if self.tokens_first { ((bh / heads * n + i) * heads + bh % heads) * d } else { (bh * n + i) * d }
        };
        let mut scores = vec![0f32; m];
        for bh in 0..batch * heads {
            let (qh, kh, vh) = (&q[bh * n * d..][..n * d], &k[bh * m * d..][..m * d], &v[bh * m * d..][..m * d]);
            for i in 0..n {
                let qi = &qh[i * d..][..d];
                let mut max = f32::NEG_INFINITY;
                for (j, s) in scores.iter_mut().enumerate() {
                    *s = self.scale * qi.iter().zip(&kh[j * d..][..d]).map(|(a, b)| a * b).sum::<f32>();
                    max = max.max(*s);
                }
                let mut sum = 0f32;
                for s in scores.iter_mut() {
                    *s = (*s - max).exp();
                    sum += *s;
                }
                let oi = &mut out[out_row(bh, i)..][..d];
                for (j, &p) in scores.iter().enumerate() {
                    for (o, &x) in oi.iter_mut().zip(&vh[j * d..][..d]) {
                        *o += p * x;
                    }
                }
                oi.iter_mut().for_each(|o| *o /= sum);
            }
        }
        let storage = cpu_from_f32(out, qs.dtype(), "fused attention")?;
        Ok((storage, self.out_shape(Dims { batch, heads, n, m, d })))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        qs: &candle_core::CudaStorage,
        ql: &Layout,
        ks: &candle_core::CudaStorage,
        kl: &Layout,
        vs: &candle_core::CudaStorage,
        vl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let dims = Dims::check(ql.shape(), kl.shape(), vl.shape())?;
        #[cfg(not(sdcrossframe_flash_ptx))]
        {
            let _ = (qs, ks, vs, dims);
            candle_core::bail!(
                "fused attention: this build has no CUDA kernel for it (CUDA_COMPUTE_CAP below 80 at build time)"
            )
        }
        #[cfg(sdcrossframe_flash_ptx)]
        {
            let storage = match qs.dtype() {
                DType::F16 => cuda::launch::<half::f16>(self, dims, (qs, ql), (ks, kl), (vs, vl), "f16")?,
                DType::BF16 => cuda::launch::<half::bf16>(self, dims, (qs, ql), (ks, kl), (vs, vl), "bf16")?,
                other => {
                    candle_core::bail!("fused attention on CUDA supports f16 and bf16; got {other:?}")
                }
            };
            Ok((storage, self.out_shape(dims)))
        }
    }
}

#[cfg(all(feature = "cuda", sdcrossframe_flash_ptx))]
mod cuda {
    use super::{Dims, FlashAttention, MAX_HEAD_DIM};
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::{CudaDType, WrapErr};
    use candle_core::{CudaStorage, Layout, Result};

    const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/flash_attention.ptx"));
    const MODULE: &str = "sdcrossframe_flash_attention";
    /// From this many queries on, blocks of 8 warps (128 query rows): each K/V tile is read
    /// from L2 half as often; below it, 4-warp blocks (64 rows) fill the GPU better.
    const WIDE_BLOCKS_FROM: usize = 2048;

    /// Warps per block for `n` queries, unless `SDCROSSFRAME_FLASH_WARPS` forces one size.
    fn warps(n: usize) -> usize {
        crate::ops::switches::switches().flash_warps.unwrap_or(if n >= WIDE_BLOCKS_FROM { 8 } else { 4 })
    }

    /// A view from the layout's start to the end of the storage, and the layout's batch, head
    /// and row strides; the head dim must be contiguous.
    fn strided_view<'a, T: CudaDType>(
        s: &'a CudaStorage,
        l: &Layout,
        what: &str,
    ) -> Result<(candle_core::cuda_backend::cudarc::driver::CudaView<'a, T>, [i64; 3])> {
        let &[sb, sh, sr, sd] = l.stride() else {
            candle_core::bail!("fused attention: {what} must be 4-D");
        };
        if sd != 1 {
            candle_core::bail!("fused attention: {what} needs a contiguous head dim (stride {sd})");
        }
        let slice = s.as_cuda_slice::<T>()?;
        Ok((slice.slice(l.start_offset()..), [sb as i64, sh as i64, sr as i64]))
    }

    /// Head dims the kernel is instantiated for (`kernels/flash_attention.cu`): multiples of 16,
    /// and 40 (SD1.5's first level) so that its heads are not padded to 48.
    const KERNEL_HEAD_DIMS: [usize; 11] = [16, 32, 40, 48, 64, 80, 96, 112, 128, 144, 160];

    /// The smallest kernel head dim that holds `d` (columns past `d` are zero padding).
    pub(super) fn kernel_head_dim(d: usize) -> usize {
        KERNEL_HEAD_DIMS.into_iter().find(|&k| k >= d).unwrap_or(MAX_HEAD_DIM)
    }

    pub(super) fn launch<T: CudaDType + DeviceRepr>(
        op: &FlashAttention,
        dims: Dims,
        (qs, ql): (&CudaStorage, &Layout),
        (ks, kl): (&CudaStorage, &Layout),
        (vs, vl): (&CudaStorage, &Layout),
        type_name: &str,
    ) -> Result<CudaStorage> {
        let Dims { batch, heads, n, m, d } = dims;
        if d > MAX_HEAD_DIM {
            candle_core::bail!("fused attention on CUDA supports head dims up to {MAX_HEAD_DIM}; got {d}");
        }
        let bh = batch * heads;
        if bh > 65_535 || n.max(m).saturating_mul(d) > i32::MAX as usize {
            candle_core::bail!(
                "fused attention: too large for the kernel (batch x heads {bh} > 65535 or tokens x head_dim over 2^31)"
            );
        }
        let (q, q_strides) = strided_view::<T>(qs, ql, "q")?;
        let (k, k_strides) = strided_view::<T>(ks, kl, "k")?;
        let (v, v_strides) = strided_view::<T>(vs, vl, "v")?;
        let (n64, d64, h64) = (n as i64, d as i64, heads as i64);
        let o_strides: [i64; 3] =
            if op.tokens_first { [n64 * h64 * d64, d64, h64 * d64] } else { [h64 * n64 * d64, n64 * d64, d64] };
        let dev = qs.device();
        if !(op.scale > 0.0) {
            // The kernel takes the row max of unscaled scores.
            candle_core::bail!("fused attention on CUDA needs a positive scale; got {}", op.scale);
        }
        let padded = kernel_head_dim(d);
        let warps = warps(n);
        let suffix = if warps == 8 { "_w8" } else { "" };
        let func = dev.get_or_load_custom_func(&format!("flash_attn_{type_name}_d{padded}{suffix}"), MODULE, PTX)?;
        // SAFETY: the kernel writes every element of `out` (all n rows, d columns per head).
        let out = unsafe { dev.alloc::<T>(bh * n * d)? };
        let cfg = LaunchConfig {
            grid_dim: (n.div_ceil(warps * 16) as u32, bh as u32, 1),
            block_dim: (warps as u32 * 32, 1, 1),
            shared_mem_bytes: 0,
        };
        let (n_, m_, d_, heads_) = (n as i32, m as i32, d as i32, heads as i32);
        let scale_log2 = op.scale * std::f32::consts::LOG2_E;
        let mut builder = func.builder();
        builder.arg(&q).arg(&k).arg(&v).arg(&out).arg(&n_).arg(&m_).arg(&d_).arg(&scale_log2).arg(&heads_);
        for stride in q_strides.iter().chain(&k_strides).chain(&v_strides).chain(&o_strides) {
            builder.arg(stride);
        }
        // SAFETY: argument types and order match the kernel's signature; sizes checked above.
        unsafe { builder.launch(cfg) }.w()?;
        Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::max_abs_diff;
    use crate::ops::unfused_attention;
    use candle_core::Device;

    #[test]
    fn cpu_reference_matches_unfused_math() {
        let dev = Device::Cpu;
        // n != m, a head dim that is no multiple of 8, sharp enough scores that the max matters.
        for (n, m, d) in [(5, 13, 16), (77, 33, 40), (3, 1, 7)] {
            let q = (Tensor::randn(0f32, 1., (2, 3, n, d), &dev).unwrap() * 3.).unwrap();
            let k = Tensor::randn(0f32, 1., (2, 3, m, d), &dev).unwrap();
            let v = Tensor::randn(0f32, 1., (2, 3, m, d), &dev).unwrap();
            let scale = (d as f64).powf(-0.5);
            let fused = fused_attention(&q, &k, &v, scale).unwrap();
            let reference = unfused_attention(&q, &k, &v, scale).unwrap();
            assert_eq!(fused.dims(), &[2, 3, n, d]);
            let err = max_abs_diff(&fused, &reference);
            assert!(err < 1e-5, "n {n} m {m} d {d}: max abs error {err}");
        }
    }

    #[test]
    fn cpu_reference_handles_half_types_and_strided_inputs() {
        let dev = Device::Cpu;
        let q = Tensor::randn(0f32, 1., (1, 4, 2, 9), &dev).unwrap(); // (b, n, h, d) -> transposed below
        let k = Tensor::randn(0f32, 1., (1, 2, 11, 9), &dev).unwrap();
        let v = Tensor::randn(0f32, 1., (1, 2, 11, 9), &dev).unwrap();
        let q = q.transpose(1, 2).unwrap(); // not contiguous
        let reference = unfused_attention(&q.contiguous().unwrap(), &k, &v, 0.3).unwrap();
        for dtype in [DType::F16, DType::BF16] {
            let (qh, kh, vh) = (q.to_dtype(dtype).unwrap(), k.to_dtype(dtype).unwrap(), v.to_dtype(dtype).unwrap());
            let fused = fused_attention(&qh, &kh, &vh, 0.3).unwrap();
            assert_eq!(fused.dtype(), dtype);
            let err = max_abs_diff(&fused, &reference);
            assert!(err < 3e-2, "{dtype:?}: max abs error {err}");
        }
    }

    #[test]
    fn token_layout_reference_matches_split_heads() {
        let dev = Device::Cpu;
        let (b, h, n, m, d) = (2, 3, 7, 11, 8);
        let q = Tensor::randn(0f32, 1., (b, n, h * d), &dev).unwrap();
        let k = Tensor::randn(0f32, 1., (b, m, h * d), &dev).unwrap();
        let v = Tensor::randn(0f32, 1., (b, m, h * d), &dev).unwrap();
        let split = |t: &Tensor, len| t.reshape((b, len, h, d)).unwrap().transpose(1, 2).unwrap().contiguous().unwrap();
        let reference = unfused_attention(&split(&q, n), &split(&k, m), &split(&v, m), 0.4)
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .reshape((b, n, h * d))
            .unwrap();
        let fused = fused_attention_tokens(&q, &k, &v, h, 0.4).unwrap();
        assert_eq!(fused.dims(), &[b, n, h * d]);
        assert!(max_abs_diff(&fused, &reference) < 1e-5);
        let err = fused_attention_tokens(&q, &k, &v, 5, 0.4).unwrap_err().to_string();
        assert!(err.contains("does not split into 5 heads"), "{err}");
    }

    #[test]
    fn rejects_bad_shapes_and_dtypes_with_clear_errors() {
        let dev = Device::Cpu;
        let q = Tensor::zeros((1, 2, 3, 8), DType::F32, &dev).unwrap();
        let k = Tensor::zeros((1, 2, 5, 8), DType::F32, &dev).unwrap();
        let v_short = Tensor::zeros((1, 2, 4, 8), DType::F32, &dev).unwrap();
        let err = fused_attention(&q, &k, &v_short, 1.).unwrap_err().to_string();
        assert!(err.contains("shapes do not fit") && err.contains("[1, 2, 4, 8]"), "{err}");
        let err = fused_attention(&q, &k.to_dtype(DType::F16).unwrap(), &k, 1.).unwrap_err().to_string();
        assert!(err.contains("share a dtype"), "{err}");
        let flat = Tensor::zeros((2, 3, 8), DType::F32, &dev).unwrap();
        let err = fused_attention(&flat, &k, &k, 1.).unwrap_err().to_string();
        assert!(err.contains("must be 4-D"), "{err}");
        let none = Tensor::zeros((1, 2, 0, 8), DType::F32, &dev).unwrap();
        let err = fused_attention(&q, &none, &none, 1.).unwrap_err().to_string();
        assert!(err.contains("at least one key"), "{err}");
        // No queries: an empty result, no error.
        let empty_q = Tensor::zeros((1, 2, 0, 8), DType::F32, &dev).unwrap();
        assert_eq!(fused_attention(&empty_q, &k, &k, 1.).unwrap().dims(), &[1, 2, 0, 8]);
        assert!(!use_fused(&q, 8), "CPU tensors keep the unfused path");
    }
}
