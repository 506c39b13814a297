"""The work column of `vidsparse inspect` and of the generate summary: pairs the executed kernel path
computes (padding included) / dense, counted here by brute force; the >= 95 % warning; and
`inspect --out` / `--json` to an unwritable path (one line, exit 2, before any work)."""

import json
import math
from dataclasses import replace

import pytest
import torch

import vidsparse as vs
from vidsparse.cli import main
from vidsparse.generation import GenerateOptions, LayerGroupDensity, format_summary, generate
from vidsparse.generation.result import work_warnings

# A VMoBA small enough for the interpreter whose per-query selection is sparse: 768 tokens,
# 16-token kernel blocks; its query-tile union still covers 90-96 % of the blocks.
VMOBA = ["--pattern", "vmoba", "--temporal-chunk", "1", "--spatial-chunk", "4,4", "--st-chunk", "2,4,4"]
GRID, BLOCK, HEADS = (6, 8, 16), 16, 2


def _inspect(tmp_path, argv, name):
    js = tmp_path / f"{name}.json"
    assert main(["inspect", *argv, "--no-plot", "--json", str(js)]) == 0
    return json.loads(js.read_text())


def _vmoba_plans():
    """The plans inspect builds: its random q/k (seed 0, 2 heads, head dim 64), layers 0-2."""
    layout = vs.VideoLayout(*GRID)
    gen = torch.Generator().manual_seed(0)
    shape = (1, layout.seq_len, HEADS, 64)
    q, k = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    pattern = vs.VMoBA(temporal_chunk=1, spatial_chunk=(4, 4), st_chunk=(2, 4, 4))
    return layout, [vs.plan(pattern, layout, num_heads=HEADS, layer=i, q=q, k=k, block_size=BLOCK) for i in range(3)]


def _key_block_pairs(plan, block_m, block_n) -> float:
    """Brute force: per (batch, head, group), the valid rows that chose it, padded to block_m, times
    the group's keys padded to block_n; averaged over batch and heads."""
    sel = plan.query_select
    valid = plan.order.token_valid.tolist()
    spans = plan.group_spans.tolist()
    total = 0
    for b in range(sel.shape[0]):
        for h in range(sel.shape[1]):
            for g, (_, keys) in enumerate(spans):
                rows = sum(1 for r in range(sel.shape[2]) if valid[r] and bool(sel[b, h, r, g]))
                total += math.ceil(rows / block_m) * block_m * math.ceil(keys / block_n) * block_n
    return total / (sel.shape[0] * sel.shape[1])


def _query_tile_pairs(plan) -> float:
    """Brute force: per query block, every key block of a group any of its rows chose, whole."""
    sel, bs, groups = plan.query_select, plan.block_size, plan.key_group.tolist()
    valid = plan.order.token_valid.tolist()
    total = 0
    for b in range(sel.shape[0]):
        for h in range(sel.shape[1]):
            for qb in range(plan.num_blocks):
                rows = [r for r in range(qb * bs, (qb + 1) * bs) if valid[r]]
                chosen = {g for g in range(sel.shape[-1]) if any(bool(sel[b, h, r, g]) for r in rows)}
                total += sum(bs * bs for g in groups if g in chosen)
    return total / (sel.shape[0] * sel.shape[1])


def test_vmoba_per_query_work_is_the_key_block_count_and_below_the_query_tile_path(tmp_path, capsys):
    argv = [*VMOBA, "--grid", "x".join(map(str, GRID)), "--block-size", str(BLOCK)]
    key_block = _inspect(tmp_path, argv, "kb")  # auto backend: torch on CPU, the key-block path
    query_tile = _inspect(tmp_path, [*argv, "--backend", "flex"], "qt")  # flex: query-tile only
    out = capsys.readouterr().out
    assert "work = (query, key) pairs the key-block path" in out and "query-tile path computes" in out
    layout, plans = _vmoba_plans()
    dense = layout.seq_len**2
    for kb, qt, plan in zip(key_block["layers"], query_tile["layers"], plans):
        assert kb["path"] == "key_block" and qt["path"] == "query_tile"
        assert kb["work"] * dense == pytest.approx(_key_block_pairs(plan, BLOCK, BLOCK))
        assert qt["work"] * dense == pytest.approx(_query_tile_pairs(plan))
        assert kb["token_density"] <= kb["work"] < qt["work"]
        assert kb["work"] < 0.5 and qt["work"] > 0.85  # the selection is sparse; the tiles' union is not


def test_static_pattern_work_is_its_block_density_with_padding(tmp_path):
    report = _inspect(tmp_path, ["--pattern", "tile", "--grid", "6x10x12", "--block-size", "32"], "tile")
    (row,) = report["layers"]
    layout = vs.VideoLayout(6, 10, 12)
    nb, bs = report["num_blocks"], report["block_size"]
    assert row["path"] == "query_tile"
    assert row["work"] == pytest.approx(row["block_density"] * (nb * bs) ** 2 / layout.seq_len**2)
    plan = vs.plan(vs.Tile(), layout, block_size=32)
    assert row["work"] == pytest.approx(float(plan.kv_counts.sum()) * 32 * 32 / layout.seq_len**2)


def test_work_warning_at_95_percent_of_dense():
    def group(work, pattern="VMoBA()", path="query_tile"):
        return LayerGroupDensity((0, 1), pattern, 1.0, 0.2, work, path)

    # Groups that ran the model's attention (dense layers, plans that keep every pair) warn of nothing.
    full = replace(group(1.0, "Tile()", "dense"), keeps_every_pair=True)
    (line,) = work_warnings([group(0.96), group(0.5), group(1.0, "dense", "dense"), full])
    assert "layers 0-1" in line and "query-tile path computes 96% of dense" in line and "no attention speedup" in line
    assert work_warnings([group(0.94), group(None)]) == []


def test_inspect_warns_once_per_run_of_identical_layers(tmp_path, capsys):
    # a static pattern on a grid far smaller than a block: every layer computes the same, far above dense
    assert main(["inspect", "--pattern", "radial", "--grid", "4x4x4", "--layers", "5", "--no-plot"]) == 0
    warnings = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning")]
    assert len(warnings) == 1 and "layers 0-4: the query-tile path computes" in warnings[0], warnings
    assert "no attention speedup over dense on this grid" in warnings[0]


def test_generate_summary_reports_the_work_of_the_path_it_ran():
    result = generate(GenerateOptions(model="tiny-random", frames=9, height=32, width=48, steps=2, dense_first_steps=0,
                                      dense_layers=(1,), progress=False))  # fmt: skip
    sparse, dense = result.densities
    assert sparse.path == "query_tile" and dense.path == "dense" and dense.work == 1.0
    # 18 tokens (3x2x3) in 16-token blocks: 2 blocks, 32 padded tokens; the count includes the padding.
    plan = vs.plan(vs.Radial(decay_factor=0.2, sink=True), vs.VideoLayout(3, 2, 3), block_size=16)
    assert sparse.work == pytest.approx(float(plan.kv_counts.sum()) * 256 / 18**2)
    assert result.computed_work == pytest.approx((sparse.work + 1.0) / 2)
    text = format_summary(result)
    assert f"work {sparse.work:6.1%}" in text
    assert ("warning    layer 0:" in text) == (sparse.work >= 0.95)
    payload = result.to_json()
    assert payload["densities"][0]["work"] == sparse.work and payload["computed_work"] == result.computed_work


@pytest.mark.parametrize("flag", ["--out", "--json"])
@pytest.mark.parametrize("where", ["under-a-file", "proc"])
def test_inspect_unwritable_output_is_one_line_before_any_work(flag, where, tmp_path, monkeypatch, capsys):
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    path = str(blocker / "sub" / "plan.png") if where == "under-a-file" else "/proc/vidsparse-test/plan.png"

    def no_planning(*args, **kwargs):
        raise AssertionError("nothing may be planned for an unwritable output")

    monkeypatch.setattr(vs, "plan", no_planning)
    assert main(["inspect", "--pattern", "radial", "--grid", "21x30x52", flag, path]) == 2
    err = capsys.readouterr().err
    assert flag in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
