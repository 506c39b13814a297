"""The pattern contract: what a sparse spatiotemporal pattern tells the plan builder.

A pattern defines *which video token attends which video token* (``video_mask``) and,
optionally, *in which order the kernel should see the tokens* (``video_order``) so that
the attended pairs form dense blocks. Text tokens are handled once, in the plan builder,
for every pattern alike (see ``vidsparse.plan``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import torch

from vidsparse.layout import VideoLayout

if TYPE_CHECKING:
    from vidsparse.plan import BlockSparsePlan


class Pattern:
    """Base class of all patterns (frozen dataclasses in the subclasses).

    Static patterns implement ``video_mask`` (and optionally ``video_order`` and
    ``block_candidates`` for speed). Dynamic patterns (``dynamic = True``, e.g. VMoBA)
    depend on q/k and implement ``dynamic_plan`` instead.
    """

    name: ClassVar[str] = "pattern"
    #: Plans depend on q/k (``dynamic_plan``), not on the grid alone.
    dynamic: ClassVar[bool] = False
    #: Masks differ per layer: caches key on the layer index (else one plan serves every layer).
    uses_layer: ClassVar[bool] = False
    #: Family names the pattern supports (``None``: every family); checked by ``vidsparse.apply``.
    families: ClassVar[tuple[str, ...] | None] = None
    #: Text spans ("none", "before", "after") the pattern handles (``None``: all).
    text_positions: ClassVar[tuple[str, ...] | None] = None

    # -- family defaults -------------------------------------------------------------
    @classmethod
    def fit_defaults(cls, options: dict[str, Any], layout: VideoLayout, block_size: int | None) -> dict[str, Any]:
        """A model family's default options of this pattern, adapted to the grid ``layout``.

        ``block_size`` is the kernel block the call will use (``None``: backend default).
        Applied to family defaults only (before the user's options), so any resolution runs
        with the family's settings; the default keeps them as they are.
        """
        return options

    @classmethod
    def merge_options(cls, defaults: dict[str, Any], options: dict[str, Any]) -> dict[str, Any]:
        """The options a pattern name runs with: a family's ``defaults`` (already fitted to the grid)
        overridden by the user's ``options``. A class whose options constrain each other adapts
        the defaults the user did not set to the ones the user did (GNA: stride within kernel)."""
        return {**defaults, **options}

    # -- frame-level structure (clip parallelism) ------------------------------------
    def attended_frames(self, layout: VideoLayout, fq: torch.Tensor, fk: torch.Tensor) -> torch.Tensor | None:
        """bool, broadcast of query frames ``fq`` and key frames ``fk``, for patterns whose mask is
        a function of frames alone (exact frame reach); ``None`` (default) when it is not."""
        return None

    def key_global_frames(self, layout: VideoLayout) -> list[int]:
        """Frames every query attends (all-gathered once in clip parallelism); default none."""
        return []

    # -- validation ------------------------------------------------------------------
    def validate(self, layout: VideoLayout) -> None:
        """Raise ValueError when the pattern cannot run on this grid."""

    # -- static patterns -------------------------------------------------------------
    def video_order(self, layout: VideoLayout, block_size: int) -> torch.Tensor | None:
        """Kernel order of video tokens: int64 [Sv_pad], natural video index or -1 for padding.

        ``None`` keeps natural raster order. Padding slots let tiles (or frames) start on
        block boundaries; the plan builder masks them out.
        """
        return None

    def video_mask(self, layout: VideoLayout, qi: torch.Tensor, ki: torch.Tensor, layer: int = 0) -> torch.Tensor:
        """Element semantics: bool, broadcast of ``qi`` and ``ki`` (natural video indices)."""
        raise NotImplementedError(f"{type(self).__name__} does not define video_mask")

    def block_candidates(
        self,
        layout: VideoLayout,
        order: torch.Tensor,
        block_size: int,
        layer: int = 0,
    ) -> torch.Tensor | None:
        """Optional [NQ, NK] superset of video blocks with any attended pair.

        bool, or int8 with 0 = empty, 1 = evaluate ``video_mask`` on the block, 2 = every
        valid (query, key) pair of the block is attended (the builder then skips element
        evaluation and only masks key padding). Marking 2 is what makes big grids plan fast.

        ``order`` is the padded kernel order of video tokens (int64 [NQ * block_size],
        natural video index or -1), i.e. ``video_order`` padded to whole blocks.

        Returning ``None`` makes the builder evaluate ``video_mask`` on every pair (fine for
        small grids; patterns override it so big grids plan in linear time).
        """
        return None

    def block_masks(
        self,
        layout: VideoLayout,
        order: torch.Tensor,
        block_size: int,
        layer: int = 0,
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Optional element masks of candidate blocks, so the builder need not evaluate them.

        ``(ids, masks)``: int32 [NQ, NK] and bool [P, bs, bs]. Where ``block_candidates`` is 1
        and ``ids >= 0``, ``masks[ids]`` is the block's exact element mask in kernel order
        (False on padding keys; padding query rows are don't-care). Patterns whose blocks are
        products of a few per-axis shapes (neighborhood attention) plan large grids this way.
        """
        return None

    # -- dynamic patterns ------------------------------------------------------------
    def dynamic_plan(
        self,
        layout: VideoLayout,
        q: torch.Tensor,
        k: torch.Tensor,
        layer: int,
        block_size: int,
    ) -> BlockSparsePlan:
        """Plan for one call from q, k [B, S, H, D] (dynamic patterns only)."""
        raise NotImplementedError(f"{type(self).__name__} is static; use vidsparse.plan")

    # -- description -----------------------------------------------------------------
    def describe(self) -> str:
        return repr(self)


def normalize_pattern_name(name: str) -> str:
    """Registry key of a pattern name: "Attention_Tile" -> "attention-tile"."""
    return str(name).strip().lower().replace("_", "-")


def as_triple(value: int | tuple[int, ...] | list[int]) -> tuple[int, int, int]:
    """An int or a 3-sequence as a (t, h, w) tuple, unchecked (``per_axis`` validates)."""
    return (value, value, value) if isinstance(value, int) else tuple(value)  # type: ignore[return-value]


def per_axis(
    value: int | tuple[int, ...] | list[int], name: str, minimum: int = 1, allow_full: bool = False
) -> tuple[int, int, int]:
    """An int or a (t, h, w) sequence of ints >= ``minimum`` as a tuple; ``-1`` (the full
    axis) passes too if ``allow_full``. Errors name the option and the offending axis."""
    hint = " or -1 for the full axis" if allow_full else ""
    if isinstance(value, bool) or not isinstance(value, (int, tuple, list)):
        raise TypeError(f"{name} must be an int or a (t, h, w) tuple of 3 ints, got {value!r}.")
    values = (value,) * 3 if isinstance(value, int) else tuple(value)
    if len(values) != 3 or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise TypeError(
            f"{name} must be an int or a (t, h, w) tuple of 3 ints (one per axis: frames, height, "
            f"width), got {value!r}."
        )
    for axis, v in zip("thw", values):
        if v < minimum and not (allow_full and v == -1):
            raise ValueError(f"{name} must be >= {minimum}{hint} on every axis, got {values} (axis {axis}).")
    return values  # type: ignore[return-value]
