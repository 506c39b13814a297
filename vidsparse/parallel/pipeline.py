"""One parallel generation on a diffusers pipeline: shard, denoise, decode, assemble.

Every rank runs the same pipeline call with the same seed (the initial noise is drawn
whole, so it does not depend on the number of ranks); the transformers are parallelized
(``model.parallelize``) and the latents come back identical on every rank. Decoding:

- Wan pipelines: the VAE decodes one clip per rank (``vae.decode_parallel``; Wan's VAE is
  causal with a per-frame feature cache, so a clip decoded with context from frame 0 is
  bit-identical) and rank 0 alone holds the finished video;
- every other family (HunyuanVideo, CogVideoX, Mochi, LTX-Video): the pipeline decodes with
  its own code on every rank (exact; the decode is replicated, not split). Their VAEs are not
  per-frame causal streams (GroupNorm statistics over all frames: HunyuanVideo, CogVideoX's
  frame-batched conv cache, Mochi's and LTX's non-causal decoders, LTX's timestep-conditioned
  decode with noise), so a clip decoded alone differs from the whole-video decode even with
  full context; rank 0 keeps the video, the other ranks drop theirs.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from vidsparse.config import SparseConfig
from vidsparse.parallel.diffusers_cp import choose_ulysses, disable_diffusers_ulysses, enable_diffusers_ulysses
from vidsparse.parallel.model import parallelize, unparallelize
from vidsparse.parallel.runtime import ParallelRuntime
from vidsparse.parallel.vae import decode_parallel
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

    @property
    def bytes_per_step(self) -> float:
        return self.comm.get("total_bytes", 0) / max(1, self.steps)


def _wan_latents_for_decode(pipe, latents: torch.Tensor) -> torch.Tensor:
    """Undo Wan's latent normalisation exactly as ``WanPipeline.__call__`` does before decoding."""
    vae = pipe.vae
    latents = latents.to(vae.device, dtype=vae.dtype)
    mean = torch.tensor(vae.config.latents_mean).view(1, vae.config.z_dim, 1, 1, 1).to(latents.device, latents.dtype)
    inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, vae.config.z_dim, 1, 1, 1).to(
        latents.device, latents.dtype
    )
    return latents / inv_std + mean


_PER_CLIP_DECODE = ("WanPipeline", "WanImageToVideoPipeline", "WanVideoToVideoPipeline")


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

    ``call_kwargs`` must not contain ``output_type`` (decoding is done here: per clip for Wan, by the
    pipeline itself on every rank for the other families); ``output_type="latent"`` skips decoding
    and returns the latents on every rank. ``ulysses`` ("auto" | "diffusers" | "vidsparse"): which
    Ulysses runs ``mode="ulysses"``; "auto" takes diffusers' context parallelism for transformers with
    a ``_cp_plan`` (``diffusers_cp.choose_ulysses``), vidsparse's own for the others.
    """
    if "output_type" in call_kwargs:
        raise ValueError("run_parallel decodes per clip itself; pass output_type= to run_parallel, not in call_kwargs.")
    per_clip = type(pipe).__name__ in _PER_CLIP_DECODE
    if not hasattr(pipe, "transformer"):
        raise ValueError(
            f"run_parallel expects a diffusers video pipeline with a transformer, got {type(pipe).__name__}."
        )
    impl = "vidsparse"
    if mode == "ulysses":
        impl, _ = choose_ulysses([t for _, t in transformers_of(pipe)], runtime, ulysses)
    if impl == "diffusers":
        enable_diffusers_ulysses(pipe, config, runtime)
    else:
        parallelize(pipe, config, mode, runtime)
    video, decode = None, 0.0
    try:
        runtime.stats.reset()
        t0 = time.perf_counter()
        if per_clip or output_type == "latent":
            latents = pipe(**call_kwargs, output_type="latent").frames
            denoise = time.perf_counter() - t0
        else:  # the pipeline's own decode on every rank (exact); the denoised latents from the step callback
            keep = _LastLatents(call_kwargs.get("callback_on_step_end"))
            inputs = list(call_kwargs.get("callback_on_step_end_tensor_inputs") or [])
            kwargs = dict(call_kwargs)
            if "callback_on_step_end" in inspect.signature(pipe.__call__).parameters:  # HunyuanVideo 1.5: none
                kwargs.update(callback_on_step_end=keep,
                              callback_on_step_end_tensor_inputs=sorted(set(inputs) | {"latents"}))  # fmt: skip
            video = pipe(**kwargs, output_type=output_type).frames
            end = time.perf_counter()
            latents = keep.latents
            denoise = (keep.last_step_at or end) - t0
            decode = end - t0 - denoise
        comm = runtime.stats.snapshot()
        fns = [get_state(t).attention_fn for _, t in transformers_of(pipe)]
        patterns = dict(fns[0].used)
        sparse_steps = len(set().union(*(fn.sparse_steps for fn in fns)))
    finally:
        if impl == "diffusers":
            disable_diffusers_ulysses(pipe)
        else:
            unparallelize(pipe)
    steps = int(call_kwargs.get("num_inference_steps", 0) or len(getattr(pipe.scheduler, "timesteps", [])) or 1)
    if not per_clip and output_type != "latent":
        video = video if runtime.is_main else None
        return ParallelResult(
            video, latents, mode, runtime.world_size, steps, denoise, decode, comm, patterns, sparse_steps
        )
    if output_type == "latent":
        return ParallelResult(
            latents, latents, mode, runtime.world_size, steps, denoise, 0.0, comm, patterns, sparse_steps
        )
    t1 = time.perf_counter()
    video = decode_parallel(pipe.vae, _wan_latents_for_decode(pipe, latents), runtime, overlap=vae_overlap)
    if video is not None:
        video = pipe.video_processor.postprocess_video(video, output_type=output_type)
    decode = time.perf_counter() - t1
    return ParallelResult(
        video, latents, mode, runtime.world_size, steps, denoise, decode, comm, patterns, sparse_steps
    )
