"""Dense attention expressed as a pattern: every token attends every token."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from vidsparse.layout import VideoLayout
from vidsparse.patterns.base import Pattern


@dataclass(frozen=True)
class Dense(Pattern):
    """Full attention. The baseline every sparse pattern is compared with."""

    name: ClassVar[str] = "dense"

    def video_mask(self, layout: VideoLayout, qi: torch.Tensor, ki: torch.Tensor, layer: int = 0) -> torch.Tensor:
        return torch.ones(torch.broadcast_shapes(qi.shape, ki.shape), dtype=torch.bool, device=qi.device)

    def attended_frames(self, layout: VideoLayout, fq: torch.Tensor, fk: torch.Tensor) -> torch.Tensor:
        return torch.ones(torch.broadcast_shapes(fq.shape, fk.shape), dtype=torch.bool)

    def block_candidates(
        self, layout: VideoLayout, order: torch.Tensor, block_size: int, layer: int = 0
    ) -> torch.Tensor:
        n = order.numel() // block_size
        return torch.full((n, n), 2, dtype=torch.int8)
