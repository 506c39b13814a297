"""Generalized Neighborhood Attention (GNA): NATTEN's ``na3d`` mask as a vidsparse pattern.

Per axis (t, h, w), with kernel ``k``, stride ``s``, dilation ``d`` and causal flag ``c``
(``natten/backends/flex.py::get_na_flex_mask``, NATTEN 0.21):

- dilation splits the axis into ``d`` residue classes; a query only sees keys of its own
  class, and the window lives on the class's sub-grid ``x // d`` of extent ``n_g``;
- stride groups queries into runs of ``s``; a group shares the window of its *leader*:
  the centre query ``min(s * (x // s) + s // 2, n_g - 1)`` (right centre for even ``s``), or
  for causal axes the last query ``min(s * (x // s) + s - 1, n_g - 1)``;
- non-causal window: ``[c - k // 2, c + (k - 1) // 2]`` with the centre ``c`` = leader
  clamped into ``[k // 2, n_g - 1 - (k - 1) // 2]``, so every window holds ``k`` keys (an even
  ``k = 2r`` puts ``r`` keys left, ``r - 1`` right);
- causal window: ``[leader - k + 1, x]`` (keys after the query itself are never seen).

``stride = 1`` is neighborhood attention, ``stride = kernel`` blocked (Swin-style) attention,
and ``GNA(kernel=w * T, stride=T)`` is Sliding Tile Attention with tile ``T``, ``w`` tiles.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from vidsparse.layout import VideoLayout
from vidsparse.patterns.base import as_triple, per_axis
from vidsparse.patterns.tiling import (
    SeparableTiledPattern,
    TileGrid,
    Triple,
    ceil_div,
    cheapest_tile,
)

AXES = ("t", "h", "w")


def _causal_triple(value) -> tuple[bool, bool, bool]:
    if isinstance(value, bool):
        return (value,) * 3  # type: ignore[return-value]
    if isinstance(value, (tuple, list)) and len(value) == 3 and all(isinstance(v, bool) for v in value):
        return tuple(value)  # type: ignore[return-value]
    raise TypeError(f"is_causal must be a bool or a (t, h, w) tuple of 3 bools, got {value!r}.")


def window_bounds(
    x: torch.Tensor, extent: int, kernel: int, stride: int = 1, dilation: int = 1, causal: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inclusive key window ``(start, end)`` of query coordinates ``x`` along one axis.

    Bounds are on the residue-class sub-grid: key ``y`` is attended iff ``y % dilation ==
    x % dilation`` and ``start <= y // dilation <= end``. Used by the element mask and by the
    analytic block relations alike, so both agree by construction.
    """
    g, xd = x % dilation, x // dilation
    n_g = (extent - g + dilation - 1) // dilation  # members of x's residue class
    group = (xd // stride) * stride
    if causal:
        leader = torch.minimum(group + stride - 1, n_g - 1)
        return (leader - kernel + 1).clamp_min(0), xd
    leader = torch.minimum(group + stride // 2, n_g - 1)
    left, right = kernel // 2, (kernel - 1) // 2
    centre = torch.minimum(leader.clamp_min(left), n_g - 1 - right)  # = torch.clamp(leader, left, hi)
    return centre - left, centre + right


@dataclass(frozen=True)
class GNA(SeparableTiledPattern):
    """Generalized Neighborhood Attention with NATTEN's exact semantics (see module doc).

    Default kernel (9, 25, 41), the token budget of the ``Tile`` default: 28 % of the pairs of a
    Wan 480p grid (21x30x52), 12 % at 720p (21x45x80).

    Args:
        kernel_size: window per axis (t, h, w) in tokens; ``-1`` = the whole axis (Cosmos-Predict2's
            convention). Left unset where a model family's settings apply (vidsparse.apply,
            vidsparse generate, vidsparse train-lora), a kernel at least as long as an axis
            becomes -1 there and the stride is cut to fit within the kernel.
        stride: queries per window-sharing group (1 = sliding window, = kernel = blocked).
        dilation: residue classes per axis; ``kernel * dilation`` must fit the axis.
        is_causal: per axis, keys after the query are masked (e.g. causal in time).
        tile: kernel tile shape; ``None`` picks, per grid and block size, the power-of-two
            tile of one block that computes the fewest blocks (a tile dividing the stride
            makes the pattern perfectly block-sparse, as in the GNA paper).
    """

    kernel_size: int | Triple = (9, 25, 41)
    stride: int | Triple = 1
    dilation: int | Triple = 1
    is_causal: bool | tuple[bool, bool, bool] = False
    tile: Triple | None = None

    name: ClassVar[str] = "gna"

    @classmethod
    def fit_defaults(cls, options: dict[str, Any], layout: VideoLayout, block_size: int | None) -> dict[str, Any]:
        """A kernel larger than an axis covers the axis (-1); strides fit within the kernel. The
        class default kernel when none is given (a pattern name with no family entry)."""
        kernel = as_triple(options.get("kernel_size", cls.kernel_size))
        stride = as_triple(options.get("stride", cls.stride))
        grid = layout.grid
        k = tuple(-1 if ki >= n else ki for ki, n in zip(kernel, grid))
        s = tuple(min(si, n if ki == -1 else ki) for si, ki, n in zip(stride, k, grid))
        return {**options, "kernel_size": k, "stride": s}

    @classmethod
    def merge_options(cls, defaults: dict[str, Any], options: dict[str, Any]) -> dict[str, Any]:
        """A kernel the user sets narrows the family's default stride to fit within it (a stride
        larger than the kernel would skip queries); a stride the user sets is kept as given."""
        merged = {**defaults, **options}
        if "kernel_size" in options and "stride" not in options and "stride" in defaults:
            kernel, stride = as_triple(options["kernel_size"]), as_triple(defaults["stride"])
            if all(isinstance(v, int) for v in (*kernel, *stride)):
                merged["stride"] = tuple(s if k == -1 else min(s, k) for s, k in zip(stride, kernel))
        return merged

    def __post_init__(self) -> None:
        kernel = per_axis(self.kernel_size, "GNA kernel_size", 1, allow_full=True)
        stride = per_axis(self.stride, "GNA stride", 1)
        dilation = per_axis(self.dilation, "GNA dilation", 1)
        causal = _causal_triple(self.is_causal)
        tile = None if self.tile is None else per_axis(self.tile, "GNA tile", 1)
        for axis, k, s in zip(AXES, kernel, stride):
            if k != -1 and s > k:
                raise ValueError(
                    f"GNA stride must not exceed kernel_size on any axis (NATTEN's rule), got "
                    f"stride={stride}, kernel_size={kernel} (axis {axis}). Use stride <= kernel_size; "
                    "stride == kernel_size is blocked attention."
                )
        for field_name, value in (
            ("kernel_size", kernel),
            ("stride", stride),
            ("dilation", dilation),
            ("is_causal", causal),
            ("tile", tile),
        ):
            object.__setattr__(self, field_name, value)

    # -- parameters on a grid --------------------------------------------------------
    def resolved_kernel(self, layout: VideoLayout) -> Triple:
        """kernel_size with -1 replaced by the axis' residue-class extent."""
        return tuple(  # type: ignore[return-value]
            ceil_div(n, d) if k == -1 else k for k, n, d in zip(self.kernel_size, layout.grid, self.dilation)
        )

    def validate(self, layout: VideoLayout) -> None:
        kernel = self.resolved_kernel(layout)
        for axis, n, k, s, d, given in zip(AXES, layout.grid, kernel, self.stride, self.dilation, self.kernel_size):
            # -1 is the whole residue class of the query, which fits any axis whatever the dilation
            # (with n % d != 0 the classes differ in size by one; each query sees all of its own).
            if given != -1 and k * d > n:
                what = f"kernel_size {k} x dilation {d} = {k * d}" if d > 1 else f"kernel_size {k}"
                raise ValueError(
                    f"GNA {what} exceeds the {n} tokens of axis {axis} of the grid {layout.grid} "
                    f"(kernel_size={self.kernel_size}, dilation={self.dilation}). Pass kernel_size * "
                    f"dilation <= {n} on that axis, or kernel_size=-1 there for the whole axis."
                )
            if s > k:
                raise ValueError(
                    f"GNA stride {s} exceeds the kernel_size {k} that -1 resolves to on axis {axis} "
                    f"of the grid {layout.grid}; use stride <= {k}."
                )

    # -- semantics -------------------------------------------------------------------
    def axis_mask(self, layout: VideoLayout, axis: int, qx: torch.Tensor, kx: torch.Tensor) -> torch.Tensor:
        n, d = layout.grid[axis], self.dilation[axis]
        k = self.resolved_kernel(layout)[axis]
        start, end = window_bounds(qx, n, k, self.stride[axis], d, self.is_causal[axis])
        kd = kx // d
        return (kx % d == qx % d) & (kd >= start) & (kd <= end)

    # -- kernel order ----------------------------------------------------------------
    def tile_grid(self, layout: VideoLayout, block_size: int) -> TileGrid:
        tile = self.tile if self.tile is not None else cheapest_tile(self, layout, block_size)
        return TileGrid(layout.grid, tile, self.dilation)

    def tile_dilation(self) -> Triple:
        return self.dilation  # type: ignore[return-value]
