"""Checks every model family gets on a tiny random-init transformer of its real diffusers class.

Used by ``tests/test_family_<name>.py``: dense equivalence with ``Dense()``, bit-exact
``remove``, the discovered layout, every registered pattern (family defaults) finite on a
regular and a ragged grid, sparse patterns differing from dense, ``torch.compile``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

import vidsparse as vs
from vidsparse.models import tiny_inputs, tiny_transformer
from vidsparse.pipelines import get_state

# Options making each known pattern sparse on a 4x4x4 token grid.
SPARSE_OPTIONS: dict[str, dict[str, Any]] = {
    "radial": dict(block_size=16, decay_factor=0.2),
    "tile": dict(tile=(1, 2, 2), window=(1, 1, 1)),
    "attention-tile": dict(global_frames=1),
    "gna": dict(kernel_size=(3, 3, 3)),
    "vmoba": dict(temporal_chunk=1, spatial_chunk=(2, 2), st_chunk=(2, 2, 2), select_mode="topk", topk=1),
    "dual-scope": dict(local_frames=0, global_stride=0),
    "freeswim": dict(base_grid=(2, 2)),
}


@dataclass(frozen=True)
class SameFrame(vs.Pattern):
    """Video tokens attend only their own latent frame (checks the grid's frame axis)."""

    name: ClassVar[str] = "test-same-frame"

    def video_mask(self, layout, qi, ki, layer=0):
        return qi // layout.tokens_per_frame == ki // layout.tokens_per_frame


@dataclass(frozen=True)
class SamePixel(vs.Pattern):
    """Video tokens attend only their own (h, w) position, across frames (checks the spatial axes)."""

    name: ClassVar[str] = "test-same-pixel"

    def video_mask(self, layout, qi, ki, layer=0):
        return qi % layout.tokens_per_frame == ki % layout.tokens_per_frame


def run(model: torch.nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs, return_dict=False)[0]


def config(pattern, **kw) -> vs.SparseConfig:
    """A config that is sparse on every layer and step (tests call bare transformers)."""
    kw.setdefault("backend", "torch")
    kw.setdefault("dense_first_steps", 0)
    kw.setdefault("dense_layers", ())
    return vs.SparseConfig(pattern, **kw)


def setup(variant: str, latent: tuple[int, int, int], batch: int = 1, **overrides):
    model = tiny_transformer(variant, **overrides)
    return model, tiny_inputs(variant, model, *latent, batch=batch)


def processors(model: torch.nn.Module) -> dict[str, Any]:
    return {n: m.processor for n, m in model.named_modules() if hasattr(m, "processor")}


def check_dense_equals_unpatched_and_remove_is_exact(model, inputs) -> None:
    originals = processors(model)
    ref = run(model, inputs)
    vs.apply(model, config(vs.Dense()))
    out = run(model, inputs)
    state = get_state(model)
    assert state.calls["sparse"] == state.num_layers and state.calls["dense"] == 0, dict(state.calls)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-5)
    vs.remove(model)
    after = processors(model)
    assert after.keys() == originals.keys() and all(after[n] is originals[n] for n in originals)
    assert torch.equal(run(model, inputs), ref)


def check_unrecognised_input_runs_dense(model, class_name: str) -> None:
    """Latents that are not a 5-D video tensor give no grid: that call runs the model's own
    attention, with one warning naming the model class."""
    import pytest

    vs.apply(model, config("tile"))
    state = get_state(model)
    kwargs = dict(hidden_states=torch.zeros(1, 64, 4), timestep=torch.ones(1))
    with pytest.warns(UserWarning, match=f"could not read the token grid of this {class_name} call"):
        info = state.begin_call(model, kwargs, None)
    assert info.layout is None and set(info.patterns) == {None}


def check_mirror_is_bit_exact(model, inputs, ref, layers: int, run=run) -> None:
    """With SDPA (the model's own attention core) as vidsparse's attention function, the patched
    model computes bit for bit what the model computes: projections, norms and RoPE are mirrored."""
    import torch.nn.functional as F

    vs.apply(model, config(vs.Dense()))
    state = get_state(model)

    def sdpa(q, k, v, layout, pattern, **kw):
        return F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2)

    state.attention_fn = sdpa
    assert torch.equal(run(model, inputs), ref) and state.calls["sparse"] == layers


def discovered(model, inputs) -> list[tuple[vs.VideoLayout, int, tuple[int, ...]]]:
    """(layout, layer, q shape) of every sparse self-attention call of one forward (Dense())."""
    vs.apply(model, config("dense"))
    state = get_state(model)
    seen: list = []
    attention = state.attention_fn

    def spy(q, k, v, layout, pattern, **kw):
        seen.append((layout, kw["layer"], tuple(q.shape)))
        return attention(q, k, v, layout, pattern, **kw)

    state.attention_fn = spy
    try:
        run(model, inputs)
    finally:
        state.attention_fn = attention
        vs.remove(model)
    return seen


def check_every_pattern_runs(model, inputs, grid_layout: vs.VideoLayout) -> None:
    """Each registered pattern *name* (family defaults fitted to the grid) runs, finite, sparse on every layer."""
    for name in sorted(vs.PATTERNS):
        check_pattern_on_grid(model, inputs, name, grid_layout)


def sparse_pattern(name: str, layout: vs.VideoLayout) -> vs.Pattern:
    """``name`` with its SPARSE_OPTIONS; a static pattern must actually mask something on ``layout``."""
    pattern = vs.make_pattern(name, **SPARSE_OPTIONS.get(name, {}))
    if not pattern.dynamic:
        assert not bool(vs.token_mask(pattern, layout).all()), f"{name} options are dense on {layout}"
    return pattern


def check_pattern_differs(
    model, inputs, ref, name: str, layout: vs.VideoLayout, layers: int | None = None, run=run
) -> None:
    """One sparse pattern runs on ``layers`` self-attention layers (default: every patched layer),
    finite, and changes the output. ``run`` returns the video output or a tuple led by it."""
    vs.apply(model, config(sparse_pattern(name, layout)))
    out = run(model, inputs)
    state = get_state(model)
    assert state.calls["sparse"] == (state.num_layers if layers is None else layers), dict(state.calls)
    outs = out if isinstance(out, tuple) else (out,)
    assert all(bool(torch.isfinite(o).all()) for o in outs), name
    ref = ref[0] if isinstance(ref, tuple) else ref
    assert (outs[0] - ref).abs().max() > 1e-4, f"{name} gave the dense output"


def check_pattern_on_grid(model, inputs, name: str, layout: vs.VideoLayout, layers: int | None = None, run=run) -> None:
    """A pattern *name* (family defaults fitted to the grid) runs finite and sparse on ``layers``
    self-attention layers (default: every patched layer) with ``layout`` discovered."""
    vs.apply(model, config(name, block_size=16))
    try:
        out = run(model, inputs)
        state = get_state(model)
        assert state.current.layout == layout, (name, state.current.layout)
        assert state.calls["sparse"] == (state.num_layers if layers is None else layers), (name, dict(state.calls))
        outs = out if isinstance(out, tuple) else (out,)
        assert all(bool(torch.isfinite(o).all()) for o in outs), f"{name} on {layout}"
    finally:
        vs.remove(model)


def check_sparse_patterns_differ(model, inputs, layout: vs.VideoLayout) -> None:
    ref = run(model, inputs)
    for name in sorted(n for n in vs.PATTERNS if n != "dense"):
        check_pattern_differs(model, inputs, ref, name, layout)
    vs.remove(model)


def check_compile(model, inputs) -> None:
    """The patched transformer compiles (eager backend: dynamo tracing, no C++ build) and
    matches the eager patched output; the plans are built by the hook, outside the graph."""
    radial = vs.make_pattern("radial", **SPARSE_OPTIONS["radial"])
    vs.apply(model, config(radial))
    eager = run(model, inputs)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="eager")
    out = run(compiled, inputs)
    state = get_state(model)
    assert get_state(compiled) is state
    torch.testing.assert_close(out, eager, atol=1e-5, rtol=1e-5)
    vs.remove(model)
    torch._dynamo.reset()


def check_generate_validates_sizes(pipe, folder, bad: tuple[int, int, int], match: str, good, grid, fps: int) -> None:
    """``vidsparse generate --model <folder>`` (the saved pipeline, read from its config files
    only) validates sizes with the family geometry's VAE factors, before loading any weights."""
    import pytest

    from vidsparse.generation import GenerateOptions, prepare

    pipe.save_pretrained(folder)
    with pytest.raises(ValueError, match=match):
        prepare(GenerateOptions(model=str(folder), frames=bad[0], height=bad[1], width=bad[2], device="cpu"))
    plan = prepare(GenerateOptions(model=str(folder), frames=good[0], height=good[1], width=good[2], device="cpu"))
    assert plan.grid == tuple(grid) and plan.fps == fps


def check_generate_tiny(model: str, family: str, grid: tuple[int, int, int], fps: int) -> None:
    """``vidsparse generate --model tiny-<name>``: the embedded pipeline is listed, built by the
    family record and run end to end with the family's default pattern (2 steps, no file)."""
    from vidsparse.generation import GenerateOptions, generate, tiny_models

    assert model in tiny_models()
    result = generate(GenerateOptions(model=model, steps=2, backend="torch", device="cpu", progress=False))
    assert (result.family, result.grid, result.fps, result.steps) == (family, tuple(grid), fps, 2)
    assert result.frames.dtype.name == "uint8" and result.frames.ndim == 4
