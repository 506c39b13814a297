"""LoRA adapter of LTX-Video text-to-video (see ``vidsparse.lora.adapters`` for the family table)."""

from __future__ import annotations

import torch

from vidsparse.lora.adapters.base import TrainableVideoModel
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
        out = transformer(
            hidden_states=LTXPipeline._pack_latents(noisy, p, pt),
            encoder_hidden_states=text["prompt_embeds"].to(dev, dt),
            timestep=timesteps.to(dev, dt),
            encoder_attention_mask=text["prompt_attention_mask"].to(dev).bool(),
            num_frames=f,  # latent sizes, as LTXPipeline passes them
            height=h,
            width=w,
            rope_interpolation_scale=(self._temporal / self.frame_rate, self._spatial, self._spatial),
            return_dict=False,
        )[0]
        return LTXPipeline._unpack_latents(out, f // pt, h // p, w // p, p, pt)
