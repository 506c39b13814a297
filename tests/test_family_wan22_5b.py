"""Wan 2.2 TI2V-5B in the Wan family (vidsparse/families/wan.py): the 48-channel transformer picks
the 16x-space geometry of the Wan 2.2 VAE, per-token timesteps [B, S], and the real WanPipeline
with ``expand_timesteps=True`` end to end on a tiny random-init copy."""

import pytest
import torch
from family_checks import (
    check_compile,
    check_dense_equals_unpatched_and_remove_is_exact,
    check_every_pattern_runs,
    check_generate_tiny,
    check_generate_validates_sizes,
    check_sparse_patterns_differ,
    discovered,
    setup,
)

import vidsparse as vs
from vidsparse.cli import main
from vidsparse.families import family_of, get_family, video_geometry
from vidsparse.families.wan import FAMILY, TI2V_GEOMETRY
from vidsparse.models import run_tiny_pipeline
from vidsparse.pipelines import get_state

pytestmark = pytest.mark.filterwarnings("ignore:In CPU autocast:UserWarning")

LATENT = (4, 8, 8)  # -> 4x4x4 tokens
RAGGED = (3, 10, 12)  # -> 3x5x6 tokens


def test_geometry_is_picked_from_the_transformer_config():
    model, _ = setup("wan22-5b", LATENT)
    assert family_of(model) is FAMILY and get_family("wan22-5b") is FAMILY
    assert FAMILY.geometry_for(dict(model.config)) == TI2V_GEOMETRY
    assert FAMILY.geometry_for({"in_channels": 16, "out_channels": 16}).name == "wan"
    assert FAMILY.geometry_for({"in_channels": 36, "out_channels": 16}).name == "wan"  # Wan 2.2 I2V-A14B
    for name in ("wan22-5b", "wan2.2-5b", "Wan2.2-TI2V-5B"):
        assert video_geometry(name) is TI2V_GEOMETRY
    geo = TI2V_GEOMETRY
    assert geo.default_video == (121, 704, 1280) and geo.fps == 24
    assert geo.latent_grid(121, 704, 1280) == (31, 22, 40)
    # Wan 2.1's 720p is not a TI2V-5B size (720 = 22.5 x 32): that is why its pipeline uses 704.
    with pytest.raises(ValueError, match="height=720: must be a multiple of 32 .*nearest valid: 704 or 736"):
        geo.check_video(121, 720, 1280)
    video_geometry("wan").check_video(121, 720, 1280)
    with pytest.raises(
        ValueError, match="width=840: must be a multiple of 32 \\(16x VAE x 2 patch\\); nearest valid: 832 or 864"
    ):
        geo.check_video(121, 704, 840)


def test_geometry_matches_the_tiny_pipeline_latents(tmp_path):
    pipe = FAMILY.tiny_pipeline(variant="wan22-5b")
    check_generate_validates_sizes(
        pipe,
        tmp_path / "ti2v",
        (121, 704, 1264),
        "width=1264: must be a multiple of 32",
        (121, 704, 1280),
        (31, 22, 40),
        24,
    )
    assert pipe.vae_scale_factor_spatial == TI2V_GEOMETRY.spatial and pipe.config.expand_timesteps
    frames, height, width = 9, 64, 96
    latents = run_tiny_pipeline(pipe, num_frames=frames, height=height, width=width, num_inference_steps=1)
    _, c, f, h, w = latents.shape
    pt, ph, pw = pipe.transformer.config.patch_size
    assert c == 48 and TI2V_GEOMETRY.latent_grid(frames, height, width) == (f // pt, h // ph, w // pw) == (3, 2, 3)
    with pytest.raises(ValueError, match="two_stage"):
        FAMILY.tiny_pipeline(variant="wan22-5b", two_stage=True)
    with pytest.raises(ValueError, match="Unknown tiny Wan pipeline variant 'wan3'"):
        FAMILY.tiny_pipeline(variant="wan3")


def test_dense_equals_unpatched_remove_exact_and_layout_with_per_token_timesteps():
    model, inputs = setup("wan22-5b", LATENT, batch=2)
    assert inputs["timestep"].shape == (2, 64) and not bool(inputs["timestep"][:, :16].any())
    check_dense_equals_unpatched_and_remove_is_exact(model, inputs)
    seen = discovered(model, inputs)
    assert [layer for _, layer, _ in seen] == [0, 1]
    assert all(layout == vs.VideoLayout(4, 4, 4) for layout, _, _ in seen)


def test_every_pattern_runs_on_regular_and_ragged_grids():
    for latent, grid in ((LATENT, (4, 4, 4)), (RAGGED, (3, 5, 6))):
        model, inputs = setup("wan22-5b", latent, num_layers=1)
        check_every_pattern_runs(model, inputs, vs.VideoLayout(*grid))


def test_sparse_patterns_differ_from_dense():
    check_sparse_patterns_differ(*setup("wan22-5b", LATENT), vs.VideoLayout(4, 4, 4))


def test_torch_compile_of_the_patched_transformer():
    check_compile(*setup("wan22-5b", LATENT, num_layers=1))


def test_inspect_knows_the_geometry(capsys):
    assert main(["inspect", "--pattern", "radial", "--video", "121x704x1280", "--family", "wan22-5b", "--no-plot"]) == 0
    assert "31x22x40" in capsys.readouterr().out


def test_pipeline_end_to_end_steps_from_the_cache_context():
    """WanPipeline(expand_timesteps=True), 2 steps + CFG: the per-token timestep does not
    disturb the step count (the pipeline's cache context gives it); steps after the dense
    warm-up are sparse."""
    pipe = FAMILY.tiny_pipeline(variant="wan22-5b")
    vs.apply(pipe, vs.SparseConfig("tile", backend="torch", block_size=16, dense_first_steps=1))
    state = get_state(pipe.transformer)
    calls = []
    begin = state.begin_call

    def spy(*args):
        info = begin(*args)
        calls.append((info.branch, info.step, info.total_steps, info.layout))
        return info

    state.begin_call = spy
    out = run_tiny_pipeline(pipe, num_frames=9, height=64, width=96, num_inference_steps=2)
    assert bool(torch.isfinite(out).all())
    grid = vs.VideoLayout(*TI2V_GEOMETRY.latent_grid(9, 64, 96))
    assert calls == [("cond", 0, 2, grid), ("uncond", 0, 2, grid), ("cond", 1, 2, grid), ("uncond", 1, 2, grid)]
    assert state.calls["sparse"] == 2 * 2 and state.calls["dense"] == 2 * 2
    vs.remove(pipe)


def test_lora_adapter_takes_the_ti2v_pipeline():
    """train-lora uses Wan's adapter: it reads the pipeline's 16x / 4x VAE factors and 48-channel
    latent statistics, and its scalar training timestep is what the pipeline's per-token timestep
    is for text-to-video (every token at t)."""
    from vidsparse.lora.models import adapter_for

    pipe = FAMILY.tiny_pipeline(variant="wan22-5b")
    adapter = adapter_for(pipe, "tiny")
    assert type(adapter) is FAMILY.lora_adapter_class()[0]  # WanModel (WanI2VModel: tests/test_lora_wan_i2v.py)
    z = adapter.encode_video(torch.rand(1, 3, 9, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1)
    assert z.shape == (1, 48, 3, 4, 4)
    text = {k: v[None] for k, v in adapter.encode_text("a cat").items()}
    with torch.no_grad():
        scalar = adapter.predict(pipe.transformer, z, torch.tensor([500.0]), text)
        per_token = adapter.predict(pipe.transformer, z, torch.full((1, 3 * 2 * 2), 500.0), text)
    assert scalar.shape == z.shape
    torch.testing.assert_close(scalar, per_token, atol=1e-5, rtol=1e-5)


def test_generate_tiny_wan22_5b():
    check_generate_tiny("tiny-wan22-5b", "wan22-5b", (3, 6, 10), 24)
