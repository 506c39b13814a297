"""SparseConfig: what ``vidsparse.apply`` should do to a pipeline's transformers.

A frozen dataclass in the style of diffusers' own accelerator configs
(``FirstBlockCacheConfig``, ``PyramidAttentionBroadcastConfig``). Fields left at ``None``
take the model family's default (see ``docs/integration.md``), so
``SparseConfig("radial")`` on Wan gives Radial with Wan's decay, sink, dense warm-up and
dense first layer, while every explicit value is used as given.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from vidsparse.kernels.backends import backend_choices
from vidsparse.patterns import PATTERNS, Pattern, normalize_pattern_name


def _check_pattern(value: Any, what: str) -> Pattern | str:
    if isinstance(value, Pattern):
        return value
    if isinstance(value, str):
        key = normalize_pattern_name(value)
        if key not in PATTERNS:
            raise ValueError(
                f"Unknown pattern {value!r} for {what}. Expected a vidsparse pattern object or one of: "
                f"{', '.join(sorted(PATTERNS))}."
            )
        return key
    raise TypeError(
        f"{what} must be a vidsparse pattern (e.g. vidsparse.make_pattern('radial')) or a pattern name "
        f"such as 'radial', got {type(value).__name__}."
    )


def _check_steps(value: Any, name: str, allow_none: bool) -> int | float | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(
            f"SparseConfig.{name} must be an int number of steps (e.g. 12) or a fraction of the steps "
            f"in [0, 1) (e.g. 0.25), got {value!r}."
        )
    if isinstance(value, float):
        if not math.isfinite(value) or not 0.0 <= value < 1.0:
            raise ValueError(
                f"SparseConfig.{name} as a float is a fraction of the denoising steps and must be in "
                f"[0, 1), got {value!r}. Pass an int for a step count (e.g. {max(1, int(value))})."
            )
        return value
    if value < 0:
        raise ValueError(f"SparseConfig.{name} must be >= 0 steps, got {value}.")
    return value


def _check_option_names(options: Mapping[str, Any], names: list[str]) -> None:
    """Every key of ``pattern_options`` must be an option of a named pattern; caught here, at
    ``SparseConfig``/``vs.apply`` time, instead of at the first forward. Values are checked when the
    pattern is built with the family defaults (they may depend on them, e.g. GNA stride vs kernel)."""
    if not options or not names:
        return
    names = sorted(set(names))
    fields = {name: {f.name for f in dataclasses.fields(PATTERNS[name]) if f.init} for name in names}
    known = set().union(*fields.values())
    unknown = sorted(str(k) for k in options if k not in known)
    if unknown:
        raise ValueError(
            f"SparseConfig.pattern_options has {', '.join(repr(k) for k in unknown)}, which "
            f"{'is not an option' if len(unknown) == 1 else 'are not options'} of "
            f"{' / '.join(names)}. Valid options: {', '.join(sorted(known)) or '(none)'}."
        )
    for key in options:
        owners = [name for name in names if key in fields[name]]
        if len(owners) > 1:
            raise ValueError(
                f"SparseConfig.pattern_options[{key!r}] is an option of {' and '.join(owners)}, which this config "
                "both names, so it is unclear which one it is for. Give the per-layer pattern as an object "
                f"with its own options instead, e.g. layer_patterns={{3: vidsparse.make_pattern({owners[-1]!r}, "
                f"{key}=...)}}."
            )


def steps_from(value: int | float, total: int | None, name: str) -> int:
    """Step count of an int or a fraction of ``total`` (rounded half up)."""
    if isinstance(value, int):
        return value
    if total is None:
        raise ValueError(
            f"SparseConfig.{name}={value} is a fraction of the denoising steps, but the number of steps is "
            "unknown: apply vidsparse to the pipeline (it reads pipe.scheduler.timesteps) or pass "
            "SparseConfig(num_inference_steps=...) when applying to a bare transformer."
        )
    return int(math.floor(value * total + 0.5))


@dataclass(frozen=True)
class SparseConfig:
    """How to sparsify the self-attention of a video transformer.

    Args:
        pattern: a pattern object (``vidsparse.make_pattern("gna", kernel_size=...)``) or a name
            ("dense", "radial", "tile", "attention-tile", "gna", "vmoba", ...); a name gets the
            model family's default options, adapted to each call's grid.
        dense_first_steps: denoising steps (int) or fraction of the steps (float < 1) that run
            the model's own dense attention first. ``None``: family default (25 % of the steps
            for sparse patterns, as in Radial/STA/VMoBA).
        dense_last_steps: likewise for the last steps (needs the total: read from the pipeline's
            scheduler, or ``num_inference_steps`` for a bare transformer).
        dense_layers: layer indices (negative counts from the end) that stay dense. ``None``:
            family default (Radial on Wan keeps layer 0 dense, as its scripts do; else none).
        layer_patterns: ``{layer: pattern or name}`` overriding ``pattern`` per layer.
        backend: "auto" (triton on CUDA, torch elsewhere), "torch", "flex" or "triton".
        block_size: kernel block size; ``None`` = backend default, smaller (next power of two
            >= tokens per frame, at least 16) when a frame has fewer than 128 tokens.
        num_inference_steps: total steps, used only when the pipeline cannot tell (bare
            transformer) and a fraction or ``dense_last_steps`` needs it.
        pattern_options: options for a pattern *name*, replacing the family defaults
            (e.g. ``{"decay_factor": 0.5}`` with ``"radial"``); with several names (``pattern``
            and ``layer_patterns``) each pattern takes the keys that are its own options.
        dense_when_full: a layer whose static plan keeps every query-key pair of the call's grid
            (a window as large as a small grid) computes exactly dense attention, and the sparse
            kernel would compute the plan's padding too (up to several times dense on tiny
            grids); ``True`` runs such layers with the model's own attention, the same result
            at dense cost. ``False`` runs the sparse kernel anyway (to test or time the kernel
            inside a model; ``VIDSPARSE_DENSE_WHEN_FULL=0`` makes ``False`` the default, e.g. for
            ``vidsparse generate``). Dynamic patterns (VMoBA) always run their kernel; vidsparse's
            clip- and Ulysses-parallel runs give such layers their distributed dense attention.
    """

    pattern: Pattern | str
    dense_first_steps: int | float | None = None
    dense_last_steps: int | float = 0
    dense_layers: tuple[int, ...] | None = None
    layer_patterns: Mapping[int, Pattern | str] = field(default_factory=dict)
    backend: str = "auto"
    block_size: int | None = None
    num_inference_steps: int | None = None
    pattern_options: Mapping[str, Any] = field(default_factory=dict)
    dense_when_full: bool = field(default_factory=lambda: os.environ.get("VIDSPARSE_DENSE_WHEN_FULL", "1") != "0")

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "pattern", _check_pattern(self.pattern, "SparseConfig.pattern"))
        set_(self, "dense_first_steps", _check_steps(self.dense_first_steps, "dense_first_steps", True))
        set_(self, "dense_last_steps", _check_steps(self.dense_last_steps, "dense_last_steps", False))
        if self.dense_layers is not None:
            layers = self.dense_layers
            if isinstance(layers, int) and not isinstance(layers, bool):
                raise TypeError(
                    f"SparseConfig.dense_layers must be a sequence of layer indices, got the int {layers}; "
                    f"for the first {layers} layers pass tuple(range({layers}))."
                )
            if not isinstance(layers, (tuple, list, range, set, frozenset)) or not all(
                isinstance(i, int) and not isinstance(i, bool) for i in layers
            ):
                raise TypeError(f"SparseConfig.dense_layers must be a tuple of int layer indices, got {layers!r}.")
            set_(self, "dense_layers", tuple(sorted(set(layers))))
        if not isinstance(self.layer_patterns, Mapping):
            raise TypeError(
                f"SparseConfig.layer_patterns must be a dict {{layer: pattern}}, got {type(self.layer_patterns).__name__}."
            )
        lp = {}
        for layer, pat in self.layer_patterns.items():
            if not isinstance(layer, int) or isinstance(layer, bool):
                raise TypeError(f"SparseConfig.layer_patterns keys must be int layer indices, got {layer!r}.")
            lp[layer] = _check_pattern(pat, f"SparseConfig.layer_patterns[{layer}]")
        set_(self, "layer_patterns", MappingProxyType(lp))
        if self.dense_layers and set(self.dense_layers) & set(lp):
            both = sorted(set(self.dense_layers) & set(lp))
            raise ValueError(
                f"Layers {both} are both in dense_layers and layer_patterns; a layer is either dense or "
                "runs its own pattern. Remove them from one of the two."
            )
        if self.backend not in backend_choices():
            raise ValueError(f"SparseConfig.backend must be one of {backend_choices()}, got {self.backend!r}.")
        b = self.block_size
        if b is not None and (isinstance(b, bool) or not isinstance(b, int) or b < 1 or b & (b - 1)):
            raise ValueError(
                f"SparseConfig.block_size must be a power of two (e.g. 64, 128), got {b!r}; leave it unset for the "
                "block that fits the grid."
            )
        n = self.num_inference_steps
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            raise ValueError(f"SparseConfig.num_inference_steps must be None or an int >= 1, got {n!r}.")
        if not isinstance(self.pattern_options, Mapping):
            raise TypeError(
                f"SparseConfig.pattern_options must be a dict of pattern options, got {type(self.pattern_options).__name__}."
            )
        named = isinstance(self.pattern, str) or any(isinstance(p, str) for p in lp.values())
        if self.pattern_options and not named:
            raise ValueError(
                "SparseConfig.pattern_options apply to patterns given by name only; the pattern objects given "
                "already carry their options. Pass the name (e.g. 'radial') with pattern_options, or set the "
                "options on the object."
            )
        if not isinstance(self.dense_when_full, bool):
            raise TypeError(
                f"SparseConfig.dense_when_full must be True or False, got {type(self.dense_when_full).__name__} "
                f"{self.dense_when_full!r}."
            )
        _check_option_names(self.pattern_options, [p for p in (self.pattern, *lp.values()) if isinstance(p, str)])
        set_(self, "pattern_options", MappingProxyType(dict(self.pattern_options)))

    def __hash__(self) -> int:
        return hash(
            (
                self.pattern,
                self.dense_first_steps,
                self.dense_last_steps,
                self.dense_layers,
                tuple(sorted(self.layer_patterns.items())),
                self.backend,
                self.block_size,
                self.num_inference_steps,
                tuple(sorted((k, repr(v)) for k, v in self.pattern_options.items())),
                self.dense_when_full,
            )
        )

    def options_for(self, name: str) -> dict[str, Any]:
        """The entries of ``pattern_options`` that are options of pattern ``name`` (each key
        belongs to exactly one of the named patterns, checked at construction)."""
        fields = {f.name for f in dataclasses.fields(PATTERNS[normalize_pattern_name(name)]) if f.init}
        return {k: v for k, v in self.pattern_options.items() if k in fields}

    def dense_step_counts(self, total: int, default_first: int | float) -> tuple[int, int]:
        """(dense first, dense last) steps of a run of ``total`` steps; ``default_first`` stands in
        for ``dense_first_steps=None`` (the family's warm-up)."""
        first = default_first if self.dense_first_steps is None else self.dense_first_steps
        return (
            steps_from(first, total, "dense_first_steps"),
            steps_from(self.dense_last_steps, total, "dense_last_steps") if self.dense_last_steps else 0,
        )

    @property
    def fractions_cover_every_step(self) -> bool:
        """Both dense step counts are fractions adding up to 1 or more: every step is dense, whatever
        the number of steps."""
        first, last = self.dense_first_steps, self.dense_last_steps
        return isinstance(first, float) and isinstance(last, float) and first + last >= 1.0

    def all_dense_known_at_apply(self, total: int | None, default_first: int | float) -> bool:
        """The dense steps cover every step, and ``vs.apply`` could tell (and warned): both counts
        are fractions adding up to 1 or more, or ``num_inference_steps`` is this run's ``total``."""
        if self.fractions_cover_every_step:
            return True
        n = self.num_inference_steps
        return n is not None and n == total and sum(self.dense_step_counts(n, default_first)) >= n

    @property
    def pattern_name(self) -> str:
        return self.pattern if isinstance(self.pattern, str) else type(self.pattern).name
