"""``TinyVideoVAE``: the smallest VAE that keeps ``WanPipeline``'s VAE interface, fast on a CPU.

Wan's own ``AutoencoderKLWan`` decodes 33 frames of 96x160 in tens of seconds on two CPU cores
even at 8 base channels (its causal 3D convolutions run frame by frame), and training it is out of
reach there. This VAE has the same latent geometry (4x in time with Wan's causal convention:
the first frame alone, then groups of 4; 8x in space), the same config fields the pipeline and
vidsparse read (``z_dim``, ``latents_mean``, ``latents_std``, ``scale_factor_temporal``,
``scale_factor_spatial``) and the same calls (``encode(x).latent_dist``, ``decode(z).sample``),
but each latent frame is coded by a small 2D conv net over its group of frames stacked as
channels. It is a diffusers ``ModelMixin``, so ``save_pretrained`` / ``from_pretrained`` work.
"""

from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKLOutput
from diffusers.models.autoencoders.vae import DecoderOutput, DiagonalGaussianDistribution
from diffusers.models.modeling_utils import ModelMixin
from torch import nn


def _block(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=stride, padding=1), nn.SiLU())


class TinyVideoVAE(ModelMixin, ConfigMixin):
    """Per-latent-frame 2D conv autoencoder with Wan's 4x (causal) time / 8x space compression."""

    _supports_gradient_checkpointing = False

    @register_to_config
    def __init__(
        self,
        z_dim: int = 16,
        channels: tuple[int, int, int] = (32, 48, 64),
        scale_factor_temporal: int = 4,
        scale_factor_spatial: int = 8,
        latents_mean: list[float] | None = None,
        latents_std: list[float] | None = None,
    ):
        super().__init__()
        if scale_factor_spatial != 8:
            raise ValueError(f"TinyVideoVAE compresses space 8x (three stride-2 stages); got {scale_factor_spatial}.")
        if latents_mean is None or latents_std is None:  # the config must carry them (the pipeline reads them)
            self.register_to_config(latents_mean=[0.0] * z_dim, latents_std=[1.0] * z_dim)
        t = scale_factor_temporal
        if t != 4:
            raise ValueError(f"TinyVideoVAE compresses time 4x (Wan's causal groups); got {t}.")
        # (sic) AutoencoderKLWan's attribute: WanVideoToVideoPipeline / WanVACEPipeline derive their
        # factors from it (2 ** sum = 4x in time, 2 ** len = 8x in space), e.g. in FreeSwim's stage 2.
        self.temperal_downsample = [False, True, True]
        c1, c2, c3 = channels
        # No convolution at full resolution (the cost on a CPU): pixels are folded 2x2 into channels
        # first and unfolded last (pixel (un)shuffle), the convolutions run at 1/2, 1/4 and 1/8.
        self.encoder = nn.Sequential(
            nn.PixelUnshuffle(2), _block(4 * 3 * t, c1), _block(c1, c2, 2), _block(c2, c3, 2), _block(c3, c3),
            nn.Conv2d(c3, 2 * z_dim, 1),
        )  # fmt: skip
        self.decoder = nn.Sequential(
            _block(z_dim, c3), _block(c3, c3),
            nn.Upsample(scale_factor=2.0, mode="nearest"), _block(c3, c2),
            nn.Upsample(scale_factor=2.0, mode="nearest"), _block(c2, c1),
            nn.Conv2d(c1, 4 * 3 * t, 3, padding=1), nn.PixelShuffle(2),
        )  # fmt: skip

    def _groups(self, x: torch.Tensor) -> tuple[torch.Tensor, int]:
        """[B, 3, F, H, W] (F = 1 + 4k) -> [B (k + 1), 3 * 4, H, W]: frame 0 repeated, then groups of 4."""
        t = self.config.scale_factor_temporal
        b, c, f, h, w = x.shape
        if c != 3 or (f - 1) % t:
            raise ValueError(f"TinyVideoVAE encodes RGB videos of 1 + {t}k frames; got shape {tuple(x.shape)}.")
        x = torch.cat([x[:, :, :1].expand(-1, -1, t - 1, -1, -1), x], dim=2)  # [B, 3, t (k + 1), H, W]
        n = x.shape[2] // t
        x = x.view(b, c, n, t, h, w).permute(0, 2, 1, 3, 4, 5).reshape(b * n, c * t, h, w)
        return x, n

    def encode(self, x: torch.Tensor, return_dict: bool = True):
        groups, n = self._groups(x)
        moments = self.encoder(groups)  # [B n, 2 z, h, w]
        bn, c2, h, w = moments.shape
        moments = moments.view(x.shape[0], n, c2, h, w).permute(0, 2, 1, 3, 4)  # [B, 2 z, n, h, w]
        dist = DiagonalGaussianDistribution(moments)
        return AutoencoderKLOutput(latent_dist=dist) if return_dict else (dist,)

    def decode(self, z: torch.Tensor, return_dict: bool = True):
        b, c, n, h, w = z.shape
        t = self.config.scale_factor_temporal
        out = self.decoder(z.permute(0, 2, 1, 3, 4).reshape(b * n, c, h, w))  # [B n, 3 t, H, W]
        hh, ww = out.shape[-2:]
        out = out.view(b, n, 3, t, hh, ww).permute(0, 2, 1, 3, 4, 5).reshape(b, 3, n * t, hh, ww)
        out = out[:, :, t - 1 :]  # the first latent frame is one frame (the last of its repeated group)
        return DecoderOutput(sample=out) if return_dict else (out,)

    def forward(self, x: torch.Tensor, sample_posterior: bool = False, generator: torch.Generator | None = None):
        dist = self.encode(x).latent_dist
        z = dist.sample(generator) if sample_posterior else dist.mode()
        return self.decode(z).sample


__all__ = ["TinyVideoVAE"]
