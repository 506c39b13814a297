"""Triton block-sparse flash attention: forward, and FlashAttention-2 style backward.

One kernel family serves every pattern. A program owns ``BLOCK_M`` query rows of one plan
query block and walks that block's key list (``BlockLists``): first the blocks that need a
mask (element mask, run-time key validity in text blocks, per-query selection), then the
whole blocks with no mask arithmetic. ``BLOCK_N`` may split a plan block into sub-tiles.

Tokens are read and written in the caller's order through ``Rows`` (kernel position ->
caller token, -1 = padding), so the tile-major permutation costs no extra pass; with
``GATHER=False`` the kernel order is the caller order. Softmax runs in base 2
(``exp2`` with a log2(e)-scaled scale); the stored log-sum-exp is natural-log.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from vidsparse.kernels.tile_loads import caller_rows, row_tile

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


# -- per-tile bodies ------------------------------------------------------------------------
# One jitted call per tile and nothing nested inside: Triton's CPU interpreter pays a large
# fixed cost per nested call (about 0.4 ms), and on the GPU everything is inlined anyway. The
# once-per-program loads shared with keyblock_triton live in tile_loads.


@triton.jit
def _fwd_tile(
    acc, l_i, m_i, q, it, lst, r_in, r_in0, k_base, v_base, k_desc, v_desc, m_desc, kv_ptr, qs_ptr, q_valid,
    Rows, Valid, Idx, Mid, Masks, KGroup, s_ks, s_vs, s_sg, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, BLOCK_N: tl.constexpr, GATHER: tl.constexpr,
    MASKED: tl.constexpr, HAS_KV: tl.constexpr, HAS_QSEL: tl.constexpr, PREC: tl.constexpr,
    USE_TMA: tl.constexpr, MASK_TMA: tl.constexpr, NEG_SCALE: tl.constexpr,
):  # fmt: skip
    """Online-softmax update of one query tile with key sub-tile ``it`` of its list.

    ``MASKED``: 0 whole block; 1 element mask (``Mid``, or only run-time masks when -1);
    2 padding only: the block is whole but for padding rows / columns, tested on the 1-D
    validity of the keys (and of the queries, mask code -3) instead of a 2-D mask tile.
    ``HAS_QSEL``: ``qs_ptr`` points at the tile's rows of group 0 of the group-major selection
    (rows contiguous, groups ``s_sg`` apart), so a key tile's selection is one contiguous
    ``BLOCK_M``-byte load at ``qs_ptr + group * s_sg``. On a whole block the selection is a
    per-row test (``+inf`` subtracted in exp2 for rows that do not select it), so the block
    keeps the tutorial's folded-scale FMA and has no 2-D select; masked blocks fold it into
    their element mask. Same bits as a per-score ``where`` for finite scores.
    """
    SUB: tl.constexpr = BLOCK // BLOCK_N
    tl.assume(it >= 0)  # the sub-tile split below is then a shift and a mask, not a signed division
    j = it // SUB
    c_in = (it % SUB) * BLOCK_N + tl.arange(0, BLOCK_N)
    kb = tl.load(Idx + lst + j)
    offs_n = kb.to(tl.int64) * BLOCK + c_in
    if USE_TMA:  # contiguous kernel order: whole tiles by the tensor-memory accelerator
        row0 = kb * BLOCK + (it % SUB) * BLOCK_N
        kT = k_desc.load([row0, 0]).T
        v = v_desc.load([row0, 0])
        k_ok = c_in >= 0
    else:
        offs_d = tl.arange(0, HEAD_DIM)
        if GATHER:
            k_row = tl.load(Rows + offs_n)
            k_ok = k_row >= 0
            k_row = tl.maximum(k_row, 0).to(tl.int64)
        else:
            k_row = offs_n
            k_ok = offs_n >= 0
        kT = tl.load(k_base + k_row[None, :] * s_ks + offs_d[:, None], mask=k_ok[None, :], other=0.0)
        v = tl.load(v_base + k_row[:, None] * s_vs + offs_d[None, :], mask=k_ok[:, None], other=0.0)
    qk = tl.dot(q, kT, input_precision=PREC)
    if MASKED:
        qk = qk * qk_scale
        mid = tl.load(Mid + lst + j)
        if MASKED == 2:  # padding only: 1-D key (and query) validity, no mask tile
            if GATHER:
                k_in = k_ok
            else:
                k_in = tl.load(Valid + offs_n) != 0
            keep = k_in[None, :] & (q_valid[:, None] | (mid == -2))
        elif MASK_TMA:  # the element mask as one TMA tile: no per-element pointers in registers
            mt = m_desc.load([tl.maximum(mid, 0) * BLOCK + r_in0, (it % SUB) * BLOCK_N])
            keep = (mt != 0) | (mid < 0)
        else:
            m_ptr = Masks + tl.maximum(mid, 0).to(tl.int64) * (BLOCK * BLOCK) + r_in[:, None] * BLOCK + c_in[None, :]
            has = (r_in[:, None] * 0 + c_in[None, :] * 0 + mid) >= 0  # tensor-shaped (interpreter)
            keep = tl.load(m_ptr, mask=has, other=1) != 0
        if HAS_KV:
            keep = keep & (tl.load(kv_ptr + offs_n) != 0)[None, :]
        if HAS_QSEL:
            keep = keep & (tl.load(qs_ptr + tl.load(KGroup + kb) * s_sg) != 0)[:, None]
        qk = tl.where(keep, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # fully masked so far: no NaN
        p = tl.math.exp2(qk - m_use[:, None])
        alpha = tl.math.exp2(m_i - m_use)
    else:
        # Whole block: the scale rides in the exp2 argument (one FMA per score, as the Triton
        # tutorial); the row maximum is scaled instead of every score.
        if NEG_SCALE:
            m_new = tl.maximum(m_i, tl.min(qk, 1) * qk_scale)
        else:
            m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        if HAS_QSEL:
            # Per-query selection tested per row, not per score: a row that does not select
            # this key block subtracts +inf (p = 0) and keeps its max and sum (alpha = 1).
            sel = tl.load(qs_ptr + tl.load(KGroup + kb) * s_sg) != 0
            m_sub = tl.where(sel, m_new, float("inf"))
            p = tl.math.exp2(qk * qk_scale - m_sub[:, None])
            alpha = tl.where(sel, tl.math.exp2(m_i - m_sub), 1.0)
            m_new = tl.where(sel, m_new, m_i)
        else:
            p = tl.math.exp2(qk * qk_scale - m_new[:, None])
            alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=PREC)
    return acc, l_i, m_new


@triton.jit
def _dkdv_tile(
    dk, dv, k, v, it, lst, c_in, c_in0, q_base, do_base, row_base, qs_ptr, m_desc, k_valid,
    Rows, Valid, Idx, Mid, Masks, Lse, Delta, s_qs, s_ds, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, GATHER: tl.constexpr,
    MASKED: tl.constexpr, HAS_QSEL: tl.constexpr, PREC: tl.constexpr, MASK_TMA: tl.constexpr,
    USE_TMA: tl.constexpr,
):  # fmt: skip
    """dK/dV contribution of query sub-tile ``it`` of a key tile's transposed list.

    With ``USE_TMA`` (contiguous kernel order) ``q_base`` / ``do_base`` are tensor descriptors:
    the Q and dO tiles come in whole through TMA, with no per-row address registers.
    ``HAS_QSEL``: ``qs_ptr`` is this key tile's group row of the group-major selection, so a
    query sub-tile's selection is one contiguous ``BLOCK_M``-byte load at ``qs_ptr + offs_m``.
    """
    SUB: tl.constexpr = BLOCK // BLOCK_M
    tl.assume(it >= 0)  # the sub-tile split is a shift and a mask
    j = it // SUB
    r_in = (it % SUB) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    qb = tl.load(Idx + lst + j)
    offs_m = qb.to(tl.int64) * BLOCK + r_in
    if GATHER:
        q_row = tl.load(Rows + offs_m)
        q_ok = q_row >= 0
        q_row = tl.maximum(q_row, 0).to(tl.int64)
        qT = tl.load(q_base + q_row[None, :] * s_qs + offs_d[:, None], mask=q_ok[None, :], other=0.0)
        do = tl.load(do_base + q_row[:, None] * s_ds + offs_d[None, :], mask=q_ok[:, None], other=0.0)
    elif USE_TMA:
        row0 = qb * BLOCK + (it % SUB) * BLOCK_M
        qT = q_base.load([row0, 0]).T
        do = do_base.load([row0, 0])
    else:  # kernel order: every position of [0, S_pad) is a row, no predicate registers
        qT = tl.load(q_base + offs_m[None, :] * s_qs + offs_d[:, None])
        do = tl.load(do_base + offs_m[:, None] * s_ds + offs_d[None, :])
    m = tl.load(Lse + row_base + offs_m) * 1.4426950408889634
    m = tl.where(m == float("-inf"), float("inf"), m)  # rows that saw no key: p = 0
    di = tl.load(Delta + row_base + offs_m)
    if HAS_QSEL and not MASKED:
        # Whole block: a query that does not select it subtracts +inf (p = 0), no 2-D select.
        m = tl.where(tl.load(qs_ptr + offs_m) != 0, m, float("inf"))
    pT = tl.math.exp2(tl.dot(k, qT, input_precision=PREC) * qk_scale - m[None, :])
    if MASKED:
        mid = tl.load(Mid + lst + j)
        if MASKED == 2:  # padding only: 1-D validity (see _fwd_tile)
            if GATHER:
                q_in = q_ok
            else:
                q_in = tl.load(Valid + offs_m) != 0
            keepT = k_valid[:, None] & (q_in[None, :] | (mid == -2))
        elif MASK_TMA:
            mt = m_desc.load([tl.maximum(mid, 0) * BLOCK + (it % SUB) * BLOCK_M, c_in0])
            keepT = (mt.T != 0) | (mid < 0)
        else:
            m_ptr = Masks + tl.maximum(mid, 0).to(tl.int64) * (BLOCK * BLOCK) + r_in[None, :] * BLOCK + c_in[:, None]
            has = (r_in[None, :] * 0 + c_in[:, None] * 0 + mid) >= 0
            keepT = tl.load(m_ptr, mask=has, other=1) != 0
        if HAS_QSEL:
            keepT = keepT & (tl.load(qs_ptr + offs_m) != 0)[None, :]
        pT = tl.where(keepT, pT, 0.0)
    dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=PREC)
    dpT = tl.dot(v, tl.trans(do), input_precision=PREC)
    dsT = pT * (dpT - di[None, :])
    dk = tl.dot(dsT.to(qT.dtype), tl.trans(qT), dk, input_precision=PREC)
    return dk, dv


@triton.jit
def _dq_tile(
    dq, q, do, m, di, it, lst, r_in, r_in0, k_base, v_base, kv_ptr, qs_ptr, m_desc, q_valid,
    Rows, Valid, Idx, Mid, Masks, KGroup, s_ks, s_vs, s_sg, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, BLOCK_N: tl.constexpr, GATHER: tl.constexpr,
    MASKED: tl.constexpr, HAS_KV: tl.constexpr, HAS_QSEL: tl.constexpr, PREC: tl.constexpr, MASK_TMA: tl.constexpr,
    USE_TMA: tl.constexpr,
):  # fmt: skip
    """dQ contribution of key sub-tile ``it`` of a query tile's list (with ``USE_TMA``,
    ``k_base`` / ``v_base`` are tensor descriptors of contiguous kernel-order K and V)."""
    SUB: tl.constexpr = BLOCK // BLOCK_N
    tl.assume(it >= 0)  # the sub-tile split is a shift and a mask
    j = it // SUB
    c_in = (it % SUB) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    kb = tl.load(Idx + lst + j)
    offs_n = kb.to(tl.int64) * BLOCK + c_in
    if USE_TMA:
        row0 = kb * BLOCK + (it % SUB) * BLOCK_N
        kT = k_base.load([row0, 0]).T
        vT = v_base.load([row0, 0]).T
        k_ok = c_in >= 0
    else:
        if GATHER:
            k_row = tl.load(Rows + offs_n)
            k_ok = k_row >= 0
            k_row = tl.maximum(k_row, 0).to(tl.int64)
        else:
            k_row = offs_n
            k_ok = offs_n >= 0
        kT = tl.load(k_base + k_row[None, :] * s_ks + offs_d[:, None], mask=k_ok[None, :], other=0.0)
        vT = tl.load(v_base + k_row[None, :] * s_vs + offs_d[:, None], mask=k_ok[None, :], other=0.0)
    if HAS_QSEL and not MASKED:
        # Whole block: a row that does not select it subtracts +inf (p = 0), no 2-D select.
        m = tl.where(tl.load(qs_ptr + tl.load(KGroup + kb) * s_sg) != 0, m, float("inf"))
    p = tl.math.exp2(tl.dot(q, kT, input_precision=PREC) * qk_scale - m[:, None])
    if MASKED:
        mid = tl.load(Mid + lst + j)
        if MASKED == 2:  # padding only: 1-D validity (see _fwd_tile)
            if GATHER:
                k_in = k_ok
            else:
                k_in = tl.load(Valid + offs_n) != 0
            keep = k_in[None, :] & (q_valid[:, None] | (mid == -2))
        elif MASK_TMA:
            mt = m_desc.load([tl.maximum(mid, 0) * BLOCK + r_in0, (it % SUB) * BLOCK_N])
            keep = (mt != 0) | (mid < 0)
        else:
            m_ptr = Masks + tl.maximum(mid, 0).to(tl.int64) * (BLOCK * BLOCK) + r_in[:, None] * BLOCK + c_in[None, :]
            has = (r_in[:, None] * 0 + c_in[None, :] * 0 + mid) >= 0
            keep = tl.load(m_ptr, mask=has, other=1) != 0
        if HAS_KV:
            keep = keep & (tl.load(kv_ptr + offs_n) != 0)[None, :]
        if HAS_QSEL:
            keep = keep & (tl.load(qs_ptr + tl.load(KGroup + kb) * s_sg) != 0)[:, None]
        p = tl.where(keep, p, 0.0)
    dp = tl.dot(do, vT, input_precision=PREC)
    ds = p * (dp - di[:, None])
    return tl.dot(ds.to(kT.dtype), tl.trans(kT), dq, input_precision=PREC)


# -- kernels -------------------------------------------------------------------------------


@triton.jit
def _fwd_kernel(
    Q, K, V, Out, Lse, Rows, Valid,
    Idx, Mid, NElem, NMask, NAll, Masks, KeyValid, QSel, KGroup, QOrder,
    sm_scale,
    s_qb, s_qs, s_qh, s_kb, s_ks, s_kh, s_vb, s_vs, s_vh, s_ob, s_os, s_oh,
    s_ib, s_ih, s_iq, s_nb, s_nh, s_kvb, s_sb, s_sh, s_sg,
    H, S_PAD, N_MASKS,
    HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    GATHER: tl.constexpr, HAS_KV: tl.constexpr, HAS_QSEL: tl.constexpr, PREC: tl.constexpr,
    USE_TMA: tl.constexpr, MASK_TMA: tl.constexpr, NEG_SCALE: tl.constexpr,
):  # fmt: skip
    """Output and log-sum-exp of BLOCK_M query rows.

    Grid (B*H, query tiles): the linear launch order runs every head of a tile slot before the
    next slot, and ``QOrder`` maps slots to plan query blocks longest key list first, so the
    longest programs (e.g. text rows that attend every block) start first, not in the tail.
    """
    SUB: tl.constexpr = BLOCK // BLOCK_N
    SUB_M: tl.constexpr = BLOCK // BLOCK_M
    pid_bh = tl.program_id(0)
    slot = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    qb = tl.load(QOrder + slot // SUB_M)
    start_m = qb * BLOCK + (slot % SUB_M) * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    r_in = start_m % BLOCK + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    if GATHER:
        q_row, q_ok = caller_rows(Rows, offs_m)
    else:
        q_row = offs_m.to(tl.int64)
        q_ok = offs_m >= 0
    q = row_tile(Q + b * s_qb + h * s_qh, q_row, q_ok, s_qs, HEAD_DIM)
    k_base = K + b * s_kb + h * s_kh
    v_base = V + b * s_vb + h * s_vh
    if USE_TMA:
        k_desc = tl.make_tensor_descriptor(
            k_base, shape=[S_PAD, HEAD_DIM], strides=[s_ks, 1], block_shape=[BLOCK_N, HEAD_DIM]
        )
        v_desc = tl.make_tensor_descriptor(
            v_base, shape=[S_PAD, HEAD_DIM], strides=[s_vs, 1], block_shape=[BLOCK_N, HEAD_DIM]
        )
    else:
        k_desc = k_base
        v_desc = v_base
    if MASK_TMA:
        m_desc = tl.make_tensor_descriptor(
            Masks, shape=[N_MASKS * BLOCK, BLOCK], strides=[BLOCK, 1], block_shape=[BLOCK_M, BLOCK_N]
        )
    else:
        m_desc = Masks
    r_in0 = start_m % BLOCK
    lst = b * s_ib + h * s_ih + qb * s_iq
    cnt = b * s_nb + h * s_nh + qb
    n_elem = tl.load(NElem + cnt)
    n_mask = tl.load(NMask + cnt)
    n_all = tl.load(NAll + cnt)
    qs_ptr = QSel + b * s_sb + h * s_sh + offs_m  # group-major selection: the tile's rows are contiguous
    kv_ptr = KeyValid + b * s_kvb
    qk_scale = sm_scale * 1.4426950408889634

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    if GATHER:
        q_valid = q_ok
    else:
        q_valid = tl.load(Valid + offs_m) != 0
    # Blocks under an element mask (or run-time key validity) first, then blocks partial only
    # through padding (1-D validity test), then whole blocks.
    for it in range(0, n_elem * SUB):
        acc, l_i, m_i = _fwd_tile(
            acc, l_i, m_i, q, it, lst, r_in, r_in0, k_base, v_base, k_desc, v_desc, m_desc, kv_ptr, qs_ptr, q_valid, Rows,
            Valid, Idx, Mid, Masks, KGroup, s_ks, s_vs, s_sg, qk_scale, HEAD_DIM, BLOCK, BLOCK_N, GATHER, 1, HAS_KV, HAS_QSEL,
            PREC, USE_TMA, MASK_TMA, NEG_SCALE,
        )  # fmt: skip
    # Padding-only blocks (kernel order only: with a row gather they stay in the element
    # loop, whose 2-loop build is spill-free at the shipped configs; a third loop is not).
    if not GATHER:
        for it in range(n_elem * SUB, n_mask * SUB):
            acc, l_i, m_i = _fwd_tile(
                acc, l_i, m_i, q, it, lst, r_in, r_in0, k_base, v_base, k_desc, v_desc, m_desc, kv_ptr, qs_ptr, q_valid, Rows,
                Valid, Idx, Mid, Masks, KGroup, s_ks, s_vs, s_sg, qk_scale, HEAD_DIM, BLOCK, BLOCK_N, GATHER, 2, HAS_KV, HAS_QSEL,
                PREC, USE_TMA, MASK_TMA, NEG_SCALE,
            )  # fmt: skip
    for it in range(n_mask * SUB, n_all * SUB):
        acc, l_i, m_i = _fwd_tile(
            acc, l_i, m_i, q, it, lst, r_in, r_in0, k_base, v_base, k_desc, v_desc, m_desc, kv_ptr, qs_ptr, q_valid, Rows,
            Valid, Idx, Mid, Masks, KGroup, s_ks, s_vs, s_sg, qk_scale, HEAD_DIM, BLOCK, BLOCK_N, GATHER, 0, HAS_KV, HAS_QSEL,
            PREC, USE_TMA, MASK_TMA, NEG_SCALE,
        )  # fmt: skip

    seen = l_i > 0.0  # rows with no visible key: out 0, lse -inf
    l_safe = tl.where(seen, l_i, 1.0)
    out = acc / l_safe[:, None]
    lse = tl.where(seen, (m_i + tl.math.log2(l_safe)) * 0.6931471805599453, float("-inf"))
    tl.store(Lse + pid_bh.to(tl.int64) * S_PAD + offs_m, lse)
    o_ptr = Out + b * s_ob + h * s_oh + q_row[:, None] * s_os + offs_d[None, :]
    tl.store(o_ptr, out.to(Out.dtype.element_ty), mask=q_ok[:, None])


@triton.jit
def _bwd_preprocess(
    Out, DO, DLse, Delta, Rows,
    s_ob, s_os, s_oh, s_db, s_ds, s_dh,
    H, S_PAD,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, GATHER: tl.constexpr, HAS_DLSE: tl.constexpr,
):  # fmt: skip
    """delta = rowsum(dO * O) - dLSE in kernel order; 0 on padding rows."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    if GATHER:
        row, ok = caller_rows(Rows, offs_m)
    else:
        row = offs_m.to(tl.int64)
        ok = offs_m >= 0
    o = row_tile(Out + b * s_ob + h * s_oh, row, ok, s_os, HEAD_DIM)
    do = row_tile(DO + b * s_db + h * s_dh, row, ok, s_ds, HEAD_DIM)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    if HAS_DLSE:
        delta -= tl.load(DLse + pid_bh.to(tl.int64) * S_PAD + offs_m)
    delta = tl.where(ok, delta, 0.0)
    tl.store(Delta + pid_bh.to(tl.int64) * S_PAD + offs_m, delta)


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, DO, DK, DV, Lse, Delta, Rows, Valid,
    Idx, Mid, NElem, NMask, NAll, Masks, KeyValid, QSel, KGroup,
    sm_scale,
    s_qb, s_qs, s_qh, s_kb, s_ks, s_kh, s_vb, s_vs, s_vh, s_db, s_ds, s_dh, s_gb, s_gs, s_gh,
    s_ib, s_ih, s_iq, s_nb, s_nh, s_kvb, s_sb, s_sh, s_sg,
    H, S_PAD, N_MASKS,
    HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    GATHER: tl.constexpr, HAS_KV: tl.constexpr, HAS_QSEL: tl.constexpr, PREC: tl.constexpr, MASK_TMA: tl.constexpr,
    USE_TMA: tl.constexpr,
):  # fmt: skip
    """dK, dV of BLOCK_N keys, walking the transposed plan (query blocks listing this key block)."""
    SUB: tl.constexpr = BLOCK // BLOCK_M
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    start_n = pid_n * BLOCK_N
    kb = start_n // BLOCK
    offs_n = start_n + tl.arange(0, BLOCK_N)
    c_in = start_n % BLOCK + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    if GATHER:
        k_row, k_ok = caller_rows(Rows, offs_n)
    else:
        k_row = offs_n.to(tl.int64)
        k_ok = offs_n >= 0
    k = row_tile(K + b * s_kb + h * s_kh, k_row, k_ok, s_ks, HEAD_DIM)
    v = row_tile(V + b * s_vb + h * s_vh, k_row, k_ok, s_vs, HEAD_DIM)
    q_base = Q + b * s_qb + h * s_qh
    do_base = DO + b * s_db + h * s_dh
    if USE_TMA:  # contiguous kernel order: Q and dO tiles by the tensor-memory accelerator
        q_src = tl.make_tensor_descriptor(
            q_base, shape=[S_PAD, HEAD_DIM], strides=[s_qs, 1], block_shape=[BLOCK_M, HEAD_DIM]
        )
        do_src = tl.make_tensor_descriptor(
            do_base, shape=[S_PAD, HEAD_DIM], strides=[s_ds, 1], block_shape=[BLOCK_M, HEAD_DIM]
        )
    else:
        q_src = q_base
        do_src = do_base
    row_base = pid_bh.to(tl.int64) * S_PAD
    lst = b * s_ib + h * s_ih + kb * s_iq
    cnt = b * s_nb + h * s_nh + kb
    n_elem = tl.load(NElem + cnt)
    n_mask = tl.load(NMask + cnt)
    n_all = tl.load(NAll + cnt)
    if HAS_QSEL:
        qs_ptr = QSel + b * s_sb + h * s_sh + tl.load(KGroup + kb) * s_sg  # this key tile's group row
    else:
        qs_ptr = QSel
    qk_scale = sm_scale * 1.4426950408889634
    if MASK_TMA:
        m_desc = tl.make_tensor_descriptor(
            Masks, shape=[N_MASKS * BLOCK, BLOCK], strides=[BLOCK, 1], block_shape=[BLOCK_M, BLOCK_N]
        )
    else:
        m_desc = Masks
    c_in0 = start_n % BLOCK

    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    if GATHER:
        k_valid = k_ok
    else:
        k_valid = tl.load(Valid + offs_n) != 0
    for it in range(0, n_elem * SUB):
        dk, dv = _dkdv_tile(
            dk, dv, k, v, it, lst, c_in, c_in0, q_src, do_src, row_base, qs_ptr, m_desc, k_valid, Rows, Valid, Idx, Mid,
            Masks, Lse, Delta, s_qs, s_ds, qk_scale, HEAD_DIM, BLOCK, BLOCK_M, GATHER, 1, HAS_QSEL, PREC,
            MASK_TMA, USE_TMA,
        )  # fmt: skip
    # Padding-only blocks (kernel order only: with a row gather they stay in the element
    # loop, whose 2-loop build is spill-free at the shipped configs; a third loop is not).
    if not GATHER:
        for it in range(n_elem * SUB, n_mask * SUB):
            dk, dv = _dkdv_tile(
                dk, dv, k, v, it, lst, c_in, c_in0, q_src, do_src, row_base, qs_ptr, m_desc, k_valid, Rows, Valid, Idx, Mid,
                Masks, Lse, Delta, s_qs, s_ds, qk_scale, HEAD_DIM, BLOCK, BLOCK_M, GATHER, 2, HAS_QSEL, PREC,
                MASK_TMA, USE_TMA,
            )  # fmt: skip
    for it in range(n_mask * SUB, n_all * SUB):
        dk, dv = _dkdv_tile(
            dk, dv, k, v, it, lst, c_in, c_in0, q_src, do_src, row_base, qs_ptr, m_desc, k_valid, Rows, Valid, Idx, Mid,
            Masks, Lse, Delta, s_qs, s_ds, qk_scale, HEAD_DIM, BLOCK, BLOCK_M, GATHER, 0, HAS_QSEL, PREC,
            MASK_TMA, USE_TMA,
        )  # fmt: skip

    dk *= sm_scale
    if HAS_KV:
        # A key masked out at run time gets exactly zero gradient: masking its whole column.
        kv = (tl.load(KeyValid + b * s_kvb + offs_n) != 0)[:, None]
        dk = tl.where(kv, dk, 0.0)
        dv = tl.where(kv, dv, 0.0)
    g_off = b * s_gb + h * s_gh + k_row[:, None] * s_gs + offs_d[None, :]
    tl.store(DK + g_off, dk.to(DK.dtype.element_ty), mask=k_ok[:, None])
    tl.store(DV + g_off, dv.to(DV.dtype.element_ty), mask=k_ok[:, None])


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, DO, DQ, Lse, Delta, Rows, Valid,
    Idx, Mid, NElem, NMask, NAll, Masks, KeyValid, QSel, KGroup,
    sm_scale,
    s_qb, s_qs, s_qh, s_kb, s_ks, s_kh, s_vb, s_vs, s_vh, s_db, s_ds, s_dh, s_gb, s_gs, s_gh,
    s_ib, s_ih, s_iq, s_nb, s_nh, s_kvb, s_sb, s_sh, s_sg,
    H, S_PAD, N_MASKS,
    HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    GATHER: tl.constexpr, HAS_KV: tl.constexpr, HAS_QSEL: tl.constexpr, PREC: tl.constexpr, MASK_TMA: tl.constexpr,
    USE_TMA: tl.constexpr,
):  # fmt: skip
    """dQ of BLOCK_M queries, walking the forward key lists."""
    SUB: tl.constexpr = BLOCK // BLOCK_N
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    start_m = pid_m * BLOCK_M
    qb = start_m // BLOCK
    offs_m = start_m + tl.arange(0, BLOCK_M)
    r_in = start_m % BLOCK + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    if GATHER:
        q_row, q_ok = caller_rows(Rows, offs_m)
    else:
        q_row = offs_m.to(tl.int64)
        q_ok = offs_m >= 0
    q = row_tile(Q + b * s_qb + h * s_qh, q_row, q_ok, s_qs, HEAD_DIM)
    do = row_tile(DO + b * s_db + h * s_dh, q_row, q_ok, s_ds, HEAD_DIM)
    row_base = pid_bh.to(tl.int64) * S_PAD
    m = tl.load(Lse + row_base + offs_m) * 1.4426950408889634
    m = tl.where(m == float("-inf"), float("inf"), m)  # rows that saw no key: p = 0
    di = tl.load(Delta + row_base + offs_m)
    k_base = K + b * s_kb + h * s_kh
    v_base = V + b * s_vb + h * s_vh
    if USE_TMA:  # contiguous kernel order: K and V tiles by the tensor-memory accelerator
        k_src = tl.make_tensor_descriptor(
            k_base, shape=[S_PAD, HEAD_DIM], strides=[s_ks, 1], block_shape=[BLOCK_N, HEAD_DIM]
        )
        v_src = tl.make_tensor_descriptor(
            v_base, shape=[S_PAD, HEAD_DIM], strides=[s_vs, 1], block_shape=[BLOCK_N, HEAD_DIM]
        )
    else:
        k_src = k_base
        v_src = v_base
    lst = b * s_ib + h * s_ih + qb * s_iq
    cnt = b * s_nb + h * s_nh + qb
    n_elem = tl.load(NElem + cnt)
    n_mask = tl.load(NMask + cnt)
    n_all = tl.load(NAll + cnt)
    qs_ptr = QSel + b * s_sb + h * s_sh + offs_m  # group-major selection: the tile's rows are contiguous
    kv_ptr = KeyValid + b * s_kvb
    qk_scale = sm_scale * 1.4426950408889634
    if MASK_TMA:
        m_desc = tl.make_tensor_descriptor(
            Masks, shape=[N_MASKS * BLOCK, BLOCK], strides=[BLOCK, 1], block_shape=[BLOCK_M, BLOCK_N]
        )
    else:
        m_desc = Masks
    r_in0 = start_m % BLOCK

    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    if GATHER:
        q_valid = q_ok
    else:
        q_valid = tl.load(Valid + offs_m) != 0
    for it in range(0, n_elem * SUB):
        dq = _dq_tile(
            dq, q, do, m, di, it, lst, r_in, r_in0, k_src, v_src, kv_ptr, qs_ptr, m_desc, q_valid, Rows, Valid, Idx, Mid,
            Masks, KGroup, s_ks, s_vs, s_sg, qk_scale, HEAD_DIM, BLOCK, BLOCK_N, GATHER, 1, HAS_KV, HAS_QSEL, PREC, MASK_TMA, USE_TMA,
        )  # fmt: skip
    # Padding-only blocks (kernel order only: with a row gather they stay in the element
    # loop, whose 2-loop build is spill-free at the shipped configs; a third loop is not).
    if not GATHER:
        for it in range(n_elem * SUB, n_mask * SUB):
            dq = _dq_tile(
                dq, q, do, m, di, it, lst, r_in, r_in0, k_src, v_src, kv_ptr, qs_ptr, m_desc, q_valid, Rows, Valid, Idx, Mid,
                Masks, KGroup, s_ks, s_vs, s_sg, qk_scale, HEAD_DIM, BLOCK, BLOCK_N, GATHER, 2, HAS_KV, HAS_QSEL, PREC, MASK_TMA, USE_TMA,
            )  # fmt: skip
    for it in range(n_mask * SUB, n_all * SUB):
        dq = _dq_tile(
            dq, q, do, m, di, it, lst, r_in, r_in0, k_src, v_src, kv_ptr, qs_ptr, m_desc, q_valid, Rows, Valid, Idx, Mid,
            Masks, KGroup, s_ks, s_vs, s_sg, qk_scale, HEAD_DIM, BLOCK, BLOCK_N, GATHER, 0, HAS_KV, HAS_QSEL, PREC, MASK_TMA, USE_TMA,
        )  # fmt: skip

    dq *= sm_scale
    g_off = b * s_gb + h * s_gh + q_row[:, None] * s_gs + offs_d[None, :]
    tl.store(DQ + g_off, dq.to(DQ.dtype.element_ty), mask=q_ok[:, None])


# -- configurations ------------------------------------------------------------------------

INTERPRETED = not isinstance(_fwd_kernel, triton.runtime.JITFunction)


@dataclass(frozen=True)
class TileConfig:
    """Tile shape and launch knobs of one kernel launch."""

    block_m: int
    block_n: int
    num_warps: int = 4
    num_stages: int = 3

    def kwargs(self) -> dict:
        return {
            "BLOCK_M": self.block_m,
            "BLOCK_N": self.block_n,
            "num_warps": self.num_warps,
            "num_stages": self.num_stages,
        }


# (BLOCK_M, BLOCK_N, warps, stages) per head dim, the first being the default without autotune.
# Seeded from the Triton tutorial and FlexAttention's H100 defaults, then kept only if the
# sm_90 build (compiled offline with Triton 3.9's ptxas) has no register spills and fits
# shared memory (128x32/w4 forward spilled and is gone). BLOCK_M/BLOCK_N above the plan
# block size are clipped at launch.
_FWD_SPACE = {
    64: [(128, 64, 4, 3), (128, 128, 8, 3), (128, 64, 8, 3), (64, 64, 4, 3), (128, 32, 4, 4)],
    128: [
        (128, 64, 8, 3),
        (128, 128, 8, 3, "order"),
        (128, 64, 8, 2),
        (64, 64, 4, 3, "order"),
        # Per-query selection, whole-block loop in kernel order: 1.04-1.06x the tutorial's at
        # 128x64/s2 and 64x128/s2 (triton 3.6 and 3.9), 1.11-1.14x at 64x64, kept for the
        # autotuner (the fewest registers, 128, and 86 KB of shared memory).
        (128, 64, 8, 2, "qsel"),
        (64, 128, 8, 2, "qsel"),
        (64, 64, 8, 3, "qsel"),
    ],
    256: [(64, 32, 4, 3), (64, 64, 8, 2), (128, 32, 8, 2), (64, 32, 8, 3)],
}
# dK/dV walks query tiles (BLOCK_M) for a fixed key tile (BLOCK_N); dQ the other way round.
# Head dim 128 (every supported video model) is checked by benchmarks/offline_compile.py
# (results/offline_sm90.json); a 5th element ships an entry for one path only: "order"
# (contiguous kernel order), "gather" (caller-order rows) or "qsel" (per-query selection,
# either order; where a space has "qsel" entries they replace the others for that path:
# the selection's loads cost registers: with the row gather, 64x64 dK/dV spills 12 B under
# triton 3.6).
_DKDV_SPACE = {
    64: [(64, 128, 8, 3), (64, 64, 4, 3), (32, 64, 4, 4), (32, 128, 4, 3)],
    # 64x64 with the row gather and a per-query selection: 255 registers as launched, 84 B spilled without launch hints.
    128: [(32, 64, 8, 3), (64, 64, 8, 3, "gather"), (32, 64, 8, 3, "qsel")],
    256: [(32, 32, 8, 3), (64, 32, 8, 2), (32, 32, 4, 3)],
}
_DQ_SPACE = {
    64: [(128, 32, 4, 3), (128, 64, 8, 3), (64, 64, 4, 3), (64, 32, 4, 4)],
    # 128x64, 128x32 and 64x32/w4 spilled (4-16 B) once dQ in kernel order got its padding-only loop.
    128: [(64, 64, 8, 3), (64, 32, 8, 3, "qsel")],
    256: [(64, 32, 8, 2), (32, 32, 4, 3), (32, 64, 8, 2)],
}


#: role -> (JIT kernel, autotune space), for tools that compile the kernels ahead of time
#: (benchmarks/offline_compile.py reads registers, spills and SASS per shipped config).
KERNELS = {
    "fwd": (_fwd_kernel, _FWD_SPACE),
    "dkdv": (_bwd_dkdv_kernel, _DKDV_SPACE),
    "dq": (_bwd_dq_kernel, _DQ_SPACE),
}


def _space_for(space: dict, head_dim: int) -> list[tuple[int, int, int, int]]:
    return space[64 if head_dim <= 64 else 128 if head_dim <= 128 else 256]


def _fit(cfg: tuple, block: int, itemsize: int) -> TileConfig:
    bm, bn, w, s = cfg[:4]
    if itemsize >= 4:  # fp32 (ieee dots) needs twice the shared memory: halve the tiles
        bm, bn = max(16, bm // 2), max(16, bn // 2)
    return TileConfig(min(bm, block), min(bn, block), w, s)


def candidates(
    space: dict, head_dim: int, block: int, itemsize: int, gather: bool | None = None, qsel: bool = False
) -> list[TileConfig]:
    """Distinct tile configs of a search space that fit the plan block size (in order).

    An entry tagged ``"order"`` or ``"gather"`` (5th element) is shipped only for that path
    (contiguous kernel order, or the caller-order row gather): its register budget differs.
    With ``qsel`` (per-query selection) the ``"qsel"`` entries are the whole list when the
    space has any; they are never used without it. ``gather=None`` lists every entry.
    """
    out: list[TileConfig] = []
    entries = _space_for(space, head_dim)
    if gather is not None:
        tagged_qsel = [cfg for cfg in entries if len(cfg) > 4 and cfg[4] == "qsel"]
        if qsel and tagged_qsel:
            entries = tagged_qsel
        else:
            path = "gather" if gather else "order"
            entries = [cfg for cfg in entries if len(cfg) == 4 or cfg[4] == path]
    for cfg in entries:
        c = _fit(cfg, block, itemsize)
        if c not in out:
            out.append(c)
    return out


def _prune(space: dict):
    def prune(configs, named_args, **kwargs):
        q = named_args["Q"]
        block = named_args.get("BLOCK", kwargs.get("BLOCK"))
        head_dim = named_args.get("HEAD_DIM", kwargs.get("HEAD_DIM"))
        gather = named_args.get("GATHER", kwargs.get("GATHER"))
        qsel = named_args.get("HAS_QSEL", kwargs.get("HAS_QSEL"))
        allowed = set(candidates(space, head_dim, block, q.element_size(), bool(gather), bool(qsel)))
        kept = [
            c
            for c in configs
            if TileConfig(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) in allowed
        ]
        if not kept:  # cannot happen: _all_configs holds every candidate
            raise RuntimeError(f"no Triton config fits head dim {head_dim} and block {block}")
        return kept

    return prune


def _all_configs(space: dict) -> list[triton.Config]:
    seen, out = set(), []
    for head_dim in (64, 128, 256):
        for block in (16, 32, 64, 128, 256):
            for itemsize in (2, 4):
                for c in candidates(space, head_dim, block, itemsize):
                    if c not in seen:
                        seen.add(c)
                        out.append(
                            triton.Config(
                                {"BLOCK_M": c.block_m, "BLOCK_N": c.block_n},
                                num_warps=c.num_warps,
                                num_stages=c.num_stages,
                            )
                        )
    return out


_KEY = ["HEAD_DIM", "BLOCK", "GATHER", "HAS_KV", "HAS_QSEL", "S_PAD"]


def _tuned(kernel, space):
    key = _KEY + [n for n in ("USE_TMA", "MASK_TMA") if n in kernel.arg_names]
    return triton.autotune(
        configs=_all_configs(space), key=key, prune_configs_by={"early_config_prune": _prune(space)}
    )(kernel)


_fwd_tuned = _tuned(_fwd_kernel, _FWD_SPACE)
_dkdv_tuned = _tuned(_bwd_dkdv_kernel, _DKDV_SPACE)
_dq_tuned = _tuned(_bwd_dq_kernel, _DQ_SPACE)


def autotune_enabled() -> bool:
    """Autotune on real GPUs unless VIDSPARSE_TRITON_AUTOTUNE=0 (the interpreter never tunes)."""
    return not INTERPRETED and os.environ.get("VIDSPARSE_TRITON_AUTOTUNE", "1") != "0"


_FORCED: dict[str, TileConfig] = {}


@contextlib.contextmanager
def force_configs(fwd: TileConfig | None = None, dkdv: TileConfig | None = None, dq: TileConfig | None = None):
    """Run the kernels with fixed tiles inside the block (tests of sub-tiling, manual tuning)."""
    saved = dict(_FORCED)
    _FORCED.update({k: v for k, v in (("fwd", fwd), ("dkdv", dkdv), ("dq", dq)) if v is not None})
    try:
        yield
    finally:
        _FORCED.clear()
        _FORCED.update(saved)


def _launch(
    kernel,
    tuned,
    space,
    grid_rows: int,
    bh: int,
    args: tuple,
    consts: dict,
    q: torch.Tensor,
    block: int,
    config: TileConfig | None,
    tile_of_grid: str,
    role: str,
    heads_first: bool = False,
):
    head_dim = consts["HEAD_DIM"]
    config = config or _FORCED.get(role)
    if config is not None and (block % config.block_m or block % config.block_n):
        raise ValueError(f"Tile {config} does not divide the plan block size {block}.")

    def grid(tiles: int) -> tuple[int, int]:
        return (bh, tiles) if heads_first else (tiles, bh)

    if config is None and autotune_enabled():
        tuned[lambda meta: grid(grid_rows // meta[tile_of_grid])](*args, **consts)
        return
    if config is None:
        gather, qsel = bool(consts["GATHER"]), bool(consts["HAS_QSEL"])
        config = candidates(space, head_dim, block, q.element_size(), gather, qsel)[0]
        if INTERPRETED:  # the interpreter is fastest with the biggest tiles
            config = TileConfig(min(block, 64), min(block, 64))
    tile = config.block_m if tile_of_grid == "BLOCK_M" else config.block_n
    kernel[grid(grid_rows // tile)](*args, **consts, **config.kwargs())


def tma_ok(t: torch.Tensor) -> bool:
    """Whether [B, S, H, D] ``t`` can be read by tensor descriptors: unit last stride, 16-byte
    aligned base and row/head/batch strides (TMA's rules)."""
    es = t.element_size()
    return (
        t.stride(-1) == 1
        and t.data_ptr() % 16 == 0
        and all((t.stride(i) * es) % 16 == 0 or t.shape[i] == 1 for i in range(3))
    )


def tma_enabled(device: torch.device) -> bool:
    """TMA descriptors on Hopper and newer (and in the interpreter) unless VIDSPARSE_TRITON_TMA=0."""
    if os.environ.get("VIDSPARSE_TRITON_TMA", "1") == "0":
        return False
    if INTERPRETED:
        return True
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (9, 0)


_ALLOCATOR_SET = False


def ensure_allocator() -> None:
    """Device-side tensor descriptors live in a small global scratch buffer that Triton asks
    the host to allocate; hand it torch's caching allocator (once)."""
    global _ALLOCATOR_SET
    if _ALLOCATOR_SET or INTERPRETED:
        return

    def alloc(size: int, alignment: int, stream):
        return torch.empty(size, dtype=torch.int8, device="cuda")

    triton.set_allocator(alloc)
    _ALLOCATOR_SET = True


# -- launchers -----------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class PlanArgs:
    """Device tensors a launch needs besides q/k/v (see ``triton_backend``)."""

    rows: torch.Tensor | None  # int32 [S_pad] or None (kernel order = caller order)
    lists: object  # BlockLists, query-major
    masks: torch.Tensor  # uint8 [P, bs, bs]
    key_valid: torch.Tensor | None  # uint8 [B, S_pad]
    query_select: torch.Tensor | None  # uint8 [B, H, S_pad, G], group-major: row stride 1 (``group_major``)
    key_group: torch.Tensor | None  # int32 [NK]
    block: int
    padded_len: int
    query_order: torch.Tensor | None = None  # int32 [NQ]: query blocks, longest key list first
    valid: torch.Tensor | None = None  # uint8 [S_pad]: real token (1) or padding (0), for padding-only blocks


def _list_strides(lists) -> tuple[int, int, int, int, int]:
    idx, n = lists.idx, lists.n_total
    sb = idx.stride(0) if idx.shape[0] > 1 else 0
    sh = idx.stride(1) if idx.shape[1] > 1 else 0
    nb = n.stride(0) if n.shape[0] > 1 else 0
    nh = n.stride(1) if n.shape[1] > 1 else 0
    return sb, sh, idx.stride(2), nb, nh


def _common(p: PlanArgs, lists, dummy: torch.Tensor):
    kv = p.key_valid if p.key_valid is not None else dummy
    qs = p.query_select if p.query_select is not None else dummy
    kg = p.key_group if p.key_group is not None else dummy
    rows = p.rows if p.rows is not None else dummy
    s_kvb = kv.stride(0) if p.key_valid is not None else 0
    if p.query_select is not None:
        if qs.stride(2) != 1:
            raise ValueError(
                f"query_select must be group-major (row stride 1; triton_backend builds that view), got strides "
                f"{tuple(qs.stride())}."
            )
        s_sb, s_sh, s_sg = qs.stride(0), qs.stride(1), qs.stride(3)
    else:
        s_sb = s_sh = s_sg = 0
    tensors = (lists.idx, lists.mid, lists.n_elem, lists.n_masked, lists.n_total, p.masks, kv, qs, kg)
    strides = (*_list_strides(lists), s_kvb, s_sb, s_sh, s_sg)
    return rows, tensors, strides


def _flags(q: torch.Tensor, p: PlanArgs) -> dict:
    return {
        "HEAD_DIM": q.shape[-1],
        "BLOCK": p.block,
        "GATHER": p.rows is not None,
        "HAS_KV": p.key_valid is not None,
        "HAS_QSEL": p.query_select is not None,
        "PREC": "ieee" if q.dtype == torch.float32 else "tf32",
    }


def _bsh(t: torch.Tensor) -> tuple[int, int, int]:
    """(batch, sequence, head) strides of a [B, S, H, D] tensor."""
    return t.stride(0), t.stride(1), t.stride(2)


def forward(q, k, v, p: PlanArgs, scale: float, config: TileConfig | None = None):
    """q, k, v [B, S, H, D] (D contiguous) -> out [B, S, H, D], lse fp32 [B, H, S_pad]."""
    B, _, H, _ = q.shape
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(B, H, p.padded_len, dtype=torch.float32, device=q.device)
    dummy = torch.empty(1, dtype=torch.int32, device=q.device)  # never read: its flag is off
    rows, tensors, strides = _common(p, p.lists, dummy)
    order = p.query_order if p.query_order is not None else longest_first(p.lists)
    valid = p.valid if p.valid is not None else dummy
    args = (q, k, v, out, lse, rows, valid, *tensors, order, scale, *_bsh(q), *_bsh(k), *_bsh(v), *_bsh(out), *strides, H,
            p.padded_len, p.masks.shape[0])  # fmt: skip
    tma = tma_enabled(q.device)
    use_tma = p.rows is None and tma and tma_ok(k) and tma_ok(v)
    mask_tma = tma and p.masks.is_contiguous() and p.masks.data_ptr() % 16 == 0
    if use_tma or mask_tma:
        ensure_allocator()
    flags = {**_flags(q, p), "USE_TMA": use_tma, "MASK_TMA": mask_tma, "NEG_SCALE": scale < 0}
    _launch(_fwd_kernel, _fwd_tuned, _FWD_SPACE, p.padded_len, B * H, args, flags, q, p.block, config, "BLOCK_M", "fwd",
            heads_first=True)  # fmt: skip
    return out, lse


def longest_first(lists) -> torch.Tensor:
    """int32 [NQ]: query blocks by total key-list length over batch and heads, longest first
    (stable, on the device: no host read)."""
    total = lists.n_total.to(torch.int64).sum(dim=(0, 1))
    return torch.sort(total, descending=True, stable=True).indices.to(torch.int32).contiguous()


def backward(
    do,
    dlse,
    q,
    k,
    v,
    out,
    lse,
    p: PlanArgs,
    t_lists,
    scale: float,
    dkdv_config: TileConfig | None = None,
    dq_config: TileConfig | None = None,
):
    """Gradients (dq, dk, dv) [B, S, H, D]; ``t_lists`` is the transposed (key-major) plan."""
    B, _, H, D = q.shape
    S_pad = p.padded_len
    dummy = torch.empty(1, dtype=torch.int32, device=q.device)  # never read: its flag is off
    rows = p.rows if p.rows is not None else dummy
    delta = torch.empty(B, H, S_pad, dtype=torch.float32, device=q.device)
    pre_m = min(64, p.block)
    _bwd_preprocess[(S_pad // pre_m, B * H)](
        out, do, dlse if dlse is not None else dummy, delta, rows, *_bsh(out), *_bsh(do), H, S_pad,
        HEAD_DIM=D, BLOCK_M=pre_m, GATHER=p.rows is not None, HAS_DLSE=dlse is not None,
    )  # fmt: skip
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    tma = tma_enabled(q.device)
    mask_tma = tma and p.masks.is_contiguous() and p.masks.data_ptr() % 16 == 0
    # dK/dV in contiguous kernel order reads its Q and dO tiles through descriptors (the
    # per-row address registers were what spilled at 32x64/w8).
    dkdv_tma = p.rows is None and tma and tma_ok(q) and tma_ok(do)
    if mask_tma or dkdv_tma or p.rows is None:
        ensure_allocator()
    flags = {**_flags(q, p), "MASK_TMA": mask_tma}
    base = (*_bsh(q), *_bsh(k), *_bsh(v), *_bsh(do), *_bsh(dq))
    n_masks = p.masks.shape[0]

    _, tensors, strides = _common(p, t_lists, dummy)
    valid = p.valid if p.valid is not None else dummy
    args = (q, k, v, do, dk, dv, lse, delta, rows, valid, *tensors, scale, *base, *strides, H, S_pad, n_masks)
    _launch(
        _bwd_dkdv_kernel,
        _dkdv_tuned,
        _DKDV_SPACE,
        S_pad,
        B * H,
        args,
        {**flags, "USE_TMA": dkdv_tma},
        q,
        p.block,
        dkdv_config,
        "BLOCK_N",
        "dkdv",
    )

    _, tensors, strides = _common(p, p.lists, dummy)
    args = (q, k, v, do, dq, lse, delta, rows, valid, *tensors, scale, *base, *strides, H, S_pad, n_masks)
    dq_flags = {**flags, "USE_TMA": p.rows is None and tma and tma_ok(k) and tma_ok(v)}
    _launch(_bwd_dq_kernel, _dq_tuned, _DQ_SPACE, S_pad, B * H, args, dq_flags, q, p.block, dq_config, "BLOCK_M", "dq")
    return dq, dk, dv
