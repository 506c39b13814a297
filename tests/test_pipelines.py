"""vidsparse.apply / remove on pipelines: step schedule, CFG branches, resolutions, compile, errors."""

from collections import Counter
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch

import vidsparse as vs
from vidsparse.models import build_tiny_pipeline, run_tiny_pipeline, tiny_inputs, tiny_transformer
from vidsparse.pipelines import get_state, is_applied, reset_state

pytestmark = pytest.mark.filterwarnings("ignore:In CPU autocast:UserWarning")


def _spy(transformer, log):
    """Record (step, branch, layer, layout) of every sparse attention call."""
    state = get_state(transformer)
    inner = state.attention_fn

    def spy(q, k, v, layout, pattern, **kw):
        info = state.current
        log.append((info.step, info.branch, kw["layer"], layout.grid, q.shape[0]))
        return inner(q, k, v, layout, pattern, **kw)

    state.attention_fn = spy
    return state


def _cfg(pattern="dense", **kw):
    kw.setdefault("backend", "torch")
    return vs.SparseConfig(pattern, **kw)


# -- pipelines ---------------------------------------------------------------------------------
def test_pipeline_dense_equivalence_and_exact_remove():
    pipe = build_tiny_pipeline()
    ref = run_tiny_pipeline(pipe, num_inference_steps=3)
    processors = {n: m.processor for n, m in pipe.transformer.named_modules() if hasattr(m, "processor")}
    assert vs.apply(pipe, _cfg(vs.Dense())) is pipe and is_applied(pipe)
    out = run_tiny_pipeline(pipe, num_inference_steps=3)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert vs.remove(pipe) is pipe and not is_applied(pipe)
    assert all(processors[n] is m.processor for n, m in pipe.transformer.named_modules() if hasattr(m, "processor"))
    assert torch.equal(run_tiny_pipeline(pipe, num_inference_steps=3), ref)
    vs.remove(pipe)  # removing twice is a no-op


def test_sequential_cfg_steps_batch_two_and_reset_after_the_call():
    pipe = build_tiny_pipeline()
    vs.apply(pipe, _cfg(dense_first_steps=1, dense_last_steps=1, dense_layers=(1,)))
    log = []
    state = _spy(pipe.transformer, log)
    run_tiny_pipeline(pipe, num_inference_steps=5, num_videos_per_prompt=2)
    # Steps 1..3 sparse (first and last dense), layer 0 only, both CFG branches, batch 2.
    assert [(s, b, layer) for s, b, layer, _, _ in log] == [(s, b, 0) for s in (1, 2, 3) for b in ("cond", "uncond")]
    assert {bs for *_, bs in log} == {2}
    assert state.calls["dense"] == 5 * 2 * 2 - len(log)
    assert state.current is None and not state.tracker._branches  # reset by maybe_free_model_hooks


def test_fractions_of_steps_and_family_defaults():
    pipe = build_tiny_pipeline()
    vs.apply(pipe, _cfg(dense_first_steps=0.25, dense_last_steps=0.25, dense_layers=()))
    log = []
    _spy(pipe.transformer, log)
    run_tiny_pipeline(pipe, num_inference_steps=8)
    assert sorted({s for s, *_ in log}) == [2, 3, 4, 5]

    # Family defaults for Radial on Wan: first 25 % of steps dense and layer 0 dense.
    vs.apply(pipe, _cfg("radial"))
    log.clear()
    state = _spy(pipe.transformer, log)
    run_tiny_pipeline(pipe, num_inference_steps=4, height=64, width=64)
    assert Counter((s, layer) for s, _, layer, _, _ in log) == {(1, 1): 2, (2, 1): 2, (3, 1): 2}
    radial = state.layer_patterns(vs.VideoLayout(3, 4, 4), 16)
    assert radial[0] is None and radial[1] == vs.make_pattern("radial", decay_factor=0.2, sink=True, block_size=16)


def test_two_resolutions_and_frame_counts():
    pipe = build_tiny_pipeline()
    vs.apply(pipe, _cfg(dense_first_steps=0))
    log = []
    _spy(pipe.transformer, log)
    a = run_tiny_pipeline(pipe, num_inference_steps=2, height=32, width=48, num_frames=9)
    b = run_tiny_pipeline(pipe, num_inference_steps=2, height=64, width=32, num_frames=5)
    assert a.shape == (1, 4, 3, 4, 6) and b.shape == (1, 4, 2, 8, 4)
    assert [g for _, _, _, g, _ in log] == [(3, 2, 3)] * 8 + [(2, 4, 2)] * 8
    assert [s for s, *_ in log][:8] == [0, 0, 0, 0, 1, 1, 1, 1]


def test_wan22_two_transformers_share_the_step_count():
    pipe = build_tiny_pipeline(two_stage=True)
    ref = run_tiny_pipeline(pipe, num_inference_steps=6)
    vs.apply(pipe, _cfg(vs.Dense(), dense_first_steps=0))
    high, low = [], []
    _spy(pipe.transformer, high)
    _spy(pipe.transformer_2, low)
    out = run_tiny_pipeline(pipe, num_inference_steps=6)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    steps_high, steps_low = sorted({s for s, *_ in high}), sorted({s for s, *_ in low})
    assert steps_high and steps_low and steps_high + steps_low == list(range(6))
    assert get_state(pipe.transformer).tracker is get_state(pipe.transformer_2).tracker
    vs.remove(pipe)
    assert torch.equal(run_tiny_pipeline(pipe, num_inference_steps=6), ref)


# -- step index without the pipeline's help ----------------------------------------------------
def _bare(num_layers=1, **cfg):
    model = tiny_transformer("wan", num_layers=num_layers)
    vs.apply(model, _cfg(**cfg))
    log = []
    _spy(model, log)
    return model, log


def _call(model, t, batch=1, context=None, **ctx):
    inputs = tiny_inputs("wan", model, 3, 4, 4, batch=batch, timestep=t)
    with torch.no_grad():
        if context is None:
            model(**inputs)
        else:
            with model.cache_context(context, **ctx):
                model(**inputs)


TIMESTEPS = [999.0, 750.0, 500.0, 250.0]


def test_step_index_sequential_cfg_with_named_branches():
    model, log = _bare()
    for t in TIMESTEPS:
        _call(model, t, context="cond")
        _call(model, t, context="uncond")
    assert [(s, b) for s, b, *_ in log] == [(i, b) for i in range(4) for b in ("cond", "uncond")]


def test_step_index_sequential_cfg_without_contexts_and_batched_cfg():
    model, log = _bare()
    for t in TIMESTEPS:  # two calls per step with the same timestep
        _call(model, t)
        _call(model, t)
    assert [s for s, *_ in log] == [0, 0, 1, 1, 2, 2, 3, 3]
    reset_state(model)
    log.clear()
    for t in TIMESTEPS:  # batched CFG: one call of batch 2 per step
        _call(model, t, batch=2, context="cond_uncond")
    assert [(s, bs) for s, *_, bs in log] == [(i, 2) for i in range(4)]


def test_new_run_is_detected_and_reset_state():
    model, log = _bare()
    for t in TIMESTEPS + TIMESTEPS[:2]:  # second run restarts at the first timestep
        _call(model, t)
    assert [s for s, *_ in log] == [0, 1, 2, 3, 0, 1]
    log.clear()
    for t in [999.0, 500.0, 800.0]:  # timestep going up = new run (other schedule)
        _call(model, t)
    assert [s for s, *_ in log] == [0, 1, 0]  # back to the first value, then going up: new runs
    reset_state(model)
    log.clear()
    _call(model, 250.0)
    assert [s for s, *_ in log] == [0]


def test_increasing_timesteps_count_too():
    model, log = _bare()
    for t in [0.0, 10.0, 20.0]:  # e.g. Mochi-style schedules
        _call(model, t)
    assert [s for s, *_ in log] == [0, 1, 2]


def test_context_step_index_wins_and_dense_last_on_bare_transformer():
    model, log = _bare(num_layers=2, dense_last_steps=1, dense_layers=(-1,), num_inference_steps=4)
    assert get_state(model).dense_layers == frozenset({1})
    for i in range(len(TIMESTEPS)):
        _call(model, 100.0, context="cond", step_index=i)  # constant t: only the context knows the step
    assert [(s, layer) for s, _, layer, *_ in log] == [(0, 0), (1, 0), (2, 0)]


# -- compile, hooks, re-apply ------------------------------------------------------------------
@pytest.mark.slow
def test_torch_compile_of_patched_transformer():
    """Compiling the patched transformer (or patching the compiled one) works from a cold plan
    cache: the hook builds the plans eagerly, the compiled graph only looks them up."""
    model = tiny_transformer("wan", num_layers=1)
    inputs = tiny_inputs("wan", model, 3, 4, 4)
    radial = vs.make_pattern("radial", block_size=16, decay_factor=0.2)
    with torch.no_grad():
        ref = model(**inputs, return_dict=False)[0]
        vs.apply(model, _cfg(radial, dense_first_steps=0, dense_layers=()))
        eager = model(**inputs, return_dict=False)[0]
        assert (eager - ref).abs().max() > 1e-4
        vs.remove(model)
        vs.clear_plan_cache()
        compiled = torch.compile(model, backend="eager")
        vs.apply(compiled, _cfg(radial, dense_first_steps=0, dense_layers=()))
        out = compiled(**inputs, return_dict=False)[0]
    torch.testing.assert_close(out, eager, atol=1e-5, rtol=1e-5)
    assert get_state(model).calls["sparse"] == 1 and get_state(compiled) is get_state(model)


def test_reapply_replaces_the_configuration_and_positional_call():
    model = tiny_transformer("wan")
    vs.apply(model, _cfg("radial"))
    vs.apply(model, _cfg(dense_layers=(0,)))
    assert list(model._diffusers_hook.hooks) == ["vidsparse"]
    state = get_state(model)
    assert state.config.pattern == "dense" and state.dense_layers == frozenset({0})
    inputs = tiny_inputs("wan", model, 3, 4, 4)
    with torch.no_grad():
        model(inputs["hidden_states"], inputs["timestep"], inputs["encoder_hidden_states"])
    assert state.calls == Counter(sparse=1, dense=1)


def test_discover_layout_override_and_attention_backend_passthrough():
    model = tiny_transformer("wan")
    vs.apply(model, _cfg(dense_first_steps=0))
    state = get_state(model)
    state.discover_layout = lambda transformer, kwargs: None  # unknown grid: dense, model's own path
    inputs = tiny_inputs("wan", model, 3, 4, 4)
    with torch.no_grad():
        model(**inputs)
    assert state.calls == Counter(dense=2)
    proc = model.blocks[0].attn1.processor
    proc._attention_backend = "native"
    assert state.original_processors["blocks.0.attn1"]._attention_backend == "native"


# -- errors ------------------------------------------------------------------------------------
def test_unsupported_targets():
    with pytest.raises(ValueError, match="Supported transformers: wan"):
        vs.apply(torch.nn.Linear(2, 2), "dense")
    with pytest.raises(ValueError, match=r"kandinsky5 \(Kandinsky5Transformer3DModel\).*How to add a model family"):
        vs.apply(torch.nn.Linear(2, 2), "dense")
    pipe = build_tiny_pipeline()
    with pytest.raises(ValueError, match="cannot patch a AutoencoderKLWan"):
        vs.apply(pipe.vae, "dense")
    with pytest.raises(TypeError, match="diffusers pipeline or a transformer"):
        vs.apply("pipe", "dense")
    pipe.transformer = None
    with pytest.raises(ValueError, match="holds no transformer"):
        vs.apply(pipe, "dense")


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(pattern="sparse-magic"), ValueError, "Unknown pattern 'sparse-magic'"),
        (dict(pattern=3), TypeError, "pattern name"),
        (dict(pattern="dense", dense_first_steps=1.5), ValueError, "fraction"),
        (dict(pattern="dense", dense_first_steps=-1), ValueError, ">= 0"),
        (dict(pattern="dense", dense_last_steps="2"), TypeError, "int number of steps"),
        (dict(pattern="dense", dense_layers=3), TypeError, "tuple\\(range\\(3\\)\\)"),
        (dict(pattern="dense", dense_layers=(0.5,)), TypeError, "int layer indices"),
        (dict(pattern="dense", layer_patterns={0: "nope"}), ValueError, "Unknown pattern 'nope'"),
        (dict(pattern="dense", layer_patterns={"0": "dense"}), TypeError, "int layer indices"),
        (dict(pattern="dense", dense_layers=(1,), layer_patterns={1: "dense"}), ValueError, "both in dense_layers"),
        (dict(pattern="dense", backend="cuda"), ValueError, "backend"),
        (dict(pattern="dense", block_size=48), ValueError, "power of two"),
        (dict(pattern="dense", num_inference_steps=0), ValueError, "num_inference_steps"),
        (dict(pattern=vs.Dense(), pattern_options={"x": 1}), ValueError, "given by name only"),
    ],
)
def test_bad_config_values(kwargs, error, match):
    with pytest.raises(error, match=match):
        vs.SparseConfig(**kwargs)


def test_bad_apply_inputs_fail_before_any_forward():
    model = tiny_transformer("wan")
    with pytest.raises(TypeError, match="SparseConfig, a pattern object or a pattern name"):
        vs.apply(model, 0.5)
    with pytest.raises(ValueError, match="has layer 5, but the transformer has 2"):
        vs.apply(model, _cfg(dense_layers=(5,)))
    with pytest.raises(ValueError, match="has layer -3"):
        vs.apply(model, _cfg(layer_patterns={-3: "dense"}))
    with pytest.raises(ValueError, match="num_inference_steps"):
        vs.apply(model, _cfg(dense_last_steps=2))
    with pytest.raises(ValueError, match="num_inference_steps"):
        vs.apply(model, _cfg(dense_first_steps=0.3))
    assert not is_applied(model)
    with pytest.raises(ValueError, match="not patched by vidsparse"):
        get_state(model)


@dataclass(frozen=True)
class _VideoOnly(vs.Dense):
    name: ClassVar[str] = "test-video-only"
    text_positions: ClassVar[tuple[str, ...]] = ("none",)


@dataclass(frozen=True)
class _NoMask(vs.Pattern):
    name: ClassVar[str] = "test-no-mask"


def test_patterns_the_family_cannot_run():
    with pytest.raises(ValueError, match="handles text spans \\('none',\\), but hunyuan attends text after"):
        vs.apply(tiny_transformer("hunyuan"), _cfg(_VideoOnly()))
    vs.apply(tiny_transformer("wan"), _cfg(_VideoOnly()))  # fine without text
    with pytest.raises(ValueError, match="neither video_mask"):
        vs.apply(tiny_transformer("wan"), _cfg(_NoMask()))


def test_foreign_processor_is_refused():
    from diffusers.models.attention_processor import AttnProcessor2_0

    model = tiny_transformer("cogvideox")
    model.transformer_blocks[0].attn1.set_processor(AttnProcessor2_0())
    with pytest.raises(ValueError, match="uses the attention processor AttnProcessor2_0"):
        vs.apply(model, "dense")


def test_pattern_that_does_not_fit_the_grid_fails_before_attention():
    model = tiny_transformer("wan")
    vs.apply(model, _cfg(vs.make_pattern("gna", kernel_size=(9, 3, 3))))
    log = []
    _spy(model, log)
    with pytest.raises(ValueError, match="cannot run on this wan call \\(token grid 3x2x2\\)"):
        _call(model, 500.0)
    assert log == []


def test_plain_gradient_checkpointing_recomputes_under_the_same_pattern():
    """diffusers' own enable_gradient_checkpointing recomputes blocks in backward, after the
    forward returned: the sparse pattern must still be the forward's."""
    inputs = None
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = tiny_transformer("wan", num_layers=2)
        if inputs is None:
            inputs = tiny_inputs("wan", model, 3, 4, 4)
        vs.apply(
            model,
            _cfg(vs.make_pattern("radial", block_size=16, decay_factor=0.2), dense_first_steps=0, dense_layers=()),
        )
        if checkpointing:
            model.enable_gradient_checkpointing()
        model.train()
        out = model(**inputs, return_dict=False)[0]
        out.square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        assert get_state(model).calls["sparse"] >= 2
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-5, rtol=1e-4)


def test_pipeline_step_comes_from_the_scheduler_without_reading_the_timestep(monkeypatch):
    """LTXPipeline sets no step index in its cache context: the hook takes the scheduler's
    ``step_index`` (host state) instead of reading the timestep tensor (a device sync on a GPU),
    and counts the steps exactly as before (dense first step, then sparse)."""
    import sys

    from vidsparse.families import get_family

    fam = get_family("ltx")
    pipe = fam.tiny_pipeline(seed=0)
    vs.apply(pipe, vs.SparseConfig("radial", dense_first_steps=1, backend="torch"))
    state = get_state(pipe.transformer)
    steps = []
    pipe.transformer.register_forward_hook(lambda m, a, o: steps.append((state.current.step, state.current.patterns)))
    reads = []
    for name in ("item", "__float__", "tolist"):
        original = getattr(torch.Tensor, name)

        def spy(self, *args, _name=name, _original=original, **kwargs):
            if sys._getframe(1).f_code.co_filename.endswith("hooks.py"):
                reads.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, spy)
    kwargs = fam.tiny_prompt_kwargs(pipe, "a red ball", "")
    pipe(**kwargs, num_frames=9, height=64, width=96, num_inference_steps=3, output_type="latent")
    monkeypatch.undo()
    assert reads == []
    assert [s for s, _ in steps] == [0, 1, 2]
    assert all(p is None for p in steps[0][1]) and any(p is not None for p in steps[1][1])
