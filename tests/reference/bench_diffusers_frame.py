#!/usr/bin/env python3
"""Per-frame time of diffusers' StableDiffusionControlNetImg2ImgPipeline at SD1.5 shapes with
random weights: the same-machine reference for `sdcrossframe-bench frame`.

Models: UNet and ControlNet from the configs in bench_diffusers.py, AutoencoderKL and the CLIP
text encoder at SD1.5's shapes, the real CLIP tokenizer (tests/fixtures/tiny-sd/tokenizer),
DDIM with SD1.5's scheduler config. Settings: the original's (512x512, 20 steps, strength 0.9
= 18 denoising steps, guidance 7.5, ControlNet scale 0.7, its prompts). Variants:
  plain, SDPA                        diffusers' default processors, no cross-frame attention
  first+prev up, SDPA                cross-frame attention (tests/reference/cross_frame_ref.py)
                                     with PyTorch's fused attention
  first+prev up, original processor  the same keys/values with the original's unfused math
Each variant runs --frames frames as one video (frame 0 is the anchor) after --warmup frames;
the median over the follower frames is reported, and peak CUDA memory.

Usage: python3 tests/reference/bench_diffusers_frame.py [--dtype fp16] [--frames 6] [--warmup 2]
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_diffusers import CONTROLNET_CONFIG, UNET_CONFIG  # noqa: E402
from cross_frame_ref import (  # noqa: E402
    ClassicCrossFrameAttnProcessor,
    CrossFrameAttnProcessor,
    CrossFrameState,
    cross_frame_layers,
)

PROMPT = "a beautiful woman with red hair"
NEGATIVE = ("longbody, lowres, bad anatomy, bad hands, missing fingers, extra digit, fewer digits, cropped, "
            "worst quality, low quality")


def build_pipeline(device, dtype):
    from diffusers import (AutoencoderKL, ControlNetModel, DDIMScheduler, StableDiffusionControlNetImg2ImgPipeline,
                           UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**UNET_CONFIG)
    controlnet = ControlNetModel(**CONTROLNET_CONFIG)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=512,
                        block_out_channels=[128, 256, 512, 512], down_block_types=["DownEncoderBlock2D"] * 4,
                        up_block_types=["UpDecoderBlock2D"] * 4, act_fn="silu", norm_num_groups=32,
                        scaling_factor=0.18215)
    text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072,
                                                num_hidden_layers=12, num_attention_heads=12,
                                                max_position_embeddings=77, hidden_act="quick_gelu",
                                                projection_dim=768))
    tokenizer = CLIPTokenizer.from_pretrained(HERE.parent / "fixtures/tiny-sd/tokenizer")
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1, num_train_timesteps=1000)
    pipe = StableDiffusionControlNetImg2ImgPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                                    unet=unet, controlnet=controlnet, scheduler=scheduler,
                                                    safety_checker=None, feature_extractor=None,
                                                    requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device, dtype)


def random_images(count, size):
    rng = np.random.default_rng(0)
    frames = [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(count)]
    edges = [Image.fromarray(((rng.random((size, size)) > 0.9) * 255).astype(np.uint8)).convert("RGB")
             for _ in range(count)]
    return frames, edges


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_video(pipe, frames, edges, processor, args):
    """Seconds per frame of one video; `processor` None = plain, else a processor class."""
    unet = pipe.unet
    original = dict(unet.attn_processors)
    state, hooks = None, []
    if processor is not None:
        state = CrossFrameState("first+prev")
        layers = set(cross_frame_layers(unet, "up"))
        unet.set_attn_processor({n: (processor(state, n[: -len(".processor")]) if n[: -len(".processor")] in layers
                                     else p) for n, p in original.items()})
        hooks = [unet.register_forward_pre_hook(state.unet_pre_hook, with_kwargs=True),
                 unet.register_forward_hook(state.unet_post_hook, with_kwargs=True)]
    times = []
    try:
        generator = torch.Generator(args.device).manual_seed(0)
        for i, (frame, edge) in enumerate(zip(frames, edges)):
            if state is not None:
                state.begin_frame(anchor=(i == 0))
            sync(args.device)
            t = time.perf_counter()
            pipe(PROMPT, negative_prompt=NEGATIVE, image=frame, control_image=edge, num_inference_steps=args.steps,
                 strength=0.9, guidance_scale=7.5, controlnet_conditioning_scale=0.7, generator=generator,
                 output_type="np")
            sync(args.device)
            times.append(time.perf_counter() - t)
            if state is not None:
                state.end_frame()
    finally:
        for h in hooks:
            h.remove()
        unet.set_attn_processor(original)
    return times


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="fp16", choices=["fp16", "bf16", "fp32"])
    parser.add_argument("--frames", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--size", type=int, default=512, help="frame side (smaller only to smoke-test on a CPU)")
    args = parser.parse_args()
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    import diffusers

    pipe = build_pipeline(args.device, dtype)
    frames, edges = random_images(max(args.frames, 2), args.size)
    gpu = torch.cuda.get_device_name() if args.device.startswith("cuda") else args.device
    print(f"bench_diffusers_frame: torch {torch.__version__}, diffusers {diffusers.__version__}, "
          f"{gpu}, {args.dtype}, {args.size}x{args.size}, {args.steps} steps x strength 0.9, guidance 7.5, "
          f"controlnet scale 0.7; median of frames 1..{args.frames - 1} of a {args.frames}-frame video")
    run_video(pipe, frames[: args.warmup], edges[: args.warmup], None, args)
    print("| variant | frame ms (median) | fps | anchor frame ms | peak alloc GiB |")
    print("|---|---:|---:|---:|---:|")
    for label, processor in [("plain, SDPA", None), ("first+prev up, SDPA", CrossFrameAttnProcessor),
                             ("first+prev up, original processor", ClassicCrossFrameAttnProcessor)]:
        if args.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        times = run_video(pipe, frames[: args.frames], edges[: args.frames], processor, args)
        median = statistics.median(times[1:]) * 1e3
        peak = torch.cuda.max_memory_allocated() / 2**30 if args.device.startswith("cuda") else float("nan")
        print(f"| {label} | {median:.1f} | {1e3 / median:.2f} | {times[0] * 1e3:.1f} | {peak:.2f} |")


if __name__ == "__main__":
    main()
