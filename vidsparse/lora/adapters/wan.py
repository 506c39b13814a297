"""LoRA adapter of Wan 2.1 text-to-video (and the tiny Wan pipeline): latents (z - mean) / std per channel."""

from __future__ import annotations

import torch

from vidsparse.lora.adapters.base import TrainableVideoModel, module_fingerprint
from vidsparse.lora.data import ClipSpec


class WanModel(TrainableVideoModel):
    """Wan 2.1 text-to-video (and the tiny Wan pipeline). Latents: (z - mean) / std per channel."""

    family = "wan"
    display_name = "Wan"
    pipeline_classes = ("WanPipeline",)
    default_target_modules = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0")
    max_sequence_length = 512

    def __init__(self, pipe, model_id: str):
        super().__init__(pipe, model_id)
        if getattr(pipe, "transformer", None) is None or getattr(pipe, "transformer_2", None) is not None:
            raise ValueError(
                f"{model_id}: this is a two-expert Wan 2.2 pipeline (transformer + transformer_2, switched by "
                "noise level at boundary_ratio); training a LoRA per expert on its own noise range is not "
                "implemented. vidsparse train-lora supports single-transformer Wan pipelines (Wan 2.1 T2V 1.3B/14B)."
            )
        self.check_flow_matching()
        self._tiny = getattr(pipe, "text_encoder", None) is None
        self._temporal = int(getattr(pipe, "vae_scale_factor_temporal", 4))
        self._spatial = int(getattr(pipe, "vae_scale_factor_spatial", 8))

    def _compute_text_identity(self) -> str:
        if self._tiny:
            from vidsparse.models import tiny

            return module_fingerprint(
                None,
                {
                    "encoder": "vidsparse.models.tiny.encode_prompt_tiny",
                    "dim": self.transformer.config.text_dim,
                    "len": tiny.TINY_TEXT_LEN,
                },
            )
        tok = getattr(self.pipe, "tokenizer", None)
        extra = {
            "tokenizer": type(tok).__name__,
            "vocab": getattr(tok, "vocab_size", None),
            "max_len": self.max_sequence_length,
        }
        return module_fingerprint(self.pipe.text_encoder, extra)

    def validate_clip(self, spec: ClipSpec) -> None:
        t, s = self._temporal, self._spatial
        p = self.transformer.config.patch_size
        self._check_clip(spec, t, s * p[1], s * p[2], f"VAE {s}x times patch {p[1]}x{p[2]}")
        self._record_latent_size(spec, t, s)

    def _vae_stats(self, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.pipe.vae.config
        mean = torch.tensor(cfg.latents_mean, device=device, dtype=dtype).view(1, -1, 1, 1, 1)
        std = torch.tensor(cfg.latents_std, device=device, dtype=dtype).view(1, -1, 1, 1, 1)
        return mean, std

    @torch.no_grad()
    def encode_video(self, pixels: torch.Tensor) -> torch.Tensor:
        z = self._vae_mode(pixels)
        mean, std = self._vae_stats(z.device, z.dtype)
        return (z - mean) / std

    @torch.no_grad()
    def encode_text(self, caption: str) -> dict[str, torch.Tensor]:
        if self._tiny:
            from vidsparse.models.tiny import encode_prompt_tiny

            emb = encode_prompt_tiny(caption, dim=self.transformer.config.text_dim)
        else:
            device = next(self._ready(self.pipe.text_encoder).parameters()).device
            emb, _ = self.pipe.encode_prompt(
                prompt=[caption],
                do_classifier_free_guidance=False,
                num_videos_per_prompt=1,
                max_sequence_length=self.max_sequence_length,
                device=device,
            )
        return {"prompt_embeds": emb[0].detach().cpu()}

    def predict(self, transformer, noisy, timesteps, text):
        emb = text["prompt_embeds"].to(device=noisy.device, dtype=noisy.dtype)
        return transformer(hidden_states=noisy, timestep=timesteps, encoder_hidden_states=emb, return_dict=False)[0]
