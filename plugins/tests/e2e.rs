//! End to end: a real clip excerpt through decodebin ! videoconvert ! sdcrossframe (tiny
//! model) ! videoconvert ! x264enc ! mp4mux ! filesink, in process and through the
//! `sdcrossframe run` runner, with the result decoded again and checked.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use gst::prelude::*;
use gst_video::prelude::*;

/// 2 s of the portrait clip: 50 frames of 270x480 (not a multiple of 8 wide).
const CLIP: &str = "media/portrait-270x480-2s.mp4";
const CLIP_FRAMES: usize = 50;
const CLIP_SIZE: (usize, usize) = (270, 480);

/// Small processing size and few steps keep the tiny model fast on a CI core.
fn element_options() -> String {
    format!(
        "model=\"{}\" controlnet=\"{}\" width=48 height=80 steps=4 prompt=\"a red house\"",
        common::fixture("tiny-sd").display(),
        common::fixture("tiny-controlnet").display()
    )
}

struct Decoded {
    width: usize,
    height: usize,
    frames: Vec<Vec<u8>>,
}

/// Every frame of a video file as packed RGB.
fn decode(path: &Path) -> Decoded {
    let pipeline = gst::parse::launch(&format!(
        "filesrc location=\"{}\" ! decodebin ! videoconvert ! video/x-raw,format=RGB ! appsink name=sink sync=false",
        path.display()
    ))
    .unwrap()
    .downcast::<gst::Pipeline>()
    .unwrap();
    let sink = pipeline.by_name("sink").unwrap().downcast::<gst_app::AppSink>().unwrap();
    pipeline.set_state(gst::State::Playing).unwrap();
    let (mut width, mut height, mut frames) = (0, 0, Vec::new());
    while let Ok(sample) = sink.pull_sample() {
        let info = gst_video::VideoInfo::from_caps(sample.caps().unwrap()).unwrap();
        (width, height) = (info.width() as usize, info.height() as usize);
        let buffer = sample.buffer().unwrap();
        let frame = gst_video::VideoFrameRef::from_buffer_ref_readable(buffer, &info).unwrap();
        let stride = frame.plane_stride()[0] as usize;
        let data = frame.plane_data(0).unwrap();
        let mut packed = Vec::with_capacity(width * height * 3);
        for row in data.chunks(stride).take(height) {
            packed.extend_from_slice(&row[..width * 3]);
        }
        frames.push(packed);
    }
    let bus = pipeline.bus().unwrap();
    let error = bus.pop_filtered(&[gst::MessageType::Error]);
    pipeline.set_state(gst::State::Null).unwrap();
    assert!(error.is_none(), "decoding {} failed: {error:?}", path.display());
    Decoded { width, height, frames }
}

fn mean_abs_difference(a: &[u8], b: &[u8]) -> f64 {
    a.iter().zip(b).map(|(&x, &y)| (x as f64 - y as f64).abs()).sum::<f64>() / a.len() as f64
}

/// Same count and size as the input, and every frame visibly restyled.
fn assert_restyled(output: &Path) {
    let input = decode(&common::fixture(CLIP));
    assert_eq!(input.frames.len(), CLIP_FRAMES, "the fixture clip changed");
    let result = decode(output);
    assert_eq!(result.frames.len(), CLIP_FRAMES, "frame count of {}", output.display());
    assert_eq!((result.width, result.height), CLIP_SIZE, "frame size of {}", output.display());
    for (index, (before, after)) in input.frames.iter().zip(&result.frames).enumerate() {
        let changed = mean_abs_difference(before, after);
        // x264 at its default quality moves pixels by ~1-2 levels on average; the tiny
        // model's restyle moves them by tens.
        assert!(changed > 10.0, "frame {index} barely changed: mean difference {changed:.2}");
    }
    let frame_to_frame = mean_abs_difference(&result.frames[0], &result.frames[CLIP_FRAMES - 1]);
    assert!(frame_to_frame > 0.5, "every output frame is the same picture");
}

fn output_path(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("sdcrossframe-e2e-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

#[test]
fn clip_through_the_file_pipeline_is_restyled_frame_for_frame() {
    common::init();
    let output = output_path("in-process.mp4");
    let pipeline = gst::parse::launch(&format!(
        "filesrc location=\"{}\" ! decodebin ! videoconvert ! sdcrossframe {} ! videoconvert ! x264enc ! mp4mux ! filesink location=\"{}\"",
        common::fixture(CLIP).display(),
        element_options(),
        output.display()
    ))
    .unwrap();
    pipeline.set_state(gst::State::Playing).unwrap();
    let bus = pipeline.bus().unwrap();
    let message = bus
        .timed_pop_filtered(gst::ClockTime::from_seconds(600), &[gst::MessageType::Eos, gst::MessageType::Error])
        .expect("the pipeline finished within 10 minutes");
    pipeline.set_state(gst::State::Null).unwrap();
    assert!(matches!(message.view(), gst::MessageView::Eos(_)), "pipeline failed: {message:?}");
    assert_restyled(&output);
}

/// The `sdcrossframe` binary of this workspace build, with the plugin next to it.
fn runner() -> Command {
    // target/<profile>/deps/e2e-<hash> -> target/<profile>
    let dir = std::env::current_exe().unwrap().parent().unwrap().parent().unwrap().to_path_buf();
    let binary = dir.join("sdcrossframe");
    assert!(
        binary.exists() && dir.join("libgstsdcrossframe.so").exists(),
        "{} or the plugin next to it is missing: `cargo test` does not build the plugin library, run `cargo build --workspace` before `cargo test --workspace`",
        binary.display()
    );
    let mut command = Command::new(binary);
    command.current_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join("..")).env("GST_PLUGIN_PATH", &dir);
    command
}

fn file_pipeline_arguments(output: &Path) -> Vec<String> {
    vec![
        "run".into(),
        "pipelines/file-to-mp4.pipeline".into(),
        format!("INPUT={}", common::fixture(CLIP).display()),
        format!("OUTPUT={}", output.display()),
        format!("MODEL={}", common::fixture("tiny-sd").display()),
        format!("CONTROLNET={}", common::fixture("tiny-controlnet").display()),
        "WIDTH=48".into(),
        "HEIGHT=80".into(),
        "STEPS=4".into(),
    ]
}

#[test]
fn runner_runs_the_file_pipeline_file() {
    common::init();
    let output = output_path("runner.mp4");
    let result = runner().args(file_pipeline_arguments(&output)).output().unwrap();
    let stderr = String::from_utf8_lossy(&result.stderr);
    assert!(result.status.success(), "runner failed: {stderr}");
    assert!(stderr.contains(&format!("{CLIP_FRAMES} frames in")), "no summary line: {stderr}");
    assert_restyled(&output);
    assert_eq!(h264_profile(&output), HIGH, "{} is not H.264 High (4:2:0)", output.display());
}

/// H.264 profile_idc: High (4:2:0 only), and High 4:4:4 Predictive, which x264enc writes for
/// RGB or Y444 input and many browsers and hardware decoders cannot play.
const HIGH: u8 = 100;
const HIGH_444: u8 = 244;

/// The profile_idc of an MP4's H.264 track: AVCProfileIndication, the byte after
/// configurationVersion in the avcC box.
fn h264_profile(path: &Path) -> u8 {
    let bytes = std::fs::read(path).unwrap();
    let at =
        bytes.windows(4).position(|w| w == b"avcC").unwrap_or_else(|| panic!("{} has no avcC box", path.display()));
    bytes[at + 5]
}

/// A 3-frame 64x48 H.264 clip (a moving test pattern).
fn three_frame_clip(path: &Path) {
    let pipeline = gst::parse::launch(&format!(
        "videotestsrc num-buffers=3 pattern=ball ! video/x-raw,width=64,height=48,framerate=25/1 ! videoconvert \
         ! video/x-raw,format=I420 ! x264enc ! mp4mux ! filesink location=\"{}\"",
        path.display()
    ))
    .unwrap();
    pipeline.set_state(gst::State::Playing).unwrap();
    let message = pipeline
        .bus()
        .unwrap()
        .timed_pop_filtered(gst::ClockTime::from_seconds(60), &[gst::MessageType::Eos, gst::MessageType::Error])
        .expect("the clip was written within a minute");
    pipeline.set_state(gst::State::Null).unwrap();
    assert!(matches!(message.view(), gst::MessageView::Eos(_)), "writing the clip failed: {message:?}");
}

/// The MP4 pipelines write H.264 4:2:0 (High, not High 4:4:4) unless ENCODE_FORMAT asks for
/// another format: side-by-side and file-to-mp4 on a 3-frame clip with the tiny model.
#[test]
fn mp4_pipelines_write_h264_420_unless_asked_otherwise() {
    common::init();
    let input = output_path("three-frames.mp4");
    three_frame_clip(&input);
    let model = [
        format!("MODEL={}", common::fixture("tiny-sd").display()),
        format!("CONTROLNET={}", common::fixture("tiny-controlnet").display()),
        "WIDTH=64".into(),
        "HEIGHT=48".into(),
        "STEPS=2".into(),
    ];
    let run = |file: &str, output: &Path, extra: &[&str]| {
        let result = runner()
            .args(["run", file])
            .arg(format!("INPUT={}", input.display()))
            .arg(format!("OUTPUT={}", output.display()))
            .args(&model)
            .args(extra)
            .output()
            .unwrap();
        assert!(result.status.success(), "{file} {extra:?}: {}", String::from_utf8_lossy(&result.stderr));
        let frames = decode(output);
        assert_eq!(frames.frames.len(), 3, "{file} {extra:?}");
        h264_profile(output)
    };
    let panes = ["PANE_WIDTH=64", "PANE_HEIGHT=48", "PANE_X1=64", "PANE_X2=128"];
    assert_eq!(run("pipelines/side-by-side.pipeline", &output_path("sbs.mp4"), &panes), HIGH);
    assert_eq!(run("pipelines/file-to-mp4.pipeline", &output_path("three-420.mp4"), &[]), HIGH);
    // The variable reaches the encoder: Y444 is High 4:4:4, what RGB into x264enc gave.
    let y444 = run("pipelines/file-to-mp4.pipeline", &output_path("three-444.mp4"), &["ENCODE_FORMAT=Y444"]);
    assert_eq!(y444, HIGH_444);
}

#[test]
fn runner_fails_with_the_bus_error_text() {
    let output = output_path("never.mp4");
    let _ = std::fs::remove_file(&output);
    let mut arguments = file_pipeline_arguments(&output);
    arguments[4] = "MODEL=/nonexistent/sd15".into();
    let result = runner().args(&arguments).output().unwrap();
    let stderr = String::from_utf8_lossy(&result.stderr);
    assert_eq!(result.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("model /nonexistent/sd15 does not exist"), "{stderr}");
    assert!(stderr.contains("does not exist"), "{stderr}");
    // The file sink created the output before the model failed: removed, and said so.
    assert!(!output.exists(), "the failed run left {} behind", output.display());
    assert!(stderr.contains(&format!("removed the empty output file {}", output.display())), "{stderr}");
    // A file that was there before the run is not the runner's to remove.
    std::fs::write(&output, b"").unwrap();
    let result = runner().args(&arguments).output().unwrap();
    assert_eq!(result.status.code(), Some(1));
    assert!(output.exists(), "an existing file was removed");
    std::fs::remove_file(&output).unwrap();

    let result = runner().args(["run", "pipelines/file-to-mp4.pipeline", "OUTPUT=x.mp4"]).output().unwrap();
    let stderr = String::from_utf8_lossy(&result.stderr);
    assert_eq!(result.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("variable INPUT is not set"), "{stderr}");
}

#[test]
fn runner_turns_ctrl_c_into_eos_and_finalizes_the_file() {
    common::init();
    let dir = output_path("");
    let pipeline_file = dir.join("endless.pipeline");
    std::fs::write(
        &pipeline_file,
        "# a test pattern that would run for 400 s\n\
         videotestsrc num-buffers=10000 pattern=ball ! video/x-raw,width=64,height=48,framerate=25/1\n\
         ! sdcrossframe model=\"${MODEL}\" controlnet=\"${CONTROLNET}\" width=64 height=48 steps=2\n\
         ! videoconvert ! x264enc ! mp4mux ! filesink location=\"${OUTPUT}\"\n",
    )
    .unwrap();
    let output = dir.join("interrupted.mp4");
    let mut child = runner()
        .args([
            "run".into(),
            pipeline_file.display().to_string(),
            format!("OUTPUT={}", output.display()),
            format!("MODEL={}", common::fixture("tiny-sd").display()),
            format!("CONTROLNET={}", common::fixture("tiny-controlnet").display()),
        ])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Let it run a few seconds after it says it is running (the signal handler is armed).
    let mut stderr = std::io::BufReader::new(child.stderr.take().unwrap());
    let mut first_line = String::new();
    std::io::BufRead::read_line(&mut stderr, &mut first_line).unwrap();
    assert!(first_line.starts_with("running "), "{first_line}");
    std::thread::sleep(Duration::from_secs(5));
    // The shell's built-in kill: /bin/kill (procps) is not on every minimal system.
    let sent = Command::new("sh").arg("-c").arg(format!("kill -INT {}", child.id())).status().unwrap();
    assert!(sent.success(), "could not send SIGINT");
    let interrupted = Instant::now();
    let status = child.wait().unwrap();
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut stderr, &mut rest).unwrap();
    assert!(status.success(), "exit {status}: {rest}");
    assert!(interrupted.elapsed() < Duration::from_secs(60), "took {:?} to finish after Ctrl-C", interrupted.elapsed());
    assert!(rest.contains("interrupted: finishing the stream"), "{rest}");
    let result = decode(&output);
    assert!(!result.frames.is_empty() && result.frames.len() < 10000, "{} frames", result.frames.len());
    assert_eq!((result.width, result.height), (64, 48));
}

/// Every file in pipelines/ fills in (required variables given dummy values) and
/// gst_parse_launch builds it: no typo in an element, property or value.
#[test]
fn every_pipeline_file_builds() {
    common::init();
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../pipelines");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "pipeline"))
        .collect();
    files.sort();
    assert!(files.len() >= 6, "{files:?}");
    for file in files {
        let mut assignments: Vec<String> = Vec::new();
        let line = loop {
            let result = runner().arg("run").arg(&file).arg("--print").args(&assignments).output().unwrap();
            let stderr = String::from_utf8_lossy(&result.stderr).into_owned();
            if result.status.success() {
                break String::from_utf8(result.stdout).unwrap();
            }
            let Some(name) = stderr.split("variable ").nth(1).and_then(|r| r.split(" is not set").next()) else {
                panic!("{}: {stderr}", file.display());
            };
            assert!(assignments.len() < 10, "{}: {stderr}", file.display());
            assignments.push(format!("{name}=/tmp/{}", name.to_lowercase()));
        };
        let pipeline = gst::parse::launch(line.trim())
            .unwrap_or_else(|e| panic!("{} does not build: {e}\n{line}", file.display()));
        // The elements took every property value.
        let elements: Vec<gst::Element> = pipeline
            .downcast_ref::<gst::Bin>()
            .unwrap()
            .iterate_recurse()
            .into_iter()
            .flatten()
            .filter(|e| e.factory().is_some_and(|f| f.name() == "sdcrossframe"))
            .collect();
        assert!(!elements.is_empty(), "{} has no sdcrossframe element", file.display());
        for element in &elements {
            assert!(!element.property::<String>("prompt").is_empty(), "{}: {}", file.display(), element.name());
        }
        // Several elements (multi-stream): they ask for one model, so they share one copy.
        for other in &elements[1..] {
            for property in ["model", "controlnet", "lora", "vae", "device", "model-instance-id"] {
                let value = |e: &gst::Element| e.property::<Option<String>>(property);
                assert_eq!(value(&elements[0]), value(other), "{}: {property} of {}", file.display(), other.name());
            }
        }
    }
}

/// The multi-stream pipeline runs two inputs of different sizes and lengths through two
/// elements (one loaded model) into two files, each frame for frame; the runner sums up each
/// element by name and the total.
#[test]
fn runner_runs_the_multi_stream_pipeline_into_one_output_per_input() {
    common::init();
    let short = output_path("multi-input-3-frames.mp4");
    three_frame_clip(&short);
    let (out1, out2) = (output_path("multi-1.mp4"), output_path("multi-2.mp4"));
    let result = runner()
        .args(["run", "pipelines/multi-stream.pipeline"])
        .arg(format!("INPUT1={}", common::fixture(CLIP).display()))
        .arg(format!("OUTPUT1={}", out1.display()))
        .arg(format!("INPUT2={}", short.display()))
        .arg(format!("OUTPUT2={}", out2.display()))
        .arg(format!("MODEL={}", common::fixture("tiny-sd").display()))
        .arg(format!("CONTROLNET={}", common::fixture("tiny-controlnet").display()))
        .args(["WIDTH=48", "HEIGHT=80", "STEPS=4"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&result.stderr);
    assert!(result.status.success(), "runner failed: {stderr}");
    assert!(stderr.contains(&format!("stream1: {CLIP_FRAMES} frames in")), "{stderr}");
    assert!(stderr.contains("stream2: 3 frames in"), "{stderr}");
    assert!(stderr.contains(&format!("total: {} frames of 2 streams", CLIP_FRAMES + 3)), "{stderr}");
    assert_restyled(&out1);
    let second = decode(&out2);
    assert_eq!((second.frames.len(), second.width, second.height), (3, 64, 48));
}
