"""Sparse spatiotemporal attention patterns. Each is a frozen dataclass; see ``base.Pattern``."""

from vidsparse.patterns.attention_tile import AttentionTile
from vidsparse.patterns.base import Pattern, normalize_pattern_name
from vidsparse.patterns.dense import Dense
from vidsparse.patterns.dual_scope import DualScope
from vidsparse.patterns.gna import GNA
from vidsparse.patterns.radial import Radial
from vidsparse.patterns.tile import Tile
from vidsparse.patterns.vmoba import VMoBA

# name -> class, for configs, the CLI and ``vidsparse.make_pattern``.
PATTERNS: dict[str, type[Pattern]] = {"dense": Dense, "dual-scope": DualScope, "radial": Radial, "vmoba": VMoBA}
PATTERNS.update({"attention-tile": AttentionTile, "gna": GNA, "tile": Tile})


def register_pattern(cls: type[Pattern]) -> type[Pattern]:
    PATTERNS[cls.name] = cls
    return cls


def make_pattern(name: str, **options) -> Pattern:
    """Pattern from its name ("dense", "radial", "tile", "attention-tile", "gna", "vmoba")."""
    key = normalize_pattern_name(name)
    if key not in PATTERNS:
        raise ValueError(f"Unknown pattern {name!r}. Expected one of: {', '.join(sorted(PATTERNS))}.")
    try:
        return PATTERNS[key](**options)
    except TypeError as exc:
        raise TypeError(f"Bad options for pattern {key!r}: {exc}") from None


__all__ = [
    "GNA",
    "PATTERNS",
    "AttentionTile",
    "Dense",
    "DualScope",
    "Pattern",
    "Radial",
    "Tile",
    "VMoBA",
    "make_pattern",
    "normalize_pattern_name",
    "register_pattern",
]
