"""CogVideoX 1.0 / 1.5 (``CogVideoXTransformer3DModel``): joint [text; video] attention.

Geometry: VAE 4x time / 8x space; CogVideoX 1.0 patchifies (1, 2, 2) (49x480x720 at 8 fps),
CogVideoX 1.5 (``patch_size_t=2``) patchifies (2, 2, 2) and pads latent frames to a multiple of 2
(81x768x1360 at 16 fps). 226 prompt tokens come before the video.

Self-attention: ``transformer_blocks.<i>.attn1``; the processor mirrors diffusers 0.42
``CogVideoXAttnProcessor2_0`` and ``FusedCogVideoXAttnProcessor2_0`` (RoPE on video tokens only).
Latents arrive as (B, F, C, H, W).

Defaults: Radial decay 1.0 without sink; Tile (2, 8, 8) in a (5, 3, 3) window; GNA (9, 25, 25).
LoRA: v-prediction on the scheduler's alphas (``vidsparse.lora.adapters.cogvideox``), text-to-video only.
"""

from __future__ import annotations

from typing import Any

import torch

from vidsparse.families.base import (
    GENERIC_PATTERN_DEFAULTS,
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
    normalize_name,
    tiny_dims,
)
from vidsparse.families.decode import ClipDecode, DecodeWindow
from vidsparse.families.processor import SparseProcessor

# -- self-attention processor -----------------------------------------------------------------


class CogVideoXSparseProcessor(SparseProcessor):
    """``CogVideoXAttnProcessor2_0`` (and the fused variant): joint [text; video] attention."""

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: torch.Tensor | None = None,
    ):
        pattern = self.state.pattern_for(self.layer)
        if pattern is None or attention_mask is not None:
            return self._dense(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        from diffusers.models.embeddings import apply_rotary_emb

        text_len = encoder_hidden_states.size(1)
        hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        batch, seq, _ = hidden_states.shape
        if type(self.original).__name__.startswith("Fused"):
            qkv = attn.to_qkv(hidden_states)
            query, key, value = torch.split(qkv, qkv.shape[-1] // 3, dim=-1)
        else:
            query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if image_rotary_emb is not None:
            query[:, :, text_len:] = apply_rotary_emb(query[:, :, text_len:], image_rotary_emb)
            if not attn.is_cross_attention:
                key[:, :, text_len:] = apply_rotary_emb(key[:, :, text_len:], image_rotary_emb)

        query, key, value = (t.transpose(1, 2) for t in (query, key, value))  # [B, S, H, D]
        layout = self._layout(seq, text_len, "before")
        out = self.state.attend(query, key, value, layout, pattern, self.layer, None)
        out = out.reshape(batch, -1, attn.heads * head_dim)
        out = attn.to_out[0](out)
        out = attn.to_out[1](out)
        encoder_out, out = out.split([text_len, out.size(1) - text_len], dim=1)
        return out, encoder_out


# -- grid -------------------------------------------------------------------------------------


def _grid(model: torch.nn.Module, kwargs: dict[str, Any]):
    _, f, _, h, w = kwargs["hidden_states"].shape  # CogVideoX takes (B, F, C, H, W)
    p, pt = model.config.patch_size, model.config.patch_size_t
    return (f // pt if pt else f, h // p, w // p)


def _variant(transformer_config) -> str:
    return "cogvideox1.5" if transformer_config.get("patch_size_t") else "cogvideox"


# -- parallel ----------------------------------------------------------------------------------

#: The pipeline passes the RoPE tables (cos, sin), each (S_video, D): cut on the way in. The video
#: tokens are cut where the blocks start (after the joint patch embedding split off the text,
#: which every rank keeps whole); the output is gathered after proj_out.
SHARD_PLAN = ShardPlan(
    inputs={"": {"image_rotary_emb": Shard(0, 2)}, "transformer_blocks.0": {"hidden_states": Shard(1, 3)}},
    outputs={},
    gather={"proj_out": Shard(1, 3)},
)


# -- tiny models ------------------------------------------------------------------------------


def _tiny_config(v15: bool = False, image_to_video: bool = False) -> dict[str, Any]:
    # CogVideoX's 3-D RoPE splits the head dim 1/4 : 3/8 : 3/8 into even parts: 16 minimum.
    # Image-to-video: the image latents as as many extra input channels; 1.5 I2V also embeds an ofs value.
    i2v = dict(in_channels=2 * TINY_LATENT_CHANNELS, ofs_embed_dim=8 if v15 else None) if image_to_video else {}
    return tiny_dims(
        attention_head_dim=16,
        time_embed_dim=8,
        text_embed_dim=TINY_TEXT_DIM,
        num_layers=2,
        sample_width=16,
        sample_height=16,
        sample_frames=9,
        patch_size=2,
        patch_size_t=2 if v15 else None,
        max_text_seq_length=TINY_TEXT_LEN,
        use_rotary_positional_embeddings=True,
        **i2v,
    )


def _tiny_inputs(r: TinyRequest) -> dict[str, Any]:
    from diffusers.models.embeddings import get_3d_rotary_pos_embed

    cfg = r.transformer.config
    p, p_t = cfg.patch_size, cfg.patch_size_t
    gh, gw = r.height // p, r.width // p
    if p_t is None:
        rope = get_3d_rotary_pos_embed(
            embed_dim=cfg.attention_head_dim,
            crops_coords=((0, 0), (gh, gw)),
            grid_size=(gh, gw),
            temporal_size=r.frames,
        )
    else:
        rope = get_3d_rotary_pos_embed(
            embed_dim=cfg.attention_head_dim,
            crops_coords=None,
            grid_size=(gh, gw),
            temporal_size=(r.frames + p_t - 1) // p_t,
            grid_type="slice",
            max_size=(cfg.sample_height // p, cfg.sample_width // p),
        )
    return dict(
        hidden_states=r.randn(r.batch, r.frames, cfg.in_channels, r.height, r.width),
        encoder_hidden_states=r.randn(r.batch, r.text_len, r.text_dim),
        timestep=r.timestep.long(),
        image_rotary_emb=tuple(x.to(r.transformer.dtype) for x in rope),
    )


def tiny_vae():
    """A tiny random-init ``AutoencoderKLCogVideoX``: 4 latent channels, 4x time / 8x space."""
    from diffusers import AutoencoderKLCogVideoX

    return AutoencoderKLCogVideoX(
        latent_channels=TINY_LATENT_CHANNELS, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
        norm_num_groups=2, temporal_compression_ratio=4,
    )  # fmt: skip


#: ``generate --model tiny-cogvideox-i2v`` / ``train-lora --model tiny-cogvideox-i2v``.
I2V_TINY = "cogvideox-i2v"


def tiny_pipeline(
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    *,
    v15: bool = False,
    image_to_video: bool = False,
    variant: str = "cogvideox",
):
    """A tiny random-init ``diffusers.CogVideoXPipeline`` (no tokenizer / text encoder).

    The scheduler is ``CogVideoXDDIMScheduler`` with THUDM/CogVideoX-2b's scheduler config
    (v-prediction, scaled-linear betas rescaled to zero terminal SNR, SNR shift 3, trailing
    spacing). ``v15=True`` gives the CogVideoX 1.5 transformer (``patch_size_t=2``).
    ``image_to_video=True`` (or ``variant="cogvideox-i2v"``) a ``CogVideoXImageToVideoPipeline``
    (image-latent input channels; 1.5: and the ofs embedding). Prompts are passed as
    ``prompt_embeds`` (``tiny_prompt_kwargs``).
    """
    from diffusers import (
        CogVideoXDDIMScheduler,
        CogVideoXImageToVideoPipeline,
        CogVideoXPipeline,
        CogVideoXTransformer3DModel,
    )

    if normalize_name(variant) not in (normalize_name("cogvideox"), normalize_name(I2V_TINY)):
        raise ValueError(f"Unknown tiny CogVideoX pipeline variant {variant!r}. Expected 'cogvideox' or {I2V_TINY!r}.")
    image_to_video = image_to_video or normalize_name(variant) == normalize_name(I2V_TINY)
    with torch.random.fork_rng(devices=[]):  # seeded build; the caller's RNG stream is untouched
        torch.manual_seed(seed)
        transformer = CogVideoXTransformer3DModel(**_tiny_config(v15, image_to_video))
        vae = tiny_vae()
    scheduler = CogVideoXDDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
        prediction_type="v_prediction", rescale_betas_zero_snr=True, set_alpha_to_one=True, snr_shift_scale=3.0,
        steps_offset=0, timestep_spacing="trailing",
    )  # fmt: skip
    cls = CogVideoXImageToVideoPipeline if image_to_video else CogVideoXPipeline
    pipe = cls(tokenizer=None, text_encoder=None, vae=vae, transformer=transformer, scheduler=scheduler)
    return finish_tiny_pipeline(pipe, dtype)


def tiny_prompt_kwargs(pipe, prompt: str, negative_prompt: str = "", *, batch: int = 1) -> dict[str, Any]:
    """``prompt_embeds`` / ``negative_prompt_embeds`` [batch, TINY_TEXT_LEN, text_embed_dim] for a tiny
    CogVideoX pipeline, the hashed embeddings its LoRA adapter caches (``vidsparse.models.tiny``)."""
    from vidsparse.models.tiny import encode_prompt_tiny

    cfg = pipe.transformer.config
    emb = dict(seq_len=TINY_TEXT_LEN, dim=cfg.text_embed_dim, batch=batch, device=pipe._execution_device,
               dtype=pipe.transformer.dtype)  # fmt: skip
    return dict(prompt_embeds=encode_prompt_tiny(prompt, **emb),
                negative_prompt_embeds=encode_prompt_tiny(negative_prompt, **emb))  # fmt: skip


# -- LoRA -------------------------------------------------------------------------------------


def _lora_adapter() -> tuple[type, ...]:
    from vidsparse.lora.adapters.cogvideox import CogVideoXI2VModel, CogVideoXModel

    return CogVideoXModel, CogVideoXI2VModel


_V2V_REFUSAL = (
    "video-to-video starts from a noised input video (strength), which is a sampling mode of the text-to-video "
    "weights: train the LoRA on CogVideoXPipeline (same checkpoint) and load it here"
)

# -- per-clip VAE decode (vidsparse.parallel.vae) --------------------------------------------
# ``AutoencoderKLCogVideoX._decode`` runs the decoder on batches of ``num_latent_frames_batch_size``
# (2) latent frames, the remainder of F / 2 joining the first batch, and carries a causal
# convolution cache from batch to batch; GroupNorm statistics are per batch. A clip therefore
# starts on a batch boundary, and a decode from latent frame 0 repeats the whole decode's batches.


def _vae_temporal_factor(vae) -> int:
    return int(vae.config.temporal_compression_ratio)  # 4


def _batch_starts(vae, frames: int) -> list[int]:
    """Latent frames where ``AutoencoderKLCogVideoX`` starts a decode batch (0 first)."""
    size = vae.num_latent_frames_batch_size
    return [0] + [size * i + frames % size for i in range(1, max(frames // size, 1))]


def _batch_pixels(vae, n: int) -> int:
    """Pixel frames of one batch of n latent frames: an odd batch keeps its first frame single."""
    k = _vae_temporal_factor(vae)
    return 1 + k * (n - 1) if n % 2 else k * n


def _pixel_start(vae, frames: int, t: int) -> int:
    starts = [*_batch_starts(vae, frames), frames]
    if t not in starts:
        raise ValueError(f"CogVideoX VAE: latent frame {t} is not a decode batch boundary ({starts}).")
    return sum(_batch_pixels(vae, b - a) for a, b in zip(starts, starts[1:]) if b <= t)


def _cut(vae, frames: int, t: int) -> int:
    """The batch boundary in (0, F] nearest latent frame t (a clip of the decode starts there)."""
    bounds = [*_batch_starts(vae, frames)[1:], frames]
    return min(bounds, key=lambda b: (abs(b - t), b))


def _clip_window(vae, frames: int, start: int, end: int, overlap: int | None) -> DecodeWindow:
    first = 0 if overlap is None else max([b for b in _batch_starts(vae, frames) if b <= max(0, start - overlap)])
    return DecodeWindow(first, end, _pixel_start(vae, frames, first))


CLIP_DECODE = ClipDecode(
    vae_classes=("AutoencoderKLCogVideoX",),
    temporal_factor=_vae_temporal_factor,
    window=_clip_window,
    pixel_start=_pixel_start,
    cut=_cut,
    exact="from latent frame 0 (overlap all): bit-identical (the same batches and convolution cache); "
    "shorter context starts the cache cold at a batch boundary",
)


FAMILY = Family(
    name="cogvideox",
    transformer_classes=("CogVideoXTransformer3DModel",),
    pipeline_prefixes=("CogVideoX",),
    processor_names=("CogVideoXAttnProcessor2_0", "FusedCogVideoXAttnProcessor2_0"),
    processor=CogVideoXSparseProcessor,
    attention_paths=indexed_paths("transformer_blocks", "attn1"),
    grid=_grid,
    text_len=joint_text,
    text_position="before",
    geometries=(
        VideoGeometry("cogvideox", 4, 8, (1, 2, 2), (49, 480, 720), 226, "before", fps=8),
        VideoGeometry(
            "cogvideox1.5", 4, 8, (2, 2, 2), (81, 768, 1360), 226, "before", fps=16, aliases=("cogvideox15",)
        ),
    ),
    geometry_variant=_variant,
    pattern_defaults=GENERIC_PATTERN_DEFAULTS,
    lora_adapter=_lora_adapter,
    lora_refusals={
        "CogVideoXVideoToVideoPipeline": _V2V_REFUSAL,
        "CogVideoXFunControlPipeline": "CogVideoX-Fun control takes control-video latents as extra input channels; "
        "that conditioning path is not implemented",
    },
    shard_plan=SHARD_PLAN,
    clip_decode=CLIP_DECODE,
    tiny={
        "cogvideox": TinyVariant("cogvideox", _tiny_config, _tiny_inputs),
        "cogvideox-1.5": TinyVariant("cogvideox-1.5", lambda: _tiny_config(True), _tiny_inputs),
    },
    tiny_pipeline=tiny_pipeline,
    tiny_prompt_kwargs=tiny_prompt_kwargs,
    tiny_pipelines={I2V_TINY: "CogVideoXImageToVideoPipeline"},
)
