"""Attention work per pattern at real model shapes: the block density of each plan.

Block density (computed blocks / all blocks) is what a block-sparse kernel pays, so
1 / density bounds the attention speedup over dense. It depends only on shapes, not on a
GPU, so this runs anywhere (a few seconds per plan on CPU). VMoBA is left out: its density
depends on the queries and keys (see ``vidsparse.patterns.vmoba.selection_density``).

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
            print(f"{shape.name:28s} {name:15s} block density {row['block_density']:.3f}", flush=True)
            rows.append(row)
    commit, dirty = git_commit()
    meta = dict(torch=torch.__version__, vidsparse=vs.__version__, commit=commit, dirty=dirty)
    out.mkdir(parents=True, exist_ok=True)
    (out / "densities.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=2) + "\n")
    lines = [
        f"Block density at family defaults, block {args.block_size} (commit {commit[:10]}, torch {torch.__version__}).",
        "",
        "| shape | pattern | block density | max attention speedup (1/d) |",
        "|---|---|---|---|",
    ]
    for r in rows:
        d = r["block_density"]
        lines.append(f"| {r['shape']} | {r['pattern']} | {d:.3f} | {1 / d:.1f}x |")
    (out / "densities.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
