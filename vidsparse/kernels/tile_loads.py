"""Row-gathered tile loads shared by the query-major (``triton_kernels``) and key-block-major
(``keyblock_triton``) Triton kernels.

Both families read whole [rows, head dim] tiles of caller-order [B, S, H, D] tensors through a
row map (kernel position or packed slot -> caller token, -1 = padding): the same clamp, mask
and zero fill. On the GPU these helpers are inlined (the sm_90 build is instruction for
instruction the same: ``benchmarks/offline_compile.py``). They are called once per program
(prologues), not per key tile: Triton's CPU interpreter pays about 0.4 ms per nested jitted
call, so the per-tile bodies keep their loads inline.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def caller_rows(Rows, offs):
    """(row int64 clamped to >= 0, ok) of kernel positions ``offs``: ``Rows`` holds the caller
    token of each position, -1 for padding (``ok`` False, row 0 so the address stays valid)."""
    row = tl.load(Rows + offs)
    ok = row >= 0
    return tl.maximum(row, 0).to(tl.int64), ok


@triton.jit
def row_tile(base, row, ok, stride, HEAD_DIM: tl.constexpr):
    """[len(row), HEAD_DIM] tile of rows ``row`` (row stride ``stride``, unit head-dim stride)
    from ``base``; rows with ``ok`` False read zeros."""
    offs_d = tl.arange(0, HEAD_DIM)
    return tl.load(base + row[:, None] * stride + offs_d[None, :], mask=ok[:, None], other=0.0)
