"""A layer whose static plan keeps every query-key pair of the call's grid runs the model's own
attention (``SparseConfig.dense_when_full``, on by default): the same output bit for bit, no sparse
call, and none of the plan's padding work; ``dense_when_full=False`` runs the sparse kernel; the
generate summary and its JSON say which layers ran dense and why."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported anywhere below

import pytest  # noqa: E402
import torch  # noqa: E402

import vidsparse as vs  # noqa: E402
from vidsparse.generation import GenerateOptions, generate  # noqa: E402
from vidsparse.models import tiny_inputs, tiny_transformer  # noqa: E402
from vidsparse.pipelines.apply import get_state  # noqa: E402
from vidsparse.work import keeps_every_pair  # noqa: E402

# 3x3x4 = 36 latent tokens for the tiny Wan transformer (inputs 3 frames of 6x8, patch 2).
FULL_TILE = vs.Tile(tile=(1, 3, 4), window=(5, 1, 1))  # one tile per frame, every frame in reach
SPARSE_TILE = vs.Tile(tile=(1, 3, 4), window=(1, 1, 1))  # each frame attends itself only


@pytest.fixture(autouse=True)
def _the_default(monkeypatch):
    """The suite turns the default off for every other test (conftest); these test it."""
    monkeypatch.setenv("VIDSPARSE_DENSE_WHEN_FULL", "1")


def test_keeps_every_pair_counts_the_mask_not_only_the_block_lists():
    layout = vs.VideoLayout(3, 3, 4)
    assert keeps_every_pair(vs.plan(FULL_TILE, layout, block_size=16))
    assert not keeps_every_pair(vs.plan(SPARSE_TILE, layout, block_size=16))
    # One 64-token block holds the whole grid: it is listed, but its element mask drops pairs.
    local = vs.plan(vs.GNA(kernel_size=(1, 3, 3)), layout, block_size=64)
    assert local.num_blocks == 1 and bool((local.kv_counts == 1).all())
    assert not keeps_every_pair(local)
    # Text rows and columns attend everything: a full video pattern with text is still full.
    with_text = vs.VideoLayout(3, 3, 4, text_len=5, text_position="after")
    assert keeps_every_pair(vs.plan(FULL_TILE, with_text, block_size=16))
    assert not keeps_every_pair(vs.plan(SPARSE_TILE, with_text, block_size=16))


def test_a_per_query_selection_never_counts_as_full():
    layout = vs.VideoLayout(2, 4, 4)
    q = torch.randn(1, layout.seq_len, 1, 16)
    pattern = vs.VMoBA(temporal_chunk=1, spatial_chunk=(4, 4), st_chunk=(2, 4, 4), threshold=1.0)
    assert not keeps_every_pair(vs.plan(pattern, layout, q=q, k=q, block_size=16))
    with pytest.raises(TypeError, match="BlockSparsePlan"):
        keeps_every_pair("tile")


def _forward(model, inputs, config=None):
    """(output, the state's call counts and full layers) of one forward, patched with ``config``."""
    if config is not None:
        vs.apply(model, config)
    try:
        with torch.no_grad():
            out = model(**inputs).sample
        state = get_state(model) if config is not None else None
        return out, (dict(state.calls), dict(state.full_layers)) if state else None
    finally:
        if config is not None:
            vs.remove(model)


@pytest.mark.parametrize("kernel_order", [True, False])
def test_full_layers_run_the_models_attention_bit_for_bit(kernel_order, monkeypatch):
    monkeypatch.setenv("VIDSPARSE_KERNEL_ORDER", "1" if kernel_order else "0")
    model = tiny_transformer("wan")
    inputs = tiny_inputs("wan", model, 3, 6, 8)
    dense, _ = _forward(model, inputs)
    cfg = dict(dense_first_steps=0, backend="torch", block_size=16)
    out, (calls, full) = _forward(model, inputs, vs.SparseConfig(FULL_TILE, **cfg))
    assert calls.get("sparse", 0) == 0 and calls["dense"] == model.config.num_layers
    assert sorted(full) == list(range(model.config.num_layers)) and "Tile(" in full[0]
    assert torch.equal(out, dense)  # the model's own processor, not a kernel that equals it to rounding
    # dense_when_full=False: the sparse kernel runs and computes the same attention.
    kernel, (calls, full) = _forward(model, inputs, vs.SparseConfig(FULL_TILE, dense_when_full=False, **cfg))
    assert calls["sparse"] == model.config.num_layers and not full
    torch.testing.assert_close(kernel, dense, atol=1e-5, rtol=1e-5)


def test_only_the_layers_whose_plan_is_full_run_dense_in_a_kernel_order_forward():
    """Layer 1 keeps every pair, the others are sparse: the forward still runs in kernel order, and
    the full layer goes back to the caller's tokens for the model's attention."""
    model = tiny_transformer("wan", num_layers=3)
    inputs = tiny_inputs("wan", model, 3, 6, 8)
    common = dict(dense_first_steps=0, backend="torch", block_size=16, layer_patterns={1: FULL_TILE})
    config = vs.SparseConfig(SPARSE_TILE, **common)
    vs.apply(model, config)
    try:
        with torch.no_grad():
            out = model(**inputs).sample
        state = get_state(model)
        assert state.current.order is not None  # the sparse layers share one kernel order
        assert state.current.patterns[1] is None and state.current.patterns[0] == SPARSE_TILE
        assert sorted(state.full_layers) == [1] and state.calls["sparse"] == 2
        assert dict(state.current.full) == {1: FULL_TILE}
    finally:
        vs.remove(model)
    reference, (calls, _) = _forward(model, inputs, vs.SparseConfig(SPARSE_TILE, dense_when_full=False, **common))
    assert calls["sparse"] == 3
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=1e-5)


def test_a_sparse_plan_is_untouched():
    model = tiny_transformer("wan")
    inputs = tiny_inputs("wan", model, 3, 6, 8)
    cfg = dict(dense_first_steps=0, backend="torch", block_size=16)
    _, (calls, full) = _forward(model, inputs, vs.SparseConfig(SPARSE_TILE, **cfg))
    assert calls["sparse"] == model.config.num_layers and not full


def test_dense_when_full_must_be_a_bool_and_its_default_follows_the_environment(monkeypatch):
    assert vs.SparseConfig("tile").dense_when_full is True
    monkeypatch.setenv("VIDSPARSE_DENSE_WHEN_FULL", "0")
    assert vs.SparseConfig("tile").dense_when_full is False
    assert vs.SparseConfig("tile", dense_when_full=True).dense_when_full is True
    with pytest.raises(TypeError, match="dense_when_full must be True or False, got str 'no'"):
        vs.SparseConfig("tile", dense_when_full="no")
    assert hash(vs.SparseConfig("tile", dense_when_full=True)) != hash(vs.SparseConfig("tile"))


def test_generate_summary_says_which_layers_ran_dense_and_why():
    """The tiny model's tile at family defaults covers its 5x4x6 grid: every layer runs the model's
    attention, the summary says so (no 'no speedup' warning, no 'dense steps cover all' warning)."""
    result = generate(GenerateOptions(model="tiny", prompt="a ball", pattern="tile", out=None))
    assert result.sparse_steps == 0 and result.computed_work == pytest.approx(1.0)
    (group,) = result.densities
    assert group.keeps_every_pair and group.path == "dense" and group.pattern.startswith("Tile(")
    text = vs.generation.format_summary(result)
    assert "(keeps every pair: ran dense)" in text
    assert "note       layers 0-3: the pattern keeps every query-key pair of this 5x4x6 grid" in text
    assert "warning" not in text
    assert result.to_json()["densities"][0]["keeps_every_pair"] is True


def test_train_lora_pattern_report_says_a_full_plan_trains_as_dense():
    from vidsparse.lora.sparse import pattern_report

    model = tiny_transformer("wan")
    vs.apply(model, vs.SparseConfig(FULL_TILE, backend="torch", dense_first_steps=0, dense_layers=(0,)))
    try:
        with torch.no_grad():
            model(**tiny_inputs("wan", model, 3, 6, 8), return_dict=False)
        lines, warnings = pattern_report(model, "torch")
    finally:
        vs.remove(model)
    assert lines[1:] == [
        "layer 0: dense",
        f"layer 1: {FULL_TILE!r}, keeps every pair on this grid: ran the model's own attention",
    ]
    assert warnings == ["layer 1: Tile keeps every pair on this grid: it trains as dense"]


def test_inspect_says_what_vs_apply_does_with_a_full_plan(tmp_path, capsys):
    import json

    from vidsparse.cli import main

    for pattern, full in (("tile", True), ("radial", False)):
        js = tmp_path / f"{pattern}.json"
        assert main(["inspect", "--pattern", pattern, "--grid", "5x4x6", "--no-plot", "--json", str(js)]) == 0
        out = capsys.readouterr().out
        assert json.loads(js.read_text())["layers"][0]["keeps_every_pair"] is full
        assert ("run such layers with the model's own attention" in out) is full


def test_a_nabla_checkpoint_keeps_the_kernel_for_a_full_plan():
    """Kandinsky 5's NABLA checkpoints attend sparsely in their own processor: a full plan (here
    Dense()) must give full attention, not the model's NABLA (Family.own_attention_sparse)."""
    from diffusers.models.attention_dispatch import AttentionBackendName

    from vidsparse.families import get_family

    model = tiny_transformer("kandinsky5-nabla")
    inputs = tiny_inputs("kandinsky5-nabla", model, 3, 16, 16)
    assert inputs["sparse_params"] is not None
    with torch.no_grad():
        full = model(**dict(inputs, sparse_params=None)).sample  # the model's regular attention
    for _, attn, _ in get_family("kandinsky5").attention_paths(model):
        attn.processor._attention_backend = AttentionBackendName.FLEX  # its NABLA path
    config = vs.SparseConfig(vs.Dense(), backend="torch", dense_first_steps=0)
    out, (calls, full_layers) = _forward(model, inputs, config)
    assert calls["sparse"] == model.config.num_visual_blocks and not full_layers
    torch.testing.assert_close(out, full, atol=1e-4, rtol=1e-5)
    # The same model called without sparse_params (regular attention): the full plan runs it.
    _, (calls, full_layers) = _forward(model, dict(inputs, sparse_params=None), config)
    assert calls.get("sparse", 0) == 0 and len(full_layers) == model.config.num_visual_blocks
