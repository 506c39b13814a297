"""Radial pattern: block mask against a token-level port of the published definition
(mit-han-lab/radial-attention ``gen_log_mask_shrinked`` + ``shrinkMaskStrict``), the
paper's densities, ragged frames, and every backend against the dense oracle."""

import pytest
import torch
from oracle import masked_attention, random_qkv, random_text_mask

import vidsparse as vs


# -- independent oracles (token level, frame pair by frame pair, as the reference does it) --
def _window_and_keep(d: int, t: int, b: int, decay: float, threshold: int) -> tuple[float, bool]:
    if d <= 1:
        return t, True
    g = d.bit_length()
    width = 2 ** t.bit_length() / 2**g * decay
    width = width if width >= b else b
    undecayed = 2 ** t.bit_length() / 2**g
    keep = undecayed >= threshold or d % int(threshold / undecayed) == 0
    return width, keep


def _pair_mask(i: int, j: int, t: int, b: int, decay: float, sink: bool, threshold: int) -> torch.Tensor:
    if sink and j == 0:
        return torch.ones(t, t, dtype=torch.bool)
    width, keep = _window_and_keep(abs(i - j), t, b, decay, threshold)
    idx = torch.arange(t)
    return ((idx.view(1, -1) - idx.view(-1, 1)).abs() <= width) & keep


def _shrink_strict(mask: torch.Tensor, b: int, real_rows: torch.Tensor | None = None) -> torch.Tensor:
    """shrinkMaskStrict; with ``real_rows`` [n] coverage is divided by the real rows of each tile."""
    n = mask.shape[0] // b
    tiles = mask[: n * b, : n * b].view(n, b, n, b)
    denom = torch.full((n, 1, 1), float(b)) if real_rows is None else real_rows.view(n, 1, 1).float()
    coverage = tiles.sum(dim=1) / denom
    frac = (coverage > 1 / 3).sum(dim=-1) / ((coverage > 0).sum(dim=-1) + 1e-9)
    return frac > 0.6


def reference_block_mask(frames, t, b, decay, sink, threshold=None) -> torch.Tensor:
    """The reference's gen_log_mask_shrinked (video part), frame offsets and crop included."""
    threshold = b if threshold is None else threshold
    out = torch.zeros(frames * t // b, frames * t // b, dtype=torch.bool)
    for i in range(frames):
        for j in range(frames):
            rr, rc = (i * t) % b, (j * t) % b
            span = -(-t // b) * b
            padded = torch.zeros(rr + span, rc + span, dtype=torch.bool)
            padded[rr : rr + t, rc : rc + t] = _pair_mask(i, j, t, b, decay, sink, threshold)
            tile = _shrink_strict(padded, b)
            r0, c0 = (i * t) // b, (j * t) // b
            out[r0 : r0 + tile.shape[0], c0 : c0 + tile.shape[1]] |= tile
    return out


def padded_frame_block_mask(frames, t, b, decay, sink) -> torch.Tensor:
    """The documented ragged-frame rule: frames padded to whole blocks, coverage over real rows."""
    nb = -(-t // b)
    real_rows = torch.clamp(t - torch.arange(nb) * b, max=b)
    out = torch.zeros(frames * nb, frames * nb, dtype=torch.bool)
    for i in range(frames):
        for j in range(frames):
            padded = torch.zeros(nb * b, nb * b, dtype=torch.bool)
            padded[:t, :t] = _pair_mask(i, j, t, b, decay, sink, b)
            out[i * nb : (i + 1) * nb, j * nb : (j + 1) * nb] = _shrink_strict(padded, b, real_rows)
    return out


def expanded_token_mask(pattern: vs.Radial, layout: vs.VideoLayout) -> torch.Tensor:
    """Natural-order [S, S] mask from the block matrix; text rows and columns dense."""
    t, b = layout.tokens_per_frame, pattern.block_size
    nb = -(-t // b)
    v = torch.arange(layout.video_len)
    rb = (v // t) * nb + (v % t) // b
    video = pattern.block_mask(layout)[rb][:, rb]
    full = torch.ones(layout.seq_len, layout.seq_len, dtype=torch.bool)
    o = layout.video_offset
    full[o : o + layout.video_len, o : o + layout.video_len] = video
    return full


# -- exactness against the reference --------------------------------------------------------
@pytest.mark.parametrize("decay", [1.0, 0.5, 0.2])
@pytest.mark.parametrize("sink", [False, True])
def test_block_mask_equals_reference_when_frames_align(decay, sink):
    for frames in range(5, 13):
        layout = vs.VideoLayout(frames, 8, 8)  # T = 64, P = 128
        got = vs.Radial(decay, 16, sink).block_mask(layout)
        torch.testing.assert_close(got, reference_block_mask(frames, 64, 16, decay, sink), rtol=0, atol=0)


@pytest.mark.parametrize(
    "frames,h,w,b,decay,sink,threshold",
    [
        (9, 6, 8, 16, 0.95, False, None),  # T = 48: not a power of two
        (10, 8, 16, 32, 0.8, True, None),  # T = 128 (power of two: P = 256)
        (12, 8, 8, 16, 1.0, True, 32),  # reference-style hard threshold above the block size
        (17, 8, 8, 16, 0.5, False, 64),
    ],
)
def test_block_mask_equals_reference_other_sizes(frames, h, w, b, decay, sink, threshold):
    pattern = vs.Radial(decay, b, sink, skip_threshold=threshold)
    got = pattern.block_mask(vs.VideoLayout(frames, h, w))
    torch.testing.assert_close(got, reference_block_mask(frames, h * w, b, decay, sink, threshold), rtol=0, atol=0)


def test_structure_of_the_band():
    # T = 64, B = 16, P = 128: d=2..3 half-width 32 (decay 1), d=4..7 16, d>=8 thinned (every 2nd).
    m = vs.Radial(1.0, 16, False).block_mask(vs.VideoLayout(12, 8, 8)).view(12, 4, 12, 4)
    pair_blocks = m.sum(dim=(1, 3))
    assert pair_blocks[0, 1] == 16 and pair_blocks[5, 5] == 16  # distance 0-1 dense
    assert pair_blocks[0, 2] == 14 and pair_blocks[3, 0] == 14  # |k-l|<=32: penta-diagonal blocks
    assert pair_blocks[0, 4] == 10 and pair_blocks[1, 8] == 10  # |k-l|<=16 (one block): tri-diagonal
    assert pair_blocks[0, 8] == 10 and pair_blocks[1, 11] == 10  # width 8 < 16: only even distances
    assert pair_blocks[0, 9] == 0 and pair_blocks[1, 10] == 0 and pair_blocks[0, 11] == 0
    sink = vs.Radial(1.0, 16, True).block_mask(vs.VideoLayout(12, 8, 8)).view(12, 4, 12, 4)
    assert bool(sink[:, :, 0].all()) and not bool(sink[0, :, 9].any())  # key frame 0 only


# -- paper / radial.md §1.3 densities (block mask only: fast path) ------------------------
@pytest.mark.parametrize(
    "frames,h,w,decay,sink,density",
    [
        (18, 48, 80, 0.2, True, 0.287),  # Wan2.1 768x1280x69, repo default (71.3 % sparsity)
        (18, 48, 80, 1.0, True, 0.431),
        (21, 48, 80, 0.2, True, 0.261),
        (21, 48, 80, 1.0, True, 0.394),
        (21, 32, 52, 0.2, True, 0.356),  # aligned "480p"
        (21, 32, 52, 1.0, True, 0.449),
        (41, 48, 80, 1.0, True, 0.264),  # Wan2.1 2x: 73.6 % sparsity as in the paper
        (81, 48, 80, 1.0, True, 0.169),
        (20, 48, 80, 0.8, True, 0.353),  # Wan2.2
        (30, 48, 80, 0.95, False, 0.275),  # HunyuanVideo 768x1280x117 (72.5 %)
    ],
)
def test_paper_densities(frames, h, w, decay, sink, density):
    got = vs.Radial(decay, 128, sink).density(vs.VideoLayout(frames, h, w))
    assert round(got, 3) == density


def test_big_grids_plan_fast_path_matches_block_mask():
    for layout, pattern in [
        (vs.VideoLayout(41, 48, 80), vs.Radial(1.0, 128, True)),  # 157,440 tokens, identity order
        (vs.VideoLayout(21, 45, 80), vs.Radial(0.2, 128, True)),  # native 720p: T = 3600, padded frames
    ]:
        p = vs.plan(pattern, layout, block_size=128)
        assert p.video_density == pytest.approx(pattern.density(layout))
        assert p.order.identity == (layout.tokens_per_frame % 128 == 0)


# -- ragged frames ----------------------------------------------------------------------------
@pytest.mark.parametrize("frames,h,w,b", [(3, 5, 7, 16), (12, 5, 7, 16), (9, 10, 10, 32), (6, 3, 5, 32)])
@pytest.mark.parametrize("sink", [False, True])
def test_ragged_frames_follow_the_padded_rule(frames, h, w, b, sink):
    pattern = vs.Radial(0.5, b, sink)
    layout = vs.VideoLayout(frames, h, w)
    t = h * w
    torch.testing.assert_close(
        pattern.block_mask(layout), padded_frame_block_mask(frames, t, b, 0.5, sink), rtol=0, atol=0
    )
    order = pattern.video_order(layout, b)
    nb = -(-t // b)
    assert order.numel() == frames * nb * b and sorted(order[order >= 0].tolist()) == list(range(layout.video_len))

    tm = vs.token_mask(pattern, layout)[0]
    assert bool(tm.diagonal().all())  # every token, frame tails included, attends itself
    frame = torch.arange(layout.video_len) // t
    near = (frame.view(-1, 1) - frame.view(1, -1)).abs() <= 1
    assert bool(tm[near].all())  # distance 0-1 dense
    for i in range(frames):
        for j in range(frames):
            width, keep = _window_and_keep(abs(i - j), t, b, 0.5, b)
            if keep or (sink and j == 0):  # a kept band always covers its whole diagonal
                assert bool(tm[i * t : (i + 1) * t, j * t : (j + 1) * t].diagonal().all())
    if frames >= 12:
        assert not bool(tm.all())


@pytest.mark.parametrize("layout_args", [(12, 5, 7), (8, 4, 4), (5, 3, 5)])
@pytest.mark.parametrize("radial_block,plan_block", [(16, 16), (16, 32), (16, 64), (32, 16)])
def test_token_mask_is_the_block_mask_at_any_plan_block_size(layout_args, radial_block, plan_block):
    layout = vs.VideoLayout(*layout_args, text_len=5, text_position="after")
    pattern = vs.Radial(0.2, radial_block, True)
    got = vs.token_mask(pattern, layout, block_size=plan_block)[0]
    torch.testing.assert_close(got, expanded_token_mask(pattern, layout), rtol=0, atol=0)


# -- backends against the dense oracle ------------------------------------------------------
ATTN_CASES = [
    (vs.VideoLayout(10, 4, 4), vs.Radial(1.0, 16, False)),
    (vs.VideoLayout(9, 3, 5, text_len=7, text_position="before"), vs.Radial(0.5, 16, True)),
    (vs.VideoLayout(12, 5, 7, text_len=9, text_position="after"), vs.Radial(0.2, 16, True)),
]


@pytest.mark.parametrize("layout,pattern", ATTN_CASES, ids=lambda x: str(x))
@pytest.mark.parametrize("backend", ["torch", "flex"])
@pytest.mark.parametrize("block_size", [16, 32])
def test_attention_matches_masked_oracle(layout, pattern, backend, block_size):
    q, k, v = random_qkv(layout, batch=2, heads=2, dim=16, dtype=torch.float32)
    tm = random_text_mask(layout, 2)
    mask = vs.token_mask(pattern, layout)
    assert not bool(mask.all())  # the case is really sparse
    out = vs.attention(q, k, v, layout, pattern, backend=backend, text_mask=tm, block_size=block_size)
    ref = masked_attention(q, k, v, mask, layout, tm)
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=2e-5)


# -- configuration --------------------------------------------------------------------------
def test_registry_and_value_semantics():
    p = vs.make_pattern("radial", decay_factor=0.2, sink=True)
    assert p == vs.Radial(0.2, 128, True) and hash(p) == hash(vs.Radial(0.2, 128, True))
    assert vs.Radial(1) == vs.Radial(1.0) and not vs.Radial.uses_layer
    lay = vs.VideoLayout(6, 4, 4)
    m = vs.Radial(block_size=16).block_mask(lay)
    m.fill_(False)  # a copy: the cached mask is not shared
    assert bool(vs.Radial(block_size=16).block_mask(lay).any())


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(decay_factor=0.0), ValueError, "decay_factor"),
        (dict(decay_factor=-0.5), ValueError, "decay_factor"),
        (dict(decay_factor=float("nan")), ValueError, "decay_factor"),
        (dict(decay_factor="0.2"), TypeError, "decay_factor"),
        (dict(decay_factor=True), TypeError, "decay_factor"),
        (dict(block_size=100), ValueError, "power of two"),
        (dict(block_size=8), ValueError, "block_size"),
        (dict(block_size=128.0), ValueError, "block_size"),
        (dict(sink=1), TypeError, "sink"),
        (dict(skip_threshold=0), ValueError, "skip_threshold"),
    ],
)
def test_bad_parameters_raise_clear_errors(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        vs.Radial(**kwargs)
    with pytest.raises(TypeError, match="layout"):
        vs.Radial().block_mask((4, 8, 8))
