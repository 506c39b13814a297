"""What the trained tiny model (``--model tiny``) shows, and what sparse attention does to it.

    PYTHONPATH=. python benchmarks/tiny_quality.py [--out benchmarks/results/tiny_quality] [--quick]

Writes ``<out>.json`` and ``<out>.md`` (device, versions, commit). Every video is made by the
generate library (``vidsparse.generation.generate``), i.e. the model as ``vidsparse generate`` runs it.

(a) Prompt check: for every held-out (colour, shape, motion) combination (never in training; see
    ``vidsparse.models.synthetic_world.HELD_OUT``) and as many trained ones, on plain and textured
    backgrounds and two seeds, ``check_prompt`` reads the dominant colour, the shape and the motion
    back from the frames (dense attention, and radial at family defaults).
(b) Each sparse pattern at the Wan family's defaults against the dense video of the same prompt
    and seed, at the trained size (17 frames): PSNR and SSIM.
(c) Length extension at 2x the trained frame count (33 frames): the same comparison and the prompt
    check, without and with a LoRA trained under radial attention by ``vidsparse train-lora`` on
    33-frame clips of the world (written as GIF + caption files, train-lora's dataset layout).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
PATTERNS_AT_DEFAULTS = ("radial", "tile", "attention-tile", "gna", "dual-scope", "vmoba")
#: The local patterns once more, sized for this model's 5x4x6 token grid (their Wan defaults cover all
#: of it): each keeps part of the keys, so the row measures what the pattern itself does to a video.
PATTERNS_AT_GRID = (
    ("tile", {"tile": (1, 2, 2), "window": (3, 1, 1)}),
    ("gna", {"kernel_size": (3, 3, 3)}),
    ("vmoba", {"temporal_chunk": 1, "topk": 2}),
)
#: Above this PSNR vs dense a pattern's video is the dense one up to rounding (it kept every key).
DENSE_PSNR_DB = 60.0
#: The frame strip of docs/tiny_model.md: dense, seed 0, every 4th frame, one row per prompt (four
#: motions; the third is a held-out combination).
STRIP_PROMPTS = ("a blue ball moving left", "a blue ball bouncing", "a red square moving left",
                 "a red ball moving right")  # fmt: skip


def _prompts(quick: bool, seeds: tuple[int, ...] = (0, 1)) -> list[tuple[str, int, bool]]:
    """(prompt, seed, held_out): every held-out combination and as many trained ones."""
    from vidsparse.models import synthetic_world as world

    held = world.HELD_OUT
    trained = world.combinations(held_out=False)[:: max(1, len(world.combinations(False)) // len(held))][: len(held)]
    out = []
    seeds = (0,) if quick else seeds
    for seed in seeds:
        for i, triple in enumerate([*held, *trained]):
            bg = world.BACKGROUNDS[(i + seed) % len(world.BACKGROUNDS)]
            out.append((world.caption(*triple, bg), seed, triple in held))
    if quick:
        out = out[:2] + [p for p in out if not p[2]][:2]
    return out


def _run(prompt: str, seed: int, pattern: str, frames: int | None = None, lora: str | None = None,
         options: dict[str, Any] | None = None):  # fmt: skip
    """The ``generate`` result of one video (frames, attention work)."""
    from vidsparse.generation import GenerateOptions, generate

    opts = GenerateOptions(model="tiny", prompt=prompt, seed=seed, pattern=pattern, frames=frames, lora=lora,
                           pattern_options=dict(options or {}), progress=False, device="cpu")  # fmt: skip
    return generate(opts)


def _generate(prompt: str, seed: int, pattern: str, frames: int | None = None, lora: str | None = None):
    return _run(prompt, seed, pattern, frames, lora).frames


def _compare(frames: np.ndarray, dense: np.ndarray) -> dict[str, float | None]:
    from vidsparse.video_io import psnr, ssim

    p = psnr(frames, dense)
    return {"psnr_db": None if math.isinf(p) else round(p, 2), "ssim": round(ssim(frames, dense), 4)}


def _rate(rows: list[dict[str, Any]], key: str) -> float | None:
    return round(sum(bool(r[key]) for r in rows) / len(rows), 3) if rows else None


def prompt_check(prompts, frames: int | None, lora: str | None, log) -> dict[str, Any]:
    """Dense and radial videos of every prompt, read back; returns rows and the radial-vs-dense numbers."""
    from vidsparse.models.synthetic_world import check_prompt

    rows, dense_frames = [], {}
    for prompt, seed, held in prompts:
        dense = _generate(prompt, seed, "dense", frames, lora)
        radial = _generate(prompt, seed, "radial", frames, lora)
        dense_frames[(prompt, seed)] = dense
        for attn, video in (("dense", dense), ("radial", radial)):
            check = check_prompt(video, prompt)
            rows.append({"attention": attn, "seed": seed, "held_out": held, **check.as_dict()})
        rows[-1].update(_compare(radial, dense))
        log(f"  {prompt!r} seed {seed}: dense {rows[-2]['read']} radial {rows[-1]['read']}")
    summary = {}
    for attn in ("dense", "radial"):
        for held in (True, False):
            sel = [r for r in rows if r["attention"] == attn and r["held_out"] == held]
            summary[f"{attn}_{'held_out' if held else 'trained'}"] = {
                "n": len(sel), "pass": _rate(sel, "passed"), "colour": _rate(sel, "colour_ok"),
                "motion": _rate(sel, "motion_ok"), "shape": _rate(sel, "shape_ok"),
            }  # fmt: skip
    radial = [r for r in rows if r["attention"] == "radial"]
    summary["radial_vs_dense"] = _mean_compare(radial)
    return {"rows": rows, "summary": summary, "dense_frames": dense_frames}


def _mean_compare(rows: list[dict[str, Any]]) -> dict[str, float | None]:
    ps = [r["psnr_db"] for r in rows if r.get("psnr_db") is not None]
    ss = [r["ssim"] for r in rows if r.get("ssim") is not None]
    return {
        "psnr_db": round(float(np.mean(ps)), 2) if ps else None,
        "ssim": round(float(np.mean(ss)), 4) if ss else None,
        "n": len(rows),
    }


def _versus_dense(prompts, dense_frames, pattern: str, options: dict[str, Any], frames: int | None,
                  lora: str | None) -> tuple[dict[str, Any], list[float]]:  # fmt: skip
    """One pattern's mean PSNR / SSIM against the dense videos and each video's attention work, or
    ``{"error": ...}`` when the pattern cannot run on this grid (the report says why and goes on)."""
    rows, work = [], []
    try:
        for prompt, seed, _ in prompts:
            res = _run(prompt, seed, pattern, frames, lora, options)
            rows.append(_compare(res.frames, dense_frames[(prompt, seed)]))
            work.append(res.kept_blocks)
    except Exception as exc:
        return {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"}, []
    return _mean_compare(rows), work


def patterns_vs_dense(prompts, dense_frames, frames: int | None, lora: str | None, log) -> dict[str, Any]:
    out = {}
    for pattern in PATTERNS_AT_DEFAULTS:
        out[pattern], _ = _versus_dense(prompts, dense_frames, pattern, {}, frames, lora)
        log(f"  {pattern}: {out[pattern]}")
    return out


def patterns_at_grid(prompts, dense_frames, log) -> dict[str, Any]:
    """``PATTERNS_AT_GRID`` vs dense at the trained size, with the attention work they kept."""
    out = {}
    for pattern, options in PATTERNS_AT_GRID:
        key = f"{pattern} {json.dumps(options, separators=(',', '='))}"
        result, work = _versus_dense(prompts, dense_frames, pattern, options, None, None)
        out[key] = result if "error" in result else {**result, "attention_work": round(float(np.mean(work)), 3)}
        log(f"  {key}: {out[key]}")
    return out


#: The length-extension strip: radial at 2x the trained frames, without and with the LoRA, seed 0.
LENGTH_STRIP_PROMPTS = ("a blue ball moving left", "a red square moving left")


def _strip_image(rows: list[np.ndarray], step: int) -> np.ndarray:
    """Frames [F, H, W, 3] (uint8 or [0, 1]) of each video -> one uint8 picture: every ``step``-th frame per row."""
    out = []
    for video in rows:
        video = np.asarray(video, dtype=np.float32)
        video = video / 255.0 if video.max() > 1.5 else video
        out.append(np.concatenate(list(video[::step]), axis=1))
    return (np.concatenate(out, axis=0) * 255).round().astype(np.uint8)


def length_strip(path: Path, frames: int, lora: str, log) -> None:
    """docs/images/tiny_length_extension.png: every 4th of ``frames`` frames under radial; rows: each
    ``LENGTH_STRIP_PROMPTS`` prompt without, then with, the LoRA."""
    from PIL import Image

    rows = [_generate(p, 0, "radial", frames, adapter) for p in LENGTH_STRIP_PROMPTS for adapter in (None, lora)]
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(_strip_image(rows, 4)).save(path)
    log(f"wrote {path}")


def frame_strip(path: Path, log) -> None:
    """docs/images/tiny_model_frames.png: every 4th frame (columns) of each ``STRIP_PROMPTS`` video (rows)."""
    from PIL import Image

    rows = [_generate(prompt, 0, "dense") for prompt in STRIP_PROMPTS]
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(_strip_image(rows, 4)).save(path)
    log(f"wrote {path}")


#: Jittered copies of every trained (colour, shape, motion, background) in the LoRA's dataset: 768 clips,
#: as many as the base model trained on.
LORA_VARIANTS = 4
#: Every projection the LoRA adapts: self- and cross-attention, FFN, and the position code's linear layer
#: (``TinyWanTransformer3DModel``): the code indexes frames, so at 2x the frames it is what must change
#: (self-attention q/k/v/o plus the position code reached 21/32 instead of 24/32 in the measurement of
#: docs/tiny_model.md).
LORA_TARGETS = (
    "attn1.to_q,attn1.to_k,attn1.to_v,attn1.to_out.0,attn2.to_q,attn2.to_k,attn2.to_v,attn2.to_out.0,"
    "ffn.net.0.proj,ffn.net.2,position_embedding.proj"
)


def write_world_dataset(folder: Path, frames: int, seed: int, variants: int = LORA_VARIANTS) -> int:
    """World clips (trained combinations only) as GIF + caption .txt, train-lora's dataset layout."""
    from vidsparse.models import synthetic_world as world
    from vidsparse.video_io import write_video

    folder.mkdir(parents=True, exist_ok=True)
    scenes = world.training_scenes(variants, seed=seed)
    for i, scene in enumerate(scenes):
        video = (world.render(scene, frames) * 255).round().astype(np.uint8)
        write_video(folder / f"clip_{i:04d}.gif", video, fps=16)
        (folder / f"clip_{i:04d}.txt").write_text(scene.caption + "\n")
    return len(scenes)


def train_lora(data: Path, out: Path, frames: int, steps: int, log) -> dict[str, Any]:
    """``vidsparse train-lora`` under radial with the base model's recipe (lr 3e-3 with a cosine decay, noise
    levels shifted by 8: the motion is decided at high noise), rank 16 on ``LORA_TARGETS``."""
    from vidsparse.models.synthetic_world import HEIGHT, WIDTH

    cmd = [sys.executable, "-m", "vidsparse", "train-lora", "--model", "tiny", "--data-dir", str(data),
           "--output-dir", str(out), "--num-frames", str(frames), "--height", str(HEIGHT), "--width", str(WIDTH),
           "--pattern", "radial", "--rank", "16", "--target-modules", LORA_TARGETS, "--learning-rate", "3e-3",
           "--lr-scheduler", "cosine", "--lr-warmup-steps", str(min(100, steps // 10)), "--flow-shift", "8",
           "--batch-size", "4", "--max-train-steps", str(steps), "--no-gradient-checkpointing",
           "--checkpointing-steps", str(steps), "--seed", "0", "--no-progress"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": str(torch.get_num_threads())}  # fmt: skip
    t0, c0 = time.time(), os.times()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    c1 = os.times()
    if proc.returncode != 0:
        raise RuntimeError(f"train-lora failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    log(proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else "train-lora done")
    return {
        "command": "vidsparse " + " ".join(cmd[3:]),
        "wall_s": round(time.time() - t0, 1),
        "cpu_s": round((c1.children_user - c0.children_user) + (c1.children_system - c0.children_system), 1),
    }


def _markdown(doc: dict[str, Any]) -> str:
    m = doc["meta"]
    lines = [
        "# The trained tiny model (`--model tiny`): prompt check and sparse patterns vs dense (measured)",
        "",
        "A small demonstration model of a synthetic world of coloured shapes (docs/tiny_model.md), not a general "
        "video model. Produced by `benchmarks/tiny_quality.py`.",
        "",
        f"Device: {m['device']} ({m['threads']} torch threads; machine shared with other jobs). torch {m['torch']}, "
        f"diffusers {m['diffusers']}, commit {m['commit'][:12]}{' (dirty)' if m['dirty'] else ''}, {m['date']}. "
        f"Report wall time {m['wall_s']} s.",
        "",
        f"Model: trained {doc['training'].get('train_wall_s')} s wall / {doc['training'].get('train_cpu_s')} s CPU "
        f"(user + sys); generation at {doc['defaults']} (frames, height, width, steps, guidance).",
        "",
        "## (a) Does the video show what was asked? (17 frames, the trained length)",
        "",
        "`check_prompt` reads the object's dominant colour, its shape and its motion (centroid track, area trend) "
        "from the decoded frames. *pass* = colour and motion both right; shape is reported apart.",
        "",
        "| attention | prompts | n | pass | colour | motion | shape |",
        "|---|---|---|---|---|---|---|",
    ]
    for key, s in doc["a_prompt_check"]["summary"].items():
        if key.endswith("_vs_dense"):
            continue
        attn, which = key.split("_", 1)
        lines.append(f"| {attn} | {which.replace('_', '-')} | {s['n']} | {s['pass']} | {s['colour']} | {s['motion']} | "
                     f"{s['shape']} |")  # fmt: skip
    lines += [
        "",
        "## (b) Sparse patterns at the Wan family's defaults vs dense, same prompt and seed (17 frames)",
        "",
        "| pattern | PSNR (dB) | SSIM | videos |",
        "|---|---|---|---|",
    ]
    for name, r in doc["b_patterns_vs_dense"].items():
        if "error" in r:
            lines.append(f"| {name} | - | - | not run: {r['error']} |")
        else:
            lines.append(f"| {name} | {r['psnr_db']} | {r['ssim']} | {r['n']} |")
    same = [n for n, r in doc["b_patterns_vs_dense"].items() if (r.get("psnr_db") or 0) > DENSE_PSNR_DB]
    if same:
        lines += [
            "",
            f"{', '.join(same)}: above {DENSE_PSNR_DB} dB, i.e. the dense video up to rounding. Their "
            "defaults (windows and tiles sized for Wan's 21x30x52 token grid) cover the whole 5x4x6 grid of "
            "this model, so at this size they are dense attention, not a measurement of their sparsity.",
        ]
    if doc.get("b_patterns_at_grid"):
        lines += [
            "",
            "The local patterns sized for this 5x4x6 grid instead (options in the name; attention work = kept blocks / "
            "blocks of the padded block grid over all steps and layers, dense-first steps included):",
            "",
            "| pattern | PSNR (dB) | SSIM | attention work | videos |",
            "|---|---|---|---|---|",
        ]
        for name, r in doc["b_patterns_at_grid"].items():
            if "error" in r:
                lines.append(f"| `{name}` | - | - | - | not run: {r['error']} |")
            else:
                lines.append(f"| `{name}` | {r['psnr_db']} | {r['ssim']} | {r['attention_work']} | {r['n']} |")
    c = doc["c_length_extension"]
    lines += [
        "",
        f"## (c) Length extension: {c['frames']} frames (2x the trained {doc['defaults']['frames']})",
        "",
        f"LoRA: `{c['lora']['command']}` ({c['lora']['wall_s']} s wall, {c['lora']['cpu_s']} s CPU; "
        f"{c['lora_clips']} clips of the world at {c['frames']} frames, trained combinations only).",
        "",
        "| LoRA | attention | held-out pass | trained pass | radial vs dense PSNR (dB) | SSIM |",
        "|---|---|---|---|---|---|",
    ]
    for tag in ("without_lora", "with_lora"):
        s = c[tag]["summary"]
        for attn in ("dense", "radial"):
            cmp = s["radial_vs_dense"] if attn == "radial" else {"psnr_db": "-", "ssim": "-"}
            lines.append(f"| {tag.replace('_', ' ')} | {attn} | {s[f'{attn}_held_out']['pass']} | "
                         f"{s[f'{attn}_trained']['pass']} | {cmp['psnr_db']} | {cmp['ssim']} |")  # fmt: skip
    lines += [
        "",
        "The LoRA is trained under radial attention and meant to run with it (Radial Attention's recipe: the "
        "sparse mask is part of the model the LoRA adapts); dense attention with the same LoRA is shown for "
        "completeness. Chance for the motion is 1/6.",
    ]
    lines += ["", "Per-pattern PSNR / SSIM vs dense at this length:", "", "| LoRA | pattern | PSNR (dB) | SSIM |",
              "|---|---|---|---|"]  # fmt: skip
    for tag in ("without_lora", "with_lora"):
        for name, r in c[tag]["patterns"].items():
            val = f"{r['psnr_db']} | {r['ssim']}" if "error" not in r else f"- | not run: {r['error']}"
            lines.append(f"| {tag.replace('_', ' ')} | {name} | {val} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "tiny_quality"))
    parser.add_argument("--lora-steps", type=int, default=1500)
    parser.add_argument("--quick", action="store_true", help="four prompts, one seed, 4 LoRA steps (smoke run)")
    parser.add_argument(
        "--strip",
        default=str(ROOT / "docs" / "images" / "tiny_model_frames.png"),
        help="where to write the frame strip of docs/tiny_model.md ('' for none)",
    )
    parser.add_argument(
        "--length-strip",
        default=str(ROOT / "docs" / "images" / "tiny_length_extension.png"),
        help="where to write the 2x-length strip (radial without / with the LoRA; '' for none)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: on a shared CPU two threads run far slower than one)",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from vidsparse.atomic import write_json, write_text
    from vidsparse.benchmeta import checked_out_dir, device_name, git_commit, json_safe, package_version

    # the report and the strips are written at the end of a long run: their folders are checked now
    for flag, path in (("--out", args.out), ("--strip", args.strip), ("--length-strip", args.length_strip)):
        if path:
            checked_out_dir(parser, Path(path).expanduser().parent, flag)
    from vidsparse.models.tiny_trained import TRAINED_DEFAULTS, WEIGHTS_DIR

    def log(msg: str) -> None:
        print(msg, flush=True)

    t0 = time.time()
    prompts = _prompts(args.quick)
    base = TRAINED_DEFAULTS["frames"]
    long = 2 * (base - 1) + 1
    few = prompts[: 2 if args.quick else 4]
    long_prompts = prompts
    log(f"(a) prompt check, {len(prompts)} prompts x seeds")
    a = prompt_check(prompts, None, None, log)
    log("(b) patterns vs dense")
    dense_frames = a.pop("dense_frames")
    b = patterns_vs_dense(few, dense_frames, None, None, log)
    b_grid = patterns_at_grid(few, dense_frames, log)
    log(f"(c) {long} frames")
    with tempfile.TemporaryDirectory() as tmp:
        data, lora_dir = Path(tmp) / "world", Path(tmp) / "lora"
        clips = write_world_dataset(data, long, seed=100, variants=1 if args.quick else LORA_VARIANTS)
        lora = train_lora(data, lora_dir, long, 4 if args.quick else args.lora_steps, log)
        c: dict[str, Any] = {"frames": long, "lora": lora, "lora_clips": clips}
        for tag, path in (("without_lora", None), ("with_lora", str(lora_dir))):
            log(f"  {tag}")
            res = prompt_check(long_prompts, long, path, log)
            dense = res.pop("dense_frames")
            res["patterns"] = patterns_vs_dense(few, dense, long, path, log)
            c[tag] = res
        if args.length_strip and not args.quick:
            length_strip(Path(args.length_strip), long, str(lora_dir), log)
    commit, dirty = git_commit()
    training = json.loads((WEIGHTS_DIR / "training.json").read_text())
    doc = {
        "meta": {
            "device": device_name(torch.device("cpu")),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "diffusers": package_version("diffusers"),
            "python": platform.python_version(),
            "commit": commit,
            "dirty": dirty,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "wall_s": round(time.time() - t0, 1),
            "quick": args.quick,
        },  # fmt: skip
        "defaults": dict(TRAINED_DEFAULTS),
        "training": training,
        "a_prompt_check": a,
        "b_patterns_vs_dense": b,
        "b_patterns_at_grid": b_grid,
        "c_length_extension": c,
    }
    if args.strip and not args.quick:
        frame_strip(Path(args.strip), log)
    out = Path(args.out)
    write_json(out.with_suffix(".json"), json_safe(doc))
    write_text(out.with_suffix(".md"), _markdown(doc))
    log(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
