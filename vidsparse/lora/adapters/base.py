"""The LoRA adapter interface: what training needs from a diffusers video pipeline.

A ``TrainableVideoModel`` knows how its family turns pixels into normalized latents, captions
into the transformer's text conditioning, and (noisy latents, timestep, text) into the
transformer's prediction. The training loop and the cache only talk to this interface, so a new
family is one subclass in ``vidsparse.lora.adapters.<family>``, referenced from its family record
(``vidsparse.families.<family>.FAMILY.lora_adapter``).

Adapters: Wan text-to-video, one transformer or Wan 2.2 A14B's two experts, and ``--model tiny``
(``adapters.wan``, also SkyReels-V2 T2V); Wan / SkyReels-V2 image-to-video (``adapters.wan_i2v``);
HunyuanVideo (and its image-to-video), LTX-Video (and its image-to-video and condition pipelines)
and Mochi (``adapters.hunyuan``, ``adapters.ltx``, ``adapters.mochi``); CogVideoX 1.0 / 1.5 text-
and image-to-video with its v-prediction objective (``adapters.cogvideox``, which overrides
``sample_levels`` / ``training_inputs``); Cosmos-Predict2 video2world and Predict2.5
(``adapters.cosmos``, flow time in [0, 1]). Image-to-video adapters (``ClipConditionMixin``) cache
each clip's own condition (``encode_clip``: its first frame, LTX's condition pipeline a video
prefix, HunyuanVideo I2V's LLaVA prompt embeddings with the caption) and may leave the clean
condition frames out of the loss (``loss``). Refused with a reason (each family record's
``lora_refusal`` / ``lora_refusals``, checked from the pipeline class before any work:
``vidsparse.lora.models.check_trainable``): diffusion forcing, LTX-Video's long multi-prompt and
upsampler pipelines, and the families without an adapter.

The training loop's convention is the standard rectified flow: noise level ``s``, timestep
``s * num_train_timesteps``, target velocity ``noise - x0``. ``predict`` maps it onto what the
family's transformer was trained with (e.g. Mochi: timestep ``(1 - s) * N``, output
``x0 - noise``) so the loss is the same everywhere; ``transformer_timestep`` and
``transformer_output`` state that mapping so tests can check it against the pipeline's sampler.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import torch

from vidsparse.lora.data import ClipSpec
from vidsparse.lora.flow import NoiseSampler, add_noise


def module_fingerprint(module: torch.nn.Module | None, extra: Any = None) -> str:
    """A short, stable identity of a module: class, config, parameter shapes and a weight sample.

    Hashing every weight of a multi-billion-parameter text encoder would take minutes, so each
    tensor contributes its name, shape, dtype and up to 256 evenly spaced values: different
    checkpoints differ there, while the same checkpoint always hashes the same.
    """
    h = hashlib.sha256()
    h.update(json.dumps(extra, sort_keys=True, default=str).encode())
    if module is None:
        h.update(b"<none>")
        return h.hexdigest()[:16]
    h.update(type(module).__qualname__.encode())
    config = getattr(module, "config", None)
    if config is not None:
        cfg = dict(config) if not hasattr(config, "to_dict") else config.to_dict()
        cfg = {
            k: v for k, v in cfg.items() if not k.startswith("_") and k not in ("name_or_path", "transformers_version")
        }
        h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    for name, tensor in module.state_dict().items():
        h.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        flat = tensor.detach().reshape(-1)
        if flat.numel():
            step = max(1, flat.numel() // 256)
            h.update(flat[::step][:256].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def first_frame_image(pixels: torch.Tensor):
    """The first frame of a clip [3, F, H, W] in [-1, 1] as the 8-bit PIL image a user would pass."""
    from PIL import Image

    frame = ((pixels[:, 0].float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return Image.fromarray(np.ascontiguousarray(frame.permute(1, 2, 0).cpu().numpy()))


class TrainableVideoModel:
    """Base of the family adapters. Subclasses implement the encode/predict methods."""

    family: ClassVar[str] = "base"
    display_name: ClassVar[str] = "base"
    pipeline_classes: ClassVar[tuple[str, ...]] = ()
    default_target_modules: ClassVar[tuple[str, ...]] = ()
    #: pipeline components that only the cache needs (moved to the encode device on first use).
    encoder_names: ClassVar[tuple[str, ...]] = ("vae", "text_encoder")

    def __init__(self, pipe, model_id: str):
        self.pipe = pipe
        self.model_id = model_id
        self._vae_id: str | None = None
        self._text_id: str | None = None
        self._latent_tokens: int | None = None  # latent f*h*w of the training clip (validate_clip)
        self.encode_device = torch.device("cpu")

    # -- identity (cache keys) --------------------------------------------------------
    def vae_identity(self) -> str:
        if self._vae_id is None:
            self._vae_id = module_fingerprint(self.pipe.vae, {"family": self.family, "role": "vae"})
        return self._vae_id

    def text_identity(self) -> str:
        if self._text_id is None:
            self._text_id = self._compute_text_identity()
        return self._text_id

    def _compute_text_identity(self) -> str:
        raise NotImplementedError

    # -- model pieces -------------------------------------------------------------------
    @property
    def transformer(self) -> torch.nn.Module:
        return self.pipe.transformer

    @property
    def lora_files(self) -> dict[str, str]:
        """Pipeline component -> the LoRA file it is saved to (two files for a two-expert pipeline)."""
        from vidsparse.lora.export import LORA_WEIGHT_NAME

        return {"transformer": LORA_WEIGHT_NAME}

    @property
    def num_train_timesteps(self) -> int:
        return int(getattr(self.pipe.scheduler.config, "num_train_timesteps", 1000))

    def default_flow_shift(self) -> float:
        """The shift of the pipeline's own flow-matching scheduler (1.0 if it has none).

        A scheduler with resolution-dependent shifting (LTX-Video) gets the shift its pipeline
        computes for the training clip's latent size (``validate_clip`` records it):
        ``mu`` from ``calculate_shift``, then ``exp(mu)`` (exponential) or ``mu`` (linear), which is
        that time shift written as the SD3 shift ``s' = k s / (1 + (k - 1) s)``.
        """
        cfg = self.pipe.scheduler.config
        get = cfg.get if isinstance(cfg, dict) else lambda k, d=None: getattr(cfg, k, d)
        if get("use_dynamic_shifting", False):
            if self._latent_tokens is None:
                raise RuntimeError(
                    "default_flow_shift of a dynamic-shifting scheduler needs validate_clip(spec) first."
                )
            base_len, max_len = get("base_image_seq_len", 256), get("max_image_seq_len", 4096)
            base_shift, max_shift = get("base_shift", 0.5), get("max_shift", 1.15)
            m = (max_shift - base_shift) / (max_len - base_len)
            mu = self._latent_tokens * m + (base_shift - m * base_len)
            return float(math.exp(mu)) if get("time_shift_type", "exponential") == "exponential" else float(mu)
        for key in ("flow_shift", "shift"):
            value = getattr(cfg, key, None) if not isinstance(cfg, dict) else cfg.get(key)
            if isinstance(value, (int, float)) and value > 0:
                return float(value)
        return 1.0

    def check_flow_matching(self) -> None:
        """Refuse schedulers whose training target is not the flow velocity ``noise - x0``."""
        sched = self.pipe.scheduler
        cfg = sched.config
        pred = cfg.get("prediction_type") if isinstance(cfg, dict) else getattr(cfg, "prediction_type", None)
        is_flow = (
            "FlowMatch" in type(sched).__name__
            or pred == "flow_prediction"
            or bool(getattr(cfg, "use_flow_sigmas", False))
        )
        if not is_flow:
            raise ValueError(
                f"{self.model_id}: scheduler {type(sched).__name__} (prediction_type={pred!r}) is not a "
                "flow-matching scheduler; vidsparse train-lora trains flow models (x_t = (1 - s) x0 + s noise, "
                "target noise - x0). Use a flow-matching pipeline such as Wan."
            )

    def validate_clip(self, spec: ClipSpec) -> None:
        raise NotImplementedError

    #: whether the clip's cached condition depends on its caption too (``encode_clip(pixels, captions)``;
    #: the cache then keys the clip's file on the caption and the text encoders as well)
    condition_reads_caption: ClassVar[bool] = False

    #: whether the pipeline takes a conditioning video prefix (``--condition-frames``; LTX-Video's condition pipeline)
    takes_condition_frames: ClassVar[bool] = False

    def set_condition_frames(self, frames: int | None) -> None:
        """``--condition-frames``: how many of the clip's first frames condition it (None: the adapter's default).

        Only a pipeline that takes a conditioning video has such a setting; any other refuses it.
        """
        if frames is not None:
            raise ValueError(
                f"--condition-frames {frames}: {self.display_name} ({type(self.pipe).__name__}) takes no conditioning "
                "video; it is for LTXConditionPipeline and Cosmos-Predict2 / 2.5 (e.g. --model tiny-ltx-condition). "
                "Drop --condition-frames."
            )

    def encoders_to(self, device: torch.device | str) -> None:
        """Where the VAE and text encoder run while the cache is built.

        They move there on first use, so a run whose cache is complete never loads them onto
        the GPU; ``encoders_to("cpu")`` sends them back at once.
        """
        self.encode_device = torch.device(device)
        if self.encode_device.type == "cpu":
            for name in self.encoder_names:
                module = getattr(self.pipe, name, None)
                if module is not None:
                    module.to("cpu")

    def _ready(self, module: torch.nn.Module) -> torch.nn.Module:
        param = next(module.parameters(), None)
        if param is not None and param.device != self.encode_device:
            module.to(self.encode_device)
        return module

    def _check_clip(self, spec: ClipSpec, temporal: int, mult_h: int, mult_w: int, why: str) -> None:
        """Frames ``temporal k + 1`` and sizes divisible by ``mult_h x mult_w``, else a ValueError with valid values."""
        if (spec.num_frames - 1) % temporal:
            lo = (spec.num_frames - 1) // temporal * temporal + 1
            raise ValueError(
                f"{self.display_name} needs num_frames = {temporal}k + 1 (the VAE compresses time {temporal}x after "
                f"the first frame), got {spec.num_frames}; use {lo} or {lo + temporal}."
            )
        if spec.height % mult_h or spec.width % mult_w:

            def near(value: int, m: int) -> str:
                lo = value // m * m
                return str(value) if lo == value else f"{lo} or {lo + m}" if lo >= m else str(m)

            raise ValueError(
                f"{self.display_name} needs height and width divisible by {mult_h} and {mult_w} ({why}), got "
                f"{spec.height}x{spec.width}; nearest valid height {near(spec.height, mult_h)}, width "
                f"{near(spec.width, mult_w)}."
            )

    def _record_latent_size(self, spec: ClipSpec, temporal: int, spatial: int) -> None:
        f = (spec.num_frames - 1) // temporal + 1
        self._latent_tokens = f * (spec.height // spatial) * (spec.width // spatial)

    def _check_patched_clip(
        self, spec: ClipSpec, patch_t: int, patch_h: int, patch_w: int, tile: int = 1, tile_why: str = ""
    ) -> None:
        """``validate_clip`` of a VAE + patchifying transformer (``self._temporal`` / ``self._spatial`` set).

        Frames ``temporal * patch_t k + 1``; sides divisible by the VAE's spatial factor times the
        patch (times ``tile`` tokens, ``tile_why`` saying why); then the latent size is recorded
        (the dynamic shift reads it). One home for what every family's clip check is built from.
        """
        t, s = self._temporal, self._spatial
        why = f"VAE {s}x times patch {patch_h}x{patch_w}" + (f", and {tile_why}" if tile_why else "")
        self._check_clip(spec, t * patch_t, tile * s * patch_h, tile * s * patch_w, why)
        self._record_latent_size(spec, t, s)

    def _scaled_vae_mode(self, pixels: torch.Tensor) -> torch.Tensor:
        """``_vae_mode`` times ``vae.config.scaling_factor``: latents of a pipeline that decodes
        ``latents / scaling_factor`` (no mean / std)."""
        return self._vae_mode(pixels) * float(self.pipe.vae.config.scaling_factor)

    def _attention_targets(self, blocks: Sequence[str], attn: str, projections: Sequence[str]) -> tuple[str, ...]:
        """Per-layer full paths ``{blocks}.{i}.{attn}.{proj}`` of the transformer's video attention.

        Full paths, not short names, for a transformer whose text refiner / text blocks have
        attention modules of the same short names; a projection a block lacks (a single-stream
        block's ``to_out``) is left out.
        """
        names = dict(self.transformer.named_modules())
        return tuple(
            path
            for block in blocks
            for i in range(len(getattr(self.transformer, block)))
            for proj in projections
            if (path := f"{block}.{i}.{attn}.{proj}") in names
        )

    def encode_video(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B, 3, F, H, W] in [-1, 1] -> normalized latents [B, C, f, h, w] (float32)."""
        raise NotImplementedError

    def _vae_mode(self, pixels: torch.Tensor) -> torch.Tensor:
        """The VAE posterior's mode (deterministic, so a cached latent is reproducible), float32."""
        vae = self._ready(self.pipe.vae)
        param = next(vae.parameters())
        return vae.encode(pixels.to(param.device, param.dtype)).latent_dist.mode().float()

    def encode_clip(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        """[B, 3, F, H, W] in [-1, 1] -> what the cache stores per clip (batched): ``"latents"``
        (``encode_video``) and, for image-to-video, the clip's own conditioning (e.g. the first
        frame's image latents), which the training loop hands to ``predict`` with the text."""
        return {"latents": self.encode_video(pixels)}

    def encode_text(self, caption: str) -> dict[str, torch.Tensor]:
        """One caption -> the transformer's text conditioning (tensors without batch dim)."""
        raise NotImplementedError

    def predict(
        self, transformer: torch.nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor, text: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        """The velocity ``noise - x0`` the transformer predicts at ``timesteps = s * N`` (text batched)."""
        raise NotImplementedError

    # -- the training objective (flow matching here; CogVideoX overrides it with v-prediction) ----
    #: what ``predict`` is regressed onto: ``"flow"`` (velocity ``noise - x0``) or ``"v_prediction"``
    objective: ClassVar[str] = "flow"

    def check_sampling(self, sampler: NoiseSampler) -> None:
        """Refuse noise-level settings the family's objective has no meaning for (flow: all are fine)."""

    def sample_levels(self, sampler: NoiseSampler, n: int, generator: torch.Generator, shift: float) -> torch.Tensor:
        """``n`` training noise levels drawn from ``generator``: flow noise levels ``s`` in [min_sigma, 1]."""
        return sampler.sample(n, generator, shift)

    def training_inputs(
        self, x0: torch.Tensor, noise: torch.Tensor, levels: torch.Tensor, cond: dict[str, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(noisy input, regression target, timestep the loop passes to ``predict``) at ``levels``.

        Flow matching: ``x_s = (1 - s) x0 + s noise``, target ``noise - x0``, timestep ``s * N``.
        ``cond`` is the batch's conditioning (as ``predict`` gets it), for a pipeline whose latents
        at a step depend on it (LTX-Video's condition pipeline re-noises its condition latents).
        """
        noisy, target = add_noise(x0, noise, levels)
        return noisy, target, levels * self.num_train_timesteps

    def loss(self, pred: torch.Tensor, target: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        """The MSE of ``predict``'s output against ``training_inputs``' target, over the latents the
        pipeline samples (all of them here; image-to-video with a clean first frame leaves it out)."""
        return torch.nn.functional.mse_loss(pred.float(), target.float())

    # -- the family's time / output convention (identity for Wan, HunyuanVideo, LTX-Video) -------
    def transformer_timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        """The ``timestep`` the family's pipeline feeds the transformer at noise level ``sigma``."""
        return sigma * self.num_train_timesteps

    def transformer_output(self, velocity: torch.Tensor) -> torch.Tensor:
        """What the transformer outputs (and the scheduler steps with) for the flow velocity ``noise - x0``."""
        return velocity


class ClipConditionMixin:
    """Image-to-video (and video-conditioned) adapters: each clip's own condition, cached beside its latents.

    The condition of a training clip is what its pipeline would build from the frames a user
    passes (its first frame as an 8-bit image, ``first_frame_image``; a conditioning video prefix),
    so it is a function of the clip and is cached with its latents. A subclass says how one clip's
    condition is built (``clip_condition``, by the pipeline's own code) and what besides the VAE
    decides it (``condition_identity``); ``encode_clip`` stacks them and ``vae_identity`` keys the
    cache on all of it, so a text-to-video cache of the same VAE (latents only) is never reused.
    Put it before the family's adapter in the bases (its methods override ``TrainableVideoModel``'s).
    """

    def condition_identity(self) -> dict[str, Any]:
        """What else (JSON-able) decides the cached condition: an image encoder, a condition mode, ..."""
        return {}

    def vae_identity(self) -> str:
        """The VAE's fingerprint, marked as holding a condition and keyed on ``condition_identity``."""
        if self._vae_id is None:
            extra = {"family": self.family, "role": "vae+i2v", **self.condition_identity()}
            self._vae_id = module_fingerprint(self.pipe.vae, extra)
        return self._vae_id

    @torch.no_grad()
    def encode_clip(self, pixels: torch.Tensor, captions: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        """``"latents"`` of the clips [B, 3, F, H, W] and each clip's condition (``clip_condition``), batched.

        ``captions`` (one per clip) are required when the condition reads them
        (``condition_reads_caption``: HunyuanVideo I2V's prompt embeddings hold the image).
        """
        out = {"latents": self.encode_video(pixels)}
        if self.condition_reads_caption:
            if captions is None or len(captions) != len(pixels):
                raise ValueError(
                    f"{self.display_name}: the clip's condition is its caption's prompt embeddings with the first "
                    f"frame in them; encode_clip needs one caption per clip, got {captions!r} for {len(pixels)}."
                )
            per_clip = [self.clip_condition(clip, caption) for clip, caption in zip(pixels, captions)]
        else:
            per_clip = [self.clip_condition(clip) for clip in pixels]
        out.update({key: torch.cat([c[key] for c in per_clip]) for key in per_clip[0]})
        return out

    def clip_condition(self, clip: torch.Tensor, caption: str | None = None) -> dict[str, torch.Tensor]:
        """One clip [3, F, H, W] in [-1, 1] (and its caption, if the condition reads it) -> its condition
        tensors, each batched [1, ...] (CPU, float32)."""
        raise NotImplementedError


__all__ = ["ClipConditionMixin", "TrainableVideoModel", "first_frame_image", "module_fingerprint"]
