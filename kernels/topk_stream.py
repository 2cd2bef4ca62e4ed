"""Streaming top-k over all (row, column) pairs: the @triton.jit kernel shared by pair_topk and dual_topk.

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

This module is the device code only (and its autotuned variant). Block sizes, grid and buffer
sizes are chosen in ``plan.py``; ``launch.py`` runs the kernel and reads the buffers back as
candidates; merging candidates into the answer is the engine's job (``attnrules.engine.merge``).
Nothing of size rows × columns is ever written.
"""
from __future__ import annotations

import triton
import triton.language as tl

# True when this module was imported with TRITON_INTERPRET=1: kernels then run on CPU tensors.
INTERPRETED: bool = bool(triton.knobs.runtime.interpret)

SENTINEL = -(2**63)  # smaller than every packed key: an empty slot
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
    """int64 keys ordered like (score desc, index asc); -0.0 is folded onto +0.0 first, and every NaN
    onto the positive quiet NaN, which ranks above +inf: a NaN always reaches the answer, where the
    engine refuses it (whatever sign the hardware gave the NaN)."""
    s = tl.where(s == 0.0, 0.0, s)
    bits = s.to(tl.int32, bitcast=True)
    bits = tl.where(s != s, 0x7FC00000, bits)
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


AUTOTUNE_BLOCK_C_MAX = 128  # widest column block the autotuner may pick (plan.py sizes buffers for it)
tuned_kernel = triton.autotune(
    configs=_configs(), key=["n_cols", "d", "n_x", "TILE", "SCORE", "K", "CAP", "BLOCK_R", "GLOBAL"]
)(stream_topk_kernel)
