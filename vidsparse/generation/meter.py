"""Density metering of a sparse run: which pattern each layer ran and how dense it was.

``SparseMeter`` wraps every patched transformer's ``SparseState.attention_fn`` with a
``DensityRecorder`` (measured at each layer's first sparse call), counts sparse steps and
reports per-layer-group densities and the overall attention work.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

import torch

from vidsparse.density import token_density
from vidsparse.generation.result import LayerGroupDensity


def backend_name(backend: str, q: torch.Tensor) -> str:
    """The backend ``backend`` resolves to for inputs like ``q`` (the one whose kernel path the work
    counts); ``"torch"`` where it cannot resolve (the call itself then reports why)."""
    from vidsparse.attention import backend_for

    try:
        return backend_for(backend, q).name
    except (ValueError, ImportError):
        return "torch"


class DensityRecorder:
    """Wraps ``SparseState.attention_fn``: records the pattern of each layer at its first
    sparse call and measures that call's plan (static plans come from the cache)."""

    def __init__(self, inner) -> None:
        self.inner = inner
        # layer -> (pattern repr, block density, token density, computed work, kernel path)
        self.layers: dict[int, tuple[str, float, float, float, str]] = {}
        self.sparse_calls = 0

    @property
    def accepts_kernel_order(self) -> bool:
        """Kernel-order calls pass through when the wrapped function takes them (static plans:
        the measurement reads only q's heads and device)."""
        from vidsparse.pipelines.hooks import accepts_kernel_order

        return accepts_kernel_order(self.inner)

    def __call__(self, q, k, v, layout, pattern, *args, layer: int = 0, block_size: int | None = None, **kwargs):
        record = self._record
        if torch.compiler.is_compiling():  # host-side bookkeeping stays out of the graph (--compile)
            record = torch.compiler.disable(record)  # made here: a decorator would import dynamo at import
        record(q, k, layout, pattern, layer, block_size, kwargs.get("backend", "auto"))
        return self.inner(q, k, v, layout, pattern, *args, layer=layer, block_size=block_size, **kwargs)

    def _record(self, q, k, layout, pattern, layer, block_size, backend) -> None:
        """Host-side bookkeeping (the caller keeps it out of torch.compile graphs)."""
        self.sparse_calls += 1
        if layer not in self.layers:
            self.layers[layer] = self._measure(q, k, layout, pattern, layer, block_size, backend)

    @staticmethod
    @torch.no_grad()
    def _measure(q, k, layout, pattern, layer, block_size, backend) -> tuple[str, float, float, float, str]:
        import vidsparse as vs
        from vidsparse.attention import backend_for
        from vidsparse.work import executed_work

        chosen = backend_name(backend, q)
        if block_size is None:  # the backend's default, as vidsparse.attention picks it
            try:
                block_size = backend_for(backend, q).default_block
            except (ValueError, ImportError):
                block_size = 128
        if pattern.dynamic:
            p = vs.plan(
                pattern, layout, num_heads=q.shape[2], layer=layer, q=q, k=k, block_size=block_size, device=q.device
            )
        else:
            p = vs.plan(pattern, layout, num_heads=1, layer=layer, block_size=block_size)
        work = executed_work(p, chosen)  # what the chosen kernel path really computes
        return repr(pattern), float(p.density), float(token_density(p).mean()), work.computed_fraction, work.path


def group_densities(
    num_layers: int, dense_layers: frozenset[int], seen: dict[int, tuple], full: Mapping[int, str] | None = None
):
    """Consecutive layers with the same pattern and densities, as ``LayerGroupDensity`` (dense: work 1.0).
    ``full``: layer -> pattern repr of the layers that ran the model's attention because their plan
    kept every pair (``SparseState.full_layers``): their pattern, on the dense path."""
    full = full or {}
    rows = []  # (layer, pattern, block density, token density, work, path, keeps every pair)
    for layer in range(num_layers):
        if layer in seen:
            rows.append((layer, *seen[layer], False))
        elif layer in full:
            rows.append((layer, full[layer], 1.0, 1.0, 1.0, "dense", True))
        elif layer in dense_layers:
            rows.append((layer, "dense", 1.0, 1.0, 1.0, "dense", False))
        else:
            rows.append((layer, "not run sparse", 1.0, 1.0, 1.0, "dense", False))
    groups: list[LayerGroupDensity] = []
    for layer, pat, bd, td, work, path, whole in rows:
        last = groups[-1] if groups else None
        same_work = last is not None and (
            last.work == work or (None not in (last.work, work) and abs(last.work - work) < 5e-4)
        )
        if (
            last
            and last.pattern == pat
            and abs(last.block_density - bd) < 5e-4
            and abs(last.token_density - td) < 5e-4
            and same_work
            and last.path == path
            and last.keeps_every_pair == whole
        ):
            groups[-1] = replace(last, layers=(*last.layers, layer))
        else:
            groups.append(LayerGroupDensity((layer,), pat, bd, td, work, path, whole))
    return tuple(groups)


class SparseMeter:
    """Attaches a ``DensityRecorder`` to every patched transformer; counts sparse steps and
    turns the recordings into per-layer-group densities and the overall attention work."""

    def __init__(self, pipe) -> None:
        from vidsparse.pipelines import get_state, transformers_of

        self.entries = []
        for _, transformer in transformers_of(pipe):
            state = get_state(transformer)
            recorder = DensityRecorder(state.attention_fn)
            state.attention_fn = recorder
            self.entries.append((state, recorder, dict(state.calls)))
        self.sparse_steps = 0
        self._last = 0

    def tick(self) -> None:
        calls = sum(rec.sparse_calls for _, rec, _ in self.entries)
        if calls > self._last:
            self.sparse_steps += 1
        self._last = calls

    def summary(self) -> tuple[tuple[LayerGroupDensity, ...], float]:
        seen: dict[int, tuple[str, float, float]] = {}
        total = work = 0.0
        for state, rec, before in self.entries:
            for layer, value in rec.layers.items():
                seen.setdefault(layer, value)
            dense_calls = state.calls.get("dense", 0) - before.get("dense", 0)
            sparse_calls = state.calls.get("sparse", 0) - before.get("sparse", 0)
            total += dense_calls + sparse_calls
            work += dense_calls
            if sparse_calls and rec.layers:
                work += sparse_calls * sum(v[1] for v in rec.layers.values()) / len(rec.layers)
        state0 = self.entries[0][0]
        full: dict[int, str] = {}
        for state, _, _ in self.entries:
            for layer, pattern in state.full_layers.items():
                full.setdefault(layer, pattern)
        groups = group_densities(state0.num_layers, state0.dense_layers, seen, full)
        return groups, (work / total if total else 1.0)

    def computed_work(self) -> float:
        """As ``summary``'s attention work, from each layer's computed pairs (padding included) / dense."""
        total = work = 0.0
        for state, rec, before in self.entries:
            dense_calls = state.calls.get("dense", 0) - before.get("dense", 0)
            sparse_calls = state.calls.get("sparse", 0) - before.get("sparse", 0)
            total += dense_calls + sparse_calls
            work += dense_calls
            if sparse_calls and rec.layers:
                work += sparse_calls * sum(v[3] for v in rec.layers.values()) / len(rec.layers)
        return work / total if total else 1.0


def num_layers(pipe) -> int:
    try:
        from vidsparse.families import family_of

        return len(family_of(pipe.transformer).attention_paths(pipe.transformer))
    except Exception:
        return 0


__all__ = ["DensityRecorder", "SparseMeter", "backend_name", "group_densities", "num_layers"]
