"""LoRA adapter of CogVideoX 1.0 / 1.5 text-to-video: v-prediction on the scheduler's own alphas.

CogVideoX is not a flow model. ``CogVideoXPipeline`` samples with ``CogVideoXDDIMScheduler`` or
``CogVideoXDPMScheduler`` (``prediction_type="v_prediction"``), whose cumulative alphas ``a_t``
are the scaled-linear betas' (zero-terminal-SNR rescaled) products, SNR-shifted by
``snr_shift_scale``: ``a_t <- a_t / (k + (1 - k) a_t)``. Training follows diffusers'
CogVideoX LoRA scripts (``examples/cogvideo/train_cogvideox_lora.py``):

- integer timesteps ``t ~ U{0, ..., N - 1}``;
- ``x_t = sqrt(a_t) x0 + sqrt(1 - a_t) noise`` (``scheduler.add_noise``);
- target ``v = sqrt(a_t) noise - sqrt(1 - a_t) x0`` (``scheduler.get_velocity``).

The scripts regress the x0 estimate ``sqrt(a_t) x_t - sqrt(1 - a_t) v_pred`` onto ``x0`` with the
weight ``1 / (1 - a_t)``; since ``x0_pred - x0 = -sqrt(1 - a_t) (v_pred - v)`` that is exactly the
plain MSE on ``v`` used here.

Latents: the VAE posterior's mode times ``scaling_factor`` (the pipeline decodes ``z / sf``),
cached [C, f, h, w]; the transformer takes them as [B, f, C, h, w]. CogVideoX 1.5
(``patch_size_t = 2``) needs a latent frame count divisible by 2: at inference the pipeline
samples ``p_t - f % p_t`` extra latent frames and drops the first ones, so training pads the clip
in front with copies of its first latent frame (the CogVideo repository's fine-tuning recipe).
Text: T5 embeddings of 226 tokens (no mask; the pipeline passes none), before the video in the
joint attention. RoPE: the pipeline's 3-D rotary embedding for the latent grid (1.0: crop region
of the ``sample_height x sample_width`` base grid; 1.5: the ``slice`` grid over ``f / p_t`` frames).
"""

from __future__ import annotations

import torch

from vidsparse.lora.adapters.base import ClipConditionMixin, TrainableVideoModel, first_frame_image, module_fingerprint
from vidsparse.lora.adapters.text import tiny_text, tiny_text_identity
from vidsparse.lora.data import ClipSpec
from vidsparse.lora.flow import NoiseSampler


def _crop_region(grid: tuple[int, int], base_w: int, base_h: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """CogVideoX 1.0's RoPE crop: ``grid`` resized to fit the base grid, centred (as its pipeline computes it)."""
    h, w = grid
    if h / w > base_h / base_w:
        rh, rw = base_h, int(round(base_h / h * w))
    else:
        rw, rh = base_w, int(round(base_w / w * h))
    top, left = int(round((base_h - rh) / 2.0)), int(round((base_w - rw) / 2.0))
    return (top, left), (top + rh, left + rw)


class CogVideoXModel(TrainableVideoModel):
    """CogVideoX 1.0 / 1.5 T2V (``CogVideoXPipeline``): v-prediction, latents ``z * scaling_factor``."""

    family = "cogvideox"
    display_name = "CogVideoX"
    pipeline_classes = ("CogVideoXPipeline",)
    default_target_modules = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0")
    objective = "v_prediction"
    max_sequence_length = 226

    def __init__(self, pipe, model_id: str):
        super().__init__(pipe, model_id)
        sched = pipe.scheduler
        pred = sched.config.get("prediction_type")
        if pred != "v_prediction" or getattr(sched, "alphas_cumprod", None) is None:
            raise ValueError(
                f"{model_id}: CogVideoX LoRA training is v-prediction on the scheduler's alphas_cumprod, but the "
                f"pipeline's scheduler is {type(sched).__name__} (prediction_type={pred!r}). Load the pipeline with "
                "its own CogVideoXDDIMScheduler / CogVideoXDPMScheduler (prediction_type='v_prediction')."
            )
        self._check_transformer(pipe.transformer.config, model_id)
        self._tiny = getattr(pipe, "text_encoder", None) is None
        self._temporal = int(getattr(pipe, "vae_scale_factor_temporal", 4))
        self._spatial = int(getattr(pipe, "vae_scale_factor_spatial", 8))

    def _check_transformer(self, cfg, model_id: str) -> None:
        if cfg.get("ofs_embed_dim") or cfg.in_channels != cfg.out_channels:
            raise ValueError(
                f"{model_id}: this CogVideoX transformer takes image latents (in_channels {cfg.in_channels} != "
                f"out_channels {cfg.out_channels}, or an ofs embedding): it is an image-to-video checkpoint, "
                "which CogVideoXPipeline does not drive; load it as CogVideoXImageToVideoPipeline."
            )

    # -- identity / validation ----------------------------------------------------------------
    def _compute_text_identity(self) -> str:
        if self._tiny:
            return tiny_text_identity(self.transformer.config.text_embed_dim, self.family)
        tok = getattr(self.pipe, "tokenizer", None)
        extra = {"tokenizer": type(tok).__name__, "vocab": getattr(tok, "vocab_size", None),
                 "max_len": self.max_sequence_length}  # fmt: skip
        return module_fingerprint(self.pipe.text_encoder, extra)

    def validate_clip(self, spec: ClipSpec) -> None:
        p = self.transformer.config.patch_size
        self._check_patched_clip(spec, 1, p, p)

    def check_sampling(self, sampler: NoiseSampler) -> None:
        if sampler.mode == "logit_normal" or sampler.shift is not None:
            raise ValueError(
                "CogVideoX trains v-prediction on integer DDPM timesteps drawn uniformly (as diffusers' CogVideoX "
                f"training scripts); --timestep-sampling {sampler.mode!r}"
                + (f" with --flow-shift {sampler.shift}" if sampler.shift is not None else "")
                + " is a flow-matching setting. Use --timestep-sampling uniform (or the default) without --flow-shift."
            )

    # -- the objective --------------------------------------------------------------------------
    def sample_levels(self, sampler: NoiseSampler, n: int, generator: torch.Generator, shift: float) -> torch.Tensor:
        """Integer timesteps ``U{0, ..., N - 1}`` (as float, so they batch like noise levels)."""
        return torch.randint(0, self.num_train_timesteps, (n,), generator=generator).float()

    def alphas(self, timesteps: torch.Tensor) -> torch.Tensor:
        """``a_t`` (the scheduler's ``alphas_cumprod``) at integer ``timesteps`` [B], float32."""
        table = self.pipe.scheduler.alphas_cumprod.float()
        return table[timesteps.long().cpu()].to(timesteps.device)

    def training_inputs(self, x0, noise, levels, cond=None):
        a = self.alphas(levels).to(x0.dtype).view(-1, *([1] * (x0.dim() - 1)))
        noisy = a.sqrt() * x0 + (1 - a).sqrt() * noise
        return noisy, a.sqrt() * noise - (1 - a).sqrt() * x0, levels

    def default_flow_shift(self) -> float:
        return 1.0  # no flow shift: the SNR shift is inside the scheduler's alphas

    # -- encoders -------------------------------------------------------------------------------
    @property
    def patch_size_t(self) -> int | None:
        return self.transformer.config.get("patch_size_t")

    @torch.no_grad()
    def encode_video(self, pixels: torch.Tensor) -> torch.Tensor:
        z = self._scaled_vae_mode(pixels)
        p_t = self.patch_size_t
        if p_t and z.shape[2] % p_t:  # CogVideoX 1.5: pad in front, as the pipeline drops its first frames
            pad = p_t - z.shape[2] % p_t
            z = torch.cat([z[:, :, :1].expand(-1, -1, pad, -1, -1), z], dim=2)
        return z

    @torch.no_grad()
    def encode_text(self, caption: str) -> dict[str, torch.Tensor]:
        if self._tiny:
            from vidsparse.models import tiny

            emb, _ = tiny_text(caption, tiny.TINY_TEXT_LEN, self.transformer.config.text_embed_dim)
        else:
            device = next(self._ready(self.pipe.text_encoder).parameters()).device
            emb, _ = self.pipe.encode_prompt(
                prompt=[caption], do_classifier_free_guidance=False, num_videos_per_prompt=1,
                max_sequence_length=self.max_sequence_length, device=device,
            )  # fmt: skip
            emb = emb[0]
        return {"prompt_embeds": emb.detach().float().cpu()}

    def rotary_embedding(
        self, frames: int, height: int, width: int, device
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The pipeline's RoPE (cos, sin) for ``frames`` latent frames of ``height x width`` latents."""
        from diffusers.models.embeddings import get_3d_rotary_pos_embed

        cfg = self.transformer.config
        if not cfg.use_rotary_positional_embeddings:
            return None
        p, p_t = cfg.patch_size, cfg.patch_size_t
        gh, gw = height // p, width // p
        base_w, base_h = cfg.sample_width // p, cfg.sample_height // p
        if p_t is None:  # CogVideoX 1.0
            return get_3d_rotary_pos_embed(
                embed_dim=cfg.attention_head_dim, crops_coords=_crop_region((gh, gw), base_w, base_h),
                grid_size=(gh, gw), temporal_size=frames, device=device,
            )  # fmt: skip
        return get_3d_rotary_pos_embed(
            embed_dim=cfg.attention_head_dim, crops_coords=None, grid_size=(gh, gw),
            temporal_size=(frames + p_t - 1) // p_t, grid_type="slice", max_size=(base_h, base_w), device=device,
        )  # fmt: skip

    def predict(self, transformer, noisy, timesteps, text):
        """The transformer's v prediction [B, C, f, h, w] (it takes and returns [B, f, C, h, w])."""
        dev, dt = noisy.device, noisy.dtype
        _, _, f, h, w = noisy.shape
        rope = self.rotary_embedding(f, h, w, dev)
        out = transformer(
            hidden_states=self.transformer_input(noisy.permute(0, 2, 1, 3, 4), text),
            encoder_hidden_states=text["prompt_embeds"].to(dev, dt),
            timestep=timesteps.to(dev).long(),
            image_rotary_emb=None if rope is None else tuple(r.to(dev, dt) for r in rope),
            return_dict=False,
            **self.extra_inputs(noisy),
        )[0]
        return out.permute(0, 2, 1, 3, 4)

    def transformer_input(self, latents: torch.Tensor, text: dict[str, torch.Tensor]) -> torch.Tensor:
        """The transformer's ``hidden_states`` from the noisy latents [B, f, C, h, w] (T2V: themselves)."""
        return latents

    def extra_inputs(self, noisy: torch.Tensor) -> dict[str, torch.Tensor]:
        return {}


class CogVideoXI2VModel(ClipConditionMixin, CogVideoXModel):
    """CogVideoX 1.0 / 1.5 image-to-video (``CogVideoXImageToVideoPipeline``): the same v-prediction,
    with the first frame's latents as extra input channels, built as the pipeline's ``prepare_latents``.

    The condition is the clip's first frame as the 8-bit image a user would pass,
    ``video_processor.preprocess``-ed, VAE-encoded alone, times ``scaling_factor`` (``1 / sf`` with
    ``invert_scale_latents``), then zero latent frames up to the clip's length. CogVideoX 1.5's
    ``__call__`` first raises the frame count to whole ``patch_size_t`` latent frames, so there the
    image latents sit on the extra leading frame (the one the pipeline drops after sampling, which
    ``encode_video`` fills with a copy of the first latent frame), then zeros. It is concatenated to the noisy latents on channels at every step; the pipeline samples all the
    latent frames, so the loss covers them all. The pipeline draws the image latents from the VAE
    posterior (``latent_dist.sample``); the cache takes its mode, so a cached condition is
    reproducible (the posterior's spread is the VAE's small std). CogVideoX 1.5 I2V's ofs
    embedding gets the pipeline's constant ``ofs = 2.0``. diffusers' I2V LoRA script also noises
    the image before encoding (an augmentation the pipeline never applies); this trainer does not.
    """

    display_name = "CogVideoX I2V"
    pipeline_classes = ("CogVideoXImageToVideoPipeline",)
    #: the ``ofs`` value ``CogVideoXImageToVideoPipeline.__call__`` feeds a transformer with an ofs embedding
    ofs = 2.0

    def _check_transformer(self, cfg, model_id: str) -> None:
        if cfg.in_channels != 2 * cfg.out_channels:
            raise ValueError(
                f"{model_id}: CogVideoXImageToVideoPipeline concatenates the image latents to the noisy latents "
                f"on channels, so its transformer takes 2 x {cfg.out_channels} input channels; this one takes "
                f"{cfg.in_channels}. Load an image-to-video checkpoint (e.g. THUDM/CogVideoX-5b-I2V)."
            )

    def clip_condition(self, clip: torch.Tensor, caption: str | None = None) -> dict[str, torch.Tensor]:
        return {"image_latents": self.image_latents(first_frame_image(clip), *clip.shape[1:])}

    @torch.no_grad()
    def image_latents(self, image, num_frames: int, height: int, width: int) -> torch.Tensor:
        """``prepare_latents``' image latents [1, f, C, h, w] of ``image`` (PIL) for a ``num_frames`` video
        (1.5: with the front padding to ``patch_size_t``), the posterior's mode."""
        pipe = self.pipe
        vae = self._ready(pipe.vae)
        device = next(vae.parameters()).device
        pixels = pipe.video_processor.preprocess(image, height=height, width=width).to(device, dtype=torch.float32)
        z = vae.encode(pixels.unsqueeze(2).to(vae.dtype)).latent_dist.mode().float().permute(0, 2, 1, 3, 4)
        sf = float(pipe.vae_scaling_factor_image)
        z = z / sf if pipe.vae.config.get("invert_scale_latents", False) else z * sf
        frames = (num_frames - 1) // self._temporal + 1
        p_t = self.patch_size_t
        if p_t and frames % p_t:  # 1.5: __call__ first raises num_frames to whole patch_size_t latent frames
            frames += p_t - frames % p_t
        # the image, then zero frames (prepare_latents' own front padding by ``frames % p_t`` is then empty)
        return torch.cat([z, z.new_zeros(1, frames - 1, *z.shape[2:])], dim=1).cpu()

    def transformer_input(self, latents, text):
        image = text["image_latents"].to(latents.device, latents.dtype)
        return torch.cat([latents, image], dim=2)

    def extra_inputs(self, noisy):
        if not self.transformer.config.get("ofs_embed_dim"):
            return {}
        return {"ofs": noisy.new_full((1,), self.ofs)}


__all__ = ["CogVideoXI2VModel", "CogVideoXModel"]
