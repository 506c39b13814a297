"""Attention backends. Each exposes ``run(q, k, v, plan, key_valid=None, scale=None)`` on
kernel-order tensors [B, H, S_pad, D] and returns ``(out, lse)``."""

from __future__ import annotations

BACKENDS = ("torch", "flex", "triton")
