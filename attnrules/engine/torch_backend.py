"""The reference backend: blocked plain torch.

Scores are computed one tile of ``block_q`` queries × ``block_k`` keys at a time and merged into a
running top-k by ``merge`` (the engine's one merge), so memory is O(tile + k). Ties are resolved
explicitly by the lower (query, key) index. Slow next to the fused kernels, but simple enough to
trust: the native and Triton backends are held to it.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from attnrules.engine import merge
from attnrules.engine.contract import Request, TopK

Tile = Callable[[slice, slice], torch.Tensor]  # (query rows, key rows) -> scores [bq, bk]


DEFAULT_BLOCK = 1024


def is_available() -> bool:
    return True


def probe(device_type: str) -> None:
    """Plain torch runs wherever torch does."""
    return None


def _tile_function(request: Request) -> Tile:
    """Scores of one tile of queries × keys, as the request defines them."""
    q, kk, w = request.queries, request.keys, request.key_weight
    qa, ka = request.query_acts, request.key_acts

    def tile(rows: slice, cols: slice) -> torch.Tensor:
        a = q[rows] @ kk[cols].T
        if qa is not None:
            s = a * (qa[rows] @ ka[cols].T)
        elif request.score == "exp":
            s = torch.exp(a)
            if w is not None:
                s = s * w[cols]
        else:
            s = a if w is None else a * w[cols]
        return s.abs() if request.score == "absolute" else s

    return tile


def _global_topk(request: Request, tile: Tile, block_q: int, block_k: int) -> TopK:
    nq, nk, k = request.queries.shape[0], request.keys.shape[0], request.k
    device = request.queries.device
    best_s = torch.empty(0, dtype=request.queries.dtype, device=device)
    best_i = torch.empty(0, dtype=torch.int64, device=device)
    for q0 in range(0, nq, block_q):
        rows = slice(q0, min(q0 + block_q, nq))
        q_index = torch.arange(rows.start, rows.stop, device=device)
        for k0 in range(0, nk, block_k):
            cols = slice(k0, min(k0 + block_k, nk))
            s = tile(rows, cols).flatten()
            flat = (q_index[:, None] * nk + torch.arange(cols.start, cols.stop, device=device)[None, :]).flatten()
            if best_s.numel() == k:  # reject by threshold: only scores that can still enter survive
                keep = (s >= best_s[-1]) | torch.isnan(s)  # a NaN goes on, to be refused by the contract
                s, flat = s[keep], flat[keep]
            best_s, best_i = merge.top_flat(torch.cat([best_s, s]), torch.cat([best_i, flat]), k)
    return TopK(best_s, best_i // nk, best_i % nk, "global")


def _row_topk(request: Request, tile: Tile, block_q: int, block_k: int) -> TopK:
    """Per-query (rows = queries) or per-key (rows = keys) top-k."""
    per_key = request.by == "key"
    n_rows = request.keys.shape[0] if per_key else request.queries.shape[0]
    n_cols = request.queries.shape[0] if per_key else request.keys.shape[0]
    block_r, block_c = (block_k, block_q) if per_key else (block_q, block_k)
    k, device = request.k, request.queries.device
    out_s, out_c = [], []
    for r0 in range(0, n_rows, block_r):
        rows = slice(r0, min(r0 + block_r, n_rows))
        best_s = torch.empty(rows.stop - r0, 0, dtype=request.queries.dtype, device=device)
        best_c = torch.empty(rows.stop - r0, 0, dtype=torch.int64, device=device)
        for c0 in range(0, n_cols, block_c):
            cols = slice(c0, min(c0 + block_c, n_cols))
            s = tile(cols, rows).T if per_key else tile(rows, cols)
            c = torch.arange(cols.start, cols.stop, device=device).expand(s.shape[0], -1)
            # Candidates arrive in increasing column order and best_* already holds each tie in
            # column order, so ties stand in order for the merge.
            best_s, best_c = merge.top_per_row(torch.cat([best_s, s], 1), torch.cat([best_c, c], 1), k,
                                               ties_in_order=True)
        out_s.append(best_s)
        out_c.append(best_c)
    scores, cols = torch.cat(out_s), torch.cat(out_c)
    rows = torch.arange(n_rows, device=device)[:, None].expand_as(cols)
    if per_key:
        return TopK(scores, cols, rows.clone(), "key")
    return TopK(scores, rows.clone(), cols, "query")


def topk(request: Request, *, block_q: Optional[int] = None, block_k: Optional[int] = None) -> TopK:
    """``engine.pair_topk`` or ``engine.dual_topk`` (the request says which), ``block_q`` queries ×
    ``block_k`` keys per tile (None: 1024)."""
    block_q = DEFAULT_BLOCK if block_q is None else block_q
    block_k = DEFAULT_BLOCK if block_k is None else block_k
    if block_q < 1 or block_k < 1:
        raise ValueError(f"block_q and block_k must be positive, got {block_q}, {block_k}")
    tile = _tile_function(request)
    if request.by == "global":
        return _global_topk(request, tile, block_q, block_k)
    return _row_topk(request, tile, block_q, block_k)
