//! The fused CUDA attention kernel against candle's unfused attention on the same GPU.
//!
//! Needs a GPU and a build with the `cuda` feature (CI has neither, so without the feature
//! this file is empty):
//!   scripts/build-cuda.sh, then on the GPU machine
//!   cargo test --release --features cuda --test gpu_attention -- --nocapture
//! Prints the largest absolute difference of every case.
#![cfg(feature = "cuda")]

mod common;

use candle_core::{DType, Device, Tensor};
use common::max_abs_diff;
use sdcrossframe::ops::flash_attention::{fused_attention, fused_attention_tokens, use_fused};
use sdcrossframe::ops::unfused_attention;

/// `sharpness` scales the queries: 1 gives scores of unit spread, 4 a peaked softmax.
fn check(dev: &Device, dtype: DType, (b, h, n, m, d): (usize, usize, usize, usize, usize), sharpness: f64) -> f32 {
    let rand = |len: usize| Tensor::randn(0f32, 1., (b, h, len, d), dev).unwrap();
    let q = (rand(n) * sharpness).unwrap().to_dtype(dtype).unwrap();
    let (k, v) = (rand(m).to_dtype(dtype).unwrap(), rand(m).to_dtype(dtype).unwrap());
    let scale = (d as f64).powf(-0.5);
    let fused = fused_attention(&q, &k, &v, scale).unwrap();
    assert_eq!(fused.dims(), &[b, h, n, d]);
    assert_eq!(fused.dtype(), dtype);
    let reference = unfused_attention(&q, &k, &v, scale).unwrap();
    let err = max_abs_diff(&fused, &reference);
    println!("{dtype:?} b {b} h {h} n {n} m {m} d {d} sharpness {sharpness}: max abs error {err:.3e}");
    err
}

#[test]
fn fused_kernel_matches_unfused_attention() {
    let dev = Device::new_cuda(0).expect("this test needs a CUDA GPU");
    let q = Tensor::zeros((1, 1, 1, 40), DType::F16, &dev).unwrap();
    assert!(use_fused(&q, 40), "the build has no fused kernel (CUDA_COMPUTE_CAP < 80?)");
    let cases = [
        (1, 2, 4096, 8192, 40),
        (2, 8, 4096, 4096, 40),
        (1, 3, 77, 333, 16),
        (1, 3, 77, 333, 40),
        (1, 3, 77, 333, 80),
        (1, 3, 77, 333, 160),
        (2, 2, 1000, 77, 40),  // cross-attention to text: fewer keys than one tile's rows
        (1, 2, 5, 3, 8),       // a single partial tile
        (1, 2, 130, 1, 24),    // one key
        (1, 1, 200, 300, 100), // head dim no multiple of 8: the unaligned load path
        (1, 2, 2100, 300, 40), // 8-warp blocks with a partial last block
        // Head dims of the 40 kernel that are no multiple of 8 (the unaligned path, whose
        // V tiles also carry the ones column of the row sums), with 4- and 8-warp blocks.
        (1, 2, 300, 333, 36),
        (1, 2, 2100, 700, 33),
    ];
    for dtype in [DType::F16, DType::BF16] {
        // Outputs are averages of unit-normal values, and sharp scores leave a few of millions
        // of outputs near 4: the bound is one rounding step (ulp) there, in which the fused and
        // the unfused path may differ: 2^-8 in f16, 2^-5 in bf16 (a bf16 run differed by exactly
        // 2^-5 = 3.125e-2 on a 2x8x4096x4096 case).
        let tol = if dtype == DType::F16 { 4e-3 } else { 4e-2 };
        for case in cases {
            for sharpness in [1.0, 4.0] {
                let err = check(&dev, dtype, case, sharpness);
                assert!(err <= tol, "{dtype:?} {case:?} sharpness {sharpness}: max abs error {err} > {tol}");
            }
        }
    }
}

#[test]
fn fused_kernel_handles_strided_inputs_and_offsets() {
    let dev = Device::new_cuda(0).expect("this test needs a CUDA GPU");
    // (b, n, h, d) projections transposed to (b, h, n, d), as the UNet makes them; keys that
    // start at an offset into their buffer; values one element off 16-byte alignment (the
    // kernel's scalar load path).
    let x = Tensor::randn(0f32, 1., (2, 100, 4, 40), &dev).unwrap().to_dtype(DType::F16).unwrap();
    let q = x.transpose(1, 2).unwrap();
    let kv = Tensor::randn(0f32, 1., (3, 4, 200, 40), &dev).unwrap().to_dtype(DType::F16).unwrap();
    let k = kv.narrow(0, 1, 2).unwrap();
    let flat = Tensor::randn(0f32, 1., 2 * 4 * 200 * 40 + 1, &dev).unwrap().to_dtype(DType::F16).unwrap();
    let v = flat.narrow(0, 1, 2 * 4 * 200 * 40).unwrap().reshape((2, 4, 200, 40)).unwrap();
    let fused = fused_attention(&q, &k, &v, 0.2).unwrap();
    let reference =
        unfused_attention(&q.contiguous().unwrap(), &k.contiguous().unwrap(), &v.contiguous().unwrap(), 0.2).unwrap();
    let err = max_abs_diff(&fused, &reference);
    println!("strided/offset inputs: max abs error {err:.3e}");
    assert!(err <= 4e-3, "max abs error {err}");
}

#[test]
fn token_layout_matches_split_heads() {
    let dev = Device::new_cuda(0).expect("this test needs a CUDA GPU");
    // The attention layer's own layout (batch, tokens, heads x head_dim): SD's head dims, keys
    // twice the queries (cross-frame), text keys, and keys that are a narrowed view.
    for (b, h, n, m, d) in [(2, 8, 4096, 8192, 40), (2, 8, 1024, 77, 80), (2, 8, 256, 256, 160), (1, 3, 50, 70, 24)] {
        for dtype in [DType::F16, DType::BF16] {
            let rand = |len: usize| Tensor::randn(0f32, 1., (b, len, h * d), &dev).unwrap().to_dtype(dtype).unwrap();
            let (q, v) = (rand(n), rand(m));
            let wide = rand(m + 3);
            let k = wide.narrow(1, 3, m).unwrap();
            let scale = (d as f64).powf(-0.5);
            let fused = fused_attention_tokens(&q, &k, &v, h, scale).unwrap();
            assert_eq!(fused.dims(), &[b, n, h * d]);
            let split =
                |t: &Tensor, len| t.reshape((b, len, h, d)).unwrap().transpose(1, 2).unwrap().contiguous().unwrap();
            let reference = unfused_attention(&split(&q, n), &split(&k.contiguous().unwrap(), m), &split(&v, m), scale)
                .unwrap()
                .transpose(1, 2)
                .unwrap()
                .reshape((b, n, h * d))
                .unwrap();
            let err = max_abs_diff(&fused, &reference);
            println!("tokens layout {dtype:?} b {b} h {h} n {n} m {m} d {d}: max abs error {err:.3e}");
            let tol = if dtype == DType::F16 { 4e-3 } else { 3e-2 };
            assert!(err <= tol, "{dtype:?} {:?}: max abs error {err}", (b, h, n, m, d));
        }
    }
}
