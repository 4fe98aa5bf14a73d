//! Attention layers of the diffusers UNet: `Attention`, `BasicTransformerBlock`,
//! `Transformer2DModel`, and the self-attention hook that cross-frame attention plugs into.
//!
//! Weight names are diffusers' (`to_q`, `to_k`, `to_v`, `to_out.0`, `norm1..3`,
//! `ff.net.0.proj`, `ff.net.2`, `proj_in`, `proj_out`, `norm`, `transformer_blocks.N`).
//! Every attention layer knows its own diffusers module path (e.g.
//! `up_blocks.1.attentions.0.transformer_blocks.0.attn1`) so a hook can tell layers apart.

use candle_core::{Module, Result, Tensor};
use candle_nn::{LayerNorm, Linear, VarBuilder};

use crate::ops::{self, Conv2d, GroupNorm, fused};

/// Called at every self-attention (`attn1`) of the UNet.
///
/// This is the single point where cross-frame attention (or any other change to the keys and
/// values of self-attention) enters the model; the UNet itself knows nothing about frames.
pub trait SelfAttentionHook {
    /// `layer`: the diffusers module path, e.g. "up_blocks.1.attentions.0.transformer_blocks.0.attn1".
    /// `hidden`: the attention input (output of norm1), (batch, tokens, channels).
    /// `project`: projects hidden states with this layer's to_k/to_v.
    /// Return Some((keys, values)) (already projected, (batch, kv_tokens, channels)) to replace the
    /// layer's own keys/values; queries always stay the layer's own. None = plain attention.
    fn self_attention(
        &mut self,
        layer: &str,
        hidden: &Tensor,
        project: &dyn Fn(&Tensor) -> Result<(Tensor, Tensor)>,
    ) -> Result<Option<(Tensor, Tensor)>>;
}

/// Plain attention everywhere.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoHook;

impl SelfAttentionHook for NoHook {
    fn self_attention(
        &mut self,
        _layer: &str,
        _hidden: &Tensor,
        _project: &dyn Fn(&Tensor) -> Result<(Tensor, Tensor)>,
    ) -> Result<Option<(Tensor, Tensor)>> {
        Ok(None)
    }
}

/// Multi-head scaled dot-product attention with diffusers' `Attention` weights
/// (`to_q`, `to_k`, `to_v` without bias, `to_out.0` with bias).
#[derive(Debug, Clone)]
pub struct Attention {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    heads: usize,
    dim_head: usize,
    scale: f64,
    name: String,
    span: tracing::Span,
}

impl Attention {
    /// `vb` points at the module; `name` is its diffusers path (reported to hooks and in errors).
    /// `context_dim` is the key/value input width (`None` = self-attention, same as `query_dim`).
    pub fn new(
        vb: VarBuilder,
        query_dim: usize,
        context_dim: Option<usize>,
        heads: usize,
        dim_head: usize,
        name: String,
    ) -> Result<Self> {
        if heads == 0 || dim_head == 0 {
            candle_core::bail!(
                "{name}: attention needs at least one head of non-zero width (heads {heads}, head dim {dim_head})"
            );
        }
        let inner = heads * dim_head;
        let context_dim = context_dim.unwrap_or(query_dim);
        let to_q = candle_nn::linear_no_bias(query_dim, inner, vb.pp("to_q"))?;
        let to_k = candle_nn::linear_no_bias(context_dim, inner, vb.pp("to_k"))?;
        let to_v = candle_nn::linear_no_bias(context_dim, inner, vb.pp("to_v"))?;
        let to_out = candle_nn::linear(inner, query_dim, vb.pp("to_out").pp("0"))?;
        let span = tracing::trace_span!("attention", layer = name.as_str());
        Ok(Self { to_q, to_k, to_v, to_out, heads, dim_head, scale: (dim_head as f64).powf(-0.5), name, span })
    }

    /// The layer's diffusers module path.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Projects `context` (batch, tokens, context_dim) with this layer's `to_k` / `to_v`.
    pub fn project_kv(&self, context: &Tensor) -> Result<(Tensor, Tensor)> {
        Ok((self.to_k.forward(context)?, self.to_v.forward(context)?))
    }

    /// Plain attention: keys/values from `context`, or from `xs` when `context` is None; plus
    /// `residual` when given.
    pub fn forward(&self, xs: &Tensor, context: Option<&Tensor>, residual: Option<&Tensor>) -> Result<Tensor> {
        let _enter = self.span.enter();
        let (k, v) = self.project_kv(context.unwrap_or(xs))?;
        self.attend(xs, &k, &v, residual)
    }

    /// Self-attention with the hook asked for replacement keys/values; plus `residual`.
    pub fn forward_self(
        &self,
        xs: &Tensor,
        hook: &mut dyn SelfAttentionHook,
        residual: Option<&Tensor>,
    ) -> Result<Tensor> {
        let _enter = self.span.enter();
        let project = |h: &Tensor| self.project_kv(h);
        let (k, v) = match hook.self_attention(&self.name, xs, &project)? {
            Some(kv) => kv,
            None => self.project_kv(xs)?,
        };
        self.attend(xs, &k, &v, residual)
    }

    /// Queries from `xs`, the given projected keys/values; returns `to_out(attention)` (+
    /// `residual`).
    fn attend(&self, xs: &Tensor, k: &Tensor, v: &Tensor, residual: Option<&Tensor>) -> Result<Tensor> {
        let (b, _, _) = xs.dims3()?;
        let inner = self.heads * self.dim_head;
        let (kb, m, kc) = k.dims3()?;
        let (vb_, vm, vc) = v.dims3()?;
        if kb != b || vb_ != b || kc != inner || vc != inner || vm != m {
            candle_core::bail!(
                "{}: keys {:?} / values {:?} do not fit queries of batch {b} and width {inner}",
                self.name,
                k.dims(),
                v.dims()
            );
        }
        let q = self.to_q.forward(xs)?;
        let out = ops::attention(&q, k, v, self.heads, self.scale)?;
        fused::linear(&self.to_out, &out, residual)
    }
}

/// GEGLU feed-forward (`ff.net.0.proj`, `ff.net.2`), inner width 4x.
#[derive(Debug, Clone)]
struct FeedForward {
    proj: Linear,
    out: Linear,
}

impl FeedForward {
    fn new(vb: VarBuilder, dim: usize) -> Result<Self> {
        let inner = dim * 4;
        let proj = candle_nn::linear(dim, inner * 2, vb.pp("net").pp("0").pp("proj"))?;
        let out = candle_nn::linear(inner, dim, vb.pp("net").pp("2"))?;
        Ok(Self { proj, out })
    }
}

/// Most bytes of GEGLU projection output one feed-forward call holds on a GPU; larger inputs
/// run in token chunks. The projection is 8x the block's width (320 -> 2560 channels at
/// SD1.5's 64x64 level: 20 MiB per 512x512 row in f16), so a 16-row call (four live streams'
/// stream batches) would otherwise hold 320 MiB of it plus 160 MiB of the gate's output at
/// once, the largest transient of the whole step. Up to 6 rows at 512x512 run whole: smaller
/// GEMMs cost time (a 16-row step in 5 chunks of 64 MiB took 3% longer on an H200).
pub const FEED_FORWARD_CHUNK_BYTES: usize = 128 << 20;

impl FeedForward {
    /// `out(geglu(proj(xs))) + residual`, in chunks of tokens on a GPU when the projection's
    /// output would exceed [`FEED_FORWARD_CHUNK_BYTES`] (each token's result is the same).
    fn forward(&self, xs: &Tensor, residual: &Tensor) -> Result<Tensor> {
        self.forward_in_chunks(xs, residual, self.chunks(xs)?)
    }

    /// `forward` over about `chunks` equal runs of tokens (whole GEMM tiles each).
    fn forward_in_chunks(&self, xs: &Tensor, residual: &Tensor, chunks: usize) -> Result<Tensor> {
        if chunks <= 1 {
            return self.forward_all(xs, residual);
        }
        let dims = xs.dims().to_vec();
        let width = *dims.last().expect("feed-forward input has dims");
        let tokens = xs.elem_count() / width.max(1);
        let flat = xs.reshape((tokens, width))?;
        let flat_residual = residual.reshape((tokens, residual.elem_count() / tokens.max(1)))?;
        // Whole tiles of the projection's GEMM per chunk.
        let per_chunk = tokens.div_ceil(chunks).next_multiple_of(128);
        let mut outputs = Vec::with_capacity(chunks);
        let mut start = 0;
        while start < tokens {
            let len = per_chunk.min(tokens - start);
            outputs.push(self.forward_all(&flat.narrow(0, start, len)?, &flat_residual.narrow(0, start, len)?)?);
            start += len;
        }
        let mut out_dims = dims;
        *out_dims.last_mut().expect("feed-forward input has dims") = self.out.weight().dim(0)?;
        Tensor::cat(&outputs, 0)?.reshape(out_dims)
    }

    fn forward_all(&self, xs: &Tensor, residual: &Tensor) -> Result<Tensor> {
        fused::linear(&self.out, &fused::geglu(&self.proj, xs)?, Some(residual))
    }

    /// How many token chunks `xs` runs in (1: at once). Only on CUDA with the switch on
    /// (`SDCROSSFRAME_FF_CHUNK`), where the step's peak decides how many streams fit.
    fn chunks(&self, xs: &Tensor) -> Result<usize> {
        if !xs.device().is_cuda() || !ops::switches::switches().feed_forward_chunks {
            return Ok(1);
        }
        let width = xs.dim(candle_core::D::Minus1)?;
        let tokens = xs.elem_count() / width.max(1);
        let projected = tokens * self.proj.weight().dim(0)? * xs.dtype().size_in_bytes();
        Ok(projected.div_ceil(FEED_FORWARD_CHUNK_BYTES).clamp(1, tokens.max(1)))
    }
}

/// diffusers' `BasicTransformerBlock` with `norm_type = "layer_norm"`:
/// self-attention, cross-attention, GEGLU feed-forward, each pre-norm with a residual.
#[derive(Debug, Clone)]
pub struct BasicTransformerBlock {
    norm1: LayerNorm,
    attn1: Attention,
    norm2: LayerNorm,
    attn2: Attention,
    norm3: LayerNorm,
    ff: FeedForward,
    only_cross_attention: bool,
    span: tracing::Span,
}

impl BasicTransformerBlock {
    /// `path` is the block's diffusers module path (without trailing dot).
    pub fn new(
        vb: VarBuilder,
        dim: usize,
        heads: usize,
        dim_head: usize,
        cross_attention_dim: usize,
        only_cross_attention: bool,
        path: &str,
    ) -> Result<Self> {
        let ln = candle_nn::LayerNormConfig { eps: 1e-5, ..Default::default() };
        let norm1 = candle_nn::layer_norm(dim, ln, vb.pp("norm1"))?;
        let attn1_ctx = only_cross_attention.then_some(cross_attention_dim);
        let attn1 = Attention::new(vb.pp("attn1"), dim, attn1_ctx, heads, dim_head, format!("{path}.attn1"))?;
        let norm2 = candle_nn::layer_norm(dim, ln, vb.pp("norm2"))?;
        let attn2 =
            Attention::new(vb.pp("attn2"), dim, Some(cross_attention_dim), heads, dim_head, format!("{path}.attn2"))?;
        let norm3 = candle_nn::layer_norm(dim, ln, vb.pp("norm3"))?;
        let ff = FeedForward::new(vb.pp("ff"), dim)?;
        let span = tracing::trace_span!("transformer-block");
        Ok(Self { norm1, attn1, norm2, attn2, norm3, ff, only_cross_attention, span })
    }

    /// The self-attention layer (`attn1`).
    pub fn attn1(&self) -> &Attention {
        &self.attn1
    }

    pub fn forward(
        &self,
        xs: &Tensor,
        encoder_hidden_states: &Tensor,
        hook: &mut dyn SelfAttentionHook,
    ) -> Result<Tensor> {
        let _enter = self.span.enter();
        let h = fused::layer_norm(&self.norm1, xs)?;
        let xs = if self.only_cross_attention {
            // attn1 attends to the text here; it is not a self-attention, so no hook.
            self.attn1.forward(&h, Some(encoder_hidden_states), Some(xs))?
        } else {
            self.attn1.forward_self(&h, hook, Some(xs))?
        };
        let xs = self.attn2.forward(&fused::layer_norm(&self.norm2, &xs)?, Some(encoder_hidden_states), Some(&xs))?;
        self.ff.forward(&fused::layer_norm(&self.norm3, &xs)?, &xs)
    }
}

/// Settings of one `Transformer2DModel` (continuous input, layer-norm blocks).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Transformer2DConfig {
    pub num_attention_heads: usize,
    pub attention_head_dim: usize,
    pub in_channels: usize,
    pub num_layers: usize,
    pub cross_attention_dim: usize,
    pub norm_num_groups: usize,
    pub use_linear_projection: bool,
    pub only_cross_attention: bool,
}

#[derive(Debug, Clone)]
enum Projection {
    Conv(Conv2d),
    Linear(Linear),
}

/// diffusers' `Transformer2DModel` over a feature map:
/// GroupNorm (eps 1e-6) -> proj_in -> transformer blocks -> proj_out -> + input.
#[derive(Debug, Clone)]
pub struct Transformer2DModel {
    norm: GroupNorm,
    proj_in: Projection,
    transformer_blocks: Vec<BasicTransformerBlock>,
    proj_out: Projection,
    span: tracing::Span,
}

impl Transformer2DModel {
    /// `vb` points at the module; `path` is its diffusers path (e.g. `down_blocks.0.attentions.1`).
    pub fn new(vb: VarBuilder, config: &Transformer2DConfig, path: &str) -> Result<Self> {
        let c = config;
        let inner_dim = c.num_attention_heads * c.attention_head_dim;
        let norm = GroupNorm::new(vb.pp("norm"), c.norm_num_groups, c.in_channels, 1e-6)?;
        let (proj_in, proj_out) = if c.use_linear_projection {
            (
                Projection::Linear(candle_nn::linear(c.in_channels, inner_dim, vb.pp("proj_in"))?),
                Projection::Linear(candle_nn::linear(inner_dim, c.in_channels, vb.pp("proj_out"))?),
            )
        } else {
            (
                Projection::Conv(Conv2d::new(vb.pp("proj_in"), c.in_channels, inner_dim, 1, 0, 1)?),
                Projection::Conv(Conv2d::new(vb.pp("proj_out"), inner_dim, c.in_channels, 1, 0, 1)?),
            )
        };
        let vb_blocks = vb.pp("transformer_blocks");
        let transformer_blocks = (0..c.num_layers)
            .map(|i| {
                BasicTransformerBlock::new(
                    vb_blocks.pp(i.to_string()),
                    inner_dim,
                    c.num_attention_heads,
                    c.attention_head_dim,
                    c.cross_attention_dim,
                    c.only_cross_attention,
                    &format!("{path}.transformer_blocks.{i}"),
                )
            })
            .collect::<Result<Vec<_>>>()?;
        let span = tracing::trace_span!("transformer2d");
        Ok(Self { norm, proj_in, transformer_blocks, proj_out, span })
    }

    /// The transformer blocks, in forward order.
    pub fn blocks(&self) -> &[BasicTransformerBlock] {
        &self.transformer_blocks
    }

    pub fn forward(
        &self,
        xs: &Tensor,
        encoder_hidden_states: &Tensor,
        hook: &mut dyn SelfAttentionHook,
    ) -> Result<Tensor> {
        let _enter = self.span.enter();
        let (b, c, h, w) = xs.dims4()?;
        let residual = xs;
        let xs = self.norm.forward(xs)?;
        let mut tokens = match &self.proj_in {
            Projection::Conv(conv) => conv.forward_to_tokens(&xs)?,
            Projection::Linear(lin) => lin.forward(&xs.permute((0, 2, 3, 1))?.reshape((b, h * w, c))?)?,
        };
        for block in &self.transformer_blocks {
            tokens = block.forward(&tokens, encoder_hidden_states, hook)?;
        }
        match &self.proj_out {
            Projection::Conv(conv) => conv.forward_from_tokens(&tokens, (h, w), residual),
            Projection::Linear(lin) => {
                let t = lin.forward(&tokens)?;
                let c = t.dim(2)?;
                t.reshape((b, h, w, c))?.permute((0, 3, 1, 2))?.contiguous()? + residual
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    /// Chunks of tokens give each token what the whole input gives it, whatever the chunk
    /// boundaries (rows of the batch split across chunks, a short last chunk).
    #[test]
    fn feed_forward_in_chunks_matches_one_call() -> Result<()> {
        let device = Device::Cpu;
        let dim = 16;
        let varmap = candle_nn::VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &device);
        let ff = FeedForward::new(vb, dim)?;
        // VarMap initialises weights randomly; biases start at zero, so give them values.
        for (name, var) in varmap.data().lock().unwrap().iter() {
            if name.ends_with("bias") {
                var.set(&Tensor::randn(0f32, 1.0, var.shape(), &device)?)?;
            }
        }
        let xs = Tensor::randn(0f32, 1.0, (3, 300, dim), &device)?;
        let residual = Tensor::randn(0f32, 1.0, (3, 300, dim), &device)?;
        let whole = ff.forward_in_chunks(&xs, &residual, 1)?;
        assert_eq!(whole.dims(), &[3, 300, dim]);
        for chunks in [2, 3, 7, 900] {
            let chunked = ff.forward_in_chunks(&xs, &residual, chunks)?;
            assert_eq!(chunked.dims(), whole.dims(), "{chunks} chunks");
            let diff = (&chunked - &whole)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
            assert!(diff < 1e-5, "{chunks} chunks: max diff {diff}");
        }
        // Not the residual twice or a chunk dropped: the output changes with the residual.
        let other = ff.forward_in_chunks(&xs, &(&residual + 1.0)?, 3)?;
        let moved = (&other - &whole)?.mean_all()?.to_scalar::<f32>()?;
        assert!((moved - 1.0).abs() < 1e-4, "residual moved the output by {moved}");
        Ok(())
    }
}
