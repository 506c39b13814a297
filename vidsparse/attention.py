"""Functional entry points: ``plan``, ``token_mask`` and ``attention``."""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Callable
from typing import Any

import torch

from vidsparse.kernels.backends import AUTO, Backend, get_backend
from vidsparse.layout import VideoLayout
from vidsparse.patterns import Pattern, fitted_pattern, make_pattern
from vidsparse.plan import DEFAULT_BLOCK_SIZE, BlockSparsePlan, PlanCache, build_static_plan

_PLANS = PlanCache(maxsize=64)
_warned: set[str] = set()


def _as_pattern(pattern: Pattern | str, layout: Any = None, block_size: int | None = None) -> Pattern:
    """A pattern object as given; a name gets its class defaults fitted to ``layout``
    (``Pattern.fit_defaults``: windows cover at most an axis, blocks fit a frame), so a name
    runs on any grid, as it does through ``vs.apply``. An object is used exactly as given."""
    if isinstance(pattern, str):
        return fitted_pattern(pattern, layout, block_size) if isinstance(layout, VideoLayout) else make_pattern(pattern)
    if not isinstance(pattern, Pattern):
        raise TypeError(
            f"pattern must be a vidsparse pattern (e.g. vidsparse.Radial()) or a name, got {type(pattern).__name__}."
        )
    return pattern


def _check_layer(layer: Any) -> int:
    """``layer`` as an int (numpy integers, e.g. from ``np.arange``, included)."""
    if isinstance(layer, bool) or not isinstance(layer, numbers.Integral):
        raise TypeError(
            f"layer must be an int (the transformer block index, 0-based), got {type(layer).__name__} {layer!r}."
        )
    if layer < 0:
        raise ValueError(f"layer must be >= 0 (the transformer block index, 0-based), got {layer}.")
    return int(layer)


def _check_block_size(block_size: int) -> None:
    if (
        isinstance(block_size, bool)
        or not isinstance(block_size, int)
        or block_size < 1
        or block_size & (block_size - 1)
    ):
        raise ValueError(f"block_size must be a power of two (e.g. 64 or 128), got {block_size!r}.")


def plan(
    pattern: Pattern | str,
    layout: VideoLayout,
    num_heads: int = 1,
    layer: int = 0,
    device: torch.device | str = "cpu",
    q: torch.Tensor | None = None,
    k: torch.Tensor | None = None,
    block_size: int | None = None,
) -> BlockSparsePlan:
    """The block-sparse plan of a pattern on a layout.

    ``block_size``: the kernel block; ``None`` is 128, what ``vidsparse.attention`` plans with
    by default, and a pattern name is fitted as ``attention`` fits it for the same
    ``block_size``, so ``plan(name, layout).order.to_kernel`` prepares its ``kernel_order`` input.
    Static plans are cached by value (pattern, layout, heads, layer if the pattern uses it,
    block size, device); dynamic patterns (VMoBA) need ``q`` and ``k`` [B, S, H, D] and are
    planned per call.
    """
    if not isinstance(layout, VideoLayout):
        raise TypeError(f"layout must be a vidsparse.VideoLayout, got {type(layout).__name__}.")
    if block_size is not None:
        _check_block_size(block_size)
    pattern = _as_pattern(pattern, layout, block_size)
    block_size = DEFAULT_BLOCK_SIZE if block_size is None else block_size
    layer = _check_layer(layer)
    if isinstance(num_heads, (bool, float)) or (type(num_heads) is int and num_heads < 1):  # a SymInt (compile) passes
        raise ValueError(f"num_heads must be an int >= 1 (the attention heads the plan is for), got {num_heads!r}.")
    if pattern.dynamic:
        if q is None or k is None:
            raise ValueError(
                f"{type(pattern).__name__} depends on the queries and keys: pass q= and k= "
                "([B, S, H, D]) to vidsparse.plan / token_mask."
            )
        for name, t in (("q", q), ("k", k)):
            _check_bshd(name, t, layout)
        return pattern.dynamic_plan(layout, q, k, layer, block_size)
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"device={str(device)!r}, but this torch has no CUDA device ({torch.__version__}); plan on 'cpu' or "
            "pass the device of the tensors the plan is for."
        )
    key = (
        pattern,
        layout,
        int(num_heads),
        layer if pattern.uses_layer else None,
        block_size,
        str(device),
    )
    return _PLANS.get_or_build(key, lambda: build_static_plan(pattern, layout, num_heads, layer, block_size, device))


def clear_plan_cache() -> None:
    """Drop every cached static plan and what the backends derived from plans (the Triton
    kernel's block lists, FlexAttention's BlockMasks): those hold plan tensors alive, so
    clearing the plans alone would free no memory. All are rebuilt on the next call."""
    import sys

    from vidsparse.kernels.triton_plan import CACHE

    _PLANS.clear()
    CACHE.clear()
    flex = sys.modules.get("vidsparse.kernels.flex")  # not imported: nothing of it cached
    if flex is not None:
        flex.BLOCK_MASKS.clear()


def plan_to_token_mask(p: BlockSparsePlan) -> torch.Tensor:
    """Expand a plan to bool [Bp*, Hp, S, S] in the caller's token order (small sizes only)."""
    from vidsparse.kernels.reference import block_row_mask

    nb = p.num_blocks
    cols = torch.arange(nb, device=p.device)
    B = p.query_select.shape[0] if p.query_select is not None else p.kv_counts.shape[0]
    rows = [block_row_mask(p, qb, cols, None, B) for qb in range(nb)]
    full = torch.cat(rows, dim=2)  # [B|1, H|1, S_pad, S_pad]
    sc = p.order.scatter.to(full.device)
    return full[:, :, sc][:, :, :, sc]


def token_mask(
    pattern: Pattern | str,
    layout: VideoLayout,
    q: torch.Tensor | None = None,
    k: torch.Tensor | None = None,
    layer: int = 0,
    block_size: int | None = None,
) -> torch.Tensor:
    """The reference semantics: bool [heads or 1, S, S] in natural token order.

    True where query i may attend key j (text padding, given at call time, is not part
    of it). For dynamic patterns with a batch of several samples the result is
    [B, heads, S, S]. Materialises S x S: for small grids and tests. ``block_size`` as in
    ``plan``: with the same value (``None`` included) it is the mask ``attention`` runs, for a
    pattern name too (whose fitted defaults may depend on it, as VMoBA's tile granularity does).
    """
    num_heads = q.shape[2] if isinstance(q, torch.Tensor) and q.dim() == 4 else 1
    p = plan(
        pattern,
        layout,
        num_heads=num_heads,
        layer=layer,
        q=q,
        k=k,
        block_size=block_size,
        device=q.device if q is not None else "cpu",
    )
    m = plan_to_token_mask(p)
    return m[0] if m.shape[0] == 1 else m


def resolve_backend(backend: str, q: torch.Tensor) -> str:
    """Name of the backend that runs these inputs ("auto" picks triton on CUDA, else torch)."""
    if backend != AUTO:
        get_backend(backend)  # ValueError naming the registered backends
        return backend
    if q.is_cuda:
        triton = get_backend("triton")
        try:
            reason = triton.can_run(q)
        except ImportError as exc:
            _warn_once("auto-triton-import", f"vidsparse: triton backend unavailable ({exc}); using flex.")
            return "flex"
        if reason is None:
            return "triton"
        _warn_once(f"auto-{reason}", f"vidsparse: triton backend cannot run this call ({reason}); using flex.")
        return "flex"
    return "torch"


def backend_for(backend: str, q: torch.Tensor) -> Backend:
    """The ``Backend`` record that runs these inputs (``resolve_backend`` as a record)."""
    return get_backend(resolve_backend(backend, q))


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, stacklevel=3)


def _check_inputs(q, k, v, layout: VideoLayout, text_mask) -> None:
    _check_tensors(q, k, v)
    _check_bshd("q, k, v", q, layout)
    _check_text_mask(text_mask, q.shape[0], layout)


def _check_tensors(q, k, v) -> None:
    """q, k, v are 4-D floating tensors of one shape, dtype and device (any sequence length)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor [B, S, H, D], got {type(t).__name__}.")
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D [B, S, H, D] (diffusers' layout), got shape {tuple(t.shape)}.")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating tensor (fp32, fp16 or bf16), got {t.dtype}.")
    if q.shape != k.shape or k.shape != v.shape:
        raise ValueError(
            f"q, k, v must have the same shape [B, S, H, D] (self-attention); got q {tuple(q.shape)}, "
            f"k {tuple(k.shape)}, v {tuple(v.shape)}."
        )
    if q.dtype != k.dtype or k.dtype != v.dtype:
        raise TypeError(f"q, k, v must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype}. Cast them first.")
    if q.device != k.device or k.device != v.device:
        raise ValueError(f"q, k, v must be on one device; got {q.device}, {k.device}, {v.device}.")
    for dim, size in zip("BSHD", q.shape):
        if size < 1:
            raise ValueError(
                f"q, k, v [B, S, H, D] must have every dimension >= 1, got {dim}={size} (shape {tuple(q.shape)})."
            )


def _check_bshd(name: str, t: Any, layout: VideoLayout) -> None:
    """``t`` is a 4-D [B, S, H, D] tensor with the layout's S; [B, H, S, D] (SDPA's) is named."""
    if not isinstance(t, torch.Tensor) or t.dim() != 4:
        shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{name} must be a 4-D tensor [B, S, H, D] (diffusers' layout), got {shape}.")
    if t.shape[1] != layout.seq_len and t.shape[2] == layout.seq_len:
        several = "," in name
        fix = "q.transpose(1, 2) (and k, v)" if several else f"{name}.transpose(1, 2)"
        raise ValueError(
            f"{name} {'have' if several else 'has'} shape {tuple(t.shape)}: the layout's {layout.seq_len} tokens "
            f"({layout}) are in dim 2, so {'these look' if several else 'this looks'} like [B, H, S, D] (SDPA's "
            f"layout); vidsparse takes diffusers' [B, S, H, D]. Pass {fix}, and transpose the output back."
        )
    layout.check_seq_len(t.shape[1])


def _check_text_mask(text_mask: Any, batch: int, layout: VideoLayout) -> None:
    if text_mask is None:
        return
    if not isinstance(text_mask, torch.Tensor):
        raise TypeError(
            f"text_mask must be a bool torch.Tensor [B, text_len] (True = real text token), got "
            f"{type(text_mask).__name__}; e.g. torch.as_tensor(mask, dtype=torch.bool, device=q.device)."
        )
    if text_mask.dtype != torch.bool:
        # An additive mask (0 keep, -inf drop) read as "nonzero = keep" would invert it silently.
        raise TypeError(
            f"text_mask must be bool [B, text_len] (True = real text token), got {text_mask.dtype}. Convert a "
            "0/1 mask with mask.bool(), an additive one (0 = keep, -inf = drop) with mask == 0."
        )
    if layout.text_len == 0:
        raise ValueError("text_mask was given but the layout has no text span (text_len=0).")
    if tuple(text_mask.shape) != (batch, layout.text_len):
        raise ValueError(
            f"text_mask must be [B, text_len] = [{batch}, {layout.text_len}], got {tuple(text_mask.shape)}."
        )


def _check_call_options(scale: Any, block_size: Any) -> None:
    if scale is not None:
        if isinstance(scale, bool) or not isinstance(scale, numbers.Real):  # numpy floats too
            raise TypeError(
                f"scale must be None (1/sqrt(head_dim)) or a positive float, got {type(scale).__name__} {scale!r}."
            )
        if not math.isfinite(scale) or scale <= 0:
            raise ValueError(f"scale must be a finite float > 0 (softmax temperature), got {scale!r}.")
    if block_size is not None:
        _check_block_size(block_size)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: VideoLayout,
    pattern: Pattern | str,
    backend: str = "auto",
    layer: int = 0,
    text_mask: torch.Tensor | None = None,
    scale: float | None = None,
    block_size: int | None = None,
    kernel_order: bool = False,
) -> torch.Tensor:
    """Sparse self-attention of q, k, v [B, S, H, D] under ``pattern`` -> [B, S, H, D].

    Exactly softmax attention restricted to ``token_mask(pattern, layout)`` (and to the valid
    text tokens of ``text_mask`` [B, text_len]), whatever the backend.

    Args:
        q, k, v: [B, S, H, D] (diffusers' layout; SDPA's [B, H, S, D] is refused with a hint),
            one dtype and device, ``S = layout.seq_len``.
        layout: the latent grid after patchify and the text span (``VideoLayout``).
        pattern: a pattern object, used as given, or a name, whose class defaults are fitted
            to ``layout`` (windows cover at most an axis).
        backend: "auto" (triton on CUDA when it can run the call, else flex; torch on CPU),
            "torch" (exact, any device), "flex" (FlexAttention) or "triton" (CUDA).
        layer: transformer block index, for patterns that vary by layer (VMoBA's partitions).
        text_mask: bool [B, text_len], True for real text tokens (padding is never attended).
        scale: softmax scale; ``None`` is ``1 / sqrt(D)``.
        block_size: kernel block (a power of two); ``None`` is the backend's (128).

    ``kernel_order=True``: q, k, v are [B, S_pad, H, D] already in the plan's kernel order
    (``plan(...).order.to_kernel``, padding rows 0), e.g. a transformer forward permuted once
    for all its layers (``vidsparse.pipelines.hooks``); the output comes back in that order
    (padding rows are don't-care). Static patterns only (a dynamic plan reads caller-order q, k).
    """
    if not isinstance(layout, VideoLayout):
        raise TypeError(f"layout must be a vidsparse.VideoLayout, got {type(layout).__name__}.")
    _check_call_options(scale, block_size)  # before a name is fitted: a bad block_size is the call's, not the pattern's
    scale = None if scale is None else float(scale)
    pattern = _as_pattern(pattern, layout, block_size)
    if kernel_order:
        return _attention_kernel_order(q, k, v, layout, pattern, backend, layer, text_mask, scale, block_size)
    _check_inputs(q, k, v, layout, text_mask)
    chosen = backend_for(backend, q)
    if backend != AUTO:
        _raise_if_cannot_run(chosen, q, k, v)
    bs = chosen.default_block if block_size is None else block_size
    B, S, H, D = q.shape
    p = plan(pattern, layout, num_heads=H, layer=layer, device=q.device, q=q, k=k, block_size=bs)
    if p.group_spans is not None and chosen.key_block:
        # Key-block-major plan (per-query VMoBA): only the rows that chose each key block are computed.
        from vidsparse.kernels import keyblock

        return keyblock.attention(q, k, v, p, text_mask=text_mask, scale=scale, backend=chosen.name)
    if chosen.fused:
        # Backends that fuse the permutation (and register a custom op) take the caller layout.
        return chosen.attention(q, k, v, p, text_mask=text_mask, scale=scale)
    return run_permuted(chosen.run, q, k, v, p, text_mask, scale)


def _raise_if_cannot_run(chosen: Backend, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    reason = chosen.can_run(q, k, v)
    if reason is not None:
        other = "'flex'" if chosen.name == "torch" else "'torch' (any device, exact)"
        raise ValueError(
            f"backend={chosen.name!r} cannot run this call: {reason}. Use backend={other}, or backend='auto' "
            "to pick one that runs."
        )


def _attention_kernel_order(q, k, v, layout, pattern, backend, layer, text_mask, scale, block_size) -> torch.Tensor:
    """``attention(..., kernel_order=True)``: q, k, v [B, S_pad, H, D] in the plan's kernel order."""
    if pattern.dynamic:
        raise ValueError(
            f"{type(pattern).__name__} plans from caller-order q and k; call vidsparse.attention without kernel_order."
        )
    _check_tensors(q, k, v)
    chosen = backend_for(backend, q)
    _raise_if_cannot_run(chosen, q, k, v)
    bs = chosen.default_block if block_size is None else block_size
    p = plan(pattern, layout, num_heads=q.shape[2], layer=layer, device=q.device, block_size=bs)
    if q.shape[1] != p.padded_len:
        raise ValueError(
            f"kernel_order=True takes q, k, v [B, S_pad, H, D] with S_pad = {p.padded_len} (the plan's kernel "
            f"sequence for {layout}, block {bs}); got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}. "
            "Permute with vidsparse.plan(...).order.to_kernel(x)."
        )
    _check_text_mask(text_mask, q.shape[0], layout)
    return chosen.attention_kernel_order(q, k, v, p, text_mask=text_mask, scale=scale)


def run_permuted(
    run: Callable[..., tuple[torch.Tensor, torch.Tensor | None]],
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    p: BlockSparsePlan,
    text_mask: torch.Tensor | None,
    scale: float | None,
    *,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Gather into kernel order, run a backend, scatter back to [B, S, H, D].

    ``return_lse=True`` also returns the backend's per-row log-sum-exp scattered to [B, S, H]
    (as the backend computed it); clip parallelism merges partial attentions with it.
    """
    B = q.shape[0]
    order = p.order
    if order.identity:
        qk, kk, vk = (t.transpose(1, 2) for t in (q, k, v))
    else:
        g = order.gather
        qk, kk, vk = (t[:, g].transpose(1, 2) for t in (q, k, v))
    key_valid = p.key_valid(text_mask, B)  # static padding is already in the element masks
    out, lse = run(qk, kk, vk, p, key_valid=key_valid, scale=scale)
    out = out.transpose(1, 2)
    if not order.identity:
        out = out[:, order.scatter]
    if not return_lse:
        return out
    lse = lse.transpose(1, 2)
    return out, (lse if order.identity else lse[:, order.scatter])
