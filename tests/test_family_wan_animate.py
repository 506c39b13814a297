"""The Wan-Animate family (vidsparse/families/wan_animate.py) on a tiny random-init
WanAnimateTransformer3DModel: the Wan blocks' self-attention is patched (the reference frame + the
pose-driven frames on one grid); the face adapter and cross-attention stay the model's own."""

import pytest
from family_checks import (
    check_compile,
    check_dense_equals_unpatched_and_remove_is_exact,
    check_every_pattern_runs,
    check_sparse_patterns_differ,
    config,
    discovered,
    setup,
)

import vidsparse as vs
from vidsparse.cli import main
from vidsparse.families import family_of, family_of_pipeline, get_family, video_geometry
from vidsparse.families.wan import WanSparseProcessor
from vidsparse.families.wan_animate import FAMILY

pytestmark = pytest.mark.filterwarnings("ignore:In CPU autocast:UserWarning")

LATENT = (4, 8, 8)  # reference frame + 3 frames -> 4x4x4 tokens
RAGGED = (3, 10, 12)  # -> 3x5x6 tokens


def test_registry_and_geometry():
    model, _ = setup("wan-animate", LATENT)
    assert get_family("wan-animate") is FAMILY and family_of(model) is FAMILY
    assert family_of_pipeline("WanAnimatePipeline") is FAMILY and FAMILY.tiny_pipeline is not None
    geo = video_geometry("wan-animate")
    assert geo.default_video == (77, 720, 1280) and geo.fps == 30
    assert geo.latent_grid(77, 720, 1280) == (20, 45, 80)  # + the reference frame in the transformer call
    with pytest.raises(ValueError, match="nearest valid: 77 or 81"):
        geo.check_video(78, 720, 1280)


def test_dense_equals_unpatched_remove_exact_and_only_self_attention_is_patched():
    model, inputs = setup("wan-animate", LATENT, batch=2)
    check_dense_equals_unpatched_and_remove_is_exact(model, inputs)
    seen = discovered(model, inputs)
    assert [layer for _, layer, _ in seen] == [0, 1]
    assert all(layout == vs.VideoLayout(4, 4, 4) and shape == (2, 64, 2, 8) for layout, _, shape in seen)
    vs.apply(model, config("dense"))
    assert all(isinstance(b.attn1.processor, WanSparseProcessor) for b in model.blocks)
    assert all(type(b.attn2.processor).__name__ == "WanAttnProcessor" for b in model.blocks)
    assert all(type(f.processor).__name__ == "WanAnimateFaceBlockAttnProcessor" for f in model.face_adapter)
    vs.remove(model)


def test_every_pattern_runs_on_regular_and_ragged_grids():
    for latent, grid in ((LATENT, (4, 4, 4)), (RAGGED, (3, 5, 6))):
        model, inputs = setup("wan-animate", latent, num_layers=1, inject_face_latents_blocks=1)
        check_every_pattern_runs(model, inputs, vs.VideoLayout(*grid))


def test_sparse_patterns_differ_from_dense():
    check_sparse_patterns_differ(*setup("wan-animate", LATENT), vs.VideoLayout(4, 4, 4))


def test_torch_compile_of_the_patched_transformer():
    check_compile(*setup("wan-animate", LATENT, num_layers=1, inject_face_latents_blocks=1))


def test_refusals_name_what_is_missing():
    with pytest.raises(ValueError, match="train-lora does not train wan-animate: .*pose latents"):
        FAMILY.lora_adapter_class()
    # --parallel: the face adapter's motion vectors are cut per frame (tests/test_parallel_families.py)
    assert FAMILY.require_shard_plan().inputs["face_adapter.*"]["encoder_hidden_states"].per_frame
    with pytest.raises(ValueError, match="frames >= 2"):
        setup("wan-animate", (1, 8, 8))


def test_inspect_knows_the_family(capsys):
    assert main(["inspect", "--pattern", "tile", "--video", "77x720x1280", "--family", "wan-animate", "--no-plot"]) == 0
    assert "20x45x80" in capsys.readouterr().out


# generate on a WanAnimatePipeline (its videos, the refusals before loading): tests/test_generate_wan_animate.py
