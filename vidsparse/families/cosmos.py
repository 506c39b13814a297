"""NVIDIA Cosmos (``CosmosTransformer3DModel``): Cosmos-Predict2 / 2.5 video2world, and Cosmos 1.0.

Pipelines (diffusers 0.42): ``Cosmos2VideoToWorldPipeline`` (Predict2), ``Cosmos2_5_PredictBasePipeline``
(Predict2.5: text2world, image2world and video2world in one) and ``Cosmos2_5_TransferPipeline``, all
with the Wan 2.1 VAE (``AutoencoderKLWan``: 4x in time, first frame kept, 8x in space); Cosmos 1.0's
``CosmosTextToWorldPipeline`` / ``CosmosVideoToWorldPipeline`` use the Cosmos tokenizer
(``AutoencoderKLCosmos`` CV8x8x8: 8x in time and space). The transformer patchifies (1, 2, 2), so the
Predict2 / 2.5 reference video 93x704x1280 is a 24x44x80 token grid (84 480 tokens); Cosmos 1.0's
121x704x1280 is 16x44x80. The two are told apart by the transformer config: Cosmos 1.0 checkpoints
have the learnable position embedding (``extra_pos_embed_type="learnable"``), Predict2 / 2.5 none.

Self-attention: every block's ``attn1`` runs ``CosmosAttnProcessor2_0`` on video tokens only (text
and, in Transfer 2.5, image context go through ``attn2``, left alone). The sparse processor mirrors
it: q/k/v projections, per-head RMS norm on [B, H, S, D], Cosmos' real-valued 3-D RoPE
(``apply_rotary_emb(use_real=True, use_real_unbind_dim=-2)``), its (no-op for self-attention) GQA
repeat, then ``to_out``. Calls with an encoder context or an attention mask run the original.

Conditioning: video2world feeds the conditioning latent frames in the same token grid (marked by
the ``condition_mask`` channel, with their own per-frame timestep [B, 1, T, 1, 1]); they are
ordinary video tokens to self-attention, so the grid is the latent grid, and the step index reads
the largest per-frame timestep (the generated frames'). ``padding_mask`` is a concatenated input
channel, not an attention mask.

Defaults, fitted to the 24x44x80 grid:

- GNA: a layer setting of Cosmos-Predict2's own NATTEN integration (``nvidia-cosmos/cosmos-predict2``):
  window (full time, 20, 40), stride (1, 4, 8) at its 720p base grid 44x80 (23 % of the pairs), and,
  as there, window and stride scaled to the call's grid (rounded; window >= 2 and >= stride).
- Tile: tiles (2, 4, 16) = 128 tokens (one kernel block) divide 24x44x80 exactly (STA's (2, 8, 8)
  would pad 44 rows to 48); window (5, 5, 3) tiles = 10 frames x 20 rows x 48 columns, 11 % of the
  pairs, in STA's 10-20 % range.
- Radial: the paper's base setting (decay 1.0, no attention sink; it publishes no Cosmos tuning).

LoRA (``vidsparse.lora.adapters.cosmos``): Predict2 video2world and Predict2.5 train their flow
velocity with the conditioning frames held as their pipelines hold them; Transfer2.5, text-to-image and
Cosmos 1.0 are refused (``LORA_REFUSALS``: why, and what to train instead). ``--parallel clip|ulysses`` cuts the video tokens and the
per-token embeddings every block takes (``SHARD_PLAN``).

Tiny model: a 2-layer, 2-head random-init transformer with a 4-channel Wan VAE. It leaves out the
``padding_mask`` channel (``concat_padding_mask=False``): diffusers resizes that channel with
torchvision, which vidsparse does not depend on, and every Cosmos pipeline passes an all-zero mask.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
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
    bcfhw_grid,
    finish_tiny_pipeline,
    indexed_paths,
    no_text,
)
from vidsparse.families.processor import SparseProcessor
from vidsparse.layout import VideoLayout

#: The tiny Predict2 video2world pipeline's name (``--model tiny-cosmos2-video2world``; ``tiny-cosmos`` is Predict2.5).
PREDICT2_TINY = "cosmos2-video2world"

_TRAIN_INSTEAD = (
    "train Cosmos2VideoToWorldPipeline (Predict2 video2world) or Cosmos2_5_PredictBasePipeline (Predict2.5 "
    "text/image/video2world), or post-train with NVIDIA's cosmos-predict2 / cosmos-predict2.5 scripts"
)
#: Why train-lora refuses the Cosmos pipelines it has no adapter for (``vidsparse.lora.adapters.cosmos``
#: trains Predict2 video2world and Predict2.5).
LORA_REFUSALS = {
    "Cosmos2_5_TransferPipeline": (
        "Transfer2.5 adds a ControlNet (CosmosControlNetModel) whose residuals from control videos (edge, depth, "
        "segmentation, blur) enter every block; a LoRA of the base transformer trained without those residuals "
        f"is not what Transfer samples, and train-lora builds no control inputs; {_TRAIN_INSTEAD}"
    ),
    "Cosmos2TextToImagePipeline": (
        "it generates single images (one latent frame): there is no video length to extend; " + _TRAIN_INSTEAD
    ),
    "CosmosTextToWorldPipeline": (
        "Cosmos 1.0 is an EDM model on EDMEulerScheduler (its scheduler preconditions input and output, "
        "x0 = c_skip x + c_out F with EDM's c_skip, c_out and c_noise) with the Cosmos tokenizer "
        f"(AutoencoderKLCosmos), an objective train-lora does not implement; {_TRAIN_INSTEAD}"
    ),
    "CosmosVideoToWorldPipeline": (
        "Cosmos 1.0 video2world is EDM on EDMEulerScheduler (x0 = c_skip x + c_out F with EDM's coefficients) and "
        "re-noises its conditioning frames with an augmentation sigma, an objective train-lora does not "
        f"implement; {_TRAIN_INSTEAD}"
    ),
}

#: Where the sequence is cut: the video tokens at the first block's input, RoPE (cos, sin) [S, D]
#: where ``rope`` returns them, and what the forward builds per token and hands whole to every block
#: and to ``norm_out``: the timestep embeddings ``temb`` / ``embedded_timestep`` [B, S, C] of a
#: per-frame timestep (video2world's conditioning frames), Cosmos 1.0's learnable position embedding
#: ``extra_pos_emb`` [B, S, D] and Transfer's ``controlnet_residual`` [B, S, D]; ``proj_out`` is
#: gathered. A per-sample timestep (embeddings [B, C]) is left whole.
SHARD_PLAN = ShardPlan(
    inputs={
        "transformer_blocks.0": {"hidden_states": Shard(1, 3)},
        "transformer_blocks.*": {
            "embedded_timestep": Shard(1, 3),
            "temb": Shard(1, 3),
            "extra_pos_emb": Shard(1, 3),
            "controlnet_residual": Shard(1, 3),
        },
        "norm_out": {"embedded_timestep": Shard(1, 3), "temb": Shard(1, 3)},
    },
    outputs={"rope": {0: Shard(0, 2), 1: Shard(0, 2)}},
    gather={"proj_out": Shard(1, 3)},
)

# -- self-attention processor -----------------------------------------------------------------


class CosmosSparseProcessor(SparseProcessor):
    """``CosmosAttnProcessor2_0`` for self-attention (``attn1``): video tokens only."""

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        pattern = self.state.pattern_for(self.layer)
        if pattern is None or encoder_hidden_states is not None or attention_mask is not None:
            return self._dense_any_order(
                attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb, 0
            )
        query = attn.to_q(hidden_states).unflatten(2, (attn.heads, -1)).transpose(1, 2)
        key = attn.to_k(hidden_states).unflatten(2, (attn.heads, -1)).transpose(1, 2)
        value = attn.to_v(hidden_states).unflatten(2, (attn.heads, -1)).transpose(1, 2)
        query = attn.norm_q(query)
        key = attn.norm_k(key)
        if image_rotary_emb is not None:
            from diffusers.models.embeddings import apply_rotary_emb

            query = apply_rotary_emb(query, image_rotary_emb, use_real=True, use_real_unbind_dim=-2)
            key = apply_rotary_emb(key, image_rotary_emb, use_real=True, use_real_unbind_dim=-2)
        # The model's GQA step repeats along dim 3; q, k and v share one width here, so it is the identity.
        key = key.repeat_interleave(query.size(3) // key.size(3), dim=3)
        value = value.repeat_interleave(query.size(3) // value.size(3), dim=3)
        query, key, value = (t.transpose(1, 2) for t in (query, key, value))  # [B, S, H, D]
        layout = self._layout(query.shape[1], 0, "none")
        out = self.state.attend(query, key, value, layout, pattern, self.layer, None)
        out = out.flatten(2, 3).type_as(query)
        out = attn.to_out[0](out)
        return attn.to_out[1](out)


# -- grid discovery ---------------------------------------------------------------------------


def _grid(model: torch.nn.Module, kwargs: dict[str, Any]):
    """Latents [B, C, F, H, W] (before the condition / padding mask channels) patchified by
    ``config.patch_size``; ``None`` (dense, with a warning) for anything else."""
    hidden_states = kwargs.get("hidden_states")
    if not isinstance(hidden_states, torch.Tensor) or hidden_states.dim() != 5:
        return None
    return bcfhw_grid(*model.config.patch_size, hidden_states)


def _geometry_variant(transformer_config: Mapping[str, Any]) -> str:
    """Cosmos 1.0 checkpoints carry the learnable position embedding (diffusers' default); 2.x none."""
    return "cosmos1" if transformer_config.get("extra_pos_embed_type", "learnable") == "learnable" else "cosmos"


# -- pattern defaults -------------------------------------------------------------------------

#: Cosmos-Predict2's NATTEN base grid (720p rows, columns) and one of its layer windows / strides.
_NATTEN_BASE = (44, 80)
_NATTEN_WINDOW = (20, 40)
_NATTEN_STRIDE = (4, 8)


def _gna(layout: VideoLayout, two_stage: bool) -> dict[str, Any]:
    """Window and stride scaled from the 44x80 base grid to this grid, as Cosmos-Predict2 does."""
    kernel, stride = [-1], [1]
    for n, base, w, s in zip(layout.grid[1:], _NATTEN_BASE, _NATTEN_WINDOW, _NATTEN_STRIDE):
        ks = max(1, round(s * n / base))
        kw = max(2, ks, round(w * n / base))
        kernel.append(kw)
        stride.append(min(ks, kw))
    return dict(kernel_size=tuple(kernel), stride=tuple(stride))


# -- tiny models ------------------------------------------------------------------------------


def tiny_transformer_kwargs(**overrides: Any) -> dict[str, Any]:
    """Constructor kwargs of the tiny video2world ``CosmosTransformer3DModel`` (2 layers, 2 heads).

    Head dim 16: Cosmos' RoPE gives h and w ``head_dim // 6 * 2`` channels each and divides by that
    minus 2, so 16 (h, w 4 and t 8) is the smallest even-split width. ``in_channels`` counts the
    condition-mask channel the video2world pipelines concatenate.
    """
    kw: dict[str, Any] = dict(
        in_channels=TINY_LATENT_CHANNELS + 1,
        out_channels=TINY_LATENT_CHANNELS,
        num_attention_heads=TINY_HEADS,
        attention_head_dim=16,
        num_layers=2,
        mlp_ratio=2.0,
        text_embed_dim=TINY_TEXT_DIM,
        adaln_lora_dim=8,
        max_size=(128, 240, 240),
        patch_size=(1, 2, 2),
        rope_scale=(1.0, 3.0, 3.0),
        concat_padding_mask=False,
        extra_pos_embed_type=None,
    )
    kw.update(overrides)
    return kw


def _tiny_inputs(r: TinyRequest) -> dict[str, Any]:
    """A video2world call: the first latent frame is a conditioning frame (mask 1, timestep ~0)."""
    cfg = r.transformer.config
    channels = cfg.out_channels
    latents = r.randn(r.batch, channels, r.frames, r.height, r.width)
    cond = torch.zeros(r.batch, 1, r.frames, r.height, r.width, dtype=latents.dtype)
    cond[:, :, :1] = 1.0
    t = (r.timestep.to(latents.dtype) / 1000.0).view(r.batch, 1, 1, 1, 1).expand(-1, 1, r.frames, 1, 1).clone()
    t[:, :, :1] = 1e-4
    inputs: dict[str, Any] = dict(
        hidden_states=latents,
        timestep=t,
        encoder_hidden_states=r.randn(r.batch, r.text_len, r.text_dim),
        fps=16,
        padding_mask=torch.zeros(1, 1, r.height * 8, r.width * 8, dtype=latents.dtype),
    )
    if cfg.in_channels > channels:
        inputs["condition_mask"] = cond
    return inputs


class TinySafetyChecker(torch.nn.Module):
    """Pass-through stand-in for ``cosmos_guardrail.CosmosSafetyChecker`` in the tiny pipelines.

    The Cosmos pipelines refuse to run without a safety checker, which NVIDIA's Open Model License
    requires for *its* checkpoints; the tiny pipelines hold random weights, not NVIDIA's, and the
    Guardrail is a multi-gigabyte download. Real checkpoints keep their own checker: vidsparse never
    touches it.
    """

    def __init__(self) -> None:
        super().__init__()
        # Pipelines read ``.device`` / ``.dtype`` of every module component.
        self.register_buffer("_device_tracker", torch.zeros(1), persistent=False)

    @property
    def device(self) -> torch.device:
        return self._device_tracker.device

    @property
    def dtype(self) -> torch.dtype:
        return self._device_tracker.dtype

    def check_text_safety(self, prompt: str) -> bool:
        return True

    def check_video_safety(self, frames: np.ndarray) -> np.ndarray:
        return frames


def tiny_pipeline(
    seed: int = 0, dtype: torch.dtype = torch.float32, *, version: str = "2.5", variant: str | None = None
):
    """A tiny random-init Cosmos video2world pipeline (no tokenizer / text encoder).

    ``version="2.5"`` (default) builds ``Cosmos2_5_PredictBasePipeline`` (text2world without a
    ``video``, video2world with one) and its UniPC flow scheduler; ``"2"`` builds
    ``Cosmos2VideoToWorldPipeline`` (Predict2: needs an ``image`` or ``video``) with its Karras-sigma
    flow-matching Euler scheduler (``variant=PREDICT2_TINY``, ``--model tiny-cosmos2-video2world``, is
    ``version="2"``). Prompts are passed as ``prompt_embeds`` /
    ``negative_prompt_embeds`` [B, L, 16] (``vidsparse.models.tiny.encode_prompt_tiny``).
    """
    import diffusers

    from vidsparse.families.wan import tiny_vae

    if variant is not None:
        if variant != PREDICT2_TINY:
            raise ValueError(f"tiny Cosmos pipeline variant must be {PREDICT2_TINY!r} or none, got {variant!r}.")
        version = "2"
    if version not in ("2", "2.5"):
        raise ValueError(f"tiny Cosmos pipeline version must be '2' (Predict2) or '2.5' (Predict2.5), got {version!r}.")
    with torch.random.fork_rng(devices=[]):  # seeded build; the caller's RNG stream is untouched
        torch.manual_seed(seed)
        transformer = diffusers.CosmosTransformer3DModel(**tiny_transformer_kwargs())
        vae = tiny_vae()
    transformer.eval()
    if version == "2.5":
        scheduler = diffusers.UniPCMultistepScheduler(
            use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=5.0
        )
        pipe = diffusers.Cosmos2_5_PredictBasePipeline(
            text_encoder=None,
            tokenizer=None,
            transformer=transformer,
            vae=vae,
            scheduler=scheduler,
            safety_checker=TinySafetyChecker(),
        )
    else:
        pipe = diffusers.Cosmos2VideoToWorldPipeline(
            text_encoder=None,
            tokenizer=None,
            transformer=transformer,
            vae=vae,
            scheduler=diffusers.FlowMatchEulerDiscreteScheduler(use_karras_sigmas=True),
            safety_checker=TinySafetyChecker(),
        )
    return finish_tiny_pipeline(pipe, dtype)


def tiny_prompt_kwargs(pipe, prompt: str, negative_prompt: str = "", *, batch: int = 1, text_len: int = 8):
    """Pipeline kwargs carrying hashed prompt embeddings (``encode_prompt_tiny``) for a tiny Cosmos
    pipeline: ``prompt_embeds`` / ``negative_prompt_embeds`` [batch, text_len, text_embed_dim]."""
    from vidsparse.models.tiny import encode_prompt_tiny

    cfg = pipe.transformer.config
    emb = dict(seq_len=text_len, dim=cfg.text_embed_dim, batch=batch, device=pipe._execution_device)
    dtype = pipe.transformer.dtype
    return dict(
        prompt_embeds=encode_prompt_tiny(prompt, dtype=dtype, **emb),
        negative_prompt_embeds=encode_prompt_tiny(negative_prompt, dtype=dtype, **emb),
    )


#: The Cosmos pipelines of diffusers 0.42.
PIPELINES = (
    "Cosmos2VideoToWorldPipeline",
    "Cosmos2_5_PredictBasePipeline",
    "Cosmos2_5_TransferPipeline",
    "Cosmos2TextToImagePipeline",
    "CosmosTextToWorldPipeline",
    "CosmosVideoToWorldPipeline",
)


def _lora_adapter() -> tuple[type, ...]:
    """Predict2 video2world and Predict2.5 (``vidsparse.lora.adapters.cosmos``: their pipelines' own inputs)."""
    from vidsparse.lora.adapters.cosmos import CosmosPredict2Model, CosmosPredict25Model

    return CosmosPredict25Model, CosmosPredict2Model


# -- the record -------------------------------------------------------------------------------


def predict2_condition_video(frames: list) -> dict[str, Any]:
    """Cosmos-Predict2 video2world: every given frame conditions the clip (``video=``), as the first frames."""
    return {"video": frames}


def predict2_5_condition_video(frames: list) -> dict[str, Any]:
    """Cosmos-Predict2.5: it conditions on the video's last ``4 (k - 1) + 1`` frames for k latent frames,
    k = 2 (5 frames, its default) when the video has them, else 1 (its last frame)."""
    return {"video": frames, "num_latent_conditional_frames": 2 if len(frames) >= 5 else 1}


FAMILY = Family(
    name="cosmos",
    aliases=("cosmos2", "cosmos2.5", "cosmos-predict2", "cosmos-predict2.5"),
    transformer_classes=("CosmosTransformer3DModel",),
    # Not "Cosmos": Cosmos3Omni* pipelines hold another transformer (Cosmos3OmniTransformer). The first
    # prefix + "Pipeline" is the class of the default tiny pipeline (tiny-cosmos: Predict2.5).
    pipeline_prefixes=("Cosmos2_5_PredictBase", "Cosmos2", "CosmosTextToWorld", "CosmosVideoToWorld"),
    processor_names=("CosmosAttnProcessor2_0",),
    processor=CosmosSparseProcessor,
    attention_paths=indexed_paths("transformer_blocks", "attn1"),
    grid=_grid,
    text_len=no_text,
    text_position="none",
    geometries=(
        VideoGeometry("cosmos", 4, 8, (1, 2, 2), (93, 704, 1280), fps=16, aliases=("cosmos-predict2",)),
        VideoGeometry("cosmos1", 8, 8, (1, 2, 2), (121, 704, 1280), fps=30, aliases=("cosmos1.0",)),
    ),
    geometry_variant=_geometry_variant,
    pattern_defaults={
        "radial": dict(decay_factor=1.0, sink=False),
        "tile": dict(tile=(2, 4, 16), window=(5, 5, 3)),
        "gna": _gna,
    },
    dense_first_steps=0.25,
    lora_adapter=_lora_adapter,
    condition_video={
        "Cosmos2VideoToWorldPipeline": predict2_condition_video,
        "Cosmos2_5_PredictBasePipeline": predict2_5_condition_video,
    },
    needs_first_frame=("Cosmos2VideoToWorldPipeline", "CosmosVideoToWorldPipeline"),
    lora_refusals=LORA_REFUSALS,
    shard_plan=SHARD_PLAN,
    # Between the cut points a Cosmos block is per token but for attn1 (adaLN from the cut
    # timestep embeddings, the text cross-attention's queries, FFN, the cut position embedding
    # and control residuals): a sparse forward runs in the plans' kernel order there.
    kernel_order=True,
    tiny={"cosmos": TinyVariant("cosmos", tiny_transformer_kwargs, _tiny_inputs)},
    tiny_pipeline=tiny_pipeline,
    tiny_pipelines={PREDICT2_TINY: "Cosmos2VideoToWorldPipeline"},
    tiny_prompt_kwargs=tiny_prompt_kwargs,
)
