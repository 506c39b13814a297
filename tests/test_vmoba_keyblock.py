"""VMoBA's key-block-major path: packing covers exactly the token mask, torch and Triton outputs
and gradients equal masked attention, and the work accounting counts what each path computes."""

import importlib
import importlib.util

import pytest
import torch
from bench_scripts import load_script
from oracle import masked_attention, natural_mask, random_qkv, random_text_mask

import vidsparse as vs
from vidsparse.kernels import keyblock
from vidsparse.patterns.vmoba import VMoBA
from vidsparse.work import PlanWork, executed_path, plan_work

SMALL = dict(temporal_chunk=1, spatial_chunk=(2, 3), st_chunk=(2, 2, 3))
LAYOUTS = [
    vs.VideoLayout(4, 4, 6),
    vs.VideoLayout(5, 3, 7, text_len=6, text_position="before"),  # ragged on every axis
    vs.VideoLayout(3, 5, 4, text_len=5, text_position="after"),
]
MODES = [("threshold", "query"), ("topk", "head"), ("threshold", "head"), ("topk", "query")]


def pattern(i: int, **extra) -> VMoBA:
    mode, scope = MODES[i % len(MODES)]
    selection = {"topk": (2, 3, 3)} if mode == "topk" else {"threshold": 0.3}
    return VMoBA(**{**SMALL, **extra}, select_mode=mode, scope=scope, **selection)


def packed_mask(plan, pk: keyblock.Packing) -> tuple[torch.Tensor, int]:
    """bool [B, H, S, S] natural order rebuilt from the packed tiles, and the number of duplicate pairs."""
    B, H = plan.query_select.shape[:2]
    S = plan.layout.seq_len
    gkeys, _ = keyblock._group_keys(plan, "cpu")
    out = torch.zeros(B, H, S, S, dtype=torch.int64)
    for t in range(pk.num_tiles):
        bh, g = int(pk.tile_bh[t]), int(pk.tile_group[t])
        rows = pk.rows[t * pk.block_m : (t + 1) * pk.block_m].long()
        rows = rows[rows >= 0]
        keys = gkeys[g][gkeys[g] >= 0]
        out[bh // H, bh % H, rows[:, None], keys[None, :]] += 1
    return out > 0, int((out > 1).sum())


@pytest.mark.parametrize("layout", LAYOUTS, ids=str)
def test_packing_is_exactly_the_token_mask(layout):
    """Every (query, key) pair of the per-query mask is in exactly one packed tile, nothing else is,
    and each (batch, head, group) pads less than one tile."""
    q, k, _ = random_qkv(layout, batch=2, heads=2, dim=8)
    for layer in (0, 1, 2):
        p = pattern(layer)
        plan = p.dynamic_plan(layout, q, k, layer, 8)
        assert plan.group_spans is not None
        pk = keyblock.pack(plan, 8)
        got, dupes = packed_mask(plan, pk)
        assert dupes == 0
        assert torch.equal(got, natural_mask(p, layout, q, k, layer)), f"layer {layer}"
        slots = pk.tile_count.view_as(pk.row_count).long() * 8
        assert bool(((slots - pk.row_count) >= 0).all() and ((slots - pk.row_count) < 8).all())


def test_group_spans_hold_each_groups_keys():
    lay = LAYOUTS[1]
    q, k, _ = random_qkv(lay, batch=1, heads=1, dim=8)
    for layer in (0, 1, 2):
        plan = VMoBA(**SMALL).dynamic_plan(lay, q, k, layer, 8)
        G = plan.group_spans.shape[0]
        assert plan.query_select.shape[-1] == G
        for g, (start, n) in enumerate(plan.group_spans.tolist()):
            pos = torch.arange(start, start + n)
            assert bool(plan.order.token_valid[pos].all())
            assert bool((plan.key_group[pos // 8] == g).all())
            assert int((plan.key_group.repeat_interleave(8)[plan.order.token_valid] == g).sum()) == n


@pytest.mark.parametrize("layout", LAYOUTS, ids=str)
def test_torch_path_equals_masked_attention_with_gradients(layout):
    for layer in (0, 1, 2):
        q, k, v = random_qkv(layout, batch=2, heads=2, dim=8, dtype=torch.float64, requires_grad=True)
        tm = random_text_mask(layout, 2)
        p = pattern(layer + 1)
        mask = natural_mask(p, layout, q.detach(), k.detach(), layer)
        assert not bool(mask.all())
        out = vs.attention(q, k, v, layout, p, backend="torch", layer=layer, text_mask=tm, block_size=16)
        ref = masked_attention(q, k, v, mask, layout, tm)
        torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-10)
        # The query-tile path on the same selection gives the same result.
        tiled = vs.attention(
            q, k, v, layout, pattern(layer + 1, path="query_tile"), backend="torch", layer=layer, text_mask=tm,
            block_size=16,
        )  # fmt: skip
        torch.testing.assert_close(out, tiled, atol=1e-12, rtol=1e-10)
        g = torch.randn_like(out)
        grads = torch.autograd.grad((out * g).sum(), (q, k, v))
        want = torch.autograd.grad((ref * g).sum(), (q, k, v))
        for a, b in zip(grads, want):
            torch.testing.assert_close(a, b, atol=1e-11, rtol=1e-9)


def assert_grads_close(got, want, names: str = "qkv") -> None:
    """Triton-path gradients against the float64 oracle's, named in the failure message."""
    for name, a, b in zip(names, got, want, strict=True):
        torch.testing.assert_close(a.double(), b.double(), atol=5e-5, rtol=1e-4, msg=lambda m, n=name: f"d{n}: {m}")


def _triton_or_skip(q):
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton not installed")
    reason = importlib.import_module("vidsparse.kernels.triton_backend").unsupported_reason(q)
    if reason is not None:
        pytest.skip(reason)


@pytest.mark.parametrize(
    "layout,layer",
    [(vs.VideoLayout(3, 4, 4, text_len=5, text_position="after"), 2), (vs.VideoLayout(4, 3, 5), 1)],
    ids=str,
)
def test_triton_path_forward_and_backward_equal_masked_attention(layout, layer):
    q, k, v = random_qkv(layout, batch=2, heads=2, dim=16, requires_grad=True)
    _triton_or_skip(q)
    tm = random_text_mask(layout, 2)
    p = pattern(layer, st_chunk=(2, 2, 2))
    mask = natural_mask(p, layout, q.detach(), k.detach(), layer)
    assert not bool(mask.all())
    out = vs.attention(q, k, v, layout, p, backend="triton", layer=layer, text_mask=tm, block_size=16)
    ref = masked_attention(q, k, v, mask, layout, tm)
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=1e-4)
    g = torch.randn_like(out)
    grads = torch.autograd.grad((out * g).sum(), (q, k, v))
    want = torch.autograd.grad((ref * g.double()).sum(), (q, k, v))
    assert_grads_close(grads, want)


@pytest.mark.parametrize("scale,block_n", [(None, 16), (-0.3, 32)])
def test_triton_temporal_layer_reads_keys_by_tma_and_equals_masked_attention(monkeypatch, scale, block_n):
    """A temporal partition's groups (and the text group) are runs of consecutive caller rows:
    forward and dQ read their K/V sub-tiles through tensor descriptors straight from the
    caller's K/V. 32-key sub-tiles over 16-token blocks leave ragged tails (the masked loop);
    run-time text validity keeps the text group out of the unmasked sub-tiles (30-key groups:
    one whole 16-key sub-tile and a tail, or a 32-key tail only). Descriptors and row gathers
    both equal masked attention, with gradients, for either sign of the scale."""
    lay = vs.VideoLayout(4, 3, 5, text_len=6, text_position="before")
    q, k, v = random_qkv(lay, batch=2, heads=2, dim=16, requires_grad=True)
    _triton_or_skip(q)
    kt = importlib.import_module("vidsparse.kernels.keyblock_triton")
    tm = random_text_mask(lay, 2)
    p = pattern(0, temporal_chunk=2)
    plan = vs.plan(p, lay, num_heads=2, layer=0, q=q.detach(), k=k.detach(), block_size=16)
    st = kt._Static(plan, keyblock.pack(plan, 16), plan.key_valid(tm, 2), q.device)
    (*video, (t0, tn)) = plan.group_spans.tolist()
    text_sure = plan.key_valid(tm, 2).all(0)[t0 : t0 + tn].int()
    assert bool((~plan.key_valid(tm, 2)).any())  # some text key masked at run time
    assert st.contiguous and st.lead.tolist() == [n for _, n in video] + [int(text_sure.cumprod(0).sum())]
    mask = natural_mask(p, lay, q.detach(), k.detach(), 0)
    c = 1.0 if scale is None else scale * q.shape[-1] ** 0.5  # the oracle scales by dim ** -0.5
    ref = masked_attention(q * c, k, v, mask, lay, tm)
    g = torch.randn_like(ref)
    want = torch.autograd.grad((ref * g).sum(), (q, k, v))
    for tma in ("1", "0"):
        monkeypatch.setenv("VIDSPARSE_TRITON_TMA", tma)
        kvo = kt._kv_operands(st, q, q)
        assert (kvo.tma, kvo.kernel_order, kvo.k is q) == (tma == "1", False, True)
        out = keyblock.attention(
            q, k, v, plan, text_mask=tm, scale=scale, backend="triton", block_m=16, block_n=block_n
        )
        torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=1e-4)
        grads = torch.autograd.grad((out * g.to(out.dtype)).sum(), (q, k, v))
        assert_grads_close(grads, want)


@pytest.mark.parametrize("layer", [1, 2])
def test_triton_box_partitions_read_a_group_major_copy_by_tma(monkeypatch, layer):
    """Spatial and spatio-temporal groups are boxes of the latent grid, runs of a few caller
    rows: with TMA the call reads a group-major copy of K/V (each group one run starting at its
    span, padding rows masked), the backward reuses it and writes dK/dV to caller rows; with
    ``VIDSPARSE_TRITON_TMA=0`` it gathers caller rows. Both equal masked attention, with
    gradients, on a grid that leaves partial blocks (padding inside the copy) and text after."""
    lay = vs.VideoLayout(3, 5, 3, text_len=5, text_position="after")
    q, k, v = random_qkv(lay, batch=2, heads=2, dim=16, requires_grad=True)
    _triton_or_skip(q)
    kt = importlib.import_module("vidsparse.kernels.keyblock_triton")
    tm = random_text_mask(lay, 2)
    p = pattern(layer, st_chunk=(2, 2, 2))
    plan = vs.plan(p, lay, num_heads=2, layer=layer, q=q.detach(), k=k.detach(), block_size=16)
    st = kt._Static(plan, keyblock.pack(plan, 16), plan.key_valid(tm, 2), q.device)
    assert not st.contiguous
    krows = st.krows
    assert bool((krows < 0).any())  # padding rows inside the kernel order
    ref = masked_attention(q, k, v, natural_mask(p, lay, q.detach(), k.detach(), layer), lay, tm)
    g = torch.randn_like(ref)
    want = torch.autograd.grad((ref * g).sum(), (q, k, v))
    for tma in ("1", "0"):
        monkeypatch.setenv("VIDSPARSE_TRITON_TMA", tma)
        kvo = kt._kv_operands(st, k.detach(), v.detach())
        if tma == "1":
            assert kvo.tma and kvo.kernel_order and kvo.k.shape[1] == krows.numel()
            real = krows >= 0
            torch.testing.assert_close(kvo.k[:, real], k.detach()[:, krows[real].long()])
            assert kvo.start.tolist() == plan.group_spans[:, 0].tolist()
        else:
            assert not kvo.tma and not kvo.kernel_order and kvo.k.shape == k.shape
        out = keyblock.attention(q, k, v, plan, text_mask=tm, backend="triton", block_m=16, block_n=16)
        torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=1e-4)
        grads = torch.autograd.grad((out * g.to(out.dtype)).sum(), (q, k, v))
        assert_grads_close(grads, want)


def test_triton_dkdv_sub_steps_equal_whole_tiles(monkeypatch):
    """dK/dV walks each packed query tile in sub-steps of ``DKDV_SUB_M`` rows (a whole 128-row
    step spilled on sm_90): 32-row tiles in 16-row steps give the gradients of masked attention."""
    lay = vs.VideoLayout(3, 4, 4, text_len=5, text_position="after")
    q, k, v = random_qkv(lay, batch=1, heads=2, dim=16, requires_grad=True)
    _triton_or_skip(q)
    keyblock_triton = importlib.import_module("vidsparse.kernels.keyblock_triton")
    tm = random_text_mask(lay, 1)
    p = pattern(2, st_chunk=(2, 2, 2))
    plan = vs.plan(p, lay, num_heads=2, layer=2, q=q.detach(), k=k.detach(), block_size=16)
    monkeypatch.setattr(keyblock_triton, "DKDV_SUB_M", 16)
    out = keyblock.attention(q, k, v, plan, text_mask=tm, backend="triton", block_m=32, block_n=16)
    ref = masked_attention(q, k, v, natural_mask(p, lay, q.detach(), k.detach(), 2), lay, tm)
    g = torch.randn_like(out)
    got = torch.autograd.grad((out * g).sum(), (k, v))
    want = torch.autograd.grad((ref * g.double()).sum(), (k, v))
    assert_grads_close(got, want, "kv")


def test_chunked_partials_equal_one_chunk(monkeypatch):
    """Batch-heads split into several partial buffers (memory bound) merge to the same output."""
    lay = vs.VideoLayout(3, 4, 4, text_len=5, text_position="before")
    q, k, v = random_qkv(lay, batch=2, heads=2, dim=16, dtype=torch.float64)
    p = pattern(0)
    whole = vs.attention(q, k, v, lay, p, backend="torch", layer=2, block_size=16)
    monkeypatch.setattr(keyblock, "_PARTIAL_ROWS", 1)
    monkeypatch.setattr(keyblock, "_TORCH_ELEMENTS", 1)
    plan = vs.plan(p, lay, num_heads=2, layer=2, q=q, k=k, block_size=16)
    assert len(list(keyblock.chunks(keyblock.pack(plan, 16)))) == 4  # one per batch-head
    torch.testing.assert_close(vs.attention(q, k, v, lay, p, backend="torch", layer=2, block_size=16), whole)
    q32, k32, v32 = (t.float().requires_grad_(True) for t in (q, k, v))
    _triton_or_skip(q32)
    out = vs.attention(q32, k32, v32, lay, p, backend="triton", layer=2, block_size=16)
    torch.testing.assert_close(out.double(), whole, atol=2e-5, rtol=1e-4)
    out.sum().backward()  # dQ over several chunks
    ref_q = q.clone().requires_grad_(True)
    vs.attention(ref_q, k, v, lay, p, backend="torch", layer=2, block_size=16).sum().backward()
    torch.testing.assert_close(q32.grad.double(), ref_q.grad, atol=5e-5, rtol=1e-4)


def test_merge_is_exact_and_handles_empty_rows():
    torch.manual_seed(0)
    D, n_out = 4, 3
    s = torch.randn(2, 5, dtype=torch.float64)  # row 0: two partials of 2 and 3 keys; row 1 none
    vals = torch.randn(5, D, dtype=torch.float64)
    parts = [(0, slice(0, 2)), (0, slice(2, 5)), (2, slice(0, 5))]
    o, lse, tgt = [], [], []
    for r, sl in parts:
        w = torch.softmax(s[r // 2, sl], dim=0)
        o.append(w @ vals[sl])
        lse.append(torch.logsumexp(s[r // 2, sl], dim=0))
        tgt.append(r)
    o.append(torch.full((D,), 7.0, dtype=torch.float64))  # padding slot: ignored
    lse.append(torch.tensor(3.0, dtype=torch.float64))
    tgt.append(-1)
    out, l_out = keyblock.merge(torch.stack(o), torch.stack(lse), torch.tensor(tgt), n_out)
    for r in (0, 2):
        torch.testing.assert_close(out[r], torch.softmax(s[r // 2], dim=0) @ vals)
        torch.testing.assert_close(l_out[r], torch.logsumexp(s[r // 2], dim=0))
    assert bool((out[1] == 0).all()) and l_out[1] == float("-inf")


def test_work_counts_what_each_path_computes():
    lay = LAYOUTS[1]
    q, k, _ = random_qkv(lay, batch=2, heads=2, dim=8)
    for layer in (0, 1, 2):
        p = pattern(layer)
        plan = vs.plan(p, lay, num_heads=2, layer=layer, q=q, k=k, block_size=8)
        mask = natural_mask(p, lay, q, k, layer, block_size=8)
        kb = plan_work(plan, block_m=4, block_n=8)
        qt = plan_work(plan, "query_tile")
        assert isinstance(kb, PlanWork) and kb.path == "key_block" and qt.path == "query_tile"
        assert kb.dense_pairs == lay.seq_len**2
        assert kb.kept_pairs == qt.kept_pairs == pytest.approx(float(mask.double().sum(dim=(-1, -2)).mean()))
        # Brute force over the packing: tiles x rows x keys rounded up to block_n.
        pk = keyblock.pack(plan, 4)
        keys = (plan.group_spans[:, 1].long() + 7) // 8 * 8
        brute = sum(4 * int(keys[int(g)]) for g in pk.tile_group) / 4  # 4 = batch x heads
        assert kb.computed_pairs == pytest.approx(brute)
        assert qt.computed_pairs == pytest.approx(float(plan.kv_counts.double().sum(-1).mean()) * 64)
        assert kb.computed_pairs >= kb.kept_pairs and kb.overhead >= 1.0
        assert len(kb.per_head_computed) == 2
    assert executed_path(plan, "triton") == "key_block" and executed_path(plan, "flex") == "query_tile"


def test_work_of_static_and_tile_plans_counts_the_mask():
    lay = vs.VideoLayout(4, 8, 8, text_len=10, text_position="after")
    for name in ("radial", "tile"):
        plan = vs.plan(name, lay, block_size=16)
        w = plan_work(plan)
        assert w.path == "query_tile"
        assert w.kept_pairs == pytest.approx(float(vs.token_mask(name, lay, block_size=16).double().sum()))
        assert w.computed_pairs == pytest.approx(plan.density * plan.num_blocks**2 * 256)
    q, k, _ = random_qkv(lay, batch=1, heads=2, dim=8)
    p = VMoBA(**SMALL, granularity="tile")
    plan = vs.plan(p, lay, num_heads=2, layer=2, q=q, k=k, block_size=16)
    assert plan.group_spans is None and executed_path(plan, "torch") == "query_tile"
    assert plan_work(plan).kept_pairs == pytest.approx(
        float(natural_mask(p, lay, q, k, 2).double().sum(-1).sum(-1).mean())
    )
    with pytest.raises(ValueError, match="group_spans"):
        plan_work(plan, "key_block")


def test_paths_options_and_bad_inputs():
    assert VMoBA().kernel_path == "key_block" and VMoBA(granularity="tile").kernel_path == "query_tile"
    assert VMoBA(path="query_tile").kernel_path == "query_tile"
    with pytest.raises(ValueError, match="path"):
        VMoBA(path="varlen")
    with pytest.raises(ValueError, match="granularity='tile'"):
        VMoBA(path="key_block", granularity="tile")
    lay = LAYOUTS[2]
    q, k, v = random_qkv(lay, batch=1, heads=2, dim=8)
    plan = vs.plan(VMoBA(**SMALL, path="query_tile"), lay, num_heads=2, layer=1, q=q, k=k, block_size=16)
    assert plan.group_spans is None
    with pytest.raises(ValueError, match="group_spans"):
        keyblock.attention(q, k, v, plan)
    kb_plan = vs.plan(VMoBA(**SMALL), lay, num_heads=2, layer=1, q=q, k=k, block_size=16)
    with pytest.raises(ValueError, match="'torch' or 'triton'"):
        keyblock.attention(q, k, v, kb_plan, backend="flex")
    with pytest.raises(ValueError, match="batch x heads"):
        keyblock.attention(q[..., :1, :], k[..., :1, :], v[..., :1, :], kb_plan)
    with pytest.raises(ValueError, match="path must be"):
        plan_work(kb_plan, "varlen")
    # flex has no key-block implementation: it runs the plan's (still complete) query-tile lists.
    mask = natural_mask(VMoBA(**SMALL), lay, q, k, 1)
    out = vs.attention(q, k, v, lay, VMoBA(**SMALL), backend="flex", layer=1, block_size=16)
    torch.testing.assert_close(out.double(), masked_attention(q, k, v, mask, lay), atol=2e-5, rtol=1e-4)


def test_benchmark_measures_work_and_accuracy_at_a_tiny_shape():
    """benchmarks/vmoba.py's CPU stages on a tiny grid: fractions consistent with plan_work and the mask."""
    bench = load_script("vmoba")
    shape = bench.Shape("tiny", (4, 8, 12), heads=2, measured_heads=2, head_dim=16)
    (row,) = bench.measure_work(shape, structured=True, layers=(2,), block_size=16)
    assert 0 < row["token_density"] <= row["key_block_fraction"] and row["key_block_tiles"] > 0
    assert row["key_block_over_token"] == pytest.approx(row["key_block_fraction"] / row["token_density"])
    (acc,) = bench.measure_accuracy(bench.QUICK_ACCURACY, layers=(2,))
    assert 0 < acc["token_vs_dense"] < 1 and acc["tile64_vs_token"] >= 0
    md = bench._markdown(dict(created="t", device="cpu", vidsparse="0", git_commit="x" * 12, git_dirty=False,
                              torch="t", work=[row], accuracy=[acc]))  # fmt: skip
    assert "| tiny | structured | 2 |" in md
