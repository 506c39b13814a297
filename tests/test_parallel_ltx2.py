"""LTX-2 under ``--parallel clip|ulysses``: the audio stream replicated on every rank, the video
tokens split by clip, the video->audio cross-attention's audio rows merged across ranks by
log-sum-exp. The forward at 2 and 3 ranks (fp64, against one process, bytes against the estimator)
is in tests/test_parallel_families.py / test_parallel_three_ranks.py (``FAMILY_CASES``), the whole
pipeline with the per-clip decode and the audio decoded on rank 0 in test_parallel_three_ranks.py;
here: ``vidsparse generate --model tiny-ltx2`` on 2 gloo ranks, and the refusals / restore without
processes."""

from __future__ import annotations

import pytest
import torch
from cli_worker import generate_suite

import vidsparse as vs
from vidsparse.models.tiny import tiny_inputs, tiny_transformer
from vidsparse.parallel import ParallelRuntime, check_results, parallelize, spawn, unparallelize

#: 25 frames of 64x64: 4 latent frames of 2x2 tokens (2 per rank).
RUNS = (("tiny-ltx2", "clip", 25, 64), ("tiny-ltx2", "ulysses", 25, 64))


@pytest.mark.slow
def test_generate_tiny_ltx2_equals_single_process_on_two_ranks():
    results = check_results(spawn(generate_suite, 2, (RUNS,), timeout_s=600))
    res = results[0]
    for key, row in res.items():
        assert row["max_diff"] <= 1 and row["shape"] == row["single_shape"] == (25, 64, 64, 3), (key, row)
        assert "merged_rows" in row["stdout"], row["stdout"]  # the audio rows are counted per step
    assert "vidsparse's Ulysses: diffusers 0.42.1's LTX-2 _cp_plan" in res["tiny-ltx2 ulysses"]["stdout"]
    assert results[1]["tiny-ltx2 clip"]["shape"] == (25, 64, 64, 3)  # a placeholder of the video's shape


def _fake_runtime() -> ParallelRuntime:
    return ParallelRuntime(rank=0, world_size=2, local_rank=0, device=torch.device("cpu"), backend="gloo", timeout_s=5)


def _cfg():
    return vs.SparseConfig(vs.DualScope(1, 2), dense_first_steps=0, backend="torch")


def test_video_self_attention_mask_is_refused_at_the_forward_before_any_collective():
    model = tiny_transformer("ltx2")
    inputs = tiny_inputs("ltx2", model, 4, 2, 2)
    seq = inputs["hidden_states"].shape[1]
    inputs["video_self_attention_mask"] = torch.ones(1, seq, seq)
    parallelize(model, _cfg(), "clip", _fake_runtime())
    try:
        with pytest.raises(ValueError, match=r"video_self_attention_mask \(IC-LoRA reference conditioning\)"):
            model(**inputs)
    finally:
        unparallelize(model)


@pytest.mark.parametrize("variant", ["ltx2", "ltx2-gated"])
def test_the_video_to_audio_processors_are_replaced_for_the_run_and_restored(variant):
    model = tiny_transformer(variant)
    before = [b.video_to_audio_attn.processor for b in model.transformer_blocks]
    parallelize(model, _cfg(), "ulysses", _fake_runtime())
    during = [b.video_to_audio_attn.processor for b in model.transformer_blocks]
    assert all(type(p).__name__ == "LTX2MergedCrossProcessor" and p.original is o for p, o in zip(during, before))
    unparallelize(model)
    assert [b.video_to_audio_attn.processor for b in model.transformer_blocks] == before
