"""Provenance for benchmark reports: git commit, package versions, device name, JSON-safe values.

One copy for the attention benchmark (:mod:`vidsparse.bench`) and the scripts in ``benchmarks/``,
so every report records its provenance the same way (schema: benchmarks/README.md).
"""

from __future__ import annotations

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


__all__ = ["device_name", "git_commit", "json_safe", "package_version"]
