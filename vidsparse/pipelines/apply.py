"""``vidsparse.apply`` / ``vidsparse.remove``: patch a diffusers pipeline or transformer.

Built like diffusers' own accelerators (``apply_first_block_cache``): a config dataclass, a
stateful ``ModelHook`` on the transformer (``hooks.VidsparseHook``) and ``set_processor`` on
the self-attention modules only. No diffusers class is modified; ``remove`` unregisters the
hook and puts the original processor objects back, so the model computes exactly what it
computed before.
"""

from __future__ import annotations

import warnings
import weakref
from typing import Any

import torch
from diffusers.hooks import HookRegistry

from vidsparse.config import SparseConfig
from vidsparse.families import Family, family_of
from vidsparse.layout import VideoLayout
from vidsparse.patterns import PATTERNS, Pattern
from vidsparse.pipelines.hooks import (
    HOOK_NAME,
    SparseState,
    StepTracker,
    VidsparseHook,
    check_context_parallel,
    get_hook,
    named_pattern,
)

_TRANSFORMER_ATTRS = ("transformer", "transformer_2")


def as_config(config: SparseConfig | Pattern | str) -> SparseConfig:
    if isinstance(config, SparseConfig):
        return config
    if isinstance(config, (Pattern, str)):
        return SparseConfig(config)
    raise TypeError(
        "vidsparse.apply expects a SparseConfig, a pattern object or a pattern name (e.g. 'radial'), "
        f"got {type(config).__name__}."
    )


def _is_pipeline(obj: Any) -> bool:
    return not isinstance(obj, torch.nn.Module) and hasattr(obj, "components")


def _unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """The module under ``torch.compile``'s wrapper (hooks and processors live on it)."""
    return getattr(module, "_orig_mod", module)


def transformers_of(target: Any) -> list[tuple[str, torch.nn.Module]]:
    """(attribute name, transformer) pairs of a pipeline, or [("transformer", target)]."""
    if isinstance(target, torch.nn.Module):
        return [("transformer", _unwrap(target))]
    if _is_pipeline(target):
        found = [(a, _unwrap(getattr(target, a))) for a in _TRANSFORMER_ATTRS if getattr(target, a, None) is not None]
        if not found:
            raise ValueError(
                f"{type(target).__name__} holds no transformer (pipe.transformer / pipe.transformer_2 are None); "
                "vidsparse patches video diffusion transformers."
            )
        return found
    raise TypeError(
        "vidsparse.apply / remove expect a diffusers pipeline or a transformer (torch.nn.Module), "
        f"got {type(target).__name__}."
    )


def _resolve_layers(layers: tuple[int, ...], num_layers: int, what: str) -> frozenset[int]:
    return frozenset(_layer_index(layer, num_layers, what) for layer in layers)


def _layer_index(layer: int, num_layers: int, what: str) -> int:
    idx = layer + num_layers if layer < 0 else layer
    if not 0 <= idx < num_layers:
        raise ValueError(
            f"SparseConfig.{what} has layer {layer}, but the transformer has {num_layers} self-attention "
            f"layers (valid: 0..{num_layers - 1}, or -{num_layers}..-1 from the end)."
        )
    return idx


def layer_schedule(
    cfg: SparseConfig, family: Family, num_layers: int
) -> tuple[frozenset[int], dict[int, Pattern | str]]:
    """(dense layers, {layer: pattern}) of ``cfg`` on a transformer of ``num_layers``, 0-based.

    Negative indices count from the end in both fields. A layer named twice in
    ``layer_patterns`` (``1`` and ``-1`` of two layers), or in both fields, is an error; a
    layer the family keeps dense by default but that ``layer_patterns`` names runs the
    pattern it was given (the explicit setting wins over the default).
    """
    patterns: dict[int, Pattern | str] = {}
    for layer, pattern in cfg.layer_patterns.items():
        idx = _layer_index(layer, num_layers, "layer_patterns")
        if idx in patterns:
            raise ValueError(
                f"SparseConfig.layer_patterns names layer {idx} twice (as {idx - num_layers} and {idx} of "
                f"{num_layers} layers); keep one of the two keys."
            )
        patterns[idx] = pattern
    if cfg.dense_layers is None:
        default = family.default_schedule(cfg.pattern_name)[1]
        dense = {i + num_layers if i < 0 else i for i in default} - set(patterns)
        return frozenset(i for i in dense if 0 <= i < num_layers), patterns
    dense = _resolve_layers(cfg.dense_layers, num_layers, "dense_layers")
    both = sorted(dense & set(patterns))
    if both:
        raise ValueError(
            f"Layers {both} are both in dense_layers and layer_patterns (negative indices counted from the "
            f"end of the {num_layers} layers); a layer is either dense or runs its own pattern. Remove them "
            "from one of the two."
        )
    return dense, patterns


def _check_pattern_runs(pattern: Pattern | str, family: Family) -> None:
    """Reject patterns this family cannot run, before any forward. A pattern class may declare
    ``families`` (family names) or ``text_positions`` ("none", "before", "after") it supports."""
    cls = PATTERNS[pattern] if isinstance(pattern, str) else type(pattern)
    if not cls.dynamic and cls.video_mask is Pattern.video_mask:
        raise ValueError(
            f"{cls.__name__} defines neither video_mask (static patterns) nor dynamic=True with dynamic_plan; "
            "vidsparse cannot plan it."
        )
    families = cls.families
    if families is not None and family.name not in families:
        raise ValueError(
            f"{cls.__name__} supports the model families {tuple(families)}, not {family.name!r}. "
            "Pick another pattern for this model."
        )
    positions = cls.text_positions
    if positions is not None and family.text_position not in positions:
        raise ValueError(
            f"{cls.__name__} handles text spans {tuple(positions)}, but {family.name} attends "
            f"{'text ' + family.text_position + ' the video' if family.text_position != 'none' else 'video only'} "
            "in self-attention. Pick another pattern for this model."
        )


# A grid to build named patterns on at apply time (Wan2.1's 81x480x832 latent): pattern options
# are checked when the pattern is built, and the call's real grid is not known until the forward.
_NOMINAL_LAYOUT = VideoLayout(21, 30, 52)


def _check_pattern_options(pattern: Pattern | str, cfg: SparseConfig, family: Family) -> None:
    """Build a named pattern with the config's options once, so a bad value (a negative decay,
    a zero kernel) fails at ``vs.apply``, before a pipeline encodes its prompt. Only the
    pattern's own construction is checked here; whether it fits a grid is checked per call."""
    if isinstance(pattern, str) and cfg.options_for(pattern):
        named_pattern(cfg, family, pattern, _NOMINAL_LAYOUT, cfg.block_size)


def _warn_all_dense(
    cfg: SparseConfig,
    family: Family,
    dense: frozenset[int],
    layer_patterns: dict[int, Pattern | str],
    num_layers: int,
    what: str,
) -> None:
    """A schedule that leaves nothing sparse is almost always a mistake (a step count meant as a
    fraction, the wrong layers): say so once, at apply time, rather than run silently dense."""
    if cfg.pattern_name == "dense" and not layer_patterns:
        return
    if len(dense) >= num_layers:
        warnings.warn(
            f"vidsparse: SparseConfig.dense_layers cover all {num_layers} self-attention layers of this {what}, "
            "so every call runs dense attention. Leave some layers out of SparseConfig.dense_layers.",
            stacklevel=3,
        )
    default_first = family.default_schedule(cfg.pattern_name)[0]
    first, last, total = cfg.dense_first_steps, cfg.dense_last_steps, cfg.num_inference_steps
    if cfg.fractions_cover_every_step:
        warnings.warn(
            f"vidsparse: SparseConfig.dense_first_steps={first} and SparseConfig.dense_last_steps={last} together "
            "cover every denoising step, so every call runs dense attention. Lower one of them.",
            stacklevel=3,
        )
    elif cfg.all_dense_known_at_apply(total, default_first):
        n_first, n_last = cfg.dense_step_counts(total, default_first)
        warnings.warn(
            f"vidsparse: {n_first} dense first and {n_last} dense last steps (SparseConfig.dense_first_steps="
            f"{'the family default ' + str(default_first) if first is None else first}, "
            f"SparseConfig.dense_last_steps={last}) cover all {total} denoising steps, so every call "
            "runs dense attention. Lower one of them (or pass a fraction, e.g. 0.25).",
            stacklevel=3,
        )


def _check_processors(family: Family, paths: list[tuple[str, torch.nn.Module, int]]) -> None:
    for path, module, _ in paths:
        proc = getattr(module, "processor", None)
        name = type(proc).__name__
        if name not in family.processor_names:
            raise ValueError(
                f"{path} uses the attention processor {name}, but vidsparse mirrors diffusers' "
                f"{' / '.join(family.processor_names)} for {family.name}. Restore the default processors "
                "(e.g. transformer.set_default_attn_processor() or the other plugin's remove) first."
            )


def apply(target: Any, config: SparseConfig | Pattern | str) -> Any:
    """Make the self-attention of every transformer in ``target`` sparse; returns ``target``.

    ``target`` is a diffusers pipeline (``transformer`` and, for Wan 2.2, ``transformer_2``
    are patched) or one transformer. ``config`` is a ``SparseConfig``, a pattern object or a
    pattern name (family defaults). Applying again replaces the previous configuration.
    All checks run here, before any forward: unsupported transformers, unknown pattern
    names, patterns the family cannot run, bad layer indices, missing step counts.
    """
    cfg = as_config(config)
    pipeline = target if _is_pipeline(target) else None
    found = transformers_of(target)
    plans = []
    for attr, transformer in found:
        family = family_of(transformer)
        if family.unsupported:
            raise ValueError(f"vidsparse cannot patch a {type(transformer).__name__}: {family.unsupported}.")
        paths = family.attention_paths(transformer)
        num_layers = len(paths)
        if get_hook(transformer) is None:
            _check_processors(family, paths)
        if check_context_parallel(transformer) > 1 and getattr(transformer, "_cp_plan", None) is None:
            raise ValueError(
                f"{type(transformer).__name__} has no _cp_plan: diffusers' context parallelism does not "
                "split it, so vidsparse cannot run under it."
            )
        dense, layer_patterns = layer_schedule(cfg, family, num_layers)
        for pattern in (cfg.pattern, *cfg.layer_patterns.values()):
            _check_pattern_runs(pattern, family)
            _check_pattern_options(pattern, cfg, family)
        _warn_all_dense(cfg, family, dense, layer_patterns, num_layers, type(transformer).__name__)
        first, last = cfg.dense_first_steps, cfg.dense_last_steps
        need = [f"SparseConfig.dense_last_steps={last!r}"] if last else []  # counted back from the end
        if isinstance(first, float) and first > 0:
            need.append(f"SparseConfig.dense_first_steps={first!r} (a fraction)")
        if pipeline is None and cfg.num_inference_steps is None and need:
            raise ValueError(
                "vidsparse was applied to a bare transformer, so the number of denoising steps is unknown, but "
                f"{' and '.join(need)} {'need' if len(need) > 1 else 'needs'} it. Pass "
                "SparseConfig(num_inference_steps=...) or apply vidsparse to the pipeline."
            )
        plans.append((attr, transformer, family, paths, dense, layer_patterns))

    tracker = StepTracker()
    pipe_ref = weakref.ref(pipeline) if pipeline is not None else None
    two_stage = pipeline is not None and getattr(pipeline, "transformer_2", None) is not None
    for _, transformer, family, paths, dense, layer_patterns in plans:
        remove_from(transformer)
        state = SparseState(
            config=cfg,
            family=family,
            num_layers=len(paths),
            dense_layers=dense,
            layer_patterns_by_index=layer_patterns,
            tracker=tracker,
            pipeline_ref=pipe_ref,
            two_stage=two_stage,
        )
        registry = HookRegistry.check_if_exists_or_initialize(transformer)
        hook = VidsparseHook(state)
        registry.register_hook(hook, HOOK_NAME)
        hook.forward_wrapper = transformer.__dict__.get("forward")
        hook.attach(transformer)
        for path, module, layer in paths:
            original = module.processor
            state.original_processors[path] = original
            _set_processor(module, family.processor(original, layer, state))
    return target


def _set_processor(module: torch.nn.Module, processor: Any) -> None:
    if hasattr(module, "set_processor"):
        module.set_processor(processor)
    else:  # MochiAttention has no set_processor
        module.processor = processor


def remove_from(transformer: torch.nn.Module) -> bool:
    """Undo ``apply`` on one transformer; True if it was patched."""
    hook = get_hook(transformer)
    if hook is None:
        return False
    modules = dict(transformer.named_modules())
    for path, original in hook.state.original_processors.items():
        _set_processor(modules[path], original)
    hook.detach()
    _unregister(transformer, hook)
    return True


def _unregister(transformer: torch.nn.Module, hook: VidsparseHook) -> None:
    """Remove the registry entry without disturbing forward wrappers installed after it.

    ``HookRegistry.remove_hook`` sets ``module.forward`` back to the forward it wrapped when
    vidsparse was its last hook. If accelerate wrapped the transformer afterwards
    (``vs.apply`` then ``enable_model_cpu_offload``), that would drop the offload hook; if
    accelerate had already re-installed itself below (offload then ``vs.apply``, after one
    pipeline call), it would put a stale forward back. Here the outer forward is kept and
    only the link that pointed at vidsparse's wrapper (accelerate's ``_old_forward``) is
    re-pointed at what vidsparse wrapped.
    """
    below = hook.fn_ref.forward  # what vidsparse's registry wrapper called
    outer = transformer.__dict__.get("forward")
    transformer._diffusers_hook.remove_hook(HOOK_NAME, recurse=False)
    wrapper = hook.forward_wrapper
    if wrapper is None or outer is wrapper:
        return  # vidsparse was outermost: remove_hook did the right thing
    if outer is None:
        transformer.__dict__.pop("forward", None)
    else:
        transformer.forward = outer
    if transformer.__dict__.get("_old_forward") is wrapper:  # accelerate's hook sits above vidsparse
        transformer._old_forward = below


def remove(target: Any) -> Any:
    """Give every transformer of ``target`` back its original processors and forward. A supported
    transformer that was never patched is left as it is; any other module is refused, as by
    ``apply`` (it is a mistake: the wrong object was passed)."""
    for _, transformer in transformers_of(target):
        if not remove_from(transformer):
            family_of(transformer)  # raises for a module that is no supported video transformer
    return target


def get_state(transformer: torch.nn.Module) -> SparseState:
    """The ``SparseState`` of a patched transformer (``attention_fn``, ``discover_layout``, counters)."""
    hook = get_hook(transformer)
    if hook is None:
        raise ValueError(f"This {type(transformer).__name__} is not patched by vidsparse; call vidsparse.apply first.")
    return hook.state


def reset_state(target: Any) -> None:
    """Forget step counters (a new generation starts at step 0); pipelines do it after each call."""
    for _, transformer in transformers_of(target):
        hook = get_hook(transformer)
        if hook is not None:
            hook.reset_state(transformer)


def is_applied(target: Any) -> bool:
    return any(get_hook(t) is not None for _, t in transformers_of(target))
