"""Generate a video with a diffusers pipeline whose self-attention runs a sparse pattern.

--model is a diffusers pipeline (hub id or local folder) or "tiny", an embedded random-init
Wan pipeline that needs no download (its prompt is embedded by hashing the text, so different
prompts give different videos). The pattern is applied with vidsparse.apply: a pattern given
by name gets the model family's defaults, which the pattern flags below override. Sizes, paths
and options are checked before any model is loaded. The summary reports wall time, time per
step, attention density per layer group and, with --compare-dense, the dense run's time, the
speedup and the PSNR between the two videos. The video file appears only once complete.

Examples:
  vidsparse generate --model tiny --prompt "a red ball bouncing" --out outputs/tiny.mp4
  vidsparse generate --model Wan-AI/Wan2.1-T2V-1.3B-Diffusers --pattern radial \\
      --prompt "a cat surfing" --frames 81 --height 480 --width 832 --out cat.mp4 --compare-dense
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import math
import os
import re
import statistics
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vidsparse.cli import UserError, add_pattern_arguments, parse_dense_layers, pattern_options_from_args
from vidsparse.density import token_density
from vidsparse.families import VideoGeometry, family_of_geometry, family_of_pipeline, pipeline_prefixes, video_geometry
from vidsparse.video_io import as_uint8_frames, check_video_path, psnr, write_video

TINY = "tiny"
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
# A few seconds on 2 CPU cores, big enough (9x6x10 latent tokens, 540) for visible sparsity.
TINY_DEFAULTS = {"frames": 33, "height": 96, "width": 160, "steps": 8, "guidance": 5.0}


# -- options and results ----------------------------------------------------------------------


@dataclass(frozen=True)
class GenerateOptions:
    """Everything ``generate`` needs; the CLI fills it from flags, tests and scripts directly.

    ``None`` sizes, steps and guidance take the pipeline's defaults (tiny: 33 frames, 96x160,
    8 steps, guidance 5). ``pattern`` is a name (family defaults, then ``pattern_options``)
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
    dense_first_steps: int | float | None = None
    dense_last_steps: int | float = 0
    dense_layers: tuple[int, ...] | None = None
    backend: str = "auto"
    block_size: int | None = None
    parallel: str = "none"
    # --parallel only (None: the environment variable, else the default of vidsparse.parallel.generate):
    vae_overlap: int | str | None = None  # latent frames of VAE context per clip, or "all" (exact); VIDSPARSE_VAE_OVERLAP, 4
    dist_timeout: float | None = None  # seconds a collective may wait; VIDSPARSE_DIST_TIMEOUT, 600
    compare_dense: bool = False
    out: str | None = None
    fps: int | None = None
    progress: bool = True


@dataclass(frozen=True)
class LayerGroupDensity:
    """Attention density of consecutive layers that run the same thing (measured at the first sparse step)."""

    layers: tuple[int, ...]
    pattern: str  # pattern repr, or "dense"
    block_density: float  # kernel work: computed blocks / all blocks (1.0 for dense)
    token_density: float  # attended (query, key) pairs / all pairs

    @property
    def label(self) -> str:
        lo, hi = self.layers[0], self.layers[-1]
        return f"layer {lo}" if lo == hi else f"layers {lo}-{hi}"


@dataclass(frozen=True)
class DenseComparison:
    """The same generation with the model's own dense attention (same seed, same prompt)."""

    frames: np.ndarray
    denoise_s: float
    call_s: float
    time_per_step_s: float
    speedup: float  # dense denoising time / sparse denoising time
    psnr_db: float  # sparse video vs dense video


@dataclass(frozen=True)
class GenerateResult:
    """What ``generate`` returns: the video (uint8 [T, H, W, 3]) and how it was made."""

    frames: np.ndarray
    fps: int
    out: Path | None
    model: str
    family: str
    pattern: str
    grid: tuple[int, int, int]  # token grid (F, H, W) after VAE and patchify
    steps: int
    wall_s: float  # the whole generate() call
    load_s: float
    denoise_s: float  # first transformer forward to last step end
    step_times_s: tuple[float, ...]
    time_per_step_s: float  # median step
    sparse_steps: int  # steps with at least one sparse self-attention call
    densities: tuple[LayerGroupDensity, ...]
    attention_work: float  # over all self-attention calls, computed / dense (1.0 = dense)
    dense: DenseComparison | None = None
    prepare_s: float = 0.0  # option checks and config reading (imports included)
    call_s: float = 0.0  # the whole pipeline call: text encoding, denoising, VAE decode
    write_s: float = 0.0

    def to_json(self) -> dict[str, Any]:
        out = {
            "out": str(self.out) if self.out else None,
            "model": self.model,
            "family": self.family,
            "pattern": self.pattern,
            "grid": list(self.grid),
            "video_shape": list(self.frames.shape),
            "fps": self.fps,
            "steps": self.steps,
            "wall_s": self.wall_s,
            "prepare_s": self.prepare_s,
            "load_s": self.load_s,
            "call_s": self.call_s,
            "denoise_s": self.denoise_s,
            "write_s": self.write_s,
            "time_per_step_s": self.time_per_step_s,
            "step_times_s": list(self.step_times_s),
            "sparse_steps": self.sparse_steps,
            "attention_work": self.attention_work,
            "densities": [
                {
                    "layers": list(d.layers),
                    "pattern": d.pattern,
                    "block_density": d.block_density,
                    "token_density": d.token_density,
                }
                for d in self.densities
            ],
        }
        if self.dense is not None:
            out["dense"] = {
                "denoise_s": self.dense.denoise_s,
                "call_s": self.dense.call_s,
                "time_per_step_s": self.dense.time_per_step_s,
                "speedup": self.dense.speedup,
                "psnr_db": None if math.isinf(self.dense.psnr_db) else self.dense.psnr_db,
            }
        return out


# -- model resolution (no weights loaded) -----------------------------------------------------


@dataclass(frozen=True)
class ModelInfo:
    """What is known about --model before loading it."""

    kind: str  # "tiny" | "local" | "hub"
    source: str
    pipeline_class: str
    grid: VideoGeometry
    defaults: Mapping[str, Any]
    two_stage: bool = False
    absent_components: tuple[str, ...] = ()  # model_index entries saved as [null, null]

    @property
    def family(self) -> str:
        return self.grid.name


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _looks_like_path(model: str) -> bool:
    """A relative/absolute/home path rather than a hub id (org/name has exactly one slash)."""
    return model.startswith((".", "/", "~")) or model.count("/") >= 2 or "\\" in model


def _read_json(path: Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"Could not read {path}: {exc}.") from None


def _hub_json(repo: str, filename: str, required: bool) -> dict[str, Any] | None:
    from huggingface_hub import hf_hub_download

    try:
        return _read_json(Path(hf_hub_download(repo, filename)))
    except Exception as exc:  # network, auth, missing file: all mean "cannot use this id"
        if not required:
            return None
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
        hint = " (HF_HUB_OFFLINE is set and it is not in the local cache)" if offline else ""
        raise ValueError(
            f"Could not get {filename} of the hub model {repo!r}{hint}: {type(exc).__name__}: "
            f"{_brief(exc, 1)}. Check the id and your network (gated models need "
            "`huggingface-cli login`), or pass a local diffusers pipeline folder, or --model tiny."
        ) from None


def _family_from_class(class_name: str, transformer_config: dict[str, Any] | None) -> VideoGeometry:
    family = family_of_pipeline(class_name)
    if family is not None:
        return family.geometry_for(transformer_config)
    supported = ", ".join(f"{p}*Pipeline" for p in pipeline_prefixes())
    raise ValueError(
        f"vidsparse generate runs video diffusion pipelines of these families: {supported}; "
        f"this model is a {class_name}."
    )


def _call_defaults(class_name: str) -> dict[str, Any]:
    import diffusers

    cls = getattr(diffusers, class_name, None)
    if cls is None:
        return {}
    params = inspect.signature(cls.__call__).parameters
    names = {"num_frames": "frames", "height": "height", "width": "width"}
    names.update({"num_inference_steps": "steps", "guidance_scale": "guidance"})
    out = {}
    for src, dst in names.items():
        p = params.get(src)
        if p is not None and p.default is not inspect.Parameter.empty and p.default is not None:
            out[dst] = p.default
    return out


def resolve_model(model: str) -> ModelInfo:
    """Identify --model from its configuration files only (tiny, local folder, or hub id)."""
    if not isinstance(model, str) or not model.strip():
        raise ValueError("--model must be 'tiny', a local diffusers pipeline folder or a hub id like org/name.")
    model = model.strip()
    if model == TINY:
        return ModelInfo(TINY, TINY, "WanPipeline", video_geometry("wan"), dict(TINY_DEFAULTS))
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ValueError(
                f"--model {model!r} is a file; expected a diffusers pipeline folder (with model_index.json), "
                "a hub id like Wan-AI/Wan2.1-T2V-1.3B-Diffusers, or 'tiny'."
            )
        index_file = path / "model_index.json"
        if not index_file.is_file():
            raise ValueError(
                f"--model {model!r} is not a diffusers pipeline folder: it has no model_index.json. Point it at the "
                "folder that pipe.save_pretrained() wrote (or a downloaded snapshot)."
            )
        index = _read_json(index_file)
        tcfg_file = path / "transformer" / "config.json"
        tcfg = _read_json(tcfg_file) if tcfg_file.is_file() else None
        kind = "local"
    elif _looks_like_path(model) or not _HUB_ID.match(model):
        raise ValueError(
            f"--model {model!r}: no such folder, and it is not a hub id (org/name). Give an existing diffusers "
            "pipeline folder, a hub id such as Wan-AI/Wan2.1-T2V-1.3B-Diffusers, or 'tiny'."
        )
    else:
        index = _hub_json(model, "model_index.json", required=True)
        tcfg = _hub_json(model, "transformer/config.json", required=False)
        kind = "hub"
    class_name = str(index.get("_class_name", ""))
    if not class_name:
        raise ValueError(f"--model {model!r}: model_index.json names no pipeline class (_class_name).")
    grid = _family_from_class(class_name, tcfg)
    t2 = index.get("transformer_2")
    two_stage = isinstance(t2, (list, tuple)) and any(x is not None for x in t2)
    absent = tuple(k for k, v in index.items() if not k.startswith("_") and isinstance(v, (list, tuple)) and not any(v))
    return ModelInfo(kind, model, class_name, grid, _call_defaults(class_name), two_stage, absent)


# -- validation -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Plan:
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
    return p


def _steps_value(value: Any, name: str) -> Any:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a step count (int) or a fraction of the steps in [0, 1), got {value!r}.")
    return value


def _integration_family(grid: VideoGeometry):
    return family_of_geometry(grid)


def _build_sparse_config(options: GenerateOptions, info: ModelInfo, grid: tuple[int, int, int]):
    """SparseConfig for vidsparse.apply (None for dense), validated on the token grid."""
    from vidsparse.config import SparseConfig
    from vidsparse.layout import VideoLayout, auto_block_size
    from vidsparse.patterns import Pattern, make_pattern

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
        pattern_options=dict(options.pattern_options),
    )
    # Resolve the pattern exactly as the hook will on this grid, so option errors and patterns
    # that cannot run on the grid surface now, before any weights are loaded.
    layout = VideoLayout(*grid)
    if isinstance(pattern, str):
        spec = _integration_family(info.grid)
        block = options.block_size or auto_block_size(layout)
        opts = spec.pattern_options(config.pattern, layout, block, info.two_stage)
        opts.update(options.pattern_options)
        resolved = make_pattern(config.pattern, **opts)
    else:
        resolved = pattern
    try:
        resolved.validate(layout)
    except ValueError as exc:
        raise ValueError(f"{resolved!r} cannot run on the {info.family} token grid {layout}: {exc}") from None
    return config, name


def prepare(options: GenerateOptions) -> _Plan:
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
    if isinstance(options.seed, bool) or not isinstance(options.seed, int) or options.seed < 0:
        raise ValueError(f"--seed must be an integer >= 0, got {options.seed!r}.")
    grid = info.grid.latent_grid(frames, height, width)  # ValueError naming the nearest valid sizes
    device = _resolve_device(options.device)
    dtype = _resolve_dtype(options.dtype, device)
    if options.cpu_offload and device.type != "cuda":
        raise ValueError("--cpu-offload moves weights between CPU and a GPU; it needs --device cuda (CUDA available).")
    fps = options.fps if options.fps is not None else info.grid.fps
    _positive_int(fps, "--fps")
    lora = _check_lora(options.lora)
    config, name = _build_sparse_config(options, info, grid)
    if options.compare_dense and config is None:
        raise ValueError(
            "--compare-dense compares a sparse pattern with dense attention; choose a --pattern other than dense."
        )
    return _Plan(info, frames, height, width, steps, float(guidance), dtype, device, grid, name, config, out, fps, lora)


# -- running ----------------------------------------------------------------------------------


def load_pipeline(plan: _Plan, seed: int = 0):
    """The diffusers pipeline of ``plan`` in its dtype, on the CPU (placement is the caller's).

    The tiny pipeline is built in memory with fixed weights (seed 0 whatever ``seed`` is), so
    that ``--seed`` changes only the noise, as it does for a real checkpoint.
    """
    info = plan.info
    if info.kind == TINY:
        from vidsparse.models.tiny import build_tiny_pipeline

        pipe = build_tiny_pipeline(seed=0, dtype=plan.dtype)
    else:
        from diffusers import DiffusionPipeline

        # diffusers >= 0.42 names the argument ``dtype`` (``torch_dtype`` is deprecated there).
        doc = DiffusionPipeline.from_pretrained.__doc__ or ""
        kwargs: dict[str, Any] = {"dtype" if "    dtype (" in doc else "torch_dtype": plan.dtype}
        # Components saved as [null, null] (e.g. a pipeline without text encoder) must be passed as None.
        kwargs.update({name: None for name in info.absent_components})
        try:
            pipe = DiffusionPipeline.from_pretrained(info.source, **kwargs)
        except (OSError, ValueError, TypeError) as exc:
            raise ValueError(f"Could not load the pipeline {info.source!r}: {_brief(exc)}.") from None
    return pipe


def _load_lora(pipe, path: Path, scale: float) -> None:
    """Load a diffusers-format LoRA and check that it actually attached to the transformer."""
    before = _adapter_count(pipe)
    try:
        pipe.load_lora_weights(str(path), adapter_name="vidsparse_lora")
    except Exception as exc:
        raise ValueError(
            f"--lora {str(path)!r} does not match this {type(pipe).__name__}: {type(exc).__name__}: "
            f"{_brief(exc)}. Use a LoRA trained for this model (diffusers format)."
        ) from None
    if _adapter_count(pipe) <= before:
        raise ValueError(
            f"--lora {str(path)!r} loaded no weights into this {type(pipe).__name__}: none of its keys name a "
            "layer of this model. Use a LoRA trained for this model, saved in diffusers format."
        )
    if scale != 1.0:
        pipe.set_adapters(["vidsparse_lora"], adapter_weights=[scale])


def _brief(exc: BaseException, lines: int = 2) -> str:
    """The first meaningful lines of an exception message, on one line."""
    parts = [ln.strip().rstrip(":.") for ln in str(exc).splitlines() if ln.strip()]
    return "; ".join(parts[:lines])


def _adapter_count(pipe) -> int:
    total = 0
    for attr in ("transformer", "transformer_2"):
        module = getattr(pipe, attr, None)
        if module is None:
            continue
        total += sum(1 for m in module.modules() if hasattr(m, "lora_A") and len(getattr(m, "lora_A", {})) > 0)
    return total


class _StepClock:
    """Per-step wall times: from the first transformer forward, then between step ends."""

    def __init__(self, pipe, device: torch.device, on_step=None) -> None:
        self.device = device
        self.on_step = on_step
        self.start: float | None = None
        self.ends: list[float] = []
        self.handles = []
        for attr in ("transformer", "transformer_2"):
            module = getattr(pipe, attr, None)
            if module is not None:
                self.handles.append(module.register_forward_pre_hook(self._pre))

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _pre(self, module, args) -> None:
        if self.start is None:
            self._sync()
            self.start = time.perf_counter()

    def callback(self, pipe, step, timestep, callback_kwargs):
        self._sync()
        self.ends.append(time.perf_counter())
        if self.on_step is not None:
            self.on_step()
        return callback_kwargs

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()

    @property
    def step_times(self) -> tuple[float, ...]:
        if self.start is None or not self.ends:
            return ()
        marks = [self.start, *self.ends]
        return tuple(b - a for a, b in zip(marks, marks[1:]))


def _call_kwargs(
    pipe,
    plan: _Plan,
    options: GenerateOptions,
    steps: int,
    output_type: str | None,
    callback,
    *,
    device: torch.device | None = None,
    generator_device: torch.device | str | None = None,
) -> dict:
    """Keyword arguments of one pipeline call (prompt embedded by hashing for text-encoder-free Wan).

    ``device`` holds hashed prompt embeddings (default ``plan.device``); the seeded generator is
    on ``generator_device`` (default: that device, or the CPU under --cpu-offload). ``None``
    values (e.g. ``output_type``) are left out. Also used by ``vidsparse.parallel.generate``.
    """
    device = plan.device if device is None else device
    if generator_device is None:
        generator_device = device if device.type != "cuda" or not options.cpu_offload else torch.device("cpu")
    kwargs: dict[str, Any] = dict(
        num_frames=plan.frames,
        height=plan.height,
        width=plan.width,
        num_inference_steps=steps,
        guidance_scale=plan.guidance,
        generator=torch.Generator(device=generator_device).manual_seed(options.seed),
        output_type=output_type,
        callback_on_step_end=callback,
    )
    if plan.info.kind == TINY or (getattr(pipe, "text_encoder", "absent") is None and plan.info.family == "wan"):
        # The tiny pipeline (also once saved to a folder) has no text encoder: hash the prompt.
        from vidsparse.models.tiny import encode_prompt_tiny

        transformer = pipe.transformer if pipe.transformer is not None else pipe.transformer_2
        emb = dict(dim=transformer.config.text_dim, device=device, dtype=transformer.dtype)
        kwargs["prompt_embeds"] = encode_prompt_tiny(options.prompt, **emb)
        kwargs["negative_prompt_embeds"] = encode_prompt_tiny(options.negative_prompt, **emb)
    else:
        kwargs["prompt"] = options.prompt
        if options.negative_prompt:
            kwargs["negative_prompt"] = options.negative_prompt
    accepted = inspect.signature(pipe.__call__).parameters
    if "num_frames" not in accepted:
        raise ValueError(f"{type(pipe).__name__} is not a video pipeline (its __call__ takes no num_frames).")
    return {k: v for k, v in kwargs.items() if k in accepted and v is not None}


def _run_pipeline(pipe, plan: _Plan, options: GenerateOptions, on_step=None) -> tuple[np.ndarray, tuple, float]:
    """One pipeline call; returns (uint8 frames [T, H, W, 3], step times, whole call seconds)."""
    clock = _StepClock(pipe, plan.device, on_step)
    kwargs = _call_kwargs(pipe, plan, options, plan.steps, "np", clock.callback)
    t0 = time.perf_counter()
    try:
        with torch.inference_mode():
            output = pipe(**kwargs)
    finally:
        clock.close()
    call_s = time.perf_counter() - t0
    frames = output.frames if hasattr(output, "frames") else output[0]
    video = as_uint8_frames(frames[0] if isinstance(frames, (list, tuple)) else frames)
    return video, clock.step_times, call_s


def _warmup(pipe, plan: _Plan, options: GenerateOptions) -> None:
    """One untimed denoising step without VAE decode: lazy initialisation, kernel compilation and
    plan building happen here, so the timed dense and sparse runs compare like with like."""
    with torch.inference_mode():
        pipe(**_call_kwargs(pipe, plan, options, 1, "latent", None))


class _DensityRecorder:
    """Wraps ``SparseState.attention_fn``: records the pattern of each layer at its first
    sparse call and measures that call's plan (static plans come from the cache)."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.layers: dict[int, tuple[str, float, float]] = {}
        self.sparse_calls = 0

    def __call__(self, q, k, v, layout, pattern, *args, layer: int = 0, block_size: int | None = None, **kwargs):
        self._record(q, k, layout, pattern, layer, block_size, kwargs.get("backend", "auto"))
        return self.inner(q, k, v, layout, pattern, *args, layer=layer, block_size=block_size, **kwargs)

    @torch.compiler.disable
    def _record(self, q, k, layout, pattern, layer, block_size, backend) -> None:
        """Host-side bookkeeping, kept out of torch.compile graphs (--compile)."""
        self.sparse_calls += 1
        if layer not in self.layers:
            self.layers[layer] = self._measure(q, k, layout, pattern, layer, block_size, backend)

    @staticmethod
    @torch.no_grad()
    def _measure(q, k, layout, pattern, layer, block_size, backend) -> tuple[str, float, float]:
        import vidsparse as vs
        from vidsparse import attention as attention_module

        if block_size is None:  # the backend's default, as vidsparse.attention picks it
            try:
                name = attention_module.resolve_backend(backend, q)
                mod = importlib.import_module(attention_module._BACKEND_MODULES[name])
                block_size = getattr(mod, "DEFAULT_BLOCK_SIZE", 128)
            except Exception:
                block_size = 128
        if pattern.dynamic:
            p = vs.plan(
                pattern, layout, num_heads=q.shape[2], layer=layer, q=q, k=k, block_size=block_size, device=q.device
            )
        else:
            p = vs.plan(pattern, layout, num_heads=1, layer=layer, block_size=block_size)
        return repr(pattern), float(p.density), float(token_density(p).mean())


def _group_densities(num_layers: int, dense_layers: frozenset[int], seen: dict[int, tuple[str, float, float]]):
    rows = []
    for layer in range(num_layers):
        if layer in seen:
            rows.append((layer, *seen[layer]))
        elif layer in dense_layers:
            rows.append((layer, "dense", 1.0, 1.0))
        else:
            rows.append((layer, "not run sparse", 1.0, 1.0))
    groups: list[LayerGroupDensity] = []
    for layer, pat, bd, td in rows:
        last = groups[-1] if groups else None
        if last and last.pattern == pat and abs(last.block_density - bd) < 5e-4 and abs(last.token_density - td) < 5e-4:
            groups[-1] = replace(last, layers=(*last.layers, layer))
        else:
            groups.append(LayerGroupDensity((layer,), pat, bd, td))
    return tuple(groups)


def generate(options: GenerateOptions) -> GenerateResult:
    """Generate one video (see the module docstring); the file, if any, is written atomically."""
    t_start = time.perf_counter()
    if isinstance(options, GenerateOptions) and options.parallel in PARALLEL_MODES and options.parallel != "none":
        # Before prepare(): generate_parallel checks the options on every rank and then lets all
        # ranks agree, so an option one rank rejects stops every rank instead of leaving peers hanging.
        return _generate_parallel(options)
    plan = prepare(options)
    prepare_s = time.perf_counter() - t_start

    t0 = time.perf_counter()
    pipe = load_pipeline(plan, options.seed)
    if plan.lora is not None:
        _load_lora(pipe, plan.lora, options.lora_scale)
    if options.cpu_offload:
        pipe.enable_model_cpu_offload(device=plan.device)
    else:
        pipe.to(plan.device)
    pipe.set_progress_bar_config(disable=not options.progress, desc="denoising", leave=False)
    load_s = time.perf_counter() - t0

    dense_run = None
    if options.compare_dense:  # the dense baseline first, on the unpatched pipeline
        if options.compile:
            _compile(pipe)
        _warmup(pipe, plan, options)
        dense_run = _run_pipeline(pipe, plan, options)

    if plan.sparse_config is not None:
        import vidsparse as vs

        if options.compare_dense:  # warm the sparse kernels too: one step with every layer sparse
            vs.apply(pipe, replace(plan.sparse_config, dense_first_steps=0, dense_last_steps=0))
            _warmup(pipe, plan, options)
        vs.apply(pipe, plan.sparse_config)
        meter = _SparseMeter(pipe)
        if options.compile and not options.compare_dense:
            _compile(pipe)
        frames, step_times, call_s = _run_pipeline(pipe, plan, options, on_step=meter.tick)
        densities, attention_work = meter.summary()
        sparse_steps = meter.sparse_steps
    else:
        if options.compile:
            _compile(pipe)
        frames, step_times, call_s = _run_pipeline(pipe, plan, options)
        n = _num_layers(pipe)
        densities = (LayerGroupDensity(tuple(range(n)), "dense", 1.0, 1.0),) if n else ()
        attention_work, sparse_steps = 1.0, 0

    denoise_s = float(sum(step_times))
    per_step = float(statistics.median(step_times)) if step_times else 0.0
    comparison = None
    if dense_run is not None:
        dense_frames, dense_steps, dense_call_s = dense_run
        dense_s = float(sum(dense_steps))
        comparison = DenseComparison(
            frames=dense_frames,
            denoise_s=dense_s,
            call_s=dense_call_s,
            time_per_step_s=float(statistics.median(dense_steps)) if dense_steps else 0.0,
            speedup=dense_s / denoise_s if denoise_s > 0 else float("nan"),
            psnr_db=psnr(frames, dense_frames),
        )
    t_write = time.perf_counter()
    written = write_video(plan.out, frames, fps=plan.fps) if plan.out is not None else None
    write_s = time.perf_counter() - t_write
    return GenerateResult(
        frames=frames,
        fps=plan.fps,
        out=written,
        model=plan.info.source,
        family=plan.info.family,
        pattern="dense" if plan.sparse_config is None else (plan.pattern_name or "custom"),
        grid=plan.grid,
        steps=plan.steps,
        wall_s=time.perf_counter() - t_start,
        load_s=load_s,
        denoise_s=denoise_s,
        step_times_s=tuple(step_times),
        time_per_step_s=per_step,
        sparse_steps=sparse_steps,
        densities=densities,
        attention_work=attention_work,
        dense=comparison,
        prepare_s=prepare_s,
        call_s=call_s,
        write_s=write_s,
    )


class _SparseMeter:
    """Attaches a ``_DensityRecorder`` to every patched transformer; counts sparse steps and
    turns the recordings into per-layer-group densities and the overall attention work."""

    def __init__(self, pipe) -> None:
        from vidsparse.pipelines import get_state, transformers_of

        self.entries = []
        for _, transformer in transformers_of(pipe):
            state = get_state(transformer)
            recorder = _DensityRecorder(state.attention_fn)
            state.attention_fn = recorder
            self.entries.append((state, recorder, dict(state.calls)))
        self.sparse_steps = 0
        self._last = 0

    def tick(self) -> None:
        calls = sum(rec.sparse_calls for _, rec, _ in self.entries)
        if calls > self._last:
            self.sparse_steps += 1
        self._last = calls

    def summary(self) -> tuple[tuple[LayerGroupDensity, ...], float]:
        seen: dict[int, tuple[str, float, float]] = {}
        total = work = 0.0
        for state, rec, before in self.entries:
            for layer, value in rec.layers.items():
                seen.setdefault(layer, value)
            dense_calls = state.calls.get("dense", 0) - before.get("dense", 0)
            sparse_calls = state.calls.get("sparse", 0) - before.get("sparse", 0)
            total += dense_calls + sparse_calls
            work += dense_calls
            if sparse_calls and rec.layers:
                work += sparse_calls * sum(v[1] for v in rec.layers.values()) / len(rec.layers)
        state0 = self.entries[0][0]
        groups = _group_densities(state0.num_layers, state0.dense_layers, seen)
        return groups, (work / total if total else 1.0)


def _num_layers(pipe) -> int:
    try:
        from vidsparse.families import family_of

        return len(family_of(pipe.transformer).attention_paths(pipe.transformer))
    except Exception:
        return 0


def _compile(pipe) -> None:
    for attr in ("transformer", "transformer_2"):
        module = getattr(pipe, attr, None)
        if module is None:
            continue
        if hasattr(module, "compile_repeated_blocks") and getattr(module, "_repeated_blocks", None):
            module.compile_repeated_blocks(fullgraph=False)
        else:
            module.compile()


def _generate_parallel(options: GenerateOptions) -> GenerateResult:
    try:
        parallel = importlib.import_module("vidsparse.parallel")
    except ImportError as exc:
        raise ValueError(
            f"--parallel {options.parallel} needs vidsparse.parallel, which failed to import: {exc}."
        ) from None
    fn = getattr(parallel, "generate_parallel", None)
    if fn is None:
        raise ValueError(
            f"--parallel {options.parallel} is not available in this installation (vidsparse.parallel has no "
            "generate_parallel yet); run with --parallel none."
        )
    return fn(options)


__all__ = [
    "DenseComparison",
    "GenerateOptions",
    "GenerateResult",
    "LayerGroupDensity",
    "generate",
    "prepare",
    "resolve_model",
]


# -- command line -----------------------------------------------------------------------------


def _parse_vae_overlap(text: str) -> int | str:
    if text.strip().lower() == "all":
        return "all"
    if not re.fullmatch(r"\s*\d+\s*", text) or int(text) < 1:
        raise UserError(
            f"--vae-overlap expects latent frames of context (an integer >= 1, e.g. 4) or 'all' (exact), got {text!r}."
        )
    return int(text)


def _parse_timeout(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not math.isfinite(value) or value <= 0:
        raise UserError(f"--dist-timeout expects a number of seconds > 0 (e.g. 600), got {text!r}.")
    return value


def _parse_steps(text: str, flag: str) -> int | float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
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
        "(embedded random-init Wan pipeline, no download; default)",
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
    video = parser.add_argument_group("video")
    video.add_argument("--frames", type=int, default=None, help="number of frames (default: the pipeline's; tiny 33)")
    video.add_argument("--height", type=int, default=None, help="height in pixels (default: the pipeline's; tiny 96)")
    video.add_argument("--width", type=int, default=None, help="width in pixels (default: the pipeline's; tiny 160)")
    video.add_argument("--steps", type=int, default=None, help="denoising steps (default: the pipeline's; tiny 8)")
    video.add_argument(
        "--guidance", type=float, default=None, help="classifier-free guidance scale (default: the pipeline's; tiny 5)"
    )
    video.add_argument(
        "--seed", type=int, default=0, help="random seed; same seed and prompt give the same video (default 0)"
    )
    video.add_argument(
        "--fps", type=int, default=None, help="frame rate of the written video (default: the family's, Wan 16)"
    )
    video.add_argument(
        "--out",
        default="outputs/video.mp4",
        help="output video, .mp4 or .gif; written only once complete (default outputs/video.mp4)",
    )
    run_group = parser.add_argument_group("execution")
    run_group.add_argument("--device", default="auto", help="torch device: auto (cuda if available), cpu, cuda, cuda:N")
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
        choices=("auto", "torch", "flex", "triton"),
        help="sparse attention kernel: auto (triton on CUDA, torch on CPU), torch, flex or triton",
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
        help="multi-GPU mode: none, clip (Video-Infinity clip parallelism) or ulysses (sequence parallel heads)",
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
    add_pattern_arguments(parser, default="radial")


def options_from_args(args: argparse.Namespace) -> GenerateOptions:
    name, pattern_options = pattern_options_from_args(args)
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
    )


def _time_parts(result: GenerateResult) -> list[str]:
    """The timing breakdown; parts a producer did not measure (0) are left out."""
    denoise = f"denoise {result.denoise_s:.1f} s, {result.time_per_step_s:.3f} s/step median"
    parts = [f"{name} {value:.1f} s" for name, value in (("setup", result.prepare_s), ("load", result.load_s)) if value]
    parts.append(f"pipeline {result.call_s:.1f} s ({denoise})" if result.call_s else denoise)
    if result.write_s:
        parts.append(f"write {result.write_s:.1f} s")
    return parts


def format_summary(result: GenerateResult) -> str:
    t, h, w = result.frames.shape[:3]
    f, gh, gw = result.grid
    lines = [
        f"model      {result.model} ({result.family})",
        f"video      {t} frames of {w}x{h} pixels (WxH) -> token grid {f}x{gh}x{gw} (FxHxW, {f * gh * gw} tokens), "
        f"{result.steps} steps",
        f"pattern    {result.pattern}"
        + (f"; sparse in {result.sparse_steps} of {result.steps} steps" if result.pattern != "dense" else ""),
        f"time       {result.wall_s:.1f} s total: " + ", ".join(_time_parts(result)),
    ]
    if result.densities:
        lines.append("density    block = kernel work, token = attended pairs (first sparse step)")
        for d in result.densities:
            lines.append(
                f"           {d.label:<13} block {d.block_density:6.1%}  token {d.token_density:6.1%}  {d.pattern}"
            )
        lines.append(f"           attention work over all steps and layers: {result.attention_work:.1%} of dense")
    if result.dense is not None:
        d = result.dense
        quality = "identical" if math.isinf(d.psnr_db) else f"{d.psnr_db:.2f} dB"
        lines.append(
            f"dense      denoise {d.denoise_s:.1f} s, {d.time_per_step_s:.3f} s/step; speedup {d.speedup:.2f}x; "
            f"PSNR sparse vs dense {quality}"
        )
    if result.out is not None:
        lines.append(f"wrote      {result.out} ({t} frames, {w}x{h} pixels, {result.fps} fps)")
    return "\n".join(lines)


def _is_main_rank() -> bool:
    """False only on ranks other than 0 of an initialized process group (``--parallel``)."""
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def run(args: argparse.Namespace) -> int:
    result = generate(options_from_args(args))
    if not _is_main_rank():
        return 0  # --parallel: rank 0 prints the summary and writes --json
    print(format_summary(result), flush=True)
    if args.json:
        from vidsparse.video_io import atomic_output

        path = Path(args.json).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_output(path) as tmp:
            tmp.write_text(json.dumps(result.to_json(), indent=2) + "\n")
    return 0
