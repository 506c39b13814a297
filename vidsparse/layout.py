"""Token layout of one video self-attention call: a (F, H, W) grid plus an optional text span."""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Literal

import torch

TextPosition = Literal["none", "before", "after"]
_TEXT_POSITIONS = ("none", "before", "after")


@dataclass(frozen=True)
class VideoLayout:
    """The token grid after patchify, as diffusers video transformers order it.

    Video tokens are frame-major raster order ``(f, h, w)``. Joint-attention models
    (CogVideoX, HunyuanVideo, Mochi) append or prepend a text span of ``text_len`` tokens;
    per-sample text padding is passed at call time as ``text_mask`` [B, text_len].
    """

    frames: int
    height: int
    width: int
    text_len: int = 0
    text_position: TextPosition = "none"

    def __post_init__(self) -> None:
        for name in ("frames", "height", "width", "text_len"):
            value = getattr(self, name)
            if not isinstance(value, (int, bool, float)) and hasattr(type(value), "__index__"):
                value = operator.index(value)  # numpy and 0-d torch integers: sizes read off arrays
                object.__setattr__(self, name, value)
        for name in ("frames", "height", "width"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(
                    f"VideoLayout.{name} must be a positive int (latent grid after patchify), got {value!r}."
                )
        if not isinstance(self.text_len, int) or isinstance(self.text_len, bool) or self.text_len < 0:
            raise ValueError(f"VideoLayout.text_len must be an int >= 0, got {self.text_len!r}.")
        if self.text_position not in _TEXT_POSITIONS:
            raise ValueError(f"VideoLayout.text_position must be one of {_TEXT_POSITIONS}, got {self.text_position!r}.")
        if self.text_len > 0 and self.text_position == "none":
            raise ValueError(
                f"VideoLayout has text_len={self.text_len} but text_position='none'; "
                "pass text_position='before' (CogVideoX) or 'after' (HunyuanVideo, Mochi), "
                "or text_len=0 when text goes through cross-attention (Wan, LTX-Video)."
            )
        if self.text_len == 0 and self.text_position != "none":
            object.__setattr__(self, "text_position", "none")

    @property
    def grid(self) -> tuple[int, int, int]:
        return (self.frames, self.height, self.width)

    @property
    def tokens_per_frame(self) -> int:
        return self.height * self.width

    @property
    def video_len(self) -> int:
        return self.frames * self.height * self.width

    @property
    def seq_len(self) -> int:
        return self.video_len + self.text_len

    @property
    def video_offset(self) -> int:
        """Index of the first video token in the joint sequence."""
        return self.text_len if self.text_position == "before" else 0

    @property
    def text_offset(self) -> int:
        """Index of the first text token in the joint sequence."""
        return 0 if self.text_position == "before" else self.video_len

    def coords(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(f, h, w) of video token indices (natural raster order, video-local)."""
        hw = self.height * self.width
        return index // hw, (index % hw) // self.width, index % self.width

    def check_seq_len(self, seq_len: int) -> None:
        if seq_len != self.seq_len:
            raise ValueError(
                f"Sequence length {seq_len} does not match the layout: "
                f"{self.frames}x{self.height}x{self.width} video tokens + {self.text_len} text "
                f"tokens = {self.seq_len}. Pass the latent grid after patchify (frames, height, "
                "width) and the text span of this attention call."
            )

    def __str__(self) -> str:
        text = f", text {self.text_len} {self.text_position}" if self.text_len else ""
        return f"{self.frames}x{self.height}x{self.width}{text}"


def auto_block_size(layout: VideoLayout) -> int | None:
    """Kernel block for a grid: None (backend default) unless a frame has < 128 tokens; then
    the next power of two >= tokens per frame, at least 16 (keeps tiny grids cheap)."""
    tpf = layout.tokens_per_frame
    if tpf >= 128:
        return None
    return max(16, 1 << (tpf - 1).bit_length())
