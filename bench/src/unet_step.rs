//! One UNet + ControlNet call at SD1.5 shapes with random weights (the control image embedded
//! on every call, as diffusers does), plain and with the engine's cross-frame attention; and,
//! on CUDA, the same step captured as a graph and replayed.

use std::time::Instant;

use anyhow::{Context, Result, bail};
use candle_core::{DType, Device, Tensor};
use clap::Args;
use sdcrossframe::cross_frame::{AttentionMode, AttentionScope, CrossFrameAttention};
use sdcrossframe::models::attention::NoHook;
use sdcrossframe::models::controlnet::ControlNetModel;
use sdcrossframe::models::sd15;
use sdcrossframe::models::unet::UNet2DConditionModel;
use sdcrossframe::pipeline::{FrameHook, FramePlan, PlainFrame};
use sdcrossframe::scheduler::SchedulerKind;

use crate::Cli;
use crate::gpu_memory::Probe;
use crate::random::random_vb;
use crate::timing::{elapsed_ms, gib, is_finite, median, min, time_op};

/// The timestep every call runs at (its value does not change the cost).
const TIMESTEP: usize = 500;

#[derive(Args, Debug)]
pub struct UnetStepArgs {
    /// Image width in pixels (latents are width/8).
    #[arg(long, default_value_t = 512)]
    width: usize,
    /// Image height in pixels.
    #[arg(long, default_value_t = 512)]
    height: usize,
    /// UNet batch (2 = classifier-free guidance).
    #[arg(long, default_value_t = 2)]
    batch: usize,
    /// Also measure cross-frame attention in every self-attention layer (scope "all").
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

pub fn run(cli: &Cli, args: &UnetStepArgs, device: &Device, dtype: DType, probe: Option<&Probe>) -> Result<()> {
    if !args.width.is_multiple_of(8) || !args.height.is_multiple_of(8) || args.width == 0 || args.height == 0 {
        bail!("--width/--height must be non-zero multiples of 8 (got {}x{})", args.width, args.height);
    }
    let t = Instant::now();
    let unet_config = sd15::unet_config()?;
    let cn_config = sd15::controlnet_config()?;
    let text_width = unet_config.cross_attention_dim.per_block(1, "cross_attention_dim")?[0];
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
    let text = Tensor::randn(0f32, 1f32, (b, 77, text_width), device)?.to_dtype(dtype)?;
    let control = Tensor::rand(0f32, 1f32, (b, cn_config.conditioning_channels, args.height, args.width), device)?
        .to_dtype(dtype)?;

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

    // The engine's own cross-frame attention; each variant's first (warm-up) call is its anchor
    // frame, the timed calls are followers reading the anchor's and the previous call's inputs.
    let plan = FramePlan {
        scheduler: SchedulerKind::Ddim,
        timesteps: vec![TIMESTEP],
        width: args.width,
        height: args.height,
        batches: vec![b],
    };
    let mut variants: Vec<(&str, Box<dyn FrameHook>)> = vec![
        ("plain attention", Box::new(PlainFrame::default())),
        ("first+prev, up blocks", Box::new(CrossFrameAttention::new(AttentionMode::FirstPrev, AttentionScope::Up))),
    ];
    if args.all_scope {
        variants.push((
            "first+prev, all blocks",
            Box::new(CrossFrameAttention::new(AttentionMode::FirstPrev, AttentionScope::All)),
        ));
    }
    let mut rows = Vec::new();
    for (label, mut hook) in variants {
        if let Some(p) = probe {
            p.reset_peak()?;
        }
        let (mut cn_ms, mut unet_ms, mut total_ms) = (Vec::new(), Vec::new(), Vec::new());
        let mut finite = true;
        for run in 0..cli.warmup.max(1) + cli.runs {
            let profiled = args.profiler_range && rows.is_empty() && run + 1 == cli.warmup.max(1) + cli.runs;
            hook.begin_frame(&plan)?;
            hook.begin_step(0, TIMESTEP)?;
            device.synchronize()?;
            if profiled {
                profiler_range(true)?;
            }
            let t0 = Instant::now();
            let residuals = controlnet.forward(&latents, TIMESTEP as f64, &text, &control, 0.7)?;
            let t_cn = elapsed_ms(device, t0)?;
            let t1 = Instant::now();
            let out = unet.forward(&latents, TIMESTEP as f64, &text, Some(residuals), hook.attention_hook())?;
            let t_unet = elapsed_ms(device, t1)?;
            hook.end_frame()?;
            if profiled {
                profiler_range(false)?;
            }
            if run >= cli.warmup.max(1) {
                cn_ms.push(t_cn);
                unet_ms.push(t_unet);
                total_ms.push(t_cn + t_unet);
            }
            if run + 1 == cli.warmup.max(1) + cli.runs {
                finite = is_finite(&out)?;
            }
        }
        let peak = match probe {
            Some(p) => Some(p.peak()?),
            None => None,
        };
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
        println!("first+prev (up blocks) / plain: {:.3}", rows[1].3 / rows[0].3);
    }
    if args.cuda_graph {
        let step = || -> candle_core::Result<Tensor> {
            let residuals = controlnet.forward(&latents, TIMESTEP as f64, &text, &control, 0.7)?;
            unet.forward(&latents, TIMESTEP as f64, &text, Some(residuals), &mut NoHook)
        };
        graph_replay(cli, device, probe, step)?;
    }
    // The steps above embed the control image on every ControlNet call, as diffusers does;
    // the pipeline embeds it once per frame at batch 1, so its steps cost this much less.
    let one_control = control.narrow(0, 0, 1)?;
    let per_call_ms = time_op(cli, device, || controlnet.embed_condition(&control).map(|c| c.tensor().clone()))?;
    let once_ms = time_op(cli, device, || controlnet.embed_condition(&one_control).map(|c| c.tensor().clone()))?;
    println!(
        "control image embedding: {per_call_ms:.2} ms at batch {b} (inside every step above); {once_ms:.2} ms at batch 1, once per frame in the pipeline"
    );
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
fn graph_replay(
    cli: &Cli,
    device: &Device,
    probe: Option<&Probe>,
    step: impl Fn() -> candle_core::Result<Tensor>,
) -> Result<()> {
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
    // The physical memory the graph holds for its activations (its output included).
    let graph_mem = probe.map(|p| p.breakdown().map(|b| b.graphs_used)).transpose()?;

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
    // What an eager step among captured ones costs the graphs (`make_room_for_eager` in
    // step_graphs.rs trims idle graph memory): replays that first map their memory again.
    let mut remap_ms = Vec::new();
    for run in 0..cli.warmup + cli.runs {
        device.synchronize()?;
        sdcrossframe::gpu_memory::trim(device);
        let t = Instant::now();
        graph.launch()?;
        let ms = elapsed_ms(device, t)?;
        if run >= cli.warmup {
            remap_ms.push(ms);
        }
    }
    // `captured` lives in the graph's memory: it holds the last replay's output until freed.
    let diff = crate::timing::max_abs_diff(&captured, &eager)?;
    drop(captured);
    drop(graph);
    println!(
        "CUDA graph, one plain step: eager {:.1} ms, replay {:.1} ms (median; upload cache on for both); replay vs eager output max diff {diff:.1e}",
        median(&eager_ms),
        median(&replay_ms)
    );
    println!(
        "replay right after the graph memory was trimmed (it maps its memory again): {:.2} ms (median), {:+.2} ms",
        median(&remap_ms),
        median(&remap_ms) - median(&replay_ms)
    );
    if let Some(bytes) = graph_mem {
        println!("CUDA graph memory of that step: {:.3} GiB", gib(bytes));
    }
    Ok(())
}

#[cfg(not(feature = "cuda"))]
fn graph_replay(
    _cli: &Cli,
    _device: &Device,
    _probe: Option<&Probe>,
    _step: impl Fn() -> candle_core::Result<Tensor>,
) -> Result<()> {
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
