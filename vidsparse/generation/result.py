"""What ``generate`` returns (``GenerateResult``) and its text summary (``format_summary``)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


@dataclass(frozen=True)
class LayerGroupDensity:
    """Attention density of consecutive layers that run the same thing (measured at the first sparse step)."""

    layers: tuple[int, ...]
    pattern: str  # pattern repr, or "dense"
    block_density: float  # kernel work: computed blocks / all blocks (1.0 for dense)
    token_density: float  # attended (query, key) pairs / all pairs
    # Query-key pairs the executed kernel path computes, padding included, / S^2 (vidsparse.work.plan_work);
    # None where not measured. path: "query_tile" | "key_block" | "dense".
    work: float | None = None
    path: str = ""

    @property
    def label(self) -> str:
        lo, hi = self.layers[0], self.layers[-1]
        return f"layer {lo}" if lo == hi else f"layers {lo}-{hi}"


@dataclass(frozen=True)
class DenseComparison:
    """The same generation with the model's own dense attention (same seed, same prompt)."""

    frames: np.ndarray
    denoise_s: float
    call_s: float
    time_per_step_s: float
    speedup: float  # dense denoising time / sparse denoising time
    psnr_db: float  # sparse video vs dense video


@dataclass(frozen=True)
class GenerateResult:
    """What ``generate`` returns: the video (uint8 [T, H, W, 3]) and how it was made."""

    frames: np.ndarray
    fps: int
    out: Path | None
    model: str
    family: str
    pattern: str
    grid: tuple[int, int, int]  # token grid (F, H, W) after VAE and patchify
    steps: int
    wall_s: float  # the whole generate() call
    load_s: float
    denoise_s: float  # first transformer forward to last step end
    step_times_s: tuple[float, ...]
    time_per_step_s: float  # median step
    sparse_steps: int  # steps with at least one sparse self-attention call
    densities: tuple[LayerGroupDensity, ...]
    attention_work: float  # over all self-attention calls, computed / dense (1.0 = dense)
    dense: DenseComparison | None = None
    prepare_s: float = 0.0  # option checks and config reading (imports included)
    call_s: float = 0.0  # the whole pipeline call: text encoding, denoising, VAE decode
    write_s: float = 0.0
    computed_work: float | None = None  # as attention_work, from each layer's computed pairs (LayerGroupDensity.work)
    freeswim: Any = None  # generation.freeswim.FreeSwimRun of a --freeswim run: both stages

    def to_json(self) -> dict[str, Any]:
        out = {
            "out": str(self.out) if self.out else None,
            "model": self.model,
            "family": self.family,
            "pattern": self.pattern,
            "grid": list(self.grid),
            "video_shape": list(self.frames.shape),
            "fps": self.fps,
            "steps": self.steps,
            "wall_s": self.wall_s,
            "prepare_s": self.prepare_s,
            "load_s": self.load_s,
            "call_s": self.call_s,
            "denoise_s": self.denoise_s,
            "write_s": self.write_s,
            "time_per_step_s": self.time_per_step_s,
            "step_times_s": list(self.step_times_s),
            "sparse_steps": self.sparse_steps,
            "attention_work": self.attention_work,
            "densities": [
                {
                    "layers": list(d.layers),
                    "pattern": d.pattern,
                    "block_density": d.block_density,
                    "token_density": d.token_density,
                    "work": d.work,
                    "path": d.path,
                }
                for d in self.densities
            ],
            "computed_work": self.computed_work,
        }
        if self.freeswim is not None:
            out["freeswim"] = self.freeswim.to_json()
        if self.dense is not None:
            out["dense"] = {
                "denoise_s": self.dense.denoise_s,
                "call_s": self.dense.call_s,
                "time_per_step_s": self.dense.time_per_step_s,
                "speedup": self.dense.speedup,
                "psnr_db": None if math.isinf(self.dense.psnr_db) else self.dense.psnr_db,
            }
        return out


def time_parts(result: GenerateResult) -> list[str]:
    """The timing breakdown; parts a producer did not measure (0) are left out."""
    denoise = f"denoise {result.denoise_s:.1f} s, {result.time_per_step_s:.3f} s/step median"
    parts = [f"{name} {value:.1f} s" for name, value in (("setup", result.prepare_s), ("load", result.load_s)) if value]
    parts.append(f"pipeline {result.call_s:.1f} s ({denoise})" if result.call_s else denoise)
    if result.write_s:
        parts.append(f"write {result.write_s:.1f} s")
    return parts


#: Computed work at or above this fraction of dense is reported as "no speedup" (issue 18, item 10).
WORK_WARNING = 0.95


def work_warnings(densities) -> list[str]:
    """A line per sparse layer group whose kernel path computes >= WORK_WARNING of dense attention."""
    lines = []
    for d in densities:
        if d.work is not None and d.pattern != "dense" and d.work >= WORK_WARNING:
            lines.append(
                f"warning    {d.label}: the {d.path.replace('_', '-')} path computes {d.work:.0%} of dense attention "
                f"(mask keeps {d.token_density:.0%}): no attention speedup over dense on this grid"
            )
    return lines


def format_summary(result: GenerateResult) -> str:
    t, h, w = result.frames.shape[:3]
    f, gh, gw = result.grid
    lines = [
        f"model      {result.model} ({result.family})",
        f"video      {t} frames of {w}x{h} pixels (WxH) -> token grid {f}x{gh}x{gw} (FxHxW, {f * gh * gw} tokens), "
        f"{result.steps} steps",
        f"pattern    {result.pattern}"
        + (f"; sparse in {result.sparse_steps} of {result.steps} steps" if result.pattern != "dense" else ""),
        f"time       {result.wall_s:.1f} s total: " + ", ".join(time_parts(result)),
    ]
    if result.densities:
        lines.append("density    block = kernel work, token = attended pairs (first sparse step)")
        lines[-1] += "; work = pairs the kernel path computes, padding included"
        for d in result.densities:
            work = f"  work {d.work:6.1%}" if d.work is not None else ""
            lines.append(
                f"           {d.label:<13} block {d.block_density:6.1%}  token {d.token_density:6.1%}{work}  {d.pattern}"
            )
        lines.append(f"           attention work over all steps and layers: {result.attention_work:.1%} of dense")
        if result.computed_work is not None:
            lines.append(f"           computed pairs over all steps and layers: {result.computed_work:.1%} of dense")
        lines.extend(work_warnings(result.densities))
    if result.freeswim is not None:
        lines.extend(result.freeswim.summary_lines())
    if result.dense is not None:
        d = result.dense
        quality = "identical" if math.isinf(d.psnr_db) else f"{d.psnr_db:.2f} dB"
        lines.append(
            f"dense      denoise {d.denoise_s:.1f} s, {d.time_per_step_s:.3f} s/step; speedup {d.speedup:.2f}x; "
            f"PSNR sparse vs dense {quality}"
        )
    if result.out is not None:
        lines.append(f"wrote      {result.out} ({t} frames, {w}x{h} pixels, {result.fps} fps)")
    return "\n".join(lines)


__all__ = [
    "WORK_WARNING",
    "DenseComparison",
    "GenerateResult",
    "LayerGroupDensity",
    "format_summary",
    "time_parts",
    "work_warnings",
]
