"""Exact softmax attention under a plan, in plain torch, one query block at a time.

The semantic reference every other backend is tested against. Memory is bounded by one
query block against its listed key blocks (never S x S); with autograd each block is
checkpointed so the backward pass stays bounded too.

torch.compile (``fullgraph=True``, whole model or ``compile_repeated_blocks``): which key
blocks a query block reads is plan data, and a list of them has a data-dependent length. In a
graph every query block therefore runs against all key blocks under the plan's element mask
(``block_row_mask`` with every column): the same result, memory still one query block row
(bs x S), but no skipped compute; the flex and triton backends are the fast compiled paths.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from vidsparse.plan import BlockSparsePlan


def block_row_mask(
    plan: BlockSparsePlan,
    qb: int,
    cols: torch.Tensor,
    key_valid: torch.Tensor | None,
    batch: int,
) -> torch.Tensor:
    """bool [B|1, H|1, bs, len(cols) * bs]: the element mask of query block ``qb`` against key blocks ``cols``."""
    bs = plan.block_size
    counts = plan.kv_counts[:, :, qb]  # [Bp, Hp]
    idx = plan.kv_indices[:, :, qb].long()  # [Bp, Hp, K]
    mids = plan.mask_ids[:, :, qb].long()
    slot = torch.arange(idx.shape[-1], device=idx.device)
    listed = slot < counts.unsqueeze(-1)  # [Bp, Hp, K]
    hit = (idx.unsqueeze(-1) == cols.view(1, 1, 1, -1)) & listed.unsqueeze(-1)  # [Bp, Hp, K, C]
    member = hit.any(dim=2)  # [Bp, Hp, C]
    mid = torch.where(hit, mids.unsqueeze(-1), torch.full_like(mids.unsqueeze(-1), -1)).amax(dim=2)
    if plan.block_masks.shape[0]:
        elem = plan.block_masks[mid.clamp_min(0)]  # [Bp, Hp, C, bs, bs]
        elem = elem | (mid < 0)[..., None, None]
    else:
        elem = torch.ones(*mid.shape, bs, bs, dtype=torch.bool, device=mid.device)
    elem = elem & member[..., None, None]
    mask = elem.permute(0, 1, 3, 2, 4).reshape(*mid.shape[:2], bs, -1)
    key_pos = (cols.view(-1, 1) * bs + torch.arange(bs, device=cols.device)).flatten()
    if key_valid is not None:
        mask = mask & key_valid[:, key_pos].view(batch, 1, 1, -1)
    if plan.query_select is not None:
        rows = slice(qb * bs, (qb + 1) * bs)
        groups = plan.key_group[key_pos // bs].long()  # [C * bs]: group of each key token
        sel = plan.query_select[:, :, rows][..., groups]  # [B, H, bs, C * bs]
        mask = mask & sel
    return mask


def _block_columns(plan: BlockSparsePlan, qb: int) -> torch.Tensor:
    """The sorted key blocks any (batch, head) of the plan lists for query block ``qb`` (int64)."""
    if torch.compiler.is_compiling():  # static shape: every block, the mask excludes the rest
        return torch.arange(plan.num_blocks, device=plan.device)
    slot = torch.arange(plan.kv_indices.shape[-1], device=plan.device)
    return torch.unique(plan.kv_indices[:, :, qb][slot < plan.kv_counts[:, :, qb].unsqueeze(-1)]).long()


def _attend_block(q_blk, k_sel, v_sel, mask, scale):
    acc = torch.promote_types(q_blk.dtype, torch.float32)
    s = torch.matmul(q_blk.to(acc), k_sel.to(acc).transpose(-1, -2)) * scale
    s = s.masked_fill(~mask, float("-inf"))
    m = s.amax(dim=-1, keepdim=True)
    # Only empty rows (all keys masked, m = -inf) are special: they output 0 with lse -inf. A NaN
    # in q or in an attended key/value propagates to the rows that see it, as in torch SDPA and
    # the flex/triton backends (a NaN max or sum is left as it is, never turned into 0).
    empty = m == float("-inf")
    m = torch.where(empty, torch.zeros_like(m), m)
    p = torch.exp(s - m)
    denom = p.sum(dim=-1, keepdim=True)
    out = torch.matmul(p, v_sel.to(acc)) / torch.where(empty, torch.ones_like(denom), denom)
    lse = (m + torch.log(denom)).squeeze(-1)  # -inf for empty rows
    out = torch.where(empty, torch.zeros_like(out), out)
    return out, lse


def run(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    plan: BlockSparsePlan,
    key_valid: torch.Tensor | None = None,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k, v [B, H, S_pad, D] in kernel order -> (out [B, H, S_pad, D], lse fp32 [B, H, S_pad])."""
    B, H, S, D = q.shape
    bs = plan.block_size
    scale = D**-0.5 if scale is None else scale
    nq = S // bs
    outs, lses = [], []
    grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    for qb in range(nq):
        cols = _block_columns(plan, qb)
        q_blk = q[:, :, qb * bs : (qb + 1) * bs]
        if not torch.compiler.is_compiling() and cols.numel() == 0:  # eager only: a data-dependent size
            outs.append(torch.zeros_like(q_blk))
            lses.append(torch.full((B, H, bs), float("-inf"), device=q.device))
            continue
        key_pos = (cols.view(-1, 1) * bs + torch.arange(bs, device=q.device)).flatten()
        mask = block_row_mask(plan, qb, cols, key_valid, B)
        k_sel, v_sel = k[:, :, key_pos], v[:, :, key_pos]
        if grad:
            o, lse = checkpoint(_attend_block, q_blk, k_sel, v_sel, mask, scale, use_reentrant=False)
        else:
            o, lse = _attend_block(q_blk, k_sel, v_sel, mask, scale)
        outs.append(o)
        lses.append(lse.expand(B, H, bs))
    out = torch.cat(outs, dim=2).to(q.dtype)
    return out, torch.cat(lses, dim=2)
