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

from vidsparse.families.base import Family, VideoGeometry, joint_text
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
)
