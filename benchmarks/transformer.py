"""End-to-end transformer benchmark: one denoising step of real-size video transformers.

Builds Wan2.1-T2V-1.3B, Wan2.1-T2V-14B and HunyuanVideo transformers with their published
configurations (constants below) and random bf16 weights, and times one denoising step at
the models' reference resolutions: dense (the model's own attention) and every registered
sparse pattern at the family defaults of ``vidsparse.apply`` (a step after the dense
warm-up, so every non-dense layer runs sparse). Writes JSON and Markdown like
``benchmarks/attention.py`` (see benchmarks/README.md).

    python benchmarks/transformer.py                          # all models and patterns (GPU)
    python benchmarks/transformer.py --models wan-1.3b --patterns radial,tile
    python benchmarks/transformer.py --quick                  # tiny models on CPU (smoke test)
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import math
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from vidsparse.benchmeta import checked_out_dir, device_name, git_commit, json_safe, package_version
from vidsparse.families.hunyuan import HUNYUAN_VIDEO_T2V
from vidsparse.families.wan import WAN21_T2V_1_3B, WAN21_T2V_14B

SCHEMA = "vidsparse.bench.transformer/1"

# Published transformer configurations: one home each, in the family modules.
WAN_1_3B, WAN_14B, HUNYUAN_VIDEO = WAN21_T2V_1_3B, WAN21_T2V_14B, HUNYUAN_VIDEO_T2V


@dataclass(frozen=True)
class ModelCase:
    """One transformer at one video size. ``latent`` is (C, F, H, W) before patchify."""

    name: str
    family: str  # vidsparse family: wan | hunyuan
    class_name: str
    config: dict[str, Any]
    video: tuple[int, int, int]  # frames, height, width in pixels (for the record)
    latent: tuple[int, int, int, int]
    text_len: int
    passes_per_step: int  # transformer forwards per denoising step (2 with CFG, 1 guidance-distilled)
    tiny: bool = False

    @property
    def grid(self) -> tuple[int, int, int]:
        pt, ph, pw = _patch(self.config)
        _, f, h, w = self.latent
        return (f // pt, h // ph, w // pw)


def _patch(config: dict[str, Any]) -> tuple[int, int, int]:
    p = config.get("patch_size", 1)
    if isinstance(p, (tuple, list)):
        return tuple(p)  # type: ignore[return-value]
    return (config.get("patch_size_t") or 1, p, p)


MODELS = {
    # Wan2.1 T2V: 81 frames, 480x832 (1.3B) / 720x1280 (14B); VAE 4x time, 8x space, 16 channels;
    # 512 umT5 text tokens through cross-attention; classifier-free guidance = 2 forwards per step.
    "wan-1.3b": ModelCase(
        "wan-1.3b", "wan", "WanTransformer3DModel", WAN_1_3B, (81, 480, 832), (16, 21, 60, 104), 512, 2
    ),
    "wan-14b": ModelCase(
        "wan-14b", "wan", "WanTransformer3DModel", WAN_14B, (81, 720, 1280), (16, 21, 90, 160), 512, 2
    ),
    # HunyuanVideo: 129 frames, 720x1280; 256 text tokens in joint attention; guidance-distilled.
    "hunyuan": ModelCase(
        "hunyuan",
        "hunyuan",
        "HunyuanVideoTransformer3DModel",
        HUNYUAN_VIDEO,
        (129, 720, 1280),
        (16, 33, 90, 160),
        256,
        1,
    ),
}


def _tiny_cases() -> dict[str, ModelCase]:
    from vidsparse.models.tiny import tiny_config

    cases = {}
    for family, latent in (("wan", (4, 6, 8, 8)), ("hunyuan", (4, 5, 8, 8))):
        cls_name, cfg = tiny_config(family)
        cases[f"{family}-tiny"] = ModelCase(
            f"{family}-tiny", family, cls_name, cfg, (0, 0, 0), latent, 8, 2 if family == "wan" else 1, tiny=True
        )
    return cases


# -- building and inputs ---------------------------------------------------------------------


def build_transformer(case: ModelCase, device: torch.device, dtype: torch.dtype, seed: int = 0) -> torch.nn.Module:
    """Random-init transformer created directly on ``device`` in ``dtype`` (no fp32 copy of 14B weights);
    modules diffusers keeps in fp32 (``_keep_in_fp32_modules``) are kept in fp32, as from_pretrained does."""
    import diffusers

    cls = getattr(diffusers, case.class_name)
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    try:
        torch.set_default_dtype(dtype if dtype.is_floating_point else torch.float32)
        with torch.device(device):
            model = cls(**case.config)
    finally:
        torch.set_default_dtype(previous)
    # Parameters were created in ``dtype`` (no .to(): diffusers warns about its fp32 modules).
    keep = getattr(model, "_keep_in_fp32_modules", None) or []
    if keep and dtype != torch.float32:
        for name, param in model.named_parameters():
            if any(k in name.split(".") for k in keep):
                param.data = param.data.float()
    return model.eval().requires_grad_(False)


def make_inputs(case: ModelCase, model: torch.nn.Module, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """Forward kwargs of one (conditional) transformer call at a mid-schedule timestep."""
    gen = torch.Generator(device="cpu").manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    cfg = model.config
    text_dim = cfg.get("text_dim") or cfg.get("text_embed_dim")
    inputs: dict[str, Any] = dict(
        hidden_states=randn(1, *case.latent),
        timestep=torch.tensor([500.0], device=device),
        encoder_hidden_states=randn(1, case.text_len, text_dim),
    )
    if case.family == "hunyuan":
        inputs["encoder_attention_mask"] = torch.ones(1, case.text_len, device=device, dtype=dtype)
        inputs["pooled_projections"] = randn(1, cfg.pooled_projection_dim)
        inputs["guidance"] = torch.tensor([6000.0], device=device, dtype=dtype)  # 6.0 x 1000, as the pipeline
    return inputs


# -- timing ----------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int) -> tuple[float, list[float]]:
    """Median and all milliseconds of ``fn`` after ``warmup`` untimed calls (CUDA events on GPU)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize(device)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(float(start.elapsed_time(end)))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return float(statistics.median(times)), times


@dataclass
class Row:
    model: str
    pattern: str  # "dense" or a registered pattern name
    resolved: str  # the pattern as the family defaults resolve it on this grid (repr), or "dense"
    backend: str  # "model" (the model's own attention) or the vidsparse backend
    forward_ms: float | None
    step_ms: float | None  # forward_ms x passes per step
    speedup: float | None  # dense forward_ms / this forward_ms
    block_density: (
        float | None
    )  # kept blocks / all blocks of the padded grid, mean over self-attention layers (dense = 1)
    token_density: float | None  # attended (query, key) pairs / all pairs, same mean
    work: float | None = None  # pairs the kernel path computes (padding included) / dense pairs, same mean
    dense_layers: list[int] = field(default_factory=list)
    warmup_ms: float | None = None  # first (untimed) call: plan building, Triton compilation/autotune
    peak_memory_gb: float | None = None
    times_ms: list[float] = field(default_factory=list)
    error: str | None = None


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:300]}"


def bench_model(case: ModelCase, patterns: list[str], args: argparse.Namespace, device, dtype, log) -> list[Row]:
    import vidsparse as vs
    from vidsparse.config import SparseConfig
    from vidsparse.generation import DensityRecorder
    from vidsparse.pipelines import get_state

    rows: list[Row] = []
    _free(device)
    log(f"[{case.name}] building {case.class_name} (random {str(dtype).replace('torch.', '')} weights)")
    model = build_transformer(case, device, dtype, args.seed)
    inputs = make_inputs(case, model, device, dtype, args.seed)

    def forward():
        with torch.inference_mode():
            return model(**inputs, return_dict=False)[0]

    def measure(label: str) -> tuple[float, list[float], float]:
        _sync(device)
        t0 = time.perf_counter()
        forward()  # first call: plans, Triton compilation and autotuning
        _sync(device)
        first = (time.perf_counter() - t0) * 1e3
        ms, times = time_ms(forward, device, max(0, args.warmup - 1), args.repeats)
        log(f"[{case.name}] {label:<16} {ms:10.1f} ms/forward (first call {first:.0f} ms)")
        return ms, times, first

    dense_ms = None
    try:
        dense_ms, times, first = measure("dense")
        rows.append(Row(case.name, "dense", "dense", "model", dense_ms, dense_ms * case.passes_per_step, 1.0, 1.0, 1.0,
                        warmup_ms=first, peak_memory_gb=_peak_gb(device), times_ms=times))  # fmt: skip
    except Exception as exc:  # OOM and friends: record and go on
        rows.append(Row(case.name, "dense", "dense", "model", None, None, None, 1.0, 1.0, error=_short(exc)))
        log(f"[{case.name}] dense failed: {_short(exc)}")
    for name in patterns:
        _free(device)
        row = Row(case.name, name, "", args.backend, None, None, None, None, None)
        try:
            config = SparseConfig(name, dense_first_steps=0, num_inference_steps=50, backend=args.backend,
                                  block_size=args.block_size, dense_when_full=False)  # fmt: skip
            vs.apply(model, config)
            state = get_state(model)
            recorder = DensityRecorder(state.attention_fn)
            state.attention_fn = recorder
            ms, times, first = measure(name)
            row.forward_ms, row.step_ms, row.times_ms, row.warmup_ms = ms, ms * case.passes_per_step, times, first
            row.speedup = dense_ms / ms if dense_ms else None
            row.peak_memory_gb = _peak_gb(device)
            row.dense_layers = sorted(state.dense_layers)
            layers = state.num_layers
            seen = recorder.layers
            row.resolved = "; ".join(sorted({v[0] for v in seen.values()})) or "dense"
            row.block_density = (sum(v[1] for v in seen.values()) + (layers - len(seen))) / layers
            row.token_density = (sum(v[2] for v in seen.values()) + (layers - len(seen))) / layers
            row.work = (sum(v[3] for v in seen.values()) + (layers - len(seen))) / layers
        except Exception as exc:
            row.error = _short(exc)
            log(f"[{case.name}] {name} failed: {row.error}")
        finally:
            vs.remove(model)
        rows.append(row)
    model = inputs = None  # drop the weights before the next model is built
    _free(device)
    return rows


# -- report ----------------------------------------------------------------------------------


def report(rows: list[Row], cases: list[ModelCase], args: argparse.Namespace, device, dtype) -> dict[str, Any]:
    commit, dirty = git_commit()
    return json_safe(
        {
            "schema": SCHEMA,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "device": device_name(device),
            "device_type": device.type,
            "torch": torch.__version__,
            "triton": package_version("triton"),
            "diffusers": package_version("diffusers"),
            "cuda": torch.version.cuda,
            "python": platform.python_version(),
            "git_commit": commit,
            "git_dirty": dirty,
            "dtype": str(dtype).replace("torch.", ""),
            "backend": args.backend,
            "block_size": args.block_size,
            "repeats": args.repeats,
            "warmup": args.warmup,
            "quick": args.quick,
            "models": {
                c.name: {
                    "class": c.class_name,
                    "config": c.config,
                    "video": list(c.video),
                    "latent": list(c.latent),
                    "grid": list(c.grid),
                    "tokens": math.prod(c.grid),
                    "text_len": c.text_len,
                    "passes_per_step": c.passes_per_step,
                }
                for c in cases
            },
            "results": [asdict(r) for r in rows],
        }
    )


def markdown(rep: dict[str, Any]) -> str:
    lines = [
        f"# vidsparse transformer benchmark: {rep['device']}",
        "",
        f"{rep['created']}, torch {rep['torch']}, triton {rep['triton']}, diffusers {rep['diffusers']}, commit "
        f"{rep['git_commit'][:12]}{' (dirty)' if rep['git_dirty'] else ''}, {rep['dtype']}, backend {rep['backend']}, "
        f"median of {rep['repeats']} forwards. One step = forwards per step x one forward (CFG: 2 for Wan).",
        "",
        "| model | tokens | pattern | block density | token density | work | ms / forward | ms / step | speedup | first call ms | peak GB | note |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]

    def num(x, fmt):
        return format(x, fmt) if x is not None else "-"

    for r in rep["results"]:
        tokens = rep["models"][r["model"]]["tokens"]
        note = (
            f"error: {r['error']}" if r["error"] else (f"dense layers {r['dense_layers']}" if r["dense_layers"] else "")
        )
        speed = f"{r['speedup']:.2f}x" if r["speedup"] else "-"
        lines.append(
            f"| {r['model']} | {tokens:,} | {r['pattern']} | {num(r['block_density'], '.1%')} | "
            f"{num(r['token_density'], '.1%')} | {num(r.get('work'), '.1%')} | {num(r['forward_ms'], '.1f')} | {num(r['step_ms'], '.1f')} | {speed} | "
            f"{num(r['warmup_ms'], '.0f')} | {num(r['peak_memory_gb'], '.1f')} | {note} |"
        )
    resolved = {(r["model"], r["pattern"]): r["resolved"] for r in rep["results"] if r["pattern"] != "dense"}
    if resolved:
        lines += ["", "Patterns as the family defaults resolved them:", ""]
        lines += [f"- {m} / {p}: `{v}`" for (m, p), v in resolved.items()]
    return "\n".join(lines) + "\n"


def write(rep: dict[str, Any], out_dir: Path) -> tuple[Path, Path]:
    from vidsparse.atomic import atomic_path

    out_dir.mkdir(parents=True, exist_ok=True)
    slug = re.sub(r"[^a-z0-9]+", "-", rep["device"].lower()).strip("-") or "device"
    base = out_dir / f"transformer_{slug}_{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"
    paths = base.with_suffix(".json"), base.with_suffix(".md")
    for path, text in zip(paths, (json.dumps(rep, indent=1) + "\n", markdown(rep))):
        with atomic_path(path) as tmp:
            tmp.write_text(text, encoding="utf-8")
    return paths


# -- command line ----------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=None, help=f"comma list of {', '.join(MODELS)} (default all)")
    p.add_argument("--patterns", default=None, help="comma list of registered patterns (default: all but dense)")
    p.add_argument("--backend", default="auto", choices=("auto", "triton", "flex", "torch"), help="vidsparse backend")
    p.add_argument("--block-size", type=int, default=None, help="kernel block size (default: the backend's)")
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"), help="weights and activations")
    p.add_argument("--repeats", type=int, default=3, help="timed forwards per configuration (median; default 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed forwards first, incl. Triton compile (default 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights and inputs")
    p.add_argument("--device", default="cuda", help="device (default cuda; cpu only with --quick)")
    p.add_argument("--out-dir", default="benchmarks/results", help="where the JSON and Markdown go")
    p.add_argument("--quick", action="store_true", help="tiny Wan and HunyuanVideo transformers on CPU: a smoke test")
    args = p.parse_args(argv)
    if args.repeats < 1 or args.warmup < 0:
        p.error("--repeats must be >= 1 and --warmup >= 0")
    checked_out_dir(p, args.out_dir)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from vidsparse.patterns import PATTERNS

    if args.quick:
        cases_all = _tiny_cases()
        device = torch.device("cpu")
        dtype = torch.float32
        if args.backend == "auto":
            args.backend = "torch"
        args.repeats, args.warmup = min(args.repeats, 2), min(args.warmup, 1)
    else:
        cases_all = MODELS
        device = torch.device(args.device)
        if device.type != "cuda" or not torch.cuda.is_available():
            print(
                "benchmarks/transformer.py: error: real-size transformers need a CUDA GPU (the 14B model alone is "
                "28 GB in bf16); run on a GPU, or pass --quick for the tiny CPU smoke run.",
                file=sys.stderr,
            )
            return 2
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    names = [m.strip() for m in args.models.split(",")] if args.models else list(cases_all)
    unknown = [m for m in names if m not in cases_all]
    if unknown:
        print(
            f"benchmarks/transformer.py: error: unknown model(s) {unknown}; choose from {list(cases_all)}.",
            file=sys.stderr,
        )
        return 2
    patterns = [p.strip() for p in args.patterns.split(",")] if args.patterns else [p for p in PATTERNS if p != "dense"]
    bad = [p for p in patterns if p not in PATTERNS or p == "dense"]
    if bad:
        print(f"benchmarks/transformer.py: error: unknown pattern(s) {bad}; choose from "
              f"{sorted(set(PATTERNS) - {'dense'})}.", file=sys.stderr)  # fmt: skip
        return 2
    cases = [cases_all[n] for n in names]
    torch.manual_seed(args.seed)
    rows: list[Row] = []
    for case in cases:
        rows += bench_model(case, patterns, args, device, dtype, log=lambda m: print(m, flush=True))
    rep = report(rows, cases, args, device, dtype)
    json_path, md_path = write(rep, Path(args.out_dir))
    print(markdown(rep))
    print(f"wrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
