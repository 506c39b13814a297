"""The scripts in benchmarks/ refuse an output folder they cannot write before measuring anything."""

from __future__ import annotations

import pytest
from bench_scripts import load_script


@pytest.mark.parametrize(
    "name, flag",
    [("densities", "--out-dir"), ("vmoba", "--out-dir"), ("freeswim", "--out-dir"), ("transformer", "--out-dir"),
     ("parallel", "--out-dir"), ("tiny_quality", "--out")],
)  # fmt: skip
def test_unwritable_output_is_refused_before_any_work(name, flag, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    target = blocker / "results" if flag == "--out-dir" else blocker / "report"
    extra = ["--quick"] if name in ("vmoba", "transformer", "parallel", "tiny_quality") else []
    with pytest.raises(SystemExit) as exc:
        load_script(name).main([*extra, flag, str(target)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"Cannot write {flag}" in err and "is a file, not a directory" in err, err
    assert blocker.read_text() == "" and list(tmp_path.iterdir()) == [blocker]
