"""Key-block-major attention for per-query block selections (VMoBA's own packing), exact.

A per-query selection (``plan.query_select`` [B, H, S_pad, G]: query row r keeps key group g)
is cheap as a mask but not as a query-major kernel: a query tile must visit the union of its
rows' groups, which for 128 rows is nearly every group. The released VMoBA code instead
computes, for each (head, key block), only the query rows that chose it (FlashAttention varlen
over gathered rows) and merges the partial results. This module does the same on a
``BlockSparsePlan`` that carries ``group_spans`` (the kernel range of each group's keys):

1. *Packing* (:func:`pack`): for every (batch, head, group) the valid query rows that select
   the group, in ascending kernel order, are listed contiguously and padded to whole query
   tiles of ``block_m`` rows. Every (row, group) pair of the selection appears exactly once,
   own block and text included: video rows always select their own block and the text group,
   text rows select every group (VMoBA's text rule, see ``vidsparse.patterns.vmoba``), so
   the always-attended parts are ordinary pairs, computed exactly like the chosen ones.
2. *Partials*: each tile attends its group's keys (valid keys only, run-time text padding
   applied) and yields a partial output and log-sum-exp per row.
3. *Merge*: per query row, ``lse = logsumexp(lse_i)`` and ``out = sum(exp(lse_i - lse) o_i)``:
   exactly softmax attention over the union of the row's keys.

Backward (Triton path) uses only the merged output and log-sum-exp, as FlashAttention's
varlen backward does for VMoBA: dK/dV are accumulated per key sub-tile over its group's
query tiles (no atomics), dQ per tile into a packed buffer that is summed per row. The torch
path (:func:`attention` with ``backend="torch"``) runs the same packing with torch ops and
autograd; it is the exact reference of the Triton kernels.

Cost: the kernels compute ``sum over (b, h, g) ceil(n_bhg / block_m) * block_m *
ceil(len_g / block_n) * block_n`` query-key pairs (:func:`computed_pairs`), close to the
selection's token density times dense when groups hold many rows. Packing costs one host
synchronisation per call (the number of tiles) and a ``nonzero`` over B*H*G*S_pad booleans,
as the released code's varlen path does; use the query-tile path (``VMoBA(path="query_tile")``)
where fixed shapes matter (CUDA graphs, ``torch.compile(fullgraph=True)``). Partial outputs
are held in fp32 for at most ``_PARTIAL_ROWS`` packed rows at a time (batch-heads chunked).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint

from vidsparse.plan import BlockSparsePlan

# Query rows per tile and key columns per sub-tile on a GPU; the interpreter uses 16 x 16.
DEFAULT_BLOCK_M = 128
DEFAULT_BLOCK_N = 64
# Packed rows whose fp32 partial outputs are alive at once (bounds forward / dQ memory).
_PARTIAL_ROWS = 1 << 21
# Score elements per torch-path step (tiles x rows x keys).
_TORCH_ELEMENTS = 1 << 23


@dataclass(frozen=True, eq=False)
class Packing:
    """Query rows of every (batch, head, group), gathered into tiles of ``block_m`` rows.

    Tiles are ordered by (batch-head, group); the rows of tile ``t`` are
    ``rows[t * block_m : (t + 1) * block_m]`` (caller token, -1 = padding).
    """

    block_m: int
    num_heads: int
    seq_len: int  # caller tokens S
    rows: torch.Tensor  # int32 [NT * block_m]
    tile_bh: torch.Tensor  # int32 [NT]: b * H + h
    tile_group: torch.Tensor  # int32 [NT]
    tile_first: torch.Tensor  # int32 [B * H * G]: first tile of each (b, h, g)
    tile_count: torch.Tensor  # int32 [B * H * G]
    row_count: torch.Tensor  # int64 [B, H, G]: selecting rows before padding
    bh_tiles: tuple[int, ...]  # tiles per batch-head (host ints)

    @property
    def num_tiles(self) -> int:
        return int(self.tile_bh.numel())

    def targets(self, first_tile: int = 0, last_tile: int | None = None) -> torch.Tensor:
        """int64 index (b*H + h)*S + token into [B, H, S] of each packed row, -1 for padding."""
        last = self.num_tiles if last_tile is None else last_tile
        rows = self.rows[first_tile * self.block_m : last * self.block_m].long()
        bh = self.tile_bh[first_tile:last].long().repeat_interleave(self.block_m)
        return torch.where(rows >= 0, bh * self.seq_len + rows, torch.full_like(rows, -1))


def check_plan(plan: BlockSparsePlan) -> None:
    """Raise unless ``plan`` carries a per-query selection and its groups' key spans."""
    if not isinstance(plan, BlockSparsePlan):
        raise TypeError(f"plan must be a vidsparse.BlockSparsePlan, got {type(plan).__name__}.")
    if plan.query_select is None or plan.group_spans is None:
        raise ValueError(
            "The key-block-major path needs a plan with query_select and group_spans (a per-query VMoBA "
            "plan, VMoBA(path='key_block')); this plan has "
            f"query_select={'set' if plan.query_select is not None else None}, "
            f"group_spans={'set' if plan.group_spans is not None else None}."
        )
    G = plan.query_select.shape[-1]
    if tuple(plan.group_spans.shape) != (G, 2):
        raise ValueError(f"plan.group_spans must be int [G, 2] = [{G}, 2], got {tuple(plan.group_spans.shape)}.")


def row_counts(plan: BlockSparsePlan) -> torch.Tensor:
    """int64 [B, H, G]: valid query rows selecting each group (no host sync)."""
    qs = plan.query_select
    valid = plan.order.token_valid.to(qs.device)
    return (qs & valid.view(1, 1, -1, 1)).sum(dim=2)


def pack(plan: BlockSparsePlan, block_m: int) -> Packing:
    """Gather, per (batch, head, group), the query rows that select it (one host sync)."""
    check_plan(plan)
    qs = plan.query_select
    B, H, Sp, G = qs.shape
    dev = qs.device
    valid = plan.order.token_valid.to(dev)
    sel = (qs & valid.view(1, 1, -1, 1)).transpose(2, 3)  # [B, H, G, S_pad]: key-block-major
    counts = sel.sum(dim=-1)  # [B, H, G]
    ntiles = (counts + block_m - 1) // block_m
    bh_tiles = tuple(int(x) for x in ntiles.sum(dim=-1).flatten().tolist())  # the host sync
    nt = sum(bh_tiles)
    flat = torch.nonzero(sel.reshape(-1)).squeeze(1)  # ascending: by (b, h, g), then kernel row
    grp, r = flat // Sp, flat % Sp
    cnt, nti = counts.flatten(), ntiles.flatten()
    start = torch.cumsum(cnt, 0) - cnt
    first = torch.cumsum(nti, 0) - nti
    slot = first[grp] * block_m + torch.arange(flat.numel(), device=dev) - start[grp]
    rows = torch.full((nt * block_m,), -1, dtype=torch.int32, device=dev)
    rows[slot] = plan.order.gather.to(dev)[r].to(torch.int32)
    tile_bhg = torch.repeat_interleave(torch.arange(B * H * G, device=dev), nti, output_size=nt)
    return Packing(
        block_m=block_m,
        num_heads=H,
        seq_len=plan.layout.seq_len,
        rows=rows,
        tile_bh=(tile_bhg // G).to(torch.int32),
        tile_group=(tile_bhg % G).to(torch.int32),
        tile_first=first.to(torch.int32),
        tile_count=nti.to(torch.int32),
        row_count=counts,
        bh_tiles=bh_tiles,
    )


def computed_pairs(
    plan: BlockSparsePlan, block_m: int = DEFAULT_BLOCK_M, block_n: int = DEFAULT_BLOCK_N
) -> torch.Tensor:
    """float64 [B, H]: query-key pairs the key-block-major kernels compute, padding included."""
    check_plan(plan)
    counts = row_counts(plan).double()
    rows = torch.ceil(counts / block_m) * block_m
    keys = torch.ceil(plan.group_spans[:, 1].to(counts.device).double() / block_n) * block_n
    return (rows * keys).sum(dim=-1)


def chunks(pk: Packing):
    """(first tile, end tile, first batch-head, end batch-head): tile ranges on batch-head
    boundaries holding at most ``_PARTIAL_ROWS`` packed rows (or one batch-head)."""
    limit = max(1, _PARTIAL_ROWS // pk.block_m)
    t0 = t1 = bh0 = 0
    for bh, n in enumerate(pk.bh_tiles):
        if t1 > t0 and t1 - t0 + n > limit:
            yield t0, t1, bh0, bh
            t0, bh0 = t1, bh
        t1 += n
    if t1 > t0:
        yield t0, t1, bh0, len(pk.bh_tiles)


def merge(o_part: torch.Tensor, lse_part: torch.Tensor, target: torch.Tensor, n_out: int):
    """Exact log-sum-exp merge of partial rows into ``n_out`` rows.

    o_part [P, D], lse_part [P] (natural log, -inf = saw nothing), target int64 [P] (-1 =
    padding) -> (out [n_out, D], lse [n_out]); rows with no partial get 0 and -inf.
    Differentiable in o_part and lse_part (the running max is a constant shift).
    """
    dump = torch.where(target >= 0, target, torch.full_like(target, n_out))
    lse_part = torch.where(target >= 0, lse_part, torch.full_like(lse_part, float("-inf")))
    m = torch.full((n_out + 1,), float("-inf"), dtype=lse_part.dtype, device=lse_part.device)
    m = m.scatter_reduce(0, dump, lse_part.detach(), reduce="amax")
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    w = torch.exp(lse_part - m[dump])
    s = torch.zeros(n_out + 1, dtype=w.dtype, device=w.device).index_add(0, dump, w)
    lse = torch.where(s > 0, m + torch.log(s.clamp_min(torch.finfo(s.dtype).tiny)), torch.full_like(s, float("-inf")))
    wn = torch.where(w > 0, torch.exp(lse_part - lse[dump]), torch.zeros_like(w))
    out = torch.zeros(n_out + 1, o_part.shape[-1], dtype=o_part.dtype, device=o_part.device)
    out = out.index_add(0, dump, wn.unsqueeze(-1).to(o_part.dtype) * o_part)
    return out[:n_out], lse[:n_out]


# -- torch path ------------------------------------------------------------------------------


def _group_keys(plan: BlockSparsePlan, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(caller token int64 [G, L], kernel position int64 [G, L]) of each group's keys, -1 = none."""
    spans = plan.group_spans.to(device).long()
    L = max(1, int(spans[:, 1].max()))
    col = torch.arange(L, device=device)
    kpos = spans[:, :1] + col
    live = col < spans[:, 1:]
    kpos = torch.where(live, kpos, torch.full_like(kpos, -1))
    rows = plan.order.gather.to(device)[kpos.clamp_min(0)]
    return torch.where(live, rows, torch.full_like(rows, -1)), kpos


def _torch_tiles(qf, kf, vf, rows, bh, grp, gkeys, gkpos, key_valid, B, S, H, scale):
    """Partial (out [n*T, D], lse [n*T]) of n tiles; q/k/v flat [B*S*H, D]."""
    n, T = rows.shape
    b, h = bh // H, bh % H
    ok = rows >= 0
    qi = (b[:, None] * S + rows.clamp_min(0)) * H + h[:, None]
    kr = gkeys[grp]  # [n, L]
    k_ok = kr >= 0
    if key_valid is not None:
        k_ok = k_ok & key_valid[b[:, None], gkpos[grp].clamp_min(0)]
    ki = (b[:, None] * S + kr.clamp_min(0)) * H + h[:, None]
    acc = qf.dtype
    s = torch.einsum("ntd,nld->ntl", qf[qi], kf[ki]) * scale
    s = s.masked_fill(~(k_ok[:, None, :] & ok[:, :, None]), float("-inf"))
    m = s.amax(dim=-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    p = torch.exp(s - m)
    denom = p.sum(dim=-1, keepdim=True)
    o = torch.einsum("ntl,nld->ntd", p, vf[ki]) / denom.clamp_min(torch.finfo(acc).tiny)
    lse = torch.where(
        denom > 0, m + torch.log(denom.clamp_min(torch.finfo(acc).tiny)), torch.full_like(m, float("-inf"))
    )
    return o.reshape(n * T, -1), lse.reshape(n * T)


def _torch_attention(q, k, v, plan: BlockSparsePlan, key_valid, scale, block_m: int):
    B, S, H, D = q.shape
    acc = torch.promote_types(q.dtype, torch.float32)
    pk = pack(plan, block_m)
    gkeys, gkpos = _group_keys(plan, q.device)
    qf, kf, vf = (t.to(acc).reshape(B * S * H, D) for t in (q, k, v))
    L = gkeys.shape[1]
    per = max(1, _TORCH_ELEMENTS // (block_m * L))
    grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    rows2d = pk.rows.view(-1, block_m).long()
    parts = []
    for t0, t1, bh0, bh1 in chunks(pk):
        outs, lses = [], []
        for c0 in range(t0, t1, per):
            c1 = min(t1, c0 + per)
            args = (rows2d[c0:c1], pk.tile_bh[c0:c1].long(), pk.tile_group[c0:c1].long(), gkeys, gkpos, key_valid)
            if grad:
                o, lse = checkpoint(_torch_tiles, qf, kf, vf, *args, B, S, H, scale, use_reentrant=False)
            else:
                o, lse = _torch_tiles(qf, kf, vf, *args, B, S, H, scale)
            outs.append(o)
            lses.append(lse)
        tgt = pk.targets(t0, t1)
        o_c, _ = merge(torch.cat(outs), torch.cat(lses), torch.where(tgt >= 0, tgt - bh0 * S, tgt), (bh1 - bh0) * S)
        parts.append(o_c)  # chunks cover the batch-heads in order
    if not parts:
        return q.new_zeros(q.shape)
    return torch.cat(parts).view(B, H, S, D).transpose(1, 2).to(q.dtype)


# -- entry point ------------------------------------------------------------------------------


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    plan: BlockSparsePlan,
    text_mask: torch.Tensor | None = None,
    scale: float | None = None,
    backend: str = "torch",
    block_m: int | None = None,
    block_n: int | None = None,
) -> torch.Tensor:
    """Caller-order q, k, v [B, S, H, D] -> out [B, S, H, D] under the plan's per-query selection.

    Exactly softmax attention restricted to ``vidsparse.attention.plan_to_token_mask(plan)`` (and the
    valid text tokens of ``text_mask`` [B, text_len]). ``backend`` is ``"torch"`` (any device,
    autograd through torch ops) or ``"triton"`` (CUDA, or CPU under ``TRITON_INTERPRET=1``).
    """
    check_plan(plan)
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4 or not t.is_floating_point():
            raise ValueError(f"{name} must be a floating tensor [B, S, H, D], got {getattr(t, 'shape', type(t))}.")
    if q.shape != k.shape or k.shape != v.shape:
        raise ValueError(f"q, k, v must share one shape; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}.")
    B, S, H, _ = q.shape
    if plan.layout.seq_len != S:
        raise ValueError(f"q, k, v must have {plan.layout.seq_len} tokens for this plan, got {S}.")
    if tuple(plan.query_select.shape[:2]) != (B, H):
        raise ValueError(
            f"The plan's selection is for batch x heads {tuple(plan.query_select.shape[:2])}, the inputs have "
            f"{(B, H)}; plan with the same q and k."
        )
    if plan.device != q.device:
        raise ValueError(f"The plan lives on {plan.device} but q is on {q.device}; build it with device=q.device.")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    key_valid = plan.key_valid(text_mask, B)
    if backend == "torch":
        return _torch_attention(q, k, v, plan, key_valid, scale, block_m or min(DEFAULT_BLOCK_M, plan.block_size))
    if backend == "triton":
        from vidsparse.kernels import keyblock_triton

        return keyblock_triton.attention(q, k, v, plan, key_valid, scale, block_m, block_n)
    raise ValueError(f"The key-block-major path runs with backend 'torch' or 'triton', got {backend!r}.")


__all__ = [
    "DEFAULT_BLOCK_M",
    "DEFAULT_BLOCK_N",
    "Packing",
    "attention",
    "check_plan",
    "chunks",
    "computed_pairs",
    "merge",
    "pack",
    "row_counts",
]
