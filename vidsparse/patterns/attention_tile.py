"""Efficient-vDiT's "attention tile" pattern: the ``(k : T - k)`` frame-by-frame block mask.

The 3-D attention map of a video DiT splits into frame x frame tiles; the diagonal (same
latent frame) tiles carry most of the weight. The ``(k : T - k)`` mask keeps the diagonal
tiles and every tile against the first ``k`` latent frames, the global reference frames,
which themselves attend everything. For ``T`` frames that is ``2kT - k^2 + T - k`` of ``T^2``
tiles, linear in ``T``: (2:6) keeps 34 of 64 tiles, (1:7) 22 of 64, (3:21) 156 of 576 (the
paper reports 45.47 %, 64.38 % and 72.05 % sparsity).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from vidsparse.layout import VideoLayout
from vidsparse.patterns.base import Pattern
from vidsparse.patterns.tiling import ceil_div


@dataclass(frozen=True)
class AttentionTile(Pattern):
    """Diagonal frame tiles plus ``global_frames`` reference frames (rows and columns).

    Default 2 global frames, the paper's (2:6) example. Each frame is padded to whole kernel
    blocks so every block lies in one frame and no block is partial.

    Args:
        global_frames: the first ``global_frames`` latent frames are global: every query attends
            them and they attend every frame; 0 = per-frame (spatial-only) attention, the number
            of latent frames = dense. Left unset where a model family's settings apply
            (vidsparse.apply, vidsparse generate, vidsparse train-lora): round(latent frames / 4),
            at least 1 (the paper's 2:6 at 8 frames). vidsparse inspect and ``AttentionTile()``
            keep 2.
    """

    global_frames: int = 2

    name: ClassVar[str] = "attention-tile"

    @classmethod
    def fit_defaults(cls, options: dict[str, Any], layout: VideoLayout, block_size: int | None) -> dict[str, Any]:
        """``round(F / 4)`` global frames unless given: the paper's 2:6 at 8 latent frames."""
        if "global_frames" in options:
            return options
        return {**options, "global_frames": min(layout.frames, max(1, round(layout.frames / 4)))}

    def __post_init__(self) -> None:
        k = self.global_frames
        if isinstance(k, bool) or not isinstance(k, int):
            raise TypeError(f"AttentionTile global_frames must be an int >= 0, got {k!r}.")
        if k < 0:
            raise ValueError(f"AttentionTile global_frames must be >= 0 (0 = diagonal tiles only), got {k}.")

    def validate(self, layout: VideoLayout) -> None:
        if self.global_frames > layout.frames:
            raise ValueError(
                f"AttentionTile global_frames={self.global_frames} exceeds the {layout.frames} latent "
                f"frames of the grid {layout.grid}; use global_frames <= {layout.frames} "
                f"(global_frames={layout.frames} is dense attention)."
            )

    def frame_mask(self, frames: int) -> torch.Tensor:
        """bool [frames, frames]: which (query frame, key frame) tiles are computed."""
        f = torch.arange(frames)
        return self.video_frame_mask(f[:, None], f[None, :])

    def video_frame_mask(self, fq: torch.Tensor, fk: torch.Tensor) -> torch.Tensor:
        k = self.global_frames
        return (fq == fk) | (fq < k) | (fk < k)

    def video_mask(self, layout: VideoLayout, qi: torch.Tensor, ki: torch.Tensor, layer: int = 0) -> torch.Tensor:
        hw = layout.tokens_per_frame
        return self.video_frame_mask(qi // hw, ki // hw)

    def frame_slots(self, layout: VideoLayout, block_size: int) -> int:
        """Kernel positions per frame: the frame's tokens padded to whole blocks."""
        return ceil_div(layout.tokens_per_frame, block_size) * block_size

    def video_order(self, layout: VideoLayout, block_size: int) -> torch.Tensor | None:
        hw, slots = layout.tokens_per_frame, self.frame_slots(layout, block_size)
        pos = torch.arange(slots)
        frame = torch.arange(layout.frames)[:, None]
        return torch.where(pos < hw, frame * hw + pos, torch.full_like(pos, -1)).flatten()

    def block_candidates(
        self, layout: VideoLayout, order: torch.Tensor, block_size: int, layer: int = 0
    ) -> torch.Tensor | None:
        per_frame = self.frame_slots(layout, block_size) // block_size
        frame = torch.arange(order.numel() // block_size) // per_frame
        keep = self.frame_mask(layout.frames)[frame][:, frame]
        # Whole blocks: the builder only masks the padding keys at the end of each frame.
        return torch.where(keep, 2, 0).to(torch.int8)
