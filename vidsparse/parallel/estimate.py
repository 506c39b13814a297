"""Bytes each rank sends, from shapes alone: scaling estimates without several GPUs.

The numbers follow the same exchange plans and the same counting as ``CommStats`` (payload
a rank sends to other ranks, point to point), and the multi-process tests check that one
attention call measures exactly what ``attention_bytes`` predicts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from vidsparse.layout import VideoLayout
from vidsparse.parallel.clip import exchange_plan
from vidsparse.parallel.partition import FramePartition
from vidsparse.parallel.ulysses import heads_per_rank
from vidsparse.patterns.base import Pattern


def attention_bytes(
    mode: str,
    layout: VideoLayout,
    pattern: Pattern,
    heads: int,
    head_dim: int,
    world_size: int,
    element_size: int = 2,
    batch: int = 1,
    layer: int = 0,
) -> list[dict[str, int]]:
    """Per rank, {operation: bytes sent} of one self-attention call (``CommStats`` names).

    ``element_size`` is that of q/k/v (2 for bf16); clip mode's text merge sends float32
    partials (float64 for float64 inputs).
    """
    part = FramePartition(layout.frames, world_size)
    hw = layout.tokens_per_frame
    token = batch * heads * head_dim * element_size  # one token of one tensor, all heads
    out: list[dict[str, int]] = []
    if mode == "clip":
        for r in range(world_size):
            ex = exchange_plan(pattern, layout, part, r, layer)
            sent = {"clip_halo": sum(len(f) for _, f in ex.send) * hw * 2 * token}
            if any(ex.gathered):
                sent["clip_global"] = len(ex.gathered[r]) * hw * 2 * token * (world_size - 1)
            if layout.text_len:
                sent["clip_text"] = merged_rows_bytes(layout.text_len, heads, head_dim, world_size, element_size, batch)
            out.append(sent)
        return out
    if mode == "ulysses":
        h = heads_per_rank(heads, world_size)
        hp = h * world_size
        sizes = part.video_token_counts(layout)
        total = sum(sizes)
        for r in range(world_size):
            per_head = batch * head_dim * element_size
            sent = {
                "ulysses_qkv": 3 * sizes[r] * hp * per_head * (world_size - 1) // world_size,
                "ulysses_out": (total - sizes[r]) * h * per_head,
            }
            if layout.text_len:
                sent["ulysses_text"] = layout.text_len * h * per_head * (world_size - 1)
            out.append(sent)
        return out
    raise ValueError(f"mode must be 'clip' or 'ulysses', got {mode!r}.")


def merged_rows_bytes(
    rows: int, heads: int, head_dim: int, world_size: int, element_size: int = 2, batch: int = 1
) -> int:
    """Bytes one rank sends in ``partials.merged_rows_attention``: its (out, lse) partials of
    ``rows`` replicated query rows (float32; float64 for float64 inputs) to every other rank.

    Clip mode's joint-text rows; LTX-2's audio rows of the video->audio cross-attention (both modes).
    """
    lse_size = 8 if element_size == 8 else 4
    return batch * rows * heads * (head_dim + 1) * lse_size * (world_size - 1)


@dataclass(frozen=True)
class StepVolume:
    """Bytes one rank sends per denoising step (the busiest rank)."""

    attention: int  # all self-attention calls of the step
    output_gather: int  # all-gather of the transformer output, per forward
    forwards: int  # transformer forwards per step (2 with classifier-free guidance)

    @property
    def total(self) -> int:
        return self.attention + self.output_gather


def step_bytes(
    mode: str,
    layout: VideoLayout,
    pattern: Pattern,
    heads: int,
    head_dim: int,
    layers: int,
    world_size: int,
    out_features: int,
    element_size: int = 2,
    forwards: int = 2,
    batch: int = 1,
    merged: Sequence[tuple[int, int, int]] = (),
) -> StepVolume:
    """Busiest rank's bytes per step: ``layers`` attention calls and one output gather per forward.

    ``out_features`` is the width of the transformer's output projection per token (Wan:
    out_channels * prod(patch_size) = 16 * 4 = 64). ``merged``: (rows, heads, head_dim) of every
    ``ShardPlan.merged_attention`` call of one forward (LTX-2: its audio rows, one call per block),
    counted with the attention.
    """
    per_rank = attention_bytes(mode, layout, pattern, heads, head_dim, world_size, element_size, batch)
    extra = sum(merged_rows_bytes(t, h, d, world_size, element_size, batch) for t, h, d in merged)
    attn = max(sum(d.values()) for d in per_rank) * layers + extra
    sizes = FramePartition(layout.frames, world_size).video_token_counts(layout)
    gather = max(sizes) * out_features * element_size * batch * (world_size - 1)
    return StepVolume(attn * forwards, gather * forwards, forwards)


def forward_bytes(
    mode: str,
    layout: VideoLayout,
    pattern: Pattern,
    heads: int,
    head_dim: int,
    layers: int,
    world_size: int,
    out_features: int,
    element_size: int = 2,
    batch: int = 1,
    merged: Sequence[tuple[int, int, int]] = (),
) -> list[int]:
    """Per rank, bytes sent by one parallel transformer forward: ``layers`` self-attention calls
    under ``pattern`` and the all-gather of the output projection (``out_features`` per token).

    ``layout`` is the whole video with the family's joint text (``text_len``, ``text_position``);
    ``merged``: (rows, heads, head_dim) of every ``ShardPlan.merged_attention`` call of the forward
    (LTX-2: one video->audio cross-attention per block over its audio tokens,
    ``ShardPlan.merged_calls``). Every family's shard plan moves exactly this (the tests measure it).
    """
    per_rank = attention_bytes(mode, layout, pattern, heads, head_dim, world_size, element_size, batch)
    sizes = FramePartition(layout.frames, world_size).video_token_counts(layout)
    extra = sum(merged_rows_bytes(t, h, d, world_size, element_size, batch) for t, h, d in merged)
    return [
        sum(d.values()) * layers + sizes[r] * out_features * element_size * batch * (world_size - 1) + extra
        for r, d in enumerate(per_rank)
    ]
