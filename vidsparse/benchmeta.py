"""Provenance for benchmark reports: git commit, package versions, device name, JSON-safe values;
and the check of where a report goes, made before the measurements.

One copy for the attention benchmark (:mod:`vidsparse.bench`) and the scripts in ``benchmarks/``,
so every report records its provenance the same way (schema: benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import math
import platform
import subprocess
from pathlib import Path
from typing import Any

import torch


def git_commit() -> tuple[str, bool | None]:
    """(HEAD commit, whether tracked files differ from it) of the checkout holding vidsparse.

    ``("unknown", None)`` when git or the repository is missing (e.g. an installed wheel).
    """
    here = Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return "unknown", None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10)  # fmt: skip
        return head.stdout.strip(), bool(dirty.stdout.strip())
    except (OSError, subprocess.SubprocessError):
        return "unknown", None


def package_version(module: str) -> str | None:
    """``module.__version__``, or None when the module is absent or fails to import."""
    try:
        return __import__(module).__version__
    except Exception:
        return None


def device_name(device: torch.device) -> str:
    """The CUDA device's name, or ``CPU <processor>``."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()}".strip()


def json_safe(x: Any) -> Any:
    """JSON-safe copy: NaN/inf -> None, tuples -> lists, recursively through dicts and lists."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    return x


def checked_out_dir(parser: argparse.ArgumentParser, path: str | Path, flag: str = "--out-dir") -> Path:
    """``path`` as a Path once files can be created there; otherwise ``parser.error`` (exit 2)
    before any measurement, instead of a traceback when the report is written at the end."""
    from vidsparse.video_io import check_writable_dir

    try:
        check_writable_dir(path, f"{flag} {str(path)!r}")
    except ValueError as exc:
        parser.error(str(exc))
    return Path(path)


__all__ = ["checked_out_dir", "device_name", "git_commit", "json_safe", "package_version"]
