"""Generate a video with a diffusers pipeline whose self-attention runs a sparse pattern.

--model is a diffusers pipeline (hub id or local folder) or "tiny", an embedded small Wan
pipeline trained on a synthetic world of coloured shapes (docs/tiny_model.md; no download), or
"tiny-random", the random-init one (its prompt is embedded by hashing the text). The pattern is applied with vidsparse.apply: a pattern given
by name gets the model family's defaults, which the pattern flags below override. Sizes, paths
and options are checked before any model is loaded. The summary reports the time from process
start (start-up, loading, denoising with time per step, VAE decode, writing), the LoRA if any,
attention density per layer group and, with --compare-dense, the dense run's time, the
speedup and the PSNR between the two videos. The video file appears only once complete.

Examples:
  vidsparse generate --model tiny --prompt "a red ball bouncing" --out outputs/tiny.mp4
  vidsparse generate --model Wan-AI/Wan2.1-T2V-1.3B-Diffusers --pattern radial \\
      --prompt "a cat surfing" --frames 81 --height 480 --width 832 --out cat.mp4 --compare-dense
  vidsparse generate --model tiny-wan-animate --image character.png --pose-video pose.mp4 \\
      --face-video face.mp4 --out animated.mp4   # as long as pose.mp4, in segments of --frames
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
from pathlib import Path

from vidsparse.cli import flags_given, seconds_since_process_start
from vidsparse.errors import UserError
from vidsparse.freeswim.cli_args import add_freeswim_arguments, freeswim_settings_from_args
from vidsparse.freeswim.config import PATTERN_REFUSAL
from vidsparse.generation import PARALLEL_MODES, TINY, GenerateOptions, format_summary, generate, tiny_models
from vidsparse.kernels.backends import backend_choices
from vidsparse.pattern_flags import add_pattern_arguments, parse_dense_layers, pattern_options_from_args

#: --pattern's default.
DEFAULT_PATTERN = "radial"


class _DefaultPattern(str):
    """--pattern's default as the parser stores it when the flag is absent. argparse keeps no record
    of which flags were given, and ``flags_given`` compares values, so it cannot tell an explicit
    ``--pattern radial`` (stored as a plain str) from none; this type can (``pattern_given``)."""


def pattern_given(args: argparse.Namespace) -> bool:
    """Whether --pattern was on the command line, even with its default value."""
    return not isinstance(getattr(args, "pattern", None), _DefaultPattern)


def _parse_vae_overlap(text: str) -> int | str:
    if text.strip().lower() == "all":
        return "all"
    if not re.fullmatch(r"\s*\d+\s*", text) or int(text) < 1:
        raise UserError(
            f"--vae-overlap expects latent frames of context (an integer >= 1, e.g. 4) or 'all' (exact), got {text!r}."
        )
    return int(text)


def _float(text: str) -> float:
    """``float(text)``, NaN when it is not a number (the callers' range checks then reject it)."""
    try:
        return float(text)
    except ValueError:
        return float("nan")


def _parse_timeout(text: str) -> float:
    value = _float(text)
    if not math.isfinite(value) or value <= 0:
        raise UserError(f"--dist-timeout expects a number of seconds > 0 (e.g. 600), got {text!r}.")
    return value


def _parse_steps(text: str, flag: str) -> int | float:
    value = _float(text)
    if not math.isfinite(value) or value < 0:
        raise UserError(f"{flag} expects a step count (e.g. 2) or a fraction of the steps (e.g. 0.25), got {text!r}.")
    if value.is_integer() and "." not in text:
        return int(value)
    if value >= 1:
        raise UserError(f"{flag} {text}: a fraction must be below 1 (e.g. 0.25); pass a whole number for a step count.")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    model = parser.add_argument_group("model and prompt")
    model.add_argument(
        "--model",
        default=TINY,
        help="diffusers pipeline: hub id (e.g. Wan-AI/Wan2.1-T2V-1.3B-Diffusers), local folder, or 'tiny' "
        "(embedded small Wan pipeline trained on a synthetic world of coloured shapes, no download; default) "
        "or an embedded random-init pipeline: " + ", ".join(tiny_models()[1:]),
    )
    model.add_argument(
        "--prompt", default=GenerateOptions.prompt, help=f"text prompt (default {GenerateOptions.prompt!r})"
    )
    model.add_argument(
        "--negative-prompt", default="", help="negative prompt for classifier-free guidance (default empty)"
    )
    model.add_argument(
        "--lora", default=None, metavar="PATH", help="diffusers-format LoRA .safetensors (or its folder) to load"
    )
    model.add_argument("--lora-scale", type=float, default=1.0, help="strength of --lora (default 1.0)")
    model.add_argument(
        "--image", default=None, metavar="PATH",
        help="first frame of an image-to-video pipeline (e.g. Wan I2V, tiny-wan-i2v), the character of Wan-Animate; "
             "refused for text-to-video",
    )  # fmt: skip
    model.add_argument(
        "--condition-video", default=None, metavar="PATH",
        help="a video that starts the clip (extend a video): LTXConditionPipeline (e.g. tiny-ltx-condition) takes "
             "its first 8k + 1 frames, Cosmos-Predict2 video2world all of them, Cosmos-Predict2.5 (tiny-cosmos) its "
             "last 5 (or last 1 if shorter); refused for other pipelines (default: none)",
    )  # fmt: skip
    animate = parser.add_argument_group(
        "Wan-Animate (WanAnimatePipeline, e.g. tiny-wan-animate; --image is the character to animate)"
    )
    animate.add_argument(
        "--pose-video", default=None, metavar="PATH",
        help="the driving pose video (skeleton renders; required for Wan-Animate, refused for other pipelines): "
             "the output has its frame count, generated in segments of --frames",
    )  # fmt: skip
    animate.add_argument(
        "--face-video", default=None, metavar="PATH",
        help="the driving face crops, frame-aligned with --pose-video (required for Wan-Animate; resized to the "
             "motion encoder's size)",
    )  # fmt: skip
    animate.add_argument(
        "--animate-mode", default=None, choices=("animate", "replace"),
        help="animate: the --image character performs the motion (default, the pipeline's); replace: it replaces "
             "the person of --background-video where --mask-video is white",
    )  # fmt: skip
    animate.add_argument(
        "--background-video", default=None, metavar="PATH",
        help="--animate-mode replace: the video whose person is replaced (required there, refused otherwise)",
    )  # fmt: skip
    animate.add_argument(
        "--mask-video", default=None, metavar="PATH",
        help="--animate-mode replace: white where the character goes, black where the background stays "
             "(required there, refused otherwise)",
    )  # fmt: skip
    from vidsparse.generation.model import TINY_DEFAULTS
    from vidsparse.models.tiny_trained import TRAINED_DEFAULTS

    def tiny(key: str) -> str:  # the defaults of the two embedded models, from their one home
        return f"tiny {TRAINED_DEFAULTS[key]:g}, tiny-random {TINY_DEFAULTS[key]:g}"

    video = parser.add_argument_group("video")
    video.add_argument(
        "--frames", type=int, default=None,
        help=f"number of frames (default: the pipeline's; {tiny('frames')}). Wan-Animate: the frames of one segment "
             "(segment_frame_length, 4k + 1; default 77, tiny 9): the video is as long as --pose-video, denoised "
             "segment by segment, each starting from the last frame of the one before",
    )  # fmt: skip
    video.add_argument(
        "--height", type=int, default=None, help=f"height in pixels (default: the pipeline's; {tiny('height')})"
    )
    video.add_argument(
        "--width", type=int, default=None, help=f"width in pixels (default: the pipeline's; {tiny('width')})"
    )
    video.add_argument(
        "--steps", type=int, default=None, help=f"denoising steps (default: the pipeline's; {tiny('steps')})"
    )
    video.add_argument(
        "--guidance",
        type=float,
        default=None,
        help=f"classifier-free guidance scale (default: the pipeline's; {tiny('guidance')})",
    )
    video.add_argument(
        "--seed", type=int, default=0, help="random seed; same seed and prompt give the same video (default 0)"
    )
    video.add_argument(
        "--fps",
        type=int,
        default=None,
        help="frame rate of the written video (default: the family's, Wan 16; Wan-Animate: the pose video's)",
    )
    video.add_argument(
        "--out",
        default="outputs/video.mp4",
        help="output video, .mp4 or .gif; written only once complete (default outputs/video.mp4)",
    )
    run_group = parser.add_argument_group("execution")
    run_group.add_argument(
        "--device", default="auto", help="torch device: auto (cuda if available), cpu, cuda, cuda:N (default auto)"
    )
    run_group.add_argument(
        "--dtype",
        default="auto",
        choices=("auto", "float32", "float16", "bfloat16", "fp32", "fp16", "bf16"),
        help="weights and activations dtype (default auto: bfloat16 on CUDA, float32 on CPU)",
    )
    run_group.add_argument(
        "--cpu-offload",
        action="store_true",
        help="keep models on the CPU and move each to the GPU when used (saves memory)",
    )
    run_group.add_argument(
        "--compile", action="store_true", help="torch.compile the transformer blocks (slow first step)"
    )
    run_group.add_argument(
        "--backend",
        default="auto",
        choices=backend_choices(),
        help="sparse attention kernel: auto (triton on CUDA, torch on CPU), torch, flex or triton (default auto)",
    )
    run_group.add_argument(
        "--block-size",
        type=int,
        default=None,
        metavar="N",
        help="kernel block size in tokens, a power of two (default: the backend's, smaller for tiny frames)",
    )
    run_group.add_argument(
        "--parallel",
        default="none",
        choices=PARALLEL_MODES,
        help="multi-GPU mode: none, clip (Video-Infinity clip parallelism) or ulysses (sequence parallel heads) "
        "(default none)",
    )
    run_group.add_argument(
        "--vae-overlap",
        default=None,
        metavar="N|all",
        help="--parallel: latent frames of context each rank decodes before its clip, or 'all' (from frame 0, "
        "exact, slower); default: $VIDSPARSE_VAE_OVERLAP, else 4",
    )
    run_group.add_argument(
        "--dist-timeout",
        default=None,
        metavar="SECONDS",
        help="--parallel: seconds a collective may wait for the other ranks before every rank stops with an error; "
        "default: $VIDSPARSE_DIST_TIMEOUT, else 600",
    )
    schedule = parser.add_argument_group("sparse schedule")
    schedule.add_argument(
        "--dense-first-steps",
        default=None,
        metavar="N|FRACTION",
        help="first steps with dense attention: a count (2) or a fraction of the steps (0.25); default: the family's "
        "(25%% for sparse patterns)",
    )
    schedule.add_argument(
        "--dense-last-steps", default=None, metavar="N|FRACTION", help="last steps with dense attention (default 0)"
    )
    schedule.add_argument(
        "--dense-layers",
        default=None,
        metavar="LAYERS",
        help="layers kept dense, e.g. 0 or 0,1 or 0-3 (negative from the end; 'none'); default: the family's "
        "(Radial on Wan: 0)",
    )
    report = parser.add_argument_group("report")
    report.add_argument(
        "--compare-dense",
        action="store_true",
        help="also run dense attention with the same seed; report its time, the speedup and the PSNR between the videos",
    )
    report.add_argument("--no-progress", action="store_true", help="hide the denoising progress bar")
    report.add_argument("--json", default=None, metavar="PATH", help="also write the summary as JSON to PATH")
    add_pattern_arguments(parser, default=DEFAULT_PATTERN, family_defaults=True)
    parser.set_defaults(pattern=_DefaultPattern(DEFAULT_PATTERN))  # the same value, marked as not given
    add_freeswim_arguments(parser)


def _freeswim_settings(args: argparse.Namespace) -> dict | None:
    """--freeswim and its flags -> GenerateOptions.freeswim (the FreeSwimOptions fields generate does not own)."""
    if not args.freeswim:
        given = [f for f in flags_given(args, add_freeswim_arguments) if f != "--freeswim"]
        if given:
            verb = "applies" if len(given) == 1 else "apply"
            raise UserError(
                f"{', '.join(given)} {verb} to --freeswim; add --freeswim or drop {'it' if len(given) == 1 else 'them'}."
            )
        return None
    try:  # generate owns the target size, frames, steps, guidance and seed
        return freeswim_settings_from_args(args)
    except ValueError as exc:
        raise UserError(str(exc)) from None


def _check_dense_schedule_flags(args: argparse.Namespace, pattern: str) -> None:
    """--dense-* flags choose where a sparse pattern runs dense, --backend / --block-size how its kernel
    runs (on one device): given with --pattern dense they would be silently ignored. (Library callers may keep them
    when swapping in dense for a baseline.)"""
    if pattern.strip().lower() != "dense":
        return
    given = [
        flag
        for flag, value in (
            ("--dense-first-steps", args.dense_first_steps),
            ("--dense-last-steps", args.dense_last_steps),
            ("--dense-layers", args.dense_layers),
        )
        if value is not None
    ]
    if given:
        raise UserError(
            f"{', '.join(given)} choose where a sparse pattern runs dense, and --pattern dense runs dense "
            "everywhere; pick a sparse --pattern or drop them."
        )
    kernel = [
        flag for flag, given in (("--backend", args.backend != "auto"), ("--block-size", args.block_size)) if given
    ]
    if kernel and args.parallel == "none":  # a parallel dense run is vidsparse's distributed Dense(): they apply
        raise UserError(
            f"{' and '.join(kernel)} choose how a sparse pattern's kernel runs, and --pattern dense runs the model's "
            "own attention; pick a sparse --pattern or drop them."
        )


def _check_freeswim_pattern(args: argparse.Namespace) -> None:
    """--freeswim runs its own attention: any --pattern but freeswim is refused, even the default
    radial when given explicitly (the library sees only the value, so the command checks the flag)."""
    if not args.freeswim or not pattern_given(args):
        return
    from vidsparse.patterns.base import normalize_pattern_name

    if normalize_pattern_name(str(args.pattern)) != "freeswim":
        raise UserError(PATTERN_REFUSAL)


def options_from_args(args: argparse.Namespace) -> GenerateOptions:
    _check_freeswim_pattern(args)
    try:
        name, pattern_options = pattern_options_from_args(args)
    except (ValueError, UserError):
        if args.freeswim:  # the option is not wrong for --pattern: no pattern option applies under --freeswim
            raise UserError(PATTERN_REFUSAL) from None
        raise
    _check_dense_schedule_flags(args, name)
    return GenerateOptions(
        model=args.model,
        prompt=args.prompt,
        negative_prompt=args.negative_prompt,
        pattern=name,
        pattern_options=pattern_options,
        frames=args.frames,
        height=args.height,
        width=args.width,
        steps=args.steps,
        guidance=args.guidance,
        seed=args.seed,
        dtype=args.dtype,
        device=args.device,
        cpu_offload=args.cpu_offload,
        compile=args.compile,
        lora=args.lora,
        lora_scale=args.lora_scale,
        image=args.image,
        condition_video=args.condition_video,
        pose_video=args.pose_video,
        face_video=args.face_video,
        animate_mode=args.animate_mode,
        background_video=args.background_video,
        mask_video=args.mask_video,
        dense_first_steps=None
        if args.dense_first_steps is None
        else _parse_steps(args.dense_first_steps, "--dense-first-steps"),
        dense_last_steps=0
        if args.dense_last_steps is None
        else _parse_steps(args.dense_last_steps, "--dense-last-steps"),
        dense_layers=None if args.dense_layers is None else parse_dense_layers(args.dense_layers),
        backend=args.backend,
        block_size=args.block_size,
        parallel=args.parallel,
        vae_overlap=None if args.vae_overlap is None else _parse_vae_overlap(args.vae_overlap),
        dist_timeout=None if args.dist_timeout is None else _parse_timeout(args.dist_timeout),
        compare_dense=args.compare_dense,
        out=args.out,
        fps=args.fps,
        progress=not args.no_progress,
        freeswim=_freeswim_settings(args),
    )


def _is_main_rank() -> bool:
    """False only on ranks other than 0 of an initialized process group (``--parallel``)."""
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def run(args: argparse.Namespace) -> int:
    options = options_from_args(args)
    if args.json:  # checked before the work, as --out is
        from vidsparse.video_io import check_output_file

        json_path = check_output_file(args.json, "--json").resolve()
        video = Path(options.out).expanduser().resolve() if options.out else None
        if video is not None and (json_path == video or json_path in video.parents):
            raise ValueError(
                f"--json {args.json!r} would overwrite the video --out {options.out!r} writes (or its folder); "
                "give the summary its own file, e.g. --json " + str(Path(options.out).with_suffix(".json")) + "."
            )
    startup_s = seconds_since_process_start()
    result = dataclasses.replace(generate(options), startup_s=startup_s)
    if not _is_main_rank():
        return 0  # --parallel: rank 0 prints the summary and writes --json
    print(format_summary(result), flush=True)
    if args.json:
        from vidsparse.atomic import atomic_path

        path = Path(args.json).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(result.to_json(), indent=2) + "\n")
    return 0


__all__ = ["add_arguments", "format_summary", "options_from_args", "run"]
