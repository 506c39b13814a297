"""Start N local ranks without torchrun (scripts, notebooks, tests), bounded in time.

``spawn(fn, nprocs, args)`` runs ``fn(*args)`` in N fresh processes with the torchrun
environment set (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR=127.0.0.1, a free MASTER_PORT),
so ``init_distributed()`` works inside them unchanged. It returns each rank's result or
error; a rank that neither finishes nor fails before ``timeout_s`` is terminated and
reported as hung, so the caller never hangs either.
"""

from __future__ import annotations

import os
import queue as queue_mod
import socket
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch.multiprocessing as mp


@dataclass
class RankResult:
    """What one spawned rank did: ``status`` is "ok", "error", "died" or "hung"."""

    rank: int
    status: str
    value: Any = None
    error_type: str = ""
    message: str = ""
    exitcode: int | None = None
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free on ``host`` a moment ago (loopback only by default)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _worker(fn: Callable, rank: int, nprocs: int, port: int, args: Sequence[Any], results, env: dict[str, str]) -> None:
    os.environ.update(env)
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(nprocs),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(nprocs),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    start = time.monotonic()
    try:
        value = fn(*args)
        results.put((rank, "ok", value, "", "", time.monotonic() - start))
    except BaseException as exc:  # report everything, including SystemExit from argparse
        msg = f"{exc}\n{traceback.format_exc(limit=8)}"
        results.put((rank, "error", None, type(exc).__name__, msg, time.monotonic() - start))


def spawn(
    fn: Callable,
    nprocs: int,
    args: Sequence[Any] = (),
    timeout_s: float = 120.0,
    env: dict[str, str] | None = None,
) -> list[RankResult]:
    """Run ``fn(*args)`` on ``nprocs`` local ranks; returns one ``RankResult`` per rank.

    ``fn`` must be importable (a module-level function) because ranks start with the
    "spawn" method. Ranks that exceed ``timeout_s`` are terminated and marked "hung".
    """
    if not isinstance(nprocs, int) or nprocs < 1:
        raise ValueError(f"nprocs must be a positive int, got {nprocs!r}.")
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_worker, args=(fn, r, nprocs, port, tuple(args), results, dict(env or {})), daemon=False)
        for r in range(nprocs)
    ]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout_s
    got: dict[int, tuple] = {}

    def drain(block: float) -> None:
        try:
            item = results.get(timeout=block)
            got[item[0]] = item
        except queue_mod.Empty:
            pass

    while time.monotonic() < deadline and any(p.is_alive() for p in procs):
        drain(0.05)
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for r in hung:
        procs[r].terminate()
    for p in procs:
        p.join(timeout=10)
        if p.is_alive():  # pragma: no cover - terminate ignored
            p.kill()
            p.join(timeout=5)
    end = time.monotonic() + 2.0
    while len(got) < nprocs and time.monotonic() < end:
        drain(0.05)
    out = []
    for r, p in enumerate(procs):
        if r in got:
            _, status, value, etype, msg, secs = got[r]
            out.append(RankResult(r, status, value, etype, msg, p.exitcode, secs))
        elif r in hung:
            out.append(
                RankResult(r, "hung", message=f"rank {r} did not finish within {timeout_s:g} s", exitcode=p.exitcode)
            )
        else:
            out.append(
                RankResult(
                    r, "died", message=f"rank {r} exited with code {p.exitcode} without a result", exitcode=p.exitcode
                )
            )
    results.close()
    return out


def check_results(results: list[RankResult]) -> list[Any]:
    """Values of all ranks, or a RuntimeError listing every rank that failed."""
    bad = [r for r in results if not r.ok]
    if bad:
        lines = "\n".join(f"rank {r.rank}: {r.status} {r.error_type} {r.message.strip()[:2000]}" for r in bad)
        raise RuntimeError(f"{len(bad)} of {len(results)} ranks failed:\n{lines}")
    return [r.value for r in results]
