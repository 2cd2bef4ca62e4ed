"""Running the streaming kernel with a plan; what comes back is its raw buffers.

:func:`stream` = :func:`plan.plan` + :func:`launch`. The buffers hold the kernel's candidate set as
packed int64 keys, not an answer: per row, every key a row's buffers kept; globally, every key each
program kept, with the cut-off key of each program that had to drop pairs. Decoding and merging
candidates into the sorted top-k (and checking that a global merge is exact) is done by the engine
(``attnrules.engine.triton_backend`` with the engine's one merge, ``attnrules.engine.merge``), so
this package never imports the engine.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import triton

from . import topk_stream
from .plan import Launch, plan
from .topk_stream import SCORE_CODES, stream_topk_kernel


@dataclass(frozen=True)
class Operands:
    """Row and column vectors of one launch, with the per-row / per-column extra data of the TILE.

    For pair_topk the extras are the key weight (on whichever side holds the keys); for dual_topk
    they are the exemplar activations of both sides.
    """

    a: torch.Tensor  # [n_rows, d]
    b: torch.Tensor  # [n_cols, d]
    xa: Optional[torch.Tensor] = None  # [n_rows] or [n_rows, n_x]
    xb: Optional[torch.Tensor] = None  # [n_cols] or [n_cols, n_x]


@dataclass(frozen=True)
class Buffers:
    """What a launch leaves: packed keys, their counts and each buffer's threshold key.

    Global mode: ``keys [programs, CAP]``, ``count`` and ``thr`` ``[programs]`` (program = row block ×
    n_splits + split; keys hold (score, index within the program's region, row-major over all
    columns)). Per row: ``keys [n_splits, n_rows, CAP]``, ``count``, ``thr`` ``[n_splits, n_rows]``
    (keys hold (score, column)). A threshold other than the empty key means the buffer dropped pairs
    ranked below it.
    """

    keys: torch.Tensor
    count: torch.Tensor
    thr: torch.Tensor
    plan: Launch


def _extra(x: Optional[torch.Tensor], like: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(tensor, row stride) of an optional extra operand; a dummy pointer when absent."""
    if x is None:
        return like, 0
    x = x.contiguous()
    return x, (x.stride(0) if x.dim() == 2 else 1)


def norms(ops: Operands, *, score: str, dual: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(na [n_rows], nb [n_cols]) float32: the factors of the filter margin (see plan.filter_margin)."""

    def norm(x: torch.Tensor) -> torch.Tensor:
        return torch.linalg.vector_norm(x.float(), dim=1)

    na, nb = norm(ops.a), norm(ops.b)
    if dual:
        return na * norm(ops.xa), nb * norm(ops.xb)
    if score != "exp":  # the weight scales the score (for exp the margin is of the dot product)
        na = na if ops.xa is None else na * ops.xa.float().abs()
        nb = nb if ops.xb is None else nb * ops.xb.float().abs()
    return na.contiguous(), nb.contiguous()


def launch(
    tile: triton.JITFunction, ops: Operands, *, score: str, dual: bool, plan_: Launch, floor: float = float("-inf")
) -> Buffers:
    """Run the streaming kernel with ``plan_``; ``floor`` (global mode): a score below which no pair
    can be in the answer (a lower bound of the k-th score), or -inf."""
    a = ops.a if ops.a.stride(1) == 1 else ops.a.contiguous()
    b = ops.b if ops.b.stride(1) == 1 else ops.b.contiguous()
    xa, stride_xa = _extra(ops.xa, a)
    xb, stride_xb = _extra(ops.xb, b)
    n_rows, d = a.shape
    n_cols = b.shape[0]
    n_x = ops.xa.shape[1] if dual else 1
    p = plan_
    shape = (p.n_row_blocks * p.n_splits,) if p.global_mode else (p.n_splits, n_rows)
    keys = torch.empty(*shape, p.cap, dtype=torch.int64, device=a.device)
    count = torch.empty(shape, dtype=torch.int32, device=a.device)
    thr = torch.empty(shape, dtype=torch.int64, device=a.device)
    na, nb = norms(Operands(a, b, ops.xa, ops.xb), score=score, dual=dual) if p.rescore else (a, b)
    args = (a, b, xa, xb, na, nb, keys, count, thr, n_rows, n_cols, d, n_x, p.cols_per_split,
            a.stride(0), b.stride(0), stride_xa, stride_xb, p.margin_c, floor)
    meta = {
        "TILE": tile, "DUAL": dual, "SCORE": SCORE_CODES[score], "HAS_XA": ops.xa is not None,
        "HAS_XB": ops.xb is not None, "GLOBAL": p.global_mode, "K": p.k_program, "CAP": p.cap,
        "CHUNK": p.chunk, "FILTER": p.precision, "RESCORE": p.rescore,
        "EMULATE": topk_stream.INTERPRETED, "STATIONARY": p.stationary,
        "BLOCK_R": p.block_r, "BLOCK_D": p.block_d, "BLOCK_X": p.block_x,
    }
    stream_topk_kernel[p.grid](*args, **meta, BLOCK_C=p.block_c, num_warps=p.num_warps,
                               num_stages=topk_stream.DEFAULT_STAGES)
    return Buffers(keys, count, thr, p)


def stream(
    tile: triton.JITFunction,
    ops: Operands,
    k: int,
    *,
    per_row: bool,
    score: str,
    dual: bool,
    precision: Optional[str] = None,
    block_r: Optional[int] = None,
    block_c: Optional[int] = None,
    n_splits: Optional[int] = None,
    program_k: Optional[int] = None,
    floor: float = float("-inf"),
    names: tuple[str, str] = ("block_r", "block_c"),
) -> Buffers:
    """Plan and launch (``precision`` None: the plan's default)."""
    if score not in SCORE_CODES:
        raise ValueError(f"score must be one of {tuple(SCORE_CODES)}, got {score!r}")
    n_rows, d = ops.a.shape
    n_x = ops.xa.shape[1] if dual else None
    extra = {} if precision is None else {"precision": precision}
    p = plan(n_rows=n_rows, n_cols=ops.b.shape[0], d=d, n_x=n_x, k=k, global_mode=not per_row, block_r=block_r,
             block_c=block_c, n_splits=n_splits, program_k=program_k, device=ops.a.device, names=names, **extra)
    return launch(tile, ops, score=score, dual=dual, plan_=p, floor=floor)
