"""A parallel transformer forward checked against the single-process forward of the same pattern.

The one home of what the multi-process tests and ``benchmarks/parallel.py`` measure per family:
on every rank, ``check_forward`` runs the model under ``vidsparse.apply`` (the oracle: one process,
same pattern), then ``parallelize``d on the runtime, then after ``unparallelize``, and reports the
largest difference of every output tensor (LTX-2: video and audio), the bytes this rank sent, and
the estimator's bytes (``forward_estimate``: ``estimate.forward_bytes`` with the model's sizes read
off the model and its family record). Every rank must call it with the same arguments.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from vidsparse.config import SparseConfig
from vidsparse.layout import VideoLayout
from vidsparse.parallel.runtime import ParallelRuntime


@dataclass(frozen=True)
class ForwardCheck:
    """One rank's comparison of a parallel forward with the single-process one."""

    err: float  # max |parallel - single process| over every output tensor
    sparse_vs_dense: float  # max |single-process sparse - dense| (first output): > 0 means the check can fail
    sent: int  # bytes this rank sent during the parallel forward (``CommStats``)
    predicted: int  # ``forward_estimate`` for this rank
    restored: float  # max |forward after ``unparallelize`` - dense forward|: 0.0 = given back exactly
    layout: str  # the whole video's token layout
    timed: Any = None  # what ``timed()`` returned while the model was parallelized (benchmarks)


def _outputs(model: torch.nn.Module, inputs: dict[str, Any]) -> list[torch.Tensor]:
    with torch.no_grad():
        out = model(**inputs, return_dict=False)
    return [t for t in (out if isinstance(out, (tuple, list)) else (out,)) if isinstance(t, torch.Tensor)]


def _max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    if len(a) != len(b) or any(x.shape != y.shape for x, y in zip(a, b)):
        raise RuntimeError(
            f"check_forward: outputs differ in shape: {[tuple(x.shape) for x in a]} vs {[tuple(y.shape) for y in b]}."
        )
    return max((x.double() - y.double()).abs().max().item() for x, y in zip(a, b))


def whole_layout(model: torch.nn.Module, inputs: dict[str, Any]) -> VideoLayout:
    """The whole video's token layout of this forward, as the family reads it."""
    from vidsparse.families import family_of

    family = family_of(model)
    grid = family.grid(model, inputs)
    if not isinstance(grid, tuple):
        raise ValueError(f"check_forward: this {type(model).__name__} call has no token grid ({grid}).")
    text = family.text_len(model, inputs)
    return VideoLayout(*grid, text_len=text, text_position=family.text_position if text else "none")


def _gathered_width(model: torch.nn.Module) -> int:
    """Channels per token of the shard plan's gathered output: an output projection's
    ``out_features``, or a block's output (Kandinsky 5's last visual block): the model width."""
    from vidsparse.families import family_of
    from vidsparse.families.base import resolve_path

    (path,) = family_of(model).require_shard_plan().gather
    module = model.get_submodule(resolve_path(model, path))
    width = getattr(module, "out_features", None) or getattr(model.config, "model_dim", None)
    if width is None:
        raise ValueError(f"check_forward: cannot tell the width of {type(model).__name__}.{path}'s output.")
    return int(width)


def forward_estimate(model: torch.nn.Module, inputs: dict[str, Any], pattern, mode: str, world_size: int) -> list[int]:
    """Per rank, ``estimate.forward_bytes`` of this forward (sizes from the model, its inputs and family)."""
    from vidsparse.families import family_of
    from vidsparse.parallel.estimate import forward_bytes

    family = family_of(model)
    plan = family.require_shard_plan()
    attn = family.attention_paths(model)[0][1]
    heads = getattr(attn, "heads", None) or attn.num_heads  # Kandinsky 5: num_heads
    head_dim = (attn.to_q if hasattr(attn, "to_q") else attn.to_query).out_features // heads
    merged = plan.merged_calls(model, inputs) if plan.merged_calls is not None else ()
    return forward_bytes(
        mode, whole_layout(model, inputs), pattern, heads, head_dim, family.num_layers(model), world_size,
        _gathered_width(model), element_size=model.dtype.itemsize, batch=int(inputs["hidden_states"].shape[0]), merged=merged,
    )  # fmt: skip


def check_forward(
    model: torch.nn.Module,
    inputs: dict[str, Any],
    config: SparseConfig,
    mode: str,
    runtime: ParallelRuntime,
    timed: Callable[[], Any] | None = None,
) -> ForwardCheck:
    """Compare ``model(**inputs)`` parallelized over ``runtime`` with the single-process forward.

    ``config.pattern`` must be a ``Pattern`` instance (the estimator plans it). ``timed`` is called
    once more while the model is parallelized (after the checked forward), e.g. to time it.
    """
    import vidsparse.pipelines as vsp
    from vidsparse.parallel.model import parallelize, unparallelize

    dense = _outputs(model, inputs)
    vsp.apply(model, config)
    try:
        ref = _outputs(model, inputs)
    finally:
        vsp.remove(model)
    parallelize(model, config, mode, runtime)
    try:
        before = runtime.stats.total_bytes
        got = _outputs(model, inputs)
        sent = runtime.stats.total_bytes - before
        extra = timed() if timed is not None else None
    finally:
        unparallelize(model)
    restored = _outputs(model, inputs)
    return ForwardCheck(
        err=_max_diff(got, ref),
        sparse_vs_dense=(ref[0].double() - dense[0].double()).abs().max().item(),
        sent=sent,
        predicted=forward_estimate(model, inputs, config.pattern, mode, runtime.world_size)[runtime.rank],
        restored=_max_diff(restored, dense),
        layout=str(whole_layout(model, inputs)),
        timed=extra,
    )
