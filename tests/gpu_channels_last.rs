//! The channels-last resnet path on CUDA (`kernels/channels_last.cu`, cuDNN's NHWC
//! convolutions) against the CPU: its GroupNorm kernel from either layout, the pass back to
//! NCHW, an NHWC convolution against the NCHW one, the sub-pixel upsampler, whole UNet-shaped
//! resnet blocks, and the
//! channels-last tiny VAE and control-image embedding (f16 on the GPU, f32 on the CPU, same
//! weights).
//!
//! Needs a GPU and a build with the `cuda` and `cudnn` features (CI has neither, so without
//! them this file is empty):
//!   scripts/build-cuda.sh --tests -- --test gpu_channels_last, then on the GPU machine run the
//!   binary. Prints the largest absolute difference of every case.
#![cfg(all(feature = "cuda", feature = "cudnn"))]

mod common;

use std::collections::HashMap;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::VarBuilder;
use sdcrossframe::models::resnet::{ResnetBlock2D, ResnetBlock2DConfig, TimeEmbedding};
use sdcrossframe::models::unet_blocks::Upsample2D;
use sdcrossframe::ops::Conv2d;
use sdcrossframe::ops::channels_last::{self, InputLayout};
use sdcrossframe::ops::subpixel::SubpixelUpsample;

fn gpu() -> Device {
    Device::new_cuda(0).expect("this test needs a CUDA GPU")
}

fn randn(shape: &[usize], std: f32) -> Tensor {
    Tensor::randn(0f32, std, shape, &Device::Cpu).unwrap()
}

/// Largest difference of a GPU result from a CPU one.
fn max_abs_diff(gpu_result: &Tensor, reference: &Tensor) -> f32 {
    common::max_abs_diff(&gpu_result.to_device(&Device::Cpu).unwrap(), reference)
}

#[test]
fn group_norm_kernel_matches_the_cpu_reference() {
    let gpu = gpu();
    // UNet shapes (10, 20 and 40 channels per group), a row past the one-launch kernel (960
    // channels at 64x64: the NCHW kernels and a transpose), an odd spatial size, more channels
    // than one NHWC block row of 256 threads holds (2560: one row of 320 threads).
    for (n, c, h, w) in
        [(2, 320, 64, 64), (2, 640, 32, 32), (8, 1280, 8, 8), (2, 960, 64, 64), (1, 64, 7, 9), (1, 2560, 5, 3)]
    {
        let x = (randn(&[n, c, h, w], 2.0) + 0.5).unwrap().to_dtype(DType::F16).unwrap();
        let affine = (randn(&[2, c], 0.5) + 0.5).unwrap().to_dtype(DType::F16).unwrap();
        let bias = randn(&[n, c], 1.0).to_dtype(DType::F16).unwrap();
        let nhwc = x.permute((0, 2, 3, 1)).unwrap().contiguous().unwrap();
        for (layout, input) in [(InputLayout::Nchw, &x), (InputLayout::Nhwc, &nhwc)] {
            for in_bias in [None, Some(&bias)] {
                let cpu = channels_last::group_norm_silu(input, layout, in_bias, &affine, 32, 1e-5).unwrap();
                let on = |t: &Tensor| t.to_device(&gpu).unwrap();
                let on_gpu = || {
                    let in_bias = in_bias.map(on);
                    channels_last::group_norm_silu(&on(input), layout, in_bias.as_ref(), &on(&affine), 32, 1e-5)
                        .unwrap()
                };
                let out = on_gpu();
                assert_eq!(out.dims(), &[n, h, w, c]);
                let err = max_abs_diff(&out, &cpu.to_dtype(DType::F32).unwrap());
                println!("GroupNorm {layout:?} {n}x{c}x{h}x{w} bias {}: max abs diff {err:.3e}", in_bias.is_some());
                // One f16 rounding step of outputs up to about 8.
                assert!(err <= 8e-3, "{layout:?} {n}x{c}x{h}x{w}: {err}");
                // The statistics are added in a fixed order: every call gives the same bits
                // (CUDA graph replays are compared with eager runs for equality).
                let same = max_abs_diff(&out, &on_gpu().to_device(&Device::Cpu).unwrap());
                assert_eq!(same, 0.0, "{layout:?} {n}x{c}x{h}x{w}: two calls differ");
            }
        }
    }
}

#[test]
fn pass_back_to_nchw_matches_the_cpu() {
    let gpu = gpu();
    for (n, h, w, c) in [(2, 64, 64, 320), (8, 8, 8, 1280), (1, 7, 9, 40)] {
        let ys = randn(&[n, h, w, c], 1.0).to_dtype(DType::F16).unwrap();
        let bias = randn(&[c], 1.0).to_dtype(DType::F16).unwrap();
        let residual = randn(&[n, c, h, w], 1.0).to_dtype(DType::F16).unwrap();
        let cpu = channels_last::to_nchw_add(&ys, &bias, &residual).unwrap().to_dtype(DType::F32).unwrap();
        let on = |t: &Tensor| t.to_device(&gpu).unwrap();
        let out = channels_last::to_nchw_add(&on(&ys), &on(&bias), &on(&residual)).unwrap();
        assert_eq!(out.dims(), &[n, c, h, w]);
        let err = max_abs_diff(&out, &cpu);
        println!("to NCHW {n}x{h}x{w}x{c}: max abs diff {err:.3e}");
        assert!(err <= 4e-3, "{n}x{h}x{w}x{c}: {err}");
    }
}

#[test]
fn nhwc_convolution_matches_the_nchw_one() {
    let gpu = gpu();
    // UNet shapes, and the tiny test model's (32 and 64 channels at 8x8 and 4x4).
    for (n, c, k, h, w, stride) in [
        (2, 320, 320, 64, 64, 1),
        (2, 960, 320, 64, 64, 1),
        (8, 1280, 1280, 8, 8, 1),
        (2, 320, 320, 64, 64, 2),
        (2, 32, 32, 8, 8, 1),
        (2, 96, 64, 4, 4, 1),
        (1, 64, 64, 4, 4, 1),
    ] {
        let weight = (randn(&[k, c, 3, 3], 1.0) / (9.0 * c as f64).sqrt()).unwrap();
        let tensors = HashMap::from([("weight".to_string(), weight), ("bias".to_string(), randn(&[k], 1.0))]);
        let vb = VarBuilder::from_tensors(tensors, DType::F16, &gpu);
        let conv = Conv2d::same(vb, c, k, 3, stride).unwrap();
        let x = randn(&[n, c, h, w], 1.0).to_dtype(DType::F16).unwrap().to_device(&gpu).unwrap();
        let nchw = conv.forward(&x).unwrap();
        let bias = conv.bias().unwrap().reshape((1, k, 1, 1)).unwrap();
        let conv_cl = conv.clone().to_channels_last().unwrap();
        let x_cl = x.permute((0, 2, 3, 1)).unwrap().contiguous().unwrap();
        let out = conv_cl.convolve_channels_last(&x_cl).unwrap();
        let again = conv_cl.convolve_channels_last(&x_cl).unwrap();
        let bits_differ = common::max_abs_diff(
            &out.to_dtype(DType::F32).unwrap().to_device(&Device::Cpu).unwrap(),
            &again.to_dtype(DType::F32).unwrap().to_device(&Device::Cpu).unwrap(),
        );
        println!("conv {n}x{c}x{h}x{w} -> {k} stride {stride}: two NHWC calls differ by {bits_differ:.3e}");
        assert_eq!(bits_differ, 0.0, "the NHWC convolution is not deterministic");
        let out = out.permute((0, 3, 1, 2)).unwrap();
        let out = out.broadcast_add(&bias).unwrap();
        let err = common::max_abs_diff(&out.to_device(&Device::Cpu).unwrap(), &nchw.to_device(&Device::Cpu).unwrap());
        println!("conv {n}x{c}x{h}x{w} -> {k} stride {stride}: NHWC vs NCHW max abs diff {err:.3e}");
        assert!(err <= 1e-2, "{err}");
        // The NCHW entry point of a channels-last filter (a transposed view) still convolves.
        let err = common::max_abs_diff(
            &conv_cl.forward(&x).unwrap().to_device(&Device::Cpu).unwrap(),
            &nchw.to_device(&Device::Cpu).unwrap(),
        );
        assert!(err <= 1e-2, "NCHW call of a channels-last filter: {err}");
    }
}

#[test]
fn subpixel_upsampler_matches_the_cpu() {
    let gpu = gpu();
    // The UNet's three upsamplers at 512x512 (2 and 4 rows), the SD VAE's widest, the tiny test
    // model's, and channel counts off the kernels' tiles (40; 12, which cuDNN's NHWC filter pads).
    for (n, c, h, w) in [
        (2, 1280, 8, 8),
        (4, 1280, 16, 16),
        (2, 640, 32, 32),
        (1, 512, 64, 64),
        (2, 64, 4, 4),
        (1, 40, 5, 7),
        (3, 12, 3, 2),
    ] {
        let weight = (randn(&[c, c, 3, 3], 1.0) / (9.0 * c as f64).sqrt()).unwrap();
        let bias = randn(&[c], 1.0);
        let tensors = HashMap::from([("weight".to_string(), weight), ("bias".to_string(), bias)]);
        let x = randn(&[n, c, h, w], 1.0);
        // The reference: nearest 2x upsampling, then the convolution, in f32 on the CPU.
        let cpu_conv =
            Conv2d::same(VarBuilder::from_tensors(tensors.clone(), DType::F32, &Device::Cpu), c, c, 3, 1).unwrap();
        let expected = cpu_conv.forward(&x.upsample_nearest2d(2 * h, 2 * w).unwrap()).unwrap();
        let conv = Conv2d::same(VarBuilder::from_tensors(tensors, DType::F16, &gpu), c, c, 3, 1).unwrap();
        let x_gpu = x.to_dtype(DType::F16).unwrap().to_device(&gpu).unwrap();
        let two_step = conv.forward(&x_gpu.upsample_nearest2d(2 * h, 2 * w).unwrap()).unwrap();
        let upsampler = SubpixelUpsample::new(&conv).unwrap();
        let out = upsampler.forward(&x_gpu).unwrap();
        assert_eq!(out.dims(), &[n, c, 2 * h, 2 * w]);
        let err = max_abs_diff(&out.to_dtype(DType::F32).unwrap(), &expected);
        let two_step_err = max_abs_diff(&two_step.to_dtype(DType::F32).unwrap(), &expected);
        let again = upsampler.forward(&x_gpu).unwrap().to_device(&Device::Cpu).unwrap();
        let bits_differ = max_abs_diff(&out, &again);
        println!(
            "sub-pixel upsampler {n}x{c}x{h}x{w}: max abs diff {err:.3e} (upsampling + convolution on the GPU: {two_step_err:.3e}); two calls differ by {bits_differ:.1e}"
        );
        // f16 outputs up to about 6, and phase filters rounded once more than the 3x3 one.
        assert!(err <= 1.5e-2, "{n}x{c}x{h}x{w}: {err}");
        assert_eq!(bits_differ, 0.0, "{n}x{c}x{h}x{w}: the sub-pixel upsampler is not deterministic");
        // The model's upsampler: sub-pixel at 2x, and at an odd target size the two-step form
        // with its filter uploaded from host memory (the same values as on the GPU).
        let model_upsampler = Upsample2D::from_conv(conv.clone(), true).unwrap();
        let at_2x = model_upsampler.forward(&x_gpu, None).unwrap().to_device(&Device::Cpu).unwrap();
        assert_eq!(max_abs_diff(&out, &at_2x), 0.0, "{n}x{c}x{h}x{w}: Upsample2D at 2x");
        let odd = (2 * h - 1, 2 * w);
        let expected_odd = conv.forward(&x_gpu.upsample_nearest2d(odd.0, odd.1).unwrap()).unwrap();
        let got_odd = model_upsampler.forward(&x_gpu, Some(odd)).unwrap().to_device(&Device::Cpu).unwrap();
        assert_eq!(max_abs_diff(&expected_odd, &got_odd), 0.0, "{n}x{c}x{h}x{w}: Upsample2D at {odd:?}");
    }
}

#[test]
fn resnet_blocks_match_the_cpu() {
    let gpu = gpu();
    assert!(
        channels_last::wanted(&gpu, DType::F16),
        "this build or environment has the channels-last path off (SDCROSSFRAME_CHANNELS_LAST=off?)"
    );
    // With a shortcut convolution (in != out) and without; a 64x64 and an 8x8 level; and the
    // SD VAE's blocks, which have no time embedding (eps 1e-6), up to its full-resolution level.
    for (n, cin, cout, size, temb_channels) in [
        (2, 320, 640, 32, Some(64)),
        (2, 320, 320, 64, Some(64)),
        (3, 1280, 1280, 8, Some(64)),
        (1, 256, 128, 256, None),
        (1, 128, 128, 512, None),
    ] {
        let mut tensors = HashMap::new();
        let mut put = |name: &str, t: Tensor| tensors.insert(name.to_string(), t);
        put("norm1.weight", (randn(&[cin], 0.2) + 1.0).unwrap());
        put("norm1.bias", randn(&[cin], 0.2));
        put("conv1.weight", (randn(&[cout, cin, 3, 3], 1.0) / (9.0 * cin as f64).sqrt()).unwrap());
        put("conv1.bias", randn(&[cout], 0.1));
        if let Some(t) = temb_channels {
            put("time_emb_proj.weight", (randn(&[cout, t], 1.0) / 8.0).unwrap());
            put("time_emb_proj.bias", randn(&[cout], 0.1));
        }
        put("norm2.weight", (randn(&[cout], 0.2) + 1.0).unwrap());
        put("norm2.bias", randn(&[cout], 0.2));
        put("conv2.weight", (randn(&[cout, cout, 3, 3], 1.0) / (9.0 * cout as f64).sqrt()).unwrap());
        put("conv2.bias", randn(&[cout], 0.1));
        if cin != cout {
            put("conv_shortcut.weight", (randn(&[cout, cin, 1, 1], 1.0) / (cin as f64).sqrt()).unwrap());
            put("conv_shortcut.bias", randn(&[cout], 0.1));
        }
        let config = ResnetBlock2DConfig {
            out_channels: cout,
            temb_channels,
            groups: 32,
            eps: if temb_channels.is_some() { 1e-5 } else { 1e-6 },
            output_scale_factor: 1.0,
        };
        let gpu_tensors: HashMap<String, Tensor> =
            tensors.iter().map(|(k, v)| (k.clone(), v.to_device(&gpu).unwrap())).collect();
        let cpu_block =
            ResnetBlock2D::new(VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu), cin, &config).unwrap();
        let gpu_block =
            ResnetBlock2D::new(VarBuilder::from_tensors(gpu_tensors, DType::F16, &gpu), cin, &config).unwrap();
        assert!(gpu_block.is_channels_last() && !cpu_block.is_channels_last(), "the GPU block must take the NHWC path");
        let x = randn(&[n, cin, size, size], 1.0);
        let emb = temb_channels.map(|t| randn(&[n, t], 1.0));
        let cpu_temb = emb.as_ref().map(|e| TimeEmbedding::new(e, None).unwrap());
        let expected = cpu_block.forward(&x, cpu_temb.as_ref()).unwrap();
        let on = |t: &Tensor| t.to_dtype(DType::F16).unwrap().to_device(&gpu).unwrap();
        let gpu_temb = emb.as_ref().map(|e| TimeEmbedding::new(&on(e), None).unwrap());
        let out = gpu_block.forward(&on(&x), gpu_temb.as_ref()).unwrap();
        assert_eq!(out.dims(), expected.dims());
        let err = max_abs_diff(&out.to_dtype(DType::F32).unwrap(), &expected);
        println!("resnet {n}x{cin}x{size}x{size} -> {cout}: f16 GPU vs f32 CPU max abs diff {err:.3e}");
        assert!(err <= 3e-2, "{n}x{cin}x{size}x{size} -> {cout}: {err}");
    }
}

/// The tiny VAE (TAESD) and the ControlNet's control-image embedding run channels-last when
/// loaded on CUDA in f16 (NHWC activations, filters padded to 8 channels for the 3-channel
/// image and the 4-channel latents, bias + skip + activation in one pass): against the same
/// fixture models in f32 on the CPU (NCHW).
#[test]
fn tiny_vae_and_control_embedding_match_the_cpu() {
    use sdcrossframe::models::controlnet::{ControlNetConfig, ControlNetModel};
    use sdcrossframe::models::vae_tiny::{AutoencoderTiny, AutoencoderTinyConfig};
    use sdcrossframe::weights::ComponentFiles;

    let gpu = gpu();
    let fixtures = common::fixtures();
    let taesd = ComponentFiles::locate(&fixtures.join("tiny-taesd"), None).unwrap();
    let config: AutoencoderTinyConfig = taesd.read_config().unwrap();
    let cpu_vae = AutoencoderTiny::new(taesd.var_builder(DType::F32, &Device::Cpu).unwrap(), &config).unwrap();
    let gpu_vae = AutoencoderTiny::new(taesd.var_builder(DType::F16, &gpu).unwrap(), &config).unwrap();
    assert!(gpu_vae.is_channels_last() && !cpu_vae.is_channels_last());
    let image = (randn(&[2, 3, 64, 48], 0.5).tanh().unwrap()).contiguous().unwrap();
    let want = cpu_vae.encode(&image).unwrap();
    let got = gpu_vae.encode(&image.to_dtype(DType::F16).unwrap().to_device(&gpu).unwrap()).unwrap();
    assert_eq!(got.dims(), want.dims());
    let err = max_abs_diff(&got.to_dtype(DType::F32).unwrap(), &want);
    let scale = want.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    println!("TAESD encode f16 channels-last vs CPU: max abs diff {err:.3e} (max {scale:.2})");
    assert!(err < 1e-2 * scale.max(1.0), "encode off by {err}");
    let latents = randn(&[2, 4, 8, 6], 1.0);
    let want = cpu_vae.decode(&latents).unwrap();
    let got = gpu_vae.decode(&latents.to_dtype(DType::F16).unwrap().to_device(&gpu).unwrap()).unwrap();
    assert_eq!(got.dims(), want.dims());
    let err = max_abs_diff(&got.to_dtype(DType::F32).unwrap(), &want);
    println!("TAESD decode f16 channels-last vs CPU: max abs diff {err:.3e}");
    assert!(err < 1e-2, "decode off by {err}");

    let controlnet = fixtures.join("tiny-controlnet");
    let config: ControlNetConfig =
        serde_json::from_str(&std::fs::read_to_string(controlnet.join("config.json")).unwrap()).unwrap();
    let weights = controlnet.join("diffusion_pytorch_model.safetensors");
    let load = |dtype, device: &Device| {
        // SAFETY: the fixture file is not modified while mapped.
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[&weights], dtype, device).unwrap() };
        ControlNetModel::new(vb, &config).unwrap()
    };
    let (cpu_cn, gpu_cn) = (load(DType::F32, &Device::Cpu), load(DType::F16, &gpu));
    assert!(gpu_cn.condition_embedder_on(&gpu).unwrap().is_channels_last());
    let control = Tensor::rand(0f32, 1.0, (1, 3, 64, 48), &Device::Cpu).unwrap();
    let want = cpu_cn.embed_condition(&control).unwrap();
    let got = gpu_cn.embed_condition(&control.to_dtype(DType::F16).unwrap().to_device(&gpu).unwrap()).unwrap();
    assert_eq!(got.tensor().dims(), want.tensor().dims());
    let err = max_abs_diff(&got.tensor().to_dtype(DType::F32).unwrap(), want.tensor());
    let scale = want.tensor().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    println!("control embedding f16 channels-last vs CPU: max abs diff {err:.3e} (max {scale:.2})");
    assert!(scale > 0.0, "the fixture's embedding is all zeros: the comparison would say nothing");
    assert!(err < 1e-2 * scale.max(1.0), "control embedding off by {err}");
}
