//! `sdcrossframe-bench`: timings of the engine's models, with no weights needed.
//!
//! `unet-step` builds the UNet and ControlNet at Stable Diffusion 1.5 shapes (the real
//! runwayml/stable-diffusion-v1-5 and lllyasviel/sd-controlnet-canny configs, embedded below)
//! with random weights and times one UNet + ControlNet call, with plain self-attention and with
//! the up blocks' keys/values doubled along tokens (what cross-frame first+prev attention costs).
//! Speed does not depend on the weight values.
//!
//! `frame` times whole frames of ControlNet img2img and their stages (text encoder, VAE encode,
//! denoising steps, VAE decode), with cross-frame attention first+prev and with it off, either
//! with random SD1.5-shaped weights or with a diffusers model directory (`--model`,
//! `--controlnet`). With a model directory the pipeline's own `Stylizer::stylize` is timed too.
//!
//! On CUDA the peak of the memory allocated on the device (candle's stream-ordered pool, weights
//! included) is reported per measurement.

use std::time::Instant;

use anyhow::{Context, Result, bail};
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::VarBuilder;
use clap::{Args, Parser, Subcommand};

use sdcrossframe::cross_frame::{AttentionMode, AttentionScope, CrossFrameAttention};
use sdcrossframe::device::{default_dtype, parse_device, parse_dtype};
use sdcrossframe::models::attention::{NoHook, SelfAttentionHook};
use sdcrossframe::models::clip::{ClipTextConfig, ClipTextModel};
use sdcrossframe::models::controlnet::{ControlNetConfig, ControlNetModel};
use sdcrossframe::models::unet::{UNet2DConditionConfig, UNet2DConditionModel};
use sdcrossframe::models::vae::{AutoencoderKL, AutoencoderKLConfig};
use sdcrossframe::ops::flash_attention::fused_attention;
use sdcrossframe::ops::unfused_attention;
use sdcrossframe::pipeline::{FrameHook, FrameSettings, Img2Img, ModelSpec, Stage, StageObserver, Stylizer};
use sdcrossframe::scheduler::{DdimScheduler, DdimSchedulerConfig};
use sdcrossframe::tokenizer::ClipTokenizer;
use sdcrossframe::weights::{self, ComponentFiles};

/// runwayml/stable-diffusion-v1-5 `unet/config.json`.
const SD15_UNET_CONFIG: &str = r#"{
  "_class_name": "UNet2DConditionModel",
  "_diffusers_version": "0.6.0",
  "act_fn": "silu",
  "attention_head_dim": 8,
  "block_out_channels": [320, 640, 1280, 1280],
  "center_input_sample": false,
  "cross_attention_dim": 768,
  "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
  "downsample_padding": 1,
  "flip_sin_to_cos": true,
  "freq_shift": 0,
  "in_channels": 4,
  "layers_per_block": 2,
  "mid_block_scale_factor": 1,
  "norm_eps": 1e-05,
  "norm_num_groups": 32,
  "out_channels": 4,
  "sample_size": 64,
  "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]
}"#;

/// lllyasviel/sd-controlnet-canny `config.json`.
const SD15_CONTROLNET_CONFIG: &str = r#"{
  "_class_name": "ControlNetModel",
  "_diffusers_version": "0.14.0.dev0",
  "act_fn": "silu",
  "attention_head_dim": 8,
  "block_out_channels": [320, 640, 1280, 1280],
  "class_embed_type": null,
  "conditioning_embedding_out_channels": [16, 32, 96, 256],
  "controlnet_conditioning_channel_order": "rgb",
  "cross_attention_dim": 768,
  "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
  "downsample_padding": 1,
  "flip_sin_to_cos": true,
  "freq_shift": 0,
  "in_channels": 4,
  "layers_per_block": 2,
  "mid_block_scale_factor": 1,
  "norm_eps": 1e-05,
  "norm_num_groups": 32,
  "num_class_embeds": null,
  "only_cross_attention": false,
  "projection_class_embeddings_input_dim": null,
  "resnet_time_scale_shift": "default",
  "upcast_attention": false,
  "use_linear_projection": false
}"#;

/// runwayml/stable-diffusion-v1-5 `vae/config.json`.
const SD15_VAE_CONFIG: &str = r#"{
  "_class_name": "AutoencoderKL",
  "_diffusers_version": "0.6.0",
  "act_fn": "silu",
  "block_out_channels": [128, 256, 512, 512],
  "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D"],
  "in_channels": 3,
  "latent_channels": 4,
  "layers_per_block": 2,
  "norm_num_groups": 32,
  "out_channels": 3,
  "sample_size": 512,
  "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"]
}"#;

/// runwayml/stable-diffusion-v1-5 `text_encoder/config.json` (openai/clip-vit-large-patch14's text model).
const SD15_TEXT_ENCODER_CONFIG: &str = r#"{
  "architectures": ["CLIPTextModel"],
  "attention_dropout": 0.0,
  "bos_token_id": 0,
  "dropout": 0.0,
  "eos_token_id": 2,
  "hidden_act": "quick_gelu",
  "hidden_size": 768,
  "initializer_factor": 1.0,
  "initializer_range": 0.02,
  "intermediate_size": 3072,
  "layer_norm_eps": 1e-05,
  "max_position_embeddings": 77,
  "model_type": "clip_text_model",
  "num_attention_heads": 12,
  "num_hidden_layers": 12,
  "pad_token_id": 1,
  "projection_dim": 768,
  "vocab_size": 49408
}"#;

/// runwayml/stable-diffusion-v1-5 `scheduler/scheduler_config.json` (PNDM; DDIM reads the same fields).
const SD15_SCHEDULER_CONFIG: &str = r#"{
  "_class_name": "PNDMScheduler",
  "_diffusers_version": "0.6.0",
  "beta_end": 0.012,
  "beta_schedule": "scaled_linear",
  "beta_start": 0.00085,
  "num_train_timesteps": 1000,
  "set_alpha_to_one": false,
  "skip_prk_steps": true,
  "steps_offset": 1,
  "trained_betas": null,
  "clip_sample": false
}"#;

#[derive(Parser, Debug)]
#[command(
    name = "sdcrossframe-bench",
    about = "Timings of the sdcrossframe engine (random weights or a model directory)"
)]
struct Cli {
    /// Compute device: cpu, or cuda:N (needs a build with --features cuda).
    #[arg(long, default_value = "cpu", global = true)]
    device: String,
    /// Compute dtype: f32, f16 or bf16 (default: f32 on cpu, f16 on cuda).
    #[arg(long, global = true)]
    dtype: Option<String>,
    /// Timed runs per measurement (the median is reported).
    #[arg(long, default_value_t = 5, global = true)]
    runs: usize,
    /// Untimed runs before the timed ones. `frame`: the anchor frame plus warmup - 1 follower
    /// frames; on CUDA use 3 or more (a step key runs eagerly, then is captured as a graph,
    /// and only replays after that).
    #[arg(long, default_value_t = 1, global = true)]
    warmup: usize,
    #[command(subcommand)]
    mode: Mode,
}

#[derive(Subcommand, Debug)]
enum Mode {
    /// One UNet + ControlNet call at SD1.5 shapes with random weights: plain and doubled K/V.
    UnetStep(UnetStepArgs),
    /// Whole img2img frames with per-stage times: cross-frame first+prev and attention off.
    Frame(FrameArgs),
    /// Single operations at SD1.5 shapes (GroupNorm, SiLU, convolutions, linear layers,
    /// attention): where a step's time goes, to compare with tests/reference/bench_ops_torch.py.
    Ops,
    /// Attention alone: the fused kernel against candle's unfused matmul-softmax-matmul.
    Attention,
}

#[derive(Args, Debug)]
struct UnetStepArgs {
    /// Image width in pixels (latents are width/8).
    #[arg(long, default_value_t = 512)]
    width: usize,
    /// Image height in pixels.
    #[arg(long, default_value_t = 512)]
    height: usize,
    /// UNet batch (2 = classifier-free guidance).
    #[arg(long, default_value_t = 2)]
    batch: usize,
    /// Also measure doubled K/V in every self-attention (scope "all").
    #[arg(long)]
    all_scope: bool,
    /// Bracket the last run of the first variant with cuProfilerStart/Stop, so that
    /// `ncu --profile-from-start off` times the kernels of exactly one step (CUDA builds).
    #[arg(long)]
    profiler_range: bool,
    /// Experiment: also capture one plain step in a CUDA graph and time its replays against
    /// eager execution (how much of a step is host-side launch work). CUDA builds.
    #[arg(long)]
    cuda_graph: bool,
}

#[derive(Args, Debug)]
struct FrameArgs {
    /// A diffusers Stable Diffusion directory; without it, random weights at SD1.5 shapes.
    #[arg(long, requires = "controlnet")]
    model: Option<String>,
    /// A diffusers ControlNet directory (with --model).
    #[arg(long, requires = "model")]
    controlnet: Option<String>,
    #[arg(long, default_value_t = 512)]
    width: usize,
    #[arg(long, default_value_t = 512)]
    height: usize,
    #[arg(long, default_value_t = 20)]
    steps: usize,
    #[arg(long, default_value_t = 0.9)]
    strength: f64,
    #[arg(long, default_value_t = 7.5)]
    guidance_scale: f64,
    #[arg(long, default_value_t = 0.7)]
    controlnet_scale: f64,
    /// Skip the pipeline's own `Stylizer::stylize` timing (only run with --model).
    #[arg(long)]
    no_pipeline: bool,
}

/// A VarBuilder backend that makes a random tensor of whatever shape a layer asks for:
/// matrices and kernels ~ N(0, 1/fan_in) (activations keep their scale, no overflow in f16),
/// 1-D weights (norm scales) ones, biases zeros.
struct RandomWeights;

impl candle_nn::var_builder::SimpleBackend for RandomWeights {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _h: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let dims = s.dims();
        if dims.len() >= 2 {
            let fan_in: usize = dims[1..].iter().product();
            let std = 1.0 / (fan_in.max(1) as f32).sqrt();
            Tensor::randn(0f32, std, s, dev)?.to_dtype(dtype)
        } else if name.ends_with("weight") {
            Tensor::ones(s, dtype, dev)
        } else {
            Tensor::zeros(s, dtype, dev)
        }
    }

    fn get_unchecked(&self, name: &str, _dtype: DType, _dev: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("random weights: {name} was asked for without a shape")
    }

    fn contains_tensor(&self, _name: &str) -> bool {
        false
    }
}

fn random_vb(dtype: DType, device: &Device) -> VarBuilder<'static> {
    VarBuilder::from_backend(Box::new(RandomWeights), dtype, device.clone())
}

fn parse_config<T: serde::de::DeserializeOwned>(json: &str, what: &str) -> Result<T> {
    serde_json::from_str(json).with_context(|| format!("embedded {what} config does not parse"))
}

/// Doubles every covered self-attention's keys and values along tokens (2N keys), the cost
/// of cross-frame first+prev attention without its store.
struct DoubledKv {
    all_layers: bool,
}

impl SelfAttentionHook for DoubledKv {
    fn self_attention(
        &mut self,
        layer: &str,
        hidden: &Tensor,
        project: &dyn Fn(&Tensor) -> candle_core::Result<(Tensor, Tensor)>,
    ) -> candle_core::Result<Option<(Tensor, Tensor)>> {
        if !self.all_layers && !layer.starts_with("up_blocks.") {
            return Ok(None);
        }
        let (k, v) = project(hidden)?;
        Ok(Some((Tensor::cat(&[&k, &k], 1)?, Tensor::cat(&[&v, &v], 1)?)))
    }
}

/// A self-attention hook of the step benchmark, with the bytes it keeps between frames.
trait BenchHook: SelfAttentionHook {
    fn stored_bytes(&self) -> usize {
        0
    }
    fn as_hook(&mut self) -> &mut dyn SelfAttentionHook;
}

impl BenchHook for NoHook {
    fn as_hook(&mut self) -> &mut dyn SelfAttentionHook {
        self
    }
}

impl BenchHook for DoubledKv {
    fn as_hook(&mut self) -> &mut dyn SelfAttentionHook {
        self
    }
}

impl BenchHook for CachedFirstPrev {
    fn stored_bytes(&self) -> usize {
        CachedFirstPrev::stored_bytes(self)
    }
    fn as_hook(&mut self) -> &mut dyn SelfAttentionHook {
        self
    }
}

/// What cross-frame first+prev attention costs a later frame at one layer, with the store
/// holding either the projected keys/values (this frame's N tokens
/// are projected once, for its own queries' successor, and the stored K/V are concatenated)
/// or the attention inputs (the stored 2N tokens are projected at every layer and step; what
/// `cross_frame` does, for half the memory at the same speed).
/// The first call per layer fills the store from the current frame; values do not matter.
struct CachedFirstPrev {
    cache_hidden: bool,
    stored: std::collections::HashMap<String, [Tensor; 4]>,
}

impl CachedFirstPrev {
    fn new(cache_hidden: bool) -> Self {
        Self { cache_hidden, stored: Default::default() }
    }

    fn stored_bytes(&self) -> usize {
        let mut bytes = 0;
        for tensors in self.stored.values() {
            // Projected: first K, first V, prev K, prev V. Hidden: first and prev inputs
            // (kept twice in the array to share the layout; count them once).
            let held = if self.cache_hidden { &tensors[..2] } else { &tensors[..] };
            bytes += held.iter().map(|t| t.elem_count() * t.dtype().size_in_bytes()).sum::<usize>();
        }
        bytes
    }
}

impl SelfAttentionHook for CachedFirstPrev {
    fn self_attention(
        &mut self,
        layer: &str,
        hidden: &Tensor,
        project: &dyn Fn(&Tensor) -> candle_core::Result<(Tensor, Tensor)>,
    ) -> candle_core::Result<Option<(Tensor, Tensor)>> {
        if !layer.starts_with("up_blocks.") {
            return Ok(None);
        }
        if !self.stored.contains_key(layer) {
            let entry = if self.cache_hidden {
                [hidden.clone(), hidden.clone(), hidden.clone(), hidden.clone()]
            } else {
                let (k, v) = project(hidden)?;
                [k.clone(), v.clone(), k, v]
            };
            self.stored.insert(layer.to_string(), entry);
        }
        let entry = self.stored.get_mut(layer).expect("inserted above");
        if self.cache_hidden {
            let kv = project(&Tensor::cat(&[&entry[0], &entry[1]], 1)?)?;
            entry[1] = hidden.clone(); // this frame becomes "prev"
            Ok(Some(kv))
        } else {
            let keys = Tensor::cat(&[&entry[0], &entry[2]], 1)?;
            let values = Tensor::cat(&[&entry[1], &entry[3]], 1)?;
            let (k, v) = project(hidden)?; // this frame's K/V become "prev"
            entry[2] = k;
            entry[3] = v;
            Ok(Some((keys, values)))
        }
    }
}

/// Device memory: on CUDA the high-water mark of the device's default memory pool (candle
/// allocates every tensor from it), and the device's used memory (all processes, CUDA contexts
/// included) from cuMemGetInfo.
#[cfg(feature = "cuda")]
mod gpu_memory {
    use candle_core::Device;
    use candle_core::cuda_backend::cudarc::driver::sys;

    pub struct Probe {
        pool: sys::CUmemoryPool,
        ctx: std::sync::Arc<candle_core::cuda_backend::cudarc::driver::CudaContext>,
    }

    fn check(r: sys::CUresult, what: &str) -> anyhow::Result<()> {
        if r != sys::CUresult::CUDA_SUCCESS {
            anyhow::bail!("{what} failed: {r:?}");
        }
        Ok(())
    }

    impl Probe {
        pub fn new(device: &Device) -> anyhow::Result<Option<Self>> {
            let Device::Cuda(dev) = device else { return Ok(None) };
            let stream = dev.cuda_stream();
            let ctx = stream.context().clone();
            ctx.bind_to_thread()?;
            let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
            check(unsafe { sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device()) }, "cuDeviceGetDefaultMemPool")?;
            Ok(Some(Self { pool, ctx }))
        }

        /// Starts a new high-water mark at the memory in use now.
        pub fn reset_peak(&self) -> anyhow::Result<()> {
            self.ctx.bind_to_thread()?;
            let mut zero: u64 = 0;
            check(
                unsafe {
                    sys::cuMemPoolSetAttribute(
                        self.pool,
                        sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
                        &mut zero as *mut u64 as *mut _,
                    )
                },
                "cuMemPoolSetAttribute(USED_MEM_HIGH)",
            )
        }

        fn pool_attr(&self, attr: sys::CUmemPool_attribute) -> anyhow::Result<u64> {
            self.ctx.bind_to_thread()?;
            let mut v: u64 = 0;
            check(
                unsafe { sys::cuMemPoolGetAttribute(self.pool, attr, &mut v as *mut u64 as *mut _) },
                "cuMemPoolGetAttribute",
            )?;
            Ok(v)
        }

        /// Peak bytes allocated from the pool since the last reset.
        pub fn peak(&self) -> anyhow::Result<u64> {
            self.pool_attr(sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH)
        }

        /// Bytes allocated from the pool now.
        pub fn current(&self) -> anyhow::Result<u64> {
            self.pool_attr(sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_CURRENT)
        }

        /// (used, total) device memory.
        pub fn device_used(&self) -> anyhow::Result<(u64, u64)> {
            let (free, total) = self.ctx.mem_get_info()?;
            Ok(((total - free) as u64, total as u64))
        }
    }
}

#[cfg(not(feature = "cuda"))]
mod gpu_memory {
    use candle_core::Device;

    pub struct Probe;

    impl Probe {
        pub fn new(_device: &Device) -> anyhow::Result<Option<Self>> {
            Ok(None)
        }
        pub fn reset_peak(&self) -> anyhow::Result<()> {
            Ok(())
        }
        pub fn peak(&self) -> anyhow::Result<u64> {
            Ok(0)
        }
        pub fn current(&self) -> anyhow::Result<u64> {
            Ok(0)
        }
        pub fn device_used(&self) -> anyhow::Result<(u64, u64)> {
            Ok((0, 0))
        }
    }
}

use gpu_memory::Probe;

fn gib(bytes: u64) -> f64 {
    bytes as f64 / (1u64 << 30) as f64
}

fn median(values: &[f64]) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 }
}

fn min(values: &[f64]) -> f64 {
    values.iter().copied().fold(f64::INFINITY, f64::min)
}

/// Milliseconds since `t`, after the device has finished its queued work.
fn elapsed_ms(device: &Device, t: Instant) -> Result<f64> {
    device.synchronize()?;
    Ok(t.elapsed().as_secs_f64() * 1e3)
}

fn dtype_name(dtype: DType) -> &'static str {
    match dtype {
        DType::F32 => "f32",
        DType::F16 => "f16",
        DType::BF16 => "bf16",
        _ => "other",
    }
}

fn is_finite(t: &Tensor) -> Result<bool> {
    let s = t.to_dtype(DType::F32)?.abs()?.sum_all()?.to_scalar::<f32>()?;
    Ok(s.is_finite())
}

fn describe_device(device: &Device, probe: Option<&Probe>) -> Result<String> {
    Ok(match (device, probe) {
        (Device::Cpu, _) => {
            format!("cpu ({} threads)", std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1))
        }
        (_, Some(p)) => {
            let (_, total) = p.device_used()?;
            format!("{device:?} ({:.1} GiB)", gib(total))
        }
        _ => format!("{device:?}"),
    })
}

fn main() -> std::process::ExitCode {
    // SAFETY: first thing in main, before any thread starts.
    unsafe { sdcrossframe::device::pin_cpu_thread_count() };
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    if cli.runs == 0 {
        bail!("--runs must be at least 1");
    }
    let device = parse_device(&cli.device)?;
    let dtype = match cli.dtype.as_deref() {
        Some(spec) => parse_dtype(spec)?,
        None => default_dtype(&device),
    };
    let probe = Probe::new(&device)?;
    println!(
        "sdcrossframe-bench: device {}, dtype {}, {} warm-up + {} timed runs, cuda feature {}",
        describe_device(&device, probe.as_ref())?,
        dtype_name(dtype),
        cli.warmup,
        cli.runs,
        if cfg!(feature = "cuda") { "on" } else { "off" }
    );
    match &cli.mode {
        Mode::UnetStep(args) => unet_step(&cli, args, &device, dtype, probe.as_ref()),
        Mode::Frame(args) => frame(&cli, args, &device, dtype, probe.as_ref()),
        Mode::Ops => ops(&cli, &device, dtype),
        Mode::Attention => attention(&cli, &device, dtype),
    }
}

fn unet_step(cli: &Cli, args: &UnetStepArgs, device: &Device, dtype: DType, probe: Option<&Probe>) -> Result<()> {
    if !args.width.is_multiple_of(8) || !args.height.is_multiple_of(8) || args.width == 0 || args.height == 0 {
        bail!("--width/--height must be non-zero multiples of 8 (got {}x{})", args.width, args.height);
    }
    let t = Instant::now();
    let unet_config: UNet2DConditionConfig = parse_config(SD15_UNET_CONFIG, "SD1.5 UNet")?;
    let cn_config: ControlNetConfig = parse_config(SD15_CONTROLNET_CONFIG, "SD1.5 ControlNet")?;
    let unet = UNet2DConditionModel::new(random_vb(dtype, device).pp("unet"), &unet_config)
        .context("cannot build the SD1.5-shaped UNet")?;
    let controlnet = ControlNetModel::new(random_vb(dtype, device).pp("controlnet"), &cn_config)
        .context("cannot build the SD1.5-shaped ControlNet")?;
    let build_ms = elapsed_ms(device, t)?;
    let weights_mem = match probe {
        Some(p) => Some(p.current()?),
        None => None,
    };

    let (b, h, w) = (args.batch, args.height / 8, args.width / 8);
    let latents = Tensor::randn(0f32, 1f32, (b, unet_config.in_channels, h, w), device)?.to_dtype(dtype)?;
    let text = Tensor::randn(0f32, 1f32, (b, 77, 768), device)?.to_dtype(dtype)?;
    let control = Tensor::rand(0f32, 1f32, (b, cn_config.conditioning_channels, args.height, args.width), device)?
        .to_dtype(dtype)?;
    let timestep = 500.0;

    println!(
        "unet-step: SD1.5 UNet + Canny ControlNet, random weights (built in {:.1} s), {}x{} (latents {}x{}), batch {}, text 77x768",
        build_ms / 1e3,
        args.width,
        args.height,
        w,
        h,
        b
    );
    if let Some(m) = weights_mem {
        println!("weights on the device: {:.2} GiB", gib(m));
    }

    let mut variants: Vec<(&str, Box<dyn BenchHook>)> =
        vec![("plain attention", Box::new(NoHook)), ("2N K/V, up blocks", Box::new(DoubledKv { all_layers: false }))];
    if args.all_scope {
        variants.push(("2N K/V, all blocks", Box::new(DoubledKv { all_layers: true })));
    }
    variants.push(("first+prev, store projected K/V", Box::new(CachedFirstPrev::new(false))));
    variants.push(("first+prev, store hidden states", Box::new(CachedFirstPrev::new(true))));

    let mut rows = Vec::new();
    let mut stored = Vec::new();
    for (label, mut hook) in variants {
        if let Some(p) = probe {
            p.reset_peak()?;
        }
        let (mut cn_ms, mut unet_ms, mut total_ms) = (Vec::new(), Vec::new(), Vec::new());
        let mut finite = true;
        for run in 0..cli.warmup + cli.runs {
            let profiled = args.profiler_range && rows.is_empty() && run + 1 == cli.warmup + cli.runs;
            device.synchronize()?;
            if profiled {
                profiler_range(true)?;
            }
            let t0 = Instant::now();
            let residuals = controlnet.forward(&latents, timestep, &text, &control, 0.7)?;
            let t_cn = elapsed_ms(device, t0)?;
            let t1 = Instant::now();
            let out = unet.forward(&latents, timestep, &text, Some(&residuals), hook.as_hook())?;
            let t_unet = elapsed_ms(device, t1)?;
            if profiled {
                profiler_range(false)?;
            }
            if run >= cli.warmup {
                cn_ms.push(t_cn);
                unet_ms.push(t_unet);
                total_ms.push(t_cn + t_unet);
            }
            if run + 1 == cli.warmup + cli.runs {
                finite = is_finite(&out)?;
            }
        }
        let peak = match probe {
            Some(p) => Some(p.peak()?),
            None => None,
        };
        if hook.stored_bytes() > 0 {
            stored.push((label, hook.stored_bytes()));
        }
        rows.push((label, median(&cn_ms), median(&unet_ms), median(&total_ms), min(&total_ms), peak, finite));
    }

    println!();
    println!(
        "| variant | ControlNet ms | UNet ms | step ms (median) | step ms (min) | peak alloc GiB | output finite |"
    );
    println!("|---|---:|---:|---:|---:|---:|---|");
    for (label, cn, un, total, best, peak, finite) in &rows {
        println!(
            "| {label} | {cn:.1} | {un:.1} | {total:.1} | {best:.1} | {} | {} |",
            peak.map(|p| format!("{:.2}", gib(p))).unwrap_or_else(|| "-".into()),
            if *finite { "yes" } else { "NO" }
        );
    }
    if rows.len() >= 2 {
        println!();
        println!("2N K/V (up blocks) / plain: {:.3}", rows[1].3 / rows[0].3);
    }
    if args.cuda_graph {
        let step = || -> candle_core::Result<Tensor> {
            let residuals = controlnet.forward(&latents, timestep, &text, &control, 0.7)?;
            unet.forward(&latents, timestep, &text, Some(&residuals), &mut NoHook)
        };
        graph_replay(cli, device, step)?;
    }
    // The steps above embed the control image on every ControlNet call, as diffusers does;
    // the pipeline embeds it once per frame at batch 1, so its steps cost this much less.
    let one_control = control.narrow(0, 0, 1)?;
    let per_call_ms = time_op(cli, device, || controlnet.embed_condition(&control).map(|c| c.tensor().clone()))?;
    let once_ms = time_op(cli, device, || controlnet.embed_condition(&one_control).map(|c| c.tensor().clone()))?;
    println!(
        "control image embedding: {per_call_ms:.2} ms at batch {b} (inside every step above); {once_ms:.2} ms at batch 1, once per frame in the pipeline"
    );
    for (label, bytes) in stored {
        println!(
            "{label}: store {:.1} MiB per denoising step ({:.2} GiB for 18 steps)",
            bytes as f64 / (1u64 << 20) as f64,
            gib(bytes as u64 * 18)
        );
    }
    if let Some(p) = probe {
        let (used, total) = p.device_used()?;
        println!("device memory used now (all processes, contexts included): {:.2} / {:.1} GiB", gib(used), gib(total));
    }
    Ok(())
}

/// Captures `step` in a CUDA graph and times replays against eager runs of the same work.
/// candle 0.11 serves kernels' small host uploads (dims, strides, the timestep) from a cache
/// while `enable_cuda_graph_htod_cache` is held, which is what makes capture possible; an eager
/// run with the cache on fills it (and does the cuDNN tuning) before capturing.
#[cfg(feature = "cuda")]
fn graph_replay(cli: &Cli, device: &Device, step: impl Fn() -> candle_core::Result<Tensor>) -> Result<()> {
    let Device::Cuda(cuda) = device else { bail!("--cuda-graph needs a CUDA device") };
    let _upload_cache = cuda.enable_cuda_graph_htod_cache();

    let eager = step()?;
    let mut eager_ms = Vec::new();
    for run in 0..cli.warmup + cli.runs {
        device.synchronize()?;
        let t = Instant::now();
        drop(step()?);
        let ms = elapsed_ms(device, t)?;
        if run >= cli.warmup {
            eager_ms.push(ms);
        }
    }

    let mut captured = None;
    let graph = sdcrossframe::ops::step_graphs::CapturedGraph::capture(device, || {
        captured = Some(step()?);
        Ok(())
    })?;
    let captured = captured.context("the capture produced no output")?;

    let mut replay_ms = Vec::new();
    for run in 0..cli.warmup + cli.runs {
        device.synchronize()?;
        let t = Instant::now();
        graph.launch()?;
        let ms = elapsed_ms(device, t)?;
        if run >= cli.warmup {
            replay_ms.push(ms);
        }
    }
    // `captured` lives in the graph's memory: it holds the last replay's output until freed.
    let diff = max_abs_diff(&captured, &eager)?;
    drop(captured);
    drop(graph);
    println!(
        "CUDA graph, one plain step: eager {:.1} ms, replay {:.1} ms (median; upload cache on for both); replay vs eager output max diff {diff:.1e}",
        median(&eager_ms),
        median(&replay_ms)
    );
    Ok(())
}

#[cfg(not(feature = "cuda"))]
fn graph_replay(_cli: &Cli, _device: &Device, _step: impl Fn() -> candle_core::Result<Tensor>) -> Result<()> {
    bail!("--cuda-graph needs a CUDA build (the `cuda` feature)")
}

/// Starts or stops the CUDA profiler's collection (what `ncu --profile-from-start off` records).
#[cfg(feature = "cuda")]
fn profiler_range(start: bool) -> Result<()> {
    use candle_core::cuda_backend::cudarc::driver::{profiler_start, profiler_stop};
    let result = if start { profiler_start() } else { profiler_stop() };
    result.map_err(|e| anyhow::anyhow!("cuProfilerStart/Stop failed: {e:?}"))
}

#[cfg(not(feature = "cuda"))]
fn profiler_range(_start: bool) -> Result<()> {
    bail!("--profiler-range needs a CUDA build (the `cuda` feature)")
}

/// The models of one ControlNet img2img pipeline, loaded or random.
struct Models {
    tokenizer: Option<ClipTokenizer>,
    text_encoder: ClipTextModel,
    /// The pipeline's own per-frame computation (what `Stylizer::stylize` runs).
    img2img: Img2Img,
}

impl Models {
    fn random(dtype: DType, device: &Device) -> Result<Self> {
        let text_config: ClipTextConfig = parse_config(SD15_TEXT_ENCODER_CONFIG, "SD1.5 text encoder")?;
        let unet_config: UNet2DConditionConfig = parse_config(SD15_UNET_CONFIG, "SD1.5 UNet")?;
        let cn_config: ControlNetConfig = parse_config(SD15_CONTROLNET_CONFIG, "SD1.5 ControlNet")?;
        let vae_config: AutoencoderKLConfig = parse_config(SD15_VAE_CONFIG, "SD1.5 VAE")?;
        let scheduler_config: DdimSchedulerConfig = parse_config(SD15_SCHEDULER_CONFIG, "SD1.5 scheduler")?;
        Ok(Self {
            tokenizer: None,
            text_encoder: ClipTextModel::new(random_vb(dtype, device), &text_config)?,
            img2img: Img2Img::new(
                UNet2DConditionModel::new(random_vb(dtype, device), &unet_config)?,
                ControlNetModel::new(random_vb(dtype, device), &cn_config)?,
                AutoencoderKL::new(random_vb(dtype, device), &vae_config)?,
                &vae_config,
                DdimScheduler::new(&scheduler_config)?,
                dtype,
            ),
        })
    }

    fn load(model: &str, controlnet: &str, dtype: DType, device: &Device) -> Result<Self> {
        let root = std::path::PathBuf::from(model);
        let component = |name: &str| ComponentFiles::locate(&root.join(name), None);
        let text_files = component("text_encoder")?;
        let text_config: ClipTextConfig = text_files.read_config()?;
        let unet_files = component("unet")?;
        let unet_config: UNet2DConditionConfig = unet_files.read_config()?;
        let vae_files = component("vae")?;
        let vae_config: AutoencoderKLConfig = vae_files.read_config()?;
        let cn_files = ComponentFiles::locate(std::path::Path::new(controlnet), None)?;
        let cn_config: ControlNetConfig = cn_files.read_config()?;
        let scheduler_config: DdimSchedulerConfig =
            weights::read_config(&root.join("scheduler").join("scheduler_config.json"))?;
        Ok(Self {
            tokenizer: Some(ClipTokenizer::from_dir(&root.join("tokenizer"))?),
            text_encoder: ClipTextModel::new(text_files.var_builder(dtype, device)?, &text_config)?,
            img2img: Img2Img::new(
                UNet2DConditionModel::new(unet_files.var_builder(dtype, device)?, &unet_config)?,
                ControlNetModel::new(cn_files.var_builder(dtype, device)?, &cn_config)?,
                AutoencoderKL::new(vae_files.var_builder(dtype, device)?, &vae_config)?,
                &vae_config,
                DdimScheduler::new(&scheduler_config)?,
                dtype,
            ),
        })
    }

    fn token_ids(&self, prompt: &str) -> Result<Vec<u32>> {
        match &self.tokenizer {
            Some(t) => Ok(t.encode(prompt)?.ids),
            // CLIP's BOS, then EOS padding: the encoder's cost does not depend on the ids.
            None => Ok(std::iter::once(49406).chain(std::iter::repeat_n(49407, 76)).collect()),
        }
    }
}

/// What one frame is made from.
struct FrameInput {
    settings: FrameSettings,
    /// Text embeddings, `[negative; positive]` with guidance.
    embeddings: Tensor,
    /// `[1, 3, H, W]` in [0, 1].
    frame: Tensor,
    /// `[1, C, H, W]` in [0, 1].
    control: Tensor,
    /// `[1, latent channels, H / f, W / f]`.
    noise: Tensor,
}

/// Per-stage times of one frame, in milliseconds.
#[derive(Debug, Default, Clone)]
struct FrameTimes {
    /// VAE encode, noising, and the ControlNet's control-image embedding (once per frame).
    vae_encode: f64,
    steps: Vec<f64>,
    vae_decode: f64,
    total: f64,
}

/// Records each stage's time, synchronizing the device at every stage end.
struct StageClock<'a> {
    device: &'a Device,
    last: Instant,
    times: FrameTimes,
}

impl StageObserver for StageClock<'_> {
    fn stage_done(&mut self, stage: Stage) -> Result<()> {
        let ms = elapsed_ms(self.device, self.last)?;
        self.last = Instant::now();
        match stage {
            Stage::Encoded => self.times.vae_encode = ms,
            Stage::Step(_) => self.times.steps.push(ms),
            Stage::Decoded => self.times.vae_decode = ms,
        }
        Ok(())
    }
}

/// One frame through the pipeline's `Img2Img::run` (what `Stylizer::stylize` runs after the
/// cached text embeddings), with a sync and a clock reading at the end of every stage.
fn staged_frame(
    m: &Models,
    device: &Device,
    input: &FrameInput,
    hook: &mut dyn FrameHook,
) -> Result<(Tensor, FrameTimes)> {
    let FrameInput { settings, embeddings, frame, control, noise } = input;
    device.synchronize()?;
    let start = Instant::now();
    let mut clock = StageClock { device, last: start, times: FrameTimes::default() };
    let image = m.img2img.run(frame, control, embeddings, settings, noise, hook, &mut clock)?;
    let mut times = clock.times;
    times.total = elapsed_ms(device, start)?;
    Ok((image, times))
}

fn frame(cli: &Cli, args: &FrameArgs, device: &Device, dtype: DType, probe: Option<&Probe>) -> Result<()> {
    let t = Instant::now();
    let models = match (&args.model, &args.controlnet) {
        (Some(model), Some(cn)) => Models::load(model, cn, dtype, device)?,
        _ => Models::random(dtype, device)?,
    };
    let load_ms = elapsed_ms(device, t)?;
    let f = models.img2img.vae_scale_factor();
    if args.width == 0 || args.height == 0 || !args.width.is_multiple_of(f) || !args.height.is_multiple_of(f) {
        bail!("--width/--height must be non-zero multiples of {f} (got {}x{})", args.width, args.height);
    }
    let settings = FrameSettings {
        prompt: "a watercolor painting of a woman, soft light".into(),
        negative_prompt: String::new(),
        steps: args.steps,
        strength: args.strength,
        guidance_scale: args.guidance_scale,
        controlnet_scale: args.controlnet_scale,
    };
    let timesteps = models.img2img.timesteps(&settings)?;
    let source = match &args.model {
        Some(m) => format!("{m} + {}", args.controlnet.as_deref().unwrap_or("")),
        None => "random weights at SD1.5 shapes".into(),
    };
    println!(
        "frame: {source} (loaded in {:.1} s), {}x{}, {} steps x strength {} = {} denoising steps, guidance {}, controlnet scale {}",
        load_ms / 1e3,
        args.width,
        args.height,
        settings.steps,
        settings.strength,
        timesteps.len(),
        settings.guidance_scale,
        settings.controlnet_scale
    );

    // Text encoder: once per prompt pair (the pipeline caches the embeddings).
    let ids_pos = models.token_ids(&settings.prompt)?;
    let ids_neg = models.token_ids(&settings.negative_prompt)?;
    let mut text_ms = Vec::new();
    let mut embeddings = None;
    for run in 0..cli.warmup + cli.runs {
        let t = Instant::now();
        let pos = models.text_encoder.forward(&Tensor::new(ids_pos.as_slice(), device)?.unsqueeze(0)?)?;
        let emb = if settings.uses_guidance() {
            let neg = models.text_encoder.forward(&Tensor::new(ids_neg.as_slice(), device)?.unsqueeze(0)?)?;
            Tensor::cat(&[neg, pos], 0)?
        } else {
            pos
        };
        let ms = elapsed_ms(device, t)?;
        if run >= cli.warmup {
            text_ms.push(ms);
        }
        embeddings = Some(emb);
    }
    let embeddings = embeddings.expect("at least one run");

    let (h, w) = (args.height, args.width);
    let frame = Tensor::rand(0f32, 1f32, (1, 3, h, w), device)?;
    let control = Tensor::rand(0f32, 1f32, (1, models.img2img.control_channels(), h, w), device)?;
    let noise = Tensor::randn(0f32, 1f32, models.img2img.noise_shape(w, h), device)?;
    let input = FrameInput { settings, embeddings, frame, control, noise };

    struct Row {
        label: String,
        times: Vec<FrameTimes>,
        /// Whole frames without the per-stage synchronisation (what the element sees).
        unstaged: Vec<f64>,
        peak: Option<u64>,
        finite: bool,
    }
    let mut rows: Vec<Row> = Vec::new();
    for mode in [AttentionMode::FirstPrev, AttentionMode::Off] {
        let mut hook = CrossFrameAttention::new(mode, AttentionScope::Up);
        if let Some(p) = probe {
            p.reset_peak()?;
        }
        let (graphs_before, _) = models.img2img.graph_stats();
        // Frame 0 is the anchor (plain attention, fills the store); the timed frames follow it.
        let (_, anchor) = staged_frame(&models, device, &input, &mut hook)?;
        let mut times = Vec::new();
        let mut finite = true;
        for run in 0..cli.warmup.saturating_sub(1) + cli.runs {
            let (out, ft) = staged_frame(&models, device, &input, &mut hook)?;
            if run >= cli.warmup.saturating_sub(1) {
                times.push(ft);
            }
            finite = is_finite(&out)?;
        }
        let mut unstaged = Vec::new();
        for _ in 0..cli.runs {
            let FrameInput { settings, embeddings, frame, control, noise } = &input;
            device.synchronize()?;
            let t = Instant::now();
            let out = models.img2img.run(frame, control, embeddings, settings, noise, &mut hook, &mut ())?;
            unstaged.push(elapsed_ms(device, t)?);
            finite &= is_finite(&out)?;
        }
        if mode != AttentionMode::Off && hook.current_frame_is_anchor() {
            bail!("cross-frame attention did not run as a follower frame");
        }
        let peak = match probe {
            Some(p) => Some(p.peak()?),
            None => None,
        };
        let (graphs, capture_error) = models.img2img.graph_stats();
        if let Some(e) = capture_error {
            println!("CUDA graph capture failed ({} steps): {e}", graphs.failed);
        }
        rows.push(Row {
            label: format!(
                "attention {mode} (anchor frame {:.0} ms; steps eager/captured/replayed {}/{}/{})",
                anchor.total,
                graphs.eager - graphs_before.eager,
                graphs.captured - graphs_before.captured,
                graphs.replayed - graphs_before.replayed
            ),
            times,
            unstaged,
            peak,
            finite,
        });
    }

    println!();
    println!("text encoder (2 prompts, once per prompt change): {:.1} ms", median(&text_ms));
    println!();
    println!(
        "| variant | frame ms (median) | fps | frame ms, no stage syncs | VAE encode + control embedding ms | step ms (median) | steps total ms | VAE decode ms | peak alloc GiB | output finite |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---|");
    for row in &rows {
        let col = |f: &dyn Fn(&FrameTimes) -> f64| median(&row.times.iter().map(f).collect::<Vec<_>>());
        let total = col(&|t| t.total);
        let step = median(&row.times.iter().flat_map(|t| t.steps.iter().copied()).collect::<Vec<_>>());
        println!(
            "| {} | {:.1} | {:.2} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {} | {} |",
            row.label,
            total,
            1e3 / total,
            median(&row.unstaged),
            col(&|t| t.vae_encode),
            step,
            col(&|t| t.steps.iter().sum()),
            col(&|t| t.vae_decode),
            row.peak.map(|p| format!("{:.2}", gib(p))).unwrap_or_else(|| "-".into()),
            if row.finite { "yes" } else { "NO" }
        );
    }

    // The pipeline's own entry point, end to end (needs model files).
    if let (Some(model), Some(cn), false) = (&args.model, &args.controlnet, args.no_pipeline) {
        drop(models);
        let spec = ModelSpec { model: model.clone(), controlnet: cn.clone(), variant: None };
        let mut stylizer = Stylizer::load(&spec, device, dtype)?;
        println!();
        println!("| Stylizer::stylize | frame ms (median) | fps |");
        println!("|---|---:|---:|");
        for mode in [AttentionMode::FirstPrev, AttentionMode::Off] {
            let mut hook = CrossFrameAttention::new(mode, AttentionScope::Up);
            stylizer.stylize(&input.frame, &input.control, &input.settings, &input.noise, &mut hook)?;
            let mut ms = Vec::new();
            for run in 0..cli.warmup.saturating_sub(1) + cli.runs {
                device.synchronize()?;
                let t = Instant::now();
                stylizer.stylize(&input.frame, &input.control, &input.settings, &input.noise, &mut hook)?;
                let e = elapsed_ms(device, t)?;
                if run >= cli.warmup.saturating_sub(1) {
                    ms.push(e);
                }
            }
            let m = median(&ms);
            println!("| attention {mode} | {m:.1} | {:.2} |", 1e3 / m);
        }
    }
    if let Some(p) = probe {
        let (used, total) = p.device_used()?;
        println!("device memory used now (all processes, contexts included): {:.2} / {:.1} GiB", gib(used), gib(total));
    }
    Ok(())
}

/// Median time of `f` in ms (device synchronised around every run).
/// Largest absolute difference of two tensors, in f32.
fn max_abs_diff(a: &Tensor, b: &Tensor) -> candle_core::Result<f32> {
    (a.to_dtype(DType::F32)? - b.to_dtype(DType::F32)?)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()
}

fn time_op(cli: &Cli, device: &Device, mut f: impl FnMut() -> candle_core::Result<Tensor>) -> Result<f64> {
    let mut times = Vec::new();
    for run in 0..cli.warmup + cli.runs {
        device.synchronize()?;
        let t = Instant::now();
        let out = f()?;
        drop(out);
        let ms = elapsed_ms(device, t)?;
        if run >= cli.warmup {
            times.push(ms);
        }
    }
    Ok(median(&times))
}

/// The building blocks of a UNet step at SD1.5 shapes (batch 2 for CFG), one at a time.
/// The same list, in the same order and names, is in tests/reference/bench_ops_torch.py.
fn ops(cli: &Cli, device: &Device, dtype: DType) -> Result<()> {
    let vb = random_vb(dtype, device);
    let randn =
        |shape: &[usize]| -> candle_core::Result<Tensor> { Tensor::randn(0f32, 1f32, shape, device)?.to_dtype(dtype) };
    println!("ops: SD1.5 shapes, batch 2, {}, median of {} after {} warm-up", dtype_name(dtype), cli.runs, cli.warmup);
    println!("| op | shape | ms |");
    println!("|---|---|---:|");
    for (channels, side) in [(320usize, 64usize), (640, 32), (1280, 16)] {
        let x = randn(&[2, channels, side, side])?;
        let norm = sdcrossframe::ops::GroupNorm::new(vb.pp(format!("gn{channels}")), 32, channels, 1e-5)?;
        let ms = time_op(cli, device, || norm.forward_reference(&x))?;
        println!("| group_norm(32), candle-nn | 2x{channels}x{side}x{side} | {ms:.3} |");
        let ms = time_op(cli, device, || candle_core::Module::forward(&norm, &x))?;
        let diff = max_abs_diff(&candle_core::Module::forward(&norm, &x)?, &norm.forward_reference(&x)?)?;
        println!("| group_norm(32), models::group_norm (max diff {diff:.1e}) | 2x{channels}x{side}x{side} | {ms:.3} |");
        let ms = time_op(cli, device, || candle_nn::ops::silu(&x))?;
        println!("| silu | 2x{channels}x{side}x{side} | {ms:.3} |");
        let conv = sdcrossframe::ops::Conv2d::same(vb.pp(format!("conv{channels}")), channels, channels, 3, 1)?;
        // candle's own convolution (im2col + GEMM on CUDA) with the same weights.
        let candle_conv = || x.conv2d(conv.weight(), 1, 1, 1, 1)?.broadcast_add(&conv.bias().reshape(((), 1, 1))?);
        let ms = time_op(cli, device, candle_conv)?;
        println!("| conv3x3 | 2x{channels}x{side}x{side} | {ms:.3} |");
        let ms = time_op(cli, device, || candle_core::Module::forward(&conv, &x))?;
        let diff = max_abs_diff(&candle_core::Module::forward(&conv, &x)?, &candle_conv()?)?;
        println!(
            "| conv3x3, models::conv (cuDNN or im2col, timed per shape, with the `cudnn` feature; max diff {diff:.1e}) | 2x{channels}x{side}x{side} | {ms:.3} |"
        );
        let ms = time_op(cli, device, || norm.forward_silu(&x))?;
        println!("| group_norm(32) + silu, models::group_norm | 2x{channels}x{side}x{side} | {ms:.3} |");
        let tokens = side * side;
        let h = randn(&[2, tokens, channels])?;
        let linear = candle_nn::linear(channels, channels, vb.pp(format!("lin{channels}")))?;
        let ms = time_op(cli, device, || candle_core::Module::forward(&linear, &h))?;
        println!("| linear | 2x{tokens}x{channels} | {ms:.3} |");
        let ln = candle_nn::layer_norm(channels, 1e-5, vb.pp(format!("ln{channels}")))?;
        let ms = time_op(cli, device, || candle_core::Module::forward(&ln, &h))?;
        println!("| layer_norm | 2x{tokens}x{channels} | {ms:.3} |");
        // Self-attention core (8 heads) as the UNet runs it: f32 scores for half types.
        let head_dim = channels / 8;
        for kv_tokens in [tokens, 2 * tokens] {
            let q = randn(&[2, 8, tokens, head_dim])?;
            let k = randn(&[2, 8, kv_tokens, head_dim])?;
            let v = randn(&[2, 8, kv_tokens, head_dim])?;
            let scale = (head_dim as f64).powf(-0.5);
            let ms = time_op(cli, device, || sdcrossframe::ops::unfused_attention(&q, &k, &v, scale))?;
            println!("| attention, f32 scores | 2x8x{tokens}x{kv_tokens}x{head_dim} | {ms:.3} |");
            let half = |q: &Tensor, k: &Tensor, v: &Tensor| -> candle_core::Result<Tensor> {
                let scores = (q * scale)?.matmul(&k.t()?)?;
                candle_nn::ops::softmax_last_dim(&scores)?.matmul(v)
            };
            let ms = time_op(cli, device, || half(&q, &k, &v))?;
            println!("| attention, {} scores | 2x8x{tokens}x{kv_tokens}x{head_dim} | {ms:.3} |", dtype_name(dtype));
        }
    }
    Ok(())
}

/// Fused vs unfused attention at the UNet's shapes (batch 2 = CFG, 8 heads): self-attention at
/// 64x64 latents (4096 tokens, head dim 40) with plain and doubled (cross-frame) keys, the
/// 32x32 and 16x16 levels (head dims 80 and 160), and cross-attention to 77 text tokens.
/// Also prints the largest difference between the two results.
///
/// Measured 2026-11-27 on one H100 80GB HBM3, f16, median of 20 (`--device cuda:0 --dtype f16
/// --warmup 3 --runs 20 attention`): 1x8x4096x4096x40 0.174 ms fused vs 5.82 ms unfused,
/// 2x8x4096x4096x40 0.314 vs 11.6 ms, 2x8x4096x8192x40 0.604 vs 23.1 ms, 2x8x1024x1024x80 0.051
/// vs 0.663 ms, 2x8x256x256x160 0.028 vs 0.072 ms; bf16 within a few percent of f16.
fn attention(cli: &Cli, device: &Device, dtype: DType) -> Result<()> {
    const CASES: [(usize, usize, usize, usize, usize); 9] = [
        (1, 8, 4096, 4096, 40),
        (2, 8, 4096, 4096, 40),
        (2, 8, 4096, 8192, 40),
        (2, 8, 4096, 77, 40),
        (2, 8, 1024, 1024, 80),
        (2, 8, 1024, 2048, 80),
        (2, 8, 256, 256, 160),
        (2, 8, 256, 512, 160),
        (2, 8, 333, 1001, 72),
    ];
    println!(
        "| batch x heads | queries | keys | head dim | fused ms | unfused ms | speed-up | TFLOP/s fused | max abs diff |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for (b, h, n, m, d) in CASES {
        let rand =
            |len: usize| -> Result<Tensor> { Ok(Tensor::randn(0f32, 1., (b, h, len, d), device)?.to_dtype(dtype)?) };
        let (q, k, v) = (rand(n)?, rand(m)?, rand(m)?);
        let scale = (d as f64).powf(-0.5);
        let fused = time_op(cli, device, || fused_attention(&q, &k, &v, scale))?;
        let unfused = time_op(cli, device, || unfused_attention(&q, &k, &v, scale))?;
        let diff = max_abs_diff(&fused_attention(&q, &k, &v, scale)?, &unfused_attention(&q, &k, &v, scale)?)?;
        let tflops = 4.0 * (b * h * n * m * d) as f64 / (fused * 1e-3) / 1e12;
        println!(
            "| {b}x{h} | {n} | {m} | {d} | {fused:.3} | {unfused:.3} | {:.1}x | {tflops:.1} | {diff:.2e} |",
            unfused / fused
        );
    }
    Ok(())
}
