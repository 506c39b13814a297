"""What ``vidsparse bench`` and the device suite (``gpu_suite``) share: the attention shapes of
the models, a synthetic pattern of a given block density, FLOP counts and the SDPA kernels
to compare against. One home, so the two report the same shapes and the same TFLOP/s.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from vidsparse.layout import VideoLayout
from vidsparse.patterns.base import Pattern
from vidsparse.plan import BlockSparsePlan

BWD_FACTOR = 2.5  # FLOPs of forward+backward relative to forward (FlashAttention convention)


@dataclass(frozen=True)
class BenchShape:
    """One attention call of a model: latent grid after patchify, heads, head dim, text span."""

    name: str
    frames: int
    height: int
    width: int
    heads: int
    head_dim: int = 128
    text_len: int = 0
    text_position: str = "none"
    batch: int = 1

    @property
    def grid(self) -> tuple[int, int, int]:
        return (self.frames, self.height, self.width)

    @property
    def layout(self) -> VideoLayout:
        return VideoLayout(self.frames, self.height, self.width, self.text_len, self.text_position)  # type: ignore[arg-type]


SHAPES: dict[str, BenchShape] = {
    # Wan2.1-T2V-1.3B, 81 x 480 x 832: 32,760 tokens, 12 heads.
    "wan-1.3b": BenchShape("wan-1.3b", 21, 30, 52, heads=12),
    # Wan2.1-T2V-14B, 81 x 720 x 1280: 75,600 tokens, 40 heads.
    "wan-14b": BenchShape("wan-14b", 21, 45, 80, heads=40),
    # HunyuanVideo, 129 x 720 x 1280: 118,800 video tokens + 256 text tokens after, 24 heads.
    "hunyuan": BenchShape("hunyuan", 33, 45, 80, heads=24, text_len=256, text_position="after"),
    # CPU smoke run (--device cpu --quick).
    "tiny": BenchShape("tiny", 2, 4, 6, heads=2, head_dim=16, text_len=8, text_position="after"),
}
QUICK_GPU_SHAPES = ("wan-1.3b",)


@dataclass(frozen=True)
class RandomBlocks(Pattern):
    """Synthetic pattern: each video query block keeps ``density`` of the video key blocks
    (its own block always included, the others at random), all whole blocks.

    Text rows and columns follow the core semantics (always attended).
    """

    density: float = 0.25
    seed: int = 0

    name: ClassVar[str] = "random-blocks"

    def video_mask(self, layout, qi, ki, layer=0):  # only whole (2) or empty (0) candidates
        return torch.ones(torch.broadcast_shapes(qi.shape, ki.shape), dtype=torch.bool, device=qi.device)

    def block_candidates(self, layout, order, block_size, layer=0):
        n = order.numel() // block_size
        keep = min(n, max(1, round(self.density * n)))
        g = torch.Generator().manual_seed(self.seed)
        scores = torch.rand(n, n, generator=g)
        scores.fill_diagonal_(-1.0)
        chosen = torch.topk(scores, keep, dim=1, largest=False).indices
        cand = torch.zeros(n, n, dtype=torch.int8)
        cand.scatter_(1, chosen, 2)
        return cand


def computed_blocks(plan: BlockSparsePlan, batch: int, heads: int) -> float:
    """Blocks a sparse kernel computes over all (batch, head) pairs."""
    Bp, Hp = plan.kv_counts.shape[:2]
    return float(plan.kv_counts.double().sum().item()) * (batch // Bp) * (heads // Hp)


def attention_flops(pairs: float, head_dim: int, direction: str) -> float:
    """FLOPs of attention over ``pairs`` (query, key) pairs: QK^T and PV, 2 FLOPs per pair and
    channel each, forward; ``BWD_FACTOR`` times that for "fwd+bwd"."""
    return 4.0 * pairs * head_dim * (BWD_FACTOR if direction == "fwd+bwd" else 1.0)


def sparse_flops(plan: BlockSparsePlan, shape: BenchShape, direction: str) -> float:
    """FLOPs the block-sparse kernel computes: every computed block is block_size^2 pairs."""
    pairs = plan.block_size**2 * computed_blocks(plan, shape.batch, shape.heads)
    return attention_flops(pairs, shape.head_dim, direction)


def dense_flops(shape: BenchShape, direction: str) -> float:
    s = shape.layout.seq_len
    return attention_flops(shape.batch * shape.heads * s * s, shape.head_dim, direction)


def sdpa_candidates(device: torch.device) -> list[tuple[str, object]]:
    """(name, SDPBackend) of the fused dense kernels to try on ``device`` (math on a CPU); the
    benchmarks time each and keep the fastest, as a user would pick."""
    from torch.nn.attention import SDPBackend

    if device.type != "cuda":
        return [("math", SDPBackend.MATH)]
    return [
        ("flash", SDPBackend.FLASH_ATTENTION),
        ("cudnn", SDPBackend.CUDNN_ATTENTION),
        ("efficient", SDPBackend.EFFICIENT_ATTENTION),
    ]


__all__ = [
    "BWD_FACTOR",
    "QUICK_GPU_SHAPES",
    "SHAPES",
    "BenchShape",
    "RandomBlocks",
    "attention_flops",
    "computed_blocks",
    "dense_flops",
    "sdpa_candidates",
    "sparse_flops",
]
