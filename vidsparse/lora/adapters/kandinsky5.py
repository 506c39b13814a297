"""LoRA adapter of Kandinsky 5 text-to-video (``Kandinsky5T2VPipeline``): its call, exactly, one clip at a time.

What ``Kandinsky5T2VPipeline.__call__`` (diffusers 0.42) feeds the transformer, built here the same
way so a LoRA trained on it meets the same inputs at inference:

- latents: the HunyuanVideo VAE's posterior mode times ``scaling_factor`` (the pipeline decodes
  ``latents / scaling_factor``), channel-last [B, f, h, w, C] for the transformer; the cache and the
  training loop keep the usual [B, C, f, h, w], ``predict`` permutes. A transformer with
  ``visual_cond`` gets the text-to-video pipeline's visual condition after them on channels:
  zero condition latents and a zero 1-channel mask (``prepare_latents``);
- text: ``pipe.encode_prompt`` -- Qwen2.5-VL's last hidden states of the prompt template (cropped at
  ``prompt_template_encode_start_idx``, up to ``max_sequence_length`` tokens), CLIP's pooled
  embedding and ``cu_seqlens``. The transformer takes no text mask: the pipeline passes a prompt's
  tokens unpadded, with ``text_rope_pos = arange(length)``. The cache pads each caption's tokens to
  ``max_sequence_length`` (so captions batch) and keeps its length; ``predict`` cuts them back and
  calls the transformer once per group of captions of equal length, so no caption ever meets
  padding it would not meet at inference;
- positions: ``visual_rope_pos`` (``arange`` of latent frames, ``height // vae_scale_factor_spatial
  // 2`` rows and as many columns, as the pipeline writes it), ``scale_factor`` from the pipeline's
  ``_get_scale_factor(height, width)`` and, for NABLA checkpoints, ``get_sparse_params``.

Objective: the pipeline's ``FlowMatchEulerDiscreteScheduler`` (``set_timesteps`` with its config's
``shift``): transformer ``timestep = 1000 s``, output the velocity ``noise - x0`` that ``step`` adds
with ``sigma_next - sigma``: the base flow matching. Classifier-free guidance (``guidance_scale``
5, its fixed negative prompt) combines a conditional and an unconditional call at inference;
training regresses the conditional velocity of each (clip, caption), as the other flow adapters.

A pipeline without text encoders (the tiny test pipeline) gets the family record's hashed
stand-ins (``vidsparse.families.kandinsky5.tiny_prompt_kwargs``), as ``vidsparse generate`` passes them.
"""

from __future__ import annotations

import torch

from vidsparse.lora.adapters.base import TrainableVideoModel, module_fingerprint
from vidsparse.lora.data import ClipSpec


class Kandinsky5Model(TrainableVideoModel):
    """Kandinsky 5 T2V: channel-last latents ``z * scaling_factor``, unpadded Qwen2.5-VL tokens + CLIP pooled."""

    family = "kandinsky5"
    display_name = "Kandinsky 5"
    pipeline_classes = ("Kandinsky5T2VPipeline",)
    #: per-layer full paths (set in ``__init__``): the text blocks' self-attention has the same names
    default_target_modules: tuple[str, ...] = ()
    encoder_names = ("vae", "text_encoder", "text_encoder_2")
    #: ``Kandinsky5T2VPipeline.__call__``'s default
    max_sequence_length = 512

    def __init__(self, pipe, model_id: str):
        super().__init__(pipe, model_id)
        self.check_flow_matching()
        self._tiny = getattr(pipe, "text_encoder", None) is None
        if self._tiny != (getattr(pipe, "text_encoder_2", None) is None):
            raise ValueError(
                f"{model_id}: Kandinsky 5 encodes captions with both text encoders (Qwen2.5-VL text_encoder and CLIP "
                "text_encoder_2); this pipeline has only one. Load the full pipeline."
            )
        cfg = self.transformer.config
        if int(cfg.patch_size[0]) != 1:
            raise ValueError(f"{model_id}: Kandinsky5T2VPipeline requires a temporal patch of 1, got {cfg.patch_size}.")
        self._temporal = int(pipe.vae_scale_factor_temporal)
        self._spatial = int(pipe.vae_scale_factor_spatial)
        if self._tiny:
            from vidsparse.families.kandinsky5 import tiny_prompt_kwargs

            self._text_len = int(tiny_prompt_kwargs(pipe, "")["prompt_embeds_qwen"].shape[1])
        else:
            self._text_len = self.max_sequence_length
        self.default_target_modules = self._attention_targets(
            ("visual_transformer_blocks",), "self_attention", ("to_query", "to_key", "to_value", "out_layer")
        )

    def _compute_text_identity(self) -> str:
        pipe = self.pipe
        if self._tiny:
            return module_fingerprint(None, {"encoder": "vidsparse.families.kandinsky5.tiny_prompt_kwargs",
                                             "config": dict(self.transformer.config), "len": self._text_len})  # fmt: skip
        parts = {
            name: {
                "tokenizer": type(getattr(pipe, tok, None)).__name__,
                "encoder": module_fingerprint(getattr(pipe, name, None)),
            }  # fmt: skip
            for name, tok in (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2"))
        }
        prompt = {"template": pipe.prompt_template, "crop": pipe.prompt_template_encode_start_idx,
                  "max_len": self.max_sequence_length}  # fmt: skip
        return module_fingerprint(None, {"family": self.family, "encoders": parts, "prompt": prompt})

    def validate_clip(self, spec: ClipSpec) -> None:
        _, ph, pw = (int(p) for p in self.transformer.config.patch_size)
        if self.transformer.config.attention_type == "nabla":  # NABLA tiles the token grid in 8x8 blocks
            self._check_patched_clip(spec, 1, ph, pw, tile=8, tile_why="NABLA's 8x8-token tiles")
        else:
            self._check_patched_clip(spec, 1, ph, pw)

    @torch.no_grad()
    def encode_video(self, pixels: torch.Tensor) -> torch.Tensor:
        return self._scaled_vae_mode(pixels)

    @torch.no_grad()
    def encode_text(self, caption: str) -> dict[str, torch.Tensor]:
        """One caption's Qwen tokens (padded to a fixed length, with their count), CLIP pooled embedding."""
        pipe = self.pipe
        if self._tiny:
            from vidsparse.families.kandinsky5 import tiny_prompt_kwargs

            made = tiny_prompt_kwargs(pipe, caption)
            qwen, clip, cu = made["prompt_embeds_qwen"], made["prompt_embeds_clip"], made["prompt_cu_seqlens"]
        else:
            device = torch.device("cpu")
            for name in ("text_encoder", "text_encoder_2"):
                device = next(self._ready(getattr(pipe, name)).parameters()).device
            qwen, clip, cu = pipe.encode_prompt(prompt=[caption], num_videos_per_prompt=1,
                                                max_sequence_length=self.max_sequence_length, device=device,
                                                dtype=torch.float32)  # fmt: skip
        length = int(cu[1] - cu[0])
        if qwen.shape[1] != length:
            raise RuntimeError(f"Kandinsky 5 encode_prompt gave {qwen.shape[1]} tokens for a prompt of {length}.")
        padded = qwen.new_zeros(self._text_len, qwen.shape[-1])
        padded[:length] = qwen[0]
        return {
            "prompt_embeds_qwen": padded.detach().float().cpu(),
            "prompt_length": torch.tensor(length, dtype=torch.long),
            "prompt_embeds_clip": clip[0].detach().float().cpu(),
        }

    def transformer_kwargs(self, hidden: torch.Tensor) -> dict:
        """The pipeline's position and sparsity inputs for channel-last latents ``hidden`` [B, f, h, w, C']."""
        pipe = self.pipe
        _, f, h, w, _ = hidden.shape
        height, width, device = h * self._spatial, w * self._spatial, hidden.device
        return dict(
            visual_rope_pos=[
                torch.arange(f, device=device),
                torch.arange(height // self._spatial // 2, device=device),
                torch.arange(width // self._spatial // 2, device=device),
            ],
            scale_factor=pipe._get_scale_factor(height, width),
            sparse_params=pipe.get_sparse_params(hidden, device),
        )

    def model_input(self, noisy: torch.Tensor, text: dict[str, torch.Tensor]) -> torch.Tensor:
        """[B, C, f, h, w] -> the transformer's channel-last input, with the T2V pipeline's zero visual
        condition and mask after the latents when the transformer has ``visual_cond``."""
        hidden = noisy.permute(0, 2, 3, 4, 1)
        if getattr(self.transformer, "visual_cond", False):
            hidden = torch.cat([hidden, torch.zeros_like(hidden), hidden.new_zeros(*hidden.shape[:-1], 1)], dim=-1)
        return hidden

    def predict(self, transformer, noisy, timesteps, text):
        dev, dt = noisy.device, noisy.dtype
        hidden = self.model_input(noisy, text)
        extra = self.transformer_kwargs(hidden)
        lengths = text["prompt_length"].view(-1).tolist()
        outs = []
        for length in sorted(set(lengths)):  # one call per prompt length: never padded tokens
            rows = torch.tensor([i for i, n in enumerate(lengths) if n == length], device=dev)
            pred = transformer(
                hidden_states=hidden[rows],
                encoder_hidden_states=text["prompt_embeds_qwen"].to(dev, dt)[rows, :length],
                pooled_projections=text["prompt_embeds_clip"].to(dev, dt)[rows],
                timestep=timesteps.to(dev, dt).view(-1)[rows],
                text_rope_pos=torch.arange(length, device=dev),
                return_dict=True,
                **extra,
            ).sample
            outs.append((rows, pred))
        if len(outs) == 1:
            out = outs[0][1]
        else:
            out = torch.cat([pred for _, pred in outs])[torch.cat([rows for rows, _ in outs]).argsort()]
        return out.permute(0, 4, 1, 2, 3)


class Kandinsky5I2VModel(Kandinsky5Model):
    """Kandinsky 5 image-to-video (``Kandinsky5I2VPipeline``): the image's latents as the clean first latent frame.

    As the pipeline's ``prepare_latents`` and sampling loop: the image (the clip's first frame as
    the 8-bit image a user would pass) is ``video_processor.preprocess``-ed to the clip's size,
    VAE-encoded and scaled by ``scaling_factor``, and put in place of the first latent frame; a
    ``visual_cond`` transformer also gets zero condition latents and a mask of 1 on that frame.
    Every step feeds that clean frame again at the step's one timestep (no per-token timestep) and
    the scheduler steps frames 1 onwards only, so the loss leaves frame 0 out. The pipeline draws
    the image latents from the VAE posterior; the cache keeps one such draw per clip, made by the
    pipeline's ``prepare_latents`` itself with a generator seeded ``image_seed``. The pipeline's
    ``normalize_first_frame`` re-normalises the first latent frames after sampling, which does
    not change what the transformer is fed.
    """

    display_name = "Kandinsky 5 I2V"
    pipeline_classes = ("Kandinsky5I2VPipeline",)
    #: seed of the generator ``prepare_latents`` draws the image latents' posterior sample with
    image_seed: int = 0

    def vae_identity(self) -> str:
        """The VAE's, marked: each cached latent file also holds the first-frame condition."""
        if self._vae_id is None:
            extra = {"family": self.family, "role": "vae+i2v", "seed": self.image_seed}
            self._vae_id = module_fingerprint(self.pipe.vae, extra)
        return self._vae_id

    def validate_clip(self, spec: ClipSpec) -> None:
        super().validate_clip(spec)
        least = 4 * self._temporal + 1  # 5 latent frames
        if spec.num_frames < least:
            raise ValueError(
                f"{self.display_name} needs at least {least} frames: after sampling, the pipeline's normalize_first_frame "
                f"rescales the first 4 latent frames to the statistics of the following ones, and with "
                f"{(spec.num_frames - 1) // self._temporal + 1} latent frames there are none (the video comes out NaN); "
                f"got {spec.num_frames}, use {least} or more."
            )

    @torch.no_grad()
    def encode_clip(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        from vidsparse.lora.adapters.wan_i2v import first_frame_image

        made = [self.image_condition(first_frame_image(clip), *clip.shape[1:]) for clip in pixels]
        return {"latents": self.encode_video(pixels), "image_condition": torch.cat(made)}

    @torch.no_grad()
    def image_condition(self, image, num_frames: int, height: int, width: int) -> torch.Tensor:
        """``prepare_latents``' channel-last latents [1, f, h, w, C'] for ``image`` (PIL), without their noise:
        the image latents on frame 0 (and, with ``visual_cond``, the condition channels and mask)."""
        pipe = self.pipe
        vae = self._ready(pipe.vae)
        device = next(vae.parameters()).device
        channels = int(self.transformer.config.in_visual_dim)
        made = pipe.prepare_latents(image=image, batch_size=1, num_channels_latents=channels, height=height,
                                    width=width, num_frames=num_frames, dtype=torch.float32, device=device,
                                    generator=torch.Generator().manual_seed(self.image_seed))  # fmt: skip
        made[:, 1:, ..., :channels] = 0  # the noise prepare_latents drew for the other frames is not kept
        return made.float().cpu()

    def model_input(self, noisy, text):
        channels = noisy.shape[1]
        made = text["image_condition"].to(noisy.device, noisy.dtype)
        hidden = noisy.permute(0, 2, 3, 4, 1)
        hidden = torch.cat([made[:, :1, ..., :channels], hidden[:, 1:]], dim=1)  # the clean image frame
        return torch.cat([hidden, made[..., channels:]], dim=-1)

    def loss(self, pred, target, cond):
        """Frames 1 onwards: the pipeline's scheduler never steps the first (the image's) latent frame."""
        return super().loss(pred[:, :, 1:], target[:, :, 1:], cond)


__all__ = ["Kandinsky5I2VModel", "Kandinsky5Model"]
