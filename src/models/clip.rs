//! The CLIP text encoder (transformers' `CLIPTextModel`), configured from
//! `text_encoder/config.json`; returns `last_hidden_state` as diffusers uses it.
//! (candle-transformers' CLIP keeps its config private, so sizes could not come from the file.)

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::{Embedding, LayerNorm, Linear, VarBuilder};
use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
pub struct ClipTextConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub max_position_embeddings: usize,
    #[serde(default = "quick_gelu")]
    pub hidden_act: String,
    #[serde(default = "layer_norm_eps")]
    pub layer_norm_eps: f64,
}

fn quick_gelu() -> String {
    "quick_gelu".into()
}
fn layer_norm_eps() -> f64 {
    1e-5
}

#[derive(Debug, Clone, Copy)]
enum Activation {
    QuickGelu,
    Gelu,
}

impl Activation {
    fn apply(self, xs: &Tensor) -> Result<Tensor> {
        match self {
            Self::QuickGelu => xs * candle_nn::ops::sigmoid(&(xs * 1.702)?)?,
            // transformers' "gelu" is the exact erf form.
            Self::Gelu => xs.gelu_erf(),
        }
    }
}

struct SelfAttention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    heads: usize,
    head_dim: usize,
}

impl SelfAttention {
    fn new(vb: VarBuilder, config: &ClipTextConfig) -> Result<Self> {
        let h = config.hidden_size;
        if !h.is_multiple_of(config.num_attention_heads) {
            candle_core::bail!("text encoder config: hidden_size {h} is not a multiple of num_attention_heads");
        }
        Ok(Self {
            q_proj: candle_nn::linear(h, h, vb.pp("q_proj"))?,
            k_proj: candle_nn::linear(h, h, vb.pp("k_proj"))?,
            v_proj: candle_nn::linear(h, h, vb.pp("v_proj"))?,
            out_proj: candle_nn::linear(h, h, vb.pp("out_proj"))?,
            heads: config.num_attention_heads,
            head_dim: h / config.num_attention_heads,
        })
    }

    fn forward(&self, xs: &Tensor, causal_mask: &Tensor) -> Result<Tensor> {
        let (batch, tokens, channels) = xs.dims3()?;
        let split = |t: Tensor| -> Result<Tensor> {
            t.reshape((batch, tokens, self.heads, self.head_dim))?.transpose(1, 2)?.contiguous()
        };
        let q = split((self.q_proj.forward(xs)? * (self.head_dim as f64).powf(-0.5))?)?;
        let k = split(self.k_proj.forward(xs)?)?;
        let v = split(self.v_proj.forward(xs)?)?;
        let dtype = q.dtype();
        let scores = q.to_dtype(DType::F32)?.matmul(&k.to_dtype(DType::F32)?.t()?)?.broadcast_add(causal_mask)?;
        let weights = candle_nn::ops::softmax_last_dim(&scores)?.to_dtype(dtype)?;
        let out = weights.matmul(&v)?.transpose(1, 2)?.reshape((batch, tokens, channels))?;
        self.out_proj.forward(&out)
    }
}

struct EncoderLayer {
    layer_norm1: LayerNorm,
    self_attn: SelfAttention,
    layer_norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    activation: Activation,
}

impl EncoderLayer {
    fn new(vb: VarBuilder, config: &ClipTextConfig, activation: Activation) -> Result<Self> {
        let h = config.hidden_size;
        Ok(Self {
            layer_norm1: candle_nn::layer_norm(h, config.layer_norm_eps, vb.pp("layer_norm1"))?,
            self_attn: SelfAttention::new(vb.pp("self_attn"), config)?,
            layer_norm2: candle_nn::layer_norm(h, config.layer_norm_eps, vb.pp("layer_norm2"))?,
            fc1: candle_nn::linear(h, config.intermediate_size, vb.pp("mlp").pp("fc1"))?,
            fc2: candle_nn::linear(config.intermediate_size, h, vb.pp("mlp").pp("fc2"))?,
            activation,
        })
    }

    fn forward(&self, xs: &Tensor, causal_mask: &Tensor) -> Result<Tensor> {
        let attended = self.self_attn.forward(&self.layer_norm1.forward(xs)?, causal_mask)?;
        let xs = (xs + attended)?;
        let hidden = self.activation.apply(&self.fc1.forward(&self.layer_norm2.forward(&xs)?)?)?;
        xs + self.fc2.forward(&hidden)?
    }
}

pub struct ClipTextModel {
    token_embedding: Embedding,
    position_embedding: Embedding,
    layers: Vec<EncoderLayer>,
    final_layer_norm: LayerNorm,
    max_positions: usize,
}

impl ClipTextModel {
    pub fn new(vb: VarBuilder, config: &ClipTextConfig) -> Result<Self> {
        let _span = tracing::info_span!("text-encoder-load").entered();
        let activation = match config.hidden_act.as_str() {
            "quick_gelu" => Activation::QuickGelu,
            "gelu" => Activation::Gelu,
            other => candle_core::bail!("text encoder config: hidden_act {other:?} is not supported"),
        };
        // transformers 4 saves under `text_model.`; transformers 5 saves without the prefix.
        let vb =
            if vb.contains_tensor("text_model.embeddings.token_embedding.weight") { vb.pp("text_model") } else { vb };
        let embeddings = vb.pp("embeddings");
        let h = config.hidden_size;
        let token_embedding = candle_nn::embedding(config.vocab_size, h, embeddings.pp("token_embedding"))?;
        let position_embedding =
            candle_nn::embedding(config.max_position_embeddings, h, embeddings.pp("position_embedding"))?;
        let layers = (0..config.num_hidden_layers)
            .map(|i| EncoderLayer::new(vb.pp("encoder").pp("layers").pp(i), config, activation))
            .collect::<Result<Vec<_>>>()?;
        let final_layer_norm = candle_nn::layer_norm(h, config.layer_norm_eps, vb.pp("final_layer_norm"))?;
        Ok(Self {
            token_embedding,
            position_embedding,
            layers,
            final_layer_norm,
            max_positions: config.max_position_embeddings,
        })
    }

    /// `input_ids` `(batch, tokens)` (u32 or i64) to `last_hidden_state` `(batch, tokens, hidden)`.
    pub fn forward(&self, input_ids: &Tensor) -> Result<Tensor> {
        let (_, tokens) = input_ids.dims2()?;
        if tokens > self.max_positions {
            candle_core::bail!("{tokens} tokens exceed the text encoder's {} positions", self.max_positions);
        }
        let device = input_ids.device();
        let positions = Tensor::arange(0u32, tokens as u32, device)?;
        let xs =
            self.token_embedding.forward(input_ids)?.broadcast_add(&self.position_embedding.forward(&positions)?)?;
        let mask = causal_mask(tokens, device)?;
        let mut xs = xs;
        for layer in &self.layers {
            xs = layer.forward(&xs, &mask)?;
        }
        self.final_layer_norm.forward(&xs)
    }
}

/// `(tokens, tokens)` f32 mask: 0 on and below the diagonal, -inf above.
fn causal_mask(tokens: usize, device: &Device) -> Result<Tensor> {
    let values: Vec<f32> =
        (0..tokens).flat_map(|i| (0..tokens).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 })).collect();
    Tensor::from_vec(values, (tokens, tokens), device)
}
