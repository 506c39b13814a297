"""The cross-attention cache of FreeSwim's cached dual path, with a device-memory budget.

On a refresh step the full branch's per-block cross-attention output (text part, before the
output projection: [B, N, heads, head_dim]) is stored; on the steps in between each block of
the window branch reads it back instead of computing cross-attention. That is N x inner_dim
values per block and sample: 15.8 GB for Wan 1.3B at 1088x1920 in bf16, 279 GB for 14B at 4K.
The reference forces it onto "cuda"; here blocks stay on the device up to a budget and the
rest go to (pinned) host memory, or, with ``overflow="recompute"``, nothing is stored when
the whole cache does not fit and the full branch runs on every conditional step instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def cache_bytes(tokens: int, inner_dim: int, num_layers: int, batch: int = 1, itemsize: int = 2) -> int:
    """Bytes of a full cache: one [batch, tokens, inner_dim] tensor per block."""
    return int(tokens) * int(inner_dim) * int(num_layers) * int(batch) * int(itemsize)


def format_bytes(n: int) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


@dataclass(frozen=True)
class CacheReport:
    """What the cache holds (or held at its fullest) and where."""

    blocks_on_device: int
    blocks_offloaded: int
    bytes_on_device: int
    bytes_offloaded: int
    peak_bytes: int
    budget_bytes: int | None
    recompute: bool  # overflow="recompute" and the cache did not fit: nothing stored

    @property
    def total_bytes(self) -> int:
        return self.bytes_on_device + self.bytes_offloaded

    def describe(self) -> str:
        if self.recompute:
            return (
                f"cross-attention cache: {format_bytes(self.peak_bytes)} needed > budget "
                f"{format_bytes(self.budget_bytes or 0)}; full branch recomputed every conditional step"
            )
        budget = "unlimited" if self.budget_bytes is None else format_bytes(self.budget_bytes)
        return (
            f"cross-attention cache: {format_bytes(self.peak_bytes)} at peak; now {self.blocks_on_device} blocks on "
            f"the device ({format_bytes(self.bytes_on_device)}), {self.blocks_offloaded} offloaded to host memory "
            f"({format_bytes(self.bytes_offloaded)}); device budget {budget}"
        )


class CrossAttentionCache:
    """Per-block stored cross-attention outputs, keyed by the call they belong to."""

    def __init__(self, budget_bytes: int | None, overflow: str, dtype: torch.dtype | None = None) -> None:
        self.requested_budget = budget_bytes
        self.overflow = overflow
        self.dtype = dtype
        self.key: tuple | None = None
        self.recompute = False
        self.recompute_seen = False
        self.budget_bytes: int | None = budget_bytes
        self._blocks: dict[int, torch.Tensor] = {}
        self._offloaded: set[int] = set()
        self._device_bytes = 0
        self._peak = 0

    # -- lifecycle -------------------------------------------------------------------
    def clear(self) -> None:
        """Drop every stored block (before a refresh: the old and new cache never coexist)."""
        self._blocks.clear()
        self._offloaded.clear()
        self._device_bytes = 0
        self.key = None

    def reset(self) -> None:
        """A new generation: nothing stored, the recompute decision taken again; the peak and
        whether recompute was ever needed stay for ``report``."""
        self.clear()
        self.recompute = False

    def begin_refresh(self, key: tuple, needed_bytes: int, device: torch.device) -> bool:
        """Start storing a new cache for ``key``; False when nothing will be stored (recompute)."""
        self.clear()
        if self.requested_budget is None:
            self.budget_bytes = _auto_budget(device)
        if self.overflow == "recompute" and self.budget_bytes is not None and needed_bytes > self.budget_bytes:
            self.recompute = self.recompute_seen = True
            self._peak = max(self._peak, needed_bytes)
            return False
        self.key = key
        return True

    def valid_for(self, key: tuple) -> bool:
        return self.key is not None and self.key == key

    # -- blocks ----------------------------------------------------------------------
    def put(self, layer: int, value: torch.Tensor) -> None:
        value = value.detach()
        if self.dtype is not None:
            value = value.to(self.dtype)
        nbytes = value.numel() * value.element_size()
        on_device = self.budget_bytes is None or self._device_bytes + nbytes <= self.budget_bytes
        if on_device:
            self._blocks[layer] = value
            self._device_bytes += nbytes
        else:
            pin = value.device.type == "cuda"  # pinned host memory: asynchronous copies back
            host = torch.empty(value.shape, dtype=value.dtype, device="cpu", pin_memory=pin)
            host.copy_(value, non_blocking=True)
            self._blocks[layer] = host
            self._offloaded.add(layer)
        self._peak = max(self._peak, self._stored_bytes())

    def get(self, layer: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        if layer not in self._blocks:
            raise RuntimeError(
                f"FreeSwim: no cached cross-attention output for block {layer}; the full branch did not run for "
                "this call's grid and batch. Reset the dual path (vidsparse.freeswim.reset_dual_path) and rerun."
            )
        return self._blocks[layer].to(device=device, dtype=dtype, non_blocking=True)

    def _stored_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._blocks.values())

    def report(self) -> CacheReport:
        off = sum(self._blocks[i].numel() * self._blocks[i].element_size() for i in self._offloaded)
        return CacheReport(
            blocks_on_device=len(self._blocks) - len(self._offloaded),
            blocks_offloaded=len(self._offloaded),
            bytes_on_device=self._stored_bytes() - off,
            bytes_offloaded=off,
            peak_bytes=self._peak,
            budget_bytes=self.budget_bytes,
            recompute=self.recompute_seen,
        )


def _auto_budget(device: torch.device) -> int | None:
    """Half of the free memory of a CUDA device; None (unlimited) elsewhere."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free) // 2
    return None
