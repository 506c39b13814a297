"""The offline example runs as documented."""

import runpy
from pathlib import Path


def test_quickstart_tiny_example(capsys):
    runpy.run_path(str(Path(__file__).parents[1] / "examples" / "quickstart_tiny.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "after remove(), identical to dense: True" in out
    diff = float(out.split("max abs difference:")[1].split()[0])
    assert diff > 1e-3  # the sparse pattern really changed the output
