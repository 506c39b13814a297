"""vs.FreeSwim: NATTEN's na3d mask, the reference's own mask formula, every backend, block counts."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported anywhere below

import math  # noqa: E402
import warnings  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from oracle import masked_attention, random_qkv  # noqa: E402

import vidsparse as vs  # noqa: E402
from vidsparse.freeswim.config import freeswim_scale_factor  # noqa: E402
from vidsparse.freeswim.cost import raster_block_count, tile_block_count, window_work  # noqa: E402

natten = pytest.importorskip("natten")
from natten.backends.flex import get_na_flex_mask  # noqa: E402

# (grid, base_grid): interior and borders, ragged (odd / non-power-of-two), smaller than the
# window on one or both axes, even and odd base sizes.
GRIDS = [
    ((3, 9, 13), (4, 6)),
    ((2, 11, 7), (6, 3)),
    ((4, 5, 17), (5, 5)),
    ((2, 6, 6), (8, 4)),  # window 9 > 6 on h: whole axis
    ((3, 3, 5), (30, 52)),  # smaller than the window on both axes: dense
    ((2, 10, 12), (2, 2)),
]


def _id(case) -> str:
    grid, base = case
    return "g" + "x".join(map(str, grid)) + "-b" + "x".join(map(str, base))


def _reference_mask(grid, base, inward=True) -> torch.Tensor:
    """``init_mask_flex`` of WillWu111/FreeSwim, its formula on flattened raster indices."""
    frames, height, width = grid
    d_h, d_w = base[0] // 2, base[1] // 2
    idx = torch.arange(frames * height * width)
    q, kv = idx[:, None], idx[None, :]
    q_h, q_w = (q % (height * width)) // width, q % width
    kv_h, kv_w = (kv % (height * width)) // width, kv % width
    zero = torch.zeros_like(q_h)
    d_b = (d_h - q_h).clamp_min(0) if inward else zero
    d_u = (d_h + q_h - height + 1).clamp_min(0) if inward else zero
    d_r = (d_w - q_w).clamp_min(0) if inward else zero
    d_l = (d_w + q_w - width + 1).clamp_min(0) if inward else zero
    return (kv_h <= q_h + d_h + d_b) & (kv_h >= q_h - d_h - d_u) & (kv_w <= q_w + d_w + d_r) & (kv_w >= q_w - d_w - d_l)


@pytest.mark.parametrize("case", GRIDS, ids=_id)
def test_mask_equals_natten_na3d_mask(case):
    grid, base = case
    pattern = vs.FreeSwim(base_grid=base)
    layout = vs.VideoLayout(*grid)
    kernel = pattern.kernel_size(layout)
    assert kernel == (grid[0], min(2 * (base[0] // 2) + 1, grid[1]), min(2 * (base[1] // 2) + 1, grid[2]))
    block_mask = get_na_flex_mask("cpu", 3, grid, kernel, (1, 1, 1), (1, 1, 1), (False, False, False))
    n = layout.video_len
    zero = torch.zeros((), dtype=torch.long)
    natten_mask = block_mask.mask_mod(zero, zero, torch.arange(n)[:, None], torch.arange(n)[None, :])
    got = vs.token_mask(pattern, layout, block_size=16)[0]  # through the tile-major plan
    assert torch.equal(got, natten_mask)
    assert torch.equal(got, _reference_mask(grid, base))


@pytest.mark.parametrize("case", GRIDS[:3], ids=_id)
def test_clipped_ablation_equals_reference_formula(case):
    grid, base = case
    pattern = vs.FreeSwim(base_grid=base, inward=False)
    got = vs.token_mask(pattern, vs.VideoLayout(*grid), block_size=16)[0]
    assert torch.equal(got, _reference_mask(grid, base, inward=False))
    assert not torch.equal(got, vs.token_mask(vs.FreeSwim(base_grid=base), vs.VideoLayout(*grid))[0])


def test_every_query_keeps_a_full_window_and_all_frames():
    layout = vs.VideoLayout(3, 9, 13)
    mask = vs.token_mask(vs.FreeSwim(base_grid=(4, 6)), layout)[0]
    assert bool((mask.sum(dim=1) == 3 * 5 * 7).all())  # (frames) x (2*2+1) x (2*3+1), borders included


@pytest.mark.parametrize("backend", ["torch", "flex", "triton"])
def test_every_backend_equals_exact_attention(backend):
    if backend == "triton":
        pytest.importorskip("triton")
        from vidsparse.kernels import triton_backend

        if triton_backend.unsupported_reason(torch.zeros(1, 1, 1, 16)) is not None:
            pytest.skip("triton backend needs TRITON_INTERPRET=1 or a GPU")
    layout = vs.VideoLayout(2, 6, 10)
    pattern = vs.FreeSwim(base_grid=(3, 4))
    q, k, v = random_qkv(layout, batch=2, heads=2, dim=16)
    scale = freeswim_scale_factor((3, 4)) / math.sqrt(16)
    mask = vs.token_mask(pattern, layout)
    ref = masked_attention(q * scale * math.sqrt(16), k, v, mask, layout)  # oracle uses 1/sqrt(d)
    out = vs.attention(q, k, v, layout, pattern, backend=backend, block_size=16, scale=scale)
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=2e-5)


def test_matches_natten_na3d_attention():
    grid, base = (3, 7, 9), (4, 4)
    layout = vs.VideoLayout(*grid)
    pattern = vs.FreeSwim(base_grid=base)
    q, k, v = random_qkv(layout, batch=1, heads=2, dim=16)
    B, S, H, D = q.shape
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = natten.na3d(
            *(t.reshape(B, *grid, H, D) for t in (q, k, v)),
            kernel_size=pattern.kernel_size(layout),
            backend="flex-fna",
        ).reshape(B, S, H, D)
    out = vs.attention(q, k, v, layout, pattern, backend="torch", block_size=16)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("grid,base,block", [((2, 5, 7), (2, 4), 8), ((3, 6, 5), (3, 3), 16), ((2, 9, 13), (4, 6), 16)])
def test_block_counts_equal_brute_force(grid, base, block):
    layout = vs.VideoLayout(*grid)
    pattern = vs.FreeSwim(base_grid=base)
    n = layout.video_len
    idx = torch.arange(n)
    m = pattern.video_mask(layout, idx[:, None], idx[None, :])
    nb = -(-n // block)
    padded = torch.zeros(nb * block, nb * block, dtype=torch.bool)
    padded[:n, :n] = m
    raster = int(padded.view(nb, block, nb, block).any(3).any(1).sum())
    assert raster_block_count(pattern, layout, block) == raster
    plan = vs.plan(pattern, layout, block_size=block)
    assert tile_block_count(pattern, layout, block) == int(plan.kv_counts.sum())


def test_tile_major_beats_raster_at_1080p():
    """1.3B 480p base -> 1088x1920: the raster count reproduces the reference's 0.481
    (shared/reference/freeswim.md §2.5); the tile-major plan computes fewer blocks."""
    work = window_work(vs.VideoLayout(21, 68, 120), (30, 52))
    assert work.raster_density == pytest.approx(0.481, abs=5e-4)
    assert work.tile_density < work.raster_density
    assert math.prod(work.tile) == 128
    assert work.token_density == pytest.approx(0.201, abs=5e-4)


def test_registry_and_describe():
    p = vs.make_pattern("freeswim", base_grid=(30, 52))
    assert isinstance(p, vs.FreeSwim) and vs.PATTERNS["freeswim"] is vs.FreeSwim
    assert p.half_window == (15, 26) and p.kernel_size(vs.VideoLayout(21, 68, 120)) == (21, 31, 53)
    assert "31x53" in p.describe() and hash(p) == hash(vs.FreeSwim(base_grid=[30, 52]))
    assert freeswim_scale_factor((30, 52)) == pytest.approx(math.sqrt(math.log(30 * 52 * 2, 30 * 52)))


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(base_grid=(30,)), TypeError, r"\(height, width\) pair"),
        (dict(base_grid=(0, 52)), ValueError, ">= 1 token"),
        (dict(base_grid=(30.0, 52)), TypeError, "pair of ints"),
        (dict(base_grid=(30, 52), inward="yes"), TypeError, "inward must be a bool"),
        (dict(base_grid=(30, 52), tile=(2, 2)), TypeError, r"tile must be an int or a \(t, h, w\) tuple"),
        (dict(base_grid=(30, 52), tile=(2, 0, 8)), ValueError, "tile must be >= 1"),
    ],
)
def test_bad_inputs(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        vs.FreeSwim(**kwargs)
