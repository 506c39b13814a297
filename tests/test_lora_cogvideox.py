"""CogVideoX LoRA: v-prediction on the scheduler's alphas, checked against the real CogVideoXPipeline.

The tiny pipelines are the family record's (``tiny-cogvideox``; ``v15=True`` for CogVideoX 1.5's
``patch_size_t=2``), with THUDM/CogVideoX-2b's scheduler config. Checked: the noising and the
target are the scheduler's own ``add_noise`` / ``get_velocity`` (DDIM and DPM); an ideal model of
the trained objective put into the pipeline's sampling loop carries its noise exactly to the data
(a flow or epsilon reading of the same model does not); the RoPE and layout the adapter gives the
transformer are the pipeline's; a short sparse run lowers the loss and reloads in diffusers; and
``train-lora --model tiny-cogvideox`` then ``generate --model tiny-cogvideox --lora DIR`` runs.
"""

import json

import pytest
import torch
from lora_checks import lora_module_names, sparse_objective, square_clip, train_steps

from vidsparse.config import SparseConfig
from vidsparse.families.cogvideox import tiny_pipeline
from vidsparse.lora import TrainConfig
from vidsparse.lora.data import ClipSpec
from vidsparse.lora.export import save_lora
from vidsparse.lora.flow import NoiseSampler
from vidsparse.lora.models import adapter_for
from vidsparse.lora.train import collate_text, flow_loss, lora_config
from vidsparse.pipelines import apply

# LoRA training runs: outside the quick subset (pytest -m "not slow"), always in CI
pytestmark = pytest.mark.slow

# 16 x 16 latents -> 8 x 8 tokens per frame; 1.0: 3 latent frames; 1.5: 5 latent frames padded in front to 6,
# 3 token frames after patch_size_t = 2 (radial is sparse on both)
SPECS = {False: ClipSpec(9, 128, 128), True: ClipSpec(17, 128, 128)}
SPEC = SPECS[False]
CAPTIONS = ("a red square slides to the right", "a blue square")
SPARSE = SparseConfig("radial", dense_first_steps=0, backend="torch", block_size=16)


@pytest.fixture(scope="module", params=[False, True], ids=["1.0", "1.5"])
def cog(request):
    pipe = tiny_pipeline(v15=request.param)
    adapter = adapter_for(pipe, "tiny-cogvideox")
    adapter.validate_clip(SPECS[request.param])
    x0 = torch.cat([adapter.encode_video(square_clip(SPECS[request.param], d)) for d in (0, 1)])
    text = collate_text([adapter.encode_text(c) for c in CAPTIONS])
    return request.param, pipe, adapter, x0, text


def test_latents_pad_for_patch_t_and_match_the_decoder(cog):
    v15, pipe, adapter, x0, _ = cog
    assert x0.shape == (2, 4, 6 if v15 else 3, 16, 16)  # 1.5: 5 latent frames padded in front to 6
    raw = adapter._vae_mode(square_clip(SPECS[v15], 0))
    back = x0[:1] / pipe.vae.config.scaling_factor  # CogVideoXPipeline.decode_latents
    torch.testing.assert_close(back[:, :, -raw.shape[2] :], raw, rtol=1e-5, atol=1e-6)
    if v15:
        torch.testing.assert_close(x0[:, :, 0], x0[:, :, 1])  # the padding repeats the first frame


@pytest.mark.parametrize("scheduler", ["CogVideoXDDIMScheduler", "CogVideoXDPMScheduler"])
def test_objective_is_the_schedulers_v_prediction(scheduler):
    import diffusers

    pipe = tiny_pipeline()
    pipe.scheduler = getattr(diffusers, scheduler).from_config(pipe.scheduler.config)
    adapter = adapter_for(pipe, "tiny-cogvideox")
    gen = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 4, 3, 8, 8, generator=gen), torch.randn(3, 4, 3, 8, 8, generator=gen)
    t = torch.tensor([0.0, 500.0, 999.0])
    noisy, target, timesteps = adapter.training_inputs(x0, noise, t)
    torch.testing.assert_close(noisy, pipe.scheduler.add_noise(x0, noise, t.long()))
    torch.testing.assert_close(target, pipe.scheduler.get_velocity(x0, noise, t.long()))
    assert torch.equal(timesteps, t)
    # the SNR-shifted, zero-terminal-SNR alphas: t = 999 is pure noise, v = -x0 there
    torch.testing.assert_close(noisy[2], noise[2], rtol=0, atol=1e-3)
    levels = adapter.sample_levels(NoiseSampler(), 4096, torch.Generator().manual_seed(1), 1.0)
    assert levels.min() >= 0 and levels.max() <= 999 and torch.equal(levels, levels.round())
    assert 400 < levels.mean() < 600  # uniform integer timesteps, as diffusers' CogVideoX scripts


def _run_with_oracle(pipe, adapter, x0, noise, text, output_fn, spec, steps=5):
    """The real pipeline (latents out), its transformer replaced by ``output_fn(hidden, t)`` ([B, C, f, h, w])."""
    calls = []

    def hook(module, args, kwargs, out):
        hidden = kwargs["hidden_states"].permute(0, 2, 1, 3, 4).float()
        t = kwargs["timestep"]
        calls.append((hidden.clone(), t.clone(), kwargs["image_rotary_emb"]))
        return (output_fn(hidden, t).permute(0, 2, 1, 3, 4).to(out[0].dtype),)

    handle = pipe.transformer.register_forward_hook(hook, with_kwargs=True)
    try:
        final = pipe(prompt_embeds=text["prompt_embeds"][:1], num_frames=spec.num_frames, height=spec.height,
                     width=spec.width, num_inference_steps=steps, guidance_scale=1.0, output_type="latent",
                     latents=noise.permute(0, 2, 1, 3, 4), return_dict=False)[0]  # fmt: skip
    finally:
        handle.remove()
    return final.permute(0, 2, 1, 3, 4).float(), calls


@pytest.mark.parametrize("scheduler", ["CogVideoXDDIMScheduler", "CogVideoXDPMScheduler"])
def test_ideal_model_of_the_objective_samples_the_data(cog, scheduler):
    """The v the adapter trains towards, evaluated at the pipeline's (x_t, t), takes noise to x0."""
    import diffusers

    v15, pipe, adapter, x0, text = cog
    pipe.scheduler = getattr(diffusers, scheduler).from_config(pipe.scheduler.config)
    x0 = x0[:1]
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(3))

    def ideal(hidden, t):  # the noise that puts x0 at hidden under a_t, then the adapter's target
        a = adapter.alphas(t.float()).view(-1, 1, 1, 1, 1)
        eps = (hidden - a.sqrt() * x0) / (1 - a).sqrt()
        return adapter.training_inputs(x0, eps, t.float())[1]

    final, calls = _run_with_oracle(pipe, adapter, x0, noise, text, ideal, SPECS[v15])
    torch.testing.assert_close(final, x0, rtol=0, atol=1e-4)
    assert len(calls) == 5 and calls[0][1].item() == 999
    for hidden, t, rope in calls:
        want = adapter.rotary_embedding(x0.shape[2], x0.shape[3], x0.shape[4], "cpu")
        for got, exp in zip(rope, want):
            torch.testing.assert_close(got, exp)
        if scheduler == "CogVideoXDDIMScheduler":  # deterministic DDIM stays on the training path of `noise`
            torch.testing.assert_close(hidden, adapter.training_inputs(x0, noise, t.float())[0], rtol=0, atol=1e-4)
    # the same ideal model read as a flow velocity (noise - x0) does not reach the data
    flow, _ = _run_with_oracle(pipe, adapter, x0, noise, text, lambda h, t: noise - x0, SPECS[v15])
    assert (flow - x0).abs().max() > 0.5


def test_predict_is_the_transformer_call_the_pipeline_makes(cog):
    v15, pipe, adapter, x0, text = cog
    seen = {}

    def hook(module, args, kwargs, out):
        seen.update(kwargs)

    handle = pipe.transformer.register_forward_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            out = adapter.predict(pipe.transformer, x0, torch.tensor([10.0, 900.0]), text)
    finally:
        handle.remove()
    assert out.shape == x0.shape
    assert seen["hidden_states"].shape == (2, x0.shape[2], 4, 16, 16) and seen["timestep"].tolist() == [10, 900]
    assert seen["encoder_hidden_states"].shape == (2, 8, 16)


def test_short_sparse_run_lowers_loss_and_reloads_in_diffusers(cog, tmp_path):
    v15, pipe, adapter, x0, text = cog
    transformer = adapter.transformer
    transformer.requires_grad_(False)
    cfg = TrainConfig(data_dir=str(tmp_path), output_dir=str(tmp_path), rank=4, pattern="radial")
    transformer.add_adapter(lora_config(cfg, adapter))
    lora = lora_module_names(transformer)
    assert lora == {f"transformer_blocks.{i}.attn1.{m}" for i in range(2) for m in ("to_q", "to_k", "to_v", "to_out.0")}
    t = torch.tensor([300.0, 700.0])
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))

    def loss():
        return flow_loss(adapter, transformer, x0, text, t, noise)

    dense, before = sparse_objective(transformer, loss, SPARSE)
    assert abs(before - dense) > 1e-6  # radial is active in the trained objective
    after = train_steps(transformer, loss, 15)
    with torch.no_grad():
        trained = adapter.predict(transformer, x0, t, text)
    assert after < 0.9 * before, (before, after)
    save_lora(tmp_path, type(pipe), transformer)
    fresh = tiny_pipeline(v15=v15)
    fresh.load_lora_weights(str(tmp_path))
    apply(fresh.transformer, SPARSE)
    with torch.no_grad():
        torch.testing.assert_close(adapter.predict(fresh.transformer, x0, t, text), trained, rtol=1e-5, atol=1e-5)


def test_refusals_are_specific():
    import diffusers

    adapter = adapter_for(tiny_pipeline(), "tiny-cogvideox")
    with pytest.raises(ValueError, match="logit_normal.*flow-matching"):
        adapter.check_sampling(NoiseSampler("logit_normal"))
    with pytest.raises(ValueError, match="--flow-shift 3.0"):
        adapter.check_sampling(NoiseSampler("shifted", shift=3.0))
    adapter.check_sampling(NoiseSampler())
    i2v, t2v = tiny_pipeline(image_to_video=True), tiny_pipeline()  # each transformer in the other's pipeline
    parts = dict(tokenizer=None, text_encoder=None, vae=t2v.vae, scheduler=t2v.scheduler)
    with pytest.raises(ValueError, match="load it as CogVideoXImageToVideoPipeline"):
        adapter_for(diffusers.CogVideoXPipeline(transformer=i2v.transformer, **parts), "THUDM/CogVideoX-5b-I2V")
    with pytest.raises(ValueError, match="2 x 4 input channels"):
        adapter_for(diffusers.CogVideoXImageToVideoPipeline(transformer=t2v.transformer, **parts), "THUDM/CogVideoX-5b")
    with pytest.raises(ValueError, match="train the LoRA on CogVideoXPipeline"):
        adapter_for(object.__new__(diffusers.CogVideoXVideoToVideoPipeline), "THUDM/CogVideoX-5b")
    flow = tiny_pipeline()
    flow.scheduler = diffusers.FlowMatchEulerDiscreteScheduler()
    with pytest.raises(ValueError, match="v_prediction"):
        adapter_for(flow, "x")
    with pytest.raises(ValueError, match="num_frames = 4k"):
        adapter.validate_clip(ClipSpec(10, 64, 64))


def test_train_lora_then_generate_with_it(tmp_path):
    """``train-lora --model tiny-cogvideox`` and ``generate --model tiny-cogvideox --lora DIR`` (CLI)."""
    from test_lora_data import make_dataset

    from vidsparse.cli import main

    data = make_dataset(tmp_path / "data")
    out = tmp_path / "run"
    rc = main(["train-lora", "--model", "tiny-cogvideox", "--data-dir", str(data), "--output-dir", str(out),
               "--num-frames", "9", "--height", "32", "--width", "32", "--rank", "4", "--max-train-steps", "2",
               "--mixed-precision", "no", "--pattern", "radial", "--attention-backend", "torch"])  # fmt: skip
    assert rc in (0, None)
    info = json.loads((out / "vidsparse_lora.json").read_text())
    assert info["family"] == "cogvideox" and info["model"] == "tiny-cogvideox"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(r["loss"] > 0 for r in rows)
    video = tmp_path / "v.mp4"
    rc = main(["generate", "--model", "tiny-cogvideox", "--lora", str(out), "--frames", "9", "--height", "32",
               "--width", "32", "--steps", "2", "--pattern", "radial", "--out", str(video)])  # fmt: skip
    assert rc in (0, None) and video.is_file() and video.stat().st_size > 0
