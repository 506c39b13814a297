"""CogVideoX image-to-video LoRA (``CogVideoXImageToVideoPipeline``): v-prediction with the image latents.

Tiny random-init I2V pipelines of the family record (``tiny_pipeline(image_to_video=True)``; 1.5 with
``patch_size_t=2`` and the ofs embedding). Checked: the image latents the trainer caches are what
the real pipeline's ``__call__`` concatenates to the noisy latents for the same image (with the
VAE posterior's mode, which the cache uses, in place of its sample), independently the scaled
first-frame latents then zero frames (1.5: padded in front); an ideal model of the trained
v-prediction, put into the real sampler, carries the noise to the clip's latents; ``predict``
makes the pipeline's transformer call (channels, ofs, RoPE); then ``train-lora --model
tiny-cogvideox-i2v`` and ``generate --model tiny-cogvideox-i2v --image --lora`` end to end.
"""

import pytest
import torch
from lora_checks import generate_tiny, square_clip_8bit, train_tiny

from vidsparse.families.cogvideox import tiny_pipeline
from vidsparse.lora.adapters.base import first_frame_image
from vidsparse.lora.data import ClipSpec
from vidsparse.lora.models import adapter_for
from vidsparse.lora.train import collate_text

# LoRA training runs: outside the quick subset (pytest -m "not slow"), always in CI
pytestmark = pytest.mark.slow

# 8 x 8 latents; 1.0: 3 latent frames; 1.5: 5 latent frames, padded in front to 6
SPECS = {False: ClipSpec(9, 64, 64), True: ClipSpec(17, 64, 64)}


def _clip(spec: ClipSpec) -> torch.Tensor:
    """A green square crossing the frame, on 8-bit levels (its first frame is exactly a PIL image)."""
    return square_clip_8bit(spec, background=30.0, level=220.0, channel=1)


@pytest.fixture(scope="module", params=[False, True], ids=["1.0", "1.5"])
def cog(request):
    v15 = request.param
    pipe = tiny_pipeline(v15=v15, image_to_video=True)
    adapter = adapter_for(pipe, "tiny-cogvideox-i2v")
    spec = SPECS[v15]
    adapter.validate_clip(spec)
    clip = _clip(spec)
    enc = adapter.encode_clip(clip)
    text = {**collate_text([adapter.encode_text("a green square")]), "image_latents": enc["image_latents"]}
    return v15, pipe, adapter, spec, clip, enc["latents"], text


def _run(pipe, spec, clip, noise, text, output_fn=None, steps=4):
    """The real pipeline on the clip's first frame (latents out, [B, C, f, h, w]); records each
    transformer call; its output replaced by ``output_fn(noisy [B, C, f, h, w], t)`` when given."""
    calls = []

    def hook(module, args, kwargs, out):
        calls.append({k: v.detach().clone() for k, v in kwargs.items() if torch.is_tensor(v)}
                     | {"image_rotary_emb": kwargs["image_rotary_emb"]})  # fmt: skip
        if output_fn is None:
            return out
        c = out[0].shape[2]
        noisy = kwargs["hidden_states"][:, :, :c].permute(0, 2, 1, 3, 4).float()
        return (output_fn(noisy, kwargs["timestep"]).permute(0, 2, 1, 3, 4).to(out[0].dtype),)

    handle = pipe.transformer.register_forward_hook(hook, with_kwargs=True)
    try:
        final = pipe(image=first_frame_image(clip[0]), prompt_embeds=text["prompt_embeds"], num_frames=spec.num_frames,
                     height=spec.height, width=spec.width, num_inference_steps=steps, guidance_scale=1.0,
                     latents=noise.permute(0, 2, 1, 3, 4).clone(), output_type="latent", return_dict=False)[0]  # fmt: skip
    finally:
        handle.remove()
    return final.permute(0, 2, 1, 3, 4).float(), calls


@pytest.fixture
def posterior_mode(monkeypatch):
    """The pipeline samples the VAE posterior for the image latents; with its mode (what the cache
    stores) it must build exactly the cached condition."""
    import diffusers.pipelines.cogvideo.pipeline_cogvideox_image2video as i2v

    monkeypatch.setattr(i2v, "retrieve_latents", lambda out, generator=None: out.latent_dist.mode())


def test_image_latents_are_the_pipelines(cog, posterior_mode):
    v15, pipe, adapter, spec, clip, x0, text = cog
    _, calls = _run(pipe, spec, clip, torch.randn(x0.shape, generator=torch.Generator().manual_seed(0)), text, steps=2)
    c = x0.shape[1]
    assert len(calls) == 2
    for call in calls:
        assert call["hidden_states"].shape[2] == 2 * c
        torch.testing.assert_close(call["hidden_states"][:, :, c:], text["image_latents"], rtol=0, atol=0)
        assert ("ofs" in call) == v15 and (not v15 or call["ofs"].tolist() == [adapter.ofs])
    # independently: sf * E(first frame) on the first latent frame (1.5: the leading padding frame), then zeros
    with torch.no_grad():
        z = pipe.vae.encode(clip[:, :, :1]).latent_dist.mode() * pipe.vae.config.scaling_factor
    image = text["image_latents"][0]
    assert image.shape[0] == x0.shape[2] == (6 if v15 else 3)
    torch.testing.assert_close(image[0], z[0, :, 0], rtol=1e-5, atol=1e-5)
    assert bool((image[1:] == 0).all())


def test_ideal_model_samples_the_clip_and_predict_is_the_pipelines_call(cog, posterior_mode):
    v15, pipe, adapter, spec, clip, x0, text = cog
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(3))

    def ideal(noisy, t):  # the noise that puts x0 at the input under a_t, then the adapter's v target
        a = adapter.alphas(t.float()).view(-1, 1, 1, 1, 1)
        eps = (noisy - a.sqrt() * x0) / (1 - a).sqrt()
        return adapter.training_inputs(x0, eps, t.float())[1]

    final, calls = _run(pipe, spec, clip, noise, text, ideal, steps=5)
    torch.testing.assert_close(final, x0, rtol=0, atol=1e-4)
    seen = []

    def probe(module, args, kwargs, out):
        seen.append(kwargs)

    handle = pipe.transformer.register_forward_hook(probe, with_kwargs=True)
    try:
        for call in calls:
            c = x0.shape[1]
            noisy = call["hidden_states"][:, :, :c].permute(0, 2, 1, 3, 4)
            with torch.no_grad():
                adapter.predict(pipe.transformer, noisy, call["timestep"].float(), text)
            got = seen[-1]
            torch.testing.assert_close(got["hidden_states"], call["hidden_states"], rtol=0, atol=0)
            assert torch.equal(got["timestep"], call["timestep"])
            assert (got.get("ofs") is None) == (not v15)
            if v15:
                torch.testing.assert_close(got["ofs"], call["ofs"])
            for g, w in zip(got["image_rotary_emb"], call["image_rotary_emb"]):
                torch.testing.assert_close(g, w)
    finally:
        handle.remove()


def test_train_then_generate_end_to_end(tmp_path):
    spec = ClipSpec(9, 32, 32)
    result, out = train_tiny(tmp_path, "tiny-cogvideox-i2v", spec)
    assert result.cache.latents_computed == 3
    generate_tiny("tiny-cogvideox-i2v", out, spec, image_of=_clip(spec))
