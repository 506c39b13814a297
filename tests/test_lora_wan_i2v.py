"""Wan image-to-video LoRA (``WanImageToVideoPipeline``): the first-frame condition as the pipeline builds it.

Three tiny random-init layouts from the Wan family record (``vidsparse.families.wan.tiny_i2v_pipeline``):
Wan 2.1 I2V (mask + image-latent channels, tiny CLIP image context), Wan 2.2 I2V-A14B (two
experts, no image encoder) and Wan 2.2 TI2V-5B (``expand_timesteps``: the clean image latents
replace the first latent frame, timestep 0 there). Checked for each: the condition the trainer
caches is, bit for bit, what the real pipeline's ``__call__`` feeds the transformer for the same
image; the mask layout and the normalisation against an independent VAE encode; an ideal model
of the trained objective, put into the real pipeline's sampler, carries the noise to the clip's
latents; ``predict`` builds the same transformer inputs. Then ``train-lora --model tiny-wan-i2v``
and ``generate --model tiny-wan-i2v --image IMG --lora DIR`` end to end, and ``--image`` checks.
"""

import json

import pytest
import torch

from vidsparse.families.wan import tiny_i2v_pipeline
from vidsparse.lora.adapters.base import first_frame_image
from vidsparse.lora.data import ClipSpec
from vidsparse.lora.models import adapter_for
from vidsparse.lora.train import collate_text

LAYOUTS = {"wan21": {}, "a14b": {"two_stage": True}, "ti2v": {"ti2v": True}}
SPECS = {"wan21": ClipSpec(9, 32, 32), "a14b": ClipSpec(9, 32, 32), "ti2v": ClipSpec(9, 64, 64)}


def _clip(spec: ClipSpec) -> torch.Tensor:
    """[1, 3, F, H, W] in [-1, 1] on 8-bit levels (so its first frame is exactly a PIL image): a moving square."""
    video = torch.full((1, 3, spec.num_frames, spec.height, spec.width), 20.0)
    side = spec.height // 3
    for f in range(spec.num_frames):
        x = f * (spec.width - side) // (spec.num_frames - 1)
        video[0, 0, f, side : 2 * side, x : x + side] = 230.0
        video[0, 2, f, :side, :] = 90.0 + 10 * f
    return video / 127.5 - 1.0


@pytest.fixture(scope="module", params=sorted(LAYOUTS))
def layout(request):
    name = request.param
    pipe = tiny_i2v_pipeline(0, **LAYOUTS[name])
    adapter = adapter_for(pipe, f"tiny-{name}")
    spec = SPECS[name]
    adapter.validate_clip(spec)
    clip = _clip(spec)
    enc = adapter.encode_clip(clip)
    text = collate_text([adapter.encode_text("a red square")])
    return name, pipe, adapter, spec, clip, enc, {**text, **{k: v for k, v in enc.items() if k != "latents"}}


def _call(pipe, spec, clip, noise, text, output=None, steps=4):
    """The real pipeline on the clip's first frame; records each transformer call (its output
    replaced by ``output`` when given); returns (final latents, calls)."""
    calls = []

    def hook(module, args, kwargs, out):
        calls.append({k: v.detach().clone() for k, v in kwargs.items() if torch.is_tensor(v)})
        return out if output is None else (output.to(out[0].dtype),)

    modules = [m for m in (pipe.transformer, pipe.transformer_2) if m is not None]
    handles = [m.register_forward_hook(hook, with_kwargs=True) for m in modules]
    try:
        final = pipe(image=first_frame_image(clip[0]), prompt_embeds=text["prompt_embeds"], num_frames=spec.num_frames,
                     height=spec.height, width=spec.width, num_inference_steps=steps, guidance_scale=1.0,
                     latents=noise.clone(), output_type="latent", return_dict=False)[0]  # fmt: skip
    finally:
        for h in handles:
            h.remove()
    return final, calls


@pytest.mark.slow
def test_condition_is_the_pipelines(layout):
    """The cached condition equals the transformer input the pipeline builds from the same image."""
    name, pipe, adapter, spec, clip, enc, text = layout
    x0 = enc["latents"]
    _, calls = _call(pipe, spec, clip, torch.randn(x0.shape, generator=torch.Generator().manual_seed(0)), text,
                     steps=2)  # fmt: skip
    z = x0.shape[1]
    vae = pipe.vae
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
    for call in calls:
        hidden = call["hidden_states"]
        if name == "ti2v":  # the clean image latents in place of the first latent frame
            torch.testing.assert_close(hidden[:, :, :1], enc["image_latents"], rtol=0, atol=0)
            assert call["timestep"].shape == (1, (x0.shape[2]) * (x0.shape[3] // 2) * (x0.shape[4] // 2))
        else:
            torch.testing.assert_close(hidden[:, z:], enc["condition"], rtol=0, atol=0)
        if name == "wan21":
            torch.testing.assert_close(call["encoder_hidden_states_image"], enc["image_embeds"], rtol=0, atol=0)
        else:
            assert "encoder_hidden_states_image" not in call
    # independently of prepare_latents: the mask layout and the normalised E(first frame, zeros)
    first = clip[:, :, :1]
    with torch.no_grad():
        if name == "ti2v":
            want = (vae.encode(first).latent_dist.mode() - mean) / std
            torch.testing.assert_close(enc["image_latents"], want, rtol=1e-5, atol=1e-5)
            return
        video = torch.cat([first, torch.zeros_like(clip[:, :, 1:])], dim=2)
        want = (vae.encode(video).latent_dist.mode() - mean) / std
    mask, image_latents = enc["condition"][:, : adapter._temporal], enc["condition"][:, adapter._temporal :]
    assert mask.shape[1] == 4 and bool((mask[:, :, 0] == 1).all()) and bool((mask[:, :, 1:] == 0).all())
    torch.testing.assert_close(image_latents, want, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_ideal_model_carries_the_pipeline_sampler_to_the_clip(layout):
    """An ideal model of the trained objective (velocity ``noise - x0``: a constant on the straight
    path), put into the real sampler, ends at the clip's latents (TI2V: the first frame is the
    image's, the part the loss leaves out); ``predict`` gives the transformer the same inputs."""
    name, pipe, adapter, spec, clip, enc, text = layout
    x0 = enc["latents"]
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(3))
    final, calls = _call(pipe, spec, clip, noise, text, output=adapter.transformer_output(noise - x0))
    want = x0.clone()
    if name == "ti2v":
        want[:, :, :1] = enc["image_latents"]
    torch.testing.assert_close(final.float(), want, rtol=0, atol=2e-4)
    assert len(calls) == 4
    seen = []

    def probe(module, args, kwargs, out):
        seen.append({k: v.detach().clone() for k, v in kwargs.items() if torch.is_tensor(v)})
        return (adapter.transformer_output(noise - x0).to(out[0].dtype),)

    z, d = x0.shape[1], noise - x0
    modules = [m for m in (pipe.transformer, pipe.transformer_2) if m is not None]
    handles = [m.register_forward_hook(probe, with_kwargs=True) for m in modules]
    try:
        for call in calls:  # each pipeline step, replayed through predict at its noise level
            hidden = call["hidden_states"][:, :z].float()
            frames = slice(1, None) if name == "ti2v" else slice(None)
            s = float(((hidden - x0)[:, :, frames] * d[:, :, frames]).sum() / (d[:, :, frames] ** 2).sum())
            torch.testing.assert_close(hidden[:, :, frames], (x0 + s * d)[:, :, frames], rtol=0, atol=2e-4)
            t = adapter.transformer_timestep(torch.tensor([s]))
            with torch.no_grad():
                v = adapter.predict(adapter.transformer, (1 - s) * x0 + s * noise, t, text)
            torch.testing.assert_close(v, noise - x0, rtol=0, atol=1e-5)
            got = seen[-1]
            torch.testing.assert_close(got["hidden_states"], call["hidden_states"], rtol=0, atol=3e-4)
            torch.testing.assert_close(got["timestep"].float(), call["timestep"].float(), rtol=0, atol=0.05)
            for key in ("encoder_hidden_states", "encoder_hidden_states_image"):
                assert (key in got) == (key in call)
                if key in got:
                    torch.testing.assert_close(got[key], call[key], rtol=0, atol=0)
    finally:
        for h in handles:
            h.remove()
    # the loss covers what the pipeline samples: TI2V's first latent frame is not trained
    pred = torch.zeros_like(x0)
    pred[:, :, 0] = 5.0
    assert float(adapter.loss(pred, torch.zeros_like(x0), text)) == (0.0 if name == "ti2v" else pytest.approx(25 / 3))


@pytest.mark.slow
def test_refuses_a_pipeline_without_its_image_encoder():
    pipe = tiny_i2v_pipeline(0)
    pipe.image_encoder = None
    with pytest.raises(ValueError, match="image_encoder"):
        adapter_for(pipe, "Wan-AI/Wan2.1-I2V-14B-480P-Diffusers")


def test_generate_image_flag_is_checked_before_loading(tmp_path, capsys):
    from PIL import Image

    from vidsparse.generation import GenerateOptions
    from vidsparse.generation.options import prepare

    img = tmp_path / "first.png"
    Image.new("RGB", (32, 32), (200, 20, 20)).save(img)
    plan = prepare(GenerateOptions(model="tiny-wan-i2v", image=str(img), frames=9, height=32, width=32, steps=2))
    assert plan.image == img and plan.info.pipeline_class == "WanImageToVideoPipeline"
    with pytest.raises(ValueError, match="pass --image"):
        prepare(GenerateOptions(model="tiny-wan-i2v", frames=9, height=32, width=32))
    with pytest.raises(ValueError, match="takes no image"):
        prepare(GenerateOptions(model="tiny", image=str(img)))
    (tmp_path / "bad.png").write_text("not an image")
    with pytest.raises(ValueError, match="cannot be read as an image"):
        prepare(GenerateOptions(model="tiny-wan-i2v", image=str(tmp_path / "bad.png")))
    from vidsparse.cli import main  # the flag, through the command line

    assert main(["generate", "--model", "tiny", "--image", str(img)]) != 0
    assert "takes no image" in capsys.readouterr().err


@pytest.mark.slow
def test_train_then_generate_end_to_end(tmp_path):
    """``train-lora --model tiny-wan-i2v`` then ``generate --model tiny-wan-i2v --image --lora``, offline."""
    from test_lora_data import make_dataset

    from vidsparse.generation import GenerateOptions, generate
    from vidsparse.lora import TrainConfig, train_lora
    from vidsparse.lora.cache import load_clip_conditioning

    out = tmp_path / "out"
    result = train_lora(TrainConfig(
        data_dir=str(make_dataset(tmp_path / "data")), output_dir=str(out), model="tiny-wan-i2v", num_frames=9,
        height=32, width=32, rank=4, max_train_steps=2, checkpointing_steps=2, mixed_precision="no",
        attention_backend="torch", pattern="radial", progress=False,
    ))  # fmt: skip
    assert len(result.losses) == 2 and result.cache.latents_computed == 3
    cond = load_clip_conditioning(result.cache.samples[0].latent_file)
    assert set(cond) == {"condition", "image_embeds"} and cond["condition"].shape == (8, 3, 4, 4)
    info = json.loads((out / "vidsparse_lora.json").read_text())
    assert info["model"] == "tiny-wan-i2v" and info["family"] == "wan"
    first_frame_image(_clip(SPECS["wan21"])[0]).save(tmp_path / "first.png")
    res = generate(GenerateOptions(model="tiny-wan-i2v", image=str(tmp_path / "first.png"), lora=str(out),
                                   frames=9, height=32, width=32, steps=2, backend="torch",
                                   out=str(tmp_path / "gen.mp4"), progress=False))  # fmt: skip
    assert (tmp_path / "gen.mp4").is_file() and res.frames.shape[:3] == (9, 32, 32)
