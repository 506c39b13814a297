"""Run a diffusers video transformer across ranks: shard tokens by clip, parallel self-attention.

``parallelize(pipe, config, mode, runtime)`` prepares every transformer of a pipeline:

- diffusers ``ModelHook``s cut the token sequence into the rank's clip where the model's
  blocks start (and the RoPE tables with it) and all-gather the output projection, as
  diffusers' own ``_cp_plan`` does, but on frame boundaries with uneven clips allowed. So
  patch embedding, norms, FFN and cross-attention run on the rank's own tokens only;
- ``vidsparse.apply`` patches the self-attention processors, and its ``SparseState``
  extension points are replaced: ``discover_layout`` reports the rank's clip (what the
  processors see) and records the whole-video layout; ``attention_fn`` runs
  ``clip_attention`` or ``ulysses_attention`` on the whole-video pattern.

Attention modules whose queries every rank holds whole while their keys are the rank's video
tokens (``ShardPlan.merged_attention``: LTX-2's video->audio cross-attention) get the family's
processor for the run, attending local keys and merging rows across ranks by log-sum-exp
(``partials.merged_rows_attention``); ``unparallelize`` sets their original processors back.

Dense steps and dense layers of the ``SparseConfig`` run ``Dense()`` through the same
distributed path (the model's own processor would only see the rank's clip). ``unparallelize``
removes everything and gives the model back its original forward and processors.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from diffusers.hooks import HookRegistry, ModelHook

from vidsparse.config import SparseConfig
from vidsparse.families import families, family_of
from vidsparse.families.base import Shard, expand_paths, resolve_path, submodule
from vidsparse.layout import VideoLayout, auto_block_size
from vidsparse.parallel.clip import clip_attention
from vidsparse.parallel.comm import all_gather_uneven
from vidsparse.parallel.partials import merged_rows_attention
from vidsparse.parallel.partition import FramePartition
from vidsparse.parallel.runtime import ParallelRuntime
from vidsparse.parallel.ulysses import ulysses_attention
from vidsparse.patterns import Dense, Pattern
from vidsparse.plan import DEFAULT_BLOCK_SIZE

MODES = ("clip", "ulysses")

_SHARD_HOOK = "vidsparse_parallel_shard"
_GATHER_HOOK = "vidsparse_parallel_gather"
_MERGED_ORIGINAL = "_vidsparse_parallel_original_processor"
#: ``CommStats`` name of the partials ``ShardPlan.merged_attention`` modules all-gather (LTX-2's audio rows).
MERGED_ROWS_OP = "merged_rows"


@dataclass
class ParallelContext:
    """Per-transformer state of a parallel run (the whole-video layout of the current call)."""

    mode: str
    runtime: ParallelRuntime
    layout: VideoLayout | None = None

    def partition(self) -> FramePartition:
        if self.layout is None:
            raise RuntimeError(
                "vidsparse.parallel: a sharded module ran outside a transformer forward (no layout known)."
            )
        return FramePartition(self.layout.frames, self.runtime.world_size)

    def cut(self, x: Any, spec: Shard | tuple[Shard, ...]) -> Any:
        if isinstance(x, (tuple, list)):
            return type(x)(self.cut(t, spec) for t in x)
        if not isinstance(x, torch.Tensor):
            return x
        spec = _matching(spec, x)
        if spec is None:
            return x
        layout = self.layout
        n = x.shape[spec.dim]
        a, b = self.partition().bounds[self.runtime.rank]
        if spec.per_frame:
            if n != layout.frames:
                raise ValueError(
                    f"vidsparse.parallel: expected one entry per latent frame ({layout.frames}, {layout}) along dim "
                    f"{spec.dim}, got a tensor of shape {tuple(x.shape)}."
                )
            return x.narrow(spec.dim, a, b - a)
        if n != layout.video_len:
            raise ValueError(
                f"vidsparse.parallel: expected {layout.video_len} video tokens ({layout}) along dim {spec.dim}, "
                f"got a tensor of shape {tuple(x.shape)}. This model's token sequence does not match its grid."
            )
        hw = layout.tokens_per_frame
        return x.narrow(spec.dim, a * hw, (b - a) * hw)

    def join(self, x: torch.Tensor, spec: Shard) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() != spec.ndim:
            return x
        sizes = list(self.partition().video_token_counts(self.layout))
        parts = all_gather_uneven(x, sizes, self.runtime, dim=spec.dim, op="gather_output")
        return torch.cat(parts, dim=spec.dim)


def _matching(spec: Shard | tuple[Shard, ...], x: torch.Tensor) -> Shard | None:
    """The ``Shard`` (of a spec's alternatives) whose ``ndim`` is the tensor's, else None (left whole)."""
    for option in spec if isinstance(spec, tuple) else (spec,):
        if x.dim() == option.ndim:
            return option
    return None


class _ShardHook(ModelHook):
    """Cuts named inputs before a module runs and indexed outputs after it."""

    def __init__(self, ctx: ParallelContext, inputs: Mapping[str, Shard], outputs: Mapping[int, Shard]) -> None:
        super().__init__()
        self.ctx, self.inputs, self.outputs = ctx, dict(inputs), dict(outputs)
        self._signature: inspect.Signature | None = None

    def initialize_hook(self, module):
        self._signature = inspect.signature(module.forward)
        return module

    def pre_forward(self, module, *args, **kwargs):
        if not self.inputs:
            return args, kwargs
        bound = self._signature.bind_partial(*args, **kwargs)
        for name, spec in self.inputs.items():
            if name in bound.arguments:
                bound.arguments[name] = self.ctx.cut(bound.arguments[name], spec)
        return bound.args, bound.kwargs

    def post_forward(self, module, output):
        if not self.outputs:
            return output
        if isinstance(output, torch.Tensor):
            return self.ctx.cut(output, self.outputs[0]) if 0 in self.outputs else output
        items = list(output)
        for i, spec in self.outputs.items():
            items[i] = self.ctx.cut(items[i], spec)
        return type(output)(items) if isinstance(output, tuple) else items


class _GatherHook(ModelHook):
    def __init__(self, ctx: ParallelContext, spec: Shard) -> None:
        super().__init__()
        self.ctx, self.spec = ctx, spec

    def post_forward(self, module, output):
        return self.ctx.join(output, self.spec)


class ParallelAttention:
    """``SparseState.attention_fn`` of a parallel run: whole-video pattern, distributed kernel."""

    def __init__(self, ctx: ParallelContext, state, user_config: SparseConfig, dense_layers: frozenset[int]) -> None:
        from vidsparse.pipelines.hooks import SparseState, StepTracker

        self.ctx, self.state, self.dense_layers = ctx, state, dense_layers
        self.used: dict[int, tuple[Pattern, int | None]] = {}  # layer -> (pattern, block), sparse preferred
        self.sparse_steps: set[int] = set()  # step indices with at least one sparse layer
        # Layers run as Dense() because their plan kept every pair (SparseConfig.dense_when_full):
        # layer -> the pattern's repr, for the summary; and those layers per (grid, block).
        self.full_layers: dict[int, str] = {}
        self._full: dict[tuple, frozenset[int]] = {}
        # The user's schedule decides dense steps; the patched state itself never runs dense.
        self.schedule = SparseState(
            config=user_config,
            family=state.family,
            num_layers=state.num_layers,
            dense_layers=dense_layers,
            tracker=StepTracker(),
            pipeline_ref=state.pipeline_ref,
            two_stage=state.two_stage,
        )

    def pattern(self, layer: int, layout: VideoLayout) -> tuple[Pattern, int | None]:
        info = self.state.current
        block = self.state.config.block_size or auto_block_size(layout)
        if layer in self.dense_layers or self.schedule.dense_step(info.step, info.total_steps):
            return Dense(), block
        patterns = self.state.layer_patterns(layout, block)
        pattern = patterns[layer]
        if isinstance(pattern, Dense):
            return pattern, block
        if layer in self._full_layers_of(patterns, layout, block):
            self.full_layers.setdefault(layer, repr(pattern))
            return Dense(), block
        self.sparse_steps.add(info.step)
        return pattern, block

    def _full_layers_of(self, patterns, layout: VideoLayout, block: int | None) -> frozenset[int]:
        """The user's ``dense_when_full``: layers whose static plan keeps every pair of the whole video
        run the distributed Dense() (the same result, none of the plan's padding). Once per grid."""
        if not self.schedule.config.dense_when_full:
            return frozenset()
        key = (layout, block)
        if key not in self._full:
            from vidsparse.pipelines.hooks import layers_keeping_every_pair

            self._full[key] = layers_keeping_every_pair(patterns, layout, block or DEFAULT_BLOCK_SIZE)
        return self._full[key]

    def __call__(self, q, k, v, layout, pattern, backend="auto", layer=0, text_mask=None, block_size=None, scale=None):
        whole = self.ctx.layout
        pat, block = self.pattern(layer, whole)
        if layer not in self.used or isinstance(self.used[layer][0], Dense):
            self.used[layer] = (pat, block)
        fn = clip_attention if self.ctx.mode == "clip" else ulysses_attention
        return fn(
            q,
            k,
            v,
            whole,
            pat,
            self.ctx.runtime,
            backend=backend,
            layer=layer,
            text_mask=text_mask,
            scale=scale,
            block_size=block,
        )


def parallelize(target: Any, config: SparseConfig | Pattern | str, mode: str, runtime: ParallelRuntime) -> Any:
    """Prepare every transformer of ``target`` (pipeline or transformer) for ``mode`` on ``runtime``.

    ``config`` is what ``vidsparse.apply`` takes. Every rank must call this with the same
    arguments, then run the same pipeline call with the same seed.
    """
    from vidsparse.pipelines import apply, as_config, get_state, layer_schedule, remove, transformers_of

    if mode not in MODES:
        raise ValueError(f"parallel mode must be one of {MODES}, got {mode!r}.")
    user_cfg = as_config(config)
    found = transformers_of(target)
    for _, transformer in found:
        family = family_of(transformer)
        if family.shard_plan is None:
            supported = sorted(f.name for f in families() if f.shard_plan is not None)
            raise ValueError(
                f"vidsparse.parallel supports the {', '.join(supported)} transformer families; "
                f"{type(transformer).__name__} ({family.name}) is not supported yet ({family.parallel_refusal}). "
                "Run it on one GPU."
            )
        reason = family.shard_plan.refuse(transformer) if family.shard_plan.refuse is not None else None
        if reason:
            raise ValueError(
                f"vidsparse.parallel cannot split this {type(transformer).__name__} ({family.name}): {reason}. "
                "Run it on one GPU."
            )
    unparallelize(target)
    remove(target)
    contexts = {}
    for attr, transformer in found:
        ctx = ParallelContext(mode, runtime)
        contexts[attr] = ctx
        plan = family_of(transformer).require_shard_plan()
        inputs, outputs = expand_paths(transformer, plan.inputs), expand_paths(transformer, plan.outputs)
        for path in sorted(set(inputs) | set(outputs)):
            module = submodule(transformer, path)
            registry = HookRegistry.check_if_exists_or_initialize(module)
            registry.register_hook(_ShardHook(ctx, inputs.get(path, {}), outputs.get(path, {})), _SHARD_HOOK)
        for path, spec in plan.gather.items():
            registry = HookRegistry.check_if_exists_or_initialize(
                submodule(transformer, resolve_path(transformer, path))
            )
            registry.register_hook(_GatherHook(ctx, spec), _GATHER_HOOK)
    # Every step and layer goes through the distributed attention; the user's dense schedule and
    # dense_when_full are applied inside it (ParallelAttention) with Dense().
    all_sparse = dataclasses.replace(
        user_cfg, dense_first_steps=0, dense_last_steps=0, dense_layers=(), dense_when_full=False
    )
    apply(target, all_sparse)
    for attr, transformer in found:
        state = get_state(transformer)
        ctx = contexts[attr]
        dense = layer_schedule(user_cfg, state.family, state.num_layers)[0]
        state.attention_fn = ParallelAttention(ctx, state, user_cfg, dense)
        default = state.default_discover_layout
        shard_plan = state.family.require_shard_plan()

        def discover(module, kwargs, _ctx=ctx, _default=default, _plan=shard_plan):
            reason = _plan.call_refusal(module, kwargs)
            if reason:
                raise ValueError(
                    f"vidsparse.parallel cannot split this {type(module).__name__} call: {reason}. Run it on one GPU."
                )
            whole = _default(module, kwargs)
            if whole is None:
                raise ValueError(
                    f"vidsparse.parallel: could not read the token grid of this {type(module).__name__} call, "
                    "so it cannot be split across ranks."
                )
            _ctx.layout = whole
            return FramePartition(whole.frames, _ctx.runtime.world_size).local_layout(whole, _ctx.runtime.rank)

        state.discover_layout = discover
        if shard_plan.merged_attention is not None:
            attend = functools.partial(_merged_rows, runtime=runtime)
            for module, processor in shard_plan.merged_attention(transformer, attend):
                setattr(module, _MERGED_ORIGINAL, module.processor)
                module.set_processor(processor)
    return target


def _merged_rows(q, k, v, scale=None, *, runtime: ParallelRuntime) -> torch.Tensor:
    """``ShardPlan.merged_attention``'s ``attend``: replicated queries over every rank's keys."""
    return merged_rows_attention(q, k, v, runtime, scale=scale, op=MERGED_ROWS_OP)


def unparallelize(target: Any) -> Any:
    """Remove the sharding hooks and vidsparse's processors from every transformer of ``target``."""
    from vidsparse.pipelines import remove, transformers_of

    for _, transformer in transformers_of(target):
        for _, module in transformer.named_modules():
            original = module.__dict__.pop(_MERGED_ORIGINAL, None)
            if original is not None:
                module.set_processor(original)
            registry = getattr(module, "_diffusers_hook", None)
            if isinstance(registry, HookRegistry):
                for name in (_SHARD_HOOK, _GATHER_HOOK):
                    if registry.get_hook(name) is not None:
                        registry.remove_hook(name, recurse=False)
    remove(target)
    return target
