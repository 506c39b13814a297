"""The Wan VACE family (vidsparse/families/wan_vace.py) on a tiny random-init
WanVACETransformer3DModel / WanVACEPipeline: the main blocks' and the control blocks'
self-attention are both patched, on the video's token grid."""

import numpy as np
import pytest
import torch
from family_checks import (
    check_compile,
    check_dense_equals_unpatched_and_remove_is_exact,
    check_every_pattern_runs,
    check_generate_tiny,
    check_generate_validates_sizes,
    check_sparse_patterns_differ,
    config,
    discovered,
    run,
    setup,
)
from PIL import Image

import vidsparse as vs
from vidsparse.cli import main
from vidsparse.families import family_of, family_of_pipeline, get_family, video_geometry
from vidsparse.families.wan import WanSparseProcessor
from vidsparse.families.wan_vace import FAMILY
from vidsparse.models import encode_prompt_tiny, tiny_transformer
from vidsparse.pipelines import get_state

pytestmark = pytest.mark.filterwarnings("ignore:In CPU autocast:UserWarning")

LATENT = (4, 8, 8)  # -> 4x4x4 tokens
RAGGED = (3, 10, 12)  # -> 3x5x6 tokens


def test_registry_paths_and_geometry():
    model, _ = setup("wan-vace", LATENT)
    assert get_family("VACE") is FAMILY and family_of(model) is FAMILY
    assert family_of_pipeline("WanVACEPipeline") is FAMILY and family_of_pipeline("WanPipeline").name == "wan"
    paths = FAMILY.attention_paths(model)
    assert [(p, layer) for p, _, layer in paths] == [
        ("blocks.0.attn1", 0),
        ("blocks.1.attn1", 1),
        ("vace_blocks.0.attn1", 2),
        ("vace_blocks.1.attn1", 3),
    ]
    geo = video_geometry("wan-vace")
    assert geo.default_video == (81, 480, 832) and geo.fps == 16 and geo.latent_grid(81, 480, 832) == (21, 30, 52)
    with pytest.raises(ValueError, match="multiple of 16"):
        geo.check_video(81, 480, 830)


def test_dense_equals_unpatched_remove_exact_and_both_branches_are_patched():
    model, inputs = setup("wan-vace", LATENT, batch=2)
    check_dense_equals_unpatched_and_remove_is_exact(model, inputs)
    seen = discovered(model, inputs)
    # The control branch runs first (its hints are added to the main blocks' outputs).
    assert [layer for _, layer, _ in seen] == [2, 3, 0, 1]
    assert all(layout == vs.VideoLayout(4, 4, 4) and shape == (2, 64, 2, 8) for layout, _, shape in seen)
    vs.apply(model, config("dense"))
    assert all(isinstance(m.processor, WanSparseProcessor) for _, m, _ in FAMILY.attention_paths(model))
    assert all(type(b.attn2.processor).__name__ == "WanAttnProcessor" for b in (*model.blocks, *model.vace_blocks))
    vs.remove(model)


def test_every_pattern_runs_on_regular_and_ragged_grids():
    for latent, grid in ((LATENT, (4, 4, 4)), (RAGGED, (3, 5, 6))):
        model, inputs = setup("wan-vace", latent, num_layers=1, vace_layers=[0])
        check_every_pattern_runs(model, inputs, vs.VideoLayout(*grid))


def test_sparse_patterns_differ_from_dense():
    check_sparse_patterns_differ(*setup("wan-vace", LATENT), vs.VideoLayout(4, 4, 4))


def test_control_branch_only_sparse_changes_the_output():
    """A sparse pattern on the VACE layers alone (main layers dense) still changes the result:
    the control branch's self-attention is really replaced."""
    model, inputs = setup("wan-vace", LATENT)
    ref = run(model, inputs)
    tile = vs.make_pattern("tile", tile=(1, 2, 2), window=(1, 1, 1))
    vs.apply(model, config(tile, dense_layers=(0, 1)))
    out = run(model, inputs)
    state = get_state(model)
    assert state.calls["sparse"] == 2 and state.calls["dense"] == 2
    assert (out - ref).abs().max() > 1e-4
    vs.remove(model)


def test_torch_compile_of_the_patched_transformer():
    check_compile(*setup("wan-vace", LATENT, num_layers=1, vace_layers=[0]))


def test_lora_adapter_and_the_shard_plan_fits_the_model():
    # trained as text-to-video with the pipeline's empty control (tests/test_lora_wan_vace.py)
    assert FAMILY.lora_adapter_class().pipeline_classes == ("WanVACEPipeline",)
    model = tiny_transformer("wan-vace")
    plan = FAMILY.require_shard_plan()  # vidsparse.parallel runs it (tests/test_parallel_new_families.py)
    for path in (*plan.inputs, *plan.outputs, *plan.gather):
        assert path == "" or model.get_submodule(path) is not None


def test_inspect_knows_the_family(capsys):
    assert main(["inspect", "--pattern", "tile", "--video", "81x480x832", "--family", "wan-vace", "--no-plot"]) == 0
    assert "21x30x52" in capsys.readouterr().out


def test_pipeline_end_to_end_with_control_video_and_reference_image(tmp_path):
    """The real WanVACEPipeline, 2 steps: a control video + mask + one reference image (one more
    latent frame in front); the grid is read from the call's latents."""
    pipe = FAMILY.tiny_pipeline()
    dim = pipe.transformer.config.text_dim
    rng = np.random.default_rng(0)
    frames, height, width = 5, 32, 32
    video = [Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)) for _ in range(frames)]
    mask = [Image.new("L", (width, height), 255) for _ in range(frames)]
    kw = dict(video=video, mask=mask, reference_images=[video[0]], num_frames=frames, height=height, width=width)
    kw.update(
        prompt_embeds=encode_prompt_tiny("a cat", dim=dim), negative_prompt_embeds=encode_prompt_tiny("", dim=dim)
    )
    kw.update(num_inference_steps=2, output_type="latent")
    ref = pipe(**kw, generator=torch.Generator().manual_seed(0)).frames
    vs.apply(pipe, vs.SparseConfig("radial", backend="torch", block_size=16, dense_first_steps=0, dense_layers=()))
    state = get_state(pipe.transformer)
    layouts = set()
    attention = state.attention_fn
    state.attention_fn = lambda q, k, v, layout, pattern, **kw: (
        layouts.add(layout) or attention(q, k, v, layout, pattern, **kw)
    )
    out = pipe(**kw, generator=torch.Generator().manual_seed(0)).frames
    grid = video_geometry("wan-vace").latent_grid(frames, height, width)
    assert layouts == {vs.VideoLayout(grid[0] + 1, *grid[1:])}  # + the reference frame
    assert state.calls["sparse"] == 2 * 2 * 4  # steps x CFG branches x (2 main + 2 control) layers
    assert out.shape == ref.shape and bool(torch.isfinite(out).all())
    vs.remove(pipe)
    check_generate_validates_sizes(
        pipe, tmp_path / "vace", (80, 480, 832), "nearest valid: 77 or 81", (81, 480, 832), (21, 30, 52), 16
    )
    assert all(type(m.processor).__name__ == "WanAttnProcessor" for _, m, _ in FAMILY.attention_paths(pipe.transformer))


def test_generate_tiny_wan_vace():
    check_generate_tiny("tiny-wan-vace", "wan-vace", (3, 6, 10), 16)
