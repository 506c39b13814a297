"""Every family's shard plan on 2 gloo ranks (CPU): the tiny transformer's forward under clip
parallelism and Ulysses equals the single-process forward of the same pattern, the bytes each
rank sends equal the estimator's, and ``unparallelize`` restores the model exactly."""

from __future__ import annotations

import pytest
import torch
from dist_worker import FAMILY_CASES, family_suite

import vidsparse as vs
from vidsparse.models.tiny import tiny_transformer
from vidsparse.parallel import check_results, parallelize, spawn

# torchrun workers: outside the quick subset (pytest -m "not slow"), always in CI
pytestmark = pytest.mark.slow


def test_every_family_equals_single_process_on_two_ranks():
    results = check_results(spawn(family_suite, 2, (), timeout_s=240))
    for rank, res in enumerate(results):
        pipe = res.pop("cogvideox_pipeline")
        assert set(res) == {c[0] for c in FAMILY_CASES}
        for mode, r in pipe.items():  # a whole CogVideoXPipeline through run_parallel
            assert r["latent_err"] < 1e-4 and r["bytes_per_step"] > 0, (rank, mode, r)
            if rank == 0:
                assert r["video_err"] < 1e-4 and r["video_shape"] == r["ref_shape"] == (1, 16, 32, 32, 3), (mode, r)
            else:
                assert r["video_is_none"]
        for name in ("ltx", "ltx2"):  # LTX-Video / LTX-2 I2V's (B, S) timestep
            assert res[name]["per_token_timestep_err"] < 1e-10, res[name]
        for name, row in res.items():
            for mode in ("clip", "ulysses"):
                r = row[mode]
                assert r["err"] < 1e-10, (rank, name, mode, row["layout"], r)
                assert r["sparse_vs_dense"] > 1e-4, (name, mode, r)  # the pattern is not dense: the check can fail
                assert r["sent"] == r["predicted"], (rank, name, mode, r)
                assert r["restored"] == 0.0, (name, mode, r)


def test_three_ranks_uneven_clips_hunyuan():
    """6 token frames over 3 ranks (2, 2, 2) with halos both sides of the middle rank."""
    results = check_results(spawn(family_suite, 3, (("hunyuan",), False), timeout_s=240))
    for rank, res in enumerate(results):
        for mode in ("clip", "ulysses"):
            r = res["hunyuan"][mode]
            assert r["err"] < 1e-10 and r["sent"] == r["predicted"] and r["restored"] == 0.0, (rank, mode, r)


def test_parallelize_refuses_a_family_without_a_shard_plan_with_its_reason():
    """Every family vidsparse patches has a shard plan now; a record without one (a new family) is
    refused with its ``parallel_refusal`` before the runtime is used."""
    from vidsparse.families.wan_animate import FAMILY

    model = tiny_transformer("wan-animate")
    plan, reason = FAMILY.shard_plan, FAMILY.parallel_refusal
    object.__setattr__(FAMILY, "shard_plan", None)  # the record is frozen: a stand-in for a family without a plan
    object.__setattr__(FAMILY, "parallel_refusal", "its shard plan is not written")
    try:
        with pytest.raises(ValueError, match=r"\(wan-animate\) is not supported yet \(its shard plan is not written"):
            parallelize(model, vs.DualScope(1, 2), "clip", None)
    finally:
        object.__setattr__(FAMILY, "shard_plan", plan)
        object.__setattr__(FAMILY, "parallel_refusal", reason)


def test_hunyuan_i2v_token_replace_is_refused_with_the_reason():
    model = tiny_transformer("hunyuan-i2v")
    with pytest.raises(ValueError, match="token_replace"):
        parallelize(model, vs.DualScope(1, 2), "clip", None)
    assert isinstance(model, torch.nn.Module)
