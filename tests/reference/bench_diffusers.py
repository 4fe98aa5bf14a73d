#!/usr/bin/env python3
"""Times one diffusers UNet + ControlNet call at Stable Diffusion 1.5 shapes with random
weights: the same-machine reference for `sdcrossframe-bench unet-step`.

Models: diffusers' UNet2DConditionModel and ControlNetModel built from the real
runwayml/stable-diffusion-v1-5 unet and lllyasviel/sd-controlnet-canny configs (below),
random weights (speed does not depend on the values). Inputs: latents (batch, 4, H/8, W/8),
text embeddings (batch, 77, 768), control image (batch, 3, H, W), timestep 500, controlnet
conditioning scale 0.7. Variants, each the median over --runs after --warmup:
  plain attention     AttnProcessor2_0 (PyTorch SDPA) everywhere
  2N K/V, up blocks   every up-block self-attention (attn1) attends to its keys/values
                      concatenated twice along tokens (the cost of cross-frame first+prev),
                      SDPA; other layers AttnProcessor2_0
Also: peak CUDA memory (torch.cuda.max_memory_allocated) per variant.

Usage: python3 tests/reference/bench_diffusers.py [--device cuda] [--dtype fp16] [--runs 20]
Needs torch and diffusers (0.42.1 for the numbers in scripts/bench-gpu.sh). On a machine without
diffusers, scripts/bench-gpu.sh installs a carried wheel first.
"""

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

UNET_CONFIG = {
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}

CONTROLNET_CONFIG = {
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "class_embed_type": None,
    "conditioning_embedding_out_channels": [16, 32, 96, 256],
    "controlnet_conditioning_channel_order": "rgb",
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "projection_class_embeddings_input_dim": None,
    "resnet_time_scale_shift": "default",
    "upcast_attention": False,
    "use_linear_projection": False,
}


class DoubledKVProcessor:
    """Self-attention whose keys/values are the layer's own concatenated twice (2N tokens), SDPA."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        assert encoder_hidden_states is None and hidden_states.ndim == 3
        b, n, _ = hidden_states.shape
        q = attn.to_q(hidden_states)
        k = attn.to_k(hidden_states)
        v = attn.to_v(hidden_states)
        k = torch.cat([k, k], dim=1)
        v = torch.cat([v, v], dim=1)
        d = q.shape[-1] // attn.heads
        q = q.view(b, -1, attn.heads, d).transpose(1, 2)
        k = k.view(b, -1, attn.heads, d).transpose(1, 2)
        v = v.view(b, -1, attn.heads, d).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v)
        out = out.transpose(1, 2).reshape(b, n, attn.heads * d).to(q.dtype)
        out = attn.to_out[0](out)
        return attn.to_out[1](out)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="fp16", choices=["fp16", "bf16", "fp32"])
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--height", type=int, default=512)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()

    import diffusers
    from diffusers import ControlNetModel, UNet2DConditionModel
    from diffusers.models.attention_processor import AttnProcessor2_0

    diffusers.utils.logging.set_verbosity_error()

    device = torch.device(args.device)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    cuda = device.type == "cuda"
    torch.manual_seed(0)
    t = time.perf_counter()
    with torch.device(device):
        unet = UNet2DConditionModel.from_config(UNET_CONFIG)
        controlnet = ControlNetModel.from_config(CONTROLNET_CONFIG)
    unet = unet.to(dtype).eval()
    controlnet = controlnet.to(dtype).eval()
    build_s = time.perf_counter() - t
    n_unet = sum(p.numel() for p in unet.parameters())
    n_cn = sum(p.numel() for p in controlnet.parameters())
    name = torch.cuda.get_device_name(device) if cuda else "cpu"
    print(
        f"bench_diffusers: torch {torch.__version__}, diffusers {diffusers.__version__}, {name}, {args.dtype}, "
        f"{args.warmup} warm-up + {args.runs} timed runs"
    )
    print(
        f"UNet {n_unet / 1e6:.0f}M + ControlNet {n_cn / 1e6:.0f}M parameters, random weights (built in {build_s:.1f} s), "
        f"{args.width}x{args.height} (latents {args.width // 8}x{args.height // 8}), batch {args.batch}, text 77x768"
    )

    g = torch.Generator(device=device).manual_seed(1)
    b, h, w = args.batch, args.height // 8, args.width // 8
    latents = torch.randn((b, 4, h, w), generator=g, device=device).to(dtype)
    text = torch.randn((b, 77, 768), generator=g, device=device).to(dtype)
    control = torch.rand((b, 3, args.height, args.width), generator=g, device=device).to(dtype)
    timestep = torch.tensor(500, device=device)

    def sync():
        if cuda:
            torch.cuda.synchronize(device)

    plain = {k: AttnProcessor2_0() for k in unet.attn_processors}
    doubled = {
        k: (DoubledKVProcessor() if k.startswith("up_blocks.") and ".attn1." in k else AttnProcessor2_0())
        for k in unet.attn_processors
    }
    controlnet.set_attn_processor(AttnProcessor2_0())
    rows = []
    for label, processors in [("plain attention", plain), ("2N K/V, up blocks", doubled)]:
        unet.set_attn_processor(processors)
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        cn_ms, unet_ms, total = [], [], []
        with torch.inference_mode():
            for run in range(args.warmup + args.runs):
                sync()
                t0 = time.perf_counter()
                down, mid = controlnet(
                    latents, timestep, encoder_hidden_states=text, controlnet_cond=control,
                    conditioning_scale=0.7, return_dict=False,
                )
                sync()
                t1 = time.perf_counter()
                out = unet(
                    latents, timestep, encoder_hidden_states=text,
                    down_block_additional_residuals=down, mid_block_additional_residual=mid, return_dict=False,
                )[0]
                sync()
                t2 = time.perf_counter()
                if run >= args.warmup:
                    cn_ms.append((t1 - t0) * 1e3)
                    unet_ms.append((t2 - t1) * 1e3)
                    total.append((t2 - t0) * 1e3)
        finite = bool(torch.isfinite(out).all())
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else float("nan")
        rows.append((label, statistics.median(cn_ms), statistics.median(unet_ms), statistics.median(total), min(total), peak, finite))

    print()
    print("| variant | ControlNet ms | UNet ms | step ms (median) | step ms (min) | peak alloc GiB | output finite |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for label, cn, un, tot, best, peak, finite in rows:
        print(f"| {label} | {cn:.1f} | {un:.1f} | {tot:.1f} | {best:.1f} | {peak:.2f} | {'yes' if finite else 'NO'} |")
    print()
    print(f"2N K/V (up blocks) / plain: {rows[1][3] / rows[0][3]:.3f}")


if __name__ == "__main__":
    main()
