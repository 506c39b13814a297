"""LoRA adapter of Mochi 1 text-to-video (see ``vidsparse.lora.adapters`` for the family table)."""

from __future__ import annotations

import torch

from vidsparse.lora.adapters.base import TrainableVideoModel
from vidsparse.lora.adapters.text import T5TextMixin
from vidsparse.lora.data import ClipSpec


class MochiModel(T5TextMixin, TrainableVideoModel):
    """Mochi 1 (``MochiPipeline``): normalized latents, T5 text with mask, inverted time and output."""

    family = "mochi"
    display_name = "Mochi"
    pipeline_classes = ("MochiPipeline",)
    default_target_modules = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0")
    max_sequence_length = 256

    def __init__(self, pipe, model_id: str):
        super().__init__(pipe, model_id)
        self.check_flow_matching()
        if not bool(getattr(pipe.scheduler.config, "invert_sigmas", False)):
            raise ValueError(
                f"{model_id}: MochiPipeline's scheduler must have invert_sigmas=True (Mochi's transformer runs "
                "on t = 1 - sigma, as in genmo/mochi-1-preview's scheduler config); got invert_sigmas=False, "
                "with which the pipeline would not sample what train-lora trains. Restore the scheduler config."
            )
        self._temporal = int(getattr(pipe, "vae_temporal_scale_factor", 6))
        self._spatial = int(getattr(pipe, "vae_spatial_scale_factor", 8))

    def validate_clip(self, spec: ClipSpec) -> None:
        p = int(self.transformer.config.patch_size)
        self._check_patched_clip(spec, 1, p, p)

    @torch.no_grad()
    def encode_video(self, pixels: torch.Tensor) -> torch.Tensor:
        cfg = self.pipe.vae.config
        z = self._vae_mode(pixels)
        if cfg.latents_mean is None or cfg.latents_std is None:  # the pipeline then only divides by the scale
            return z * float(cfg.scaling_factor)
        mean = torch.tensor(cfg.latents_mean, dtype=z.dtype, device=z.device).view(1, -1, 1, 1, 1)
        std = torch.tensor(cfg.latents_std, dtype=z.dtype, device=z.device).view(1, -1, 1, 1, 1)
        return (z - mean) * float(cfg.scaling_factor) / std  # inverse of the pipeline's decode

    def transformer_timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        return (1.0 - sigma) * self.num_train_timesteps

    def transformer_output(self, velocity: torch.Tensor) -> torch.Tensor:
        return -velocity

    def predict(self, transformer, noisy, timesteps, text):
        dev, dt = noisy.device, noisy.dtype
        out = transformer(
            hidden_states=noisy,
            encoder_hidden_states=text["prompt_embeds"].to(dev, dt),
            timestep=(self.num_train_timesteps - timesteps).to(dev, dt),  # transformer_timestep(s)
            encoder_attention_mask=text["prompt_attention_mask"].to(dev).bool(),
            return_dict=False,
        )[0]
        return -out  # the velocity noise - x0 (transformer_output is its negation)


__all__ = ["MochiModel"]
