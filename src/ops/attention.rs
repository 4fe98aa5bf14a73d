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
/// Computed in chunks of query rows when the scores would exceed [`CHUNK_SCORES`]
/// ([`in_query_chunks`]).
pub fn unfused_attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    let dtype = q.dtype();
    let (b, heads, _, _) = q.dims4()?;
    let m = k.dim(2)?;
    let kf = match dtype {
        DType::F16 | DType::BF16 => k.to_dtype(DType::F32)?,
        _ => k.clone(),
    };
    let (kt, v) = (kf.t()?, v.contiguous()?);
    in_query_chunks(q, 2, b * heads * m, |q| {
        let qf = match dtype {
            DType::F16 | DType::BF16 => q.to_dtype(DType::F32)?,
            _ => q.clone(),
        };
        let scores = (qf.matmul(&kt)? * scale)?;
        let probs = candle_nn::ops::softmax_last_dim(&scores)?.to_dtype(dtype)?;
        probs.matmul(&v)
    })
}

/// Attention scores one chunk holds at most: 2^30 (4 GiB in f32, as much again for the
/// probabilities), below the 2^31 elements candle's CUDA softmax can index (it computes
/// `row * ncols + col` in `int`; beyond that it reads out of bounds) and small enough to
/// leave room on the device.
pub const CHUNK_SCORES: usize = 1 << 30;

/// `f(q)` for attention whose query rows lie along `dim` of `q`, each row scoring
/// `scores_per_row` keys in all (keys x the batch and head dims before `dim`): in one call when
/// the scores fit in [`CHUNK_SCORES`], else over chunks of rows (each row's softmax is its own,
/// so the result is the same), concatenated along `dim`.
pub fn in_query_chunks(
    q: &Tensor,
    dim: usize,
    scores_per_row: usize,
    f: impl Fn(&Tensor) -> Result<Tensor>,
) -> Result<Tensor> {
    let rows = q.dim(dim)?;
    let per_chunk = (CHUNK_SCORES / scores_per_row.max(1)).max(1);
    if rows <= per_chunk {
        return f(q);
    }
    let mut chunks = Vec::with_capacity(rows.div_ceil(per_chunk));
    for start in (0..rows).step_by(per_chunk) {
        chunks.push(f(&q.narrow(dim, start, per_chunk.min(rows - start))?.contiguous()?)?);
    }
    Tensor::cat(&chunks, dim)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn chunks_of_query_rows_give_the_same_attention() {
        let device = Device::Cpu;
        let q = Tensor::randn(0f32, 1.0, (2, 3, 37, 8), &device).unwrap();
        let k = Tensor::randn(0f32, 1.0, (2, 3, 50, 8), &device).unwrap();
        let v = Tensor::randn(0f32, 1.0, (2, 3, 50, 8), &device).unwrap();
        let whole = unfused_attention(&q, &k, &v, 0.3).unwrap();
        let scores = |q: &Tensor| candle_nn::ops::softmax_last_dim(&(q.matmul(&k.t()?)? * 0.3)?)?.matmul(&v);
        // 37 rows of 2 x 3 x 50 scores each: as if only 5 rows fitted in a chunk.
        let calls = std::cell::Cell::new(0);
        let chunked = in_query_chunks(&q, 2, CHUNK_SCORES / 5, |q| {
            calls.set(calls.get() + 1);
            scores(q)
        })
        .unwrap();
        assert_eq!(calls.get(), 8);
        let diff = (chunked - &whole).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(diff < 1e-6, "{diff}");
        // Rows that fit: one call on q itself.
        let one = in_query_chunks(&q, 2, 2 * 3 * 50, scores).unwrap();
        let diff = (one - &whole).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(diff < 1e-7, "{diff}");
    }
}
