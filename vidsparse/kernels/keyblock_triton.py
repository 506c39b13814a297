"""Triton kernels of the key-block-major path (see :mod:`vidsparse.kernels.keyblock`).

Three kernels on caller-order q, k, v [B, S, H, D]:

- ``_fwd_kernel``: one program per packed query tile (``block_m`` gathered rows of one
  (batch, head, group)); walks the group's keys in ``block_n`` sub-tiles with an online
  softmax; writes the tile's partial output (fp32) and log-sum-exp. The merge is torch
  (``keyblock.merge``).
- ``_dq_kernel``: same grid; recomputes the probabilities from the merged log-sum-exp and
  writes the tile's dQ rows (fp32, summed per row by ``index_add``).
- ``_dkdv_kernel``: one program per (key sub-tile, batch-head-group); walks the group's
  query tiles and accumulates dK, dV in registers: no atomics, each key written once.

Forward and dQ walk a group's keys in unmasked whole sub-tiles, then a masked tail, and read
K/V sub-tiles through tensor descriptors (TMA on Hopper; ``VIDSPARSE_TRITON_TMA=0`` gathers
rows): straight from the caller's K/V where every group's keys are one run of consecutive
caller rows (VMoBA's temporal partition, text), else from a group-major copy of K and V made
once per call (spatial and spatio-temporal partitions: a group is a box of the latent grid,
runs of a few rows, so no descriptor box fits it in caller order; see ``_kv_operands``).
Softmax runs in base 2; stored log-sum-exps are natural-log. CPU tensors run under Triton's
interpreter (``TRITON_INTERPRET=1`` before Triton is imported): slow, for tests.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from vidsparse.kernels import keyblock as kb
from vidsparse.kernels import triton_kernels as tk
from vidsparse.kernels.tile_loads import caller_rows, row_tile
from vidsparse.kernels.triton_backend import unsupported_reason
from vidsparse.kernels.triton_plan import CACHE, kernel_rows
from vidsparse.plan import BlockSparsePlan

LOG2E = 1.4426950408889634


# -- per-step bodies -------------------------------------------------------------------------
# A group's keys are walked in BLOCK_N sub-tiles: first the whole ones (every key a real key
# that no run-time mask can hide: ``Lead``), with no mask arithmetic and the scale folded into
# exp2 as in the Triton tutorial, then the tail (the last ragged sub-tile, run-time masked
# text keys). Padding rows of a packed tile need no mask: their partials are dropped by the
# merge (target -1), and in the backward their lse is +inf (p = 0). With ``KV_TMA`` every
# group's keys are one run of rows of K/V (the caller's tensors or the group-major copy, see
# ``_kv_operands``) starting at ``k0``: the K and V sub-tiles come in whole through tensor
# descriptors; rows past the group are masked in the tail like any invalid key. At most two jitted calls per step (the step and its
# key rows): Triton's interpreter pays about 0.4 ms per nested call.


@triton.jit
def _key_step(j, kstart, klen, kv_ptr, KRows, BLOCK_N: tl.constexpr, MASKED: tl.constexpr, HAS_KV: tl.constexpr):
    """(caller rows int64, valid) of sub-tile ``j`` of a group's keys; unmasked when whole."""
    c = j * BLOCK_N + tl.arange(0, BLOCK_N)
    kpos = (kstart + c).to(tl.int64)
    if MASKED:
        c_ok = c < klen
        krow = tl.load(KRows + kpos, mask=c_ok, other=-1)
        k_ok = krow >= 0
        if HAS_KV:
            k_ok = k_ok & (tl.load(kv_ptr + kpos, mask=c_ok, other=0) != 0)
        krow = tl.maximum(krow, 0).to(tl.int64)
    else:
        krow = tl.load(KRows + kpos).to(tl.int64)
        k_ok = c >= 0
    return krow, k_ok


@triton.jit
def _fwd_step(
    acc, l_i, m_i, q, j, kstart, klen, k0, kv_ptr, k_src, v_src, KRows, s_ks, s_vs, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr, HAS_KV: tl.constexpr,
    KV_TMA: tl.constexpr, PREC: tl.constexpr, NEG_SCALE: tl.constexpr,
):  # fmt: skip
    """Online-softmax update of a packed query tile with key sub-tile ``j`` of its group."""
    if KV_TMA:
        kT = k_src.load([k0 + j * BLOCK_N, 0]).T
        v = v_src.load([k0 + j * BLOCK_N, 0])
        if MASKED:
            _, k_ok = _key_step(j, kstart, klen, kv_ptr, KRows, BLOCK_N, MASKED, HAS_KV)
    else:
        krow, k_ok = _key_step(j, kstart, klen, kv_ptr, KRows, BLOCK_N, MASKED, HAS_KV)
        offs_d = tl.arange(0, HEAD_DIM)
        kT = tl.load(k_src + krow[None, :] * s_ks + offs_d[:, None], mask=k_ok[None, :], other=0.0)
        v = tl.load(v_src + krow[:, None] * s_vs + offs_d[None, :], mask=k_ok[:, None], other=0.0)
    qk = tl.dot(q, kT, input_precision=PREC)
    if MASKED:
        qk = tl.where(k_ok[None, :], qk * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(qk - m_use[:, None])
        alpha = tl.math.exp2(m_i - m_use)
    else:  # whole: the scale rides in exp2, the row max (min for a negative scale) is scaled
        if NEG_SCALE:
            m_new = tl.maximum(m_i, tl.min(qk, 1) * qk_scale)
        else:
            m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        p = tl.math.exp2(qk * qk_scale - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=PREC)
    return acc, l_i, m_new


@triton.jit
def _dq_step(
    dq, q, do, m, di, j, kstart, klen, k0, kv_ptr, k_src, v_src, KRows, s_ks, s_vs, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr, HAS_KV: tl.constexpr,
    KV_TMA: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    """dQ contribution of key sub-tile ``j`` of the group (``m``: the rows' base-2 lse, +inf
    on padding rows, so their p is 0 without a row mask)."""
    if KV_TMA:
        kT = k_src.load([k0 + j * BLOCK_N, 0]).T
        vT = v_src.load([k0 + j * BLOCK_N, 0]).T
        if MASKED:
            _, k_ok = _key_step(j, kstart, klen, kv_ptr, KRows, BLOCK_N, MASKED, HAS_KV)
    else:
        krow, k_ok = _key_step(j, kstart, klen, kv_ptr, KRows, BLOCK_N, MASKED, HAS_KV)
        offs_d = tl.arange(0, HEAD_DIM)
        kT = tl.load(k_src + krow[None, :] * s_ks + offs_d[:, None], mask=k_ok[None, :], other=0.0)
        vT = tl.load(v_src + krow[None, :] * s_vs + offs_d[:, None], mask=k_ok[None, :], other=0.0)
    p = tl.math.exp2(tl.dot(q, kT, input_precision=PREC) * qk_scale - m[:, None])
    if MASKED:
        p = tl.where(k_ok[None, :], p, 0.0)
    dp = tl.dot(do, vT, input_precision=PREC)
    ds = p * (dp - di[:, None])
    return tl.dot(ds.to(kT.dtype), tl.trans(kT), dq, input_precision=PREC)


@triton.jit
def _kv_source(base, SK, stride, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, KV_TMA: tl.constexpr):
    """A [SK, HEAD_DIM] tensor descriptor of one (batch, head) of K or V (``KV_TMA``), else ``base``."""
    if KV_TMA:
        return tl.make_tensor_descriptor(
            base, shape=[SK, HEAD_DIM], strides=[stride, 1], block_shape=[BLOCK_N, HEAD_DIM]
        )
    else:
        return base


# -- kernels -------------------------------------------------------------------------------


@triton.jit
def _fwd_kernel(
    Q, K, V, OP, LP, Rows, KRows, TileBH, TileGroup, Span, Lead, KStart, KeyValid,
    sm_scale, T0,
    s_qb, s_qs, s_qh, s_kb, s_ks, s_kh, s_vb, s_vs, s_vh, s_kvb,
    H, SK,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_KV: tl.constexpr,
    PREC: tl.constexpr, KV_TMA: tl.constexpr, NEG_SCALE: tl.constexpr,
):  # fmt: skip
    """Partial output and log-sum-exp of one packed query tile against its group's keys."""
    pid = tl.program_id(0)
    t = T0 + pid
    bh = tl.load(TileBH + t).to(tl.int64)
    b = bh // H
    h = bh % H
    g = tl.load(TileGroup + t).to(tl.int64)
    kstart = tl.load(Span + 2 * g)
    klen = tl.load(Span + 2 * g + 1)
    n_whole = tl.load(Lead + g) // BLOCK_N
    k0 = tl.load(KStart + g)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_m = t.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row, ok = caller_rows(Rows, offs_m)
    q = row_tile(Q + b * s_qb + h * s_qh, row, ok, s_qs, HEAD_DIM)
    k_src = _kv_source(K + b * s_kb + h * s_kh, SK, s_ks, HEAD_DIM, BLOCK_N, KV_TMA)
    v_src = _kv_source(V + b * s_vb + h * s_vh, SK, s_vs, HEAD_DIM, BLOCK_N, KV_TMA)
    kv_ptr = KeyValid + b * s_kvb
    qk_scale = sm_scale * 1.4426950408889634
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    for j in range(0, n_whole):
        acc, l_i, m_i = _fwd_step(
            acc, l_i, m_i, q, j, kstart, klen, k0, kv_ptr, k_src, v_src, KRows, s_ks, s_vs, qk_scale,
            HEAD_DIM, BLOCK_N, False, HAS_KV, KV_TMA, PREC, NEG_SCALE,
        )  # fmt: skip
    for j in range(n_whole, tl.cdiv(klen, BLOCK_N)):
        acc, l_i, m_i = _fwd_step(
            acc, l_i, m_i, q, j, kstart, klen, k0, kv_ptr, k_src, v_src, KRows, s_ks, s_vs, qk_scale,
            HEAD_DIM, BLOCK_N, True, HAS_KV, KV_TMA, PREC, NEG_SCALE,
        )  # fmt: skip
    seen = l_i > 0.0
    l_safe = tl.where(seen, l_i, 1.0)
    out = acc / l_safe[:, None]
    lse = tl.where(seen, (m_i + tl.math.log2(l_safe)) * 0.6931471805599453, float("-inf"))
    local = pid.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    tl.store(LP + local, lse)
    tl.store(OP + local[:, None] * HEAD_DIM + offs_d[None, :], out)


@triton.jit
def _dq_kernel(
    Q, K, V, DO, DQP, Lse, Delta, Rows, KRows, TileBH, TileGroup, Span, Lead, KStart, KeyValid,
    sm_scale, T0,
    s_qb, s_qs, s_qh, s_kb, s_ks, s_kh, s_vb, s_vs, s_vh, s_db, s_ds, s_dh, s_kvb,
    H, S, SK,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_KV: tl.constexpr,
    PREC: tl.constexpr, KV_TMA: tl.constexpr,
):  # fmt: skip
    """dQ of one packed query tile from its group's keys (merged lse and delta)."""
    pid = tl.program_id(0)
    t = T0 + pid
    bh = tl.load(TileBH + t).to(tl.int64)
    b = bh // H
    h = bh % H
    g = tl.load(TileGroup + t).to(tl.int64)
    kstart = tl.load(Span + 2 * g)
    klen = tl.load(Span + 2 * g + 1)
    n_whole = tl.load(Lead + g) // BLOCK_N
    k0 = tl.load(KStart + g)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_m = t.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row, ok = caller_rows(Rows, offs_m)
    q = row_tile(Q + b * s_qb + h * s_qh, row, ok, s_qs, HEAD_DIM)
    do = row_tile(DO + b * s_db + h * s_dh, row, ok, s_ds, HEAD_DIM)
    flat = bh * S + row
    m = tl.load(Lse + flat, mask=ok, other=float("inf")) * 1.4426950408889634
    m = tl.where(m == float("-inf"), float("inf"), m)  # rows that saw no key: p = 0
    di = tl.load(Delta + flat, mask=ok, other=0.0)
    k_src = _kv_source(K + b * s_kb + h * s_kh, SK, s_ks, HEAD_DIM, BLOCK_N, KV_TMA)
    v_src = _kv_source(V + b * s_vb + h * s_vh, SK, s_vs, HEAD_DIM, BLOCK_N, KV_TMA)
    kv_ptr = KeyValid + b * s_kvb
    qk_scale = sm_scale * 1.4426950408889634
    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    for j in range(0, n_whole):
        dq = _dq_step(
            dq, q, do, m, di, j, kstart, klen, k0, kv_ptr, k_src, v_src, KRows, s_ks, s_vs, qk_scale,
            HEAD_DIM, BLOCK_N, False, HAS_KV, KV_TMA, PREC,
        )  # fmt: skip
    for j in range(n_whole, tl.cdiv(klen, BLOCK_N)):
        dq = _dq_step(
            dq, q, do, m, di, j, kstart, klen, k0, kv_ptr, k_src, v_src, KRows, s_ks, s_vs, qk_scale,
            HEAD_DIM, BLOCK_N, True, HAS_KV, KV_TMA, PREC,
        )  # fmt: skip
    dq *= sm_scale
    local = pid.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    tl.store(DQP + local[:, None] * HEAD_DIM + offs_d[None, :], dq)


@triton.jit
def _dkdv_kernel(
    Q, K, V, DO, DK, DV, Lse, Delta, Rows, KRows, TileFirst, TileCount, Span, KeyValid,
    sm_scale,
    s_qb, s_qs, s_qh, s_kb, s_ks, s_kh, s_vb, s_vs, s_vh, s_db, s_ds, s_dh, s_gb, s_gs, s_gh, s_kvb,
    H, S, G,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_KV: tl.constexpr,
    PREC: tl.constexpr, SUB_M: tl.constexpr, KV_KERNEL_ORDER: tl.constexpr,
):  # fmt: skip
    """dK, dV of BLOCK_N keys of one group, over every packed query tile of that (batch, head, group),
    ``SUB_M`` packed rows at a time (the tiles' rows are consecutive: a whole 128-row step spilled).
    K/V rows are kernel positions with ``KV_KERNEL_ORDER`` (the group-major copy), else caller
    rows; dK/dV are written to the caller's rows either way.

    No mask in the loop: a padding query row has lse +inf (p = 0), and an invalid key's row of
    p only reaches its own dK/dV row, zeroed once at the end."""
    j = tl.program_id(0)
    bhg = tl.program_id(1).to(tl.int64)
    g = bhg % G
    bh = bhg // G
    b = bh // H
    h = bh % H
    kstart = tl.load(Span + 2 * g)
    klen = tl.load(Span + 2 * g + 1)
    offs_d = tl.arange(0, HEAD_DIM)
    c = j * BLOCK_N + tl.arange(0, BLOCK_N)
    c_ok = c < klen
    kpos = (kstart + c).to(tl.int64)
    krow = tl.load(KRows + kpos, mask=c_ok, other=-1)
    k_in = krow >= 0  # a real key of this group (written even when masked: zero gradient)
    k_ok = k_in
    if HAS_KV:
        k_ok = k_ok & (tl.load(KeyValid + b * s_kvb + kpos, mask=c_ok, other=0) != 0)
    krow = tl.maximum(krow, 0).to(tl.int64)
    if KV_KERNEL_ORDER:
        lrow = kpos
    else:
        lrow = krow
    k = row_tile(K + b * s_kb + h * s_kh, lrow, k_ok, s_ks, HEAD_DIM)
    v = row_tile(V + b * s_vb + h * s_vh, lrow, k_ok, s_vs, HEAD_DIM)
    first = tl.load(TileFirst + bhg)
    count = tl.where(j * BLOCK_N < klen, tl.load(TileCount + bhg), 0)
    q_base = Q + b * s_qb + h * s_qh
    do_base = DO + b * s_db + h * s_dh
    qk_scale = sm_scale * 1.4426950408889634
    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    SUBS: tl.constexpr = BLOCK_M // SUB_M
    for it in range(first * SUBS, (first + count) * SUBS):
        offs_m = (tl.zeros([SUB_M], tl.int64) + it) * SUB_M + tl.arange(0, SUB_M)
        row = tl.load(Rows + offs_m)
        ok = row >= 0
        row = tl.maximum(row, 0).to(tl.int64)
        qT = tl.load(q_base + row[None, :] * s_qs + offs_d[:, None], mask=ok[None, :], other=0.0)
        do = tl.load(do_base + row[:, None] * s_ds + offs_d[None, :], mask=ok[:, None], other=0.0)
        flat = bh * S + row
        m = tl.load(Lse + flat, mask=ok, other=float("inf")) * 1.4426950408889634
        m = tl.where(m == float("-inf"), float("inf"), m)
        di = tl.load(Delta + flat, mask=ok, other=0.0)
        pT = tl.math.exp2(tl.dot(k, qT, input_precision=PREC) * qk_scale - m[None, :])
        dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=PREC)
        dpT = tl.dot(v, tl.trans(do), input_precision=PREC)
        dsT = pT * (dpT - di[None, :])
        dk = tl.dot(dsT.to(qT.dtype), tl.trans(qT), dk, input_precision=PREC)
    dk = tl.where(k_ok[:, None], dk * sm_scale, 0.0)
    dv = tl.where(k_ok[:, None], dv, 0.0)
    g_off = b * s_gb + h * s_gh + krow[:, None] * s_gs + offs_d[None, :]
    tl.store(DK + g_off, dk.to(DK.dtype.element_ty), mask=k_in[:, None])
    tl.store(DV + g_off, dv.to(DV.dtype.element_ty), mask=k_in[:, None])


INTERPRETED = not isinstance(_fwd_kernel, triton.runtime.JITFunction)

# Launch shape at the GPU defaults (128-row tiles, 64-key sub-tiles, head dim 128, sm_90 offline
# compile with launch hints): Triton's default 4 warps spilled 216-400 B in every kernel and
# dK/dV spilled 308-364 B even at 8 warps when it took a whole 128-row tile per step. 8 warps
# and 64-row dK/dV steps: fwd 144-180, dQ 167-179, dK/dV 209-210 registers, no spill (gather and TMA).
NUM_WARPS = 8
DKDV_SUB_M = 64
#: role -> JIT kernel, for tools that compile the kernels ahead of time (benchmarks/offline_compile.py).
KERNELS = {"fwd": _fwd_kernel, "dq": _dq_kernel, "dkdv": _dkdv_kernel}


def _tiles(block_m: int | None, block_n: int | None, dtype: torch.dtype) -> tuple[int, int]:
    if INTERPRETED:
        return block_m or 16, block_n or 16
    bm = block_m or (kb.DEFAULT_BLOCK_M if dtype != torch.float32 else 64)
    bn = block_n or (kb.DEFAULT_BLOCK_N if dtype != torch.float32 else 32)
    return bm, bn


def _bsh(t: torch.Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


class _Static:
    """Per-call device tensors shared by forward and backward.

    ``lead`` [G]: the leading keys of each group's span that are real keys no run-time mask
    can hide (the kernels' unmasked sub-tiles); ``kstart`` [G]: the caller row of each
    group's first key; ``contiguous``: every group's keys are one run of consecutive caller
    rows (K/V sub-tiles can come through tensor descriptors)."""

    def __init__(self, plan: BlockSparsePlan, pk: kb.Packing, key_valid: torch.Tensor | None, device) -> None:
        self.krows = kernel_rows(plan.order.gather, plan.order.token_valid).to(device)
        self.span = plan.group_spans.to(device=device, dtype=torch.int32).contiguous()
        self.kv = None if key_valid is None else key_valid.to(torch.uint8).contiguous()
        self.max_sub_len = int(plan.group_spans[:, 1].max()) if plan.group_spans.numel() else 0
        self.num_groups = plan.group_spans.shape[0]
        self.pk = pk
        sources = (plan.order.gather, plan.order.token_valid, plan.group_spans)
        self.kstart, self.contiguous = CACHE.get(
            "keyblock_key_runs", sources, lambda: _key_runs(self.krows, self.span, self.max_sub_len), (str(device),)
        )
        self.lead = _lead(self.krows, self.span, self.max_sub_len, self.kv)


def _span_rows(krows: torch.Tensor, span: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(caller row int32 [G, width] of each group's keys (-1 = none), live bool [G, width])."""
    col = torch.arange(max(width, 1), device=span.device)
    live = col < span[:, 1:].long()
    pos = (span[:, :1].long() + col).clamp(0, krows.numel() - 1)
    return torch.where(live, krows[pos], -1), live


def _key_runs(krows: torch.Tensor, span: torch.Tensor, width: int) -> tuple[torch.Tensor, bool]:
    """(caller row of each group's first key int32 [G], whether every group's keys are one run of
    consecutive caller rows); one host read, cached per static plan."""
    rows, live = _span_rows(krows, span, width)
    first = rows[:, :1].clamp_min(0)
    col = torch.arange(rows.shape[1], device=rows.device)
    run = (rows == first + col) | ~live
    return first.squeeze(1).to(torch.int32).contiguous(), bool(run.all())


def _lead(krows: torch.Tensor, span: torch.Tensor, width: int, kv: torch.Tensor | None) -> torch.Tensor:
    """int32 [G]: leading keys of each span that are real and valid in every batch row of ``kv``."""
    rows, live = _span_rows(krows, span, width)
    good = rows >= 0
    if kv is not None:
        sure = kv.bool().all(0)
        col = torch.arange(rows.shape[1], device=rows.device)
        pos = (span[:, :1].long() + col).clamp(0, sure.numel() - 1)
        good = good & sure[pos]
    return torch.cumprod(good.to(torch.int32), dim=1).sum(dim=1).to(torch.int32).contiguous()


class _KV(NamedTuple):
    """The K/V a call's kernels read: ``k``, ``v`` [B, SK, H, D], the row of each group's first
    key in them (``start`` int32 [G]), whether forward and dQ read sub-tiles through tensor
    descriptors (``tma``), and whether rows are kernel positions (``kernel_order``: the
    group-major copy) rather than caller rows."""

    k: torch.Tensor
    v: torch.Tensor
    start: torch.Tensor
    tma: bool
    kernel_order: bool


def _kv_operands(st: _Static, k: torch.Tensor, v: torch.Tensor) -> _KV:
    """Where K/V sub-tiles come from. A plan whose groups are runs of caller rows (temporal
    partition, text) reads the caller's K/V by descriptor. Any other plan (spatial and
    spatio-temporal partitions: a group is a box of the latent grid, runs of a few rows) gets
    a group-major copy of K and V, made once per call (one gather of 2·B·S·H·D elements,
    against the forward's per-tile row gathers of the same keys from every query tile that
    reads them), so that every group is one run and TMA applies; the backward reuses it.
    Without TMA (pre-Hopper, ``VIDSPARSE_TRITON_TMA=0``) the kernels gather caller rows."""
    gather = _KV(k, v, st.kstart, False, False)
    if not tk.tma_enabled(k.device):
        return gather
    if st.contiguous:
        if not (tk.tma_ok(k) and tk.tma_ok(v)):
            return gather
        tk.ensure_allocator()
        return _KV(k, v, st.kstart, True, False)
    B, _, H, D = k.shape
    copy_shape = torch.empty((B, st.krows.numel(), H, D), dtype=k.dtype, device="meta")  # fresh, contiguous
    if not tk.tma_ok(copy_shape):  # e.g. H·D·itemsize not a multiple of 16 bytes: no copy either
        return gather
    rows = st.krows.clamp_min(0).long()  # caller row of each kernel row (padding: row 0, masked)
    tk.ensure_allocator()
    return _KV(k.index_select(1, rows), v.index_select(1, rows), st.span[:, 0].contiguous(), True, True)


def _forward(q, k, v, st: _Static, scale: float, bm: int, bn: int):
    B, S, H, D = q.shape
    pk = st.pk
    dummy = torch.empty(1, dtype=torch.uint8, device=q.device)
    kv = st.kv if st.kv is not None else dummy
    s_kvb = st.kv.stride(0) if st.kv is not None else 0
    prec = "ieee" if q.dtype == torch.float32 else "tf32"
    kvo = _kv_operands(st, k, v)
    outs, lses = [], []
    for t0, t1, bh0, bh1 in kb.chunks(pk):
        n = t1 - t0
        op = torch.empty(n * bm, D, dtype=torch.float32, device=q.device)
        lp = torch.empty(n * bm, dtype=torch.float32, device=q.device)
        _fwd_kernel[(n,)](
            q, kvo.k, kvo.v, op, lp, pk.rows, st.krows, pk.tile_bh, pk.tile_group, st.span, st.lead, kvo.start, kv,
            scale, t0, *_bsh(q), *_bsh(kvo.k), *_bsh(kvo.v), s_kvb, H, kvo.k.shape[1],
            HEAD_DIM=D, BLOCK_M=bm, BLOCK_N=bn, HAS_KV=st.kv is not None, PREC=prec, KV_TMA=kvo.tma,
            NEG_SCALE=scale < 0, num_warps=NUM_WARPS,
        )  # fmt: skip
        tgt = pk.targets(t0, t1)
        o_c, l_c = kb.merge(op, lp, torch.where(tgt >= 0, tgt - bh0 * S, tgt), (bh1 - bh0) * S)
        outs.append(o_c)  # chunks cover the batch-heads in order
        lses.append(l_c)
    out = torch.cat(outs).view(B, H, S, D).transpose(1, 2).to(q.dtype)
    return out, torch.cat(lses).contiguous(), kvo  # lse: fp32 [B*H*S]


def _backward(do, q, kvo: _KV, out, lse, st: _Static, scale: float, bm: int, bn: int):
    B, S, H, D = q.shape
    pk = st.pk
    dummy = torch.empty(1, dtype=torch.uint8, device=q.device)
    kv = st.kv if st.kv is not None else dummy
    s_kvb = st.kv.stride(0) if st.kv is not None else 0
    prec = "ieee" if q.dtype == torch.float32 else "tf32"
    delta = (do.float() * out.float()).sum(dim=-1).transpose(1, 2).reshape(-1).contiguous()  # [B*H*S]
    k, v = kvo.k, kvo.v
    dk = torch.zeros(q.shape, dtype=k.dtype, device=q.device)  # caller order, whatever K/V's layout
    dv = torch.zeros(q.shape, dtype=v.dtype, device=q.device)
    G = st.num_groups
    if st.max_sub_len and pk.num_tiles:
        _dkdv_kernel[(triton.cdiv(st.max_sub_len, bn), B * H * G)](
            q, k, v, do, dk, dv, lse, delta, pk.rows, st.krows, pk.tile_first, pk.tile_count, st.span, kv, scale,
            *_bsh(q), *_bsh(k), *_bsh(v), *_bsh(do), *_bsh(dk), s_kvb, H, S, G,
            HEAD_DIM=D, BLOCK_M=bm, BLOCK_N=bn, HAS_KV=st.kv is not None, PREC=prec, SUB_M=min(bm, DKDV_SUB_M),
            KV_KERNEL_ORDER=kvo.kernel_order, num_warps=NUM_WARPS,
        )  # fmt: skip
    dq = torch.zeros(B * H * S + 1, D, dtype=torch.float32, device=q.device)
    for t0, t1, _, _ in kb.chunks(pk):
        n = t1 - t0
        dqp = torch.empty(n * bm, D, dtype=torch.float32, device=q.device)
        _dq_kernel[(n,)](
            q, k, v, do, dqp, lse, delta, pk.rows, st.krows, pk.tile_bh, pk.tile_group, st.span, st.lead, kvo.start, kv,
            scale, t0, *_bsh(q), *_bsh(k), *_bsh(v), *_bsh(do), s_kvb, H, S, k.shape[1],
            HEAD_DIM=D, BLOCK_M=bm, BLOCK_N=bn, HAS_KV=st.kv is not None, PREC=prec, KV_TMA=kvo.tma,
            num_warps=NUM_WARPS,
        )  # fmt: skip
        tgt = pk.targets(t0, t1)
        dq.index_add_(0, torch.where(tgt >= 0, tgt, torch.full_like(tgt, B * H * S)), dqp)
    return dq[:-1].view(B, H, S, D).transpose(1, 2).to(q.dtype), dk, dv


class _KeyBlockAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, st, scale, bm, bn):
        out, lse, kvo = _forward(q, k, v, st, scale, bm, bn)
        ctx.save_for_backward(q, kvo.k, kvo.v, out, lse)  # the group-major copy, where one was made
        ctx.st, ctx.scale, ctx.bm, ctx.bn = st, scale, bm, bn
        ctx.kv_meta = (kvo.start, kvo.tma, kvo.kernel_order)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        kvo = _KV(k, v, *ctx.kv_meta)
        dq, dk, dv = _backward(_contig(grad_out), q, kvo, out, lse, ctx.st, ctx.scale, ctx.bm, ctx.bn)
        return dq, dk, dv, None, None, None, None


def _contig(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def attention(q, k, v, plan: BlockSparsePlan, key_valid, scale: float, block_m=None, block_n=None):
    """Caller-order q, k, v [B, S, H, D] -> out; see :func:`vidsparse.kernels.keyblock.attention`."""
    reason = unsupported_reason(q)
    if reason is not None:
        raise ValueError(f"The triton key-block-major path cannot run this call: {reason}.")
    if q.dtype != k.dtype or k.dtype != v.dtype:
        raise TypeError(f"q, k, v must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype}.")
    bm, bn = _tiles(block_m, block_n, q.dtype)
    for name, n in (("block_m", bm), ("block_n", bn)):
        if n < 16 or n & (n - 1):
            raise ValueError(f"{name} must be a power of two >= 16 (tensor-core tiles), got {n}.")
    q, k, v = _contig(q), _contig(k), _contig(v)
    pk = kb.pack(plan, bm)
    st = _Static(plan, pk, key_valid, q.device)
    return _KeyBlockAttention.apply(q, k, v, st, scale, bm, bn)


__all__ = ["DKDV_SUB_M", "INTERPRETED", "KERNELS", "NUM_WARPS", "attention"]
