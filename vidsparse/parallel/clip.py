"""Clip-parallel self-attention (Video-Infinity): each rank fetches only the keys its queries need.

Rank r holds the queries, keys and values of its clip (latent frames ``[s_r, e_r)``). For a
static pattern the frames its queries can reach are known in advance (``frame_reach``), so
every rank computes the same exchange plan without negotiation:

- *halo* frames (reached frames owned by other ranks) travel point to point in one
  ``batch_isend_irecv`` (neighbours for local patterns; farther ranks when clips are short);
- *global* frames that every rank needs (``DualScope``'s strided frames) are all-gathered once;
- while those are in flight the rank attends its own clip (and the text), then attends the
  received frames and merges the two by log-sum-exp.

The result equals the single-device attention of the same pattern. Text queries (joint
attention) see every video key, so their per-rank partials are all-gathered and merged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from vidsparse.layout import VideoLayout
from vidsparse.lru import LRUCache
from vidsparse.parallel.comm import all_gather_uneven, exchange
from vidsparse.parallel.partials import merge_partials, merged_rows_attention, sparse_attention_lse
from vidsparse.parallel.partition import FramePartition
from vidsparse.parallel.runtime import ParallelRuntime
from vidsparse.patterns.base import Pattern
from vidsparse.patterns.dual_scope import frame_block_candidates

_CACHE_SIZE = 64
_REACH: LRUCache[torch.Tensor] = LRUCache(_CACHE_SIZE)
_EXCHANGES: LRUCache[ClipExchange] = LRUCache(_CACHE_SIZE)
_INDICES: LRUCache[torch.Tensor] = LRUCache(_CACHE_SIZE)


@dataclass(frozen=True)
class ClipView(Pattern):
    """A whole-video pattern seen on a sequence built from some of the video's frames.

    Sub-frame ``i`` of the sequence is absolute frame ``frames[i]``. Only sub-frames
    ``< query_frames`` query (the rest are key-only rows, left empty) and only key
    sub-frames ``>= key_start`` are attended, so one plan covers "own clip vs own clip"
    (``key_start=0``) or "own clip vs received frames" (``key_start=query_frames``).
    """

    inner: Pattern
    layout: VideoLayout
    frames: tuple[int, ...]
    query_frames: int
    key_start: int = 0
    name: ClassVar[str] = "clip-view"

    @property
    def uses_layer(self) -> bool:
        return self.inner.uses_layer

    def validate(self, layout: VideoLayout) -> None:
        if (
            layout.frames != len(self.frames)
            or layout.height != self.layout.height
            or layout.width != self.layout.width
        ):
            raise ValueError(
                f"ClipView expects a {len(self.frames)}x{self.layout.height}x{self.layout.width} sequence, got {layout}."
            )

    def _abs(self, idx: torch.Tensor, hw: int) -> tuple[torch.Tensor, torch.Tensor]:
        f = idx // hw
        table = torch.tensor(self.frames, dtype=torch.int64, device=idx.device)
        return f, table[f] * hw + idx % hw

    def video_mask(self, layout: VideoLayout, qi: torch.Tensor, ki: torch.Tensor, layer: int = 0) -> torch.Tensor:
        hw = layout.tokens_per_frame
        fq, qa = self._abs(qi, hw)
        fk, ka = self._abs(ki, hw)
        m = self.inner.video_mask(self.layout, qa, ka, layer)
        return m & (fq < self.query_frames) & (fk >= self.key_start)

    def block_candidates(self, layout: VideoLayout, order: torch.Tensor, block_size: int, layer: int = 0):
        n = len(self.frames)
        a = torch.tensor(self.frames, dtype=torch.int64)
        rows = (torch.arange(n) < self.query_frames).view(-1, 1)
        cols = (torch.arange(n) >= self.key_start).view(1, -1)
        fm_fn = frame_mask_of(self.inner)
        if fm_fn is not None:
            fm = fm_fn(self.layout, a.view(-1, 1), a.view(1, -1)) & rows & cols
            return frame_block_candidates(fm, order, block_size, layout.tokens_per_frame)
        # Any static pattern: a sub-block pair is a candidate when the whole-video plan lists a
        # block pair covering some of its tokens (a superset; elements are then evaluated).
        hw = layout.tokens_per_frame
        valid = order >= 0
        sub = order.clamp_min(0)
        absolute = a[sub // hw] * hw + sub % hw
        gblock = _global_block_of(self.inner, self.layout, layer, block_size)[absolute]
        listed = _global_listed(self.inner, self.layout, layer, block_size)
        nsb = order.numel() // block_size
        touch = torch.zeros(nsb, listed.shape[0])
        sb = torch.arange(order.numel()) // block_size
        touch[sb[valid], gblock[valid]] = 1.0
        cand = (touch @ listed @ touch.T) > 0
        fsub = torch.where(valid, sub // hw, -1).view(nsb, block_size)
        q_ok = ((fsub >= 0) & (fsub < self.query_frames)).any(dim=1)
        k_ok = (fsub >= self.key_start).any(dim=1)
        return cand & q_ok.view(-1, 1) & k_ok.view(1, -1)


def frame_mask_of(pattern: Pattern):
    """bool [F, F]-style ``mask(layout, fq, fk)`` of patterns whose mask depends on frames only
    (``Pattern.attended_frames`` answers), else None."""
    if type(pattern).attended_frames is Pattern.attended_frames:
        return None
    return pattern.attended_frames


def _global_plan(pattern: Pattern, layout: VideoLayout, layer: int, block_size: int):
    from vidsparse.attention import plan

    return plan(pattern, VideoLayout(layout.frames, layout.height, layout.width), layer=layer, block_size=block_size)


def _global_block_of(pattern: Pattern, layout: VideoLayout, layer: int, block_size: int) -> torch.Tensor:
    """int64 [video_len]: the whole-video plan's block of each natural video token."""
    p = _global_plan(pattern, layout, layer, block_size)
    vidx = p.order.video_index.cpu()
    out = torch.empty(layout.video_len, dtype=torch.int64)
    pos = torch.nonzero(vidx >= 0).flatten()
    out[vidx[pos]] = pos // block_size
    return out


def _global_listed(pattern: Pattern, layout: VideoLayout, layer: int, block_size: int) -> torch.Tensor:
    """float [NB, NB]: 1 where the whole-video plan computes a (query block, key block) pair."""
    p = _global_plan(pattern, layout, layer, block_size)
    nb = p.num_blocks
    counts, idx = p.kv_counts.cpu().long(), p.kv_indices.cpu().long()
    listed = torch.arange(idx.shape[-1]).view(1, 1, 1, -1) < counts.unsqueeze(-1)
    out = torch.zeros(nb, nb)
    _, _, qb, slot = torch.nonzero(listed, as_tuple=True)
    b, h = torch.nonzero(listed, as_tuple=True)[:2]
    out[qb, idx[b, h, qb, slot]] = 1.0
    return out


def frame_reach(pattern: Pattern, layout: VideoLayout, layer: int = 0, block_size: int = 128) -> torch.Tensor:
    """bool [F, F]: query frame i may attend some token of key frame j (a superset is fine).

    Patterns that define ``attended_frames`` answer exactly; others are read off the block plan
    of the whole video (block granularity, so a superset).
    """
    if pattern.dynamic:
        raise ValueError(
            f"Clip parallelism needs a static pattern (the keys a clip needs must be known before the "
            f"call); {type(pattern).__name__} is dynamic. Use --parallel ulysses for it."
        )
    video = VideoLayout(layout.frames, layout.height, layout.width)
    layer_key = layer if pattern.uses_layer else None
    return _REACH.get_or_build(
        (pattern, video, layer_key, block_size), lambda: _frame_reach(pattern, video, layer, block_size)
    )


def _frame_reach(pattern: Pattern, video: VideoLayout, layer: int, block_size: int) -> torch.Tensor:
    frames = torch.arange(video.frames)
    frame_mask = frame_mask_of(pattern)
    if frame_mask is not None:
        return frame_mask(video, frames.view(-1, 1), frames.view(1, -1)).to(torch.bool)
    blocks = _global_block_of(pattern, video, layer, block_size)
    listed = _global_listed(pattern, video, layer, block_size)
    onehot = torch.zeros(video.frames, listed.shape[0])
    onehot[torch.arange(video.video_len) // video.tokens_per_frame, blocks] = 1.0
    return (onehot @ listed @ onehot.T) > 0


@dataclass(frozen=True)
class ClipExchange:
    """What rank ``rank`` sends, receives and all-gathers for one pattern and partition."""

    rank: int
    own: tuple[int, int]
    recv: tuple[tuple[int, tuple[int, ...]], ...]  # (src rank, frames) point to point
    send: tuple[tuple[int, tuple[int, ...]], ...]  # (dst rank, frames) point to point
    gathered: tuple[tuple[int, ...], ...]  # per rank: the global frames it contributes
    remote: tuple[int, ...]  # every frame of other ranks this rank attends, ascending


def exchange_plan(
    pattern: Pattern, layout: VideoLayout, partition: FramePartition, rank: int, layer: int = 0
) -> ClipExchange:
    """The frames rank ``rank`` exchanges (identical on every rank, computed without communication)."""
    partition.check_layout(layout)
    video = _video_only(layout)
    key = (pattern, video, partition, rank, layer if pattern.uses_layer else None)
    return _EXCHANGES.get_or_build(key, lambda: _exchange_plan(pattern, video, partition, rank, layer))


def _exchange_plan(
    pattern: Pattern, layout: VideoLayout, partition: FramePartition, rank: int, layer: int
) -> ClipExchange:
    reach = frame_reach(pattern, layout, layer)
    bounds = partition.bounds
    need = []
    for a, b in bounds:
        hit = reach[a:b].any(dim=0)
        hit[a:b] = False
        need.append(set(torch.nonzero(hit).flatten().tolist()))
    # Frames every rank needs (or owns) go through one all-gather instead of N-1 sends.
    globals_ = set(pattern.key_global_frames(layout))
    for r, (a, b) in enumerate(bounds):
        globals_ &= need[r] | set(range(a, b))
    p2p_need = [n - globals_ for n in need]
    a, b = bounds[rank]
    recv, send = [], []
    for other, (oa, ob) in enumerate(bounds):
        if other == rank:
            continue
        frames_in = tuple(sorted(f for f in p2p_need[rank] if oa <= f < ob))
        if frames_in:
            recv.append((other, frames_in))
        frames_out = tuple(sorted(f for f in p2p_need[other] if a <= f < b))
        if frames_out:
            send.append((other, frames_out))
    gathered = tuple(tuple(sorted(f for f in globals_ if oa <= f < ob)) for oa, ob in bounds)
    return ClipExchange(rank, (a, b), tuple(recv), tuple(send), gathered, tuple(sorted(need[rank])))


def _frame_tokens(frames: tuple[int, ...], start: int, hw: int, device) -> torch.Tensor:
    """Local video-token indices of absolute ``frames`` in a clip starting at frame ``start``.

    Cached per device, so steady-state calls copy nothing from the host.
    """

    def build() -> torch.Tensor:
        f = torch.tensor(frames, dtype=torch.int64) - start
        return (f.view(-1, 1) * hw + torch.arange(hw).view(1, -1)).flatten().to(device)

    return _INDICES.get_or_build((tuple(frames), start, hw, str(torch.device(device))), build)


def clip_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: VideoLayout,
    pattern: Pattern,
    runtime: ParallelRuntime,
    *,
    backend: str = "auto",
    layer: int = 0,
    text_mask: torch.Tensor | None = None,
    scale: float | None = None,
    block_size: int | None = None,
) -> torch.Tensor:
    """Self-attention of this rank's clip under ``pattern`` on the whole video ``layout``.

    q, k, v are [B, S_r, H, D]: the rank's video tokens (frames of ``FramePartition``) with
    the text span where the layout puts it. Returns this rank's rows of the single-device
    ``vidsparse.attention(..., layout, pattern)``.
    """
    partition = FramePartition(layout.frames, runtime.world_size)
    pattern.validate(layout)
    rank = runtime.rank
    local = partition.check_local_qkv("clip_attention", layout, rank, q, k, v)
    ex = exchange_plan(pattern, layout, partition, rank, layer)
    hw = layout.tokens_per_frame
    a, b = ex.own
    n_own = b - a
    vo = local.video_offset
    nv = n_own * hw
    B, _, H, D = q.shape
    k_vid, v_vid = k[:, vo : vo + nv], v[:, vo : vo + nv]

    # 1. Issue the communication: halos point to point, global frames all-gathered.
    kv = torch.stack([k_vid, v_vid])  # [2, B, nv, H, D]
    sends = {dst: kv[:, :, _frame_tokens(frames, a, hw, kv.device)] for dst, frames in ex.send}
    shapes = {src: (2, B, len(frames) * hw, H, D) for src, frames in ex.recv}
    halo = exchange(sends, shapes, runtime, kv.dtype, op="clip_halo")
    glob = None
    if any(ex.gathered):
        mine = kv[:, :, _frame_tokens(ex.gathered[rank], a, hw, kv.device)]
        sizes = [len(g) * hw for g in ex.gathered]
        glob = all_gather_uneven(mine, sizes, runtime, dim=2, op="clip_global", async_op=True)

    # 2. Meanwhile: own clip (and text keys) under the pattern.
    own_view = ClipView(pattern, _video_only(layout), tuple(range(a, b)), n_own, 0)
    out_a, lse_a = sparse_attention_lse(q, k, v, local, own_view, backend, layer, text_mask, scale, block_size)

    # 3. Received frames, in ascending frame order.
    received: dict[int, torch.Tensor] = {}
    for src, frames in ex.recv:
        t = halo.wait()[src]
        for i, f in enumerate(frames):
            received[f] = t[:, :, i * hw : (i + 1) * hw]
    if glob is not None:
        for src, (frames, t) in enumerate(zip(ex.gathered, glob.wait())):
            if src == rank:
                continue
            for i, f in enumerate(frames):
                received[f] = t[:, :, i * hw : (i + 1) * hw]
    halo.wait()
    missing = [f for f in ex.remote if f not in received]
    if missing:  # pragma: no cover - guarded by exchange_plan
        raise RuntimeError(f"clip_attention: frames {missing} were not received on rank {rank}.")

    remote_kv = torch.cat([received[f] for f in ex.remote], dim=2) if ex.remote else None
    out_vid = _with_remote(
        q, k_vid, v_vid, out_a, lse_a, remote_kv, ex, layout, local, pattern, backend, layer, scale, block_size
    )

    if not layout.text_len:
        return out_vid.to(q.dtype)
    # 4. Text queries attend every video key (all ranks) and the text once: merge across ranks.
    to, T = local.text_offset, layout.text_len
    q_txt = q[:, to : to + T]
    if rank == 0:
        keys_k, keys_v = torch.cat([k_vid, k[:, to : to + T]], 1), torch.cat([v_vid, v[:, to : to + T]], 1)
        valid = None
        if text_mask is not None:
            valid = torch.cat([torch.ones(B, nv, dtype=torch.bool, device=q.device), text_mask.to(torch.bool)], 1)
    else:
        keys_k, keys_v, valid = k_vid, v_vid, None
    out_txt = merged_rows_attention(q_txt, keys_k, keys_v, runtime, valid, scale, op="clip_text")
    pieces = [out_txt, out_vid.to(q.dtype)] if layout.text_position == "before" else [out_vid.to(q.dtype), out_txt]
    return torch.cat(pieces, dim=1)


def _with_remote(
    q, k_vid, v_vid, out_a, lse_a, remote_kv, ex, layout, local, pattern, backend, layer, scale, block_size
):
    """Own-clip rows merged with the attention over the received frames ``remote_kv`` [2, B, nr*hw, H, D]."""
    hw = layout.tokens_per_frame
    a, b = ex.own
    n_own = b - a
    vo, nv = local.video_offset, n_own * hw
    out_vid, lse_vid = out_a[:, vo : vo + nv], lse_a[:, vo : vo + nv]
    if remote_kv is None:
        return out_vid
    B, _, H, D = q.shape
    q_vid = q[:, vo : vo + nv]
    n_rem = len(ex.remote)
    sub = VideoLayout(n_own + n_rem, layout.height, layout.width)
    view = ClipView(pattern, _video_only(layout), tuple(range(a, b)) + ex.remote, n_own, n_own)
    q_b = torch.cat([q_vid, q_vid.new_zeros(B, n_rem * hw, H, D)], dim=1)
    k_b = torch.cat([k_vid, remote_kv[0]], dim=1)
    v_b = torch.cat([v_vid, remote_kv[1]], dim=1)
    out_b, lse_b = sparse_attention_lse(q_b, k_b, v_b, sub, view, backend, layer, None, scale, block_size)
    out, _ = merge_partials([(out_vid, lse_vid), (out_b[:, :nv], lse_b[:, :nv])], dtype=q.dtype)
    return out


def clip_compute(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: VideoLayout,
    pattern: Pattern,
    rank: int,
    world_size: int,
    *,
    backend: str = "auto",
    layer: int = 0,
    scale: float | None = None,
    block_size: int | None = None,
) -> torch.Tensor:
    """The attention work rank ``rank`` does in ``clip_attention``, without communicating.

    For timing one rank on one device (benchmarks): the received frames are stand-ins (the
    rank's own keys repeated), so the output is not the attention's; the work is the same.
    q, k, v are the rank's [B, S_r, H, D] (video only).
    """
    if layout.text_len:
        raise ValueError("clip_compute times video-only layouts; pass a layout without text.")
    partition = FramePartition(layout.frames, world_size)
    local = partition.local_layout(layout, rank)
    ex = exchange_plan(pattern, layout, partition, rank, layer)
    own_view = ClipView(pattern, _video_only(layout), tuple(range(*ex.own)), ex.own[1] - ex.own[0], 0)
    out_a, lse_a = sparse_attention_lse(q, k, v, local, own_view, backend, layer, None, scale, block_size)
    remote = None
    if ex.remote:
        hw = layout.tokens_per_frame
        need = len(ex.remote) * hw
        reps = -(-need // k.shape[1])
        remote = torch.stack([k.repeat(1, reps, 1, 1)[:, :need], v.repeat(1, reps, 1, 1)[:, :need]])
    return _with_remote(q, k, v, out_a, lse_a, remote, ex, layout, local, pattern, backend, layer, scale, block_size)


def _video_only(layout: VideoLayout) -> VideoLayout:
    return VideoLayout(layout.frames, layout.height, layout.width)
