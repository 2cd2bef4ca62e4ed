"""The torch reference backend against the float64 oracle, every mode, awkward shapes."""
import pytest
import torch

from attnrules import engine
from topk_oracle import assert_exact, assert_matches, random_inputs, score_matrix, tolerance

SHAPES = [(1, 1, 3), (7, 5, 4), (37, 53, 16), (130, 70, 64)]
MODES = ["signed", "absolute", "exp"]


def _ks(nq, nk, by):
    n = {"global": nq * nk, "query": nk, "key": nq}[by]
    return sorted({1, min(5, n), n})


@pytest.mark.parametrize("nq,nk,d", SHAPES)
@pytest.mark.parametrize("by", engine.BY_CHOICES)
@pytest.mark.parametrize("score", MODES)
@pytest.mark.parametrize("weighted", [False, True])
def test_pair_topk_float32_matches_float64(nq, nk, d, by, score, weighted):
    q, k, w, _, _ = random_inputs(nq, nk, d, seed=nq + nk)
    if score == "exp":  # keep exp() in range as REF's scores are (A is ~0.1 there)
        q, k = q / d, k / d
    w = w if weighted else None
    s = score_matrix(q, k, key_weight=w, score=score)
    for kk in _ks(nq, nk, by):
        res = engine.pair_topk(q, k, kk, by=by, key_weight=w, score=score, backend="torch", block_q=16, block_k=32)
        assert_matches(res, s, kk, by, tol=tolerance(s, d))


@pytest.mark.parametrize("nq,nk,d", SHAPES)
@pytest.mark.parametrize("by", engine.BY_CHOICES)
@pytest.mark.parametrize("score", ["signed", "absolute"])
def test_dual_topk_float32_matches_float64(nq, nk, d, by, score):
    q, k, _, qa, ka = random_inputs(nq, nk, d, n_ex=9, seed=3)
    s = score_matrix(q, k, score=score, query_acts=qa, key_acts=ka)
    for kk in _ks(nq, nk, by):
        res = engine.dual_topk(q, k, qa, ka, kk, by=by, score=score, backend="torch", block_q=16, block_k=8)
        assert_matches(res, s, kk, by, tol=tolerance(s, d) * 10)


@pytest.mark.parametrize("by", engine.BY_CHOICES)
def test_ties_broken_by_lower_index_in_float64(by):
    # Integer-valued inputs make many exactly equal scores: the order must be the oracle's exactly.
    g = torch.Generator().manual_seed(1)
    q = torch.randint(-2, 3, (23, 3), generator=g).double()
    k = torch.randint(-2, 3, (19, 3), generator=g).double()
    w = torch.randint(-1, 2, (19,), generator=g).double()
    s = score_matrix(q, k, key_weight=w)
    for kk in _ks(23, 19, by) + [11]:
        res = engine.pair_topk(q, k, min(kk, {"global": 437, "query": 19, "key": 23}[by]), by=by,
                               key_weight=w, backend="torch", block_q=4, block_k=6)
        assert_exact(res, s, res.scores.shape[-1], by)


def test_block_size_does_not_change_the_answer():
    q, k, w, _, _ = random_inputs(50, 40, 8, seed=5, dtype=torch.float64)
    ref = engine.pair_topk(q, k, 30, key_weight=w, backend="torch", block_q=1000, block_k=1000)
    for bq, bk in [(1, 1), (3, 7), (50, 1), (16, 16)]:
        res = engine.pair_topk(q, k, 30, key_weight=w, backend="torch", block_q=bq, block_k=bk)
        assert torch.equal(res.query_idx, ref.query_idx) and torch.equal(res.key_idx, ref.key_idx)
