"""LoRA adapter of HunyuanVideo 1.5 (``HunyuanVideo15Pipeline``, ``HunyuanVideo15ImageToVideoPipeline``).

Everything the transformer is fed is built by the pipeline's own code (diffusers 0.42), so a LoRA
trained here sees exactly what the pipeline feeds it at inference:

- latents: the VAE posterior's mode times ``vae.config.scaling_factor`` (the pipeline decodes
  ``latents / scaling_factor``; no mean / std);
- text: ``pipe.encode_prompt`` -- Qwen2.5-VL hidden states of the chat template (cropped at
  ``prompt_template_encode_start_idx``, ``tokenizer_max_length`` tokens) with their mask, and
  the ByT5 glyph-text embeddings (quoted text in the prompt; all-zero with an all-zero mask when
  there is none) with theirs;
- the extra input channels: ``pipe.prepare_cond_latents_and_mask``, concatenated after the noisy
  latents on channels. Text-to-video: zero condition latents and a zero mask, with
  ``vision_num_semantic_tokens`` all-zero SigLIP slots (``image_embeds``), which the transformer
  reads as "no image" (``torch.all(image_embeds == 0)``). Image-to-video: the first frame's
  latents (``_get_image_latents``: VAE mode x scaling factor) on latent frame 0 and zeros after
  it, a mask of 1 on frame 0, and ``pipe.encode_image``'s SigLIP tokens; the pipeline samples
  every latent frame (frame 0 included), so the loss covers all of them.

Objective: the pipeline's ``FlowMatchEulerDiscreteScheduler`` (``shift`` from its config), with
the transformer's ``timestep = 1000 s`` and output the velocity ``noise - x0``, i.e. the base
flow matching. Classifier-free guidance is the pipeline's ``guider`` at inference
(``ClassifierFreeGuidance``: the empty-prompt encoding as the unconditional branch); training
regresses the conditional velocity of each (clip, caption) pair, as every other flow adapter
here does (the trainer has no caption dropout), so the base model's unconditional branch stays
what it was. A meanflow transformer (``use_meanflow``: the I2V pipeline then feeds
``timestep_r``, the next step's timestep) is trained on another objective and is refused.
"""

from __future__ import annotations

import torch

from vidsparse.lora.adapters.base import TrainableVideoModel, module_fingerprint
from vidsparse.lora.adapters.text import TextEncodersMixin
from vidsparse.lora.data import ClipSpec


class HunyuanVideo15Model(TextEncodersMixin, TrainableVideoModel):
    """HunyuanVideo 1.5 text-to-video: latents ``z * scaling_factor``, Qwen2.5-VL + ByT5 text, zero conditions."""

    family = "hunyuan15"
    display_name = "HunyuanVideo 1.5"
    pipeline_classes = ("HunyuanVideo15Pipeline",)
    #: per-layer full paths (set in ``__init__``): the token refiner's self-attention
    #: (``context_embedder.token_refiner...attn``) has the same short names
    default_target_modules: tuple[str, ...] = ()
    encoder_names = ("vae", "text_encoder", "text_encoder_2")
    text_encoder_names = ("text_encoder", "text_encoder_2")

    def __init__(self, pipe, model_id: str):
        super().__init__(pipe, model_id)
        self.check_flow_matching()
        if getattr(pipe, "text_encoder", None) is None or getattr(pipe, "text_encoder_2", None) is None:
            raise ValueError(
                f"{model_id}: HunyuanVideo 1.5 LoRA training encodes captions with the pipeline's own encode_prompt, "
                "which needs both text encoders (Qwen2.5-VL text_encoder and ByT5 text_encoder_2); load the full "
                "pipeline (hunyuanvideo-community/HunyuanVideo-1.5-Diffusers-* ship both)."
            )
        cfg = self.transformer.config
        z = int(pipe.vae.config.latent_channels)
        if int(cfg.in_channels) != 2 * z + 1:
            raise ValueError(
                f"{model_id}: the transformer takes {cfg.in_channels} input channels; the HunyuanVideo 1.5 pipelines "
                f"give it {z} noisy latent channels + {z} condition-latent channels + a 1-channel mask = {2 * z + 1}. "
                "This pipeline's transformer and VAE do not belong together."
            )
        self._temporal = int(pipe.vae_scale_factor_temporal)
        self._spatial = int(pipe.vae_scale_factor_spatial)
        self.default_target_modules = self._attention_targets(
            ("transformer_blocks",), "attn", ("to_q", "to_k", "to_v", "to_out.0")
        )

    @property
    def max_sequence_length(self) -> int:  # type: ignore[override]
        return int(self.pipe.tokenizer_max_length)

    def _compute_text_identity(self) -> str:
        """Both encoders, and the pipeline's prompt settings (template, crop, lengths) that shape the embeddings."""
        pipe = self.pipe
        prompt = {
            "system_message": pipe.system_message,
            "crop_start": pipe.prompt_template_encode_start_idx,
            "max_len": pipe.tokenizer_max_length,
            "max_len_2": pipe.tokenizer_2_max_length,
        }
        return module_fingerprint(None, {"base": super()._compute_text_identity(), "prompt": prompt})

    def validate_clip(self, spec: ClipSpec) -> None:
        cfg = self.transformer.config
        p = int(cfg.patch_size)
        self._check_patched_clip(spec, int(cfg.patch_size_t), p, p)

    @torch.no_grad()
    def encode_video(self, pixels: torch.Tensor) -> torch.Tensor:
        return self._scaled_vae_mode(pixels)

    @torch.no_grad()
    def encode_text(self, caption: str) -> dict[str, torch.Tensor]:
        """``pipe.encode_prompt`` of one caption: Qwen2.5-VL embeddings + mask, ByT5 glyph embeddings + mask."""
        emb, mask, emb_2, mask_2 = self.pipe.encode_prompt(
            prompt=[caption], device=self._text_device(), dtype=torch.float32, batch_size=1, num_videos_per_prompt=1
        )
        return {
            "prompt_embeds": emb[0].detach().float().cpu(),
            "prompt_embeds_mask": mask[0].bool().cpu(),
            "prompt_embeds_2": emb_2[0].detach().float().cpu(),
            "prompt_embeds_mask_2": mask_2[0].bool().cpu(),
        }

    def conditions(
        self, noisy: torch.Tensor, text: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(condition latents, mask, ``image_embeds``) as the text-to-video pipeline builds them: zeros."""
        pipe, b = self.pipe, noisy.shape[0]
        cond, mask = pipe.prepare_cond_latents_and_mask(noisy, noisy.dtype, noisy.device)
        image = torch.zeros(b, pipe.vision_num_semantic_tokens, pipe.vision_states_dim, dtype=noisy.dtype,
                            device=noisy.device)  # fmt: skip
        return cond, mask, image

    def predict(self, transformer, noisy, timesteps, text):
        dev, dt = noisy.device, noisy.dtype
        cond, mask, image = self.conditions(noisy, text)
        return transformer(
            hidden_states=torch.cat([noisy, cond, mask], dim=1),
            image_embeds=image,
            timestep=timesteps.to(dev, dt),
            encoder_hidden_states=text["prompt_embeds"].to(dev, dt),
            encoder_attention_mask=text["prompt_embeds_mask"].to(dev, dt),  # float, as encode_prompt gives it
            encoder_hidden_states_2=text["prompt_embeds_2"].to(dev, dt),
            encoder_attention_mask_2=text["prompt_embeds_mask_2"].to(dev, dt),
            return_dict=False,
        )[0]


class HunyuanVideo15I2VModel(HunyuanVideo15Model):
    """HunyuanVideo 1.5 image-to-video: the clip's first frame as the pipeline's condition latents + SigLIP tokens.

    The pipeline picks the video size from the image (``video_processor.calculate_default_height_width``
    with the transformer's ``target_size``), so a clip must have one of those sizes: ``validate_clip``
    names the nearest.
    """

    display_name = "HunyuanVideo 1.5 I2V"
    pipeline_classes = ("HunyuanVideo15ImageToVideoPipeline",)
    encoder_names = ("vae", "text_encoder", "text_encoder_2", "image_encoder")

    def __init__(self, pipe, model_id: str):
        super().__init__(pipe, model_id)
        if self.transformer.config.get("use_meanflow", False):
            raise ValueError(
                f"{model_id}: this HunyuanVideo 1.5 I2V transformer is a meanflow model (use_meanflow=True: the pipeline "
                "feeds it timestep_r, the next step's timestep, and it predicts the mean velocity over that interval), "
                "an objective vidsparse train-lora does not train; train the non-distilled I2V checkpoint."
            )
        if getattr(pipe, "image_encoder", None) is None or getattr(pipe, "feature_extractor", None) is None:
            raise ValueError(
                f"{model_id}: HunyuanVideo 1.5 I2V needs the pipeline's image_encoder (SigLIP) and feature_extractor to "
                "build the first frame's image tokens; load the full pipeline."
            )

    def vae_identity(self) -> str:
        """The VAE's and the image encoder's: the cached latent file also holds the first-frame conditions."""
        if self._vae_id is None:
            extra = {"family": self.family, "role": "i2v", "vae": module_fingerprint(self.pipe.vae),
                     "image_encoder": module_fingerprint(self.pipe.image_encoder)}  # fmt: skip
            self._vae_id = module_fingerprint(None, extra)
        return self._vae_id

    def validate_clip(self, spec: ClipSpec) -> None:
        super().validate_clip(spec)
        target = int(self.pipe.target_size)
        size = tuple(int(v) for v in self.pipe.video_processor.calculate_default_height_width(
            spec.height, spec.width, target))  # fmt: skip
        if size != (spec.height, spec.width):
            raise ValueError(
                f"{self.display_name} generates at the size its pipeline picks for the image (a {target}-pixel bucket "
                f"of that aspect ratio), which for {spec.height}x{spec.width} is {size[0]}x{size[1]}; train at "
                f"--height {size[0]} --width {size[1]} so the LoRA learns the size it will generate."
            )

    @torch.no_grad()
    def encode_clip(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Latents of the clip, and its first frame's condition latents and SigLIP tokens (the pipeline's code)."""
        from vidsparse.lora.adapters.wan_i2v import first_frame_image

        latents = self.encode_video(pixels)
        conds, images = [], []
        for clip, z in zip(pixels, latents):
            cond, image = self.image_condition(first_frame_image(clip), z[None], *clip.shape[2:])
            conds.append(cond)
            images.append(image)
        return {"latents": latents, "condition": torch.cat(conds), "image_embeds": torch.cat(images)}

    @torch.no_grad()
    def image_condition(
        self, image, latents: torch.Tensor, height: int, width: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(condition latents + mask [1, C + 1, f, h, w], SigLIP tokens [1, N, D]) of ``image`` (PIL), as
        ``HunyuanVideo15ImageToVideoPipeline.__call__`` builds them for a video of ``latents``' shape."""
        pipe = self.pipe
        vae = self._ready(pipe.vae)
        self._ready(pipe.image_encoder)
        device = next(vae.parameters()).device
        image = pipe.video_processor.resize(image, height=height, width=width, resize_mode="crop")
        embeds = pipe.encode_image(image=image, batch_size=1, device=device, dtype=torch.float32)
        cond, mask = pipe.prepare_cond_latents_and_mask(latents=latents.to(device), image=image, batch_size=1,
                                                        height=height, width=width, dtype=torch.float32,
                                                        device=device)  # fmt: skip
        return torch.cat([cond, mask], dim=1).float().cpu(), embeds.float().cpu()

    def conditions(self, noisy, text):
        dev, dt = noisy.device, noisy.dtype
        z = noisy.shape[1]
        condition = text["condition"].to(dev, dt)
        return condition[:, :z], condition[:, z:], text["image_embeds"].to(dev, dt)


__all__ = ["HunyuanVideo15I2VModel", "HunyuanVideo15Model"]
