"""diffusers features that compose with vidsparse on a tiny Wan pipeline: the caching hooks in both
orders, ``set_attention_backend`` (sparse layers stay on vidsparse), and ``remove`` leaving the
original processors exactly as they were (no attribute behind)."""

from __future__ import annotations

import pytest
import torch
from compose_pipelines import run, tiny_pipeline
from diffusers import (
    FasterCacheConfig,
    FirstBlockCacheConfig,
    MagCacheConfig,
    PyramidAttentionBroadcastConfig,
    TaylorSeerCacheConfig,
)

import vidsparse as vs
from vidsparse.pipelines import get_state

pytestmark = pytest.mark.filterwarnings("ignore:In CPU autocast:UserWarning")

STEPS = 4


def _cfg():
    return vs.SparseConfig("radial", backend="torch", dense_first_steps=0, dense_layers=())


def _cache(name: str, pipe):
    timestep = lambda: pipe.current_timestep  # noqa: E731
    if name == "first_block":
        return FirstBlockCacheConfig(threshold=0.05)
    if name == "pab":
        return PyramidAttentionBroadcastConfig(
            spatial_attention_block_skip_range=2,
            spatial_attention_timestep_skip_range=(-1, 1001),
            current_timestep_callback=timestep,
        )
    if name == "faster":
        return FasterCacheConfig(  # default ranges: steps 3-4 (t < 681) reuse attention
            spatial_attention_block_skip_range=2,
            current_timestep_callback=timestep,
            is_guidance_distilled=True,  # Wan calls cond and uncond separately (batch 1)
        )
    if name == "taylorseer":
        return TaylorSeerCacheConfig(cache_interval=2, disable_cache_before_step=1, taylor_factors_dtype=torch.float32)
    if name == "magcache":
        return MagCacheConfig(num_inference_steps=STEPS, mag_ratios=[1.0] * STEPS, threshold=0.5)
    raise ValueError(name)


CACHES = ("first_block", "pab", "faster", "taylorseer", "magcache")


@pytest.mark.parametrize("cache", CACHES)
def test_caching_hooks_in_both_orders(cache):
    outs, counts = {}, {}
    for order in ("cache_first", "apply_first"):
        pipe = tiny_pipeline("wan")
        if order == "cache_first":
            pipe.transformer.enable_cache(_cache(cache, pipe))
            vs.apply(pipe, _cfg())
        else:
            vs.apply(pipe, _cfg())
            pipe.transformer.enable_cache(_cache(cache, pipe))
        state = get_state(pipe.transformer)
        per_call = []
        for _ in range(2):
            state.calls.clear()
            outs[order] = run(pipe, "wan", steps=STEPS)
            per_call.append(state.calls["sparse"])
        assert per_call[0] > 0 and per_call[0] == per_call[1], per_call  # still sparse on the second call
        counts[order] = per_call[0]
        assert torch.isfinite(outs[order]).all()
        vs.remove(pipe)
        pipe.transformer.disable_cache()
    assert counts["cache_first"] == counts["apply_first"]
    torch.testing.assert_close(outs["cache_first"], outs["apply_first"])


def test_caches_under_a_dense_then_sparse_schedule_match_the_per_layer_path():
    """With a cache on, the forward keeps caller order (a cache compares or reuses hidden states
    across steps, and dense steps run in caller order): the same video as without kernel order."""
    for cache in CACHES:
        outs = []
        for kernel_order in (True, False):
            pipe = tiny_pipeline("wan")
            pipe.transformer.enable_cache(_cache(cache, pipe))
            vs.apply(pipe, vs.SparseConfig("radial", backend="torch", dense_first_steps=1, dense_layers=(0,)))
            get_state(pipe.transformer).kernel_order = kernel_order
            outs.append(run(pipe, "wan", steps=STEPS))
            vs.remove(pipe)
            pipe.transformer.disable_cache()
        torch.testing.assert_close(outs[0], outs[1], msg=cache)


def test_set_attention_backend_keeps_sparse_layers_on_vidsparse():
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    active = _AttentionBackendRegistry._active_backend  # set_attention_backend also sets the global one
    pipe = tiny_pipeline("wan")
    vs.apply(pipe, _cfg())
    state = get_state(pipe.transformer)
    before = run(pipe, "wan")
    sparse = state.calls["sparse"]
    originals = dict(state.original_processors)
    try:
        pipe.transformer.set_attention_backend("_native_math")
        for proc in originals.values():  # written through to the original processors (the dense path)
            assert getattr(proc._attention_backend, "value", proc._attention_backend) == "_native_math"
        state.calls.clear()
        after = run(pipe, "wan")
    finally:
        pipe.transformer.reset_attention_backend()
        _AttentionBackendRegistry.set_active_backend(active)  # leave no global state to later tests
    assert state.calls["sparse"] == sparse  # the sparse layers still run vidsparse's kernel
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)
    for proc in originals.values():
        assert proc._attention_backend is None  # reset_attention_backend reached them too


def test_remove_leaves_no_attribute_on_the_original_processors():
    pipe = tiny_pipeline("wan")
    procs = dict(pipe.transformer.attn_processors)
    before = {path: dict(vars(p)) for path, p in procs.items()}
    vs.apply(pipe, _cfg())
    run(pipe, "wan")
    vs.remove(pipe)
    after = pipe.transformer.attn_processors
    for path, proc in procs.items():
        assert after[path] is proc
        assert vars(proc) == before[path], path
    assert not pipe.transformer._forward_pre_hooks


def test_peft_lora_set_adapters_fuse_unfuse_on_a_patched_pipeline():
    from peft import LoraConfig

    pipe = tiny_pipeline("wan")
    vs.apply(pipe, _cfg())
    state = get_state(pipe.transformer)
    base = run(pipe, "wan")
    torch.manual_seed(3)
    lora = LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights=False)
    pipe.transformer.add_adapter(lora, adapter_name="a")
    state.calls.clear()
    with_lora = run(pipe, "wan")
    assert state.calls["sparse"] > 0 and not torch.allclose(with_lora, base)
    pipe.transformer.set_adapters(["a"], weights=[0.5])
    half = run(pipe, "wan")
    assert not torch.allclose(half, with_lora) and not torch.allclose(half, base)
    pipe.transformer.set_adapters(["a"], weights=[1.0])
    pipe.transformer.fuse_lora(lora_scale=1.0)
    torch.testing.assert_close(run(pipe, "wan"), with_lora, atol=1e-4, rtol=1e-4)
    pipe.transformer.unfuse_lora()
    torch.testing.assert_close(run(pipe, "wan"), with_lora, atol=1e-4, rtol=1e-4)
    pipe.transformer.disable_adapters()
    torch.testing.assert_close(run(pipe, "wan"), base, atol=1e-5, rtol=1e-5)
    assert state.calls["sparse"] > 0


def test_callbacks_seeds_and_half_precision_on_a_patched_pipeline():
    pipe = tiny_pipeline("wan")
    vs.apply(pipe, _cfg())
    state = get_state(pipe.transformer)
    seen = []

    def callback(p, step, timestep, kwargs):
        seen.append((step, state.calls["sparse"]))
        return kwargs

    from compose_pipelines import call_kwargs

    a = pipe(**call_kwargs("wan", steps=3, seed=5), callback_on_step_end=callback)[0]
    assert [s for s, _ in seen] == [0, 1, 2] and seen[0][1] > 0
    torch.testing.assert_close(run(pipe, "wan", steps=3, seed=5), a)  # same seed, same video
    assert not torch.allclose(run(pipe, "wan", steps=3, seed=6), a)
    pipe.to(torch.bfloat16)
    state.calls.clear()
    kw = call_kwargs("wan", steps=2)
    kw["prompt_embeds"] = kw["prompt_embeds"].bfloat16()
    kw["negative_prompt_embeds"] = kw["negative_prompt_embeds"].bfloat16()
    out = pipe(**kw)[0]
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all() and state.calls["sparse"] > 0
