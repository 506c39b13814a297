"""vidsparse: sparse spatiotemporal attention for video diffusion transformers.

The public names are loaded on first use (PEP 562), so ``import vidsparse`` (and the
``vidsparse`` command's ``--help``) does not import torch; ``vidsparse.attention(...)`` or
``from vidsparse import Radial`` imports what it needs. ``attention`` and ``plan`` are both
functions here and submodules (``vidsparse.attention``, ``vidsparse.plan``); the package
attribute is always the function, as it was when the package imported them eagerly.
"""

from __future__ import annotations

import importlib
import sys
import types

__version__ = "0.1.0"

# public name -> module defining it
_LAZY: dict[str, str] = {
    "attention": "vidsparse.attention",
    "clear_plan_cache": "vidsparse.attention",
    "plan": "vidsparse.attention",
    "token_mask": "vidsparse.attention",
    "SparseConfig": "vidsparse.config",
    "VideoLayout": "vidsparse.layout",
    "BlockSparsePlan": "vidsparse.plan",
    # The diffusers integration imports diffusers.
    "apply": "vidsparse.pipelines",
    "remove": "vidsparse.pipelines",
    "reset_state": "vidsparse.pipelines",
    **{
        name: "vidsparse.patterns"
        for name in (
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
            "make_pattern",
            "register_pattern",
        )
    },
}
# Public functions named like a submodule: importing the submodule must not replace the function.
_SHADOWED = frozenset({"attention", "plan"})

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'vidsparse' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


class _Package(types.ModuleType):
    """The package module: the import system's ``setattr(vidsparse, "plan", <submodule>)`` after
    loading a submodule is dropped for the names in ``_SHADOWED`` (``sys.modules`` keeps the
    submodule), so ``vidsparse.plan`` stays the function. Any other assignment is plain."""

    def __setattr__(self, name: str, value) -> None:
        if name in _SHADOWED and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
