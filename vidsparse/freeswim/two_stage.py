"""FreeSwim's two-stage run on a diffusers Wan pipeline (``run_freeswim``).

1. **base**: the stock pipeline at the model's native (base) size, untouched;
2. **refine**: every frame bilinearly upsampled to the target size (the reference uses
   ``cv2.resize(INTER_LINEAR)``; ``F.interpolate(bilinear, align_corners=False)`` samples the
   same points), VAE-encoded (``latent_dist.mode()``), noised to ``strength`` and denoised for
   the remaining ``int(steps * strength)`` steps (35 of 50 at 0.7) by diffusers'
   ``WanVideoToVideoPipeline`` on the same components, with the dual path applied and a copy
   of the scheduler at ``flow_shift`` 9.0 (the reference assigns the shift to a frozen config
   attribute, which does not reach ``set_timesteps``; here the scheduler is rebuilt with it).

Everything is checked before any work (``check_freeswim``): the pipeline family, sizes the
VAE and patchify cannot take, a target smaller than the base, the step and cache options.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from vidsparse.freeswim.cache import cache_bytes, format_bytes
from vidsparse.freeswim.config import DualPathConfig
from vidsparse.freeswim.dual_path import (
    DualPathReport,
    apply_dual_path,
    check_wan_transformer,
    remove_dual_path,
)
from vidsparse.models.synthetic_world import HEIGHT as WORLD_HEIGHT
from vidsparse.models.synthetic_world import WIDTH as WORLD_WIDTH

# Native (training) sizes of known Wan transformers, keyed by (blocks, hidden size).
_NATIVE_SIZES: dict[tuple[int, int], tuple[int, int]] = {
    (30, 1536): (480, 832),  # Wan 2.1 T2V 1.3B
    (40, 5120): (720, 1280),  # Wan 2.1 / 2.2 14B
    (30, 3072): (704, 1280),  # Wan 2.2 TI2V 5B
    (2, 16): (32, 32),  # vidsparse's tiny random Wan (vidsparse.models.tiny)
    (4, 64): (WORLD_HEIGHT, WORLD_WIDTH),  # vidsparse's trained tiny Wan (vidsparse.models.tiny_trained)
}


@dataclass(frozen=True)
class FreeSwimOptions:
    """The two-stage run. Sizes in pixels; ``height``/``width`` are the target.

    ``base_height``/``base_width`` default to the model's native size (480x832 for Wan 2.1
    1.3B, 720x1280 for 14B). The dual-path fields are those of ``DualPathConfig``.
    """

    height: int
    width: int
    num_frames: int = 81
    base_height: int | None = None
    base_width: int | None = None
    strength: float = 0.7
    num_inference_steps: int = 50
    guidance_scale: float = 5.0
    flow_shift: float = 9.0
    cache_interval: int = 2
    override_uncond: bool | None = None
    attention_scale: str | float = "freeswim"
    cache_budget_bytes: int | None = None
    cache_overflow: str = "cpu"
    backend: str = "auto"
    block_size: int | None = None
    seed: int | None = 0
    output_type: str = "np"


@dataclass(frozen=True)
class StageProgress:
    stage: str  # "base" | "refine"
    step: int  # steps done in this stage
    total: int


@dataclass(frozen=True)
class StageSummary:
    name: str
    height: int
    width: int
    num_frames: int
    latent_grid: tuple[int, int, int]  # tokens after patchify (frames, h, w)
    steps: int
    seconds: float
    attention: str

    def describe(self) -> str:
        f, h, w = self.latent_grid
        return (
            f"{self.name}: {self.width}x{self.height} px (WxH), {self.num_frames} frames ({f}x{h}x{w} tokens, FxHxW), "
            f"{self.steps} steps, {self.seconds:.1f} s, {self.attention}"
        )


@dataclass(frozen=True)
class FreeSwimPlan:
    """What ``check_freeswim`` resolved: sizes, grids and the dual-path config."""

    base_size: tuple[int, int]
    target_size: tuple[int, int]
    base_grid: tuple[int, int]
    target_grid: tuple[int, int, int]
    refine_steps: int
    dual_path: DualPathConfig
    cache_estimate_bytes: int  # full cache at the model's dtype, one sample


@dataclass(frozen=True)
class FreeSwimResult:
    frames: Any  # the target-size video, in ``output_type``
    base_frames: torch.Tensor  # stage-1 video [B, F, C, H, W] in [0, 1]
    stages: tuple[StageSummary, StageSummary]
    dual_path: DualPathReport
    plan: FreeSwimPlan = field(repr=False)

    def describe(self) -> str:
        return "\n".join([*(s.describe() for s in self.stages), self.dual_path.describe()])


def native_size_of_config(config: Mapping[str, Any]) -> tuple[int, int] | None:
    """(height, width) a Wan transformer ``config.json`` was trained at, ``None`` if unknown.

    Reads only the config (block count and hidden size), so a command can resolve the base
    size before loading weights.
    """
    try:
        key = (int(config["num_layers"]), int(config["num_attention_heads"]) * int(config["attention_head_dim"]))
    except (KeyError, TypeError, ValueError):
        return None
    return _NATIVE_SIZES.get(key)


def native_size(transformer: Any) -> tuple[int, int]:
    """(height, width) the Wan transformer was trained at, or a ValueError asking for it."""
    cfg = transformer.config
    key = (int(cfg.num_layers), int(cfg.num_attention_heads * cfg.attention_head_dim))
    if key not in _NATIVE_SIZES:
        raise ValueError(
            f"vidsparse does not know the native size of this Wan transformer ({key[0]} blocks, hidden size "
            f"{key[1]}); pass base_height/base_width (--base-size HxW), the resolution it was trained at."
        )
    return _NATIVE_SIZES[key]


def scheduler_with_shift(scheduler: Any, shift: float) -> Any:
    """A copy of a flow-matching scheduler with its time shift set (the pipeline's stays)."""
    config = scheduler.config
    if "flow_shift" in config:  # UniPC / DPM-Solver with flow sigmas (Wan's own scheduler)
        return type(scheduler).from_config(config, flow_shift=float(shift))
    if "shift" in config:  # FlowMatchEulerDiscreteScheduler
        return type(scheduler).from_config(config, shift=float(shift))
    raise ValueError(
        f"flow_shift needs a flow-matching scheduler with a shift (UniPCMultistepScheduler with flow_shift, "
        f"FlowMatchEulerDiscreteScheduler); the pipeline has {type(scheduler).__name__}."
    )


def _positive_int(name: str, value: Any, minimum: int = 1) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}.")
    return value


def check_freeswim_sizes(
    options: FreeSwimOptions,
    base_size: tuple[int, int],
    *,
    multiple: tuple[int, int] = (16, 16),
    temporal: int = 4,
) -> int:
    """The size and step checks, without a pipeline (a CLI can run them before loading weights).

    ``multiple``: pixels per token on (h, w) (VAE spatial factor x patch; 16 for Wan);
    ``temporal``: the VAE's frame compression (4 for Wan). Returns the refinement steps.
    """
    if not isinstance(options, FreeSwimOptions):
        raise TypeError(f"options must be a vidsparse.freeswim.FreeSwimOptions, got {type(options).__name__}.")
    sizes = {"height": options.height, "width": options.width, "base_height": base_size[0], "base_width": base_size[1]}
    for name, value in sizes.items():
        _positive_int(name, value)
        m = multiple[0] if "height" in name else multiple[1]
        if value % m:
            raise ValueError(
                f"{name}={value} px: the Wan VAE and patchify need multiples of {m} px; use "
                f"{value - value % m or m} or {value - value % m + m}."
            )
    (h, w), (bh, bw) = (options.height, options.width), base_size
    if h < bh or w < bw:
        axes = " and ".join(f"{n} {t} < {b}" for n, t, b in (("height", h, bh), ("width", w, bw)) if t < b)
        raise ValueError(
            f"The target {h}x{w} px (HxW) is smaller than the base {bh}x{bw} px (HxW, the order of --base-size) "
            f"in {axes}; FreeSwim generates above the native size. Pass a larger --height/--width or a "
            "smaller --base-size HxW."
        )
    frames = _positive_int("num_frames", options.num_frames)
    if (frames - 1) % temporal:
        raise ValueError(
            f"num_frames={frames}: the Wan VAE compresses time {temporal}x and needs 1 + {temporal}k frames "
            f"(e.g. {1 + temporal * ((frames - 1) // temporal)} or {1 + temporal * ((frames - 1) // temporal + 1)})."
        )
    steps = _positive_int("num_inference_steps", options.num_inference_steps)
    s = options.strength
    if isinstance(s, bool) or not isinstance(s, (int, float)) or not 0 < s <= 1:
        raise ValueError(f"strength must be in (0, 1] (the reference uses 0.7), got {s!r}.")
    refine_steps = min(int(steps * s), steps)
    if refine_steps < 1:
        raise ValueError(f"strength={s} of {steps} steps leaves int({steps} * {s}) = 0 refinement steps; raise either.")
    return refine_steps


def check_freeswim(
    pipe: Any, options: FreeSwimOptions, *, prompt: Any = None, prompt_embeds: Any = None
) -> FreeSwimPlan:
    """Validate everything ``run_freeswim`` needs; one ValueError/TypeError, before any work."""
    import diffusers

    if not isinstance(options, FreeSwimOptions):
        raise TypeError(f"options must be a vidsparse.freeswim.FreeSwimOptions, got {type(options).__name__}.")
    transformer = getattr(pipe, "transformer", None)
    if transformer is None or not hasattr(pipe, "components"):
        raise ValueError(
            f"run_freeswim needs a diffusers Wan text-to-video pipeline with a transformer, got {type(pipe).__name__}."
        )
    check_wan_transformer(transformer)
    if not isinstance(pipe, diffusers.WanPipeline):
        raise ValueError(
            f"run_freeswim runs stage 1 with a diffusers WanPipeline (text-to-video); got {type(pipe).__name__}."
        )
    if getattr(pipe, "transformer_2", None) is not None:
        raise ValueError(
            "run_freeswim supports single-transformer Wan pipelines (Wan 2.1, Wan 2.2 TI2V 5B); this one holds "
            "transformer_2 (Wan 2.2 A14B), which diffusers' WanVideoToVideoPipeline cannot run in stage 2."
        )
    vae_s, vae_t = pipe.vae_scale_factor_spatial, pipe.vae_scale_factor_temporal
    p_t, p_h, p_w = transformer.config.patch_size
    multiple_h, multiple_w = vae_s * p_h, vae_s * p_w
    if (options.base_height is None) != (options.base_width is None):
        raise ValueError(
            f"Pass both base_height and base_width (or neither for the native size), got "
            f"base_height={options.base_height!r}, base_width={options.base_width!r}."
        )
    base = (options.base_height, options.base_width) if options.base_height is not None else native_size(transformer)
    refine_steps = check_freeswim_sizes(options, base, multiple=(multiple_h, multiple_w), temporal=vae_t)
    frames = options.num_frames
    if (
        not isinstance(options.flow_shift, (int, float))
        or isinstance(options.flow_shift, bool)
        or options.flow_shift <= 0
    ):
        raise ValueError(f"flow_shift must be a number > 0 (the reference uses 9.0), got {options.flow_shift!r}.")
    scheduler_with_shift(pipe.scheduler, options.flow_shift)
    if options.output_type not in ("np", "pt", "pil", "latent"):
        raise ValueError(f"output_type must be 'np', 'pt', 'pil' or 'latent', got {options.output_type!r}.")
    if (prompt is None) == (prompt_embeds is None):
        raise ValueError("Pass exactly one of prompt (text) and prompt_embeds.")
    if prompt is not None and getattr(pipe, "text_encoder", None) is None:
        raise ValueError(
            "This pipeline has no text encoder (e.g. the tiny model); pass prompt_embeds "
            "(vidsparse.models.tiny.encode_prompt_tiny) instead of prompt."
        )
    base_grid = (base[0] // multiple_h, base[1] // multiple_w)
    dual = DualPathConfig.from_options(options, base_grid)
    latent_frames = (frames - 1) // vae_t + 1
    target_grid = (latent_frames // p_t, options.height // multiple_h, options.width // multiple_w)
    inner = int(transformer.config.num_attention_heads * transformer.config.attention_head_dim)
    itemsize = torch.empty((), dtype=transformer.dtype).element_size()
    estimate = cache_bytes(
        target_grid[0] * target_grid[1] * target_grid[2], inner, len(transformer.blocks), 1, itemsize
    )
    return FreeSwimPlan(
        base_size=base,
        target_size=(options.height, options.width),
        base_grid=base_grid,
        target_grid=target_grid,
        refine_steps=refine_steps,
        dual_path=dual,
        cache_estimate_bytes=estimate if options.cache_interval > 1 else 0,
    )


def upsample_frames(video: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """[B, F, C, h, w] in [0, 1] -> [B, F, C, height, width], bilinear per frame."""
    b, f, c, h, w = video.shape
    out = F.interpolate(
        video.reshape(b * f, c, h, w).float(), size=(height, width), mode="bilinear", align_corners=False
    )
    return out.clamp(0.0, 1.0).reshape(b, f, c, height, width)


def _progress_callback(stage: str, total: int, progress: Callable[[StageProgress], None] | None):
    if progress is None:
        return None

    def callback(pipe, i, t, callback_kwargs):
        progress(StageProgress(stage, i + 1, total))
        return {}

    return callback


def run_freeswim(
    pipe: Any,
    options: FreeSwimOptions,
    *,
    prompt: str | list[str] | None = None,
    negative_prompt: str | list[str] | None = None,
    prompt_embeds: torch.Tensor | None = None,
    negative_prompt_embeds: torch.Tensor | None = None,
    progress: Callable[[StageProgress], None] | None = None,
    generator_device: str = "cpu",
) -> FreeSwimResult:
    """Generate at the base size, then refine at the target size with FreeSwim's dual path.

    ``pipe`` is a diffusers ``WanPipeline``; it is left as it was (its scheduler untouched,
    the dual path removed from its transformer even on error). ``progress`` gets a
    ``StageProgress`` after every denoising step of each stage.
    """
    from diffusers import WanVideoToVideoPipeline

    plan = check_freeswim(pipe, options, prompt=prompt, prompt_embeds=prompt_embeds)
    if prompt is not None:
        # Encode the text once for both stages. diffusers 0.42.1's WanVideoToVideoPipeline also
        # calls ftfy without checking that it is installed (WanPipeline checks), so stage 2
        # must get embeddings, not text.
        prompt_embeds, negative_prompt_embeds = pipe.encode_prompt(
            prompt=prompt,
            negative_prompt=negative_prompt,
            do_classifier_free_guidance=options.guidance_scale > 1.0,
            device=pipe._execution_device,
        )
    text = dict(prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds)

    def generator():
        return None if options.seed is None else torch.Generator(generator_device).manual_seed(options.seed)

    # Stage 1: the stock pipeline at the native size.
    bh, bw = plan.base_size
    start = time.perf_counter()
    base = pipe(
        **text,
        height=bh,
        width=bw,
        num_frames=options.num_frames,
        num_inference_steps=options.num_inference_steps,
        guidance_scale=options.guidance_scale,
        generator=generator(),
        output_type="pt",
        callback_on_step_end=_progress_callback("base", options.num_inference_steps, progress),
    ).frames
    f, _, _ = plan.target_grid
    stage1 = StageSummary(
        "stage 1 (base)", bh, bw, options.num_frames, (f, *plan.base_grid), options.num_inference_steps,
        time.perf_counter() - start, "dense (the model's own attention)",
    )  # fmt: skip

    # Stage 2: upsample, encode, noise to strength, denoise the remaining steps with the dual path.
    start = time.perf_counter()
    video = upsample_frames(base, options.height, options.width)
    refine = WanVideoToVideoPipeline(
        tokenizer=pipe.tokenizer,
        text_encoder=pipe.text_encoder,
        transformer=pipe.transformer,
        vae=pipe.vae,
        scheduler=scheduler_with_shift(pipe.scheduler, options.flow_shift),
    )
    refine.set_progress_bar_config(**getattr(pipe, "_progress_bar_config", {}))
    states = apply_dual_path(pipe.transformer, plan.dual_path)
    try:
        frames = refine(
            video=video,
            **text,
            height=options.height,
            width=options.width,
            num_inference_steps=options.num_inference_steps,
            guidance_scale=options.guidance_scale,
            strength=options.strength,
            generator=generator(),
            output_type=options.output_type,
            callback_on_step_end=_progress_callback("refine", plan.refine_steps, progress),
        ).frames
        report = states[0].report()
    finally:
        remove_dual_path(pipe.transformer)
    c = options.cache_interval
    what = "no cache" if c == 1 else f"cache every {c} steps ({format_bytes(plan.cache_estimate_bytes)} per sample)"
    stage2 = StageSummary(
        "stage 2 (refine)", options.height, options.width, options.num_frames, plan.target_grid, plan.refine_steps,
        time.perf_counter() - start,
        f"FreeSwim window {2 * (plan.base_grid[0] // 2) + 1}x{2 * (plan.base_grid[1] // 2) + 1} tokens (HxW) + full "
        f"branch, {what}",
    )  # fmt: skip
    return FreeSwimResult(frames, base, (stage1, stage2), report, plan)
