"""The model-family registry: one ``Family`` record per diffusers video transformer family.

Every module of this package other than ``base`` and ``processor`` defines ``FAMILY``; all are
registered on import (the built-in ones first, in a fixed order, then any other module in
name order), so adding a family is adding one module (docs/architecture.md). Lookups:

- ``get_family(name)``: by name or alias ("HunyuanVideo", "wan2.2"; case, "-" and "_" ignored);
- ``family_of(transformer)``: by transformer instance (``Family.transformer_classes``);
- ``family_of_pipeline(class_name)``: by pipeline class name (longest ``pipeline_prefixes`` match);
- ``tiny_pipeline_of(name)``: which family record builds ``tiny-<name>`` (and with which variant);
- ``video_geometry(name)``: a ``VideoGeometry`` by its name ("cogvideox1.5") or a family name;
- ``families()`` / ``geometries()``: everything registered; ``supported_families_text()`` for errors.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any

from vidsparse.families.base import Family, Shard, ShardPlan, TinyRequest, TinyVariant, VideoGeometry, normalize_name
from vidsparse.families.decode import ClipDecode

_REGISTRY: dict[str, Family] = {}
_BUILTIN = ("wan", "hunyuan", "cogvideox", "ltx", "mochi")
_NOT_FAMILIES = frozenset({"base", "decode", "processor"})


def register_family(family: Family) -> Family:
    """Add (or replace, by name) a family; its name and aliases must not name another family."""
    if not isinstance(family, Family):
        raise TypeError(f"register_family expects a vidsparse.families.Family, got {type(family).__name__}.")
    keys = {normalize_name(family.name), *(normalize_name(a) for a in family.aliases)}
    for other in _REGISTRY.values():
        if other.name == family.name:
            continue
        clash = keys & {normalize_name(other.name), *(normalize_name(a) for a in other.aliases)}
        if clash:
            raise ValueError(f"Family {family.name!r}: the name(s) {sorted(clash)} already name {other.name!r}.")
    _REGISTRY[family.name] = family
    return family


def families() -> tuple[Family, ...]:
    """Every registered family, built-ins first."""
    return tuple(_REGISTRY.values())


def supported_families_text() -> str:
    """ "wan (WanTransformer3DModel), hunyuan (...)" for error messages."""
    return ", ".join(f.describe() for f in _REGISTRY.values() if not f.unsupported)


def get_family(name: str) -> Family:
    """The family named ``name`` (or one of its aliases / geometry names), else a ValueError."""
    if isinstance(name, Family):
        return name
    key = normalize_name(name)
    for fam in _REGISTRY.values():
        names = (
            fam.name,
            *fam.aliases,
            *(g.name for g in fam.geometries),
            *(a for g in fam.geometries for a in g.aliases),
        )
        if key in {normalize_name(n) for n in names}:
            return fam
    raise ValueError(f"Unknown model family {name!r}. Expected one of: {', '.join(_REGISTRY)}.")


def tiny_pipeline_of(name: str) -> tuple[Family, str | None, str] | None:
    """``tiny-<name>``'s builder: (family, ``variant`` for ``Family.tiny_pipeline`` or ``None``, pipeline class).

    ``name`` is a family name or alias (its default tiny pipeline), a name in a family's
    ``tiny_geometries`` or ``tiny_pipelines``; ``None`` if no family embeds such a pipeline.
    """
    key = normalize_name(name)
    for fam in _REGISTRY.values():
        if fam.tiny_pipeline is None:
            continue
        for variant, pipeline_class in fam.tiny_pipelines.items():
            if key == normalize_name(variant):
                return fam, variant, pipeline_class
    try:
        fam = get_family(name)
    except ValueError:
        return None
    if fam.tiny_pipeline is None:
        return None
    default_class = f"{fam.pipeline_prefixes[0]}Pipeline"
    for geo in fam.geometries[1:]:  # another checkpoint geometry: only those the record's tiny_pipeline builds
        if key in {normalize_name(n) for n in (geo.name, *geo.aliases)}:
            return (fam, geo.name, default_class) if geo.name in fam.tiny_geometries else None
    return fam, None, default_class


def family_of(transformer: Any) -> Family:
    """The family of a diffusers transformer, or a ValueError naming the supported ones."""
    import torch

    if isinstance(transformer, torch.nn.Module):
        for fam in _REGISTRY.values():
            if fam.matches(transformer):
                return fam
    raise ValueError(
        f"vidsparse cannot patch a {type(transformer).__name__}. Supported transformers: "
        f"{supported_families_text()}. Pass a diffusers pipeline holding one of them (pipe.transformer) "
        "or the transformer itself. A model of another family needs a family module: see "
        "docs/architecture.md, 'How to add a model family'."
    )


def family_of_pipeline(class_name: str) -> Family | None:
    """The family serving a pipeline class name (the longest matching prefix), or None."""
    best: tuple[int, Family] | None = None
    for fam in _REGISTRY.values():
        for prefix in fam.pipeline_prefixes:
            if class_name.startswith(prefix) and (best is None or len(prefix) > best[0]):
                best = (len(prefix), fam)
    return best[1] if best else None


def clip_decode_of(vae: Any) -> ClipDecode | None:
    """The per-clip decode record of a diffusers VAE (by class, over every family), or None."""
    for fam in _REGISTRY.values():
        if fam.clip_decode is not None and fam.clip_decode.matches(vae):
            return fam.clip_decode
    return None


def pipeline_prefixes() -> tuple[str, ...]:
    return tuple(p for fam in _REGISTRY.values() for p in fam.pipeline_prefixes)


def geometries() -> dict[str, VideoGeometry]:
    """Geometry name -> ``VideoGeometry`` of every family (e.g. "cogvideox" and "cogvideox1.5")."""
    return {g.name: g for fam in _REGISTRY.values() for g in fam.geometries}


def video_geometry(name: str) -> VideoGeometry:
    """A geometry by its name or alias, or a family's default geometry; ValueError otherwise."""
    key = normalize_name(name)
    for geo in geometries().values():
        if key in {normalize_name(n) for n in (geo.name, *geo.aliases)}:
            return geo
    try:
        return get_family(name).geometry
    except ValueError:
        raise ValueError(f"Unknown model family {name!r}. Expected one of: {', '.join(geometries())}.") from None


def family_of_geometry(geometry: VideoGeometry | str) -> Family:
    """The family a geometry belongs to."""
    name = geometry.name if isinstance(geometry, VideoGeometry) else geometry
    return get_family(name)


def _load_builtin() -> None:
    found = sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))
    order = [n for n in _BUILTIN if n in found] + [n for n in found if n not in _BUILTIN and n not in _NOT_FAMILIES]
    for name in order:
        module = importlib.import_module(f"{__name__}.{name}")
        family = getattr(module, "FAMILY", None)
        if not isinstance(family, Family):
            raise TypeError(f"vidsparse.families.{name} must define FAMILY = Family(...).")
        register_family(family)


_load_builtin()

__all__ = [
    "ClipDecode",
    "Family",
    "Shard",
    "ShardPlan",
    "TinyRequest",
    "TinyVariant",
    "VideoGeometry",
    "clip_decode_of",
    "families",
    "family_of",
    "family_of_geometry",
    "family_of_pipeline",
    "geometries",
    "get_family",
    "normalize_name",
    "pipeline_prefixes",
    "register_family",
    "supported_families_text",
    "tiny_pipeline_of",
    "video_geometry",
]
