"""``--parallel ulysses`` through diffusers' own context parallelism where the model has a ``_cp_plan``.

diffusers ships Ulysses for transformers whose class declares a ``_cp_plan`` (in diffusers 0.42.1:
Wan 2.1 / 2.2, LTX-Video, LTX-2; LTX-Video's and LTX-2's fail on their pipelines' prompt mask,
``Family.diffusers_cp_refusal``): ``enable_parallelism(config=ContextParallelConfig(ulysses_degree=N))``
cuts the sequence evenly where the plan says, runs every attention with an all-to-all
(sequence shards -> all tokens for ``H / N`` heads) and gathers the output. ``vidsparse.apply`` composes
with it (``pipelines/hooks.py``: each sparse self-attention does the all-to-all itself and plans the
whole video), so for those models vidsparse does not need a second Ulysses. ``choose_ulysses`` picks
diffusers' where it can run the call exactly and says why not otherwise; vidsparse's own Ulysses
(``vidsparse.parallel.ulysses``, frame-boundary clips, uneven shards, padded heads, replicated joint
text) stays for the rest: models without a ``_cp_plan`` (HunyuanVideo, CogVideoX, Mochi, SkyReels-V2,
Wan VACE, ...), LTX-Video, LTX-2, head counts or token counts that do not divide by the number of ranks.

CPU / gloo: diffusers 0.42.1 derives a device as ``rank % torch.accelerator.device_count()`` while it
sets the parallel config up, which divides by zero on a machine without an accelerator. That device is
only recorded on the config (``ContextParallelConfig._device``, read by tensor-parallel weight loading,
not by context parallelism), so on a CPU-only machine vidsparse stands in a count of 1 for the duration
of ``enable_parallelism`` and restores it at once. A run on CPU ranks of a machine that has an
accelerator is not given to diffusers (its device mesh would be built on the accelerator).
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator
from typing import Any

import torch
from diffusers.hooks import HookRegistry, ModelHook

from vidsparse.attention import attention
from vidsparse.families import family_of
from vidsparse.layout import VideoLayout
from vidsparse.parallel.runtime import ParallelRuntime, guard
from vidsparse.patterns import Dense, Pattern

#: ``run_parallel(..., ulysses=...)`` / ``VIDSPARSE_ULYSSES``: which Ulysses implementation runs.
ULYSSES_IMPLEMENTATIONS = ("auto", "diffusers", "vidsparse")

_CHECK_HANDLE = "_vidsparse_cp_check"
_GUARD_HOOK = "vidsparse_cp_guard"


def _self_attention_heads(transformer: torch.nn.Module) -> int | None:
    paths = family_of(transformer).attention_paths(transformer)
    if not paths:
        return None
    attn = paths[0][1]
    return getattr(attn, "heads", None) or getattr(attn, "num_heads", None)


def diffusers_ulysses_refusal(
    transformer: torch.nn.Module, runtime: ParallelRuntime, layout: VideoLayout | None = None
) -> str | None:
    """Why diffusers' Ulysses cannot run this transformer exactly on ``runtime`` (``None``: it can).

    ``layout`` (the whole video's token grid, when known before the call) adds the token check:
    diffusers splits the sequence into equal shards, vidsparse's Ulysses on frame boundaries.
    """
    import diffusers
    import torch.distributed as dist

    name = type(transformer).__name__
    if getattr(type(transformer), "_cp_plan", None) is None:
        return f"{name} has no _cp_plan in diffusers {diffusers.__version__}"
    refusal = family_of(transformer).diffusers_cp_refusal
    if refusal:
        return refusal
    n = runtime.world_size
    if runtime.group is not None or not dist.is_initialized() or dist.get_world_size() != n:
        return "the run uses a sub-group of the processes; diffusers' device mesh spans the whole world"
    current = torch.accelerator.current_accelerator()  # what diffusers builds its mesh on (None: the CPU)
    accel = current.type if current is not None else "cpu"
    if runtime.device.type != accel:
        return f"the ranks compute on {runtime.device.type} but diffusers builds its device mesh on the {accel} accelerator"
    heads = _self_attention_heads(transformer)
    if heads and heads % n:
        return (
            f"its {heads} attention heads do not divide by {n} ranks (diffusers' Ulysses splits heads evenly; "
            "vidsparse's pads them)"
        )
    if layout is not None and layout.video_len % n:
        return (
            f"its {layout.video_len} video tokens ({layout.frames}x{layout.height}x{layout.width}) do not divide by "
            f"{n} ranks (diffusers' _cp_plan cuts the sequence into equal shards; vidsparse's Ulysses cuts on frame "
            "boundaries, uneven clips allowed)"
        )
    return None


def choose_ulysses(
    transformers: list[torch.nn.Module],
    runtime: ParallelRuntime,
    requested: str = "auto",
    layout: VideoLayout | None = None,
) -> tuple[str, str]:
    """(``"diffusers"`` | ``"vidsparse"``, why) for the Ulysses of one run over these transformers.

    ``"auto"`` takes diffusers' context parallelism when every transformer can run under it and
    vidsparse's otherwise; ``"diffusers"`` raises a ValueError with the reason when it cannot.
    """
    if requested not in ULYSSES_IMPLEMENTATIONS:
        raise ValueError(f"ulysses must be one of {ULYSSES_IMPLEMENTATIONS}, got {requested!r}.")
    names = "/".join(sorted({type(t).__name__ for t in transformers}))
    if requested == "vidsparse":
        return "vidsparse", "vidsparse's Ulysses requested (ulysses='vidsparse' / VIDSPARSE_ULYSSES=vidsparse)"
    reasons = [r for r in (diffusers_ulysses_refusal(t, runtime, layout) for t in transformers) if r]
    if not reasons:
        return "diffusers", f"diffusers' context parallelism ({names}._cp_plan, ulysses_degree={runtime.world_size})"
    if requested == "diffusers":
        raise ValueError(
            f"diffusers' Ulysses cannot run this pipeline: {reasons[0]}. Use ulysses='auto' or 'vidsparse' "
            "(VIDSPARSE_ULYSSES=auto|vidsparse) for vidsparse's own Ulysses."
        )
    return "vidsparse", f"vidsparse's Ulysses: {reasons[0]}"


@contextlib.contextmanager
def _accelerator_count_stand_in(runtime: ParallelRuntime) -> Iterator[None]:
    """diffusers' ``rank % torch.accelerator.device_count()`` on a CPU-only machine (see module docstring)."""
    if runtime.device.type != "cpu" or torch.accelerator.device_count() > 0:
        yield
        return
    real = torch.accelerator.device_count
    torch.accelerator.device_count = lambda: 1
    try:
        yield
    finally:
        torch.accelerator.device_count = real


class _SplitCheck:
    """Forward pre-hook: every tensor the ``_cp_plan`` splits at the transformer input divides by N.

    diffusers asserts this with a bare message after the first split; this says which input, its
    length and how to fix it, on every rank (the shapes are the same on all ranks, so none hangs).
    """

    def __init__(self, transformer: torch.nn.Module, world_size: int) -> None:
        self.world_size = world_size
        self.family = family_of(transformer)
        self.inputs = dict(type(transformer)._cp_plan.get("", {}))
        self.signature = inspect.signature(type(transformer).forward)

    def __call__(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        try:
            bound = self.signature.bind(module, *args, **kwargs).arguments
        except TypeError:
            bound = dict(kwargs)
        n = self.world_size
        grid = self.family.grid(module, bound)
        if isinstance(grid, tuple):
            f, h, w = grid
            if (f * h * w) % n:
                raise ValueError(self._message(f"the {f}x{h}x{w} = {f * h * w} video tokens"))
        for name, spec in self.inputs.items():
            x = bound.get(name)
            if not isinstance(x, torch.Tensor) or (spec.expected_dims is not None and x.dim() != spec.expected_dims):
                continue
            if x.shape[spec.split_dim] % n:
                raise ValueError(self._message(f"{name} ({x.shape[spec.split_dim]} along dim {spec.split_dim})"))

    def _message(self, what: str) -> str:
        n = self.world_size
        return (
            f"vidsparse.parallel: diffusers' Ulysses (ContextParallelConfig(ulysses_degree={n})) cuts {what} into "
            f"{n} equal shards, which does not divide. Choose a video size (or prompt length) whose tokens divide by "
            f"{n}, or run vidsparse's Ulysses (run_parallel(..., ulysses='vidsparse'), VIDSPARSE_ULYSSES=vidsparse), "
            "which cuts on frame boundaries."
        )


def _collective_failure(exc: RuntimeError) -> bool:
    text = str(exc)
    return isinstance(exc, torch.distributed.DistError) or any(m in text for m in ("gloo", "NCCL", "Connection"))


class _GuardHook(ModelHook):
    """Outermost wrapper of the transformer forward: a failed collective inside diffusers' Ulysses
    (a peer died or hangs) becomes vidsparse's ``DistributedError`` naming the rank and what to check.
    Only collective failures are translated (``torch.distributed.DistError``, or a RuntimeError raised
    by the gloo / NCCL transport, which torch 2.13 does not always type); any other error passes unchanged."""

    def __init__(self, runtime: ParallelRuntime) -> None:
        super().__init__()
        self.runtime = runtime

    def new_forward(self, module: torch.nn.Module, *args, **kwargs):
        try:
            return self.fn_ref.original_forward(*args, **kwargs)
        except RuntimeError as exc:
            if not _collective_failure(exc):
                raise
            with guard(self.runtime, "diffusers' Ulysses all-to-all (context parallelism)"):
                raise exc from None


class CPAttentionRecorder:
    """``SparseState.attention_fn`` under diffusers' Ulysses: ``vidsparse.attention`` unchanged, recording
    the pattern each layer ran and the steps with a sparse layer (as ``model.ParallelAttention`` does)."""

    def __init__(self, state) -> None:
        self.state = state
        self._used: dict[int, tuple[Pattern, int | None]] = {}
        self.sparse_steps: set[int] = set()

    def __call__(self, q, k, v, layout, pattern, backend="auto", layer=0, text_mask=None, block_size=None, scale=None):
        self._used[layer] = (pattern, block_size)
        if self.state.current is not None:
            self.sparse_steps.add(self.state.current.step)
        return attention(q, k, v, layout, pattern, backend=backend, layer=layer, text_mask=text_mask,
                         block_size=block_size, scale=scale)  # fmt: skip

    @property
    def full_layers(self) -> dict[int, str]:
        """Layers that ran the model's attention because their plan kept every pair (the state's)."""
        return self.state.full_layers

    @property
    def used(self) -> dict[int, tuple[Pattern, int | None]]:
        """Layer -> (pattern, block) of its sparse calls; layers that never ran sparse (dense layers, or
        every step dense) ran the model's own attention: ``Dense()``."""
        block = self.state.current.block_size if self.state.current is not None else None
        return {layer: self._used.get(layer, (Dense(), block)) for layer in range(self.state.num_layers)}


def enable_diffusers_ulysses(target: Any, config: Any, runtime: ParallelRuntime) -> None:
    """Every transformer of ``target`` under diffusers' Ulysses over all ranks, then ``vidsparse.apply``."""
    from diffusers import ContextParallelConfig

    from vidsparse.pipelines import apply, get_state, remove, transformers_of

    remove(target)
    for _, transformer in transformers_of(target):
        with _accelerator_count_stand_in(runtime):
            transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=runtime.world_size))
        handle = transformer.register_forward_pre_hook(_SplitCheck(transformer, runtime.world_size), with_kwargs=True)
        setattr(transformer, _CHECK_HANDLE, handle)
        HookRegistry.check_if_exists_or_initialize(transformer).register_hook(_GuardHook(runtime), _GUARD_HOOK)
    apply(target, config)
    for _, transformer in transformers_of(target):
        state = get_state(transformer)
        state.attention_fn = CPAttentionRecorder(state)


def disable_diffusers_ulysses(target: Any) -> None:
    """Undo ``enable_diffusers_ulysses``: vidsparse removed, diffusers' split / gather hooks and the
    parallel config taken off the model and its attention processors (diffusers 0.42.1 has no
    ``disable_parallelism``)."""
    from diffusers.hooks.context_parallel import remove_context_parallel

    from vidsparse.pipelines import remove, transformers_of

    remove(target)
    for _, transformer in transformers_of(target):
        handle = getattr(transformer, _CHECK_HANDLE, None)
        if handle is not None:
            handle.remove()
            delattr(transformer, _CHECK_HANDLE)
        registry = getattr(transformer, "_diffusers_hook", None)
        if isinstance(registry, HookRegistry) and registry.get_hook(_GUARD_HOOK) is not None:
            registry.remove_hook(_GUARD_HOOK, recurse=False)
        if getattr(transformer, "_parallel_config", None) is None:
            continue
        remove_context_parallel(transformer, type(transformer)._cp_plan)
        for module in transformer.modules():
            processor = getattr(module, "processor", None)
            if processor is not None and getattr(processor, "_parallel_config", None) is not None:
                processor._parallel_config = None
        transformer._parallel_config = None
