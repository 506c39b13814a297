"""Rank side of the ``vidsparse generate --parallel`` tests: whole tiny pipelines through ``generate``
(what the CLI runs) on every rank, the uint8 video of rank 0 against the single-process video."""

from __future__ import annotations

import contextlib
import io
import os
from typing import Any

#: Frames are the pipeline's pixel frames; height = width = ``size`` pixels.
PATTERN = dict(pattern="dual-scope", pattern_options={"local_frames": 1, "global_stride": 2})


def generate_runs(rt, runs: tuple[tuple[str, str, int, int], ...]) -> dict[str, Any]:
    """Per (model, mode, frames, size): ``generate(..., parallel=mode)`` on every rank, and on rank 0
    the single-process ``generate`` of the same options; the largest uint8 difference, the shape
    and what rank 0 printed (the Ulysses choice, the bytes line)."""
    from vidsparse.generation import GenerateOptions, generate

    out: dict[str, Any] = {}
    real = os.sys.stdout
    for model, mode, frames, size in runs:
        opts = dict(model=model, **PATTERN, frames=frames, height=size, width=size, steps=2, dense_first_steps=0,
                    backend="torch", out=None, progress=False)  # fmt: skip
        stdout = io.StringIO()
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(io.StringIO()):
            got = generate(GenerateOptions(**opts, parallel=mode))
        os.sys.stdout = real  # generate_parallel silences the other ranks' stdout
        row: dict[str, Any] = {"stdout": stdout.getvalue()[-2000:], "shape": tuple(got.frames.shape)}
        if rt.rank == 0:
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                single = generate(GenerateOptions(**opts))
            a, b = got.frames.astype(int), single.frames.astype(int)
            row["max_diff"] = int(abs(a - b).max()) if a.shape == b.shape else -1
            row["single_shape"] = tuple(single.frames.shape)
        out[f"{model} {mode}"] = row
    return out


def generate_suite(runs: tuple[tuple[str, str, int, int], ...]) -> dict[str, Any]:
    import torch

    from vidsparse.parallel import init_distributed

    torch.set_num_threads(1)
    return generate_runs(init_distributed(timeout_s=120), runs)
