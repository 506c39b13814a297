"""`vidsparse generate --model tiny-hunyuan|tiny-ltx|tiny-mochi`: the real diffusers pipelines
(HunyuanVideoPipeline, LTXPipeline, MochiPipeline) built offline from the family records'
``tiny_pipeline``, prompts hashed by their ``tiny_prompt_kwargs``, run end to end through the CLI."""

import imageio.v2 as imageio
import numpy as np
import pytest
import torch

from vidsparse.cli import main
from vidsparse.families import get_family
from vidsparse.generation import resolve_model

# (frames, height, width) valid for each VAE (HunyuanVideo 4x/8x and Mochi 6x/8x with a 2x2 patch:
# multiples of 16 px; LTX-Video 8x/32x with patch 1: multiples of 32 px) and the latent grid
SIZES = {"hunyuan": (5, 32, 48), "ltx": (9, 64, 96), "mochi": (7, 32, 48)}
PIPELINES = {"hunyuan": "HunyuanVideoPipeline", "ltx": "LTXPipeline", "mochi": "MochiPipeline"}


@pytest.mark.parametrize("family", sorted(SIZES))
def test_generate_cli_runs_the_tiny_pipeline(family, tmp_path, capsys):
    frames, height, width = SIZES[family]
    out = tmp_path / f"{family}.mp4"
    argv = ["generate", "--model", f"tiny-{family}", "--pattern", "radial", "--steps", "2", "--frames", str(frames),
            "--height", str(height), "--width", str(width), "--dense-first-steps", "0", "--backend", "torch",
            "--no-progress", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    stdout = capsys.readouterr().out
    assert f"tiny-{family} ({family})" in stdout and "Radial(" in stdout and str(out) in stdout
    video = np.stack(imageio.mimread(out))
    assert video.shape == (frames, height, width, 3) and video.dtype == np.uint8
    assert video.std() > 0  # a decoded video, not a constant frame


@pytest.mark.parametrize("family", sorted(SIZES))
def test_tiny_pipeline_is_the_real_class_and_prompts_are_hashed(family):
    fam = get_family(family)
    pipe = fam.tiny_pipeline(seed=0)
    assert type(pipe).__name__ == PIPELINES[family] and pipe.text_encoder is None
    assert fam.matches(pipe.transformer)
    a = fam.tiny_prompt_kwargs(pipe, "a red ball", "blurry")
    b = fam.tiny_prompt_kwargs(pipe, "a red ball", "blurry")
    c = fam.tiny_prompt_kwargs(pipe, "a blue cube rolls away", "")
    assert a.keys() == c.keys() and {"negative_prompt_embeds", "negative_prompt_attention_mask"} <= a.keys()
    assert ("pooled_prompt_embeds" in a) == ("negative_pooled_prompt_embeds" in a) == (family == "hunyuan")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    assert not torch.equal(a["prompt_embeds"], c["prompt_embeds"])
    assert not torch.equal(a["prompt_embeds"], a["negative_prompt_embeds"])
    assert a["prompt_attention_mask"].sum().item() == 4 and c["negative_prompt_attention_mask"].sum().item() == 1
    # the embeddings fit the pipeline: two denoising steps (LTX's shift_terminal needs 2) with CFG on
    frames, height, width = SIZES[family]
    kw = dict(num_frames=frames, height=height, width=width, num_inference_steps=2, output_type="latent")
    if family == "hunyuan":
        kw["true_cfg_scale"] = 2.0
    else:
        kw["guidance_scale"] = 3.0
    latents = pipe(**kw, **a, generator=torch.Generator().manual_seed(0)).frames
    assert torch.isfinite(latents).all()


def test_tiny_defaults_are_small_and_help_lists_the_names(capsys, monkeypatch):
    for family in SIZES:
        info = resolve_model(f"tiny-{family}")
        assert info.pipeline_class == PIPELINES[family]
        frames, height, width = (info.defaults[k] for k in ("frames", "height", "width"))
        assert info.grid.latent_grid(frames, height, width) == (3, 6, 10)  # 180 tokens
    monkeypatch.setenv("COLUMNS", "1000")  # argparse would wrap the list at its hyphens
    assert main(["generate", "--help"]) == 0
    help_text = capsys.readouterr().out
    for family in SIZES:
        assert f"tiny-{family}," in help_text
