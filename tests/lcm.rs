//! The LCM scheduler and the guidance modes against diffusers (tests/reference/
//! make_lcm_fixtures.py): timestep tables with diffusers' error cases, one step per prediction
//! type, whole ControlNet img2img frames (2 to 4 steps, guidance none / full, explicit
//! timesteps), StreamDiffusion's residual CFG (self, initialize) against the script's
//! reimplementation of its formulas; bad settings are errors naming the value.

mod common;

use candle_core::{Device, Tensor};
use common::*;
use sdcrossframe::pipeline::{FrameSettings, GuidanceMode, PlainFrame, Stylizer};
use sdcrossframe::scheduler::{LcmScheduler, LcmSchedulerConfig, SchedulerChoice, SchedulerConfig, TimestepIndices};

fn lcm_dir() -> std::path::PathBuf {
    fixtures().join("reference/lcm")
}

fn tiny_lcm() -> LcmScheduler {
    let config: SchedulerConfig =
        sdcrossframe::weights::read_config(&fixtures().join("tiny-sd/scheduler/scheduler_config.json")).unwrap();
    LcmScheduler::new(&config.lcm().unwrap()).unwrap()
}

fn table() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(lcm_dir().join("timesteps.json")).unwrap()).unwrap()
}

#[derive(serde::Deserialize)]
struct SetTimestepsCase {
    steps: Option<usize>,
    original_inference_steps: Option<usize>,
    timesteps: Option<Vec<usize>>,
    strength: f64,
    result: Option<Vec<usize>>,
    error: Option<String>,
}

#[test]
fn set_timesteps_matches_diffusers_including_its_errors() {
    let cases: Vec<SetTimestepsCase> = serde_json::from_value(table()["set_timesteps"].clone()).unwrap();
    assert!(cases.len() > 100);
    let lcm = tiny_lcm();
    let (mut ok, mut errors) = (0, 0);
    for case in cases {
        let got =
            lcm.set_timesteps(case.steps, case.original_inference_steps, case.timesteps.as_deref(), case.strength);
        let what = format!(
            "steps {:?} original {:?} timesteps {:?} strength {}",
            case.steps, case.original_inference_steps, case.timesteps, case.strength
        );
        match (got, case.result, case.error) {
            (Ok(got), Some(want), None) => {
                assert_eq!(got, want, "{what}");
                ok += 1;
            }
            (Err(_), None, Some(_)) => errors += 1,
            (got, want, error) => panic!("{what}: got {got:?}, diffusers {want:?} / {error:?}"),
        }
    }
    assert!(ok > 50 && errors > 20, "{ok} results, {errors} errors");
}

#[test]
fn img2img_timesteps_and_indices_match_diffusers_and_streamdiffusion() {
    let table = table();
    let lcm = tiny_lcm();
    for case in table["img2img"].as_array().unwrap() {
        let steps = case["steps"].as_u64().unwrap() as usize;
        let strength = case["strength"].as_f64().unwrap();
        let got = lcm.img2img_timesteps(steps, strength);
        match case.get("timesteps") {
            Some(want) => assert_eq!(
                got.unwrap(),
                serde_json::from_value::<Vec<usize>>(want.clone()).unwrap(),
                "{steps} x {strength}"
            ),
            None => assert!(got.unwrap_err().to_string().contains("0 denoising steps"), "{steps} x {strength}"),
        }
    }
    let grid: Vec<usize> = serde_json::from_value(table["index_grid"].clone()).unwrap();
    assert_eq!(lcm.set_timesteps(Some(50), None, None, 1.0).unwrap(), grid);
    let mut stylizer = tiny_stylizer();
    for case in table["indices"].as_array().unwrap() {
        let indices: Vec<usize> = serde_json::from_value(case["indices"].clone()).unwrap();
        let want: Vec<usize> = serde_json::from_value(case["timesteps"].clone()).unwrap();
        let settings = lcm_settings(4, 1.0, Some(TimestepIndices::new(indices).unwrap()));
        assert_eq!(stylizer.img2img().timesteps(&settings).unwrap(), want);
    }
    // Explicit timesteps replace steps and strength.
    let settings = FrameSettings { steps: 1, strength: 0.1, ..lcm_settings(4, 1.0, Some("32,45".parse().unwrap())) };
    assert_eq!(stylizer.img2img().timesteps(&settings).unwrap(), [359, 99]);
    let _ = stylizer.prompt_embeddings(&settings).unwrap();
}

#[test]
fn one_step_matches_diffusers_for_every_prediction_type() {
    let t = load_tensors(&lcm_dir().join("step.safetensors"));
    let scalar = |name: &str| t[name].to_vec1::<i64>().unwrap()[0] as usize;
    let (timestep, next, last) = (scalar("timestep"), scalar("next_timestep"), scalar("last_timestep"));
    let base: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("tiny-sd/scheduler/scheduler_config.json")).unwrap(),
    )
    .unwrap();
    for (variant, extra) in [
        ("eps", serde_json::json!({})),
        ("v", serde_json::json!({"prediction_type": "v_prediction"})),
        ("sample", serde_json::json!({"prediction_type": "sample"})),
        ("clip", serde_json::json!({"clip_sample": true, "clip_sample_range": 0.5})),
        ("scaling5", serde_json::json!({"timestep_scaling": 5.0})),
    ] {
        let mut config = base.clone();
        config.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        let config: LcmSchedulerConfig = serde_json::from_value(config).unwrap();
        let lcm = LcmScheduler::new(&config).unwrap();
        let get = |name: &str| &t[&format!("{variant}.{name}")];
        let (output, sample) = (get("model_output"), get("sample"));
        let prev = lcm.step(output, timestep, sample, Some((next, get("noise")))).unwrap();
        let denoised = lcm.denoise(output, timestep, sample).unwrap();
        let last_prev = lcm.step(output, last, sample, None).unwrap();
        for (name, got, want) in [
            ("prev_sample", &prev, "prev_sample"),
            ("denoised", &denoised, "denoised"),
            ("last", &last_prev, "last_prev_sample"),
        ] {
            let err = max_abs_diff(got, get(want));
            println!("{variant} {name}: {err:.2e}");
            assert!(err < 1e-5, "{variant} {name}: {err}");
        }
    }
    let alphas = t["alphas_cumprod"].to_vec1::<f32>().unwrap();
    let ours = tiny_lcm();
    let worst = ours.alphas_cumprod().iter().zip(&alphas).map(|(a, b)| (*a as f32 - b).abs() / b).fold(0f32, f32::max);
    assert!(worst < 1e-6, "alphas_cumprod off by {worst} (relative)");
}

fn lcm_settings(steps: usize, strength: f64, timesteps: Option<TimestepIndices>) -> FrameSettings {
    FrameSettings {
        steps,
        strength,
        timesteps,
        scheduler: SchedulerChoice::Lcm,
        guidance_scale: 1.0,
        controlnet_scale: 0.7,
        ..base_settings()
    }
}

#[derive(serde::Deserialize)]
struct FrameCase {
    name: String,
    steps: usize,
    strength: f64,
    timesteps: Option<Vec<usize>>,
    guidance_scale: f64,
    guidance: String,
    timestep_values: Vec<usize>,
    output: String,
}

fn frame_cases() -> Vec<FrameCase> {
    serde_json::from_str(&std::fs::read_to_string(lcm_dir().join("frames.json")).unwrap()).unwrap()
}

fn case_settings(case: &FrameCase) -> FrameSettings {
    FrameSettings {
        guidance_scale: case.guidance_scale,
        guidance: case.guidance.parse().unwrap(),
        ..lcm_settings(case.steps, case.strength, case.timesteps.clone().map(|t| TimestepIndices::new(t).unwrap()))
    }
}

/// The fixture's start noise and step noise.
pub fn lcm_noise() -> (Tensor, Tensor) {
    let t = load_tensors(&lcm_dir().join("noise.safetensors"));
    (t["noise"].clone(), t["step_noise"].clone())
}

fn stylize(stylizer: &mut Stylizer, settings: &FrameSettings) -> Tensor {
    let (noise, step_noise) = lcm_noise();
    stylizer
        .stylize(
            &frame(0).to_tensor(&Device::Cpu).unwrap(),
            &control(0).to_tensor(&Device::Cpu).unwrap(),
            settings,
            &noise,
            Some(&step_noise),
            &mut PlainFrame::default(),
        )
        .unwrap()
}

/// Every case through ONE stylizer (the prompt cache must follow the guidance mode).
#[test]
fn frames_match_diffusers_and_the_rcfg_reference() {
    let mut stylizer = tiny_stylizer();
    let cases = frame_cases();
    for name in ["lcm4", "lcm2", "lcm_t32_45", "lcm2_full", "lcm2_self", "lcm2_initialize"] {
        assert!(cases.iter().any(|c| c.name == name), "fixture case {name} is missing");
    }
    let mut failures = Vec::new();
    for case in &cases {
        let settings = case_settings(case);
        assert_eq!(stylizer.img2img().timesteps(&settings).unwrap(), case.timestep_values, "{}", case.name);
        let image = stylize(&mut stylizer, &settings);
        let want = &load_tensors(&lcm_dir().join(&case.output))["image"];
        let err = max_abs_diff(&image, want);
        println!(
            "{:<16} ({} steps, guidance {}) max abs error {err:.2e}",
            case.name,
            case.timestep_values.len(),
            case.guidance
        );
        if err > IMAGE_TOLERANCE {
            failures.push(format!("{}: {err:.2e}", case.name));
        }
    }
    assert!(failures.is_empty(), "cases over {IMAGE_TOLERANCE}: {failures:?}");
}

/// Parity means something only if the scheduler, the step count, the guidance mode and the
/// step noise each move the output far beyond the tolerance.
#[test]
fn each_setting_changes_the_output_far_beyond_tolerance() {
    let cases = frame_cases();
    let image = |name: &str| {
        let case = cases.iter().find(|c| c.name == name).unwrap();
        load_tensors(&lcm_dir().join(&case.output))["image"].clone()
    };
    for (a, b) in [
        ("lcm4", "lcm2"),
        ("lcm2", "lcm_t32_45"),
        ("lcm2", "lcm2_full"),
        ("lcm2", "lcm2_self"),
        ("lcm2_full", "lcm2_self"),
        ("lcm2_self", "lcm2_initialize"),
        ("lcm2_full", "lcm2_initialize"),
    ] {
        let diff = max_abs_diff(&image(a), &image(b));
        println!("{a} vs {b}: {diff:.3}");
        assert!(diff > 20.0 * IMAGE_TOLERANCE, "{a} vs {b}: only {diff}");
    }
    let mut stylizer = tiny_stylizer();
    // DDIM at the same settings is another image entirely.
    let lcm2 = cases.iter().find(|c| c.name == "lcm2").unwrap();
    let ddim = stylize(&mut stylizer, &FrameSettings { scheduler: SchedulerChoice::Ddim, ..case_settings(lcm2) });
    let diff = max_abs_diff(&ddim, &image("lcm2"));
    println!("ddim vs lcm2: {diff:.3}");
    assert!(diff > 20.0 * IMAGE_TOLERANCE, "ddim vs lcm: only {diff}");
    // Other step noise: another image.
    let (noise, step_noise) = lcm_noise();
    let other = stylizer
        .stylize(
            &frame(0).to_tensor(&Device::Cpu).unwrap(),
            &control(0).to_tensor(&Device::Cpu).unwrap(),
            &case_settings(lcm2),
            &noise,
            Some(&(step_noise * -1.0).unwrap()),
            &mut PlainFrame::default(),
        )
        .unwrap();
    let diff = max_abs_diff(&other, &image("lcm2"));
    println!("lcm2 with other step noise: {diff:.3}");
    assert!(diff > 20.0 * IMAGE_TOLERANCE, "step noise: only {diff}");
}

#[test]
fn guidance_modes_resolve_as_documented() {
    let at = |guidance: GuidanceMode, scale: f64| FrameSettings {
        guidance,
        guidance_scale: scale,
        ..FrameSettings::default()
    };
    assert_eq!(at(GuidanceMode::Auto, 7.5).effective_guidance(), GuidanceMode::Full);
    assert_eq!(at(GuidanceMode::Auto, 1.0).effective_guidance(), GuidanceMode::None);
    assert_eq!(at(GuidanceMode::SelfNegative, 1.0).effective_guidance(), GuidanceMode::None);
    assert_eq!(at(GuidanceMode::Initialize, 2.0).effective_guidance(), GuidanceMode::Initialize);
    assert_eq!(at(GuidanceMode::None, 7.5).effective_guidance(), GuidanceMode::None);
    assert_eq!(FrameSettings::default().guidance, GuidanceMode::Auto);
    assert_eq!((0..3).map(|i| GuidanceMode::Initialize.batch(i)).collect::<Vec<_>>(), [2, 1, 1]);
    let err = "half".parse::<GuidanceMode>().unwrap_err().to_string();
    assert!(err.contains("\"half\"") && err.contains("self"), "{err}");
}

#[test]
fn bad_scheduler_settings_are_errors_naming_the_problem() {
    let stylizer = tiny_stylizer();
    let img2img = stylizer.img2img();
    let err = "euler".parse::<SchedulerChoice>().unwrap_err().to_string();
    assert!(err.contains("unknown scheduler \"euler\""), "{err}");
    for (settings, needle) in [
        (lcm_settings(4, 1.0, Some(TimestepIndices::new(vec![32, 50]).unwrap())), "index 50 is out of range"),
        (
            FrameSettings { scheduler: SchedulerChoice::Auto, ..lcm_settings(4, 1.0, Some("32,45".parse().unwrap())) },
            "need the lcm scheduler",
        ),
        (lcm_settings(60, 1.0, None), "fewer than the 60 steps"),
        (lcm_settings(4, 0.2, None), "0 denoising steps"),
        (
            FrameSettings {
                scheduler: SchedulerChoice::Ddim,
                guidance: GuidanceMode::SelfNegative,
                guidance_scale: 2.0,
                ..lcm_settings(4, 1.0, None)
            },
            "needs the lcm scheduler",
        ),
    ] {
        let err = format!("{:#}", img2img.timesteps(&settings).unwrap_err());
        assert!(err.contains(needle), "{settings:?}: {err}");
    }
    for (text, needle) in [("45,32", "ascending"), ("", "\"\" is not a timestep index"), ("3x", "\"3x\"")] {
        let err = text.parse::<TimestepIndices>().unwrap_err().to_string();
        assert!(err.contains(needle), "{text:?}: {err}");
    }
    // The step noise must cover every re-noising.
    let mut stylizer = tiny_stylizer();
    let (noise, step_noise) = lcm_noise();
    let frame = frame(0).to_tensor(&Device::Cpu).unwrap();
    let control = control(0).to_tensor(&Device::Cpu).unwrap();
    let settings = lcm_settings(4, 1.0, None);
    let err = stylizer.stylize(&frame, &control, &settings, &noise, None, &mut PlainFrame::default()).unwrap_err();
    assert!(err.to_string().contains("3 rows of step noise"), "{err}");
    let short = step_noise.narrow(0, 0, 2).unwrap();
    let err =
        stylizer.stylize(&frame, &control, &settings, &noise, Some(&short), &mut PlainFrame::default()).unwrap_err();
    assert!(err.to_string().contains("step noise has shape [2, 4, 8, 12]"), "{err}");
}

#[test]
fn seeded_step_noise_extends_the_initial_noise_stream() {
    let shape = (1, 4, 8, 12);
    let rows = sdcrossframe::pipeline::seeded_noise_rows(7, shape, 3, &Device::Cpu).unwrap();
    let initial = sdcrossframe::pipeline::seeded_noise(7, shape, &Device::Cpu).unwrap();
    assert_eq!(max_abs_diff(&rows.initial, &initial), 0.0, "the initial noise is seeded_noise's");
    let two = sdcrossframe::pipeline::seeded_noise_rows(7, shape, 2, &Device::Cpu).unwrap();
    let steps = rows.steps.unwrap();
    assert_eq!(
        max_abs_diff(&two.steps.unwrap(), &steps.narrow(0, 0, 2).unwrap()),
        0.0,
        "rows do not depend on the count"
    );
    assert!(max_abs_diff(&steps.narrow(0, 0, 1).unwrap(), &initial) > 1.0);
}
