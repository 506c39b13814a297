"""Sliding Tile Attention (STA, FastVideo): windows of whole 3-D tiles.

Tokens are grouped in tiles of ``tile`` = (t, h, w) tokens; query tile ``a`` (per axis, tile
coordinates) attends the key tiles ``|b - c| <= window // 2`` around the centre ``c = clamp(a,
window // 2, n_tiles - 1 - window // 2)``. Every token of a query tile sees the same key tiles,
so each (query tile, key tile) pair is wholly attended or skipped, and every window holds the
same number of tiles (centre clamped at the borders). Grids the tile does not divide are
padded to whole tiles (the last tile of an axis holds fewer real tokens); a window of at least
``n_tiles`` tiles covers the whole axis. As in STA, an even window ``w`` has half-width ``w // 2``
and so spans ``w + 1`` tiles.

On grids the tile divides, ``Tile(tile=T, window=w)`` (odd ``w``) equals ``GNA(kernel_size=w * T,
stride=T)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from vidsparse.layout import VideoLayout
from vidsparse.patterns.base import as_triple, per_axis
from vidsparse.patterns.gna import window_bounds
from vidsparse.patterns.tiling import SeparableTiledPattern, TileGrid, Triple, ceil_div


@dataclass(frozen=True)
class Tile(SeparableTiledPattern):
    """Sliding Tile Attention over tiles of ``tile`` tokens with ``window`` tiles per axis.

    Defaults: tile (2, 8, 8) = 128 tokens, one kernel block, instead of STA's (6, 8, 8) = 384:
    STA's tile divides only its three hard-coded canvases, while (2, 8, 8) divides
    HunyuanVideo's 30x48x80 and pads Wan 720p (21x45x80) by 12 % and 480p (21x30x52) by 20 %
    (4x4x8 pads 22 % and 31 %); it is also a NATTEN Hopper/Blackwell tile shape. Window
    (5, 3, 5) tiles = 10x24x40 tokens keeps 12 % of the token pairs at Wan 720p, in the range
    of STA's searched windows (10-20 % of tiles for Wan and HunyuanVideo), 26 % at 480p.

    Args:
        tile: tile shape (t, h, w) in tokens (one int: the same on every axis); the grid is
            padded to whole tiles. A model family's tile larger than an axis shrinks to the axis.
        window: key tiles per axis (t, h, w) around the query's tile, the centre clamped at the
            borders so every window holds as many tiles; an even window w spans w + 1 tiles, a
            window of at least the axis's tiles covers the axis.
    """

    tile: int | Triple = (2, 8, 8)
    window: int | Triple = (5, 3, 5)

    name: ClassVar[str] = "tile"

    @classmethod
    def fit_defaults(cls, options: dict[str, Any], layout: VideoLayout, block_size: int | None) -> dict[str, Any]:
        """Tiles larger than an axis shrink to the axis (the window, in tiles, is kept)."""
        if "tile" not in options:
            return options
        return {**options, "tile": tuple(min(t, n) for t, n in zip(as_triple(options["tile"]), layout.grid))}

    def __post_init__(self) -> None:
        tile = per_axis(self.tile, "Tile tile", 1)
        window = per_axis(self.window, "Tile window", 1)
        object.__setattr__(self, "tile", tile)
        object.__setattr__(self, "window", window)

    def span(self, axis: int) -> int:
        """Tiles a window really spans on ``axis``: STA's half-width is ``window // 2`` on both
        sides of the centre tile, so an even window ``w`` acts as ``w + 1`` (as in STA's shipped
        and searched HunyuanVideo windows such as (5, 6, 10))."""
        return self.window[axis] | 1

    def tiles(self, layout: VideoLayout) -> Triple:
        """Tile-grid extent per axis (the last tile of an axis may be padded)."""
        return tuple(ceil_div(n, t) for n, t in zip(layout.grid, self.tile))  # type: ignore[return-value]

    def axis_mask(self, layout: VideoLayout, axis: int, qx: torch.Tensor, kx: torch.Tensor) -> torch.Tensor:
        t, nt = self.tile[axis], self.tiles(layout)[axis]
        # STA's window is neighborhood attention on tile coordinates (stride 1, odd kernel).
        start, end = window_bounds(qx // t, nt, min(self.span(axis), nt))
        kb = kx // t
        return (kb >= start) & (kb <= end)

    def tile_grid(self, layout: VideoLayout, block_size: int) -> TileGrid:
        # An axis shorter than the tile is one tile either way; not padding it saves work.
        return TileGrid(layout.grid, tuple(min(t, n) for t, n in zip(self.tile, layout.grid)))  # type: ignore[arg-type]
