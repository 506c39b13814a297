"""Wan 2.1 / 2.2 (``WanTransformer3DModel``): video-only self-attention, text by cross-attention.

Geometry (diffusers configs of Wan2.1-T2V / Wan2.2): VAE 4x in time (first frame kept) and 8x in
space, patch (1, 2, 2); 81x480x832 at 16 fps is the reference video (21x30x52 tokens).
Wan 2.2 TI2V-5B ("wan22-5b", picked from a transformer config with 48 latent channels) uses the
Wan 2.2 VAE: 4x time, 16x space (2x pixel patchify inside the VAE), so sizes are multiples of 32;
121x704x1280 at 24 fps is its reference video (31x22x40 tokens). Its pipeline
(``expand_timesteps=True``) passes a per-token timestep [B, S]; the step comes from its cache
context, and the self-attention is the same as the other Wan checkpoints'.

Defaults: Radial with the paper's Wan settings (decay 0.2, attention sink, layer 0 dense); a
two-expert Wan 2.2 pipeline (``transformer_2``, as in Radial's Wan2.2 script) uses decay 0.8
and block 64. Tile (2, 8, 8) tiles in a (5, 3, 3) tile window; GNA kernel (9, 25, 25), stride 1.

``attn1`` is self-attention (``attn2`` the text / image cross-attention, left alone). The
sparse processor mirrors diffusers 0.42 ``WanAttnProcessor`` (fused or separate q/k/v,
q/k RMS norm, Wan's interleaved RoPE); calls with an encoder context or a mask run the
original processor.
"""

from __future__ import annotations

from typing import Any

import torch

from vidsparse.families.base import (
    TINY_HEAD_DIM,
    TINY_HEADS,
    TINY_LATENT_CHANNELS,
    TINY_TEXT_DIM,
    Family,
    Shard,
    ShardPlan,
    TinyRequest,
    TinyVariant,
    VideoGeometry,
    finish_tiny_pipeline,
    indexed_paths,
    latent_grid,
    no_text,
    normalize_name,
    tiny_dims,
)
from vidsparse.families.decode import ClipDecode, DecodeWindow, causal_window
from vidsparse.families.processor import SparseProcessor
from vidsparse.layout import VideoLayout

# -- published checkpoints ------------------------------------------------------------------
# Transformer configurations of the released Wan2.1 T2V checkpoints (diffusers'
# scripts/convert_wan_to_diffusers.py "Wan-T2V-1.3B" / "Wan-T2V-14B"): the shapes the GPU suite
# and the transformer benchmark time with random weights.
WAN21_T2V_1_3B = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=12,
    attention_head_dim=128,
    in_channels=16,
    out_channels=16,
    text_dim=4096,
    freq_dim=256,
    ffn_dim=8960,
    num_layers=30,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    eps=1e-6,
)
WAN21_T2V_14B = {**WAN21_T2V_1_3B, "num_attention_heads": 40, "ffn_dim": 13824, "num_layers": 40}


# -- self-attention processor -----------------------------------------------------------------


def wan_qkv(attn, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v projections of a Wan attention module (fused ``to_qkv`` when it was fused)."""
    if getattr(attn, "fused_projections", False):
        return attn.to_qkv(hidden_states).chunk(3, dim=-1)
    return attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)


def wan_rope(x: torch.Tensor, freqs_cos: torch.Tensor, freqs_sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos = freqs_cos[..., 0::2]
    sin = freqs_sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)


class WanSparseProcessor(SparseProcessor):
    """``WanAttnProcessor`` for self-attention (``attn1``): video tokens only."""

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        pattern = self.state.pattern_for(self.layer)
        if pattern is None or encoder_hidden_states is not None or attention_mask is not None:
            return self._dense_any_order(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)
        query, key, value = wan_qkv(attn, hidden_states)
        query = attn.norm_q(query)
        key = attn.norm_k(key)
        query = query.unflatten(2, (attn.heads, -1))
        key = key.unflatten(2, (attn.heads, -1))
        value = value.unflatten(2, (attn.heads, -1))
        if rotary_emb is not None:
            query = wan_rope(query, *rotary_emb)
            key = wan_rope(key, *rotary_emb)
        layout = self._layout(query.shape[1], 0, "none")
        out = self.state.attend(query, key, value, layout, pattern, self.layer, None)
        out = out.flatten(2, 3).type_as(query)
        out = attn.to_out[0](out)
        return attn.to_out[1](out)


# -- pattern defaults -------------------------------------------------------------------------


def _radial(layout: VideoLayout, two_stage: bool) -> dict[str, Any]:
    """Radial's Wan settings; its Wan2.2 script (two experts) uses decay 0.8 and block 64."""
    if two_stage:
        return dict(decay_factor=0.8, sink=True, block_size=64)
    return dict(decay_factor=0.2, sink=True)


def _freeswim(layout: VideoLayout, two_stage: bool) -> dict[str, Any]:
    """FreeSwim's base grid: the latent grid of the family's default (native) video, 480x832 px -> (30, 52).

    One base for every Wan checkpoint the hook serves (it sees the call's grid, not the
    checkpoint): for a 720p one pass ``base_grid=(45, 80)``; ``vidsparse generate --freeswim``
    reads the checkpoint's native size instead.
    """
    from vidsparse.families.base import native_window_defaults

    return native_window_defaults(FAMILY.geometry)(layout, two_stage)


# -- tiny models ------------------------------------------------------------------------------


def tiny_transformer_kwargs(**overrides: Any) -> dict[str, Any]:
    """Constructor kwargs of the tiny ``WanTransformer3DModel`` (2 layers, 2 heads of 8)."""
    return tiny_dims(
        patch_size=(1, 2, 2),
        text_dim=TINY_TEXT_DIM,
        freq_dim=16,
        ffn_dim=32,
        num_layers=2,
        rope_max_seq_len=32,
        **overrides,
    )


def tiny_i2v_config() -> dict[str, Any]:
    # Latent + image condition + mask channels, as Wan I2V concatenates them.
    return tiny_transformer_kwargs(
        in_channels=3 * TINY_LATENT_CHANNELS, image_dim=TINY_TEXT_DIM, added_kv_proj_dim=TINY_HEADS * TINY_HEAD_DIM
    )


def tiny_inputs(r: TinyRequest) -> dict[str, Any]:
    """Forward kwargs of a tiny Wan-architecture transformer (also SkyReels-V2's)."""
    c = r.transformer.config.in_channels
    return dict(
        hidden_states=r.randn(r.batch, c, r.frames, r.height, r.width),
        timestep=r.timestep,
        encoder_hidden_states=r.randn(r.batch, r.text_len, r.text_dim),
    )


def tiny_i2v_inputs(r: TinyRequest) -> dict[str, Any]:
    """``tiny_inputs`` plus the image context of Wan I2V (and SkyReels-V2 I2V)."""
    inputs = tiny_inputs(r)
    # WanAttnProcessor splits the context at a hard-coded 512 text tokens.
    inputs["encoder_hidden_states"] = r.randn(r.batch, 512, r.text_dim)
    inputs["encoder_hidden_states_image"] = r.randn(r.batch, 4, r.transformer.config.image_dim)
    return inputs


def tiny_vae():
    """A tiny random-init ``AutoencoderKLWan`` (8 base channels; 4x time, 8x space, as Wan's)."""
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


def tiny_pipeline(seed: int = 0, dtype: torch.dtype = torch.float32, *, two_stage: bool = False, variant: str = "wan"):
    """A tiny random-init ``diffusers.WanPipeline`` (no tokenizer / text encoder).

    ``two_stage=True`` builds a Wan 2.2-style pipeline with ``transformer`` (high noise) and
    ``transformer_2`` (low noise) switched at ``boundary_ratio=0.5``. ``variant="wan22-5b"``
    builds the Wan 2.2 TI2V-5B layout instead (``tiny_ti2v_pipeline``), ``variant="wan-i2v"`` the
    image-to-video pipeline (``tiny_i2v_pipeline``). Prompts are passed as
    ``prompt_embeds`` (``vidsparse.models.tiny.encode_prompt_tiny``).
    """
    if normalize_name(variant) in {normalize_name(n) for n in (TI2V_GEOMETRY.name, *TI2V_GEOMETRY.aliases)}:
        if two_stage:
            raise ValueError("Wan 2.2 TI2V-5B is a single transformer; two_stage=True builds the A14B layout.")
        return tiny_ti2v_pipeline(seed, dtype)
    if normalize_name(variant) == normalize_name(I2V_TINY):
        return tiny_i2v_pipeline(seed, dtype, two_stage=two_stage)
    if normalize_name(variant) != "wan":
        raise ValueError(
            f"Unknown tiny Wan pipeline variant {variant!r}. Expected 'wan', {I2V_TINY!r} or {TI2V_TINY!r}."
        )
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel

    with torch.random.fork_rng(devices=[]):  # seeded build; the caller's RNG stream is untouched
        torch.manual_seed(seed)
        transformer = WanTransformer3DModel(**tiny_transformer_kwargs())
        transformer_2 = WanTransformer3DModel(**tiny_transformer_kwargs()) if two_stage else None
        vae = tiny_vae()
    pipe = WanPipeline(
        tokenizer=None,
        text_encoder=None,
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        transformer=transformer,
        transformer_2=transformer_2,
        boundary_ratio=0.5 if two_stage else None,
    )
    return finish_tiny_pipeline(pipe, dtype)


# -- Wan 2.1 I2V (image-to-video) ------------------------------------------------------------

#: ``generate --model tiny-wan-i2v`` / ``train-lora --model tiny-wan-i2v``: ``tiny_pipeline(variant=...)``.
I2V_TINY = "wan-i2v"
#: ``WanAttnProcessor`` splits an image-conditioned context at a hard-coded 512 text tokens (UMT5's
#: max length in the pipelines), so Wan I2V prompt embeddings are always 512 tokens long.
I2V_TEXT_LEN = 512
#: The tiny CLIP vision tower: 32x32 images in 8x8 patches (16 + 1 tokens of ``TINY_TEXT_DIM``).
TINY_CLIP_IMAGE_SIZE = 32


def text_len_of(transformer_config) -> int | None:
    """Prompt tokens a Wan transformer needs: 512 when it cross-attends to an image (I2V), else ``None`` (any)."""
    return I2V_TEXT_LEN if transformer_config.get("added_kv_proj_dim") is not None else None


def tiny_image_encoder():
    """A tiny random-init ``CLIPVisionModel`` and its ``CLIPImageProcessor`` (built offline, in code).

    Wan 2.1 I2V reads the penultimate hidden states (``encode_image``), so 2 layers.
    """
    import transformers
    from transformers import CLIPVisionConfig, CLIPVisionModel

    # The PIL image processor (the default one wants torchvision, which is optional here).
    processor_cls = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
    size = TINY_CLIP_IMAGE_SIZE
    config = CLIPVisionConfig(hidden_size=TINY_TEXT_DIM, intermediate_size=2 * TINY_TEXT_DIM, num_hidden_layers=2,
                              num_attention_heads=TINY_HEADS, image_size=size, patch_size=8,
                              projection_dim=TINY_TEXT_DIM)  # fmt: skip
    processor = processor_cls(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    return CLIPVisionModel(config), processor


def tiny_i2v_pipeline(
    seed: int = 0, dtype: torch.dtype = torch.float32, *, two_stage: bool = False, ti2v: bool = False
):
    """A tiny random-init ``diffusers.WanImageToVideoPipeline`` (no tokenizer / text encoder).

    Wan 2.1 I2V's layout: a transformer with ``in_channels = 3 * 4`` (noisy latents, the 4-channel
    first-frame mask, the image latents), ``image_dim`` / ``added_kv_proj_dim`` for the CLIP image
    context, and a tiny CLIP vision tower. ``two_stage=True`` gives Wan 2.2 I2V-A14B's layout
    instead: two experts at ``boundary_ratio=0.5`` and no image encoder (``image_dim=None``);
    ``ti2v=True`` Wan 2.2 TI2V-5B's (``expand_timesteps=True``: the 48-channel transformer and 16x
    VAE of ``tiny_ti2v_pipeline``, the image latents in place of the first latent frame).
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, WanImageToVideoPipeline, WanTransformer3DModel

    if ti2v:
        if two_stage:
            raise ValueError("Wan 2.2 TI2V-5B is a single transformer; two_stage=True builds the A14B layout.")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            transformer, vae = WanTransformer3DModel(**_tiny_ti2v_config()), tiny_ti2v_vae()
        pipe = WanImageToVideoPipeline(tokenizer=None, text_encoder=None, vae=vae,
                                       scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0), transformer=transformer,
                                       expand_timesteps=True)  # fmt: skip
        return finish_tiny_pipeline(pipe, dtype)
    with torch.random.fork_rng(devices=[]):  # seeded build; the caller's RNG stream is untouched
        torch.manual_seed(seed)
        if two_stage:
            config = tiny_transformer_kwargs(in_channels=3 * TINY_LATENT_CHANNELS)
            transformer, transformer_2 = WanTransformer3DModel(**config), WanTransformer3DModel(**config)
            image_encoder = image_processor = None
        else:
            transformer, transformer_2 = WanTransformer3DModel(**tiny_i2v_config()), None
            image_encoder, image_processor = tiny_image_encoder()
        vae = tiny_vae()
    pipe = WanImageToVideoPipeline(
        tokenizer=None,
        text_encoder=None,
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        image_processor=image_processor,
        image_encoder=image_encoder,
        transformer=transformer,
        transformer_2=transformer_2,
        boundary_ratio=0.5 if two_stage else None,
    )
    return finish_tiny_pipeline(pipe, dtype)


def tiny_prompt_kwargs(pipe, prompt: str, negative_prompt: str) -> dict[str, Any]:
    """Hashed ``prompt_embeds`` / ``negative_prompt_embeds`` of a tiny Wan (T2V or I2V) pipeline.

    The transformer's ``text_dim`` and, for I2V, the 512 tokens its attention processor expects;
    the same embeddings the LoRA adapter trains with (``vidsparse.lora.adapters.wan``).
    """
    from vidsparse.models.tiny import encode_prompt_tiny

    transformer = pipe.transformer if pipe.transformer is not None else pipe.transformer_2
    emb = dict(dim=transformer.config.text_dim, device=pipe._execution_device, dtype=transformer.dtype)
    seq_len = text_len_of(transformer.config)
    if seq_len is not None:
        emb["seq_len"] = seq_len
    return {
        "prompt_embeds": encode_prompt_tiny(prompt, **emb),
        "negative_prompt_embeds": encode_prompt_tiny(negative_prompt, **emb),
    }


# -- Wan 2.2 TI2V-5B ---------------------------------------------------------------------------

#: Wan 2.2 TI2V-5B: 48 latent channels; its VAE patchifies pixels 2x2 and compresses 8x more, so
#: 16x in space overall (``AutoencoderKLWan(is_residual=True, patch_size=2, scale_factor_spatial=16)``).
TI2V_LATENT_CHANNELS = 48
TI2V_GEOMETRY = VideoGeometry(
    "wan22-5b", 4, 16, (1, 2, 2), (121, 704, 1280), fps=24, aliases=("wan2.2-5b", "wan2.2-ti2v-5b", "ti2v-5b")
)
TI2V_TINY = TI2V_GEOMETRY.name


def _geometry_variant(transformer_config) -> str:
    """The geometry "wan22-5b" for a transformer with TI2V-5B's 48 latent channels, else Wan 2.1 / 2.2 A14B's."""
    channels = transformer_config.get("out_channels") or transformer_config.get("in_channels")
    return TI2V_GEOMETRY.name if channels == TI2V_LATENT_CHANNELS else "wan"


def _tiny_ti2v_config() -> dict[str, Any]:
    return tiny_transformer_kwargs(in_channels=TI2V_LATENT_CHANNELS, out_channels=TI2V_LATENT_CHANNELS)


def _tiny_ti2v_inputs(r: TinyRequest) -> dict[str, Any]:
    """TI2V-5B's per-token timestep [B, S] (``expand_timesteps``): the first latent frame at 0
    (the conditioning image), the others at the step's timestep."""
    inputs = tiny_inputs(r)
    pt, ph, pw = r.transformer.config.patch_size
    per_frame = (r.height // ph) * (r.width // pw)
    t = r.timestep[:, None].expand(-1, (r.frames // pt) * per_frame).clone()
    t[:, :per_frame] = 0
    inputs["timestep"] = t
    return inputs


def tiny_ti2v_vae():
    """A tiny random-init Wan 2.2 VAE (48 latent channels, 2x2 pixel patchify, 16x space, 4x time)."""
    from diffusers import AutoencoderKLWan

    c = TI2V_LATENT_CHANNELS
    return AutoencoderKLWan(
        base_dim=8,
        z_dim=c,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
        is_residual=True,
        in_channels=12,
        out_channels=12,
        patch_size=2,
        scale_factor_spatial=16,
        scale_factor_temporal=4,
        latents_mean=[0.0] * c,
        latents_std=[1.0] * c,
    )


def tiny_ti2v_pipeline(seed: int = 0, dtype: torch.dtype = torch.float32):
    """A tiny random-init Wan 2.2 TI2V-5B ``diffusers.WanPipeline`` (``expand_timesteps=True``,
    48-channel transformer and 16x VAE; no tokenizer / text encoder)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel

    with torch.random.fork_rng(devices=[]):  # seeded build; the caller's RNG stream is untouched
        torch.manual_seed(seed)
        transformer = WanTransformer3DModel(**_tiny_ti2v_config())
        vae = tiny_ti2v_vae()
    pipe = WanPipeline(
        tokenizer=None,
        text_encoder=None,
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0),
        transformer=transformer,
        expand_timesteps=True,
    )
    return finish_tiny_pipeline(pipe, dtype)


# -- LoRA -------------------------------------------------------------------------------------


def _lora_adapter() -> tuple[type, ...]:
    from vidsparse.lora.adapters.wan import WanModel
    from vidsparse.lora.adapters.wan_i2v import WanI2VModel

    return WanModel, WanI2VModel


# -- the record -------------------------------------------------------------------------------

# -- per-clip VAE decode (vidsparse.parallel.vae) --------------------------------------------


def vae_temporal_factor(vae) -> int:
    """Pixel frames per latent frame after the first of an ``AutoencoderKLWan`` (4 for Wan 2.1 / 2.2)."""
    cfg = vae.config
    factor = getattr(cfg, "scale_factor_temporal", None)
    if factor:
        return int(factor)
    return 2 ** sum(bool(d) for d in cfg.temperal_downsample)  # (sic) diffusers' spelling


def _clip_window(vae, frames: int, start: int, end: int, overlap: int | None) -> DecodeWindow:
    return causal_window(vae, frames, start, end, overlap, k=vae_temporal_factor(vae))


#: ``AutoencoderKLWan`` is causal in time and decodes latent frame by latent frame with a feature
#: cache of the frames before: a clip decoded from latent frame 0 is the whole decode's prefix.
CLIP_DECODE = ClipDecode(
    vae_classes=("AutoencoderKLWan",),
    temporal_factor=vae_temporal_factor,
    window=_clip_window,
    exact="from latent frame 0 (overlap all): bit-identical; shorter context approximates (the causal cache chains every earlier frame)",
)


FAMILY = Family(
    name="wan",
    aliases=("wan2.1", "wan2.2", "wan21", "wan22"),
    transformer_classes=("WanTransformer3DModel",),
    pipeline_prefixes=("Wan",),
    processor_names=("WanAttnProcessor",),
    processor=WanSparseProcessor,
    attention_paths=indexed_paths("blocks", "attn1"),
    grid=latent_grid,
    text_len=no_text,
    text_position="none",
    geometries=(VideoGeometry("wan", 4, 8, (1, 2, 2), (81, 480, 832), fps=16), TI2V_GEOMETRY),
    geometry_variant=_geometry_variant,
    pattern_defaults={
        "radial": _radial,
        "tile": dict(tile=(2, 8, 8), window=(5, 3, 3)),
        "gna": dict(kernel_size=(9, 25, 25), stride=1),
        "freeswim": _freeswim,
    },
    dense_first_steps=0.25,
    dense_layers={"radial": (0,)},
    lora_adapter=_lora_adapter,
    lora_refusals={
        "WanVideoToVideoPipeline": "video-to-video starts from a noised input video (strength), a sampling mode of "
        "the text-to-video weights: train the LoRA on WanPipeline (same checkpoint) and load it here",
    },
    # WanTransformer3DModel._cp_plan, on frame boundaries: RoPE (cos, sin) [1, S, 1, D],
    # the token sequence entering blocks.0, Wan 2.2 TI2V's per-token timestep [B, S].
    shard_plan=ShardPlan(
        inputs={"blocks.0": {"hidden_states": Shard(1, 3)}, "": {"timestep": Shard(1, 2)}},
        outputs={"rope": {0: Shard(1, 4), 1: Shard(1, 4)}},
        gather={"proj_out": Shard(1, 3)},
    ),
    clip_decode=CLIP_DECODE,
    # Between those cut points a Wan block is per token but for attn1 (norms, FFN, the text /
    # image cross-attention's queries, TI2V's per-token timestep embedding): a sparse forward
    # runs in the plans' kernel order there (vidsparse.pipelines.kernel_order).
    kernel_order=True,
    tiny={
        "wan": TinyVariant("wan", tiny_transformer_kwargs, tiny_inputs),
        "wan-i2v": TinyVariant("wan-i2v", tiny_i2v_config, tiny_i2v_inputs),
        TI2V_TINY: TinyVariant(TI2V_TINY, _tiny_ti2v_config, _tiny_ti2v_inputs),
    },
    tiny_pipeline=tiny_pipeline,
    tiny_prompt_kwargs=tiny_prompt_kwargs,
    tiny_geometries=(TI2V_TINY,),
    tiny_pipelines={I2V_TINY: "WanImageToVideoPipeline"},
)
