"""The attention work a plan really costs: query-key pairs computed, padding included.

A plan's mask density (pairs kept / all pairs) is not what a kernel pays. The query-tile
path (``torch``, ``flex``, ``triton`` on the plan's lists) computes every listed block whole,
``block_size`` x ``block_size`` pairs, even where the element mask or a per-query selection
drops most of it; with per-query VMoBA that union covers nearly every block. The
key-block-major path (``vidsparse.kernels.keyblock``, plans with ``group_spans``) computes,
per (batch, head, key group), the selecting rows padded to ``block_m`` against the group's
keys padded to ``block_n``. :func:`plan_work` counts both, next to the mask's own pairs, so
``vidsparse inspect`` and the generate summary can report the truth.

All counts are per (sample, head), averaged over the plan's batch and heads.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vidsparse.kernels import keyblock
from vidsparse.plan import BlockSparsePlan

PATHS = ("query_tile", "key_block")
#: Computed work at or above this fraction of dense is reported as "no attention speedup" (issue 18,
#: item 10), by ``vidsparse inspect`` and the generate summary alike.
WORK_WARNING = 0.95
# Query blocks per step when counting a static plan's kept pairs (bounds memory).
_ROWS_PER_STEP = 64


@dataclass(frozen=True)
class PlanWork:
    """Work of one plan on one kernel path (per sample and head, averaged)."""

    path: str  # "query_tile" or "key_block"
    computed_pairs: float  # query-key pairs the kernels compute, padding included
    kept_pairs: float  # pairs the token mask keeps (text padding given at call time not subtracted)
    dense_pairs: int  # S * S: what dense attention computes
    tile: tuple[int, int]  # (query rows, keys) of the tile the count assumes
    per_head_computed: tuple[float, ...]  # computed_pairs per head (averaged over batch)

    @property
    def computed_fraction(self) -> float:
        """Computed pairs / dense pairs: 1 / this bounds the attention speedup over dense."""
        return self.computed_pairs / self.dense_pairs

    @property
    def token_density(self) -> float:
        """Kept pairs / dense pairs: the mask's density."""
        return self.kept_pairs / self.dense_pairs

    @property
    def overhead(self) -> float:
        """Computed / kept pairs: how much more than its mask the path computes (1.0 = nothing wasted)."""
        return self.computed_pairs / max(self.kept_pairs, 1.0)

    def as_dict(self) -> dict:
        return dict(
            path=self.path,
            computed_pairs=self.computed_pairs,
            kept_pairs=self.kept_pairs,
            dense_pairs=self.dense_pairs,
            computed_fraction=self.computed_fraction,
            token_density=self.token_density,
            overhead=self.overhead,
            tile=list(self.tile),
            per_head_computed=list(self.per_head_computed),
        )


def executed_path(plan: BlockSparsePlan, backend: str) -> str:
    """The path ``vidsparse.attention`` runs this plan on with a resolved backend name."""
    from vidsparse.kernels.backends import get_backend

    return "key_block" if plan.group_spans is not None and get_backend(backend).key_block else "query_tile"


def kernel_tiles(plan: BlockSparsePlan) -> dict[str, int]:
    """``block_m`` / ``block_n`` of the key-block-major kernels for this plan, as ``plan_work`` kwargs.

    The GPU kernel's tiles (128 query rows x 64 keys) for plans of 128-token blocks; for smaller
    plan blocks (tiny grids) both shrink to the block, as the torch path's ``block_m`` does, so a
    tiny grid's count is not all padding of a tile larger than the grid.
    """
    bs = plan.block_size
    return {"block_m": min(keyblock.DEFAULT_BLOCK_M, bs), "block_n": min(keyblock.DEFAULT_BLOCK_N, bs)}


def executed_work(plan: BlockSparsePlan, backend: str) -> PlanWork:
    """``plan_work`` of the path and tiles a resolved ``backend`` runs this plan on: what the
    kernel really computes (reports, warnings)."""
    return plan_work(plan, executed_path(plan, backend), **kernel_tiles(plan))


def plan_work(
    plan: BlockSparsePlan,
    path: str | None = None,
    block_m: int = keyblock.DEFAULT_BLOCK_M,
    block_n: int = keyblock.DEFAULT_BLOCK_N,
) -> PlanWork:
    """Pairs computed by ``path`` (default: the plan's preferred one) and kept by the mask.

    ``block_m`` / ``block_n`` are the key-block-major kernel's query rows per tile and keys
    per sub-tile (its GPU defaults); the query-tile path uses the plan's ``block_size``.
    Plans with a per-query selection are assumed to use element masks for key padding only
    (as VMoBA builds them). One host synchronisation (the result is host floats).
    """
    if not isinstance(plan, BlockSparsePlan):
        raise TypeError(f"plan must be a vidsparse.BlockSparsePlan, got {type(plan).__name__}.")
    if path is None:
        path = "key_block" if plan.group_spans is not None else "query_tile"
    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS} (or None for the plan's own), got {path!r}.")
    if path == "key_block" and plan.group_spans is None:
        raise ValueError(
            "path='key_block' needs a plan with group_spans (a per-query VMoBA plan with path='key_block'); "
            "this plan runs on the query-tile path only."
        )
    for name, n in (("block_m", block_m), ("block_n", block_n)):
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"{name} must be a positive int (kernel tile), got {n!r}.")
    S = plan.layout.seq_len
    bs = plan.block_size
    if path == "key_block":
        per_bh = keyblock.computed_pairs(plan, block_m, block_n)  # [B, H]
        tile = (block_m, block_n)
    else:
        per_bh = plan.kv_counts.double().sum(dim=-1) * (bs * bs)  # [Bp, Hp]
        tile = (bs, bs)
    kept = _kept_pairs(plan)
    return PlanWork(
        path=path,
        computed_pairs=float(per_bh.mean()),
        kept_pairs=float(kept.mean()),
        dense_pairs=S * S,
        tile=tile,
        per_head_computed=tuple(float(x) for x in per_bh.mean(dim=0).cpu()),
    )


def _kept_pairs(plan: BlockSparsePlan) -> torch.Tensor:
    """float64 [B|1, H|1]: (query, key) pairs of the token mask, valid tokens only."""
    bs, nk = plan.block_size, plan.num_blocks
    valid = plan.order.token_valid.to(plan.device)
    per_block = valid.view(nk, bs).sum(dim=1).double()  # valid keys per kernel block
    if plan.query_select is not None:
        size = torch.zeros(plan.query_select.shape[-1], dtype=torch.float64, device=plan.device)
        size.index_add_(0, plan.key_group.to(plan.device).long(), per_block)
        kept = plan.query_select.double() @ size  # [B, H, S_pad]: keys kept per row
        return (kept * valid).sum(dim=-1)
    rows_valid = valid.view(nk, bs).double()  # [NQ, bs]
    n_masks = plan.block_masks.shape[0]
    row_pop = plan.block_masks.sum(dim=-1).double() if n_masks else torch.zeros(1, bs, dtype=torch.float64)
    row_pop = row_pop.to(plan.device)
    counts, idx, mids = plan.kv_counts.long(), plan.kv_indices.long(), plan.mask_ids.long()
    total = torch.zeros(counts.shape[:2], dtype=torch.float64, device=plan.device)
    slot = torch.arange(idx.shape[-1], device=plan.device)
    for q0 in range(0, counts.shape[-1], _ROWS_PER_STEP):
        q1 = min(counts.shape[-1], q0 + _ROWS_PER_STEP)
        listed = slot < counts[:, :, q0:q1, None]  # [Bp, Hp, n, K]
        rv = rows_valid[q0:q1]  # [n, bs]
        masked = (row_pop[mids[:, :, q0:q1].clamp_min(0)] * rv[None, None, :, None, :]).sum(dim=-1)
        whole = rv.sum(dim=-1)[None, None, :, None] * per_block[idx[:, :, q0:q1]]
        pairs = torch.where(mids[:, :, q0:q1] >= 0, masked, whole)
        total += (pairs * listed).sum(dim=(-1, -2))
    return total


def keeps_every_pair(plan: BlockSparsePlan) -> bool:
    """Whether a static plan keeps every (query, key) pair of valid tokens: its attention is then
    exactly dense attention, which the model's own attention computes without the plan's padding
    (``SparseConfig.dense_when_full``). Per-query selections (VMoBA) are never counted as full.
    One host synchronisation; the exact count runs only when every query block lists every block."""
    if not isinstance(plan, BlockSparsePlan):
        raise TypeError(f"plan must be a vidsparse.BlockSparsePlan, got {type(plan).__name__}.")
    if plan.query_select is not None or not bool((plan.kv_counts == plan.num_blocks).all()):
        return False
    S = plan.layout.seq_len
    return float(_kept_pairs(plan).min()) >= S * S


def layer_span(first: int, last: int) -> str:
    """``layer 3`` or ``layers 1-3``: how reports name a run of consecutive layers."""
    return f"layer {first}" if first == last else f"layers {first}-{last}"


def no_speedup_warning(layers: str, path: str, work: float | None, token_density: float) -> str | None:
    """The warning for ``layers`` (a ``layer_span``) whose kernel ``path`` computes ``work`` >=
    ``WORK_WARNING`` of dense; ``None`` below that or where work was not measured."""
    if work is None or work < WORK_WARNING:
        return None
    return (
        f"{layers}: the {path.replace('_', '-')} path computes {work:.0%} of dense attention "
        f"(mask keeps {token_density:.0%}): no attention speedup over dense on this grid"
    )


__all__ = [
    "PATHS",
    "WORK_WARNING",
    "PlanWork",
    "executed_path",
    "executed_work",
    "keeps_every_pair",
    "kernel_tiles",
    "layer_span",
    "no_speedup_warning",
    "plan_work",
]
