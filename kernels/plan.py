"""The launch plan of the streaming top-k kernel: block and buffer sizes, the grid, the column splits.

Pure Python (no kernel runs here). Limits are checked with errors that name the argument; the caller
may pass the names its users know the rows and columns by (``names``), since the kernel only knows
rows (held by a program) and columns (streamed past it).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import triton

from . import topk_stream

MAX_ROW_K = 1024  # per-row k: a buffer of CAP ≥ 2K keys per row, sorted 2K keys at a time
MAX_PROGRAM_K = 4096  # per-program candidates in global mode; larger k is checked by the caller
MAX_TILE = 8192  # largest BLOCK_R × BLOCK_C a global-mode program appends at once
PRECISIONS = ("ieee", "tf32", "tf32x3")
PROGRAMS_PER_SM = 4  # enough programs in flight to hide latency
FALLBACK_SMS = 132  # an H100's SMs, when the device cannot be asked (not a CUDA device)


def next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def sm_count(device: Optional[torch.device]) -> int:
    """Streaming multiprocessors of ``device``, read from the device when it is a CUDA GPU."""
    if device is not None and device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return FALLBACK_SMS


@dataclass(frozen=True)
class Launch:
    """Block sizes, buffers, grid and precision of one launch (all checked by :func:`plan`)."""

    k_program: int  # K: power of two ≥ the kept candidates per buffer
    cap: int  # CAP: buffer slots, power of two ≥ K + one tile
    chunk: int  # CHUNK: buffer slots read at once when compacting (K ≤ CHUNK ≤ CAP)
    sub: int  # SUB: buffers compacted together (bounds the sort's shared memory for large K)
    block_r: int
    block_c: Optional[int]  # None: autotuned (GPU only)
    n_row_blocks: int
    n_splits: int
    cols_per_split: int
    precision: str

    @property
    def grid(self) -> tuple[int, int]:
        """(row blocks, column splits): one program each."""
        return (self.n_row_blocks, self.n_splits)


def _check_block(name: str, value: int, low: int = 16) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low or value & (value - 1):
        raise ValueError(f"{name} must be a power of two ≥ {low}, got {value!r}")


def plan(
    *,
    n_rows: int,
    n_cols: int,
    k: int,
    global_mode: bool,
    precision: str = "ieee",
    block_r: Optional[int] = None,
    block_c: Optional[int] = None,
    n_splits: Optional[int] = None,
    program_k: Optional[int] = None,
    device: Optional[torch.device] = None,
    names: tuple[str, str] = ("block_r", "block_c"),
) -> Launch:
    """Choose and check block sizes; errors name the argument (``names``: what block_r, block_c are
    called by the caller) and the limit."""
    name_r, name_c = names
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if global_mode:
        if program_k is not None and (isinstance(program_k, bool) or not isinstance(program_k, int)
                                      or not 1 <= program_k <= MAX_PROGRAM_K):
            raise ValueError(f"program_k must be an int in [1, {MAX_PROGRAM_K}], got {program_k!r}")
        k_program = next_pow2(min(k, MAX_PROGRAM_K) if program_k is None else program_k)
    else:
        if k > MAX_ROW_K:
            raise ValueError(f"k={k} is above the triton backend's per-row limit of {MAX_ROW_K} (by='query'/'key')")
        if program_k is not None:
            raise ValueError("program_k applies to by='global' only")
        k_program = next_pow2(k)
    k_program = max(2, k_program)  # tl.topk cannot keep a single element of a [1, CAP] buffer
    if block_r is None:
        block_r = (64 if k_program <= 1024 else 32) if global_mode else (32 if k_program <= 128 else 16)
    _check_block(name_r, block_r)
    if block_c is not None:
        _check_block(name_c, block_c)
    elif topk_stream.INTERPRETED:
        block_c = 16
    widest = block_c if block_c is not None else topk_stream.AUTOTUNE_BLOCK_C_MAX
    tile = block_r * widest if global_mode else widest
    if global_mode and tile > MAX_TILE:
        raise ValueError(f"{name_r} × {name_c} = {tile} is above {MAX_TILE} for by='global': use smaller blocks")
    if global_mode and block_r * n_cols >= 2**32:
        raise ValueError(f"{name_r} × columns = {block_r * n_cols} does not fit the kernel's 32-bit pair index")
    if n_cols >= 2**32:
        raise ValueError(f"{n_cols} columns do not fit the kernel's 32-bit index")
    cap = next_pow2(k_program + tile)
    # About 1,024 keys of a program in registers per compaction step, never fewer than K.
    buffers = 1 if global_mode else block_r
    chunk = min(cap, max(k_program, 1024 // buffers))
    # A compaction sorts SUB × 2K keys at once: at most 8,192 (64 KB), as for global k = 4,096.
    sub = min(buffers, max(1, 4096 // k_program))
    n_row_blocks = triton.cdiv(n_rows, block_r)
    if n_splits is None:
        # Enough programs to fill the GPU; the interpreter runs programs one by one.
        programs = PROGRAMS_PER_SM * sm_count(device)
        n_splits = 1 if topk_stream.INTERPRETED else max(
            1, min(triton.cdiv(programs, n_row_blocks), triton.cdiv(n_cols, 4 * widest)))
    if isinstance(n_splits, bool) or not isinstance(n_splits, int) or n_splits < 1:
        raise ValueError(f"n_splits must be a positive int, got {n_splits!r}")
    # Splits are whole multiples of every column block the autotuner may pick.
    step = topk_stream.AUTOTUNE_BLOCK_C_MAX
    cols_per_split = triton.cdiv(triton.cdiv(n_cols, n_splits), step) * step
    n_splits = triton.cdiv(n_cols, cols_per_split)
    return Launch(k_program, cap, chunk, sub, block_r, block_c, n_row_blocks, n_splits, cols_per_split, precision)
