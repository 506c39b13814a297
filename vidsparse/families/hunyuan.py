"""HunyuanVideo (``HunyuanVideoTransformer3DModel``): joint [video; text] attention, text padding mask.

Geometry (diffusers HunyuanVideo config): VAE 4x time / 8x space, patch (1, 2, 2), 256 prompt
tokens after the video; 129x720x1280 at 15 fps is the reference video.

Self-attention: ``transformer_blocks.<i>.attn`` (double-stream: separate text projections
``add_*_proj``) then ``single_transformer_blocks.<i>.attn`` (single-stream: text and video
projected together), one layer index sequence across both. The processor mirrors diffusers 0.42
``HunyuanVideoAttnProcessor2_0``; the [B, 1, 1, S] bool mask becomes the text keys' validity.

Defaults: Radial decay 0.95 without sink; Tile (2, 8, 8) tiles in a (9, 3, 5) window (STA's
HunyuanVideo setting); GNA kernel (18, 24, 24), stride (16, 8, 8).
"""

from __future__ import annotations

from typing import Any

import torch

from vidsparse.families.base import (
    TINY_TEXT_DIM,
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
    tiny_dims,
    tiny_masked_prompt_kwargs,
)
from vidsparse.families.decode import ClipDecode, DecodeWindow, first_frame_pixels
from vidsparse.families.processor import SparseProcessor, project_qkv

# -- published checkpoint ------------------------------------------------------------------
# HunyuanVideoTransformer3DModel's defaults are the released HYVideo-T/2-cfgdistill checkpoint
# (20 double + 40 single blocks, 24 heads x 128), spelled out for the benchmarks.
HUNYUAN_VIDEO_T2V = dict(
    in_channels=16,
    out_channels=16,
    num_attention_heads=24,
    attention_head_dim=128,
    num_layers=20,
    num_single_layers=40,
    num_refiner_layers=2,
    mlp_ratio=4.0,
    patch_size=2,
    patch_size_t=1,
    qk_norm="rms_norm",
    guidance_embeds=True,
    text_embed_dim=4096,
    pooled_projection_dim=768,
    rope_theta=256.0,
    rope_axes_dim=(16, 56, 56),
)


# -- self-attention processor -----------------------------------------------------------------


def _hunyuan_text_mask(mask: torch.Tensor | None, batch: int, seq: int, text_len: int) -> torch.Tensor | bool | None:
    """Key validity of the text tail from the model's [B, 1, 1, S] bool mask (False: unusable)."""
    if mask is None:
        return None
    if mask.dtype != torch.bool or mask.numel() != batch * seq or mask.dim() not in (2, 4):
        return False
    return mask.reshape(batch, seq)[:, seq - text_len :]


class HunyuanSparseProcessor(SparseProcessor):
    """``HunyuanVideoAttnProcessor2_0``: joint [video; text] attention, text padding mask."""

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: torch.Tensor | None = None,
    ):
        pattern = self.state.pattern_for(self.layer)
        if pattern is None or encoder_hidden_states is None:
            return self._dense(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        from diffusers.models.embeddings import apply_rotary_emb

        text_len = encoder_hidden_states.shape[1]
        batch = hidden_states.shape[0]
        seq = hidden_states.shape[1] + text_len
        text_mask = _hunyuan_text_mask(attention_mask, batch, seq, text_len)
        if text_mask is False:
            self.state.warn_once("hunyuan-mask", "vidsparse: unexpected HunyuanVideo attention mask; running dense.")
            return self._dense(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        single = attn.add_q_proj is None  # single-stream blocks project text and video together
        if single:
            hidden_states = torch.cat([hidden_states, encoder_hidden_states], dim=1)

        query, key, value = project_qkv(attn, hidden_states)

        if image_rotary_emb is not None:
            if single:
                query = torch.cat(
                    [apply_rotary_emb(query[:, :-text_len], image_rotary_emb, sequence_dim=1), query[:, -text_len:]],
                    dim=1,
                )
                key = torch.cat(
                    [apply_rotary_emb(key[:, :-text_len], image_rotary_emb, sequence_dim=1), key[:, -text_len:]],
                    dim=1,
                )
            else:
                query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
                key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)

        if not single:
            encoder_query, encoder_key, encoder_value = project_qkv(attn, encoder_hidden_states, "text")
            query = torch.cat([query, encoder_query], dim=1)
            key = torch.cat([key, encoder_key], dim=1)
            value = torch.cat([value, encoder_value], dim=1)

        layout = self._layout(query.shape[1], text_len, "after")
        out = self.state.attend(query, key, value, layout, pattern, self.layer, text_mask)
        out = out.flatten(2, 3).to(query.dtype)

        out, encoder_out = out[:, :-text_len], out[:, -text_len:]
        if getattr(attn, "to_out", None) is not None:
            out = attn.to_out[0](out)
            out = attn.to_out[1](out)
        if getattr(attn, "to_add_out", None) is not None:
            encoder_out = attn.to_add_out(encoder_out)
        return out, encoder_out


# -- attention modules and grid ---------------------------------------------------------------


def _paths(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module, int]]:
    double = indexed_paths("transformer_blocks", "attn")(model)
    return double + indexed_paths("single_transformer_blocks", "attn", offset=len(double))(model)


# -- parallel ----------------------------------------------------------------------------------


def _parallel_refusal(model: torch.nn.Module) -> str | None:
    if model.config.get("image_condition_type") == "token_replace":
        return (
            "HunyuanVideo I2V (token_replace) modulates the first first_frame_num_tokens tokens of the sequence "
            "as the image frame, which only rank 0's clip holds"
        )
    return None


#: Cut where the video tokens are made: the patch embedding's output (so the forward builds its
#: [B, 1, 1, S_clip + S_text] padding mask from the clip length: video keys valid, text tail as the
#: prompt mask) and the RoPE tables (S, D); text is replicated on every rank. Output: proj_out.
SHARD_PLAN = ShardPlan(
    inputs={},
    outputs={"x_embedder": {0: Shard(1, 3)}, "rope": {0: Shard(0, 2), 1: Shard(0, 2)}},
    gather={"proj_out": Shard(1, 3)},
    refuse=_parallel_refusal,
)


# -- tiny models ------------------------------------------------------------------------------


def _tiny_config(image_condition_type: str | None = None) -> dict[str, Any]:
    return tiny_dims(
        num_layers=1,
        num_single_layers=1,
        num_refiner_layers=1,
        patch_size=2,
        patch_size_t=1,
        text_embed_dim=TINY_TEXT_DIM,
        pooled_projection_dim=8,
        rope_axes_dim=(2, 2, 4),
        image_condition_type=image_condition_type,
    )


def _tiny_inputs(r: TinyRequest) -> dict[str, Any]:
    cfg = r.transformer.config
    dtype = r.transformer.dtype
    return dict(
        hidden_states=r.randn(r.batch, cfg.in_channels, r.frames, r.height, r.width),
        timestep=r.timestep,
        encoder_hidden_states=r.randn(r.batch, r.text_len, r.text_dim),
        encoder_attention_mask=r.text_mask.to(dtype),
        pooled_projections=r.randn(r.batch, cfg.pooled_projection_dim),
        guidance=torch.full((r.batch,), 6000.0, dtype=dtype),
    )


def tiny_vae():
    """The smallest ``AutoencoderKLHunyuanVideo`` with the real one's interface: 4 latent channels,
    8-wide blocks, 4x time / 8x space compression like the checkpoint's (its four blocks)."""
    import diffusers

    return diffusers.AutoencoderKLHunyuanVideo(
        latent_channels=4,
        block_out_channels=(8, 8, 8, 8),
        layers_per_block=1,
        norm_num_groups=4,
        mid_block_add_attention=False,
    )


#: ``generate --model tiny-hunyuan-i2v`` / ``train-lora --model tiny-hunyuan-i2v``:
#: ``HunyuanVideoImageToVideoPipeline`` with a ``token_replace`` transformer (``tiny-hunyuan-i2v-concat``:
#: ``latent_concat``, image latents + mask on channels), its text path a tiny LLaVA (``tiny_i2v_text_stack``).
I2V_TINY = "hunyuan-i2v"
I2V_CONCAT_TINY = "hunyuan-i2v-concat"

#: Llama 3's pre-tokenizer split (its tokenizer.json): with every piece of the I2V prompt template
#: one token, the template has the token offsets the pipeline's DEFAULT_PROMPT_TEMPLATE hard-codes
#: (crop_start 103, the image token at 5, four tokens of assistant header), as the checkpoint's tokenizer.
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
LLAMA3_SPECIAL_TOKENS = (
    "<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<image>",
)  # fmt: skip


def tiny_i2v_tokenizer(model_max_length: int | None = None):
    """A Llama-3-style fast tokenizer built offline: byte-level BPE whose vocabulary holds the 256 byte
    symbols and every piece of the I2V prompt template whole (``ignore_merges``: a piece in the
    vocabulary is one token, any other text falls back to bytes), Llama 3's specials and split, and
    ``<|begin_of_text|>`` in front. So ``DEFAULT_PROMPT_TEMPLATE``'s offsets hold for it as for the
    checkpoint's: it is the pipeline's own prompt cropping that runs, at its real offsets."""
    import re

    from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video_image2video import DEFAULT_PROMPT_TEMPLATE
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    split = pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated")
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    vocab: dict[str, int] = {}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab.setdefault(ch, len(vocab))
    specials = "(" + "|".join(map(re.escape, LLAMA3_SPECIAL_TOKENS)) + ")"
    for part in re.split(specials, DEFAULT_PROMPT_TEMPLATE["template"].replace("{}", "")):
        if part and part not in LLAMA3_SPECIAL_TOKENS:
            for piece, _ in split.pre_tokenize_str(part):
                vocab.setdefault(byte_level.pre_tokenize_str(piece)[0][0], len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([split, byte_level])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in LLAMA3_SPECIAL_TOKENS])
    bos = "<|begin_of_text|>"
    tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, tok.token_to_id(bos))])
    extra = {} if model_max_length is None else {"model_max_length": model_max_length}
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=bos, eos_token="<|end_of_text|>", pad_token="<|end_of_text|>", **extra
    )


def tiny_i2v_text_stack(text_dim: int, pooled_dim: int):
    """(text_encoder, tokenizer, text_encoder_2, tokenizer_2, image_processor) of a tiny HunyuanVideo I2V pipeline.

    ``LlavaForConditionalGeneration``: a 3-layer Llama (``hidden_states[-3]`` is what the pipeline
    takes) of ``text_dim`` and a 2-layer CLIP vision tower on 336 px / patch 14, i.e. the
    checkpoint's 576 image tokens (``image_emb_len``), 8 wide; a CLIP text model of ``pooled_dim``
    (its pooled output is the transformer's ``pooled_projections``); both tokenizers
    ``tiny_i2v_tokenizer`` (CLIP's cut at 77); the image processor at the checkpoint's 336 px.
    Initialised from the caller's RNG (build it under a seeded ``fork_rng``).
    """
    from transformers import (
        CLIPImageProcessor,
        CLIPTextConfig,
        CLIPTextModel,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
    )

    tokenizer = tiny_i2v_tokenizer()
    vocab, pad = len(tokenizer), tokenizer.pad_token_id
    vision = CLIPVisionConfig(hidden_size=8, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
                              image_size=336, patch_size=14, projection_dim=8)  # fmt: skip
    llama = LlamaConfig(vocab_size=vocab, hidden_size=text_dim, intermediate_size=2 * text_dim, num_hidden_layers=3,
                        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=2048, pad_token_id=pad)  # fmt: skip
    image_token = tokenizer.convert_tokens_to_ids("<image>")
    llava = LlavaForConditionalGeneration(
        LlavaConfig(
            vision_config=vision,
            text_config=llama,
            image_token_index=image_token,
            image_seq_length=576,
            pad_token_id=pad,
        )
    ).eval()
    clip = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=vocab,
            hidden_size=pooled_dim,
            intermediate_size=2 * pooled_dim,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=77,
            projection_dim=pooled_dim,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=pad,
        )
    ).eval()
    processor = CLIPImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    return llava, tokenizer, clip, tiny_i2v_tokenizer(model_max_length=77), processor


def tiny_pipeline(seed: int = 0, dtype: torch.dtype = torch.float32, *, variant: str = "hunyuan"):
    """A tiny random-init ``diffusers.HunyuanVideoPipeline`` (no tokenizers / text encoders).

    The family's ``hunyuan`` tiny transformer, ``tiny_vae`` and the flow-matching Euler scheduler
    of hunyuanvideo-community/HunyuanVideo (shift 7). Prompts go in as hashed embeddings, a
    padding mask and a pooled embedding (``tiny_prompt_kwargs``). Served as
    ``vidsparse generate --model tiny-hunyuan``; the LoRA tests train on it.

    ``variant="hunyuan-i2v"`` / ``"hunyuan-i2v-concat"``: a ``HunyuanVideoImageToVideoPipeline``
    (``image_condition_type`` token_replace / latent_concat) whose text path is real and tiny
    (``tiny_i2v_text_stack``): the image enters the prompt embeddings through LLaVA, as in the
    checkpoint, so prompts go in as text.
    """
    import diffusers

    from vidsparse.models.tiny import tiny_transformer

    variants = ("hunyuan", I2V_TINY, I2V_CONCAT_TINY)
    if variant not in variants:
        raise ValueError(f"Unknown tiny HunyuanVideo pipeline variant {variant!r}. Expected one of {variants}.")
    with torch.random.fork_rng(devices=[]):  # seeded build; the caller's RNG stream is untouched
        torch.manual_seed(seed)
        vae = tiny_vae()
        if variant != "hunyuan":
            cfg = _tiny_config()
            text = tiny_i2v_text_stack(int(cfg["text_embed_dim"]), int(cfg["pooled_projection_dim"]))
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=7.0)
    if variant == "hunyuan":
        pipe = diffusers.HunyuanVideoPipeline(
            text_encoder=None,
            tokenizer=None,
            transformer=tiny_transformer("hunyuan", seed=seed),
            vae=vae,
            scheduler=scheduler,
            text_encoder_2=None,
            tokenizer_2=None,
        )
    else:
        concat = variant == I2V_CONCAT_TINY
        overrides = dict(image_condition_type="latent_concat", in_channels=2 * vae.config.latent_channels + 1)
        transformer = tiny_transformer("hunyuan-i2v", seed=seed, **(overrides if concat else {}))
        llava, tokenizer, clip, tokenizer_2, processor = text
        pipe = diffusers.HunyuanVideoImageToVideoPipeline(
            text_encoder=llava,
            tokenizer=tokenizer,
            transformer=transformer,
            vae=vae,
            scheduler=scheduler,
            text_encoder_2=clip,
            tokenizer_2=tokenizer_2,
            image_processor=processor,
        )
    return finish_tiny_pipeline(pipe, dtype)


def tiny_prompt_kwargs(pipe, prompt: str, negative_prompt: str = "") -> dict[str, Any]:
    """Call kwargs of a tiny HunyuanVideo pipeline: hashed ``prompt_embeds``, the padding mask as the
    tokenizer gives it (int64), ``pooled_prompt_embeds`` (the CLIP stand-in, hashed from
    "pooled: " + prompt as the LoRA adapter does), and the negative ones (used under true CFG)."""
    from vidsparse.models.tiny import encode_prompt_tiny

    cfg = pipe.transformer.config
    out = tiny_masked_prompt_kwargs(pipe, prompt, negative_prompt, int(cfg.text_embed_dim))
    device, dtype = pipe._execution_device, pipe.transformer.dtype
    for prefix, text in (("", prompt), ("negative_", negative_prompt)):
        out[f"{prefix}prompt_attention_mask"] = out[f"{prefix}prompt_attention_mask"].long()
        pooled = encode_prompt_tiny("pooled: " + text, seq_len=1, dim=int(cfg.pooled_projection_dim))[:, 0]
        out[f"{prefix}pooled_prompt_embeds"] = pooled.to(device=device, dtype=dtype)
    return out


def _lora_adapter() -> tuple[type, ...]:
    from vidsparse.lora.adapters.hunyuan import HunyuanVideoI2VModel, HunyuanVideoModel

    return HunyuanVideoModel, HunyuanVideoI2VModel


# -- per-clip VAE decode (vidsparse.parallel.vae) --------------------------------------------


def _vae_temporal_factor(vae) -> int:
    return int(vae.temporal_compression_ratio)  # 4


def _clip_window(vae, frames: int, start: int, end: int, overlap: int | None) -> DecodeWindow:
    """The temporal tiles of ``AutoencoderKLHunyuanVideo._temporal_tiled_decode`` that make the clip.

    Above ``tile_sample_min_num_frames / 4`` (4) latent frames the VAE decodes tiles of 5 latent
    frames every 3 (each an independent decoder call, so its GroupNorms see that tile only), keeps
    12 pixel frames per tile (13 for the first) and blends the first 4 with the previous tile's
    last 4. A clip's pixels need its tiles and the one before them, whatever ``overlap`` says:
    the window is always exact. One decoder call over the whole video (framewise decoding off,
    or a short video) couples every frame through GroupNorm: then every rank decodes it all.
    """
    k = _vae_temporal_factor(vae)
    tile = vae.tile_sample_min_num_frames // k
    if not vae.use_framewise_decoding or frames <= tile:
        return DecodeWindow(0, frames, 0)
    stride = vae.tile_sample_stride_num_frames // k
    kept = vae.tile_sample_stride_num_frames

    def tile_of(pixel: int) -> int:
        return max(0, (pixel - 1) // kept)

    j0, j1 = tile_of(first_frame_pixels(k, frames, start)), tile_of(first_frame_pixels(k, frames, end) - 1)
    first = stride * max(0, j0 - 1)
    last = min(frames, stride * j1 + tile + 1)
    if last - first <= tile:  # a window this short would decode untiled: start from frame 0
        first = 0
    return DecodeWindow(first, last, kept * (first // stride))


CLIP_DECODE = ClipDecode(
    vae_classes=("AutoencoderKLHunyuanVideo",),
    temporal_factor=_vae_temporal_factor,
    window=_clip_window,
    exact="always (its temporal tiles are independent decoder calls; the window holds the clip's tiles and the "
    "one before): bit-identical; framewise decoding off or <= 4 latent frames: every rank decodes the whole video",
)


FAMILY = Family(
    name="hunyuan",
    aliases=("hunyuanvideo",),
    transformer_classes=("HunyuanVideoTransformer3DModel",),
    pipeline_prefixes=("HunyuanVideo",),
    processor_names=("HunyuanVideoAttnProcessor2_0",),
    processor=HunyuanSparseProcessor,
    attention_paths=_paths,
    grid=latent_grid,
    text_len=joint_text,
    text_position="after",
    geometries=(VideoGeometry("hunyuan", 4, 8, (1, 2, 2), (129, 720, 1280), 256, "after", fps=15),),
    pattern_defaults={
        "radial": dict(decay_factor=0.95, sink=False),
        "tile": dict(tile=(2, 8, 8), window=(9, 3, 5)),
        "gna": dict(kernel_size=(18, 24, 24), stride=(16, 8, 8)),
    },
    lora_adapter=_lora_adapter,
    shard_plan=SHARD_PLAN,
    clip_decode=CLIP_DECODE,
    tiny={
        "hunyuan": TinyVariant("hunyuan", _tiny_config, _tiny_inputs),
        "hunyuan-i2v": TinyVariant("hunyuan-i2v", lambda: _tiny_config("token_replace"), _tiny_inputs),
    },
    tiny_pipeline=tiny_pipeline,
    tiny_prompt_kwargs=tiny_prompt_kwargs,
    tiny_pipelines={I2V_TINY: "HunyuanVideoImageToVideoPipeline", I2V_CONCAT_TINY: "HunyuanVideoImageToVideoPipeline"},
)
