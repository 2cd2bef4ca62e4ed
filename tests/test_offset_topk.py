"""engine.offset_topk (best offset of rotary scores) against a float64 brute force over pairs × offsets.

The brute force materialises A[q, k, o] in numpy float64; shapes are small and not multiples of any
block; inputs cover partial rotary (unrotated columns), tables with a constant scale factor, a single
offset (which is plain pair_topk), duplicated rows and zero weights (ties), and both score modes.
"""
import math

import numpy as np
import pytest
import torch

from attnrules import engine
from attnrules.engine import offsets
from topk_oracle import assert_exact, assert_matches, expected_topk

BACKENDS = [b for b in ("torch", "cpu") if b in engine.available_backends()]


def brute(q, k, w, cos, sin, score="signed"):
    """A[q, k, o] (× w, |·| for absolute), float64 numpy, straight from the definition."""
    q, k = q.double().numpy(), k.double().numpy()
    cos, sin = torch.as_tensor(cos).double().numpy(), torch.as_tensor(sin).double().numpy()
    p = cos.shape[1]
    qa, qb, ka, kb = q[:, None, :p], q[:, None, p:2 * p], k[None, :, :p], k[None, :, p:2 * p]
    a = (qa * ka + qb * kb) @ cos.T + (qa * kb - qb * ka) @ sin.T + (q[:, 2 * p:] @ k[:, 2 * p:].T)[:, :, None]
    if w is not None:
        a = a * w.double().numpy()[None, :, None]
    return np.abs(a) if score == "absolute" else a


def rotary_tables(n_off, p, base=100.0, scale=1.0, offsets_=None):
    theta = base ** (-torch.arange(p, dtype=torch.float64) / p)
    o = torch.arange(n_off, dtype=torch.float64) if offsets_ is None else torch.as_tensor(offsets_, dtype=torch.float64)
    phi = o[:, None] * theta[None, :]
    return scale * phi.cos(), scale * phi.sin()


def check(res, a, k, by, tol):
    """The answer is the brute force's top-k (up to tol at the boundary; returned scores are rounded
    to the inputs' dtype) and each pair's offset row reaches its score."""
    s = a.max(-1)
    tol = max(tol, torch.finfo(res.scores.dtype).eps * max(1.0, float(np.abs(s).max())))
    assert isinstance(res, engine.OffsetTopK) and isinstance(res, engine.TopK) and res.by == by
    assert res.offset_idx.shape == res.scores.shape and res.offset_idx.dtype == torch.int64
    assert_matches(res, s, k, by, tol=tol)
    qi, ki, oi = res.query_idx.numpy(), res.key_idx.numpy(), res.offset_idx.numpy()
    np.testing.assert_allclose(a[qi, ki, oi], s[qi, ki], rtol=0, atol=tol)


def inputs(nq=37, nk=29, d=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(nq, d, generator=g), torch.randn(nk, d, generator=g), torch.randn(nk, generator=g)


# ----------------------------------------------------------------------------------- the answer


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("score", offsets.OFFSET_SCORES)
@pytest.mark.parametrize("by", engine.BY_CHOICES)
def test_matches_the_brute_force(backend, score, by):
    q, k, w = inputs()
    cos, sin = rotary_tables(13, 7, scale=1.3)  # partial rotary: 14 of 20 columns, tables scaled
    a = brute(q, k, w, cos, sin, score)
    n = {"global": 37 * 29, "query": 29, "key": 37}[by]
    for kk in (1, 6, n):
        res = offset_topk_call(q, k, kk, cos, sin, by=by, key_weight=w, score=score, backend=backend)
        check(res, a, kk, by, tol=1e-9)


def offset_topk_call(q, k, kk, cos, sin, **kw):
    return engine.offset_topk(q, k, kk, cos=cos, sin=sin, **kw)


def test_without_key_weight_and_float64_inputs():
    q, k, _ = inputs(seed=3)
    cos, sin = rotary_tables(9, 10)  # full rotary: 2p = d
    a = brute(q, k, None, cos, sin)
    check(engine.offset_topk(q, k, 11, cos=cos, sin=sin), a, 11, "global", 1e-9)
    res = engine.offset_topk(q.double(), k.double(), 11, cos=cos, sin=sin, by="query")
    assert res.scores.dtype == torch.float64
    check(res, a, 11, "query", 1e-12)


def _exact_inputs(seed=1, nq=23, nk=19, d=7):
    """Small integers with duplicated rows and zero weights; tables at multiples of π/2, scaled by 2:
    every score is exact in float32 and float64, so order, ties and offset rows must match exactly."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-2, 3, (nq, d), generator=g).float()
    k = torch.randint(-2, 3, (nk, d), generator=g).float()
    q[5], k[3], k[11] = q[2], k[7], k[7]
    w = torch.randint(-1, 2, (nk,), generator=g).float()
    w[0] = 0
    quarter = torch.tensor([[1.0, 0, 1], [0, 1, -1], [-1, 0, 0], [0, -1, 1], [1, 0, 1]], dtype=torch.float64)
    cos, sin = 2 * quarter, 2 * torch.roll(quarter, 1, 0)
    return q, k, w, cos, sin  # p = 3, one unrotated column


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("score", offsets.OFFSET_SCORES)
@pytest.mark.parametrize("by", engine.BY_CHOICES)
def test_ties_and_offset_rows_are_exact(backend, score, by):
    q, k, w, cos, sin = _exact_inputs()
    a = brute(q, k, w, cos, sin, score)
    s = a.max(-1)
    for kk in (1, 9, {"global": 23 * 19, "query": 19, "key": 23}[by]):
        res = engine.offset_topk(q, k, kk, cos=cos, sin=sin, by=by, key_weight=w, score=score, backend=backend)
        assert_exact(res, s, kk, by)
        _, eq, ek = expected_topk(s, kk, by)
        np.testing.assert_array_equal(res.offset_idx.numpy(), a.argmax(-1)[eq, ek])  # lowest row of the maxima


@pytest.mark.parametrize("by", engine.BY_CHOICES)
def test_a_single_offset_is_plain_pair_topk(by):
    q, k, w, _, _ = _exact_inputs(seed=4)
    cos, sin = torch.ones(1, 3), torch.zeros(1, 3)  # offset 0: A = q·k
    for score in offsets.OFFSET_SCORES:
        res = engine.offset_topk(q, k, 8, cos=cos, sin=sin, by=by, key_weight=w, score=score)
        plain = engine.pair_topk(q, k, 8, by=by, key_weight=w, score=score, backend="torch")
        for name in ("scores", "query_idx", "key_idx"):
            assert torch.equal(getattr(res, name), getattr(plain, name)), name
        assert not res.offset_idx.any()


def test_rotated_pairs_are_found_at_their_offset():
    """Keys that are queries rotated back by δ score ‖q‖² at offset row δ (a trained head's pattern)."""
    from attnrules.circuit.rotary import Rotary

    p, n_off, d = 8, 24, 18
    cos, sin = rotary_tables(n_off, p, base=50.0)
    rot = Rotary(torch.arange(p), torch.arange(p, 2 * p), torch.arange(2 * p, d), cos, sin)
    g = torch.Generator().manual_seed(7)
    q = 0.1 * torch.randn(40, d, generator=g, dtype=torch.float64)
    k = 0.1 * torch.randn(50, d, generator=g, dtype=torch.float64)
    delta = torch.tensor([3, 17, 9])
    q[[4, 20, 33]] *= 40
    k[[10, 0, 45]] = rot.rotate(q[[4, 20, 33]], delta)  # A_o(q, k) = rotate(q, o)·rotate(q, δ): max at o = δ
    a = brute(q, k, None, cos, sin)
    assert np.allclose(a.max(-1), rot.offset_scores(q[:, None].expand(-1, 50, -1).reshape(-1, d),
                                                    k.repeat(40, 1), range(n_off)).max(-1).values.reshape(40, 50).numpy())
    res = engine.offset_topk(q, k, 3, cos=cos, sin=sin, backend="torch")
    assert sorted(zip(res.query_idx.tolist(), res.key_idx.tolist(), res.offset_idx.tolist())) == \
        [(4, 10, 3), (20, 0, 17), (33, 45, 9)]  # fmt: skip
    check(res, a, 3, "global", 1e-12)


# ------------------------------------------------------------------------------------- the bound


@pytest.mark.parametrize("score", offsets.OFFSET_SCORES)
@pytest.mark.parametrize("tables", ["rotary", "scaled", "random"])
def test_the_bound_is_an_upper_bound(score, tables):
    q, k, w = inputs(nq=60, nk=50, d=24, seed=5)
    if tables == "random":  # any table: magnitudes vary per offset and pair
        g = torch.Generator().manual_seed(2)
        cos, sin = torch.randn(17, 9, generator=g, dtype=torch.float64), torch.randn(17, 9, generator=g, dtype=torch.float64)
    else:
        cos, sin = rotary_tables(64, 9, base=10000.0, scale=3.0 if tables == "scaled" else 1.0)
    problem = offsets._build(q, k, w, cos, sin, score, {})
    b = (problem.q_t.double() @ problem.k_t.double().T).reshape(60, problem.parts, 50).amax(1)
    s = brute(q, k, w, cos, sin, score).max(-1)
    assert np.all(b.numpy() >= s - 1e-5 * max(1.0, np.abs(s).max()))
    if tables != "random":  # low frequencies take the tight C-form
        _, eps, rho = offsets.table_centres(cos, sin)
        assert bool((eps < rho).any()) and bool((eps[-1] < 0.1 * rho[-1]))


def test_table_centres_are_near_the_smallest_enclosing_circle():
    cos, sin = rotary_tables(64, 16, base=10000.0, scale=2.0)
    centre, eps, rho = offsets.table_centres(cos, sin)
    span = 63 * 10000.0 ** (-torch.arange(16, dtype=torch.float64) / 16)  # the arc each pair covers
    arc = span < math.pi
    assert torch.allclose(eps[arc], 2.0 * torch.sin(span[arc] / 2), rtol=1e-3)  # half the chord, × scale
    assert torch.allclose(rho, torch.full_like(rho, 2.0))


# ------------------------------------------------------------------------ larger: every code path


@pytest.mark.parametrize("score", offsets.OFFSET_SCORES)
def test_sampled_sizing_chunks_and_regrowth(monkeypatch, score):
    """Global ranking sized from a sample, rescoring in chunks with early stop and the float32
    filter, and (per row) rows whose certificate fails ranked again."""
    monkeypatch.setattr(offsets, "_SAMPLE_ROWS", 40)
    monkeypatch.setattr(offsets, "_CHUNK", 97)
    monkeypatch.setattr(offsets, "_SEED", 1)
    q, k, w = inputs(nq=300, nk=211, d=16, seed=9)
    q[::7] *= 3  # uneven norms
    cos, sin = rotary_tables(20, 6, base=1000.0)
    a = brute(q, k, w, cos, sin, score)
    for by, kk in (("global", 150), ("query", 17), ("key", 17)):
        res = engine.offset_topk(q, k, kk, cos=cos, sin=sin, by=by, key_weight=w, score=score, backend=BACKENDS[-1])
        check(res, a, kk, by, tol=1e-9)


@pytest.mark.interpreter
@pytest.mark.skipif("triton" not in engine.available_backends(), reason="triton backend not available here")
def test_triton_backend_ranks_the_bounds():
    q, k, w = inputs(nq=21, nk=18, d=10, seed=2)
    cos, sin = rotary_tables(5, 4)
    a = brute(q, k, w, cos, sin)
    for by in ("global", "query"):
        res = engine.offset_topk(q, k, 4, cos=cos, sin=sin, by=by, key_weight=w, backend="triton")
        check(res, a, 4, by, tol=1e-9)


# ------------------------------------------------------------------------------------------ errors


def test_argument_errors_name_the_argument():
    q, k, w = inputs(nq=5, nk=4, d=6)
    cos, sin = rotary_tables(3, 2)
    call = engine.offset_topk
    with pytest.raises(ValueError, match=r"score must be one of \('signed', 'absolute'\) for offset_topk, got 'exp'"):
        call(q, k, 2, cos=cos, sin=sin, score="exp")
    with pytest.raises(ValueError, match=r"cos and sin must have the same shape \[n_offsets, p\], got cos \(3, 2\) and sin \(2, 2\)"):
        call(q, k, 2, cos=cos, sin=sin[:2])
    with pytest.raises(ValueError, match=r"cos/sin have p=4 frequency pairs, which need 2p=8 columns, but queries and keys have d=6"):
        call(q, k, 2, cos=torch.ones(3, 4), sin=torch.zeros(3, 4))
    with pytest.raises(ValueError, match=r"cos must be 2-D \[n, d\], got shape \(3,\)"):
        call(q, k, 2, cos=cos[:, 0], sin=sin)
    bad = sin.clone()
    bad[1, 1] = float("nan")
    with pytest.raises(ValueError, match="sin contains NaN or infinite values"):
        call(q, k, 2, cos=cos, sin=bad)
    with pytest.raises(ValueError, match="k must be a positive int, got 0"):
        call(q, k, 0, cos=cos, sin=sin)
    with pytest.raises(ValueError, match=r"k=5 is larger than the number of candidates \(4\) for by='query'"):
        call(q, k, 5, cos=cos, sin=sin, by="query")
    with pytest.raises(ValueError, match="by must be one of"):
        call(q, k, 2, cos=cos, sin=sin, by="row")
    with pytest.raises(ValueError, match=r"key_weight must have shape \[4\]"):
        call(q, k, 2, cos=cos, sin=sin, key_weight=w[:3])
    with pytest.raises(ValueError, match="keys must have 6 columns"):
        call(q, k[:, :5], 2, cos=cos, sin=sin)
    with pytest.raises(TypeError, match="cos must be a torch.Tensor or numpy array"):
        call(q, k, 2, cos=[[1.0]], sin=sin)
    with pytest.raises(ValueError, match="unknown option 'block_r'"):
        call(q, k, 2, cos=cos, sin=sin, block_r=16)
    with pytest.raises(TypeError):
        call(q, k, 2)  # cos and sin are required
    res = call(q.numpy(), k.numpy(), 2, cos=cos.numpy(), sin=sin.numpy())  # numpy arrays are accepted
    assert res.scores.shape == (2,)


def test_a_nan_score_names_the_pair():
    q, k, _ = inputs(nq=4, nk=3, d=4)
    q, k = q.double(), k.double()
    q[2], k[1] = 1e200, 1e200
    w = torch.ones(3, dtype=torch.float64)
    w[1] = 0
    with pytest.raises(ValueError, match=r"offset_topk\(score='signed'\): the score of pair \(query 2, key 1\) is NaN "
                                         r"in float64 .* times key_weight\[1\] = 0"):
        engine.offset_topk(q, k, 2, cos=torch.ones(2, 2), sin=torch.zeros(2, 2), key_weight=w, backend="torch")
