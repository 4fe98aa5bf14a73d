//! ops::Conv2d on CUDA (cuDNN or im2col, chosen per shape with the `cudnn` feature) against
//! candle's own convolution in f32 on the same GPU.
//!
//! Needs a GPU and a build with the `cuda` feature (CI has neither, so without the feature
//! this file is empty):
//!   scripts/build-cuda.sh --tests -- --test gpu_conv, then on the GPU machine run the binary
//!   (or `cargo test --release --features cudnn --test gpu_conv -- --nocapture`).
//! Prints the largest absolute difference of every case.
#![cfg(feature = "cuda")]

mod common;

use std::collections::HashMap;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::VarBuilder;
use common::max_abs_diff;
use sdcrossframe::ops::Conv2d;

#[test]
fn convolutions_match_candle_in_f32() {
    let dev = Device::new_cuda(0).expect("this test needs a CUDA GPU");
    // (batch, in, out, height, width, kernel, padding, stride): the UNet's 3x3 and 1x1 shapes,
    // a stride-2 downsampler, the VAE's 3-channel input, non-square and odd sizes.
    let cases = [
        (2, 320, 320, 64, 64, 3, 1, 1),
        (2, 1280, 1280, 8, 8, 3, 1, 1),
        (2, 640, 640, 32, 32, 1, 0, 1),
        (2, 320, 320, 64, 64, 3, 1, 2),
        (1, 3, 128, 96, 64, 3, 1, 1),
        (1, 64, 32, 17, 9, 3, 0, 1),
        (3, 8, 16, 5, 7, 1, 0, 1),
    ];
    for (n, c, k, h, w, kernel, padding, stride) in cases {
        let weight = (Tensor::randn(0f32, 1., (k, c, kernel, kernel), &dev).unwrap()
            / ((c * kernel * kernel) as f64).sqrt())
        .unwrap();
        let bias = Tensor::randn(0f32, 0.1, k, &dev).unwrap();
        let xs = Tensor::randn(0f32, 1., (n, c, h, w), &dev).unwrap();
        let reference = xs
            .conv2d(&weight, padding, stride, 1, 1)
            .unwrap()
            .broadcast_add(&bias.reshape((k, 1, 1)).unwrap())
            .unwrap();
        for (dtype, bound) in [(DType::F32, 1e-4), (DType::F16, 1e-2), (DType::BF16, 6e-2)] {
            let tensors: HashMap<String, Tensor> =
                [("weight".to_string(), weight.clone()), ("bias".to_string(), bias.clone())].into();
            let conv =
                Conv2d::new(VarBuilder::from_tensors(tensors, dtype, &dev), c, k, kernel, padding, stride).unwrap();
            let input = xs.to_dtype(dtype).unwrap();
            // The first call picks the method for this shape; the second reuses it.
            let first = conv.forward(&input).unwrap();
            let second = conv.forward(&input).unwrap();
            assert_eq!(first.dims(), reference.dims());
            assert_eq!(first.dtype(), dtype);
            let err = max_abs_diff(&first, &reference);
            println!(
                "{dtype:?} {n}x{c}x{h}x{w} -> {k}, {kernel}x{kernel} pad {padding} stride {stride}: max abs error {err:.3e}"
            );
            assert!(err < bound, "{dtype:?} case {:?}: {err} >= {bound}", (n, c, k, h, w, kernel, padding, stride));
            assert_eq!(max_abs_diff(&first, &second), 0.0, "a repeated call must give the same result");
        }
    }
}
