"""Multi-process tests (gloo on CPU, 2 and 3 ranks): clip parallelism and Ulysses equal the
single-process result of the same pattern; uneven splits; dying, hanging and misconfigured
ranks end with clear errors in bounded time. Plus single-process unit tests."""

from __future__ import annotations

import time

import pytest
import torch
from dist_worker import suite
from oracle import masked_attention, random_qkv

import vidsparse as vs
from vidsparse.parallel import FramePartition, exchange_plan, frame_reach, spawn
from vidsparse.parallel.partials import dense_attention_lse, merge_partials

# torchrun workers: outside the quick subset (pytest -m "not slow"), always in CI
pytestmark = pytest.mark.slow


# -- single process ---------------------------------------------------------------------------
@pytest.mark.parametrize("frames,world,sizes", [(5, 2, (3, 2)), (7, 3, (3, 2, 2)), (4, 4, (1, 1, 1, 1)), (9, 1, (9,))])
def test_frame_partition_uneven(frames, world, sizes):
    p = FramePartition(frames, world)
    assert p.sizes == sizes and p.bounds[0][0] == 0 and p.bounds[-1][1] == frames
    lay = vs.VideoLayout(frames, 2, 3, text_len=4, text_position="before")
    idx = torch.cat([p.local_token_index(lay, r)[4:] for r in range(world)])
    assert torch.equal(idx, torch.arange(4, lay.seq_len))  # clips tile the video in order
    assert p.owner(frames - 1) == world - 1


def test_frame_partition_refuses_more_ranks_than_frames():
    with pytest.raises(ValueError, match="at least one frame"):
        FramePartition(2, 3)


def test_dual_scope_mask_definition():
    lay = vs.VideoLayout(7, 1, 2)
    pat = vs.DualScope(local_frames=1, global_stride=3)
    m = vs.token_mask(pat, lay, block_size=16)[0]
    f = torch.arange(lay.seq_len) // 2
    expect = ((f[:, None] - f[None, :]).abs() <= 1) | (f[None, :] % 3 == 0)
    assert torch.equal(m, expect)
    assert pat.global_frames(lay) == [0, 3, 6] and vs.DualScope(2, 0).global_frames(lay) == []
    assert vs.make_pattern("dual-scope", local_frames=1, global_stride=3) == pat


@pytest.mark.parametrize(
    "layout", [vs.VideoLayout(9, 3, 5), vs.VideoLayout(6, 4, 3, text_len=5, text_position="after")], ids=str
)
@pytest.mark.parametrize("pattern", [vs.DualScope(1, 4), vs.DualScope(0, 1), vs.DualScope(2, 0)], ids=repr)
@pytest.mark.parametrize("backend", ["torch", "flex"])
def test_dual_scope_backends_match_oracle(layout, pattern, backend):
    q, k, v = random_qkv(layout, batch=2, heads=2, dim=8, dtype=torch.float64 if backend == "torch" else torch.float32)
    out = vs.attention(q, k, v, layout, pattern, backend=backend, block_size=16)
    ref = masked_attention(q, k, v, vs.token_mask(pattern, layout, block_size=16), layout)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


def test_dual_scope_block_candidates_are_tight():
    lay = vs.VideoLayout(12, 4, 4)  # 16 tokens per frame = one block per frame
    p = vs.plan(vs.DualScope(1, 4), lay, block_size=16)
    m = p.dense_block_matrix()
    expect = torch.zeros(12, 12, dtype=torch.int8)
    for i in range(12):
        for j in range(12):
            expect[i, j] = 2 if abs(i - j) <= 1 or j % 4 == 0 else 0
    assert torch.equal(m, expect)


@pytest.mark.parametrize("bad", [dict(local_frames=-1), dict(global_stride=-2), dict(local_frames=1.5)])
def test_dual_scope_rejects_bad_options(bad):
    with pytest.raises(ValueError, match="DualScope"):
        vs.DualScope(**bad)


def test_exchange_plan_halos_and_globals():
    lay = vs.VideoLayout(10, 2, 2)
    part = FramePartition(10, 3)  # (0,4) (4,7) (7,10)
    ex = [exchange_plan(vs.DualScope(2, 5), lay, part, r) for r in range(3)]
    # Globals 0 and 5 are all-gathered; halos (window +-2) travel point to point.
    assert ex[0].gathered == ((0,), (5,), ())
    assert dict(ex[1].recv) == {0: (2, 3), 2: (7, 8)}
    assert dict(ex[0].recv) == {1: (4,)} and dict(ex[2].recv) == {1: (6,)}
    assert ex[2].remote == (0, 5, 6)
    # What one rank sends is what the other receives.
    for r in range(3):
        for dst, frames in ex[r].send:
            assert dict(ex[dst].recv)[r] == frames
    # Short clips: a window of 3 frames reaches past the neighbour.
    ex = exchange_plan(vs.DualScope(3, 0), vs.VideoLayout(6, 1, 1), FramePartition(6, 6), 0)
    assert dict(ex.recv) == {1: (1,), 2: (2,), 3: (3,)}


def test_frame_reach_generic_is_a_superset_of_the_mask():
    lay = vs.VideoLayout(6, 4, 4)
    pat = vs.make_pattern("radial", block_size=16)
    reach = frame_reach(pat, lay, block_size=16)
    m = vs.token_mask(pat, lay, block_size=16)[0].view(6, 16, 6, 16).any(dim=3).any(dim=1)
    assert bool((reach | ~m).all())


def test_merge_partials_equals_attention_over_the_union():
    q, k, v = (torch.randn(2, 5, 3, 8, dtype=torch.float64) for _ in range(3))
    k2, v2 = torch.randn(2, 7, 3, 8, dtype=torch.float64), torch.randn(2, 7, 3, 8, dtype=torch.float64)
    a = dense_attention_lse(q, k, v)
    b = dense_attention_lse(q, k2, v2, chunk=3)
    out, lse = merge_partials([a, b])
    full, full_lse = dense_attention_lse(q, torch.cat([k, k2], 1), torch.cat([v, v2], 1))
    torch.testing.assert_close(out, full)
    torch.testing.assert_close(lse, full_lse)
    empty = dense_attention_lse(q, k, v, key_valid=torch.zeros(2, 5, dtype=torch.bool))
    assert bool((empty[0] == 0).all()) and bool(torch.isinf(empty[1]).all())
    out2, _ = merge_partials([a, empty])
    torch.testing.assert_close(out2, a[0])


def test_wan_clip_bounds_and_pixel_counts():
    from vidsparse.families.wan import tiny_vae
    from vidsparse.parallel.vae import clip_bounds, decode_clip, pixel_counts

    vae = tiny_vae()
    assert clip_bounds(vae, 7, 3) == [(0, 3), (3, 5), (5, 7)]
    assert pixel_counts(vae, 7, 3) == [9, 8, 8]  # 1 + 4 * 2, then 4 per latent frame: 25 in all
    with pytest.raises(ValueError, match="vae_overlap"):
        decode_clip(vae, torch.zeros(1, 4, 7, 2, 2), 3, 5, 0)


def test_per_clip_decode_with_full_context_is_exact_and_context_reduces_the_seam():
    from vidsparse.models.tiny import build_tiny_pipeline
    from vidsparse.parallel.vae import decode_clip

    vae = build_tiny_pipeline().vae
    z = torch.randn(1, 4, 6, 4, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = vae.decode(z).sample
    tail = full[:, :, 9:]  # latent frames 3..5: pixels from 1 + 4 * 2
    exact = decode_clip(vae, z, 3, 6, None)
    assert exact.shape == tail.shape and torch.equal(exact, tail)
    errs = [(decode_clip(vae, z, 3, 6, o) - tail).abs().mean().item() for o in (1, 2)]
    assert errs[0] > errs[1] > 0


# -- multi process ------------------------------------------------------------------------------
def _run_suite(world: int, frames: int, failure: str, out_dir=None):
    t0 = time.monotonic()
    results = spawn(suite, world, (frames, failure, out_dir), timeout_s=300)
    return results, time.monotonic() - t0


def _check_suite(results, world: int, failure: str):
    survivors = [r for r in results if r.rank != world - 1 or failure == "hang"]
    for r in survivors:
        assert r.ok, f"rank {r.rank}: {r.status} {r.error_type} {r.message}"
    for r in survivors:
        res = r.value
        assert all(res["primitives"].values()), res["primitives"]
        for mode, what, err, sent, predicted in res["attention"]:
            assert err < 1e-12, f"{mode} {what}: {err}"
            assert sent == predicted, f"{mode} {what}: measured {sent} != estimated {predicted}"
        ref = res["refusals"]
        assert "dynamic" in ref["dynamic"] and "ulysses" in ref["dynamic"]
        assert "different settings" in ref["mismatch"] and "steps" in ref["mismatch"]
        pipe = res["pipeline"]
        for mode in ("clip", "ulysses"):
            assert pipe[mode]["err"] < 1e-4, (mode, pipe[mode])
            assert pipe[mode]["sparse_vs_dense"] > 100 * max(pipe[mode]["err"], 1e-6)  # the check can fail
            assert pipe[mode]["bytes_per_step"] > 0
            assert pipe[mode]["restored"] == 0.0  # unparallelize gives the model back exactly
        if r.rank == 0:
            assert pipe["video_err"] < 1e-4 and pipe["video_shape"][1] == 17
        else:
            assert pipe["video_is_none"]
        stats = res["stats"]["bytes_sent"]
        assert stats["clip_halo"] > 0 and stats["clip_global"] > 0 and stats["ulysses_qkv"] > 0
        if r.rank == 0:
            # The busiest rank's bytes per step are what the estimator (used by the benchmark) predicts:
            # tiny Wan, 17 frames 32x32 -> 5x2x2 tokens, 2 heads x 8, 2 layers, 2 CFG forwards, fp32.
            from vidsparse.parallel.estimate import step_bytes

            for mode, pattern in (("clip", vs.DualScope(1, 3)), ("ulysses", vs.Dense())):
                measured = max(x.value["pipeline"][mode]["bytes_per_step"] for x in survivors)
                if len(survivors) == world:
                    vol = step_bytes(mode, vs.VideoLayout(5, 2, 2), pattern, 2, 8, 2, world, 16, element_size=4)
                    assert measured == vol.total, (mode, measured, vol)
        message, seconds = res["failure"]
        assert "failed" in message and "rank" in message, message
        assert seconds < 60, seconds
    if failure == "die":
        dead = results[world - 1]
        assert dead.status == "died" and dead.exitcode == 17


def test_two_ranks_equal_single_process_and_a_hung_rank_times_out(tmp_path):
    (tmp_path / "parallel").mkdir()
    results, _ = _run_suite(2, 17, "hang", str(tmp_path / "parallel"))
    _check_suite(results, 2, "hang")
    cli = [r.value["cli"] for r in results]
    # `vidsparse generate --parallel clip`: rank 0 alone prints the summary and writes the video,
    # which matches the single-process run; different settings stop every rank with exit status 2.
    assert cli[0]["rc"] == 0 and cli[1]["rc"] == 0
    assert "wrote" in cli[0]["stdout"] and cli[1]["stdout"] == ""
    assert "sent per step by the busiest rank" in cli[0]["stdout"] and "clip_global" in cli[0]["stdout"]
    # its density lines count the work as single-process generate does, and the pipeline call is timed
    assert "computed pairs over all steps and layers" in cli[0]["stdout"] and "pipeline " in cli[0]["stdout"]
    assert cli[0]["frames"] == 17 and cli[0]["psnr_vs_single"] > 40, cli[0]
    assert cli[0]["files"] == ["summary0.json", "video.gif"]  # --json too is written by rank 0 only
    # dense_when_full: tile's plan keeps every pair of the whole 5x2x2 video, so its layers ran the
    # distributed Dense(), and the summary says so as single-process generate does.
    assert cli[0]["rc_full"] == 0 and cli[1]["rc_full"] == 0
    assert "(keeps every pair: ran dense)" in cli[0]["stdout"] and "note       layers 0-1" in cli[0]["stdout"]
    assert "rank(s) [1] rejected the options" in cli[0]["invalid"]
    assert "--steps must be a positive integer" in cli[1]["invalid"]
    for c in cli:
        assert c["rc_mismatch"] == 2 and "different settings" in c["stderr"] and "seed" in c["stderr"], c["stderr"]
    # The hung rank itself ends with a clear error once it tries to communicate.
    assert "failed" in results[1].value["failure"][0]


def test_three_ranks_uneven_frames_and_a_dying_rank_stops_the_others():
    results, _ = _run_suite(3, 17, "die")  # 5 latent frames over 3 ranks: (2, 2, 1)
    _check_suite(results, 3, "die")


def test_parallel_without_a_launcher_is_a_clear_user_error(tmp_path):
    """--parallel in a plain process: one line naming torchrun/accelerate, exit code 2."""
    import subprocess
    import sys

    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "vidsparse",
            "generate",
            "--model",
            "tiny-random",
            "--parallel",
            "clip",
            "--pattern",
            "dual-scope",
            "--out",
            str(tmp_path / "x.mp4"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={
            k: v
            for k, v in __import__("os").environ.items()
            if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
        },
    )
    assert proc.returncode == 2, proc.stderr
    assert "torchrun" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "x.mp4").exists()
