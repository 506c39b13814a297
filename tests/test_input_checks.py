"""Input checks of the newcomer pass (commit 407035b): layer_patterns keys resolved like
dense_layers, pattern_options split per pattern and checked at vs.apply, schedules that leave
nothing sparse, bool text masks, names fitted to the grid, flex's CPU backward, VMoBA's mode
options, register_pattern, VideoLayout sizes, vs.remove, and the one-line CLI / bench /
train-lora refusals."""

import argparse
import importlib
import re
import warnings
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import pytest
import torch

import vidsparse as vs
from vidsparse.families import get_family
from vidsparse.kernels.backends import check_runs_on
from vidsparse.models import build_tiny_pipeline, run_tiny_pipeline, tiny_inputs, tiny_transformer
from vidsparse.patterns import PATTERNS, fitted_pattern
from vidsparse.pipelines import get_state, is_applied, layer_schedule

pytestmark = pytest.mark.filterwarnings("ignore:In CPU autocast:UserWarning")

LAYOUT = vs.VideoLayout(3, 4, 4)


@pytest.fixture(scope="module")
def shared_pipe():
    return build_tiny_pipeline()


@pytest.fixture
def pipe(shared_pipe):
    """The module's tiny 2-layer Wan pipeline, unpatched after each test."""
    vs.remove(shared_pipe)
    yield shared_pipe
    vs.remove(shared_pipe)


def _spy(transformer, log):
    """Record (layer, pattern) of every attention call vidsparse routes."""
    state = get_state(transformer)
    inner = state.attention_fn

    def spy(q, k, v, layout, pattern, **kw):
        log.append((kw["layer"], pattern))
        return inner(q, k, v, layout, pattern, **kw)

    state.attention_fn = spy
    return state


def _patterns_by_layer(log):
    out: dict[int, set] = {}
    for layer, pattern in log:
        out.setdefault(layer, set()).add(pattern)
    return out


def _no_all_dense_warning(fn):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = fn()
    messages = [str(w.message) for w in caught if "dense" in str(w.message) and "vidsparse" in str(w.message)]
    assert not messages, messages
    return result


# -- 1, 2: layer_patterns keys ----------------------------------------------------------------


def test_negative_layer_pattern_key_runs_on_the_last_layer(pipe):
    vs.apply(pipe, vs.SparseConfig("dense", layer_patterns={-1: "tile"}, dense_layers=(), backend="torch"))
    state = get_state(pipe.transformer)
    assert state.num_layers == 2
    assert dict(state.layer_patterns_by_index) == {1: "tile"}
    patterns = state.layer_patterns(LAYOUT, None)
    assert isinstance(patterns[0], vs.Dense) and isinstance(patterns[1], vs.Tile), patterns

    log = []
    _spy(pipe.transformer, log)
    run_tiny_pipeline(pipe, num_inference_steps=2)
    by_layer = _patterns_by_layer(log)
    assert set(by_layer) == {0, 1}, by_layer
    assert all(isinstance(p, vs.Dense) for p in by_layer[0]), by_layer
    assert by_layer[1] and all(isinstance(p, vs.Tile) for p in by_layer[1]), by_layer


def test_layer_named_twice_or_also_dense_is_refused(pipe):
    with pytest.raises(ValueError, match=r"names layer 1 twice \(as -1 and 1 of 2 layers\)"):
        vs.apply(pipe, vs.SparseConfig("dense", layer_patterns={-1: "tile", 1: "gna"}, dense_layers=()))
    with pytest.raises(ValueError, match=r"Layers \[1\] are both in dense_layers and layer_patterns"):
        vs.apply(pipe, vs.SparseConfig("dense", layer_patterns={-1: "tile"}, dense_layers=(1,)))
    assert not is_applied(pipe)


def test_layer_schedule_directly():
    wan = get_family("wan")
    # Radial on Wan keeps layer 0 dense by default; -1 is layer 1 of 2.
    assert layer_schedule(vs.SparseConfig("radial", layer_patterns={-1: "tile"}), wan, 2) == (
        frozenset({0}),
        {1: "tile"},
    )
    # the explicit layer pattern wins over the family's default dense layer
    assert layer_schedule(vs.SparseConfig("radial", layer_patterns={0: "tile"}), wan, 2) == (frozenset(), {0: "tile"})
    assert layer_schedule(vs.SparseConfig("radial", layer_patterns={-2: "gna"}, dense_layers=(-1,)), wan, 2) == (
        frozenset({1}),
        {0: "gna"},
    )
    with pytest.raises(ValueError, match="names layer 0 twice"):
        layer_schedule(vs.SparseConfig("radial", layer_patterns={0: "tile", -2: "gna"}), wan, 2)
    with pytest.raises(ValueError, match=r"layer_patterns has layer -3, .*valid: 0\.\.1, or -2\.\.-1 from the end"):
        layer_schedule(vs.SparseConfig("radial", layer_patterns={-3: "tile"}), wan, 2)
    with pytest.raises(ValueError, match="both in dense_layers and layer_patterns"):
        layer_schedule(vs.SparseConfig("radial", layer_patterns={0: "tile"}, dense_layers=(-2,)), wan, 2)


def test_family_default_dense_layer_yields_to_layer_patterns(pipe):
    vs.apply(pipe, vs.SparseConfig("radial", backend="torch"))
    assert get_state(pipe.transformer).dense_layers == frozenset({0})  # the default this test overrides
    vs.apply(pipe, vs.SparseConfig("radial", layer_patterns={0: "tile"}, backend="torch"))
    state = get_state(pipe.transformer)
    assert state.dense_layers == frozenset()
    patterns = state.layer_patterns(LAYOUT, 16)
    assert isinstance(patterns[0], vs.Tile) and isinstance(patterns[1], vs.Radial), patterns

    log = []
    _spy(pipe.transformer, log)
    run_tiny_pipeline(pipe, num_inference_steps=4)
    by_layer = _patterns_by_layer(log)
    assert by_layer[0] and all(isinstance(p, vs.Tile) for p in by_layer[0]), by_layer
    assert by_layer[1] and all(isinstance(p, vs.Radial) for p in by_layer[1]), by_layer


# -- 3, 4: pattern_options per pattern, checked at apply ----------------------------------------


def test_pattern_options_go_to_their_own_pattern(pipe):
    cfg = vs.SparseConfig(
        "radial",
        layer_patterns={1: "tile"},
        pattern_options={"decay_factor": 0.5, "window": 1},
        dense_layers=(),
        backend="torch",
    )
    assert cfg.options_for("radial") == {"decay_factor": 0.5}
    assert cfg.options_for("tile") == {"window": 1}
    assert cfg.options_for("gna") == {}
    assert vs.apply(pipe, cfg) is pipe
    radial, tile = get_state(pipe.transformer).layer_patterns(LAYOUT, 16)
    assert isinstance(radial, vs.Radial) and radial.decay_factor == 0.5
    assert isinstance(tile, vs.Tile) and tile.window == (1, 1, 1)

    log = []
    _spy(pipe.transformer, log)
    out = run_tiny_pipeline(pipe, num_inference_steps=4)
    assert torch.isfinite(out).all()
    by_layer = _patterns_by_layer(log)
    assert {p.decay_factor for p in by_layer[0]} == {0.5}, by_layer
    assert {p.window for p in by_layer[1]} == {(1, 1, 1)}, by_layer

    # with the family's default dense layer 0, the tile layer still gets its window
    vs.apply(
        pipe, vs.SparseConfig("radial", layer_patterns={1: "tile"}, pattern_options={"decay_factor": 0.5, "window": 1})
    )
    dense, tile = get_state(pipe.transformer).layer_patterns(LAYOUT, 16)
    assert dense is None and tile.window == (1, 1, 1)


def test_pattern_option_shared_by_two_named_patterns_is_refused():
    with pytest.raises(ValueError, match=r"pattern_options\['tile'\] is an option of gna and tile.*unclear which one"):
        vs.SparseConfig("gna", layer_patterns={1: "tile"}, pattern_options={"tile": (1, 2, 2)})
    # with one named pattern the same key is fine
    assert vs.SparseConfig("gna", pattern_options={"tile": (1, 2, 2)}).options_for("gna") == {"tile": (1, 2, 2)}


@pytest.mark.parametrize(
    "pattern,options,match",
    [
        ("radial", {"decay_factor": -1}, "decay_factor must be a finite float > 0"),
        ("gna", {"kernel_size": 0}, "kernel_size must be >= 1"),
    ],
)
def test_bad_pattern_option_values_fail_at_apply(pipe, pattern, options, match):
    cfg = vs.SparseConfig(pattern, pattern_options=options)  # construction checks names only
    with pytest.raises(ValueError, match=match) as info:
        vs.apply(pipe, cfg)
    # the message names the options the user gave and where the others came from
    message = str(info.value)
    assert str(options) in message and "wan's defaults" in message, message
    assert not is_applied(pipe)


# -- 5: a user kernel narrows the family's default GNA stride ----------------------------------


def test_gna_merge_options_narrows_the_default_stride_only():
    defaults = {"kernel_size": (18, 24, 24), "stride": (16, 8, 8)}
    assert vs.GNA.merge_options(defaults, {"kernel_size": (3, 3, 3)}) == {"kernel_size": (3, 3, 3), "stride": (3, 3, 3)}
    assert vs.GNA.merge_options(defaults, {"kernel_size": (3, 3, 3), "stride": (2, 1, 3)}) == {
        "kernel_size": (3, 3, 3),
        "stride": (2, 1, 3),
    }
    assert vs.GNA.merge_options(defaults, {"kernel_size": (-1, 4, 20)})["stride"] == (16, 4, 8)
    assert vs.GNA.merge_options(defaults, {}) == defaults
    assert vs.Radial.merge_options({"decay_factor": 0.2, "sink": True}, {"decay_factor": 0.5}) == {
        "decay_factor": 0.5,
        "sink": True,
    }


def test_gna_kernel_option_runs_on_tiny_hunyuan():
    model = tiny_transformer("hunyuan")
    inputs = tiny_inputs("hunyuan", model, 4, 8, 8, batch=1)
    cfg = vs.SparseConfig(
        "gna", pattern_options={"kernel_size": (3, 3, 3)}, backend="torch", dense_first_steps=0, dense_layers=()
    )
    vs.apply(model, cfg)
    log = []
    _spy(model, log)
    with torch.no_grad():
        out = model(**inputs, return_dict=False)[0]
    assert torch.isfinite(out).all()
    used = {p for _, p in log}
    assert len(log) == get_state(model).num_layers and len(used) == 1, log
    (gna,) = used
    assert isinstance(gna, vs.GNA) and gna.kernel_size == (3, 3, 3) and gna.stride == (3, 3, 3), gna
    vs.remove(model)


# -- 6: schedules that leave nothing sparse ---------------------------------------------------


def test_all_dense_schedules_warn(pipe):
    with pytest.warns(UserWarning, match="dense_layers cover all 2 self-attention layers"):
        vs.apply(pipe, vs.SparseConfig("radial", dense_layers=(0, 1)))
    with pytest.warns(UserWarning, match=r"dense_first_steps=0.5 and SparseConfig.dense_last_steps=0.5 together cover"):
        vs.apply(pipe, vs.SparseConfig("radial", dense_first_steps=0.5, dense_last_steps=0.5))
    vs.apply(pipe, vs.SparseConfig("radial", dense_first_steps=10, backend="torch"))
    with pytest.warns(UserWarning, match="cover all 4 denoising steps"):
        run_tiny_pipeline(pipe, num_inference_steps=4)


def test_all_dense_schedule_warns_once_before_the_run(pipe):
    """Two fractions, or a step count given with the config: vs.apply warns, the run does not again."""
    cases = [
        (vs.SparseConfig("radial", dense_first_steps=0.5, dense_last_steps=0.5, backend="torch"), "together cover"),
        (vs.SparseConfig("radial", dense_first_steps=3, dense_last_steps=1, num_inference_steps=4, backend="torch"),
         r"3 dense first and 1 dense last steps .* cover all 4 denoising steps"),
        (vs.SparseConfig("radial", dense_last_steps=0.9, num_inference_steps=4, backend="torch"),
         r"the family default 0.25, SparseConfig.dense_last_steps=0.9\) cover all 4"),
    ]  # fmt: skip
    for config, match in cases:
        with pytest.warns(UserWarning, match=match):
            vs.apply(pipe, config)
        _no_all_dense_warning(lambda: run_tiny_pipeline(pipe, num_inference_steps=4))
    # a step count that is not the run's: the run's own count decides, and says so
    vs.apply(pipe, vs.SparseConfig("radial", dense_first_steps=3, num_inference_steps=8, backend="torch"))
    with pytest.warns(UserWarning, match="3 dense first and 0 dense last steps cover all 3 denoising steps"):
        run_tiny_pipeline(pipe, num_inference_steps=3)


def test_generate_summary_names_the_dense_layers_when_they_are_all_layers():
    from vidsparse.generation import GenerateOptions, format_summary, generate

    with pytest.warns(UserWarning, match="dense_layers cover all"):
        result = generate(GenerateOptions(model="tiny", dense_layers=(0, 1, 2, 3), steps=2, out=None))
    assert result.sparse_steps == 0
    assert "no layer ran the sparse pattern: the dense layers (--dense-layers)" in format_summary(result)


def test_all_dense_schedule_of_the_dense_pattern_does_not_warn(pipe):
    _no_all_dense_warning(lambda: vs.apply(pipe, vs.SparseConfig("dense", dense_layers=(0, 1))))
    _no_all_dense_warning(lambda: vs.apply(pipe, vs.SparseConfig("dense", dense_first_steps=0.5, dense_last_steps=0.5)))
    vs.apply(pipe, vs.SparseConfig("dense", dense_first_steps=10, backend="torch"))
    _no_all_dense_warning(lambda: run_tiny_pipeline(pipe, num_inference_steps=4))
    # and a sparse schedule with something left sparse does not warn either
    vs.apply(pipe, vs.SparseConfig("radial", dense_first_steps=1, backend="torch"))
    _no_all_dense_warning(lambda: run_tiny_pipeline(pipe, num_inference_steps=4))


# -- 7: text_mask must be bool ----------------------------------------------------------------


def test_text_mask_must_be_bool():
    layout = vs.VideoLayout(2, 4, 4, text_len=2, text_position="after")
    q, k, v = (torch.randn(1, 34, 2, 16) for _ in range(3))
    with pytest.raises(TypeError, match=r"text_mask must be bool .* got torch.float32"):
        vs.attention(q, k, v, layout, "radial", backend="torch", text_mask=torch.ones(1, 2))
    mask = torch.tensor([[True, False]])
    out = vs.attention(q, k, v, layout, "radial", backend="torch", text_mask=mask)
    assert out.shape == q.shape and torch.isfinite(out).all()


# -- 8: names fitted to the grid --------------------------------------------------------------


def test_pattern_names_are_fitted_to_the_grid():
    assert vs.plan("gna", LAYOUT, block_size=16).layout == LAYOUT
    small = vs.VideoLayout(1, 4, 4)
    assert vs.plan("attention-tile", small, block_size=16).layout == small
    gna = fitted_pattern("gna", LAYOUT)
    assert gna == vs.GNA(kernel_size=(-1, -1, -1), stride=(1, 1, 1))
    assert fitted_pattern("attention-tile", small) == vs.AttentionTile(global_frames=1)
    with pytest.raises(ValueError, match="Unknown pattern 'nope'"):
        fitted_pattern("nope", LAYOUT)


def test_pattern_objects_are_used_as_given():
    with pytest.raises(ValueError, match="GNA kernel_size 9 exceeds the 3 tokens of axis t"):
        vs.plan(vs.GNA(), LAYOUT)
    with pytest.raises(ValueError, match="global_frames=2 exceeds the 1 latent frames"):
        vs.plan(vs.AttentionTile(), vs.VideoLayout(1, 4, 4))


# -- 9: [B, H, S, D] and a CUDA device without CUDA -------------------------------------------


def test_token_mask_names_sdpa_layout_of_q_and_k():
    layout = vs.VideoLayout(2, 4, 4)
    q, k = torch.randn(1, 32, 2, 16), torch.randn(1, 32, 2, 16)
    with pytest.raises(ValueError, match=r"q has shape \(1, 2, 32, 16\).*\[B, H, S, D\].*q.transpose\(1, 2\)"):
        vs.token_mask("vmoba", layout, q=q.transpose(1, 2), k=k)
    with pytest.raises(ValueError, match=r"k has shape .*\[B, H, S, D\]"):
        vs.token_mask("vmoba", layout, q=q, k=k.transpose(1, 2))
    assert vs.token_mask("vmoba", layout, q=q, k=k).shape == (2, 32, 32)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a CPU-only torch")
def test_plan_on_cuda_without_cuda():
    with pytest.raises(ValueError, match="device='cuda', but this torch has no CUDA device"):
        vs.plan("radial", vs.VideoLayout(2, 4, 4), device="cuda")


# -- 10: flex refuses a CPU backward up front -------------------------------------------------


def test_flex_refuses_cpu_backward_before_any_work(monkeypatch):
    layout = vs.VideoLayout(2, 4, 4)
    q, k, v = (torch.randn(1, 32, 2, 16) for _ in range(3))
    q.requires_grad_(True)
    attention_module = importlib.import_module("vidsparse.attention")

    def no_plan(*args, **kwargs):
        raise AssertionError("planned before refusing")

    with monkeypatch.context() as m:
        m.setattr(attention_module, "plan", no_plan)
        with pytest.raises(ValueError, match=r"backend='flex' cannot run this call: .*no backward on CPU"):
            vs.attention(q, k, v, layout, "radial", backend="flex")
    with torch.no_grad():
        out = vs.attention(q, k, v, layout, "radial", backend="flex")
    ref = vs.attention(q.detach(), k, v, layout, "radial", backend="torch")
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_check_runs_on_flex_backward():
    with pytest.raises(ValueError, match="backend flex cannot run on cpu .*no backward on CPU"):
        check_runs_on("flex", torch.device("cpu"), torch.float32, backward=True)
    assert check_runs_on("flex", torch.device("cpu"), torch.float32) is None
    assert check_runs_on("torch", torch.device("cpu"), torch.float32, backward=True) is None


# -- 11: VMoBA mode options -------------------------------------------------------------------


def test_vmoba_warns_for_the_other_modes_option():
    with pytest.warns(UserWarning, match=r"VMoBA.topk=3 is used only with select_mode='topk'"):
        vs.VMoBA(topk=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert vs.VMoBA(select_mode="topk", topk=3).topk == 3
        both = vs.VMoBA(select_mode="topk", topk=3, threshold=0.3)
        assert (both.topk, both.threshold) == (3, 0.3)
        vs.VMoBA()


# -- 12: register_pattern and custom video_mask shapes -----------------------------------------


def test_register_pattern_wants_a_frozen_dataclass():
    class Plain(vs.Pattern):
        name: ClassVar[str] = "test-input-checks-plain"

        def video_mask(self, layout, qi, ki, layer=0):
            return qi == ki

    @dataclass
    class Mutable(vs.Pattern):
        name: ClassVar[str] = "test-input-checks-mutable"

        def video_mask(self, layout, qi, ki, layer=0):
            return qi == ki

    for cls in (Plain, Mutable):
        with pytest.raises(TypeError, match=f"{cls.__name__} must be a frozen dataclass"):
            vs.register_pattern(cls)
        assert cls.name not in PATTERNS


def test_wrongly_shaped_video_mask_is_named():
    @dataclass(frozen=True)
    class WrongShape(vs.Pattern):
        name: ClassVar[str] = "test-input-checks-wrong-shape"

        def video_mask(self, layout, qi, ki, layer=0):
            return torch.ones(3, 5, dtype=torch.bool)

    try:
        vs.register_pattern(WrongShape)
        layout = vs.VideoLayout(2, 4, 4)
        for pattern in (WrongShape(), WrongShape.name):
            with pytest.raises(
                ValueError, match=r"WrongShape.video_mask returned shape \(3, 5\), which does not broadcast"
            ):
                vs.plan(pattern, layout, block_size=16)
    finally:
        PATTERNS.pop(WrongShape.name, None)
    assert WrongShape.name not in PATTERNS


# -- 13, 14, 15: VideoLayout sizes, vs.remove, backend names ----------------------------------


def test_video_layout_takes_numpy_ints_not_floats():
    layout = vs.VideoLayout(np.int64(2), 4, 4)
    assert layout.frames == 2 and type(layout.frames) is int
    assert layout == vs.VideoLayout(2, 4, 4)
    with pytest.raises(ValueError, match="VideoLayout.frames must be a positive int .* got 2.0"):
        vs.VideoLayout(2.0, 4, 4)


def test_remove_refuses_a_non_video_module_and_leaves_an_unpatched_pipeline(pipe):
    with pytest.raises(ValueError, match="vidsparse cannot patch a Linear"):
        vs.remove(torch.nn.Linear(3, 3))
    processors = {n: m.processor for n, m in pipe.transformer.named_modules() if hasattr(m, "processor")}
    assert processors and not is_applied(pipe)
    assert vs.remove(pipe) is pipe and not is_applied(pipe)
    assert {n: m.processor for n, m in pipe.transformer.named_modules() if hasattr(m, "processor")} == processors


def test_natten_backend_points_to_bench():
    q, k, v = (torch.randn(1, 32, 2, 16) for _ in range(3))
    with pytest.raises(ValueError, match=r"Unknown backend 'natten'.*vidsparse bench"):
        vs.attention(q, k, v, vs.VideoLayout(2, 4, 4), "gna", backend="natten")


# -- 16, 17: CLI usage errors are one line ---------------------------------------------------


def _cli(capsys, argv):
    from vidsparse.cli import main

    rc = main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def test_cli_bad_value_is_one_line(capsys):
    rc, _, err = _cli(capsys, ["generate", "--steps", "abc"])
    assert rc == 2
    assert len(err.splitlines()) == 1, err
    assert "invalid int value" in err and "--help" in err


def test_cli_typo_and_switch_with_value(capsys):
    rc, _, err = _cli(capsys, ["generate", "--decay-factr", "0.2"])
    assert rc == 2 and "did you mean --decay-factor" in err and len(err.splitlines()) == 1, err
    rc, _, err = _cli(capsys, ["inspect", "--pattern", "radial", "--grid", "21x30x52", "--sink", "false"])
    assert rc == 2 and "--sink is a switch and takes no value (--no-sink turns it off)" in err, err
    assert len(err.splitlines()) == 1, err


def test_typo_of_a_required_flag_is_named(capsys):
    rc, _, err = _cli(capsys, ["inspect", "--patern", "radial", "--grid", "4x4x4"])
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert "required: --pattern" in err and "--patern: did you mean --pattern?" in err, err


def test_unrecognized_directly():
    from vidsparse.cli import unrecognized

    parser = argparse.ArgumentParser()
    parser.add_argument("--decay-factor", type=float)
    parser.add_argument("--sink", action="store_true")
    parser.add_argument("--no-sink", dest="sink", action="store_false")
    parser.add_argument("--quick", action="store_true")
    assert unrecognized(["--decay-factr", "0.2"], ["--decay-factr", "0.2"], parser) == (
        "unrecognized arguments: --decay-factr 0.2; --decay-factr: did you mean --decay-factor?"
    )
    assert unrecognized(["false"], ["--sink", "false"], parser) == (
        "unrecognized arguments: false; --sink is a switch and takes no value (--no-sink turns it off)"
    )
    assert unrecognized(["yes"], ["--quick", "yes"], parser) == (
        "unrecognized arguments: yes; --quick is a switch and takes no value"
    )
    # the --no- switch itself: no "(--no-sink turns it off)" pointing at the flag just given
    assert unrecognized(["x"], ["--no-sink", "x"], parser) == (
        "unrecognized arguments: x; --no-sink is a switch and takes no value"
    )
    assert unrecognized(["--zzz"], ["--zzz"], parser) == "unrecognized arguments: --zzz"


def test_inspect_qk_garbage_file_is_one_line(capsys, tmp_path):
    path = tmp_path / "x.pt"
    path.write_bytes(b"garbage")
    rc, _, err = _cli(capsys, ["inspect", "--pattern", "vmoba", "--grid", "3x4x4", "--qk", str(path), "--no-plot"])
    assert rc == 2
    assert len(err.splitlines()) == 1, err
    assert "is not a torch file" in err and "torch.save" in err and "Traceback" not in err


# -- 18: bench flag checks ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv,match",
    [
        (["--render", "x.json"], "--render: flags of the device suite; add --suite"),
        (["--suite", "--shapes", "tiny"], "--shapes: flags of the kernel benchmark, which --suite does not read"),
        (["--device", "cpu", "--quick", "--shapes", "wan-14b"], "--shapes wan-14b on CPU"),
        (["--device", "cpu", "--quick", "--shapes", ","], "--shapes names no shape"),
        (["--device", "cpu", "--quick", "--directions", ","], "--directions names no direction"),
    ],
)
def test_bench_refuses_bad_flags_before_measuring(capsys, tmp_path, argv, match):
    from vidsparse import bench

    out_dir = tmp_path / "bench"
    rc = bench.main([*argv, "--out-dir", str(out_dir)])
    out, err = capsys.readouterr()
    assert rc == 2
    assert err.startswith("vidsparse bench: error: ") and match in err and len(err.splitlines()) == 1, err
    assert out == "" and not out_dir.exists()


def test_bench_settings_block_size_and_patterns(tmp_path):
    from vidsparse import bench

    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)

    def settings(*argv):
        return bench.settings_from_args(
            parser.parse_args(["--device", "cpu", "--quick", "--out-dir", str(tmp_path), *argv])
        )

    assert settings("--block-size", "64").block_size == 64
    assert settings().block_size == 16
    assert settings("--block-size", "128").block_size == 128
    assert list(settings("--patterns", "all").patterns) == list(vs.PATTERNS)
    assert list(settings().patterns) == ["dense"]


# -- 19: train-lora refusals -------------------------------------------------------------------


def test_lora_clip_size_checked_from_the_config():
    from vidsparse.lora.models import check_clip_size

    with pytest.raises(ValueError, match=r"--num-frames/--height/--width: .*nearest valid: 13 or 17"):
        check_clip_size("tiny", 16, 64, 96)
    assert check_clip_size("tiny", 17, 64, 96) is None


def test_train_lora_refuses_an_output_dir_with_checkpoints(capsys, tmp_path):
    import imageio.v3 as iio
    from test_lora_data import moving_ball

    data = tmp_path / "data"
    data.mkdir()
    iio.imwrite(data / "a.mp4", moving_ball(20, 40, 56, 0), fps=8, macro_block_size=1)
    (data / "a.txt").write_text("a red ball bouncing\n")
    out = tmp_path / "out"
    (out / "checkpoint-00000003").mkdir(parents=True)
    (out / "checkpoint-00000003" / "state.json").write_text("{}")

    def listing(root):
        return sorted(str(p.relative_to(root)) for p in root.rglob("*"))

    before, data_before = listing(out), listing(data)
    argv = ["train-lora", "--model", "tiny", "--data-dir", str(data), "--output-dir", str(out),
            "--num-frames", "17", "--height", "64", "--width", "96", "--max-train-steps", "1"]  # fmt: skip
    rc, _, err = _cli(capsys, argv)
    assert rc == 2
    assert "already holds checkpoints" in err and "checkpoint-00000003" in err and "--resume" in err, err
    assert listing(out) == before and listing(data) == data_before


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--lora-dropout", "1.5"], "--lora-dropout must be in [0, 1), got 1.5"),  # TrainConfig.dropout
        (["--checkpoints-total-limit", "-1"], "--checkpoints-total-limit must be >= 0 (0 keeps every checkpoint)"),
        (["--rank", "0"], "--rank must be an int >= 1"),
    ],
)
def test_train_lora_config_errors_name_the_flag(capsys, tmp_path, flags, message):
    out = tmp_path / "out"
    argv = ["train-lora", "--model", "tiny", "--data-dir", str(tmp_path), "--output-dir", str(out), *flags]
    rc, _, err = _cli(capsys, argv)
    assert rc == 2 and message in err and len(err.splitlines()) == 1, err
    assert not out.exists()


def test_generate_cli_refuses_what_it_would_ignore_or_lose(capsys, tmp_path):
    """Flags whose effect would be silently dropped, and a --json that would replace the video."""
    video = tmp_path / "v.mp4"
    cases = [
        (["--pattern", "dense", "--dense-layers", "0"], "--pattern dense runs dense everywhere"),
        (["--pattern", "dense", "--backend", "flex"], "--backend choose how a sparse pattern's kernel runs"),
        (["--pattern", "dense", "--block-size", "32"], "--pattern dense runs the model's own attention"),
        (["--lora-scale", "0.5"], "pass --lora too"),
        (["--strength", "0.5"], "--strength applies to --freeswim"),
        (["--seed", str(2**64)], "torch.Generator's range"),
        (["--block-size", "1024"], "larger than this grid needs"),
        (["--json", str(video)], "would overwrite the video"),
        (["--json", str(tmp_path / "folder") + "/"], "is a directory"),
    ]
    for extra, phrase in cases:
        rc, out, err = _cli(capsys, ["generate", "--model", "tiny", "--out", str(video), *extra])
        assert rc == 2 and phrase in err and len(err.strip().splitlines()) == 1, (extra, err)
    assert list(tmp_path.iterdir()) == []  # nothing written, no folder made


def test_generate_library_keeps_a_dense_baseline_of_sparse_options():
    """GenerateOptions swapped to pattern='dense' for a baseline keeps its schedule fields: not an error."""
    from vidsparse.generation import GenerateOptions
    from vidsparse.generation.options import prepare

    plan = prepare(GenerateOptions(model="tiny-random", pattern="dense", dense_first_steps=0, frames=5, steps=1))
    assert plan.sparse_config is None


def test_lora_pattern_report_says_what_ran_and_when_it_is_dense_in_effect():
    """train-lora logs the pattern as it ran on the training grid (and records it in vidsparse_lora.json)."""
    from vidsparse.lora.sparse import pattern_report
    from vidsparse.models.tiny import tiny_inputs, tiny_transformer

    model = tiny_transformer("wan", seed=0)
    inputs = tiny_inputs("wan", model, frames=4, height=8, width=8, seed=1)
    assert pattern_report(model, "torch") == ([], [])  # not patched: nothing ran
    for pattern, dense_in_effect in (("gna", True), (vs.Tile(tile=(1, 2, 2), window=(1, 1, 1)), False)):
        vs.apply(model, vs.SparseConfig(pattern, backend="torch", dense_first_steps=0, dense_layers=(0,)))
        with torch.no_grad():
            model(**inputs, return_dict=False)
        lines, warnings = pattern_report(model, "torch")
        assert lines[0].startswith("token grid") and lines[1] == "layer 0: dense", lines
        assert "keeps" in lines[2] and "computes" in lines[2], lines
        assert any("trains as dense" in w for w in warnings) == dense_in_effect, warnings
        vs.remove(model)


def test_bare_transformer_step_count_error_names_only_what_needs_it():
    from vidsparse.models import tiny_transformer

    model = tiny_transformer("wan")
    cases = [
        (dict(dense_first_steps=0, dense_last_steps=2), "but SparseConfig.dense_last_steps=2 needs it"),
        (dict(dense_first_steps=0.5), "but SparseConfig.dense_first_steps=0.5 (a fraction) needs it"),
        (dict(dense_first_steps=0.5, dense_last_steps=2), "dense_last_steps=2 and SparseConfig.dense_first_steps=0.5"),
    ]
    for options, message in cases:
        with pytest.raises(ValueError, match=re.escape(message)):
            vs.apply(model, vs.SparseConfig("radial", **options))
    vs.apply(model, vs.SparseConfig("radial", dense_first_steps=2))  # a count needs no total
    vs.remove(model)


def test_sizes_a_pipeline_cannot_take_are_refused_before_loading(capsys, tmp_path, monkeypatch):
    """LTX-2's VAE decodes at least 2 latent pixels a side; Kandinsky5I2VPipeline needs 1 or >= 5
    latent frames (its first-frame normalisation divides by the frames after the first 4)."""
    from vidsparse.generation import GenerateOptions, loading, prepare

    def no_load(*a, **k):
        raise AssertionError("loaded a model")

    monkeypatch.setattr(loading, "load_pipeline", no_load)
    with pytest.raises(ValueError, match=r"height=32: the ltx2 VAE decodes at least 2 latent pixels a side"):
        prepare(GenerateOptions(model="tiny-ltx2", frames=9, height=32, width=64, out=None))
    assert prepare(GenerateOptions(model="tiny-ltx2", frames=9, height=64, width=64, out=None)).grid == (2, 2, 2)
    image = tmp_path / "i.png"
    from PIL import Image

    Image.new("RGB", (160, 96)).save(image)
    with pytest.raises(ValueError, match=r"--frames 9: Kandinsky5I2VPipeline .* needs 1 or at least 5 latent frames"):
        prepare(GenerateOptions(model="tiny-kandinsky5-i2v", image=str(image), frames=9, out=None))
    assert prepare(GenerateOptions(model="tiny-kandinsky5-i2v", image=str(image), out=None)).frames == 17  # its default
    assert prepare(GenerateOptions(model="tiny-kandinsky5-i2v", image=str(image), frames=1, out=None)).frames == 1
    assert prepare(GenerateOptions(model="tiny-kandinsky5", frames=9, out=None)).frames == 9  # T2V takes it
