#!/usr/bin/env python3
"""Build the tiny AutoencoderTiny (TAESD) fixture and its diffusers references.

Run after make_fixtures.py (through tests/reference/run.sh): it reuses the tiny pipeline
(tests/fixtures/tiny-sd, tiny-controlnet), the 96x64 frames, the fixed noise and the
deterministic pipeline runner from there. Deterministic: fixed seeds, CPU, float32 references
computed from the f16 weights as saved (the model is loaded back from its directory).

Model, tests/fixtures/tiny-taesd/ (diffusers' save_pretrained, f16):
  config.json, diffusion_pytorch_model.safetensors
      AutoencoderTiny: encoder_block_out_channels and decoder_block_out_channels [16] * 4
      (factor 8, as the tiny UNet's VAE), num_encoder_blocks (1, 2, 1, 2), num_decoder_blocks
      (2, 1, 2, 1), act_fn relu, latent_channels 4, scaling_factor SCALING_FACTOR (0.5, not
      TAESD's 1.0, so that a pipeline that ignores it fails), latent_magnitude 3,
      latent_shift 0.5. Random weights (seeded), then rescaled so the model is not
      degenerate: the encoder's last convolution so that latents * scaling_factor have std
      about 1 on frame 0 (like real SD latents), the decoder's last convolution to an output
      std of DECODED_STD around a bias of 0.5 (the pipeline's image is this output clamped to
      [0, 1]; a random decoder otherwise clamps most pixels).

References, tests/fixtures/reference/taesd/:
  vae_tiny.safetensors  image [1,3,64,96] in [-1,1] (frame 0), latents [1,4,8,12]
                        (vae.encode(image).latents, before scaling_factor), decoder_input
                        [1,4,8,12] (randn * 2: beyond the decoder's tanh clamp's linear range),
                        decoded [1,3,64,96] (vae.decode(decoder_input).sample, raw),
                        unit [1,4,8,12] (vae.scale_latents(latents): latent_magnitude and
                        latent_shift).
  cases.json            [{name, ..., output}] as img2img/cases.json: the base img2img case.
  base.safetensors      image [1,3,64,96] in [0,1], init_latents, final_latents: diffusers'
                        StableDiffusionControlNetImg2ImgPipeline on tiny-sd + tiny-controlnet
                        with vae=AutoencoderTiny (tiny-taesd), DDIM, eta 0, the fixed noise of
                        img2img/noise.safetensors, the base case's settings (20 steps, strength
                        0.9, guidance 7.5, controlnet scale 0.7). retrieve_latents returns the
                        tiny encoder's latents (no posterior), times scaling_factor; decoding
                        divides by it.
  base.png              the same image, 8-bit.
  cross_frame_first_prev_up.safetensors  frame_0..frame_2 [1,3,64,96] in [0,1]: frames 0..2
                        (control_K with frame_K, the base settings, the same fixed noise for
                        every frame) as one video with cross-frame attention first+prev in the
                        up blocks (make_fixtures.py's reference processor), the tiny VAE as the
                        pipeline's VAE.

Checks (exits non-zero when one fails): the float64 rerun of the frame matches within
F64_MAX_DIFF; the cross-frame video's frame 0 equals the base frame and frames 1, 2 differ
from plain img2img of the same frame by max >= 0.02; the frame differs from img2img/base (the same case with the full VAE) by max abs
>= 0.05; decoded output is not degenerate; every file is f16 / small.
"""

import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_fixtures as base  # noqa: E402
from diffusers import AutoencoderTiny, ControlNetModel, DDIMScheduler, StableDiffusionControlNetImg2ImgPipeline  # noqa: E402

SEED_OFFSET = 9000
SCALING_FACTOR = 0.5
DECODED_STD = 0.12
TAESD_DIR = base.FIX / "tiny-taesd"
OUT_DIR = base.REF_DIR / "taesd"
MAX_BYTES = 1 << 20


@torch.no_grad()
def build_model():
    torch.manual_seed(base.SEED + SEED_OFFSET)
    vae = AutoencoderTiny(
        in_channels=3, out_channels=3, encoder_block_out_channels=(16, 16, 16, 16),
        decoder_block_out_channels=(16, 16, 16, 16), act_fn="relu", upsample_fn="nearest", latent_channels=4,
        upsampling_scaling_factor=2, num_encoder_blocks=(1, 2, 1, 2), num_decoder_blocks=(2, 1, 2, 1),
        latent_magnitude=3, latent_shift=0.5, scaling_factor=SCALING_FACTOR)
    vae.eval()
    image = base.to_tensor01(base.load_png(base.IMG_DIR / "frame_0.png")) * 2.0 - 1.0
    # Encoder: latents * scaling_factor with std 1 (centred by the last conv's bias).
    last = vae.encoder.layers[-1]
    last.bias.zero_()
    lat = vae.encoder(image)
    lat = lat - lat.mean(dim=(0, 2, 3), keepdim=True)
    last.weight.mul_(1.0 / (SCALING_FACTOR * float(lat.std())))
    lat = vae.encoder(image)
    last.bias.sub_(lat.mean(dim=(0, 2, 3)))
    # Decoder: output (the pipeline's [0, 1] image before clamping) with std DECODED_STD around
    # 0.5 for latents like the encoder's.
    last = vae.decoder.layers[-1]
    z = vae.encoder(image)
    last.bias.zero_()
    out = vae.decoder.layers(torch.tanh(z / 3) * 3)
    out = out - out.mean(dim=(0, 2, 3), keepdim=True)
    last.weight.mul_(DECODED_STD / float(out.std()))
    out = vae.decoder.layers(torch.tanh(z / 3) * 3)
    last.bias.add_(0.5 - out.mean(dim=(0, 2, 3)))
    if TAESD_DIR.exists():
        for p in TAESD_DIR.iterdir():
            p.unlink()
    vae.to(torch.float16).save_pretrained(TAESD_DIR, safe_serialization=True)


def load_model(dtype=torch.float32):
    vae = AutoencoderTiny.from_pretrained(TAESD_DIR, torch_dtype=dtype)
    vae.eval()
    return vae


def check_saved():
    from safetensors import safe_open
    with safe_open(TAESD_DIR / "diffusion_pytorch_model.safetensors", "pt") as f:
        dts = {f.get_slice(k).get_dtype() for k in f.keys()}
    assert dts == {"F16"}, f"tiny-taesd should be saved as f16, got {dts}"
    config = json.loads((TAESD_DIR / "config.json").read_text())
    assert config["_class_name"] == "AutoencoderTiny", config


@torch.no_grad()
def make_component_refs(vae):
    image = base.to_tensor01(base.load_png(base.IMG_DIR / "frame_0.png")) * 2.0 - 1.0
    latents = vae.encode(image).latents
    decoder_input = base.randn((1, 4, base.HEIGHT // 8, base.WIDTH // 8), SEED_OFFSET + 1, 2.0)
    decoded = vae.decode(decoder_input).sample
    unit = vae.scale_latents(latents)
    save_file({"image": image.contiguous(), "latents": latents.contiguous(), "decoder_input": decoder_input,
               "decoded": decoded.contiguous(), "unit": unit.contiguous()}, OUT_DIR / "vae_tiny.safetensors")
    print(f"taesd: latents * scaling_factor std {float((latents * SCALING_FACTOR).std()):.3f}, "
          f"decoded mean {float(decoded.mean()):.3f} std {float(decoded.std()):.3f}")
    return decoded


def load_pipeline(vae):
    controlnet = ControlNetModel.from_pretrained(base.CN_DIR, torch_dtype=torch.float32)
    pipe = StableDiffusionControlNetImg2ImgPipeline.from_pretrained(
        base.SD_DIR, controlnet=controlnet, vae=vae, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False, torch_dtype=torch.float32)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.vae_scale_factor == 8, pipe.vae_scale_factor
    for name in ("unet", "vae", "text_encoder", "controlnet"):
        getattr(pipe, name).eval()
    return pipe


CROSS_FRAME_FRAMES = (0, 1, 2)


def run_cross_frame_video(pipe, run_case, case):
    """Frames CROSS_FRAME_FRAMES as one video, cross-frame first+prev in the up blocks, as
    make_fixtures.run_video does; returns [1,3,H,W] f32 images."""
    unet = pipe.unet
    state = base.CrossFrameState("first+prev")
    layers = set(base.cross_frame_layers(unet, "up"))
    orig = dict(unet.attn_processors)
    unet.set_attn_processor({n: (base.CrossFrameAttnProcessor(state, n[: -len(".processor")])
                                 if n[: -len(".processor")] in layers else p) for n, p in orig.items()})
    hooks = [unet.register_forward_pre_hook(state.unet_pre_hook, with_kwargs=True),
             unet.register_forward_hook(state.unet_post_hook, with_kwargs=True)]
    images = []
    try:
        for i, k in enumerate(CROSS_FRAME_FRAMES):
            state.begin_frame(anchor=(i == 0))
            out = run_case(dict(case, frame=k, control=k))
            state.end_frame()
            images.append(base.to_nchw(out).to(torch.float32))
    finally:
        for h in hooks:
            h.remove()
        unet.set_attn_processor(orig)
    return images


def main():
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    build_model()
    check_saved()
    vae = load_model()
    decoded = make_component_refs(vae)
    ok = True
    if not (float(decoded.std()) > 0.05):
        print("FAIL: decoded output is degenerate")
        ok = False

    pipe = load_pipeline(vae)
    noise = load_file(base.IMG_DIR / "noise.safetensors")["noise"]
    case = dict(next(c for c in base.img2img_cases() if c["name"] == "base"))
    with base.Runner(pipe, noise) as run_case:
        out = run_case(case)
        img = base.to_nchw(out).to(torch.float32)
        save_file({"image": img, "init_latents": run_case.captured["init"].contiguous(),
                   "final_latents": run_case.captured["final"].contiguous()}, OUT_DIR / case["output"])
        Image.fromarray((out[0] * 255).round().astype(np.uint8)).save(OUT_DIR / f"{case['name']}.png")
        pipe.to(torch.float64)
        out64 = base.to_nchw(run_case(case)).to(torch.float64)
        pipe.to(torch.float32)
        video = run_cross_frame_video(pipe, run_case, case)
        plain = [base.to_nchw(run_case(dict(case, frame=k, control=k))).to(torch.float32)
                 for k in CROSS_FRAME_FRAMES]
    (OUT_DIR / "cases.json").write_text(json.dumps([case], indent=1) + "\n")

    save_file({f"frame_{k}": v.contiguous() for k, v in zip(CROSS_FRAME_FRAMES, video)},
              OUT_DIR / "cross_frame_first_prev_up.safetensors")
    if float((video[0] - img).abs().max()) != 0.0:
        print("FAIL: cross-frame frame 0 differs from the plain frame")
        ok = False
    for k, (v, p) in enumerate(zip(video, plain)):
        d = float((v - p).abs().max())
        print(f"taesd cross-frame first+prev frame {k} vs plain: max {d:.4f}")
        if k > 0 and d < 0.02:
            print("FAIL: cross-frame attention hardly changes the frame")
            ok = False
    d64 = float((out64 - img.to(torch.float64)).abs().max())
    print(f"taesd img2img base f32 vs f64: max {d64:.2e}")
    if d64 > base.F64_MAX_DIFF:
        print("FAIL: the frame is not numerically robust")
        ok = False
    full = load_file(base.IMG_DIR / "base.safetensors")["image"]
    d = (img - full).abs()
    print(f"taesd img2img base vs the full VAE's: mean abs {float(d.mean()):.4f} max {float(d.max()):.4f}; "
          f"image mean {float(img.mean()):.3f} std {float(img.std()):.3f}, "
          f"saturated {float(((img <= 0) | (img >= 1)).float().mean()):.3f}")
    if not (float(d.max()) >= 0.05 and float(img.std()) > 0.05):
        print("FAIL: TAESD frame too close to the full VAE's, or degenerate")
        ok = False

    total = 0
    for p in sorted(list(TAESD_DIR.rglob("*")) + list(OUT_DIR.rglob("*"))):
        if p.is_file():
            total += p.stat().st_size
    print(f"taesd fixture size: {total / 1024:.0f} KiB")
    if total > MAX_BYTES:
        print("FAIL: taesd fixtures over 1 MiB")
        ok = False
    if not ok:
        sys.exit("taesd fixture checks failed")
    print("done")


if __name__ == "__main__":
    main()
