"""Tiny random-init diffusers video models for offline runs, tests and examples.

Nothing here downloads anything. ``build_tiny_pipeline`` gives a real ``diffusers.WanPipeline``
(2-layer, 2-head transformer; an 8-channel Wan VAE; flow-matching Euler scheduler) that runs a
full text-to-video call on CPU in about a second. It has no tokenizer or text encoder: prompts
become embeddings through ``encode_prompt_tiny``, a deterministic hash of the text, and
``run_tiny_pipeline`` passes them as ``prompt_embeds`` / ``negative_prompt_embeds``.

``tiny_transformer(family)`` and ``tiny_inputs(family, transformer, ...)`` build a tiny
transformer of every supported family and matching forward kwargs, so tests can call the
transformer directly. The configs and input builders are the family records' ``tiny`` variants
(``vidsparse.families.<family>``); this module seeds, builds and dispatches.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch

from vidsparse.families.base import (
    TINY_TEXT_DIM,
    TINY_TEXT_LEN,
    Family,
    TinyRequest,
    TinyVariant,
)

TINY_MODEL_ID = "tiny"


def build_tiny_pipeline(seed: int = 0, dtype: torch.dtype = torch.float32, *, two_stage: bool = False):
    """A tiny random-init ``diffusers.WanPipeline`` (no tokenizer / text encoder).

    ``two_stage=True`` builds a Wan 2.2-style pipeline with ``transformer`` (high noise) and
    ``transformer_2`` (low noise) switched at ``boundary_ratio=0.5``.
    Use ``run_tiny_pipeline`` (or pass ``prompt_embeds`` from ``encode_prompt_tiny``) to call it.
    Built by the Wan family record (``vidsparse.families.wan.tiny_pipeline``).
    """
    from vidsparse.families import get_family

    return get_family("wan").tiny_pipeline(seed=seed, dtype=dtype, two_stage=two_stage)


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


# ---------------------------------------------------------------------------------------------
# Tiny transformers of every supported family, with matching forward kwargs.
# ---------------------------------------------------------------------------------------------


def tiny_variants() -> dict[str, tuple[Family, TinyVariant]]:
    """Variant name -> (family, tiny variant) of every registered family, in registry order."""
    from vidsparse.families import families

    return {name: (fam, v) for fam in families() for name, v in fam.tiny.items()}


#: Families ``tiny_transformer`` can build (every registered family's ``Family.tiny`` variants):
#: "wan-i2v" has image cross-attention (Wan 2.1 I2V); "cogvideox-1.5" patchifies time by 2 and
#: uses RoPE; "hunyuan-i2v" is the token-replace variant.
TINY_FAMILIES = tuple(tiny_variants())


def _variant(family: str) -> tuple[Family, TinyVariant]:
    found = tiny_variants().get(family)
    if found is None:
        raise ValueError(f"Unknown tiny family {family!r}. Expected one of: {', '.join(tiny_variants())}.")
    return found


def tiny_config(family: str) -> tuple[str, dict[str, Any]]:
    """(diffusers transformer class name, constructor kwargs) of the tiny ``family`` model."""
    fam, variant = _variant(family)
    return variant.transformer_class or fam.transformer_classes[0], variant.config()


def tiny_transformer(family: str = "wan", *, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides: Any):
    """A tiny random-init diffusers video transformer of ``family`` (see ``TINY_FAMILIES``).

    ``overrides`` replace config entries (e.g. ``num_layers=3``). Parameters that diffusers
    initialises to exactly zero (e.g. Mochi's RoPE frequencies) get small random values so
    that every code path (RoPE, gates) affects the output and tests can see a mistake.
    """
    import diffusers

    cls_name, kw = tiny_config(family)
    kw.update(overrides)
    with torch.random.fork_rng(devices=[]):  # seeded build; the caller's RNG stream is untouched
        torch.manual_seed(seed)
        model = getattr(diffusers, cls_name)(**kw)
        with torch.no_grad():
            for p in model.parameters():
                if p.numel() and not bool(p.any()):
                    p.normal_(0.0, 0.5)
    model.eval()
    if dtype != torch.float32:
        model = model.to(dtype)
    return model


def tiny_inputs(
    family: str,
    transformer,
    frames: int = 3,
    height: int = 4,
    width: int = 4,
    batch: int = 1,
    *,
    text_len: int = TINY_TEXT_LEN,
    pad_text: bool = True,
    timestep: float = 500.0,
    seed: int = 0,
) -> dict[str, Any]:
    """Forward kwargs for ``transformer(**inputs)`` of a tiny model of ``family``.

    ``frames, height, width`` are the *latent* sizes before patchify (height/width must be
    divisible by the spatial patch, 2 except LTX). With ``pad_text`` and ``batch > 1``, samples
    after the first get a shorter valid prompt (padding mask) where the family takes one
    (HunyuanVideo, Mochi, LTX), so text padding is exercised.
    """
    fam, variant = _variant(family)
    gen = torch.Generator().manual_seed(seed)
    dtype = transformer.dtype
    cfg = transformer.config

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(dtype)

    text_dim = cfg.get("text_dim") or cfg.get("text_embed_dim") or cfg.get("caption_channels") or cfg.get("in_text_dim")
    mask = torch.ones(batch, text_len, dtype=torch.bool)
    if pad_text:
        for b in range(1, batch):
            mask[b, max(1, text_len - 2 * b) :] = False
    request = TinyRequest(
        transformer=transformer,
        frames=frames,
        height=height,
        width=width,
        batch=batch,
        text_len=text_len,
        text_dim=int(text_dim),
        text_mask=mask,
        timestep=torch.full((batch,), float(timestep)),
        randn=randn,
    )
    return variant.inputs(request)
