"""run_freeswim on the tiny Wan pipeline (offline), validation before any work, the CLI-args helper."""

import argparse

import numpy as np
import pytest
import torch

from vidsparse import video_io
from vidsparse.freeswim import FreeSwimOptions, native_size, run_freeswim, scheduler_with_shift, upsample_frames
from vidsparse.freeswim.cli_args import (
    add_freeswim_arguments,
    freeswim_options_from_args,
    parse_bytes,
    parse_size,
)
from vidsparse.models.tiny import build_tiny_pipeline, encode_prompt_tiny, tiny_transformer

OPTS = dict(height=64, width=48, num_frames=5, base_height=32, base_width=32, num_inference_steps=3, backend="torch")


def _embeds():
    return dict(prompt_embeds=encode_prompt_tiny("a tiny cat"), negative_prompt_embeds=encode_prompt_tiny(""))


class _CallCounter:
    """Counts forwards of the pipeline's transformer and VAE (no work may start on bad input)."""

    def __init__(self, pipe):
        self.calls = 0
        self.handles = [m.register_forward_pre_hook(self._count) for m in (pipe.transformer, pipe.vae)]

    def _count(self, *args):
        self.calls += 1

    def close(self):
        for h in self.handles:
            h.remove()


@pytest.mark.slow
def test_two_stage_on_tiny_writes_a_video_of_the_target_size(tmp_path):
    pipe = build_tiny_pipeline()
    shift_before = pipe.scheduler.config.shift
    seen = []
    result = run_freeswim(pipe, FreeSwimOptions(**OPTS), **_embeds(), progress=seen.append)
    assert result.frames.shape == (1, 5, 64, 48, 3)  # target size, np frames
    assert tuple(result.base_frames.shape) == (1, 5, 3, 32, 32)  # stage 1 at the base size
    assert [(p.stage, p.step, p.total) for p in seen] == [
        ("base", 1, 3), ("base", 2, 3), ("base", 3, 3), ("refine", 1, 2), ("refine", 2, 2),
    ]  # fmt: skip
    base, refine = result.stages
    assert (base.height, base.width, base.steps, base.latent_grid) == (32, 32, 3, (2, 2, 2))
    assert (refine.height, refine.width, refine.steps, refine.latent_grid) == (64, 48, 2, (2, 4, 3))
    report = result.dual_path  # 2 refine steps, cache every 2: full branch at step 0, cached at 1
    assert report.full_branch_steps("cond") == [0] and [s for s, _ in report.reuse] == [1]
    assert [s for s, b in report.window if b == "uncond"] == [0, 1]
    assert "stage 2 (refine): 48x64 px (WxH), 5 frames (2x4x3 tokens, FxHxW)" in result.describe()
    assert "FreeSwim window 3x3 tokens (HxW)" in result.describe()
    # The pipeline is left as it was: its processors, its scheduler.
    assert all(type(p).__name__ == "WanAttnProcessor" for p in pipe.transformer.attn_processors.values())
    assert pipe.scheduler.config.shift == shift_before
    out = video_io.write_video(tmp_path / "freeswim.gif", result.frames[0], fps=8)
    assert out.exists() and out.stat().st_size > 0


def test_upsample_is_bilinear_per_frame():
    video = torch.rand(1, 2, 3, 4, 4)
    up = upsample_frames(video, 8, 12)
    assert up.shape == (1, 2, 3, 8, 12)
    ref = torch.nn.functional.interpolate(video[0], size=(8, 12), mode="bilinear", align_corners=False)
    assert torch.equal(up[0], ref.clamp(0, 1))


@pytest.mark.parametrize(
    "changes,match",
    [
        (dict(height=16, width=48), "smaller than the base"),
        (dict(height=56), "multiples of 16 px"),
        (dict(base_width=40), "multiples of 16 px"),
        (dict(num_frames=6), r"1 \+ 4k frames"),
        (dict(strength=0.0), r"strength must be in \(0, 1\]"),
        (dict(strength=0.2), "0 refinement steps"),
        (dict(cache_interval=0), "cache_interval must be an int >= 1"),
        (dict(base_width=None), "Pass both base_height and base_width .* got base_height=32, base_width=None"),
        (dict(flow_shift=-1.0), "flow_shift must be a number > 0"),
    ],
)
def test_bad_inputs_fail_before_any_work(changes, match):
    pipe = build_tiny_pipeline()
    counter = _CallCounter(pipe)
    with pytest.raises(ValueError, match=match):
        run_freeswim(pipe, FreeSwimOptions(**{**OPTS, **changes}), **_embeds())
    counter.close()
    assert counter.calls == 0


def test_pipelines_freeswim_cannot_run():
    class NoCrossAttention:  # e.g. a HunyuanVideo pipeline: text inside self-attention
        components: dict = {}
        transformer = tiny_transformer("hunyuan")

    with pytest.raises(ValueError, match="attends text jointly inside self-attention"):
        run_freeswim(NoCrossAttention(), FreeSwimOptions(**OPTS), **_embeds())
    two = build_tiny_pipeline(two_stage=True)
    with pytest.raises(ValueError, match="transformer_2"):
        run_freeswim(two, FreeSwimOptions(**OPTS), **_embeds())
    pipe = build_tiny_pipeline()
    with pytest.raises(ValueError, match="no text encoder"):
        run_freeswim(pipe, FreeSwimOptions(**OPTS), prompt="a cat")
    with pytest.raises(TypeError, match="FreeSwimOptions"):
        run_freeswim(pipe, dict(OPTS), **_embeds())


def test_native_size_and_scheduler_shift():
    assert native_size(tiny_transformer("wan")) == (32, 32)
    with pytest.raises(ValueError, match="native size"):
        native_size(tiny_transformer("wan", num_layers=3))
    pipe = build_tiny_pipeline()
    shifted = scheduler_with_shift(pipe.scheduler, 9.0)
    assert shifted is not pipe.scheduler and shifted.config.shift == 9.0 and pipe.scheduler.config.shift == 3.0
    from diffusers import DDIMScheduler, UniPCMultistepScheduler

    unipc = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    shifted = scheduler_with_shift(unipc, 9.0)
    shifted.set_timesteps(10)
    unipc.set_timesteps(10)
    assert shifted.config.flow_shift == 9.0 and not np.allclose(shifted.sigmas.numpy(), unipc.sigmas.numpy())
    with pytest.raises(ValueError, match="flow-matching scheduler"):
        scheduler_with_shift(DDIMScheduler(), 9.0)


def _parse(argv):
    parser = argparse.ArgumentParser()
    add_freeswim_arguments(parser)
    return parser.parse_args(argv)


def test_cli_args_translate_into_options():
    args = _parse(["--freeswim", "--base-size", "480x832", "--strength", "0.6", "--cache-interval", "3",
                   "--cache-budget", "8GB", "--freeswim-scale", "default"])  # fmt: skip
    assert args.freeswim
    o = freeswim_options_from_args(
        args, height=1088, width=1920, num_frames=81, num_inference_steps=50, guidance_scale=5.0, seed=1
    )
    assert (o.base_height, o.base_width, o.height, o.width) == (480, 832, 1088, 1920)
    assert (o.strength, o.cache_interval, o.cache_budget_bytes, o.attention_scale) == (0.6, 3, 8 * 10**9, "default")
    d = freeswim_options_from_args(
        _parse([]), height=1088, width=1920, num_frames=81, num_inference_steps=50, guidance_scale=5.0, seed=None
    )
    assert (d.base_height, d.strength, d.cache_interval, d.flow_shift, d.attention_scale) == (
        None, 0.7, 2, 9.0, "freeswim",
    )  # fmt: skip
    assert parse_size("720X1280") == (720, 1280) and parse_bytes("512MiB") == 512 * 2**20
    for argv, match in (
        (["--base-size", "480"], "HEIGHTxWIDTH"),
        (["--cache-budget", "lots"], "8GB"),
        (["--freeswim-scale", "big"], "--freeswim-scale"),
        (["--cache-interval", "0"], "--cache-interval must be >= 1"),
    ):
        with pytest.raises(ValueError, match=match):
            freeswim_options_from_args(
                _parse(argv), height=64, width=64, num_frames=5, num_inference_steps=3, guidance_scale=5.0, seed=0
            )


def test_size_checks_run_without_a_pipeline():
    """What a CLI checks before loading any weights (Wan: 16 px per token, 4 frames per latent)."""
    from vidsparse.freeswim import check_freeswim_sizes

    assert check_freeswim_sizes(FreeSwimOptions(height=1088, width=1920), (480, 832)) == 35
    # Both sizes in --base-size's H x W order, said so, with the axis that is too small.
    with pytest.raises(ValueError, match=r"target 720x1280 px \(HxW\) is smaller than the base 720x1920 px \(HxW"):
        check_freeswim_sizes(FreeSwimOptions(height=720, width=1280), (720, 1920))
    with pytest.raises(ValueError, match="in width 1280 < 1920;"):
        check_freeswim_sizes(FreeSwimOptions(height=720, width=1280), (720, 1920))
    with pytest.raises(ValueError, match="multiples of 16 px; use 1072 or 1088"):
        check_freeswim_sizes(FreeSwimOptions(height=1080, width=1920), (480, 832))
