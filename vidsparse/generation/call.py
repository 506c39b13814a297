"""One pipeline call of a ``GenerationPlan``: its keyword arguments and per-step timing.

Shared by single-process generation (``generation.run``) and ``vidsparse.parallel.generate``,
so both make the same call with the same seed.
"""

from __future__ import annotations

import contextlib
import inspect
import itertools
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
import torch

from vidsparse.generation.options import GenerateOptions, GenerationPlan
from vidsparse.video_io import as_uint8_frames


class StepClock:
    """Per-step wall times: each step from its first transformer forward to its end (the step callback).

    Time between a step's end and the next step's first forward is left out: the scheduler's few
    operations, and for Wan-Animate the decode and encodes between two segments (counted in the
    VAE decode time, not twice).
    """

    def __init__(self, pipe, device: torch.device, on_step=None) -> None:
        self.device = device
        self.on_step = on_step
        self.start: float | None = None
        self._starts: list[float] = []
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
        if len(self._starts) == len(self.ends):  # the first forward of a step
            self._sync()
            self._starts.append(time.perf_counter())
            if self.start is None:
                self.start = self._starts[0]

    def callback(self, pipe, step, timestep, callback_kwargs):
        self._sync()
        now = time.perf_counter()
        if len(self._starts) == len(self.ends):  # a step without a transformer forward
            self._starts.append(self.ends[-1] if self.ends else now)
        self.ends.append(now)
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
        return tuple(b - a for a, b in zip(self._starts, self.ends))


def call_kwargs(
    pipe,
    plan: GenerationPlan,
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
    family = plan.info.model_family
    transformer = getattr(pipe, "transformer", None) or getattr(pipe, "transformer_2", None)
    if family.tiny_prompt_kwargs is not None and getattr(pipe, "text_encoder", "absent") is None:
        # A tiny pipeline of this family (no text encoder): its record hashes the prompt.
        kwargs.update(family.tiny_prompt_kwargs(pipe, options.prompt, options.negative_prompt))
    elif getattr(pipe, "text_encoder", "absent") is None and "text_dim" in getattr(transformer, "config", {}):
        # A tiny Wan-architecture pipeline (Wan, SkyReels-V2, Wan VACE; also once saved to a
        # folder) has no text encoder: hash the prompt into embeddings of the transformer's text_dim.
        from vidsparse.models.tiny import encode_prompt_tiny

        emb = dict(dim=transformer.config.text_dim, device=device, dtype=transformer.dtype)
        kwargs["prompt_embeds"] = encode_prompt_tiny(options.prompt, **emb)
        kwargs["negative_prompt_embeds"] = encode_prompt_tiny(options.negative_prompt, **emb)
    else:
        kwargs["prompt"] = options.prompt
        if options.negative_prompt:
            kwargs["negative_prompt"] = options.negative_prompt
    if plan.image is not None:
        from PIL import Image

        with Image.open(plan.image) as im:
            kwargs["image"] = im.convert("RGB")
    if plan.condition_video is not None:  # as the family's record says this pipeline takes it
        from vidsparse.families import family_of_pipeline
        from vidsparse.video_io import read_frames

        frames = read_frames(plan.condition_video, max_frames=plan.frames)
        kwargs.update(family_of_pipeline(type(pipe).__name__).condition_video[type(pipe).__name__](frames))
    if plan.animate is not None:  # WanAnimatePipeline: --frames is the segment length, the video the pose's
        a = plan.animate  # its videos were decoded once, when the options were checked
        kwargs.update(segment_frame_length=plan.frames, mode=a.mode, **a.videos)
    accepted = inspect.signature(pipe.__call__).parameters
    if "num_frames" not in accepted and "segment_frame_length" not in accepted:
        raise ValueError(f"{type(pipe).__name__} is not a video pipeline (its __call__ takes no num_frames).")
    return {k: v for k, v in kwargs.items() if k in accepted and v is not None}


def _wrap_method(obj, name: str, wrapper) -> Callable[[], None]:
    """Set ``obj.<name>`` to ``wrapper(original bound method)``; returns the undo, which puts back an
    instance attribute that was there before, else deletes the wrapper (the class's method shows again)."""
    own = vars(obj).get(name)
    setattr(obj, name, wrapper(getattr(obj, name)))

    def undo() -> None:
        if own is not None:
            setattr(obj, name, own)
        else:
            delattr(obj, name)

    return undo


class DecodeClock:
    """Seconds spent in ``pipe.vae.decode`` during a pipeline call (the VAE decode is often the
    largest part of a CPU run, so summaries show it apart from the denoising steps).

    Wraps the VAE instance's ``decode`` for the duration of the call and restores it on ``close``.
    """

    def __init__(self, pipe, device: torch.device) -> None:
        self.device, self.seconds, self.calls = device, 0.0, 0
        self._undo = None
        vae = getattr(pipe, "vae", None)
        if vae is None or not callable(getattr(vae, "decode", None)):
            return

        def timed(inner):
            def decode(*args, **kwargs):
                self._sync()
                t0 = time.perf_counter()
                try:
                    return inner(*args, **kwargs)
                finally:
                    self._sync()
                    self.seconds += time.perf_counter() - t0
                    self.calls += 1

            return decode

        self._undo = _wrap_method(vae, "decode", timed)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def close(self) -> None:
        if self._undo is not None:
            self._undo()
            self._undo = None


@contextlib.contextmanager
def step_end_callback(pipe, callback):
    """For a pipeline whose ``__call__`` takes no ``callback_on_step_end`` (HunyuanVideo 1.5's):
    call ``callback(pipe, step, timestep, {})`` after each ``pipe.scheduler.step`` while the
    block runs, so step times and sparse-step counts exist for it too. Otherwise does nothing
    (the pipeline calls the callback itself)."""
    scheduler = getattr(pipe, "scheduler", None)
    accepted = inspect.signature(pipe.__call__).parameters
    if callback is None or "callback_on_step_end" in accepted or not callable(getattr(scheduler, "step", None)):
        yield
        return
    steps = itertools.count()

    def calling_back(inner):
        def step(*args, **kwargs):
            out = inner(*args, **kwargs)
            callback(pipe, next(steps), args[1] if len(args) > 1 else kwargs.get("timestep"), {})
            return out

        return step

    undo = _wrap_method(scheduler, "step", calling_back)
    try:
        yield
    finally:
        undo()


class PipelineRun(NamedTuple):
    """One timed pipeline call."""

    frames: np.ndarray  # uint8 [T, H, W, 3]
    step_times: tuple[float, ...]
    call_s: float  # the whole call: text encoding, denoising, VAE decode, post-processing
    decode_s: float  # inside pipe.vae.decode


def run_pipeline(pipe, plan: GenerationPlan, options: GenerateOptions, on_step=None) -> PipelineRun:
    """One pipeline call; returns the frames, step times, whole-call and VAE-decode seconds."""
    clock = StepClock(pipe, plan.device, on_step)
    kwargs = call_kwargs(pipe, plan, options, plan.steps, "np", clock.callback)
    decode = DecodeClock(pipe, plan.device)
    t0 = time.perf_counter()
    try:
        with torch.inference_mode(), step_end_callback(pipe, clock.callback):
            output = pipe(**kwargs)
    finally:
        clock.close()
        decode.close()
    call_s = time.perf_counter() - t0
    frames = output.frames if hasattr(output, "frames") else output[0]
    video = as_uint8_frames(frames[0] if isinstance(frames, (list, tuple)) else frames)
    return PipelineRun(video, clock.step_times, call_s, decode.seconds)


def warmup(pipe, plan: GenerationPlan, options: GenerateOptions) -> None:
    """One untimed denoising step without VAE decode: lazy initialisation, kernel compilation and
    plan building happen here, so the timed dense and sparse runs compare like with like."""
    with torch.inference_mode():
        pipe(**call_kwargs(pipe, plan, options, 1, "latent", None))


__all__ = ["DecodeClock", "PipelineRun", "StepClock", "call_kwargs", "run_pipeline", "step_end_callback", "warmup"]
