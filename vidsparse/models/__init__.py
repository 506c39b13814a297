"""Small built-in models (tiny random-init diffusers pipelines and transformers)."""

from vidsparse.models.tiny import (
    TINY_MODEL_ID,
    build_tiny_pipeline,
    encode_prompt_tiny,
    run_tiny_pipeline,
)

__all__ = ["TINY_MODEL_ID", "build_tiny_pipeline", "encode_prompt_tiny", "run_tiny_pipeline"]
