"""The diffusers floor: pyproject's ``diffusers>=`` is the oldest release the suite was run on
(0.41.0: tests/test_families.py, tests/test_pipelines.py and the offload, features, parallel and
floor tests of tests/test_compose_*.py pass; per issue 13, 0.40.0 fails on the first forward: its
``StateManager`` has no ``_context``), and the diffusers API
vidsparse relies on is there. CPU-cheap: imports and attribute checks only."""

from __future__ import annotations

import re
from pathlib import Path

import diffusers
from packaging.version import Version

FLOOR = "0.41"


def test_pyproject_floor_is_the_tested_one():
    text = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    found = re.findall(r'"diffusers>=([0-9.]+)"', text)
    assert found == [FLOOR], found
    assert Version(diffusers.__version__) >= Version(FLOOR)


def test_the_diffusers_api_vidsparse_uses_exists():
    from diffusers import (  # noqa: F401  (the import is the check)
        ContextParallelConfig,
        FasterCacheConfig,
        FirstBlockCacheConfig,
        MagCacheConfig,
        ParallelConfig,
        PyramidAttentionBroadcastConfig,
        TaylorSeerCacheConfig,
    )
    from diffusers.hooks import HookRegistry, ModelHook
    from diffusers.hooks.hooks import BaseState, HookFunctionReference, StateManager
    from diffusers.models.cache_utils import CacheMixin
    from diffusers.models.modeling_utils import ModelMixin

    # the cache context reaches vidsparse's stateful hook through its StateManager
    assert hasattr(StateManager(BaseState), "_context")
    assert {"forward", "pre_forward", "post_forward"} <= set(vars(HookFunctionReference()))
    for name in ("register_hook", "remove_hook", "get_hook", "reset_stateful_hooks", "check_if_exists_or_initialize"):
        assert hasattr(HookRegistry, name), name
    assert ModelHook._is_stateful is False
    for name in ("enable_parallelism", "compile_repeated_blocks", "set_attention_backend", "reset_attention_backend"):
        assert hasattr(ModelMixin, name), name
    for name in ("enable_cache", "disable_cache", "cache_context"):
        assert hasattr(CacheMixin, name), name
    cp = ContextParallelConfig(ulysses_degree=2)
    assert (cp.ulysses_degree, cp.ring_degree) == (2, 1)
    assert ParallelConfig(context_parallel_config=cp).context_parallel_config is cp
