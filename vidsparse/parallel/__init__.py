"""Multi-GPU inference on torch.distributed: clip parallelism (Video-Infinity) and Ulysses.

Attention level (plain tensors): ``clip_attention``, ``ulysses_attention``. Model level:
``parallelize`` / ``unparallelize`` a diffusers pipeline, ``run_parallel`` one generation,
``decode_parallel`` the VAE per clip, ``generate_parallel`` for ``vidsparse generate
--parallel``. Process level: ``init_distributed``, ``check_same_config``, ``spawn``.
See docs/parallel.md.
"""

from importlib import import_module
from typing import Any

from vidsparse.parallel.clip import ClipExchange, ClipView, clip_attention, exchange_plan, frame_reach
from vidsparse.parallel.launch import RankResult, check_results, free_port, spawn
from vidsparse.parallel.partition import FramePartition
from vidsparse.parallel.runtime import (
    ConfigMismatchError,
    DistributedError,
    ParallelRuntime,
    check_same_config,
    init_distributed,
    shutdown,
)
from vidsparse.parallel.stats import CommStats
from vidsparse.parallel.ulysses import heads_per_rank, ulysses_attention

# Names whose modules import diffusers: loaded on first use so `import vidsparse.parallel` stays light.
_LAZY = {
    "parallelize": "vidsparse.parallel.model",
    "unparallelize": "vidsparse.parallel.model",
    "run_parallel": "vidsparse.parallel.pipeline",
    "ParallelResult": "vidsparse.parallel.pipeline",
    "decode_parallel": "vidsparse.parallel.vae",
    "generate_parallel": "vidsparse.parallel.generate",
    "choose_ulysses": "vidsparse.parallel.diffusers_cp",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'vidsparse.parallel' has no attribute {name!r}")


__all__ = [
    "ClipExchange",
    "ClipView",
    "CommStats",
    "ConfigMismatchError",
    "DistributedError",
    "FramePartition",
    "ParallelResult",
    "ParallelRuntime",
    "RankResult",
    "check_results",
    "check_same_config",
    "choose_ulysses",
    "clip_attention",
    "decode_parallel",
    "exchange_plan",
    "frame_reach",
    "free_port",
    "generate_parallel",
    "heads_per_rank",
    "init_distributed",
    "parallelize",
    "run_parallel",
    "shutdown",
    "spawn",
    "ulysses_attention",
    "unparallelize",
]
