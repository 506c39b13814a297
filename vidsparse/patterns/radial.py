"""Radial Attention (Li et al., NeurIPS 2025; mit-han-lab/radial-attention): a static
block mask whose temporal band decays logarithmically with frame distance.

Definition (the reference's ``gen_log_mask_shrinked`` at commit 72788d4)
-----------------------------------------------------------------------
``T`` = tokens per frame, ``P = 2 ** T.bit_length()`` (the power of two *above* ``T``, also
when ``T`` itself is a power of two: 64 -> 128, 3840 -> 4096), ``B`` = ``block_size``.
For a query frame ``i`` and key frame ``j`` at distance ``d = |i - j|`` the token mask of
the frame pair is, on within-frame raster indices ``k`` (query) and ``l`` (key):

- ``sink`` and ``j == 0``: all ones (Wan's attention sink; HunyuanVideo has none);
- ``d <= 1``: all ones;
- ``d >= 2``: ``|k - l| <= w`` with ``w = max(P / 2**g * decay_factor, B)``, ``g = d.bit_length()``,
  and the whole pair is dropped unless ``d % split == 0`` when the *undecayed* width
  ``P / 2**g`` is below ``skip_threshold`` (``split = int(skip_threshold / (P / 2**g))``,
  so only every 2nd, 4th, ... distance survives once the band is thinner than a block).

Each frame-pair token mask is blockified with the reference's ``shrinkMaskStrict``: a
``B x B`` tile is on when strictly more than 60 % of its non-empty columns have a
coverage strictly above 1/3. The comparison ``|k - l| <= w`` is made in float32, as the
reference's torch expression does. Text tokens are not the pattern's business: the plan
builder keeps text rows and columns dense, as the reference does.

Frame-aligned blocks (where this departs from the reference, on purpose)
------------------------------------------------------------------------
The pattern's natural granularity is its block mask, so ``video_order`` pads every frame to
``nb = ceil(T / B)`` whole blocks (padding slots ``-1``): frame ``f`` owns radial blocks
``f * nb ... f * nb + nb - 1``. When ``T % B == 0`` this order is the identity and the
block mask is the reference's, bit for bit (41 x 3840, decay 1.0, sink: 73.6 % sparsity).
Otherwise (native Wan 480p, T = 1560; 720p, T = 3600) the reference cannot run (its
kernels need a multiple of 128 tokens) and its crop drops a frame's trailing partial
tile; here a frame's last block holds ``r < B`` real tokens and the coverage rule is
applied to the real tokens of the tile: a column's coverage is (attending real query
rows) / (real query rows), only real columns count. For full tiles this is exactly the
reference rule; for tail tiles it keeps every frame's diagonal block (no dropped tails).

``skip_threshold`` (default ``None`` = ``block_size``) is the width below which distances
are thinned. The reference hard-codes 128, equal to its default block; pass
``skip_threshold=128`` with ``block_size=64`` to reproduce its Wan2.2 processor exactly.
For frames smaller than one block the reference would also thin ``d = 1``; here
``d <= 1`` is always dense, as the method is described.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, ClassVar

import torch

from vidsparse.layout import VideoLayout
from vidsparse.patterns.base import Pattern

_EMPTY, _DENSE = 0, 1  # tile kinds; bands follow from 2 on


@dataclass(frozen=True)
class Radial(Pattern):
    """Radial Attention: dense for adjacent frames, a log-decaying raster band further away.

    See the module docstring for the exact rule.

    Args:
        decay_factor: scales the band width, > 0 (the reference scripts use 0.2 for Wan2.1, 0.8
            for Wan2.2, 0.95 for HunyuanVideo, 1.0 for the long-video LoRAs).
        block_size: the radial block in tokens, a power of two >= 16 (128 as in the paper, 64 for
            Wan2.2). Left unset where a model family's settings apply (vidsparse.apply, vidsparse
            generate, vidsparse train-lora), frames of fewer than 128 tokens take the kernel block
            instead: generate's --block-size, else the next power of two >= the tokens per frame
            (at least 16). vidsparse inspect and ``Radial()`` keep 128.
        sink: adds the dense latent-frame-0 key column (Wan's attention sink; HunyuanVideo has none).
        skip_threshold: undecayed band width in tokens below which frame distances are thinned
            (only every 2nd, 4th, ... distance kept); ``None`` = ``block_size``. The reference
            hard-codes 128: 128 with a block of 64 reproduces its Wan2.2 processor.
    """

    decay_factor: float = 1.0
    block_size: int = 128
    sink: bool = False
    skip_threshold: int | None = None

    name: ClassVar[str] = "radial"

    @classmethod
    def fit_defaults(cls, options: dict[str, Any], layout: VideoLayout, block_size: int | None) -> dict[str, Any]:
        """Radial's block is 128 (the paper) or the family's, unless a frame holds fewer tokens:
        then the call's kernel block (or the grid's automatic one)."""
        from vidsparse.layout import auto_block_size

        block = options.get("block_size", 128)
        if layout.tokens_per_frame < block:  # not below 16, Radial's smallest block (a kernel block may be)
            block = max(16, block_size or auto_block_size(layout) or block)
        return {**options, "block_size": block}

    uses_layer: ClassVar[bool] = False

    def __post_init__(self) -> None:
        d = self.decay_factor
        if isinstance(d, bool) or not isinstance(d, (int, float)):
            raise TypeError(f"Radial.decay_factor must be a float > 0 (e.g. 0.2 or 1.0), got {d!r}.")
        if not math.isfinite(d) or d <= 0:
            raise ValueError(
                f"Radial.decay_factor must be a finite float > 0 (band width scale; 1.0 = the paper), got {d!r}."
            )
        object.__setattr__(self, "decay_factor", float(d))
        b = self.block_size
        if isinstance(b, bool) or not isinstance(b, int) or b < 16 or b & (b - 1):
            raise ValueError(
                f"Radial.block_size must be a power of two >= 16 (128 as in the paper, 64 for Wan2.2), got {b!r}."
            )
        if not isinstance(self.sink, bool):
            raise TypeError(
                f"Radial.sink must be a bool (True for Wan's latent-frame-0 sink, False for HunyuanVideo), "
                f"got {self.sink!r}."
            )
        t = self.skip_threshold
        if t is not None and (isinstance(t, bool) or not isinstance(t, int) or t < 1):
            raise ValueError(
                f"Radial.skip_threshold must be None (= block_size) or an int >= 1 (128 reproduces the "
                f"reference's hard-coded value), got {t!r}."
            )

    # -- the block mask ------------------------------------------------------------------
    def blocks_per_frame(self, layout: VideoLayout) -> int:
        return -(-layout.tokens_per_frame // self.block_size)

    def block_mask(self, layout: VideoLayout) -> torch.Tensor:
        """bool [NB, NB], NB = frames * ceil(T / block_size): the radial block matrix on
        frame-padded blocks (the reference's ``gen_log_mask_shrinked`` video part when aligned)."""
        return self._block_mask(layout).clone()

    def _block_mask(self, layout: VideoLayout) -> torch.Tensor:
        if not isinstance(layout, VideoLayout):
            raise TypeError(f"layout must be a vidsparse.VideoLayout, got {type(layout).__name__}.")
        threshold = self.block_size if self.skip_threshold is None else self.skip_threshold
        return _radial_block_mask(
            layout.frames, layout.tokens_per_frame, self.block_size, self.decay_factor, self.sink, threshold
        )

    def density(self, layout: VideoLayout) -> float:
        """Fraction of video blocks computed (1 - the paper's "sparsity")."""
        return float(self._block_mask(layout).double().mean())

    # -- Pattern contract ---------------------------------------------------------------
    def video_order(self, layout: VideoLayout, block_size: int) -> torch.Tensor | None:
        t, b = layout.tokens_per_frame, self.block_size
        if t % b == 0:
            return None
        nb = self.blocks_per_frame(layout)
        pos = torch.arange(nb * b, dtype=torch.int64)
        frame = torch.arange(layout.frames, dtype=torch.int64).view(-1, 1) * t
        order = torch.where(pos < t, frame + pos, torch.full_like(frame + pos, -1))
        return order.flatten()

    def video_mask(self, layout: VideoLayout, qi: torch.Tensor, ki: torch.Tensor, layer: int = 0) -> torch.Tensor:
        mask = self._block_mask(layout).to(qi.device)
        t, b, nb = layout.tokens_per_frame, self.block_size, self.blocks_per_frame(layout)
        qi, ki = qi.long(), ki.long().to(qi.device)
        return mask[(qi // t) * nb + (qi % t) // b, (ki // t) * nb + (ki % t) // b]

    def block_candidates(
        self, layout: VideoLayout, order: torch.Tensor, block_size: int, layer: int = 0
    ) -> torch.Tensor | None:
        """Exact int8 [NQ, NK] from the radial block mask: 2 = whole block, 1 = partly on, 0 = off.

        Kernel position ``p`` of our frame-padded order lies in radial block ``p // self.block_size``,
        so plan blocks are unions (plan block larger) or parts (smaller) of radial blocks.
        """
        bs, rb = block_size, self.block_size
        expected = self.video_order(layout, bs)
        if expected is None:
            expected = torch.arange(layout.video_len, dtype=torch.int64)
        n = order.numel()
        if (
            n % bs
            or n < expected.numel()
            or not torch.equal(order[: expected.numel()].cpu(), expected)
            or bool((order[expected.numel() :] >= 0).any())
        ):
            return None  # not our order: let the builder evaluate video_mask element by element
        mask = self._block_mask(layout)
        nr, nq = mask.shape[0], n // bs
        valid = (order.view(nq, bs) >= 0).any(dim=1).cpu()
        if bs <= rb:
            radial_of = torch.arange(nq) // (rb // bs)
            on = mask[radial_of][:, radial_of]
            out = torch.where(on, 2, 0).to(torch.int8)
        else:
            m = bs // rb
            size = nq * m
            any_on = torch.zeros(size, size, dtype=torch.bool)
            all_on = torch.ones(size, size, dtype=torch.bool)  # radial blocks past the video: padding
            any_on[:nr, :nr] = mask
            all_on[:nr, :nr] = mask
            any_on = any_on.view(nq, m, nq, m).any(dim=3).any(dim=1)
            all_on = all_on.view(nq, m, nq, m).all(dim=3).all(dim=1)
            out = torch.where(all_on & any_on, 2, torch.where(any_on, 1, 0)).to(torch.int8)
        out[~valid] = 0
        out[:, ~valid] = 0
        return out


@lru_cache(maxsize=8)
def _radial_block_mask(frames: int, t: int, b: int, decay: float, sink: bool, threshold: int) -> torch.Tensor:
    """The radial block matrix, built from one [nb, nb] tile per band width (cached by value)."""
    p = 2 ** t.bit_length()
    tiles = [torch.zeros(1, 1, dtype=torch.bool), _shrunk_band(t, b, t)]  # kinds _EMPTY, _DENSE
    width_kind: dict[int, int] = {}
    kind_of_distance = torch.empty(frames, dtype=torch.int64)
    for d in range(frames):
        if d <= 1:
            kind_of_distance[d] = _DENSE
            continue
        g = d.bit_length()
        undecayed = p / 2**g
        if p < threshold * 2**g and d % ((threshold * 2**g) // p) != 0:
            kind_of_distance[d] = _EMPTY  # thinned distance: the whole frame pair is skipped
            continue
        w = undecayed * decay
        w = w if w >= b else b
        w = math.floor(float(torch.tensor(w, dtype=torch.float32)))  # |k - l| <= w in float32
        if w not in width_kind:
            width_kind[w] = len(tiles)
            tiles.append(_shrunk_band(t, b, w))
        kind_of_distance[d] = width_kind[w]
    nb = tiles[_DENSE].shape[0]
    stacked = torch.stack([tile.expand(nb, nb) for tile in tiles])  # [K, nb, nb]
    frame = torch.arange(frames)
    kinds = kind_of_distance[(frame.view(-1, 1) - frame.view(1, -1)).abs()]
    if sink:
        kinds[:, 0] = _DENSE
    return stacked[kinds].permute(0, 2, 1, 3).reshape(frames * nb, frames * nb).contiguous()


def _shrunk_band(t: int, b: int, w: int) -> torch.Tensor:
    """shrinkMaskStrict of the frame-pair mask ``|k - l| <= w`` on frame-padded tiles, bool [nb, nb].

    Computed per (query block, key column) by interval counting, never as T x T tokens.
    Coverage of column l in query block a = (real rows k of a with |k - l| <= w) / (real rows of a);
    strict "> 1/3" and "> 60 %" are compared in integers (exact; equal to the reference's float test).
    """
    nb = -(-t // b)
    lo = torch.arange(nb, dtype=torch.int64) * b
    hi = torch.clamp(lo + b, max=t) - 1
    rows = (hi - lo + 1).view(nb, 1, 1)
    col = torch.arange(nb * b, dtype=torch.int64)
    count = torch.minimum(hi.view(-1, 1), col + w) - torch.maximum(lo.view(-1, 1), col - w) + 1
    count = count.clamp_min(0) * (col < t)  # padding columns are empty
    count = count.view(nb, nb, b)  # [query block, key block, column in block]
    nonempty = (count > 0).sum(dim=-1)
    high = (3 * count > rows).sum(dim=-1)
    return 5 * high > 3 * nonempty
