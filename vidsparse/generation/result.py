"""What ``generate`` returns (``GenerateResult``) and its text summary (``format_summary``)."""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vidsparse.work import layer_span, no_speedup_warning


@dataclass(frozen=True)
class LayerGroupDensity:
    """Attention density of consecutive layers that run the same thing (measured at the first sparse step)."""

    layers: tuple[int, ...]
    pattern: str  # pattern repr, or "dense"
    block_density: float  # kept blocks / all blocks of the plan's block grid, padding blocks included (1.0 for dense)
    token_density: float  # attended (query, key) pairs / all pairs
    # Query-key pairs the executed kernel path computes, padding included, / S^2 (vidsparse.work.plan_work);
    # None where not measured. path: "query_tile" | "key_block" | "dense".
    work: float | None = None
    path: str = ""
    # The layers had a pattern, but its plan kept every pair of the grid, so they ran the model's own
    # attention (path "dense"; ``SparseConfig.dense_when_full``).
    keeps_every_pair: bool = False

    @property
    def label(self) -> str:
        return layer_span(self.layers[0], self.layers[-1])


@dataclass(frozen=True)
class LoraSummary:
    """The LoRA a run loaded, what it was trained for (its ``vidsparse_lora.json``, if any) and
    where this run differs from that (a LoRA adapts a model to one length and size)."""

    path: str
    scale: float
    trained_for: dict[str, Any] | None  # model, frames, height, width, pattern, steps; None: no vidsparse_lora.json
    warnings: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "scale": self.scale,
            "trained_for": self.trained_for,
            "warnings": list(self.warnings),
        }

    def describe(self) -> str:
        text = f"{self.path} (scale {self.scale:g})"
        t = self.trained_for
        if t is None:
            return text + "; no vidsparse_lora.json beside it, so what it was trained for is unknown"
        from vidsparse.lora.config import pattern_label

        size = f"{t.get('num_frames')} frames of {t.get('width')}x{t.get('height')}"
        pattern = pattern_label(t.get("pattern"))
        return text + f"; trained for {size}, pattern {pattern}, on {t.get('model')}, {t.get('steps')} steps"

    def summary_lines(self) -> list[str]:
        return [f"lora       {self.describe()}", *(f"warning    {w}" for w in self.warnings)]


@dataclass(frozen=True)
class DenseComparison:
    """The same generation with the model's own dense attention (same seed, same prompt)."""

    frames: np.ndarray
    denoise_s: float
    call_s: float
    time_per_step_s: float
    speedup: float  # dense denoising time / sparse denoising time
    psnr_db: float  # sparse video vs dense video
    decode_s: float = 0.0  # inside pipe.vae.decode

    @classmethod
    def of(cls, dense_run: tuple, frames: np.ndarray, sparse_s: float, *, against: str = "denoise") -> DenseComparison:
        """Compare ``frames`` (taking ``sparse_s``) with ``dense_run`` = (frames, step times,
        call s, decode s) of the dense generation. ``against`` is the dense time set against
        ``sparse_s``: its summed denoising steps, or its whole pipeline call ("call": FreeSwim's
        two stages, each with its VAE, against one dense call at the target size)."""
        from vidsparse.video_io import psnr

        dense_frames, dense_steps, dense_call_s, dense_decode_s = dense_run
        dense_s = float(sum(dense_steps))
        base = {"denoise": dense_s, "call": dense_call_s}[against]
        return cls(
            frames=dense_frames,
            denoise_s=dense_s,
            call_s=dense_call_s,
            decode_s=dense_decode_s,
            time_per_step_s=float(statistics.median(dense_steps)) if dense_steps else 0.0,
            speedup=base / sparse_s if sparse_s > 0 else math.nan,
            psnr_db=psnr(frames, dense_frames),
        )


def write_output(out: Path | None, frames: np.ndarray, fps: int) -> tuple[Path | None, float]:
    """Write the video to ``out`` (None: keep it in memory only); returns (path, seconds)."""
    from vidsparse.video_io import write_video

    t = time.perf_counter()
    written = write_video(out, frames, fps=fps) if out is not None else None
    return written, time.perf_counter() - t


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
    # block_density averaged over all self-attention calls (1.0 = dense); computed_work is what the kernels computed
    kept_blocks: float
    dense: DenseComparison | None = None
    prepare_s: float = 0.0  # option checks and config reading (imports included)
    call_s: float = 0.0  # the whole pipeline call: text encoding, denoising, VAE decode
    write_s: float = 0.0
    computed_work: float | None = None  # as kept_blocks, from each layer's computed pairs (LayerGroupDensity.work)
    freeswim: Any = None  # generation.freeswim.FreeSwimRun of a --freeswim run: both stages
    decode_s: float = 0.0  # inside pipe.vae.decode (part of call_s, not of denoise_s)
    # Process start to the generate() call (Python, torch, the CLI); set by the command line, 0 elsewhere.
    startup_s: float = 0.0
    lora: LoraSummary | None = None
    # Wan-Animate: segments denoised one after the other (``steps`` each); 1 for every other pipeline.
    segments: int = 1
    settings: dict[str, Any] | None = None  # GenerationPlan.settings: the options as given and as resolved

    @property
    def total_s(self) -> float:
        """Process start (when known) to the end of generate()."""
        return self.startup_s + self.wall_s

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
            "segments": self.segments,
            "total_s": self.total_s,
            "startup_s": self.startup_s,
            "wall_s": self.wall_s,
            "prepare_s": self.prepare_s,
            "load_s": self.load_s,
            "call_s": self.call_s,
            "denoise_s": self.denoise_s,
            "decode_s": self.decode_s,
            "write_s": self.write_s,
            "time_per_step_s": self.time_per_step_s,
            "step_times_s": list(self.step_times_s),
            "sparse_steps": self.sparse_steps,
            "kept_blocks": self.kept_blocks,
            "densities": [
                {
                    "layers": list(d.layers),
                    "pattern": d.pattern,
                    "block_density": d.block_density,
                    "token_density": d.token_density,
                    "work": d.work,
                    "path": d.path,
                    "keeps_every_pair": d.keeps_every_pair,
                }
                for d in self.densities
            ],
            "computed_work": self.computed_work,
        }
        if self.settings is not None:
            out["settings"] = self.settings
        if self.freeswim is not None:
            out["freeswim"] = self.freeswim.to_json()
        if self.dense is not None:
            out["dense"] = {
                "denoise_s": self.dense.denoise_s,
                "call_s": self.dense.call_s,
                "decode_s": self.dense.decode_s,
                "time_per_step_s": self.dense.time_per_step_s,
                "speedup": self.dense.speedup,
                "psnr_db": None if math.isinf(self.dense.psnr_db) else self.dense.psnr_db,
            }
        if self.lora is not None:
            out["lora"] = self.lora.to_json()
        return out


def time_parts(result: GenerateResult) -> list[str]:
    """The top-level timing parts, in order; parts a producer did not measure (0) are left out."""
    parts = [
        f"{name} {value:.1f} s"
        for name, value in (("start-up", result.startup_s), ("setup", result.prepare_s), ("load", result.load_s))
        if value
    ]
    if result.call_s:
        parts.append(f"pipeline {result.call_s:.1f} s")
    else:  # a producer that times the steps only
        parts.append(f"denoise {result.denoise_s:.1f} s")
    if result.write_s:
        parts.append(f"write {result.write_s:.1f} s")
    return parts


def work_warnings(densities) -> list[str]:
    """A line per sparse layer group whose kernel path computes >= WORK_WARNING of dense attention."""
    found = (no_speedup_warning(d.label, d.path, d.work, d.token_density) for d in densities if d.path != "dense")
    return [f"warning    {w}" for w in found if w is not None]


def _count(n: int, noun: str) -> str:
    """``1 frame``, ``17 frames``: summaries also print single-frame and single-step runs."""
    return f"{n} {noun}{'s' * (n != 1)}"


def time_lines(result: GenerateResult) -> list[str]:
    """The ``time`` lines: the total and its parts, then the pipeline's denoising and VAE decode."""
    lines = [f"time       {result.total_s:.1f} s total: " + ", ".join(time_parts(result))]
    lines.append(
        f"           denoise {result.denoise_s:.1f} s ({_count(len(result.step_times_s) or result.steps, 'step')}, "
        f"{result.time_per_step_s:.3f} s/step median)"
    )
    if result.decode_s:
        lines.append(f"           VAE decode {result.decode_s:.1f} s")
    if result.call_s:
        rest = result.call_s - result.denoise_s - result.decode_s
        if rest >= 0.05:
            lines.append(
                f"           rest of the pipeline call {rest:.1f} s (text encoding, scheduler, post-processing)"
            )
    return lines


def format_summary(result: GenerateResult) -> str:
    t, h, w = result.frames.shape[:3]
    f, gh, gw = result.grid
    n = result.segments
    steps = _count(result.steps, "step") + (f" in each of {n} segments" if n > 1 else "")
    if result.freeswim is not None:  # the asked steps at the base size, then the refining ones at the target
        base, refine = (s.steps for s in result.freeswim.stages)
        steps = f"{_count(base + refine, 'step')} ({base} at the base size + {refine} refining)"
    lines = [
        f"model      {result.model} ({result.family})",
        f"video      {_count(t, 'frame')} of {w}x{h} pixels (WxH) -> token grid {f}x{gh}x{gw} (FxHxW, {f * gh * gw} tokens), "
        + steps,
        f"pattern    {result.pattern}"
        # the steps run (FreeSwim: both stages), else those asked for
        + (
            f"; sparse in {result.sparse_steps} of {len(result.step_times_s) or result.steps * n} steps"
            if result.pattern != "dense"
            else ""
        ),
        *time_lines(result),
    ]
    if result.lora is not None:
        lines.extend(result.lora.summary_lines())
    if result.densities:
        measured = any(d.work is not None for d in result.densities)
        lines.append(
            "density    block = kept blocks of the padded block grid, token = attended pairs (first sparse step)"
            + ("; work = pairs the kernel path computes / dense pairs, padding included" if measured else "")
        )
        first_with: dict[str, str] = {}  # a pattern's text -> the group that printed it
        for d in result.densities:
            work = f"  work {d.work:6.1%}" if d.work is not None else ""
            ran = " (keeps every pair: ran dense)" if d.keeps_every_pair else ""
            # A long repr once: groups of one pattern split where its layers differ (VMoBA's partitions)
            said = first_with.setdefault(d.pattern, d.label)
            text = d.pattern if said == d.label or len(d.pattern) < 40 else f"the pattern of {said}"
            lines.append(
                f"           {d.label:<13} block {d.block_density:6.1%}  token {d.token_density:6.1%}{work}  "
                f"{text}{ran}"
            )
        lines.append(f"           kept blocks over all steps and layers: {result.kept_blocks:.1%} of the block grid")
        if result.computed_work is not None:
            lines.append(f"           computed pairs over all steps and layers: {result.computed_work:.1%} of dense")
        full = [d for d in result.densities if d.keeps_every_pair]
        lines.extend(
            f"note       {d.label}: the pattern keeps every query-key pair of this {f}x{gh}x{gw} grid, so "
            f"{'it' if len(d.layers) == 1 else 'they'} ran dense attention: the same result, without "
            "the sparse kernel's padding work (a window smaller than the grid, or a larger video, runs it sparse)"
            for d in full
        )
        if result.pattern != "dense" and result.sparse_steps == 0 and not full:  # the schedule's doing
            if all(d.pattern == "dense" for d in result.densities):
                lines.append(
                    "warning    no layer ran the sparse pattern: the dense layers (--dense-layers) are all of them"
                )
            else:
                lines.append(
                    "warning    no step ran the sparse pattern: the dense steps (--dense-first-steps / "
                    "--dense-last-steps) cover all of them"
                )
        else:
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
        lines.append(f"wrote      {result.out} ({_count(t, 'frame')}, {w}x{h} pixels, {result.fps} fps)")
    return "\n".join(lines)


__all__ = [
    "DenseComparison",
    "GenerateResult",
    "LayerGroupDensity",
    "LoraSummary",
    "format_summary",
    "time_lines",
    "time_parts",
    "work_warnings",
]
