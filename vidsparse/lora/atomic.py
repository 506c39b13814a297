"""Atomic writes of LoRA training state: tensors and pickles on top of :mod:`vidsparse.atomic`.

A reader (or a resumed run) sees the old file or the new one, never half; see
:func:`vidsparse.atomic.atomic_path` for how.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from vidsparse.atomic import atomic_path


def save_tensors(
    dest: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> None:
    from safetensors.torch import save_file

    clean = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_path(dest) as tmp:
        save_file(clean, str(tmp), metadata=metadata)


def torch_save(dest: str | os.PathLike, obj: Any) -> None:
    with atomic_path(dest) as tmp:
        torch.save(obj, tmp)


__all__ = ["save_tensors", "torch_save"]
