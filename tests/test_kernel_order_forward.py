"""A transformer forward permuted once into the plans' kernel order (vidsparse.pipelines.kernel_order)
gives the same output and gradients as the per-layer gather path, and stays off where it cannot apply."""

import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported anywhere below

import pytest  # noqa: E402
import torch  # noqa: E402

import vidsparse as vs  # noqa: E402
from vidsparse.families import families  # noqa: E402
from vidsparse.models import tiny_inputs, tiny_transformer  # noqa: E402
from vidsparse.pipelines.apply import get_state  # noqa: E402
from vidsparse.plan import KernelOrder  # noqa: E402

attention_module = sys.modules["vidsparse.attention"]  # the module (vs.attention is the function)
TILE = ("tile", dict(tile=(1, 2, 3), window=(3, 1, 3)))
RADIAL = ("radial", dict(decay_factor=0.5, block_size=16, sink=True))  # layer 0 stays dense on Wan


def _config(pattern, options, backend="torch", **kw):
    return vs.SparseConfig(pattern, dense_first_steps=0, backend=backend, block_size=16, pattern_options=options, **kw)


def _run(model, inputs, config, kernel_order: bool, grad: bool = False):
    """(output, parameter grads or None, the forward's CallInfo, per-layer gathers) of one forward."""
    vs.apply(model, config)
    state = get_state(model)
    state.kernel_order = kernel_order
    gathers = []
    original = attention_module.run_permuted

    def spy(*args, **kwargs):
        gathers.append(1)
        return original(*args, **kwargs)

    attention_module.run_permuted = spy
    try:
        model.zero_grad(set_to_none=True)
        with torch.set_grad_enabled(grad):
            out = model(**inputs).sample
            if grad:
                (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    finally:
        attention_module.run_permuted = original
        info = state.current
        vs.remove(model)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None} if grad else None
    return out.detach(), grads, info, len(gathers)


def test_only_families_whose_blocks_are_per_token_run_in_kernel_order():
    """The record flag is the one home of the fact; Wan, SkyReels-V2, LTX-Video and Cosmos are the
    families it holds for."""
    assert sorted(f.name for f in families() if f.kernel_order) == ["cosmos", "ltx", "skyreels-v2", "wan"]


@pytest.mark.parametrize("variant", ["wan", "wan-i2v", "wan22-5b"])  # I2V: image context; TI2V-5B: per-token timestep
@pytest.mark.parametrize("spec", [TILE, RADIAL], ids=["tile", "radial-dense-layer0"])
def test_wan_forward_in_kernel_order_equals_per_layer_gather(variant, spec):
    model = tiny_transformer(variant)
    inputs = tiny_inputs(variant, model, 3, 6, 8, batch=2)  # 3x3x4 = 36 tokens
    ref, _, info0, gathers0 = _run(model, inputs, _config(*spec), kernel_order=False)
    out, _, info, gathers = _run(model, inputs, _config(*spec), kernel_order=True)
    assert info0.order is None and gathers0 == sum(p is not None for p in info0.patterns)
    assert isinstance(info.order, KernelOrder) and not info.order.identity
    assert info.order.padded_len > 36 and info.order.padded_len % 16 == 0  # padding rows ran through the blocks
    assert gathers == 0  # no layer gathered its own q/k/v
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_wan_kernel_order_gradients_equal_per_layer_gather():
    model = tiny_transformer("wan")
    inputs = tiny_inputs("wan", model, 3, 6, 8, batch=1)
    ref, gref, _, _ = _run(model, inputs, _config(*RADIAL), kernel_order=False, grad=True)
    out, g, info, _ = _run(model, inputs, _config(*RADIAL), kernel_order=True, grad=True)
    assert info.order is not None
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert gref.keys() == g.keys() and len(g) > 10
    for name in g:
        torch.testing.assert_close(g[name], gref[name], atol=1e-5, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")


def _ltx_per_token_timestep(inputs):
    inputs["timestep"] = torch.rand(2, 144) * 1000  # the image-to-video pipelines' [B, S] timestep


# (variant, transformer overrides, input change, tokens): LTX-Video's RoPE tables [B, S, D] cut
# where ``rope`` makes them and its per-token timestep cut at the transformer's input; Cosmos'
# RoPE [S, D] (tokens along dim 0), its per-frame timestep embeddings [B, S, C] and Cosmos 1.0's
# learnable position embedding cut at every block's input ("transformer_blocks.*").
PER_TOKEN_FAMILIES = [
    ("ltx", {}, None, 144),
    ("ltx", {}, _ltx_per_token_timestep, 144),
    ("cosmos", {}, None, 36),
    ("cosmos", {"extra_pos_embed_type": "learnable"}, None, 36),
    ("skyreels-v2", {}, None, 36),
    ("skyreels-v2-i2v", {}, None, 36),
]


@pytest.mark.parametrize(
    "variant,overrides,change,tokens",
    PER_TOKEN_FAMILIES,
    ids=["ltx", "ltx-per-token-t", "cosmos", "cosmos1-pos-emb", "skyreels", "skyreels-i2v"],
)
def test_family_forward_and_gradients_in_kernel_order_equal_per_layer_gather(variant, overrides, change, tokens):
    """Layer 0 dense (the model's own attention, on caller-order tokens and RoPE), layer 1 sparse."""
    model = tiny_transformer(variant, **overrides)
    inputs = tiny_inputs(variant, model, 3, 6, 8, batch=2)
    if change is not None:
        change(inputs)
    config = _config(*TILE, dense_layers=(0,))
    ref, gref, _, gathers0 = _run(model, inputs, config, kernel_order=False, grad=True)
    out, g, info, gathers = _run(model, inputs, config, kernel_order=True, grad=True)
    assert isinstance(info.order, KernelOrder) and not info.order.identity and info.order.padded_len > tokens
    assert info.patterns[0] is None and gathers0 == 1 and gathers == 0
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert gref.keys() == g.keys() and len(g) > 10
    for name in g:
        torch.testing.assert_close(g[name], gref[name], atol=1e-4, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.slow  # ~15 s each in the interpreter on a shared 2-core machine
@pytest.mark.parametrize("variant,overrides", [("wan", {}), ("ltx", {"cross_attention_dim": 32})], ids=["wan", "ltx"])
def test_kernel_order_on_triton_reads_contiguous_tiles(monkeypatch, variant, overrides):
    """With the Triton backend every sparse layer runs the kernel-order path (TMA descriptors,
    no row gather), and the forward equals the caller-order fused-gather path."""
    from vidsparse.kernels import triton_kernels as tk

    model = tiny_transformer(variant, attention_head_dim=16, **overrides)  # the kernels take head dims 16..256
    inputs = tiny_inputs(variant, model, 3, 6, 8, batch=1)
    seen = []
    launch = tk._launch

    def spy(kernel, *args, **kwargs):
        if kernel is tk._fwd_kernel:
            seen.append((args[5]["GATHER"], args[5]["USE_TMA"]))
        return launch(kernel, *args, **kwargs)

    monkeypatch.setattr(tk, "_launch", spy)
    ref, _, _, _ = _run(model, inputs, _config(*TILE, backend="triton"), kernel_order=False)
    assert seen == [(True, False)] * 2
    seen.clear()
    out, _, info, _ = _run(model, inputs, _config(*TILE, backend="triton"), kernel_order=True)
    assert info.order is not None and seen == [(False, True)] * 2
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "config",
    [
        _config("vmoba", dict(temporal_chunk=2, spatial_chunk=(2, 2), st_chunk=(1, 2, 2))),  # dynamic plan
        _config(*TILE, layer_patterns={1: vs.make_pattern("radial", decay_factor=0.5, block_size=16)}),  # 2 orders
        vs.SparseConfig(TILE[0], dense_first_steps=1, backend="torch", block_size=16, pattern_options=TILE[1]),
    ],
    ids=["dynamic", "two-orders", "dense-step"],
)
def test_kernel_order_stays_off_where_layers_cannot_share_it(config):
    model = tiny_transformer("wan")
    inputs = tiny_inputs("wan", model, 3, 6, 8, batch=1)
    ref, _, _, _ = _run(model, inputs, config, kernel_order=False)
    out, _, info, _ = _run(model, inputs, config, kernel_order=True)
    assert info.order is None
    torch.testing.assert_close(out, ref, atol=0, rtol=0)


def test_a_forward_the_shard_plan_refuses_keeps_caller_order():
    """SkyReels-V2 diffusion forcing ([B, F] timesteps, per-token modulation built inside the
    forward: ``ShardPlan.refuse_call``) runs the per-layer path, the same as without kernel order."""
    model = tiny_transformer("skyreels-v2-df")
    inputs = tiny_inputs("skyreels-v2-df", model, 3, 6, 8, batch=1)
    assert inputs["enable_diffusion_forcing"]
    ref, _, _, _ = _run(model, inputs, _config(*TILE), kernel_order=False)
    out, _, info, gathers = _run(model, inputs, _config(*TILE), kernel_order=True)
    assert info.order is None and gathers == 2
    torch.testing.assert_close(out, ref, atol=0, rtol=0)


def test_other_families_keep_the_per_layer_path():
    model = tiny_transformer("hunyuan")
    inputs = tiny_inputs("hunyuan", model, 3, 6, 8, batch=1)
    _, _, info, gathers = _run(model, inputs, _config(*TILE), kernel_order=True)
    assert info.order is None and gathers > 0


def test_remove_takes_the_permutation_hooks_away():
    model = tiny_transformer("wan")
    inputs = tiny_inputs("wan", model, 3, 6, 8, batch=1)
    with torch.no_grad():
        before = model(**inputs).sample
    _run(model, inputs, _config(*TILE), kernel_order=True)
    assert (
        not model.blocks[0]._forward_pre_hooks and not model.rope._forward_hooks and not model.proj_out._forward_hooks
    )
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).sample, before, atol=0, rtol=0)
