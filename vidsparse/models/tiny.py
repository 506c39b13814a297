"""Tiny random-init diffusers video models for offline runs, tests and examples.

Nothing here downloads anything. ``build_tiny_pipeline`` gives a real ``diffusers.WanPipeline``
(2-layer, 2-head transformer; an 8-channel Wan VAE; flow-matching Euler scheduler) that runs a
full text-to-video call on CPU in about a second. It has no tokenizer or text encoder: prompts
become embeddings through ``encode_prompt_tiny``, a deterministic hash of the text, and
``run_tiny_pipeline`` passes them as ``prompt_embeds`` / ``negative_prompt_embeds``.

``tiny_transformer(family)`` and ``tiny_inputs(family, transformer, ...)`` build a tiny
transformer of every supported family and matching forward kwargs, so tests can call the
transformer directly.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch

TINY_MODEL_ID = "tiny"

# Wan tiny sizes: the VAE compresses 4x in time and 8x in space; the transformer patchifies 2x2.
TINY_TEXT_DIM = 16
TINY_TEXT_LEN = 8
TINY_LATENT_CHANNELS = 4


def _wan_transformer_kwargs(**overrides: Any) -> dict[str, Any]:
    kw: dict[str, Any] = dict(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=TINY_LATENT_CHANNELS,
        out_channels=TINY_LATENT_CHANNELS,
        text_dim=TINY_TEXT_DIM,
        freq_dim=16,
        ffn_dim=32,
        num_layers=2,
        rope_max_seq_len=32,
    )
    kw.update(overrides)
    return kw


def _tiny_wan_vae():
    from diffusers import AutoencoderKLWan

    return AutoencoderKLWan(
        base_dim=8,
        z_dim=TINY_LATENT_CHANNELS,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
        latents_mean=[0.0] * TINY_LATENT_CHANNELS,
        latents_std=[1.0] * TINY_LATENT_CHANNELS,
    )


def build_tiny_pipeline(seed: int = 0, dtype: torch.dtype = torch.float32, *, two_stage: bool = False):
    """A tiny random-init ``diffusers.WanPipeline`` (no tokenizer / text encoder).

    ``two_stage=True`` builds a Wan 2.2-style pipeline with ``transformer`` (high noise) and
    ``transformer_2`` (low noise) switched at ``boundary_ratio=0.5``.
    Use ``run_tiny_pipeline`` (or pass ``prompt_embeds`` from ``encode_prompt_tiny``) to call it.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel

    gen_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        transformer = WanTransformer3DModel(**_wan_transformer_kwargs())
        transformer_2 = WanTransformer3DModel(**_wan_transformer_kwargs()) if two_stage else None
        vae = _tiny_wan_vae()
    finally:
        torch.random.set_rng_state(gen_state)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    pipe = WanPipeline(
        tokenizer=None,
        text_encoder=None,
        vae=vae,
        scheduler=scheduler,
        transformer=transformer,
        transformer_2=transformer_2,
        boundary_ratio=0.5 if two_stage else None,
    )
    pipe.set_progress_bar_config(disable=True)
    if dtype != torch.float32:
        pipe = pipe.to(dtype=dtype)
    return pipe


def encode_prompt_tiny(
    prompt: str,
    *,
    seq_len: int = TINY_TEXT_LEN,
    dim: int = TINY_TEXT_DIM,
    batch: int = 1,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Deterministic prompt embedding [batch, seq_len, dim] from the text alone.

    The SHA-256 of the UTF-8 text seeds a private generator: the same prompt always gives the
    same embedding, different prompts give different ones; the global RNG is not touched.
    """
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a str, got {type(prompt).__name__}.")
    for name, value in (("seq_len", seq_len), ("dim", dim), ("batch", batch)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}.")
    seed = int.from_bytes(hashlib.sha256(prompt.encode("utf-8")).digest()[:8], "little")
    gen = torch.Generator().manual_seed(seed)
    emb = torch.randn(1, seq_len, dim, generator=gen).expand(batch, -1, -1).contiguous()
    return emb.to(device=device, dtype=dtype or torch.float32)


def run_tiny_pipeline(
    pipe,
    prompt: str = "a tiny cat",
    negative_prompt: str = "",
    *,
    num_frames: int = 9,
    height: int = 32,
    width: int = 32,
    num_inference_steps: int = 3,
    guidance_scale: float = 5.0,
    seed: int = 0,
    output_type: str = "latent",
    num_videos_per_prompt: int = 1,
    **kwargs: Any,
):
    """Call a tiny pipeline with hashed prompt embeddings; returns the pipeline's frames.

    ``output_type="latent"`` (default) skips the VAE decode and returns latents, which is what
    tests compare; pass ``"np"`` or ``"pil"`` for decoded frames.
    """
    transformer = pipe.transformer if pipe.transformer is not None else pipe.transformer_2
    dim = transformer.config.text_dim
    dtype = transformer.dtype
    device = pipe._execution_device
    pe = encode_prompt_tiny(prompt, dim=dim, device=device, dtype=dtype)
    ne = encode_prompt_tiny(negative_prompt, dim=dim, device=device, dtype=dtype)
    out = pipe(
        prompt_embeds=pe,
        negative_prompt_embeds=ne,
        num_frames=num_frames,
        height=height,
        width=width,
        num_inference_steps=num_inference_steps,
        guidance_scale=guidance_scale,
        generator=torch.Generator().manual_seed(seed),
        output_type=output_type,
        num_videos_per_prompt=num_videos_per_prompt,
        **kwargs,
    )
    return out.frames
