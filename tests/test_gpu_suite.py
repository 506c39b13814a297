"""The budgeted GPU suite's dry run (CPU, Triton interpreter): stages, pass fields, budget skips,
atomic JSON, the Markdown renderer and its target verdicts."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported anywhere below

import json  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

pytest.importorskip("triton")
from vidsparse import gpu_suite  # noqa: E402
from vidsparse.kernels import triton_kernels as tk  # noqa: E402

if not tk.INTERPRETED:
    pytest.skip("triton_kernels was imported without TRITON_INTERPRET=1", allow_module_level=True)


def test_dry_run_writes_every_stage_with_pass_fields(tmp_path):
    doc = gpu_suite.run_suite(tmp_path, budget_s=600, dry_run=True, log=lambda m: None)
    on_disk = json.loads((tmp_path / gpu_suite.JSON_NAME).read_text())
    assert on_disk["schema"] == gpu_suite.SCHEMA and on_disk["dry_run"] is True
    names = [s["name"] for s in on_disk["stages"]]
    assert names == [s.name for s in gpu_suite.STAGES]
    by = {s["name"]: s for s in on_disk["stages"]}
    for name in ("environment", "correctness", "attention-wan-1.3b", "step-wan-1.3b", "vmoba-wan-1.3b"):
        assert by[name]["status"] == "done", by[name]
        assert by[name]["pass"] is True, by[name]
    assert by["attention-wan-14b"]["status"] == "skipped" and "dry run" in by["attention-wan-14b"]["reason"]
    corr = by["correctness"]["cases"]
    done = [c for c in corr if c.get("status") == "done"]
    assert {c["pattern"] for c in done} >= {"dense", "radial", "tile", "vmoba"}
    assert {c["dtype"] for c in done} == {"float16", "float32"}
    assert all(0 <= c["out_err"] <= c["tol"] for c in done)
    assert all("dq_err" in c for c in done if c["pattern"] in gpu_suite.GRAD_PATTERNS)
    # VMoBA's per-query selection: group-major, checked in caller and kernel order, with gradients.
    vmoba = [c for c in done if c["pattern"] == "vmoba"]
    assert vmoba and all(c["query_select_layout"] == "group-major" for c in vmoba)
    assert all(
        0 <= c[f"kernel_order_{n}_err"] <= c["tol"] * gpu_suite.GRAD_SLACK for c in vmoba for n in ("dq", "dk", "dv")
    )
    assert all(0 <= c["kernel_order_out_err"] <= c["tol"] for c in vmoba)
    # ... and on the key-block-major path, every partition (TMA from the caller's K/V or the copy).
    for c in vmoba:
        for layer in gpu_suite.KEY_BLOCK_LAYERS:
            assert 0 <= c[f"keyblock_l{layer}_out_err"] <= c["tol"]
            assert all(0 <= c[f"keyblock_l{layer}_{n}_err"] <= c["grad_tol"] for n in ("dq", "dk", "dv"))
    att = by["attention-wan-1.3b"]["cases"]
    timed = {(c["plan"], c["backend"], c["direction"]) for c in att if c.get("ms")}
    assert {("dense", "sdpa", "fwd"), ("dense", "triton", "fwd+bwd"), ("radial", "flex", "fwd")} <= timed
    flex = next(c for c in att if c["backend"] == "flex" and c["plan"] == "radial" and c.get("ms"))
    assert flex["err_vs_triton"] < 1e-2  # the identical plan
    kb = by["vmoba-wan-1.3b"]["cases"]
    got = {(c["partition"], c["source"], c["direction"]) for c in kb if c.get("ms")}
    assert got == {(p, s, d) for _, p in gpu_suite.VMOBA_PARTITIONS for s, _ in gpu_suite.VMOBA_SOURCES
                   for d in ("fwd", "fwd+bwd")}  # fmt: skip
    gathered = [c for c in kb if c["source"] == "gather"]
    assert all(c["tma_speedup"] > 0 for c in gathered)
    assert all(c["err_vs_tma"] < 1e-2 for c in gathered if c["direction"] == "fwd")
    step = by["step-wan-1.3b"]["cases"]
    assert step[0]["pattern"] == "dense" and step[1]["pattern"] == "radial" and step[1]["finite"]
    assert doc["stages"][-1]["name"] == names[-1]
    md = gpu_suite.write_markdown(tmp_path / gpu_suite.JSON_NAME).read_text()
    assert "DRY RUN" in md and "## correctness" in md and "| radial | triton | fwd |" in md
    assert "| spatial | gather | fwd+bwd |" in md and "VMoBA spatial fwd: descriptors" in md
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_stage_that_does_not_fit_is_skipped_with_reason(tmp_path):
    doc = gpu_suite.run_suite(tmp_path, budget_s=3, dry_run=True, stages=["environment", "correctness"],
                              log=lambda m: None)  # fmt: skip
    by = {s["name"]: s for s in doc["stages"]}
    assert by["environment"]["status"] == "done"
    assert by["correctness"]["status"] == "skipped" and by["correctness"]["pass"] is None
    assert "estimated" in by["correctness"]["reason"] and "left" in by["correctness"]["reason"]


def test_bad_arguments_are_refused_before_work(tmp_path):
    with pytest.raises(ValueError, match="Unknown stage"):
        gpu_suite.run_suite(tmp_path, 10, dry_run=True, stages=["bogus"])
    with pytest.raises(ValueError, match="budget"):
        gpu_suite.run_suite(tmp_path, 0, dry_run=True)
    assert not list(tmp_path.iterdir())
    (tmp_path / "a-file").write_text("")
    with pytest.raises(ValueError, match=r"--out-dir .*a-file' is a file, not a directory"):
        gpu_suite.run_suite(tmp_path / "a-file" / "suite", 10, dry_run=True)
    assert gpu_suite.main(["--render", str(tmp_path / "none.json")]) == 2


def test_targets_met_and_missed_are_rendered():
    doc = {"created": "t", "budget_s": 480, "elapsed_s": 100, "dry_run": False, "stages": [
        {"name": "environment", "status": "done", "pass": True, "info": {"device": "H200", "git_commit": "abc"}},
        {"name": "attention-wan-1.3b", "status": "done", "pass": True, "info": {"shape": "wan-1.3b"}, "cases": [
            {"plan": "dense", "backend": "triton", "direction": "fwd", "density": 1.0, "ms": 10, "speedup_vs_sdpa": 0.9},
            {"plan": "radial", "backend": "triton", "direction": "fwd", "density": 0.2, "ms": 3, "speedup_vs_sdpa": 3.0},
            {"plan": "radial", "backend": "flex", "direction": "fwd", "density": 0.2, "ms": 4, "triton_speedup": 1.33},
            # a padded plan: the target divides by the work computed, not the padded grid's block density
            {"plan": "tile", "backend": "triton", "direction": "fwd", "density": 0.24, "work": 0.35, "ms": 4,
             "speedup_vs_sdpa": 2.5},
        ]},
        {"name": "step-wan-1.3b", "status": "done", "pass": True, "cases": [
            {"pattern": "dense", "forward_ms": 100}, {"pattern": "radial", "forward_ms": 80, "speedup": 1.25}]},
    ]}  # fmt: skip
    md = gpu_suite.render_markdown(doc)
    assert "dense >= 0.8x SDPA | 0.90x | met" in md
    assert "radial [triton] (work 0.20, block density 0.20) >= 4.25x SDPA | 3.00x | missed by 29 %" in md
    assert "tile [triton] (work 0.35, block density 0.24) >= 2.43x SDPA | 2.50x | met" in md
    assert ">= 1.3x compiled Flex | 1.33x | met" in md
    assert "step radial >= 1.4x dense | 1.25x" in md and "missed by 11 %" in md


def test_bench_suite_flag_runs_the_same_code(tmp_path, monkeypatch):
    from vidsparse import bench

    seen = {}

    def fake(out_dir, budget_s, dry_run=False, stages=None, autotune=False, seed=0, log=print):
        seen.update(out_dir=out_dir, budget_s=budget_s, dry_run=dry_run, stages=stages)
        rec = gpu_suite.Record(out_dir / gpu_suite.JSON_NAME, {"schema": gpu_suite.SCHEMA, "created": "t",
                               "budget_s": budget_s, "dry_run": dry_run})  # fmt: skip
        return rec.doc

    monkeypatch.setattr(gpu_suite, "run_suite", fake)
    assert bench.main(["--suite", "--dry-run", "--budget-s", "30", "--out-dir", str(tmp_path),
                       "--stages", "environment"]) == 0  # fmt: skip
    assert seen == {"out_dir": tmp_path, "budget_s": 30.0, "dry_run": True, "stages": ["environment"]}
    assert (tmp_path / gpu_suite.MD_NAME).exists()


def test_a_stage_stops_at_its_cap_and_keeps_its_cases(tmp_path, monkeypatch):
    """A stage that overruns 1.5x its estimate ends 'partial' with the cases it finished, and the
    next stage still runs."""
    stages = tuple(
        gpu_suite.Stage(s.name, s.run, (lambda ctx: 1.5) if s.name == "correctness" else s.estimate, s.about)
        for s in gpu_suite.STAGES
    )
    monkeypatch.setattr(gpu_suite, "STAGES", stages)
    doc = gpu_suite.run_suite(tmp_path, budget_s=600, dry_run=True, stages=["correctness", "environment"],
                              log=lambda m: None)  # fmt: skip
    by = {s["name"]: s for s in doc["stages"]}
    assert by["correctness"]["status"] == "partial" and "stage cap" in by["correctness"]["reason"]
    assert by["correctness"]["cap_s"] == pytest.approx(2.25, abs=0.06)
    assert by["environment"]["status"] == "done"


def test_device_run_script_imports_the_checkout_and_writes_under_out(tmp_path):
    """benchmarks/device_run.sh, the one command the device runs, runs the suite end to end
    from the checkout without a caller's PYTHONPATH and writes under $OUT. (Here vidsparse is
    also pip-installed, so this does not prove that the script's own PYTHONPATH is what finds
    it, as the device needs.)"""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(OUT=str(tmp_path), PYTHON=sys.executable, TRITON_INTERPRET="1")
    run = subprocess.run(
        ["bash", str(root / "benchmarks" / "device_run.sh"), "--dry-run", "--stages", "environment"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    doc = json.loads((tmp_path / "suite" / gpu_suite.JSON_NAME).read_text())
    env_stage = next(s for s in doc["stages"] if s["name"] == "environment")
    assert env_stage["status"] == "done" and env_stage["info"]["git_commit"] != "unknown"
    assert (tmp_path / "suite" / "log.txt").read_text().strip()


def test_readme_tables_come_from_the_suite_json(tmp_path, capsys):
    """--render JSON --readme README replaces only the marked block, with the fastest Triton path
    per plan against SDPA and Flex, and the step; a README without the markers is refused first."""
    doc = {"created": "2026-12-04T00:00:00", "budget_s": 480, "elapsed_s": 400, "dry_run": False, "stages": [
        {"name": "environment", "status": "done", "pass": True,
         "info": {"device": "NVIDIA H200", "torch": "2.11.0", "triton": "3.6.0", "git_commit": "0123456789abcdef"}},
        {"name": "attention-wan-1.3b", "status": "done", "pass": True, "info": {"shape": "wan-1.3b"}, "cases": [
            {"plan": "dense", "backend": "sdpa", "direction": "fwd", "ms": 10.0},
            {"plan": "tile", "backend": "triton", "direction": "fwd", "density": 0.24, "work": 0.35, "ms": 5.0,
             "speedup_vs_sdpa": 2.0},
            {"plan": "tile", "backend": "triton-kernel-order", "direction": "fwd", "density": 0.24, "work": 0.35,
             "ms": 4.0, "speedup_vs_sdpa": 2.5},
            {"plan": "tile", "backend": "flex", "direction": "fwd", "ms": 6.0, "triton_speedup": 1.2},
        ]},
        {"name": "step-wan-1.3b", "status": "done", "pass": True, "cases": [
            {"pattern": "dense", "step_ms": 2000.0}, {"pattern": "radial", "step_ms": 1000.0, "speedup": 2.0,
                                                     "work": 0.4, "rel_err_vs_dense": 0.01}]},
    ]}  # fmt: skip
    results = tmp_path / "benchmarks" / "results"
    results.mkdir(parents=True)
    (results / "gpu_suite.json").write_text(json.dumps(doc))
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\nbefore\n{gpu_suite.README_BEGIN}\nold text\n{gpu_suite.README_END}\n\nafter\n")
    assert gpu_suite.main(["--render", str(results / "gpu_suite.json"), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert text.startswith("# x\n\nbefore\n") and text.endswith(f"{gpu_suite.README_END}\n\nafter\n")
    assert "old text" not in text and "NVIDIA H200" in text and "`benchmarks/results/gpu_suite.json`" in text
    assert "| wan-1.3b | tile | fwd | 0.350 | 4.000 | 10.000 | 2.50x | 1.50x |" in text  # kernel order, the faster
    assert "| radial | 0.400 | 1000.0 | 2.00x | 1.0e-02 |" in text and "| dense | 1.000 | 2000.0 | 1.00x | - |" in text
    # a README without the block: refused before gpu_suite.md is written
    (results / "gpu_suite.md").unlink()
    plain = tmp_path / "PLAIN.md"
    plain.write_text("# y\n")
    assert gpu_suite.main(["--render", str(results / "gpu_suite.json"), "--readme", str(plain)]) == 2
    assert "gpu_suite:begin" in capsys.readouterr().err and not (results / "gpu_suite.md").exists()
    assert plain.read_text() == "# y\n"
    assert gpu_suite.main(["--dry-run", "--readme", str(readme)]) == 2  # only with --render


def test_the_readme_has_the_generated_block():
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert text.count(gpu_suite.README_BEGIN) == 1 and text.index(gpu_suite.README_BEGIN) < text.index(
        gpu_suite.README_END
    )
