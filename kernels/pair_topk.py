"""pair_topk: the tile of (queries[q]·keys[k]) × key_weight[k] (signed, absolute, or exp(q·k) × w) and its entry."""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .launch import Buffers, Operands, stream
from .topk_stream import dot_tile


@triton.jit
def pair_tile(a_tile, xa_tile, a_ptr, b_ptr, xa_ptr, xb_ptr, offs_r, offs_c, mask_r, mask_c,
              stride_a, stride_b, stride_xa, stride_xb, d, n_x,
              SCORE: tl.constexpr, HAS_XA: tl.constexpr, HAS_XB: tl.constexpr, STATIONARY: tl.constexpr,
              BLOCK_D: tl.constexpr, BLOCK_X: tl.constexpr, PRECISION: tl.constexpr, EMULATE: tl.constexpr):
    """Scores of one tile; the key weight is the extra operand of whichever side holds the keys
    (``xa_tile``: the rows' weights, loaded once per program)."""
    s = dot_tile(a_tile, a_ptr, b_ptr, offs_r, offs_c, mask_r, mask_c, stride_a, stride_b, d,
                 BLOCK_D, STATIONARY, PRECISION, EMULATE)
    if SCORE == 2:
        s = tl.exp(s)
    if HAS_XA:
        s = s * xa_tile[:, None]
    if HAS_XB:
        s = s * tl.load(xb_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)[None, :]
    if SCORE == 1:
        s = tl.abs(s)
    return s


def pair_candidates(
    rows: torch.Tensor,
    cols: torch.Tensor,
    k: int,
    *,
    per_row: bool,
    row_weight: Optional[torch.Tensor] = None,
    col_weight: Optional[torch.Tensor] = None,
    score: str = "signed",
    **plan_options,
) -> Buffers:
    """The kernel's buffers for the k best pairs by (rows[r]·cols[c]) × weight, the weight ``[n]`` on
    the side that holds the keys (or its absolute value, or exp(rows[r]·cols[c]) × weight); see
    launch.stream."""
    return stream(pair_tile, Operands(rows, cols, row_weight, col_weight), k, per_row=per_row, score=score,
                  dual=False, **plan_options)
