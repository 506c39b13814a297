"""FreeSwim: training-free high-resolution Wan video (inward window + dual path + two stages).

- ``vidsparse.FreeSwim`` (``vidsparse.patterns.freeswim``): the inward window pattern;
- ``DualPathConfig``, ``apply_dual_path`` / ``remove_dual_path``: the window branch, the full
  branch and the cross-attention override (and its cache) on a Wan transformer;
- ``FreeSwimOptions``, ``run_freeswim``: the two-stage run on a diffusers Wan pipeline;
- ``cost``: block counts and attention work per step (the benchmark's model).

See docs/freeswim.md.
"""

from vidsparse.freeswim.cache import CacheReport, CrossAttentionCache, cache_bytes
from vidsparse.freeswim.config import DualPathConfig, freeswim_scale_factor
from vidsparse.freeswim.dual_path import (
    DualPathReport,
    DualPathState,
    apply_dual_path,
    get_dual_state,
    remove_dual_path,
    reset_dual_path,
)
from vidsparse.freeswim.two_stage import (
    FreeSwimOptions,
    FreeSwimPlan,
    FreeSwimResult,
    StageProgress,
    StageSummary,
    check_freeswim,
    check_freeswim_sizes,
    native_size,
    native_size_of_config,
    run_freeswim,
    scheduler_with_shift,
    upsample_frames,
)

__all__ = [
    "CacheReport",
    "FreeSwimOptions",
    "FreeSwimPlan",
    "FreeSwimResult",
    "StageProgress",
    "StageSummary",
    "check_freeswim",
    "check_freeswim_sizes",
    "native_size",
    "native_size_of_config",
    "run_freeswim",
    "scheduler_with_shift",
    "upsample_frames",
    "CrossAttentionCache",
    "DualPathConfig",
    "DualPathReport",
    "DualPathState",
    "apply_dual_path",
    "cache_bytes",
    "freeswim_scale_factor",
    "get_dual_state",
    "remove_dual_path",
    "reset_dual_path",
]
