"""FlexAttention backend: the plan becomes a BlockMask (full blocks skip the mask_mod)."""

from __future__ import annotations

import functools
import threading
import warnings
import weakref
from collections import OrderedDict

import torch
from torch.nn.attention.flex_attention import BlockMask, flex_attention

try:  # torch >= 2.9 returns auxiliary outputs through AuxRequest
    from torch.nn.attention.flex_attention import AuxRequest
except ImportError:  # pragma: no cover - older torch
    AuxRequest = None

from vidsparse.plan import BlockSparsePlan

_NO_CPU_BACKWARD = "FlexAttention has no backward on CPU"


def device_reason(device: torch.device, dtype: torch.dtype, backward: bool = False) -> str | None:
    """Why this backend cannot run ``dtype`` tensors on ``device`` (None when it can): the forward
    runs wherever torch compiles FlexAttention, the backward not on CPU."""
    if backward and torch.device(device).type == "cpu":
        return f"{_NO_CPU_BACKWARD}; train with the torch backend on CPU"
    return None


def unsupported_reason(q: torch.Tensor) -> str | None:
    """Why this backend cannot run ``q`` (None when it can): torch's own error for a CPU backward
    comes only at ``backward()``, after the forward's work."""
    if q.device.type == "cpu" and q.requires_grad and torch.is_grad_enabled():
        return f"{_NO_CPU_BACKWARD} and q requires grad; run under torch.no_grad() for inference"
    return None


def _split_full_partial(plan: BlockSparsePlan, dynamic_text: bool):
    """Per row, the computed blocks that need the mask_mod and those that do not."""
    counts, idx, mids = plan.kv_counts.long(), plan.kv_indices.long(), plan.mask_ids
    slot = torch.arange(idx.shape[-1], device=idx.device)
    listed = slot < counts.unsqueeze(-1)
    needs_mask = mids >= 0
    if dynamic_text:
        needs_mask = needs_mask | plan.text_blocks[idx]
    if plan.query_select is not None:
        needs_mask = torch.ones_like(needs_mask)
    partial = listed & needs_mask
    full = listed & ~needs_mask

    def compact(sel: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = sel.sum(-1).to(torch.int32)
        # Stable sort keeps listed blocks first, in ascending order.
        key = (~sel).to(torch.int64) * (idx.shape[-1] + 1) + slot
        order = torch.argsort(key, dim=-1)
        out = torch.gather(idx, -1, order).to(torch.int32)
        # BlockMask.from_kv_blocks reads the last dim of kv_indices as the number of key
        # blocks; plans pack rows only MAXK wide, so pad to the full block count.
        nb = plan.num_blocks
        if out.shape[-1] < nb:
            out = torch.nn.functional.pad(out, (0, nb - out.shape[-1]))
        return n, out

    pn, pi = compact(partial)
    fn, fi = compact(full)
    return pn, pi, fn, fi


def block_mask_from_plan(plan: BlockSparsePlan, key_valid: torch.Tensor | None = None, batch: int = 1) -> BlockMask:
    """A FlexAttention BlockMask equal to the plan's semantics (kernel-order sequences)."""
    bs = plan.block_size
    nb = plan.num_blocks
    pn, pi, fn, fi = _split_full_partial(plan, key_valid is not None)
    Bp, Hp = plan.kv_counts.shape[:2]
    # -2: block not computed, -1: whole block, >= 0: element mask id.
    slot = torch.arange(plan.kv_indices.shape[-1], device=plan.device)
    listed = slot < plan.kv_counts.long().unsqueeze(-1)
    # [compose] scatter into a spare column nb (dropped) instead of indexing with torch.nonzero:
    # no data-dependent shapes, so this traces under torch.compile(fullgraph=True).
    table = torch.full((Bp, Hp, nb, nb + 1), -2, dtype=torch.int32, device=plan.device)
    cols = torch.where(listed, plan.kv_indices.long(), nb)
    table.scatter_(-1, cols, torch.where(listed, plan.mask_ids, -2).to(torch.int32))
    table = table[..., :nb]
    masks = plan.block_masks
    if masks.shape[0] == 0:
        masks = torch.ones(1, bs, bs, dtype=torch.bool, device=plan.device)
    qsel, kgroup = plan.query_select, plan.key_group

    def mask_mod(b, h, q_idx, kv_idx):
        bb = b if Bp > 1 else torch.zeros_like(b)
        hh = h if Hp > 1 else torch.zeros_like(h)
        mid = table[bb, hh, q_idx // bs, kv_idx // bs]
        keep = torch.where(mid >= 0, masks[mid.clamp_min(0), q_idx % bs, kv_idx % bs], mid == -1)
        if key_valid is not None:
            keep = keep & key_valid[b, kv_idx]
        if qsel is not None:
            keep = keep & qsel[b, h, q_idx, kgroup[kv_idx // bs]]
        return keep

    return BlockMask.from_kv_blocks(
        pn, pi, fn, fi, BLOCK_SIZE=bs, mask_mod=mask_mod, seq_lengths=(plan.padded_len, plan.padded_len)
    )


class BlockMaskCache:
    """BlockMasks built once per plan (and batch), bounded LRU.

    Building one costs host work and a device sync (11-576 ms at real shapes), so it must not
    happen per call. Entries hold the plan weakly (a plan that is gone cannot be hit again,
    and its id cannot alias a new plan's). A run-time ``key_valid`` is copied into a buffer
    the cached mask_mod reads, so a new text mask costs one device copy, not a rebuild.
    """

    def __init__(self, maxsize: int = 32) -> None:
        self.maxsize = maxsize
        self._data: OrderedDict[tuple, tuple[weakref.ref, BlockMask, torch.Tensor | None]] = OrderedDict()
        self._lock = threading.Lock()
        self.builds = 0

    def get(self, plan: BlockSparsePlan, key_valid: torch.Tensor | None, batch: int) -> BlockMask:
        if torch.compiler.is_compiling():
            # Inside a graph (compile_repeated_blocks(fullgraph=True)) the mask is traced once with
            # the graph (block_mask_from_plan has no data-dependent shapes); a lock cannot be traced.
            return block_mask_from_plan(plan, key_valid, batch)
        key = (id(plan), batch, None if key_valid is None else (tuple(key_valid.shape), key_valid.dtype))
        with self._lock:
            hit = self._data.get(key)
            if hit is not None and hit[0]() is plan:
                self._data.move_to_end(key)
                if key_valid is not None:
                    hit[2].copy_(key_valid)
                return hit[1]
        buf = None if key_valid is None else key_valid.clone()
        mask = block_mask_from_plan(plan, buf, batch)
        with self._lock:
            self.builds += 1
            for dead in [k for k, v in self._data.items() if v[0]() is None]:
                del self._data[dead]
            self._data[key] = (weakref.ref(plan), mask, buf)
            while len(self._data) > self.maxsize:
                self._data.popitem(last=False)
        return mask

    def clear(self) -> None:
        with self._lock:
            self._data.clear()

    def __len__(self) -> int:
        return len(self._data)


BLOCK_MASKS = BlockMaskCache()


@functools.cache
def _compiled_flex():
    return torch.compile(flex_attention, dynamic=False)


def run(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    plan: BlockSparsePlan,
    key_valid: torch.Tensor | None = None,
    scale: float | None = None,
    block_mask: BlockMask | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k, v [B, H, S_pad, D] in kernel order -> (out, lse fp32 [B, H, S_pad])."""
    if block_mask is None:
        block_mask = BLOCK_MASKS.get(plan, key_valid, q.shape[0])
    if torch.compiler.is_compiling():
        # [compose] inside the caller's graph (e.g. compile_repeated_blocks(fullgraph=True)):
        # flex_attention is traced as is; a warnings filter there would break the graph.
        out, lse = _flex(flex_attention, q, k, v, block_mask, scale)
        return out, lse.float()
    fn = _compiled_flex() if q.is_cuda else flex_attention
    with warnings.catch_warnings():
        # Eager flex on CPU materialises scores; that is expected for this exact CPU path.
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        out, lse = _flex(fn, q, k, v, block_mask, scale)
    # Rows with no visible key: flex returns lse=-inf and out 0 (kept as is).
    return out, lse.float()


def _flex(fn, q, k, v, block_mask, scale):
    if AuxRequest is not None:
        out, aux = fn(q, k, v, block_mask=block_mask, scale=scale, return_aux=AuxRequest(lse=True))
        return out, aux.lse
    return fn(q, k, v, block_mask=block_mask, scale=scale, return_lse=True)  # pragma: no cover
