"""SkyReels-V2 (``SkyReelsV2Transformer3DModel``): Wan 2.1's architecture, video-only self-attention.

Geometry: SkyReels-V2 keeps Wan 2.1's VAE (4x time, first frame kept; 8x space) and patch
(1, 2, 2); its pipelines default to 97x544x960 at 24 fps (25x34x60 tokens).

Self-attention: ``SkyReelsV2AttnProcessor`` is diffusers' copy of ``WanAttnProcessor`` (same
fused / separate q/k/v, q/k RMS norm across heads, interleaved RoPE), so the Wan family's
processor is reused as is; ``attn2`` (text / image cross-attention) stays the model's own.

Diffusion forcing (``SkyReelsV2DiffusionForcing*Pipeline``): ``timestep`` is per latent frame
[B, F] and the transformer call gets ``enable_diffusion_forcing=True``. Steps are counted with
the per-frame rule of ``vidsparse.pipelines.hooks`` (a step moves when no frame got noisier and
one got less noisy), so asynchronous schedules where the most-noisy frame stays at 999 for many
iterations still advance; the step count is the pipeline's ``num_timesteps`` (the rows of its
timestep matrix, more than the scheduler's steps when ``ar_step > 0``). With
``causal_block_size > 1`` the model passes a block-causal frame mask to every self-attention:
sparse patterns do not compose with that mask yet, so those calls run the model's own dense
attention and warn once.

Parallel: Wan's shard plan for text-to-video and image-to-video; diffusion-forcing calls are
refused at the forward (``ShardPlan.refuse_call``: per-token modulation built inside the forward).

LoRA: ``SkyReelsV2Pipeline`` and ``SkyReelsV2ImageToVideoPipeline`` call the transformer exactly as
Wan 2.1's T2V / I2V pipelines do (one timestep per clip; I2V's mask + image-latent channels and CLIP
context), so the Wan adapters train them; the diffusion-forcing pipelines are refused.

Defaults: Wan's (SkyReels-V2 is a Wan 2.1 fine-tune): Radial decay 0.2 with a sink and layer 0
dense, Tile (2, 8, 8) in a (5, 3, 3) window, GNA kernel (9, 25, 25).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from vidsparse.families.base import (
    Family,
    TinyRequest,
    TinyVariant,
    VideoGeometry,
    finish_tiny_pipeline,
    indexed_paths,
    latent_grid,
    no_text,
)
from vidsparse.families.wan import FAMILY as WAN
from vidsparse.families.wan import (
    WanSparseProcessor,
    tiny_i2v_config,
    tiny_i2v_inputs,
    tiny_image_encoder,
    tiny_inputs,
    tiny_transformer_kwargs,
    tiny_vae,
)
from vidsparse.families.wan import tiny_prompt_kwargs as wan_tiny_prompt_kwargs

# -- self-attention processor -----------------------------------------------------------------


class SkyReelsSparseProcessor(WanSparseProcessor):
    """``SkyReelsV2AttnProcessor`` for ``attn1``: Wan's mirror, plus one warning when the
    diffusion-forcing block-causal mask makes a sparse call fall back to dense attention."""

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        if (
            attention_mask is not None
            and encoder_hidden_states is None
            and self.state.pattern_for(self.layer) is not None
        ):
            self.state.warn_once(
                "skyreels-causal",
                "vidsparse: SkyReels-V2 diffusion forcing with causal_block_size > 1 passes a block-causal "
                "frame mask to self-attention; sparse patterns do not compose with it, so these calls run "
                "the model's own dense attention (use causal_block_size=1 for sparse attention).",
            )
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)


# -- parallel ---------------------------------------------------------------------------------


def _refuse_diffusion_forcing(model: torch.nn.Module, kwargs: dict[str, Any]) -> str | None:
    if kwargs.get("enable_diffusion_forcing"):
        return (
            "SkyReels-V2 diffusion forcing (enable_diffusion_forcing=True) builds per-token modulation "
            "[B, 6, S, D] inside the forward, hands it whole to every block and applies a per-token shift / scale "
            "before proj_out (with causal_block_size > 1 also a block-causal [S, S] mask), none of which the "
            "shard plan can cut at a module boundary; text-to-video and image-to-video run in parallel"
        )
    return None


#: Wan's plan (SkyReels-V2 is Wan 2.1's architecture: RoPE (cos, sin) [1, S, 1, D], ``blocks.0``
#: input, ``proj_out`` gathered); diffusion-forcing calls refused.
SHARD_PLAN = replace(WAN.require_shard_plan(), refuse_call=_refuse_diffusion_forcing)


# -- tiny models ------------------------------------------------------------------------------


def _tiny_config() -> dict[str, Any]:
    return tiny_transformer_kwargs()


def _tiny_df_config(inject_sample_info: bool = False) -> dict[str, Any]:
    """The diffusion-forcing tiny model; ``inject_sample_info`` (the fps embedding) only in the
    tiny pipeline: diffusers broadcasts it under diffusion forcing for batch 1 only."""
    return tiny_transformer_kwargs(inject_sample_info=inject_sample_info)


def _tiny_df_inputs(r: TinyRequest) -> dict[str, Any]:
    """Diffusion forcing: every latent frame its own timestep (later frames noisier)."""
    inputs = tiny_inputs(r)
    ramp = torch.linspace(0.5, 1.0, r.frames, dtype=r.timestep.dtype)
    inputs["timestep"] = (r.timestep[:, None] * ramp[None]).to(r.timestep.dtype)
    inputs["enable_diffusion_forcing"] = True
    if r.transformer.config.inject_sample_info:
        inputs["fps"] = [1] * r.batch  # the pipeline's fps code: 0 for 16 fps, 1 otherwise
    return inputs


#: ``generate --model tiny-skyreels-v2-i2v`` / ``train-lora --model tiny-skyreels-v2-i2v``.
I2V_TINY = "skyreels-v2-i2v"


def tiny_pipeline(
    seed: int = 0, dtype: torch.dtype = torch.float32, *, diffusion_forcing: bool = False, variant: str = "skyreels-v2"
):
    """A tiny random-init ``SkyReelsV2Pipeline`` (``diffusion_forcing=True``:
    ``SkyReelsV2DiffusionForcingPipeline``; ``variant="skyreels-v2-i2v"``:
    ``SkyReelsV2ImageToVideoPipeline`` with Wan 2.1 I2V's tiny transformer layout and CLIP tower),
    no tokenizer / text encoder: pass ``prompt=None`` and ``prompt_embeds``
    (``vidsparse.models.tiny.encode_prompt_tiny``; I2V: 512 tokens, ``wan.tiny_prompt_kwargs``)."""
    from diffusers import (
        SkyReelsV2DiffusionForcingPipeline,
        SkyReelsV2ImageToVideoPipeline,
        SkyReelsV2Pipeline,
        SkyReelsV2Transformer3DModel,
        UniPCMultistepScheduler,
    )

    if variant not in ("skyreels-v2", I2V_TINY):
        raise ValueError(
            f"Unknown tiny SkyReels-V2 pipeline variant {variant!r}. Expected 'skyreels-v2' or {I2V_TINY!r}."
        )
    i2v = variant == I2V_TINY
    if i2v and diffusion_forcing:
        raise ValueError(f"variant {I2V_TINY!r} builds SkyReelsV2ImageToVideoPipeline, not diffusion forcing.")
    with torch.random.fork_rng(devices=[]):  # seeded build; the caller's RNG stream is untouched
        torch.manual_seed(seed)
        if i2v:
            config = tiny_i2v_config()
        else:
            config = _tiny_df_config(inject_sample_info=True) if diffusion_forcing else _tiny_config()
        transformer = SkyReelsV2Transformer3DModel(**config)
        vae = tiny_vae()
        image_parts = dict(zip(("image_encoder", "image_processor"), tiny_image_encoder())) if i2v else {}
    # SkyReels-V2's scheduler: UniPC on flow-matching sigmas.
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=8.0)
    if i2v:
        cls = SkyReelsV2ImageToVideoPipeline
    else:
        cls = SkyReelsV2DiffusionForcingPipeline if diffusion_forcing else SkyReelsV2Pipeline
    pipe = cls(tokenizer=None, text_encoder=None, transformer=transformer, vae=vae, scheduler=scheduler,
               **image_parts)  # fmt: skip
    return finish_tiny_pipeline(pipe, dtype)


def _lora_adapter() -> tuple[type, ...]:
    from vidsparse.lora.adapters.wan import SkyReelsModel
    from vidsparse.lora.adapters.wan_i2v import SkyReelsI2VModel

    return SkyReelsModel, SkyReelsI2VModel


_DF_REFUSAL = (
    "diffusion forcing is not trained: its pipelines give every latent frame its own timestep "
    "(enable_diffusion_forcing, [B, F] timesteps, causal_block_size / ar_step schedules, fps embedding), "
    "while train-lora draws one noise level per clip; train SkyReelsV2Pipeline (text-to-video) or "
    "SkyReelsV2ImageToVideoPipeline instead"
)


# -- the record -------------------------------------------------------------------------------

FAMILY = Family(
    name="skyreels-v2",
    aliases=("skyreels", "skyreelsv2"),
    transformer_classes=("SkyReelsV2Transformer3DModel",),
    pipeline_prefixes=("SkyReelsV2",),
    processor_names=("SkyReelsV2AttnProcessor",),
    processor=SkyReelsSparseProcessor,
    attention_paths=indexed_paths("blocks", "attn1"),
    grid=latent_grid,
    text_len=no_text,
    text_position="none",
    geometries=(VideoGeometry("skyreels-v2", 4, 8, (1, 2, 2), (97, 544, 960), fps=24),),
    **WAN.sparse_settings(),  # Wan's attention, so Wan's pattern defaults and dense schedule
    lora_adapter=_lora_adapter,
    lora_refusals={
        name: _DF_REFUSAL
        for name in (
            "SkyReelsV2DiffusionForcingPipeline",
            "SkyReelsV2DiffusionForcingImageToVideoPipeline",
            "SkyReelsV2DiffusionForcingVideoToVideoPipeline",
        )
    },
    shard_plan=SHARD_PLAN,
    # Wan's blocks, so Wan's kernel order; a diffusion-forcing forward (refused by the shard plan:
    # per-token modulation built inside the forward) keeps caller order.
    kernel_order=True,
    tiny={
        "skyreels-v2": TinyVariant("skyreels-v2", _tiny_config, tiny_inputs),
        "skyreels-v2-df": TinyVariant("skyreels-v2-df", _tiny_df_config, _tiny_df_inputs),
        "skyreels-v2-i2v": TinyVariant("skyreels-v2-i2v", tiny_i2v_config, tiny_i2v_inputs),
    },
    tiny_pipeline=tiny_pipeline,
    tiny_prompt_kwargs=wan_tiny_prompt_kwargs,
    tiny_pipelines={I2V_TINY: "SkyReelsV2ImageToVideoPipeline"},
)
