"""Triton backend (CPU interpreter): every pattern, fwd + all grads vs the torch reference,
sub-tiling, empty rows, kernel-order API, torch.compile / opcheck, plan views, the benchmark."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported anywhere below

import dataclasses  # noqa: E402
import json  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from typing import ClassVar  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from oracle import masked_attention, random_qkv, random_text_mask  # noqa: E402

import vidsparse as vs  # noqa: E402
from vidsparse.kernels import reference  # noqa: E402

pytest.importorskip("triton")
from vidsparse.kernels import triton_backend as tb  # noqa: E402
from vidsparse.kernels import triton_kernels as tk  # noqa: E402
from vidsparse.kernels.triton_plan import CACHE, split_lists, transpose_lists  # noqa: E402

if tb.unsupported_reason(torch.zeros(1, 1, 1, 16)) is not None:
    pytest.skip("triton_backend was imported without TRITON_INTERPRET=1 and there is no GPU", allow_module_level=True)

# Small settings per pattern, so that tiny grids are valid and really masked.
SMALL = {
    "dense": {},
    "radial": dict(decay_factor=0.5, block_size=16, sink=True),
    "dual-scope": dict(local_frames=1, global_stride=2),
    "vmoba": dict(temporal_chunk=2, spatial_chunk=(2, 3), st_chunk=(2, 2, 3)),
    "tile": dict(tile=(1, 2, 3), window=(3, 1, 3)),
    "gna": dict(kernel_size=(2, 3, 2), stride=(1, 2, 1), dilation=(1, 1, 2)),
    "attention-tile": dict(global_frames=1),
}
# (layout, head dim, layer): no text; ragged with text after; text before. Padding in every one.
CASES = [
    (vs.VideoLayout(2, 4, 6), 32, 0),
    (vs.VideoLayout(3, 3, 5, text_len=9, text_position="after"), 16, 1),
    (vs.VideoLayout(3, 3, 5, text_len=7, text_position="before"), 64, 2),
]
ATOL = RTOL = 2e-5  # fp32 in the interpreter: exact dots, only summation order differs


def make(name: str):
    return vs.make_pattern(name, **SMALL.get(name, {}))


def run_both(
    layout, pattern, *, batch=2, heads=2, dim=16, layer=0, block_size=16, text_mask="random", dtype=torch.float32
):
    """(triton out, grads), (torch out, grads) for the same inputs and output gradient."""
    q, k, v = random_qkv(layout, batch=batch, heads=heads, dim=dim, dtype=dtype, requires_grad=True)
    tm = random_text_mask(layout, batch) if text_mask == "random" else text_mask
    g = torch.randn(batch, layout.seq_len, heads, dim, dtype=dtype)
    results = []
    for backend in ("triton", "torch"):
        ins = (q, k, v) if backend == "triton" else tuple(t.detach().float().requires_grad_(True) for t in (q, k, v))
        out = vs.attention(*ins, layout, pattern, backend=backend, layer=layer, text_mask=tm, block_size=block_size)
        out.backward(g.to(out.dtype))
        results.append((out.detach(), [t.grad for t in ins]))
    return results


def assert_match(tri, ref, atol=ATOL, rtol=RTOL):
    (o, grads), (ro, rgrads) = tri, ref
    torch.testing.assert_close(o.float(), ro, atol=atol, rtol=rtol)
    for name, gt, gr in zip("qkv", grads, rgrads):
        assert torch.isfinite(gt).all(), f"d{name} has non-finite values"
        torch.testing.assert_close(gt.float(), gr, atol=atol, rtol=rtol, msg=lambda m, n=name: f"d{n}: {m}")


# -- every registered pattern --------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-d{c[1]}-layer{c[2]}")
@pytest.mark.parametrize("name", sorted(vs.PATTERNS))
def test_pattern_forward_and_grads_match_torch(name, case):
    layout, dim, layer = case
    pattern = make(name)
    try:
        pattern.validate(layout)
    except ValueError as exc:
        if name in SMALL:
            raise
        pytest.skip(f"{name} at default settings does not fit the tiny grid {layout}: {exc}")
    assert_match(*run_both(layout, pattern, dim=dim, layer=layer))


@pytest.mark.parametrize(
    "layout,max_density",
    [(vs.VideoLayout(12, 2, 8), 0.3), (vs.VideoLayout(8, 4, 8, text_len=5, text_position="after"), 0.8)],
    ids=["radial-sparse", "radial-text"],
)
def test_skipped_blocks_and_sub_tiles(layout, max_density):
    """Plan blocks of 32 walked in 16-wide tiles (the GPU configs split plan blocks the same way)."""
    pattern = vs.make_pattern("radial", decay_factor=0.5, block_size=32)
    p = vs.plan(pattern, layout, block_size=32)
    listed = torch.arange(p.kv_indices.shape[-1]) < p.kv_counts.unsqueeze(-1)
    assert p.density < max_density  # whole blocks are skipped
    assert bool((listed & (p.mask_ids >= 0)).any())  # and some are computed under an element mask
    with tk.force_configs(fwd=tk.TileConfig(16, 16), dkdv=tk.TileConfig(16, 32), dq=tk.TileConfig(32, 16)):
        assert_match(*run_both(layout, pattern, batch=1, heads=1, dim=16, block_size=32))


# -- semantics corner cases ----------------------------------------------------------------


@dataclass(frozen=True)
class HalfBlind(vs.Pattern):
    """Video queries with index % 3 == 0 see no key at all; the others a local window."""

    name: ClassVar[str] = "half-blind"

    def video_mask(self, layout, qi, ki, layer=0):
        return (qi % 3 != 0) & ((qi - ki).abs() <= 9)


def test_rows_without_keys_give_zero_output_and_finite_grads():
    layout = vs.VideoLayout(2, 4, 6)
    tri, ref = run_both(layout, HalfBlind(), batch=1, heads=2, dim=16)
    blind = torch.arange(layout.video_len) % 3 == 0
    assert tri[0][:, blind].abs().max() == 0
    assert_match(tri, ref)
    mask = vs.token_mask(HalfBlind(), layout)
    q, k, v = random_qkv(layout, heads=2, dim=16)
    torch.testing.assert_close(
        vs.attention(q, k, v, layout, HalfBlind(), backend="triton", block_size=16).double(),
        masked_attention(q, k, v, mask, layout),
        atol=ATOL,
        rtol=RTOL,
    )


@pytest.mark.slow
def test_fully_padded_text_sample():
    """A sample whose whole text span is padding still matches (text rows see only video)."""
    layout = vs.VideoLayout(2, 3, 5, text_len=6, text_position="before")
    tm = torch.ones(2, 6, dtype=torch.bool)
    tm[1] = False
    assert_match(*run_both(layout, make("radial"), text_mask=tm))


@pytest.mark.slow
def test_float16_close_to_fp32_reference():
    layout = vs.VideoLayout(3, 3, 5, text_len=9, text_position="after")
    tri, ref = run_both(layout, make("radial"), dim=32, dtype=torch.float16)
    assert tri[0].dtype == torch.float16
    assert_match(tri, ref, atol=3e-3, rtol=3e-3)


def test_run_kernel_order_matches_reference_out_and_lse():
    layout = vs.VideoLayout(3, 3, 5, text_len=9, text_position="after")
    p = vs.plan(make("radial"), layout, num_heads=2, block_size=16)
    q, k, v = (torch.randn(2, 2, p.padded_len, 16) for _ in range(3))
    key_valid = p.key_valid(random_text_mask(layout, 2), 2)
    out, lse = tb.run(q, k, v, p, key_valid=key_valid, scale=0.3)
    rout, rlse = reference.run(q, k, v, p, key_valid=key_valid, scale=0.3)
    assert out.shape == q.shape and lse.shape == (2, 2, p.padded_len) and lse.dtype == torch.float32
    torch.testing.assert_close(out, rout, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(lse, rlse, atol=ATOL, rtol=RTOL)


# -- torch.compile and the custom op --------------------------------------------------------


@pytest.mark.slow
def test_torch_compile_fullgraph_matches_eager():
    layout = vs.VideoLayout(2, 3, 5, text_len=9, text_position="after")
    pattern = make("radial")
    tm = random_text_mask(layout, 2)

    def f(q, k, v, tm):
        return vs.attention(q, k, v, layout, pattern, backend="triton", text_mask=tm, block_size=16) * 2

    q, k, v = random_qkv(layout, batch=2, heads=2, dim=16, requires_grad=True)
    eager = f(q, k, v, tm)  # also caches the plan: a compiled graph only looks it up
    eager.sum().backward()
    grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")(q, k, v, tm)
    compiled.sum().backward()
    torch.testing.assert_close(compiled, eager)
    for g, t in zip(grads, (q, k, v)):
        torch.testing.assert_close(t.grad, g)


def test_custom_op_opcheck():
    layout = vs.VideoLayout(2, 2, 4, text_len=3, text_position="after")
    p = vs.plan(make("dense"), layout, num_heads=1, block_size=16)
    q, k, v = random_qkv(layout, batch=1, heads=1, dim=16, requires_grad=True)
    tm = torch.tensor([[True, True, False]])
    args = (q, k, v, *tb._op_args(p, True), p.key_valid(tm, 1), None, None, 0.25, 16)
    torch.library.opcheck(tb.block_sparse_attention, args)


# -- plan views and caching ------------------------------------------------------------------


def test_plan_views_cover_exactly_the_plan():
    layout = vs.VideoLayout(12, 2, 8, text_len=7, text_position="before")
    p = vs.plan(vs.make_pattern("radial", decay_factor=0.5, block_size=16), layout, block_size=32)
    listed = {
        (qb, int(kb), int(mid))
        for qb in range(p.num_blocks)
        for kb, mid in zip(
            p.kv_indices[0, 0, qb, : p.kv_counts[0, 0, qb]], p.mask_ids[0, 0, qb, : p.kv_counts[0, 0, qb]]
        )
    }
    fwd = split_lists(p.kv_counts, p.kv_indices, p.mask_ids, p.text_blocks)
    t = transpose_lists(p.kv_counts, p.kv_indices, p.mask_ids, p.num_blocks)
    got_fwd, got_t = set(), set()
    for blk in range(p.num_blocks):
        nm, na = int(fwd.n_masked[0, 0, blk]), int(fwd.n_total[0, 0, blk])
        idx, mid = fwd.idx[0, 0, blk], fwd.mid[0, 0, blk]
        # masked part: element mask or a text block; whole part: neither
        assert all(int(m) >= 0 or bool(p.text_blocks[int(i)]) for i, m in zip(idx[:nm], mid[:nm]))
        assert all(int(m) < 0 and not bool(p.text_blocks[int(i)]) for i, m in zip(idx[nm:na], mid[nm:na]))
        got_fwd |= {(blk, int(i), int(m)) for i, m in zip(idx[:na], mid[:na])}
        tn, ta = int(t.n_masked[0, 0, blk]), int(t.n_total[0, 0, blk])
        assert all(int(m) >= 0 for m in t.mid[0, 0, blk, :tn]) and all(int(m) < 0 for m in t.mid[0, 0, blk, tn:ta])
        got_t |= {(int(qb), blk, int(m)) for qb, m in zip(t.idx[0, 0, blk, :ta], t.mid[0, 0, blk, :ta])}
    assert got_fwd == listed and got_t == listed
    assert any(m >= 0 for _, _, m in listed) and any(m < 0 for _, _, m in listed)


def test_plan_views_are_cached_per_plan():
    layout = vs.VideoLayout(2, 4, 6)
    q, k, v = random_qkv(layout, heads=2, dim=16)
    CACHE.clear()
    vs.attention(q, k, v, layout, make("radial"), backend="triton", block_size=16)
    n = len(CACHE)
    vs.attention(q, k, v, layout, make("radial"), backend="triton", block_size=16)
    assert n > 0 and len(CACHE) == n


def test_static_plan_hot_path_has_no_host_sync(monkeypatch):
    """Once a static plan and its kernel views are cached, a forward + backward call reads no
    tensor value on the host (each such read is a device synchronisation on a GPU)."""
    layout = vs.VideoLayout(3, 3, 5, text_len=9, text_position="after")
    pattern = make("radial")
    q, k, v = random_qkv(layout, batch=2, heads=2, dim=16, requires_grad=True)
    tm = random_text_mask(layout, 2)
    vs.attention(q, k, v, layout, pattern, backend="triton", text_mask=tm, block_size=16).sum().backward()
    reads = []
    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "nonzero"):
        original = getattr(torch.Tensor, name)

        def spy(self, *args, _name=name, _original=original, **kwargs):
            reads.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, spy)
    vs.attention(q, k, v, layout, pattern, backend="triton", text_mask=tm, block_size=16).sum().backward()
    monkeypatch.undo()
    assert reads == []


# -- clear errors ----------------------------------------------------------------------------


def test_unsupported_reason_and_errors():
    assert tb.unsupported_reason(torch.zeros(1, 4, 2, 32)) is None
    assert "dtype" in tb.unsupported_reason(torch.zeros(1, 4, 2, 32, dtype=torch.float64))
    assert "head dim" in tb.unsupported_reason(torch.zeros(1, 4, 2, 24))
    assert "head dim" in tb.unsupported_reason(torch.zeros(1, 4, 2, 512))
    layout = vs.VideoLayout(2, 3, 4)
    q, k, v = random_qkv(layout, heads=2, dim=24)
    with pytest.raises(ValueError, match="head dim 24"):
        vs.attention(q, k, v, layout, "dense", backend="triton", block_size=16)
    q, k, v = random_qkv(layout, heads=2, dim=16)
    with pytest.raises(ValueError, match="block_size >= 16"):
        vs.attention(q, k, v, layout, "dense", backend="triton", block_size=8)
    p = vs.plan(make("dense"), layout, num_heads=2, block_size=16)
    with pytest.raises(ValueError, match="tokens for this plan"):
        tb.attention(q[:, :-1], k[:, :-1], v[:, :-1], p)
    with pytest.raises(ValueError, match="key_valid must be"):
        qk = torch.randn(1, 2, p.padded_len, 16)
        tb.run(qk, qk, qk, p, key_valid=torch.ones(1, 3, dtype=torch.bool))
    with pytest.raises(TypeError, match="BlockSparsePlan"):
        tb.attention(q, k, v, "dense")
    with pytest.raises(ValueError, match="does not divide"), tk.force_configs(fwd=tk.TileConfig(32, 16)):
        tb.attention(q, k, v, p)


# -- benchmark smoke run ---------------------------------------------------------------------

REQUIRED_TOP = {"schema", "device", "torch", "triton", "git_commit", "dtype", "shapes", "results"}
REQUIRED_ROW = {"shape", "pattern", "density", "backend", "direction", "ms", "tflops"}


def test_bench_cpu_quick_smoke(tmp_path, capsys):
    from vidsparse import bench

    argv = ["--device", "cpu", "--quick", "--out-dir", str(tmp_path), "--patterns", "radial",
            "--densities", "50", "--backends", "triton,sdpa", "--directions", "fwd,fwd+bwd"]  # fmt: skip
    assert bench.main(argv) == 0
    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(files) == 2 and files[0].endswith(".json") and files[1].endswith(".md")
    rep = json.loads((tmp_path / files[0]).read_text())
    assert set(rep) >= REQUIRED_TOP and rep["schema"] == bench.SCHEMA and rep["triton_interpret"]
    assert rep["shapes"]["tiny"]["seq_len"] == bench.SHAPES["tiny"].layout.seq_len
    rows = rep["results"]
    assert all(set(r) >= REQUIRED_ROW for r in rows)
    timed = {(r["pattern"], r["backend"], r["direction"]) for r in rows if r["ms"] is not None}
    for pattern in ("radial", "random-50%"):
        for direction in ("fwd", "fwd+bwd"):
            assert (pattern, "triton", direction) in timed
        assert (pattern, "plan", "build") in timed
    assert ("dense", "sdpa", "fwd+bwd") in timed
    tri = [r for r in rows if r["backend"] == "triton"]
    assert all(r["tflops"] > 0 and r["flops"] > 0 and 0 < r["density"] <= 1 for r in tri)
    fwd = next(r for r in tri if r["pattern"] == "radial" and r["direction"] == "fwd")
    both = next(r for r in tri if r["pattern"] == "radial" and r["direction"] == "fwd+bwd")
    assert both["flops"] == pytest.approx(2.5 * fwd["flops"])
    assert "| radial |" in (tmp_path / files[1]).read_text()


def test_bench_refuses_without_gpu_or_quick(tmp_path, capsys):
    from vidsparse import bench

    assert bench.main(["--device", "cpu", "--out-dir", str(tmp_path)]) == 2
    assert "--device cpu --quick" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert bench.main(["--out-dir", str(tmp_path)]) == 2
        assert "No CUDA GPU" in capsys.readouterr().err
    with pytest.raises(ValueError, match="Unknown shape"):
        bench.settings_from_args(_bench_args(shapes="wan-99b"))
    with pytest.raises(ValueError, match="densities"):
        bench.settings_from_args(_bench_args(densities="150"))
    assert not list(tmp_path.iterdir())


def _bench_args(**overrides):
    import argparse

    from vidsparse import bench

    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args(["--device", "cpu", "--quick"])
    return argparse.Namespace(**{**vars(args), **overrides})


def test_random_blocks_pattern_density():
    from vidsparse.benchcore import RandomBlocks

    layout = vs.VideoLayout(4, 8, 8)
    p = vs.plan(RandomBlocks(0.25, seed=3), layout, block_size=16)
    assert p.video_density == pytest.approx(0.25)
    assert all(bool((p.dense_block_matrix()[i, i]) == 2) for i in range(p.num_blocks))
    assert dataclasses.is_dataclass(RandomBlocks)


# -- kernel paths: TMA descriptors, folded scale, launch order -------------------------------


def test_tma_and_pointer_paths_agree_with_reference(monkeypatch):
    """Kernel-order q/k/v go through tensor descriptors (K/V tiles and element masks); the
    pointer path (VIDSPARSE_TRITON_TMA=0) and the reference give the same out and lse."""
    layout = vs.VideoLayout(3, 3, 5, text_len=9, text_position="after")
    p = vs.plan(make("radial"), layout, num_heads=2, block_size=16)
    assert p.block_masks.shape[0] > 0  # masked blocks go through the mask descriptor
    q, k, v = (torch.randn(2, 2, p.padded_len, 16) for _ in range(3))
    key_valid = p.key_valid(random_text_mask(layout, 2), 2)
    seen = []
    launch = tk._launch

    def spy(kernel, *args, **kwargs):
        if kernel is tk._fwd_kernel:
            seen.append((args[5]["USE_TMA"], args[5]["MASK_TMA"]))
        return launch(kernel, *args, **kwargs)

    monkeypatch.setattr(tk, "_launch", spy)
    out, lse = tb.run(q, k, v, p, key_valid=key_valid)
    monkeypatch.setenv("VIDSPARSE_TRITON_TMA", "0")
    out0, lse0 = tb.run(q, k, v, p, key_valid=key_valid)
    assert seen == [(True, True), (False, False)]
    rout, rlse = reference.run(q, k, v, p, key_valid=key_valid)
    for o, lse_ in ((out, lse), (out0, lse0)):
        torch.testing.assert_close(o, rout, atol=ATOL, rtol=RTOL)
        torch.testing.assert_close(lse_, rlse, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("scale", [-0.4, 0.05])
def test_whole_block_folded_scale_any_sign(scale):
    """The whole-block loop folds the scale into exp2 and scales the row max (min for a
    negative scale); out and lse match the reference either way."""
    layout = vs.VideoLayout(2, 4, 8)
    p = vs.plan(make("dense"), layout, num_heads=1, block_size=16)
    q, k, v = (3 * torch.randn(1, 1, p.padded_len, 16) for _ in range(3))
    out, lse = tb.run(q, k, v, p, scale=scale)
    rout, rlse = reference.run(q, k, v, p, scale=scale)
    torch.testing.assert_close(out, rout, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(lse, rlse, atol=ATOL, rtol=RTOL)


def test_query_tiles_launch_longest_key_list_first():
    layout = vs.VideoLayout(3, 3, 5, text_len=9, text_position="after")
    p = vs.plan(make("radial"), layout, num_heads=2, block_size=16)
    lists = split_lists(p.kv_counts, p.kv_indices, p.mask_ids)
    order = tk.longest_first(lists)
    total = lists.n_total.long().sum(dim=(0, 1))
    assert sorted(order.tolist()) == list(range(p.num_blocks))
    assert (total[order.long()].diff() <= 0).all()
    assert int(order[0]) == int(torch.argmax(total))


def test_first_backward_of_a_static_plan_reads_nothing_on_the_host(monkeypatch):
    """After the first forward of a fresh static plan, its first backward (which builds the
    transposed plan for dK/dV) makes no host read: the transposed width needs no .item()."""
    layout = vs.VideoLayout(3, 3, 5, text_len=9, text_position="after")
    pattern = vs.make_pattern("radial", decay_factor=0.4, block_size=16, sink=True)
    q, k, v = random_qkv(layout, batch=1, heads=2, dim=16, requires_grad=True)
    CACHE.clear()
    vs.clear_plan_cache()
    out = vs.attention(q, k, v, layout, pattern, backend="triton", block_size=16)
    reads = []
    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "nonzero"):
        original = getattr(torch.Tensor, name)

        def spy(self, *args, _name=name, _original=original, **kwargs):
            reads.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, spy)
    out.sum().backward()
    monkeypatch.undo()
    assert reads == []
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in (q, k, v))


def test_flex_block_mask_is_built_once_per_plan(monkeypatch):
    from vidsparse.kernels import flex

    layout = vs.VideoLayout(3, 3, 5, text_len=9, text_position="after")
    p = vs.plan(make("radial"), layout, num_heads=2, block_size=16)
    q, k, v = (torch.randn(2, 2, p.padded_len, 16) for _ in range(3))
    flex.BLOCK_MASKS.clear()
    built = []
    original = flex.block_mask_from_plan
    monkeypatch.setattr(flex, "block_mask_from_plan", lambda *a, **kw: built.append(1) or original(*a, **kw))
    for _ in range(2):
        tm = random_text_mask(layout, 2)  # a new run-time text mask each call: copied, not rebuilt
        key_valid = p.key_valid(tm, 2)
        out, lse = flex.run(q, k, v, p, key_valid=key_valid)
        rout, rlse = reference.run(q, k, v, p, key_valid=key_valid)
        torch.testing.assert_close(out, rout, atol=1e-5, rtol=1e-5)
    flex.run(q, k, v, p)  # no key validity: its own entry
    assert len(built) == 2 and len(flex.BLOCK_MASKS) == 2


def test_kernel_order_helpers_round_trip_and_match_caller_order():
    """Permute once (to_kernel_order), attend in kernel order (the TMA path), permute back:
    the same output as the fused-gather caller-order path."""
    layout = vs.VideoLayout(3, 3, 5, text_len=9, text_position="after")
    p = vs.plan(make("radial"), layout, num_heads=2, block_size=16)
    assert not p.order.identity
    q, k, v = random_qkv(layout, batch=2, heads=2, dim=16)
    tm = random_text_mask(layout, 2)
    kq, kk, kv = (tb.to_kernel_order(t, p) for t in (q, k, v))
    assert kq.shape == (2, p.padded_len, 2, 16) and kq.is_contiguous()
    torch.testing.assert_close(tb.from_kernel_order(kq, p), q)
    out = tb.from_kernel_order(tb.attention_kernel_order(kq, kk, kv, p, text_mask=tm), p)
    torch.testing.assert_close(out, tb.attention(q, k, v, p, text_mask=tm), atol=ATOL, rtol=RTOL)
    with pytest.raises(ValueError, match="kernel order"):
        tb.attention_kernel_order(q, k, v, p)


def test_kernel_order_backward_reads_tiles_by_tma(monkeypatch):
    """In contiguous kernel order dK/dV loads its Q / dO tiles and dQ its K / V tiles through
    tensor descriptors; the
    gradients equal the pointer path's (VIDSPARSE_TRITON_TMA=0) and the caller-order path's."""
    layout = vs.VideoLayout(3, 3, 5, text_len=9, text_position="after")
    p = vs.plan(make("radial"), layout, num_heads=2, block_size=16)
    q, k, v = random_qkv(layout, batch=2, heads=2, dim=16)
    tm = random_text_mask(layout, 2)
    g = torch.randn(2, p.padded_len, 2, 16) * p.order.token_valid.view(1, -1, 1, 1)  # padding rows: no gradient
    seen = []
    launch = tk._launch

    def spy(kernel, *args, **kwargs):
        if kernel in (tk._bwd_dkdv_kernel, tk._bwd_dq_kernel):
            seen.append(args[5]["USE_TMA"])
        return launch(kernel, *args, **kwargs)

    monkeypatch.setattr(tk, "_launch", spy)
    grads = []
    for tma in ("1", "0"):
        monkeypatch.setenv("VIDSPARSE_TRITON_TMA", tma)
        ins = [tb.to_kernel_order(t, p).requires_grad_(True) for t in (q, k, v)]
        tb.attention_kernel_order(*ins, p, text_mask=tm).backward(g)
        grads.append([tb.from_kernel_order(t.grad, p) for t in ins])
    assert seen == [True, True, False, False]  # dK/dV and dQ, with and without descriptors
    ins = [t.clone().requires_grad_(True) for t in (q, k, v)]
    tb.attention(*ins, p, text_mask=tm).backward(tb.from_kernel_order(g, p))
    for got in grads:
        for name, a, b in zip("qkv", got, (t.grad for t in ins)):
            torch.testing.assert_close(a, b, atol=ATOL, rtol=RTOL, msg=lambda m, n=name: f"d{n}: {m}")


def test_query_select_launches_get_their_own_configs():
    """Per-query selection ships its own (spill-free on sm_90) head-dim-128 configs, first; the
    other paths never get them."""
    fwd_q = tk.candidates(tk._FWD_SPACE, 128, 128, 2, gather=True, qsel=True)
    dq_q = tk.candidates(tk._DQ_SPACE, 128, 128, 2, gather=True, qsel=True)
    assert fwd_q[0] == tk.TileConfig(128, 64, 8, 2) and dq_q[0] == tk.TileConfig(64, 32, 8, 3)
    assert fwd_q == tk.candidates(tk._FWD_SPACE, 128, 128, 2, gather=False, qsel=True)
    for space in (tk._FWD_SPACE, tk._DQ_SPACE):
        untagged = {tk.TileConfig(*cfg[:4]) for cfg in space[128] if len(cfg) == 4 or cfg[4] != "qsel"}
        only_qsel = set(tk.candidates(space, 128, 128, 2, gather=True, qsel=True)) - untagged
        assert only_qsel  # each space has configs of its own for selections...
        for gather in (True, False):  # ...that no other launch gets
            assert not only_qsel & set(tk.candidates(space, 128, 128, 2, gather=gather))
    # dK/dV: the gather path's 64x64 spilled with a selection; selections get 32x64 alone, in both orders.
    for gather in (True, False):
        assert tk.candidates(tk._DKDV_SPACE, 128, 128, 2, gather, True) == [tk.TileConfig(32, 64, 8, 3)]
    assert tk.TileConfig(64, 64, 8, 3) in tk.candidates(tk._DKDV_SPACE, 128, 128, 2, True)
    # A space without "qsel" entries serves selections with its path's own list.
    assert tk.candidates(tk._DKDV_SPACE, 64, 64, 2, True, True) == tk.candidates(tk._DKDV_SPACE, 64, 64, 2, True)
    # Every shipped config is in the autotuner's list.
    every = {
        (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in tk._all_configs(tk._FWD_SPACE)
    }
    assert {(c.block_m, c.block_n, c.num_warps, c.num_stages) for c in fwd_q} <= every


@pytest.mark.slow
@pytest.mark.parametrize(
    "config",
    tk.candidates(tk._FWD_SPACE, 128, 128, 2, gather=False, qsel=True),
    ids=lambda c: f"{c.block_m}x{c.block_n}",
)
def test_query_select_forward_at_every_shipped_tile(config):
    """Each forward tile shipped for VMoBA's query-tile path (128-row tiles, 64-row tiles of a
    128-key block) gives the reference's output and gradients on a 128-block plan with padding
    and text, in caller order and kernel order."""
    lay = vs.VideoLayout(4, 8, 12, text_len=9, text_position="after")
    pattern = vs.make_pattern("vmoba", temporal_chunk=2, spatial_chunk=(4, 6), st_chunk=(2, 4, 6), path="query_tile")
    q, k, v = random_qkv(lay, batch=1, heads=1, dim=16)
    tm = random_text_mask(lay, 1)
    g = torch.randn_like(q)
    plan = vs.plan(pattern, lay, num_heads=1, q=q, k=k, layer=2, block_size=128)
    assert plan.query_select is not None and plan.block_size == 128
    ins = [t.clone().requires_grad_(True) for t in (q, k, v)]
    ref = vs.attention(*ins, lay, pattern, backend="torch", layer=2, text_mask=tm, block_size=128)
    ref.backward(g)
    want = [ref.detach()] + [t.grad for t in ins]
    with tk.force_configs(fwd=tk.TileConfig(config.block_m, config.block_n)):
        ins = [t.clone().requires_grad_(True) for t in (q, k, v)]
        out = tb.attention(*ins, plan, text_mask=tm)
        out.backward(g)
        got = [out.detach()] + [t.grad for t in ins]
        kin = [tb.to_kernel_order(t, plan).requires_grad_(True) for t in (q, k, v)]
        out_k = tb.attention_kernel_order(*kin, plan, text_mask=tm)
        out_k.backward(tb.to_kernel_order(g, plan))
        got_k = [tb.from_kernel_order(t, plan) for t in [out_k.detach()] + [t.grad for t in kin]]
    for name, a, b, c in zip(("out", "dq", "dk", "dv"), want, got, got_k):
        torch.testing.assert_close(b, a, atol=ATOL, rtol=RTOL, msg=lambda m, n=name: f"{n}, caller order: {m}")
        torch.testing.assert_close(c, a, atol=ATOL, rtol=RTOL, msg=lambda m, n=name: f"{n}, kernel order: {m}")


def _with_row_and_column_padding_mask(p):
    """``p`` with the padded last block's diagonal entry under the mask (valid rows x valid
    columns): a block partial only through padding on both sides (code PAD_ROWS_COLS)."""
    last = p.num_blocks - 1
    vb = p.order.token_valid.view(-1, p.block_size)
    row = int(torch.nonzero(p.kv_indices[0, 0, last, : p.kv_counts[0, 0, last]] == last)[0])
    mask = (vb[last][:, None] & vb[last][None, :]).unsqueeze(0)
    mask_ids = p.mask_ids.clone()
    mask_ids[..., last, row] = p.block_masks.shape[0]
    return dataclasses.replace(p, mask_ids=mask_ids, block_masks=torch.cat([p.block_masks, mask]))


def test_padding_only_blocks_take_the_1d_validity_path():
    """Blocks whole but for padding (the last key block of every row of a dense plan, and a
    padded diagonal block) get padding codes and their own loop: out, lse and all gradients
    equal the reference's element masks, padding rows included, in both orders."""
    from vidsparse.kernels.triton_plan import PAD_COLS, PAD_ROWS_COLS, padding_codes

    layout = vs.VideoLayout(3, 3, 5)  # 45 tokens: the last block of 16 holds 13
    p = _with_row_and_column_padding_mask(vs.plan(make("dense"), layout, num_heads=1, block_size=16))
    codes = padding_codes(p.kv_indices, p.mask_ids, p.block_masks, p.order.token_valid, p.block_size)
    assert int((codes == PAD_COLS).sum()) == p.num_blocks - 1 and int((codes == PAD_ROWS_COLS).sum()) == 1
    lists = split_lists(p.kv_counts, p.kv_indices, p.mask_ids, None, codes)
    assert int(lists.n_elem.sum()) == 0 and int(lists.n_masked.sum()) == p.num_blocks
    t = transpose_lists(p.kv_counts, p.kv_indices, codes, p.num_blocks)
    assert int(t.n_elem.sum()) == 0 and int(t.n_masked.sum()) == p.num_blocks
    q, k, v = (torch.randn(2, 1, p.padded_len, 16, requires_grad=True) for _ in range(3))
    g = torch.randn(2, 1, p.padded_len, 16)
    results = []
    for fn in (tb.run, reference.run):
        ins = [t_.detach().clone().requires_grad_(True) for t_ in (q, k, v)]
        out, lse = fn(*ins, p)
        (out * g).sum().backward()
        results.append((out.detach(), lse, [t_.grad for t_ in ins]))
    (o, lse, grads), (ro, rlse, rgrads) = results
    torch.testing.assert_close(o, ro, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(lse, rlse, atol=ATOL, rtol=RTOL)
    for name, a, b in zip("qkv", grads, rgrads):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=RTOL, msg=lambda m, n=name: f"d{n}: {m}")
    # Caller order (fused gather): the same through vs.attention's triton path.
    qc, kc, vc = random_qkv(layout, batch=2, heads=1, dim=16)
    torch.testing.assert_close(tb.attention(qc, kc, vc, p), run_permuted_reference(qc, kc, vc, p), atol=ATOL, rtol=RTOL)


def run_permuted_reference(q, k, v, p):
    from vidsparse.attention import run_permuted

    return run_permuted(reference.run, q, k, v, p, None, None)


def test_query_select_layout_does_not_change_a_bit():
    """VMoBA's group-major selection (what the kernels load per key tile) and a row-major copy of
    it (a plan built elsewhere, re-laid by the backend) give bit-identical out and dq/dk/dv, on
    the caller-order gather path and the kernel-order TMA path; and both equal the reference."""
    lay = vs.VideoLayout(3, 3, 5, text_len=9, text_position="after")
    q, k, v = random_qkv(lay, batch=1, heads=2, dim=16)
    g = torch.randn_like(q)
    tm = random_text_mask(lay, 1)
    plan = vs.plan(make("vmoba"), lay, num_heads=2, q=q, k=k, layer=2, block_size=16)
    assert plan.query_select.stride(2) == 1  # group-major, as built
    row_major = dataclasses.replace(plan, query_select=plan.query_select.contiguous())
    assert row_major.query_select.stride(-1) == 1
    for caller_order in (True, False):
        results = []
        for p in (plan, row_major):
            if caller_order:
                ins = [t.clone().requires_grad_(True) for t in (q, k, v)]
                out = tb.attention(*ins, p, text_mask=tm)
                out.backward(g)
            else:
                ins = [tb.to_kernel_order(t, p).requires_grad_(True) for t in (q, k, v)]
                out = tb.attention_kernel_order(*ins, p, text_mask=tm)
                out.backward(tb.to_kernel_order(g, p))
            results.append([out.detach()] + [t.grad for t in ins])
        for name, a, b in zip(("out", "dq", "dk", "dv"), *results):
            assert torch.equal(a, b), f"{name} differs between layouts (caller order: {caller_order})"
    ref = reference.run(*(tb.to_kernel_order(t, plan).transpose(1, 2) for t in (q, k, v)), plan,
                        key_valid=plan.key_valid(tm, 1))[0]  # fmt: skip
    got = results[0][0].transpose(1, 2)
    valid = plan.order.token_valid
    torch.testing.assert_close(got[:, :, valid], ref[:, :, valid], atol=ATOL, rtol=RTOL)
