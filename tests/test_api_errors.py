"""Bad calls at the functional API and pattern constructors: one clear error, before any work;
NaN inputs show in the outputs on every backend, as in torch SDPA."""

import pytest
import torch

import vidsparse as vs

LAYOUT = vs.VideoLayout(2, 4, 4)


def _qkv(d: int = 16, s: int = 32):
    return tuple(torch.randn(1, s, 2, d) for _ in range(3))


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(scale="0.5"), TypeError, "scale must be None .* or a positive float, got str"),
        (dict(scale=float("nan")), ValueError, "finite float > 0"),
        (dict(scale=-1.0), ValueError, "finite float > 0"),
        (dict(scale=True), TypeError, "scale must be"),
        (dict(block_size=0), ValueError, "power of two"),
        (dict(block_size=48), ValueError, "power of two"),
        (dict(layer="a"), TypeError, "layer must be an int"),
        (dict(layer=1.5), TypeError, "layer must be an int .* got float 1.5"),
        (dict(layer=-1), ValueError, "layer must be >= 0"),
    ],
)
@pytest.mark.parametrize("pattern", ["radial", "vmoba"])
def test_attention_bad_options(pattern, kwargs, exc, match):
    q, k, v = _qkv()
    with pytest.raises(exc, match=match):
        vs.attention(q, k, v, LAYOUT, pattern, backend="torch", **kwargs)


def test_attention_zero_head_dim_is_a_clear_error():
    q, k, v = _qkv(d=0)
    with pytest.raises(ValueError, match="every dimension >= 1, got D=0"):
        vs.attention(q, k, v, LAYOUT, "radial")


def test_text_mask_must_be_a_tensor():
    layout = vs.VideoLayout(2, 4, 4, text_len=2, text_position="after")
    q, k, v = _qkv(s=34)
    with pytest.raises(TypeError, match="text_mask must be a bool torch.Tensor .* got list"):
        vs.attention(q, k, v, layout, "radial", text_mask=[[True, True]])


def test_layout_rejects_bool_text_len():
    with pytest.raises(ValueError, match="text_len must be an int >= 0, got True"):
        vs.VideoLayout(2, 4, 4, text_len=True, text_position="after")


def test_sparse_config_rejects_unknown_pattern_options_at_construction():
    with pytest.raises(ValueError, match="'bogus', which is not an option of radial. Valid options: .*decay_factor"):
        vs.SparseConfig("radial", pattern_options={"bogus": 1})
    assert dict(vs.SparseConfig("radial", pattern_options={"decay_factor": 0.5}).pattern_options) == {
        "decay_factor": 0.5
    }


def test_gna_full_axis_with_dilation_is_the_whole_residue_class():
    """kernel_size=-1 with dilation d: every key of the query's residue class on that axis,
    also when the axis does not divide by d (classes of unequal size)."""
    pattern = vs.GNA(kernel_size=(-1, 1, 1), dilation=(2, 1, 1))
    for frames in (4, 5, 7):
        layout = vs.VideoLayout(frames, 2, 2)
        mask = vs.token_mask(pattern, layout, block_size=16)[0]
        f = torch.arange(layout.video_len) // 4
        hw = torch.arange(layout.video_len) % 4
        expected = (f[:, None] % 2 == f[None, :] % 2) & (hw[:, None] == hw[None, :])
        assert torch.equal(mask, expected), frames


def test_gna_too_large_explicit_kernel_still_refused():
    with pytest.raises(ValueError, match="exceeds the 5 tokens of axis t"):
        vs.token_mask(vs.GNA(kernel_size=(3, 1, 1), dilation=(2, 1, 1)), vs.VideoLayout(5, 2, 2))


@pytest.mark.parametrize("backend", ["torch", "flex", "triton"])
@pytest.mark.parametrize("where", ["q", "k", "v"])
def test_nan_input_shows_in_the_rows_that_attend_it(backend, where):
    """Dense: NaN rows exactly as torch SDPA. Sparse (tile): the rows that attend the NaN token
    are NaN, every other row is finite and unchanged."""
    q, k, v = _qkv()
    t = {"q": q, "k": k, "v": v}[where]
    t[0, 5, 0, 3] = float("nan")
    sdpa = torch.nn.functional.scaled_dot_product_attention(*(x.transpose(1, 2) for x in (q, k, v))).transpose(1, 2)
    dense = vs.attention(q, k, v, LAYOUT, "dense", backend=backend)
    assert torch.equal(dense.isnan().any(-1), sdpa.isnan().any(-1))
    pattern = vs.Tile(tile=(1, 2, 2), window=(1, 1, 1))
    out = vs.attention(q, k, v, LAYOUT, pattern, backend=backend)
    sees = vs.token_mask(pattern, LAYOUT)[0][:, 5]  # rows whose window holds token 5
    nan_rows = out[0, :, 0].isnan().any(-1)
    if where == "q":
        assert torch.equal(nan_rows, torch.arange(32) == 5)
    elif where == "k":
        assert torch.equal(nan_rows, sees)
    else:  # a masked value still meets 0 * NaN inside a computed block, as in SDPA with a mask
        assert nan_rows[sees].all()
    assert torch.isfinite(out[0, :, 1]).all()  # the other head has no NaN


@pytest.mark.parametrize("block_size", [48, 16.0, 0])
def test_a_bad_call_block_size_is_named_as_the_calls_not_the_patterns(block_size):
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=r"^block_size must be a power of two \(e.g. 64 or 128\), got"):
        vs.attention(q, k, v, LAYOUT, "radial", backend="torch", block_size=block_size)


def test_radial_by_name_runs_at_a_kernel_block_below_its_own_smallest():
    q, k, v = _qkv()  # Radial's block is at least 16; the torch backend plans block 8
    out = vs.attention(q, k, v, LAYOUT, "radial", backend="torch", block_size=8)
    assert torch.allclose(out, _masked_sdpa(q, k, v, vs.token_mask("radial", LAYOUT, block_size=8)), atol=1e-5)


def _masked_sdpa(q, k, v, mask):
    """SDPA restricted to a bool [heads or 1, S, S] mask, in [B, S, H, D]."""
    out = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask
    )
    return out.transpose(1, 2)


@pytest.mark.parametrize("pattern", ["radial", vs.VMoBA(granularity="tile"), "tile"])
def test_token_mask_of_a_name_is_the_mask_attention_runs(pattern):
    # attention's default block is the backend's (128); token_mask's default used to be 16, and a
    # name's fitted defaults (Radial's block, VMoBA's tiles) follow the block.
    layout = vs.VideoLayout(8, 5, 7)
    q, k, v = (torch.randn(1, layout.seq_len, 2, 16) for _ in range(3))
    out = vs.attention(q, k, v, layout, pattern, backend="torch")
    assert torch.allclose(out, _masked_sdpa(q, k, v, vs.token_mask(pattern, layout, q=q, k=k)), atol=1e-5)


def test_kernel_order_input_prepared_with_plan_of_the_same_name():
    layout = vs.VideoLayout(8, 5, 7)
    q, k, v = (torch.randn(1, layout.seq_len, 2, 16) for _ in range(3))
    order = vs.plan("radial", layout, num_heads=2).order
    out = vs.attention(*(order.to_kernel(t) for t in (q, k, v)), layout, "radial", backend="torch", kernel_order=True)
    expected = vs.attention(q, k, v, layout, "radial", backend="torch")
    assert torch.allclose(order.to_caller(out), expected, atol=1e-6)


@pytest.mark.parametrize(
    "cast,exc,match",
    [
        (lambda q, k, v: (q, k.half(), v), TypeError, "must share a dtype"),
        (lambda q, k, v: (q.long(), k.long(), v.long()), TypeError, "must be a floating tensor"),
        (lambda q, k, v: (q, k, v[:, :-1]), ValueError, "same shape"),
    ],
)
def test_kernel_order_inputs_are_checked_like_caller_order_ones(cast, exc, match):
    pattern = vs.Radial(block_size=16)
    order = vs.plan(pattern, LAYOUT, num_heads=2).order
    q, k, v = (order.to_kernel(t) for t in _qkv())
    for backend in ("torch", "flex"):
        with pytest.raises(exc, match=match):
            vs.attention(*cast(q, k, v), LAYOUT, pattern, backend=backend, kernel_order=True)


def test_numpy_scalars_work_as_scale_and_layer_and_a_float_head_count_is_refused():
    import numpy as np

    q, k, v = _qkv()
    as_numpy = vs.attention(q, k, v, LAYOUT, "vmoba", backend="torch", scale=np.float32(0.25), layer=np.int64(1))
    assert torch.equal(as_numpy, vs.attention(q, k, v, LAYOUT, "vmoba", backend="torch", scale=0.25, layer=1))
    for heads in (2.5, 2.0):
        with pytest.raises(ValueError, match="num_heads must be an int >= 1"):
            vs.plan("radial", LAYOUT, num_heads=heads)
