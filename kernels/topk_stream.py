"""Streaming top-k over all (row, column) pairs: the kernel shared by pair_topk and dual_topk.

A program holds a block of ``BLOCK_R`` rows and streams column blocks past it (FlashAttention
style). Each tile's scores come from a ``TILE`` function (the operation: see pair_topk.py and
dual_topk.py) and are packed into int64 sort keys: the high 32 bits order like the float score,
the low 32 bits like the *reversed* index, so a larger key is a better pair and ties go to the lower
index. Keys above the running threshold are appended to a scratch buffer in global memory (a
cumulative sum gives each one its slot); when the buffer could overflow it is compacted with
``tl.topk`` (chunk by chunk) to its ``K`` best, whose smallest becomes the new threshold. Most
tiles of a long stream therefore cost one compare per score, and no sort runs until a buffer fills.

Two modes share the code:

- per row (``GLOBAL=False``): a buffer and threshold per row; the answer of row r is the top-k of its
  buffer(s).
- global (``GLOBAL=True``): one buffer and threshold per program over its whole region
  ``BLOCK_R`` rows × one column split; the answer is the top-k of the union of the buffers.

The final merge of the small candidate set runs in torch (:func:`row_results`,
:func:`global_candidates`). Nothing of size rows × columns is ever written.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

# True when this module was imported with TRITON_INTERPRET=1: kernels then run on CPU tensors.
INTERPRETED: bool = bool(triton.knobs.runtime.interpret)

SENTINEL = -(2**63)  # smaller than every packed key: an empty slot
MAX_ROW_K = 1024  # per-row k: a buffer of CAP ≥ 2K keys per row, sorted 2K keys at a time
MAX_PROGRAM_K = 4096  # per-program candidates in global mode; larger k is checked (see global_candidates)
MAX_TILE = 8192  # largest BLOCK_R × BLOCK_C a global-mode program appends at once
PRECISIONS = ("ieee", "tf32", "tf32x3")
SCORE_CODES = {"signed": 0, "absolute": 1, "exp": 2}


@triton.jit
def dot_tile(a_ptr, b_ptr, offs_r, offs_c, mask_r, mask_c, stride_a, stride_b, d,
             BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    """[BLOCK_R, BLOCK_C] float32 inner products a[rows] · b[cols] over d, with upcast after loading."""
    acc = tl.zeros((offs_r.shape[0], offs_c.shape[0]), dtype=tl.float32)
    for d0 in range(0, d, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask_d = offs_d < d
        a = tl.load(a_ptr + offs_r[:, None].to(tl.int64) * stride_a + offs_d[None, :],
                    mask=mask_r[:, None] & mask_d[None, :], other=0.0).to(tl.float32)
        b = tl.load(b_ptr + offs_c[None, :].to(tl.int64) * stride_b + offs_d[:, None],
                    mask=mask_c[None, :] & mask_d[:, None], other=0.0).to(tl.float32)
        acc += tl.dot(a, b, input_precision=PRECISION)
    return acc


@triton.jit
def _pack(s, index):
    """int64 keys ordered like (score desc, index asc); -0.0 is folded onto +0.0 first."""
    s = tl.where(s == 0.0, 0.0, s)
    bits = s.to(tl.int32, bitcast=True)
    ordered = (bits ^ ((bits >> 31) & 0x7FFFFFFF)).to(tl.int64)
    return (ordered << 32) + (4294967295 - index)


@triton.jit
def _chunk_best(buf_ptr, base, count, c0, K: tl.constexpr, CHUNK: tl.constexpr):
    """The K best keys (unordered when CHUNK == K) of buffer slots [c0, c0 + CHUNK), empty slots masked."""
    slots = c0 + tl.arange(0, CHUNK)
    keys = tl.load(buf_ptr + base[:, None] + slots[None, :], mask=slots[None, :] < count[:, None],
                   other=-9223372036854775808)
    if CHUNK > K:
        keys = tl.topk(keys, K, dim=1)
    return keys


@triton.jit
def _compact_group(buf_ptr, state, live, count, K: tl.constexpr, CAP: tl.constexpr, CHUNK: tl.constexpr):
    """Keep the K best keys of the buffers ``state`` (those that are live); return (threshold, count).

    The buffer is read CHUNK slots at a time and merged into a running best, so registers hold
    O(K + CHUNK) keys per buffer rather than the whole buffer.
    """
    base = state * CAP
    best = _chunk_best(buf_ptr, base, count, 0, K, CHUNK)
    for c0 in range(CHUNK, tl.max(count), CHUNK):
        more = _chunk_best(buf_ptr, base, count, c0, K, CHUNK)
        best = tl.topk(tl.reshape(tl.join(best, more), (state.shape[0], 2 * K)), K, dim=1)
    tl.debug_barrier()  # every thread has read slots [0, K) before they are overwritten
    tl.store(buf_ptr + base[:, None] + tl.arange(0, K)[None, :], best, mask=live[:, None])
    # With fewer than K keys the padding sentinel is the minimum: nothing is rejected yet.
    return tl.min(best, axis=1), tl.minimum(count, K)


@triton.jit
def _compact(buf_ptr, count_ptr, thr_ptr, s0, n_live, count,
             K: tl.constexpr, CAP: tl.constexpr, CHUNK: tl.constexpr, SUB: tl.constexpr):
    """Compact the program's buffers s0 .. s0 + G - 1 (the first n_live are real), SUB at a time.

    SUB < G bounds the sort's working set (shared memory) for large K: the per-buffer counts and
    thresholds then make a round trip through global memory.
    """
    G: tl.constexpr = count.shape[0]
    tl.debug_barrier()  # the appends of other threads are visible
    if SUB == G:
        group = tl.arange(0, G)
        thr, count = _compact_group(buf_ptr, s0 + group, group < n_live, count, K, CAP, CHUNK)
    else:
        group = tl.arange(0, G)
        tl.store(count_ptr + s0 + group, count, mask=group < n_live)
        tl.debug_barrier()
        for g in tl.static_range(0, G, SUB):
            sub = g + tl.arange(0, SUB)
            live = sub < n_live
            t, c = _compact_group(buf_ptr, s0 + sub, live, tl.load(count_ptr + s0 + sub, mask=live, other=0),
                                  K, CAP, CHUNK)
            tl.store(count_ptr + s0 + sub, c, mask=live)
            tl.store(thr_ptr + s0 + sub, t, mask=live)
        tl.debug_barrier()
        count = tl.load(count_ptr + s0 + group, mask=group < n_live, other=0)
        thr = tl.load(thr_ptr + s0 + group, mask=group < n_live, other=-9223372036854775808)
    return thr, count


@triton.jit
def stream_topk_kernel(
    a_ptr, b_ptr, xa_ptr, xb_ptr, buf_ptr, count_ptr, thr_ptr,
    n_rows, n_cols, d, n_x, cols_per_split,
    stride_a, stride_b, stride_xa, stride_xb,
    TILE: tl.constexpr, SCORE: tl.constexpr, HAS_XA: tl.constexpr, HAS_XB: tl.constexpr,
    GLOBAL: tl.constexpr, K: tl.constexpr, CAP: tl.constexpr, CHUNK: tl.constexpr, SUB: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_X: tl.constexpr,
):
    """Program (row block, column split): stream its columns and leave candidates in the buffers."""
    pid_r = tl.program_id(0)
    pid_s = tl.program_id(1)
    n_splits = tl.num_programs(1)
    r0 = pid_r * BLOCK_R
    offs_r = r0 + tl.arange(0, BLOCK_R)
    mask_r = offs_r < n_rows
    c_start = pid_s * cols_per_split
    c_stop = tl.minimum(c_start + cols_per_split, n_cols)
    # The program's buffers are s0 .. s0 + G - 1; the first n_live of them are real.
    if GLOBAL:
        G: tl.constexpr = 1
        T: tl.constexpr = BLOCK_R * BLOCK_C
        s0 = (pid_r * n_splits + pid_s).to(tl.int64)
        n_live = 1
    else:
        G: tl.constexpr = BLOCK_R
        T: tl.constexpr = BLOCK_C
        s0 = (pid_s * n_rows + r0).to(tl.int64)
        n_live = n_rows - r0
    base = (s0 + tl.arange(0, G)) * CAP
    thr = tl.full((G,), -9223372036854775808, dtype=tl.int64)
    count = tl.zeros((G,), dtype=tl.int32)
    for c0 in range(c_start, c_stop, BLOCK_C):
        if tl.max(count) + T > CAP:
            thr, count = _compact(buf_ptr, count_ptr, thr_ptr, s0, n_live, count, K, CAP, CHUNK, SUB)
        offs_c = c0 + tl.arange(0, BLOCK_C)
        mask_c = offs_c < c_stop
        s = TILE(a_ptr, b_ptr, xa_ptr, xb_ptr, offs_r, offs_c, mask_r, mask_c,
                 stride_a, stride_b, stride_xa, stride_xb, d, n_x,
                 SCORE, HAS_XA, HAS_XB, BLOCK_D, BLOCK_X, PRECISION)
        if GLOBAL:  # index within the program's region, increasing with (row, column)
            index = (offs_r - r0)[:, None].to(tl.int64) * n_cols + offs_c[None, :]
        else:
            index = tl.zeros((BLOCK_R, 1), dtype=tl.int64) + offs_c[None, :]
        keys = tl.where(mask_r[:, None] & mask_c[None, :], _pack(s, index), -9223372036854775808)
        keys = tl.reshape(keys, (G, T))
        take = (keys > thr[:, None]).to(tl.int32)
        n_take = tl.sum(take, axis=1)
        if tl.max(n_take) > 0:
            slot = count[:, None] + tl.cumsum(take, axis=1) - 1
            tl.store(buf_ptr + base[:, None] + slot, keys, mask=take > 0)
            count += n_take
    group = tl.arange(0, G)
    tl.store(count_ptr + s0 + group, count, mask=group < n_live)
    tl.store(thr_ptr + s0 + group, thr, mask=group < n_live)


def _configs() -> list[triton.Config]:
    """Autotune space for H100-class GPUs (column block, warps, pipeline stages)."""
    return [
        triton.Config({"BLOCK_C": bc}, num_warps=w, num_stages=s)
        for bc in (32, 64, 128)
        for w in (4, 8)
        for s in (2, 3)
    ]


_AUTOTUNE_BLOCK_C_MAX = 128
tuned_kernel = triton.autotune(
    configs=_configs(), key=["n_cols", "d", "n_x", "TILE", "SCORE", "K", "CAP", "BLOCK_R", "GLOBAL"]
)(stream_topk_kernel)


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


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
class Launch:
    """Block sizes and precision of one launch (all checked by :func:`plan`)."""

    k_program: int  # K: power of two ≥ the kept candidates per buffer
    cap: int  # CAP: buffer slots, power of two ≥ K + one tile
    chunk: int  # CHUNK: buffer slots read at once when compacting (K ≤ CHUNK ≤ CAP)
    sub: int  # SUB: buffers compacted together (bounds the sort's shared memory for large K)
    block_r: int
    block_c: Optional[int]  # None: autotuned (GPU only)
    n_splits: int
    cols_per_split: int
    precision: str


def _check_block(name: str, value: int, low: int = 16) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low or value & (value - 1):
        raise ValueError(f"{name} must be a power of two ≥ {low}, got {value!r}")


def plan(
    *,
    n_rows: int,
    n_cols: int,
    k: int,
    global_mode: bool,
    precision: str,
    block_r: Optional[int],
    block_c: Optional[int],
    n_splits: Optional[int],
    program_k: Optional[int],
) -> Launch:
    """Choose and check block sizes; errors name the argument and the limit."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if global_mode:
        if program_k is not None and (isinstance(program_k, bool) or not isinstance(program_k, int)
                                      or not 1 <= program_k <= MAX_PROGRAM_K):
            raise ValueError(f"program_k must be an int in [1, {MAX_PROGRAM_K}], got {program_k!r}")
        k_program = _next_pow2(min(k, MAX_PROGRAM_K) if program_k is None else program_k)
    else:
        if k > MAX_ROW_K:
            raise ValueError(f"k={k} is above the triton backend's per-row limit of {MAX_ROW_K} (by='query'/'key')")
        if program_k is not None:
            raise ValueError("program_k applies to by='global' only")
        k_program = _next_pow2(k)
    k_program = max(2, k_program)  # tl.topk cannot keep a single element of a [1, CAP] buffer
    if block_r is None:
        block_r = (64 if k_program <= 1024 else 32) if global_mode else (32 if k_program <= 128 else 16)
    _check_block("block_r", block_r)
    if block_c is not None:
        _check_block("block_c", block_c)
    elif INTERPRETED:
        block_c = 16
    widest = block_c if block_c is not None else _AUTOTUNE_BLOCK_C_MAX
    tile = block_r * widest if global_mode else widest
    if global_mode and tile > MAX_TILE:
        raise ValueError(f"block_r × block_c = {tile} is above {MAX_TILE} for by='global': use smaller blocks")
    if global_mode and block_r * n_cols >= 2**32:
        raise ValueError(f"block_r × n_keys = {block_r * n_cols} does not fit the kernel's 32-bit pair index")
    if n_cols >= 2**32:
        raise ValueError(f"{n_cols} columns do not fit the kernel's 32-bit index")
    cap = _next_pow2(k_program + tile)
    # About 1,024 keys of a program in registers per compaction step, never fewer than K.
    buffers = 1 if global_mode else block_r
    chunk = min(cap, max(k_program, 1024 // buffers))
    # A compaction sorts SUB × 2K keys at once: at most 8,192 (64 KB), as for global k = 4,096.
    sub = min(buffers, max(1, 4096 // k_program))
    n_row_blocks = triton.cdiv(n_rows, block_r)
    if n_splits is None:
        # Enough programs to fill a GPU (~132 SMs × 4); the interpreter runs programs one by one.
        n_splits = 1 if INTERPRETED else max(1, min(triton.cdiv(528, n_row_blocks), triton.cdiv(n_cols, 4 * widest)))
    if isinstance(n_splits, bool) or not isinstance(n_splits, int) or n_splits < 1:
        raise ValueError(f"n_splits must be a positive int, got {n_splits!r}")
    # Splits are whole multiples of every column block the autotuner may pick.
    cols_per_split = triton.cdiv(triton.cdiv(n_cols, n_splits), _AUTOTUNE_BLOCK_C_MAX) * _AUTOTUNE_BLOCK_C_MAX
    n_splits = triton.cdiv(n_cols, cols_per_split)
    return Launch(k_program, cap, chunk, sub, block_r, block_c, n_splits, cols_per_split, precision)


def _extra(x: Optional[torch.Tensor], like: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(tensor, row stride) of an optional extra operand; a dummy pointer when absent."""
    if x is None:
        return like, 0
    x = x.contiguous()
    return x, (x.stride(0) if x.dim() == 2 else 1)


def launch(
    tile: triton.JITFunction,
    ops: Operands,
    *,
    score: str,
    global_mode: bool,
    plan_: Launch,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run the streaming kernel; return (buffers, counts, thresholds) for the torch-side merge.

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
    n_row_blocks = triton.cdiv(n_rows, p.block_r)
    if global_mode:
        n_programs = n_row_blocks * p.n_splits
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
        "BLOCK_D": min(128, max(16, _next_pow2(d))), "BLOCK_X": min(128, max(16, _next_pow2(n_x))),
    }
    grid = (n_row_blocks, p.n_splits)
    if p.block_c is None:
        tuned_kernel[grid](*args, **meta)
    else:
        stream_topk_kernel[grid](*args, **meta, BLOCK_C=p.block_c)
    return buf, count, thr


def unpack(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(float32 scores, int64 indices) of packed keys (the inverse of ``_pack``)."""
    high = (keys >> 32).to(torch.int32)
    bits = high ^ ((high >> 31) & 0x7FFFFFFF)
    return bits.view(torch.float32), 4294967295 - (keys & 0xFFFFFFFF)


def row_results(buf: torch.Tensor, count: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (scores [n_rows, k], column indices [n_rows, k]), best first, from per-row buffers.

    Keys hold the column index, so within a row they compare exactly: one integer top-k is the merge.
    """
    n_splits, n_rows, cap = buf.shape
    live = torch.arange(cap, device=buf.device) < count[..., None].long()
    keys = torch.where(live, buf, torch.full_like(buf, SENTINEL))
    keys = keys.permute(1, 0, 2).reshape(n_rows, n_splits * cap)
    return unpack(torch.topk(keys, k, dim=1).values)


@dataclass(frozen=True)
class GlobalCandidates:
    """The global top-k merged from the programs' buffers.

    ``scores``, ``rows``, ``cols`` hold the best first; when k exceeded the per-program list, programs
    whose list was cut above the k-th pair are listed in ``unresolved`` as regions
    ``(row_start, row_stop, col_start, col_stop)``: their pairs were dropped from the candidates and
    must be scored exactly elsewhere, then merged with :func:`merge_pairs`.
    """

    scores: torch.Tensor
    rows: torch.Tensor
    cols: torch.Tensor
    unresolved: list[tuple[int, int, int, int]]


def merge_pairs(scores: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, n_cols: int, k: int):
    """The k best (score, row, col) of a flat candidate list, ties by lower (row, col)."""
    flat = rows * n_cols + cols
    by_index = torch.argsort(flat)
    scores, flat = scores[by_index], flat[by_index]
    best = torch.sort(scores, descending=True, stable=True).indices[:k]
    return scores[best], flat[best] // n_cols, flat[best] % n_cols


def global_candidates(
    buf: torch.Tensor, count: torch.Tensor, thr: torch.Tensor, *, n_rows: int, n_cols: int, k: int, plan_: Launch
) -> GlobalCandidates:
    """Merge the programs' buffers into the global top-k and check that it is exact.

    A program whose buffer was compacted dropped only pairs below its threshold pair. With
    k ≤ K every such threshold lies at or below the global k-th pair, so the merge is exact. With
    k > K a program that holds more than K of the top pairs is caught here: its threshold pair ranks
    above the k-th, and its region is reported as unresolved.
    """
    n_programs, cap = buf.shape
    device = buf.device
    program = torch.arange(n_programs, device=device)
    row0 = (program // plan_.n_splits) * plan_.block_r
    live = torch.arange(cap, device=device)[None, :] < count[:, None].long()
    scores, local = unpack(buf[live])
    owner = program[:, None].expand(-1, cap)[live]
    rows = row0[owner] + local // n_cols
    cols = local % n_cols
    unresolved: list[tuple[int, int, int, int]] = []
    cut = thr != SENTINEL
    if k > plan_.k_program and bool(cut.any()):
        if scores.numel() >= k:
            # The k-th of a subset ranks at or below the true k-th: the test errs on the safe side.
            s, r, c = merge_pairs(scores, rows, cols, n_cols, k)
            t_score, t_local = unpack(thr)
            t_flat = (row0 + t_local // n_cols) * n_cols + t_local % n_cols
            kth_flat = r[-1] * n_cols + c[-1]
            cut &= (t_score > s[-1]) | ((t_score == s[-1]) & (t_flat < kth_flat))
        bad = torch.nonzero(cut).flatten().tolist()
        for p in bad:
            r0 = int(row0[p])
            c0 = (p % plan_.n_splits) * plan_.cols_per_split
            unresolved.append((r0, min(r0 + plan_.block_r, n_rows), c0, min(c0 + plan_.cols_per_split, n_cols)))
        if bad:
            keep = ~torch.isin(owner, torch.tensor(bad, device=device))
            scores, rows, cols = scores[keep], rows[keep], cols[keep]
    s, r, c = merge_pairs(scores, rows, cols, n_cols, k)
    return GlobalCandidates(s, r, c, unresolved)


@dataclass(frozen=True)
class Result:
    """Top-k of one call, best first: shape [k] for by='global', [n_rows, k] per query / per key.

    ``unresolved``: global regions ``(query_start, query_stop, key_start, key_stop)`` whose exact top-k
    the caller must still merge in (only when k exceeds the per-program list; see GlobalCandidates).
    """

    scores: torch.Tensor
    query_idx: torch.Tensor
    key_idx: torch.Tensor
    unresolved: list[tuple[int, int, int, int]]


def run(
    tile: triton.JITFunction,
    queries: torch.Tensor,
    keys: torch.Tensor,
    query_extra: Optional[torch.Tensor],
    key_extra: Optional[torch.Tensor],
    k: int,
    *,
    by: str,
    score: str,
    precision: str = "ieee",
    block_r: Optional[int] = None,
    block_c: Optional[int] = None,
    n_splits: Optional[int] = None,
    program_k: Optional[int] = None,
) -> Result:
    """Top-k of ``tile`` scores over queries × keys, by='global' | 'query' | 'key'.

    Rows of the kernel are the queries, except for by='key' where they are the keys (each key's
    best queries), so every mode streams along the dimension it ranks.
    """
    if by not in ("global", "query", "key"):
        raise ValueError(f"by must be 'global', 'query' or 'key', got {by!r}")
    if score not in SCORE_CODES:
        raise ValueError(f"score must be one of {tuple(SCORE_CODES)}, got {score!r}")
    per_key = by == "key"
    if per_key:
        ops = Operands(keys, queries, key_extra, query_extra)
    else:
        ops = Operands(queries, keys, query_extra, key_extra)
    n_rows, n_cols = ops.a.shape[0], ops.b.shape[0]
    global_mode = by == "global"
    p = plan(n_rows=n_rows, n_cols=n_cols, k=k, global_mode=global_mode, precision=precision,
             block_r=block_r, block_c=block_c, n_splits=n_splits, program_k=program_k)
    buf, count, thr = launch(tile, ops, score=score, global_mode=global_mode, plan_=p)
    if global_mode:
        c = global_candidates(buf, count, thr, n_rows=n_rows, n_cols=n_cols, k=k, plan_=p)
        return Result(c.scores, c.rows, c.cols, c.unresolved)
    scores, cols = row_results(buf, count, k)
    rows = torch.arange(n_rows, device=cols.device)[:, None].expand_as(cols).clone()
    return Result(scores, cols, rows, []) if per_key else Result(scores, rows, cols, [])
