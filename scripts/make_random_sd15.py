"""make_random_sd15.py OUT TOKENIZER_DIR: writes a diffusers-format SD1.5-shaped model with random
weights (fp16 safetensors) to OUT/sd, a Canny-ControlNet-shaped one to OUT/cn and a TAESD-shaped
AutoencoderTiny (diffusers' defaults are madebyollin/taesd's config) to OUT/taesd, so the element
can load real-size models on the GPU machine (speed does not depend on weight values).
TOKENIZER_DIR: a model's tokenizer/ folder with model_index.json beside it, e.g.
tests/fixtures/tiny-sd/tokenizer. Needs torch, diffusers and transformers; about 40 s on the GPU
machine. Used by scripts/gst-gpu.sh run (a copy of the sessions' shared tool)."""
import sys, shutil, torch
from diffusers import (UNet2DConditionModel, ControlNetModel, AutoencoderKL, AutoencoderTiny, DDIMScheduler)
from transformers import CLIPTextModel, CLIPTextConfig
out, tok = sys.argv[1], sys.argv[2]
torch.manual_seed(0)
dt = torch.float16
def save(m, d):
    m.to(dt).save_pretrained(d, safe_serialization=True)
# small init scale so f16 activations stay finite through 16 blocks
def shrink(m):
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() > 1: p.mul_(0.5)
    return m
unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
save(shrink(unet), f"{out}/sd/unet"); del unet
cn = ControlNetModel(cross_attention_dim=768, attention_head_dim=8)
save(shrink(cn), f"{out}/cn"); del cn
vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                    sample_size=512, scaling_factor=0.18215)
save(vae, f"{out}/sd/vae")
save(AutoencoderTiny(), f"{out}/taesd")
te = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                  num_attention_heads=12, max_position_embeddings=77, vocab_size=49408,
                                  hidden_act="quick_gelu", projection_dim=768))
te.to(dt).save_pretrained(f"{out}/sd/text_encoder", safe_serialization=True)
DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
              set_alpha_to_one=False, steps_offset=1).save_pretrained(f"{out}/sd/scheduler")
shutil.copytree(tok, f"{out}/sd/tokenizer")
shutil.copy(f"{tok}/../model_index.json", f"{out}/sd/model_index.json")
print("random SD1.5 + ControlNet + TAESD written to", out)
