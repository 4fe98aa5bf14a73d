//! The `sdcrossframe` command on the tiny model: it reproduces diffusers' image from the same
//! noise file, and bad input gets an error naming the file and the problem, never a panic.

use std::path::{Path, PathBuf};

/// Writes the tiny models as single files (shared with the engine's tests).
#[allow(dead_code)]
#[path = "../../tests/common/single_file.rs"]
mod single_file;

const BASE_PROMPT: &str = "a beautiful woman with red hair";
const BASE_NEGATIVE: &str = "longbody, lowres, bad anatomy, bad hands, missing fingers, extra digit, fewer digits, cropped, worst quality, low quality";

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
}

fn img2img_dir() -> PathBuf {
    fixtures().join("reference/img2img")
}

fn cli(args: &[&str]) -> (bool, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_sdcrossframe")).args(args).output().unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
}

fn tiny_args() -> Vec<String> {
    vec![
        "--model".into(),
        fixtures().join("tiny-sd").display().to_string(),
        "--controlnet".into(),
        fixtures().join("tiny-controlnet").display().to_string(),
    ]
}

/// The fixtures' `base` img2img case through `sdcrossframe stylize` (with `--vae` when
/// given); returns the output PNG's pixels, or the error text.
fn stylize_base_case(tag: &str, vae: Option<&Path>) -> Result<image::RgbImage, String> {
    stylize_base_case_with(tag, &fixtures().join("tiny-sd"), vae, &[])
}

/// [`stylize_base_case`] with another `--model` and more arguments.
fn stylize_base_case_with(
    tag: &str,
    model: &Path,
    vae: Option<&Path>,
    extra: &[&std::ffi::OsStr],
) -> Result<image::RgbImage, String> {
    let out = std::env::temp_dir().join(format!("sdcrossframe-cli-{tag}-{}", std::process::id()));
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_sdcrossframe"));
    command
        .args(["stylize"])
        .arg(img2img_dir().join("frame_0.png"))
        .arg("--output")
        .arg(&out)
        .arg("--model")
        .arg(model)
        .args(extra)
        .arg("--controlnet")
        .arg(fixtures().join("tiny-controlnet"))
        .args(["--prompt", BASE_PROMPT, "--negative-prompt", BASE_NEGATIVE])
        .args(["--steps", "20", "--strength", "0.9", "--guidance-scale", "7.5", "--controlnet-scale", "0.7"])
        .args(["--width", "96", "--height", "64"])
        .arg("--control")
        .arg(img2img_dir().join("control_0.png"))
        .arg("--noise-file")
        .arg(img2img_dir().join("noise.safetensors"));
    if let Some(vae) = vae {
        command.arg("--vae").arg(vae);
    }
    let output = command.output().unwrap();
    let result = if output.status.success() {
        Ok(image::open(out.join("frame_0.png")).unwrap().to_rgb8())
    } else {
        Err(String::from_utf8_lossy(&output.stderr).into_owned())
    };
    std::fs::remove_dir_all(&out).ok();
    result
}

/// Largest difference in 8-bit levels between our PNG and diffusers'.
fn worst_level_difference(ours: &image::RgbImage, reference: &Path) -> u8 {
    let theirs = image::open(reference).unwrap().to_rgb8();
    assert_eq!(ours.dimensions(), theirs.dimensions());
    ours.as_raw().iter().zip(theirs.as_raw()).map(|(a, b)| a.abs_diff(*b)).max().unwrap()
}

#[test]
fn cli_stylize_reproduces_the_diffusers_image_from_the_same_noise_file() {
    let ours = stylize_base_case("base", None).unwrap();
    let worst = worst_level_difference(&ours, &img2img_dir().join("base.png"));
    // Both are rounded from floats that agree within 1e-3, so at most one level apart.
    assert!(worst <= 1, "CLI output differs from diffusers' PNG by {worst} levels");
}

#[test]
fn cli_vae_option_reproduces_the_diffusers_image_with_the_tiny_vae() {
    let ours = stylize_base_case("taesd", Some(&fixtures().join("tiny-taesd"))).unwrap();
    let worst = worst_level_difference(&ours, &fixtures().join("reference/taesd/base.png"));
    assert!(worst <= 1, "CLI output with --vae differs from diffusers' PNG by {worst} levels");
    let err = stylize_base_case("badvae", Some(Path::new("/nonexistent/taesd"))).unwrap_err();
    assert!(err.contains("cannot load the VAE /nonexistent/taesd") && err.contains("does not exist"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

/// `--model` takes a single-file checkpoint (the tiny model in the original layout, written
/// from tests/fixtures/single-file/layout.json) with `--tokenizer`, and refuses a pickle.
#[test]
fn cli_model_takes_a_single_file_checkpoint() {
    let dir = std::env::temp_dir().join(format!("sdcrossframe-cli-checkpoint-files-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let checkpoint = single_file::write_layout("checkpoint", &dir, &Default::default());
    let tokenizer = fixtures().join("tiny-sd/tokenizer");
    let ours =
        stylize_base_case_with("single", &checkpoint, None, &["--tokenizer".as_ref(), tokenizer.as_os_str()]).unwrap();
    let worst = worst_level_difference(&ours, &img2img_dir().join("base.png"));
    assert!(worst <= 1, "CLI output from the single file differs from diffusers' PNG by {worst} levels");
    let pickle = dir.join("model.ckpt");
    std::fs::write(&pickle, b"\x80\x02").unwrap();
    let err = stylize_base_case_with("pickle", &pickle, None, &[]).unwrap_err();
    assert!(
        err.contains(&pickle.display().to_string()) && err.contains("pickle") && err.contains("safetensors"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn unreadable_image_is_named() {
    let bad = fixtures().join("tiny-sd/model_index.json");
    let out = std::env::temp_dir().join(format!("sdcrossframe-badimg-{}", std::process::id()));
    let mut args = vec!["stylize".to_string(), bad.display().to_string(), "--output".into(), out.display().to_string()];
    args.extend(tiny_args());
    let (ok, stderr) = cli(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(!ok);
    assert!(stderr.contains("model_index.json") && stderr.contains("image"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn zero_denoising_steps_is_an_error_that_says_so() {
    let out = std::env::temp_dir().join(format!("sdcrossframe-zerosteps-{}", std::process::id()));
    let frame = img2img_dir().join("frame_0.png");
    let mut args = vec![
        "stylize".to_string(),
        frame.display().to_string(),
        "--output".into(),
        out.display().to_string(),
        "--steps".into(),
        "3".into(),
        "--strength".into(),
        "0.2".into(),
    ];
    args.extend(tiny_args());
    let (ok, stderr) = cli(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(!ok);
    assert!(stderr.contains("0 denoising steps"), "{stderr}");
    std::fs::remove_dir_all(&out).ok();
}

/// `--scheduler lcm` with a noise file holding `noise` and `step_noise` reproduces diffusers'
/// LCM frame (tests/fixtures/reference/lcm/lcm2: 4 steps x strength 0.5, guidance 1).
#[test]
fn cli_lcm_reproduces_the_diffusers_frame_from_the_noise_file_with_step_noise() {
    let out = std::env::temp_dir().join(format!("sdcrossframe-cli-lcm-{}", std::process::id()));
    let lcm = fixtures().join("reference/lcm");
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_sdcrossframe"))
        .args(["stylize"])
        .arg(img2img_dir().join("frame_0.png"))
        .arg("--output")
        .arg(&out)
        .args(tiny_args())
        .args(["--prompt", BASE_PROMPT, "--negative-prompt", BASE_NEGATIVE])
        .args(["--scheduler", "lcm", "--steps", "4", "--strength", "0.5", "--guidance-scale", "1"])
        .args(["--controlnet-scale", "0.7", "--width", "96", "--height", "64"])
        .arg("--control")
        .arg(img2img_dir().join("control_0.png"))
        .arg("--noise-file")
        .arg(lcm.join("noise.safetensors"))
        .status()
        .unwrap();
    assert!(status.success());
    let ours = image::open(out.join("frame_0.png")).unwrap().to_rgb8();
    let tensors = candle_core::safetensors::load(lcm.join("lcm2.safetensors"), &candle_core::Device::Cpu).unwrap();
    // [1, 3, H, W] in [0, 1] -> HWC bytes.
    let theirs: Vec<u8> = (tensors["image"].squeeze(0).unwrap().permute((1, 2, 0)).unwrap() * 255.0)
        .unwrap()
        .round()
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .into_iter()
        .map(|v| v as u8)
        .collect();
    assert_eq!(ours.as_raw().len(), theirs.len());
    let worst = ours.as_raw().iter().zip(&theirs).map(|(a, b)| a.abs_diff(*b)).max().unwrap();
    assert!(worst <= 1, "CLI LCM output differs from diffusers' frame by {worst} levels");
    std::fs::remove_dir_all(&out).ok();
}

#[test]
fn bad_scheduler_timesteps_and_guidance_are_errors_naming_the_value() {
    let out = std::env::temp_dir().join(format!("sdcrossframe-badsched-{}", std::process::id()));
    let frame = img2img_dir().join("frame_0.png");
    for (extra, needle) in [
        (&["--scheduler", "euler"][..], "unknown scheduler \"euler\""),
        (&["--guidance", "half"][..], "unknown guidance mode \"half\""),
        (&["--scheduler", "lcm", "--timesteps", "45,32"][..], "ascending"),
        (&["--scheduler", "lcm", "--timesteps", "32,x"][..], "\"x\" is not a timestep index"),
        (&["--scheduler", "lcm", "--timesteps", "32,50"][..], "index 50 is out of range"),
        (&["--timesteps", "32,45"][..], "explicit timesteps need the lcm scheduler"),
        (&["--guidance", "self"][..], "needs the lcm scheduler"),
    ] {
        let mut args =
            vec!["stylize".to_string(), frame.display().to_string(), "--output".into(), out.display().to_string()];
        args.extend(tiny_args());
        args.extend(extra.iter().map(|s| s.to_string()));
        let (ok, stderr) = cli(&args.iter().map(String::as_str).collect::<Vec<_>>());
        assert!(!ok, "{extra:?}");
        assert!(stderr.contains(needle), "{extra:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
    std::fs::remove_dir_all(&out).ok();
}

/// `--lora FILE[:SCALE]`: the LoRA changes the picture; a bad entry or file is an error naming it.
#[test]
fn lora_option_changes_the_output_and_bad_entries_are_named() {
    let out = std::env::temp_dir().join(format!("sdcrossframe-cli-lora-{}", std::process::id()));
    let frame = img2img_dir().join("frame_0.png");
    let run = |name: &str, extra: &[String]| {
        let dir = out.join(name);
        let mut args = vec![
            "stylize".to_string(),
            frame.display().to_string(),
            "--output".into(),
            dir.display().to_string(),
            "--prompt".into(),
            BASE_PROMPT.into(),
            "--steps".into(),
            "2".into(),
            "--strength".into(),
            "1.0".into(),
            "--width".into(),
            "96".into(),
            "--height".into(),
            "64".into(),
        ];
        args.extend(tiny_args());
        args.extend(extra.iter().cloned());
        let (ok, stderr) = cli(&args.iter().map(String::as_str).collect::<Vec<_>>());
        (ok, stderr, dir.join("frame_0.png"))
    };
    let lora = fixtures().join("lora/kohya.safetensors").display().to_string();
    let (ok, stderr, plain) = run("plain", &[]);
    assert!(ok, "{stderr}");
    let (ok, stderr, with_lora) = run("lora", &["--lora".into(), format!("{lora}:0.5")]);
    assert!(ok, "{stderr}");
    let a = image::open(plain).unwrap().to_rgb8();
    let b = image::open(with_lora).unwrap().to_rgb8();
    let mean = a.as_raw().iter().zip(b.as_raw()).map(|(x, y)| x.abs_diff(*y) as f64).sum::<f64>() / a.len() as f64;
    assert!(mean > 1.0, "the LoRA changed the picture by only {mean} levels on average");

    let (ok, stderr, _) = run("bad-scale", &["--lora".into(), format!("{lora}:")]);
    assert!(!ok && stderr.contains(&format!("'{lora}:'")) && stderr.contains("no scale"), "{stderr}");
    let missing = out.join("absent.safetensors").display().to_string();
    let (ok, stderr, _) = run("missing", &["--lora".into(), lora.clone(), "--lora".into(), missing.clone()]);
    assert!(!ok && stderr.contains(&missing) && stderr.contains("does not exist"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    std::fs::remove_dir_all(&out).ok();
}

fn pipeline_files() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../pipelines");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "pipeline"))
        .collect();
    files.sort();
    files
}

/// Every file in pipelines/ names each of its `${VAR}`s in the header `--describe` prints
/// (so a user can learn what to pass). Building each launch line with the real element is
/// plugins/tests/e2e.rs's `every_pipeline_file_builds`.
#[test]
fn every_pipeline_file_describes_each_of_its_variables() {
    let files = pipeline_files();
    assert!(files.iter().any(|f| f.ends_with("webcam-live.pipeline")), "{files:?}");
    for file in files {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_sdcrossframe"))
            .arg("run")
            .arg(&file)
            .arg("--describe")
            .output()
            .unwrap();
        assert!(out.status.success(), "{}: {}", file.display(), String::from_utf8_lossy(&out.stderr));
        let header = String::from_utf8(out.stdout).unwrap();
        let text = std::fs::read_to_string(&file).unwrap();
        let body: String = text.lines().filter(|l| !l.trim_start().starts_with('#')).collect::<Vec<_>>().join("\n");
        let names: Vec<&str> = body.split("${").skip(1).map(|rest| rest.split(['}', ':']).next().unwrap()).collect();
        assert!(!names.is_empty(), "{}", file.display());
        for name in names {
            let documented = header.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).any(|word| word == name);
            assert!(documented, "{}: variable {name} is not in the header:\n{header}", file.display());
        }
    }
}

/// The live pipeline says what it needs and fills in the live defaults.
#[test]
fn webcam_live_pipeline_describes_its_needs_and_fills_in_the_live_defaults() {
    let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("../pipelines/webcam-live.pipeline");
    let run = |extra: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_sdcrossframe"))
            .arg("run")
            .arg(&file)
            .args(extra)
            .output()
            .unwrap();
        assert!(out.status.success(), "{extra:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    };
    let header = run(&["--describe"]);
    for need in [
        "GPU",
        "runwayml/stable-diffusion-v1-5",
        "lllyasviel/sd-controlnet-canny",
        "latent-consistency/lcm-lora-sdv1-5",
        "madebyollin/taesd",
    ] {
        assert!(header.contains(need), "the header does not mention {need}:\n{header}");
    }
    let line = run(&["--print"]);
    for setting in [
        "v4l2src device=/dev/video0",
        "queue leaky=downstream max-size-buffers=1",
        "lora=\"latent-consistency/lcm-lora-sdv1-5\"",
        "vae=\"madebyollin/taesd\"",
        "device=cuda:0 dtype=f16",
        "scheduler=lcm steps=8 strength=0.5",
        "guidance=none",
        "attention=first+prev",
        "stream-batch=true",
        "skip-similarity=0 max-skip=10",
        "qos=true latency=100",
        "! queue ! videoconvert ! autovideosink",
    ] {
        assert!(line.contains(setting), "{setting:?} is not in {line}");
    }
    assert!(!line.contains("${"), "{line}");
    let line = run(&["--print", "SKIP_SIMILARITY=0.98", "stream_batch=false", "PROMPT=a \"red\" house"]);
    assert!(line.contains("skip-similarity=0.98 max-skip=10"), "{line}");
    assert!(line.contains("stream-batch=false"), "{line}");
    assert!(line.contains(r#"prompt="a \"red\" house""#), "{line}");
}

/// A scratch directory for one test, emptied first.
fn scratch(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("sdcrossframe-cli-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// `sdcrossframe stylize` with the tiny model at 96 wide, 2 steps, and `args` (inputs,
/// --output, more options): success and stderr.
fn stylize_tiny(args: &[&std::ffi::OsStr]) -> (bool, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_sdcrossframe"))
        .arg("stylize")
        .args(args)
        .args(tiny_args())
        .args(["--steps", "2", "--strength", "1.0", "--width", "96"])
        .output()
        .unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// Two inputs with the same name from different folders, or an --output that is an input's
/// folder, are refused before anything is written; the inputs stay as they were.
#[test]
fn stylize_never_writes_two_inputs_to_one_output_nor_over_an_input() {
    let dir = scratch("collide");
    let frame = img2img_dir().join("frame_0.png");
    let original = std::fs::read(&frame).unwrap();
    for sub in ["a", "b"] {
        std::fs::create_dir_all(dir.join(sub)).unwrap();
        std::fs::copy(&frame, dir.join(sub).join("frame.png")).unwrap();
    }
    let (a, b, out) = (dir.join("a"), dir.join("b"), dir.join("out"));
    let (ok, stderr) = stylize_tiny(&[a.as_os_str(), b.as_os_str(), "--output".as_ref(), out.as_os_str()]);
    assert!(!ok, "{stderr}");
    for named in [a.join("frame.png"), b.join("frame.png"), out.join("frame.png")] {
        assert!(stderr.contains(&named.display().to_string()), "{} is not named: {stderr}", named.display());
    }
    assert!(stderr.contains("would both be written"), "{stderr}");
    assert!(!out.join("frame.png").exists());
    // The same name with another extension is the same output.
    std::fs::copy(&frame, a.join("frame.jpg")).unwrap();
    let (ok, stderr) = stylize_tiny(&[a.as_os_str(), "--output".as_ref(), out.as_os_str()]);
    assert!(!ok && stderr.contains("would both be written"), "{stderr}");
    std::fs::remove_file(a.join("frame.jpg")).unwrap();

    // The input folder as --output, directly or by another path to it.
    let other_path = dir.join("out/../a");
    std::fs::create_dir_all(&out).unwrap();
    for output in [&a, &other_path] {
        let (ok, stderr) = stylize_tiny(&[a.as_os_str(), "--output".as_ref(), output.as_os_str()]);
        assert!(!ok, "{stderr}");
        assert!(
            stderr.contains("would overwrite the input") && stderr.contains(&a.join("frame.png").display().to_string()),
            "{stderr}"
        );
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
    // An output that is a symlink to an input (a previous run's link farm).
    std::os::unix::fs::symlink(a.join("frame.png"), out.join("frame.png")).unwrap();
    let (ok, stderr) = stylize_tiny(&[a.as_os_str(), "--output".as_ref(), out.as_os_str()]);
    assert!(!ok && stderr.contains("would overwrite the input"), "{stderr}");
    assert_eq!(std::fs::read(a.join("frame.png")).unwrap(), original, "an input was overwritten");
    std::fs::remove_dir_all(&dir).ok();
}

/// File names that are not UTF-8 keep their bytes: two of them that differ only in invalid
/// bytes give two outputs, not one (a lossy conversion makes both "f\u{FFFD}.png").
#[cfg(unix)]
#[test]
fn stylize_keeps_non_utf8_file_names_apart() {
    use std::os::unix::ffi::OsStrExt;
    let dir = scratch("nonutf8");
    let (input, out) = (dir.join("in"), dir.join("out"));
    std::fs::create_dir_all(&input).unwrap();
    let names = [std::ffi::OsStr::from_bytes(b"f\xff.png"), std::ffi::OsStr::from_bytes(b"f\xfe.png")];
    for name in names {
        std::fs::copy(img2img_dir().join("frame_0.png"), input.join(name)).unwrap();
    }
    let (ok, stderr) = stylize_tiny(&[input.as_os_str(), "--output".as_ref(), out.as_os_str()]);
    assert!(ok, "{stderr}");
    let mut written: Vec<_> = std::fs::read_dir(&out).unwrap().map(|e| e.unwrap().file_name()).collect();
    written.sort();
    let mut expected: Vec<std::ffi::OsString> = names.iter().map(|n| n.to_os_string()).collect();
    expected.sort();
    assert_eq!(written, expected);
    std::fs::remove_dir_all(&dir).ok();
}

/// NaN and the infinities are refused for every float option, naming the option and the value.
#[test]
fn float_options_refuse_nan_and_infinities() {
    let dir = scratch("nan");
    let frame = img2img_dir().join("frame_0.png");
    let out = dir.join("out");
    for option in [
        "--strength",
        "--guidance-scale",
        "--controlnet-scale",
        "--canny-low",
        "--canny-high",
        "--scene-cut-threshold",
        "--skip-similarity",
    ] {
        for value in ["nan", "NaN", "inf", "-inf", "infinity"] {
            let setting = format!("{option}={value}");
            let (ok, stderr) =
                stylize_tiny(&[frame.as_os_str(), "--output".as_ref(), out.as_os_str(), setting.as_ref()]);
            assert!(!ok, "{setting} was accepted: {stderr}");
            assert!(stderr.contains(option) && stderr.contains("is not a finite number"), "{setting}: {stderr}");
        }
    }
    let edges = dir.join("edges.png");
    for option in ["--low=nan", "--high=inf"] {
        let (ok, stderr) = cli(&["canny", &frame.display().to_string(), &edges.display().to_string(), option]);
        assert!(!ok && stderr.contains("is not a finite number"), "{option}: {stderr}");
    }
    assert!(!out.exists() && !edges.exists());
    std::fs::remove_dir_all(&dir).ok();
}

/// `--steps` takes the engine's maximum (and runs it: 500 steps x strength 0.004 is 2 steps of
/// SD1.5's schedule, which 1000 steps could not give), and refuses one more.
#[test]
fn steps_up_to_the_engine_maximum_run_and_more_are_refused() {
    let dir = scratch("maxsteps");
    let frame = img2img_dir().join("frame_0.png");
    let out = dir.join("out");
    let run = |steps: &str| {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_sdcrossframe"))
            .arg("stylize")
            .arg(&frame)
            .arg("--output")
            .arg(&out)
            .args(tiny_args())
            .args(["--steps", steps, "--strength", "0.004", "--width", "96"])
            .output()
            .unwrap();
        (output.status.success(), String::from_utf8_lossy(&output.stderr).into_owned())
    };
    let (ok, stderr) = run("500");
    assert!(ok, "{stderr}");
    assert!(out.join("frame_0.png").exists());
    let (ok, stderr) = run("501");
    assert!(!ok && stderr.contains("501") && stderr.contains("1..=500"), "{stderr}");
    std::fs::remove_dir_all(&dir).ok();
}

/// A frame of another size re-anchors because its size changed, and says so (not "scene
/// cut"); a real cut at the same size is still a scene cut.
#[test]
fn a_size_change_is_not_called_a_scene_cut() {
    let dir = scratch("sizecut");
    let (input, out) = (dir.join("in"), dir.join("out"));
    std::fs::create_dir_all(&input).unwrap();
    std::fs::copy(img2img_dir().join("frame_0.png"), input.join("0.png")).unwrap();
    // 96x48 (not 96x64): another processing size at --width 96.
    let other = image::open(img2img_dir().join("frame_4.png")).unwrap().resize_exact(96, 48, image::imageops::Triangle);
    other.save(input.join("1.png")).unwrap();
    let mut inverted = other.clone();
    inverted.invert();
    inverted.save(input.join("2.png")).unwrap();
    let (ok, stderr) = stylize_tiny(&[
        input.as_os_str(),
        "--output".as_ref(),
        out.as_os_str(),
        "--scene-cut-threshold".as_ref(),
        "0.01".as_ref(),
    ]);
    assert!(ok, "{stderr}");
    let anchors: Vec<&str> = stderr.lines().filter(|l| l.contains("new cross-frame anchor")).collect();
    assert_eq!(anchors.len(), 2, "{stderr}");
    assert!(anchors[0].contains("1.png") && anchors[0].contains("(frame size or schedule changed)"), "{stderr}");
    assert!(anchors[1].contains("2.png") && anchors[1].contains("(scene cut)"), "{stderr}");
    std::fs::remove_dir_all(&dir).ok();
}

/// Paths that are not plain ASCII (issue 16, part 6): a model and ControlNet under unicode
/// directory names and an input folder whose name is not UTF-8 work; a `--model` that is not
/// UTF-8 is a clear error (the option is text), never a panic.
#[cfg(unix)]
#[test]
fn unicode_and_non_utf8_paths() {
    use std::os::unix::ffi::OsStrExt;
    fn copy_dir(from: &Path, to: &Path) {
        std::fs::create_dir_all(to).unwrap();
        for entry in std::fs::read_dir(from).unwrap() {
            let entry = entry.unwrap();
            if entry.file_type().unwrap().is_dir() {
                copy_dir(&entry.path(), &to.join(entry.file_name()));
            } else {
                std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
            }
        }
    }
    let dir = scratch("unicode");
    let model = dir.join("モデル ü ☃");
    copy_dir(&fixtures().join("tiny-sd"), &model);
    let input = dir.join(std::ffi::OsStr::from_bytes(b"in\xff\xfe"));
    std::fs::create_dir_all(&input).unwrap();
    std::fs::copy(img2img_dir().join("frame_0.png"), input.join("frame.png")).unwrap();
    let out = dir.join("out ✓");
    let run = |model: &std::ffi::OsStr| {
        std::process::Command::new(env!("CARGO_BIN_EXE_sdcrossframe"))
            .arg("stylize")
            .arg(&input)
            .arg("--output")
            .arg(&out)
            .arg("--model")
            .arg(model)
            .arg("--controlnet")
            .arg(fixtures().join("tiny-controlnet"))
            .args(["--steps", "2", "--strength", "1.0", "--width", "96"])
            .output()
            .unwrap()
    };
    let result = run(model.as_os_str());
    let stderr = String::from_utf8_lossy(&result.stderr);
    assert!(result.status.success(), "{stderr}");
    assert!(out.join("frame.png").is_file(), "{stderr}");
    let result = run(std::ffi::OsStr::from_bytes(b"/tmp/model\xff"));
    let stderr = String::from_utf8_lossy(&result.stderr);
    assert_eq!(result.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("invalid UTF-8"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    std::fs::remove_dir_all(&dir).ok();
}

/// `sdcrossframe run` with the plugin built next to the binary (`cargo build --workspace`).
fn runner() -> std::process::Command {
    let binary = Path::new(env!("CARGO_BIN_EXE_sdcrossframe"));
    let dir = binary.parent().unwrap();
    assert!(
        dir.join("libgstsdcrossframe.so").exists(),
        "no plugin in {}: `cargo test` does not build the plugin library, run `cargo build --workspace` first",
        dir.display()
    );
    let mut command = std::process::Command::new(binary);
    command.env("GST_PLUGIN_PATH", dir);
    command
}

/// Two elements in one live pipeline (a 10 fps test pattern through a tee, a leaky queue
/// before each element, the tiny model): the status lines name each element with its rate
/// and latency under a total line, and the summary has a line per element and the total.
#[test]
fn run_shows_each_stream_and_the_total_for_several_elements() {
    let dir = scratch("two-streams");
    let file = dir.join("two-streams.pipeline");
    let branch = |name: &str, prompt: &str| {
        format!(
            "t. ! queue leaky=downstream max-size-buffers=1 max-size-bytes=0 max-size-time=0\n\
             ! sdcrossframe name={name} model=\"${{MODEL}}\" controlnet=\"${{CONTROLNET}}\" width=64 height=48 steps=2\n\
             prompt=\"{prompt}\" latency=2000 ! queue ! fakesink sync=true\n"
        )
    };
    std::fs::write(
        &file,
        format!(
            "# two streams from one live test pattern\n\
             #   MODEL, CONTROLNET  the tiny models\n\
             videotestsrc is-live=true num-buffers=50 pattern=ball ! video/x-raw,width=64,height=48,framerate=10/1 ! tee name=t\n{}{}",
            branch("left", "a red house"),
            branch("right", "a blue house")
        ),
    )
    .unwrap();
    let output = runner()
        .arg("run")
        .arg(&file)
        .args(["--status-interval", "0.5"])
        .arg(format!("MODEL={}", fixtures().join("tiny-sd").display()))
        .arg(format!("CONTROLNET={}", fixtures().join("tiny-controlnet").display()))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    // A status block once both have frames out: "N frames after T s: total F fps  latency
    // mean M ms, max X ms  dropped D", then "  left: ..." and "  right: ..." with their own.
    let block = lines.windows(3).find(|w| {
        w[0].contains(" frames after ")
            && w[0].contains(": total ")
            && w[1].starts_with("  left: ")
            && w[2].starts_with("  right: ")
            && w[1..].iter().all(|l| l.contains(" fps  latency ") && l.contains("dropped"))
    });
    let block = block.unwrap_or_else(|| panic!("no status block with both streams' rate and latency:\n{stderr}"));
    assert!(block[0].contains(" fps  latency mean ") && block[0].contains(" ms  dropped "), "{}", block[0]);
    // The summary: one line per element by name, then the total of both.
    let count = |name: &str| -> u64 {
        let line = lines
            .iter()
            .find(|l| l.starts_with(&format!("{name}: ")) && l.contains(" frames in "))
            .unwrap_or_else(|| panic!("no summary line for {name}:\n{stderr}"));
        line[name.len() + 2..].split(' ').next().unwrap().parse().unwrap()
    };
    let (left, right) = (count("left"), count("right"));
    assert!(left > 0 && right > 0, "{stderr}");
    let total = format!("total: {} frames of 2 streams in ", left + right);
    assert!(lines.iter().any(|l| l.starts_with(&total) && l.contains("latency mean")), "{total:?} not in:\n{stderr}");
    std::fs::remove_dir_all(&dir).ok();
}
