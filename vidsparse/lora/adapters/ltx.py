"""LoRA adapter of LTX-Video text-to-video (see ``vidsparse.lora.adapters`` for the family table)."""

from __future__ import annotations

import torch

from vidsparse.lora.adapters.base import ClipConditionMixin, TrainableVideoModel, first_frame_image
from vidsparse.lora.adapters.text import T5TextMixin
from vidsparse.lora.data import ClipSpec


class LTXVideoModel(T5TextMixin, TrainableVideoModel):
    """LTX-Video T2V (``LTXPipeline``): normalized latents packed to tokens, T5 text with mask."""

    family = "ltx"
    display_name = "LTX-Video"
    pipeline_classes = ("LTXPipeline",)
    default_target_modules = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0")
    max_sequence_length = 128
    #: the pipeline's default ``frame_rate``; RoPE's time scale is ``temporal_ratio / frame_rate``.
    frame_rate: float = 25.0

    def __init__(self, pipe, model_id: str):
        super().__init__(pipe, model_id)
        self.check_flow_matching()
        self._temporal = int(pipe.vae_temporal_compression_ratio)
        self._spatial = int(pipe.vae_spatial_compression_ratio)
        self._p = int(pipe.transformer_spatial_patch_size)
        self._pt = int(pipe.transformer_temporal_patch_size)

    def validate_clip(self, spec: ClipSpec) -> None:
        self._check_clip(
            spec,
            self._temporal * self._pt,
            self._spatial * self._p,
            self._spatial * self._p,
            f"VAE {self._spatial}x times patch {self._p}x{self._p}",
        )
        self._record_latent_size(spec, self._temporal, self._spatial)  # the pipeline's video_sequence_length

    @torch.no_grad()
    def encode_video(self, pixels: torch.Tensor) -> torch.Tensor:
        from diffusers import LTXPipeline

        vae = self.pipe.vae
        z = self._vae_mode(pixels)
        return LTXPipeline._normalize_latents(
            z, vae.latents_mean.float(), vae.latents_std.float(), float(vae.config.scaling_factor)
        )

    def predict(self, transformer, noisy, timesteps, text):
        from diffusers import LTXPipeline

        dev, dt = noisy.device, noisy.dtype
        _, _, f, h, w = noisy.shape
        p, pt = self._p, self._pt
        hidden, timesteps = self.transformer_inputs(noisy, timesteps.to(dev, dt), text)
        out = transformer(
            hidden_states=LTXPipeline._pack_latents(hidden, p, pt),
            encoder_hidden_states=text["prompt_embeds"].to(dev, dt),
            timestep=timesteps,
            encoder_attention_mask=text["prompt_attention_mask"].to(dev).bool(),
            num_frames=f,  # latent sizes, as LTXPipeline passes them
            height=h,
            width=w,
            rope_interpolation_scale=(self._temporal / self.frame_rate, self._spatial, self._spatial),
            return_dict=False,
        )[0]
        return LTXPipeline._unpack_latents(out, f // pt, h // p, w // p, p, pt)

    def transformer_inputs(self, noisy, timesteps, text) -> tuple[torch.Tensor, torch.Tensor]:
        """(latents [B, C, f, h, w] before packing, the transformer's ``timestep``): T2V gives them as they are."""
        return noisy, timesteps


class LTXImageToVideoModel(ClipConditionMixin, LTXVideoModel):
    """LTX-Video image-to-video (``LTXImageToVideoPipeline``): the first latent frame is the image's, kept clean.

    As the pipeline's ``prepare_latents`` and sampling loop: the image (the clip's first frame as the
    8-bit image a user would pass, ``video_processor.preprocess``-ed) is VAE-encoded alone and
    normalised with ``_normalize_latents``' default ``scaling_factor = 1`` (the pipeline passes none;
    the clip's latents, like its decode, use the VAE's); the conditioning mask is 1 on the first
    latent frame's tokens, whose timestep is ``t (1 - mask) = 0`` and whose input is those clean
    image latents at every step; the scheduler steps frames 1 onwards only, so the loss leaves
    the first frame out. The pipeline draws the image latents from the VAE posterior; the cache
    takes its mode (reproducible; the posterior's spread is the VAE's small std).
    """

    display_name = "LTX-Video I2V"
    pipeline_classes = ("LTXImageToVideoPipeline",)

    def clip_condition(self, clip: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"image_latents": self.image_latents(first_frame_image(clip), *clip.shape[2:])}

    @torch.no_grad()
    def image_latents(self, image, height: int, width: int) -> torch.Tensor:
        """``prepare_latents``' normalised image latents [1, C, 1, h, w] of ``image`` (PIL), the posterior's mode."""
        pipe = self.pipe
        vae = self._ready(pipe.vae)
        device = next(vae.parameters()).device
        pixels = pipe.video_processor.preprocess(image, height=height, width=width).to(device, dtype=torch.float32)
        z = vae.encode(pixels.unsqueeze(2).to(vae.dtype)).latent_dist.mode().float()
        return pipe._normalize_latents(z, vae.latents_mean, vae.latents_std).float().cpu()

    def conditioning_mask(self, latents: torch.Tensor) -> torch.Tensor:
        """The pipeline's packed conditioning mask [1, S]: 1 on the first latent frame's tokens."""
        from diffusers import LTXPipeline

        mask = latents.new_zeros(1, 1, *latents.shape[2:])
        mask[:, :, 0] = 1.0
        return LTXPipeline._pack_latents(mask, self._p, self._pt).squeeze(-1)

    def transformer_inputs(self, noisy, timesteps, text):
        image = text["image_latents"].to(noisy.device, noisy.dtype)
        hidden = torch.cat([image, noisy[:, :, 1:]], dim=2)  # the clean image frame, as every step's latents
        return hidden, timesteps.view(-1, 1) * (1 - self.conditioning_mask(noisy))

    def loss(self, pred, target, cond):
        """Frames 1 onwards: the pipeline's scheduler never steps the first (the image's) latent frame."""
        return super().loss(pred[:, :, 1:], target[:, :, 1:], cond)
