"""LoRA adapter of HunyuanVideo text-to-video (see ``vidsparse.lora.adapters`` for the family table)."""

from __future__ import annotations

import torch

from vidsparse.lora.adapters.base import TrainableVideoModel
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
        names = dict(self.transformer.named_modules())
        self.default_target_modules = tuple(
            f"{blocks}.{i}.attn.{proj}"
            for blocks in ("transformer_blocks", "single_transformer_blocks")
            for i in range(len(getattr(self.transformer, blocks)))
            for proj in ("to_q", "to_k", "to_v", "to_out.0")
            if f"{blocks}.{i}.attn.{proj}" in names  # single-stream blocks have no to_out
        )

    def validate_clip(self, spec: ClipSpec) -> None:
        cfg = self.transformer.config
        p, pt = int(cfg.patch_size), int(cfg.patch_size_t)
        self._check_clip(
            spec, self._temporal * pt, self._spatial * p, self._spatial * p, f"VAE {self._spatial}x times patch {p}x{p}"
        )
        self._record_latent_size(spec, self._temporal, self._spatial)

    @torch.no_grad()
    def encode_video(self, pixels: torch.Tensor) -> torch.Tensor:
        # the pipeline decodes ``latents / scaling_factor``
        return self._vae_mode(pixels) * float(self.pipe.vae.config.scaling_factor)

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
