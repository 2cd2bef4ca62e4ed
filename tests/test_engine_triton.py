"""The Triton backend in Triton's CPU interpreter against the float64 oracle.

conftest.py sets TRITON_INTERPRET=1 before import. Shapes are small but not multiples of the blocks
(masked rows, columns and d), block sizes are ≥ 16 as on a GPU, and the per-row buffers are small
enough that compaction runs. Every call uses the default precision ("tf32": the emulated TF32 filter,
then the fp32 rescore; tests/test_triton_filter.py compares the precisions). Each interpreted op
costs ~1 ms, so calls are kept few.
"""
import pytest
import torch

from attnrules import engine
from attnrules.engine import merge, torch_backend, triton_backend
from attnrules.kernels import topk_stream
from attnrules.kernels.dual_topk import dual_candidates
from attnrules.kernels.pair_topk import pair_candidates
from topk_oracle import assert_exact, assert_matches, random_inputs, score_matrix, tolerance

pytestmark = pytest.mark.interpreter

NQ, NK, D = 37, 53, 20  # 3 query blocks of 16, 4 key blocks of 16, d padded to 32


def _ks(nq, nk, by):
    n = {"global": nq * nk, "query": nk, "key": nq}[by]
    return [1, 5, n]


def test_backend_is_available_in_the_interpreter():
    assert topk_stream.INTERPRETED and triton_backend.is_available()
    assert "triton" in engine.available_backends()


@pytest.mark.parametrize("by", engine.BY_CHOICES)
@pytest.mark.parametrize("score", ["signed", "absolute", "exp"])
@pytest.mark.parametrize("weighted", [False, True])
def test_pair_topk_matches_float64(by, score, weighted):
    q, k, w, _, _ = random_inputs(NQ, NK, D, seed=11)
    if score == "exp":  # REF's scale: exp() of small products
        q, k = q / D, k / D
    w = w if weighted else None
    s = score_matrix(q, k, key_weight=w, score=score)
    for kk in _ks(NQ, NK, by):
        res = engine.pair_topk(q, k, kk, by=by, key_weight=w, score=score, backend="triton", block_q=16, block_k=16)
        assert res.by == by
        assert_matches(res, s, kk, by, tol=tolerance(s, D))


@pytest.mark.parametrize("by", engine.BY_CHOICES)
@pytest.mark.parametrize("score", ["signed", "absolute"])
def test_dual_topk_matches_float64(by, score):
    q, k, _, qa, ka = random_inputs(NQ, NK, D, n_ex=9, seed=3)
    s = score_matrix(q, k, score=score, query_acts=qa, key_acts=ka)
    for kk in _ks(NQ, NK, by):
        res = engine.dual_topk(q, k, qa, ka, kk, by=by, score=score, backend="triton")  # default blocks
        assert_matches(res, s, kk, by, tol=tolerance(s, D) * 10)


@pytest.mark.parametrize("by", engine.BY_CHOICES)
def test_ties_and_signed_zeros_are_broken_by_lower_index(by):
    # Small integers: every score is exact in float32, many are equal, and zero weights times
    # negative products give -0.0, which must tie with +0.0.
    g = torch.Generator().manual_seed(1)
    q = torch.randint(-2, 3, (23, 3), generator=g).float()
    k = torch.randint(-2, 3, (19, 3), generator=g).float()
    w = torch.randint(-1, 2, (19,), generator=g).float()
    s = score_matrix(q, k, key_weight=w)
    n = {"global": 23 * 19, "query": 19, "key": 23}[by]
    for kk in (1, 11, n):
        res = engine.pair_topk(q, k, kk, by=by, key_weight=w, backend="triton", block_q=16, block_k=16)
        assert_exact(res, s, kk, by)


@pytest.mark.parametrize("by", ["global", "query"])
def test_long_streams_with_column_splits(by):
    # 300 keys: many compactions per row buffer, and 3 column splits merged in torch.
    q, k, w, _, _ = random_inputs(16, 300, 8, seed=7)
    s = score_matrix(q, k, key_weight=w)
    for splits in (1, 3):
        res = engine.pair_topk(q, k, 40, by=by, key_weight=w, backend="triton", block_q=16, n_splits=splits)
        assert_matches(res, s, 40, by, tol=tolerance(s, 8))


def test_global_k_above_program_k_is_checked_and_repaired(monkeypatch):
    q, k, w, _, _ = random_inputs(NQ, NK, D, seed=5)
    q[20] *= 50  # query 20 owns every top pair: its program must be repaired exactly
    s = score_matrix(q, k, key_weight=w)
    found = triton_backend.global_candidates(
        pair_candidates(q, k, 30, per_row=False, col_weight=w, block_r=16, block_c=16, program_k=8))
    best = merge.top_pairs(found.scores, found.rows, found.cols, NK, 30)
    bad = triton_backend._unverified(found, best, 30, NK)
    assert found.regions[bad].tolist() == [[16, 32, 0, NK]]

    def no_torch(*args, **kwargs):
        raise AssertionError("the triton backend must not call the torch backend")

    monkeypatch.setattr(torch_backend, "topk", no_torch)  # the region is run again by the kernel itself
    res = engine.pair_topk(q, k, 30, key_weight=w, backend="triton", block_q=16, program_k=8)
    assert_matches(res, s, 30, "global", tol=tolerance(s, D))
    q, k, w, _, _ = random_inputs(NQ, NK, D, seed=6)  # spread out: most programs pass the check
    s = score_matrix(q, k, key_weight=w)
    res = engine.pair_topk(q, k, 30, key_weight=w, backend="triton", block_q=16, program_k=16)
    assert_matches(res, s, 30, "global", tol=tolerance(s, D))


def test_kernels_upcast_bf16_after_loading():
    q, k, _, qa, ka = random_inputs(NQ, NK, D, n_ex=9, seed=4)
    q, k, qa, ka = (x.bfloat16() for x in (q, k, qa, ka))
    s = score_matrix(q, k, query_acts=qa, key_acts=ka)  # float64 of the bf16 values
    found = triton_backend.global_candidates(dual_candidates(q, k, qa, ka, 9, per_row=False, block_r=16, block_c=16))
    assert found.scores.dtype == torch.float32
    res = engine.TopK(*merge.top_pairs(found.scores, found.rows, found.cols, NK, 9), "global")
    assert_matches(res, s, 9, "global", tol=tolerance(s, D) * 10)


def test_clear_errors(monkeypatch):
    q, k, _, _, _ = random_inputs(20, 1100, 4, seed=0)
    with pytest.raises(ValueError, match="per-row limit of 1024"):
        engine.pair_topk(q, k, 1025, by="query", backend="triton")
    with pytest.raises(ValueError, match="block_k must be a power of two ≥ 16 for backend='triton'"):
        engine.pair_topk(q, k, 3, backend="triton", block_k=24)
    with pytest.raises(ValueError, match="block_q must be a power of two ≥ 16 for backend='triton'"):
        engine.pair_topk(q, k, 3, backend="triton", block_q=8)
    with pytest.raises(ValueError, match="block_q × block_k = 16384 is above 8192"):
        engine.pair_topk(q, k, 3, by="global", backend="triton", block_q=128, block_k=128)
    with pytest.raises(ValueError, match="precision must be one of"):
        engine.pair_topk(q, k, 3, backend="triton", precision="fp16")
    with pytest.raises(ValueError, match="program_k applies to by='global' only"):
        engine.pair_topk(q, k, 3, by="key", backend="triton", program_k=4)
    with pytest.raises(ValueError, match=r"program_k must be an int in \[1, 4096\]"):
        engine.pair_topk(q, k, 3, backend="triton", program_k=5000)
    with pytest.raises(TypeError, match="queries must be float32 for backend='triton', got torch.float64"):
        engine.pair_topk(q.double(), k.double(), 3, backend="triton")
    monkeypatch.setattr(topk_stream, "INTERPRETED", False)  # as if imported without TRITON_INTERPRET=1
    with pytest.raises(ValueError, match="backend 'triton' cannot run on cpu tensors here: .*TRITON_INTERPRET=1"):
        engine.pair_topk(q, k, 3, backend="triton")


def test_large_per_row_k():
    # k = 300 → K = 512, 128-column tiles: buffers of 1,024 slots, compacted by bisection; 12 live rows.
    q, k, w, _, _ = random_inputs(12, 1100, 4, seed=8)  # 9 column blocks: one compaction
    s = score_matrix(q, k, key_weight=w)
    res = engine.pair_topk(q, k, 300, by="query", key_weight=w, backend="triton", block_q=16, block_k=128)
    assert_matches(res, s, 300, "query", tol=tolerance(s, 4))
