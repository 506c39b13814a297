"""LoRA adapters of HunyuanVideo text- and image-to-video (see ``vidsparse.lora.adapters`` for the family table)."""

from __future__ import annotations

import torch

from vidsparse.lora.adapters.base import ClipConditionMixin, TrainableVideoModel, first_frame_image
from vidsparse.lora.adapters.text import TextEncodersMixin, tiny_text
from vidsparse.lora.data import ClipSpec


class HunyuanVideoModel(TextEncodersMixin, TrainableVideoModel):
    """HunyuanVideo T2V (``HunyuanVideoPipeline``): latents ``z * scaling_factor``, Llama + CLIP text."""

    family = "hunyuan"
    display_name = "HunyuanVideo"
    pipeline_classes = ("HunyuanVideoPipeline",)
    #: per-layer full paths (set in ``__init__``): the short names ``attn.to_q`` would also match
    #: the text token refiner's self-attention, which has the same module names
    default_target_modules: tuple[str, ...] = ()
    encoder_names = ("vae", "text_encoder", "text_encoder_2")
    text_encoder_names = ("text_encoder", "text_encoder_2")
    max_sequence_length = 256
    #: embedded guidance while training (``g = 1``: the conditional velocity; see the module doc).
    guidance_scale: float = 1.0

    def __init__(self, pipe, model_id: str):
        super().__init__(pipe, model_id)
        self.check_flow_matching()
        self._temporal = int(getattr(pipe, "vae_scale_factor_temporal", 4))
        self._spatial = int(getattr(pipe, "vae_scale_factor_spatial", 8))
        self.default_target_modules = self._attention_targets(  # single-stream blocks have no to_out
            ("transformer_blocks", "single_transformer_blocks"), "attn", ("to_q", "to_k", "to_v", "to_out.0")
        )

    def validate_clip(self, spec: ClipSpec) -> None:
        cfg = self.transformer.config
        p = int(cfg.patch_size)
        self._check_patched_clip(spec, int(cfg.patch_size_t), p, p)

    @torch.no_grad()
    def encode_video(self, pixels: torch.Tensor) -> torch.Tensor:
        return self._scaled_vae_mode(pixels)

    @torch.no_grad()
    def encode_text(self, caption: str) -> dict[str, torch.Tensor]:
        if self.tiny_text:
            from vidsparse.models import tiny

            emb, mask = tiny_text(caption, tiny.TINY_TEXT_LEN, self._text_dim())
            pooled = tiny.encode_prompt_tiny(
                "pooled: " + caption, seq_len=1, dim=int(self.transformer.config.pooled_projection_dim)
            )[0, 0]
        else:
            from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE

            device = self._text_device()
            emb, pooled, mask = self.pipe.encode_prompt(
                prompt=[caption],
                prompt_template=DEFAULT_PROMPT_TEMPLATE,
                num_videos_per_prompt=1,
                device=device,
                max_sequence_length=self.max_sequence_length,
            )
            emb, pooled, mask = emb[0], pooled[0], mask[0].bool()
        return {
            "prompt_embeds": emb.detach().float().cpu(),
            "prompt_attention_mask": mask.cpu(),
            "pooled_prompt_embeds": pooled.detach().float().cpu(),
        }

    def predict(self, transformer, noisy, timesteps, text):
        dev, dt = noisy.device, noisy.dtype
        b = noisy.shape[0]
        return transformer(
            hidden_states=noisy,
            timestep=timesteps.to(dev, dt),
            encoder_hidden_states=text["prompt_embeds"].to(dev, dt),
            encoder_attention_mask=text["prompt_attention_mask"].to(dev).long(),  # as the tokenizer gives it
            pooled_projections=text["pooled_prompt_embeds"].to(dev, dt),
            guidance=torch.full((b,), self.guidance_scale * 1000.0, device=dev, dtype=dt),
            return_dict=False,
        )[0]


class HunyuanVideoI2VModel(ClipConditionMixin, HunyuanVideoModel):
    """HunyuanVideo image-to-video (``HunyuanVideoImageToVideoPipeline``): the first frame through LLaVA and the latents.

    The image is the clip's first frame as the 8-bit image a user would pass. It enters twice,
    each built by the pipeline's own code:

    - the prompt embeddings: ``pipe.encode_prompt(image=..., prompt=caption,
      prompt_template=DEFAULT_PROMPT_TEMPLATE, image_embed_interleave=...)``, a LLaVA forward over
      the Llama-3 template with the image's 576 CLIP tokens, cut at the template's offsets; 2 of
      every ``image_embed_interleave`` image tokens are kept (as ``__call__``: 2 for
      ``latent_concat``, 4 for ``token_replace``). They depend on the image and the caption, so
      they are cached per clip (``condition_reads_caption``) and the per-caption text file holds
      the CLIP pooled embedding only;
    - the latents (``prepare_latents``, the VAE posterior's mode, as its ``"argmax"``, times the
      VAE's ``scaling_factor``): ``latent_concat`` concatenates ``[noisy; image latents on the
      first latent frame, zeros after; a one-channel mask, 1 on the first frame]`` on channels and
      samples every latent frame (the loss covers them all; the pipeline then drops the first,
      the image's); ``token_replace`` puts the clean image latents in place of the first latent
      frame at every step (the transformer gives those tokens its timestep-0 modulation) and
      steps frames 1 onwards only, which the loss keeps.

    The pipeline starts from ``0.999 noise + 0.001 image latents``: training samples the plain
    flow path (``s = 1`` is pure noise); the two differ by 0.1% of the image. Embedded guidance
    (a transformer with ``guidance_embeds``) is ``g = 1`` as in text-to-video; the I2V pipeline's
    default ``guidance_scale`` is 1.0 as well.
    """

    display_name = "HunyuanVideo I2V"
    pipeline_classes = ("HunyuanVideoImageToVideoPipeline",)
    condition_reads_caption = True

    def __init__(self, pipe, model_id: str):
        super().__init__(pipe, model_id)
        cfg = self.transformer.config
        self.image_condition_type = cfg.get("image_condition_type")
        z = int(pipe.vae.config.latent_channels)
        expected = {"latent_concat": 2 * z + 1, "token_replace": z}
        if self.image_condition_type not in expected:
            raise ValueError(
                f"{model_id}: HunyuanVideoImageToVideoPipeline drives a transformer with image_condition_type "
                f"'latent_concat' or 'token_replace'; this one has {self.image_condition_type!r}: a text-to-video "
                "transformer. Load it as HunyuanVideoPipeline, or load an I2V checkpoint."
            )
        if cfg.in_channels != expected[self.image_condition_type]:
            raise ValueError(
                f"{model_id}: a {self.image_condition_type} transformer takes {expected[self.image_condition_type]} "
                f"input channels with this {z}-channel VAE, this one takes {cfg.in_channels}: the transformer and "
                "the VAE do not belong together."
            )
        missing = [n for n in ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "image_processor")
                   if getattr(pipe, n, None) is None]  # fmt: skip
        if missing:
            raise ValueError(
                f"{model_id}: HunyuanVideo I2V's prompt embeddings are a LLaVA forward over the caption and the first "
                f"frame, so training needs the pipeline's {', '.join(missing)}; load the full pipeline "
                "(e.g. hunyuanvideo-community/HunyuanVideo-I2V)."
            )
        #: ``__call__``'s default ``image_embed_interleave`` for this transformer
        self.image_embed_interleave = 2 if self.image_condition_type == "latent_concat" else 4

    def condition_identity(self) -> dict:
        from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video_image2video import DEFAULT_PROMPT_TEMPLATE

        return {"image_condition_type": self.image_condition_type, "interleave": self.image_embed_interleave,
                "template": DEFAULT_PROMPT_TEMPLATE, "image_processor": self.pipe.image_processor.to_dict(),
                "max_len": self.max_sequence_length}  # fmt: skip

    @torch.no_grad()
    def encode_text(self, caption: str) -> dict[str, torch.Tensor]:
        """The caption-only part: CLIP's pooled embedding, as ``encode_prompt`` computes it."""
        pooled = self.pipe._get_clip_prompt_embeds([caption], device=self._text_device(), max_sequence_length=77)
        return {"pooled_prompt_embeds": pooled[0].detach().float().cpu()}

    def clip_condition(self, clip: torch.Tensor, caption: str | None = None) -> dict[str, torch.Tensor]:
        image = first_frame_image(clip)
        return {**self.prompt_condition(image, caption), "image_latents": self.image_latents(image, *clip.shape[2:])}

    @torch.no_grad()
    def prompt_condition(self, image, caption: str) -> dict[str, torch.Tensor]:
        """``encode_prompt``'s LLaVA prompt embeddings [1, L, D] and mask [1, L] of ``caption`` with ``image`` (PIL)."""
        from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video_image2video import DEFAULT_PROMPT_TEMPLATE

        device = self._text_device()
        emb, _, mask = self.pipe.encode_prompt(
            image=image, prompt=[caption], prompt_template=DEFAULT_PROMPT_TEMPLATE, device=device,
            max_sequence_length=self.max_sequence_length, image_embed_interleave=self.image_embed_interleave,
        )  # fmt: skip
        return {"prompt_embeds": emb.detach().float().cpu(), "prompt_attention_mask": mask.float().cpu()}

    @torch.no_grad()
    def image_latents(self, image, height: int, width: int) -> torch.Tensor:
        """``prepare_latents``' image latents [1, C, 1, h, w] of ``image`` (PIL): the posterior's mode times ``scaling_factor``."""
        pipe = self.pipe
        vae = self._ready(pipe.vae)
        device = next(vae.parameters()).device
        pixels = pipe.video_processor.preprocess(image, height, width).to(device, vae.dtype)
        z = vae.encode(pixels.unsqueeze(2)).latent_dist.mode().float()
        return (z * float(pipe.vae_scaling_factor)).cpu()

    def transformer_hidden(self, noisy: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        """The pipeline's ``latent_model_input`` for latents ``noisy`` [B, C, f, h, w] and image latents [B, C, 1, h, w]."""
        image = image.to(noisy.device, noisy.dtype)
        if self.image_condition_type == "token_replace":
            return torch.cat([image, noisy[:, :, 1:]], dim=2)
        cond = torch.cat([image, image.new_zeros(*image.shape[:2], noisy.shape[2] - 1, *image.shape[3:])], dim=2)
        mask = torch.zeros_like(noisy[:, :1])
        mask[:, :, 0] = 1
        return torch.cat([noisy, cond, mask], dim=1)

    def predict(self, transformer, noisy, timesteps, text):
        dev, dt = noisy.device, noisy.dtype
        b = noisy.shape[0]
        guidance = None
        if transformer.config.get("guidance_embeds"):
            guidance = torch.full((b,), self.guidance_scale * 1000.0, device=dev, dtype=dt)
        return transformer(
            hidden_states=self.transformer_hidden(noisy, text["image_latents"]),
            timestep=timesteps.to(dev, dt),
            encoder_hidden_states=text["prompt_embeds"].to(dev, dt),
            encoder_attention_mask=text["prompt_attention_mask"].to(dev, dt),  # __call__ casts it to the dtype
            pooled_projections=text["pooled_prompt_embeds"].to(dev, dt),
            guidance=guidance,
            return_dict=False,
        )[0]

    def loss(self, pred, target, cond):
        """All latent frames (latent_concat); frames 1 onwards with token_replace (the first is the image's)."""
        if self.image_condition_type == "token_replace":
            pred, target = pred[:, :, 1:], target[:, :, 1:]
        return super().loss(pred, target, cond)
