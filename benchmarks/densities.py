"""Attention work per pattern at real model shapes: the block density and the work of each plan.

Block density is kept blocks / all blocks of the plan's block grid, in which each frame (or
tile) is padded to whole blocks. Work is what the Triton kernel path computes: kept blocks x
block^2, padding included, over the S^2 pairs dense attention computes on the real tokens
(``vidsparse.work.executed_work``). 1 / work bounds the attention speedup over dense; for
a plan that pads, 1 / block density overstates it. Both depend only on shapes, not on a GPU,
so this runs anywhere (a few seconds per plan on CPU). VMoBA is left out: its density depends
on the queries and keys (``benchmarks/vmoba.py``).

    python benchmarks/densities.py [--out-dir benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass

import torch

import vidsparse as vs
from vidsparse.benchmeta import checked_out_dir, git_commit
from vidsparse.families import get_family
from vidsparse.work import executed_work


@dataclass(frozen=True)
class Shape:
    name: str
    family: str
    grid: tuple[int, int, int]
    text_len: int = 0


SHAPES = (
    Shape("Wan2.1-1.3B 81x480x832", "wan", (21, 30, 52)),
    Shape("Wan2.1-14B 81x720x1280", "wan", (21, 45, 80)),
    Shape("HunyuanVideo 129x720x1280", "hunyuan", (33, 45, 80), text_len=256),
    # 729 SigLIP + 256 ByT5 + 1000 Qwen condition slots after the video
    Shape("HunyuanVideo-1.5 121x480x848", "hunyuan15", (31, 30, 53), text_len=1985),
    Shape("HunyuanVideo-1.5 121x720x1280", "hunyuan15", (31, 45, 80), text_len=1985),
)
PATTERNS = ("radial", "tile", "gna", "attention-tile")


def measure(shape: Shape, name: str, block_size: int) -> dict:
    family = get_family(shape.family)
    position = "none" if not shape.text_len else family.text_position
    layout = vs.VideoLayout(*shape.grid, text_len=shape.text_len, text_position=position)
    options = family.pattern_options(name, layout, block_size)
    pattern = vs.make_pattern(name, **options)
    start = time.perf_counter()
    plan = vs.plan(pattern, layout, block_size=block_size)
    seconds = time.perf_counter() - start
    work = executed_work(plan, "triton")
    return dict(
        shape=shape.name,
        family=shape.family,
        grid=list(shape.grid),
        text_len=shape.text_len,
        tokens=layout.seq_len,
        pattern=name,
        options=repr(pattern),
        block_size=block_size,
        block_density=plan.density,
        video_block_density=plan.video_density,
        work=work.computed_fraction,
        padded_tokens=plan.padded_len,
        partial_blocks=int((plan.mask_ids >= 0).sum().item()),
        plan_seconds_cpu=round(seconds, 3),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", default="benchmarks/results", help="where to write densities.json/.md")
    parser.add_argument("--block-size", type=int, default=128, help="kernel block size (default 128)")
    args = parser.parse_args(argv)
    out = checked_out_dir(parser, args.out_dir)
    rows = []
    for shape in SHAPES:
        for name in PATTERNS:
            row = measure(shape, name, args.block_size)
            print(f"{shape.name:30s} {name:15s} block density {row['block_density']:.3f}  work {row['work']:.3f}",
                  flush=True)  # fmt: skip
            rows.append(row)
    commit, dirty = git_commit()
    meta = dict(torch=torch.__version__, vidsparse=vs.__version__, commit=commit, dirty=dirty)
    out.mkdir(parents=True, exist_ok=True)
    (out / "densities.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=2) + "\n")
    lines = [
        f"Block density and work at family defaults, block {args.block_size} (commit {commit[:10]}, torch "
        f"{torch.__version__}). Block density: kept blocks of the plan's padded block grid. Work: pairs the "
        "Triton kernel path computes (padding included) / the S^2 pairs of dense attention; 1 / work bounds "
        "the attention speedup over dense.",
        "",
        "| shape | pattern | options | tokens (padded) | block density | work | max attention speedup (1/work) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        w = r["work"]
        lines.append(f"| {r['shape']} | {r['pattern']} | `{r['options']}` | {r['tokens']:,} ({r['padded_tokens']:,}) | "
                     f"{r['block_density']:.3f} | {w:.3f} | {1 / w:.1f}x |")  # fmt: skip
    (out / "densities.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
