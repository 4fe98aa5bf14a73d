//! The GroupNorm CUDA kernel (`kernels/group_norm.cu`) against candle-nn's GroupNorm on the CPU.
//!
//! Needs a GPU and a build with the `cuda` feature (CI has neither, so without the feature
//! this file is empty):
//!   scripts/build-cuda.sh --tests -- --test gpu_group_norm, then on the GPU machine run the
//!   binary (or `cargo test --release --features cuda --test gpu_group_norm -- --nocapture`).
//! Prints the largest absolute difference of every case.
#![cfg(feature = "cuda")]

mod common;

use candle_core::{DType, Device, Tensor};
use common::max_abs_diff;
use sdcrossframe::ops::group_norm::group_norm;

#[test]
fn kernel_matches_candle_nn_on_the_cpu() {
    let gpu = Device::new_cuda(0).expect("this test needs a CUDA GPU");
    let cpu = Device::Cpu;
    // (shape, groups): UNet-sized rows split in chunks, the VAE's million-value rows, odd sizes,
    // one value per row (zero variance).
    // Rows of up to 64 Ki values (32 Ki in f32) take the one-launch kernel: 2x320x64x64 (40960
    // per row), 1x1280x8x8 (2560), 2x640x16x16 (5120), 1x96x16x16 (768: most threads idle).
    let cases: [(&[usize], usize); 8] = [
        (&[2, 320, 64, 64], 32),
        (&[1, 1280, 8, 8], 32),
        (&[2, 640, 16, 16], 32),
        (&[1, 96, 16, 16], 32),
        (&[1, 128, 512, 512], 32),
        (&[2, 64, 7, 9], 8),
        (&[3, 96, 5], 32),
        (&[1, 32, 1, 1], 32),
    ];
    for (shape, groups) in cases {
        let channels = shape[1];
        // A mean offset against the spread, as activations have.
        let xs = (Tensor::randn(0f32, 2.0, shape, &cpu).unwrap() + 3.0).unwrap();
        let weight = Tensor::randn(1f32, 0.3, channels, &cpu).unwrap();
        let bias = Tensor::randn(0f32, 0.3, channels, &cpu).unwrap();
        let reference = candle_nn::GroupNorm::new(weight.clone(), bias.clone(), channels, groups, 1e-5).unwrap();
        let reference = candle_core::Module::forward(&reference, &xs).unwrap();
        let reference_silu = candle_nn::ops::silu(&reference).unwrap();
        for (dtype, bound) in [(DType::F32, 1e-4), (DType::F16, 2e-2), (DType::BF16, 1e-1)] {
            let to_gpu = |t: &Tensor| t.to_dtype(dtype).unwrap().to_device(&gpu).unwrap();
            let (x, w, b) = (to_gpu(&xs), to_gpu(&weight), to_gpu(&bias));
            for silu in [false, true] {
                let out = group_norm(&x, &w, &b, groups, 1e-5, silu).unwrap();
                assert_eq!(out.dims(), shape);
                assert_eq!(out.dtype(), dtype);
                let expected = if silu { &reference_silu } else { &reference };
                let err = max_abs_diff(&out.to_device(&cpu).unwrap(), expected);
                println!("{dtype:?} {shape:?} groups {groups} silu {silu}: max abs error {err:.3e}");
                assert!(err < bound, "{dtype:?} {shape:?} silu {silu}: {err} >= {bound}");
            }
        }
    }
}
