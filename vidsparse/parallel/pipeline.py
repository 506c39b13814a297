"""One parallel generation on a diffusers pipeline: shard, denoise, decode, assemble.

Every rank runs the same pipeline call with the same seed (the initial noise is drawn
whole, so it does not depend on the number of ranks); the transformers are parallelized
(``model.parallelize``) and the latents come back identical on every rank. Decoding: the
pipeline runs its own decode step (de-normalisation, LTX-Video's decode noise, CogVideoX 1.5's
padding frames) with ``vae.decode`` replaced by the per-clip decode (``vae.per_clip_decode``)
when the VAE's family says how to cut it (``Family.clip_decode``: Wan, HunyuanVideo, CogVideoX,
Mochi, LTX-Video, LTX-2, ...); rank 0 alone holds the finished video. A VAE without a record, or a
pipeline that reads its decoded frames back (``Family.replicated_decode``: Wan-Animate's segments),
decodes the whole video on every rank (exact, replicated) and rank 0 keeps it. Decode steps only rank 0
needs (``Family.main_rank_decode``: LTX-2's audio VAE and vocoder) run on rank 0 alone.
"""

from __future__ import annotations

import contextlib
import inspect
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from vidsparse.config import SparseConfig
from vidsparse.families import clip_decode_of
from vidsparse.parallel.diffusers_cp import choose_ulysses, disable_diffusers_ulysses, enable_diffusers_ulysses
from vidsparse.parallel.model import parallelize, unparallelize
from vidsparse.parallel.runtime import ParallelRuntime
from vidsparse.parallel.vae import DECODE_OP, check_overlap, per_clip_decode
from vidsparse.patterns import Pattern
from vidsparse.pipelines import get_state, transformers_of


@dataclass
class ParallelResult:
    """What a parallel generation returns on each rank (``video`` on rank 0 only)."""

    video: Any  # np.ndarray [B, T, H, W, C] in [0, 1] (output_type "np"), latents, or None off rank 0
    latents: torch.Tensor | None  # None: the pipeline decoded itself and takes no step callback (HunyuanVideo 1.5)
    mode: str
    world_size: int
    steps: int
    denoise_seconds: float
    decode_seconds: float
    comm: dict[str, Any] = field(default_factory=dict)
    patterns: dict[int, Any] = field(default_factory=dict)  # layer -> (pattern, block) of its sparse steps
    sparse_steps: int = 0  # denoising steps with at least one sparse self-attention layer
    decode_bytes: int = 0  # this rank's share of the per-clip decode sent to rank 0 (not in ``comm``)
    audio: Any = None  # rank 0: the pipeline's ``audio`` output (LTX-2), decoded there only; None elsewhere
    # Layers that ran dense because their plan kept every pair of the video (SparseConfig.dense_when_full):
    # layer -> the pattern's repr
    full_layers: dict[int, str] = field(default_factory=dict)

    @property
    def bytes_per_step(self) -> float:
        return self.comm.get("total_bytes", 0) / max(1, self.steps)


class _LastLatents:
    """A ``callback_on_step_end`` that keeps the latents after the last step (and calls the user's)."""

    def __init__(self, inner) -> None:
        self.inner, self.latents, self.last_step_at = inner, None, None

    def __call__(self, pipe, step, timestep, callback_kwargs):
        out = self.inner(pipe, step, timestep, callback_kwargs) if self.inner is not None else callback_kwargs
        self.latents = (out or {}).get("latents", callback_kwargs["latents"])  # as the user's callback left them
        self.last_step_at = time.perf_counter()
        return out


def run_parallel(
    pipe,
    call_kwargs: Mapping[str, Any],
    config: SparseConfig | Pattern | str,
    mode: str,
    runtime: ParallelRuntime,
    *,
    output_type: str = "np",
    vae_overlap: int | None = 4,
    ulysses: str = "auto",
) -> ParallelResult:
    """Run ``pipe(**call_kwargs)`` with ``mode`` parallelism; rank 0 gets the decoded video.

    ``call_kwargs`` must not contain ``output_type`` (pass it here). The pipeline decodes with its
    own code; ``vae.decode`` is per clip (``vae_overlap`` latent frames of context, ``None`` = full
    context) for VAEs with a ``ClipDecode`` record, whole on every rank otherwise and for pipelines whose
    family reads the decode back (``Family.replicated_decode``: Wan-Animate; ``vae_overlap`` is unused there).
    ``output_type="latent"`` skips decoding and returns the latents on every rank. ``ulysses``
    ("auto" | "diffusers" | "vidsparse"): which Ulysses runs ``mode="ulysses"``; "auto" takes
    diffusers' context parallelism for transformers with a ``_cp_plan`` (``diffusers_cp.choose_ulysses``),
    vidsparse's own for the others.
    """
    if "output_type" in call_kwargs:
        raise ValueError("run_parallel decodes itself; pass output_type= to run_parallel, not in call_kwargs.")
    if not hasattr(pipe, "transformer"):
        raise ValueError(
            f"run_parallel expects a diffusers video pipeline with a transformer, got {type(pipe).__name__}."
        )
    vae = getattr(pipe, "vae", None)
    per_clip = output_type != "latent" and vae is not None and clip_decode_of(vae) is not None
    per_clip = per_clip and not _replicated_decode(pipe)
    check_overlap(vae_overlap)  # before any work
    impl = "vidsparse"
    if mode == "ulysses":
        impl, _ = choose_ulysses([t for _, t in transformers_of(pipe)], runtime, ulysses)
    if impl == "diffusers":
        enable_diffusers_ulysses(pipe, config, runtime)
    else:
        parallelize(pipe, config, mode, runtime)
    video, audio, decode = None, None, 0.0
    try:
        runtime.stats.reset()
        t0 = time.perf_counter()
        if output_type == "latent":
            latents = pipe(**call_kwargs, output_type="latent").frames
            denoise = time.perf_counter() - t0
        else:  # the pipeline's own decode step; the denoised latents from the step callback
            keep = _LastLatents(call_kwargs.get("callback_on_step_end"))
            inputs = list(call_kwargs.get("callback_on_step_end_tensor_inputs") or [])
            kwargs = dict(call_kwargs)
            if "callback_on_step_end" in inspect.signature(pipe.__call__).parameters:  # HunyuanVideo 1.5: none
                kwargs.update(callback_on_step_end=keep,
                              callback_on_step_end_tensor_inputs=sorted(set(inputs) | {"latents"}))  # fmt: skip
            with contextlib.ExitStack() as stack:
                if per_clip:
                    stack.enter_context(per_clip_decode(vae, runtime, vae_overlap))
                stack.enter_context(main_rank_only(pipe, _main_rank_decode(pipe), runtime))
                output = pipe(**kwargs, output_type=output_type)
            video, audio = output.frames, getattr(output, "audio", None)
            end = time.perf_counter()
            latents = keep.latents
            denoise = (keep.last_step_at or end) - t0
            decode = end - t0 - denoise
        comm = runtime.stats.snapshot()
        decode_bytes = comm["bytes_sent"].pop(DECODE_OP, 0)  # once per video, not per step
        comm["calls"].pop(DECODE_OP, None)
        comm["total_bytes"] -= decode_bytes
        fns = [get_state(t).attention_fn for _, t in transformers_of(pipe)]
        patterns = dict(fns[0].used)
        full_layers = dict(fns[0].full_layers)
        sparse_steps = len(set().union(*(fn.sparse_steps for fn in fns)))
    finally:
        if impl == "diffusers":
            disable_diffusers_ulysses(pipe)
        else:
            unparallelize(pipe)
    steps = int(call_kwargs.get("num_inference_steps", 0) or len(getattr(pipe.scheduler, "timesteps", [])) or 1)
    if output_type == "latent":
        video = latents
    elif not runtime.is_main:
        video, audio = None, None
    return ParallelResult(
        video, latents, mode, runtime.world_size, steps, denoise, decode, comm, patterns, sparse_steps, decode_bytes,
        audio, full_layers,
    )  # fmt: skip


def _replicated_decode(pipe) -> bool:
    """True when a transformer's family reads the pipeline's decoded frames back
    (``Family.replicated_decode``: Wan-Animate's segments): every rank then decodes whole."""
    from vidsparse.families import family_of

    return any(family_of(t).replicated_decode for _, t in transformers_of(pipe))


def _main_rank_decode(pipe) -> tuple[str, ...]:
    """The pipeline steps only rank 0 runs (``Family.main_rank_decode`` of its transformers' families)."""
    from vidsparse.families import family_of

    steps: dict[str, None] = {}
    for _, transformer in transformers_of(pipe):
        steps.update(dict.fromkeys(family_of(transformer).main_rank_decode))
    return tuple(steps)


@contextlib.contextmanager
def main_rank_only(pipe, steps: tuple[str, ...], runtime: ParallelRuntime):
    """While active, each "<component>.<method>" of ``steps`` runs on rank 0 only; the other ranks get
    an empty tensor (what they return is dropped: rank 0 alone keeps the pipeline's output)."""
    if runtime.is_main or not steps:
        yield
        return
    patched = []
    try:
        for step in steps:
            name, _, method = step.partition(".")
            component = getattr(pipe, name, None)
            if component is None or not method:
                continue

            def skipped(*args, **kwargs):
                empty = torch.empty(0, device=runtime.device)
                if "return_dict" not in kwargs:  # a module's forward (the vocoder)
                    return empty
                if not kwargs["return_dict"]:
                    return (empty,)
                from diffusers.models.autoencoders.vae import DecoderOutput

                return DecoderOutput(sample=empty)

            shadowed = component.__dict__.get(method)
            setattr(component, method, skipped)
            patched.append((component, method, shadowed))
        yield
    finally:
        for component, method, shadowed in reversed(patched):
            if shadowed is None:
                delattr(component, method)
            else:
                setattr(component, method, shadowed)
