//! `sdcrossframe`: the command-line tool. `stylize` runs the engine over image files,
//! `canny` previews the ControlNet's edge map, `run` runs a GStreamer pipeline file.

mod launch_file;
mod live_stats;
mod run;

use std::collections::HashMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};

use sdcrossframe::canny::{self, CannyParams, ImageView};
use sdcrossframe::cross_frame::{AttentionMode, AttentionScope, StoreLocation};
use sdcrossframe::device::{check_dtype, parse_device, parse_dtype};
use sdcrossframe::frame::RgbFrame;
use sdcrossframe::gpu_memory;
use sdcrossframe::pipeline::{
    FrameSettings, GuidanceMode, LoraSpec, MAX_STEPS, ModelSpec, SizeRequest, Stylizer, load_frame_noise,
};
use sdcrossframe::scheduler::{SchedulerChoice, TimestepIndices};
use sdcrossframe::session::{NoiseMode, SessionConfig, VideoSession};

#[derive(Parser)]
#[command(
    name = "sdcrossframe",
    version,
    about = "Stable Diffusion + ControlNet video restyling with cross-frame attention"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Stylize image files (PNG/JPEG in, PNG out); several files are one video sequence,
    /// kept coherent by cross-frame attention.
    Stylize(Box<StylizeArgs>),
    /// Write the Canny edge map the ControlNet sees, to preview thresholds.
    Canny(CannyArgs),
    /// Run a GStreamer pipeline file (pipelines/*.pipeline) with its variables filled in:
    /// progress for files, latency for live sources, Ctrl-C finishes the output.
    Run(run::RunArgs),
}

#[derive(Args)]
struct StylizeArgs {
    /// Input images, or directories of images (processed in name order).
    #[arg(required = true)]
    images: Vec<PathBuf>,
    /// Output directory (created if missing); each output is named after its input (NAME.png
    /// for NAME.jpg or NAME.png). Inputs that would share an output name, or an output that
    /// would overwrite an input, are refused.
    #[arg(long, short)]
    output: PathBuf,
    /// Stable Diffusion 1.x model: a diffusers-format directory, a Hugging Face repo id, or a
    /// single-file checkpoint (.safetensors in the original layout, as community models ship).
    #[arg(long, default_value = "runwayml/stable-diffusion-v1-5")]
    model: String,
    /// Canny ControlNet: a diffusers-format directory, a Hugging Face repo id, or a single
    /// .safetensors file (e.g. control_v11p_sd15_canny.safetensors).
    #[arg(long, default_value = "lllyasviel/sd-controlnet-canny")]
    controlnet: String,
    /// Weight file variant to load, e.g. fp16 (diffusion_pytorch_model.fp16.safetensors).
    #[arg(long)]
    variant: Option<String>,
    /// A LoRA fused into the UNet (and the text encoder when the file has text-encoder
    /// layers) at load time, FILE[:SCALE] (scale 1 when left out): a .safetensors file in the
    /// kohya or diffusers/PEFT layout, a directory holding one, or a Hugging Face repo id
    /// (e.g. latent-consistency/lcm-lora-sdv1-5). Repeatable; the text after the last ':' is
    /// the scale only when it is a number, otherwise part of the path.
    #[arg(long, value_name = "FILE[:SCALE]")]
    lora: Vec<LoraSpec>,
    /// A VAE replacing the model's: a diffusers directory or repo id whose config.json names
    /// AutoencoderTiny (e.g. madebyollin/taesd, the tiny TAESD) or AutoencoderKL, or a
    /// single-file VAE (e.g. vae-ft-mse-840000-ema-pruned.safetensors).
    #[arg(long, value_name = "DIR|FILE")]
    vae: Option<String>,
    /// The CLIP tokenizer: a directory (vocab.json + merges.txt, or tokenizer.json) or repo id,
    /// replacing the model's. A single-file checkpoint holds none: without this it comes from
    /// the Hugging Face cache (openai/clip-vit-large-patch14 or an SD1.5 pipeline's tokenizer/).
    #[arg(long, value_name = "DIR")]
    tokenizer: Option<String>,
    /// Compute device: cpu, or cuda:N when built with the cuda feature.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Compute dtype: f32, f16 or bf16.
    #[arg(long, default_value = "f32")]
    dtype: String,
    #[arg(long, default_value = "")]
    prompt: String,
    #[arg(long, default_value = "")]
    negative_prompt: String,
    /// Steps of the scheduler's schedule (the frame runs the last steps x strength of them).
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..=MAX_STEPS as i64))]
    steps: u32,
    /// How far the frame is noised before denoising, 0..1 (1 ignores the frame's content).
    #[arg(long, default_value_t = 0.9, value_parser = finite)]
    strength: f64,
    /// Classifier-free guidance scale (1 or less disables guidance, whatever --guidance says).
    #[arg(long, default_value_t = 7.5, value_parser = finite)]
    guidance_scale: f64,
    /// How the negative prompt guides: auto (full when --guidance-scale > 1, else none), none,
    /// full (CFG: 2 UNet evaluations per step), self or initialize (StreamDiffusion's residual
    /// CFG: 1 evaluation per step; lcm only).
    #[arg(long, default_value = "auto")]
    guidance: GuidanceMode,
    /// Denoising scheduler: auto (what the model's scheduler config names: LCMScheduler gives
    /// lcm, anything else ddim), ddim or lcm.
    #[arg(long, default_value = "auto")]
    scheduler: SchedulerChoice,
    /// Explicit timesteps (lcm only): ascending comma-separated indices into the 50-step LCM
    /// schedule (StreamDiffusion's t_index_list), e.g. 32,45; they replace --steps and
    /// --strength.
    #[arg(long)]
    timesteps: Option<TimestepIndices>,
    /// How strongly the Canny edges steer the result.
    #[arg(long, default_value_t = 0.7, value_parser = finite)]
    controlnet_scale: f64,
    /// Seed of the initial noise (ignored with --noise-file).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// A safetensors file holding the initial noise latents (tensor "noise", [1, 4, H/8, W/8])
    /// and, optionally, the LCM step noise (tensor "step_noise", [steps - 1, 4, H/8, W/8], row
    /// k re-noises after step k; without it the step noise comes from --seed).
    #[arg(long)]
    noise_file: Option<PathBuf>,
    /// Use this control image instead of the frame's Canny edges.
    #[arg(long)]
    control: Option<PathBuf>,
    #[arg(long, default_value_t = 50.0, value_parser = finite)]
    canny_low: f64,
    #[arg(long, default_value_t = 100.0, value_parser = finite)]
    canny_high: f64,
    /// Use the L2 gradient magnitude instead of OpenCV's default L1.
    #[arg(long)]
    canny_l2: bool,
    /// Cross-frame attention: off, first, prev or first+prev.
    #[arg(long, default_value = "first+prev")]
    attention: AttentionMode,
    /// Which self-attention layers attend across frames: up (the original) or all.
    #[arg(long, default_value = "up")]
    attention_scope: AttentionScope,
    /// Where the cross-frame store keeps its entries: device, or host (page-locked memory,
    /// copied in and out beside each step: less device memory for some copying).
    #[arg(long, default_value = "device")]
    cross_frame_store: StoreLocation,
    /// Make every Nth frame a new anchor (0: never).
    #[arg(long, default_value_t = 0)]
    anchor_interval: usize,
    /// Mean luma change (0..1) between consecutive frames that counts as a scene cut and
    /// re-anchors (0 disables detection).
    #[arg(long, default_value_t = 0.3, value_parser = finite)]
    scene_cut_threshold: f64,
    /// Initial noise: fixed (the same for every frame) or per-frame.
    #[arg(long, default_value = "fixed")]
    noise: NoiseMode,
    /// Processing width, rounded to a multiple of 8 (0: from --height and the aspect ratio,
    /// or, when both are 0, a short side of 512 keeping the aspect ratio; as the element does).
    #[arg(long, default_value_t = 0)]
    width: usize,
    /// Processing height (0: see --width).
    #[arg(long, default_value_t = 0)]
    height: usize,
    /// Denoise the frames in flight together, each at its own step (one UNet call per frame);
    /// same frames as without, within rounding.
    #[arg(long)]
    stream_batch: bool,
    /// Skip a frame this similar (cosine, 0..1) to the last diffused one, writing the last
    /// output again (0: off; e.g. 0.98).
    #[arg(long, default_value_t = 0.0, value_parser = finite)]
    skip_similarity: f64,
    /// At most this many frames in a row are skipped.
    #[arg(long, default_value_t = 10)]
    max_skip: usize,
}

#[derive(Args)]
struct CannyArgs {
    input: PathBuf,
    output: PathBuf,
    #[arg(long, default_value_t = 50.0, value_parser = finite)]
    low: f64,
    #[arg(long, default_value_t = 100.0, value_parser = finite)]
    high: f64,
    /// Use the L2 gradient magnitude instead of OpenCV's default L1.
    #[arg(long)]
    l2: bool,
}

fn main() -> ExitCode {
    // SAFETY: first thing in main, before tracing, GStreamer or candle start threads.
    unsafe { sdcrossframe::device::pin_cpu_thread_count() };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn,sdcrossframe=info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Stylize(args) => stylize(*args).map(|()| ExitCode::SUCCESS),
        Command::Canny(args) => canny_command(args).map(|()| ExitCode::SUCCESS),
        Command::Run(args) => run::run(args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// A float option's value: NaN and the infinities are refused (no range check catches them).
fn finite(text: &str) -> Result<f64, String> {
    let value: f64 = text.trim().parse().map_err(|e| format!("{text:?} is not a number: {e}"))?;
    if !value.is_finite() {
        return Err(format!("{value} is not a finite number"));
    }
    Ok(value)
}

fn edges_of(frame: &RgbFrame, params: &CannyParams) -> Result<canny::EdgeMap> {
    let view = ImageView::new(&frame.data, frame.width, frame.height, 3, frame.width * 3)?;
    canny::canny(&view, params)
}

fn stylize(args: StylizeArgs) -> Result<()> {
    if !(0.0..=1.0).contains(&args.strength) {
        bail!("--strength {} is outside 0..1", args.strength);
    }
    let inputs = collect_images(&args.images)?;
    let outputs = output_paths(&args.output, &inputs)?;
    let device = parse_device(&args.device)?;
    let dtype = parse_dtype(&args.dtype)?;
    check_dtype(&device, dtype)?;
    let canny_params = CannyParams { low: args.canny_low, high: args.canny_high, l2_gradient: args.canny_l2 };
    canny_params.validate()?;
    let settings = FrameSettings {
        prompt: args.prompt.clone(),
        negative_prompt: args.negative_prompt.clone(),
        steps: args.steps as usize,
        strength: args.strength,
        guidance_scale: args.guidance_scale,
        controlnet_scale: args.controlnet_scale,
        scheduler: args.scheduler,
        timesteps: args.timesteps.clone(),
        guidance: args.guidance,
    };
    // Fail on bad settings and unreadable inputs before the (slow) model load.
    settings.validate()?;
    let first = RgbFrame::load(&inputs[0])?;
    let explicit_control = args.control.as_deref().map(RgbFrame::load).transpose()?;
    let noise_from_file = args.noise_file.as_deref().map(|p| load_frame_noise(p, &device)).transpose()?;
    std::fs::create_dir_all(&args.output)
        .with_context(|| format!("cannot create output directory {}", args.output.display()))?;

    let spec = ModelSpec {
        model: args.model.clone(),
        controlnet: args.controlnet.clone(),
        variant: args.variant.clone(),
        loras: args.lora.clone(),
        vae: args.vae.clone(),
        tokenizer: args.tokenizer.clone(),
    };
    let stylizer = Stylizer::load(&spec, &device, dtype)?;
    stylizer.img2img().timesteps(&settings)?;
    let config = SessionConfig {
        attention: args.attention,
        scope: args.attention_scope,
        store: args.cross_frame_store,
        anchor_interval: args.anchor_interval,
        scene_cut_threshold: args.scene_cut_threshold,
        noise: args.noise,
        seed: args.seed,
        canny: canny_params,
        size: SizeRequest { width: args.width, height: args.height },
        stream_batch: args.stream_batch,
        skip_similarity: args.skip_similarity,
        max_skip: args.max_skip,
        // One stream: no other stream to batch with.
        batch_timeout: None,
    };
    let mut session = VideoSession::new(stylizer, config, settings)?;
    if let Some(noise) = noise_from_file {
        session.set_noise(Some(noise.initial));
        session.set_step_noise(noise.steps);
    }

    let progress = indicatif::ProgressBar::new(inputs.len() as u64).with_style(
        indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} frames  {elapsed} elapsed, {eta} left  {msg}")
            .expect("valid template"),
    );
    // With stream batch a frame comes out steps - 1 frames after it went in: outputs are
    // matched to their input by index.
    let save = |output: sdcrossframe::session::StylizedFrame| -> Result<()> {
        let index = output.index as usize;
        let path = &inputs[index];
        if let Some(reason) = output.anchor_reason.filter(|_| output.index > 0) {
            let line = format!("{}: new cross-frame anchor ({reason})", path.display());
            // A hidden bar (stderr not a terminal) prints nothing.
            if progress.is_hidden() { eprintln!("{line}") } else { progress.println(line) }
        }
        let out_path = &outputs[index];
        output.to_rgb()?.save_png(out_path)?;
        progress.set_message(out_path.display().to_string());
        progress.inc(1);
        Ok(())
    };
    for (index, path) in inputs.iter().enumerate() {
        // The first frame was loaded above to fail early on a bad file.
        let frame = if index == 0 { first.clone() } else { RgbFrame::load(path)? };
        // A size beyond the GPU's kernels or memory is refused before any work; running out of
        // memory names the size and the device's memory.
        let size = session.processing_size(frame.width, frame.height)?;
        let (img2img, device) = (session.stylizer().img2img(), session.stylizer().device());
        gpu_memory::check_frame(img2img, device, size).with_context(|| format!("cannot stylize {}", path.display()))?;
        let outputs = session
            .push_stream(&frame, explicit_control.as_ref())
            .map_err(|e| gpu_memory::explain(e, session.stylizer().img2img(), session.stylizer().device(), size))
            .with_context(|| format!("cannot stylize {}", path.display()))?;
        outputs.into_iter().try_for_each(save)?;
    }
    session.drain_stylized().context("cannot finish the frames in the stream batch")?.into_iter().try_for_each(save)?;
    progress.finish();
    Ok(())
}

/// Each input's output, `dir/NAME.png` (the file name's bytes kept as they are, UTF-8 or
/// not). An error naming the files when two inputs would be written to the same output, or an
/// output would overwrite an input (`dir` is, or holds, an input's folder).
fn output_paths(dir: &Path, inputs: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let outputs: Vec<PathBuf> = inputs
        .iter()
        .map(|input| {
            let mut name = input.file_stem().map(OsString::from).unwrap_or_else(|| "frame".into());
            name.push(".png");
            dir.join(name)
        })
        .collect();
    let mut seen: HashMap<&Path, &Path> = HashMap::new();
    for (input, output) in inputs.iter().zip(&outputs) {
        if let Some(first) = seen.insert(output, input) {
            bail!(
                "inputs {} and {} would both be written to {}: give them different file names, or stylize them \
                 in separate runs with different --output directories",
                first.display(),
                input.display(),
                output.display()
            );
        }
    }
    // An output directory that does not exist yet holds no input.
    if dir.exists() {
        let canonical = |p: &Path| p.canonicalize().with_context(|| format!("cannot resolve {}", p.display()));
        let inputs_resolved: HashMap<PathBuf, &Path> =
            inputs.iter().map(|i| Ok((canonical(i)?, i.as_path()))).collect::<Result<_>>()?;
        let dir_resolved = canonical(dir)?;
        for output in &outputs {
            // An existing output is resolved too: writing follows a symlink to an input.
            let resolved =
                output.canonicalize().unwrap_or_else(|_| dir_resolved.join(output.file_name().expect("named above")));
            if let Some(input) = inputs_resolved.get(&resolved) {
                bail!(
                    "the output {} would overwrite the input {}: choose another --output directory",
                    output.display(),
                    input.display()
                );
            }
        }
    }
    Ok(outputs)
}

fn canny_command(args: CannyArgs) -> Result<()> {
    let params = CannyParams { low: args.low, high: args.high, l2_gradient: args.l2 };
    params.validate()?;
    let frame = RgbFrame::load(&args.input)?;
    let edges = edges_of(&frame, &params)?;
    image::save_buffer(&args.output, &edges.data, edges.width as u32, edges.height as u32, image::ExtendedColorType::L8)
        .with_context(|| format!("cannot write {}", args.output.display()))
}

/// Collects a sequence of image paths: files as given, directories expanded to their
/// PNG/JPEG files in name order.
fn collect_images(inputs: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for input in inputs {
        if input.is_dir() {
            let mut files: Vec<PathBuf> = std::fs::read_dir(input)
                .with_context(|| format!("cannot list {}", input.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| {
                    p.extension()
                        .and_then(|e| e.to_str())
                        .is_some_and(|e| matches!(e.to_ascii_lowercase().as_str(), "png" | "jpg" | "jpeg"))
                })
                .collect();
            files.sort();
            if files.is_empty() {
                bail!("directory {} holds no PNG or JPEG images", input.display());
            }
            out.extend(files);
        } else if input.is_file() {
            out.push(input.clone());
        } else {
            bail!("input image {} does not exist", input.display());
        }
    }
    Ok(out)
}
