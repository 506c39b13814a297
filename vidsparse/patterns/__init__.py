"""Sparse spatiotemporal attention patterns. Each is a frozen dataclass; see ``base.Pattern``."""

import dataclasses

from vidsparse.layout import VideoLayout
from vidsparse.patterns.attention_tile import AttentionTile
from vidsparse.patterns.base import Pattern, normalize_pattern_name
from vidsparse.patterns.dense import Dense
from vidsparse.patterns.dual_scope import DualScope
from vidsparse.patterns.freeswim import FreeSwim
from vidsparse.patterns.gna import GNA
from vidsparse.patterns.radial import Radial
from vidsparse.patterns.tile import Tile
from vidsparse.patterns.vmoba import VMoBA

# name -> class, for configs, the CLI and ``vidsparse.make_pattern``.
PATTERNS: dict[str, type[Pattern]] = {
    cls.name: cls for cls in (Dense, Radial, Tile, AttentionTile, GNA, VMoBA, DualScope, FreeSwim)
}


def register_pattern(cls: type[Pattern]) -> type[Pattern]:
    """Make a ``Pattern`` subclass reachable by its ``name`` (``make_pattern``, ``vs.apply``,
    ``vs.attention``); usable as a class decorator. Re-registering the same name replaces
    the class only if it is the same class (a module reloaded), never a built-in."""
    if not (isinstance(cls, type) and issubclass(cls, Pattern)):
        raise TypeError(f"register_pattern expects a vidsparse.Pattern subclass, got {cls!r}.")
    if cls.name == Pattern.name or not isinstance(cls.name, str) or not cls.name.strip():
        raise ValueError(
            f'{cls.__name__} needs its own name: set the class attribute `name: ClassVar[str] = "my-pattern"`.'
        )
    key = normalize_pattern_name(cls.name)
    other = PATTERNS.get(key)
    if other is not None and (other.__module__, other.__qualname__) != (cls.__module__, cls.__qualname__):
        raise ValueError(f"Pattern name {key!r} already names {other.__name__}; give {cls.__name__} another name.")
    params = cls.__dict__.get("__dataclass_params__")
    if params is None or not params.frozen:
        raise TypeError(
            f"{cls.__name__} must be a frozen dataclass (its options are its fields, and plans are cached by "
            "value, so a pattern must be hashable and immutable): decorate it with @dataclass(frozen=True), "
            "below @register_pattern."
        )
    PATTERNS[key] = cls
    return cls


def make_pattern(name: str, **options) -> Pattern:
    """Pattern from its name ("dense", "radial", "tile", "attention-tile", "gna", "freeswim", "vmoba")."""
    key = normalize_pattern_name(name)
    if key not in PATTERNS:
        raise ValueError(f"Unknown pattern {name!r}. Expected one of: {', '.join(sorted(PATTERNS))}.")
    cls = PATTERNS[key]
    valid = sorted(f.name for f in dataclasses.fields(cls) if f.init)
    unknown = sorted(str(k) for k in options if k not in valid)
    if unknown:
        raise TypeError(
            f"Pattern {key!r} has no option {', '.join(repr(k) for k in unknown)}. "
            f"Its options: {', '.join(valid) or '(none)'}."
        )
    try:
        return cls(**options)
    except TypeError as exc:
        raise TypeError(f"Bad options for pattern {key!r}: {exc}") from None


def fitted_pattern(name: str, layout: VideoLayout, block_size: int | None = None) -> Pattern:
    """Pattern ``name`` with its class defaults fitted to ``layout`` (``Pattern.fit_defaults``:
    windows cover at most an axis, blocks fit a frame), so a bare name runs on any grid, as
    it does through ``vs.apply``: what ``vs.attention`` / ``vs.plan`` and ``vidsparse bench``
    run for a name."""
    key = normalize_pattern_name(name)
    if key not in PATTERNS:
        return make_pattern(name)  # the unknown-name error
    return make_pattern(key, **PATTERNS[key].fit_defaults({}, layout, block_size))


__all__ = [
    "GNA",
    "PATTERNS",
    "AttentionTile",
    "Dense",
    "DualScope",
    "FreeSwim",
    "Pattern",
    "Radial",
    "Tile",
    "VMoBA",
    "fitted_pattern",
    "make_pattern",
    "normalize_pattern_name",
    "register_pattern",
]
