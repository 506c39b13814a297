"""PNG plots of a plan: the block matrix and, for one query token, the attended keys per frame.

The block matrix is what the kernel computes (whole, partial or skipped blocks in kernel
order); the per-frame panels are what one query token actually sees, read back from the
same plan, so the two views cannot disagree with what runs.
"""

from __future__ import annotations

import math
import os
import textwrap
from pathlib import Path

import numpy as np
import torch

from vidsparse.layout import VideoLayout
from vidsparse.plan import BlockSparsePlan

BLOCK_COLORS = ("#eeeeee", "#f28e2b", "#1f4e79")  # skipped, partial, whole
BLOCK_LABELS = ("skipped block", "partial block (element mask)", "whole block")


def query_index(layout: VideoLayout, f: int, h: int, w: int) -> int:
    """Index in the joint sequence of video token (f, h, w); ValueError naming the valid ranges."""
    for name, value, size in (("frame", f, layout.frames), ("row", h, layout.height), ("column", w, layout.width)):
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < size:
            raise ValueError(
                f"Query {name} {value!r} is outside the grid {layout.frames}x{layout.height}x{layout.width}; "
                f"expected 0 <= f < {layout.frames}, 0 <= h < {layout.height}, 0 <= w < {layout.width} "
                f"(e.g. --query {layout.frames // 2},{layout.height // 2},{layout.width // 2})."
            )
    return layout.video_offset + (f * layout.height + h) * layout.width + w


def query_row(plan: BlockSparsePlan, index: int, head: int = 0, batch: int = 0) -> torch.Tensor:
    """bool [S]: which keys (caller order) the token at ``index`` attends under ``plan``."""
    from vidsparse.kernels.reference import block_row_mask

    layout = plan.layout
    if not 0 <= index < layout.seq_len:
        raise ValueError(f"Token index {index} is outside the sequence of {layout.seq_len} tokens.")
    bs = plan.block_size
    pos = int(plan.order.scatter[index])
    qb, r = divmod(pos, bs)
    cols = torch.arange(plan.num_blocks, device=plan.device)
    batch_size = plan.query_select.shape[0] if plan.query_select is not None else plan.kv_counts.shape[0]
    mask = block_row_mask(plan, qb, cols, None, batch_size)  # [B|1, H|1, bs, S_pad]
    row = mask[min(batch, mask.shape[0] - 1), min(head, mask.shape[1] - 1), r]
    return row[plan.order.scatter.to(row.device)].cpu()


def _frame_boundaries(plan: BlockSparsePlan) -> tuple[list[float], list[tuple[float, str]], bool]:
    """Frame boundary positions (in block units), tick labels along the kernel order, and
    whether the order is frame-major (else the lines separate groups of frames, e.g. tiles)."""
    layout, bs = plan.layout, plan.block_size
    vidx = plan.order.video_index.cpu()
    valid = vidx >= 0
    frames = torch.full_like(vidx, -1)
    frames[valid] = vidx[valid] // layout.tokens_per_frame
    pos = torch.nonzero(valid).flatten()
    fseq = frames[pos]
    lines: list[float] = []
    ticks: list[tuple[float, str]] = []
    frame_major = bool(fseq.numel()) and bool((fseq[1:] >= fseq[:-1]).all())
    if frame_major:
        # Frame-major kernel order (possibly padded): exact boundaries at each frame's first token.
        starts = [float(pos[torch.searchsorted(fseq, f)]) / bs for f in range(layout.frames)]
        ends = starts[1:] + [float(pos[-1] + 1) / bs]
        lines = starts[1:]
        step = max(1, math.ceil(layout.frames / 12))
        ticks = [((s + e) / 2, f"f{f}") for f, (s, e) in enumerate(zip(starts, ends)) if f % step == 0]
    else:
        # Tile-major (or other) order: boundaries where the set of frames in a block changes.
        nvb = plan.order.text_start // bs
        groups: list[tuple[int, int]] = []
        for b in range(nvb):
            fb = frames[b * bs : (b + 1) * bs]
            fb = fb[fb >= 0]
            groups.append((int(fb.min()), int(fb.max())) if fb.numel() else (-1, -1))
        start = 0
        for b in range(1, nvb + 1):
            if b == nvb or groups[b] != groups[start]:
                if b < nvb:
                    lines.append(float(b))
                lo, hi = groups[start]
                label = f"f{lo}" if lo == hi else f"f{lo}-{hi}"
                ticks.append(((start + b) / 2, label))
                start = b
        if len(ticks) > 16:
            step = math.ceil(len(ticks) / 16)
            ticks = ticks[::step]
    return lines, ticks, frame_major


def plot_plan(
    plan: BlockSparsePlan,
    path: str | os.PathLike,
    query: tuple[int, int, int] | None = None,
    head: int = 0,
    title: str | None = None,
    dpi: int = 110,
) -> Path:
    """Save a PNG with the block matrix of ``plan`` and, if ``query`` = (f, h, w) is given,
    the keys that token attends, frame by frame. Returns the path written."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    from vidsparse.atomic import atomic_path

    layout, bs = plan.layout, plan.block_size
    p = Path(path).expanduser()
    if p.suffix.lower() != ".png":
        raise ValueError(f"The plot is a PNG; give a path ending in .png, got {str(p)!r}.")
    nheads = plan.query_select.shape[1] if plan.query_select is not None else plan.kv_counts.shape[1]
    if not 0 <= head < max(nheads, plan.num_heads):
        raise ValueError(f"head {head} is out of range: the plan has {max(nheads, plan.num_heads)} heads (0-based).")

    matrix = plan.dense_block_matrix(0, head).numpy()
    nb = matrix.shape[0]
    nframes = layout.frames if query is not None else 0
    ncols = min(nframes, 6) if nframes else 0
    nrows = math.ceil(nframes / ncols) if nframes else 0
    aspect = layout.width / layout.height
    panel_w = 1.9
    panel_h = panel_w / aspect + 0.45
    fig_w = 7.2 + (ncols * panel_w + 0.8 if nframes else 0)
    fig_h = max(7.2, nrows * panel_h + 1.6)
    fig = plt.figure(figsize=(fig_w, fig_h), dpi=dpi, layout="constrained")
    if nframes:
        left, right = fig.subfigures(1, 2, width_ratios=[7.2, ncols * panel_w + 0.8], wspace=0.02)
    else:
        left, right = fig, None

    # -- block matrix ----------------------------------------------------------------------
    ax = left.add_subplot(1, 1, 1)
    selection = selection_matrix(plan, head)
    if selection is None:
        ax.imshow(
            matrix,
            cmap=ListedColormap(BLOCK_COLORS),
            vmin=0,
            vmax=2,
            interpolation="nearest",
            extent=(0, nb, nb, 0),
            aspect="equal",
        )
    else:
        img = ax.imshow(
            np.where(matrix > 0, selection, np.nan),
            cmap="viridis",
            vmin=0,
            vmax=1,
            interpolation="nearest",
            extent=(0, nb, nb, 0),
            aspect="equal",
        )
        ax.set_facecolor(BLOCK_COLORS[0])
        left.colorbar(img, ax=ax, shrink=0.7, label="fraction of the query block's rows that keep the key block")
    lines, ticks, frame_major = _frame_boundaries(plan)
    lw = 0.6 if nb < 200 else 0.35
    for x in lines:
        ax.axvline(x, color="#888888", lw=lw)
        ax.axhline(x, color="#888888", lw=lw)
    nvb = plan.order.text_start // bs
    if layout.text_len:
        ax.axvline(nvb, color="#2ca02c", lw=1.2)
        ax.axhline(nvb, color="#2ca02c", lw=1.2)
        ticks = [*ticks, ((nvb + nb) / 2, "text")]
    if ticks:
        ax.set_xticks([t for t, _ in ticks], [label for _, label in ticks], rotation=90, fontsize=7)
        ax.set_yticks([t for t, _ in ticks], [label for _, label in ticks], fontsize=7)
    what = "frame boundaries" if frame_major else "boundaries between groups of frames (tile order)"
    ax.set_xlabel(f"key block (kernel order, {bs} tokens each); grey lines: {what}")
    ax.set_ylabel("query block (kernel order)")
    computed = matrix > 0
    if selection is None:
        ax.set_title(
            f"Block matrix, head {head}: {computed.mean():.1%} of {nb}x{nb} blocks computed\n"
            f"({(matrix == 2).mean():.1%} whole, {(matrix == 1).mean():.1%} partial)",
            fontsize=10,
        )
        handles = [Patch(facecolor=c, edgecolor="#555555", label=label) for c, label in zip(BLOCK_COLORS, BLOCK_LABELS)]
    else:
        kept = float(np.nansum(np.where(computed, selection, 0.0)) / matrix.size)
        ax.set_title(
            f"Dynamic selection, head {head}: {computed.mean():.1%} of {nb}x{nb} blocks listed;\n"
            f"each query row keeps its own subset ({kept:.1%} of block rows on average)",
            fontsize=10,
        )
        handles = [Patch(facecolor=BLOCK_COLORS[0], edgecolor="#555555", label="skipped block (no row keeps it)")]
    if layout.text_len:
        handles.append(Patch(facecolor="none", edgecolor="#2ca02c", label=f"text span ({layout.text_len} tokens)"))

    # -- attended keys of one query, frame by frame ------------------------------------------
    if query is not None:
        f0, h0, w0 = query
        index = query_index(layout, f0, h0, w0)
        qb = int(plan.order.scatter[index]) // bs
        ax.add_patch(plt.Rectangle((0, qb), nb, 1, fill=False, edgecolor="#d62728", lw=1.0))
        handles.append(Patch(facecolor="none", edgecolor="#d62728", label=f"block row of query ({f0},{h0},{w0})"))
        row = query_row(plan, index, head)
        video = row[layout.video_offset : layout.video_offset + layout.video_len]
        video = video.view(layout.frames, layout.height, layout.width).numpy()
        text_seen = int(row[layout.text_offset : layout.text_offset + layout.text_len].sum()) if layout.text_len else 0
        axes = right.subplots(nrows, ncols, squeeze=False)
        cmap = ListedColormap(["#f4f4f4", "#1f77b4"])
        total = int(video.sum())
        for f in range(layout.frames):
            a = axes[f // ncols, f % ncols]
            a.imshow(video[f], cmap=cmap, vmin=0, vmax=1, interpolation="nearest", aspect="equal")
            seen = int(video[f].sum())
            a.set_title(f"frame {f}: {seen}/{layout.tokens_per_frame}", fontsize=7, pad=2)
            a.set_xticks([])
            a.set_yticks([])
            if f == f0:
                a.plot([w0], [h0], marker="x", color="#d62728", ms=6, mew=1.6)
                for spine in a.spines.values():
                    spine.set_edgecolor("#d62728")
                    spine.set_linewidth(1.6)
        for f in range(layout.frames, nrows * ncols):
            axes[f // ncols, f % ncols].set_axis_off()
        text_note = f", {text_seen}/{layout.text_len} text keys" if layout.text_len else ""
        right.suptitle(
            f"Keys attended by query token (f={f0}, h={h0}, w={w0}), head {head}:\n"
            f"{total}/{layout.video_len} video keys ({total / layout.video_len:.1%}){text_note}; "
            "blue = attended, red x = the query",
            fontsize=9,
        )
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.11), ncol=2, fontsize=7, frameon=False)
    if title:  # above the block matrix's own title, in the same text: constrained layout then
        # reserves room for every line (a multi-line suptitle of a subfigure overlapped it)
        wrapped = "\n".join(textwrap.fill(line, 100) for line in title.splitlines())
        ax.set_title(f"{wrapped}\n\n{ax.get_title()}", fontsize=9)
    p.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(p) as tmp:
        fig.savefig(tmp, format="png", bbox_inches="tight")
    plt.close(fig)
    return p


def selection_matrix(plan: BlockSparsePlan, head: int = 0, batch: int = 0) -> np.ndarray | None:
    """float [NQ, NK] for dynamic plans: the fraction of each query block's valid rows whose
    per-query selection keeps each key block (None for static plans)."""
    if plan.query_select is None or plan.key_group is None:
        return None
    bs, nb = plan.block_size, plan.num_blocks
    sel = plan.query_select[min(batch, plan.query_select.shape[0] - 1), min(head, plan.query_select.shape[1] - 1)]
    sel = sel.cpu().view(nb, bs, -1).double()  # [NQ, bs, G]
    valid = plan.order.token_valid.cpu().view(nb, bs, 1).double()
    frac = (sel * valid).sum(1) / valid.sum(1).clamp_min(1)  # [NQ, G]
    return frac[:, plan.key_group.cpu().long()].numpy()  # [NQ, NK]


__all__ = ["BLOCK_COLORS", "plot_plan", "query_index", "query_row", "selection_matrix"]
