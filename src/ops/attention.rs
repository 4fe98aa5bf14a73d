//! Multi-head scaled dot-product attention, `softmax(scale * Q K^T) V`, on the layers' token
//! layout: the fused kernel ([`super::flash_attention`]) where it applies, else candle's
//! unfused matmul + softmax, which the CPU parity tests against diffusers check.

use candle_core::{DType, Result, Tensor};

use super::flash_attention;

/// Attention of `q` (batch, n, heads x head_dim) over `k`, `v` (batch, m, heads x head_dim);
/// returns (batch, n, heads x head_dim). Half types on CUDA take the fused kernel, which never
/// stores the n x m scores and reads the heads straight from the projections.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize, scale: f64) -> Result<Tensor> {
    let (b, n, inner) = q.dims3()?;
    let head_dim = inner / heads.max(1);
    if flash_attention::use_fused(q, head_dim) {
        return flash_attention::fused_attention_tokens(q, k, v, heads, scale);
    }
    let m = k.dim(1)?;
    let split = |t: &Tensor, len: usize| -> Result<Tensor> {
        t.reshape((b, len, heads, head_dim))?.transpose(1, 2)?.contiguous()
    };
    let out = unfused_attention(&split(q, n)?, &split(k, m)?, &split(v, m)?, scale)?;
    out.transpose(1, 2)?.reshape((b, n, inner))
}

/// Unfused `softmax(scale * q k^T) v` for q (batch, heads, n, d) and k, v (batch, heads, m, d):
/// two matmuls and a softmax, scores and softmax in f32 for half types (diffusers' upcast).
pub fn unfused_attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    let dtype = q.dtype();
    let (qf, kf) = match dtype {
        DType::F16 | DType::BF16 => (q.to_dtype(DType::F32)?, k.to_dtype(DType::F32)?),
        _ => (q.clone(), k.clone()),
    };
    let scores = (qf.matmul(&kf.t()?)? * scale)?;
    let probs = candle_nn::ops::softmax_last_dim(&scores)?.to_dtype(dtype)?;
    probs.matmul(&v.contiguous()?)
}
