"""dual_topk: the tile of (queries[q]·keys[k]) × (query_acts[q]·key_acts[k]), both at once, and its entry."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import Buffers, Operands, stream
from .topk_stream import dot_tile


@triton.jit
def dual_tile(a_tile, xa_tile, a_ptr, b_ptr, xa_ptr, xb_ptr, offs_r, offs_c, mask_r, mask_c,
              stride_a, stride_b, stride_xa, stride_xb, d, n_x,
              SCORE: tl.constexpr, HAS_XA: tl.constexpr, HAS_XB: tl.constexpr, STATIONARY: tl.constexpr,
              BLOCK_D: tl.constexpr, BLOCK_X: tl.constexpr, PRECISION: tl.constexpr, EMULATE: tl.constexpr):
    """Scores of one tile: the pair product times the exemplar product (extras = activations; the
    rows of both in ``a_tile``, ``xa_tile`` when stationary)."""
    s = dot_tile(a_tile, a_ptr, b_ptr, offs_r, offs_c, mask_r, mask_c, stride_a, stride_b, d,
                 BLOCK_D, STATIONARY, PRECISION, EMULATE)
    s *= dot_tile(xa_tile, xa_ptr, xb_ptr, offs_r, offs_c, mask_r, mask_c, stride_xa, stride_xb, n_x,
                  BLOCK_X, STATIONARY, PRECISION, EMULATE)
    if SCORE == 1:
        s = tl.abs(s)
    return s


def dual_candidates(
    rows: torch.Tensor,
    cols: torch.Tensor,
    row_acts: torch.Tensor,
    col_acts: torch.Tensor,
    k: int,
    *,
    per_row: bool,
    score: str = "signed",
    **plan_options,
) -> Buffers:
    """The kernel's buffers for the k best pairs by (rows[r]·cols[c]) × (row_acts[r]·col_acts[c]);
    see launch.stream."""
    if score not in ("signed", "absolute"):
        raise ValueError(f"score must be 'signed' or 'absolute' for dual_topk, got {score!r}")
    return stream(dual_tile, Operands(rows, cols, row_acts, col_acts), k, per_row=per_row, score=score,
                  dual=True, **plan_options)
