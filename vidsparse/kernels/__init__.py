"""Attention backends. Each exposes ``run(q, k, v, plan, key_valid=None, scale=None)`` on
kernel-order tensors [B, H, S_pad, D] and returns ``(out, lse)``; ``backends`` holds one
``Backend`` record per backend (name, module, ``can_run``, default block)."""

from __future__ import annotations

from vidsparse.kernels.backends import Backend, backend_names, get_backend, register_backend

#: Names of the registered backends (``backend_names()`` at import; "auto" is not one).
BACKENDS = backend_names()

__all__ = ["BACKENDS", "Backend", "backend_names", "get_backend", "register_backend"]
