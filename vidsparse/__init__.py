"""vidsparse: sparse spatiotemporal attention for video diffusion transformers."""

from vidsparse.attention import attention, clear_plan_cache, plan, token_mask
from vidsparse.layout import VideoLayout
from vidsparse.patterns import PATTERNS, Dense, DualScope, Pattern, Radial, make_pattern
from vidsparse.plan import BlockSparsePlan

__version__ = "0.1.0"

__all__ = [
    "PATTERNS",
    "BlockSparsePlan",
    "Dense",
    "DualScope",
    "Pattern",
    "Radial",
    "VideoLayout",
    "attention",
    "clear_plan_cache",
    "make_pattern",
    "plan",
    "token_mask",
]
