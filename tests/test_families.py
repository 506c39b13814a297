"""Per-family processors on tiny random-init transformers: dense equivalence, the discovered
layout, token locality under local patterns, and every registered sparse pattern."""

import pytest
import torch
from family_checks import SPARSE_OPTIONS, SameFrame, SamePixel, config

import vidsparse as vs
from vidsparse.models import tiny_inputs, tiny_transformer
from vidsparse.pipelines import get_state

pytestmark = pytest.mark.filterwarnings("ignore:In CPU autocast:UserWarning")

# family -> (latent frames, height, width) giving a 4x4x4 token grid after patchify.
GRID_INPUT = {
    "wan": (4, 8, 8),
    "wan-i2v": (4, 8, 8),
    "hunyuan": (4, 8, 8),
    "hunyuan-i2v": (4, 8, 8),
    "cogvideox": (4, 8, 8),
    "cogvideox-1.5": (8, 8, 8),
    "ltx": (4, 4, 4),
    "mochi": (4, 8, 8),
}
TEXT = {
    "wan": (0, "none"),
    "wan-i2v": (0, "none"),
    "ltx": (0, "none"),
    "cogvideox": (8, "before"),
    "cogvideox-1.5": (8, "before"),
    "hunyuan": (8, "after"),
    "hunyuan-i2v": (8, "after"),
    "mochi": (8, "after"),
}
FAMILIES = list(GRID_INPUT)
MAIN_FAMILIES = ["wan", "hunyuan", "cogvideox", "ltx", "mochi"]

# Options making each known pattern sparse on a 4x4x4 grid (tests of patterns not listed use defaults).


def _run(model, inputs):
    with torch.no_grad():
        return model(**inputs, return_dict=False)[0]


def _setup(family, batch=2, **overrides):
    model = tiny_transformer(family, **overrides)
    inputs = tiny_inputs(family, model, *GRID_INPUT[family], batch=batch)
    return model, inputs


_SHARED: dict = {}


@pytest.fixture
def shared():
    """(model, inputs, unpatched output) per family, built once per module; unpatched after use."""

    def get(family):
        if family not in _SHARED:
            model, inputs = _setup(family)
            _SHARED[family] = (model, inputs, _run(model, inputs))
        return _SHARED[family]

    yield get
    for model, _, _ in _SHARED.values():
        vs.remove(model)


@pytest.mark.parametrize("family", FAMILIES)
def test_dense_pattern_equals_unpatched_and_remove_is_exact(family):
    model, inputs = _setup(family)
    originals = {n: m.processor for n, m in model.named_modules() if hasattr(m, "processor")}
    ref = _run(model, inputs)
    vs.apply(model, config(vs.Dense()))
    out = _run(model, inputs)
    state = get_state(model)
    assert state.calls["sparse"] == state.num_layers and state.calls["dense"] == 0
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-5)
    vs.remove(model)
    assert {n: m.processor for n, m in model.named_modules() if hasattr(m, "processor")} == originals
    assert all(originals[n] is m.processor for n, m in model.named_modules() if hasattr(m, "processor"))
    assert torch.equal(_run(model, inputs), ref)


@pytest.mark.parametrize("family", FAMILIES)
def test_discovered_layout(family):
    model, inputs = _setup(family, batch=1)
    vs.apply(model, config("dense"))
    state = get_state(model)
    seen = []
    attention = state.attention_fn

    def spy(q, k, v, layout, pattern, **kw):
        seen.append((layout, kw["layer"], kw["text_mask"] is not None, q.shape))
        return attention(q, k, v, layout, pattern, **kw)

    state.attention_fn = spy
    _run(model, inputs)
    text_len, position = TEXT[family]
    assert [s[1] for s in seen] == list(range(state.num_layers))
    for layout, _, has_mask, shape in seen:
        assert layout == vs.VideoLayout(4, 4, 4, text_len=text_len, text_position=position)
        assert shape[1] == layout.seq_len and shape[2] == 2
        assert has_mask == (family in ("hunyuan", "hunyuan-i2v", "mochi"))


def _perturb(family, inputs, frame=None, pixel=None):
    x = inputs["hidden_states"].clone()
    if family == "ltx":  # packed (B, F*H*W, C), patch 1
        v = x.view(x.shape[0], 4, 4, 4, -1)
        if frame is not None:
            v[:, frame] += 1.0
        else:
            v[:, :, pixel[0], pixel[1]] += 1.0
    elif family.startswith("cogvideox"):  # (B, F, C, H, W)
        p_t = 2 if family.endswith("1.5") else 1
        if frame is not None:
            x[:, frame * p_t : (frame + 1) * p_t] += 1.0
        else:
            x[:, :, :, 2 * pixel[0] : 2 * pixel[0] + 2, 2 * pixel[1] : 2 * pixel[1] + 2] += 1.0
    else:  # (B, C, F, H, W), spatial patch 2
        if frame is not None:
            x[:, :, frame] += 1.0
        else:
            x[:, :, :, 2 * pixel[0] : 2 * pixel[0] + 2, 2 * pixel[1] : 2 * pixel[1] + 2] += 1.0
    return {**inputs, "hidden_states": x}


def _token_grid(family, out):
    """Output -> [B, F, H, W, C] on the token grid (patch pixels folded into C)."""
    if family == "ltx":
        return out.view(out.shape[0], 4, 4, 4, -1)
    if family.startswith("cogvideox"):  # (B, F, C, H, W)
        b, f, c, h, w = out.shape
        p_t = 2 if family.endswith("1.5") else 1
        out = out.reshape(b, f // p_t, p_t * c, h, w).permute(0, 2, 1, 3, 4)
    b, c, f, h, w = out.shape
    return out.reshape(b, c, f, h // 2, 2, w // 2, 2).permute(0, 2, 3, 5, 1, 4, 6).reshape(b, f, h // 2, w // 2, -1)


@pytest.mark.parametrize("family", MAIN_FAMILIES + ["cogvideox-1.5"])
def test_local_patterns_keep_tokens_local(family):
    """With one self-attention layer under a same-frame (same-pixel) pattern, changing one latent
    frame (pixel) changes only that frame's (pixel's) output: grid order and axes are right."""
    one_layer = {"num_layers": 1}
    if family == "hunyuan":
        one_layer["num_single_layers"] = 0
    model, inputs = _setup(family, batch=1, **one_layer)
    vs.apply(model, config(SameFrame()))
    base = _token_grid(family, _run(model, inputs))
    moved = _token_grid(family, _run(model, _perturb(family, inputs, frame=2)))
    changed = (moved - base).abs().amax(dim=(0, 2, 3, 4)) > 1e-6
    assert changed.tolist() == [False, False, True, False]

    vs.apply(model, config(SamePixel()))
    base = _token_grid(family, _run(model, inputs))
    moved = _token_grid(family, _run(model, _perturb(family, inputs, pixel=(1, 3))))
    changed = (moved - base).abs().amax(dim=(0, 1, 4)) > 1e-6
    expected = torch.zeros(4, 4, dtype=torch.bool)
    expected[1, 3] = True
    assert torch.equal(changed, expected)


@pytest.mark.parametrize("family", MAIN_FAMILIES)
@pytest.mark.parametrize("name", sorted(n for n in vs.PATTERNS if n != "dense"))
def test_sparse_patterns_run_and_differ_from_dense(family, name, shared):
    model, inputs, ref = shared(family)
    options = SPARSE_OPTIONS.get(name, {})
    pattern = vs.make_pattern(name, **options)
    layout = vs.VideoLayout(4, 4, 4, *TEXT[family])
    if not pattern.dynamic:
        assert not bool(vs.token_mask(pattern, layout).all()), f"{name} options are dense on {layout}"
    vs.apply(model, config(pattern))
    out = _run(model, inputs)
    assert get_state(model).calls["sparse"] == get_state(model).num_layers
    assert bool(torch.isfinite(out).all())
    assert (out - ref).abs().max() > 1e-4


@pytest.mark.parametrize("family", MAIN_FAMILIES)
def test_gna_window_covering_the_grid_equals_unpatched(family, shared):
    model, inputs, ref = shared(family)
    vs.apply(model, config(vs.make_pattern("gna", kernel_size=(4, 4, 4))))
    torch.testing.assert_close(_run(model, inputs), ref, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("family", MAIN_FAMILIES)
@pytest.mark.parametrize("name", sorted(vs.PATTERNS))
def test_family_defaults_run_on_tiny_grids(family, name, shared):
    """A pattern *name* gets family defaults adapted to the grid: any registered pattern runs."""
    model, inputs, _ = shared(family)
    vs.apply(model, config(name, block_size=16))
    out = _run(model, inputs)
    assert bool(torch.isfinite(out).all())
    assert get_state(model).calls["sparse"] == get_state(model).num_layers


def test_fused_qkv_projections_are_mirrored():
    for family in ("wan", "cogvideox"):
        model, inputs = _setup(family)
        model.fuse_qkv_projections()
        ref = _run(model, inputs)
        vs.apply(model, config("dense"))
        torch.testing.assert_close(_run(model, inputs), ref, atol=2e-5, rtol=1e-5)
        assert get_state(model).calls["sparse"] == get_state(model).num_layers


def test_bf16_dense_matches_unpatched():
    model, inputs = _setup("wan")
    model = model.to(torch.bfloat16)
    inputs = {
        k: v.to(torch.bfloat16) if isinstance(v, torch.Tensor) and v.is_floating_point() else v
        for k, v in inputs.items()
    }
    ref = _run(model, inputs)
    vs.apply(model, config("dense"))
    out = _run(model, inputs)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref.float(), atol=0.1, rtol=0.05)


def test_ltx_grid_from_video_coords():
    """LTX-Video's conditioning pipeline passes only video_coords: a full frame-major grid is
    recognised (any scaling), anything else (extra conditioning tokens) runs dense with a warning."""
    model, inputs = _setup("ltx", batch=1)
    f, h, w = torch.meshgrid(torch.arange(4), torch.arange(4), torch.arange(4), indexing="ij")
    coords = torch.stack([f.flatten() * 8.0 - 7.0, h.flatten() * 32.0, w.flatten() * 32.0])[None]
    by_coords = {
        k: v for k, v in inputs.items() if k not in ("num_frames", "height", "width", "rope_interpolation_scale")
    }
    by_coords["video_coords"] = coords
    plain = _run(model, by_coords)
    vs.apply(model, config("dense"))
    state = get_state(model)
    seen = []
    attention = state.attention_fn
    state.attention_fn = lambda q, k, v, layout, pattern, **kw: (
        seen.append(layout) or attention(q, k, v, layout, pattern, **kw)
    )
    torch.testing.assert_close(_run(model, by_coords), plain, atol=2e-5, rtol=1e-5)
    assert seen == [vs.VideoLayout(4, 4, 4)] * 2
    shuffled = {**by_coords, "video_coords": coords[:, :, torch.randperm(64)]}
    with pytest.warns(UserWarning, match="could not read the token grid"):
        _run(model, shuffled)
    assert state.calls["dense"] == 2 and len(seen) == 2
