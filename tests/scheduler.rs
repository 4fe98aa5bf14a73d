//! DDIM against diffusers: img2img timesteps for several (steps, strength) pairs, one step,
//! add_noise, and the zero-denoising-steps error.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use sdcrossframe::scheduler::{DdimScheduler, DdimSchedulerConfig};

fn scheduler() -> DdimScheduler {
    let config: DdimSchedulerConfig =
        sdcrossframe::weights::read_config(&fixtures().join("tiny-sd/scheduler/scheduler_config.json")).unwrap();
    DdimScheduler::new(&config).unwrap()
}

#[derive(serde::Deserialize)]
struct Case {
    steps: usize,
    strength: f64,
    zero_steps: bool,
    timesteps: Vec<usize>,
}

#[test]
fn img2img_timesteps_match_diffusers() {
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("reference/ddim.json")).unwrap()).unwrap();
    let cases: Vec<Case> = serde_json::from_value(json["cases"].clone()).unwrap();
    assert!(cases.len() >= 8);
    let scheduler = scheduler();
    for case in cases {
        let got = scheduler.img2img_timesteps(case.steps, case.strength);
        if case.zero_steps {
            let err = got.unwrap_err().to_string();
            assert!(err.contains("0 denoising steps"), "{err}");
        } else {
            assert_eq!(got.unwrap(), case.timesteps, "steps {} strength {}", case.steps, case.strength);
        }
    }
}

fn scalar_i64(t: &Tensor) -> usize {
    t.to_vec1::<i64>().unwrap()[0] as usize
}

#[test]
fn step_and_add_noise_match_diffusers() {
    let t = load_tensors(&fixtures().join("reference/ddim_step.safetensors"));
    let scheduler = scheduler();
    let prev = scheduler.step(&t["model_output"], scalar_i64(&t["timestep"]), &t["sample"], 20).unwrap();
    let err = max_abs_diff(&prev, &t["prev_sample"]);
    assert!(err < 1e-5, "step: {err}");
    // The last step reaches past timestep 0 and uses the final alpha.
    let last = scheduler.step(&t["last_model_output"], scalar_i64(&t["last_timestep"]), &t["last_sample"], 20).unwrap();
    let err = max_abs_diff(&last, &t["last_prev_sample"]);
    assert!(err < 1e-5, "last step: {err}");
    let noisy = scheduler.add_noise(&t["original"], &t["noise"], scalar_i64(&t["add_noise_timestep"])).unwrap();
    let err = max_abs_diff(&noisy, &t["noisy"]);
    assert!(err < 1e-5, "add_noise: {err}");
}

#[test]
fn bad_strength_and_steps_are_errors() {
    let scheduler = scheduler();
    assert!(scheduler.img2img_timesteps(20, 1.5).unwrap_err().to_string().contains("strength 1.5"));
    assert!(scheduler.img2img_timesteps(0, 0.5).unwrap_err().to_string().contains("steps"));
}

#[test]
fn alphas_cumprod_match_diffusers() {
    let t = load_tensors(&fixtures().join("reference/ddim_step.safetensors"));
    let want = t["alphas_cumprod"].to_vec1::<f32>().unwrap();
    let got = scheduler();
    let got = got.alphas_cumprod();
    assert_eq!(got.len(), want.len());
    let err = got.iter().zip(&want).map(|(a, b)| (a - *b as f64).abs()).fold(0.0, f64::max);
    println!("alphas_cumprod: max abs error {err:.2e}");
    assert!(err < 2e-7, "alphas_cumprod off by {err}");
}

/// FNV-1a over every timestep (u64 little-endian) of every schedule, each schedule closed by
/// u64::MAX.
fn fnv1a(schedules: &[Vec<usize>]) -> u64 {
    let mut hash = 0xcbf2_9ce4_8422_2325u64;
    for schedule in schedules {
        for t in schedule.iter().map(|&t| t as u64).chain([u64::MAX]) {
            for byte in t.to_le_bytes() {
                hash = (hash ^ byte as u64).wrapping_mul(0x0100_0000_01b3);
            }
        }
    }
    hash
}

/// `DDIMScheduler(timestep_spacing=.., steps_offset=..).set_timesteps(steps)` for every steps in
/// 1..=1000 (diffusers 0.42.1), hashed with `fnv1a` after dropping the -1 that numpy's arange
/// appends to some "trailing" schedules; the listed step counts reach timestep 1000, which
/// diffusers accepts and then fails on.
const ALL_SCHEDULES: &[(&str, usize, u64, &[usize])] = &[
    ("leading", 1, 0xc3da_cb36_b902_8180, &[1000]),
    ("trailing", 0, 0x54a3_5065_3bc7_1438, &[]),
    ("linspace", 0, 0x552c_9dd1_e127_6f24, &[]),
];

#[test]
fn every_step_count_gives_diffusers_timesteps() {
    for &(spacing, offset, want, beyond) in ALL_SCHEDULES {
        let config: DdimSchedulerConfig =
            serde_json::from_value(serde_json::json!({"timestep_spacing": spacing, "steps_offset": offset})).unwrap();
        let scheduler = DdimScheduler::new(&config).unwrap();
        let mut schedules = Vec::new();
        for steps in 1..=1000 {
            match scheduler.timesteps(steps) {
                Ok(t) => schedules.push(t),
                Err(e) => {
                    assert!(beyond.contains(&steps), "{spacing} {steps}: {e}");
                    assert!(e.to_string().contains("beyond"), "{e}");
                }
            }
        }
        assert_eq!(schedules.len(), 1000 - beyond.len());
        assert_eq!(fnv1a(&schedules), want, "{spacing}: some schedule differs from diffusers");
    }
    // Round half to even, as numpy: 999 / 6 = 166.5 -> 166, 832.5 -> 832 ...
    let linspace: DdimSchedulerConfig = serde_json::from_str(r#"{"timestep_spacing": "linspace"}"#).unwrap();
    assert_eq!(DdimScheduler::new(&linspace).unwrap().timesteps(7).unwrap(), [999, 832, 666, 500, 333, 166, 0]);
    // ... and 1000 - 3 * 62.5 = 812.5 -> 812.
    let trailing: DdimSchedulerConfig = serde_json::from_str(r#"{"timestep_spacing": "trailing"}"#).unwrap();
    let trailing = DdimScheduler::new(&trailing).unwrap();
    assert_eq!(trailing.timesteps(16).unwrap()[..4], [999, 937, 874, 811]);
    // numpy gives 62 entries here, the last one -1.
    let t61 = trailing.timesteps(61).unwrap();
    assert_eq!((t61.len(), t61[0], t61[60]), (61, 999, 15));
}

/// One scheduler config and what diffusers 0.42.1 (`DDIMScheduler.from_config(config)`, eta 0)
/// gives for it on `MODEL_OUTPUT` / `SAMPLE` / `NOISE`.
struct Variant {
    config: &'static str,
    steps: usize,
    timesteps: &'static [usize],
    alphas_cumprod: &'static [(usize, f64)],
    /// `step` from the first timestep and from the last one (which uses the final alpha).
    first_step: &'static [f32],
    last_step: &'static [f32],
    /// `add_noise(SAMPLE, NOISE, timesteps[0])`.
    noisy: &'static [f32],
}

const MODEL_OUTPUT: [f32; 6] = [0.9, -1.7, 0.05, 2.3, -0.4, 1.1];
const SAMPLE: [f32; 6] = [1.5, -0.3, 2.8, -2.2, 0.7, -1.9];
const NOISE: [f32; 6] = [-0.6, 0.2, 1.4, -1.1, 0.3, 0.8];

const VARIANTS: &[Variant] = &[
    // DDIMScheduler's own defaults: clip_sample and set_alpha_to_one on, leading, no offset.
    Variant {
        config: r#"{"beta_schedule": "squaredcos_cap_v2"}"#,
        steps: 10,
        timesteps: &[900, 800, 700, 600, 500, 400, 300, 200, 100, 0],
        alphas_cumprod: &[
            (0, 0.9999587),
            (1, 0.99991256),
            (250, 0.845888),
            (500, 0.49228504),
            (998, 0.0000024287663),
            (999, 0.000000002428735),
        ],
        first_step: &[1.1622486, -1.3137136, 0.35279948, 1.8850894, -0.07573247, 0.7423377],
        last_step: &[1.0, -0.2890801, 1.0, -1.0, 0.7025853, -1.0],
        noisy: &[-0.36235985, 0.15152168, 1.8136609, -1.4250193, 0.40400916, 0.498514],
    },
    Variant {
        config: r#"{"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "prediction_type": "v_prediction", "timestep_spacing": "trailing", "set_alpha_to_one": false, "clip_sample": false, "steps_offset": 1}"#,
        steps: 10,
        timesteps: &[999, 899, 799, 699, 599, 499, 399, 299, 199, 99],
        alphas_cumprod: &[
            (0, 0.99915),
            (1, 0.998296),
            (250, 0.6737923),
            (500, 0.27633247),
            (998, 0.0047166958),
            (999, 0.004660095),
        ],
        first_step: &[1.451637, -0.21201243, 2.7937047, -2.3155813, 0.7196795, -1.9541517],
        last_step: &[1.1669331, 0.21591935, 2.6600966, -2.7815595, 0.78695756, -2.1402502],
        noisy: &[-0.49620306, 0.17905398, 1.5878758, -1.2476168, 0.34708562, 0.6684305],
    },
    Variant {
        config: r#"{"beta_schedule": "linear", "prediction_type": "sample", "timestep_spacing": "linspace", "clip_sample": true, "clip_sample_range": 0.5}"#,
        steps: 7,
        timesteps: &[999, 832, 666, 500, 333, 166, 0],
        alphas_cumprod: &[
            (0, 0.9999),
            (1, 0.99978006),
            (250, 0.521423),
            (500, 0.07779665),
            (998, 0.000041181942),
            (999, 0.000040358304),
        ],
        first_step: &[1.5059223, -0.3011653, 2.8001308, -2.2019703, 0.6927169, -1.89443],
        last_step: &[0.5, -0.5, 0.05, 0.5, -0.4, 0.5],
        noisy: &[-0.5904587, 0.19809014, 1.4177597, -1.1139541, 0.30444095, 0.78791356],
    },
];

#[test]
fn schedules_predictions_and_clipping_match_diffusers() {
    let row = |values: &[f32]| Tensor::from_slice(values, (1, values.len()), &Device::Cpu).unwrap();
    for variant in VARIANTS {
        let config: DdimSchedulerConfig = serde_json::from_str(variant.config).unwrap();
        let scheduler = DdimScheduler::new(&config).unwrap();
        let timesteps = scheduler.timesteps(variant.steps).unwrap();
        assert_eq!(timesteps, variant.timesteps, "{}", variant.config);
        for &(index, want) in variant.alphas_cumprod {
            let got = scheduler.alphas_cumprod()[index];
            assert!((got - want).abs() <= 1e-6 * want, "{}: alphas_cumprod[{index}] {got} vs {want}", variant.config);
        }
        let (output, sample) = (row(&MODEL_OUTPUT), row(&SAMPLE));
        let first = scheduler.step(&output, timesteps[0], &sample, variant.steps).unwrap();
        let last = scheduler.step(&output, *timesteps.last().unwrap(), &sample, variant.steps).unwrap();
        let noisy = scheduler.add_noise(&sample, &row(&NOISE), timesteps[0]).unwrap();
        for (name, got, want) in [
            ("first step", first, variant.first_step),
            ("last step", last, variant.last_step),
            ("add_noise", noisy, variant.noisy),
        ] {
            let err = max_abs_diff(&got, &row(want));
            assert!(err < 1e-5, "{}: {name} off by {err}", variant.config);
        }
    }
}

#[test]
fn unsupported_scheduler_settings_are_errors() {
    for (config, needle) in [
        (r#"{"beta_schedule": "cosine"}"#, "beta_schedule"),
        (r#"{"timestep_spacing": "karras"}"#, "timestep_spacing"),
        (r#"{"prediction_type": "flow"}"#, "prediction_type"),
        (r#"{"thresholding": true}"#, "thresholding"),
        (r#"{"rescale_betas_zero_snr": true}"#, "rescale_betas_zero_snr"),
        (r#"{"num_train_timesteps": 4, "trained_betas": [0.1, 0.2]}"#, "trained_betas"),
    ] {
        let config: DdimSchedulerConfig = serde_json::from_str(config).unwrap();
        let err = DdimScheduler::new(&config).unwrap_err().to_string();
        assert!(err.contains(needle), "{config:?}: {err}");
    }
}

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn load_tensors(path: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu).unwrap()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}
