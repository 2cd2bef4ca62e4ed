"""The launch plan of the streaming top-k kernel: block and buffer sizes, the grid, the column splits,
the precision of the filter and its proven error margin.

Pure Python (no kernel runs here). Limits are checked with errors that name the argument; the caller
may pass the names its users know the rows and columns by (``names``), since the kernel only knows
rows (held by a program) and columns (streamed past it).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

import torch
import triton

from . import topk_stream

MAX_ROW_K = 1024  # per-row k: a buffer of CAP ≥ 2K keys per row, sorted 2K keys at a time
MAX_PROGRAM_K = 4096  # per-program candidates in global mode; larger k is checked by the caller
DEFAULT_PROGRAM_K = 1024  # global mode's default: a larger k is checked (and rarely repaired) by the caller
SCAN_KEYS = 1024  # keys a compaction pass reads at once over the program's buffers (8 KB of registers)
MAX_TILE = 8192  # largest BLOCK_R × BLOCK_C a global-mode program appends at once
MAX_BLOCK_D = 128  # rows of d ≤ 128 (and exemplar rows of n ≤ 128) stay in registers for the whole stream
# "tf32" (default) and "tf32x3": a tensor-core filter, then the fp32 rescore of the tiles that may hold
# survivors (the answer is the fp32 one); "ieee": fp32 only.
PRECISIONS = ("tf32", "tf32x3", "ieee")
DEFAULT_PRECISION = "tf32"
PROGRAMS_PER_SM = 4  # enough programs in flight to hide latency
# Column block of pair_topk's global mode: 20.0 ms instead of 28.1 ms at 64 for the global top-10,000 of
# 24,576² on an H200 (bench_triton.py --blocks, 2026-11-30); no spills on sm_90 or sm_80. Other modes keep
# topk_stream.DEFAULT_BLOCK_C (measured as good as any per key; dual not measured).
GLOBAL_PAIR_BLOCK_C = 128

# Relative error of one product a·b after the filter's input rounding: TF32 keeps 10 mantissa bits
# (truncation, as tensor cores read fp32: |x − tf32(x)| < 2⁻¹⁰|x|, so ≤ 2·2⁻¹⁰ + 2⁻²⁰ per
# product); tf32x3 splits each input into hi + lo, both TF32, and drops lo·lo (≤ 4·2⁻²⁰).
# ``dots``: how many products the filter accumulates per term.
_INPUT_ERROR = {"tf32": (2.0**-9 + 2.0**-20, 1), "tf32x3": (4.0 * 2.0**-20, 3)}


def next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def dot_margin(precision: str, n: int) -> float:
    """c such that |filter(a·b) − fp32(a·b)| ≤ c·‖a‖‖b‖ for vectors of length n, and the score's
    final multiplication by a weight (both sides rounded) stays within c·‖a‖‖b‖·|w|.

    Filter: the inputs' rounding errs by ≤ δ·Σ|a_i b_i|; its accumulation (tensor cores: products
    exact, sums truncated, taken here as 2 ulps per addition) by ≤ dots·(n + 2)·2⁻²²·(1 + δ)·Σ|a_i b_i|.
    The fp32 rescore (fused multiply-adds) errs by ≤ (n + 1)·2⁻²⁴·Σ|a_i b_i|; the weight products by
    2⁻²² more; Σ|a_i b_i| ≤ ‖a‖‖b‖ (Cauchy–Schwarz). The sum is widened by 1/8 for the rounding of
    the norms themselves (computed in fp32, relative error ≤ (n + 1)·2⁻²⁴).
    """
    delta, dots = _INPUT_ERROR[precision]
    return 1.125 * (delta + dots * (n + 2) * 2.0**-22 * (1.0 + delta) + (n + 1) * 2.0**-24 + 2.0**-22)


def filter_margin(precision: str, d: int, n_x: Optional[int] = None) -> float:
    """The kernel's ``margin_c``: |filter score − fp32 score| ≤ margin_c × na[row] × nb[col].

    pair_topk: na, nb are the rows' and columns' norms times |weight| (signed, absolute), or the
    plain norms for exp (there the bound is of the dot product, and the kernel turns it into one on
    exp(·)·w). dual_topk (``n_x`` given): na = ‖a‖‖x_a‖, nb = ‖b‖‖x_b‖, and the product of two
    inexact factors errs by ≤ (c₁ + c₂ + c₁c₂)·N₁N₂ plus its own two roundings (2⁻²¹·N₁N₂).
    """
    c1 = dot_margin(precision, d)
    if n_x is None:
        return c1
    c2 = dot_margin(precision, n_x)
    return c1 + c2 + c1 * c2 + 2.0**-21


def fp32_spread(d: int, n_x: Optional[int] = None) -> float:
    """c such that two fp32 evaluations of one score (different summation orders) differ by at most
    c × na × nb (the norm factors of ``filter_margin``): each is within (n + 2)·2⁻²⁴ of the exact
    value per inner product of length n (fused multiply-adds, then the weight), widened by 1/8."""

    def one(n: int) -> float:
        return 1.125 * (n + 2) * 2.0**-24

    c = one(d) if n_x is None else one(d) + one(n_x) + one(d) * one(n_x) + 2.0**-23
    return 2.0 * c


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def default_block_c(global_mode: bool, n_x: Optional[int]) -> int:
    """The column block a launch takes when none is given (on a GPU)."""
    return GLOBAL_PAIR_BLOCK_C if global_mode and n_x is None else topk_stream.DEFAULT_BLOCK_C


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of the CUDA ``device``, read from the device (cached per device)."""
    if device.type != "cuda":
        raise ValueError(f"the SM count is read from a CUDA device, got {device}")
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


@dataclass(frozen=True)
class Launch:
    """Block sizes, buffers, grid and precision of one launch (all checked by :func:`plan`)."""

    k_program: int  # K: power of two ≥ the kept candidates per buffer
    cap: int  # CAP: buffer slots, power of two ≥ K + one tile
    chunk: int  # CHUNK: slots of each buffer read at once when compacting (≤ CAP)
    block_r: int
    block_c: int
    num_warps: int
    block_d: int
    block_x: int
    stationary: bool  # the rows fit one BLOCK_D (and BLOCK_X) chunk: loaded once per program
    n_rows: int
    n_cols: int
    n_row_blocks: int
    n_splits: int
    cols_per_split: int
    global_mode: bool
    precision: str
    margin_c: float  # 0.0 for "ieee" (no filter)

    @property
    def grid(self) -> tuple[int, int]:
        """(row blocks, column splits): one program each."""
        return (self.n_row_blocks, self.n_splits)

    @property
    def n_buffers(self) -> int:
        """Buffers of CAP slots: one per program (global), one per (split, row) otherwise."""
        return self.n_row_blocks * self.n_splits if self.global_mode else self.n_splits * self.n_rows

    @property
    def buffer_slots(self) -> int:
        """Slots of all buffers together: beyond 2³¹ the kernel's slot arithmetic needs int64."""
        return self.n_buffers * self.cap

    def first_slot(self, row_block: int, split: int) -> int:
        """The first buffer slot of program (row block, split), as the kernel's ``state_base`` computes it."""
        if self.global_mode:
            return (row_block * self.n_splits + split) * self.cap
        return (split * self.n_rows + row_block * self.block_r) * self.cap

    @property
    def rescore(self) -> bool:
        return self.precision != "ieee"


def _check_block(name: str, value: int, low: int = 16) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low or value & (value - 1):
        raise ValueError(f"{name} must be a power of two ≥ {low}, got {value!r}")


def plan(
    *,
    n_rows: int,
    n_cols: int,
    d: int,
    k: int,
    global_mode: bool,
    n_x: Optional[int] = None,
    precision: str = DEFAULT_PRECISION,
    block_r: Optional[int] = None,
    block_c: Optional[int] = None,
    n_splits: Optional[int] = None,
    program_k: Optional[int] = None,
    device: Optional[torch.device] = None,
    names: tuple[str, str] = ("block_r", "block_c"),
) -> Launch:
    """Choose and check block sizes; errors name the argument (``names``: what block_r, block_c are
    called by the caller) and the limit. ``n_x``: the exemplar dimension of dual_topk (None for
    pair_topk). ``n_splits`` None is planned from the CUDA ``device``'s SM count (1 in the interpreter)."""
    name_r, name_c = names
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if global_mode:
        if program_k is not None and (isinstance(program_k, bool) or not isinstance(program_k, int)
                                      or not 1 <= program_k <= MAX_PROGRAM_K):
            raise ValueError(f"program_k must be an int in [1, {MAX_PROGRAM_K}], got {program_k!r}")
        k_program = next_pow2(min(k, DEFAULT_PROGRAM_K) if program_k is None else program_k)
    else:
        if k > MAX_ROW_K:
            raise ValueError(f"k={k} is above the triton backend's per-row limit of {MAX_ROW_K} (by='query'/'key')")
        if program_k is not None:
            raise ValueError("program_k applies to by='global' only")
        k_program = next_pow2(k)
    if block_r is None:
        # The largest row blocks without register spills on sm_90 and sm_80 (tests/test_triton_compile.py).
        block_r = 32 if not global_mode and n_x is None and k_program <= 128 else 16
    _check_block(name_r, block_r)
    if block_c is not None:
        _check_block(name_c, block_c)
    else:  # the interpreter's cost is per op: small column blocks keep the tests short
        block_c = 16 if topk_stream.INTERPRETED else default_block_c(global_mode, n_x)
    tile = block_r * block_c if global_mode else block_c
    if global_mode and tile > MAX_TILE:
        raise ValueError(f"{name_r} × {name_c} = {tile} is above {MAX_TILE} for by='global': use smaller blocks")
    if global_mode and block_r * n_cols >= 2**32:
        raise ValueError(f"{name_r} × columns = {block_r * n_cols} does not fit the kernel's 32-bit pair index")
    if n_cols >= 2**32:
        raise ValueError(f"{n_cols} columns do not fit the kernel's 32-bit index")
    cap = next_pow2(k_program + tile)
    # About 1,024 keys of a program in registers per compaction step, never fewer than K.
    buffers = 1 if global_mode else block_r
    chunk = min(cap, max(16, SCAN_KEYS // buffers))
    block_d = min(MAX_BLOCK_D, max(16, next_pow2(d)))
    block_x = min(MAX_BLOCK_D, max(16, next_pow2(n_x or 1)))
    stationary = d <= block_d and (n_x is None or n_x <= block_x)
    n_row_blocks = triton.cdiv(n_rows, block_r)
    if n_splits is None:
        if topk_stream.INTERPRETED:  # the interpreter runs programs one by one
            n_splits = 1
        elif device is None or device.type != "cuda":
            raise ValueError(f"n_splits must be given when the device is not a CUDA GPU (got {device})")
        else:  # enough programs to fill the GPU, each streaming at least 4 column blocks
            programs = PROGRAMS_PER_SM * sm_count(device)
            n_splits = max(1, min(triton.cdiv(programs, n_row_blocks), triton.cdiv(n_cols, 4 * block_c)))
    if isinstance(n_splits, bool) or not isinstance(n_splits, int) or n_splits < 1:
        raise ValueError(f"n_splits must be a positive int, got {n_splits!r}")
    cols_per_split = triton.cdiv(triton.cdiv(n_cols, n_splits), block_c) * block_c  # whole column blocks
    n_splits = triton.cdiv(n_cols, cols_per_split)
    margin_c = 0.0 if precision == "ieee" else filter_margin(precision, d, n_x)
    return Launch(k_program, cap, chunk, block_r, block_c, topk_stream.DEFAULT_WARPS, block_d, block_x, stationary,
                  n_rows, n_cols, n_row_blocks, n_splits, cols_per_split, global_mode, precision, margin_c)
