"""The Triton backend compiled for a real GPU (not the interpreter), at its default block sizes.

Run by bench/gpu_check.sh with TRITON_INTERPRET=0 and ATTNRULES_REQUIRE_GPU=1 (then a missing GPU
is an error, never a skip). Elsewhere these tests are skipped: the interpreter suites
(test_engine_triton.py, test_triton_filter.py) cover the same paths on CPU. Shapes are not multiples
of the blocks; every answer is checked against the float64 oracle, and the tensor-core precisions
against the fp32 answer bit for bit. Each distinct launch compiles once (a few seconds), so the
cases are few and chosen to cover every kernel path: global / per row, pair (signed, absolute, exp)
and dual, stationary and chunked rows, the floor pass and the repair of dropped regions.
"""
import os

import pytest
import torch

from attnrules import engine
from attnrules.kernels import plan as kernel_plan
from attnrules.kernels import topk_stream
from topk_oracle import assert_exact, assert_matches, random_inputs, score_matrix, tolerance
from triton_probes import state_probe

_REASON = None
if not torch.cuda.is_available():
    _REASON = "no CUDA GPU here"
elif topk_stream.INTERPRETED:
    _REASON = "TRITON_INTERPRET=1: the kernels run in the interpreter (set TRITON_INTERPRET=0)"
if _REASON and os.environ.get("ATTNRULES_REQUIRE_GPU") == "1":
    raise RuntimeError(f"ATTNRULES_REQUIRE_GPU=1 but the GPU tests cannot run: {_REASON}")
pytestmark = pytest.mark.skipif(_REASON is not None, reason=str(_REASON))


def _cuda(*xs):
    return [None if x is None else x.cuda() for x in xs]


def _same(a, b):
    assert torch.equal(a.query_idx, b.query_idx) and torch.equal(a.key_idx, b.key_idx)
    assert torch.equal(a.scores, b.scores)


@pytest.mark.parametrize("by,k", [("global", 1), ("global", 2500), ("query", 100), ("key", 1000)])
def test_pair_matches_float64(by, k):
    q, kk, w, _, _ = random_inputs(1000, 1500, 64, seed=1)
    s = score_matrix(q, kk, key_weight=w)
    qc, kc, wc = _cuda(q, kk, w)
    res = engine.pair_topk(qc, kc, k, by=by, key_weight=wc, backend="triton")
    assert_matches(res, s, k, by, tol=tolerance(s, 64))
    if by in ("global", "query"):  # the tensor-core filters return the fp32 answer
        for precision in ("tf32x3", "ieee"):
            _same(engine.pair_topk(qc, kc, k, by=by, key_weight=wc, backend="triton", precision=precision), res)


@pytest.mark.parametrize("score,by", [("absolute", "global"), ("exp", "query")])
def test_pair_scores_match_float64(score, by):
    q, kk, w, _, _ = random_inputs(333, 700, 100, seed=2)
    if score == "exp":
        q, kk = q / 10, kk / 10
    s = score_matrix(q, kk, key_weight=w, score=score)
    res = engine.pair_topk(*_cuda(q, kk), 50, by=by, key_weight=w.cuda(), score=score, backend="triton")
    assert_matches(res, s, 50, by, tol=tolerance(s, 100))


@pytest.mark.parametrize("d,n_ex,by", [(64, 100, "global"), (160, 300, "key")])
def test_dual_matches_float64(d, n_ex, by):
    # d = 160 and 300 exemplars: rows no longer fit one block, the chunked (non-stationary) path.
    q, kk, _, qa, ka = random_inputs(500, 611, d, n_ex=n_ex, seed=3)
    s = score_matrix(q, kk, query_acts=qa, key_acts=ka)
    k = 3000 if by == "global" else 40
    res = engine.dual_topk(*_cuda(q, kk, qa, ka), k, by=by, backend="triton")
    assert_matches(res, s, k, by, tol=tolerance(s, d) * 10)


def test_floor_pass_and_repairs_on_large_inputs():
    # 4,100 rows (≥ SAMPLE_MIN_ROWS: the floor pass runs), k above program_k, and one query that
    # owns most top pairs, so programs are cut and their regions repaired.
    q, kk, w, _, _ = random_inputs(4100, 3000, 64, seed=4)
    q[2222] *= 30
    s = score_matrix(q, kk, key_weight=w)
    res = engine.pair_topk(*_cuda(q, kk), 10_000, key_weight=w.cuda(), backend="triton")
    assert_matches(res, s, 10_000, "global", tol=tolerance(s, 64))


def test_ties_are_exact():
    g = torch.Generator().manual_seed(5)
    q = torch.randint(-2, 3, (300, 16), generator=g).float()
    kk = torch.randint(-2, 3, (257, 16), generator=g).float()
    w = torch.randint(-1, 2, (257,), generator=g).float()
    s = score_matrix(q, kk, key_weight=w)
    for by, k in (("global", 500), ("query", 33), ("key", 33)):
        assert_exact(engine.pair_topk(*_cuda(q, kk), k, by=by, key_weight=w.cuda(), backend="triton"), s, k, by)


def test_the_filter_runs_on_tensor_cores_and_the_margin_is_needed(monkeypatch):
    # Keys 1 + j·2⁻²¹ (all below 1 + 2⁻¹¹) read as 1.0 in TF32, truncated or rounded to nearest: only
    # the margin makes the later, truly better column blocks be rescored.
    q = torch.zeros(64, 16)
    q[:, 0] = 1.0
    kk = torch.zeros(300, 16)
    kk[:, 0] = 1.0 + torch.arange(300, dtype=torch.float32) * 2.0**-21
    s = score_matrix(q, kk)
    # One column split: every program streams all 300 keys, so the later blocks meet a threshold (with
    # the GPU's default splits the last split's few blocks never fill a buffer and are never filtered).
    qc, kc = _cuda(q, kk)
    assert_exact(engine.pair_topk(qc, kc, 3, by="query", backend="triton", n_splits=1), s, 3, "query")
    monkeypatch.setattr(kernel_plan, "filter_margin", lambda *args: 0.0)
    wrong = engine.pair_topk(qc, kc, 3, by="query", backend="triton", n_splits=1)
    expected = torch.tensor(s).topk(3, dim=1).indices
    assert not torch.equal(wrong.key_idx.cpu(), expected), "the TF32 filter computed fp32 products"


def test_buffer_addressing_is_int64_on_the_gpu():
    p = kernel_plan.plan(n_rows=2**22, n_cols=2**16, d=64, k=100, global_mode=False, n_splits=4)
    out = torch.zeros(2, dtype=torch.int64, device="cuda")
    split, row_block = p.n_splits - 1, p.n_row_blocks - 1
    state_probe[(1,)](out, split, p.n_rows, row_block * p.block_r, row_block, p.n_splits, CAP=p.cap, GLOBAL=False)
    assert out.tolist() == [split * p.n_rows + row_block * p.block_r, p.first_slot(row_block, split)]
