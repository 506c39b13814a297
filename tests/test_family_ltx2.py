"""LTX-2 (vidsparse.families.ltx2) on tiny random-init LTX2VideoTransformer3DModel / LTX2Pipeline:
only the video self-attention is patched; dense equivalence, exact remove, grid discovery from
sizes and video_coords, dense fallback with a reason, every pattern, compile, sizes, tiny pipeline."""

from collections import Counter

import pytest
import torch
from family_checks import SameFrame, SamePixel, config, processors, sparse_pattern

import vidsparse as vs
from vidsparse.families import family_of_pipeline, get_family
from vidsparse.families.ltx2 import FAMILY, coords_grid
from vidsparse.models import tiny_inputs, tiny_transformer
from vidsparse.pipelines import get_state

pytestmark = pytest.mark.filterwarnings("ignore:In CPU autocast:UserWarning")

VARIANTS = tuple(FAMILY.tiny)  # "ltx2" (LTX-2.0 style), "ltx2-gated" (split RoPE, gates, STG processor)
GATED = "ltx2-gated"
SELF_ATTN = {f"transformer_blocks.{i}.attn1" for i in range(2)}
# STG on block 1 for the second sample only (the perturbed processor lerps value and attention).
STG = dict(spatio_temporal_guidance_blocks=[1], perturbation_mask=torch.tensor([1.0, 0.0]))

# Options making each known pattern sparse on a 4x4x4 grid (patterns not listed use their defaults).


def _run(model, inputs):
    with torch.no_grad():
        return model(**inputs, return_dict=False)  # (video, audio)


def _setup(variant="ltx2", grid=(4, 4, 4), batch=2, **overrides):
    model = tiny_transformer(variant, **overrides)
    inputs = tiny_inputs(variant, model, *grid, batch=batch)
    if variant == GATED and batch == 2 and overrides.get("num_layers", 2) == 2:
        inputs.update(STG)
    return model, inputs


def _assert_close(out, ref):
    for o, r in zip(out, ref):
        torch.testing.assert_close(o, r, atol=2e-5, rtol=1e-5)


def _spy(model):
    state = get_state(model)
    seen = []
    inner = state.attention_fn

    def spy(q, k, v, layout, pattern, **kw):
        seen.append((layout, kw["layer"], q.shape))
        return inner(q, k, v, layout, pattern, **kw)

    state.attention_fn = spy
    return state, seen


# -- the family record ------------------------------------------------------------------------
def test_family_is_registered_and_matched():
    model = tiny_transformer("ltx2")
    assert vs.pipelines.family_of(model) is FAMILY
    assert get_family("LTX-2") is FAMILY and get_family("ltx2") is FAMILY
    assert get_family("ltx").name == "ltx"  # LTX-Video stays its own family
    for name in ("LTX2Pipeline", "LTX2ImageToVideoPipeline", "LTX2ConditionPipeline"):
        assert family_of_pipeline(name) is FAMILY
    assert family_of_pipeline("LTXPipeline").name == "ltx"
    assert FAMILY.num_layers(model) == 2 and FAMILY.text_position == "none"


def test_lora_refuses_with_the_reason_and_parallel_has_a_shard_plan():
    with pytest.raises(ValueError, match="does not train ltx2: LTX-2 denoises audio and video latents jointly"):
        FAMILY.lora_adapter_class()
    from vidsparse.lora.models import refused

    assert refused()["LTX2Pipeline"].startswith("LTX-2 denoises audio and video latents jointly")
    # clip / Ulysses runs are checked on gloo ranks (tests/test_parallel_families.py, test_parallel_ltx2.py)
    assert FAMILY.require_shard_plan().merged_attention is not None
    assert FAMILY.main_rank_decode == ("audio_vae.decode", "vocoder.forward")


def test_pattern_defaults_fit_the_typical_grid():
    big = vs.VideoLayout(*FAMILY.geometry.latent_grid(*FAMILY.geometry.default_video))  # 16x16x24
    assert FAMILY.pattern_options("radial", big, None) == dict(decay_factor=1.0, sink=False, block_size=128)
    assert FAMILY.pattern_options("tile", big, None) == dict(tile=(2, 4, 4), window=(5, 3, 3))
    assert FAMILY.pattern_options("gna", big, None) == dict(kernel_size=(9, 9, 13), stride=(1, 1, 1))
    for name in ("tile", "gna"):
        density = vs.token_mask(vs.make_pattern(name, **FAMILY.pattern_options(name, big, None)), big).float().mean()
        assert 0.1 < float(density) < 0.3, (name, float(density))
    assert FAMILY.default_schedule("radial") == (0.25, ()) and FAMILY.default_schedule("dense") == (0, ())


def test_inspect_knows_the_family(tmp_path, capsys):
    from vidsparse.cli import main

    png = tmp_path / "ltx2.png"
    assert main(["inspect", "--pattern", "tile", "--video", "121x512x768", "--family", "ltx2", "--out", str(png)]) == 0
    assert "16x16x24" in capsys.readouterr().out and png.is_file()
    assert main(["inspect", "--pattern", "tile", "--video", "121x500x768", "--family", "ltx-2"]) == 2
    assert "multiple of 32" in capsys.readouterr().err


def test_geometry_uses_the_ltx2_vae_factors():
    geo = FAMILY.geometry
    assert (geo.temporal, geo.spatial, geo.patch, geo.fps) == (8, 32, (1, 1, 1), 24)
    assert geo.latent_grid(*geo.default_video) == (16, 16, 24)  # 121x512x768, the pipeline's default
    assert geo.latent_grid(121, 1024, 1536) == (16, 32, 48)
    with pytest.raises(ValueError, match="1 \\+ a multiple of 8; nearest valid: 113 or 121"):
        geo.check_video(120, 512, 768)
    with pytest.raises(ValueError, match="height=500: must be a multiple of 32.*nearest valid: 480 or 512"):
        geo.check_video(121, 500, 768)


# -- processor: dense equivalence, only video self-attention, remove ---------------------------
@pytest.mark.parametrize("variant", VARIANTS)
def test_dense_equals_unpatched_and_remove_is_exact(variant):
    model, inputs = _setup(variant)
    originals = processors(model)
    ref = _run(model, inputs)
    vs.apply(model, config(vs.Dense()))
    patched = {n for n, p in processors(model).items() if p is not originals[n]}
    assert patched == SELF_ATTN  # audio self-attn, text and audio<->video cross-attn keep their processors
    out = _run(model, inputs)
    assert get_state(model).calls == Counter(sparse=2)
    _assert_close(out, ref)  # video and audio outputs
    vs.remove(model)
    assert all(originals[n] is p for n, p in processors(model).items())
    assert all(torch.equal(o, r) for o, r in zip(_run(model, inputs), ref))


def test_fully_perturbed_stg_block_runs_the_model_s_own_path():
    """An STG block where every sample is perturbed skips attention (value only): the original
    processor runs there; the other block stays sparse."""
    model, inputs = _setup(GATED)
    inputs["perturbation_mask"] = torch.zeros(2)
    ref = _run(model, inputs)
    vs.apply(model, config(vs.Dense()))
    _assert_close(_run(model, inputs), ref)
    assert get_state(model).calls == Counter(sparse=1, dense=1)


@pytest.mark.parametrize(
    "variant,name", [("ltx2", n) for n in sorted(vs.PATTERNS) if n != "dense"] + [(GATED, "radial"), (GATED, "vmoba")]
)
def test_sparse_patterns_run_and_differ_from_dense(variant, name):
    model, inputs = _setup(variant)
    ref = _run(model, inputs)
    vs.apply(model, config(sparse_pattern(name, vs.VideoLayout(4, 4, 4))))
    video, audio = _run(model, inputs)
    assert get_state(model).calls == Counter(sparse=2)
    assert bool(torch.isfinite(video).all()) and bool(torch.isfinite(audio).all())
    assert (video - ref[0]).abs().max() > 1e-4


@pytest.mark.parametrize("name", sorted(vs.PATTERNS))
def test_every_pattern_with_family_defaults_runs_on_a_ragged_grid(name):
    model, inputs = _setup("ltx2", grid=(3, 5, 6))
    vs.apply(model, config(name, block_size=16))
    state, seen = _spy(model)
    video, audio = _run(model, inputs)
    assert bool(torch.isfinite(video).all()) and bool(torch.isfinite(audio).all())
    assert state.calls == Counter(sparse=2)
    assert [s[0] for s in seen] == [vs.VideoLayout(3, 5, 6)] * 2


# -- token locality: the grid order and axes are the model's ------------------------------------
@pytest.mark.parametrize("variant", VARIANTS)
def test_local_patterns_keep_video_tokens_local(variant):
    """One block: video tokens see other video tokens only through self-attention (the audio they
    cross-attend has not seen the video yet), so under a same-frame (same-pixel) pattern a change
    of one latent frame (pixel) changes only that frame's (pixel's) video output."""
    model, inputs = _setup(variant, batch=1, num_layers=1)

    def grid_out(x):
        return _run(model, {**inputs, "hidden_states": x})[0].view(1, 4, 4, 4, -1)

    x = inputs["hidden_states"]
    moved_frame = x.clone().view(1, 4, 4, 4, -1)
    moved_frame[:, 2] += 1.0
    moved_pixel = x.clone().view(1, 4, 4, 4, -1)
    moved_pixel[:, :, 1, 3] += 1.0

    vs.apply(model, config(SameFrame()))
    changed = (grid_out(moved_frame.view_as(x)) - grid_out(x)).abs().amax(dim=(0, 2, 3, 4)) > 1e-6
    assert changed.tolist() == [False, False, True, False]

    vs.apply(model, config(SamePixel()))
    changed = (grid_out(moved_pixel.view_as(x)) - grid_out(x)).abs().amax(dim=(0, 1, 4)) > 1e-6
    expected = torch.zeros(4, 4, dtype=torch.bool)
    expected[1, 3] = True
    assert torch.equal(changed, expected)


# -- grid discovery -------------------------------------------------------------------------------
def test_grid_from_video_coords_as_the_pipeline_passes_them():
    """LTX2Pipeline passes video_coords (pixel [start, end) per token, fps-scaled time) next to the
    sizes; the model takes RoPE from them, and so does the grid; coords alone work too."""
    model, inputs = _setup("ltx2", grid=(3, 5, 6))
    coords = model.rope.prepare_video_coords(2, 3, 5, 6, torch.device("cpu"), fps=25.0)
    by_coords = {k: v for k, v in inputs.items() if k not in ("num_frames", "height", "width")}
    by_coords["video_coords"] = coords
    ref = _run(model, by_coords)
    vs.apply(model, config(vs.Dense()))
    state, seen = _spy(model)
    _assert_close(_run(model, by_coords), ref)
    _run(model, {**inputs, "video_coords": coords})
    assert [s[0] for s in seen] == [vs.VideoLayout(3, 5, 6)] * 4 and state.calls == Counter(sparse=4)
    assert coords_grid(coords[..., 0], 90) == (3, 5, 6)  # [B, 3, S] positions work as well


def test_unrecognised_token_sets_run_dense_with_one_warning_naming_why():
    """Keyframe tokens appended after the grid (the condition pipeline): the coordinates are no
    raster, so every layer runs the model's own attention, with one warning saying why."""
    model, inputs = _setup("ltx2")
    coords = model.rope.prepare_video_coords(2, 4, 4, 4, torch.device("cpu"))
    keyframe = coords[:, :, :16]  # a second copy of frame 0's coordinates
    extra = torch.randn(2, 16, inputs["hidden_states"].shape[-1], generator=torch.Generator().manual_seed(1))
    appended = {
        **inputs,
        "hidden_states": torch.cat([inputs["hidden_states"], extra], dim=1),
        "video_coords": torch.cat([coords, keyframe], dim=2),
    }
    ref = _run(model, appended)
    vs.apply(model, config("radial"))
    with pytest.warns(UserWarning, match="could not read the token grid.*not one full frame-major F x H x W raster"):
        out = _run(model, appended)
    _assert_close(out, ref)
    assert get_state(model).calls == Counter(dense=2)

    sizes = {"hidden_states": appended["hidden_states"], "num_frames": 4, "height": 4, "width": 4}
    assert "4x4x4 grid of 64 tokens but hidden_states holds 80" in FAMILY.grid(model, sizes)
    assert "batch rows of video_coords differ" in coords_grid(torch.stack([coords[0], coords[0].flip(1)]), 64)
    assert "neither video_coords nor" in FAMILY.grid(model, {"hidden_states": inputs["hidden_states"]})


def test_video_self_attention_mask_runs_dense_with_a_warning():
    """IC-LoRA passes video_self_attention_mask: the mirror does not cover masks, the model's own
    processor runs (with the mask), audio attention untouched."""
    model, inputs = _setup("ltx2")
    mask = torch.ones(2, 64, 64)
    mask[:, :, 32:] = 0.5
    inputs["video_self_attention_mask"] = mask
    ref = _run(model, inputs)
    vs.apply(model, config("radial", block_size=16))
    with pytest.warns(UserWarning, match="video self-attention mask"):
        out = _run(model, inputs)
    _assert_close(out, ref)
    assert get_state(model).calls == Counter(dense=2)


# -- compile, foreign processors --------------------------------------------------------------------
@pytest.mark.slow
def test_torch_compile_of_the_patched_transformer():
    model, inputs = _setup(GATED, num_layers=1)
    inputs.update(STG, spatio_temporal_guidance_blocks=[0])
    radial = vs.make_pattern("radial", block_size=16, decay_factor=0.2)
    vs.apply(model, config(radial))
    eager = _run(model, inputs)
    vs.clear_plan_cache()
    compiled = torch.compile(model, backend="eager")
    out = _run(compiled, inputs)
    _assert_close(out, eager)
    assert get_state(compiled) is get_state(model) and get_state(model).calls == Counter(sparse=2)


def test_a_foreign_processor_is_refused():
    from diffusers.models.attention_processor import AttnProcessor2_0

    model = tiny_transformer("ltx2")
    model.transformer_blocks[1].attn1.set_processor(AttnProcessor2_0())
    with pytest.raises(ValueError, match="transformer_blocks.1.attn1 uses the attention processor AttnProcessor2_0"):
        vs.apply(model, "dense")


# -- the tiny pipeline, end to end ------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_pipe():
    return FAMILY.tiny_pipeline()


def _generate(pipe, **kw):
    args = dict(prompt="a red ball bouncing", negative_prompt="", num_frames=25, height=128, width=192)
    args.update(num_inference_steps=2, max_sequence_length=32, output_type="latent")
    args.update(kw)
    return pipe(**args, generator=torch.Generator().manual_seed(0))


def test_tiny_pipeline_components_keep_the_real_interface(tiny_pipe):
    from diffusers import LTX2Pipeline

    assert isinstance(tiny_pipe, LTX2Pipeline)
    assert (tiny_pipe.vae_temporal_compression_ratio, tiny_pipe.vae_spatial_compression_ratio) == (8, 32)
    assert tiny_pipe.transformer.config.vae_scale_factors == (8, 32, 32)  # RoPE coordinates in real pixels
    ids = tiny_pipe.tokenizer(["a cat", "a dog"]).input_ids
    assert ids[0] != ids[1] and tiny_pipe.tokenizer.decode(ids[0]) == "a cat"
    out = _generate(tiny_pipe, output_type="np", num_frames=9, height=64, width=64)
    assert out.frames.shape == (1, 9, 64, 64, 3) and out.audio.shape[:2] == (1, 2)


@pytest.mark.slow
def test_tiny_pipeline_with_vidsparse_end_to_end(tiny_pipe):
    ref = _generate(tiny_pipe)
    assert ref.frames.shape == (1, 4, 4, 4, 6)  # 25 frames, 128x192 -> 4x4x6 latent tokens
    vs.apply(tiny_pipe, vs.SparseConfig(vs.Dense(), backend="torch", dense_first_steps=0))
    state, seen = _spy(tiny_pipe.transformer)
    dense = _generate(tiny_pipe)
    torch.testing.assert_close(dense.frames, ref.frames, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(dense.audio, ref.audio, atol=1e-4, rtol=1e-4)
    # 2 steps x (CFG batch, STG pass, modality-isolation pass) x 2 layers, all on the 4x4x6 grid.
    assert state.calls == Counter(sparse=12) and {s[0] for s in seen} == {vs.VideoLayout(4, 4, 6)}

    # Family defaults by name: the first 25 % of the steps (1 of 2) dense, counted per guidance branch.
    vs.apply(
        tiny_pipe, vs.SparseConfig("tile", backend="torch", pattern_options=dict(tile=(1, 2, 2), window=(1, 1, 1)))
    )
    state = get_state(tiny_pipe.transformer)
    sparse = _generate(tiny_pipe)
    assert state.calls == Counter(dense=6, sparse=6)
    assert bool(torch.isfinite(sparse.frames).all()) and (sparse.frames - ref.frames).abs().max() > 1e-4
    vs.remove(tiny_pipe)
    again = _generate(tiny_pipe)
    assert torch.equal(again.frames, ref.frames) and torch.equal(again.audio, ref.audio)


def test_generate_serves_a_saved_tiny_pipeline_folder(tiny_pipe, tmp_path, monkeypatch):
    """``vidsparse generate --model <folder>``: the folder resolves to ltx2 (not LTX-Video), sizes are
    checked with the 8x/32x VAE factors before loading, and the real prompt path runs end to end."""
    import vidsparse.generation.run as gen_run
    from vidsparse.generation import GenerateOptions, generate, resolve_model

    folder = tmp_path / "tiny-ltx2"
    tiny_pipe.save_pretrained(folder)
    info = resolve_model(str(folder))
    assert info.family == "ltx2" and info.grid == FAMILY.geometry and info.defaults["height"] == 512
    opts = dict(model=str(folder), frames=9, height=64, width=96, steps=2, progress=False)
    load = gen_run.load_pipeline
    monkeypatch.setattr(gen_run, "load_pipeline", lambda *a, **k: pytest.fail("loaded for an invalid size"))
    with pytest.raises(ValueError, match="frames must be 1 \\+ a multiple of 8; nearest valid: 9 or 17"):
        generate(GenerateOptions(**{**opts, "frames": 10}))
    with pytest.raises(ValueError, match="width=100: must be a multiple of 32"):
        generate(GenerateOptions(**{**opts, "width": 100}))
    tiny = resolve_model("tiny-ltx2")  # the embedded pipeline: this record's tiny_pipeline, valid default sizes
    assert tiny.kind == "tiny" and tiny.pipeline_class == "LTX2Pipeline" and tiny.grid == FAMILY.geometry
    assert tiny.grid.latent_grid(tiny.defaults["frames"], tiny.defaults["height"], tiny.defaults["width"])
    monkeypatch.setattr(gen_run, "load_pipeline", load)
    result = generate(GenerateOptions(**opts, pattern="tile", block_size=16, dense_first_steps=0))
    assert result.family == "ltx2" and result.grid == (2, 2, 3) and result.frames.shape == (9, 64, 96, 3)
    assert result.fps == 24 and result.sparse_steps == 2
