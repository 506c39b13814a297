"""Per-transformer state and the diffusers ``ModelHook`` that fills it on every forward.

The hook (``VidsparseHook``, registered as ``"vidsparse"`` on the transformer through
``diffusers.hooks.HookRegistry``) runs before each transformer forward and records in
``SparseState.current`` (a ``CallInfo``): the ``VideoLayout`` of the call (grid after
patchify, text span), the denoising step of the current CFG branch, and the pattern of
every layer for that step (``None`` = the model's own dense attention). The self-attention
processors (each family's ``Family.processor``, ``vidsparse.families``) read it; nothing is a
class attribute, so two pipelines, two resolutions or two transformers never share state.

Step index rule, per CFG branch (the ``cache_context`` name the pipeline sets: "cond",
"uncond", "cond_uncond"; "default" without one):

1. a ``cache_context(..., step_index=i)`` (WanPipeline sets it) is taken as is;
1b. otherwise, applied to a pipeline whose scheduler keeps a ``step_index`` (every diffusers
   scheduler the video pipelines use), that index less the scheduler's ``begin_index``: host
   integers, so no device sync (a sequential CFG pass calls twice with the same index);
2. otherwise the largest timestep value of the call is compared with the branch's previous
   call: equal -> same step (sequential CFG without contexts calls twice per step); moved in
   the run's direction -> next step; moved the other way, or back to the run's first value
   -> a new run, step 0;
2b. per-frame timesteps (a [B, N] tensor, N > 1: diffusion forcing gives every latent frame its
   own, SkyReels-V2's ``SkyReelsV2DiffusionForcing*Pipeline``) compare the whole vector of the
   first sample instead of its maximum, whose most-noisy frame can sit at the top value for many
   steps: same vector -> same step; no frame moved against the run's direction and one moved with
   it -> next step; frames moving both ways, a different frame count, or the run's first vector
   again -> a new run. The step count then is the pipeline's ``num_timesteps`` (diffusion-forcing
   loops run more iterations than the scheduler has timesteps) when it has one;
3. counters reset at the end of every pipeline call (diffusers calls ``reset_state`` from
   ``maybe_free_model_hooks``) and on ``vidsparse.reset_state(pipe)``.

A pipeline's transformers share one step tracker, so Wan 2.2's ``transformer_2`` keeps
counting where ``transformer`` stopped. The total number of steps (for fractions and
``dense_last_steps``) comes from the cache context, else ``len(pipe.scheduler.timesteps)``,
else ``SparseConfig.num_inference_steps``.

Extension points (used by ``vidsparse.parallel``):

- ``state.attention_fn``: every sparse attention call goes through it, with
  ``vidsparse.attention``'s signature ``(q, k, v, layout, pattern, backend=, layer=,
  text_mask=, block_size=)``, q/k/v [B, S, H, D]; default ``vidsparse.attention``. A layer whose
  static plan keeps every pair of the call's grid runs the model's own attention instead
  (``SparseConfig.dense_when_full``; pass ``False`` to have every sparse layer reach it).
- ``state.discover_layout(transformer, kwargs) -> VideoLayout | None``: the one function
  that reads the layout from the transformer's forward arguments (bound by name); ``None``
  runs that forward dense. Replace it to describe a different (e.g. per-rank) token layout.

torch.compile: the bookkeeping runs eagerly (``torch.compiler.disable``, one graph break per
forward); when the transformer runs compiled, it also builds the call's static plans there,
so the compiled attention calls only look them up. Reading the timestep (rule 2) is one
host sync per forward; rules 1 and 1b need none.
"""

from __future__ import annotations

import inspect
import os
import warnings
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks.hooks import BaseState, StateManager

from vidsparse.attention import attention as _vidsparse_attention
from vidsparse.attention import plan as _vidsparse_plan
from vidsparse.config import SparseConfig, steps_from
from vidsparse.families import Family
from vidsparse.kernels.backends import AUTO, get_backend
from vidsparse.layout import VideoLayout, auto_block_size
from vidsparse.lru import LRUCache
from vidsparse.patterns import PATTERNS, Pattern, make_pattern, normalize_pattern_name
from vidsparse.pipelines import kernel_order as _kernel_order
from vidsparse.plan import KernelOrder, kernel_order
from vidsparse.work import keeps_every_pair

HOOK_NAME = "vidsparse"


class _NoState(BaseState):
    def reset(self, *args, **kwargs) -> None:
        pass


def empty_state_manager() -> StateManager:
    """The ``context_manager`` of a vidsparse hook: diffusers' ``cache_context`` sets the context on
    every StateManager attribute of a stateful hook, but vidsparse hooks keep their own state."""
    return StateManager(_NoState)


def _caches_across_steps(transformer: torch.nn.Module) -> bool:
    """Whether a diffusers cache (FirstBlockCache, MagCache, TaylorSeer, PAB, FasterCache, ...) is
    on: it keeps block hidden states or residuals from one step for the next, and a forward in
    kernel order holds those tokens permuted and padded while a dense step holds them in caller
    order, so a schedule that mixes the two would compare or reuse mismatched tensors
    (measured: FirstBlockCache fails on the shape, MagCache silently changes the video). Such
    forwards keep the per-layer path."""
    enabled = getattr(transformer, "is_cache_enabled", False)
    return bool(enabled() if callable(enabled) else enabled)


@dataclass(frozen=True)
class CallInfo:
    """What one transformer forward looks like to the self-attention processors."""

    layout: VideoLayout | None  # None: unknown grid, every layer runs dense
    step: int
    total_steps: int | None
    branch: str
    batch: int
    patterns: tuple[Pattern | None, ...]  # per layer; None = the model's own dense attention
    block_size: int | None
    # The kernel order this forward's token sequence runs in between the family's cut points
    # (``vidsparse.pipelines.kernel_order``); None: caller order, each layer gathers its own.
    order: KernelOrder | None = None
    # Layers whose plan keeps every pair of this grid, so they run the model's own attention
    # (patterns None; ``SparseConfig.dense_when_full``): layer -> the pattern they would have run.
    full: Mapping[int, Pattern] = field(default_factory=dict)


class StepTracker:
    """Step index per CFG branch from timestep values (see the module docstring)."""

    def __init__(self) -> None:
        self._branches: dict[str, list[Any]] = {}

    def reset(self) -> None:
        self._branches.clear()

    def step(self, branch: str, t: float) -> int:
        # [first value, last value, step, direction (+1/-1/0)]
        rec = self._branches.get(branch)
        if rec is None:
            self._branches[branch] = [t, t, 0, 0]
            return 0
        first, last, step, direction = rec
        if last is None:  # the previous call's step came from a cache context
            self._branches[branch] = [None, t, step, 0]
            return int(step)
        if t == last:
            return int(step)
        move = 1 if t > last else -1
        if t == first or (direction and move != direction):
            self._branches[branch] = [t, t, 0, 0]
            return 0
        rec[1], rec[2], rec[3] = t, step + 1, move
        return int(step) + 1

    def step_frames(self, branch: str, t: torch.Tensor) -> int:
        """Step of a call with per-frame timesteps ``t`` [N] (rule 2b of the module docstring)."""
        key = f"{branch}/frames"
        rec = self._branches.get(key)
        if rec is None or rec[1] is None or rec[1].shape != t.shape:
            self._branches[key] = [t, t, 0, 0]
            return 0
        first, last, step, direction = rec
        if torch.equal(t, last):
            return int(step)
        up, down = bool((t > last).any()), bool((t < last).any())
        move = 1 if up else -1
        if (up and down) or torch.equal(t, first) or (direction and move != direction):
            self._branches[key] = [t, t, 0, 0]
            return 0
        rec[1], rec[2], rec[3] = t, step + 1, move
        return int(step) + 1

    def set(self, branch: str, step: int) -> None:
        """Record an authoritative step (from a cache context)."""
        self._branches[branch] = [None, None, step, 0]
        self._branches.pop(f"{branch}/frames", None)


def named_pattern(
    config: SparseConfig,
    family: Family,
    name: str,
    layout: VideoLayout,
    block_size: int | None,
    two_stage: bool = False,
) -> Pattern:
    """The pattern a name runs on this grid: the family's defaults fitted to the grid, then the
    config's ``pattern_options`` of that pattern (``Pattern.merge_options``). A bad value names
    both sources, since the user may not have set the one that is wrong."""
    key = normalize_pattern_name(name)
    defaults = family.pattern_options(key, layout, block_size, two_stage)
    user = config.options_for(key)
    try:
        return make_pattern(key, **PATTERNS[key].merge_options(defaults, user))
    except (TypeError, ValueError) as exc:
        if not user:
            raise
        others = {k: v for k, v in defaults.items() if k not in user}
        rest = f"; {family.name}'s defaults for the rest: {others}" if others else ""
        raise type(exc)(f"{exc} ({key} options given: {user}{rest}.)") from None


@dataclass
class SparseState:
    """Everything vidsparse keeps for one patched transformer."""

    config: SparseConfig
    family: Family
    num_layers: int
    dense_layers: frozenset[int]
    tracker: StepTracker
    # ``config.layer_patterns`` with 0-based keys (``pipelines.apply.layer_schedule``)
    layer_patterns_by_index: Mapping[int, Pattern | str] = field(default_factory=dict)
    pipeline_ref: Callable[[], Any] | None = None  # weak reference to the pipeline, if any
    two_stage: bool = False
    attention_fn: Callable[..., torch.Tensor] = _vidsparse_attention
    discover_layout: Callable[[torch.nn.Module, dict[str, Any]], VideoLayout | None] = None  # type: ignore[assignment]
    current: CallInfo | None = None
    calls: Counter = field(default_factory=Counter)  # "sparse" / "dense" self-attention calls
    original_processors: dict[str, Any] = field(default_factory=dict)
    ulysses: int = 1  # diffusers' Ulysses degree on this transformer (read at every forward)
    runs: int = 0  # pipeline calls finished (diffusers resets stateful hooks after each)
    # Layers that ran the model's own attention because their plan kept every pair of a call's
    # grid (``SparseConfig.dense_when_full``): layer -> the pattern's repr (the generate summary).
    full_layers: dict[int, str] = field(default_factory=dict)
    # Permute the whole forward into the plans' kernel order where the family allows it
    # (``Family.kernel_order``); VIDSPARSE_KERNEL_ORDER=0 turns it off for new states.
    kernel_order: bool = field(default_factory=lambda: os.environ.get("VIDSPARSE_KERNEL_ORDER", "1") != "0")
    _patterns: LRUCache = field(default_factory=lambda: LRUCache(16))
    _orders: LRUCache = field(default_factory=lambda: LRUCache(16))
    _full: LRUCache = field(default_factory=lambda: LRUCache(16))
    _warned: set = field(default_factory=set)

    def __post_init__(self) -> None:
        if self.discover_layout is None:
            self.discover_layout = self.default_discover_layout

    # -- layout --------------------------------------------------------------------------
    def default_discover_layout(self, transformer: torch.nn.Module, kwargs: dict[str, Any]) -> VideoLayout | None:
        """The family's rule: grid from the latent shape and patch size, text from the prompt."""
        grid = self.family.grid(transformer, kwargs)
        if grid is None or isinstance(grid, str):  # a str says why the tokens are no grid
            why = f": {grid}" if isinstance(grid, str) else " (e.g. LTX-Video with conditioning tokens)"
            self.warn_each_run(
                "grid",
                f"vidsparse: could not read the token grid of this {type(transformer).__name__} call{why}; "
                "it runs with dense attention.",
            )
            return None
        text_len = self.family.text_len(transformer, kwargs)
        return VideoLayout(*grid, text_len=text_len, text_position=self.family.text_position if text_len else "none")

    # -- patterns ------------------------------------------------------------------------
    def _resolve(self, spec: Pattern | str, layout: VideoLayout, block_size: int | None) -> Pattern:
        if isinstance(spec, Pattern):
            return spec
        return named_pattern(self.config, self.family, spec, layout, block_size, self.two_stage)

    def layer_patterns(self, layout: VideoLayout, block_size: int | None) -> tuple[Pattern | None, ...]:
        """Pattern per layer on this layout (cached per layout), validated once."""
        return self._patterns.get_or_build((layout, block_size), lambda: self._build_layer_patterns(layout, block_size))

    def _build_layer_patterns(self, layout: VideoLayout, block_size: int | None) -> tuple[Pattern | None, ...]:
        cfg = self.config
        out: list[Pattern | None] = []
        for layer in range(self.num_layers):
            if layer in self.dense_layers:
                out.append(None)
                continue
            spec = self.layer_patterns_by_index.get(layer, cfg.pattern)
            out.append(self._resolve(spec, layout, block_size))
        for pattern in {p for p in out if p is not None}:
            try:
                pattern.validate(layout)
            except ValueError as exc:
                raise ValueError(
                    f"vidsparse: {pattern!r} cannot run on this {self.family.name} call (token grid {layout}): {exc}"
                ) from None
        return tuple(out)

    # -- steps ---------------------------------------------------------------------------
    def total_steps(self, context: Any, per_frame: bool = False) -> int | None:
        n = getattr(context, "num_inference_steps", None)
        if n:
            return int(n)
        pipe = self.pipeline_ref() if self.pipeline_ref is not None else None
        if per_frame:  # diffusion forcing: the rows of the pipeline's timestep matrix
            try:
                rows = getattr(pipe, "num_timesteps", None)
            except AttributeError:  # the property before the pipeline's first call
                rows = None
            if isinstance(rows, int) and rows > 0:
                return rows
        timesteps = getattr(getattr(pipe, "scheduler", None), "timesteps", None)
        if timesteps is not None and len(timesteps):
            return len(timesteps)
        return self.config.num_inference_steps

    def scheduler_step(self) -> int | None:
        """The step from the pipeline's scheduler (rule 1b): ``step_index`` counts the
        ``scheduler.step`` calls of this run (``None`` before the first: step 0), less its
        ``begin_index`` (video-to-video starts part-way). Plain host integers, so reading them
        costs no device sync, unlike the timestep. ``None`` without a pipeline or a scheduler
        that keeps a step index."""
        pipe = self.pipeline_ref() if self.pipeline_ref is not None else None
        scheduler = getattr(pipe, "scheduler", None)
        if scheduler is None or not hasattr(type(scheduler), "step_index"):
            return None
        index = scheduler.step_index
        begin = getattr(scheduler, "begin_index", None) or 0
        return 0 if index is None else max(0, int(index) - int(begin))

    def dense_step(self, step: int, total: int | None) -> bool:
        cfg = self.config
        default_first = self.family.default_schedule(cfg.pattern_name)[0]
        if total is None:
            if cfg.dense_last_steps:
                raise ValueError(
                    "SparseConfig.dense_last_steps needs the number of denoising steps: apply vidsparse to the "
                    "pipeline or pass SparseConfig(num_inference_steps=...)."
                )
            first = cfg.dense_first_steps
            if first is None and isinstance(default_first, float):
                self.warn_once(
                    "total",
                    "vidsparse: the number of denoising steps is unknown (bare transformer without "
                    "SparseConfig(num_inference_steps=...)), so the family's dense warm-up "
                    f"({default_first:.0%} of the steps) is skipped.",
                )
                first = 0
            n_first, n_last = steps_from(default_first if first is None else first, None, "dense_first_steps"), 0
        else:
            n_first, n_last = cfg.dense_step_counts(total, default_first)
        covered = total is not None and n_first + n_last >= total
        if covered and cfg.pattern_name != "dense" and not cfg.all_dense_known_at_apply(total, default_first):
            self.warn_once(
                f"all-dense-{total}",
                f"vidsparse: {n_first} dense first and {n_last} dense last steps cover all {total} denoising "
                "steps, so this run computes dense attention throughout. Lower SparseConfig.dense_first_steps "
                "/ SparseConfig.dense_last_steps (or pass a fraction, e.g. 0.25).",
            )
        # (a step past the end, e.g. a forward after the pipeline's last, is dense only if a tail is asked for)
        return step < n_first or (n_last > 0 and total is not None and step >= total - n_last)

    # -- per forward ---------------------------------------------------------------------
    def begin_call(
        self, transformer: torch.nn.Module, kwargs: dict[str, Any], context: Any, compiling: bool = False
    ) -> CallInfo:
        self.ulysses = check_context_parallel(transformer)
        branch = getattr(context, "name", None) or "default"
        ctx_step = getattr(context, "step_index", None)
        timestep = kwargs.get("timestep")
        per_frame = isinstance(timestep, torch.Tensor) and timestep.dim() >= 2 and timestep[0].numel() > 1
        if ctx_step is not None:  # no need to read the timestep (a host sync)
            step = int(ctx_step)
            self.tracker.set(branch, step)
        elif per_frame:
            step = self.tracker.step_frames(branch, timestep.detach()[0].flatten().float().cpu())
        elif (sched_step := self.scheduler_step()) is not None:  # host state: no timestep read (sync)
            step = sched_step
            self.tracker.set(branch, step)
        elif isinstance(timestep, torch.Tensor):
            step = self.tracker.step(branch, float(timestep.detach().max()))
        elif isinstance(timestep, (int, float)):
            step = self.tracker.step(branch, float(timestep))
        else:
            step = 0
        total = self.total_steps(context, per_frame)
        layout = self.discover_layout(transformer, kwargs)
        hs = kwargs.get("hidden_states")
        batch = int(hs.shape[0]) if isinstance(hs, torch.Tensor) else 1
        order = None
        full: dict[int, Pattern] = {}
        if layout is None:
            patterns: tuple[Pattern | None, ...] = (None,) * self.num_layers
            block = None
        else:
            block = self.config.block_size or auto_block_size(layout) or _default_block(self.config.backend, hs)
            patterns = self.layer_patterns(layout, block)
            if self.dense_step(step, total):
                patterns = (None,) * self.num_layers
            elif isinstance(hs, torch.Tensor):
                full = self.full_plan_layers(transformer, kwargs, layout, patterns, block, hs.device)
                patterns = tuple(None if layer in full else p for layer, p in enumerate(patterns))
                if (
                    not compiling
                    and not _caches_across_steps(transformer)
                    and not self._plan_refuses(transformer, kwargs)
                ):
                    order = self.shared_order(layout, patterns, block, hs.device)
        info = CallInfo(layout, step, total, branch, batch, patterns, block, order, full)
        self.current = info
        return info

    def _plan_refuses(self, transformer: torch.nn.Module, kwargs: dict[str, Any]) -> bool:
        """Whether the family's shard plan refuses this forward (``ShardPlan.refuse_call``: SkyReels-V2
        diffusion forcing): its cut points then do not hold the call's per-token tensors, so the
        forward is not permuted at them either."""
        plan = self.family.shard_plan
        return plan is not None and plan.call_refusal(transformer, kwargs) is not None

    def shared_order(
        self, layout: VideoLayout, patterns: tuple[Pattern | None, ...], block: int, device: torch.device
    ) -> KernelOrder | None:
        """The kernel order every sparse layer of this forward shares, on ``device``, if the
        whole forward can run in it: the family allows it (``Family.kernel_order``), the
        patterns are static and agree on one non-trivial order, and the attention is
        vidsparse's own (not a parallel run's, not under Ulysses). Cached per (patterns, layout)."""
        if not (self.kernel_order and self.family.kernel_order) or self.ulysses > 1:
            return None
        if not accepts_kernel_order(self.attention_fn):
            return None
        sparse = tuple(dict.fromkeys(p for p in patterns if p is not None))
        if not sparse or any(p.dynamic for p in sparse):
            return None
        key = (sparse, layout, block, str(device))
        return self._orders.get_or_build(key, lambda: (_common_order(sparse, layout, block, device),))[0]

    def full_plan_layers(
        self,
        transformer: torch.nn.Module,
        kwargs: dict[str, Any],
        layout: VideoLayout,
        patterns: tuple[Pattern | None, ...],
        block: int,
        device: torch.device,
    ) -> dict[int, Pattern]:
        """Layer -> pattern of every layer whose static plan keeps every query-key pair of ``layout``
        (``SparseConfig.dense_when_full``; empty when it is off): the forward runs them with the
        model's own attention, the same result without the plan's padding, which on a small grid
        costs the sparse kernel up to several times dense. Decided once per (layout, block,
        device), on the plans the kernels would run (so the check builds nothing they would not);
        recorded in ``full_layers`` for the run's summary. Not where the model's own attention is
        itself sparse (``Family.own_attention_sparse``: it would not compute the same)."""
        own_sparse = self.family.own_attention_sparse
        if not self.config.dense_when_full or (own_sparse is not None and own_sparse(transformer, kwargs)):
            return {}
        layers = self._full.get_or_build(
            (layout, block, str(device)),
            lambda: layers_keeping_every_pair(patterns, layout, block, device, self.plan_heads(transformer) or 1),
        )
        for layer in layers:
            self.full_layers.setdefault(layer, repr(patterns[layer]))
        return {layer: patterns[layer] for layer in layers}

    def plan_heads(self, transformer: torch.nn.Module) -> int | None:
        """The heads each patched self-attention call sees (the plans' ``num_heads``): the model's
        heads, divided by the Ulysses degree under diffusers' context parallelism; None if unknown."""
        heads = getattr(getattr(transformer, "config", None), "num_attention_heads", None) or _attention_heads(
            transformer, self
        )
        if not heads:
            return None
        return int(heads) // ulysses_degree(transformer)

    def current_order(self) -> tuple[KernelOrder, VideoLayout] | None:
        """(order, layout) of the running forward when it runs in kernel order, else None."""
        info = self.current
        return None if info is None or info.order is None else (info.order, info.layout)

    def prebuild_plans(self, transformer: torch.nn.Module, device: torch.device) -> None:
        """Build this call's static plans now, outside any torch.compile region: a compiled
        graph (whole model or ``compile_repeated_blocks``) can only look plans up
        (``vidsparse.plan`` is host-side work). Under diffusers' Ulysses context parallelism the
        processors see ``heads / ulysses_degree`` heads, so those plans are built too."""
        info = self.current
        if info is None or info.layout is None or self.attention_fn is not _vidsparse_attention:
            return
        _load_backend(self.config.backend, device)  # importlib cannot run in a graph either
        heads = self.plan_heads(transformer)
        if not heads:
            return
        seen = set()
        for layer, pattern in enumerate(info.patterns):
            if pattern is None or pattern.dynamic:
                continue
            key = (pattern, layer if pattern.uses_layer else None)
            if key in seen:
                continue
            seen.add(key)
            _vidsparse_plan(
                pattern, info.layout, num_heads=heads, layer=layer, device=device, block_size=info.block_size
            )

    def pattern_for(self, layer: int) -> Pattern | None:
        info = self.current
        if info is None:
            raise RuntimeError(
                "vidsparse: a patched self-attention ran outside a transformer forward, so no token layout is "
                "known (e.g. a block called directly, or after the pipeline call ended). Call the transformer "
                "itself, or vidsparse.remove(pipe) to get the model's own processors back."
            )
        return info.patterns[layer]

    def attend(
        self, q, k, v, layout: VideoLayout, pattern: Pattern, layer: int, text_mask: torch.Tensor | None
    ) -> torch.Tensor:
        """One sparse self-attention call, through the replaceable ``attention_fn``."""
        info = self.current
        if not torch.compiler.is_compiling():  # a counter in a graph would be guarded on (recompiles)
            self.calls["sparse"] += 1
        if self.ulysses > 1:
            return _ulysses(
                self.attention_fn,
                self.ulysses,
                q,
                k,
                v,
                layout,
                pattern,
                self.config.backend,
                layer,
                text_mask,
                info.block_size,
            )
        # In a kernel-order forward, q, k, v are [B, S_pad, H, D] in the plans' order.
        ordered = {"kernel_order": True} if info.order is not None else {}
        return self.attention_fn(
            q,
            k,
            v,
            layout,
            pattern,
            backend=self.config.backend,
            layer=layer,
            text_mask=text_mask,
            block_size=info.block_size,
            **ordered,
        )

    def warn_each_run(self, key: str, message: str) -> None:
        """Warn once per pipeline call (never a quiet fallback from the second call on)."""
        if (key, self.runs) not in self._warned:
            self._warned.add((key, self.runs))
            warnings.warn(f"{message} (warned on every pipeline call; call {self.runs + 1})", stacklevel=3)

    def warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, stacklevel=3)


class VidsparseHook(ModelHook):
    """Stateful transformer hook: receives diffusers' cache context and end-of-call reset.

    The per-forward bookkeeping (``SparseState.begin_call``) does not run from this hook's
    ``pre_forward`` but from a torch forward pre-hook (``register_forward_pre_hook``) that
    ``attach`` installs on the transformer. diffusers' ``HookRegistry`` and accelerate's
    offload hooks both work by replacing ``module.forward``; ``enable_model_cpu_offload``
    removes and re-adds its hook after every pipeline call (``maybe_free_model_hooks``), which
    restores the forward it saw first and drops any wrapper installed after it. Torch's
    pre-hooks run in ``Module.__call__`` whatever ``forward`` is, so vidsparse stays active in
    every order of offloading and ``vs.apply``. This registry entry is still needed: the
    pipeline's ``cache_context`` (CFG branch, step index) and ``reset_stateful_hooks`` reach
    vidsparse through it.
    """

    _is_stateful = True

    def __init__(self, state: SparseState) -> None:
        super().__init__()
        self.state = state
        self.context_manager = empty_state_manager()
        self._signature: inspect.Signature | None = None
        self._torch_handle: torch.utils.hooks.RemovableHandle | None = None
        self._order_handles: list[torch.utils.hooks.RemovableHandle] = []
        self.forward_wrapper: Any = None  # the module.forward the registry installed for this hook

    def initialize_hook(self, module: torch.nn.Module) -> torch.nn.Module:
        self._signature = inspect.signature(type(module).forward)
        return module

    def attach(self, module: torch.nn.Module) -> None:
        """Install the torch forward pre-hook that runs the bookkeeping (once per ``__call__``),
        then, for a family that allows it, the kernel-order permutation hooks (registered after
        it: the transformer-level one reads the order the bookkeeping just chose)."""
        self._torch_handle = module.register_forward_pre_hook(self._torch_pre_hook, with_kwargs=True)
        family = self.state.family
        if family.kernel_order:
            self._order_handles = _kernel_order.install(module, family.shard_plan, self.state.current_order)

    def detach(self) -> None:
        if self._torch_handle is not None:
            self._torch_handle.remove()
            self._torch_handle = None
        for handle in self._order_handles:
            handle.remove()
        self._order_handles = []

    def _torch_pre_hook(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        # Under whole-model torch.compile this flag is traced as True (the processors then do
        # not count their calls: a counter in a graph is guarded on); the eager bookkeeping
        # counts this forward's planned calls instead.
        self._begin(module, args, kwargs, torch.compiler.is_compiling())
        return None

    @torch.compiler.disable
    def _begin(self, module: torch.nn.Module, args: tuple, kwargs: dict, compiling: bool = False) -> None:
        try:
            bound = self._signature.bind(module, *args, **kwargs).arguments
        except TypeError:
            bound = dict(kwargs)
        info = self.state.begin_call(module, bound, self.context_manager._context, compiling)
        if compiling:
            sparse = sum(p is not None for p in info.patterns)
            self.state.calls["sparse"] += sparse
            if len(info.patterns) > sparse:
                self.state.calls["dense"] += len(info.patterns) - sparse
        hs = bound.get("hidden_states")
        if isinstance(hs, torch.Tensor):
            # Always, not only under torch.compile: a regionally compiled block
            # (``compile_repeated_blocks``) runs inside an eager transformer forward and can only
            # look plans up.
            self.state.prebuild_plans(module, hs.device)

    def post_forward(self, module: torch.nn.Module, output: Any) -> Any:
        # ``current`` stays set until the next forward or reset: gradient checkpointing
        # recomputes blocks during backward, after this forward returned, and must see the
        # same layout and patterns (otherwise the recompute saves different tensors).
        return output

    def reset_state(self, module: torch.nn.Module) -> torch.nn.Module:
        self.state.tracker.reset()
        self.state.current = None
        self.state.runs += 1
        return module


def layers_keeping_every_pair(
    patterns: tuple[Pattern | None, ...],
    layout: VideoLayout,
    block: int,
    device: torch.device | str = "cpu",
    num_heads: int = 1,
) -> frozenset[int]:
    """The layers whose static pattern's plan on ``layout`` keeps every query-key pair
    (``vidsparse.work.keeps_every_pair``), one verdict per distinct plan; ``None`` and dynamic
    patterns never count. ``SparseConfig.dense_when_full`` of a single-process forward
    (``SparseState.full_plan_layers``) and of a parallel run (``parallel.model.ParallelAttention``)."""
    verdict: dict[tuple, bool] = {}
    full = set()
    for layer, pattern in enumerate(patterns):
        if pattern is None or pattern.dynamic:
            continue
        key = (pattern, layer if pattern.uses_layer else None)
        if key not in verdict:
            p = _vidsparse_plan(pattern, layout, num_heads=num_heads, layer=layer, device=device, block_size=block)
            verdict[key] = keeps_every_pair(p)
        if verdict[key]:
            full.add(layer)
    return frozenset(full)


def accepts_kernel_order(attention_fn: Callable[..., torch.Tensor]) -> bool:
    """Whether an ``attention_fn`` takes ``kernel_order=True`` calls (q/k/v [B, S_pad, H, D]):
    ``vidsparse.attention`` and wrappers that say so (``accepts_kernel_order`` attribute)."""
    return attention_fn is _vidsparse_attention or bool(getattr(attention_fn, "accepts_kernel_order", False))


def _common_order(sparse: tuple[Pattern, ...], layout: VideoLayout, block: int, device) -> KernelOrder | None:
    """The patterns' shared kernel order on ``device``; None if they differ or it is the caller order."""
    orders = [kernel_order(layout, p.video_order(layout, block), block) for p in sparse]
    first = orders[0]
    if first.identity or not all(first.same_as(o) for o in orders[1:]):
        return None
    return first.to(device)


def _attention_heads(transformer: torch.nn.Module, state: SparseState) -> int | None:
    """Heads of the patched self-attention, for transformers whose config has no
    ``num_attention_heads`` (Kandinsky 5: ``model_dim / head_dim``): diffusers ``Attention.heads``
    or Kandinsky's ``num_heads``."""
    for path in state.original_processors:
        attn = transformer.get_submodule(path)
        return getattr(attn, "heads", None) or getattr(attn, "num_heads", None)
    return None


def _load_backend(backend: str, device: torch.device) -> None:
    name = backend if backend != AUTO else ("triton" if device.type == "cuda" else "torch")
    try:
        get_backend(name).load()
    except ImportError:  # "auto" falls back to flex per call (vidsparse.attention.resolve_backend)
        get_backend("flex").load()


def _default_block(backend: str, hidden_states: torch.Tensor | None) -> int:
    """The block size ``vidsparse.attention`` would pick for this backend (its record's ``default_block``)."""
    cuda = isinstance(hidden_states, torch.Tensor) and hidden_states.is_cuda
    name = backend if backend != AUTO else ("triton" if cuda else "torch")
    return get_backend(name).default_block


def check_context_parallel(transformer: torch.nn.Module) -> int:
    """The Ulysses degree vidsparse runs under (1: no context parallelism); refuses what it cannot run.

    After diffusers' Ulysses all-to-all every rank holds the whole sequence for ``heads / N``
    heads, so a pattern runs unchanged on the local heads. Ring attention splits the sequence
    itself (each rank sees a slice of the keys), which no vidsparse pattern can plan on.
    """
    cfg = getattr(transformer, "_parallel_config", None)
    cp = getattr(cfg, "context_parallel_config", None)
    if cp is None:
        return 1
    name = type(transformer).__name__
    if int(getattr(cp, "ring_degree", 1) or 1) > 1:
        raise ValueError(
            f"vidsparse: {name} uses diffusers' ring attention (ContextParallelConfig(ring_degree="
            f"{cp.ring_degree})), which splits the key sequence across ranks; sparse patterns need every key of the "
            "video on the rank. Use ContextParallelConfig(ulysses_degree=N), or `vidsparse generate --parallel clip`."
        )
    degree = int(getattr(cp, "ulysses_degree", 1) or 1)
    if degree > 1:
        import torch.distributed as dist

        world = dist.get_world_size() if dist.is_initialized() else 1
        if degree != world:
            raise ValueError(
                f"vidsparse: ContextParallelConfig(ulysses_degree={degree}) on {world} processes; vidsparse composes "
                "with Ulysses over the whole world only (ulysses_degree = world size)."
            )
    return degree


def _ulysses(attention_fn, n, q, k, v, layout, pattern, backend, layer, text_mask, block_size):
    """Sparse attention inside diffusers' Ulysses: [B, S/N, H, D] rows of every head -> the whole
    sequence for H/N heads (all-to-all), the pattern on it, and back (all-to-all)."""
    import torch.distributed as dist

    B, s, H, D = q.shape
    if H % n:
        raise ValueError(f"vidsparse: {H} heads do not split over ulysses_degree={n}.")
    h = H // n
    x = torch.stack([q, k, v]).reshape(3, B, s, n, h, D).permute(3, 0, 1, 2, 4, 5).contiguous()
    y = torch.empty_like(x)
    dist.all_to_all_single(y, x)  # y[i]: rank i's rows, this rank's heads
    full = y.permute(1, 2, 0, 3, 4, 5).reshape(3, B, n * s, h, D)
    out = attention_fn(
        full[0],
        full[1],
        full[2],
        layout,
        pattern,
        backend=backend,
        layer=layer,
        text_mask=text_mask,
        block_size=block_size,
    )
    out = out.reshape(B, n, s, h, D).permute(1, 0, 2, 3, 4).contiguous()
    back = torch.empty_like(out)
    dist.all_to_all_single(back, out)  # back[i]: this rank's rows, rank i's heads
    return back.permute(1, 2, 0, 3, 4).reshape(B, s, H, D)


def ulysses_degree(transformer: torch.nn.Module) -> int:
    """The Ulysses degree of diffusers' context parallelism on this transformer (1 if off)."""
    cfg = getattr(transformer, "_parallel_config", None)
    cp = getattr(cfg, "context_parallel_config", None)
    return int(getattr(cp, "ulysses_degree", None) or 1)


def get_hook(transformer: torch.nn.Module) -> VidsparseHook | None:
    transformer = getattr(transformer, "_orig_mod", transformer)  # torch.compile wrapper
    registry = getattr(transformer, "_diffusers_hook", None)
    if not isinstance(registry, HookRegistry):
        return None
    hook = registry.get_hook(HOOK_NAME)
    return hook if isinstance(hook, VidsparseHook) else None
