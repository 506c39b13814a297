"""Ulysses sequence parallelism: exact for every pattern, static or dynamic.

Each rank holds the tokens of its clip for all heads. One all-to-all turns that into all
tokens for ``H / N`` heads, the rank runs ordinary ``vidsparse.attention`` on the whole
video for those heads (so any pattern, including VMoBA, plans exactly as on one device),
and a second all-to-all brings the rows back. Head counts that do not divide by N are
padded with empty heads (their cost is spent, their output dropped). The text span of
joint-attention models is replicated on every rank: its heads are sliced locally and its
output rows all-gathered, so text never goes through the all-to-all.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vidsparse.attention import attention
from vidsparse.layout import VideoLayout
from vidsparse.parallel.comm import all_gather_uneven, heads_to_seq, seq_to_heads
from vidsparse.parallel.partition import FramePartition
from vidsparse.parallel.runtime import ParallelRuntime
from vidsparse.patterns import Dense
from vidsparse.patterns.base import Pattern


def _dense(q, k, v, layout: VideoLayout, text_mask, scale) -> torch.Tensor:
    """Dense steps and layers: the fused SDPA kernels (flash / cuDNN on GPU), text padding as a key mask."""
    mask = None
    if text_mask is not None:
        valid = torch.ones(q.shape[0], layout.seq_len, dtype=torch.bool, device=q.device)
        valid[:, layout.text_offset : layout.text_offset + layout.text_len] = text_mask.to(torch.bool)
        mask = valid[:, None, None, :]
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, scale=scale
    )
    return out.transpose(1, 2)


def heads_per_rank(num_heads: int, world_size: int) -> int:
    """Heads each rank attends after padding ``num_heads`` up to a multiple of ``world_size``."""
    return -(-num_heads // world_size)


def ulysses_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: VideoLayout,
    pattern: Pattern,
    runtime: ParallelRuntime,
    *,
    backend: str = "auto",
    layer: int = 0,
    text_mask: torch.Tensor | None = None,
    scale: float | None = None,
    block_size: int | None = None,
) -> torch.Tensor:
    """This rank's rows of ``vidsparse.attention(q, k, v, layout, pattern)`` on the whole video.

    q, k, v are [B, S_r, H, D]: the rank's clip (``FramePartition`` of ``layout.frames``)
    with the text span where the layout puts it.
    """
    n, rank = runtime.world_size, runtime.rank
    partition = FramePartition(layout.frames, n)
    local = partition.check_local_qkv("ulysses_attention", layout, rank, q, k, v)
    B, _, H, D = q.shape
    h = heads_per_rank(H, n)
    hp = h * n
    vo, nv = local.video_offset, local.video_len
    seq_sizes = partition.video_token_counts(layout)

    qkv = torch.stack([q, k, v])  # [3, B, S_r, H, D]
    if hp != H:
        qkv = torch.cat([qkv, qkv.new_zeros(3, B, qkv.shape[2], hp - H, D)], dim=3)
    full_video = seq_to_heads(qkv[:, :, vo : vo + nv], seq_sizes, runtime, op="ulysses_qkv")  # [3, B, Sv, h, D]
    head_lo = rank * h
    real = max(0, min(H, head_lo + h) - head_lo)  # real (unpadded) heads on this rank
    if layout.text_len:
        to = local.text_offset
        text = qkv[:, :, to : to + layout.text_len, head_lo : head_lo + h]
        parts = [text, full_video] if layout.text_position == "before" else [full_video, text]
        full = torch.cat(parts, dim=2)
    else:
        full = full_video
    out = full.new_zeros(full.shape[1:])  # [B, S, h, D]
    if real:
        sel = full[:, :, :, :real]
        if isinstance(pattern, Dense):
            out[:, :, :real] = _dense(sel[0], sel[1], sel[2], layout, text_mask, scale)
        else:
            out[:, :, :real] = attention(
                sel[0],
                sel[1],
                sel[2],
                layout,
                pattern,
                backend=backend,
                layer=layer,
                text_mask=text_mask,
                scale=scale,
                block_size=block_size,
            )
    gvo = layout.video_offset
    out_video = heads_to_seq(out[:, gvo : gvo + layout.video_len], seq_sizes, runtime, op="ulysses_out")[:, :, :H]
    if not layout.text_len:
        return out_video
    gto = layout.text_offset
    text_out = out[:, gto : gto + layout.text_len].contiguous()  # [B, T, h, D]
    heads = all_gather_uneven(text_out, [h] * n, runtime, dim=2, op="ulysses_text")
    text_all = torch.cat(heads, dim=2)[:, :, :H]
    pieces = [text_all, out_video] if layout.text_position == "before" else [out_video, text_all]
    return torch.cat(pieces, dim=1)
