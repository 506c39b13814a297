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


# ---------------------------------------------------------------------------------------------
# Tiny transformers of every supported family, with matching forward kwargs.
# ---------------------------------------------------------------------------------------------

#: Families ``tiny_transformer`` can build. "wan-i2v" has image cross-attention (Wan 2.1 I2V);
#: "cogvideox-1.5" patchifies time by 2 and uses RoPE; "hunyuan-i2v" is the token-replace variant.
TINY_FAMILIES = ("wan", "wan-i2v", "hunyuan", "hunyuan-i2v", "cogvideox", "cogvideox-1.5", "ltx", "mochi")

_TINY_HEADS = 2
_TINY_HEAD_DIM = 8


def _tiny_config(family: str) -> tuple[str, dict[str, Any]]:
    heads, hd, text = _TINY_HEADS, _TINY_HEAD_DIM, TINY_TEXT_DIM
    if family == "wan":
        return "WanTransformer3DModel", _wan_transformer_kwargs()
    if family == "wan-i2v":
        # Latent + image condition + mask channels, as Wan I2V concatenates them.
        return "WanTransformer3DModel", _wan_transformer_kwargs(
            in_channels=3 * TINY_LATENT_CHANNELS, image_dim=text, added_kv_proj_dim=heads * hd
        )
    if family in ("hunyuan", "hunyuan-i2v"):
        return "HunyuanVideoTransformer3DModel", dict(
            in_channels=TINY_LATENT_CHANNELS,
            out_channels=TINY_LATENT_CHANNELS,
            num_attention_heads=heads,
            attention_head_dim=hd,
            num_layers=1,
            num_single_layers=1,
            num_refiner_layers=1,
            patch_size=2,
            patch_size_t=1,
            text_embed_dim=text,
            pooled_projection_dim=8,
            rope_axes_dim=(2, 2, 4),
            image_condition_type="token_replace" if family == "hunyuan-i2v" else None,
        )
    if family in ("cogvideox", "cogvideox-1.5"):
        v15 = family == "cogvideox-1.5"
        # CogVideoX's 3-D RoPE splits the head dim 1/4 : 3/8 : 3/8 into even parts: 16 minimum.
        return "CogVideoXTransformer3DModel", dict(
            num_attention_heads=heads,
            attention_head_dim=16,
            in_channels=TINY_LATENT_CHANNELS,
            out_channels=TINY_LATENT_CHANNELS,
            time_embed_dim=8,
            text_embed_dim=text,
            num_layers=2,
            sample_width=16,
            sample_height=16,
            sample_frames=9,
            patch_size=2,
            patch_size_t=2 if v15 else None,
            max_text_seq_length=TINY_TEXT_LEN,
            use_rotary_positional_embeddings=True,
        )
    if family == "ltx":
        return "LTXVideoTransformer3DModel", dict(
            in_channels=TINY_LATENT_CHANNELS,
            out_channels=TINY_LATENT_CHANNELS,
            patch_size=1,
            patch_size_t=1,
            num_attention_heads=heads,
            attention_head_dim=hd,
            cross_attention_dim=heads * hd,
            num_layers=2,
            caption_channels=text,
        )
    if family == "mochi":
        return "MochiTransformer3DModel", dict(
            patch_size=2,
            num_attention_heads=heads,
            attention_head_dim=hd,
            num_layers=2,
            pooled_projection_dim=16,
            in_channels=TINY_LATENT_CHANNELS,
            text_embed_dim=text,
            time_embed_dim=16,
            max_sequence_length=TINY_TEXT_LEN,
        )
    raise ValueError(f"Unknown tiny family {family!r}. Expected one of: {', '.join(TINY_FAMILIES)}.")


def tiny_transformer(family: str = "wan", *, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides: Any):
    """A tiny random-init diffusers video transformer of ``family`` (see ``TINY_FAMILIES``).

    ``overrides`` replace config entries (e.g. ``num_layers=3``). Parameters that diffusers
    initialises to exactly zero (e.g. Mochi's RoPE frequencies) get small random values so
    that every code path (RoPE, gates) affects the output and tests can see a mistake.
    """
    import diffusers

    cls_name, kw = _tiny_config(family)
    kw.update(overrides)
    gen_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = getattr(diffusers, cls_name)(**kw)
        with torch.no_grad():
            for p in model.parameters():
                if p.numel() and not bool(p.any()):
                    p.normal_(0.0, 0.5)
    finally:
        torch.random.set_rng_state(gen_state)
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
    from diffusers.models.embeddings import get_3d_rotary_pos_embed

    gen = torch.Generator().manual_seed(seed)
    dtype = transformer.dtype
    cfg = transformer.config

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(dtype)

    text_dim = cfg.get("text_dim") or cfg.get("text_embed_dim") or cfg.get("caption_channels")
    mask = torch.ones(batch, text_len, dtype=torch.bool)
    if pad_text:
        for b in range(1, batch):
            mask[b, max(1, text_len - 2 * b) :] = False
    t = torch.full((batch,), float(timestep))
    c = cfg.in_channels

    if family in ("wan", "wan-i2v"):
        inputs: dict[str, Any] = dict(
            hidden_states=randn(batch, c, frames, height, width),
            timestep=t,
            encoder_hidden_states=randn(batch, text_len, text_dim),
        )
        if family == "wan-i2v":
            # WanAttnProcessor splits the context at a hard-coded 512 text tokens.
            inputs["encoder_hidden_states"] = randn(batch, 512, text_dim)
            inputs["encoder_hidden_states_image"] = randn(batch, 4, cfg.image_dim)
        return inputs
    if family in ("hunyuan", "hunyuan-i2v"):
        return dict(
            hidden_states=randn(batch, c, frames, height, width),
            timestep=t,
            encoder_hidden_states=randn(batch, text_len, text_dim),
            encoder_attention_mask=mask.to(dtype),
            pooled_projections=randn(batch, cfg.pooled_projection_dim),
            guidance=torch.full((batch,), 6000.0, dtype=dtype),
        )
    if family in ("cogvideox", "cogvideox-1.5"):
        p, p_t = cfg.patch_size, cfg.patch_size_t
        gh, gw = height // p, width // p
        if p_t is None:
            rope = get_3d_rotary_pos_embed(
                embed_dim=cfg.attention_head_dim,
                crops_coords=((0, 0), (gh, gw)),
                grid_size=(gh, gw),
                temporal_size=frames,
            )
        else:
            rope = get_3d_rotary_pos_embed(
                embed_dim=cfg.attention_head_dim,
                crops_coords=None,
                grid_size=(gh, gw),
                temporal_size=(frames + p_t - 1) // p_t,
                grid_type="slice",
                max_size=(cfg.sample_height // p, cfg.sample_width // p),
            )
        return dict(
            hidden_states=randn(batch, frames, c, height, width),
            encoder_hidden_states=randn(batch, text_len, text_dim),
            timestep=t.long(),
            image_rotary_emb=tuple(r.to(dtype) for r in rope),
        )
    if family == "ltx":
        return dict(
            hidden_states=randn(batch, frames * height * width, c),
            encoder_hidden_states=randn(batch, text_len, text_dim),
            timestep=t,
            encoder_attention_mask=mask.long(),
            num_frames=frames,
            height=height,
            width=width,
            rope_interpolation_scale=(1.0, 32.0, 32.0),
        )
    if family == "mochi":
        return dict(
            hidden_states=randn(batch, c, frames, height, width),
            encoder_hidden_states=randn(batch, text_len, text_dim),
            timestep=t,
            encoder_attention_mask=mask,
        )
    raise ValueError(f"Unknown tiny family {family!r}. Expected one of: {', '.join(TINY_FAMILIES)}.")
