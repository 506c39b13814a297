"""``vidsparse bench`` on CPU (issue 18, item 9): failures give a non-zero exit, small rates keep
their digits, timing warms up, the default output is outside the checkout, CPU ratios carry a
caveat, and FlexAttention's missing CPU backward is "not run", not a failure."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported anywhere below

import json  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

pytest.importorskip("triton")
from vidsparse import bench  # noqa: E402
from vidsparse.kernels import triton_kernels as tk  # noqa: E402

if not tk.INTERPRETED:
    pytest.skip("triton_kernels was imported without TRITON_INTERPRET=1", allow_module_level=True)

ARGV = ["--device", "cpu", "--quick", "--patterns", "none", "--densities", "50", "--directions", "fwd,fwd+bwd"]


def _rows(tmp_path):
    path = next(p for p in tmp_path.iterdir() if p.suffix == ".json")
    return json.loads(path.read_text()), path.with_suffix(".md").read_text()


def test_cpu_quick_with_flex_exits_zero_and_marks_flex_backward_not_run(tmp_path, capsys):
    assert bench.main([*ARGV, "--backends", "flex", "--out-dir", str(tmp_path)]) == 0
    rep, md = _rows(tmp_path)
    fb = next(r for r in rep["results"] if r["backend"] == "flex" and r["direction"] == "fwd+bwd")
    assert fb["ms"] is None and fb["error"] is None and "no CPU backward" in fb["note"]
    assert rep["warmup"] >= 1
    out = capsys.readouterr().out
    assert "say nothing about GPU speed" in out and "say nothing about GPU speed" in md
    assert " 0.0 TFLOP/s" not in out and "FLOP/s" in out


def test_a_failed_measurement_gives_exit_1(tmp_path, monkeypatch, capsys):
    def broken(*args, **kwargs):
        raise RuntimeError("kernel exploded")

    monkeypatch.setattr(bench, "bench_triton", broken)
    assert bench.main([*ARGV, "--backends", "triton", "--directions", "fwd", "--out-dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "1 measurement(s) failed" in err and "kernel exploded" in err


def test_out_dir_that_is_a_file_is_refused_before_measuring(tmp_path, monkeypatch, capsys):
    def measured(*args, **kwargs):
        raise AssertionError("nothing may be measured for an --out-dir that cannot be written")

    monkeypatch.setattr(bench, "run_benchmarks", measured)
    (tmp_path / "f").write_text("")
    assert bench.main([*ARGV, "--out-dir", str(tmp_path / "f")]) == 2
    assert "is a file, not a directory" in capsys.readouterr().err


def test_format_rate_keeps_small_rates_readable():
    assert bench.format_rate(250.0).strip() == "250.0 TFLOP/s"
    assert bench.format_rate(0.0004).strip() == "0.4 GFLOP/s"
    assert bench.format_rate(2e-7).strip() == "0.2 MFLOP/s"


def test_default_out_dir_is_outside_the_checkout(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    import argparse

    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    s = bench.settings_from_args(parser.parse_args(["--device", "cpu", "--quick"]))
    checkout = Path(bench.__file__).resolve().parents[1]
    assert s.out_dir == tmp_path / "cache" / "vidsparse" / "bench"
    assert checkout not in s.out_dir.resolve().parents and s.warmup == 1
