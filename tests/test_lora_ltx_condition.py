"""LTX-Video condition-pipeline LoRA (``LTXConditionPipeline``): an image or a video prefix at frame 0, strength 1.

The tiny ``LTXConditionPipeline`` of the family record (``tiny-ltx-condition``; its VAE has
``scaling_factor`` 1.3, so the pipeline's condition normalisation, which passes none, differs from
the clip's and a mix-up shows). Oracle: the real pipeline's ``__call__`` with the condition as a
user passes it (``image=`` the clip's first frame, or ``video=`` its first 9 frames), its
transformer calls recorded. Checked, for both: the condition latents the trainer caches are what
``prepare_latents`` puts on the first latent frames (the VAE posterior's mode in place of its
sample, as the cache stores), re-noised as the pipeline does at every step (its own generator
draws replayed through ``training_inputs``), with timestep 0 on those tokens and the pipeline's
``video_coords``; an ideal model of the trained objective put into the real sampler carries the
other frames to the clip's latents; ``predict`` makes the pipeline's transformer call; the loss
leaves the condition frames out; then ``train-lora --model tiny-ltx-condition`` and ``generate``
with ``--image`` and with ``--condition-video`` end to end.
"""

import json

import pytest
import torch
from lora_checks import pipeline_calls, square_clip_8bit

from vidsparse.families.ltx import tiny_pipeline
from vidsparse.lora.adapters.base import first_frame_image
from vidsparse.lora.data import ClipSpec
from vidsparse.lora.models import adapter_for
from vidsparse.lora.train import collate_text

# LoRA training runs: outside the quick subset (pytest -m "not slow"), always in CI
pytestmark = pytest.mark.slow

SPEC = ClipSpec(25, 128, 128)  # 4 latent frames of 4 x 4 tokens
NOISE_SCALE = 0.15  # LTXConditionPipeline's default image_cond_noise_scale


@pytest.fixture(scope="module", params=[1, 9], ids=["image", "video-prefix"])
def ltx(request):
    pipe = tiny_pipeline(variant="ltx-condition")
    adapter = adapter_for(pipe, "tiny-ltx-condition")
    adapter.set_condition_frames(request.param)
    adapter.validate_clip(SPEC)
    clip = square_clip_8bit(SPEC)
    enc = adapter.encode_clip(clip)
    text = {**collate_text([adapter.encode_text("a red square")]), "condition_latents": enc["condition_latents"]}
    return pipe, adapter, clip, enc["latents"], text


@pytest.fixture
def posterior_mode(monkeypatch):
    """The pipeline samples the VAE posterior for the condition latents; the cache stores its mode (and then
    the pipeline's generator draws only the initial noise and each step's re-noising)."""
    import diffusers.pipelines.ltx.pipeline_ltx_condition as cond

    monkeypatch.setattr(cond, "retrieve_latents", lambda out, generator=None: out.latent_dist.mode())


def _condition_kwargs(adapter, clip):
    """The documented way: ``conditions=[LTXVideoCondition(...)]`` (a bare ``video=[frames...]`` is read as one
    condition per frame)."""
    from diffusers.pipelines.ltx.pipeline_ltx_condition import LTXVideoCondition

    frames = adapter.condition_images(clip[0])
    item = LTXVideoCondition(image=frames[0]) if len(frames) == 1 else LTXVideoCondition(video=frames)
    return dict(conditions=[item])


def _run(pipe, adapter, clip, text, output=None, steps=3, seed=0):
    """The real pipeline; ``output(call_index, hidden_states)`` replaces the transformer's output."""
    return pipeline_calls(pipe.transformer, lambda: pipe(
        **_condition_kwargs(adapter, clip), prompt_embeds=text["prompt_embeds"],
        prompt_attention_mask=text["prompt_attention_mask"], num_frames=SPEC.num_frames, height=SPEC.height,
        width=SPEC.width, num_inference_steps=steps, guidance_scale=1.0, image_cond_noise_scale=NOISE_SCALE,
        generator=torch.Generator().manual_seed(seed), output_type="latent", return_dict=False,
    )[0], None if output is None else lambda i, kwargs: output(i, kwargs["hidden_states"]))  # fmt: skip


def _unpack(pipe, tokens, like):
    return pipe._unpack_latents(tokens, *like.shape[2:], 1, 1)


def _pipeline_draws(x0, steps, seed=0):
    """The pipeline generator's draws: the initial noise, then one re-noising per step (packed [1, S, C])."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(x0.shape, generator=g)
    return noise, [torch.randn(1, x0[0, 0].numel(), x0.shape[1], generator=g) for _ in range(steps)]


def test_condition_is_the_pipelines_and_training_inputs_are_its_latents(ltx, posterior_mode):
    pipe, adapter, clip, x0, text = ltx
    c = text["condition_latents"]
    n = c.shape[2]
    assert n == (adapter.condition_frames - 1) // 8 + 1 and c.shape[3:] == x0.shape[3:]
    steps = 3
    _, calls = _run(pipe, adapter, clip, text, steps=steps)
    noise, renoise = _pipeline_draws(x0, steps)
    per_frame = x0.shape[3] * x0.shape[4]
    coords = adapter.video_coords(x0)
    for i, call in enumerate(calls):
        t = call["timestep"]
        assert t.shape == (1, x0[0, 0].numel()) and bool((t[:, : n * per_frame] == 0).all())
        assert bool((t[:, n * per_frame :] == t[0, -1]).all()) and float(t[0, -1]) > 0
        s = float(t[0, -1]) / 1000
        torch.testing.assert_close(call["video_coords"], coords, rtol=0, atol=0)
        assert call.get("num_frames") is None and call.get("rope_interpolation_scale") is None
        hidden = _unpack(pipe, call["hidden_states"], x0)
        # the trainer's input at this noise level, with the pipeline's own draws as its noise
        eps = torch.cat([_unpack(pipe, renoise[i], x0)[:, :, :n], noise[:, :, n:]], dim=2)
        if i == 0:  # at s = 1 the other frames are the initial noise itself
            assert s == 1.0
            torch.testing.assert_close(hidden[:, :, n:], noise[:, :, n:], rtol=0, atol=0)
        built, _, _ = adapter.training_inputs(x0, eps, torch.tensor([s]), text)
        torch.testing.assert_close(hidden[:, :, :n], built[:, :, :n], rtol=1e-5, atol=1e-6)
        assert float((hidden[:, :, :n] - c).abs().max()) > 0  # re-noised, by 0.15 s^2 eps
    # the pipeline normalises the condition without the VAE's scaling_factor (1.3 here): not the clip's frames
    pixels = torch.stack([clip[0, :, : adapter.condition_frames]])
    with torch.no_grad():
        z = pipe.vae.encode(pixels).latent_dist.mode()
    mean, std = (v.view(1, -1, 1, 1, 1) for v in (pipe.vae.latents_mean, pipe.vae.latents_std))
    torch.testing.assert_close(c, (z - mean) / std, rtol=1e-5, atol=1e-5)
    # RoPE: LTXPipeline's latent frame f is at 8 f, the condition pipeline's at max(8 f - 7, 0) (over frame_rate)
    frames = coords[0, 0].view(x0.shape[2:])[:, 0, 0] * adapter.frame_rate
    torch.testing.assert_close(frames, torch.tensor([0.0, 1.0, 9.0, 17.0]), rtol=0, atol=1e-5)
    # the sparse patterns read the latent grid from these coordinates (the call has no num_frames)
    from vidsparse.families.ltx import grid_from_coords

    assert grid_from_coords(coords[0], x0[0, 0].numel()) == tuple(x0.shape[2:])


def test_ideal_model_reaches_the_clip_and_predict_is_the_pipelines_call(ltx, posterior_mode):
    pipe, adapter, clip, x0, text = ltx
    n = text["condition_latents"].shape[2]
    noise, _ = _pipeline_draws(x0, 3)
    final, calls = _run(pipe, adapter, clip, text, output=lambda i, hidden: pipe._pack_latents(noise - x0))
    torch.testing.assert_close(final[:, :, n:], x0[:, :, n:], rtol=0, atol=2e-4)  # (returned unpacked)
    last = _unpack(pipe, calls[-1]["hidden_states"], x0)
    torch.testing.assert_close(final[:, :, :n], last[:, :, :n], rtol=0, atol=0)  # never stepped
    seen = []
    handle = pipe.transformer.register_forward_hook(lambda m, a, kw, o: seen.append(kw), with_kwargs=True)
    d = (noise - x0)[:, :, n:]
    try:
        for call in calls:
            hidden = _unpack(pipe, call["hidden_states"], x0).float()
            s = float(call["timestep"][0, -1]) / 1000
            torch.testing.assert_close(hidden[:, :, n:], x0[:, :, n:] + s * d, rtol=0, atol=2e-4)  # on the path
            with torch.no_grad():
                adapter.predict(pipe.transformer, hidden, adapter.transformer_timestep(torch.tensor([s])), text)
            got = seen[-1]
            torch.testing.assert_close(got["hidden_states"], call["hidden_states"], rtol=0, atol=1e-6)
            torch.testing.assert_close(got["timestep"].float(), call["timestep"].float(), rtol=0, atol=0.05)
            torch.testing.assert_close(got["video_coords"], call["video_coords"], rtol=0, atol=0)
            torch.testing.assert_close(got["encoder_attention_mask"].bool(), call["encoder_attention_mask"].bool())
    finally:
        handle.remove()
    pred = torch.zeros_like(x0)
    pred[:, :, :n] = 3.0  # the condition frames are not trained
    assert float(adapter.loss(pred, torch.zeros_like(x0), text)) == 0.0
    pred[:, :, n:] = 1.0
    assert float(adapter.loss(pred, torch.zeros_like(x0), text)) == 1.0


def test_condition_frames_are_checked():
    pipe = tiny_pipeline(variant="ltx-condition")
    adapter = adapter_for(pipe, "tiny-ltx-condition")
    with pytest.raises(ValueError, match=r"1 \(the first frame as an image\) or 8k \+ 1.*got 5; e\.g\. 1 or 9"):
        adapter.set_condition_frames(5)
    adapter.set_condition_frames(17)
    with pytest.raises(ValueError, match="covers all 3 latent frames of a 17-frame clip"):
        adapter.validate_clip(ClipSpec(17, 64, 64))
    with pytest.raises(ValueError, match="takes no conditioning video; it is for LTXConditionPipeline"):
        adapter_for(tiny_pipeline(variant="ltx-i2v"), "tiny-ltx-i2v").set_condition_frames(9)
    from vidsparse.lora.models import check_condition_frames

    with pytest.raises(ValueError, match="tiny-ltx is a LTXPipeline, which takes no conditioning video"):
        check_condition_frames("tiny-ltx", 9)
    check_condition_frames("tiny-ltx-condition", 9)


def test_a_refused_condition_frame_count_leaves_no_output_folder(tmp_path, capsys):
    from test_lora_data import make_dataset

    from vidsparse.cli import main

    out = tmp_path / "out"
    rc = main(["train-lora", "--model", "tiny-ltx-condition", "--data-dir", str(make_dataset(tmp_path / "data")),
               "--output-dir", str(out), "--num-frames", "17", "--height", "64", "--width", "64",
               "--condition-frames", "5", "--max-train-steps", "1", "--no-progress"])  # fmt: skip
    assert rc == 2 and "--condition-frames" in capsys.readouterr().err
    assert not out.exists()


def test_train_then_generate_end_to_end(tmp_path, monkeypatch):
    from diffusers import LTXConditionPipeline
    from test_lora_data import make_dataset

    from vidsparse.cli import main
    from vidsparse.generation import GenerateOptions, generate
    from vidsparse.video_io import write_video

    out = tmp_path / "out"
    rc = main(["train-lora", "--model", "tiny-ltx-condition", "--data-dir", str(make_dataset(tmp_path / "data")),
               "--output-dir", str(out), "--num-frames", "17", "--height", "64", "--width", "64",
               "--condition-frames", "9", "--rank", "4", "--max-train-steps", "2", "--mixed-precision", "no",
               "--pattern", "radial", "--attention-backend", "torch", "--no-progress"])  # fmt: skip
    assert rc in (0, None)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(r["loss"] > 0 for r in rows)
    clip = square_clip_8bit(ClipSpec(17, 64, 64))[0]
    first_frame_image(clip).save(tmp_path / "first.png")
    frames = ((clip[:, :9].permute(1, 2, 3, 0) + 1) * 127.5).round().to(torch.uint8).numpy()
    write_video(tmp_path / "prefix.gif", frames, fps=8)  # lossless 8-bit frames
    common = dict(model="tiny-ltx-condition", lora=str(out), frames=17, height=64, width=64, steps=2, backend="torch",
                  progress=False)  # fmt: skip
    seen = []  # the condition pixels generate hands the pipeline (prepare_latents' conditions)
    prepare = LTXConditionPipeline.prepare_latents

    def record(self, conditions=None, *args, **kwargs):
        seen.append([c.detach().clone() for c in conditions])
        return prepare(self, conditions, *args, **kwargs)

    monkeypatch.setattr(LTXConditionPipeline, "prepare_latents", record)
    for condition, frames in ((dict(image=str(tmp_path / "first.png")), 1),
                              (dict(condition_video=str(tmp_path / "prefix.gif")), 9)):  # fmt: skip
        res = generate(GenerateOptions(**common, **condition))
        assert res.frames.shape[:3] == (17, 64, 64)
        (pixels,) = seen[-1]
        torch.testing.assert_close(pixels[0].float(), clip[:, :frames], rtol=0, atol=1e-6)
    video = tmp_path / "v.gif"
    rc = main(["generate", "--model", "tiny-ltx-condition", "--lora", str(out), "--condition-video",
               str(tmp_path / "prefix.gif"), "--frames", "17", "--height", "64", "--width", "64", "--steps", "2",
               "--pattern", "radial", "--backend", "torch", "--out", str(video)])  # fmt: skip
    assert rc in (0, None) and video.is_file() and video.stat().st_size > 0
    with pytest.raises(
        ValueError, match="--condition-video conditions LTXConditionPipeline, .*which takes no conditioning video"
    ):
        generate(GenerateOptions(**{**common, "model": "tiny-ltx", "lora": None},
                                 condition_video=str(tmp_path / "prefix.gif")))  # fmt: skip
    with pytest.raises(ValueError, match="pass one of them"):
        generate(GenerateOptions(**common, image=str(tmp_path / "first.png"),
                                 condition_video=str(tmp_path / "prefix.gif")))  # fmt: skip
    with pytest.raises(ValueError, match="cannot be read"):
        generate(GenerateOptions(**common, condition_video=str(tmp_path / "first.png.missing")))
