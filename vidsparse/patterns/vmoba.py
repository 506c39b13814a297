"""VMoBA: Video Mixture of Block Attention (KwaiVGI/VMoBA, arXiv 2506.23858), a dynamic pattern.

Keys are cut into blocks whose shape cycles with the layer (paper Eq. 1-2): temporal slabs of
whole frames, spatial tiles spanning all frames, then 3D cubes. Each block is summarised by the
mean of its keys; the gate of query ``i`` for block ``j`` is the raw dot product
``q_i . mean(K_j)`` (no softmax scale). Every video query keeps its own block plus:

- ``select_mode="topk"``: the ``k - 1`` other blocks with the highest gate (``k`` counts the own
  block, as MoBA's ``+1e9`` on the self gate does);
- ``select_mode="threshold"`` (tau, default 0.25): gates min-max normalised over the pool,
  ``remain = max(tau - self / (total + eps), 0)``; other blocks in descending order are added
  until their cumulative normalised mass / (total + eps) reaches ``remain`` (the block that
  reaches it is kept, so at least one other block always is; the self mass counts toward tau).

``scope="query"`` pools per (query, head) over blocks (MoBA style, the released code's default
``threshold_type='query_head'``); ``scope="head"`` pools per (sample, head) over all
(block, query) pairs (the paper's global selection, Eq. 3, ``'head_global'``).

Deliberate deviations from the released ``src/vmoba.py`` (see shared/reference/vmoba.md):
- any grid: border blocks are ragged instead of asserting divisibility;
- ``scope="head"`` pools per sample; the released code pools over the whole varlen batch, so
  one sample's selection there depends on the other samples;
- ties are broken by lower block id, then lower natural query index (the released code uses
  an unstable sort); the own block is never the "first other block" the threshold rule adds
  (the released code zeroes it and can, on an exact tie at zero, pick it instead);
- tau = 1 keeps every block exactly (the exact-arithmetic result; the released fp32 cutoff can
  drop zero-similarity blocks by rounding);
- no full-attention fallback when only own blocks are chosen;
- text (MM-DiT models): video queries attend their selection plus every valid text token,
  text queries attend everything (the released code has no text tokens).

Kernel plan: each VMoBA block is made contiguous in kernel order and padded to whole kernel
blocks, so a kernel block belongs to exactly one VMoBA block (``key_group``); text blocks share
one extra group that is always kept. ``query_select[b, h, row, g]`` carries the per-query choice,
stored group-major (each group's rows contiguous: one load per key tile in the kernels),
and ``kv_indices`` the union over each kernel query block, built on the device with fixed shapes
(MAXK = number of key blocks): no ``.item()``, ``nonzero`` or ``unique`` in the per-call path.
``granularity="tile"`` selects once per kernel query tile instead (no ``query_select``).

Kernel paths (``path``). Per-query selections run by default key-block-major
(``vidsparse.kernels.keyblock``, the released code's packing): the plan also carries
``group_spans`` (each group's keys in kernel order), and for each (head, key block) only the
query rows that chose it are computed, then merged exactly by log-sum-exp. That work is close
to the selection's token density (``vidsparse.work.plan_work``). ``path="query_tile"`` keeps
the query-major lists only: fixed shapes and no host sync, but each 128-row tile computes
the union of its rows' blocks, which at Wan 480p is every block (block density 1.0).

Memory per call (S = video tokens, G = VMoBA blocks, B batch, H heads, NK kernel blocks, D head
dim): outputs ``query_select`` B*H*S_pad*(G+1) bytes (none for "tile") and ``kv_indices`` plus
``mask_ids`` 8*B*H*NK^2 bytes (+ 8*B*H*NK^2 transient for the sort); fp32 copies of one head
chunk of q and k (2*4*S*hc*D); selection temporaries of about 40 bytes per gate entry for
E = min(S*G*H, _SELECT_ELEMENTS) entries at a time with ``scope="query"`` (heads, then query
rows, are chunked) and E = S*G (one head) with ``scope="head"`` ("tile": E = NK*G per head).
At Wan 480p (S = 32,760, H = 12, G = 72) that is 28 MB of ``query_select`` and about 100 MB of
temporaries; the released code holds several G*H*S fp32 tensors (113 MB each at G = 72,
0.5 GB at FastVideo's G = 325) plus an int64 sort index of twice that size.
"""

from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

from vidsparse.layout import VideoLayout
from vidsparse.patterns.base import Pattern
from vidsparse.plan import BlockSparsePlan, KernelOrder, kernel_order

# Gate entries (rows x blocks) evaluated per selection step; bounds the selection temporaries.
_SELECT_ELEMENTS = 1 << 22
# Released-code constant: guards the min-max denominator and the mass ratios.
_EPS = 1e-6

PARTITIONS = ("temporal", "spatial", "spatiotemporal")
_SCOPES = {"query": "query", "query_head": "query", "head": "head", "head_global": "head"}
_MODES = ("threshold", "topk")
_PATHS = ("auto", "key_block", "query_tile")


def _int_tuple(value, n: int, name: str, minimum: int, example: str) -> tuple[int, ...]:
    """An int (broadcast) or a sequence of ``n`` ints >= minimum, as a tuple (JSON lists accepted)."""
    if isinstance(value, int) and not isinstance(value, bool):
        values = (value,) * n
    elif (
        isinstance(value, (tuple, list))
        and len(value) == n
        and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    ):
        values = tuple(value)
    else:
        raise TypeError(f"VMoBA.{name} must be an int or {n} ints such as {example}, got {value!r}.")
    if any(v < minimum for v in values):
        raise ValueError(f"VMoBA.{name} must be >= {minimum} everywhere, got {value!r}; e.g. {name}={example}.")
    return values


@dataclass(frozen=True)
class VMoBA(Pattern):
    """Video Mixture of Block Attention: per-query block selection on pooled keys.

    Defaults follow the paper's Wan 2.1 480p setting (latent 21x30x52: 7 temporal, 24 spatial,
    72 spatio-temporal blocks) with the released code's selection (threshold 0.25, per query);
    (2, 6, 18) is the paper's training-free 480p ``topk``. Layer ``l`` uses partition
    ``(l - layer_offset) mod sum(layer_cycle)`` counted against ``layer_cycle``.

    ``granularity="token"`` is the published rule: every query row selects for itself, so a
    kernel query tile computes the union of its rows' blocks under a per-row mask (with random
    q/k that union is nearly every block: correct, but no kernel speedup). ``"tile"`` selects
    once per kernel query tile (``block_size`` rows of one VMoBA block) with the tile's mean
    query (= the mean of its rows' gates, the gate being linear in q): the kernel then skips
    exactly what the mask drops, but the mask depends on ``block_size``.

    Args:
        temporal_chunk: latent frames per key block of the temporal layers (slabs of whole frames).
        spatial_chunk: (h, w) tokens per key block of the spatial layers (each spans all frames).
        st_chunk: (t, h, w) tokens per key block of the spatio-temporal layers.
        select_mode: ``"threshold"`` keeps blocks until their normalised gate mass reaches
            ``threshold``; ``"topk"`` keeps the ``topk`` blocks with the highest gates.
        threshold: fraction of the normalised gate mass to keep, in (0, 1], own block included
            (used only with select_mode="threshold").
        topk: blocks each query keeps, its own block included: an int, or one per partition
            (temporal, spatial, spatio-temporal); used only with select_mode="topk".
        scope: ``"query"`` selects per (query, head), the released code's default
            (alias ``"query_head"``); ``"head"`` per (sample, head) over all queries, the paper's
            global selection (alias ``"head_global"``).
        layer_offset: layer index where the cycle starts (FastVideo's ``first_full_layer``).
        layer_cycle: consecutive temporal, spatial and spatio-temporal layers of one cycle
            (FastVideo's ``temporal_layer/spatial_layer/st_layer``); (1, 0, 1) is the paper's
            1-3D ablation.
        granularity: ``"token"``: every query row selects its own blocks (published);
            ``"tile"``: one selection per kernel query tile, from the tile's mean query.
        path: kernel path, ``"auto"`` (key-block-major for ``"token"``, query-tile for
            ``"tile"``), ``"key_block"`` (``"token"`` only) or ``"query_tile"``; the mask is
            the same on either path.
    """

    name: ClassVar[str] = "vmoba"
    dynamic: ClassVar[bool] = True
    uses_layer: ClassVar[bool] = True

    temporal_chunk: int = 3
    spatial_chunk: tuple[int, int] = (5, 13)
    st_chunk: tuple[int, int, int] = (7, 5, 13)
    select_mode: Literal["threshold", "topk"] = "threshold"
    threshold: float = 0.25
    topk: int | tuple[int, int, int] = (2, 6, 18)
    scope: Literal["query", "head", "query_head", "head_global"] = "query"
    layer_offset: int = 0
    layer_cycle: tuple[int, int, int] = (1, 1, 1)
    granularity: Literal["token", "tile"] = "token"
    path: Literal["auto", "key_block", "query_tile"] = "auto"

    def __post_init__(self) -> None:
        set_ = functools.partial(object.__setattr__, self)
        if isinstance(self.temporal_chunk, bool) or not isinstance(self.temporal_chunk, int):
            raise TypeError(
                f"VMoBA.temporal_chunk must be an int (latent frames per block), got {self.temporal_chunk!r}."
            )
        if self.temporal_chunk < 1:
            raise ValueError(f"VMoBA.temporal_chunk must be >= 1 latent frame, got {self.temporal_chunk}; e.g. 3.")
        set_("spatial_chunk", _int_tuple(self.spatial_chunk, 2, "spatial_chunk", 1, "(5, 13)"))
        set_("st_chunk", _int_tuple(self.st_chunk, 3, "st_chunk", 1, "(7, 5, 13)"))
        if self.select_mode not in _MODES:
            raise ValueError(f"VMoBA.select_mode must be one of {_MODES}, got {self.select_mode!r}.")
        tau = self.threshold
        if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not (0.0 < float(tau) <= 1.0):
            raise ValueError(
                f"VMoBA.threshold must be a number in (0, 1] (fraction of normalised similarity mass, "
                f"paper default 0.25), got {tau!r}."
            )
        set_("threshold", float(tau))
        if isinstance(self.topk, int) and not isinstance(self.topk, bool):
            if self.topk < 1:
                raise ValueError(f"VMoBA.topk must be >= 1 (it counts the own block), got {self.topk}.")
        else:
            set_("topk", _int_tuple(self.topk, 3, "topk", 1, "(2, 6, 18)"))
        # The other selection mode's option is unused. Set alone (the mode's own option left at its
        # default) it is almost always a forgotten select_mode: VMoBA(topk=3) selects by threshold.
        unused, used = ("topk", "threshold") if self.select_mode == "threshold" else ("threshold", "topk")
        if getattr(self, unused) != _DEFAULTS[unused] and getattr(self, used) == _DEFAULTS[used]:
            warnings.warn(
                f"VMoBA.{unused}={getattr(self, unused)!r} is used only with select_mode={unused!r}, but "
                f"select_mode={self.select_mode!r} selects by {used}. Pass select_mode={unused!r} to select by "
                f"{unused}.",
                stacklevel=3,
            )
        if self.scope not in _SCOPES:
            raise ValueError(
                f"VMoBA.scope must be 'query' (per query and head, released default) or 'head' "
                f"(per head over all queries, the paper's global selection), got {self.scope!r}."
            )
        set_("scope", _SCOPES[self.scope])
        if isinstance(self.layer_offset, bool) or not isinstance(self.layer_offset, int):
            raise TypeError(f"VMoBA.layer_offset must be an int, got {self.layer_offset!r}.")
        cycle = _int_tuple(self.layer_cycle, 3, "layer_cycle", 0, "(1, 1, 1)")
        if sum(cycle) < 1:
            raise ValueError(f"VMoBA.layer_cycle needs at least one layer in the cycle, got {cycle}; e.g. (1, 1, 1).")
        set_("layer_cycle", cycle)
        if self.granularity not in ("token", "tile"):
            raise ValueError(
                f"VMoBA.granularity must be 'token' (per-query selection, published) or 'tile' (one "
                f"selection per kernel query tile), got {self.granularity!r}."
            )
        if self.path not in _PATHS:
            raise ValueError(
                f"VMoBA.path must be one of {_PATHS} ('key_block': per key block, only the queries that chose it; "
                f"'query_tile': per query tile, the union of its rows' blocks), got {self.path!r}."
            )
        if self.path == "key_block" and self.granularity == "tile":
            raise ValueError(
                "VMoBA.path='key_block' computes per-query selections; granularity='tile' already gives exact "
                "query-tile lists. Use path='query_tile' (or 'auto') with granularity='tile'."
            )

    @property
    def kernel_path(self) -> str:
        """'key_block' or 'query_tile': the path ``path='auto'`` resolves to (key_block for per-query selection)."""
        if self.path != "auto":
            return self.path
        return "key_block" if self.granularity == "token" else "query_tile"

    # -- per-layer partition -----------------------------------------------------------
    def partition(self, layer: int) -> str:
        """'temporal', 'spatial' or 'spatiotemporal': the key-block partition of ``layer``."""
        m = (int(layer) - self.layer_offset) % sum(self.layer_cycle)
        bound = 0
        for kind, count in zip(PARTITIONS, self.layer_cycle, strict=True):
            bound += count
            if m < bound:
                return kind
        raise AssertionError("unreachable: layer_cycle sums to at least 1")

    def block_shape(self, layout: VideoLayout, layer: int) -> tuple[int, int, int]:
        """(t, h, w) of one key block in latent tokens, clamped to the grid (border blocks are ragged)."""
        F, H, W = layout.grid
        kind = self.partition(layer)
        if kind == "temporal":
            return (min(self.temporal_chunk, F), H, W)
        if kind == "spatial":
            return (F, min(self.spatial_chunk[0], H), min(self.spatial_chunk[1], W))
        return tuple(min(c, n) for c, n in zip(self.st_chunk, (F, H, W), strict=True))  # type: ignore[return-value]

    def num_blocks(self, layout: VideoLayout, layer: int) -> int:
        """Number of key blocks of ``layer`` on this grid."""
        return math.prod(-(-n // c) for n, c in zip(layout.grid, self.block_shape(layout, layer), strict=True))

    def layer_topk(self, layer: int) -> int:
        """k of ``select_mode="topk"`` for this layer (own block included)."""
        if isinstance(self.topk, int):
            return self.topk
        return self.topk[PARTITIONS.index(self.partition(layer))]

    # -- dynamic plan --------------------------------------------------------------------
    def dynamic_plan(
        self,
        layout: VideoLayout,
        q: torch.Tensor,
        k: torch.Tensor,
        layer: int,
        block_size: int,
    ) -> BlockSparsePlan:
        """Select blocks from q, k [B, S, H, D] and pack the plan, on q's device, without host syncs."""
        _check_qk(layout, q, k, block_size)
        B, _, H, D = q.shape
        device = q.device
        blk = _block_structure(layout, self.block_shape(layout, layer), block_size, str(device))
        Gv, Sv = blk.num_groups, layout.video_len
        acc = torch.promote_types(q.dtype, torch.float32)
        vo = layout.video_offset
        select = self._selector(layer, Gv)
        tiles = self.granularity == "tile"

        if tiles:
            qs = None
            group_any = blk.tile_template.expand(B, H, *blk.tile_template.shape).clone()  # [B, H, NQ, G]
        else:
            # Group-major [B, H, G, S_pad] (rows contiguous per group): the layout the kernels read.
            qs_gm = blk.row_template.expand(B, H, *blk.row_template.shape).clone()
        with torch.no_grad():
            hc = max(1, min(H, _SELECT_ELEMENTS // max(1, Sv * Gv)))
            rows = Sv if (self.scope == "head" or hc > 1) else max(1, _SELECT_ELEMENTS // Gv)
            for b in range(B):
                for h0 in range(0, H, hc):
                    h1 = min(H, h0 + hc)
                    means = _segment_mean(k[b, vo : vo + Sv, h0:h1], blk.token_group, blk.group_size, acc)
                    if tiles:
                        qt = _segment_mean(q[b, vo : vo + Sv, h0:h1], blk.tile_of, blk.tile_size, acc)
                        gate = torch.einsum("thd,ghd->htg", qt, means)  # [hc, NQv, Gv]
                        own = blk.tile_group[:, None] == blk.group_ids[None, :]
                        group_any[b, h0:h1, : blk.tile_group.numel(), :Gv] = select(gate, own)
                        continue
                    for r0 in range(0, Sv, rows):
                        r1 = min(Sv, r0 + rows)
                        qv = q[b, vo + r0 : vo + r1, h0:h1].detach().to(acc)  # [rows, hc, D]
                        gate = torch.einsum("rhd,ghd->hrg", qv, means)  # [hc, rows, Gv]
                        own = blk.token_group[r0:r1, None] == blk.group_ids[None, :]  # [rows, Gv]
                        qs_gm[b, h0:h1, :Gv, blk.video_pos[r0:r1]] = select(gate, own).transpose(1, 2)
        if not tiles:
            nk = blk.key_group.numel()
            group_any = qs_gm.view(B, H, -1, nk, block_size).any(dim=-1).transpose(2, 3)  # [B, H, NQ, G]
            qs = qs_gm.transpose(2, 3)  # [B, H, S_pad, G], group-major (vidsparse.plan.group_major)
        counts, indices, mids = _pack_union(group_any, blk)
        return BlockSparsePlan(
            layout=layout,
            block_size=block_size,
            num_heads=H,
            order=blk.order,
            kv_counts=counts,
            kv_indices=indices,
            mask_ids=mids,
            block_masks=blk.block_masks,
            text_blocks=blk.text_blocks,
            query_select=qs,
            key_group=None if tiles else blk.key_group,
            group_spans=blk.group_spans if self.kernel_path == "key_block" else None,
            pattern_name=self.name,
        )

    def _selector(self, layer: int, num_groups: int):
        """gate [U, N, G], own bool [N, G] -> kept bool [U, N, G] for this layer's mode and scope."""
        if self.select_mode == "threshold":
            if self.threshold >= 1.0:
                return lambda gate, own: torch.ones_like(gate, dtype=torch.bool)
            fn = _threshold_query if self.scope == "query" else _threshold_head
            return functools.partial(fn, tau=self.threshold)
        k = min(self.layer_topk(layer), num_groups)
        fn = _topk_query if self.scope == "query" else _topk_head
        return functools.partial(fn, k=k)


# -- selection rules (pure, fixed shapes) --------------------------------------------------
_DEFAULTS = {"topk": VMoBA.topk, "threshold": VMoBA.threshold}  # of the two selection modes


def _minmax(x: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    lo = x.amin(dim=dims, keepdim=True)
    span = x.amax(dim=dims, keepdim=True) - lo
    span = torch.where(span <= _EPS, torch.ones_like(span), span)
    return (x - lo) / span


def _cumulative_pick(key: torch.Tensor, total: torch.Tensor, remain: torch.Tensor) -> torch.Tensor:
    """Along the last dim: descending by ``key`` (own entries hold -1 and sort last), keep the
    entries up to and including the first whose cumulative mass / (total + eps) >= remain."""
    vals, idx = torch.sort(key, dim=-1, descending=True, stable=True)
    vals.clamp_(min=0)
    before = vals.cumsum(dim=-1)
    before = torch.cat([torch.zeros_like(before[..., :1]), before[..., :-1]], dim=-1)  # exclusive
    keep = before / (total + _EPS) < remain
    keep[..., 0] = True
    return torch.zeros_like(keep).scatter_(-1, idx, keep)


def _threshold_query(gate: torch.Tensor, own: torch.Tensor, tau: float) -> torch.Tensor:
    norm = _minmax(gate, (-1,))
    total = norm.sum(dim=-1, keepdim=True)
    remain = (tau - (norm * own).sum(dim=-1, keepdim=True) / (total + _EPS)).clamp_min(0)
    return _cumulative_pick(norm.masked_fill_(own, -1.0), total, remain) | own


def _threshold_head(gate: torch.Tensor, own: torch.Tensor, tau: float) -> torch.Tensor:
    U, N, G = gate.shape
    norm = _minmax(gate, (1, 2))
    total = norm.sum(dim=(1, 2)).view(U, 1)
    remain = (tau - (norm * own).sum(dim=(1, 2)).view(U, 1) / (total + _EPS)).clamp_min(0)
    flat = norm.masked_fill_(own, -1.0).transpose(1, 2).reshape(U, G * N)  # pool order (block, query)
    keep = _cumulative_pick(flat, total, remain)
    return keep.view(U, G, N).transpose(1, 2) | own


def _topk_query(gate: torch.Tensor, own: torch.Tensor, k: int) -> torch.Tensor:
    if k <= 1:
        return own.expand_as(gate).clone()
    idx = torch.sort(gate.masked_fill(own, float("-inf")), dim=-1, descending=True, stable=True).indices
    keep = torch.arange(gate.shape[-1], device=gate.device) < k - 1
    return torch.zeros_like(gate, dtype=torch.bool).scatter_(-1, idx, keep.expand_as(idx)) | own


def _topk_head(gate: torch.Tensor, own: torch.Tensor, k: int) -> torch.Tensor:
    U, N, G = gate.shape
    if k <= 1:
        return own.expand_as(gate).clone()
    flat = gate.masked_fill(own, float("-inf")).transpose(1, 2).reshape(U, G * N)
    idx = torch.sort(flat, dim=-1, descending=True, stable=True).indices
    keep = torch.arange(G * N, device=gate.device) < (k - 1) * N
    kept = torch.zeros_like(flat, dtype=torch.bool).scatter_(-1, idx, keep.expand_as(idx))
    return kept.view(U, G, N).transpose(1, 2) | own


def _segment_mean(x: torch.Tensor, segment: torch.Tensor, size: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """Mean of the rows of x [N, h, D] per segment id -> [n_segments, h, D] in ``acc``."""
    out = torch.zeros(size.numel(), *x.shape[1:], dtype=acc, device=x.device)
    out.index_add_(0, segment, x.detach().to(acc))
    return out.div_(size.to(acc).view(-1, 1, 1))


# -- static structure per (layout, block shape, kernel block, device) ---------------------
@dataclass(frozen=True, eq=False)
class _Blocks:
    num_groups: int  # video key blocks Gv (the text group, if any, is Gv)
    token_group: torch.Tensor  # int64 [Sv]: VMoBA block of each natural video token
    group_ids: torch.Tensor  # int64 [Gv]
    group_size: torch.Tensor  # int64 [Gv]: tokens per block
    video_pos: torch.Tensor  # int64 [Sv]: kernel position of each natural video token
    order: KernelOrder
    key_group: torch.Tensor  # int32 [NK]
    col_mid: torch.Tensor  # int64 [NK]: column-padding mask id, -1 = whole block
    block_masks: torch.Tensor  # bool [P, bs, bs]
    text_blocks: torch.Tensor  # bool [NK]
    row_template: torch.Tensor  # bool [G, S_pad] (group-major): text rows keep all, video rows keep text
    tile_of: torch.Tensor  # int64 [Sv]: kernel query tile of each natural video token
    tile_size: torch.Tensor  # int64 [NQv]: valid rows per video tile
    tile_group: torch.Tensor  # int64 [NQv]: VMoBA block of each video tile
    tile_template: torch.Tensor  # bool [NQ, G]: row_template per tile
    group_spans: torch.Tensor  # int32 [G, 2]: first kernel position and number of keys per group


@functools.lru_cache(maxsize=32)
def _block_structure(layout: VideoLayout, shape: tuple[int, int, int], bs: int, device: str) -> _Blocks:
    """Block ids, the block-contiguous kernel order and the static plan parts (cached by value)."""
    Sv = layout.video_len
    f, h, w = layout.coords(torch.arange(Sv))
    nb = [-(-n // c) for n, c in zip(layout.grid, shape, strict=True)]
    group = ((f // shape[0]) * nb[1] + h // shape[1]) * nb[2] + w // shape[2]
    G = math.prod(nb)
    # Tokens of a block in raster order (= ascending natural index), each block padded to whole kernel blocks.
    perm = torch.argsort(group, stable=True)
    size = torch.bincount(group, minlength=G)
    padded = -(-size // bs) * bs
    start = torch.cumsum(size, 0) - size
    offset = torch.cumsum(padded, 0) - padded
    gs = group[perm]
    video_order = torch.full((int(padded.sum()),), -1, dtype=torch.int64)
    video_order[offset[gs] + torch.arange(Sv) - start[gs]] = perm
    order = kernel_order(layout, video_order, bs)

    nk = order.padded_len // bs
    nvb = order.text_start // bs
    has_text = layout.text_len > 0
    key_group = torch.full((nk,), G, dtype=torch.int32)
    key_group[:nvb] = torch.repeat_interleave(torch.arange(G, dtype=torch.int32), padded // bs)
    n_valid = order.token_valid.view(nk, bs).sum(dim=1)
    col_mid = torch.full((nk,), -1, dtype=torch.int64)
    masks: dict[int, int] = {}
    for kb in torch.nonzero(n_valid < bs).flatten().tolist():
        col_mid[kb] = masks.setdefault(int(n_valid[kb]), len(masks))
    cols = torch.arange(bs)
    block_masks = (
        torch.stack([(cols < n).expand(bs, bs) for n in masks]) if masks else torch.zeros(0, bs, bs, dtype=torch.bool)
    )
    text_blocks = torch.zeros(nk, dtype=torch.bool)
    text_blocks[nvb:] = True

    row_template = torch.zeros(order.padded_len, G + int(has_text), dtype=torch.bool)
    if has_text:
        row_template[: order.text_start, G] = order.token_valid[: order.text_start]
        row_template[order.text_start : order.text_start + layout.text_len] = True
    video_pos = order.scatter[layout.video_offset + torch.arange(Sv)]
    tile_of = video_pos // bs
    dev = torch.device(device)
    return _Blocks(
        num_groups=G,
        token_group=group.to(dev),
        group_ids=torch.arange(G, device=dev),
        group_size=size.to(dev),
        video_pos=video_pos.to(dev),
        order=KernelOrder(
            gather=order.gather.to(dev),
            scatter=order.scatter.to(dev),
            token_valid=order.token_valid.to(dev),
            video_index=order.video_index.to(dev),
            text_start=order.text_start,
            padded_len=order.padded_len,
            identity=order.identity,
        ),
        key_group=key_group.to(dev),
        col_mid=col_mid.to(dev),
        block_masks=block_masks.to(dev),
        text_blocks=text_blocks.to(dev),
        row_template=row_template.T.contiguous().to(dev),
        tile_of=tile_of.to(dev),
        tile_size=torch.bincount(tile_of, minlength=nvb).to(dev),
        tile_group=key_group[:nvb].long().to(dev),
        tile_template=row_template.view(nk, bs, -1).any(dim=1).to(dev),
        group_spans=_group_spans(offset, size, order.text_start, layout.text_len).to(dev),
    )


def _group_spans(offset: torch.Tensor, size: torch.Tensor, text_start: int, text_len: int) -> torch.Tensor:
    """int32 [G (+1 text), 2]: (kernel position of the first key, keys) of each group."""
    spans = torch.stack([offset, size], dim=1)
    if text_len:
        spans = torch.cat([spans, torch.tensor([[text_start, text_len]])])
    return spans.to(torch.int32)


def _pack_union(group_any: torch.Tensor, blk: _Blocks) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Ascending key blocks of every group kept by a query block (bool [B, H, NQ, G])."""
    nk = blk.key_group.numel()
    listed = group_any.index_select(-1, blk.key_group.long())  # [B, H, NQ, NK]
    counts = listed.sum(dim=-1, dtype=torch.int32)
    order = torch.argsort((~listed).to(torch.int8), dim=-1, stable=True)
    live = torch.arange(nk, device=listed.device) < counts.unsqueeze(-1)
    indices = torch.where(live, order, 0).to(torch.int32)
    mids = torch.where(live, blk.col_mid[order], -1).to(torch.int32)
    return counts, indices, mids


def _check_qk(layout: VideoLayout, q: torch.Tensor, k: torch.Tensor, block_size: int) -> None:
    if not isinstance(layout, VideoLayout):
        raise TypeError(f"layout must be a vidsparse.VideoLayout, got {type(layout).__name__}.")
    for name, t in (("q", q), ("k", k)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4 or not t.is_floating_point():
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"VMoBA needs {name} as a floating tensor [B, S, H, D], got {got}.")
    if q.shape != k.shape or q.device != k.device:
        raise ValueError(
            f"VMoBA needs q and k of one shape on one device, got q {tuple(q.shape)} on {q.device}, "
            f"k {tuple(k.shape)} on {k.device}."
        )
    layout.check_seq_len(q.shape[1])
    if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size < 1:
        raise ValueError(f"block_size must be a positive int (kernel tile, e.g. 64 or 128), got {block_size!r}.")


def selection_density(plan: BlockSparsePlan) -> torch.Tensor:
    """float [B, H]: fraction of (video query, video key) pairs a VMoBA plan keeps (no host sync)."""
    bs, order = plan.block_size, plan.order
    nk = plan.num_blocks
    per_block = order.token_valid.view(nk, bs).sum(dim=1).double() * ~plan.text_blocks  # video tokens
    if plan.query_select is None:  # granularity="tile": the key lists are the selection
        live = torch.arange(plan.kv_indices.shape[-1], device=plan.device) < plan.kv_counts.unsqueeze(-1)
        keys = (per_block[plan.kv_indices.long()] * live).sum(dim=-1)  # [B, H, NQ]
        return (keys * per_block).sum(dim=-1) / plan.layout.video_len**2
    size = torch.zeros(plan.query_select.shape[-1], dtype=torch.float64, device=per_block.device)
    size.index_add_(0, plan.key_group.long(), per_block)
    rows = order.token_valid.clone()
    rows[order.text_start :] = False
    kept = plan.query_select[:, :, rows].double() @ size  # [B, H, Sv]
    return kept.mean(dim=-1) / plan.layout.video_len
