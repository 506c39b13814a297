"""VMoBA: selection against a per-query oracle written from the published rules, plan and backends."""

import importlib

import pytest
import torch
from oracle import masked_attention, natural_mask, random_qkv, random_text_mask

import vidsparse as vs
from vidsparse.patterns import vmoba as vmoba_mod
from vidsparse.patterns.vmoba import VMoBA, selection_density

EPS = 1e-6  # released code's eps
SMALL = dict(temporal_chunk=2, spatial_chunk=(2, 3), st_chunk=(2, 2, 3))
LAYOUTS = [
    vs.VideoLayout(4, 4, 6),  # divisible by every chunk
    vs.VideoLayout(5, 3, 7, text_len=6, text_position="before"),  # ragged on every axis
    vs.VideoLayout(3, 5, 4, text_len=5, text_position="after"),
]


# -- oracle: straight from vmoba.md §1.1-1.3, one query at a time, natural order ---------------
def oracle_blocks(layout, pattern_kwargs, layer):
    """Block id of every natural video token for the layer's partition (l mod 3), and the count."""
    F, H, W = layout.grid
    kind = layer % 3
    if kind == 0:
        shape = (min(pattern_kwargs["temporal_chunk"], F), H, W)
    elif kind == 1:
        shape = (F, *(min(c, n) for c, n in zip(pattern_kwargs["spatial_chunk"], (H, W))))
    else:
        shape = tuple(min(c, n) for c, n in zip(pattern_kwargs["st_chunk"], (F, H, W)))
    nbt, nbh, nbw = (-(-n // c) for n, c in zip((F, H, W), shape))
    ids = []
    for f in range(F):
        for h in range(H):
            for w in range(W):
                ids.append(((f // shape[0]) * nbh + h // shape[1]) * nbw + w // shape[2])
    return ids, nbt * nbh * nbw


def oracle_gates(qv, kv, ids, G):
    """gate[i][j] = q_i . mean(k over block j), float64 python lists."""
    means = []
    for j in range(G):
        members = [t for t, b in enumerate(ids) if b == j]
        means.append(kv[members].double().mean(dim=0))
    M = torch.stack(means)
    return (qv.double() @ M.T).tolist()


def take_until(order, values, total, remain):
    """Cutoff rule: take entries in order until cumulative mass / (total + eps) >= remain."""
    chosen, cum = [], 0.0
    for e in order:
        chosen.append(e)
        cum += values[e]
        if cum / (total + EPS) >= remain:
            break
    return chosen


def oracle_select(gates, ids, G, mode, scope, tau, k):
    """Per query i: the set of kept blocks (own block always)."""
    N = len(gates)
    keep = [{ids[i]} for i in range(N)]
    if mode == "topk":
        k = min(k, G)
        if scope == "query":
            for i in range(N):
                others = sorted((j for j in range(G) if j != ids[i]), key=lambda j: (-gates[i][j], j))
                keep[i].update(others[: k - 1])
        else:
            pool = sorted(
                ((j, i) for i in range(N) for j in range(G) if j != ids[i]),
                key=lambda e: (-gates[e[1]][e[0]], e[0], e[1]),
            )
            for j, i in pool[: (k - 1) * N]:
                keep[i].add(j)
        return keep
    if scope == "query":
        for i in range(N):
            lo, hi = min(gates[i]), max(gates[i])
            span = hi - lo if hi - lo > EPS else 1.0
            norm = [(g - lo) / span for g in gates[i]]
            total = sum(norm)
            remain = max(tau - norm[ids[i]] / (total + EPS), 0.0)
            others = sorted((j for j in range(G) if j != ids[i]), key=lambda j: (-norm[j], j))
            keep[i].update(take_until(others, norm, total, remain))
        return keep
    flat = [g for row in gates for g in row]
    lo, hi = min(flat), max(flat)
    span = hi - lo if hi - lo > EPS else 1.0
    norm = {(j, i): (gates[i][j] - lo) / span for i in range(N) for j in range(G)}
    total = sum(norm.values())
    remain = max(tau - sum(norm[(ids[i], i)] for i in range(N)) / (total + EPS), 0.0)
    pool = sorted((e for e in norm if e[0] != ids[e[1]]), key=lambda e: (-norm[e], e[0], e[1]))
    for j, i in take_until(pool, norm, total, remain):
        keep[i].add(j)
    return keep


def oracle_tiles(ids, G, tile):
    """Selecting units: single queries, or each block's tokens (raster order) cut into ``tile`` rows."""
    if tile is None:
        return [[i] for i in range(len(ids))]
    units = []
    for j in range(G):
        members = [t for t, b in enumerate(ids) if b == j]
        units += [members[i : i + tile] for i in range(0, len(members), tile)]
    return units


def oracle_mask(layout, q, k, layer, mode, scope, tau=0.25, topk=2, chunks=SMALL, tile=None):
    """bool [B, H, S, S]: video rows keep their blocks plus all text; text rows keep everything.

    With ``tile`` (granularity="tile"), each unit of ``tile`` rows selects with its mean query."""
    B, S, H, _ = q.shape
    ids, G = oracle_blocks(layout, chunks, layer)
    units = oracle_tiles(ids, G, tile)
    vo, Sv = layout.video_offset, layout.video_len
    out = torch.ones(B, H, S, S, dtype=torch.bool)
    member = torch.tensor(ids)
    for b in range(B):
        for h in range(H):
            qv = q[b, vo : vo + Sv, h].double()
            qu = torch.stack([qv[u].mean(dim=0) for u in units])
            gates = oracle_gates(qu, k[b, vo : vo + Sv, h], ids, G)
            keep = oracle_select(gates, [ids[u[0]] for u in units], G, mode, scope, tau, topk)
            for u, kept in zip(units, keep):
                row = torch.isin(member, torch.tensor(sorted(kept)))
                for i in u:
                    out[b, h, vo + i, vo : vo + Sv] = row
    return out


def pattern(mode, scope, **extra):
    extra.pop("threshold" if mode == "topk" else "topk", None)  # the other mode's option is unused
    return VMoBA(**{**SMALL, **extra}, select_mode=mode, scope=scope)


# -- tests -------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", LAYOUTS, ids=str)
@pytest.mark.parametrize(
    "mode,scope", [("threshold", "query"), ("threshold", "head"), ("topk", "query"), ("topk", "head")]
)
def test_selection_equals_oracle(layout, mode, scope):
    q, k, _ = random_qkv(layout, batch=1, heads=2, dim=8, dtype=torch.float64)
    for layer in (0, 1, 2):
        p = pattern(mode, scope, topk=2 if layer == 0 else 3, threshold=0.3)
        got = natural_mask(p, layout, q, k, layer)
        want = oracle_mask(layout, q, k, layer, mode, scope, tau=0.3, topk=p.layer_topk(layer))
        assert torch.equal(got, want), f"layer {layer}: {int((got != want).sum())} entries differ"


@pytest.mark.parametrize(
    "mode,scope", [("threshold", "query"), ("threshold", "head"), ("topk", "query"), ("topk", "head")]
)
def test_tile_granularity_equals_oracle_and_lists_are_exact(mode, scope):
    """One selection per kernel query tile (mean query): equals the oracle on tiles, and the
    kernel's key lists compute exactly the kept pairs (no per-row mask left)."""
    layout, bs = LAYOUTS[1], 8
    q, k, _ = random_qkv(layout, batch=1, heads=2, dim=8, dtype=torch.float64)
    vo, Sv = layout.video_offset, layout.video_len
    for layer in (0, 1, 2):
        p = pattern(mode, scope, topk=3, threshold=0.3, granularity="tile")
        got = natural_mask(p, layout, q, k, layer, block_size=bs)
        want = oracle_mask(layout, q, k, layer, mode, scope, tau=0.3, topk=3, tile=bs)
        assert torch.equal(got, want), f"layer {layer}: {int((got != want).sum())} entries differ"
        plan = p.dynamic_plan(layout, q, k, layer, bs)
        assert plan.query_select is None and plan.key_group is None
        kept = got[:, :, vo : vo + Sv, vo : vo + Sv].double().mean(dim=(-1, -2))
        torch.testing.assert_close(selection_density(plan), kept)


@pytest.mark.parametrize(
    "mode,scope", [("threshold", "query"), ("threshold", "head"), ("topk", "query"), ("topk", "head")]
)
def test_ties_and_constant_gates_follow_the_rule(mode, scope):
    """Zero queries make every gate equal: threshold keeps all (span 0 -> no mass reaches tau),
    top-k keeps the lowest block ids (ties broken by block id, then query index)."""
    lay = vs.VideoLayout(4, 4, 6)
    q, k, _ = random_qkv(lay, batch=1, heads=1, dim=8, dtype=torch.float64)
    q.zero_()
    layer = 2
    got = natural_mask(pattern(mode, scope, topk=3), lay, q, k, layer)
    want = oracle_mask(lay, q, k, layer, mode, scope, topk=3)
    assert torch.equal(got, want)
    if mode == "threshold":
        assert bool(got.all())
    else:
        ids, _ = oracle_blocks(lay, SMALL, layer)
        assert not bool(got.all()) and bool(got[0, 0, :, [t for t, b in enumerate(ids) if b == 0]].all())


@pytest.mark.parametrize("layout", LAYOUTS[:2], ids=str)
@pytest.mark.parametrize("scope", ["query", "head"])
def test_own_block_always_kept_even_when_it_scores_lowest(layout, scope):
    q, k, _ = random_qkv(layout, batch=1, heads=2, dim=8, dtype=torch.float64)
    vo, Sv = layout.video_offset, layout.video_len
    for layer in (0, 1, 2):
        ids, G = oracle_blocks(layout, SMALL, layer)
        member = torch.tensor(ids)
        # Each query points away from its own block's mean: its own gate is the lowest.
        kv = k[0, vo : vo + Sv]
        for i in range(Sv):
            q[0, vo + i] = -kv[member == ids[i]].mean(dim=0)
        for mode in ("threshold", "topk"):
            m = natural_mask(pattern(mode, scope, topk=2), layout, q, k, layer)[0]
            video = m[:, vo : vo + Sv, vo : vo + Sv]
            same = member[:, None] == member[None, :]
            assert bool(video[:, same].all())
            if mode == "threshold" and scope == "query" and G > 1:
                # At least one other block besides the own one, whatever tau.
                assert bool((video & ~same).any(dim=-1).all())


@pytest.mark.parametrize("layout", LAYOUTS[2:], ids=str)
@pytest.mark.parametrize("scope", ["query", "head"])
def test_threshold_one_or_k_all_blocks_is_dense(layout, scope):
    q, k, _ = random_qkv(layout, batch=2, heads=2, dim=8)
    for layer in (0, 1, 2):
        G = VMoBA(**SMALL).num_blocks(layout, layer)
        for p in (pattern("threshold", scope, threshold=1.0), pattern("topk", scope, topk=G)):
            assert bool(natural_mask(p, layout, q, k, layer).all())
        sparse = natural_mask(pattern("topk", scope, topk=max(1, G - 1)), layout, q, k, layer)
        assert G == 1 or not bool(sparse.all())


BACKEND_CASES = [
    (backend, layout, layer) for backend in ("torch", "flex") for layout in LAYOUTS[1:] for layer in (0, 1, 2)
] + [("triton", LAYOUTS[2], 1), ("triton", LAYOUTS[1], 2)]  # the interpreter is slow: two cases
BACKEND_CASES += [(backend, LAYOUTS[1], 3) for backend in ("torch", "flex", "triton")]  # 3: tile granularity
LAYER_MODES = {0: ("threshold", "query"), 1: ("topk", "head"), 2: ("threshold", "head"), 3: ("threshold", "query")}


@pytest.mark.parametrize("backend,layout,layer", BACKEND_CASES, ids=str)
def test_backends_equal_masked_attention(backend, layout, layer):
    q, k, v = random_qkv(layout, batch=2, heads=2, dim=16)
    if backend == "triton":
        reason = importlib.import_module("vidsparse.kernels.triton_backend").unsupported_reason(q)
        if reason is not None:
            pytest.skip(reason)
    tm = random_text_mask(layout, 2)
    p = pattern(*LAYER_MODES[layer], topk=2, temporal_chunk=1, granularity="tile" if layer == 3 else "token")
    mask = natural_mask(p, layout, q, k, layer)
    assert not bool(mask.all())
    out = vs.attention(q, k, v, layout, p, backend=backend, layer=layer, text_mask=tm, block_size=16)
    ref = masked_attention(q, k, v, mask, layout, tm)
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=1e-4)


def test_gradients_flow_through_selected_blocks():
    lay = LAYOUTS[1]
    q, k, v = random_qkv(lay, batch=1, heads=2, dim=8, dtype=torch.float64, requires_grad=True)
    p = pattern("threshold", "query")
    mask = natural_mask(p, lay, q.detach(), k.detach(), 2)
    out = vs.attention(q, k, v, lay, p, backend="torch", layer=2, block_size=16)
    ref = masked_attention(q, k, v, mask, lay)
    g = torch.randn_like(out)
    grads = torch.autograd.grad((out * g).sum(), (q, k, v))
    ref_grads = torch.autograd.grad((ref * g).sum(), (q, k, v))
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-9)


def test_mask_independent_of_kernel_block_size_and_chunking(monkeypatch):
    lay = LAYOUTS[1]
    q, k, _ = random_qkv(lay, batch=2, heads=2, dim=8)
    for scope in ("query", "head"):
        p = pattern("threshold", scope)
        base = natural_mask(p, lay, q, k, 2, block_size=16)
        for bs in (8, 64):
            assert torch.equal(natural_mask(p, lay, q, k, 2, block_size=bs), base)
        monkeypatch.setattr(vmoba_mod, "_SELECT_ELEMENTS", 7)  # one head and 1 query row per step
        assert torch.equal(natural_mask(p, lay, q, k, 2), base)
        monkeypatch.undo()


def test_plan_layout_blocks_contiguous_and_lists_minimal():
    lay = vs.VideoLayout(5, 3, 7, text_len=6, text_position="after")
    q, k, _ = random_qkv(lay, batch=2, heads=2, dim=8)
    bs = 8
    for layer in (0, 1, 2):
        plan = VMoBA(**SMALL).dynamic_plan(lay, q, k, layer, bs)
        ids, G = oracle_blocks(lay, SMALL, layer)
        vidx = plan.order.video_index
        nvb = plan.order.text_start // bs
        # Each kernel block holds tokens of one VMoBA block, key_group says which; text is group G.
        for kb in range(nvb):
            toks = vidx[kb * bs : (kb + 1) * bs]
            toks = toks[toks >= 0]
            assert toks.numel() and {ids[t] for t in toks.tolist()} == {int(plan.key_group[kb])}
        assert plan.key_group[nvb:].eq(G).all() and plan.query_select.shape == (2, 2, plan.padded_len, G + 1)
        # Every listed video key block is kept by at least one valid row of the query block.
        qs = plan.query_select
        for b in range(2):
            for h in range(2):
                for qb in range(nvb):
                    c = int(plan.kv_counts[b, h, qb])
                    listed = plan.kv_indices[b, h, qb, :c].long()
                    assert torch.equal(listed, listed.sort().values)
                    rows = qs[b, h, qb * bs : (qb + 1) * bs][plan.order.token_valid[qb * bs : (qb + 1) * bs]]
                    groups = plan.key_group[listed].long()
                    assert bool(rows[:, groups].any(dim=0).all())
                    assert (plan.key_group[listed] == G).sum() == plan.text_blocks.sum()


def test_query_select_is_group_major_and_equals_the_row_major_oracle():
    """The plan stores the selection group-major (each group's rows contiguous, the layout the
    kernels load per key tile) with exactly the values of the per-query oracle; ``group_major``
    leaves such a tensor alone and re-lays a row-major one without changing a value."""
    from vidsparse.plan import group_major

    lay = LAYOUTS[1]
    q, k, _ = random_qkv(lay, batch=2, heads=2, dim=8, dtype=torch.float64)
    for layer, (mode, scope) in ((0, ("threshold", "query")), (2, ("topk", "head"))):
        p = pattern(mode, scope, topk=2)
        plan = p.dynamic_plan(lay, q, k, layer, 16)
        qs = plan.query_select
        assert qs.stride(2) == 1 and qs.transpose(2, 3).is_contiguous()
        assert group_major(qs) is qs
        # Caller row i keeps caller key j exactly when the oracle says so (text included).
        pos = plan.order.scatter  # kernel position of each caller token
        groups = plan.key_group.repeat_interleave(16)[pos].long()  # group of each caller key
        got = qs[:, :, pos][..., groups]  # [B, H, S, S]
        want = oracle_mask(lay, q, k, layer, mode, scope, topk=p.layer_topk(layer))
        assert torch.equal(got, want)
        row_major = qs.contiguous()
        assert row_major.stride(-1) == 1 and torch.equal(group_major(row_major), qs)
        assert group_major(row_major).stride(2) == 1
    with pytest.raises(ValueError, match="S_pad, G"):
        group_major(torch.zeros(4, dtype=torch.bool))


def test_selection_has_static_shapes_and_runs_on_meta():
    """On the meta device there is no data: any .item(), nonzero or data-dependent shape would raise."""
    lay = vs.VideoLayout(5, 3, 7, text_len=6, text_position="before")
    shapes = set()
    for seed in (0, 1):
        torch.manual_seed(seed)
        q, k, _ = random_qkv(lay, batch=2, heads=3, dim=8)
        for p in (pattern("threshold", "query"), pattern("topk", "head", topk=3)):
            plan = p.dynamic_plan(lay, q, k, 2, 16)
            shapes.add(
                tuple(tuple(t.shape) for t in (plan.kv_counts, plan.kv_indices, plan.mask_ids, plan.query_select))
            )
    assert len(shapes) == 1
    ((counts, indices, _, qsel),) = shapes
    assert indices[-1] == indices[-2] == counts[-1]  # MAXK = number of key blocks
    for p in (pattern("threshold", "query"), pattern("threshold", "head"), pattern("topk", "query")):
        qm = torch.empty(2, lay.seq_len, 3, 8, device="meta")
        plan = p.dynamic_plan(lay, qm, torch.empty_like(qm), 2, 16)
        assert plan.kv_indices.is_meta and plan.query_select.is_meta
        assert tuple(plan.kv_indices.shape) == indices and tuple(plan.query_select.shape) == qsel
    tiled = pattern("topk", "head", granularity="tile").dynamic_plan(lay, qm, torch.empty_like(qm), 2, 16)
    assert tiled.kv_counts.is_meta and tuple(tiled.kv_indices.shape) == indices


def test_partition_cycle_and_wan_block_counts():
    p = VMoBA()
    wan = vs.VideoLayout(21, 30, 52)
    assert [p.partition(i) for i in range(4)] == ["temporal", "spatial", "spatiotemporal", "temporal"]
    # Paper Table 4, Wan 2.1 480p: 7 / 24 / 72 blocks.
    assert [p.num_blocks(wan, i) for i in range(3)] == [7, 24, 72]
    assert p.block_shape(wan, 1) == (21, 5, 13) and p.layer_topk(2) == 18
    shifted = VMoBA(layer_offset=1, layer_cycle=[2, 0, 1])
    assert [shifted.partition(i) for i in range(5)] == [
        "spatiotemporal",
        "temporal",
        "temporal",
        "spatiotemporal",
        "temporal",
    ]
    ragged = vs.VideoLayout(5, 3, 7)
    assert p.block_shape(ragged, 2) == (5, 3, 7) and p.num_blocks(ragged, 0) == 2


def test_registry_and_json_style_options():
    p = vs.make_pattern("vmoba", spatial_chunk=[5, 13], st_chunk=[7, 5, 13], topk=[2, 6, 18], scope="head_global")
    assert p == VMoBA(scope="head") and hash(p) == hash(VMoBA(scope="head"))
    assert vs.VMoBA is VMoBA and vs.PATTERNS["vmoba"] is VMoBA


def test_selection_density_is_consistent_with_mask():
    lay = LAYOUTS[2]
    q, k, _ = random_qkv(lay, batch=2, heads=2, dim=8)
    p = pattern("threshold", "query")
    plan = vs.plan(p, lay, num_heads=2, layer=2, q=q, k=k, block_size=16)
    m = natural_mask(p, lay, q, k, 2)
    vo, Sv = lay.video_offset, lay.video_len
    want = m[:, :, vo : vo + Sv, vo : vo + Sv].double().mean(dim=(-1, -2))
    torch.testing.assert_close(selection_density(plan), want)


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(select_mode="top-k"), ValueError, "select_mode"),
        (dict(threshold=0.0), ValueError, "threshold"),
        (dict(threshold=1.5), ValueError, "threshold"),
        (dict(temporal_chunk=0), ValueError, "temporal_chunk"),
        (dict(spatial_chunk=(0, 3)), ValueError, "spatial_chunk"),
        (dict(st_chunk=(2, 2)), TypeError, "st_chunk"),
        (dict(topk=0), ValueError, "topk"),
        (dict(scope="global"), ValueError, "scope"),
        (dict(layer_cycle=(0, 0, 0)), ValueError, "layer_cycle"),
        (dict(granularity="row"), ValueError, "granularity"),
    ],
)
def test_bad_options_raise(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        VMoBA(**kwargs)


def test_bad_call_inputs_raise():
    lay = vs.VideoLayout(2, 3, 4)
    q = torch.randn(1, lay.seq_len, 2, 8)
    with pytest.raises(ValueError, match="q= and k="):
        vs.token_mask(VMoBA(), lay)
    with pytest.raises(ValueError, match="Sequence length"):
        VMoBA().dynamic_plan(lay, q[:, :-1], q[:, :-1], 0, 16)
    with pytest.raises(ValueError, match="one shape"):
        VMoBA().dynamic_plan(lay, q, q[..., :4], 0, 16)
