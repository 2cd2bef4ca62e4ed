"""The one merge of the engine: candidate pairs in, the sorted top-k out, ties by the lower index.

Every backend that gathers candidates in pieces (the torch reference per tile, the Triton backend per
kernel program) ends here, so the contract's order is written down once:

- scores descending;
- among equal scores, the lower (query, key) index first — for a flat global list the lower
  ``query × Nk + key``, per row the lower column;
- ``-0.0`` ties with ``+0.0``; NaN ranks above everything (the engine refuses NaN scores before and
  after a backend runs, see ``contract``; ranking them first makes sure one reaches that check).

Nothing here knows about models or kernels: plain torch tensors, any device, float32 or float64.
"""
from __future__ import annotations

from typing import Optional

import torch

_SENTINEL = -(2**63)  # smaller than every packed key: an empty slot
_LOW32 = 0xFFFFFFFF


def pack_float32(scores: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """int64 keys whose order is (score descending, index ascending): larger key = better pair.

    The high 32 bits order like the float32 score (``-0.0`` folded onto ``+0.0``, every NaN onto the
    positive quiet NaN, which orders above ``+inf``), the low 32 bits like the reversed index, which
    must lie in ``[0, 2**32)``. The Triton kernels pack their candidates the same way.
    """
    s = torch.where(scores == 0, torch.zeros_like(scores), scores)
    s = torch.where(torch.isnan(s), torch.full_like(s, float("nan")).abs(), s)
    bits = s.view(torch.int32)
    ordered = (bits ^ ((bits >> 31) & 0x7FFFFFFF)).to(torch.int64)
    return (ordered << 32) + (_LOW32 - index)


def unpack_float32(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(float32 scores, int64 indices) of packed keys: the inverse of :func:`pack_float32`."""
    high = (keys >> 32).to(torch.int32)
    bits = high ^ ((high >> 31) & 0x7FFFFFFF)
    return bits.view(torch.float32), _LOW32 - (keys & _LOW32)


def top_flat(scores: torch.Tensor, index: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k best of a flat candidate list (``scores``, distinct int64 ``index``), ties by lower index.

    Candidates below the k-th largest score are dropped first (every tie at the k-th is kept), so the
    exact two-key sort only sees about k entries.
    """
    if scores.numel() > 2 * k:
        kth = torch.topk(scores, k).values[-1]  # NaN counts as the largest, as in the sorts below
        keep = (scores >= kth) | torch.isnan(scores)
        scores, index = scores[keep], index[keep]
    by_index = torch.argsort(index)
    scores, index = scores[by_index], index[by_index]
    best = torch.sort(scores, descending=True, stable=True).indices[:k]
    return scores[best], index[best]


def top_pairs(
    scores: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, n_cols: int, k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The k best (score, row, col) of a flat candidate list, ties by the lower (row, col)."""
    s, flat = top_flat(scores, rows * n_cols + cols, k)
    return s, flat // n_cols, flat % n_cols


def top_per_row(
    scores: torch.Tensor,
    cols: torch.Tensor,
    k: int,
    *,
    valid: Optional[torch.Tensor] = None,
    ties_in_order: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's k best (score, column) of ``[n_rows, n]`` candidates, best first, ties by lower column.

    ``valid`` marks the real candidates (others rank last; every row must hold at least k real ones).
    Rows of fewer than k candidates give all of them.
    ``ties_in_order``: the caller promises that equal scores of a row already stand in increasing
    column order (for float64 one stable sort then suffices; float32 rows are packed into exact int64
    keys, columns below 2**32, and need no promise).
    """
    k = min(k, scores.shape[1])  # a running merge may hold fewer than k so far
    if scores.dtype == torch.float32:  # one integer top-k over exact (score, column) keys
        keys = pack_float32(scores, cols)
        if valid is not None:
            keys = torch.where(valid, keys, torch.full_like(keys, _SENTINEL))
        return unpack_float32(torch.topk(keys, k, dim=1).values)
    if valid is not None:
        scores = torch.where(valid, scores, torch.full_like(scores, float("-inf")))
        cols = torch.where(valid, cols, torch.full_like(cols, torch.iinfo(torch.int64).max))
    if not ties_in_order:
        by_col = torch.argsort(cols, dim=1, stable=True)
        scores, cols = torch.gather(scores, 1, by_col), torch.gather(cols, 1, by_col)
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]
    return torch.gather(scores, 1, order), torch.gather(cols, 1, order)


def ranks_above(
    score_a: torch.Tensor, index_a: torch.Tensor, score_b: torch.Tensor, index_b: torch.Tensor
) -> torch.Tensor:
    """True where pair a ranks strictly above pair b in the contract's order (score, then lower index)."""
    return (score_a > score_b) | ((score_a == score_b) & (index_a < index_b))
