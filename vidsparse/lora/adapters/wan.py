"""LoRA adapter of Wan text-to-video (and the tiny Wan pipeline): latents (z - mean) / std per channel.

Wan 2.1 (one transformer) and Wan 2.2 A14B (two experts: ``transformer`` for the high-noise
timesteps ``t >= boundary_ratio * 1000``, ``transformer_2`` below them): one LoRA per expert, each trained on the
timesteps its expert serves (``WanExperts``), saved as two files in diffusers' convention:
``pytorch_lora_weights.safetensors`` for ``transformer`` and
``pytorch_lora_weights_transformer_2.safetensors`` for ``transformer_2``, loaded with
``pipe.load_lora_weights(dir, weight_name=..., load_into_transformer_2=True)``
(``vidsparse.lora.load_lora`` loads both).
"""

from __future__ import annotations

import torch

from vidsparse.families.base import TINY_TEXT_LEN
from vidsparse.families.wan import text_len_of
from vidsparse.lora.adapters.base import TrainableVideoModel, module_fingerprint
from vidsparse.lora.data import ClipSpec
from vidsparse.lora.export import LORA_WEIGHT_NAME, LORA_WEIGHT_NAME_2


class WanExperts(torch.nn.Module):
    """The two experts of a Wan 2.2 A14B pipeline as one trained module, routed as the pipeline routes.

    ``WanPipeline.__call__`` denoises a step with ``transformer`` (the high-noise expert) when
    ``t >= boundary_ratio * num_train_timesteps`` and with ``transformer_2`` below it. The forward
    sends each sample of a batch to the expert that serves its timestep, so each expert's LoRA is
    trained on exactly the timesteps it denoises at inference (a step may touch only one expert).
    """

    def __init__(self, transformer: torch.nn.Module, transformer_2: torch.nn.Module, boundary_timestep: float):
        super().__init__()
        self.transformer = transformer
        self.transformer_2 = transformer_2
        self.boundary_timestep = boundary_timestep

    @property
    def config(self):
        return self.transformer.config

    def experts(self) -> dict[str, torch.nn.Module]:
        return {"transformer": self.transformer, "transformer_2": self.transformer_2}

    def high_noise(self, timestep: torch.Tensor) -> torch.Tensor:
        """Bool [B]: which samples the high-noise expert (``transformer``) serves."""
        return timestep >= self.boundary_timestep

    def forward(self, hidden_states, timestep, encoder_hidden_states, return_dict: bool = False, **kwargs):
        """Each sample on its expert; ``kwargs`` (e.g. image-to-video's ``encoder_hidden_states_image``)
        are split by sample too. Output channels are the transformer's (I2V inputs carry more)."""
        high = self.high_noise(timestep.reshape(timestep.shape[0], -1).amax(1))  # per-token: the step's t
        out = hidden_states.new_empty(hidden_states.shape[0], self.transformer.config.out_channels,
                                      *hidden_states.shape[2:])  # fmt: skip
        for mask, expert in ((high, self.transformer), (~high, self.transformer_2)):
            if mask.any():
                extra = {k: v[mask] if torch.is_tensor(v) else v for k, v in kwargs.items()}
                out[mask] = expert(hidden_states=hidden_states[mask], timestep=timestep[mask],
                                   encoder_hidden_states=encoder_hidden_states[mask], return_dict=False,
                                   **extra)[0]  # fmt: skip
        return (out,)


class WanModel(TrainableVideoModel):
    """Wan 2.1 / 2.2 A14B text-to-video (and the tiny Wan pipeline). Latents: (z - mean) / std per channel."""

    family = "wan"
    display_name = "Wan"
    pipeline_classes = ("WanPipeline",)
    default_target_modules = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0")
    max_sequence_length = 512

    def __init__(self, pipe, model_id: str):
        super().__init__(pipe, model_id)
        high, low = getattr(pipe, "transformer", None), getattr(pipe, "transformer_2", None)
        self.experts: WanExperts | None = None
        if low is not None:
            ratio = pipe.config.get("boundary_ratio")
            if high is None or not isinstance(ratio, (int, float)) or not 0 < ratio < 1:
                raise ValueError(
                    f"{model_id}: a two-expert Wan 2.2 pipeline needs both transformer and transformer_2 and a "
                    f"boundary_ratio in (0, 1) in its config (got transformer={type(high).__name__}, "
                    f"boundary_ratio={ratio!r}); the boundary decides which expert each timestep trains."
                )
            self.experts = WanExperts(high, low, float(ratio) * self.num_train_timesteps)
        elif high is None:
            raise ValueError(f"{model_id}: the Wan pipeline has no transformer to train.")
        self.check_flow_matching()
        self._tiny = getattr(pipe, "text_encoder", None) is None
        # hashed stand-in prompts: 512 tokens for a transformer with an image context (I2V), as generate's
        self._tiny_text_len = text_len_of((high if high is not None else low).config) or TINY_TEXT_LEN
        self._temporal = int(getattr(pipe, "vae_scale_factor_temporal", 4))
        self._spatial = int(getattr(pipe, "vae_scale_factor_spatial", 8))

    @property
    def transformer(self) -> torch.nn.Module:
        """The trained module: the transformer, or both experts of Wan 2.2 A14B (``WanExperts``)."""
        return self.experts if self.experts is not None else self.pipe.transformer

    @property
    def lora_files(self) -> dict[str, str]:
        if self.experts is None:
            return super().lora_files
        return {"transformer": LORA_WEIGHT_NAME, "transformer_2": LORA_WEIGHT_NAME_2}

    def _compute_text_identity(self) -> str:
        if self._tiny:
            return module_fingerprint(
                None,
                {
                    "encoder": "vidsparse.models.tiny.encode_prompt_tiny",
                    "dim": self.pipe.transformer.config.text_dim,
                    "len": self._tiny_text_len,
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
        p = self.pipe.transformer.config.patch_size
        self._check_patched_clip(spec, 1, p[1], p[2])

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

            emb = encode_prompt_tiny(caption, dim=self.transformer.config.text_dim, seq_len=self._tiny_text_len)
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


class SkyReelsModel(WanModel):
    """SkyReels-V2 text-to-video (``SkyReelsV2Pipeline``): a Wan 2.1 fine-tune whose pipeline calls the
    transformer as ``WanPipeline`` does (one timestep per clip, UMT5 text); its UniPC scheduler runs on
    flow sigmas (``use_flow_sigmas``, ``flow_prediction``), so the objective is Wan's flow matching with
    the scheduler's ``flow_shift``."""

    family = "skyreels-v2"
    display_name = "SkyReels-V2"
    pipeline_classes = ("SkyReelsV2Pipeline",)
