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

Inputs and outputs (how each frame is handed to the pipeline):
  tensors (default)  diffusers at its fastest ordinary use: the prompt embeddings are computed once
                     (pipe.encode_prompt) and passed as prompt_embeds / negative_prompt_embeds; the
                     frame and the control image are torch tensors already on the device, (1, 3, H, W)
                     in [0, 1]; output_type="pt" keeps the result on the device. No PIL, no NumPy
                     and no text encoder per frame.
  pil (--pil)        the earlier way: prompt strings (the text encoder runs every frame), PIL images
                     in, output_type="np" (the result copied to the host).
--both runs both and prints a table for each.

Usage: python3 tests/reference/bench_diffusers_frame.py [--dtype fp16] [--frames 6] [--warmup 2]
         [--pil | --both] [--steps 20] [--strength 0.9] [--guidance-scale 7.5] [--controlnet-scale 0.7]
         [--variants plain,sdpa,original] [--scheduler ddim|lcm] [--tiny-vae]
--scheduler lcm: LCMScheduler.from_config(the DDIM config), as LCM-LoRA users set it up;
--tiny-vae: AutoencoderTiny with TAESD's config instead of the SD VAE.
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


def build_pipeline(device, dtype, scheduler_name="ddim", tiny_vae=False):
    from diffusers import (AutoencoderKL, AutoencoderTiny, ControlNetModel, DDIMScheduler, LCMScheduler,
                           StableDiffusionControlNetImg2ImgPipeline, UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**UNET_CONFIG)
    controlnet = ControlNetModel(**CONTROLNET_CONFIG)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=512,
                        block_out_channels=[128, 256, 512, 512], down_block_types=["DownEncoderBlock2D"] * 4,
                        up_block_types=["UpDecoderBlock2D"] * 4, act_fn="silu", norm_num_groups=32,
                        scaling_factor=0.18215)
    if tiny_vae:
        # AutoencoderTiny's defaults are madebyollin/taesd's config (SD1.x latents).
        vae = AutoencoderTiny()
    text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072,
                                                num_hidden_layers=12, num_attention_heads=12,
                                                max_position_embeddings=77, hidden_act="quick_gelu",
                                                projection_dim=768))
    tokenizer = CLIPTokenizer.from_pretrained(HERE.parent / "fixtures/tiny-sd/tokenizer")
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1, num_train_timesteps=1000)
    if scheduler_name == "lcm":
        # What LCM-LoRA users do: LCMScheduler.from_config(pipe.scheduler.config) (LCM's own
        # defaults for original_inference_steps and timestep_scaling).
        scheduler = LCMScheduler.from_config(scheduler.config)
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


def to_tensors(images, device, dtype):
    """PIL images as (1, 3, H, W) tensors in [0, 1] on the device, made before any timing."""
    return [torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1).unsqueeze(0)
            .to(device, dtype).contiguous() for image in images]


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_video(pipe, frames, edges, processor, args, embeds=None):
    """Seconds per frame of one video; `processor` None = plain, else a processor class. `embeds`:
    (prompt_embeds, negative_prompt_embeds) computed once, with tensor frames; None: prompt strings
    and PIL frames."""
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
            settings = dict(image=frame, control_image=edge, num_inference_steps=args.steps, strength=args.strength,
                            guidance_scale=args.guidance_scale,
                            controlnet_conditioning_scale=args.controlnet_scale, generator=generator)
            if embeds is None:
                pipe(PROMPT, negative_prompt=NEGATIVE, output_type="np", **settings)
            else:
                pipe(prompt_embeds=embeds[0], negative_prompt_embeds=embeds[1], output_type="pt", **settings)
            sync(args.device)
            times.append(time.perf_counter() - t)
            if state is not None:
                state.end_frame()
    finally:
        for h in hooks:
            h.remove()
        unet.set_attn_processor(original)
    return times


VARIANTS = {"plain": ("plain, SDPA", None), "sdpa": ("first+prev up, SDPA", CrossFrameAttnProcessor),
            "original": ("first+prev up, original processor", ClassicCrossFrameAttnProcessor)}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="fp16", choices=["fp16", "bf16", "fp32"])
    parser.add_argument("--frames", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--strength", type=float, default=0.9)
    parser.add_argument("--guidance-scale", type=float, default=7.5)
    parser.add_argument("--controlnet-scale", type=float, default=0.7)
    parser.add_argument("--scheduler", default="ddim", choices=["ddim", "lcm"])
    parser.add_argument("--tiny-vae", action="store_true", help="AutoencoderTiny (TAESD's config) for the VAE")
    parser.add_argument("--size", type=int, default=512, help="frame side (smaller only to smoke-test on a CPU)")
    inputs = parser.add_mutually_exclusive_group()
    inputs.add_argument("--pil", action="store_true",
                        help="the earlier way: prompt strings, PIL images in, NumPy out (default: embeddings once, "
                             "tensors in and out)")
    inputs.add_argument("--both", action="store_true", help="tensors in and out, then the --pil way")
    parser.add_argument("--variants", default="plain,sdpa,original",
                        help="comma-separated: plain (SDPA, no cross-frame), sdpa (first+prev up, SDPA), "
                             "original (first+prev up, the original's processor)")
    args = parser.parse_args()
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}: choose from {list(VARIANTS)}")
    modes = ["tensors", "pil"] if args.both else ["pil"] if args.pil else ["tensors"]
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    import diffusers

    pipe = build_pipeline(args.device, dtype, args.scheduler, args.tiny_vae)
    frames, edges = random_images(max(args.frames, args.warmup, 2), args.size)
    gpu = torch.cuda.get_device_name() if args.device.startswith("cuda") else args.device
    denoising = min(int(args.steps * args.strength), args.steps)
    print(f"bench_diffusers_frame: torch {torch.__version__}, diffusers {diffusers.__version__}, "
          f"{gpu}, {args.dtype}, {args.size}x{args.size}, {args.steps} steps x strength {args.strength} "
          f"= {denoising} denoising steps, guidance {args.guidance_scale}, "
          f"controlnet scale {args.controlnet_scale}, scheduler {args.scheduler}, "
          f"{'AutoencoderTiny' if args.tiny_vae else 'AutoencoderKL'}; median of frames 1..{args.frames - 1} of a "
          f"{args.frames}-frame video")
    for mode in modes:
        if mode == "tensors":
            # Once per prompt, as a video application does; CFG's negative embeddings only with guidance.
            with torch.no_grad():
                embeds = pipe.encode_prompt(PROMPT, torch.device(args.device), 1, args.guidance_scale > 1,
                                            negative_prompt=NEGATIVE)
            video = (to_tensors(frames, args.device, dtype), to_tensors(edges, args.device, dtype))
            print()
            print("inputs: prompt embeddings computed once, frames and control images as device tensors, "
                  "output_type=\"pt\" (no PIL or NumPy per frame)")
        else:
            embeds, video = None, (frames, edges)
            print()
            print("inputs: prompt strings (text encoder every frame), PIL images in, output_type=\"np\"")
        run_video(pipe, video[0][: args.warmup], video[1][: args.warmup], None, args, embeds)
        print("| variant | frame ms (median) | fps | anchor frame ms | peak alloc GiB |")
        print("|---|---:|---:|---:|---:|")
        for key in variants:
            label, processor = VARIANTS[key]
            if args.device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()
            times = run_video(pipe, video[0][: args.frames], video[1][: args.frames], processor, args, embeds)
            median = statistics.median(times[1:]) * 1e3
            peak = torch.cuda.max_memory_allocated() / 2**30 if args.device.startswith("cuda") else float("nan")
            print(f"| {label}, {mode} | {median:.1f} | {1e3 / median:.2f} | {times[0] * 1e3:.1f} | {peak:.2f} |")

if __name__ == "__main__":
    main()
