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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vidsparse.cli import UserError, add_pattern_arguments, pattern_from_args

# -- model families: VAE compression and patch size ------------------------------------------


@dataclass(frozen=True)
class FamilyGrid:
    """How a model family turns a video (frames x height x width) into self-attention tokens.

    ``temporal``/``spatial`` are the VAE's compression factors (causal video VAEs keep the
    first frame: latent frames = (frames - 1) // temporal + 1), ``patch`` the transformer's
    (t, h, w) patchify. ``text_len``/``text_position`` is the text span joint-attention models
    put in the same sequence (0 / "none" when text goes through cross-attention).
    """

    name: str
    temporal: int
    spatial: int
    patch: tuple[int, int, int]
    default_video: tuple[int, int, int]
    text_len: int = 0
    text_position: str = "none"

    def check_video(self, frames: int, height: int, width: int) -> None:
        """ValueError naming the nearest valid sizes if the VAE and patchify cannot take this video."""
        problems = []
        t = self.temporal
        if not isinstance(frames, int) or frames < 1 or (frames - 1) % t:
            lo = max(1, (max(frames, 1) - 1) // t * t + 1)
            hi = lo + t if lo < frames else lo
            near = f"{lo} or {hi}" if lo != hi else f"{lo}"
            problems.append(
                f"frames={frames}: the {self.name} VAE compresses time {t}x and keeps the first frame, so frames "
                f"must be 1 + a multiple of {t}; nearest valid: {near}"
            )
        for label, value, p in (("height", height, self.patch[1]), ("width", width, self.patch[2])):
            m = self.spatial * p
            if not isinstance(value, int) or value < m or value % m:
                lo = max(value, 0) // m * m
                hi = lo + m
                near = f"{lo} or {hi}" if lo >= m else f"{hi}"
                problems.append(
                    f"{label}={value}: must be a multiple of {m} ({self.spatial}x VAE x {p} patch); nearest valid: {near}"
                )
        if problems:
            raise ValueError(
                f"Video size {frames}x{height}x{width} does not fit {self.name}: " + "; ".join(problems) + "."
            )

    def latent_grid(self, frames: int, height: int, width: int) -> tuple[int, int, int]:
        """Token grid (F, H, W) after the VAE and patchify, as diffusers' pipelines compute it."""
        self.check_video(frames, height, width)
        latent_frames = (frames - 1) // self.temporal + 1
        pt, ph, pw = self.patch
        # diffusers pads latent frames up to a multiple of patch_t (CogVideoX 1.5).
        return (-(-latent_frames // pt), height // (self.spatial * ph), width // (self.spatial * pw))


# Until a shared table exists, the factors live here (diffusers configs: Wan2.1/2.2, HunyuanVideo,
# CogVideoX 1.0 / 1.5, LTX-Video, Mochi-1).
FAMILIES: dict[str, FamilyGrid] = {
    "wan": FamilyGrid("wan", 4, 8, (1, 2, 2), (81, 480, 832)),
    "hunyuan": FamilyGrid("hunyuan", 4, 8, (1, 2, 2), (129, 720, 1280), 256, "after"),
    "cogvideox": FamilyGrid("cogvideox", 4, 8, (1, 2, 2), (49, 480, 720), 226, "before"),
    "cogvideox1.5": FamilyGrid("cogvideox1.5", 4, 8, (2, 2, 2), (81, 768, 1360), 226, "before"),
    "ltx": FamilyGrid("ltx", 8, 32, (1, 1, 1), (161, 512, 704)),
    "mochi": FamilyGrid("mochi", 6, 8, (1, 2, 2), (163, 480, 848), 256, "after"),
}


def family_grid(name: str) -> FamilyGrid:
    key = name.strip().lower().replace("_", "").replace("-", "")
    aliases = {
        "hunyuanvideo": "hunyuan",
        "wan2.1": "wan",
        "wan2.2": "wan",
        "ltxvideo": "ltx",
        "cogvideox15": "cogvideox1.5",
    }
    key = aliases.get(key, key)
    if key not in FAMILIES:
        raise ValueError(f"Unknown model family {name!r}. Expected one of: {', '.join(FAMILIES)}.")
    return FAMILIES[key]


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


# -- densities --------------------------------------------------------------------------------


def token_density(plan) -> torch.Tensor:
    """float64 [H|1]: attended (query, key) pairs / all pairs, per head (text mask all valid).

    Counted from the plan itself: whole blocks count their valid rows x valid columns, partial
    blocks the set bits of their element mask on valid rows, and dynamic per-query selection
    (``query_select``) row by row.
    """

    bs = plan.block_size
    valid = plan.order.token_valid.cpu()
    n = plan.layout.seq_len
    nb = plan.num_blocks
    row_valid = valid.view(nb, bs)
    counts = plan.kv_counts.cpu().long()
    idx = plan.kv_indices.cpu().long()
    mids = plan.mask_ids.cpu().long()
    if plan.query_select is None:
        slot = torch.arange(idx.shape[-1])
        listed = slot < counts.unsqueeze(-1)  # [Bp, Hp, NQ, K]
        col_valid = row_valid.sum(1)  # [NK]
        rv = row_valid.sum(1)  # [NQ]
        whole = (rv.view(1, 1, -1, 1) * col_valid[idx]).double()
        if plan.block_masks.shape[0]:
            row_pc = plan.block_masks.cpu().sum(dim=2).double()  # [P, bs]: keys set per row
            table = row_pc @ row_valid.double().T  # [P, NQ]: pairs of mask id on query block's valid rows
            qb = torch.arange(nb).view(1, 1, nb, 1).expand_as(mids)
            part = table[mids.clamp_min(0), qb]
            total = torch.where(mids < 0, whole, part)
        else:
            total = whole
        total = (total * listed).sum(dim=(2, 3))  # [Bp, Hp]
        return (total.mean(dim=0) / (n * n)).cpu()
    # Dynamic selection: row r of query block qb keeps listed key block kb iff
    # query_select[b, h, r, key_group[kb]]; count the keys each kept block gives row r.
    qsel = plan.query_select.cpu()
    key_group = plan.key_group.cpu().long()
    B, H = qsel.shape[:2]
    col_count = row_valid.sum(1).double()  # [NK] valid keys per block
    row_pc = plan.block_masks.cpu().sum(dim=2).double() if plan.block_masks.shape[0] else None  # [P, bs]
    total = torch.zeros(B, H, dtype=torch.float64)
    slot = torch.arange(idx.shape[-1])
    for qb in range(nb):
        listed = (slot < counts[:, :, qb].unsqueeze(-1)).double()  # [Bp, Hp, K]
        kb = idx[:, :, qb]  # [Bp, Hp, K]
        mid = mids[:, :, qb]
        per_row = col_count[kb].unsqueeze(-1).expand(*kb.shape, bs)  # [Bp, Hp, K, bs]
        if row_pc is not None:
            per_row = torch.where((mid >= 0).unsqueeze(-1), row_pc[mid.clamp_min(0)], per_row)
        per_row = per_row * listed.unsqueeze(-1) * row_valid[qb].double()
        sel = qsel[:, :, qb * bs : (qb + 1) * bs]  # [B, H, bs, G]
        grp = key_group[kb]  # [Bp, Hp, K]
        kept = torch.gather(
            sel.double(), 3, grp.expand(B, H, -1).unsqueeze(2).expand(B, H, bs, grp.shape[-1])
        )  # [B, H, bs, K]
        total += torch.einsum("bhrk,bhkr->bh", kept, per_row.expand(B, H, -1, -1))
    return total.mean(dim=0) / (n * n)


def video_block_density(plan) -> torch.Tensor:
    """float64 [H|1]: computed video-video blocks / all video-video blocks (the pattern's own sparsity)."""
    text_blocks = plan.text_blocks.cpu()
    nvb = int((~text_blocks).sum())
    counts = plan.kv_counts.cpu().long()
    idx = plan.kv_indices.cpu().long()
    listed = torch.arange(idx.shape[-1]) < counts.unsqueeze(-1)
    video_cols = (~text_blocks)[idx] & listed  # [Bp, Hp, NQ, K]
    per_row = video_cols.sum(-1).double()[:, :, :nvb]  # video query blocks come first
    return per_row.sum(-1).mean(0) / max(1, nvb * nvb)


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
    if getattr(pattern, "uses_layer", False) or getattr(pattern, "dynamic", False):
        return 3
    return 1


def load_qk(path: str, layout, heads: int) -> tuple[Any, Any]:
    """q, k from a torch file: {"q": ..., "k": ...} (or a (q, k) pair), each [B, S, H, D] or
    [S, H, D], or a list of those (one per layer)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise ValueError(f"--qk {path!r}: no such file. Save q and k with torch.save({{'q': q, 'k': k}}, path).")
    obj = torch.load(p, map_location="cpu", weights_only=True)
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
        help=f"model family: {', '.join(FAMILIES)}; gives --video its VAE and patch factors (default wan) and "
        "adds the text span of joint-attention families (hunyuan, cogvideox, mochi), also to --grid",
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
    parser.add_argument("--head", type=int, default=0, metavar="H", help="head drawn in the PNG (default 0)")
    parser.add_argument(
        "--query",
        metavar="F,H,W",
        default=None,
        help="query token (frame, row, column on the token grid) whose attended keys are drawn "
        "(default: the centre token)",
    )
    dyn = parser.add_argument_group("dynamic patterns (VMoBA)")
    dyn.add_argument(
        "--qk",
        default="random",
        metavar="random|PATH",
        help="q and k for dynamic patterns: 'random' (default; Gaussian, seeded) or a torch file with "
        "{'q': [B,S,H,D], 'k': [B,S,H,D]} recorded from a model",
    )
    dyn.add_argument("--heads", type=int, default=2, metavar="N", help="heads of random q/k (default 2)")
    dyn.add_argument("--head-dim", type=int, default=64, metavar="D", help="head dimension of random q/k (default 64)")
    dyn.add_argument("--seed", type=int, default=0, help="seed of random q/k (default 0)")
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
    fam = family_grid(args.family) if args.family is not None else None
    text_len, text_pos = (fam.text_len, fam.text_position) if fam is not None else (0, "none")
    if args.grid is not None:
        f, h, w = parse_triple(args.grid, "--grid", "21x30x52")
        origin = f"grid {f}x{h}x{w}" + (f", {fam.name} text span" if fam is not None and fam.text_len else "")
    else:
        fam = fam or FAMILIES["wan"]
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

    pattern = pattern_from_args(args)
    layout, origin = _layout_from_args(args)
    pattern.validate(layout)
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

    static_same = not pattern.dynamic and not getattr(pattern, "uses_layer", False)
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
        rows.append(
            {
                "layer": layer,
                "variant": layer_label(pattern, layer),
                "block_density": float(p.density),
                "video_block_density": float(vd.mean()),
                "token_density": float(td.mean()),
                "per_head_block_density": [float(x) for x in p.per_head_density()],
                "per_head_token_density": [float(x) for x in td],
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
        "num_blocks": plans[0].num_blocks,
        "dynamic": bool(pattern.dynamic),
        "same_for_all_layers": static_same,
        "qk": None if not pattern.dynamic else args.qk,
        "note": qk_note,
        "layers": rows,
    }
    if not args.no_plot:
        out = args.out or f"{pattern.name}_{layout.frames}x{layout.height}x{layout.width}.png"
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
        "density = computed / all. block: kernel work incl. text and padding; video-block: the pattern's own "
        "video x video blocks; token: attended (query, key) pairs."
    )
    header = f"{'layer':>5}  {'variant':<15} {'block':>7} {'video-block':>11} {'token':>7}"
    rows = report["layers"]
    per_head = any(len(r["per_head_token_density"]) > 1 for r in rows)
    if per_head:
        header += "  token density per head"
    lines.append(header)
    for r in rows:
        line = (
            f"{r['layer']:>5}  {r['variant'] or '-':<15} {r['block_density']:>7.1%} {r['video_block_density']:>11.1%} "
            f"{r['token_density']:>7.1%}"
        )
        if per_head:
            heads = r["per_head_token_density"]
            shown = " ".join(f"{x:.1%}" for x in heads[:16]) + (" ..." if len(heads) > 16 else "")
            line += f"  {shown}"
        lines.append(line)
    if len(rows) > 1:
        mean = sum(r["token_density"] for r in rows) / len(rows)
        mean_b = sum(r["block_density"] for r in rows) / len(rows)
        lines.append(f"{'mean':>5}  {'':<15} {mean_b:>7.1%} {'':>11} {mean:>7.1%}")
    if "png" in report:
        f, h, w = report["query"]
        lines.append("")
        lines.append(f"wrote {report['png']}  (block matrix, and keys attended by query token f={f}, h={h}, w={w})")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    report = inspect_pattern(args)
    print(format_report(report))
    if args.json:
        from vidsparse.video_io import atomic_output

        path = Path(args.json).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_output(path) as tmp:
            tmp.write_text(json.dumps(report, indent=2, default=_json_default) + "\n")
    return 0


def _json_default(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return str(obj)


__all__ = ["FAMILIES", "FamilyGrid", "add_arguments", "family_grid", "inspect_pattern", "run", "token_density"]
