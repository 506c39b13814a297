"""Tile (STA) and AttentionTile (Efficient-vDiT): semantics, block structure, text, bad inputs."""

import itertools
import math

import pytest
import torch
from oracle import masked_attention, random_qkv, random_text_mask

import vidsparse as vs


def _sta_formula(grid, tile, window) -> torch.Tensor:
    """FastVideo's STA mask (support_flex_sta.py) on natural coordinates, with the tile grid
    rounded up (padded last tile) and a window of at least the tile count covering the axis."""
    coords = list(itertools.product(*(range(e) for e in grid)))
    n_tiles = [math.ceil(e / t) for e, t in zip(grid, tile)]

    def sees(a, b):
        for i in range(3):
            nt, w = n_tiles[i], window[i]
            if w >= nt:
                continue
            qt, kt = a[i] // tile[i], b[i] // tile[i]
            centre = min(max(qt, w // 2), nt - 1 - w // 2)
            if abs(centre - kt) > w // 2:
                return False
        return True

    return torch.tensor([[sees(a, b) for b in coords] for a in coords])


@pytest.mark.parametrize(
    "grid,tile,window",
    [
        ((6, 8, 8), (2, 2, 2), (3, 3, 1)),
        ((4, 6, 8), (2, 2, 4), (1, 3, 1)),
        ((3, 5, 7), (2, 2, 4), (1, 3, 1)),  # no axis divisible: padded tiles
        ((5, 4, 9), (2, 4, 2), (3, 5, 3)),  # window wider than the tile grid on h
        ((6, 8, 10), (1, 2, 2), (2, 2, 4)),  # even windows: STA's half-width w // 2, so w acts as w + 1
        ((5, 6, 12), (1, 1, 2), (1, 4, 2)),  # even window one short of the axis (covers it)
    ],
)
def test_tile_matches_sta_formula(grid, tile, window):
    layout = vs.VideoLayout(*grid)
    got = vs.token_mask(vs.Tile(tile, window), layout, block_size=16)[0]
    assert torch.equal(got, _sta_formula(grid, tile, window))


@pytest.mark.parametrize(
    "grid,tile,window",
    [((6, 8, 8), (2, 2, 2), (3, 3, 1)), ((4, 6, 8), (2, 2, 4), (1, 3, 1)), ((6, 4, 8), (3, 2, 2), (1, 1, 3))],
)
def test_tile_equals_gna_on_divisible_grids(grid, tile, window):
    layout = vs.VideoLayout(*grid)
    sta = vs.Tile(tile=tile, window=window)
    gna = vs.GNA(kernel_size=tuple(w * t for w, t in zip(window, tile)), stride=tile)
    assert torch.equal(vs.token_mask(sta, layout), vs.token_mask(gna, layout))


def test_tile_windows_are_clamped_and_whole():
    """Every query tile sees exactly prod(window) key tiles, border tiles included (tile = block)."""
    layout = vs.VideoLayout(6, 8, 8)
    p = vs.plan(vs.Tile((2, 2, 4), (3, 3, 1)), layout, block_size=16)
    blocks = p.dense_block_matrix()
    assert p.num_blocks == 3 * 4 * 2
    assert bool((blocks != 1).all())  # no partial block: tile == block on a divisible grid
    assert (blocks == 2).sum(dim=1).tolist() == [3 * 3 * 1] * p.num_blocks
    assert p.video_density == pytest.approx(9 / 24)


def test_tile_padding_order_lists_every_token_once():
    layout = vs.VideoLayout(3, 5, 7)
    pattern = vs.Tile((2, 2, 4), (1, 3, 1))
    order = pattern.video_order(layout, 16)
    assert order.numel() == 2 * 3 * 2 * 16  # tiles (2, 3, 2) of 16 slots
    assert sorted(order[order >= 0].tolist()) == list(range(layout.video_len))
    # Tile-major: the first 16 slots are tile (0, 0, 0) = frames 0-1, rows 0-1, columns 0-3.
    f, h, w = layout.coords(order[:16])
    assert f.max() <= 1 and h.max() <= 1 and w.max() <= 3


def test_tile_axis_shorter_than_tile_is_one_tile():
    layout = vs.VideoLayout(1, 8, 16)  # an image: the time axis is one tile either way
    pattern = vs.Tile((2, 8, 8), (1, 1, 1))
    assert pattern.tile_grid(layout, 64).tile == (1, 8, 8)
    assert vs.token_mask(pattern, layout, block_size=64)[0].sum() == 2 * 64 * 64


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(window=(3, 3)), TypeError, r"\(t, h, w\) tuple of 3 ints"),
        (dict(tile=(2, 0, 8)), ValueError, "tile must be >= 1"),
        (dict(tile=2.0), TypeError, "tile"),
    ],
)
def test_tile_bad_inputs(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        vs.Tile(**kwargs)


# -- AttentionTile ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "k,frames,kept,published_sparsity",
    [(2, 8, 34, 0.4547), (1, 8, 22, 0.6438), (3, 24, 156, 0.7205)],
)
def test_attention_tile_counts_and_published_sparsity(k, frames, kept, published_sparsity):
    mask = vs.AttentionTile(global_frames=k).frame_mask(frames)
    assert int(mask.sum()) == kept == 2 * k * frames - k * k + frames - k
    # The paper's sparsities are a bit lower than the tile count gives (within 1.5 points).
    assert 1 - kept / frames**2 == pytest.approx(published_sparsity, abs=0.015)


def test_attention_tile_plan_is_frame_aligned_and_whole():
    layout = vs.VideoLayout(8, 3, 5)  # 15 tokens per frame -> one padded block each
    p = vs.plan(vs.AttentionTile(2), layout, block_size=16)
    blocks = p.dense_block_matrix()
    assert p.num_blocks == 8 and int((blocks > 0).sum()) == 34
    order = p.order.video_index.view(8, 16)
    assert bool((order[:, 15] == -1).all())
    frames = torch.where(order >= 0, order // 15, -1)
    assert all(set(row[row >= 0].tolist()) == {i} for i, row in enumerate(frames))
    expected = vs.AttentionTile(2).frame_mask(8).repeat_interleave(15, 0).repeat_interleave(15, 1)
    assert torch.equal(vs.token_mask(vs.AttentionTile(2), layout, block_size=16)[0], expected)


def test_attention_tile_extremes():
    layout = vs.VideoLayout(3, 2, 4)
    assert bool(vs.token_mask(vs.AttentionTile(3), layout)[0].all())
    diag = vs.token_mask(vs.AttentionTile(0), layout)[0]
    f = torch.arange(24) // 8
    assert torch.equal(diag, f[:, None] == f[None, :])


@pytest.mark.parametrize(
    "kwargs,layout,exc,match",
    [
        (dict(global_frames=-1), None, ValueError, ">= 0"),
        (dict(global_frames=True), None, TypeError, "int"),
        (dict(global_frames=5), (3, 2, 2), ValueError, "exceeds the 3 latent frames"),
    ],
)
def test_attention_tile_bad_inputs(kwargs, layout, exc, match):
    if layout is None:
        with pytest.raises(exc, match=match):
            vs.AttentionTile(**kwargs)
        return
    with pytest.raises(exc, match=match):
        vs.plan(vs.AttentionTile(**kwargs), vs.VideoLayout(*layout))


# -- both, through vs.attention --------------------------------------------------------------


@pytest.mark.parametrize("position", ["before", "after"])
@pytest.mark.parametrize("pattern", [vs.Tile((2, 2, 4), (1, 3, 1)), vs.AttentionTile(1)], ids=str)
def test_text_padding_and_batch_through_attention(pattern, position):
    layout = vs.VideoLayout(3, 5, 6, text_len=9, text_position=position)
    q, k, v = random_qkv(layout, batch=2, heads=2, dim=8)
    tm = random_text_mask(layout, 2)
    ref = masked_attention(q, k, v, vs.token_mask(pattern, layout), layout, tm)
    for backend in ("torch", "flex"):
        out = vs.attention(q, k, v, layout, pattern, backend=backend, text_mask=tm, block_size=16)
        torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=2e-5)


def test_registry_names_and_defaults():
    assert vs.make_pattern("tile") == vs.Tile(tile=(2, 8, 8), window=(5, 3, 5))
    assert vs.make_pattern("attention_tile", global_frames=1) == vs.AttentionTile(1)
    assert vs.PATTERNS["attention-tile"] is vs.AttentionTile and vs.PATTERNS["tile"] is vs.Tile
    assert vs.Tile(4, 3) == vs.Tile((4, 4, 4), (3, 3, 3))


def test_tile_accepts_sta_even_windows():
    """STA's shipped/searched HunyuanVideo windows include even ones such as (5, 6, 10) and (1, 6, 10)."""
    layout = vs.VideoLayout(10, 12, 20)
    for even, odd in (((5, 6, 10), (5, 7, 11)), ((1, 6, 10), (1, 7, 11))):
        tile = (1, 1, 1)
        got = vs.token_mask(vs.Tile(tile, even), layout, block_size=16)
        assert torch.equal(got, vs.token_mask(vs.Tile(tile, odd), layout, block_size=16))
    assert vs.Tile(window=(5, 6, 10)).window == (5, 6, 10)  # kept as given
