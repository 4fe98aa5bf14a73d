//! The fused element-wise kernels (`kernels/elementwise.cu`: bias adds with a residual, GEGLU)
//! and the GEMM form of 1x1 convolutions on CUDA, against candle's ops on the CPU.
//!
//! Needs a GPU and a build with the `cuda` feature (CI has neither, so without the feature
//! this file is empty):
//!   scripts/build-cuda.sh --tests -- --test gpu_fused, then on the GPU machine run the binary
//!   (or `cargo test --release --features cuda --test gpu_fused -- --nocapture`).
//! Prints the largest absolute difference of every case.
#![cfg(feature = "cuda")]

mod common;

use candle_core::{D, DType, Device, Module, Tensor};
use candle_nn::{Linear, VarBuilder};
use sdcrossframe::ops::Conv2d;
use sdcrossframe::ops::fused;

const CASES: [(DType, f32); 3] = [(DType::F32, 1e-4), (DType::F16, 2e-2), (DType::BF16, 1.5e-1)];

fn gpu() -> Device {
    Device::new_cuda(0).expect("this test needs a CUDA GPU")
}

/// Largest difference of a GPU result from a CPU reference.
fn max_abs_diff(gpu_result: &Tensor, reference: &Tensor) -> f32 {
    common::max_abs_diff(&gpu_result.to_device(&Device::Cpu).unwrap(), reference)
}

fn randn(shape: &[usize]) -> Tensor {
    Tensor::randn(0f32, 1.0, shape, &Device::Cpu).unwrap()
}

fn on(t: &Tensor, dtype: DType, dev: &Device) -> Tensor {
    t.to_dtype(dtype).unwrap().to_device(dev).unwrap()
}

#[test]
fn bias_adds_match_candle_broadcasting() {
    let gpu = gpu();
    // UNet-sized maps (vector path), odd sizes (scalar path), a per-sample bias.
    for shape in [[2usize, 320, 64, 64], [2, 7, 5, 3], [1, 12, 3, 8]] {
        let (x, r) = (randn(&shape), randn(&shape));
        let channel = randn(&[shape[1]]);
        let per_sample = randn(&[shape[0], shape[1]]);
        let c4 = |t: &Tensor, n| t.reshape((n, shape[1], 1, 1)).unwrap();
        let expected = (x.broadcast_add(&c4(&channel, 1)).unwrap() + &r).unwrap();
        let expected_sample = x.broadcast_add(&c4(&per_sample, shape[0])).unwrap();
        for (dtype, bound) in CASES {
            let got =
                fused::add_channel_bias(&on(&x, dtype, &gpu), &on(&channel, dtype, &gpu), Some(&on(&r, dtype, &gpu)))
                    .unwrap();
            let err = max_abs_diff(&got, &expected);
            println!("channel bias + residual {shape:?} {dtype:?}: max abs diff {err:.2e}");
            assert!(err < bound * 2.0, "{shape:?} {dtype:?}: {err}");
            let got = fused::add_channel_bias(&on(&x, dtype, &gpu), &on(&per_sample, dtype, &gpu), None).unwrap();
            let err = max_abs_diff(&got, &expected_sample);
            assert!(err < bound * 2.0, "per-sample {shape:?} {dtype:?}: {err}");
        }
    }
    // 16 x 4096 x 320: more 16-byte words than one flat launch has threads (they loop).
    for shape in [[2usize, 4096, 320], [16, 4096, 320], [3, 7, 5]] {
        let (x, r) = (randn(&shape), randn(&shape));
        let bias = randn(&[shape[2]]);
        let expected = (x.broadcast_add(&bias).unwrap() + &r).unwrap();
        for (dtype, bound) in CASES {
            let got =
                fused::add_feature_bias(&on(&x, dtype, &gpu), &on(&bias, dtype, &gpu), Some(&on(&r, dtype, &gpu)))
                    .unwrap();
            let err = max_abs_diff(&got, &expected);
            println!("feature bias + residual {shape:?} {dtype:?}: max abs diff {err:.2e}");
            assert!(err < bound * 2.0, "{shape:?} {dtype:?}: {err}");
        }
    }
}

/// A ControlNet residual's scaled bias, the mid residual's plain sum and the up blocks' channel
/// concat with the skip connection's residual added.
#[test]
fn scaled_bias_sum_and_channel_concat_match_candle() {
    let gpu = gpu();
    for shape in [[2usize, 320, 64, 64], [16, 1280, 8, 8], [1, 3, 3, 3]] {
        let (x, r) = (randn(&shape), randn(&shape));
        let bias = randn(&[shape[1]]);
        let expected_scaled = (x.broadcast_add(&bias.reshape((1, shape[1], 1, 1)).unwrap()).unwrap() * 0.7).unwrap();
        let expected_sum = (&x + &r).unwrap();
        for (dtype, bound) in CASES {
            let got = fused::scale_channel_bias(&on(&x, dtype, &gpu), &on(&bias, dtype, &gpu), 0.7).unwrap();
            let err = max_abs_diff(&got, &expected_scaled);
            println!("scaled channel bias {shape:?} {dtype:?}: max abs diff {err:.2e}");
            assert!(err < bound * 2.0, "scaled {shape:?} {dtype:?}: {err}");
            let got = fused::add(&on(&x, dtype, &gpu), &on(&r, dtype, &gpu)).unwrap();
            let err = max_abs_diff(&got, &expected_sum);
            println!("sum {shape:?} {dtype:?}: max abs diff {err:.2e}");
            assert!(err < bound * 2.0, "sum {shape:?} {dtype:?}: {err}");
        }
    }
    // (first, second): SD1.5 up-block inputs at 2 and 16 rows, and odd sizes that fall back to
    // candle's add and cat.
    let pairs: [([usize; 4], [usize; 4]); 4] = [
        ([2, 640, 32, 32], [2, 320, 32, 32]),
        ([16, 320, 64, 64], [16, 320, 64, 64]),
        ([16, 1280, 8, 8], [16, 1280, 8, 8]),
        ([2, 3, 3, 5], [2, 2, 3, 5]),
    ];
    for (first, second) in pairs {
        let (a, b, r) = (randn(&first), randn(&second), randn(&second));
        let expected = Tensor::cat(&[&a, &(&b + &r).unwrap()], 1).unwrap();
        let expected_plain = Tensor::cat(&[&a, &b], 1).unwrap();
        for (dtype, bound) in CASES {
            let (ga, gb, gr) = (on(&a, dtype, &gpu), on(&b, dtype, &gpu), on(&r, dtype, &gpu));
            let got = fused::concat_channels(&ga, &gb, Some(&gr)).unwrap();
            assert_eq!(got.dims(), expected.dims());
            let err = max_abs_diff(&got, &expected);
            println!("concat {first:?} + {second:?} with residual {dtype:?}: max abs diff {err:.2e}");
            assert!(err < bound * 2.0, "concat {first:?} {second:?} {dtype:?}: {err}");
            let err = max_abs_diff(&fused::concat_channels(&ga, &gb, None).unwrap(), &expected_plain);
            // A plain copy: exact up to the dtype's rounding of the inputs.
            assert!(err < bound, "concat {first:?} {second:?} {dtype:?} without residual: {err}");
        }
    }
}

/// Weights of unit-variance outputs, as trained layers have (unscaled random weights made GEGLU
/// outputs of ~50, where f16's rounding alone exceeds an absolute bound).
fn linear(out: usize, inp: usize) -> Linear {
    Linear::new((randn(&[out, inp]) / (inp as f64).sqrt()).unwrap(), Some(randn(&[out])))
}

fn linear_on(l: &Linear, dtype: DType, dev: &Device) -> Linear {
    Linear::new(on(l.weight(), dtype, dev), l.bias().map(|b| on(b, dtype, dev)))
}

#[test]
fn linear_and_geglu_match_candle() {
    let gpu = gpu();
    for (tokens, dim) in [(4096usize, 320usize), (77, 12)] {
        let x = randn(&[2, tokens, dim]);
        let r = randn(&[2, tokens, dim]);
        let proj = linear(dim * 8, dim);
        let chunks = proj.forward(&x).unwrap().chunk(2, D::Minus1).unwrap();
        let expected_geglu = (&chunks[0] * chunks[1].gelu_erf().unwrap()).unwrap();
        let out = linear(dim, dim);
        let expected_linear = (out.forward(&x).unwrap() + &r).unwrap();
        for (dtype, bound) in CASES {
            let got = fused::geglu(&linear_on(&proj, dtype, &gpu), &on(&x, dtype, &gpu)).unwrap();
            let err = max_abs_diff(&got, &expected_geglu);
            println!("GEGLU 2x{tokens}x{dim} {dtype:?}: max abs diff {err:.2e}");
            assert!(err < bound * 4.0, "GEGLU {tokens}x{dim} {dtype:?}: {err}");
            let got =
                fused::linear(&linear_on(&out, dtype, &gpu), &on(&x, dtype, &gpu), Some(&on(&r, dtype, &gpu))).unwrap();
            let err = max_abs_diff(&got, &expected_linear);
            println!("linear + residual 2x{tokens}x{dim} {dtype:?}: max abs diff {err:.2e}");
            assert!(err < bound * 4.0, "linear {tokens}x{dim} {dtype:?}: {err}");
        }
    }
}

#[test]
fn pointwise_convolutions_as_gemms_match_candle_conv() {
    let gpu = gpu();
    let (cin, cout, h, w) = (64, 48, 16, 12);
    let weight = (randn(&[cout, cin, 1, 1]) * 0.2).unwrap();
    let bias = randn(&[cout]);
    let conv_on = |dtype, dev: &Device| {
        let vb = VarBuilder::from_tensors(
            [("weight".to_string(), on(&weight, dtype, dev)), ("bias".to_string(), on(&bias, dtype, dev))]
                .into_iter()
                .collect(),
            dtype,
            dev,
        );
        Conv2d::new(vb, cin, cout, 1, 0, 1).unwrap()
    };
    let cpu_conv = conv_on(DType::F32, &Device::Cpu);
    let x = randn(&[2, cin, h, w]);
    let r = randn(&[2, cout, h, w]);
    let expected = cpu_conv.forward(&x).unwrap();
    let expected_tokens = expected.permute((0, 2, 3, 1)).unwrap().reshape((2, h * w, cout)).unwrap();
    let tokens_in = x.permute((0, 2, 3, 1)).unwrap().reshape((2, h * w, cin)).unwrap();
    let expected_from_tokens = (cpu_conv.forward(&x).unwrap() + &r).unwrap();
    for (dtype, bound) in CASES {
        let conv = conv_on(dtype, &gpu);
        let xg = on(&x, dtype, &gpu);
        let err = max_abs_diff(&conv.forward(&xg).unwrap(), &expected);
        println!("1x1 conv {dtype:?}: max abs diff {err:.2e}");
        assert!(err < bound * 4.0, "{dtype:?}: {err}");
        let err = max_abs_diff(&conv.forward_to_tokens(&xg).unwrap(), &expected_tokens);
        assert!(err < bound * 4.0, "to tokens {dtype:?}: {err}");
        let got = conv.forward_from_tokens(&on(&tokens_in, dtype, &gpu), (h, w), &on(&r, dtype, &gpu)).unwrap();
        let err = max_abs_diff(&got, &expected_from_tokens);
        println!("1x1 conv from tokens + residual {dtype:?}: max abs diff {err:.2e}");
        assert!(err < bound * 4.0, "from tokens {dtype:?}: {err}");
    }
}

#[test]
fn layer_norm_matches_candle_nn() {
    let gpu = gpu();
    // The transformer widths (320, 640, 1280), the kernel's widest row (2048), an odd width
    // (candle-nn's kernel then).
    for (rows, width) in [(8192usize, 320usize), (2048, 640), (512, 1280), (77, 2048), (33, 12)] {
        let x = ((randn(&[2, rows, width]) * 2.0).unwrap() + 0.5).unwrap();
        let (weight, bias) = (randn(&[width]), randn(&[width]));
        let expected = candle_nn::LayerNorm::new(weight.clone(), bias.clone(), 1e-5).forward(&x).unwrap();
        for (dtype, bound) in CASES {
            let norm = candle_nn::LayerNorm::new(on(&weight, dtype, &gpu), on(&bias, dtype, &gpu), 1e-5);
            let got = fused::layer_norm(&norm, &on(&x, dtype, &gpu)).unwrap();
            let err = max_abs_diff(&got, &expected);
            println!("LayerNorm 2x{rows}x{width} {dtype:?}: max abs diff {err:.2e}");
            assert!(err < bound * 4.0, "LayerNorm {rows}x{width} {dtype:?}: {err}");
        }
    }
}
