//! Single operations at SD1.5 shapes: where a step's time goes.

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use sdcrossframe::ops::flash_attention::fused_attention;
use sdcrossframe::ops::unfused_attention;

use crate::Cli;
use crate::random::random_vb;
use crate::timing::{dtype_name, max_abs_diff, time_op};

/// The building blocks of a UNet step at SD1.5 shapes (batch 2 for CFG), one at a time.
/// The same list, in the same order and names, is in tests/reference/bench_ops_torch.py.
pub fn ops(cli: &Cli, device: &Device, dtype: DType) -> Result<()> {
    let vb = random_vb(dtype, device);
    let randn =
        |shape: &[usize]| -> candle_core::Result<Tensor> { Tensor::randn(0f32, 1f32, shape, device)?.to_dtype(dtype) };
    println!("ops: SD1.5 shapes, batch 2, {}, median of {} after {} warm-up", dtype_name(dtype), cli.runs, cli.warmup);
    println!("| op | shape | ms |");
    println!("|---|---|---:|");
    for (channels, side) in [(320usize, 64usize), (640, 32), (1280, 16)] {
        let x = randn(&[2, channels, side, side])?;
        let norm = sdcrossframe::ops::GroupNorm::new(vb.pp(format!("gn{channels}")), 32, channels, 1e-5)?;
        let ms = time_op(cli, device, || norm.forward_reference(&x))?;
        println!("| group_norm(32), candle-nn | 2x{channels}x{side}x{side} | {ms:.3} |");
        let ms = time_op(cli, device, || candle_core::Module::forward(&norm, &x))?;
        let diff = max_abs_diff(&candle_core::Module::forward(&norm, &x)?, &norm.forward_reference(&x)?)?;
        println!("| group_norm(32), ops::GroupNorm (max diff {diff:.1e}) | 2x{channels}x{side}x{side} | {ms:.3} |");
        let ms = time_op(cli, device, || candle_nn::ops::silu(&x))?;
        println!("| silu | 2x{channels}x{side}x{side} | {ms:.3} |");
        let conv = sdcrossframe::ops::Conv2d::same(vb.pp(format!("conv{channels}")), channels, channels, 3, 1)?;
        let bias = conv.bias().context("Conv2d::same has a bias")?.reshape(((), 1, 1))?;
        // candle's own convolution (im2col + GEMM on CUDA) with the same weights.
        let candle_conv = || x.conv2d(&conv.weight()?, 1, 1, 1, 1)?.broadcast_add(&bias);
        let ms = time_op(cli, device, candle_conv)?;
        println!("| conv3x3 | 2x{channels}x{side}x{side} | {ms:.3} |");
        let ms = time_op(cli, device, || candle_core::Module::forward(&conv, &x))?;
        let diff = max_abs_diff(&candle_core::Module::forward(&conv, &x)?, &candle_conv()?)?;
        println!(
            "| conv3x3, ops::Conv2d (cuDNN or im2col, timed per shape, with the `cudnn` feature; max diff {diff:.1e}) | 2x{channels}x{side}x{side} | {ms:.3} |"
        );
        let ms = time_op(cli, device, || norm.forward_silu(&x))?;
        println!("| group_norm(32) + silu, ops::GroupNorm | 2x{channels}x{side}x{side} | {ms:.3} |");
        let tokens = side * side;
        let h = randn(&[2, tokens, channels])?;
        let linear = candle_nn::linear(channels, channels, vb.pp(format!("lin{channels}")))?;
        let ms = time_op(cli, device, || candle_core::Module::forward(&linear, &h))?;
        println!("| linear | 2x{tokens}x{channels} | {ms:.3} |");
        let ln = candle_nn::layer_norm(channels, 1e-5, vb.pp(format!("ln{channels}")))?;
        let ms = time_op(cli, device, || candle_core::Module::forward(&ln, &h))?;
        println!("| layer_norm | 2x{tokens}x{channels} | {ms:.3} |");
        // Self-attention core (8 heads) as the UNet runs it: f32 scores for half types.
        let head_dim = channels / 8;
        for kv_tokens in [tokens, 2 * tokens] {
            let q = randn(&[2, 8, tokens, head_dim])?;
            let k = randn(&[2, 8, kv_tokens, head_dim])?;
            let v = randn(&[2, 8, kv_tokens, head_dim])?;
            let scale = (head_dim as f64).powf(-0.5);
            let ms = time_op(cli, device, || sdcrossframe::ops::unfused_attention(&q, &k, &v, scale))?;
            println!("| attention, f32 scores | 2x8x{tokens}x{kv_tokens}x{head_dim} | {ms:.3} |");
            let half = |q: &Tensor, k: &Tensor, v: &Tensor| -> candle_core::Result<Tensor> {
                let scores = (q * scale)?.matmul(&k.t()?)?;
                candle_nn::ops::softmax_last_dim(&scores)?.matmul(v)
            };
            let ms = time_op(cli, device, || half(&q, &k, &v))?;
            println!("| attention, {} scores | 2x8x{tokens}x{kv_tokens}x{head_dim} | {ms:.3} |", dtype_name(dtype));
        }
    }
    Ok(())
}

/// Fused vs unfused attention at the UNet's shapes (batch 2 = CFG, 8 heads): self-attention at
/// 64x64 latents (4096 tokens, head dim 40) with plain and doubled (cross-frame) keys (also at
/// batch 4: four streams' rows in one call), the
/// 32x32 and 16x16 levels (head dims 80 and 160), and cross-attention to 77 text tokens.
/// Also prints the largest difference between the two results.
pub fn attention(cli: &Cli, device: &Device, dtype: DType) -> Result<()> {
    const CASES: [(usize, usize, usize, usize, usize); 10] = [
        (1, 8, 4096, 4096, 40),
        (2, 8, 4096, 4096, 40),
        (2, 8, 4096, 8192, 40),
        (4, 8, 4096, 8192, 40),
        (2, 8, 4096, 77, 40),
        (2, 8, 1024, 1024, 80),
        (2, 8, 1024, 2048, 80),
        (2, 8, 256, 256, 160),
        (2, 8, 256, 512, 160),
        (2, 8, 333, 1001, 72),
    ];
    println!(
        "| batch x heads | queries | keys | head dim | fused ms | unfused ms | speed-up | TFLOP/s fused | max abs diff |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for (b, h, n, m, d) in CASES {
        let rand =
            |len: usize| -> Result<Tensor> { Ok(Tensor::randn(0f32, 1., (b, h, len, d), device)?.to_dtype(dtype)?) };
        let (q, k, v) = (rand(n)?, rand(m)?, rand(m)?);
        let scale = (d as f64).powf(-0.5);
        let fused = time_op(cli, device, || fused_attention(&q, &k, &v, scale))?;
        let unfused = time_op(cli, device, || unfused_attention(&q, &k, &v, scale))?;
        let diff = max_abs_diff(&fused_attention(&q, &k, &v, scale)?, &unfused_attention(&q, &k, &v, scale)?)?;
        let tflops = 4.0 * (b * h * n * m * d) as f64 / (fused * 1e-3) / 1e12;
        println!(
            "| {b}x{h} | {n} | {m} | {d} | {fused:.3} | {unfused:.3} | {:.1}x | {tflops:.1} | {diff:.2e} |",
            unfused / fused
        );
    }
    Ok(())
}
