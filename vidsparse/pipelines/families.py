"""Model families vidsparse can patch: where their self-attention lives, how their grid is
read from a forward call, and their default pattern options.

Family defaults (also in docs/integration.md; applied to pattern *names* only, and adapted
to each call's grid so any resolution runs):

========== ============ ====================== ========================= =====================
family     text span    radial                 tile (tile; window)       gna (kernel; stride)
========== ============ ====================== ========================= =====================
wan        none (cross) decay 0.2, sink,       (2,8,8); (5,3,3)          (9,25,25); 1
                        layer 0 dense
wan 2.2*   none (cross) decay 0.8, sink,       (2,8,8); (5,3,3)          (9,25,25); 1
                        block 64, layer 0 dense
hunyuan    after, mask  decay 0.95, no sink    (2,8,8); (9,3,5)          (18,24,24); (16,8,8)
cogvideox  before       decay 1.0, no sink     (2,8,8); (5,3,3)          (9,25,25); 1
ltx        none (cross) decay 1.0, no sink     (2,4,4); (5,3,3)          (9,9,13); 1
mochi      after, valid decay 1.0, no sink     (2,8,8); (5,3,3)          (9,25,25); 1
========== ============ ====================== ========================= =====================

\\* a WanPipeline holding ``transformer_2`` (Wan 2.2 A14B), as in Radial's Wan2.2 script.
All families: the first 25 % of the steps dense (``dense_first_steps=0.25``; 0 for "dense");
attention-tile keeps ``round(F / 4)`` global frames (the paper's 2:6 at 8 latent frames);
vmoba and other patterns use their own defaults. Radial's block is 128 (the paper) unless a
frame holds fewer tokens, then the kernel block. Windows larger than an axis cover the axis.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from vidsparse.layout import VideoLayout

Grid = tuple[int, int, int]


@dataclass(frozen=True)
class FamilySpec:
    """One diffusers transformer family."""

    name: str
    class_names: tuple[str, ...]
    text_position: str  # "none" | "before" | "after"
    processor_names: tuple[str, ...]  # diffusers processors vidsparse mirrors
    attention_paths: Callable[[torch.nn.Module], list[tuple[str, torch.nn.Module, int]]]
    grid: Callable[[torch.nn.Module, dict[str, Any]], Grid | None]
    text_len: Callable[[torch.nn.Module, dict[str, Any]], int]
    radial: dict[str, Any] = field(default_factory=dict)
    tile: dict[str, Any] = field(default_factory=dict)
    gna: dict[str, Any] = field(default_factory=dict)

    def num_layers(self, transformer: torch.nn.Module) -> int:
        return len(self.attention_paths(transformer))


# -- self-attention modules (path, module, layer index) --------------------------------------
def _indexed(attr: str, sub: str, offset: int = 0):
    def paths(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module, int]]:
        blocks = getattr(model, attr, None) or []
        return [(f"{attr}.{i}.{sub}", getattr(b, sub), offset + i) for i, b in enumerate(blocks)]

    return paths


def _hunyuan_paths(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module, int]]:
    double = _indexed("transformer_blocks", "attn")(model)
    return double + _indexed("single_transformer_blocks", "attn", offset=len(double))(model)


# -- grid discovery from the transformer's forward arguments -----------------------------------
def _bcfhw_grid(patch_t: int, patch_h: int, patch_w: int, hs: torch.Tensor) -> Grid:
    _, _, f, h, w = hs.shape
    return (f // patch_t, h // patch_h, w // patch_w)


def _wan_grid(model, kw) -> Grid:
    return _bcfhw_grid(*model.config.patch_size, kw["hidden_states"])


def _hunyuan_grid(model, kw) -> Grid:
    p, pt = model.config.patch_size, model.config.patch_size_t
    return _bcfhw_grid(pt, p, p, kw["hidden_states"])


def _cogvideox_grid(model, kw) -> Grid:
    _, f, _, h, w = kw["hidden_states"].shape  # CogVideoX takes (B, F, C, H, W)
    p, pt = model.config.patch_size, model.config.patch_size_t
    return (f // pt if pt else f, h // p, w // p)


def _mochi_grid(model, kw) -> Grid:
    p = model.config.patch_size
    return _bcfhw_grid(1, p, p, kw["hidden_states"])


def _ltx_grid(model, kw) -> Grid | None:
    """LTX-Video gets packed tokens (B, S, C) plus ``num_frames, height, width`` (latent grid,
    patch 1) or, in the conditioning pipeline, only ``video_coords`` [B, 3, S]."""
    seq = kw["hidden_states"].shape[1]
    f, h, w = kw.get("num_frames"), kw.get("height"), kw.get("width")
    if f is not None and h is not None and w is not None:
        p, pt = model.config.patch_size, model.config.patch_size_t
        for grid in ((int(f), int(h), int(w)), (int(f) // pt, int(h) // p, int(w) // p)):
            if math.prod(grid) == seq:
                return grid
        return None
    coords = kw.get("video_coords")
    if coords is None:
        return None
    return _grid_from_coords(coords[0], seq)


def _grid_from_coords(coords: torch.Tensor, seq: int) -> Grid | None:
    """The (F, H, W) of coordinates [3, S] if they are a full frame-major raster, else None."""
    axes = [torch.unique(c, sorted=True) for c in coords]
    grid = tuple(int(a.numel()) for a in axes)
    if math.prod(grid) != seq:
        return None
    idx = [torch.searchsorted(a, c) for a, c in zip(axes, coords)]
    flat = (idx[0] * grid[1] + idx[1]) * grid[2] + idx[2]
    if not torch.equal(flat, torch.arange(seq, device=flat.device)):
        return None
    return grid  # type: ignore[return-value]


def _no_text(model, kw) -> int:
    return 0


def _joint_text(model, kw) -> int:
    return int(kw["encoder_hidden_states"].shape[1])


FAMILIES: dict[str, FamilySpec] = {}


def register_family(spec: FamilySpec) -> FamilySpec:
    FAMILIES[spec.name] = spec
    return spec


register_family(
    FamilySpec(
        name="wan",
        class_names=("WanTransformer3DModel",),
        text_position="none",
        processor_names=("WanAttnProcessor",),
        attention_paths=_indexed("blocks", "attn1"),
        grid=_wan_grid,
        text_len=_no_text,
        radial=dict(decay_factor=0.2, sink=True),
        tile=dict(tile=(2, 8, 8), window=(5, 3, 3)),
        gna=dict(kernel_size=(9, 25, 25), stride=1),
    )
)
register_family(
    FamilySpec(
        name="hunyuan",
        class_names=("HunyuanVideoTransformer3DModel",),
        text_position="after",
        processor_names=("HunyuanVideoAttnProcessor2_0",),
        attention_paths=_hunyuan_paths,
        grid=_hunyuan_grid,
        text_len=_joint_text,
        radial=dict(decay_factor=0.95, sink=False),
        tile=dict(tile=(2, 8, 8), window=(9, 3, 5)),
        gna=dict(kernel_size=(18, 24, 24), stride=(16, 8, 8)),
    )
)
register_family(
    FamilySpec(
        name="cogvideox",
        class_names=("CogVideoXTransformer3DModel",),
        text_position="before",
        processor_names=("CogVideoXAttnProcessor2_0", "FusedCogVideoXAttnProcessor2_0"),
        attention_paths=_indexed("transformer_blocks", "attn1"),
        grid=_cogvideox_grid,
        text_len=_joint_text,
        radial=dict(decay_factor=1.0, sink=False),
        tile=dict(tile=(2, 8, 8), window=(5, 3, 3)),
        gna=dict(kernel_size=(9, 25, 25), stride=1),
    )
)
register_family(
    FamilySpec(
        name="ltx",
        class_names=("LTXVideoTransformer3DModel",),
        text_position="none",
        processor_names=("LTXVideoAttnProcessor",),
        attention_paths=_indexed("transformer_blocks", "attn1"),
        grid=_ltx_grid,
        text_len=_no_text,
        radial=dict(decay_factor=1.0, sink=False),
        tile=dict(tile=(2, 4, 4), window=(5, 3, 3)),
        gna=dict(kernel_size=(9, 9, 13), stride=1),
    )
)
register_family(
    FamilySpec(
        name="mochi",
        class_names=("MochiTransformer3DModel",),
        text_position="after",
        processor_names=("MochiAttnProcessor2_0",),
        attention_paths=_indexed("transformer_blocks", "attn1"),
        grid=_mochi_grid,
        text_len=_joint_text,
        radial=dict(decay_factor=1.0, sink=False),
        tile=dict(tile=(2, 8, 8), window=(5, 3, 3)),
        gna=dict(kernel_size=(9, 25, 25), stride=1),
    )
)


def supported_families_text() -> str:
    return ", ".join(f"{s.name} ({'/'.join(s.class_names)})" for s in FAMILIES.values())


def family_of(transformer: Any) -> FamilySpec:
    """The family of a diffusers transformer, or a ValueError naming the supported ones."""
    import diffusers

    if isinstance(transformer, torch.nn.Module):
        for spec in FAMILIES.values():
            classes = tuple(c for c in (getattr(diffusers, n, None) for n in spec.class_names) if c is not None)
            if classes and isinstance(transformer, classes):
                return spec
    raise ValueError(
        f"vidsparse cannot patch a {type(transformer).__name__}. Supported transformers: "
        f"{supported_families_text()}. Pass a diffusers pipeline holding one of them (pipe.transformer) "
        "or the transformer itself."
    )


# -- defaults --------------------------------------------------------------------------------
def auto_block_size(layout: VideoLayout) -> int | None:
    """Kernel block for a grid: None (backend default) unless a frame has < 128 tokens; then
    the next power of two >= tokens per frame, at least 16 (keeps tiny grids cheap)."""
    tpf = layout.tokens_per_frame
    if tpf >= 128:
        return None
    return max(16, 1 << (tpf - 1).bit_length())


def default_schedule(pattern_name: str, family: FamilySpec) -> tuple[int | float, tuple[int, ...]]:
    """(dense_first_steps, dense_layers) defaults of a family for a pattern."""
    if pattern_name == "dense":
        return 0, ()
    dense_layers = (0,) if (family.name == "wan" and pattern_name == "radial") else ()
    return 0.25, dense_layers


def default_pattern_options(
    family: FamilySpec, name: str, layout: VideoLayout, block_size: int | None, two_stage: bool = False
) -> dict[str, Any]:
    """Options of pattern ``name`` for this family on this grid (see the module table)."""
    grid = layout.grid
    if name == "radial":
        opts = dict(family.radial)
        block = 64 if (family.name == "wan" and two_stage) else 128
        if two_stage and family.name == "wan":
            opts["decay_factor"] = 0.8
        if layout.tokens_per_frame < block:
            block = block_size or auto_block_size(layout) or block
        opts["block_size"] = block
        return opts
    if name == "tile":
        if not family.tile:
            return {}
        tile = tuple(min(t, n) for t, n in zip(family.tile["tile"], grid))
        return dict(tile=tile, window=family.tile["window"])
    if name == "gna":
        if not family.gna:
            return {}
        kernel = _triple(family.gna["kernel_size"])
        stride = _triple(family.gna.get("stride", 1))
        k = tuple(-1 if ki >= n else ki for ki, n in zip(kernel, grid))
        s = tuple(min(si, n if ki == -1 else ki) for si, ki, n in zip(stride, k, grid))
        return dict(kernel_size=k, stride=s)
    if name == "attention-tile":
        return dict(global_frames=min(layout.frames, max(1, round(layout.frames / 4))))
    return {}


def _triple(v: int | tuple[int, ...]) -> tuple[int, int, int]:
    return (v, v, v) if isinstance(v, int) else tuple(v)  # type: ignore[return-value]
