"""Kernel-side views of a ``BlockSparsePlan``, derived on the device and cached.

The forward and dQ kernels walk each query block's key list with the blocks that need an
element mask first and the whole blocks after, so the whole-block loop carries no mask
arithmetic at all. The dK/dV kernel walks the transpose: for each key block, the query
blocks that list it (same masked-first split).

Everything here is plain torch on the plan's device. Nothing synchronises with the host: the
transpose's list width is the number of query blocks (an upper bound) unless that table would
exceed ``_SYNC_FREE_ENTRIES`` entries, in which case the real width is read once per plan.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from vidsparse.lru import LRUCache

# Entries (batch x heads x key blocks x query blocks) up to which the transposed lists are built
# NQ wide without reading the real width on the host: 2**23 int32 = 32 MiB per table.
_SYNC_FREE_ENTRIES = 1 << 23


@dataclass(frozen=True, eq=False)
class BlockLists:
    """Per (batch, head, block) partner lists in kernel walking order.

    ``idx[..., :n_elem]`` need an element mask (or a run-time key/query mask),
    ``idx[..., n_elem:n_masked]`` are partial only through padding (mask codes
    ``PAD_COLS`` / ``PAD_ROWS_COLS``: a 1-D validity test, ``padding_codes``),
    ``idx[..., n_masked:n_total]`` are computed whole. Leading dims broadcast (size 1).
    """

    idx: torch.Tensor  # int32 [Bp, Hp, N, L]
    mid: torch.Tensor  # int32 [Bp, Hp, N, L], -1 = no element mask, < -1 = a padding code
    n_masked: torch.Tensor  # int32 [Bp, Hp, N]
    n_total: torch.Tensor  # int32 [Bp, Hp, N]
    n_elem: torch.Tensor  # int32 [Bp, Hp, N]


#: Kernel-side mask codes of blocks that are whole but for padding: only the key columns'
#: validity matters (the plan's mask keeps every row), or the rows' and the columns'.
PAD_COLS = -2
PAD_ROWS_COLS = -3


def padding_codes(
    indices: torch.Tensor, mask_ids: torch.Tensor, block_masks: torch.Tensor, token_valid: torch.Tensor, block: int
) -> torch.Tensor:
    """``mask_ids`` with the entries whose element mask is exactly the padding of their blocks
    replaced by ``PAD_COLS`` (mask = every row x valid key columns) or ``PAD_ROWS_COLS`` (valid
    query rows x valid key columns): the kernels test those with two 1-D validity vectors
    instead of loading a 2-D mask tile. Exact (the same keep set, padding rows included), on
    the device, no host read. Query-major lists only (the query block is the list's row)."""
    if block_masks.shape[0] == 0:
        return mask_ids
    m = block_masks.to(indices.device, torch.bool)
    row_any, col_any = m.any(2), m.any(1)  # [P, bs] each
    outer = (m == (row_any[:, :, None] & col_any[:, None, :])).flatten(1).all(1)  # [P]
    vb = token_valid.to(indices.device, torch.bool).view(-1, block)  # [NB, bs]
    mid = mask_ids.long().clamp_min(0)
    nq = indices.shape[2]
    cols_pad = (col_any[mid] == vb[indices.long()]).all(-1)  # [Bp, Hp, NQ, L]
    rows_all = row_any.all(1)[mid]
    rows_pad = (row_any[mid] == vb[:nq].view(1, 1, nq, 1, block)).all(-1)
    pad = (mask_ids >= 0) & outer[mid] & cols_pad
    codes = torch.where(pad & rows_pad, PAD_ROWS_COLS, mask_ids)
    return torch.where(pad & rows_all, PAD_COLS, codes).to(torch.int32)


def split_lists(
    counts: torch.Tensor,
    indices: torch.Tensor,
    mask_ids: torch.Tensor,
    extra_masked: torch.Tensor | None = None,
    codes: torch.Tensor | None = None,
) -> BlockLists:
    """Reorder query-major lists: element-masked blocks first, then padding-only blocks
    (mask codes < -1), then whole blocks (each ascending).

    ``extra_masked`` (bool [NK]) marks key blocks that need the masked path even without an
    element mask (text blocks when a run-time ``key_valid`` is given); ``codes`` is
    ``padding_codes(...)`` of ``mask_ids`` (None: no padding-only path). A block under a
    run-time mask keeps its element mask even where it is padding-only.
    """
    L = indices.shape[-1]
    slot = torch.arange(L, device=indices.device)
    listed = slot < counts.long().unsqueeze(-1)
    codes = mask_ids if codes is None else codes
    extra = torch.zeros_like(listed)
    if extra_masked is not None:
        extra = extra_masked.to(indices.device, torch.bool)[indices.long()]
    masked = ((codes >= 0) | extra) & listed
    pad = (codes < -1) & listed & ~masked
    rank = torch.where(listed, torch.where(masked, 0, torch.where(pad, 1, 2)), 3).to(torch.int64)
    order = torch.argsort(rank * L + slot, dim=-1)
    mids = torch.where(pad, codes, mask_ids)
    return BlockLists(
        idx=torch.gather(indices, -1, order).to(torch.int32).contiguous(),
        mid=torch.gather(mids, -1, order).to(torch.int32).contiguous(),
        n_masked=(masked | pad).sum(-1).to(torch.int32).contiguous(),
        n_total=counts.to(torch.int32).contiguous(),
        n_elem=masked.sum(-1).to(torch.int32).contiguous(),
    )


def transpose_lists(
    counts: torch.Tensor, indices: torch.Tensor, mask_ids: torch.Tensor, num_kv_blocks: int
) -> BlockLists:
    """Key-major lists: for each key block, the query blocks that list it (masked first)."""
    Bp, Hp, NQ, L = indices.shape
    dev = indices.device
    groups = Bp * Hp * num_kv_blocks
    slot = torch.arange(L, device=dev)
    listed = slot < counts.long().unsqueeze(-1)
    masked = (mask_ids >= 0) & listed
    pad = (mask_ids < -1) & listed  # padding codes (``padding_codes``): second segment
    bh = torch.arange(Bp * Hp, device=dev).view(Bp, Hp, 1, 1)
    gid = torch.where(listed, bh * num_kv_blocks + indices.long(), groups)  # sentinel: unlisted
    qb = torch.arange(NQ, device=dev).view(1, 1, NQ, 1).expand_as(gid)
    cls = torch.where(masked, 0, torch.where(pad, 1, 2))
    sort_key = (gid * 3 + cls) * NQ + qb
    order = torch.argsort(sort_key.flatten())
    g_sorted = gid.flatten()[order]
    q_sorted = qb.flatten()[order]
    m_sorted = mask_ids.flatten()[order]

    ones = torch.ones_like(gid.flatten())
    n_total = torch.zeros(groups + 1, dtype=torch.int64, device=dev).scatter_add_(0, gid.flatten(), ones)
    n_masked = torch.zeros(groups + 1, dtype=torch.int64, device=dev).scatter_add_(
        0, gid.flatten(), (masked | pad).flatten().long()
    )
    n_elem = torch.zeros(groups + 1, dtype=torch.int64, device=dev).scatter_add_(
        0, gid.flatten(), masked.flatten().long()
    )
    # A key block is listed by at most NQ query blocks: that width needs no host read of the
    # real maximum (a device sync). Only when the NQ-wide table would be large is it measured.
    if groups * NQ <= _SYNC_FREE_ENTRIES:
        width = max(1, NQ)
    else:
        width = max(1, int(n_total[:groups].max().item())) if groups else 1
    start = torch.cumsum(n_total, 0) - n_total
    pos = torch.arange(g_sorted.numel(), device=dev) - start[g_sorted]
    real = g_sorted < groups
    row = torch.where(real, g_sorted, groups)
    col = torch.where(real, pos, 0)
    t_idx = torch.zeros(groups + 1, width, dtype=torch.int32, device=dev)
    t_mid = torch.full((groups + 1, width), -1, dtype=torch.int32, device=dev)
    t_idx[row, col] = q_sorted.to(torch.int32)
    t_mid[row, col] = m_sorted.to(torch.int32)
    shape = (Bp, Hp, num_kv_blocks)
    return BlockLists(
        idx=t_idx[:groups].view(*shape, width).contiguous(),
        mid=t_mid[:groups].view(*shape, width).contiguous(),
        n_masked=n_masked[:groups].view(shape).to(torch.int32),
        n_total=n_total[:groups].view(shape).to(torch.int32),
        n_elem=n_elem[:groups].view(shape).to(torch.int32),
    )


def kernel_rows(gather: torch.Tensor, token_valid: torch.Tensor) -> torch.Tensor:
    """int32 [S_pad]: caller token per kernel position, -1 for padding."""
    return torch.where(token_valid.to(gather.device, torch.bool), gather, -1).to(torch.int32).contiguous()


def mask_table(block_masks: torch.Tensor, block_size: int) -> torch.Tensor:
    """uint8 [max(P, 1), bs, bs] (one dummy block when the plan has no element masks)."""
    if block_masks.shape[0] == 0:
        return torch.ones(1, block_size, block_size, dtype=torch.uint8, device=block_masks.device)
    return block_masks.to(torch.uint8).contiguous()


# -- cache ------------------------------------------------------------------------------


def _tensor_key(t: torch.Tensor | None) -> tuple | None:
    if t is None:
        return None
    try:
        version = t._version
    except RuntimeError:  # inference tensors have no version counter (and cannot be modified)
        version = -1
    return (t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype, str(t.device), version)


class DerivedCache:
    """Bounded LRU of tensors derived from plan tensors.

    Keyed by the sources' storage address, shape, stride, dtype, device and version counter.
    Each entry keeps its sources alive, so an address cannot be reused by another plan
    while the entry exists (the key stays unambiguous).
    """

    def __init__(self, maxsize: int = 64) -> None:
        self._lru: LRUCache[tuple[tuple, object]] = LRUCache(maxsize)

    def get(self, tag: str, sources: tuple[torch.Tensor | None, ...], build: Callable[[], object], extra=()):
        key = (tag, *(_tensor_key(t) for t in sources), *extra)
        return self._lru.get_or_build(key, lambda: (sources, build()))[1]

    def clear(self) -> None:
        self._lru.clear()

    def __len__(self) -> int:
        return len(self._lru)


CACHE = DerivedCache()
