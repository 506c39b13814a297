"""Attention over part of the keys, with its log-sum-exp, and the exact merge of such parts.

Softmax attention over a key set K = K1 u K2 (disjoint) equals the LSE-weighted mix of the
attentions over K1 and K2: ``out = (e^{l1} o1 + e^{l2} o2) / (e^{l1} + e^{l2})``. Clip
parallelism computes the own-clip part while remote keys are in flight, then merges.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from vidsparse.attention import backend_for, plan, run_permuted
from vidsparse.layout import VideoLayout
from vidsparse.parallel.comm import all_gather_uneven
from vidsparse.parallel.runtime import ParallelRuntime
from vidsparse.patterns.base import Pattern


def merge_partials(parts: Sequence[tuple[torch.Tensor, torch.Tensor]], dtype: torch.dtype | None = None):
    """Merge (out [..., D], lse [...]) pairs over disjoint key sets -> (out, lse).

    Rows with no key in any part (all lse = -inf) give out 0 and lse -inf.
    """
    if not parts:
        raise ValueError("merge_partials needs at least one (out, lse) pair.")
    dtype = dtype or parts[0][0].dtype
    acc_t = torch.promote_types(parts[0][0].dtype, torch.float32)
    lse = torch.stack([p[1].to(acc_t) for p in parts])
    m = lse.amax(dim=0)
    m_safe = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    w = torch.exp(lse - m_safe)  # exp(-inf) = 0 for empty parts
    den = w.sum(dim=0)
    acc = sum(w[i].unsqueeze(-1) * parts[i][0].to(acc_t) for i in range(len(parts)))
    out = torch.where(den.unsqueeze(-1) > 0, acc / den.clamp_min(1e-30).unsqueeze(-1), torch.zeros_like(acc))
    total = torch.where(den > 0, m_safe + torch.log(den.clamp_min(1e-30)), torch.full_like(den, float("-inf")))
    return out.to(dtype), total


def dense_attention_lse(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_valid: torch.Tensor | None = None,
    scale: float | None = None,
    chunk: int = 4096,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q [B, Sq, H, D] against every (valid) key of k, v [B, Sk, H, D] -> (out, lse [B, Sq, H]).

    Keys are processed in chunks with an online softmax, so memory is Sq x chunk per head.
    ``key_valid`` is bool [B, Sk].
    """
    B, Sq, H, D = q.shape
    scale = D**-0.5 if scale is None else scale
    acc_t = torch.promote_types(q.dtype, torch.float32)
    qh = q.transpose(1, 2).to(acc_t)
    parts = []
    for start in range(0, k.shape[1], chunk):
        kc = k[:, start : start + chunk].transpose(1, 2).to(acc_t)
        vc = v[:, start : start + chunk].transpose(1, 2).to(acc_t)
        s = torch.matmul(qh, kc.transpose(-1, -2)) * scale  # [B, H, Sq, C]
        if key_valid is not None:
            s = s.masked_fill(~key_valid[:, None, None, start : start + chunk], float("-inf"))
        mx = s.amax(dim=-1, keepdim=True)
        mx = torch.where(torch.isfinite(mx), mx, torch.zeros_like(mx))
        p = torch.exp(s - mx)
        den = p.sum(dim=-1, keepdim=True)
        o = torch.matmul(p, vc) / den.clamp_min(1e-30)
        lse = torch.where(den > 0, mx + torch.log(den.clamp_min(1e-30)), torch.full_like(den, float("-inf")))
        parts.append((o.transpose(1, 2), lse.squeeze(-1).transpose(1, 2)))
    if not parts:
        return torch.zeros_like(q), torch.full((B, Sq, H), float("-inf"), device=q.device)
    out, lse = merge_partials(parts, dtype=acc_t)
    return out.to(q.dtype), lse


def merged_rows_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    runtime: ParallelRuntime,
    key_valid: torch.Tensor | None = None,
    scale: float | None = None,
    op: str = "merged_rows",
) -> torch.Tensor:
    """Dense attention of queries every rank holds over the union of every rank's keys, exactly.

    q [B, T, H, D] is the same on every rank (joint text rows of HunyuanVideo / Mochi / CogVideoX,
    LTX-2's audio queries of its video->audio cross-attention); k, v [B, S_r, H, D] are this rank's
    share of the keys (its clip's video tokens, plus whatever keys only one rank adds). Each rank
    attends its keys with their log-sum-exp, the (out, lse) partials of all ranks are all-gathered
    (T x H x (D + 1) values per rank, in float32 / float64) and merged (``merge_partials``) in rank
    order, so every rank gets the same rows, equal to the single-device attention over all keys.
    ``key_valid`` is bool [B, S_r] (padding masks). Bytes are recorded under ``op``.
    """
    D = q.shape[-1]
    out, lse = dense_attention_lse(q, k, v, key_valid, scale)
    packed = torch.cat([out.to(lse.dtype), lse.unsqueeze(-1)], dim=-1)  # [B, T, H, D + 1]
    parts = all_gather_uneven(packed, [q.shape[1]] * runtime.world_size, runtime, dim=1, op=op)
    merged, _ = merge_partials([(p[..., :D], p[..., D]) for p in parts], dtype=q.dtype)
    return merged


def sparse_attention_lse(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: VideoLayout,
    pattern: Pattern,
    backend: str = "auto",
    layer: int = 0,
    text_mask: torch.Tensor | None = None,
    scale: float | None = None,
    block_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``vidsparse.attention`` that also returns the per-row LSE [B, S, H] (float32, or float64 for float64 inputs).

    Uses the backend record's kernel-order ``run(q, k, v, plan, key_valid, scale) -> (out, lse)``
    (every backend has one, fused or not).
    """
    chosen = backend_for(backend, q)
    bs = block_size or chosen.default_block
    _, S, H, _ = q.shape
    layout.check_seq_len(S)
    p = plan(pattern, layout, num_heads=H, layer=layer, device=q.device, block_size=bs)
    out, lse = run_permuted(chosen.run, q, k, v, p, text_mask, scale, return_lse=True)
    return out, lse.to(torch.promote_types(q.dtype, torch.float32))
