"""Options of FreeSwim's dual path (window branch + full branch + cross-attention override).

The defaults are the reference's (``WillWu111/FreeSwim``, ``cache/`` variant): the full
branch every 2 steps in the conditional pass, the entropy softmax scale on both
self-attention branches. Where the reference hard-codes something, it is an option here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

CacheOverflow = Literal["cpu", "recompute"]
_OVERFLOW = ("cpu", "recompute")
#: Why ``vidsparse generate --freeswim`` takes no --pattern (its library check and its flag check).
PATTERN_REFUSAL = (
    "--freeswim runs its own attention (stage 1 dense, stage 2 FreeSwim's window of the base grid plus the full "
    "branch); drop --pattern and its options (the window follows --base-size)."
)
_SCALE_NAMES = ("freeswim", "default")


def freeswim_scale_factor(base_grid: tuple[int, int]) -> float:
    """``sqrt(log_n(2 n))`` with ``n = H_base * W_base`` tokens per base frame.

    FreeSwim multiplies the softmax scale of both self-attention branches by this "log-N
    entropy" factor (written ``math.log(30*52*2, 30*52)`` in the reference, i.e. a 2x token
    ratio at a 480p base): 1.0461 for (30, 52). The reference keeps 480p's constant for a 720p
    base too; here it follows the configured base grid (1.0414 for (45, 80)); pass the float
    to reproduce the reference's constant exactly.
    """
    n = base_grid[0] * base_grid[1]
    if n < 2:
        return 1.0
    return math.sqrt(math.log(2 * n, n))


@dataclass(frozen=True)
class DualPathConfig:
    """How the dual path runs on a Wan transformer.

    Args:
        base_grid: training latent grid (H_base, W_base) in tokens after patchify; the
            window branch's window (``vidsparse.FreeSwim``).
        cache_interval: the full branch runs on conditional steps ``i % cache_interval == 0``;
            in between, each block reuses its stored cross-attention output. ``1`` is the
            reference's ``nocache`` variant (full branch every step, no storage).
        override_uncond: whether the unconditional (negative-prompt) pass also runs the full
            branch and its override. ``None``: the reference's choice, on for
            ``cache_interval == 1`` (``nocache``), off otherwise (``cache``: the unconditional
            pass is pure window attention). ``True`` needs ``cache_interval == 1``.
        attention_scale: softmax scale of both self-attention branches. ``"freeswim"`` (the
            default, as the reference runs every stage-2 step): ``freeswim_scale_factor(base_grid)
            / sqrt(head_dim)``; ``"default"``: the model's ``1 / sqrt(head_dim)``; a float: that
            multiple of ``1 / sqrt(head_dim)``. Cross-attention keeps the model's scale.
        cache_budget_bytes: device memory the cross-attention cache may hold; blocks beyond it
            follow ``cache_overflow``. ``None``: half of the free device memory when the cache
            is first filled on CUDA, unlimited on CPU. (On CPU an explicit budget still splits
            the cache into a "device" and an "offloaded" part, both in host memory.)
        cache_overflow: ``"cpu"`` stores blocks beyond the budget in (pinned) host memory and
            copies them back per block; ``"recompute"`` stores nothing when the whole cache
            does not fit and runs the full branch on every conditional step instead.
        cache_dtype: dtype of stored outputs (``None``: the model's dtype; e.g. torch.bfloat16
            halves an fp32 cache).
        backend: vidsparse backend of the window branch ("auto", "torch", "flex", "triton").
        block_size: kernel block of the window branch (``None``: as every vidsparse path picks it,
            ``vidsparse.layout.auto_block_size``: the next power of two >= tokens per frame, at
            least 16, on grids of < 128 tokens a frame, else the backend's default).
    """

    base_grid: tuple[int, int]
    cache_interval: int = 2
    override_uncond: bool | None = None
    attention_scale: str | float = "freeswim"
    cache_budget_bytes: int | None = None
    cache_overflow: CacheOverflow = "cpu"
    cache_dtype: object | None = None
    backend: str = "auto"
    block_size: int | None = None

    @classmethod
    def from_options(cls, options: object, base_grid: tuple[int, int]) -> DualPathConfig:
        """The config of an options object with these fields by name (``TwoStageOptions``,
        ``generation.FreeSwimOptions``): the one mapping both stage-2 paths use."""
        return cls(
            base_grid=base_grid,
            cache_interval=options.cache_interval,
            override_uncond=options.override_uncond,
            attention_scale=options.attention_scale,
            cache_budget_bytes=options.cache_budget_bytes,
            cache_overflow=options.cache_overflow,
            backend=options.backend,
            block_size=options.block_size,
        )

    def __post_init__(self) -> None:
        from vidsparse.patterns.freeswim import FreeSwim

        FreeSwim(base_grid=self.base_grid)  # validates the grid
        object.__setattr__(self, "base_grid", tuple(self.base_grid))
        c = self.cache_interval
        if not isinstance(c, int) or isinstance(c, bool) or c < 1:
            raise ValueError(
                f"cache_interval must be an int >= 1 (1 = full branch every step, the reference's nocache; "
                f"2 = its default cache), got {c!r}."
            )
        if self.override_uncond is not None and not isinstance(self.override_uncond, bool):
            raise TypeError(f"override_uncond must be None or a bool, got {self.override_uncond!r}.")
        if self.override_uncond and c != 1:
            raise ValueError(
                f"override_uncond=True needs cache_interval=1 (the reference overrides the unconditional pass only "
                f"in its nocache variant; its cache stores conditional outputs only), got cache_interval={c}."
            )
        s = self.attention_scale
        if isinstance(s, str):
            if s not in _SCALE_NAMES:
                raise ValueError(f"attention_scale must be 'freeswim', 'default' or a float > 0, got {s!r}.")
        elif isinstance(s, bool) or not isinstance(s, (int, float)) or not s > 0:
            raise ValueError(f"attention_scale must be 'freeswim', 'default' or a float > 0, got {s!r}.")
        b = self.cache_budget_bytes
        if b is not None and (not isinstance(b, int) or isinstance(b, bool) or b < 0):
            raise ValueError(f"cache_budget_bytes must be None or an int >= 0 (bytes), got {b!r}.")
        if self.cache_overflow not in _OVERFLOW:
            raise ValueError(f"cache_overflow must be one of {_OVERFLOW}, got {self.cache_overflow!r}.")
        if self.block_size is not None and (
            not isinstance(self.block_size, int) or self.block_size < 16 or self.block_size & (self.block_size - 1)
        ):
            raise ValueError(f"block_size must be None or a power of two >= 16, got {self.block_size!r}.")

    @property
    def uncond_override(self) -> bool:
        return self.cache_interval == 1 if self.override_uncond is None else self.override_uncond

    def scale_factor(self) -> float:
        """Multiplier of ``1 / sqrt(head_dim)`` for both self-attention branches."""
        s = self.attention_scale
        if s == "freeswim":
            return freeswim_scale_factor(self.base_grid)
        if s == "default":
            return 1.0
        return float(s)

    def softmax_scale(self, head_dim: int) -> float | None:
        """The ``scale`` argument of the self-attention calls (None = the kernel's default)."""
        if self.attention_scale == "default":
            return None
        return self.scale_factor() / math.sqrt(head_dim)
