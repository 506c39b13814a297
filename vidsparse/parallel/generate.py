"""``vidsparse generate --parallel clip|ulysses``: one video on several processes.

Launched by torchrun or accelerate (one process per GPU; gloo on CPU), every rank runs
``generate_parallel(options)`` with the same options: the settings are compared across
ranks first (a mismatch stops every rank with ``ConfigMismatchError``), each rank builds the
pipeline and runs the same seeded call, the video is decoded per clip and assembled on rank
0, and only rank 0 writes the file. Every rank returns a ``GenerateResult`` with the same
summary (rank 0's numbers; ``frames`` is the real video on rank 0 and a zero-copy
placeholder of the same shape elsewhere). Output printed by the other ranks is silenced.

Two settings of this path only, each from its ``GenerateOptions`` field (the ``--vae-overlap``
and ``--dist-timeout`` flags) when set, else from the environment: ``vae_overlap`` /
``VIDSPARSE_VAE_OVERLAP`` (latent frames of context per clip for the VAE, ``all`` = decode from
frame 0, exact; default 4) and ``dist_timeout`` / ``VIDSPARSE_DIST_TIMEOUT`` (seconds a
collective may wait; default 600). ``VIDSPARSE_ULYSSES`` (auto | diffusers | vidsparse, default
auto) picks the Ulysses of ``--parallel ulysses``: auto runs diffusers' context parallelism for
transformers with a ``_cp_plan`` and vidsparse's own otherwise; rank 0 logs which and why.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from typing import Any

import numpy as np
import torch

from vidsparse.parallel.runtime import ParallelRuntime, check_same_config, init_distributed

DEFAULT_VAE_OVERLAP = 4
DEFAULT_TIMEOUT_S = 600.0


def _setting(options: Any, name: str, env: str, default: Any) -> Any:
    value = getattr(options, name, None)
    if value is None:
        value = os.environ.get(env)
    return default if value is None or value == "" else value


def _vae_overlap(options: Any) -> int | None:
    value = _setting(options, "vae_overlap", "VIDSPARSE_VAE_OVERLAP", DEFAULT_VAE_OVERLAP)
    if isinstance(value, str):
        if value.strip().lower() in ("all", "full", "none"):
            return None
        try:
            value = int(value)
        except ValueError:
            raise ValueError(
                f"--vae-overlap / VIDSPARSE_VAE_OVERLAP must be an int >= 1 or 'all', got {value!r}."
            ) from None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"vae_overlap (--vae-overlap) must be an int >= 1 latent frames or 'all', got {value!r}.")
    return value


def _timeout(options: Any) -> float:
    value = _setting(options, "dist_timeout", "VIDSPARSE_DIST_TIMEOUT", DEFAULT_TIMEOUT_S)
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"dist_timeout (--dist-timeout) must be a number of seconds, got {value!r}.") from None
    if not value > 0:
        raise ValueError(f"dist_timeout (--dist-timeout) must be > 0 seconds, got {value!r}.")
    return value


def _ulysses_choice(options: Any) -> str:
    value = str(_setting(options, "ulysses", "VIDSPARSE_ULYSSES", "auto")).strip().lower()
    from vidsparse.parallel.diffusers_cp import ULYSSES_IMPLEMENTATIONS

    if value not in ULYSSES_IMPLEMENTATIONS:
        raise ValueError(f"VIDSPARSE_ULYSSES must be one of {', '.join(ULYSSES_IMPLEMENTATIONS)}, got {value!r}.")
    return value


def _refuse_unsupported(options: Any, plan: Any) -> None:
    family = plan.info.model_family
    if family.shard_plan is None:
        from vidsparse.families import families

        supported = ", ".join(f.name for f in families() if f.shard_plan is not None)
        raise ValueError(
            f"--parallel {options.parallel} runs the {supported} families; {plan.info.source} is a "
            f"{family.name} model, which vidsparse.parallel does not split ({family.parallel_refusal}). "
            "Run it with --parallel none."
        )
    for flag, on in (
        ("--compare-dense", options.compare_dense),
        ("--cpu-offload", options.cpu_offload),
        ("--compile", options.compile),
    ):
        if on:
            raise ValueError(
                f"{flag} is not supported with --parallel {options.parallel}; drop it or use --parallel none."
            )


class _StepClock:
    def __init__(self, device: torch.device) -> None:
        self.device, self.marks = device, []

    def callback(self, pipe, step, timestep, callback_kwargs):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.marks.append(time.perf_counter())
        return callback_kwargs


def generate_parallel(options: Any):
    """Run ``vidsparse generate`` with ``options.parallel`` in ("clip", "ulysses") on every rank."""
    from vidsparse.config import SparseConfig
    from vidsparse.generation import GenerateResult, call_kwargs, load_lora, load_pipeline, place_pipeline, prepare
    from vidsparse.generation.call import step_end_callback
    from vidsparse.generation.meter import backend_name
    from vidsparse.generation.result import write_output
    from vidsparse.parallel.pipeline import run_parallel
    from vidsparse.video_io import as_uint8_frames

    t_start = time.perf_counter()
    if options.parallel not in ("clip", "ulysses"):
        raise ValueError(f"generate_parallel runs --parallel clip or ulysses, got {options.parallel!r}.")
    device = str(getattr(options, "device", "auto"))
    use_cuda = torch.cuda.is_available() and (device == "auto" or device.startswith("cuda"))
    timeout_s = _timeout(options)

    def check_options():
        plan = prepare(options)
        _refuse_unsupported(options, plan)
        _ulysses_choice(options)
        return plan, _vae_overlap(options)

    try:
        runtime: ParallelRuntime = init_distributed(backend="nccl" if use_cuda else "gloo", timeout_s=timeout_s)
    except (RuntimeError, ValueError):  # ValueError: no torchrun / accelerate environment
        check_options()  # e.g. not launched by torchrun: a bad option is reported first, then how to launch
        raise
    # Validate on every rank, then agree: one rank's bad option stops all ranks at once.
    plan, error = None, None
    try:
        plan, vae_overlap = check_options()
    except (ValueError, TypeError) as exc:
        error = f"{type(exc).__name__}: {exc}"
    errors = _gather_objects(error, runtime, "the option checks")
    if error is not None:
        raise ValueError(error.split(": ", 1)[1])
    if any(errors):
        failed = [r for r, e in enumerate(errors) if e]
        raise ValueError(f"rank(s) {failed} rejected the options ({errors[failed[0]]}); every rank stops.")
    if runtime.rank != 0:
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - only rank 0 prints the summary
    settings = options.record()
    ulysses = _ulysses_choice(options)
    settings.update(world_size=runtime.world_size, vae_overlap=vae_overlap, ulysses=ulysses, vidsparse=_version())
    check_same_config(runtime, settings)

    t0 = time.perf_counter()
    prepare_s = t0 - t_start  # option checks on every rank, their agreement and the process group
    pipe = load_pipeline(plan, options.seed)
    if plan.lora is not None:
        load_lora(pipe, plan.lora, options.lora_scale)
    place_pipeline(pipe, runtime.device)
    pipe.set_progress_bar_config(disable=not (options.progress and runtime.is_main), desc="denoising", leave=False)
    load_s = time.perf_counter() - t0
    if options.parallel == "ulysses":  # diffusers' context parallelism where the model has a _cp_plan
        from vidsparse.layout import VideoLayout
        from vidsparse.parallel.diffusers_cp import choose_ulysses
        from vidsparse.pipelines import transformers_of

        ulysses, why = choose_ulysses([t for _, t in transformers_of(pipe)], runtime, ulysses, VideoLayout(*plan.grid))
        print(f"parallel   ulysses x{runtime.world_size}: {why}", flush=True)

    config = plan.sparse_config or SparseConfig("dense", backend=options.backend, block_size=options.block_size)
    clock = _StepClock(runtime.device)
    # The same call as single-process generate; a CPU generator gives every rank the same noise.
    kwargs = call_kwargs(pipe, plan, options, plan.steps, None, clock.callback, device=runtime.device,
                          generator_device="cpu")  # fmt: skip

    t1 = time.perf_counter()
    with torch.inference_mode(), step_end_callback(pipe, clock.callback):
        result = run_parallel(
            pipe, kwargs, config, options.parallel, runtime, output_type="np", vae_overlap=vae_overlap,
            ulysses=ulysses,
        )  # fmt: skip
    call_s = time.perf_counter() - t1
    marks = [t1, *clock.marks]
    step_times = tuple(b - a for a, b in zip(marks, marks[1:]))
    grid = plan.grid

    comms = _gather_objects(result.comm, runtime, "the communication counters")
    summary: dict[str, Any] = {}
    if runtime.is_main:
        if ulysses == "diffusers":  # its all-to-alls are diffusers' own, outside vidsparse's counters
            print(f"parallel   ulysses x{runtime.world_size}: bytes not counted (diffusers' collectives)", flush=True)
        else:
            print(format_comm(comms, plan.steps, options.parallel), flush=True)
        frames = as_uint8_frames(result.video[0])
        written, write_s = write_output(plan.out, frames, plan.fps)
        densities, step_blocks, step_work = _densities(
            result.patterns,
            grid,
            backend_name(config.backend, torch.empty(0, device=runtime.device)),
            result.full_layers,
        )
        summary = dict(shape=frames.shape, out=written, densities=densities, load_s=load_s, call_s=call_s,
                       blocks=run_mean(step_blocks, result.sparse_steps, plan.steps),
                       work=run_mean(step_work, result.sparse_steps, plan.steps),
                       step_times=step_times, decode_s=result.decode_seconds, comm=result.comm,
                       sparse_steps=result.sparse_steps, write_s=write_s)  # fmt: skip
    summary = _broadcast(summary, runtime)
    frames_out = frames if runtime.is_main else np.broadcast_to(np.zeros((), np.uint8), summary["shape"])
    steps = summary["step_times"]
    return GenerateResult(
        frames=frames_out,
        fps=plan.fps,
        out=summary["out"],
        model=plan.info.source,
        family=plan.info.family,
        pattern=f"{plan.pattern_name or 'dense'} ({options.parallel} x{runtime.world_size})",
        grid=grid,
        steps=plan.steps,
        wall_s=time.perf_counter() - t_start,
        load_s=summary["load_s"],
        denoise_s=float(sum(steps)),
        step_times_s=tuple(steps),
        time_per_step_s=float(statistics.median(steps)) if steps else 0.0,
        sparse_steps=summary["sparse_steps"],
        densities=summary["densities"],
        kept_blocks=summary["blocks"],
        computed_work=summary["work"],
        call_s=summary["call_s"],
        decode_s=summary["decode_s"],
        prepare_s=prepare_s,
        write_s=summary["write_s"],
        lora=plan.lora_summary,
        segments=plan.animate.segments if plan.animate is not None else 1,
        settings=plan.settings(options),
    )


def _densities(
    patterns: dict[int, Any], grid: tuple[int, int, int], backend: str, full: dict[int, str] | None = None
) -> tuple[Any, float, float]:
    """Per layer-group densities and work of the whole-video patterns the run used, as ``generate``
    reports them (``backend``: the resolved backend, whose kernel path the work counts; ``full``:
    layers run dense because their plan kept every pair); and the mean over layers of the
    kept-block fraction and of the work (dense layers: 1)."""
    import vidsparse as vs
    from vidsparse.density import token_density
    from vidsparse.generation.meter import group_densities
    from vidsparse.layout import VideoLayout
    from vidsparse.work import executed_work

    layout = VideoLayout(*grid)
    seen: dict[int, tuple] = {}
    for layer, (pattern, block) in patterns.items():
        if pattern.name != "dense":
            p = vs.plan(pattern, layout, block_size=block or 128)
            w = executed_work(p, backend)
            seen[layer] = (repr(pattern), float(p.density), float(token_density(p).mean()), w.computed_fraction, w.path)
    dense = frozenset(layer for layer, (pattern, _) in patterns.items() if pattern.name == "dense")
    groups = group_densities(max(patterns) + 1 if patterns else 0, dense, seen, full)
    n = max(1, sum(len(g.layers) for g in groups))
    blocks = sum(g.block_density * len(g.layers) for g in groups) / n
    work = sum((1.0 if g.work is None else g.work) * len(g.layers) for g in groups) / n
    return groups, blocks, work


def run_mean(sparse_step_value: float, sparse_steps: int, steps: int) -> float:
    """A per-step fraction (kept blocks, work) over the whole run, as single-process ``generate``
    counts it: the steps that ran no sparse layer (dense warm-up ``dense_first_steps``,
    ``dense_last_steps``) count 1 each, a sparse step ``sparse_step_value`` (its mean over
    layers, dense layers counted as 1)."""
    if steps <= 0:
        return 1.0
    sparse_steps = min(max(sparse_steps, 0), steps)
    return (sparse_steps * sparse_step_value + (steps - sparse_steps)) / steps


def format_comm(comms: list[dict[str, Any]], steps: int, mode: str) -> str:
    """One summary line: bytes sent per denoising step (busiest rank, all ranks) by operation."""
    per_rank = [c.get("total_bytes", 0) / max(1, steps) for c in comms]
    ops: dict[str, int] = {}
    for c in comms:
        for op, n in c.get("bytes_sent", {}).items():
            ops[op] = ops.get(op, 0) + n
    detail = ", ".join(f"{op} {n / max(1, steps) / 1e6:.3g} MB" for op, n in sorted(ops.items()))
    return (
        f"parallel   {mode} x{len(comms)}: {max(per_rank) / 1e6:.3g} MB sent per step by the busiest rank, "
        f"{sum(per_rank) / 1e6:.3g} MB by all ranks ({detail})"
    )


def _gather_objects(obj: Any, runtime: ParallelRuntime, what: str) -> list[Any]:
    import torch.distributed as dist

    from vidsparse.parallel.runtime import guard

    out: list[Any] = [None] * runtime.world_size
    with guard(runtime, f"all_gather of {what}"):
        dist.all_gather_object(out, obj, group=runtime.group)
    return out


def _broadcast(obj: dict[str, Any], runtime: ParallelRuntime) -> dict[str, Any]:
    import torch.distributed as dist

    from vidsparse.parallel.runtime import guard

    box = [obj]
    with guard(runtime, "broadcast of the summary from rank 0"):
        dist.broadcast_object_list(box, src=0, group=runtime.group)
    return box[0]


def _version() -> str:
    from vidsparse import __version__

    return __version__
