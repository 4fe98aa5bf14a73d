"""The original project's cross-frame attention ("ReplaceAttn"), re-implemented on diffusers
with the cache keyed by the step's index: shared by make_fixtures.py (the parity references)
and bench_diffusers_frame.py (the per-frame speed reference)."""

import torch

CROSS_FRAME_SCOPES = ("up", "all")


class CrossFrameState:
    """What the patched self-attention layers share while a video is processed.

    first[(layer, step)] / prev[(layer, step)] hold attn1 inputs (the output of norm1, whole
    CFG batch) of the anchor frame / of the previous frame. Unlike the original, the key is
    the step's index in the frame's own schedule (not a per-layer call counter), and every
    frame's timesteps are checked against the anchor's."""

    def __init__(self, mode):
        assert mode in ("first+prev", "first", "prev"), mode
        self.mode = mode
        self.first, self.prev = {}, {}
        self.timesteps = None  # the anchor frame's schedule
        self.anchor = True
        self.step = None
        self.frame_timesteps = []

    def begin_frame(self, anchor):
        self.anchor, self.step, self.frame_timesteps = anchor, 0, []
        if anchor:
            self.first, self.prev, self.timesteps = {}, {}, None

    def end_frame(self):
        if self.anchor:
            self.timesteps = list(self.frame_timesteps)
        assert self.frame_timesteps == self.timesteps, \
            f"frame schedule {self.frame_timesteps} differs from the anchor's {self.timesteps}"
        self.step = None

    # UNet forward hooks: one UNet call per denoising step (CFG is one batch of 2).
    def unet_pre_hook(self, module, args, kwargs):
        t = args[1] if len(args) > 1 else kwargs["timestep"]
        t = int(t.flatten()[0]) if torch.is_tensor(t) else int(t)
        assert self.step is not None, "UNet called outside a frame"
        if not self.anchor:
            assert self.step < len(self.timesteps) and self.timesteps[self.step] == t, \
                f"step {self.step}: timestep {t} is not the anchor's"
        self.frame_timesteps.append(t)

    def unet_post_hook(self, module, args, kwargs, output):
        self.step += 1

    def context(self, layer, x):
        """The tensor that attn1 of `layer` projects to keys and values at the current step."""
        key = (layer, self.step)
        if self.anchor:
            self.first[key] = x.detach().clone()
            self.prev[key] = x.detach().clone()
            return x
        first, prev = self.first[key], self.prev[key]
        assert first.shape == x.shape and prev.shape == x.shape, (layer, first.shape, x.shape)
        if self.mode == "first+prev":
            ctx = torch.cat([first, prev], dim=1)  # tokens; batch rows pair up (uncond/cond)
        elif self.mode == "first":
            ctx = first
        else:
            ctx = prev
        self.prev[key] = x.detach().clone()
        return ctx


class CrossFrameAttnProcessor:
    """diffusers' AttnProcessor2_0 math (scaled_dot_product_attention, so an anchor frame is
    bit-identical to plain attention) with keys and values from CrossFrameState.context; the
    queries are always the frame's own."""

    def __init__(self, state, layer):
        self.state, self.layer = state, layer

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        assert encoder_hidden_states is None and attention_mask is None, f"{self.layer} is not a self-attention"
        assert hidden_states.ndim == 3 and attn.spatial_norm is None and attn.group_norm is None
        assert attn.norm_q is None and attn.norm_k is None
        assert not attn.residual_connection and attn.rescale_output_factor == 1.0
        context = self.state.context(self.layer, hidden_states)
        batch, heads = hidden_states.shape[0], attn.heads
        query, key, value = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
        head_dim = key.shape[-1] // heads
        query, key, value = (t.view(batch, -1, heads, head_dim).transpose(1, 2) for t in (query, key, value))
        out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0,
                                                                is_causal=False)
        out = out.transpose(1, 2).reshape(batch, -1, heads * head_dim).to(query.dtype)
        return attn.to_out[1](attn.to_out[0](out))


def cross_frame_layers(unet, scope):
    """diffusers names of the UNet's self-attention layers in scope, in module order."""
    assert scope in CROSS_FRAME_SCOPES, scope
    names = [n[: -len(".processor")] for n in unet.attn_processors]
    names = [n for n in names if n.endswith(".attn1")]
    if scope == "up":
        names = [n for n in names if n.startswith("up_blocks.")]
    return names


class ClassicCrossFrameAttnProcessor(CrossFrameAttnProcessor):
    """The same keys and values with the original's unfused math (diffusers' classic
    AttnProcessor: baddbmm scores, softmax, bmm), for the speed of the original pipeline."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        context = self.state.context(self.layer, hidden_states)
        query = attn.head_to_batch_dim(attn.to_q(hidden_states))
        key = attn.head_to_batch_dim(attn.to_k(context))
        value = attn.head_to_batch_dim(attn.to_v(context))
        probs = attn.get_attention_scores(query, key, None)
        out = attn.batch_to_head_dim(torch.bmm(probs, value))
        return attn.to_out[1](attn.to_out[0](out))
