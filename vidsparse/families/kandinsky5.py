"""Kandinsky 5.0 video (``Kandinsky5Transformer3DModel``): T2V (and I2V) pipelines.

Geometry (diffusers 0.42 ``Kandinsky5T2VPipeline``): the HunyuanVideo VAE (4x in time, first frame
kept, 8x in space) and patch (1, 2, 2); the reference video 121x512x768 at 24 fps is a 31x32x48 token
grid (47 616 tokens). Latents are channel-last, [B, F, H, W, C], and the transformer keeps its visual
tokens as [B, F, H, W, C] until it flattens them for the blocks.

Token order: frame-major raster, except when the pipeline passes ``sparse_params`` (checkpoints with
``attention_type="nabla"``): then the model reorders tokens "fractally" (``fractal_flatten``) into
8x8 spatial tiles, per frame, tile after tile, for its own NABLA attention (a pooled-q/k block mask,
united with an STA window of ``attention_wT`` frames x ``attention_wH`` x ``attention_wW`` tiles).
The sparse processor puts q/k/v back in raster order for the vidsparse pattern, which replaces
NABLA, and the output back in the model's order; dense steps run the model's own processor, so a
NABLA checkpoint keeps NABLA there.

Self-attention: ``visual_transformer_blocks.<i>.self_attention`` (video tokens only; the text goes
through ``cross_attention``; the text encoder blocks' self-attention over the prompt is not video
attention and stays the model's own). The processor mirrors ``Kandinsky5AttnProcessor``: q/k/v
projections, per-head RMS norm in float32, Kandinsky's rotation-matrix RoPE (rounded to bfloat16,
as the model does), then ``out_layer``. Calls with an encoder context run the original.

Defaults, fitted to the 31x32x48 grid and to the model's own STA: GNA kernel (11, 24, 24) with
stride (1, 8, 8) *is* NABLA's STA window at the NABLA checkpoints' ``attention_wT/wH/wW`` of
11, 3, 3 (11 frames x 3x3 tiles of 8x8; STA is GNA with stride = tile), 13 % of the pairs;
Tile (2, 8, 8) tiles (one 128-token block) with a (5, 3, 3) window, the same reach (12 %);
Radial the paper's base setting (decay 1.0, no sink).

LoRA: text- and image-to-video train (``vidsparse.lora.adapters.kandinsky5``; ``tiny-kandinsky5-i2v``
is the tiny I2V pipeline); the image pipelines are refused (``LORA_REFUSALS``); ``--parallel clip|ulysses`` runs the non-NABLA checkpoints (``SHARD_PLAN``).
"""

from __future__ import annotations

from typing import Any

import torch

from vidsparse.families.base import (
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
    no_text,
)
from vidsparse.families.processor import SparseProcessor

#: Why train-lora refuses the Kandinsky 5 image pipelines (text- and image-to-video train:
#: ``vidsparse.lora.adapters.kandinsky5``).
LORA_REFUSALS = {
    "Kandinsky5T2IPipeline": "it generates images; train-lora trains video length extension. Train "
    "Kandinsky5T2VPipeline",
    "Kandinsky5I2IPipeline": "it edits images; train-lora trains video length extension. Train Kandinsky5T2VPipeline",
}
#: ``fractal_flatten``'s spatial tile (hard-coded 8 in diffusers 0.42).
FRACTAL_TILE = 8


# -- token order ------------------------------------------------------------------------------


def _swap_tile_axes(x: torch.Tensor, grid: tuple[int, int, int], fractal_in: bool) -> torch.Tensor:
    """Between the fractal order (f, tile row, tile col, row in tile, col in tile) and raster
    (f, tile row, row in tile, tile col, col in tile) of [B, S, ...]: one axis swap, its own inverse."""
    f, h, w = grid
    p = FRACTAL_TILE
    b, rest = x.shape[0], x.shape[2:]
    if fractal_in:
        x = x.reshape(b, f, h // p, w // p, p, p, *rest)
    else:
        x = x.reshape(b, f, h // p, p, w // p, p, *rest)
    return x.transpose(3, 4).reshape(b, f * h * w, *rest)


def fractal_to_raster(x: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
    """Tokens [B, S, ...] of a NABLA call (``fractal_flatten`` order) in frame-major raster order."""
    return _swap_tile_axes(x, grid, fractal_in=True)


def raster_to_fractal(x: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
    """The inverse of ``fractal_to_raster``."""
    return _swap_tile_axes(x, grid, fractal_in=False)


def _is_fractal(sparse_params: Any) -> bool:
    return isinstance(sparse_params, dict) and bool(sparse_params.get("to_fractal", False))


# -- self-attention processor -----------------------------------------------------------------


def _kandinsky_rope(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """``Kandinsky5AttnProcessor``'s rotation: 2x2 matrices per channel pair, rounded to bfloat16."""
    x_ = x.reshape(*x.shape[:-1], -1, 1, 2).to(torch.float32)
    x_out = (rope * x_).sum(dim=-1)
    return x_out.reshape(*x.shape).to(torch.bfloat16)


class Kandinsky5SparseProcessor(SparseProcessor):
    """``Kandinsky5AttnProcessor`` for the visual blocks' ``self_attention``: video tokens only."""

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        rotary_emb: torch.Tensor | None = None,
        sparse_params: dict[str, Any] | None = None,
    ) -> torch.Tensor:
        pattern = self.state.pattern_for(self.layer)
        if pattern is None or encoder_hidden_states is not None:
            return self._dense(
                attn,
                hidden_states,
                encoder_hidden_states=encoder_hidden_states,
                rotary_emb=rotary_emb,
                sparse_params=sparse_params,
            )
        query = attn.to_query(hidden_states)
        key = attn.to_key(hidden_states)
        value = attn.to_value(hidden_states)
        shape = query.shape[:-1]
        query = query.reshape(*shape, attn.num_heads, -1)
        key = key.reshape(*shape, attn.num_heads, -1)
        value = value.reshape(*shape, attn.num_heads, -1)
        query = attn.query_norm(query.float()).type_as(query)
        key = attn.key_norm(key.float()).type_as(key)
        if rotary_emb is not None:
            query = _kandinsky_rope(query, rotary_emb).type_as(query)
            key = _kandinsky_rope(key, rotary_emb).type_as(key)
        layout = self._layout(query.shape[1], 0, "none")
        fractal = _is_fractal(sparse_params)
        if fractal:
            query, key, value = (fractal_to_raster(t, layout.grid) for t in (query, key, value))
        out = self.state.attend(query, key, value, layout, pattern, self.layer, None).to(query.dtype)
        if fractal:
            out = raster_to_fractal(out, layout.grid)
        return attn.out_layer(out.flatten(-2, -1))


# -- grid discovery ---------------------------------------------------------------------------


def _grid(model: torch.nn.Module, kwargs: dict[str, Any]):
    """Channel-last latents [B, F, H, W, C] patchified by ``config.patch_size``; ``None`` (dense,
    with a warning) for any other input."""
    hidden_states = kwargs.get("hidden_states")
    if not isinstance(hidden_states, torch.Tensor) or hidden_states.dim() != 5:
        return None
    _, f, h, w, _ = hidden_states.shape
    pt, ph, pw = model.config.patch_size
    return (f // pt, h // ph, w // pw)


# -- tiny models ------------------------------------------------------------------------------

_NABLA_CONFIG = dict(
    attention_type="nabla",
    attention_causal=False,
    attention_local=False,
    attention_glob=False,
    attention_window=3,
    attention_P=0.9,
    attention_wT=11,
    attention_wH=3,
    attention_wW=3,
    attention_add_sta=True,
    attention_method="topcdf",
)


def tiny_transformer_kwargs(**overrides: Any) -> dict[str, Any]:
    """Constructor kwargs of the tiny ``Kandinsky5Transformer3DModel``: 2 visual blocks, 1 text block,
    2 heads of 16 (RoPE axes 4 + 6 + 6; the head dim is their sum)."""
    kw: dict[str, Any] = dict(
        in_visual_dim=TINY_LATENT_CHANNELS,
        out_visual_dim=TINY_LATENT_CHANNELS,
        in_text_dim=TINY_TEXT_DIM,
        in_text_dim2=TINY_TEXT_DIM,
        time_dim=16,
        patch_size=(1, 2, 2),
        model_dim=TINY_HEADS * 16,
        ff_dim=64,
        num_text_blocks=1,
        num_visual_blocks=2,
        axes_dims=(4, 6, 6),
    )
    kw.update(overrides)
    return kw


def _tiny_nabla_config() -> dict[str, Any]:
    return tiny_transformer_kwargs(**_NABLA_CONFIG)


def sparse_params_for(transformer: torch.nn.Module, latents: torch.Tensor) -> dict[str, Any] | None:
    """``sparse_params`` as ``Kandinsky5T2VPipeline.get_sparse_params`` builds them (NABLA
    checkpoints), for calling the transformer directly; ``None`` for regular attention."""
    from diffusers import Kandinsky5T2VPipeline

    cfg = transformer.config
    if cfg.attention_type != "nabla":
        return None
    _, f, h, w, _ = latents.shape
    t, h, w = f // cfg.patch_size[0], h // cfg.patch_size[1], w // cfg.patch_size[2]
    sta = Kandinsky5T2VPipeline.fast_sta_nabla(
        t, h // 8, w // 8, cfg.attention_wT, cfg.attention_wH, cfg.attention_wW, device=latents.device
    )
    return {
        "sta_mask": sta.unsqueeze_(0).unsqueeze_(0),
        "attention_type": cfg.attention_type,
        "to_fractal": True,
        "P": cfg.attention_P,
        "wT": cfg.attention_wT,
        "wW": cfg.attention_wW,
        "wH": cfg.attention_wH,
        "add_sta": cfg.attention_add_sta,
        "visual_shape": (t, h, w),
        "method": cfg.attention_method,
    }


def _tiny_inputs(r: TinyRequest) -> dict[str, Any]:
    """Forward kwargs as the T2V pipeline passes them; a NABLA model gets ``sparse_params`` when its
    token grid is in whole 8x8 tiles (NABLA's tiling needs that), else it is called as a regular one."""
    cfg = r.transformer.config
    latents = r.randn(r.batch, r.frames, r.height, r.width, cfg.in_visual_dim)
    _, ph, pw = cfg.patch_size
    device = latents.device
    return dict(
        hidden_states=latents,
        encoder_hidden_states=r.randn(r.batch, r.text_len, r.text_dim),
        timestep=r.timestep.to(latents.dtype),
        pooled_projections=r.randn(r.batch, cfg.in_text_dim2),
        visual_rope_pos=[
            torch.arange(r.frames, device=device),
            torch.arange(r.height // ph, device=device),
            torch.arange(r.width // pw, device=device),
        ],
        text_rope_pos=torch.arange(r.text_len, device=device),
        scale_factor=(1.0, 2.0, 2.0),
        sparse_params=sparse_params_for(r.transformer, latents) if _tileable(cfg, r.height, r.width) else None,
    )


def _tileable(cfg, height: int, width: int) -> bool:
    """Latent height / width whose token grid is in whole ``FRACTAL_TILE`` x ``FRACTAL_TILE`` tiles."""
    return (height // cfg.patch_size[1]) % FRACTAL_TILE == 0 and (width // cfg.patch_size[2]) % FRACTAL_TILE == 0


def randomize_zero_parameters(model: torch.nn.Module, std: float = 0.5) -> torch.nn.Module:
    """Give parameters diffusers initialises to exactly zero (Kandinsky's modulations, hence every
    gate) small random values, so attention changes the output and tests can see a mistake."""
    with torch.no_grad():
        for p in model.parameters():
            if p.numel() and not bool(p.any()):
                p.normal_(0.0, std)
    return model


def tiny_vae():
    """A tiny random-init ``AutoencoderKLHunyuanVideo`` (8 channels; 4x time, 8x space, as Kandinsky's)."""
    from diffusers import AutoencoderKLHunyuanVideo

    return AutoencoderKLHunyuanVideo(
        latent_channels=TINY_LATENT_CHANNELS,
        block_out_channels=(8, 8, 8, 8),
        layers_per_block=1,
        norm_num_groups=4,
        spatial_compression_ratio=8,
        temporal_compression_ratio=4,
    )


#: ``vidsparse generate --model tiny-kandinsky5-i2v``: the image-to-video pipeline.
I2V_TINY = "kandinsky5-i2v"


def tiny_pipeline(
    seed: int = 0, dtype: torch.dtype = torch.float32, *, nabla: bool = False, variant: str | None = None
):
    """A tiny random-init ``diffusers.Kandinsky5T2VPipeline`` (no tokenizers / text encoders), or with
    ``variant="kandinsky5-i2v"`` a ``Kandinsky5I2VPipeline`` whose transformer has ``visual_cond``
    (condition latents and mask channels after the latents).

    Prompts are passed as ``prompt_embeds_qwen`` [B, L, 16], ``prompt_embeds_clip`` [B, 16] and
    ``prompt_cu_seqlens`` (and the negative ones); see ``tiny_prompt_kwargs``. ``nabla=True`` builds
    a NABLA-attention transformer (the pipeline then passes ``sparse_params``; its own NABLA needs
    FlexAttention, so such a pipeline runs on CPU only under vidsparse or in inference mode).
    """
    import diffusers

    if variant not in (None, "kandinsky5", I2V_TINY):
        raise ValueError(f"tiny Kandinsky 5 variants are 'kandinsky5' and {I2V_TINY!r}, got {variant!r}.")
    i2v = variant == I2V_TINY
    with torch.random.fork_rng(devices=[]):  # seeded build; the caller's RNG stream is untouched
        torch.manual_seed(seed)
        config = _tiny_nabla_config() if nabla else tiny_transformer_kwargs()
        if i2v:
            config = dict(config, visual_cond=True)
        transformer = randomize_zero_parameters(diffusers.Kandinsky5Transformer3DModel(**config))
        vae = tiny_vae()
    transformer.eval()
    pipe = (diffusers.Kandinsky5I2VPipeline if i2v else diffusers.Kandinsky5T2VPipeline)(
        transformer=transformer,
        vae=vae,
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=5.0),
    )
    return finish_tiny_pipeline(pipe, dtype)


def tiny_prompt_kwargs(
    pipe, prompt: str, negative_prompt: str = "", *, batch: int = 1, text_len: int = 8
) -> dict[str, Any]:
    """Pipeline kwargs carrying hashed prompt embeddings (``encode_prompt_tiny``) for a tiny
    ``Kandinsky5T2VPipeline``: Qwen-side [batch, text_len, D], CLIP-side [batch, D2] and the
    cumulative sequence lengths the pipeline reads its text RoPE positions from."""
    from vidsparse.models.tiny import encode_prompt_tiny

    cfg = pipe.transformer.config
    device, dtype = pipe._execution_device, pipe.transformer.dtype
    cu = torch.arange(batch + 1, dtype=torch.int32, device=device) * text_len
    out: dict[str, Any] = {}
    for prefix, text in (("", prompt), ("negative_", negative_prompt)):
        qwen = encode_prompt_tiny(text, seq_len=text_len, dim=cfg.in_text_dim, batch=batch, device=device, dtype=dtype)
        clip = encode_prompt_tiny(text + "\0clip", seq_len=1, dim=cfg.in_text_dim2, batch=batch, device=device)
        out[f"{prefix}prompt_embeds_qwen"] = qwen
        out[f"{prefix}prompt_embeds_clip"] = clip[:, 0].to(dtype)
        out[f"{prefix}prompt_cu_seqlens"] = cu
    return out


def _i2v_latent_frames(latent_frames: int) -> str | None:
    """Kandinsky5I2VPipeline rescales its first 4 latent frames to the mean and std of the frames
    after them (``normalize_first_frame``): with 2-4 latent frames there are none, and the video
    comes out NaN. One latent frame skips the step."""
    if 1 < latent_frames < 5:
        return (
            f"Kandinsky5I2VPipeline normalises its first 4 latent frames by the frames after them, so it needs 1 or "
            f"at least 5 latent frames (frames 1 or >= 17 with the 4x VAE), got {latent_frames}"
        )
    return None


#: The Kandinsky 5 pipelines of diffusers 0.42 (``train-lora`` trains the first, refuses the rest: ``LORA_REFUSALS``).
PIPELINES = ("Kandinsky5T2VPipeline", "Kandinsky5I2VPipeline", "Kandinsky5T2IPipeline", "Kandinsky5I2IPipeline")


def _lora_adapter() -> tuple[type, ...]:
    """Text- and image-to-video (``vidsparse.lora.adapters.kandinsky5``: the pipelines' own inputs, channel-last)."""
    from vidsparse.lora.adapters.kandinsky5 import Kandinsky5I2VModel, Kandinsky5Model

    return Kandinsky5Model, Kandinsky5I2VModel


# -- parallel ---------------------------------------------------------------------------------


def _nabla_call(kwargs: dict[str, Any]) -> bool:
    """A NABLA checkpoint's call: the pipeline passes ``sparse_params`` (the model's own NABLA mask)."""
    return kwargs.get("sparse_params") is not None


def _own_nabla(model: torch.nn.Module, kwargs: dict[str, Any]) -> str | None:
    if _nabla_call(kwargs):
        return "a NABLA checkpoint's call (sparse_params): the model's own self-attention is NABLA, not dense"
    return None


def _refuse_nabla(model: torch.nn.Module, kwargs: dict[str, Any]) -> str | None:
    if _nabla_call(kwargs):
        return (
            "a NABLA checkpoint's call (sparse_params): its dense steps and layers run the model's own NABLA "
            "block mask over the whole video on one GPU, which the parallel path, running them as Dense(), "
            "would not reproduce"
        )
    return None


#: The visual tokens [B, S, D] are cut at the first visual block's input and the visual RoPE
#: [B, S, 1, D/2, 2, 2] at every visual block (the forward hands the one table to each); the last
#: visual block's output is gathered, because the forward then reshapes the tokens to the whole
#: video's shape (``fractal_unflatten``, a function) before ``out_layer``. The text stream (its own
#: blocks, cross-attention keys) is whole on every rank. NABLA calls are refused (``_refuse_nabla``).
SHARD_PLAN = ShardPlan(
    inputs={
        "visual_transformer_blocks.0": {"visual_embed": Shard(1, 3)},
        "visual_transformer_blocks.*": {"rope": Shard(1, 6)},
    },
    outputs={},
    gather={"visual_transformer_blocks.-1": Shard(1, 3)},
    refuse_call=_refuse_nabla,
)


# -- the record -------------------------------------------------------------------------------

FAMILY = Family(
    name="kandinsky5",
    aliases=("kandinsky", "kandinsky-5", "kandinsky5.0"),
    transformer_classes=("Kandinsky5Transformer3DModel",),
    pipeline_prefixes=("Kandinsky5T2V", "Kandinsky5"),  # the first names the tiny pipeline's class
    processor_names=("Kandinsky5AttnProcessor",),
    processor=Kandinsky5SparseProcessor,
    attention_paths=indexed_paths("visual_transformer_blocks", "self_attention"),
    grid=_grid,
    text_len=no_text,
    text_position="none",
    geometries=(VideoGeometry("kandinsky5", 4, 8, (1, 2, 2), (121, 512, 768), fps=24),),
    pattern_defaults={
        "radial": dict(decay_factor=1.0, sink=False),
        "tile": dict(tile=(2, 8, 8), window=(5, 3, 3)),
        "gna": dict(kernel_size=(11, 24, 24), stride=(1, 8, 8)),
    },
    dense_first_steps=0.25,
    lora_adapter=_lora_adapter,
    lora_refusals=LORA_REFUSALS,
    shard_plan=SHARD_PLAN,
    tiny={
        "kandinsky5": TinyVariant("kandinsky5", tiny_transformer_kwargs, _tiny_inputs),
        "kandinsky5-nabla": TinyVariant("kandinsky5-nabla", _tiny_nabla_config, _tiny_inputs),
    },
    tiny_pipeline=tiny_pipeline,
    tiny_prompt_kwargs=tiny_prompt_kwargs,
    tiny_pipelines={I2V_TINY: "Kandinsky5I2VPipeline"},
    latent_frame_checks={"Kandinsky5I2VPipeline": _i2v_latent_frames},
    own_attention_sparse=_own_nabla,
)
