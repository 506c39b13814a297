"""Cosmos LoRA (``vidsparse.lora.adapters.cosmos``): Predict2 video2world and Predict2.5 as their pipelines run.

Checked on the family record's tiny pipelines (real ``Cosmos2VideoToWorldPipeline`` with its
Karras-sigma Euler scheduler and EDM preconditioning; real ``Cosmos2_5_PredictBasePipeline`` with
its UniPC flow scheduler, shift 5; both with CFG at 7): an ideal model of the trained objective
(the exact flow velocity towards a known clip, ``(x_t - x0) / t`` on the generated frames), put into
the real sampler, carries the noise to the clip's latents, with the conditioning frames the
pipeline's own; every transformer call's inputs (hidden states with the clean conditioning frames,
per-frame timestep, condition mask, fps, padding mask, text) are what ``adapter.predict`` feeds at
that flow time. Then ``train_lora`` followed by ``generate --lora`` on ``tiny-cosmos`` (Predict2.5
text2world) and ``tiny-cosmos2-video2world`` (Predict2, ``--image``).
"""

import functools
import inspect

import pytest
import torch

from vidsparse.families.cosmos import tiny_pipeline, tiny_prompt_kwargs
from vidsparse.lora.adapters.base import first_frame_image
from vidsparse.lora.data import ClipSpec
from vidsparse.lora.models import adapter_for, refusal
from vidsparse.lora.train import collate_text

SPEC = ClipSpec(9, 32, 48)  # 3 latent frames of 4x6
CAPTION = "a robot arm stacks blocks"


def _clip() -> torch.Tensor:
    """An 8-bit-exact clip [1, 3, F, H, W] in [-1, 1] (a bar moving right), so its frames round-trip as images."""
    video = torch.full((1, 3, SPEC.num_frames, SPEC.height, SPEC.width), 40.0)
    for f in range(SPEC.num_frames):
        video[0, 1, f, 8:24, 2 * f : 2 * f + 16] = 210.0
    return video / 127.5 - 1.0


def _tensors(kwargs: dict) -> dict:
    return {k: (v.detach().clone() if torch.is_tensor(v) else v) for k, v in kwargs.items()}


def _with_latent_statistics(pipe):
    """The same pipeline with a VAE whose latents_mean / latents_std are not 0 / 1 (the tiny VAE's are),
    rebuilt so that ``__init__`` reads them (Predict2.5 keeps them), to check the latents' normalisation."""
    c = pipe.vae.config.z_dim
    pipe.vae.register_to_config(latents_mean=[0.1 * (i + 1) for i in range(c)],
                                latents_std=[0.5 + 0.25 * i for i in range(c)])  # fmt: skip
    return type(pipe)(**pipe.components)


def _condition_kwargs(version: str, frames: int, clip: torch.Tensor) -> dict:
    """What a user passes the pipeline for the clip's first ``frames`` frames (8-bit images)."""
    images = [first_frame_image(clip[0, :, i : i + 1]) for i in range(frames)]
    if version == "2":
        return dict(image=images[0]) if frames == 1 else dict(video=images)
    if frames == 0:
        return {}  # text2world
    # video2world (the image= path needs torchvision; its condition latent frame is the same, the VAE is causal)
    return dict(video=images, num_latent_conditional_frames=(frames - 1) // 4 + 1)


@pytest.mark.parametrize(("version", "frames"), [("2", 1), ("2", 5), ("2.5", 0), ("2.5", 1), ("2.5", 5)])
def test_ideal_model_in_the_real_sampler_reaches_the_clip(version, frames, monkeypatch):
    pipe = _with_latent_statistics(tiny_pipeline(version=version))
    adapter = adapter_for(pipe, "tiny-cosmos")
    assert type(pipe).__name__ in adapter.pipeline_classes
    adapter.set_condition_frames(frames if frames else None)
    adapter.validate_clip(SPEC)
    clip = _clip()
    enc = adapter.encode_clip(clip)
    x0 = enc["latents"]
    cond = {k: v for k, v in enc.items() if k != "latents"}
    text = {**collate_text([adapter.encode_text(CAPTION)]), **cond}
    n_cond = (frames - 1) // 4 + 1 if frames else 0
    assert cond["condition_indicator"].flatten().tolist() == [1.0] * n_cond + [0.0] * (3 - n_cond)
    # the conditioning frames are the clip's own latent frames (the Wan VAE is causal)
    torch.testing.assert_close(cond["condition_latents"][:, :, :n_cond], x0[:, :, :n_cond], rtol=0, atol=1e-5)
    if version == "2":  # Predict2 samples the posterior; the adapter caches its mode: compare on the mode
        module = inspect.getmodule(type(pipe))
        monkeypatch.setattr(module, "retrieve_latents", functools.partial(module.retrieve_latents,
                                                                          sample_mode="argmax"))  # fmt: skip
    calls = []

    def ideal(module, args, kwargs, out):
        calls.append(_tensors(kwargs))
        t = kwargs["timestep"].float()
        velocity = (kwargs["hidden_states"].float() - x0) / t * (1 - kwargs["condition_mask"].float())
        return (velocity.to(out[0].dtype),)

    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(3))
    handle = pipe.transformer.register_forward_hook(ideal, with_kwargs=True)
    try:
        final = pipe(**tiny_prompt_kwargs(pipe, CAPTION, "blurry"), height=SPEC.height, width=SPEC.width,
                     num_frames=SPEC.num_frames, num_inference_steps=6, guidance_scale=7.0, latents=noise.clone(),
                     output_type="latent", **_condition_kwargs(version, frames, clip)).frames  # fmt: skip
    finally:
        handle.remove()
    # Predict2 stops at sigma_min = 0.002 of an EDM path that starts at 80 x noise: x0 + 0.002 x noise remains
    atol = 1e-2 if version == "2" else 1e-4
    torch.testing.assert_close(final.float(), x0, rtol=0, atol=atol)
    assert len(calls) == 12  # CFG: conditional then unconditional call at each of 6 steps
    seen = []

    def probe(module, args, kwargs, out):
        seen.append(_tensors(kwargs))
        return out

    for step in range(6):
        call, uncond = calls[2 * step], calls[2 * step + 1]
        s = call["timestep"][:, :, -1:].reshape(-1).float()  # a generated frame's timestep: the flow time
        assert 0 < float(s) < 1
        handle = pipe.transformer.register_forward_hook(probe, with_kwargs=True)
        try:
            with torch.no_grad():
                adapter.predict(pipe.transformer, call["hidden_states"], s * adapter.num_train_timesteps, text)
        finally:
            handle.remove()
        mine = seen.pop()
        assert set(mine) == set(call), set(mine) ^ set(call)
        for key, value in call.items():
            if key == "timestep":  # s * 1000 / 1000 may differ from s in the last bit
                torch.testing.assert_close(mine[key], value, rtol=1e-6, atol=0)
            elif torch.is_tensor(value):
                torch.testing.assert_close(mine[key], value, rtol=0, atol=0, msg=key)
            else:
                assert mine[key] == value, key
        ind = cond["condition_indicator"]
        assert bool((call["timestep"] * ind < 1e-3).all())  # the conditioning frames' timestep is ~1e-4
        torch.testing.assert_close(call["encoder_hidden_states"], text["prompt_embeds"], rtol=0, atol=0)
        torch.testing.assert_close(uncond["hidden_states"], call["hidden_states"], rtol=0, atol=0)
        assert not torch.equal(uncond["encoder_hidden_states"], call["encoder_hidden_states"])  # the negative prompt
    if version == "2":
        assert calls[0]["fps"] == 16 and float(calls[0]["timestep"].max()) == pytest.approx(80 / 81, abs=1e-5)
    else:
        assert "fps" not in calls[0]


def test_loss_leaves_the_conditioning_frames_out():
    pipe = tiny_pipeline(version="2")
    adapter = adapter_for(pipe, "tiny-cosmos2-video2world")
    adapter.set_condition_frames(5)
    adapter.validate_clip(SPEC)
    enc = adapter.encode_clip(_clip())
    cond = {k: v for k, v in enc.items() if k != "latents"}
    pred, target = torch.zeros_like(enc["latents"]), torch.zeros_like(enc["latents"])
    pred[:, :, :2] = 100.0  # the two conditioning latent frames: not trained
    assert float(adapter.loss(pred, target, cond)) == 0.0
    pred[:, :, 2] = 1.0
    assert float(adapter.loss(pred, target, cond)) == pytest.approx(1.0)


def test_bad_settings_are_refused_before_any_work():
    p2 = adapter_for(tiny_pipeline(version="2"), "tiny-cosmos2-video2world")
    p25 = adapter_for(tiny_pipeline(), "tiny-cosmos")
    for adapter, bad in ((p2, 2), (p2, 0), (p25, 2), (p25, 9)):
        with pytest.raises(ValueError, match="--condition-frames"):
            adapter.set_condition_frames(bad)
    p2.set_condition_frames(9)
    with pytest.raises(ValueError, match="covers all 3 latent frames"):
        p2.validate_clip(SPEC)
    with pytest.raises(ValueError, match="divisible by 16"):
        p25.validate_clip(ClipSpec(9, 40, 48))
    with pytest.raises(ValueError, match="num_frames"):
        p25.validate_clip(ClipSpec(8, 32, 48))


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("Cosmos2_5_TransferPipeline", "ControlNet"),
        ("Cosmos2TextToImagePipeline", "single images"),
        ("CosmosTextToWorldPipeline", "EDM"),
        ("CosmosVideoToWorldPipeline", "augmentation sigma"),
    ],
)
def test_the_other_cosmos_pipelines_are_refused_with_the_reason(name, why):
    message = refusal(name, "some/model")
    assert message is not None and why in message and "Cosmos2VideoToWorldPipeline" in message


@pytest.mark.parametrize(("model", "frames"), [("tiny-cosmos", None), ("tiny-cosmos2-video2world", 1)])
def test_train_then_generate(model, frames, tmp_path):
    import json

    from test_lora_data import make_dataset

    from vidsparse.families import tiny_pipeline_of
    from vidsparse.generation import GenerateOptions, generate
    from vidsparse.lora import TrainConfig, load_lora, train_lora

    out = tmp_path / "out"
    result = train_lora(TrainConfig(
        data_dir=str(make_dataset(tmp_path / "data")), output_dir=str(out), model=model, num_frames=SPEC.num_frames,
        height=SPEC.height, width=SPEC.width, rank=4, max_train_steps=2, checkpointing_steps=2, mixed_precision="no",
        attention_backend="torch", pattern="radial", progress=False, condition_frames=frames,
    ))  # fmt: skip
    assert len(result.losses) == 2 and all(torch.isfinite(torch.tensor(result.losses)))
    info = json.loads((out / "vidsparse_lora.json").read_text())
    assert info["family"] == "cosmos"
    family, variant, _ = tiny_pipeline_of(model[len("tiny-") :])
    fresh = family.tiny_pipeline(variant=variant)
    load_lora(fresh, out)
    expected = {f"transformer_blocks.{i}.attn1.{p}" for i in range(2) for p in ("to_q", "to_k", "to_v", "to_out.0")}
    assert {n for n, m in fresh.transformer.named_modules() if hasattr(m, "lora_A") and len(m.lora_A)} == expected
    kwargs = {}
    if frames:
        first_frame_image(_clip()[0]).save(tmp_path / "first.png")
        kwargs["image"] = str(tmp_path / "first.png")
    res = generate(GenerateOptions(model=model, lora=str(out), frames=SPEC.num_frames, height=SPEC.height,
                                   width=SPEC.width, steps=2, backend="torch", progress=False, **kwargs))  # fmt: skip
    assert res.frames.shape[:3] == (SPEC.num_frames, SPEC.height, SPEC.width)
