"""``TinyWanTransformer3DModel``: diffusers' ``WanTransformer3DModel`` plus an absolute position embedding.

Why: Wan's only positional signal is 3D RoPE, which is *relative* (attention scores depend on
``j - i`` only), and its patch embedding has no padding, so nothing tells a token where in the
video it sits. At the first sampling steps the input is pure noise, and the best prediction is
the caption's mean video ("moving left": the object on the right in the first frames, on the
left in the last ones), which a relative-only model cannot place. Wan 2.1 learns absolute
position from the grid's edges with billions of parameters; the tiny model did not: trained with
RoPE alone its videos had the asked colour but a motion fixed by the noise, whatever the prompt
(docs/tiny_model.md, "what failed"). Here a fixed sinusoidal code of each token's (frame, row,
column) *index*, mapped by one learned linear layer (zero-initialised, so training starts from
plain Wan), is added to the patch embedding's output. Being index-based like RoPE, it does not
know a video's length: frames past the trained count get codes never seen in training, which is
what the LoRA length-extension demonstration is about.

Everything else is the diffusers class: its ``forward``, blocks, attention processors (so
vidsparse's patterns, hooks, LoRA and context-parallel plan apply unchanged), config and
``save_pretrained`` / ``from_pretrained`` (``model_index.json`` names this module, as it does
``vidsparse.models.tiny_vae`` for the VAE; diffusers picks a component's load method by looking
up ``ModelMixin`` in the module named there, hence the import below). The embedding is added by a forward hook on
``patch_embedding``, so the state dict is diffusers' plus ``position_embedding.proj.*``.
"""

from __future__ import annotations

import functools
import math

import torch
from diffusers import WanTransformer3DModel
from diffusers.models.modeling_utils import ModelMixin  # noqa: F401  pipeline loading finds the load method
from torch import nn

#: Periods (in tokens) of the sine / cosine pairs coding each axis's index.
POSITION_PERIODS: tuple[float, ...] = (3.0, 6.0, 12.0, 24.0)


class AbsolutePositionEmbedding(nn.Module):
    """[B, C, F, H, W] patch embeddings -> the [1, C, F, H, W] position code to add to them."""

    def __init__(self, dim: int, periods: tuple[float, ...] = POSITION_PERIODS):
        super().__init__()
        self.periods = tuple(float(p) for p in periods)
        self.proj = nn.Linear(3 * 2 * len(self.periods), dim)
        nn.init.zeros_(self.proj.weight)  # starts as plain Wan; training decides how much to use
        nn.init.zeros_(self.proj.bias)

    def features(self, frames: int, height: int, width: int) -> torch.Tensor:
        """[F, H, W, 6 len(periods)]: sin / cos of each axis index over each period."""
        out = []
        for axis, n in enumerate((frames, height, width)):
            i = torch.arange(n, dtype=torch.float32)
            code = torch.stack([f(2 * math.pi * i / p) for p in self.periods for f in (torch.sin, torch.cos)], -1)
            shape = [1, 1, 1, code.shape[-1]]
            shape[axis] = n
            out.append(code.view(*shape).expand(frames, height, width, -1))
        return torch.cat(out, -1)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        f, h, w = patches.shape[-3:]
        feats = self.features(f, h, w).to(device=patches.device, dtype=self.proj.weight.dtype)
        return self.proj(feats).permute(3, 0, 1, 2).unsqueeze(0).to(patches.dtype)


class TinyWanTransformer3DModel(WanTransformer3DModel):
    """``WanTransformer3DModel`` whose patch embeddings get an absolute (frame, row, column) code."""

    @functools.wraps(WanTransformer3DModel.__init__)  # the same config signature (from_config reads it)
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        inner = self.config.num_attention_heads * self.config.attention_head_dim
        self.position_embedding = AbsolutePositionEmbedding(inner)
        self.patch_embedding.register_forward_hook(self._add_position)

    def _add_position(self, module: nn.Module, args, output: torch.Tensor) -> torch.Tensor:
        return output + self.position_embedding(output)


__all__ = ["POSITION_PERIODS", "AbsolutePositionEmbedding", "TinyWanTransformer3DModel"]
