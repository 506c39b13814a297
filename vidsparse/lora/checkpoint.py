"""Training checkpoints that survive interruption and resume a run exactly.

A checkpoint is a folder ``checkpoint-<step>`` in the output folder with everything the next
step depends on: the LoRA weights (``lora.safetensors``), the optimizer and LR-scheduler states,
each process's RNG states (Python, NumPy, torch CPU/CUDA and the trainer's noise generator) and
``state.json`` (step and the settings a resume must match). The data order needs no state of
its own: it is a pure function of the seed and the step (see ``train.sample_order``).

Writes are atomic at folder level: the files go to a hidden ``.tmp-checkpoint-<step>`` folder,
which is renamed into place only once complete (``state.json`` last). An interrupted write
leaves a hidden temp folder that is ignored and cleaned up by the next save, never a broken
``checkpoint-*`` folder in place of a good one.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vidsparse.atomic import fsync_dir, write_json
from vidsparse.lora.atomic import save_tensors, torch_save

_NAME = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "state.json"


def checkpoint_name(step: int) -> str:
    return f"checkpoint-{step:08d}"


def checkpoint_step(name: str) -> int | None:
    """The step a folder name ``checkpoint-<step>`` holds, None for any other name."""
    m = _NAME.match(name)
    return int(m.group(1)) if m else None


def list_checkpoints(output_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints (those with ``state.json``) in ``output_dir``, oldest first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        step = checkpoint_step(child.name)
        if step is not None and child.is_dir() and (child / STATE_FILE).is_file():
            found.append((step, child))
    return sorted(found)


def resolve_resume(resume: str, output_dir: str | os.PathLike) -> Path | None:
    """The checkpoint folder ``--resume`` names: ``latest`` (None if there is none yet) or a path."""
    if resume == "latest":
        found = list_checkpoints(output_dir)
        return found[-1][1] if found else None
    path = Path(resume).expanduser()
    if not (path / STATE_FILE).is_file():
        ckpts = [p.name for _, p in list_checkpoints(output_dir)]
        raise ValueError(
            f"--resume {resume!r} is not a complete checkpoint folder (no {STATE_FILE} inside). Pass 'latest' "
            f"or one of the checkpoints in {str(output_dir)!r}: {', '.join(ckpts) or '(none yet)'}."
        )
    return path


def read_state(path: str | os.PathLike) -> dict[str, Any]:
    """The ``state.json`` of a checkpoint folder (step, settings, world size)."""
    return json.loads((Path(path) / STATE_FILE).read_text(encoding="utf-8"))


def rng_state(generator: torch.Generator) -> dict[str, Any]:
    """Every RNG stream as plain values and tensors only, so ``torch.load(weights_only=True)``
    reads it back (numpy's key array is stored as a tensor)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state(legacy=True)
    state = {
        "python": random.getstate(),
        "numpy": (name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)),
        "torch": torch.random.get_rng_state(),
        "generator": generator.get_state(),
        "generator_device": str(generator.device),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any], generator: torch.Generator) -> None:
    random.setstate(state["python"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.random.set_rng_state(state["torch"])
    generator.set_state(state["generator"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    output_dir: str | os.PathLike,
    step: int,
    *,
    lora_state: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    lr_scheduler: Any,
    generator: torch.Generator,
    state: dict[str, Any],
    rank: int = 0,
    world_size: int = 1,
    barrier: Callable[[], None] | None = None,
    keep: int | None = None,
) -> Path:
    """Write ``checkpoint-<step>`` atomically (all ranks call it; rank 0 owns the folder)."""
    root = Path(output_dir)
    final = root / checkpoint_name(step)
    tmp = root / f".tmp-{checkpoint_name(step)}"
    sync = barrier or (lambda: None)
    if rank == 0:
        for stale in root.glob(".tmp-checkpoint-*"):  # left by interrupted saves
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir(parents=True)
    sync()
    try:
        torch_save(tmp / f"rng-rank{rank}.pt", rng_state(generator))
        sync()
        if rank == 0:
            save_tensors(tmp / "lora.safetensors", lora_state)
            torch_save(tmp / "optimizer.pt", optimizer.state_dict())
            torch_save(tmp / "lr_scheduler.pt", lr_scheduler.state_dict())
            write_json(tmp / STATE_FILE, {**state, "step": step, "world_size": world_size})
            fsync_dir(tmp)
    except Exception:
        if rank == 0:  # e.g. a full disk: the incomplete folder goes (a kill leaves it for the next save)
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if rank == 0:
        if final.exists():  # an older run's checkpoint at this step: swap, then delete it
            trash = root / f".trash-{checkpoint_name(step)}"
            shutil.rmtree(trash, ignore_errors=True)
            os.replace(final, trash)
            os.replace(tmp, final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, final)
        fsync_dir(root)
        if keep is not None:
            for _, old in list_checkpoints(root)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    sync()
    return final


def load_checkpoint(
    path: str | os.PathLike,
    *,
    optimizer: torch.optim.Optimizer,
    lr_scheduler: Any,
    generator: torch.Generator,
    rank: int = 0,
    world_size: int = 1,
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Restore optimizer, scheduler and RNG states; returns (state.json, LoRA weights to load)."""
    from safetensors.torch import load_file

    path = Path(path)
    state = read_state(path)
    saved_world = int(state.get("world_size", 1))
    if saved_world != world_size:
        raise ValueError(
            f"Checkpoint {str(path)!r} was written by {saved_world} processes, this run has {world_size}; "
            "resume with the same number of processes (the data order and RNG streams are per process)."
        )
    lora = load_file(str(path / "lora.safetensors"))
    optimizer.load_state_dict(_load_plain(path / "optimizer.pt"))
    lr_scheduler.load_state_dict(_load_plain(path / "lr_scheduler.pt"))
    set_rng_state(_load_plain(path / f"rng-rank{rank}.pt"), generator)
    return state, lora


def _load_plain(path: Path) -> Any:
    """``torch.load`` that unpickles tensors and plain Python values only (``weights_only=True``):
    a checkpoint folder from elsewhere must not be able to run code on resume."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ValueError(
            f"Refusing to resume from {str(path)!r}: it holds objects other than tensors and plain values "
            f"({str(exc).splitlines()[0][:160]}), and unpickling them could run code. Resume only from "
            "checkpoints this version of vidsparse wrote, or start a fresh run without --resume."
        ) from None


__all__ = [
    "STATE_FILE",
    "checkpoint_name",
    "checkpoint_step",
    "list_checkpoints",
    "load_checkpoint",
    "read_state",
    "resolve_resume",
    "save_checkpoint",
]
