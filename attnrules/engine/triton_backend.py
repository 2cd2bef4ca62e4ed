"""The Triton backend: fused streaming top-k kernels (``attnrules.kernels``) for CUDA tensors.

Each kernel program holds a block of queries (or keys, for ``by="key"``), streams the other side
past it tile by tile, scores each tile with ``tl.dot`` and keeps only the scores above a running
k-th threshold (``kernels/topk_stream.py``; block sizes and grid from ``kernels/plan.py``). The small
candidate set comes back and is merged by the engine's one merge (``merge.py``), ties by the lower
(query, key) index.

Options (keyword arguments of ``engine.pair_topk`` / ``engine.dual_topk``): ``block_q``, ``block_k``
as on every backend (powers of two ≥ 16; ``None``: planned, the streamed side autotuned on a GPU),
and its own ``precision`` ("ieee" fp32, the default; "tf32"; "tf32x3"), ``n_splits`` (column splits
per row block) and, for by="global", ``program_k`` (candidates each program keeps).

by="global" with k above ``program_k``: a program that had to drop pairs may have dropped some of
the top k. The merge checks each such program's cut-off pair against the merged k-th pair; a program
whose cut-off ranks above it is run again by the same kernel over its region with programs small
enough that none drops a pair, and its candidates replace the old ones. No other backend is called.

CPU tensors are copied to the GPU when there is one (and the answer copied back), so a caller whose
tensors live on the CPU — the pipeline keeps its circuit there — can still ask for ``backend="triton"``;
without a GPU they run only in Triton's interpreter (``TRITON_INTERPRET=1`` set before attnrules is
imported), which is how the tests check every kernel on this machine.
"""
from __future__ import annotations

import os
from typing import Callable, Optional

import torch
import triton

from attnrules.engine import merge
from attnrules.engine.contract import Request, TopK
from attnrules.kernels import topk_stream
from attnrules.kernels.dual_topk import dual_candidates
from attnrules.kernels.launch import GlobalCandidates
from attnrules.kernels.pair_topk import pair_candidates

REPAIR_BLOCK_R = 16  # rows per program when a region is run again: 16 × 128 pairs per program ≤ K


def probe(device_type: str) -> Optional[str]:
    """None when the kernels can run on tensors of ``device_type`` here, else why not."""
    if device_type == "cuda":
        return None if torch.cuda.is_available() else "no CUDA GPU here (torch.cuda.is_available() is False)"
    if device_type == "cpu":
        if topk_stream.INTERPRETED or torch.cuda.is_available():  # interpreted, or run on the GPU and copied back
            return None
        if os.environ.get("TRITON_INTERPRET") == "1":
            return "TRITON_INTERPRET=1 is set but attnrules.kernels was imported before it was"
        return ("there is no CUDA GPU to copy CPU tensors to, and Triton's interpreter is off: set "
                "TRITON_INTERPRET=1 before importing attnrules (tests only), or use backend='cpu'")  # fmt: skip
    return f"Triton runs on cuda tensors, not {device_type}"


def is_available() -> bool:
    """True with a CUDA GPU, or when the kernels were built for Triton's CPU interpreter."""
    return probe("cuda") is None or probe("cpu") is None


def _check_block(name: str, value: Optional[int]) -> None:
    if value is not None and (value < 16 or value & (value - 1)):
        raise ValueError(f"{name} must be a power of two ≥ 16 for backend='triton', got {value!r}")


Region = tuple[int, int, int, int]  # (row_start, row_stop, col_start, col_stop)
Kernel = Callable[..., object]  # (region, k, per_row, **plan options) -> candidates


def _kernel(request: Request, rows_are_keys: bool) -> tuple[Kernel, int, int]:
    """The kernel over a region of the (rows × cols) pair matrix, and its shape."""
    q, kk, w = request.queries, request.keys, request.key_weight
    rows, cols = (kk, q) if rows_are_keys else (q, kk)

    def run(region: Region, k: int, *, per_row: bool, **plan_options):
        r0, r1, c0, c1 = region
        if request.dual:
            row_x, col_x = (request.key_acts, request.query_acts) if rows_are_keys else \
                (request.query_acts, request.key_acts)  # fmt: skip
            return dual_candidates(rows[r0:r1], cols[c0:c1], row_x[r0:r1], col_x[c0:c1], k, per_row=per_row,
                                   score=request.score, **plan_options)  # fmt: skip
        row_w = None if w is None or not rows_are_keys else w[r0:r1]
        col_w = None if w is None or rows_are_keys else w[c0:c1]
        return pair_candidates(rows[r0:r1], cols[c0:c1], k, per_row=per_row, row_weight=row_w, col_weight=col_w,
                               score=request.score, **plan_options)  # fmt: skip

    return run, rows.shape[0], cols.shape[0]


def _unverified(found: GlobalCandidates, best: tuple[torch.Tensor, ...], k: int, n_cols: int) -> torch.Tensor:
    """Programs that may have dropped one of the top k: cut, with a cut-off pair above the k-th.

    Every kept candidate is a real pair, so the merged k-th ranks at or below the true k-th: a
    program whose cut-off ranks at or below the merged k-th dropped nothing of the top k.
    """
    cut = found.cut
    if k <= found.k_program or not bool(cut.any()):
        return torch.zeros_like(cut)
    scores, rows, cols = best
    if scores.numel() < k:  # fewer candidates than k: every cut program may hold more
        return cut
    cut_index = found.cut_rows * n_cols + found.cut_cols
    return cut & merge.ranks_above(found.cut_scores, cut_index, scores[-1], rows[-1] * n_cols + cols[-1])


def _global(run: Kernel, region: Region, k: int, plan_options: dict, depth: int = 0):
    """Exact global top-k (scores, rows, cols) of ``region``, in the region's coordinates."""
    r0, r1, c0, c1 = region
    n_cols = c1 - c0
    k = min(k, (r1 - r0) * n_cols)
    found = run(region, k, per_row=False, **plan_options)
    best = merge.top_pairs(found.scores, found.rows, found.cols, n_cols, k)
    bad = _unverified(found, best, k, n_cols)
    if not bool(bad.any()):
        return best
    if depth > 0:  # cannot happen: a rerun's programs are too small to drop a pair (see REPAIR_BLOCK_R)
        raise RuntimeError("triton backend: a rerun region still dropped top pairs; please report this")
    keep = ~bad[found.program]
    scores, rows, cols = [found.scores[keep]], [found.rows[keep]], [found.cols[keep]]
    # Each bad region again, in programs of REPAIR_BLOCK_R rows × one column block: at most
    # 16 × 128 = 2,048 pairs each, which a program keeps whole when K ≥ 2,048 (k > 4,096) and which
    # k ≤ K covers exactly otherwise.
    step = topk_stream.AUTOTUNE_BLOCK_C_MAX
    for b0, b1, d0, d1 in found.regions[bad].tolist():
        fine = dict(plan_options, block_r=REPAIR_BLOCK_R, n_splits=triton.cdiv(d1 - d0, step), program_k=None)
        s, r, c = _global(run, (r0 + b0, r0 + b1, c0 + d0, c0 + d1), k, fine, depth + 1)
        scores.append(s)
        rows.append(r + b0)
        cols.append(c + d0)
    return merge.top_pairs(torch.cat(scores), torch.cat(rows), torch.cat(cols), n_cols, k)


def topk(
    request: Request,
    *,
    block_q: Optional[int] = None,
    block_k: Optional[int] = None,
    precision: str = "ieee",
    n_splits: Optional[int] = None,
    program_k: Optional[int] = None,
) -> TopK:
    """``engine.pair_topk`` — fused top-k of (q·k) × key_weight (signed / absolute / exp) — or
    ``engine.dual_topk`` — of (q·k) × (query_acts[q]·key_acts[k]) — on the GPU (the request says which)."""
    _check_block("block_q", block_q)
    _check_block("block_k", block_k)
    if request.queries.device.type == "cpu" and not topk_stream.INTERPRETED:  # run on the GPU, answer on the CPU
        on_gpu = Request(**{**vars(request), **{n: x.cuda() for n, x in request.tensors().items()}})
        found = topk(on_gpu, block_q=block_q, block_k=block_k, precision=precision, n_splits=n_splits,
                     program_k=program_k)
        return TopK(found.scores.cpu(), found.query_idx.cpu(), found.key_idx.cpu(), found.by)
    per_key = request.by == "key"
    # The kernel's rows are the side it ranks for: keys for by="key", queries otherwise.
    block_r, block_c = (block_k, block_q) if per_key else (block_q, block_k)
    names = ("block_k", "block_q") if per_key else ("block_q", "block_k")
    plan_options = dict(precision=precision, block_r=block_r, block_c=block_c, n_splits=n_splits,
                        program_k=program_k, names=names)  # fmt: skip
    run, n_rows, n_cols = _kernel(request, rows_are_keys=per_key)
    k = request.k
    if request.by == "global":
        scores, rows, cols = _global(run, (0, n_rows, 0, n_cols), k, plan_options)
        return TopK(scores, rows, cols, "global")
    found = run((0, n_rows, 0, n_cols), k, per_row=True, **plan_options)
    scores, cols = merge.top_per_row(found.scores, found.cols, k, valid=found.valid)
    fixed = torch.arange(n_rows, device=cols.device)[:, None].expand_as(cols).clone()
    return TopK(scores, cols, fixed, "key") if per_key else TopK(scores, fixed, cols, "query")
