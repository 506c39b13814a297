"""Layout, plan contract, Dense pattern and the torch/flex backends against a dense oracle."""

import pytest
import torch
from oracle import masked_attention, random_qkv, random_text_mask

import vidsparse as vs
from vidsparse.attention import plan_to_token_mask

LAYOUTS = [
    vs.VideoLayout(3, 4, 5),
    vs.VideoLayout(2, 3, 5, text_len=7, text_position="before"),
    vs.VideoLayout(2, 3, 5, text_len=9, text_position="after"),
]


def test_layout_properties():
    lay = vs.VideoLayout(21, 30, 52)
    assert lay.video_len == 32760 and lay.seq_len == 32760 and lay.tokens_per_frame == 1560
    lay = vs.VideoLayout(2, 3, 4, text_len=5, text_position="before")
    assert lay.video_offset == 5 and lay.text_offset == 0 and lay.seq_len == 29
    f, h, w = lay.coords(torch.tensor([0, 13, 23]))
    assert f.tolist() == [0, 1, 1] and h.tolist() == [0, 0, 2] and w.tolist() == [0, 1, 3]


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(frames=0, height=2, width=2), "frames"),
        (dict(frames=2, height=2, width=2, text_len=3), "text_position"),
        (dict(frames=2, height=2, width=2, text_len=3, text_position="middle"), "text_position"),
        (dict(frames=2, height=2.0, width=2), "height"),
    ],
)
def test_layout_rejects_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        vs.VideoLayout(**kwargs)


@pytest.mark.parametrize("layout", LAYOUTS, ids=str)
@pytest.mark.parametrize("backend", ["torch", "flex"])
@pytest.mark.parametrize("block_size", [16, 32])
def test_dense_equals_sdpa(layout, backend, block_size):
    q, k, v = random_qkv(layout, batch=2, heads=3, dim=8, dtype=torch.float64)
    tm = random_text_mask(layout, 2)
    mask = vs.token_mask(vs.Dense(), layout)
    assert mask.shape == (1, layout.seq_len, layout.seq_len) and bool(mask.all())
    out = vs.attention(q, k, v, layout, vs.Dense(), backend=backend, text_mask=tm, block_size=block_size)
    ref = masked_attention(q, k, v, mask, layout, tm)
    torch.testing.assert_close(out.double(), ref, atol=1e-10, rtol=1e-10)


def test_plan_is_cached_by_value_and_keyed_by_shape():
    vs.clear_plan_cache()
    a = vs.plan(vs.Dense(), vs.VideoLayout(2, 4, 4), block_size=16)
    b = vs.plan(vs.Dense(), vs.VideoLayout(2, 4, 4), block_size=16)
    c = vs.plan(vs.Dense(), vs.VideoLayout(3, 4, 4), block_size=16)
    assert a is b and c is not a and c.padded_len == 48 and a.padded_len == 32


def test_plan_density_and_block_matrix():
    p = vs.plan(vs.Dense(), vs.VideoLayout(2, 4, 5, text_len=6, text_position="after"), block_size=16)
    assert p.density == 1.0
    m = p.dense_block_matrix()
    # 40 video tokens -> 3 video blocks (last one padded), 6 text tokens -> 1 text block.
    assert m.shape == (4, 4) and bool((m > 0).all())
    assert m[0, 0] == 2 and m[0, 2] == 1 and m[0, 3] == 1


def test_plan_token_mask_round_trip_is_natural_order():
    lay = vs.VideoLayout(2, 3, 5, text_len=4, text_position="before")
    p = vs.plan(vs.Dense(), lay, block_size=16)
    m = plan_to_token_mask(p)
    assert m.shape == (1, 1, lay.seq_len, lay.seq_len) and bool(m.all())
    assert sorted(p.order.gather[p.order.token_valid].tolist()) == list(range(lay.seq_len))


def test_attention_gradients_match_oracle():
    lay = vs.VideoLayout(2, 3, 5, text_len=5, text_position="after")
    q, k, v = random_qkv(lay, batch=2, heads=2, dim=8, dtype=torch.float64, requires_grad=True)
    tm = random_text_mask(lay, 2)
    out = vs.attention(q, k, v, lay, "dense", backend="torch", text_mask=tm, block_size=16)
    (out * torch.arange(out.numel(), dtype=out.dtype).view_as(out).sin()).sum().backward()
    grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    ref = masked_attention(q, k, v, vs.token_mask("dense", lay), lay, tm)
    (ref * torch.arange(ref.numel(), dtype=ref.dtype).view_as(ref).sin()).sum().backward()
    for g, t in zip(grads, (q, k, v)):
        torch.testing.assert_close(g, t.grad, atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_dtypes(dtype):
    lay = vs.VideoLayout(2, 4, 4)
    q, k, v = random_qkv(lay, batch=1, heads=2, dim=16, dtype=dtype)
    out = vs.attention(q, k, v, lay, vs.Dense(), backend="torch", block_size=16)
    assert out.dtype == dtype
    ref = masked_attention(q, k, v, vs.token_mask("dense", lay), lay)
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(out.double(), ref, atol=tol, rtol=tol)


def test_bad_inputs_are_clear():
    lay = vs.VideoLayout(2, 3, 4)
    q, k, v = random_qkv(lay)
    with pytest.raises(ValueError, match="does not match the layout"):
        vs.attention(q[:, :-1], k[:, :-1], v[:, :-1], lay, "dense")
    with pytest.raises(ValueError, match="num_heads must be an int >= 1"):
        vs.plan(vs.Radial(), lay, num_heads=0)
    with pytest.raises(
        TypeError, match=r"Pattern 'radial' has no option 'decay'\. Its options: block_size, decay_factor"
    ):
        vs.make_pattern("radial", decay=0.5)
    bhsd = [t.transpose(1, 2) for t in (q, k, v)]  # SDPA's layout by mistake: named, with the fix
    with pytest.raises(ValueError, match=r"look like \[B, H, S, D\].*q.transpose\(1, 2\)"):
        vs.attention(*bhsd, lay, "dense")
    with pytest.raises(ValueError, match="same shape"):
        vs.attention(q, k[:, :, :1], v, lay, "dense")
    with pytest.raises(TypeError, match="share a dtype"):
        vs.attention(q, k.double(), v, lay, "dense")
    with pytest.raises(ValueError, match="4-D"):
        vs.attention(q[0], k[0], v[0], lay, "dense")
    with pytest.raises(ValueError, match="Unknown pattern"):
        vs.attention(q, k, v, lay, "nope")
    with pytest.raises(ValueError, match="Unknown backend"):
        vs.attention(q, k, v, lay, "dense", backend="cuda-magic")
    with pytest.raises(ValueError, match="text_mask"):
        vs.attention(q, k, v, lay, "dense", text_mask=torch.ones(1, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="power of two"):
        vs.attention(q, k, v, lay, "dense", block_size=24)
    with pytest.raises(TypeError, match="pattern"):
        vs.attention(q, k, v, lay, 3)


@pytest.mark.slow
def test_large_grid_runs_memory_bounded():
    """Wan 480p grid (21x30x52 = 32,760 tokens) through the torch reference without S x S."""
    lay = vs.VideoLayout(21, 30, 52)
    q = torch.randn(1, lay.seq_len, 2, 16)
    out = vs.attention(q, q, q, lay, "dense", backend="torch", block_size=128)
    assert out.shape == q.shape and torch.isfinite(out).all()


def test_compiled_attention_builds_a_cold_plan_outside_the_graph():
    vs.clear_plan_cache()
    lay = vs.VideoLayout(2, 4, 4)

    def f(q, k, v):
        return vs.attention(q, k, v, lay, "dense", backend="torch", block_size=16) * 2

    q, k, v = random_qkv(lay)
    out = torch.compile(f, backend="eager")(q, k, v)
    torch.testing.assert_close(out, f(q, k, v))


# The static patterns that plan on a 4x4x4 grid with their defaults (GNA's default window is larger).
_SMALL_GRID_PATTERNS = ("dense", "radial", "tile", "dual_scope", "attention_tile", "freeswim")


def test_compiled_lookup_with_plans_of_many_pattern_classes_cached():
    """A compiled call whose plan is cached stays one graph (fullgraph) whatever else the cache
    holds and in whatever LRU order; after the cache is cleared and refilled it recompiles and
    still finds the plan. (torch 2.11 failed building its guard on the LRU dict's keys here:
    "'DualScope' object has no attribute 'tile'".)"""
    vs.clear_plan_cache()
    layouts = (vs.VideoLayout(4, 4, 4), vs.VideoLayout(3, 5, 6))
    for lay in layouts:
        for heads in (1, 2):
            for name in _SMALL_GRID_PATTERNS:
                vs.plan(vs.make_pattern(name), lay, num_heads=heads, block_size=16)
    lay = layouts[0]
    radial = vs.make_pattern("radial")

    def f(q, k, v):
        return vs.attention(q, k, v, lay, radial, backend="torch", block_size=16)

    q, k, v = random_qkv(lay)
    eager = f(q, k, v)  # a hit: moves radial's plan to the end of the LRU order
    vs.plan(vs.make_pattern("tile"), lay, num_heads=2, block_size=16)
    torch._dynamo.reset()
    compiled = torch.compile(f, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v), eager)
    vs.clear_plan_cache()
    f(q, k, v)  # rebuilt eagerly: the compiled graph's guards see a different cache
    torch.testing.assert_close(compiled(q, k, v), eager)
    torch._dynamo.reset()


def test_plan_cache_compiled_lookup_misses_evicted_plans():
    """An evicted plan is gone from the compiled lookup too: a compiled call rebuilds it
    (outside the graph) rather than returning a stale entry."""
    from vidsparse.plan import PlanCache

    cache = PlanCache(maxsize=2)
    lay = vs.VideoLayout(2, 4, 4)
    built = []

    def build(name):
        built.append(name)
        return name

    keys = {name: (vs.make_pattern(name), lay, 2, None, 16, "cpu") for name in ("dense", "radial", "tile")}
    for name, key in keys.items():
        assert cache.get_or_build(key, lambda n=name: build(n)) == name
    assert len(cache) == 2 and keys["dense"] not in cache

    def lookup(x, name):
        return x * len(cache.get_or_build(keys[name], lambda: build(name)))

    torch._dynamo.reset()
    compiled = torch.compile(lookup, backend="eager")
    x = torch.ones(2)
    torch.testing.assert_close(compiled(x, "tile"), x * 4)  # a hit: nothing built
    assert built == ["dense", "radial", "tile"]
    torch.testing.assert_close(compiled(x, "dense"), x * 5)  # evicted: built again
    assert built == ["dense", "radial", "tile", "dense"]
    torch._dynamo.reset()


def test_value_token_is_equal_for_equal_values_only():
    from vidsparse.plan import value_token

    a, b = vs.make_pattern("radial"), vs.make_pattern("radial")
    assert a is not b and value_token(a) == value_token(b)
    assert value_token(vs.make_pattern("radial", decay_factor=0.5)) != value_token(a)
    assert value_token(vs.make_pattern("tile")) != value_token(vs.make_pattern("attention_tile"))
    lay = vs.VideoLayout(2, 4, 4)
    assert value_token((a, lay, 2, None, 16, "cpu")) != value_token((a, lay, 1, None, 16, "cpu"))
    # no token where value equality cannot be read from the fields' text
    assert value_token(torch.ones(2)) is None and value_token((a, object())) is None
