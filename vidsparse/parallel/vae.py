"""Decode the latent video per clip on every rank and assemble the frames on rank 0.

Wan's VAE is causal in time: it decodes latent frame t with a cache of the features of the
frames before it, and its first latent frame decodes to 1 pixel frame, every later one to
``temporal_factor`` (4) frames. A clip that started cold at its first frame would restart
that cache (a visible seam, and one frame instead of four), so rank r decodes ``overlap``
latent frames before its clip as context and drops their pixels:

- ``overlap >= start`` (``overlap=None``): the rank decodes from frame 0, bit-identical to
  a single-device decode (the last rank then decodes the whole video: exact, not faster);
- smaller overlaps trade exactness for speed; the error decays with the overlap as the
  context covers more of the decoder's temporal receptive field (measured numbers in
  docs/parallel.md). At least 1 frame of context is always used.
"""

from __future__ import annotations

import torch

from vidsparse.parallel.comm import exchange
from vidsparse.parallel.partition import FramePartition
from vidsparse.parallel.runtime import ParallelRuntime


def _check_overlap(overlap: int | None) -> None:
    if overlap is not None and (isinstance(overlap, bool) or not isinstance(overlap, int) or overlap < 1):
        raise ValueError(
            f"vae_overlap must be None (decode from frame 0: exact) or an int >= 1 latent frames of context, "
            f"got {overlap!r}."
        )


def clip_decode_range(partition: FramePartition, rank: int, overlap: int | None) -> tuple[int, int, int]:
    """(first latent frame decoded, end, latent context frames to drop) for ``rank``."""
    _check_overlap(overlap)
    s, e = partition.bounds[rank]
    if s == 0:
        return 0, e, 0
    a = 0 if overlap is None else max(0, s - overlap)
    return a, e, s - a


def vae_temporal_factor(vae) -> int:
    """Pixel frames per latent frame (after the first) of a causal video VAE (Wan: 4)."""
    cfg = vae.config
    factor = getattr(cfg, "scale_factor_temporal", None)
    if factor:
        return int(factor)
    down = getattr(cfg, "temperal_downsample", None)  # (sic) AutoencoderKLWan
    if down is not None:
        return 2 ** sum(bool(d) for d in down)
    raise ValueError(f"Cannot tell the temporal compression of {type(vae).__name__}; pass temporal_factor=.")


def pixel_frames(latent_frames: int, temporal_factor: int) -> int:
    """Pixel frames a causal video VAE decodes from ``latent_frames`` (1 + factor * (F - 1))."""
    return 1 + temporal_factor * (latent_frames - 1)


def decode_clip(vae, latents: torch.Tensor, partition: FramePartition, rank: int, overlap: int | None, temporal_factor: int) -> torch.Tensor:
    """This rank's pixel frames [B, C, T_r, H, W] of the (already de-normalised) ``latents``."""
    a, e, context = clip_decode_range(partition, rank, overlap)
    with torch.no_grad():
        video = vae.decode(latents[:, :, a:e], return_dict=False)[0]
    if context:
        drop = pixel_frames(context, temporal_factor)
        video = video[:, :, drop:]
    return video


def assemble_on_rank0(video: torch.Tensor, runtime: ParallelRuntime, frame_counts: list[int]) -> torch.Tensor | None:
    """Send every rank's frames [B, C, T_r, H, W] to rank 0; the whole video there, None elsewhere."""
    shape = list(video.shape)
    if runtime.rank == 0:
        shapes = {}
        for r in range(1, runtime.world_size):
            shp = list(shape)
            shp[2] = frame_counts[r]
            shapes[r] = tuple(shp)
        parts = exchange({}, shapes, runtime, video.dtype, op="video_to_rank0").wait()
        return torch.cat([video] + [parts[r] for r in range(1, runtime.world_size)], dim=2)
    exchange({0: video}, {}, runtime, video.dtype, op="video_to_rank0").wait()
    return None


def decode_parallel(
    vae,
    latents: torch.Tensor,
    runtime: ParallelRuntime,
    overlap: int | None = 4,
    temporal_factor: int | None = None,
) -> torch.Tensor | None:
    """Decode ``latents`` [B, C, F, h, w] split by clip across ranks; the video on rank 0 only.

    ``latents`` must be identical on every rank and already scaled for ``vae.decode``.
    """
    if latents.dim() != 5:
        raise ValueError(f"decode_parallel expects latents [B, C, F, h, w], got shape {tuple(latents.shape)}.")
    if temporal_factor is None:
        temporal_factor = vae_temporal_factor(vae)
    partition = FramePartition(latents.shape[2], runtime.world_size)
    mine = decode_clip(vae, latents, partition, runtime.rank, overlap, temporal_factor)
    counts = [
        pixel_frames(e, temporal_factor) if s == 0 else temporal_factor * (e - s) for s, e in partition.bounds
    ]
    if mine.shape[2] != counts[runtime.rank]:
        raise RuntimeError(
            f"rank {runtime.rank}: the VAE decoded {mine.shape[2]} frames for latent frames "
            f"{partition.bounds[runtime.rank]}, expected {counts[runtime.rank]} (temporal factor {temporal_factor})."
        )
    return assemble_on_rank0(mine.contiguous(), runtime, counts)
