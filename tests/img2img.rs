//! Full single-frame ControlNet img2img against diffusers'
//! StableDiffusionControlNetImg2ImgPipeline (DDIM, VAE posterior mean, fixed noise) on the
//! tiny model (the CLI's run of the same case is in cli/tests/cli.rs).

mod common;

use common::*;

fn cases() -> Vec<Img2ImgCase> {
    Img2ImgCase::load_all(&img2img_dir())
}

fn reference_image(case: &Img2ImgCase) -> candle_core::Tensor {
    load_tensors(&img2img_dir().join(&case.output))["image"].clone()
}

/// Every case through ONE stylizer, so the prompt-embedding cache must notice each change.
#[test]
fn img2img_matches_diffusers_for_every_case() {
    let mut stylizer = tiny_stylizer();
    let mut failures = Vec::new();
    for case in cases() {
        let image = case.stylize(&mut stylizer);
        let err = max_abs_diff(&image, &reference_image(&case));
        println!("{:<20} max abs error {err:.2e}", case.name);
        if err > IMAGE_TOLERANCE {
            failures.push(format!("{}: {err:.2e}", case.name));
        }
    }
    assert!(failures.is_empty(), "cases over {IMAGE_TOLERANCE}: {failures:?}");
}

/// Parity only means something if each input visibly moves the output: every variant case
/// must differ from `base` by far more than the tolerance.
#[test]
fn each_input_changes_the_output_far_beyond_tolerance() {
    let all = cases();
    let base = reference_image(all.iter().find(|c| c.name == "base").unwrap());
    for case in all.iter().filter(|c| c.name != "base") {
        let diff = max_abs_diff(&reference_image(case), &base);
        println!("{:<20} differs from base by {diff:.3}", case.name);
        assert!(diff > 20.0 * IMAGE_TOLERANCE, "{} differs from base by only {diff}", case.name);
    }
    // The variants cover prompt, control image, frame, controlnet scale and guidance scale.
    for name in ["prompt2", "control2", "frame1", "cnscale03", "guidance1", "guidance3"] {
        assert!(all.iter().any(|c| c.name == name), "fixture case {name} is missing");
    }
}
