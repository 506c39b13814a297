"""Test oracles: dense masked attention from a token mask (independent of plans and kernels)."""

from __future__ import annotations

import torch

from vidsparse import VideoLayout


def full_mask(mask: torch.Tensor, layout: VideoLayout, batch: int, text_mask: torch.Tensor | None) -> torch.Tensor:
    """[B, H|1, S, S] boolean mask with text padding applied to keys."""
    m = mask if mask.dim() == 4 else mask.unsqueeze(0)
    m = m.expand(batch, *m.shape[1:]).clone()
    if text_mask is not None:
        kv = torch.ones(batch, layout.seq_len, dtype=torch.bool)
        kv[:, layout.text_offset : layout.text_offset + layout.text_len] = text_mask
        m &= kv[:, None, None, :]
    return m


def masked_attention(q, k, v, mask: torch.Tensor, layout: VideoLayout, text_mask=None) -> torch.Tensor:
    """Exact attention [B, S, H, D] in float64 under a bool mask [H|1, S, S] or [B, H|1, S, S]."""
    m = full_mask(mask, layout, q.shape[0], text_mask)
    qd, kd, vd = (t.double().transpose(1, 2) for t in (q, k, v))
    s = qd @ kd.transpose(-1, -2) * q.shape[-1] ** -0.5
    s = s.masked_fill(~m, float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)
    return (p @ vd).transpose(1, 2)


def random_qkv(layout: VideoLayout, batch=1, heads=2, dim=16, dtype=torch.float32, requires_grad=False):
    out = [torch.randn(batch, layout.seq_len, heads, dim, dtype=dtype) for _ in range(3)]
    if requires_grad:
        for t in out:
            t.requires_grad_(True)
    return out


def random_text_mask(layout: VideoLayout, batch: int) -> torch.Tensor | None:
    if not layout.text_len:
        return None
    tm = torch.ones(batch, layout.text_len, dtype=torch.bool)
    for b in range(1, batch):
        tm[b, layout.text_len - min(layout.text_len - 1, 2 * b) :] = False
    return tm


def natural_mask(pattern, layout: VideoLayout, q, k, layer: int, block_size: int = 16) -> torch.Tensor:
    """The pattern's token mask for these q, k as bool [B or 1, H, S, S] (a dynamic pattern's
    is per sample already; a static one gets a batch axis of 1)."""
    import vidsparse as vs

    m = vs.token_mask(pattern, layout, q=q, k=k, layer=layer, block_size=block_size)
    return m if m.dim() == 4 else m.unsqueeze(0)
