"""Rank-side checks for tests/test_parallel.py (runs inside ``vidsparse.parallel.spawn`` ranks).

One spawned group runs many checks (process start-up dominates on CPU), collecting numbers
that the test process asserts on. Every rank computes the single-process reference itself
(tiny shapes), so a rank compares its own rows of the distributed result with it.
"""

from __future__ import annotations

import datetime
import os
import time
from typing import Any

import torch


def _qkv(layout, heads: int, dim: int = 8, batch: int = 2, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, layout.seq_len, heads, dim, generator=g, dtype=torch.float64) for _ in range(3)]


def _text_mask(layout, batch: int):
    if not layout.text_len:
        return None
    tm = torch.ones(batch, layout.text_len, dtype=torch.bool)
    tm[1:, layout.text_len - 2 :] = False
    return tm


def attention_cases(world: int):
    import vidsparse as vs

    L = vs.VideoLayout
    cases = [
        # (mode, layout, pattern, heads)
        ("clip", L(7, 3, 5), vs.DualScope(1, 3), 2),
        ("clip", L(5, 2, 3, text_len=5, text_position="after"), vs.DualScope(2, 4), 3),
        ("clip", L(8, 2, 4, text_len=6, text_position="before"), vs.DualScope(0, 0), 2),
        ("clip", L(7, 2, 3), vs.DualScope(3, 0), 1),  # halos reach past the neighbour on short clips
        ("clip", L(6, 3, 4), vs.Dense(), 2),  # generic path: every frame exchanged
        ("clip", L(7, 4, 4), vs.make_pattern("radial", block_size=16), 2),  # generic reach from the plan
        ("ulysses", L(7, 3, 5), vs.DualScope(1, 3), 3),  # 3 heads: padded on 2 ranks
        ("ulysses", L(5, 2, 3, text_len=5, text_position="after"), vs.Dense(), 2),
        ("ulysses", L(8, 2, 4, text_len=6, text_position="before"), vs.DualScope(1, 2), 1),  # 1 head
        ("ulysses", L(6, 4, 4), vs.make_pattern("radial", block_size=16), 4),
        ("ulysses", L(4, 4, 4), vs.make_pattern("vmoba"), 2),  # dynamic pattern
    ]
    return [c for c in cases if c[1].frames >= world]


def _check_attention(rt) -> list[tuple[str, str, float]]:
    import vidsparse as vs
    from vidsparse.parallel import FramePartition, clip_attention, ulysses_attention
    from vidsparse.parallel.estimate import attention_bytes

    out = []
    for mode, layout, pattern, heads in attention_cases(rt.world_size):
        q, k, v = _qkv(layout, heads)
        tm = _text_mask(layout, q.shape[0])
        ref = vs.attention(q, k, v, layout, pattern, backend="torch", text_mask=tm, block_size=16)
        part = FramePartition(layout.frames, rt.world_size)
        ql, kl, vl = (part.shard(t, layout, rt.rank) for t in (q, k, v))
        fn = clip_attention if mode == "clip" else ulysses_attention
        before = dict(rt.stats.bytes_sent)
        got = fn(ql, kl, vl, layout, pattern, rt, backend="torch", text_mask=tm, block_size=16)
        err = (got - part.shard(ref, layout, rt.rank)).abs().max().item()
        sent = {
            op: n - before.get(op, 0)
            for op, n in rt.stats.bytes_sent.items()
            if n - before.get(op, 0) or op not in before
        }
        predicted = attention_bytes(mode, layout, pattern, heads, q.shape[-1], rt.world_size, 8, q.shape[0])[rt.rank]
        predicted = {op: n for op, n in predicted.items() if n or op in sent}
        sent = {op: n for op, n in sent.items() if n or op in predicted}
        out.append((mode, f"{layout} {pattern.describe()} H={heads}", err, sent, predicted))
    return out


def _check_primitives(rt) -> dict[str, Any]:
    from vidsparse.parallel.comm import all_gather_uneven, exchange, heads_to_seq, seq_to_heads

    n, r = rt.world_size, rt.rank
    sizes = [2 + i for i in range(n)]  # uneven shards
    total = sum(sizes)
    full = torch.arange(2 * total * n * 3, dtype=torch.float32).view(2, total, n, 3)  # [B, S, H=n, D]
    start = sum(sizes[:r])
    mine = full[:, start : start + sizes[r]]
    heads = seq_to_heads(mine, sizes, rt)
    back = heads_to_seq(heads, sizes, rt)
    gathered = all_gather_uneven(torch.full((sizes[r], 2), float(r)), sizes, rt)
    peer = (r + 1) % n
    src = (r - 1) % n
    got = exchange({peer: torch.full((r + 1, 2), float(r))}, {src: (src + 1, 2)}, rt, torch.float32).wait()
    return {
        "seq_to_heads": bool(torch.equal(heads, full[:, :, r : r + 1])),
        "round_trip": bool(torch.equal(back, mine)),
        "all_gather": all(torch.equal(t, torch.full((sizes[j], 2), float(j))) for j, t in enumerate(gathered)),
        "exchange": bool(torch.equal(got[src], torch.full((src + 1, 2), float(src)))),
    }


def _check_refusals(rt) -> dict[str, str]:
    import vidsparse as vs
    from vidsparse.parallel import ConfigMismatchError, FramePartition, check_same_config, clip_attention

    out = {}
    layout = vs.VideoLayout(4, 2, 2)
    q = torch.zeros(1, FramePartition(4, rt.world_size).local_layout(layout, rt.rank).seq_len, 1, 8)
    try:
        clip_attention(q, q, q, layout, vs.make_pattern("vmoba"), rt)
    except ValueError as exc:
        out["dynamic"] = str(exc)
    try:
        check_same_config(rt, {"seed": 0, "steps": 4 + rt.rank})
    except ConfigMismatchError as exc:
        out["mismatch"] = str(exc)
    out["same"] = check_same_config(rt, {"seed": 0, "pattern": vs.DualScope(1, 2)})
    return out


def _check_pipeline(rt, frames: int) -> dict[str, Any]:
    import vidsparse.pipelines as vsp
    from vidsparse.config import SparseConfig
    from vidsparse.models.tiny import build_tiny_pipeline, encode_prompt_tiny, run_tiny_pipeline
    from vidsparse.parallel.pipeline import run_parallel

    pipe = build_tiny_pipeline()
    res: dict[str, Any] = {}
    steps = 3
    cases = {
        "clip": SparseConfig(vs_dual(), dense_first_steps=0, backend="torch"),
        # Ulysses with a sparse pattern and a dense warm-up step (Dense runs distributed too).
        "ulysses": SparseConfig("radial", dense_first_steps=1, backend="torch"),
    }
    dense = run_tiny_pipeline(pipe, num_frames=frames, num_inference_steps=steps)
    for mode, cfg in cases.items():
        vsp.apply(pipe, cfg)
        ref = run_tiny_pipeline(pipe, num_frames=frames, num_inference_steps=steps)
        vsp.remove(pipe)
        kwargs = dict(
            prompt_embeds=encode_prompt_tiny("a tiny cat"),
            negative_prompt_embeds=encode_prompt_tiny(""),
            num_frames=frames,
            height=32,
            width=32,
            num_inference_steps=steps,
            guidance_scale=5.0,
            generator=torch.Generator().manual_seed(0),
        )
        # vidsparse's own Ulysses (its byte counters are checked below); diffusers' context
        # parallelism, which "auto" picks for Wan, is tested in tests/test_parallel_ulysses_cp.py.
        out = run_parallel(pipe, kwargs, cfg, mode, rt, output_type="latent", ulysses="vidsparse")
        res[mode] = {
            "err": (out.latents - ref).abs().max().item(),
            "sparse_vs_dense": (ref - dense).abs().max().item(),
            "bytes_per_step": out.bytes_per_step,
            "restored": (run_tiny_pipeline(pipe, num_frames=frames, num_inference_steps=steps) - dense)
            .abs()
            .max()
            .item(),
        }
    # Decode per clip: exact with full context, and the video only on rank 0.
    cfg = cases["clip"]
    vsp.apply(pipe, cfg)
    ref_video = run_tiny_pipeline(pipe, num_frames=frames, num_inference_steps=2, output_type="np")
    vsp.remove(pipe)
    kwargs = dict(
        prompt_embeds=encode_prompt_tiny("a tiny cat"),
        negative_prompt_embeds=encode_prompt_tiny(""),
        num_frames=frames,
        height=32,
        width=32,
        num_inference_steps=2,
        guidance_scale=5.0,
        generator=torch.Generator().manual_seed(0),
    )
    out = run_parallel(pipe, kwargs, cfg, "clip", rt, output_type="np", vae_overlap=None)
    if rt.rank == 0:
        res["video_shape"] = tuple(out.video.shape)
        res["video_err"] = float(abs(out.video - ref_video).max())
    else:
        res["video_is_none"] = out.video is None
    return res


def _check_cli(rt, out_dir: str) -> dict[str, Any]:
    """`vidsparse generate --parallel clip` on every rank (what torchrun runs), and a rank
    started with a different seed (every rank must exit with the config-mismatch error)."""
    import contextlib
    import io

    from vidsparse.cli import main
    from vidsparse.generation import GenerateOptions, generate

    res: dict[str, Any] = {}
    path = os.path.join(out_dir, "video.gif")
    args = ["generate", "--model", "tiny-random", "--parallel", "clip", "--pattern", "dual-scope", "--local-frames", "1",
            "--global-stride", "3", "--frames", "17", "--height", "32", "--width", "32", "--steps", "2",
            "--dense-first-steps", "0", "--backend", "torch", "--no-progress"]  # fmt: skip
    stdout, stderr = io.StringIO(), io.StringIO()
    real = os.sys.stdout
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        # --json names a per-rank file: only rank 0's may appear (the flags reach generate_parallel)
        res["rc"] = main([*args, "--out", path, "--json", os.path.join(out_dir, f"summary{rt.rank}.json"),
                          "--vae-overlap", "4", "--dist-timeout", "300"])  # fmt: skip
        res["rc_mismatch"] = main([*args, "--out", path, "--seed", str(rt.rank)])
        # Tile at the family defaults keeps every pair of this 5x2x2 grid: with dense_when_full on
        # (off for the rest of the suite, conftest) those layers run the distributed Dense().
        os.environ["VIDSPARSE_DENSE_WHEN_FULL"] = "1"
        try:
            full = ["generate", "--model", "tiny-random", "--parallel", "clip", "--pattern", "tile", *args[11:]]
            res["rc_full"] = main([*full, "--out", os.path.join(out_dir, "..", "full.gif")])
        finally:
            os.environ["VIDSPARSE_DENSE_WHEN_FULL"] = "0"
    os.sys.stdout = real
    # An option only one rank rejects stops every rank (generate_parallel checks collectively).
    from vidsparse.parallel import generate_parallel

    bad = GenerateOptions(
        model="tiny-random", parallel="clip", steps=0 if rt.rank == 1 else 2, out=None, progress=False
    )
    try:
        generate_parallel(bad)
    except ValueError as exc:
        res["invalid"] = str(exc)
    os.sys.stdout = real
    res["stdout"], res["stderr"] = stdout.getvalue(), stderr.getvalue()
    if rt.rank == 0:
        import imageio.v3 as iio

        from vidsparse.video_io import psnr

        single = generate(GenerateOptions(model="tiny-random", pattern="dual-scope", pattern_options={"local_frames": 1, "global_stride": 3},
                                          frames=17, height=32, width=32, steps=2, dense_first_steps=0, backend="torch",
                                          out=os.path.join(out_dir, "..", "single.gif"), progress=False))  # fmt: skip
        written = iio.imread(path)
        res["psnr_vs_single"] = psnr(written[..., :3], iio.imread(single.out)[..., :3])
        res["frames"] = written.shape[0]
    res["files"] = sorted(os.listdir(out_dir))
    return res


def vs_dual():
    import vidsparse as vs

    return vs.DualScope(local_frames=1, global_stride=3)


def suite(frames: int, failure: str, out_dir: str | None = None) -> dict[str, Any]:
    """All checks of one world size, then a failure scenario ("die" or "hang")."""
    torch.set_num_threads(1)
    from vidsparse.parallel import DistributedError, init_distributed

    rt = init_distributed(timeout_s=120)
    res: dict[str, Any] = {"rank": rt.rank, "world": rt.world_size}
    res["primitives"] = _check_primitives(rt)
    res["attention"] = _check_attention(rt)
    res["stats"] = rt.stats.snapshot()
    res["refusals"] = _check_refusals(rt)
    res["pipeline"] = _check_pipeline(rt, frames)
    if out_dir is not None:
        res["cli"] = _check_cli(rt, out_dir)
    # Failure: the last rank dies (or hangs) before a collective; the others must stop with a
    # DistributedError on their own, quickly, not hang.
    import torch.distributed as dist

    from vidsparse.parallel import ParallelRuntime

    short = dist.new_group(list(range(rt.world_size)), timeout=datetime.timedelta(seconds=3))
    frt = ParallelRuntime(rt.rank, rt.world_size, rt.local_rank, rt.device, rt.backend, 3.0, group=short)
    last = rt.world_size - 1
    if rt.rank == last:
        if failure == "die":
            os._exit(17)
        time.sleep(8)  # hang past the peers' timeout, then try the collective anyway
    import vidsparse as vs
    from vidsparse.parallel import clip_attention

    layout = vs.VideoLayout(rt.world_size * 2, 2, 2)
    q = torch.randn(1, 8, 1, 8)
    t0 = time.monotonic()
    try:
        clip_attention(q, q, q, layout, vs.DualScope(1, 2), frt)
        res["failure"] = ("no error", time.monotonic() - t0)
    except DistributedError as exc:
        res["failure"] = (str(exc), time.monotonic() - t0)
    return res


# -- every family's shard plan (tests/test_parallel_families.py) --------------------------------
#: (tiny variant, latent frames, height, width): >= 2 token frames per rank for 2 and 3 ranks.
FAMILY_CASES = (
    ("hunyuan", 6, 4, 4),  # text after the video, padding mask, double + single-stream blocks
    ("cogvideox", 6, 4, 4),  # text before the video, RoPE tables passed by the pipeline
    ("cogvideox-1.5", 12, 4, 4),  # time patchified by 2: 6 token frames
    ("mochi", 6, 4, 4),  # text after the video, per-sample validity
    ("ltx", 6, 4, 4),  # packed tokens, no text in self-attention
    ("ltx2", 6, 4, 4),  # packed video tokens + a replicated audio stream, video->audio rows merged
    ("ltx2-gated", 6, 4, 4),  # LTX-2.3: split RoPE [B, H, S, D/2], gated attention, STG processor
    ("wan-animate", 6, 4, 4),  # Wan's plan + the face adapter's per-frame motion vectors cut by frame
)


def family_suite(cases: tuple[str, ...] | None = None, pipeline: bool = True) -> dict[str, Any]:
    """Per family: the tiny transformer's forward under clip / Ulysses parallelism against the
    single-process forward of the same pattern (every output: LTX-2's audio too), the bytes sent
    against the estimator, and the model restored exactly by ``unparallelize`` (``verify.check_forward``)."""
    torch.set_num_threads(1)
    import vidsparse as vs
    from vidsparse.models.tiny import tiny_inputs, tiny_transformer
    from vidsparse.parallel import init_distributed
    from vidsparse.parallel.verify import check_forward

    rt = init_distributed(timeout_s=120)
    modes = {
        "clip": vs.DualScope(local_frames=1, global_stride=3),
        "ulysses": vs.DualScope(local_frames=0, global_stride=4),
    }
    res: dict[str, Any] = {}
    for name, frames, height, width in FAMILY_CASES:
        if cases is not None and name not in cases:
            continue
        model = tiny_transformer(name, dtype=torch.float64)
        inputs = tiny_inputs(name, model, frames, height, width, batch=2)
        row: dict[str, Any] = {}
        for mode, pattern in modes.items():
            cfg = vs.SparseConfig(pattern, dense_first_steps=0, dense_layers=(), backend="torch", block_size=16)
            check = check_forward(model, inputs, cfg, mode, rt)
            row["layout"] = check.layout
            row[mode] = {k: getattr(check, k) for k in ("err", "sparse_vs_dense", "sent", "predicted", "restored")}
        if name in ("ltx", "ltx2"):  # image-to-video: a per-token timestep (B, S) is cut with the tokens
            g = torch.Generator().manual_seed(3)
            seq = inputs["hidden_states"].shape[1]
            per_token = dict(inputs, timestep=torch.rand(2, seq, generator=g, dtype=torch.float64) * 1000)
            if name == "ltx2":  # LTX2ImageToVideoPipeline: the audio keeps its (B,) timestep
                per_token["audio_timestep"] = inputs["timestep"]
            cfg = vs.SparseConfig(modes["clip"], dense_first_steps=0, dense_layers=(), backend="torch", block_size=16)
            row["per_token_timestep_err"] = check_forward(model, per_token, cfg, "clip", rt).err
        res[name] = row
    if pipeline:
        res["cogvideox_pipeline"] = _cogvideox_pipeline(rt)
    return res


def _cogvideox_pipeline(rt) -> dict[str, Any]:
    """A whole tiny ``CogVideoXPipeline`` (DDIM v-prediction, batched CFG, RoPE from the pipeline)
    through ``run_parallel``: latents and the decoded video (rank 0) equal the single-process run."""
    from diffusers import AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXPipeline

    import vidsparse as vs
    import vidsparse.pipelines as vsp
    from vidsparse.models.tiny import encode_prompt_tiny, tiny_transformer
    from vidsparse.parallel.pipeline import run_parallel

    torch.manual_seed(0)
    vae = AutoencoderKLCogVideoX(latent_channels=4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
                                 norm_num_groups=2, temporal_compression_ratio=4)  # fmt: skip
    sched = CogVideoXDDIMScheduler(prediction_type="v_prediction", rescale_betas_zero_snr=True, snr_shift_scale=3.0,
                                   timestep_spacing="trailing", beta_schedule="scaled_linear")  # fmt: skip
    pipe = CogVideoXPipeline(tokenizer=None, text_encoder=None, vae=vae.eval(), transformer=tiny_transformer("cogvideox"),
                             scheduler=sched)  # fmt: skip
    pipe.set_progress_bar_config(disable=True)

    def kwargs():
        return dict(
            prompt_embeds=encode_prompt_tiny("a tiny cat", seq_len=8, dim=16),
            negative_prompt_embeds=encode_prompt_tiny("", seq_len=8, dim=16),
            num_frames=13, height=32, width=32, num_inference_steps=2, guidance_scale=5.0,
            generator=torch.Generator().manual_seed(0),
        )  # fmt: skip

    out: dict[str, Any] = {}
    for mode in ("clip",):  # Ulysses through the same hooks is covered per family above
        cfg = vs.SparseConfig(vs.DualScope(1, 3), dense_first_steps=0, backend="torch", block_size=16)
        vsp.apply(pipe, cfg)
        with torch.no_grad():
            ref = pipe(**kwargs(), output_type="np").frames
            ref_lat = pipe(**kwargs(), output_type="latent").frames
        vsp.remove(pipe)
        with torch.no_grad():
            res = run_parallel(pipe, kwargs(), cfg, mode, rt, output_type="np", vae_overlap=None)  # exact decode
        out[mode] = {
            "latent_err": (res.latents - ref_lat).abs().max().item(),
            "video_err": float(abs(res.video - ref).max()) if rt.is_main else None,
            "video_shape": tuple(res.video.shape) if rt.is_main else None,
            "ref_shape": tuple(ref.shape),
            "video_is_none": res.video is None,
            "bytes_per_step": res.bytes_per_step,
        }
    return out
