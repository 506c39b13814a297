"""LoRA adapter of Wan image-to-video (``WanImageToVideoPipeline``): the first-frame condition as the pipeline builds it.

The condition is the training clip's own first frame, taken as the image a user would pass (rounded
to 8-bit RGB, as a PIL image), and built by the pipeline's own code, so the LoRA is trained on
exactly what the pipeline feeds the transformer at inference:

- ``pipe.video_processor.preprocess(image, height, width)`` then ``pipe.prepare_latents``:
  Wan 2.1 I2V and Wan 2.2 I2V-A14B (``expand_timesteps=False``) get a condition of
  ``[mask (vae_scale_factor_temporal channels: 1 on the first frame's latent, 0 elsewhere);
  (E(first frame, then zero frames) - mean) / std]``, concatenated to the noisy latents on
  channels at every step; the whole latent video is sampled, so the loss covers all of it.
  Wan 2.2 TI2V-5B (``expand_timesteps=True``) instead puts the clean image latents in place of the
  first latent frame at every step, with timestep 0 on those tokens; the pipeline discards the
  first frame's prediction, so the loss leaves it out.
- ``pipe.encode_image(image)`` when the transformer has an image context (``image_dim``: Wan 2.1
  I2V's CLIP ViT-H penultimate hidden states, ``encoder_hidden_states_image``).

Both are cached beside the clip's latents (``encode_clip``); the cache key adds the image
encoder's identity and the condition mode to the VAE's. The noise levels, the flow-matching
target ``noise - x0`` and Wan 2.2 A14B's per-expert routing are those of ``WanModel``.
"""

from __future__ import annotations

import torch

from vidsparse.lora.adapters.base import ClipConditionMixin, first_frame_image, module_fingerprint
from vidsparse.lora.adapters.wan import WanModel


class WanI2VModel(ClipConditionMixin, WanModel):
    """Wan image-to-video: Wan 2.1 I2V (CLIP image context), Wan 2.2 I2V-A14B (two experts), Wan 2.2 TI2V-5B."""

    display_name = "Wan I2V"
    pipeline_classes = ("WanImageToVideoPipeline",)
    encoder_names = ("vae", "text_encoder", "image_encoder")

    def __init__(self, pipe, model_id: str):
        super().__init__(pipe, model_id)
        self.expand_timesteps = bool(pipe.config.get("expand_timesteps", False))
        config = self.transformer.config
        self.image_context = config.get("image_dim") is not None
        if self.image_context and (getattr(pipe, "image_encoder", None) is None or pipe.image_processor is None):
            raise ValueError(
                f"{model_id}: this Wan I2V transformer cross-attends to CLIP image embeddings (image_dim="
                f"{config.image_dim}) but the pipeline has no image_encoder / image_processor to compute them; "
                "load the full pipeline (Wan2.1-I2V-*-Diffusers ships both)."
            )
        z = pipe.vae.config.z_dim
        expected = z if self.expand_timesteps else 2 * z + self._temporal  # noisy (+ mask + image latents)
        if config.in_channels != expected:
            raise ValueError(
                f"{model_id}: the transformer takes {config.in_channels} input channels; WanImageToVideoPipeline "
                f"gives it {z} noisy latent channels"
                + (
                    ""
                    if self.expand_timesteps
                    else f" + a {self._temporal}-channel first-frame mask + {z} image-latent channels"
                )
                + ". This pipeline's transformer and VAE do not belong together."
            )

    def condition_identity(self) -> dict:
        """The condition mode and the image encoder (the CLIP image context is cached too)."""
        encoder = module_fingerprint(self.pipe.image_encoder) if self.image_context else None
        return {"expand_timesteps": self.expand_timesteps, "image_encoder": encoder}

    def clip_condition(self, clip: torch.Tensor, caption: str | None = None) -> dict[str, torch.Tensor]:
        """The clip's first frame's condition, built by the pipeline's own code (``image_condition``)."""
        return self.image_condition(first_frame_image(clip), clip.shape[1], *clip.shape[2:])

    @torch.no_grad()
    def image_condition(self, image, num_frames: int, height: int, width: int) -> dict[str, torch.Tensor]:
        """What ``WanImageToVideoPipeline.__call__`` derives from ``image`` (PIL) for one video, batched [1, ...]:
        ``"condition"`` (mask + image latents; ``expand_timesteps``: ``"image_latents"``, the clean
        first latent frame) and, with an image context, ``"image_embeds"``."""
        pipe = self.pipe
        vae = self._ready(pipe.vae)
        device = next(vae.parameters()).device
        pixels = pipe.video_processor.preprocess(image, height=height, width=width).to(device, dtype=torch.float32)
        f = (num_frames - 1) // self._temporal + 1
        shape = (1, pipe.vae.config.z_dim, f, height // self._spatial, width // self._spatial)
        # ``latents`` given: prepare_latents draws no noise; only its condition is used
        made = pipe.prepare_latents(pixels, 1, shape[1], height, width, num_frames, torch.float32, device, None,
                                    torch.zeros(shape))  # fmt: skip
        out = {"image_latents": made[1]} if self.expand_timesteps else {"condition": made[1]}
        if self.image_context:
            self._ready(pipe.image_encoder)
            out["image_embeds"] = pipe.encode_image(image, device)
        return {k: v.float().cpu() for k, v in out.items()}

    def first_frame_mask(self, latents: torch.Tensor) -> torch.Tensor:
        """``expand_timesteps``: 0 on the first latent frame (the clean image), 1 elsewhere, as the pipeline's."""
        mask = torch.ones_like(latents[:1, :1])
        mask[:, :, 0] = 0
        return mask

    def predict(self, transformer, noisy, timesteps, text):
        dtype = noisy.dtype
        emb = text["prompt_embeds"].to(device=noisy.device, dtype=dtype)
        kwargs = {}
        if self.image_context:
            kwargs["encoder_hidden_states_image"] = text["image_embeds"].to(device=noisy.device, dtype=dtype)
        if self.expand_timesteps:  # the pipeline's step: clean first frame, timestep 0 on its tokens
            mask = self.first_frame_mask(noisy)
            hidden = (1 - mask) * text["image_latents"].to(noisy.device, dtype) + mask * noisy
            _, ph, pw = transformer.config.patch_size
            per_token = mask[0, 0][:, ::ph, ::pw].flatten()
            timesteps = per_token[None].to(timesteps.dtype) * timesteps.view(-1, 1)
        else:
            hidden = torch.cat([noisy, text["condition"].to(noisy.device, dtype)], dim=1)
        return transformer(hidden_states=hidden, timestep=timesteps, encoder_hidden_states=emb, return_dict=False,
                           **kwargs)[0]  # fmt: skip

    def loss(self, pred, target, cond):
        """All latents, except with ``expand_timesteps`` the first frame (the pipeline replaces it by the image's)."""
        if self.expand_timesteps:
            pred, target = pred[:, :, 1:], target[:, :, 1:]
        return super().loss(pred, target, cond)


class SkyReelsI2VModel(WanI2VModel):
    """SkyReels-V2 image-to-video (``SkyReelsV2ImageToVideoPipeline``): diffusers' copy of Wan 2.1 I2V's
    ``encode_image`` / ``prepare_latents`` and transformer call, on a UniPC flow-sigma scheduler."""

    family = "skyreels-v2"
    display_name = "SkyReels-V2 I2V"
    pipeline_classes = ("SkyReelsV2ImageToVideoPipeline",)
