"""dual_topk: top-k of (queries[q]·keys[k]) × (query_acts[q]·key_acts[k]), both products in one tile."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .topk_stream import Result, dot_tile, run


@triton.jit
def dual_tile(a_ptr, b_ptr, xa_ptr, xb_ptr, offs_r, offs_c, mask_r, mask_c,
              stride_a, stride_b, stride_xa, stride_xb, d, n_x,
              SCORE: tl.constexpr, HAS_XA: tl.constexpr, HAS_XB: tl.constexpr,
              BLOCK_D: tl.constexpr, BLOCK_X: tl.constexpr, PRECISION: tl.constexpr):
    """Scores of one tile: the pair product times the exemplar product (extras = activations)."""
    s = dot_tile(a_ptr, b_ptr, offs_r, offs_c, mask_r, mask_c, stride_a, stride_b, d, BLOCK_D, PRECISION)
    s *= dot_tile(xa_ptr, xb_ptr, offs_r, offs_c, mask_r, mask_c, stride_xa, stride_xb, n_x, BLOCK_X, PRECISION)
    if SCORE == 1:
        s = tl.abs(s)
    return s


def dual_topk(
    queries: torch.Tensor,
    keys: torch.Tensor,
    query_acts: torch.Tensor,
    key_acts: torch.Tensor,
    k: int,
    *,
    by: str = "global",
    score: str = "signed",
    **options,
) -> Result:
    """The k best pairs by (queries[q]·keys[k]) × (query_acts[q]·key_acts[k]); see topk_stream.run."""
    if score not in ("signed", "absolute"):
        raise ValueError(f"score must be 'signed' or 'absolute' for dual_topk, got {score!r}")
    return run(dual_tile, queries, keys, query_acts, key_acts, k, by=by, score=score, **options)
