"""Small built-in models: the trained tiny Wan pipeline of a synthetic world (``tiny_trained``,
``synthetic_world``, ``train_tiny``) and tiny random-init diffusers pipelines and transformers (``tiny``)."""

from vidsparse.models.tiny import (
    TINY_FAMILIES,
    TINY_MODEL_ID,
    TINY_TEXT_DIM,
    TINY_TEXT_LEN,
    build_tiny_pipeline,
    encode_prompt_tiny,
    run_tiny_pipeline,
    tiny_config,
    tiny_inputs,
    tiny_transformer,
    tiny_variants,
)

__all__ = [
    "TINY_FAMILIES",
    "TINY_MODEL_ID",
    "TINY_TEXT_DIM",
    "TINY_TEXT_LEN",
    "build_tiny_pipeline",
    "encode_prompt_tiny",
    "run_tiny_pipeline",
    "tiny_config",
    "tiny_inputs",
    "tiny_transformer",
    "tiny_variants",
]
