"""HunyuanVideo Framepack (``HunyuanVideoFramepackTransformer3DModel``): recognised, refused.

Framepack's blocks are HunyuanVideo's (``HunyuanVideoAttnProcessor2_0``, double- then
single-stream), but the token sequence they attend is not one video grid. Per section the
forward packs ``[4x history; 2x history; clean frames; noisy frames; image + text]``: history
latents patchified (4, 8, 8) and (2, 4, 4) -- grids 4x and 2x coarser than the (1, 2, 2) of
the frames being denoised -- then the clean prefix and 1x history at full resolution, each
with its own RoPE frame indices (not contiguous with the noisy section's), and the text
trimmed to its valid length. A ``VideoLayout`` is one F x H x W grid plus one text span, so
no pattern can say which of these tokens are neighbours; supporting Framepack needs a
multi-grid layout (one grid per segment, with the segments' frame positions) that the
patterns and plans understand. Until then ``vidsparse.apply`` refuses it, before any forward,
rather than run a pattern on a wrong grid.

The record exists so the refusal names what is missing, and so ``generate`` maps
``HunyuanVideoFramepackPipeline`` here rather than to HunyuanVideo (longest prefix wins).
Geometry: HunyuanVideo's VAE (4x time, 8x space), patch (1, 2, 2); the pipeline's default
129x720x1280 at 30 fps.
"""

from __future__ import annotations

from typing import Any

import torch

from vidsparse.families.base import (
    TINY_HEAD_DIM,
    TINY_HEADS,
    TINY_LATENT_CHANNELS,
    TINY_TEXT_DIM,
    Family,
    TinyRequest,
    TinyVariant,
    VideoGeometry,
    joint_text,
)
from vidsparse.families.hunyuan import FAMILY as HUNYUAN

UNSUPPORTED = (
    "its self-attention sequence packs history latents at three compressions ([4x history; 2x history; "
    "clean 1x frames; noisy frames; image + text]: token grids of different resolutions with their own, "
    "non-contiguous RoPE frame indices) ahead of the frames being denoised, which one VideoLayout (one "
    "F x H x W grid plus one text span) cannot describe. Supporting it needs a multi-grid layout (a grid per "
    "segment) that patterns and plans understand; run Framepack without vidsparse (dense attention)"
)


def _no_grid(model: torch.nn.Module, kwargs: dict[str, Any]) -> None:
    """No single grid describes a Framepack call (see the module docstring)."""
    return None


# -- tiny model (for the refusal test and the registry's tiny-model checks) ------------------

#: History frames of the tiny inputs per compression (the pipeline's are 16 / 2 / 1).
TINY_HISTORY = {"4x": 4, "2x": 2, "1x": 1}
TINY_IMAGE_DIM = 8


def tiny_transformer_kwargs() -> dict[str, Any]:
    """A tiny ``HunyuanVideoFramepackTransformer3DModel``: 1 double + 1 single block, the history
    patch embedder and the image projection (as the Framepack checkpoints have them)."""
    return dict(
        in_channels=TINY_LATENT_CHANNELS,
        out_channels=TINY_LATENT_CHANNELS,
        num_attention_heads=TINY_HEADS,
        attention_head_dim=TINY_HEAD_DIM,
        num_layers=1,
        num_single_layers=1,
        num_refiner_layers=1,
        patch_size=2,
        patch_size_t=1,
        text_embed_dim=TINY_TEXT_DIM,
        pooled_projection_dim=8,
        rope_axes_dim=(2, 2, 4),
        has_image_proj=True,
        image_proj_dim=TINY_IMAGE_DIM,
        has_clean_x_embedder=True,
    )


def _tiny_inputs(r: TinyRequest) -> dict[str, Any]:
    """One Framepack section as the vanilla sampling packs it: frame indices [prefix, 4x, 2x, 1x, noisy]."""
    cfg = r.transformer.config
    n4, n2, n1 = TINY_HISTORY["4x"], TINY_HISTORY["2x"], TINY_HISTORY["1x"]
    idx = torch.arange(1 + n4 + n2 + n1 + r.frames)  # 1-D, shared by the batch (as the pipeline's)
    prefix, h4, h2, h1, noisy = idx.split([1, n4, n2, n1, r.frames])
    c, h, w = cfg.in_channels, r.height, r.width
    return dict(
        hidden_states=r.randn(r.batch, c, r.frames, h, w),
        timestep=r.timestep,
        encoder_hidden_states=r.randn(r.batch, r.text_len, r.text_dim),
        encoder_attention_mask=r.text_mask.to(r.transformer.dtype),
        pooled_projections=r.randn(r.batch, cfg.pooled_projection_dim),
        image_embeds=r.randn(r.batch, 4, cfg.image_proj_dim),
        indices_latents=noisy,
        guidance=torch.full((r.batch,), 6000.0, dtype=r.transformer.dtype),
        latents_clean=r.randn(r.batch, c, 1 + n1, h, w),
        indices_latents_clean=torch.cat([prefix, h1]),
        latents_history_2x=r.randn(r.batch, c, n2, h, w),
        indices_latents_history_2x=h2,
        latents_history_4x=r.randn(r.batch, c, n4, h, w),
        indices_latents_history_4x=h4,
    )


FAMILY = Family(
    name="hunyuan-framepack",
    aliases=("framepack", "hunyuanvideoframepack"),
    transformer_classes=("HunyuanVideoFramepackTransformer3DModel",),
    pipeline_prefixes=("HunyuanVideoFramepack",),
    processor_names=HUNYUAN.processor_names,  # the same blocks as HunyuanVideo's
    processor=HUNYUAN.processor,
    attention_paths=HUNYUAN.attention_paths,
    grid=_no_grid,
    text_len=joint_text,
    text_position="after",
    geometries=(VideoGeometry("hunyuan-framepack", 4, 8, (1, 2, 2), (129, 720, 1280), fps=30),),
    lora_refusal="vidsparse does not patch HunyuanVideo Framepack (its token sequence is not one video grid)",
    parallel_refusal="vidsparse does not patch HunyuanVideo Framepack (its token sequence is not one video grid)",
    unsupported=UNSUPPORTED,
    tiny={"hunyuan-framepack": TinyVariant("hunyuan-framepack", tiny_transformer_kwargs, _tiny_inputs)},
)
