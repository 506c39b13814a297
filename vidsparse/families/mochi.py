"""Mochi-1 (``MochiTransformer3DModel``): joint [video; valid text] attention, per-sample validity.

Geometry: VAE 6x time / 8x space, patch (1, 2, 2), 256 prompt tokens after the video;
163x480x848 at 30 fps is the reference video (28x30x53 tokens).

Self-attention: ``transformer_blocks.<i>.attn1``; the processor mirrors diffusers 0.42
``MochiAttnProcessor2_0``: its per-sample loop keeps only valid text tokens and right-pads the
text output with zeros, reproduced here with a key-validity mask and a stable repack.

Defaults: Radial decay 1.0 without sink; Tile (2, 8, 8) in a (5, 3, 3) window; GNA (9, 25, 25).
"""

from __future__ import annotations

from typing import Any

import torch

from vidsparse.families.base import (
    GENERIC_PATTERN_DEFAULTS,
    TINY_HEAD_DIM,
    TINY_HEADS,
    TINY_LATENT_CHANNELS,
    TINY_TEXT_DIM,
    TINY_TEXT_LEN,
    Family,
    Shard,
    ShardPlan,
    TinyRequest,
    TinyVariant,
    VideoGeometry,
    finish_tiny_pipeline,
    indexed_paths,
    joint_text,
    latent_grid,
    tiny_masked_prompt_kwargs,
)
from vidsparse.families.decode import ClipDecode, DecodeWindow, causal_window, first_frame_pixels
from vidsparse.families.processor import SparseProcessor, project_qkv

# -- self-attention processor -----------------------------------------------------------------


def _mochi_rope(x: torch.Tensor, freqs_cos: torch.Tensor, freqs_sin: torch.Tensor) -> torch.Tensor:
    x_even = x[..., 0::2].float()
    x_odd = x[..., 1::2].float()
    cos = (x_even * freqs_cos - x_odd * freqs_sin).to(x.dtype)
    sin = (x_even * freqs_sin + x_odd * freqs_cos).to(x.dtype)
    return torch.stack([cos, sin], dim=-1).flatten(-2)


def _mochi_pack_text(text_out: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mochi's per-sample loop keeps only valid text tokens and right-pads the output with
    zeros: valid rows move to the front (in order), the rest are zero."""
    order = torch.argsort((~valid).to(torch.int8), dim=1, stable=True)
    packed = text_out.gather(1, order[:, :, None, None].expand_as(text_out))
    keep = torch.arange(valid.shape[1], device=valid.device)[None, :] < valid.sum(dim=1, keepdim=True)
    return torch.where(keep[:, :, None, None], packed, torch.zeros((), dtype=packed.dtype, device=packed.device))


class MochiSparseProcessor(SparseProcessor):
    """``MochiAttnProcessor2_0``: joint [video; valid text] attention, per-sample text validity."""

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        attention_mask: torch.Tensor,
        image_rotary_emb: torch.Tensor | None = None,
    ):
        pattern = self.state.pattern_for(self.layer)
        if pattern is None:
            return self._dense(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        query, key, value = project_qkv(attn, hidden_states)
        encoder_query, encoder_key, encoder_value = project_qkv(attn, encoder_hidden_states, "text")
        if image_rotary_emb is not None:
            query = _mochi_rope(query, *image_rotary_emb)
            key = _mochi_rope(key, *image_rotary_emb)

        video_len, text_len = query.shape[1], encoder_query.shape[1]
        valid = attention_mask.to(torch.bool)
        q = torch.cat([query, encoder_query], dim=1)
        k = torch.cat([key, encoder_key], dim=1)
        v = torch.cat([value, encoder_value], dim=1)
        layout = self._layout(video_len + text_len, text_len, "after")
        out = self.state.attend(q, k, v, layout, pattern, self.layer, valid)
        out = torch.cat([out[:, :video_len], _mochi_pack_text(out[:, video_len:], valid)], dim=1)
        out = out.flatten(2, 3)
        out, encoder_out = out.split_with_sizes((video_len, text_len), dim=1)
        out = attn.to_out[0](out)
        out = attn.to_out[1](out)
        if hasattr(attn, "to_add_out"):
            encoder_out = attn.to_add_out(encoder_out)
        return out, encoder_out


# -- parallel ----------------------------------------------------------------------------------

#: Video tokens cut where the blocks start, RoPE tables (S, heads, D/2) cut as MochiRoPE makes them;
#: the text (and its per-sample validity mask, text-only) stays whole on every rank.
SHARD_PLAN = ShardPlan(
    inputs={"transformer_blocks.0": {"hidden_states": Shard(1, 3)}},
    outputs={"rope": {0: Shard(0, 3), 1: Shard(0, 3)}},
    gather={"proj_out": Shard(1, 3)},
)


# -- tiny models ------------------------------------------------------------------------------


def _tiny_config() -> dict[str, Any]:
    return dict(
        patch_size=2,
        num_attention_heads=TINY_HEADS,
        attention_head_dim=TINY_HEAD_DIM,
        num_layers=2,
        pooled_projection_dim=16,
        in_channels=TINY_LATENT_CHANNELS,
        text_embed_dim=TINY_TEXT_DIM,
        time_embed_dim=16,
        max_sequence_length=TINY_TEXT_LEN,
    )


def _tiny_inputs(r: TinyRequest) -> dict[str, Any]:
    return dict(
        hidden_states=r.randn(r.batch, r.transformer.config.in_channels, r.frames, r.height, r.width),
        encoder_hidden_states=r.randn(r.batch, r.text_len, r.text_dim),
        timestep=r.timestep,
        encoder_attention_mask=r.text_mask,
    )


#: Latent channels of every Mochi checkpoint; ``MochiPipeline.__call__`` hard-codes them when it
#: denormalizes latents before decoding (``latents_mean.view(1, 12, 1, 1, 1)``).
MOCHI_LATENT_CHANNELS = 12


def tiny_vae(latent_channels: int = MOCHI_LATENT_CHANNELS):
    """The smallest ``AutoencoderKLMochi`` with the real one's interface: 12 latent channels (the
    pipeline's decode needs them), 32-wide blocks (its GroupNorms take 32 groups), no attention,
    6x time / 8x space compression like the checkpoint's; non-trivial ``latents_mean`` /
    ``latents_std`` so that a wrong (de)normalization shows in tests. ``latent_channels`` other
    than 12 gives a VAE the pipeline can only run with ``output_type="latent"``."""
    import diffusers

    if latent_channels % 4:
        raise ValueError(f"tiny Mochi VAE: latent_channels must be a multiple of 4, got {latent_channels!r}.")
    reps = latent_channels // 4
    return diffusers.AutoencoderKLMochi(
        latent_channels=latent_channels,
        encoder_block_out_channels=(32, 32, 32, 32),
        decoder_block_out_channels=(32, 32, 32, 32),
        layers_per_block=(1, 1, 1, 1, 1),
        add_attention_block=(False,) * 5,
        latents_mean=(0.1, -0.2, 0.3, 0.05) * reps,
        latents_std=(0.9, 1.3, 0.7, 1.1) * reps,
        scaling_factor=1.3,
    )


def tiny_pipeline(
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    *,
    invert_sigmas: bool = True,
    latent_channels: int = MOCHI_LATENT_CHANNELS,
):
    """A tiny random-init ``diffusers.MochiPipeline`` (no tokenizer / text encoder).

    The family's ``mochi`` tiny transformer (with ``latent_channels`` in and out), ``tiny_vae``
    and the flow-matching Euler scheduler of genmo/mochi-1-preview (``invert_sigmas=True``;
    ``False`` builds the misconfigured pipeline train-lora refuses). Prompts go in as hashed
    embeddings with a padding mask (``tiny_prompt_kwargs``). Served as ``vidsparse generate
    --model tiny-mochi``; the LoRA tests train on a 4-channel one (``output_type="latent"`` only).
    """
    import diffusers

    from vidsparse.models.tiny import tiny_transformer

    with torch.random.fork_rng(devices=[]):  # seeded build; the caller's RNG stream is untouched
        torch.manual_seed(seed)
        vae = tiny_vae(latent_channels)
    pipe = diffusers.MochiPipeline(
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(invert_sigmas=invert_sigmas),
        vae=vae,
        text_encoder=None,
        tokenizer=None,
        transformer=tiny_transformer("mochi", seed=seed, in_channels=latent_channels),
    )
    return finish_tiny_pipeline(pipe, dtype)


def tiny_prompt_kwargs(pipe, prompt: str, negative_prompt: str = "") -> dict[str, Any]:
    """Call kwargs of a tiny Mochi pipeline: hashed (negative) ``prompt_embeds`` and bool masks."""
    return tiny_masked_prompt_kwargs(pipe, prompt, negative_prompt, int(pipe.transformer.config.text_embed_dim))


def _lora_adapter() -> type:
    from vidsparse.lora.adapters.mochi import MochiModel

    return MochiModel


# -- per-clip VAE decode (vidsparse.parallel.vae) --------------------------------------------


def _vae_temporal_factor(vae) -> int:
    return int(vae.temporal_compression_ratio)  # 6: temporal_expansions (1, 2, 3)


def _pixel_start(vae, frames: int, t: int) -> int:
    """``AutoencoderKLMochi`` decodes every latent frame to 6 pixel frames and then drops the first 5
    of the video (``drop_last_temporal_frames``, on by default): latent frame t > 0 starts at 6t - 5."""
    k = _vae_temporal_factor(vae)
    return first_frame_pixels(k, frames, t) if vae.drop_last_temporal_frames else k * t


def _clip_window(vae, frames: int, start: int, end: int, overlap: int | None) -> DecodeWindow:
    return causal_window(vae, frames, start, end, overlap, k=_vae_temporal_factor(vae))


#: ``AutoencoderKLMochi``'s decoder is causal in time (``CogVideoXCausalConv3d`` padding the past
#: with the first frame), normalises per frame (``MochiChunkedGroupNorm3D``) and has no attention:
#: a pixel frame depends on a bounded window of earlier latent frames only.
CLIP_DECODE = ClipDecode(
    vae_classes=("AutoencoderKLMochi",),
    temporal_factor=_vae_temporal_factor,
    window=_clip_window,
    pixel_start=_pixel_start,
    exact="from latent frame 0 (overlap all), and with any overlap covering the decoder's causal receptive field: "
    "equal within float tolerance (the convolutions run on a shorter tensor)",
)


FAMILY = Family(
    name="mochi",
    transformer_classes=("MochiTransformer3DModel",),
    pipeline_prefixes=("Mochi",),
    processor_names=("MochiAttnProcessor2_0",),
    processor=MochiSparseProcessor,
    attention_paths=indexed_paths("transformer_blocks", "attn1"),
    grid=latent_grid,
    text_len=joint_text,
    text_position="after",
    geometries=(VideoGeometry("mochi", 6, 8, (1, 2, 2), (163, 480, 848), 256, "after", fps=30),),
    pattern_defaults=GENERIC_PATTERN_DEFAULTS,
    lora_adapter=_lora_adapter,
    shard_plan=SHARD_PLAN,
    clip_decode=CLIP_DECODE,
    tiny={"mochi": TinyVariant("mochi", _tiny_config, _tiny_inputs)},
    tiny_pipeline=tiny_pipeline,
    tiny_prompt_kwargs=tiny_prompt_kwargs,
)
