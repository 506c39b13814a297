"""Triton backend: block-sparse flash attention on a ``BlockSparsePlan`` (forward + backward).

``attention`` takes caller-order q/k/v [B, S, H, D] and fuses the plan's token permutation
into the kernels' loads and stores (no gather/scatter pass). ``run`` takes kernel-order
[B, H, S_pad, D] tensors like the other backends. Both go through one
``torch.library.custom_op`` (``vidsparse::block_sparse_attention``) whose arguments are the
plan's own tensors, so ``torch.compile(fullgraph=True)`` and CUDA graphs see one opaque op.
Kernel-side views of the plan (masked-first lists, the transposed plan for dK/dV, uint8
masks) are built on the device once per plan and cached; a static plan costs no host-device
synchronisation per call.

On a GPU the kernels autotune their tiles per (head dim, block size, flags, sequence length)
on first use; ``VIDSPARSE_TRITON_AUTOTUNE=0`` skips that and uses the first (default) config.
CPU tensors run in Triton's interpreter (``TRITON_INTERPRET=1`` set before this module is
imported): slow, for tests only.
"""

import torch

from vidsparse.kernels import triton_kernels as tk
from vidsparse.kernels.triton_plan import (
    CACHE,
    BlockLists,
    kernel_rows,
    mask_table,
    padding_codes,
    split_lists,
    transpose_lists,
)
from vidsparse.plan import BlockSparsePlan, group_major

DEFAULT_BLOCK_SIZE = 128
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
Tensor = torch.Tensor


def device_reason(device: torch.device, dtype: torch.dtype, backward: bool = False) -> str | None:
    """Why this backend cannot run tensors of ``dtype`` on ``device`` (None when it can): what is
    known before a model loads, so ``vidsparse generate`` refuses before loading weights. The
    backward runs wherever the forward does (``backward`` is part of the backend interface)."""
    if device.type == "cpu":
        if not tk.INTERPRETED:
            return (
                "CPU tensors run only in Triton's interpreter: set TRITON_INTERPRET=1 before "
                "vidsparse.kernels.triton_backend is first imported (tests only; it is slow)"
            )
    elif device.type != "cuda":
        return f"tensors on {device.type} are not supported (CUDA, or CPU with TRITON_INTERPRET=1)"
    elif not tk.INTERPRETED and torch.cuda.get_device_capability(device) < (8, 0):
        return "the Triton kernels need a GPU of compute capability 8.0 or newer (Ampere, Hopper, ...)"
    if dtype not in _DTYPES:
        return f"dtype {dtype} is not supported (float16, bfloat16 or float32)"
    if tk.INTERPRETED and dtype == torch.bfloat16:
        return "Triton's CPU interpreter computes bfloat16 dots wrongly; use float16 or float32 there"
    return None


def unsupported_reason(q: Tensor) -> str | None:
    """Why this backend cannot run ``q`` (None when it can)."""
    reason = device_reason(q.device, q.dtype)
    if reason is not None:
        return reason
    d = q.shape[-1]
    if d < 16 or d > 256 or d & (d - 1):
        return f"head dim {d} is not supported (a power of two from 16 to 256)"
    return None


# -- plan views (cached) -------------------------------------------------------------------


def _is_dynamic(query_select: Tensor | None) -> bool:
    return query_select is not None


def _cached(tag, sources, build, dynamic: bool, extra=()):
    return build() if dynamic else CACHE.get(tag, sources, build, extra)


def _plan_args(
    q: Tensor,
    kv_counts: Tensor,
    kv_indices: Tensor,
    mask_ids: Tensor,
    block_masks: Tensor,
    text_blocks: Tensor,
    gather: Tensor | None,
    token_valid: Tensor | None,
    key_valid: Tensor | None,
    query_select: Tensor | None,
    key_group: Tensor | None,
    block_size: int,
) -> tk.PlanArgs:
    B, S, H, _ = q.shape
    dyn = _is_dynamic(query_select)
    padded = gather.shape[0] if gather is not None else S
    with_kv = key_valid is not None
    codes = _codes(kv_indices, mask_ids, block_masks, token_valid, gather, block_size, dyn)
    lists = _cached(
        "lists",
        (kv_counts, kv_indices, mask_ids, text_blocks, codes),
        lambda: split_lists(kv_counts, kv_indices, mask_ids, text_blocks if with_kv else None, codes),
        dyn,
        (with_kv,),
    )
    rows = valid = None
    if gather is not None:
        rows = _cached("rows", (gather, token_valid), lambda: kernel_rows(gather, token_valid), False)
    if token_valid is not None:
        valid = _cached("valid", (token_valid,), lambda: token_valid.to(torch.uint8).contiguous(), False)
    masks = _cached("masks", (block_masks,), lambda: mask_table(block_masks, block_size), dyn, (block_size,))
    qs = kg = None
    if query_select is not None:
        # Group-major (VMoBA builds it so: no copy): a tile's rows of one group are one load.
        qs = group_major(_as_u8(query_select)).expand(B, H, padded, query_select.shape[-1])
        kg = key_group.to(torch.int32).contiguous()
    kv = None if key_valid is None else _as_u8(key_valid).expand(B, padded).contiguous()
    order = _cached("query-order", (kv_counts,), lambda: tk.longest_first(lists), dyn)
    return tk.PlanArgs(rows, lists, masks, kv, qs, kg, block_size, padded, order, valid)


def _codes(kv_indices, mask_ids, block_masks, token_valid, gather, block_size: int, dynamic: bool) -> Tensor:
    """Mask ids with padding-only blocks recoded (``padding_codes``) for the kernel-order
    kernels; unchanged without padding or with a row gather (those kernels mask by element)."""
    if token_valid is None or gather is not None:  # the row-gather kernels have no padding-only loop
        return mask_ids
    return _cached(
        "pad-codes",
        (kv_indices, mask_ids, block_masks, token_valid),
        lambda: padding_codes(kv_indices, mask_ids, block_masks, token_valid, block_size),
        dynamic,
        (block_size,),
    )


def _as_u8(t: Tensor) -> Tensor:
    """A uint8 view of a bool tensor (no copy), or a uint8 copy of anything else."""
    return t.view(torch.uint8) if t.dtype == torch.bool else (t != 0).to(torch.uint8)


def _transposed(kv_counts, kv_indices, mask_ids, num_blocks: int, dynamic: bool) -> BlockLists:
    return _cached(
        "transposed",
        (kv_counts, kv_indices, mask_ids),
        lambda: transpose_lists(kv_counts, kv_indices, mask_ids, num_blocks),
        dynamic,
        (num_blocks,),
    )


def _d_contig(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


# -- custom ops ----------------------------------------------------------------------------


@torch.library.custom_op("vidsparse::block_sparse_attention", mutates_args=())
def block_sparse_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    kv_counts: Tensor,
    kv_indices: Tensor,
    mask_ids: Tensor,
    block_masks: Tensor,
    text_blocks: Tensor,
    gather: Tensor | None,
    token_valid: Tensor | None,
    key_valid: Tensor | None,
    query_select: Tensor | None,
    key_group: Tensor | None,
    scale: float,
    block_size: int,
) -> tuple[Tensor, Tensor]:
    """Block-sparse attention of q, k, v [B, S, H, D] -> (out [B, S, H, D], lse fp32 [B, H, S_pad]).

    With ``gather`` (int64 [S_pad], caller token per kernel position) and ``token_valid``
    the kernels read and write caller order; without ``gather``, kernel order is caller order.
    ``token_valid`` (bool [S_pad]) also lets blocks that are partial only through padding skip
    their element mask for a 1-D validity test (``triton_plan.padding_codes``).
    """
    q, k, v = _d_contig(q), _d_contig(k), _d_contig(v)
    p = _plan_args(q, kv_counts, kv_indices, mask_ids, block_masks, text_blocks, gather, token_valid,
                   key_valid, query_select, key_group, block_size)  # fmt: skip
    return tk.forward(q, k, v, p, scale)


@block_sparse_attention.register_fake
def _(q, k, v, kv_counts, kv_indices, mask_ids, block_masks, text_blocks, gather, token_valid, key_valid,
      query_select, key_group, scale, block_size):  # fmt: skip
    B, S, H, _ = q.shape
    padded = gather.shape[0] if gather is not None else S
    return q.new_empty(q.shape), q.new_empty((B, H, padded), dtype=torch.float32)


@torch.library.custom_op("vidsparse::block_sparse_attention_backward", mutates_args=())
def block_sparse_attention_backward(
    grad_out: Tensor,
    grad_lse: Tensor | None,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    kv_counts: Tensor,
    kv_indices: Tensor,
    mask_ids: Tensor,
    block_masks: Tensor,
    text_blocks: Tensor,
    gather: Tensor | None,
    token_valid: Tensor | None,
    key_valid: Tensor | None,
    query_select: Tensor | None,
    key_group: Tensor | None,
    scale: float,
    block_size: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) of ``block_sparse_attention`` (FlashAttention-2 style, two passes)."""
    q, k, v, out, grad_out = (_d_contig(t) for t in (q, k, v, out, grad_out))
    p = _plan_args(q, kv_counts, kv_indices, mask_ids, block_masks, text_blocks, gather, token_valid,
                   key_valid, query_select, key_group, block_size)  # fmt: skip
    dyn = _is_dynamic(query_select)
    codes = _codes(kv_indices, mask_ids, block_masks, token_valid, gather, block_size, dyn)
    t_lists = _transposed(kv_counts, kv_indices, codes, p.padded_len // block_size, dyn)
    dlse = None if grad_lse is None else grad_lse.float().contiguous()
    return tk.backward(grad_out, dlse, q, k, v, out, lse.contiguous(), p, t_lists, scale)


@block_sparse_attention_backward.register_fake
def _(grad_out, grad_lse, q, k, v, out, lse, *rest):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, *plan_tensors, scale, block_size = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, *plan_tensors)
    ctx.scale = scale
    ctx.block_size = block_size


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, *plan_tensors = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    dq, dk, dv = block_sparse_attention_backward(
        grad_out, grad_lse, q, k, v, out, lse, *plan_tensors, ctx.scale, ctx.block_size
    )
    return (dq, dk, dv) + (None,) * (len(plan_tensors) + 2)


block_sparse_attention.register_autograd(_backward, setup_context=_setup_context)


# -- public entry points -------------------------------------------------------------------


def _check(q: Tensor, k: Tensor, v: Tensor, plan: BlockSparsePlan, seq_len: int, what: str) -> None:
    if not isinstance(plan, BlockSparsePlan):
        raise TypeError(f"plan must be a vidsparse.BlockSparsePlan, got {type(plan).__name__}.")
    reason = unsupported_reason(q)
    if reason is not None:
        raise ValueError(f"The triton backend cannot run this call: {reason}.")
    if q.shape != k.shape or k.shape != v.shape or q.dim() != 4:
        raise ValueError(f"q, k, v must share one 4-D shape; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}.")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype}.")
    if plan.block_size < 16:
        raise ValueError(
            f"The triton backend needs block_size >= 16 (tensor-core tiles), the plan has {plan.block_size}. "
            "Plan with a power of two from 16 up (64 or 128 run fastest on GPUs; 128 is the default)."
        )
    if q.shape[1] != seq_len:
        raise ValueError(f"{what} must have {seq_len} tokens for this plan, got {q.shape[1]}.")
    if plan.device != q.device:
        raise ValueError(f"The plan lives on {plan.device} but q is on {q.device}; build it with device=q.device.")
    B, H = q.shape[0], q.shape[2]
    Bp, Hp = plan.kv_counts.shape[:2]
    if Bp not in (1, B) or Hp not in (1, H):
        raise ValueError(
            f"The plan is for batch {Bp} x heads {Hp}, the inputs have batch {B} x heads {H}; "
            "plan with num_heads equal to the heads of q (or 1)."
        )
    if plan.query_select is not None and plan.query_select.shape[0] not in (1, B):
        raise ValueError(
            f"The plan's query selection is for batch {plan.query_select.shape[0]}, the inputs have batch {B}."
        )


def _op_args(plan: BlockSparsePlan, fused_order: bool):
    """The plan tensors of the custom op: ``gather`` only when the kernels fuse the caller
    order; ``token_valid`` whenever the sequence has padding (padding-only blocks)."""
    order = plan.order
    fuse = fused_order and not order.identity
    return (
        plan.kv_counts,
        plan.kv_indices,
        plan.mask_ids,
        plan.block_masks,
        plan.text_blocks,
        order.gather if fuse else None,
        None if order.identity else order.token_valid,
    )


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    plan: BlockSparsePlan,
    text_mask: Tensor | None = None,
    scale: float | None = None,
) -> Tensor:
    """Caller-order q, k, v [B, S, H, D] -> out [B, S, H, D]; the permutation is fused in the kernels."""
    if not isinstance(plan, BlockSparsePlan):
        raise TypeError(f"plan must be a vidsparse.BlockSparsePlan, got {type(plan).__name__}.")
    _check(q, k, v, plan, plan.layout.seq_len, "q, k, v (caller order)")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    key_valid = plan.key_valid(text_mask, q.shape[0])
    out, _ = block_sparse_attention(
        q, k, v, *_op_args(plan, True), key_valid, plan.query_select, plan.key_group, scale, plan.block_size
    )
    return out


def run(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    plan: BlockSparsePlan,
    key_valid: Tensor | None = None,
    scale: float | None = None,
) -> tuple[Tensor, Tensor]:
    """Kernel-order q, k, v [B, H, S_pad, D] -> (out [B, H, S_pad, D], lse fp32 [B, H, S_pad])."""
    if not isinstance(plan, BlockSparsePlan):
        raise TypeError(f"plan must be a vidsparse.BlockSparsePlan, got {type(plan).__name__}.")
    qs, ks, vs = (t.transpose(1, 2) for t in (q, k, v))
    _check(qs, ks, vs, plan, plan.padded_len, "q, k, v (kernel order, dim 2)")
    if key_valid is not None and tuple(key_valid.shape) != (q.shape[0], plan.padded_len):
        raise ValueError(
            f"key_valid must be bool [B, S_pad] = [{q.shape[0]}, {plan.padded_len}] in kernel order "
            f"(plan.key_valid(text_mask, B) builds it), got {tuple(key_valid.shape)}."
        )
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    out, lse = block_sparse_attention(
        qs, ks, vs, *_op_args(plan, False), key_valid, plan.query_select, plan.key_group, scale, plan.block_size
    )
    return out.transpose(1, 2), lse


def to_kernel_order(x: Tensor, plan: BlockSparsePlan) -> Tensor:
    """Caller-order [B, S, H, D] -> contiguous kernel-order [B, S_pad, H, D] (padding rows 0).

    Every layer of a transformer forward shares the plan's order, so a model can permute its
    hidden states once per forward and call ``attention_kernel_order`` in every layer: the
    kernels then read whole contiguous tiles through TMA descriptors instead of gathering rows.
    """
    return plan.order.to_kernel(x).contiguous()


def from_kernel_order(y: Tensor, plan: BlockSparsePlan) -> Tensor:
    """Kernel-order [B, S_pad, H, D] -> caller-order [B, S, H, D] (the inverse of ``to_kernel_order``)."""
    return plan.order.to_caller(y)


def attention_kernel_order(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    plan: BlockSparsePlan,
    text_mask: Tensor | None = None,
    scale: float | None = None,
) -> Tensor:
    """Kernel-order q, k, v [B, S_pad, H, D] (e.g. from ``to_kernel_order``) -> out, same order."""
    if not isinstance(plan, BlockSparsePlan):
        raise TypeError(f"plan must be a vidsparse.BlockSparsePlan, got {type(plan).__name__}.")
    _check(q, k, v, plan, plan.padded_len, "q, k, v (kernel order, dim 1)")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    key_valid = plan.key_valid(text_mask, q.shape[0])
    out, _ = block_sparse_attention(
        q, k, v, *_op_args(plan, False), key_valid, plan.query_select, plan.key_group, scale, plan.block_size
    )
    return out


__all__ = [
    "DEFAULT_BLOCK_SIZE",
    "attention",
    "attention_kernel_order",
    "block_sparse_attention",
    "device_reason",
    "from_kernel_order",
    "run",
    "to_kernel_order",
    "unsupported_reason",
]
