//! Fused epilogues on CUDA: bias adds (per channel, per sample and channel, per column), with an
//! optional residual, and GEGLU, each one pass over the activations (`kernels/elementwise.cu`).
//!
//! candle's broadcast add recomputes a strided index per element, so a convolution's bias add
//! can take longer than the convolution, and GEGLU's strided halves make its gelu and product
//! slow. Off CUDA every function here is candle's computation, op for op, so the CPU parity
//! tests keep their exact numbers. `SDCROSSFRAME_FUSED=off` keeps the candle ops on CUDA too
//! ([`super::switches`]).

use super::storage::{cpu_from_f32, cpu_to_f32};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, D, DType, Layout, Result, Shape, Tensor};
use candle_nn::{Linear, Module};

/// Whether `xs` goes through the fused kernels: a CUDA tensor of a float type, a build with the
/// kernels, not switched off (`SDCROSSFRAME_FUSED`).
pub fn applies(xs: &Tensor) -> bool {
    cfg!(sdcrossframe_elementwise_ptx)
        && xs.device().is_cuda()
        && matches!(xs.dtype(), DType::F32 | DType::F16 | DType::BF16)
        && super::switches::switches().fused_epilogues
}

/// `xs` (batch, channels, spatial...) plus `bias` over the channels, then plus `residual` (xs's
/// shape). `bias` is (channels) or, per sample, (batch, channels).
pub fn add_channel_bias(xs: &Tensor, bias: &Tensor, residual: Option<&Tensor>) -> Result<Tensor> {
    let dims = xs.dims();
    if dims.len() < 2 {
        candle_core::bail!("channel bias: expected (batch, channels, ...), got {dims:?}");
    }
    let (batch, channels) = (dims[0], dims[1]);
    let per_sample = match bias.dims() {
        [c] if *c == channels => false,
        [b, c] if *b == batch && *c == channels => true,
        other => candle_core::bail!(
            "channel bias: a bias of {other:?} does not fit {dims:?} (expected [{channels}] or [{batch}, {channels}])"
        ),
    };
    check_residual(xs, residual)?;
    if applies(xs) {
        let spatial = dims[2..].iter().product();
        let op = BiasAdd::rows(batch * channels, spatial, bias.elem_count());
        return op.run(xs, Some(bias), residual);
    }
    // candle: the bias broadcast over the trailing dims.
    let mut shape = vec![1; dims.len()];
    shape[1] = channels;
    if per_sample {
        shape[0] = batch;
    }
    let ys = xs.broadcast_add(&bias.reshape(shape)?)?;
    match residual {
        Some(r) => ys + r,
        None => Ok(ys),
    }
}

/// `(xs + bias) * scale` with `bias` (channels) over `xs` (batch, channels, spatial...): a
/// ControlNet's zero convolution and its conditioning scale, one pass on CUDA (off CUDA candle's
/// broadcast add, then its multiplication).
pub fn scale_channel_bias(xs: &Tensor, bias: &Tensor, scale: f64) -> Result<Tensor> {
    let dims = xs.dims();
    if dims.len() < 2 || bias.dims() != [dims[1]] {
        candle_core::bail!("scaled channel bias: a bias of {:?} does not fit {dims:?}", bias.dims());
    }
    if applies(xs) {
        let op =
            BiasAdd { scale: scale as f32, ..BiasAdd::rows(dims[0] * dims[1], dims[2..].iter().product(), dims[1]) };
        return op.run(xs, Some(bias), None);
    }
    let mut shape = vec![1; dims.len()];
    shape[1] = dims[1];
    xs.broadcast_add(&bias.reshape(shape)?)? * scale
}

/// `a + b` for tensors of one shape: on CUDA one vectorized pass (candle's add kernel moves one
/// value per thread).
pub fn add(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    check_residual(a, Some(b))?;
    if applies(a) && a.dtype() == b.dtype() {
        return BiasAdd::rows(1, a.elem_count(), 1).run(a, None, Some(b));
    }
    a + b
}

/// `a` (n, ca, h, w) and `b` (n, cb, h, w) side by side on the channel dim, `b_add` (b's shape)
/// added to `b` first: a UNet up block's input next to its skip connection plus the ControlNet's
/// residual. On CUDA one pass (no separate sum, and 16-byte copies instead of candle's one value
/// per thread); elsewhere candle's add and cat.
pub fn concat_channels(a: &Tensor, b: &Tensor, b_add: Option<&Tensor>) -> Result<Tensor> {
    let ((n, ca, h, w), (nb, cb, hb, wb)) = (a.dims4()?, b.dims4()?);
    if (n, h, w) != (nb, hb, wb) {
        candle_core::bail!("channel concat: {:?} and {:?} differ outside the channels", a.dims(), b.dims());
    }
    check_residual(b, b_add)?;
    let same_dtype = b.dtype() == a.dtype() && b_add.is_none_or(|r| r.dtype() == a.dtype());
    if applies(a) && same_dtype {
        let op = ChannelConcat { n, a_values: ca * h * w, b_values: cb * h * w };
        let (a, b, r) = (a.contiguous()?, b.contiguous()?, b_add.map(Tensor::contiguous).transpose()?);
        // The kernel's 16-byte loads need every input to start on a word (views may not).
        let vec = 16 / a.dtype().size_in_bytes();
        let starts_on_words = [Some(&a), Some(&b), r.as_ref()]
            .into_iter()
            .flatten()
            .all(|t| t.layout().start_offset().is_multiple_of(vec));
        if op.fits(a.dtype()) && starts_on_words {
            return match &r {
                Some(r) => a.apply_op3_no_bwd(&b, r, &op),
                None => a.apply_op2_no_bwd(&b, &op),
            };
        }
    }
    let b = match b_add {
        Some(r) => (b + r)?,
        None => b.clone(),
    };
    Tensor::cat(&[a, &b], 1)
}

/// An activation applied in a bias add's pass, after the residual.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Epilogue {
    None,
    Relu,
    Silu,
}

impl Epilogue {
    /// candle's op (off CUDA, and for the CPU reference of the kernels' geometry).
    pub fn apply(self, xs: &Tensor) -> Result<Tensor> {
        match self {
            Self::None => Ok(xs.clone()),
            Self::Relu => xs.relu(),
            Self::Silu => candle_nn::ops::silu(xs),
        }
    }

    fn apply_f32(self, y: f32) -> f32 {
        match self {
            Self::None => y,
            Self::Relu => y.max(0.0),
            Self::Silu => y / (1.0 + (-y).exp()),
        }
    }

    /// `act` of `kernels/elementwise.cu`'s bias adds.
    #[cfg_attr(not(sdcrossframe_elementwise_ptx), allow(dead_code))]
    fn kernel_code(self) -> i32 {
        match self {
            Self::None => 0,
            Self::Relu => 1,
            Self::Silu => 2,
        }
    }
}

/// `activation(xs + bias + residual)` with `xs` (..., features), `bias` (features) on the last dim
/// (or none) and `residual` of xs's shape: a channels-last convolution's epilogue, one pass on
/// CUDA (off CUDA candle's broadcast add, add and activation).
pub fn add_feature_bias_activate(
    xs: &Tensor,
    bias: Option<&Tensor>,
    residual: Option<&Tensor>,
    activation: Epilogue,
) -> Result<Tensor> {
    let features = xs.dim(D::Minus1)?;
    if let Some(b) = bias
        && b.dims() != [features]
    {
        candle_core::bail!("feature bias: a bias of {:?} does not fit {:?}", b.dims(), xs.dims());
    }
    check_residual(xs, residual)?;
    if applies(xs) {
        let op = BiasAdd {
            per_column: true,
            activation,
            ..BiasAdd::rows(xs.elem_count() / features.max(1), features, features)
        };
        return op.run(xs, bias, residual);
    }
    let ys = match bias {
        Some(b) => xs.broadcast_add(b)?,
        None => xs.clone(),
    };
    let ys = match residual {
        Some(r) => (ys + r)?,
        None => ys,
    };
    activation.apply(&ys)
}

/// `xs` (..., features) plus `bias` (features) on the last dim, then plus `residual`.
pub fn add_feature_bias(xs: &Tensor, bias: &Tensor, residual: Option<&Tensor>) -> Result<Tensor> {
    add_feature_bias_activate(xs, Some(bias), residual, Epilogue::None)
}

fn check_residual(xs: &Tensor, residual: Option<&Tensor>) -> Result<()> {
    match residual {
        Some(r) if r.dims() != xs.dims() => {
            candle_core::bail!("residual add: {:?} does not match the output {:?}", r.dims(), xs.dims())
        }
        _ => Ok(()),
    }
}

/// A linear layer, then `residual` added: candle-nn's `Linear` off CUDA (plus a separate add);
/// on CUDA the matmul, then bias and residual in one kernel.
pub fn linear(layer: &Linear, xs: &Tensor, residual: Option<&Tensor>) -> Result<Tensor> {
    if !applies(xs) {
        let ys = layer.forward(xs)?;
        return match residual {
            Some(r) => ys + r,
            None => Ok(ys),
        };
    }
    let ys = matmul_weight_t(xs, layer.weight())?;
    match (layer.bias(), residual) {
        (Some(bias), residual) => add_feature_bias(&ys, bias, residual),
        (None, Some(r)) => ys + r,
        (None, None) => Ok(ys),
    }
}

/// `xs @ weight^T`: the layer's matmul without its bias (candle-nn's, on a bias-free copy).
fn matmul_weight_t(xs: &Tensor, weight: &Tensor) -> Result<Tensor> {
    Linear::new(weight.clone(), None).forward(xs)
}

/// diffusers' GEGLU feed-forward input: `proj(xs)` split in halves `a`, `g` on the last dim,
/// `a * gelu_erf(g)`. On CUDA the bias and the whole gate are one kernel after the matmul.
pub fn geglu(proj: &Linear, xs: &Tensor) -> Result<Tensor> {
    if !applies(xs) {
        let h = proj.forward(xs)?;
        let chunks = h.chunk(2, D::Minus1)?;
        return &chunks[0] * chunks[1].gelu_erf()?;
    }
    let h = matmul_weight_t(xs, proj.weight())?;
    let width = h.dim(D::Minus1)?;
    if width % 2 != 0 {
        candle_core::bail!("GEGLU: the projection's width {width} is odd; it must split in two halves");
    }
    if let Some(b) = proj.bias()
        && b.dims() != [width]
    {
        candle_core::bail!("GEGLU: a bias of {:?} does not fit the projection's width {width}", b.dims());
    }
    let h = h.contiguous()?;
    let rows = h.elem_count() / width.max(1);
    let mut out_dims = h.dims().to_vec();
    *out_dims.last_mut().expect("matmul output has dims") = width / 2;
    let op = Geglu { rows, half: width / 2 };
    let out = match proj.bias() {
        Some(b) => h.apply_op2_no_bwd(&b.to_dtype(h.dtype())?, &op)?,
        None => h.apply_op1_no_bwd(&op)?,
    };
    out.reshape(out_dims)
}

/// candle-nn's `LayerNorm` (with bias) over the last dim. On CUDA in f16/bf16, for widths up to
/// 2048 that are multiples of 8, one warp per row reads the row once.
pub fn layer_norm(norm: &candle_nn::LayerNorm, xs: &Tensor) -> Result<Tensor> {
    let features = xs.dim(D::Minus1)?;
    let vec_width = 16 / xs.dtype().size_in_bytes();
    let fits = matches!(xs.dtype(), DType::F16 | DType::BF16)
        && features.is_multiple_of(vec_width)
        && features <= vec_width * 32 * LAYER_NORM_MAX_WORDS;
    let (Some(bias), true, true) = (norm.bias(), fits, applies(xs)) else {
        return norm.forward(xs);
    };
    let xs = xs.contiguous()?;
    let op = LayerNormRows { rows: xs.elem_count() / features.max(1), cols: features, eps: norm.eps() as f32 };
    let (gamma, beta) = (norm.weight().to_dtype(xs.dtype())?, bias.to_dtype(xs.dtype())?);
    xs.apply_op3_no_bwd(&gamma.contiguous()?, &beta.contiguous()?, &op)
}

/// 16-byte words per lane in the LayerNorm kernel (as `LN_MAX_WORDS` there).
const LAYER_NORM_MAX_WORDS: usize = 8;

/// LayerNorm's geometry: `rows` of `cols` values, normalised with `eps`.
#[derive(Debug, Clone, Copy)]
struct LayerNormRows {
    rows: usize,
    cols: usize,
    eps: f32,
}

impl candle_core::CustomOp3 for LayerNormRows {
    fn name(&self) -> &'static str {
        "layer-norm-rows"
    }

    /// The kernel's computation in f32 (tests of the op's geometry).
    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = cpu_to_f32(xs, xl, "LayerNorm", "input")?;
        let (g, b) = (cpu_to_f32(gs, gl, "LayerNorm", "weight")?, cpu_to_f32(bs, bl, "LayerNorm", "bias")?);
        if x.len() != self.rows * self.cols || g.len() != self.cols || b.len() != self.cols {
            candle_core::bail!("LayerNorm: sizes do not match {self:?}");
        }
        let mut out = Vec::with_capacity(x.len());
        for row in x.chunks(self.cols) {
            let mean = row.iter().sum::<f32>() / self.cols as f32;
            let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / self.cols as f32;
            let rstd = 1.0 / (var + self.eps).sqrt();
            out.extend(row.iter().zip(g.iter().zip(&b)).map(|(v, (g, b))| (v - mean) * rstd * g + b));
        }
        Ok((cpu_from_f32(out, xs.dtype(), "LayerNorm")?, xl.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        xs: &candle_core::CudaStorage,
        xl: &Layout,
        gs: &candle_core::CudaStorage,
        gl: &Layout,
        bs: &candle_core::CudaStorage,
        bl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        Ok((cuda::layer_norm(self, (xs, xl), (gs, gl), (bs, bl))?, xl.shape().clone()))
    }
}

/// The bias-add kernels' geometry: `rows` x `cols` contiguous values; the bias (if any) is
/// indexed by column, or by `row % groups`; `(x + bias) * scale + residual`.
#[derive(Debug, Clone, Copy)]
struct BiasAdd {
    per_column: bool,
    rows: usize,
    cols: usize,
    groups: usize,
    scale: f32,
    /// Whether the op's second input is a bias (else it is the residual: an op without bias).
    with_bias: bool,
    /// Applied last, after the residual.
    activation: Epilogue,
}

impl BiasAdd {
    /// A bias by `row % groups`, scale 1, no activation.
    fn rows(rows: usize, cols: usize, groups: usize) -> Self {
        Self { per_column: false, rows, cols, groups, scale: 1.0, with_bias: true, activation: Epilogue::None }
    }

    fn run(self, xs: &Tensor, bias: Option<&Tensor>, residual: Option<&Tensor>) -> Result<Tensor> {
        let xs = xs.contiguous()?;
        let same = |t: &Tensor| t.to_dtype(xs.dtype())?.contiguous();
        match (bias, residual) {
            (Some(b), Some(r)) => xs.apply_op3_no_bwd(&same(b)?, &same(r)?, &self),
            (Some(b), None) => xs.apply_op2_no_bwd(&same(b)?, &self),
            (None, Some(r)) => xs.apply_op2_no_bwd(&same(r)?, &Self { with_bias: false, ..self }),
            // Nothing to add, scale or activate: no pass at all (a bias-free convolution's
            // epilogue).
            (None, None) if self.scale == 1.0 && self.activation == Epilogue::None => Ok(xs),
            (None, None) => self.activation.apply(&xs.affine(f64::from(self.scale), 0.0)?),
        }
    }
}

/// The channel concat kernel's geometry: `n` samples of `a_values` then `b_values` values.
#[derive(Debug, Clone, Copy)]
struct ChannelConcat {
    n: usize,
    a_values: usize,
    b_values: usize,
}

impl ChannelConcat {
    /// Whether the kernel takes this geometry: whole 16-byte words per sample part, word and
    /// value indices in 32 bits.
    fn fits(&self, dtype: DType) -> bool {
        let vec = 16 / dtype.size_in_bytes();
        let values = self.n * (self.a_values + self.b_values);
        self.a_values.is_multiple_of(vec) && self.b_values.is_multiple_of(vec) && values < (1usize << 32) - vec
    }

    fn out_shape(&self, a: &Layout, b: &Layout) -> Shape {
        let mut dims = a.dims().to_vec();
        dims[1] += b.dims()[1];
        Shape::from(dims)
    }

    /// The kernel's copy on the CPU (tests of the op's geometry).
    fn cpu_reference(&self, a: CpuInput, b: CpuInput, b_add: Option<CpuInput>) -> Result<(CpuStorage, Shape)> {
        let to_f32 = |(s, l): CpuInput, what| cpu_to_f32(s, l, "channel concat", what);
        let (av, bv) = (to_f32(a, "first input")?, to_f32(b, "second input")?);
        let rv = b_add.map(|r| to_f32(r, "addend")).transpose()?;
        let mut out = Vec::with_capacity(av.len() + bv.len());
        for i in 0..self.n {
            out.extend_from_slice(&av[i * self.a_values..(i + 1) * self.a_values]);
            let range = i * self.b_values..(i + 1) * self.b_values;
            match &rv {
                Some(r) => out.extend(bv[range.clone()].iter().zip(&r[range]).map(|(x, y)| x + y)),
                None => out.extend_from_slice(&bv[range]),
            }
        }
        Ok((cpu_from_f32(out, a.0.dtype(), "channel concat")?, self.out_shape(a.1, b.1)))
    }
}

impl candle_core::CustomOp2 for ChannelConcat {
    fn name(&self) -> &'static str {
        "concat-channels"
    }

    fn cpu_fwd(&self, a: &CpuStorage, al: &Layout, b: &CpuStorage, bl: &Layout) -> Result<(CpuStorage, Shape)> {
        self.cpu_reference((a, al), (b, bl), None)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        a: &candle_core::CudaStorage,
        al: &Layout,
        b: &candle_core::CudaStorage,
        bl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        Ok((cuda::concat_channels(self, (a, al), (b, bl), None)?, self.out_shape(al, bl)))
    }
}

impl candle_core::CustomOp3 for ChannelConcat {
    fn name(&self) -> &'static str {
        "concat-channels-add"
    }

    fn cpu_fwd(
        &self,
        a: &CpuStorage,
        al: &Layout,
        b: &CpuStorage,
        bl: &Layout,
        r: &CpuStorage,
        rl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.cpu_reference((a, al), (b, bl), Some((r, rl)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        a: &candle_core::CudaStorage,
        al: &Layout,
        b: &candle_core::CudaStorage,
        bl: &Layout,
        r: &candle_core::CudaStorage,
        rl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        Ok((cuda::concat_channels(self, (a, al), (b, bl), Some((r, rl)))?, self.out_shape(al, bl)))
    }
}

/// GEGLU's geometry: `rows` of `2 * half` values in, `rows` of `half` out.
#[derive(Debug, Clone, Copy)]
struct Geglu {
    rows: usize,
    half: usize,
}

type CpuInput<'a> = (&'a CpuStorage, &'a Layout);

impl BiasAdd {
    /// The kernels' indexing in f32 on the CPU (tests of the op's geometry).
    fn cpu_reference(&self, x: CpuInput, bias: Option<CpuInput>, residual: Option<CpuInput>) -> Result<CpuStorage> {
        let to_f32 = |(s, l): CpuInput, what| cpu_to_f32(s, l, "bias add", what);
        let x_values = to_f32(x, "input")?;
        let b = bias.map(|b| to_f32(b, "bias")).transpose()?;
        let r = residual.map(|r| to_f32(r, "residual")).transpose()?;
        if x_values.len() != self.rows * self.cols || b.as_ref().is_some_and(|b| b.len() != self.groups) {
            candle_core::bail!("bias add: sizes do not match {self:?}");
        }
        let out = x_values
            .iter()
            .enumerate()
            .map(|(i, &v)| {
                let (row, col) = (i / self.cols, i % self.cols);
                let bias = match &b {
                    Some(b) if self.per_column => b[col],
                    Some(b) => b[row % self.groups],
                    None => 0.0,
                };
                self.activation.apply_f32((v + bias) * self.scale + r.as_ref().map_or(0.0, |r| r[i]))
            })
            .collect();
        cpu_from_f32(out, x.0.dtype(), "bias add")
    }
}

impl candle_core::CustomOp2 for BiasAdd {
    fn name(&self) -> &'static str {
        "bias-add"
    }

    /// The second input is the bias, or the residual of an op without bias (`with_bias`).
    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout, bs: &CpuStorage, bl: &Layout) -> Result<(CpuStorage, Shape)> {
        let (bias, residual) = if self.with_bias { (Some((bs, bl)), None) } else { (None, Some((bs, bl))) };
        Ok((self.cpu_reference((xs, xl), bias, residual)?, xl.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        xs: &candle_core::CudaStorage,
        xl: &Layout,
        bs: &candle_core::CudaStorage,
        bl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (bias, residual) = if self.with_bias { (Some((bs, bl)), None) } else { (None, Some((bs, bl))) };
        Ok((cuda::bias_add(self, (xs, xl), bias, residual)?, xl.shape().clone()))
    }
}

impl candle_core::CustomOp3 for BiasAdd {
    fn name(&self) -> &'static str {
        "bias-add-residual"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
        rs: &CpuStorage,
        rl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        Ok((self.cpu_reference((xs, xl), Some((bs, bl)), Some((rs, rl)))?, xl.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        xs: &candle_core::CudaStorage,
        xl: &Layout,
        bs: &candle_core::CudaStorage,
        bl: &Layout,
        rs: &candle_core::CudaStorage,
        rl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        Ok((cuda::bias_add(self, (xs, xl), Some((bs, bl)), Some((rs, rl)))?, xl.shape().clone()))
    }
}

impl Geglu {
    fn out_shape(&self) -> Shape {
        Shape::from((self.rows, self.half))
    }

    /// The kernel's computation in f32 on the CPU (tests of the op's geometry).
    fn cpu_reference(&self, h: CpuInput, bias: Option<CpuInput>) -> Result<(CpuStorage, Shape)> {
        let hv = cpu_to_f32(h.0, h.1, "GEGLU", "input")?;
        let b = bias.map(|(s, l)| cpu_to_f32(s, l, "GEGLU", "bias")).transpose()?;
        let f = self.half;
        let erf_gelu =
            |x: f32| 0.5 * x * (1.0 + candle_core::cpu::erf::erf_f64(f64::from(x) / std::f64::consts::SQRT_2) as f32);
        let mut out = Vec::with_capacity(self.rows * f);
        for row in hv.chunks(2 * f) {
            for j in 0..f {
                let (bias_a, bias_g) = b.as_ref().map_or((0.0, 0.0), |b| (b[j], b[f + j]));
                out.push((row[j] + bias_a) * erf_gelu(row[f + j] + bias_g));
            }
        }
        Ok((cpu_from_f32(out, h.0.dtype(), "GEGLU")?, self.out_shape()))
    }
}

impl candle_core::CustomOp1 for Geglu {
    fn name(&self) -> &'static str {
        "geglu"
    }

    fn cpu_fwd(&self, hs: &CpuStorage, hl: &Layout) -> Result<(CpuStorage, Shape)> {
        self.cpu_reference((hs, hl), None)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, hs: &candle_core::CudaStorage, hl: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        Ok((cuda::geglu(self, (hs, hl), None)?, self.out_shape()))
    }
}

impl candle_core::CustomOp2 for Geglu {
    fn name(&self) -> &'static str {
        "geglu-bias"
    }

    fn cpu_fwd(&self, hs: &CpuStorage, hl: &Layout, bs: &CpuStorage, bl: &Layout) -> Result<(CpuStorage, Shape)> {
        self.cpu_reference((hs, hl), Some((bs, bl)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        hs: &candle_core::CudaStorage,
        hl: &Layout,
        bs: &candle_core::CudaStorage,
        bl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        Ok((cuda::geglu(self, (hs, hl), Some((bs, bl)))?, self.out_shape()))
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use super::{BiasAdd, ChannelConcat, Geglu, LayerNormRows};
    use candle_core::backend::BackendStorage;
    use candle_core::{CudaStorage, DType, Layout, Result};

    type Input<'a> = (&'a CudaStorage, &'a Layout);

    pub(super) fn concat_channels(op: &ChannelConcat, a: Input, b: Input, b_add: Option<Input>) -> Result<CudaStorage> {
        #[cfg(not(sdcrossframe_elementwise_ptx))]
        {
            let _ = (op, a, b, b_add);
            candle_core::bail!("fused channel concat: this build has no CUDA kernel for it")
        }
        #[cfg(sdcrossframe_elementwise_ptx)]
        match a.0.dtype() {
            DType::F32 => kernels::concat_channels::<f32>(op, a, b, b_add, "f32"),
            DType::F16 => kernels::concat_channels::<half::f16>(op, a, b, b_add, "f16"),
            DType::BF16 => kernels::concat_channels::<half::bf16>(op, a, b, b_add, "bf16"),
            other => candle_core::bail!("fused channel concat supports f32, f16 and bf16; got {other:?}"),
        }
    }

    pub(super) fn bias_add(
        op: &BiasAdd,
        x: Input,
        bias: Option<Input>,
        residual: Option<Input>,
    ) -> Result<CudaStorage> {
        #[cfg(not(sdcrossframe_elementwise_ptx))]
        {
            let _ = (op, x, bias, residual);
            candle_core::bail!("fused bias add: this build has no CUDA kernel for it")
        }
        #[cfg(sdcrossframe_elementwise_ptx)]
        match x.0.dtype() {
            DType::F32 => kernels::bias_add::<f32>(op, x, bias, residual, "f32"),
            DType::F16 => kernels::bias_add::<half::f16>(op, x, bias, residual, "f16"),
            DType::BF16 => kernels::bias_add::<half::bf16>(op, x, bias, residual, "bf16"),
            other => candle_core::bail!("fused bias add supports f32, f16 and bf16; got {other:?}"),
        }
    }

    pub(super) fn layer_norm(op: &LayerNormRows, x: Input, gamma: Input, beta: Input) -> Result<CudaStorage> {
        #[cfg(not(sdcrossframe_elementwise_ptx))]
        {
            let _ = (op, x, gamma, beta);
            candle_core::bail!("fused LayerNorm: this build has no CUDA kernel for it")
        }
        #[cfg(sdcrossframe_elementwise_ptx)]
        match x.0.dtype() {
            DType::F16 => kernels::layer_norm::<half::f16>(op, x, gamma, beta, "f16"),
            DType::BF16 => kernels::layer_norm::<half::bf16>(op, x, gamma, beta, "bf16"),
            other => candle_core::bail!("fused LayerNorm supports f16 and bf16; got {other:?}"),
        }
    }

    pub(super) fn geglu(op: &Geglu, h: Input, bias: Option<Input>) -> Result<CudaStorage> {
        #[cfg(not(sdcrossframe_elementwise_ptx))]
        {
            let _ = (op, h, bias);
            candle_core::bail!("fused GEGLU: this build has no CUDA kernel for it")
        }
        #[cfg(sdcrossframe_elementwise_ptx)]
        match h.0.dtype() {
            DType::F32 => kernels::geglu::<f32>(op, h, bias, "f32"),
            DType::F16 => kernels::geglu::<half::f16>(op, h, bias, "f16"),
            DType::BF16 => kernels::geglu::<half::bf16>(op, h, bias, "bf16"),
            other => candle_core::bail!("fused GEGLU supports f32, f16 and bf16; got {other:?}"),
        }
    }

    #[cfg(sdcrossframe_elementwise_ptx)]
    mod kernels {
        use super::super::{BiasAdd, ChannelConcat, Geglu, LayerNormRows};
        use super::Input;
        use crate::ops::storage::cuda_view;
        use candle_core::backend::BackendStorage;
        use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};
        use candle_core::cuda_backend::{CudaDType, WrapErr};
        use candle_core::{CudaStorage, Layout, Result};

        const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/elementwise.ptx"));
        const MODULE: &str = "sdcrossframe_elementwise";
        /// As in the kernel.
        const THREADS: usize = 256;

        /// Most blocks of a flat (vector) launch; its threads loop over the rest.
        const MAX_FLAT_BLOCKS: usize = 8192;

        /// The launch of `rows` x `cols` outputs: flat over 16-byte words with `vec` (short rows,
        /// such as a linear layer's 320 features, would leave most of a row's block idle), else a
        /// block row per matrix row.
        fn config(rows: usize, cols: usize, vec_width: usize, vec: bool) -> LaunchConfig {
            let grid_dim = if vec {
                ((rows * cols / vec_width).div_ceil(THREADS).clamp(1, MAX_FLAT_BLOCKS) as u32, 1, 1)
            } else {
                (cols.div_ceil(THREADS * vec_width).max(1) as u32, rows.clamp(1, 65_535) as u32, 1)
            };
            LaunchConfig { grid_dim, block_dim: (THREADS as u32, 1, 1), shared_mem_bytes: 0 }
        }

        /// Whether `rows` x `cols` outputs can take the vector path: whole words per row, word
        /// indices in 31 bits (the kernels index words with 32-bit arithmetic).
        fn vector_geometry(rows: usize, cols: usize, vec_width: usize) -> bool {
            cols.is_multiple_of(vec_width) && rows * cols / vec_width < (1 << 31)
        }

        /// Whether every input starts on a 16-byte boundary (the kernels' vector loads): CUDA
        /// allocations are 256-byte aligned, so the layouts' offsets decide.
        fn aligned(layouts: &[&Layout], vec_width: usize) -> bool {
            layouts.iter().all(|l| l.start_offset().is_multiple_of(vec_width))
        }

        pub(super) fn bias_add<T: CudaDType + DeviceRepr>(
            op: &BiasAdd,
            (xs, xl): Input,
            bias: Option<Input>,
            residual: Option<Input>,
            type_name: &str,
        ) -> Result<CudaStorage> {
            let n = op.rows * op.cols;
            let x = cuda_view::<T>(xs, xl, "fused bias add", "input")?;
            let b = bias.map(|(bs, bl)| cuda_view::<T>(bs, bl, "fused bias add", "bias")).transpose()?;
            let r = residual.map(|(rs, rl)| cuda_view::<T>(rs, rl, "fused bias add", "residual")).transpose()?;
            if x.len() != n
                || b.as_ref().is_some_and(|b| b.len() != op.groups)
                || r.as_ref().is_some_and(|r| r.len() != n)
            {
                candle_core::bail!("fused bias add: sizes do not match {op:?}");
            }
            let dev = xs.device();
            let vec_width = 16 / std::mem::size_of::<T>();
            let mut layouts = vec![xl];
            layouts.extend(bias.map(|(_, bl)| bl));
            layouts.extend(residual.map(|(_, rl)| rl));
            let vec = vector_geometry(op.rows, op.cols, vec_width)
                && (!op.per_column || op.groups.is_multiple_of(vec_width))
                && aligned(&layouts, vec_width);
            let name = if op.per_column { "bias_add_cols" } else { "bias_add_rows" };
            let func = dev.get_or_load_custom_func(&format!("{name}_{type_name}"), MODULE, PTX)?;
            // SAFETY: the kernel writes every one of the n outputs.
            let out = unsafe { dev.alloc::<T>(n)? };
            let (rows, cols, groups, vec) = (op.rows as i64, op.cols as i64, op.groups as i64, vec as i32);
            let null = 0u64;
            let mut builder = func.builder();
            builder.arg(&x);
            match &b {
                Some(b) => builder.arg(b),
                None => builder.arg(&null),
            };
            match &r {
                Some(r) => builder.arg(r),
                None => builder.arg(&null),
            };
            let act = op.activation.kernel_code();
            builder.arg(&out).arg(&rows).arg(&cols).arg(&groups).arg(&op.scale).arg(&vec).arg(&act);
            // SAFETY: argument types and order match bias_add_*; sizes checked above.
            unsafe { builder.launch(config(op.rows, op.cols, vec_width, vec != 0)) }.w()?;
            Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
        }

        pub(super) fn concat_channels<T: CudaDType + DeviceRepr>(
            op: &ChannelConcat,
            (a_s, al): Input,
            (b_s, bl): Input,
            b_add: Option<Input>,
            type_name: &str,
        ) -> Result<CudaStorage> {
            let a = cuda_view::<T>(a_s, al, "fused channel concat", "first input")?;
            let b = cuda_view::<T>(b_s, bl, "fused channel concat", "second input")?;
            let r = b_add.map(|(rs, rl)| cuda_view::<T>(rs, rl, "fused channel concat", "addend")).transpose()?;
            let (a_len, b_len) = (op.n * op.a_values, op.n * op.b_values);
            if a.len() != a_len || b.len() != b_len || r.as_ref().is_some_and(|r| r.len() != b_len) {
                candle_core::bail!("fused channel concat: sizes do not match {op:?}");
            }
            let vec_width = 16 / std::mem::size_of::<T>();
            let mut layouts = vec![al, bl];
            layouts.extend(b_add.map(|(_, rl)| rl));
            if !aligned(&layouts, vec_width) {
                candle_core::bail!("fused channel concat: inputs must start 16-byte aligned");
            }
            let dev = a_s.device();
            let func = dev.get_or_load_custom_func(&format!("concat_channels_{type_name}"), MODULE, PTX)?;
            // SAFETY: the kernel writes every output value (the two parts of every sample).
            let out = unsafe { dev.alloc::<T>(a_len + b_len)? };
            let (n, a_values, b_values) = (op.n as i64, op.a_values as i64, op.b_values as i64);
            let null = 0u64;
            let mut builder = func.builder();
            builder.arg(&a).arg(&b);
            match &r {
                Some(r) => builder.arg(r),
                None => builder.arg(&null),
            };
            builder.arg(&out).arg(&n).arg(&a_values).arg(&b_values);
            // SAFETY: argument types and order match concat_channels_*; sizes checked above.
            unsafe { builder.launch(config(1, a_len + b_len, vec_width, true)) }.w()?;
            Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
        }

        pub(super) fn layer_norm<T: CudaDType + DeviceRepr>(
            op: &LayerNormRows,
            (xs, xl): Input,
            (gs, gl): Input,
            (bs, bl): Input,
            type_name: &str,
        ) -> Result<CudaStorage> {
            let x = cuda_view::<T>(xs, xl, "fused LayerNorm", "input")?;
            let g = cuda_view::<T>(gs, gl, "fused LayerNorm", "weight")?;
            let b = cuda_view::<T>(bs, bl, "fused LayerNorm", "bias")?;
            let vec_width = 16 / std::mem::size_of::<T>();
            if x.len() != op.rows * op.cols || g.len() != op.cols || b.len() != op.cols {
                candle_core::bail!("fused LayerNorm: sizes do not match {op:?}");
            }
            if !aligned(&[xl, gl, bl], vec_width) || op.cols > i32::MAX as usize {
                candle_core::bail!("fused LayerNorm: inputs must start 16-byte aligned");
            }
            let dev = xs.device();
            let func = dev.get_or_load_custom_func(&format!("layer_norm_{type_name}"), MODULE, PTX)?;
            // SAFETY: the kernel writes every value of every row.
            let out = unsafe { dev.alloc::<T>(op.rows * op.cols)? };
            let rows_per_block = THREADS / 32;
            let cfg = LaunchConfig {
                grid_dim: (op.rows.div_ceil(rows_per_block).clamp(1, 65_535) as u32, 1, 1),
                block_dim: (THREADS as u32, 1, 1),
                shared_mem_bytes: 0,
            };
            let (rows, cols) = (op.rows as i64, op.cols as i32);
            let mut builder = func.builder();
            builder.arg(&x).arg(&g).arg(&b).arg(&out).arg(&rows).arg(&cols).arg(&op.eps);
            // SAFETY: argument types and order match layer_norm_*; sizes checked above.
            unsafe { builder.launch(cfg) }.w()?;
            Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
        }

        pub(super) fn geglu<T: CudaDType + DeviceRepr>(
            op: &Geglu,
            (hs, hl): Input,
            bias: Option<Input>,
            type_name: &str,
        ) -> Result<CudaStorage> {
            let h = cuda_view::<T>(hs, hl, "fused GEGLU", "input")?;
            let b = bias.map(|(bs, bl)| cuda_view::<T>(bs, bl, "fused GEGLU", "bias")).transpose()?;
            if h.len() != op.rows * op.half * 2 || b.as_ref().is_some_and(|b| b.len() != op.half * 2) {
                candle_core::bail!("fused GEGLU: sizes do not match {op:?}");
            }
            let dev = hs.device();
            let vec_width = 16 / std::mem::size_of::<T>();
            let mut layouts = vec![hl];
            layouts.extend(bias.map(|(_, bl)| bl));
            let vec = vector_geometry(op.rows, op.half, vec_width) && aligned(&layouts, vec_width);
            let func = dev.get_or_load_custom_func(&format!("geglu_{type_name}"), MODULE, PTX)?;
            // SAFETY: the kernel writes every one of the rows x half outputs.
            let out = unsafe { dev.alloc::<T>(op.rows * op.half)? };
            let (rows, half, vec) = (op.rows as i64, op.half as i64, vec as i32);
            let null = 0u64;
            let mut builder = func.builder();
            builder.arg(&h);
            match &b {
                Some(b) => builder.arg(b),
                None => builder.arg(&null),
            };
            builder.arg(&out).arg(&rows).arg(&half).arg(&vec);
            // SAFETY: argument types and order match geglu_*; sizes checked above.
            unsafe { builder.launch(config(op.rows, op.half, vec_width, vec != 0)) }.w()?;
            Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::max_abs_diff;
    use candle_core::Device;

    fn randn(shape: &[usize]) -> Tensor {
        Tensor::randn(0f32, 1.0, shape, &Device::Cpu).unwrap()
    }

    /// The ops' geometry (what the CUDA kernels index) against candle's broadcasting.
    #[test]
    fn bias_add_geometry_matches_candle_broadcasting() {
        let x = randn(&[2, 6, 3, 5]);
        let residual = randn(&[2, 6, 3, 5]);
        let channel = randn(&[6]);
        let per_sample = randn(&[2, 6]);
        let rows = BiasAdd::rows(12, 15, 6);
        let expected = (x.broadcast_add(&channel.reshape((1, 6, 1, 1)).unwrap()).unwrap() + &residual).unwrap();
        let got = rows.run(&x, Some(&channel), Some(&residual)).unwrap();
        assert!(max_abs_diff(&got, &expected) < 1e-6);
        let per_sample_op = BiasAdd { groups: 12, ..rows };
        let expected = x.broadcast_add(&per_sample.reshape((2, 6, 1, 1)).unwrap()).unwrap();
        assert!(max_abs_diff(&per_sample_op.run(&x, Some(&per_sample), None).unwrap(), &expected) < 1e-6);
        let tokens = randn(&[2, 7, 6]);
        let cols = BiasAdd { per_column: true, ..BiasAdd::rows(14, 6, 6) };
        let expected = tokens.broadcast_add(&channel).unwrap();
        assert!(max_abs_diff(&cols.run(&tokens, Some(&channel), None).unwrap(), &expected) < 1e-6);
        // f16 in, f16 out.
        let half = cols.run(&tokens.to_dtype(DType::F16).unwrap(), Some(&channel), None).unwrap();
        assert_eq!(half.dtype(), DType::F16);
        assert!(max_abs_diff(&half, &expected) < 1e-2);
        // Scaled, and without a bias (the residual alone).
        let scaled = BiasAdd { scale: 0.7, ..rows };
        let expected = (x.broadcast_add(&channel.reshape((1, 6, 1, 1)).unwrap()).unwrap() * 0.7).unwrap();
        assert!(max_abs_diff(&scaled.run(&x, Some(&channel), None).unwrap(), &expected) < 1e-6);
        let expected = (&x + &residual).unwrap();
        assert!(max_abs_diff(&rows.run(&x, None, Some(&residual)).unwrap(), &expected) < 1e-6);
        // Activations after the residual (a channels-last convolution's epilogue): the op's
        // geometry, and the public function off CUDA, against candle's ops.
        let nhwc = randn(&[2, 3, 5, 6]);
        let skip = randn(&[2, 3, 5, 6]);
        let sum = (nhwc.broadcast_add(&channel).unwrap() + &skip).unwrap();
        for (activation, expected) in [
            (Epilogue::Relu, sum.relu().unwrap()),
            (Epilogue::Silu, candle_nn::ops::silu(&sum).unwrap()),
            (Epilogue::None, sum.clone()),
        ] {
            let op = BiasAdd { activation, per_column: true, ..BiasAdd::rows(30, 6, 6) };
            let got = op.run(&nhwc, Some(&channel), Some(&skip)).unwrap();
            assert!(max_abs_diff(&got, &expected) < 1e-6, "{activation:?}");
            let public = add_feature_bias_activate(&nhwc, Some(&channel), Some(&skip), activation).unwrap();
            assert!(max_abs_diff(&public, &expected) < 1e-6, "{activation:?}");
        }
        assert!(sum.relu().unwrap().min_all().unwrap().to_scalar::<f32>().unwrap() == 0.0, "the ReLU case must clip");
        assert!(max_abs_diff(&rows.run(&x, None, None).unwrap(), &x) == 0.0, "nothing to add: x itself");
        let relu_only = BiasAdd { activation: Epilogue::Relu, ..rows }.run(&x, None, None).unwrap();
        assert!(max_abs_diff(&relu_only, &x.relu().unwrap()) < 1e-6);
        let err = add_feature_bias_activate(&nhwc, Some(&randn(&[5])), None, Epilogue::Relu).unwrap_err().to_string();
        assert!(err.contains("does not fit"), "{err}");
    }

    /// The concat op's geometry against candle's add and cat.
    #[test]
    fn channel_concat_geometry_matches_candle_cat() {
        let (a, b, r) = (randn(&[2, 3, 4, 2]), randn(&[2, 5, 4, 2]), randn(&[2, 5, 4, 2]));
        let op = ChannelConcat { n: 2, a_values: 24, b_values: 40 };
        let expected = Tensor::cat(&[&a, &(&b + &r).unwrap()], 1).unwrap();
        let got = a.apply_op3_no_bwd(&b, &r, &op).unwrap();
        assert_eq!(got.dims(), [2, 8, 4, 2]);
        assert!(max_abs_diff(&got, &expected) < 1e-6);
        let got = a.apply_op2_no_bwd(&b, &op).unwrap();
        assert!(max_abs_diff(&got, &Tensor::cat(&[&a, &b], 1).unwrap()) < 1e-6);
        // The public function off CUDA: the same values, and a mismatch named.
        assert!(max_abs_diff(&concat_channels(&a, &b, Some(&r)).unwrap(), &expected) < 1e-6);
        let err = concat_channels(&a, &randn(&[2, 5, 3, 2]), None).unwrap_err().to_string();
        assert!(err.contains("differ outside the channels"), "{err}");
    }

    #[test]
    fn geglu_geometry_matches_chunked_gelu() {
        let h = randn(&[2, 5, 16]);
        let bias = randn(&[16]);
        let with_bias = h.broadcast_add(&bias).unwrap();
        let chunks = with_bias.chunk(2, D::Minus1).unwrap();
        let expected = (&chunks[0] * chunks[1].gelu_erf().unwrap()).unwrap();
        let op = Geglu { rows: 10, half: 8 };
        let got = h.apply_op2_no_bwd(&bias, &op).unwrap().reshape((2, 5, 8)).unwrap();
        assert!(max_abs_diff(&got, &expected) < 1e-5, "{}", max_abs_diff(&got, &expected));
        let chunks = h.chunk(2, D::Minus1).unwrap();
        let expected = (&chunks[0] * chunks[1].gelu_erf().unwrap()).unwrap();
        let got = h.apply_op1_no_bwd(&op).unwrap().reshape((2, 5, 8)).unwrap();
        assert!(max_abs_diff(&got, &expected) < 1e-5);
    }

    #[test]
    fn layer_norm_geometry_matches_candle_nn() {
        let x = ((randn(&[2, 5, 16]) * 3.0).unwrap() + 1.5).unwrap();
        let (weight, bias) = (randn(&[16]), randn(&[16]));
        let norm = candle_nn::LayerNorm::new(weight.clone(), bias.clone(), 1e-5);
        let expected = norm.forward(&x).unwrap();
        let op = LayerNormRows { rows: 10, cols: 16, eps: 1e-5 };
        let got = x.apply_op3_no_bwd(&weight, &bias, &op).unwrap();
        assert!(max_abs_diff(&got, &expected) < 1e-5, "{}", max_abs_diff(&got, &expected));
    }

    #[test]
    fn misfit_biases_and_residuals_are_errors() {
        let x = randn(&[2, 6, 3, 5]);
        let err = add_channel_bias(&x, &randn(&[5]), None).unwrap_err().to_string();
        assert!(err.contains("does not fit") && err.contains("[2, 6]"), "{err}");
        let err = add_channel_bias(&x, &randn(&[6]), Some(&randn(&[2, 6, 3, 4]))).unwrap_err().to_string();
        assert!(err.contains("residual add") && err.contains("[2, 6, 3, 4]"), "{err}");
        let err = add_feature_bias(&x, &randn(&[6]), None).unwrap_err().to_string();
        assert!(err.contains("feature bias") && err.contains("[6]"), "{err}");
    }
}
