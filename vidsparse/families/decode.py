"""How a family's video VAE can decode one clip of the latent video: the facts per-clip decode needs.

``vidsparse.parallel.vae`` splits the final VAE decode across ranks. It stays generic: what
differs between VAEs is written here once per VAE kind and used by the family modules
(``Family.clip_decode``):

- **pixel frames of a latent frame** in the whole-video decode (``ClipDecode.pixel_start``):
  causal VAEs (Wan, HunyuanVideo, Mochi, LTX-Video) decode the first latent frame to 1 pixel
  frame and every later one to ``k`` (the temporal factor), so latent frame ``t > 0`` starts at
  pixel ``1 + k * (t - 1)``; CogVideoX decodes in batches of 2 latent frames with the odd one in
  the first batch, so only batch boundaries have a pixel position;
- **where a clip may start** (``ClipDecode.cut``): any latent frame, or a batch boundary;
- **the window a rank decodes** (``ClipDecode.window``): which latent frames (the clip plus its
  context) the rank passes to ``vae.decode`` so that the clip's pixels come out exact (or as
  close as the overlap allows), and where that window's pixels sit in the whole video.

A window decodes ``latents[:, :, first:end]`` with the VAE's own ``decode``; its pixel ``q`` is
the whole video's pixel ``offset + q``. Importing this module needs nothing but the standard library.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class DecodeWindow:
    """Latent frames ``[first, end)`` one rank decodes; its pixel 0 is the video's pixel ``offset``."""

    first: int
    end: int
    offset: int


#: (vae, latent frames F, clip start, clip end, overlap or None = full context) -> DecodeWindow
WindowFn = Callable[[Any, int, int, int, "int | None"], DecodeWindow]


def first_frame_pixels(k: int, frames: int, t: int) -> int:
    """First pixel frame of latent frame ``t`` (``t == frames``: the pixel count) when the first
    latent frame decodes to 1 pixel frame and every later one to ``k``."""
    return 0 if t == 0 else 1 + k * (t - 1)


def any_frame(vae: Any, frames: int, t: int) -> int:
    """A clip may start at any latent frame."""
    return t


@dataclass(frozen=True)
class ClipDecode:
    """Per-clip decode of one VAE kind (see the module docstring).

    ``vae_classes``: diffusers VAE class names this applies to. ``temporal_factor(vae)``: pixel
    frames per latent frame after the first. ``window``: the latent frames a rank decodes and
    their pixel offset. ``pixel_start(vae, F, t)``: first pixel of latent frame ``t`` in the
    whole decode (``t == F``: the pixel count), ``None`` = ``first_frame_pixels``. ``cut(vae, F,
    t)``: the latent frame at or before ``t`` where a clip may start. ``exact``: when the
    window's pixels equal the whole-video decode (docs, summaries).
    """

    vae_classes: tuple[str, ...]
    temporal_factor: Callable[[Any], int]
    window: WindowFn
    exact: str
    pixel_start: Callable[[Any, int, int], int] | None = None
    cut: Callable[[Any, int, int], int] = any_frame

    def matches(self, vae: Any) -> bool:
        return any(c.__name__ in self.vae_classes for c in type(vae).__mro__)

    def pixel(self, vae: Any, frames: int, t: int) -> int:
        if self.pixel_start is not None:
            return self.pixel_start(vae, frames, t)
        return first_frame_pixels(self.temporal_factor(vae), frames, t)


def _context_start(start: int, overlap: int | None) -> int:
    return 0 if overlap is None else max(0, start - overlap)


def causal_window(vae: Any, frames: int, start: int, end: int, overlap: int | None, *, k: int) -> DecodeWindow:
    """A causal decoder: ``overlap`` latent frames of context before the clip (None: from frame 0).

    Decoding from latent frame ``a > 0`` gives 1 pixel frame for ``a`` (the last of its ``k``), so
    the window's pixel 0 is the video's pixel ``k * a`` (``1 + k * (a - 1) + k - 1``).
    """
    first = _context_start(start, overlap)
    return DecodeWindow(first, end, k * first)


def two_sided_window(vae: Any, frames: int, start: int, end: int, overlap: int | None, *, k: int) -> DecodeWindow:
    """A decoder that is not causal in time (LTX-Video): ``overlap`` latent frames of context on
    both sides of the clip (None: the whole video). Pixel offset as for ``causal_window``."""
    first = _context_start(start, overlap)
    last = frames if overlap is None else min(frames, end + overlap)
    return DecodeWindow(first, last, k * first)
