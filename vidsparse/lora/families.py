"""Training adapters for HunyuanVideo, LTX-Video and Mochi (text-to-video, flow matching).

Each follows its diffusers 0.42 pipeline exactly, so a LoRA trained here is trained on what the
pipeline will feed the transformer at inference:

============ ============================ ============================== =============================
family       latents (VAE mode z)         text conditioning              transformer time / output
============ ============================ ============================== =============================
HunyuanVideo ``z * scaling_factor``       Llama embeds [256] + mask,     ``t = 1000 s``, velocity;
                                          CLIP pooled; guidance 1000 g   guidance-distilled: ``g = 1``
LTX-Video    ``(z - mean) * sf / std``,   T5 embeds [128] + mask         ``t = 1000 s``, velocity;
             packed to tokens [B, S, C]                                  RoPE scale (8/25, 32, 32)
Mochi        ``(z - mean) * sf / std``    T5 embeds [256] + mask         ``t = 1000 (1 - s)``,
                                                                         output ``x0 - noise``
============ ============================ ============================== =============================

(``s`` is the noise level: ``x_s = (1 - s) x0 + s noise``.) Mochi's pipeline runs a
``FlowMatchEulerDiscreteScheduler(invert_sigmas=True)``: its sigmas are ``1 - s``, the
transformer gets ``1000 (1 - s)`` and ``step`` adds ``(sigma_next - sigma) * output`` with
``sigma_next - sigma = s - s_next > 0``; an Euler step towards the data therefore needs
``output = -(noise - x0)``. ``MochiModel.predict`` converts both, so the training loop's loss
(velocity ``noise - x0`` at timestep ``1000 s``) is the same for every family.

HunyuanVideo T2V is guidance-distilled: its transformer takes the guidance scale as an input
(``guidance = 1000 g``; the pipeline's default ``g = 6`` at inference). Training on data uses
``g = 1`` (``HunyuanVideoModel.guidance_scale``): at ``g = 1`` classifier-free guidance is the
plain conditional velocity, which is exactly the flow-matching target of a (video, caption)
pair. The same choice is the default of the public HunyuanVideo LoRA trainers.

Default LoRA targets are the video self-attention q/k/v/o only: Wan-style ``attn1`` for LTX and
Mochi (their joint-attention text projections ``add_*_proj`` / ``to_add_out`` and LTX's
cross-attention ``attn2`` are left alone); for HunyuanVideo ``attn.to_q/k/v/to_out.0`` of the
double-stream blocks and ``attn.to_q/k/v`` of the single-stream blocks (which have no attention
output projection: their ``proj_out`` also carries the MLP), listed per layer because the text
token refiner's self-attention has the same module names.

A pipeline without text encoders (``text_encoder=None``, as the tiny test pipelines) gets the
deterministic hashed embeddings of ``vidsparse.models.tiny.encode_prompt_tiny`` instead, with a
padding mask of one token per word (+1), so offline runs and tests exercise the masks.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from vidsparse.lora.data import ClipSpec
from vidsparse.lora.models import TrainableVideoModel, module_fingerprint


def tiny_text(caption: str, seq_len: int, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Hashed stand-in embeddings [seq_len, dim] and a bool padding mask [seq_len] for ``caption``."""
    from vidsparse.models.tiny import encode_prompt_tiny

    emb = encode_prompt_tiny(caption, seq_len=seq_len, dim=dim)[0]
    mask = torch.zeros(seq_len, dtype=torch.bool)
    mask[: min(seq_len, 1 + len(caption.split()))] = True
    return emb, mask


class _TextEncodersMixin:
    """Text identity and the tiny (no text encoder) switch shared by the three families."""

    text_encoder_names: ClassVar[tuple[str, ...]] = ("text_encoder",)
    max_sequence_length: ClassVar[int] = 256

    @property
    def tiny_text(self) -> bool:
        return getattr(self.pipe, "text_encoder", None) is None  # type: ignore[attr-defined]

    def _text_dim(self) -> int:
        cfg = self.transformer.config  # type: ignore[attr-defined]
        return int(cfg.get("text_embed_dim") or cfg.get("caption_channels"))

    def _compute_text_identity(self) -> str:
        pipe = self.pipe  # type: ignore[attr-defined]
        if self.tiny_text:
            from vidsparse.models import tiny

            return module_fingerprint(None, {"encoder": "vidsparse.lora.families.tiny_text", "dim": self._text_dim(),
                                             "len": tiny.TINY_TEXT_LEN, "family": self.family})  # type: ignore[attr-defined]
        parts = {}
        for name in self.text_encoder_names:
            tok = getattr(pipe, name.replace("text_encoder", "tokenizer"), None)
            parts[name] = {"tokenizer": type(tok).__name__, "vocab": getattr(tok, "vocab_size", None),
                           "encoder": module_fingerprint(getattr(pipe, name, None))}
        return module_fingerprint(None, {"family": self.family, "max_len": self.max_sequence_length,  # type: ignore[attr-defined]
                                         "encoders": parts})

    def _text_device(self) -> torch.device:
        device = torch.device("cpu")
        for name in self.text_encoder_names:
            module = getattr(self.pipe, name, None)  # type: ignore[attr-defined]
            if module is not None:
                device = next(self._ready(module).parameters()).device  # type: ignore[attr-defined]
        return device


class HunyuanVideoModel(_TextEncodersMixin, TrainableVideoModel):
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
        self._check_clip(spec, self._temporal * pt, self._spatial * p, self._spatial * p,
                         f"VAE {self._spatial}x times patch {p}x{p}")
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
            pooled = tiny.encode_prompt_tiny("pooled: " + caption, seq_len=1,
                                        dim=int(self.transformer.config.pooled_projection_dim))[0, 0]
        else:
            from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE

            device = self._text_device()
            emb, pooled, mask = self.pipe.encode_prompt(
                prompt=[caption], prompt_template=DEFAULT_PROMPT_TEMPLATE, num_videos_per_prompt=1, device=device,
                max_sequence_length=self.max_sequence_length,
            )
            emb, pooled, mask = emb[0], pooled[0], mask[0].bool()
        return {"prompt_embeds": emb.detach().float().cpu(), "prompt_attention_mask": mask.cpu(),
                "pooled_prompt_embeds": pooled.detach().float().cpu()}

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


class _T5TextMixin(_TextEncodersMixin):
    """T5 prompt embeddings + attention mask, as LTX-Video's and Mochi's pipelines encode them."""

    @torch.no_grad()
    def encode_text(self, caption: str) -> dict[str, torch.Tensor]:
        if self.tiny_text:
            from vidsparse.models import tiny

            emb, mask = tiny_text(caption, tiny.TINY_TEXT_LEN, self._text_dim())
        else:
            emb, mask, _, _ = self.pipe.encode_prompt(
                prompt=[caption], do_classifier_free_guidance=False, num_videos_per_prompt=1,
                max_sequence_length=self.max_sequence_length, device=self._text_device(),
            )
            emb, mask = emb[0], mask[0].bool()
        return {"prompt_embeds": emb.detach().float().cpu(), "prompt_attention_mask": mask.cpu()}


class LTXVideoModel(_T5TextMixin, TrainableVideoModel):
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
        self._check_clip(spec, self._temporal * self._pt, self._spatial * self._p, self._spatial * self._p,
                         f"VAE {self._spatial}x times patch {self._p}x{self._p}")
        self._record_latent_size(spec, self._temporal, self._spatial)  # the pipeline's video_sequence_length

    @torch.no_grad()
    def encode_video(self, pixels: torch.Tensor) -> torch.Tensor:
        from diffusers import LTXPipeline

        vae = self.pipe.vae
        z = self._vae_mode(pixels)
        return LTXPipeline._normalize_latents(z, vae.latents_mean.float(), vae.latents_std.float(),
                                              float(vae.config.scaling_factor))

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


class MochiModel(_T5TextMixin, TrainableVideoModel):
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
        self._check_clip(spec, self._temporal, self._spatial * p, self._spatial * p,
                         f"VAE {self._spatial}x times patch {p}x{p}")
        self._record_latent_size(spec, self._temporal, self._spatial)

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


__all__ = ["HunyuanVideoModel", "LTXVideoModel", "MochiModel", "tiny_text"]
