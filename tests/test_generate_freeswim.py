"""`vidsparse generate --freeswim`: both stages on the tiny model, the summary, bad input before loading,
and FreeSwim's family default (the base grid of the family's native video)."""

import json

import imageio.v2 as imageio
import numpy as np
import pytest

from vidsparse import video_io
from vidsparse.cli import main
from vidsparse.families import VideoGeometry, get_family
from vidsparse.families.base import native_window_defaults
from vidsparse.generation import GenerateOptions, format_summary, generate
from vidsparse.layout import VideoLayout

# Target 48x64 (WxH) px, 5 frames, 3 steps; the tiny checkpoint's native size is 32x32.
FS = ["--model", "tiny-random", "--freeswim", "--frames", "5", "--height", "64", "--width", "48", "--steps", "3"]


def test_two_stage_command_on_tiny_writes_the_target_size(tmp_path, capsys):
    out, js = tmp_path / "fs.gif", tmp_path / "fs.json"
    assert main(["generate", *FS, "--out", str(out), "--json", str(js)]) == 0
    captured = capsys.readouterr()
    video = np.stack(imageio.mimread(out))
    assert video.shape == (5, 64, 48, 3)  # the target, not the base
    # One progress bar per stage, labelled with its size.
    assert "stage 1 (base 32x32 WxH)" in captured.err and "stage 2 (refine 48x64 WxH)" in captured.err
    stdout = captured.out
    # Every size says its order: pixels W x H as the video line, tokens F x H x W.
    assert "base 32x32 px (WxH; the checkpoint's native size) -> target 48x64 px (WxH)" in stdout
    assert "stage 1 (base): 32x32 px (WxH), 5 frames (2x2x2 tokens, FxHxW)" in stdout
    assert "stage 2 (refine): 48x64 px (WxH), 5 frames (2x4x3 tokens, FxHxW)" in stdout and "dual path:" in stdout
    summary = json.loads(js.read_text())
    fs = summary["freeswim"]
    assert fs["base_size"] == [32, 32] and fs["target_size"] == [64, 48]
    assert [s["steps"] for s in fs["stages"]] == [3, 2]  # int(3 * 0.7) = 2 refine steps
    # The steps the run made: 3 of stage 1 and 2 of stage 2, each timed, in the summary and the JSON.
    times = summary["step_times_s"]
    assert len(times) == 5 and all(t > 0 for t in times)
    assert summary["time_per_step_s"] == pytest.approx(float(np.median(times)))
    assert summary["denoise_s"] == pytest.approx(sum(times))
    assert "denoise" in stdout and "(5 steps, " in stdout
    # The window ran at the block every vidsparse path picks for 12-token frames (16, not 128), and the
    # summary's figures are at that block: kept blocks per self-attention call never exceed the grid.
    assert fs["dual_path"]["window_block_size"] == 16 and fs["dual_path"]["window_backend"] == "torch"
    assert summary["kept_blocks"] <= 1.0 and "% of the block grid" in stdout
    assert fs["window_work"] == pytest.approx(32 * 32 / (24 * 24))  # 2 tiles of 16 for 24 tokens
    assert [s["grid"] for s in fs["stages"]] == [[2, 2, 2], [2, 4, 3]]
    # cache every 2: the full branch in the conditional pass of refine step 0 only; 2 steps x 2 passes.
    assert fs["dual_path"]["full_branch_forwards"] == 1 and fs["dual_path"]["cached_forwards"] == 1
    assert summary["video_shape"] == [5, 64, 48, 3] and summary["pattern"] == "freeswim"
    # Stage-2 work: 4 forwards of the window, plus one dense full branch.
    assert fs["stage2_work"] == pytest.approx((4 * fs["window_work"] + 1) / 4)
    (window,) = summary["densities"]
    assert window["path"] == "query_tile" and window["work"] == pytest.approx(fs["window_work"])
    # Blocks: 4 window calls at the window's density + 1 dense full-branch call, per call.
    assert summary["kept_blocks"] == pytest.approx((4 * window["block_density"] + 1) / 5)


def test_base_size_is_printed_in_its_own_order():
    opts = dict(model="tiny-random", frames=5, height=64, width=96, steps=2, progress=False, backend="torch")
    result = generate(GenerateOptions(**opts, freeswim={"base_height": 32, "base_width": 48, "strength": 0.5}))
    assert result.freeswim.base_size == (32, 48) and result.freeswim.target_size == (64, 96)
    text = format_summary(result)
    assert "base 48x32 px (WxH; --base-size 32x48, HxW) -> target 96x64 px (WxH)" in text
    assert "stage 1 (base): 48x32 px (WxH)" in text and "window 3x3 tokens (HxW)" in text


def test_compare_dense_runs_dense_at_the_target_size():
    opts = GenerateOptions(model="tiny-random", frames=5, height=48, width=48, steps=2, progress=False)
    result = generate(GenerateOptions(**{**opts.__dict__, "freeswim": {"strength": 0.5}, "compare_dense": True}))
    dense = result.dense
    assert result.frames.shape == dense.frames.shape == (5, 48, 48, 3)
    assert dense.psnr_db == pytest.approx(video_io.psnr(result.frames, dense.frames))
    assert dense.speedup == pytest.approx(dense.call_s / result.freeswim.seconds)
    # Same seed and prompt, dense attention at the target size: what a plain generate gives.
    plain = generate(GenerateOptions(**{**opts.__dict__, "pattern": "dense"}))
    assert np.array_equal(plain.frames, dense.frames)
    text = format_summary(result)
    assert "PSNR" in text and "speedup" in text and "stage 2 (refine): 48x48" in text


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--height", "16"], "smaller than the base"),
        (["--base-size", "48x48", "--height", "32"], "smaller than the base"),
        (["--base-size", "40x32"], "base_height=40 px: the Wan VAE and patchify need multiples of 16 px"),
        (["--height", "56"], "height=56: must be a multiple of 16"),
        (["--base-size", "32"], "--base-size expects HEIGHTxWIDTH"),
        (["--model", "tiny-ltx2"], "LTX2Pipeline (ltx2): the dual path is built for WanTransformer3DModel"),
        (["--model", "tiny-hunyuan15"], "no cross-attention for the dual path to override"),
        (["--cache-interval", "0"], "--cache-interval must be >= 1"),
        (["--strength", "0.1"], "0 refinement steps"),
        (["--freeswim-scale", "-1"], "--freeswim-scale expects a number > 0"),
        (["--pattern", "tile"], "drop --pattern"),
        (["--pattern", "radial"], "drop --pattern"),  # the flag's default, given explicitly
        (["--base-size", "48x32", "--height", "32"], "target 32x48 px (HxW) is smaller than the base 48x32 px (HxW"),
        (["--dense-layers", "0"], "--dense-layers does not apply to --freeswim"),
        (["--parallel", "clip"], "drop --parallel"),
    ],
)
def test_bad_input_is_one_line_before_any_weights_load(argv, message, tmp_path, monkeypatch, capsys):
    import vidsparse.generation.run as gen

    def no_loading(*args, **kwargs):
        raise AssertionError("the model must not be loaded for invalid input")

    monkeypatch.setattr(gen, "load_pipeline", no_loading)
    monkeypatch.chdir(tmp_path)
    assert main(["generate", *FS, *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_pattern_given_tells_an_explicit_default_from_none():
    import argparse

    from vidsparse.generate_cli import add_arguments, options_from_args, pattern_given

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    fs = ["--freeswim", "--frames", "5", "--height", "64", "--width", "48"]
    assert not pattern_given(parser.parse_args(fs))
    assert pattern_given(parser.parse_args([*fs, "--pattern", "radial"]))
    assert options_from_args(parser.parse_args(fs)).freeswim is not None  # no --pattern: runs
    assert options_from_args(parser.parse_args([*fs, "--pattern", "freeswim"])).pattern == "freeswim"
    assert options_from_args(parser.parse_args(["--pattern", "radial"])).pattern == "radial"  # without --freeswim


def test_freeswim_flags_without_freeswim_are_refused(capsys):
    assert main(["generate", "--model", "tiny-random", "--base-size", "32x32"]) == 2
    assert "--base-size applies to --freeswim" in capsys.readouterr().err
    # every FreeSwim flag, not only those without a default (they would be silently ignored)
    assert main(["generate", "--model", "tiny-random", "--strength", "0.5", "--flow-shift", "3"]) == 2
    assert "--strength, --flow-shift apply to --freeswim" in capsys.readouterr().err


def test_library_options_owned_by_generate_are_refused():
    with pytest.raises(ValueError, match=r"set it as GenerateOptions.height"):
        generate(GenerateOptions(model="tiny-random", freeswim={"height": 64}))
    with pytest.raises(ValueError, match="unknown option 'bogus'"):
        generate(GenerateOptions(model="tiny-random", freeswim={"bogus": 1}))


def test_family_default_base_grid_is_the_native_video_grid():
    wan = get_family("wan")
    # Wan's geometry default video 81x480x832 -> latent (30, 52) after the 8x VAE and 2x2 patch.
    for grid in ((21, 68, 120), (3, 6, 10)):
        assert wan.pattern_options("freeswim", VideoLayout(*grid), 128) == {"base_grid": (30, 52)}
    hd = VideoGeometry("wan-720p", 4, 8, (1, 2, 2), (81, 720, 1280))
    assert native_window_defaults(hd)(VideoLayout(21, 68, 120), False) == {"base_grid": (45, 80)}


def test_freeswim_by_name_runs_with_the_family_base_grid():
    # The tiny grid (3x2x3 tokens) is smaller than the base: the window covers every axis, i.e. dense.
    opts = dict(model="tiny-random", frames=9, height=32, width=48, steps=2, dense_first_steps=0, progress=False)
    result = generate(GenerateOptions(pattern="freeswim", **opts))
    (group,) = result.densities
    assert "base_grid=(30, 52)" in group.pattern and group.token_density == pytest.approx(1.0)
