"""Distributed primitives on plain tensors: all-to-all (Ulysses), frame exchange (halos), all-gather.

Every function takes the ``ParallelRuntime`` (rank, group, timeout, counters), runs inside
``guard`` so failures become clear errors, and records the payload bytes this rank sends to
other ranks in ``runtime.stats`` (counted point to point, independent of the backend's
algorithm; chunks a rank keeps for itself are not counted). Ops that can overlap compute
return a ``Pending`` whose ``wait()`` gives the result.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist

from vidsparse.parallel.runtime import ParallelRuntime, guard


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class Pending:
    """An issued asynchronous communication; ``wait()`` blocks (bounded by the runtime timeout)."""

    def __init__(self, runtime: ParallelRuntime, operation: str, works: Sequence[Any], finish: Callable[[], Any]):
        self.runtime, self.operation, self.works, self._finish = runtime, operation, list(works), finish
        self._done = False
        self._result: Any = None

    def wait(self) -> Any:
        if not self._done:
            with guard(self.runtime, self.operation):
                for w in self.works:
                    if self.runtime.backend == "gloo":
                        w.wait(self.runtime.timeout)
                    else:  # NCCL: bounded by the process group's timeout (watchdog)
                        w.wait()
            self._result = self._finish()
            self._done = True
        return self._result


# -- Ulysses: sequence shards <-> head shards ---------------------------------------------
def seq_to_heads(
    x: torch.Tensor, seq_sizes: Sequence[int], runtime: ParallelRuntime, op: str = "ulysses_qkv"
) -> torch.Tensor:
    """[..., S_r, Hp, D] sequence shard -> [..., sum(seq_sizes), Hp / N, D]: every rank's tokens, my heads.

    The sequence dimension is dim -3; ``seq_sizes[j]`` is rank j's shard length (uneven
    allowed) and ``Hp`` must be divisible by the world size (pad heads first).
    """
    n, r = runtime.world_size, runtime.rank
    *lead, s_r, hp, d = x.shape
    if s_r != seq_sizes[r]:
        raise ValueError(f"seq_to_heads: local shard has {s_r} tokens but seq_sizes[{r}] = {seq_sizes[r]}.")
    if hp % n:
        raise ValueError(f"seq_to_heads: {hp} heads are not divisible by {n} ranks; pad heads first.")
    h = hp // n
    lead_numel = 1
    for s in lead:
        lead_numel *= s
    # [N, lead, S_r, h, D]: chunk j goes to rank j.
    send = x.reshape(*lead, s_r, n, h, d).movedim(-3, 0).contiguous().view(-1)
    recv_counts = [lead_numel * s * h * d for s in seq_sizes]
    recv = torch.empty(sum(recv_counts), dtype=x.dtype, device=x.device)
    with guard(runtime, op):
        dist.all_to_all_single(recv, send, recv_counts, [lead_numel * s_r * h * d] * n, group=runtime.group)
    runtime.stats.add(op, _nbytes(x) * (n - 1) // n)
    parts = [c.view(*lead, s, h, d) for c, s in zip(torch.split(recv, recv_counts), seq_sizes)]
    return torch.cat(parts, dim=-3)


def heads_to_seq(
    y: torch.Tensor, seq_sizes: Sequence[int], runtime: ParallelRuntime, op: str = "ulysses_out"
) -> torch.Tensor:
    """Inverse of ``seq_to_heads``: [..., sum(seq_sizes), h, D] -> [..., S_r, h * N, D]."""
    n, r = runtime.world_size, runtime.rank
    *lead, s, h, d = y.shape
    if s != sum(seq_sizes):
        raise ValueError(f"heads_to_seq: {s} tokens, expected sum(seq_sizes) = {sum(seq_sizes)}.")
    lead_numel = 1
    for t in lead:
        lead_numel *= t
    send = torch.cat([c.contiguous().view(-1) for c in torch.split(y, list(seq_sizes), dim=-3)])
    send_counts = [lead_numel * sj * h * d for sj in seq_sizes]
    s_r = seq_sizes[r]
    recv = torch.empty(n * lead_numel * s_r * h * d, dtype=y.dtype, device=y.device)
    with guard(runtime, op):
        dist.all_to_all_single(recv, send, [lead_numel * s_r * h * d] * n, send_counts, group=runtime.group)
    runtime.stats.add(op, (_nbytes(y) - send_counts[r] * y.element_size()))
    # [N, lead, S_r, h, D] -> [lead, S_r, N * h, D] (rank j held heads j*h .. (j+1)*h - 1).
    out = recv.view(n, *lead, s_r, h, d).movedim(0, -3)
    return out.reshape(*lead, s_r, n * h, d)


# -- point-to-point frame exchange (halos) --------------------------------------------------
def exchange(
    sends: dict[int, torch.Tensor],
    recv_shapes: dict[int, tuple[int, ...]],
    runtime: ParallelRuntime,
    dtype: torch.dtype,
    op: str = "halo",
) -> Pending:
    """Send ``sends[dst]`` to each dst and receive a tensor of ``recv_shapes[src]`` from each src.

    One ``batch_isend_irecv`` for all pairs (no ordering deadlocks); the result is
    ``{src: tensor}``. Every rank must compute the same send/recv pattern.
    """
    me = runtime.rank
    recvs = {src: torch.empty(shape, dtype=dtype, device=runtime.device) for src, shape in recv_shapes.items()}
    ops = []
    for dst, t in sorted(sends.items()):
        if dst == me:
            raise ValueError("exchange: a rank cannot send to itself.")
        t = t.contiguous()
        sends[dst] = t  # keep alive until waited
        ops.append(dist.P2POp(dist.isend, t, dst, group=runtime.group))
        runtime.stats.add(op, _nbytes(t))
    for src, t in sorted(recvs.items()):
        ops.append(dist.P2POp(dist.irecv, t, src, group=runtime.group))
    works: list[Any] = []
    if ops:
        with guard(runtime, op):
            works = dist.batch_isend_irecv(ops)
    return Pending(runtime, op, works, lambda: recvs)


# -- all-gather with uneven sizes -----------------------------------------------------------
def all_gather_uneven(
    x: torch.Tensor,
    sizes: Sequence[int],
    runtime: ParallelRuntime,
    dim: int = 0,
    op: str = "all_gather",
    async_op: bool = False,
) -> Pending | list[torch.Tensor]:
    """Gather every rank's ``x`` whose length along ``dim`` is ``sizes[rank]`` (padded to the max).

    Returns the list of per-rank tensors (or a ``Pending`` giving it when ``async_op``).
    """
    n, r = runtime.world_size, runtime.rank
    dim = dim % x.dim()
    if x.shape[dim] != sizes[r]:
        raise ValueError(f"all_gather_uneven: local size {x.shape[dim]} along dim {dim} != sizes[{r}] = {sizes[r]}.")
    m = max(sizes)
    if m == 0:
        empty = [x.new_empty(*x.shape[:dim], 0, *x.shape[dim + 1 :]) for _ in range(n)]
        return Pending(runtime, op, [], lambda: empty) if async_op else empty
    if x.shape[dim] < m:
        pad_shape = list(x.shape)
        pad_shape[dim] = m - x.shape[dim]
        x = torch.cat([x, x.new_zeros(pad_shape)], dim=dim)
    x = x.contiguous()
    outs = [torch.empty_like(x) for _ in range(n)]
    with guard(runtime, op):
        work = dist.all_gather(outs, x, group=runtime.group, async_op=True)
    runtime.stats.add(op, _nbytes(x) * (n - 1) * sizes[r] // max(1, m))

    def finish() -> list[torch.Tensor]:
        return [o.narrow(dim, 0, s) for o, s in zip(outs, sizes)]

    pending = Pending(runtime, op, [work], finish)
    return pending if async_op else pending.wait()
