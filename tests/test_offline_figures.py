"""The committed offline sm_90 figures (benchmarks/results/offline_sm90*.json) describe the
configs the kernels ship: every head-dim-128 config of every path has its row, no row is for a
config that is no longer shipped, and none spills. A change to a config list that was not
compiled by benchmarks/offline_compile.py fails here."""

import json
from pathlib import Path

import pytest

tk = pytest.importorskip("vidsparse.kernels.triton_kernels")

RESULTS = Path(__file__).resolve().parent.parent / "benchmarks" / "results"
SPACES = {"fwd": tk._FWD_SPACE, "dkdv": tk._DKDV_SPACE, "dq": tk._DQ_SPACE}


def _key(cfg) -> str:
    return f"{cfg.block_m}x{cfg.block_n}/w{cfg.num_warps}/s{cfg.num_stages}"


@pytest.mark.parametrize("name", ["offline_sm90.json", "offline_sm90_triton36.json"])
def test_offline_figures_cover_the_shipped_configs_without_spills(name):
    rep = json.loads((RESULTS / name).read_text())
    assert rep["head_dim"] == 128 and rep["plan_block"] == 128 and rep["launch_hints"]
    rows = rep["results"]
    errors = [(r["kernel"], r["variant"], r["config"]) for r in rows if "error" in r]
    assert not errors, f"rows that did not compile: {errors}"
    spills = [(r["kernel"], r["variant"], r["config"], r["spill_store_bytes"]) for r in rows if r["spill_store_bytes"]]
    assert not spills, f"configs that spill: {spills}"
    seen: dict[tuple[str, str], list[str]] = {}
    for r in rows:
        if r["kernel"] in SPACES:
            seen.setdefault((r["kernel"], r["variant"]), []).append(r["config"])
    assert {v for _, v in seen} >= {"kernel-order", "gather", "gather+query-select", "kernel-order+query-select"}
    for (kernel, variant), configs in seen.items():
        gather, qsel = variant.startswith("gather"), "query-select" in variant
        shipped = [_key(c) for c in tk.candidates(SPACES[kernel], 128, 128, 2, gather, qsel)]
        if "key-valid" in variant:  # the harness builds run-time key validity at the default only
            shipped = shipped[:1]
        assert configs == shipped, f"{name}: {kernel} {variant} has rows {configs}, the kernels ship {shipped}"
    baseline = {r["config"] for r in rows if r["kernel"].startswith("tutorial")}
    assert {_key(c) for c in tk.candidates(tk._FWD_SPACE, 128, 128, 2)} <= baseline
    forward = [r for r in rows if r["kernel"] == "fwd" and r["variant"].startswith("kernel-order")]
    assert forward and all(r["wgmma"] and r["tma"] for r in forward)
    assert {r["kernel"] for r in rows} >= {"kb-fwd", "kb-dq", "kb-dkdv"}
