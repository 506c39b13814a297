"""Tiny random-init Wan, HunyuanVideo and CogVideoX pipelines for the composition tests.

Real diffusers pipeline classes with the families' tiny transformers; no text encoders (prompts
are passed as embeddings) and no VAE (``output_type="latent"``), so a call runs in well under a
second on CPU while exercising the pipeline's own loop: cache contexts, CFG, the scheduler and
``maybe_free_model_hooks`` (which re-installs ``enable_model_cpu_offload``'s hooks).
"""

from __future__ import annotations

from typing import Any

import torch

from vidsparse.families.base import TINY_TEXT_DIM, TINY_TEXT_LEN
from vidsparse.models import build_tiny_pipeline, encode_prompt_tiny, tiny_transformer

FAMILIES = ("wan", "hunyuan", "cogvideox")


def tiny_pipeline(family: str, seed: int = 0):
    if family == "wan":
        return build_tiny_pipeline(seed=seed)
    from diffusers import (
        CogVideoXDDIMScheduler,
        CogVideoXPipeline,
        FlowMatchEulerDiscreteScheduler,
        HunyuanVideoPipeline,
    )

    transformer = tiny_transformer(family, seed=seed)
    if family == "hunyuan":
        pipe = HunyuanVideoPipeline(
            text_encoder=None,
            tokenizer=None,
            transformer=transformer,
            vae=None,
            scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
            text_encoder_2=None,
            tokenizer_2=None,
        )
    elif family == "cogvideox":
        pipe = CogVideoXPipeline(
            tokenizer=None, text_encoder=None, vae=None, transformer=transformer, scheduler=CogVideoXDDIMScheduler()
        )
    else:
        raise ValueError(f"no tiny pipeline for {family!r}; expected one of {FAMILIES}")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def call_kwargs(family: str, steps: int = 2, seed: int = 0) -> dict[str, Any]:
    """Arguments of one tiny call: embeddings instead of prompts, latents out."""
    emb = encode_prompt_tiny("a tiny cat", seq_len=TINY_TEXT_LEN, dim=TINY_TEXT_DIM)
    neg = encode_prompt_tiny("", seq_len=TINY_TEXT_LEN, dim=TINY_TEXT_DIM)
    kw: dict[str, Any] = dict(
        num_inference_steps=steps,
        generator=torch.Generator().manual_seed(seed),
        output_type="latent",
        return_dict=False,
    )
    if family == "wan":
        kw.update(prompt_embeds=emb, negative_prompt_embeds=neg, num_frames=9, height=32, width=32, guidance_scale=5.0)
    elif family == "hunyuan":
        kw.update(
            prompt_embeds=emb,
            pooled_prompt_embeds=torch.randn(1, 8, generator=torch.Generator().manual_seed(1)),
            prompt_attention_mask=torch.ones(1, TINY_TEXT_LEN, dtype=torch.long),
            num_frames=9,
            height=32,
            width=32,
        )
    else:
        kw.update(
            prompt_embeds=emb,
            negative_prompt_embeds=neg,
            num_frames=9,
            height=32,
            width=32,
            guidance_scale=5.0,
            use_dynamic_cfg=False,
        )
    return kw


def run(pipe, family: str, steps: int = 2, seed: int = 0) -> torch.Tensor:
    return pipe(**call_kwargs(family, steps, seed))[0]
