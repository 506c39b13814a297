"""BlockSparsePlan: the one contract between patterns and kernels.

Kernels see a *kernel sequence*: the video tokens in the pattern's order (tile-major, or
frame-padded, ...) padded to a multiple of ``block_size``, followed by the text tokens
padded likewise. ``gather`` maps kernel positions to the caller's token order and
``scatter`` maps back. The sequence is cut into blocks of ``block_size`` tokens; for every
(batch, head, query block) the plan lists the key blocks to compute. A listed block is
either computed whole (``mask_ids == -1``) or under an element mask ``block_masks[id]``.

Two run-time masks complete it:
- ``text_mask`` [B, text_len] (padding of the text span), applied in ``text_blocks``;
- ``query_select`` [B, H, S_pad, G] (dynamic patterns such as VMoBA: query row r keeps
  key block kb only if ``query_select[..., r, key_group[kb]]``), indexed [b, h, row, group]
  but stored group-major (``group_major``: row stride 1, ``query_select.transpose(-1, -2)``
  contiguous), so the rows of a query tile for one group are one contiguous load. Kernels
  that walk a query tile's keys read the selection once per key tile; row-major storage made
  that a gather of one byte every G bytes. Other strides stay valid (backends copy them).

Optional key-block-major extension (per-query selections): ``group_spans`` int32 [G, 2]
gives, for each selection group g (the last dim of ``query_select``), the kernel position
of its first key and its number of keys; a group's keys are contiguous there. A plan that
carries it asks backends that implement the key-block-major path
(``vidsparse.kernels.keyblock``: torch, triton) to compute, per group, only the query rows
that select it and merge the partials exactly. The query-major lists stay complete and
valid, so every other backend runs the same plan, same result, by the query-tile path.

Padding query rows are "don't care": their output is dropped by ``scatter``. A kernel
must return zeros (not NaN) for a row whose keys are all masked.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from vidsparse.layout import VideoLayout
from vidsparse.lru import LRUCache

if TYPE_CHECKING:  # patterns import this module (a runtime import would be a cycle)
    from vidsparse.patterns.base import Pattern

DEFAULT_BLOCK_SIZE = 128
# Element evaluations per chunk while building a plan (bounds the builder's memory).
_CHUNK_ELEMENTS = 1 << 24


@dataclass(frozen=True, eq=False)
class KernelOrder:
    """Where each token sits in the kernel sequence."""

    gather: torch.Tensor  # int64 [S_pad]: caller index per kernel position (0 for padding)
    scatter: torch.Tensor  # int64 [S]: kernel position per caller index
    token_valid: torch.Tensor  # bool [S_pad]
    video_index: torch.Tensor  # int64 [Vp]: natural video index per video position, -1 = pad
    text_start: int  # kernel position of the first text token (= padded video length)
    padded_len: int
    identity: bool  # kernel order == caller order, no padding

    def to(self, device: torch.device | str) -> KernelOrder:
        return replace(
            self,
            gather=self.gather.to(device),
            scatter=self.scatter.to(device),
            token_valid=self.token_valid.to(device),
            video_index=self.video_index.to(device),
        )

    def same_as(self, other: KernelOrder) -> bool:
        """Whether ``other`` puts every token at the same kernel position (host tensors)."""
        return (
            self.padded_len == other.padded_len
            and torch.equal(self.gather.cpu(), other.gather.cpu())
            and bool(torch.equal(self.token_valid.cpu(), other.token_valid.cpu()))
        )

    def to_kernel(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """Caller order -> kernel order along ``dim`` (length S -> S_pad; padding positions 0)."""
        if self.identity:
            return x
        out = x.index_select(dim, self.gather.to(x.device))
        shape = [1] * x.dim()
        shape[dim] = self.padded_len
        return out * self.token_valid.to(x.device, x.dtype).view(shape)

    def to_caller(self, y: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """Kernel order -> caller order along ``dim`` (the inverse of ``to_kernel``)."""
        return y if self.identity else y.index_select(dim, self.scatter.to(y.device))


def kernel_order(layout: VideoLayout, video_order: torch.Tensor | None, block_size: int) -> KernelOrder:
    """Build the kernel sequence for a layout and a pattern's video order."""
    if video_order is None:
        video_order = torch.arange(layout.video_len, dtype=torch.int64)
    video_order = video_order.to(torch.int64).cpu()
    vp = _round_up(video_order.numel(), block_size)
    video_index = torch.full((vp,), -1, dtype=torch.int64)
    video_index[: video_order.numel()] = video_order
    tp = _round_up(layout.text_len, block_size)
    padded_len = vp + tp

    gather = torch.zeros(padded_len, dtype=torch.int64)
    valid = torch.zeros(padded_len, dtype=torch.bool)
    vmask = video_index >= 0
    gather[:vp][vmask] = video_index[vmask] + layout.video_offset
    valid[:vp] = vmask
    if layout.text_len:
        gather[vp : vp + layout.text_len] = torch.arange(layout.text_len) + layout.text_offset
        valid[vp : vp + layout.text_len] = True

    scatter = torch.empty(layout.seq_len, dtype=torch.int64)
    positions = torch.nonzero(valid).flatten()
    scatter[gather[positions]] = positions
    if torch.unique(gather[positions]).numel() != layout.seq_len:
        raise ValueError(
            "A pattern's video_order must list every video token exactly once (plus -1 padding); "
            f"got {vmask.sum().item()} entries for {layout.video_len} video tokens."
        )
    identity = padded_len == layout.seq_len and bool(torch.equal(gather, torch.arange(padded_len)))
    return KernelOrder(gather, scatter, valid, video_index, vp, padded_len, identity)


@dataclass(frozen=True, eq=False)
class BlockSparsePlan:
    """Which blocks of the kernel sequence each query block computes (see module doc)."""

    layout: VideoLayout
    block_size: int
    num_heads: int
    order: KernelOrder
    kv_counts: torch.Tensor  # int32 [Bp, Hp, NQ]
    kv_indices: torch.Tensor  # int32 [Bp, Hp, NQ, MAXK], ascending, padded with 0
    mask_ids: torch.Tensor  # int32 [Bp, Hp, NQ, MAXK], -1 = whole block
    block_masks: torch.Tensor  # bool [P, bs, bs]
    text_blocks: torch.Tensor  # bool [NK]
    query_select: torch.Tensor | None = None  # bool [B, H, S_pad, G], group-major strides (see group_major)
    key_group: torch.Tensor | None = None  # int32 [NK]
    group_spans: torch.Tensor | None = None  # int32 [G, 2]: (first kernel position, keys) per group
    video_density: float = field(default=float("nan"))
    pattern_name: str = "custom"

    @property
    def padded_len(self) -> int:
        return self.order.padded_len

    @property
    def num_blocks(self) -> int:
        return self.order.padded_len // self.block_size

    @property
    def device(self) -> torch.device:
        return self.kv_indices.device

    @property
    def density(self) -> float:
        """Computed block area / dense block area, averaged over batch and heads."""
        n = self.num_blocks
        return float(self.kv_counts.double().mean().item()) / n

    def per_head_density(self) -> torch.Tensor:
        """Density per head (averaged over batch), float [Hp]."""
        return self.kv_counts.double().mean(dim=(0, 2)) / self.num_blocks

    def to(self, device: torch.device | str) -> BlockSparsePlan:
        device = torch.device(device)

        def mv(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device)

        return replace(
            self,
            order=self.order.to(device),
            kv_counts=self.kv_counts.to(device),
            kv_indices=self.kv_indices.to(device),
            mask_ids=self.mask_ids.to(device),
            block_masks=self.block_masks.to(device),
            text_blocks=self.text_blocks.to(device),
            query_select=mv(self.query_select),
            key_group=mv(self.key_group),
            group_spans=mv(self.group_spans),
        )

    def dense_block_matrix(self, batch: int = 0, head: int = 0) -> torch.Tensor:
        """int8 [NQ, NK]: 0 skipped, 1 partial (element mask), 2 whole block. For plots and tests."""
        b = min(batch, self.kv_counts.shape[0] - 1)
        h = min(head, self.kv_counts.shape[1] - 1)
        n = self.num_blocks
        out = torch.zeros(n, n, dtype=torch.int8)
        counts = self.kv_counts[b, h].cpu()
        idx = self.kv_indices[b, h].cpu().long()
        mids = self.mask_ids[b, h].cpu()
        for qb in range(n):
            c = int(counts[qb])
            out[qb, idx[qb, :c]] = torch.where(mids[qb, :c] < 0, 2, 1).to(torch.int8)
        return out

    def key_valid(self, text_mask: torch.Tensor | None, batch: int) -> torch.Tensor | None:
        """bool [B, S_pad]: run-time key validity (text padding) in kernel order, or None."""
        if text_mask is None:
            return None
        valid = self.order.token_valid.to(text_mask.device).expand(batch, -1).clone()
        start = self.order.text_start
        valid[:, start : start + self.layout.text_len] &= text_mask.to(torch.bool)
        return valid


def group_major(select: torch.Tensor) -> torch.Tensor:
    """``select`` [..., S_pad, G] with the same values stored group-major (row stride 1): the
    query rows of one group are contiguous. No copy when it already is (one copy otherwise)."""
    if select.dim() < 2:
        raise ValueError(f"a query selection is [..., S_pad, G], got shape {tuple(select.shape)}.")
    if select.stride(-2) == 1:
        return select
    return select.transpose(-1, -2).contiguous().transpose(-1, -2)


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


class _MaskTable:
    """Deduplicates element masks: translation-invariant patterns share a few shapes."""

    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self.index: dict[bytes, int] = {}
        self.masks: list[torch.Tensor] = []

    def add(self, masks: torch.Tensor) -> torch.Tensor:
        """Return ids for bool masks [n, bs, bs]."""
        packed = np.packbits(masks.reshape(masks.shape[0], -1).cpu().numpy(), axis=1)
        # One opaque bytes item per row: np.unique(axis=0) on wide rows is orders slower.
        rows = np.ascontiguousarray(packed).view(np.dtype((np.void, packed.shape[1]))).ravel()
        _, first, inverse = np.unique(rows, return_index=True, return_inverse=True)
        uniq = packed[first]
        local = np.empty(len(uniq), dtype=np.int32)
        for u, row in enumerate(uniq):
            key = row.tobytes()
            mid = self.index.get(key)
            if mid is None:
                mid = len(self.masks)
                self.index[key] = mid
                self.masks.append(masks[int(first[u])].cpu())
            local[u] = mid
        return torch.from_numpy(local[inverse.reshape(-1)])

    def tensor(self) -> torch.Tensor:
        bs = self.block_size
        if not self.masks:
            return torch.zeros(0, bs, bs, dtype=torch.bool)
        return torch.stack(self.masks)


def _pack_lists(
    rows: list[tuple[torch.Tensor, torch.Tensor]], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Ragged per-query-block (indices, mask ids) -> padded [1, 1, NQ, MAXK] tensors."""
    nq = len(rows)
    maxk = max(1, max(int(r[0].numel()) for r in rows))
    counts = torch.zeros(nq, dtype=torch.int32)
    indices = torch.zeros(nq, maxk, dtype=torch.int32)
    mids = torch.full((nq, maxk), -1, dtype=torch.int32)
    for qb, (idx, mid) in enumerate(rows):
        c = idx.numel()
        counts[qb] = c
        indices[qb, :c] = idx.to(torch.int32)
        mids[qb, :c] = mid
    return (
        counts.view(1, 1, nq).to(device),
        indices.view(1, 1, nq, maxk).to(device),
        mids.view(1, 1, nq, maxk).to(device),
    )


def _as_pair_mask(m: Any, pattern: str, shape: tuple[int, int, int]) -> torch.Tensor:
    """A pattern's ``video_mask`` as bool of ``shape``; a result that is no bool tensor
    broadcastable to it (a custom pattern's bug) is named, instead of a torch error deep in planning."""
    if not isinstance(m, torch.Tensor):
        raise TypeError(f"{pattern}.video_mask must return a bool tensor (True = attend), got {type(m).__name__}.")
    try:
        return m.to("cpu", torch.bool).expand(shape)
    except RuntimeError:
        raise ValueError(
            f"{pattern}.video_mask returned shape {tuple(m.shape)}, which does not broadcast to {shape} (the "
            "broadcast of its qi [n, block, 1] and ki [n, 1, block] index arguments): compute it elementwise "
            "from qi and ki."
        ) from None


def build_static_plan(
    pattern: Pattern,
    layout: VideoLayout,
    num_heads: int = 1,
    layer: int = 0,
    block_size: int = DEFAULT_BLOCK_SIZE,
    device: torch.device | str = "cpu",
) -> BlockSparsePlan:
    """Evaluate a static pattern block by block into a plan (uncached; see ``vidsparse.plan``)."""
    pattern.validate(layout)
    bs = block_size
    order = kernel_order(layout, pattern.video_order(layout, bs), bs)
    vidx = order.video_index
    vp = order.text_start
    nvb = vp // bs
    nq = order.padded_len // bs
    ntb = nq - nvb
    text_tail = layout.text_len - (ntb - 1) * bs if ntb else 0  # valid tokens in last text block

    cand = pattern.block_candidates(layout, vidx, bs, layer)
    if cand is None:
        cand = torch.ones(nvb, nvb, dtype=torch.int8)
    cand = cand.cpu().to(torch.int8)  # bool True -> 1 (evaluate); 2 = known whole (skip evaluation)
    if cand.shape != (nvb, nvb):
        raise RuntimeError(
            f"{type(pattern).__name__}.block_candidates returned shape {tuple(cand.shape)}, expected ({nvb}, {nvb})."
        )

    table = _MaskTable(bs)
    # Optional: element masks the pattern already knows for its 1-blocks (skips evaluation).
    given = pattern.block_masks(layout, vidx, bs, layer)
    if given is not None:
        given_ids = given[0].cpu().to(torch.int32)
        given_map = table.add(given[1].cpu().to(torch.bool)) if given[1].shape[0] else torch.zeros(0, dtype=torch.int32)
        cand = torch.where((cand == 1) & (given_ids >= 0), torch.full_like(cand, 3), cand)
    vblocks = vidx.view(nvb, bs)
    vvalid = vblocks >= 0
    safe = vblocks.clamp_min(0)
    block_full_valid = vvalid.all(dim=1)

    # Text key blocks seen from a video or text query: whole, except the padded tail.
    text_cols = torch.arange(nvb, nq, dtype=torch.int64)
    text_mids = torch.full((ntb,), -1, dtype=torch.int32)
    if ntb and text_tail < bs:
        col_ok = torch.arange(bs) < text_tail
        text_mids[-1] = int(table.add(col_ok.expand(bs, bs).unsqueeze(0))[0])

    # Blocks the pattern declares whole: only key padding can make them partial.
    pad_col_mid: dict[int, int] = {}

    def whole_blocks(qb: int) -> tuple[torch.Tensor, torch.Tensor]:
        kw = known_whole[qb]
        mw = torch.full((kw.numel(),), -1, dtype=torch.int32)
        for j, kb in enumerate(kw.tolist()):
            if not block_full_valid[kb]:
                if kb not in pad_col_mid:
                    col_ok = vvalid[kb].expand(bs, bs)
                    pad_col_mid[kb] = int(table.add(col_ok.unsqueeze(0))[0])
                mw[j] = pad_col_mid[kb]
        if given is not None:
            kg = torch.nonzero(cand[qb] == 3).flatten()
            kw, mw = torch.cat([kw, kg]), torch.cat([mw, given_map[given_ids[qb, kg].long()]])
        return kw, mw

    rows: list[tuple[torch.Tensor, torch.Tensor]] = []
    video_blocks_computed = 0
    pairs_per_chunk = max(1, _CHUNK_ELEMENTS // (bs * bs))
    qb_list = list(range(nvb))
    pending: list[tuple[int, torch.Tensor]] = [(qb, torch.nonzero(cand[qb] == 1).flatten()) for qb in qb_list]
    known_whole = [torch.nonzero(cand[qb] == 2).flatten() for qb in qb_list]
    i = 0
    while i < len(pending):
        # Collect a chunk of query blocks whose candidate pairs fit the element budget.
        chunk, npairs = [], 0
        while i < len(pending) and (not chunk or npairs + pending[i][1].numel() <= pairs_per_chunk):
            chunk.append(pending[i])
            npairs += pending[i][1].numel()
            i += 1
        if npairs == 0:
            for qb, _ in chunk:
                kw, mw = whole_blocks(qb)
                rows.append(_video_row(kw, mw, text_cols, text_mids))
                video_blocks_computed += kw.numel()
            continue
        qbs = torch.cat([torch.full((c.numel(),), qb, dtype=torch.int64) for qb, c in chunk])
        kbs = torch.cat([c for _, c in chunk])
        qi = safe[qbs].unsqueeze(2)  # [n, bs, 1]
        ki = safe[kbs].unsqueeze(1)  # [n, 1, bs]
        m = pattern.video_mask(layout, qi.to(device), ki.to(device), layer)
        m = _as_pair_mask(m, type(pattern).__name__, (qbs.numel(), bs, bs))
        m = m & vvalid[qbs].unsqueeze(2) & vvalid[kbs].unsqueeze(1)
        # Padding query rows are don't-care: judge fullness on valid rows only.
        row_ok = vvalid[qbs].unsqueeze(2)
        any_ = m.flatten(1).any(dim=1)
        full = ((m | ~row_ok).flatten(1).all(dim=1)) & block_full_valid[kbs]
        mids = torch.full((qbs.numel(),), -1, dtype=torch.int32)
        part = any_ & ~full
        if part.any():
            mids[part] = table.add(m[part])
        start = 0
        for qb, c in chunk:
            sl = slice(start, start + c.numel())
            keep = any_[sl]
            kw, mw = whole_blocks(qb)
            rows.append(
                _video_row(torch.cat([kbs[sl][keep], kw]), torch.cat([mids[sl][keep], mw]), text_cols, text_mids)
            )
            video_blocks_computed += int(keep.sum()) + kw.numel()
            start += c.numel()

    # Text query blocks attend every valid key.
    if ntb:
        all_cols = torch.arange(nq, dtype=torch.int64)
        col_mids = torch.full((nq,), -1, dtype=torch.int32)
        for kb in range(nvb):
            if not block_full_valid[kb]:
                col_ok = vvalid[kb]
                col_mids[kb] = int(table.add(col_ok.expand(bs, bs).unsqueeze(0))[0])
        col_mids[nvb:] = text_mids
        for _ in range(ntb):
            rows.append((all_cols, col_mids.clone()))

    counts, indices, mids = _pack_lists(rows, torch.device(device))
    text_blocks = torch.zeros(nq, dtype=torch.bool)
    text_blocks[nvb:] = True
    plan = BlockSparsePlan(
        layout=layout,
        block_size=bs,
        num_heads=num_heads,
        order=order,
        kv_counts=counts,
        kv_indices=indices,
        mask_ids=mids,
        block_masks=table.tensor(),
        text_blocks=text_blocks,
        video_density=video_blocks_computed / max(1, nvb * nvb),
        pattern_name=getattr(pattern, "name", type(pattern).__name__),
    )
    return plan.to(device)


def _video_row(
    kbs: torch.Tensor, mids: torch.Tensor, text_cols: torch.Tensor, text_mids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    order = torch.argsort(kbs)
    return torch.cat([kbs[order], text_cols]), torch.cat([mids[order], text_mids])


_TOKEN_ATTR = "_vidsparse_cache_token"


def value_token(obj: object) -> str | None:
    """A string that is the same for equal values, or None where none can be made safely.

    Made of ``None``/bool/int/float/str, tuples of those, and frozen value-compared dataclasses
    of those (each dataclass's token is cached on the instance, so a compiled graph reads it as
    one attribute). Anything else (tensors, objects compared by identity) gives None.
    """
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return repr(obj)
    if isinstance(obj, tuple):
        parts = [value_token(x) for x in obj]
        return None if None in parts else "(" + ",".join(parts) + ")"
    params = getattr(obj, "__dataclass_params__", None)
    if params is None or isinstance(obj, type) or not (params.frozen and params.eq):
        return None
    cached = getattr(obj, "__dict__", {}).get(_TOKEN_ATTR)
    if cached is not None:
        return cached
    parts = []
    for f in dataclasses.fields(obj):
        token = value_token(getattr(obj, f.name))
        if token is None:
            return None
        parts.append(f"{f.name}={token}")
    token = f"{type(obj).__module__}.{type(obj).__qualname__}({','.join(parts)})"
    with contextlib.suppress(AttributeError, TypeError):  # __slots__: not cached, still valid
        object.__setattr__(obj, _TOKEN_ATTR, token)
    return token


def _traced_token(key: tuple) -> str | None:
    """``value_token(key)`` as a compiled graph can compute it: the key's objects must carry
    their cached token already (the eager lookup that built or found the plan cached it)."""
    parts = []
    for x in key:
        if x is None or isinstance(x, (bool, int, float, str)):
            parts.append(repr(x))
        else:
            token = getattr(x, _TOKEN_ATTR, None)
            if token is None:
                return None
            parts.append(token)
    return "(" + ",".join(parts) + ")"


class PlanCache(LRUCache[BlockSparsePlan]):
    """Bounded LRU of static plans keyed by value: (pattern, layout, heads, layer, block, device).

    Inside a torch.compile graph a hit is a read of a second index keyed by ``value_token``
    strings, not of the LRU dict itself: there dynamo would hash the pattern and layout keys
    by tracing them and guard on each stored key's fields by its position in the dict, and
    the LRU reorders and evicts keys (torch 2.11 then fails building the guard:
    "'DualScope' object has no attribute 'tile'"). A miss builds the plan outside the graph
    (one graph break on a cold cache).
    """

    def __init__(self, maxsize: int = 64) -> None:
        super().__init__(maxsize)
        self._by_token: dict[str, BlockSparsePlan] = {}

    def get_or_build(self, key: tuple, build) -> BlockSparsePlan:
        if torch.compiler.is_compiling():
            token = _traced_token(key)
            hit = self._by_token.get(token) if token is not None else None
            if hit is not None:
                return hit
            # A cold cache costs one graph break. The disable is made here, not as a decorator:
            # decorating at import time would import torch._dynamo (~1.5 s) for every
            # `import vidsparse` and `vidsparse --help`, compiling or not.
            return torch.compiler.disable(self._eager_get_or_build)(key, build)
        return self._eager_get_or_build(key, build)

    def _eager_get_or_build(self, key: tuple, build) -> BlockSparsePlan:
        value = super().get_or_build(key, build)
        token = value_token(key)  # also caches the parts' tokens for the compiled lookup
        if token is not None and token not in self._by_token:  # indexed once per stored plan: a hit takes no lock
            with self._lock:
                if key in self._data:  # not evicted meanwhile by another thread
                    self._by_token[token] = self._data[key]
        return value

    def _dropped(self, key: tuple) -> None:
        token = value_token(key)
        if token is not None:
            self._by_token.pop(token, None)
