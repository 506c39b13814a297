"""Time sparse attention kernels on real video-model shapes and write JSON + Markdown.

For each shape (Wan2.1-1.3B 480p, Wan2.1-14B 720p, HunyuanVideo 720p), each pattern at its
default settings and synthetic random block plans at given densities, it times the
vidsparse Triton kernel, torch SDPA (best of flash / cuDNN / efficient; dense), FlexAttention
compiled with the same BlockMask, and NATTEN for GNA when installed; forward and
forward+backward (CUDA events, warmup, median of --repeats). Plan building, the Triton
kernel's plan views and the token permutation other backends need are timed separately.

TFLOP/s count the work a backend does: 4*bs*bs*D per computed block per head for sparse
backends, 4*S*S*D per head for SDPA, times 2.5 for forward+backward.

Results go to <out-dir>/attention_<device>_<date>.json (schema: benchmarks/README.md) and a
Markdown table beside it. Needs a CUDA GPU; '--device cpu --quick' is a tiny smoke run
(the Triton kernel then needs TRITON_INTERPRET=1 in the environment).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

import vidsparse as vs
from vidsparse.benchcore import (
    QUICK_GPU_SHAPES,
    SHAPES,
    BenchShape,
    RandomBlocks,
    dense_flops,
    sdpa_candidates,
    sparse_flops,
)
from vidsparse.benchmeta import device_name, git_commit, json_safe, package_version
from vidsparse.cli import flags_given
from vidsparse.kernels.backends import get_backend
from vidsparse.patterns import fitted_pattern
from vidsparse.patterns.base import Pattern
from vidsparse.plan import BlockSparsePlan, build_static_plan
from vidsparse.video_io import check_writable_dir

SCHEMA = "vidsparse.bench.attention/1"
CPU_CAVEAT = (
    "CPU run at a tiny shape (the Triton kernel, where listed, in its interpreter; SDPA and Flex on CPU): the "
    "times and the 'vs SDPA' ratios check that everything runs and say nothing about GPU speed."
)
BACKENDS = ("triton", "sdpa", "flex", "natten")
DIRECTIONS = ("fwd", "fwd+bwd")


@dataclass
class Row:
    """One measurement (see benchmarks/README.md)."""

    shape: str
    pattern: str
    density: float
    backend: str
    direction: str
    ms: float | None
    tflops: float | None
    flops: float | None = None
    nominal_density: float | None = None
    note: str = ""
    error: str | None = None
    extra: dict = field(default_factory=dict)


# -- arguments -----------------------------------------------------------------------------


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    _add_benchmark_flags(parser)
    parser.add_argument(
        "--out-dir",
        default=None,
        help=f"where the JSON and Markdown go (default {_default_out_dir()}, outside the checkout)",
    )
    suite = parser.add_argument_group("the budgeted GPU suite (--suite; see benchmarks/README.md)")
    suite.add_argument(
        "--suite", action="store_true", help="run the staged, budgeted device suite instead (benchmarks/gpu_suite.py)"
    )
    _add_suite_flags(suite)


def _add_suite_flags(parser: argparse.ArgumentParser) -> None:
    from vidsparse import gpu_suite

    gpu_suite.add_arguments(parser, with_out_dir=False)


def _check_mode_flags(args: argparse.Namespace) -> None:
    """The kernel benchmark and ``--suite`` take different flags; one of the other mode's would be
    silently ignored (``--render`` without ``--suite`` would run the GPU benchmark instead)."""
    if getattr(args, "suite", False):
        wrong = flags_given(args, _add_benchmark_flags)
        if wrong:
            raise ValueError(
                f"{', '.join(wrong)}: flags of the kernel benchmark, which --suite does not read (it runs its "
                "fixed stages; benchmarks/README.md). Drop them, or drop --suite."
            )
    else:
        wrong = flags_given(args, _add_suite_flags)
        if wrong:
            raise ValueError(f"{', '.join(wrong)}: flags of the device suite; add --suite (or drop them).")


def _add_benchmark_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--shapes",
        default=None,
        help=f"comma list of {', '.join(SHAPES)} (default: the three model shapes; quick: wan-1.3b, or tiny on CPU)",
    )
    parser.add_argument(
        "--patterns",
        default=None,
        help="comma list of registered patterns at their defaults fitted to each shape, 'all' or 'none' "
        "(default: all; CPU quick: dense)",
    )
    parser.add_argument(
        "--densities",
        default=None,
        help="synthetic random-block densities in %% (default 10,25,50,100; quick 25,100; CPU quick: 50), or 'none'",
    )
    parser.add_argument(
        "--backends",
        default=None,
        help=f"comma list of {', '.join(BACKENDS)} (default: all; on CPU those that run there)",
    )
    parser.add_argument("--directions", default=None, help="comma list of fwd, fwd+bwd (default: both)")
    parser.add_argument(
        "--dtype", default=None, choices=("bf16", "fp16", "fp32"), help="input dtype (default bf16; fp32 on CPU)"
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="timed runs per measurement, median reported (default 20; quick 5; CPU 1)",
    )
    parser.add_argument("--warmup", type=int, default=None, help="untimed runs first (default 3; CPU 1)")
    parser.add_argument("--block-size", type=int, default=None, help="plan block size (default 128; CPU: 16)")
    parser.add_argument(
        "--batch", type=int, default=None, help="batch size (default 1; e.g. 2 for classifier-free guidance)"
    )
    parser.add_argument(
        "--device", default="cuda", choices=("cuda", "cpu"), help="cuda (default) or cpu (only with --quick)"
    )
    parser.add_argument(
        "--quick", action="store_true", help="fewer shapes, densities and repeats (the only mode on CPU)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of inputs and random block plans (default 0)")


def _default_out_dir() -> Path:
    from vidsparse.gpu_suite import default_out_dir

    return default_out_dir()


@dataclass(frozen=True)
class Settings:
    shapes: tuple[BenchShape, ...]
    patterns: tuple[str, ...]
    densities: tuple[float, ...]
    backends: tuple[str, ...]
    directions: tuple[str, ...]
    dtype: torch.dtype
    repeats: int
    warmup: int
    block_size: int
    device: torch.device
    out_dir: Path
    quick: bool
    seed: int


_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


#: The largest shape a CPU run takes (tiny's 56): the reference and the interpreter are for smoke runs.
CPU_MAX_TOKENS = 4096


def _triton_cpu_reason() -> str | None:
    """Why the Triton kernels cannot run on this CPU (no interpreter), or None."""
    return get_backend("triton").can_run_on(torch.device("cpu"), torch.float32)


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Validate the flags (ValueError with the fix on bad input)."""
    cpu = args.device == "cpu"
    if cpu and not args.quick:
        raise ValueError(
            "vidsparse bench times GPU kernels; on CPU only a smoke run is possible: pass --device cpu --quick."
        )
    if not cpu and not torch.cuda.is_available():
        raise ValueError(
            "No CUDA GPU is available: vidsparse bench measures GPU kernels. Run it on a CUDA machine, "
            "or pass --device cpu --quick for a tiny smoke run."
        )
    if args.shapes is not None:
        names = _csv(args.shapes)
        if not names:
            raise ValueError(f"--shapes names no shape ({args.shapes!r}); expected some of {', '.join(SHAPES)}.")
    else:
        names = ["tiny"] if cpu else list(QUICK_GPU_SHAPES if args.quick else ("wan-1.3b", "wan-14b", "hunyuan"))
    unknown = [n for n in names if n not in SHAPES]
    if unknown:
        raise ValueError(f"Unknown shape(s) {unknown}; expected some of {', '.join(SHAPES)}.")
    too_big = [n for n in names if cpu and SHAPES[n].layout.seq_len > CPU_MAX_TOKENS]
    if too_big:
        raise ValueError(
            f"--shapes {','.join(too_big)} on CPU: {SHAPES[too_big[0]].layout.seq_len:,} tokens would run for hours in "
            f"the CPU reference and Triton's interpreter; a CPU run is a smoke test of the tiny shape (at most "
            f"{CPU_MAX_TOKENS:,} tokens). Drop --shapes, or run on a GPU."
        )
    batch = args.batch or 1
    if batch < 1:
        raise ValueError(f"--batch must be >= 1, got {batch}.")
    shapes = tuple(BenchShape(**{**asdict(SHAPES[n]), "batch": batch}) for n in names)

    if args.patterns is None:
        patterns = ["dense"] if cpu else list(vs.PATTERNS)
    elif args.patterns.strip().lower() == "none":
        patterns = []
    elif args.patterns.strip().lower() == "all":
        patterns = list(vs.PATTERNS)
    else:
        patterns = [p.lower().replace("_", "-") for p in _csv(args.patterns)]
    bad = [p for p in patterns if p not in vs.PATTERNS]
    if bad:
        raise ValueError(f"Unknown pattern(s) {bad}; registered: {', '.join(sorted(vs.PATTERNS))}.")

    if args.densities is None:
        dens = [50.0] if cpu else ([25.0, 100.0] if args.quick else [10.0, 25.0, 50.0, 100.0])
    elif args.densities.strip().lower() == "none":
        dens = []
    else:
        try:
            dens = [float(d) for d in _csv(args.densities)]
        except ValueError:
            raise ValueError(
                f"--densities must be numbers in percent like 10,25,50,100, got {args.densities!r}."
            ) from None
    if args.densities is not None and args.densities.strip().lower() != "none" and not dens:
        raise ValueError(f"--densities names no density ({args.densities!r}); e.g. 10,25,50,100, or 'none'.")
    if any(not 0 < d <= 100 for d in dens):
        raise ValueError(f"--densities are percentages in (0, 100], got {dens}.")

    if args.backends is None:
        backends = [b for b in BACKENDS if not (cpu and b == "triton" and _triton_cpu_reason())]
    else:
        backends = [b.lower() for b in _csv(args.backends)]
        bad = [b for b in backends if b not in BACKENDS]
        if bad or not backends:
            raise ValueError(f"--backends must be a comma list of {', '.join(BACKENDS)}, got {args.backends!r}.")
        if cpu and "triton" in backends and (why := _triton_cpu_reason()):
            raise ValueError(f"--backends triton with --device cpu: {why}; or drop triton from --backends.")
    aliases = {
        "fwd": "fwd",
        "forward": "fwd",
        "fwd+bwd": "fwd+bwd",
        "fwdbwd": "fwd+bwd",
        "bwd": "fwd+bwd",
        "train": "fwd+bwd",
    }
    directions = []
    if args.directions is not None and not _csv(args.directions):
        raise ValueError(f"--directions names no direction ({args.directions!r}); expected fwd, fwd+bwd or both.")
    for d in _csv(args.directions) if args.directions is not None else DIRECTIONS:
        if d.lower() not in aliases:
            raise ValueError(f"--directions must be a comma list of fwd, fwd+bwd, got {args.directions!r}.")
        directions.append(aliases[d.lower()])
    dtype = _DTYPES[args.dtype or ("fp32" if cpu else "bf16")]
    repeats = args.repeats if args.repeats is not None else (1 if cpu else 5 if args.quick else 20)
    warmup = args.warmup if args.warmup is not None else (1 if cpu else 3)
    if repeats < 1 or warmup < 0:
        raise ValueError(f"--repeats must be >= 1 and --warmup >= 0, got {repeats} and {warmup}.")
    block = args.block_size if args.block_size is not None else 16 if cpu else 128
    if block < 16 or block & (block - 1):
        raise ValueError(f"--block-size must be a power of two >= 16 (64 or 128 on GPUs), got {block}.")
    if not patterns and not dens and "sdpa" not in backends:
        raise ValueError("Nothing to measure: --patterns none, --densities none and no sdpa in --backends.")
    out_dir = Path(args.out_dir).expanduser() if args.out_dir else _default_out_dir()
    check_writable_dir(out_dir, f"--out-dir {str(out_dir)!r}")  # before the measurements, not after
    return Settings(
        shapes=shapes,
        patterns=tuple(dict.fromkeys(patterns)),
        densities=tuple(dict.fromkeys(dens)),
        backends=tuple(dict.fromkeys(backends)),
        directions=tuple(dict.fromkeys(directions)),
        dtype=dtype,
        repeats=repeats,
        warmup=warmup,
        block_size=block,
        device=torch.device(args.device),
        out_dir=out_dir,
        quick=bool(args.quick),
        seed=args.seed,
    )


# -- timing --------------------------------------------------------------------------------


def time_ms(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int) -> float:
    """Median milliseconds of ``fn`` (CUDA events on GPU, perf_counter on CPU)."""
    for _ in range(warmup):
        fn()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return float(statistics.median(times))


def wall_ms(fn: Callable[[], object], device: torch.device) -> tuple[float, object]:
    """Wall-clock milliseconds of one call (host work such as plan building), and its result."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - t0) * 1e3, out


def _no_grad(fn: Callable[[], object]) -> Callable[[], object]:
    def step():
        with torch.no_grad():
            return fn()

    return step


def _with_backward(fwd: Callable[[], torch.Tensor], leaves: tuple[torch.Tensor, ...], grad: torch.Tensor):
    def step():
        for t in leaves:
            t.grad = None
        fwd().backward(grad)

    return step


# -- FLOPs ---------------------------------------------------------------------------------


def format_rate(tflops: float | None) -> str:
    """TFLOP/s with a unit that keeps small (CPU) rates readable: 0.0004 -> '0.4 GFLOP/s'."""
    if tflops is None:
        return "-"
    if tflops >= 0.1:
        return f"{tflops:7.1f} TFLOP/s"
    if tflops >= 1e-4:
        return f"{tflops * 1e3:7.1f} GFLOP/s"
    return f"{tflops * 1e6:7.1f} MFLOP/s"


def _tflops(flops: float, ms: float | None) -> float | None:
    return None if not ms else flops / (ms * 1e-3) / 1e12


# -- backends ------------------------------------------------------------------------------


def _inputs(shape: BenchShape, s: Settings, grad: bool) -> tuple[torch.Tensor, ...]:
    g = torch.Generator(device=s.device).manual_seed(s.seed)
    dims = (shape.batch, shape.layout.seq_len, shape.heads, shape.head_dim)
    q, k, v, do = (torch.randn(dims, generator=g, device=s.device, dtype=s.dtype) for _ in range(4))
    if grad:
        for t in (q, k, v):
            t.requires_grad_(True)
    return q, k, v, do


def bench_sdpa(shape: BenchShape, s: Settings, direction: str) -> Row:
    """Dense SDPA, best of the fused kernels available (which one is in ``note``)."""
    import torch.nn.functional as F
    from torch.nn.attention import sdpa_kernel

    grad = direction == "fwd+bwd"
    q, k, v, do = _inputs(shape, s, grad)
    qt, kt, vt, dot = (t.detach().transpose(1, 2).contiguous() for t in (q, k, v, do))
    if grad:
        for t in (qt, kt, vt):
            t.requires_grad_(True)
    best, errors = None, []
    for name, backend in sdpa_candidates(s.device):
        try:
            with sdpa_kernel([backend]):
                fwd = lambda: F.scaled_dot_product_attention(qt, kt, vt)  # noqa: E731
                fn = _with_backward(fwd, (qt, kt, vt), dot) if grad else _no_grad(fwd)
                ms = time_ms(fn, s.device, s.warmup, s.repeats)
            if best is None or ms < best[1]:
                best = (name, ms)
        except Exception as exc:  # a backend that refuses this shape/dtype/GPU
            errors.append(f"{name}: {_short(exc)}")
            _free(s.device)
    flops = dense_flops(shape, direction)
    if best is None:
        return Row(shape.name, "dense", 1.0, "sdpa", direction, None, None, flops, error="; ".join(errors))
    return Row(shape.name, "dense", 1.0, "sdpa", direction, best[1], _tflops(flops, best[1]), flops, note=best[0])


def bench_triton(q, k, v, do, plan: BlockSparsePlan, s: Settings, direction: str) -> float:
    from vidsparse.kernels import triton_backend as tb

    reason = tb.unsupported_reason(q)
    if reason is not None:
        raise RuntimeError(reason)
    fwd = lambda: tb.attention(q, k, v, plan)  # noqa: E731
    fn = _with_backward(fwd, (q, k, v), do) if direction == "fwd+bwd" else _no_grad(fwd)
    return time_ms(fn, s.device, s.warmup, s.repeats)


def bench_flex(q, k, v, do, plan: BlockSparsePlan, s: Settings, direction: str) -> float:
    """FlexAttention on kernel-order tensors with the plan's BlockMask (permutation not timed)."""
    from vidsparse.kernels import flex

    g = plan.order.gather
    qk, kk, vk, dok = (t.detach()[:, g].transpose(1, 2).contiguous() for t in (q, k, v, do))
    grad = direction == "fwd+bwd"
    if grad:
        for t in (qk, kk, vk):
            t.requires_grad_(True)
    bm = flex.block_mask_from_plan(plan, None, q.shape[0])
    fwd = lambda: flex.run(qk, kk, vk, plan, block_mask=bm)[0]  # noqa: E731
    fn = _with_backward(fwd, (qk, kk, vk), dok) if grad else _no_grad(fwd)
    return time_ms(fn, s.device, s.warmup, s.repeats)


def natten_available() -> bool:
    try:
        import natten  # noqa: F401
    except ImportError:
        return False
    return True


def bench_natten(q, k, v, do, pattern: Pattern, shape: BenchShape, s: Settings, direction: str) -> float:
    """NATTEN na3d with the GNA pattern's parameters (natural token order, video only)."""
    import natten

    if shape.text_len:
        raise RuntimeError("NATTEN's na3d runs video-only grids; this shape has a text span")
    layout = shape.layout
    kernel = pattern.resolved_kernel(layout)
    dims = (shape.batch, *layout.grid, shape.heads, shape.head_dim)
    q5, k5, v5, do5 = (t.detach().reshape(dims).contiguous() for t in (q, k, v, do))
    grad = direction == "fwd+bwd"
    if grad:
        for t in (q5, k5, v5):
            t.requires_grad_(True)

    def fwd():
        return natten.na3d(
            q5,
            k5,
            v5,
            kernel_size=kernel,
            stride=pattern.stride,
            dilation=pattern.dilation,
            is_causal=pattern.is_causal,
        )

    fn = _with_backward(fwd, (q5, k5, v5), do5) if grad else _no_grad(fwd)
    return time_ms(fn, s.device, s.warmup, s.repeats)


def permute_ms(q, k, v, plan: BlockSparsePlan, s: Settings) -> float:
    """Gather q, k, v into kernel order and scatter an output back (what unfused backends pay)."""
    g, sc = plan.order.gather, plan.order.scatter

    def fn():
        qk, kk, vk = (t[:, g] for t in (q, k, v))
        return qk[:, sc], kk, vk

    with torch.no_grad():
        return time_ms(fn, s.device, s.warmup, s.repeats)


def prep_ms(plan: BlockSparsePlan, s: Settings) -> float:
    """Build the Triton kernel's plan views (masked-first lists and the transposed plan)."""
    from vidsparse.kernels.triton_plan import split_lists, transpose_lists

    def fn():
        split_lists(plan.kv_counts, plan.kv_indices, plan.mask_ids)
        transpose_lists(plan.kv_counts, plan.kv_indices, plan.mask_ids, plan.num_blocks)

    return wall_ms(fn, s.device)[0]


# -- driver --------------------------------------------------------------------------------


def _short(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip().splitlines()[0]
    return text[:300]


def _free(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _plan_for(pattern: Pattern, shape: BenchShape, s: Settings, q, k) -> tuple[BlockSparsePlan, float]:
    layout = shape.layout
    if pattern.dynamic:
        with torch.no_grad():
            ms, plan = wall_ms(lambda: pattern.dynamic_plan(layout, q.detach(), k.detach(), 0, s.block_size), s.device)
        return plan, ms
    ms, plan = wall_ms(lambda: build_static_plan(pattern, layout, shape.heads, 0, s.block_size, s.device), s.device)
    return plan, ms


def bench_pattern(
    label: str, pattern: Pattern, shape: BenchShape, s: Settings, nominal: float | None, log
) -> list[Row]:
    """All rows of one (shape, pattern): plan build, plan views, permutation, each backend x direction."""
    rows: list[Row] = []

    def add(backend, direction, ms, flops=None, density=float("nan"), note="", error=None, extra=None):
        rows.append(
            Row(shape.name, label, density, backend, direction, ms, _tflops(flops, ms) if flops else None, flops,
                nominal, note, error, extra or {})
        )  # fmt: skip
        tf = rows[-1].tflops
        shown = f"{ms:9.3f} ms" if ms is not None else ("    failed" if error else "   not run")
        log(f"  {shape.name:9s} {label:18s} {backend:12s} {direction:8s} {shown}"
            + (f" {format_rate(tf)}" if tf else "") + (f"  [{error or note}]" if error or ms is None else ""))  # fmt: skip

    q, k, v, do = _inputs(shape, s, True)
    try:
        pattern.validate(shape.layout)
        plan, build = _plan_for(pattern, shape, s, q, k)
    except Exception as exc:
        add("plan", "build", None, error=_short(exc))
        return rows
    density = plan.density
    add("plan", "build", build, density=density, note="dynamic" if pattern.dynamic else "static",
        extra={"video_density": plan.video_density, "block_size": plan.block_size})  # fmt: skip
    if "triton" in s.backends:
        try:
            add("triton-prep", "build", prep_ms(plan, s), density=density)
        except Exception as exc:
            add("triton-prep", "build", None, density=density, error=_short(exc))
    if not plan.order.identity:
        add("permute", "fwd", permute_ms(q.detach(), k.detach(), v.detach(), plan, s), density=density,
            note="gather q,k,v + scatter out (fused in the triton kernel)")  # fmt: skip

    for backend in s.backends:
        if backend == "sdpa":
            continue  # dense, measured once per shape
        if backend == "natten" and not (getattr(pattern, "name", "") == "gna" and natten_available()):
            continue
        for direction in s.directions:
            flops = sparse_flops(plan, shape, direction)
            if backend == "flex" and direction == "fwd+bwd" and s.device.type != "cuda":
                add(backend, direction, None, flops, density, note="not run: FlexAttention has no CPU backward")
                continue
            if backend == "natten" and shape.text_len:
                add(backend, direction, None, flops, density, note="not run: NATTEN's na3d takes no text span")
                continue
            try:
                if backend == "triton":
                    ms = bench_triton(q, k, v, do, plan, s, direction)
                elif backend == "flex":
                    ms = bench_flex(q, k, v, do, plan, s, direction)
                else:
                    ms = bench_natten(q, k, v, do, pattern, shape, s, direction)
                add(backend, direction, ms, flops, density)
            except Exception as exc:
                add(backend, direction, None, flops, density, error=_short(exc))
                _free(s.device)
    del q, k, v, do
    _free(s.device)
    return rows


def run_benchmarks(s: Settings, log=print) -> list[Row]:
    rows: list[Row] = []
    for shape in s.shapes:
        log(f"shape {shape.name}: grid {shape.frames}x{shape.height}x{shape.width}"
            f"{f' + {shape.text_len} text {shape.text_position}' if shape.text_len else ''}, "
            f"{shape.layout.seq_len} tokens, batch {shape.batch}, {shape.heads} heads x {shape.head_dim}")  # fmt: skip
        if "sdpa" in s.backends:
            for direction in s.directions:
                rows.append(bench_sdpa(shape, s, direction))
                r = rows[-1]
                log(f"  {shape.name:9s} {'dense':18s} {'sdpa':12s} {direction:8s} "
                    + (f"{r.ms:9.3f} ms {format_rate(r.tflops)} ({r.note})" if r.ms else f"failed [{r.error}]"))  # fmt: skip
                _free(s.device)
        for name in s.patterns:
            try:
                pattern = fitted_pattern(name, shape.layout, s.block_size)
            except Exception as exc:
                rows.append(Row(shape.name, name, float("nan"), "plan", "build", None, None, error=_short(exc)))
                continue
            rows.extend(bench_pattern(name, pattern, shape, s, None, log))
        for d in s.densities:
            label = f"random-{d:g}%"
            rows.extend(bench_pattern(label, RandomBlocks(d / 100.0, s.seed), shape, s, d / 100.0, log))
    return rows


# -- output --------------------------------------------------------------------------------


def report(rows: list[Row], s: Settings) -> dict:
    commit, dirty = git_commit()
    return json_safe(
        {
            "schema": SCHEMA,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "device": device_name(s.device),
            "device_type": s.device.type,
            "torch": torch.__version__,
            "triton": package_version("triton"),
            "natten": package_version("natten"),
            "cuda": torch.version.cuda,
            "python": platform.python_version(),
            "git_commit": commit,
            "git_dirty": dirty,
            "dtype": str(s.dtype).replace("torch.", ""),
            "block_size": s.block_size,
            "repeats": s.repeats,
            "warmup": s.warmup,
            "quick": s.quick,
            "triton_interpret": os.environ.get("TRITON_INTERPRET") == "1",
            "shapes": {
                sh.name: {
                    "grid": [sh.frames, sh.height, sh.width],
                    "text_len": sh.text_len,
                    "text_position": sh.text_position,
                    "seq_len": sh.layout.seq_len,
                    "batch": sh.batch,
                    "heads": sh.heads,
                    "head_dim": sh.head_dim,
                }
                for sh in s.shapes
            },
            "results": [asdict(r) for r in rows],
        }
    )


def markdown(rep: dict) -> str:
    """A Markdown table of the results, with speedup over dense SDPA per shape and direction."""
    sdpa = {(r["shape"], r["direction"]): r["ms"] for r in rep["results"] if r["backend"] == "sdpa" and r["ms"]}
    lines = [
        f"# vidsparse attention benchmark: {rep['device']}",
        "",
        f"{rep['created']}, torch {rep['torch']}, triton {rep['triton']}, commit {rep['git_commit'][:12]}"
        f"{' (dirty)' if rep['git_dirty'] else ''}, {rep['dtype']}, block {rep['block_size']}, "
        f"median of {rep['repeats']} after {rep['warmup']} warmup.",
        "",
        *([CPU_CAVEAT, ""] if rep["device_type"] == "cpu" else []),
        "| shape | pattern | density | backend | direction | ms | rate | vs SDPA | note |",
        "|---|---|---:|---|---|---:|---:|---:|---|",
    ]
    for r in rep["results"]:
        ms = f"{r['ms']:.3f}" if r["ms"] is not None else "-"
        tf = format_rate(r["tflops"]).strip() if r["tflops"] is not None else "-"
        base = sdpa.get((r["shape"], r["direction"]))
        timed = r["backend"] in ("triton", "flex", "natten", "sdpa")
        speed = f"{base / r['ms']:.2f}x" if base and r["ms"] and timed else ""
        dens = f"{100 * r['density']:.1f}%" if r["density"] is not None else "-"
        note = r["error"] and f"error: {r['error']}" or r["note"]
        lines.append(
            f"| {r['shape']} | {r['pattern']} | {dens} | {r['backend']} | {r['direction']} | {ms} | {tf} | {speed} | {note} |"
        )
    return "\n".join(lines) + "\n"


def write(rep: dict, out_dir: Path) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    slug = re.sub(r"[^a-z0-9]+", "-", rep["device"].lower()).strip("-") or "device"
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    base = out_dir / f"attention_{slug}_{stamp}"
    json_path, md_path = base.with_suffix(".json"), base.with_suffix(".md")
    json_path.write_text(json.dumps(rep, indent=1) + "\n", encoding="utf-8")
    md_path.write_text(markdown(rep), encoding="utf-8")
    return json_path, md_path


def run(args: argparse.Namespace) -> int:
    """Entry point of ``vidsparse bench``: measure, print, write JSON + Markdown (or ``--suite``)."""
    _check_mode_flags(args)
    if getattr(args, "suite", False):
        from vidsparse import gpu_suite

        return gpu_suite.run_from_args(args)
    s = settings_from_args(args)
    torch.manual_seed(s.seed)
    rows = run_benchmarks(s, log=lambda m: print(m, flush=True))
    rep = report(rows, s)
    json_path, md_path = write(rep, s.out_dir)
    print(f"wrote {json_path} and {md_path}")
    if s.device.type == "cpu":
        print(CPU_CAVEAT)
    failed = [r for r in rows if r.error]
    if failed:
        print(f"{len(failed)} measurement(s) failed; see the 'error' fields:", file=sys.stderr)
        for r in failed:
            print(f"  {r.shape} {r.pattern} {r.backend} {r.direction}: {r.error}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m vidsparse.bench`` / benchmarks/attention.py."""
    parser = argparse.ArgumentParser(prog="vidsparse bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except (ValueError, TypeError) as exc:
        print(f"vidsparse bench: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
