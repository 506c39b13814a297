"""LTX-Video image-to-video LoRA (``LTXImageToVideoPipeline``): the clean first frame under the conditioning mask.

The tiny ``LTXImageToVideoPipeline`` of the family record (``tiny-ltx-i2v``; its VAE has
``scaling_factor`` 1.3, so the pipeline's image normalisation, which passes none, differs from the
clip's and a mix-up shows). Checked: the image latents the trainer caches are what the real
pipeline's ``prepare_latents`` puts on the first latent frame (with the VAE posterior's mode, which
the cache uses, in place of its sample), with timestep 0 on those tokens; an ideal model of the
trained objective put into the real sampler carries the other frames to the clip's latents while
the first stays the image's; ``predict`` makes the pipeline's transformer call; the loss leaves the
first frame out; then ``train-lora --model tiny-ltx-i2v`` and ``generate --image`` end to end.
"""

import pytest
import torch
from lora_checks import check_on_flow_path, generate_tiny, pipeline_calls, square_clip_8bit, train_tiny

from vidsparse.families.ltx import tiny_pipeline
from vidsparse.lora.adapters.base import first_frame_image
from vidsparse.lora.data import ClipSpec
from vidsparse.lora.models import adapter_for
from vidsparse.lora.train import collate_text

# LoRA training runs: outside the quick subset (pytest -m "not slow"), always in CI
pytestmark = pytest.mark.slow

SPEC = ClipSpec(17, 128, 128)  # 3 latent frames of 4 x 4 tokens


@pytest.fixture(scope="module")
def ltx():
    pipe = tiny_pipeline(variant="ltx-i2v")
    adapter = adapter_for(pipe, "tiny-ltx-i2v")
    adapter.validate_clip(SPEC)
    clip = square_clip_8bit(SPEC)
    enc = adapter.encode_clip(clip)
    text = {**collate_text([adapter.encode_text("a red square")]), "image_latents": enc["image_latents"]}
    return pipe, adapter, clip, enc["latents"], text


@pytest.fixture
def posterior_mode(monkeypatch):
    """The pipeline samples the VAE posterior for the image latents; the cache stores its mode."""
    import diffusers.pipelines.ltx.pipeline_ltx_image2video as i2v

    monkeypatch.setattr(i2v, "retrieve_latents", lambda out, generator=None: out.latent_dist.mode())


def _run(pipe, clip, text, latents=None, output=None, steps=3):
    return pipeline_calls(pipe.transformer, lambda: pipe(
        image=first_frame_image(clip[0]), prompt_embeds=text["prompt_embeds"],
        prompt_attention_mask=text["prompt_attention_mask"], num_frames=SPEC.num_frames, height=SPEC.height,
        width=SPEC.width, num_inference_steps=steps, guidance_scale=1.0, generator=torch.Generator().manual_seed(0),
        latents=latents, output_type="latent", return_dict=False,
    )[0], output)  # fmt: skip


def _unpack(pipe, tokens, like):
    return pipe._unpack_latents(tokens, *like.shape[2:], 1, 1)


def test_first_frame_is_the_pipelines_image_latents(ltx, posterior_mode):
    pipe, adapter, clip, x0, text = ltx
    _, calls = _run(pipe, clip, text, steps=2)
    per_frame = x0.shape[3] * x0.shape[4]
    for call in calls:
        hidden = _unpack(pipe, call["hidden_states"], x0)
        torch.testing.assert_close(hidden[:, :, :1], text["image_latents"], rtol=0, atol=0)
        t = call["timestep"]
        assert t.shape == (1, x0[0, 0].numel()) and bool((t[:, :per_frame] == 0).all())
        assert bool((t[:, per_frame:] == t[0, -1]).all()) and float(t[0, -1]) > 0
    # the pipeline normalises the image without the VAE's scaling_factor (1.3 here): not the clip's first frame
    with torch.no_grad():
        z = pipe.vae.encode(clip[:, :, :1]).latent_dist.mode()
    mean, std = (v.view(1, -1, 1, 1, 1) for v in (pipe.vae.latents_mean, pipe.vae.latents_std))
    torch.testing.assert_close(text["image_latents"], (z - mean) / std, rtol=1e-5, atol=1e-5)


def test_ideal_model_reaches_the_clip_and_predict_is_the_pipelines_call(ltx):
    pipe, adapter, clip, x0, text = ltx
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(3))
    start = torch.cat([text["image_latents"], noise[:, :, 1:]], dim=2)  # what prepare_latents builds
    final, calls = _run(pipe, clip, text, latents=pipe._pack_latents(start), output=pipe._pack_latents(noise - x0))
    final = _unpack(pipe, final, x0)
    torch.testing.assert_close(final[:, :, 1:], x0[:, :, 1:], rtol=0, atol=2e-4)
    torch.testing.assert_close(final[:, :, :1], text["image_latents"], rtol=0, atol=0)  # never stepped
    seen = []
    handle = pipe.transformer.register_forward_hook(lambda m, a, kw, o: seen.append(kw), with_kwargs=True)
    try:
        for call in calls:
            hidden = _unpack(pipe, call["hidden_states"], x0).float()
            s = check_on_flow_path(adapter, hidden[:, :, 1:], x0[:, :, 1:], noise[:, :, 1:])  # on the path
            with torch.no_grad():
                adapter.predict(pipe.transformer, (1 - s) * x0 + s * noise, adapter.transformer_timestep(
                    torch.tensor([s])), text)  # fmt: skip
            got = seen[-1]
            torch.testing.assert_close(got["hidden_states"], call["hidden_states"], rtol=0, atol=3e-4)
            torch.testing.assert_close(got["timestep"].float(), call["timestep"].float(), rtol=0, atol=0.05)
            for key in ("num_frames", "height", "width", "rope_interpolation_scale"):
                assert got[key] == call[key], key
    finally:
        handle.remove()
    pred = torch.zeros_like(x0)
    pred[:, :, 0] = 3.0  # the first frame is not trained
    assert float(adapter.loss(pred, torch.zeros_like(x0), text)) == 0.0


def test_train_then_generate_end_to_end(tmp_path):
    spec = ClipSpec(17, 64, 64)
    result, out = train_tiny(tmp_path, "tiny-ltx-i2v", spec)
    assert result.cache.latents_computed == 3
    generate_tiny("tiny-ltx-i2v", out, spec, image_of=square_clip_8bit(spec))
