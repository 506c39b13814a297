"""Flow-matching training pieces: noise level sampling, noising and the regression target.

Rectified-flow models (Wan, HunyuanVideo, LTX-Video, Mochi) interpolate
``x_s = (1 - s) x0 + s noise`` for a noise level ``s`` in [0, 1] and are trained to predict the
velocity ``noise - x0``. The transformer sees ``timestep = s * num_train_timesteps``, as the
pipelines' flow-matching schedulers feed it at inference.

Noise levels: ``uniform`` draws ``u ~ U(0, 1)``; ``logit_normal`` draws ``sigmoid(N(mean, std))``
(SD3's default); ``shifted`` is uniform followed by the SD3/Wan time shift
``s = shift u / (1 + (shift - 1) u)``, which spends more steps at high noise, where a longer
video's global layout is decided. A shift other than 1 may be combined with any of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

TimestepSampling = Literal["uniform", "logit_normal", "shifted"]
TIMESTEP_SAMPLINGS: tuple[str, ...] = ("uniform", "logit_normal", "shifted")


@dataclass(frozen=True)
class NoiseSampler:
    """How noise levels are drawn. ``shift=None`` means 1 (none) unless ``mode == "shifted"``."""

    mode: TimestepSampling = "shifted"
    shift: float | None = None
    logit_mean: float = 0.0
    logit_std: float = 1.0
    min_sigma: float = 1e-3

    def __post_init__(self) -> None:
        if self.mode not in TIMESTEP_SAMPLINGS:
            raise ValueError(f"timestep_sampling must be one of {TIMESTEP_SAMPLINGS}, got {self.mode!r}.")
        if self.shift is not None and not self.shift > 0:
            raise ValueError(f"flow_shift must be > 0 (1 = no shift), got {self.shift!r}.")
        if not self.logit_std > 0:
            raise ValueError(f"logit_std must be > 0 (the logit-normal's spread), got {self.logit_std!r}.")
        if not 0 <= self.min_sigma < 1:
            raise ValueError(f"min_sigma must be in [0, 1), got {self.min_sigma!r}.")

    def resolved_shift(self, model_default: float) -> float:
        if self.shift is not None:
            return float(self.shift)
        return float(model_default) if self.mode == "shifted" else 1.0

    def sample(
        self, n: int, generator: torch.Generator, shift: float, device: torch.device | str = "cpu"
    ) -> torch.Tensor:
        """``n`` noise levels in [min_sigma, 1] (float32), drawn from ``generator``."""
        if self.mode == "logit_normal":
            u = torch.sigmoid(torch.randn(n, generator=generator) * self.logit_std + self.logit_mean)
        else:
            u = torch.rand(n, generator=generator)
        s = shift_sigmas(u, shift)
        return s.clamp(self.min_sigma, 1.0).to(device)


def shift_sigmas(sigma: torch.Tensor, shift: float) -> torch.Tensor:
    """SD3 / Wan time shift: ``shift s / (1 + (shift - 1) s)`` (identity for shift 1)."""
    if shift == 1.0:
        return sigma
    return shift * sigma / (1.0 + (shift - 1.0) * sigma)


def add_noise(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_s, target): ``x_s = (1 - s) x0 + s noise`` and the velocity ``noise - x0``."""
    s = sigma.to(x0.dtype).view(-1, *([1] * (x0.dim() - 1)))
    return (1.0 - s) * x0 + s * noise, noise - x0


__all__ = ["TIMESTEP_SAMPLINGS", "NoiseSampler", "TimestepSampling", "add_noise", "shift_sigmas"]
