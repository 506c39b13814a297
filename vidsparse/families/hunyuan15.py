"""HunyuanVideo 1.5 (``HunyuanVideo15Transformer3DModel``): joint [video; conditions] self-attention.

Geometry (diffusers 0.42 ``HunyuanVideo15Pipeline`` / ``AutoencoderKLHunyuanVideo15``): the VAE
compresses 4x in time (first frame kept) and 16x in space, the transformer patchifies (1, 1, 1);
the 480p checkpoints (``target_size=640``) default to 121x480x848 (31x30x53 tokens), the 720p
ones (``target_size=960``) to 121x720x1280 (31x45x80), at 24 fps.

Token sequence of every double-stream block's self-attention (``transformer_blocks.<i>.attn``):
``[video; conditions]``. The condition span is, per sample, the valid tokens first --
SigLIP image tokens, ByT5 glyph-text tokens, Qwen2.5-VL prompt tokens -- then the invalid ones
(the model reorders them so); the forward passes its validity as a [B, L] mask. Text-to-video
calls carry the 729 image slots as invalid (zeroed ``image_embeds``); image-to-video makes them
valid and adds the first-frame latent and a mask as extra *input channels*, so both pipelines
have the same video grid. vidsparse reads that mask per call and passes it as the text key
validity; padded condition queries get zero output, as the model's all-False mask rows do.

Defaults: Tile (2, 8, 8) tiles in a (9, 3, 3) tile window and GNA kernel (18, 24, 24) with stride
(6, 8, 8): both the 18x24x24-token local window of the sliding-tile part of HunyuanVideo 1.5's
own SSTA (tile (6, 8, 8), window (3, 3, 3) tiles, its 720p sparse checkpoints); GNA with that
stride is exactly that STA. Radial borrows HunyuanVideo's settings (decay 0.95, no sink;
Radial Attention publishes none for 1.5). The token-refiner attention
(``context_embedder.token_refiner``) is text-only and stays the model's own.

Tiny: transformers "hunyuan15" / "hunyuan15-i2v" (2 blocks, 2 heads of 8, patch 1) and
``tiny_pipeline`` (``vidsparse generate --model tiny-hunyuan15``): the real T2V (or I2V)
pipeline with a 16x/4x VAE, byte-level Qwen2.5-VL and ByT5 text encoders and, for I2V, a
1-layer SigLIP, all random-init and built offline (``tiny-hunyuan15-i2v``). LoRA: text- and
image-to-video, every input built by the pipeline (``vidsparse.lora.adapters.hunyuan15``);
``--parallel clip|ulysses`` splits the video tokens and replicates the condition span (``SHARD_PLAN``).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
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
)
from vidsparse.families.processor import SparseProcessor, project_qkv

# -- self-attention processor -----------------------------------------------------------------


def condition_validity(mask: Any, batch: int, cond_len: int) -> torch.Tensor | str:
    """Key validity [B, cond_len] of the condition span from the block's ``attention_mask``.

    ``HunyuanVideo15AttnProcessor2_0`` left-pads the [B, L] mask with ``True`` up to the joint
    length and reads it with ``.bool()``; so any L up to ``cond_len`` is a mask of the condition
    tail. Anything else (no mask, another shape, a mask reaching into the video) returns the
    reason this mirror does not cover it, and the call runs the original processor.
    """
    if not isinstance(mask, torch.Tensor):
        return "no condition mask was passed"
    if mask.dim() != 2 or mask.shape[0] != batch:
        return f"the condition mask has shape {tuple(mask.shape)}, expected [{batch}, <= {cond_len}]"
    length = mask.shape[1]
    if length > cond_len:
        return f"the mask covers {length} tokens, more than the {cond_len} condition tokens (it would mask video)"
    valid = mask.bool()
    if length < cond_len:
        valid = torch.cat([valid.new_ones(batch, cond_len - length), valid], dim=1)
    return valid


class HunyuanVideo15SparseProcessor(SparseProcessor):
    """``HunyuanVideo15AttnProcessor2_0``: joint [video; conditions] attention, condition padding mask."""

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ):
        pattern = self.state.pattern_for(self.layer)
        if pattern is None or encoder_hidden_states is None:
            return self._dense(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        batch, video_len = hidden_states.shape[:2]
        cond_len = encoder_hidden_states.shape[1]
        valid = condition_validity(attention_mask, batch, cond_len)
        if isinstance(valid, str):
            self.state.warn_once("hunyuan15-mask", f"vidsparse: HunyuanVideo 1.5 attention: {valid}; running dense.")
            return self._dense(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        from diffusers.models.embeddings import apply_rotary_emb

        query, key, value = project_qkv(attn, hidden_states, "video")
        if image_rotary_emb is not None:  # video tokens only, before the conditions join
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        encoder_query, encoder_key, encoder_value = project_qkv(attn, encoder_hidden_states, "text")
        query = torch.cat([query, encoder_query], dim=1)
        key = torch.cat([key, encoder_key], dim=1)
        value = torch.cat([value, encoder_value], dim=1)

        layout = self._layout(query.shape[1], cond_len, "after")
        out = self.state.attend(query, key, value, layout, pattern, self.layer, valid)
        # The model's mask is valid[q] & valid[k]: a padded condition query has no key at all,
        # and SDPA returns zeros for such a row.
        cond_out = torch.where(valid[:, :, None, None], out[:, video_len:], out.new_zeros(()))
        out = torch.cat([out[:, :video_len], cond_out], dim=1).flatten(2, 3).to(query.dtype)

        out, encoder_out = out[:, :video_len], out[:, video_len:]
        if getattr(attn, "to_out", None) is not None:
            out = attn.to_out[0](out)
            out = attn.to_out[1](out)
        if getattr(attn, "to_add_out", None) is not None:
            encoder_out = attn.to_add_out(encoder_out)
        return out, encoder_out


# -- grid and condition span discovery --------------------------------------------------------


def _condition_len(model: torch.nn.Module, kwargs: dict[str, Any]) -> int:
    """Prompt (Qwen2.5-VL) + glyph text (ByT5) + image (SigLIP) tokens: the joint condition span."""
    total = 0
    for name in ("encoder_hidden_states", "encoder_hidden_states_2", "image_embeds"):
        value = kwargs.get(name)
        if isinstance(value, torch.Tensor) and value.dim() == 3:
            total += int(value.shape[1])
    return total


def _geometry_variant(config: Mapping[str, Any]) -> str:
    """480p checkpoints say ``target_size`` 640, 720p ones 960."""
    return "hunyuan15-720p" if int(config.get("target_size") or 640) >= 960 else "hunyuan15"


# -- tiny models ------------------------------------------------------------------------------

#: The tiny model's ByT5 (glyph text) and SigLIP (image) embedding sizes and token counts.
TINY_GLYPH_DIM = 8
TINY_GLYPH_LEN = 8
TINY_IMAGE_DIM = 8
TINY_IMAGE_SIZE = 16
TINY_IMAGE_PATCH = 4
TINY_IMAGE_TOKENS = (TINY_IMAGE_SIZE // TINY_IMAGE_PATCH) ** 2


def tiny_transformer_kwargs(**overrides: Any) -> dict[str, Any]:
    """Constructor kwargs of the tiny ``HunyuanVideo15Transformer3DModel`` (2 blocks, 2 heads of 8).

    Channels as the pipelines build them: noisy latents, condition latents and a 1-channel mask.
    ``target_size=64`` makes the pipeline's default size 48x80 (3x5 latent pixels).
    """
    kw: dict[str, Any] = dict(
        in_channels=2 * TINY_LATENT_CHANNELS + 1,
        out_channels=TINY_LATENT_CHANNELS,
        num_attention_heads=TINY_HEADS,
        attention_head_dim=TINY_HEAD_DIM,
        num_layers=2,
        num_refiner_layers=1,
        mlp_ratio=2.0,
        patch_size=1,
        patch_size_t=1,
        text_embed_dim=TINY_TEXT_DIM,
        text_embed_2_dim=TINY_GLYPH_DIM,
        image_embed_dim=TINY_IMAGE_DIM,
        rope_axes_dim=(2, 2, 4),
        target_size=64,
        task_type="t2v",
    )
    kw.update(overrides)
    return kw


def _tiny_inputs(r: TinyRequest, *, image: bool = False) -> dict[str, Any]:
    """Forward kwargs as the pipelines pass them: float masks, glyph tokens partly padded, and
    zero image embeddings (text-to-video) or random ones (image-to-video)."""
    cfg = r.transformer.config
    glyph_mask = torch.ones(r.batch, TINY_GLYPH_LEN, dtype=torch.bool)
    glyph_mask[:, TINY_GLYPH_LEN // 2 :] = False
    image_embeds = r.randn(r.batch, TINY_IMAGE_TOKENS, cfg.image_embed_dim)
    dtype = image_embeds.dtype
    return dict(
        hidden_states=r.randn(r.batch, cfg.in_channels, r.frames, r.height, r.width),
        timestep=r.timestep.to(dtype),
        encoder_hidden_states=r.randn(r.batch, r.text_len, cfg.text_embed_dim),
        encoder_attention_mask=r.text_mask.to(dtype),
        encoder_hidden_states_2=r.randn(r.batch, TINY_GLYPH_LEN, cfg.text_embed_2_dim),
        encoder_attention_mask_2=glyph_mask.to(dtype),
        image_embeds=image_embeds if image else torch.zeros_like(image_embeds),
    )


def _tiny_i2v_inputs(r: TinyRequest) -> dict[str, Any]:
    return _tiny_inputs(r, image=True)


def tiny_vae():
    """A tiny random-init ``AutoencoderKLHunyuanVideo15`` with the real factors (4x time, 16x
    space: five 8-channel stages), so sizes validate exactly as on the real model."""
    from diffusers import AutoencoderKLHunyuanVideo15

    return AutoencoderKLHunyuanVideo15(
        latent_channels=TINY_LATENT_CHANNELS,
        block_out_channels=(8, 8, 8, 8, 8),
        layers_per_block=1,
        spatial_compression_ratio=16,
        temporal_compression_ratio=4,
        downsample_match_channel=False,
        upsample_match_channel=False,
    )


#: The tiny pipeline's text lengths (the real pipeline's: 1000 Qwen tokens after a 108-token
#: template crop, 256 ByT5 tokens) and its short system prompt (the crop adapts to it).
TINY_PROMPT_LEN = 24
TINY_SYSTEM_MESSAGE = "Describe the video."
_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _tiny_text_encoders():
    """A byte-level Qwen2 tokenizer (no merges, Qwen's chat markers) with a 2-layer
    ``Qwen2_5_VLTextModel``, and ``ByT5Tokenizer`` with a 1-layer ``T5EncoderModel``: built in
    memory (no vocabulary files), interfaces as the pipeline calls them."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import (
        ByT5Tokenizer,
        Qwen2_5_VLTextConfig,
        Qwen2_5_VLTextModel,
        Qwen2Tokenizer,
        T5Config,
        T5EncoderModel,
    )

    tokenizer = Qwen2Tokenizer(vocab={c: i for i, c in enumerate(sorted(ByteLevel.alphabet()))}, merges=[])
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.chat_template = _CHAT_TEMPLATE
    qwen = Qwen2_5_VLTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=TINY_TEXT_DIM,
        intermediate_size=2 * TINY_TEXT_DIM,
        num_hidden_layers=2,  # the pipeline reads hidden_states[-3]
        num_attention_heads=2,
        num_key_value_heads=2,
        rope_scaling={"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"},
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    tokenizer_2 = ByT5Tokenizer()
    t5 = T5Config(vocab_size=len(tokenizer_2), d_model=TINY_GLYPH_DIM, d_kv=4, d_ff=16, num_layers=1, num_heads=2)
    return tokenizer, Qwen2_5_VLTextModel(qwen).eval(), tokenizer_2, T5EncoderModel(t5).eval()


def _tiny_image_encoder():
    from transformers import SiglipVisionConfig, SiglipVisionModel

    config = SiglipVisionConfig(
        hidden_size=TINY_IMAGE_DIM,
        intermediate_size=2 * TINY_IMAGE_DIM,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=TINY_IMAGE_SIZE,
        patch_size=TINY_IMAGE_PATCH,
    )
    return SiglipVisionModel(config).eval()


def _tiny_feature_extractor():
    import transformers

    # The PIL processor: the default one needs torchvision, which vidsparse does not require.
    cls = getattr(transformers, "SiglipImageProcessorPil", None) or transformers.SiglipImageProcessor
    return cls(size={"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE})


#: ``vidsparse generate --model tiny-hunyuan15-i2v``: the tiny image-to-video pipeline.
I2V_TINY = "hunyuan15-i2v"


def tiny_pipeline(
    seed: int = 0, dtype: torch.dtype = torch.float32, *, image_to_video: bool = False, variant: str | None = None
):
    """A tiny random-init ``HunyuanVideo15Pipeline`` (or ``HunyuanVideo15ImageToVideoPipeline``
    with a 1-layer SigLIP image encoder: ``image_to_video=True`` or ``variant="hunyuan15-i2v"``),
    offline, prompts through its own tiny text encoders.

    Its text lengths are the pipeline's own attributes, made small: ``tokenizer_max_length``
    ``TINY_PROMPT_LEN``, ``tokenizer_2_max_length`` ``TINY_GLYPH_LEN``, 16 SigLIP tokens, and a
    short ``system_message`` with ``prompt_template_encode_start_idx`` its token count (the
    template part the real pipeline crops). Guidance is the pipeline's guider
    (``ClassifierFreeGuidance(guidance_scale=6.0)``; replace ``pipe.guider`` to change it).
    """
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        HunyuanVideo15ImageToVideoPipeline,
        HunyuanVideo15Pipeline,
        HunyuanVideo15Transformer3DModel,
    )
    from diffusers.guiders import ClassifierFreeGuidance

    if variant is not None and variant not in ("hunyuan15", I2V_TINY):
        raise ValueError(f"tiny HunyuanVideo 1.5 variants are 'hunyuan15' and {I2V_TINY!r}, got {variant!r}.")
    image_to_video = image_to_video or variant == I2V_TINY
    with torch.random.fork_rng(devices=[]):  # seeded build; the caller's RNG stream is untouched
        torch.manual_seed(seed)
        transformer = HunyuanVideo15Transformer3DModel(
            **tiny_transformer_kwargs(task_type="i2v" if image_to_video else "t2v")
        ).eval()
        vae = tiny_vae().eval()
        tokenizer, text_encoder, tokenizer_2, text_encoder_2 = _tiny_text_encoders()
        image_encoder = _tiny_image_encoder() if image_to_video else None
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Guiders are currently an experimental feature.*")
        guider = ClassifierFreeGuidance(guidance_scale=6.0)
    components = dict(
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0),
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        guider=guider,
    )
    if image_to_video:
        pipe = HunyuanVideo15ImageToVideoPipeline(
            **components, image_encoder=image_encoder, feature_extractor=_tiny_feature_extractor()
        )
    else:
        pipe = HunyuanVideo15Pipeline(**components)
    pipe.system_message = TINY_SYSTEM_MESSAGE
    prefix = f"<|im_start|>system\n{TINY_SYSTEM_MESSAGE}<|im_end|>\n<|im_start|>user\n"
    pipe.prompt_template_encode_start_idx = len(tokenizer(prefix).input_ids)
    pipe.tokenizer_max_length = TINY_PROMPT_LEN
    pipe.tokenizer_2_max_length = TINY_GLYPH_LEN
    # The text-to-video pipeline passes this many zero SigLIP tokens (729, SigLIP-384's count):
    # the tiny image encoder's count keeps the condition span small and equal in T2V and I2V.
    pipe.vision_num_semantic_tokens = TINY_IMAGE_TOKENS
    return finish_tiny_pipeline(pipe, dtype)


# -- parallel ---------------------------------------------------------------------------------

#: HunyuanVideo's plan: the video tokens are cut where ``x_embedder`` returns them [B, S, D] and
#: the RoPE tables (cos, sin) [S, D] with them; ``proj_out`` is gathered. The condition span is
#: built (and reordered per sample) from the prompt / image inputs only, so every rank holds all of
#: it: replicated joint text after the video, its validity mask read per call by the processor,
#: the text rows merged across ranks by ``vidsparse.parallel``. Image-to-video adds input channels
#: only (same grid), so it splits the same way.
SHARD_PLAN = ShardPlan(
    inputs={},
    outputs={"x_embedder": {0: Shard(1, 3)}, "rope": {0: Shard(0, 2), 1: Shard(0, 2)}},
    gather={"proj_out": Shard(1, 3)},
)


# -- LoRA -------------------------------------------------------------------------------------


def _lora_adapter() -> tuple[type, ...]:
    """Text- and image-to-video (``vidsparse.lora.adapters.hunyuan15``: every input as the pipelines build it)."""
    from vidsparse.lora.adapters.hunyuan15 import HunyuanVideo15I2VModel, HunyuanVideo15Model

    return HunyuanVideo15Model, HunyuanVideo15I2VModel


# -- the record -------------------------------------------------------------------------------

_TEXT_LEN = 729 + 256 + 1000  # SigLIP image slots + ByT5 + Qwen2.5-VL (the pipelines' max lengths)

FAMILY = Family(
    name="hunyuan15",
    aliases=("hunyuanvideo15", "hunyuanvideo1.5", "hunyuan1.5"),
    transformer_classes=("HunyuanVideo15Transformer3DModel",),
    pipeline_prefixes=("HunyuanVideo15",),
    processor_names=("HunyuanVideo15AttnProcessor2_0",),
    processor=HunyuanVideo15SparseProcessor,
    attention_paths=indexed_paths("transformer_blocks", "attn"),
    grid=latent_grid,  # latents [B, C, F, H, W]: noisy + condition latents + mask as channels
    text_len=_condition_len,
    text_position="after",
    geometries=(
        VideoGeometry("hunyuan15", 4, 16, (1, 1, 1), (121, 480, 848), _TEXT_LEN, "after", fps=24),
        VideoGeometry(
            "hunyuan15-720p", 4, 16, (1, 1, 1), (121, 720, 1280), _TEXT_LEN, "after", fps=24, aliases=("hunyuan15720p",)
        ),
    ),
    geometry_variant=_geometry_variant,
    pattern_defaults={
        "radial": dict(decay_factor=0.95, sink=False),
        "tile": dict(tile=(2, 8, 8), window=(9, 3, 3)),
        "gna": dict(kernel_size=(18, 24, 24), stride=(6, 8, 8)),
    },
    dense_first_steps=0.25,
    lora_adapter=_lora_adapter,
    shard_plan=SHARD_PLAN,
    tiny={
        "hunyuan15": TinyVariant("hunyuan15", tiny_transformer_kwargs, _tiny_inputs),
        "hunyuan15-i2v": TinyVariant(
            "hunyuan15-i2v", lambda: tiny_transformer_kwargs(task_type="i2v"), _tiny_i2v_inputs
        ),
    },
    tiny_pipeline=tiny_pipeline,
    tiny_pipelines={I2V_TINY: "HunyuanVideo15ImageToVideoPipeline"},
)
