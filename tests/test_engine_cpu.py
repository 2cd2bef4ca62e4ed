"""The "cpu" backend (attnrules._C) against the float64 oracle: every mode, awkward shapes, threads, ISAs."""
import numpy as np
import pytest
import torch

from attnrules import engine
from attnrules.engine import cpu_backend
from topk_oracle import assert_exact, assert_matches, random_inputs, score_matrix, tolerance

pytestmark = pytest.mark.skipif(not cpu_backend.is_available(), reason="attnrules._C was not built")

# None of these is a multiple of a micro-tile (12 × 32 for AVX-512, 6 × 16 for AVX2, 4 × 16 portable).
SHAPES = [(1, 1, 3), (7, 5, 4), (37, 53, 16), (130, 70, 64)]
ISAS = cpu_backend.supported_isas()


def _ks(nq, nk, by):
    n = {"global": nq * nk, "query": nk, "key": nq}[by]
    return sorted({1, min(5, n), n})


def _same(a: engine.TopK, b: engine.TopK) -> bool:
    """Bit for bit: scores, indices and order."""
    return (
        torch.equal(a.scores, b.scores) and torch.equal(a.query_idx, b.query_idx) and torch.equal(a.key_idx, b.key_idx)
    )


def _check_result_types(res: engine.TopK, by: str, nq: int, nk: int, k: int) -> None:
    shape = {"global": (k,), "query": (nq, k), "key": (nk, k)}[by]
    assert res.by == by and res.scores.shape == shape
    assert res.scores.dtype == torch.float32
    assert res.query_idx.dtype == res.key_idx.dtype == torch.int64
    if by == "query":
        assert torch.equal(res.query_idx, torch.arange(nq)[:, None].expand(nq, k))
    if by == "key":
        assert torch.equal(res.key_idx, torch.arange(nk)[:, None].expand(nk, k))


@pytest.mark.parametrize("nq,nk,d", SHAPES)
@pytest.mark.parametrize("by", engine.BY_CHOICES)
@pytest.mark.parametrize("score", ["signed", "absolute", "exp"])
@pytest.mark.parametrize("weighted", [False, True])
def test_pair_topk_matches_float64(nq, nk, d, by, score, weighted):
    q, k, w, _, _ = random_inputs(nq, nk, d, seed=nq + nk)
    if score == "exp":  # keep exp() in range as REF's scores are (A is ~0.1 there)
        q, k = q / d, k / d
    w = w if weighted else None
    s = score_matrix(q, k, key_weight=w, score=score)
    for kk in _ks(nq, nk, by):
        one = engine.pair_topk(q, k, kk, by=by, key_weight=w, score=score, backend="cpu", threads=1)
        two = engine.pair_topk(q, k, kk, by=by, key_weight=w, score=score, backend="cpu", threads=2, block_q=12, block_k=32)
        _check_result_types(one, by, nq, nk, kk)
        assert_matches(one, s, kk, by, tol=tolerance(s, d))
        assert _same(one, two), "thread count or block size changed the answer"


@pytest.mark.parametrize("nq,nk,d", SHAPES)
@pytest.mark.parametrize("by", engine.BY_CHOICES)
@pytest.mark.parametrize("score", ["signed", "absolute"])
def test_dual_topk_matches_float64(nq, nk, d, by, score):
    q, k, _, qa, ka = random_inputs(nq, nk, d, n_ex=9, seed=3)
    s = score_matrix(q, k, score=score, query_acts=qa, key_acts=ka)
    for kk in _ks(nq, nk, by):
        one = engine.dual_topk(q, k, qa, ka, kk, by=by, score=score, backend="cpu", threads=1)
        two = engine.dual_topk(q, k, qa, ka, kk, by=by, score=score, backend="cpu", threads=2, block_q=24, block_k=32)
        _check_result_types(one, by, nq, nk, kk)
        assert_matches(one, s, kk, by, tol=tolerance(s, d) * 10)
        assert _same(one, two), "thread count or block size changed the answer"


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("by", engine.BY_CHOICES)
def test_every_isa_matches_float64(isa, by):
    q, k, w, qa, ka = random_inputs(61, 83, 64, n_ex=100, seed=7)
    s = score_matrix(q, k, key_weight=w)
    res = engine.pair_topk(q, k, 17, by=by, key_weight=w, backend="cpu", isa=isa, threads=2)
    assert_matches(res, s, 17, by, tol=tolerance(s, 64))
    s = score_matrix(q / 8, k / 8, key_weight=w, score="exp")
    res = engine.pair_topk(q / 8, k / 8, 17, by=by, key_weight=w, score="exp", backend="cpu", isa=isa, threads=2)
    assert_matches(res, s, 17, by, tol=tolerance(s, 64))
    s = score_matrix(q, k, query_acts=qa, key_acts=ka, score="absolute")
    res = engine.dual_topk(q, k, qa, ka, 17, by=by, score="absolute", backend="cpu", isa=isa, threads=2)
    assert_matches(res, s, 17, by, tol=tolerance(s, 64) * 10)


@pytest.mark.skipif(not {"avx512", "avx2"} <= set(ISAS), reason="needs a CPU with AVX-512 and AVX2")
def test_avx2_and_avx512_agree_bit_for_bit():
    # Both accumulate each dot product with one fused multiply-add per term, in the same order.
    q, k, w, qa, ka = random_inputs(45, 77, 64, n_ex=30, seed=11)
    for by in engine.BY_CHOICES:
        for score in ["signed", "absolute", "exp"]:
            a, b = (engine.pair_topk(q / 8, k / 8, 9, by=by, key_weight=w, score=score, backend="cpu", isa=isa)
                    for isa in ("avx512", "avx2"))  # fmt: skip
            assert _same(a, b)
        a, b = (engine.dual_topk(q, k, qa, ka, 9, by=by, backend="cpu", isa=isa) for isa in ("avx512", "avx2"))
        assert _same(a, b)


@pytest.mark.parametrize("by", engine.BY_CHOICES)
def test_ties_broken_by_lower_index(by):
    # Small integers are exact in float32: many equal scores, including +0 and -0 (zero weights).
    g = torch.Generator().manual_seed(1)
    q = torch.randint(-2, 3, (23, 3), generator=g).float()
    k = torch.randint(-2, 3, (19, 3), generator=g).float()
    w = torch.randint(-1, 2, (19,), generator=g).float()
    s = score_matrix(q, k, key_weight=w)
    n = {"global": 437, "query": 19, "key": 23}[by]
    for kk in _ks(23, 19, by) + [11]:
        for threads in (1, 2):
            res = engine.pair_topk(q, k, min(kk, n), by=by, key_weight=w, backend="cpu", threads=threads)
            assert_exact(res, s, res.scores.shape[-1], by)


def test_agrees_with_the_torch_backend():
    q, k, w, _, _ = random_inputs(300, 500, 64, seed=2)
    for by, kk in [("global", 1000), ("query", 50), ("key", 50)]:
        ref = engine.pair_topk(q.double(), k.double(), kk, by=by, key_weight=w.double(), backend="torch")
        res = engine.pair_topk(q, k, kk, by=by, key_weight=w, backend="cpu")
        np.testing.assert_allclose(res.scores.numpy(), ref.scores.numpy(), rtol=0, atol=1e-4)
        assert (res.query_idx == ref.query_idx).float().mean() > 0.99
        assert (res.key_idx == ref.key_idx).float().mean() > 0.99


@pytest.mark.parametrize("by", ["query", "key"])
def test_sampled_threshold_guess_never_changes_the_answer(by):
    q, k, w, qa, ka = random_inputs(150, 400, 16, n_ex=5, seed=4)
    # Sorted by norm, the first rows/cols score highest: a strided sample still sees them, but a
    # guess from the top of this ordering is too high for some rows, which are then redone.
    order = torch.argsort(q.norm(dim=1), descending=True)
    q, qa = q[order].contiguous(), qa[order].contiguous()
    s = score_matrix(q, k, key_weight=w)
    plain = engine.pair_topk(q, k, 20, by=by, key_weight=w, backend="cpu", sample_cols=0)
    assert_matches(plain, s, 20, by, tol=tolerance(s, 16))
    for sample in (16, 40, 100):
        guessed = engine.pair_topk(q, k, 20, by=by, key_weight=w, backend="cpu", sample_cols=sample, threads=2)
        assert _same(plain, guessed)
        guessed = engine.dual_topk(q, k, qa, ka, 20, by=by, backend="cpu", sample_cols=sample)
        assert _same(engine.dual_topk(q, k, qa, ka, 20, by=by, backend="cpu", sample_cols=0), guessed)


def test_a_biased_sample_forces_redo_and_stays_exact():
    # Every 10th key is huge: a stride-10 sample sees only those, so every row's guess is too high.
    q, k, _, _, _ = random_inputs(40, 300, 8, seed=6)
    k[::10] *= 50
    s = score_matrix(q.abs(), k.abs())
    res = engine.pair_topk(q.abs(), k.abs(), 60, by="query", backend="cpu", sample_cols=30)
    assert_matches(res, s, 60, "query", tol=tolerance(s, 8))


def test_inputs_that_need_gradients_are_accepted():
    q, k, w, _, _ = random_inputs(20, 30, 8, seed=8)
    res = engine.pair_topk(q.requires_grad_(), k, 5, key_weight=w, backend="cpu")
    assert_matches(res, score_matrix(q, k, key_weight=w), 5, "global", tol=1e-4)


def test_overflow_to_nan_is_an_error():
    q = torch.full((3, 2), 100.0)
    with pytest.raises(RuntimeError, match="fewer than k scores are finite"):
        engine.pair_topk(q, q, 2, key_weight=torch.zeros(3), score="exp", backend="cpu")


@pytest.mark.parametrize(
    "change,error,match",
    [
        (dict(queries=torch.randn(6, 4, dtype=torch.float64), keys=torch.randn(5, 4, dtype=torch.float64)), TypeError,
         "queries must be float32 for backend='cpu'"),
        (dict(keys=torch.randn(4, 5).T), ValueError, r"keys must be C-contiguous .* keys.contiguous\(\)"),
        (dict(key_weight=torch.randn(10)[::2]), ValueError, "key_weight must be C-contiguous"),
        (dict(threads=0), ValueError, "threads must be a positive int or None"),
        (dict(block_q=-3), ValueError, "block_q must be a positive int or None"),
        (dict(sample_cols=-1), ValueError, "sample_cols must be a non-negative int or None"),
        (dict(isa="neon"), ValueError, "isa must be one of"),
    ],
)  # fmt: skip
def test_rejects_with_a_clear_error(change, error, match):
    args = dict(queries=torch.randn(6, 4), keys=torch.randn(5, 4), k=3, backend="cpu")
    args.update(change)
    with pytest.raises(error, match=match):
        engine.pair_topk(**args)


def test_dual_rejects_non_contiguous_activations():
    q, k = torch.randn(6, 4), torch.randn(5, 4)
    with pytest.raises(ValueError, match="key_acts must be C-contiguous"):
        engine.dual_topk(q, k, torch.rand(6, 7), torch.rand(7, 5).T, 2, backend="cpu")


def test_core_never_converts_its_inputs():
    # The binding itself refuses (rather than copies) float64 or strided arrays.
    from attnrules import _C

    out_s, out_r, out_c = torch.empty(2), torch.empty(2, dtype=torch.int64), torch.empty(2, dtype=torch.int64)
    for rows in (torch.randn(6, 4, dtype=torch.float64), torch.randn(4, 6).T):
        with pytest.raises(TypeError):
            _C.topk(rows, torch.randn(5, 4), 2, False, "signed", out_scores=out_s, out_rows=out_r, out_cols=out_c)


def test_auto_picks_cpu_for_float32_cpu_tensors():
    assert "cpu" in engine.available_backends()
    q, k, w, _, _ = random_inputs(30, 40, 8, seed=9)
    assert _same(engine.pair_topk(q, k, 7, key_weight=w), engine.pair_topk(q, k, 7, key_weight=w, backend="cpu"))
