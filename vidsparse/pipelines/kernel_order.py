"""One permutation per transformer forward: the token sequence in the plans' kernel order.

Every sparse layer of a forward usually shares one kernel order (the pattern's tile-major /
frame-padded order, padded to the block size). For a family whose record says so
(``Family.kernel_order``), the hook permutes the token sequence into that order once, at the
cut points of the family's ``ShardPlan`` (where ``vidsparse.parallel`` cuts the sequence into
clips: the inputs of the first block, the RoPE tables, a per-token timestep), and permutes the
output of the ``gather`` modules (the output projection) back. In between, every operation but
self-attention is per token, so it computes the same rows in another order; self-attention gets
contiguous kernel-order q/k/v (``vidsparse.attention(..., kernel_order=True)``: no per-layer
gather / scatter, and the Triton kernels read whole tiles through TMA). Padding positions carry
zeros in, are never attended as keys (the plan masks them) and are dropped on the way out.

Torch forward (pre-)hooks, not diffusers hooks: they run in ``Module.__call__`` whatever
``forward`` is (offloading hooks replace it), and are no-ops while ``CallInfo.order`` is
``None`` (dense steps, patterns with different orders, dynamic patterns, torch.compile,
parallel runs; see ``SparseState.shared_order``).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

import torch

from vidsparse.families.base import Shard, ShardPlan, expand_paths, resolve_path, submodule
from vidsparse.layout import VideoLayout
from vidsparse.plan import KernelOrder


def _permute(x: Any, spec: Shard, order: KernelOrder, layout: VideoLayout, where: str, forward: bool) -> Any:
    if isinstance(x, (tuple, list)):
        return type(x)(_permute(t, spec, order, layout, where, forward) for t in x)
    if not isinstance(x, torch.Tensor) or x.dim() != spec.ndim:
        return x
    n = x.shape[spec.dim]
    expected = layout.seq_len if forward else order.padded_len
    if n != expected:
        raise ValueError(
            f"vidsparse: {where} has {n} tokens along dim {spec.dim} (shape {tuple(x.shape)}), expected {expected} "
            f"for {layout} in {'caller' if forward else 'kernel'} order. The family's kernel_order record does not fit "
            "this model; set vidsparse.pipelines.get_state(pipe.transformer).kernel_order = False (or VIDSPARSE_KERNEL_ORDER=0) to run without it."
        )
    return order.to_kernel(x, spec.dim) if forward else order.to_caller(x, spec.dim)


def install(
    transformer: torch.nn.Module, plan: ShardPlan, current: Callable[[], tuple[KernelOrder, VideoLayout] | None]
) -> list[torch.utils.hooks.RemovableHandle]:
    """Register the permutation hooks of ``plan`` on ``transformer``; ``current()`` gives this
    forward's (order, layout) or ``None`` (then every hook passes its tensors through)."""
    handles = []
    for path, specs in expand_paths(transformer, plan.inputs).items():
        mod = submodule(transformer, path)
        handles.append(mod.register_forward_pre_hook(_input_hook(mod, path, specs, current), with_kwargs=True))
    for path, outs in expand_paths(transformer, plan.outputs).items():
        hook = _output_hook(path, outs, current, forward=True)
        handles.append(submodule(transformer, path).register_forward_hook(hook))
    for path, spec in plan.gather.items():
        path = resolve_path(transformer, path)
        hook = _output_hook(path, {0: spec}, current, forward=False)
        handles.append(submodule(transformer, path).register_forward_hook(hook))
    return handles


def _input_hook(mod: torch.nn.Module, path: str, specs: Mapping[str, Shard], current):
    signature = inspect.signature(type(mod).forward)

    def hook(module, args, kwargs):
        now = current()
        if now is None:
            return None
        order, layout = now
        bound = signature.bind(module, *args, **kwargs)
        for name, spec in specs.items():
            if name in bound.arguments:
                where = f"the {name!r} input of {path or 'the transformer'}"
                bound.arguments[name] = _permute(bound.arguments[name], spec, order, layout, where, True)
        return bound.args[1:], bound.kwargs

    return hook


def _output_hook(path: str, outs: Mapping[int, Shard], current, forward: bool):
    def hook(module, args, output):
        now = current()
        if now is None:
            return None
        order, layout = now
        where = f"the output of {path}"
        if isinstance(output, torch.Tensor):
            return _permute(output, outs[0], order, layout, where, forward) if 0 in outs else output
        items = list(output)
        for i, spec in outs.items():
            items[i] = _permute(items[i], spec, order, layout, f"{where} [{i}]", forward)
        return type(output)(items) if isinstance(output, tuple) else items

    return hook


__all__ = ["install"]
