"""Wan VACE (``WanVACETransformer3DModel``): Wan with a control branch; both branches' self-attention.

Geometry: Wan 2.1's VAE (4x time, first frame kept; 8x space) and patch (1, 2, 2); the VACE
pipeline defaults to 81x480x832 at 16 fps. Each reference image adds one latent frame in front
of the video, so the grid is read from each call's latents, never from the requested size alone.

Self-attention: the main ``blocks`` and the control ``vace_blocks`` are Wan blocks with
``WanAttnProcessor``; the control tokens (``vace_patch_embedding`` of the VACE control latents,
zero-padded to the video's length) lie on the same token grid and share the video's RoPE. Both
``attn1`` kinds are patched with the Wan family's processor: layers ``0 .. N-1`` are
``blocks.i.attn1`` (so "layer 0 dense" is the first main block, as for Wan), layers
``N .. N+V-1`` are ``vace_blocks.j.attn1`` (the control branch runs first in the forward).
Cross-attention (``attn2``) stays the model's own.

LoRA: trained as text-to-video with the control the pipeline itself builds when given no control
video, mask or reference images (``vidsparse.lora.adapters.wan_vace``).

Parallel: Wan's shard plan with the control branch's inputs cut at ``vace_blocks.0``.

Defaults: Wan's (Radial decay 0.2, sink, layer 0 dense; Tile (2, 8, 8) / (5, 3, 3); GNA
(9, 25, 25)).
"""

from __future__ import annotations

from typing import Any

import torch

from vidsparse.families.base import (
    Family,
    Shard,
    ShardPlan,
    TinyRequest,
    TinyVariant,
    VideoGeometry,
    finish_tiny_pipeline,
    indexed_paths,
    latent_grid,
    no_text,
)
from vidsparse.families.wan import FAMILY as WAN
from vidsparse.families.wan import WanSparseProcessor, tiny_transformer_kwargs, tiny_vae

#: Control-latent channels of the VACE pipeline: inactive + reactive video latents (2 x z_dim)
#: and the 8x8 pixel mask folded into channels (spatial factor squared).
_MASK_CHANNELS = 8 * 8


def _attention_paths(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module, int]]:
    main = indexed_paths("blocks", "attn1")(model)
    return main + indexed_paths("vace_blocks", "attn1", offset=len(main))(model)


# -- parallel ---------------------------------------------------------------------------------

#: Wan's plan plus the control branch: the first control block takes the whole video's
#: ``hidden_states`` and the padded ``control_hidden_states`` (both [B, S, D], frame-major on the
#: video's grid), so both are cut there; its hints then stay on the rank's clip and are added to
#: the clip's main-block outputs. Later control blocks ignore ``hidden_states`` (no ``proj_in``).
SHARD_PLAN = ShardPlan(
    inputs={
        "vace_blocks.0": {"hidden_states": Shard(1, 3), "control_hidden_states": Shard(1, 3)},
        "blocks.0": {"hidden_states": Shard(1, 3)},
    },
    outputs={"rope": {0: Shard(1, 4), 1: Shard(1, 4)}},
    gather={"proj_out": Shard(1, 3)},
)


# -- tiny models ------------------------------------------------------------------------------


def _tiny_config() -> dict[str, Any]:
    kw = tiny_transformer_kwargs()
    kw.update(vace_layers=[0, 1], vace_in_channels=2 * kw["in_channels"] + _MASK_CHANNELS)
    return kw


def _tiny_inputs(r: TinyRequest) -> dict[str, Any]:
    cfg = r.transformer.config
    return dict(
        hidden_states=r.randn(r.batch, cfg.in_channels, r.frames, r.height, r.width),
        timestep=r.timestep,
        encoder_hidden_states=r.randn(r.batch, r.text_len, r.text_dim),
        control_hidden_states=r.randn(r.batch, cfg.vace_in_channels, r.frames, r.height, r.width),
    )


def tiny_pipeline(seed: int = 0, dtype: torch.dtype = torch.float32):
    """A tiny random-init ``diffusers.WanVACEPipeline`` (no tokenizer / text encoder; prompts
    as ``prompt_embeds``). Without ``video`` / ``mask`` it is text-to-video through VACE."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanVACEPipeline, WanVACETransformer3DModel

    with torch.random.fork_rng(devices=[]):  # seeded build; the caller's RNG stream is untouched
        torch.manual_seed(seed)
        transformer = WanVACETransformer3DModel(**_tiny_config())
        vae = tiny_vae()
    pipe = WanVACEPipeline(
        tokenizer=None,
        text_encoder=None,
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        transformer=transformer,
    )
    return finish_tiny_pipeline(pipe, dtype)


# -- LoRA -------------------------------------------------------------------------------------


def _lora_adapter() -> type:
    """Text-to-video through VACE with the pipeline's own empty control (``vidsparse.lora.adapters.wan_vace``)."""
    from vidsparse.lora.adapters.wan_vace import WanVACEModel

    return WanVACEModel


# -- the record -------------------------------------------------------------------------------

FAMILY = Family(
    name="wan-vace",
    aliases=("vace", "wanvace"),
    transformer_classes=("WanVACETransformer3DModel",),
    pipeline_prefixes=("WanVACE",),
    processor_names=("WanAttnProcessor",),
    processor=WanSparseProcessor,
    attention_paths=_attention_paths,
    grid=latent_grid,  # control tokens share the video's grid
    text_len=no_text,
    text_position="none",
    geometries=(VideoGeometry("wan-vace", 4, 8, (1, 2, 2), (81, 480, 832), fps=16),),
    **WAN.sparse_settings(),  # Wan's attention, so Wan's pattern defaults and dense schedule
    lora_adapter=_lora_adapter,
    shard_plan=SHARD_PLAN,
    tiny={"wan-vace": TinyVariant("wan-vace", _tiny_config, _tiny_inputs)},
    tiny_pipeline=tiny_pipeline,
)
