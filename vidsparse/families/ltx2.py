"""LTX-2 (``LTX2VideoTransformer3DModel``): sparse VIDEO self-attention of the audio+video model.

Only the video self-attention (``transformer_blocks.<i>.attn1``) is patched. Everything else in
an LTX-2 block stays the model's own dense path, untouched: the audio self-attention
(``audio_attn1``), the text cross-attention of both streams (``attn2``, ``audio_attn2``) and the
audio<->video cross-attention (``audio_to_video_attn``, ``video_to_audio_attn``). Audio tokens
are a 1-D sequence (no 3-D grid a spatiotemporal pattern could use) and the cross-attentions
are not self-attention, so none of them is a video self-attention vidsparse could make sparse.

Geometry (diffusers 0.42 ``LTX2Pipeline``): the video VAE compresses 8x in time (first frame
kept) and 32x in space, patch (1, 1, 1); heights and widths must be multiples of 32. The
reference call is 121 frames of 512x768 at 24 fps: 16x16x24 = 6144 video tokens.

Grid discovery, per call: latents arrive packed [B, S, C]. The pipelines pass the latent
``num_frames, height, width`` *and* ``video_coords`` [B, 3, S, 2] (pixel-space [start, end)
of every token), and the model takes its RoPE positions from ``video_coords`` when given
(else from the three sizes, ``ceil(n / patch)`` per axis). So ``video_coords`` decides: the
grid is read from them when the token midpoints form one full frame-major raster, the same in
every batch row; else from the sizes when their grid holds exactly S tokens. Anything else
runs dense with one warning naming why: the condition / IC-LoRA / DFR pipelines append
keyframe or reference tokens to the video sequence (more tokens than the grid, coordinates
that repeat or leave the raster). Reading ``video_coords`` costs one ``unique`` per axis and a
host sync per transformer forward (not per layer).

Self-attention processor: mirrors diffusers 0.42 ``LTX2AudioVideoAttnProcessor`` and
``LTX2PerturbedAttnProcessor`` (``perturbed_attn=True`` models): q/k RMS norm across heads,
RoPE on the whole inner dim before the head split (``rope_type`` "interleaved" or "split"),
the per-head output gate of ``gated_attn`` models, and spatio-temporal guidance (STG) blocks'
``torch.lerp(value, attention, perturbation_mask)``. Calls it does not cover run the original
processor: an explicit ``video_self_attention_mask`` (IC-LoRA; one warning), an all-perturbed
STG block (the model skips attention there), a separate key RoPE or an encoder context.

Defaults: no LTX-2 settings are published for these patterns; they follow LTX-Video's (a grid
of the same size): Radial decay 1.0 without sink (~55 % of the pairs at 16x16x24); Tile (2, 4, 4) tiles in a (5, 3, 3) window
(~23 % of the pairs at 16x16x24); GNA kernel (9, 9, 13), stride 1 (~17 %). The first 25 % of
the steps run dense.

Parallel (``--parallel clip|ulysses``, ``SHARD_PLAN``): the packed video tokens are split by clip
(with their RoPE tables and a per-token timestep); the audio stream is small (126 tokens for the
reference 121 frames) and is replicated on every rank, so audio self-attention, audio-text
cross-attention, the audio FFN and the audio output are computed whole and identically on every
rank. The audio->video cross-attention (video queries, audio keys) is local to each rank; the
video->audio one (audio queries over every video key) runs per rank over its video keys and the
rows are merged exactly by log-sum-exp (``LTX2MergedCrossProcessor``). Ulysses is vidsparse's own:
diffusers 0.42.1's ``_cp_plan`` for this model fails on the pipeline's inputs
(its record's ``diffusers_cp_refusal``). The video VAE decodes per clip
(``CLIP_DECODE``); the audio VAE and vocoder run once, on rank 0 (``MAIN_RANK_DECODE``). A call with
``video_self_attention_mask`` (IC-LoRA) is refused.

Tiny: ``tiny_pipeline`` builds a whole ``LTX2Pipeline`` offline — 2-layer transformer, a
video VAE with LTX-2's real 8x/32x factors, audio VAE, vocoder, text connectors and a 2-layer
Gemma-3 text encoder with a byte-level tokenizer, all random-init — so ``prompt=`` works as
with the real model.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from vidsparse.families.base import (
    TINY_HEAD_DIM,
    TINY_HEADS,
    TINY_LATENT_CHANNELS,
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
)
from vidsparse.families.decode import ClipDecode, DecodeWindow, causal_window, two_sided_window
from vidsparse.families.processor import SparseProcessor

#: The diffusers processors of ``LTX2Attention`` that the sparse processor mirrors.
PROCESSOR_NAMES = ("LTX2AudioVideoAttnProcessor", "LTX2PerturbedAttnProcessor")
#: Video VAE factors of LTX-2 (``AutoencoderKLLTX2Video``: 8x time, 32x space).
VAE_TEMPORAL = 8
VAE_SPATIAL = 32
#: diffusers 0.42 pipelines that run ``LTX2VideoTransformer3DModel`` (``generate`` serves the prefix "LTX2").
PIPELINES = (
    "LTX2Pipeline",
    "LTX2ImageToVideoPipeline",
    "LTX2ConditionPipeline",
    "LTX2InContextPipeline",
    "LTX2HDRPipeline",
    "LTX2DFRPipeline",
    "LTX2DFRTemporalRefinePipeline",
)
LORA_REFUSAL = (
    "LTX-2 denoises audio and video latents jointly in one transformer (audio VAE, Gemma-3 text connectors, "
    "per-modality timesteps and guidance, audio<->video cross-attention), and train-lora's data and objective are "
    "video-only, so a LoRA would learn half the model's task; train LTX-Video instead (LTXPipeline / "
    "LTXImageToVideoPipeline, which train-lora trains), or LTX-2 with Lightricks' own LTX-2 trainer"
)
GEOMETRY = VideoGeometry("ltx2", VAE_TEMPORAL, VAE_SPATIAL, (1, 1, 1), (121, 512, 768), fps=24, min_latent_side=2)

# -- self-attention processor -----------------------------------------------------------------


def _rope(attn, x: torch.Tensor, freqs: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """RoPE as ``LTX2AudioVideoAttnProcessor`` applies it (on [B, S, H * D], before the head split)."""
    from diffusers.models.transformers.transformer_ltx2 import (
        apply_interleaved_rotary_emb,
        apply_split_rotary_emb,
    )

    if attn.rope_type == "interleaved":
        return apply_interleaved_rotary_emb(x, freqs)
    if attn.rope_type == "split":
        return apply_split_rotary_emb(x, freqs)
    return x  # the model's processor applies no RoPE for any other rope_type either


class LTX2SparseProcessor(SparseProcessor):
    """Video self-attention (``attn1``) of LTX-2 with a sparse attention core.

    Mirrors ``LTX2AudioVideoAttnProcessor`` and, for ``perturbed_attn`` models,
    ``LTX2PerturbedAttnProcessor`` (its extra ``perturbation_mask`` / ``all_perturbed``
    arguments are accepted and passed on only to that original).
    """

    def __init__(self, original: Any, layer: int, state) -> None:
        super().__init__(original, layer, state)
        self._perturbed = type(original).__name__ == "LTX2PerturbedAttnProcessor"

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        query_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
        key_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
        perturbation_mask: torch.Tensor | None = None,
        all_perturbed: bool | torch.Tensor | None = None,
    ) -> torch.Tensor:
        args = (attn, hidden_states, encoder_hidden_states, attention_mask, query_rotary_emb, key_rotary_emb)
        extra = dict(perturbation_mask=perturbation_mask, all_perturbed=all_perturbed) if self._perturbed else {}
        pattern = self.state.pattern_for(self.layer)
        if pattern is None or encoder_hidden_states is not None or key_rotary_emb is not None:
            return self._dense(*args, **extra)
        if attention_mask is not None:
            self.state.warn_once(
                "ltx2-self-mask",
                "vidsparse: this LTX-2 call passes a video self-attention mask (video_self_attention_mask, e.g. "
                "IC-LoRA reference conditioning); its video self-attention runs dense.",
            )
            return self._dense(*args, **extra)
        if not self._perturbed:
            perturbation_mask = None
        elif perturbation_mask is not None:
            if all_perturbed is None:
                all_perturbed = torch.all(perturbation_mask == 0)
            if all_perturbed:  # the model skips attention in this STG block: nothing to make sparse
                return self._dense(*args, **extra)

        gate_logits = attn.to_gate_logits(hidden_states) if attn.to_gate_logits is not None else None
        query = attn.norm_q(attn.to_q(hidden_states))
        key = attn.norm_k(attn.to_k(hidden_states))
        value = attn.to_v(hidden_states)
        if query_rotary_emb is not None:
            query = _rope(attn, query, query_rotary_emb)
            key = _rope(attn, key, query_rotary_emb)
        query = query.unflatten(2, (attn.heads, -1))
        key = key.unflatten(2, (attn.heads, -1))
        value = value.unflatten(2, (attn.heads, -1))

        layout = self._layout(query.shape[1], 0, "none")
        out = self.state.attend(query, key, value, layout, pattern, self.layer, None)
        out = out.flatten(2, 3).to(query.dtype)
        if perturbation_mask is not None:
            out = torch.lerp(value.flatten(2, 3), out, perturbation_mask)
        if gate_logits is not None:
            gates = 2.0 * torch.sigmoid(gate_logits)  # [B, S, H]; 2x: zero logits give gates of 1
            out = (out.unflatten(2, (attn.heads, -1)) * gates.unsqueeze(-1)).flatten(2, 3)
        out = attn.to_out[0](out)
        return attn.to_out[1](out)


# -- grid -------------------------------------------------------------------------------------


class GridUnknown(str):
    """Why a call's video tokens are not one 3-D grid (returned instead of a grid)."""


def _raster_grid(positions: torch.Tensor) -> Grid | None:
    """The (F, H, W) of token positions [3, S] if they are one full frame-major raster, else None."""
    axes = [torch.unique(p, sorted=True) for p in positions]
    grid = tuple(int(a.numel()) for a in axes)
    seq = positions.shape[1]
    if math.prod(grid) != seq:
        return None
    idx = [torch.searchsorted(a, p) for a, p in zip(axes, positions)]
    flat = (idx[0] * grid[1] + idx[1]) * grid[2] + idx[2]
    if not torch.equal(flat, torch.arange(seq, device=flat.device)):
        return None
    return grid  # type: ignore[return-value]


def coords_grid(coords: torch.Tensor, seq: int) -> Grid | GridUnknown:
    """Grid of ``video_coords`` [B, 3, S, 2] ([start, end) per axis) or [B, 3, S] (positions).

    The positions are the midpoints, as ``LTX2AudioVideoRotaryPosEmbed`` uses them; every batch
    row must hold the same raster (one layout serves the whole batch).
    """
    if not isinstance(coords, torch.Tensor) or coords.ndim not in (3, 4) or coords.shape[1] != 3:
        shape = tuple(coords.shape) if isinstance(coords, torch.Tensor) else type(coords).__name__
        return GridUnknown(f"video_coords has shape {shape}, not [B, 3, S, 2] or [B, 3, S]")
    if coords.shape[2] != seq:
        return GridUnknown(f"video_coords describe {coords.shape[2]} tokens but hidden_states holds {seq}")
    positions = (coords.float().mean(dim=-1) if coords.ndim == 4 else coords.float()).contiguous()
    if positions.shape[0] > 1 and not torch.equal(positions, positions[:1].expand_as(positions)):
        return GridUnknown("the batch rows of video_coords differ (one token layout must serve the whole batch)")
    grid = _raster_grid(positions[0])
    if grid is None:
        return GridUnknown(
            f"the {seq} video_coords are not one full frame-major F x H x W raster (e.g. keyframe, reference or "
            "conditioning tokens appended by the condition / IC-LoRA / DFR pipelines)"
        )
    return grid


def _grid(model: torch.nn.Module, kwargs: dict[str, Any]) -> Grid | GridUnknown:
    """The call's video token grid (see the module docstring), or why there is none."""
    hidden_states = kwargs.get("hidden_states")
    if not isinstance(hidden_states, torch.Tensor) or hidden_states.ndim != 3:
        return GridUnknown("hidden_states is not packed video tokens [B, S, C]")
    seq = int(hidden_states.shape[1])
    coords = kwargs.get("video_coords")
    if coords is not None:
        return coords_grid(coords, seq)
    sizes = [kwargs.get(k) for k in ("num_frames", "height", "width")]
    if any(s is None for s in sizes):
        return GridUnknown("the call passes neither video_coords nor num_frames/height/width")
    p, pt = int(model.config.patch_size), int(model.config.patch_size_t)
    f, h, w = (int(s) for s in sizes)
    grid = (-(-f // pt), -(-h // p), -(-w // p))  # the model's coordinates: arange(0, n, patch)
    if math.prod(grid) != seq:
        return GridUnknown(
            f"num_frames/height/width give a {grid[0]}x{grid[1]}x{grid[2]} grid of {math.prod(grid)} tokens but "
            f"hidden_states holds {seq} (appended conditioning or reference tokens?)"
        )
    return grid


# -- parallel ---------------------------------------------------------------------------------

#: A RoPE table of the video tokens: [B, S, D] ("interleaved") or [B, H, S, D / 2] ("split").
_ROPE = (Shard(1, 3), Shard(2, 4))


class LTX2MergedCrossProcessor:
    """``video_to_audio_attn`` (queries: audio, keys / values: video) under ``vidsparse.parallel``.

    Every rank holds the whole audio stream and its clip's video tokens. The audio queries attend
    the rank's video keys; ``attend`` merges the rows of all ranks exactly (log-sum-exp,
    ``vidsparse.parallel.partials.merged_rows_attention``), so every rank gets the same audio rows.
    Mirrors ``LTX2AudioVideoAttnProcessor`` / ``LTX2PerturbedAttnProcessor`` for this call: q/k RMS
    norm across heads, RoPE on the whole inner dim (audio positions for q, video for k), the per-head
    output gate of ``gated_attn`` models. The block passes no mask and no STG perturbation here.
    """

    def __init__(self, original: Any, attend) -> None:
        self.original, self.attend = original, attend

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        query_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
        key_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
        perturbation_mask: torch.Tensor | None = None,
        all_perturbed: bool | torch.Tensor | None = None,
    ) -> torch.Tensor:
        if encoder_hidden_states is None or attention_mask is not None or perturbation_mask is not None:
            raise ValueError(
                "vidsparse.parallel: LTX-2's video->audio cross-attention was called with "
                f"{'no video keys' if encoder_hidden_states is None else 'a mask or an STG perturbation'}, which "
                "the split run does not cover (diffusers 0.42's block passes neither). Run it on one GPU."
            )
        gate_logits = attn.to_gate_logits(hidden_states) if attn.to_gate_logits is not None else None
        query = attn.norm_q(attn.to_q(hidden_states))
        key = attn.norm_k(attn.to_k(encoder_hidden_states))
        value = attn.to_v(encoder_hidden_states)
        if query_rotary_emb is not None:
            query = _rope(attn, query, query_rotary_emb)
            key = _rope(attn, key, key_rotary_emb if key_rotary_emb is not None else query_rotary_emb)
        query = query.unflatten(2, (attn.heads, -1))
        key = key.unflatten(2, (attn.heads, -1))
        value = value.unflatten(2, (attn.heads, -1))
        out = self.attend(query, key, value).flatten(2, 3).to(query.dtype)
        if gate_logits is not None:
            gates = 2.0 * torch.sigmoid(gate_logits)
            out = (out.unflatten(2, (attn.heads, -1)) * gates.unsqueeze(-1)).flatten(2, 3)
        out = attn.to_out[0](out)
        return attn.to_out[1](out)


def _merged_attention(transformer: torch.nn.Module, attend) -> list[tuple[torch.nn.Module, Any]]:
    return [
        (block.video_to_audio_attn, LTX2MergedCrossProcessor(block.video_to_audio_attn.processor, attend))
        for block in transformer.transformer_blocks
    ]


def merged_calls(transformer: torch.nn.Module, kwargs: dict[str, Any]) -> list[tuple[int, int, int]]:
    """(audio tokens, heads, head dim) of each block's video->audio cross-attention in this forward
    (none with ``isolate_modalities``, which turns the audio<->video cross-attention off)."""
    audio = kwargs.get("audio_hidden_states")
    if kwargs.get("isolate_modalities") or not isinstance(audio, torch.Tensor):
        return []
    attn = transformer.transformer_blocks[0].video_to_audio_attn
    return [(int(audio.shape[1]), attn.heads, attn.to_q.out_features // attn.heads)] * len(
        transformer.transformer_blocks
    )


def _refuse_call(transformer: torch.nn.Module, kwargs: dict[str, Any]) -> str | None:
    if kwargs.get("video_self_attention_mask") is not None:
        return (
            "it passes video_self_attention_mask (IC-LoRA reference conditioning), a [B, S, S] mask over the "
            "whole video that the clip split does not cut"
        )
    return None


#: Packed video tokens cut where the blocks start (after ``proj_in`` and the keyframe embedding,
#: both per token); the video RoPE tables of self-attention (``rope``) and of the audio<->video
#: cross-attention (``cross_attn_rope``) cut with them; a per-token timestep [B, S] (image-to-video)
#: cut at the input (a [B] timestep passes). The audio stream (tokens, RoPE, timestep) is small and
#: stays whole and identical on every rank: audio self-attention, audio-text cross-attention,
#: audio FFN and ``audio_proj_out`` are replicated; the audio->video cross-attention (video queries,
#: audio keys) is local; the video->audio one (audio queries over every video key) is merged across
#: ranks (``merged_attention``). Output: ``proj_out`` gathered (the audio output is already whole).
SHARD_PLAN = ShardPlan(
    inputs={"": {"timestep": Shard(1, 2)}, "transformer_blocks.0": {"hidden_states": Shard(1, 3)}},
    outputs={"rope": {0: _ROPE, 1: _ROPE}, "cross_attn_rope": {0: _ROPE, 1: _ROPE}},
    gather={"proj_out": Shard(1, 3)},
    refuse_call=_refuse_call,
    merged_attention=_merged_attention,
    merged_calls=merged_calls,
)


def _vae_temporal_factor(vae) -> int:
    return int(vae.temporal_compression_ratio)  # 8


def _clip_window(vae, frames: int, start: int, end: int, overlap: int | None) -> DecodeWindow:
    if vae.use_framewise_decoding:  # temporal tiles blended across the whole video: decode it whole
        return DecodeWindow(0, frames, 0)
    k = _vae_temporal_factor(vae)
    if vae.decoder.is_causal:
        return causal_window(vae, frames, start, end, overlap, k=k)
    return two_sided_window(vae, frames, start, end, overlap, k=k)


#: ``AutoencoderKLLTX2Video``'s decoder is LTX-Video's layout (depth-to-space upsamplers dropping the
#: first frame, so latent frame t > 0 starts at pixel 1 + 8 (t - 1)) with time convolutions that pad
#: by repeating edge frames: on both sides (``decoder_causal=False``, the checkpoints' setting) or
#: before only (causal). A pixel frame depends on a bounded window of latent frames; the window
#: decodes that many around the clip. Its timestep conditioning is per sample.
CLIP_DECODE = ClipDecode(
    vae_classes=("AutoencoderKLLTX2Video",),
    temporal_factor=_vae_temporal_factor,
    window=_clip_window,
    exact="with the whole video as context (overlap all), and with any overlap covering the decoder's "
    "receptive field: equal within float tolerance (the convolutions run on a shorter tensor)",
)

#: The audio decode runs after the video decode in every LTX-2 pipeline: once, on rank 0.
MAIN_RANK_DECODE = ("audio_vae.decode", "vocoder.forward")


# -- tiny models ------------------------------------------------------------------------------

TINY_AUDIO_CHANNELS = 4  # audio VAE latent channels (2) x latent mel bins (8 / 4)


def _tiny_config() -> dict[str, Any]:
    """LTX-2.0-style: interleaved RoPE, plain processor, no gates."""
    return dict(
        in_channels=TINY_LATENT_CHANNELS,
        out_channels=TINY_LATENT_CHANNELS,
        patch_size=1,
        patch_size_t=1,
        num_attention_heads=TINY_HEADS,
        attention_head_dim=TINY_HEAD_DIM,
        cross_attention_dim=TINY_HEADS * TINY_HEAD_DIM,
        vae_scale_factors=(VAE_TEMPORAL, VAE_SPATIAL, VAE_SPATIAL),
        audio_in_channels=TINY_AUDIO_CHANNELS,
        audio_out_channels=TINY_AUDIO_CHANNELS,
        audio_num_attention_heads=TINY_HEADS,
        audio_attention_head_dim=4,
        audio_cross_attention_dim=8,
        num_layers=2,
        caption_channels=TINY_TEXT_DIM,
    )


def _tiny_gated_config() -> dict[str, Any]:
    """LTX-2.3-style: split RoPE, gated attention, prompt modulation, the perturbed (STG) processor."""
    return dict(
        _tiny_config(),
        rope_type="split",
        gated_attn=True,
        audio_gated_attn=True,
        cross_attn_mod=True,
        audio_cross_attn_mod=True,
        perturbed_attn=True,
    )


def _tiny_inputs(r: TinyRequest) -> dict[str, Any]:
    cfg = r.transformer.config
    audio_frames = 5
    return dict(
        hidden_states=r.randn(r.batch, r.frames * r.height * r.width, cfg.in_channels),
        audio_hidden_states=r.randn(r.batch, audio_frames, cfg.audio_in_channels),
        encoder_hidden_states=r.randn(r.batch, r.text_len, r.text_dim),
        audio_encoder_hidden_states=r.randn(r.batch, r.text_len, r.text_dim),
        timestep=r.timestep,
        sigma=r.timestep / 1000.0,
        encoder_attention_mask=r.text_mask.long(),
        audio_encoder_attention_mask=r.text_mask.long(),
        num_frames=r.frames,
        height=r.height,
        width=r.width,
        audio_num_frames=audio_frames,
    )


class _ByteTokenizerSpec:
    """Specials of the tiny byte-level tokenizer (ids 0..3; the 256 byte symbols follow)."""

    pad, eos, bos, unk = "<pad>", "<eos>", "<bos>", "<unk>"
    specials = (pad, eos, bos, unk)


def tiny_tokenizer(model_max_length: int = 1024):
    """A byte-level BPE tokenizer without merges, built in memory: any text, 260 ids, offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    spec = _ByteTokenizerSpec
    vocab = {t: i for i, t in enumerate((*spec.specials, *sorted(pre_tokenizers.ByteLevel.alphabet())))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=spec.unk))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=spec.pad,
        eos_token=spec.eos,
        bos_token=spec.bos,
        unk_token=spec.unk,
        model_max_length=model_max_length,
        padding_side="left",  # Gemma's, as LTX2Pipeline sets it
    )


TINY_GEMMA_LAYERS = 2


def tiny_text_encoder(vocab_size: int):
    """A 2-layer Gemma-3 (``Gemma3ForConditionalGeneration``, hidden 16) with a 1-layer SigLIP tower."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3TextConfig, SiglipVisionConfig

    text = Gemma3TextConfig(
        vocab_size=vocab_size,
        hidden_size=TINY_TEXT_DIM,
        intermediate_size=2 * TINY_TEXT_DIM,
        num_hidden_layers=TINY_GEMMA_LAYERS,
        num_attention_heads=TINY_HEADS,
        num_key_value_heads=1,
        head_dim=TINY_HEAD_DIM,
        max_position_embeddings=2048,
        sliding_window=64,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
    )
    vision = SiglipVisionConfig(
        hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2, image_size=14, patch_size=7
    )
    config = Gemma3Config(text_config=text.to_dict(), vision_config=vision.to_dict(), mm_tokens_per_image=4)
    return Gemma3ForConditionalGeneration(config).eval()


def tiny_video_vae():
    """A tiny ``AutoencoderKLLTX2Video`` with LTX-2's factors: 4x4 pixel patches and three 2x
    space-time stages = 32x in space, 8x in time (first frame kept); 8 channels everywhere."""
    from diffusers import AutoencoderKLLTX2Video

    stages = 3
    vae = AutoencoderKLLTX2Video(
        in_channels=3,
        out_channels=3,
        latent_channels=TINY_LATENT_CHANNELS,
        block_out_channels=(8,) * stages,
        down_block_types=("LTX2VideoDownBlock3D",) * stages,
        decoder_block_out_channels=(8,) * stages,
        layers_per_block=(1,) * (stages + 1),
        decoder_layers_per_block=(1,) * (stages + 1),
        spatio_temporal_scaling=(True,) * stages,
        decoder_spatio_temporal_scaling=(True,) * stages,
        decoder_inject_noise=(False,) * (stages + 1),
        downsample_type=("spatiotemporal",) * stages,
        upsample_type=("spatiotemporal",) * stages,
        upsample_residual=(False,) * stages,
        upsample_factor=(1,) * stages,
        timestep_conditioning=False,
        patch_size=4,
        patch_size_t=1,
        decoder_causal=False,
    )
    if (vae.temporal_compression_ratio, vae.spatial_compression_ratio) != (VAE_TEMPORAL, VAE_SPATIAL):
        raise RuntimeError(
            f"the tiny LTX-2 VAE compresses {vae.temporal_compression_ratio}x / {vae.spatial_compression_ratio}x, "
            f"not LTX-2's {VAE_TEMPORAL}x / {VAE_SPATIAL}x: diffusers changed AutoencoderKLLTX2Video's factors."
        )
    return vae


tiny_vae = tiny_video_vae  # the name every family's tiny VAE goes by (per-clip decode tests, benchmarks)


def tiny_audio_components():
    """(audio VAE, vocoder): ``AutoencoderKLLTX2Audio`` (8 mel bins -> 2 x 2 latents) and ``LTX2Vocoder``."""
    from diffusers import AutoencoderKLLTX2Audio
    from diffusers.pipelines.ltx2.vocoder import LTX2Vocoder

    audio_vae = AutoencoderKLLTX2Audio(
        base_channels=4,
        output_channels=2,
        ch_mult=(1,),
        num_res_blocks=1,
        attn_resolutions=None,
        in_channels=2,
        resolution=32,
        latent_channels=2,
        norm_type="pixel",
        causality_axis="height",
        dropout=0.0,
        mid_block_add_attention=False,
        sample_rate=16000,
        mel_hop_length=160,
        is_causal=True,
        mel_bins=8,
    )
    vocoder = LTX2Vocoder(
        in_channels=audio_vae.config.output_channels * audio_vae.config.mel_bins,
        hidden_channels=32,
        out_channels=2,
        upsample_kernel_sizes=[4, 4],
        upsample_factors=[2, 2],
        resnet_kernel_sizes=[3],
        resnet_dilations=[[1, 3, 5]],
        leaky_relu_negative_slope=0.1,
        output_sampling_rate=16000,
    )
    return audio_vae, vocoder


def tiny_connectors():
    """``LTX2TextConnectors`` from the tiny Gemma's stacked hidden states (16 x 3) to 16-dim prompts."""
    from diffusers.pipelines.ltx2 import LTX2TextConnectors

    return LTX2TextConnectors(
        caption_channels=TINY_TEXT_DIM,
        text_proj_in_factor=TINY_GEMMA_LAYERS + 1,
        video_connector_num_attention_heads=TINY_HEADS,
        video_connector_attention_head_dim=TINY_HEAD_DIM,
        video_connector_num_layers=1,
        video_connector_num_learnable_registers=None,
        audio_connector_num_attention_heads=TINY_HEADS,
        audio_connector_attention_head_dim=TINY_HEAD_DIM,
        audio_connector_num_layers=1,
        audio_connector_num_learnable_registers=None,
        connector_rope_base_seq_len=32,
    )


def tiny_pipeline(seed: int = 0, dtype: torch.dtype = torch.float32, *, variant: str = "ltx2"):
    """A tiny random-init ``diffusers.LTX2Pipeline`` (text encoder and tokenizer included, offline).

    ``variant`` picks the transformer config ("ltx2" or "ltx2-gated", see ``FAMILY.tiny``).
    Heights and widths are multiples of 32 and frames 8k + 1, as for LTX-2 itself.
    """
    import diffusers
    from diffusers import FlowMatchEulerDiscreteScheduler, LTX2Pipeline

    if variant not in FAMILY.tiny:
        raise ValueError(f"Unknown tiny LTX-2 variant {variant!r}. Expected one of: {', '.join(FAMILY.tiny)}.")
    with torch.random.fork_rng(devices=[]):  # seeded build; the caller's RNG stream is untouched
        torch.manual_seed(seed)
        transformer = diffusers.LTX2VideoTransformer3DModel(**FAMILY.tiny[variant].config())
        vae = tiny_video_vae()
        audio_vae, vocoder = tiny_audio_components()
        connectors = tiny_connectors()
        tokenizer = tiny_tokenizer()
        text_encoder = tiny_text_encoder(len(tokenizer))
    # LTX-2's resolution-dependent shift (the pipeline passes mu from the token count).
    scheduler = FlowMatchEulerDiscreteScheduler(
        use_dynamic_shifting=True,
        base_shift=0.95,
        max_shift=2.05,
        base_image_seq_len=1024,
        max_image_seq_len=4096,
        shift_terminal=0.1,
    )
    pipe = LTX2Pipeline(
        scheduler=scheduler,
        vae=vae,
        audio_vae=audio_vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        connectors=connectors,
        transformer=transformer,
        vocoder=vocoder,
    )
    return finish_tiny_pipeline(pipe, dtype)


FAMILY = Family(
    name="ltx2",
    aliases=("ltxv2",),
    transformer_classes=("LTX2VideoTransformer3DModel",),
    pipeline_prefixes=("LTX2",),
    processor_names=PROCESSOR_NAMES,
    processor=LTX2SparseProcessor,
    attention_paths=indexed_paths("transformer_blocks", "attn1"),
    grid=_grid,
    text_len=no_text,
    text_position="none",
    geometries=(GEOMETRY,),
    pattern_defaults={
        "radial": dict(decay_factor=1.0, sink=False),
        "tile": dict(tile=(2, 4, 4), window=(5, 3, 3)),
        "gna": dict(kernel_size=(9, 9, 13), stride=1),
    },
    lora_refusal=LORA_REFUSAL,
    lora_refusals=dict.fromkeys(PIPELINES, LORA_REFUSAL),
    shard_plan=SHARD_PLAN,
    diffusers_cp_refusal=(
        "diffusers 0.42.1's LTX-2 _cp_plan cuts the prompt's attention mask with the text, and its Ulysses "
        "cross-attention then fails on the mask's shape (LTX2Pipeline always passes the mask; even without "
        "vidsparse: 'output with shape [2, 1, 96, 8] doesn't match the broadcast shape [2, 2, 96, 8]'); it also "
        "cuts split-RoPE tables [B, H, S, D/2] (LTX-2.3) along the heads and leaves the video RoPE of the "
        "audio<->video cross-attention (cross_attn_rope) whole"
    ),
    clip_decode=CLIP_DECODE,
    main_rank_decode=MAIN_RANK_DECODE,
    tiny={
        "ltx2": TinyVariant("ltx2", _tiny_config, _tiny_inputs),
        "ltx2-gated": TinyVariant("ltx2-gated", _tiny_gated_config, _tiny_inputs),
    },
    tiny_pipeline=tiny_pipeline,
)
