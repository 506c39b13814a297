"""diffusers integration: ``apply`` / ``remove`` sparse attention on video pipelines.

Modules: ``families`` (supported transformers, grid discovery, defaults), ``hooks`` (the
per-transformer state and the diffusers ModelHook that fills it), ``processors`` (one
self-attention processor per family, mirroring diffusers'), ``apply`` (the entry points).
"""

from vidsparse.pipelines.apply import apply, get_state, is_applied, remove, reset_state, transformers_of
from vidsparse.pipelines.families import FAMILIES, FamilySpec, auto_block_size, default_pattern_options, family_of
from vidsparse.pipelines.hooks import HOOK_NAME, CallInfo, SparseState, StepTracker, VidsparseHook

__all__ = [
    "FAMILIES",
    "HOOK_NAME",
    "CallInfo",
    "FamilySpec",
    "SparseState",
    "StepTracker",
    "VidsparseHook",
    "apply",
    "auto_block_size",
    "default_pattern_options",
    "family_of",
    "get_state",
    "is_applied",
    "remove",
    "reset_state",
    "transformers_of",
]
