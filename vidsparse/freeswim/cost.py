"""Attention work of FreeSwim's window: block counts in raster and tile-major order, per step.

A block-sparse kernel pays per computed (query block, key block) pair, so the block count is
the attention work. The reference executes the window as a FlexAttention mask over raster
(t, h, w) tokens with 128-token blocks; vidsparse plans it tile-major. Both counts are exact
(no sampling) and need no GPU:

- ``raster_block_count``: blocks of consecutive raster tokens; a block is a few row segments
  (t, h, w0..w1), and since the window is a product of per-axis intervals whose bounds grow
  with the query coordinate, a pair of blocks is non-empty iff some pair of segments is;
- ``tile_block_count``: the non-empty tile pairs of the pattern's tile-major order (a tile is
  one block), from the per-axis tile relations; equal to the plan's block count.

``step_work`` turns densities into the self-attention work of one denoising step with CFG,
in units of one dense self-attention at the target size (``A``), for the three variants.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from vidsparse.layout import VideoLayout
from vidsparse.patterns.freeswim import FreeSwim


def _axis_bounds(pattern: FreeSwim, layout: VideoLayout, axis: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(start, end) per coordinate of ``axis``: the key interval each query coordinate sees."""
    table = pattern.axis_table(layout, axis)
    n = table.shape[1]
    idx = torch.arange(n)
    start = torch.where(table, idx, n).min(dim=1).values
    end = torch.where(table, idx, -1).max(dim=1).values
    return start, end


def raster_block_count(pattern: FreeSwim, layout: VideoLayout, block_size: int = 128, chunk: int = 256) -> int:
    """Non-empty (query, key) block pairs of the window in raster order (FreeSwim's execution)."""
    _, height, width = layout.grid
    n = layout.video_len
    nb = -(-n // block_size)
    segs = -(-block_size // width) + 1  # rows a block can touch
    first = torch.arange(nb) * block_size
    last = torch.clamp(first + block_size, max=n) - 1
    row0 = first // width
    rows = row0[:, None] + torch.arange(segs)[None, :]  # global row index (t * H + h)
    valid = rows <= (last // width)[:, None]
    w0 = torch.clamp(first[:, None] - rows * width, min=0)
    w1 = torch.clamp(last[:, None] - rows * width, max=width - 1)
    h = rows % height
    hs, he = _axis_bounds(pattern, layout, 1)
    ws, we = _axis_bounds(pattern, layout, 2)
    hq = h.clamp(max=height - 1)
    q_h0, q_h1 = hs[hq], he[hq]  # [nb, segs]: key rows the query segment reaches
    q_w0, q_w1 = ws[w0.clamp(max=width - 1)], we[w1.clamp(min=0)]
    total = 0
    for s in range(0, nb, chunk):
        e = min(nb, s + chunk)
        # [q, segs, 1, 1] against [1, 1, k, segs]
        hit = (q_h0[s:e, :, None, None] <= h[None, None]) & (h[None, None] <= q_h1[s:e, :, None, None])
        hit &= (q_w0[s:e, :, None, None] <= w1[None, None]) & (w0[None, None] <= q_w1[s:e, :, None, None])
        hit &= valid[s:e, :, None, None] & valid[None, None]
        total += int(hit.any(dim=3).any(dim=1).sum())
    return total


def tile_block_count(pattern: FreeSwim, layout: VideoLayout, block_size: int = 128) -> int:
    """Non-empty block pairs of the pattern's tile-major plan (tiles of one block)."""
    tg = pattern.tile_grid(layout, block_size)
    nonempty, _ = pattern.tile_cost(layout, tg.tile)
    if tg.volume == block_size:
        return nonempty
    # Tiles smaller than a block (tiny grids): count through the plan builder's own relation.
    from vidsparse.patterns.tiling import tiles_to_blocks

    any_, whole = pattern.tile_relations(layout, tg)
    nbv = -(-tg.num_tiles * tg.volume // block_size)
    return int((tiles_to_blocks(any_, whole, tg.volume, nbv, block_size) > 0).sum())


def dense_block_count(layout: VideoLayout, block_size: int = 128) -> int:
    nb = -(-layout.video_len // block_size)
    return nb * nb


@dataclass(frozen=True)
class WindowWork:
    """Block counts of one self-attention call at the target grid."""

    grid: tuple[int, int, int]
    base_grid: tuple[int, int]
    block_size: int
    dense_blocks: int
    raster_blocks: int
    tile_blocks: int
    tile: tuple[int, int, int]
    token_density: float

    @property
    def raster_density(self) -> float:
        return self.raster_blocks / self.dense_blocks

    @property
    def tile_density(self) -> float:
        return self.tile_blocks / self.dense_blocks


def window_work(layout: VideoLayout, base_grid: tuple[int, int], block_size: int = 128) -> WindowWork:
    pattern = FreeSwim(base_grid=base_grid)
    tg = pattern.tile_grid(layout, block_size)
    return WindowWork(
        grid=layout.grid,
        base_grid=tuple(base_grid),
        block_size=block_size,
        dense_blocks=dense_block_count(layout, block_size),
        raster_blocks=raster_block_count(pattern, layout, block_size),
        tile_blocks=tile_block_count(pattern, layout, block_size),
        tile=tg.tile,
        token_density=pattern.token_density(layout),
    )


def refresh_steps(num_steps: int, cache_interval: int) -> int:
    """Conditional steps that run the full branch: i % cache_interval == 0 over the kept steps."""
    return len(range(0, num_steps, cache_interval))


@dataclass(frozen=True)
class StepWork:
    """Self-attention blocks and transformer rows of one stage-2 run (averaged per step)."""

    variant: str
    attention_blocks_per_step: float
    relative_to_dense: float  # / (2 x dense blocks): direct dense high-res generation with CFG
    transformer_rows_per_step: float  # batch rows through projections/FFN (2 = dense with CFG)


def step_work(work: WindowWork, num_steps: int = 35, cache_interval: int = 2) -> list[StepWork]:
    """Per-step work of: direct dense, FreeSwim's reference (nocache, cache) and vidsparse's.

    With CFG each step is a conditional and an unconditional forward. nocache: both forwards
    run window + full (batch 2). cache: the conditional forward runs window + full on refresh
    steps, window + cached cross-attention otherwise; the unconditional forward window only.
    The reference computes batch 2 in every forward and its row 1 copies row 0 where the full
    branch is skipped; vidsparse runs batch 1 there.
    """
    dense = work.dense_blocks
    r = refresh_steps(num_steps, cache_interval) / num_steps
    out = []

    def add(variant: str, blocks: float, rows: float) -> None:
        out.append(StepWork(variant, blocks, blocks / (2 * dense), rows))

    add("dense (no FreeSwim)", 2 * dense, 2)
    add("FreeSwim nocache (reference, raster)", 2 * (work.raster_blocks + dense), 4)
    add(f"FreeSwim cache={cache_interval} (reference, raster)", 2 * work.raster_blocks + r * dense, 4)
    add("vidsparse nocache (tile-major)", 2 * (work.tile_blocks + dense), 4)
    add(f"vidsparse cache={cache_interval} (tile-major)", 2 * work.tile_blocks + r * dense, 2 + r)
    return out


def wan_cache_bytes(grid: tuple[int, int, int], inner_dim: int, num_layers: int, itemsize: int = 2) -> int:
    """Bytes of the reference's full cache (one sample, conditional pass) for a Wan model."""
    return math.prod(grid) * inner_dim * num_layers * itemsize
