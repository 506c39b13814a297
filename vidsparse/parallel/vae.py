"""Decode the latent video per clip on every rank and assemble the frames on rank 0.

After the last denoising step every rank holds the same latents. Rank r decodes the latent
frames of its clip plus context with the VAE's own ``decode``, keeps the pixel frames of its
clip, and sends them to rank 0. What "its clip plus context" is depends on the VAE: causal or
not, frame batches, temporal tiles. That is the family's ``ClipDecode`` record
(``vidsparse.families.decode``; found by VAE class with ``clip_decode_of``), so this module
knows nothing about any VAE:

- ``record.cut`` moves the clip boundaries of ``FramePartition`` to latent frames where the
  VAE's decode may be cut (CogVideoX: its frame batches);
- ``record.pixel`` says where each clip's pixels are in the whole decode;
- ``record.window(vae, F, start, end, overlap)`` says which latent frames to decode (``overlap``
  latent frames of context; ``None`` = full context, the exact setting) and the pixel offset.

``per_clip_decode`` installs this as the VAE's ``decode`` for one pipeline call, so the pipeline's
own code prepares the latents (de-normalisation, LTX-Video's decode noise and timestep,
CogVideoX 1.5's padding frames) exactly as on one device. Measured errors vs overlap per family:
docs/parallel.md.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from itertools import accumulate
from typing import Any

import torch

from vidsparse.families import ClipDecode, clip_decode_of
from vidsparse.parallel.comm import exchange
from vidsparse.parallel.partition import FramePartition
from vidsparse.parallel.runtime import ParallelRuntime

#: ``CommStats`` name of the decoded frames sent to rank 0 (once per video, kept out of per-step figures).
DECODE_OP = "video_to_rank0"


def check_overlap(overlap: int | None) -> None:
    if overlap is not None and (isinstance(overlap, bool) or not isinstance(overlap, int) or overlap < 1):
        raise ValueError(
            f"vae_overlap must be None (full context: exact) or an int >= 1 latent frames of context, got {overlap!r}."
        )


def record_of(vae: Any) -> ClipDecode:
    """The ``ClipDecode`` of ``vae``, or a ValueError naming the VAEs that have one."""
    record = clip_decode_of(vae)
    if record is None:
        from vidsparse.families import families

        known = sorted(c for f in families() if f.clip_decode is not None for c in f.clip_decode.vae_classes)
        raise ValueError(
            f"No per-clip decode is known for {type(vae).__name__} (known: {', '.join(known)}); "
            "decode the whole video instead (run_parallel does this for such pipelines)."
        )
    return record


def clip_bounds(vae: Any, frames: int, world_size: int) -> list[tuple[int, int]]:
    """Per rank, the latent frames ``[start, end)`` whose pixels it decodes (may be empty past rank 0)."""
    record = record_of(vae)
    bounds = FramePartition(frames, world_size).bounds
    starts = [0] + [record.cut(vae, frames, s) for s, _ in bounds[1:]]
    starts = list(accumulate(starts, max))
    return list(zip(starts, [*starts[1:], frames]))


def pixel_counts(vae: Any, frames: int, world_size: int) -> list[int]:
    """Pixel frames each rank contributes to the whole decode."""
    record = record_of(vae)
    return [
        record.pixel(vae, frames, e) - record.pixel(vae, frames, s) for s, e in clip_bounds(vae, frames, world_size)
    ]


def decode_clip(
    vae: Any, latents: torch.Tensor, start: int, end: int, overlap: int | None, *args, decode=None, **kwargs
):
    """Pixel frames [B, C, T, H, W] of latent frames ``[start, end)`` of the whole decode of ``latents``.

    ``start``/``end`` must be clip boundaries of ``clip_bounds`` (any frame for most VAEs).
    ``decode`` is the VAE's decode function (default ``vae.decode``); ``args``/``kwargs`` go to it
    (LTX-Video's ``temb``).
    """
    check_overlap(overlap)
    record = record_of(vae)
    frames = latents.shape[2]
    win = record.window(vae, frames, start, end, overlap)
    p0 = record.pixel(vae, frames, start) - win.offset
    p1 = record.pixel(vae, frames, end) - win.offset
    if not (0 <= win.first <= start and end <= win.end <= frames and 0 <= p0 <= p1):
        raise RuntimeError(f"{type(vae).__name__}: window {win} does not hold latent frames [{start}, {end}).")
    decode = vae.decode if decode is None else decode
    with torch.no_grad():
        video = decode(latents[:, :, win.first : win.end], *args, return_dict=False, **kwargs)[0]
    if video.shape[2] < p1:
        raise RuntimeError(
            f"{type(vae).__name__} decoded {video.shape[2]} pixel frames from latent frames "
            f"[{win.first}, {win.end}), expected at least {p1} (the ClipDecode record is out of date)."
        )
    return video[:, :, p0:p1]


def assemble_on_rank0(video: torch.Tensor, runtime: ParallelRuntime, frame_counts: list[int]) -> torch.Tensor | None:
    """Send every rank's frames [B, C, T_r, H, W] to rank 0; the whole video there, None elsewhere.

    Ranks with no frames send nothing (rank 0 always has frames: the first clip)."""
    if runtime.rank == 0:
        shapes = {}
        for r in range(1, runtime.world_size):
            if frame_counts[r]:
                shp = list(video.shape)
                shp[2] = frame_counts[r]
                shapes[r] = tuple(shp)
        parts = exchange({}, shapes, runtime, video.dtype, op=DECODE_OP).wait()
        return torch.cat([video] + [parts[r] for r in sorted(parts)], dim=2)
    exchange({0: video} if frame_counts[runtime.rank] else {}, {}, runtime, video.dtype, op=DECODE_OP).wait()
    return None


def decode_parallel(
    vae, latents: torch.Tensor, runtime: ParallelRuntime, overlap: int | None = 4, *args, decode=None, **kwargs
) -> torch.Tensor | None:
    """Decode ``latents`` [B, C, F, h, w] split by clip across ranks; the video on rank 0 only.

    ``latents`` must be identical on every rank and be what ``vae.decode`` takes.
    """
    if latents.dim() != 5:
        raise ValueError(f"decode_parallel expects latents [B, C, F, h, w], got shape {tuple(latents.shape)}.")
    frames = latents.shape[2]
    bounds = clip_bounds(vae, frames, runtime.world_size)
    counts = pixel_counts(vae, frames, runtime.world_size)
    start, end = bounds[runtime.rank]
    if start == end:
        return assemble_on_rank0(latents.new_zeros(0), runtime, counts)
    mine = decode_clip(vae, latents, start, end, overlap, *args, decode=decode, **kwargs)
    if mine.shape[2] != counts[runtime.rank]:
        raise RuntimeError(
            f"rank {runtime.rank}: the VAE decoded {mine.shape[2]} frames for latent frames "
            f"[{start}, {end}), expected {counts[runtime.rank]}."
        )
    return assemble_on_rank0(mine.contiguous(), runtime, counts)


@contextlib.contextmanager
def per_clip_decode(vae, runtime: ParallelRuntime, overlap: int | None) -> Iterator[None]:
    """While active, ``vae.decode(z, ...)`` decodes per clip: the whole video on rank 0, and on
    the other ranks a video of 0 frames (so the pipeline's post-processing runs and costs nothing)."""
    check_overlap(overlap)
    record_of(vae)
    original = vae.decode

    def decode(z, *args, return_dict: bool = True, **kwargs):
        video = decode_parallel(vae, z, runtime, overlap, *args, decode=original, **kwargs)
        if video is None:
            video = z.new_zeros(z.shape[0], 3, 0, 1, 1)
        if not return_dict:
            return (video,)
        from diffusers.models.autoencoders.vae import DecoderOutput

        return DecoderOutput(sample=video)

    shadowed = vae.__dict__.get("decode")  # an instance attribute someone set before: put it back after
    vae.decode = decode
    try:
        yield
    finally:
        if shadowed is None:
            del vae.decode
        else:
            vae.decode = shadowed
