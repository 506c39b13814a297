"""LoRA adapter of Wan VACE (``WanVACEPipeline``) trained as text-to-video: the pipeline's own empty control.

``WanVACEPipeline.__call__`` (diffusers 0.42) with no ``video``, ``mask`` or ``reference_images`` is
text-to-video through VACE, and it still feeds the control branch: ``preprocess_conditions`` makes
a zero video and an all-ones mask, ``prepare_video_latents`` VAE-encodes its inactive and reactive
parts (both the zero video: ``(E(0) - mean) / std`` twice, the posterior's mode) and
``prepare_masks`` folds the mask's 8x8 pixels into 64 channels at the latent size; their
concatenation is ``control_hidden_states``. That control depends only on the clip's size, so it is
built once per size by those very pipeline methods and cached with each clip (``"control"``);
``predict`` hands it to the transformer with the noisy latents, as the pipeline's sampling loop.

The pipeline's default ``conditioning_scale = 1.0`` becomes a ones vector over ``vace_layers``,
which is also what the transformer uses when given none; ``predict`` passes none, so Wan 2.2's
two-expert routing (``WanExperts``, which splits tensor inputs by sample) carries only per-sample
tensors. Everything else -- UMT5 text, latents ``(z - mean) / std``, flow matching on the
scheduler's shift, one LoRA per expert -- is Wan's (``vidsparse.lora.adapters.wan``). LoRA targets
Wan's ``attn1`` q/k/v/o, which names the self-attention of both the main ``blocks`` and the control
``vace_blocks``: the layers vidsparse makes sparse.

The LoRA learns the uncontrolled path; with a control video, mask or reference images at
inference the control latents differ from the ones trained on (train-lora has no control data).
"""

from __future__ import annotations

import torch

from vidsparse.lora.adapters.base import module_fingerprint
from vidsparse.lora.adapters.wan import WanModel


class WanVACEModel(WanModel):
    """Wan VACE text-to-video: Wan's objective and text, plus the pipeline's empty-control latents."""

    family = "wan-vace"
    display_name = "Wan VACE"
    pipeline_classes = ("WanVACEPipeline",)

    def __init__(self, pipe, model_id: str):
        super().__init__(pipe, model_id)
        self._controls: dict[tuple[int, int, int], torch.Tensor] = {}

    def vae_identity(self) -> str:
        """The VAE's, marked: each cached latent file also holds the empty control."""
        if self._vae_id is None:
            self._vae_id = module_fingerprint(self.pipe.vae, {"family": self.family, "role": "vae+empty-control"})
        return self._vae_id

    @torch.no_grad()
    def empty_control(self, num_frames: int, height: int, width: int) -> torch.Tensor:
        """``control_hidden_states`` [1, 2 z + 64, f, h, w] of a call without video / mask / reference images,
        built by ``preprocess_conditions``, ``prepare_video_latents`` and ``prepare_masks`` (memoised per size)."""
        key = (num_frames, height, width)
        if key not in self._controls:
            pipe = self.pipe
            device = next(self._ready(pipe.vae).parameters()).device
            video, mask, refs = pipe.preprocess_conditions(None, None, None, 1, height, width, num_frames,
                                                           torch.float32, device)  # fmt: skip
            latents = pipe.prepare_video_latents(video, mask, refs, None, device)
            masks = pipe.prepare_masks(mask, refs, None)
            self._controls[key] = torch.cat([latents, masks], dim=1).float().cpu()
        return self._controls[key]

    @torch.no_grad()
    def encode_clip(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        control = self.empty_control(*pixels.shape[2:])
        return {"latents": self.encode_video(pixels), "control": control.expand(pixels.shape[0], *control.shape[1:])}

    def predict(self, transformer, noisy, timesteps, text):
        emb = text["prompt_embeds"].to(device=noisy.device, dtype=noisy.dtype)
        control = text["control"].to(device=noisy.device, dtype=noisy.dtype)
        return transformer(hidden_states=noisy, timestep=timesteps, encoder_hidden_states=emb,
                           control_hidden_states=control, return_dict=False)[0]  # fmt: skip


__all__ = ["WanVACEModel"]
