"""DualScope: Video-Infinity's dual-scope attention as a static, rank-independent pattern.

Video-Infinity (arXiv 2406.16260) lets each GPU denoise one clip of a long video: every
query sees a *local* temporal window (its clip plus halo frames from the neighbours) and a
few *global* context frames sampled at a stride from every clip and all-gathered. Here the
same rule is a pattern on the whole video, so a single-device run and a clip-parallel run
compute the same attention (``vidsparse.parallel`` checks one against the other):

- local scope: query frame ``i`` attends every token of key frame ``j`` when
  ``|i - j| <= local_frames`` (a window of ``2 * local_frames + 1`` frames centred on ``i``,
  cut at the video's ends; no padding keys);
- global scope: every query attends every token of the global frames, the latent frames
  whose *absolute* index is a multiple of ``global_stride`` (0 turns the global scope off).

Because global frames are defined on absolute frame indices, not "k frames per clip", the
mask does not depend on how many ranks share the video. Text tokens (joint-attention
models) follow the plan builder's rule: video queries see all text, text queries see all.

Video-Infinity adds timestep-dependent logit biases between the scopes; a mask cannot carry
a bias, so they are not part of this pattern (exact softmax attention under the mask).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from vidsparse.layout import VideoLayout
from vidsparse.patterns.base import Pattern


def _check_int(name: str, value: object, minimum: int, hint: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"DualScope.{name} must be an int >= {minimum} ({hint}), got {value!r}.")


@dataclass(frozen=True)
class DualScope(Pattern):
    """Local temporal window of ``local_frames`` per side + global frames every ``global_stride``.

    Args:
        local_frames: latent frames a query frame sees on each side, all their tokens (a window
            of 2 * local_frames + 1 frames, cut at the video's ends).
        global_stride: every query attends the latent frames whose absolute index is a multiple
            of it (the global frames); 0 = no global frames.
    """

    local_frames: int = 2
    global_stride: int = 4
    name: ClassVar[str] = "dual-scope"

    def __post_init__(self) -> None:
        _check_int("local_frames", self.local_frames, 0, "latent frames seen on each side of a query frame")
        _check_int(
            "global_stride", self.global_stride, 0, "latent frames j with j % global_stride == 0 are global; 0 = none"
        )

    # -- frame-level definition ------------------------------------------------------
    def frame_mask(self, layout: VideoLayout, fq: torch.Tensor, fk: torch.Tensor) -> torch.Tensor:
        """bool, broadcast of query frames ``fq`` and key frames ``fk`` (absolute latent frames)."""
        m = (fq - fk).abs() <= self.local_frames
        if self.global_stride:
            m = m | (fk % self.global_stride == 0)
        return m

    def global_frames(self, layout: VideoLayout) -> list[int]:
        """Absolute indices of the global frames of this layout."""
        if not self.global_stride:
            return []
        return list(range(0, layout.frames, self.global_stride))

    # -- the Pattern contract (clip parallelism reads these) --------------------------
    def attended_frames(self, layout: VideoLayout, fq: torch.Tensor, fk: torch.Tensor) -> torch.Tensor:
        return self.frame_mask(layout, fq, fk)

    def key_global_frames(self, layout: VideoLayout) -> list[int]:
        return self.global_frames(layout)

    def video_mask(self, layout: VideoLayout, qi: torch.Tensor, ki: torch.Tensor, layer: int = 0) -> torch.Tensor:
        hw = layout.tokens_per_frame
        return self.frame_mask(layout, qi // hw, ki // hw)

    def block_candidates(
        self, layout: VideoLayout, order: torch.Tensor, block_size: int, layer: int = 0
    ) -> torch.Tensor:
        f = torch.arange(layout.frames)
        fm = self.frame_mask(layout, f.view(-1, 1), f.view(1, -1))
        return frame_block_candidates(fm, order, block_size, layout.tokens_per_frame)

    def describe(self) -> str:
        glob = f", global frames every {self.global_stride}" if self.global_stride else ", no global frames"
        return f"DualScope(window +-{self.local_frames} frames{glob})"


def frame_block_candidates(
    frame_mask: torch.Tensor, order: torch.Tensor, block_size: int, tokens_per_frame: int
) -> torch.Tensor:
    """Tri-state block candidates (0 empty, 1 partial, 2 whole) of a frame-level mask.

    For masks that depend on frames only (attend all of key frame j or none of it) and a
    frame-major kernel order: a block covers the contiguous frame range [lo, hi] of its valid
    tokens, and a block pair is empty / whole when the frame rectangle is, which 2-D prefix
    sums of ``frame_mask`` [F, F] answer in O(blocks^2) without touching tokens.
    """
    frames = order.view(-1, block_size)
    valid = frames >= 0
    f = torch.where(valid, frames // tokens_per_frame, 0)
    nf = frame_mask.shape[0]
    lo = torch.where(valid, f, nf).amin(dim=1)
    hi = torch.where(valid, f, -1).amax(dim=1)
    has = valid.any(dim=1)
    lo = torch.where(has, lo, 0)
    hi = torch.where(has, hi, 0)
    pre = torch.zeros(nf + 1, frame_mask.shape[1] + 1, dtype=torch.int64)
    pre[1:, 1:] = frame_mask.to(torch.int64).cumsum(0).cumsum(1)
    q0, q1 = lo.view(-1, 1), hi.view(-1, 1) + 1
    k0, k1 = lo.view(1, -1), hi.view(1, -1) + 1
    count = pre[q1, k1] - pre[q0, k1] - pre[q1, k0] + pre[q0, k0]
    area = (q1 - q0) * (k1 - k0)
    out = torch.where(count == area, 2, torch.where(count > 0, 1, 0)).to(torch.int8)
    return out * (has.view(-1, 1) & has.view(1, -1)).to(torch.int8)
