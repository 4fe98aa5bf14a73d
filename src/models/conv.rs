//! 2-D convolution with bias (`weight`, `bias`), as every model here uses it.
//!
//! Without the `cudnn` feature this is candle's convolution (im2col + GEMM on CUDA). With it,
//! f16/bf16 convolutions on CUDA go to cuDNN through [`cudnn`] below. candle's own cuDNN path
//! (candle-core's `cudnn` feature) was slower than im2col on an H100 (0.68 ms against 0.08 ms in
//! PyTorch for a 320-channel 3x3 at 2x64x64): it builds every descriptor and asks cuDNN's
//! heuristics for an algorithm on every call, and leaves the math type at its default, so half
//! precision convolutions skip the tensor cores. Ours keeps one plan per shape (descriptors,
//! algorithm, workspace size), allows tensor-core math and accumulates in f32, as PyTorch does.
//! `SDCROSSFRAME_CONV=im2col` keeps candle's path on CUDA (A/B measurements).

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

pub const CONV_ENV: &str = "SDCROSSFRAME_CONV";

#[derive(Debug, Clone)]
pub struct Conv2d {
    weight: Tensor,
    bias: Tensor,
    padding: usize,
    stride: usize,
}

impl Conv2d {
    /// A square `kernel` x `kernel` convolution from `in_channels` to `out_channels`.
    pub fn new(
        vb: VarBuilder,
        in_channels: usize,
        out_channels: usize,
        kernel: usize,
        padding: usize,
        stride: usize,
    ) -> Result<Self> {
        let weight = vb.get((out_channels, in_channels, kernel, kernel), "weight")?;
        let bias = vb.get(out_channels, "bias")?.reshape((out_channels, 1, 1))?;
        Ok(Self { weight, bias, padding, stride })
    }

    /// Padding `(kernel - 1) / 2`: odd kernels keep the size (at stride 1).
    pub fn same(vb: VarBuilder, in_channels: usize, out_channels: usize, kernel: usize, stride: usize) -> Result<Self> {
        Self::new(vb, in_channels, out_channels, kernel, (kernel - 1) / 2, stride)
    }

    /// The convolution without the bias.
    fn convolve(&self, xs: &Tensor) -> Result<Tensor> {
        #[cfg(feature = "cudnn")]
        if cudnn::applies(xs) {
            return cudnn::conv2d(xs, &self.weight, self.padding, self.stride);
        }
        xs.conv2d(&self.weight, self.padding, self.stride, 1, 1)
    }
}

impl Module for Conv2d {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.convolve(xs)?.broadcast_add(&self.bias)
    }
}

#[cfg(feature = "cudnn")]
mod cudnn {
    use std::cell::RefCell;
    use std::collections::HashMap;
    use std::sync::Arc;

    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::cudnn::{
        ConvDescriptor, ConvForward, Cudnn, CudnnDataType, FilterDescriptor, TensorDescriptor, sys,
    };
    use candle_core::cuda_backend::cudarc::driver::DeviceRepr;
    use candle_core::cuda_backend::{CudaDType, DeviceId};
    use candle_core::{CpuStorage, CudaStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};

    pub(super) fn applies(xs: &Tensor) -> bool {
        xs.device().is_cuda()
            && matches!(xs.dtype(), DType::F16 | DType::BF16)
            && std::env::var(super::CONV_ENV).map_or(true, |v| v != "im2col")
    }

    pub(super) fn conv2d(xs: &Tensor, weight: &Tensor, padding: usize, stride: usize) -> Result<Tensor> {
        let weight = weight.to_dtype(xs.dtype())?;
        xs.contiguous()?.apply_op2_no_bwd(&weight.contiguous()?, &CudnnConv { padding, stride })
    }

    struct CudnnConv {
        padding: usize,
        stride: usize,
    }

    /// Everything that fixes a plan.
    #[derive(Clone, Copy, PartialEq, Eq, Hash)]
    struct Key {
        device: DeviceId,
        dtype: DType,
        input: [usize; 4],
        filter: [usize; 4],
        padding: usize,
        stride: usize,
    }

    /// Descriptors, the algorithm cuDNN's heuristics chose for them and its workspace size.
    struct Plan<T: CudnnDataType> {
        conv: ConvDescriptor<f32>,
        x: TensorDescriptor<T>,
        w: FilterDescriptor<T>,
        y: TensorDescriptor<T>,
        algo: sys::cudnnConvolutionFwdAlgo_t,
        workspace: usize,
    }

    enum AnyPlan {
        F16(Plan<half::f16>),
        BF16(Plan<half::bf16>),
    }

    // cuDNN handles and descriptors are neither Send nor Sync: one set per thread.
    thread_local! {
        static HANDLES: RefCell<HashMap<DeviceId, Arc<Cudnn>>> = RefCell::new(HashMap::new());
        static PLANS: RefCell<HashMap<Key, Arc<AnyPlan>>> = RefCell::new(HashMap::new());
    }

    fn handle(dev: &candle_core::CudaDevice) -> Result<Arc<Cudnn>> {
        HANDLES.with(|handles| {
            if let Some(h) = handles.borrow().get(&dev.id()) {
                return Ok(h.clone());
            }
            let h = Cudnn::new(dev.cuda_stream()).map_err(|e| candle_core::Error::Msg(format!("cuDNN: {e:?}")))?;
            handles.borrow_mut().insert(dev.id(), h.clone());
            Ok(h)
        })
    }

    fn cudnn_err(
        what: &str,
    ) -> impl Fn(candle_core::cuda_backend::cudarc::cudnn::CudnnError) -> candle_core::Error + '_ {
        move |e| candle_core::Error::Msg(format!("cuDNN convolution: {what}: {e:?}"))
    }

    fn i32s(dims: [usize; 4]) -> [i32; 4] {
        dims.map(|d| d as i32)
    }

    fn make_plan<T: CudnnDataType>(cudnn: &Arc<Cudnn>, key: &Key, out: [usize; 4]) -> Result<Plan<T>> {
        let p = key.padding as i32;
        let s = key.stride as i32;
        let mut conv = cudnn
            .create_conv2d::<f32>([p, p], [s, s], [1, 1], sys::cudnnConvolutionMode_t::CUDNN_CROSS_CORRELATION)
            .map_err(cudnn_err("descriptor"))?;
        conv.set_math_type(sys::cudnnMathType_t::CUDNN_TENSOR_OP_MATH).map_err(cudnn_err("math type"))?;
        let nchw = sys::cudnnTensorFormat_t::CUDNN_TENSOR_NCHW;
        let x = cudnn.create_4d_tensor::<T>(nchw, i32s(key.input)).map_err(cudnn_err("input descriptor"))?;
        let w = cudnn.create_4d_filter::<T>(nchw, i32s(key.filter)).map_err(cudnn_err("filter descriptor"))?;
        let y = cudnn.create_4d_tensor::<T>(nchw, i32s(out)).map_err(cudnn_err("output descriptor"))?;
        let forward = ConvForward { conv: &conv, x: &x, w: &w, y: &y };
        let algo = forward.pick_algorithm().map_err(cudnn_err("algorithm"))?;
        let workspace = forward.get_workspace_size(algo).map_err(cudnn_err("workspace size"))?;
        tracing::debug!(?algo, workspace, input = ?key.input, filter = ?key.filter, "cuDNN convolution plan");
        Ok(Plan { conv, x, w, y, algo, workspace })
    }

    fn run<T: CudnnDataType + CudaDType + DeviceRepr + candle_core::WithDType>(
        plan: &Plan<T>,
        dev: &candle_core::CudaDevice,
        (xs, xl): (&CudaStorage, &Layout),
        (ws, wl): (&CudaStorage, &Layout),
        out_len: usize,
    ) -> Result<CudaStorage> {
        let (Some((x0, x1)), Some((w0, w1))) = (xl.contiguous_offsets(), wl.contiguous_offsets()) else {
            candle_core::bail!("cuDNN convolution: input and filter must be contiguous");
        };
        let x = xs.as_cuda_slice::<T>()?.slice(x0..x1);
        let w = ws.as_cuda_slice::<T>()?.slice(w0..w1);
        // SAFETY: cuDNN writes every output element (beta = 0).
        let mut y = unsafe { dev.alloc::<T>(out_len)? };
        let mut workspace = unsafe { dev.alloc::<u8>(plan.workspace.max(1))? };
        let forward = ConvForward { conv: &plan.conv, x: &plan.x, w: &plan.w, y: &plan.y };
        // SAFETY: the slices match the descriptors' types and sizes (the plan's key).
        unsafe { forward.launch(plan.algo, Some(&mut workspace), (T::one(), T::zero()), &x, &w, &mut y) }
            .map_err(cudnn_err("forward"))?;
        Ok(CudaStorage::wrap_cuda_slice(y, dev.clone()))
    }

    impl CustomOp2 for CudnnConv {
        fn name(&self) -> &'static str {
            "cudnn-conv2d"
        }

        fn cpu_fwd(&self, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
            candle_core::bail!("cuDNN convolution: CUDA tensors only")
        }

        fn cuda_fwd(
            &self,
            xs: &CudaStorage,
            xl: &Layout,
            ws: &CudaStorage,
            wl: &Layout,
        ) -> Result<(CudaStorage, Shape)> {
            let (&[n, c, h, w], &[k, kc, kh, kw]) = (xl.dims(), wl.dims()) else {
                candle_core::bail!(
                    "cuDNN convolution: expected 4-D input and filter, got {:?} and {:?}",
                    xl.dims(),
                    wl.dims()
                );
            };
            if kc != c {
                candle_core::bail!("cuDNN convolution: input has {c} channels, the filter expects {kc}");
            }
            let (p, s) = (self.padding, self.stride);
            if h + 2 * p < kh || w + 2 * p < kw {
                candle_core::bail!(
                    "cuDNN convolution: input {h}x{w} (padding {p}) is smaller than the {kh}x{kw} kernel"
                );
            }
            let out = [n, k, (h + 2 * p - kh) / s + 1, (w + 2 * p - kw) / s + 1];
            let dev = xs.device().clone();
            let key = Key {
                device: dev.id(),
                dtype: xs.dtype(),
                input: [n, c, h, w],
                filter: [k, kc, kh, kw],
                padding: p,
                stride: s,
            };
            let cached = PLANS.with(|plans| plans.borrow().get(&key).cloned());
            let plan = match cached {
                Some(plan) => plan,
                None => {
                    let cudnn = handle(&dev)?;
                    let plan = Arc::new(match key.dtype {
                        DType::F16 => AnyPlan::F16(make_plan(&cudnn, &key, out)?),
                        DType::BF16 => AnyPlan::BF16(make_plan(&cudnn, &key, out)?),
                        other => candle_core::bail!("cuDNN convolution: f16 and bf16 only, got {other:?}"),
                    });
                    PLANS.with(|plans| plans.borrow_mut().insert(key, plan.clone()));
                    plan
                }
            };
            let out_len = out.iter().product();
            let storage = match &*plan {
                AnyPlan::F16(plan) => run(plan, &dev, (xs, xl), (ws, wl), out_len)?,
                AnyPlan::BF16(plan) => run(plan, &dev, (xs, xl), (ws, wl), out_len)?,
            };
            Ok((storage, Shape::from(out.to_vec())))
        }
    }
}
