"""3 gloo ranks (CPU): every family's shard plan with clips of 2 token frames (halos on both sides
of the middle rank) and Ulysses with 2 heads padded to 3 (``heads_per_rank``), and every family's
tiny pipeline end to end with the per-clip VAE decode assembled on rank 0 (LTX-2 and LTX-2.3
included: audio replicated, video->audio rows merged, the audio decoded on rank 0 only)."""

from __future__ import annotations

import pytest
from cli_worker import generate_suite
from decode_worker import PIPELINE_CASES, pipelines_suite
from dist_worker import FAMILY_CASES, family_suite

from vidsparse.parallel import check_results, spawn

# torchrun workers: outside the quick subset (pytest -m "not slow")
pytestmark = pytest.mark.slow


def test_every_family_equals_single_process_on_three_ranks():
    results = check_results(spawn(family_suite, 3, (None, False), timeout_s=400))
    for rank, res in enumerate(results):
        assert set(res) == {c[0] for c in FAMILY_CASES}
        for name, row in res.items():
            for mode in ("clip", "ulysses"):
                r = row[mode]
                assert r["err"] < 1e-10, (rank, name, mode, row["layout"], r)
                assert r["sparse_vs_dense"] > 1e-4, (name, mode, r)  # the pattern is not dense: the check can fail
                assert r["sent"] == r["predicted"], (rank, name, mode, r)
                assert r["restored"] == 0.0, (name, mode, r)


def test_every_family_pipeline_decodes_per_clip_on_three_ranks():
    """Video on rank 0 equal to the single-process video (full VAE context), bytes per step equal
    to the estimator over the pipeline's transformer forwards, each rank's frames sent once."""
    results = check_results(spawn(pipelines_suite, 3, (), timeout_s=600))
    for rank, res in enumerate(results):
        assert set(res) == set(PIPELINE_CASES)
        for name, r in res.items():
            assert r["forwards"] >= 2 and r["sent"] == r["predicted"], (rank, name, r)
            assert r["decode_bytes"] == r["decode_predicted"] and all(r["counts"]), (rank, name, r)
            if rank == 0:
                assert r["shape"] == tuple(r["ref_shape"]) and r["video_err"] < 1e-5, (name, r)
            else:
                assert r["video_is_none"] and r["audio_is_none"], (rank, name)
            if name == "ltx2":  # the audio: decoded once, on rank 0, equal to the single-process audio
                assert r["audio_decodes"] == (1 if rank == 0 else 0), (rank, r)
                assert rank != 0 or r["audio_err"] < 1e-5, r


#: ``vidsparse generate --parallel`` at 3 ranks for the families added after the first five, each
#: tiny pipeline once (clip or Ulysses; LTX-2 both): 3 latent frames, 1 per rank (LTX-2: 4, 2 + 1 + 1;
#: Wan 2.2 TI2V-5B: 4 of 1x1 tokens). Ulysses falls back to vidsparse's (2 heads, 3 ranks).
THREE_RANK_CLI = (
    ("tiny-skyreels-v2", "clip", 9, 32),
    ("tiny-wan-vace", "clip", 9, 32),
    ("tiny-hunyuan15", "ulysses", 9, 32),
    ("tiny-wan22-5b", "ulysses", 13, 32),
    ("tiny-cosmos", "clip", 9, 32),
    ("tiny-kandinsky5", "ulysses", 9, 32),
    ("tiny-ltx2", "clip", 25, 64),
    ("tiny-ltx2", "ulysses", 25, 64),
)


def test_generate_newer_families_on_three_ranks_equals_one_process():
    """One torchrun for all of them (about 40 s on one shared CPU core per rank)."""
    res = check_results(spawn(generate_suite, 3, (THREE_RANK_CLI,), timeout_s=900))[0]
    assert len(res) == len(THREE_RANK_CLI)
    for key, row in res.items():
        assert row["max_diff"] <= 1 and row["shape"] == row["single_shape"], (key, row)  # uint8, fp32 rounding
        assert "parallel   " in row["stdout"] and " x3: " in row["stdout"], (key, row["stdout"])
