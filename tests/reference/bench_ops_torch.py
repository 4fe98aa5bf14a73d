"""PyTorch timings of the operations `sdcrossframe-bench ops` times, same shapes and order.

    python3 tests/reference/bench_ops_torch.py [--dtype fp16] [--warmup 3] [--runs 20]

Needs torch with CUDA. The attention rows time PyTorch's fused SDPA (what diffusers uses);
the unfused row is the f32-score path of diffusers' classic AttnProcessor with upcast."""
import argparse
import time

import torch
import torch.nn.functional as F

parser = argparse.ArgumentParser()
parser.add_argument("--dtype", default="fp16", choices=["fp16", "bf16", "fp32"])
parser.add_argument("--warmup", type=int, default=3)
parser.add_argument("--runs", type=int, default=20)
args = parser.parse_args()
dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
dev = "cuda"


def time_op(f):
    times = []
    for run in range(args.warmup + args.runs):
        torch.cuda.synchronize()
        t = time.perf_counter()
        f()
        torch.cuda.synchronize()
        if run >= args.warmup:
            times.append((time.perf_counter() - t) * 1e3)
    times.sort()
    n = len(times)
    return times[n // 2] if n % 2 else (times[n // 2 - 1] + times[n // 2]) / 2


print(f"ops (torch {torch.__version__}, {torch.cuda.get_device_name()}): SD1.5 shapes, batch 2, {args.dtype}, "
      f"median of {args.runs} after {args.warmup} warm-up")
print("| op | shape | ms |")
print("|---|---|---:|")
with torch.no_grad():
    for channels, side in [(320, 64), (640, 32), (1280, 16)]:
        x = torch.randn(2, channels, side, side, device=dev, dtype=dtype)
        norm = torch.nn.GroupNorm(32, channels, eps=1e-5).to(dev, dtype)
        print(f"| group_norm(32) | 2x{channels}x{side}x{side} | {time_op(lambda: norm(x)):.3f} |")
        print(f"| silu | 2x{channels}x{side}x{side} | {time_op(lambda: F.silu(x)):.3f} |")
        conv = torch.nn.Conv2d(channels, channels, 3, padding=1).to(dev, dtype)
        print(f"| conv3x3 | 2x{channels}x{side}x{side} | {time_op(lambda: conv(x)):.3f} |")
        tokens = side * side
        h = torch.randn(2, tokens, channels, device=dev, dtype=dtype)
        linear = torch.nn.Linear(channels, channels).to(dev, dtype)
        print(f"| linear | 2x{tokens}x{channels} | {time_op(lambda: linear(h)):.3f} |")
        ln = torch.nn.LayerNorm(channels, eps=1e-5).to(dev, dtype)
        print(f"| layer_norm | 2x{tokens}x{channels} | {time_op(lambda: ln(h)):.3f} |")
        head_dim = channels // 8
        for kv_tokens in [tokens, 2 * tokens]:
            q = torch.randn(2, 8, tokens, head_dim, device=dev, dtype=dtype)
            k = torch.randn(2, 8, kv_tokens, head_dim, device=dev, dtype=dtype)
            v = torch.randn(2, 8, kv_tokens, head_dim, device=dev, dtype=dtype)
            scale = head_dim ** -0.5

            def upcast():
                scores = (q.float() @ k.float().transpose(-1, -2)) * scale
                return scores.softmax(-1).to(dtype) @ v

            print(f"| attention, f32 scores | 2x8x{tokens}x{kv_tokens}x{head_dim} | {time_op(upcast):.3f} |")
            sdpa = lambda: F.scaled_dot_product_attention(q, k, v)
            print(f"| attention, SDPA | 2x8x{tokens}x{kv_tokens}x{head_dim} | {time_op(sdpa):.3f} |")
