"""LTX-Video (``LTXVideoTransformer3DModel``): video-only self-attention on packed tokens.

Geometry: VAE 8x time / 32x space, patch (1, 1, 1); 161x512x704 at 24 fps is the reference
video (21x16x22 tokens). Latents arrive packed (B, S, C) with ``num_frames, height, width``
(the latent grid) or, in the conditioning pipeline, only ``video_coords`` [B, 3, S], from
which the grid is read when they are a full frame-major raster.

Self-attention: ``transformer_blocks.<i>.attn1``; the processor mirrors diffusers 0.42
``LTXVideoAttnProcessor`` (q/k norm and RoPE before the head split).

Defaults: Radial decay 1.0 without sink; Tile (2, 4, 4) in a (5, 3, 3) window (LTX's grid is
small); GNA kernel (9, 9, 13).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from vidsparse.families.base import (
    GENERIC_PATTERN_DEFAULTS,
    TINY_HEAD_DIM,
    TINY_HEADS,
    TINY_TEXT_DIM,
    Family,
    Grid,
    Shard,
    ShardPlan,
    TinyRequest,
    TinyVariant,
    VideoGeometry,
    finish_tiny_pipeline,
    indexed_paths,
    no_text,
    tiny_dims,
    tiny_masked_prompt_kwargs,
)
from vidsparse.families.decode import ClipDecode, DecodeWindow, two_sided_window
from vidsparse.families.processor import SparseProcessor

# -- self-attention processor -----------------------------------------------------------------


class LTXSparseProcessor(SparseProcessor):
    """``LTXVideoAttnProcessor`` for self-attention (``attn1``): RoPE before the head split."""

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: torch.Tensor | None = None,
    ) -> torch.Tensor:
        pattern = self.state.pattern_for(self.layer)
        if pattern is None or encoder_hidden_states is not None or attention_mask is not None:
            return self._dense_any_order(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        from diffusers.models.transformers.transformer_ltx import apply_rotary_emb

        query = attn.norm_q(attn.to_q(hidden_states))
        key = attn.norm_k(attn.to_k(hidden_states))
        value = attn.to_v(hidden_states)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb)
            key = apply_rotary_emb(key, image_rotary_emb)
        query = query.unflatten(2, (attn.heads, -1))
        key = key.unflatten(2, (attn.heads, -1))
        value = value.unflatten(2, (attn.heads, -1))
        layout = self._layout(query.shape[1], 0, "none")
        out = self.state.attend(query, key, value, layout, pattern, self.layer, None)
        out = out.flatten(2, 3).to(query.dtype)
        out = attn.to_out[0](out)
        return attn.to_out[1](out)


# -- grid -------------------------------------------------------------------------------------


def _grid(model: torch.nn.Module, kwargs: dict[str, Any]) -> Grid | None:
    """``num_frames, height, width`` (latent grid, patch 1) or ``video_coords`` [B, 3, S]."""
    seq = kwargs["hidden_states"].shape[1]
    f, h, w = kwargs.get("num_frames"), kwargs.get("height"), kwargs.get("width")
    if f is not None and h is not None and w is not None:
        p, pt = model.config.patch_size, model.config.patch_size_t
        for grid in ((int(f), int(h), int(w)), (int(f) // pt, int(h) // p, int(w) // p)):
            if math.prod(grid) == seq:
                return grid
        return None
    coords = kwargs.get("video_coords")
    if coords is None:
        return None
    return grid_from_coords(coords[0], seq)


def grid_from_coords(coords: torch.Tensor, seq: int) -> Grid | None:
    """The (F, H, W) of coordinates [3, S] if they are a full frame-major raster, else None."""
    axes = [torch.unique(c, sorted=True) for c in coords]
    grid = tuple(int(a.numel()) for a in axes)
    if math.prod(grid) != seq:
        return None
    idx = [torch.searchsorted(a, c) for a, c in zip(axes, coords)]
    flat = (idx[0] * grid[1] + idx[1]) * grid[2] + idx[2]
    if not torch.equal(flat, torch.arange(seq, device=flat.device)):
        return None
    return grid  # type: ignore[return-value]


# -- parallel ----------------------------------------------------------------------------------

#: Packed tokens (B, S, C) cut where the blocks start; RoPE tables (B, S, D) as ``transformer.rope``
#: makes them (from num_frames/height/width or video_coords); a per-token timestep (B, S) of the
#: image-to-video pipelines is cut too (a (B,) timestep passes unchanged). Output: proj_out.
SHARD_PLAN = ShardPlan(
    inputs={"": {"timestep": Shard(1, 2)}, "transformer_blocks.0": {"hidden_states": Shard(1, 3)}},
    outputs={"rope": {0: Shard(1, 3), 1: Shard(1, 3)}},
    gather={"proj_out": Shard(1, 3)},
)


# -- tiny models ------------------------------------------------------------------------------


def _tiny_config() -> dict[str, Any]:
    return tiny_dims(
        patch_size=1,
        patch_size_t=1,
        cross_attention_dim=TINY_HEADS * TINY_HEAD_DIM,
        num_layers=2,
        caption_channels=TINY_TEXT_DIM,
    )


def _tiny_inputs(r: TinyRequest) -> dict[str, Any]:
    return dict(
        hidden_states=r.randn(r.batch, r.frames * r.height * r.width, r.transformer.config.in_channels),
        encoder_hidden_states=r.randn(r.batch, r.text_len, r.text_dim),
        timestep=r.timestep,
        encoder_attention_mask=r.text_mask.long(),
        num_frames=r.frames,
        height=r.height,
        width=r.width,
        rope_interpolation_scale=(1.0, 32.0, 32.0),
    )


def tiny_vae():
    """The smallest ``AutoencoderKLLTXVideo`` with the real one's interface: 4 latent channels,
    8-wide blocks, 8x time / 32x space compression like the checkpoint's. Its latent statistics
    are set to non-trivial values so that a wrong (de)normalization shows in tests."""
    import diffusers

    vae = diffusers.AutoencoderKLLTXVideo(
        latent_channels=4,
        block_out_channels=(8, 8, 8, 8),
        decoder_block_out_channels=(8, 8, 8, 8),
        layers_per_block=(1, 1, 1, 1, 1),
        decoder_layers_per_block=(1, 1, 1, 1, 1),
        scaling_factor=1.3,
    )
    with torch.no_grad():
        vae.latents_mean.copy_(torch.tensor([0.1, -0.2, 0.3, 0.05]))
        vae.latents_std.copy_(torch.tensor([0.9, 1.3, 0.7, 1.1]))
    return vae


#: ``generate --model tiny-ltx-i2v`` / ``train-lora --model tiny-ltx-i2v``: ``LTXImageToVideoPipeline``.
I2V_TINY = "ltx-i2v"
#: ``generate --model tiny-ltx-condition`` / ``train-lora --model tiny-ltx-condition``: ``LTXConditionPipeline``.
CONDITION_TINY = "ltx-condition"
#: The pipeline that takes a conditioning video (``generate --condition-video``), given to it as
#: ``conditions=[LTXVideoCondition(video=frames, frame_index=0)]``: a bare ``video=[frames]``
#: list is read as one condition per frame by its ``__call__``.
CONDITION_VIDEO_PIPELINE = "LTXConditionPipeline"


def condition_video_kwargs(frames: list) -> dict[str, Any]:
    """``LTXConditionPipeline``'s video prefix: frame 0, strength 1 (the pipeline cuts it to 8k + 1 frames)."""
    from diffusers.pipelines.ltx.pipeline_ltx_condition import LTXVideoCondition

    return {"conditions": [LTXVideoCondition(video=frames, frame_index=0, strength=1.0)]}


def tiny_pipeline(seed: int = 0, dtype: torch.dtype = torch.float32, *, variant: str = "ltx"):
    """A tiny random-init ``diffusers.LTXPipeline`` (no tokenizer / text encoder).

    The family's ``ltx`` tiny transformer, ``tiny_vae`` and the flow-matching Euler scheduler of
    Lightricks/LTX-Video's scheduler_config.json (resolution-dependent shift, terminal 0.1).
    Prompts go in as hashed embeddings with a padding mask (``tiny_prompt_kwargs``). Served as
    ``vidsparse generate --model tiny-ltx``; the LoRA tests train on it. ``variant="ltx-i2v"``:
    the same parts as an ``LTXImageToVideoPipeline`` (``tiny-ltx-i2v``); ``variant="ltx-condition"``:
    an ``LTXConditionPipeline`` (``tiny-ltx-condition``), whose scheduler has no resolution-dependent
    shift: that pipeline sets its own timesteps (``linear_quadratic_schedule``), which a
    dynamic-shifting scheduler refuses (``mu`` is required), so the 0.9.5+ checkpoints it serves
    ship ``use_dynamic_shifting = false`` (diffusers' own tests of it use the default scheduler).
    """
    import diffusers

    variants = ("ltx", I2V_TINY, CONDITION_TINY)
    if variant not in variants:
        raise ValueError(f"Unknown tiny LTX-Video pipeline variant {variant!r}. Expected one of {variants}.")

    from vidsparse.models.tiny import tiny_transformer

    with torch.random.fork_rng(devices=[]):  # seeded build; the caller's RNG stream is untouched
        torch.manual_seed(seed)
        vae = tiny_vae()
    if variant == CONDITION_TINY:
        scheduler = diffusers.FlowMatchEulerDiscreteScheduler()
    else:
        scheduler = diffusers.FlowMatchEulerDiscreteScheduler(
            use_dynamic_shifting=True,
            base_shift=0.95,
            max_shift=2.05,
            base_image_seq_len=1024,
            max_image_seq_len=4096,
            shift_terminal=0.1,
        )
    cls = {I2V_TINY: diffusers.LTXImageToVideoPipeline, CONDITION_TINY: diffusers.LTXConditionPipeline}.get(
        variant, diffusers.LTXPipeline
    )
    pipe = cls(
        scheduler=scheduler,
        vae=vae,
        text_encoder=None,
        tokenizer=None,
        transformer=tiny_transformer("ltx", seed=seed),
    )
    return finish_tiny_pipeline(pipe, dtype)


def tiny_prompt_kwargs(pipe, prompt: str, negative_prompt: str = "") -> dict[str, Any]:
    """Call kwargs of a tiny LTX-Video pipeline: hashed (negative) ``prompt_embeds`` and bool masks."""
    return tiny_masked_prompt_kwargs(pipe, prompt, negative_prompt, int(pipe.transformer.config.caption_channels))


def _lora_adapter() -> tuple[type, ...]:
    from vidsparse.lora.adapters.ltx import LTXConditionModel, LTXImageToVideoModel, LTXVideoModel

    return LTXVideoModel, LTXImageToVideoModel, LTXConditionModel


# -- per-clip VAE decode (vidsparse.parallel.vae) --------------------------------------------


def _vae_temporal_factor(vae) -> int:
    return int(vae.temporal_compression_ratio)  # 8


def _clip_window(vae, frames: int, start: int, end: int, overlap: int | None) -> DecodeWindow:
    if vae.use_framewise_decoding:  # temporal tiles blended across the whole video: decode it whole
        return DecodeWindow(0, frames, 0)
    return two_sided_window(vae, frames, start, end, overlap, k=_vae_temporal_factor(vae))


#: ``AutoencoderKLLTXVideo``'s decoder (``decoder_causal=False``) pads every time convolution on
#: both sides, normalises per token (RMSNorm) and upsamples depth-to-space dropping the first
#: frame: a pixel frame depends on a bounded window of latent frames on both sides. Its timestep
#: conditioning (``temb``) is per sample and the decode noise is added by the pipeline before
#: ``vae.decode``, so every rank's window sees the same latents.
CLIP_DECODE = ClipDecode(
    vae_classes=("AutoencoderKLLTXVideo",),
    temporal_factor=_vae_temporal_factor,
    window=_clip_window,
    exact="with the whole video as context (overlap all), and with any overlap covering the decoder's two-sided "
    "receptive field: equal within float tolerance (the convolutions run on a shorter tensor)",
)


FAMILY = Family(
    name="ltx",
    aliases=("ltxvideo",),
    transformer_classes=("LTXVideoTransformer3DModel",),
    pipeline_prefixes=("LTX",),
    processor_names=("LTXVideoAttnProcessor",),
    processor=LTXSparseProcessor,
    attention_paths=indexed_paths("transformer_blocks", "attn1"),
    grid=_grid,
    text_len=no_text,
    text_position="none",
    geometries=(VideoGeometry("ltx", 8, 32, (1, 1, 1), (161, 512, 704), fps=24),),
    pattern_defaults={  # LTX's grids are small (32x spatial VAE): smaller tiles and kernels
        **GENERIC_PATTERN_DEFAULTS,
        "tile": dict(tile=(2, 4, 4), window=(5, 3, 3)),
        "gna": dict(kernel_size=(9, 9, 13), stride=1),
    },
    condition_video={CONDITION_VIDEO_PIPELINE: condition_video_kwargs},
    lora_adapter=_lora_adapter,
    lora_refusals={
        "LTXI2VLongMultiPromptPipeline": "long multi-prompt image-to-video chains conditioned windows (clean "
        "conditioning latents with per-token timesteps), which train-lora does not build; train on LTXPipeline",
        "LTXLatentUpsamplePipeline": "the latent upsampler is a separate convolutional model, not the "
        "transformer train-lora tunes",
    },
    shard_plan=SHARD_PLAN,
    diffusers_cp_refusal=(
        "diffusers 0.42.1's LTX-Video _cp_plan cuts the prompt's attention mask with the text, and its Ulysses "
        "cross-attention then fails on the mask's shape (LTXPipeline always passes the mask; even without "
        "vidsparse: 'output with shape [2, 1, 6, 8] doesn't match the broadcast shape [2, 2, 6, 8]')"
    ),
    clip_decode=CLIP_DECODE,
    # Between the cut points an LTX block is per token but for attn1 (norms, FFN, the text
    # cross-attention's queries, the image-to-video pipelines' per-token timestep): a sparse
    # forward runs in the plans' kernel order there (vidsparse.pipelines.kernel_order).
    kernel_order=True,
    tiny={"ltx": TinyVariant("ltx", _tiny_config, _tiny_inputs)},
    tiny_pipeline=tiny_pipeline,
    tiny_prompt_kwargs=tiny_prompt_kwargs,
    tiny_pipelines={I2V_TINY: "LTXImageToVideoPipeline", CONDITION_TINY: "LTXConditionPipeline"},
)
