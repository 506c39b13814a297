"""FreeSwim: training-free high-resolution Wan video (inward window + dual path + two stages).

- ``vidsparse.FreeSwim`` (``vidsparse.patterns.freeswim``): the inward window pattern;
- ``DualPathConfig``, ``apply_dual_path`` / ``remove_dual_path``: the window branch, the full
  branch and the cross-attention override (and its cache) on a Wan transformer;
- ``FreeSwimOptions``, ``run_freeswim``: the two-stage run on a diffusers Wan pipeline;
- ``cost``: block counts and attention work per step (the benchmark's model).

See docs/freeswim.md.
"""

# public name -> module defining it; loaded on first use (PEP 562) so that the CLI's --help,
# which adds the FreeSwim flags, does not import diffusers through the dual path.
_LAZY: dict[str, str] = {
    "CacheReport": "vidsparse.freeswim.cache",
    "CrossAttentionCache": "vidsparse.freeswim.cache",
    "cache_bytes": "vidsparse.freeswim.cache",
    "DualPathConfig": "vidsparse.freeswim.config",
    "freeswim_scale_factor": "vidsparse.freeswim.config",
    "DualPathReport": "vidsparse.freeswim.dual_path",
    "DualPathState": "vidsparse.freeswim.dual_path",
    "apply_dual_path": "vidsparse.freeswim.dual_path",
    "get_dual_state": "vidsparse.freeswim.dual_path",
    "remove_dual_path": "vidsparse.freeswim.dual_path",
    "reset_dual_path": "vidsparse.freeswim.dual_path",
    "FreeSwimOptions": "vidsparse.freeswim.two_stage",
    "FreeSwimPlan": "vidsparse.freeswim.two_stage",
    "FreeSwimResult": "vidsparse.freeswim.two_stage",
    "StageProgress": "vidsparse.freeswim.two_stage",
    "StageSummary": "vidsparse.freeswim.two_stage",
    "check_freeswim": "vidsparse.freeswim.two_stage",
    "check_freeswim_sizes": "vidsparse.freeswim.two_stage",
    "native_size": "vidsparse.freeswim.two_stage",
    "native_size_of_config": "vidsparse.freeswim.two_stage",
    "run_freeswim": "vidsparse.freeswim.two_stage",
    "scheduler_with_shift": "vidsparse.freeswim.two_stage",
    "upsample_frames": "vidsparse.freeswim.two_stage",
}


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'vidsparse.freeswim' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


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
