"""Wan-Animate (``WanAnimateTransformer3DModel``): Wan 2.2-Animate's video self-attention.

The transformer is Wan's: ``blocks.i`` are Wan blocks whose ``attn1`` runs diffusers'
``WanAttnProcessor`` (the Animate module's copy, the same computation), so the Wan family's
processor is reused. What Animate adds stays the model's own: the pose latents are added to the
patch embeddings before the blocks (no extra tokens), and the face adapter
(``face_adapter``, ``WanAnimateFaceBlockCrossAttention``: per-frame cross-attention to the
motion vectors) is cross-attention, as is ``attn2``.

Grid: latents [B, 2C + 4, T + 1, H, W] (the reference-image latent frame first), patch (1, 2, 2):
the call's (T + 1) x H/2 x W/2 tokens. Geometry: Wan 2.1's VAE (4x time, 8x space); the
pipeline's default segment is 77 frames at 720x1280, 30 fps, i.e. 20 + 1 latent frames;
``VideoGeometry.latent_grid`` gives the 20 video frames, the reference frame comes on top.

Generate: ``vidsparse generate --image REF --pose-video P --face-video F`` (``--animate-mode
replace`` with ``--background-video`` / ``--mask-video``) calls ``WanAnimatePipeline``, whose facts
are here: the call's ``mode`` values, the reference latent frame on top of the segment's, and the
segment arithmetic (``segment_count``): the output is as long as the pose video, denoised in
segments of ``segment_frame_length`` (generate's ``--frames``) overlapping by one frame. The tiny
pipeline (``tiny_pipeline``, ``--model tiny-wan-animate``) is diffusers' own classes at tiny sizes.

Parallel: Wan's shard plan, plus the face adapter's motion vectors [B, T, N, C] cut per latent
frame (``SHARD_PLAN``): the adapter cross-attends frame t's tokens to motion vector t only, so it
is clip-local. The pipeline conditions each segment on the decoded last frame of the one before,
so under ``run_parallel`` every rank decodes every segment whole (``replicated_decode``), not per
clip: the ranks keep identical conditioning, and the video equals one device's.

Defaults: Wan's (Radial decay 0.2, sink, layer 0 dense; Tile (2, 8, 8) / (5, 3, 3); GNA
(9, 25, 25)).
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
from vidsparse.families.wan import (
    WanSparseProcessor,
    tiny_image_encoder,
    tiny_prompt_kwargs,
    tiny_transformer_kwargs,
    tiny_vae,
)

# -- the pipeline's call (what ``vidsparse generate`` passes it) ------------------------------

#: The pipeline class ``vidsparse generate --pose-video / --face-video`` drives.
ANIMATE_PIPELINE = "WanAnimatePipeline"
#: ``mode`` of ``WanAnimatePipeline.__call__``: animate the reference character with the pose / face
#: motion, or replace the person of a background video (``background_video`` + ``mask_video``).
ANIMATE_MODES = ("animate", "replace")
#: Latent frames the transformer call has besides the segment's: the reference image's, first.
REFERENCE_LATENT_FRAMES = 1
#: The pipeline's ``prev_segment_conditioning_frames`` default: pixel frames of a segment's end that
#: start the next segment (its conditioning); generate keeps the default.
PREV_SEGMENT_FRAMES = 1


def segment_count(video_frames: int, segment_frames: int, prev: int = PREV_SEGMENT_FRAMES) -> int:
    """Segments ``WanAnimatePipeline`` denoises for a pose video of ``video_frames`` frames.

    The pipeline's own arithmetic (diffusers 0.42 ``__call__``, step 2): segments of
    ``segment_frames`` overlapping by ``prev`` frames, the conditioning videos reflect-padded up
    to whole segments and the output cut back to ``video_frames``.
    """
    if video_frames <= prev:
        raise ValueError(f"a Wan-Animate pose video needs more than {prev} frame(s), got {video_frames}.")
    effective = segment_frames - prev
    last = (video_frames - prev) % effective
    target = video_frames + (effective - last if last else 0)
    return target // effective


# -- parallel ---------------------------------------------------------------------------------

#: Wan's plan (tokens cut entering ``blocks.0``, RoPE, ``proj_out`` gathered; the pose latents are
#: added to the patch embeddings before the cut) plus the face adapter's motion vectors: each
#: ``face_adapter.<i>`` cross-attends the tokens of latent frame t to motion vector t only
#: ([B, T, N, C], the reference frame's a zero pad), so every rank keeps its clip's frames of them.
SHARD_PLAN = ShardPlan(
    inputs={
        **WAN.require_shard_plan().inputs,
        "face_adapter.*": {"encoder_hidden_states": Shard(1, 4, per_frame=True)},
    },
    outputs=WAN.require_shard_plan().outputs,
    gather=WAN.require_shard_plan().gather,
)


# -- tiny model -------------------------------------------------------------------------------

#: Face crops of the tiny motion encoder (the real one takes 512x512).
_TINY_FACE = 16


def _tiny_config() -> dict[str, Any]:
    c = TINY_LATENT_CHANNELS
    kw = tiny_transformer_kwargs(
        in_channels=2 * c + 4,
        out_channels=c,
        image_dim=TINY_TEXT_DIM,
        added_kv_proj_dim=TINY_HEADS * TINY_HEAD_DIM,
    )
    kw.update(
        latent_channels=c,
        motion_encoder_channel_sizes={str(_TINY_FACE): 8, str(_TINY_FACE // 2): 8, str(_TINY_FACE // 4): 8},
        motion_encoder_size=_TINY_FACE,
        motion_style_dim=8,
        motion_dim=4,
        motion_encoder_dim=8,
        face_encoder_hidden_dim=8,
        face_encoder_num_heads=2,
        inject_face_latents_blocks=2,
    )
    return kw


def _tiny_inputs(r: TinyRequest) -> dict[str, Any]:
    """``frames`` latent frames in all (the reference frame + frames - 1 pose-driven ones); the
    face video has 4 (frames - 2) + 1 frames, which the face encoder's two stride-2 convs bring
    to frames - 1 motion steps."""
    if r.frames < 2:
        raise ValueError(f"the tiny Wan-Animate inputs need frames >= 2 (a reference + a video frame), got {r.frames}.")
    cfg = r.transformer.config
    return dict(
        hidden_states=r.randn(r.batch, cfg.in_channels, r.frames, r.height, r.width),
        timestep=r.timestep,
        # WanAttnProcessor splits the cross-attention context at a hard-coded 512 text tokens.
        encoder_hidden_states=r.randn(r.batch, 512, r.text_dim),
        encoder_hidden_states_image=r.randn(r.batch, 4, cfg.image_dim),
        pose_hidden_states=r.randn(r.batch, cfg.latent_channels, r.frames - 1, r.height, r.width),
        face_pixel_values=r.randn(r.batch, 3, 4 * (r.frames - 2) + 1, _TINY_FACE, _TINY_FACE),
    )


def tiny_pipeline(seed: int = 0, dtype: torch.dtype = torch.float32):
    """A tiny random-init ``diffusers.WanAnimatePipeline`` (no tokenizer / text encoder).

    diffusers' own classes at tiny sizes: the ``WanAnimateTransformer3DModel`` of ``_tiny_config``
    (2 Wan blocks, a face adapter on each, a 16 px motion encoder), Wan's tiny VAE, Wan I2V's tiny
    CLIP vision tower and image processor (the reference image's context), and the flow-matching
    Euler scheduler the other tiny Wan pipelines use. Prompts are passed as 512-token
    ``prompt_embeds`` (``tiny_prompt_kwargs``: the image context makes the attention split at 512).
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, WanAnimatePipeline, WanAnimateTransformer3DModel

    with torch.random.fork_rng(devices=[]):  # seeded build; the caller's RNG stream is untouched
        torch.manual_seed(seed)
        transformer = WanAnimateTransformer3DModel(**_tiny_config())
        image_encoder, image_processor = tiny_image_encoder()
        vae = tiny_vae()
    pipe = WanAnimatePipeline(
        tokenizer=None,
        text_encoder=None,
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        image_processor=image_processor,
        image_encoder=image_encoder,
        transformer=transformer,
    )
    return finish_tiny_pipeline(pipe, dtype)


# -- the record -------------------------------------------------------------------------------

FAMILY = Family(
    name="wan-animate",
    aliases=("wananimate", "animate"),
    transformer_classes=("WanAnimateTransformer3DModel",),
    pipeline_prefixes=("WanAnimate",),
    processor_names=("WanAttnProcessor",),
    processor=WanSparseProcessor,
    attention_paths=indexed_paths("blocks", "attn1"),
    grid=latent_grid,  # latents [B, 2C + 4, T + 1, H, W]
    text_len=no_text,
    text_position="none",
    geometries=(VideoGeometry("wan-animate", 4, 8, (1, 2, 2), (77, 720, 1280), fps=30),),
    **WAN.sparse_settings(),  # Wan's attention, so Wan's pattern defaults and dense schedule
    lora_refusal=(
        "Wan-Animate is trained on (video, reference image, pose video, face video) sets: its transformer takes "
        "pose latents added to the patch embeddings, per-frame face motion vectors (face_adapter cross-attention) "
        "and the reference image's latents and CLIP embeddings, none of which train-lora's captioned clips "
        "provide; for longer Wan 2.2 clips train WanPipeline (T2V-A14B) or WanImageToVideoPipeline (I2V-A14B), "
        "which train-lora trains"
    ),
    shard_plan=SHARD_PLAN,
    tiny={"wan-animate": TinyVariant("wan-animate", _tiny_config, _tiny_inputs)},
    tiny_pipeline=tiny_pipeline,
    tiny_prompt_kwargs=tiny_prompt_kwargs,
    replicated_decode=(
        "WanAnimatePipeline starts each segment from the decoded last frame of the one before, so every rank "
        "needs the whole decode of every segment"
    ),
)
