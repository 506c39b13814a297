"""Sparse spatiotemporal attention patterns. Each is a frozen dataclass; see ``base.Pattern``."""

from vidsparse.patterns.base import Pattern
from vidsparse.patterns.dense import Dense
from vidsparse.patterns.dual_scope import DualScope
from vidsparse.patterns.radial import Radial
from vidsparse.patterns.vmoba import VMoBA

# name -> class, for configs, the CLI and ``vidsparse.make_pattern``.
PATTERNS: dict[str, type[Pattern]] = {"dense": Dense, "dual-scope": DualScope, "radial": Radial, "vmoba": VMoBA}


def register_pattern(cls: type[Pattern]) -> type[Pattern]:
    PATTERNS[cls.name] = cls
    return cls


def make_pattern(name: str, **options) -> Pattern:
    """Pattern from its name ("dense", "radial", "tile", "attention-tile", "gna", "vmoba")."""
    key = name.strip().lower().replace("_", "-")
    if key not in PATTERNS:
        raise ValueError(f"Unknown pattern {name!r}. Expected one of: {', '.join(sorted(PATTERNS))}.")
    try:
        return PATTERNS[key](**options)
    except TypeError as exc:
        raise TypeError(f"Bad options for pattern {key!r}: {exc}") from None


__all__ = ["PATTERNS", "Dense", "DualScope", "Pattern", "Radial", "VMoBA", "make_pattern", "register_pattern"]
