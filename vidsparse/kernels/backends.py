"""Attention backends as records (NATTEN-style): name, how to run, whether it can run, block size.

Every backend module exposes ``run(q, k, v, plan, key_valid=None, scale=None) -> (out, lse)``
on kernel-order tensors [B, H, S_pad, D]. A record says, instead of the caller probing the
module with ``hasattr``:

- ``fused``: the module also has ``attention(q, k, v, plan, text_mask=, scale=)`` taking the
  caller's [B, S, H, D] layout (it fuses the permutation, e.g. a registered custom op);
- ``can_run(q, k, v, plan)``: ``None`` or the reason this backend cannot run these inputs
  (the module's ``unsupported_reason(q)`` where ``checks_inputs``); ``can_run_on(device, dtype,
  backward)`` the part known before any tensor exists (``device_reason``);
- ``default_block``: the block size ``vidsparse.attention`` plans with when none is given;
- ``key_block``: it runs key-block-major plans (``plan.group_spans``, per-query VMoBA) by
  ``vidsparse.kernels.keyblock`` with this backend name, computing only the selected rows.

Modules load on first use (``load``; a ``sys.modules`` hit keeps torch.compile out of importlib),
so ``import vidsparse`` never imports Triton. ``register_backend`` adds one; ``backend_names``
is the one list of names every config, CLI flag and error message uses.
"""

from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from vidsparse.plan import BlockSparsePlan

AUTO = "auto"
#: Block size of backends that do not prefer another (``vidsparse.plan.DEFAULT_BLOCK_SIZE``; not
#: imported from there, so importing this module never imports the patterns).
DEFAULT_BLOCK = 128


@dataclass(frozen=True)
class Backend:
    """One attention backend (see the module docstring)."""

    name: str
    module: str
    summary: str
    default_block: int = DEFAULT_BLOCK
    fused: bool = False
    checks_inputs: bool = False
    key_block: bool = False

    def load(self) -> ModuleType:
        mod = sys.modules.get(self.module)
        return mod if mod is not None else importlib.import_module(self.module)

    def can_run(
        self,
        q: torch.Tensor,
        k: torch.Tensor | None = None,
        v: torch.Tensor | None = None,
        plan: Any = None,
    ) -> str | None:
        """``None`` if this backend runs these inputs, else the reason it cannot."""
        if not self.checks_inputs:
            return None
        return self.load().unsupported_reason(q)

    def can_run_on(self, device: torch.device, dtype: torch.dtype, backward: bool = False) -> str | None:
        """``None`` if this backend may run ``dtype`` tensors on ``device`` (and their backward, with
        ``backward``), else why not: the part of ``can_run`` known before any tensor exists (the
        module's ``device_reason``)."""
        if not self.checks_inputs:
            return None
        return self.load().device_reason(device, dtype, backward)

    def run(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        plan: BlockSparsePlan,
        key_valid: torch.Tensor | None = None,
        scale: float | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Kernel-order attention [B, H, S_pad, D] -> (out, lse): the backend-module interface,
        below ``vidsparse.attention`` (which takes [B, S, H, D] and permutes into ``plan.order``)."""
        return self.load().run(q, k, v, plan, key_valid=key_valid, scale=scale)

    def attention(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        plan: BlockSparsePlan,
        text_mask: torch.Tensor | None = None,
        scale: float | None = None,
    ) -> torch.Tensor:
        """Caller-layout attention [B, S, H, D] (``fused`` backends only)."""
        if not self.fused:
            raise TypeError(f"backend {self.name!r} runs kernel-order tensors only; use vidsparse.attention.")
        return self.load().attention(q, k, v, plan, text_mask=text_mask, scale=scale)

    def attention_kernel_order(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        plan: BlockSparsePlan,
        text_mask: torch.Tensor | None = None,
        scale: float | None = None,
    ) -> torch.Tensor:
        """Attention of q, k, v [B, S_pad, H, D] already in ``plan.order`` -> out, same order.

        ``fused`` backends take these tensors as they are (the Triton kernels then read whole
        contiguous tiles through TMA); the others get [B, H, S_pad, D] views through ``run``.
        """
        if self.fused:
            return self.load().attention_kernel_order(q, k, v, plan, text_mask=text_mask, scale=scale)
        key_valid = plan.key_valid(text_mask, q.shape[0])
        out, _ = self.run(*(t.transpose(1, 2) for t in (q, k, v)), plan, key_valid=key_valid, scale=scale)
        return out.transpose(1, 2)


_BACKENDS: dict[str, Backend] = {}


def register_backend(backend: Backend) -> Backend:
    """Add (or replace, by name) a backend: every ``backend=`` option, CLI flag and error
    message then lists it. Its module loads on first use."""
    if not isinstance(backend, Backend):
        raise TypeError(f"register_backend expects a vidsparse.kernels.backends.Backend, got {type(backend).__name__}.")
    if backend.name == AUTO:
        raise ValueError(f"{AUTO!r} is reserved: it picks a backend per call.")
    _BACKENDS[backend.name] = backend
    return backend


def backend_names() -> tuple[str, ...]:
    """Names of the registered backends (without "auto")."""
    return tuple(_BACKENDS)


def backend_choices() -> tuple[str, ...]:
    """What a ``backend=`` option accepts: "auto" and every registered backend."""
    return (AUTO, *_BACKENDS)


def get_backend(name: str) -> Backend:
    """The backend record named ``name``; a ValueError listing the registered ones otherwise."""
    found = _BACKENDS.get(name)
    if found is None:
        note = (
            " NATTEN runs GNA under its own na3d, not a vidsparse plan: vidsparse uses it as the GNA/FreeSwim "
            "test oracle and as a `vidsparse bench --backends natten` row."
            if name == "natten"
            else ""
        )
        raise ValueError(f"Unknown backend {name!r}. Expected 'auto' or one of {sorted(_BACKENDS)}.{note}")
    return found


def check_runs_on(
    name: str, device: torch.device, dtype: torch.dtype, option: str = "backend", backward: bool = False
) -> None:
    """Refuse, before any model loads, a backend ``name`` (``option``: how the caller names the
    setting, e.g. a CLI flag) that cannot run ``dtype`` tensors on ``device`` (and, for
    training, their ``backward``): otherwise the error comes at the first attention call,
    after weights, text encoding or a latent cache."""
    if name == AUTO:
        return
    if name not in _BACKENDS:
        raise ValueError(f"Unknown {option} {name!r}. Expected one of: {', '.join(backend_choices())}.")
    reason = _BACKENDS[name].can_run_on(device, dtype, backward)
    if reason is not None:
        raise ValueError(
            f"{option} {name} cannot run on {device} ({str(dtype).removeprefix('torch.')}): {reason}. "
            f"Use {option} {AUTO} (it picks one that runs), or another device or dtype."
        )


register_backend(
    Backend(
        "torch",
        "vidsparse.kernels.reference",
        "exact block-by-block torch reference, any device",
        key_block=True,
    )
)
register_backend(
    Backend(
        "flex",
        "vidsparse.kernels.flex",
        "torch FlexAttention with a BlockMask built from the plan",
        checks_inputs=True,
    )
)
register_backend(
    Backend(
        "triton",
        "vidsparse.kernels.triton_backend",
        "fused block-sparse Triton kernels (CUDA; forward and backward)",
        default_block=128,
        fused=True,
        checks_inputs=True,
        key_block=True,
    )
)

__all__ = [
    "AUTO",
    "DEFAULT_BLOCK",
    "Backend",
    "backend_choices",
    "backend_names",
    "check_runs_on",
    "get_backend",
    "register_backend",
]
