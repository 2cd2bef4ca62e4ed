"""The Triton backend's tensor-core filter and fp32 rescore, the global floor pass, and int64 addressing.

In Triton's interpreter ``tl.dot`` is fp32 whatever its precision, so the kernels emulate the
filter's TF32 inputs in software there (truncation to 10 mantissa bits, the hardware's worst case):
the filter really errs, and the answer must still be the fp32 one. A test with the margin set to 0
shows that the margin is what makes it so.
"""
import pytest
import torch

from attnrules import engine
from attnrules.engine import triton_backend
from attnrules.kernels import plan as kernel_plan
from topk_oracle import assert_exact, assert_matches, random_inputs, score_matrix, tolerance
from triton_probes import state_probe

pytestmark = pytest.mark.interpreter

NQ, NK, D = 37, 53, 20


def _same(a: engine.TopK, b: engine.TopK) -> None:
    assert torch.equal(a.query_idx, b.query_idx) and torch.equal(a.key_idx, b.key_idx)
    assert torch.equal(a.scores, b.scores)


def _tf32(x: torch.Tensor) -> torch.Tensor:
    """Truncation to TF32, written independently of the kernel's (bit mask on the int32 view)."""
    return (x.view(torch.int32) & ~((1 << 13) - 1)).view(torch.float32)


@pytest.mark.parametrize("by", engine.BY_CHOICES)
def test_filter_and_rescore_return_the_fp32_answer(by):
    q, k, w, qa, ka = random_inputs(NQ, NK, D, n_ex=9, seed=21)
    kk = {"global": 40, "query": 7, "key": 7}[by]
    calls = {
        "signed": lambda p: engine.pair_topk(q, k, kk, by=by, key_weight=w, backend="triton", precision=p),
        "absolute": lambda p: engine.pair_topk(q, k, kk, by=by, key_weight=w, score="absolute", backend="triton",
                                               precision=p),
        "exp": lambda p: engine.pair_topk(q / D, k / D, kk, by=by, key_weight=w, score="exp", backend="triton",
                                          precision=p),
        "dual": lambda p: engine.dual_topk(q, k, qa, ka, kk, by=by, backend="triton", precision=p),
    }
    for name, call in calls.items():
        fp32 = call("ieee")
        for precision in ("tf32", "tf32x3"):
            _same(call(precision), fp32)
    s = score_matrix(q, k, query_acts=qa, key_acts=ka)
    assert_matches(calls["dual"]("tf32"), s, kk, by, tol=tolerance(s, D) * 10)


def _near_ties(n_keys: int = 96):
    """Scores 1 + j·2⁻¹⁸ for key j: exact in fp32, all equal to 1 after TF32 truncation of the keys."""
    q = torch.zeros(16, 16)
    q[:, 0] = 1.0
    k = torch.zeros(n_keys, 16)
    k[:, 0] = 1.0 + torch.arange(n_keys, dtype=torch.float32) * 2.0**-18
    return q, k


@pytest.mark.parametrize("by", ["global", "query"])
def test_margin_is_what_makes_the_filter_exact(by, monkeypatch):
    q, k = _near_ties()
    s = score_matrix(q, k)
    assert bool((_tf32(k) @ q.T == 1.0).all()), "the filter cannot tell these keys apart"
    kk = 3
    res = engine.pair_topk(q, k, kk, by=by, backend="triton", block_q=16, block_k=16)
    assert_exact(res, s, kk, by)
    # Without the margin, later key blocks (truly better, filtered to 1.0) fall below the threshold
    # the first block set, and are never rescored: the answer is wrong.
    monkeypatch.setattr(kernel_plan, "filter_margin", lambda *args: 0.0)
    wrong = engine.pair_topk(q, k, kk, by=by, backend="triton", block_q=16, block_k=16)
    assert not torch.equal(wrong.key_idx, res.key_idx)


@pytest.mark.parametrize("precision", ["tf32", "tf32x3"])
def test_margin_bounds_the_emulated_filter(precision):
    # Worst cases for truncation (mantissas just below a power of two), mixed signs and scales.
    g = torch.Generator().manual_seed(0)
    n, d = 400, 64
    a = torch.randn(n, d, generator=g) * torch.exp2(torch.randint(-8, 8, (n, 1), generator=g).float())
    b = torch.randn(n, d, generator=g)
    b[: n // 2] = torch.sign(b[: n // 2]) * (2.0 - 2.0**-23) * torch.exp2(torch.randint(-4, 4, (n // 2, d),
                                                                                          generator=g).float())
    exact = a.double() @ b.double().T
    if precision == "tf32":
        filt = (_tf32(a).double() @ _tf32(b).double().T)
    else:
        ah, bh = _tf32(a), _tf32(b)
        al, bl = _tf32(a - ah), _tf32(b - bh)
        filt = ah.double() @ bh.double().T + ah.double() @ bl.double().T + al.double() @ bh.double().T
    bound = kernel_plan.dot_margin(precision, d) * (a.double().norm(dim=1)[:, None] * b.double().norm(dim=1)[None, :])
    err = (filt - exact).abs()
    assert bool((err <= bound).all())
    if precision == "tf32":  # (tf32x3's bound is mostly the fp32 accumulation, exact here in float64)
        assert float((err / bound).max()) > 0.05, "the bound should not be vacuous on these inputs"


def test_global_floor_pass_is_exact(monkeypatch):
    monkeypatch.setattr(triton_backend, "SAMPLE_MIN_ROWS", 32)
    monkeypatch.setattr(triton_backend, "SAMPLE_STRIDE", 4)
    floors = []
    real = triton_backend._floor

    def spy(*args, **kwargs):
        floors.append(real(*args, **kwargs))
        return floors[-1]

    monkeypatch.setattr(triton_backend, "_floor", spy)
    q, k, w, _, _ = random_inputs(70, 90, 12, seed=9)
    s = score_matrix(q, k, key_weight=w)
    res = engine.pair_topk(q, k, 50, key_weight=w, backend="triton", block_q=16, block_k=16)
    assert_matches(res, s, 50, "global", tol=tolerance(s, 12))
    kth = sorted(s.ravel())[-50]
    assert len(floors) == 1 and -float("inf") < floors[0] <= kth
    reference = engine.pair_topk(q, k, 50, key_weight=w, backend="triton", block_q=16, block_k=16, precision="ieee")
    _same(res, reference)


def test_buffer_addressing_is_int64_beyond_2_31_slots():
    # A per-row plan whose buffers hold more than 2³¹ slots (never allocated here).
    p = kernel_plan.plan(n_rows=2**22, n_cols=2**16, d=64, k=100, global_mode=False, n_splits=4)
    assert p.buffer_slots > 2**31
    out = torch.zeros(2, dtype=torch.int64)
    split, row_block = p.n_splits - 1, p.n_row_blocks - 1
    r0 = row_block * p.block_r
    # The kernel's arithmetic, on int32 program ids and sizes as a launch passes them.
    state_probe[(1,)](out, torch.tensor(split, dtype=torch.int32).item(), p.n_rows, r0, row_block, p.n_splits,
                       CAP=p.cap, GLOBAL=False)
    assert out.tolist() == [split * p.n_rows + r0, p.first_slot(row_block, split)]
    assert p.first_slot(row_block, split) > 2**31
