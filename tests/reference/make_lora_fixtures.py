#!/usr/bin/env python3
"""Tiny LoRA files for the tiny pipeline and diffusers' outputs after fusing them.

Run through `tests/reference/run.sh` (after make_fixtures.py, whose tiny models and component
references it reads). Deterministic: fixed seeds, CPU, float32 references. Paths are relative
to the repository root.

LoRA files, tests/fixtures/lora/ (tensors f16, as published LoRAs are):

  peft.safetensors   diffusers/PEFT layout, written by diffusers' save_lora_weights from
                     peft's get_peft_model_state_dict after add_adapter(LoraConfig(r=4)):
                     `unet.<module>.lora_A.weight` / `.lora_B.weight` on to_q, to_k, to_v,
                     to_out.0, proj_in (1x1 conv), ff.net.0.proj, ff.net.2 and the resnets' conv1
                     (3x3 convs); `text_encoder.<module>.lora_A/B.weight` on q_proj,
                     k_proj, v_proj, out_proj, fc1, fc2 (r=4). No adapter metadata, so diffusers
                     fuses with alpha = rank (scale 1 per module). The B matrices (zero after
                     peft's init) are random: B_SCALE * randn.
  peft_alpha.safetensors  the same tensors with diffusers' `lora_adapter_metadata` (the
                     LoraConfig of each component, prefixed `unet.` / `text_encoder.`):
                     lora_alpha UNET_META_ALPHA / TE_META_ALPHA, and an alpha_pattern giving
                     the ff.net.2 layers PATTERN_ALPHA.
  kohya.safetensors  the same A/B tensors in the kohya layout:
                     `lora_unet_<module with . -> _>.lora_down.weight` (= A), `.lora_up.weight`
                     (= B), `.alpha` (f16 scalar KOHYA_ALPHA, != rank, so every delta is
                     KOHYA_ALPHA / 4 times the PEFT file's); text encoder keys
                     `lora_te_text_model_<module with . -> _>...` as kohya writes them for
                     SD1.5's CLIPTextModel.

References, tests/fixtures/reference/lora/<layout>_<scale>.safetensors (f32) for layout in
peft, peft_alpha, kohya and scale in 0.5, 1.0: StableDiffusionPipeline.from_pretrained(tiny-sd,
float32) + load_lora_weights(file) + fuse_lora(lora_scale=scale), then
  unet_out   [2,4,8,12]: the fused UNet on reference/unet.safetensors' sample, timestep and
             encoder_hidden_states (no residuals; the same call as that file's `out`)
  text_out   [2,77,32]: the fused text encoder's last_hidden_state on
             reference/text_encoder.safetensors' input_ids.
The unfused outputs are those two files' `out` and `last_hidden_state`.
"""

import json
import struct
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import diffusers
import peft
import transformers
from diffusers import StableDiffusionPipeline
from peft import LoraConfig, inject_adapter_in_model
from peft.utils import get_peft_model_state_dict

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests/fixtures"
SD_DIR = FIXTURES / "tiny-sd"
LORA_DIR = FIXTURES / "lora"
REF_DIR = FIXTURES / "reference/lora"

RANK = 4
B_SCALE = 0.15
KOHYA_ALPHA = 2.0
UNET_META_ALPHA = 8.0
TE_META_ALPHA = 2.0
PATTERN_ALPHA = 1.0
SCALES = (0.5, 1.0)
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "ff.net.0.proj", "ff.net.2", "conv1"]
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]


def load_pipe():
    pipe = StableDiffusionPipeline.from_pretrained(
        SD_DIR, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    pipe.unet.eval()
    pipe.text_encoder.eval()
    return pipe


def randomize_b(model, seed):
    """peft initializes lora_B to zero; give every B random values (deterministic order)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if ".lora_B." in name:
                param.copy_(torch.randn(param.shape, generator=gen) * B_SCALE)


def make_peft_state_dicts():
    """(unet, text encoder) LoRA state dicts as peft writes them, module paths without prefix."""
    pipe = load_pipe()
    torch.manual_seed(1234)  # lora_A's kaiming-uniform init
    pipe.unet.add_adapter(LoraConfig(r=RANK, lora_alpha=RANK, target_modules=UNET_TARGETS, init_lora_weights=True))
    # transformers' own add_adapter wants a newer peft than the pinned one; peft's injection
    # does the same for a plain torch module.
    inject_adapter_in_model(LoraConfig(r=RANK, lora_alpha=RANK, target_modules=TE_TARGETS, init_lora_weights=True),
                            pipe.text_encoder)
    randomize_b(pipe.unet, 11)
    randomize_b(pipe.text_encoder, 12)
    unet_sd = {k: v.detach().to(torch.float16).contiguous() for k, v in get_peft_model_state_dict(pipe.unet).items()}
    te_sd = {k: v.detach().to(torch.float16).contiguous()
             for k, v in get_peft_model_state_dict(pipe.text_encoder).items()}
    assert unet_sd and te_sd
    kinds = {tuple(v.shape[2:]) for k, v in unet_sd.items() if k.endswith("lora_A.weight") and v.dim() == 4}
    assert (1, 1) in kinds and (3, 3) in kinds, kinds
    return unet_sd, te_sd


def canonical_header(path):
    """Rewrites a safetensors header with sorted `__metadata__` keys: safetensors writes that
    map in hash order, which changes from run to run (the tensors stay byte-identical)."""
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    header["__metadata__"] = dict(sorted(header.get("__metadata__", {}).items()))
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n:])


def te_module_path(key):
    """The module path of a text-encoder LoRA key, with the `text_model.` prefix SD1.5's
    checkpoints (transformers 4) have: transformers 5 saves CLIPTextModel without it."""
    return key if key.startswith("text_model.") else "text_model." + key


def write_files(unet_sd, te_sd):
    LORA_DIR.mkdir(parents=True, exist_ok=True)
    StableDiffusionPipeline.save_lora_weights(
        LORA_DIR, unet_lora_layers=unet_sd, text_encoder_lora_layers=te_sd, weight_name="peft.safetensors")

    ff2 = sorted({k.split(".lora_")[0] for k in unet_sd if k.split(".lora_")[0].endswith("ff.net.2")})
    unet_meta = {"r": RANK, "lora_alpha": UNET_META_ALPHA, "target_modules": UNET_TARGETS,
                 "alpha_pattern": {f"^{m}": PATTERN_ALPHA for m in ff2}, "rank_pattern": {}}
    te_meta = {"r": RANK, "lora_alpha": TE_META_ALPHA, "target_modules": TE_TARGETS}
    StableDiffusionPipeline.save_lora_weights(
        LORA_DIR, unet_lora_layers=unet_sd, text_encoder_lora_layers=te_sd, weight_name="peft_alpha.safetensors",
        unet_lora_adapter_metadata=unet_meta, text_encoder_lora_adapter_metadata=te_meta)
    for name in ("peft.safetensors", "peft_alpha.safetensors"):
        canonical_header(LORA_DIR / name)

    kohya = {}
    alpha = torch.tensor(KOHYA_ALPHA, dtype=torch.float16)
    for prefix, sd, to_path in (("lora_unet_", unet_sd, lambda k: k), ("lora_te_", te_sd, te_module_path)):
        for key, value in sd.items():
            module, part = key.split(".lora_")
            name = prefix + to_path(module).replace(".", "_")
            kohya[f"{name}.lora_down.weight" if part == "A.weight" else f"{name}.lora_up.weight"] = value
            kohya[f"{name}.alpha"] = alpha.clone()
    save_file(kohya, LORA_DIR / "kohya.safetensors", metadata={"format": "pt"})
    canonical_header(LORA_DIR / "kohya.safetensors")


def fused_outputs(file, scale):
    pipe = load_pipe()
    pipe.load_lora_weights(LORA_DIR, weight_name=file.name)
    pipe.fuse_lora(lora_scale=scale)
    unet_ref = load_file(FIXTURES / "reference/unet.safetensors")
    text_ref = load_file(FIXTURES / "reference/text_encoder.safetensors")
    with torch.no_grad():
        unet_out = pipe.unet(unet_ref["sample"], unet_ref["timestep"],
                             encoder_hidden_states=unet_ref["encoder_hidden_states"], return_dict=False)[0]
        text_out = pipe.text_encoder(text_ref["input_ids"]).last_hidden_state
    return unet_out, text_out, unet_ref["out"], text_ref["last_hidden_state"]


def check_metadata(file):
    with safe_open(file, framework="pt") as f:
        meta = f.metadata() or {}
    return json.loads(meta["lora_adapter_metadata"]) if "lora_adapter_metadata" in meta else None


def main():
    print(f"torch {torch.__version__}, diffusers {diffusers.__version__}, transformers {transformers.__version__}, "
          f"peft {peft.__version__}")
    torch.set_grad_enabled(False)
    unet_sd, te_sd = make_peft_state_dicts()
    write_files(unet_sd, te_sd)
    assert check_metadata(LORA_DIR / "peft.safetensors") is None
    assert check_metadata(LORA_DIR / "peft_alpha.safetensors")["unet.lora_alpha"] == UNET_META_ALPHA
    REF_DIR.mkdir(parents=True, exist_ok=True)
    for layout in ("peft", "peft_alpha", "kohya"):
        for scale in SCALES:
            unet_out, text_out, unet_base, text_base = fused_outputs(LORA_DIR / f"{layout}.safetensors", scale)
            save_file({"unet_out": unet_out.contiguous(), "text_out": text_out.contiguous()},
                      REF_DIR / f"{layout}_{scale}.safetensors")
            rel = lambda a, b: float((a - b).abs().max() / b.abs().max())  # noqa: E731
            print(f"{layout} scale {scale}: unet change {rel(unet_out, unet_base):.3f}, "
                  f"text change {rel(text_out, text_base):.3f} (max abs, relative to the unfused output's max)")
    total = sum(p.stat().st_size for d in (LORA_DIR, REF_DIR) for p in d.iterdir())
    print(f"LoRA fixtures: {total / 1024:.0f} KiB")


if __name__ == "__main__":
    sys.exit(main())
