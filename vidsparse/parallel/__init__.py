"""Multi-GPU inference on torch.distributed: clip parallelism (Video-Infinity) and Ulysses."""

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

__all__ = [
    "ClipExchange",
    "ClipView",
    "CommStats",
    "ConfigMismatchError",
    "DistributedError",
    "FramePartition",
    "ParallelRuntime",
    "RankResult",
    "check_results",
    "check_same_config",
    "clip_attention",
    "exchange_plan",
    "free_port",
    "frame_reach",
    "heads_per_rank",
    "init_distributed",
    "shutdown",
    "spawn",
    "ulysses_attention",
]
