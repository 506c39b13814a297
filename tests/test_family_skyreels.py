"""The SkyReels-V2 family (vidsparse/families/skyreels.py) on tiny random-init
SkyReelsV2Transformer3DModel / SkyReelsV2 pipelines: T2V, I2V and diffusion forcing (per-frame
timesteps, asynchronous schedules, the block-causal mask)."""

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

import vidsparse as vs
from vidsparse.cli import main
from vidsparse.config import steps_from
from vidsparse.families import family_of, family_of_pipeline, get_family, video_geometry
from vidsparse.families.skyreels import FAMILY, SkyReelsSparseProcessor
from vidsparse.models import encode_prompt_tiny, tiny_transformer
from vidsparse.pipelines import get_state

pytestmark = pytest.mark.filterwarnings("ignore:In CPU autocast:UserWarning")

LATENT = (4, 8, 8)  # -> 4x4x4 tokens
RAGGED = (3, 10, 12)  # -> 3x5x6 tokens


def test_registry_and_geometry():
    assert get_family("SkyReels-V2") is FAMILY and get_family("skyreels") is FAMILY
    for variant in ("skyreels-v2", "skyreels-v2-df", "skyreels-v2-i2v"):
        assert family_of(setup(variant, LATENT)[0]) is FAMILY
    for cls in ("SkyReelsV2Pipeline", "SkyReelsV2DiffusionForcingPipeline", "SkyReelsV2ImageToVideoPipeline"):
        assert family_of_pipeline(cls) is FAMILY
    geo = video_geometry("skyreels-v2")
    assert geo is FAMILY.geometry and geo.fps == 24 and geo.default_video == (97, 544, 960)
    assert geo.latent_grid(97, 544, 960) == (25, 34, 60)
    with pytest.raises(ValueError, match="multiple of 16"):
        geo.latent_grid(97, 540, 960)
    with pytest.raises(ValueError, match="nearest valid: 93 or 97"):
        geo.check_video(96, 544, 960)


@pytest.mark.parametrize("variant", ["skyreels-v2", "skyreels-v2-df", "skyreels-v2-i2v"])
def test_dense_equals_unpatched_remove_exact_and_layout(variant):
    model, inputs = setup(variant, LATENT, batch=2)
    check_dense_equals_unpatched_and_remove_is_exact(model, inputs)
    seen = discovered(model, inputs)
    assert [layer for _, layer, _ in seen] == [0, 1]
    assert all(layout == vs.VideoLayout(4, 4, 4) and shape == (2, 64, 2, 8) for layout, _, shape in seen)


def test_every_pattern_runs_on_regular_and_ragged_grids_with_per_frame_timesteps():
    for latent, grid in ((LATENT, (4, 4, 4)), (RAGGED, (3, 5, 6))):
        model, inputs = setup("skyreels-v2-df", latent, num_layers=1)
        assert inputs["timestep"].shape == (1, latent[0])
        check_every_pattern_runs(model, inputs, vs.VideoLayout(*grid))


def test_sparse_patterns_differ_from_dense_and_processors_are_skyreels():
    model, inputs = setup("skyreels-v2-df", LATENT)
    vs.apply(model, config("dense"))
    assert all(isinstance(m.processor, SkyReelsSparseProcessor) for _, m, _ in FAMILY.attention_paths(model))
    vs.remove(model)
    check_sparse_patterns_differ(model, inputs, vs.VideoLayout(4, 4, 4))


def test_block_causal_mask_runs_the_models_dense_attention_with_one_warning():
    """causal_block_size > 1: the model hands attn1 a block-causal frame mask; sparse patterns
    do not compose with it, so every call is the model's own attention (output unchanged)."""
    model, inputs = setup("skyreels-v2-df", LATENT)
    model._set_ar_attention(2)
    ref = run(model, inputs)
    vs.apply(model, config(vs.make_pattern("tile", tile=(1, 2, 2), window=(1, 1, 1))))
    with pytest.warns(UserWarning, match="block-causal frame mask"):
        out = run(model, inputs)
    state = get_state(model)
    assert state.calls["dense"] == state.num_layers and state.calls["sparse"] == 0
    assert torch.equal(out, ref)
    vs.remove(model)


def test_torch_compile_of_the_patched_transformer():
    check_compile(*setup("skyreels-v2-df", LATENT, num_layers=1))


def test_lora_refusals_name_the_reason_and_the_shard_plan_fits_the_model():
    from vidsparse.lora.models import refusal

    # T2V and I2V train with the Wan adapters (tests/test_lora_skyreels.py); diffusion forcing says why not
    assert [c.__name__ for c in FAMILY.lora_adapter_class()] == ["SkyReelsModel", "SkyReelsI2VModel"]
    assert "its own timestep" in refusal("SkyReelsV2DiffusionForcingPipeline", "Skywork/SkyReels-V2-DF-1.3B-540P")
    model = tiny_transformer("skyreels-v2")
    plan = FAMILY.require_shard_plan()  # vidsparse.parallel runs it (tests/test_parallel_new_families.py)
    for path in (*plan.inputs, *plan.outputs, *plan.gather):
        assert path == "" or model.get_submodule(path) is not None


def test_inspect_knows_the_family(tmp_path, capsys):
    argv = ["inspect", "--pattern", "radial", "--video", "97x544x960", "--family", "skyreels-v2", "--no-plot"]
    assert main(argv) == 0
    assert "25x34x60" in capsys.readouterr().out


# -- pipelines --------------------------------------------------------------------------------


def _embeds(pipe):
    dim = pipe.transformer.config.text_dim
    return encode_prompt_tiny("a tiny cat", dim=dim), encode_prompt_tiny("", dim=dim)


def _record_calls(pipe):
    state = get_state(pipe.transformer)
    calls = []
    begin = state.begin_call

    def spy(*args):
        info = begin(*args)
        calls.append((info.branch, info.step, info.total_steps, all(p is None for p in info.patterns)))
        return info

    state.begin_call = spy
    return calls


def test_t2v_pipeline_end_to_end_with_sparse_attention():
    pipe = FAMILY.tiny_pipeline()
    pe, ne = _embeds(pipe)
    kw = dict(prompt=None, prompt_embeds=pe, negative_prompt_embeds=ne, num_frames=9, height=32, width=48)
    kw.update(num_inference_steps=2, output_type="latent")
    ref = pipe(**kw, generator=torch.Generator().manual_seed(0)).frames
    assert ref.shape[2:] == (3, 4, 6) and video_geometry("skyreels-v2").latent_grid(9, 32, 48) == (3, 2, 3)
    vs.apply(pipe, vs.SparseConfig("tile", backend="torch", block_size=16, dense_first_steps=0))
    calls = _record_calls(pipe)
    out = pipe(**kw, generator=torch.Generator().manual_seed(0)).frames
    assert [c[:3] for c in calls] == [("cond", 0, 2), ("uncond", 0, 2), ("cond", 1, 2), ("uncond", 1, 2)]
    assert bool(torch.isfinite(out).all()) and get_state(pipe.transformer).calls["sparse"] == 8
    vs.remove(pipe)
    assert torch.equal(pipe(**kw, generator=torch.Generator().manual_seed(0)).frames, ref)


def test_generate_validates_sizes_with_the_family_geometry(tmp_path):
    pipe = FAMILY.tiny_pipeline(diffusion_forcing=True)
    check_generate_validates_sizes(
        pipe, tmp_path / "df", (97, 540, 960), "height=540: must be a multiple of 16", (97, 544, 960), (25, 34, 60), 24
    )


@pytest.mark.parametrize("ar_step, rows", [(0, 3), (1, 7)])
def test_diffusion_forcing_steps_follow_the_timestep_matrix(ar_step, rows):
    """Per-frame timesteps: synchronous (ar_step=0) and asynchronous schedules count one step per
    row of the pipeline's timestep matrix (7 rows for 3 steps over 5 latent frames at ar_step=1,
    where the last frames stay at 999 for several rows); the first 25 % of the rows are dense."""
    pipe = FAMILY.tiny_pipeline(diffusion_forcing=True)
    pe, ne = _embeds(pipe)
    vs.apply(pipe, vs.SparseConfig("radial", backend="torch", block_size=16))
    calls = _record_calls(pipe)
    out = pipe(
        prompt=None,
        prompt_embeds=pe,
        negative_prompt_embeds=ne,
        num_frames=17,
        base_num_frames=17,
        height=32,
        width=32,
        num_inference_steps=3,
        ar_step=ar_step,
        causal_block_size=1,
        output_type="latent",
        generator=torch.Generator().manual_seed(0),
    ).frames
    assert out.shape[2] == 5 and bool(torch.isfinite(out).all())
    n_dense = steps_from(0.25, rows, "dense_first_steps")
    for branch in ("cond", "uncond"):
        mine = [c for c in calls if c[0] == branch]
        assert [c[1] for c in mine] == list(range(rows))
        assert all(c[2] == rows for c in mine)
        assert [c[3] for c in mine] == [i < n_dense for i in range(rows)]
    assert get_state(pipe.transformer).calls["sparse"] > 0


def test_generate_tiny_skyreels_v2():
    check_generate_tiny("tiny-skyreels-v2", "skyreels-v2", (3, 6, 10), 24)


def test_per_frame_step_rule():
    """Rule 2b of vidsparse.pipelines.hooks on its own: the frame vector, not its maximum."""
    from vidsparse.pipelines.hooks import StepTracker

    tracker = StepTracker()
    t = lambda *v: torch.tensor(v, dtype=torch.float32)  # noqa: E731
    rows = [t(999, 999, 999), t(941, 999, 999), t(941, 999, 999), t(800, 941, 999), t(0, 800, 941)]
    assert [tracker.step_frames("cond", r) for r in rows] == [0, 1, 1, 2, 3]  # max stays 999 for 3 rows
    assert tracker.step_frames("uncond", rows[0]) == 0  # branches count separately
    assert tracker.step_frames("cond", t(0, 0, 999)) == 0  # a frame got noisier: a new run
    assert tracker.step_frames("cond", t(0, 0, 941)) == 1
    assert tracker.step_frames("cond", t(999, 999)) == 0  # another frame count: a new run
    assert tracker.step_frames("cond", t(999, 999)) == 0 and tracker.step_frames("cond", t(941, 941)) == 1
    tracker.set("cond", 7)  # a cache context's step_index wins and forgets the vector
    assert tracker.step_frames("cond", t(941, 941)) == 0
