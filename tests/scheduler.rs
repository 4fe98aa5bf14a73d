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

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn load_tensors(path: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu).unwrap()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}
