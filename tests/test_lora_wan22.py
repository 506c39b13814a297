"""Wan 2.2 A14B LoRA: one LoRA per expert, each trained on the timesteps its expert serves.

The tiny two-expert Wan pipeline (``transformer`` high noise, ``transformer_2`` low noise,
``boundary_ratio=0.5``) stands in for Wan2.2-T2V-A14B. Checked: the trained module routes every
timestep to the expert ``WanPipeline.__call__`` uses for it; a short ``train_lora`` run updates
both experts' LoRAs, each only on its own side of the boundary; the two files load with diffusers'
``load_into_transformer_2`` convention (and through ``vidsparse.lora.load_lora`` and
``generate``'s loader) and reproduce the trained experts.
"""

import json

import pytest
import torch
from lora_checks import lora_module_names

from vidsparse.lora import TrainConfig
from vidsparse.lora.export import LORA_WEIGHT_NAME, LORA_WEIGHT_NAME_2
from vidsparse.lora.models import adapter_for
from vidsparse.models.tiny import build_tiny_pipeline, encode_prompt_tiny

# LoRA training runs: outside the quick subset (pytest -m "not slow"), always in CI
pytestmark = pytest.mark.slow


def _two_expert():
    return build_tiny_pipeline(0, two_stage=True)


def test_routing_is_the_pipelines():
    pipe = _two_expert()
    adapter = adapter_for(pipe, "Wan-AI/Wan2.2-T2V-A14B-Diffusers")
    experts = adapter.transformer
    assert experts.boundary_timestep == 500.0 and adapter.lora_files == {
        "transformer": LORA_WEIGHT_NAME,
        "transformer_2": LORA_WEIGHT_NAME_2,
    }
    seen = {"transformer": [], "transformer_2": []}
    handles = [
        getattr(pipe, name).register_forward_pre_hook(
            lambda m, a, kw, name=name: seen[name].append(float(kw["timestep"].flatten()[0])), with_kwargs=True
        )
        for name in seen
    ]
    try:
        emb = encode_prompt_tiny("a cat", dim=pipe.transformer.config.text_dim)
        pipe(prompt_embeds=emb, negative_prompt_embeds=emb, num_frames=5, height=32, width=32,
             num_inference_steps=6, guidance_scale=1.0, output_type="latent")  # fmt: skip
    finally:
        for h in handles:
            h.remove()
    assert seen["transformer"] and seen["transformer_2"]  # the sampler used both experts
    for name, steps in seen.items():
        routed = experts.high_noise(torch.tensor(steps))
        assert bool(routed.all()) if name == "transformer" else not bool(routed.any()), (name, steps)

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 2, 8, 8, generator=gen)
    text = torch.randn(2, 8, pipe.transformer.config.text_dim, generator=gen)
    t = torch.tensor([800.0, 100.0])
    with torch.no_grad():
        out = experts(hidden_states=x, timestep=t, encoder_hidden_states=text)[0]
        hi = pipe.transformer(hidden_states=x[:1], timestep=t[:1], encoder_hidden_states=text[:1], return_dict=False)[0]
        lo = pipe.transformer_2(hidden_states=x[1:], timestep=t[1:], encoder_hidden_states=text[1:], return_dict=False)[
            0
        ]
    torch.testing.assert_close(out, torch.cat([hi, lo]))


def test_two_expert_run_trains_each_on_its_side_and_reloads(tmp_path, monkeypatch):
    from test_lora_data import make_dataset

    import vidsparse.lora.train as train_mod
    from vidsparse.generation.loading import load_lora as generate_load_lora
    from vidsparse.lora import load_lora, train_lora

    pipe = _two_expert()
    monkeypatch.setattr(train_mod, "load_model", lambda model, dtype: adapter_for(pipe, model))
    seen = {"transformer": [], "transformer_2": []}
    for name in seen:
        getattr(pipe, name).register_forward_pre_hook(
            lambda m, a, kw, name=name: seen[name].extend(kw["timestep"].flatten().tolist()), with_kwargs=True
        )
    out = tmp_path / "out"
    result = train_lora(TrainConfig(
        data_dir=str(make_dataset(tmp_path / "data")), output_dir=str(out), model="tiny-wan22", num_frames=9,
        height=32, width=32, rank=4, batch_size=2, max_train_steps=4, checkpointing_steps=4, learning_rate=1e-2,
        mixed_precision="no", attention_backend="torch", pattern="radial", timestep_sampling="uniform",
        progress=False,
    ))  # fmt: skip
    assert len(result.losses) == 4 and result.lora_path == out / LORA_WEIGHT_NAME
    assert seen["transformer"] and seen["transformer_2"]
    assert min(seen["transformer"]) >= 500 and max(seen["transformer_2"]) < 500  # each expert on its own side
    info = json.loads((out / "vidsparse_lora.json").read_text())
    assert info["lora_files"] == {"transformer": LORA_WEIGHT_NAME, "transformer_2": LORA_WEIGHT_NAME_2}
    for name in seen:  # both LoRAs moved away from their zero init
        expert = getattr(pipe, name)
        assert any(p.abs().max() > 0 for n, p in expert.named_parameters() if "lora_B" in n), name

    x = torch.randn(1, 4, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    text = encode_prompt_tiny("a red ball", dim=pipe.transformer.config.text_dim)
    t = torch.tensor([300.0])

    def outputs(p):
        with torch.no_grad():
            return [getattr(p, n)(hidden_states=x, timestep=t, encoder_hidden_states=text, return_dict=False)[0]
                    for n in ("transformer", "transformer_2")]  # fmt: skip

    from vidsparse.pipelines import remove

    remove(pipe)  # compare dense: the reloaded pipelines are not patched
    trained = outputs(pipe)
    plain = _two_expert()  # diffusers' own convention
    plain.load_lora_weights(str(out))
    plain.load_lora_weights(str(out), weight_name=LORA_WEIGHT_NAME_2, load_into_transformer_2=True)
    ours, gen = _two_expert(), _two_expert()
    load_lora(ours, out)
    generate_load_lora(gen, out, 1.0)
    for p in (plain, ours, gen):
        assert lora_module_names(p.transformer) and lora_module_names(p.transformer_2)
        for got, want in zip(outputs(p), trained):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="transformer_2"):  # a single-transformer Wan cannot take both
        load_lora(build_tiny_pipeline(0), out)
    with pytest.raises(ValueError, match="transformer_2"):
        generate_load_lora(build_tiny_pipeline(0), out, 1.0)


def test_two_expert_pipeline_needs_a_boundary():
    pipe = _two_expert()
    pipe.register_to_config(boundary_ratio=None)
    with pytest.raises(ValueError, match="boundary_ratio"):
        adapter_for(pipe, "Wan-AI/Wan2.2-T2V-A14B-Diffusers")
