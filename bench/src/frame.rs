//! Whole img2img frames through the pipeline's own `Img2Img::run` (what the element runs after
//! its cached text embeddings), with the time of each stage, cross-frame first+prev and off.

use std::time::Instant;

use anyhow::{Result, bail};
use candle_core::{DType, Device, Tensor};
use clap::Args;
use sdcrossframe::cross_frame::{AttentionMode, AttentionScope, CrossFrameAttention};
use sdcrossframe::pipeline::{CancelHandle, FrameHook, FrameInputs, FrameSettings, Img2Img, Stage, StageObserver};

use crate::Cli;
use crate::args::{GenerationArgs, ModelArgs};
use crate::gpu_memory::Probe;
use crate::timing::{elapsed_ms, gib, is_finite, median};

#[derive(Args, Debug)]
pub struct FrameArgs {
    #[command(flatten)]
    models: ModelArgs,
    #[command(flatten)]
    generation: GenerationArgs,
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
    img2img: &Img2Img,
    device: &Device,
    inputs: &FrameInputs,
    settings: &FrameSettings,
    hook: &mut dyn FrameHook,
) -> Result<(Tensor, FrameTimes)> {
    device.synchronize()?;
    let start = Instant::now();
    let mut clock = StageClock { device, last: start, times: FrameTimes::default() };
    let image = img2img.run(inputs, settings, hook, &mut clock, &CancelHandle::default())?;
    let mut times = clock.times;
    times.total = elapsed_ms(device, start)?;
    Ok((image, times))
}

pub fn run(cli: &Cli, args: &FrameArgs, device: &Device, dtype: DType, probe: Option<&Probe>) -> Result<()> {
    let t = Instant::now();
    let (stylizer, source) = args.models.load(device, dtype)?;
    let load_ms = elapsed_ms(device, t)?;
    let img2img = stylizer.img2img();
    let f = img2img.vae_scale_factor();
    let (width, height) = (args.generation.width, args.generation.height);
    if width == 0 || height == 0 || !width.is_multiple_of(f) || !height.is_multiple_of(f) {
        bail!("--width/--height must be non-zero multiples of {f} (got {width}x{height})");
    }
    let settings = args.generation.settings();
    let schedule = img2img.schedule(&settings)?;
    let timesteps = &schedule.timesteps;
    let guidance = settings.effective_guidance();
    println!(
        "frame: {source} (loaded in {:.1} s), {}x{}, {} scheduler, {} steps x strength {} = {} denoising steps {:?}, guidance {guidance} (scale {}, UNet batches {:?}), controlnet scale {}",
        load_ms / 1e3,
        width,
        height,
        schedule.kind,
        settings.steps,
        settings.strength,
        timesteps.len(),
        timesteps,
        settings.guidance_scale,
        (0..timesteps.len()).map(|i| guidance.batch(i)).collect::<Vec<_>>(),
        settings.controlnet_scale
    );

    // Text encoder: once per prompt pair (the pipeline caches the embeddings).
    let mut text_ms = Vec::new();
    let mut embeddings = None;
    for run in 0..cli.warmup + cli.runs {
        let t = Instant::now();
        let emb = stylizer.encode_prompts(&settings)?;
        let ms = elapsed_ms(device, t)?;
        if run >= cli.warmup {
            text_ms.push(ms);
        }
        embeddings = Some(emb);
    }
    let embeddings = embeddings.expect("at least one run");

    let (h, w) = (height, width);
    let frame = Tensor::rand(0f32, 1f32, (1, 3, h, w), device)?;
    let control = Tensor::rand(0f32, 1f32, (1, img2img.control_channels(), h, w), device)?;
    let noise = Tensor::randn(0f32, 1f32, img2img.noise_shape(w, h), device)?;
    let (_, c, lh, lw) = img2img.noise_shape(w, h);
    let step_noise = match schedule.step_noise_rows() {
        0 => None,
        rows => Some(Tensor::randn(0f32, 1f32, (rows, c, lh, lw), device)?),
    };
    let inputs = FrameInputs {
        frame: &frame,
        control: &control,
        embeddings: &embeddings,
        noise: &noise,
        step_noise: step_noise.as_ref(),
    };

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
        let (graphs_before, _) = img2img.graph_stats();
        // Frame 0 is the anchor (plain attention, fills the store); the timed frames follow it.
        let (_, anchor) = staged_frame(img2img, device, &inputs, &settings, &mut hook)?;
        let mut times = Vec::new();
        let mut finite = true;
        for run in 0..cli.warmup.saturating_sub(1) + cli.runs {
            let (out, ft) = staged_frame(img2img, device, &inputs, &settings, &mut hook)?;
            if run >= cli.warmup.saturating_sub(1) {
                times.push(ft);
            }
            finite = is_finite(&out)?;
        }
        let mut unstaged = Vec::new();
        for _ in 0..cli.runs {
            device.synchronize()?;
            let t = Instant::now();
            let out = img2img.run(&inputs, &settings, &mut hook, &mut (), &CancelHandle::default())?;
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
        let (graphs, capture_error) = img2img.graph_stats();
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

    let stream_row = if args.generation.stream_batch {
        Some(stream_batch_frames(cli, img2img, device, &inputs, &settings, probe)?)
    } else {
        None
    };

    println!();
    println!(
        "text encoder ({} prompts, once per prompt change): {:.1} ms",
        if settings.uses_guidance() { 2 } else { 1 },
        median(&text_ms)
    );
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

    if let Some((label, ms, unsynced, peak, finite)) = stream_row {
        // Same columns; a frame's stages are spread over several calls, so they are not split.
        // "No stage syncs" here: frames queued back to back, no sync per frame.
        println!(
            "| {label} | {:.1} | {:.2} | {:.1} | - | - | - | - | {} | {} |",
            median(&ms),
            1e3 / median(&ms),
            unsynced,
            peak.map(|p| format!("{:.2}", gib(p))).unwrap_or_else(|| "-".into()),
            if finite { "yes" } else { "NO" }
        );
    }

    if let Some(p) = probe {
        let (used, total) = p.device_used()?;
        println!("device memory used now (all processes, contexts included): {:.2} / {:.1} GiB", gib(used), gib(total));
    }
    Ok(())
}

/// The stream batch in its steady state, first+prev: per incoming frame one encoding, one
/// UNet + ControlNet call over every frame in flight (each at its own step) and the decoding
/// of the frame that finished; timed per incoming frame after the batch is full and its graph
/// captured. Returns the row's label, the frame times, the peak allocation and finiteness.
fn stream_batch_frames(
    cli: &Cli,
    img2img: &Img2Img,
    device: &Device,
    inputs: &FrameInputs,
    settings: &FrameSettings,
    probe: Option<&Probe>,
) -> Result<(String, Vec<f64>, f64, Option<u64>, bool)> {
    use std::collections::VecDeque;
    let mut hook = CrossFrameAttention::new(AttentionMode::FirstPrev, AttentionScope::Up);
    if let Some(p) = probe {
        p.reset_peak()?;
    }
    let (before, _) = img2img.stream_graph_stats();
    let depth = img2img.timesteps(settings)?.len();
    let mut in_flight: VecDeque<sdcrossframe::pipeline::DenoisingFrame> = VecDeque::new();
    let mut times = Vec::new();
    let mut finite = true;
    // Filling, then warm-up calls (eager, captured), then the timed ones.
    let untimed = depth + cli.warmup.max(2);
    for index in 0..untimed + cli.runs * depth.max(1) {
        device.synchronize()?;
        let t = Instant::now();
        let out = stream_call(img2img, &mut hook, &mut in_flight, Some(inputs), settings)?;
        if let Some(out) = out.filter(|_| index + 1 == untimed + cli.runs * depth.max(1)) {
            finite = is_finite(&out)?;
        }
        let ms = elapsed_ms(device, t)?;
        if index >= untimed {
            times.push(ms);
        }
    }
    // The same without a sync per frame: what the GPU sustains when the host keeps it fed
    // (the element waits for the device before each upload).
    let count = cli.runs * depth.max(1);
    device.synchronize()?;
    let t = Instant::now();
    for _ in 0..count {
        stream_call(img2img, &mut hook, &mut in_flight, Some(inputs), settings)?;
    }
    let unsynced = elapsed_ms(device, t)? / count as f64;
    let peak = match probe {
        Some(p) => Some(p.peak()?),
        None => None,
    };
    stream_batch_parity(img2img, device, inputs, settings, depth)?;
    let (after, error) = img2img.stream_graph_stats();
    if let Some(e) = error {
        println!("CUDA graph capture of the stream batch failed: {e}");
    }
    let label = format!(
        "stream batch first+prev ({depth} frames in flight; calls eager/captured/replayed {}/{}/{})",
        after.eager - before.eager,
        after.captured - before.captured,
        after.replayed - before.replayed
    );
    Ok((label, times, unsynced, peak, finite))
}

/// Distinct frames through the stream batch (its captured graph included) and one at a time,
/// first+prev: the largest difference of any frame, printed (f16 on a GPU: rounding, not 0).
fn stream_batch_parity(
    img2img: &Img2Img,
    device: &Device,
    inputs: &FrameInputs,
    settings: &FrameSettings,
    depth: usize,
) -> Result<()> {
    use std::collections::VecDeque;
    let count = 3 * depth + 4;
    let (_, _, h, w) = inputs.frame.dims4()?;
    let frames: Vec<(Tensor, Tensor)> = (0..count)
        .map(|_| -> Result<_> {
            Ok((
                Tensor::rand(0f32, 1f32, (1, 3, h, w), device)?,
                Tensor::rand(0f32, 1f32, (1, img2img.control_channels(), h, w), device)?,
            ))
        })
        .collect::<Result<_>>()?;
    let at = |k: usize| FrameInputs { frame: &frames[k].0, control: &frames[k].1, ..*inputs };
    let mut hook = CrossFrameAttention::new(AttentionMode::FirstPrev, AttentionScope::Up);
    let sequential: Vec<Tensor> = (0..count)
        .map(|k| img2img.run(&at(k), settings, &mut hook, &mut (), &CancelHandle::default()))
        .collect::<Result<_>>()?;
    let mut hook = CrossFrameAttention::new(AttentionMode::FirstPrev, AttentionScope::Up);
    let mut in_flight: VecDeque<sdcrossframe::pipeline::DenoisingFrame> = VecDeque::new();
    let mut streamed = Vec::new();
    for k in 0..count + depth {
        let frame = (k < count).then(|| at(k));
        streamed.extend(stream_call(img2img, &mut hook, &mut in_flight, frame.as_ref(), settings)?);
    }
    let mut worst = 0f32;
    for (a, b) in streamed.iter().zip(&sequential) {
        let d = (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
        worst = worst.max(d);
    }
    println!(
        "stream batch vs one frame at a time, {count} distinct frames, first+prev: {} of {count} frames out, largest pixel difference {worst:.2e}",
        streamed.len()
    );
    Ok(())
}

/// One incoming frame of the stream batch, as the session runs it: the frame (if any) enters,
/// one UNet + ControlNet call advances every frame in flight, and a finished frame is decoded.
fn stream_call(
    img2img: &Img2Img,
    hook: &mut CrossFrameAttention,
    in_flight: &mut std::collections::VecDeque<sdcrossframe::pipeline::DenoisingFrame>,
    inputs: Option<&FrameInputs>,
    settings: &FrameSettings,
) -> Result<Option<Tensor>> {
    if let Some(inputs) = inputs {
        let mut frame = img2img.start_frame(inputs, settings)?;
        hook.begin_frame(frame.plan())?;
        frame.set_anchor(hook.current_frame_is_anchor());
        in_flight.push_back(frame);
    }
    let mut frames: Vec<_> = in_flight.iter_mut().collect();
    img2img.denoise_batch(&mut frames, hook)?;
    // One frame a call at most: every frame in flight is at a different step.
    match in_flight.front().is_some_and(|f| f.is_done()) {
        true => Ok(Some(img2img.decode(in_flight.pop_front().expect("checked"))?)),
        false => Ok(None),
    }
}
