//! 2-D convolution (`weight`, and `bias` except where a model's convolution has none, as
//! some of the tiny VAE's do).
//!
//! On the CPU this is candle's convolution. On CUDA, 1x1 convolutions are GEMMs (cuBLAS), and
//! f16/bf16 convolutions run our im2col + GEMM ([`super::im2col`], whose columns let the GEMM
//! write NCHW directly). With the `cudnn` feature they may go to cuDNN instead (the `cudnn`
//! module below). Not through candle-core's own `cudnn` feature: it builds every descriptor and
//! asks cuDNN's heuristics for an algorithm on every call, and leaves the math type at its
//! default. Ours keeps the descriptors per shape, allows tensor-core math, accumulates in f32
//! (as PyTorch does), and times the candidates once per shape, like PyTorch's
//! `cudnn.benchmark`: every cuDNN algorithm and the im2col + GEMM, keeping the fastest (neither
//! cuDNN's heuristic pick nor im2col is fastest at every size). `SDCROSSFRAME_CONV` narrows the
//! choice. The choices are kept in a file, by default one per GPU model, driver and cuDNN in the
//! per-user cache directory (`ops::conv_plans`; `SDCROSSFRAME_CONV_PLANS` names another or
//! `off`), so that later processes skip the timing and a profiler run gets the choices of a
//! normal run ([`super::switches`]).

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

use super::fused::{self, Epilogue};

/// cuDNN's tensor-core kernels for f16/bf16 NHWC data want channel counts in multiples of 8: a
/// channels-last filter with fewer (an RGB image's 3, a latent's 4) is padded with zeros to this.
const NHWC_CHANNEL_MULTIPLE: usize = 8;

#[derive(Debug, Clone)]
pub struct Conv2d {
    /// (out, in, kh, kw), or (out, kh, kw, in) with `channels_last`.
    weight: Tensor,
    bias: Option<Tensor>,
    padding: usize,
    stride: usize,
    /// The filter is stored channels-last for [`Self::convolve_channels_last`] (cuDNN takes NHWC
    /// activations only with an NHWC filter), its channel counts padded with zeros to multiples
    /// of [`NHWC_CHANNEL_MULTIPLE`].
    channels_last: bool,
    /// (out_channels, in_channels) of the model's convolution (the stored filter may be padded).
    channels: (usize, usize),
    /// The bias padded with zeros like a channels-last filter's outputs (made once at
    /// [`Self::to_channels_last`], where the outputs are padded), for the epilogue on the padded
    /// output; `None` otherwise.
    padded_bias: Option<Tensor>,
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
        let bias = vb.get(out_channels, "bias")?;
        Ok(Self { bias: Some(bias), ..Self::without_bias(vb, in_channels, out_channels, kernel, padding, stride)? })
    }

    /// [`Self::new`] without a bias (PyTorch's `bias=False`): only `weight` is read.
    pub fn without_bias(
        vb: VarBuilder,
        in_channels: usize,
        out_channels: usize,
        kernel: usize,
        padding: usize,
        stride: usize,
    ) -> Result<Self> {
        let weight = vb.get((out_channels, in_channels, kernel, kernel), "weight")?;
        let channels = (out_channels, in_channels);
        Ok(Self { weight, bias: None, padding, stride, channels_last: false, channels, padded_bias: None })
    }

    /// A convolution from its filter (out, in, kh, kw) and bias (made at load from another
    /// layer's weights, e.g. a sub-pixel upsampler's phase filters).
    pub fn from_parts(weight: Tensor, bias: Option<Tensor>, padding: usize, stride: usize) -> Result<Self> {
        let (out, input, _, _) = weight.dims4()?;
        Ok(Self { weight, bias, padding, stride, channels_last: false, channels: (out, input), padded_bias: None })
    }

    /// (padding, stride).
    pub fn padding_stride(&self) -> (usize, usize) {
        (self.padding, self.stride)
    }

    /// Padding `(kernel - 1) / 2`: odd kernels keep the size (at stride 1).
    pub fn same(vb: VarBuilder, in_channels: usize, out_channels: usize, kernel: usize, stride: usize) -> Result<Self> {
        Self::new(vb, in_channels, out_channels, kernel, (kernel - 1) / 2, stride)
    }

    /// The filter as (out, in, kh, kw) (a strided view for a channels-last one).
    pub fn weight(&self) -> Result<Tensor> {
        if !self.channels_last {
            return Ok(self.weight.clone());
        }
        let (out, input) = self.channels;
        self.weight.narrow(0, 0, out)?.narrow(3, 0, input)?.permute((0, 3, 1, 2))
    }

    /// The same convolution with its filter stored channels-last, (out, kh, kw, in) with both
    /// channel counts padded with zeros to multiples of 8, for [`Self::convolve_channels_last`];
    /// the NCHW entry points still work (through a transposed view of the filter, slower).
    pub fn to_channels_last(self) -> Result<Self> {
        if self.channels_last {
            return Ok(self);
        }
        let (out, input) = self.channels;
        let weight = self
            .weight
            .permute((0, 2, 3, 1))?
            .pad_with_zeros(0, 0, out.next_multiple_of(NHWC_CHANNEL_MULTIPLE) - out)?
            .pad_with_zeros(3, 0, input.next_multiple_of(NHWC_CHANNEL_MULTIPLE) - input)?
            .contiguous()?;
        let extra = out.next_multiple_of(NHWC_CHANNEL_MULTIPLE) - out;
        let padded_bias =
            self.bias.as_ref().filter(|_| extra > 0).map(|b| b.pad_with_zeros(0, 0, extra)).transpose()?;
        Ok(Self { weight, channels_last: true, padded_bias, ..self })
    }

    /// `activation(convolution + bias + residual)` of `xs` (batch, height, width, in_channels)
    /// as (batch, out_height, out_width, out_channels), for a filter stored by
    /// [`Self::to_channels_last`]: cuDNN's NHWC convolution, then one pass for the rest on CUDA
    /// (no transposes on the way, as cuDNN makes for NCHW data).
    pub fn forward_channels_last(
        &self,
        xs: &Tensor,
        residual: Option<&Tensor>,
        activation: Epilogue,
    ) -> Result<Tensor> {
        let ys = self.convolve_channels_last_stored(xs)?;
        let out = self.channels.0;
        let extra = ys.dim(3)? - out;
        if extra == 0 || residual.is_some() {
            let ys = if extra == 0 { ys } else { ys.narrow(3, 0, out)? };
            return fused::add_feature_bias_activate(&ys, self.bias.as_ref(), residual, activation);
        }
        // A filter padded to more outputs (an image's 3 channels, a latent's 4): the epilogue on
        // the padded rows (whole 16-byte words, where 3 or 4 values a row would leave the
        // kernel's threads idle), then the model's channels.
        fused::add_feature_bias_activate(&ys, self.padded_bias.as_ref(), None, activation)?.narrow(3, 0, out)
    }

    /// The convolution without its bias of `xs` (batch, height, width, in_channels), as (batch,
    /// out_height, out_width, out_channels): cuDNN with NHWC activations and filter, for a
    /// filter stored by [`Self::to_channels_last`].
    pub fn convolve_channels_last(&self, xs: &Tensor) -> Result<Tensor> {
        let ys = self.convolve_channels_last_stored(xs)?;
        let out = self.channels.0;
        if ys.dim(3)? == out { Ok(ys) } else { ys.narrow(3, 0, out) }
    }

    /// [`Self::convolve_channels_last`] with as many output channels as the stored filter (on
    /// cuDNN padded to a multiple of 8, the padding's values zero).
    fn convolve_channels_last_stored(&self, xs: &Tensor) -> Result<Tensor> {
        if !self.channels_last {
            candle_core::bail!("channels-last convolution: the filter is not stored channels-last");
        }
        #[cfg(feature = "cudnn")]
        if xs.device().is_cuda() && matches!(xs.dtype(), candle_core::DType::F16 | candle_core::DType::BF16) {
            let (input, stored_in) = (self.channels.1, self.weight.dim(3)?);
            let xs = match xs.dim(3)? {
                c if c == stored_in => xs.clone(),
                c if c == input => xs.contiguous()?.pad_with_zeros(3, 0, stored_in - input)?,
                c => candle_core::bail!("channels-last convolution: {c} input channels, the filter takes {input}"),
            };
            return cudnn::conv2d_channels_last(&xs, &self.weight, self.padding, self.stride);
        }
        // Elsewhere (tests): the NCHW convolution between two transposes.
        let nchw = xs.permute((0, 3, 1, 2))?.contiguous()?;
        self.convolve(&nchw)?.permute((0, 2, 3, 1))?.contiguous()
    }

    /// The same convolution with its weights copied to `device` (queued there: the weights
    /// must be ready on their own device first).
    pub fn to_device(&self, device: &candle_core::Device) -> Result<Self> {
        Ok(Self {
            weight: self.weight.to_device(device)?,
            bias: self.bias.as_ref().map(|b| b.to_device(device)).transpose()?,
            padding: self.padding,
            stride: self.stride,
            channels_last: self.channels_last,
            channels: self.channels,
            padded_bias: self.padded_bias.as_ref().map(|b| b.to_device(device)).transpose()?,
        })
    }

    /// Removes the bias and returns it, for a caller that adds it elsewhere (a resnet folds
    /// `conv1`'s bias into its time-embedding projection's).
    pub fn take_bias(&mut self) -> Option<Tensor> {
        self.padded_bias = None;
        self.bias.take()
    }

    /// `(out_channels)`; `None` for a convolution without a bias.
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    /// A 1x1 convolution at stride 1 without padding: a matrix product per sample.
    fn is_pointwise(&self) -> bool {
        let dims = self.weight.dims();
        let (kh, kw) = if self.channels_last { (dims[1], dims[2]) } else { (dims[2], dims[3]) };
        kh == 1 && kw == 1 && self.stride == 1 && self.padding == 0
    }

    /// The weight of a pointwise convolution as an (out, in) matrix.
    fn pointwise_matrix(&self) -> Result<Tensor> {
        let dims = self.weight.dims();
        // (out, 1, 1, in) when channels-last: the same matrix, but for its padding.
        let matrix = self.weight.reshape((dims[0], self.weight.elem_count() / dims[0]))?;
        let (out, input) = self.channels;
        if self.channels_last { matrix.narrow(0, 0, out)?.narrow(1, 0, input) } else { Ok(matrix) }
    }

    /// The convolution without the bias.
    fn convolve(&self, xs: &Tensor) -> Result<Tensor> {
        if self.channels_last {
            let nchw_filter = Self { weight: self.weight()?, channels_last: false, ..self.clone() };
            return nchw_filter.convolve(xs);
        }
        // On CUDA a 1x1 convolution is one batched GEMM (cuBLAS, tensor cores); cuDNN runs NCHW
        // 1x1 convolutions without tensor cores.
        if self.is_pointwise() && fused::applies(xs) {
            let (n, c, h, w) = xs.dims4()?;
            let out = self.pointwise_matrix()?.broadcast_left(n)?.matmul(&xs.reshape((n, c, h * w))?)?;
            return out.reshape((n, (), h, w));
        }
        #[cfg(feature = "cudnn")]
        if cudnn::applies(xs) {
            return cudnn::conv2d(xs, &self.weight, self.padding, self.stride);
        }
        if super::im2col::applies(xs) {
            return super::im2col::conv2d_columns(xs, &self.weight, self.padding, self.stride);
        }
        xs.conv2d(&self.weight, self.padding, self.stride, 1, 1)
    }

    /// The convolution plus its bias, plus a per-sample channel bias `sample_bias` (batch,
    /// out_channels) (the resnet's time embedding), plus `residual` (the output's shape), in
    /// that order; on CUDA the three additions are one kernel.
    pub fn forward_add(&self, xs: &Tensor, sample_bias: Option<&Tensor>, residual: Option<&Tensor>) -> Result<Tensor> {
        let ys = self.convolve(xs)?;
        let Some(bias) = &self.bias else {
            // No bias of its own: the per-sample bias, if any, takes its place.
            return match (sample_bias, residual) {
                (Some(extra), residual) => fused::add_channel_bias(&ys, extra, residual),
                (None, Some(r)) => r + ys,
                (None, None) => Ok(ys),
            };
        };
        if fused::applies(&ys) {
            return match sample_bias {
                Some(extra) => fused::add_channel_bias(&ys, &extra.broadcast_add(&bias.unsqueeze(0)?)?, residual),
                None => fused::add_channel_bias(&ys, bias, residual),
            };
        }
        let ys = fused::add_channel_bias(&ys, bias, None)?;
        let ys = match sample_bias {
            Some(extra) => extra.unsqueeze(2)?.unsqueeze(3)?.broadcast_add(&ys)?,
            None => ys,
        };
        match residual {
            Some(r) => r + ys,
            None => Ok(ys),
        }
    }

    /// `(convolution + bias) * scale` (a ControlNet's zero convolution and its conditioning
    /// scale), one pass after the convolution on CUDA.
    pub fn forward_scaled(&self, xs: &Tensor, scale: f64) -> Result<Tensor> {
        let ys = self.convolve(xs)?;
        match &self.bias {
            Some(bias) => fused::scale_channel_bias(&ys, bias, scale),
            None => ys * scale,
        }
    }

    /// A pointwise convolution whose output goes on as tokens: (batch, height x width,
    /// out_channels). On CUDA the GEMM reads the feature map transposed and writes the tokens
    /// directly, instead of a convolution and a permute copy.
    pub fn forward_to_tokens(&self, xs: &Tensor) -> Result<Tensor> {
        let (n, c, h, w) = xs.dims4()?;
        if !(self.is_pointwise() && fused::applies(xs)) {
            let ys = self.forward(xs)?;
            let out = ys.dim(1)?;
            return ys.permute((0, 2, 3, 1))?.reshape((n, h * w, out));
        }
        let tokens_in = xs.reshape((n, c, h * w))?.transpose(1, 2)?;
        let ys = tokens_in.matmul(&self.pointwise_matrix()?.t()?.broadcast_left(n)?)?;
        match &self.bias {
            Some(bias) => fused::add_feature_bias(&ys, bias, None),
            None => Ok(ys),
        }
    }

    /// A pointwise convolution of tokens (batch, height x width, in_channels) back to a feature
    /// map (batch, out_channels, height, width), plus `residual`.
    pub fn forward_from_tokens(&self, tokens: &Tensor, (h, w): (usize, usize), residual: &Tensor) -> Result<Tensor> {
        let (n, hw, c) = tokens.dims3()?;
        if hw != h * w {
            candle_core::bail!("convolution from tokens: {hw} tokens do not make a {h}x{w} map");
        }
        if !(self.is_pointwise() && fused::applies(tokens)) {
            let map = tokens.reshape((n, h, w, c))?.permute((0, 3, 1, 2))?.contiguous()?;
            return self.forward(&map)? + residual;
        }
        let ys = self.pointwise_matrix()?.broadcast_left(n)?.matmul(&tokens.transpose(1, 2)?)?;
        let ys = ys.reshape((n, (), h, w))?;
        match &self.bias {
            Some(bias) => fused::add_channel_bias(&ys, bias, Some(residual)),
            None => residual + ys,
        }
    }
}

impl Module for Conv2d {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.forward_add(xs, None, None)
    }
}

#[cfg(feature = "cudnn")]
mod cudnn {
    use std::cell::RefCell;
    use std::collections::HashMap;
    use std::rc::Rc;
    use std::sync::Arc;
    use std::time::Instant;

    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::cudnn::{
        ConvDescriptor, ConvForward, Cudnn, CudnnDataType, CudnnError, FilterDescriptor, TensorDescriptor, sys,
    };
    use candle_core::cuda_backend::cudarc::driver::{CudaStream, DeviceRepr};
    use candle_core::cuda_backend::{CudaDType, DeviceId};
    use candle_core::{CpuStorage, CudaStorage, CustomOp2, DType, Layout, Result, Shape, Tensor, WithDType};

    use crate::ops::switches::{ConvChoice, switches};

    use sys::cudnnConvolutionFwdAlgo_t as Algo;

    /// The cuDNN algorithms tried per shape.
    const ALGOS: [Algo; 7] = [
        Algo::CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_GEMM,
        Algo::CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_PRECOMP_GEMM,
        Algo::CUDNN_CONVOLUTION_FWD_ALGO_GEMM,
        Algo::CUDNN_CONVOLUTION_FWD_ALGO_FFT,
        Algo::CUDNN_CONVOLUTION_FWD_ALGO_FFT_TILING,
        Algo::CUDNN_CONVOLUTION_FWD_ALGO_WINOGRAD,
        Algo::CUDNN_CONVOLUTION_FWD_ALGO_WINOGRAD_NONFUSED,
    ];
    /// Algorithms needing more scratch memory than this are not considered.
    const MAX_WORKSPACE: usize = 512 << 20;

    pub(super) fn applies(xs: &Tensor) -> bool {
        xs.device().is_cuda() && matches!(xs.dtype(), DType::F16 | DType::BF16) && switches().conv != ConvChoice::Im2col
    }

    /// How one shape runs.
    #[derive(Clone, Copy, Debug)]
    enum Method {
        Im2col,
        Cudnn(Algo),
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
        /// NHWC activations and filter (`input` and `filter` still list N, C, H, W and K, C, R, S).
        channels_last: bool,
    }

    impl Key {
        /// The input's and the filter's dims as the tensors hold them.
        fn stored_dims(&self) -> ([usize; 4], [usize; 4]) {
            let ([n, c, h, w], [k, kc, r, s]) = (self.input, self.filter);
            if self.channels_last { ([n, h, w, c], [k, r, s, kc]) } else { (self.input, self.filter) }
        }

        /// The output's dims as stored.
        fn stored_output(&self) -> [usize; 4] {
            let [n, k, h, w] = output_dims(self);
            if self.channels_last { [n, h, w, k] } else { [n, k, h, w] }
        }
    }

    // cuDNN handles and descriptors are neither Send nor Sync: one set per thread.
    thread_local! {
        static CUDNN: RefCell<ThreadCudnn> = RefCell::new(ThreadCudnn::default());
        static METHODS: RefCell<HashMap<Key, Method>> = RefCell::new(HashMap::new());
    }

    /// A thread's cuDNN handles and plans (descriptors), destroyed when the thread ends.
    /// cudarc's handle unwraps cudnnDestroy's result in its `Drop`, and a panic in a
    /// thread-local's destructor aborts the process: a worker thread that ended while other
    /// threads kept the GPU busy took the benchmark down that way (`CUDNN_STATUS_INTERNAL_ERROR`,
    /// H200, 4 model copies). So each handle is destroyed with its context current on the
    /// thread (which a dying thread may no longer have), and a failure is caught and logged.
    #[derive(Default)]
    struct ThreadCudnn {
        /// Each handle with the stream it was made on (the handle holds it too).
        handles: HashMap<DeviceId, (Arc<Cudnn>, Arc<CudaStream>)>,
        plans: HashMap<Key, Rc<AnyPlan>>,
    }

    impl Drop for ThreadCudnn {
        fn drop(&mut self) {
            // The plans' descriptors hold the handles too: drop them first, so that the last
            // reference to each handle goes below.
            let plans = std::mem::take(&mut self.plans);
            if std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || drop(plans))).is_err() {
                tracing::warn!("destroying cuDNN descriptors failed at thread exit");
            }
            for (id, (handle, stream)) in self.handles.drain() {
                if let Err(e) = stream.context().bind_to_thread() {
                    // Without the context nothing can be destroyed; keep the handle (a leak
                    // at thread exit) rather than fail.
                    tracing::debug!(?id, "cuDNN handle left undestroyed at thread exit: {e:?}");
                    std::mem::forget(handle);
                    continue;
                }
                let destroyed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || drop(handle)));
                if destroyed.is_err() {
                    tracing::warn!(?id, "cudnnDestroy failed at thread exit (the handle is leaked)");
                }
            }
        }
    }

    pub(super) fn conv2d(xs: &Tensor, weight: &Tensor, padding: usize, stride: usize) -> Result<Tensor> {
        conv2d_in_layout(xs, weight, padding, stride, false)
    }

    /// [`conv2d`] of NHWC `xs` (n, h, w, c) with an NHWC filter (k, kh, kw, c): an (n, oh, ow, k)
    /// output, cuDNN only (no im2col for this layout).
    pub(super) fn conv2d_channels_last(xs: &Tensor, weight: &Tensor, padding: usize, stride: usize) -> Result<Tensor> {
        conv2d_in_layout(xs, weight, padding, stride, true)
    }

    fn conv2d_in_layout(
        xs: &Tensor,
        weight: &Tensor,
        padding: usize,
        stride: usize,
        channels_last: bool,
    ) -> Result<Tensor> {
        let xs = xs.contiguous()?;
        let weight = weight.to_dtype(xs.dtype())?.contiguous()?;
        let (&[n, d1, d2, d3], &[k, f1, f2, f3]) = (xs.dims(), weight.dims()) else {
            candle_core::bail!(
                "convolution: expected 4-D input and filter, got {:?} and {:?}",
                xs.dims(),
                weight.dims()
            );
        };
        // The key lists N, C, H, W and K, C, R, S in either layout.
        let (input, filter) =
            if channels_last { ([n, d3, d1, d2], [k, f3, f1, f2]) } else { ([n, d1, d2, d3], [k, f1, f2, f3]) };
        let candle_core::Device::Cuda(dev) = xs.device() else {
            candle_core::bail!("cuDNN convolution: CUDA tensors only")
        };
        let key = Key { device: dev.id(), dtype: xs.dtype(), input, filter, padding, stride, channels_last };
        conv2d_keyed(&xs, &weight, key, dev)
    }

    /// The convolution of `key`'s shape with the method tuned (or saved, or of the nearest batch)
    /// for it.
    fn conv2d_keyed(xs: &Tensor, weight: &Tensor, key: Key, dev: &candle_core::CudaDevice) -> Result<Tensor> {
        let (xs, weight) = (xs.clone(), weight.clone());
        let known = METHODS.with(|m| m.borrow().get(&key).copied());
        let method = match known {
            Some(method) => method,
            None => {
                let saved = saved_plans::lookup(dev, &key);
                // A batch size not seen before (cross-stream calls of another number of streams,
                // a stream batch filling): the method tuned for the nearest batch of the same
                // shape, instead of timing every algorithm again, which stalls every stream on
                // a shared model for seconds.
                if saved.is_none()
                    && let Some((method, batch)) = nearest_batch_method(&key)
                {
                    match run_method(&xs, &weight, &key, method) {
                        Ok(out) => {
                            tracing::debug!(?method, input = ?key.input, from_batch = batch, "convolution method of another batch size");
                            METHODS.with(|m| m.borrow_mut().insert(key, method));
                            return Ok(out);
                        }
                        Err(e) => {
                            tracing::debug!(?method, input = ?key.input, "the method of batch {batch} does not run here: {e}; tuning")
                        }
                    }
                }
                let method = match saved {
                    Some(method) => method,
                    None => {
                        let (method, complete) = tune(&xs, &weight, &key)?;
                        if complete {
                            saved_plans::record(dev, &key, method);
                        }
                        method
                    }
                };
                METHODS.with(|m| m.borrow_mut().insert(key, method));
                method
            }
        };
        run_method(&xs, &weight, &key, method)
    }

    /// The method this thread uses for `key`'s shape at the nearest other batch size, and that batch.
    fn nearest_batch_method(key: &Key) -> Option<(Method, usize)> {
        METHODS.with(|m| {
            m.borrow()
                .iter()
                .filter(|(k, _)| Key { input: [key.input[0], k.input[1], k.input[2], k.input[3]], ..**k } == *key)
                .min_by_key(|(k, _)| (k.input[0].abs_diff(key.input[0]), usize::MAX - k.input[0]))
                .map(|(k, method)| (*method, k.input[0]))
        })
    }

    fn run_method(xs: &Tensor, weight: &Tensor, key: &Key, method: Method) -> Result<Tensor> {
        match method {
            Method::Im2col if key.channels_last => {
                candle_core::bail!("convolution: im2col does not take channels-last activations")
            }
            Method::Im2col if crate::ops::im2col::applies(xs) => {
                crate::ops::im2col::conv2d_columns(xs, weight, key.padding, key.stride)
            }
            Method::Im2col => xs.conv2d(weight, key.padding, key.stride, 1, 1),
            Method::Cudnn(algo) => xs.apply_op2_no_bwd(weight, &CudnnConv { key: *key, algo }),
        }
    }

    /// Times every candidate on this shape (one warm-up, then five calls replayed from a CUDA
    /// graph twice) and keeps the fastest; also whether every candidate that failed failed for
    /// another reason than memory (then the choice is worth saving).
    fn tune(xs: &Tensor, weight: &Tensor, key: &Key) -> Result<(Method, bool)> {
        let _span = tracing::debug_span!("conv-tune", input = ?key.input, filter = ?key.filter).entered();
        let device = xs.device();
        let time = |method: Method| -> Result<f64> {
            run_method(xs, weight, key, method)?;
            // GPU time as a replayed graph runs it (host timing favoured methods with fewer
            // launches); host timing if the method cannot be captured.
            let in_graph =
                crate::ops::step_graphs::graph_time(device, 5, || run_method(xs, weight, key, method).map(drop));
            match in_graph {
                Ok(t) => return Ok(t),
                Err(e) => tracing::debug!(?method, "timing without a graph: {e:#}"),
            }
            device.synchronize()?;
            let start = Instant::now();
            for _ in 0..3 {
                run_method(xs, weight, key, method)?;
            }
            device.synchronize()?;
            Ok(start.elapsed().as_secs_f64() / 3.0)
        };
        let mut candidates: Vec<Method> = ALGOS.iter().map(|&a| Method::Cudnn(a)).collect();
        if switches().conv != ConvChoice::Cudnn && !key.channels_last {
            candidates.insert(0, Method::Im2col);
        }
        let mut best: Option<(f64, Method)> = None;
        // A candidate that ran out of device memory: the choice is not saved (without the
        // memory pressure it could differ), and if none ran, that is the error.
        let mut out_of_memory: Option<candle_core::Error> = None;
        for method in candidates {
            match time(method) {
                Ok(t) => {
                    tracing::trace!(?method, ms = t * 1e3, "candidate");
                    if best.is_none_or(|(b, _)| t < b) {
                        best = Some((t, method));
                    }
                }
                Err(e) if is_out_of_memory(&e) => {
                    tracing::debug!(?method, "out of device memory: {e}");
                    out_of_memory = Some(e);
                }
                // Unsupported algorithms and oversized workspaces drop out here.
                Err(e) => tracing::trace!(?method, "not usable: {e}"),
            }
        }
        let Some((t, method)) = best else {
            if let Some(e) = out_of_memory {
                candle_core::bail!(
                    "cuDNN convolution: no algorithm runs input {:?} with filter {:?}, the last failed for lack of device memory: {e}",
                    key.input,
                    key.filter
                );
            }
            candle_core::bail!(
                "cuDNN convolution: no algorithm runs input {:?} with filter {:?}",
                key.input,
                key.filter
            )
        };
        tracing::debug!(?method, ms = t * 1e3, "fastest");
        Ok((method, out_of_memory.is_none()))
    }

    /// The driver's, cuBLAS's or cuDNN's out-of-memory error.
    fn is_out_of_memory(e: &candle_core::Error) -> bool {
        crate::gpu_memory::names_out_of_memory(&format!("{e} {e:?}"))
    }

    /// Tuning results kept in a file, one line per shape, so that a later process (or a profiler
    /// run, whose launch overhead would skew host-timed tuning) reuses them instead of timing
    /// again: by default one per GPU model, driver and cuDNN version in the per-user cache
    /// directory, else the file `SDCROSSFRAME_CONV_PLANS` names (`off`: none); names, location
    /// and parsing in `ops::conv_plans`. Reading, writing or naming failures are logged
    /// and only cost the timing.
    mod saved_plans {
        use super::{ALGOS, ConvChoice, Key, Method, switches};
        use crate::ops::conv_plans;
        use crate::ops::switches::ConvPlans;
        use candle_core::CudaDevice;
        use candle_core::cuda_backend::DeviceId;
        use candle_core::cuda_backend::cudarc::driver::sys as driver;
        use std::collections::HashMap;
        use std::io::Write;
        use std::path::{Path, PathBuf};
        use std::sync::{Mutex, OnceLock, PoisonError};

        fn shape_line(key: &Key) -> String {
            let layout = if key.channels_last { "nhwc" } else { "" };
            conv_plans::shape_line(&format!("{:?}{layout}", key.dtype), key.input, key.filter, key.padding, key.stride)
        }

        fn method_name(method: Method) -> String {
            match method {
                Method::Im2col => "im2col".into(),
                Method::Cudnn(algo) => format!("{algo:?}"),
            }
        }

        fn parse_method(name: &str) -> Option<Method> {
            if name == "im2col" {
                return Some(Method::Im2col);
            }
            ALGOS.iter().find(|a| format!("{a:?}") == name).map(|&a| Method::Cudnn(a))
        }

        /// One file's plans as read at first use, plus those recorded since.
        struct PlanFile {
            plans: HashMap<String, Method>,
            /// A write failed and was logged; later failures are not.
            write_warned: bool,
        }

        #[derive(Default)]
        struct Files {
            /// Each device's file (`None`: no file for it).
            paths: HashMap<DeviceId, Option<PathBuf>>,
            files: HashMap<PathBuf, PlanFile>,
        }

        fn files() -> &'static Mutex<Files> {
            static FILES: OnceLock<Mutex<Files>> = OnceLock::new();
            FILES.get_or_init(Mutex::default)
        }

        /// `dev`'s plan file, or `None` when there is none.
        fn path_for(dev: &CudaDevice) -> Option<PathBuf> {
            match &switches().conv_plans {
                ConvPlans::Off => None,
                ConvPlans::File(path) => Some(path.clone()),
                ConvPlans::CacheDir => {
                    let Some(dir) = conv_plans::cache_dir(|name| std::env::var_os(name)) else {
                        tracing::debug!(
                            "no convolution plan cache: neither XDG_CACHE_HOME nor HOME is set; every process tunes"
                        );
                        return None;
                    };
                    match device_file_name(dev) {
                        Ok(name) => Some(dir.join(name)),
                        Err(e) => {
                            tracing::warn!("no convolution plan cache: {e}; every process tunes");
                            None
                        }
                    }
                }
            }
        }

        /// The cache file's name for `dev`: its model, the driver's and cuDNN's versions.
        fn device_file_name(dev: &CudaDevice) -> Result<String, String> {
            let stream = dev.cuda_stream();
            let name = stream.context().name().map_err(|e| format!("cannot read the device name: {e:?}"))?;
            let mut driver_version = 0;
            // SAFETY: writes one int; needs no context.
            let status = unsafe { driver::cuDriverGetVersion(&mut driver_version) };
            if status != driver::CUresult::CUDA_SUCCESS {
                return Err(format!("cannot read the driver version: {status:?}"));
            }
            let cudnn_version = candle_core::cuda_backend::cudarc::cudnn::result::get_version();
            let cudnn_only = switches().conv == ConvChoice::Cudnn;
            Ok(conv_plans::file_name(&name, driver_version, cudnn_version, cudnn_only))
        }

        fn load(path: &Path) -> PlanFile {
            let plans = match std::fs::read(path) {
                Ok(bytes) => {
                    let plans = conv_plans::parse(&bytes, path, parse_method);
                    tracing::info!("convolution plans: {} shapes from {}", plans.len(), path.display());
                    plans
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    tracing::debug!("convolution plans: {} does not exist yet", path.display());
                    HashMap::new()
                }
                Err(e) => {
                    tracing::warn!("cannot read convolution plans from {}: {e}; tuning instead", path.display());
                    HashMap::new()
                }
            };
            PlanFile { plans, write_warned: false }
        }

        /// `f` on `dev`'s plan file (read on first use), or `None` without one.
        fn with_file<T>(dev: &CudaDevice, f: impl FnOnce(&Path, &mut PlanFile) -> T) -> Option<T> {
            let mut files = files().lock().unwrap_or_else(PoisonError::into_inner);
            let files = &mut *files;
            let path = files.paths.entry(dev.id()).or_insert_with(|| path_for(dev)).as_ref()?;
            let file = files.files.entry(path.clone()).or_insert_with(|| load(path));
            Some(f(path, file))
        }

        pub(super) fn lookup(dev: &CudaDevice, key: &Key) -> Option<Method> {
            with_file(dev, |_, file| file.plans.get(&shape_line(key)).copied()).flatten()
        }

        pub(super) fn record(dev: &CudaDevice, key: &Key, method: Method) {
            with_file(dev, |path, file| {
                let shape = shape_line(key);
                let line = conv_plans::plan_line(&shape, &method_name(method));
                file.plans.insert(shape, method);
                if let Err(e) = append(path, &line)
                    && !std::mem::replace(&mut file.write_warned, true)
                {
                    tracing::warn!(
                        "cannot record convolution plans in {}: {e}; later processes will tune again",
                        path.display()
                    );
                }
            });
        }

        /// Appends one whole line with a single write (the folder is made when missing), so
        /// that processes appending to the same file at once keep their lines whole.
        fn append(path: &Path, line: &str) -> std::io::Result<()> {
            if let Some(dir) = path.parent().filter(|dir| !dir.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir)?;
            }
            std::fs::OpenOptions::new().create(true).append(true).open(path)?.write_all(line.as_bytes())
        }
    }

    struct CudnnConv {
        key: Key,
        algo: Algo,
    }

    /// A shape's descriptors and the workspace size of each algorithm tried on it.
    struct Plan<T: CudnnDataType> {
        conv: ConvDescriptor<f32>,
        x: TensorDescriptor<T>,
        w: FilterDescriptor<T>,
        y: TensorDescriptor<T>,
        workspaces: RefCell<HashMap<Algo, usize>>,
    }

    enum AnyPlan {
        F16(Plan<half::f16>),
        BF16(Plan<half::bf16>),
    }

    fn handle(dev: &candle_core::CudaDevice) -> Result<Arc<Cudnn>> {
        CUDNN.with(|state| {
            if let Some((h, _)) = state.borrow().handles.get(&dev.id()) {
                return Ok(h.clone());
            }
            let h = Cudnn::new(dev.cuda_stream()).map_err(cudnn_err("handle"))?;
            state.borrow_mut().handles.insert(dev.id(), (h.clone(), dev.cuda_stream()));
            Ok(h)
        })
    }

    fn cudnn_err(what: &str) -> impl Fn(CudnnError) -> candle_core::Error + '_ {
        move |e| candle_core::Error::Msg(format!("cuDNN convolution: {what}: {e:?}"))
    }

    fn i32s(dims: [usize; 4]) -> [i32; 4] {
        dims.map(|d| d as i32)
    }

    fn output_dims(key: &Key) -> [usize; 4] {
        let ([n, _, h, w], [k, _, kh, kw], p, s) = (key.input, key.filter, key.padding, key.stride);
        [n, k, (h + 2 * p - kh) / s + 1, (w + 2 * p - kw) / s + 1]
    }

    fn make_plan<T: CudnnDataType>(cudnn: &Arc<Cudnn>, key: &Key) -> Result<Plan<T>> {
        let (p, s) = (key.padding as i32, key.stride as i32);
        let mut conv = cudnn
            .create_conv2d::<f32>([p, p], [s, s], [1, 1], sys::cudnnConvolutionMode_t::CUDNN_CROSS_CORRELATION)
            .map_err(cudnn_err("descriptor"))?;
        conv.set_math_type(sys::cudnnMathType_t::CUDNN_TENSOR_OP_MATH).map_err(cudnn_err("math type"))?;
        // Descriptors take N, C, H, W (K, C, R, S) in either format.
        let format = if key.channels_last {
            sys::cudnnTensorFormat_t::CUDNN_TENSOR_NHWC
        } else {
            sys::cudnnTensorFormat_t::CUDNN_TENSOR_NCHW
        };
        let x = cudnn.create_4d_tensor::<T>(format, i32s(key.input)).map_err(cudnn_err("input descriptor"))?;
        let w = cudnn.create_4d_filter::<T>(format, i32s(key.filter)).map_err(cudnn_err("filter descriptor"))?;
        let y = cudnn.create_4d_tensor::<T>(format, i32s(output_dims(key))).map_err(cudnn_err("output descriptor"))?;
        Ok(Plan { conv, x, w, y, workspaces: RefCell::new(HashMap::new()) })
    }

    fn run<T: CudnnDataType + CudaDType + DeviceRepr + WithDType>(
        plan: &Plan<T>,
        algo: Algo,
        dev: &candle_core::CudaDevice,
        (xs, xl): (&CudaStorage, &Layout),
        (ws, wl): (&CudaStorage, &Layout),
        out_len: usize,
    ) -> Result<CudaStorage> {
        let (Some((x0, x1)), Some((w0, w1))) = (xl.contiguous_offsets(), wl.contiguous_offsets()) else {
            candle_core::bail!("cuDNN convolution: input and filter must be contiguous");
        };
        let forward = ConvForward { conv: &plan.conv, x: &plan.x, w: &plan.w, y: &plan.y };
        let known = plan.workspaces.borrow().get(&algo).copied();
        let workspace_size = match known {
            Some(size) => size,
            None => {
                let size = forward.get_workspace_size(algo).map_err(cudnn_err("workspace size"))?;
                plan.workspaces.borrow_mut().insert(algo, size);
                size
            }
        };
        if workspace_size > MAX_WORKSPACE {
            candle_core::bail!("cuDNN convolution: {algo:?} needs {workspace_size} bytes of workspace");
        }
        let x = xs.as_cuda_slice::<T>()?.slice(x0..x1);
        let w = ws.as_cuda_slice::<T>()?.slice(w0..w1);
        // SAFETY: cuDNN writes every output element (beta = 0); the workspace is scratch.
        let mut y = unsafe { dev.alloc::<T>(out_len)? };
        let mut workspace = unsafe { dev.alloc::<u8>(workspace_size.max(1))? };
        // SAFETY: the slices match the descriptors' types and sizes (the plan's key).
        unsafe { forward.launch(algo, Some(&mut workspace), (T::one(), T::zero()), &x, &w, &mut y) }
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
            let key = &self.key;
            let (input, filter) = key.stored_dims();
            if xl.dims() != input || wl.dims() != filter || xs.dtype() != key.dtype {
                candle_core::bail!("cuDNN convolution: tensors do not match the plan");
            }
            let [_, c, h, w] = key.input;
            let [_, kc, kh, kw] = key.filter;
            if kc != c {
                candle_core::bail!("cuDNN convolution: input has {c} channels, the filter expects {kc}");
            }
            if h + 2 * key.padding < kh || w + 2 * key.padding < kw {
                candle_core::bail!("cuDNN convolution: input {h}x{w} is smaller than the {kh}x{kw} kernel");
            }
            let dev = xs.device().clone();
            let cached = CUDNN.with(|state| state.borrow().plans.get(key).cloned());
            let plan = match cached {
                Some(plan) => plan,
                None => {
                    let cudnn = handle(&dev)?;
                    let plan = Rc::new(match key.dtype {
                        DType::F16 => AnyPlan::F16(make_plan(&cudnn, key)?),
                        DType::BF16 => AnyPlan::BF16(make_plan(&cudnn, key)?),
                        other => candle_core::bail!("cuDNN convolution: f16 and bf16 only, got {other:?}"),
                    });
                    CUDNN.with(|state| state.borrow_mut().plans.insert(*key, plan.clone()));
                    plan
                }
            };
            let out = key.stored_output();
            let out_len = out.iter().product();
            let storage = match &*plan {
                AnyPlan::F16(plan) => run(plan, self.algo, &dev, (xs, xl), (ws, wl), out_len)?,
                AnyPlan::BF16(plan) => run(plan, self.algo, &dev, (xs, xl), (ws, wl), out_len)?,
            };
            Ok((storage, Shape::from(out.to_vec())))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::max_abs_diff;
    use candle_core::{DType, Device};
    use std::collections::HashMap;

    /// A convolution without bias is the convolution alone: residuals and per-sample biases
    /// still add, nothing else does.
    #[test]
    fn convolution_without_bias_adds_only_what_it_is_given() {
        let dev = Device::Cpu;
        let weight = Tensor::randn(0f32, 1.0, (4, 3, 3, 3), &dev).unwrap();
        let bias = Tensor::randn(0f32, 1.0, 4, &dev).unwrap();
        let tensors = HashMap::from([("weight".to_string(), weight.clone()), ("bias".to_string(), bias.clone())]);
        let vb = VarBuilder::from_tensors(tensors, DType::F32, &dev);
        let with_bias = Conv2d::new(vb.clone(), 3, 4, 3, 1, 2).unwrap();
        let without = Conv2d::without_bias(vb, 3, 4, 3, 1, 2).unwrap();
        assert!(without.bias().is_none() && with_bias.bias().is_some());
        let xs = Tensor::randn(0f32, 1.0, (2, 3, 9, 7), &dev).unwrap();
        let plain = xs.conv2d(&weight, 1, 2, 1, 1).unwrap();
        assert!(max_abs_diff(&without.forward(&xs).unwrap(), &plain) < 1e-6);
        let residual = Tensor::randn(0f32, 1.0, plain.dims(), &dev).unwrap();
        let got = without.forward_add(&xs, None, Some(&residual)).unwrap();
        assert!(max_abs_diff(&got, &(&plain + &residual).unwrap()) < 1e-6);
        let per_sample = Tensor::randn(0f32, 1.0, (2, 4), &dev).unwrap();
        let got = without.forward_add(&xs, Some(&per_sample), None).unwrap();
        let want = plain.broadcast_add(&per_sample.reshape((2, 4, 1, 1)).unwrap()).unwrap();
        assert!(max_abs_diff(&got, &want) < 1e-6);
        let biased = plain.broadcast_add(&bias.reshape((1, 4, 1, 1)).unwrap()).unwrap();
        assert!(max_abs_diff(&with_bias.forward(&xs).unwrap(), &biased) < 1e-6);
    }

    /// A filter stored channels-last convolves as before, from NCHW and from NHWC input.
    #[test]
    fn channels_last_filter_keeps_the_convolution() {
        let dev = Device::Cpu;
        let weight = Tensor::randn(0f32, 1.0, (4, 5, 3, 3), &dev).unwrap();
        let bias = Tensor::randn(0f32, 1.0, 4, &dev).unwrap();
        let tensors = HashMap::from([("weight".to_string(), weight.clone()), ("bias".to_string(), bias)]);
        let conv = Conv2d::same(VarBuilder::from_tensors(tensors, DType::F32, &dev), 5, 4, 3, 2).unwrap();
        let xs = Tensor::randn(0f32, 1.0, (2, 5, 7, 6), &dev).unwrap();
        let expected = conv.forward(&xs).unwrap();
        let err = conv.convolve_channels_last(&xs).unwrap_err().to_string();
        assert!(err.contains("not stored channels-last"), "{err}");
        let cl = conv.to_channels_last().unwrap();
        // Stored (out, kh, kw, in), both channel counts padded with zeros to 8.
        assert_eq!(cl.weight.dims(), &[8, 3, 3, 8]);
        assert_eq!(
            cl.weight.narrow(0, 4, 4).unwrap().abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap(),
            0.0
        );
        assert_eq!(cl.weight().unwrap().dims(), &[4, 5, 3, 3]);
        // The bias for the padded output's epilogue is made once, here: zeros past the 4 outputs.
        let padded_bias = cl.padded_bias.as_ref().expect("outputs padded from 4 to 8");
        assert_eq!(padded_bias.dims(), &[8]);
        assert_eq!(
            padded_bias.narrow(0, 4, 4).unwrap().abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap(),
            0.0
        );
        assert!(max_abs_diff(&padded_bias.narrow(0, 0, 4).unwrap(), cl.bias().unwrap()) == 0.0);
        let mut taken = cl.clone();
        assert!(taken.take_bias().is_some() && taken.padded_bias.is_none(), "taking the bias takes its padded copy");
        assert!(max_abs_diff(&cl.weight().unwrap(), &weight) == 0.0);
        assert!(max_abs_diff(&cl.forward(&xs).unwrap(), &expected) < 1e-6);
        let nhwc = cl.convolve_channels_last(&xs.permute((0, 2, 3, 1)).unwrap()).unwrap();
        let unbiased = cl.convolve(&xs).unwrap().permute((0, 2, 3, 1)).unwrap();
        assert_eq!(nhwc.dims(), &[2, 4, 3, 4]);
        assert!(max_abs_diff(&nhwc, &unbiased) < 1e-6);
        // With bias, residual and activation: the NCHW convolution's values, channels-last.
        let residual = Tensor::randn(0f32, 1.0, (2, 4, 3, 4), &dev).unwrap();
        let biased_nhwc = expected.permute((0, 2, 3, 1)).unwrap();
        let sum = (&biased_nhwc + &residual).unwrap();
        let got =
            cl.forward_channels_last(&xs.permute((0, 2, 3, 1)).unwrap(), Some(&residual), Epilogue::Relu).unwrap();
        assert!(max_abs_diff(&got, &sum.relu().unwrap()) < 1e-6);
        let got = cl.forward_channels_last(&xs.permute((0, 2, 3, 1)).unwrap(), None, Epilogue::Silu).unwrap();
        assert!(max_abs_diff(&got, &candle_nn::ops::silu(&biased_nhwc).unwrap()) < 1e-6);
    }
}
