"""The Kandinsky 5 family record (vidsparse/families/kandinsky5.py) against the diffusers model it
describes: Kandinsky5Transformer3DModel at a tiny size (regular and NABLA attention, channel-last
latents, NABLA's tiled token order) and the real Kandinsky5T2VPipeline."""

import json

import pytest
import torch
from diffusers.models.attention_dispatch import AttentionBackendName
from diffusers.models.transformers.transformer_kandinsky import fractal_flatten, fractal_unflatten
from family_checks import (
    SameFrame,
    SamePixel,
    check_mirror_is_bit_exact,
    check_pattern_differs,
    check_pattern_on_grid,
    check_unrecognised_input_runs_dense,
    config,
)

import vidsparse as vs
from vidsparse.cli import main
from vidsparse.families import family_of, family_of_pipeline, get_family, video_geometry
from vidsparse.families.kandinsky5 import (
    FAMILY,
    Kandinsky5SparseProcessor,
    fractal_to_raster,
    raster_to_fractal,
    tiny_prompt_kwargs,
)
from vidsparse.models import tiny_inputs, tiny_transformer
from vidsparse.pipelines import get_state

pytestmark = pytest.mark.filterwarnings("ignore:In CPU autocast:UserWarning")

# Options making each registered pattern sparse on a 4x4x4 token grid.
TILE = vs.Tile(tile=(1, 2, 2), window=(1, 1, 1))


def _run(model, inputs):
    with torch.no_grad():
        return model(**inputs, return_dict=True).sample  # return_dict=False gives a bare tensor here


_SHARED: dict = {}


@pytest.fixture
def shared():
    """(model, inputs, unpatched output) on a 4x4x4 token grid, built once; unpatched after each test."""
    if not _SHARED:
        model = tiny_transformer("kandinsky5")
        inputs = tiny_inputs("kandinsky5", model, 4, 8, 8, batch=2)
        _SHARED.update(model=model, inputs=inputs, ref=_run(model, inputs))
    yield _SHARED["model"], _SHARED["inputs"], _SHARED["ref"]
    vs.remove(_SHARED["model"])


def test_registry_finds_kandinsky5_by_name_transformer_and_pipeline():
    assert get_family("kandinsky5") is FAMILY and get_family("Kandinsky-5") is FAMILY
    assert family_of(tiny_transformer("kandinsky5")) is FAMILY
    assert family_of(tiny_transformer("kandinsky5-nabla")) is FAMILY
    assert family_of_pipeline("Kandinsky5T2VPipeline") is FAMILY
    assert family_of_pipeline("KandinskyV22Pipeline") is None


def test_dense_patch_is_exact_and_layout_is_discovered(shared):
    model, inputs, ref = shared
    assert inputs["hidden_states"].shape == (2, 4, 8, 8, 4)  # channel-last latents
    originals = {n: m.processor for n, m in model.named_modules() if hasattr(m, "processor")}
    vs.apply(model, config(vs.Dense()))
    patched = {path for path, _, _ in FAMILY.attention_paths(model)}
    assert patched == {"visual_transformer_blocks.0.self_attention", "visual_transformer_blocks.1.self_attention"}
    for name, module in model.named_modules():
        if hasattr(module, "processor"):  # text-block self-attention and cross-attention stay the model's
            assert isinstance(module.processor, Kandinsky5SparseProcessor) == (name in patched)
    out = _run(model, inputs)
    state = get_state(model)
    assert state.calls["sparse"] == 2 and state.calls["dense"] == 0
    assert state.current.layout == vs.VideoLayout(4, 4, 4)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-5)
    vs.remove(model)
    assert all(originals[n] is m.processor for n, m in model.named_modules() if hasattr(m, "processor"))
    assert torch.equal(_run(model, inputs), ref)


def test_unrecognised_input_runs_dense_with_one_warning(shared):
    check_unrecognised_input_runs_dense(shared[0], "Kandinsky5Transformer3DModel")


def test_mirror_is_bit_exact_with_the_models_attention_core(shared):
    check_mirror_is_bit_exact(*shared, layers=2, run=_run)


@pytest.mark.parametrize("name", sorted(n for n in vs.PATTERNS if n != "dense"))
def test_sparse_patterns_differ_from_dense(name, shared):
    check_pattern_differs(*shared, name, vs.VideoLayout(4, 4, 4), layers=2, run=_run)


@pytest.mark.parametrize("name", sorted(vs.PATTERNS))
def test_every_pattern_runs_with_family_defaults_on_a_ragged_grid(name):
    """Pattern names get the family defaults fitted to the call's grid: a 3x5x7 grid runs finite."""
    model = _SHARED.get("ragged") or _SHARED.setdefault("ragged", tiny_transformer("kandinsky5", num_visual_blocks=1))
    inputs = tiny_inputs("kandinsky5", model, 3, 10, 14)
    check_pattern_on_grid(model, inputs, name, vs.VideoLayout(3, 5, 7), layers=1, run=_run)


def _token_grid(out):
    """[B, F, H, W, C] -> [B, F, H/2, W/2, 4C] on the token grid (patch pixels folded into C)."""
    b, f, h, w, c = out.shape
    return out.reshape(b, f, h // 2, 2, w // 2, 2, c).permute(0, 1, 2, 4, 3, 5, 6).reshape(b, f, h // 2, w // 2, -1)


@pytest.mark.parametrize("variant", ["kandinsky5", "kandinsky5-nabla"])
def test_local_patterns_keep_tokens_local(variant):
    """One self-attention layer under a same-frame (same-pixel) pattern: changing one latent frame
    (pixel) changes only that frame's (pixel's) output, so the grid's order and axes are right, in
    raster order and in NABLA's 8x8-tile order alike."""
    model = tiny_transformer(variant, num_visual_blocks=1)
    inputs = tiny_inputs(variant, model, 2, 16, 16)
    assert (inputs["sparse_params"] is not None) == variant.endswith("nabla")
    vs.apply(model, config(SameFrame()))
    moved = dict(inputs, hidden_states=inputs["hidden_states"].clone())
    moved["hidden_states"][:, 1] += 1.0
    changed = (_token_grid(_run(model, moved)) - _token_grid(_run(model, inputs))).abs().amax(dim=(0, 2, 3, 4))
    assert (changed > 1e-6).tolist() == [False, True]
    vs.apply(model, config(SamePixel()))
    moved = dict(inputs, hidden_states=inputs["hidden_states"].clone())
    moved["hidden_states"][:, :, 2:4, 12:14] += 1.0  # token (1, 6): tile (0, 0) in NABLA order
    changed = (_token_grid(_run(model, moved)) - _token_grid(_run(model, inputs))).abs().amax(dim=(0, 1, 4)) > 1e-6
    expected = torch.zeros(8, 8, dtype=torch.bool)
    expected[1, 6] = True
    assert torch.equal(changed, expected)


def test_fractal_order_matches_the_models_own():
    """fractal_to_raster undoes diffusers' fractal_flatten (NABLA's 8x8 tiles), raster_to_fractal
    redoes it (its fractal_unflatten inverse), for [B, S, heads, D] tensors."""
    b, f, h, w = 2, 3, 16, 24
    x = torch.randn(b, f, h, w, 2, 5)
    flat, _ = fractal_flatten(x, x, (b, f, h, w), block_mask=True)
    raster = x.reshape(b, f * h * w, 2, 5)
    assert torch.equal(fractal_to_raster(flat, (f, h, w)), raster)
    assert torch.equal(raster_to_fractal(raster, (f, h, w)), flat)
    assert torch.equal(fractal_unflatten(raster_to_fractal(raster, (f, h, w)), (b, f, h, w), block_mask=True), x)


def test_nabla_calls_run_the_pattern_in_raster_order_and_dense_layers_keep_nabla():
    """A NABLA checkpoint's call (sparse_params, tokens in 8x8 tiles) under a vidsparse pattern equals
    the same weights called in raster order; Dense() equals full attention; layers left dense run the
    model's own NABLA, bit for bit."""
    model = tiny_transformer("kandinsky5-nabla")
    inputs = tiny_inputs("kandinsky5-nabla", model, 3, 16, 16)
    raster = dict(inputs, sparse_params=None)
    full = _run(model, raster)  # the model's own regular attention
    # The model's NABLA is a FlexAttention BlockMask without a mask_mod: eager FlexAttention on CPU
    # computes it as full attention (only compiled kernels skip the blocks), so ``nabla`` is close to
    # ``full`` here; what matters below is that dense layers run exactly the model's own call.
    for _, attn, _ in FAMILY.attention_paths(model):  # per processor: set_attention_backend is global
        attn.processor._attention_backend = AttentionBackendName.FLEX
    nabla = _run(model, inputs)
    vs.apply(model, config(vs.Dense()))
    torch.testing.assert_close(_run(model, inputs), full, atol=1e-4, rtol=1e-5)
    assert get_state(model).current.layout == vs.VideoLayout(3, 8, 8)
    vs.apply(model, config(TILE))
    sparse = _run(model, inputs)
    torch.testing.assert_close(sparse, _run(model, raster), atol=1e-5, rtol=1e-5)
    assert (sparse - full).abs().max() > 1e-4
    vs.apply(model, config(TILE, dense_layers=(0, 1)))
    assert torch.equal(_run(model, inputs), nabla) and get_state(model).calls["dense"] == 2
    vs.remove(model)
    assert torch.equal(_run(model, inputs), nabla)


@pytest.mark.slow
def test_torch_compile_of_the_patched_transformer(monkeypatch):
    from vidsparse.pipelines import hooks

    model = tiny_transformer("kandinsky5", num_visual_blocks=1)
    inputs = tiny_inputs("kandinsky5", model, 3, 8, 8)
    vs.apply(model, config(TILE))
    eager = _run(model, inputs)
    vs.remove(model)
    vs.clear_plan_cache()
    compiled = torch.compile(model, backend="eager")
    vs.apply(compiled, config(TILE))
    state = get_state(model)
    prebuilt = []
    build = hooks._vidsparse_plan
    monkeypatch.setattr(hooks, "_vidsparse_plan", lambda *a, **kw: prebuilt.append(kw["num_heads"]) or build(*a, **kw))
    torch.testing.assert_close(_run(compiled, inputs), eager, atol=1e-5, rtol=1e-5)
    # The config has no num_attention_heads: the hook reads the heads off the attention module
    # and builds the plans outside the compiled graph.
    assert state.calls["sparse"] == 1 and prebuilt == [2]


def _call(pipe, **kw):
    kw.setdefault("height", 64)
    kw.setdefault("width", 64)
    return pipe(
        **tiny_prompt_kwargs(pipe, "a red fox"),
        num_frames=9,
        num_inference_steps=2,
        guidance_scale=3.0,
        generator=torch.Generator().manual_seed(0),
        output_type="latent",
        **kw,
    ).frames


def test_geometry_matches_the_pipeline_latents_and_sizes_are_validated():
    pipe = FAMILY.tiny_pipeline()
    geo = video_geometry("kandinsky5")
    assert geo is FAMILY.geometry and geo.default_video == (121, 512, 768) and geo.fps == 24
    assert geo.latent_grid(121, 512, 768) == (31, 32, 48)
    latents = _call(pipe, height=32, width=64)
    _, f, h, w, _ = latents.shape  # channel-last
    assert tuple(pipe.transformer.config.patch_size) == geo.patch
    assert geo.latent_grid(9, 32, 64) == (f, h // 2, w // 2) == (3, 2, 4)
    with pytest.raises(ValueError, match="frames must be 1 \\+ a multiple of 4; nearest valid: 9 or 13"):
        geo.latent_grid(10, 32, 64)
    with pytest.raises(ValueError, match="width=72: must be a multiple of 16"):
        geo.check_video(9, 32, 72)


def test_generate_validates_sizes_of_a_local_pipeline_folder(tmp_path, capsys):
    """`vidsparse generate --model <folder>` reads the family and its VAE factors from the folder's
    configs and refuses a size they cannot take, before loading anything."""
    (tmp_path / "transformer").mkdir()
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "Kandinsky5T2VPipeline"}))
    (tmp_path / "transformer" / "config.json").write_text(json.dumps({"patch_size": [1, 2, 2]}))
    argv = ["generate", "--model", str(tmp_path), "--frames", "122", "--height", "512", "--width", "760"]
    assert main(argv + ["--out", str(tmp_path / "x.mp4")]) == 2
    err = capsys.readouterr().err
    assert "kandinsky5 VAE compresses time 4x" in err and "nearest valid: 121 or 125" in err
    assert "width=760: must be a multiple of 16" in err and "Traceback" not in err


def test_inspect_knows_the_family(tmp_path, capsys):
    js = tmp_path / "g.json"
    argv = ["inspect", "--pattern", "gna", "--video", "121x512x768", "--family", "kandinsky5"]
    assert main(argv + ["--no-plot", "--json", str(js)]) == 0
    assert json.loads(js.read_text())["grid"] == [31, 32, 48]
    assert "kandinsky5" in capsys.readouterr().out


def test_pattern_defaults_are_fitted_to_the_grid():
    big = vs.VideoLayout(31, 32, 48)  # 121x512x768
    assert FAMILY.pattern_options("gna", big, None) == dict(kernel_size=(11, 24, 24), stride=(1, 8, 8))
    assert FAMILY.pattern_options("tile", big, None) == dict(tile=(2, 8, 8), window=(5, 3, 3))
    assert FAMILY.pattern_options("radial", big, None) == dict(decay_factor=1.0, sink=False, block_size=128)
    small = vs.VideoLayout(3, 5, 7)
    assert FAMILY.pattern_options("gna", small, None) == dict(kernel_size=(-1, -1, -1), stride=(1, 5, 7))
    assert FAMILY.pattern_options("tile", small, None) == dict(tile=(2, 5, 7), window=(5, 3, 3))
    assert FAMILY.default_schedule("tile") == (0.25, ()) and FAMILY.default_schedule("dense") == (0, ())


def test_lora_trains_video_and_parallel_runs():
    from vidsparse.lora.models import adapter_for
    from vidsparse.parallel.model import parallelize, unparallelize

    t2v, i2v = FAMILY.lora_adapter_class()  # tests/test_lora_kandinsky5.py
    pipe = FAMILY.tiny_pipeline()
    assert type(adapter_for(pipe, "tiny-kandinsky5")) is t2v
    assert type(adapter_for(FAMILY.tiny_pipeline(variant="kandinsky5-i2v"), "tiny-kandinsky5-i2v")) is i2v
    with pytest.raises(ValueError, match="does not train Kandinsky5T2IPipeline: it generates images"):
        adapter_for(object.__new__(__import__("diffusers").Kandinsky5T2IPipeline), "kandinsky-t2i")
    parallelize(pipe, "radial", mode="clip", runtime=None)  # runs: tests/test_parallel_new_families.py
    unparallelize(pipe)


@pytest.mark.slow
def test_t2v_pipeline_end_to_end():
    """The real diffusers pipeline, 2 steps with CFG: Dense() equals the pipeline's own output, a
    sparse pattern runs every self-attention call and differs, remove restores the exact output;
    the NABLA variant (same weights, tokens in 8x8 tiles) under the pattern gives the same video."""
    pipe = FAMILY.tiny_pipeline()
    ref = _call(pipe, height=128, width=128)
    assert ref.shape == (1, 3, 16, 16, 4)
    vs.apply(pipe, vs.SparseConfig(vs.Dense(), backend="torch"))
    torch.testing.assert_close(_call(pipe, height=128, width=128), ref, atol=1e-4, rtol=1e-4)
    vs.apply(pipe, vs.SparseConfig(TILE, backend="torch", dense_first_steps=0))
    log = []
    state = get_state(pipe.transformer)
    inner = state.attention_fn
    state.attention_fn = lambda q, k, v, layout, p, **kw: (
        log.append((state.current.step, layout)) or inner(q, k, v, layout, p, **kw)
    )
    out = _call(pipe, height=128, width=128)
    assert [s for s, _ in log] == [0] * 4 + [1] * 4  # 2 layers x (cond, uncond) per step
    assert {layout for _, layout in log} == {vs.VideoLayout(3, 8, 8)}
    assert bool(torch.isfinite(out).all()) and (out - ref).abs().max() > 1e-4
    vs.remove(pipe)
    assert torch.equal(_call(pipe, height=128, width=128), ref)

    nabla = FAMILY.tiny_pipeline(nabla=True)
    vs.apply(nabla, vs.SparseConfig(TILE, backend="torch", dense_first_steps=0))
    torch.testing.assert_close(_call(nabla, height=128, width=128), out, atol=1e-4, rtol=1e-4)


def test_generate_runs_the_tiny_kandinsky5_pipeline():
    """`vidsparse generate --model tiny-kandinsky5`: the record's tiny pipeline, prompts hashed by its
    tiny_prompt_kwargs (different prompts give different videos), a sparse pattern applied."""
    from vidsparse.generation import GenerateOptions, generate

    opts = dict(model="tiny-kandinsky5", frames=5, height=32, width=64, steps=2, pattern="tile", progress=False)
    result = generate(GenerateOptions(**opts, dense_first_steps=0, backend="torch"))
    assert result.frames.shape == (5, 32, 64, 3) and result.frames.dtype.name == "uint8"
    other = generate(GenerateOptions(**opts, prompt="a green cube", dense_first_steps=0, backend="torch"))
    assert not (other.frames == result.frames).all()
    pipe = FAMILY.tiny_pipeline()
    assert "prompt_embeds_qwen" in tiny_prompt_kwargs(pipe, "a cat", "blurry")
