"""How a video is cut into contiguous clips, one per rank, and which tokens a rank holds.

Both parallel modes shard the same way: rank r holds the video tokens of its latent frames
``[start_r, end_r)`` (frame-major, so a contiguous run of the sequence) plus the whole text
span when the model has one in self-attention (text is small and replicated). Frame counts
that do not divide by the number of ranks give the first ``F % N`` ranks one frame more.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vidsparse.layout import VideoLayout


@dataclass(frozen=True)
class FramePartition:
    """Contiguous latent-frame ranges ``bounds[r] = (start, end)`` for ranks 0..N-1."""

    frames: int
    world_size: int

    def __post_init__(self) -> None:
        for name in ("frames", "world_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"FramePartition.{name} must be a positive int, got {v!r}.")
        if self.frames < self.world_size:
            raise ValueError(
                f"Cannot split {self.frames} latent frames over {self.world_size} ranks: every rank needs at "
                f"least one frame. Use at most {self.frames} processes, or generate more frames "
                "(latent frames = (num_frames - 1) / VAE temporal factor + 1)."
            )

    @property
    def sizes(self) -> tuple[int, ...]:
        base, extra = divmod(self.frames, self.world_size)
        return tuple(base + (1 if r < extra else 0) for r in range(self.world_size))

    @property
    def bounds(self) -> tuple[tuple[int, int], ...]:
        out, start = [], 0
        for s in self.sizes:
            out.append((start, start + s))
            start += s
        return tuple(out)

    def owner(self, frame: int) -> int:
        for r, (a, b) in enumerate(self.bounds):
            if a <= frame < b:
                return r
        raise ValueError(f"Frame {frame} is outside the video (0..{self.frames - 1}).")

    def local_layout(self, layout: VideoLayout, rank: int) -> VideoLayout:
        """The rank's own clip as a layout (same text span)."""
        a, b = self.bounds[rank]
        return VideoLayout(b - a, layout.height, layout.width, layout.text_len, layout.text_position)

    def video_token_counts(self, layout: VideoLayout) -> tuple[int, ...]:
        return tuple(s * layout.tokens_per_frame for s in self.sizes)

    def local_token_index(self, layout: VideoLayout, rank: int) -> torch.Tensor:
        """int64 indices (in the global sequence) of the tokens rank ``rank`` holds, in its local order."""
        self.check_layout(layout)
        a, b = self.bounds[rank]
        hw = layout.tokens_per_frame
        video = torch.arange(a * hw, b * hw) + layout.video_offset
        text = torch.arange(layout.text_len) + layout.text_offset
        if layout.text_position == "before":
            return torch.cat([text, video])
        return torch.cat([video, text])

    def shard(self, x: torch.Tensor, layout: VideoLayout, rank: int, dim: int = 1) -> torch.Tensor:
        """The rank's tokens of a full-sequence tensor (``dim`` is the sequence dimension)."""
        layout.check_seq_len(x.shape[dim])
        return x.index_select(dim, self.local_token_index(layout, rank).to(x.device))

    def check_local_qkv(self, who: str, layout: VideoLayout, rank: int, q, k, v) -> VideoLayout:
        """Rank ``rank``'s local layout, once q, k, v are checked to be its [B, S_r, H, D] tokens.

        ``who`` names the calling function in the error (clip and Ulysses attention share this check).
        """
        local = self.local_layout(layout, rank)
        for name, t in (("q", q), ("k", k), ("v", v)):
            if t.dim() != 4 or t.shape[1] != local.seq_len:
                raise ValueError(
                    f"{who}: {name} must be [B, {local.seq_len}, H, D] on rank {rank} (frames "
                    f"{self.bounds[rank]} of {layout}), got {tuple(t.shape)}."
                )
        return local

    def check_layout(self, layout: VideoLayout) -> None:
        if layout.frames != self.frames:
            raise ValueError(
                f"The layout has {layout.frames} latent frames but the partition was made for {self.frames}."
            )
