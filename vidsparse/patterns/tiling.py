"""Tile-major token orders and analytic block relations for separable 3-D window patterns.

Sliding Tile Attention and neighborhood attention (GNA) share one structure: the mask is a
product of per-axis masks, ``M(q, k) = m_t(q_t, k_t) & m_h(q_h, k_h) & m_w(q_w, k_w)``. With
the tokens permuted tile-major (NATTEN's token permutation: dilation residue class first,
then tile, then position inside the tile, every axis padded to whole tiles), a block is a
tile and whether a (query tile, key tile) pair is empty, partial or whole follows from the
per-axis 1-D relations alone. That makes plans for 75k-token grids cost O(tiles^2), not
O(tokens^2).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property, lru_cache

import torch

from vidsparse.layout import VideoLayout
from vidsparse.patterns.base import Pattern

Triple = tuple[int, int, int]

# Weight of a partially masked block relative to a whole one in the tile choice (a mask load
# and select in the kernel; the FLOPs are the same).
PARTIAL_BLOCK_COST = 0.25


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class TileGrid:
    """A tile-major order of a (F, H, W) grid: residue class, then tile, then offset in tile.

    Axis ``i`` of extent ``n`` with dilation ``d`` splits into ``d`` residue classes
    (coordinates ``g, g + d, g + 2d, ...``); each class is cut into tiles of ``tile[i]``
    consecutive members and padded to ``tiles_per_group[i]`` whole tiles (NATTEN pads every
    axis to a multiple of ``tile * dilation``, which gives the same counts).
    """

    grid: Triple
    tile: Triple
    dilation: Triple = (1, 1, 1)

    @cached_property
    def tiles_per_group(self) -> Triple:
        return tuple(ceil_div(ceil_div(n, d), t) for n, t, d in zip(self.grid, self.tile, self.dilation))  # type: ignore[return-value]

    @cached_property
    def axis_tiles(self) -> Triple:
        """Tiles along each axis over all residue classes (``dilation * tiles_per_group``)."""
        return tuple(d * a for d, a in zip(self.dilation, self.tiles_per_group))  # type: ignore[return-value]

    @property
    def volume(self) -> int:
        return math.prod(self.tile)

    @property
    def num_tiles(self) -> int:
        return math.prod(self.axis_tiles)

    def axis_positions(self, axis: int) -> torch.Tensor:
        """int64 [axis_tiles * tile]: the coordinate at each padded position along ``axis``, -1 = pad.

        Position ``p`` is (class ``g``, tile ``a``, offset ``o``) in that nesting; its coordinate
        is ``(a * tile + o) * dilation + g``.
        """
        n, t, d, a = self.grid[axis], self.tile[axis], self.dilation[axis], self.tiles_per_group[axis]
        p = torch.arange(d * a * t)
        g, sub = p // (a * t), p % (a * t)
        x = sub * d + g
        return torch.where(x < n, x, torch.full_like(x, -1))

    def order(self) -> torch.Tensor:
        """int64 [num_tiles * volume]: natural video index per kernel position, -1 for padding."""
        (dt, dh, dw), (at, ah, aw), (tt, th, tw) = self.dilation, self.tiles_per_group, self.tile
        _, height, width = self.grid
        xt = self.axis_positions(0).view(dt, 1, 1, at, 1, 1, tt, 1, 1)
        xh = self.axis_positions(1).view(1, dh, 1, 1, ah, 1, 1, th, 1)
        xw = self.axis_positions(2).view(1, 1, dw, 1, 1, aw, 1, 1, tw)
        index = (xt * height + xh) * width + xw
        valid = (xt >= 0) & (xh >= 0) & (xw >= 0)
        return torch.where(valid, index, torch.full_like(index, -1)).flatten()

    def tile_relation(self, axis: int, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-axis tile relation from the 1-D mask ``mask`` [n, n] (query coord, key coord).

        Returns ``(any, whole, has_valid)``: bool [E, E] "some valid pair attended", bool
        [E, E] "every valid pair attended" (vacuously true without valid pairs) and bool [E]
        "the tile holds a real coordinate", with ``E = axis_tiles[axis]`` in order
        (class, tile).
        """
        x = self.axis_positions(axis)
        e, t = self.axis_tiles[axis], self.tile[axis]
        valid = x >= 0
        xs = x.clamp_min(0)
        pair_valid = valid[:, None] & valid[None, :]
        m = mask[xs[:, None], xs[None, :]] & pair_valid
        any_ = m.view(e, t, e, t).any(dim=3).any(dim=1)
        whole = (m | ~pair_valid).view(e, t, e, t).all(dim=3).all(dim=1)
        return any_, whole, valid.view(e, t).any(dim=1)

    def tile_pair_masks(self, axis: int, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Distinct 1-D element masks of tile pairs along ``axis`` (padding False on both sides).

        Returns ``(shapes bool [P, t, t], ids int64 [E, E])``.
        """
        x = self.axis_positions(axis)
        e, t = self.axis_tiles[axis], self.tile[axis]
        valid = x >= 0
        xs = x.clamp_min(0)
        m = mask[xs[:, None], xs[None, :]] & valid[:, None] & valid[None, :]
        blocks = m.view(e, t, e, t).permute(0, 2, 1, 3).reshape(e * e, t * t)
        shapes, ids = torch.unique(blocks, dim=0, return_inverse=True)
        return shapes.view(-1, t, t), ids.view(e, e)


def combine_axes(rel: list[torch.Tensor], tg: TileGrid) -> torch.Tensor:
    """3-D tile relation [NT, NT] (tile-major order) as the product of per-axis relations [E, E]."""
    (dt, dh, dw), (at, ah, aw) = tg.dilation, tg.tiles_per_group
    rt = rel[0].view(dt, 1, 1, at, 1, 1, dt, 1, 1, at, 1, 1)
    rh = rel[1].view(1, dh, 1, 1, ah, 1, 1, dh, 1, 1, ah, 1)
    rw = rel[2].view(1, 1, dw, 1, 1, aw, 1, 1, dw, 1, 1, aw)
    return (rt & rh & rw).reshape(tg.num_tiles, tg.num_tiles)


def combine_axes_codes(ids: list[torch.Tensor], weights: Triple, tg: TileGrid) -> torch.Tensor:
    """int64 [NT, NT]: ``sum_i weights[i] * ids[i]`` over the per-axis tile-pair ids [E, E]."""
    (dt, dh, dw), (at, ah, aw) = tg.dilation, tg.tiles_per_group
    ct = ids[0].view(dt, 1, 1, at, 1, 1, dt, 1, 1, at, 1, 1) * weights[0]
    ch = ids[1].view(1, dh, 1, 1, ah, 1, 1, dh, 1, 1, ah, 1) * weights[1]
    cw = ids[2].view(1, 1, dw, 1, 1, aw, 1, 1, dw, 1, 1, aw) * weights[2]
    return (ct + ch + cw).reshape(tg.num_tiles, tg.num_tiles)


def combine_valid(valid: list[torch.Tensor], tg: TileGrid) -> torch.Tensor:
    """bool [NT]: tiles holding at least one real token."""
    (dt, dh, dw), (at, ah, aw) = tg.dilation, tg.tiles_per_group
    vt = valid[0].view(dt, 1, 1, at, 1, 1)
    vh = valid[1].view(1, dh, 1, 1, ah, 1)
    vw = valid[2].view(1, 1, dw, 1, 1, aw)
    return (vt & vh & vw).flatten()


def tiles_to_blocks(
    tile_any: torch.Tensor, tile_whole: torch.Tensor, volume: int, num_blocks: int, block_size: int
) -> torch.Tensor:
    """int8 [NB, NB] block candidates (0 empty, 1 evaluate, 2 whole) from tile-pair relations.

    Tiles occupy consecutive runs of ``volume`` kernel positions; a block may cover part of
    one tile or several tiles. It is non-empty if any covered tile pair is, and whole if every
    covered tile pair is whole.
    """
    nt = tile_any.shape[0]
    b = torch.arange(num_blocks)
    first = b * block_size // volume
    last = torch.clamp(((b + 1) * block_size - 1) // volume, max=nt - 1)
    real = first < nt  # blocks past the last tile are pure padding
    first = first.clamp(max=nt - 1)
    span = int((last - first).max().item()) + 1 if num_blocks else 0

    def pool(rel: torch.Tensor, reduce_any: bool) -> torch.Tensor:
        out = None
        for j in range(span):
            idx = torch.minimum(first + j, last)
            rows = rel[idx]
            out = rows if out is None else (out | rows if reduce_any else out & rows)
        cols = None
        for j in range(span):
            idx = torch.minimum(first + j, last)
            c = out[:, idx]
            cols = c if cols is None else (cols | c if reduce_any else cols & c)
        return cols

    any_ = pool(tile_any, True) & real[:, None] & real[None, :]
    whole = pool(tile_whole, False)
    return torch.where(any_, torch.where(whole, 2, 1), 0).to(torch.int8)


class SeparableTiledPattern(Pattern):
    """A static pattern whose mask is a product of per-axis masks, run in tile-major order.

    Subclasses define ``axis_mask`` (the 1-D semantics, broadcasting) and ``tile_grid`` (the
    kernel order for a layout and block size); video mask, order and analytic block
    candidates follow here.
    """

    def axis_mask(self, layout: VideoLayout, axis: int, qx: torch.Tensor, kx: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def tile_grid(self, layout: VideoLayout, block_size: int) -> TileGrid:
        raise NotImplementedError

    def axis_table(self, layout: VideoLayout, axis: int) -> torch.Tensor:
        """bool [n, n]: the 1-D mask of ``axis`` on all (query, key) coordinate pairs."""
        x = torch.arange(layout.grid[axis])
        return self.axis_mask(layout, axis, x[:, None], x[None, :])

    def video_mask(self, layout: VideoLayout, qi: torch.Tensor, ki: torch.Tensor, layer: int = 0) -> torch.Tensor:
        qc, kc = layout.coords(qi), layout.coords(ki)
        out = self.axis_mask(layout, 0, qc[0], kc[0])
        out = out & self.axis_mask(layout, 1, qc[1], kc[1])
        return out & self.axis_mask(layout, 2, qc[2], kc[2])

    def video_order(self, layout: VideoLayout, block_size: int) -> torch.Tensor | None:
        return self.tile_grid(layout, block_size).order()

    def tile_dilation(self) -> Triple:
        """Dilation of the tile-major order (residue classes per axis); none by default."""
        return (1, 1, 1)

    def tile_cost(self, layout: VideoLayout, tile: Triple) -> tuple[int, int]:
        """(non-empty, partial) tile pairs of the tile-major order with ``tile`` (per block if
        a tile is one block): counted per axis, as the mask is a product over axes."""
        tg = TileGrid(layout.grid, tile, self.tile_dilation())
        nonempty, whole = 1, 1
        for axis in range(3):
            any_, full, _ = tg.tile_relation(axis, self.axis_table(layout, axis))
            nonempty *= int(any_.sum())
            whole *= int((any_ & full).sum())
        return nonempty, nonempty - whole

    def tile_relations(self, layout: VideoLayout, tg: TileGrid) -> tuple[torch.Tensor, torch.Tensor]:
        """(any, whole) bool [NT, NT] over tile pairs in tile-major order."""
        rels = [tg.tile_relation(i, self.axis_table(layout, i)) for i in range(3)]
        any_ = combine_axes([r[0] for r in rels], tg)
        whole = combine_axes([r[1] for r in rels], tg)
        valid = combine_valid([r[2] for r in rels], tg)
        # A tile pair without real tokens on one side is vacuously whole.
        whole = whole | ~(valid[:, None] & valid[None, :])
        return any_, whole

    def block_candidates(
        self, layout: VideoLayout, order: torch.Tensor, block_size: int, layer: int = 0
    ) -> torch.Tensor | None:
        tg = self.tile_grid(layout, block_size)
        any_, whole = self.tile_relations(layout, tg)
        return tiles_to_blocks(any_, whole, tg.volume, order.numel() // block_size, block_size)

    def block_masks(
        self, layout: VideoLayout, order: torch.Tensor, block_size: int, layer: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """When a tile is exactly one block, every block mask is a Kronecker product of three
        per-axis tile-pair masks; the few distinct products are built here directly."""
        tg = self.tile_grid(layout, block_size)
        if tg.volume != block_size:
            return None
        shapes, ids = [], []
        for axis in range(3):
            u, inv = tg.tile_pair_masks(axis, self.axis_table(layout, axis))
            shapes.append(u)
            ids.append(inv)
        _, ph, pw = (u.shape[0] for u in shapes)
        code = combine_axes_codes(ids, (ph * pw, pw, 1), tg)  # [NT, NT] int64
        any_, whole = self.tile_relations(layout, tg)
        partial = any_ & ~whole
        uniq, inverse = torch.unique(code[partial], return_inverse=True)
        it, ih, iw = uniq // (ph * pw), (uniq // pw) % ph, uniq % pw
        (tt, th, tw), v = tg.tile, tg.volume
        masks = (
            shapes[0][it].view(-1, tt, 1, 1, tt, 1, 1)
            & shapes[1][ih].view(-1, 1, th, 1, 1, th, 1)
            & shapes[2][iw].view(-1, 1, 1, tw, 1, 1, tw)
        ).reshape(-1, v, v)
        nb = order.numel() // block_size
        out = torch.full((nb, nb), -1, dtype=torch.int32)
        ids_nt = torch.full((tg.num_tiles, tg.num_tiles), -1, dtype=torch.int32)
        ids_nt[partial] = inverse.to(torch.int32)
        out[: tg.num_tiles, : tg.num_tiles] = ids_nt
        return out, masks


@lru_cache(maxsize=256)
def cheapest_tile(pattern: SeparableTiledPattern, layout: VideoLayout, block_size: int) -> Triple:
    """The power-of-two tile of ``block_size`` tokens (fewer on tiny grids) with the lowest
    block cost (``tile_cost``, a partial block at ``PARTIAL_BLOCK_COST``); ties prefer wider
    tiles along w, then h (longer contiguous raster runs)."""
    sub = [ceil_div(n, d) for n, d in zip(layout.grid, pattern.tile_dilation())]
    caps: Triple = tuple(next_power_of_two(m) for m in sub)  # type: ignore[assignment]
    volume = min(1 << (block_size.bit_length() - 1), math.prod(caps))  # a power of two
    best, best_key = None, None
    for tile in power_of_two_shapes(volume, caps):
        nonempty, partial = pattern.tile_cost(layout, tile)
        key = (nonempty + PARTIAL_BLOCK_COST * partial, -tile[2], -tile[1])
        if best_key is None or key < best_key:
            best, best_key = tile, key
    assert best is not None
    return best


def power_of_two_shapes(volume: int, caps: Triple) -> list[Triple]:
    """All (t, h, w) powers of two with product ``volume`` and each within its cap."""
    exps = [int(math.log2(c)) for c in caps]
    total = int(math.log2(volume))
    out = []
    for et in range(min(total, exps[0]) + 1):
        for eh in range(min(total - et, exps[1]) + 1):
            ew = total - et - eh
            if 0 <= ew <= exps[2]:
                out.append((1 << et, 1 << eh, 1 << ew))
    return out


def next_power_of_two(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())
