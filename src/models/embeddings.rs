//! Timestep embeddings of the diffusers UNet and ControlNet.
//!
//! `timestep_embedding` is the sinusoidal projection of diffusers' `get_timestep_embedding`
//! (computed in f32 the way torch does it), `TimestepEmbedding` the two-layer MLP that follows
//! it (`time_embedding.linear_1`, activation, `time_embedding.linear_2`).

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::{Linear, VarBuilder};

/// Activation functions named in diffusers configs (`act_fn`, `timestep_post_act`,
/// `time_embedding_act_fn`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    Silu,
    Gelu,
    Mish,
    Relu,
}

impl Activation {
    /// Parses a diffusers activation name ("silu" / "swish", "gelu", "mish", "relu").
    pub fn from_name(name: &str) -> Result<Self> {
        match name {
            "silu" | "swish" => Ok(Self::Silu),
            "gelu" => Ok(Self::Gelu),
            "mish" => Ok(Self::Mish),
            "relu" => Ok(Self::Relu),
            other => Err(candle_core::Error::Msg(format!(
                "unsupported activation function {other:?} (supported: silu, swish, gelu, mish, relu)"
            ))),
        }
    }

    pub fn apply(&self, xs: &Tensor) -> Result<Tensor> {
        match self {
            Self::Silu => candle_nn::ops::silu(xs),
            Self::Gelu => xs.gelu_erf(),
            // mish(x) = x * tanh(softplus(x)); softplus computed stably as max(x,0) + log1p(exp(-|x|)).
            Self::Mish => {
                let softplus = (xs.relu()? + (xs.abs()?.neg()?.exp()? + 1.0)?.log()?)?;
                xs * softplus.tanh()?
            }
            Self::Relu => xs.relu(),
        }
    }
}

/// Sinusoidal timestep embedding, exactly diffusers' `get_timestep_embedding` (scale 1,
/// max_period 10000): for `half = dim / 2`, frequency `i` is
/// `exp(-ln(10000) * i / (half - downscale_freq_shift))`; the result is `[sin, cos]`
/// (`[cos, sin]` with `flip_sin_to_cos`), zero-padded by one column when `dim` is odd.
/// Returns an f32 tensor of shape `(timesteps.len(), dim)` on `device`.
pub fn timestep_embedding(
    timesteps: &[f64],
    dim: usize,
    flip_sin_to_cos: bool,
    downscale_freq_shift: f64,
    device: &Device,
) -> Result<Tensor> {
    let half = dim / 2;
    if half == 0 {
        candle_core::bail!("timestep embedding dimension must be at least 2, got {dim}");
    }
    let denom = half as f32 - downscale_freq_shift as f32;
    if denom == 0.0 {
        candle_core::bail!(
            "timestep embedding: half dimension {half} minus downscale_freq_shift {downscale_freq_shift} is zero"
        );
    }
    // torch computes all of this in float32; do the same so the angles match bit for bit
    // as far as possible (the timestep is multiplied into angles up to ~1000 rad).
    let neg_log_period = -(10000f64.ln() as f32);
    let freqs: Vec<f32> = (0..half).map(|i| ((neg_log_period * i as f32) / denom).exp()).collect();
    let mut data = Vec::with_capacity(timesteps.len() * dim);
    for &t in timesteps {
        let t = t as f32;
        let args = freqs.iter().map(|f| t * f);
        let sin: Vec<f32> = args.clone().map(f32::sin).collect();
        let cos: Vec<f32> = args.map(f32::cos).collect();
        if flip_sin_to_cos {
            data.extend_from_slice(&cos);
            data.extend_from_slice(&sin);
        } else {
            data.extend_from_slice(&sin);
            data.extend_from_slice(&cos);
        }
        if dim % 2 == 1 {
            data.push(0.0);
        }
    }
    Tensor::from_vec(data, (timesteps.len(), dim), device)
}

/// diffusers' `Timesteps` module: the parameter-free sinusoidal projection.
#[derive(Debug, Clone)]
pub struct Timesteps {
    num_channels: usize,
    flip_sin_to_cos: bool,
    downscale_freq_shift: f64,
}

impl Timesteps {
    pub fn new(num_channels: usize, flip_sin_to_cos: bool, downscale_freq_shift: f64) -> Self {
        Self { num_channels, flip_sin_to_cos, downscale_freq_shift }
    }

    /// Embeds one timestep for each of `batch` rows, in `dtype` on `device`.
    pub fn forward(&self, timestep: f64, batch: usize, dtype: DType, device: &Device) -> Result<Tensor> {
        self.forward_each(&vec![timestep; batch], dtype, device)
    }

    /// Embeds each row's own timestep, in `dtype` on `device`.
    pub fn forward_each(&self, timesteps: &[f64], dtype: DType, device: &Device) -> Result<Tensor> {
        let embed = |timesteps: &[f64]| {
            timestep_embedding(timesteps, self.num_channels, self.flip_sin_to_cos, self.downscale_freq_shift, device)?
                .to_dtype(dtype)
        };
        // Each distinct timestep is embedded and uploaded once, as one row, and the rows are
        // put together on the device: a CUDA graph capture replays uploads from candle's cache
        // of small (at most 4 KiB) host buffers, and a batch of 4 or more rows of 320 f32
        // channels is over that (a guidance batch of two streams, a stream batch of 4 steps).
        let mut distinct: Vec<(u64, Tensor)> = Vec::new();
        let mut rows = Vec::with_capacity(timesteps.len());
        for &t in timesteps {
            let row = match distinct.iter().find(|(bits, _)| *bits == t.to_bits()) {
                Some((_, row)) => row.clone(),
                None => {
                    let row = embed(&[t])?;
                    distinct.push((t.to_bits(), row.clone()));
                    row
                }
            };
            rows.push(row);
        }
        match rows.as_slice() {
            [] => embed(&[]),
            [row] => Ok(row.clone()),
            _ if distinct.len() == 1 => rows[0].repeat((rows.len(), 1)),
            _ => Tensor::cat(&rows, 0),
        }
    }
}

/// diffusers' `TimestepEmbedding`: `linear_1 -> act -> linear_2 [-> post_act]`.
#[derive(Debug, Clone)]
pub struct TimestepEmbedding {
    linear_1: Linear,
    act: Activation,
    linear_2: Linear,
    post_act: Option<Activation>,
}

impl TimestepEmbedding {
    /// `vb` points at the module (e.g. `time_embedding`).
    pub fn new(
        vb: VarBuilder,
        in_channels: usize,
        time_embed_dim: usize,
        act: Activation,
        post_act: Option<Activation>,
    ) -> Result<Self> {
        let linear_1 = candle_nn::linear(in_channels, time_embed_dim, vb.pp("linear_1"))?;
        let linear_2 = candle_nn::linear(time_embed_dim, time_embed_dim, vb.pp("linear_2"))?;
        Ok(Self { linear_1, act, linear_2, post_act })
    }
}

impl Module for TimestepEmbedding {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let xs = self.act.apply(&self.linear_1.forward(xs)?)?;
        let xs = self.linear_2.forward(&xs)?;
        match &self.post_act {
            Some(act) => act.apply(&xs),
            None => Ok(xs),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_diffusers_formula() -> Result<()> {
        // dim 6, half 3, shift 1: freqs exp(-ln(1e4) * i / 2) = 1, 1e-2, 1e-4.
        let e = timestep_embedding(&[10.0], 6, false, 1.0, &Device::Cpu)?.to_vec2::<f32>()?;
        let expect = [10f32.sin(), 0.1f32.sin(), 0.001f32.sin(), 10f32.cos(), 0.1f32.cos(), 0.001f32.cos()];
        for (a, b) in e[0].iter().zip(expect.iter()) {
            assert!((a - b).abs() < 1e-6, "{a} vs {b}");
        }
        // flip puts cos first; odd dims get one zero column.
        let f = timestep_embedding(&[10.0], 7, true, 1.0, &Device::Cpu)?.to_vec2::<f32>()?;
        assert!((f[0][0] - 10f32.cos()).abs() < 1e-6);
        assert!((f[0][3] - 10f32.sin()).abs() < 1e-6);
        assert_eq!(f[0][6], 0.0);
        Ok(())
    }

    #[test]
    fn rows_of_several_timesteps_are_each_rows_own_embedding() -> Result<()> {
        // Rows are embedded once per distinct timestep and put together: each row must still be
        // its own timestep's embedding, in order, whether the timesteps repeat or not.
        let proj = Timesteps::new(8, true, 0.0);
        for timesteps in [vec![999.0], vec![10.0, 10.0, 10.0, 10.0], vec![10.0, 500.0, 10.0, 3.0, 500.0], vec![]] {
            let rows = proj.forward_each(&timesteps, DType::F32, &Device::Cpu)?;
            assert_eq!(rows.dims(), [timesteps.len(), 8]);
            let want = timestep_embedding(&timesteps, 8, true, 0.0, &Device::Cpu)?;
            let diff = (rows - want)?.abs()?.flatten_all()?.max(0).map(|m| m.to_scalar::<f32>()).unwrap_or(Ok(0.0))?;
            assert_eq!(diff, 0.0, "{timesteps:?}");
        }
        Ok(())
    }
}
