"""vidsparse and diffusers / accelerate offloading, in both orders, on tiny Wan, HunyuanVideo and
CogVideoX pipelines: every call stays sparse (counted), outputs equal the non-offloaded patched
pipeline, and ``vs.remove`` leaves the offload machinery as a never-patched pipeline has it."""

from __future__ import annotations

import dataclasses

import accelerate.hooks
import pytest
import torch
from compose_pipelines import FAMILIES, run, tiny_pipeline
from diffusers.hooks import HookRegistry

import vidsparse as vs
from vidsparse.families import family_of
from vidsparse.pipelines import get_state, is_applied

pytestmark = pytest.mark.filterwarnings("ignore:In CPU autocast:UserWarning")

CPU = torch.device("cpu")
OFFLOADS = ("model", "group_block", "group_leaf")


def _cfg():
    return vs.SparseConfig("radial", backend="torch", dense_first_steps=0, dense_layers=())


def _offload(pipe, kind: str) -> None:
    if kind == "model":
        pipe.enable_model_cpu_offload(device=CPU)
    elif kind == "group_block":
        pipe.transformer.enable_group_offload(CPU, offload_type="block_level", num_blocks_per_group=1)
    elif kind == "group_leaf":
        pipe.transformer.enable_group_offload(CPU, offload_type="leaf_level")
    elif kind == "sequential":
        pipe.enable_sequential_cpu_offload(device=CPU)
    else:
        raise ValueError(kind)


def _patched(family: str, kind: str, order: str):
    pipe = tiny_pipeline(family)
    if order == "offload_first":
        _offload(pipe, kind)
        vs.apply(pipe, _cfg())
    else:
        vs.apply(pipe, _cfg())
        _offload(pipe, kind)
    return pipe


@pytest.fixture(scope="module")
def references():
    """Per family: (dense output, sparse output, sparse calls per pipeline call) without offloading."""
    out = {}
    for family in FAMILIES:
        pipe = tiny_pipeline(family)
        dense = run(pipe, family)
        vs.apply(pipe, _cfg())
        state = get_state(pipe.transformer)
        sparse = run(pipe, family)
        out[family] = (dense, sparse, state.calls["sparse"])
    return out


@pytest.mark.parametrize("order", ["offload_first", "apply_first"])
@pytest.mark.parametrize("kind", OFFLOADS)
@pytest.mark.parametrize("family", FAMILIES)
def test_every_call_stays_sparse_under_offloading(family, kind, order, references):
    dense, sparse, per_call = references[family]
    assert per_call > 0 and not torch.allclose(dense, sparse)
    pipe = _patched(family, kind, order)
    state = get_state(pipe.transformer)
    for call in range(3):
        state.calls.clear()
        out = run(pipe, family)
        assert state.calls == {"sparse": per_call}, (call, dict(state.calls))
        torch.testing.assert_close(out, sparse)


def _offload_pre_forward_counter(monkeypatch):
    """Count accelerate CpuOffload pre_forward runs on transformers (the model-offload hook)."""
    seen = []
    original = accelerate.hooks.CpuOffload.pre_forward

    def pre_forward(self, module, *args, **kwargs):
        seen.append(type(module).__name__)
        return original(self, module, *args, **kwargs)

    monkeypatch.setattr(accelerate.hooks.CpuOffload, "pre_forward", pre_forward)
    return seen


@pytest.mark.parametrize("order", ["offload_first", "apply_first"])
@pytest.mark.parametrize("family", FAMILIES)
def test_remove_restores_model_offload_as_never_patched(family, order, references, monkeypatch):
    dense = references[family][0]
    seen = _offload_pre_forward_counter(monkeypatch)
    plain = tiny_pipeline(family)
    _offload(plain, "model")
    run(plain, family)
    seen.clear()
    torch.testing.assert_close(run(plain, family), dense)
    expected = list(seen)
    assert expected  # the transformer's offload hook runs once per pipeline call

    pipe = _patched(family, "model", order)
    original = {k: v for k, v in pipe.transformer.attn_processors.items()}
    run(pipe, family)  # accelerate re-installs its hooks after this call
    vs.remove(pipe)
    assert not is_applied(pipe)
    transformer = pipe.transformer
    for call in range(2):
        seen.clear()
        torch.testing.assert_close(run(pipe, family), dense)
        assert seen == expected, call
    assert isinstance(transformer._hf_hook, accelerate.hooks.CpuOffload)
    assert not transformer._forward_pre_hooks
    assert HookRegistry.check_if_exists_or_initialize(transformer).get_hook("vidsparse") is None
    assert transformer.attn_processors.keys() == original.keys()
    for path, proc in transformer.attn_processors.items():
        assert type(proc).__module__.startswith("diffusers"), path


@pytest.mark.parametrize("order", ["offload_first", "apply_first"])
def test_reapply_under_offload_does_not_double_hooks(order, references, monkeypatch):
    family = "wan"
    pipe = _patched(family, "model", order)
    run(pipe, family)
    vs.apply(pipe, _cfg())
    begins = []
    state = get_state(pipe.transformer)
    original = state.begin_call
    monkeypatch.setattr(state, "begin_call", lambda *a, **k: begins.append(1) or original(*a, **k))
    forwards = []
    handle = pipe.transformer.register_forward_hook(lambda *a: forwards.append(1))
    for _ in range(2):
        state.calls.clear()
        torch.testing.assert_close(run(pipe, family), references[family][1])
        assert state.calls["sparse"] == references[family][2]
    handle.remove()
    assert len(begins) == len(forwards) > 0
    # the bookkeeping pre-hook, plus (Wan: Family.kernel_order) the per-token timestep's permutation
    assert len(pipe.transformer._forward_pre_hooks) == 1 + int(family_of(pipe.transformer).kernel_order)
    assert len(pipe.transformer.blocks[0]._forward_pre_hooks) == int(family_of(pipe.transformer).kernel_order)


def test_sequential_cpu_offload_both_orders(references):
    family = "wan"
    plain = tiny_pipeline(family)
    _offload(plain, "sequential")
    try:
        run(plain, family)
    except TypeError as exc:  # accelerate's meta-device move on a CPU-only torch build
        pytest.skip(f"enable_sequential_cpu_offload does not run on this machine without vidsparse: {exc}")
    for order in ("offload_first", "apply_first"):
        pipe = _patched(family, "sequential", order)
        state = get_state(pipe.transformer)
        for _ in range(2):
            state.calls.clear()
            torch.testing.assert_close(run(pipe, family), references[family][1])
            assert state.calls == {"sparse": references[family][2]}


def test_processor_outside_a_forward_is_an_error():
    pipe = tiny_pipeline("wan")
    vs.apply(pipe, _cfg())
    run(pipe, "wan")  # the call ends with diffusers' reset: no layout is current any more
    attn = pipe.transformer.blocks[0].attn1
    with pytest.raises(RuntimeError, match="outside a transformer forward"):
        attn(torch.randn(1, 48, 16))


def test_no_layout_warns_on_every_pipeline_call():
    pipe = tiny_pipeline("wan")
    vs.apply(pipe, _cfg())
    state = get_state(pipe.transformer)
    state.family = dataclasses.replace(state.family, grid=lambda model, kwargs: None)
    for call in (1, 2, 3):
        state.calls.clear()
        with pytest.warns(UserWarning, match=f"could not read the token grid.*call {call}"):
            run(pipe, "wan")
        assert state.calls["sparse"] == 0 and state.calls["dense"] > 0
