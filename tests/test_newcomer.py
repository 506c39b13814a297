"""A new user's first hour (issue 18): fast --help, Ctrl-C, honest timings, early path checks,
the LoRA in the summary, one flag spelling per meaning, defaults in --help, hub errors."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from vidsparse import cli, pattern_flags
from vidsparse.cli import main
from vidsparse.generation import GenerateOptions, generate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["--model", "tiny-random", "--frames", "9", "--height", "32", "--width", "48", "--steps", "4", "--no-progress"]
SMALL_OPTS = dict(model="tiny-random", frames=9, height=32, width=48, steps=4, progress=False)
HEAVY = ("torch", "diffusers", "transformers", "triton", "matplotlib", "torch._dynamo", "peft", "accelerate")


def _env(**extra):
    return dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=ROOT, **extra)


def _modules_after(argv: list[str]) -> set[str]:
    code = (
        "import sys\nfrom vidsparse.cli import main\n"
        "import contextlib, io\n"
        f"with contextlib.redirect_stdout(io.StringIO()): main({argv!r})\n"
        f"print(' '.join(m for m in {HEAVY!r} if m in sys.modules))"
    )
    proc = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return set(proc.stdout.split())


# -- item 4: start-up --------------------------------------------------------------------------


def test_help_imports_only_what_it_needs():
    assert _modules_after(["--help"]) == set()  # the command list: not even torch
    # A command's flags need torch (pattern dataclasses), nothing heavier.
    assert _modules_after(["generate", "--help"]) <= {"torch"}
    assert _modules_after(["train-lora", "--help"]) <= {"torch"}


def test_lazy_package_keeps_the_functions_named_like_submodules():
    code = (
        "import sys, vidsparse as vs\n"
        "assert 'torch' not in sys.modules\n"
        "import vidsparse.plan, vidsparse.attention\n"  # submodules first: the attributes stay functions
        "from vidsparse.plan import BlockSparsePlan\n"
        "assert callable(vs.plan) and callable(vs.attention) and vs.BlockSparsePlan is BlockSparsePlan\n"
        "assert vs.plan is sys.modules['vidsparse.attention'].plan\n"
        "assert vs.Radial is sys.modules['vidsparse.patterns'].Radial\n"
        "print('ok')"
    )
    proc = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.stdout.strip() == "ok", proc.stderr


def _wait_for_torch(pid: int, timeout_s: float = 120.0) -> None:
    """Until the process has started loading torch (its shared library is mapped): the command is
    past Python's own start-up and inside the imports."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/maps") as fh:
                if "libtorch" in fh.read():
                    return
        except OSError:
            return
        time.sleep(0.01)


def _default_sigint() -> None:
    """The child's SIGINT as a terminal gives it: a test run started in the background (``pytest &``)
    ignores SIGINT and its children inherit that, so Ctrl-C would never reach the command."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs /proc to see when torch loads")
@pytest.mark.parametrize("after_s", [0.0, 1.5, 3.0])
def test_ctrl_c_at_any_moment_is_one_line_and_exit_130(after_s, tmp_path):
    """SIGINT while torch is being imported (0 s) and later (imports, loading, denoising)."""
    argv = [sys.executable, "-m", "vidsparse", "generate", *SMALL, "--out", str(tmp_path / "v.mp4")]
    proc = subprocess.Popen(
        argv, env=_env(), cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=_default_sigint,
    )  # fmt: skip
    _wait_for_torch(proc.pid)
    time.sleep(after_s)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=300)
    if proc.returncode == 0:  # finished before the signal on a fast machine: nothing to check
        pytest.skip("the run ended before the signal")
    assert proc.returncode == 130, err
    # stderr may hold the progress bar of a run that had started denoising; the interrupt itself
    # is one line and no traceback
    assert err.strip().splitlines()[-1].split("\r")[-1] == "vidsparse: interrupted.", err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert not (tmp_path / "v.mp4").exists()


# -- item 2: timings; item 8: attention work of the clip-parallel summary ----------------------


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("newcomer")
    argv = [*SMALL, "--out", str(root / "v.mp4"), "--json", str(root / "v.json")]
    proc = subprocess.run(
        [sys.executable, "-m", "vidsparse", "generate", *argv], env=_env(), capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout, json.loads((root / "v.json").read_text())


def test_summary_counts_start_up_and_shows_the_vae_decode(cli_run):
    summary, data = cli_run
    assert data["startup_s"] > 0 and data["decode_s"] > 0
    assert data["total_s"] == pytest.approx(data["startup_s"] + data["wall_s"])
    # The decode is inside the pipeline call and outside the denoising steps.
    assert data["decode_s"] + data["denoise_s"] <= data["call_s"] + 1e-6
    lines = summary.splitlines()
    time_line = next(line for line in lines if line.startswith("time "))
    assert f"{data['total_s']:.1f} s total" in time_line and "start-up" in time_line
    assert any(line.strip().startswith("VAE decode ") for line in lines)
    assert any(line.strip().startswith("denoise ") and "s/step median" in line for line in lines)


def test_decode_clock_restores_the_vae():
    from vidsparse.generation.call import DecodeClock
    from vidsparse.models.tiny import build_tiny_pipeline

    pipe = build_tiny_pipeline()
    clock = DecodeClock(pipe, pipe.device)
    assert "decode" in vars(pipe.vae)
    clock.close()
    assert "decode" not in vars(pipe.vae) and pipe.vae.decode.__func__ is type(pipe.vae).decode


def test_clip_parallel_work_counts_dense_warm_up_like_single_process(cli_run):
    from vidsparse.parallel.generate import run_mean

    _, data = cli_run
    layers = [d for d in data["densities"] for _ in d["layers"]]
    per_sparse_step = sum(d["block_density"] for d in layers) / len(layers)
    assert 0 < data["sparse_steps"] < data["steps"]  # the family's dense warm-up ran
    work = run_mean(per_sparse_step, data["sparse_steps"], data["steps"])
    assert work == pytest.approx(data["kept_blocks"], abs=1e-6)
    assert work > per_sparse_step  # what the parallel summary reported before


# -- item 3: output paths before any work ------------------------------------------------------


@pytest.mark.parametrize("out", ["/proc/x.mp4", "/proc/missing/dir/x.mp4", "/sys/no/such/x.gif"])
def test_unwritable_out_is_refused_before_loading(out, monkeypatch, capsys):
    import vidsparse.generation.run as gen

    def no_loading(*args, **kwargs):
        raise AssertionError("the model must not be loaded for an unwritable --out")

    monkeypatch.setattr(gen, "load_pipeline", no_loading)
    assert main(["generate", *SMALL, "--out", out]) == 2
    err = capsys.readouterr().err
    assert "Cannot write output path" in err and "Traceback" not in err and ".tmp" not in err


def test_unwritable_json_is_refused_before_loading(tmp_path, monkeypatch, capsys):
    import vidsparse.generation.run as gen

    monkeypatch.setattr(gen, "load_pipeline", lambda *a, **k: (_ for _ in ()).throw(AssertionError("loaded")))
    assert main(["generate", *SMALL, "--out", str(tmp_path / "v.mp4"), "--json", "/proc/x/y.json"]) == 2
    assert "--json" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []


# -- item 5: the LoRA in the summary and the JSON; its file mode --------------------------------


@pytest.fixture(scope="module")
def tiny_lora(tmp_path_factory):
    """A LoRA for the tiny Wan pipeline, saved as train-lora saves it (no training needed)."""
    from diffusers import WanPipeline
    from peft import LoraConfig

    from vidsparse.lora.export import save_lora
    from vidsparse.models.tiny import build_tiny_pipeline

    out = tmp_path_factory.mktemp("lora")
    pipe = build_tiny_pipeline()
    targets = ["attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0"]
    pipe.transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=targets, init_lora_weights=False))
    info = {"format": "vidsparse-lora/1", "model": "tiny", "family": "wan", "pattern": "radial{}",
            "num_frames": 17, "height": 48, "width": 48, "rank": 4, "steps": 8}  # fmt: skip
    old = os.umask(0o022)
    try:
        path = save_lora(out, WanPipeline, pipe.transformer, info=info)
    finally:
        os.umask(old)
    return out, path


def test_lora_weights_file_is_0644_like_every_output(tiny_lora):
    _, path = tiny_lora
    assert oct(os.stat(path).st_mode & 0o777) == oct(0o644)


def test_generate_reports_the_lora_and_what_it_was_trained_for(tiny_lora, recwarn):
    from vidsparse.generation import format_summary

    folder, _ = tiny_lora
    result = generate(GenerateOptions(lora=str(folder), lora_scale=0.5, **{**SMALL_OPTS, "steps": 1}))
    assert result.lora is not None and result.lora.path == str(folder) and result.lora.scale == 0.5
    assert result.lora.trained_for["num_frames"] == 17
    # Its record says --model tiny (this run: tiny-random, whose layer sizes it has, so it loads);
    # 9 frames of 48x32 here, 17 frames of 48x48 in training; the pattern matches.
    model, size = result.lora.warnings
    assert model.startswith("the LoRA was trained on --model tiny (this run: tiny-random)")
    assert "frames 17 (this run: 9)" in size and "height 48 (this run: 32)" in size
    assert any("--lora" in str(w.message) for w in recwarn.list)  # said before the work, too
    text = format_summary(result)
    assert f"lora       {folder} (scale 0.5); trained for 17 frames of 48x48, pattern radial, on tiny" in text
    assert "warning    the LoRA was trained for" in text
    data = result.to_json()["lora"]
    assert data["path"] == str(folder) and data["trained_for"]["width"] == 48 and len(data["warnings"]) == 2


def test_lora_without_vidsparse_json_says_so(tiny_lora, tmp_path):
    import shutil

    _, path = tiny_lora
    shutil.copy(path, tmp_path / "style.safetensors")
    result = generate(GenerateOptions(lora=str(tmp_path / "style.safetensors"), **{**SMALL_OPTS, "steps": 1}))
    assert result.lora.trained_for is None and result.lora.warnings == ()
    assert "no vidsparse_lora.json" in result.lora.describe()


# -- item 6: one spelling per meaning; item 7: --help shows what runs ---------------------------


def _parser(command: str):
    parser, subs = cli.build_parser(command)
    cli._load(command).add_arguments(subs[command])
    return parser


def _sub(command: str):
    parser, subs = cli.build_parser(command)
    cli._load(command).add_arguments(subs[command])
    return subs[command]


def test_block_size_means_the_kernel_block_and_pattern_block_size_radials_everywhere(capsys):
    common = ["--model", "tiny-random", "--data-dir", "d", "--output-dir", "o"]
    for command, extra in (("generate", []), ("inspect", ["--pattern", "radial"]), ("train-lora", common)):
        args = _parser(command).parse_args([command, *extra, "--pattern-block-size", "64"])
        assert pattern_flags.pattern_options_from_args(args)[1] == {"block_size": 64}, command
    gen = _parser("generate").parse_args(["generate", "--block-size", "32"])
    assert gen.block_size == 32 and pattern_flags.pattern_options_from_args(gen)[1] == {}
    # train-lora's old spelling still works, with a warning naming the new one.
    old = _parser("train-lora").parse_args(["train-lora", *common, "--block-size", "64"])
    assert pattern_flags.pattern_options_from_args(old)[1] == {"block_size": 64}
    assert "--pattern-block-size" in capsys.readouterr().err


def test_generate_help_shows_the_family_defaults_and_choices():
    from vidsparse.families import get_family
    from vidsparse.layout import VideoLayout, auto_block_size

    wan = get_family("wan")
    layout = VideoLayout(*wan.geometry.latent_grid(*wan.geometry.default_video))
    runs = wan.pattern_options("radial", layout, auto_block_size(layout))
    help_text = " ".join(_sub("generate").format_help().split())
    decay = help_text.split("--decay-factor DECAY_FACTOR")[-1].split(" --", 1)[0]  # the option, not the usage
    assert f"wan {runs['decay_factor']}" in decay  # 0.2, not only the class default 1.0
    sink = help_text.split("--sink, --no-sink", 1)[1].split(" --", 1)[0]
    assert f"wan {runs['sink']}" in sink
    for flag, choices in (
        ("--granularity GRANULARITY", "token|tile"),
        ("--scope SCOPE", "query|head"),
        ("--select-mode SELECT_MODE", "threshold|topk"),
    ):
        assert choices in help_text.split(flag)[-1].split(" --", 1)[0], flag


def test_inspect_help_shows_no_family_defaults():
    """inspect builds patterns with the class defaults: its help must not claim family values run."""
    help_text = " ".join(_sub("inspect").format_help().split())
    assert "family defaults" not in help_text and "radial: float, default 1.0" in help_text
    assert "family defaults" in " ".join(_sub("train-lora").format_help().split())


def test_every_train_lora_flag_has_help():
    sub = _sub("train-lora")
    missing = [a.option_strings[0] for a in sub._actions if a.option_strings and not a.help]
    assert missing == []


def test_choice_values_are_enforced():
    args = _parser("generate").parse_args(["generate", "--pattern", "vmoba", "--granularity", "tiles"])
    with pytest.raises(cli.UserError, match="token|tile"):
        pattern_flags.pattern_options_from_args(args)


# -- item 12: a hub id that cannot be reached --------------------------------------------------


@pytest.mark.parametrize("mode", ["offline", "unreachable"])
def test_uncached_hub_model_is_one_line_with_how_to_get_it(mode, monkeypatch, capsys):
    from huggingface_hub import constants

    import vidsparse.generation.model as model

    if mode == "offline":
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    else:
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # discard port: refused at once
        calls = []
        real = model._hub_reachable
        monkeypatch.setattr(model, "_hub_reachable", lambda *a: calls.append(1) or real(*a))
    assert main(["generate", "--model", "vidsparse-tests/no-such-model-0000", "--out", "/tmp/x.mp4"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "not in the local Hugging Face cache" in err and "hf download vidsparse-tests/no-such-model-0000" in err
    assert "huggingface-cli" not in err
    if mode == "unreachable":
        assert calls == [1] and "127.0.0.1:9" in err


# -- item 13: train-lora with a bad --data-dir --------------------------------------------------


@pytest.mark.parametrize("kind", ["missing", "empty"])
def test_train_lora_bad_data_dir_creates_nothing(kind, tmp_path, capsys):
    data = tmp_path / "data"
    if kind == "empty":
        data.mkdir()
    out = tmp_path / "runs" / "x"
    argv = ["train-lora", "--model", "tiny-random", "--data-dir", str(data), "--output-dir", str(out), "--no-progress"]
    assert main(argv) == 2
    assert "Traceback" not in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()
    assert sorted(os.listdir(tmp_path)) == ([] if kind == "missing" else ["data"])
    if kind == "empty":
        assert os.listdir(data) == []


def test_float16_on_cpu_is_not_moved_to_where_it_is(capfd):
    """A CPU run leaves the pipeline where it was loaded: diffusers' pipe.to("cpu") of a float16
    pipeline logs a 'cannot run with cpu' line per module (it runs fine)."""
    import torch

    from vidsparse.generation import place_pipeline

    result = generate(GenerateOptions(model="tiny", dtype="float16", steps=2, out=None, progress=False))
    assert result.frames.shape[0] == 17
    err = capfd.readouterr().err
    assert "cannot run with `cpu`" not in err, err
    pipe = torch.nn.Module()  # place_pipeline moves what is elsewhere (here: a module on "meta")
    pipe.components = {"m": torch.nn.Linear(2, 2, device="meta")}
    moved = []
    pipe.to = lambda device: moved.append(torch.device(device))
    place_pipeline(pipe, "cpu")
    assert moved == [torch.device("cpu")]
    pipe.components = {"m": torch.nn.Linear(2, 2)}
    place_pipeline(pipe, "cpu")
    assert moved == [torch.device("cpu")]
