"""The "cpu" backend: the fused blocked score + top-k kernel of ``attnrules._C`` (C++17, SIMD, OpenMP).

Tiles of queries × keys are computed in registers by an AVX-512 / AVX2 / portable micro-kernel
(picked at run time for this CPU) and filtered at once against the running k-th best score, so the
Nq × Nk matrix never exists. The GIL is released and the answer is the same, bit for bit, for any
number of threads and any block sizes: ties go to the lower (query, key) index.

This module only checks arguments and shapes the result; the math is in ``csrc/``. Inputs are
passed to C++ without a copy, so they must already be float32, C-contiguous CPU tensors.
"""
from __future__ import annotations

from typing import Optional

import torch

from attnrules.engine.contract import Request, TopK

try:
    import attnrules._C as _C
except ImportError:  # the package was installed without building the C++ core
    _C = None

ISAS = ("auto", "avx512", "avx2", "generic")


def is_available() -> bool:
    """True when ``attnrules._C`` was built with the top-k kernels."""
    return _C is not None and hasattr(_C, "topk")


def per_key_both_sides(
    queries: torch.Tensor,
    keys: torch.Tensor,
    k: int,
    *,
    threads: Optional[int] = None,
    block_q: Optional[int] = None,
    block_k: Optional[int] = None,
    isa: str = "auto",
    sample_cols: Optional[int] = None,
    sorted_prefix: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each key's k best queries by A = queries·keys and by -A, from one sweep of the scores.

    Returns (scores, query indices), each ``[2, Nk, k]``: side 0 is ``pair_topk(queries, keys, k,
    by="key", backend="cpu")``'s scores and query_idx; side 1 those of the same call on ``-queries``
    (scores -A, bit for bit: negation is exact), at the cost of about one pass instead of two.
    ``sorted_prefix`` > 0: only each row's best ``sorted_prefix`` entries come sorted, the others
    follow them in no order (the same set: sorting is most of the selection cost). Inputs are checked
    by the caller (``engine.multi_topk``): float32, C-contiguous CPU.
    """
    request = Request(queries, keys, k, "key", "signed")
    return _run(request, threads, block_q, block_k, isa, sample_cols, two_sided=True, sorted_prefix=sorted_prefix)


def answers_features() -> bool:
    """True when ``attnrules._C`` has the many-feature answer of ``engine.multi_topk``."""
    return is_available() and hasattr(_C, "multi_topk")


def supported_isas() -> list[str]:
    """The SIMD kernels this CPU can run, best first (``isa="auto"`` picks the first)."""
    return list(_C.build_info()["isas"]) if is_available() else []


def _operand(name: str, x: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """The tensor as C++ may read it in place, or a clear error naming the argument."""
    if x is None:
        return None
    if x.device.type != "cpu":
        raise ValueError(f"{name} must be on the CPU for backend='cpu', got device {x.device}")
    if x.dtype != torch.float32:
        raise TypeError(
            f"{name} must be float32 for backend='cpu', got {x.dtype}: convert it (.float()) or use backend='torch'"
        )
    if not x.is_contiguous():
        raise ValueError(f"{name} must be C-contiguous for backend='cpu' (inputs are never copied): pass {name}.contiguous()")
    return x.detach()


def _positive(name: str, value: Optional[int]) -> int:
    """0 for None (the core's "automatic"), else a checked positive int."""
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int or None, got {value!r}")
    return value


def _run(
    request: Request,
    threads: Optional[int],
    block_q: Optional[int],
    block_k: Optional[int],
    isa: str,
    sample_cols: Optional[int],
    two_sided: bool = False,
    sorted_prefix: int = 0,
):
    if not is_available():
        raise RuntimeError("backend 'cpu' needs attnrules._C, which was not built: reinstall attnrules")
    if isa not in ISAS:
        raise ValueError(f"isa must be one of {ISAS}, got {isa!r}")
    if isa != "auto" and isa not in supported_isas():
        raise ValueError(f"isa {isa!r} is not supported by this CPU (supported: {supported_isas()})")
    threads_, block_q_, block_k_ = _positive("threads", threads), _positive("block_q", block_q), _positive("block_k", block_k)
    if sample_cols is not None and (isinstance(sample_cols, bool) or not isinstance(sample_cols, int) or sample_cols < 0):
        raise ValueError(f"sample_cols must be a non-negative int or None, got {sample_cols!r}")
    queries, keys = _operand("queries", request.queries), _operand("keys", request.keys)
    weight = _operand("key_weight", request.key_weight)
    query_acts, key_acts = _operand("query_acts", request.query_acts), _operand("key_acts", request.key_acts)

    k, by = request.k, request.by
    per_key = by == "key"
    # The core works on rows × cols: keys are the rows for by="key", the queries otherwise.
    rows, cols = (keys, queries) if per_key else (queries, keys)
    row_acts, col_acts = (key_acts, query_acts) if per_key else (query_acts, key_acts)
    n_rows = rows.shape[0]
    shape = (k,) if by == "global" else (n_rows, k)
    if two_sided:  # both sides in one buffer each: [2, n_rows, k]
        both_scores, both_cols = torch.empty((2, *shape)), torch.empty((2, *shape), dtype=torch.int64)
        (scores, low_scores), (out_cols, low_cols) = both_scores, both_cols
    else:
        scores, out_cols = torch.empty(shape, dtype=torch.float32), torch.empty(shape, dtype=torch.int64)
        low_scores = low_cols = None
    out_rows = torch.empty(shape, dtype=torch.int64) if by == "global" else None
    _C.topk(
        rows, cols, k, by != "global", request.score,
        row_weight=weight if per_key else None,
        col_weight=None if per_key else weight,
        row_acts=row_acts, col_acts=col_acts,
        out_scores=scores.view(-1), out_rows=None if out_rows is None else out_rows.view(-1), out_cols=out_cols.view(-1),
        threads=threads_, isa=isa,
        block_rows=block_k_ if per_key else block_q_,
        block_cols=block_q_ if per_key else block_k_,
        sample_cols=-1 if sample_cols is None else sample_cols,
        out_scores_low=None if low_scores is None else low_scores.view(-1),
        out_cols_low=None if low_cols is None else low_cols.view(-1),
        sorted=sorted_prefix,
    )  # fmt: skip
    if two_sided:
        return both_scores, both_cols
    if by == "global":
        return TopK(scores, out_rows, out_cols, by)
    fixed = torch.arange(n_rows, dtype=torch.int64)[:, None].expand(shape).contiguous()
    return TopK(scores, out_cols, fixed, by) if per_key else TopK(scores, fixed, out_cols, by)


def topk(
    request: Request,
    *,
    threads: Optional[int] = None,
    block_q: Optional[int] = None,
    block_k: Optional[int] = None,
    isa: str = "auto",
    sample_cols: Optional[int] = None,
) -> TopK:
    """``engine.pair_topk`` or ``engine.dual_topk`` (the request says which) on the CPU core.

    threads: OpenMP threads (None = all cores); block_q / block_k: queries / keys per cache block
    (None = sized for L2); isa: "auto" or force "avx512" / "avx2" / "generic" (for tests);
    sample_cols (by="query"/"key"): cols sampled to guess each row's threshold (None = automatic,
    0 = never; the guess only saves work, it never changes the answer).
    """
    return _run(request, threads, block_q, block_k, isa, sample_cols)


def answer_features(
    table_scores: torch.Tensor,
    table_queries: torch.Tensor,
    row_start: torch.Tensor,
    row_len: torch.Tensor,
    weights: torch.Tensor,
    features: torch.Tensor,
    k: int,
    n_queries: int,
    first_keys: int,
    out: TopK,
    grown: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
    threads: Optional[int] = None,
    row_sorted: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``engine.multi_topk``'s answer step in the C++ core: the listed features' top-k from a per-key table.

    The table (see ``csrc/multi.h``): rows 0..Nk-1 hold each key's queries by A descending, rows
    Nk..2Nk-1 by -A descending; row r is ``table_*[row_start[r] : row_start[r] + row_len[r]]``
    (float32 side scores, int32 queries). ``weights [Nk, G]``; ``features`` (int64) the columns to
    answer; rows ``features`` of ``out`` (``[G, k]`` each) are written. ``grown`` = (rows, their former
    lengths): the features resume from the top-k already in ``out`` and read only those rows' new
    entries (each row's former entries must be unchanged). ``row_sorted`` (int64, one per row): how
    many first entries of each row are sorted, the rest following unsorted (None: all). Returns (deeper, incomplete):
    uint8 flags of the table rows that must be read further, and of the features (positions in
    ``features``) whose answer depends on them and must be redone once they are.
    """
    deeper = torch.zeros(row_start.numel(), dtype=torch.uint8)
    incomplete = torch.zeros(features.numel(), dtype=torch.uint8)
    _C.multi_topk(
        table_scores, table_queries, row_start, row_len, weights, features, k, n_queries, first_keys,
        out.scores.view(-1), out.query_idx.view(-1), out.key_idx.view(-1), deeper, incomplete,
        grown=None if grown is None else grown[0], old_len=None if grown is None else grown[1],
        row_sorted=row_sorted, threads=_positive("threads", threads),
    )  # fmt: skip
    return deeper, incomplete
