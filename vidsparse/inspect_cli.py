"""Show what a sparse pattern computes on a video grid: densities per layer and head, and a PNG.

The grid is the latent token grid after the VAE and patchify (--grid 21x30x52), or a video
size turned into that grid with a model family's VAE and patch factors (--video 81x480x832
--family wan). The PNG shows the block matrix the kernel runs (whole, partial and skipped
blocks, frame boundaries) and, for one query token (--query f,h,w), the keys it attends,
frame by frame. Dynamic patterns (VMoBA) select blocks from q and k: inspect uses random
q/k unless --qk gives real ones, and says so.

Examples:
  vidsparse inspect --pattern radial --decay-factor 0.2 --sink --grid 21x30x52
  vidsparse inspect --pattern tile --tile 4,4,8 --window 3,3,3 --video 81x480x832 --family wan
  vidsparse inspect --pattern vmoba --threshold 0.25 --grid 21x30x52 --layers 3
"""

from __future__ import annotations

import argparse
import json
import math
import re
import time
from pathlib import Path
from typing import Any

import torch

from vidsparse.cli import flags_given
from vidsparse.density import token_density, video_block_density
from vidsparse.errors import UserError
from vidsparse.families import geometries, video_geometry
from vidsparse.kernels.backends import backend_choices
from vidsparse.pattern_flags import add_pattern_arguments, pattern_from_args
from vidsparse.video_io import check_output_file
from vidsparse.work import keeps_every_pair, layer_span, no_speedup_warning


def parse_triple(text: str, flag: str, example: str) -> tuple[int, int, int]:
    """'21x30x52' or '21,30,52' -> (21, 30, 52), positive ints; UserError otherwise."""
    parts = re.split(r"[x,]", str(text).strip().lower())
    try:
        values = tuple(int(p) for p in parts)
    except ValueError:
        values = ()
    if len(values) != 3 or any(v < 1 for v in values):
        raise UserError(f"{flag} expects three positive integers like {example}, got {text!r}.")
    return values  # type: ignore[return-value]


def layer_label(pattern, layer: int) -> str:
    """Per-layer variant of a pattern, if it has one (VMoBA's temporal/spatial/spatiotemporal)."""
    fn = getattr(pattern, "partition", None)
    if callable(fn):
        try:
            return str(fn(layer))
        except Exception:
            return ""
    return ""


def default_layers(pattern) -> int:
    """Layers to report: one cycle for layer-dependent patterns, one layer otherwise."""
    cycle = getattr(pattern, "layer_cycle", None)
    if isinstance(cycle, tuple) and cycle and all(isinstance(c, int) for c in cycle):
        return max(1, sum(cycle) + int(getattr(pattern, "layer_offset", 0) or 0))
    if pattern.uses_layer or pattern.dynamic:
        return 3
    return 1


def load_qk(path: str, layout, heads: int) -> tuple[Any, Any]:
    """q, k from a torch file: {"q": ..., "k": ...} (or a (q, k) pair), each [B, S, H, D] or
    [S, H, D], or a list of those (one per layer)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise ValueError(f"--qk {path!r}: no such file. Save q and k with torch.save({{'q': q, 'k': k}}, path).")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # not a torch file, or one holding more than tensors (pickle's many errors)
        raise ValueError(
            f"--qk {path!r} is not a torch file holding only tensors, lists and dicts ({type(exc).__name__} from "
            "torch.load(weights_only=True)). Save q and k with torch.save({'q': q, 'k': k}, path)."
        ) from None
    if isinstance(obj, dict) and "q" in obj and "k" in obj:
        q, k = obj["q"], obj["k"]
    elif isinstance(obj, (tuple, list)) and len(obj) == 2:
        q, k = obj
    else:
        raise ValueError(
            f"--qk {path!r} must hold {{'q': tensor, 'k': tensor}} or a (q, k) pair, got {type(obj).__name__}."
        )

    def fix(t, name):
        if isinstance(t, (list, tuple)):
            return [fix(x, name) for x in t]
        if not isinstance(t, torch.Tensor) or t.dim() not in (3, 4) or not t.is_floating_point():
            raise ValueError(
                f"--qk: {name} must be a float tensor [B, S, H, D] or [S, H, D], got {getattr(t, 'shape', t)}."
            )
        t = t if t.dim() == 4 else t.unsqueeze(0)
        if t.shape[1] != layout.seq_len:
            raise ValueError(
                f"--qk: {name} has {t.shape[1]} tokens but the grid {layout} has {layout.seq_len}; "
                "give the grid (and --text-len) the activations were recorded on."
            )
        return t.float()

    return fix(q, "q"), fix(k, "k")


# -- command ----------------------------------------------------------------------------------


def _add_qk_arguments(parser: argparse.ArgumentParser) -> None:
    """The q/k of dynamic patterns: refused with a static one, whose mask ignores them."""
    parser.add_argument(
        "--qk",
        default="random",
        metavar="random|PATH",
        help="q and k for dynamic patterns: 'random' (default; Gaussian, seeded) or a torch file with "
        "{'q': [B,S,H,D], 'k': [B,S,H,D]} recorded from a model",
    )
    parser.add_argument("--heads", type=int, default=2, metavar="N", help="heads of random q/k (default 2)")
    parser.add_argument(
        "--head-dim", type=int, default=64, metavar="D", help="head dimension of random q/k (default 64)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of random q/k (default 0)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    grid = parser.add_argument_group("grid")
    grid.add_argument(
        "--grid", metavar="FxHxW", help="latent token grid after patchify, e.g. 21x30x52 (Wan 480p, 81 frames)"
    )
    grid.add_argument(
        "--video",
        metavar="FRAMESxHEIGHTxWIDTH",
        help="video size in pixels and frames, turned into the token grid with --family's VAE and patch factors, "
        "e.g. 81x480x832",
    )
    grid.add_argument(
        "--family",
        default=None,
        metavar="NAME",
        help=f"model family: {', '.join(geometries())}; gives --video its VAE and patch factors (default wan) and "
        "adds the text span of joint-attention families (hunyuan, hunyuan15, cogvideox, cogvideox1.5, mochi), "
        "also to --grid",
    )
    grid.add_argument(
        "--text-len",
        type=int,
        default=None,
        metavar="N",
        help="text tokens in the self-attention sequence (default: the --family's, else 0)",
    )
    grid.add_argument(
        "--text-position",
        choices=("before", "after"),
        default=None,
        help="where the text span sits (default: the family's, else after)",
    )
    parser.add_argument(
        "--block-size",
        type=int,
        default=None,
        metavar="N",
        help="kernel block size in tokens, a power of two (default: the pattern's own block_size if it has one, else 128)",
    )
    parser.add_argument(
        "--layers",
        type=int,
        default=None,
        metavar="N",
        help="report layers 0..N-1 (default: one layer cycle for layer-dependent patterns such as VMoBA, else 1)",
    )
    parser.add_argument("--layer", type=int, default=0, metavar="L", help="layer drawn in the PNG (default 0)")
    parser.add_argument(
        "--backend",
        default="auto",
        choices=backend_choices(),
        help="kernel backend whose path the 'work' column counts: auto (triton on CUDA, torch on CPU: both run "
        "per-query VMoBA key-block-major), torch, flex (query-tile path only) or triton",
    )
    parser.add_argument("--head", type=int, default=0, metavar="H", help="head drawn in the PNG (default 0)")
    parser.add_argument(
        "--query",
        metavar="F,H,W",
        default=None,
        help="query token (frame, row, column on the token grid) whose attended keys are drawn "
        "(default: the centre token)",
    )
    _add_qk_arguments(parser.add_argument_group("dynamic patterns (VMoBA)"))
    out = parser.add_argument_group("output")
    out.add_argument(
        "--out",
        default=None,
        metavar="PATH.png",
        help="PNG to write (default: <pattern>_<F>x<H>x<W>.png in the current directory)",
    )
    out.add_argument("--no-plot", action="store_true", help="print densities only, write no PNG")
    out.add_argument("--json", default=None, metavar="PATH", help="also write the densities as JSON to PATH")
    add_pattern_arguments(parser)


def _layout_from_args(args) -> tuple[Any, str]:
    from vidsparse.layout import VideoLayout

    if (args.grid is None) == (args.video is None):
        raise UserError(
            "Give exactly one of --grid FxHxW (latent token grid, e.g. 21x30x52) or --video FRAMESxHEIGHTxWIDTH "
            "(e.g. 81x480x832, with --family)."
        )
    fam = video_geometry(args.family) if args.family is not None else None
    text_len, text_pos = (fam.text_len, fam.text_position) if fam is not None else (0, "none")
    if args.grid is not None:
        f, h, w = parse_triple(args.grid, "--grid", "21x30x52")
        origin = f"grid {f}x{h}x{w}"
    else:
        fam = fam or video_geometry("wan")
        frames, height, width = parse_triple(args.video, "--video", "81x480x832")
        f, h, w = fam.latent_grid(frames, height, width)
        text_len, text_pos = fam.text_len, fam.text_position
        origin = (
            f"video {frames}x{height}x{width} with {fam.name} factors (VAE {fam.temporal}x time, {fam.spatial}x space, "
            f"patch {'x'.join(map(str, fam.patch))})"
        )
    if args.text_len is not None:
        if args.text_len < 0:
            raise UserError(f"--text-len must be >= 0, got {args.text_len}.")
        text_len = args.text_len
    if args.text_position is not None:
        text_pos = args.text_position
    if text_len == 0:
        text_pos = "none"
    elif text_pos == "none":
        text_pos = "after"
    if args.grid is not None and fam is not None and text_len:  # the span the layout really has, not the family's
        origin += f", {fam.name} text span" if text_len == fam.text_len else f", {text_len} text tokens"
    return VideoLayout(f, h, w, text_len=text_len, text_position=text_pos), origin


def _block_size(args, pattern) -> int:
    bs = args.block_size
    if bs is None:
        own = getattr(pattern, "block_size", None)
        bs = own if isinstance(own, int) and not isinstance(own, bool) else 128
    if bs < 1 or bs & (bs - 1):
        raise UserError(f"--block-size must be a power of two such as 64 or 128, got {bs}.")
    return bs


def _query(args, layout) -> tuple[int, int, int]:
    if args.query is None:
        return (layout.frames // 2, layout.height // 2, layout.width // 2)
    parts = re.split(r"[x,]", str(args.query).strip())
    try:
        f, h, w = (int(p) for p in parts)
    except ValueError:
        raise UserError(
            f"--query expects three integers f,h,w on the token grid, e.g. 10,15,26; got {args.query!r}."
        ) from None
    return f, h, w


def inspect_pattern(args) -> dict[str, Any]:
    """Plans for the requested layers, densities, and the PNG; returns a JSON-able report."""
    import vidsparse as vs
    from vidsparse.visualize import plot_plan, query_index

    if args.out and args.no_plot:
        raise UserError("--out names the PNG, and --no-plot draws none; drop one of them.")
    # Output paths first: an unwritable one is one line before any planning (issue 18, item 3).
    if args.out and not args.no_plot:
        check_output_file(args.out, "--out", (".png",))
    if args.json:
        check_output_file(args.json, "--json")
    pattern = pattern_from_args(args)
    layout, origin = _layout_from_args(args)
    out_png = None
    if not args.no_plot:
        out_png = args.out or check_output_file(
            f"{pattern.name}_{layout.frames}x{layout.height}x{layout.width}.png", "--out", (".png",)
        )
    pattern.validate(layout)
    if not pattern.dynamic:  # q/k flags choose a dynamic pattern's inputs; a static mask ignores them
        given = flags_given(args, _add_qk_arguments)
        if given:
            raise UserError(
                f"{', '.join(given)} set the q/k of dynamic patterns (vmoba), and {type(pattern).__name__}'s mask "
                "does not depend on q/k; drop them."
            )
    if args.text_position is not None and layout.text_len == 0:
        raise UserError("--text-position places a text span, and this grid has none; add --text-len N or drop it.")
    bs = _block_size(args, pattern)
    layers = args.layers if args.layers is not None else default_layers(pattern)
    if layers < 1:
        raise UserError(f"--layers must be >= 1, got {layers}.")
    if not args.layer >= 0:
        raise UserError(f"--layer must be >= 0, got {args.layer}.")
    query = _query(args, layout)
    query_index(layout, *query)  # validates the range before any planning

    qk_note = None
    q = k = None
    heads = 1
    if pattern.dynamic:
        if args.qk == "random":
            if args.heads < 1 or args.head_dim < 1:
                raise UserError(f"--heads and --head-dim must be >= 1, got {args.heads} and {args.head_dim}.")
            gen = torch.Generator().manual_seed(args.seed)
            shape = (1, layout.seq_len, args.heads, args.head_dim)
            q = torch.randn(shape, generator=gen)
            k = torch.randn(shape, generator=gen)
            qk_note = (
                f"{type(pattern).__name__} is dynamic: blocks are chosen from q and k. These densities use RANDOM "
                f"q/k (seed {args.seed}, {args.heads} heads, head dim {args.head_dim}); real activations select "
                "differently. Record q/k from a model and pass --qk file.pt for real numbers."
            )
        else:
            q, k = load_qk(args.qk, layout, args.heads)
            qk_note = f"{type(pattern).__name__} is dynamic: densities use the q/k recorded in {args.qk}."
        heads = (q[0] if isinstance(q, list) else q).shape[2]
    if not 0 <= args.head < heads:
        raise UserError(f"--head {args.head} is out of range: this plan has {heads} head(s) (0-based).")

    def qk_for(layer):
        if q is None:
            return None, None
        if isinstance(q, list):
            if layer >= len(q):
                raise UserError(f"--qk holds {len(q)} layers; ask for --layers <= {len(q)} and --layer < {len(q)}.")
            return q[layer], k[layer]
        return q, k

    from vidsparse.attention import backend_for
    from vidsparse.work import executed_work

    backend = backend_for(args.backend, torch.empty(0)).name  # auto: torch here, triton on CUDA (same paths)
    static_same = not pattern.dynamic and not pattern.uses_layer
    rows = []
    plans = {}
    for layer in sorted(set(range(layers)) | {args.layer}):
        ql, kl = qk_for(layer)
        t0 = time.perf_counter()
        if static_same and rows:
            p = plans[0]
        else:
            p = vs.plan(pattern, layout, num_heads=heads, layer=layer, q=ql, k=kl, block_size=bs)
        plans[layer] = p
        if layer >= layers:
            continue
        td = token_density(p)
        vd = video_block_density(p)
        work = executed_work(p, backend)
        rows.append(
            {
                "layer": layer,
                "variant": layer_label(pattern, layer),
                "block_density": float(p.density),
                "video_block_density": float(vd.mean()),
                "token_density": float(td.mean()),
                "per_head_block_density": [float(x) for x in p.per_head_density()],
                "per_head_token_density": [float(x) for x in td],
                "work": work.computed_fraction,
                "path": work.path,
                "keeps_every_pair": keeps_every_pair(p),
                "work_detail": work.as_dict(),
                "plan_seconds": time.perf_counter() - t0,
            }
        )
    report = {
        "pattern": repr(pattern),
        "layout": str(layout),
        "grid": list(layout.grid),
        "text_len": layout.text_len,
        "text_position": layout.text_position,
        "origin": origin,
        "block_size": bs,
        "backend": backend,
        "num_blocks": plans[0].num_blocks,
        "dynamic": bool(pattern.dynamic),
        "same_for_all_layers": static_same,
        "qk": None if not pattern.dynamic else args.qk,
        "note": qk_note,
        "layers": rows,
    }
    if not args.no_plot:
        out = out_png
        title = f"{pattern.describe()}\non {layout} tokens ({origin}), block {bs}, layer {args.layer}"
        if qk_note:
            title += f"\n{'random' if args.qk == 'random' else 'recorded'} q/k"
        report["png"] = str(plot_plan(plans[args.layer], out, query=query, head=args.head, title=title))
        report["query"] = list(query)
    return report


def format_report(report: dict[str, Any]) -> str:
    lines = [
        f"pattern      {report['pattern']}",
        f"tokens       {report['layout']}  ({report['origin']})",
        f"blocks       {report['num_blocks']} x {report['num_blocks']} of {report['block_size']} tokens (kernel order, padded)",
    ]
    if report["note"]:
        lines.append(f"note         {report['note']}")
    elif report["same_for_all_layers"]:
        lines.append("note         static pattern: the same mask for every layer and head.")
    lines.append("")
    lines.append(
        "density = kept / all. block: kept blocks of the padded block grid, text included; video-block: the pattern's own "
        "video x video blocks; token: attended (query, key) pairs."
    )
    paths = sorted({r["path"].replace("_", "-") for r in report["layers"]})
    lines.append(
        f"work = (query, key) pairs the {'/'.join(paths)} path of backend {report['backend']} computes, padding "
        "included, / dense pairs (1 / work bounds the attention speedup)."
    )
    header = f"{'layer':>5}  {'variant':<15} {'block':>7} {'video-block':>11} {'token':>7} {'work':>7}"
    rows = report["layers"]
    per_head = any(len(r["per_head_token_density"]) > 1 for r in rows)
    if per_head:
        header += "  token density per head"
    lines.append(header)
    for r in rows:
        line = (
            f"{r['layer']:>5}  {r['variant'] or '-':<15} {r['block_density']:>7.1%} {r['video_block_density']:>11.1%} "
            f"{r['token_density']:>7.1%} {r['work']:>7.1%}"
        )
        if per_head:
            heads = r["per_head_token_density"]
            shown = " ".join(f"{x:.1%}" for x in heads[:16]) + (" ..." if len(heads) > 16 else "")
            line += f"  {shown}"
        lines.append(line)
    if len(rows) > 1:
        mean = sum(r["token_density"] for r in rows) / len(rows)
        mean_b = sum(r["block_density"] for r in rows) / len(rows)
        mean_w = sum(r["work"] for r in rows) / len(rows)
        lines.append(f"{'mean':>5}  {'':<15} {mean_b:>7.1%} {'':>11} {mean:>7.1%} {mean_w:>7.1%}")
    lines.extend(f"warning      {w}" for w in _work_warnings(rows))
    if "png" in report:
        f, h, w = report["query"]
        lines.append("")
        lines.append(f"wrote {report['png']}  (block matrix, and keys attended by query token f={f}, h={h}, w={w})")
    return "\n".join(lines)


# What vs.apply does with a plan that keeps every pair, said where inspect warns of its work.
_FULL = "; vs.apply and generate run such layers with the model's own attention (SparseConfig.dense_when_full)"


def _work_warnings(rows: list[dict[str, Any]]) -> list[str]:
    """One warning per run of consecutive layers with the same path, work and mask density (a
    static pattern: one line for all its layers, not one per layer)."""

    def same(r: dict[str, Any]) -> tuple:
        return r["path"], round(r["work"], 4), round(r["token_density"], 4), r["keeps_every_pair"]

    runs: list[tuple[dict[str, Any], int]] = []  # (first row of the run, its last layer)
    for r in rows:
        if runs and same(runs[-1][0]) == same(r) and runs[-1][1] == r["layer"] - 1:
            runs[-1] = (runs[-1][0], r["layer"])
        else:
            runs.append((r, r["layer"]))
    found = [
        (no_speedup_warning(layer_span(r["layer"], last), r["path"], r["work"], r["token_density"]), r)
        for r, last in runs
    ]
    return [w + (_FULL if r["keeps_every_pair"] else "") for w, r in found if w is not None]


def run(args: argparse.Namespace) -> int:
    report = inspect_pattern(args)
    print(format_report(report))
    if args.json:
        from vidsparse.atomic import atomic_path

        path = Path(args.json).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(report, indent=2, default=_json_default) + "\n")
    return 0


def _json_default(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return str(obj)


__all__ = ["add_arguments", "inspect_pattern", "parse_triple", "run", "token_density", "video_block_density"]
