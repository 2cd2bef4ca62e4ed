"""Streaming top-k over all (row, column) pairs: the @triton.jit kernel shared by pair_topk and dual_topk.

A program holds a block of ``BLOCK_R`` rows — loaded once and kept stationary when they fit one
``BLOCK_D`` (and ``BLOCK_X``) chunk — and streams column blocks past it (FlashAttention's loop
order). Each tile's scores come from a ``TILE`` function (the operation: see pair_topk.py and
dual_topk.py). Per tile:

1. **filter**: the tile is scored at ``FILTER`` precision ("tf32"/"tf32x3" on tensor cores, or
   "ieee" fp32). With ``RESCORE`` the filter's error is bounded by ``margin_c × ‖row‖ × ‖col‖``
   (the norm factors ``na``, ``nb`` come from the launch; ``plan.filter_margin`` proves the
   constant), so a score that could reach the running threshold has ``filter + margin ≥ threshold``;
2. **reject on floats**: a tile none of whose scores can reach its row's threshold costs nothing
   more — no rescoring, no packing, no write;
3. **rescore** (``RESCORE``): the other tiles are scored again in fp32 ("ieee"), so every kept score
   is the fp32 score and the answer equals the fp32 answer, ties included;
4. **pack survivors**: scores at or above the threshold are packed into int64 sort keys (high 32
   bits order like the float, low 32 bits like the *reversed* index, so a larger key is a better
   pair and ties go to the lower index), compared exactly with the threshold key and appended to a
   scratch buffer in global memory (a per-row prefix sum gives each its slot). A buffer that could
   not take another tile is then compacted to its ``K`` best, found by bisection on the key order (counting
   passes over the buffer, no sort: registers hold one chunk of keys), and the K-th best becomes
   the new threshold.

Two modes share the code:

- per row (``GLOBAL=False``): a buffer and threshold per row; the answer of row r is the top-k of its
  buffer(s).
- global (``GLOBAL=True``): one buffer and threshold per program (a row block × one column split),
  starting from ``floor`` (a lower bound of the global k-th score, or -inf); the answer is the top-k
  of the union of the buffers.

This module is the device code only (and its default configuration). Block sizes, grid, buffer sizes and
the filter margin are chosen in ``plan.py``; ``launch.py`` runs the kernel and returns its buffers;
decoding and merging them into the answer is the engine's job (``attnrules.engine``). Nothing of
size rows × columns is ever written. Addresses that can pass 2³¹ are computed in int64.
"""
from __future__ import annotations

import triton
import triton.language as tl

# True when this module was imported with TRITON_INTERPRET=1: kernels then run on CPU tensors.
INTERPRETED: bool = bool(triton.knobs.runtime.interpret)

SENTINEL = -(2**63)  # smaller than every packed key: an empty slot
SCORE_CODES = {"signed": 0, "absolute": 1, "exp": 2}


@triton.jit
def _tf32(x):
    """x truncated to TF32 (10 mantissa bits), as tensor cores read fp32 inputs: the interpreter's
    stand-in for the hardware's rounding (it computes every tl.dot in fp32)."""
    return (x.to(tl.int32, bitcast=True) & -8192).to(tl.float32, bitcast=True)  # 0xFFFFE000: sign, exponent, 10 bits


@triton.jit
def _dot(a, b, PRECISION: tl.constexpr, EMULATE: tl.constexpr):
    """a @ b at ``PRECISION``; with ``EMULATE`` (interpreter only) TF32 inputs are rounded in
    software, so tests see a filter as inexact as the hardware's."""
    if EMULATE and PRECISION == "tf32":
        out = tl.dot(_tf32(a), _tf32(b), input_precision="ieee")
    elif EMULATE and PRECISION == "tf32x3":
        a_hi, b_hi = _tf32(a), _tf32(b)
        a_lo, b_lo = _tf32(a - a_hi), _tf32(b - b_hi)
        out = tl.dot(a_hi, b_lo, input_precision="ieee") + tl.dot(a_lo, b_hi, input_precision="ieee")
        out += tl.dot(a_hi, b_hi, input_precision="ieee")
    else:
        out = tl.dot(a, b, input_precision=PRECISION)
    return out


@triton.jit
def load_rows(ptr, offs_r, mask_r, stride, n, BLOCK: tl.constexpr):
    """The stationary [rows, BLOCK] float32 operand: row vectors of length n ≤ BLOCK (upcast after loading)."""
    offs = tl.arange(0, BLOCK)
    return tl.load(ptr + offs_r[:, None].to(tl.int64) * stride + offs[None, :],
                   mask=mask_r[:, None] & (offs[None, :] < n), other=0.0).to(tl.float32)


@triton.jit
def dot_tile(a_tile, a_ptr, b_ptr, offs_r, offs_c, mask_r, mask_c, stride_a, stride_b, d,
             BLOCK_D: tl.constexpr, STATIONARY: tl.constexpr, PRECISION: tl.constexpr, EMULATE: tl.constexpr):
    """[BLOCK_R, BLOCK_C] float32 inner products a[rows] · b[cols] over d.

    Tensor-core precisions with ``STATIONARY`` rows (d ≤ BLOCK_D): one product with the rows held
    in ``a_tile``. Otherwise the rows are read again chunk by chunk; fp32 ("ieee") always goes 16
    terms at a time, accumulating into one fused multiply-add chain (the same order whatever the
    chunking), so that its operands stay small enough for registers."""
    if STATIONARY and PRECISION != "ieee":
        offs_d = tl.arange(0, BLOCK_D)
        b = tl.load(b_ptr + offs_c[None, :].to(tl.int64) * stride_b + offs_d[:, None],
                    mask=mask_c[None, :] & (offs_d[:, None] < d), other=0.0).to(tl.float32)
        acc = _dot(a_tile, b, PRECISION, EMULATE)
    else:
        STEP: tl.constexpr = 16 if PRECISION == "ieee" else BLOCK_D
        acc = tl.zeros((offs_r.shape[0], offs_c.shape[0]), dtype=tl.float32)
        for d0 in range(0, d, STEP):
            offs_d = d0 + tl.arange(0, STEP)
            mask_d = offs_d < d
            a = tl.load(a_ptr + offs_r[:, None].to(tl.int64) * stride_a + offs_d[None, :],
                        mask=mask_r[:, None] & mask_d[None, :], other=0.0).to(tl.float32)
            b = tl.load(b_ptr + offs_c[None, :].to(tl.int64) * stride_b + offs_d[:, None],
                        mask=mask_c[None, :] & mask_d[:, None], other=0.0).to(tl.float32)
            if PRECISION == "ieee":
                acc = tl.dot(a, b, acc, input_precision="ieee")
            else:
                acc += _dot(a, b, PRECISION, EMULATE)
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
def _key_score(key):
    """The float score of a threshold key (the inverse of ``_pack``'s high half); -inf for an empty slot."""
    high = (key >> 32).to(tl.int32)
    s = (high ^ ((high >> 31) & 0x7FFFFFFF)).to(tl.float32, bitcast=True)
    return tl.where(key == -9223372036854775808, float("-inf"), s)


@triton.jit
def state_base(pid_s, n_rows, r0, pid_r, n_splits, CAP: tl.constexpr, GLOBAL: tl.constexpr):
    """(first buffer index s0, its first slot s0 × CAP) of a program, in int64: per row, buffer
    s0 = split × n_rows + row, so split × n_rows × CAP passes 2³¹ slots at large shapes."""
    if GLOBAL:
        s0 = pid_r.to(tl.int64) * n_splits + pid_s
    else:
        s0 = pid_s.to(tl.int64) * n_rows + r0
    return s0, s0 * CAP


@triton.jit
def _count_at_least(buf_ptr, base, count, t, CHUNK: tl.constexpr):
    """[G] int32: how many keys of each buffer (slots [0, count)) are ≥ t, read CHUNK slots at a time."""
    n = tl.zeros(count.shape, dtype=tl.int32)
    for c0 in range(0, tl.max(count), CHUNK):
        slots = c0 + tl.arange(0, CHUNK)
        keys = tl.load(buf_ptr + base[:, None] + slots[None, :], mask=slots[None, :] < count[:, None],
                       other=-9223372036854775808)
        n += tl.sum((keys >= t[:, None]).to(tl.int32), axis=1)
    return n


@triton.jit
def _kth_key(buf_ptr, base, count, K: tl.constexpr, CHUNK: tl.constexpr):
    """[G] int64: per buffer, a key t with exactly K keys ≥ t (buffers of ≤ K keys: the empty key).

    Bisection on the int64 key order — no sort, so registers hold one CHUNK of keys: the invariant
    is count(≥ lo) ≥ K > count(≥ hi); it stops as soon as count(≥ mid) == K (keys are distinct)."""
    full = count > K
    lo = tl.full(count.shape, -9223372036854775808, dtype=tl.int64)
    hi = tl.where(full, 9223372036854775807, lo + 1)  # every key < 2⁶³ − 1 (the index half is < 2³²)
    while tl.max((hi > lo + 1).to(tl.int32)) > 0:  # (hi − lo could overflow)
        mid = (lo >> 1) + (hi >> 1) + (lo & hi & 1)  # floor((lo + hi) / 2) without overflow
        n = _count_at_least(buf_ptr, base, count, mid, CHUNK)
        open_ = hi > lo + 1
        lo = tl.where(open_ & (n >= K), mid, lo)
        hi = tl.where(open_ & (n < K), mid, tl.where(open_ & (n == K), mid + 1, hi))
    return lo


@triton.jit
def _compact(buf_ptr, base, count, thr, K: tl.constexpr, CHUNK: tl.constexpr):
    """Keep the K best keys of each of the program's buffers; return (threshold, count).

    A buffer of more than K keys keeps exactly its K best (moved to its first slots in order of
    their slots) and its threshold becomes the K-th best; smaller buffers are left as they are.
    Explicit barriers order every thread's global-memory appends, reads and writes around it (the
    interpreter, one thread per program, cannot show a missing one)."""
    tl.debug_barrier()  # the appends of every thread are visible before any is read
    t = _kth_key(buf_ptr, base, count, K, CHUNK)
    full = count > K
    written = tl.zeros(count.shape, dtype=tl.int32)
    new_thr = tl.full(count.shape, 9223372036854775807, dtype=tl.int64)
    for c0 in range(0, tl.max(count), CHUNK):
        slots = c0 + tl.arange(0, CHUNK)
        keys = tl.load(buf_ptr + base[:, None] + slots[None, :], mask=slots[None, :] < count[:, None],
                       other=-9223372036854775808)
        keep = (keys >= t[:, None]) & (slots[None, :] < count[:, None]) & full[:, None]
        # Every thread has read this chunk before its kept keys move down (to slots < c0 + CHUNK).
        tl.debug_barrier()
        tl.store(buf_ptr + base[:, None] + written[:, None] + tl.cumsum(keep.to(tl.int32), axis=1) - 1, keys,
                 mask=keep)
        written += tl.sum(keep.to(tl.int32), axis=1)
        new_thr = tl.minimum(new_thr, tl.min(tl.where(keep, keys, 9223372036854775807), axis=1))
    tl.debug_barrier()  # the compacted slots are written before the next appends reuse the buffer
    return tl.where(full, new_thr, thr), tl.where(full, written, count)


@triton.jit
def _reachable(s, thr_f, e_row, SCORE: tl.constexpr, RESCORE: tl.constexpr):
    """True where a filter score ``s`` may reach its row's float threshold (NaN always may).

    ``e_row`` [rows, 1] bounds |filter − fp32| of the inner products (the score's own for
    signed/absolute; for exp, of the dot inside it, turned here into a bound relative to |s|)."""
    if RESCORE:
        if SCORE == 2:
            # |exp(f)·w − exp(r)·w| ≤ |exp(f)·w| · e·exp(2e), plus both exps' own rounding (tl.exp
            # reaches ~2⁻²¹ + |x|·2⁻²³ relative); |x| ≤ e / margin is covered by the 2⁻¹⁶ term for
            # every x where exp is finite and not 0.
            up = s + tl.abs(s) * (e_row * tl.exp(2.0 * e_row) + 1.52587890625e-05)
        else:
            up = s + e_row
    else:
        up = s
    return (up >= thr_f[:, None]) | (s != s)


@triton.jit
def stream_topk_kernel(
    a_ptr, b_ptr, xa_ptr, xb_ptr, na_ptr, nb_ptr, buf_ptr, count_ptr, thr_ptr,
    n_rows, n_cols, d, n_x, cols_per_split,
    stride_a, stride_b, stride_xa, stride_xb, margin_c, floor,
    TILE: tl.constexpr, DUAL: tl.constexpr, SCORE: tl.constexpr, HAS_XA: tl.constexpr, HAS_XB: tl.constexpr,
    GLOBAL: tl.constexpr, K: tl.constexpr, CAP: tl.constexpr, CHUNK: tl.constexpr,
    FILTER: tl.constexpr, RESCORE: tl.constexpr, EMULATE: tl.constexpr, STATIONARY: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_X: tl.constexpr,
):
    """Program (row block, column split): stream its columns and leave candidates in the buffers."""
    pid_r = tl.program_id(0)
    pid_s = tl.program_id(1)
    r0 = pid_r * BLOCK_R
    offs_r = r0 + tl.arange(0, BLOCK_R)
    mask_r = offs_r < n_rows
    c_start = pid_s.to(tl.int64) * cols_per_split
    c_stop = tl.minimum(c_start + cols_per_split, n_cols)
    # The program's buffers are s0 .. s0 + G - 1; the first n_live of them are real.
    s0, base0 = state_base(pid_s, n_rows, r0, pid_r, tl.num_programs(1), CAP, GLOBAL)
    if GLOBAL:
        G: tl.constexpr = 1
        T: tl.constexpr = BLOCK_R * BLOCK_C  # most keys one tile appends to a buffer
        n_live = 1
    else:
        G: tl.constexpr = BLOCK_R
        T: tl.constexpr = BLOCK_C
        n_live = n_rows - r0
    base = base0 + tl.arange(0, G).to(tl.int64) * CAP
    thr = tl.full((G,), -9223372036854775808, dtype=tl.int64)  # threshold key: keep keys above it
    thr_f = tl.full((G,), 0.0, dtype=tl.float32) + floor  # its score (or the floor): reject below it
    count = tl.zeros((G,), dtype=tl.int32)
    # The stationary side: this program's rows (and their extra operand), read once.
    if STATIONARY:
        a_tile = load_rows(a_ptr, offs_r, mask_r, stride_a, d, BLOCK_D)
    else:
        a_tile = 0.0
    if STATIONARY and DUAL:
        xa_tile = load_rows(xa_ptr, offs_r, mask_r, stride_xa, n_x, BLOCK_X)
    elif HAS_XA and not DUAL:
        xa_tile = tl.load(xa_ptr + offs_r, mask=mask_r, other=0.0).to(tl.float32)
    else:
        xa_tile = 0.0
    if RESCORE:
        na = tl.load(na_ptr + offs_r, mask=mask_r, other=0.0)
    for c0 in range(c_start, c_stop, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        mask_c = offs_c < c_stop
        mask = mask_r[:, None] & mask_c[None, :]
        s = TILE(a_tile, xa_tile, a_ptr, b_ptr, xa_ptr, xb_ptr, offs_r, offs_c, mask_r, mask_c,
                 stride_a, stride_b, stride_xa, stride_xb, d, n_x,
                 SCORE, HAS_XA, HAS_XB, STATIONARY, BLOCK_D, BLOCK_X, FILTER, EMULATE)
        e_row = 0.0
        if RESCORE:
            nb_max = tl.max(tl.load(nb_ptr + offs_c, mask=mask_c, other=0.0))
            e_row = margin_c * na[:, None] * nb_max
            e_row = tl.where(e_row == e_row, e_row, float("inf"))  # 0 × inf norms: assume the worst
        hit = _reachable(s, thr_f, e_row, SCORE, RESCORE) & mask
        if tl.max(hit.to(tl.int32)) > 0:
            if RESCORE:  # the fp32 scores of a tile that may hold survivors
                s = TILE(a_tile, xa_tile, a_ptr, b_ptr, xa_ptr, xb_ptr, offs_r, offs_c, mask_r, mask_c,
                         stride_a, stride_b, stride_xa, stride_xb, d, n_x,
                         SCORE, HAS_XA, HAS_XB, STATIONARY, BLOCK_D, BLOCK_X, "ieee", False)
                hit = _reachable(s, thr_f, 0.0, SCORE, False) & mask
            if GLOBAL:  # index within the program's region, increasing with (row, column)
                index = (offs_r - r0)[:, None].to(tl.int64) * n_cols + offs_c[None, :]
            else:
                index = tl.zeros((BLOCK_R, 1), dtype=tl.int64) + offs_c[None, :]
            keys = _pack(s, index)  # survivors of the float test only are kept (take) and written
            take = hit & (keys > thr[:, None])
            take_i = take.to(tl.int32)
            row_n = tl.sum(take_i, axis=1)
            slot = tl.cumsum(take_i, axis=1) - 1
            if GLOBAL:  # the tile's rows append one after another to the program's one buffer
                slot += (tl.cumsum(row_n, axis=0) - row_n)[:, None]
            tl.store(buf_ptr + base[:, None] + count[:, None] + slot, keys, mask=take)
            if GLOBAL:
                count += tl.sum(row_n, axis=0)
            else:
                count += row_n
            # Room for the next tile (CAP ≥ K + one tile); here no tile-sized value is live, so the
            # compaction has the registers to itself.
            if tl.max(count) > CAP - T:
                thr, count = _compact(buf_ptr, base, count, thr, K, CHUNK)
                thr_f = tl.maximum(_key_score(thr), floor)
    group = tl.arange(0, G)
    tl.store(count_ptr + s0 + group, count, mask=group < n_live)
    tl.store(thr_ptr + s0 + group, thr, mask=group < n_live)


# The default configuration (plan.py uses it when block_c is not given): checked free of register
# spills for sm_90 and sm_80 by tests/test_triton_compile.py. No autotuner: every distinct launch
# compiles once, which keeps the first call (and bench/gpu_check.sh) short.
DEFAULT_BLOCK_C = 64
DEFAULT_WARPS = 8
DEFAULT_STAGES = 2
