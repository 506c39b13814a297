"""LoRA adapters of Cosmos-Predict2 video2world and Cosmos-Predict2.5 (``CosmosTransformer3DModel``).

Both pipelines of diffusers 0.42 consume the transformer as a rectified-flow velocity model on the
normalised Wan-VAE latents ``x0 = (z - latents_mean) / latents_std`` (Predict2 also times
``sigma_data = 1``), so the trained objective is the base flow matching, with the conditioning
frames held as each pipeline holds them:

- **Predict2** (``Cosmos2VideoToWorldPipeline``) samples on the EDM scale: ``x = x0 + sigma n`` with
  Karras sigmas in [0.002, 80]. It feeds the transformer ``c_in x = x / (sigma + 1)`` at timestep
  ``t = sigma / (sigma + 1)`` and reads its output ``F`` as ``x0_hat = c_skip x + c_out F`` with
  ``c_skip = 1 - t``, ``c_out = -t``. With ``x_t = c_in x = (1 - t) x0 + t n`` (the flow
  interpolation at ``t``) that is ``x0_hat = x_t - t F``: ``F`` is the flow velocity ``n - x0`` at
  flow time ``t`` (the timestep in [0, 1], not ``1000 t``). The conditioning latent frames (the
  image's, or a ``4k + 1``-frame video prefix's) are fed clean at ``t_c = s_c / (s_c + 1)``
  (``sigma_conditioning = 1e-4``) and their output is replaced by the clean latents, so the loss
  leaves them out. The pipeline passes ``fps`` (default 16: the RoPE time scale), the condition
  mask channel and an all-zero padding mask.
- **Predict2.5** (``Cosmos2_5_PredictBasePipeline``) is a flow model on its UniPC flow scheduler
  (``sigma`` in [0, 1], shift from its config): hidden states ``x_s`` at timestep ``s``; the
  conditioning frames (none for text2world, the image's latent frame for image2world, 1 or 2
  latent frames of a video for video2world) are fed clean at ``conditional_frame_timestep = 1e-4``
  and their velocity is replaced by the ground truth ``noise - cond`` (``gt_velocity``) under the
  condition mask, so they too are left out of the loss. No ``fps``.

Weighting: the MSE of the velocity over the generated latent frames, uniform in the noise level
drawn by the trainer's sampler (logit-normal or uniform, the scheduler's shift). Since
``x0_hat - x0 = -t (F - v)``, this equals the ``x0`` MSE weighted by ``1 / t^2``, the same
weighting as every other flow adapter here. (NVIDIA's cosmos-predict2 recipes use their own
sigma distribution and weights; the ideal model is the same either way.)

Condition: ``--condition-frames K``, the clip's first ``K`` frames as the 8-bit frames a user would
pass, through the pipeline's own ``video_processor`` and ``prepare_latents`` (cached per clip):
Predict2: ``K = 1`` (``image=``, the default) or ``4k + 1`` (``video=``); Predict2.5: none
(text2world, the default), ``K = 1`` (``num_latent_conditional_frames=1``, also what ``image=``
conditions) or ``K = 5`` (``video=``, ``num_latent_conditional_frames=2``). The Wan VAE is causal,
so the conditioning latent frames depend only on those ``K`` frames, whatever the pipeline pads
after them. Predict2's ``prepare_latents`` draws them from the VAE posterior; the cache takes the
posterior's mode (reproducible), as every other image-to-video adapter here.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from typing import Any

import torch

from vidsparse.lora.adapters.base import ClipConditionMixin, TrainableVideoModel, first_frame_image, module_fingerprint
from vidsparse.lora.adapters.text import TextEncodersMixin
from vidsparse.lora.data import ClipSpec


def _call_default(pipe, name: str) -> Any:
    """The default of ``pipe.__call__``'s argument ``name`` (what the pipeline uses when a user passes none)."""
    return inspect.signature(type(pipe).__call__).parameters[name].default


@contextlib.contextmanager
def _posterior_mode(pipe):
    """``prepare_latents`` with the VAE posterior's mode: its module's ``retrieve_latents`` in argmax mode."""
    module = inspect.getmodule(type(pipe))
    original = module.retrieve_latents
    module.retrieve_latents = functools.partial(original, sample_mode="argmax")
    try:
        yield
    finally:
        module.retrieve_latents = original


class CosmosPredict2Model(ClipConditionMixin, TextEncodersMixin, TrainableVideoModel):
    """Cosmos-Predict2 video2world (``Cosmos2VideoToWorldPipeline``): flow velocity at ``t = sigma / (sigma + 1)``,
    the first ``K`` frames' latents clean and out of the loss."""

    family = "cosmos"
    display_name = "Cosmos-Predict2 video2world"
    pipeline_classes = ("Cosmos2VideoToWorldPipeline",)
    default_target_modules = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0")
    takes_condition_frames = True
    #: condition frames when ``--condition-frames`` is not given (Predict2 needs an image or a video)
    default_condition_frames = 1

    def __init__(self, pipe, model_id: str):
        super().__init__(pipe, model_id)
        self.check_flow_matching()
        cfg = self.transformer.config
        z = int(pipe.vae.config.z_dim)
        if int(cfg.in_channels) != z + 1 or int(cfg.out_channels) != z:
            raise ValueError(
                f"{model_id}: {type(pipe).__name__} feeds the transformer {z} latent channels + the condition mask "
                f"({z + 1}) and reads {z}; this transformer takes {cfg.in_channels} and gives {cfg.out_channels}. "
                "Its transformer and VAE do not belong together."
            )
        self._temporal = int(pipe.vae_scale_factor_temporal)
        self._spatial = int(pipe.vae_scale_factor_spatial)
        self.condition_frames = self.default_condition_frames
        self.max_sequence_length = int(_call_default(pipe, "max_sequence_length"))

    # -- the condition --------------------------------------------------------------------------
    def allowed_condition_frames(self, frames: int) -> bool:
        return frames >= 1 and (frames - 1) % self._temporal == 0

    def condition_frames_help(self) -> str:
        k = self._temporal
        return f"1 (the first frame, image=) or {k}k + 1 (a video prefix, video=; whole latent frames)"

    def set_condition_frames(self, frames: int | None) -> None:
        if frames is None:
            return
        if isinstance(frames, bool) or not isinstance(frames, int) or not self.allowed_condition_frames(frames):
            raise ValueError(
                f"--condition-frames for {self.display_name} must be {self.condition_frames_help()}, got {frames!r}."
            )
        self.condition_frames = frames
        self._vae_id = None  # the cached condition depends on it

    def condition_identity(self) -> dict[str, Any]:
        return {"condition_frames": self.condition_frames, "pipeline": type(self.pipe).__name__}

    def validate_clip(self, spec: ClipSpec) -> None:
        p = int(self.transformer.config.patch_size[1])
        m = self._spatial * p
        self._check_clip(spec, self._temporal, m, m, f"VAE {self._spatial}x times patch {p}x{p}")
        self._record_latent_size(spec, self._temporal, self._spatial)
        latent = (spec.num_frames - 1) // self._temporal + 1
        if self.condition_latent_frames() >= latent:
            raise ValueError(
                f"--condition-frames {self.condition_frames} covers all {latent} latent frames of a {spec.num_frames}-"
                f"frame clip, leaving nothing to train; use --num-frames {spec.num_frames + self._temporal} or more."
            )

    def condition_latent_frames(self) -> int:
        """Latent frames the condition covers (``prepare_latents``' ``num_cond_latent_frames``)."""
        k = self.condition_frames
        return 0 if k == 0 else (k - 1) // self._temporal + 1

    def condition_pixels(self, clip: torch.Tensor) -> torch.Tensor:
        """The clip's first ``K`` frames as the user passes them (8-bit), preprocessed as ``__call__`` does:
        [1, 3, K, H, W] in [-1, 1]."""
        pipe, (h, w) = self.pipe, clip.shape[2:]
        frames = [first_frame_image(clip[:, i : i + 1]) for i in range(self.condition_frames)]
        if len(frames) == 1:  # image=
            return pipe.video_processor.preprocess(frames[0], h, w).unsqueeze(2)
        return pipe.video_processor.preprocess_video(frames, h, w)  # video=

    @torch.no_grad()
    def clip_condition(self, clip: torch.Tensor, caption: str | None = None) -> dict[str, torch.Tensor]:
        """``prepare_latents``' conditioning latents [1, C, f, h, w], indicator [1, 1, f, 1, 1] and mask
        [1, 1, f, h, w] for the clip's first ``K`` frames (posterior mode)."""
        pipe = self.pipe
        vae = self._ready(pipe.vae)
        device = next(vae.parameters()).device
        f, (h, w) = clip.shape[1], clip.shape[2:]
        video = self.condition_pixels(clip).to(device, vae.dtype)
        c = int(self.transformer.config.out_channels)
        zeros = torch.zeros(1, c, (f - 1) // self._temporal + 1, h // self._spatial, w // self._spatial, device=device)
        with _posterior_mode(pipe):
            _, cond, indicator, _, mask, _ = pipe.prepare_latents(
                video, 1, c, h, w, f, False, torch.float32, device, None, zeros
            )
        return {
            "condition_latents": cond.float().cpu(),
            "condition_indicator": indicator.float().cpu(),
            "condition_mask": mask.float().cpu(),
        }

    # -- text -----------------------------------------------------------------------------------
    def _compute_text_identity(self) -> str:
        if self.tiny_text:
            return module_fingerprint(None, {"encoder": "cosmos.tiny_prompt_kwargs", "dim": self._text_dim(),
                                             "family": self.family})  # fmt: skip
        return super()._compute_text_identity()

    @torch.no_grad()
    def encode_text(self, caption: str) -> dict[str, torch.Tensor]:
        """``pipe.encode_prompt`` of one caption (the tiny pipelines: the family record's hashed embeddings)."""
        if self.tiny_text:
            from vidsparse.families.cosmos import tiny_prompt_kwargs

            emb = tiny_prompt_kwargs(self.pipe, caption)["prompt_embeds"]
        else:
            emb, _ = self.pipe.encode_prompt(
                prompt=[caption], do_classifier_free_guidance=False, num_videos_per_prompt=1,
                max_sequence_length=self.max_sequence_length, device=self._text_device(),
            )  # fmt: skip
        return {"prompt_embeds": emb[0].detach().float().cpu()}

    # -- latents and the transformer call -------------------------------------------------------
    @torch.no_grad()
    def encode_video(self, pixels: torch.Tensor) -> torch.Tensor:
        """``(z - latents_mean) / latents_std * sigma_data``, as ``prepare_latents`` normalises (and the
        pipeline decodes back)."""
        cfg = self.pipe.vae.config
        z = self._vae_mode(pixels)
        mean = torch.tensor(cfg.latents_mean, dtype=z.dtype, device=z.device).view(1, -1, 1, 1, 1)
        std = torch.tensor(cfg.latents_std, dtype=z.dtype, device=z.device).view(1, -1, 1, 1, 1)
        return (z - mean) / std * float(self.pipe.scheduler.config.sigma_data)

    def transformer_timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        """Flow time in [0, 1] (``t = sigma_edm / (sigma_edm + 1)``), not ``1000 t``."""
        return sigma

    def condition_timestep(self, device) -> torch.Tensor:
        """The conditioning frames' timestep: ``sigma_conditioning / (sigma_conditioning + 1)``."""
        s = torch.tensor(_call_default(self.pipe, "sigma_conditioning"), dtype=torch.float32, device=device)
        return s / (s + 1)

    def call_kwargs(self, noisy: torch.Tensor) -> dict[str, Any]:
        """What else ``__call__`` passes the transformer: ``fps`` and the zero padding mask (pixel size)."""
        h, w = noisy.shape[3] * self._spatial, noisy.shape[4] * self._spatial
        return {"fps": _call_default(self.pipe, "fps"), "padding_mask": noisy.new_zeros(1, 1, h, w)}

    def predict(self, transformer, noisy, timesteps, text):
        """The velocity ``noise - x0`` the transformer predicts on the pipeline's inputs at flow time ``s``."""
        dev, dt = noisy.device, noisy.dtype
        b, f = noisy.shape[0], noisy.shape[2]
        s = (timesteps.to(dev, torch.float32) / self.num_train_timesteps).view(b, 1, 1, 1, 1).expand(-1, 1, f, 1, 1)
        indicator = text["condition_indicator"].to(dev, torch.float32)
        cond = text["condition_latents"].to(dev, torch.float32)
        hidden = indicator * cond + (1 - indicator) * noisy.float()
        timestep = indicator * self.condition_timestep(dev) + (1 - indicator) * s
        return transformer(
            hidden_states=hidden.to(dt),
            timestep=timestep.to(dt),
            encoder_hidden_states=text["prompt_embeds"].to(dev, dt),
            condition_mask=text["condition_mask"].to(dev, dt),
            return_dict=False,
            **self.call_kwargs(noisy),
        )[0]

    def loss(self, pred, target, cond):
        """The generated latent frames: the pipeline replaces the conditioning frames' output."""
        keep = (1 - cond["condition_indicator"].to(pred.device, pred.dtype)).expand_as(pred)
        if not bool(keep.any()):
            raise ValueError(f"{self.display_name}: the condition covers every latent frame; nothing to train.")
        return ((pred - target) ** 2 * keep).sum() / keep.sum()


class CosmosPredict25Model(CosmosPredict2Model):
    """Cosmos-Predict2.5 (``Cosmos2_5_PredictBasePipeline``): flow velocity at ``sigma`` in [0, 1]; text2world
    by default, image / video2world with ``--condition-frames 1`` / ``5``."""

    display_name = "Cosmos-Predict2.5"
    pipeline_classes = ("Cosmos2_5_PredictBasePipeline",)
    default_condition_frames = 0  # text2world: no image, no video

    def allowed_condition_frames(self, frames: int) -> bool:
        return frames in (1, self._temporal + 1)  # num_latent_conditional_frames 1 or 2

    def condition_frames_help(self) -> str:
        return (
            f"1 (num_latent_conditional_frames=1: the first frame) or {self._temporal + 1} (=2: a video's last "
            f"{self._temporal + 1} frames); without it text2world"
        )

    def condition_pixels(self, clip: torch.Tensor) -> torch.Tensor:
        """``video=``: the first ``K`` frames (8-bit), ``preprocess_video``-ed, padded with the last one to the clip's
        length as ``__call__`` does (the latent frames ``prepare_latents`` keeps depend on the ``K`` frames only)."""
        pipe, (f, h, w) = self.pipe, clip.shape[1:]
        frames = [first_frame_image(clip[:, i : i + 1]) for i in range(self.condition_frames)]
        video = pipe.video_processor.preprocess_video(frames, h, w)
        return torch.cat([video, video[:, :, -1:].repeat(1, 1, f - video.shape[2], 1, 1)], dim=2)

    @torch.no_grad()
    def clip_condition(self, clip: torch.Tensor, caption: str | None = None) -> dict[str, torch.Tensor]:
        """``prepare_latents``' (conditioning latents, mask, indicator) for the clip's first ``K`` frames (none:
        text2world's zeros)."""
        pipe = self.pipe
        vae = self._ready(pipe.vae)
        device = next(vae.parameters()).device
        f, (h, w) = clip.shape[1], clip.shape[2:]
        k = self.condition_frames
        video = self.condition_pixels(clip).to(device, vae.dtype) if k else None
        c = int(self.transformer.config.out_channels)
        zeros = torch.zeros(1, c, (f - 1) // self._temporal + 1, h // self._spatial, w // self._spatial, device=device)
        _, cond, mask, indicator = pipe.prepare_latents(
            video=video, batch_size=1, num_channels_latents=c, height=h, width=w, num_frames_in=k, num_frames_out=f,
            do_classifier_free_guidance=False, dtype=torch.float32, device=device, latents=zeros,
        )  # fmt: skip
        return {
            "condition_latents": cond.float().cpu(),
            "condition_indicator": indicator.float().cpu(),
            "condition_mask": mask.float().cpu(),
        }

    @torch.no_grad()
    def encode_video(self, pixels: torch.Tensor) -> torch.Tensor:
        """``(z - latents_mean) * (1 / latents_std)`` with the pipeline's own statistics (``prepare_latents``)."""
        z = self._vae_mode(pixels)
        return (z - self.pipe.latents_mean.to(z.device)) * self.pipe.latents_std.to(z.device)

    def condition_timestep(self, device) -> torch.Tensor:
        return torch.tensor(_call_default(self.pipe, "conditional_frame_timestep"), dtype=torch.float32, device=device)

    def call_kwargs(self, noisy: torch.Tensor) -> dict[str, Any]:
        h, w = noisy.shape[3] * self._spatial, noisy.shape[4] * self._spatial
        return {"padding_mask": noisy.new_zeros(1, 1, h, w)}  # no fps


__all__ = ["CosmosPredict25Model", "CosmosPredict2Model"]
