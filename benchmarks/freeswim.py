"""FreeSwim attention work per denoising step at 1080p and 4K Wan shapes (block counts, CPU).

For each (model, target) shape: the window's exact block count in FreeSwim's raster order
(the reference's FlexAttention mask, 128-token blocks) and in vidsparse's tile-major plan,
and from them the self-attention work of one stage-2 step with CFG for direct dense
generation, the reference's nocache / cache variants and vidsparse's, plus the size of the
cross-attention cache. Block counts do not depend on a GPU; no timings are claimed here.

    python benchmarks/freeswim.py [--out-dir benchmarks/results] [--verify-plan]

``--verify-plan`` also builds the real vidsparse plan at the 1080p shapes and checks that its
block count equals the analytic one (slower).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass

import torch

import vidsparse as vs
from vidsparse.benchmeta import checked_out_dir, git_commit, json_safe, package_version
from vidsparse.freeswim.cache import format_bytes
from vidsparse.freeswim.cost import step_work, wan_cache_bytes, window_work

STEPS = 35  # kept stage-2 steps: 50 at strength 0.7
CACHE_INTERVAL = 2
BLOCK = 128


@dataclass(frozen=True)
class Shape:
    name: str
    model: str
    base_px: tuple[int, int]
    target_px: tuple[int, int]
    frames: int = 81
    inner_dim: int = 1536
    num_layers: int = 30

    @property
    def base_grid(self) -> tuple[int, int]:
        return (self.base_px[0] // 16, self.base_px[1] // 16)

    @property
    def grid(self) -> tuple[int, int, int]:
        return ((self.frames - 1) // 4 + 1, self.target_px[0] // 16, self.target_px[1] // 16)


SHAPES = (
    Shape("Wan2.1-1.3B 480p base -> 1088x1920", "Wan2.1-T2V-1.3B", (480, 832), (1088, 1920)),
    Shape("Wan2.1-1.3B 480p base -> 2160x3840", "Wan2.1-T2V-1.3B", (480, 832), (2160, 3840)),
    Shape("Wan2.1-14B 720p base -> 1088x1920", "Wan2.1-T2V-14B", (720, 1280), (1088, 1920), 81, 5120, 40),
    Shape("Wan2.1-14B 720p base -> 2160x3840", "Wan2.1-T2V-14B", (720, 1280), (2160, 3840), 81, 5120, 40),
)


def measure(shape: Shape, verify_plan: bool) -> dict:
    layout = vs.VideoLayout(*shape.grid)
    start = time.perf_counter()
    work = window_work(layout, shape.base_grid, BLOCK)
    seconds = time.perf_counter() - start
    row = dict(
        shape=shape.name,
        model=shape.model,
        base_px=list(shape.base_px),
        target_px=list(shape.target_px),
        frames=shape.frames,
        grid=list(shape.grid),
        tokens=layout.video_len,
        base_grid=list(shape.base_grid),
        window=list(vs.FreeSwim(base_grid=shape.base_grid).kernel_size(layout)),
        block_size=BLOCK,
        dense_blocks=work.dense_blocks,
        raster_blocks=work.raster_blocks,
        tile_blocks=work.tile_blocks,
        tile=list(work.tile),
        token_density=work.token_density,
        raster_block_density=work.raster_density,
        tile_block_density=work.tile_density,
        count_seconds=seconds,
        cache_bytes_bf16=wan_cache_bytes(shape.grid, shape.inner_dim, shape.num_layers, 2),
        steps=STEPS,
        cache_interval=CACHE_INTERVAL,
        per_step=[
            dict(
                variant=w.variant,
                attention_blocks=w.attention_blocks_per_step,
                relative_to_dense=w.relative_to_dense,
                transformer_rows=w.transformer_rows_per_step,
            )
            for w in step_work(work, STEPS, CACHE_INTERVAL)
        ],  # fmt: skip
    )
    if verify_plan and shape.target_px == (1088, 1920):
        start = time.perf_counter()
        plan = vs.plan(vs.FreeSwim(base_grid=shape.base_grid), layout, block_size=BLOCK)
        row["plan_blocks"] = int(plan.kv_counts.sum())
        row["plan_seconds"] = time.perf_counter() - start
        if row["plan_blocks"] != work.tile_blocks:
            raise SystemExit(f"{shape.name}: plan has {row['plan_blocks']} blocks, analytic {work.tile_blocks}")
    return row


def to_markdown(report: dict) -> str:
    lines = [
        "# FreeSwim: attention work per step (block counts)",
        "",
        f"Commit `{report['git_commit'][:12]}`{' (dirty)' if report['git_dirty'] else ''}, torch {report['torch']}, "
        f"{report['device']}. Exact counts of computed 128x128 blocks (no GPU, no timing). Stage 2 keeps "
        f"{STEPS} of 50 steps (strength 0.7); cache refresh every {CACHE_INTERVAL} steps = "
        f"{len(range(0, STEPS, CACHE_INTERVAL))} of {STEPS} conditional steps.",
        "",
        "## Window block density (one self-attention call)",
        "",
        "| shape | tokens | window (t x h x w) | token density | raster (FreeSwim) | tile-major (vidsparse) | tile |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        lines.append(
            f"| {r['shape']} | {r['tokens']:,} | {' x '.join(map(str, r['window']))} | {r['token_density']:.3f} | "
            f"{r['raster_block_density']:.3f} | **{r['tile_block_density']:.3f}** | {'x'.join(map(str, r['tile']))} |"
        )
    lines += [
        "",
        "## Self-attention work per stage-2 step with CFG (relative to direct dense generation = 1.00)",
        "",
        "Direct dense = 2 full attentions per step (cond + uncond). nocache: window + full in both passes. "
        f"cache={CACHE_INTERVAL}: window in both passes + the full branch on refresh steps (conditional only). "
        "Transformer rows = batch rows through projections/FFN per step (2 for dense); the reference computes "
        "batch 2 in every forward, vidsparse batch 1 where the full branch is skipped.",
        "",
        "| shape | variant | attention blocks / step | vs dense | transformer rows / step |",
        "|---|---|---|---|---|",
    ]
    for r in report["results"]:
        for w in r["per_step"]:
            lines.append(
                f"| {r['shape']} | {w['variant']} | {w['attention_blocks']:,.0f} | {w['relative_to_dense']:.3f} | "
                f"{w['transformer_rows']:.2f} |"
            )
    lines += [
        "",
        "## Cross-attention cache (one sample, bf16, all blocks)",
        "",
        "| shape | cache |",
        "|---|---|",
    ]
    for r in report["results"]:
        lines.append(f"| {r['shape']} | {format_bytes(r['cache_bytes_bf16'])} |")
    verified = [r for r in report["results"] if "plan_blocks" in r]
    if verified:
        lines += ["", "Plan check: " + "; ".join(
            f"{r['shape']}: vidsparse.plan has {r['plan_blocks']:,} blocks = the analytic count "
            f"(built in {r['plan_seconds']:.0f} s)" for r in verified
        ) + "."]  # fmt: skip
    lines += ["", "Reproduce: `python benchmarks/freeswim.py --verify-plan`.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", default="benchmarks/results")
    parser.add_argument("--verify-plan", action="store_true")
    args = parser.parse_args(argv)
    out = checked_out_dir(parser, args.out_dir)
    commit, dirty = git_commit()
    results = []
    for shape in SHAPES:
        row = measure(shape, args.verify_plan)
        print(
            f"{shape.name}: raster {row['raster_block_density']:.3f}, tile-major {row['tile_block_density']:.3f} "
            f"(tile {row['tile']}), token {row['token_density']:.3f}",
            flush=True,
        )
        results.append(row)
    report = json_safe(
        dict(
            schema="vidsparse.freeswim-work/1",
            device="CPU (block counts only)",
            torch=torch.__version__,
            diffusers=package_version("diffusers"),
            git_commit=commit,
            git_dirty=dirty,
            results=results,
        )
    )
    out.mkdir(parents=True, exist_ok=True)
    (out / "freeswim.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "freeswim.md").write_text(to_markdown(report))
    print(f"wrote {out / 'freeswim.json'} and {out / 'freeswim.md'}")


if __name__ == "__main__":
    main()
