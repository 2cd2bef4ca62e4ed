"""Running the streaming kernel with a plan, and reading its buffers back as candidates.

:func:`stream` = :func:`plan.plan` + :func:`launch` + decoding. What comes back is the kernel's raw
candidate set, not an answer: per row, every key a row's buffers kept; globally, every key each
program kept, with the cut-off pair of each program that had to drop pairs. Merging candidates into
the sorted top-k (and checking that a global merge is exact) is done by the caller — the engine's
one merge, ``attnrules.engine.merge`` — so this package never imports the engine.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import triton

from . import topk_stream
from .plan import Launch, next_pow2, plan
from .topk_stream import SCORE_CODES, SENTINEL, stream_topk_kernel


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


def _extra(x: Optional[torch.Tensor], like: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(tensor, row stride) of an optional extra operand; a dummy pointer when absent."""
    if x is None:
        return like, 0
    x = x.contiguous()
    return x, (x.stride(0) if x.dim() == 2 else 1)


def launch(
    tile: triton.JITFunction, ops: Operands, *, score: str, global_mode: bool, plan_: Launch
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run the streaming kernel; return its (buffers, counts, thresholds).

    Global mode: buffers ``[programs, CAP]``, counts and thresholds ``[programs]`` (program =
    row block × n_splits + split). Per row: buffers ``[n_splits, n_rows, CAP]``, counts and
    thresholds ``[n_splits, n_rows]``.
    """
    a = ops.a if ops.a.stride(1) == 1 else ops.a.contiguous()
    b = ops.b if ops.b.stride(1) == 1 else ops.b.contiguous()
    xa, stride_xa = _extra(ops.xa, a)
    xb, stride_xb = _extra(ops.xb, b)
    n_rows, d = a.shape
    n_cols = b.shape[0]
    n_x = ops.xa.shape[1] if ops.xa is not None and ops.xa.dim() == 2 else 1
    p = plan_
    if global_mode:
        n_programs = p.n_row_blocks * p.n_splits
        buf = torch.empty(n_programs, p.cap, dtype=torch.int64, device=a.device)
        count = torch.empty(n_programs, dtype=torch.int32, device=a.device)
        thr = torch.empty(n_programs, dtype=torch.int64, device=a.device)
    else:
        buf = torch.empty(p.n_splits, n_rows, p.cap, dtype=torch.int64, device=a.device)
        count = torch.empty(p.n_splits, n_rows, dtype=torch.int32, device=a.device)
        thr = torch.empty(p.n_splits, n_rows, dtype=torch.int64, device=a.device)
    args = (a, b, xa, xb, buf, count, thr, n_rows, n_cols, d, n_x, p.cols_per_split,
            a.stride(0), b.stride(0), stride_xa, stride_xb)
    meta = {
        "TILE": tile, "SCORE": SCORE_CODES[score], "HAS_XA": ops.xa is not None, "HAS_XB": ops.xb is not None,
        "GLOBAL": global_mode, "K": p.k_program, "CAP": p.cap, "CHUNK": p.chunk, "SUB": p.sub,
        "PRECISION": p.precision, "BLOCK_R": p.block_r,
        "BLOCK_D": min(128, max(16, next_pow2(d))), "BLOCK_X": min(128, max(16, next_pow2(n_x))),
    }
    if p.block_c is None:
        topk_stream.tuned_kernel[p.grid](*args, **meta)
    else:
        stream_topk_kernel[p.grid](*args, **meta, BLOCK_C=p.block_c)
    return buf, count, thr


def unpack(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(float32 scores, int64 indices) of packed keys (the inverse of the kernel's ``_pack``)."""
    high = (keys >> 32).to(torch.int32)
    bits = high ^ ((high >> 31) & 0x7FFFFFFF)
    return bits.view(torch.float32), 4294967295 - (keys & 0xFFFFFFFF)


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
    ``cut_cols[p]``), the K-th best it kept) wherever ``cut[p]``; uncut programs kept every pair
    they scored. With k ≤ ``k_program`` every cut-off lies at or below the global k-th pair.
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


def row_candidates(buf: torch.Tensor, count: torch.Tensor) -> RowCandidates:
    """Per-row buffers ``[n_splits, n_rows, CAP]`` as one candidate row per row (keys hold the column)."""
    n_splits, n_rows, cap = buf.shape
    valid = torch.arange(cap, device=buf.device) < count[..., None].long()
    keys = buf.permute(1, 0, 2).reshape(n_rows, n_splits * cap)
    valid = valid.permute(1, 0, 2).reshape(n_rows, n_splits * cap)
    scores, cols = unpack(torch.where(valid, keys, torch.zeros_like(keys)))
    return RowCandidates(scores, cols, valid)


def global_candidates(
    buf: torch.Tensor, count: torch.Tensor, thr: torch.Tensor, *, n_rows: int, n_cols: int, plan_: Launch
) -> GlobalCandidates:
    """Global-mode buffers ``[programs, CAP]`` as flat candidates in (row, column) coordinates."""
    n_programs, cap = buf.shape
    device = buf.device
    program = torch.arange(n_programs, device=device)
    row0 = (program // plan_.n_splits) * plan_.block_r
    col0 = (program % plan_.n_splits) * plan_.cols_per_split
    live = torch.arange(cap, device=device)[None, :] < count[:, None].long()
    scores, local = unpack(buf[live])
    owner = program[:, None].expand(-1, cap)[live]
    # Keys hold the index within the program's region, row-major over the full column range.
    rows = row0[owner] + local // n_cols
    cols = local % n_cols
    cut = thr != SENTINEL
    cut_scores, cut_local = unpack(torch.where(cut, thr, torch.zeros_like(thr)))
    regions = torch.stack([row0, torch.clamp(row0 + plan_.block_r, max=n_rows),
                           col0, torch.clamp(col0 + plan_.cols_per_split, max=n_cols)], dim=1)  # fmt: skip
    return GlobalCandidates(scores, rows, cols, owner, regions, cut, cut_scores,
                            row0 + cut_local // n_cols, cut_local % n_cols, plan_.k_program)  # fmt: skip


def stream(
    tile: triton.JITFunction,
    ops: Operands,
    k: int,
    *,
    per_row: bool,
    score: str,
    precision: str = "ieee",
    block_r: Optional[int] = None,
    block_c: Optional[int] = None,
    n_splits: Optional[int] = None,
    program_k: Optional[int] = None,
    names: tuple[str, str] = ("block_r", "block_c"),
):
    """Plan, launch and decode: :class:`RowCandidates` (``per_row``) or :class:`GlobalCandidates`."""
    if score not in SCORE_CODES:
        raise ValueError(f"score must be one of {tuple(SCORE_CODES)}, got {score!r}")
    n_rows, n_cols = ops.a.shape[0], ops.b.shape[0]
    p = plan(n_rows=n_rows, n_cols=n_cols, k=k, global_mode=not per_row, precision=precision, block_r=block_r,
             block_c=block_c, n_splits=n_splits, program_k=program_k, device=ops.a.device, names=names)
    buf, count, thr = launch(tile, ops, score=score, global_mode=not per_row, plan_=p)
    if per_row:
        return row_candidates(buf, count)
    return global_candidates(buf, count, thr, n_rows=n_rows, n_cols=n_cols, plan_=p)
