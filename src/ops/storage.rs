//! Storage helpers shared by the custom ops with own kernels (fused attention, GroupNorm):
//! contiguous CPU storage to and from f32 for their CPU reference paths, and typed views of
//! contiguous CUDA storage for kernel launches.

use candle_core::{CpuStorage, DType, Layout, Result, Storage, Tensor};

/// The elements of contiguous CPU storage as f32; `op` and `what` name it in errors.
pub(crate) fn cpu_to_f32(s: &CpuStorage, layout: &Layout, op: &str, what: &str) -> Result<Vec<f32>> {
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("{op}: {what} must be contiguous");
    };
    Ok(match s {
        CpuStorage::F32(x) => x[start..end].to_vec(),
        CpuStorage::F16(x) => x[start..end].iter().map(|v| v.to_f32()).collect(),
        CpuStorage::BF16(x) => x[start..end].iter().map(|v| v.to_f32()).collect(),
        CpuStorage::F64(x) => x[start..end].iter().map(|&v| v as f32).collect(),
        other => {
            use candle_core::backend::BackendStorage;
            candle_core::bail!("{op}: {what} has dtype {:?}; expected a float type", other.dtype())
        }
    })
}

/// f32 results as CPU storage of `dtype`.
pub(crate) fn cpu_from_f32(values: Vec<f32>, dtype: DType, op: &str) -> Result<CpuStorage> {
    Ok(match dtype {
        DType::F32 => CpuStorage::F32(values),
        DType::F16 => CpuStorage::F16(values.into_iter().map(half::f16::from_f32).collect()),
        DType::BF16 => CpuStorage::BF16(values.into_iter().map(half::bf16::from_f32).collect()),
        DType::F64 => CpuStorage::F64(values.into_iter().map(f64::from).collect()),
        other => candle_core::bail!("{op}: unsupported dtype {other:?}"),
    })
}

/// A typed view of contiguous CUDA storage; `op` and `what` name it in errors.
#[cfg(feature = "cuda")]
pub(crate) fn cuda_view<'a, T: candle_core::cuda_backend::CudaDType>(
    s: &'a candle_core::CudaStorage,
    layout: &Layout,
    op: &str,
    what: &str,
) -> Result<candle_core::cuda_backend::cudarc::driver::CudaView<'a, T>> {
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("{op}: {what} must be contiguous");
    };
    Ok(s.as_cuda_slice::<T>()?.slice(start..end))
}

/// Bytes of the storage behind `tensor`: what keeping it alive keeps allocated. A view (a
/// `narrow` of a larger tensor, or `Tensor::copy` of one, which clones the whole storage) holds
/// more than its own elements. Memory accounting (the cross-frame store, the graphs' buffers).
pub fn held_bytes(tensor: &Tensor) -> usize {
    let (storage, _) = tensor.storage_and_layout();
    let elements = match &*storage {
        Storage::Cpu(s) => cpu_len(s),
        #[cfg(feature = "cuda")]
        Storage::Cuda(s) => cuda_len(s, tensor.dtype()),
        _ => None,
    };
    // Unknown layouts count the tensor's own elements.
    elements.unwrap_or_else(|| tensor.elem_count()) * tensor.dtype().size_in_bytes()
}

fn cpu_len(s: &CpuStorage) -> Option<usize> {
    Some(match s {
        CpuStorage::F32(x) => x.len(),
        CpuStorage::F16(x) => x.len(),
        CpuStorage::BF16(x) => x.len(),
        CpuStorage::F64(x) => x.len(),
        CpuStorage::U8(x) => x.len(),
        CpuStorage::U32(x) => x.len(),
        CpuStorage::I64(x) => x.len(),
        _ => return None,
    })
}

#[cfg(feature = "cuda")]
fn cuda_len(s: &candle_core::CudaStorage, dtype: DType) -> Option<usize> {
    match dtype {
        DType::F32 => s.as_cuda_slice::<f32>().ok().map(|x| x.len()),
        DType::F16 => s.as_cuda_slice::<half::f16>().ok().map(|x| x.len()),
        DType::BF16 => s.as_cuda_slice::<half::bf16>().ok().map(|x| x.len()),
        DType::F64 => s.as_cuda_slice::<f64>().ok().map(|x| x.len()),
        DType::U8 => s.as_cuda_slice::<u8>().ok().map(|x| x.len()),
        DType::U32 => s.as_cuda_slice::<u32>().ok().map(|x| x.len()),
        DType::I64 => s.as_cuda_slice::<i64>().ok().map(|x| x.len()),
        _ => None,
    }
}
