"""Training under the sparse pattern: ``vidsparse.apply`` on the transformer being tuned.

The LoRA must learn the model the sampler will run, so training uses the same ``SparseConfig``
semantics as inference: a pattern *name* takes the model family's defaults adapted to the
training grid (e.g. Radial's decay and attention sink on Wan), ``dense_layers=None`` the
family's dense layers. Only the step schedule differs: training draws random noise levels
instead of walking denoising steps, so there are no dense warm-up or final steps, and every
forward runs the pattern.

Gradient checkpointing needs care: vidsparse's hook publishes the call's layout and per-layer
patterns only while the transformer forward runs, but checkpointed blocks are recomputed
later, during backward. ``enable_gradient_checkpointing`` therefore gives each checkpointed
block the call information of its original forward back while it is recomputed; without it the
recomputation would run dense attention and the gradients would be wrong.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
import torch.utils.checkpoint


def sparse_config(cfg: Any):
    """The ``SparseConfig`` a ``TrainConfig`` trains under."""
    from vidsparse.config import SparseConfig

    dense_layers = cfg.dense_layers
    options = dict(cfg.pattern_options)
    if options and not isinstance(cfg.pattern, str):
        raise ValueError("pattern_options apply only when the pattern is given by name (e.g. 'radial').")
    return SparseConfig(
        cfg.pattern,
        dense_first_steps=0,
        dense_last_steps=0,
        dense_layers=dense_layers,
        backend=cfg.attention_backend,
        pattern_options=options,
    )


def pattern_report(transformer: torch.nn.Module, backend: str) -> tuple[list[str], list[str]]:
    """(info lines, warnings) on what the last forward of ``transformer`` trained under: each
    layer group's pattern as it ran on the training grid (family defaults fitted to it), the
    pairs it keeps and, for static patterns, the pairs its kernel path computes. A pattern that
    is dense in effect at this size (a small clip) says so: the LoRA then learns dense attention."""
    from vidsparse.attention import backend_for, plan
    from vidsparse.pipelines.hooks import get_hook
    from vidsparse.work import executed_work, layer_span, no_speedup_warning

    hook = get_hook(transformer)
    info = hook.state.current if hook is not None else None
    if info is None or info.layout is None:
        return [], []
    groups: list[tuple[int, int, Any]] = []
    for layer, pattern in enumerate(info.patterns):
        # (pattern, whether it kept every pair, so the layer ran the model's attention: CallInfo.full)
        ran = (info.full[layer], True) if layer in info.full else (pattern, False)
        if groups and groups[-1][2] == ran:
            groups[-1] = (groups[-1][0], layer, ran)
        else:
            groups.append((layer, layer, ran))
    probe = torch.empty(0, device=next(transformer.parameters()).device)  # "auto" resolves per device
    lines, warnings = [], []
    for first, last, (pattern, whole) in groups:
        span = layer_span(first, last)
        if pattern is None:
            lines.append(f"{span}: dense")
            continue
        if whole:
            lines.append(f"{span}: {pattern!r}, keeps every pair on this grid: ran the model's own attention")
            warnings.append(f"{span}: {type(pattern).__name__} keeps every pair on this grid: it trains as dense")
            continue
        if pattern.dynamic:
            lines.append(f"{span}: {pattern!r} (selects per call from q and k)")
            continue
        p = plan(pattern, info.layout, layer=first, block_size=info.block_size or 128)
        work = executed_work(p, backend_for(backend, probe).name)
        kept = work.token_density
        lines.append(f"{span}: {pattern!r}, keeps {kept:.0%} of pairs, computes {work.computed_fraction:.0%} of dense")
        if kept >= 0.999:
            warnings.append(f"{span}: {type(pattern).__name__} keeps every pair on this grid: it trains as dense")
        elif (w := no_speedup_warning(span, work.path, work.computed_fraction, kept)) is not None:
            warnings.append(w)
    return [f"token grid {info.layout}, block {info.block_size}", *lines], warnings


def enable_sparse(transformer: torch.nn.Module, cfg: Any) -> None:
    """Patch ``transformer``'s self-attention with the training pattern (validated here, before any step)."""
    from vidsparse.pipelines import apply

    apply(transformer, sparse_config(cfg))


def enable_gradient_checkpointing(transformer: torch.nn.Module) -> None:
    """diffusers gradient checkpointing whose recomputation sees the same sparse pattern as the forward."""
    from vidsparse.pipelines.hooks import get_hook

    ref = weakref.ref(transformer)

    def checkpoint(block: torch.nn.Module, *args):
        owner = ref()
        hook = get_hook(owner) if owner is not None else None
        if hook is None:
            return torch.utils.checkpoint.checkpoint(block.__call__, *args, use_reentrant=False)
        state, info = hook.state, hook.state.current

        def run(*inner):
            previous = state.current
            state.current = info  # the forward's layout/patterns, also during the backward recompute
            try:
                return block(*inner)
            finally:
                state.current = previous

        return torch.utils.checkpoint.checkpoint(run, *args, use_reentrant=False)

    transformer.enable_gradient_checkpointing(checkpoint)


__all__ = ["enable_gradient_checkpointing", "enable_sparse", "sparse_config"]
