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
        self._check_patched_clip(spec, self._pt, self._p, self._p)  # records the pipeline's video_sequence_length

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

    def clip_condition(self, clip: torch.Tensor, caption: str | None = None) -> dict[str, torch.Tensor]:
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


class LTXConditionModel(ClipConditionMixin, LTXVideoModel):
    """LTX-Video's condition pipeline (``LTXConditionPipeline``): the clip's first frames as the condition.

    What it is trained for: an image (the clip's first frame, ``condition_frames = 1``, the
    default) or a video prefix (its first ``condition_frames = 8k + 1`` frames: "extend this
    video", the length-extension use), at ``frame_index = 0`` with ``strength = 1.0``, i.e.
    ``LTXVideoCondition(image=..., frame_index=0)`` / ``LTXVideoCondition(video=frames, frame_index=0)``.
    Built as the pipeline's ``__call__`` and ``prepare_latents`` build it:

    - the condition: ``video_processor.preprocess`` (image) or ``preprocess_video`` (frames, cut
      by ``trim_conditioning_sequence``), VAE-encoded alone and normalised with
      ``_normalize_latents``' default ``scaling_factor = 1`` (the clip's latents use the VAE's);
      at ``frame_index = 0`` it replaces the first ``n`` latent frames (``lerp`` at strength 1)
      and adds no extra tokens;
    - the conditioning mask is 1 on those frames' tokens: per-token timestep
      ``min(t, 1000 (1 - mask))`` (0 there, ``t`` elsewhere); the pipeline never steps them, so the
      loss leaves them out; at every step they are re-noised from the clean condition,
      ``c + image_cond_noise_scale * eps * s^2`` with fresh ``eps`` (``training_inputs`` takes it
      from the training noise on those frames, which nothing else uses);
    - RoPE from ``video_coords``: ``_prepare_video_ids`` scaled by ``_scale_video_ids`` (time
      ``max(8 f - 7, 0)`` pixel frames, space 32x), time divided by ``frame_rate``; ``LTXPipeline``
      (``rope_interpolation_scale``) puts latent frame ``f`` at ``8 f`` instead, so the same LoRA
      trained there sees shifted time positions here;
    - text: T5 at the pipeline's ``max_sequence_length = 256``.

    Strength below 1 (soft conditioning) and conditions at ``frame_index > 0`` (extra tokens with
    shifted coordinates) are not built: train-lora trains the first-frames condition only. The
    pipeline draws the condition latents from the VAE posterior; the cache takes its mode.
    """

    display_name = "LTX-Video condition"
    pipeline_classes = ("LTXConditionPipeline",)
    max_sequence_length = 256
    takes_condition_frames = True
    #: ``LTXConditionPipeline.__call__``'s default ``image_cond_noise_scale``
    image_cond_noise_scale: float = 0.15

    def __init__(self, pipe, model_id: str):
        super().__init__(pipe, model_id)
        self.condition_frames = 1

    def set_condition_frames(self, frames: int | None) -> None:
        """Condition on the clip's first ``frames`` frames: 1 (an image) or ``8k + 1`` (a video prefix)."""
        if frames is None:
            return
        k = self._temporal
        if isinstance(frames, bool) or not isinstance(frames, int) or frames < 1 or (frames - 1) % k:
            lo = max(1, (frames - 1) // k * k + 1) if isinstance(frames, int) and frames > 0 else 1
            raise ValueError(
                f"--condition-frames must be 1 (the first frame as an image) or {k}k + 1 (a video prefix: "
                f"LTXConditionPipeline refuses other lengths), got {frames!r}; e.g. {lo} or {lo + k}."
            )
        self.condition_frames = frames
        self._vae_id = None  # the cached condition depends on it

    def condition_identity(self) -> dict:
        return {"condition_frames": self.condition_frames, "frame_index": 0, "strength": 1.0}

    def validate_clip(self, spec: ClipSpec) -> None:
        super().validate_clip(spec)
        latent = (spec.num_frames - 1) // self._temporal + 1
        cond = (self.condition_frames - 1) // self._temporal + 1
        if cond >= latent:
            raise ValueError(
                f"--condition-frames {self.condition_frames} covers all {latent} latent frames of a "
                f"{spec.num_frames}-frame clip, leaving nothing to train; use fewer condition frames or "
                f"--num-frames {spec.num_frames + self._temporal} or more."
            )

    def condition_images(self, clip: torch.Tensor) -> list:
        """The first ``condition_frames`` frames of a clip [3, F, H, W] as the 8-bit PIL images a user would pass."""
        return [first_frame_image(clip[:, i : i + 1]) for i in range(self.condition_frames)]

    def clip_condition(self, clip: torch.Tensor, caption: str | None = None) -> dict[str, torch.Tensor]:
        return {"condition_latents": self.condition_latents(self.condition_images(clip), *clip.shape[1:])}

    @torch.no_grad()
    def condition_latents(self, frames: list, num_frames: int, height: int, width: int) -> torch.Tensor:
        """``prepare_latents``' normalised condition latents [1, C, n, h, w] of ``frames`` (PIL: one image or a
        video prefix) for a ``num_frames`` video, the posterior's mode."""
        pipe = self.pipe
        vae = self._ready(pipe.vae)
        device = next(vae.parameters()).device
        if len(frames) == 1:  # __call__: an image condition
            pixels = pipe.video_processor.preprocess(frames[0], height, width).unsqueeze(2)
        else:  # a video condition, cut to 8k + 1 frames that fit the video
            pixels = pipe.video_processor.preprocess_video(frames, height, width)
            pixels = pixels[:, :, : pipe.trim_conditioning_sequence(0, pixels.size(2), num_frames)]
        z = vae.encode(pixels.to(device, vae.dtype)).latent_dist.mode().float()
        return pipe._normalize_latents(z, vae.latents_mean, vae.latents_std).float().cpu()

    def conditioning_mask(self, latents: torch.Tensor, frames: int) -> torch.Tensor:
        """The pipeline's packed conditioning mask [1, S]: 1 (the strength) on the first ``frames`` latent frames."""
        from diffusers import LTXPipeline

        mask = latents.new_zeros(1, 1, *latents.shape[2:], dtype=torch.float32)
        mask[:, :, :frames] = 1.0
        return LTXPipeline._pack_latents(mask, self._p, self._pt).squeeze(-1)

    def video_coords(self, latents: torch.Tensor) -> torch.Tensor:
        """The pipeline's ``video_coords`` [B, 3, S] (float32) for latents [B, C, f, h, w]: its own id helpers."""
        pipe = self.pipe
        b, _, f, h, w = latents.shape
        ids = pipe._prepare_video_ids(b, f, h, w, patch_size=self._p, patch_size_t=self._pt, device=latents.device)
        ids = pipe._scale_video_ids(ids, scale_factor=self._spatial, scale_factor_t=self._temporal, frame_index=0,
                                    device=latents.device)  # fmt: skip
        coords = ids.float()
        coords[:, 0] = coords[:, 0] * (1.0 / self.frame_rate)
        return coords

    def training_inputs(self, x0, noise, levels, cond=None):
        """Flow matching, with the condition frames as the pipeline holds them at noise level ``s``:
        ``c + image_cond_noise_scale * eps * s^2`` (``eps``: the noise drawn for those frames)."""
        if cond is None or "condition_latents" not in cond:
            raise ValueError(
                "LTX-Video condition training needs the clip's condition latents (cond['condition_latents'], "
                "cached by encode_clip) to build the pipeline's latents."
            )
        noisy, target, timesteps = super().training_inputs(x0, noise, levels)
        c = cond["condition_latents"].to(x0.device, x0.dtype)
        n = c.shape[2]
        s = levels.to(x0.device, x0.dtype).view(-1, 1, 1, 1, 1)
        renoised = c + self.image_cond_noise_scale * noise[:, :, :n] * s**2
        return torch.cat([renoised, noisy[:, :, n:]], dim=2), target, timesteps

    def predict(self, transformer, noisy, timesteps, text):
        """The pipeline's transformer call on its latents ``noisy`` [B, C, f, h, w] (condition frames included)."""
        from diffusers import LTXPipeline

        dev, dt = noisy.device, noisy.dtype
        _, _, f, h, w = noisy.shape
        p, pt = self._p, self._pt
        mask = self.conditioning_mask(noisy, text["condition_latents"].shape[2]).to(dev)
        per_token = torch.minimum(timesteps.to(dev, torch.float32).view(-1, 1), (1 - mask) * 1000.0)
        out = transformer(
            hidden_states=LTXPipeline._pack_latents(noisy, p, pt),
            encoder_hidden_states=text["prompt_embeds"].to(dev, dt),
            timestep=per_token,
            encoder_attention_mask=text["prompt_attention_mask"].to(dev).bool(),
            video_coords=self.video_coords(noisy),
            return_dict=False,
        )[0]
        return LTXPipeline._unpack_latents(out, f // pt, h // p, w // p, p, pt)

    def loss(self, pred, target, cond):
        """The frames after the condition: the pipeline's scheduler never steps the condition's tokens."""
        n = cond["condition_latents"].shape[2]
        return super().loss(pred[:, :, n:], target[:, :, n:], cond)
