//! UNet2DConditionModel and ControlNetModel against diffusers' outputs on the tiny random
//! models (tests/fixtures/tiny-sd/unet, tests/fixtures/tiny-controlnet), plus the
//! self-attention hook contract.
//!
//! Run with `cargo test --test parity_unet -- --nocapture` to see the measured errors.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Result, Tensor};
use candle_nn::VarBuilder;
use sdcrossframe::models::attention::{NoHook, SelfAttentionHook};
use sdcrossframe::models::controlnet::{ControlNetConfig, ControlNetModel, ControlNetResiduals};
use sdcrossframe::models::unet::{UNet2DConditionConfig, UNet2DConditionModel};

const TOLERANCE: f32 = 1e-4;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn unet_config() -> UNet2DConditionConfig {
    let path = fixtures().join("tiny-sd/unet/config.json");
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

fn controlnet_config() -> ControlNetConfig {
    let path = fixtures().join("tiny-controlnet/config.json");
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

fn var_builder(path: PathBuf) -> VarBuilder<'static> {
    // SAFETY: the fixture files are not modified while the tests run.
    unsafe { VarBuilder::from_mmaped_safetensors(&[path], DType::F32, &Device::Cpu).unwrap() }
}

fn load_unet() -> UNet2DConditionModel {
    let vb = var_builder(fixtures().join("tiny-sd/unet/diffusion_pytorch_model.safetensors"));
    UNet2DConditionModel::new(vb, &unet_config()).unwrap()
}

fn load_controlnet() -> ControlNetModel {
    let vb = var_builder(fixtures().join("tiny-controlnet/diffusion_pytorch_model.safetensors"));
    ControlNetModel::new(vb, &controlnet_config()).unwrap()
}

fn reference(name: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixtures().join("reference").join(name), &Device::Cpu).unwrap()
}

fn scalar(t: &Tensor) -> f64 {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()[0] as f64
}

fn max_abs(t: &Tensor) -> f32 {
    t.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

/// Max abs error relative to the reference's max abs value; asserts it is within TOLERANCE.
fn assert_close(what: &str, got: &Tensor, want: &Tensor) -> f32 {
    assert_eq!(got.dims(), want.dims(), "{what}: shape");
    let err = max_abs(&(got - want).unwrap());
    let rel = err / max_abs(want);
    println!("{what}: max abs error {err:.3e}, relative to max |ref| {rel:.3e}");
    assert!(rel <= TOLERANCE, "{what}: relative error {rel:.3e} > {TOLERANCE:.0e} (max abs error {err:.3e})");
    rel
}

#[test]
fn unet_matches_diffusers_without_residuals() {
    let r = reference("unet.safetensors");
    let unet = load_unet();
    let out =
        unet.forward(&r["sample"], scalar(&r["timestep"]), &r["encoder_hidden_states"], None, &mut NoHook).unwrap();
    assert_close("unet out", &out, &r["out"]);
}

#[test]
fn unet_matches_diffusers_with_residuals() {
    let r = reference("unet.safetensors");
    let unet = load_unet();
    assert_eq!(unet.num_down_residuals(), 9);
    let down: Vec<Tensor> = (0..9).map(|i| r[&format!("down_residual.{i}")].clone()).collect();
    let residuals = ControlNetResiduals { down, mid: r["mid_residual"].clone() };
    let out = unet
        .forward(&r["sample"], scalar(&r["timestep"]), &r["encoder_hidden_states"], Some(residuals), &mut NoHook)
        .unwrap();
    assert_close("unet out_with_residuals", &out, &r["out_with_residuals"]);
    // The residuals must matter (guards against a reference that ignores them).
    assert!(max_abs(&(&r["out_with_residuals"] - &r["out"]).unwrap()) > 1e-2);
}

#[test]
fn unet_rejects_wrong_residual_count() {
    let r = reference("unet.safetensors");
    let unet = load_unet();
    let down: Vec<Tensor> = (0..8).map(|i| r[&format!("down_residual.{i}")].clone()).collect();
    let residuals = ControlNetResiduals { down, mid: r["mid_residual"].clone() };
    let err = unet
        .forward(&r["sample"], scalar(&r["timestep"]), &r["encoder_hidden_states"], Some(residuals), &mut NoHook)
        .unwrap_err()
        .to_string();
    assert!(err.contains("8 ControlNet down residuals") && err.contains("9 skip connections"), "{err}");
}

#[test]
fn controlnet_matches_diffusers() {
    let r = reference("controlnet.safetensors");
    let cn = load_controlnet();
    let res = cn
        .forward(
            &r["sample"],
            scalar(&r["timestep"]),
            &r["encoder_hidden_states"],
            &r["controlnet_cond"],
            scalar(&r["conditioning_scale"]),
        )
        .unwrap();
    assert_eq!(res.down.len(), 9);
    let mut worst = 0f32;
    for (i, d) in res.down.iter().enumerate() {
        worst = worst.max(assert_close(&format!("controlnet down.{i}"), d, &r[&format!("down.{i}")]));
    }
    worst = worst.max(assert_close("controlnet mid", &res.mid, &r["mid"]));
    println!("controlnet: worst relative error {worst:.3e}");
}

/// The pipeline embeds a frame's control image once (batch 1) and reuses it for every step
/// and both guidance halves; that must equal embedding the repeated image on every call.
#[test]
fn control_embedded_once_and_broadcast_equals_per_call_embedding() {
    let r = reference("controlnet.safetensors");
    let cn = load_controlnet();
    let (sample, t, ehs, scale) =
        (&r["sample"], scalar(&r["timestep"]), &r["encoder_hidden_states"], scalar(&r["conditioning_scale"]));
    let one = r["controlnet_cond"].narrow(0, 0, 1).unwrap();
    let per_call = cn.forward(sample, t, ehs, &one.repeat((2, 1, 1, 1)).unwrap(), scale).unwrap();
    let condition = cn.embed_condition(&one).unwrap();
    let once = cn.forward_embedded(sample, t, ehs, &condition, scale).unwrap();
    let mut worst = 0f32;
    for (a, b) in per_call.down.iter().chain([&per_call.mid]).zip(once.down.iter().chain([&once.mid])) {
        worst = worst.max(max_abs(&(a - b).unwrap()));
    }
    assert!(worst <= 1e-5, "broadcast embedding differs by {worst}");
    // And it is not vacuous: another control image changes the residuals.
    let other = cn.embed_condition(&r["controlnet_cond"].narrow(0, 1, 1).unwrap()).unwrap();
    let changed = cn.forward_embedded(sample, t, ehs, &other, scale).unwrap();
    assert!(max_abs(&(&changed.mid - &once.mid).unwrap()) > 1e-3);

    // The channels-last embedding (what CUDA runs in f16/bf16) computes the same, through the
    // CPU's transposed copies, and so do the residuals made with it.
    let embedder = cn.condition_embedder_on(&Device::Cpu).unwrap();
    assert!(!embedder.is_channels_last(), "the CPU model runs NCHW");
    let nhwc = embedder.to_channels_last().unwrap();
    assert!(nhwc.is_channels_last());
    let nhwc_condition = nhwc.embed_condition(&one).unwrap();
    assert_eq!(nhwc_condition.tensor().dims(), condition.tensor().dims());
    let diff = max_abs(&(nhwc_condition.tensor() - condition.tensor()).unwrap());
    assert!(diff <= 1e-5, "channels-last embedding differs by {diff}");
    let with_nhwc = cn.forward_embedded(sample, t, ehs, &nhwc_condition, scale).unwrap();
    let diff = max_abs(&(&with_nhwc.mid - &once.mid).unwrap());
    assert!(diff <= 1e-5, "residuals with the channels-last embedding differ by {diff}");

    // A control image whose embedding does not fit the latents is an error naming both shapes.
    let small = one.narrow(2, 0, 32).unwrap();
    let err = cn.forward_embedded(sample, t, ehs, &cn.embed_condition(&small).unwrap(), scale).unwrap_err();
    assert!(err.to_string().contains("does not fit latents"), "{err}");
    let odd = one.narrow(2, 0, 30).unwrap();
    let err = cn.embed_condition(&odd).unwrap_err().to_string();
    assert!(err.contains("multiple of 8"), "{err}");
}

/// Returns the layer's own projected keys/values and records what it saw.
#[derive(Default)]
struct Recorder {
    layers: Vec<String>,
    shapes: Vec<Vec<usize>>,
    replace: bool,
}

impl SelfAttentionHook for Recorder {
    fn self_attention(
        &mut self,
        layer: &str,
        hidden: &Tensor,
        project: &dyn Fn(&Tensor) -> Result<(Tensor, Tensor)>,
    ) -> Result<Option<(Tensor, Tensor)>> {
        self.layers.push(layer.to_string());
        self.shapes.push(hidden.dims().to_vec());
        if self.replace { project(hidden).map(Some) } else { Ok(None) }
    }
}

fn expected_attn1_layers() -> Vec<String> {
    let mut v = Vec::new();
    for (block, n) in
        [("down_blocks.0", 2), ("down_blocks.1", 2), ("mid_block", 1), ("up_blocks.1", 3), ("up_blocks.2", 3)]
    {
        for j in 0..n {
            v.push(format!("{block}.attentions.{j}.transformer_blocks.0.attn1"));
        }
    }
    v
}

#[test]
fn hook_sees_every_self_attention_in_forward_order() {
    let r = reference("unet.safetensors");
    let unet = load_unet();
    let mut rec = Recorder::default();
    unet.forward(&r["sample"], scalar(&r["timestep"]), &r["encoder_hidden_states"], None, &mut rec).unwrap();
    let expected = expected_attn1_layers();
    assert_eq!(rec.layers, expected);
    assert_eq!(unet.self_attention_layers(), expected.as_slice());
    // (batch, tokens, channels) of the norm1 output: 8x12 latents, 32 then 64 channels.
    let shapes: Vec<Vec<usize>> = [
        [2, 96, 32],
        [2, 96, 32],
        [2, 24, 64],
        [2, 24, 64],
        [2, 6, 64],
        [2, 24, 64],
        [2, 24, 64],
        [2, 24, 64],
        [2, 96, 32],
        [2, 96, 32],
        [2, 96, 32],
    ]
    .iter()
    .map(|s| s.to_vec())
    .collect();
    assert_eq!(rec.shapes, shapes);
}

#[test]
fn hook_returning_own_keys_values_changes_nothing() {
    let r = reference("unet.safetensors");
    let unet = load_unet();
    let (s, t, e) = (&r["sample"], scalar(&r["timestep"]), &r["encoder_hidden_states"]);
    let plain = unet.forward(s, t, e, None, &mut NoHook).unwrap();
    let mut rec = Recorder { replace: true, ..Default::default() };
    let hooked = unet.forward(s, t, e, None, &mut rec).unwrap();
    assert_eq!(rec.layers.len(), 11);
    let diff = max_abs(&(&plain - &hooked).unwrap());
    assert_eq!(diff, 0.0, "own K/V through the hook must be bit-identical");
}

/// Replaces K/V of the up-block layers with the layer's own K/V repeated twice along the
/// tokens (what cross-frame attention does with first == prev), or with zeros.
struct UpBlocks {
    mode: &'static str,
    calls: usize,
}

impl SelfAttentionHook for UpBlocks {
    fn self_attention(
        &mut self,
        layer: &str,
        hidden: &Tensor,
        project: &dyn Fn(&Tensor) -> Result<(Tensor, Tensor)>,
    ) -> Result<Option<(Tensor, Tensor)>> {
        if !layer.starts_with("up_blocks.") {
            return Ok(None);
        }
        self.calls += 1;
        let (k, v) = project(hidden)?;
        match self.mode {
            "double" => Ok(Some((Tensor::cat(&[&k, &k], 1)?, Tensor::cat(&[&v, &v], 1)?))),
            _ => Ok(Some((k.zeros_like()?, v.zeros_like()?))),
        }
    }
}

#[test]
fn hook_keys_values_are_used_and_may_be_longer() {
    let r = reference("unet.safetensors");
    let unet = load_unet();
    let (s, t, e) = (&r["sample"], scalar(&r["timestep"]), &r["encoder_hidden_states"]);
    let plain = unet.forward(s, t, e, None, &mut NoHook).unwrap();
    // Attending to [x; x] equals attending to x.
    let mut double = UpBlocks { mode: "double", calls: 0 };
    let doubled = unet.forward(s, t, e, None, &mut double).unwrap();
    assert_eq!(double.calls, 6);
    let err = max_abs(&(&plain - &doubled).unwrap()) / max_abs(&plain);
    println!("doubled K/V vs plain: relative error {err:.3e}");
    assert!(err < 1e-5, "{err}");
    // Replacing K/V changes the output.
    let mut zeros = UpBlocks { mode: "zeros", calls: 0 };
    let zeroed = unet.forward(s, t, e, None, &mut zeros).unwrap();
    assert!(max_abs(&(&plain - &zeroed).unwrap()) > 1e-3);
}

#[test]
fn wrong_channel_count_names_tensor_and_shapes() {
    let mut config = unet_config();
    config.in_channels = 5;
    let vb = var_builder(fixtures().join("tiny-sd/unet/diffusion_pytorch_model.safetensors"));
    let err = UNet2DConditionModel::new(vb, &config).unwrap_err().to_string();
    assert!(err.contains("conv_in.weight"), "{err}");
    assert!(err.contains("[32, 5, 3, 3]") && err.contains("[32, 4, 3, 3]"), "{err}");

    let mut config = unet_config();
    config.cross_attention_dim = sdcrossframe::models::unet_config::OneOrMany::One(48);
    let vb = var_builder(fixtures().join("tiny-sd/unet/diffusion_pytorch_model.safetensors"));
    let err = UNet2DConditionModel::new(vb, &config).unwrap_err().to_string();
    assert!(err.contains("down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"), "{err}");
    assert!(err.contains("[32, 48]") && err.contains("[32, 32]"), "{err}");

    let mut config = controlnet_config();
    config.conditioning_channels = 1;
    let vb = var_builder(fixtures().join("tiny-controlnet/diffusion_pytorch_model.safetensors"));
    let err = ControlNetModel::new(vb, &config).unwrap_err().to_string();
    assert!(err.contains("controlnet_cond_embedding.conv_in.weight"), "{err}");
    assert!(err.contains("[8, 1, 3, 3]") && err.contains("[8, 3, 3, 3]"), "{err}");
}

#[test]
fn unet_file_given_to_controlnet_is_rejected() {
    // The ControlNet loader must not accept the UNet's weights (a mixed-up path).
    let vb = var_builder(fixtures().join("tiny-sd/unet/diffusion_pytorch_model.safetensors"));
    let err = ControlNetModel::new(vb, &controlnet_config()).unwrap_err().to_string();
    assert!(err.contains("controlnet_cond_embedding"), "{err}");
}

#[test]
fn unet_and_controlnet_run_in_f16() {
    // dtype-generic code path (softmax in f32 for half types); f16 is only roughly equal.
    let r = reference("unet.safetensors");
    let c = reference("controlnet.safetensors");
    let f16 = |t: &Tensor| t.to_dtype(DType::F16).unwrap();
    let vb = unsafe {
        VarBuilder::from_mmaped_safetensors(
            &[fixtures().join("tiny-sd/unet/diffusion_pytorch_model.safetensors")],
            DType::F16,
            &Device::Cpu,
        )
        .unwrap()
    };
    let unet = UNet2DConditionModel::new(vb, &unet_config()).unwrap();
    let out = unet
        .forward(&f16(&r["sample"]), scalar(&r["timestep"]), &f16(&r["encoder_hidden_states"]), None, &mut NoHook)
        .unwrap();
    assert_eq!(out.dtype(), DType::F16);
    let out = out.to_dtype(DType::F32).unwrap();
    let rel = max_abs(&(&out - &r["out"]).unwrap()) / max_abs(&r["out"]);
    println!("unet f16: relative error {rel:.3e}");
    assert!(rel < 3e-2, "{rel}");

    let vb = unsafe {
        VarBuilder::from_mmaped_safetensors(
            &[fixtures().join("tiny-controlnet/diffusion_pytorch_model.safetensors")],
            DType::F16,
            &Device::Cpu,
        )
        .unwrap()
    };
    let cn = ControlNetModel::new(vb, &controlnet_config()).unwrap();
    let res = cn
        .forward(
            &f16(&c["sample"]),
            scalar(&c["timestep"]),
            &f16(&c["encoder_hidden_states"]),
            &f16(&c["controlnet_cond"]),
            scalar(&c["conditioning_scale"]),
        )
        .unwrap();
    let mid = res.mid.to_dtype(DType::F32).unwrap();
    let rel = max_abs(&(&mid - &c["mid"]).unwrap()) / max_abs(&c["mid"]);
    println!("controlnet mid f16: relative error {rel:.3e}");
    assert!(rel < 3e-2, "{rel}");
}

/// A latent size that does not halve evenly (9x13 -> 5x7 -> 3x4): the up blocks must
/// upsample to the skip connection's size, as diffusers does with explicit upsample sizes.
#[test]
fn odd_latent_size_matches_diffusers() {
    let r = reference("unet_odd.safetensors");
    let controlnet = load_controlnet();
    let residuals = controlnet
        .forward(
            &r["sample"],
            scalar(&r["timestep"]),
            &r["encoder_hidden_states"],
            &r["controlnet_cond"],
            scalar(&r["conditioning_scale"]),
        )
        .unwrap();
    for (i, got) in residuals.down.iter().enumerate() {
        assert_close(&format!("odd down.{i}"), got, &r[&format!("down.{i}")]);
    }
    assert_close("odd mid", &residuals.mid, &r["mid"]);
    let out = load_unet()
        .forward(&r["sample"], scalar(&r["timestep"]), &r["encoder_hidden_states"], Some(residuals), &mut NoHook)
        .unwrap();
    assert_close("odd out", &out, &r["out"]);
}
