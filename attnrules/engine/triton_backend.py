"""The Triton backend: fused streaming top-k kernels (``attnrules.kernels``) for CUDA tensors.

Each kernel program holds a block of queries (or keys, for ``by="key"``) stationary, streams the
other side past it tile by tile, scores each tile with ``tl.dot`` and keeps only the scores that can
reach a running k-th threshold (``kernels/topk_stream.py``; block sizes, grid and the filter's error
margin from ``kernels/plan.py``). With ``precision="tf32"`` (the default) or ``"tf32x3"`` the tile is
first scored on tensor cores and only tiles that may hold survivors are scored again in fp32, so
the answer is the fp32 one; ``"ieee"`` scores every tile in fp32 only. The kernels' buffers are
decoded here and merged by the engine's one merge (``merge.py``), ties by the lower (query, key) index.

Options (keyword arguments of ``engine.pair_topk`` / ``engine.dual_topk``): ``block_q``, ``block_k``
as on every backend (powers of two ≥ 16; ``None``: the plan's defaults),
and its own ``precision``, ``n_splits`` (column splits per row block) and, for by="global",
``program_k`` (candidates each program keeps).

by="global": on large inputs a first pass over every 16th row gives the k-th score of that sample,
a lower bound of the answer's k-th score (lowered by the fp32 rounding spread); the full pass starts
every program's threshold there ("floor"), so programs keep only pairs that can matter. With k above
``program_k`` a program that had to drop pairs may have dropped some of the top k: the merge checks
each such program's cut-off pair against the merged k-th pair; a program whose cut-off ranks above
it is run again by the same kernel over its region with programs small enough that none drops a
pair, and its candidates replace the old ones. No other backend is called.

CPU tensors are copied to the GPU when there is one (and the answer copied back), so a caller whose
tensors live on the CPU — the pipeline keeps its circuit there — can still ask for ``backend="triton"``;
without a GPU they run only in Triton's interpreter (``TRITON_INTERPRET=1`` set before attnrules is
imported), which is how the tests check every kernel on this machine.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import triton

from attnrules.engine import merge
from attnrules.engine.contract import Request, TopK
from attnrules.kernels import plan as kernel_plan
from attnrules.kernels import topk_stream
from attnrules.kernels.dual_topk import dual_candidates
from attnrules.kernels.launch import Buffers
from attnrules.kernels.pair_topk import pair_candidates

REPAIR_BLOCK_R = 16  # rows per program when a region is run again: 16 × block_c pairs per program ≤ K
SAMPLE_STRIDE = 16  # by="global": the floor pass scores every 16th row ...
SAMPLE_MIN_ROWS = 2048  # ... of regions at least this tall, when the sample holds ≥ 4k pairs


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
Kernel = Callable[..., Buffers]  # (region, k, per_row, step=1, **plan options) -> the kernel's buffers


@dataclass(frozen=True)
class RowCandidates:
    """Per-row candidates ``[n_rows, n_splits × CAP]``: every row's k best are among its valid entries."""

    scores: torch.Tensor  # float32
    cols: torch.Tensor  # int64 column index
    valid: torch.Tensor  # bool: a real candidate (else an empty buffer slot)


@dataclass(frozen=True)
class GlobalCandidates:
    """Flat candidates of a global launch, with what each program dropped.

    Program p kept every pair of its region ``regions[p]`` = (row_start, row_stop, col_start,
    col_stop) that ranks above its cut-off pair (``cut_scores[p]`` at (``cut_rows[p]``,
    ``cut_cols[p]``), the K-th best it kept) wherever ``cut[p]``, and scores at or above the launch's
    floor; uncut programs kept every such pair. With k ≤ ``k_program`` every cut-off lies at or below
    the global k-th pair.
    """

    scores: torch.Tensor  # [n] float32
    rows: torch.Tensor  # [n] int64
    cols: torch.Tensor  # [n] int64
    program: torch.Tensor  # [n] int64: the program that kept the candidate
    regions: torch.Tensor  # [programs, 4] int64
    cut: torch.Tensor  # [programs] bool
    cut_scores: torch.Tensor  # [programs] float32
    cut_rows: torch.Tensor  # [programs] int64
    cut_cols: torch.Tensor  # [programs] int64
    k_program: int


def row_candidates(found: Buffers) -> RowCandidates:
    """Per-row buffers ``[n_splits, n_rows, CAP]`` as one candidate row per row (keys hold the column)."""
    n_splits, n_rows, cap = found.keys.shape
    valid = torch.arange(cap, device=found.keys.device) < found.count[..., None].long()
    keys = found.keys.permute(1, 0, 2).reshape(n_rows, n_splits * cap)
    valid = valid.permute(1, 0, 2).reshape(n_rows, n_splits * cap)
    scores, cols = merge.unpack_float32(torch.where(valid, keys, torch.zeros_like(keys)))
    return RowCandidates(scores, cols, valid)


def global_candidates(found: Buffers) -> GlobalCandidates:
    """Global-mode buffers ``[programs, CAP]`` as flat candidates in (row, column) coordinates."""
    p = found.plan
    n_programs, cap = found.keys.shape
    device = found.keys.device
    program = torch.arange(n_programs, device=device)
    row0 = (program // p.n_splits) * p.block_r
    col0 = (program % p.n_splits) * p.cols_per_split
    live = torch.arange(cap, device=device)[None, :] < found.count[:, None].long()
    scores, local = merge.unpack_float32(found.keys[live])
    owner = program[:, None].expand(-1, cap)[live]
    # Keys hold the index within the program's region, row-major over the full column range.
    rows = row0[owner] + local // p.n_cols
    cols = local % p.n_cols
    cut = found.thr != topk_stream.SENTINEL
    cut_scores, cut_local = merge.unpack_float32(torch.where(cut, found.thr, torch.zeros_like(found.thr)))
    regions = torch.stack([row0, torch.clamp(row0 + p.block_r, max=p.n_rows),
                           col0, torch.clamp(col0 + p.cols_per_split, max=p.n_cols)], dim=1)  # fmt: skip
    return GlobalCandidates(scores, rows, cols, owner, regions, cut, cut_scores,
                            row0 + cut_local // p.n_cols, cut_local % p.n_cols, p.k_program)  # fmt: skip


def _kernel(request: Request, rows_are_keys: bool) -> tuple[Kernel, int, int]:
    """The kernel over a region of the (rows × cols) pair matrix (every ``step``-th row), and its shape."""
    q, kk, w = request.queries, request.keys, request.key_weight
    rows, cols = (kk, q) if rows_are_keys else (q, kk)

    def run(region: Region, k: int, *, per_row: bool, step: int = 1, **plan_options) -> Buffers:
        r0, r1, c0, c1 = region
        picked = slice(r0, r1, step)
        if request.dual:
            row_x, col_x = (request.key_acts, request.query_acts) if rows_are_keys else \
                (request.query_acts, request.key_acts)  # fmt: skip
            return dual_candidates(rows[picked], cols[c0:c1], row_x[picked], col_x[c0:c1], k, per_row=per_row,
                                   score=request.score, **plan_options)  # fmt: skip
        row_w = None if w is None or not rows_are_keys else w[picked]
        col_w = None if w is None or rows_are_keys else w[c0:c1]
        return pair_candidates(rows[picked], cols[c0:c1], k, per_row=per_row, row_weight=row_w, col_weight=col_w,
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


def _floor(run: Kernel, region: Region, k: int, plan_options: dict, request: Request) -> float:
    """A score no higher than the region's k-th best: the k-th best candidate of every
    SAMPLE_STRIDE-th row (k real pairs score at least that much), lowered by how far two fp32
    evaluations of one score may differ; -inf when no sample is taken (small regions, exp scores)."""
    r0, r1, c0, c1 = region
    n_sample = len(range(r0, r1, SAMPLE_STRIDE))
    if request.score == "exp" or r1 - r0 < SAMPLE_MIN_ROWS or n_sample * (c1 - c0) < 4 * k:
        return float("-inf")
    cands = global_candidates(run(region, k, per_row=False, step=SAMPLE_STRIDE, **plan_options))
    if cands.scores.numel() < k:
        return float("-inf")
    kth = float(torch.topk(cands.scores, k).values[-1])
    if not math.isfinite(kth):  # overflow (±inf, NaN): no usable bound; the engine's NaN policy applies
        return float("-inf")
    n_x = request.query_acts.shape[1] if request.dual else None
    return kth - kernel_plan.fp32_spread(request.queries.shape[1], n_x) * _norm_bound(request)


def _norm_bound(request: Request) -> float:
    """max over pairs of the margin's norm product (na × nb of launch.norms), as a float."""
    qn = torch.linalg.vector_norm(request.queries.float(), dim=1)
    kn = torch.linalg.vector_norm(request.keys.float(), dim=1)
    if request.dual:
        qn = qn * torch.linalg.vector_norm(request.query_acts.float(), dim=1)
        kn = kn * torch.linalg.vector_norm(request.key_acts.float(), dim=1)
    elif request.key_weight is not None:
        kn = kn * request.key_weight.float().abs()
    return float(qn.max()) * float(kn.max())


def _merged(found: Buffers, k: int, n_cols: int, plan_options: dict, rerun: Callable, depth: int = 0):
    """Exact top-k (scores, rows, cols) of one global launch's region, repairing dropped regions by
    ``rerun(region, k, plan_options)`` (region in the launch's coordinates)."""
    cands = global_candidates(found)
    best = merge.top_pairs(cands.scores, cands.rows, cands.cols, n_cols, k)
    bad = _unverified(cands, best, k, n_cols)
    if not bool(bad.any()):
        return best
    if depth > 0:  # cannot happen: a rerun's programs are too small to drop a pair (see REPAIR_BLOCK_R)
        raise RuntimeError("triton backend: a rerun region still dropped top pairs; please report this")
    keep = ~bad[cands.program]
    scores, rows, cols = [cands.scores[keep]], [cands.rows[keep]], [cands.cols[keep]]
    # Each bad region again, in programs of REPAIR_BLOCK_R rows × one column block: at most
    # 16 × 256 = 4,096 pairs each (block_r × block_c ≤ 8,192 for by="global"), which a program keeps
    # whole with K = 4,096 (k > 4,096) and which k ≤ K covers exactly otherwise.
    block_c = found.plan.block_c
    for b0, b1, d0, d1 in cands.regions[bad].tolist():
        fine = dict(plan_options, block_r=REPAIR_BLOCK_R, block_c=block_c, n_splits=triton.cdiv(d1 - d0, block_c),
                    program_k=min(k, kernel_plan.MAX_PROGRAM_K))
        sub_k = min(k, (b1 - b0) * (d1 - d0))
        again = rerun((b0, b1, d0, d1), sub_k, fine)
        s, r, c = _merged(again, sub_k, d1 - d0, fine, None, depth + 1)
        scores.append(s)
        rows.append(r + b0)
        cols.append(c + d0)
    return merge.top_pairs(torch.cat(scores), torch.cat(rows), torch.cat(cols), n_cols, k)


def _global(run: Kernel, region: Region, k: int, plan_options: dict, request: Request):
    """Exact global top-k (scores, rows, cols) of ``region``, in the region's coordinates."""
    r0, r1, c0, c1 = region
    k = min(k, (r1 - r0) * (c1 - c0))
    floor = _floor(run, region, k, plan_options, request)
    found = run(region, k, per_row=False, floor=floor, **plan_options)

    def rerun(sub: Region, kk: int, opts: dict) -> Buffers:
        b0, b1, d0, d1 = sub
        return run((r0 + b0, r0 + b1, c0 + d0, c0 + d1), kk, per_row=False, floor=floor, **opts)

    return _merged(found, k, c1 - c0, plan_options, rerun)


def topk(
    request: Request,
    *,
    block_q: Optional[int] = None,
    block_k: Optional[int] = None,
    precision: str = kernel_plan.DEFAULT_PRECISION,
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
        scores, rows, cols = _global(run, (0, n_rows, 0, n_cols), k, plan_options, request)
        return TopK(scores, rows, cols, "global")
    found = row_candidates(run((0, n_rows, 0, n_cols), k, per_row=True, **plan_options))
    scores, cols = merge.top_per_row(found.scores, found.cols, k, valid=found.valid)
    fixed = torch.arange(n_rows, device=cols.device)[:, None].expand_as(cols).clone()
    return TopK(scores, cols, fixed, "key") if per_key else TopK(scores, fixed, cols, "query")
