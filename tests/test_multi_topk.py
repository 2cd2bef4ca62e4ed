"""engine.multi_topk: every output feature of a head ranked at once, held to the single-feature
ranking (pair_topk per feature) and to the float64 oracle."""
from __future__ import annotations

import pytest
import torch

from attnrules import engine
from attnrules.engine import cpu_backend, features
from topk_oracle import assert_exact, assert_matches, score_matrix, tolerance

BACKENDS = ["torch"] + (["cpu"] if "cpu" in engine.available_backends() else [])


def _inputs(nq, nk, d, g, *, seed=0, integer=False, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    if integer:  # exact in float32: no rounding doubt, many ties
        q = torch.randint(-3, 4, (nq, d), generator=gen).to(dtype)
        k = torch.randint(-3, 4, (nk, d), generator=gen).to(dtype)
        w = torch.randint(-2, 3, (nk, g), generator=gen).to(dtype)
    else:
        q, k = torch.randn(nq, d, generator=gen, dtype=dtype), torch.randn(nk, d, generator=gen, dtype=dtype)
        w = torch.randn(nk, g, generator=gen, dtype=dtype)
    return q, k, w


def _check(result, q, k, w, kk, backend, *, exact):
    g = w.shape[1]
    assert result.scores.shape == result.query_idx.shape == result.key_idx.shape == (g, kk)
    for j in range(g):
        wj = w[:, j].contiguous()
        single = engine.pair_topk(q, k, kk, key_weight=wj, backend=backend)
        row = engine.TopK(result.scores[j], result.query_idx[j], result.key_idx[j], "global")
        s = score_matrix(q, k, key_weight=wj)
        if exact:
            assert_exact(row, s, kk, "global")
        else:
            assert_matches(row, s, kk, "global", tol=tolerance(s, q.shape[1]))
        if backend == "cpu" or exact:  # the same float products: the same answer, bit for bit
            assert torch.equal(row.query_idx, single.query_idx) and torch.equal(row.key_idx, single.key_idx)
            assert torch.equal(row.scores, single.scores)
        else:  # torch: matmul rounding may differ with the tile shapes, pairs may not
            torch.testing.assert_close(row.scores, single.scores, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("nq,nk,d,g,kk,depth", [
    (37, 29, 5, 4, 1, None),
    (130, 70, 9, 5, 200, None),
    (130, 70, 9, 5, 200, 3),      # shallow table: many keys read deeper
    (61, 45, 7, 3, 61 * 45, None),  # k = all pairs
    (61, 45, 7, 3, 2000, 1),
])  # fmt: skip
def test_random_matches_single_feature_and_oracle(backend, nq, nk, d, g, kk, depth):
    q, k, w = _inputs(nq, nk, d, g, seed=nq + kk)
    w[::5, 0] = 0  # zero weights: score 0 for every query
    _check(engine.multi_topk(q, k, w, kk, table_depth=depth, backend=backend), q, k, w, kk, backend, exact=False)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kk,depth", [(5, None), (300, 2), (900, 4), (50 * 40, None)])
def test_ties_exact(backend, kk, depth):
    """Integer inputs, duplicated queries and keys, zero weights: order and ties exactly the oracle's."""
    q, k, w = _inputs(50, 40, 6, 6, seed=kk, integer=True)
    q[10:20] = q[0]  # duplicated rows: equal A
    k[5:9] = k[1]
    w[:, 3] = 0  # a feature with all-zero weights: every pair scores 0, order by index
    w[::3, 4] = 0
    w[:, 5] = 1  # equal weights
    _check(engine.multi_topk(q, k, w, kk, table_depth=depth, backend=backend), q, k, w, kk, backend, exact=True)


@pytest.mark.parametrize("batch", [1, 2, 7])
def test_batches_and_float64(batch):
    q, k, w = _inputs(40, 33, 4, 5, seed=3, dtype=torch.float64)
    result = engine.multi_topk(q, k, w, 150, table_depth=4, batch=batch, backend="torch")
    for j in range(5):
        assert_exact(engine.TopK(result.scores[j], result.query_idx[j], result.key_idx[j], "global"),
                     score_matrix(q, k, key_weight=w[:, j]), 150, "global")


def test_auto_and_numpy():
    q, k, w = _inputs(40, 30, 8, 3, seed=5)
    auto = engine.multi_topk(q.numpy(), k.numpy(), w.numpy(), 77)
    ref = engine.multi_topk(q, k, w, 77, backend="torch")
    assert torch.equal(auto.query_idx, ref.query_idx) and torch.equal(auto.key_idx, ref.key_idx)


def test_overflow_falls_back_to_pair_topk_and_its_nan_policy():
    q, k, w = _inputs(6, 5, 3, 2, seed=1)
    q[0] = 1e20
    k[1] = 1e20
    w[1, 1] = 0  # inf × 0 for feature 1
    with pytest.raises(ValueError, match="NaN"):
        engine.multi_topk(q, k, w, 3, backend="torch")


def test_argument_errors():
    q, k, w = _inputs(10, 8, 4, 3)
    with pytest.raises(ValueError, match=r"key_weights must have shape \[8, G\]"):
        engine.multi_topk(q, k, w[:5], 3)
    with pytest.raises(ValueError, match=r"key_weights must have shape"):
        engine.multi_topk(q, k, w[:, 0], 3)
    with pytest.raises(TypeError, match="dtype"):
        engine.multi_topk(q, k, w.double(), 3)
    with pytest.raises(ValueError, match="NaN or infinite"):
        engine.multi_topk(q, k, w.clone().fill_(float("nan")), 3)
    with pytest.raises(ValueError, match="larger than the number of candidates"):
        engine.multi_topk(q, k, w, 81)
    with pytest.raises(ValueError, match="table_depth"):
        engine.multi_topk(q, k, w, 3, table_depth=0)
    assert features.multi_topk is engine.multi_topk


def _circuit(n_in=45, d_model=10, d_head=4, n_out=6, seed=0):
    from attnrules.circuit import HeadCircuit

    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g) / s[0] ** 0.5  # noqa: E731
    return HeadCircuit.from_tensors(r(n_in, d_model), r(d_model, d_head), r(d_model, d_head), r(d_model, d_head),
                                    r(d_head, n_out), r(n_out), layer=1, head=2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rank_all_pairs_many_equals_rank_all_pairs(backend):
    from attnrules.scoring import rank_all_pairs, rank_all_pairs_many

    circuit = _circuit()
    tables = rank_all_pairs_many(circuit, [4, 0, 2], 70, backend=backend)
    assert [t.feature for t in tables] == [4, 0, 2]
    for t in tables:
        one = rank_all_pairs(circuit, t.feature, 70, backend=backend)
        assert t.feature_name == one.feature_name
        assert torch.equal(t.queries, one.queries) and torch.equal(t.keys, one.keys)
        for name in ("score", "attn_score", "value_score"):
            assert torch.equal(getattr(t, name), getattr(one, name)), (backend, name)
    assert len(rank_all_pairs_many(circuit, None, 3, backend=backend)) == circuit.n_outputs


def test_rank_all_pairs_many_refuses_rotary_heads():
    import copy

    from attnrules.scoring import rank_all_pairs_many

    circuit = copy.copy(_circuit())
    object.__setattr__(circuit, "rotary", object())  # only the check is exercised
    with pytest.raises(ValueError, match="use rank_all_pairs per feature"):
        rank_all_pairs_many(circuit, [0], 5)


# --- the C++ core's answer (float32 CPU, backend "cpu" / "auto"): bit for bit pair_topk per feature ---

NATIVE = pytest.mark.skipif("cpu" not in BACKENDS or not cpu_backend.answers_features(),
                            reason="attnrules._C without the many-feature answer")


def _same_as_single(result, q, k, w, kk):
    for j in range(w.shape[1]):
        one = engine.pair_topk(q, k, kk, key_weight=w[:, j].contiguous(), backend="cpu")
        assert torch.equal(result.scores[j], one.scores), j
        assert torch.equal(result.query_idx[j], one.query_idx) and torch.equal(result.key_idx[j], one.key_idx), j


@NATIVE
@pytest.mark.parametrize("nq,nk,d,g,kk,depth", [
    (300, 200, 16, 20, 500, None),
    (300, 200, 16, 20, 500, 1),      # depth 1: nearly every key read deeper, over several rounds
    (300, 200, 16, 20, 300 * 200, 2),  # k = every pair
    (1, 50, 4, 3, 7, None),          # one query
    (50, 1, 4, 3, 7, None),          # one key
    (2000, 150, 64, 70, 3000, 8),    # more features than one block of the core
])  # fmt: skip
def test_native_random_equals_single_feature(nq, nk, d, g, kk, depth, monkeypatch):
    q, k, w = _inputs(nq, nk, d, g, seed=nq + kk)
    w[::7, 0] = 0   # zero-weight keys
    w[:, 1] = -w[:, 1].abs()  # every weight negative: only the lowest-A side is read
    calls = []
    answer = cpu_backend.answer_features
    monkeypatch.setattr(cpu_backend, "answer_features", lambda *a, **o: calls.append(a[5].numel()) or answer(*a, **o))
    result = engine.multi_topk(q, k, w, kk, table_depth=depth, backend="cpu")
    assert calls and calls[0] == g, "the core answered"
    if depth is not None and depth < nq and kk < nq * nk:
        assert len(calls) > 1, "some rows ran out and were read deeper"
    _same_as_single(result, q, k, w, kk)
    for j in (0, 1):  # and the float64 oracle
        s = score_matrix(q, k, key_weight=w[:, j])
        assert_matches(engine.TopK(result.scores[j], result.query_idx[j], result.key_idx[j], "global"), s, kk,
                       "global", tol=tolerance(s, d))


@NATIVE
@pytest.mark.parametrize("kk,depth", [(5, None), (300, 1), (900, 3), (50 * 40, None)])
def test_native_ties_exact(kk, depth):
    """Integer inputs: equal scores everywhere, ordered by the lower (query, key) exactly as the oracle."""
    q, k, w = _inputs(50, 40, 6, 7, seed=kk, integer=True)
    q[10:20] = q[0]
    k[5:9] = k[1]
    w[:, 3] = 0          # all-zero weights: every pair scores 0, best = lowest indices
    w[::3, 4] = 0
    w[:, 5] = 1
    w[:, 6] = -w[:, 6].abs() - 1  # all negative
    result = engine.multi_topk(q, k, w, kk, table_depth=depth, backend="cpu", threads=2)
    for j in range(7):
        assert_exact(engine.TopK(result.scores[j], result.query_idx[j], result.key_idx[j], "global"),
                     score_matrix(q, k, key_weight=w[:, j]), kk, "global")
    _same_as_single(result, q, k, w, kk)


@NATIVE
def test_native_thread_counts_and_auto_agree():
    q, k, w = _inputs(400, 300, 16, 9, seed=11)
    one = engine.multi_topk(q, k, w, 800, table_depth=4, backend="cpu", threads=1)
    for result in (engine.multi_topk(q, k, w, 800, table_depth=4, backend="cpu", threads=2),
                   engine.multi_topk(q, k, w, 800, table_depth=4), engine.multi_topk(q, k, w.T.contiguous().T, 800)):
        assert all(torch.equal(getattr(one, f), getattr(result, f)) for f in ("scores", "query_idx", "key_idx"))


@NATIVE
def test_native_errors():
    q, k, w = _inputs(10, 8, 4, 3)
    with pytest.raises(ValueError, match=r"k=81 is larger than the number of candidates \(80\)"):
        engine.multi_topk(q, k, w, 81, backend="cpu")
    with pytest.raises(ValueError, match="option 'precision' applies to backend 'triton'"):
        engine.multi_topk(q, k, w, 3, backend="cpu", precision="ieee")
    with pytest.raises(ValueError, match="queries must be C-contiguous"):
        engine.multi_topk(q.T.contiguous().T, k, w, 3, backend="cpu")
    with pytest.raises(ValueError, match="isa must be one of"):
        engine.multi_topk(q, k, w, 3, backend="cpu", isa="sse")


@NATIVE
@pytest.mark.parametrize("kk,depth", [(2000, 150), (6000, 100), (200, 120)])
def test_native_rows_with_an_unsorted_tail(kk, depth):
    """Table rows deeper than the sorted prefix (64): the tail is read whole, ties stay exact."""
    assert depth > features.SORTED_PREFIX
    q, k, w = _inputs(200, 60, 5, 6, seed=kk, integer=True)
    q[100:140] = q[3]
    w[::4, 2] = 0
    w[:, 3] = -w[:, 3].abs() - 1
    result = engine.multi_topk(q, k, w, kk, table_depth=depth, backend="cpu")
    for j in range(6):
        assert_exact(engine.TopK(result.scores[j], result.query_idx[j], result.key_idx[j], "global"),
                     score_matrix(q, k, key_weight=w[:, j]), kk, "global")
    _same_as_single(result, q, k, w, kk)
