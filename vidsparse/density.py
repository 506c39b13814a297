"""Attention density of a block-sparse plan, counted from the plan itself.

``token_density``: attended (query, key) pairs / all pairs (what the pattern keeps);
``video_block_density``: computed video-video blocks / all (the kernel's work on video).
Used by ``vidsparse inspect``, the generate library's density meter and the benchmarks.
"""

from __future__ import annotations

import torch


def token_density(plan) -> torch.Tensor:
    """float64 [H|1]: attended (query, key) pairs / all pairs, per head (text mask all valid).

    Counted from the plan itself: whole blocks count their valid rows x valid columns, partial
    blocks the set bits of their element mask on valid rows, and dynamic per-query selection
    (``query_select``) row by row.
    """

    bs = plan.block_size
    valid = plan.order.token_valid.cpu()
    n = plan.layout.seq_len
    nb = plan.num_blocks
    row_valid = valid.view(nb, bs)
    counts = plan.kv_counts.cpu().long()
    idx = plan.kv_indices.cpu().long()
    mids = plan.mask_ids.cpu().long()
    if plan.query_select is None:
        slot = torch.arange(idx.shape[-1])
        listed = slot < counts.unsqueeze(-1)  # [Bp, Hp, NQ, K]
        col_valid = row_valid.sum(1)  # [NK]
        rv = row_valid.sum(1)  # [NQ]
        whole = (rv.view(1, 1, -1, 1) * col_valid[idx]).double()
        if plan.block_masks.shape[0]:
            row_pc = plan.block_masks.cpu().sum(dim=2).double()  # [P, bs]: keys set per row
            table = row_pc @ row_valid.double().T  # [P, NQ]: pairs of mask id on query block's valid rows
            qb = torch.arange(nb).view(1, 1, nb, 1).expand_as(mids)
            part = table[mids.clamp_min(0), qb]
            total = torch.where(mids < 0, whole, part)
        else:
            total = whole
        total = (total * listed).sum(dim=(2, 3))  # [Bp, Hp]
        return (total.mean(dim=0) / (n * n)).cpu()
    # Dynamic selection: row r of query block qb keeps listed key block kb iff
    # query_select[b, h, r, key_group[kb]]; count the keys each kept block gives row r.
    qsel = plan.query_select.cpu()
    key_group = plan.key_group.cpu().long()
    B, H = qsel.shape[:2]
    col_count = row_valid.sum(1).double()  # [NK] valid keys per block
    row_pc = plan.block_masks.cpu().sum(dim=2).double() if plan.block_masks.shape[0] else None  # [P, bs]
    total = torch.zeros(B, H, dtype=torch.float64)
    slot = torch.arange(idx.shape[-1])
    for qb in range(nb):
        listed = (slot < counts[:, :, qb].unsqueeze(-1)).double()  # [Bp, Hp, K]
        kb = idx[:, :, qb]  # [Bp, Hp, K]
        mid = mids[:, :, qb]
        per_row = col_count[kb].unsqueeze(-1).expand(*kb.shape, bs)  # [Bp, Hp, K, bs]
        if row_pc is not None:
            per_row = torch.where((mid >= 0).unsqueeze(-1), row_pc[mid.clamp_min(0)], per_row)
        per_row = per_row * listed.unsqueeze(-1) * row_valid[qb].double()
        sel = qsel[:, :, qb * bs : (qb + 1) * bs]  # [B, H, bs, G]
        grp = key_group[kb]  # [Bp, Hp, K]
        kept = torch.gather(
            sel.double(), 3, grp.expand(B, H, -1).unsqueeze(2).expand(B, H, bs, grp.shape[-1])
        )  # [B, H, bs, K]
        total += torch.einsum("bhrk,bhkr->bh", kept, per_row.expand(B, H, -1, -1))
    return total.mean(dim=0) / (n * n)


def video_block_density(plan) -> torch.Tensor:
    """float64 [H|1]: computed video-video blocks / all video-video blocks (the pattern's own sparsity)."""
    text_blocks = plan.text_blocks.cpu()
    nvb = int((~text_blocks).sum())
    counts = plan.kv_counts.cpu().long()
    idx = plan.kv_indices.cpu().long()
    listed = torch.arange(idx.shape[-1]) < counts.unsqueeze(-1)
    video_cols = (~text_blocks)[idx] & listed  # [Bp, Hp, NQ, K]
    per_row = video_cols.sum(-1).double()[:, :, :nvb]  # video query blocks come first
    return per_row.sum(-1).mean(0) / max(1, nvb * nvb)


__all__ = ["token_density", "video_block_density"]
