"""The FreeSwim branch of ``generate`` (``vidsparse generate --freeswim``): both stages in one run.

``GenerateOptions.freeswim`` (a dict of ``FreeSwimOptions`` fields, ``{}`` for the defaults)
turns a ``generate`` call into FreeSwim's two-stage run (``vidsparse.freeswim.run_freeswim``):
stage 1 at the base size (default: the checkpoint's native size), stage 2 at
``height`` x ``width`` (the target) with the inward window and the dual path.

``prepare_freeswim`` runs before any weights load: the family and pipeline (Wan text-to-video,
one transformer), the options that do not apply (a sparse pattern, dense schedules, parallel,
compile, CPU offload), the base size (``--base-size``, else the checkpoint's ``config.json``,
else the family's default video), the sizes the VAE cannot take, a target smaller than the
base, the dual-path options. ``run_freeswim_generation`` runs it on the loaded pipeline, with a
progress bar per stage, the dense baseline at the target size with ``compare_dense``, and
returns a ``GenerateResult`` whose ``freeswim`` field (``FreeSwimRun``) the summary shows.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from vidsparse.freeswim import (
    DualPathConfig,
    DualPathReport,
    FreeSwimOptions,
    StageProgress,
    StageSummary,
    check_freeswim_sizes,
    native_size_of_config,
    run_freeswim,
)
from vidsparse.freeswim.config import PATTERN_REFUSAL
from vidsparse.generation.model import TINY

if TYPE_CHECKING:
    from vidsparse.generation.model import ModelInfo
    from vidsparse.generation.options import GenerateOptions, GenerationPlan
    from vidsparse.generation.result import GenerateResult

#: ``FreeSwimOptions`` fields that ``generate`` owns (its target size, frames, steps, guidance,
#: seed, backend, block size); ``GenerateOptions.freeswim`` gives the others.
OWNED_FIELDS = {
    "height": "height",
    "width": "width",
    "num_frames": "frames",
    "num_inference_steps": "steps",
    "guidance_scale": "guidance",
    "seed": "seed",
    "backend": "backend",
    "block_size": "block_size",
    "output_type": "(always np)",
}
SETTINGS = tuple(f.name for f in dataclasses.fields(FreeSwimOptions) if f.name not in OWNED_FIELDS)


@dataclass(frozen=True)
class FreeSwimPrepared:
    """What ``prepare_freeswim`` resolved before loading: the full options and where the base came from."""

    options: FreeSwimOptions
    base_source: str  # "--base-size", "the checkpoint's config (...)" or "the family's default video"
    base_grid: tuple[int, int]  # latent tokens after patchify
    refine_steps: int


@dataclass(frozen=True)
class FreeSwimRun:
    """The FreeSwim part of a ``GenerateResult``: both stages, the dual path and the attention work."""

    base_size: tuple[int, int]
    target_size: tuple[int, int]
    base_source: str
    stages: tuple[StageSummary, StageSummary]
    dual_path: DualPathReport
    strength: float
    flow_shift: float
    cache_interval: int
    scale_factor: float
    window_work: float  # computed pairs of one window-branch self-attention / dense, padding included
    stage2_work: float  # stage-2 self-attention work / dense attention at the target in the same forwards
    cache_estimate_bytes: int

    @property
    def seconds(self) -> float:
        return sum(s.seconds for s in self.stages)

    def summary_lines(self) -> list[str]:
        (bh, bw), (th, tw) = self.base_size, self.target_size
        cache = "no cache" if self.cache_interval == 1 else f"full branch every {self.cache_interval} steps"
        r = self.dual_path
        forwards = len(r.dual) + len(r.reuse) + len(r.window)
        # Pixel sizes W x H like the summary's video line; --base-size in its own H x W order.
        source = f"--base-size {bh}x{bw}, HxW" if self.base_source == "--base-size" else self.base_source
        return [
            f"freeswim   base {bw}x{bh} px (WxH; {source}) -> target {tw}x{th} px (WxH); strength {self.strength:g}, "
            f"flow shift {self.flow_shift:g}, {cache}, softmax scale x{self.scale_factor:.4f}",
            *(f"           {s.describe()}" for s in self.stages),
            f"           {r.describe()}",
            f"           stage-2 self-attention work {self.stage2_work:.1%} of dense at the target size (window "
            f"{self.window_work:.1%} per forward, full branch in {len(r.dual)} of {forwards} forwards)",
        ]

    def to_json(self) -> dict[str, Any]:
        r = self.dual_path
        return {
            "base_size": list(self.base_size),
            "target_size": list(self.target_size),
            "base_source": self.base_source,
            "strength": self.strength,
            "flow_shift": self.flow_shift,
            "cache_interval": self.cache_interval,
            "scale_factor": self.scale_factor,
            "stages": [
                {
                    "name": s.name,
                    "height": s.height,
                    "width": s.width,
                    "frames": s.num_frames,
                    "grid": list(s.latent_grid),
                    "steps": s.steps,
                    "seconds": s.seconds,
                    "attention": s.attention,
                }
                for s in self.stages
            ],
            "dual_path": {
                "full_branch_forwards": len(r.dual),
                "cached_forwards": len(r.reuse),
                "window_only_forwards": len(r.window),
                "refreshes": list(r.refreshes),
                "cache": r.cache.describe(),
                "cache_estimate_bytes": self.cache_estimate_bytes,
                "window_backend": r.window_backend,
                "window_block_size": r.window_block,
            },
            "window_work": self.window_work,
            "stage2_work": self.stage2_work,
        }


# -- before loading ---------------------------------------------------------------------------


def _transformer_config(info: ModelInfo) -> dict[str, Any] | None:
    """The checkpoint's transformer ``config.json`` (tiny: the family's tiny config), no weights."""
    family = info.model_family
    if info.kind == TINY and info.source == TINY:  # the trained tiny model: its shipped config
        from vidsparse.models.tiny_trained import WEIGHTS_DIR

        info = replace(info, kind="local", source=str(WEIGHTS_DIR))
    if info.kind == TINY:
        variant = family.tiny.get(info.grid.name) or family.tiny.get(family.name)  # tiny-<geometry> first
        return variant.config() if variant is not None else None
    if info.kind == "local":
        path = Path(info.source).expanduser() / "transformer" / "config.json"
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return None
    try:  # hub: resolve_model already fetched it into the local cache
        from huggingface_hub import hf_hub_download

        return json.loads(Path(hf_hub_download(info.source, "transformer/config.json")).read_text())
    except Exception:
        return None


def check_freeswim_model(options: GenerateOptions, info: ModelInfo) -> None:
    """One ValueError for a model or option ``--freeswim`` cannot run (before the sizes are checked)."""
    from vidsparse.generation.options import GenerateOptions

    family = info.model_family
    if family.name != "wan":
        why = (
            "it attends text jointly inside self-attention, so there is no cross-attention for the dual path to "
            "override"
            if family.text_position != "none"
            else "the dual path is built for WanTransformer3DModel's blocks (attn1 / attn2 cross-attention) and "
            "refines with WanVideoToVideoPipeline"
        )
        raise ValueError(
            f"--freeswim runs FreeSwim's dual path, which replaces Wan's text cross-attention output, on Wan "
            f"text-to-video; --model is a {info.pipeline_class} ({family.name}): {why}. Use a Wan 2.1/2.2 "
            "text-to-video model (e.g. Wan-AI/Wan2.1-T2V-1.3B-Diffusers or --model tiny), or --pattern freeswim "
            "for the window alone."
        )
    if info.pipeline_class != "WanPipeline":
        raise ValueError(
            f"--freeswim generates text-to-video with diffusers' WanPipeline and refines with WanVideoToVideoPipeline; "
            f"--model is a {info.pipeline_class}. Use a Wan text-to-video checkpoint."
        )
    if info.two_stage:
        raise ValueError(
            "--freeswim needs a single-transformer Wan pipeline (Wan 2.1, Wan 2.2 TI2V 5B); this one holds "
            "transformer_2 (Wan 2.2 A14B), which diffusers' WanVideoToVideoPipeline cannot run in stage 2."
        )
    default = GenerateOptions()
    if options.pattern not in (default.pattern, "freeswim") or options.pattern_options:
        raise ValueError(PATTERN_REFUSAL)
    schedule = (
        ("--dense-first-steps", options.dense_first_steps, default.dense_first_steps),
        ("--dense-last-steps", options.dense_last_steps, default.dense_last_steps),
        ("--dense-layers", options.dense_layers, default.dense_layers),
    )
    for flag, value, unset in schedule:
        if value != unset:
            raise ValueError(f"{flag} does not apply to --freeswim (its window runs in every stage-2 step); drop it.")
    for flag, on in (("--compile", options.compile), ("--cpu-offload", options.cpu_offload)):
        if on:
            raise ValueError(f"{flag} is not supported with --freeswim yet; drop one of them.")


def prepare_freeswim(
    options: GenerateOptions, info: ModelInfo, frames: int, height: int, width: int, steps: int, guidance: float
) -> FreeSwimPrepared:
    """Validate the FreeSwim run and resolve its options, loading no weights (ValueError on bad input)."""
    settings = options.freeswim
    if not isinstance(settings, dict):
        raise TypeError(
            f"GenerateOptions.freeswim must be None or a dict of FreeSwimOptions fields ({', '.join(SETTINGS)}), "
            f"got {type(settings).__name__}."
        )
    for key in settings:
        if key in OWNED_FIELDS:
            raise ValueError(
                f"GenerateOptions.freeswim[{key!r}]: set it as GenerateOptions.{OWNED_FIELDS[key]} (generate's own "
                "value is FreeSwim's target and run setting)."
            )
        if key not in SETTINGS:
            raise ValueError(
                f"GenerateOptions.freeswim: unknown option {key!r}; expected some of {', '.join(SETTINGS)}."
            )
    check_freeswim_model(options, info)
    geo = info.grid
    base_h, base_w = settings.get("base_height"), settings.get("base_width")
    if (base_h is None) != (base_w is None):
        raise ValueError(
            f"Pass both base_height and base_width (--base-size HxW), got base_height={base_h!r}, "
            f"base_width={base_w!r}."
        )
    if base_h is not None:
        source = "--base-size"
    else:
        config = _transformer_config(info)
        native = native_size_of_config(config) if config else None
        if native is not None:
            base_h, base_w = native
            source = "the checkpoint's native size"
        elif info.kind == "tiny" and "height" in info.defaults and "width" in info.defaults:
            base_h, base_w = int(info.defaults["height"]), int(info.defaults["width"])
            source = f"{info.source}'s trained size"
        else:
            _, base_h, base_w = geo.default_video
            source = f"the {geo.name} family's default video"
    fs = FreeSwimOptions(
        **{**settings, "base_height": base_h, "base_width": base_w},
        height=height,
        width=width,
        num_frames=frames,
        num_inference_steps=steps,
        guidance_scale=guidance,
        seed=options.seed,
        backend=options.backend,
        block_size=options.block_size,
        output_type="np",
    )
    _, ph, pw = geo.patch
    multiple = (geo.spatial * ph, geo.spatial * pw)
    refine_steps = check_freeswim_sizes(fs, (base_h, base_w), multiple=multiple, temporal=geo.temporal)
    shift = fs.flow_shift
    if isinstance(shift, bool) or not isinstance(shift, (int, float)) or not shift > 0:
        raise ValueError(f"--flow-shift must be a number > 0 (the reference uses 9.0), got {shift!r}.")
    base_grid = (base_h // multiple[0], base_w // multiple[1])
    DualPathConfig.from_options(fs, base_grid)  # the dual-path options fail here, not after loading
    return FreeSwimPrepared(fs, source, base_grid, refine_steps)


# -- the run ----------------------------------------------------------------------------------


class StageBars:
    """One progress bar per stage (``StageProgress`` events of ``run_freeswim``), on stderr.

    ``clock`` (a ``generation.call.StepClock`` on the pipeline) gets each step's end, so it
    times every step of both stages from its first transformer forward, as ``generate`` does.
    """

    def __init__(self, labels: dict[str, str], enabled: bool, clock=None) -> None:
        self.labels = labels
        self.enabled = enabled
        self.clock = clock
        self.bar = None
        self.stage: str | None = None

    def __call__(self, p: StageProgress) -> None:
        if self.clock is not None:
            self.clock.callback(None, p.step - 1, None, {})
        if not self.enabled:
            return
        if p.stage != self.stage:
            self.close()
            from tqdm.auto import tqdm

            self.bar = tqdm(total=p.total, desc=self.labels.get(p.stage, p.stage), leave=False)
            self.stage = p.stage
        self.bar.update(p.step - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.bar, self.stage = None, None

    def step_times(self) -> tuple[float, ...]:
        """Every step of both stages, in order (``clock``'s; empty without one)."""
        return self.clock.step_times if self.clock is not None else ()


def _text_kwargs(pipe, plan: GenerationPlan, options: GenerateOptions) -> dict[str, Any]:
    """The prompt as generate passes it: text, or hashed embeddings for the tiny (encoder-free) pipeline."""
    from vidsparse.generation.call import call_kwargs

    kwargs = call_kwargs(pipe, plan, options, plan.steps, None, None)
    names = ("prompt", "negative_prompt", "prompt_embeds", "negative_prompt_embeds")
    return {k: kwargs[k] for k in names if k in kwargs}


def _window_density(prepared: FreeSwimPrepared, plan: GenerationPlan, num_layers: int, report: DualPathReport):
    """The window branch's plan on the target grid at the kernel it really ran (``report``'s backend
    and block size): block/token density and the work it computes."""
    import vidsparse as vs
    from vidsparse.density import token_density
    from vidsparse.freeswim.dual_path import window_kernel
    from vidsparse.generation.result import LayerGroupDensity
    from vidsparse.layout import VideoLayout
    from vidsparse.patterns.freeswim import FreeSwim
    from vidsparse.work import executed_work

    layout = VideoLayout(*plan.grid)
    backend, block = report.window_backend, report.window_block
    if backend is None or block is None:  # no window-branch call recorded: the kernel the run would pick
        config = DualPathConfig.from_options(prepared.options, prepared.base_grid)
        backend, block = window_kernel(config, layout, torch.empty(0, device=plan.device))
    pattern = FreeSwim(base_grid=prepared.base_grid)
    p = vs.plan(pattern, layout, num_heads=1, block_size=block)
    work = executed_work(p, backend)
    group = LayerGroupDensity(
        tuple(range(num_layers)), repr(pattern), float(p.density), float(token_density(p).mean()),
        work=work.computed_fraction, path=work.path,
    )  # fmt: skip
    return group, work.computed_fraction


def run_freeswim_generation(
    pipe, plan: GenerationPlan, options: GenerateOptions, *, t_start: float, prepare_s: float, load_s: float
) -> GenerateResult:
    """Both FreeSwim stages on the loaded pipeline (+ the dense baseline at the target with ``compare_dense``)."""
    from vidsparse.generation.call import DecodeClock, StepClock, run_pipeline, warmup
    from vidsparse.generation.meter import num_layers
    from vidsparse.generation.result import DenseComparison, GenerateResult, write_output
    from vidsparse.video_io import as_uint8_frames

    prepared: FreeSwimPrepared = plan.freeswim
    fs = prepared.options
    text = _text_kwargs(pipe, plan, options)
    gen_device = "cpu" if plan.device.type != "cuda" else str(plan.device)

    dense_run = None
    if options.compare_dense:  # dense attention at the target size, the model's own processors
        warmup(pipe, plan, options)
        dense_run = run_pipeline(pipe, plan, options)
        # Warm FreeSwim's kernels too (one refine step, no final decode), so timings compare like with like.
        pipe.set_progress_bar_config(disable=True)
        with torch.inference_mode():
            warm = dataclasses.replace(fs, num_inference_steps=2, strength=0.5, output_type="latent")
            run_freeswim(pipe, warm, **text, generator_device=gen_device)

    pipe.set_progress_bar_config(disable=True)  # StageBars shows the progress of each stage
    labels = {
        "base": f"stage 1 (base {fs.base_width}x{fs.base_height} WxH)",
        "refine": f"stage 2 (refine {fs.width}x{fs.height} WxH)",
    }
    clock, decode = StepClock(pipe, plan.device), DecodeClock(pipe, plan.device)
    bars = StageBars(labels, options.progress, clock)
    try:
        with torch.inference_mode():
            result = run_freeswim(pipe, fs, **text, progress=bars, generator_device=gen_device)
    finally:
        bars.close()
        clock.close()
        decode.close()
    frames = as_uint8_frames(result.frames[0])

    report = result.dual_path
    group, window_work = _window_density(prepared, plan, num_layers(pipe), report)
    forwards = len(report.dual) + len(report.reuse) + len(report.window)
    # Per forward: the window branch, plus one dense self-attention where the full branch ran.
    stage2_work = (forwards * window_work + len(report.dual)) / forwards if forwards else window_work
    # Kept blocks over every stage-2 self-attention call: the window branch in each forward and the
    # full branch's dense one (all blocks of its grid) in each dual forward. Per call, so <= 100%.
    calls = forwards + len(report.dual)
    stage2_blocks = (forwards * group.block_density + len(report.dual)) / calls if calls else 1.0
    run = FreeSwimRun(
        base_size=result.plan.base_size,
        target_size=result.plan.target_size,
        base_source=prepared.base_source,
        stages=result.stages,
        dual_path=report,
        strength=fs.strength,
        flow_shift=fs.flow_shift,
        cache_interval=fs.cache_interval,
        scale_factor=result.plan.dual_path.scale_factor(),
        window_work=window_work,
        stage2_work=stage2_work,
        cache_estimate_bytes=result.plan.cache_estimate_bytes,
    )
    step_times = bars.step_times()  # both stages: the steps the run really made
    comparison = None if dense_run is None else DenseComparison.of(dense_run, frames, run.seconds, against="call")
    written, write_s = write_output(plan.out, frames, plan.fps)
    return GenerateResult(
        frames=frames,
        fps=plan.fps,
        out=written,
        model=plan.info.source,
        family=plan.info.family,
        pattern="freeswim",
        grid=plan.grid,
        steps=plan.steps,
        wall_s=time.perf_counter() - t_start,
        load_s=load_s,
        denoise_s=float(sum(step_times)),
        step_times_s=tuple(step_times),
        time_per_step_s=float(statistics.median(step_times)) if step_times else 0.0,
        sparse_steps=prepared.refine_steps,
        densities=(group,),
        kept_blocks=stage2_blocks,
        dense=comparison,
        prepare_s=prepare_s,
        call_s=run.seconds,
        decode_s=decode.seconds,
        write_s=write_s,
        computed_work=stage2_work,
        freeswim=run,
        settings=plan.settings(options),
    )


__all__ = [
    "SETTINGS",
    "FreeSwimPrepared",
    "FreeSwimRun",
    "StageBars",
    "check_freeswim_model",
    "prepare_freeswim",
    "run_freeswim_generation",
]
