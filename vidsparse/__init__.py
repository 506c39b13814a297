"""vidsparse: sparse spatiotemporal attention for video diffusion transformers."""

from vidsparse.attention import attention, clear_plan_cache, plan, token_mask
from vidsparse.config import SparseConfig
from vidsparse.layout import VideoLayout
from vidsparse.patterns import (
    GNA,
    PATTERNS,
    AttentionTile,
    Dense,
    DualScope,
    FreeSwim,
    Pattern,
    Radial,
    Tile,
    VMoBA,
    make_pattern,
)
from vidsparse.plan import BlockSparsePlan

__version__ = "0.1.0"

__all__ = [
    "GNA",
    "PATTERNS",
    "AttentionTile",
    "SparseConfig",
    "BlockSparsePlan",
    "Dense",
    "DualScope",
    "FreeSwim",
    "Pattern",
    "Radial",
    "Tile",
    "VMoBA",
    "VideoLayout",
    "apply",
    "attention",
    "clear_plan_cache",
    "make_pattern",
    "plan",
    "remove",
    "reset_state",
    "token_mask",
]


# The diffusers integration imports diffusers; load it on first use so `import vidsparse` stays light.
_PIPELINE_API = ("apply", "remove", "reset_state")


def __getattr__(name: str):
    if name in _PIPELINE_API:
        from vidsparse import pipelines

        return getattr(pipelines, name)
    raise AttributeError(f"module 'vidsparse' has no attribute {name!r}")
