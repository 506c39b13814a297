"""Options of one ``generate`` call and their validation, before any weights are loaded.

``GenerateOptions`` is what the CLI fills from flags (and tests and scripts fill directly);
``prepare`` checks every option, resolves the model's configuration (``model.resolve_model``)
and the sparse pattern on the token grid exactly as the hook will, and returns the
``GenerationPlan`` the loading and running steps use. Errors are ``ValueError``/``TypeError``
naming what was expected and how to fix it.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from vidsparse.families import Family
from vidsparse.generation.model import TINY, TINY_DEFAULTS, ModelInfo, resolve_model
from vidsparse.generation.result import LoraSummary
from vidsparse.kernels.backends import check_runs_on
from vidsparse.video_io import check_video_path

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}
PARALLEL_MODES = ("none", "clip", "ulysses")


@dataclass(frozen=True)
class GenerateOptions:
    """Everything ``generate`` needs; the CLI fills it from flags, tests and scripts directly.

    ``None`` sizes, steps and guidance take the pipeline's defaults (tiny: the trained size, 17
    frames of 64x96, 12 steps, guidance 4; tiny-random: 33 frames, 96x160, 8 steps, guidance 5). ``pattern`` is a name (family defaults, then ``pattern_options``)
    or a pattern object. ``dense_first_steps`` ``None`` = the family default (25 % of the steps
    for sparse patterns); ints are steps, floats in [0, 1) fractions of the steps.
    """

    model: str = TINY
    prompt: str = "a red ball bouncing"
    negative_prompt: str = ""
    pattern: Any = "radial"
    pattern_options: Mapping[str, Any] = field(default_factory=dict)
    frames: int | None = None
    height: int | None = None
    width: int | None = None
    steps: int | None = None
    guidance: float | None = None
    seed: int = 0
    dtype: str = "auto"
    device: str = "auto"
    cpu_offload: bool = False
    compile: bool = False
    lora: str | None = None
    lora_scale: float = 1.0
    image: str | None = None  # the first frame of an image-to-video pipeline (an image file)
    condition_video: str | None = None  # a video whose frames start the clip (pipelines in Family.condition_video)
    # WanAnimatePipeline (with --image, the reference character): the motion videos, the mode (None = the
    # pipeline's "animate") and, for mode "replace", the video whose person is replaced and its mask.
    pose_video: str | None = None
    face_video: str | None = None
    animate_mode: str | None = None
    background_video: str | None = None
    mask_video: str | None = None
    dense_first_steps: int | float | None = None
    dense_last_steps: int | float = 0
    dense_layers: tuple[int, ...] | None = None
    backend: str = "auto"
    block_size: int | None = None
    parallel: str = "none"
    # --parallel only (None: the environment variable, else the default of vidsparse.parallel.generate):
    vae_overlap: int | str | None = (
        None  # latent frames of VAE context per clip, or "all" (exact); VIDSPARSE_VAE_OVERLAP, 4
    )
    dist_timeout: float | None = None  # seconds a collective may wait; VIDSPARSE_DIST_TIMEOUT, 600
    compare_dense: bool = False
    out: str | None = None
    fps: int | None = None
    progress: bool = True
    # FreeSwim's two stages (``vidsparse generate --freeswim``, ``generation.freeswim``): None = off; a dict of
    # FreeSwimOptions fields ({} = defaults: base = the checkpoint's native size, strength 0.7, cache every 2).
    # height/width are the target; frames, steps, guidance, seed, backend and block_size are generate's own.
    freeswim: dict[str, Any] | None = None

    def record(self) -> dict[str, Any]:
        """Every option but the progress bar, as plain values (a pattern object as its repr): what the
        ``--json`` summary records, and what every rank of a parallel run must agree on."""
        asked = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "progress"}
        asked = {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in asked.items()}
        if not isinstance(asked["pattern"], str):
            asked["pattern"] = repr(asked["pattern"])
        return asked


@dataclass(frozen=True)
class GenerationPlan:
    """Validated, resolved settings of one generate call."""

    info: ModelInfo
    frames: int
    height: int
    width: int
    steps: int
    guidance: float
    dtype: torch.dtype
    device: torch.device
    grid: tuple[int, int, int]
    pattern_name: str | None  # None: dense (no vidsparse)
    sparse_config: Any
    out: Path | None
    fps: int
    lora: Path | None
    freeswim: Any = None  # generation.freeswim.FreeSwimPrepared with GenerateOptions.freeswim
    lora_summary: LoraSummary | None = None  # the LoRA, what it was trained for, and mismatches
    image: Path | None = None  # image-to-video: the first frame (checked readable)
    condition_video: Path | None = None  # the conditioning video (checked readable; Family.condition_video)
    animate: AnimateInputs | None = None  # WanAnimatePipeline: its videos (checked readable) and segments
    prompt_note: str | None = None  # the trained tiny model: what of the prompt it cannot draw

    def settings(self, options: GenerateOptions) -> dict[str, Any]:
        """What the run was asked (every option but the progress bar) and what that resolved to, for the
        ``--json`` summary: enough to run it again (prompt, seed, guidance, sizes, dtype, device, sparse config)."""
        resolved = {
            "frames": self.frames,
            "height": self.height,
            "width": self.width,
            "steps": self.steps,
            "guidance": self.guidance,
            "dtype": str(self.dtype).removeprefix("torch."),
            "device": str(self.device),
            "fps": self.fps,
            "sparse_config": None if self.sparse_config is None else repr(self.sparse_config),
        }
        return {"options": options.record(), "resolved": resolved}


@dataclass(frozen=True)
class AnimateInputs:
    """The videos of a ``WanAnimatePipeline`` call, checked before loading (``frames``: the pose video's).

    The output has ``frames`` frames, denoised in ``segments`` segments of ``GenerationPlan.frames``.
    ``videos`` holds the given videos' frames (PIL images) under the pipeline's argument names
    (``pose_video``, ``face_video``, and for ``replace`` ``background_video`` / ``mask_video``):
    decoded once while checking them, then passed to the call as they are.
    """

    mode: str
    frames: int
    segments: int
    videos: dict[str, list] = field(default_factory=dict, repr=False, compare=False)


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}.")
    return value


def _resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"--device {device!r} is not a torch device; use auto, cpu, cuda or cuda:N.") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device} was requested but CUDA is not available here; use --device cpu.")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) are visible.")
    return dev


def _resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    key = str(dtype).lower().replace("torch.", "")
    if key not in DTYPES:
        raise ValueError(f"--dtype {dtype!r} is not supported; use auto, float32, float16 or bfloat16.")
    return DTYPES[key]


def _check_lora(path: str | None) -> Path | None:
    if path is None:
        return None
    p = Path(path).expanduser()
    _refuse_checkpoint(p, path)
    if p.is_dir():
        files = sorted(p.glob("*.safetensors"))
        if not files:
            raise ValueError(
                f"--lora {path!r} is a folder without a .safetensors file; pass the diffusers-format LoRA file "
                "(e.g. pytorch_lora_weights.safetensors) or its folder."
            )
        return p
    if not p.is_file():
        raise ValueError(f"--lora {path!r}: no such file. Pass a diffusers-format LoRA .safetensors file.")
    if p.suffix.lower() != ".safetensors":
        raise ValueError(
            f"--lora {path!r} must be a .safetensors file in diffusers format, got {p.suffix or 'no suffix'}."
        )
    _check_lora_file(p, path)
    return p


def _refuse_checkpoint(p: Path, given: str) -> None:
    """A train-lora checkpoint folder (or a file in it) is training state for ``--resume``: its
    weights have PEFT keys without the pipeline's prefix, so diffusers would load nothing."""
    from vidsparse.lora.checkpoint import STATE_FILE, checkpoint_step

    folder = p if p.is_dir() else p.parent
    if checkpoint_step(folder.name) is None or not (folder / STATE_FILE).is_file():
        return
    from vidsparse.lora.export import LORA_WEIGHT_NAME

    exported = folder.parent / LORA_WEIGHT_NAME
    use = (
        f"pass the run's exported LoRA, {str(exported)!r}"
        if exported.is_file()
        else f"the run's exported LoRA ({LORA_WEIGHT_NAME} in {str(folder.parent)!r}) is written when training "
        f"ends: finish the run with train-lora's --resume (same flags)"
    )
    raise ValueError(f"--lora {given!r} is a train-lora checkpoint (training state for --resume), not a LoRA; {use}.")


def _check_lora_file(p: Path, given: str) -> None:
    """The file's safetensors header holds tensors: read (a few KB) before the pipeline loads, not
    found out by ``load_lora_weights`` after it."""
    from safetensors import safe_open

    try:
        with safe_open(str(p), framework="pt") as f:
            keys = list(f.keys())
    except Exception as exc:  # safetensors raises its own error types for a bad header
        raise ValueError(
            f"--lora {given!r} is not a readable safetensors file ({type(exc).__name__}: {str(exc)[:120]}); pass the "
            "pytorch_lora_weights.safetensors train-lora wrote, or another diffusers-format LoRA."
        ) from None
    if not keys:
        raise ValueError(f"--lora {given!r} holds no tensors; pass a diffusers-format LoRA file.")


# Families whose transformers are built of Wan's blocks: a LoRA trained on one may load into another.
_WAN_BLOCKS = frozenset({"wan", "wan-vace", "skyreels-v2", "wan-animate"})


def _check_lora_family(record: Mapping[str, Any] | None, given: str, info: ModelInfo) -> None:
    """A LoRA that train-lora recorded (``record``: its ``vidsparse_lora.json``) for another model
    family cannot load into this one: refused before the pipeline loads (diffusers would load
    nothing and warn after it)."""
    record = record or {}
    trained, here = record.get("family"), info.model_family.name
    if trained is None or trained == here or {trained, here} <= _WAN_BLOCKS:
        return
    raise ValueError(
        f"--lora {given!r} was trained for the {trained} family ({record.get('model', 'model unknown')}), but "
        f"--model {info.source} is a {here} model ({info.pipeline_class}); its weights name modules this "
        "transformer does not have. Use the model it was trained on, or train a LoRA for this one."
    )


def _lora_summary(
    path: Path,
    info: Mapping[str, Any] | None,
    options: GenerateOptions,
    frames: int,
    height: int,
    width: int,
    pattern: str,
) -> LoraSummary:
    """What the LoRA's ``vidsparse_lora.json`` (``info``) says it was trained for, and where this run differs."""
    if info is None:
        return LoraSummary(str(path), float(options.lora_scale), None)
    keys = ("model", "family", "num_frames", "height", "width", "pattern", "rank", "steps")
    trained = {k: info.get(k) for k in keys if k in info}
    warnings = []
    model = trained.get("model")
    if model is not None and str(model) != str(options.model):  # a local copy of the same weights says so too
        warnings.append(
            f"the LoRA was trained on --model {model} (this run: {options.model}); it fits only the weights it was "
            "trained on."
        )
    wanted = {"num_frames": frames, "height": height, "width": width}
    differ = [
        f"{k.replace('num_', '')} {trained[k]} (this run: {v})"
        for k, v in wanted.items()
        if trained.get(k) not in (None, v)
    ]
    if differ:
        warnings.append(
            "the LoRA was trained for " + ", ".join(differ) + "; it adapts the model to its training length and "
            f"size, so pass --frames {trained.get('num_frames')} --height {trained.get('height')} "
            f"--width {trained.get('width')} to get what it was trained for."
        )
    if trained.get("pattern") not in (None, pattern):
        from vidsparse.lora.config import pattern_label

        warnings.append(
            f"the LoRA was trained with pattern {pattern_label(trained['pattern'])}, this run uses "
            f"{pattern_label(pattern)}; "
            "use the pattern (and options) it was trained with."
        )
    return LoraSummary(str(path), float(options.lora_scale), trained, tuple(warnings))


def image_input(pipeline_class: str, family: Family | None = None) -> str | None:
    """How a diffusers pipeline class takes a first-frame ``image`` in ``__call__``: "required"
    (image-to-video: Wan, CogVideoX, HunyuanVideo I2V; and the family's ``needs_first_frame``
    pipelines, e.g. Cosmos video2world, whose ``image=None`` default fails without a video),
    "optional" (LTX-Video's condition pipelines, Cosmos-Predict2.5) or ``None`` (text-to-video)."""
    import diffusers

    cls = getattr(diffusers, pipeline_class, None)
    param = inspect.signature(cls.__call__).parameters.get("image") if cls is not None else None
    if param is None:
        return None
    if param.default is inspect.Parameter.empty or (family is not None and pipeline_class in family.needs_first_frame):
        return "required"
    return "optional"


def _check_image(path: str | None, info: ModelInfo, condition_video: str | None = None) -> Path | None:
    """``--image`` for an image-conditioned pipeline (required by image-to-video ones, unless a
    ``--condition-video`` the pipeline takes stands in for it), refused for any other."""
    takes = image_input(info.pipeline_class, info.model_family)
    takes_video = info.pipeline_class in info.model_family.condition_video
    if path is None:
        if takes == "required" and not (condition_video and takes_video):
            from vidsparse.families.wan_animate import ANIMATE_PIPELINE

            what = "the character to animate" if info.pipeline_class == ANIMATE_PIPELINE else "the first frame"
            kind = "a character-animation" if info.pipeline_class == ANIMATE_PIPELINE else "an image-to-video"
            video = " or --condition-video PATH" if takes_video else ""
            raise ValueError(f"{info.pipeline_class} is {kind} pipeline: pass --image PATH ({what}){video}.")
        return None
    if takes is None:
        raise ValueError(
            f"--image is the first frame of an image-to-video pipeline; {info.source!r} is a {info.pipeline_class}, "
            "which takes no image. Drop --image, or use an image-to-video model (e.g. --model tiny-wan-i2v)."
        )
    p = Path(path).expanduser()
    try:
        from PIL import Image

        with Image.open(p) as im:
            im.verify()
    except Exception as exc:  # missing file, not an image: PIL raises several types
        raise ValueError(f"--image {path!r} cannot be read as an image ({type(exc).__name__}: {exc}).") from None
    return p


def condition_video_pipelines() -> tuple[str, ...]:
    """Every pipeline class that ``--condition-video`` can drive (``Family.condition_video``)."""
    from vidsparse.families import families

    return tuple(name for fam in families() for name in fam.condition_video)


def _check_condition_video(path: str | None, image: Path | None, info: ModelInfo) -> Path | None:
    """``--condition-video`` for a pipeline whose family says how it takes one: a readable video, not with ``--image``."""
    if path is None:
        return None
    if info.pipeline_class not in info.model_family.condition_video:
        raise ValueError(
            f"--condition-video conditions {', '.join(condition_video_pipelines())} (e.g. --model tiny-ltx-condition "
            f"or tiny-cosmos); {info.source!r} is a {info.pipeline_class}, which takes no conditioning video. "
            "Drop --condition-video."
        )
    if image is not None:
        raise ValueError("--condition-video and --image both condition the first frames; pass one of them.")
    from vidsparse.video_io import read_frames

    read_frames(path, max_frames=1)  # a clear error now, not after the weights are loaded
    return Path(path).expanduser()


#: (flag, GenerateOptions field) of the Wan-Animate inputs, in the order --help lists them.
ANIMATE_FLAGS = (
    ("--pose-video", "pose_video"),
    ("--face-video", "face_video"),
    ("--animate-mode", "animate_mode"),
    ("--background-video", "background_video"),
    ("--mask-video", "mask_video"),
)


def _read_video(path: str, flag: str) -> list:
    """The frames of a conditioning video (a ValueError naming the flag when it cannot be read)."""
    from vidsparse.video_io import read_frames

    try:
        return read_frames(path)
    except ValueError as exc:
        raise ValueError(f"{flag}: {exc}") from None


def _check_animate(options: GenerateOptions, info: ModelInfo, frames: int) -> AnimateInputs | None:
    """The Wan-Animate flags: all refused for another pipeline; for ``WanAnimatePipeline`` the pose and
    face videos required, the mode's videos present and readable, and frame counts the pipeline takes."""
    from vidsparse.families.wan_animate import ANIMATE_MODES, ANIMATE_PIPELINE, PREV_SEGMENT_FRAMES, segment_count

    given = [flag for flag, attr in ANIMATE_FLAGS if getattr(options, attr) is not None]
    if info.pipeline_class != ANIMATE_PIPELINE:
        if given:
            raise ValueError(
                f"{', '.join(given)} {'is an input' if len(given) == 1 else 'are inputs'} of {ANIMATE_PIPELINE} "
                f"(Wan 2.2-Animate, --model tiny-wan-animate); {info.source!r} is a {info.pipeline_class}. "
                f"Drop {'it' if len(given) == 1 else 'them'}, or use a Wan-Animate model."
            )
        return None
    missing = [f for f, attr in ANIMATE_FLAGS[:2] if getattr(options, attr) is None]
    if missing:
        raise ValueError(
            f"{info.source!r} is a {ANIMATE_PIPELINE}: it animates the --image character with the motion of a pose "
            f"video and a face video; pass {' and '.join(f'{m} PATH' for m in missing)} (the pose skeleton render "
            "and the face crops of the driving video, from Wan-Animate's preprocessing)."
        )
    mode = options.animate_mode if options.animate_mode is not None else ANIMATE_MODES[0]
    if mode not in ANIMATE_MODES:
        raise ValueError(f"--animate-mode must be one of {', '.join(ANIMATE_MODES)}, got {mode!r}.")
    replace_only = [f for f, attr in ANIMATE_FLAGS[3:] if getattr(options, attr) is not None]
    if mode == "animate" and replace_only:
        verb = "applies" if len(replace_only) == 1 else "apply"
        raise ValueError(
            f"{' and '.join(replace_only)} {verb} to --animate-mode replace (replace the person of a background "
            "video); add --animate-mode replace, or drop them to animate the character on its own."
        )
    if mode == "replace":
        missing = [f for f, attr in ANIMATE_FLAGS[3:] if getattr(options, attr) is None]
        if missing:
            raise ValueError(
                f"--animate-mode replace puts the --image character into a background video where a mask video is "
                f"white; pass {' and '.join(f'{m} PATH' for m in missing)}."
            )
    decoded = {
        attr: _read_video(getattr(options, attr), flag)
        for flag, attr in ANIMATE_FLAGS
        if attr != "animate_mode" and getattr(options, attr) is not None
    }
    counts = {flag: len(decoded[attr]) for flag, attr in ANIMATE_FLAGS if attr in decoded}
    pose = counts["--pose-video"]
    if pose <= PREV_SEGMENT_FRAMES:
        raise ValueError(
            f"--pose-video {options.pose_video!r} has {pose} frame(s); {ANIMATE_PIPELINE} generates as many frames as "
            f"the pose video has and starts each segment from {PREV_SEGMENT_FRAMES} frame(s) of the one before, so it "
            f"needs at least {PREV_SEGMENT_FRAMES + 1}. Pass a longer pose video."
        )
    if frames <= PREV_SEGMENT_FRAMES:
        raise ValueError(
            f"--frames {frames}: for {ANIMATE_PIPELINE} --frames is the segment length (segment_frame_length), which "
            f"must exceed the {PREV_SEGMENT_FRAMES} frame(s) a segment takes from the one before; e.g. --frames "
            f"{1 + 4 * max(1, PREV_SEGMENT_FRAMES)}."
        )
    short = {f: n for f, n in counts.items() if f != "--pose-video" and n < 2}
    if short:
        raise ValueError(
            f"{', '.join(f'{f} has {n} frame' for f, n in short.items())}: {ANIMATE_PIPELINE} pads its conditioning "
            f"videos to the pose video's {pose} frames by reflection, which needs at least 2 frames each."
        )
    differ = {f: n for f, n in counts.items() if n != pose}
    if differ:
        import warnings

        warnings.warn(
            f"{', '.join(f'{f} has {n} frames' for f, n in differ.items())}, the --pose-video {pose}: "
            f"{ANIMATE_PIPELINE} reflect-pads or cuts them to {pose} frames, so they are not frame-aligned with the "
            "pose; pass videos cut from the same driving video.",
            UserWarning,
            stacklevel=3,
        )

    return AnimateInputs(mode, pose, segment_count(pose, frames), decoded)


def _steps_value(value: Any, name: str) -> Any:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a step count (int) or a fraction of the steps in [0, 1), got {value!r}.")
    return value


def _build_sparse_config(options: GenerateOptions, info: ModelInfo, grid: tuple[int, int, int], steps: int):
    """SparseConfig for vidsparse.apply (None for dense), validated on the token grid."""
    from vidsparse.config import SparseConfig
    from vidsparse.layout import VideoLayout, auto_block_size
    from vidsparse.patterns import Pattern
    from vidsparse.patterns.tiling import next_power_of_two
    from vidsparse.pipelines.hooks import named_pattern

    pattern = options.pattern
    if isinstance(pattern, str):
        name = pattern.strip().lower().replace("_", "-")
        if name == "dense" and not options.pattern_options:
            return None, None
    elif isinstance(pattern, Pattern):
        name = pattern.name
    else:
        raise TypeError(
            f"pattern must be a name such as 'radial' or a vidsparse pattern, got {type(pattern).__name__}."
        )
    if options.pattern_options and not isinstance(pattern, str):
        raise ValueError("pattern_options apply to a pattern given by name; set the options on the pattern object.")
    config = SparseConfig(
        pattern=pattern,
        dense_first_steps=_steps_value(options.dense_first_steps, "dense_first_steps"),
        dense_last_steps=_steps_value(options.dense_last_steps, "dense_last_steps") or 0,
        dense_layers=options.dense_layers,
        backend=options.backend,
        block_size=options.block_size,
        # the step count is known here, so vs.apply can warn of an all-dense schedule before the run
        num_inference_steps=steps,
        pattern_options=dict(options.pattern_options),
    )
    # Resolve the pattern exactly as the hook will on this grid, so option errors and patterns
    # that cannot run on the grid surface now, before any weights are loaded.
    layout = VideoLayout(*grid)
    block = options.block_size or auto_block_size(layout)
    if block is not None and block > 2 * next_power_of_two(layout.tokens_per_frame) and block > 128:
        raise ValueError(
            f"--block-size {block} is larger than this grid needs ({layout}: {layout.tokens_per_frame} tokens a "
            "frame): a block mostly of padding computes more than dense attention. Drop --block-size (the "
            "default fits the grid) or use 64 or 128."
        )
    if isinstance(pattern, str):
        resolved = named_pattern(config, info.model_family, config.pattern, layout, block, info.two_stage)
    else:
        resolved = pattern
    try:
        resolved.validate(layout)
    except ValueError as exc:
        raise ValueError(f"{resolved!r} cannot run on the {info.family} token grid {layout}: {exc}") from None
    return config, name


def prepare(options: GenerateOptions) -> GenerationPlan:
    """Check every option and resolve the model's configuration, loading no weights."""
    if not isinstance(options, GenerateOptions):
        raise TypeError(f"generate expects GenerateOptions, got {type(options).__name__}.")
    if options.parallel not in PARALLEL_MODES:
        raise ValueError(f"--parallel must be one of {', '.join(PARALLEL_MODES)}, got {options.parallel!r}.")
    if options.parallel == "none":
        for flag, value in (("--vae-overlap", options.vae_overlap), ("--dist-timeout", options.dist_timeout)):
            if value is not None:
                raise ValueError(f"{flag} applies to --parallel clip or ulysses; drop it or choose a --parallel mode.")
    if not isinstance(options.prompt, str) or not isinstance(options.negative_prompt, str):
        raise TypeError("prompt and negative_prompt must be strings.")
    out = check_video_path(options.out) if options.out is not None else None
    info = resolve_model(options.model)
    if options.freeswim is not None:  # a model or option --freeswim cannot run: said before any size error
        from vidsparse.generation.freeswim import check_freeswim_model

        check_freeswim_model(options, info)
    d = info.defaults
    frames = _positive_int(options.frames if options.frames is not None else d.get("frames", 81), "--frames")
    height = _positive_int(options.height if options.height is not None else d.get("height", 480), "--height")
    width = _positive_int(options.width if options.width is not None else d.get("width", 832), "--width")
    steps = _positive_int(options.steps if options.steps is not None else d.get("steps", 50), "--steps")
    guidance = options.guidance if options.guidance is not None else d.get("guidance", 5.0)
    if (
        isinstance(guidance, bool)
        or not isinstance(guidance, (int, float))
        or not math.isfinite(guidance)
        or guidance < 0
    ):
        raise ValueError(
            f"--guidance must be a finite number >= 0 (1 disables classifier-free guidance), got {guidance!r}."
        )
    if isinstance(options.seed, bool) or not isinstance(options.seed, int) or not 0 <= options.seed < 2**64:
        raise ValueError(f"--seed must be an integer in [0, 2**64) (torch.Generator's range), got {options.seed!r}.")
    grid = info.grid.latent_grid(frames, height, width)  # ValueError naming the nearest valid sizes
    prompt_note = None
    if info.kind == TINY and info.source == TINY:  # the trained one knows only its synthetic world's words
        from vidsparse.models.synthetic_world import prompt_note as tiny_prompt_note

        prompt_note = tiny_prompt_note(str(options.prompt))
    frame_check = info.model_family.latent_frame_checks.get(info.pipeline_class)
    problem = frame_check(info.grid.latent_frames(frames)) if frame_check else None
    if problem:
        raise ValueError(f"--frames {frames}: {problem}.")
    animate = _check_animate(options, info, frames)
    if animate is not None:  # the reference image's latent frame comes first in every transformer call
        from vidsparse.families.wan_animate import REFERENCE_LATENT_FRAMES

        grid = (grid[0] + REFERENCE_LATENT_FRAMES, *grid[1:])
        if options.vae_overlap is not None:
            raise ValueError(
                "--vae-overlap sets the per-clip decode, and WanAnimatePipeline decodes whole on every rank (each "
                "segment starts from the decoded end of the one before, so every rank needs it): drop --vae-overlap."
            )
    device = _resolve_device(options.device)
    dtype = _resolve_dtype(options.dtype, device)
    check_runs_on(options.backend, device, dtype, "--backend")  # before loading, not at the first attention
    if options.cpu_offload and device.type != "cuda":
        raise ValueError("--cpu-offload moves weights between CPU and a GPU; it needs --device cuda (CUDA available).")
    fps = options.fps if options.fps is not None else info.grid.fps
    if options.fps is None and animate is not None:  # the output plays at the motion's own rate
        from vidsparse.video_io import video_fps

        fps = round(video_fps(options.pose_video) or fps)
    _positive_int(fps, "--fps")
    lora = _check_lora(options.lora)
    scale = options.lora_scale
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"--lora-scale must be a finite number (1 = as trained, 0 = off), got {scale!r}.")
    lora_record = None
    if lora is not None:
        from vidsparse.lora.export import read_lora_info

        lora_record = read_lora_info(lora)
        _check_lora_family(lora_record, options.lora, info)
    elif options.lora_scale != 1.0:
        raise ValueError(f"--lora-scale {options.lora_scale} scales a LoRA; pass --lora too, or drop --lora-scale.")
    image = _check_image(options.image, info, options.condition_video)
    condition_video = _check_condition_video(options.condition_video, image, info)
    if options.freeswim is not None and (image is not None or condition_video is not None):
        raise ValueError("--freeswim runs text-to-video pipelines; drop --image / --condition-video or --freeswim.")
    if options.freeswim is not None:  # FreeSwim's two stages: its own attention, checked here
        from vidsparse.generation.freeswim import prepare_freeswim

        freeswim = prepare_freeswim(options, info, frames, height, width, steps, float(guidance))
        return GenerationPlan(
            info, frames, height, width, steps, float(guidance), dtype, device, grid, "freeswim", None, out, fps,
            lora, freeswim=freeswim, prompt_note=prompt_note,
        )  # fmt: skip
    config, name = _build_sparse_config(options, info, grid, steps)
    if options.compare_dense and config is None:
        raise ValueError(
            "--compare-dense compares a sparse pattern with dense attention; choose a --pattern other than dense."
        )
    lora_summary = None
    if lora is not None:
        # The LoRA's own record of its pattern: "name{options}" as train-lora writes it.
        if config is None:
            run_pattern = "dense{}"
        elif isinstance(options.pattern, str):
            run_pattern = f"{name}{dict(options.pattern_options)}"
        else:
            run_pattern = repr(options.pattern)
        lora_summary = _lora_summary(lora, lora_record, options, frames, height, width, run_pattern)
    return GenerationPlan(
        info,
        frames,
        height,
        width,
        steps,
        float(guidance),
        dtype,
        device,
        grid,
        name,
        config,
        out,
        fps,
        lora,
        lora_summary=lora_summary,
        image=image,
        condition_video=condition_video,
        animate=animate,
        prompt_note=prompt_note,
    )


__all__ = [
    "ANIMATE_FLAGS",
    "DTYPES",
    "PARALLEL_MODES",
    "TINY_DEFAULTS",
    "AnimateInputs",
    "GenerateOptions",
    "GenerationPlan",
    "prepare",
]
