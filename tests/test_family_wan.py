"""The Wan family record (vidsparse/families/wan.py): every field against the diffusers model it
describes. The template for tests/test_family_<name>.py of new families (docs/architecture.md)."""

import pytest
import torch

import vidsparse as vs
from vidsparse.families import (
    family_of,
    family_of_pipeline,
    get_family,
    video_geometry,
)
from vidsparse.families.wan import FAMILY, WanSparseProcessor
from vidsparse.models import run_tiny_pipeline, tiny_inputs, tiny_transformer
from vidsparse.pipelines import get_state


def _run(model, inputs):
    with torch.no_grad():
        return model(**inputs, return_dict=False)[0]


def test_registry_finds_wan_by_name_alias_transformer_and_pipeline():
    assert get_family("wan") is FAMILY
    assert get_family("Wan2.2") is FAMILY and get_family("WAN_2.1") is FAMILY
    assert family_of(tiny_transformer("wan")) is FAMILY
    assert family_of(tiny_transformer("wan-i2v")) is FAMILY
    assert family_of_pipeline("WanPipeline") is FAMILY
    assert family_of_pipeline("WanImageToVideoPipeline") is FAMILY
    assert family_of_pipeline("FluxPipeline") is None
    with pytest.raises(ValueError, match="Unknown model family 'wan3'. Expected one of: wan, "):
        get_family("wan3")


def test_geometry_matches_the_tiny_pipeline_latents():
    """The record's VAE and patch factors give the token grid the real WanPipeline produces."""
    pipe = FAMILY.tiny_pipeline()
    geo = video_geometry("wan")
    assert geo is FAMILY.geometry and geo.fps == 16 and geo.default_video == (81, 480, 832)
    frames, height, width = 9, 32, 64
    latents = run_tiny_pipeline(pipe, num_frames=frames, height=height, width=width, num_inference_steps=1)
    pt, ph, pw = pipe.transformer.config.patch_size
    assert tuple(pipe.transformer.config.patch_size) == geo.patch
    _, _, f, h, w = latents.shape
    assert geo.latent_grid(frames, height, width) == (f // pt, h // ph, w // pw) == (3, 2, 4)
    with pytest.raises(ValueError, match="frames must be 1 \\+ a multiple of 4; nearest valid: 9 or 13"):
        geo.latent_grid(10, 32, 64)


def test_dense_patch_is_exact_and_layout_is_discovered():
    model = tiny_transformer("wan")
    inputs = tiny_inputs("wan", model, 4, 8, 8, batch=2)
    ref = _run(model, inputs)
    vs.apply(model, vs.SparseConfig(vs.Dense(), backend="torch", dense_first_steps=0, dense_layers=()))
    assert all(isinstance(m.processor, WanSparseProcessor) for _, m, _ in FAMILY.attention_paths(model))
    out = _run(model, inputs)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    layout = get_state(model).current.layout
    assert layout == vs.VideoLayout(4, 4, 4)  # patch (1, 2, 2), video only: text is cross-attention
    vs.remove(model)
    assert torch.equal(_run(model, inputs), ref)


def test_sparse_pattern_runs_and_differs_from_dense():
    model = tiny_transformer("wan")
    inputs = tiny_inputs("wan", model, 4, 8, 8, batch=1)
    ref = _run(model, inputs)
    vs.apply(
        model,
        vs.SparseConfig(
            vs.Tile(tile=(1, 2, 2), window=(1, 1, 1)), backend="torch", dense_first_steps=0, dense_layers=()
        ),
    )
    out = _run(model, inputs)
    vs.remove(model)
    assert out.shape == ref.shape and torch.isfinite(out).all()
    assert not torch.allclose(out, ref, atol=1e-4)


def test_pattern_defaults_and_schedule():
    big = vs.VideoLayout(21, 30, 52)
    assert FAMILY.pattern_options("radial", big, None) == dict(decay_factor=0.2, sink=True, block_size=128)
    assert FAMILY.pattern_options("radial", big, None, two_stage=True) == dict(
        decay_factor=0.8, sink=True, block_size=64
    )
    small = vs.VideoLayout(3, 4, 4)  # 16 tokens per frame: radial's block shrinks to the grid's
    assert FAMILY.pattern_options("radial", small, None)["block_size"] == 16
    assert FAMILY.pattern_options("tile", small, None) == dict(tile=(2, 4, 4), window=(5, 3, 3))
    assert FAMILY.pattern_options("gna", small, None) == dict(kernel_size=(-1, -1, -1), stride=(1, 1, 1))
    assert FAMILY.pattern_options("vmoba", small, None) == {}
    assert FAMILY.default_schedule("radial") == (0.25, (0,))
    assert FAMILY.default_schedule("tile") == (0.25, ())
    assert FAMILY.default_schedule("dense") == (0, ())


def test_lora_adapter_and_shard_plan_fit_the_model():
    from vidsparse.lora.models import adapter_for

    adapter = adapter_for(FAMILY.tiny_pipeline(), "tiny")
    assert type(adapter) is FAMILY.lora_adapter_class()[0]  # WanModel (WanI2VModel: tests/test_lora_wan_i2v.py)
    two = FAMILY.tiny_pipeline(two_stage=True)  # Wan 2.2 A14B trains one LoRA per expert (test_lora_wan22.py)
    assert set(adapter_for(two, "tiny").lora_files) == {"transformer", "transformer_2"}
    two.register_to_config(boundary_ratio=None)  # ... and needs the boundary between them
    with pytest.raises(ValueError, match="two-expert Wan 2.2"):
        adapter_for(two, "tiny")
    model = tiny_transformer("wan")
    plan = FAMILY.require_shard_plan()
    for path in (*plan.inputs, *plan.outputs, *plan.gather):
        assert path == "" or model.get_submodule(path) is not None


def test_tiny_model_names_come_from_the_registry():
    from vidsparse.generation import resolve_model, tiny_models

    assert tiny_models()[:3] == ("tiny", "tiny-random", "tiny-wan")
    info = resolve_model("tiny-wan")
    assert (
        info.kind == "tiny" and info.model_family is FAMILY and info.defaults == resolve_model("tiny-random").defaults
    )
    with pytest.raises(ValueError, match="no such tiny pipeline. Embedded ones: tiny, tiny-random, tiny-wan"):
        resolve_model("tiny-sora")
