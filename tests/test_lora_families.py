"""LoRA training adapters for HunyuanVideo, LTX-Video and Mochi (vidsparse/lora/adapters/hunyuan.py, ltx.py, mochi.py).

Each family's tiny random-init diffusers pipeline is its record's ``tiny_pipeline`` (tiny
transformer, a tiny VAE of the family's own class, the family's scheduler config, no text
encoders: the adapter then uses hashed stand-in embeddings with a padding mask). Checked
per family: VAE latents are normalized exactly as the pipeline denormalizes them; the flow
convention (timestep fed to the transformer, sign of its output) matches what the pipeline's
sampling loop does with it; LoRA attaches to the video self-attention only; a short run under
the radial pattern lowers the loss on a fixed batch; and the saved LoRA reloads into a fresh
pipeline through diffusers and reproduces the trained transformer's output.
"""

import pytest
import torch
from lora_checks import check_on_flow_path, lora_module_names, sparse_objective, square_clip, train_steps, train_tiny

from vidsparse.config import SparseConfig
from vidsparse.families import family_of, get_family
from vidsparse.lora import TrainConfig
from vidsparse.lora.data import ClipSpec
from vidsparse.lora.export import save_lora
from vidsparse.lora.flow import shift_sigmas
from vidsparse.lora.models import TrainableVideoModel, adapter_for
from vidsparse.lora.train import collate_text, flow_loss, lora_config
from vidsparse.models.tiny import build_tiny_pipeline
from vidsparse.pipelines import apply

# LoRA training runs per family: outside the quick subset (pytest -m "not slow"), always in CI
pytestmark = pytest.mark.slow

# clip sizes giving a latent grid of 3 frames x 16 x 16 (HunyuanVideo, Mochi: 8 x 8 tokens after
# the 2x2 patch) or 3 x 8 x 8 (LTX-Video: 32x VAE, patch 1): 192 video tokens, radial visibly sparse
SPECS = {"hunyuan": ClipSpec(9, 128, 128), "ltx": ClipSpec(17, 256, 256), "mochi": ClipSpec(13, 128, 128)}
LATENT = {"hunyuan": (4, 3, 16, 16), "ltx": (4, 3, 8, 8), "mochi": (4, 3, 16, 16)}
CAPTIONS = ("a red square slides to the right", "a blue square")
SPARSE = SparseConfig("radial", dense_first_steps=0, backend="torch", block_size=16)


def tiny_family_pipeline(family: str, seed: int = 0, **kwargs):
    """A tiny HunyuanVideoPipeline / LTXPipeline / MochiPipeline with the family's scheduler config
    (the family record's ``tiny_pipeline``, also served as ``generate --model tiny-<family>``).
    Mochi's has 4 latent channels here (``LATENT``), not the 12 its pipeline's decode needs: these
    tests stop at latents."""
    if family == "mochi":
        kwargs.setdefault("latent_channels", 4)
    return get_family(family).tiny_pipeline(seed=seed, **kwargs)


def _batch(adapter: TrainableVideoModel, spec: ClipSpec):
    x0 = torch.cat([adapter.encode_video(square_clip(spec, d)) for d in (0, 1)])
    text = collate_text([adapter.encode_text(c) for c in CAPTIONS])
    return x0, text


@pytest.fixture(scope="module", params=["hunyuan", "ltx", "mochi"])
def family(request):
    fam = request.param
    pipe = tiny_family_pipeline(fam)
    adapter = adapter_for(pipe, f"tiny-{fam}")
    spec = SPECS[fam]
    adapter.validate_clip(spec)
    x0, text = _batch(adapter, spec)
    return fam, pipe, adapter, x0, text


def test_latents_and_text_follow_the_pipeline(family):
    fam, pipe, adapter, x0, text = family
    assert x0.shape == (2, *LATENT[fam]) and x0.dtype == torch.float32
    vae, raw = pipe.vae, adapter._vae_mode(square_clip(SPECS[fam], 0))
    # the pipeline's own decode-side denormalization gives back the raw VAE latents
    if fam == "hunyuan":
        back = x0[:1] / vae.config.scaling_factor
    elif fam == "ltx":
        back = pipe._denormalize_latents(x0[:1], vae.latents_mean, vae.latents_std, vae.config.scaling_factor)
    else:  # MochiPipeline.__call__: latents * latents_std / scaling_factor + latents_mean
        mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
        std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
        back = x0[:1] * std / vae.config.scaling_factor + mean
    torch.testing.assert_close(back, raw, rtol=1e-5, atol=1e-5)
    mask = text["prompt_attention_mask"]
    assert mask.dtype == torch.bool and mask.sum(1).tolist() == [8, 4]  # one token per word + 1, padded
    assert text["prompt_embeds"].shape == (2, 8, 16)
    assert ("pooled_prompt_embeds" in text) == (fam == "hunyuan")
    with pytest.raises(ValueError, match="num_frames"):
        adapter.validate_clip(ClipSpec(SPECS[fam].num_frames + 1, SPECS[fam].height, SPECS[fam].width))
    with pytest.raises(ValueError, match="divisible"):
        adapter.validate_clip(ClipSpec(SPECS[fam].num_frames, SPECS[fam].height + 8, SPECS[fam].width))
    adapter.validate_clip(SPECS[fam])


def _pipeline_kwargs(fam: str, pipe, text, spec: ClipSpec, noise: torch.Tensor) -> dict:
    kw = dict(
        prompt_embeds=text["prompt_embeds"][:1],
        num_frames=spec.num_frames,
        height=spec.height,
        width=spec.width,
        num_inference_steps=4,
        output_type="latent",
        return_dict=False,
    )
    if fam == "hunyuan":
        return dict(
            kw,
            prompt_attention_mask=text["prompt_attention_mask"][:1].long(),
            pooled_prompt_embeds=text["pooled_prompt_embeds"][:1],
            latents=noise,
        )
    kw.update(prompt_attention_mask=text["prompt_attention_mask"][:1], guidance_scale=1.0)
    return dict(kw, latents=pipe._pack_latents(noise) if fam == "ltx" else noise)


def _sample_with_oracle(fam, pipe, text, x0, noise, output):
    """Run the real pipeline, the transformer's output replaced by ``output``; returns (final latents, calls)."""
    calls = []

    def hook(module, args, kwargs, out):
        calls.append((kwargs["hidden_states"].detach().clone(), kwargs["timestep"].detach().clone()))
        return (output.to(out[0].dtype),)

    handle = pipe.transformer.register_forward_hook(hook, with_kwargs=True)
    try:
        final = pipe(**_pipeline_kwargs(fam, pipe, text, SPECS[fam], noise))[0]
    finally:
        handle.remove()
    return final, calls


def test_flow_convention_matches_the_pipeline_sampler(family):
    """An ideal model of the trained objective, put into the pipeline, carries noise exactly to x0.

    On a straight flow path the velocity ``noise - x0`` is the same at every noise level, so the
    transformer output the adapter trains towards (``transformer_output(noise - x0)``) is a
    constant; the pipeline's scheduler must step from ``noise`` (s = 1) to ``x0`` (s = 0) with it,
    and each call's timestep must be the adapter's ``transformer_timestep`` of the noise level of
    the latents it was given.
    """
    fam, pipe, adapter, x0, text = family
    gen = torch.Generator().manual_seed(3)
    x0 = x0[:1]
    noise = torch.randn(x0.shape, generator=gen)
    pack = pipe._pack_latents if fam == "ltx" else (lambda z: z)
    x0_p, noise_p = pack(x0), pack(noise)
    final, calls = _sample_with_oracle(fam, pipe, text, x0, noise, adapter.transformer_output(noise_p - x0_p))
    torch.testing.assert_close(final.float(), x0_p, rtol=0, atol=2e-4)
    assert len(calls) == 4
    for hidden, t in calls:  # each input on the path, fed the timestep of its noise level
        check_on_flow_path(adapter, hidden.float(), x0_p, noise_p, t.float().view(-1)[:1], timestep_atol=0.05)
    if fam == "mochi":  # the unconverted convention (output = velocity) walks away from the data
        wrong, _ = _sample_with_oracle(fam, pipe, text, x0, noise, noise_p - x0_p)
        assert (wrong - x0_p).abs().max() > 0.5

    # predict() applies the same convention: fed that output it returns the velocity, and it gives
    # the transformer the timestep of the noise level the training loop samples
    seen = []

    def probe(module, args, kwargs, out):
        seen.append(kwargs["timestep"].detach().clone())
        return (adapter.transformer_output(noise_p - x0_p).to(out[0].dtype),)

    sigma = torch.tensor([0.3])
    handle = pipe.transformer.register_forward_hook(probe, with_kwargs=True)
    try:
        with torch.no_grad():
            v = adapter.predict(
                pipe.transformer, (1 - sigma) * x0 + sigma * noise, sigma * 1000.0, {k: t[:1] for k, t in text.items()}
            )
    finally:
        handle.remove()
    torch.testing.assert_close(v, noise - x0, rtol=0, atol=1e-5)
    torch.testing.assert_close(seen[0].float(), adapter.transformer_timestep(sigma), rtol=0, atol=1e-3)


def _expected_lora_modules(fam: str, transformer) -> set[str]:
    qkvo = ("to_q", "to_k", "to_v", "to_out.0")
    if fam == "hunyuan":
        double = {f"transformer_blocks.{i}.attn.{m}" for i in range(len(transformer.transformer_blocks)) for m in qkvo}
        single = {
            f"single_transformer_blocks.{i}.attn.{m}"
            for i in range(len(transformer.single_transformer_blocks))
            for m in qkvo[:3]
        }  # single-stream blocks have no attention output projection
        return double | single
    return {f"transformer_blocks.{i}.attn1.{m}" for i in range(len(transformer.transformer_blocks)) for m in qkvo}


def test_short_sparse_run_lowers_loss_and_reloads_in_diffusers(family, tmp_path):
    fam, pipe, adapter, x0, text = family
    transformer = adapter.transformer
    transformer.requires_grad_(False)
    cfg = TrainConfig(data_dir=str(tmp_path), output_dir=str(tmp_path), rank=4, pattern="radial")
    transformer.add_adapter(lora_config(cfg, adapter))
    lora = lora_module_names(transformer)
    assert lora == _expected_lora_modules(fam, transformer)
    attn = {path for path, _, _ in family_of(transformer).attention_paths(transformer)}
    assert {n.rsplit(".", 2 if n.endswith("to_out.0") else 1)[0] for n in lora} <= attn  # vidsparse's self-attention

    gen = torch.Generator().manual_seed(0)
    sigma = torch.tensor([0.35, 0.7])
    noise = torch.randn(x0.shape, generator=gen)

    def loss() -> torch.Tensor:
        return flow_loss(adapter, transformer, x0, text, sigma, noise)

    dense, before = sparse_objective(transformer, loss, SPARSE)
    assert abs(before - dense) > 1e-5  # the pattern is active (and not dense) in the objective trained
    after = train_steps(transformer, loss, 20)
    with torch.no_grad():
        trained = adapter.predict(transformer, x0, sigma * 1000, text)
    assert after < 0.9 * before, (before, after)  # on CPU: hunyuan 1.48 -> 1.09, ltx 1.61 -> 1.31

    save_lora(tmp_path, type(pipe), transformer)
    fresh = tiny_family_pipeline(fam)
    fresh.load_lora_weights(str(tmp_path))  # plain diffusers loading
    assert lora_module_names(fresh.transformer) == lora
    apply(fresh.transformer, SPARSE)
    with torch.no_grad():
        reloaded = adapter.predict(fresh.transformer, x0, sigma * 1000, text)
    torch.testing.assert_close(reloaded, trained, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fam", ["hunyuan", "ltx", "mochi"])
def test_train_lora_end_to_end(fam, tmp_path, monkeypatch):
    """``train_lora`` on a video folder: cache (bool masks, pooled embeds), batches of 2, export, reload.

    diffusers cannot load a pipeline saved without its text encoders from a folder, so the tiny
    pipeline is handed to the trainer in place of ``load_model``.
    """
    import json

    import vidsparse.lora.train as train_mod

    pipe = tiny_family_pipeline(fam)
    monkeypatch.setattr(train_mod, "load_model", lambda model, dtype: adapter_for(pipe, model))
    frames = {"hunyuan": 17, "ltx": 17, "mochi": 13}[fam]
    size = 64 if fam == "ltx" else 48
    result, out = train_tiny(tmp_path, f"tiny-{fam}", ClipSpec(frames, size, size), batch_size=2)
    assert result.cache.latents_computed == 3 and result.cache.text_computed == 3
    info = json.loads((out / "vidsparse_lora.json").read_text())
    assert info["family"] == fam and set(info["target_modules"]) == set(adapter_for(pipe, fam).default_target_modules)
    fresh = tiny_family_pipeline(fam)
    fresh.load_lora_weights(str(out))
    assert lora_module_names(fresh.transformer) == _expected_lora_modules(fam, fresh.transformer)


def test_ltx_default_shift_is_the_pipelines_resolution_shift():
    """LTX's scheduler shifts by sequence length; the training default takes the same shift."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.ltx.pipeline_ltx import calculate_shift

    pipe = tiny_family_pipeline("ltx")
    adapter = adapter_for(pipe, "tiny-ltx")
    with pytest.raises(RuntimeError, match="validate_clip"):
        adapter.default_flow_shift()
    spec = ClipSpec(33, 512, 768)  # 5 x 16 x 24 latents
    adapter.validate_clip(spec)
    cfg = pipe.scheduler.config
    mu = calculate_shift(5 * 16 * 24, cfg.base_image_seq_len, cfg.max_image_seq_len, cfg.base_shift, cfg.max_shift)
    sched = FlowMatchEulerDiscreteScheduler.from_config(cfg, shift_terminal=None)
    base = torch.linspace(1.0, 1 / 8, 8)
    sched.set_timesteps(sigmas=base.tolist(), mu=mu)
    torch.testing.assert_close(
        shift_sigmas(base, adapter.default_flow_shift()), sched.sigmas[:-1], rtol=1e-5, atol=1e-6
    )
    assert adapter_for(tiny_family_pipeline("hunyuan"), "h").default_flow_shift() == 7.0


def test_refused_pipelines_say_why():
    import diffusers

    cog = object.__new__(diffusers.CogVideoXFunControlPipeline)  # refused by class before anything is read
    with pytest.raises(ValueError, match="control-video latents"):
        adapter_for(cog, "alibaba-pai/CogVideoX-Fun-V1.1-5b-Pose")  # (T2V / I2V train: tests/test_lora_cogvideox*.py)
    two = build_tiny_pipeline(0, two_stage=True)  # trains one LoRA per expert (tests/test_lora_wan22.py) ...
    two.register_to_config(boundary_ratio=None)  # ... split at the pipeline's boundary_ratio
    with pytest.raises(ValueError, match="two-expert Wan 2.2"):
        adapter_for(two, "Wan-AI/Wan2.2-T2V-A14B-Diffusers")
    with pytest.raises(ValueError, match="invert_sigmas=True"):
        adapter_for(tiny_family_pipeline("mochi", invert_sigmas=False), "genmo/mochi-1-preview")
    with pytest.raises(ValueError, match="long multi-prompt"):  # (LTXConditionPipeline trains: test_lora_ltx_condition)
        adapter_for(object.__new__(diffusers.LTXI2VLongMultiPromptPipeline), "Lightricks/LTX-Video-0.9.8-13B-distilled")
