"""benchmarks/tiny_quality.py --quick end to end: every stage runs (the train-lora subprocess included)
and the JSON and Markdown it writes carry each section's numbers."""

from __future__ import annotations

import json

import pytest
from bench_scripts import load_script


@pytest.mark.slow
def test_quick_report_writes_every_section(tmp_path):
    bench = load_script("tiny_quality")
    out = tmp_path / "q"
    assert bench.main(["--quick", "--out", str(out), "--strip", "", "--length-strip", ""]) == 0
    doc = json.loads(out.with_suffix(".json").read_text())
    assert doc["meta"]["quick"] is True
    summary = doc["a_prompt_check"]["summary"]
    assert {"dense_trained", "dense_held_out", "radial_trained", "radial_held_out"} <= set(summary)
    assert all(0.0 <= summary[k]["colour"] <= 1.0 for k in ("dense_trained", "radial_trained"))
    assert set(doc["b_patterns_vs_dense"]) == set(bench.PATTERNS_AT_DEFAULTS)
    assert len(doc["b_patterns_at_grid"]) == len(bench.PATTERNS_AT_GRID)
    c = doc["c_length_extension"]
    assert c["frames"] == 2 * (doc["defaults"]["frames"] - 1) + 1
    assert "--pattern radial" in c["lora"]["command"] and "position_embedding.proj" in c["lora"]["command"]
    for tag in ("without_lora", "with_lora"):
        assert c[tag]["summary"]["radial_vs_dense"]["n"] > 0
    md = out.with_suffix(".md").read_text()
    assert "## (c) Length extension" in md and "| with lora | radial |" in md
