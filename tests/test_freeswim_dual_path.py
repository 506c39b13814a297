"""FreeSwim's dual path on a tiny Wan transformer: the override, the cache schedule and memory,
an independent re-computation of the window branch, exact removal and bad inputs."""

import pytest
import torch

import vidsparse as vs
from vidsparse.freeswim import DualPathConfig, apply_dual_path, get_dual_state, remove_dual_path, reset_dual_path
from vidsparse.models.tiny import build_tiny_pipeline, run_tiny_pipeline, tiny_inputs, tiny_transformer
from vidsparse.pipelines import get_state

GRID = dict(frames=3, height=8, width=12)  # latent 3x8x12 -> tokens 3x4x6
BASE = (2, 2)  # window 3x3 of a 4x6 token grid: really sparse


def _model():
    t = tiny_transformer("wan", num_layers=3)
    return t, tiny_inputs("wan", t, **GRID)


def _forward(t, inputs, timestep=None):
    kw = dict(inputs)
    if timestep is not None:
        kw["timestep"] = torch.full_like(inputs["timestep"], float(timestep))
    with torch.no_grad():
        return t(**kw, return_dict=False)[0]


def _cfg(**kw):
    kw.setdefault("base_grid", BASE)
    kw.setdefault("backend", "torch")
    return DualPathConfig(**kw)


class _Attn2Spy:
    """Records each attn2's input and output per forward (module hooks, not the processors)."""

    def __init__(self, t):
        self.records = []
        self.handles = [b.attn2.register_forward_hook(self._hook(i), with_kwargs=True) for i, b in enumerate(t.blocks)]

    def _hook(self, layer):
        def hook(module, args, kwargs, output):
            hs = args[0] if args else kwargs["hidden_states"]
            ehs = args[1] if len(args) > 1 else kwargs["encoder_hidden_states"]
            self.records.append((layer, module, hs.detach(), ehs.detach(), output.detach()))

        return hook

    def close(self):
        for h in self.handles:
            h.remove()


def test_override_replaces_the_window_rows_cross_attention_output():
    t, inputs = _model()
    state = apply_dual_path(t, _cfg(cache_interval=1))[0]
    spy = _Attn2Spy(t)
    _forward(t, inputs)
    spy.close()
    assert [r[0] for r in spy.records] == [0, 1, 2]
    for layer, module, hs, ehs, out in spy.records:
        assert hs.shape[0] == 2  # window row + full row, in lockstep
        original = state.original_processors[f"blocks.{layer}.attn2"]
        with torch.no_grad():
            own_full = original(module, hs[1:], ehs[1:])
            own_window = original(module, hs[:1], ehs[:1])
        torch.testing.assert_close(out[1:], own_full, atol=1e-6, rtol=1e-6)  # full row: its own cross-attn
        assert torch.equal(out[:1], out[1:])  # window row: the full row's output, exactly
        assert (own_window - out[:1]).abs().max() > 1e-3  # ... which is not what it would compute itself
    assert state.calls["cross-full"] == 3 and state.calls.get("cross-own", 0) == 0


def test_dual_forward_equals_an_independent_window_model_with_replaced_cross_attention():
    """Full branch = the unpatched dense model; window branch = vidsparse.apply(FreeSwim) with
    every attn2 output swapped for the dense model's. The dual path must give that output."""
    t, inputs = _model()
    spy = _Attn2Spy(t)
    _forward(t, inputs)  # dense model: its attn2 outputs
    spy.close()
    dense_cross = {layer: out for layer, _, _, _, out in spy.records}
    vs.apply(t, vs.SparseConfig(vs.FreeSwim(base_grid=BASE), dense_first_steps=0, backend="torch"))
    get_state(t).kernel_order = False  # the attn2 hooks below return the dense model's caller-order rows
    handles = [b.attn2.register_forward_hook(lambda m, a, o, i=i: dense_cross[i]) for i, b in enumerate(t.blocks)]
    expected = _forward(t, inputs)
    for h in handles:
        h.remove()
    vs.remove(t)
    apply_dual_path(t, _cfg(cache_interval=1, attention_scale="default"))
    got = _forward(t, inputs)
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-5)
    unpatched = (remove_dual_path(t), _forward(t, inputs))[1]
    assert (got - unpatched).abs().max() > 1e-3  # the window branch really is not the dense model


def _run_steps(t, inputs, n, uncond=True):
    """n denoising steps as a pipeline calls them (cond, then uncond, at each timestep)."""
    outs = []
    for i in range(n):
        ts = 900.0 - 100.0 * i
        outs.append(_forward(t, inputs, ts))
        if uncond:
            _forward(t, inputs, ts)
    return outs


def test_cache_runs_the_full_branch_on_the_expected_steps():
    t, inputs = _model()
    state = apply_dual_path(t, _cfg(cache_interval=2))[0]
    _run_steps(t, inputs, 5)
    report = state.report()
    assert report.full_branch_steps("cond") == [0, 2, 4] and list(report.refreshes) == [0, 2, 4]
    assert [s for s, b in report.reuse] == [1, 3] and {b for _, b in report.reuse} == {"cond"}
    assert [s for s, b in report.window] == [0, 1, 2, 3, 4] and {b for _, b in report.window} == {"uncond"}
    assert state.calls["full"] == 3 * 3  # 3 blocks x 3 refresh forwards
    assert state.calls["cross-cached"] == 3 * 2 and state.calls["cross-own"] == 3 * 5
    assert report.cache.peak_bytes == 3 * 1 * (3 * 4 * 6) * 16 * 4  # blocks x batch x tokens x dim x fp32

    state.clear_log()
    reset_dual_path(t)
    apply_dual_path(t, _cfg(cache_interval=3))
    state = get_dual_state(t)
    _run_steps(t, inputs, 4, uncond=False)
    assert state.report().full_branch_steps("cond") == [0, 3]

    apply_dual_path(t, _cfg(cache_interval=1))  # the reference's nocache: both passes, every step
    state = get_dual_state(t)
    _run_steps(t, inputs, 2)
    report = state.report()
    assert report.full_branch_steps("cond") == [0, 1] and report.full_branch_steps("uncond") == [0, 1]
    assert not report.reuse and not report.window and report.cache.peak_bytes == 0


def test_reuse_step_feeds_the_stored_outputs():
    t, inputs = _model()
    state = apply_dual_path(t, _cfg(cache_interval=2))[0]
    spy = _Attn2Spy(t)
    _forward(t, inputs, 900.0)  # refresh: stores the full rows' outputs
    stored = {layer: state.cache.get(layer, torch.device("cpu"), torch.float32) for layer in range(3)}
    _forward(t, inputs, 800.0)  # reuse
    spy.close()
    for layer, module, hs, _, out in spy.records[3:]:
        assert hs.shape[0] == 1  # window branch alone
        with torch.no_grad():
            expected = module.to_out[1](module.to_out[0](stored[layer].flatten(2, 3)))
        assert torch.equal(out, expected)


def test_cache_budget_offloads_and_recompute_stores_nothing():
    t, inputs = _model()
    per_block = 1 * (3 * 4 * 6) * 16 * 4
    state = apply_dual_path(t, _cfg(cache_interval=2))[0]
    ref = _run_steps(t, inputs, 4)
    assert state.report().cache.blocks_offloaded == 0

    apply_dual_path(t, _cfg(cache_interval=2, cache_budget_bytes=per_block))
    state = get_dual_state(t)
    got = _run_steps(t, inputs, 4)
    report = state.report().cache
    assert (report.blocks_on_device, report.blocks_offloaded) == (1, 2)
    assert (report.bytes_on_device, report.bytes_offloaded) == (per_block, 2 * per_block)
    for a, b in zip(got, ref):
        assert torch.equal(a, b)  # offloading changes where, not what
    assert "offloaded" in report.describe()

    apply_dual_path(t, _cfg(cache_interval=2, cache_budget_bytes=per_block, cache_overflow="recompute"))
    state = get_dual_state(t)
    _run_steps(t, inputs, 4)
    report = state.report()
    assert report.cache.recompute and report.cache.total_bytes == 0
    assert report.full_branch_steps("cond") == [0, 1, 2, 3] and not report.reuse
    assert "recomputed" in report.cache.describe()


def test_softmax_scale_option():
    t, inputs = _model()
    apply_dual_path(t, _cfg(cache_interval=1))
    on = _forward(t, inputs)
    apply_dual_path(t, _cfg(cache_interval=1, attention_scale="default"))
    off = _forward(t, inputs)
    apply_dual_path(t, _cfg(cache_interval=1, attention_scale=_cfg().scale_factor()))
    explicit = _forward(t, inputs)
    assert (on - off).abs().max() > 1e-5 and torch.equal(on, explicit)
    assert _cfg().softmax_scale(64) == pytest.approx(_cfg().scale_factor() / 8)
    assert _cfg(attention_scale="default").softmax_scale(64) is None


def test_remove_is_exact_and_pipelines_reset_the_state():
    pipe = build_tiny_pipeline()
    t = pipe.transformer
    originals = {name: proc for name, proc in t.attn_processors.items()}
    ref = run_tiny_pipeline(pipe, num_inference_steps=3)
    apply_dual_path(pipe, _cfg(cache_interval=2, base_grid=(1, 1)))
    assert all(type(p).__name__.startswith("Dual") for p in t.attn_processors.values())
    patched = run_tiny_pipeline(pipe, num_inference_steps=3)
    state = get_dual_state(t)
    report = state.report()  # WanPipeline names its passes with cache_context
    assert report.full_branch_steps("cond") == [0, 2] and [s for s, _ in report.reuse] == [1]
    assert state.current is None  # reset by the pipeline (maybe_free_model_hooks)
    remove_dual_path(pipe)
    assert all(t.attn_processors[name] is proc for name, proc in originals.items())
    assert get_dual_state(t) is None
    assert torch.equal(run_tiny_pipeline(pipe, num_inference_steps=3), ref)
    assert (patched - ref).abs().max() > 1e-4


def test_bad_inputs():
    with pytest.raises(ValueError, match="cache_interval must be an int >= 1"):
        DualPathConfig(base_grid=BASE, cache_interval=0)
    with pytest.raises(ValueError, match="override_uncond=True needs cache_interval=1"):
        DualPathConfig(base_grid=BASE, override_uncond=True)
    with pytest.raises(ValueError, match="attention_scale"):
        DualPathConfig(base_grid=BASE, attention_scale="log")
    with pytest.raises(ValueError, match="cache_overflow"):
        DualPathConfig(base_grid=BASE, cache_overflow="disk")
    with pytest.raises(TypeError, match="pair"):
        DualPathConfig(base_grid=30)
    hunyuan = tiny_transformer("hunyuan")
    with pytest.raises(ValueError, match="attends text jointly inside self-attention"):
        apply_dual_path(hunyuan, _cfg())
    t, _ = _model()
    vs.apply(t, "dense")
    with pytest.raises(ValueError, match="Remove the other patch first"):
        apply_dual_path(t, _cfg())
    assert get_dual_state(t) is None
    with pytest.raises(TypeError, match="DualPathConfig"):
        apply_dual_path(t, {"base_grid": BASE})


def test_fused_projections_give_the_same_dual_path():
    t, inputs = _model()
    apply_dual_path(t, _cfg(cache_interval=1))
    ref = _forward(t, inputs)
    remove_dual_path(t)
    t.fuse_qkv_projections()  # attn1: to_qkv, attn2: to_kv
    assert t.blocks[0].attn2.fused_projections
    apply_dual_path(t, _cfg(cache_interval=1))
    torch.testing.assert_close(_forward(t, inputs), ref, atol=2e-5, rtol=1e-5)


def test_i2v_image_cross_attention_stays_per_row():
    """Wan I2V: only the text part is overridden (as the reference); the image part is per row."""
    t = tiny_transformer("wan-i2v", num_layers=2)
    inputs = tiny_inputs("wan-i2v", t, **GRID)
    state = apply_dual_path(t, _cfg(cache_interval=2))[0]
    spy = _Attn2Spy(t)
    _forward(t, inputs, 900.0)
    spy.close()
    for layer, module, hs, ehs, out in spy.records:
        original = state.original_processors[f"blocks.{layer}.attn2"]
        with torch.no_grad():
            torch.testing.assert_close(out[1:], original(module, hs[1:], ehs[1:]), atol=1e-6, rtol=1e-6)
            # window row = to_out(text of the full row + image attention of the window row)
            q = module.norm_q(module.to_q(hs)).unflatten(2, (module.heads, -1))
            img_k = module.norm_added_k(module.add_k_proj(ehs[:, :4])).unflatten(2, (module.heads, -1))
            img_v = module.add_v_proj(ehs[:, :4]).unflatten(2, (module.heads, -1))
            img = (
                torch.nn.functional.scaled_dot_product_attention(*(x.transpose(1, 2) for x in (q, img_k, img_v)))
                .transpose(1, 2)
                .flatten(2, 3)
            )
            delta = module.to_out[0].weight @ (img[0] - img[1]).T
        torch.testing.assert_close(out[0] - out[1], delta.T, atol=1e-5, rtol=1e-5)
    _forward(t, inputs, 800.0)  # a reuse step runs with the image part too
    assert state.report().reuse == ((1, "cond"),)


def test_window_covering_the_grid_equals_the_dense_model():
    """Target grid within the base window: both branches are full attention, so with the model's
    own scale the dual path is the unpatched model."""
    t, inputs = _model()
    ref = _forward(t, inputs)
    apply_dual_path(t, _cfg(base_grid=(4, 6), cache_interval=1, attention_scale="default"))
    torch.testing.assert_close(_forward(t, inputs), ref, atol=2e-5, rtol=1e-5)


def test_window_branch_block_follows_the_small_frame_rule(monkeypatch):
    """24 tokens a frame: the window runs at auto_block_size's 32 (as vidsparse.apply would), not the
    backend's 128 (a block of 3 frames, mostly padding); --block-size wins; same output either way."""
    import vidsparse.freeswim.dual_path as dp

    seen = []
    inner = dp.sparse_attention

    def spy(*args, block_size=None, **kwargs):
        seen.append(block_size)
        return inner(*args, block_size=block_size, **kwargs)

    monkeypatch.setattr(dp, "sparse_attention", spy)
    t, inputs = _model()  # tokens 3x4x6
    state = apply_dual_path(t, _cfg(cache_interval=1))[0]
    auto = _forward(t, inputs)
    assert set(seen) == {32} and (state.report().window_backend, state.report().window_block) == ("torch", 32)
    seen.clear()
    state = apply_dual_path(t, _cfg(cache_interval=1, block_size=128))[0]
    torch.testing.assert_close(_forward(t, inputs), auto, atol=2e-5, rtol=1e-5)
    assert set(seen) == {128} and state.report().window_block == 128
