"""The one budgeted device run: environment, compiled-kernel correctness, attention timing, one
denoising step; each stage appended to ``<out-dir>/gpu_suite.json`` the moment it finishes.

GPU time is scarce (one run of a few minutes), so the suite is built to be run once and to keep
whatever it managed: the JSON is rewritten atomically after every case, a stage whose
estimated cost does not fit the remaining budget is recorded as skipped (with its estimate and
the time left), and a stage that runs out of budget part-way stops and says so. ``--dry-run``
runs the same code at tiny shapes on the CPU (Triton interpreter): the CI test of the suite.

Stages, in order (``STAGES``):

- ``environment``: device, torch, triton, diffusers, natten (and whether natten's compiled
  kernels run), CUDA, commit.
- ``correctness``: the compiled Triton kernels against torch SDPA (dense plan) and the exact
  torch reference (every other registered pattern) on the *same* plan: forward of every
  pattern, dq/dk/dv of radial, tile and vmoba; bf16 and fp16; a small shape and a real one
  (Wan2.1-1.3B's 480p grid with 2 heads). Relative L2 error against an fp32 reference. VMoBA
  (per-query selection) runs on the query-tile path twice, caller order (row gather) and kernel
  order (TMA tiles), both reading the group-major selection (the case records its layout), and
  on its default key-block-major path at each of its three partitions.
- ``attention-wan-1.3b``, ``attention-wan-14b``: one attention call at the models' shapes:
  Triton vs SDPA (best fused kernel) vs compiled FlexAttention on the identical plan, forward
  and forward+backward, for dense, radial, tile and a 25 % random block plan. Flex compiles
  once per (shape, plan, direction); the recompile limit is raised and a hit made an error so
  Flex never silently runs eagerly (which materialises the full score matrix).
- ``step-wan-1.3b``: one Wan2.1-1.3B transformer forward at 81x480x832 (published config,
  random bf16 weights), dense vs radial and tile at the family defaults (each forward in the
  plans' kernel order), and radial on the per-layer gather path (``kernel_order`` False) for the
  A/B; outputs compared to dense.
- ``vmoba-wan-1.3b``: VMoBA's default path (key-block-major kernels) at Wan2.1-1.3B 480p on the
  temporal and spatial partitions, K/V by tensor descriptor (the spatial one from a group-major
  copy made per call) vs row gathers (``VIDSPARSE_TRITON_TMA=0``), forward and forward+backward.
- ``attention-hunyuan``: HunyuanVideo 720p shapes, only if budget remains.

``render_markdown`` turns the JSON into ``gpu_suite.md``: versions, tables, and the issue's
targets met or missed.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import math
import os
import platform
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from vidsparse.benchcore import SHAPES, RandomBlocks, attention_flops, dense_flops, sdpa_candidates, sparse_flops
from vidsparse.benchmeta import device_name, git_commit, json_safe, package_version
from vidsparse.video_io import check_writable_dir

SCHEMA = "vidsparse.gpu_suite/1"
JSON_NAME = "gpu_suite.json"
MD_NAME = "gpu_suite.md"

# Relative L2 error against the fp32 reference, per input dtype (forward; gradients x GRAD_SLACK).
# bf16 rounding alone puts an attention output near 3e-3; fp16 near 4e-4.
TOLERANCE = {torch.bfloat16: 2e-2, torch.float16: 5e-3, torch.float32: 1e-4}
GRAD_SLACK = 3.0
GRAD_PATTERNS = ("radial", "tile", "vmoba")
STAGE_CAP = 1.5  # a stage stops part-way at 1.5x its estimate

# Targets of issue 10 (checked by render_markdown).
TARGET_DENSE_VS_SDPA = 0.8
# speedup vs SDPA >= 0.85 / d, for d >= 0.1, with d the work the kernel computes over dense: computed
# blocks x block^2 / S^2 (padding included). The plan's block density counts blocks of its padded
# grid (each frame or tile padded to whole blocks), which is smaller than that for a padded plan
# (tile at Wan 480p: 0.24 against 0.35 computed), so 0.85 / density could ask for more than a
# kernel skipping every masked block can give.
TARGET_SPARSE_EFFICIENCY = 0.85
TARGET_VS_FLEX = 1.3
TARGET_STEP = {"radial": 1.4, "tile": 1.8}


def default_out_dir() -> Path:
    """Outside any checkout: ``$XDG_CACHE_HOME/vidsparse/bench`` (``~/.cache/vidsparse/bench``)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "vidsparse" / "bench"


# -- the record ----------------------------------------------------------------------------


class Record:
    """The suite's JSON document, rewritten atomically (temp file + rename) on every change."""

    def __init__(self, path: Path, header: dict[str, Any]) -> None:
        self.path = path
        self.doc: dict[str, Any] = {**header, "stages": []}
        self.flush()

    def flush(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(json_safe(self.doc), indent=1) + "\n", encoding="utf-8")
        os.replace(tmp, self.path)

    def stage(self, entry: dict[str, Any]) -> dict[str, Any]:
        self.doc["stages"].append(entry)
        self.flush()
        return entry


class OutOfBudget(Exception):
    """A stage stopped part-way: the next case would not fit the remaining budget."""


@dataclass
class Ctx:
    """What every stage sees: settings, the clock, and a way to record a case as it lands."""

    device: torch.device
    dry_run: bool
    budget_s: float
    t0: float
    seed: int = 0
    autotune: bool = False
    record: Record | None = None
    entry: dict[str, Any] = field(default_factory=dict)
    log: Callable[[str], None] = print

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    stage_end: float = math.inf  # monotonic time by which the running stage must stop

    def remaining(self) -> float:
        return self.budget_s - self.elapsed()

    def need(self, seconds: float, what: str) -> None:
        """Stop the stage (OutOfBudget) if ``what`` would overrun the budget or the stage's cap."""
        left = min(self.remaining(), self.stage_end - time.monotonic())
        if seconds > left:
            raise OutOfBudget(f"{what} needs ~{seconds:.0f} s, {max(0.0, left):.0f} s left (budget or stage cap)")

    def add(self, case: dict[str, Any]) -> None:
        self.entry.setdefault("cases", []).append(case)
        if self.record is not None:
            self.record.flush()

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


@dataclass(frozen=True)
class Stage:
    name: str
    run: Callable[[Ctx], dict[str, Any]]
    estimate: Callable[[Ctx], float]  # seconds on this device (dry run: CPU interpreter)
    about: str


# -- helpers -------------------------------------------------------------------------------


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """||x - ref|| / ||ref|| in fp32 (inf if x has a non-finite value)."""
    x, ref = x.detach().float(), ref.detach().float()
    if not bool(torch.isfinite(x).all()):
        return math.inf
    return float((x - ref).norm() / ref.norm().clamp_min(1e-30))


def _short(exc: BaseException) -> str:
    return " ".join(f"{type(exc).__name__}: {exc}".split())[:400]


def _free(device: torch.device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _randn(shape, device, dtype, gen) -> torch.Tensor:
    return torch.randn(shape, generator=gen, device=device, dtype=torch.float32).to(dtype)


def time_ms(fn: Callable[[], object], ctx: Ctx, warmup: int, repeats: int) -> float:
    """Median ms of ``fn`` after ``warmup`` untimed calls (CUDA events; perf_counter on CPU)."""
    import statistics

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if ctx.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(float(start.elapsed_time(end)))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return float(statistics.median(times))


@contextlib.contextmanager
def env_setting(name: str, value: str):
    """Environment variable ``name`` = ``value`` for the duration (the kernels read their
    switches, e.g. VIDSPARSE_TRITON_AUTOTUNE and VIDSPARSE_TRITON_TMA, on every launch)."""
    saved = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = saved


def autotune_setting(on: bool):
    """VIDSPARSE_TRITON_AUTOTUNE on or off for the duration."""
    return env_setting("VIDSPARSE_TRITON_AUTOTUNE", "1" if on else "0")


def guard_recompiles(limit: int = 256) -> dict[str, Any]:
    """Raise torch's recompile limit and make a hit an error, so compiled Flex never falls back
    to eager (which would materialise the S x S scores). Returns what was set."""
    import torch._dynamo.config as dcfg

    dcfg.recompile_limit = max(int(dcfg.recompile_limit), limit)
    dcfg.accumulated_recompile_limit = max(int(dcfg.accumulated_recompile_limit), 4 * limit)
    dcfg.fail_on_recompile_limit_hit = True
    return {"recompile_limit": dcfg.recompile_limit, "fail_on_recompile_limit_hit": True}


# -- stage: environment --------------------------------------------------------------------


def _natten_status(device: torch.device) -> dict[str, Any]:
    try:
        import natten
    except Exception as exc:
        return {"version": None, "kernels": False, "reason": _short(exc)}
    out: dict[str, Any] = {"version": getattr(natten, "__version__", None)}
    if device.type != "cuda":
        out.update(kernels=False, reason="no CUDA device")
        return out
    try:
        q = torch.randn(1, 4, 4, 4, 1, 32, device=device, dtype=torch.float16)
        natten.na3d(q, q, q, kernel_size=(3, 3, 3))
        torch.cuda.synchronize(device)
        out["kernels"] = True
    except Exception as exc:
        out.update(kernels=False, reason=_short(exc))
    return out


def stage_environment(ctx: Ctx) -> dict[str, Any]:
    commit, dirty = git_commit()
    info: dict[str, Any] = {
        "device": device_name(ctx.device),
        "device_type": ctx.device.type,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": package_version("triton"),
        "diffusers": package_version("diffusers"),
        "natten": _natten_status(ctx.device),
        "git_commit": commit,
        "git_dirty": dirty,
        "triton_interpret": os.environ.get("TRITON_INTERPRET") == "1",
        "autotune": ctx.autotune,
    }
    if ctx.device.type == "cuda":
        p = torch.cuda.get_device_properties(ctx.device)
        info.update(capability=list(torch.cuda.get_device_capability(ctx.device)), sm_count=p.multi_processor_count,
                    memory_gb=round(p.total_memory / 2**30, 1))  # fmt: skip
    return {"info": info, "pass": True}


# -- stage: correctness --------------------------------------------------------------------


def _correctness_shapes(ctx: Ctx):
    import vidsparse as vs

    if ctx.dry_run:  # (label, layout, heads, head dim, block size, dtypes): the interpreter is slow
        return [
            ("small", vs.VideoLayout(2, 4, 6, text_len=8, text_position="after"), 1, 16, 16, [torch.float16]),
            ("real", vs.VideoLayout(6, 4, 8), 1, 16, 16, [torch.float32]),
        ]
    return [
        ("small", vs.VideoLayout(9, 16, 16, text_len=64, text_position="after"), 2, 128, 128, _dtypes(ctx)),
        ("real", vs.VideoLayout(21, 30, 52), 2, 128, 128, _dtypes(ctx)),  # Wan2.1-1.3B 480p grid, 2 of 12 heads
    ]


def _pattern_for(name: str, layout, dry: bool):
    import vidsparse as vs

    small = {  # tiny grids (dry run) need settings that fit and really mask
        "radial": dict(decay_factor=0.5, block_size=16, sink=True),
        "dual-scope": dict(local_frames=1, global_stride=2),
        "vmoba": dict(temporal_chunk=2, spatial_chunk=(2, 3), st_chunk=(2, 2, 3)),
        "tile": dict(tile=(1, 2, 3), window=(3, 1, 3)),
        "gna": dict(kernel_size=(2, 3, 2), stride=(1, 2, 1), dilation=(1, 1, 2)),
        "attention-tile": dict(global_frames=1),
    }
    return vs.make_pattern(name, **(small.get(name, {}) if dry else {}))


def _dtypes(ctx: Ctx) -> list[torch.dtype]:
    # The interpreter computes bf16 dots wrongly (the backend refuses it there): fp16 + fp32.
    return [torch.float16, torch.float32] if ctx.dry_run else [torch.bfloat16, torch.float16]


def _reference(q, k, v, plan, text_mask, dense: bool):
    """fp32 reference on the same plan: SDPA with the key-validity mask for the dense plan,
    the exact block-at-a-time torch reference otherwise."""
    import torch.nn.functional as F

    from vidsparse.attention import run_permuted
    from vidsparse.kernels import reference

    q32, k32, v32 = (t.detach().float().requires_grad_(t.requires_grad) for t in (q, k, v))
    if dense:
        mask = None
        if text_mask is not None:
            lay = plan.layout
            valid = torch.ones(q.shape[0], lay.seq_len, dtype=torch.bool, device=q.device)
            valid[:, lay.text_offset : lay.text_offset + lay.text_len] = text_mask
            mask = valid[:, None, None, :]
        out = F.scaled_dot_product_attention(q32.transpose(1, 2), k32.transpose(1, 2), v32.transpose(1, 2),
                                             attn_mask=mask).transpose(1, 2)  # fmt: skip
    else:
        out = run_permuted(reference.run, q32, k32, v32, plan, text_mask, None)
    return out, (q32, k32, v32)


def stage_correctness(ctx: Ctx) -> dict[str, Any]:
    import torch.nn.functional as F

    import vidsparse as vs
    from vidsparse.kernels import triton_backend as tb

    ok = True
    with autotune_setting(False):
        for label, layout, heads, dim, bs, dtypes in _correctness_shapes(ctx):
            for dtype in dtypes:
                for name in sorted(vs.PATTERNS):
                    if ctx.dry_run and label == "real" and name not in ("dense", *GRAD_PATTERNS):
                        continue  # the interpreter is slow: the dry run's second shape checks four patterns
                    ctx.need(2.0 if ctx.dry_run else 6.0, f"correctness {label}/{name}")
                    case: dict[str, Any] = {"shape": label, "grid": list(layout.grid), "text_len": layout.text_len,
                                            "heads": heads, "head_dim": dim, "block": bs, "pattern": name,
                                            "dtype": str(dtype).replace("torch.", "")}  # fmt: skip
                    t_case = time.monotonic()
                    try:
                        pattern = _pattern_for(name, layout, ctx.dry_run)
                        pattern.validate(layout)
                    except ValueError as exc:
                        case.update(status="skipped", reason=_short(exc))
                        ctx.add(case)
                        continue
                    grads = name in GRAD_PATTERNS
                    try:
                        gen = torch.Generator(device=ctx.device).manual_seed(ctx.seed)
                        shape = (1, layout.seq_len, heads, dim)
                        q, k, v, g = (_randn(shape, ctx.device, dtype, gen) for _ in range(4))
                        text_mask = None
                        if layout.text_len:
                            text_mask = torch.ones(1, layout.text_len, dtype=torch.bool, device=ctx.device)
                            text_mask[:, layout.text_len * 3 // 4 :] = False  # padded prompt
                        plan = vs.plan(pattern, layout, num_heads=heads, device=ctx.device, q=q, k=k, block_size=bs)
                        for t in (q, k, v):
                            t.requires_grad_(grads)
                        out = tb.attention(q, k, v, plan, text_mask=text_mask)
                        ref, leaves = _reference(q, k, v, plan, text_mask, name == "dense")
                        tol = TOLERANCE[dtype]
                        case.update(density=plan.density, tol=tol, out_err=rel_err(out, ref))
                        case["pass"] = case["out_err"] <= tol
                        if name == "dense":  # SDPA's own low-precision error, for scale
                            m = None if text_mask is None else _reference_mask(layout, text_mask)
                            sd = F.scaled_dot_product_attention(*(t.detach().transpose(1, 2) for t in (q, k, v)),
                                                                attn_mask=m).transpose(1, 2)  # fmt: skip
                            case["sdpa_err"] = rel_err(sd, ref)
                        if grads:
                            out.backward(g)
                            ref.backward(g.float())
                            for n, a, b in zip("qkv", (q, k, v), leaves):
                                case[f"d{n}_err"] = rel_err(a.grad, b.grad)
                            case["grad_tol"] = tol * GRAD_SLACK
                            case["pass"] = case["pass"] and all(case[f"d{n}_err"] <= tol * GRAD_SLACK for n in "qkv")
                        if plan.query_select is not None:
                            case["pass"] = _check_kernel_order_selection(case, q, k, v, g, plan, text_mask, ref,
                                                                         leaves if grads else None, tol) and case["pass"]  # fmt: skip
                        if plan.group_spans is not None:  # layer 0's plan and reference are this case's
                            case["pass"] = _check_key_block(case, q, k, v, g, pattern, text_mask, grads, tol, ctx,
                                                            (plan, ref, leaves)) and case["pass"]  # fmt: skip
                        case["status"] = "done"
                    except Exception as exc:
                        case.update(status="failed", error=_short(exc))
                        case["pass"] = False
                    case["seconds"] = round(time.monotonic() - t_case, 2)
                    ok = ok and case.get("pass", True)
                    ctx.add(case)
                    ctx.log(f"  correctness {label:5s} {case['dtype']:8s} {name:14s} "
                            + (f"out {case.get('out_err', float('nan')):.2e}" if "out_err" in case else case["status"])
                            + ("" if case.get("pass", True) else "  FAIL"))  # fmt: skip
                    q = k = v = g = out = ref = leaves = None
                    _free(ctx.device)
    return {"pass": ok}


def _check_kernel_order_selection(case, q, k, v, g, plan, text_mask, ref, leaves, tol: float) -> bool:
    """A per-query selection (VMoBA) again in kernel order, as models run it: the contiguous
    tiles come by TMA and the group-major selection (``vidsparse.plan.group_major``) is read
    with one contiguous load per key tile. Records the layout and the errors; True if within tol."""
    from vidsparse.kernels import triton_backend as tb

    case["query_select_layout"] = "group-major" if plan.query_select.stride(2) == 1 else "other"
    ins = [t.detach().clone().requires_grad_(leaves is not None) for t in (q, k, v)]
    kin = [tb.to_kernel_order(t, plan) for t in ins]
    out = tb.from_kernel_order(tb.attention_kernel_order(*kin, plan, text_mask=text_mask), plan)
    case["kernel_order_out_err"] = rel_err(out, ref)
    ok = case["kernel_order_out_err"] <= tol
    if leaves is not None:
        out.backward(g)
        for n, a, b in zip("qkv", ins, leaves):
            case[f"kernel_order_d{n}_err"] = rel_err(a.grad, b.grad)
            ok = ok and case[f"kernel_order_d{n}_err"] <= tol * GRAD_SLACK
    return ok and case["query_select_layout"] == "group-major"


KEY_BLOCK_LAYERS = (0, 1, 2)  # VMoBA's temporal, spatial, spatio-temporal partitions (layer % 3)


def _check_key_block(case, q, k, v, g, pattern, text_mask, grads, tol, ctx, layer0) -> bool:
    """The key-block-major kernels (VMoBA's default path, ``vidsparse.kernels.keyblock``) on each
    partition: the temporal one reads the caller's K/V by tensor descriptor, the spatial and
    spatio-temporal ones a group-major copy (``VIDSPARSE_TRITON_TMA=0``: row gathers), against
    the exact reference of that layer's plan. ``layer0``: (plan, reference output, reference
    leaves with their gradients) of the case, planned at layer 0. Records
    ``keyblock_l{layer}_*`` errors; True if within tol."""
    import vidsparse as vs
    from vidsparse.kernels import keyblock

    base = layer0[0]
    ok = True
    for layer in KEY_BLOCK_LAYERS:
        if layer == 0:
            plan, ref, leaves = layer0
        else:
            plan = vs.plan(pattern, base.layout, num_heads=q.shape[2], layer=layer, device=ctx.device,
                           q=q.detach(), k=k.detach(), block_size=base.block_size)  # fmt: skip
            ref, leaves = _reference(q, k, v, plan, text_mask, dense=False)
        ins = [t.detach().clone().requires_grad_(grads) for t in (q, k, v)]
        out = keyblock.attention(*ins, plan, text_mask=text_mask, backend="triton")
        key = f"keyblock_l{layer}"
        case[f"{key}_out_err"] = rel_err(out, ref)
        ok = ok and case[f"{key}_out_err"] <= tol
        if grads:
            out.backward(g)
            if layer != 0:
                ref.backward(g.float())
            for n, a, b in zip("qkv", ins, leaves):
                case[f"{key}_d{n}_err"] = rel_err(a.grad, b.grad)
                ok = ok and case[f"{key}_d{n}_err"] <= tol * GRAD_SLACK
    return ok


def _reference_mask(layout, text_mask: torch.Tensor) -> torch.Tensor:
    valid = torch.ones(text_mask.shape[0], layout.seq_len, dtype=torch.bool, device=text_mask.device)
    valid[:, layout.text_offset : layout.text_offset + layout.text_len] = text_mask
    return valid[:, None, None, :]


# -- stages: attention timing --------------------------------------------------------------


TIMED_PLANS = ("dense", "radial", "tile", "random-25%")
DRY_PLANS = ("dense", "radial")  # the interpreter is slow: the dry run times two plans


def _timed_pattern(label: str, layout, dry: bool):
    if label.startswith("random-"):
        return RandomBlocks(float(label[len("random-") : -1]) / 100.0, 0)
    return _pattern_for(label, layout, dry)


def _step_fn(fwd: Callable[[], torch.Tensor], leaves, grad: torch.Tensor | None):
    if grad is None:

        def run():
            with torch.no_grad():
                return fwd()

        return run

    def run_bwd():
        for t in leaves:
            t.grad = None
        fwd().backward(grad)

    return run_bwd


def _time_case(ctx: Ctx, fn) -> tuple[float, float]:
    """(first call ms: compile/autotune, median ms)."""
    ctx.sync()
    t0 = time.perf_counter()
    fn()
    ctx.sync()
    first = (time.perf_counter() - t0) * 1e3
    warm, reps = (0, 1) if ctx.dry_run else (2, 10)
    return first, time_ms(fn, ctx, warm, reps)


def _sdpa_best(ctx: Ctx, q, k, v, g) -> tuple[str, float, float]:
    import torch.nn.functional as F
    from torch.nn.attention import sdpa_kernel

    qt, kt, vt = (t.detach().transpose(1, 2).contiguous().requires_grad_(g is not None) for t in (q, k, v))
    gt = None if g is None else g.transpose(1, 2).contiguous()
    best = None
    errors = []
    for name, be in sdpa_candidates(ctx.device):
        try:
            with sdpa_kernel([be]):
                fn = _step_fn(lambda: F.scaled_dot_product_attention(qt, kt, vt), (qt, kt, vt), gt)
                first, ms = _time_case(ctx, fn)
            if best is None or ms < best[1]:
                best = (name, ms, first)
        except Exception as exc:
            errors.append(f"{name}: {_short(exc)}")
    if best is None:
        raise RuntimeError("; ".join(errors))
    return best


def _attention_stage(shape_name: str) -> Callable[[Ctx], dict[str, Any]]:
    def run(ctx: Ctx) -> dict[str, Any]:
        import vidsparse as vs
        from vidsparse.kernels import flex
        from vidsparse.kernels import triton_backend as tb

        shape = SHAPES["tiny" if ctx.dry_run else shape_name]
        layout = shape.layout
        dtype = torch.float16 if ctx.dry_run else torch.bfloat16
        bs = 16 if ctx.dry_run else 128
        guards = guard_recompiles()
        gen = torch.Generator(device=ctx.device).manual_seed(ctx.seed)
        dims = (1, layout.seq_len, shape.heads, shape.head_dim)
        q, k, v, g = (_randn(dims, ctx.device, dtype, gen) for _ in range(4))
        ok = True
        sdpa: dict[str, float] = {}
        info = {"shape": shape.name, "grid": list(shape.grid), "seq_len": layout.seq_len, "heads": shape.heads,
                "head_dim": shape.head_dim, "dtype": str(dtype).replace("torch.", ""), "block": bs,
                "dynamo": guards}  # fmt: skip
        ctx.entry["info"] = info
        for direction in ("fwd", "fwd+bwd"):
            ctx.need(3.0 if ctx.dry_run else 10.0, f"sdpa {direction}")
            case: dict[str, Any] = {"plan": "dense", "backend": "sdpa", "direction": direction, "density": 1.0,
                                    "work": 1.0}  # fmt: skip
            try:
                name, ms, first = _sdpa_best(ctx, q, k, v, g if direction == "fwd+bwd" else None)
                flops = dense_flops(shape, direction)
                sdpa[direction] = ms
                case.update(ms=ms, first_ms=first, kernel=name, flops=flops, tflops=flops / ms / 1e9)
            except Exception as exc:
                case.update(error=_short(exc))
            ctx.add(case)
            ctx.log(f"  {shape.name} dense sdpa {direction}: {case.get('ms', float('nan')):.3f} ms")
        with autotune_setting(ctx.autotune):
            for label in DRY_PLANS if ctx.dry_run else TIMED_PLANS:
                try:
                    pattern = _timed_pattern(label, layout, ctx.dry_run)
                    pattern.validate(layout)
                    t0 = time.perf_counter()
                    plan = vs.plan(pattern, layout, num_heads=shape.heads, device=ctx.device, q=q, k=k, block_size=bs)
                    ctx.sync()
                    plan_ms = (time.perf_counter() - t0) * 1e3
                except Exception as exc:
                    ctx.add({"plan": label, "backend": "plan", "error": _short(exc)})
                    continue
                density = plan.density
                ref_out = None
                for direction in ("fwd", "fwd+bwd"):
                    grad = g if direction == "fwd+bwd" else None
                    flops = sparse_flops(plan, shape, direction)
                    work = flops / dense_flops(shape, direction)  # computed pairs / dense pairs
                    # triton
                    ctx.need(3.0 if ctx.dry_run else 20.0, f"triton {label} {direction}")
                    case = {"plan": label, "backend": "triton", "direction": direction, "density": density,
                            "work": work, "plan_ms": plan_ms, "flops": flops}  # fmt: skip
                    try:
                        leaves = tuple(t.detach().requires_grad_(grad is not None) for t in (q, k, v))
                        fn = _step_fn(lambda lv=leaves, p=plan: tb.attention(*lv, p), leaves, grad)
                        first, ms = _time_case(ctx, fn)
                        case.update(ms=ms, first_ms=first, tflops=flops / ms / 1e9)
                        if direction in sdpa:
                            case["speedup_vs_sdpa"] = sdpa[direction] / ms
                        if direction == "fwd":
                            with torch.no_grad():
                                ref_out = tb.attention(q, k, v, plan)
                    except Exception as exc:
                        case.update(error=_short(exc))
                        ok = False
                    ctx.add(case)
                    tri_ms = case.get("ms")
                    if not plan.order.identity:  # kernel order (permuted once per forward): the TMA path
                        ctx.need(3.0 if ctx.dry_run else 15.0, f"triton kernel-order {label} {direction}")
                        kcase = {"plan": label, "backend": "triton-kernel-order", "direction": direction,
                                 "density": density, "work": work, "flops": flops}  # fmt: skip
                        try:
                            kl = tuple(tb.to_kernel_order(t.detach(), plan).requires_grad_(grad is not None)
                                       for t in (q, k, v))  # fmt: skip
                            kg = None if grad is None else tb.to_kernel_order(grad, plan)
                            fn = _step_fn(lambda a=kl, p=plan: tb.attention_kernel_order(*a, p), kl, kg)
                            first, ms = _time_case(ctx, fn)
                            kcase.update(ms=ms, first_ms=first, tflops=flops / ms / 1e9)
                            if direction in sdpa:
                                kcase["speedup_vs_sdpa"] = sdpa[direction] / ms
                            if direction == "fwd" and ref_out is not None:
                                with torch.no_grad():
                                    ko = tb.from_kernel_order(tb.attention_kernel_order(*kl, plan), plan)
                                kcase["err_vs_triton"] = rel_err(ko, ref_out)
                        except Exception as exc:
                            kcase.update(error=_short(exc))
                            ok = False
                        ctx.add(kcase)
                        ctx.log(
                            f"  {shape.name} {label} triton-kernel-order {direction}: {kcase.get('ms', float('nan')):.3f} ms"
                        )
                    ctx.log(f"  {shape.name} {label} triton {direction}: {case.get('ms', float('nan')):.3f} ms")
                    if grad is not None and ctx.device.type != "cuda":
                        ctx.add({"plan": label, "backend": "flex", "direction": direction, "status": "skipped",
                                 "reason": "FlexAttention has no CPU backward"})  # fmt: skip
                        continue
                    # compiled flex on the identical plan (kernel order; permutation not timed)
                    ctx.need(
                        4.0 if ctx.dry_run else (30.0 if direction == "fwd" else 45.0), f"flex {label} {direction}"
                    )
                    case = {"plan": label, "backend": "flex", "direction": direction, "density": density,
                            "work": work, "flops": flops, "compiled": ctx.device.type == "cuda"}  # fmt: skip
                    try:
                        order = plan.order
                        qk, kk, vk, gk = (
                            t.detach()[:, order.gather].transpose(1, 2).contiguous() for t in (q, k, v, g)
                        )
                        for t in (qk, kk, vk):
                            t.requires_grad_(grad is not None)
                        bm = flex.block_mask_from_plan(plan, None, 1)
                        fn = _step_fn(lambda a=(qk, kk, vk), p=plan, m=bm: flex.run(*a, p, block_mask=m)[0], (qk, kk, vk),
                                      gk if grad is not None else None)  # fmt: skip
                        first, ms = _time_case(ctx, fn)
                        case.update(ms=ms, first_ms=first, tflops=flops / ms / 1e9)
                        if tri_ms:
                            case["triton_speedup"] = ms / tri_ms
                        if direction == "fwd" and ref_out is not None:
                            with torch.no_grad():
                                fo = flex.run(qk, kk, vk, plan, block_mask=bm)[0].transpose(1, 2)
                            fo = fo[:, order.scatter] if not order.identity else fo
                            case["err_vs_triton"] = rel_err(fo, ref_out)
                    except Exception as exc:
                        case.update(error=_short(exc))
                    ctx.add(case)
                    ctx.log(f"  {shape.name} {label} flex {direction}: {case.get('ms', float('nan')):.3f} ms")
                    _free(ctx.device)
                plan = ref_out = None
                _free(ctx.device)
        return {"pass": ok}

    return run


# -- stage: VMoBA's key-block-major kernels ------------------------------------------------

VMOBA_PARTITIONS = ((0, "temporal"), (1, "spatial"))
VMOBA_SOURCES = (("tma", "1"), ("gather", "0"))  # (label, VIDSPARSE_TRITON_TMA)


def _sdpa_ms(ctx: Ctx, stage: str) -> dict[str, float]:
    """SDPA's median ms per direction from an earlier stage of this run (same shape), if any."""
    for st in ctx.record.doc["stages"]:
        if st["name"] == stage:
            return {c["direction"]: c["ms"] for c in st.get("cases", []) if c.get("backend") == "sdpa" and c.get("ms")}
    return {}


def stage_vmoba_keyblock(ctx: Ctx) -> dict[str, Any]:
    """VMoBA's default path (per-query selection, key-block-major kernels) at Wan2.1-1.3B 480p,
    forward and forward+backward, on the temporal partition (groups are runs of caller rows:
    K/V by descriptor straight from the caller's tensors) and the spatial one (boxes of the
    grid: a group-major copy of K/V per call, then descriptors), each against the row gather of
    ``VIDSPARSE_TRITON_TMA=0``: the A/B that says whether the copy pays for itself."""
    import vidsparse as vs
    from vidsparse.kernels import keyblock

    shape = SHAPES["tiny" if ctx.dry_run else "wan-1.3b"]
    layout = shape.layout
    dtype = torch.float16 if ctx.dry_run else torch.bfloat16
    bs = 16 if ctx.dry_run else 128
    gen = torch.Generator(device=ctx.device).manual_seed(ctx.seed)
    dims = (1, layout.seq_len, shape.heads, shape.head_dim)
    q, k, v, g = (_randn(dims, ctx.device, dtype, gen) for _ in range(4))
    pattern = _pattern_for("vmoba", layout, ctx.dry_run)
    sdpa = _sdpa_ms(ctx, f"attention-{shape.name}")
    ctx.entry["info"] = {"shape": shape.name, "grid": list(shape.grid), "heads": shape.heads,
                         "head_dim": shape.head_dim, "dtype": str(dtype).replace("torch.", ""), "block": bs}  # fmt: skip
    ok = True
    for layer, partition in VMOBA_PARTITIONS:
        ctx.need(3.0 if ctx.dry_run else 10.0, f"vmoba plan layer {layer}")
        t0 = time.perf_counter()
        plan = vs.plan(pattern, layout, num_heads=shape.heads, layer=layer, device=ctx.device, q=q, k=k, block_size=bs)
        ctx.sync()
        plan_ms = (time.perf_counter() - t0) * 1e3
        dense_pairs = float(layout.seq_len) ** 2 * shape.heads
        tiles = (16, 16) if ctx.dry_run else (keyblock.DEFAULT_BLOCK_M, keyblock.DEFAULT_BLOCK_N)  # the launch's
        pairs = float(keyblock.computed_pairs(plan, *tiles).sum())
        for direction in ("fwd", "fwd+bwd"):
            grad = g if direction == "fwd+bwd" else None
            flops = attention_flops(pairs, shape.head_dim, direction)
            times: dict[str, float] = {}
            outs: dict[str, torch.Tensor] = {}
            base = VMOBA_SOURCES[0][0]  # the others are compared with it
            for source, tma in VMOBA_SOURCES:
                ctx.need(3.0 if ctx.dry_run else 15.0, f"vmoba {partition} {source} {direction}")
                case: dict[str, Any] = {"partition": partition, "layer": layer, "source": source,
                                        "direction": direction, "work": pairs / dense_pairs, "plan_ms": plan_ms,
                                        "flops": flops}  # fmt: skip
                try:
                    with env_setting("VIDSPARSE_TRITON_TMA", tma):
                        leaves = tuple(t.detach().requires_grad_(grad is not None) for t in (q, k, v))
                        fwd = lambda lv=leaves, p=plan: keyblock.attention(*lv, p, backend="triton")  # noqa: E731
                        first, ms = _time_case(ctx, _step_fn(fwd, leaves, grad))
                        if grad is None:
                            with torch.no_grad():
                                outs[source] = fwd()
                    times[source] = ms
                    case.update(ms=ms, first_ms=first, tflops=flops / ms / 1e9)
                    if direction in sdpa:
                        case["speedup_vs_sdpa"] = sdpa[direction] / ms
                    if source != base and base in times:
                        case["tma_speedup"] = ms / times[base]
                    if source != base and source in outs and base in outs:
                        case["err_vs_tma"] = rel_err(outs[source], outs[base])
                        case["pass"] = case["err_vs_tma"] <= TOLERANCE[dtype]
                        ok = ok and case["pass"]
                except Exception as exc:
                    case.update(error=_short(exc), **{"pass": False})
                    ok = False
                ctx.add(case)
                ctx.log(f"  vmoba {partition} {source} {direction}: {case.get('ms', float('nan')):.3f} ms")
            outs.clear()
            _free(ctx.device)
        plan = None
        _free(ctx.device)
    return {"pass": ok}


# -- stage: one denoising step -------------------------------------------------------------


def _build_wan(ctx: Ctx):
    """(model, inputs): Wan2.1-1.3B at its published config, random bf16 weights, built on the
    device; a tiny Wan (vidsparse.models.tiny) in the dry run."""
    if ctx.dry_run:
        from vidsparse.models.tiny import tiny_inputs, tiny_transformer

        model = tiny_transformer("wan", dtype=torch.float32, attention_head_dim=16)  # the kernels need >= 16
        return model, tiny_inputs("wan", model, frames=4, height=8, width=8), 2
    import diffusers

    from vidsparse.families.wan import WAN21_T2V_1_3B

    torch.manual_seed(ctx.seed)
    previous = torch.get_default_dtype()
    try:
        torch.set_default_dtype(torch.bfloat16)
        with torch.device(ctx.device):
            model = diffusers.WanTransformer3DModel(**WAN21_T2V_1_3B)
    finally:
        torch.set_default_dtype(previous)
    keep = getattr(model, "_keep_in_fp32_modules", None) or []
    for name, param in model.named_parameters():
        if any(k in name.split(".") for k in keep):
            param.data = param.data.float()
    model = model.eval().requires_grad_(False)
    gen = torch.Generator().manual_seed(ctx.seed)
    inputs = dict(
        hidden_states=torch.randn(1, 16, 21, 60, 104, generator=gen).to(ctx.device, torch.bfloat16),
        timestep=torch.tensor([500.0], device=ctx.device),
        encoder_hidden_states=torch.randn(1, 512, 4096, generator=gen).to(ctx.device, torch.bfloat16),
    )
    return model, inputs, 2


def stage_step(ctx: Ctx) -> dict[str, Any]:
    import vidsparse as vs
    from vidsparse.config import SparseConfig
    from vidsparse.generation import DensityRecorder
    from vidsparse.pipelines import get_state

    model, inputs, passes = _build_wan(ctx)
    ctx.entry["info"] = {"model": "Wan2.1-T2V-1.3B" if not ctx.dry_run else "tiny wan", "video": [81, 480, 832],
                         "passes_per_step": passes, "dtype": str(next(model.parameters()).dtype)}  # fmt: skip

    def forward():
        with torch.inference_mode():
            return model(**inputs, return_dict=False)[0]

    first, dense_ms = _time_case(ctx, forward)
    dense_out = forward().float()
    ctx.add({"pattern": "dense", "forward_ms": dense_ms, "step_ms": dense_ms * passes, "first_ms": first})
    ok = True
    with autotune_setting(ctx.autotune):
        # Wan runs each sparse forward in the plans' kernel order (one permutation, contiguous
        # tiles); the last GPU case is radial on the per-layer gather path, for the A/B.
        variants = [("radial", True)] if ctx.dry_run else [("radial", True), ("tile", True), ("radial", False)]
        for name, in_order in variants:
            label = name if in_order else f"{name} (per-layer gather)"
            ctx.need(5.0 if ctx.dry_run else 40.0, f"step {label}")
            case: dict[str, Any] = {"pattern": label}
            try:
                vs.apply(model, SparseConfig(name, dense_first_steps=0, num_inference_steps=50, backend="triton",
                                             dense_when_full=False))  # fmt: skip
                state = get_state(model)
                state.kernel_order = in_order
                recorder = DensityRecorder(state.attention_fn)
                state.attention_fn = recorder
                first, ms = _time_case(ctx, forward)
                out = forward().float()
                layers = state.num_layers
                seen = recorder.layers
                case.update(forward_ms=ms, step_ms=ms * passes, first_ms=first, speedup=dense_ms / ms,
                            rel_err_vs_dense=rel_err(out, dense_out),
                            cosine_vs_dense=float(torch.nn.functional.cosine_similarity(out.flatten(), dense_out.flatten(), dim=0)),
                            block_density=(sum(x[1] for x in seen.values()) + layers - len(seen)) / layers,
                            work=(sum(x[3] for x in seen.values()) + layers - len(seen)) / layers,
                            resolved="; ".join(sorted({x[0] for x in seen.values()})),
                            dense_layers=sorted(state.dense_layers))  # fmt: skip
                case["finite"] = bool(torch.isfinite(out).all())
                case["kernel_order"] = state.current is not None and state.current.order is not None
                ok = ok and case["finite"]
            except Exception as exc:
                case.update(error=_short(exc))
                ok = False
            finally:
                vs.remove(model)
            ctx.add(case)
            ctx.log(f"  step {label}: {case.get('forward_ms', float('nan')):.1f} ms/forward, "
                    f"dense {dense_ms:.1f} ms/forward")  # fmt: skip
    model = inputs = None
    _free(ctx.device)
    return {"pass": ok}


def _diffusers_missing() -> str | None:
    return None if package_version("diffusers") else "diffusers is not installed (carry its wheel)"


# -- the stage list ------------------------------------------------------------------------


def _est(dry: float, gpu: float) -> Callable[[Ctx], float]:
    """Seconds: ``dry`` for the CPU interpreter (generous: CI machines are slow and shared), ``gpu`` on the device."""
    return lambda ctx: dry if ctx.dry_run else gpu


STAGES: tuple[Stage, ...] = (
    Stage("environment", stage_environment, _est(2, 5), "versions, device, natten kernels"),
    Stage("correctness", stage_correctness, _est(60, 140), "compiled kernels vs SDPA / exact reference"),
    Stage("attention-wan-1.3b", _attention_stage("wan-1.3b"), _est(60, 150), "one attention call, Wan2.1-1.3B 480p"),
    Stage("step-wan-1.3b", stage_step, _est(40, 90), "one Wan2.1-1.3B forward, dense vs radial/tile"),
    Stage("vmoba-wan-1.3b", stage_vmoba_keyblock, _est(30, 70), "VMoBA key-block kernels, TMA (copy) vs gather"),
    Stage("attention-wan-14b", _attention_stage("wan-14b"), _est(10, 170), "one attention call, Wan2.1-14B 720p"),
    Stage("attention-hunyuan", _attention_stage("hunyuan"), _est(10, 170), "HunyuanVideo 720p (if budget remains)"),
)
_PREREQ: dict[str, Callable[[], str | None]] = {"step-wan-1.3b": _diffusers_missing}
_DRY_SAME_CODE = {"attention-wan-14b": "attention-wan-1.3b", "attention-hunyuan": "attention-wan-1.3b"}


def run_suite(out_dir: Path, budget_s: float, dry_run: bool = False, stages: list[str] | None = None,
              autotune: bool = False, seed: int = 0, log: Callable[[str], None] = print) -> dict[str, Any]:  # fmt: skip
    """Run the stages in order within ``budget_s`` seconds; returns the JSON document."""
    if budget_s <= 0:
        raise ValueError(f"--budget-s must be > 0 seconds, got {budget_s}.")
    names = [s.name for s in STAGES]
    if stages:
        bad = [s for s in stages if s not in names]
        if bad:
            raise ValueError(f"Unknown stage(s) {bad}; stages are {', '.join(names)}.")
    out_dir = Path(out_dir)
    check_writable_dir(out_dir, f"--out-dir {str(out_dir)!r}")  # before any stage, not after the first
    if dry_run:
        if os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError("--dry-run runs the Triton kernels in the CPU interpreter: set TRITON_INTERPRET=1.")
        device = torch.device("cpu")
    else:
        if not torch.cuda.is_available():
            raise ValueError("No CUDA GPU is available; the suite measures GPU kernels. Use --dry-run on a CPU.")
        device = torch.device("cuda")
    header = {"schema": SCHEMA, "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
              "budget_s": budget_s, "dry_run": dry_run, "autotune": autotune,
              "command": " ".join(sys.argv)}  # fmt: skip
    record = Record(out_dir / JSON_NAME, header)
    ctx = Ctx(device=device, dry_run=dry_run, budget_s=budget_s, t0=time.monotonic(), seed=seed, autotune=autotune,
              record=record, log=log)  # fmt: skip
    for stage in STAGES:
        entry: dict[str, Any] = {"name": stage.name, "about": stage.about}
        if stages and stage.name not in stages:
            continue
        estimate = stage.estimate(ctx)
        entry["estimate_s"] = estimate
        reason = _PREREQ.get(stage.name, lambda: None)()
        if dry_run and not stages and stage.name in _DRY_SAME_CODE:
            reason = f"dry run: the same code ran in {_DRY_SAME_CODE[stage.name]} (pass --stages to run it anyway)"
        if reason is None and estimate > ctx.remaining():
            reason = f"estimated {estimate:.0f} s, {max(0.0, ctx.remaining()):.0f} s of the budget left"
        if reason is not None:
            entry.update(status="skipped", reason=reason, **{"pass": None})
            record.stage(entry)
            log(f"[{stage.name}] skipped: {reason}")
            continue
        log(f"[{stage.name}] {stage.about} (estimate {estimate:.0f} s, {ctx.remaining():.0f} s left)")
        entry["status"] = "running"
        # A stage may overrun its estimate by half, never the budget: one slow stage cannot eat the rest.
        entry["cap_s"] = round(min(ctx.remaining(), STAGE_CAP * estimate), 1)
        ctx.stage_end = time.monotonic() + entry["cap_s"]
        ctx.entry = record.stage(entry)
        t0 = time.monotonic()
        try:
            result = stage.run(ctx)
            entry.update(result)
            entry["status"] = "done"
        except OutOfBudget as exc:
            entry.update(status="partial", reason=str(exc), **{"pass": _cases_pass(entry)})
        except Exception as exc:  # keep going: later stages may still work
            entry.update(
                status="failed", error=_short(exc), traceback=traceback.format_exc()[-2000:], **{"pass": False}
            )
        entry["elapsed_s"] = round(time.monotonic() - t0, 2)
        record.flush()
        log(f"[{stage.name}] {entry['status']} in {entry['elapsed_s']:.1f} s, pass={entry.get('pass')}")
        _free(device)
    record.doc["elapsed_s"] = round(ctx.elapsed(), 2)
    record.flush()
    return record.doc


def _cases_pass(entry: dict[str, Any]) -> bool | None:
    vals = [c["pass"] for c in entry.get("cases", []) if "pass" in c]
    return all(vals) if vals else None


# -- rendering -----------------------------------------------------------------------------


def _fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def _targets(doc: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(target, measured, verdict) rows."""
    rows: list[tuple[str, str, str]] = []
    for st in doc["stages"]:
        if not st["name"].startswith("attention-") or st.get("status") not in ("done", "partial"):
            continue
        shape = st.get("info", {}).get("shape", st["name"])
        cases = st.get("cases", [])
        for c in cases:
            if c.get("backend") not in ("triton", "triton-kernel-order") or c.get("ms") is None:
                continue
            sp, density = c.get("speedup_vs_sdpa"), c.get("density")
            d = c.get("work", density)  # results written before "work" was recorded: the block density
            if c["plan"] == "dense" and sp is not None:
                rows.append((f"{shape} {c['direction']} dense >= {TARGET_DENSE_VS_SDPA}x SDPA", f"{sp:.2f}x",
                             _verdict(sp, TARGET_DENSE_VS_SDPA)))  # fmt: skip
            elif sp is not None and d is not None and d >= 0.1:
                want = TARGET_SPARSE_EFFICIENCY / d
                rows.append((f"{shape} {c['direction']} {c['plan']} [{c['backend']}] (work {d:.2f}, block density "
                             f"{_fmt(density, '.2f')}) >= {want:.2f}x SDPA", f"{sp:.2f}x", _verdict(sp, want)))  # fmt: skip
        for c in cases:
            if c.get("backend") == "flex" and c.get("triton_speedup") is not None:
                rows.append((f"{shape} {c['direction']} {c['plan']} >= {TARGET_VS_FLEX}x compiled Flex",
                             f"{c['triton_speedup']:.2f}x", _verdict(c["triton_speedup"], TARGET_VS_FLEX)))  # fmt: skip
    for st in doc["stages"]:
        if not st["name"].startswith("vmoba-"):
            continue
        for c in st.get("cases", []):
            if c.get("tma_speedup") is not None:
                rows.append((f"VMoBA {c['partition']} {c['direction']}: descriptors (copy where needed) >= 1.0x "
                             "row gather", f"{c['tma_speedup']:.2f}x", _verdict(c["tma_speedup"], 1.0)))  # fmt: skip
    for st in doc["stages"]:
        if st["name"] != "step-wan-1.3b":
            continue
        for c in st.get("cases", []):
            want = TARGET_STEP.get(c.get("pattern"))
            if want and c.get("speedup") is not None:
                rows.append((f"Wan2.1-1.3B step {c['pattern']} >= {want}x dense", f"{c['speedup']:.2f}x "
                             f"(work {_fmt(c.get('work'), '.2f')}, block density {_fmt(c.get('block_density'), '.2f')})",
                             _verdict(c["speedup"], want)))  # fmt: skip
    return rows


def _verdict(got: float, want: float) -> str:
    return "met" if got >= want else f"missed by {100 * (1 - got / want):.0f} %"


Column = tuple[str, "str | Callable[[dict[str, Any]], str]", "str | None"]


def _table(cases: list[dict[str, Any]], columns: list[Column]) -> list[str]:
    """Markdown rows of ``cases``. A column is (title, case key or cell function, format spec):
    a spec formats a number (``-`` when absent) in a right-aligned column; no spec, text."""

    def cell(c: dict[str, Any], what, spec: str | None) -> str:
        if callable(what):
            return what(c)
        return _fmt(c.get(what), spec) if spec else str(c.get(what, "-"))

    lines = ["| " + " | ".join(title for title, _, _ in columns) + " |",
             "|" + "|".join("---:" if spec else "---" for _, _, spec in columns) + "|"]  # fmt: skip
    return lines + ["| " + " | ".join(cell(c, what, spec) for _, what, spec in columns) + " |" for c in cases]


def render_markdown(doc: dict[str, Any]) -> str:
    """Markdown of a gpu_suite.json document: environment, each stage's table, the targets."""
    env = next((s.get("info", {}) for s in doc["stages"] if s["name"] == "environment"), {})
    nat = env.get("natten") or {}
    lines = [
        f"# vidsparse GPU suite: {env.get('device', '?')}",
        "",
        f"{doc['created']}; commit `{str(env.get('git_commit', '?'))[:12]}`{' (dirty)' if env.get('git_dirty') else ''}; "
        f"torch {env.get('torch')}, CUDA {env.get('cuda')}, triton {env.get('triton')}, diffusers {env.get('diffusers')}, "
        f"natten {nat.get('version')} (kernels {'load' if nat.get('kernels') else 'do not load'}); "
        f"budget {doc['budget_s']:.0f} s, used {_fmt(doc.get('elapsed_s'), '.0f')} s; autotune {'on' if doc.get('autotune') else 'off'}"
        f"{'; DRY RUN (CPU interpreter, tiny shapes: no performance meaning)' if doc.get('dry_run') else ''}.",
        "",
        "| stage | status | pass | seconds (estimate) | note |",
        "|---|---|---|---:|---|",
    ]
    for st in doc["stages"]:
        note = st.get("reason") or st.get("error") or ""
        lines.append(f"| {st['name']} | {st.get('status')} | {st.get('pass')} | {_fmt(st.get('elapsed_s'), '.0f')} "
                     f"({_fmt(st.get('estimate_s'), '.0f')}) | {note} |")  # fmt: skip
    for st in doc["stages"]:
        cases = st.get("cases") or []
        if not cases:
            continue
        lines += ["", f"## {st['name']}", ""]
        if st["name"] == "correctness":
            lines += ["| shape | dtype | pattern | density | out err | dq / dk / dv err | kernel order: out; dq / dk / dv "
                      "| key-block, worst of out/dq/dk/dv: temporal / spatial / st | tol | pass |",
                      "|---|---|---|---:|---:|---|---|---|---:|---|"]  # fmt: skip
            for c in cases:
                if c.get("status") == "skipped":
                    lines.append(
                        f"| {c['shape']} | {c['dtype']} | {c['pattern']} | - | - | - | - | - | - | skipped: {c['reason'][:80]} |"
                    )
                    continue
                gr = " / ".join(_fmt(c.get(f"d{n}_err"), ".1e") for n in "qkv") if "dq_err" in c else "-"
                ko = "-"
                if "kernel_order_out_err" in c:  # per-query selection, group-major, in kernel order
                    ko = _fmt(c["kernel_order_out_err"], ".1e")
                    if "kernel_order_dq_err" in c:
                        ko += "; " + " / ".join(_fmt(c.get(f"kernel_order_d{n}_err"), ".1e") for n in "qkv")
                kb = "-"
                if "keyblock_l0_out_err" in c:  # VMoBA's default path, per partition
                    kb = " / ".join(
                        _fmt(max(v for key, v in c.items() if key.startswith(f"keyblock_l{layer}_")), ".1e")
                        for layer in KEY_BLOCK_LAYERS
                    )
                lines.append(f"| {c['shape']} | {c['dtype']} | {c['pattern']} | {_fmt(c.get('density'), '.2f')} | "
                             f"{_fmt(c.get('out_err'), '.1e')} | {gr} | {ko} | {kb} | {_fmt(c.get('tol'), '.0e')} | "
                             f"{c.get('pass')}{' ' + c['error'][:80] if c.get('error') else ''} |")  # fmt: skip
        elif st["name"].startswith("attention-"):

            def note(c: dict[str, Any]) -> str:
                if c.get("err_vs_triton") is not None:
                    return f"err vs triton {c['err_vs_triton']:.1e}"
                return (c.get("error") or c.get("kernel") or "")[:100]

            lines += _table(cases, [("plan", "plan", None), ("backend", "backend", None), ("direction", "direction", None),
                                    ("block density", "density", ".3f"), ("work", "work", ".3f"), ("ms", "ms", ".3f"),
                                    ("TFLOP/s", "tflops", ".1f"),
                                    ("vs SDPA", "speedup_vs_sdpa", ".2f"), ("triton vs this", "triton_speedup", ".2f"),
                                    ("first call ms", "first_ms", ".0f"), ("note", note, None)])  # fmt: skip
        elif st["name"].startswith("vmoba-"):
            lines += _table(cases, [("partition", "partition", None), ("K/V source", "source", None),
                                    ("direction", "direction", None), ("work", "work", ".3f"), ("ms", "ms", ".3f"),
                                    ("TFLOP/s", "tflops", ".1f"), ("vs SDPA", "speedup_vs_sdpa", ".2f"),
                                    ("gather / tma", "tma_speedup", ".2f"), ("err vs tma", "err_vs_tma", ".1e"),
                                    ("note", lambda c: (c.get("error") or "")[:100], None)])  # fmt: skip
        elif st["name"].startswith("step-"):
            lines += _table(cases, [("pattern", "pattern", None), ("block density", "block_density", ".3f"),
                                    ("work", "work", ".3f"),
                                    ("ms / forward", "forward_ms", ".1f"), ("ms / step", "step_ms", ".1f"),
                                    ("speedup", "speedup", ".2f"), ("rel err vs dense", "rel_err_vs_dense", ".2e"),
                                    ("cosine", "cosine_vs_dense", ".4f"),
                                    ("note", lambda c: (c.get("error") or c.get("resolved") or "")[:100], None)])  # fmt: skip
    targets = _targets(doc)
    lines += ["", "## Targets (issue 10)", ""]
    if doc.get("dry_run"):
        lines += [
            "Dry run: interpreter timings say nothing about GPU speed; the verdicts below only exercise the renderer.",
            "",
        ]
    if targets:
        lines += ["| target | measured | verdict |", "|---|---|---|"] + [f"| {a} | {b} | {c} |" for a, b, c in targets]
    else:
        lines.append("No timing stage completed.")
    return "\n".join(lines) + "\n"


README_BEGIN = "<!-- gpu_suite:begin (generated: python benchmarks/gpu_suite.py --render JSON --readme README.md) -->"
README_END = "<!-- gpu_suite:end -->"


def readme_section(doc: dict[str, Any], source: str = "benchmarks/results/gpu_suite.json") -> str:
    """The README's GPU performance tables from a suite document: per attention shape and plan the
    fastest Triton path against SDPA and compiled Flex, and the whole denoising step."""
    env = next((s.get("info", {}) for s in doc["stages"] if s["name"] == "environment"), {})
    lines = [
        f"Measured on {env.get('device', '?')} (torch {env.get('torch')}, triton {env.get('triton')}, commit "
        f"`{str(env.get('git_commit', '?'))[:12]}`, {doc['created'][:10]}; `{source}`, every case and the issue-10 "
        f"targets in `{Path(source).with_name(MD_NAME).as_posix()}`){' - DRY RUN, no performance meaning' if doc.get('dry_run') else ''}. "
        "Work: pairs the kernel computes / dense pairs; speedups are over torch SDPA's fastest fused kernel and over "
        "FlexAttention compiled on the identical plan.",
        "",
        "| shape | plan | direction | work | Triton ms | SDPA ms | vs SDPA | vs Flex |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for st in doc["stages"]:
        if not st["name"].startswith("attention-") or st.get("status") not in ("done", "partial"):
            continue
        shape = st.get("info", {}).get("shape", st["name"])
        cases = [c for c in st.get("cases", []) if c.get("ms") is not None]
        sdpa = {c["direction"]: c["ms"] for c in cases if c.get("backend") == "sdpa"}
        keys = dict.fromkeys((c["plan"], c["direction"]) for c in cases if c.get("backend") != "sdpa")
        for plan, direction in keys:
            mine = [c for c in cases if (c["plan"], c["direction"]) == (plan, direction)]
            tri = [c for c in mine if c.get("backend") in ("triton", "triton-kernel-order")]
            if not tri:
                continue
            best = min(tri, key=lambda c: c["ms"])
            flex = next((c for c in mine if c.get("backend") == "flex"), None)
            vs_flex = flex["ms"] / best["ms"] if flex else None
            lines.append(f"| {shape} | {plan} | {direction} | {_fmt(best.get('work', best.get('density')), '.3f')} | "
                         f"{best['ms']:.3f} | {_fmt(sdpa.get(direction), '.3f')} | {_times(best.get('speedup_vs_sdpa'))} | "
                         f"{_times(vs_flex)} |")  # fmt: skip
    step = next(
        (s for s in doc["stages"] if s["name"] == "step-wan-1.3b" and s.get("status") in ("done", "partial")), None
    )
    if step is not None:
        lines += ["", "One Wan2.1-1.3B denoising step at 81x480x832 (random weights, bf16, family defaults):", "",
                  "| pattern | work | ms / step | speedup vs dense | rel. error vs dense |", "|---|---:|---:|---:|---:|"]  # fmt: skip
        for c in step.get("cases", []):
            if c.get("step_ms") is None:
                continue
            dense = c["pattern"] == "dense"
            lines.append(f"| {c['pattern']} | {_fmt(c.get('work', 1.0 if dense else None), '.3f')} | {c['step_ms']:.1f} | "
                         f"{_times(c.get('speedup', 1.0 if dense else None))} | {_fmt(c.get('rel_err_vs_dense'), '.1e')} |")  # fmt: skip
    return "\n".join(lines)


def _times(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}x"


def update_readme(readme: Path, doc: dict[str, Any], source: str = "benchmarks/results/gpu_suite.json") -> Path:
    """Replace the text between ``README_BEGIN`` and ``README_END`` in ``readme`` with
    ``readme_section(doc)`` (atomically; nothing else changes)."""
    from vidsparse.atomic import write_text

    text, begin, end = _readme_block(Path(readme))
    head, tail = text[: begin + len(README_BEGIN)], text[end:]
    write_text(readme, f"{head}\n{readme_section(doc, source)}\n{tail}")
    return Path(readme)


def _readme_block(readme: Path) -> tuple[str, int, int]:
    """(text, start of the begin marker, start of the end marker) of ``readme``, or a ValueError."""
    if not readme.is_file():
        raise ValueError(f"--readme {str(readme)!r}: no such file.")
    text = readme.read_text(encoding="utf-8")
    begin, end = text.find(README_BEGIN), text.find(README_END)
    if begin < 0 or end < begin:
        raise ValueError(
            f"--readme {readme}: no '{README_BEGIN}' ... '{README_END}' block to replace; put the two marker lines "
            "where the GPU tables go."
        )
    return text, begin, end


def write_markdown(json_path: Path, md_path: Path | None = None) -> Path:
    doc = json.loads(Path(json_path).read_text(encoding="utf-8"))
    md_path = Path(md_path) if md_path else Path(json_path).with_name(MD_NAME)
    tmp = md_path.with_name(f".{md_path.name}.tmp")
    tmp.write_text(render_markdown(doc), encoding="utf-8")
    os.replace(tmp, md_path)
    return md_path


# -- command line --------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser, with_out_dir: bool = True) -> None:
    parser.add_argument("--budget-s", type=float, default=480.0, help="seconds the suite may use (default 480)")
    if with_out_dir:
        parser.add_argument(
            "--out-dir", default=None, help=f"where gpu_suite.json/.md go (default {default_out_dir()})"
        )
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU in Triton's interpreter (CI)")
    parser.add_argument(
        "--stages", default=None, help=f"comma list of stages (default all: {', '.join(s.name for s in STAGES)})"
    )
    parser.add_argument("--autotune", action="store_true", help="let the Triton kernels autotune (costs compile time)")
    parser.add_argument("--render", default=None, metavar="JSON", help="only render JSON into Markdown beside it")
    parser.add_argument(
        "--readme",
        default=None,
        metavar="README",
        help="with --render: also replace the README's generated GPU tables (between its gpu_suite markers)",
    )


def run_from_args(args: argparse.Namespace) -> int:
    if args.render:
        if not Path(args.render).is_file():
            raise ValueError(f"--render {args.render!r}: no such file; pass the gpu_suite.json a suite run wrote.")
        doc = json.loads(Path(args.render).read_text(encoding="utf-8"))
        if args.readme:
            _readme_block(Path(args.readme))  # checked before anything is written
        print(f"wrote {write_markdown(Path(args.render))}")
        if args.readme:
            source = os.path.relpath(Path(args.render).resolve(), Path(args.readme).resolve().parent)
            print(f"updated {update_readme(Path(args.readme), doc, Path(source).as_posix())}")
        return 0
    if args.readme:
        raise ValueError("--readme rewrites the README's GPU tables from a finished run: use it with --render JSON.")
    out_dir = Path(args.out_dir) if args.out_dir else default_out_dir()
    stages = [s.strip() for s in args.stages.split(",") if s.strip()] if args.stages else None
    doc = run_suite(out_dir, args.budget_s, args.dry_run, stages, args.autotune, log=lambda m: print(m, flush=True))
    md = write_markdown(out_dir / JSON_NAME)
    print(f"wrote {out_dir / JSON_NAME} and {md}")
    failed = [s["name"] for s in doc["stages"] if s.get("pass") is False]
    if failed:
        print(f"stage(s) failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="gpu_suite", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run_from_args(args)
    except (ValueError, TypeError) as exc:
        print(f"gpu_suite: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
