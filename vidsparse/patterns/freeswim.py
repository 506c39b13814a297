"""FreeSwim's inward sliding window: a spatial window of the training grid over all frames.

FreeSwim (arXiv 2511.14712, ``WillWu111/FreeSwim`` ``init_mask_flex``) runs a Wan model above
its training resolution by giving every query a window of the *base* (training) latent grid:
per frame a ``(2 * (H_base // 2) + 1) x (2 * (W_base // 2) + 1)`` window around the query,
shifted inward at the borders so that every query keeps a full window, and no restriction in
time (every latent frame). Each query therefore sees about as many keys as in training and
relative offsets of training scale, whatever the target size.

The border rule is NATTEN's clamped neighbourhood: the mask equals ``natten.na3d`` with kernel
``(frames, 2 * (H_base // 2) + 1, 2 * (W_base // 2) + 1)``, stride 1, dilation 1, non-causal.
Where the target grid is smaller than the window on an axis, FreeSwim's extensions reach both
ends and the window is the whole axis (NATTEN would refuse such a kernel); here too.

FreeSwim executes it as a FlexAttention mask in raster (t, h, w) order with 128-token blocks:
a block is about one image row, so the column limit is never used at block level. This
pattern is planned tile-major instead (power-of-two spatial tiles of one block), which
computes fewer blocks (benchmarks/results/freeswim.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from vidsparse.layout import VideoLayout
from vidsparse.patterns.base import per_axis
from vidsparse.patterns.gna import window_bounds
from vidsparse.patterns.tiling import (
    SeparableTiledPattern,
    TileGrid,
    Triple,
    cheapest_tile,
)


def _pair(value, name: str) -> tuple[int, int]:
    if (
        not isinstance(value, (tuple, list))
        or len(value) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    ):
        raise TypeError(
            f"{name} must be a (height, width) pair of ints in latent tokens after patchify (e.g. (30, 52) "
            f"for a 480x832 Wan base: pixels // 16), got {value!r}."
        )
    if any(v < 1 for v in value):
        raise ValueError(f"{name} must be >= 1 token on both axes, got {tuple(value)}.")
    return (int(value[0]), int(value[1]))


@dataclass(frozen=True)
class FreeSwim(SeparableTiledPattern):
    """FreeSwim's inward (clamped) spatial window of the base grid, over all frames.

    Args:
        base_grid: ``(H_base, W_base)``, the training latent grid in tokens after patchify
            (Wan: pixels // 16, so (30, 52) for 480x832 and (45, 80) for 720x1280). The
            half-windows are ``H_base // 2`` and ``W_base // 2``.
        inward: ``True`` (FreeSwim) shifts border windows inward so each keeps its full size;
            ``False`` is the reference's "no inward" ablation, a window clipped at the borders.
        tile: kernel tile (t, h, w); ``None`` picks per grid the power-of-two tile of one
            block that computes the fewest blocks.
    """

    base_grid: tuple[int, int] = (30, 52)
    inward: bool = True
    tile: Triple | None = None

    name: ClassVar[str] = "freeswim"

    def __post_init__(self) -> None:
        object.__setattr__(self, "base_grid", _pair(self.base_grid, "FreeSwim base_grid"))
        if not isinstance(self.inward, bool):
            raise TypeError(f"FreeSwim inward must be a bool, got {self.inward!r}.")
        if self.tile is not None:
            object.__setattr__(self, "tile", per_axis(self.tile, "FreeSwim tile"))

    # -- the window on a grid --------------------------------------------------------
    @property
    def half_window(self) -> tuple[int, int]:
        """(d_h, d_w) = base // 2: FreeSwim's half-windows (15, 26 for a 480p Wan base)."""
        return (self.base_grid[0] // 2, self.base_grid[1] // 2)

    def kernel_size(self, layout: VideoLayout) -> Triple:
        """NATTEN kernel of the same mask on this grid: (frames, window h, window w), each
        axis capped at its extent (a window larger than the axis is the whole axis)."""
        dh, dw = self.half_window
        frames, height, width = layout.grid
        return (frames, min(2 * dh + 1, height), min(2 * dw + 1, width))

    def token_density(self, layout: VideoLayout) -> float:
        """Fraction of (query, key) pairs attended (what an ideal element-sparse kernel pays)."""
        total = 1.0
        for axis in (1, 2):
            total *= float(self.axis_table(layout, axis).double().mean())
        return total

    # -- semantics -------------------------------------------------------------------
    def axis_mask(self, layout: VideoLayout, axis: int, qx: torch.Tensor, kx: torch.Tensor) -> torch.Tensor:
        if axis == 0:  # no temporal restriction: every frame
            return torch.ones(torch.broadcast_shapes(qx.shape, kx.shape), dtype=torch.bool, device=qx.device)
        n = layout.grid[axis]
        d = self.half_window[axis - 1]
        if self.inward:
            start, end = window_bounds(qx, n, min(2 * d + 1, n))
        else:
            start, end = (qx - d).clamp_min(0), (qx + d).clamp_max(n - 1)
        return (kx >= start) & (kx <= end)

    # -- kernel order ----------------------------------------------------------------
    def tile_grid(self, layout: VideoLayout, block_size: int) -> TileGrid:
        tile = self.tile if self.tile is not None else cheapest_tile(self, layout, block_size)
        return TileGrid(layout.grid, tile)

    def describe(self) -> str:
        dh, dw = self.half_window
        mode = "inward" if self.inward else "clipped"
        return f"FreeSwim({mode} window {2 * dh + 1}x{2 * dw + 1} of base {self.base_grid[0]}x{self.base_grid[1]})"
