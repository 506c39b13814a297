"""``--parallel clip|ulysses`` for the families added after the first five: SkyReels-V2 (T2V, I2V),
Wan VACE (control branch), Wan 2.2 TI2V-5B (per-token timestep), HunyuanVideo 1.5 (T2V, I2V,
replicated condition span), Cosmos (per-token embeddings cut at every block) and Kandinsky 5 (RoPE
cut at every visual block, the last visual block gathered; NABLA calls refused). On 2 gloo ranks (CPU) the tiny transformer's forward equals the
single-process forward of the same pattern, the bytes sent equal the estimator's and the model is
restored exactly; whole tiny pipelines through ``vidsparse generate`` equal the single-process video;
mismatched settings and a dying rank end every rank with a clear error. Calls that stay refused
say why (checked without processes: SkyReels-V2 diffusion forcing and Kandinsky 5 NABLA calls at
the forward). LTX-2: tests/test_parallel_ltx2.py."""

from __future__ import annotations

import os
from typing import Any

import pytest
import torch
from cli_worker import generate_runs
from cp_env import DIFFUSERS_CP_ON_CPU, FALLBACK_REASON

import vidsparse as vs
from vidsparse.parallel import check_results, spawn

#: (tiny variant, latent frames, height, width): 6 token frames (3 per rank) for every family.
CASES = (
    ("skyreels-v2", 6, 4, 4),
    ("skyreels-v2-i2v", 6, 4, 4),  # image tokens in the cross-attention only
    ("wan-vace", 6, 4, 4),  # control blocks first, hints added per clip
    ("wan22-5b", 6, 4, 4),  # TI2V: per-token timestep (B, S)
    ("hunyuan15", 6, 2, 2),  # joint condition span after the video, per-sample validity
    ("hunyuan15-i2v", 6, 2, 2),
    ("cosmos", 6, 4, 4),  # video2world: per-frame timestep -> per-token embeddings cut at every block
    ("kandinsky5", 6, 4, 4),  # RoPE cut at every visual block, the last one's output gathered
)
#: `vidsparse generate` runs (model, mode, frames): the whole tiny pipeline against one process
#: (TI2V-5B: 13 frames = 4 latent frames of 1x1 tokens, which divide by 2 for diffusers' Ulysses).
CLI = (("tiny-skyreels-v2", "clip", 9), ("tiny-wan-vace", "ulysses", 9), ("tiny-hunyuan15", "clip", 9),
       ("tiny-wan22-5b", "ulysses", 13), ("tiny-cosmos", "clip", 9), ("tiny-kandinsky5", "ulysses", 9))  # fmt: skip


def forward_checks(rt, names: tuple[str, ...] | None = None) -> dict[str, Any]:
    from vidsparse.models.tiny import tiny_inputs, tiny_transformer
    from vidsparse.parallel.verify import check_forward

    modes = {"clip": vs.DualScope(local_frames=1, global_stride=3), "ulysses": vs.DualScope(0, 4)}
    res: dict[str, Any] = {}
    for name, frames, height, width in CASES:
        if names is not None and name not in names:
            continue
        # fp64, but Kandinsky 5 (its time embedding is float32 only in diffusers 0.42.1)
        dtype = torch.float32 if name.startswith("kandinsky5") else torch.float64
        model = tiny_transformer(name, dtype=dtype)
        inputs = tiny_inputs(name, model, frames, height, width, batch=2)
        row: dict[str, Any] = {"tol": 1e-10 if dtype == torch.float64 else 2e-6}
        for mode, pattern in modes.items():
            cfg = vs.SparseConfig(pattern, dense_first_steps=0, dense_layers=(), backend="torch", block_size=16)
            check = check_forward(model, inputs, cfg, mode, rt)
            row["layout"] = check.layout
            row[mode] = {k: getattr(check, k) for k in ("err", "sparse_vs_dense", "sent", "predicted", "restored")}
        res[name] = row
    return res


def cli_checks(rt, out_dir: str) -> dict[str, Any]:
    """What `vidsparse generate --parallel MODE` runs (``generate`` with ``parallel``): the uint8 video
    on rank 0 against the single-process one, and what rank 0 printed."""
    import contextlib
    import io

    from vidsparse.cli import main

    out = generate_runs(rt, tuple((model, mode, frames, 32) for model, mode, frames in CLI))
    real = os.sys.stdout
    # Ranks started with different settings stop before loading (config check).
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()) as err:
        rc = main(["generate", "--model", "tiny-hunyuan15", "--parallel", "ulysses", "--frames", "9", "--height",
                   "32", "--width", "32", "--steps", "2", "--seed", str(rt.rank), "--no-progress", "--out",
                   os.path.join(out_dir, "mismatch.gif")])  # fmt: skip
    os.sys.stdout = real
    out["mismatch"] = (rc, err.getvalue()[-1500:])
    return out


def new_family_suite(out_dir: str) -> dict[str, Any]:
    torch.set_num_threads(1)
    import time

    from vidsparse.models.tiny import tiny_inputs, tiny_transformer
    from vidsparse.parallel import DistributedError, init_distributed, parallelize

    rt = init_distributed(timeout_s=60)
    res: dict[str, Any] = {"forward": forward_checks(rt), "cli": cli_checks(rt, out_dir)}
    # A rank that dies before a HunyuanVideo 1.5 clip-parallel forward: the other stops, clearly.
    model = tiny_transformer("hunyuan15", dtype=torch.float64)
    inputs = tiny_inputs("hunyuan15", model, 6, 2, 2, batch=2)
    parallelize(model, vs.SparseConfig(vs.DualScope(1, 3), dense_first_steps=0, backend="torch"), "clip", rt)
    if rt.rank == 1:
        os._exit(17)
    t0 = time.monotonic()
    try:
        with torch.no_grad():
            model(**inputs)
        res["die"] = ("no error", time.monotonic() - t0)
    except DistributedError as exc:
        res["die"] = (str(exc), time.monotonic() - t0)
    return res


@pytest.mark.slow
def test_new_families_equal_single_process_on_two_ranks(tmp_path):
    results = spawn(new_family_suite, 2, (str(tmp_path),), timeout_s=900)
    assert results[1].status == "died", results[1]
    res = check_results([results[0]])[0]
    for name, _, _, _ in CASES:
        row = res["forward"][name]
        for mode in ("clip", "ulysses"):
            r = row[mode]
            assert r["err"] < row["tol"], (name, mode, row["layout"], r)
            assert r["sparse_vs_dense"] > 1e-4, (name, mode, r)  # the pattern is not dense: the check can fail
            assert r["sent"] == r["predicted"], (name, mode, r)
            assert r["restored"] == 0.0, (name, mode, r)
    for key, row in res["cli"].items():
        if key == "mismatch":
            continue
        assert row["max_diff"] <= 1, (key, row)  # uint8 frames of the same video (fp32 rounding)
    # Wan has a _cp_plan: diffusers' Ulysses runs it where its mesh can be on these CPU ranks
    expected = (
        "diffusers' context parallelism (WanTransformer3DModel._cp_plan"
        if DIFFUSERS_CP_ON_CPU
        else f"vidsparse's Ulysses: {FALLBACK_REASON}"
    )
    assert expected in res["cli"]["tiny-wan22-5b ulysses"]["stdout"], res["cli"]["tiny-wan22-5b ulysses"]["stdout"]
    assert (
        "vidsparse's Ulysses: WanVACETransformer3DModel has no _cp_plan"
        in res["cli"]["tiny-wan-vace ulysses"]["stdout"]
    )
    rc, err = res["cli"]["mismatch"]
    assert rc == 2 and "different settings" in err and "seed" in err, (rc, err)
    message, seconds = res["die"]
    assert "rank 0/2" in message and "failed" in message and seconds < 60, res["die"]


def forward_suite(names: tuple[str, ...]) -> dict[str, Any]:
    torch.set_num_threads(1)
    from vidsparse.parallel import init_distributed

    return forward_checks(init_distributed(timeout_s=60), names)


THREE_RANKS = ("wan-vace", "hunyuan15", "cosmos", "kandinsky5")


@pytest.mark.slow
def test_three_ranks_middle_clip_with_halos_on_both_sides():
    """6 token frames over 3 ranks (2, 2, 2); Ulysses pads the 2 heads to 3."""
    results = check_results(spawn(forward_suite, 3, (THREE_RANKS,), timeout_s=600))
    for rank, res in enumerate(results):
        assert set(res) == set(THREE_RANKS)
        for name, row in res.items():
            for mode in ("clip", "ulysses"):
                r = row[mode]
                assert r["err"] < row["tol"] and r["sent"] == r["predicted"] and r["restored"] == 0.0, (
                    rank,
                    name,
                    mode,
                    r,
                )


def _fake_runtime():
    from vidsparse.parallel import ParallelRuntime

    return ParallelRuntime(rank=0, world_size=2, local_rank=0, device=torch.device("cpu"), backend="gloo", timeout_s=5)


def test_skyreels_diffusion_forcing_is_refused_at_the_forward_before_any_collective():
    from vidsparse.models.tiny import tiny_inputs, tiny_transformer
    from vidsparse.parallel import parallelize, unparallelize

    model = tiny_transformer("skyreels-v2-df")
    inputs = tiny_inputs("skyreels-v2-df", model, 4, 4, 4)
    parallelize(
        model, vs.SparseConfig(vs.DualScope(1, 2), dense_first_steps=0, backend="torch"), "clip", _fake_runtime()
    )
    try:
        with pytest.raises(
            ValueError, match=r"diffusion forcing \(enable_diffusion_forcing=True\).*per-token modulation"
        ):
            model(**inputs)
    finally:
        unparallelize(model)


def test_kandinsky5_nabla_calls_are_refused_at_the_forward():
    from vidsparse.models.tiny import tiny_inputs, tiny_transformer
    from vidsparse.parallel import parallelize, unparallelize

    model = tiny_transformer("kandinsky5-nabla")
    inputs = tiny_inputs("kandinsky5-nabla", model, 3, 16, 16)
    parallelize(
        model, vs.SparseConfig(vs.DualScope(1, 2), dense_first_steps=0, backend="torch"), "clip", _fake_runtime()
    )
    try:
        with pytest.raises(ValueError, match=r"NABLA checkpoint's call \(sparse_params\)"):
            model(**inputs)
    finally:
        unparallelize(model)
