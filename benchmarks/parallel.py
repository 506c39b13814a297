"""Multi-GPU benchmark: clip parallelism and Ulysses on every family's shapes; estimates on one GPU.

Three ways to run it (results: benchmarks/results/parallel_<device>_<date>.json + .md):

    torchrun --nproc-per-node 4 benchmarks/parallel.py    # measured on 4 GPUs (NCCL)
    python benchmarks/parallel.py                          # one GPU: baseline + per-rank work
    python benchmarks/parallel.py --quick                  # CPU: gloo ranks on tiny models, volumes, decode

Every run reports, for each shape, mode and world size N, the bytes the busiest rank sends per
denoising step (all self-attention layers, both CFG branches, the output all-gather), computed
from the same exchange plans the code runs (tests check them against measured counters). On
several GPUs it times one self-attention call on every rank (slowest rank reported, like the
step it holds up). On one GPU it times the single-device attention of the whole video
(baseline) and, for every N, the attention work of each rank without communication
(``clip_compute``; Ulysses: the whole video with ceil(H/N) heads); an estimated per-call time is
that compute plus bytes / --bandwidth-gbps (no overlap assumed, so it is pessimistic for clip
mode, which overlaps the own-clip attention with the exchange). ``--quick`` (CPU) also runs every
family's tiny transformer on 2 and 3 gloo ranks (bytes measured against the estimator) and the
per-clip VAE decode rows: each family's decode windows at its reference video and the error vs
VAE overlap measured on its tiny VAE.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch

import vidsparse as vs
from vidsparse.benchmeta import checked_out_dir, git_commit
from vidsparse.layout import VideoLayout

SCHEMA = "vidsparse.bench.parallel/1"


@dataclass(frozen=True)
class Shape:
    """One transformer at one video size: token grid after patchify, joint text, model sizes."""

    name: str
    frames: int
    height: int
    width: int
    heads: int
    head_dim: int
    layers: int
    out_features: int = 64  # Wan: out_channels 16 x patch 1x2x2
    text_len: int = 0  # joint-attention text replicated on every rank (HunyuanVideo, CogVideoX, Mochi)
    text_position: str = "none"
    family: str = "wan"
    #: (rows, heads, head_dim) of one cross-attention per layer whose replicated queries are merged
    #: across ranks (LTX-2: the audio tokens of its video->audio cross-attention); () = none.
    merged: tuple[int, ...] = ()

    @property
    def layout(self) -> VideoLayout:
        return VideoLayout(self.frames, self.height, self.width, text_len=self.text_len,
                           text_position=self.text_position)  # fmt: skip

    @property
    def video_layout(self) -> VideoLayout:
        return VideoLayout(self.frames, self.height, self.width)


SHAPES = {
    "wan-1.3b": Shape("wan-1.3b", 21, 30, 52, heads=12, head_dim=128, layers=30),  # 81 x 480 x 832
    "wan-14b": Shape("wan-14b", 21, 45, 80, heads=40, head_dim=128, layers=40),  # 81 x 720 x 1280
    "wan-1.3b-long": Shape("wan-1.3b-long", 81, 30, 52, heads=12, head_dim=128, layers=30),  # 321 frames
    # Reference videos of the other families (token grids from their family records' geometries):
    "hunyuan": Shape(
        "hunyuan", 33, 45, 80, heads=24, head_dim=128, layers=60, text_len=256, text_position="after", family="hunyuan"
    ),  # 129 x 720 x 1280, 20 double + 40 single
    "cogvideox-5b": Shape(
        "cogvideox-5b",
        13,
        30,
        45,
        heads=48,
        head_dim=64,
        layers=42,
        text_len=226,
        text_position="before",
        family="cogvideox",
    ),  # 49 x 480 x 720
    "cogvideox1.5-5b": Shape(
        "cogvideox1.5-5b",
        11,
        48,
        85,
        heads=48,
        head_dim=64,
        layers=42,
        out_features=128,
        text_len=226,
        text_position="before",
        family="cogvideox",
    ),  # 81 x 768 x 1360
    "mochi": Shape(
        "mochi",
        28,
        30,
        53,
        heads=24,
        head_dim=128,
        layers=48,
        out_features=48,
        text_len=256,
        text_position="after",
        family="mochi",
    ),  # 163 x 480 x 848
    "ltx": Shape(
        "ltx", 21, 16, 22, heads=32, head_dim=64, layers=28, out_features=128, family="ltx"
    ),  # 161 x 512 x 704
    # 121 x 512 x 768 at 24 fps (LTX2Pipeline's default): 16 x 16 x 24 video tokens and
    # round(121 / 24 * 25) = 126 audio tokens (16 kHz, hop 160, audio VAE 4x), replicated on every rank.
    # Sizes: LTX2VideoTransformer3DModel's defaults in diffusers 0.42.1 (the 19B checkpoint's config).
    "ltx2": Shape(
        "ltx2", 16, 16, 24, heads=32, head_dim=128, layers=48, out_features=128, family="ltx2", merged=(126, 32, 64)
    ),
    "tiny": Shape("tiny", 6, 4, 4, heads=2, head_dim=16, layers=2, out_features=16),
}
#: Shapes of the volume tables (every family).
VOLUME_SHAPES = (
    "wan-1.3b", "wan-14b", "wan-1.3b-long", "hunyuan", "cogvideox-5b", "cogvideox1.5-5b", "mochi", "ltx", "ltx2"
)  # fmt: skip
#: Link bandwidths (GB/s per rank and direction) the volume rows convert bytes to time at: estimates,
#: not measurements (NVLink 4 on H100/H200: ~450 GB/s per direction; PCIe 5 x16: ~32 GB/s).
LINKS = {"nvlink": 450.0, "pcie": 32.0}
#: Families whose tiny transformers --quick runs on gloo ranks: (tiny variant, latent frames, h, w).
TINY_FAMILIES = (
    ("wan", 6, 4, 4), ("hunyuan", 6, 4, 4), ("cogvideox", 6, 4, 4), ("mochi", 6, 4, 4), ("ltx", 6, 4, 4),
    ("ltx2", 6, 4, 4),
)  # fmt: skip
#: Reference videos' latent frames for the decode rows (family -> (shape name, latent frames, pixel h, w)).
DECODE_VIDEOS = {
    "wan": ("wan-14b", 21, 720, 1280),
    "hunyuan": ("hunyuan", 33, 720, 1280),
    "cogvideox": ("cogvideox-5b", 13, 480, 720),
    "mochi": ("mochi", 28, 480, 848),
    "ltx": ("ltx", 21, 512, 704),
    "ltx2": ("ltx2", 16, 512, 768),
}
#: VAE context (latent frames) the decode rows report: the default 4, and None = "all" (exact).
DECODE_OVERLAPS = (1, 2, 4, 8, None)


def _pattern(args: argparse.Namespace, mode: str):
    name = args.clip_pattern if mode == "clip" else args.ulysses_pattern
    if name == "dual-scope":
        return vs.DualScope(args.local_frames, args.global_stride)
    return vs.make_pattern(name)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn, device: torch.device, warmup: int, repeats: int) -> float:
    """Median milliseconds of ``fn()`` after ``warmup`` calls."""
    with torch.no_grad():
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(repeats):
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _qkv(batch: int, seq: int, heads: int, dim: int, device, dtype, seed: int = 0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    return [torch.randn(batch, seq, heads, dim, generator=g).to(device, dtype) for _ in range(3)]


def volume_rows(args, shapes) -> list[dict[str, Any]]:
    from vidsparse.parallel.estimate import step_bytes

    rows = []
    for shape in shapes:
        for mode in args.modes:
            pattern = _pattern(args, mode)
            for n in args.world_sizes:
                if n > shape.frames:
                    continue
                vol = step_bytes(
                    mode,
                    shape.layout,
                    pattern,
                    shape.heads,
                    shape.head_dim,
                    shape.layers,
                    n,
                    shape.out_features,
                    element_size=2,
                    forwards=2,
                    merged=(shape.merged,) * shape.layers if shape.merged else (),
                )
                rows.append(dict(
                    kind="volume", shape=shape.name, family=shape.family, mode=mode, world_size=n,
                    pattern=repr(pattern), step_bytes=vol.total, attention_bytes=vol.attention,
                    gather_bytes=vol.output_gather, attention_memory_bytes=attention_memory(mode, shape, pattern, n),
                    step_ms_at_bandwidth=vol.total / (args.bandwidth_gbps * 1e9) * 1e3,
                    **{f"step_ms_estimated_{k}": vol.total / (bw * 1e9) * 1e3 for k, bw in LINKS.items()},
                ))  # fmt: skip
    return rows


def attention_memory(mode: str, shape: Shape, pattern, world_size: int, element_size: int = 2) -> int:
    """Peak bytes of one self-attention's q/k/v/out a rank holds (busiest rank, bf16), from the plans.

    Clip: its clip's q, k, v, out (text included) plus the K/V of the frames it receives; Ulysses:
    q, k, v, out of the whole sequence for ceil(H/N) heads (plus the clip's own before the all-to-all).
    """
    from vidsparse.parallel.clip import exchange_plan
    from vidsparse.parallel.partition import FramePartition
    from vidsparse.parallel.ulysses import heads_per_rank

    lay = shape.layout
    part = FramePartition(lay.frames, world_size)
    hw, hd = lay.tokens_per_frame, shape.head_dim
    worst = 0
    for r in range(world_size):
        own = part.sizes[r] * hw + lay.text_len
        if mode == "clip":
            received = len(exchange_plan(pattern, lay, part, r).remote) * hw
            elems = 4 * own * shape.heads * hd + 2 * received * shape.heads * hd
        else:
            elems = 4 * own * shape.heads * hd + 4 * lay.seq_len * heads_per_rank(shape.heads, world_size) * hd
        worst = max(worst, elems * element_size)
    return worst


def single_device_rows(args, shapes, device, dtype) -> list[dict[str, Any]]:
    """Baseline and per-rank attention work for every N, measured on one device."""
    from vidsparse.parallel.clip import clip_compute
    from vidsparse.parallel.estimate import attention_bytes
    from vidsparse.parallel.partition import FramePartition
    from vidsparse.parallel.ulysses import heads_per_rank

    rows = []
    el = torch.tensor([], dtype=dtype).element_size()
    for shape in shapes:
        lay = shape.video_layout  # timing: the video tokens (text is replicated, small)
        q, k, v = _qkv(1, lay.seq_len, shape.heads, shape.head_dim, device, dtype)
        for mode in args.modes:
            pattern = _pattern(args, mode)
            base = _time(
                partial(vs.attention, q, k, v, lay, pattern, backend=args.backend), device, args.warmup, args.repeats
            )
            rows.append(
                dict(kind="baseline", shape=shape.name, mode=mode, world_size=1, pattern=repr(pattern), ms=base)
            )
            for n in args.world_sizes:
                if n > lay.frames:
                    continue
                part = FramePartition(lay.frames, n)
                if mode == "clip":
                    per_rank = []
                    for r in range(n):
                        ql, kl, vl = (part.shard(t, lay, r) for t in (q, k, v))
                        work = partial(clip_compute, ql, kl, vl, lay, pattern, r, n, backend=args.backend)
                        per_rank.append(_time(work, device, args.warmup, args.repeats))
                    compute = max(per_rank)
                else:
                    h = heads_per_rank(shape.heads, n)
                    qh, kh, vh = (t[:, :, :h].contiguous() for t in (q, k, v))
                    work = partial(vs.attention, qh, kh, vh, lay, pattern, backend=args.backend)
                    compute = _time(work, device, args.warmup, args.repeats)
                sent = max(
                    sum(d.values()) for d in attention_bytes(mode, lay, pattern, shape.heads, shape.head_dim, n, el)
                )
                comm_ms = sent / (args.bandwidth_gbps * 1e9) * 1e3
                rows.append(dict(
                    kind="estimate", shape=shape.name, mode=mode, world_size=n, pattern=repr(pattern),
                    compute_ms=compute, bytes_per_call=sent, comm_ms=comm_ms, ms=compute + comm_ms,
                    speedup_vs_baseline=base / (compute + comm_ms),
                ))  # fmt: skip
    return rows


def distributed_rows(args, shapes, runtime, dtype) -> list[dict[str, Any]]:
    """Time clip_attention / ulysses_attention on every rank (slowest rank), measured bytes."""
    import torch.distributed as dist

    from vidsparse.parallel import FramePartition, clip_attention, ulysses_attention

    rows = []
    n, device = runtime.world_size, runtime.device
    for shape in shapes:
        lay = shape.video_layout
        if n > lay.frames:
            continue
        part = FramePartition(lay.frames, n)
        full = _qkv(1, lay.seq_len, shape.heads, shape.head_dim, "cpu", dtype)
        ql, kl, vl = (part.shard(t, lay, runtime.rank).to(device) for t in full)
        for mode in args.modes:
            pattern = _pattern(args, mode)
            fn = clip_attention if mode == "clip" else ulysses_attention
            call = partial(fn, ql, kl, vl, lay, pattern, runtime, backend=args.backend)
            runtime.stats.reset()
            call()
            sent = runtime.stats.total_bytes
            dist.barrier()
            ms = torch.tensor([_time(call, device, args.warmup, args.repeats)], device=device)
            dist.all_reduce(ms, op=dist.ReduceOp.MAX)
            mx = torch.tensor([float(sent)], device=device)
            dist.all_reduce(mx, op=dist.ReduceOp.MAX)
            rows.append(dict(
                kind="measured", shape=shape.name, mode=mode, world_size=n, pattern=repr(pattern),
                ms=float(ms.item()), bytes_per_call=int(mx.item()), backend=runtime.backend,
            ))  # fmt: skip
    return rows


def family_rows(args, runtime) -> list[dict[str, Any]]:
    """Every family's tiny transformer forward under each mode: bytes each rank sent (measured,
    and ``estimate.forward_bytes``), slowest rank's ms and the error against the single-process
    forward of the same pattern (fp32, batch 2; every output, LTX-2's audio included)."""
    import torch.distributed as dist

    from vidsparse.families import family_of
    from vidsparse.models.tiny import tiny_inputs, tiny_transformer
    from vidsparse.parallel.verify import check_forward, forward_estimate

    rows = []
    for name, frames, height, width in TINY_FAMILIES:
        model = tiny_transformer(name)
        inputs = tiny_inputs(name, model, frames, height, width, batch=2)
        for mode in args.modes:
            pattern = _pattern(args, mode) if mode == "ulysses" else vs.DualScope(1, 3)  # tiny: 6 frames
            cfg = vs.SparseConfig(pattern, dense_first_steps=0, dense_layers=(), backend="torch", block_size=16)

            def timed(model=model, inputs=inputs):
                dist.barrier()
                return _time(lambda: model(**inputs, return_dict=False), runtime.device, 1, 3)

            check = check_forward(model, inputs, cfg, mode, runtime, timed=timed)
            ms = torch.tensor([check.timed])
            dist.all_reduce(ms, op=dist.ReduceOp.MAX)
            sent_all = [0] * runtime.world_size
            dist.all_gather_object(sent_all, check.sent)
            rows.append(dict(
                kind="family_forward", shape=f"tiny-{name}", family=family_of(model).name, mode=mode,
                world_size=runtime.world_size, pattern=repr(pattern), layout=check.layout, ms=float(ms.item()),
                bytes_per_rank=sent_all, estimated_bytes_per_rank=forward_estimate(model, inputs, pattern, mode,
                runtime.world_size), max_abs_err=check.err, backend=runtime.backend,
            ))  # fmt: skip
    return rows


def _vae_stand_in(family: str):
    """The family's tiny VAE: the same temporal structure as the checkpoint's (factors, frame
    batches, temporal tiles), so its ``ClipDecode`` windows are the real ones'."""
    import importlib

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return importlib.import_module(f"vidsparse.families.{family}").tiny_vae().eval()


def decode_rows(args) -> list[dict[str, Any]]:
    """Per-clip VAE decode per family: (1) at the reference video, the latent frames the busiest
    rank decodes (its window) per N and overlap, and the pixel bytes each rank sends to rank 0
    (bf16, once per video); (2) measured on the tiny random-init VAE (fp32, 24 latent frames,
    2 ranks), the mean / max abs error of the last rank's pixels against the whole decode."""
    from vidsparse.families import clip_decode_of
    from vidsparse.parallel.vae import clip_bounds, decode_clip, pixel_counts

    rows = []
    for family, (shape, frames, height, width) in DECODE_VIDEOS.items():
        vae = _vae_stand_in(family)
        record = clip_decode_of(vae)
        for n in args.world_sizes:
            if n > frames:
                continue
            bounds = clip_bounds(vae, frames, n)
            counts = pixel_counts(vae, frames, n)
            for overlap in DECODE_OVERLAPS:
                windows = [record.window(vae, frames, s, e, overlap) for s, e in bounds if e > s]
                busiest = max(w.end - w.first for w in windows)
                rows.append(dict(
                    kind="decode_window", shape=shape, family=family, world_size=n,
                    overlap="all" if overlap is None else overlap, latent_frames=frames, busiest_window=busiest,
                    decode_fraction=busiest / frames, pixel_frames=sum(counts),
                    bytes_to_rank0=max(counts[1:]) * 3 * height * width * 2,
                ))  # fmt: skip
        frames_err, hw = 24, (1 if family == "ltx" else 2)
        channels = getattr(vae.config, "latent_channels", None) or vae.config.z_dim
        z = torch.randn(1, channels, frames_err, hw, hw, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            full = vae.decode(z, return_dict=False)[0]
        (_, _), (s, e) = clip_bounds(vae, frames_err, 2)
        tail = full[:, :, pixel_counts(vae, frames_err, 2)[0] :]
        for overlap in (1, 2, 4, 6, 8, 12, None):
            t0 = time.perf_counter()
            err = (decode_clip(vae, z, s, e, overlap) - tail).abs()
            rows.append(dict(
                kind="decode_error", shape=f"tiny-{family}", family=family, world_size=2, clip=[s, e],
                latent_frames=frames_err, overlap="all" if overlap is None else overlap,
                mean_abs_err=err.mean().item(), max_abs_err=err.max().item(), pixel_mean_abs=full.abs().mean().item(),
                ms=(time.perf_counter() - t0) * 1e3, exact=record.exact,
            ))  # fmt: skip
    return rows


def _quick_worker(argv: list[str], families: bool = False) -> list[dict[str, Any]]:
    """One rank of the --quick smoke run (spawned): the tiny attention shape, and with ``families``
    every family's tiny transformer forward."""
    torch.set_num_threads(1)
    from vidsparse.parallel import init_distributed, shutdown

    args = parse_args(argv)
    runtime = init_distributed(backend="gloo", timeout_s=240)
    try:
        if families:
            return family_rows(args, runtime)
        return distributed_rows(args, [SHAPES["tiny"]], runtime, torch.float32)
    finally:
        shutdown(runtime)


def markdown(report: dict[str, Any]) -> str:
    gb = 1e9
    lines = [f"# Parallel benchmark ({report['device']}, {report['created']})", ""]
    lines.append(f"torch {report['torch']}, commit {report['git_commit'][:12]}, dtype {report['dtype']}, "
                 f"bandwidth assumed {report['bandwidth_gbps']} GB/s per rank, quick={report['quick']}")  # fmt: skip
    vol = [r for r in report["results"] if r["kind"] == "volume"]
    if vol:
        lines += ["", "## Bytes sent per denoising step by the busiest rank (bf16, CFG = 2 forwards)", "",
                  f"Times are estimates: bytes / link bandwidth (NVLink {LINKS['nvlink']:.0f} GB/s, PCIe {LINKS['pcie']:.0f} GB/s "
                  "per rank and direction), no overlap.", "",
                  "| shape | family | mode | N | attention GB | output gather GB | total GB | attn. memory GB/rank | "
                  "ms NVLink (est.) | ms PCIe (est.) |", "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
        for r in vol:
            lines.append(f"| {r['shape']} | {r.get('family', '')} | {r['mode']} | {r['world_size']} | "
                         f"{r['attention_bytes'] / gb:.3f} | {r['gather_bytes'] / gb:.4f} | {r['step_bytes'] / gb:.3f} | "
                         f"{r.get('attention_memory_bytes', 0) / gb:.3f} | {r.get('step_ms_estimated_nvlink', 0):.1f} | "
                         f"{r.get('step_ms_estimated_pcie', 0):.1f} |")  # fmt: skip
    timed = [r for r in report["results"] if r["kind"] in ("baseline", "estimate", "measured")]
    if timed:
        lines += ["", "## One self-attention call", "",
                  "| shape | mode | N | kind | ms | compute ms | comm ms | MB per call | speedup vs 1 |", "|---|---|---:|---|---:|---:|---:|---:|---:|"]  # fmt: skip
        for r in timed:

            def f(key, fmt="{:.2f}", r=r):
                return fmt.format(r[key]) if r.get(key) is not None else ""

            mb = f"{r['bytes_per_call'] / 1e6:.2f}" if r.get("bytes_per_call") is not None else ""
            lines.append(f"| {r['shape']} | {r['mode']} | {r['world_size']} | {r['kind']} | {f('ms')} | {f('compute_ms')} | "
                         f"{f('comm_ms')} | {mb} | {f('speedup_vs_baseline')} |")  # fmt: skip
    fwd = [r for r in report["results"] if r["kind"] == "family_forward"]
    if fwd:
        lines += ["", "## Tiny transformer forward per family (gloo ranks, fp32, batch 2; bytes measured vs estimated)", "",
                  "| model | layout | mode | N | bytes sent per rank (measured) | estimator | max abs err | ms (slowest rank) |",
                  "|---|---|---|---:|---|---|---:|---:|"]  # fmt: skip
        for r in fwd:
            lines.append(f"| {r['shape']} | {r['layout']} | {r['mode']} | {r['world_size']} | "
                         f"{' / '.join(f'{b:,}' for b in r['bytes_per_rank'])} | "
                         f"{' / '.join(f'{b:,}' for b in r['estimated_bytes_per_rank'])} | {r['max_abs_err']:.1e} | "
                         f"{r['ms']:.1f} |")  # fmt: skip
    win = [r for r in report["results"] if r["kind"] == "decode_window"]
    if win:
        lines += ["", "## Per-clip VAE decode at the reference videos (from the families' ClipDecode records)", "",
                  "Latent frames the busiest rank decodes (its window) out of the video's; bytes each rank "
                  "sends rank 0 once per video (bf16 pixels, busiest rank).", "",
                  "| video | family | N | overlap | busiest window / latent frames | MB to rank 0 |",
                  "|---|---|---:|---|---:|---:|"]  # fmt: skip
        for r in win:
            lines.append(f"| {r['shape']} | {r['family']} | {r['world_size']} | {r['overlap']} | "
                         f"{r['busiest_window']} / {r['latent_frames']} | {r['bytes_to_rank0'] / 1e6:.0f} |")  # fmt: skip
    err = [r for r in report["results"] if r["kind"] == "decode_error"]
    if err:
        lines += ["", "## Per-clip decode error vs overlap (tiny random-init VAEs, fp32, measured)", "",
                  "Last of 2 ranks' pixels against the whole decode (values in [-1, 1]); mean / max abs error.", "",
                  "| VAE | clip (latent) | pixel mean abs | " + " | ".join(f"overlap {r['overlap']}" for r in err[:7]) + " |",
                  "|---|---|---:|" + "---:|" * 7]  # fmt: skip
        for fam in dict.fromkeys(r["family"] for r in err):
            rs = [r for r in err if r["family"] == fam]
            cells = " | ".join(f"{r['mean_abs_err']:.1e} / {r['max_abs_err']:.1e}" for r in rs)
            lines.append(f"| {rs[0]['shape']} | {rs[0]['clip']} of {rs[0]['latent_frames']} | "
                         f"{rs[0]['pixel_mean_abs']:.3f} | {cells} |")  # fmt: skip
    lines += ["", f"Patterns: clip {report['patterns']['clip']}; ulysses {report['patterns']['ulysses']}.", ""]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--shapes", default=None, help=f"comma list of {', '.join(SHAPES)} (default: all but tiny; --quick: tiny)"
    )
    p.add_argument("--modes", default="clip,ulysses", help="comma list: clip, ulysses")
    p.add_argument("--world-sizes", default="2,4,8", help="N for volumes and one-device estimates (default 2,4,8)")
    p.add_argument("--clip-pattern", default="dual-scope", help="pattern of clip mode (default dual-scope)")
    p.add_argument("--ulysses-pattern", default="dual-scope", help="pattern of Ulysses mode (default dual-scope)")
    p.add_argument("--local-frames", type=int, default=2, help="DualScope window per side (default 2)")
    p.add_argument("--global-stride", type=int, default=8, help="DualScope global frame stride (default 8)")
    p.add_argument("--backend", default="auto", help="attention backend (default auto)")
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"))
    p.add_argument("--bandwidth-gbps", type=float, default=100.0,
                   help="per-rank link bandwidth for estimates, GB/s (default 100: NVLink-class all-to-all)")  # fmt: skip
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument(
        "--quick",
        action="store_true",
        help="CPU run: gloo ranks on the tiny shape and every family's tiny model, volumes, VAE decode rows",
    )
    p.add_argument("--out-dir", default=str(Path(__file__).resolve().parent / "results"))
    args = p.parse_args(argv)
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in args.modes if m not in ("clip", "ulysses")]
    if bad:
        p.error(f"--modes: unknown {bad}; use clip, ulysses")
    args.world_sizes = [int(x) for x in args.world_sizes.split(",") if x.strip()]
    default = "tiny" if args.quick else "wan-1.3b,wan-14b,wan-1.3b-long"
    names = [s.strip() for s in (args.shapes or default).split(",") if s.strip()]
    unknown = [s for s in names if s not in SHAPES]
    if unknown:
        p.error(f"--shapes: unknown {unknown}; choose from {', '.join(SHAPES)}")
    args.shape_names = names
    checked_out_dir(p, args.out_dir)
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    shapes = [SHAPES[s] for s in args.shape_names]
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    results: list[dict[str, Any]] = []
    device_name = "cpu"
    if args.quick:
        from vidsparse.parallel import check_results, spawn

        dtype = torch.float32
        results += single_device_rows(args, [SHAPES["tiny"]], torch.device("cpu"), dtype)
        for rows in check_results(spawn(_quick_worker, 2, (argv,), timeout_s=300))[:1]:
            results += rows
        for n in (2, 3):  # every family's tiny transformer on n gloo ranks
            results += check_results(spawn(_quick_worker, n, (argv, True), timeout_s=600))[0]
        results += volume_rows(args, [SHAPES[s] for s in VOLUME_SHAPES])
        results += decode_rows(args)
        device_name = f"CPU {platform.machine()} (gloo)"
    elif distributed:
        from vidsparse.parallel import init_distributed, shutdown

        runtime = init_distributed(timeout_s=600)
        results += distributed_rows(args, shapes, runtime, dtype)
        results += volume_rows(args, shapes)
        if runtime.device.type == "cuda":
            device_name = f"{runtime.world_size} x {torch.cuda.get_device_name(runtime.device)}"
        rank = runtime.rank
        shutdown(runtime)
        if rank != 0:
            return 0
    else:
        if not torch.cuda.is_available():
            print("benchmarks/parallel.py: no CUDA GPU; run with --quick for the CPU smoke run.", file=sys.stderr)
            return 2
        device = torch.device("cuda")
        device_name = torch.cuda.get_device_name(device)
        results += single_device_rows(args, shapes, device, dtype)
        results += volume_rows(args, shapes)
    report = dict(
        schema=SCHEMA,
        created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        device=device_name,
        torch=torch.__version__,
        python=platform.python_version(),
        git_commit=git_commit()[0],
        dtype=str(dtype).replace("torch.", ""),
        quick=args.quick,
        bandwidth_gbps=args.bandwidth_gbps,
        patterns={m: repr(_pattern(args, m)) for m in ("clip", "ulysses")},
        shapes={s.name: asdict(s) for s in (shapes if not args.quick else [SHAPES[n] for n in SHAPES])},
        results=results,
    )
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tag = "cpu" if args.quick else ("cuda" if torch.cuda.is_available() else "cpu")
    stem = out / f"parallel_{tag}_{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    stem.with_suffix(".md").write_text(markdown(report), encoding="utf-8")
    print(markdown(report))
    print(f"wrote {stem.with_suffix('.json')} and {stem.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
