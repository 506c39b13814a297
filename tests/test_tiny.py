"""The embedded tiny models: a real WanPipeline call and tiny transformers of every family."""

import pytest
import torch

from vidsparse.models import (
    TINY_FAMILIES,
    build_tiny_pipeline,
    encode_prompt_tiny,
    run_tiny_pipeline,
    tiny_inputs,
    tiny_transformer,
)

# Mochi's RoPE asks for an fp32 autocast region, which CPU autocast does not support (harmless).
pytestmark = pytest.mark.filterwarnings("ignore:In CPU autocast:UserWarning")


def test_tiny_pipeline_full_call_decodes_frames():
    pipe = build_tiny_pipeline(seed=0)
    assert pipe.tokenizer is None and pipe.text_encoder is None
    frames = run_tiny_pipeline(
        pipe, "a cat", num_frames=9, height=32, width=32, num_inference_steps=2, output_type="np"
    )
    assert frames.shape == (1, 9, 32, 32, 3)
    assert bool((frames >= 0).all() and (frames <= 1).all())


def test_tiny_pipeline_is_deterministic_and_prompt_dependent():
    a = run_tiny_pipeline(build_tiny_pipeline(seed=0), "a cat", num_inference_steps=2)
    b = run_tiny_pipeline(build_tiny_pipeline(seed=0), "a cat", num_inference_steps=2)
    c = run_tiny_pipeline(build_tiny_pipeline(seed=0), "a dog", num_inference_steps=2)
    d = run_tiny_pipeline(build_tiny_pipeline(seed=1), "a cat", num_inference_steps=2)
    assert a.shape == (1, 4, 3, 4, 4)  # latents: 9 frames -> 3, 32 px -> 4
    assert torch.equal(a, b)
    assert not torch.allclose(a, c) and not torch.allclose(a, d)


def test_two_stage_pipeline_has_two_transformers():
    pipe = build_tiny_pipeline(two_stage=True)
    assert pipe.transformer_2 is not None and pipe.config.boundary_ratio == 0.5
    out = run_tiny_pipeline(pipe, num_inference_steps=4, height=48, width=32)
    assert out.shape == (1, 4, 3, 6, 4) and bool(torch.isfinite(out).all())


def test_encode_prompt_tiny():
    a = encode_prompt_tiny("a red car")
    assert a.shape == (1, 8, 16) and a.dtype == torch.float32
    assert torch.equal(a, encode_prompt_tiny("a red car"))
    assert not torch.allclose(a, encode_prompt_tiny("a red cat"))
    b = encode_prompt_tiny("x", seq_len=5, dim=4, batch=3, dtype=torch.float64)
    assert b.shape == (3, 5, 4) and b.dtype == torch.float64 and torch.equal(b[0], b[2])
    state = torch.random.get_rng_state()
    encode_prompt_tiny("does not touch the global generator")
    assert torch.equal(state, torch.random.get_rng_state())
    with pytest.raises(TypeError, match="str"):
        encode_prompt_tiny(3)
    with pytest.raises(ValueError, match="seq_len"):
        encode_prompt_tiny("a", seq_len=0)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_tiny_transformer_runs(family):
    model = tiny_transformer(family)
    frames = 4 if family == "cogvideox-1.5" else 3
    inputs = tiny_inputs(family, model, frames=frames, height=4, width=4, batch=2)
    with torch.no_grad():
        out = model(**inputs).sample  # not return_dict=False: Kandinsky 5 then returns a bare tensor
    assert bool(torch.isfinite(out).all())
    assert out.shape == inputs["hidden_states"].shape[:1] + out.shape[1:]
    if family == "ltx":
        assert out.shape == (2, frames * 16, 4)
    # Same seed, same weights; other seed, other weights.
    same = tiny_transformer(family)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), same.parameters()))
    other = tiny_transformer(family, seed=1)
    assert not all(torch.equal(p, q) for p, q in zip(model.parameters(), other.parameters()))


def test_tiny_transformer_overrides_and_errors():
    model = tiny_transformer("wan", num_layers=3)
    assert len(model.blocks) == 3
    with pytest.raises(ValueError, match="Unknown tiny family"):
        tiny_transformer("sora")
    with pytest.raises(ValueError, match="Unknown tiny family"):
        tiny_inputs("sora", model)


def test_tiny_transformer_stays_a_function_after_the_trained_model_loads():
    """No submodule of vidsparse.models is named like one of its functions: importing it (as
    loading the trained tiny pipeline does) would rebind the package attribute to the module."""
    import importlib
    import pkgutil

    import vidsparse.models as models

    names = {m.name for m in pkgutil.iter_modules(models.__path__)}
    assert not names & set(models.__all__), names & set(models.__all__)
    importlib.import_module("vidsparse.models.tiny_wan_model")
    from vidsparse.models import tiny_transformer

    assert callable(tiny_transformer) and not isinstance(tiny_transformer, type(models))
