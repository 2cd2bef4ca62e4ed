"""All-pairs top-k over query-key offsets, for rotary heads: ``offset_topk``.

A rotary head's score of a (query, key) pair depends on their offset δ. Queries and keys come in the
*canonical layout* ``[N, d]`` (:meth:`attnrules.circuit.rotary.Rotary.canonical`): with
p = ``cos.shape[1]`` frequency pairs, columns i and p + i (i < p) are pair i's coordinates (a, b),
columns ≥ 2p are not rotated. For the offset row o of the tables ``cos``, ``sin`` ``[n_off, p]``

    A_o(q, k) = Σ_i cos[o,i]·(q_a k_a + q_b k_b) + sin[o,i]·(q_a k_b − q_b k_a)  +  Σ_{j≥2p} q_j k_j,

and a pair's score is its best offset: max_o A_o(q, k)·w[k] (``score="signed"``, w = key_weight or
1) or max_o |A_o(q, k)·w[k]| (``"absolute"``); ``offset_idx`` is the lowest row reaching it.

Method: bound, rank, rescore — exact, and never Nq × Nk (let alone × n_off) at once.

The bound. Write C_i = q_a k_a + q_b k_b, S_i = q_a k_b − q_b k_a and r_i = |q_i||k_i| (norms of
the pair's 2-vectors), so that ‖(C_i, S_i)‖ = r_i. Pick for every pair a centre z_i = (c_i, s_i)
(any point) and let ε_i = max_o ‖(cos[o,i], sin[o,i]) − z_i‖ and ρ_i = max_o ‖(cos[o,i], sin[o,i])‖.
For every row o, by Cauchy–Schwarz on the 2-vectors,

    cos·C + sin·S = (c_i C + s_i S) + (cos − c_i, sin − s_i)·(C, S) ≤ (c_i C + s_i S) + ε_i r_i   (C-form)
    cos·C + sin·S ≤ ‖(cos, sin)‖ r_i ≤ ρ_i r_i                                                    (norm form)

The same holds for −A (replace (C, S) by (−C, −S); r is unchanged), so with a signed key weight w:
max_o A_o·w ≤ Σ_{C-form i} [w (c_i C_i + s_i S_i) + |w| ε_i r_i] + Σ_{norm-form i} |w| ρ_i r_i
+ w q_rest·k_rest = q̃·k̃, an inner product of

    q̃ = [c q_a − s q_b, c q_b + s q_a, ε |q_i|  (C-form pairs) | ρ |q_i|  (norm-form pairs) | q_rest]
    k̃ = [w k_a,          w k_b,         |w||k_i|               | |w||k_i|                    | w k_rest]

(c q_a − s q_b, c q_b + s q_a is the query rotated by z_i: its dot with (k_a, k_b) is c C + s S).
Any centre gives a valid bound; the tightest worst case is the centre of the smallest circle
enclosing the pair's table points (found by Bădoiu–Clarkson iterations: only tightness depends on
how well). For low frequencies the points lie on a short arc and ε_i ≪ ρ_i (nearly exact); a pair
whose ε_i is not below ρ_i takes the norm form (one column instead of three). The table may carry a
constant factor (ρ_i ≠ 1) or any magnitudes: nothing above assumes ‖(cos, sin)‖ = 1. ``score="absolute"``
is the better of two signed problems, with w and −w: their k̃ are stacked as 2·Nk keys and a pair
found through either is one candidate.

Ranking. The existing engine (:func:`pair_topk`, ``backend`` and options passed through) ranks q̃·k̃.
``by="global"``: a seed of a few·k best bounds is rescored exactly; its k-th best exact score τ0 is
a lower bound of the true k-th score. Every pair of the answer has bound ≥ its score ≥ τ0, so the
M best bounds hold the answer as soon as the M-th of them is below τ0 (the *certificate*) or M
covers every pair. M is estimated by counting bounds ≥ τ0 on a sample of query rows, and doubled
until the certificate holds. The M candidates are rescored exactly in float64, in bound order,
stopping once the next bound is below the running k-th exact score. ``by="query"`` / ``"key"``:
the same per row: each row's M best bounds are rescored, its k-th exact score is its τ0, and the
rows whose M-th bound is not below it are ranked again with 4 × M.

Precision. The engine computes bounds in the inputs' dtype (float32 on the C++ and Triton
backends); a certificate compares them with τ0 less a margin that covers their rounding
(γ_{D+4} ‖q̃‖‖k̃‖ with D = the columns of q̃, plus float64 rounding of the exact scores; TF32 options
widen it). Exact scores are float64 from float64 copies of the inputs, ranked in float64 (ties by
the lower (query, key) index, the lower offset row), and returned in the inputs' dtype. So the
answer is the float64 brute force's, except that pairs whose scores differ by float64 rounding
(~1e-15 relative) may swap.

Memory: the bound operands ([Nq + P·Nk, ≤ 3p + d − 2p] in the inputs' dtype), the engine's
candidates (M pairs) and float64 chunks of 32,768 pairs × n_off.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch

from attnrules.engine import merge
from attnrules.engine.contract import (
    By,
    TopK,
    _check_matrix,
    _check_request,
    _check_values,
    _max_norm,
    pair_topk,
)

OFFSET_SCORES = ("signed", "absolute")
_CHUNK = 1 << 15  # pairs rescored at once (× n_off float64 scores)
_SAMPLE_ROWS = 1024  # query rows whose solution estimates how many pairs the global ranking must take
_SEED = 4  # by='query' / 'key': each row first ranks _SEED × k pairs (× parts)
_CENTRE_ITERS = 200  # Bădoiu–Clarkson iterations for the table centres


@dataclass(frozen=True)
class OffsetTopK(TopK):
    """:class:`TopK` plus ``offset_idx`` (same shape, int64): the row of ``cos``/``sin`` at which each
    pair reaches its score (the lowest row among equal maxima)."""

    offset_idx: torch.Tensor

    def offset_pairs(self) -> list[tuple[int, int, int, float]]:
        """(query, key, offset row, score) in order, rows concatenated for per-row results."""
        return list(zip(self.query_idx.flatten().tolist(), self.key_idx.flatten().tolist(),
                        self.offset_idx.flatten().tolist(), self.scores.flatten().tolist()))  # fmt: skip


# ----------------------------------------------------------------------------------- the bound


def table_centres(cos: torch.Tensor, sin: torch.Tensor, iters: int = _CENTRE_ITERS):
    """(centre [p, 2], ε [p], ρ [p]) of each pair's table points (cos[o, i], sin[o, i]), float64.

    The centre approximates that of the smallest enclosing circle (Bădoiu–Clarkson in numpy, the
    best iterate kept); ε is the exact largest distance from it, ρ the largest norm. Any centre is valid.
    """
    pts = torch.stack([cos, sin], -1).transpose(0, 1).detach().cpu().double().numpy()  # [p, n_off, 2]
    rows = np.arange(pts.shape[0])
    z = pts.mean(1)
    best_z, best_r = z, np.sqrt(((pts - z[:, None]) ** 2).sum(-1)).max(1)
    for t in range(1, iters + 1):
        dist = np.sqrt(((pts - z[:, None]) ** 2).sum(-1))
        far = dist.argmax(1)
        r = dist[rows, far]
        better = r < best_r
        best_r = np.where(better, r, best_r)
        best_z = np.where(better[:, None], z, best_z)
        z = z + (pts[rows, far] - z) / (t + 1)
    eps = np.sqrt(((pts - best_z[:, None]) ** 2).sum(-1)).max(1)
    rho = np.sqrt((pts**2).sum(-1)).max(1)
    return tuple(torch.from_numpy(x).to(cos.device) for x in (best_z, eps, rho))


@dataclass
class _Problem:
    """A checked call with its bound operands and its exact rescoring.

    Rescoring uses the product form: with Qx = [q | q_a, q_b] and Kx = [k | k_b, k_a] (``[N, d + 2p]``),
    A_o(q, k) = ((Qx ⊙ Kx) @ T)[o] where T = [cosᵀ; cosᵀ; 1; sinᵀ; −sinᵀ] — one elementwise product
    and one matmul per chunk of pairs.
    """

    qx: torch.Tensor  # [Nq, d + 2p] float64
    kx: torch.Tensor  # [Nk, d + 2p] float64
    table: torch.Tensor  # [d + 2p, n_off] float64
    wd: Optional[torch.Tensor]  # [Nk] float64
    absolute: bool
    q_t: torch.Tensor  # [Nq, D] bound queries, inputs' dtype
    k_t: torch.Tensor  # [P·Nk, D] bound keys (P = 2 for absolute: w, then −w)
    q_norm: torch.Tensor  # [Nq] float64 ‖q̃‖
    k_norm: torch.Tensor  # [P·Nk] float64 ‖k̃‖
    gamma_bound: float  # relative rounding of a computed bound (× ‖q̃‖‖k̃‖)
    gamma_exact: float  # largest rounding of an exact (float64) score
    # float32 filter (None for float64 inputs): copies of qx, kx, table, and the per-pair error scale
    qx32: Optional[torch.Tensor] = None
    kx32: Optional[torch.Tensor] = None
    table32: Optional[torch.Tensor] = None
    q_scale: Optional[torch.Tensor] = None  # [Nq] float64: γ · 2 max(1, ρ) ‖q‖
    k_scale: Optional[torch.Tensor] = None  # [Nk] float64: ‖k‖ |w| (1 + 2u)

    @property
    def nq(self) -> int:
        return self.qx.shape[0]

    @property
    def nk(self) -> int:
        return self.kx.shape[0]

    @property
    def parts(self) -> int:
        return 2 if self.absolute else 1

    def margin(self, q_norm: torch.Tensor | float, k_norm: torch.Tensor | float) -> torch.Tensor | float:
        """How far below the true bound a computed one may lie, plus exact-score rounding."""
        return self.gamma_bound * q_norm * k_norm + self.gamma_exact

    def _scores(self, qx, kx, table, qi, ki) -> tuple[torch.Tensor, torch.Tensor]:
        x = qx[qi]
        x.mul_(kx[ki])
        a = x @ table
        if self.wd is not None:
            a.mul_(self.wd[ki].to(a.dtype)[:, None])
        if self.absolute:
            a.abs_()
        best = a.max(1)  # first maximal index: the lowest offset row
        return best.values, best.indices

    @torch.no_grad()
    def exact(self, qi: torch.Tensor, ki: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(float64 score, offset row) of the pairs (qi, ki), in chunks."""
        scores = torch.empty(qi.numel(), dtype=torch.float64, device=qi.device)
        offs = torch.empty(qi.numel(), dtype=torch.int64, device=qi.device)
        for c0 in range(0, qi.numel(), _CHUNK):
            c = slice(c0, min(c0 + _CHUNK, qi.numel()))
            scores[c], offs[c] = self._scores(self.qx, self.kx, self.table, qi[c], ki[c])
        return scores, offs

    @torch.no_grad()
    def above(self, qi: torch.Tensor, ki: torch.Tensor, tau: float, k: Optional[int] = None
              ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """(positions, float64 scores) of the pairs whose exact score may be ≥ tau, or (given k, for
        distinct pairs) may be among the k best of them.

        Float32 scores first (when the inputs are float32): |score32 − score64| ≤ γ_{d+2p+6} ·
        2 max(1, ρ) ‖q‖‖k‖|w| (every product of the sum is bounded so), so a pair whose float32
        score is below tau by more than that is below tau exactly; the others are rescored in float64.
        """
        if self.qx32 is not None and (math.isfinite(tau) or (k is not None and qi.numel() >= k)):
            s32, _ = self._scores(self.qx32, self.kx32, self.table32, qi, ki)
            s32 = s32.double()
            err = self.q_scale[qi] * self.k_scale[ki]
            if k is not None and qi.numel() >= k:  # distinct pairs: their k-th exact score ≥ k-th float32 − err
                tau = max(tau, float(torch.topk(s32, k).values[-1] - err.max()))
            pos = torch.nonzero(s32 + err >= tau).flatten()
        else:
            pos = torch.arange(qi.numel(), device=qi.device)
        s, _ = self.exact(qi[pos], ki[pos])
        return pos, s


def _build(queries, keys, key_weight, cos, sin, score, options) -> _Problem:
    dtype, device = queries.dtype, queries.device
    qd, kd = queries.double(), keys.double()
    wd = None if key_weight is None else key_weight.double()
    cos, sin = cos.to(device=device, dtype=torch.float64), sin.to(device=device, dtype=torch.float64)
    n_off, p = cos.shape
    d = qd.shape[1]
    centre, eps, rho = table_centres(cos, sin)
    cform = eps < rho
    c0, s0 = centre[cform, 0], centre[cform, 1]
    qa, qb, ka, kb = qd[:, :p], qd[:, p:2 * p], kd[:, :p], kd[:, p:2 * p]
    qn, kn = torch.hypot(qa, qb), torch.hypot(ka, kb)
    q_t = torch.cat([c0 * qa[:, cform] - s0 * qb[:, cform], c0 * qb[:, cform] + s0 * qa[:, cform],
                     eps[cform] * qn[:, cform], rho[~cform] * qn[:, ~cform], qd[:, 2 * p:]], 1)  # fmt: skip
    w = torch.ones(kd.shape[0], dtype=torch.float64, device=device) if wd is None else wd
    aw = w.abs()[:, None]
    k_t = torch.cat([w[:, None] * ka[:, cform], w[:, None] * kb[:, cform], aw * kn[:, cform], aw * kn[:, ~cform],
                     w[:, None] * kd[:, 2 * p:]], 1)  # fmt: skip
    if score == "absolute":  # the problem with −w: the signed columns flip
        n_c = int(cform.sum())
        sign = torch.ones(k_t.shape[1], dtype=torch.float64, device=device)
        sign[: 2 * n_c] = -1
        sign[3 * n_c + (p - n_c):] = -1
        k_t = torch.cat([k_t, k_t * sign])
    n_cols = q_t.shape[1]
    unit = 2.0**-24 if dtype == torch.float32 else 2.0**-53
    precision = options.get("precision")
    if dtype == torch.float32 and precision == "tf32":
        unit = 2.0**-10
    elif dtype == torch.float32 and precision == "tf32x3":
        unit = 2.0**-20
    # A computed dot product of D terms after both operands were rounded to dtype errs by at most
    # γ_{D+2} ‖q̃‖‖k̃‖ (γ_n = n u / (1 − n u)); doubled for safety.
    gamma_bound = 2.0 * (n_cols + 4) * unit
    # Every term of the product form is bounded by max(1, ρ) times a term of 2 ‖q‖‖k‖ |w|:
    # Σ_i (|q_a|+|q_b|)(|k_a|+|k_b|) ≤ 2 Σ_i |q_i||k_i|, and |cos|, |sin| ≤ ρ.
    big = 2.0 * max(1.0, float(rho.max()))
    w_abs = torch.ones_like(w) if wd is None else wd.abs()
    q_len, k_len = torch.linalg.vector_norm(qd, dim=1), torch.linalg.vector_norm(kd, dim=1) * w_abs
    n_terms = d + 2 * p + 6
    gamma_exact = 2.0 * n_terms * 2.0**-53 * big * float(q_len.max()) * float(k_len.max())
    swap = torch.cat([torch.arange(p, 2 * p), torch.arange(p)]).to(device)
    qx = torch.cat([qd, qd[:, : 2 * p]], 1).contiguous()
    kx = torch.cat([kd, kd[:, swap]], 1).contiguous()
    table = torch.cat([cos.T, cos.T, torch.ones(d - 2 * p, n_off, dtype=torch.float64, device=device),
                       sin.T, -sin.T]).contiguous()  # fmt: skip
    problem = _Problem(qx, kx, table, wd, score == "absolute", q_t.to(dtype).contiguous(), k_t.to(dtype).contiguous(),
                       torch.linalg.vector_norm(q_t, dim=1), torch.linalg.vector_norm(k_t, dim=1),
                       gamma_bound, gamma_exact)  # fmt: skip
    if dtype == torch.float32 and bool(q_len.max() * k_len.max() * big < 1e30):
        u32 = 2.0**-24
        problem.qx32, problem.kx32, problem.table32 = qx.float(), kx.float(), table.float()
        gamma32 = 2.0 * (n_terms + 2) * u32  # inputs exact in float32; the table and w rounded once
        problem.q_scale = gamma32 * big * q_len
        problem.k_scale = k_len * (1 + 4 * u32)
    return problem


# ------------------------------------------------------------------------------------ checks


def _check_tables(cos: object, sin: object, d: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    cos = _check_matrix("cos", cos)
    sin = _check_matrix("sin", sin)
    if tuple(sin.shape) != tuple(cos.shape):
        raise ValueError(
            f"cos and sin must have the same shape [n_offsets, p], got cos {tuple(cos.shape)} and sin {tuple(sin.shape)}"
        )
    p = cos.shape[1]
    if 2 * p > d:
        raise ValueError(
            f"cos/sin have p={p} frequency pairs, which need 2p={2 * p} columns, but queries and keys have d={d}"
        )
    for name, x in (("cos", cos), ("sin", sin)):
        _check_values(name, x)
    return cos, sin


@torch.no_grad()
def _check_nan(problem: _Problem) -> None:
    """A NaN score (float64 overflow: inf × 0 or inf − inf) is a ValueError naming the first pair.

    Every term of a score is bounded by max(1, ρ)·‖q‖‖k‖|w| (see :func:`_build`), so below
    finfo.max / 1024 nothing overflows and the scan is skipped (always, for float32 inputs).
    """
    bound = 2.0 * max(1.0, float(problem.table.abs().max())) * problem.table.shape[0]
    bound *= _max_norm(problem.qx) * _max_norm(problem.kx)
    if problem.wd is not None:
        bound *= float(problem.wd.abs().max())
    if bound <= torch.finfo(torch.float64).max / 1024:
        return
    nk = problem.nk
    all_k = torch.arange(nk, device=problem.qx.device)
    for q0 in range(problem.nq):
        s, _ = problem.exact(torch.full((nk,), q0, device=all_k.device), all_k)
        if bool(torch.isnan(s).any()):
            j = int(torch.nonzero(torch.isnan(s))[0])
            raise ValueError(
                f"offset_topk(score={'absolute' if problem.absolute else 'signed'!r}): the score of pair "
                f"(query {q0}, key {j}) is NaN in float64 (an offset's A overflows to inf"
                + (f", times key_weight[{j}] = {float(problem.wd[j]):g}" if problem.wd is not None else "")
                + "). NaN scores cannot be ranked: rescale the inputs so that no product overflows"
            )


# ----------------------------------------------------------------------------------- ranking


def _dedupe(ids: torch.Tensor, *rest: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Candidates with distinct ids (one of each run of equal ids kept; they carry equal values)."""
    order = torch.argsort(ids)
    ids = ids[order]
    keep = torch.ones_like(ids, dtype=torch.bool)
    keep[1:] = ids[1:] != ids[:-1]
    return (ids[keep], *(x[order][keep] for x in rest))


class _Best:
    """The running k best distinct pairs (flat ids q·Nk + k) by exact float64 score."""

    def __init__(self, k: int, device: torch.device):
        self.k = k
        self.scores = torch.empty(0, dtype=torch.float64, device=device)
        self.ids = torch.empty(0, dtype=torch.int64, device=device)

    @property
    def tau(self) -> float:
        """The k-th best exact score so far (−inf until k distinct pairs were seen)."""
        return float(self.scores[-1]) if self.scores.numel() >= self.k else -math.inf

    def add(self, ids: torch.Tensor, scores: torch.Tensor) -> None:
        if ids.numel():
            ids, scores = _dedupe(torch.cat([self.ids, ids]), torch.cat([self.scores, scores]))
            self.scores, self.ids = merge.top_flat(scores, ids, self.k)


def _rescore(problem: _Problem, ranked: TopK, rows: Optional[torch.Tensor], best: _Best, margin: float) -> bool:
    """Rescore ranked pairs in bound order into ``best``; True if it stopped at a bound below τ.
    ``rows``: the query rows the ranking ran on (None: all)."""
    nk = problem.nk
    m = ranked.scores.numel()
    for c0 in range(0, m, _CHUNK):
        if float(ranked.scores[c0]) < best.tau - margin:
            return True
        c = slice(c0, min(c0 + _CHUNK, m))
        qi, ki = ranked.query_idx[c], ranked.key_idx[c] % nk
        if rows is not None:
            qi = rows[qi]
        if problem.absolute:  # a pair may come through both parts: once is enough
            _, qi, ki = _dedupe(qi * nk + ki, qi, ki)
        pos, s = problem.above(qi, ki, best.tau, best.k)
        best.add(qi[pos] * nk + ki[pos], s)
    return False


def _collect(problem: _Problem, rows: Optional[torch.Tensor], k: int, m: int, margin: float, grow: int,
             backend: str, options: dict[str, Any]) -> tuple[_Best, TopK]:  # fmt: skip
    """The exact k best pairs of the query ``rows`` (None: all): rank the m best bounds, rescore them,
    and multiply m by ``grow`` until the certificate holds; also returns the last ranking."""
    n_rows = problem.nq if rows is None else rows.numel()
    total = n_rows * problem.nk * problem.parts
    q_t = problem.q_t if rows is None else problem.q_t[rows]
    m = min(total, m)
    best = _Best(k, q_t.device)  # kept across rounds: its τ only rises, so a round rescores less
    while True:
        ranked = pair_topk(q_t, problem.k_t, m, backend=backend, **options)
        stopped = _rescore(problem, ranked, rows, best, margin)
        # Certificate: every pair left out has bound ≤ the m-th < τ (≤ the true k-th score) − margin.
        if stopped or m == total or float(ranked.scores[-1]) < best.tau - margin:
            return best, ranked
        m = min(total, grow * m)


def _global(problem: _Problem, k: int, backend: str, options: dict[str, Any]):
    nq, nk, parts = problem.nq, problem.nk, problem.parts
    margin = problem.margin(float(problem.q_norm.max()), float(problem.k_norm.max()))
    # How many bounds to rank: solve the problem on a strided sample of R query rows for its
    # 1.25·k·R/Nq best pairs (a little more than its share, so that their k-th score rather lies
    # below the true k-th score), count the sample's bounds that reach that score, scale by Nq/R.
    # An estimate: only speed depends on it.
    m = 2 * k * parts
    n_sample = min(_SAMPLE_ROWS, nq // 8)
    if n_sample >= 16:
        rows = torch.arange(0, nq, -(-nq // n_sample), device=problem.q_t.device)
        k_s = min(rows.numel() * nk, math.ceil(1.25 * k * rows.numel() / nq) + 8)
        sample, ranked = _collect(problem, rows, k_s, 64 * k_s * parts, margin, 4, backend, options)
        hits = int((ranked.scores.double() >= sample.tau - margin).sum())
        est = hits * nq / rows.numel()
        m = max(m, int(1.15 * est + 3 * math.sqrt(est)) + k * parts)
    best, _ = _collect(problem, None, k, m, margin, 2, backend, options)
    qi, ki = best.ids // nk, best.ids % nk
    _, offs = problem.exact(qi, ki)  # the winners' offset rows
    return best.scores, qi, ki, offs


def _per_row(problem: _Problem, k: int, by: str, backend: str, options: dict[str, Any]):
    """by='query' (rows = queries, columns = keys) or 'key' (rows = keys, columns = queries)."""
    nq, nk, parts = problem.nq, problem.nk, problem.parts
    device = problem.q_t.device
    per_key = by == "key"
    n_rows = nk if per_key else nq
    n_cols = nq if per_key else nk * parts  # columns of one engine row
    k_max = float(problem.k_norm.max())
    q_max = float(problem.q_norm.max())
    m = min(n_cols, max(_SEED * k, k * parts))
    out_s = torch.empty(n_rows, k, dtype=torch.float64, device=device)
    out_c = torch.empty(n_rows, k, dtype=torch.int64, device=device)
    out_o = torch.empty(n_rows, k, dtype=torch.int64, device=device)
    todo = torch.arange(n_rows, device=device)
    while todo.numel():
        if per_key:  # engine rows: each key once per part
            k_rows = torch.cat([todo + part * nk for part in range(parts)])
            res = pair_topk(problem.q_t, problem.k_t[k_rows], m, by="key", backend=backend, **options)
            cols = res.query_idx.reshape(parts, todo.numel(), m).permute(1, 0, 2).reshape(todo.numel(), parts * m)
            bounds = res.scores.reshape(parts, todo.numel(), m)[:, :, -1].max(0).values
            margin = problem.margin(q_max, problem.k_norm[k_rows].reshape(parts, -1).max(0).values)
            qi, ki = cols, todo[:, None].expand_as(cols)
        else:
            res = pair_topk(problem.q_t[todo], problem.k_t, m, by="query", backend=backend, **options)
            cols = res.key_idx % nk
            bounds = res.scores[:, -1]
            margin = problem.margin(problem.q_norm[todo], k_max)
            qi, ki = todo[:, None].expand_as(cols), cols
        s, o = problem.exact(qi.reshape(-1), ki.reshape(-1))
        s, o = s.reshape(cols.shape), o.reshape(cols.shape)
        # Duplicates (a pair found through both parts) are dropped; then each row's k best, ties by
        # the lower column; the column code also carries the position to find the offset row.
        sorted_cols, order = torch.sort(cols, dim=1, stable=True)
        valid = torch.ones_like(sorted_cols, dtype=torch.bool)
        valid[:, 1:] = sorted_cols[:, 1:] != sorted_cols[:, :-1]
        width = cols.shape[1]
        code = sorted_cols * width + torch.arange(width, device=device)[None, :]
        top_s, top_code = merge.top_per_row(torch.gather(s, 1, order), code, k, valid=valid, ties_in_order=True)
        pos = torch.gather(order, 1, top_code % width)
        done = bounds.to(torch.float64) < top_s[:, -1] - margin
        if m == n_cols:  # every column taken
            done = torch.ones_like(done)
        rows = todo[done]
        out_s[rows], out_c[rows], out_o[rows] = top_s[done], (top_code // width)[done], torch.gather(o, 1, pos)[done]
        todo = todo[~done]
        m = min(n_cols, 4 * m)
    fixed = torch.arange(n_rows, device=device)[:, None].expand(n_rows, k).clone()
    return (out_s, out_c, fixed, out_o) if per_key else (out_s, fixed, out_c, out_o)


# ------------------------------------------------------------------------------------ public


def offset_topk(
    queries: torch.Tensor,
    keys: torch.Tensor,
    k: int,
    *,
    cos: torch.Tensor,
    sin: torch.Tensor,
    by: By = "global",
    key_weight: Optional[torch.Tensor] = None,
    score: str = "signed",
    backend: str = "auto",
    **options,
) -> OffsetTopK:
    """The k best (query, key) pairs by their best offset, with the offset row that achieves it.

    queries ``[Nq, d]``, keys ``[Nk, d]`` in the canonical layout (pair i's coordinates in columns i
    and p + i, unrotated columns from 2p), ``cos``/``sin`` ``[n_off, p]`` (2p ≤ d), key_weight
    ``[Nk]`` (ones when None). score(q, k) = max_o A_o(q, k)·w[k] (``"signed"``) or
    max_o |A_o(q, k)·w[k]| (``"absolute"``). ``by``, the result's shapes, order and ties are
    :func:`pair_topk`'s; ``offset_idx`` is the lowest offset row among equal maxima. ``backend``
    and ``options`` go to the :func:`pair_topk` calls that rank the bounds (see the module docstring
    for the method); the answer does not depend on them.
    """
    if score not in OFFSET_SCORES:
        raise ValueError(f"score must be one of {OFFSET_SCORES} for offset_topk, got {score!r}")
    request = _check_request(queries, keys, k, by, score, key_weight, None, None)
    cos, sin = _check_tables(cos, sin, request.queries.shape[1], request.queries.device)
    with torch.no_grad():
        problem = _build(request.queries, request.keys, request.key_weight, cos, sin, score, options)
        _check_nan(problem)
        if by == "global":
            s, qi, ki, offs = _global(problem, request.k, backend, options)
        else:
            s, qi, ki, offs = _per_row(problem, request.k, by, backend, options)
    return OffsetTopK(s.to(request.queries.dtype), qi, ki, by, offs)
