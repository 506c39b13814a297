"""Process-group set-up with bounded waits, clear errors and a cross-rank config check.

Every collective vidsparse issues goes through ``guard``: a peer that died or hangs turns
into a ``DistributedError`` naming the operation, the rank and the timeout, on every rank,
instead of a hang or a bare backend trace. ``check_same_config`` compares a hash of the run
settings across ranks at start, so ranks launched with different options stop at once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import hashlib
import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from vidsparse.parallel.stats import CommStats

DEFAULT_TIMEOUT_S = 300.0
_ENV_HINT = (
    "Launch with `torchrun --nproc-per-node N -m vidsparse generate ... --parallel clip|ulysses`, "
    "`accelerate launch --num_processes N -m vidsparse generate ...`, or vidsparse.parallel.spawn(...) "
    "(they set RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT)."
)


class DistributedError(RuntimeError):
    """A collective failed or timed out: a peer rank died, hangs or runs a different program."""


class ConfigMismatchError(ValueError):
    """Ranks were started with different settings."""


@dataclass
class ParallelRuntime:
    """The live distributed state one generation uses (rank, group, device, timeout, counters)."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str
    timeout_s: float
    group: Any = None  # None = the default (world) group
    stats: CommStats = field(default_factory=CommStats)
    owns_process_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def timeout(self) -> datetime.timedelta:
        return datetime.timedelta(seconds=self.timeout_s)

    def describe(self) -> str:
        return f"rank {self.rank}/{self.world_size} ({self.backend}, {self.device})"


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"Environment variable {name} must be an integer, got {value!r}. {_ENV_HINT}") from None


def _check_timeout(timeout_s: float) -> float:
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or not timeout_s > 0:
        raise ValueError(f"timeout_s must be a positive number of seconds, got {timeout_s!r}.")
    return float(timeout_s)


def init_distributed(
    backend: str | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    device: torch.device | str | None = None,
) -> ParallelRuntime:
    """Join (or reuse) the default process group from torchrun / accelerate environment variables.

    ``backend=None`` picks NCCL when CUDA is available and gloo otherwise. On CUDA each
    process uses ``cuda:LOCAL_RANK``. Every collective waits at most ``timeout_s`` seconds.
    """
    timeout_s = _check_timeout(timeout_s)
    if backend is not None and backend not in ("nccl", "gloo"):
        raise ValueError(f"backend must be 'nccl', 'gloo' or None (auto), got {backend!r}.")
    if not dist.is_available():
        raise RuntimeError("torch.distributed is not available in this torch build; multi-GPU runs need it.")
    owns = False
    if dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        backend = str(dist.get_backend())
        local_rank = _env_int("LOCAL_RANK")
        local_rank = rank if local_rank is None else local_rank
    else:
        rank, world = _env_int("RANK"), _env_int("WORLD_SIZE")
        if rank is None or world is None or "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
            raise ValueError(f"vidsparse parallel inference found no distributed environment. {_ENV_HINT}")
        local_rank = _env_int("LOCAL_RANK")
        local_rank = rank if local_rank is None else local_rank
        if backend is None:
            backend = "nccl" if torch.cuda.is_available() and device != "cpu" else "gloo"
        if backend == "nccl":
            if not torch.cuda.is_available():
                raise ValueError("backend='nccl' needs CUDA GPUs; use backend='gloo' on CPU.")
            torch.cuda.set_device(local_rank)
        dist.init_process_group(
            backend=backend, rank=rank, world_size=world, timeout=datetime.timedelta(seconds=timeout_s)
        )
        owns = True
    if device is None:
        device = torch.device(f"cuda:{local_rank}") if backend == "nccl" else torch.device("cpu")
    device = torch.device(device)
    if backend == "nccl" and device.type != "cuda":
        raise ValueError(f"The process group uses NCCL but device={device}; NCCL needs CUDA tensors.")
    return ParallelRuntime(
        rank=rank,
        world_size=world,
        local_rank=local_rank,
        device=device,
        backend=backend,
        timeout_s=timeout_s,
        owns_process_group=owns,
    )


def shutdown(runtime: ParallelRuntime) -> None:
    """Destroy the process group if ``init_distributed`` created it."""
    if runtime.owns_process_group and dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def guard(runtime: ParallelRuntime, operation: str) -> Iterator[None]:
    """Turn a failed or timed-out collective into a ``DistributedError`` that says what to check."""
    try:
        yield
    except (DistributedError, ConfigMismatchError):
        raise
    except RuntimeError as exc:  # DistBackendError, DistNetworkError, gloo/NCCL errors
        cause = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DistributedError(
            f"{runtime.describe()}: collective '{operation}' failed: {cause[:300]}. A peer rank probably "
            f"died, hangs (waits are bounded by {runtime.timeout_s:g} s), or runs a different program or "
            "settings; check the other ranks' logs. Every rank stops with this error."
        ) from exc


def _canonical(value: Any) -> Any:
    """JSON-able, order-stable form of configs (dataclasses, mappings, tensors, dtypes, paths)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {
            "__type__": type(value).__name__,
            **{f.name: _canonical(getattr(value, f.name)) for f in dataclasses.fields(value)},
        }
    if isinstance(value, Mapping):
        return {str(k): _canonical(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, torch.Tensor):
        return {"tensor": list(value.shape), "sum": float(value.double().sum()) if value.numel() else 0.0}
    return repr(value)


def config_digest(config: Any) -> tuple[str, dict[str, Any] | Any]:
    """(sha256 hex, canonical form) of a config object."""
    canon = _canonical(config)
    text = json.dumps(canon, sort_keys=True, default=repr)
    return hashlib.sha256(text.encode("utf-8")).hexdigest(), canon


def _diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out: list[str] = []
        for key in sorted(set(a) | set(b)):
            out += _diff(a.get(key, "<missing>"), b.get(key, "<missing>"), f"{prefix}{key}.")
        return out
    return [] if a == b else [f"{prefix.rstrip('.') or 'value'}: {a!r} vs {b!r}"]


def check_same_config(runtime: ParallelRuntime, config: Any) -> str:
    """Raise ``ConfigMismatchError`` on every rank unless all ranks pass an equal config.

    One all-gather of a 32-byte digest; on a mismatch one more all-gather of the settings
    to name the fields that differ. Returns the digest.
    """
    digest, canon = config_digest(config)
    raw = torch.tensor(list(bytes.fromhex(digest)), dtype=torch.uint8)
    mine = raw.to(torch.int32).to(runtime.device)
    gathered = [torch.empty_like(mine) for _ in range(runtime.world_size)]
    with guard(runtime, "config check (all_gather of the settings hash)"):
        dist.all_gather(gathered, mine, group=runtime.group)
    digests = [bytes(g.to(torch.uint8).cpu().tolist()).hex() for g in gathered]
    if len(set(digests)) == 1:
        return digest
    objects: list[Any] = [None] * runtime.world_size
    with guard(runtime, "config check (all_gather of the settings)"):
        dist.all_gather_object(objects, canon, group=runtime.group)
    lines = []
    for r, obj in enumerate(objects):
        if digests[r] != digests[0]:
            lines.append(f"rank {r} vs rank 0: " + "; ".join(_diff(obj, objects[0])[:8]))
    raise ConfigMismatchError(
        f"{runtime.describe()}: ranks were started with different settings ({'; '.join(lines)}). "
        "Launch every rank with the same command line, model, seed and options."
    )
