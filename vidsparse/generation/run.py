"""``generate``: one video from a ``GenerateOptions`` (see ``vidsparse.generation``).

Steps: ``prepare`` (options, model config, pattern on the grid) -> ``load_pipeline`` (+ LoRA,
placement) -> optional dense baseline -> ``vs.apply`` -> ``run_pipeline`` metered by
``SparseMeter`` -> ``GenerateResult`` (video written atomically). ``--parallel clip|ulysses``
hands the options to ``vidsparse.parallel.generate_parallel`` before any check, so every rank
validates and agrees.
"""

from __future__ import annotations

import statistics
import time
import warnings
from dataclasses import replace

from vidsparse.generation.call import run_pipeline, warmup
from vidsparse.generation.loading import compile_pipeline, load_lora, load_pipeline, place_pipeline
from vidsparse.generation.meter import SparseMeter, num_layers
from vidsparse.generation.options import PARALLEL_MODES, GenerateOptions, prepare
from vidsparse.generation.result import DenseComparison, GenerateResult, LayerGroupDensity, write_output


def generate(options: GenerateOptions) -> GenerateResult:
    """Generate one video (see the module docstring); the file, if any, is written atomically."""
    t_start = time.perf_counter()
    if isinstance(options, GenerateOptions) and options.freeswim is not None and options.parallel != "none":
        raise ValueError("--freeswim runs on one device; drop --parallel (FreeSwim has no shard plan yet).")
    if isinstance(options, GenerateOptions) and options.parallel in PARALLEL_MODES and options.parallel != "none":
        # Before prepare(): generate_parallel checks the options on every rank and then lets all
        # ranks agree, so an option one rank rejects stops every rank instead of leaving peers hanging.
        return _generate_parallel(options)
    plan = prepare(options)
    prepare_s = time.perf_counter() - t_start
    for message in plan.lora_summary.warnings if plan.lora_summary else ():
        warnings.warn(f"--lora: {message}", UserWarning, stacklevel=2)  # before the long part: time to stop
    if plan.prompt_note:
        warnings.warn(plan.prompt_note, UserWarning, stacklevel=2)

    t0 = time.perf_counter()
    pipe = load_pipeline(plan, options.seed)
    if plan.lora is not None:
        load_lora(pipe, plan.lora, options.lora_scale)
    if options.cpu_offload:
        pipe.enable_model_cpu_offload(device=plan.device)
    else:
        place_pipeline(pipe, plan.device)
    pipe.set_progress_bar_config(disable=not options.progress, desc="denoising", leave=False)
    load_s = time.perf_counter() - t0
    if plan.freeswim is not None:  # FreeSwim's two stages (generation.freeswim)
        from vidsparse.generation.freeswim import run_freeswim_generation

        return run_freeswim_generation(pipe, plan, options, t_start=t_start, prepare_s=prepare_s, load_s=load_s)

    if plan.sparse_config is not None and options.compare_dense:
        # vs.apply's checks that need the loaded transformer (its layer count), before the dense baseline;
        # without one, the vs.apply below comes first anyway
        import vidsparse as vs

        vs.apply(pipe, plan.sparse_config)
        vs.remove(pipe)
    dense_run = None
    if options.compare_dense:  # the dense baseline first, on the unpatched pipeline
        if options.compile:
            compile_pipeline(pipe)
        warmup(pipe, plan, options)
        dense_run = run_pipeline(pipe, plan, options)

    if plan.sparse_config is not None:
        import vidsparse as vs

        if options.compare_dense:  # warm the sparse kernels too: one step with every layer sparse
            vs.apply(pipe, replace(plan.sparse_config, dense_first_steps=0, dense_last_steps=0))
            warmup(pipe, plan, options)
        vs.apply(pipe, plan.sparse_config)
        meter = SparseMeter(pipe)
        if options.compile and not options.compare_dense:
            compile_pipeline(pipe)
        frames, step_times, call_s, decode_s = run_pipeline(pipe, plan, options, on_step=meter.tick)
        densities, kept_blocks = meter.summary()
        computed_work = meter.computed_work()
        sparse_steps = meter.sparse_steps
    else:
        if options.compile:
            compile_pipeline(pipe)
        frames, step_times, call_s, decode_s = run_pipeline(pipe, plan, options)
        n = num_layers(pipe)
        densities = (LayerGroupDensity(tuple(range(n)), "dense", 1.0, 1.0, 1.0, "dense"),) if n else ()
        kept_blocks, sparse_steps = 1.0, 0
        computed_work = 1.0

    denoise_s = float(sum(step_times))
    per_step = float(statistics.median(step_times)) if step_times else 0.0
    comparison = None if dense_run is None else DenseComparison.of(dense_run, frames, denoise_s)
    written, write_s = write_output(plan.out, frames, plan.fps)
    return GenerateResult(
        frames=frames,
        fps=plan.fps,
        out=written,
        model=plan.info.source,
        family=plan.info.family,
        pattern="dense" if plan.sparse_config is None else (plan.pattern_name or "custom"),
        grid=plan.grid,
        steps=plan.steps,
        wall_s=time.perf_counter() - t_start,
        load_s=load_s,
        denoise_s=denoise_s,
        step_times_s=tuple(step_times),
        time_per_step_s=per_step,
        sparse_steps=sparse_steps,
        densities=densities,
        kept_blocks=kept_blocks,
        dense=comparison,
        prepare_s=prepare_s,
        call_s=call_s,
        decode_s=decode_s,
        write_s=write_s,
        computed_work=computed_work,
        lora=plan.lora_summary,
        segments=plan.animate.segments if plan.animate is not None else 1,
        settings=plan.settings(options),
    )


def _generate_parallel(options: GenerateOptions) -> GenerateResult:
    try:
        from vidsparse.parallel import generate_parallel
    except ImportError as exc:
        raise ValueError(
            f"--parallel {options.parallel} needs vidsparse.parallel.generate_parallel, which failed to import: {exc}."
        ) from None
    return generate_parallel(options)


__all__ = ["generate"]
