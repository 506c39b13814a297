"""GNA against NATTEN (the independent oracle), the analytic plan machinery, and bad inputs."""

import itertools
import math
import random
import warnings

import pytest
import torch
from oracle import masked_attention, random_qkv, random_text_mask

import vidsparse as vs
from vidsparse.attention import plan_to_token_mask
from vidsparse.patterns.base import Pattern
from vidsparse.patterns.gna import window_bounds
from vidsparse.plan import build_static_plan

natten = pytest.importorskip("natten")
from natten.backends.flex import get_na_flex_mask  # noqa: E402


def _random_cases(n: int, seed: int) -> list[tuple]:
    """(grid, kernel, stride, dilation, causal) with NATTEN's constraints (kernel >= 2)."""
    rng = random.Random(seed)
    cases = [((3, 5, 7), (2, 3, 4), (1, 2, 3), (1, 1, 1), (True, False, False))]
    while len(cases) < n:
        grid = tuple(rng.randint(2, 8) for _ in range(3))
        dil = tuple(rng.choice([1, 1, 2, 3]) for _ in grid)
        dil = tuple(d if 2 * d <= e else 1 for d, e in zip(dil, grid))
        kernel = tuple(rng.randint(2, e // d) for e, d in zip(grid, dil))
        stride = tuple(rng.randint(1, k) for k in kernel)
        causal = tuple(rng.random() < 0.3 for _ in range(3))
        cases.append((grid, kernel, stride, dil, causal))
    return cases


NATTEN_CASES = _random_cases(24, seed=7)
MASK_CASES = _random_cases(40, seed=11)


def _case_id(case) -> str:
    grid, k, s, d, c = case
    fmt = lambda t: "x".join(str(int(v)) for v in t)  # noqa: E731
    return f"g{fmt(grid)}-k{fmt(k)}-s{fmt(s)}-d{fmt(d)}-c{fmt(c)}"


def _natten_na3d(q, k, v, grid, pattern: vs.GNA):
    B, S, H, D = q.shape
    shaped = [t.reshape(B, *grid, H, D) for t in (q, k, v)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = natten.na3d(
            *shaped,
            kernel_size=pattern.kernel_size,
            stride=pattern.stride,
            dilation=pattern.dilation,
            is_causal=pattern.is_causal,
            backend="flex-fna",
        )
    return out.reshape(B, S, H, D)


@pytest.mark.parametrize("case", NATTEN_CASES, ids=_case_id)
def test_attention_matches_natten_na3d(case):
    grid, kernel, stride, dil, causal = case
    pattern = vs.GNA(kernel_size=kernel, stride=stride, dilation=dil, is_causal=causal)
    layout = vs.VideoLayout(*grid)
    q, k, v = random_qkv(layout, batch=2, heads=2, dim=16)
    ref = _natten_na3d(q, k, v, grid, pattern)
    backends = ["torch", "flex"] if NATTEN_CASES.index(case) % 3 == 0 else ["torch"]
    for backend in backends:
        out = vs.attention(q, k, v, layout, pattern, backend=backend, block_size=16)
        torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5, msg=f"backend={backend}")


@pytest.mark.parametrize("case", MASK_CASES, ids=_case_id)
def test_token_mask_equals_natten_flex_mask(case):
    """Exact element equality with NATTEN's own FlexAttention mask_mod (natural order)."""
    grid, kernel, stride, dil, causal = case
    pattern = vs.GNA(kernel_size=kernel, stride=stride, dilation=dil, is_causal=causal)
    layout = vs.VideoLayout(*grid)
    block_mask = get_na_flex_mask("cpu", 3, grid, kernel, stride, dil, causal)
    n = layout.video_len
    zero = torch.zeros((), dtype=torch.long)
    ref = block_mask.mask_mod(zero, zero, torch.arange(n)[:, None], torch.arange(n)[None, :])
    block_size = random.Random(n).choice([8, 16, 32])
    got = vs.token_mask(pattern, layout, block_size=block_size)[0]
    assert torch.equal(got, ref)


def _formula_axis(x: int, y: int, n: int, k: int, s: int, d: int, causal: bool) -> bool:
    """The published per-axis rule (NATTEN get_na_flex_mask), in plain integers."""
    if x % d != y % d:
        return False
    g = x % d
    n_g = len(range(g, n, d))
    xd, yd = x // d, y // d
    if causal:
        leader = min((xd // s) * s + s - 1, n_g - 1)
        return yd <= xd and leader - yd < k
    leader = min((xd // s) * s + s // 2, n_g - 1)
    left, right = k // 2, k // 2 + (k % 2 - 1)
    centre = min(max(leader, left), n_g - 1 - right)
    return centre - left <= yd <= centre + right


@pytest.mark.parametrize(
    "grid,kernel,stride,dil,causal",
    [
        ((1, 4, 5), (1, 3, 2), (1, 2, 1), 1, False),
        ((3, 4, 6), (1, -1, 2), (1, 3, 2), (1, 1, 3), (False, True, False)),
        ((4, 3, 5), (-1, 1, 5), (2, 1, 5), 1, (True, False, True)),
    ],
)
def test_kernel_one_and_full_axis_against_formula(grid, kernel, stride, dil, causal):
    """NATTEN refuses kernel_size 1 (it requires >= 2) and has no -1; check the formula directly."""
    pattern = vs.GNA(kernel_size=kernel, stride=stride, dilation=dil, is_causal=causal)
    layout = vs.VideoLayout(*grid)
    ks = pattern.resolved_kernel(layout)
    coords = list(itertools.product(*(range(e) for e in grid)))
    ref = torch.tensor(
        [
            [
                all(
                    _formula_axis(
                        a[i], b[i], grid[i], ks[i], pattern.stride[i], pattern.dilation[i], pattern.is_causal[i]
                    )
                    for i in range(3)
                )
                for b in coords
            ]
            for a in coords
        ]
    )
    assert torch.equal(vs.token_mask(pattern, layout)[0], ref)


def test_window_bounds_even_kernel_and_clamping():
    x = torch.arange(10)
    start, end = window_bounds(x, 10, 4)  # even kernel 2r: r left, r - 1 right
    assert start.tolist() == [0, 0, 0, 1, 2, 3, 4, 5, 6, 6]
    assert (end - start + 1).eq(4).all()
    start, end = window_bounds(x, 10, 3, stride=3)  # groups share their centre's window
    assert start.tolist() == [0, 0, 0, 3, 3, 3, 6, 6, 6, 7]
    start, end = window_bounds(x, 10, 3, causal=True)
    assert start.tolist() == [0, 0, 0, 1, 2, 3, 4, 5, 6, 7] and torch.equal(end, x)


class _Unhinted(Pattern):
    """The same element semantics without candidates or given masks: the builder evaluates all."""

    def __init__(self, inner):
        self.inner = inner

    def video_mask(self, layout, qi, ki, layer=0):
        return self.inner.video_mask(layout, qi, ki, layer)

    def video_order(self, layout, block_size):
        return self.inner.video_order(layout, block_size)


@pytest.mark.parametrize(
    "pattern,grid,block_size",
    [
        (vs.GNA((3, 3, 4), (1, 2, 4), (1, 1, 1), (False, False, True)), (4, 5, 9), 16),
        (vs.GNA((2, 2, 3), (2, 1, 3), (2, 2, 1)), (5, 6, 7), 32),
        (vs.GNA((2, 4, 4), (1, 1, 1), tile=(1, 4, 4)), (3, 7, 6), 16),
        (vs.Tile((1, 2, 4), (3, 1, 1)), (5, 3, 9), 8),
    ],
    ids=str,
)
def test_analytic_candidates_and_masks_equal_full_evaluation(pattern, grid, block_size):
    layout = vs.VideoLayout(*grid, text_len=5, text_position="after")
    fast = build_static_plan(pattern, layout, block_size=block_size)
    slow = build_static_plan(_Unhinted(pattern), layout, block_size=block_size)
    assert torch.equal(fast.kv_counts, slow.kv_counts)  # candidates exact, no spurious blocks
    assert torch.equal(plan_to_token_mask(fast), plan_to_token_mask(slow))


def test_stride_multiple_of_tile_is_perfectly_block_sparse():
    """STA-like GNA: the auto tile follows the stride; no partial block; equals Tile."""
    layout = vs.VideoLayout(8, 16, 16)
    gna = vs.GNA(kernel_size=(6, 12, 12), stride=(2, 4, 4))
    assert gna.tile_grid(layout, 32).tile == (2, 4, 4)
    p = vs.plan(gna, layout, block_size=32)
    blocks = p.dense_block_matrix()
    assert int((blocks == 1).sum()) == 0 and p.block_masks.shape[0] == 0
    assert torch.equal(vs.token_mask(gna, layout), vs.token_mask(vs.Tile((2, 4, 4), (3, 3, 3)), layout))


def test_hunyuan_gna_paper_config_density():
    """NATTEN docs: Hunyuan 30x48x80, window (18,24,24), stride (16,8,8) ~ 91 % sparse, block-exact."""
    layout = vs.VideoLayout(30, 48, 80)
    p = vs.plan(vs.GNA((18, 24, 24), (16, 8, 8)), layout, block_size=128)
    assert p.block_masks.shape[0] == 0  # perfectly block-sparse with the auto tile (2, 8, 8)
    assert p.video_density == pytest.approx((18 / 30) * (24 / 48) * (24 / 80))
    assert 1 - p.video_density == pytest.approx(0.91, abs=0.005)


def test_dilation_order_groups_residue_classes_first():
    layout = vs.VideoLayout(3, 6, 8)
    pattern = vs.GNA(kernel_size=(2, 3, 2), dilation=(1, 2, 2), tile=(1, 3, 4))
    order = pattern.video_order(layout, 16)
    assert sorted(order[order >= 0].tolist()) == list(range(layout.video_len))
    _, h, w = layout.coords(order.clamp_min(0))
    group = torch.where(order >= 0, (h % 2) * 2 + (w % 2), -1)
    real = group[group >= 0]
    assert torch.equal(real, real.sort().values)  # class (0,0), then (0,1), (1,0), (1,1)


def test_full_kernel_is_dense_and_int_means_every_axis():
    layout = vs.VideoLayout(3, 4, 5)
    assert bool(vs.token_mask(vs.GNA(kernel_size=-1), layout).all())
    assert vs.GNA(3) == vs.GNA((3, 3, 3), 1, (1, 1, 1), (False, False, False))
    causal_t = vs.token_mask(vs.GNA((-1, -1, -1), is_causal=(True, False, False)), layout)[0]
    f = torch.arange(layout.video_len) // 20
    assert torch.equal(causal_t, f[:, None] >= f[None, :])


@pytest.mark.parametrize("position", ["before", "after"])
def test_text_and_padding_through_attention(position):
    layout = vs.VideoLayout(3, 5, 6, text_len=7, text_position=position)
    pattern = vs.GNA(kernel_size=(2, 3, 4), stride=(1, 3, 2), is_causal=(True, False, False))
    q, k, v = random_qkv(layout, batch=2, heads=2, dim=8)
    tm = random_text_mask(layout, 2)
    mask = vs.token_mask(pattern, layout)
    ref = masked_attention(q, k, v, mask, layout, tm)
    for backend in ("torch", "flex"):
        out = vs.attention(q, k, v, layout, pattern, backend=backend, text_mask=tm, block_size=16)
        torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=2e-5)
    # Video rows see their window plus every text key; text rows see everything.
    vo, to = layout.video_offset, layout.text_offset
    assert bool(mask[0, vo : vo + 90, to : to + 7].all()) and bool(mask[0, to : to + 7].all())


def test_registry_and_equality():
    assert isinstance(vs.make_pattern("gna", kernel_size=3), vs.GNA)
    assert vs.PATTERNS["gna"] is vs.GNA
    assert hash(vs.GNA([3, 3, 3])) == hash(vs.GNA(3))


@pytest.mark.parametrize(
    "kwargs,layout,exc,match",
    [
        (dict(kernel_size=(3, 9, 3)), (3, 8, 8), ValueError, "exceeds the 8 tokens of axis h"),
        (dict(kernel_size=3, dilation=(1, 3, 1)), (3, 8, 8), ValueError, "dilation"),
        (dict(kernel_size=(3, 3), stride=1), None, TypeError, r"\(t, h, w\) tuple of 3 ints"),
        (dict(kernel_size=3, stride=(1, 4, 1)), None, ValueError, "stride must not exceed kernel_size"),
        (dict(kernel_size=(-1, 3, 3), stride=(5, 1, 1)), (3, 8, 8), ValueError, "stride 5 exceeds"),
        (dict(kernel_size=0), None, ValueError, ">= 1 or -1"),
        (dict(kernel_size=True), None, TypeError, "kernel_size"),
        (dict(kernel_size=3, is_causal=(True, False)), None, TypeError, "is_causal"),
        (dict(kernel_size=3, dilation=0), None, ValueError, "dilation must be >= 1"),
        (dict(kernel_size=3, tile=(2, 2)), None, TypeError, "tile"),
    ],
)
def test_bad_inputs(kwargs, layout, exc, match):
    if layout is None:  # rejected by the constructor
        with pytest.raises(exc, match=match):
            vs.GNA(**kwargs)
        return
    pattern = vs.GNA(**kwargs)
    with pytest.raises(exc, match=match):
        vs.plan(pattern, vs.VideoLayout(*layout), block_size=16)


def test_auto_tile_is_one_block_and_covers_big_grids():
    """Plans for Wan 480p / 720p grids come from per-axis relations (no timing asserted)."""
    for grid in [(21, 30, 52), (21, 45, 80)]:
        layout = vs.VideoLayout(*grid)
        pattern = vs.GNA()
        tg = pattern.tile_grid(layout, 128)
        assert math.prod(tg.tile) == 128
        order = pattern.video_order(layout, 128)
        cand = pattern.block_candidates(layout, order, 128)
        assert cand.shape == (order.numel() // 128,) * 2 and set(cand.unique().tolist()) <= {0, 1, 2}
