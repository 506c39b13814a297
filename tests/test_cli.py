"""The command line: shell behaviour, pattern flags, and `vidsparse generate` end to end on the tiny model."""

import argparse
import dataclasses
import os
import subprocess
import sys

import imageio.v2 as imageio
import numpy as np
import pytest
import torch
from bench_scripts import load_script

from vidsparse import PATTERNS, cli, pattern_flags, video_io
from vidsparse.cli import main
from vidsparse.generation import GenerateOptions, generate, resolve_model
from vidsparse.pattern_flags import add_pattern_arguments, pattern_field_specs, pattern_from_args

# Small and fast: 9 frames of 32x48 -> latent token grid 3x2x3 on the tiny Wan pipeline.
SMALL = ["--model", "tiny-random", "--frames", "9", "--height", "32", "--width", "48", "--steps", "2", "--no-progress"]
SMALL_OPTS = dict(model="tiny-random", frames=9, height=32, width=48, steps=2, progress=False)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env():
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=ROOT)
    return env


def _read(path) -> np.ndarray:
    return np.stack(imageio.mimread(path))


# -- shell ------------------------------------------------------------------------------------


def test_top_level_help_lists_commands(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in cli.COMMANDS:
        assert name in out


def test_missing_subcommand_module_does_not_break_others(monkeypatch, capsys):
    monkeypatch.setitem(cli.COMMANDS, "ghost", "vidsparse.no_such_module_here")
    assert main(["--help"]) == 0
    assert "unavailable" in capsys.readouterr().out
    assert main(["ghost"]) == 2
    err = capsys.readouterr().err
    assert "ghost" in err and "vidsparse.no_such_module_here" in err and "Traceback" not in err
    assert main(["inspect", "--help"]) == 0


def _full_parser(command: str) -> argparse.ArgumentParser:
    parser, subs = cli.build_parser(command)
    cli._load(command).add_arguments(subs[command])
    return subs[command]


@pytest.mark.parametrize("command", ["generate", "inspect"])
def test_help_documents_every_flag(command, capsys):
    sub = _full_parser(command)
    text = sub.format_help()
    flags = [a for a in sub._actions if a.option_strings]
    assert len(flags) > 15
    for action in flags:
        assert action.help and action.help != argparse.SUPPRESS and len(action.help) > 8, action.option_strings
        for opt in action.option_strings:
            assert opt in text, opt
    assert main([command, "--help"]) == 0
    assert "--pattern" in capsys.readouterr().out


def test_user_errors_exit_2_without_traceback_and_debug_shows_it(capsys):
    assert main(["generate", *SMALL, "--frames", "10"]) == 2
    err = capsys.readouterr().err
    assert "nearest valid: 9 or 13" in err and "Traceback" not in err
    assert main(["--debug", "generate", *SMALL, "--frames", "10"]) == 2
    assert "Traceback" in capsys.readouterr().err


# -- pattern flags ------------------------------------------------------------------------------


def _cli_value(value) -> str:
    if isinstance(value, tuple):
        return ",".join(_cli_value(v) for v in value)
    if isinstance(value, bool):
        return "true" if value else "false"
    return "none" if value is None else str(value)


def test_every_registered_pattern_round_trips_through_its_flags():
    parser = argparse.ArgumentParser()
    add_pattern_arguments(parser)
    flags = parser.get_default("_pattern_flags")
    for name, cls in PATTERNS.items():
        specs = pattern_field_specs(cls)
        init_fields = [f.name for f in dataclasses.fields(cls) if f.init and not f.name.startswith("_")]
        assert sorted(specs) == sorted(init_fields), f"{name}: fields without a command-line form"
        default = cls()
        argv = ["--pattern", name]
        for field, spec in specs.items():
            value = getattr(default, field)
            if spec.kind == "bool":
                argv.append(flags[field] if value else "--no-" + flags[field][2:])
            else:
                argv += [flags[field], _cli_value(value)]
        assert pattern_from_args(parser.parse_args(argv)) == default, name


def test_pattern_flags_parse_types_and_reject_foreign_options():
    parser = argparse.ArgumentParser()
    parser.add_argument("--block-size", type=int)
    add_pattern_arguments(parser)
    args = parser.parse_args(["--pattern", "radial", "--decay-factor", "0.2", "--sink", "--pattern-block-size", "64"])
    assert pattern_from_args(args) == PATTERNS["radial"](decay_factor=0.2, block_size=64, sink=True)
    assert args.block_size is None  # the command's own --block-size stays separate
    with pytest.raises(cli.UserError, match="does not apply to --pattern dense"):
        pattern_from_args(parser.parse_args(["--pattern", "dense", "--decay-factor", "0.2"]))
    with pytest.raises(cli.UserError, match="not valid for --pattern radial"):
        pattern_from_args(parser.parse_args(["--pattern", "radial", "--decay-factor", "fast"]))
    with pytest.raises(cli.UserError, match="Unknown --pattern"):
        pattern_from_args(parser.parse_args(["--pattern", "nope"]))


def test_field_spec_parsing():
    spec = pattern_flags.FieldSpec("p", "tile", "int_or_ints", (2, 8, 8))
    assert spec.parse("4,4,8", "--tile") == (4, 4, 8)
    assert spec.parse("4x4x8", "--tile") == (4, 4, 8)
    assert spec.parse("3", "--tile") == 3
    with pytest.raises(cli.UserError):
        spec.parse("4,x", "--tile")
    flags = pattern_flags.FieldSpec("p", "is_causal", "bool_or_bools", False)
    assert flags.parse("true", "--is-causal") is True
    assert flags.parse("1,0,0", "--is-causal") == (True, False, False)
    opt = pattern_flags.FieldSpec("p", "tile", "ints", None, optional=True)
    assert opt.parse("none", "--tile") is None


# -- generate -----------------------------------------------------------------------------------


@pytest.mark.slow
def test_generate_subprocess_end_to_end(tmp_path):
    out = tmp_path / "clip.mp4"
    cmd = [sys.executable, "-m", "vidsparse", "generate", *SMALL, "--prompt", "a red ball", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "wrote" in proc.stdout and "s/step" in proc.stdout and "density" in proc.stdout
    video = _read(out)
    assert video.shape == (9, 32, 48, 3)
    assert sorted(os.listdir(tmp_path)) == ["clip.mp4"]


def test_generate_in_process_gif_and_json(tmp_path, capsys):
    out, js = tmp_path / "a" / "clip.gif", tmp_path / "summary.json"
    assert main(["generate", *SMALL, "--pattern", "tile", "--out", str(out), "--json", str(js)]) == 0
    stdout = capsys.readouterr().out
    assert "Tile(" in stdout and str(out) in stdout
    assert out.is_file()
    import json

    summary = json.loads(js.read_text())
    assert summary["grid"] == [3, 2, 3] and summary["video_shape"] == [9, 32, 48, 3]
    assert summary["steps"] == 2 and len(summary["step_times_s"]) == 2
    covered = sorted(layer for d in summary["densities"] for layer in d["layers"])
    assert covered == [0, 1]  # the tiny transformer has two layers
    # Enough to run it again: the options as given and what they resolved to.
    asked, resolved = summary["settings"]["options"], summary["settings"]["resolved"]
    assert asked["prompt"] == GenerateOptions().prompt and asked["seed"] == 0 and asked["pattern"] == "tile"
    assert asked["model"] == "tiny-random" and asked["steps"] == 2 and "progress" not in asked
    assert resolved["guidance"] == 5.0 and resolved["dtype"] == "float32" and resolved["device"] == "cpu"
    assert resolved["sparse_config"].startswith("SparseConfig(pattern='tile'")


def test_prompt_and_seed_determine_the_video():
    a = generate(GenerateOptions(prompt="a red ball", **SMALL_OPTS)).frames
    b = generate(GenerateOptions(prompt="a red ball", **SMALL_OPTS)).frames
    c = generate(GenerateOptions(prompt="a blue cube", **SMALL_OPTS)).frames
    d = generate(GenerateOptions(prompt="a red ball", seed=1, **SMALL_OPTS)).frames
    assert a.dtype == np.uint8 and a.shape == (9, 32, 48, 3)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)
    assert not np.array_equal(a, d)


def test_compare_dense_reports_speedup_and_psnr():
    from vidsparse.generation import format_summary

    result = generate(GenerateOptions(compare_dense=True, dense_first_steps=1, **{**SMALL_OPTS, "steps": 3}))
    assert result.dense is not None and result.dense.speedup > 0
    assert result.dense.speedup == pytest.approx(result.dense.denoise_s / result.denoise_s)
    assert result.dense.frames.shape == result.frames.shape
    assert result.dense.psnr_db == pytest.approx(video_io.psnr(result.frames, result.dense.frames))
    assert result.sparse_steps == 2  # 3 steps, the first one dense
    summary = format_summary(result)
    assert "PSNR sparse vs dense" in summary and "speedup" in summary


def test_dense_pattern_runs_the_model_unpatched():
    result = generate(GenerateOptions(pattern="dense", **{**SMALL_OPTS, "steps": 1}))
    assert result.pattern == "dense" and result.kept_blocks == 1.0 and result.sparse_steps == 0


def test_dense_schedule_flags_reach_the_config():
    result = generate(GenerateOptions(dense_first_steps=0, dense_layers=(1,), **SMALL_OPTS))
    assert result.sparse_steps == 2  # no dense warm-up step
    assert [d.pattern == "dense" for d in result.densities] == [False, True]  # layer 0 sparse, layer 1 dense
    assert result.densities[0].layers == (0,) and 0 < result.kept_blocks < 1


@pytest.mark.parametrize("error", [RuntimeError("encoder crashed"), KeyboardInterrupt()])
def test_failure_while_writing_leaves_old_file_untouched(tmp_path, monkeypatch, capsys, error):
    out = tmp_path / "v.mp4"
    out.write_bytes(b"yesterday's video")

    def broken(tmp, video, fps, quality):
        with open(tmp, "wb") as fh:
            fh.write(b"\x00" * 100)
        raise error

    monkeypatch.setattr(video_io, "_write_mp4", broken)
    rc = main(["generate", *SMALL, "--steps", "1", "--out", str(out)]) if isinstance(error, KeyboardInterrupt) else None
    if rc is None:
        with pytest.raises(RuntimeError, match="encoder crashed"):
            generate(GenerateOptions(out=str(out), **{**SMALL_OPTS, "steps": 1}))
    else:
        assert rc == 130
        assert "interrupted" in capsys.readouterr().err
    assert out.read_bytes() == b"yesterday's video"
    assert os.listdir(tmp_path) == ["v.mp4"]


def test_interrupt_during_denoising_writes_nothing(tmp_path, monkeypatch):
    import vidsparse.generation.call as gen

    original = gen.StepClock.callback

    def interrupt(self, pipe, step, timestep, kwargs):
        original(self, pipe, step, timestep, kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(gen.StepClock, "callback", interrupt)
    assert main(["generate", *SMALL, "--out", str(tmp_path / "v.mp4")]) == 130
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--frames", "10"], "nearest valid: 9 or 13"),
        (["--height", "40"], "height=40: must be a multiple of 16 (8x VAE x 2 patch); nearest valid: 32 or 48"),
        (["--width", "8"], "nearest valid: 16"),
        (["--model", "./no/such/folder"], "no such folder"),
        (["--out", "video.avi"], ".mp4 or .gif"),
        (["--json", "."], "--json '.' is a directory; give a file name inside it"),
        (["--lora", "missing.safetensors"], "no such file"),
        (["--pattern", "tile", "--decay-factor", "0.5"], "does not apply to --pattern tile"),
        (["--dense-first-steps", "1.5"], "fraction must be below 1"),
        (["--device", "cuda:7"], "cuda"),
        # under the interpreter (how tests run) CPU float32 is fine, bf16 is not
        (["--backend", "triton", "--dtype", "bf16"], "--backend triton cannot run on cpu (bfloat16)"),
    ],
)
def test_bad_input_is_a_clear_error_before_loading(argv, message, tmp_path, monkeypatch, capsys):
    import vidsparse.generation.run as gen

    def no_loading(*args, **kwargs):
        raise AssertionError("the model must not be loaded for invalid input")

    monkeypatch.setattr(gen, "load_pipeline", no_loading)
    monkeypatch.chdir(tmp_path)
    assert main(["generate", *SMALL, *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_model_folder_without_model_index(tmp_path):
    with pytest.raises(ValueError, match="no model_index.json"):
        resolve_model(str(tmp_path))


def test_local_pipeline_folder_is_resolved_from_its_configs(tmp_path):
    import json

    (tmp_path / "transformer").mkdir()
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "CogVideoXPipeline"}))
    (tmp_path / "transformer" / "config.json").write_text(json.dumps({"patch_size": 2, "patch_size_t": 2}))
    info = resolve_model(str(tmp_path))
    assert info.family == "cogvideox1.5" and info.grid.patch == (2, 2, 2)
    assert info.grid.latent_grid(81, 768, 1360) == (11, 48, 85)
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    with pytest.raises(ValueError, match="StableDiffusionPipeline"):
        resolve_model(str(tmp_path))


def test_local_pipeline_folder_loads_with_from_pretrained(tmp_path):
    from vidsparse.models.tiny import build_tiny_pipeline

    build_tiny_pipeline().save_pretrained(tmp_path / "pipe")  # no text encoder: saved as [null, null]
    info = resolve_model(str(tmp_path / "pipe"))
    assert info.kind == "local" and info.family == "wan" and set(info.absent_components) >= {"text_encoder"}
    local = generate(GenerateOptions(**{**SMALL_OPTS, "model": str(tmp_path / "pipe")}))
    assert np.array_equal(local.frames, generate(GenerateOptions(**SMALL_OPTS)).frames)


def test_unreachable_hub_id_is_a_clear_error(tmp_path):
    cmd = [sys.executable, "-m", "vidsparse", "generate", "--model", "no-such-org/no-such-model", "--out", "x.mp4"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), cwd=tmp_path, timeout=120)
    assert proc.returncode == 2
    assert "no-such-org/no-such-model" in proc.stderr and "Traceback" not in proc.stderr
    assert os.listdir(tmp_path) == []


def test_lora_is_loaded_and_a_mismatched_one_is_refused(tmp_path, capsys):
    from diffusers import WanPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    from vidsparse.models.tiny import build_tiny_pipeline

    transformer = build_tiny_pipeline().transformer
    torch.manual_seed(1)
    transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_v"], init_lora_weights=False))
    WanPipeline.save_lora_weights(tmp_path / "lora", transformer_lora_layers=get_peft_model_state_dict(transformer))
    good = tmp_path / "lora" / "pytorch_lora_weights.safetensors"
    base = generate(GenerateOptions(**SMALL_OPTS)).frames
    with_lora = generate(GenerateOptions(lora=str(good), **SMALL_OPTS)).frames
    assert not np.array_equal(base, with_lora)

    bad = tmp_path / "other.safetensors"
    save_file(
        {
            "transformer.blocks.0.attn1.to_q.lora_A.weight": torch.zeros(4, 999),
            "transformer.blocks.0.attn1.to_q.lora_B.weight": torch.zeros(16, 4),
        },
        str(bad),
    )
    assert main(["generate", *SMALL, "--lora", str(bad), "--out", str(tmp_path / "v.mp4")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    # Refused from the file's header before diffusers' loader, which would log a size error per layer first.
    assert len(err) == 1, err
    assert err[0].startswith("vidsparse generate: error: --lora") and "other layer sizes" in err[0]
    assert "lora_A.weight is [4, 999]" in err[0] and "to_q has 16" in err[0]
    assert not (tmp_path / "v.mp4").exists()


def test_parallel_without_implementation_or_bad_mode(monkeypatch, capsys):
    import types

    monkeypatch.setitem(sys.modules, "vidsparse.parallel", types.ModuleType("vidsparse.parallel"))
    assert main(["generate", *SMALL, "--parallel", "clip"]) == 2
    assert "--parallel clip" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--parallel"):
        generate(GenerateOptions(parallel="ring", **SMALL_OPTS))


def test_parallel_mode_is_handed_to_vidsparse_parallel(monkeypatch):
    import types

    seen = []
    fake = types.ModuleType("vidsparse.parallel")
    fake.generate_parallel = lambda options: seen.append(options) or "done"
    monkeypatch.setitem(sys.modules, "vidsparse.parallel", fake)
    options = GenerateOptions(parallel="ulysses", **SMALL_OPTS)
    assert generate(options) == "done" and seen == [options]
    # handed over before any check: generate_parallel validates on every rank; flags pass through
    assert generate(GenerateOptions(parallel="clip", steps=0)) == "done"
    from vidsparse.generate_cli import options_from_args

    args = _full_parser("generate").parse_args(
        [*SMALL, "--parallel", "clip", "--vae-overlap", "all", "--dist-timeout", "90"]
    )
    assert generate(options_from_args(args)) == "done"
    assert (seen[-1].vae_overlap, seen[-1].dist_timeout) == ("all", 90.0)


def test_parallel_only_flags(capsys):
    for argv, match in (
        (["--vae-overlap", "2"], "--vae-overlap applies to --parallel clip or ulysses"),
        (["--parallel", "clip", "--vae-overlap", "0"], "--vae-overlap expects"),
        (["--parallel", "clip", "--dist-timeout", "soon"], "--dist-timeout expects a number of seconds"),
    ):
        assert main(["generate", *SMALL, *argv]) == 2
        assert match in capsys.readouterr().err


# -- transformer benchmark ------------------------------------------------------------------------


def test_transformer_benchmark_quick_smoke(tmp_path, capsys):
    import json

    bench = load_script("transformer")
    argv = ["--quick", "--models", "wan-tiny", "--patterns", "radial,vmoba", "--repeats", "1", "--warmup", "0"]
    assert bench.main([*argv, "--out-dir", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("transformer_*.json")
    rep = json.loads(path.read_text())
    assert rep["schema"] == "vidsparse.bench.transformer/1" and rep["quick"] is True
    assert rep["git_commit"] and rep["torch"] == torch.__version__
    rows = {r["pattern"]: r for r in rep["results"]}
    assert set(rows) == {"dense", "radial", "vmoba"}
    assert all(r["error"] is None and r["forward_ms"] > 0 for r in rows.values())
    assert rows["radial"]["dense_layers"] == [0]  # Wan's Radial default keeps layer 0 dense
    assert 0 < rows["radial"]["block_density"] < 1 and rows["dense"]["speedup"] == 1.0
    assert "Radial(" in rows["radial"]["resolved"]
    assert (tmp_path / path.name.replace(".json", ".md")).read_text().startswith("# vidsparse transformer benchmark")


def test_backend_check_before_loading_names_the_reason_and_the_fix():
    from vidsparse.generation.options import prepare

    plan = prepare(GenerateOptions(backend="torch", dtype="bfloat16", **SMALL_OPTS))
    assert plan.sparse_config.backend == "torch"
    with pytest.raises(ValueError, match=r"Unknown --backend 'tritn'\. Expected one of: auto, torch, flex, triton"):
        prepare(GenerateOptions(backend="tritn", **SMALL_OPTS))
    # Without the interpreter, CPU tensors are refused (a fresh process: the flag is read at import).
    code = (
        "import torch\nfrom vidsparse.kernels.backends import get_backend\n"
        "print(get_backend('triton').can_run_on(torch.device('cpu'), torch.float32))\n"
        "print(get_backend('torch').can_run_on(torch.device('cpu'), torch.bfloat16))"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    lines = out.stdout.strip().splitlines()
    assert lines[0].startswith("CPU tensors run only in Triton's interpreter: set TRITON_INTERPRET=1"), out.stderr
    assert lines[1] == "None"


def test_transformer_benchmark_refuses_without_cuda(capsys):
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present: the refusal path does not apply")
    assert load_script("transformer").main(["--models", "wan-1.3b"]) == 2
    assert "--quick" in capsys.readouterr().err


@pytest.mark.parametrize(
    "error,says",
    [
        (
            OSError(28, "No space left on device", "out/v.mp4"),
            "no space left on device writing out/v.mp4. Nothing partial",
        ),
        (OSError(122, "Disk quota exceeded", "out/v.gif"), "disk quota exceeded writing out/v.gif"),
        (MemoryError(), "out of memory (MemoryError). Try fewer frames"),
        (
            RuntimeError(
                "[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory: you tried to "
                "allocate 16515334144 bytes"
            ),
            "out of memory ([enforce fail at alloc_cpu.cpp:127]",
        ),
        (RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB"), "out of memory (CUDA out of memory"),
    ],
)
def test_a_full_disk_or_exhausted_memory_is_one_line_and_status_1(monkeypatch, capsys, error, says):
    from vidsparse import generate_cli

    def run(args):
        raise error

    monkeypatch.setattr(generate_cli, "run", run)
    assert main(["generate", *SMALL]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("vidsparse generate: error: ") and says in err[0], err


def test_any_other_runtime_error_keeps_its_traceback(monkeypatch):
    from vidsparse import generate_cli

    monkeypatch.setattr(generate_cli, "run", lambda args: (_ for _ in ()).throw(RuntimeError("a bug")))
    with pytest.raises(RuntimeError, match="a bug"):
        main(["generate", *SMALL])


@pytest.mark.parametrize(
    "model,hint",
    [("tiny-hunyan", "Did you mean 'tiny-hunyuan'?"), ("Tiny", "Did you mean 'tiny'?"),
     ("TINY-RANDOM", "Did you mean 'tiny-random'?"), ("tiny-nothing-like-it", None)],
)  # fmt: skip
def test_a_near_miss_of_a_tiny_model_name_gets_a_suggestion(capsys, tmp_path, model, hint):
    assert main(["generate", "--model", model, "--out", str(tmp_path / "v.mp4")]) == 2
    err = capsys.readouterr().err
    assert (hint in err) if hint else ("Did you mean" not in err), err
    assert not list(tmp_path.iterdir())


def test_a_training_checkpoint_given_as_lora_points_at_the_exported_file(tmp_path, capsys):
    from safetensors.torch import save_file

    run = tmp_path / "run"
    folder = run / "checkpoint-00000006"
    folder.mkdir(parents=True)
    save_file({"blocks.0.attn1.to_q.lora_A.weight": torch.zeros(4, 16)}, str(folder / "lora.safetensors"))
    (folder / "state.json").write_text('{"step": 6}')
    for given in (folder, folder / "lora.safetensors"):
        assert main(["generate", *SMALL, "--lora", str(given), "--out", str(tmp_path / "v.mp4")]) == 2
        err = capsys.readouterr().err
        assert "is a train-lora checkpoint (training state for --resume), not a LoRA" in err
        assert "finish the run with train-lora's --resume" in err  # nothing exported yet
    save_file({"transformer.blocks.0.attn1.to_q.lora_A.weight": torch.zeros(4, 16)},
              str(run / "pytorch_lora_weights.safetensors"))  # fmt: skip
    assert main(["generate", *SMALL, "--lora", str(folder), "--out", str(tmp_path / "v.mp4")]) == 2
    assert f"pass the run's exported LoRA, '{run / 'pytorch_lora_weights.safetensors'}'" in capsys.readouterr().err
    assert not (tmp_path / "v.mp4").exists()
