"""The Cosmos family record (vidsparse/families/cosmos.py) against the diffusers model it describes:
CosmosTransformer3DModel at a tiny size, and the real Predict2 / Predict2.5 video2world pipelines."""

import json

import pytest
import torch
from family_checks import (
    SameFrame,
    SamePixel,
    check_mirror_is_bit_exact,
    check_pattern_differs,
    check_pattern_on_grid,
    check_unrecognised_input_runs_dense,
    config,
    run,
)

import vidsparse as vs
from vidsparse.cli import main
from vidsparse.families import family_of, family_of_pipeline, get_family, video_geometry
from vidsparse.families.cosmos import FAMILY, CosmosSparseProcessor, tiny_prompt_kwargs
from vidsparse.models import tiny_inputs, tiny_transformer
from vidsparse.pipelines import get_state

pytestmark = pytest.mark.filterwarnings("ignore:In CPU autocast:UserWarning")

_SHARED: dict = {}


@pytest.fixture
def shared():
    """(model, inputs, unpatched output) on a 4x4x4 token grid, built once; unpatched after each test."""
    if not _SHARED:
        model = tiny_transformer("cosmos")
        inputs = tiny_inputs("cosmos", model, 4, 8, 8, batch=2)
        _SHARED.update(model=model, inputs=inputs, ref=run(model, inputs))
    yield _SHARED["model"], _SHARED["inputs"], _SHARED["ref"]
    vs.remove(_SHARED["model"])


def test_registry_finds_cosmos_by_name_transformer_and_pipeline():
    assert get_family("cosmos") is FAMILY and get_family("Cosmos-Predict2.5") is FAMILY
    assert family_of(tiny_transformer("cosmos")) is FAMILY
    for name in ("Cosmos2VideoToWorldPipeline", "Cosmos2_5_PredictBasePipeline", "CosmosVideoToWorldPipeline"):
        assert family_of_pipeline(name) is FAMILY
    assert family_of_pipeline("Cosmos3OmniPipeline") is None  # another transformer class


def test_dense_patch_is_exact_and_layout_is_discovered(shared):
    model, inputs, ref = shared
    originals = {n: m.processor for n, m in model.named_modules() if hasattr(m, "processor")}
    vs.apply(model, config(vs.Dense()))
    patched = [m.processor for _, m, _ in FAMILY.attention_paths(model)]
    assert len(patched) == 2 and all(isinstance(p, CosmosSparseProcessor) for p in patched)
    assert all(
        m.attn2.processor is originals[f"transformer_blocks.{i}.attn2"] for i, m in enumerate(model.transformer_blocks)
    )  # cross-attention stays the model's
    out = run(model, inputs)
    state = get_state(model)
    assert state.calls["sparse"] == 2 and state.calls["dense"] == 0
    assert state.current.layout == vs.VideoLayout(4, 4, 4)  # video only: text is cross-attention
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-5)
    vs.remove(model)
    assert all(originals[n] is m.processor for n, m in model.named_modules() if hasattr(m, "processor"))
    assert torch.equal(run(model, inputs), ref)


def test_unrecognised_input_runs_dense_with_one_warning(shared):
    check_unrecognised_input_runs_dense(shared[0], "CosmosTransformer3DModel")


def test_mirror_is_bit_exact_with_the_models_attention_core(shared):
    check_mirror_is_bit_exact(*shared, layers=2)


@pytest.mark.parametrize("name", sorted(n for n in vs.PATTERNS if n != "dense"))
def test_sparse_patterns_differ_from_dense(name, shared):
    check_pattern_differs(*shared, name, vs.VideoLayout(4, 4, 4), layers=2)


@pytest.mark.parametrize("name", sorted(vs.PATTERNS))
def test_every_pattern_runs_with_family_defaults_on_a_ragged_grid(name):
    """Pattern names get the family defaults fitted to the call's grid: a 3x5x7 grid runs finite."""
    model = _SHARED.get("ragged") or _SHARED.setdefault("ragged", tiny_transformer("cosmos", num_layers=1))
    check_pattern_on_grid(model, tiny_inputs("cosmos", model, 3, 10, 14), name, vs.VideoLayout(3, 5, 7), layers=1)


def _token_grid(out):
    """[B, C, F, H, W] -> [B, F, H/2, W/2, C*4] on the token grid (patch pixels folded into C)."""
    b, c, f, h, w = out.shape
    return out.reshape(b, c, f, h // 2, 2, w // 2, 2).permute(0, 2, 3, 5, 1, 4, 6).reshape(b, f, h // 2, w // 2, -1)


def test_local_patterns_keep_tokens_local():
    """One self-attention layer under a same-frame (same-pixel) pattern: changing one latent frame
    (pixel) changes only that frame's (pixel's) output, so the grid's order and axes are right
    (the per-frame timesteps and the condition-mask channel are per token too)."""
    model = tiny_transformer("cosmos", num_layers=1)
    inputs = tiny_inputs("cosmos", model, 4, 8, 8)
    vs.apply(model, config(SameFrame()))
    moved = dict(inputs, hidden_states=inputs["hidden_states"].clone())
    moved["hidden_states"][:, :, 2] += 1.0
    changed = (_token_grid(run(model, moved)) - _token_grid(run(model, inputs))).abs().amax(dim=(0, 2, 3, 4))
    assert (changed > 1e-6).tolist() == [False, False, True, False]
    vs.apply(model, config(SamePixel()))
    moved = dict(inputs, hidden_states=inputs["hidden_states"].clone())
    moved["hidden_states"][:, :, :, 2:4, 6:8] += 1.0  # token (1, 3)
    changed = (_token_grid(run(model, moved)) - _token_grid(run(model, inputs))).abs().amax(dim=(0, 1, 4)) > 1e-6
    expected = torch.zeros(4, 4, dtype=torch.bool)
    expected[1, 3] = True
    assert torch.equal(changed, expected)


@pytest.mark.slow
def test_torch_compile_of_the_patched_transformer():
    model = tiny_transformer("cosmos", num_layers=1)
    inputs = tiny_inputs("cosmos", model, 3, 8, 8)
    tile = vs.Tile(tile=(1, 2, 2), window=(1, 1, 1))
    vs.apply(model, config(tile))
    eager = run(model, inputs)
    vs.remove(model)
    vs.clear_plan_cache()
    compiled = torch.compile(model, backend="eager")
    vs.apply(compiled, config(tile))
    torch.testing.assert_close(run(compiled, inputs), eager, atol=1e-5, rtol=1e-5)
    assert get_state(model).calls["sparse"] == 1


def test_geometry_matches_the_pipeline_latents_and_sizes_are_validated():
    pipe = FAMILY.tiny_pipeline()
    geo = video_geometry("cosmos")
    assert geo is FAMILY.geometry and geo.default_video == (93, 704, 1280) and geo.fps == 16
    assert geo.latent_grid(93, 704, 1280) == (24, 44, 80)
    frames, height, width = 9, 32, 64
    latents = pipe(
        **tiny_prompt_kwargs(pipe, "a cat"),
        num_frames=frames,
        height=height,
        width=width,
        num_inference_steps=1,
        output_type="latent",
    ).frames
    _, _, f, h, w = latents.shape
    assert tuple(pipe.transformer.config.patch_size) == geo.patch
    assert geo.latent_grid(frames, height, width) == (f, h // 2, w // 2) == (3, 2, 4)
    with pytest.raises(ValueError, match="frames must be 1 \\+ a multiple of 4; nearest valid: 9 or 13"):
        geo.latent_grid(10, 32, 64)
    with pytest.raises(ValueError, match="height=40: must be a multiple of 16"):
        geo.check_video(9, 40, 64)
    # Cosmos 1.0 (learnable position embedding, diffusers' default) has the 8x8x8 Cosmos tokenizer.
    assert FAMILY.geometry_for({"extra_pos_embed_type": None}).name == "cosmos"
    assert FAMILY.geometry_for({"in_channels": 17}).name == "cosmos1"
    assert video_geometry("cosmos1").latent_grid(121, 704, 1280) == (16, 44, 80)


@pytest.mark.parametrize(
    "pipeline, config, message",
    [
        ("Cosmos2_5_PredictBasePipeline", {"extra_pos_embed_type": None}, "compresses time 4x"),
        ("Cosmos2VideoToWorldPipeline", {"extra_pos_embed_type": None}, "compresses time 4x"),
        ("CosmosTextToWorldPipeline", {}, "compresses time 8x"),  # Cosmos 1.0: learnable position embedding
    ],
)
def test_generate_validates_sizes_of_a_local_pipeline_folder(pipeline, config, message, tmp_path, capsys):
    """`vidsparse generate --model <folder>` reads the family and its VAE factors from the folder's
    configs and refuses a size they cannot take, before loading anything."""
    (tmp_path / "transformer").mkdir()
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": pipeline}))
    (tmp_path / "transformer" / "config.json").write_text(json.dumps({"patch_size": [1, 2, 2], **config}))
    argv = ["generate", "--model", str(tmp_path), "--frames", "10", "--height", "712", "--width", "1280"]
    assert main(argv + ["--out", str(tmp_path / "x.mp4")]) == 2
    err = capsys.readouterr().err
    assert message in err and "height=712: must be a multiple of 16" in err and "Traceback" not in err


def test_inspect_knows_the_family(tmp_path, capsys):
    js = tmp_path / "g.json"
    argv = ["inspect", "--pattern", "gna", "--video", "93x704x1280", "--family", "cosmos"]
    assert main(argv + ["--no-plot", "--json", str(js)]) == 0
    report = json.loads(js.read_text())
    assert report["grid"] == [24, 44, 80]
    assert "cosmos" in capsys.readouterr().out


def test_pattern_defaults_are_fitted_to_the_grid():
    big = vs.VideoLayout(24, 44, 80)  # Predict2 / 2.5 at 93x704x1280
    assert FAMILY.pattern_options("gna", big, None) == dict(kernel_size=(-1, 20, 40), stride=(1, 4, 8))
    assert FAMILY.pattern_options("tile", big, None) == dict(tile=(2, 4, 16), window=(5, 5, 3))
    assert FAMILY.pattern_options("radial", big, None) == dict(decay_factor=1.0, sink=False, block_size=128)
    # As Cosmos-Predict2 scales its NATTEN windows from the 44x80 base grid (480p: 24x30x52).
    assert FAMILY.pattern_options("gna", vs.VideoLayout(24, 30, 52), None) == dict(
        kernel_size=(-1, 14, 26), stride=(1, 3, 5)
    )
    small = vs.VideoLayout(3, 5, 7)
    assert FAMILY.pattern_options("gna", small, None) == dict(kernel_size=(-1, 2, 4), stride=(1, 1, 1))
    assert FAMILY.pattern_options("tile", small, None) == dict(tile=(2, 4, 7), window=(5, 5, 3))
    assert FAMILY.default_schedule("gna") == (0.25, ()) and FAMILY.default_schedule("dense") == (0, ())


def test_lora_trains_predict2_and_2_5_refuses_the_rest_and_the_shard_plan_runs():
    from vidsparse.lora.adapters.cosmos import CosmosPredict2Model, CosmosPredict25Model
    from vidsparse.lora.models import adapter_for
    from vidsparse.parallel.model import parallelize, unparallelize

    assert set(FAMILY.lora_adapter_class()) == {CosmosPredict2Model, CosmosPredict25Model}
    assert set(FAMILY.lora_refusals) == {"Cosmos2_5_TransferPipeline", "Cosmos2TextToImagePipeline",
                                         "CosmosTextToWorldPipeline", "CosmosVideoToWorldPipeline"}  # fmt: skip
    pipe = FAMILY.tiny_pipeline(version="2")
    assert isinstance(adapter_for(pipe, "tiny-cosmos2-video2world"), CosmosPredict2Model)
    assert isinstance(adapter_for(FAMILY.tiny_pipeline(), "tiny-cosmos"), CosmosPredict25Model)
    with pytest.raises(ValueError, match="does not train Cosmos2_5_TransferPipeline: Transfer2.5 adds a ControlNet"):
        adapter_for(type("Cosmos2_5_TransferPipeline", (), {})(), "some/transfer")
    # vidsparse.parallel runs it (tests/test_parallel_new_families.py); removal leaves no hook
    parallelize(pipe, "radial", mode="clip", runtime=None)
    unparallelize(pipe)
    assert not [m for m in pipe.transformer.modules() if getattr(m, "_diffusers_hook", None) is not None
                and m._diffusers_hook.hooks]  # fmt: skip


def _call(pipe, **kw):
    kw.setdefault("num_frames", 9)
    return pipe(
        **tiny_prompt_kwargs(pipe, "a robot arm"),
        height=64,
        width=64,
        num_inference_steps=2,
        guidance_scale=3.0,
        generator=torch.Generator().manual_seed(0),
        output_type="latent",
        **kw,
    ).frames


@pytest.mark.parametrize("version", ["2.5", "2"])
def test_video2world_pipeline_end_to_end(version):
    """The real diffusers pipeline, 2 steps with CFG, conditioned on the first latent frame of a video:
    Dense() equals the pipeline's own output, a sparse pattern runs every self-attention call and
    differs, and remove restores the exact output."""
    pipe = FAMILY.tiny_pipeline(version=version)
    gen = torch.Generator().manual_seed(1)
    if version == "2.5":  # [B, 3, T, H, W] in [-1, 1]; 1 conditioning latent frame
        video = dict(video=torch.rand(1, 3, 9, 64, 64, generator=gen) * 2 - 1, num_latent_conditional_frames=1)
    else:  # [B, T, 3, H, W] in [0, 1], 5 frames -> 2 conditioning latent frames
        video = dict(video=torch.rand(1, 5, 3, 64, 64, generator=gen))
    ref = _call(pipe, **video)
    assert ref.shape == (1, 4, 3, 8, 8)
    vs.apply(pipe, vs.SparseConfig(vs.Dense(), backend="torch"))
    torch.testing.assert_close(_call(pipe, **video), ref, atol=1e-4, rtol=1e-4)
    vs.apply(pipe, vs.SparseConfig(vs.Tile(tile=(1, 2, 2), window=(1, 1, 1)), backend="torch", dense_first_steps=0))
    log = []
    state = get_state(pipe.transformer)
    inner = state.attention_fn
    state.attention_fn = lambda q, k, v, layout, p, **kw: (
        log.append((state.current.step, layout)) or inner(q, k, v, layout, p, **kw)
    )
    out = _call(pipe, **video)
    assert [s for s, _ in log] == [0] * 4 + [1] * 4  # 2 layers x (cond, uncond) per step
    assert {layout for _, layout in log} == {vs.VideoLayout(3, 4, 4)}
    assert bool(torch.isfinite(out).all()) and (out - ref).abs().max() > 1e-4
    vs.remove(pipe)
    assert torch.equal(_call(pipe, **video), ref)


def test_generate_runs_the_tiny_cosmos_pipeline():
    """`vidsparse generate --model tiny-cosmos`: the record's tiny pipeline, prompts hashed by its
    tiny_prompt_kwargs (different prompts give different videos), a sparse pattern applied."""
    from vidsparse.generation import GenerateOptions, generate

    opts = dict(model="tiny-cosmos", frames=5, height=32, width=64, steps=2, pattern="tile", progress=False)
    result = generate(GenerateOptions(**opts, dense_first_steps=0, backend="torch"))
    assert result.frames.shape == (5, 32, 64, 3) and result.frames.dtype.name == "uint8"
    other = generate(GenerateOptions(**opts, prompt="a green cube", dense_first_steps=0, backend="torch"))
    assert not (other.frames == result.frames).all()
    pipe = FAMILY.tiny_pipeline()
    assert "prompt_embeds" in tiny_prompt_kwargs(pipe, "a cat", "blurry")


def test_generate_asks_video2world_for_its_first_frame_before_loading(tmp_path, capsys):
    """Cosmos2VideoToWorldPipeline's ``image`` defaults to None but its call fails without an image or
    video: generate says so up front (Family.needs_first_frame), and writes nothing."""
    out = tmp_path / "v.mp4"
    assert main(["generate", "--model", "tiny-cosmos2-video2world", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert (
        "Cosmos2VideoToWorldPipeline is an image-to-video pipeline: pass --image PATH (the first frame) or --condition-video PATH"
        in err
    ), err
    assert not out.exists() and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "model, cls, frames, conditioned",
    [("tiny-cosmos2-video2world", "Cosmos2VideoToWorldPipeline", 5, 5),  # every given frame conditions
     ("tiny-cosmos", "Cosmos2_5_PredictBasePipeline", 7, 5),  # its last 5 frames (2 latent frames)
     ("tiny-cosmos", "Cosmos2_5_PredictBasePipeline", 3, 1)],  # fewer than 5: its last frame
)  # fmt: skip
def test_generate_condition_video_reaches_the_pipelines_latents(model, cls, frames, conditioned, tmp_path, monkeypatch):
    """``--condition-video`` gives Cosmos its video the way each pipeline takes it (Family.condition_video):
    the pixels reaching ``prepare_latents`` are the video's frames (Predict2.5: its last 1 or 5)."""
    import diffusers
    import numpy as np

    from vidsparse.video_io import write_video

    levels = np.linspace(20, 235, frames)  # one flat colour per frame: survives the mp4 round trip
    clip = np.broadcast_to(
        np.stack([levels, levels[::-1], np.full(frames, 128.0)], -1)[:, None, None], (frames, 32, 32, 3)
    )
    clip = np.ascontiguousarray(clip).astype(np.uint8)
    path = tmp_path / "prefix.mp4"
    write_video(path, clip)
    pipeline = getattr(diffusers, cls)
    seen = []
    prepare = pipeline.prepare_latents

    def record(self, video, *args, **kwargs):
        seen.append((video.detach().clone(), args, kwargs))
        return prepare(self, video, *args, **kwargs)

    monkeypatch.setattr(pipeline, "prepare_latents", record)
    out = tmp_path / "v.mp4"
    rc = main(["generate", "--model", model, "--condition-video", str(path), "--frames", "9", "--height", "32",
               "--width", "32", "--steps", "1", "--no-progress", "--out", str(out)])  # fmt: skip
    assert rc == 0 and out.is_file()
    (video, args, kwargs) = seen[0]
    # Predict2 pads inside prepare_latents; Predict2.5 hands it the clip already padded to --frames
    assert video.shape[2] == (9 if cls.startswith("Cosmos2_5") else frames)
    if cls == "Cosmos2_5_PredictBasePipeline":
        assert kwargs.get("num_frames_in", args[4] if len(args) > 4 else None) == conditioned
    # the conditioning frames are the video's (mp4 round trip: compare loosely), the given ones first
    got = ((video[0, :, :conditioned].float().permute(1, 2, 3, 0) + 1) * 127.5).clamp(0, 255)
    want = torch.from_numpy(clip[-conditioned:] if cls.startswith("Cosmos2_5") else clip[:conditioned]).float()
    assert (got - want).abs().mean() < 6, (got - want).abs().mean()
