"""``--parallel ulysses`` through diffusers' context parallelism where the transformer has a
``_cp_plan`` (Wan, LTX-Video), vidsparse's own Ulysses elsewhere: 2 gloo ranks on CPU, whole tiny
pipelines equal the single-process sparse run, the model is restored afterwards, the CLI logs which
implementation ran and why, and a rank that dies mid-run stops the other with a clear error."""

from __future__ import annotations

import os
from typing import Any

import pytest
import torch
from cp_env import DIFFUSERS_CP_ON_CPU, MESH_DEVICE

from vidsparse.parallel import check_results, spawn

#: (family, frames, height, width): token counts that divide by 2 (diffusers splits evenly).
PIPELINES = (("wan", 9, 32, 32),)


def _call(fam, pipe, frames: int, height: int, width: int) -> dict[str, Any]:
    kwargs: dict[str, Any] = dict(num_frames=frames, height=height, width=width, num_inference_steps=2,
                                  guidance_scale=5.0, generator=torch.Generator().manual_seed(0))  # fmt: skip
    if fam.tiny_prompt_kwargs is not None:
        kwargs.update(fam.tiny_prompt_kwargs(pipe, "a tiny cat", ""))
    else:
        from vidsparse.models.tiny import encode_prompt_tiny

        emb = dict(dim=pipe.transformer.config.text_dim, dtype=pipe.transformer.dtype)
        kwargs.update(prompt_embeds=encode_prompt_tiny("a tiny cat", **emb),
                      negative_prompt_embeds=encode_prompt_tiny("", **emb))  # fmt: skip
    return kwargs


def _no_parallel_left(transformer) -> bool:
    from diffusers.hooks import HookRegistry

    hooks = [
        name
        for m in transformer.modules()
        if isinstance(getattr(m, "_diffusers_hook", None), HookRegistry)
        for name in m._diffusers_hook.hooks
    ]
    procs = [getattr(m, "processor", None) for m in transformer.modules()]
    return (
        transformer._parallel_config is None
        and not hooks
        and all(getattr(p, "_parallel_config", None) is None for p in procs if p is not None)
    )


def cp_suite(out_dir: str) -> dict[str, Any]:
    torch.set_num_threads(1)
    import vidsparse as vs
    from vidsparse.families import get_family
    from vidsparse.models.tiny import tiny_transformer
    from vidsparse.parallel import init_distributed
    from vidsparse.parallel.diffusers_cp import choose_ulysses
    from vidsparse.parallel.pipeline import run_parallel

    rt = init_distributed(timeout_s=60)
    res: dict[str, Any] = {}
    cfg = vs.SparseConfig("radial", dense_first_steps=1, backend="torch", block_size=16)
    for name, frames, height, width in PIPELINES:
        fam = get_family(name)
        pipe = fam.tiny_pipeline(seed=0, dtype=torch.float64)
        with torch.no_grad():
            dense = pipe(**_call(fam, pipe, frames, height, width), output_type="latent").frames
        vs.apply(pipe, cfg)
        with torch.no_grad():
            ref = pipe(**_call(fam, pipe, frames, height, width), output_type="latent").frames
        vs.remove(pipe)
        row: dict[str, Any] = {"choice": choose_ulysses([pipe.transformer], rt)}
        for impl in ("auto", "vidsparse"):
            with torch.no_grad():
                out = run_parallel(pipe, _call(fam, pipe, frames, height, width), cfg, "ulysses", rt,
                                   output_type="latent", ulysses=impl)  # fmt: skip
                restored = pipe(**_call(fam, pipe, frames, height, width), output_type="latent").frames
            row[impl] = {
                "err": (out.latents - ref).abs().max().item(),
                "sparse_vs_dense": (ref - dense).abs().max().item(),
                "restored": (restored - dense).abs().max().item(),
                "clean": _no_parallel_left(pipe.transformer),
                "sparse_steps": out.sparse_steps,
                "patterns": sorted({type(p).__name__ for p, _ in out.patterns.values()}),
                "layers": len(out.patterns),
            }
        res[name] = row
    res["hunyuan_choice"] = choose_ulysses([tiny_transformer("hunyuan")], rt)
    res["ltx_choice"] = choose_ulysses([tiny_transformer("ltx")], rt)
    # Tokens that do not divide by the ranks, diffusers forced: a clear error on every rank.
    fam = get_family("wan")
    pipe = fam.tiny_pipeline(seed=0)
    try:
        run_parallel(pipe, _call(fam, pipe, 9, 48, 48), cfg, "ulysses", rt, output_type="latent", ulysses="diffusers")
        res["uneven"] = "no error"
    except ValueError as exc:
        res["uneven"] = str(exc)
    res["uneven_clean"] = _no_parallel_left(pipe.transformer)
    res["cli"] = _cli(rt, out_dir)
    # A rank that dies mid-run (after its first denoising step): the other stops with a clear error.
    import time

    from vidsparse.parallel import DistributedError

    kwargs = _call(fam, pipe, 9, 32, 32)
    if rt.rank == 1:
        kwargs["callback_on_step_end"] = lambda *a: os._exit(17)
    t0 = time.monotonic()
    try:
        run_parallel(pipe, kwargs, cfg, "ulysses", rt, output_type="latent")
        res["die"] = ("no error", time.monotonic() - t0)
    except DistributedError as exc:
        res["die"] = (str(exc), time.monotonic() - t0)
    return res


def _cli(rt, out_dir: str) -> dict[str, Any]:
    """`vidsparse generate --model tiny --parallel ulysses` (diffusers' CP) and `--model tiny-hunyuan`
    (vidsparse's Ulysses, no _cp_plan): the logged choice, and the video equal to the single-process one."""
    import contextlib
    import io

    import numpy as np

    import vidsparse.video_io as video_io
    from vidsparse.cli import main

    # Compare the frames the CLI writes, not the GIF read back: Pillow picks a palette per frame, so a
    # 1-level rounding difference can move a pixel by a palette step (16 levels seen on the trained tiny model).
    written: dict[str, np.ndarray] = {}
    real_write = video_io.write_video

    def recording_write(path, frames, *a, **k):
        written[str(path)] = video_io.as_uint8_frames(frames).astype(int)
        return real_write(path, frames, *a, **k)

    video_io.write_video = recording_write
    out: dict[str, Any] = {}
    for model in ("tiny", "tiny-hunyuan"):
        args = ["generate", "--model", model, "--pattern", "radial", "--frames", "9", "--height", "32",
                "--width", "32", "--steps", "2", "--dense-first-steps", "1", "--backend", "torch", "--no-progress"]  # fmt: skip
        path = os.path.join(out_dir, f"{model}.gif")
        stdout = io.StringIO()
        real = os.sys.stdout
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(io.StringIO()):
            rc = main([*args, "--parallel", "ulysses", "--out", path])
        os.sys.stdout = real
        row: dict[str, Any] = {"rc": rc, "stdout": stdout.getvalue()}
        if rt.rank == 0:
            single = os.path.join(out_dir, f"{model}-single.gif")
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                row["rc_single"] = main([*args, "--out", single])
            a, b = written[path], written[single]
            row["max_diff"] = int(abs(a - b).max()) if a.shape == b.shape else -1
        out[model] = row
    video_io.write_video = real_write
    return out


@pytest.mark.slow
@pytest.mark.skipif(
    not DIFFUSERS_CP_ON_CPU,
    reason=f"diffusers would build its device mesh on {MESH_DEVICE}, these ranks compute on cpu (a CUDA build of "
    "torch without a GPU): vidsparse runs its own Ulysses there (tests/test_parallel_new_families.py checks that)",
)
def test_ulysses_runs_diffusers_cp_where_the_model_has_a_cp_plan(tmp_path):
    results = spawn(cp_suite, 2, (str(tmp_path),), timeout_s=600)
    survivor = results[0]
    assert results[1].status == "died", results[1]
    res = check_results([survivor])[0]
    for name, _, _, _ in PIPELINES:
        row = res[name]
        assert row["choice"][0] == "diffusers" and "_cp_plan" in row["choice"][1], row["choice"]
        for impl in ("auto", "vidsparse"):
            r = row[impl]
            assert r["err"] < 1e-10, (name, impl, r)
            assert r["sparse_vs_dense"] > 1e-6, (name, r)  # the pattern changes the result: the check can fail
            assert r["restored"] == 0.0 and r["clean"], (name, impl, r)
            # the same per-layer record as vidsparse's path (Wan's radial default keeps one layer dense)
            assert r["sparse_steps"] == 1 and r["layers"] == 2 and "Radial" in r["patterns"], (name, impl, r)
            assert r["patterns"] == row["vidsparse"]["patterns"], (name, row)
    choice, why = res["hunyuan_choice"]
    assert choice == "vidsparse" and "HunyuanVideoTransformer3DModel has no _cp_plan" in why
    choice, why = res["ltx_choice"]  # a _cp_plan that fails on LTXPipeline's prompt mask
    assert choice == "vidsparse" and "LTX-Video _cp_plan cuts the prompt's attention mask" in why, why
    assert "cuts the 3x3x3 = 27 video tokens into 2 equal shards" in res["uneven"], res["uneven"]
    assert "diffusers' Ulysses" in res["uneven"] and "VIDSPARSE_ULYSSES=vidsparse" in res["uneven"], res["uneven"]
    assert res["uneven_clean"]
    cli = res["cli"]
    assert cli["tiny"]["rc"] == 0 and cli["tiny"]["rc_single"] == 0, cli["tiny"]
    # The trained tiny model's transformer is TinyWanTransformer3DModel (Wan's class + a position code; its
    # _cp_plan is Wan's, inherited).
    assert "ulysses x2: diffusers' context parallelism (TinyWanTransformer3DModel._cp_plan" in cli["tiny"]["stdout"]
    assert "bytes not counted" in cli["tiny"]["stdout"]
    assert cli["tiny-hunyuan"]["rc"] == 0, cli["tiny-hunyuan"]
    assert (
        "ulysses x2: vidsparse's Ulysses: HunyuanVideoTransformer3DModel has no _cp_plan"
        in cli["tiny-hunyuan"]["stdout"]
    )
    for model in ("tiny", "tiny-hunyuan"):
        assert cli[model]["max_diff"] <= 1, (model, cli[model])  # uint8 frames of the same video (fp32 rounding)
    message, seconds = res["die"]
    assert "rank 0/2" in message and "diffusers' Ulysses" in message and seconds < 60, res["die"]


def test_bad_ulysses_setting_is_refused_before_anything_loads(monkeypatch):
    from vidsparse.generation import GenerateOptions, generate

    monkeypatch.setenv("VIDSPARSE_ULYSSES", "ring")
    with pytest.raises(ValueError, match="VIDSPARSE_ULYSSES must be one of auto, diffusers, vidsparse, got 'ring'"):
        generate(GenerateOptions(model="tiny", parallel="ulysses", out=None, progress=False))


def test_a_model_without_cp_plan_keeps_vidsparse_ulysses_and_says_why():
    from vidsparse.models.tiny import tiny_transformer
    from vidsparse.parallel import ParallelRuntime
    from vidsparse.parallel.diffusers_cp import choose_ulysses

    rt = ParallelRuntime(rank=0, world_size=2, local_rank=0, device=torch.device("cpu"), backend="gloo", timeout_s=5)
    model = tiny_transformer("cogvideox")
    assert choose_ulysses([model], rt) == (
        "vidsparse",
        "vidsparse's Ulysses: CogVideoXTransformer3DModel has no _cp_plan in diffusers "
        f"{__import__('diffusers').__version__}",
    )
    with pytest.raises(ValueError, match="diffusers' Ulysses cannot run this pipeline: CogVideoX.* has no _cp_plan"):
        choose_ulysses([model], rt, "diffusers")
