"""`vidsparse generate` on Wan-Animate (``WanAnimatePipeline``, ``--model tiny-wan-animate``).

Oracle: diffusers' own ``WanAnimatePipeline.__call__`` on the same tiny pipeline with the same
inputs (``generate`` must make that call: dense is bit-identical to it, also with vidsparse applied
and every step dense), and the single-process ``generate`` for ``--parallel clip|ulysses`` at 2 gloo
ranks. The pose video has 13 frames and --frames (the segment length) is 9, so the pipeline runs two
segments, the second starting from the decoded last frame of the first.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import os
from pathlib import Path
from typing import Any

import imageio.v2 as imageio
import numpy as np
import pytest
import torch
from PIL import Image

from vidsparse.cli import main
from vidsparse.families import family_of, get_family
from vidsparse.generation import GenerateOptions, generate, resolve_model, tiny_models
from vidsparse.parallel import check_results, spawn
from vidsparse.video_io import as_uint8_frames, read_frames

pytestmark = pytest.mark.filterwarnings("ignore:.*CLIPImageProcessor.*")

MODEL = "tiny-wan-animate"
H, W = 96, 160  # the tiny default: 6x10 tokens per latent frame
POSE_FRAMES = 13  # two segments of 9 frames overlapping by 1 (the pipeline pads the pose video to 17)
FACE = 16  # the tiny motion encoder's size


def _video(path: Path, frames: int, height: int, width: int, seed: int) -> str:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, (height, width, 3))
    clip = [np.clip(base + 12 * t, 0, 255).astype(np.uint8) for t in range(frames)]  # a moving ramp
    imageio.mimwrite(path, clip, duration=0.1, loop=0)
    return str(path)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("animate")
    rng = np.random.default_rng(7)
    Image.fromarray(rng.integers(0, 255, (H, W, 3), dtype=np.uint8)).save(d / "ref.png")
    # white (generated) right of a moving edge: distinct frames (a GIF writer merges equal ones)
    x = np.arange(W)[None, :, None]
    mask = [np.broadcast_to(255 * (x >= W // 2 + 4 * t), (H, W, 3)).astype(np.uint8) for t in range(POSE_FRAMES)]
    imageio.mimwrite(d / "mask.gif", mask, duration=0.1, loop=0)
    return dict(
        image=str(d / "ref.png"),
        pose=_video(d / "pose.gif", POSE_FRAMES, H, W, 1),
        face=_video(d / "face.gif", POSE_FRAMES, FACE, FACE, 2),
        background=_video(d / "bg.gif", POSE_FRAMES, H, W, 3),
        mask=str(d / "mask.gif"),
        short=_video(d / "one.gif", 1, H, W, 4),
        dir=str(d),
    )


def _argv(inputs: dict[str, str], *extra: str) -> list[str]:
    return ["generate", "--model", MODEL, "--image", inputs["image"], "--pose-video", inputs["pose"],
            "--face-video", inputs["face"], "--steps", "2", "--backend", "torch", "--device", "cpu",
            "--no-progress", *extra]  # fmt: skip


def _options(inputs: dict[str, str], mode: str = "animate", **kw: Any) -> GenerateOptions:
    extra = dict(background_video=inputs["background"], mask_video=inputs["mask"]) if mode == "replace" else {}
    return GenerateOptions(model=MODEL, image=inputs["image"], pose_video=inputs["pose"], face_video=inputs["face"],
                           animate_mode=mode, steps=2, backend="torch", device="cpu", progress=False, out=None,
                           **extra, **kw)  # fmt: skip


def _pipeline_call(inputs: dict[str, str], mode: str, guidance: float) -> np.ndarray:
    """diffusers' WanAnimatePipeline.__call__ on the tiny pipeline, written out here (no vidsparse)."""
    family = get_family("wan-animate")
    pipe = family.tiny_pipeline(seed=0)
    kw: dict[str, Any] = dict(image=Image.open(inputs["image"]).convert("RGB"), pose_video=read_frames(inputs["pose"]),
                              face_video=read_frames(inputs["face"]), mode=mode, height=H, width=W,
                              segment_frame_length=9, num_inference_steps=2, guidance_scale=guidance,
                              generator=torch.Generator().manual_seed(0), output_type="np")  # fmt: skip
    if mode == "replace":
        kw.update(background_video=read_frames(inputs["background"]), mask_video=read_frames(inputs["mask"]))
    kw.update(family.tiny_prompt_kwargs(pipe, GenerateOptions.prompt, ""))
    with torch.no_grad():
        return as_uint8_frames(pipe(**kw).frames[0])


def test_tiny_wan_animate_is_the_real_pipeline_and_listed():
    assert MODEL in tiny_models()
    info = resolve_model(MODEL)
    assert info.pipeline_class == "WanAnimatePipeline" and info.defaults["frames"] == 9
    pipe = get_family("wan-animate").tiny_pipeline(seed=0)
    assert type(pipe).__name__ == "WanAnimatePipeline" and pipe.text_encoder is None
    assert type(pipe.image_encoder).__name__ == "CLIPVisionModel" and pipe.image_processor is not None
    assert family_of(pipe.transformer).name == "wan-animate"


def test_generate_cli_animates_in_two_segments_with_the_sparse_pattern(inputs, tmp_path, capsys):
    out, js = tmp_path / "a.mp4", tmp_path / "a.json"
    assert main(_argv(inputs, "--dense-first-steps", "0", "--out", str(out), "--json", str(js))) == 0
    stdout = capsys.readouterr().out
    assert "tiny-wan-animate (wan-animate)" in stdout and "2 steps in each of 2 segments" in stdout
    assert "token grid 4x6x10" in stdout  # the reference latent frame + 3 of the 9-frame segment
    summary = json.loads(js.read_text())
    assert summary["video_shape"] == [POSE_FRAMES, H, W, 3] and summary["segments"] == 2
    assert summary["grid"] == [4, 6, 10] and summary["fps"] == 30
    # Radial ran: layer 1 sparse (layer 0 is Wan's dense layer), in all 2 x 2 steps.
    sparse = [d for d in summary["densities"] if d["pattern"].startswith("Radial(")]
    assert sparse and sparse[0]["layers"] == [1] and sparse[0]["block_density"] < 1
    assert summary["sparse_steps"] == 4 and summary["kept_blocks"] < 1
    assert len(summary["step_times_s"]) == 4
    video = imageio.mimread(out)
    assert np.stack(video).shape == (POSE_FRAMES, H, W, 3)


@pytest.mark.parametrize("mode", ["animate", "replace"])
def test_dense_generate_is_the_pipelines_own_call_and_sparse_differs(inputs, mode):
    expected = _pipeline_call(inputs, mode, guidance=5.0)  # the tiny default guidance: CFG on
    dense = generate(_options(inputs, mode, pattern="dense"))
    assert dense.frames.shape == (POSE_FRAMES, H, W, 3) and dense.segments == 2
    assert np.array_equal(dense.frames, expected)
    # vidsparse applied, every step dense: the model's own attention, bit for bit.
    patched_dense = generate(_options(inputs, mode, dense_first_steps=2))
    assert patched_dense.sparse_steps == 0 and np.array_equal(patched_dense.frames, expected)
    sparse = generate(_options(inputs, mode, dense_first_steps=0, dense_layers=()))
    assert sparse.sparse_steps == 4 and not np.array_equal(sparse.frames, expected)
    if mode == "replace":  # the background and mask reached the pipeline
        assert not np.array_equal(expected, _pipeline_call(inputs, "animate", guidance=5.0))


def _fails(argv: list[str], capsys, monkeypatch) -> str:
    """Exit 2 with one error line, before any pipeline is built."""
    import vidsparse.generation.run as run

    def no_load(*a, **k):
        raise AssertionError("a pipeline was loaded")

    monkeypatch.setattr(run, "load_pipeline", no_load)
    assert main(argv) == 2
    return capsys.readouterr().err


def test_bad_input_is_refused_before_loading(inputs, capsys, monkeypatch, tmp_path):
    base = ["generate", "--model", MODEL, "--image", inputs["image"]]
    err = _fails(base + ["--pose-video", inputs["pose"]], capsys, monkeypatch)
    assert "is a WanAnimatePipeline" in err and "pass --face-video PATH" in err
    err = _fails(["generate", "--model", MODEL, "--pose-video", inputs["pose"], "--face-video", inputs["face"]],
                 capsys, monkeypatch)  # fmt: skip
    assert "pass --image PATH (the character to animate)" in err
    err = _fails(["generate", "--model", "tiny-random", "--pose-video", inputs["pose"]], capsys, monkeypatch)
    assert "--pose-video is an input of WanAnimatePipeline" in err and "is a WanPipeline" in err
    err = _fails(_argv(inputs, "--mask-video", inputs["mask"]), capsys, monkeypatch)
    assert "--mask-video applies to --animate-mode replace" in err
    err = _fails(_argv(inputs, "--animate-mode", "replace", "--mask-video", inputs["mask"]), capsys, monkeypatch)
    assert "pass --background-video PATH" in err
    err = _fails(_argv(inputs, "--frames", "10"), capsys, monkeypatch)
    assert "nearest valid: 9 or 13" in err
    err = _fails(_argv(inputs, "--frames", "1"), capsys, monkeypatch)
    assert "--frames is the segment length" in err
    short = ["generate", "--model", MODEL, "--image", inputs["image"], "--face-video", inputs["face"]]
    err = _fails(short + ["--pose-video", inputs["short"]], capsys, monkeypatch)
    assert "has 1 frame(s)" in err and "at least 2" in err
    err = _fails(_argv(inputs, "--face-video", inputs["short"]), capsys, monkeypatch)
    assert "--face-video has 1 frame" in err and "reflection" in err
    err = _fails(_argv(inputs, "--pose-video", str(tmp_path / "missing.mp4")), capsys, monkeypatch)
    assert "--pose-video: Video" in err and "cannot be read" in err


def test_vae_overlap_is_refused_for_wan_animate_under_parallel(inputs, capsys, monkeypatch):
    err = _fails(_argv(inputs, "--parallel", "clip", "--vae-overlap", "2"), capsys, monkeypatch)
    assert "--vae-overlap sets the per-clip decode" in err and "decodes whole on every rank" in err


def test_prepare_counts_the_pipelines_segments_and_warns_on_unaligned_videos(inputs, tmp_path):
    """``segment_count`` against the pipeline itself: its step callbacks over a 1-step run, per pose length."""
    from vidsparse.families.wan_animate import segment_count
    from vidsparse.generation import prepare

    family = get_family("wan-animate")
    pipe = family.tiny_pipeline(seed=0)
    image = Image.open(inputs["image"]).convert("RGB")
    pose, face = read_frames(inputs["pose"]), read_frames(inputs["face"])
    for frames in (2, 9, 10, 13):
        steps: list[int] = []
        with torch.no_grad():
            pipe(image=image, pose_video=pose[:frames], face_video=face[:frames], height=H, width=W,
                 segment_frame_length=5, num_inference_steps=1, guidance_scale=1.0, output_type="latent",
                 callback_on_step_end=lambda p, i, t, kw, seen=steps: seen.append(i) or kw,
                 **family.tiny_prompt_kwargs(pipe, "a", ""))  # fmt: skip
        assert len(steps) == segment_count(frames, 5), frames
    plan = prepare(_options(inputs))
    assert plan.grid == (4, 6, 10) and plan.animate.segments == 2 and plan.animate.frames == POSE_FRAMES
    nine = _video(tmp_path / "face9.gif", 9, FACE, FACE, 5)
    with pytest.warns(UserWarning, match="--face-video has 9 frames, the --pose-video 13: .*reflect-pads or cuts"):
        prepare(dataclasses.replace(_options(inputs), face_video=nine))


def test_a_wan_animate_folder_needs_its_videos_before_loading(tmp_path, capsys, monkeypatch):
    """A real checkpoint's folder: the pipeline's defaults (77-frame segments of 720x1280) and the same check."""
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "WanAnimatePipeline"}))
    assert resolve_model(str(tmp_path)).defaults == dict(frames=77, height=720, width=1280, steps=20, guidance=1.0)
    err = _fails(["generate", "--model", str(tmp_path), "--out", str(tmp_path / "v.mp4")], capsys, monkeypatch)
    assert "pass --pose-video PATH and --face-video PATH" in err
    assert not (tmp_path / "v.mp4").exists()


def test_help_documents_the_flags_and_what_frames_means(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "1000")
    assert main(["generate", "--help"]) == 0
    text = capsys.readouterr().out
    for flag in ("--pose-video", "--face-video", "--animate-mode", "--background-video", "--mask-video"):
        assert flag in text
    assert "Wan-Animate: the frames of one segment (segment_frame_length, 4k + 1; default 77, tiny 9)" in text
    assert "animate: the --image character performs the motion (default" in text
    assert "tiny-wan-animate" in text


# -- --parallel clip / ulysses at 2 ranks ---------------------------------------------------------


def parallel_suite(argv: list[str]) -> dict[str, Any]:
    """Rank side: the CLI's options (parsed from ``argv``) with --parallel clip and ulysses on every rank;
    rank 0 also runs them in one process. Returns the largest uint8 difference and the shapes."""
    torch.set_num_threads(1)
    from vidsparse import generate_cli
    from vidsparse.parallel import init_distributed

    rt = init_distributed(timeout_s=240)
    parser = argparse.ArgumentParser()
    generate_cli.add_arguments(parser)
    out: dict[str, Any] = {}
    real = os.sys.stdout
    for mode in ("clip", "ulysses"):
        options = generate_cli.options_from_args(parser.parse_args([*argv, "--parallel", mode]))
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            got = generate(options)
        os.sys.stdout = real  # generate_parallel silences the other ranks' stdout
        row: dict[str, Any] = {"shape": tuple(got.frames.shape), "segments": got.segments}
        if rt.rank == 0:
            single_options = generate_cli.options_from_args(parser.parse_args(argv))
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                single = generate(single_options)
            a, b = got.frames.astype(int), single.frames.astype(int)
            row.update(max_diff=int(abs(a - b).max()) if a.shape == b.shape else -1, single_shape=b.shape,
                       changed=int(abs(b - generate(replace_dense(single_options)).frames.astype(int)).max()))  # fmt: skip
        out[mode] = row
    return out


def replace_dense(options: GenerateOptions) -> GenerateOptions:
    return dataclasses.replace(options, pattern="dense", pattern_options={})


@pytest.mark.slow
def test_parallel_clip_and_ulysses_equal_the_single_process(inputs):
    """Two segments: every rank decodes the first whole (``replicated_decode``) so that all start the
    second from the same frame; the frames (uint8), not a GIF read back, are compared."""
    argv = _argv(inputs, "--pattern", "dual-scope", "--local-frames", "1", "--global-stride", "2",
                 "--dense-first-steps", "0")[1:]  # fmt: skip
    results = check_results(spawn(parallel_suite, 2, (argv,), timeout_s=600))
    for mode in ("clip", "ulysses"):
        row = results[0][mode]
        assert row["shape"] == row["single_shape"] == (POSE_FRAMES, H, W, 3) and row["segments"] == 2, row
        assert row["max_diff"] <= 1, (mode, row)
        assert row["changed"] > 1, row  # the sparse pattern changed the video: not a dense run compared
        assert results[1][mode]["shape"] == (POSE_FRAMES, H, W, 3)  # a placeholder of the video's shape


def test_output_plays_at_the_pose_videos_frame_rate(inputs, tmp_path):
    """Without --fps the video is written at the pose video's rate (the motion's own timing), with
    --fps at that; a pose video that declares none (this GIF) keeps the family's."""
    import imageio.v3 as iio

    from vidsparse.generation import prepare

    frames = [np.asarray(f) for f in read_frames(inputs["pose"])]
    pose12 = tmp_path / "pose12.mp4"
    iio.imwrite(pose12, np.stack(frames), fps=12, macro_block_size=1)
    assert prepare(dataclasses.replace(_options(inputs), pose_video=str(pose12))).fps == 12
    assert prepare(dataclasses.replace(_options(inputs), pose_video=str(pose12), fps=20)).fps == 20
    assert prepare(_options(inputs)).fps == get_family("wan-animate").geometry.fps
