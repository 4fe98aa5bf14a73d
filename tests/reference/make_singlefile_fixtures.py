#!/usr/bin/env python3
"""Single-file (original-layout) versions of the tiny models, checked by diffusers.

Run after make_fixtures.py (through tests/reference/run.sh). Deterministic: no random numbers;
every tensor is one of the tiny models' own f16 tensors under another name.

The tiny models as single files would be 10.8 MB (the checkpoint alone 8.2 MB: the text
encoder's 49408-row token embedding and the UNet), so what is committed is how to build them:

  tests/fixtures/single-file/layout.json
      {"checkpoint": {...}, "controlnet": {...}, "vae": {...}}, each
      {"metadata": {key: str}          the safetensors __metadata__ to write,
       "tensors": [[original_name, source, diffusers_name, original_shape], ...]}
      source is the diffusers file the tensor comes from, relative to tests/fixtures/
      ("tiny-sd/unet/diffusion_pytorch_model.safetensors", ...), or "arange" for the text
      encoder's position_ids buffer (int64 [1, 77], as SD1.5 checkpoints carry it).
      A tensor whose original shape differs from the diffusers one (the VAE attention's 1x1
      convolutions, stored [C, C, 1, 1] in the original layout, [C, C] in diffusers) is
      reshaped. tests/single_file.rs writes the files from it (same bytes as this script's).

  - checkpoint: tiny-sd's UNet under model.diffusion_model.*, its VAE under
    first_stage_model.*, its text encoder under cond_stage_model.transformer.text_model.* (plus
    position_ids), as SD1.5's v1-5-pruned-emaonly.safetensors lays them out.
  - controlnet: tiny-controlnet under control_model.* (control_v11p_sd15_canny.safetensors'
    layout: input_hint_block.*, zero_convs.*, middle_block_out.*).
  - vae: tiny-sd's VAE as encoder.* / decoder.* / quant_conv / post_quant_conv
    (vae-ft-mse-840000-ema-pruned.safetensors' layout).

  Metadata (the engine's config hints, see src/single_file.rs): what the tiny models'
  weights cannot show and SD1.5 does otherwise: sdcrossframe.unet_config /
  sdcrossframe.controlnet_config {"attention_head_dim": [2, 4, 4], "norm_num_groups": 8}
  (SD1.5: 8 heads, 32 groups), sdcrossframe.vae_config {"norm_num_groups": 8},
  sdcrossframe.text_encoder_config {"num_attention_heads": 4} (SD1.5: 64-wide heads).

  tests/fixtures/single-file/sd15_shapes.json
      {"checkpoint": {original_name: shape}, "controlnet": {...}, "vae": {...}}: the tensor
      names and shapes of real SD1.5 single files (no data): runwayml/stable-diffusion-v1-5's
      UNet, VAE and text encoder (the configs in src/models/sd15/) as v1-5-pruned-emaonly
      lays them out (with its position_ids and a few of the non-model buffers such files
      carry: alphas_cumprod, model_ema.decay), lllyasviel/sd-controlnet-canny's ControlNet as
      control_v11p_sd15_canny does (control_model.*), and the VAE as
      vae-ft-mse-840000-ema-pruned (no prefix). The unit tests of src/single_file.rs build the
      configs from these shapes and compare them with src/models/sd15/*.json. Checked with
      diffusers' own converters (convert_ldm_unet_checkpoint, convert_controlnet_checkpoint,
      convert_ldm_vae_checkpoint + conv_attn_to_linear, convert_ldm_clip_checkpoint) on meta
      tensors: they give back every tensor of the diffusers models, with their shapes.

The names are this script's own inverse of diffusers' single-file conversion. The check is
diffusers' own: the files are written to a temporary directory and loaded back with
StableDiffusionPipeline / ControlNetModel / AutoencoderKL .from_single_file (config= the tiny
model's directory, local files only), and every tensor of the loaded models must equal the
directory's (torch.equal), every key present on both sides.
"""

import json
import re
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures"
OUT = FIXTURES / "single-file"

UNET_FILE = "tiny-sd/unet/diffusion_pytorch_model.safetensors"
TEXT_FILE = "tiny-sd/text_encoder/model.safetensors"
VAE_FILE = "tiny-sd/vae/diffusion_pytorch_model.safetensors"
CONTROLNET_FILE = "tiny-controlnet/diffusion_pytorch_model.safetensors"

RESNET_TO_ORIGINAL = [
    ("norm1.", "in_layers.0."),
    ("conv1.", "in_layers.2."),
    ("time_emb_proj.", "emb_layers.1."),
    ("norm2.", "out_layers.0."),
    ("conv2.", "out_layers.3."),
    ("conv_shortcut.", "skip_connection."),
]


def resnet_original(rest):
    for new, old in RESNET_TO_ORIGINAL:
        if rest.startswith(new):
            return old + rest[len(new):]
    raise ValueError(f"unknown resnet tensor {rest}")


def unet_original(name, layers, up_attention_blocks, controlnet, hint_blocks):
    """A diffusers UNet / ControlNet name in the original layout (without the prefix)."""
    per = layers + 1
    simple = {
        "time_embedding.linear_1.": "time_embed.0.",
        "time_embedding.linear_2.": "time_embed.2.",
        "conv_in.": "input_blocks.0.0.",
        "conv_norm_out.": "out.0.",
        "conv_out.": "out.2.",
        "controlnet_mid_block.": "middle_block_out.0.",
        "controlnet_cond_embedding.conv_in.": "input_hint_block.0.",
        "controlnet_cond_embedding.conv_out.": f"input_hint_block.{2 * (hint_blocks + 1)}.",
    }
    for new, old in simple.items():
        if name.startswith(new):
            return old + name[len(new):]
    if m := re.match(r"controlnet_cond_embedding\.blocks\.(\d+)\.(.*)", name):
        return f"input_hint_block.{2 * (int(m[1]) + 1)}.{m[2]}"
    if m := re.match(r"controlnet_down_blocks\.(\d+)\.(.*)", name):
        return f"zero_convs.{m[1]}.0.{m[2]}"
    if m := re.match(r"down_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", name):
        return f"input_blocks.{1 + int(m[1]) * per + int(m[2])}.0.{resnet_original(m[3])}"
    if m := re.match(r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.*)", name):
        return f"input_blocks.{1 + int(m[1]) * per + int(m[2])}.1.{m[3]}"
    if m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", name):
        return f"input_blocks.{1 + int(m[1]) * per + layers}.0.op.{m[2]}"
    if m := re.match(r"mid_block\.resnets\.(\d+)\.(.*)", name):
        return f"middle_block.{2 * int(m[1])}.{resnet_original(m[2])}"
    if m := re.match(r"mid_block\.attentions\.0\.(.*)", name):
        return f"middle_block.1.{m[1]}"
    if m := re.match(r"up_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", name):
        return f"output_blocks.{int(m[1]) * per + int(m[2])}.0.{resnet_original(m[3])}"
    if m := re.match(r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.*)", name):
        return f"output_blocks.{int(m[1]) * per + int(m[2])}.1.{m[3]}"
    if m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", name):
        block = int(m[1])
        slot = 2 if block in up_attention_blocks else 1
        return f"output_blocks.{block * per + layers}.{slot}.conv.{m[2]}"
    raise ValueError(f"no original name for {name}")


def vae_original(name, levels):
    """A diffusers AutoencoderKL name in the original layout, and whether it is stored 4-d."""
    for side in ("encoder", "decoder"):
        for new, old in (("conv_norm_out.", "norm_out."), ("conv_in.", "conv_in."), ("conv_out.", "conv_out.")):
            if name.startswith(f"{side}.{new}"):
                return f"{side}.{old}{name[len(side) + 1 + len(new):]}", False
    if name.startswith(("quant_conv.", "post_quant_conv.")):
        return name, False
    if m := re.match(r"(encoder|decoder)\.mid_block\.resnets\.(\d)\.(.*)", name):
        return f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3].replace('conv_shortcut', 'nin_shortcut')}", False
    if m := re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\.(.*)", name):
        part = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}[m[2]]
        return f"{m[1]}.mid.attn_1.{part}.{m[3]}", m[2] != "group_norm" and m[3] == "weight"
    if m := re.match(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", name):
        return f"encoder.down.{m[1]}.block.{m[2]}.{m[3].replace('conv_shortcut', 'nin_shortcut')}", False
    if m := re.match(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", name):
        return f"encoder.down.{m[1]}.downsample.conv.{m[2]}", False
    if m := re.match(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", name):
        level = levels - 1 - int(m[1])
        return f"decoder.up.{level}.block.{m[2]}.{m[3].replace('conv_shortcut', 'nin_shortcut')}", False
    if m := re.match(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", name):
        return f"decoder.up.{levels - 1 - int(m[1])}.upsample.conv.{m[2]}", False
    raise ValueError(f"no original name for {name}")


def config(path):
    return json.loads((FIXTURES / path).read_text())


def unet_entries(source, prefix, cfg, controlnet):
    tensors = load_file(FIXTURES / source)
    layers = cfg["layers_per_block"]
    ups = {int(m[1]) for k in tensors if (m := re.match(r"up_blocks\.(\d+)\.attentions\.", k))}
    hint = len({m[1] for k in tensors if (m := re.match(r"controlnet_cond_embedding\.blocks\.(\d+)\.", k))})
    return [
        [prefix + unet_original(k, layers, ups, controlnet, hint), source, k, list(v.shape)]
        for k, v in sorted(tensors.items())
    ]


def vae_entries(prefix):
    tensors = load_file(FIXTURES / VAE_FILE)
    levels = len(config("tiny-sd/vae/config.json")["block_out_channels"])
    out = []
    for k, v in sorted(tensors.items()):
        name, conv = vae_original(k, levels)
        shape = list(v.shape) + ([1, 1] if conv else [])
        out.append([prefix + name, VAE_FILE, k, shape])
    return out


def text_entries():
    tensors = load_file(FIXTURES / TEXT_FILE)
    prefix = "cond_stage_model.transformer.text_model."
    out = [[prefix + k, TEXT_FILE, k, list(v.shape)] for k, v in sorted(tensors.items())]
    max_positions = config("tiny-sd/text_encoder/config.json")["max_position_embeddings"]
    out.append([prefix + "embeddings.position_ids", "arange", "", [1, max_positions]])
    return out


def build(entries):
    """The original-layout tensors of a layout entry list."""
    cache = {}
    out = {}
    for original, source, name, shape in entries:
        if source == "arange":
            out[original] = torch.arange(shape[1], dtype=torch.int64).reshape(shape)
            continue
        if source not in cache:
            cache[source] = load_file(FIXTURES / source)
        out[original] = cache[source][name].reshape(shape).contiguous()
    assert len(out) == len(entries), "two tensors under one original name"
    return out


def assert_same(what, loaded, reference):
    loaded = {k: v for k, v in loaded.items() if not k.endswith("position_ids")}
    reference = {k: v for k, v in reference.items() if not k.endswith("position_ids")}
    assert loaded.keys() == reference.keys(), (what, sorted(loaded.keys() ^ reference.keys())[:10])
    for k in reference:
        assert torch.equal(loaded[k].to(reference[k].dtype), reference[k]), (what, k)
    print(f"{what}: {len(reference)} tensors equal after diffusers' from_single_file")


def sd15_config(name):
    return json.loads((ROOT / "src" / "models" / "sd15" / f"{name}.json").read_text())


def shapes_of(state_dict):
    return {k: list(v.shape) for k, v in state_dict.items()}


def check_converted(what, converted, model_state):
    converted = {
        k.removeprefix("text_model."): list(v.shape) for k, v in converted.items() if not k.endswith("position_ids")
    }
    expected = {k: v for k, v in shapes_of(model_state).items() if not k.endswith("position_ids")}
    assert converted == expected, (what, sorted(converted.keys() ^ expected.keys())[:10])
    print(f"SD1.5 {what}: diffusers' converter gives back all {len(expected)} tensors")


def sd15_shapes():
    """Names and shapes of SD1.5 single files, checked with diffusers' converters."""
    from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel
    from diffusers.loaders import single_file_utils as sfu
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(sd15_config("unet"))
        vae = AutoencoderKL.from_config(sd15_config("vae"))
        controlnet = ControlNetModel.from_config(sd15_config("controlnet"))
        text = CLIPTextModel(CLIPTextConfig(**sd15_config("text_encoder")))

    def unet_names(model, prefix, controlnet_):
        state = model.state_dict()
        layers = model.config.layers_per_block
        ups = {int(m[1]) for k in state if (m := re.match(r"up_blocks\.(\d+)\.attentions\.", k))}
        hint = len({m[1] for k in state if (m := re.match(r"controlnet_cond_embedding\.blocks\.(\d+)\.", k))})
        return {prefix + unet_original(k, layers, ups, controlnet_, hint): v for k, v in state.items()}

    def vae_names(prefix):
        levels = len(vae.config.block_out_channels)
        out = {}
        for k, v in vae.state_dict().items():
            name, conv = vae_original(k, levels)
            out[prefix + name] = v.reshape(list(v.shape) + [1, 1]) if conv else v
        return out

    unet_ldm = unet_names(unet, "model.diffusion_model.", False)
    check_converted(
        "UNet",
        sfu.convert_ldm_unet_checkpoint(unet_ldm, dict(unet.config)),
        unet.state_dict(),
    )
    cn_ldm = unet_names(controlnet, "control_model.", True)
    check_converted(
        "ControlNet",
        sfu.convert_controlnet_checkpoint(cn_ldm, dict(controlnet.config)),
        controlnet.state_dict(),
    )
    vae_ldm = vae_names("")
    check_converted("VAE", sfu.convert_ldm_vae_checkpoint(vae_ldm, dict(vae.config)), vae.state_dict())
    text_ldm = {"cond_stage_model.transformer.text_model." + k: v for k, v in text.state_dict().items()}
    text_ldm["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.empty(
        (1, text.config.max_position_embeddings), device="meta"
    )
    check_converted("text encoder", sfu.convert_ldm_clip_checkpoint(text_ldm), text.state_dict())

    checkpoint = {**unet_ldm, **vae_names("first_stage_model."), **text_ldm}
    checkpoint["alphas_cumprod"] = torch.empty((1000,), device="meta")
    checkpoint["model_ema.decay"] = torch.empty((), device="meta")
    return {
        "checkpoint": shapes_of(checkpoint),
        "controlnet": shapes_of(cn_ldm),
        "vae": shapes_of(vae_ldm),
    }


def main():
    from diffusers import AutoencoderKL, ControlNetModel, StableDiffusionPipeline

    unet_hint = {"attention_head_dim": [2, 4, 4], "norm_num_groups": 8}
    cfg = config("tiny-sd/unet/config.json")
    assert cfg["attention_head_dim"] == unet_hint["attention_head_dim"], cfg["attention_head_dim"]
    assert cfg["norm_num_groups"] == unet_hint["norm_num_groups"]
    cn_cfg = config("tiny-controlnet/config.json")
    assert (cn_cfg["attention_head_dim"], cn_cfg["norm_num_groups"]) == (cfg["attention_head_dim"], 8)
    vae_cfg = config("tiny-sd/vae/config.json")
    text_cfg = config("tiny-sd/text_encoder/config.json")
    layout = {
        "checkpoint": {
            "metadata": {
                "sdcrossframe.unet_config": json.dumps(unet_hint),
                "sdcrossframe.vae_config": json.dumps({"norm_num_groups": vae_cfg["norm_num_groups"]}),
                "sdcrossframe.text_encoder_config": json.dumps(
                    {"num_attention_heads": text_cfg["num_attention_heads"]}
                ),
            },
            "tensors": unet_entries(UNET_FILE, "model.diffusion_model.", cfg, False)
            + vae_entries("first_stage_model.")
            + text_entries(),
        },
        "controlnet": {
            "metadata": {"sdcrossframe.controlnet_config": json.dumps(unet_hint)},
            "tensors": unet_entries(CONTROLNET_FILE, "control_model.", cn_cfg, True),
        },
        "vae": {
            "metadata": {"sdcrossframe.vae_config": json.dumps({"norm_num_groups": vae_cfg["norm_num_groups"]})},
            "tensors": vae_entries(""),
        },
    }

    with tempfile.TemporaryDirectory() as tmp:
        files = {}
        for kind, entry in layout.items():
            files[kind] = Path(tmp) / f"{kind}.safetensors"
            save_file(build(entry["tensors"]), files[kind], metadata=entry["metadata"])

        pipe = StableDiffusionPipeline.from_single_file(
            str(files["checkpoint"]),
            config=str(FIXTURES / "tiny-sd"),
            local_files_only=True,
            safety_checker=None,
            requires_safety_checker=False,
        )
        reference = StableDiffusionPipeline.from_pretrained(FIXTURES / "tiny-sd", safety_checker=None)
        for part in ("unet", "vae", "text_encoder"):
            assert_same(
                f"checkpoint {part}", getattr(pipe, part).state_dict(), getattr(reference, part).state_dict()
            )
        controlnet = ControlNetModel.from_single_file(
            str(files["controlnet"]), config=str(FIXTURES / "tiny-controlnet"), local_files_only=True
        )
        assert_same(
            "controlnet",
            controlnet.state_dict(),
            ControlNetModel.from_pretrained(FIXTURES / "tiny-controlnet").state_dict(),
        )
        vae = AutoencoderKL.from_single_file(
            str(files["vae"]), config=str(FIXTURES / "tiny-sd"), subfolder="vae", local_files_only=True
        )
        assert_same("vae", vae.state_dict(), reference.vae.state_dict())

    OUT.mkdir(parents=True, exist_ok=True)
    text = json.dumps(layout, indent=0, sort_keys=True) + "\n"
    (OUT / "layout.json").write_text(text)
    print(f"wrote {OUT / 'layout.json'} ({len(text)} bytes)")
    text = json.dumps(sd15_shapes(), indent=0, sort_keys=True) + "\n"
    (OUT / "sd15_shapes.json").write_text(text)
    print(f"wrote {OUT / 'sd15_shapes.json'} ({len(text)} bytes)")


if __name__ == "__main__":
    main()
