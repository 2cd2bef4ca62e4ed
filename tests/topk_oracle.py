"""Independent float64 oracle for the engine: materialise the full score matrix and sort it.

Shared by the tests of every backend. Deliberately the dumbest correct thing: numpy, float64,
a lexicographic sort over all Nq × Nk pairs.
"""
from __future__ import annotations

import numpy as np
import torch


def score_matrix(queries, keys, *, key_weight=None, score="signed", query_acts=None, key_acts=None) -> np.ndarray:
    """The full [Nq, Nk] matrix of scores in float64."""
    q = queries.detach().cpu().double().numpy()
    k = keys.detach().cpu().double().numpy()
    a = q @ k.T
    if query_acts is not None:
        s = a * (query_acts.detach().cpu().double().numpy() @ key_acts.detach().cpu().double().numpy().T)
    elif score == "exp":
        s = np.exp(a)
        if key_weight is not None:
            s = s * key_weight.detach().cpu().double().numpy()[None, :]
    else:
        s = a if key_weight is None else a * key_weight.detach().cpu().double().numpy()[None, :]
    return np.abs(s) if score == "absolute" else s


def expected_topk(s: np.ndarray, k: int, by: str):
    """(scores, query_idx, key_idx) best first, ties by lower (query, key) index."""
    nq, nk = s.shape
    if by == "global":
        flat = s.ravel()
        order = np.lexsort((np.arange(flat.size), -flat))[:k]
        return flat[order], order // nk, order % nk
    rows = s if by == "query" else s.T
    order = np.stack([np.lexsort((np.arange(r.size), -r))[:k] for r in rows])
    scores = np.take_along_axis(rows, order, 1)
    fixed = np.broadcast_to(np.arange(rows.shape[0])[:, None], order.shape)
    return (scores, fixed, order) if by == "query" else (scores, order, fixed)


def assert_matches(result, s: np.ndarray, k: int, by: str, *, tol: float) -> None:
    """The result is the top-k of ``s`` up to pairs whose scores lie within ``tol`` of the boundary.

    - every returned score equals the oracle's score of that pair (within tol);
    - scores are sorted best first (within tol);
    - every pair the oracle ranks clearly above the k-th score (by more than tol) is returned, and
      nothing returned lies clearly below it.
    """
    got_s = result.scores.detach().cpu().double().numpy()
    got_q = result.query_idx.detach().cpu().numpy()
    got_k = result.key_idx.detach().cpu().numpy()
    exp_s, _, _ = expected_topk(s, k, by)
    assert got_s.shape == exp_s.shape, (got_s.shape, exp_s.shape)
    np.testing.assert_allclose(got_s, s[got_q, got_k], rtol=0, atol=tol)
    assert np.all(np.diff(got_s, axis=-1) <= tol), "scores are not sorted best first"
    if by == "global":
        rows_got = [set(zip(got_q.tolist(), got_k.tolist()))]
        rows_s, kth = [s.ravel()], [exp_s[-1]]
        idx_of = [lambda i: (i // s.shape[1], i % s.shape[1])]
    else:
        mat = s if by == "query" else s.T
        other = got_k if by == "query" else got_q
        rows_got = [set(r.tolist()) for r in other]
        rows_s, kth = list(mat), list(exp_s[:, -1])
        idx_of = [lambda i: i] * len(rows_s)
    for got, row, t, idx in zip(rows_got, rows_s, kth, idx_of if by == "global" else idx_of):
        assert len(got) == k, "duplicate pairs returned"
        must = {idx(i) for i in np.nonzero(row > t + tol)[0]}
        assert must <= got, f"missing pairs clearly in the top-k: {sorted(must - got)[:5]}"
        for p in got:
            value = row[p[0] * s.shape[1] + p[1]] if by == "global" else row[p]
            assert value >= t - tol, f"pair {p} with score {value} is clearly below the k-th score {t}"


def assert_exact(result, s: np.ndarray, k: int, by: str) -> None:
    """Exactly the oracle's answer, order and ties included (for inputs without rounding doubt)."""
    exp_s, exp_q, exp_k = expected_topk(s, k, by)
    np.testing.assert_array_equal(result.query_idx.cpu().numpy(), exp_q)
    np.testing.assert_array_equal(result.key_idx.cpu().numpy(), exp_k)
    np.testing.assert_allclose(result.scores.cpu().double().numpy(), exp_s, rtol=1e-12, atol=1e-12)


def random_inputs(nq: int, nk: int, d: int, *, n_ex: int = 0, seed: int = 0, dtype=torch.float32):
    """Random queries, keys, key weights and (if n_ex) exemplar activations."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(nq, d, generator=g, dtype=dtype)
    k = torch.randn(nk, d, generator=g, dtype=dtype)
    w = torch.randn(nk, generator=g, dtype=dtype)
    qa = torch.rand(nq, n_ex, generator=g, dtype=dtype) if n_ex else None
    ka = torch.randn(nk, n_ex, generator=g, dtype=dtype) if n_ex else None
    return q, k, w, qa, ka


def tolerance(s: np.ndarray, d: int) -> float:
    """Float32 rounding bound for scores built from d-term dot products."""
    return 1e-5 * max(1.0, float(np.abs(s).max())) * max(1.0, d ** 0.5)
