"""HunyuanVideo 1.5 (and the HunyuanVideo Framepack refusal) on tiny random-init models of the real
diffusers classes: the sparse processor mirrors ``HunyuanVideo15AttnProcessor2_0`` (condition padding
included), the grid and condition span are read per call, every registered pattern runs, the T2V and
I2V pipelines run end to end, sizes validate with the 16x/4x VAE."""

import warnings

import pytest
import torch
from family_checks import SPARSE_OPTIONS, check_pattern_on_grid, config, run

import vidsparse as vs
from vidsparse.families import family_of, family_of_pipeline, get_family
from vidsparse.families import hunyuan15 as h15
from vidsparse.families.base import TINY_TEXT_LEN
from vidsparse.models import tiny_inputs, tiny_transformer
from vidsparse.pipelines import get_state

pytestmark = pytest.mark.filterwarnings(
    "ignore:In CPU autocast:UserWarning", "ignore:.*Guiders are currently an experimental.*"
)

FAMILY = get_family("hunyuan15")
#: Condition span of the tiny inputs: Qwen prompt + ByT5 glyph text + SigLIP image tokens.
COND_LEN = TINY_TEXT_LEN + h15.TINY_GLYPH_LEN + h15.TINY_IMAGE_TOKENS

# Options making each known pattern sparse on a 4x4x4 grid (patterns not listed use their defaults).


def _model(variant="hunyuan15", **overrides):
    return tiny_transformer(variant, **overrides)


def _inputs(model, variant="hunyuan15", grid=(4, 4, 4), batch=2):
    """Forward kwargs; with batch > 1, later samples have a shorter valid prompt (padding)."""
    return tiny_inputs(variant, model, *grid, batch=batch)


def _capture_attention(model):
    """Record every self-attention module's (video, condition) outputs; returns (log, remove)."""
    log = []
    handles = [
        module.register_forward_hook(lambda m, a, out: log.append(tuple(o.clone() for o in out)))
        for _, module, _ in FAMILY.attention_paths(model)
    ]
    return log, lambda: [h.remove() for h in handles]


_SHARED: dict = {}


@pytest.fixture
def shared():
    """(model, inputs, unpatched output) of the T2V variant, built once; unpatched after each use."""
    if not _SHARED:
        model = _model()
        inputs = _inputs(model)
        _SHARED["t2v"] = (model, inputs, run(model, inputs))
    yield _SHARED["t2v"]
    vs.remove(_SHARED["t2v"][0])


# -- the record -------------------------------------------------------------------------------
def test_registered_and_matched():
    model = _model()
    from vidsparse.generation import tiny_models

    assert family_of(model) is FAMILY and get_family("HunyuanVideo-1.5") is FAMILY
    assert family_of_pipeline("HunyuanVideo15ImageToVideoPipeline") is FAMILY
    assert family_of_pipeline("HunyuanVideoFramepackPipeline").name == "hunyuan-framepack"
    assert family_of_pipeline("HunyuanVideoPipeline").name == "hunyuan"
    assert "tiny-hunyuan15" in tiny_models() and "tiny-hunyuan-framepack" not in tiny_models()
    assert FAMILY.num_layers(model) == 2
    assert [p for p, _, _ in FAMILY.attention_paths(model)] == [
        "transformer_blocks.0.attn",
        "transformer_blocks.1.attn",
    ]
    # The token refiner's text-only attention is not patched.
    vs.apply(model, config("tile"))
    procs = {n: type(m.processor).__name__ for n, m in model.named_modules() if hasattr(m, "processor")}
    assert procs["transformer_blocks.0.attn"] == "HunyuanVideo15SparseProcessor"
    assert procs["context_embedder.token_refiner.refiner_blocks.0.attn"] == "AttnProcessor2_0"
    vs.remove(model)


def test_lora_adapters_and_the_shard_plan_fits_the_model():
    # LoRA trains text- and image-to-video (tests/test_lora_hunyuan15.py)
    assert {n for cls in FAMILY.lora_adapter_class() for n in cls.pipeline_classes} == {
        "HunyuanVideo15Pipeline",
        "HunyuanVideo15ImageToVideoPipeline",
    }
    model = tiny_transformer("hunyuan15")
    plan = FAMILY.require_shard_plan()  # vidsparse.parallel runs it (tests/test_parallel_new_families.py)
    for path in (*plan.inputs, *plan.outputs, *plan.gather):
        assert path == "" or model.get_submodule(path) is not None


# -- dense equivalence, remove, layout --------------------------------------------------------
@pytest.mark.parametrize("variant", ["hunyuan15", "hunyuan15-i2v"])
def test_dense_equals_unpatched_condition_rows_included_and_remove_is_exact(variant):
    model = _model(variant)
    inputs = _inputs(model, variant)
    originals = {n: m.processor for n, m in model.named_modules() if hasattr(m, "processor")}
    log, unhook = _capture_attention(model)
    ref = run(model, inputs)
    ref_attn = list(log)
    log.clear()
    vs.apply(model, config(vs.Dense()))
    out = run(model, inputs)
    state = get_state(model)
    assert state.calls["sparse"] == state.num_layers == 2 and state.calls["dense"] == 0
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-5)
    # Both outputs of every attention, padded condition rows too (the model gives them zeros).
    for (video, cond), (ref_video, ref_cond) in zip(log, ref_attn, strict=True):
        torch.testing.assert_close(video, ref_video, atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(cond, ref_cond, atol=2e-5, rtol=1e-5)
    unhook()
    vs.remove(model)
    assert all(originals[n] is m.processor for n, m in model.named_modules() if hasattr(m, "processor"))
    assert torch.equal(run(model, inputs), ref)


def test_bf16_dense_matches_unpatched():
    model = _model(dtype=torch.bfloat16)
    inputs = _inputs(model)
    ref = run(model, inputs)
    vs.apply(model, config("dense"))
    out = run(model, inputs)
    assert out.dtype == torch.bfloat16 and get_state(model).calls["sparse"] == 2
    torch.testing.assert_close(out.float(), ref.float(), atol=0.1, rtol=0.05)


@pytest.mark.parametrize("variant", ["hunyuan15", "hunyuan15-i2v"])
def test_layout_and_condition_validity_discovered_per_call(variant):
    model = _model(variant)
    vs.apply(model, config("dense"))
    state = get_state(model)
    seen = []
    attention = state.attention_fn

    def spy(q, k, v, layout, pattern, **kw):
        seen.append((layout, kw["text_mask"].clone(), q.shape))
        return attention(q, k, v, layout, pattern, **kw)

    state.attention_fn = spy
    run(model, _inputs(model, variant, grid=(4, 4, 4)))
    run(model, _inputs(model, variant, grid=(2, 3, 5), batch=1))  # resolution and batch change
    image_tokens = h15.TINY_IMAGE_TOKENS if variant.endswith("i2v") else 0
    glyph = h15.TINY_GLYPH_LEN // 2
    expected = [
        (
            vs.VideoLayout(4, 4, 4, COND_LEN, "after"),
            [image_tokens + glyph + TINY_TEXT_LEN, image_tokens + glyph + TINY_TEXT_LEN - 2],
        ),
        (vs.VideoLayout(2, 3, 5, COND_LEN, "after"), [image_tokens + glyph + TINY_TEXT_LEN]),
    ]
    assert len(seen) == 2 * 2
    for (layout, mask, shape), (want, valid) in zip(seen, [e for e in expected for _ in range(2)]):
        assert layout == want and shape[1] == want.seq_len and shape[2] == 2
        # The model puts valid conditions first: each row is `valid` Trues, then Falses.
        assert mask.sum(dim=1).tolist() == valid
        assert all(bool(row[:n].all()) and not bool(row[n:].any()) for row, n in zip(mask, valid))


def test_unrecognised_mask_runs_the_model_own_attention_with_one_warning():
    model = _model()
    inputs = _inputs(model)
    vs.apply(model, config("tile", pattern_options=SPARSE_OPTIONS["tile"]))
    run(model, inputs)  # leaves the call's layout and patterns in the state
    attn = model.transformer_blocks[0].attn
    processor = attn.processor
    hidden = torch.randn(2, 64, 16)
    cond = torch.randn(2, COND_LEN, 16)
    rope = model.rope(inputs["hidden_states"])
    bad = torch.ones(2, 64 + COND_LEN)  # reaches into the video tokens
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = processor(attn, hidden, cond, bad, rope)
        again = processor(attn, hidden, cond, bad, rope)
    assert [str(w.message) for w in caught if "HunyuanVideo 1.5" in str(w.message)] == [
        f"vidsparse: HunyuanVideo 1.5 attention: the mask covers {64 + COND_LEN} tokens, more than the {COND_LEN} "
        "condition tokens (it would mask video); running dense."
    ]
    with torch.no_grad():
        ref = processor.original(attn, hidden, cond, bad, rope)
    for a, b, c in zip(out, again, ref):
        assert torch.equal(a, c) and torch.equal(b, c)
    vs.remove(model)


def test_condition_validity_parses_what_the_model_pads():
    mask = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    torch.testing.assert_close(
        h15.condition_validity(mask, 2, 3), torch.tensor([[True, True, False], [True, True, True]])
    )
    assert "no condition mask" in h15.condition_validity(None, 2, 3)
    assert "shape (2, 1, 3)" in h15.condition_validity(torch.ones(2, 1, 3), 2, 3)


# -- patterns ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(n for n in vs.PATTERNS if n != "dense"))
def test_sparse_patterns_run_and_differ_from_dense(name, shared):
    model, inputs, ref = shared
    pattern = vs.make_pattern(name, **SPARSE_OPTIONS.get(name, {}))
    layout = vs.VideoLayout(4, 4, 4, COND_LEN, "after")
    sparse = pattern.dynamic or not bool(vs.token_mask(pattern, layout).all())
    assert sparse or name not in SPARSE_OPTIONS, f"{name} options are dense on {layout}"
    vs.apply(model, config(pattern))
    out = run(model, inputs)
    assert get_state(model).calls["sparse"] == 2
    assert bool(torch.isfinite(out).all())
    if sparse:
        assert (out - ref).abs().max() > 1e-4


@pytest.mark.parametrize("name", sorted(vs.PATTERNS))
def test_every_pattern_with_family_defaults_runs_on_a_ragged_grid(name):
    """Pattern *names* get the family defaults fitted to the grid; 3x5x7 divides no tile."""
    model = _model(num_layers=1)
    check_pattern_on_grid(model, _inputs(model, grid=(3, 5, 7)), name, vs.VideoLayout(3, 5, 7, COND_LEN, "after"), 1)


def test_gna_window_covering_the_grid_equals_unpatched(shared):
    model, inputs, ref = shared
    vs.apply(model, config(vs.make_pattern("gna", kernel_size=(4, 4, 4))))
    torch.testing.assert_close(run(model, inputs), ref, atol=2e-5, rtol=1e-5)


def test_family_defaults_on_the_480p_and_720p_grids():
    for grid in ((31, 30, 53), (31, 45, 80)):
        layout = vs.VideoLayout(*grid, text_len=1985, text_position="after")
        assert FAMILY.pattern_options("tile", layout, None) == dict(tile=(2, 8, 8), window=(9, 3, 3))
        assert FAMILY.pattern_options("gna", layout, None) == dict(kernel_size=(18, 24, 24), stride=(6, 8, 8))
        radial = FAMILY.pattern_options("radial", layout, None)
        assert radial["decay_factor"] == 0.95 and radial["sink"] is False
    assert FAMILY.default_schedule("tile") == (0.25, ())


@pytest.mark.slow
def test_torch_compile_of_patched_transformer():
    model = _model(num_layers=1)
    inputs = _inputs(model, grid=(2, 2, 4), batch=1)
    tile = vs.make_pattern("tile", **SPARSE_OPTIONS["tile"])
    with torch.no_grad():
        vs.apply(model, config(tile))
        eager = run(model, inputs)
        vs.remove(model)
        vs.clear_plan_cache()
        compiled = torch.compile(model, backend="eager")
        vs.apply(compiled, config(tile))
        out = compiled(**inputs, return_dict=False)[0]
    torch.testing.assert_close(out, eager, atol=1e-5, rtol=1e-5)
    assert get_state(model).calls["sparse"] == 1
    vs.remove(compiled)


# -- sizes ------------------------------------------------------------------------------------
def test_sizes_validate_with_the_16x_4x_vae():
    geo = FAMILY.geometry
    assert (geo.temporal, geo.spatial, geo.patch) == (4, 16, (1, 1, 1))
    assert geo.latent_grid(*geo.default_video) == (31, 30, 53)
    hd = FAMILY.geometry_for({"target_size": 960, "patch_size": 1, "patch_size_t": 1})
    assert hd.name == "hunyuan15-720p" and hd.latent_grid(*hd.default_video) == (31, 45, 80)
    with pytest.raises(ValueError, match=r"frames=120: .* 1 \+ a multiple of 4; nearest valid: 117 or 121"):
        geo.check_video(120, 480, 848)
    with pytest.raises(ValueError, match=r"width=850: must be a multiple of 16 .*nearest valid: 848 or 864"):
        geo.check_video(121, 480, 850)
    pipe = h15.tiny_pipeline()
    assert (pipe.vae_scale_factor_temporal, pipe.vae_scale_factor_spatial) == (geo.temporal, geo.spatial)


def test_generate_validates_a_saved_pipeline_with_its_vae_factors(tmp_path):
    from vidsparse.generation.options import GenerateOptions, prepare

    h15.tiny_pipeline().save_pretrained(tmp_path / "pipe")
    base = dict(model=str(tmp_path / "pipe"), frames=9, height=48, width=64, steps=2, pattern="tile")
    plan = prepare(GenerateOptions(**base))
    assert plan.info.grid == FAMILY.geometry and plan.grid == (3, 3, 4) and plan.fps == 24
    with pytest.raises(ValueError, match=r"frames=10: the hunyuan15 VAE compresses time 4x .* nearest valid: 9 or 13"):
        prepare(GenerateOptions(**{**base, "frames": 10}))
    with pytest.raises(
        ValueError, match=r"height=50: must be a multiple of 16 \(16x VAE x 1 patch\); nearest valid: 48"
    ):
        prepare(GenerateOptions(**{**base, "height": 50}))


def test_inspect_knows_the_family(tmp_path, capsys):
    from vidsparse.cli import main

    argv = ["inspect", "--pattern", "tile", "--video", "17x160x256", "--family", "hunyuan15-720p"]
    assert main([*argv, "--out", str(tmp_path / "t.png")]) == 0
    out = capsys.readouterr().out
    assert "5x10x16, text 1985 after" in out and "hunyuan15-720p factors (VAE 4x time, 16x space" in out
    assert main(["inspect", "--pattern", "tile", "--video", "121x480x850", "--family", "hunyuan15"]) == 2
    assert "width=850: must be a multiple of 16" in capsys.readouterr().err


# -- pipelines end to end ---------------------------------------------------------------------
def _spy_steps(pipe):
    state = get_state(pipe.transformer)
    inner = state.attention_fn
    log = []

    def spy(q, k, v, layout, pattern, **kw):
        log.append((state.current.step, state.current.branch, kw["layer"], layout))
        return inner(q, k, v, layout, pattern, **kw)

    state.attention_fn = spy
    return log


def _call(pipe, **kw):
    """Prompts go through the tiny pipeline's own Qwen2.5-VL and ByT5 encoders (quoted glyph text)."""
    kwargs = dict(prompt='a sign that says "hi"', negative_prompt="blurry", num_frames=5, num_inference_steps=2)
    kwargs.update(generator=torch.Generator().manual_seed(0), output_type="latent")
    kwargs.update(kw)
    return pipe(**kwargs).frames


#: Condition span of the tiny pipelines: their prompt, glyph and SigLIP token counts.
PIPE_COND_LEN = h15.TINY_PROMPT_LEN + h15.TINY_GLYPH_LEN + h15.TINY_IMAGE_TOKENS


def test_text_to_video_pipeline_end_to_end():
    pipe = h15.tiny_pipeline()
    size = dict(height=48, width=64)
    ref = _call(pipe, **size)
    vs.apply(pipe, config(vs.Dense()))
    torch.testing.assert_close(_call(pipe, **size), ref, atol=1e-5, rtol=1e-5)
    vs.apply(pipe, config("tile", pattern_options=SPARSE_OPTIONS["tile"]))
    log = _spy_steps(pipe)
    video = _call(pipe, **size, output_type="pt")  # through the VAE decoder
    assert video.shape == (1, 5, 3, 48, 64) and bool(torch.isfinite(video).all())
    steps = [(0, "pred_cond"), (0, "pred_uncond"), (1, "pred_cond"), (1, "pred_uncond")]
    assert sorted({(s, b) for s, b, _, _ in log}) == steps
    assert len(log) == 2 * 2 * 2 and {entry[3] for entry in log} == {vs.VideoLayout(2, 3, 4, PIPE_COND_LEN, "after")}
    vs.remove(pipe)
    assert torch.equal(_call(pipe, **size), ref)


def test_image_to_video_pipeline_end_to_end():
    from PIL import Image

    pipe = h15.tiny_pipeline(image_to_video=True)
    image = Image.fromarray((torch.rand(48, 64, 3) * 255).to(torch.uint8).numpy())
    ref = _call(pipe, image=image)
    vs.apply(pipe, config("tile", pattern_options=SPARSE_OPTIONS["tile"]))
    log = _spy_steps(pipe)
    out = _call(pipe, image=image)
    assert out.shape == ref.shape and bool(torch.isfinite(out).all()) and (out - ref).abs().max() > 1e-4
    assert {entry[3].text_len for entry in log} == {PIPE_COND_LEN} and len(log) == 2 * 2 * 2
    vs.remove(pipe)


def test_generate_times_and_counts_the_steps_of_a_pipeline_without_a_step_callback():
    """HunyuanVideo 1.5's __call__ takes no callback_on_step_end: generate hooks the scheduler's
    step instead, so the summary has step times and counts the sparse steps (it said 0 of 8)."""
    import inspect

    from vidsparse.generation import GenerateOptions, generate

    assert "callback_on_step_end" not in inspect.signature(h15.tiny_pipeline().__call__).parameters
    result = generate(GenerateOptions(model="tiny-hunyuan15", steps=4, out=None, progress=False))
    assert len(result.step_times_s) == 4 and result.denoise_s > 0
    assert result.sparse_steps == 3  # the family's dense first 25 % of 4 steps: 1


# -- HunyuanVideo Framepack -------------------------------------------------------------------
def test_framepack_is_refused_at_apply_naming_what_is_missing(tmp_path):
    model = tiny_transformer("hunyuan-framepack")
    inputs = tiny_inputs("hunyuan-framepack", model, 3, 4, 4, batch=2)
    # What the blocks attend: 4x + 2x history, clean frames, then the 3x2x2 noisy grid (+ text).
    lengths = []
    hook = model.transformer_blocks[0].register_forward_pre_hook(lambda m, a: lengths.append(a[0].shape[1]))
    run(model, inputs)
    hook.remove()
    assert lengths == [1 + 1 + 2 * 2 * 2 + 3 * 2 * 2]
    with pytest.raises(ValueError, match="HunyuanVideoFramepackTransformer3DModel.*history.*one VideoLayout"):
        vs.apply(model, "tile")
    assert not hasattr(model, "_diffusers_hook") or model._diffusers_hook.get_hook("vidsparse") is None
    assert family_of(model).name == "hunyuan-framepack"
    # Not listed as supported; generate refuses from the pipeline class, before loading weights.
    with pytest.raises(ValueError, match="Supported transformers: ") as info:
        family_of(torch.nn.Linear(1, 1))
    assert "hunyuan15 (HunyuanVideo15Transformer3DModel)" in str(info.value)
    assert "Framepack" not in str(info.value)
    from vidsparse.generation.model import resolve_model

    folder = tmp_path / "framepack"
    folder.mkdir()
    (folder / "model_index.json").write_text('{"_class_name": "HunyuanVideoFramepackPipeline"}')
    with pytest.raises(ValueError, match="generate cannot run a HunyuanVideoFramepackPipeline: its self-attention"):
        resolve_model(str(folder))
