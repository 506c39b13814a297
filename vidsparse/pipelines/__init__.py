"""diffusers integration: ``apply`` / ``remove`` sparse attention on video pipelines.

Modules: ``hooks`` (the per-transformer state and the diffusers ModelHook that fills it),
``apply`` (the entry points). What a model family is (its transformers, self-attention
processor, grid discovery, defaults) lives in ``vidsparse.families``, one module per family.
"""

from vidsparse.families import Family, family_of
from vidsparse.layout import auto_block_size
from vidsparse.pipelines.apply import (
    apply,
    as_config,
    get_state,
    is_applied,
    layer_schedule,
    remove,
    reset_state,
    transformers_of,
)
from vidsparse.pipelines.hooks import HOOK_NAME, CallInfo, SparseState, StepTracker, VidsparseHook

__all__ = [
    "HOOK_NAME",
    "CallInfo",
    "Family",
    "SparseState",
    "StepTracker",
    "VidsparseHook",
    "apply",
    "as_config",
    "auto_block_size",
    "family_of",
    "get_state",
    "is_applied",
    "layer_schedule",
    "remove",
    "reset_state",
    "transformers_of",
]
