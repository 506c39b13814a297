"""VMoBA work and accuracy on CPU: what each kernel path computes, and what granularity="tile" costs in output.

Three measurements (no timings of attention; the selection step is timed on CPU, labelled):

1. *Work at real shapes* (Wan2.1-1.3B 81x480x832 -> latent 21x30x52, Wan2.1-14B 81x720x1280 ->
   21x45x80, VMoBA at its own defaults, layers 0/1/2 = temporal / spatial / spatio-temporal):
   the per-query selection's token density, the pairs the key-block-major path computes
   (``vidsparse.work.plan_work``, padding included, Triton GPU tiles 128 x 64) and the pairs
   the query-tile path computes (its block density), for i.i.d. Gaussian q/k and for q/k with
   spatial structure (below). Target: key-block work <= 1.3 x token density.
2. *Selection cost*: CPU seconds of one ``VMoBA.dynamic_plan`` call (gates, threshold, plan
   lists) and of the key-block packing (``keyblock.pack``), at the heads measured.
3. *Tile vs per-query output* at a reduced shape CPU can run densely: relative L2 distance
   of ``granularity="tile"`` (block 64 and 128) and of per-query VMoBA to dense attention and
   to each other, on structured inputs.

Structured inputs: a hidden field h over the grid, trilinear upsampling of a coarse random
grid (1/3 x 1/4 x 1/4 of the latent grid) plus 0.3 i.i.d. noise; q = h Wq, k = h (Wq + 0.5 N),
v = h Wv with random Gaussian projections, so nearby tokens have similar, correlated q and k.

    python benchmarks/vmoba.py [--out-dir benchmarks/results] [--quick]

``time_paths`` is the GPU stage's entry point (CUDA events; not run here).

Output ``<out-dir>/vmoba.json`` (``schema`` = ``"vidsparse.bench.vmoba/1"``; ``vmoba_quick`` with
``--quick``) and ``.md``: provenance (``created``, ``device``, ``torch``, ``triton``, ``python``,
``vidsparse``, ``git_commit``, ``git_dirty``, ``cpu_threads``), ``work``: one row per (shape, inputs,
layer) with ``token_density``, ``key_block_fraction`` / ``query_tile_fraction`` (pairs computed /
S^2), ``key_block_over_token``, ``selection_wall_s``, ``selection_process_cpu_s``, ``pack_wall_s``,
``pack_process_cpu_s``; ``accuracy``: one row per layer with ``token_vs_dense``,
``tile{64,128}_vs_dense``, ``tile{64,128}_vs_token`` (relative L2) and the densities.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import vidsparse as vs
from vidsparse.benchmeta import checked_out_dir, device_name, git_commit, json_safe, package_version
from vidsparse.kernels import keyblock
from vidsparse.patterns.vmoba import VMoBA, selection_density
from vidsparse.work import plan_work

SCHEMA = "vidsparse.bench.vmoba/1"


@dataclass(frozen=True)
class Shape:
    name: str
    grid: tuple[int, int, int]
    heads: int  # the model's heads
    measured_heads: int  # heads the CPU run selects for (per-head statistics; cost scales linearly)
    head_dim: int = 128


SHAPES = (
    Shape("Wan2.1-1.3B 81x480x832", (21, 30, 52), heads=12, measured_heads=12),
    Shape("Wan2.1-14B 81x720x1280", (21, 45, 80), heads=40, measured_heads=8),
)
QUICK_SHAPES = (Shape("quick 6x8x12", (6, 8, 12), heads=2, measured_heads=2, head_dim=16),)
# Reduced shape for the output comparison, with block shapes scaled so each partition keeps several blocks.
ACCURACY = dict(grid=(12, 20, 26), heads=2, head_dim=64, pattern=dict(temporal_chunk=2, st_chunk=(4, 5, 13)))
QUICK_ACCURACY = dict(
    grid=(4, 8, 8), heads=1, head_dim=16, pattern=dict(temporal_chunk=1, spatial_chunk=(4, 4), st_chunk=(2, 4, 4))
)


def random_inputs(grid, heads: int, head_dim: int, structured: bool, seed: int = 0, dtype=torch.float32):
    """q, k, v [1, S, H, D]: i.i.d. Gaussian, or projections of a smooth hidden field (module doc)."""
    g = torch.Generator().manual_seed(seed)
    Fr, Hh, Ww = grid
    S = Fr * Hh * Ww
    if not structured:
        return tuple(torch.randn(1, S, heads, head_dim, generator=g, dtype=dtype) for _ in range(3))
    C = 64
    coarse = torch.randn(1, C, max(1, Fr // 3), max(1, Hh // 4), max(1, Ww // 4), generator=g)
    h = F.interpolate(coarse, size=grid, mode="trilinear", align_corners=True)[0]  # [C, F, H, W]
    h = h.flatten(1).T  # [S, C]
    h = (h - h.mean(0)) / h.std(0).clamp_min(1e-6) + 0.3 * torch.randn(S, C, generator=g)
    wq = torch.randn(C, heads * head_dim, generator=g) / math.sqrt(C)
    wk = wq + 0.5 * torch.randn(C, heads * head_dim, generator=g) / math.sqrt(C)
    wv = torch.randn(C, heads * head_dim, generator=g) / math.sqrt(C)
    return tuple((h @ w).view(1, S, heads, head_dim).to(dtype).contiguous() for w in (wq, wk, wv))


def measure_work(shape: Shape, structured: bool, layers=(0, 1, 2), block_size: int = 128) -> list[dict]:
    """Per layer: token density, key-block and query-tile work fractions, selection CPU time."""
    layout = vs.VideoLayout(*shape.grid)
    q, k, _ = random_inputs(shape.grid, shape.measured_heads, shape.head_dim, structured)
    rows = []
    for layer in layers:
        pattern = VMoBA()
        start, cpu = time.perf_counter(), time.process_time()
        plan = pattern.dynamic_plan(layout, q, k, layer, block_size)
        plan_s, plan_cpu = time.perf_counter() - start, time.process_time() - cpu
        start, cpu = time.perf_counter(), time.process_time()
        pk = keyblock.pack(plan, keyblock.DEFAULT_BLOCK_M)
        pack_s, pack_cpu = time.perf_counter() - start, time.process_time() - cpu
        kb_work = plan_work(plan, "key_block")
        qt_work = plan_work(plan, "query_tile")
        density = float(selection_density(plan).mean())
        rows.append(
            dict(
                shape=shape.name,
                grid=list(shape.grid),
                tokens=layout.seq_len,
                heads=shape.heads,
                measured_heads=shape.measured_heads,
                head_dim=shape.head_dim,
                inputs="structured" if structured else "iid",
                layer=layer,
                partition=pattern.partition(layer),
                key_blocks=pattern.num_blocks(layout, layer),
                block_size=block_size,
                token_density=kb_work.token_density,
                selection_density_video=density,
                key_block_fraction=kb_work.computed_fraction,
                key_block_over_token=kb_work.computed_fraction / kb_work.token_density,
                key_block_tile=list(kb_work.tile),
                key_block_tiles=pk.num_tiles,
                query_tile_fraction=qt_work.computed_fraction,
                query_tile_block_density=plan.density,
                selection_wall_s=round(plan_s, 3),
                selection_process_cpu_s=round(plan_cpu, 3),
                pack_wall_s=round(pack_s, 3),
                pack_process_cpu_s=round(pack_cpu, 3),
            )
        )
        print(
            f"{shape.name:24s} {rows[-1]['inputs']:10s} layer {layer} ({rows[-1]['partition']:14s}) "
            f"token {kb_work.token_density:.3f}  key-block {kb_work.computed_fraction:.3f} "
            f"({rows[-1]['key_block_over_token']:.2f}x)  query-tile {qt_work.computed_fraction:.3f}  "
            f"select {plan_s:.2f}s wall / {plan_cpu:.2f}s cpu, pack {pack_s:.2f}s / {pack_cpu:.2f}s",
            flush=True,
        )
    return rows


def _rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def measure_accuracy(cfg: dict, structured: bool = True, layers=(0, 1, 2)) -> list[dict]:
    """Relative L2 of tile-granularity and per-query VMoBA outputs vs dense and vs each other."""
    layout = vs.VideoLayout(*cfg["grid"])
    q, k, v = random_inputs(cfg["grid"], cfg["heads"], cfg["head_dim"], structured, seed=1)
    dense = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
    rows = []
    with torch.no_grad():
        for layer in layers:
            token_p = VMoBA(**cfg["pattern"])
            token = vs.attention(q, k, v, layout, token_p, backend="torch", layer=layer, block_size=64)
            row = dict(
                grid=list(cfg["grid"]),
                heads=cfg["heads"],
                head_dim=cfg["head_dim"],
                inputs="structured" if structured else "iid",
                layer=layer,
                partition=token_p.partition(layer),
                key_blocks=token_p.num_blocks(layout, layer),
                options=repr(token_p),
                token_vs_dense=_rel_l2(token, dense),
                token_density=plan_work(vs.plan(token_p, layout, layer=layer, q=q, k=k, block_size=64)).token_density,
            )
            for bs in (64, 128):
                tile_p = VMoBA(**cfg["pattern"], granularity="tile")
                tile = vs.attention(q, k, v, layout, tile_p, backend="torch", layer=layer, block_size=bs)
                tplan = vs.plan(tile_p, layout, layer=layer, q=q, k=k, block_size=bs)
                row[f"tile{bs}_vs_dense"] = _rel_l2(tile, dense)
                row[f"tile{bs}_vs_token"] = _rel_l2(tile, token)
                row[f"tile{bs}_token_density"] = plan_work(tplan).token_density
                row[f"tile{bs}_block_density"] = tplan.density
            rows.append(row)
            print(
                f"accuracy layer {layer} ({row['partition']:14s}) token/dense {row['token_vs_dense']:.3f}  "
                f"tile64/dense {row['tile64_vs_dense']:.3f} tile64/token {row['tile64_vs_token']:.3f}  "
                f"tile128/dense {row['tile128_vs_dense']:.3f} tile128/token {row['tile128_vs_token']:.3f}",
                flush=True,
            )
    return rows


def time_paths(
    grid=(21, 30, 52),
    heads: int = 12,
    head_dim: int = 128,
    layers=(0, 1, 2),
    device: str = "cuda",
    dtype=torch.bfloat16,
    repeats: int = 10,
    structured: bool = True,
    backward: bool = False,
) -> list[dict]:
    """GPU stage: median ms of dense SDPA, per-query VMoBA on the key-block and query-tile paths
    (selection included: VMoBA selects on every call) and ``granularity="tile"``, per layer.

    Returns one dict per (layer, variant); the budgeted GPU suite calls this and records it.
    """
    if not torch.cuda.is_available():
        raise RuntimeError("time_paths needs a CUDA GPU (the CPU stage is measure_work / measure_accuracy).")
    layout = vs.VideoLayout(*grid)
    q, k, v = (t.to(device) for t in random_inputs(grid, heads, head_dim, structured, dtype=dtype))
    if backward:
        for t in (q, k, v):
            t.requires_grad_(True)
    grad = torch.randn_like(q)

    def timed(fn) -> float:
        times = []
        for i in range(repeats + 2):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = fn()
            if backward:
                out.backward(grad)
            end.record()
            torch.cuda.synchronize()
            if i >= 2:
                times.append(start.elapsed_time(end))
        return sorted(times)[len(times) // 2]

    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    rows = [dict(layer=None, variant="dense-sdpa", ms=timed(lambda: F.scaled_dot_product_attention(qt, kt, vt)))]
    variants = {
        "key_block": VMoBA(),
        "query_tile": VMoBA(path="query_tile"),
        "tile-granularity": VMoBA(granularity="tile"),
    }
    for layer in layers:
        for name, p in variants.items():
            ms = timed(lambda p=p, layer=layer: vs.attention(q, k, v, layout, p, backend="triton", layer=layer))
            rows.append(dict(layer=layer, variant=name, ms=ms, direction="fwd+bwd" if backward else "fwd"))
    return rows


def _markdown(report: dict) -> str:
    lines = [
        "# VMoBA: work per kernel path and tile-vs-query output difference (CPU)",
        "",
        f"Created {report['created']} on {report['device']}; vidsparse {report['vidsparse']} at "
        f"`{report['git_commit'][:12]}`{' (dirty)' if report['git_dirty'] else ''}, torch {report['torch']}.",
        "",
        "Work = query-key pairs computed / dense pairs (S^2), padding included; key-block tiles 128 rows x 64 keys, "
        "query-tile blocks 128 x 128. Selection = one `VMoBA.dynamic_plan` call (gates, threshold, plan lists) "
        "at the heads measured (cost scales with heads), pack = `keyblock.pack`; both on CPU, given as wall-clock "
        "seconds / process CPU seconds (all threads) on a shared machine: indicative only, the GPU stage times "
        "them on the device. No attention timings.",
        "",
        "| shape | inputs | layer | partition | blocks | token density | key-block work | key-block / token "
        "| query-tile work | selection wall / cpu s (heads) | pack wall / cpu s |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["work"]:
        lines.append(
            f"| {r['shape']} | {r['inputs']} | {r['layer']} | {r['partition']} | {r['key_blocks']} "
            f"| {r['token_density']:.3f} | {r['key_block_fraction']:.3f} | {r['key_block_over_token']:.2f} "
            f"| {r['query_tile_fraction']:.3f} | {r['selection_wall_s']:.1f} / {r['selection_process_cpu_s']:.1f} "
            f"({r['measured_heads']}/{r['heads']}) | {r['pack_wall_s']:.1f} / {r['pack_process_cpu_s']:.1f} |"
        )
    acc = report["accuracy"]
    if acc:
        a0 = acc[0]
        lines += [
            "",
            f"## Output difference, grid {a0['grid']}, {a0['heads']} heads x {a0['head_dim']}, {a0['inputs']} inputs",
            "",
            "Relative L2 = ||a - b|| / ||b||. token = per-query VMoBA (published rule); tileN = granularity='tile' "
            "with kernel block N.",
            "",
            "| layer | partition | blocks | token density | token vs dense | tile64 vs dense | tile64 vs token "
            "| tile128 vs dense | tile128 vs token | tile64 / tile128 token density |",
            "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in acc:
            lines.append(
                f"| {r['layer']} | {r['partition']} | {r['key_blocks']} | {r['token_density']:.3f} "
                f"| {r['token_vs_dense']:.3f} | {r['tile64_vs_dense']:.3f} | {r['tile64_vs_token']:.3f} "
                f"| {r['tile128_vs_dense']:.3f} | {r['tile128_vs_token']:.3f} "
                f"| {r['tile64_token_density']:.3f} / {r['tile128_token_density']:.3f} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", default="benchmarks/results", help="where to write vmoba.json / vmoba.md")
    parser.add_argument("--quick", action="store_true", help="tiny shapes (smoke run, seconds)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    args = parser.parse_args(argv)
    out = checked_out_dir(parser, args.out_dir)
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = QUICK_SHAPES if args.quick else SHAPES
    work = []
    for shape in shapes:
        for structured in (False, True):
            work += measure_work(shape, structured)
    accuracy = measure_accuracy(QUICK_ACCURACY if args.quick else ACCURACY)
    commit, dirty = git_commit()
    report = dict(
        schema=SCHEMA,
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        device=device_name(torch.device("cpu")),
        device_type="cpu",
        torch=torch.__version__,
        triton=package_version("triton"),
        python=platform.python_version(),
        vidsparse=vs.__version__,
        git_commit=commit,
        git_dirty=dirty,
        quick=args.quick,
        cpu_threads=torch.get_num_threads(),
        work=work,
        accuracy=accuracy,
    )
    out.mkdir(parents=True, exist_ok=True)
    stem = "vmoba_quick" if args.quick else "vmoba"
    (out / f"{stem}.json").write_text(json.dumps(json_safe(report), indent=2) + "\n")
    (out / f"{stem}.md").write_text(_markdown(report))
    print(f"wrote {out / stem}.json and .md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
