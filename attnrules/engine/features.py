"""Many output features of one head ranked exhaustively at once: ``multi_topk``.

score_g(q, k) = (queries[q]·keys[k]) × key_weights[k, g]  (A × V_g), for every column g of
``key_weights [Nk, G]``; the answer is each feature's global top-k, exactly what
``pair_topk(queries, keys, k, by="global", key_weight=key_weights[:, g])`` returns (ties by the
lower (query, key) index), as one :class:`TopK` of shape ``[G, k]``.

Method: A is shared by every feature, only the per-key factor changes. For a fixed key the best
queries of A × V_g are its highest-A queries when V_g(k) > 0 and its lowest-A queries when
V_g(k) < 0. So

1. one table per head: each key's ``T`` highest-A and ``T`` lowest-A queries, by two per-key
   passes of the engine (``pair_topk(queries, keys, T, by="key")`` and the same on ``-queries``:
   negation is exact, so the lowest A are the same numbers);
2. per feature, a key's candidates are its ``T`` queries on the side of sign(V_g(k)), scored
   A × V_g(k) — the same float products the single-feature ranking computes, already sorted. A lower
   bound τ₀ of the k-th score is the k-th best candidate of the keys with the best first candidates;
   only keys whose best candidate reaches τ₀ are read, only candidates ≥ τ₀ are kept, and the exact
   (score, lower index) top-k of those is taken;
3. a key whose table is exhausted (``T`` < Nq) while its T-th candidate still scores ≥ the feature's
   k-th score may hide better (or tied, lower-index) pairs: it is rescanned over all queries
   (the engine's per-key pass with k = Nq, so the A values are the backend's own) and merged. Since
   the hidden queries of a key score at most its T-th candidate, nothing else can be missed: the
   answer is exact. A zero weight scores 0 for every query; such keys are rescanned by the same rule
   whenever 0 reaches the k-th score, so ties at zero go by index.

Two implementations of steps 2–3, one method. Float32 CPU inputs ranked by the cpu backend (``"cpu"``,
or ``"auto"``) are answered by the C++ core (``csrc/multi.cpp``): the table is made by one two-sided
sweep (each key's best queries by A and by -A at once), every feature is answered in parallel with a
running top-k whose k-th score is the reading threshold, and a feature whose rows ran out resumes
from its provisional top-k once those rows are read deeper (the per-key pass gives a pair the same
bits in every call, so a deeper row starts with the shallower one). Other inputs (float64, CUDA, the
torch or triton backend), which the engine contract admits, take the torch path below.

Inputs whose dot products could overflow (the contract's Cauchy–Schwarz bound) are ranked feature by
feature through ``pair_topk``, which applies the NaN policy.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from attnrules.engine import contract, cpu_backend, merge
from attnrules.engine.contract import TopK

DEFAULT_DEPTH = 512  # queries per key and side in the table (capped by k and Nq)
DEFAULT_BATCH = 128  # features answered together
TAU_KEYS = 8  # keys read for the lower bound τ₀, per table-full of k
SORTED_PREFIX = 64  # C++ core: entries of each table row that come sorted (the rest follow unsorted)


def _check_weights(key_weights: object, keys: torch.Tensor) -> torch.Tensor:
    w = contract._as_tensor(key_weights)
    if not isinstance(w, torch.Tensor) or w.dim() != 2 or w.shape[0] != keys.shape[0] or w.shape[1] == 0:
        shape = tuple(w.shape) if isinstance(w, torch.Tensor) else type(w).__name__
        raise ValueError(f"key_weights must have shape [{keys.shape[0]}, G] (one column per feature), got {shape}")
    if w.device != keys.device:
        raise ValueError(f"key_weights is on {w.device} but keys are on {keys.device}: pass one device")
    if w.dtype != keys.dtype:
        raise TypeError(f"key_weights has dtype {w.dtype} but queries have {keys.dtype}: pass one dtype")
    contract._check_values("key_weights", w)
    return w


def _may_overflow(queries: torch.Tensor, keys: torch.Tensor) -> bool:
    fmax = torch.finfo(queries.dtype).max
    return not contract._max_norm(queries) * contract._max_norm(keys) <= fmax / 1024


@torch.no_grad()
def multi_topk(
    queries: torch.Tensor,
    keys: torch.Tensor,
    key_weights: torch.Tensor,
    k: int,
    *,
    table_depth: Optional[int] = None,
    batch: Optional[int] = None,
    backend: str = "auto",
    **options,
) -> TopK:
    """Each feature's k best pairs of score_g(q, k) = (queries[q]·keys[k]) × key_weights[k, g].

    queries ``[Nq, d]``, keys ``[Nk, d]``, key_weights ``[Nk, G]``; returns a :class:`TopK` whose
    ``scores`` / ``query_idx`` / ``key_idx`` have shape ``[G, k]`` (row g: feature g's global top-k,
    best first, ties by the lower (query, key) index) — row g equals
    ``pair_topk(queries, keys, k, key_weight=key_weights[:, g])``. ``table_depth``: queries kept per
    key and side (None: min(512, k, Nq); at least k / Nk); it trades table time against rescans and
    never changes the answer. ``batch``: features answered together on the torch path (None: 128; the
    C++ core takes 64 per thread at a time). ``backend`` and ``options`` go to the engine's per-key
    passes (``threads`` also to the core's answer). Float32 needs Nq × Nk < 2**32.
    """
    request = contract._check_request(queries, keys, k, "global", "signed", None, None, None)
    queries, keys, k = request.queries, request.keys, request.k
    w = _check_weights(key_weights, keys)
    nq, nk, n_feat = queries.shape[0], keys.shape[0], w.shape[1]
    depth = min(DEFAULT_DEPTH, k, nq) if table_depth is None else contract._positive_int("table_depth", table_depth)
    depth = min(max(depth, -(-k // nk)), nq)  # the table must hold at least k candidates
    batch = DEFAULT_BATCH if batch is None else contract._positive_int("batch", batch)
    if queries.dtype == torch.float32 and nq * nk >= 2**32:
        raise ValueError(f"multi_topk on float32 needs Nq × Nk < 2**32, got {nq} × {nk}: split the keys")

    if _may_overflow(queries, keys):  # rare: let pair_topk apply the NaN policy feature by feature
        rows = [contract.pair_topk(queries, keys, k, key_weight=w[:, g].contiguous(), backend=backend, **options)
                for g in range(n_feat)]
        return TopK(*(torch.stack([getattr(r, f) for r in rows]) for f in ("scores", "query_idx", "key_idx")),
                    by="global")

    negated = -queries  # exact: its per-key best are each key's lowest-A queries

    def per_key(q: torch.Tensor, kk: torch.Tensor, n: int) -> TopK:
        return contract.pair_topk(q, kk, n, by="key", backend=backend, **options)

    if _native_applies(queries, backend):
        kept = contract._options(contract._probe("cpu"), options, named=backend == "cpu")
        if backend == "auto":
            queries, keys = queries.contiguous(), keys.contiguous()
        return _native(queries, negated, keys, w.contiguous(), k, depth, per_key, kept)

    def fetch(key: torch.Tensor, positive: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows [len(key), n] of each key's n best queries on the side of ``positive``: (side score,
        query), side score = A (positive side) or -A (the other), descending; times |weight| it is
        the pair's score, bit for bit (negation is exact)."""
        a = torch.empty(key.numel(), n, dtype=queries.dtype, device=queries.device)
        q = torch.empty(key.numel(), n, dtype=torch.int64, device=queries.device)
        for side, sign in ((positive, 1.0), (~positive, -1.0)):
            if bool(side.any()):
                unique, which = torch.unique(key[side], return_inverse=True)
                best = per_key(queries if sign > 0 else negated, keys[unique], n)
                a[side], q[side] = best.scores[which], best.query_idx[which]
        return a, q

    high, low = per_key(queries, keys, depth), per_key(negated, keys, depth)
    a, q = torch.cat([high.scores, low.scores]), torch.cat([high.query_idx, low.query_idx])
    del high, low

    def single(weight: torch.Tensor) -> TopK:
        return contract.pair_topk(queries, keys, k, key_weight=weight.contiguous(), backend=backend, **options)

    # rows: key (A descending), Nk + key (-A descending), and their first column
    table = (a, q.to(torch.int32) if nq < 2**31 else q, a[:, 0].contiguous())

    out_s = torch.empty(n_feat, k, dtype=queries.dtype, device=queries.device)
    out_q = torch.empty(n_feat, k, dtype=torch.int64, device=queries.device)
    out_k = torch.empty(n_feat, k, dtype=torch.int64, device=queries.device)
    for g0 in range(0, n_feat, batch):
        g1 = min(g0 + batch, n_feat)
        s, flat = _answer(table, w[:, g0:g1].T.contiguous(), k, nq, fetch, single)
        out_s[g0:g1], out_q[g0:g1], out_k[g0:g1] = s, flat // nk, flat % nk
    return TopK(out_s, out_q, out_k, "global")


def _native_applies(queries: torch.Tensor, backend: str) -> bool:
    """Whether the C++ core answers: float32 CPU inputs ranked by the cpu backend. Its per-key pass
    gives a pair the same bits in every call, which resuming from a shallower row needs."""
    return (queries.device.type == "cpu" and queries.dtype == torch.float32 and backend in ("auto", "cpu")
            and cpu_backend.answers_features())  # fmt: skip


def _native(queries: torch.Tensor, negated: torch.Tensor, keys: torch.Tensor, w: torch.Tensor, k: int,
            depth: int, per_key, options: dict) -> TopK:
    """Every feature answered in the C++ core from the table; rows that run out above a feature's k-th
    score are read 4× deeper (all queries at most) by the engine's per-key pass, and the features that
    needed them resume from their provisional top-k with the new entries, until none needs more. The
    per-key pass is exact (the same bits for a pair in any call), so a deeper row starts with the
    entries of the shallower one."""
    nq, nk, n_feat = queries.shape[0], keys.shape[0], w.shape[1]
    sides = (queries, negated)  # table rows 0..Nk-1: A descending; Nk..2Nk-1: -A descending
    # One sweep, both sides; only each row's SORTED_PREFIX best come sorted (most rows are read no
    # further), deeper rows come sorted whole.
    scores, picked = cpu_backend.per_key_both_sides(queries, keys, depth, sorted_prefix=SORTED_PREFIX, **options)
    scores, picked = scores.view(-1), picked.view(-1).to(torch.int32)
    row_len = torch.full((2 * nk,), depth, dtype=torch.int64)
    row_sorted = torch.full((2 * nk,), min(SORTED_PREFIX, depth), dtype=torch.int64)
    row_start = torch.arange(2 * nk, dtype=torch.int64) * depth
    out = TopK(torch.empty(n_feat, k), torch.empty(n_feat, k, dtype=torch.int64),
               torch.empty(n_feat, k, dtype=torch.int64), "global")  # fmt: skip
    todo = torch.arange(n_feat, dtype=torch.int64)
    first_keys = TAU_KEYS * math.ceil(k / depth)
    grown = None
    while todo.numel():
        deeper, incomplete = cpu_backend.answer_features(scores, picked, row_start, row_len, w, todo, k, nq,
                                                         first_keys, out, grown, options.get("threads"),
                                                         row_sorted)  # fmt: skip
        todo = todo[incomplete.bool()]
        deep = torch.nonzero(deeper).flatten()
        grown = (deep, row_len[deep].clone())
        new_len = (4 * row_len[deep]).clamp(max=nq)
        parts_s, parts_q, end = [scores], [picked], scores.numel()
        for n in torch.unique(new_len).tolist():
            for side in (0, 1):
                sel = deep[(new_len == n) & ((deep >= nk) == bool(side))]
                if sel.numel():
                    best = per_key(sides[side], keys[sel - side * nk], n)  # the same bits as the table's
                    row_start[sel] = end + n * torch.arange(sel.numel())
                    row_len[sel] = row_sorted[sel] = n
                    end += best.scores.numel()
                    parts_s.append(best.scores.reshape(-1))
                    parts_q.append(best.query_idx.reshape(-1).to(torch.int32))
        if len(parts_s) > 1:
            scores, picked = torch.cat(parts_s), torch.cat(parts_q)
    return out


def _top(cand_b: torch.Tensor, cand_s: torch.Tensor, cand_i: torch.Tensor, n_b: int, k: int, base=None):
    """Each feature's exact top-k of flat candidates (feature ``cand_b`` sorted ascending, distinct index),
    plus, with ``base`` = (scores, index, valid) ``[B, m]``, those rows' valid entries."""
    device = cand_s.device
    counts = torch.bincount(cand_b, minlength=n_b)
    start = torch.cumsum(counts, 0) - counts
    m = 0 if base is None else base[0].shape[1]
    slot = torch.arange(cand_b.numel(), device=device) - start[cand_b] + m
    width = int(counts.max()) + m
    if cand_s.dtype == torch.float32:  # one integer top-k over exact (score, index) keys
        pad = torch.full((n_b, width), merge._SENTINEL, dtype=torch.int64, device=device)
        if base is not None:
            pad[:, :m] = torch.where(base[2], merge.pack_float32(base[0], base[1]), pad[:, :m])
        pad[cand_b, slot] = merge.pack_float32(cand_s, cand_i)
        return merge.unpack_float32(torch.topk(pad, k, dim=1).values)
    pad_s = torch.zeros(n_b, width, dtype=cand_s.dtype, device=device)
    pad_i = torch.zeros(n_b, width, dtype=torch.int64, device=device)
    valid = torch.zeros(n_b, width, dtype=torch.bool, device=device)
    if base is not None:
        pad_s[:, :m], pad_i[:, :m], valid[:, :m] = base
    pad_s[cand_b, slot], pad_i[cand_b, slot], valid[cand_b, slot] = cand_s, cand_i, True
    return merge.top_per_row(pad_s, pad_i, k, valid=valid)


def _candidates(row_b, row_key, a, q, v, floor, nk):
    """Scores of the rows' queries for their features, and the flat candidates at or above ``floor``."""
    s = a * v[row_b, row_key].abs()[:, None]
    pick_r, pick_t = torch.nonzero(s >= floor[row_b, None], as_tuple=True)
    return s[:, -1], (row_b[pick_r], s[pick_r, pick_t], q[pick_r, pick_t].long() * nk + row_key[pick_r])


def _answer(table, v: torch.Tensor, k: int, nq: int, fetch, single) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k (scores, flat index q × Nk + key) of every row of ``v [B, Nk]`` (weights of B features).

    ``table``: side scores [2 Nk, T] (rows 0..Nk-1: A descending; Nk..2Nk-1: -A descending) and their
    queries; a (feature, key) reads row key when its weight is > 0, Nk + key otherwise.
    """
    tab_s, tab_q, tab_first = table
    n_b, nk = v.shape
    depth = tab_s.shape[1]
    dtype, device = v.dtype, v.device
    mag = v.abs()
    on_high = v > 0
    side = (~on_high).long() * nk  # table row offset of each (feature, key)
    # Best candidate of every (feature, key): an upper bound on the key's scores that the table shows.
    best = torch.where(on_high, tab_first[:nk], tab_first[nk:]) * mag
    # τ₀: the k-th best candidate among the full rows of the keys with the best first candidates — a
    # score of k distinct pairs, so a lower bound of the feature's k-th score.
    n_keys = min(nk, TAU_KEYS * math.ceil(k / depth))  # n_keys × depth ≥ k (the table depth is ≥ k / Nk)
    top_keys = torch.topk(best, n_keys, dim=1).indices  # [B, r]
    rows = (top_keys + side.gather(1, top_keys)).reshape(-1)
    cand = (tab_s[rows] * mag.gather(1, top_keys).reshape(-1, 1)).reshape(n_b, -1)
    tau0 = torch.topk(cand, k, dim=1, sorted=False).values.min(dim=1).values
    # Read the keys that can reach τ₀. Each one's candidates ≥ τ₀ form a prefix of its row (side
    # scores descending, |weight| fixed, rounding monotone): bound its length by a binary search for a
    # slightly lowered τ₀ / |weight|, then filter exactly.
    row_b, row_key = torch.nonzero(best >= tau0[:, None], as_tuple=True)  # sorted by feature
    row = row_key + side[row_b, row_key]
    row_mag, t0 = mag[row_b, row_key], tau0[row_b]
    bound = t0 / row_mag
    bound = bound - bound.abs() * (4 * torch.finfo(dtype).eps)  # fl(s × |w|) ≥ τ₀ implies s ≥ bound
    whole = torch.where(t0 <= 0, float("-inf"), float("inf")).to(dtype)  # zero weight: the row iff 0 ≥ τ₀
    bound = torch.where(row_mag > 0, bound, whole)
    flat_s, start = tab_s.view(-1), row * depth
    lo, hi = torch.zeros_like(row), torch.full_like(row, depth)
    for _ in range(depth.bit_length()):
        mid = (lo + hi) // 2
        open_ = lo < hi
        ge = flat_s[start + mid.clamp(max=depth - 1)] >= bound
        lo, hi = torch.where(open_ & ge, mid + 1, lo), torch.where(open_ & ~ge, mid, hi)
    n_read = lo
    row_key = row % nk
    starts = torch.cumsum(n_read, 0) - n_read
    owner = torch.repeat_interleave(torch.arange(row.numel(), device=device), n_read)
    col = torch.arange(owner.numel(), device=device) - starts[owner]
    at = row[owner] * depth + col
    cand_s = tab_s.view(-1)[at] * mag[row_b[owner], row_key[owner]]
    keep = cand_s >= tau0[row_b[owner]]
    owner = owner[keep]
    top_s, top_i = _top(row_b[owner], cand_s[keep], tab_q.view(-1)[at[keep]].long() * nk + row_key[owner], n_b, k)
    if depth >= nq:  # the table holds every query: nothing is hidden
        return top_s, top_i
    # A key whose rows ran out while still at or above the k-th score may hide pairs: read it deeper
    # (4× per round, at most all queries) until no key can.
    full = n_read == depth
    row_b, row_key, row = row_b[full], row_key[full], row[full]
    last = tab_s[row, -1] * mag[row_b, row_key]
    while depth < nq:
        kth = top_s[:, -1]
        need = last >= kth[row_b]
        if not bool(need.any()):
            break
        row_b, row_key = row_b[need], row_key[need]
        depth = min(nq, 4 * depth)
        a, q = fetch(row_key, on_high[row_b, row_key], depth)
        # Backends whose products depend on the tile shapes (torch) may round a re-read pair apart
        # from its table copy: read a little below the k-th score so that the pair comes back.
        floor = kth - kth.abs() * 1e-3 - torch.finfo(dtype).tiny
        last, (new_b, new_s, new_i) = _candidates(row_b, row_key, a, q, v, floor, nk)
        # The deeper rows replace those keys' entries; every other entry of the top-k stays.
        mark = torch.zeros(n_b, nk, dtype=torch.bool, device=device)
        mark[row_b, row_key] = True
        stay = ~mark.gather(1, top_i % nk)
        short = (torch.bincount(new_b, minlength=n_b) + stay.sum(1)) < k
        top_s, top_i = _top(new_b, new_s, new_i, n_b, k, base=(top_s, top_i, stay))
        for b in torch.nonzero(short).flatten().tolist():  # safety net, not expected: rank it alone
            best = single(v[b])
            top_s[b], top_i[b] = best.scores, best.query_idx * nk + best.key_idx
    return top_s, top_i
