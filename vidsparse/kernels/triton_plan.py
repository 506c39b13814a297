"""Kernel-side views of a ``BlockSparsePlan``, derived on the device and cached.

The forward and dQ kernels walk each query block's key list with the blocks that need an
element mask first and the whole blocks after, so the whole-block loop carries no mask
arithmetic at all. The dK/dV kernel walks the transpose: for each key block, the query
blocks that list it (same masked-first split).

Everything here is plain torch on the plan's device. Nothing synchronises with the host
except the transpose's list width (one ``.item()`` the first time a static plan is used in
a backward pass; cached after that).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from vidsparse.lru import LRUCache


@dataclass(frozen=True, eq=False)
class BlockLists:
    """Per (batch, head, block) partner lists in kernel walking order.

    ``idx[..., :n_masked]`` need an element mask (or a run-time key/query mask),
    ``idx[..., n_masked:n_total]`` are computed whole. Leading dims broadcast (size 1).
    """

    idx: torch.Tensor  # int32 [Bp, Hp, N, L]
    mid: torch.Tensor  # int32 [Bp, Hp, N, L], -1 = no element mask
    n_masked: torch.Tensor  # int32 [Bp, Hp, N]
    n_total: torch.Tensor  # int32 [Bp, Hp, N]


def split_lists(
    counts: torch.Tensor,
    indices: torch.Tensor,
    mask_ids: torch.Tensor,
    extra_masked: torch.Tensor | None = None,
) -> BlockLists:
    """Reorder query-major lists: masked blocks first, then whole blocks (each ascending).

    ``extra_masked`` (bool [NK]) marks key blocks that need the masked path even without an
    element mask (text blocks when a run-time ``key_valid`` is given).
    """
    L = indices.shape[-1]
    slot = torch.arange(L, device=indices.device)
    listed = slot < counts.long().unsqueeze(-1)
    masked = mask_ids >= 0
    if extra_masked is not None:
        masked = masked | extra_masked.to(indices.device, torch.bool)[indices.long()]
    masked = masked & listed
    rank = torch.where(listed, torch.where(masked, 0, 1), 2).to(torch.int64)
    order = torch.argsort(rank * L + slot, dim=-1)
    return BlockLists(
        idx=torch.gather(indices, -1, order).to(torch.int32).contiguous(),
        mid=torch.gather(mask_ids, -1, order).to(torch.int32).contiguous(),
        n_masked=masked.sum(-1).to(torch.int32).contiguous(),
        n_total=counts.to(torch.int32).contiguous(),
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
    bh = torch.arange(Bp * Hp, device=dev).view(Bp, Hp, 1, 1)
    gid = torch.where(listed, bh * num_kv_blocks + indices.long(), groups)  # sentinel: unlisted
    qb = torch.arange(NQ, device=dev).view(1, 1, NQ, 1).expand_as(gid)
    sort_key = (gid * 2 + (~masked).long()) * NQ + qb
    order = torch.argsort(sort_key.flatten())
    g_sorted = gid.flatten()[order]
    q_sorted = qb.flatten()[order]
    m_sorted = mask_ids.flatten()[order]

    ones = torch.ones_like(gid.flatten())
    n_total = torch.zeros(groups + 1, dtype=torch.int64, device=dev).scatter_add_(0, gid.flatten(), ones)
    n_masked = torch.zeros(groups + 1, dtype=torch.int64, device=dev).scatter_add_(
        0, gid.flatten(), masked.flatten().long()
    )
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
